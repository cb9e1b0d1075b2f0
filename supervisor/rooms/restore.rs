//! How a worker slot's task rebuilds its rooms on a replacement worker: those
//! never suspected of a crash all at once (a room waiting for its store
//! delays no other), then the suspects one at a time, so a room that keeps
//! killing workers is the only one in flight when it does. A crash is blamed
//! on the rooms whose restore the worker had started reading; a room blamed
//! for repeated crashes is closed alone, and a room that cannot be rebuilt
//! exactly is closed rather than rebuilt wrong.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::recovery::{
    InFlight, POISON_CRASHES, POISON_WINDOW, Restores, RoomSalvage, held_ticket,
};
use super::slot::SlotRooms;
use crate::close::CloseReason;
use crate::worker_queue::Ticket;
use contract::ipc::{RoomId, ToWorker};

impl SlotRooms {
    /// The worker keeps a checkpoint of the room (as of frame `seq`): events up
    /// to `seq` leave the journal.
    pub(super) fn checkpoint(&mut self, room: &RoomId, seq: u64, image: Vec<u8>) {
        let Some(room) = self.rooms.get_mut(room) else {
            return;
        };
        let recovery = &mut room.recovery;
        if recovery
            .checkpoint
            .as_ref()
            .is_some_and(|(have, _)| *have > seq)
        {
            return; // an older checkpoint overtaken by a newer one
        }
        recovery.journal.checkpointed(seq);
        // Events the checkpoint covers are not sent again.
        recovery.held.retain(|(held, _)| *held > seq);
        recovery.checkpoint = Some((seq, image));
    }

    /// Rooms whose restore the ended process had started reading and not
    /// answered: what a crash is blamed on.
    pub fn restores_taken(&self) -> Vec<RoomId> {
        let mut rooms: Vec<RoomId> = self
            .restores
            .in_flight
            .iter()
            .filter(|(_, r)| r.taken.load(Ordering::Relaxed))
            .map(|(room, _)| room.clone())
            .collect();
        rooms.sort();
        rooms
    }

    /// The slot's process ended. The crash is blamed on `blamed` (a room
    /// blamed [`POISON_CRASHES`] times within [`POISON_WINDOW`] is closed for
    /// its members with 1011 and returned, what its members saw acknowledged,
    /// for a salvage into a fallback file); `suspected` are restored one at a
    /// time next. Every other room stays placed on the slot and is restored
    /// on the replacement: from now on its events are journaled, not sent.
    /// Rooms that cannot be restored exactly are closed (1011). Returns the
    /// rooms to restore (those never blamed first) and the quarantined ones.
    pub fn worker_failed(
        &mut self,
        blamed: &[RoomId],
        suspected: &[RoomId],
    ) -> (Vec<RoomId>, Vec<RoomSalvage>) {
        self.down = true;
        self.restores = Restores::default();
        let now = Instant::now();
        for room in suspected {
            if let Some(room) = self.rooms.get_mut(room) {
                room.recovery.suspected_at = Some(now);
            }
        }
        let quarantined: Vec<RoomSalvage> = blamed
            .iter()
            .filter_map(|room| self.blame(room, now))
            .collect();
        let unrestorable: Vec<RoomId> = self
            .rooms
            .values()
            .filter(|room| !room.recovery.journal.restorable())
            .map(|room| room.id().clone())
            .collect();
        for room in &unrestorable {
            self.close_room(room, CloseReason::RoomLost);
        }
        let mut restore: Vec<(bool, RoomId)> = Vec::new();
        for room in self.rooms.values_mut() {
            room.recovery.restoring = true;
            // Closes the dead worker never answered are re-sent after the restore.
            room.closing = 0;
            restore.push((!room.recovery.blames.is_empty(), room.id().clone()));
        }
        restore.sort();
        let restore = restore.into_iter().map(|(_, room)| room).collect();
        (restore, quarantined)
    }

    /// Attributes a worker crash to `room` (see [`worker_failed`](Self::worker_failed)).
    fn blame(&mut self, id: &RoomId, now: Instant) -> Option<RoomSalvage> {
        let room = self.rooms.get_mut(id)?;
        let blames = &mut room.recovery.blames;
        blames.retain(|t| now.duration_since(*t) < POISON_WINDOW);
        blames.push(now);
        if blames.len() < POISON_CRASHES {
            warn!(worker = %self.worker, room = %id, "worker crash attributed to a room it was restoring");
            return None;
        }
        let quarantined = room.recovery.salvage(id, true);
        room.recovery.checkpoint = None;
        room.recovery.journal.clear();
        room.recovery.held.clear();
        error!(worker = %self.worker, room = %id, "room closed for its members (1011): it crashed {POISON_CRASHES} workers within {POISON_WINDOW:?}; replaying its edits into a fallback file");
        self.close_room(id, CloseReason::RoomQuarantined);
        Some(quarantined)
    }

    /// A replacement process is ready: restores every room it inherits, those
    /// never suspected at once, then the suspects one at a time, each waiting
    /// at most `wait` for the worker's answer.
    pub fn start_restores(&mut self, wait: Duration) {
        self.down = false;
        let now = Instant::now();
        let mut rooms: Vec<(bool, RoomId)> = self
            .rooms
            .values()
            .filter(|room| room.recovery.restoring)
            .map(|room| (room.recovery.suspect(now), room.id().clone()))
            .collect();
        rooms.sort();
        let suspects = rooms.iter().filter(|(suspect, _)| *suspect).count();
        self.restores = Restores {
            wait,
            round: (!rooms.is_empty()).then_some((now, rooms.len(), suspects)),
            ..Restores::default()
        };
        for (suspect, room) in rooms {
            if suspect {
                self.restores.waiting.push_back(room);
            } else {
                self.begin_restore(&room);
            }
        }
        self.next_suspect();
    }

    /// Whether restores are under way or waiting.
    pub fn restoring(&self) -> bool {
        !self.restores.in_flight.is_empty() || !self.restores.waiting.is_empty()
    }

    /// When the earliest restore under way stops waiting for its answer.
    pub fn restore_deadline(&self) -> Option<Instant> {
        self.restores.in_flight.values().map(|r| r.until).min()
    }

    /// Goes on with the restores whose answer did not come in time.
    pub fn restores_overdue(&mut self, now: Instant) {
        let overdue: Vec<RoomId> = self
            .restores
            .in_flight
            .iter()
            .filter(|(_, r)| r.until <= now)
            .map(|(room, _)| room.clone())
            .collect();
        for room in overdue {
            warn!(%room, "no answer while restoring (its load may be slow); going on");
            self.restores.in_flight.remove(&room);
            self.finish_restore(&room);
        }
        self.next_suspect();
    }

    /// The worker answered a restore's `Sync`: it has applied the frames.
    pub(super) fn synced(&mut self, room: &RoomId, token: u64) {
        // Else: a late answer to a restore that stopped waiting.
        if self
            .restores
            .in_flight
            .get(room)
            .is_some_and(|r| r.token == token)
        {
            self.restores.in_flight.remove(room);
            self.finish_restore(room);
            self.next_suspect();
        }
    }

    /// Starts the next suspect's restore once nothing else is in flight; logs
    /// the round's end.
    fn next_suspect(&mut self) {
        while self.restores.in_flight.is_empty() {
            let Some(room) = self.restores.waiting.pop_front() else {
                if let Some((started, rooms, suspects)) = self.restores.round.take() {
                    info!(worker = %self.worker, rooms, suspects, ms = started.elapsed().as_millis() as u64, "rooms restored");
                }
                return;
            };
            self.begin_restore(&room);
        }
    }

    /// Queues a room's checkpoint (or a load from the store) and its journal
    /// for the worker, then a `Sync` whose answer says it has applied them.
    fn begin_restore(&mut self, id: &RoomId) {
        let Some(room) = self.rooms.get_mut(id).filter(|r| r.recovery.restoring) else {
            return; // closed meanwhile
        };
        if !room.recovery.journal.restorable() {
            self.close_unrestorable(id);
            return;
        }
        let recovery = &mut room.recovery;
        let taken = Arc::new(AtomicBool::new(false));
        let restore = ToWorker::RestoreRoom {
            room: id.clone(),
            id_seed: recovery.id_seed,
            image: recovery.checkpoint.as_ref().map(|(_, image)| image.clone()),
        };
        self.queue.send_with(restore, Ticket::Taken(taken.clone()));
        for event in recovery.journal.stamped(id) {
            let ticket = held_ticket(&mut recovery.held, event.seq);
            self.queue.send_with(ToWorker::Event(event), ticket);
        }
        recovery.restore_sent = recovery.last_seq;
        let token = rand::random::<u64>();
        self.queue.send(ToWorker::Sync {
            room: id.clone(),
            token,
        });
        let until = Instant::now() + self.restores.wait;
        self.restores.in_flight.insert(
            id.clone(),
            InFlight {
                token,
                taken,
                until,
            },
        );
    }

    /// Sends what was journaled since the restore's frames; from now on the
    /// room's events go to the worker directly. If everyone left meanwhile,
    /// the room is closed on the worker (saved and freed as usual).
    fn finish_restore(&mut self, id: &RoomId) {
        let Some(room) = self.rooms.get_mut(id).filter(|r| r.recovery.restoring) else {
            return;
        };
        if !room.recovery.journal.restorable() {
            self.close_unrestorable(id);
            return;
        }
        let recovery = &mut room.recovery;
        let sent = recovery.restore_sent;
        for event in recovery.journal.stamped(id).filter(|s| s.seq > sent) {
            let ticket = held_ticket(&mut recovery.held, event.seq);
            self.queue.send_with(ToWorker::Event(event), ticket);
        }
        recovery.restore_sent = recovery.last_seq;
        recovery.restoring = false;
        if !room.open {
            room.closing += 1;
            self.queue.send(ToWorker::CloseRoom { room: id.clone() });
        }
    }

    /// Closes a room being restored whose journal overflowed (events it had not
    /// sent to the new worker were dropped): it cannot be rebuilt exactly.
    fn close_unrestorable(&mut self, id: &RoomId) {
        error!(room = %id, "the room's journal overflowed while it was being restored: it cannot be rebuilt exactly; closing it for its members (1011)");
        self.close_room(id, CloseReason::RoomLost);
    }

    /// What rebuilds each room with events since its last confirmed save (see
    /// [`unconfirmed_rooms`](Self::unconfirmed_rooms)).
    pub fn unconfirmed_salvage(&self) -> Vec<RoomSalvage> {
        self.unconfirmed_rooms()
            .iter()
            .filter_map(|id| Some(self.rooms.get(id)?.recovery.salvage(id, false)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::rooms::Membership;
    use contract::ipc::{ConnId, FromWorker};
    use contract::ipc::{RoomEvent, Stamped};

    /// The token of the restore's `Sync` among `frames`.
    fn sync_token(frames: &[ToWorker]) -> u64 {
        frames
            .iter()
            .find_map(|f| match f {
                ToWorker::Sync { token, .. } => Some(*token),
                _ => None,
            })
            .expect("a Sync")
    }

    fn checkpoint(seq: u64, image: &[u8]) -> FromWorker {
        FromWorker::Checkpoint {
            room: room("a"),
            seq,
            image: image.to_vec(),
        }
    }

    #[tokio::test]
    async fn a_failed_worker_s_room_is_restored_from_checkpoint_and_journal() {
        let (registry, mut slots) = registry(1, 1, 1);
        let (handle, _) = joined(&registry, &mut slots, "a", 1); // seq 1
        for text in ["m2", "m3", "m4"] {
            handle.forward(ConnId(1), text.into()).await.unwrap();
        }
        slots.rooms(0).worker_message(checkpoint(2, b"image@2"));
        slots.frames(0);

        let (restoring, quarantined) = slots.rooms(0).worker_failed(&[], &[]);
        assert_eq!((restoring, quarantined.len()), (vec![room("a")], 0));
        // Events during the restore are journaled, not sent.
        handle.forward(ConnId(1), "m5".into()).await.unwrap();
        assert!(slots.frames(0).is_empty());

        slots.rooms(0).start_restores(Duration::from_secs(30));
        let frames = slots.frames(0);
        match &frames[0] {
            ToWorker::RestoreRoom { room: r, image, .. } => {
                assert_eq!(r.0, "a");
                assert_eq!(image.as_deref(), Some(&b"image@2"[..]));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(events(&frames), [3, 4, 5]);
        assert!(slots.rooms(0).restoring());
        handle.forward(ConnId(1), "m6".into()).await.unwrap();
        assert!(
            slots.frames(0).is_empty(),
            "still journaled until the answer"
        );
        // A late answer of another restore changes nothing.
        slots.rooms(0).synced(&room("a"), sync_token(&frames) ^ 1);
        assert!(slots.frames(0).is_empty());
        slots.rooms(0).synced(&room("a"), sync_token(&frames));
        assert_eq!(events(&slots.frames(0)), [6]);
        assert!(!slots.rooms(0).restoring());
        // Restored: events go to the worker again.
        handle.forward(ConnId(1), "m7".into()).await.unwrap();
        assert_eq!(events(&slots.frames(0)), [7]);
    }

    #[tokio::test]
    async fn a_room_blamed_for_three_crashes_is_closed_alone() {
        let (registry, mut slots) = registry(1, 2, 2);
        let (_poison, crx) = joined(&registry, &mut slots, "p", 1);
        let (_other, _) = joined(&registry, &mut slots, "o", 2);
        let rooms = slots.rooms(0);
        let p = [room("p")];
        let (order, quarantined) = rooms.worker_failed(&p, &[]);
        assert!(quarantined.is_empty());
        // Blamed rooms are restored after the others.
        assert_eq!(order, [room("o"), room("p")]);
        rooms.worker_failed(&p, &[]);
        // Closed on the third, with what its members saw acknowledged (here
        // the join) kept for the salvage.
        let (order, quarantined) = rooms.worker_failed(&p, &[]);
        assert_eq!(order, [room("o")]);
        let [quarantined] = &quarantined[..] else {
            panic!("one room closed: {quarantined:?}");
        };
        assert_eq!(quarantined.room, room("p"));
        assert!(quarantined.complete && quarantined.quarantined);
        assert!(matches!(
            quarantined.events.as_slice(),
            [Stamped {
                event: RoomEvent::Join { .. },
                ..
            }]
        ));
        assert!(matches!(
            crx.borrow().membership,
            Membership::Closed(CloseReason::RoomQuarantined)
        ));
        assert_eq!(registry.rooms_by_worker(), vec![vec![room("o")]]);
    }

    /// Suspects (blamed or suspected within the window) are restored one at
    /// a time, after the others; a crash is blamed only on the restores the
    /// worker had started reading.
    #[tokio::test]
    async fn suspects_are_restored_one_at_a_time_and_only_taken_restores_are_blamed() {
        let (registry, mut slots) = registry(1, 4, 4);
        let _members: Vec<_> = ["a", "b", "s", "t"]
            .iter()
            .enumerate()
            .map(|(i, name)| joined(&registry, &mut slots, name, i as u64))
            .collect();
        slots.frames(0);
        slots.rooms(0).worker_failed(&[], &[room("s"), room("t")]);
        slots.rooms(0).start_restores(Duration::from_secs(30));
        let restored = |frames: &[ToWorker]| -> Vec<String> {
            frames
                .iter()
                .filter_map(|f| match f {
                    ToWorker::RestoreRoom { room, .. } => Some(room.0.clone()),
                    _ => None,
                })
                .collect()
        };
        slots.pump();
        assert_eq!(slots.rooms(0).restores_taken(), Vec::<RoomId>::new());
        // The writer takes a's first frame: a crash now blames a alone.
        let taken = slots.0[0].frames.try_recv().unwrap();
        assert_eq!(slots.rooms(0).restores_taken(), [room("a")]);
        let mut first = vec![taken];
        first.extend(slots.frames(0));
        assert_eq!(restored(&first), ["a", "b"]);
        let syncs: Vec<(RoomId, u64)> = first
            .iter()
            .filter_map(|f| match f {
                ToWorker::Sync { room, token } => Some((room.clone(), *token)),
                _ => None,
            })
            .collect();
        for (room, token) in &syncs {
            slots.rooms(0).synced(room, *token);
        }
        let next = slots.frames(0);
        assert_eq!(restored(&next), ["s"], "one suspect at a time");
        slots.rooms(0).synced(&room("s"), sync_token(&next));
        let last = slots.frames(0);
        assert_eq!(restored(&last), ["t"]);
        // Its frames were taken by the writer (here, by `frames`): blamed.
        assert_eq!(slots.rooms(0).restores_taken(), [room("t")]);
    }

    /// During an outage a client's messages are journaled with their share of
    /// the worker's byte budget held: once the budget is spent its sender
    /// waits (its client's TCP), instead of the journal growing past its
    /// bound; the restore sends them and gives the budget back.
    #[tokio::test]
    async fn an_outage_holds_senders_at_the_budget_and_the_restore_releases_them() {
        let (registry, mut slots) = registry(1, 1, 1);
        let (handle, _) = joined(&registry, &mut slots, "a", 1);
        slots.rooms(0).worker_failed(&[], &[]);
        slots.frames(0);
        let big = "x".repeat(64 * 1024);
        let fit = crate::worker_queue::MESSAGE_KIB as usize / 64;
        for _ in 0..fit {
            handle
                .forward(ConnId(1), big.as_str().into())
                .await
                .unwrap();
        }
        slots.pump();
        let next = tokio::time::timeout(
            Duration::from_millis(50),
            handle.forward(ConnId(1), big.as_str().into()),
        );
        assert!(
            next.await.is_err(),
            "the sender waits once the budget is held"
        );
        assert!(
            slots.rooms(0).rooms[&room("a")]
                .recovery
                .journal
                .restorable()
        );
        slots.rooms(0).start_restores(Duration::from_secs(30));
        assert_eq!(
            events(&slots.frames(0)).len(),
            1 + fit,
            "the join and the messages"
        );
        // Taken by the writer: the budget is back.
        handle
            .forward(ConnId(1), big.as_str().into())
            .await
            .unwrap();
    }

    /// A restore whose answer does not come in time goes on without it.
    #[tokio::test]
    async fn a_restore_without_an_answer_goes_on_after_its_wait() {
        let (registry, mut slots) = registry(1, 1, 1);
        let (handle, _) = joined(&registry, &mut slots, "a", 1);
        slots.rooms(0).worker_failed(&[], &[]);
        slots.rooms(0).start_restores(Duration::from_millis(10));
        slots.frames(0);
        handle.forward(ConnId(1), "late".into()).await.unwrap();
        let rooms = slots.rooms(0);
        let deadline = rooms.restore_deadline().expect("a restore waits");
        rooms.restores_overdue(deadline - Duration::from_millis(1));
        assert!(rooms.restoring(), "not yet");
        rooms.restores_overdue(deadline);
        assert!(!rooms.restoring());
        assert_eq!(events(&slots.frames(0)), [2]);
    }

    /// A room first placed while its slot's worker is down gets an instance
    /// of its own (a seed), restored with its journal: two such instances of
    /// one room never make the same shape ids (which would overwrite the
    /// saved shapes of the first).
    #[tokio::test]
    async fn a_room_placed_while_its_worker_is_down_gets_an_instance_of_its_own() {
        let (registry, mut slots) = registry(1, 2, 2);
        let mut seeds = Vec::new();
        for conn in [1, 2] {
            slots.rooms(0).worker_failed(&[], &[]);
            let (handle, _) = joined(&registry, &mut slots, "late", conn);
            slots.rooms(0).start_restores(Duration::from_secs(30));
            let frames = slots.frames(0);
            let ToWorker::RestoreRoom { id_seed, image, .. } = &frames[0] else {
                panic!("{frames:?}");
            };
            assert_eq!((image, events(&frames).len()), (&None, 1), "its join");
            seeds.push(*id_seed);
            // It closes (everyone left), so the next one is a new instance.
            handle.leave(ConnId(conn));
            slots
                .rooms(0)
                .worker_message(FromWorker::RoomClosed { room: room("late") });
            slots.frames(0);
        }
        assert!(seeds.iter().all(|seed| *seed != 0), "{seeds:?}");
        assert_ne!(seeds[0], seeds[1]);
    }

    /// The only member reloads while the room is being restored: the rejoin
    /// keeps the instance (its checkpoint and journal), it does not start anew.
    #[tokio::test]
    async fn a_rejoin_during_a_restore_keeps_the_checkpoint() {
        let (registry, mut slots) = registry(1, 1, 1);
        let (handle, _) = joined(&registry, &mut slots, "a", 1);
        slots.rooms(0).worker_message(checkpoint(1, b"image@1"));
        slots.rooms(0).worker_failed(&[], &[]);
        slots.frames(0); // the dead worker's, discarded
        registry
            .register(&room("a"), ConnId(2), "u".into(), commands().0)
            .unwrap();
        handle.leave(ConnId(1));
        handle.join(ConnId(2), None, false, false);
        slots.rooms(0).start_restores(Duration::from_secs(30));
        let frames = slots.frames(0);
        assert!(matches!(
            &frames[0],
            ToWorker::RestoreRoom { image: Some(image), .. } if image == b"image@1"
        ));
        assert_eq!(
            events(&frames),
            [2, 3],
            "leave and rejoin, after the checkpoint"
        );
    }

    /// A journal that overflows while its room is being restored lost events the
    /// new worker never got: the room is closed (1011), never rebuilt wrong.
    #[tokio::test]
    async fn a_journal_overflowing_during_a_restore_closes_the_room() {
        let (registry, mut slots) = registry(1, 1, 1);
        let (_handle, crx) = joined(&registry, &mut slots, "a", 1);
        slots.rooms(0).worker_failed(&[], &[]);
        slots.frames(0); // the dead worker's, discarded
        // Client messages cannot overflow it now (their senders wait at the
        // budget: the test above); events that carry no charge can, past
        // the journal's event bound: the memory budget's verdicts.
        let mut sent = 0;
        while slots.rooms(0).rooms[&room("a")]
            .recovery
            .journal
            .restorable()
        {
            for _ in 0..1_000 {
                registry.set_memory_pressure(false, Some(sent % 2 == 0));
                sent += 1;
            }
            assert!(sent <= 100_000, "the journal never overflowed");
        }
        slots.rooms(0).start_restores(Duration::from_secs(30));
        assert!(slots.frames(0).is_empty(), "nothing restored");
        assert!(matches!(
            crx.borrow().membership,
            Membership::Closed(CloseReason::RoomLost)
        ));
        assert!(registry.rooms_by_worker()[0].is_empty());
    }
}
