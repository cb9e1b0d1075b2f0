//! The IPC link to one worker process: the framed socket, the writer that
//! batches queued frames onto it, the reader that routes the worker's replies,
//! and the pings that tell a live worker from a stuck one.

use crate::worker_queue::WorkerFrames;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use interprocess::local_socket::tokio::Stream as LocalStream;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{error, info, warn};

use super::{DrainReport, WorkerSlot, lock};
use crate::metrics::{Kind, Metrics, Outcome, Why};
use crate::rooms::Registry;
use contract::ipc::{CodecError, FromWorker, RoomId, ToWorker};
use transport::IpcCodec;
use transport::{IpcReader, IpcWriter};

/// Frames written per batch before flushing the socket.
const WRITE_BATCH: usize = 512;

/// How often each worker is pinged: often enough that a stuck one is noticed
/// within seconds, rarely enough to cost nothing.
pub(super) const PING_EVERY: Duration = Duration::from_secs(1);
/// A worker silent this long is reported unresponsive (`/readyz` 503): two
/// missed pings, not a single late one.
pub(super) const UNRESPONSIVE_AFTER: Duration = Duration::from_secs(2);
/// A worker silent this long is stuck (stopped, or looping): it is killed and
/// replaced. A healthy worker answers between batches (256 frames and one
/// snapshot per changed room: milliseconds), so this is never a slow batch.
pub(super) const DEAD_AFTER: Duration = Duration::from_secs(5);
/// [`DEAD_AFTER`] for a replacement still restoring its rooms: restoring full
/// boards (10 MB each) near a memory limit can keep a worker busy for
/// seconds, and killing it would only start the same work again.
pub(super) const RESTORING_DEAD_AFTER: Duration = Duration::from_secs(30);
/// Pings waiting to be written. One is enough: a second would say the same;
/// when it is full the new ping is skipped (the silence is timed regardless).
pub(super) const PING_QUEUE: usize = 1;
/// A ping is a `Sync` for this room, answered by the worker at once with a
/// `Synced`: no room has an empty id (tokens with an empty `roomId` are
/// refused), and reusing that round trip needs no new IPC frame.
const PING_ROOM: &str = "";

pub(super) type Reader = FramedRead<IpcReader, IpcCodec<FromWorker, ToWorker>>;
pub(super) type Writer = FramedWrite<IpcWriter, IpcCodec<FromWorker, ToWorker>>;

/// Why a worker's link stopped carrying frames.
#[derive(Debug, thiserror::Error)]
pub(super) enum LinkEnd {
    /// The slot's queue is gone: the pool itself is being dropped.
    #[error("frame queue closed")]
    QueueClosed,
    #[error("IPC write failed: {0}")]
    Write(CodecError),
    #[error("IPC read failed: {0}")]
    Read(CodecError),
    /// The worker closed its end of the socket (it exited, or is exiting).
    #[error("IPC socket closed by worker")]
    Closed,
}

/// Frames a worker's connected socket.
pub(super) fn framed(stream: LocalStream) -> std::io::Result<(Reader, Writer)> {
    let (read_half, write_half) = transport::split(stream)?;
    Ok((
        FramedRead::new(read_half, IpcCodec::new()),
        FramedWrite::new(write_half, IpcCodec::new()),
    ))
}

/// Pings the worker every [`PING_EVERY`]; returns how long it has been silent
/// once that reaches [`DEAD_AFTER`] ([`RESTORING_DEAD_AFTER`] while it restores
/// rooms), which ends (kills) it.
pub(super) async fn watchdog(
    slot: &WorkerSlot,
    registry: &Registry,
    pinger: mpsc::Sender<ToWorker>,
) -> Duration {
    let mut tick = tokio::time::interval(PING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let silent = lock(&slot.last_pong).elapsed();
        let dead_after = if slot.restoring.load(Ordering::Relaxed) {
            RESTORING_DEAD_AFTER
        } else {
            DEAD_AFTER
        };
        if silent >= dead_after {
            error!(worker = %slot.id, silent_ms = silent.as_millis() as u64, "worker stopped answering; killing it");
            return silent;
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

/// Moves queued frames to the worker, batching whatever is queued into one
/// write: first the frames carried over from its failed predecessor, then pings
/// ahead of the queue. Marks each restore whose first frame it takes.
pub(super) async fn write_frames(
    carry: Vec<ToWorker>,
    frames: &mut WorkerFrames,
    pings: &mut mpsc::Receiver<ToWorker>,
    writer: &mut Writer,
    slot: &WorkerSlot,
) -> LinkEnd {
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
                        None => return LinkEnd::QueueClosed,
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
                return LinkEnd::Write(e);
            }
        }
        if let Err(e) = writer.flush().await {
            return LinkEnd::Write(e);
        }
    }
}

/// Routes the worker's replies until the socket ends.
pub(super) async fn read_frames(
    reader: &mut Reader,
    registry: &Registry,
    metrics: &Metrics,
    slot: &WorkerSlot,
) -> LinkEnd {
    while let Some(frame) = reader.next().await {
        match frame {
            Ok(msg) => dispatch(msg, registry, metrics, slot),
            Err(e) => return LinkEnd::Read(e),
        }
    }
    LinkEnd::Closed
}

/// Routes one reply of the worker to the rooms' connections and state.
fn dispatch(msg: FromWorker, registry: &Registry, metrics: &Metrics, slot: &WorkerSlot) {
    let worker = slot.id;
    match msg {
        FromWorker::Snapshot {
            room,
            json,
            ops,
            deflated,
        } => {
            if deflated.is_some() {
                metrics.snapshots_compressed.inc();
            }
            registry.publish(
                &room,
                Bytes::from(json),
                ops.map(Bytes::from),
                deflated.map(Bytes::from),
            )
        }
        FromWorker::JoinAccepted { room, conn } => registry.admit(&room, conn),
        FromWorker::Refused {
            room,
            conn,
            seq,
            kind,
            reason,
        } => registry.refused(&room, conn, seq, (kind, reason)),
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
        FromWorker::Drained {
            saved,
            unsaved,
            fallback,
        } => slot.answer_drain(DrainReport {
            saved,
            unsaved,
            lost: false,
            fallback,
        }),
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
                    .get_or_create(&Kind {
                        r#type: kind.label(),
                    })
                    .inc_by(n);
            }
            for (reason, n) in ignored {
                metrics
                    .frames_ignored
                    .get_or_create(&Why {
                        reason: reason.label(),
                    })
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
                    result: outcome.label(),
                })
                .inc();
            if retry {
                metrics.save_retries.inc();
            }
            metrics.save_duration.observe(micros as f64 / 1e6);
            // "No board yet" is a backend's normal state, not a failing store.
            if outcome != contract::ipc::SaveResult::NoBoard {
                registry.save_finished(outcome == contract::ipc::SaveResult::Ok);
            }
        }
        FromWorker::RoomFailed { room } => {
            warn!(%worker, %room, "room closed: its stored board cannot be read");
            registry.room_failed(&room, worker);
        }
        FromWorker::Hello { .. } => warn!(%worker, "unexpected second hello from worker"),
        // A replacement's answer to its settings (not awaited: see `lifecycle`).
        FromWorker::Configured { .. } => {}
        FromWorker::StoreUnusable { error } => {
            error!(%worker, %error, "the replacement worker cannot use the store; it exits and is restarted")
        }
    }
}
