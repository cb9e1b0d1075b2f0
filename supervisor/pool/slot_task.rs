//! A worker slot's task: it owns the slot's rooms ([`SlotRooms`]) for the
//! server's life, takes the sessions' events from the slot's inbox, reads the
//! running worker's replies, and drives the restores of a failed worker's
//! rooms. It never waits on a send (frames go to the writer through an
//! unbounded queue, bounded by what the sessions charge), so reading the
//! worker never waits on writing to it. The process's life (spawn, writer,
//! pings, kill) is `lifecycle`'s; it tells this task through [`Control`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tracing::info;

use super::link::{LinkEnd, PING_ROOM, Reader};
use super::{DrainReport, WorkerSlot, lock};
use crate::metrics::{Kind, Metrics, Outcome, Why};
use crate::rooms::{Registry, RoomSalvage, SlotInboxReceiver, SlotRooms};
use contract::ipc::{FromWorker, RoomId, WorkerId};

/// Sessions' events handled before the worker's socket is looked at again.
const EVENTS_PER_TURN: usize = 256;

/// What the slot's process life tells its task.
pub(super) enum Control {
    /// A worker process is ready: read its replies (until the socket ends,
    /// told through `ended`) and restore the rooms it inherits, each waiting
    /// at most `restore_wait` for its answer.
    Attach {
        reader: Reader,
        ended: oneshot::Sender<LinkEnd>,
        restore_wait: Duration,
    },
    /// The process ended: stop reading it; answers which restores it had
    /// started reading and not answered.
    Detach(oneshot::Sender<Vec<RoomId>>),
    /// The process failed: blame and suspect these rooms, and restore every
    /// room on its replacement; answers the rooms to restore and those closed
    /// as poison.
    Failed {
        blamed: Vec<RoomId>,
        suspected: Vec<RoomId>,
        answer: oneshot::Sender<(Vec<RoomId>, Vec<RoomSalvage>)>,
    },
}

/// The process currently read.
struct Attached {
    reader: Reader,
    ended: oneshot::Sender<LinkEnd>,
}

/// Runs the slot's task for the server's life (until every room handle and
/// the registry are gone).
pub(super) async fn run(
    mut rooms: SlotRooms,
    mut inbox: SlotInboxReceiver,
    mut control: mpsc::UnboundedReceiver<Control>,
    slot: Arc<WorkerSlot>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
) {
    let mut attached: Option<Attached> = None;
    // The lifecycle task ends at the stop (or when its worker ended during
    // it); this task goes on: the stop's salvage asks it what to replay, and
    // sessions still leave.
    let mut controlled = true;
    loop {
        let deadline = rooms.restore_deadline();
        tokio::select! {
            event = inbox.recv() => {
                let Some(event) = event else { return };
                contained(slot.id, "a session's event", || rooms.event(event));
                // What else is queued, up to a bound, before looking again.
                for _ in 1..EVENTS_PER_TURN {
                    let Ok(event) = inbox.try_recv() else { break };
                    contained(slot.id, "a session's event", || rooms.event(event));
                }
            }
            command = control.recv(), if controlled => match command {
                None => controlled = false,
                Some(Control::Attach { reader, ended, restore_wait }) => {
                    attached = Some(Attached { reader, ended });
                    rooms.start_restores(restore_wait);
                }
                Some(Control::Detach(answer)) => {
                    attached = None;
                    let _ = answer.send(rooms.restores_taken());
                }
                Some(Control::Failed { blamed, suspected, answer }) => {
                    attached = None;
                    slot.restoring.store(true, Ordering::Relaxed);
                    let _ = answer.send(rooms.worker_failed(&blamed, &suspected));
                }
            },
            frame = async { attached.as_mut().expect("guarded").reader.next().await }, if attached.is_some() => {
                let end = match frame {
                    Some(Ok(message)) => {
                        if matches!(&message, FromWorker::Snapshot { deflated: Some(_), .. }) {
                            metrics.snapshots_compressed.inc();
                        }
                        let other = contained(slot.id, "a worker's reply", || rooms.worker_message(message));
                        if let Some(other) = other.flatten() {
                            reply(other, &slot, &registry, &metrics);
                        }
                        None
                    }
                    Some(Err(e)) => Some(LinkEnd::Read(e)),
                    None => Some(LinkEnd::Closed),
                };
                if let Some(end) = end
                    && let Some(gone) = attached.take()
                {
                    let _ = gone.ended.send(end);
                }
            }
            () = async {
                tokio::time::sleep_until(deadline.expect("guarded").into()).await
            }, if deadline.is_some() => rooms.restores_overdue(Instant::now()),
        }
        if !rooms.restoring() && attached.is_some() {
            slot.restoring.store(false, Ordering::Relaxed);
        }
    }
}

/// Runs one step of the rooms' code; a panic in it (a bug) is logged and
/// contained, as a panic under a lock was before the slot's task owned the
/// rooms: the slot's other rooms go on rather than freeze with its task.
fn contained<T>(worker: WorkerId, what: &str, step: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)) {
        Ok(done) => Some(done),
        Err(_) => {
            tracing::error!(%worker, "a bug: handling {what} panicked; the slot's rooms go on");
            None
        }
    }
}

/// Handles a reply of the worker that is not about one room's state.
fn reply(message: FromWorker, slot: &WorkerSlot, registry: &Registry, metrics: &Metrics) {
    let worker = slot.id;
    match message {
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
        FromWorker::Stats {
            frames, ignored, ..
        } => {
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
        FromWorker::Hello { .. } => tracing::warn!(%worker, "unexpected second hello from worker"),
        // A replacement's answer to its settings (not awaited: see `lifecycle`).
        FromWorker::Configured { .. } => {}
        FromWorker::StoreUnusable { error } => {
            tracing::error!(%worker, %error, "the replacement worker cannot use the store; it exits and is restarted")
        }
        // Room replies are the rooms' (see `SlotRooms::worker_message`).
        _ => {}
    }
}
