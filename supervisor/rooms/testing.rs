//! Helpers for the registry's unit tests.

use tokio::sync::watch;

use crate::worker_queue::{self, WorkerFrames};

use super::{ConnState, ConnStateSender, Registry, RoomHandle};
use contract::ipc::{ConnId, RoomId, ToWorker};

pub fn room(name: &str) -> RoomId {
    RoomId(name.into())
}

/// A connection's state channel.
pub fn commands() -> (ConnStateSender, watch::Receiver<ConnState>) {
    watch::channel(ConnState::pending())
}

/// A registry of `workers` workers, with each worker's end of its queue.
pub fn registry(
    workers: usize,
    rooms_per_worker: usize,
    max_rooms: usize,
) -> (Registry, Vec<WorkerFrames>) {
    let (queues, frames) = (0..workers).map(|_| worker_queue::channel()).unzip();
    (Registry::new(queues, rooms_per_worker, max_rooms), frames)
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

/// `conn` (user "u") registered in the room `name` and its join stamped: the
/// room's handle and the connection's state.
pub async fn joined(
    registry: &Registry,
    name: &str,
    conn: u64,
) -> (RoomHandle, watch::Receiver<ConnState>) {
    let (tx, rx) = commands();
    let handle = registry
        .register(&room(name), ConnId(conn), "u".into(), tx)
        .unwrap();
    handle.join(ConnId(conn), None).await.unwrap();
    (handle, rx)
}
