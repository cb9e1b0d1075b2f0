//! The local fallback for shapes no store will take (a backend that keeps
//! refusing a room's saves, a board cut to the room's limits): one file per
//! room and event under `<data-dir>/unsaved/`, holding the shapes in the
//! backend's save format (`{"data":{"shapes":[…],"cursors":[]}}`), so an
//! operator can replay it with a `PUT` of the file as the body.

use std::io::Write;
use std::path::{Path, PathBuf};

use contract::ipc::RoomId;

/// Folder of fallback files inside `--data-dir`.
pub const FALLBACK_DIR: &str = "unsaved";

/// Longest room part of a file name: a room id (128 bytes) escaped can reach
/// 384 bytes, over the usual 255-byte name limit; longer ones are shortened
/// and told apart by a hash.
const MAX_ROOM_PART: usize = 120;

/// Writes `shapes_json` (a JSON array) as a new file for `room` and returns its
/// path. `kind` ends the name (`unsaved`, `unmerged`, `trimmed`): what the
/// shapes are. The file is complete on disk (synced) before this returns.
pub fn write(
    data_dir: &Path,
    room: &RoomId,
    kind: &str,
    shapes_json: &str,
) -> std::io::Result<PathBuf> {
    let dir = data_dir.join(FALLBACK_DIR);
    std::fs::create_dir_all(&dir)?;
    let stem = format!(
        "{}-{}-{kind}",
        file_safe(&room.0),
        contract::protocol::unix_time_ms()
    );
    let body = format!(r#"{{"data":{{"shapes":{shapes_json},"cursors":[]}}}}"#);
    // Never overwrite an earlier fallback: add a counter on a name clash.
    for n in 0u32.. {
        let name = match n {
            0 => format!("{stem}.json"),
            n => format!("{stem}-{n}.json"),
        };
        let path = dir.join(name);
        let mut file = match std::fs::File::create_new(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        };
        // A disk that fills up midway leaves no truncated file to mislead
        // whoever replays the folder: the caller falls back to the log.
        if let Err(e) = file
            .write_all(body.as_bytes())
            .and_then(|()| file.sync_all())
        {
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        return Ok(path);
    }
    unreachable!("u32 counter exhausted")
}

/// A room id as a file name: ASCII letters, digits, `-` and `_` stay, every
/// other byte becomes `%XX` (so `..`, `/` and control characters cannot form a
/// path); a long result keeps its start and a hash of the whole id.
pub fn file_safe(room: &str) -> String {
    let mut out = String::with_capacity(room.len());
    for b in room.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.len() > MAX_ROOM_PART {
        // FNV-1a: stable across builds, unlike std's hasher.
        let hash = room.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        });
        out.truncate(MAX_ROOM_PART - 17);
        // `%XX` may have been cut in the middle: harmless in a name.
        out = format!("{out}~{hash:016x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_ids_become_safe_file_names() {
        assert_eq!(file_safe("room-1_a"), "room-1_a");
        assert_eq!(file_safe("../etc/passwd"), "%2E%2E%2Fetc%2Fpasswd");
        assert_eq!(file_safe("a b\u{1}é"), "a%20b%01%C3%A9");
        let long = file_safe(&"/".repeat(128));
        assert_eq!(long.len(), MAX_ROOM_PART);
        assert_ne!(long, file_safe(&format!("{}x", "/".repeat(127))));
    }

    #[test]
    fn a_fallback_file_holds_the_save_body_and_never_overwrites() {
        let dir = std::env::temp_dir().join(format!("ss-fallback-{}", rand::random::<u64>()));
        let room = RoomId("r/1".into());
        let a = write(&dir, &room, "unsaved", r#"[{"id":"1"}]"#).unwrap();
        let b = write(&dir, &room, "unsaved", "[]").unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(dir.join(FALLBACK_DIR)));
        let body: serde_json::Value = serde_json::from_slice(&std::fs::read(&a).unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"data":{"shapes":[{"id":"1"}],"cursors":[]}})
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
