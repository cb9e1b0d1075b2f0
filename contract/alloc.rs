//! What both processes ask of the allocator: give freed memory back.

/// Allocations from this size up are mapped on their own and unmapped when
/// freed. glibc's default threshold rises to the largest block ever freed (up
/// to 32 MiB), after which a full board's 12 MB snapshots and checkpoints come
/// from the heap and their space stays with the process; fixed here, they go
/// back to the system as soon as they are dropped.
pub const MMAP_THRESHOLD: usize = 128 << 10;

/// Sets the allocator up for big, short-lived blocks ([`MMAP_THRESHOLD`]);
/// called once at the start of every process of the server.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn configure() {
    unsafe extern "C" {
        /// glibc: sets an allocator parameter; returns 1 on success.
        fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
    }
    /// glibc's `M_MMAP_THRESHOLD`.
    const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
    // SAFETY: mallopt takes two integers; called before any thread starts.
    unsafe { mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD as std::ffi::c_int) };
}

/// Elsewhere the allocator is left alone.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn configure() {}

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
