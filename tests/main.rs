//! The server's integration tests, one binary, one module per topic of the
//! specification. Most start the real `session-server` binary on a free loopback
//! port (the harness in `support`) and talk to it as clients, backends and
//! operators do.

mod auth;
mod clients;
mod dev_mode;
mod limits;
mod operations;
mod persistence;
mod placement;
mod properties;
mod protocol;
mod recovery;
mod support;
