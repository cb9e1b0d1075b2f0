//! A room's edits kept when no worker can keep them: a room closed because it
//! keeps crashing its workers, or one whose worker was lost during a stop. Its
//! last checkpoint and journal hold what its members saw acknowledged; a
//! salvage process (`session-server salvage`, the worker's code in a process
//! of its own) replays them into a fallback file. It steps over events that
//! crash the replay by itself, and finishes its file even if the server stops
//! meanwhile (`worker::salvage`).

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

use super::program::{self, WorkerProgram};
use crate::rooms::RoomSalvage;
use contract::ipc::{RoomId, SALVAGE_FILE, SALVAGE_NO_FILE, Salvage};

/// Salvage processes started at most for one room: one that is killed from
/// outside before its result (the OOM killer) is started again.
const MAX_RUNS: usize = 3;
/// How long a salvage process may take to start (fork to exec): one stopped
/// before it counts as a run that ended without its result.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The salvages of quarantined rooms under way, and those that failed: a stop
/// waits for the first (within its budget) and counts both as not saved, so
/// its exit code says so.
#[derive(Default)]
pub(super) struct Salvages {
    tasks: TaskTracker,
    /// Rooms being replayed now.
    pending: Mutex<HashSet<RoomId>>,
    /// Rooms whose replay wrote no file.
    failed: Mutex<Vec<RoomId>>,
}

impl Salvages {
    /// Replays `room` into a fallback file under `data_dir`, in a task of its
    /// own, and logs the file at error (the room's members were closed with
    /// 1011).
    pub(super) fn spawn(
        self: &Arc<Self>,
        program: WorkerProgram,
        data_dir: PathBuf,
        room: RoomSalvage,
    ) {
        let salvages = self.clone();
        let id = room.room.clone();
        lock(&self.pending).insert(id.clone());
        self.tasks.spawn(async move {
            match salvage(&program, data_dir, room).await {
                Ok(file) => error!(room = %id, %file, "quarantined room: its shapes, as its members last saw them, are in the file (README, Persistence: how to replay it)"),
                Err(why) => {
                    error!(room = %id, error = %why, "quarantined room: its edits could not be written to a fallback file");
                    lock(&salvages.failed).push(id.clone());
                }
            }
            lock(&salvages.pending).remove(&id);
        });
    }

    /// Waits until `deadline` for the salvages under way; returns the rooms
    /// whose edits are in no file: still being replayed (their processes go
    /// on after the server exits), or failed.
    pub(super) async fn settle(&self, deadline: tokio::time::Instant) -> Vec<RoomId> {
        self.tasks.close();
        let _ = tokio::time::timeout_at(deadline, self.tasks.wait()).await;
        let mut rooms: Vec<RoomId> = lock(&self.pending).iter().cloned().collect();
        rooms.extend(lock(&self.failed).iter().cloned());
        rooms.sort();
        rooms
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Replays `room` into a fallback file under `data_dir`; returns the file, or
/// why there is none.
pub(super) async fn salvage(
    program: &WorkerProgram,
    data_dir: PathBuf,
    room: RoomSalvage,
) -> Result<String, String> {
    let RoomSalvage {
        room,
        id_seed,
        image,
        events,
        complete,
        quarantined,
    } = room;
    if !complete {
        warn!(%room, "the room's journal had overflowed: its fallback file misses the events dropped since its last checkpoint");
    }
    let request = Salvage {
        room: room.clone(),
        id_seed,
        image,
        events,
        skip: Vec::new(),
        quarantined,
        data_dir,
    };
    for _ in 0..MAX_RUNS {
        if let Some(result) = run(program, &request).await {
            return result;
        }
        warn!(%room, "the salvage process ended before its result; starting it again");
    }
    Err(format!(
        "{MAX_RUNS} salvage processes ended before their result (killed from outside?); the room's edits since its last save are lost"
    ))
}

/// Runs one salvage process on `request`; returns its result, or `None` if it
/// ended without one. Not killed with this process: one still writing when the
/// server exits finishes its file.
async fn run(program: &WorkerProgram, request: &Salvage) -> Option<Result<String, String>> {
    let bytes = request.encode();
    let spawned = match program.path() {
        Ok((path, shown)) => {
            let mut command = Command::new(path);
            command
                .arg0(shown)
                .arg("salvage")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(false);
            program::start(command, START_TIMEOUT).await
        }
        Err(e) => Err(e),
    };
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            error!(room = %request.room, error = %e, "cannot start the salvage process");
            return None;
        }
    };
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        unreachable!("both are piped");
    };
    let feed = async move {
        // A process that ends early closes the pipe: its result says more.
        let _ = stdin.write_all(&bytes).await;
    };
    let read = async {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(file) = line.strip_prefix(SALVAGE_FILE) {
                return Some(Ok(file.to_owned()));
            } else if let Some(why) = line.strip_prefix(SALVAGE_NO_FILE) {
                return Some(Err(why.to_owned()));
            }
        }
        None
    };
    let ((), result) = tokio::join!(feed, read);
    let _ = child.wait().await;
    result
}
