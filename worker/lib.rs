//! A room worker: a separate OS process that owns the state of the rooms the
//! supervisor placed on it. It reads stamped events from its IPC socket, applies
//! them, and answers with join verdicts and snapshots. It exits when the socket
//! closes, so it never outlives its supervisor.

#![deny(missing_docs)]

pub mod compressed;
pub mod core;
pub mod persist;
pub mod room;
pub mod salvage;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{FutureExt, SinkExt, StreamExt};
use interprocess::local_socket::tokio::Stream as LocalStream;
use interprocess::local_socket::{GenericNamespaced, ToNsName, traits::tokio::Stream as _};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{info, warn};

use contract::config::{WORKER_NONCE_ENV, WorkerArgs};
use contract::ipc::{CodecError, FromWorker, IPC_VERSION, ToWorker, WorkerId};
use core::{StoreResult, WorkerCore};
use transport::IpcCodec;
use transport::{IpcReader, IpcWriter};

/// Frames applied before pending snapshots are encoded and sent. Batching lets a
/// burst of events produce one snapshot per room; the bound keeps latency low.
const MAX_BATCH: usize = 256;
/// Store results queued for the loop; each room has at most one load and one
/// save running, so this is rarely reached (tasks wait when it is).
const RESULTS_QUEUE: usize = 1024;
/// When the supervisor's socket closes without a drain (the supervisor died),
/// unsaved rooms get this long to be saved before the worker exits: short, so
/// workers never linger after their supervisor. After a drain it exits at once,
/// unless edits made since then are not saved yet: those get this long too.
const ORPHAN_SAVE_GRACE: Duration = Duration::from_millis(500);
/// A worker's `oom_score_adj`: the most (1000), so the OOM killer takes a
/// worker before the supervisor whatever their sizes.
pub const OOM_SCORE_ADJ: i32 = 1000;
/// After rooms were freed, memory is given back to the system at most this
/// often (it walks the heap).
const TRIM_EVERY: Duration = Duration::from_secs(2);
/// How often frame counts are reported to the supervisor (for its metrics).
const STATS_EVERY: Duration = Duration::from_secs(1);
/// Batches of output waiting for the writer task, so the loop goes on reading
/// while its output is written. When full, the loop waits for room before it
/// reads on: that cannot deadlock, because the supervisor reads its socket
/// whatever it is writing, so the writer always drains. Small, because a batch
/// may hold a full snapshot of every changed room.
const OUTPUT_QUEUE: usize = 4;
/// KiB of output (snapshots and checkpoints, mostly) waiting for the writer
/// at most: with full boards (12 MB snapshots) 4 batches of several rooms
/// each held hundreds of MB. When reached, the loop waits as when the queue is
/// full; changes meanwhile fold into the next snapshot of their room.
const OUTPUT_QUEUE_KIB: usize = 32 << 10;

/// Entry point of `session-server worker`: [`run`] on a single-threaded
/// runtime. Returns once the supervisor's socket has closed and what was unsaved
/// has been saved (or its time is up); an error (a failed handshake, an unusable
/// store, a broken link) is the process's failure.
pub fn main(args: WorkerArgs) -> anyhow::Result<()> {
    // One thread per worker: workers are the unit of parallelism. (The embedded
    // store's blocking calls run on tokio's blocking pool.)
    // A panic anywhere (the loop, a store task) aborts the process: its rooms
    // are restored on a replacement, and the abort (SIGABRT) is the evidence
    // the supervisor needs to blame the room being restored, if any. Unwinding
    // would close the socket first, and the supervisor's kill would then look
    // like one from outside.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

type Reader = FramedRead<IpcReader, IpcCodec<ToWorker, FromWorker>>;
type Writer = FramedWrite<IpcWriter, IpcCodec<ToWorker, FromWorker>>;

/// The worker itself: ignores the stop signals (the supervisor decides), takes
/// its handshake nonce from [`WORKER_NONCE_ENV`], connects to the supervisor's
/// socket named in `args`, opens the store it is configured with, then applies
/// frames until the socket closes.
pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    // First of all, so a signal sent to the whole process group during start-up
    // cannot kill a worker either.
    ignore_signals()?;
    offer_to_the_oom_killer();
    let nonce: u64 = std::env::var(WORKER_NONCE_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .context("worker started without its handshake nonce (it is started by the supervisor, not by hand)")?;
    serve(args, nonce).await
}

/// The kernel's OOM killer picks the process with the highest score; a worker
/// asks to be picked first ([`OOM_SCORE_ADJ`]), because a worker that dies is
/// replaced and its rooms restored without a disconnect, while the supervisor's
/// death drops every client. (Raising one's own score needs no privilege.)
fn offer_to_the_oom_killer() {
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", OOM_SCORE_ADJ.to_string()) {
        warn!(error = %e, "cannot raise this worker's oom_score_adj: under memory pressure the kernel may kill the supervisor instead");
    }
}

/// Replaces the default action of SIGINT, SIGTERM and SIGHUP (terminate) with a
/// log line: the supervisor decides when workers stop (it closes their socket),
/// so Ctrl-C or a signal to the process group cannot kill a worker mid-shutdown.
fn ignore_signals() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
                _ = hup.recv() => "SIGHUP",
            };
            tracing::debug!(
                pid = std::process::id(),
                "ignoring {name}: the supervisor decides"
            );
        }
    });
    Ok(())
}

/// Connects to the supervisor, checks its hello, then applies frames until the
/// socket closes.
async fn serve(args: WorkerArgs, nonce: u64) -> anyhow::Result<()> {
    let worker_id = WorkerId(args.worker_id);
    let span = tracing::info_span!("worker", id = %worker_id, pid = std::process::id());
    let _enter = span.enter();

    let name = args.ipc.as_str().to_ns_name::<GenericNamespaced>()?;
    let stream = LocalStream::connect(name)
        .await
        .with_context(|| format!("connecting to supervisor socket {}", args.ipc))?;
    let (read_half, write_half) = transport::split(stream)?;
    let mut reader: Reader = FramedRead::new(read_half, IpcCodec::new());
    let mut writer: Writer = FramedWrite::new(write_half, IpcCodec::new());

    match reader.next().await {
        Some(Ok(ToWorker::Hello { ipc_version, .. })) if ipc_version == IPC_VERSION => {}
        Some(Ok(ToWorker::Hello { ipc_version, .. })) => bail!(
            "supervisor speaks IPC version {ipc_version}, this worker speaks {IPC_VERSION}: refusing to run"
        ),
        other => bail!("expected the supervisor's hello, got {other:?}"),
    }
    writer
        .send(FromWorker::Hello {
            ipc_version: IPC_VERSION,
            pid: std::process::id(),
            nonce,
        })
        .await?;
    let settings = match reader.next().await {
        Some(Ok(ToWorker::Configure(settings))) => settings,
        other => bail!("expected the supervisor's settings, got {other:?}"),
    };
    let store = match store::open(&settings.store, settings.store_identity) {
        Ok((store, store_identity)) => {
            writer
                .send(FromWorker::Configured { store_identity })
                .await?;
            store
        }
        Err(e) => {
            let error = format!("{e:#}");
            let _ = writer.send(FromWorker::StoreUnusable { error }).await;
            return Err(e);
        }
    };
    info!("worker ready");

    let (results_tx, mut results) = mpsc::channel::<StoreResult>(RESULTS_QUEUE);
    let mut core = WorkerCore::new(store, &settings, results_tx);
    let (output_tx, output_rx) = mpsc::channel::<Output>(OUTPUT_QUEUE);
    let output_budget = Arc::new(Semaphore::new(OUTPUT_QUEUE_KIB));
    let mut writing = tokio::spawn(write_output(writer, output_rx));
    let mut connected = true;
    let mut stats = tokio::time::interval(STATS_EVERY);
    // Rooms freed since memory was last given back (see `TRIM_EVERY`).
    let (mut rooms_freed, mut last_trim) = (false, Instant::now());
    loop {
        let deadline = core.next_deadline();
        let mut stats_due = false;
        tokio::select! {
            frame = reader.next(), if connected => match frame {
                Some(Ok(frame)) => {
                    core.handle(frame, Instant::now());
                    for _ in 1..MAX_BATCH {
                        match reader.next().now_or_never() {
                            Some(Some(Ok(frame))) => core.handle(frame, Instant::now()),
                            // A failure is seen by the next poll of the branch.
                            _ => break,
                        }
                    }
                }
                // After a drain the supervisor has its answer: exit at once,
                // unless edits made since are not saved yet.
                None if core.drained_and_saved() => {
                    info!("supervisor closed the socket after the drain; exiting");
                    return Ok(());
                }
                // However the link ends (closed, reset, a frame that cannot be
                // decoded), the supervisor is gone for this worker: save what
                // is unsaved, then exit (see `orphaned`).
                None => {
                    connected = false;
                    orphaned(&mut core, "supervisor closed the socket");
                }
                Some(Err(e)) => {
                    connected = false;
                    orphaned(&mut core, &format!("reading from supervisor: {e}"));
                }
            },
            Some(result) = results.recv() => core.on_result(result, Instant::now()),
            written = &mut writing, if connected => {
                let why = match written {
                    Ok(Ok(())) => "output queue closed".to_owned(),
                    Ok(Err(e)) => format!("writing to supervisor: {e}"),
                    Err(e) => format!("writer task failed: {e}"),
                };
                // After the drain the supervisor has its answer, and closes its
                // end to stop us: a write racing with that is no failure.
                if core.drained_and_saved() {
                    info!("IPC socket closed after the drain; exiting");
                    return Ok(());
                }
                connected = false;
                orphaned(&mut core, &why);
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {}
            _ = stats.tick() => stats_due = true,
        }
        let rooms_before = core.room_count();
        core.tick(Instant::now());
        if core.room_count() < rooms_before {
            rooms_freed = true;
        }
        if rooms_freed && last_trim.elapsed() >= TRIM_EVERY {
            rooms_freed = false;
            last_trim = Instant::now();
            contract::alloc::return_freed_memory();
        }
        let mut output = core.take_output(Instant::now());
        if stats_due {
            output.extend(core.take_stats());
        }
        if connected {
            // Fails only once the writer has ended: the branch above says why.
            if !output.is_empty() {
                let kib = output.iter().map(size_kib).sum::<usize>();
                let permits = kib.clamp(1, OUTPUT_QUEUE_KIB) as u32;
                let room = output_budget
                    .clone()
                    .acquire_many_owned(permits)
                    .await
                    .expect("the budget is never closed");
                let _ = output_tx
                    .send(Output {
                        messages: output,
                        _room: room,
                    })
                    .await;
            }
        } else if core.drained() {
            // Nobody reads the answer: what could not be saved is in fallback
            // files (the drain wrote them) and the log says which.
            return Ok(());
        }
    }
}

/// The link to the supervisor ended without a drain's answer (the supervisor
/// died, or the socket failed): nobody will send this worker's rooms anywhere
/// else, so it saves what is unsaved within [`ORPHAN_SAVE_GRACE`] and writes
/// what is still unsaved then to fallback files, before it exits.
fn orphaned(core: &mut WorkerCore, why: &str) {
    if core.drained() {
        info!(
            rooms = core.room_count(),
            "link to the supervisor ended after the drain ({why}); saving edits made since, then exiting"
        );
    } else {
        warn!(
            rooms = core.room_count(),
            "link to the supervisor ended ({why}); saving what is unsaved, then exiting"
        );
    }
    core.start_drain(Instant::now() + ORPHAN_SAVE_GRACE);
}

/// A batch of output for the writer, holding its share of
/// [`OUTPUT_QUEUE_KIB`] until it is written.
struct Output {
    messages: Vec<FromWorker>,
    _room: OwnedSemaphorePermit,
}

/// About how many KiB a message takes in the output queue.
fn size_kib(msg: &FromWorker) -> usize {
    let bytes = match msg {
        FromWorker::Snapshot {
            json,
            ops,
            deflated,
            ..
        } => {
            json.len() + ops.as_ref().map_or(0, String::len) + deflated.as_ref().map_or(0, Vec::len)
        }
        FromWorker::Checkpoint { image, .. } => image.len(),
        _ => 0,
    };
    bytes >> 10
}

/// Writes each batch of output to the supervisor, with the batches queued
/// meanwhile, in one write; ends at the first failure or when the loop is gone.
async fn write_output(
    mut writer: Writer,
    mut batches: mpsc::Receiver<Output>,
) -> Result<(), CodecError> {
    while let Some(batch) = batches.recv().await {
        let mut written = vec![batch];
        while let Ok(batch) = batches.try_recv() {
            written.push(batch);
        }
        for batch in &mut written {
            for msg in batch.messages.drain(..) {
                writer.feed(msg).await?;
            }
        }
        writer.flush().await?;
        // Their room in the queue is given back once they are on the socket.
        drop(written);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use contract::ipc::WorkerId;
    use interprocess::local_socket::ListenerOptions;
    use interprocess::local_socket::traits::tokio::Listener as _;

    /// A worker refuses to run for a supervisor that speaks another IPC version.
    #[tokio::test]
    async fn worker_refuses_a_supervisor_with_another_ipc_version() {
        let name = format!("session-server-test.{}.sock", rand::random::<u64>());
        let listener = ListenerOptions::new()
            .name(name.as_str().to_ns_name::<GenericNamespaced>().unwrap())
            .create_tokio()
            .unwrap();
        let args = WorkerArgs {
            ipc: name,
            worker_id: 0,
        };
        let worker = tokio::spawn(serve(args, 7));
        let stream = listener.accept().await.unwrap();
        let (_, write_half) = tokio::io::split(stream);
        let mut writer = FramedWrite::new(write_half, IpcCodec::<FromWorker, ToWorker>::new());
        writer
            .send(ToWorker::Hello {
                ipc_version: IPC_VERSION + 1,
                worker_id: WorkerId(0),
            })
            .await
            .unwrap();
        let err = worker.await.unwrap().unwrap_err().to_string();
        assert!(err.contains("refusing to run"), "{err}");
        assert!(
            err.contains(&format!("IPC version {}", IPC_VERSION + 1)),
            "{err}"
        );
    }
}
