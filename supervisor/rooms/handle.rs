//! What a session holds of its room: [`RoomHandle`].

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use super::fanout::Batches;
use super::lock;
use super::room::{Holder, RoomEntry};
use contract::ipc::{ConnId, RoomEvent, RoomId, ToWorker, WorkerId};
use contract::protocol::{CLOSE_REPLACED, REASON_REPLACED};

/// How long the memory budget waits for room in a worker's queue per room.
pub const BUDGET_SEND_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// The room's worker has gone (process failed or server stopping).
#[derive(Debug, thiserror::Error)]
#[error("the room's worker is gone")]
pub struct RoomLost;

/// A connection's room, as its session uses it: join, forward the client's
/// frames, leave, and answer or ask whether the user's other connection is
/// alive. Returned by [`Registry::register`](super::Registry::register).
///
/// It holds the room, which holds its worker's queue (the slot's, which
/// outlives the worker's processes), so a session never looks a worker up.
/// One pointer: every connection keeps one for its whole life.
///
/// Each call stamps and queues its frames under the room's lock, after
/// reserving their queue slots (see the [module](super) docs). Forwarding
/// waits while the worker's queue is full: backpressure on this client only.
pub struct RoomHandle(pub(super) Arc<RoomEntry>);

impl RoomHandle {
    pub(super) fn new(entry: Arc<RoomEntry>) -> RoomHandle {
        RoomHandle(entry)
    }

    /// The room's id.
    pub fn id(&self) -> &RoomId {
        &self.0.id
    }

    /// `bytes` were written to one of its members (the monitor's rates).
    pub fn sent(&self, bytes: usize) {
        self.0
            .traffic
            .bytes_out
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The worker the room is placed on.
    pub fn worker(&self) -> WorkerId {
        self.0.worker
    }

    /// Whether another joined connection holds `conn`'s user in the room; if so,
    /// asks that connection's session to ping its client at once (unless a probe
    /// is already out: then this connection waits for the same answer).
    pub fn probe_holder(&self, conn: ConnId) -> Holder {
        let mut state = lock(&self.0.state);
        let Some(user_id) = state.conns.get(&conn).map(|m| m.user_id.clone()) else {
            return Holder::None;
        };
        let holder = state
            .conns
            .iter_mut()
            .find(|(c, m)| **c != conn && m.joined && m.user_id == user_id);
        let Some((&holder, member)) = holder else {
            return Holder::None;
        };
        let answer = match &member.probe {
            Some(probe) => probe.subscribe(),
            None => {
                let (probe, answer) = tokio::sync::watch::channel(false);
                member.probe = Some(probe);
                member
                    .state
                    .send_modify(|s| s.probes = s.probes.wrapping_add(1));
                answer
            }
        };
        Holder::Probed {
            conn: holder,
            answer,
        }
    }

    /// Whether `conn` is (still) a joined member of the room.
    pub fn is_joined(&self, conn: ConnId) -> bool {
        lock(&self.0.state)
            .conns
            .get(&conn)
            .is_some_and(|m| m.joined)
    }

    /// The session's client was heard from: answers the probe, if one is out.
    pub fn alive(&self, conn: ConnId) {
        let mut state = lock(&self.0.state);
        if let Some(probe) = state.conns.get_mut(&conn).and_then(|m| m.probe.take()) {
            probe.send_replace(true);
        }
    }

    /// Sends the connection's join to the room's worker, opening the room there
    /// first if it is not open. With `replace`, that connection (the same user's,
    /// found silent) leaves the room first and is closed with
    /// [`CLOSE_REPLACED`]: the room lists the user once.
    pub async fn join(&self, conn: ConnId, replace: Option<ConnId>) -> Result<(), RoomLost> {
        let entry = &*self.0;
        let mut permits = entry.queue.reserve_many(3).await.map_err(|_| RoomLost)?;
        let mut state = lock(&entry.state);
        if state.lost {
            return Err(RoomLost);
        }
        let Some((user_id, v2, deflate)) = state
            .conns
            .get(&conn)
            .map(|m| (m.user_id.to_string(), m.v2, m.deflate))
        else {
            return Err(RoomLost);
        };
        if let Some(old) = replace
            && let Some(member) = state.conns.get_mut(&old).filter(|m| m.joined)
        {
            member.joined = false;
            member.close(CLOSE_REPLACED, REASON_REPLACED);
            state.joined -= 1;
            let leave = state
                .recovery
                .stamp(&entry.id, RoomEvent::Leave { conn: old });
            if !state.recovery.restoring {
                permits.next().expect("reserved").send(leave);
            }
        }
        if !state.open {
            state.open = true;
            // A room being restored, or still closing on its worker, keeps its
            // instance: a rejoin must not drop the checkpoint and journal that
            // rebuild it.
            let id_seed = if state.closing == 0 && !state.recovery.restoring {
                state.recovery.new_instance()
            } else {
                state.recovery.id_seed
            };
            if !state.recovery.restoring {
                let open = ToWorker::OpenRoom {
                    room: entry.id.clone(),
                    id_seed,
                };
                permits.next().expect("reserved").send(open);
            }
        }
        let join = state.recovery.stamp(
            &entry.id,
            RoomEvent::Join {
                conn,
                user_id,
                v2,
                deflate,
            },
        );
        state.joined += 1;
        if let Some(member) = state.conns.get_mut(&conn) {
            member.joined = true;
        }
        if !state.recovery.restoring {
            permits.next().expect("reserved").send(join);
        }
        Ok(())
    }

    /// Forwards a client's text frame to the room's worker. Waits while the
    /// worker's queue is full (backpressure on this client only).
    pub async fn forward(&self, conn: ConnId, text: String) -> Result<(), RoomLost> {
        let entry = &*self.0;
        // Its bytes first (see `worker_queue`), then its place.
        let charge = entry.queue.charge(text.len()).await.map_err(|_| RoomLost)?;
        let permit = entry.queue.reserve().await.map_err(|_| RoomLost)?;
        let mut state = lock(&entry.state);
        if state.lost {
            return Err(RoomLost);
        }
        if !state.conns.get(&conn).is_some_and(|m| m.joined) {
            // Replaced by a newer connection of its user; its session is closing.
            return Ok(());
        }
        entry.traffic.messages_in.fetch_add(1, Ordering::Relaxed);
        let frame = state
            .recovery
            .stamp(&entry.id, RoomEvent::Message { conn, text });
        if !state.recovery.restoring {
            permit.send(frame);
            charge.sent();
            if std::mem::take(&mut state.recovery.checkpoint_wanted) {
                // Best effort: if the queue is full, the journal asks again later.
                let _ = entry.queue.try_send(ToWorker::CheckpointRequest {
                    room: entry.id.clone(),
                });
            }
        }
        Ok(())
    }

    /// Tells the room's worker that the memory budget refuses new shapes
    /// (`full`), or no longer, as a stamped event (see
    /// [`RoomEvent::MemoryBudget`]). Waits at most [`BUDGET_SEND_WAIT`] for
    /// room in the worker's queue: a stuck worker (replaced within seconds)
    /// must not hold up the budget's other rooms; its room misses this verdict
    /// (it keeps its last one, and is told the next).
    pub async fn memory_budget(&self, full: bool) {
        let entry = &*self.0;
        let Ok(Ok(permit)) = tokio::time::timeout(BUDGET_SEND_WAIT, entry.queue.reserve()).await
        else {
            tracing::warn!(room = %entry.id, full, "memory budget: the room's worker queue is full; this verdict is not sent to it");
            return;
        };
        let mut state = lock(&entry.state);
        if state.lost {
            return;
        }
        let frame = state
            .recovery
            .stamp(&entry.id, RoomEvent::MemoryBudget { full });
        if !state.recovery.restoring {
            permit.send(frame);
        }
    }

    /// Removes a connection from its room. If it is joined, the worker is told,
    /// and the last leave closes the room on the worker.
    pub async fn leave(&self, conn: ConnId) {
        let entry = &self.0;
        let permits = entry.queue.reserve_many(2).await.ok();
        let table = entry.table.upgrade();
        let mut table = table.as_deref().map(lock);
        let mut state = lock(&entry.state);
        let joined = state.conns.remove(&conn).is_some_and(|m| m.joined);
        if let (true, false, Some(mut permits)) = (joined, state.lost, permits) {
            let leave = state.recovery.stamp(&entry.id, RoomEvent::Leave { conn });
            if !state.recovery.restoring {
                permits.next().expect("reserved").send(leave);
            }
            state.joined -= 1;
            if state.joined == 0 && state.open {
                state.open = false;
                if !state.recovery.restoring {
                    // While restoring, the restore sends the close when done.
                    state.closing += 1;
                    let close = ToWorker::CloseRoom {
                        room: entry.id.clone(),
                    };
                    permits.next().expect("reserved").send(close);
                }
            }
        }
        if let Some(table) = table.as_mut() {
            table.remove_if_done(entry, &state);
        }
    }

    /// The session of `conn` negotiated permessage-deflate: its join (sent
    /// after this) asks the worker for compressed snapshots too.
    pub fn deflate_session(&self, conn: ConnId) {
        if let Some(member) = lock(&self.0.state).conns.get_mut(&conn) {
            member.deflate = true;
        }
    }

    /// The v2 session of `conn` starts (`true`: before its join, so that the
    /// join tells the worker to record ops) or ends (`false`).
    pub fn v2_session(&self, conn: ConnId, starts: bool) {
        let entry = &self.0;
        if starts {
            if let Some(member) = lock(&entry.state).conns.get_mut(&conn) {
                member.v2 = true;
            }
            entry.v2_sessions.fetch_add(1, Ordering::Relaxed);
        } else if entry.v2_sessions.fetch_sub(1, Ordering::Relaxed) == 1 {
            // The last v2 member left: its batches would only hold memory
            // (a room is not pushed any while it has none; a push after a gap
            // starts a new chain).
            lock(&entry.batches).clear();
        }
    }

    /// The room's recent ops batches (see [`Batches::between`]).
    pub fn batches(&self) -> MutexGuard<'_, Batches> {
        lock(&self.0.batches)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::rooms::Membership;

    #[tokio::test]
    async fn a_silent_holder_of_the_user_is_replaced_in_one_step() {
        let (registry, mut frames) = registry(1, 1, 1);
        let rx = &mut frames[0];
        let (handle, old_rx) = joined(&registry, "a", 1).await;
        let (new_tx, _new_rx) = commands();
        registry
            .register(&room("a"), ConnId(2), "u".into(), new_tx)
            .unwrap();
        let Holder::Probed { conn, answer } = handle.probe_holder(ConnId(2)) else {
            panic!("the first connection holds the user");
        };
        assert_eq!(conn, ConnId(1));
        assert_eq!(old_rx.borrow().probes, 1);
        drop(answer);
        handle.join(ConnId(2), Some(ConnId(1))).await.unwrap();
        assert!(matches!(
            old_rx.borrow().membership,
            Membership::Closed { code: 4000, .. }
        ));
        let mut frames = Vec::new();
        while let Ok(f) = rx.try_recv() {
            frames.push(f);
        }
        let events: Vec<RoomEvent> = frames
            .into_iter()
            .filter_map(|f| match f {
                ToWorker::Event(s) => Some(s.event),
                _ => None,
            })
            .collect();
        assert_eq!(
            events,
            [
                RoomEvent::Join {
                    conn: ConnId(1),
                    user_id: "u".into(),
                    v2: false,
                    deflate: false,
                },
                RoomEvent::Leave { conn: ConnId(1) },
                RoomEvent::Join {
                    conn: ConnId(2),
                    user_id: "u".into(),
                    v2: false,
                    deflate: false,
                },
            ]
        );
        // The replaced connection's own leave later changes nothing.
        handle.leave(ConnId(1)).await;
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn newcomers_share_one_probe_and_a_replaced_connection_stays_closed() {
        let (registry, _frames) = registry(1, 1, 1);
        let (old_tx, old_rx) = commands();
        let handle = registry
            .register(&room("a"), ConnId(1), "u".into(), old_tx)
            .unwrap();
        // Its join is stamped but the worker has not admitted it yet.
        handle.join(ConnId(1), None).await.unwrap();
        for conn in [2, 3] {
            registry
                .register(&room("a"), ConnId(conn), "u".into(), commands().0)
                .unwrap();
        }
        let (Holder::Probed { answer: mut a, .. }, Holder::Probed { answer: mut b, .. }) = (
            handle.probe_holder(ConnId(2)),
            handle.probe_holder(ConnId(3)),
        ) else {
            panic!("both find the first connection");
        };
        // One ping for both.
        assert_eq!(old_rx.borrow().probes, 1);
        handle.alive(ConnId(1));
        assert!(*a.wait_for(|alive| *alive).await.unwrap());
        assert!(*b.wait_for(|alive| *alive).await.unwrap());

        // Replaced before the worker's verdict: the late admission does not reopen it.
        handle.join(ConnId(2), Some(ConnId(1))).await.unwrap();
        registry.admit(&room("a"), ConnId(1));
        assert!(matches!(
            old_rx.borrow().membership,
            Membership::Closed { code: 4000, .. }
        ));
    }
}
