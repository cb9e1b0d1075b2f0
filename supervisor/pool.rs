//! The worker pool: spawns each worker process (this same executable, in worker
//! mode), checks its IPC handshake, carries frames both ways, and replaces the
//! process when it ends.
//!
//! Each worker slot has one queue that outlives its processes, so sessions keep a
//! valid sender across a respawn.
//!
//! Nothing here waits on its own writes: while a worker is served, its socket is
//! read, written, pinged and its inherited rooms restored by separate branches of
//! one `select!`, so a full socket in one direction never stops the other
//! (restores go through the slot's queue like every other frame).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use interprocess::local_socket::tokio::Stream as LocalStream;
use interprocess::local_socket::traits::tokio::Listener as _;
use interprocess::local_socket::{GenericNamespaced, ListenerOptions, ToNsName};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::metrics::{Kind, Metrics, Outcome, Reason};
use super::registry::{POISON_CRASHES, POISON_WINDOW, Registry, RoomEntry};
use crate::config::{PersistSettings, WORKER_NONCE_ENV};
use crate::ipc::{FromWorker, IPC_VERSION, IpcCodec, RoomId, ToWorker, WorkerId};
use crate::ipc_socket::{self, IpcReader, IpcWriter};

/// Frames queued per worker before senders wait. Large enough to absorb bursts
/// from many rooms; when full, each session waits (backpressure on its client).
const WORKER_QUEUE: usize = 8192;
/// Frames written per batch before flushing the socket.
const WRITE_BATCH: usize = 512;
/// A worker must connect and answer the hello within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Respawn delays: the first replacement starts at once (clients are waiting);
/// after a further quick failure the delay starts here and doubles, so a crash
/// loop is throttled.
const MIN_RESPAWN_DELAY: Duration = Duration::from_millis(50);
const MAX_RESPAWN_DELAY: Duration = Duration::from_secs(5);
/// A worker answers a drain this long before the supervisor stops waiting, so
/// the answer (and the unsaved rooms it names) arrives in time.
const DRAIN_ANSWER_MARGIN: Duration = Duration::from_millis(250);
/// Beyond the load wait, how long a restoring room may take to answer.
const RESTORE_ANSWER_MARGIN: Duration = Duration::from_secs(2);
/// A worker that ran this long before failing was not crash-looping: the next
/// replacement starts at once again.
const STABLE_RUN: Duration = Duration::from_secs(5);
/// How often each worker is pinged: often enough that a stuck one is noticed
/// within seconds, rarely enough to cost nothing.
const PING_EVERY: Duration = Duration::from_secs(1);
/// A worker silent this long is reported unresponsive (`/readyz` 503): two
/// missed pings, not a single late one.
const UNRESPONSIVE_AFTER: Duration = Duration::from_secs(2);
/// A worker silent this long is stuck (stopped, or looping): it is killed and
/// replaced. A healthy worker answers between batches (256 frames and one
/// snapshot per changed room: milliseconds), so this is never a slow batch.
const DEAD_AFTER: Duration = Duration::from_secs(5);
/// Pings waiting to be written. One is enough: a second would say the same;
/// when it is full the new ping is skipped (the silence is timed regardless).
const PING_QUEUE: usize = 1;
/// A ping is a `Sync` for this room, answered by the worker at once with a
/// `Synced`: no room has an empty id (tokens with an empty `roomId` are
/// refused), and reusing that round trip needs no new IPC frame.
const PING_ROOM: &str = "";

type Reader = FramedRead<IpcReader, IpcCodec<FromWorker, ToWorker>>;
type Writer = FramedWrite<IpcWriter, IpcCodec<FromWorker, ToWorker>>;

/// One worker position in the pool.
pub struct WorkerSlot {
    pub id: WorkerId,
    /// Frames for this worker's rooms.
    pub queue: mpsc::Sender<ToWorker>,
    /// Pid of the running process, 0 while none runs.
    pid: AtomicU32,
    /// Processes started after the first one.
    restarts: AtomicU64,
    /// Where the answer to a `Drain` goes.
    drained: Mutex<Option<oneshot::Sender<DrainReport>>>,
    /// When the running process last answered a ping (or finished its handshake).
    last_pong: Mutex<Instant>,
    /// The running process has not answered pings for [`UNRESPONSIVE_AFTER`].
    unresponsive: AtomicBool,
    /// The slot's process failed and its rooms are not all restored yet.
    restoring: AtomicBool,
    /// Restores under way on the running process, by room: a crash is blamed on
    /// those whose frames had started going to it.
    restores: Mutex<HashMap<RoomId, InFlight>>,
}

/// A room's restore, from its first frame to the worker's `Synced`.
struct InFlight {
    /// The token of the restore's `Sync`.
    token: u64,
    /// The writer has taken the room's `RestoreRoom` for the socket: from now
    /// on the worker may be applying the room's frames.
    taken: bool,
    /// Told when the worker answers the `Sync`.
    answered: Option<oneshot::Sender<()>>,
}

/// A worker's answer to a drain.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainReport {
    /// Saves that succeeded during the drain.
    pub saved: u32,
    /// Rooms still holding unsaved changes when the drain ended.
    pub unsaved: Vec<RoomId>,
}

impl WorkerSlot {
    fn new(id: WorkerId, queue: mpsc::Sender<ToWorker>) -> WorkerSlot {
        WorkerSlot {
            id,
            queue,
            pid: AtomicU32::new(0),
            restarts: AtomicU64::new(0),
            drained: Mutex::new(None),
            last_pong: Mutex::new(Instant::now()),
            unresponsive: AtomicBool::new(false),
            restoring: AtomicBool::new(false),
            restores: Mutex::new(HashMap::new()),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        Some(self.pid.load(Ordering::Relaxed)).filter(|&p| p != 0)
    }

    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// The slot's process runs and answers pings (restoring rooms or not): what
    /// the Agones `Health()` pings stand for.
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

    /// Rooms whose restore frames the ended process had started taking and
    /// not answered yet; forgets every restore under way.
    fn take_in_flight(&self) -> Vec<RoomId> {
        let mut rooms: Vec<RoomId> = lock(&self.restores)
            .drain()
            .filter(|(_, r)| r.taken)
            .map(|(room, _)| room)
            .collect();
        rooms.sort();
        rooms
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

pub struct WorkerPool {
    slots: Vec<Arc<WorkerSlot>>,
    tasks: TaskTracker,
    /// Set by [`WorkerPool::stop`]: close every worker's socket; kill the
    /// workers still running at this instant.
    exit_by: watch::Sender<Option<tokio::time::Instant>>,
}

impl WorkerPool {
    /// Starts `count` workers and waits until each has completed its handshake.
    /// Once `stopping` is cancelled (the server is shutting down), a worker that
    /// ends is not replaced.
    pub async fn start(
        count: usize,
        settings: PersistSettings,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        stopping: CancellationToken,
    ) -> anyhow::Result<WorkerPool> {
        let tasks = TaskTracker::new();
        let (exit_by, _) = watch::channel(None);
        let mut slots = Vec::with_capacity(count);
        let mut ready = Vec::with_capacity(count);
        for i in 0..count {
            let (queue, frames) = mpsc::channel(WORKER_QUEUE);
            let slot = Arc::new(WorkerSlot::new(WorkerId(i as u32), queue));
            let (ready_tx, ready_rx) = oneshot::channel();
            tasks.spawn(supervise(
                slot.clone(),
                frames,
                settings.clone(),
                registry.clone(),
                metrics.clone(),
                Stopping {
                    server: stopping.clone(),
                    exit_by: exit_by.subscribe(),
                },
                ready_tx,
            ));
            slots.push(slot);
            ready.push(ready_rx);
        }
        tasks.close();
        for (i, ready) in ready.into_iter().enumerate() {
            match ready.await {
                Ok(Ok(())) => {}
                Ok(Err(why)) => return Err(anyhow!("worker w{i} failed to start: {why}")),
                Err(_) => return Err(anyhow!("worker w{i} failed to start")),
            }
        }
        Ok(WorkerPool {
            slots,
            tasks,
            exit_by,
        })
    }

    pub fn slot(&self, id: WorkerId) -> &WorkerSlot {
        &self.slots[id.0 as usize]
    }

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
            let sent = tokio::time::timeout_at(deadline, slot.queue.send(drain)).await;
            let report = match sent {
                Ok(Ok(())) => tokio::time::timeout_at(deadline, rx)
                    .await
                    .ok()
                    .and_then(Result::ok),
                _ => None,
            };
            (slot.id, report)
        });
        futures_util::future::join_all(drains).await
    }

    /// Closes every worker's socket (they exit at once after a drain) and waits
    /// until every process has ended; those still running at `deadline` are
    /// killed.
    pub async fn stop(&self, deadline: tokio::time::Instant) {
        self.exit_by.send_replace(Some(deadline));
        self.tasks.wait().await;
    }
}

/// How a worker process ended.
struct Ended {
    how: String,
    /// Rooms being restored into it when it ended (their frames had started
    /// going to it, and it had not answered their `Sync`): the crash is
    /// attributed to them.
    restoring: Vec<RoomId>,
}

impl Ended {
    fn plain(how: String) -> Ended {
        Ended {
            how,
            restoring: Vec::new(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update under these locks is a few assignments: data stays
    // consistent even after a panic elsewhere.
    m.lock().unwrap_or_else(|e| e.into_inner())
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

/// The two steps of a shutdown, as a worker slot sees them.
struct Stopping {
    /// The server is shutting down: a worker that ends is not replaced.
    server: CancellationToken,
    /// Then: close the socket, and kill the process if it still runs at this
    /// instant.
    exit_by: watch::Receiver<Option<tokio::time::Instant>>,
}

/// Runs one slot: start a worker, serve it until it ends, then start a
/// replacement and restore the rooms the failed one held.
async fn supervise(
    slot: Arc<WorkerSlot>,
    mut frames: mpsc::Receiver<ToWorker>,
    settings: PersistSettings,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    mut stopping: Stopping,
    ready: oneshot::Sender<Result<(), String>>,
) {
    let mut ready = Some(ready);
    let mut delay = Duration::ZERO;
    // Rooms to restore on the next process, and frames to send it first.
    let mut restore: Vec<Arc<RoomEntry>> = Vec::new();
    let mut carry: Vec<ToWorker> = Vec::new();
    // Rooms blamed for a crash of this slot's workers, and when: restored one
    // at a time, after the others, so a poison room is told from its neighbours.
    let mut suspects: HashMap<RoomId, Instant> = HashMap::new();
    loop {
        let started = Instant::now();
        // Serving ends by itself at the shutdown deadline; this bounds a worker
        // still starting or restoring rooms then (dropping it kills the process).
        let mut deadline = stopping.exit_by.clone();
        let mut serve = Serve {
            slot: &slot,
            frames: &mut frames,
            settings: &settings,
            registry: &registry,
            metrics: &metrics,
            exit_by: &mut stopping.exit_by,
            ready: &mut ready,
            restore: &mut restore,
            suspects: &suspects,
            carry: &mut carry,
        };
        let ended = tokio::select! {
            biased;
            ended = serve.run() => ended,
            _ = async {
                let at = exit_requested(&mut deadline).await;
                tokio::time::sleep_until(at).await;
            } => Ended::plain("still starting at the shutdown deadline; killed".to_owned()),
        };
        slot.pid.store(0, Ordering::Relaxed);
        if stopping.exit_by.borrow().is_some() {
            info!(worker = %slot.id, "{}", ended.how);
            return;
        }
        if stopping.server.is_cancelled() {
            // A replacement would only be killed again; rooms are not restored.
            let unsaved = registry.unconfirmed_rooms(slot.id);
            error!(worker = %slot.id, ?unsaved, "worker ended during shutdown ({}); not replaced; changes since these rooms' last save may be lost", ended.how);
            slot.answer_drain(DrainReport { saved: 0, unsaved });
            return;
        }
        if let Some(ready) = ready.take() {
            let _ = ready.send(Err(ended.how));
            return;
        }
        let now = Instant::now();
        suspects.retain(|_, at| now.duration_since(*at) < POISON_WINDOW);
        for room in &ended.restoring {
            suspects.insert(room.clone(), now);
            if registry.blame(room) {
                error!(worker = %slot.id, %room, "room closed for its members (1011): it crashed {POISON_CRASHES} workers within {POISON_WINDOW:?}");
            } else {
                warn!(worker = %slot.id, %room, "worker crash attributed to a room it was restoring");
            }
        }
        restore = registry.worker_failed(slot.id);
        slot.restoring.store(true, Ordering::Relaxed);
        let restoring: HashSet<&RoomId> = restore.iter().map(|e| &e.id).collect();
        // Frames queued for the dead process: those of its rooms are in their
        // journals and will be replayed; keep those of rooms placed since, and
        // drop those of rooms no longer placed here (closed as unrestorable).
        while let Ok(frame) = frames.try_recv() {
            carry.push(frame);
        }
        carry.retain(|f| {
            room_of(f).is_none_or(|r| !restoring.contains(r) && registry.placed_on(r, slot.id))
        });
        let rooms: Vec<&str> = restore.iter().map(|e| e.id.0.as_str()).collect();
        error!(worker = %slot.id, rooms = ?rooms, "worker failed ({}); restoring its rooms on a replacement", ended.how);
        if started.elapsed() > STABLE_RUN {
            delay = Duration::ZERO;
        }
        tokio::select! {
            biased;
            _ = stopping.server.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).clamp(MIN_RESPAWN_DELAY, MAX_RESPAWN_DELAY);
        slot.restarts.fetch_add(1, Ordering::Relaxed);
        metrics
            .worker_restarts
            .get_or_create(&super::metrics::Worker {
                worker: slot.id.to_string(),
            })
            .inc();
    }
}

/// One worker process's life, with what it needs from its slot.
struct Serve<'a> {
    slot: &'a WorkerSlot,
    frames: &'a mut mpsc::Receiver<ToWorker>,
    settings: &'a PersistSettings,
    registry: &'a Registry,
    metrics: &'a Metrics,
    exit_by: &'a mut watch::Receiver<Option<tokio::time::Instant>>,
    ready: &'a mut Option<oneshot::Sender<Result<(), String>>>,
    restore: &'a mut Vec<Arc<RoomEntry>>,
    suspects: &'a HashMap<RoomId, Instant>,
    carry: &'a mut Vec<ToWorker>,
}

/// Waits until the pool is told to stop; returns when its workers must be gone.
async fn exit_requested(
    exit_by: &mut watch::Receiver<Option<tokio::time::Instant>>,
) -> tokio::time::Instant {
    match exit_by.wait_for(Option::is_some).await {
        Ok(deadline) => deadline.expect("waited for a deadline"),
        // The pool itself is gone: nothing waits for these workers any more.
        Err(_) => tokio::time::Instant::now(),
    }
}

/// Path of the running executable. `/proc/self/exe` names the image this process
/// runs even if the file was replaced since (a new build), so workers are always
/// the same build as their supervisor.
fn own_executable() -> std::io::Result<std::path::PathBuf> {
    let proc_exe = std::path::Path::new("/proc/self/exe");
    if proc_exe.exists() {
        Ok(proc_exe.to_path_buf())
    } else {
        std::env::current_exe()
    }
}

impl Serve<'_> {
    /// Starts one worker process, restores the rooms it inherits, and serves it
    /// until it ends; returns how it ended.
    async fn run(&mut self) -> Ended {
        let slot = self.slot;
        let (mut child, stream, nonce) = match spawn_and_connect(slot.id).await {
            Ok(started) => started,
            Err(e) => return Ended::plain(format!("{e:#}")),
        };
        let pid = child.id().unwrap_or(0);
        let (read_half, write_half) = match ipc_socket::split(stream) {
            Ok(halves) => halves,
            Err(e) => {
                let _ = child.start_kill();
                return Ended::plain(format!("cannot set up the worker's socket: {e}"));
            }
        };
        let mut reader: Reader = FramedRead::new(read_half, IpcCodec::new());
        let mut writer: Writer = FramedWrite::new(write_half, IpcCodec::new());

        let handshake = async {
            handshake(slot.id, &mut reader, &mut writer, nonce).await?;
            writer
                .send(ToWorker::Configure(self.settings.clone()))
                .await
                .context("sending settings")
        };
        if let Err(e) = handshake.await {
            let _ = child.start_kill();
            let status = child.wait().await;
            return Ended::plain(format!(
                "handshake with pid {pid} failed: {e:#} (process {status:?})"
            ));
        }
        *lock(&slot.last_pong) = Instant::now();
        slot.unresponsive.store(false, Ordering::Relaxed);
        self.registry.set_unresponsive(slot.id, false);
        lock(&slot.restores).clear();
        slot.pid.store(pid, Ordering::Relaxed);
        info!(worker = %slot.id, pid, "worker ready");
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(Ok(()));
        }

        let (pinger, mut pings) = mpsc::channel(PING_QUEUE);
        let carry = std::mem::take(self.carry);
        let rooms = std::mem::take(self.restore);
        let wait = Duration::from_millis(self.settings.load_wait_ms) + RESTORE_ANSWER_MARGIN;
        let (registry, metrics, suspects) = (self.registry, self.metrics, self.suspects);
        // Runs alongside reading and writing, never in their way; once done it
        // only waits for the others to end.
        let restores = async {
            restore_rooms(rooms, suspects, registry, slot, wait).await;
            slot.restoring.store(false, Ordering::Relaxed);
            std::future::pending::<()>().await
        };
        let ended = tokio::select! {
            why = write_frames(carry, self.frames, &mut pings, &mut writer, slot) => why,
            why = read_frames(&mut reader, registry, metrics, slot) => why,
            why = watchdog(slot, self.registry, pinger) => why,
            () = restores => unreachable!("restoring ends by waiting forever"),
            _ = child.wait() => "process exited".to_owned(),
            deadline = exit_requested(self.exit_by) => {
                // Closing the socket tells the worker to exit.
                drop(writer);
                drop(reader);
                match tokio::time::timeout_at(deadline, child.wait()).await {
                    Ok(status) => return Ended::plain(format!("pid {pid} stopped: {}", describe(status))),
                    Err(_) => {
                        warn!(worker = %slot.id, pid, "worker did not exit in time; killing it");
                        "killed after shutdown timeout".to_owned()
                    }
                }
            }
        };
        let restoring = slot.take_in_flight();
        // Whatever ended first, make sure the process is gone and reaped.
        let _ = child.start_kill();
        let status = child.wait().await;
        Ended {
            how: format!("{ended}; pid {pid} exit status: {}", describe(status)),
            restoring,
        }
    }
}

/// Restores the rooms a failed worker held: those never blamed for a crash all
/// at once (a room waiting for its store delays no other), then the suspects
/// one at a time, so a room that keeps killing workers is the only one in
/// flight when it does.
async fn restore_rooms(
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
async fn restore_room(entry: &RoomEntry, registry: &Registry, slot: &WorkerSlot, wait: Duration) {
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
        if slot.queue.send(frame).await.is_err() {
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
            if slot.queue.send(frame).await.is_err() {
                return;
            }
        }
        if done {
            return;
        }
    }
}

/// Pings the worker every [`PING_EVERY`]; returns once it has been silent for
/// [`DEAD_AFTER`], which ends (kills) it.
async fn watchdog(
    slot: &WorkerSlot,
    registry: &Registry,
    pinger: mpsc::Sender<ToWorker>,
) -> String {
    let mut tick = tokio::time::interval(PING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let silent = lock(&slot.last_pong).elapsed();
        if silent >= DEAD_AFTER {
            error!(worker = %slot.id, silent_ms = silent.as_millis() as u64, "worker stopped answering; killing it");
            return format!("no answer to pings for {} ms", silent.as_millis());
        }
        if silent >= UNRESPONSIVE_AFTER && !slot.unresponsive.swap(true, Ordering::Relaxed) {
            registry.set_unresponsive(slot.id, true);
            warn!(worker = %slot.id, silent_ms = silent.as_millis() as u64, "worker not answering pings; new rooms go to other workers");
        }
        let ping = ToWorker::Sync {
            room: RoomId(PING_ROOM.to_owned()),
            token: 0,
        };
        // Full: a ping is already waiting to be written; the silence counts on.
        let _ = pinger.try_send(ping);
    }
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("status unknown: {e}"),
    }
}

async fn spawn_and_connect(id: WorkerId) -> anyhow::Result<(Child, LocalStream, u64)> {
    let name = format!(
        "session-server.{}.{}.{:016x}.sock",
        std::process::id(),
        id.0,
        rand::random::<u64>()
    );
    let listener = ListenerOptions::new()
        .name(name.as_str().to_ns_name::<GenericNamespaced>()?)
        .create_tokio()
        .with_context(|| format!("creating IPC socket {name}"))?;
    let nonce = rand::random::<u64>();
    // argv[0] is the executable's real path, so `ps` shows what runs.
    let shown_name = std::env::current_exe().unwrap_or_else(|_| "session-server".into());
    let mut child = Command::new(own_executable()?)
        .arg0(shown_name)
        .arg("worker")
        .arg("--ipc")
        .arg(&name)
        .arg("--worker-id")
        .arg(id.0.to_string())
        .env(WORKER_NONCE_ENV, nonce.to_string())
        .kill_on_drop(true)
        .spawn()
        .context("spawning worker process")?;
    let stream = tokio::select! {
        accepted = listener.accept() => accepted.context("accepting worker connection")?,
        status = child.wait() => anyhow::bail!("worker exited before connecting: {}", describe(status)),
        _ = tokio::time::sleep(HANDSHAKE_TIMEOUT) => anyhow::bail!("worker did not connect within {HANDSHAKE_TIMEOUT:?}"),
    };
    Ok((child, stream, nonce))
}

/// Exchanges hellos: same IPC version, and the peer is the process we spawned.
async fn handshake(
    id: WorkerId,
    reader: &mut Reader,
    writer: &mut Writer,
    nonce: u64,
) -> anyhow::Result<()> {
    writer
        .send(ToWorker::Hello {
            ipc_version: IPC_VERSION,
            worker_id: id,
        })
        .await?;
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next())
        .await
        .context("no hello from worker")?;
    match hello {
        Some(Ok(FromWorker::Hello {
            ipc_version,
            nonce: theirs,
            ..
        })) => {
            anyhow::ensure!(
                ipc_version == IPC_VERSION,
                "worker speaks IPC version {ipc_version}, supervisor speaks {IPC_VERSION}"
            );
            anyhow::ensure!(
                theirs == nonce,
                "peer is not the spawned worker (wrong nonce)"
            );
            Ok(())
        }
        Some(Ok(other)) => anyhow::bail!("expected hello, got {other:?}"),
        Some(Err(e)) => Err(e.into()),
        None => anyhow::bail!("worker closed the socket during the handshake"),
    }
}

/// Moves queued frames to the worker, batching whatever is queued into one
/// write: first the frames carried over from its failed predecessor, then pings
/// ahead of the queue. Marks each restore whose first frame it takes.
async fn write_frames(
    carry: Vec<ToWorker>,
    frames: &mut mpsc::Receiver<ToWorker>,
    pings: &mut mpsc::Receiver<ToWorker>,
    writer: &mut Writer,
    slot: &WorkerSlot,
) -> String {
    let mut carry = Some(carry);
    loop {
        let batch = match carry.take() {
            Some(carry) => carry,
            None => {
                let first = tokio::select! {
                    biased;
                    Some(ping) = pings.recv() => ping,
                    frame = frames.recv() => match frame {
                        Some(frame) => frame,
                        None => return "frame queue closed".to_owned(),
                    },
                };
                let mut batch = vec![first];
                while batch.len() < WRITE_BATCH {
                    let Ok(frame) = frames.try_recv() else { break };
                    batch.push(frame);
                }
                batch
            }
        };
        for frame in batch {
            if let ToWorker::RestoreRoom { room, .. } = &frame
                && let Some(restore) = lock(&slot.restores).get_mut(room)
            {
                restore.taken = true;
            }
            if let Err(e) = writer.feed(frame).await {
                return format!("IPC write failed: {e}");
            }
        }
        if let Err(e) = writer.flush().await {
            return format!("IPC write failed: {e}");
        }
    }
}

/// Routes the worker's replies until the socket ends.
async fn read_frames(
    reader: &mut Reader,
    registry: &Registry,
    metrics: &Metrics,
    slot: &WorkerSlot,
) -> String {
    while let Some(frame) = reader.next().await {
        match frame {
            Ok(msg) => dispatch(msg, registry, metrics, slot),
            Err(e) => return format!("IPC read failed: {e}"),
        }
    }
    "IPC socket closed by worker".to_owned()
}

/// Routes one reply of the worker to the rooms' connections and state.
fn dispatch(msg: FromWorker, registry: &Registry, metrics: &Metrics, slot: &WorkerSlot) {
    let worker = slot.id;
    match msg {
        FromWorker::Snapshot { room, json, ops } => {
            registry.publish(&room, Bytes::from(json), ops.map(Bytes::from))
        }
        FromWorker::JoinAccepted { room, conn } => registry.admit(&room, conn),
        FromWorker::JoinRejected { room, conn, reason } => registry.reject(&room, conn, reason),
        FromWorker::RoomClosed { room } | FromWorker::CloseCancelled { room } => {
            registry.close_resolved(&room, worker)
        }
        FromWorker::Saved { room, seq } => {
            tracing::debug!(%worker, %room, seq, "room saved");
            registry.saved(&room, worker, seq);
        }
        FromWorker::Checkpoint { room, seq, image } => {
            registry.checkpoint(&room, worker, seq, image)
        }
        FromWorker::Drained { saved, unsaved } => slot.answer_drain(DrainReport { saved, unsaved }),
        FromWorker::Synced { room, .. } if room.0 == PING_ROOM => {
            *lock(&slot.last_pong) = Instant::now();
            if slot.unresponsive.swap(false, Ordering::Relaxed) {
                registry.set_unresponsive(worker, false);
                info!(%worker, "worker answers pings again");
            }
        }
        FromWorker::Synced { room, token } => {
            let mut restores = lock(&slot.restores);
            // Else: a late answer to a restore that stopped waiting.
            if restores.get(&room).is_some_and(|r| r.token == token)
                && let Some(answered) = restores.remove(&room).and_then(|r| r.answered)
            {
                let _ = answered.send(());
            }
        }
        FromWorker::Stats {
            frames,
            ignored,
            rooms,
        } => {
            registry.summaries(worker, rooms);
            for (kind, n) in frames {
                metrics
                    .frames_in
                    .get_or_create(&Kind { r#type: kind })
                    .inc_by(n);
            }
            for (reason, n) in ignored {
                metrics
                    .frames_ignored
                    .get_or_create(&Reason { reason })
                    .inc_by(n);
            }
        }
        FromWorker::SaveFinished {
            outcome,
            retry,
            micros,
        } => {
            metrics
                .saves
                .get_or_create(&Outcome {
                    result: outcome.label().to_owned(),
                })
                .inc();
            if retry {
                metrics.save_retries.inc();
            }
            metrics.save_duration.observe(micros as f64 / 1e6);
            // "No board yet" is a backend's normal state, not a failing store.
            if outcome != crate::ipc::SaveResult::NoBoard {
                registry.save_finished(outcome == crate::ipc::SaveResult::Ok);
            }
        }
        FromWorker::RoomFailed { room } => {
            warn!(%worker, %room, "room closed: its stored board cannot be read");
            registry.room_failed(&room, worker);
        }
        FromWorker::Hello { .. } => warn!(%worker, "unexpected second hello from worker"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair of local sockets, as supervisor (reader, writer) and the
    /// fake worker's (reader, writer).
    async fn socket_pair() -> (
        (Reader, Writer),
        (
            FramedRead<IpcReader, IpcCodec<ToWorker, FromWorker>>,
            FramedWrite<IpcWriter, IpcCodec<ToWorker, FromWorker>>,
        ),
    ) {
        use interprocess::local_socket::traits::tokio::Stream as _;
        let name = format!("session-server-test.{}.sock", rand::random::<u64>());
        let listener = ListenerOptions::new()
            .name(name.as_str().to_ns_name::<GenericNamespaced>().unwrap())
            .create_tokio()
            .unwrap();
        let ns_name = name.as_str().to_ns_name::<GenericNamespaced>().unwrap();
        let (accepted, connected) = tokio::join!(listener.accept(), LocalStream::connect(ns_name));
        let (sr, sw) = ipc_socket::split(accepted.unwrap()).unwrap();
        let (wr, ww) = ipc_socket::split(connected.unwrap()).unwrap();
        (
            (
                FramedRead::new(sr, IpcCodec::new()),
                FramedWrite::new(sw, IpcCodec::new()),
            ),
            (
                FramedRead::new(wr, IpcCodec::new()),
                FramedWrite::new(ww, IpcCodec::new()),
            ),
        )
    }

    async fn handshake_with(reply: FromWorker) -> anyhow::Result<()> {
        let ((mut reader, mut writer), (mut w_reader, mut w_writer)) = socket_pair().await;
        let fake_worker = async move {
            let hello = w_reader.next().await.unwrap().unwrap();
            assert_eq!(
                hello,
                ToWorker::Hello {
                    ipc_version: IPC_VERSION,
                    worker_id: WorkerId(4)
                }
            );
            w_writer.send(reply).await.unwrap();
            (w_reader, w_writer)
        };
        let (result, _keep_open) = tokio::join!(
            handshake(WorkerId(4), &mut reader, &mut writer, 99),
            fake_worker
        );
        result
    }

    /// Both directions full at once: the worker writes 4 MB of snapshots before
    /// it reads anything, while a room with a 4 MB journal is restored into it.
    /// The restore completes (the supervisor reads while it writes) and every
    /// snapshot reaches the room.
    #[tokio::test]
    async fn a_restore_goes_through_while_the_worker_writes_without_reading() {
        use super::super::registry::ConnState;
        const EVENTS: usize = 4000;
        const SNAPSHOTS: usize = 16;
        const SNAPSHOT_BYTES: usize = 256 * 1024;
        let ((mut reader, mut writer), (mut w_reader, mut w_writer)) = socket_pair().await;
        let registry = Registry::new(1, 1, 1);
        let metrics = Metrics::new(&Default::default());
        let (queue, mut frames) = mpsc::channel(WORKER_QUEUE);
        let slot = WorkerSlot::new(WorkerId(0), queue);
        let room = RoomId("big".into());
        let (conn_state, mut conn) = watch::channel(ConnState::pending());
        let entry = registry
            .register(&room, crate::ipc::ConnId(1), "u".into(), conn_state)
            .unwrap();
        registry
            .join(&entry, &slot.queue, crate::ipc::ConnId(1), None)
            .await
            .unwrap();
        for _ in 0..EVENTS {
            let text = "x".repeat(1000);
            registry
                .forward(&entry, &slot.queue, crate::ipc::ConnId(1), text)
                .await
                .unwrap();
        }
        while frames.try_recv().is_ok() {}
        assert_eq!(registry.worker_failed(WorkerId(0)).len(), 1);

        let fake_worker = async {
            let admit = FromWorker::JoinAccepted {
                room: RoomId("big".into()),
                conn: crate::ipc::ConnId(1),
            };
            w_writer.send(admit).await.unwrap();
            for i in 0..SNAPSHOTS {
                let json = format!("{i:04}{}", "s".repeat(SNAPSHOT_BYTES));
                let snapshot = FromWorker::Snapshot {
                    room: RoomId("big".into()),
                    json,
                    ops: None,
                };
                w_writer.send(snapshot).await.unwrap();
            }
            let mut events = 0;
            loop {
                match w_reader.next().await.unwrap().unwrap() {
                    ToWorker::Event(_) => events += 1,
                    ToWorker::Sync { room, token } => {
                        w_writer
                            .send(FromWorker::Synced { room, token })
                            .await
                            .unwrap();
                        break;
                    }
                    _ => {}
                }
            }
            assert_eq!(events, EVENTS + 1); // the join, then the messages
            (w_reader, w_writer)
        };
        let (_pinger, mut pings) = mpsc::channel(PING_QUEUE);
        let serve = async {
            tokio::select! {
                why = write_frames(Vec::new(), &mut frames, &mut pings, &mut writer, &slot) => panic!("{why}"),
                why = read_frames(&mut reader, &registry, &metrics, &slot) => panic!("{why}"),
                () = restore_room(&entry, &registry, &slot, Duration::from_secs(30)) => {}
            }
        };
        let (_, _keep_open) = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(serve, fake_worker)
        })
        .await
        .expect("restore and snapshots went through (no deadlock)");
        let super::super::registry::Membership::Admitted(snapshots) =
            conn.borrow_and_update().membership.clone()
        else {
            panic!("member not admitted");
        };
        let newest = snapshots.borrow().clone().unwrap();
        assert_eq!(newest.version, SNAPSHOTS as u64);
        assert!(
            newest
                .message
                .starts_with(format!("{:04}", SNAPSHOTS - 1).as_bytes())
        );
        assert_eq!(registry.monitor()[0]["restoring"], false);
    }

    /// A crash is blamed only on restores the worker had started taking and not
    /// answered: not on one it answered, nor on one whose frames it never got.
    #[tokio::test]
    async fn only_restores_taken_and_unanswered_are_blamed() {
        let ((mut reader, mut writer), (mut w_reader, mut w_writer)) = socket_pair().await;
        let metrics = Metrics::new(&Default::default());
        let registry = Registry::new(1, 1, 1);
        let (queue, mut frames) = mpsc::channel(16);
        let slot = WorkerSlot::new(WorkerId(0), queue);
        for (token, name) in [(1, "answered"), (2, "taken"), (3, "queued-only")] {
            let (answered, _answer) = oneshot::channel();
            lock(&slot.restores).insert(
                RoomId(name.into()),
                InFlight {
                    token,
                    taken: false,
                    answered: Some(answered),
                },
            );
        }
        for (token, name) in [(1, "answered"), (2, "taken")] {
            let room = RoomId(name.into());
            let restore = ToWorker::RestoreRoom {
                room: room.clone(),
                id_seed: 0,
                image: None,
            };
            slot.queue.send(restore).await.unwrap();
            slot.queue
                .send(ToWorker::Sync { room, token })
                .await
                .unwrap();
        }
        // Reads both restores, answers the first, then dies.
        let fake_worker = async move {
            for _ in 0..4 {
                w_reader.next().await.unwrap().unwrap();
            }
            let room = RoomId("answered".into());
            w_writer
                .send(FromWorker::Synced { room, token: 1 })
                .await
                .unwrap();
        };
        let (_pinger, mut pings) = mpsc::channel(PING_QUEUE);
        let serve = async {
            tokio::select! {
                why = write_frames(Vec::new(), &mut frames, &mut pings, &mut writer, &slot) => why,
                why = read_frames(&mut reader, &registry, &metrics, &slot) => why,
            }
        };
        let (why, ()) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(serve, fake_worker)
        })
        .await
        .unwrap();
        assert_eq!(why, "IPC socket closed by worker");
        assert_eq!(slot.take_in_flight(), [RoomId("taken".into())]);
        assert!(lock(&slot.restores).is_empty());
    }

    #[tokio::test]
    async fn handshake_accepts_the_spawned_worker() {
        let reply = FromWorker::Hello {
            ipc_version: IPC_VERSION,
            pid: 1,
            nonce: 99,
        };
        handshake_with(reply).await.unwrap();
    }

    #[tokio::test]
    async fn handshake_refuses_another_ipc_version() {
        let reply = FromWorker::Hello {
            ipc_version: IPC_VERSION + 1,
            pid: 1,
            nonce: 99,
        };
        let err = handshake_with(reply).await.unwrap_err().to_string();
        assert!(
            err.contains(&format!("worker speaks IPC version {}", IPC_VERSION + 1)),
            "{err}"
        );
    }

    #[tokio::test]
    async fn handshake_refuses_a_peer_without_the_nonce() {
        let reply = FromWorker::Hello {
            ipc_version: IPC_VERSION,
            pid: 1,
            nonce: 98,
        };
        let err = handshake_with(reply).await.unwrap_err().to_string();
        assert!(err.contains("wrong nonce"), "{err}");
    }
}
