//! The tests' harness (`tests/support`) as the recovery benchmark includes it
//! (`#[path = "../tests/util/mod.rs"]` in `benches/recovery.rs`). The benchmark
//! uses only part of it, hence the `allow` here, for the benchmark alone: the
//! test binary includes `tests/support` itself, where nothing may be dead. Once
//! the benchmark names `tests/support` (allowing dead code there), this file goes.
#![allow(dead_code)]

#[path = "../support/mod.rs"]
mod support;

pub use support::*;
