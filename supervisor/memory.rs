//! Memory: the budget the configuration promises, and giving back what the
//! supervisor no longer uses.
//!
//! **The budget** (`--memory-limit`, by default the memory cgroup's limit): the
//! resident memory of the supervisor and its workers is measured every
//! [`SAMPLE_EVERY`]; from [`ROOMS_REFUSED_AT`] of the budget new rooms get 503
//! (`connections_rejected_total{reason="memory"}`), from [`SHAPES_REFUSED_AT`]
//! every room also refuses new shapes (`frames_ignored_total{reason="memory"}`),
//! each until usage is [`RELEASE_BELOW`] points under its threshold. So a full
//! server says no to more work instead of letting the kernel's OOM killer decide
//! (and workers offer themselves to it first: `worker::OOM_SCORE_ADJ`).
//!
//! **Freed memory**: a room's journal and its clients' messages are many small
//! heap blocks; once the room is freed, glibc's allocator keeps them for reuse,
//! so a burst (an outage, big messages) would otherwise leave the process at its
//! peak size for good.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::Shared;
use super::rooms::Placed;

/// How often resident memory is measured against the budget.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Share of the budget from which new rooms are refused.
pub const ROOMS_REFUSED_AT: f64 = 0.80;
/// Share of the budget from which new shapes are refused too.
pub const SHAPES_REFUSED_AT: f64 = 0.90;
/// A refusal ends once usage is this share of the budget under its threshold.
pub const RELEASE_BELOW: f64 = 0.05;

/// A threshold with its hysteresis: on at `at`, off under `at - RELEASE_BELOW`.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Refusal {
    on: bool,
}

impl Refusal {
    /// The new state for `share` of the budget in use; true if it changed.
    fn update(&mut self, share: f64, at: f64) -> bool {
        let on = if self.on {
            share >= at - RELEASE_BELOW
        } else {
            share >= at
        };
        std::mem::replace(&mut self.on, on) != on
    }
}

/// Runs for the life of the server when it has a memory budget: measures the
/// processes' resident memory and tells the registry what to refuse.
pub async fn enforce_budget(shared: Arc<Shared>, limit: u64) {
    let mut ticks = tokio::time::interval(SAMPLE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    shared.metrics.memory_limit.set(limit as i64);
    let (mut rooms, mut shapes) = (Refusal::default(), Refusal::default());
    loop {
        ticks.tick().await;
        let pids = shared.pool.slots().iter().filter_map(|slot| slot.pid());
        let resident: u64 = std::iter::once(std::process::id())
            .chain(pids)
            .filter_map(resident_bytes)
            .sum();
        shared.metrics.memory_resident.set(resident as i64);
        let share = resident as f64 / limit as f64;
        let rooms_changed = rooms.update(share, ROOMS_REFUSED_AT);
        let shapes_changed = shapes.update(share, SHAPES_REFUSED_AT);
        if !rooms_changed && !shapes_changed {
            continue;
        }
        let mib = |bytes: u64| bytes >> 20;
        if rooms.on || shapes.on {
            warn!(
                resident_mib = mib(resident),
                limit_mib = mib(limit),
                new_rooms_refused = rooms.on,
                new_shapes_refused = shapes.on,
                "memory budget nearly spent: refusing more work (503 for new rooms{})",
                if shapes.on {
                    ", new shapes ignored"
                } else {
                    ""
                }
            );
        } else {
            info!(
                resident_mib = mib(resident),
                limit_mib = mib(limit),
                "memory budget: new rooms and shapes accepted again"
            );
        }
        shared
            .registry
            .set_memory_pressure(rooms.on, shapes_changed.then_some(shapes.on));
    }
}

/// A process's resident memory, from `/proc/PID/statm` (pages).
fn resident_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the system.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as u64 } else { 4096 }
}

/// How often to look; trimming walks the heap, so only after rooms were freed.
const CHECK_EVERY: Duration = Duration::from_secs(10);

/// Runs for the life of the server, watching the rooms placed.
pub async fn return_freed_memory(placed: watch::Receiver<Placed>) {
    let mut ticks = tokio::time::interval(CHECK_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rooms_before = 0;
    loop {
        ticks.tick().await;
        let rooms = placed.borrow().now;
        if rooms < rooms_before {
            trim();
        }
        rooms_before = rooms;
    }
}

fn trim() {
    let released = contract::alloc::return_freed_memory();
    tracing::debug!(released, "freed memory returned to the system");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each refusal turns on at its threshold and off only well under it.
    #[test]
    fn a_refusal_has_hysteresis() {
        let mut refusal = Refusal::default();
        assert!(!refusal.update(0.79, ROOMS_REFUSED_AT));
        assert!(refusal.update(0.80, ROOMS_REFUSED_AT) && refusal.on);
        assert!(!refusal.update(0.76, ROOMS_REFUSED_AT) && refusal.on);
        assert!(refusal.update(0.74, ROOMS_REFUSED_AT) && !refusal.on);
    }

    #[test]
    fn this_process_has_resident_memory() {
        let bytes = resident_bytes(std::process::id()).unwrap();
        assert!(bytes > 1 << 20, "{bytes}");
    }
}
