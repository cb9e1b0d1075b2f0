//! What a worker process runs: this executable (always, in production), or
//! a server binary named by a test that runs the supervisor in its process.

use std::path::{Path, PathBuf};

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
