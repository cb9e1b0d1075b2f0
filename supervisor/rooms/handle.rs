//! What a session holds of its room, and how the two talk: [`RoomHandle`]
//! sends the session's events ([`SlotEvent`]) to the task that owns the room
//! (its worker slot's), which tells the session its [`ConnState`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot, watch};

use super::recovery::RoomSalvage;
use crate::worker_queue::{Charge, MessageBudget};
use contract::ipc::{ConnId, MessageText, RoomId, WorkerId};

pub use super::conn_state::{ConnState, ConnStateReceiver, ConnStateSender, Membership};

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

/// One room at one instant, as the registry reads it for the monitor.
#[derive(Clone, Debug, PartialEq)]
pub struct RoomTraffic {
    /// The room's id.
    pub room: String,
    /// Client messages forwarded to its worker since it was placed.
    pub messages_in: u64,
    /// Bytes written to its members since it was placed.
    pub bytes_out: u64,
    /// Client events journaled and not yet checkpointed.
    pub journal: u64,
}

/// What a slot's task is told through its inbox.
pub(crate) enum SlotEvent {
    /// A connection was registered for a room placed on this slot (by
    /// [`Registry::register`]): the room is created with its first.
    Register {
        link: Arc<RoomLink>,
        conn: ConnId,
        user_id: String,
        state: ConnStateSender,
    },
    /// A session's event for its room.
    Session {
        link: Arc<RoomLink>,
        conn: ConnId,
        event: SessionEvent,
    },
    /// The memory budget refuses new shapes (`full`), or no longer: told to
    /// each room as a stamped event.
    MemoryBudget { full: bool },
    /// The server's shutdown phase moved: every session is rung to look at
    /// it (sessions wait on their cell, not on the phase).
    PhaseMoved,
    /// Time for the sessions of this share of connections (those whose id
    /// is `share` modulo [`PING_SHARES`](super::PING_SHARES)) to look at
    /// their pings: they are rung (sessions have no ping timer of their own).
    PingTick { share: u64 },
    /// What the monitor, the stop and the history read of the rooms.
    Query(Query),
}

/// A session's event (see [`RoomHandle`](super::RoomHandle)).
pub(crate) enum SessionEvent {
    Join {
        replace: Option<ConnId>,
        v2: bool,
        deflate: bool,
    },
    Message {
        text: MessageText,
        charge: Charge,
    },
    Leave,
    Alive,
    Probe(oneshot::Sender<Holder>),
    IsJoined(oneshot::Sender<bool>),
}

/// A question to a slot's task, answered at once.
pub(crate) enum Query {
    /// Each room as the monitor shows it.
    Monitor(oneshot::Sender<Vec<serde_json::Value>>),
    /// Each room's traffic and journal.
    Traffic(oneshot::Sender<Vec<RoomTraffic>>),
    /// Rooms with events since their last confirmed save.
    Unconfirmed(oneshot::Sender<Vec<RoomId>>),
    /// What rebuilds each of those.
    Salvage(oneshot::Sender<Vec<RoomSalvage>>),
}

/// The receiving end of a slot's inbox (for the slot's task).
pub(crate) type SlotInboxReceiver = mpsc::UnboundedReceiver<SlotEvent>;

/// A worker slot's inbox: where its room handles send their sessions'
/// events, and the bytes budget their client messages are charged to.
#[derive(Clone)]
pub(crate) struct SlotInbox {
    pub(super) events: mpsc::UnboundedSender<SlotEvent>,
    pub(super) budget: MessageBudget,
}

impl SlotInbox {
    /// Sends `event` to the slot's task (never waits; the task lives as long
    /// as the server).
    pub(super) fn send(&self, event: SlotEvent) {
        let _ = self.events.send(event);
    }
}

/// One placement of a room, shared by its sessions and its owner.
pub(crate) struct RoomLink {
    /// The room's id, from its members' tokens.
    pub(crate) id: RoomId,
    /// The worker slot it is placed on (for the placement's life: a failed
    /// worker's rooms are restored on its slot's replacement).
    pub(crate) worker: WorkerId,
    /// Tells this placement from a later one of the same room.
    pub(crate) placement: u64,
    pub(super) inbox: SlotInbox,
    /// Its traffic, for the monitor's rates (relaxed counters, no lock).
    pub(super) traffic: Traffic,
}

/// The room's worker slot is gone (the server is stopping).
#[derive(Debug, thiserror::Error)]
#[error("the room's worker is gone")]
pub struct RoomLost;

/// A connection's room, as its session uses it: join, forward the client's
/// frames, leave, and answer or ask whether the user's other connection is
/// alive. Returned by [`Registry::register`](super::Registry::register).
///
/// Every call is an event sent to the task that owns the room (its worker
/// slot's), which stamps and queues frames in the order it receives them; no
/// call takes a lock. A call whose room is gone meanwhile changes nothing: the
/// session learns it from its [`ConnState`](super::ConnState). One pointer:
/// every connection keeps one for its whole life.
pub struct RoomHandle(pub(super) Arc<RoomLink>);

impl RoomHandle {
    /// The room's id.
    pub fn id(&self) -> &RoomId {
        &self.0.id
    }

    /// The worker the room is placed on.
    pub fn worker(&self) -> WorkerId {
        self.0.worker
    }

    /// `bytes` were written to one of its members (the monitor's rates).
    pub fn sent(&self, bytes: usize) {
        self.0
            .traffic
            .bytes_out
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn send(&self, conn: ConnId, event: SessionEvent) {
        self.0.inbox.send(SlotEvent::Session {
            link: self.0.clone(),
            conn,
            event,
        });
    }

    /// Whether another joined connection holds `conn`'s user in the room; if so,
    /// asks that connection's session to ping its client at once (unless a probe
    /// is already out: then this connection waits for the same answer).
    pub async fn probe_holder(&self, conn: ConnId) -> Holder {
        let (answer, holder) = oneshot::channel();
        self.send(conn, SessionEvent::Probe(answer));
        holder.await.unwrap_or(Holder::None)
    }

    /// Whether `conn` is (still) a joined member of the room.
    pub async fn is_joined(&self, conn: ConnId) -> bool {
        let (answer, joined) = oneshot::channel();
        self.send(conn, SessionEvent::IsJoined(answer));
        joined.await.unwrap_or(false)
    }

    /// The session's client was heard from: answers the probe, if one is out.
    pub fn alive(&self, conn: ConnId) {
        self.send(conn, SessionEvent::Alive);
    }

    /// Joins the connection to the room: its worker is sent the join (after
    /// opening the room there first if it is not open). With `replace`, that
    /// connection (the same user's, found silent) leaves the room first and
    /// is closed with `CLOSE_REPLACED`: the room lists the user once. `v2`:
    /// the session speaks protocol v2 (the worker records ops for it);
    /// `deflate`: it takes compressed snapshots.
    pub fn join(&self, conn: ConnId, replace: Option<ConnId>, v2: bool, deflate: bool) {
        self.send(
            conn,
            SessionEvent::Join {
                replace,
                v2,
                deflate,
            },
        );
    }

    /// Forwards a client's text frame to the room's worker. Waits while the
    /// worker's queued client messages fill their bytes budget (backpressure
    /// on this client only).
    pub async fn forward(&self, conn: ConnId, text: MessageText) -> Result<(), RoomLost> {
        let charge = self
            .0
            .inbox
            .budget
            .charge(text.len())
            .await
            .map_err(|_| RoomLost)?;
        self.send(conn, SessionEvent::Message { text, charge });
        Ok(())
    }

    /// Removes a connection from its room. If it is joined, the worker is told,
    /// and the last leave closes the room on the worker.
    pub fn leave(&self, conn: ConnId) {
        self.send(conn, SessionEvent::Leave);
    }
}
