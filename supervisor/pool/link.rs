//! The IPC link to one worker process: the framed socket, the writer that
//! batches queued frames onto it, and the pings that tell a live worker from a
//! stuck one. (Its replies are read by the slot's task: `slot_task`.)

use crate::worker_queue::WorkerFrames;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::SinkExt;
use interprocess::local_socket::tokio::Stream as LocalStream;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{error, warn};

use super::{WorkerSlot, lock};
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
pub(super) const PING_ROOM: &str = "";

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
/// write, pings ahead of the queue.
pub(super) async fn write_frames(
    frames: &mut WorkerFrames,
    pings: &mut mpsc::Receiver<ToWorker>,
    writer: &mut Writer,
) -> LinkEnd {
    loop {
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
        for frame in batch {
            if let Err(e) = writer.feed(frame).await {
                return LinkEnd::Write(e);
            }
        }
        if let Err(e) = writer.flush().await {
            return LinkEnd::Write(e);
        }
    }
}
