//! The clients that use this server, against the real binary: the dev board in
//! a real browser, the TypeScript client's own tests, and the load generator;
//! and the backend's Agones scheduler against a fake allocator.

mod agones_scheduler;
mod browser;
mod loadgen;
mod typescript;
