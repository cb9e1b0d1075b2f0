//! `session-server salvage`: replays a room into a fallback file. A room closed
//! because its frames keep crashing workers, or one whose worker was lost during
//! a stop, still holds edits its members saw acknowledged: the supervisor's last
//! checkpoint of it and the journal after it. The supervisor hands them to this
//! process, which writes the room's shapes to `<data-dir>/unsaved/` on its own:
//! it outlives the supervisor if the server stops meanwhile (its result line
//! is then read by nobody, its logs go to stderr, the container's log).
//!
//! The replay itself runs in a child process per attempt (`salvage
//! --attempt`), which names each event before applying it: if an event crashes
//! the replay too (a fault signal, or a hang), the next attempt skips it, as a
//! worker's crash is blamed only with evidence; an attempt killed from outside
//! is run again as it was (README, "What survives what").

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;
use tracing::{error, warn};

use crate::core::room_from_checkpoint;
use crate::room::Room;
use crate::store::fallback;
use contract::ipc::{SALVAGE_APPLYING, SALVAGE_FILE, SALVAGE_NO_FILE, Salvage};
use contract::process::ended_by_a_fault;

/// Attempts at most: each one that crashes skips the event it crashed on (or,
/// crashing before any event, the checkpoint), so a few poison frames are
/// stepped over and a replay that cannot succeed still ends.
const MAX_ATTEMPTS: usize = 5;
/// An attempt silent this long (no event started, no result) hangs: it is
/// killed, and the event it was on is skipped like one that crashed.
const HANG_AFTER: Duration = Duration::from_secs(60);

/// Entry point: one [`Salvage`] on stdin; the file (a [`SALVAGE_FILE`] line)
/// or why none (a [`SALVAGE_NO_FILE`] line) on stdout. With `attempt`, one
/// replay as the driver runs it (progress lines first).
pub fn main(attempt: bool) -> anyhow::Result<()> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .context("reading the salvage request")?;
    let request = Salvage::decode(&bytes).context("decoding the salvage request")?;
    if attempt {
        return replay_once(request);
    }
    #[cfg(debug_assertions)]
    test_delay();
    let result = drive(request);
    // The supervisor may be gone (a stop): the file is written either way.
    let mut out = std::io::stdout().lock();
    let _ = match &result {
        Ok(file) => writeln!(out, "{SALVAGE_FILE}{file}"),
        Err(why) => writeln!(out, "{SALVAGE_NO_FILE}{why}"),
    };
    let _ = out.flush();
    Ok(())
}

/// Test builds only: `SESSION_SERVER_TEST_SALVAGE_DELAY_MS` holds a salvage
/// back, so a test can stop the server while one is under way. Release builds
/// do not contain this code.
#[cfg(debug_assertions)]
fn test_delay() {
    if let Some(ms) = std::env::var("SESSION_SERVER_TEST_SALVAGE_DELAY_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// How one attempt ended.
enum Attempt {
    /// The file, or why none could be written (the shapes are then in the
    /// attempt's error line).
    Done(Result<String, String>),
    /// It crashed or hung while applying this event (`None`: before any).
    Crashed(Option<u64>),
    /// It was killed from outside, or could not start: run it again.
    Interrupted,
}

/// Runs attempts until one writes the file (or none can); returns the file.
fn drive(mut request: Salvage) -> Result<String, String> {
    let room = request.room.clone();
    for _ in 0..MAX_ATTEMPTS {
        match attempt(&request) {
            Attempt::Done(file) => {
                if !request.skip.is_empty() {
                    warn!(%room, skipped = ?request.skip, "the room's fallback file leaves out the events that crashed its replay");
                }
                return file.map_err(|why| {
                    format!("no fallback file could be written ({why}); the shapes are in the salvage's error line")
                });
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
            Attempt::Interrupted => {
                warn!(%room, "a replay of the room was ended from outside; trying again")
            }
        }
    }
    let why = format!(
        "its checkpoint and journal could not be replayed (events skipped: {:?}); its edits since its last save are lost",
        request.skip
    );
    error!(%room, "{why}");
    Err(why)
}

/// One replay in a child process (this executable, `salvage --attempt`).
fn attempt(request: &Salvage) -> Attempt {
    let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
    let spawned = Command::new(exe)
        .args(["salvage", "--attempt"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            error!(room = %request.room, error = %e, "cannot start a salvage attempt");
            return Attempt::Interrupted;
        }
    };
    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        unreachable!("both are piped");
    };
    // Fed while its output is read: a large room fills the pipe.
    let bytes = request.encode();
    std::thread::spawn(move || {
        // An attempt that crashes early closes the pipe: its exit says more.
        let _ = stdin.write_all(&bytes);
    });
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut applying = None;
    let done = loop {
        match lines.recv_timeout(HANG_AFTER) {
            Ok(line) => {
                if let Some(seq) = line.strip_prefix(SALVAGE_APPLYING) {
                    applying = seq.parse().ok();
                } else if let Some(file) = line.strip_prefix(SALVAGE_FILE) {
                    break Some(Ok(file.to_owned()));
                } else if let Some(why) = line.strip_prefix(SALVAGE_NO_FILE) {
                    break Some(Err(why.to_owned()));
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break None,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                warn!(room = %request.room, seq = ?applying, "a replay of the room hangs; killing it");
                let _ = child.kill();
                let _ = child.wait();
                return Attempt::Crashed(applying);
            }
        }
    };
    let status = child.wait();
    match done {
        Some(file) => Attempt::Done(file),
        None if status.as_ref().is_ok_and(ended_by_a_fault) => Attempt::Crashed(applying),
        None => Attempt::Interrupted,
    }
}

/// One replay: the room rebuilt (see [`replay`]), its file written, the
/// result line printed.
fn replay_once(request: Salvage) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let (kind, written, room) = replay(request, &mut out)?;
    match written {
        Ok(file) => writeln!(out, "{SALVAGE_FILE}{}", file.display())?,
        Err(e) => {
            error!(room = %room.id(), kind, error = %e, shapes_json = %room.shapes_json(), "a room's fallback file cannot be written; its shapes are in this line");
            writeln!(out, "{SALVAGE_NO_FILE}{e}")?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Rebuilds the room (checkpoint, then every event not skipped, each announced
/// on `progress` first) and writes its shapes to a fallback file: `quarantined`
/// (or `unsaved` for a room lost with its worker) when the checkpoint held the
/// whole board, `quarantined-unmerged` (`unmerged`) when the stored board was
/// not in it (no checkpoint, or a degraded room), to be merged into the stored
/// board rather than replace it.
fn replay(
    request: Salvage,
    progress: &mut impl Write,
) -> anyhow::Result<(&'static str, std::io::Result<std::path::PathBuf>, Room)> {
    let Salvage {
        room: id,
        id_seed,
        image,
        events,
        skip,
        quarantined,
        data_dir,
    } = request;
    let (mut room, whole) = match image.and_then(|bytes| room_from_checkpoint(id.clone(), &bytes)) {
        Some((room, degraded)) => (room, !degraded),
        None => (Room::new(id.clone(), id_seed), false),
    };
    for stamped in events.iter().filter(|e| !skip.contains(&e.seq)) {
        writeln!(progress, "{SALVAGE_APPLYING}{}", stamped.seq)?;
        progress.flush()?;
        #[cfg(debug_assertions)]
        crate::core::poison::check(stamped);
        room.apply_counted(stamped);
    }
    let kind = match (quarantined, whole) {
        (true, true) => "quarantined",
        (true, false) => "quarantined-unmerged",
        (false, true) => "unsaved",
        (false, false) => "unmerged",
    };
    let written = fallback::write(&data_dir, &id, kind, &room.shapes_json());
    Ok((kind, written, room))
}

#[cfg(test)]
mod tests {
    use super::*;
    use contract::ipc::{ConnId, RoomEvent, RoomId, Stamped};
    use serde_json::{Value, json};

    fn event(seq: u64, event: RoomEvent) -> Stamped {
        Stamped {
            room: RoomId("q".into()),
            seq,
            time_ms: 1_704_110_400_000 + seq as i64,
            event,
        }
    }

    fn create(seq: u64, x: i64) -> Stamped {
        event(
            seq,
            RoomEvent::Message {
                conn: ConnId(1),
                text: json!({"type":"shape_create","shapeType":"oval","x":x,"y":0,"width":1,"height":1}).to_string().into(),
            },
        )
    }

    /// A room with no checkpoint: the journal's shapes, the skipped event left
    /// out, in a `quarantined-unmerged` file; each event announced before it
    /// is applied.
    #[test]
    fn the_journal_is_replayed_into_a_file_without_the_skipped_events() {
        let dir = std::env::temp_dir().join(format!("ss-salvage-{}", rand::random::<u64>()));
        let join = event(
            1,
            RoomEvent::Join {
                conn: ConnId(1),
                user_id: "a".into(),
                v2: false,
                deflate: false,
            },
        );
        let request = Salvage {
            room: RoomId("q".into()),
            id_seed: 9,
            image: None,
            events: vec![join, create(2, 10), create(3, 20), create(4, 30)],
            skip: vec![3],
            quarantined: true,
            data_dir: dir.clone(),
        };
        let mut progress = Vec::new();
        let (kind, written, _) = replay(request, &mut progress).unwrap();
        assert_eq!(kind, "quarantined-unmerged");
        assert_eq!(
            String::from_utf8(progress).unwrap(),
            "applying 1\napplying 2\napplying 4\n"
        );
        let file = written.unwrap();
        let body: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        let xs: Vec<i64> = body["data"]["shapes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["x"].as_i64().unwrap())
            .collect();
        assert_eq!(xs, [10, 30]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
