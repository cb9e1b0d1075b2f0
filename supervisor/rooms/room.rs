//! One placed room: its members, what its worker has been sent, and its
//! snapshots, owned by its worker slot's task ([`SlotRooms`](super::SlotRooms));
//! and what a connection's session is told of it ([`ConnState`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tokio::sync::watch;

use super::fanout::{Batches, SnapshotCell};
use super::handle::RoomLink;
use super::recovery::Recovery;
use crate::close::CloseReason;
use contract::ipc::{ConnId, RoomId, RoomSummary};
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
    /// Close the connection for this reason.
    Closed(CloseReason),
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

/// A room's traffic since it was placed.
#[derive(Default)]
pub struct Traffic {
    /// Client messages forwarded to its worker.
    pub messages_in: AtomicU64,
    /// Bytes written to its members, as sent (compressed or not).
    pub bytes_out: AtomicU64,
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
            probe: None,
        }
    }

    pub(super) fn close(&self, reason: CloseReason) {
        self.state
            .send_modify(|s| s.membership = Membership::Closed(reason));
    }
}

/// One placed room as its slot's task holds it: its members, what its worker
/// was sent (membership here; stamping, checkpoint, journal, restore and
/// blame in `recovery`), and what its members are sent (`fanout`). Lives from
/// its first connection's registration until every connection has gone and
/// its worker has confirmed the room is freed.
pub(super) struct Room {
    /// What its sessions hold (id, worker, placement, traffic).
    pub(super) link: Arc<RoomLink>,
    /// Registrations received (the registry counts those it sent: the room is
    /// freed only when none is on its way).
    pub(super) registered: u64,
    /// Connections registered for the room (joined or about to).
    pub(super) conns: HashMap<ConnId, Member>,
    /// Joins sent to the worker and not yet followed by a leave.
    pub(super) joined: usize,
    /// An `OpenRoom` was sent and no `CloseRoom` since.
    pub(super) open: bool,
    /// `CloseRoom`s sent and not yet confirmed by the worker.
    pub(super) closing: usize,
    /// The worker's latest summary of the room (for the monitor).
    pub(super) summary: Option<RoomSummary>,
    /// The last event whose refusal a member was told of: a restored room
    /// replays its journal, and refuses the same events again.
    pub(super) refused_up_to: u64,
    /// What rebuilds the room if its worker fails.
    pub(super) recovery: Recovery,
    /// The newest snapshot, for its admitted members.
    pub(super) snapshots: watch::Sender<SnapshotCell>,
    /// Members that speak protocol v2; while there are none, no ops batches
    /// are kept.
    pub(super) v2_members: usize,
    /// Its recent ops batches (for v2 members that missed some versions).
    pub(super) batches: Batches,
}

impl Room {
    pub(super) fn new(link: Arc<RoomLink>) -> Room {
        Room {
            link,
            registered: 0,
            conns: HashMap::new(),
            joined: 0,
            open: false,
            closing: 0,
            summary: None,
            refused_up_to: 0,
            recovery: Recovery::default(),
            snapshots: watch::Sender::new(None),
            v2_members: 0,
            batches: Batches::default(),
        }
    }

    /// The room's id.
    pub(super) fn id(&self) -> &RoomId {
        &self.link.id
    }

    /// Nothing refers to the room any more: no connection, not open on the
    /// worker, no close awaiting confirmation.
    pub(super) fn done(&self) -> bool {
        self.conns.is_empty() && !self.open && self.closing == 0
    }
}
