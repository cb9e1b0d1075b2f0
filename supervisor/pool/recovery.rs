//! Recovery after a worker fails: its rooms are restored on the replacement
//! (checkpoint and journal, through the slot's queue like every other frame),
//! and a crash during restores is blamed on the rooms whose frames the worker
//! had started taking, so a room that keeps killing workers is found and closed.

use crate::worker_queue::WorkerFrames;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::lifecycle::WorkerSpec;
use super::{WorkerSlot, lock};
use crate::rooms::{POISON_CRASHES, POISON_WINDOW, Registry, RoomEntry};
use contract::ipc::{RoomId, ToWorker};

/// Beyond the load wait, how long a restoring room may take to answer.
pub(super) const RESTORE_ANSWER_MARGIN: Duration = Duration::from_secs(2);

/// A room's restore, from its first frame to the worker's `Synced`.
pub(super) struct InFlight {
    /// The token of the restore's `Sync`.
    pub(super) token: u64,
    /// The writer has taken the room's `RestoreRoom` for the socket: from now
    /// on the worker may be applying the room's frames.
    pub(super) taken: bool,
    /// Told when the worker answers the `Sync`.
    pub(super) answered: Option<oneshot::Sender<()>>,
}

/// What a slot carries from a failed process to its replacement.
#[derive(Default)]
pub(super) struct Recovery {
    /// Rooms to restore on the next process.
    restore: Vec<Arc<RoomEntry>>,
    /// Frames to send the next process first.
    carry: Vec<ToWorker>,
    /// Rooms blamed for a crash of this slot's workers, and when: restored one
    /// at a time, after the others, so a poison room is told from its neighbours.
    suspects: HashMap<RoomId, Instant>,
}

impl Recovery {
    /// After the slot's process failed: blames the crash on `blamed` (rooms
    /// it was restoring when it crashed by its own doing), marks `suspected`
    /// to be restored one at a time, takes the failed worker's rooms from the
    /// registry to restore, and keeps the frames queued for it that the
    /// replacement still needs.
    /// A room closed as poison is salvaged by `worker`'s program into a
    /// fallback file.
    pub(super) fn worker_failed(
        &mut self,
        blamed: &[RoomId],
        suspected: &[RoomId],
        frames: &mut WorkerFrames,
        registry: &Registry,
        slot: &WorkerSlot,
        worker: &WorkerSpec,
    ) {
        let now = Instant::now();
        self.suspects
            .retain(|_, at| now.duration_since(*at) < POISON_WINDOW);
        // Restored one at a time next, though not blamed.
        for room in suspected {
            self.suspects.insert(room.clone(), now);
        }
        for room in blamed {
            self.suspects.insert(room.clone(), now);
            match registry.blame(room) {
                Some(quarantined) => {
                    error!(worker = %slot.id, %room, "room closed for its members (1011): it crashed {POISON_CRASHES} workers within {POISON_WINDOW:?}; replaying its edits into a fallback file");
                    worker.salvages.spawn(
                        worker.program.clone(),
                        worker.settings.data_dir.clone(),
                        quarantined,
                    );
                }
                None => {
                    warn!(worker = %slot.id, %room, "worker crash attributed to a room it was restoring")
                }
            }
        }
        self.restore = registry.worker_failed(slot.id);
        slot.restoring.store(true, Ordering::Relaxed);
        let restoring: HashSet<&RoomId> = self.restore.iter().map(|e| &e.id).collect();
        // Frames queued for the dead process: those of its rooms are in their
        // journals and will be replayed; keep those of rooms placed since, and
        // drop those of rooms no longer placed here (closed as unrestorable).
        while let Ok(frame) = frames.try_recv() {
            self.carry.push(frame);
        }
        self.carry.retain(|f| {
            room_of(f).is_none_or(|r| !restoring.contains(r) && registry.placed_on(r, slot.id))
        });
    }

    /// The rooms waiting to be restored.
    pub(super) fn rooms(&self) -> Vec<&str> {
        self.restore.iter().map(|e| e.id.0.as_str()).collect()
    }

    /// For the next process: the frames to send it first and the rooms to
    /// restore into it.
    pub(super) fn take_next(&mut self) -> (Vec<ToWorker>, Vec<Arc<RoomEntry>>) {
        (
            std::mem::take(&mut self.carry),
            std::mem::take(&mut self.restore),
        )
    }

    pub(super) fn suspects(&self) -> &HashMap<RoomId, Instant> {
        &self.suspects
    }
}

impl WorkerSlot {
    /// Rooms whose restore frames the ended process had started taking and
    /// not answered yet; forgets every restore under way.
    pub(super) fn take_in_flight(&self) -> Vec<RoomId> {
        let mut rooms: Vec<RoomId> = lock(&self.restores)
            .drain()
            .filter(|(_, r)| r.taken)
            .map(|(room, _)| room)
            .collect();
        rooms.sort();
        rooms
    }
}

/// The room a frame is for, if any.
fn room_of(frame: &ToWorker) -> Option<&RoomId> {
    match frame {
        ToWorker::OpenRoom { room, .. }
        | ToWorker::CloseRoom { room }
        | ToWorker::RestoreRoom { room, .. }
        | ToWorker::Sync { room, .. }
        | ToWorker::CheckpointRequest { room } => Some(room),
        ToWorker::Event(stamped) => Some(&stamped.room),
        ToWorker::Hello { .. } | ToWorker::Configure(_) | ToWorker::Drain { .. } => None,
    }
}

/// Restores the rooms a failed worker held: those never blamed for a crash all
/// at once (a room waiting for its store delays no other), then the suspects
/// one at a time, so a room that keeps killing workers is the only one in
/// flight when it does.
pub(super) async fn restore_rooms(
    rooms: Vec<Arc<RoomEntry>>,
    suspects: &HashMap<RoomId, Instant>,
    registry: &Registry,
    slot: &WorkerSlot,
    wait: Duration,
) {
    if rooms.is_empty() {
        return;
    }
    let started = Instant::now();
    let count = rooms.len();
    let (suspect, fresh): (Vec<_>, Vec<_>) = rooms
        .into_iter()
        .partition(|entry| suspects.contains_key(&entry.id));
    futures_util::future::join_all(
        fresh
            .iter()
            .map(|entry| restore_room(entry, registry, slot, wait)),
    )
    .await;
    for entry in &suspect {
        restore_room(entry, registry, slot, wait).await;
    }
    info!(worker = %slot.id, rooms = count, suspects = suspect.len(), ms = started.elapsed().as_millis() as u64, "rooms restored");
}

/// Queues a room's checkpoint and journal for the worker, waits (without
/// holding anything up) until it has applied them, then queues what arrived
/// meanwhile and lets events flow directly again. Returns early if the slot's
/// queue is gone (the server is stopping).
pub(super) async fn restore_room(
    entry: &RoomEntry,
    registry: &Registry,
    slot: &WorkerSlot,
    wait: Duration,
) {
    let Some(frames) = registry.restore_frames(entry) else {
        return; // closed meanwhile
    };
    let room = &entry.id;
    let token = rand::random::<u64>();
    let (answered, answer) = oneshot::channel();
    lock(&slot.restores).insert(
        room.clone(),
        InFlight {
            token,
            taken: false,
            answered: Some(answered),
        },
    );
    let sync = ToWorker::Sync {
        room: room.clone(),
        token,
    };
    for frame in frames.into_iter().chain([sync]) {
        if slot.queue.send_charged(frame).await.is_err() {
            return;
        }
    }
    // A room restored from the store (no checkpoint yet) answers after its load.
    if tokio::time::timeout(wait, answer).await.is_err() {
        warn!(%room, "no answer while restoring (its load may be slow); going on");
    }
    lock(&slot.restores).remove(room);
    loop {
        // The final step may close the room: its permit is taken first, so the
        // close is queued under the room's lock, before any later frame.
        let Ok(permit) = slot.queue.reserve().await else {
            return;
        };
        let (frames, done) = registry.finish_restore(entry, permit);
        for frame in frames {
            if slot.queue.send_charged(frame).await.is_err() {
                return;
            }
        }
        if done {
            return;
        }
    }
}
