//! The rooms placed on this server, as the supervisor sees them. It never looks
//! inside room state. One job per module:
//!
//! - [`registry`]: **placement**, which worker slot holds each room
//!   (capacity, the least loaded worker, avoiding a silent one), and what
//!   reports rooms reads (`/status`, `/metrics`, the monitor, Agones);
//! - [`slot`]: [`SlotRooms`], every room of one worker slot, owned by that
//!   slot's task: sessions' events in, the worker's replies in, frames out;
//!   [`restore`]: how it rebuilds its rooms on a replacement worker;
//! - [`handle`]: what a session holds of its room ([`RoomHandle`]: join,
//!   forward, leave, probe the user's earlier connection) and how the two
//!   talk: the events sent to the slot's task;
//! - [`conn_state`]: what a session is told ([`ConnState`]) and the cell
//!   that carries it and wakes the session (rung when its room publishes, the
//!   shutdown phase moves, or its ping is due);
//! - [`room`]: one placed room and its members;
//! - [`fanout`]: the room's newest snapshot and its recent v2 ops steps;
//! - [`recovery`]: what lets a room outlive its worker (stamping, checkpoint
//!   and [`journal`], crash blame);
//! - [`saves`]: whether the store keeps refusing saves.
//!
//! Imports run one way: `registry` and `slot` on top, then `restore`, `room`,
//! `handle`, `conn_state`, and `fanout`, `recovery`, `journal` at the bottom.
//!
//! Ordering: each slot's task handles its events one at a time, in the order
//! they came, so sequence numbers follow queue order and `OpenRoom` /
//! `CloseRoom` are decided together with the joins and leaves they depend on.
//! Nothing on the message path takes a lock; the placement table's lock is
//! taken once per connection (its registration) and once per room (its
//! release).

pub mod conn_state;
pub mod fanout;
pub mod handle;
pub mod journal;
pub mod recovery;
pub mod registry;
pub mod restore;
pub mod room;
pub mod saves;
pub mod slot;
#[cfg(test)]
mod testing;

/// Connections are rung for their pings in this many shares, one share every
/// `--ping-interval-ms` ÷ this: each connection once an interval, and the
/// pings of thousands of idle connections spread over it rather than at once.
pub const PING_SHARES: u64 = 16;

pub use conn_state::Woken;
pub use fanout::{Published, SnapshotCell};
pub(crate) use handle::SlotInboxReceiver;
pub use handle::{ConnState, ConnStateReceiver, Holder, Membership, RoomHandle, RoomTraffic};
pub use recovery::{RESTORE_ANSWER_MARGIN, RoomSalvage};
pub(crate) use registry::lock;
pub use registry::{Placed, PlacementError, Registry};
pub use saves::SAVES_FAILING_UNREADY_AFTER;
pub(crate) use slot::SlotRooms;
