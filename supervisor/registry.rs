//! Room placement and lifecycle, as the supervisor sees it: which worker owns each
//! room, which connections are in it, and the stamping of every frame forwarded to
//! the worker. It never looks inside room state.
//!
//! Ordering: every frame for a room is stamped and queued to its worker while the
//! room's lock is held, so sequence numbers follow queue order, and `OpenRoom` /
//! `CloseRoom` are decided together with the joins and leaves they depend on.
//! Queue slots are reserved *before* taking the lock (reserving may wait), so no
//! lock is ever held across an `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::journal::{Journal, Recorded};
use crate::ipc::{
    ConnId, JoinRejection, RoomEvent, RoomId, RoomSummary, Stamped, ToWorker, WorkerId,
};
use crate::protocol::{
    CLOSE_INTERNAL_ERROR, CLOSE_POLICY, CLOSE_REPLACED, REASON_REPLACED, unix_time_ms,
};

/// The newest snapshot of a room, shared by all its members (one encoding, one
/// allocation; each member clones a reference).
pub type SnapshotCell = Option<Published>;

/// A snapshot as published to a room's members.
#[derive(Clone, Debug)]
pub struct Published {
    /// The snapshot's JSON, shared by every member's session.
    pub message: Bytes,
    /// When the supervisor received it (for the fan-out latency).
    pub at: Instant,
    /// Counts the room's snapshots, so a member can tell how many it skipped.
    pub version: u64,
}

/// Batches of protocol v2 ops kept per room: at most this many…
const MAX_BATCHES: usize = 64;
/// …and this many bytes. A v2 member further behind gets a snapshot.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// A room's recent ops batches (see `FromWorker::Snapshot`), one per published
/// version, so that a v2 member that missed some versions gets their ops
/// instead of a snapshot. Kept only while the room has v2 members.
#[derive(Debug, Default)]
pub struct Batches {
    /// The snapshot of this version cannot be reached by ops from an earlier
    /// one (the room was new or restored, or no batches were kept before it).
    base: u64,
    /// Ops of versions `base + 1 ..`, consecutive, oldest first.
    entries: VecDeque<(u64, Bytes)>,
    bytes: usize,
}

impl Batches {
    /// Records the ops that lead to `version` (`None`: none do).
    fn push(&mut self, version: u64, ops: Option<Bytes>) {
        let Some(ops) = ops else {
            self.reset(version);
            return;
        };
        if self.entries.back().map_or(self.base, |(v, _)| *v) + 1 != version {
            self.reset(version - 1);
        }
        self.bytes += ops.len();
        self.entries.push_back((version, ops));
        while self.entries.len() > MAX_BATCHES || self.bytes > MAX_BATCH_BYTES {
            let (v, dropped) = self.entries.pop_front().expect("not empty");
            self.bytes -= dropped.len();
            self.base = v;
        }
    }

    fn reset(&mut self, base: u64) {
        self.base = base;
        self.entries.clear();
        self.bytes = 0;
    }

    /// The batches that lead from version `from` to version `to`, if all are
    /// kept and together smaller than `limit` bytes.
    pub fn between(&self, from: u64, to: u64, limit: usize) -> Option<Vec<Bytes>> {
        let first = self.entries.front()?.0;
        if from < self.base || from + 1 < first || to < from {
            return None;
        }
        let start = (from + 1 - first) as usize;
        let count = (to - from) as usize;
        if start + count > self.entries.len() {
            return None;
        }
        let mut bytes = 0;
        let mut out = Vec::with_capacity(count);
        for (_, ops) in self.entries.range(start..start + count) {
            bytes += ops.len() + 1;
            if bytes > limit {
                return None;
            }
            out.push(ops.clone());
        }
        Some(out)
    }
}

/// What the supervisor tells a connection's session: its membership, which only
/// moves forward (pending → admitted → closed), and how many times a newer
/// connection of the same user asked whether this one is still alive. A `watch`
/// carries it: a session that sees only the last value has missed nothing it
/// needs. (A `watch` costs a few hundred bytes per connection; an `mpsc` channel
/// allocates a 32-slot block.)
#[derive(Debug, Clone)]
pub struct ConnState {
    pub membership: Membership,
    /// Bumped to ask the session to ping its client at once; the session answers
    /// with [`Registry::alive`] when its client is next heard from.
    pub probes: u32,
}

impl ConnState {
    pub fn pending() -> ConnState {
        ConnState {
            membership: Membership::Pending,
            probes: 0,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Membership {
    /// Waiting for the worker to admit the join.
    Pending,
    /// The worker admitted the join: from now on, send the room's snapshots.
    Admitted(watch::Receiver<SnapshotCell>),
    /// Close the connection with this code and reason.
    Closed { code: u16, reason: &'static str },
}

/// The registry's end of a connection's [`ConnState`].
pub type ConnStateSender = watch::Sender<ConnState>;

/// A room blamed for this many worker crashes within [`POISON_WINDOW`] is closed.
pub const POISON_CRASHES: usize = 3;
pub const POISON_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlacementError {
    #[error("no capacity for a new room: every worker holds its maximum of {0} rooms")]
    AllWorkersFull(usize),
    #[error("no capacity for a new room: the server holds its maximum of {0} rooms")]
    AtCapacity(usize),
}

/// The room's worker has gone (process failed or server stopping).
#[derive(Debug, thiserror::Error)]
#[error("the room's worker is gone")]
pub struct RoomLost;

/// Rooms placed on this server: now, and since it started (so that a room that
/// opened and closed between two looks is still seen).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Placed {
    pub now: usize,
    pub opened: u64,
}

pub struct Registry {
    inner: Mutex<Inner>,
    rooms_per_worker: usize,
    /// Total rooms across workers.
    max_rooms: usize,
    /// Whether the store keeps refusing saves (for `/readyz`).
    save_health: Mutex<SaveHealth>,
    /// Per worker: it does not answer pings right now. New rooms go elsewhere
    /// while another worker has room (this one is replaced within seconds, and a
    /// room placed on it would wait for that).
    unresponsive: Vec<std::sync::atomic::AtomicBool>,
}

/// Saves failing with none succeeding for this long make `/readyz` answer 503:
/// longer than a blip (a failed save is retried after 0.5, 1, 2, 4 s…), short
/// enough that an orchestrator stops sending rooms to a server that cannot keep them.
pub const SAVES_FAILING_UNREADY_AFTER: Duration = Duration::from_secs(10);
/// A failure older than this no longer counts (no room is left retrying: they
/// were saved elsewhere or freed); it is above the 30 s cap of save retries.
const SAVE_FAILURE_FORGOTTEN_AFTER: Duration = Duration::from_secs(45);

#[derive(Default)]
struct SaveHealth {
    /// First failed save since the last success.
    failing_since: Option<Instant>,
    last_failure: Option<Instant>,
}

struct Inner {
    rooms: HashMap<RoomId, Arc<RoomEntry>>,
    /// Rooms placed on each worker (open or still closing).
    load: Vec<usize>,
    /// Rooms placed now and ever, told on every change (the Agones lifecycle).
    placed: watch::Sender<Placed>,
}

/// A room placed on a worker. Lives from its first connection until every
/// connection has gone and the worker has confirmed the room is freed.
pub struct RoomEntry {
    pub id: RoomId,
    pub worker: WorkerId,
    snapshots: watch::Sender<SnapshotCell>,
    /// Sessions of the room that speak protocol v2; while there are none, no
    /// ops batches are kept.
    v2_sessions: AtomicUsize,
    batches: Mutex<Batches>,
    state: Mutex<RoomState>,
}

impl RoomEntry {
    /// The v2 session of `conn` starts (`true`: before its join, so that the
    /// join tells the worker to record ops) or ends (`false`).
    pub fn v2_session(&self, conn: ConnId, starts: bool) {
        if starts {
            if let Some(member) = lock(&self.state).conns.get_mut(&conn) {
                member.v2 = true;
            }
            self.v2_sessions.fetch_add(1, Ordering::Relaxed);
        } else if self.v2_sessions.fetch_sub(1, Ordering::Relaxed) == 1 {
            // The last v2 member left: its batches would only hold memory
            // (a room is not pushed any while it has none; a push after a gap
            // starts a new chain).
            let mut batches = lock(&self.batches);
            let base = batches.base;
            batches.reset(base);
        }
    }

    /// The room's recent ops batches (see [`Batches::between`]).
    pub fn batches(&self) -> MutexGuard<'_, Batches> {
        lock(&self.batches)
    }
}

/// A connection registered for a room (joined or about to).
struct Member {
    /// The connection's session is told its state through this.
    state: ConnStateSender,
    /// From the token.
    user_id: Box<str>,
    /// A join was stamped for it and no leave since.
    joined: bool,
    /// Speaks protocol v2 (told to the worker with its join).
    v2: bool,
    /// Set while newer connections of the same user wait to learn whether this
    /// one is alive: set to true when its client is heard from, dropped when it
    /// leaves.
    probe: Option<watch::Sender<bool>>,
}

impl Member {
    fn close(&self, code: u16, reason: &'static str) {
        self.state
            .send_modify(|s| s.membership = Membership::Closed { code, reason });
    }
}

/// What a connection joining a room finds of its user.
pub enum Holder {
    /// The user is not in the room.
    None,
    /// Another connection holds the user's place: the receiver turns true if it
    /// is alive, and fails if it leaves.
    Probed {
        conn: ConnId,
        answer: watch::Receiver<bool>,
    },
}

#[derive(Default)]
struct RoomState {
    /// Connections registered for the room (joined or about to).
    conns: HashMap<ConnId, Member>,
    /// Joins sent to the worker and not yet followed by a leave.
    joined: usize,
    /// An `OpenRoom` was sent and no `CloseRoom` since.
    open: bool,
    /// `CloseRoom`s sent and not yet confirmed by the worker.
    closing: usize,
    /// Last sequence number stamped for this room.
    last_seq: u64,
    /// The room is gone (closed after repeated crashes, or not restorable); the
    /// entry is no longer in the map.
    lost: bool,
    /// Seed of the room's current instance on its worker.
    id_seed: u64,
    /// The worker's latest checkpoint: (last frame it covers, opaque image).
    checkpoint: Option<(u64, Vec<u8>)>,
    /// Every event stamped after the checkpoint, in order: with the checkpoint
    /// it rebuilds the room exactly if its worker fails.
    journal: Journal,
    /// The journal asked for a checkpoint; sent with the room's next frame.
    checkpoint_wanted: bool,
    /// The room's worker failed and the room is not restored yet: events are
    /// journaled but not sent.
    restoring: bool,
    /// Last journaled seq already sent to the replacement during a restore.
    restore_sent: u64,
    /// Worker crashes attributed to this room.
    blames: Vec<Instant>,
    /// The worker's latest summary of the room (for the monitor).
    summary: Option<RoomSummary>,
    /// Last event covered by a save the worker confirmed (0: none yet).
    saved_seq: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves consistent data here (every update is a
    // few assignments); keep serving rather than cascading the panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RoomState {
    /// Stamps an event and records it in the journal.
    fn stamp(&mut self, room: &RoomId, event: RoomEvent) -> ToWorker {
        self.last_seq += 1;
        let stamped = Stamped {
            room: room.clone(),
            seq: self.last_seq,
            time_ms: unix_time_ms(),
            event,
        };
        if self.journal.record(&stamped) == Recorded::WantsCheckpoint {
            self.checkpoint_wanted = true;
        }
        ToWorker::Event(stamped)
    }

    /// Starts a new instance of the room on its worker (not a reopening of one
    /// that is still closing, which keeps its state).
    fn new_instance(&mut self) -> u64 {
        self.id_seed = rand::random::<u64>();
        self.checkpoint = None;
        self.journal.clear();
        self.id_seed
    }
}

impl Registry {
    pub fn new(workers: usize, rooms_per_worker: usize, max_rooms: usize) -> Registry {
        Registry {
            inner: Mutex::new(Inner {
                rooms: HashMap::new(),
                load: vec![0; workers],
                placed: watch::Sender::new(Placed::default()),
            }),
            rooms_per_worker,
            max_rooms,
            save_health: Mutex::new(SaveHealth::default()),
            unresponsive: (0..workers)
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
        }
    }

    /// The watchdog's view of a worker: new rooms avoid it while it is silent.
    pub fn set_unresponsive(&self, worker: WorkerId, unresponsive: bool) {
        if let Some(flag) = self.unresponsive.get(worker.0 as usize) {
            flag.store(unresponsive, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A worker finished a save attempt (`ok`: written).
    pub fn save_finished(&self, ok: bool) {
        let mut health = lock(&self.save_health);
        if ok {
            *health = SaveHealth::default();
        } else {
            let now = Instant::now();
            health.failing_since.get_or_insert(now);
            health.last_failure = Some(now);
        }
    }

    /// How long saves have been failing with none succeeding, if the last
    /// failure is recent.
    pub fn saves_failing_for(&self) -> Option<Duration> {
        let health = lock(&self.save_health);
        let recent = health
            .last_failure
            .is_some_and(|t| t.elapsed() < SAVE_FAILURE_FORGOTTEN_AFTER);
        health
            .failing_since
            .filter(|_| recent)
            .map(|since| since.elapsed())
    }

    /// The worker gave up on `room` (its stored board cannot be read) and freed
    /// it: its members are closed with 1011 and the room is forgotten.
    pub fn room_failed(&self, room: &RoomId, worker: WorkerId) {
        let mut inner = lock(&self.inner);
        let Some(entry) = inner.rooms.get(room).cloned() else {
            return;
        };
        if entry.worker != worker {
            return;
        }
        let mut state = lock(&entry.state);
        close_room(
            &mut inner,
            &entry,
            &mut state,
            crate::protocol::REASON_BOARD_UNREADABLE,
        );
    }

    /// Rooms placed (open, closing or being restored).
    pub fn room_count(&self) -> usize {
        lock(&self.inner).rooms.len()
    }

    /// The rooms placed, told on every change.
    pub fn placed_rooms(&self) -> watch::Receiver<Placed> {
        lock(&self.inner).placed.subscribe()
    }

    /// The most rooms this server holds at once (`--max-rooms`).
    pub fn max_rooms(&self) -> usize {
        self.max_rooms
    }

    /// Registers a connection for `room`, placing the room on the least loaded
    /// worker with capacity if it is not placed yet. Called before the WebSocket
    /// upgrade, so a refusal can still be an HTTP status.
    pub fn register(
        &self,
        room: &RoomId,
        conn: ConnId,
        user_id: String,
        state: ConnStateSender,
    ) -> Result<Arc<RoomEntry>, PlacementError> {
        let member = Member {
            state,
            user_id: user_id.into(),
            joined: false,
            v2: false,
            probe: None,
        };
        let mut inner = lock(&self.inner);
        if let Some(entry) = inner.rooms.get(room) {
            lock(&entry.state).conns.insert(conn, member);
            return Ok(entry.clone());
        }
        if inner.rooms.len() >= self.max_rooms {
            return Err(PlacementError::AtCapacity(self.max_rooms));
        }
        // The least loaded worker with room, preferring those answering pings.
        let silent = |w: usize| self.unresponsive[w].load(std::sync::atomic::Ordering::Relaxed);
        let worker = (0..inner.load.len())
            .filter(|&w| inner.load[w] < self.rooms_per_worker)
            .min_by_key(|&w| (silent(w), inner.load[w]))
            .ok_or(PlacementError::AllWorkersFull(self.rooms_per_worker))?;
        inner.load[worker] += 1;
        let entry = Arc::new(RoomEntry {
            id: room.clone(),
            worker: WorkerId(worker as u32),
            snapshots: watch::Sender::new(None),
            v2_sessions: AtomicUsize::new(0),
            batches: Mutex::default(),
            state: Mutex::new(RoomState::default()),
        });
        lock(&entry.state).conns.insert(conn, member);
        inner.rooms.insert(room.clone(), entry.clone());
        let now = inner.rooms.len();
        inner.placed.send_modify(|placed| {
            placed.now = now;
            placed.opened += 1;
        });
        Ok(entry)
    }

    /// Whether another joined connection holds `conn`'s user in the room; if so,
    /// asks that connection's session to ping its client at once (unless a probe
    /// is already out: then this connection waits for the same answer).
    pub fn probe_holder(&self, entry: &RoomEntry, conn: ConnId) -> Holder {
        let mut state = lock(&entry.state);
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
                let (probe, answer) = watch::channel(false);
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
    pub fn is_joined(&self, entry: &RoomEntry, conn: ConnId) -> bool {
        lock(&entry.state)
            .conns
            .get(&conn)
            .is_some_and(|m| m.joined)
    }

    /// The session's client was heard from: answers the probe, if one is out.
    pub fn alive(&self, entry: &RoomEntry, conn: ConnId) {
        let mut state = lock(&entry.state);
        if let Some(probe) = state.conns.get_mut(&conn).and_then(|m| m.probe.take()) {
            probe.send_replace(true);
        }
    }

    /// Sends the connection's join to the room's worker, opening the room there
    /// first if it is not open. With `replace`, that connection (the same user's,
    /// found silent) leaves the room first and is closed with
    /// [`CLOSE_REPLACED`]: the room lists the user once.
    pub async fn join(
        &self,
        entry: &RoomEntry,
        worker: &mpsc::Sender<ToWorker>,
        conn: ConnId,
        replace: Option<ConnId>,
    ) -> Result<(), RoomLost> {
        let mut permits = worker.reserve_many(3).await.map_err(|_| RoomLost)?;
        let mut state = lock(&entry.state);
        if state.lost {
            return Err(RoomLost);
        }
        let Some((user_id, v2)) = state
            .conns
            .get(&conn)
            .map(|m| (m.user_id.to_string(), m.v2))
        else {
            return Err(RoomLost);
        };
        if let Some(old) = replace
            && let Some(member) = state.conns.get_mut(&old).filter(|m| m.joined)
        {
            member.joined = false;
            member.close(CLOSE_REPLACED, REASON_REPLACED);
            state.joined -= 1;
            let leave = state.stamp(&entry.id, RoomEvent::Leave { conn: old });
            if !state.restoring {
                permits.next().expect("reserved").send(leave);
            }
        }
        if !state.open {
            state.open = true;
            // A room being restored, or still closing on its worker, keeps its
            // instance: a rejoin must not drop the checkpoint and journal that
            // rebuild it.
            let id_seed = if state.closing == 0 && !state.restoring {
                state.new_instance()
            } else {
                state.id_seed
            };
            if !state.restoring {
                let open = ToWorker::OpenRoom {
                    room: entry.id.clone(),
                    id_seed,
                };
                permits.next().expect("reserved").send(open);
            }
        }
        let join = state.stamp(&entry.id, RoomEvent::Join { conn, user_id, v2 });
        state.joined += 1;
        if let Some(member) = state.conns.get_mut(&conn) {
            member.joined = true;
        }
        if !state.restoring {
            permits.next().expect("reserved").send(join);
        }
        Ok(())
    }

    /// Forwards a client's text frame to the room's worker. Waits while the
    /// worker's queue is full (backpressure on this client only).
    pub async fn forward(
        &self,
        entry: &RoomEntry,
        worker: &mpsc::Sender<ToWorker>,
        conn: ConnId,
        text: String,
    ) -> Result<(), RoomLost> {
        let permit = worker.reserve().await.map_err(|_| RoomLost)?;
        let mut state = lock(&entry.state);
        if state.lost {
            return Err(RoomLost);
        }
        if !state.conns.get(&conn).is_some_and(|m| m.joined) {
            // Replaced by a newer connection of its user; its session is closing.
            return Ok(());
        }
        let frame = state.stamp(&entry.id, RoomEvent::Message { conn, text });
        if !state.restoring {
            permit.send(frame);
            if std::mem::take(&mut state.checkpoint_wanted) {
                // Best effort: if the queue is full, the journal asks again later.
                let _ = worker.try_send(ToWorker::CheckpointRequest {
                    room: entry.id.clone(),
                });
            }
        }
        Ok(())
    }

    /// Removes a connection from its room. If it is joined, the worker is told,
    /// and the last leave closes the room on the worker.
    pub async fn leave(
        &self,
        entry: &Arc<RoomEntry>,
        worker: &mpsc::Sender<ToWorker>,
        conn: ConnId,
    ) {
        let permits = worker.reserve_many(2).await.ok();
        let mut inner = lock(&self.inner);
        let mut state = lock(&entry.state);
        let joined = state.conns.remove(&conn).is_some_and(|m| m.joined);
        if let (true, false, Some(mut permits)) = (joined, state.lost, permits) {
            let leave = state.stamp(&entry.id, RoomEvent::Leave { conn });
            if !state.restoring {
                permits.next().expect("reserved").send(leave);
            }
            state.joined -= 1;
            if state.joined == 0 && state.open {
                state.open = false;
                if !state.restoring {
                    // While restoring, the restore sends the close when done.
                    state.closing += 1;
                    let close = ToWorker::CloseRoom {
                        room: entry.id.clone(),
                    };
                    permits.next().expect("reserved").send(close);
                }
            }
        }
        remove_if_done(&mut inner, entry, &state);
    }

    /// The worker admitted `conn`: subscribe it to the room's snapshots. Called in
    /// IPC order, so the subscription precedes the snapshot that shows the join.
    pub fn admit(&self, room: &RoomId, conn: ConnId) {
        self.tell(room, conn, |entry| {
            Membership::Admitted(entry.snapshots.subscribe())
        });
    }

    /// The worker refused `conn`: close it with 1008 and the reason.
    pub fn reject(&self, room: &RoomId, conn: ConnId, reason: JoinRejection) {
        self.tell(room, conn, |_| Membership::Closed {
            code: CLOSE_POLICY,
            reason: reason.close_reason(),
        });
    }

    /// Tells a joined connection's session the worker's verdict. A connection that
    /// was closed meanwhile (replaced, or its room lost) stays closed.
    fn tell(&self, room: &RoomId, conn: ConnId, membership: impl FnOnce(&RoomEntry) -> Membership) {
        let Some(entry) = lock(&self.inner).rooms.get(room).cloned() else {
            return;
        };
        let state = lock(&entry.state);
        if let Some(member) = state.conns.get(&conn).filter(|m| m.joined) {
            let membership = membership(&entry);
            member.state.send_if_modified(|s| {
                let open = !matches!(s.membership, Membership::Closed { .. });
                if open {
                    s.membership = membership;
                }
                open
            });
        }
    }

    /// Publishes the room's newest snapshot to its members, and for v2 members
    /// the ops that lead to it from the previous one (`None`: none do).
    pub fn publish(&self, room: &RoomId, snapshot: Bytes, ops: Option<Bytes>) {
        let entry = lock(&self.inner).rooms.get(room).cloned();
        if let Some(entry) = entry {
            entry.snapshots.send_modify(|cell| {
                let version = cell.as_ref().map_or(1, |p| p.version + 1);
                // Under the watch's lock, so batches are kept in version order.
                // Without v2 sessions, none are kept (nor locked): a v2
                // session counts itself before it joins, and its first message
                // is a snapshot; the first batch kept after a pause starts a
                // new chain (see `Batches::push`).
                if entry.v2_sessions.load(Ordering::Relaxed) > 0 {
                    lock(&entry.batches).push(version, ops);
                }
                *cell = Some(Published {
                    message: snapshot,
                    at: Instant::now(),
                    version,
                });
            });
        }
    }

    /// The worker answered a `CloseRoom`: the room is freed (`RoomClosed`), or
    /// stays because it was reopened first (`CloseCancelled`).
    pub fn close_resolved(&self, room: &RoomId, worker: WorkerId) {
        let mut inner = lock(&self.inner);
        let Some(entry) = inner.rooms.get(room).cloned() else {
            return;
        };
        if entry.worker != worker {
            return;
        }
        let mut state = lock(&entry.state);
        state.closing = state.closing.saturating_sub(1);
        remove_if_done(&mut inner, &entry, &state);
    }

    /// The worker keeps a checkpoint of the room (as of frame `seq`): events up
    /// to `seq` leave the journal.
    pub fn checkpoint(&self, room: &RoomId, worker: WorkerId, seq: u64, image: Vec<u8>) {
        let Some(entry) = lock(&self.inner).rooms.get(room).cloned() else {
            return;
        };
        if entry.worker != worker {
            return;
        }
        let mut state = lock(&entry.state);
        if state
            .checkpoint
            .as_ref()
            .is_some_and(|(have, _)| *have > seq)
        {
            return; // an older checkpoint overtaken by a newer one
        }
        state.journal.checkpointed(seq);
        state.checkpoint = Some((seq, image));
    }

    /// The worker saved `room` up to event `seq`.
    pub fn saved(&self, room: &RoomId, worker: WorkerId, seq: u64) {
        let Some(entry) = lock(&self.inner).rooms.get(room).cloned() else {
            return;
        };
        if entry.worker == worker {
            let mut state = lock(&entry.state);
            state.saved_seq = state.saved_seq.max(seq);
        }
    }

    /// Rooms on `worker` with events since their last confirmed save, sorted:
    /// those whose changes may be lost if the worker is lost now (a superset:
    /// joins and cursor moves count too, the supervisor does not read events).
    pub fn unconfirmed_rooms(&self, worker: WorkerId) -> Vec<RoomId> {
        let inner = lock(&self.inner);
        let mut rooms: Vec<RoomId> = inner
            .rooms
            .values()
            .filter(|e| e.worker == worker)
            .filter(|e| {
                let state = lock(&e.state);
                state.last_seq > state.saved_seq
            })
            .map(|e| e.id.clone())
            .collect();
        rooms.sort();
        rooms
    }

    /// The worker's process ended. Its rooms stay placed on its slot and are
    /// marked for restoring: from now on their events are journaled, not sent.
    /// Rooms that cannot be restored exactly are closed (1011). Returns the rooms
    /// to restore, those never blamed for a crash first.
    pub fn worker_failed(&self, worker: WorkerId) -> Vec<Arc<RoomEntry>> {
        let mut inner = lock(&self.inner);
        let on_worker: Vec<Arc<RoomEntry>> = inner
            .rooms
            .values()
            .filter(|e| e.worker == worker)
            .cloned()
            .collect();
        let mut restore = Vec::new();
        for entry in on_worker {
            let mut state = lock(&entry.state);
            if !state.journal.restorable() {
                close_room(
                    &mut inner,
                    &entry,
                    &mut state,
                    "Room lost: its worker failed",
                );
                continue;
            }
            state.restoring = true;
            // Closes the dead worker never answered are re-sent after the restore.
            state.closing = 0;
            let blamed = !state.blames.is_empty();
            drop(state);
            restore.push((blamed, entry));
        }
        restore.sort_by_key(|(blamed, entry)| (*blamed, entry.id.clone()));
        restore.into_iter().map(|(_, entry)| entry).collect()
    }

    /// Closes a room being restored whose journal overflowed (events it had not
    /// sent to the new worker were dropped): it cannot be rebuilt exactly.
    fn close_unrestorable(&self, entry: &RoomEntry) {
        let mut inner = lock(&self.inner);
        let Some(current) = inner
            .rooms
            .get(&entry.id)
            .filter(|e| std::ptr::eq(Arc::as_ptr(e), entry))
            .cloned()
        else {
            return;
        };
        let mut state = lock(&current.state);
        if state.lost || state.journal.restorable() {
            return;
        }
        tracing::error!(room = %entry.id, "the room's journal overflowed while it was being restored: it cannot be rebuilt exactly; closing it for its members (1011)");
        close_room(
            &mut inner,
            &current,
            &mut state,
            "Room lost: its worker failed",
        );
    }

    /// Whether `room` is placed on `worker`.
    pub fn placed_on(&self, room: &RoomId, worker: WorkerId) -> bool {
        lock(&self.inner)
            .rooms
            .get(room)
            .is_some_and(|e| e.worker == worker)
    }

    /// The frames that rebuild `entry` on a new worker: its checkpoint (or a load
    /// from the store) and its journal. `None` if the room is gone.
    pub fn restore_frames(&self, entry: &RoomEntry) -> Option<Vec<ToWorker>> {
        let mut state = lock(&entry.state);
        if state.lost || !state.restoring {
            return None;
        }
        if !state.journal.restorable() {
            drop(state);
            self.close_unrestorable(entry);
            return None;
        }
        let mut frames = vec![ToWorker::RestoreRoom {
            room: entry.id.clone(),
            id_seed: state.id_seed,
            image: state.checkpoint.as_ref().map(|(_, image)| image.clone()),
        }];
        frames.extend(state.journal.iter().cloned().map(ToWorker::Event));
        state.restore_sent = state.last_seq;
        Some(frames)
    }

    /// Events journaled since `restore_frames` (or the last call); when there are
    /// none, the restore is complete and later events go to the worker directly.
    /// Returns the frames to send and whether the restore is complete. `close`
    /// is a slot of the worker's queue: if everyone left during the restore, the
    /// room's `CloseRoom` goes through it under the room's lock, so it precedes
    /// any frame of a member joining right after.
    pub fn finish_restore(
        &self,
        entry: &RoomEntry,
        close: mpsc::Permit<'_, ToWorker>,
    ) -> (Vec<ToWorker>, bool) {
        let mut state = lock(&entry.state);
        if state.lost {
            return (Vec::new(), true);
        }
        if !state.journal.restorable() {
            drop(state);
            self.close_unrestorable(entry);
            return (Vec::new(), true);
        }
        let sent = state.restore_sent;
        let frames: Vec<ToWorker> = state
            .journal
            .iter()
            .filter(|s| s.seq > sent)
            .cloned()
            .map(ToWorker::Event)
            .collect();
        if !frames.is_empty() {
            state.restore_sent = state.last_seq;
            return (frames, false);
        }
        state.restoring = false;
        if !state.open {
            // Everyone left meanwhile (or before): save and free it as usual.
            state.closing += 1;
            close.send(ToWorker::CloseRoom {
                room: entry.id.clone(),
            });
        }
        (Vec::new(), true)
    }

    /// Attributes a worker crash to `room` (it was being restored when the worker
    /// died). After [`POISON_CRASHES`] within [`POISON_WINDOW`], the room alone is
    /// closed for its members with 1011; returns true then.
    pub fn blame(&self, room: &RoomId) -> bool {
        let mut inner = lock(&self.inner);
        let Some(entry) = inner.rooms.get(room).cloned() else {
            return false;
        };
        let mut state = lock(&entry.state);
        let now = Instant::now();
        state
            .blames
            .retain(|t| now.duration_since(*t) < POISON_WINDOW);
        state.blames.push(now);
        if state.blames.len() < POISON_CRASHES {
            return false;
        }
        close_room(
            &mut inner,
            &entry,
            &mut state,
            "Room closed: it repeatedly crashed the server",
        );
        true
    }

    /// Records the worker's summaries of its rooms.
    pub fn summaries(&self, worker: WorkerId, summaries: Vec<RoomSummary>) {
        let inner = lock(&self.inner);
        for summary in summaries {
            if let Some(entry) = inner
                .rooms
                .get(&summary.room)
                .filter(|e| e.worker == worker)
            {
                lock(&entry.state).summary = Some(summary);
            }
        }
    }

    /// Every room with what the monitor shows of it, sorted by id.
    pub fn monitor(&self) -> Vec<serde_json::Value> {
        let inner = lock(&self.inner);
        let mut rooms: Vec<serde_json::Value> = inner
            .rooms
            .values()
            .map(|entry| {
                let state = lock(&entry.state);
                let summary = state.summary.as_ref();
                serde_json::json!({
                    "room": entry.id.0,
                    "worker": entry.worker.0,
                    "connections": state.conns.len(),
                    "members": summary.map(|s| s.members),
                    "shapes": summary.map(|s| s.shapes),
                    "unsaved": summary.map(|s| s.unsaved),
                    "lastSaveMs": summary.and_then(|s| s.last_save_ms),
                    "restoring": state.restoring,
                    "journal": state.journal.len(),
                    "journalBytes": state.journal.bytes(),
                })
            })
            .collect();
        rooms.sort_by(|a, b| a["room"].as_str().cmp(&b["room"].as_str()));
        rooms
    }

    /// Rooms per worker, sorted, for the status endpoint.
    pub fn rooms_by_worker(&self) -> Vec<Vec<RoomId>> {
        let inner = lock(&self.inner);
        let mut by_worker = vec![Vec::new(); inner.load.len()];
        for entry in inner.rooms.values() {
            by_worker[entry.worker.0 as usize].push(entry.id.clone());
        }
        for rooms in &mut by_worker {
            rooms.sort();
        }
        by_worker
    }
}

/// Closes every connection of a room with 1011 and forgets the room.
fn close_room(
    inner: &mut Inner,
    entry: &Arc<RoomEntry>,
    state: &mut RoomState,
    reason: &'static str,
) {
    state.lost = true;
    for member in state.conns.values() {
        member.close(CLOSE_INTERNAL_ERROR, reason);
    }
    forget(inner, entry);
}

/// Drops the entry once nothing refers to the room any more: no connection, not
/// open on the worker, no close awaiting confirmation.
fn remove_if_done(inner: &mut Inner, entry: &Arc<RoomEntry>, state: &RoomState) {
    if state.lost || !state.conns.is_empty() || state.open || state.closing > 0 {
        return;
    }
    forget(inner, entry);
}

/// Removes `entry` from the map (unless a newer entry for the room replaced it)
/// and frees its place on its worker.
fn forget(inner: &mut Inner, entry: &Arc<RoomEntry>) {
    let is_current = inner
        .rooms
        .get(&entry.id)
        .is_some_and(|current| Arc::ptr_eq(current, entry));
    if is_current {
        inner.rooms.remove(&entry.id);
        inner.load[entry.worker.0 as usize] -= 1;
        let now = inner.rooms.len();
        inner.placed.send_modify(|placed| placed.now = now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> RoomId {
        RoomId(name.into())
    }

    fn ops(text: &'static str) -> Option<Bytes> {
        Some(Bytes::from_static(text.as_bytes()))
    }

    #[test]
    fn batches_lead_from_a_kept_version_to_a_newer_one_or_not_at_all() {
        let mut b = Batches::default();
        assert_eq!(b.between(0, 1, 1000), None, "nothing kept");
        b.push(1, None); // a new room: its first snapshot has no ops
        b.push(2, ops("a"));
        b.push(3, ops("b"));
        b.push(4, ops("c"));
        let got = |b: &Batches, from, to| b.between(from, to, 1000).map(|v| v.concat());
        assert_eq!(got(&b, 1, 4).as_deref(), Some(&b"abc"[..]));
        assert_eq!(got(&b, 2, 3).as_deref(), Some(&b"b"[..]));
        assert_eq!(got(&b, 4, 4).as_deref(), Some(&b""[..]), "nothing missed");
        assert_eq!(got(&b, 0, 4), None, "version 1 is not reached by ops");
        assert_eq!(got(&b, 3, 5), None, "not published yet");
        assert_eq!(
            b.between(1, 4, 5),
            None,
            "more than the limit: a snapshot is smaller"
        );
        // A restore: the chain starts again at its first snapshot.
        b.push(5, None);
        b.push(6, ops("d"));
        assert_eq!(got(&b, 4, 6), None);
        assert_eq!(got(&b, 5, 6).as_deref(), Some(&b"d"[..]));
        // Versions published while no v2 session was there were not kept.
        b.push(9, ops("g"));
        assert_eq!(got(&b, 6, 9), None);
        assert_eq!(got(&b, 8, 9).as_deref(), Some(&b"g"[..]));
    }

    #[test]
    fn batches_are_bounded_by_count_and_bytes() {
        let mut b = Batches::default();
        b.push(1, None);
        for v in 2..200 {
            b.push(v, ops("x"));
        }
        assert_eq!(b.entries.len(), MAX_BATCHES);
        assert!(b.between(199 - MAX_BATCHES as u64, 199, 1000).is_some());
        assert_eq!(b.between(198 - MAX_BATCHES as u64, 199, 1000), None);
        let big = Bytes::from(vec![b'y'; MAX_BATCH_BYTES / 2 + 1]);
        b.push(200, Some(big.clone()));
        b.push(201, Some(big));
        assert_eq!(b.entries.len(), 1);
        assert!(b.bytes <= MAX_BATCH_BYTES);
        assert!(b.between(200, 201, usize::MAX).is_some());
        assert_eq!(b.between(199, 201, usize::MAX), None);
    }

    fn commands() -> (ConnStateSender, watch::Receiver<ConnState>) {
        watch::channel(ConnState::pending())
    }

    #[test]
    fn a_room_keeps_batches_only_while_it_has_v2_members() {
        let registry = Registry::new(1, 10, 10);
        let entry = registry
            .register(&room("v2"), ConnId(1), "u".into(), commands().0)
            .unwrap();
        registry.publish(&room("v2"), Bytes::from_static(b"{}"), None);
        entry.v2_session(ConnId(1), true);
        entry.v2_session(ConnId(2), true);
        for n in ["a", "b", "c"] {
            registry.publish(&room("v2"), Bytes::from_static(b"{}"), ops(n));
        }
        assert_eq!(entry.batches().entries.len(), 3);
        entry.v2_session(ConnId(1), false);
        assert_eq!(entry.batches().entries.len(), 3, "one v2 member is left");
        entry.v2_session(ConnId(2), false);
        assert!(entry.batches().entries.is_empty());
        assert_eq!(entry.batches().bytes, 0);
        registry.publish(&room("v2"), Bytes::from_static(b"{}"), ops("d"));
        assert!(
            entry.batches().entries.is_empty(),
            "none kept without v2 members"
        );
    }

    #[test]
    fn rooms_spread_over_workers_and_refuse_when_full() {
        let registry = Registry::new(2, 2, 100);
        let workers: Vec<WorkerId> = ["a", "b", "c", "d"]
            .iter()
            .enumerate()
            .map(|(i, r)| {
                registry
                    .register(&room(r), ConnId(i as u64), "u".into(), commands().0)
                    .unwrap()
                    .worker
            })
            .collect();
        assert_eq!(
            workers,
            [WorkerId(0), WorkerId(1), WorkerId(0), WorkerId(1)]
        );
        // An existing room still takes connections; a new one does not fit.
        assert_eq!(
            registry
                .register(&room("a"), ConnId(9), "u".into(), commands().0)
                .unwrap()
                .worker,
            WorkerId(0)
        );
        assert_eq!(
            registry
                .register(&room("e"), ConnId(10), "u".into(), commands().0)
                .err(),
            Some(PlacementError::AllWorkersFull(2))
        );
    }

    #[test]
    fn the_total_capacity_is_enforced_across_workers() {
        let registry = Registry::new(2, 5, 3);
        for (i, r) in ["a", "b", "c"].iter().enumerate() {
            registry
                .register(&room(r), ConnId(i as u64), "u".into(), commands().0)
                .unwrap();
        }
        assert_eq!(
            registry
                .register(&room("d"), ConnId(9), "u".into(), commands().0)
                .err(),
            Some(PlacementError::AtCapacity(3))
        );
    }

    #[tokio::test]
    async fn lifecycle_frames_are_ordered_and_room_freed_after_confirmation() {
        let registry = Registry::new(1, 1, 100);
        let (tx, mut rx) = mpsc::channel(16);
        let entry = registry
            .register(&room("a"), ConnId(1), "u".into(), commands().0)
            .unwrap();
        registry.join(&entry, &tx, ConnId(1), None).await.unwrap();
        registry
            .forward(&entry, &tx, ConnId(1), "hi".into())
            .await
            .unwrap();
        registry.leave(&entry, &tx, ConnId(1)).await;

        let mut frames = Vec::new();
        while let Ok(f) = rx.try_recv() {
            frames.push(f);
        }
        assert!(matches!(&frames[0], ToWorker::OpenRoom { room: r, .. } if r.0 == "a"));
        let seqs: Vec<u64> = frames
            .iter()
            .filter_map(|f| match f {
                ToWorker::Event(s) => Some(s.seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert!(matches!(&frames[4], ToWorker::CloseRoom { room: r } if r.0 == "a"));
        assert_eq!(frames.len(), 5);

        // Until the worker confirms, the room still counts against its worker.
        assert_eq!(
            registry
                .register(&room("b"), ConnId(2), "u".into(), commands().0)
                .err(),
            Some(PlacementError::AllWorkersFull(1))
        );
        registry.close_resolved(&room("a"), WorkerId(0));
        assert!(
            registry
                .register(&room("b"), ConnId(3), "u".into(), commands().0)
                .is_ok()
        );
    }

    fn events(frames: &[ToWorker]) -> Vec<u64> {
        frames
            .iter()
            .filter_map(|f| match f {
                ToWorker::Event(s) => Some(s.seq),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_failed_worker_s_room_is_restored_from_checkpoint_and_journal() {
        let registry = Registry::new(1, 1, 1);
        let (tx, mut rx) = mpsc::channel(64);
        let entry = registry
            .register(&room("a"), ConnId(1), "u".into(), commands().0)
            .unwrap();
        registry.join(&entry, &tx, ConnId(1), None).await.unwrap(); // seq 1
        for text in ["m2", "m3", "m4"] {
            registry
                .forward(&entry, &tx, ConnId(1), text.into())
                .await
                .unwrap();
        }
        registry.checkpoint(&room("a"), WorkerId(0), 2, b"image@2".to_vec());
        while rx.try_recv().is_ok() {}

        let restoring = registry.worker_failed(WorkerId(0));
        assert_eq!(restoring.len(), 1);
        // Events during the restore are journaled, not sent.
        registry
            .forward(&entry, &tx, ConnId(1), "m5".into())
            .await
            .unwrap();
        assert!(rx.try_recv().is_err());

        let frames = registry.restore_frames(&entry).unwrap();
        match &frames[0] {
            ToWorker::RestoreRoom { room: r, image, .. } => {
                assert_eq!(r.0, "a");
                assert_eq!(image.as_deref(), Some(&b"image@2"[..]));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(events(&frames), [3, 4, 5]);
        registry
            .forward(&entry, &tx, ConnId(1), "m6".into())
            .await
            .unwrap();
        let (more, done) = registry.finish_restore(&entry, tx.reserve().await.unwrap());
        assert_eq!((events(&more), done), (vec![6], false));
        let (rest, done) = registry.finish_restore(&entry, tx.reserve().await.unwrap());
        assert!(rest.is_empty() && done);
        // Restored: events go to the worker again.
        registry
            .forward(&entry, &tx, ConnId(1), "m7".into())
            .await
            .unwrap();
        assert!(matches!(rx.try_recv(), Ok(ToWorker::Event(s)) if s.seq == 7));
    }

    #[tokio::test]
    async fn a_room_blamed_for_three_crashes_is_closed_alone() {
        let registry = Registry::new(1, 2, 2);
        let (tx, _rx) = mpsc::channel(64);
        let (ctx, crx) = commands();
        let poison = registry
            .register(&room("p"), ConnId(1), "u".into(), ctx)
            .unwrap();
        registry.join(&poison, &tx, ConnId(1), None).await.unwrap();
        let other = registry
            .register(&room("o"), ConnId(2), "u".into(), commands().0)
            .unwrap();
        registry.join(&other, &tx, ConnId(2), None).await.unwrap();
        assert!(!registry.blame(&room("p")));
        assert!(!registry.blame(&room("p")));
        // Blamed rooms are restored after the others.
        let order: Vec<String> = registry
            .worker_failed(WorkerId(0))
            .iter()
            .map(|e| e.id.0.clone())
            .collect();
        assert_eq!(order, ["o", "p"]);
        assert!(registry.blame(&room("p")));
        assert!(matches!(
            crx.borrow().membership,
            Membership::Closed { code: 1011, .. }
        ));
        assert_eq!(registry.rooms_by_worker(), vec![vec![room("o")]]);
    }

    #[tokio::test]
    async fn a_silent_holder_of_the_user_is_replaced_in_one_step() {
        let registry = Registry::new(1, 1, 1);
        let (tx, mut rx) = mpsc::channel(16);
        let (old_tx, old_rx) = commands();
        let entry = registry
            .register(&room("a"), ConnId(1), "u".into(), old_tx)
            .unwrap();
        registry.join(&entry, &tx, ConnId(1), None).await.unwrap();
        let (new_tx, _new_rx) = commands();
        registry
            .register(&room("a"), ConnId(2), "u".into(), new_tx)
            .unwrap();
        let Holder::Probed { conn, answer } = registry.probe_holder(&entry, ConnId(2)) else {
            panic!("the first connection holds the user");
        };
        assert_eq!(conn, ConnId(1));
        assert_eq!(old_rx.borrow().probes, 1);
        drop(answer);
        registry
            .join(&entry, &tx, ConnId(2), Some(ConnId(1)))
            .await
            .unwrap();
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
                },
                RoomEvent::Leave { conn: ConnId(1) },
                RoomEvent::Join {
                    conn: ConnId(2),
                    user_id: "u".into(),
                    v2: false,
                },
            ]
        );
        // The replaced connection's own leave later changes nothing.
        registry.leave(&entry, &tx, ConnId(1)).await;
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn rooms_with_events_since_their_last_confirmed_save_are_listed() {
        let registry = Registry::new(2, 2, 100);
        let (tx, _rx) = mpsc::channel(64);
        for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
            let conn = ConnId(i as u64);
            let entry = registry
                .register(&room(name), conn, "u".into(), commands().0)
                .unwrap();
            registry.join(&entry, &tx, conn, None).await.unwrap(); // seq 1
            registry
                .forward(&entry, &tx, conn, "m".into())
                .await
                .unwrap(); // seq 2
        }
        // a and c are on worker 0, b on worker 1.
        assert_eq!(
            registry.unconfirmed_rooms(WorkerId(0)),
            [room("a"), room("c")]
        );
        registry.saved(&room("a"), WorkerId(0), 2);
        registry.saved(&room("c"), WorkerId(0), 1);
        registry.saved(&room("b"), WorkerId(0), 2); // not b's worker: ignored
        assert_eq!(registry.unconfirmed_rooms(WorkerId(0)), [room("c")]);
        assert_eq!(registry.unconfirmed_rooms(WorkerId(1)), [room("b")]);
    }

    #[tokio::test]
    async fn newcomers_share_one_probe_and_a_replaced_connection_stays_closed() {
        let registry = Registry::new(1, 1, 1);
        let (tx, _rx) = mpsc::channel(16);
        let (old_tx, old_rx) = commands();
        let entry = registry
            .register(&room("a"), ConnId(1), "u".into(), old_tx)
            .unwrap();
        // Its join is stamped but the worker has not admitted it yet.
        registry.join(&entry, &tx, ConnId(1), None).await.unwrap();
        for conn in [2, 3] {
            registry
                .register(&room("a"), ConnId(conn), "u".into(), commands().0)
                .unwrap();
        }
        let (Holder::Probed { answer: mut a, .. }, Holder::Probed { answer: mut b, .. }) = (
            registry.probe_holder(&entry, ConnId(2)),
            registry.probe_holder(&entry, ConnId(3)),
        ) else {
            panic!("both find the first connection");
        };
        // One ping for both.
        assert_eq!(old_rx.borrow().probes, 1);
        registry.alive(&entry, ConnId(1));
        assert!(*a.wait_for(|alive| *alive).await.unwrap());
        assert!(*b.wait_for(|alive| *alive).await.unwrap());

        // Replaced before the worker's verdict: the late admission does not reopen it.
        registry
            .join(&entry, &tx, ConnId(2), Some(ConnId(1)))
            .await
            .unwrap();
        registry.admit(&room("a"), ConnId(1));
        assert!(matches!(
            old_rx.borrow().membership,
            Membership::Closed { code: 4000, .. }
        ));
    }

    /// The only member reloads while the room is being restored: the rejoin
    /// keeps the instance (its checkpoint and journal), it does not start anew.
    #[tokio::test]
    async fn a_rejoin_during_a_restore_keeps_the_checkpoint() {
        let registry = Registry::new(1, 1, 1);
        let (tx, _rx) = mpsc::channel(64);
        let entry = registry
            .register(&room("a"), ConnId(1), "u".into(), commands().0)
            .unwrap();
        registry.join(&entry, &tx, ConnId(1), None).await.unwrap();
        registry.checkpoint(&room("a"), WorkerId(0), 1, b"image@1".to_vec());
        registry.worker_failed(WorkerId(0));
        registry
            .register(&room("a"), ConnId(2), "u".into(), commands().0)
            .unwrap();
        registry.leave(&entry, &tx, ConnId(1)).await;
        registry.join(&entry, &tx, ConnId(2), None).await.unwrap();
        let frames = registry.restore_frames(&entry).unwrap();
        assert!(matches!(
            &frames[0],
            ToWorker::RestoreRoom { image: Some(image), .. } if image == b"image@1"
        ));
        assert_eq!(
            events(&frames),
            [2, 3],
            "leave and rejoin, after the checkpoint"
        );
    }

    /// A journal that overflows while its room is being restored lost events the
    /// new worker never got: the room is closed (1011), never rebuilt wrong.
    #[tokio::test]
    async fn a_journal_overflowing_during_a_restore_closes_the_room() {
        let registry = Registry::new(1, 1, 1);
        let (tx, _rx) = mpsc::channel(64);
        let (ctx, crx) = commands();
        let entry = registry
            .register(&room("a"), ConnId(1), "u".into(), ctx)
            .unwrap();
        registry.join(&entry, &tx, ConnId(1), None).await.unwrap();
        registry.worker_failed(WorkerId(0));
        let big = format!(
            r#"{{"type":"shape_create","shapeType":"text","x":0,"y":0,"width":1,"height":1,"text":"{}"}}"#,
            "t".repeat(9_000)
        );
        let mut sent = 0;
        while state_restorable(&entry) {
            registry
                .forward(&entry, &tx, ConnId(1), big.clone())
                .await
                .unwrap();
            sent += 1;
            assert!(sent < 5_000, "the journal never overflowed");
        }
        assert!(registry.restore_frames(&entry).is_none());
        assert!(matches!(
            crx.borrow().membership,
            Membership::Closed { code: 1011, .. }
        ));
        assert!(registry.rooms_by_worker()[0].is_empty());
    }

    fn state_restorable(entry: &RoomEntry) -> bool {
        lock(&entry.state).journal.restorable()
    }

    #[test]
    fn new_rooms_avoid_a_worker_that_does_not_answer() {
        let registry = Registry::new(2, 2, 100);
        registry.set_unresponsive(WorkerId(0), true);
        let place = |name: &str, conn: u64| {
            registry
                .register(&room(name), ConnId(conn), "u".into(), commands().0)
                .unwrap()
                .worker
        };
        assert_eq!(place("a", 1), WorkerId(1));
        assert_eq!(place("b", 2), WorkerId(1));
        // The others are full: a silent worker still takes a room (it is being
        // replaced), rather than refusing it.
        assert_eq!(place("c", 3), WorkerId(0));
        registry.set_unresponsive(WorkerId(0), false);
        assert_eq!(place("d", 4), WorkerId(0));
    }
}
