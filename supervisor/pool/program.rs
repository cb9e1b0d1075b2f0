//! What a worker process runs: this executable (always, in production), or
//! a server binary named by a test that runs the supervisor in its process.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::{Child, Command};

/// The program a worker process runs (in worker mode).
#[derive(Clone, Debug, Default)]
pub enum WorkerProgram {
    /// This same executable, so workers are always the same build as their
    /// supervisor: the server's only choice.
    #[default]
    ThisExecutable,
    /// The server binary at this path: for tests that run the supervisor in
    /// their own process (whose executable is the test, not the server).
    Binary(PathBuf),
}

impl WorkerProgram {
    /// The path to execute and the `argv[0]` to show (`ps` shows what runs).
    pub(super) fn path(&self) -> std::io::Result<(PathBuf, PathBuf)> {
        match self {
            // `/proc/self/exe` names the image this process runs even if the
            // file was replaced since (a new build); argv[0] is its real path.
            WorkerProgram::ThisExecutable => {
                let shown = std::env::current_exe().unwrap_or_else(|_| "session-server".into());
                let proc_exe = Path::new("/proc/self/exe");
                if proc_exe.exists() {
                    Ok((proc_exe.to_path_buf(), shown))
                } else {
                    Ok((std::env::current_exe()?, shown))
                }
            }
            WorkerProgram::Binary(path) => Ok((path.clone(), path.clone())),
        }
    }
}

/// Starts `command` on a blocking thread, giving up after `within`.
///
/// `spawn` waits until the child has called `exec`: a child stopped before that
/// (SIGSTOP, a frozen cgroup, a debugger) would otherwise hold a runtime thread,
/// and every task queued on it (the sessions, the other workers' links), until
/// it went on. On timeout the thread stays blocked until the child moves, and
/// the child is killed then, as it would be when dropped.
pub(super) async fn start(mut command: Command, within: Duration) -> io::Result<Child> {
    let spawning = tokio::task::spawn_blocking(move || command.spawn());
    match tokio::time::timeout(within, spawning).await {
        Ok(Ok(spawned)) => spawned,
        Ok(Err(join)) => Err(io::Error::other(join)),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the process did not start (exec) within {within:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// The red team's finding F4 (issue 28): a replacement worker stopped
    /// between fork and exec froze the supervisor's runtime. Here the child
    /// sleeps before its exec, on a runtime of one thread.
    #[tokio::test(flavor = "current_thread")]
    async fn a_child_slow_to_exec_holds_neither_the_runtime_nor_its_caller() {
        let ticks = Arc::new(AtomicU32::new(0));
        let ticker = tokio::spawn({
            let ticks = ticks.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    ticks.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let mut command = Command::new("true");
        command.kill_on_drop(true);
        // SAFETY: the hook only sleeps (async-signal-safe: nanosleep).
        unsafe {
            command.pre_exec(|| {
                std::thread::sleep(Duration::from_millis(1500));
                Ok(())
            });
        }
        let started = start(command, Duration::from_millis(300)).await;
        let error = started.expect_err("the child is still before its exec");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(
            ticks.load(Ordering::Relaxed) >= 3,
            "other tasks ran meanwhile: {} ticks",
            ticks.load(Ordering::Relaxed)
        );
        ticker.abort();
        // A child that execs in time is started as before.
        let mut child = start(Command::new("true"), Duration::from_secs(10))
            .await
            .expect("started");
        assert!(child.wait().await.expect("waited").success());
    }
}
