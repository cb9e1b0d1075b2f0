//! What both roles read of how a process ended.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// Signals a process raises itself when it faults or aborts (a panic aborts a
/// worker): evidence that what it was doing crashed it, unlike a signal sent
/// from outside (SIGKILL from the OOM killer or an operator, SIGTERM).
pub const FAULT_SIGNALS: [i32; 7] = [
    libc::SIGILL,
    libc::SIGTRAP,
    libc::SIGABRT,
    libc::SIGBUS,
    libc::SIGFPE,
    libc::SIGSEGV,
    libc::SIGSYS,
];

/// Whether the process was ended by one of [`FAULT_SIGNALS`].
pub fn ended_by_a_fault(status: &ExitStatus) -> bool {
    status
        .signal()
        .is_some_and(|signal| FAULT_SIGNALS.contains(&signal))
}
