//! What both processes ask of the allocator: give freed memory back.

/// Returns memory the process has freed to the system. A room's shapes,
/// snapshots and messages are many heap blocks; once the room is freed, glibc's
/// allocator keeps them for reuse (in the arena of whichever thread freed
/// them), so a burst would otherwise leave the process at its peak size for
/// good. It walks the heap: call it after rooms were freed, not per message.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn return_freed_memory() -> bool {
    unsafe extern "C" {
        /// glibc: releases free memory at the top of the heap and free pages
        /// inside every arena; returns 1 if any memory was released.
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    // SAFETY: malloc_trim takes no pointers and is thread-safe (it locks each
    // arena while it walks it).
    unsafe { malloc_trim(0) == 1 }
}

/// Elsewhere the allocator is left alone.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn return_freed_memory() -> bool {
    false
}
