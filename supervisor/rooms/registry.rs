//! Placement: which worker slot holds each room placed on this server, and
//! what reports rooms reads of it (`/status`, `/metrics`, the monitor, Agones).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{mpsc, oneshot, watch};

use super::handle::{
    ConnStateSender, Query, RoomHandle, RoomLink, RoomTraffic, SlotEvent, SlotInbox,
    SlotInboxReceiver, Traffic,
};
use super::recovery::RoomSalvage;
use super::saves::SaveHealth;
use crate::worker_queue::MessageBudget;
use contract::ipc::{ConnId, RoomId, WorkerId};

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

/// Rooms placed on this server: now, and since it started (so that a room that
/// opened and closed between two looks is still seen).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Placed {
    /// Rooms placed now (open, closing or being restored).
    pub now: usize,
    /// Rooms placed since the server started.
    pub opened: u64,
}

/// Which worker slot holds each room placed on this server.
///
/// A connection is registered before its WebSocket upgrade
/// ([`Registry::register`], which places a new room on the least loaded worker
/// with capacity) and gets a [`RoomHandle`] for its session; the registration
/// goes to the slot's task, which owns the room from then on. A room stays
/// placed until its slot's task finds it done (every connection gone, freed
/// on its worker) with no registration on its way to it, or closes it.
///
/// One per server, made by [`run`](crate::run) and shared by the upgrade
/// handler, the slots' tasks, and what reports rooms (`/status`, `/metrics`,
/// `/readyz`, the monitor, the Agones lifecycle).
pub struct Registry {
    table: Mutex<Table>,
    /// Each worker slot's inbox.
    inboxes: Vec<SlotInbox>,
    rooms_per_worker: usize,
    /// Total rooms across workers.
    max_rooms: usize,
    /// Whether the store keeps refusing saves (for `/readyz`).
    pub(super) save_health: Mutex<SaveHealth>,
    /// Per worker: it does not answer pings right now. New rooms go elsewhere
    /// while another worker has room (this one is replaced within seconds, and a
    /// room placed on it would wait for that).
    unresponsive: Vec<AtomicBool>,
    /// The memory budget refuses new rooms (see `memory::enforce_budget`).
    memory_refuses_rooms: AtomicBool,
}

/// The placement table, under one lock.
struct Table {
    rooms: HashMap<RoomId, Placement>,
    /// Rooms placed on each worker (open or still closing).
    load: Vec<usize>,
    /// Rooms placed now and ever, told on every change (the Agones lifecycle).
    placed: watch::Sender<Placed>,
    next_placement: u64,
}

/// A room placed on a slot.
struct Placement {
    link: Arc<RoomLink>,
    /// Registrations sent to the slot's task.
    registered: u64,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves consistent data here (every update is a
    // few assignments); keep serving rather than cascading the panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    /// A registry for `workers` slots, each holding at most `rooms_per_worker`
    /// rooms, and at most `max_rooms` in all; with each slot's inbox, for the
    /// slot's task.
    pub(crate) fn new(
        workers: usize,
        rooms_per_worker: usize,
        max_rooms: usize,
    ) -> (Registry, Vec<SlotInboxReceiver>) {
        let (inboxes, receivers) = (0..workers)
            .map(|_| {
                let (events, receiver) = mpsc::unbounded_channel();
                let budget = MessageBudget::default();
                (SlotInbox { events, budget }, receiver)
            })
            .unzip();
        let registry = Registry {
            table: Mutex::new(Table {
                rooms: HashMap::new(),
                load: vec![0; workers],
                placed: watch::Sender::new(Placed::default()),
                next_placement: 0,
            }),
            inboxes,
            rooms_per_worker,
            max_rooms,
            save_health: Mutex::new(SaveHealth::default()),
            unresponsive: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            memory_refuses_rooms: AtomicBool::new(false),
        };
        (registry, receivers)
    }

    /// The shutdown phase moved: every slot's task rings its sessions.
    pub fn phase_moved(&self) {
        for inbox in &self.inboxes {
            inbox.send(SlotEvent::PhaseMoved);
        }
    }

    /// Rings the sessions of one share of connections to look at their pings.
    pub fn ping_tick(&self, share: u64) {
        for inbox in &self.inboxes {
            inbox.send(SlotEvent::PingTick { share });
        }
    }

    /// The memory budget's verdict: refuse new rooms (their connections get
    /// 503), and whether every room refuses new shapes: told to each room as
    /// an event, so a room replayed after a crash decides as it did.
    pub fn set_memory_pressure(&self, refuse_rooms: bool, refuse_shapes: Option<bool>) {
        self.memory_refuses_rooms
            .store(refuse_rooms, Ordering::Relaxed);
        if let Some(full) = refuse_shapes {
            for inbox in &self.inboxes {
                inbox.send(SlotEvent::MemoryBudget { full });
            }
        }
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
    #[cfg(feature = "agones")]
    pub fn placed_ids(&self) -> Vec<String> {
        lock(&self.table)
            .rooms
            .keys()
            .map(|room| room.0.clone())
            .collect()
    }

    /// The most rooms this server holds at once (`--max-rooms`).
    #[cfg(feature = "agones")]
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
        let mut table = lock(&self.table);
        let link = match table.rooms.get_mut(room) {
            Some(placement) => {
                placement.registered += 1;
                placement.link.clone()
            }
            None => {
                let link = self.place(&mut table, room)?;
                table.rooms.insert(
                    room.clone(),
                    Placement {
                        link: link.clone(),
                        registered: 1,
                    },
                );
                let now = table.rooms.len();
                table.placed.send_modify(|placed| {
                    placed.now = now;
                    placed.opened += 1;
                });
                link
            }
        };
        // Under the table's lock: the slot's task sees it before it can
        // ask to release the room.
        link.inbox.send(SlotEvent::Register {
            link: link.clone(),
            conn,
            user_id,
            state,
        });
        Ok(RoomHandle(link))
    }

    /// A new placement of `room` on the least loaded worker with room,
    /// preferring those answering pings.
    fn place(&self, table: &mut Table, room: &RoomId) -> Result<Arc<RoomLink>, PlacementError> {
        if table.rooms.len() >= self.max_rooms {
            return Err(PlacementError::AtCapacity(self.max_rooms));
        }
        if self.memory_refuses_rooms.load(Ordering::Relaxed) {
            return Err(PlacementError::MemoryBudget);
        }
        let silent = |w: usize| self.unresponsive[w].load(Ordering::Relaxed);
        let worker = (0..table.load.len())
            .filter(|&w| table.load[w] < self.rooms_per_worker)
            .min_by_key(|&w| (silent(w), table.load[w]))
            .ok_or(PlacementError::AllWorkersFull(self.rooms_per_worker))?;
        table.load[worker] += 1;
        table.next_placement += 1;
        Ok(Arc::new(RoomLink {
            id: room.clone(),
            worker: WorkerId(worker as u32),
            placement: table.next_placement,
            inbox: self.inboxes[worker].clone(),
            traffic: Traffic::default(),
        }))
    }

    /// Whether `link` is the room's current placement.
    pub(super) fn is_placed(&self, link: &RoomLink) -> bool {
        lock(&self.table)
            .rooms
            .get(&link.id)
            .is_some_and(|p| p.link.placement == link.placement)
    }

    /// The slot's task found the room done after `registered` registrations:
    /// frees its place unless another registration is on its way to it.
    pub(super) fn release(&self, link: &RoomLink, registered: u64) -> bool {
        let mut table = lock(&self.table);
        let current = table
            .rooms
            .get(&link.id)
            .filter(|p| p.link.placement == link.placement);
        match current {
            Some(p) if p.registered != registered => false,
            Some(_) => {
                table.remove(link);
                true
            }
            None => true,
        }
    }

    /// Frees a closed room's place at once (its connections were closed).
    pub(super) fn forget(&self, link: &RoomLink) {
        let mut table = lock(&self.table);
        if table
            .rooms
            .get(&link.id)
            .is_some_and(|p| p.link.placement == link.placement)
        {
            table.remove(link);
        }
    }

    /// Asks every slot's task `query`; their answers in slot order.
    async fn ask<T>(&self, query: impl Fn(oneshot::Sender<T>) -> Query) -> Vec<T> {
        let answers: Vec<_> = self
            .inboxes
            .iter()
            .map(|inbox| asked(inbox, &query))
            .collect();
        futures_util::future::join_all(answers)
            .await
            .into_iter()
            .filter_map(Result::ok)
            .collect()
    }

    /// Every room with what the monitor shows of it, sorted by id.
    pub async fn monitor(&self) -> Vec<serde_json::Value> {
        let mut rooms: Vec<serde_json::Value> = self
            .ask(Query::Monitor)
            .await
            .into_iter()
            .flatten()
            .collect();
        rooms.sort_by(|a, b| a["room"].as_str().cmp(&b["room"].as_str()));
        rooms
    }

    /// What the monitor samples of each room, in one pass: its traffic since
    /// it was placed, and the client events journaled and not yet
    /// checkpointed (what a worker crash would replay).
    pub async fn traffic(&self) -> Vec<RoomTraffic> {
        self.ask(Query::Traffic)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Rooms on `worker` with events since their last confirmed save, sorted:
    /// those whose changes may be lost if the worker is lost now.
    pub async fn unconfirmed_rooms(&self, worker: WorkerId) -> Vec<RoomId> {
        self.ask_one(worker, Query::Unconfirmed).await
    }

    /// What rebuilds each of those rooms, for a salvage into a fallback file.
    pub async fn unconfirmed_salvage(&self, worker: WorkerId) -> Vec<RoomSalvage> {
        self.ask_one(worker, Query::Salvage).await
    }

    async fn ask_one<T: Default>(
        &self,
        worker: WorkerId,
        query: impl FnOnce(oneshot::Sender<T>) -> Query,
    ) -> T {
        let Some(inbox) = self.inboxes.get(worker.0 as usize) else {
            return T::default();
        };
        asked(inbox, query).await.unwrap_or_default()
    }

    /// Rooms per worker, sorted, for the status endpoint.
    pub fn rooms_by_worker(&self) -> Vec<Vec<RoomId>> {
        let table = lock(&self.table);
        let mut by_worker = vec![Vec::new(); table.load.len()];
        for placement in table.rooms.values() {
            by_worker[placement.link.worker.0 as usize].push(placement.link.id.clone());
        }
        for rooms in &mut by_worker {
            rooms.sort();
        }
        by_worker
    }
}

/// Sends `query` to a slot's task; its answer comes through the receiver
/// (an error if the task is gone).
fn asked<T>(
    inbox: &SlotInbox,
    query: impl FnOnce(oneshot::Sender<T>) -> Query,
) -> oneshot::Receiver<T> {
    let (answer, answered) = oneshot::channel();
    inbox.send(SlotEvent::Query(query(answer)));
    answered
}

impl Table {
    /// Removes the room's placement and frees its place on its worker.
    fn remove(&mut self, link: &RoomLink) {
        self.rooms.remove(&link.id);
        self.load[link.worker.0 as usize] -= 1;
        let now = self.rooms.len();
        self.placed.send_modify(|placed| placed.now = now);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::rooms::{Holder, Membership};
    use contract::ipc::ToWorker;
    use contract::protocol::{IgnoredReason, MessageKind};

    /// A restored room replays its journal and refuses the same events
    /// again: the member is told of each refused event once.
    #[tokio::test]
    async fn a_refusal_is_told_once_per_event_even_when_replayed() {
        let (registry, mut slots) = registry(1, 10, 10);
        let (_handle, state) = joined(&registry, &mut slots, "full", 1);
        let refused = |seq, kind| contract::ipc::FromWorker::Refused {
            room: room("full"),
            conn: ConnId(1),
            seq,
            kind,
            reason: IgnoredReason::BoardFull,
        };
        let rooms = slots.rooms(0);
        for seq in [5, 6, 5, 6, 4] {
            rooms.worker_message(refused(seq, MessageKind::ShapeCreate));
        }
        assert_eq!(state.borrow().refused, 2);
        rooms.worker_message(refused(7, MessageKind::ShapeUpdate));
        assert_eq!(state.borrow().refused, 3);
        assert_eq!(
            state.borrow().last_refused,
            Some((MessageKind::ShapeUpdate, IgnoredReason::BoardFull))
        );
    }

    #[test]
    fn rooms_spread_over_workers_and_refuse_when_full() {
        let (registry, _slots) = registry(2, 2, 100);
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
        let (registry, _slots) = registry(2, 5, 3);
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
        let (registry, mut slots) = registry(1, 1, 100);
        let (handle, _) = joined(&registry, &mut slots, "a", 1);
        handle.forward(ConnId(1), "hi".into()).await.unwrap();
        handle.leave(ConnId(1));

        let frames = slots.frames(0);
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
        slots
            .rooms(0)
            .worker_message(contract::ipc::FromWorker::RoomClosed { room: room("a") });
        assert!(
            registry
                .register(&room("b"), ConnId(3), "u".into(), commands().0)
                .is_ok()
        );
    }

    /// A connection registered while the room's last member leaves keeps the
    /// room: the slot's task releases it only when no registration is on its
    /// way, so the new member's join reopens it on the same placement.
    #[tokio::test]
    async fn a_registration_on_its_way_keeps_the_room_placed() {
        let (registry, mut slots) = registry(1, 1, 100);
        let (first, _) = joined(&registry, &mut slots, "a", 1);
        first.leave(ConnId(1));
        slots.pump();
        // Registered, not yet seen by the slot's task, when the worker
        // confirms the close.
        let (tx, second_state) = commands();
        let second = registry
            .register(&room("a"), ConnId(2), "u".into(), tx)
            .unwrap();
        slots.0[0]
            .rooms
            .worker_message(contract::ipc::FromWorker::RoomClosed { room: room("a") });
        assert_eq!(registry.rooms_by_worker(), vec![vec![room("a")]]);
        slots.pump();
        second.join(ConnId(2), None, false, false);
        let frames = slots.frames(0);
        assert!(matches!(
            &frames[..],
            [.., ToWorker::OpenRoom { .. }, ToWorker::Event(_)]
        ));
        assert!(!second_state.has_changed(), "not closed");
        second.leave(ConnId(2));
        slots
            .rooms(0)
            .worker_message(contract::ipc::FromWorker::RoomClosed { room: room("a") });
        assert_eq!(registry.rooms_by_worker(), vec![Vec::<RoomId>::new()]);
    }

    #[test]
    fn new_rooms_avoid_a_worker_that_does_not_answer() {
        let (registry, _slots) = registry(2, 2, 100);
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

    /// The replaced connection's handle tests (they were on the handle, whose
    /// work is now the slot's task's).
    #[tokio::test]
    async fn a_silent_holder_of_the_user_is_replaced_in_one_step() {
        let (registry, mut slots) = registry(1, 1, 1);
        let (handle, old_rx) = joined(&registry, &mut slots, "a", 1);
        let (new_tx, _new_rx) = commands();
        registry
            .register(&room("a"), ConnId(2), "u".into(), new_tx)
            .unwrap();
        let Holder::Probed { conn, answer } = slots.ask(handle.probe_holder(ConnId(2))).await
        else {
            panic!("the first connection holds the user");
        };
        assert_eq!(conn, ConnId(1));
        assert_eq!(old_rx.borrow().probes, 1);
        drop(answer);
        handle.join(ConnId(2), Some(ConnId(1)), false, false);
        let frames = slots.frames(0);
        assert!(matches!(
            old_rx.borrow().membership,
            Membership::Closed(crate::close::CloseReason::Replaced)
        ));
        let events: Vec<contract::ipc::RoomEvent> = frames
            .into_iter()
            .filter_map(|f| match f {
                ToWorker::Event(s) => Some(s.event),
                _ => None,
            })
            .collect();
        use contract::ipc::RoomEvent;
        assert_eq!(
            events,
            [
                RoomEvent::Join {
                    conn: ConnId(1),
                    user_id: "u".into(),
                    v2: false,
                    deflate: false,
                },
                RoomEvent::Leave { conn: ConnId(1) },
                RoomEvent::Join {
                    conn: ConnId(2),
                    user_id: "u".into(),
                    v2: false,
                    deflate: false,
                },
            ]
        );
        // The replaced connection's own leave later changes nothing.
        handle.leave(ConnId(1));
        assert!(slots.frames(0).is_empty());
    }

    #[tokio::test]
    async fn newcomers_share_one_probe_and_a_replaced_connection_stays_closed() {
        let (registry, mut slots) = registry(1, 1, 1);
        // Its join is stamped but the worker has not admitted it yet.
        let (handle, old_rx) = joined(&registry, &mut slots, "a", 1);
        for conn in [2, 3] {
            registry
                .register(&room("a"), ConnId(conn), "u".into(), commands().0)
                .unwrap();
        }
        let (a, b) = slots
            .ask(async {
                tokio::join!(
                    handle.probe_holder(ConnId(2)),
                    handle.probe_holder(ConnId(3))
                )
            })
            .await;
        let (Holder::Probed { answer: mut a, .. }, Holder::Probed { answer: mut b, .. }) = (a, b)
        else {
            panic!("both find the first connection");
        };
        // One ping for both.
        assert_eq!(old_rx.borrow().probes, 1);
        handle.alive(ConnId(1));
        slots.pump();
        assert!(*a.wait_for(|alive| *alive).await.unwrap());
        assert!(*b.wait_for(|alive| *alive).await.unwrap());

        // Replaced before the worker's verdict: the late admission does not reopen it.
        handle.join(ConnId(2), Some(ConnId(1)), false, false);
        slots
            .rooms(0)
            .worker_message(contract::ipc::FromWorker::JoinAccepted {
                room: room("a"),
                conn: ConnId(1),
            });
        assert!(matches!(
            old_rx.borrow().membership,
            Membership::Closed(crate::close::CloseReason::Replaced)
        ));
    }
}
