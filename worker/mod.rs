//! A room worker: a separate OS process that owns the state of the rooms the
//! supervisor placed on it. It reads stamped events from its IPC socket, applies
//! them, and answers with join verdicts and snapshots. It exits when the socket
//! closes, so it never outlives its supervisor.

pub mod room;

use std::collections::HashMap;

use anyhow::{Context, bail};
use futures_util::{FutureExt, SinkExt, StreamExt};
use indexmap::IndexSet;
use interprocess::local_socket::tokio::Stream as LocalStream;
use interprocess::local_socket::{GenericNamespaced, ToNsName, traits::tokio::Stream as _};
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{debug, info, warn};

use crate::config::{WORKER_NONCE_ENV, WorkerArgs};
use crate::ipc::{FromWorker, IPC_VERSION, IpcCodec, RoomId, ToWorker};
use room::{Effect, Ignored, Room};

/// Frames applied before pending snapshots are encoded and sent. Batching lets a
/// burst of events produce one snapshot per room; the bound keeps latency low.
const MAX_BATCH: usize = 256;

/// Entry point of `session-server worker`.
pub fn main(args: WorkerArgs) -> anyhow::Result<()> {
    // One thread per worker: workers are the unit of parallelism.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

type Reader = FramedRead<tokio::io::ReadHalf<LocalStream>, IpcCodec<ToWorker, FromWorker>>;
type Writer = FramedWrite<tokio::io::WriteHalf<LocalStream>, IpcCodec<ToWorker, FromWorker>>;

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let nonce: u64 = std::env::var(WORKER_NONCE_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .context("worker started without its handshake nonce (it is started by the supervisor, not by hand)")?;
    serve(args, nonce).await
}

/// Connects to the supervisor, checks its hello, then applies frames until the
/// socket closes.
async fn serve(args: WorkerArgs, nonce: u64) -> anyhow::Result<()> {
    let worker_id = args.worker_id();
    let span = tracing::info_span!("worker", id = %worker_id, pid = std::process::id());
    let _enter = span.enter();
    let name = args.ipc.as_str().to_ns_name::<GenericNamespaced>()?;
    let stream = LocalStream::connect(name)
        .await
        .with_context(|| format!("connecting to supervisor socket {}", args.ipc))?;
    let (read_half, write_half) = tokio::io::split(stream);
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
    info!("worker ready");

    let mut state = WorkerState::default();
    loop {
        let first = match reader.next().await {
            Some(frame) => frame.context("reading from supervisor")?,
            None => {
                info!(
                    rooms = state.rooms.len(),
                    "supervisor closed the socket; exiting"
                );
                return Ok(());
            }
        };
        state.handle(first);
        for _ in 1..MAX_BATCH {
            match reader.next().now_or_never() {
                Some(Some(frame)) => state.handle(frame.context("reading from supervisor")?),
                _ => break,
            }
        }
        for msg in state.drain_output() {
            writer.feed(msg).await?;
        }
        writer.flush().await?;
    }
}

/// Everything a worker holds, changed only by [`WorkerState::handle`].
#[derive(Default)]
struct WorkerState {
    rooms: HashMap<RoomId, Room>,
    /// Replies produced by the current batch, in order.
    replies: Vec<FromWorker>,
    /// Rooms changed by the current batch; each gets one snapshot after it.
    dirty: IndexSet<RoomId>,
    /// Client frames ignored as invalid, since start (logged at debug).
    ignored_frames: u64,
}

impl WorkerState {
    fn handle(&mut self, frame: ToWorker) {
        match frame {
            ToWorker::Hello { .. } => warn!("unexpected second hello from supervisor"),
            ToWorker::OpenRoom { room, id_seed } => {
                debug!(%room, "room opened");
                if self.rooms.contains_key(&room) {
                    warn!(%room, "room opened twice; keeping its state");
                } else {
                    self.rooms.insert(room.clone(), Room::new(room, id_seed));
                }
            }
            ToWorker::CloseRoom { room } => {
                if let Some(r) = self.rooms.remove(&room) {
                    debug!(%room, members = r.member_count(), "room closed");
                }
                self.dirty.shift_remove(&room);
                self.replies.push(FromWorker::RoomClosed { room });
            }
            ToWorker::Event(stamped) => {
                let Some(room) = self.rooms.get_mut(&stamped.room) else {
                    // Left over in the queue from a worker that failed; dropped.
                    debug!(room = %stamped.room, seq = stamped.seq, "event for a room this worker does not hold");
                    return;
                };
                let conn = match &stamped.event {
                    crate::ipc::RoomEvent::Join { conn, .. }
                    | crate::ipc::RoomEvent::Leave { conn }
                    | crate::ipc::RoomEvent::Message { conn, .. } => *conn,
                };
                match room.apply(&stamped) {
                    Effect::Joined => {
                        self.replies.push(FromWorker::JoinAccepted {
                            room: stamped.room.clone(),
                            conn,
                        });
                        self.dirty.insert(stamped.room);
                    }
                    Effect::Rejected(reason) => {
                        info!(room = %stamped.room, %conn, ?reason, "join refused");
                        self.replies.push(FromWorker::JoinRejected {
                            room: stamped.room,
                            conn,
                            reason,
                        });
                    }
                    Effect::Changed => {
                        self.dirty.insert(stamped.room);
                    }
                    Effect::Ignored(Ignored::NotAMember) => {}
                    Effect::Ignored(why) => {
                        self.ignored_frames += 1;
                        debug!(room = %stamped.room, %conn, ?why, total = self.ignored_frames, "client frame ignored");
                    }
                }
            }
        }
    }

    /// The batch's replies followed by one snapshot per changed room.
    fn drain_output(&mut self) -> Vec<FromWorker> {
        let mut out = std::mem::take(&mut self.replies);
        for room_id in self.dirty.drain(..) {
            if let Some(room) = self.rooms.get(&room_id) {
                out.push(FromWorker::Snapshot {
                    json: room.snapshot_json(),
                    room: room_id,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::WorkerId;
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
