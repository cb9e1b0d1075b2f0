//! Gives memory the supervisor no longer uses back to the system. A room's
//! journal and its clients' messages are many small heap blocks; once the room
//! is freed, glibc's allocator keeps them for reuse in the arena of whichever
//! thread freed them, so a burst (an outage, big messages) would otherwise leave
//! the process at its peak size for good.

use std::time::Duration;

use tokio::sync::watch;

use super::rooms::Placed;

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

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    unsafe extern "C" {
        /// glibc: releases free memory at the top of the heap and free pages
        /// inside every arena; returns 1 if any memory was released.
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    // SAFETY: malloc_trim takes no pointers and is thread-safe (it locks each
    // arena while it walks it).
    let released = unsafe { malloc_trim(0) };
    tracing::debug!(
        released = released == 1,
        "freed memory returned to the system"
    );
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
