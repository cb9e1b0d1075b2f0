//! When the server is a container's first process (PID 1, as the image's
//! entrypoint makes it), it runs as the container's init: the kernel kills
//! every process of a PID namespace the moment its PID 1 dies, so a
//! supervisor that is PID 1 and dies (SIGKILL, the OOM killer) would take its
//! workers with it before they save what they hold. So PID 1 starts the
//! supervisor as its child and stays small: it passes the stop signals on,
//! reaps every process (orphaned workers are given to it), and exits with the
//! supervisor's code once no process is left (at most [`ORPHANS_GRACE`] after
//! the supervisor).

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// Set in the supervisor's environment, so it does not start an init again.
const CHILD_ENV: &str = "SESSION_SERVER_UNDER_INIT";
/// After the supervisor has ended, how long its orphans (workers saving,
/// salvage processes writing) may take before PID 1 exits anyway.
const ORPHANS_GRACE: Duration = Duration::from_secs(10);

/// The supervisor's pid, for the signal handler.
static SUPERVISOR: AtomicI32 = AtomicI32::new(0);

/// Whether this process should be the init: PID 1, not started by one.
pub fn needed() -> bool {
    std::process::id() == 1 && std::env::var_os(CHILD_ENV).is_none()
}

/// Runs the init: the supervisor (this same executable, same arguments) as a
/// child, until every process is gone.
pub fn run() -> ExitCode {
    // First, so a stop signal that comes while the supervisor starts is kept
    // and passed on once it runs.
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        handle(signal, pass_on);
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
    // Its own process group: a terminal's Ctrl-C reaches this process's group
    // only, and is passed on once (twice would be the "exit now" signal).
    let child = match Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env(CHILD_ENV, "1")
        .process_group(0)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("session-server: cannot start the supervisor under PID 1: {e}");
            return ExitCode::FAILURE;
        }
    };
    let supervisor = child.id() as libc::pid_t;
    SUPERVISOR.store(supervisor, Ordering::SeqCst);
    let early = PENDING.swap(0, Ordering::SeqCst);
    if early != 0 {
        // SAFETY: kill(2) takes a pid and a signal number.
        unsafe { libc::kill(supervisor, early) };
    }
    let code = loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into the integer passed.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == supervisor {
            break if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status) as u8
            } else {
                128 + libc::WTERMSIG(status) as u8
            };
        }
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            break 1; // cannot happen: the supervisor is a child until reaped
        }
    };
    // The supervisor's orphans (workers saving, salvage processes writing)
    // are this process's now: reaped as they end, for a bounded time.
    let deadline = Instant::now() + ORPHANS_GRACE;
    while Instant::now() < deadline {
        let mut status = 0;
        // SAFETY: as above; WNOHANG returns at once.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        match pid {
            0 => std::thread::sleep(Duration::from_millis(20)),
            p if p > 0 => {}
            _ => break, // ECHILD: nobody left
        }
    }
    ExitCode::from(code)
}

/// A stop signal that came before the supervisor was started.
static PENDING: AtomicI32 = AtomicI32::new(0);

/// Installs `handler` for `signal`.
fn handle(signal: libc::c_int, handler: extern "C" fn(libc::c_int)) {
    // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the handler
    // only calls kill(2) or stores an atomic, both async-signal-safe.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigaction(signal, &action, std::ptr::null_mut());
    }
}

extern "C" fn pass_on(signal: libc::c_int) {
    let supervisor = SUPERVISOR.load(Ordering::SeqCst);
    if supervisor > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(supervisor, signal) };
    } else {
        PENDING.store(signal, Ordering::SeqCst);
    }
}
