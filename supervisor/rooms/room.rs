//! One placed room: its members, what its worker has been sent, and its
//! snapshots, owned by its worker slot's task ([`SlotRooms`](super::SlotRooms));
//! and what a connection's session is told of it ([`ConnState`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::watch;

use super::fanout::{Batches, Published, SnapshotCell};
use super::handle::{ConnStateSender, Membership, RoomLink};
use super::recovery::Recovery;
use crate::close::CloseReason;
use contract::ipc::{ConnId, RoomId, RoomSummary};

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

impl Room {
    /// Publishes the room's newest snapshot to its members, and for v2 members
    /// the ops that lead to it from the previous one (`None`: none do).
    pub(super) fn publish(&mut self, snapshot: Bytes, ops: Option<Bytes>, deflated: Option<Bytes>) {
        let version = self
            .snapshots
            .borrow()
            .as_ref()
            .map_or(1, |p| p.version + 1);
        // Without v2 members, none are kept: a v2 member counts itself with
        // its join, and its first message is a snapshot; the first batch kept
        // after a pause starts a new chain (see `Batches::push`).
        let (step, step_ops) = if self.v2_members > 0 {
            let step = self.batches.push(version, ops);
            let step_ops = step
                .as_ref()
                .filter(|step| !step.ops().is_empty())
                .map(|step| Bytes::from(contract::protocol::v2::ops_body([step.ops()])));
            (step, step_ops)
        } else {
            (None, None)
        };
        // One allocation per publish, so a member's copy is one pointer
        // (kept in its session's future while it writes).
        self.snapshots.send_replace(Some(Arc::new(Published {
            message: snapshot,
            deflated,
            at: Instant::now(),
            version,
            step,
            step_ops,
        })));
        // Each session waits on its own cell, not on the room's watch.
        for member in self.conns.values() {
            member.state.ring();
        }
    }

    /// A v2 member joins (`true`) or leaves.
    pub(super) fn count_v2_member(&mut self, joins: bool) {
        if joins {
            self.v2_members += 1;
        } else {
            self.v2_members -= 1;
            if self.v2_members == 0 {
                // Its batches would only hold memory.
                self.batches.clear();
            }
        }
    }
}
