//! A quarantined room's edits, kept: the room is closed because it keeps
//! crashing its workers, but its last checkpoint and journal hold what its
//! members saw acknowledged. A salvage process (`session-server salvage`, the
//! worker's code in a process of its own) replays them into a fallback file;
//! an event that crashes the replay too is skipped by the next attempt, since
//! the process names each event before applying it.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tracing::{error, info, warn};

use super::lifecycle::WorkerProgram;
use crate::rooms::RoomSalvage;
use contract::ipc::{SALVAGE_APPLYING, SALVAGE_FILE, SALVAGE_NO_FILE, Salvage};

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
}

/// Replays `room` into a fallback file under `data_dir`, in a task of its own,
/// and logs the file at error (the room's members were closed with 1011).
pub(super) fn spawn(program: WorkerProgram, data_dir: PathBuf, room: RoomSalvage) {
    tokio::spawn(async move {
        let id = room.room.clone();
        match salvage(&program, data_dir, room).await {
            Ok(file) => {
                error!(room = %id, %file, "quarantined room: its shapes, as its members last saw them, are in the file (README, Persistence: how to replay it)")
            }
            Err(why) => {
                error!(room = %id, error = %why, "quarantined room: its edits could not be written to a fallback file")
            }
        }
    });
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
        }
    }
    Err(format!(
        "its checkpoint and journal could not be replayed (events skipped: {:?}); its edits since its last save are lost",
        request.skip
    ))
}

/// Runs one salvage process on `request`; its log lines go to this process's
/// output.
async fn attempt(program: &WorkerProgram, request: &Salvage) -> Attempt {
    let bytes = request.encode();
    let spawned = program.path().and_then(|(path, shown)| {
        Command::new(path)
            .arg0(shown)
            .arg("salvage")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
    });
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            error!(room = %request.room, error = %e, "cannot start the salvage process");
            return Attempt::Crashed(None);
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
    let outcome = match done {
        Ok(Some(file)) => Attempt::Done(file),
        Ok(None) => Attempt::Crashed(applying),
        Err(_) => {
            warn!(room = %request.room, "the salvage process did not finish in {ATTEMPT_TIMEOUT:?}; killing it");
            Attempt::Crashed(applying)
        }
    };
    let _ = child.start_kill();
    if let Ok(status) = child.wait().await
        && !status.success()
        && matches!(outcome, Attempt::Crashed(_))
    {
        info!(room = %request.room, %status, "salvage process ended");
    }
    outcome
}
