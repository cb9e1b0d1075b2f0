//! What lets a room outlive its worker. Every event is stamped with the room's
//! next sequence number and kept in the room's [`Journal`] until the worker's
//! next checkpoint covers it; if the worker fails, the checkpoint and the
//! journal rebuild the room exactly on its replacement (the pool's `recovery`
//! sends them). A room blamed for repeated crashes is closed alone, and a room
//! that cannot be rebuilt exactly is closed rather than rebuilt wrong.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::journal::{Journal, Recorded};
use super::room::RoomEntry;
use super::{Registry, lock};
use contract::ipc::{RoomEvent, RoomId, Stamped, ToWorker, WorkerId};
use contract::protocol::unix_time_ms;

/// A room blamed for this many worker crashes within [`POISON_WINDOW`] is closed.
pub const POISON_CRASHES: usize = 3;
/// How long a crash counts against a room: blames older than this are forgotten.
pub const POISON_WINDOW: Duration = Duration::from_secs(60);

/// A room's stamping, checkpoint, journal, restore progress and crash blame,
/// kept under the room's lock with its members (see [`RoomState`](super::room::RoomState)).
#[derive(Default)]
pub(super) struct Recovery {
    /// Last sequence number stamped for this room.
    pub(super) last_seq: u64,
    /// Seed of the room's current instance on its worker.
    pub(super) id_seed: u64,
    /// The worker's latest checkpoint: (last frame it covers, opaque image).
    checkpoint: Option<(u64, Vec<u8>)>,
    /// Every event stamped after the checkpoint, in order: with the checkpoint
    /// it rebuilds the room exactly if its worker fails.
    pub(super) journal: Journal,
    /// The journal asked for a checkpoint; sent with the room's next frame.
    pub(super) checkpoint_wanted: bool,
    /// The room's worker failed and the room is not restored yet: events are
    /// journaled but not sent.
    pub(super) restoring: bool,
    /// Last journaled seq already sent to the replacement during a restore.
    restore_sent: u64,
    /// Worker crashes attributed to this room.
    blames: Vec<Instant>,
    /// Last event covered by a save the worker confirmed (0: none yet).
    pub(super) saved_seq: u64,
}

impl Recovery {
    /// Stamps an event and records it in the journal.
    pub(super) fn stamp(&mut self, room: &RoomId, event: RoomEvent) -> ToWorker {
        self.last_seq += 1;
        let stamped = Stamped {
            room: room.clone(),
            seq: self.last_seq,
            time_ms: unix_time_ms(),
            event,
        };
        if self.journal.record(&stamped) == Recorded::WantsCheckpoint {
            self.checkpoint_wanted = true;
        }
        ToWorker::Event(stamped)
    }

    /// A copy of what rebuilds the room.
    fn salvage(&self, room: &RoomId, quarantined: bool) -> RoomSalvage {
        RoomSalvage {
            room: room.clone(),
            id_seed: self.id_seed,
            image: self.checkpoint.as_ref().map(|(_, image)| image.clone()),
            events: self.journal.iter().cloned().collect(),
            complete: self.journal.restorable(),
            quarantined,
        }
    }

    /// Starts a new instance of the room on its worker (not a reopening of one
    /// that is still closing, which keeps its state).
    pub(super) fn new_instance(&mut self) -> u64 {
        self.id_seed = rand::random::<u64>();
        self.checkpoint = None;
        self.journal.clear();
        self.id_seed
    }
}

/// What rebuilds a room without its worker: its last checkpoint and the events
/// after it, everything its members saw acknowledged. Taken from a room closed
/// because it kept crashing its workers, or copied from one whose worker was
/// lost during a stop, for a salvage into a fallback file.
#[derive(Debug)]
pub struct RoomSalvage {
    /// The room.
    pub room: RoomId,
    /// The seed of its instance.
    pub id_seed: u64,
    /// Its worker's last checkpoint, if any.
    pub image: Option<Vec<u8>>,
    /// The journal after the checkpoint.
    pub events: Vec<Stamped>,
    /// False if the journal had overflowed (events since the checkpoint were
    /// dropped): the replay then misses some.
    pub complete: bool,
    /// Closed as poison (rather than lost with its worker during a stop).
    pub quarantined: bool,
}

impl Registry {
    /// The worker gave up on `room` (its stored board cannot be read) and freed
    /// it: its members are closed with 1011 and the room is forgotten.
    pub fn room_failed(&self, room: &RoomId, worker: WorkerId) {
        let mut table = lock(&self.table);
        let Some(entry) = table.on_worker(room, worker) else {
            return;
        };
        let mut state = lock(&entry.state);
        table.close_room(
            &entry,
            &mut state,
            contract::protocol::REASON_BOARD_UNREADABLE,
        );
    }

    /// The worker keeps a checkpoint of the room (as of frame `seq`): events up
    /// to `seq` leave the journal.
    pub fn checkpoint(&self, room: &RoomId, worker: WorkerId, seq: u64, image: Vec<u8>) {
        let Some(entry) = self.on_worker(room, worker) else {
            return;
        };
        let recovery = &mut lock(&entry.state).recovery;
        if recovery
            .checkpoint
            .as_ref()
            .is_some_and(|(have, _)| *have > seq)
        {
            return; // an older checkpoint overtaken by a newer one
        }
        recovery.journal.checkpointed(seq);
        recovery.checkpoint = Some((seq, image));
    }

    /// The worker's process ended. Its rooms stay placed on its slot and are
    /// marked for restoring: from now on their events are journaled, not sent.
    /// Rooms that cannot be restored exactly are closed (1011). Returns the rooms
    /// to restore, those never blamed for a crash first.
    pub fn worker_failed(&self, worker: WorkerId) -> Vec<Arc<RoomEntry>> {
        let mut table = lock(&self.table);
        let on_worker: Vec<Arc<RoomEntry>> = table
            .rooms
            .values()
            .filter(|e| e.worker == worker)
            .cloned()
            .collect();
        let mut restore = Vec::new();
        for entry in on_worker {
            let mut state = lock(&entry.state);
            if !state.recovery.journal.restorable() {
                table.close_room(&entry, &mut state, "Room lost: its worker failed");
                continue;
            }
            state.recovery.restoring = true;
            // Closes the dead worker never answered are re-sent after the restore.
            state.closing = 0;
            let blamed = !state.recovery.blames.is_empty();
            drop(state);
            restore.push((blamed, entry));
        }
        restore.sort_by_key(|(blamed, entry)| (*blamed, entry.id.clone()));
        restore.into_iter().map(|(_, entry)| entry).collect()
    }

    /// Closes a room being restored whose journal overflowed (events it had not
    /// sent to the new worker were dropped): it cannot be rebuilt exactly.
    fn close_unrestorable(&self, entry: &RoomEntry) {
        let mut table = lock(&self.table);
        let Some(current) = table
            .rooms
            .get(&entry.id)
            .filter(|e| std::ptr::eq(Arc::as_ptr(e), entry))
            .cloned()
        else {
            return;
        };
        let mut state = lock(&current.state);
        if state.lost || state.recovery.journal.restorable() {
            return;
        }
        tracing::error!(room = %entry.id, "the room's journal overflowed while it was being restored: it cannot be rebuilt exactly; closing it for its members (1011)");
        table.close_room(&current, &mut state, "Room lost: its worker failed");
    }

    /// The frames that rebuild `entry` on a new worker: its checkpoint (or a load
    /// from the store) and its journal. `None` if the room is gone.
    pub fn restore_frames(&self, entry: &RoomEntry) -> Option<Vec<ToWorker>> {
        let mut state = lock(&entry.state);
        if state.lost || !state.recovery.restoring {
            return None;
        }
        let recovery = &mut state.recovery;
        if !recovery.journal.restorable() {
            drop(state);
            self.close_unrestorable(entry);
            return None;
        }
        let mut frames = vec![ToWorker::RestoreRoom {
            room: entry.id.clone(),
            id_seed: recovery.id_seed,
            image: recovery.checkpoint.as_ref().map(|(_, image)| image.clone()),
        }];
        frames.extend(recovery.journal.iter().cloned().map(ToWorker::Event));
        recovery.restore_sent = recovery.last_seq;
        Some(frames)
    }

    /// Events journaled since `restore_frames` (or the last call); when there are
    /// none, the restore is complete and later events go to the worker directly.
    /// Returns the frames to send and whether the restore is complete. `close`
    /// is a slot of the worker's queue: if everyone left during the restore, the
    /// room's `CloseRoom` goes through it under the room's lock, so it precedes
    /// any frame of a member joining right after.
    pub fn finish_restore(
        &self,
        entry: &RoomEntry,
        close: mpsc::Permit<'_, ToWorker>,
    ) -> (Vec<ToWorker>, bool) {
        let mut state = lock(&entry.state);
        if state.lost {
            return (Vec::new(), true);
        }
        if !state.recovery.journal.restorable() {
            drop(state);
            self.close_unrestorable(entry);
            return (Vec::new(), true);
        }
        let recovery = &mut state.recovery;
        let sent = recovery.restore_sent;
        let frames: Vec<ToWorker> = recovery
            .journal
            .iter()
            .filter(|s| s.seq > sent)
            .cloned()
            .map(ToWorker::Event)
            .collect();
        if !frames.is_empty() {
            recovery.restore_sent = recovery.last_seq;
            return (frames, false);
        }
        recovery.restoring = false;
        if !state.open {
            // Everyone left meanwhile (or before): save and free it as usual.
            state.closing += 1;
            close.send(ToWorker::CloseRoom {
                room: entry.id.clone(),
            });
        }
        (Vec::new(), true)
    }

    /// What rebuilds each room on `worker` that has events since its last
    /// confirmed save (see [`unconfirmed_rooms`](Self::unconfirmed_rooms)).
    pub fn unconfirmed_salvage(&self, worker: WorkerId) -> Vec<RoomSalvage> {
        self.unconfirmed_rooms(worker)
            .iter()
            .filter_map(|room| {
                let entry = self.on_worker(room, worker)?;
                let state = lock(&entry.state);
                Some(state.recovery.salvage(room, false))
            })
            .collect()
    }

    /// Attributes a worker crash to `room` (it was being restored when the worker
    /// crashed by its own doing). After [`POISON_CRASHES`] within
    /// [`POISON_WINDOW`], the room alone is closed for its members with 1011 and
    /// returned as [`RoomSalvage`]: what its members saw acknowledged, for a
    /// salvage into a fallback file.
    pub fn blame(&self, room: &RoomId) -> Option<RoomSalvage> {
        let mut table = lock(&self.table);
        let entry = table.rooms.get(room).cloned()?;
        let mut state = lock(&entry.state);
        let now = Instant::now();
        let blames = &mut state.recovery.blames;
        blames.retain(|t| now.duration_since(*t) < POISON_WINDOW);
        blames.push(now);
        if blames.len() < POISON_CRASHES {
            return None;
        }
        let quarantined = state.recovery.salvage(&entry.id, true);
        state.recovery.checkpoint = None;
        state.recovery.journal.clear();
        table.close_room(
            &entry,
            &mut state,
            "Room closed: it repeatedly crashed the server",
        );
        Some(quarantined)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::rooms::Membership;
    use contract::ipc::ConnId;

    #[tokio::test]
    async fn a_failed_worker_s_room_is_restored_from_checkpoint_and_journal() {
        let (registry, mut frames) = registry(1, 1, 1);
        let (tx, rx) = (registry.queue(WorkerId(0)).clone(), &mut frames[0]);
        let handle = registry
            .register(&room("a"), ConnId(1), "u".into(), commands().0)
            .unwrap();
        handle.join(ConnId(1), None).await.unwrap(); // seq 1
        for text in ["m2", "m3", "m4"] {
            handle.forward(ConnId(1), text.into()).await.unwrap();
        }
        registry.checkpoint(&room("a"), WorkerId(0), 2, b"image@2".to_vec());
        while rx.try_recv().is_ok() {}

        let restoring = registry.worker_failed(WorkerId(0));
        assert_eq!(restoring.len(), 1);
        let entry = &restoring[0];
        // Events during the restore are journaled, not sent.
        handle.forward(ConnId(1), "m5".into()).await.unwrap();
        assert!(rx.try_recv().is_err());

        let frames = registry.restore_frames(entry).unwrap();
        match &frames[0] {
            ToWorker::RestoreRoom { room: r, image, .. } => {
                assert_eq!(r.0, "a");
                assert_eq!(image.as_deref(), Some(&b"image@2"[..]));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(events(&frames), [3, 4, 5]);
        handle.forward(ConnId(1), "m6".into()).await.unwrap();
        let (more, done) = registry.finish_restore(entry, tx.reserve().await.unwrap());
        assert_eq!((events(&more), done), (vec![6], false));
        let (rest, done) = registry.finish_restore(entry, tx.reserve().await.unwrap());
        assert!(rest.is_empty() && done);
        // Restored: events go to the worker again.
        handle.forward(ConnId(1), "m7".into()).await.unwrap();
        assert!(matches!(rx.try_recv(), Ok(ToWorker::Event(s)) if s.seq == 7));
    }

    #[tokio::test]
    async fn a_room_blamed_for_three_crashes_is_closed_alone() {
        let (registry, _frames) = registry(1, 2, 2);
        let (_poison, crx) = joined(&registry, "p", 1).await;
        let (_other, _) = joined(&registry, "o", 2).await;
        assert!(registry.blame(&room("p")).is_none());
        assert!(registry.blame(&room("p")).is_none());
        // Blamed rooms are restored after the others.
        let order: Vec<String> = registry
            .worker_failed(WorkerId(0))
            .iter()
            .map(|e| e.id.0.clone())
            .collect();
        assert_eq!(order, ["o", "p"]);
        // Closed, with what its members saw acknowledged (here the join) kept
        // for the salvage.
        let quarantined = registry.blame(&room("p")).expect("closed on the third");
        assert_eq!(quarantined.room, room("p"));
        assert!(quarantined.complete);
        assert!(matches!(
            quarantined.events.as_slice(),
            [Stamped {
                event: RoomEvent::Join { .. },
                ..
            }]
        ));
        assert!(matches!(
            crx.borrow().membership,
            Membership::Closed { code: 1011, .. }
        ));
        assert_eq!(registry.rooms_by_worker(), vec![vec![room("o")]]);
    }

    /// The only member reloads while the room is being restored: the rejoin
    /// keeps the instance (its checkpoint and journal), it does not start anew.
    #[tokio::test]
    async fn a_rejoin_during_a_restore_keeps_the_checkpoint() {
        let (registry, _frames) = registry(1, 1, 1);
        let (handle, _) = joined(&registry, "a", 1).await;
        registry.checkpoint(&room("a"), WorkerId(0), 1, b"image@1".to_vec());
        registry.worker_failed(WorkerId(0));
        registry
            .register(&room("a"), ConnId(2), "u".into(), commands().0)
            .unwrap();
        handle.leave(ConnId(1)).await;
        handle.join(ConnId(2), None).await.unwrap();
        let frames = registry.restore_frames(&handle.0).unwrap();
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
        let (registry, _frames) = registry(1, 1, 1);
        let (handle, crx) = joined(&registry, "a", 1).await;
        registry.worker_failed(WorkerId(0));
        let big = format!(
            r#"{{"type":"shape_create","shapeType":"text","x":0,"y":0,"width":1,"height":1,"text":"{}"}}"#,
            "t".repeat(9_000)
        );
        let mut sent = 0;
        while lock(&handle.0.state).recovery.journal.restorable() {
            handle.forward(ConnId(1), big.clone()).await.unwrap();
            sent += 1;
            assert!(sent < 5_000, "the journal never overflowed");
        }
        assert!(registry.restore_frames(&handle.0).is_none());
        assert!(matches!(
            crx.borrow().membership,
            Membership::Closed { code: 1011, .. }
        ));
        assert!(registry.rooms_by_worker()[0].is_empty());
    }
}
