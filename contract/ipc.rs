//! IPC between the supervisor and its workers: typed ids, the frames each side
//! sends, and the length-prefixed `postcard` codec that carries them over a local
//! socket.
//!
//! Frames are `[u32 big-endian length][postcard body]`. The codec is a pair of pure
//! functions ([`encode`], [`decode`]); the `transport` crate carries them over
//! the socket.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Version of the frame definitions below. The supervisor and a worker exchange it
/// in their first frames and refuse to talk on a mismatch. Bump it on any change to
/// [`ToWorker`] or [`FromWorker`].
pub const IPC_VERSION: u32 = 14;

/// Largest IPC frame body accepted. A snapshot of a full room with its
/// compressed form (never larger than the snapshot: see
/// `FromWorker::Snapshot`) is below this; anything larger is corruption.
pub const MAX_FRAME_LEN: usize = 32 * 1024 * 1024;

const LEN_PREFIX: usize = 4;

/// A room, named by the `roomId` claim of its members' tokens.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RoomId(pub String);

/// One client connection, unique for the life of a supervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConnId(pub u64);

/// A worker slot in the supervisor's pool (stable across respawns of its process).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WorkerId(pub u32);

/// Shown escaped (see [`Escaped`]): room ids come from clients' tokens and end
/// up in logs.
impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Escaped(&self.0).fmt(f)
    }
}

/// A client-supplied string as it may appear in a log line: control characters
/// (newlines, NUL, escape sequences) are written as escapes (`\n`, `\u{0}`), so
/// no input can forge a log line or make a log file binary; so are the
/// characters that reorder or break a line when it is shown (the bidi
/// embeddings, overrides and isolates U+202A–U+202E and U+2066–U+2069, and the
/// line and paragraph separators U+2028 and U+2029), so no id can make a log
/// line read other than it is. Anything else is written as it is.
pub struct Escaped<'a>(pub &'a str);

/// Whether `c` is written escaped in a log line (see [`Escaped`]).
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0;
        if !text.chars().any(needs_escape) {
            return f.write_str(text);
        }
        for c in text.chars() {
            if needs_escape(c) {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}", self.0)
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}

/// Supervisor -> worker.
///
/// `Hello` must stay the first variant with the version as its first field, so that
/// a mismatched peer can still decode it and refuse with a clear error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToWorker {
    /// The supervisor's half of the handshake, first on a new socket; answered
    /// by [`FromWorker::Hello`].
    Hello {
        /// The supervisor's [`IPC_VERSION`]; a worker with another refuses to run.
        ipc_version: u32,
        /// The slot the process fills.
        worker_id: WorkerId,
    },
    /// Create the room's state. `id_seed` is random per room instance; with the
    /// frame sequence numbers it makes shape ids unique and reproducible on replay.
    OpenRoom {
        /// The room to create (or keep, if it is closing).
        room: RoomId,
        /// Seed of this room instance's shape ids.
        id_seed: u64,
    },
    /// A room event, stamped by the supervisor.
    Event(Stamped),
    /// Every member has left: save the room if needed, then free it. Answered by
    /// `RoomClosed`, or by `CloseCancelled` if an `OpenRoom` comes first.
    CloseRoom {
        /// The room nobody is in any more.
        room: RoomId,
    },
    /// Sent once, right after a successful hello: how to persist rooms. Answered
    /// by [`FromWorker::Configured`] or [`FromWorker::StoreUnusable`].
    Configure(crate::config::PersistSettings),
    /// The server is stopping: save every room with unsaved changes within
    /// `grace_ms`, then answer `Drained`.
    Drain {
        /// Time the saves may take, from this frame's arrival.
        grace_ms: u64,
    },
    /// Re-create a room lost with a failed worker: from `image` (a checkpoint this
    /// worker type produced) if there is one, else from the store. The room's
    /// journal (events after the checkpoint) follows as ordinary `Event`s.
    RestoreRoom {
        /// The lost room.
        room: RoomId,
        /// The seed of its `OpenRoom`, so replayed events get the same shape ids.
        id_seed: u64,
        /// Its latest [`FromWorker::Checkpoint`], if it had one.
        #[serde(with = "serde_bytes")]
        image: Option<Vec<u8>>,
    },
    /// Answer `Synced` once every frame sent before this one for the room has
    /// been applied (used to attribute a crash to the room being restored).
    Sync {
        /// The room whose earlier frames must be applied first.
        room: RoomId,
        /// Returned in the answer, to match it to this request.
        token: u64,
    },
    /// Send a `Checkpoint` of the room now (its journal is getting long).
    CheckpointRequest {
        /// The room whose journal is long.
        room: RoomId,
    },
}

/// A room event with everything the worker needs to apply it deterministically:
/// the room's state is a pure function of its `OpenRoom` and its stamped events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stamped {
    /// The room the event happens in.
    pub room: RoomId,
    /// Per-room sequence number, strictly increasing in the order frames are sent.
    pub seq: u64,
    /// Wall-clock time of the event, milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// What happened.
    pub event: RoomEvent,
}

/// A client message's text (always UTF-8), shared: a clone copies no bytes,
/// so the supervisor's journal keeps the very bytes it sends the worker.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct MessageText(Bytes);

impl MessageText {
    /// The text.
    pub fn as_str(&self) -> &str {
        // Built only from `str`s and `String`s (see the `From`s).
        std::str::from_utf8(&self.0).expect("a MessageText is UTF-8")
    }
}

impl std::ops::Deref for MessageText {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<String> for MessageText {
    fn from(text: String) -> MessageText {
        MessageText(Bytes::from(text))
    }
}

impl From<&str> for MessageText {
    fn from(text: &str) -> MessageText {
        MessageText(Bytes::copy_from_slice(text.as_bytes()))
    }
}

impl fmt::Debug for MessageText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_str().fmt(f)
    }
}

impl fmt::Display for MessageText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_str().fmt(f)
    }
}

impl Serialize for MessageText {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for MessageText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<MessageText, D::Error> {
        String::deserialize(deserializer).map(MessageText::from)
    }
}

/// What happens to a room: a connection joins or leaves, or a member sends a
/// frame. A room's state changes by these alone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RoomEvent {
    /// An authenticated connection asks to join. `v2`: it speaks protocol v2
    /// (PROTOCOL-v2.md), so the room records ops while it is a member.
    /// `deflate`: it negotiated permessage-deflate, so the room's snapshots
    /// come compressed too while it is a member.
    Join {
        /// The connection asking.
        conn: ConnId,
        /// The `userId` claim of its token.
        user_id: String,
        /// It negotiated the v2 subprotocol.
        v2: bool,
        /// It negotiated permessage-deflate.
        deflate: bool,
    },
    /// The connection has closed (whether or not it was admitted).
    Leave {
        /// The closed connection.
        conn: ConnId,
    },
    /// A text frame from the client, uninterpreted by the supervisor.
    Message {
        /// The connection it came on.
        conn: ConnId,
        /// The frame, as the client sent it.
        text: MessageText,
    },
    /// The server's memory budget is nearly spent (`full`), or no longer: while
    /// it is, the room refuses new shapes. An event like the others, so a room
    /// replayed after a crash decides exactly as it did.
    MemoryBudget {
        /// New shapes are refused from now on.
        full: bool,
    },
}

/// Where a room's shapes went when no store took them (a drain that ended
/// before the room's save, a quarantined room): a fallback file, or the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fallback {
    /// The room.
    pub room: RoomId,
    /// The file that holds its shapes, or why none could be written (then the
    /// shapes are in the writer's error log line, the last resort).
    pub file: Result<String, String>,
}

/// A room handed to a salvage process (`session-server salvage`, one postcard
/// message on its stdin): its last checkpoint and the journal after it, to be
/// replayed into a fallback file, so closing a room that keeps crashing its
/// workers, or losing a worker during a stop, never discards what the room's
/// members saw acknowledged.
/// The process prints a [`SALVAGE_APPLYING`] line before each event, so a
/// frame that crashes it is known and skipped by the next attempt, then one
/// [`SALVAGE_FILE`] or [`SALVAGE_NO_FILE`] line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Salvage {
    /// The room.
    pub room: RoomId,
    /// The seed of its instance, so replayed events get the same shape ids.
    pub id_seed: u64,
    /// Its worker's last checkpoint (opaque to the supervisor), if any.
    #[serde(with = "serde_bytes")]
    pub image: Option<Vec<u8>>,
    /// Every event stamped after the checkpoint, in order.
    pub events: Vec<Stamped>,
    /// Events not to apply: they crashed an earlier attempt.
    pub skip: Vec<u64>,
    /// The room was closed because it kept crashing workers (the file says
    /// `quarantined`), not lost with its worker during a stop (`unsaved`).
    pub quarantined: bool,
    /// `--data-dir`, whose `unsaved/` folder receives the file.
    pub data_dir: std::path::PathBuf,
}

impl Salvage {
    /// The request as the salvage process reads it.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("serialising to memory cannot fail")
    }

    /// A request read by the salvage process.
    pub fn decode(bytes: &[u8]) -> Result<Salvage, CodecError> {
        Ok(postcard::from_bytes(bytes)?)
    }
}

/// Printed by a salvage process before it applies an event, with its `seq`.
pub const SALVAGE_APPLYING: &str = "applying ";
/// Printed by a salvage process once the file is written, with its path.
pub const SALVAGE_FILE: &str = "file ";
/// Printed by a salvage process whose file cannot be written, with why (its
/// shapes are then in its error log line).
pub const SALVAGE_NO_FILE: &str = "no-file ";

/// Worker -> supervisor. `Hello` first, as for [`ToWorker`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FromWorker {
    /// The worker's half of the handshake, answering [`ToWorker::Hello`].
    Hello {
        /// The worker's [`IPC_VERSION`]; the supervisor refuses another.
        ipc_version: u32,
        /// The worker's process id, as it sees it.
        pid: u32,
        /// The nonce the supervisor passed in the worker's environment, proving the
        /// peer on the socket is the process it spawned.
        nonce: u64,
    },
    /// The connection is a member now; the room's next snapshot shows it.
    JoinAccepted {
        /// The room joined.
        room: RoomId,
        /// The connection admitted.
        conn: ConnId,
    },
    /// The connection may not join: the supervisor closes it with 1008.
    JoinRejected {
        /// The room refused.
        room: RoomId,
        /// The connection refused.
        conn: ConnId,
        /// Why, which gives the close reason.
        reason: JoinRejection,
    },
    /// The room's full snapshot, encoded once as the JSON text every member gets,
    /// and the protocol v2 ops that turn the room's previous snapshot into this
    /// one (comma-separated op objects, PROTOCOL-v2.md §2), or `None` when there
    /// is no previous snapshot they apply to (a new or restored room, stored
    /// shapes merged, too many ops): v2 members then need this snapshot.
    Snapshot {
        /// The room shown.
        room: RoomId,
        /// The v1 snapshot (PROTOCOL.md §4).
        json: String,
        /// The v2 ops since the previous snapshot, if they cover every change.
        ops: Option<String>,
        /// `json` without its opening `{`, as permessage-deflate segments
        /// (`contract::deflate`), for members that negotiated it: a v1
        /// message is a stored `{` and these, a v2 snapshot its prefix and
        /// these. Only while such a member is in the room, for snapshots of
        /// at least `MIN_COMPRESSED_SNAPSHOT_BYTES`, and only if smaller than `json`
        /// (so the frame stays under twice a snapshot's bound).
        #[serde(with = "serde_bytes")]
        deflated: Option<Vec<u8>>,
    },
    /// The room has been freed after a `CloseRoom`.
    RoomClosed {
        /// The room freed.
        room: RoomId,
    },
    /// The room's shapes up to and including frame `seq` are in the store.
    Saved {
        /// The room saved.
        room: RoomId,
        /// The last frame the save covers.
        seq: u64,
    },
    /// A `CloseRoom` was overtaken by an `OpenRoom`: the room stays.
    CloseCancelled {
        /// The room kept.
        room: RoomId,
    },
    /// Answer to `Drain`: rooms saved meanwhile, and rooms left with unsaved changes.
    Drained {
        /// Saves that succeeded since the `Drain`.
        saved: u32,
        /// Rooms still holding changes the store does not have, sorted.
        unsaved: Vec<RoomId>,
        /// Where each of the `unsaved` rooms' shapes were written instead, in
        /// the same order: the drain never ends with shapes only in memory.
        fallback: Vec<Fallback>,
    },
    /// The room's full state as of frame `seq`, opaque to the supervisor: with the
    /// events after `seq` it rebuilds the room exactly on another worker.
    Checkpoint {
        /// The room it captures.
        room: RoomId,
        /// The last frame the image includes.
        seq: u64,
        /// The encoded state, for [`ToWorker::RestoreRoom`]. As bytes (one
        /// copy), not a sequence of numbers (a call per byte: a 12 MiB
        /// image took seconds in a debug build); the same bytes on the wire.
        #[serde(with = "serde_bytes")]
        image: Vec<u8>,
    },
    /// Answer to `Sync`.
    Synced {
        /// The room of the `Sync`.
        room: RoomId,
        /// The `Sync`'s token.
        token: u64,
    },
    /// Counts since the previous `Stats`: valid client frames by `type`, and
    /// ignored ones by reason.
    Stats {
        /// Valid client frames, by `type`.
        frames: Vec<(crate::protocol::MessageKind, u64)>,
        /// Ignored client frames, by reason.
        ignored: Vec<(crate::protocol::IgnoredReason, u64)>,
        /// Every room the worker holds, for the room monitor.
        rooms: Vec<RoomSummary>,
    },
    /// A save attempt ended.
    SaveFinished {
        /// How it ended.
        outcome: SaveResult,
        /// The room's previous save attempt had failed.
        retry: bool,
        /// How long it took, in microseconds.
        micros: u64,
    },
    /// The room's stored board cannot be read (it is not a list of shapes): the
    /// worker has freed the room; its members are closed with 1011.
    RoomFailed {
        /// The room freed.
        room: RoomId,
    },
    /// The answer to [`ToWorker::Configure`]: the worker opened the store. For
    /// the embedded store, the file's identity (device, inode): the first worker
    /// creates the file, every later one must find this one.
    Configured {
        /// The embedded store's file; `None` with a backend.
        store_identity: Option<crate::config::FileIdentity>,
    },
    /// The other answer to [`ToWorker::Configure`]: the store cannot be used
    /// (say why); the worker exits, and at start-up the server does not start.
    StoreUnusable {
        /// Why, with its causes, for the log and the start-up error.
        error: String,
    },
    /// A v2 member's valid message was refused by a room limit (the board's
    /// byte budget, its shape count, the server's memory budget): its session
    /// tells the client with a v2 `error` message (PROTOCOL-v2.md). Sent
    /// again when a restored room replays the event; the supervisor tells
    /// the client once per `seq`.
    Refused {
        /// The member's room.
        room: RoomId,
        /// The member.
        conn: ConnId,
        /// The refused event.
        seq: u64,
        /// What the message asked.
        kind: crate::protocol::MessageKind,
        /// Which limit refused it.
        reason: crate::protocol::IgnoredReason,
    },
}

/// A room as the monitor shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoomSummary {
    /// The room shown.
    pub room: RoomId,
    /// Connections admitted.
    pub members: u32,
    /// Shapes on the board.
    pub shapes: u32,
    /// Shape changes not yet in the store.
    pub unsaved: bool,
    /// Wall time of the last successful save, ms since the Unix epoch.
    pub last_save_ms: Option<i64>,
}

/// How a save attempt ended, for the supervisor's metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SaveResult {
    /// The shapes are in the store.
    Ok,
    /// The store refused or could not be reached; the room stays unsaved and
    /// the save is retried.
    Failed,
    /// The backend has no board for the room yet.
    NoBoard,
}

impl SaveResult {
    /// Label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            SaveResult::Ok => "ok",
            SaveResult::Failed => "failed",
            SaveResult::NoBoard => "no_board",
        }
    }
}

/// Why a join was refused; the supervisor closes the connection with code 1008.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinRejection {
    /// The room has [`MAX_MEMBERS_PER_ROOM`](crate::protocol::MAX_MEMBERS_PER_ROOM)
    /// members already.
    RoomFull,
    /// A member of the room has the same `userId`.
    DuplicateUser,
}

impl JoinRejection {
    /// The close reason the clients know (PROTOCOL.md §2).
    pub fn close_reason(self) -> &'static str {
        match self {
            JoinRejection::RoomFull => crate::protocol::REASON_ROOM_FULL,
            JoinRejection::DuplicateUser => crate::protocol::REASON_DUPLICATE_USER,
        }
    }
}

/// Why frames could not be sent or read: the IPC link cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A body over [`MAX_FRAME_LEN`] bytes (its length given): corruption, or a
    /// message no peer would accept.
    #[error("IPC frame of {0} bytes exceeds the limit of {MAX_FRAME_LEN}")]
    TooLarge(usize),
    /// A body that is not one message of the expected type, exactly.
    #[error("malformed IPC frame: {0}")]
    Malformed(#[from] postcard::Error),
    /// The socket failed (raised by the transport that carries the frames).
    #[error("IPC socket: {0}")]
    Io(#[from] std::io::Error),
}

/// postcard's output into a `BytesMut`, a slice at a time. (postcard's own
/// `to_extend` pushes byte by byte: a 12 MiB snapshot took seconds in a debug
/// build, long enough for a busy worker to miss its pings.)
struct Appending(BytesMut);

impl postcard::ser_flavors::Flavor for Appending {
    type Output = BytesMut;

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.0.put_u8(byte);
        Ok(())
    }

    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<BytesMut> {
        Ok(self.0)
    }
}

/// Appends one frame holding `msg` to `dst`.
pub fn encode<T: Serialize>(msg: &T, dst: &mut BytesMut) -> Result<(), CodecError> {
    let start = dst.len();
    dst.put_u32(0); // patched below once the body length is known
    let mut body = postcard::serialize_with_flavor(msg, Appending(std::mem::take(dst)))?;
    let len = body.len() - start - LEN_PREFIX;
    if len > MAX_FRAME_LEN {
        body.truncate(start);
        *dst = body;
        return Err(CodecError::TooLarge(len));
    }
    body[start..start + LEN_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
    *dst = body;
    Ok(())
}

/// Takes one complete frame off the front of `src`, or returns `Ok(None)` (and
/// leaves `src` untouched) when more bytes are needed.
pub fn decode<T: DeserializeOwned>(src: &mut BytesMut) -> Result<Option<T>, CodecError> {
    if src.len() < LEN_PREFIX {
        return Ok(None);
    }
    let len = u32::from_be_bytes(src[..LEN_PREFIX].try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME_LEN {
        return Err(CodecError::TooLarge(len));
    }
    if src.len() < LEN_PREFIX + len {
        src.reserve(LEN_PREFIX + len - src.len());
        return Ok(None);
    }
    src.advance(LEN_PREFIX);
    let body = src.split_to(len);
    let (msg, rest) = postcard::take_from_bytes(&body)?;
    if !rest.is_empty() {
        return Err(CodecError::Malformed(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    Ok(Some(msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_as_bytes_are_the_same_bytes_on_the_wire() {
        // `serde_bytes` writes what a sequence of u8 wrote (a length, then
        // the bytes): workers and supervisors of either kind agree.
        #[derive(Serialize)]
        struct AsNumbers {
            image: Vec<u8>,
        }
        let image: Vec<u8> = (0..=255).cycle().take(70_000).collect();
        let checkpoint = FromWorker::Checkpoint {
            room: RoomId("r".into()),
            seq: 7,
            image: image.clone(),
        };
        let mut framed = BytesMut::new();
        encode(&checkpoint, &mut framed).unwrap();
        let tail = postcard::to_stdvec(&AsNumbers { image }).unwrap();
        assert!(framed.ends_with(&tail));
        assert_eq!(decode::<FromWorker>(&mut framed).unwrap(), Some(checkpoint));
    }

    fn sample() -> Vec<ToWorker> {
        vec![
            ToWorker::Hello {
                ipc_version: IPC_VERSION,
                worker_id: WorkerId(3),
            },
            ToWorker::OpenRoom {
                room: RoomId("room-1".into()),
                id_seed: u64::MAX - 7,
            },
            ToWorker::Event(Stamped {
                room: RoomId("room-1".into()),
                seq: 42,
                time_ms: 1_704_110_400_000,
                event: RoomEvent::Message {
                    conn: ConnId(9),
                    text: r#"{"type":"cursor_move","x":1,"y":2} ünïcödé"#.into(),
                },
            }),
            ToWorker::CloseRoom {
                room: RoomId("room-1".into()),
            },
        ]
    }

    #[test]
    fn round_trip_of_several_frames_in_one_buffer() {
        let mut buf = BytesMut::new();
        for msg in sample() {
            encode(&msg, &mut buf).unwrap();
        }
        let mut decoded = Vec::new();
        while let Some(msg) = decode::<ToWorker>(&mut buf).unwrap() {
            decoded.push(msg);
        }
        assert_eq!(decoded, sample());
        assert!(buf.is_empty());
    }

    #[test]
    fn length_prefix_is_big_endian_body_length() {
        let mut buf = BytesMut::new();
        let msg = FromWorker::RoomClosed {
            room: RoomId("ab".into()),
        };
        encode(&msg, &mut buf).unwrap();
        // variant index 4, string length 2, "ab"
        assert_eq!(&buf[..], &[0, 0, 0, 4, 4, 2, b'a', b'b']);
    }

    #[test]
    fn truncated_input_waits_for_more_bytes_at_every_cut() {
        let mut full = BytesMut::new();
        for msg in sample() {
            encode(&msg, &mut full).unwrap();
        }
        let first_len = {
            let mut one = BytesMut::new();
            encode(&sample()[0], &mut one).unwrap();
            one.len()
        };
        for cut in 0..first_len {
            let mut partial = BytesMut::from(&full[..cut]);
            assert!(
                decode::<ToWorker>(&mut partial).unwrap().is_none(),
                "cut {cut}"
            );
            assert_eq!(partial.len(), cut, "nothing consumed at cut {cut}");
        }
    }

    #[test]
    fn oversized_length_prefix_is_rejected_without_buffering() {
        let mut buf = BytesMut::new();
        buf.put_u32(MAX_FRAME_LEN as u32 + 1);
        assert!(matches!(
            decode::<ToWorker>(&mut buf),
            Err(CodecError::TooLarge(n)) if n == MAX_FRAME_LEN + 1
        ));
    }

    #[test]
    fn garbage_body_is_a_decode_error() {
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_slice(&[0xff, 0xff, 0xff]); // variant index out of range
        assert!(matches!(
            decode::<ToWorker>(&mut buf),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn trailing_bytes_inside_a_frame_are_rejected() {
        let mut one = BytesMut::new();
        encode(
            &ToWorker::CloseRoom {
                room: RoomId("r".into()),
            },
            &mut one,
        )
        .unwrap();
        let body = one.split_off(LEN_PREFIX);
        let mut buf = BytesMut::new();
        buf.put_u32(body.len() as u32 + 1);
        buf.put_slice(&body);
        buf.put_u8(0);
        assert!(matches!(
            decode::<ToWorker>(&mut buf),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn invalid_utf8_in_a_string_is_rejected() {
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_slice(&[3, 1, 0xc3]); // CloseRoom, room of 1 byte: a lone UTF-8 lead byte
        assert!(decode::<ToWorker>(&mut buf).is_err());
    }
}
