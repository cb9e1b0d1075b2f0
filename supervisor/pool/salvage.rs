//! A quarantined room's edits, kept: the room is closed because it keeps
//! crashing its workers, but its last checkpoint and journal hold what its
//! members saw acknowledged. A salvage process (`session-server salvage`, the
//! worker's code in a process of its own) replays them into a fallback file;
//! an event that crashes the replay too is skipped by the next attempt, since
//! the process names each event before applying it.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::lifecycle::{WorkerProgram, fault_signal};
use crate::rooms::RoomSalvage;
use contract::ipc::{RoomId, SALVAGE_APPLYING, SALVAGE_FILE, SALVAGE_NO_FILE, Salvage};

/// Attempts at most: each one that crashes skips the event it crashed on (or,
/// crashing before any event, the checkpoint), so a few poison frames are
/// stepped over and a replay that cannot succeed still ends.
const MAX_ATTEMPTS: usize = 5;
/// One attempt's bound: a replay that hangs is killed, and the event it was
/// on is skipped like one that crashed.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

/// How one attempt ended.
enum Attempt {
    /// The file (or why none could be written: the shapes are then in the
    /// salvage process's error line).
    Done(Result<String, String>),
    /// It crashed or hung while applying this event (`None`: before any).
    Crashed(Option<u64>),
    /// It was killed from outside (or could not start): nothing to blame.
    Interrupted,
}

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
    let mut request = Salvage {
        room: room.clone(),
        id_seed,
        image,
        events,
        skip: Vec::new(),
        quarantined,
        data_dir,
    };
    for _ in 0..MAX_ATTEMPTS {
        match attempt(program, &request).await {
            Attempt::Done(Ok(file)) => {
                if !request.skip.is_empty() {
                    warn!(%room, skipped = ?request.skip, "the room's fallback file leaves out the events that crashed its replay");
                }
                return Ok(file);
            }
            Attempt::Done(Err(why)) => {
                return Err(format!(
                    "no fallback file could be written ({why}); the shapes are in the salvage's error line"
                ));
            }
            Attempt::Crashed(Some(seq)) => {
                warn!(%room, seq, "replaying the room crashed on this event; replaying again without it");
                request.skip.push(seq);
            }
            Attempt::Crashed(None) if request.image.is_some() => {
                warn!(%room, "replaying the room crashed on its checkpoint; replaying its journal alone");
                request.image = None;
            }
            Attempt::Crashed(None) => break,
            Attempt::Interrupted => {}
        }
    }
    Err(format!(
        "its checkpoint and journal could not be replayed (events skipped: {:?}); its edits since its last save are lost",
        request.skip
    ))
}

/// Runs one salvage process on `request`; its log lines go to this process's
/// output. A process that ends without its file is blamed on the event it was
/// applying only with evidence, as a worker's crash is: a fault signal it
/// raised itself, or a hang past [`ATTEMPT_TIMEOUT`]. Killed from outside (the
/// OOM killer, an operator), it is tried again as it was.
async fn attempt(program: &WorkerProgram, request: &Salvage) -> Attempt {
    let bytes = request.encode();
    let spawned = program.path().and_then(|(path, shown)| {
        Command::new(path)
            .arg0(shown)
            .arg("salvage")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // Not killed with this process: one still writing when the server
            // exits finishes its file.
            .kill_on_drop(false)
            .spawn()
    });
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            error!(room = %request.room, error = %e, "cannot start the salvage process");
            return Attempt::Interrupted;
        }
    };
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        unreachable!("both are piped");
    };
    // Written while its output is read: a large room fills the pipe.
    let feed = async move {
        // A process that crashes early closes the pipe: its exit says more.
        let _ = stdin.write_all(&bytes).await;
    };
    // The event being applied, kept outside the reading so a hang reports it.
    let mut applying = None;
    let read = async {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(seq) = line.strip_prefix(SALVAGE_APPLYING) {
                applying = seq.parse().ok();
            } else if let Some(file) = line.strip_prefix(SALVAGE_FILE) {
                return Some(Ok(file.to_owned()));
            } else if let Some(why) = line.strip_prefix(SALVAGE_NO_FILE) {
                return Some(Err(why.to_owned()));
            } else {
                println!("{line}");
            }
        }
        None
    };
    let done = tokio::time::timeout(ATTEMPT_TIMEOUT, async {
        let ((), done) = tokio::join!(feed, read);
        done
    })
    .await;
    match done {
        Ok(Some(file)) => {
            let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
            Attempt::Done(file)
        }
        Ok(None) => {
            let status = child.wait().await;
            let described = status
                .as_ref()
                .map_or_else(|e| e.to_string(), |s| s.to_string());
            if status.as_ref().is_ok_and(fault_signal) {
                info!(room = %request.room, status = %described, "salvage process crashed");
                Attempt::Crashed(applying)
            } else {
                warn!(room = %request.room, status = %described, "salvage process ended from outside before its file; trying again");
                Attempt::Interrupted
            }
        }
        Err(_) => {
            warn!(room = %request.room, "the salvage process did not finish in {ATTEMPT_TIMEOUT:?}; killing it");
            let _ = child.start_kill();
            let _ = child.wait().await;
            Attempt::Crashed(applying)
        }
    }
}
