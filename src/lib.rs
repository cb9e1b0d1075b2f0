//! session-server: a real-time session server for collaborative whiteboards.
//!
//! The crate is laid out the way the system is built (see README, "Design"):
//! - `src/` is the shared contract both processes agree on: the client protocol
//!   ([`protocol`]), the IPC frames and their codec ([`ipc`]) and configuration
//!   ([`config`]);
//! - `supervisor/` owns every client connection, authenticates it, places rooms on
//!   workers and fans snapshots out;
//! - `worker/` owns room state and logic, one OS process per worker.
//!
//! The roles live in top-level folders so the architecture is visible from the
//! repository root; they are compiled into this one library and one binary.

pub mod config;
pub mod ipc;
pub mod ipc_socket;
pub mod protocol;

#[path = "../supervisor/mod.rs"]
pub mod supervisor;

#[path = "../worker/mod.rs"]
pub mod worker;
