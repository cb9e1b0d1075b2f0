//! The worker pool: spawns each worker process (this same executable, in worker
//! mode), checks its IPC handshake, carries frames both ways, and replaces the
//! process when it ends.
//!
//! Each worker slot has one queue that outlives its processes, so sessions keep a
//! valid sender across a respawn.
//!
//! Each slot has two tasks: its **slot task** (`slot_task`) owns the slot's
//! rooms and reads the worker's replies; its **lifecycle** task (`lifecycle`)
//! spawns the process, writes its frames, pings it, and replaces it when it
//! fails (the slot task then restores its rooms on the replacement). Neither
//! waits on the other's socket direction: a full socket one way never stops
//! the other. `link` holds the framing, the writer and the pings; `salvage`
//! replays rooms into fallback files.

mod lifecycle;
mod link;
mod program;
mod salvage;
mod slot_task;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;
use tracing::error;

use super::metrics::Metrics;
use super::rooms::{Registry, SlotInboxReceiver, SlotRooms};
use super::shutdown::Shutdown;
use crate::worker_queue::WorkerQueue;
use contract::config::PersistSettings;
use contract::ipc::{Fallback, RoomId, ToWorker, WorkerId};
use lifecycle::{StoreIdentity, WorkerExit, WorkerSpec, supervise};
pub use program::WorkerProgram;

/// A worker answers a drain this long before the supervisor stops waiting, so
/// the answer (and the unsaved rooms it names) arrives in time.
const DRAIN_ANSWER_MARGIN: Duration = Duration::from_millis(250);

/// One worker position in the pool: the place a worker process fills, kept
/// across its replacements (same id, same queue, a count of restarts). What
/// `/status`, `/readyz`, `/metrics` and the Agones health read of a worker.
pub struct WorkerSlot {
    /// The position's id (`w0`, `w1`…), which each of its processes takes.
    pub id: WorkerId,
    /// Frames for this worker (its rooms' are queued by the slot's task).
    queue: WorkerQueue,
    /// Pid of the running process, 0 while none runs.
    pid: AtomicU32,
    /// Processes started after the first one.
    restarts: AtomicU64,
    /// Where the answer to a `Drain` goes.
    drained: Mutex<Option<oneshot::Sender<DrainReport>>>,
    /// When the running process last answered a ping (or finished its handshake).
    last_pong: Mutex<Instant>,
    /// The running process has not answered pings for [`link::UNRESPONSIVE_AFTER`].
    unresponsive: AtomicBool,
    /// The slot's process failed and its rooms are not all restored yet.
    restoring: AtomicBool,
}

/// A worker's answer to a drain.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainReport {
    /// Saves that succeeded during the drain.
    pub saved: u32,
    /// Rooms still holding unsaved changes when the drain ended.
    pub unsaved: Vec<RoomId>,
    /// The worker's process ended during the stop: `unsaved` are the rooms
    /// it never confirmed as saved, and nothing wrote their shapes anywhere.
    pub lost: bool,
    /// Where the worker wrote the shapes of those rooms instead.
    pub fallback: Vec<Fallback>,
}

impl WorkerSlot {
    fn new(id: WorkerId, queue: WorkerQueue) -> WorkerSlot {
        WorkerSlot {
            id,
            queue,
            pid: AtomicU32::new(0),
            restarts: AtomicU64::new(0),
            drained: Mutex::new(None),
            last_pong: Mutex::new(Instant::now()),
            unresponsive: AtomicBool::new(false),
            restoring: AtomicBool::new(false),
        }
    }

    /// The running process's pid; `None` between a process's end and its
    /// replacement's start.
    pub fn pid(&self) -> Option<u32> {
        Some(self.pid.load(Ordering::Relaxed)).filter(|&p| p != 0)
    }

    /// Processes started after the slot's first, each replacing one that ended.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Frames queued for the worker and not yet written (`/metrics`).
    pub fn queue_depth(&self) -> usize {
        self.queue.depth()
    }

    /// The slot's process runs and answers pings (restoring rooms or not): what
    /// the Agones `Health()` pings stand for.
    #[cfg(feature = "agones")]
    pub fn answering(&self) -> bool {
        self.pid().is_some() && !self.unresponsive.load(Ordering::Relaxed)
    }

    /// The slot's process runs, answers pings and holds all its rooms (not
    /// being replaced or restoring them): what `/readyz` reports.
    pub fn ready(&self) -> bool {
        self.pid().is_some()
            && !self.unresponsive.load(Ordering::Relaxed)
            && !self.restoring.load(Ordering::Relaxed)
    }

    /// Hands `report` to the pending drain, if one waits.
    fn answer_drain(&self, report: DrainReport) {
        let answer = self
            .drained
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(answer) = answer {
            let _ = answer.send(report);
        }
    }
}

/// The worker processes, one per slot, each run by its own task for the
/// server's life. Started once by [`run`](crate::run) and held in
/// [`Shared`](crate::Shared): the HTTP endpoints and the Agones lifecycle
/// read its slots, and the stop drains it and waits for it. Sessions never
/// reach it: they send through their [`RoomHandle`](crate::rooms::RoomHandle)
/// to the slot's task.
/// The workers follow the server's [`Shutdown`]: from
/// `Phase::Draining` a worker that ends is not replaced; at `Phase::Stopped`
/// every worker's socket is closed, and those still running at the plan's
/// `exit_by` are killed.
pub struct WorkerPool {
    slots: Vec<Arc<WorkerSlot>>,
    tasks: TaskTracker,
    registry: Arc<Registry>,
    /// What a salvage process runs (the workers' program) and where it writes.
    program: WorkerProgram,
    data_dir: PathBuf,
    /// Quarantined rooms being replayed into fallback files.
    salvages: Arc<salvage::Salvages>,
}

/// A worker's start as the pool's start sees it: the store identity it answered,
/// or why it did not start.
fn started(
    index: usize,
    ready: Result<Result<StoreIdentity, WorkerExit>, oneshot::error::RecvError>,
) -> anyhow::Result<StoreIdentity> {
    match ready {
        Ok(Ok(identity)) => Ok(identity),
        Ok(Err(why)) => Err(anyhow!("worker w{index} failed to start: {why}")),
        Err(_) => Err(anyhow!("worker w{index} failed to start")),
    }
}

impl WorkerPool {
    /// Starts one slot per inbox of the registry's (see [`Registry::new`]):
    /// its task, which owns its rooms, and its worker process; waits until
    /// each worker has completed its handshake.
    pub(crate) async fn start(
        inboxes: Vec<SlotInboxReceiver>,
        mut settings: PersistSettings,
        program: WorkerProgram,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> anyhow::Result<WorkerPool> {
        let tasks = TaskTracker::new();
        let salvages = Arc::new(salvage::Salvages::default());
        let mut slots = Vec::with_capacity(inboxes.len());
        let mut ready = Vec::with_capacity(inboxes.len());
        for (i, inbox) in inboxes.into_iter().enumerate() {
            let id = WorkerId(i as u32);
            let (queue, frames) = crate::worker_queue::channel();
            let slot = Arc::new(WorkerSlot::new(id, queue.clone()));
            let (control, controlled) = mpsc::unbounded_channel();
            // For the server's life: sessions and the stop need it until the end.
            tokio::spawn(slot_task::run(
                SlotRooms::new(id, queue, registry.clone()),
                inbox,
                controlled,
                slot.clone(),
                registry.clone(),
                metrics.clone(),
            ));
            let (ready_tx, ready_rx) = oneshot::channel();
            tasks.spawn(supervise(
                slot.clone(),
                frames,
                control,
                WorkerSpec {
                    settings: settings.clone(),
                    program: program.clone(),
                    salvages: salvages.clone(),
                },
                registry.clone(),
                metrics.clone(),
                shutdown.clone(),
                ready_tx,
            ));
            slots.push(slot);
            if i == 0 {
                // The first worker opens the store (creating the embedded file):
                // its answer is the start-up check, and the others attach to the
                // file it names.
                settings.store_identity = started(0, ready_rx.await)?;
            } else {
                ready.push(ready_rx);
            }
        }
        tasks.close();
        for (i, ready) in ready.into_iter().enumerate() {
            started(i + 1, ready.await)?;
        }
        Ok(WorkerPool {
            slots,
            tasks,
            data_dir: settings.data_dir,
            registry,
            program,
            salvages,
        })
    }

    /// Every slot, in worker id order.
    pub fn slots(&self) -> &[Arc<WorkerSlot>] {
        &self.slots
    }

    /// Asks every worker to save its unsaved rooms and to answer by `deadline`;
    /// returns each worker's report (`None`: no answer in time).
    pub async fn drain(
        &self,
        deadline: tokio::time::Instant,
    ) -> Vec<(WorkerId, Option<DrainReport>)> {
        let grace = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .saturating_sub(DRAIN_ANSWER_MARGIN);
        // All at once: a worker whose queue is full must not eat the others' time.
        let drains = self.slots.iter().map(|slot| async move {
            let (tx, rx) = oneshot::channel();
            *slot.drained.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
            let drain = ToWorker::Drain {
                grace_ms: grace.as_millis() as u64,
            };
            let report = match slot.queue.send(drain) {
                true => tokio::time::timeout_at(deadline, rx)
                    .await
                    .ok()
                    .and_then(Result::ok),
                false => None,
            };
            (slot.id, report)
        });
        futures_util::future::join_all(drains).await
    }

    /// For a worker lost during the stop (its process ended, or it did not
    /// answer the drain): replays each of its rooms with changes it never
    /// confirmed as saved into a fallback file, from the supervisor's
    /// checkpoints and journals (all at once, each bounded by `deadline`), so
    /// nothing acknowledged is left only in memory. A room whose changes were
    /// only joins or cursor moves gets a file too (the supervisor does not read
    /// events): one too many rather than one too few.
    pub async fn salvage_unconfirmed(
        &self,
        worker: WorkerId,
        deadline: tokio::time::Instant,
    ) -> Vec<Fallback> {
        let rooms = self.registry.unconfirmed_salvage(worker).await;
        let salvages = rooms.into_iter().map(|room| async {
            let id = room.room.clone();
            let salvaged = salvage::salvage(&self.program, self.data_dir.clone(), room);
            let file = match tokio::time::timeout_at(deadline, salvaged).await {
                Ok(file) => file,
                Err(_) => Err("the stop's budget ran out before its replay finished".to_owned()),
            };
            match &file {
                Ok(file) => error!(worker = %worker, room = %id, %file, "shutdown: the room's worker was lost; its shapes, replayed from the supervisor's journal, are in the file"),
                Err(why) => error!(worker = %worker, room = %id, error = %why, "shutdown: the room's worker was lost and its shapes could not be written to a file"),
            }
            Fallback { room: id, file }
        });
        futures_util::future::join_all(salvages).await
    }

    /// Waits until `deadline` for the salvages of quarantined rooms under way;
    /// returns the rooms whose edits are in no file yet (still being replayed,
    /// or failed), for the stop's outcome.
    pub async fn settle_salvages(&self, deadline: tokio::time::Instant) -> Vec<RoomId> {
        self.salvages.settle(deadline).await
    }

    /// Waits until every worker process has ended: from `Phase::Stopped`, each
    /// socket is closed (a worker exits at once after a drain), and those still
    /// running at the plan's `exit_by` are killed.
    pub async fn stopped(&self) {
        self.tasks.wait().await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update under these locks is a few assignments: data stays
    // consistent even after a panic elsewhere.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
