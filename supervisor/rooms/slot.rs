//! The rooms of one worker slot, as the slot's task owns them
//! ([`SlotRooms`]): sessions' events come in through the slot's inbox
//! ([`SlotEvent`]), the worker's replies through its socket, and frames go out
//! through the slot's frame queue, in the order the events came. One owner, so
//! no lock: stamping, journaling, membership and fan-out are plain code.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tokio::sync::watch;

use super::handle::{
    ConnStateSender, Holder, Membership, Query, RoomLink, RoomTraffic, SessionEvent, SlotEvent,
};
use super::recovery::Restores;
use super::registry::Registry;
use super::room::{Member, Room};
use crate::close::CloseReason;
use crate::worker_queue::{Ticket, WorkerQueue};
use contract::ipc::{ConnId, FromWorker, RoomEvent, RoomId, ToWorker, WorkerId};

/// Every room placed on one worker slot, owned by the slot's task.
pub(crate) struct SlotRooms {
    pub(super) worker: WorkerId,
    /// Boxed: a room is large, and the map's spare capacity would hold
    /// room-sized slots (measured: idle memory per room).
    pub(super) rooms: HashMap<RoomId, Box<Room>>,
    /// The slot's frame queue, to its worker's socket.
    pub(super) queue: WorkerQueue,
    pub(super) registry: Arc<Registry>,
    /// No process holds the slot's rooms now (its worker failed and the
    /// replacement has not started restoring): a room placed meanwhile is
    /// journaled and restored with the others.
    pub(super) down: bool,
    pub(super) restores: Restores,
    /// The shutdown phase has moved past running: a connection registered
    /// from now on is rung at once to see it.
    pub(super) phase_moved: bool,
}

impl SlotRooms {
    /// The rooms of `worker`'s slot, sending frames to `queue`.
    pub fn new(worker: WorkerId, queue: WorkerQueue, registry: Arc<Registry>) -> SlotRooms {
        SlotRooms {
            worker,
            rooms: HashMap::new(),
            queue,
            registry,
            down: false,
            restores: Restores::default(),
            phase_moved: false,
        }
    }

    /// Handles one event of the slot's inbox.
    pub fn event(&mut self, event: SlotEvent) {
        match event {
            SlotEvent::Register {
                link,
                conn,
                user_id,
                state,
            } => self.register(link, conn, user_id, state),
            SlotEvent::Session { link, conn, event } => self.session(&link, conn, event),
            SlotEvent::MemoryBudget { full } => {
                for room in self.rooms.values_mut() {
                    room.send_event(&self.queue, RoomEvent::MemoryBudget { full }, Ticket::None);
                }
            }
            SlotEvent::PhaseMoved => {
                self.phase_moved = true;
                for member in self.rooms.values().flat_map(|room| room.conns.values()) {
                    member.state.ring_always();
                }
            }
            SlotEvent::PingTick { share } => {
                let members = self.rooms.values().flat_map(|room| room.conns.iter());
                for (conn, member) in members {
                    if conn.0 % super::PING_SHARES == share {
                        member.state.ring_always();
                    }
                }
            }
            SlotEvent::Query(query) => self.answer(query),
        }
    }

    fn register(
        &mut self,
        link: Arc<RoomLink>,
        conn: ConnId,
        user_id: String,
        state: ConnStateSender,
    ) {
        let room = match self.rooms.get_mut(&link.id) {
            Some(room) if room.link.placement == link.placement => room,
            // A placement closed meanwhile (its room lost): dropping `state`
            // tells the session.
            Some(_) => return,
            None => {
                if !self.registry.is_placed(&link) {
                    return;
                }
                let mut room = Box::new(Room::new(link.clone()));
                room.recovery.restoring = self.down;
                self.rooms.entry(link.id.clone()).or_insert(room)
            }
        };
        room.registered += 1;
        if self.phase_moved {
            state.ring_always();
        }
        room.conns.insert(conn, Member::new(state, user_id));
    }

    fn session(&mut self, link: &RoomLink, conn: ConnId, event: SessionEvent) {
        let Some(room) = self
            .rooms
            .get_mut(&link.id)
            .filter(|room| room.link.placement == link.placement)
        else {
            // The room is gone: its members' states were closed with it.
            match event {
                SessionEvent::Probe(answer) => drop(answer.send(Holder::None)),
                SessionEvent::IsJoined(answer) => drop(answer.send(false)),
                _ => {}
            }
            return;
        };
        match event {
            SessionEvent::Join {
                replace,
                v2,
                deflate,
            } => room.join(&self.queue, conn, replace, v2, deflate),
            SessionEvent::Message { text, charge } => {
                if room.conns.get(&conn).is_some_and(|m| m.joined) {
                    room.link
                        .traffic
                        .messages_in
                        .fetch_add(1, Ordering::Relaxed);
                    let message = RoomEvent::Message { conn, text };
                    room.send_event(&self.queue, message, Ticket::Charge(charge));
                }
                // Else replaced by a newer connection of its user; its session
                // is closing.
            }
            SessionEvent::Leave => {
                room.leave(&self.queue, conn);
                let id = room.id().clone();
                self.release_if_done(&id);
            }
            SessionEvent::Alive => {
                if let Some(probe) = room.conns.get_mut(&conn).and_then(|m| m.probe.take()) {
                    probe.send_replace(true);
                }
            }
            SessionEvent::Probe(answer) => drop(answer.send(room.probe_holder(conn))),
            SessionEvent::IsJoined(answer) => {
                let _ = answer.send(room.conns.get(&conn).is_some_and(|m| m.joined));
            }
        }
    }

    /// Routes one of the worker's replies about a room; returns the others.
    pub fn worker_message(&mut self, message: FromWorker) -> Option<FromWorker> {
        match message {
            FromWorker::Snapshot {
                room,
                json,
                ops,
                deflated,
            } => {
                if let Some(room) = self.rooms.get_mut(&room) {
                    room.publish(
                        Bytes::from(json),
                        ops.map(Bytes::from),
                        deflated.map(Bytes::from),
                    );
                }
            }
            FromWorker::JoinAccepted { room, conn } => self.tell(&room, conn, |room| {
                Membership::Admitted(room.snapshots.subscribe())
            }),
            FromWorker::JoinRejected { room, conn, reason } => self.tell(&room, conn, |_| {
                Membership::Closed(CloseReason::Rejected(reason))
            }),
            FromWorker::Refused {
                room,
                conn,
                seq,
                kind,
                reason,
            } => {
                if let Some(room) = self.rooms.get_mut(&room)
                    && seq > room.refused_up_to
                {
                    // Else a replayed event, told already.
                    room.refused_up_to = seq;
                    if let Some(member) = room.conns.get(&conn) {
                        member.state.send_modify(|s| {
                            s.refused += 1;
                            s.last_refused = Some((kind, reason));
                        });
                    }
                }
            }
            FromWorker::RoomClosed { room } | FromWorker::CloseCancelled { room } => {
                if let Some(entry) = self.rooms.get_mut(&room) {
                    entry.closing = entry.closing.saturating_sub(1);
                    self.release_if_done(&room);
                }
            }
            FromWorker::Saved { room, seq } => {
                tracing::debug!(worker = %self.worker, %room, seq, "room saved");
                if let Some(room) = self.rooms.get_mut(&room) {
                    let recovery = &mut room.recovery;
                    recovery.saved_seq = recovery.saved_seq.max(seq);
                }
            }
            FromWorker::Checkpoint { room, seq, image } => self.checkpoint(&room, seq, image),
            FromWorker::RoomFailed { room } => {
                tracing::warn!(worker = %self.worker, %room, "room closed: its stored board cannot be read");
                self.close_room(&room, CloseReason::BoardUnreadable);
            }
            FromWorker::Synced { room, token } if !room.0.is_empty() => self.synced(&room, token),
            FromWorker::Stats {
                frames,
                ignored,
                rooms,
            } => {
                for summary in rooms {
                    if let Some(room) = self.rooms.get_mut(&summary.room) {
                        room.summary = Some(summary);
                    }
                }
                return Some(FromWorker::Stats {
                    frames,
                    ignored,
                    rooms: Vec::new(),
                });
            }
            other => return Some(other),
        }
        None
    }

    /// Tells a joined connection's session the worker's verdict. A connection
    /// that was closed meanwhile (replaced, or its room lost) stays closed.
    fn tell(&self, room: &RoomId, conn: ConnId, membership: impl FnOnce(&Room) -> Membership) {
        let Some(room) = self.rooms.get(room) else {
            return;
        };
        if let Some(member) = room.conns.get(&conn).filter(|m| m.joined) {
            let membership = membership(room);
            member.state.send_if_modified(|s| {
                let open = !matches!(s.membership, Membership::Closed { .. });
                if open {
                    s.membership = membership;
                }
                open
            });
        }
    }

    /// Frees the room's place once nothing refers to it and no registration
    /// is on its way to it.
    pub(super) fn release_if_done(&mut self, id: &RoomId) {
        let Some(room) = self.rooms.get(id) else {
            return;
        };
        if room.done() && self.registry.release(&room.link, room.registered) {
            self.rooms.remove(id);
        }
    }

    /// Closes every connection of a room for `reason` and forgets the room.
    pub(super) fn close_room(&mut self, id: &RoomId, reason: CloseReason) {
        if let Some(room) = self.rooms.remove(id) {
            for member in room.conns.values() {
                member.close(reason);
            }
            self.registry.forget(&room.link);
        }
    }

    fn answer(&self, query: Query) {
        match query {
            Query::Monitor(answer) => {
                drop(answer.send(self.rooms.values().map(|room| room.monitor()).collect()))
            }
            Query::Traffic(answer) => {
                let traffic = self.rooms.values().map(|room| RoomTraffic {
                    room: room.id().0.clone(),
                    messages_in: room.link.traffic.messages_in.load(Ordering::Relaxed),
                    bytes_out: room.link.traffic.bytes_out.load(Ordering::Relaxed),
                    journal: room.recovery.journal.len() as u64,
                });
                drop(answer.send(traffic.collect()));
            }
            Query::Unconfirmed(answer) => drop(answer.send(self.unconfirmed_rooms())),
            Query::Salvage(answer) => drop(answer.send(self.unconfirmed_salvage())),
        }
    }

    /// Rooms with events since their last confirmed save, sorted: those whose
    /// changes may be lost if the worker is lost now (a superset: joins and
    /// cursor moves count too, the supervisor does not read events).
    pub fn unconfirmed_rooms(&self) -> Vec<RoomId> {
        let mut rooms: Vec<RoomId> = self
            .rooms
            .values()
            .filter(|room| room.recovery.last_seq > room.recovery.saved_seq)
            .map(|room| room.id().clone())
            .collect();
        rooms.sort();
        rooms
    }
}

impl Room {
    /// Stamps `event`, journals it, and sends it to the worker (unless the
    /// room is being restored: the restore sends the journal), with the
    /// checkpoint the journal asks for.
    pub(super) fn send_event(&mut self, queue: &WorkerQueue, event: RoomEvent, ticket: Ticket) {
        let frame = self.recovery.stamp(&self.link.id, event);
        if !self.recovery.restoring {
            queue.send_with(frame, ticket);
            if std::mem::take(&mut self.recovery.checkpoint_wanted) {
                queue.send(ToWorker::CheckpointRequest {
                    room: self.link.id.clone(),
                });
            }
        } else if let Ticket::Charge(charge) = ticket {
            // Held until the restore sends it (see `Recovery::held`).
            let seq = self.recovery.last_seq;
            self.recovery.held.push_back((seq, charge));
        }
    }

    /// Sends the connection's join to the worker, opening the room there first
    /// if it is not open (see [`RoomHandle::join`](super::RoomHandle::join)).
    fn join(
        &mut self,
        queue: &WorkerQueue,
        conn: ConnId,
        replace: Option<ConnId>,
        v2: bool,
        deflate: bool,
    ) {
        let Some(user_id) = self
            .conns
            .get(&conn)
            .filter(|m| !m.joined)
            .map(|m| m.user_id.to_string())
        else {
            return;
        };
        if let Some(old) = replace
            && let Some(member) = self.conns.get_mut(&old).filter(|m| m.joined)
        {
            member.joined = false;
            member.close(CloseReason::Replaced);
            self.joined -= 1;
            self.send_event(queue, RoomEvent::Leave { conn: old }, Ticket::None);
        }
        if !self.open {
            self.open = true;
            // A room being restored, or still closing on its worker, keeps its
            // instance: a rejoin must not drop the checkpoint and journal that
            // rebuild it. One placed while its worker was down has none yet:
            // it gets one (its own seed, so its shape ids never collide with
            // an earlier instance's saved ones).
            let restoring = self.recovery.restoring;
            let new = self.closing == 0 && (!restoring || !self.recovery.has_instance());
            let id_seed = if new {
                self.recovery.new_instance()
            } else {
                self.recovery.id_seed
            };
            if !restoring {
                queue.send(ToWorker::OpenRoom {
                    room: self.link.id.clone(),
                    id_seed,
                });
            }
        }
        let join = RoomEvent::Join {
            conn,
            user_id,
            v2,
            deflate,
        };
        self.send_event(queue, join, Ticket::None);
        self.joined += 1;
        if let Some(member) = self.conns.get_mut(&conn) {
            member.joined = true;
            member.v2 = v2;
        }
        if v2 {
            self.count_v2_member(true);
        }
    }

    /// Removes a connection. If it is joined, the worker is told, and the last
    /// leave closes the room on the worker.
    fn leave(&mut self, queue: &WorkerQueue, conn: ConnId) {
        let Some(member) = self.conns.remove(&conn) else {
            return;
        };
        if member.v2 {
            self.count_v2_member(false);
        }
        if !member.joined {
            return;
        }
        self.send_event(queue, RoomEvent::Leave { conn }, Ticket::None);
        self.joined -= 1;
        if self.joined == 0 && self.open {
            self.open = false;
            if !self.recovery.restoring {
                // While restoring, the restore sends the close when done.
                self.closing += 1;
                queue.send(ToWorker::CloseRoom {
                    room: self.link.id.clone(),
                });
            }
        }
    }

    /// Whether another joined connection holds `conn`'s user in the room; if
    /// so, asks that connection's session to ping its client (once for all
    /// who ask meanwhile).
    fn probe_holder(&mut self, conn: ConnId) -> Holder {
        let Some(user_id) = self.conns.get(&conn).map(|m| m.user_id.clone()) else {
            return Holder::None;
        };
        let holder = self
            .conns
            .iter_mut()
            .find(|(c, m)| **c != conn && m.joined && m.user_id == user_id);
        let Some((&holder, member)) = holder else {
            return Holder::None;
        };
        let answer = match &member.probe {
            Some(probe) => probe.subscribe(),
            None => {
                let (probe, answer) = watch::channel(false);
                member.probe = Some(probe);
                member
                    .state
                    .send_modify(|s| s.probes = s.probes.wrapping_add(1));
                answer
            }
        };
        Holder::Probed {
            conn: holder,
            answer,
        }
    }

    /// What the monitor shows of the room.
    fn monitor(&self) -> serde_json::Value {
        let summary = self.summary.as_ref();
        serde_json::json!({
            "room": self.link.id.0,
            "worker": self.link.worker.0,
            "connections": self.conns.len(),
            "members": summary.map(|s| s.members),
            "shapes": summary.map(|s| s.shapes),
            "unsaved": summary.map(|s| s.unsaved),
            "lastSaveMs": summary.and_then(|s| s.last_save_ms),
            "restoring": self.recovery.restoring,
            "journal": self.recovery.journal.len(),
            "journalBytes": self.recovery.journal.bytes(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use contract::ipc::{ConnId, FromWorker};

    #[tokio::test]
    async fn rooms_with_events_since_their_last_confirmed_save_are_listed() {
        let (registry, mut slots) = registry(2, 2, 100);
        for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
            let (handle, _) = joined(&registry, &mut slots, name, i as u64); // seq 1
            handle.forward(ConnId(i as u64), "m".into()).await.unwrap(); // seq 2
        }
        // a and c are on worker 0, b on worker 1.
        assert_eq!(slots.rooms(0).unconfirmed_rooms(), [room("a"), room("c")]);
        let saved = |name: &str, seq| FromWorker::Saved {
            room: room(name),
            seq,
        };
        let w0 = slots.rooms(0);
        w0.worker_message(saved("a", 2));
        w0.worker_message(saved("c", 1));
        w0.worker_message(saved("b", 2)); // not b's worker: ignored
        assert_eq!(w0.unconfirmed_rooms(), [room("c")]);
        assert_eq!(slots.rooms(1).unconfirmed_rooms(), [room("b")]);
    }
}
