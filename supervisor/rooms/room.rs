//! One placed room: its members, what its worker has been sent, and its
//! snapshots. Sessions reach it through a [`RoomHandle`](super::RoomHandle);
//! the IPC reader through the [`Registry`](super::Registry).

use crate::worker_queue::WorkerQueue;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Mutex, Weak};

use tokio::sync::watch;

use super::Table;
use super::fanout::{Batches, SnapshotCell};
use super::recovery::Recovery;
use contract::ipc::{ConnId, RoomId, RoomSummary, WorkerId};
use contract::protocol::{IgnoredReason, MessageKind};

/// What the supervisor tells a connection's session: its membership, which only
/// moves forward (pending → admitted → closed), and how many times a newer
/// connection of the same user asked whether this one is still alive. A `watch`
/// carries it: a session that sees only the last value has missed nothing it
/// needs. (A `watch` costs a few hundred bytes per connection; an `mpsc` channel
/// allocates a 32-slot block.)
#[derive(Debug, Clone)]
pub struct ConnState {
    /// Where the connection stands in its room.
    pub membership: Membership,
    /// Bumped to ask the session to ping its client at once; the session answers
    /// with [`RoomHandle::alive`](super::RoomHandle::alive) when its client is
    /// next heard from.
    pub probes: u32,
    /// The client's messages refused by a room limit so far (see
    /// `FromWorker::Refused`), and what the last one asked and why: a v2
    /// session tells its client of the ones it has not told yet.
    pub refused: u32,
    /// The last refused message's kind and reason.
    pub last_refused: Option<(MessageKind, IgnoredReason)>,
}

impl ConnState {
    /// A connection registered and not yet admitted.
    pub fn pending() -> ConnState {
        ConnState {
            membership: Membership::Pending,
            probes: 0,
            refused: 0,
            last_refused: None,
        }
    }
}

/// A connection's standing in its room.
#[derive(Debug, Clone)]
pub enum Membership {
    /// Waiting for the worker to admit the join.
    Pending,
    /// The worker admitted the join: from now on, send the room's snapshots.
    Admitted(watch::Receiver<SnapshotCell>),
    /// Close the connection with this code and reason.
    Closed {
        /// The WebSocket close code (e.g. [`CLOSE_POLICY`](contract::protocol::CLOSE_POLICY)).
        code: u16,
        /// The close frame's reason, one of the contract's `REASON_` texts.
        reason: &'static str,
    },
}

/// The registry's end of a connection's [`ConnState`].
pub type ConnStateSender = watch::Sender<ConnState>;

/// What a connection joining a room finds of its user.
pub enum Holder {
    /// The user is not in the room.
    None,
    /// Another connection holds the user's place: the receiver turns true if it
    /// is alive, and fails if it leaves.
    Probed {
        /// The connection that holds it.
        conn: ConnId,
        /// Its answer to the probe.
        answer: watch::Receiver<bool>,
    },
}

/// A room placed on a worker. Lives from its first connection until every
/// connection has gone and the worker has confirmed the room is freed.
pub struct RoomEntry {
    /// The room's id, from its members' tokens.
    pub id: RoomId,
    /// The worker it is placed on (for the room's life: a failed worker's
    /// rooms are restored on its slot's replacement).
    pub worker: WorkerId,
    /// The worker's frame queue (its slot's: it outlives the worker's processes).
    pub(super) queue: WorkerQueue,
    /// The placement table, to free the room's place when its last member
    /// leaves (weak: the table holds the entry).
    pub(super) table: Weak<Mutex<Table>>,
    pub(super) snapshots: watch::Sender<SnapshotCell>,
    /// Sessions of the room that speak protocol v2; while there are none, no
    /// ops batches are kept.
    pub(super) v2_sessions: AtomicUsize,
    pub(super) batches: Mutex<Batches>,
    pub(super) state: Mutex<RoomState>,
    /// Its traffic, for the monitor's rates (relaxed counters, no lock).
    pub(super) traffic: Traffic,
}

/// A room's traffic since it was placed.
#[derive(Default)]
pub struct Traffic {
    /// Client messages forwarded to its worker.
    pub messages_in: AtomicU64,
    /// Bytes written to its members, as sent (compressed or not).
    pub bytes_out: AtomicU64,
}

impl RoomEntry {
    pub(super) fn new(
        id: RoomId,
        worker: WorkerId,
        queue: WorkerQueue,
        table: Weak<Mutex<Table>>,
    ) -> RoomEntry {
        RoomEntry {
            id,
            worker,
            queue,
            table,
            snapshots: watch::Sender::new(None),
            v2_sessions: AtomicUsize::new(0),
            batches: Mutex::default(),
            state: Mutex::new(RoomState::default()),
            traffic: Traffic::default(),
        }
    }
}

/// A connection registered for a room (joined or about to).
pub(super) struct Member {
    /// The connection's session is told its state through this.
    pub(super) state: ConnStateSender,
    /// From the token.
    pub(super) user_id: Box<str>,
    /// A join was stamped for it and no leave since.
    pub(super) joined: bool,
    /// Speaks protocol v2 (told to the worker with its join).
    pub(super) v2: bool,
    /// Negotiated permessage-deflate (told to the worker with its join).
    pub(super) deflate: bool,
    /// Set while newer connections of the same user wait to learn whether this
    /// one is alive: set to true when its client is heard from, dropped when it
    /// leaves.
    pub(super) probe: Option<watch::Sender<bool>>,
}

impl Member {
    pub(super) fn new(state: ConnStateSender, user_id: String) -> Member {
        Member {
            state,
            user_id: user_id.into(),
            joined: false,
            v2: false,
            deflate: false,
            probe: None,
        }
    }

    pub(super) fn close(&self, code: u16, reason: &'static str) {
        self.state
            .send_modify(|s| s.membership = Membership::Closed { code, reason });
    }
}

/// A room's state under its lock: its members and what its worker was sent
/// (membership here; stamping, checkpoint, journal and restore in `recovery`).
#[derive(Default)]
pub(super) struct RoomState {
    /// Connections registered for the room (joined or about to).
    pub(super) conns: HashMap<ConnId, Member>,
    /// Joins sent to the worker and not yet followed by a leave.
    pub(super) joined: usize,
    /// An `OpenRoom` was sent and no `CloseRoom` since.
    pub(super) open: bool,
    /// `CloseRoom`s sent and not yet confirmed by the worker.
    pub(super) closing: usize,
    /// The room is gone (closed after repeated crashes, or not restorable); the
    /// entry is no longer in the map.
    pub(super) lost: bool,
    /// The worker's latest summary of the room (for the monitor).
    pub(super) summary: Option<RoomSummary>,
    /// The last event whose refusal a member was told of: a restored room
    /// replays its journal, and refuses the same events again.
    pub(super) refused_up_to: u64,
    /// What rebuilds the room if its worker fails.
    pub(super) recovery: Recovery,
}
