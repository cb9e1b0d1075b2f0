//! A worker process's life: spawn it, check its handshake, serve it until it
//! ends (killing it when it stops answering pings), replace it when it fails,
//! and stop it when the server stops.

use crate::worker_queue::WorkerFrames;
use std::fmt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use interprocess::local_socket::tokio::Stream as LocalStream;
use interprocess::local_socket::traits::tokio::Listener as _;
use interprocess::local_socket::{GenericNamespaced, ListenerOptions, ToNsName};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::link::{self, LinkEnd, PING_QUEUE, Reader, Writer, watchdog, write_frames};
use super::program::{self, WorkerProgram};
use super::salvage::Salvages;
use super::slot_task::Control;
use super::{DrainReport, WorkerSlot, lock};
use crate::metrics::Metrics;
use crate::rooms::{RESTORE_ANSWER_MARGIN, Registry};
use crate::shutdown::{Phase, Shutdown};
use contract::config::{PersistSettings, WORKER_NONCE_ENV};
use contract::ipc::{CodecError, FromWorker, IPC_VERSION, RoomId, ToWorker, WorkerId};
use contract::process::ended_by_a_fault;

/// A worker must connect and answer the hello within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a worker may take to open the store (creating the embedded file
/// and its schema at the first start; a slow disk can take a while).
const CONFIGURE_TIMEOUT: Duration = Duration::from_secs(30);

/// The embedded store file's identity (device, inode), `None` for the backend.
pub(super) type StoreIdentity = Option<contract::config::FileIdentity>;
/// Respawn delays: the first replacement starts at once (clients are waiting);
/// after a further quick failure the delay starts here and doubles, so a crash
/// loop is throttled.
const MIN_RESPAWN_DELAY: Duration = Duration::from_millis(50);
const MAX_RESPAWN_DELAY: Duration = Duration::from_secs(5);
/// A worker that ran this long before failing was not crash-looping: the next
/// replacement starts at once again.
const STABLE_RUN: Duration = Duration::from_secs(5);

/// How a worker process ended, or failed to start: what its log lines say.
#[derive(Debug)]
pub(super) enum WorkerExit {
    /// It could not be spawned, or did not connect to its socket.
    Spawn(anyhow::Error),
    /// Its connected socket could not be set up.
    Socket(std::io::Error),
    /// The hello exchange failed; the process was killed.
    Handshake {
        pid: u32,
        error: anyhow::Error,
        status: std::io::Result<ExitStatus>,
    },
    /// Still starting (or restoring rooms) at the shutdown deadline: dropped,
    /// which kills it.
    StillStarting,
    /// It exited after its socket was closed at shutdown.
    Stopped {
        pid: u32,
        status: std::io::Result<ExitStatus>,
    },
    /// It was being served when `cause` ended it; then it was killed (if still
    /// running) and reaped.
    Ended {
        pid: u32,
        cause: EndCause,
        status: std::io::Result<ExitStatus>,
    },
}

/// What ended a worker that was being served.
#[derive(Debug)]
pub(super) enum EndCause {
    /// Its IPC link ended (the socket or the slot's queue).
    Link(LinkEnd),
    /// The watchdog's kill: no answer to pings for this long.
    Unresponsive(Duration),
    /// The process exited by itself.
    ProcessExited,
    /// It did not exit in time after its socket was closed at shutdown.
    ShutdownTimeout,
}

/// What a worker's end says about the rooms it was taking the restore of.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Evidence {
    /// It crashed by its own doing: a fault or abort signal it raised itself
    /// (a panic aborts the worker, see `worker::main`) or an undecodable frame
    /// it sent. The rooms are blamed.
    Crash,
    /// The watchdog killed it for a hang. Blamed only when one room was being
    /// restored (a big restore under memory pressure can be slow, and a hang
    /// among several rooms says nothing about which); otherwise those rooms
    /// are restored one at a time next, so a room that hangs is then alone.
    Hang,
    /// Killed from outside (the OOM killer, an operator, a test) or a plain
    /// exit: nothing about the rooms.
    None,
}

impl WorkerExit {
    /// What the way the process ended says (see [`Evidence`]).
    pub(super) fn evidence(&self) -> Evidence {
        let WorkerExit::Ended { cause, status, .. } = self else {
            return Evidence::None;
        };
        match cause {
            EndCause::Unresponsive(_) => Evidence::Hang,
            EndCause::Link(LinkEnd::Read(CodecError::TooLarge(_) | CodecError::Malformed(_))) => {
                Evidence::Crash
            }
            _ if status.as_ref().is_ok_and(ended_by_a_fault) => Evidence::Crash,
            _ => Evidence::None,
        }
    }
}

impl fmt::Display for WorkerExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkerExit::Spawn(e) => write!(f, "{e:#}"),
            WorkerExit::Socket(e) => write!(f, "cannot set up the worker's socket: {e}"),
            WorkerExit::Handshake { pid, error, status } => write!(
                f,
                "handshake with pid {pid} failed: {error:#} (process {status:?})"
            ),
            WorkerExit::StillStarting => {
                f.write_str("still starting at the shutdown deadline; killed")
            }
            WorkerExit::Stopped { pid, status } => {
                write!(f, "pid {pid} stopped: {}", Described(status))
            }
            WorkerExit::Ended { pid, cause, status } => {
                write!(f, "{cause}; pid {pid} exit status: {}", Described(status))
            }
        }
    }
}

impl fmt::Display for EndCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndCause::Link(end) => end.fmt(f),
            EndCause::Unresponsive(silent) => {
                write!(f, "no answer to pings for {} ms", silent.as_millis())
            }
            EndCause::ProcessExited => f.write_str("process exited"),
            EndCause::ShutdownTimeout => f.write_str("killed after shutdown timeout"),
        }
    }
}

/// A process's exit status as logs show it: the status (exit code or signal),
/// or why it is unknown.
struct Described<'a>(&'a std::io::Result<ExitStatus>);

impl fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Ok(status) => status.fmt(f),
            Err(e) => write!(f, "status unknown: {e}"),
        }
    }
}

/// How a worker process ended.
struct Ended {
    how: WorkerExit,
    /// Rooms being restored into it when it ended (their frames had started
    /// going to it, and it had not answered their `Sync`): the crash is
    /// attributed to them.
    restoring: Vec<RoomId>,
}

impl Ended {
    fn plain(how: WorkerExit) -> Ended {
        Ended {
            how,
            restoring: Vec::new(),
        }
    }
}

/// Runs one slot: start a worker, serve it until it ends, then start a
/// replacement and restore the rooms the failed one held. A shutdown, as a
/// slot sees it: from [`Phase::Draining`] a worker that ends is not replaced;
/// at [`Phase::Stopped`] its socket is closed, and the process is killed if it
/// still runs at the plan's `exit_by`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn supervise(
    slot: Arc<WorkerSlot>,
    mut frames: WorkerFrames,
    control: mpsc::UnboundedSender<Control>,
    mut worker: WorkerSpec,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    ready: oneshot::Sender<Result<StoreIdentity, WorkerExit>>,
) {
    let mut ready = Some(ready);
    let mut delay = Duration::ZERO;
    loop {
        let started = Instant::now();
        // Serving ends by itself at the shutdown deadline; this bounds a worker
        // still starting or restoring rooms then (dropping it kills the process).
        let mut serve = Serve {
            slot: &slot,
            frames: &mut frames,
            control: &control,
            worker: &mut worker,
            registry: &registry,
            shutdown: &shutdown,
            ready: &mut ready,
        };
        let ended = tokio::select! {
            biased;
            ended = serve.run() => ended,
            _ = async {
                let at = exit_requested(&shutdown).await;
                tokio::time::sleep_until(at).await;
            } => Ended::plain(WorkerExit::StillStarting),
        };
        slot.pid.store(0, Ordering::Relaxed);
        if shutdown.phase() == Phase::Stopped {
            info!(worker = %slot.id, "{}", ended.how);
            return;
        }
        if shutdown.is_stopping() {
            // A replacement would only be killed again; rooms are not restored.
            let unsaved = registry.unconfirmed_rooms(slot.id).await;
            error!(worker = %slot.id, ?unsaved, "worker ended during shutdown ({}); not replaced; these rooms are replayed into fallback files from the supervisor's journal", ended.how);
            slot.answer_drain(DrainReport {
                saved: 0,
                unsaved,
                lost: true,
                fallback: Vec::new(),
            });
            return;
        }
        if let Some(ready) = ready.take() {
            let _ = ready.send(Err(ended.how));
            return;
        }
        // Only a crash by the worker's own doing is blamed on the rooms it was
        // restoring (see `Evidence`; README "What survives what").
        let (blamed, suspected): (&[RoomId], &[RoomId]) = match ended.how.evidence() {
            Evidence::Crash => (&ended.restoring, &[]),
            Evidence::Hang if ended.restoring.len() == 1 => (&ended.restoring, &[]),
            Evidence::Hang => (&[], &ended.restoring),
            Evidence::None => {
                if !ended.restoring.is_empty() {
                    info!(worker = %slot.id, rooms = ?ended.restoring, "worker ended from outside while restoring these rooms ({}); no room is blamed", ended.how);
                }
                (&[], &[])
            }
        };
        let (answer, answered) = oneshot::channel();
        let _ = control.send(Control::Failed {
            blamed: blamed.to_vec(),
            suspected: suspected.to_vec(),
            answer,
        });
        let (rooms, quarantined) = answered.await.unwrap_or_default();
        for room in quarantined {
            worker.salvages.spawn(
                worker.program.clone(),
                worker.settings.data_dir.clone(),
                room,
            );
        }
        // Frames queued for the dead process: its rooms' are in their journals
        // (every room of the slot is restored, and nothing is queued for them
        // until then), the others (pings, checkpoint requests) are moot.
        while frames.try_recv().is_ok() {}
        let rooms: Vec<&str> = rooms.iter().map(|room| room.0.as_str()).collect();
        error!(worker = %slot.id, rooms = ?rooms, "worker failed ({}); restoring its rooms on a replacement", ended.how);
        if started.elapsed() > STABLE_RUN {
            delay = Duration::ZERO;
        }
        tokio::select! {
            biased;
            () = shutdown.wait_for(Phase::Draining) => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).clamp(MIN_RESPAWN_DELAY, MAX_RESPAWN_DELAY);
        slot.restarts.fetch_add(1, Ordering::Relaxed);
        metrics
            .worker_restarts
            .get_or_create(&crate::metrics::Worker::of(slot.id))
            .inc();
    }
}

/// One worker process's life, with what it needs from its slot.
struct Serve<'a> {
    slot: &'a WorkerSlot,
    frames: &'a mut WorkerFrames,
    control: &'a mpsc::UnboundedSender<Control>,
    worker: &'a mut WorkerSpec,
    registry: &'a Registry,
    shutdown: &'a Shutdown,
    ready: &'a mut Option<oneshot::Sender<Result<StoreIdentity, WorkerExit>>>,
}

/// Waits until the server is [`Phase::Stopped`]; returns when its workers must
/// be gone.
async fn exit_requested(shutdown: &Shutdown) -> tokio::time::Instant {
    shutdown.wait_for(Phase::Stopped).await;
    shutdown
        .plan()
        .map_or_else(tokio::time::Instant::now, |plan| plan.exit_by)
}

/// What a slot starts: the settings every worker gets, and its program.
pub(super) struct WorkerSpec {
    /// The embedded store's identity is filled in from the first worker's
    /// answer, so that its replacements attach to that file only.
    pub(super) settings: PersistSettings,
    pub(super) program: WorkerProgram,
    /// Where quarantined rooms' salvages are kept track of (the pool's).
    pub(super) salvages: Arc<Salvages>,
}

impl Serve<'_> {
    /// Starts one worker process, restores the rooms it inherits, and serves it
    /// until it ends; returns how it ended.
    async fn run(&mut self) -> Ended {
        let slot = self.slot;
        let (mut child, stream, nonce) =
            match spawn_and_connect(slot.id, &self.worker.program).await {
                Ok(started) => started,
                Err(e) => return Ended::plain(WorkerExit::Spawn(e)),
            };
        let pid = child.id().unwrap_or(0);
        let (mut reader, mut writer) = match link::framed(stream) {
            Ok(framed) => framed,
            Err(e) => {
                let _ = child.start_kill();
                return Ended::plain(WorkerExit::Socket(e));
            }
        };

        // At the server's start the answer to the settings is awaited: it is the
        // start-up check of the store, and the first worker's names the embedded
        // file. A replacement's is not (its store was checked, its file is known):
        // its restores go out at once, and the link reads its answer.
        let starting = self.ready.is_some();
        let handshake = async {
            handshake(slot.id, &mut reader, &mut writer, nonce).await?;
            configure(&mut reader, &mut writer, &self.worker.settings, starting).await
        };
        let store_identity = match handshake.await {
            Ok(identity) => identity,
            Err(e) => {
                let _ = child.start_kill();
                let status = child.wait().await;
                return Ended::plain(WorkerExit::Handshake {
                    pid,
                    error: e,
                    status,
                });
            }
        };
        let settings = &mut self.worker.settings;
        settings.store_identity = settings.store_identity.or(store_identity);
        *lock(&slot.last_pong) = Instant::now();
        slot.unresponsive.store(false, Ordering::Relaxed);
        self.registry.set_unresponsive(slot.id, false);
        slot.pid.store(pid, Ordering::Relaxed);
        info!(worker = %slot.id, pid, "worker ready");
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(Ok(store_identity));
        }

        let (pinger, mut pings) = mpsc::channel(PING_QUEUE);
        // The slot's task reads the worker's replies and restores the rooms
        // it inherits (alongside writing, never in its way).
        let restore_wait =
            Duration::from_millis(self.worker.settings.load_wait_ms) + RESTORE_ANSWER_MARGIN;
        let (ended, mut link_ended) = oneshot::channel();
        let _ = self.control.send(Control::Attach {
            reader,
            ended,
            restore_wait,
        });
        let ended = tokio::select! {
            why = write_frames(self.frames, &mut pings, &mut writer) => EndCause::Link(why),
            why = &mut link_ended => EndCause::Link(why.unwrap_or(LinkEnd::Closed)),
            silent = watchdog(slot, self.registry, pinger) => EndCause::Unresponsive(silent),
            _ = child.wait() => EndCause::ProcessExited,
            deadline = exit_requested(self.shutdown) => {
                // Closing the socket tells the worker to exit.
                drop(writer);
                self.detach().await;
                match tokio::time::timeout_at(deadline, child.wait()).await {
                    Ok(status) => return Ended::plain(WorkerExit::Stopped { pid, status }),
                    Err(_) => {
                        warn!(worker = %slot.id, pid, "worker did not exit in time; killing it");
                        EndCause::ShutdownTimeout
                    }
                }
            }
        };
        let restoring = self.detach().await;
        // Whatever ended first, make sure the process is gone and reaped.
        let _ = child.start_kill();
        let status = child.wait().await;
        Ended {
            how: WorkerExit::Ended {
                pid,
                cause: ended,
                status,
            },
            restoring,
        }
    }
}

impl Serve<'_> {
    /// Stops the slot's task reading the process; returns the rooms whose
    /// restore it had started reading and not answered.
    async fn detach(&self) -> Vec<RoomId> {
        let (answer, answered) = oneshot::channel();
        let _ = self.control.send(Control::Detach(answer));
        answered.await.unwrap_or_default()
    }
}

async fn spawn_and_connect(
    id: WorkerId,
    program: &WorkerProgram,
) -> anyhow::Result<(Child, LocalStream, u64)> {
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
    let (path, shown_name) = program.path()?;
    let mut command = Command::new(path);
    command
        .arg0(shown_name)
        .arg("worker")
        .arg("--ipc")
        .arg(&name)
        .arg("--worker-id")
        .arg(id.0.to_string())
        .env(WORKER_NONCE_ENV, nonce.to_string())
        .kill_on_drop(true);
    let mut child = program::start(command, HANDSHAKE_TIMEOUT)
        .await
        .context("spawning worker process")?;
    let stream = tokio::select! {
        accepted = listener.accept() => accepted.context("accepting worker connection")?,
        status = child.wait() => anyhow::bail!("worker exited before connecting: {}", Described(&status)),
        _ = tokio::time::sleep(HANDSHAKE_TIMEOUT) => anyhow::bail!("worker did not connect within {HANDSHAKE_TIMEOUT:?}"),
    };
    Ok((child, stream, nonce))
}

/// Sends the worker its settings and, with `await_answer`, waits for its
/// answer: the store it opened (the embedded file's identity) or why the store
/// cannot be used. Without, returns `None` at once (the link reads the answer).
async fn configure(
    reader: &mut Reader,
    writer: &mut Writer,
    settings: &PersistSettings,
    await_answer: bool,
) -> anyhow::Result<StoreIdentity> {
    writer
        .send(ToWorker::Configure(settings.clone()))
        .await
        .context("sending settings")?;
    if !await_answer {
        return Ok(None);
    }
    let answer = tokio::time::timeout(CONFIGURE_TIMEOUT, reader.next())
        .await
        .with_context(|| format!("no answer to the settings within {CONFIGURE_TIMEOUT:?}"))?;
    match answer {
        Some(Ok(FromWorker::Configured { store_identity })) => Ok(store_identity),
        Some(Ok(FromWorker::StoreUnusable { error })) => {
            anyhow::bail!("the store is unusable: {error}")
        }
        Some(Ok(other)) => anyhow::bail!("expected the answer to the settings, got {other:?}"),
        Some(Err(e)) => Err(e.into()),
        None => anyhow::bail!("worker closed the socket before answering the settings"),
    }
}

/// Exchanges hellos: same IPC version, and the peer is the process we spawned.
pub(super) async fn handshake(
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
