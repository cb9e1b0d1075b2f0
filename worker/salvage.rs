//! `session-server salvage`: replays a room into a fallback file. A room closed
//! because its frames keep crashing workers, or one whose worker was lost during
//! a stop, still holds edits its members saw acknowledged: the supervisor's last
//! checkpoint of it and the journal after it. This process, started by the supervisor for that room
//! alone, rebuilds the room from them as a worker would and writes its shapes
//! to `<data-dir>/unsaved/`. Before each event it prints which one it applies,
//! so if an event crashes it too, the supervisor knows which, and the next
//! attempt skips it (README, "What survives what").

use std::io::{Read, Write};

use anyhow::Context;
use tracing::error;

use crate::core::room_from_checkpoint;
use crate::room::Room;
use crate::store::fallback;
use contract::ipc::{SALVAGE_APPLYING, SALVAGE_FILE, SALVAGE_NO_FILE, Salvage};

/// Entry point: one [`Salvage`] on stdin, the progress and the file on stdout.
pub fn main() -> anyhow::Result<()> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .context("reading the salvage request")?;
    let request = Salvage::decode(&bytes).context("decoding the salvage request")?;
    let mut out = std::io::stdout().lock();
    let (kind, written, room) = replay(request, &mut out)?;
    match written {
        Ok(file) => writeln!(out, "{SALVAGE_FILE}{}", file.display())?,
        Err(e) => {
            error!(room = %room.id(), kind, error = %e, shapes_json = %room.shapes_json(), "a quarantined room's fallback file cannot be written; its shapes are in this line");
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
                text: json!({"type":"shape_create","shapeType":"oval","x":x,"y":0,"width":1,"height":1}).to_string(),
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
