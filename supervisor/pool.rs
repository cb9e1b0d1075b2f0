//! The worker pool: spawns each worker process (this same executable, in worker
//! mode), checks its IPC handshake, carries frames both ways, and replaces the
//! process when it ends.
//!
//! Each worker slot has one queue that outlives its processes, so sessions keep a
//! valid sender across a respawn.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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
use crate::ipc::{CodecError, FromWorker, IPC_VERSION, IpcCodec, RoomId, ToWorker, WorkerId};
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
    pub fn pid(&self) -> Option<u32> {
        Some(self.pid.load(Ordering::Relaxed)).filter(|&p| p != 0)
    }

    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
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
            let slot = Arc::new(WorkerSlot {
                id: WorkerId(i as u32),
                queue,
                pid: AtomicU32::new(0),
                restarts: AtomicU64::new(0),
                drained: Mutex::new(None),
            });
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
    /// The room being restored when it ended: the crash is attributed to it.
    restoring: Option<RoomId>,
}

impl Ended {
    fn plain(how: String) -> Ended {
        Ended {
            how,
            restoring: None,
        }
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
    // Rooms to restore on the next process, and frames to send it after them.
    let mut restore: Vec<Arc<RoomEntry>> = Vec::new();
    let mut carry: Vec<ToWorker> = Vec::new();
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
        if let Some(room) = &ended.restoring {
            if registry.blame(room) {
                error!(worker = %slot.id, %room, "room closed for its members (1011): it crashed {POISON_CRASHES} workers within {POISON_WINDOW:?}");
            } else {
                warn!(worker = %slot.id, %room, "worker crash attributed to the room it was restoring");
            }
        }
        restore = registry.worker_failed(slot.id);
        let restoring: HashSet<&RoomId> = restore.iter().map(|e| &e.id).collect();
        // Frames queued for the dead process: those of its rooms are in their
        // journals and will be replayed; keep the others (rooms placed since).
        while let Ok(frame) = frames.try_recv() {
            carry.push(frame);
        }
        carry.retain(|f| !room_of(f).is_some_and(|r| restoring.contains(r)));
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
        slot.pid.store(pid, Ordering::Relaxed);
        info!(worker = %slot.id, pid, "worker ready");
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(Ok(()));
        }

        if let Err(ended) = self.restore_rooms(&mut reader, &mut writer).await {
            let _ = child.start_kill();
            let status = child.wait().await;
            return Ended {
                how: format!("{}; pid {pid} exit status: {}", ended.how, describe(status)),
                restoring: ended.restoring,
            };
        }

        let ended = tokio::select! {
            why = write_frames(self.frames, &mut writer) => why,
            why = read_frames(&mut reader, self.registry, self.metrics, slot) => why,
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
        // Whatever ended first, make sure the process is gone and reaped.
        let _ = child.start_kill();
        let status = child.wait().await;
        Ended::plain(format!(
            "{ended}; pid {pid} exit status: {}",
            describe(status)
        ))
    }

    /// Restores the inherited rooms one at a time (so a crash is attributed to
    /// the room being restored), then sends the frames carried over.
    async fn restore_rooms(
        &mut self,
        reader: &mut Reader,
        writer: &mut Writer,
    ) -> Result<(), Ended> {
        let count = self.restore.len();
        if count == 0 && self.carry.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        // A room restored from the store (no checkpoint yet) answers after its load.
        let wait = Duration::from_millis(self.settings.load_wait_ms) + RESTORE_ANSWER_MARGIN;
        while let Some(entry) = self.restore.first().cloned() {
            restore_room(
                &entry,
                reader,
                writer,
                self.registry,
                self.metrics,
                self.slot,
                wait,
            )
            .await
            .map_err(|how| Ended {
                how,
                restoring: Some(entry.id.clone()),
            })?;
            self.restore.remove(0);
        }
        let write_failed = |e: CodecError| Ended::plain(format!("IPC write failed: {e}"));
        for frame in self.carry.drain(..) {
            writer.feed(frame).await.map_err(write_failed)?;
        }
        writer.flush().await.map_err(write_failed)?;
        if count > 0 {
            info!(worker = %self.slot.id, rooms = count, ms = started.elapsed().as_millis() as u64, "rooms restored");
        }
        Ok(())
    }
}

/// Sends a room's checkpoint and journal, waits until the worker has applied
/// them, then sends what arrived meanwhile and lets events flow directly again.
async fn restore_room(
    entry: &RoomEntry,
    reader: &mut Reader,
    writer: &mut Writer,
    registry: &Registry,
    metrics: &Metrics,
    slot: &WorkerSlot,
    wait: Duration,
) -> Result<(), String> {
    let Some(frames) = registry.restore_frames(entry) else {
        return Ok(()); // closed meanwhile
    };
    let room = &entry.id;
    let write_failed = |e: CodecError| format!("IPC write failed while restoring room {room}: {e}");
    for frame in frames {
        writer.feed(frame).await.map_err(write_failed)?;
    }
    let token = rand::random::<u64>();
    writer
        .send(ToWorker::Sync {
            room: room.clone(),
            token,
        })
        .await
        .map_err(write_failed)?;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, reader.next()).await {
            Err(_) => {
                warn!(%room, "no answer while restoring (its load may be slow); going on");
                break;
            }
            Ok(None) => return Err(format!("worker ended while restoring room {room}")),
            Ok(Some(Err(e))) => {
                return Err(format!("IPC read failed while restoring room {room}: {e}"));
            }
            Ok(Some(Ok(FromWorker::Synced { token: t, .. }))) if t == token => break,
            Ok(Some(Ok(msg))) => dispatch(msg, registry, metrics, slot),
        }
    }
    loop {
        let (frames, done) = registry.finish_restore(entry);
        for frame in frames {
            writer.feed(frame).await.map_err(write_failed)?;
        }
        writer.flush().await.map_err(write_failed)?;
        if done {
            return Ok(());
        }
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

/// Moves queued frames to the worker, batching whatever is queued into one write.
async fn write_frames(frames: &mut mpsc::Receiver<ToWorker>, writer: &mut Writer) -> String {
    while let Some(frame) = frames.recv().await {
        if let Err(e) = writer.feed(frame).await {
            return format!("IPC write failed: {e}");
        }
        for _ in 1..WRITE_BATCH {
            let Ok(frame) = frames.try_recv() else { break };
            if let Err(e) = writer.feed(frame).await {
                return format!("IPC write failed: {e}");
            }
        }
        if let Err(e) = writer.flush().await {
            return format!("IPC write failed: {e}");
        }
    }
    "frame queue closed".to_owned()
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
        FromWorker::Snapshot { room, json } => registry.publish(&room, Bytes::from(json)),
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
        // A late answer to a restore that stopped waiting.
        FromWorker::Synced { .. } => {}
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
