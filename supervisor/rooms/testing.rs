//! Helpers for the rooms' unit tests: a registry whose slots' tasks are run
//! by hand ([`Slots::pump`]), so a test sees each step.

use std::future::Future;
use std::sync::Arc;

use crate::worker_queue::{self, WorkerFrames};

use super::handle::{ConnStateSender, RoomLink, SlotInbox, SlotInboxReceiver, Traffic};
use super::{ConnState, ConnStateReceiver, Registry, RoomHandle, SlotRooms};
use contract::ipc::{ConnId, RoomId, ToWorker, WorkerId};

pub fn room(name: &str) -> RoomId {
    RoomId(name.into())
}

/// A connection's state channel.
pub fn commands() -> (ConnStateSender, ConnStateReceiver) {
    ConnState::channel()
}

/// A placement of `name` outside any registry (for a room tested alone).
pub fn link(name: &str) -> Arc<RoomLink> {
    let (events, _) = tokio::sync::mpsc::unbounded_channel();
    Arc::new(RoomLink {
        id: room(name),
        worker: WorkerId(0),
        placement: 1,
        inbox: SlotInbox {
            events,
            budget: Default::default(),
        },
        traffic: Traffic::default(),
    })
}

/// One slot: its rooms, its inbox and the worker's end of its frame queue.
pub struct Slot {
    pub rooms: SlotRooms,
    inbox: SlotInboxReceiver,
    pub frames: WorkerFrames,
}

/// Every slot of a test registry.
pub struct Slots(pub Vec<Slot>);

impl Slots {
    /// Each slot's task handles what its inbox holds.
    pub fn pump(&mut self) {
        for slot in &mut self.0 {
            while let Ok(event) = slot.inbox.try_recv() {
                slot.rooms.event(event);
            }
        }
    }

    /// The frames queued for `worker` so far (after a pump).
    pub fn frames(&mut self, worker: usize) -> Vec<ToWorker> {
        self.pump();
        let mut frames = Vec::new();
        while let Ok(frame) = self.0[worker].frames.try_recv() {
            frames.push(frame);
        }
        frames
    }

    /// `worker`'s rooms.
    pub fn rooms(&mut self, worker: usize) -> &mut SlotRooms {
        self.pump();
        &mut self.0[worker].rooms
    }

    /// Runs `asked` (a handle's question) while the slots answer it.
    pub async fn ask<T>(&mut self, asked: impl Future<Output = T>) -> T {
        let answer = async {
            tokio::task::yield_now().await;
            self.pump();
        };
        tokio::join!(asked, answer).0
    }
}

/// A registry of `workers` slots.
pub fn registry(
    workers: usize,
    rooms_per_worker: usize,
    max_rooms: usize,
) -> (Arc<Registry>, Slots) {
    let (registry, inboxes) = Registry::new(workers, rooms_per_worker, max_rooms);
    let registry = Arc::new(registry);
    let slots = inboxes
        .into_iter()
        .enumerate()
        .map(|(i, inbox)| {
            let (queue, frames) = worker_queue::channel();
            Slot {
                rooms: SlotRooms::new(WorkerId(i as u32), queue, registry.clone()),
                inbox,
                frames,
            }
        })
        .collect();
    (registry, Slots(slots))
}

/// The sequence numbers of the events among `frames`.
pub fn events(frames: &[ToWorker]) -> Vec<u64> {
    frames
        .iter()
        .filter_map(|f| match f {
            ToWorker::Event(s) => Some(s.seq),
            _ => None,
        })
        .collect()
}

/// `conn` (user "u") registered in the room `name` and joined (v1): the
/// room's handle and the connection's state.
pub fn joined(
    registry: &Registry,
    slots: &mut Slots,
    name: &str,
    conn: u64,
) -> (RoomHandle, ConnStateReceiver) {
    let (tx, rx) = commands();
    let handle = registry
        .register(&room(name), ConnId(conn), "u".into(), tx)
        .unwrap();
    handle.join(ConnId(conn), None, false, false);
    slots.pump();
    (handle, rx)
}
