//! The rooms placed on this server, as the supervisor sees them. It never looks
//! inside room state. One job per module:
//!
//! - here, [`Registry`]: **placement**, which worker holds each room (capacity,
//!   the least loaded worker, avoiding a silent one), and the routing of the
//!   worker's verdicts and snapshots to the room they name;
//! - [`handle`]: [`RoomHandle`], what a session uses (join, forward, leave, probe
//!   the user's earlier connection), holding the room's worker queue;
//! - [`room`]: one placed room and its members ([`RoomEntry`]);
//! - [`fanout`]: the room's newest snapshot and its recent v2 ops batches;
//! - [`recovery`]: what lets a room outlive its worker (stamping, checkpoint
//!   and [`journal`], restore, crash blame);
//! - [`saves`]: what the store has confirmed (per room, and its health).
//!
//! Ordering: every frame for a room is stamped and queued to its worker while the
//! room's lock is held, so sequence numbers follow queue order, and `OpenRoom` /
//! `CloseRoom` are decided together with the joins and leaves they depend on.
//! Queue slots are reserved *before* taking the lock (reserving may wait), so no
//! lock is ever held across an `.await`. Locks are taken in one order: the
//! placement table, then a room's state.

pub mod fanout;
pub mod handle;
pub mod journal;
pub mod recovery;
pub mod room;
pub mod saves;
#[cfg(test)]
mod testing;

use crate::worker_queue::WorkerQueue;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::sync::watch;

use contract::ipc::{ConnId, JoinRejection, RoomId, RoomSummary, WorkerId};
use contract::protocol::{CLOSE_INTERNAL_ERROR, CLOSE_POLICY, IgnoredReason, MessageKind};

pub use fanout::{Published, SnapshotCell};
pub use handle::{RoomHandle, RoomLost};
pub use recovery::{POISON_CRASHES, POISON_WINDOW, RoomSalvage};
pub use room::{ConnState, ConnStateSender, Holder, Membership, RoomEntry};
pub use saves::SAVES_FAILING_UNREADY_AFTER;

use room::{Member, RoomState};
use saves::SaveHealth;

/// Why a new room could not be placed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlacementError {
    /// Every worker holds its `--rooms-per-worker` rooms (the limit is the
    /// field).
    #[error("no capacity for a new room: every worker holds its maximum of {0} rooms")]
    AllWorkersFull(usize),
    /// The server holds its `--max-rooms` rooms (the field).
    #[error("no capacity for a new room: the server holds its maximum of {0} rooms")]
    AtCapacity(usize),
    /// The memory budget is nearly spent (`--memory-limit`).
    #[error("no capacity for a new room: the server's memory budget is nearly spent")]
    MemoryBudget,
}

/// One room at one instant, as the registry reads it for the monitor.
#[derive(Clone, Debug, PartialEq)]
pub struct RoomTraffic {
    /// The room's id.
    pub room: String,
    /// Client messages forwarded to its worker since it was placed.
    pub messages_in: u64,
    /// Bytes written to its members since it was placed.
    pub bytes_out: u64,
    /// Client events journaled and not yet checkpointed.
    pub journal: u64,
}

/// Rooms placed on this server: now, and since it started (so that a room that
/// opened and closed between two looks is still seen).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Placed {
    /// Rooms placed now (open, closing or being restored).
    pub now: usize,
    /// Rooms placed since the server started.
    pub opened: u64,
}

/// The rooms placed on this server's workers: which worker holds each room and
/// which connections are registered for it.
///
/// A connection is registered before its WebSocket upgrade
/// ([`Registry::register`], which places a new room on the least loaded worker
/// with capacity) and gets a [`RoomHandle`] for its session. The IPC reader
/// routes each worker message to the room it names (`admit`, `reject`,
/// `publish`, `close_resolved`, and the [`recovery`] and [`saves`] methods); a
/// room whose id is no longer placed, or placed on another worker, ignores it.
/// A room stays placed from its first connection until every connection has
/// left and its worker has confirmed it freed the room.
///
/// One per server, made by [`run`](crate::run) and shared by the upgrade
/// handler, the pool (its IPC readers and the restore of a failed worker's
/// rooms), and what reports rooms (`/status`, `/metrics`, `/readyz`, the
/// Agones lifecycle).
pub struct Registry {
    table: Arc<Mutex<Table>>,
    /// Each worker's frame queue (the pool's slot queue; it outlives the
    /// worker's processes). A placed room holds its worker's.
    queues: Vec<WorkerQueue>,
    rooms_per_worker: usize,
    /// Total rooms across workers.
    max_rooms: usize,
    /// Whether the store keeps refusing saves (for `/readyz`).
    save_health: Mutex<SaveHealth>,
    /// Per worker: it does not answer pings right now. New rooms go elsewhere
    /// while another worker has room (this one is replaced within seconds, and a
    /// room placed on it would wait for that).
    unresponsive: Vec<AtomicBool>,
    /// The memory budget refuses new rooms (see `memory::enforce_budget`).
    memory_refuses_rooms: AtomicBool,
}

/// The placement table, under one lock.
pub(super) struct Table {
    rooms: HashMap<RoomId, Arc<RoomEntry>>,
    /// Rooms placed on each worker (open or still closing).
    load: Vec<usize>,
    /// Rooms placed now and ever, told on every change (the Agones lifecycle).
    placed: watch::Sender<Placed>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves consistent data here (every update is a
    // few assignments); keep serving rather than cascading the panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    /// A registry for one worker per queue, each holding at most
    /// `rooms_per_worker` rooms, and at most `max_rooms` in all.
    pub fn new(queues: Vec<WorkerQueue>, rooms_per_worker: usize, max_rooms: usize) -> Registry {
        let workers = queues.len();
        Registry {
            table: Arc::new(Mutex::new(Table {
                rooms: HashMap::new(),
                load: vec![0; workers],
                placed: watch::Sender::new(Placed::default()),
            })),
            queues,
            rooms_per_worker,
            max_rooms,
            save_health: Mutex::new(SaveHealth::default()),
            unresponsive: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            memory_refuses_rooms: AtomicBool::new(false),
        }
    }

    /// The memory budget's verdict: refuse new rooms (their connections get
    /// 503), and whether every room refuses new shapes: told to each room as
    /// an event, so a room replayed after a crash decides as it did.
    pub async fn set_memory_pressure(&self, refuse_rooms: bool, refuse_shapes: Option<bool>) {
        self.memory_refuses_rooms
            .store(refuse_rooms, Ordering::Relaxed);
        let Some(full) = refuse_shapes else {
            return;
        };
        let rooms: Vec<Arc<RoomEntry>> = lock(&self.table).rooms.values().cloned().collect();
        for entry in rooms {
            RoomHandle::new(entry).memory_budget(full).await;
        }
    }

    /// The frame queue of `worker`.
    pub fn queue(&self, worker: WorkerId) -> &WorkerQueue {
        &self.queues[worker.0 as usize]
    }

    /// The watchdog's view of a worker: new rooms avoid it while it is silent.
    pub fn set_unresponsive(&self, worker: WorkerId, unresponsive: bool) {
        if let Some(flag) = self.unresponsive.get(worker.0 as usize) {
            flag.store(unresponsive, Ordering::Relaxed);
        }
    }

    /// The rooms placed, told on every change.
    pub fn placed_rooms(&self) -> watch::Receiver<Placed> {
        lock(&self.table).placed.subscribe()
    }

    /// The ids of the rooms placed now (the Agones `rooms` List).
    pub fn placed_ids(&self) -> Vec<String> {
        lock(&self.table)
            .rooms
            .keys()
            .map(|room| room.0.clone())
            .collect()
    }

    /// The most rooms this server holds at once (`--max-rooms`).
    pub fn max_rooms(&self) -> usize {
        self.max_rooms
    }

    /// Registers a connection for `room`, placing the room on the least loaded
    /// worker with capacity if it is not placed yet. Called before the WebSocket
    /// upgrade, so a refusal can still be an HTTP status. The connection's
    /// session is told its membership through `state`.
    pub fn register(
        &self,
        room: &RoomId,
        conn: ConnId,
        user_id: String,
        state: ConnStateSender,
    ) -> Result<RoomHandle, PlacementError> {
        let member = Member::new(state, user_id);
        let mut table = lock(&self.table);
        if let Some(entry) = table.rooms.get(room) {
            lock(&entry.state).conns.insert(conn, member);
            return Ok(RoomHandle::new(entry.clone()));
        }
        if table.rooms.len() >= self.max_rooms {
            return Err(PlacementError::AtCapacity(self.max_rooms));
        }
        if self.memory_refuses_rooms.load(Ordering::Relaxed) {
            return Err(PlacementError::MemoryBudget);
        }
        // The least loaded worker with room, preferring those answering pings.
        let silent = |w: usize| self.unresponsive[w].load(Ordering::Relaxed);
        let worker = (0..table.load.len())
            .filter(|&w| table.load[w] < self.rooms_per_worker)
            .min_by_key(|&w| (silent(w), table.load[w]))
            .ok_or(PlacementError::AllWorkersFull(self.rooms_per_worker))?;
        table.load[worker] += 1;
        let entry = Arc::new(RoomEntry::new(
            room.clone(),
            WorkerId(worker as u32),
            self.queues[worker].clone(),
            Arc::downgrade(&self.table),
        ));
        lock(&entry.state).conns.insert(conn, member);
        table.rooms.insert(room.clone(), entry.clone());
        let now = table.rooms.len();
        table.placed.send_modify(|placed| {
            placed.now = now;
            placed.opened += 1;
        });
        Ok(RoomHandle::new(entry))
    }

    /// The room placed as `room` on `worker`, if it is.
    fn on_worker(&self, room: &RoomId, worker: WorkerId) -> Option<Arc<RoomEntry>> {
        lock(&self.table).on_worker(room, worker)
    }

    /// Whether `room` is placed on `worker`.
    pub fn placed_on(&self, room: &RoomId, worker: WorkerId) -> bool {
        self.on_worker(room, worker).is_some()
    }

    /// The worker admitted `conn`: subscribe it to the room's snapshots. Called in
    /// IPC order, so the subscription precedes the snapshot that shows the join.
    pub fn admit(&self, room: &RoomId, conn: ConnId) {
        self.tell(room, conn, |entry| {
            Membership::Admitted(entry.snapshots.subscribe())
        });
    }

    /// The worker refused `conn`: close it with 1008 and the reason.
    pub fn reject(&self, room: &RoomId, conn: ConnId, reason: JoinRejection) {
        self.tell(room, conn, |_| Membership::Closed {
            code: CLOSE_POLICY,
            reason: reason.close_reason(),
        });
    }

    /// The worker refused a v2 member's message (event `seq`) by a room
    /// limit: its session tells the client, once per event.
    pub fn refused(
        &self,
        room: &RoomId,
        conn: ConnId,
        seq: u64,
        refusal: (MessageKind, IgnoredReason),
    ) {
        let Some(entry) = lock(&self.table).rooms.get(room).cloned() else {
            return;
        };
        let mut state = lock(&entry.state);
        if seq <= state.refused_up_to {
            return; // a replayed event, told already
        }
        state.refused_up_to = seq;
        if let Some(member) = state.conns.get(&conn) {
            member.state.send_modify(|s| {
                s.refused += 1;
                s.last_refused = Some(refusal);
            });
        }
    }

    /// Tells a joined connection's session the worker's verdict. A connection that
    /// was closed meanwhile (replaced, or its room lost) stays closed.
    fn tell(&self, room: &RoomId, conn: ConnId, membership: impl FnOnce(&RoomEntry) -> Membership) {
        let Some(entry) = lock(&self.table).rooms.get(room).cloned() else {
            return;
        };
        let state = lock(&entry.state);
        if let Some(member) = state.conns.get(&conn).filter(|m| m.joined) {
            let membership = membership(&entry);
            member.state.send_if_modified(|s| {
                let open = !matches!(s.membership, Membership::Closed { .. });
                if open {
                    s.membership = membership;
                }
                open
            });
        }
    }

    /// Publishes the room's newest snapshot to its members, and for v2 members
    /// the ops that lead to it from the previous one (`None`: none do).
    pub fn publish(
        &self,
        room: &RoomId,
        snapshot: Bytes,
        ops: Option<Bytes>,
        deflated: Option<Bytes>,
    ) {
        let entry = lock(&self.table).rooms.get(room).cloned();
        if let Some(entry) = entry {
            entry.publish(snapshot, ops, deflated);
        }
    }

    /// The worker answered a `CloseRoom`: the room is freed (`RoomClosed`), or
    /// stays because it was reopened first (`CloseCancelled`).
    pub fn close_resolved(&self, room: &RoomId, worker: WorkerId) {
        let mut table = lock(&self.table);
        let Some(entry) = table.on_worker(room, worker) else {
            return;
        };
        let mut state = lock(&entry.state);
        state.closing = state.closing.saturating_sub(1);
        table.remove_if_done(&entry, &state);
    }

    /// Records the worker's summaries of its rooms.
    pub fn summaries(&self, worker: WorkerId, summaries: Vec<RoomSummary>) {
        let table = lock(&self.table);
        for summary in summaries {
            if let Some(entry) = table
                .rooms
                .get(&summary.room)
                .filter(|e| e.worker == worker)
            {
                lock(&entry.state).summary = Some(summary);
            }
        }
    }

    /// Every room with what the monitor shows of it, sorted by id.
    pub fn monitor(&self) -> Vec<serde_json::Value> {
        let table = lock(&self.table);
        let mut rooms: Vec<serde_json::Value> = table
            .rooms
            .values()
            .map(|entry| {
                let state = lock(&entry.state);
                let summary = state.summary.as_ref();
                serde_json::json!({
                    "room": entry.id.0,
                    "worker": entry.worker.0,
                    "connections": state.conns.len(),
                    "members": summary.map(|s| s.members),
                    "shapes": summary.map(|s| s.shapes),
                    "unsaved": summary.map(|s| s.unsaved),
                    "lastSaveMs": summary.and_then(|s| s.last_save_ms),
                    "restoring": state.recovery.restoring,
                    "journal": state.recovery.journal.len(),
                    "journalBytes": state.recovery.journal.bytes(),
                })
            })
            .collect();
        rooms.sort_by(|a, b| a["room"].as_str().cmp(&b["room"].as_str()));
        rooms
    }

    /// What the monitor samples of each room, in one pass: its traffic since
    /// it was placed, and the client events journaled and not yet
    /// checkpointed (what a worker crash would replay).
    pub fn traffic(&self) -> Vec<RoomTraffic> {
        let rooms: Vec<Arc<RoomEntry>> = lock(&self.table).rooms.values().cloned().collect();
        rooms
            .iter()
            .map(|entry| RoomTraffic {
                room: entry.id.0.clone(),
                messages_in: entry.traffic.messages_in.load(Ordering::Relaxed),
                bytes_out: entry.traffic.bytes_out.load(Ordering::Relaxed),
                journal: lock(&entry.state).recovery.journal.len() as u64,
            })
            .collect()
    }

    /// Rooms per worker, sorted, for the status endpoint.
    pub fn rooms_by_worker(&self) -> Vec<Vec<RoomId>> {
        let table = lock(&self.table);
        let mut by_worker = vec![Vec::new(); table.load.len()];
        for entry in table.rooms.values() {
            by_worker[entry.worker.0 as usize].push(entry.id.clone());
        }
        for rooms in &mut by_worker {
            rooms.sort();
        }
        by_worker
    }
}

impl Table {
    /// The room named `room` if it is placed on `worker`: a worker's message
    /// about a room it no longer holds (placed elsewhere since) is ignored.
    fn on_worker(&self, room: &RoomId, worker: WorkerId) -> Option<Arc<RoomEntry>> {
        self.rooms
            .get(room)
            .filter(|entry| entry.worker == worker)
            .cloned()
    }

    /// Closes every connection of a room with 1011 and forgets the room.
    fn close_room(&mut self, entry: &Arc<RoomEntry>, state: &mut RoomState, reason: &'static str) {
        state.lost = true;
        for member in state.conns.values() {
            member.close(CLOSE_INTERNAL_ERROR, reason);
        }
        self.forget(entry);
    }

    /// Drops the entry once nothing refers to the room any more: no connection,
    /// not open on the worker, no close awaiting confirmation.
    fn remove_if_done(&mut self, entry: &Arc<RoomEntry>, state: &RoomState) {
        if state.lost || !state.conns.is_empty() || state.open || state.closing > 0 {
            return;
        }
        self.forget(entry);
    }

    /// Removes `entry` from the map (unless a newer entry for the room replaced
    /// it) and frees its place on its worker.
    fn forget(&mut self, entry: &Arc<RoomEntry>) {
        let is_current = self
            .rooms
            .get(&entry.id)
            .is_some_and(|current| Arc::ptr_eq(current, entry));
        if is_current {
            self.rooms.remove(&entry.id);
            self.load[entry.worker.0 as usize] -= 1;
            let now = self.rooms.len();
            self.placed.send_modify(|placed| placed.now = now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use contract::ipc::ToWorker;

    /// A restored room replays its journal and refuses the same events
    /// again: the member is told of each refused event once.
    #[tokio::test]
    async fn a_refusal_is_told_once_per_event_even_when_replayed() {
        let (registry, _frames) = registry(1, 10, 10);
        let (_handle, state) = joined(&registry, "full", 1).await;
        let board_full = (MessageKind::ShapeCreate, IgnoredReason::BoardFull);
        for seq in [5, 6, 5, 6, 4] {
            registry.refused(&room("full"), ConnId(1), seq, board_full);
        }
        assert_eq!(state.borrow().refused, 2);
        registry.refused(
            &room("full"),
            ConnId(1),
            7,
            (MessageKind::ShapeUpdate, IgnoredReason::BoardFull),
        );
        assert_eq!(state.borrow().refused, 3);
        assert_eq!(
            state.borrow().last_refused,
            Some((MessageKind::ShapeUpdate, IgnoredReason::BoardFull))
        );
    }

    #[test]
    fn rooms_spread_over_workers_and_refuse_when_full() {
        let (registry, _frames) = registry(2, 2, 100);
        let workers: Vec<WorkerId> = ["a", "b", "c", "d"]
            .iter()
            .enumerate()
            .map(|(i, r)| {
                registry
                    .register(&room(r), ConnId(i as u64), "u".into(), commands().0)
                    .unwrap()
                    .worker()
            })
            .collect();
        assert_eq!(
            workers,
            [WorkerId(0), WorkerId(1), WorkerId(0), WorkerId(1)]
        );
        // An existing room still takes connections; a new one does not fit.
        assert_eq!(
            registry
                .register(&room("a"), ConnId(9), "u".into(), commands().0)
                .unwrap()
                .worker(),
            WorkerId(0)
        );
        assert_eq!(
            registry
                .register(&room("e"), ConnId(10), "u".into(), commands().0)
                .err(),
            Some(PlacementError::AllWorkersFull(2))
        );
    }

    #[test]
    fn the_total_capacity_is_enforced_across_workers() {
        let (registry, _frames) = registry(2, 5, 3);
        for (i, r) in ["a", "b", "c"].iter().enumerate() {
            registry
                .register(&room(r), ConnId(i as u64), "u".into(), commands().0)
                .unwrap();
        }
        assert_eq!(
            registry
                .register(&room("d"), ConnId(9), "u".into(), commands().0)
                .err(),
            Some(PlacementError::AtCapacity(3))
        );
    }

    #[tokio::test]
    async fn lifecycle_frames_are_ordered_and_room_freed_after_confirmation() {
        let (registry, mut frames) = registry(1, 1, 100);
        let rx = &mut frames[0];
        let (handle, _) = joined(&registry, "a", 1).await;
        handle.forward(ConnId(1), "hi".into()).await.unwrap();
        handle.leave(ConnId(1)).await;

        let mut frames = Vec::new();
        while let Ok(f) = rx.try_recv() {
            frames.push(f);
        }
        assert!(matches!(&frames[0], ToWorker::OpenRoom { room: r, .. } if r.0 == "a"));
        assert_eq!(events(&frames), [1, 2, 3]);
        assert!(matches!(&frames[4], ToWorker::CloseRoom { room: r } if r.0 == "a"));
        assert_eq!(frames.len(), 5);

        // Until the worker confirms, the room still counts against its worker.
        assert_eq!(
            registry
                .register(&room("b"), ConnId(2), "u".into(), commands().0)
                .err(),
            Some(PlacementError::AllWorkersFull(1))
        );
        registry.close_resolved(&room("a"), WorkerId(0));
        assert!(
            registry
                .register(&room("b"), ConnId(3), "u".into(), commands().0)
                .is_ok()
        );
    }

    #[test]
    fn new_rooms_avoid_a_worker_that_does_not_answer() {
        let (registry, _frames) = registry(2, 2, 100);
        registry.set_unresponsive(WorkerId(0), true);
        let place = |name: &str, conn: u64| {
            registry
                .register(&room(name), ConnId(conn), "u".into(), commands().0)
                .unwrap()
                .worker()
        };
        assert_eq!(place("a", 1), WorkerId(1));
        assert_eq!(place("b", 2), WorkerId(1));
        // The others are full: a silent worker still takes a room (it is being
        // replaced), rather than refusing it.
        assert_eq!(place("c", 3), WorkerId(0));
        registry.set_unresponsive(WorkerId(0), false);
        assert_eq!(place("d", 4), WorkerId(0));
    }
}
