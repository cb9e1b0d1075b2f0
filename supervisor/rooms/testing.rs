//! Helpers for the registry's unit tests.

use tokio::sync::{mpsc, watch};

use super::{ConnState, ConnStateSender, Registry};
use contract::ipc::{RoomId, ToWorker};

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
) -> (Registry, Vec<mpsc::Receiver<ToWorker>>) {
    let (queues, frames) = (0..workers).map(|_| mpsc::channel(64)).unzip();
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
