//! The contract of session-server: everything the supervisor and its workers
//! agree on, and nothing else. Types and pure functions only (no sockets, no
//! files, no tasks), so either role can use it and neither can reach the other
//! through it.
//!
//! - [`protocol`]: what clients send and receive (protocol v1, and v2 in
//!   [`protocol::v2`]), the close codes and limits;
//! - [`ipc`]: the frames the supervisor and a worker exchange, and their
//!   length-prefixed `postcard` encoding;
//! - [`deflate`]: permessage-deflate payloads (compressed once, in segments);
//! - [`config`]: the command line and environment, validated into settings;
//! - [`alloc`]: giving freed memory back to the system;
//! - [`process`]: what an exit status says (a fault, or a kill from outside).

#![deny(missing_docs)]

pub mod alloc;
pub mod config;
pub mod deflate;
pub mod ipc;
pub mod process;
pub mod protocol;
