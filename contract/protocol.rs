//! The client protocol (PROTOCOL.md §1–4): limits, close codes, the messages
//! clients send, and the JSON building blocks of the snapshots they receive,
//! written exactly as the Node.js reference writes them.

use serde::Deserialize;

/// Members per room; the 101st connection is closed with [`CLOSE_POLICY`].
pub const MAX_MEMBERS_PER_ROOM: usize = 100;
/// Shapes per room; creates beyond this are ignored.
pub const MAX_SHAPES_PER_ROOM: usize = 1000;

/// WebSocket close code "policy violation", used for a full room and a duplicate user.
pub const CLOSE_POLICY: u16 = 1008;
/// WebSocket close code "going away", sent when the server shuts down.
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// WebSocket close code "internal error", sent when a room is lost.
pub const CLOSE_INTERNAL_ERROR: u16 = 1011;
/// Close code (application range) for a connection that stopped answering and
/// was replaced by a newer connection of the same user.
pub const CLOSE_REPLACED: u16 = 4000;

/// Close reason (with [`CLOSE_POLICY`]) for a join past [`MAX_MEMBERS_PER_ROOM`].
pub const REASON_ROOM_FULL: &str = "Room is full";
/// Close reason (with [`CLOSE_POLICY`]) for a join of a user already in the
/// room on a connection that still answers (a second tab); the member stays.
pub const REASON_DUPLICATE_USER: &str = "Duplicate user";
/// Close reason (with [`CLOSE_POLICY`]) for a client that keeps sending over its
/// rate (`--rate-limit-close-after-secs`).
pub const REASON_RATE_LIMIT: &str = "Rate limit";
/// Close reason (with [`CLOSE_REPLACED`]) for a silent connection whose user
/// joined again: the new connection takes its place.
pub const REASON_REPLACED: &str = "Replaced by a new connection";
/// Close reason (with [`CLOSE_INTERNAL_ERROR`]) when a room's stored board cannot
/// be parsed: starting empty would overwrite it at the next save.
pub const REASON_BOARD_UNREADABLE: &str = "Room unavailable: its stored board could not be read";

/// Longest `fill`/`stroke`, in bytes (a CSS colour fits easily).
pub const MAX_COLOUR_BYTES: usize = 64;
/// Longest `shapeId`, and `userId`/`roomId` token claims, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Largest magnitude of a coordinate, size or rotation: far beyond any board, small
/// enough that arithmetic on it in any client stays exact.
pub const MAX_COORDINATE: f64 = 1e9;
/// A room's budget for its board: the JSON of all its shapes, escapes
/// included, as snapshots carry it and stores keep it. A shape may be as large
/// as one client message (`--max-message-bytes`: a pasted paragraph, 5,000 CJK
/// characters, 10,000 escaped control characters); a create or an update that
/// would take the board past this budget is refused. It keeps a snapshot under
/// the IPC frame limit, with its compressed form (see [`MAX_SNAPSHOT_BYTES`]).
pub const MAX_BOARD_BYTES: usize = 12 * 1024 * 1024;
/// Upper bound of a snapshot's JSON: the board at its budget (and a comma per
/// shape), plus members and cursors (100 each, ids at most [`MAX_ID_BYTES`]
/// escaped to 6 bytes a byte, under 1 KiB per member and cursor), plus 256 KiB
/// of slack.
pub const MAX_SNAPSHOT_BYTES: usize =
    MAX_BOARD_BYTES + MAX_SHAPES_PER_ROOM + 2 * MAX_MEMBERS_PER_ROOM * 1024 + 256 * 1024;

/// `fill` of a shape created without one (absent or empty, as the reference's
/// `fill || default`).
pub const DEFAULT_FILL: &str = "#3b82f6";
/// `stroke` of a shape created without one (absent or empty).
pub const DEFAULT_STROKE: &str = "#1d4ed8";

/// The shape types clients draw; any other `shapeType` is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShapeType {
    /// `"rectangle"`.
    Rectangle,
    /// `"oval"`.
    Oval,
    /// `"text"`.
    Text,
    /// `"line"`.
    Line,
    /// `"arrow"`.
    Arrow,
}

impl ShapeType {
    /// The name on the wire: `shapeType` in a `shape_create`, `type` in a
    /// snapshot's and a store's shapes.
    pub fn as_str(self) -> &'static str {
        match self {
            ShapeType::Rectangle => "rectangle",
            ShapeType::Oval => "oval",
            ShapeType::Text => "text",
            ShapeType::Line => "line",
            ShapeType::Arrow => "arrow",
        }
    }
}

/// A client -> server text frame. Unknown fields are ignored; `id`, `userId` and
/// `timestamp` are not fields here, so a client cannot choose them.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    rename_all_fields = "camelCase"
)]
pub enum ClientMessage {
    /// `cursor_move`: the sender's pointer moved. Changes only its cursor
    /// (never saved).
    CursorMove {
        /// Horizontal position on the board.
        x: f64,
        /// Vertical position on the board.
        y: f64,
    },
    /// `shape_create`: a new shape at the end of the room's list; the server
    /// gives it its `id`, `userId`, `timestamp`, and `rotation` 0. Ignored past
    /// [`MAX_SHAPES_PER_ROOM`].
    ShapeCreate {
        /// `shapeType`: what to draw.
        shape_type: ShapeType,
        /// Horizontal position on the board.
        x: f64,
        /// Vertical position on the board.
        y: f64,
        /// Horizontal size.
        width: f64,
        /// Vertical size.
        height: f64,
        /// The shape's text (bounded by the message size and the room's
        /// [`MAX_BOARD_BYTES`]).
        text: Option<String>,
        /// Fill colour (CSS), at most [`MAX_COLOUR_BYTES`]; absent or empty:
        /// [`DEFAULT_FILL`].
        fill: Option<String>,
        /// Outline colour (CSS), at most [`MAX_COLOUR_BYTES`]; absent or empty:
        /// [`DEFAULT_STROKE`].
        stroke: Option<String>,
    },
    /// `shape_update`: changes the fields present in one shape (any member may
    /// edit any shape) and refreshes its `timestamp`.
    ShapeUpdate {
        /// `shapeId`: the shape to change; an unknown one is ignored.
        shape_id: String,
        /// The fields to change, beside `shapeId` at the message's top level.
        #[serde(flatten)]
        changes: ShapeChanges,
    },
    /// `shape_delete`: removes one shape.
    ShapeDelete {
        /// `shapeId`: the shape to remove; an unknown one is ignored.
        shape_id: String,
    },
}

/// The fields a `shape_update` may carry; only those present change.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct ShapeChanges {
    /// New horizontal position.
    pub x: Option<f64>,
    /// New vertical position.
    pub y: Option<f64>,
    /// New horizontal size.
    pub width: Option<f64>,
    /// New vertical size.
    pub height: Option<f64>,
    /// New rotation (0 when created).
    pub rotation: Option<f64>,
    /// New text (bounded as a create's).
    pub text: Option<String>,
    /// New fill colour, at most [`MAX_COLOUR_BYTES`].
    pub fill: Option<String>,
    /// New outline colour, at most [`MAX_COLOUR_BYTES`].
    pub stroke: Option<String>,
}

/// Why a client frame was ignored (logged and counted, never sent to the client:
/// existing clients parse every server message as a snapshot).
#[derive(Debug, thiserror::Error)]
pub enum InvalidMessage {
    /// Not JSON, or not one of the messages: an unknown `type` or `shapeType`,
    /// a field missing or of the wrong type.
    #[error("not a valid message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// A number that is infinite or NaN.
    #[error("number is not finite")]
    NotFinite,
    /// A number whose magnitude is over [`MAX_COORDINATE`].
    #[error("number beyond ±{MAX_COORDINATE}")]
    OutOfRange,
    /// A string over its limit: `shapeId`, `text` or `colour`, as named.
    #[error("{0} is too long")]
    TooLong(&'static str),
}

impl InvalidMessage {
    /// Why, as the worker reports it (the metrics' label).
    pub fn reason(&self) -> IgnoredReason {
        match self {
            InvalidMessage::Malformed(_) => IgnoredReason::Malformed,
            InvalidMessage::NotFinite => IgnoredReason::NotFinite,
            InvalidMessage::OutOfRange => IgnoredReason::OutOfRange,
            InvalidMessage::TooLong(_) => IgnoredReason::TooLong,
        }
    }
}

/// A client message's `type`: what the worker counts valid frames by
/// (`frames_in_total{type}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
pub enum MessageKind {
    /// `cursor_move`.
    CursorMove,
    /// `shape_create`.
    ShapeCreate,
    /// `shape_update`.
    ShapeUpdate,
    /// `shape_delete`.
    ShapeDelete,
}

impl MessageKind {
    /// The `type` as clients write it (the metrics' label).
    pub fn label(self) -> &'static str {
        match self {
            MessageKind::CursorMove => "cursor_move",
            MessageKind::ShapeCreate => "shape_create",
            MessageKind::ShapeUpdate => "shape_update",
            MessageKind::ShapeDelete => "shape_delete",
        }
    }
}

/// Why the worker ignored a client frame (`frames_ignored_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
pub enum IgnoredReason {
    /// From a connection that is not (or no longer) a member of the room.
    NotAMember,
    /// Not JSON, or not a message of the protocol.
    Malformed,
    /// A number that is not finite.
    NotFinite,
    /// A number beyond [`MAX_COORDINATE`].
    OutOfRange,
    /// A string over its limit.
    TooLong,
    /// An update or delete of a shape the room does not have.
    UnknownShape,
    /// An update to a stored shape kept verbatim.
    OpaqueShape,
    /// A create in a room that has [`MAX_SHAPES_PER_ROOM`] shapes.
    ShapeLimit,
    /// A create or update that would take the room's board past
    /// [`MAX_BOARD_BYTES`].
    BoardFull,
    /// A create while the server's memory budget is nearly spent.
    MemoryFull,
}

impl IgnoredReason {
    /// The metrics' label.
    pub fn label(self) -> &'static str {
        match self {
            IgnoredReason::NotAMember => "not_a_member",
            IgnoredReason::Malformed => "malformed",
            IgnoredReason::NotFinite => "not_finite",
            IgnoredReason::OutOfRange => "out_of_range",
            IgnoredReason::TooLong => "too_long",
            IgnoredReason::UnknownShape => "unknown_shape",
            IgnoredReason::OpaqueShape => "opaque_shape",
            IgnoredReason::ShapeLimit => "shape_limit",
            IgnoredReason::BoardFull => "board_full",
            IgnoredReason::MemoryFull => "memory",
        }
    }
}

impl ClientMessage {
    /// The message's `type`, for metrics.
    pub fn kind(&self) -> MessageKind {
        match self {
            ClientMessage::CursorMove { .. } => MessageKind::CursorMove,
            ClientMessage::ShapeCreate { .. } => MessageKind::ShapeCreate,
            ClientMessage::ShapeUpdate { .. } => MessageKind::ShapeUpdate,
            ClientMessage::ShapeDelete { .. } => MessageKind::ShapeDelete,
        }
    }

    /// Parses and validates one text frame.
    pub fn parse(text: &str) -> Result<ClientMessage, InvalidMessage> {
        let msg: ClientMessage = serde_json::from_str(text)?;
        // serde_json already refuses 1e309; this keeps the rule explicit.
        if !msg.numbers().all(f64::is_finite) {
            return Err(InvalidMessage::NotFinite);
        }
        if !msg.numbers().all(|n| n.abs() <= MAX_COORDINATE) {
            return Err(InvalidMessage::OutOfRange);
        }
        msg.check_lengths()?;
        Ok(msg)
    }

    /// Ids and colours have length limits; a text has none of its own (the
    /// message size and the room's board budget bound it).
    fn check_lengths(&self) -> Result<(), InvalidMessage> {
        let (id, fill, stroke) = match self {
            ClientMessage::CursorMove { .. } => return Ok(()),
            ClientMessage::ShapeCreate { fill, stroke, .. } => (None, fill, stroke),
            ClientMessage::ShapeUpdate { shape_id, changes } => {
                (Some(shape_id), &changes.fill, &changes.stroke)
            }
            ClientMessage::ShapeDelete { shape_id } => (Some(shape_id), &None, &None),
        };
        let over = |value: Option<&String>, max: usize| value.is_some_and(|v| v.len() > max);
        if over(id, MAX_ID_BYTES) {
            return Err(InvalidMessage::TooLong("shapeId"));
        }
        if over(fill.as_ref(), MAX_COLOUR_BYTES) || over(stroke.as_ref(), MAX_COLOUR_BYTES) {
            return Err(InvalidMessage::TooLong("colour"));
        }
        Ok(())
    }

    fn numbers(&self) -> impl Iterator<Item = f64> {
        let list: Vec<f64> = match self {
            ClientMessage::CursorMove { x, y } => vec![*x, *y],
            ClientMessage::ShapeCreate {
                x,
                y,
                width,
                height,
                ..
            } => vec![*x, *y, *width, *height],
            ClientMessage::ShapeUpdate { changes: c, .. } => {
                [c.x, c.y, c.width, c.height, c.rotation]
                    .into_iter()
                    .flatten()
                    .collect()
            }
            ClientMessage::ShapeDelete { .. } => vec![],
        };
        list.into_iter()
    }
}

/// Appends `x` as JavaScript's `Number.prototype.toString` writes it: `100`, not
/// `100.0`; `1e+21`; `1e-7`; `0` for negative zero.
#[inline]
pub fn push_js_number(out: &mut String, x: f64) {
    use std::fmt::Write;
    if x == 0.0 {
        out.push('0');
        return;
    }
    if !x.is_finite() {
        // Never stored (input is validated); JSON.stringify writes these as null.
        out.push_str("null");
        return;
    }
    if x < 0.0 {
        out.push('-');
    }
    // Rust's `{:e}` gives the shortest round-trip digits, like JavaScript.
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').expect("LowerExp has an exponent");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let k = digits.len() as i32;
    let n = exp.parse::<i32>().expect("integer exponent") + 1;
    if k <= n && n <= 21 {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        out.push_str(&digits[..n as usize]);
        out.push('.');
        out.push_str(&digits[n as usize..]);
    } else if -6 < n && n <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-n) as usize));
        out.push_str(&digits);
    } else {
        out.push_str(&digits[..1]);
        if k > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let e = n - 1;
        let _ = write!(out, "e{}{}", if e >= 0 { '+' } else { '-' }, e.abs());
    }
}

/// Appends `s` as a JSON string, escaped as `JSON.stringify` escapes it.
#[inline]
pub fn push_json_string(out: &mut String, s: &str) {
    use std::fmt::Write;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Wall-clock time in milliseconds since the Unix epoch (0 if the clock is
/// before 1970).
pub fn unix_time_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Appends a timestamp as a JSON string in JavaScript's `toISOString()` form:
/// `"2024-01-01T12:00:00.000Z"`.
///
/// Written digit by digit for years 0–9999 (every snapshot carries a timestamp
/// per cursor and shape; chrono's formatter interprets its format string each
/// time, ~3 µs a message in the worker); other years (a client's shape may say
/// anything) go through chrono, whose output this matches.
#[inline]
pub fn push_json_timestamp(out: &mut String, time_ms: i64) {
    const MS_PER_DAY: i64 = 86_400_000;
    let days = time_ms.div_euclid(MS_PER_DAY);
    let ms_of_day = time_ms.rem_euclid(MS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    if !(0..=9999).contains(&year) {
        use std::fmt::Write;
        let t = chrono::DateTime::from_timestamp_millis(time_ms).unwrap_or_default();
        let _ = write!(out, "\"{}\"", t.format("%Y-%m-%dT%H:%M:%S%.3fZ"));
        return;
    }
    let mut text = *b"\"0000-00-00T00:00:00.000Z\"";
    let mut put = |at: usize, width: usize, mut value: i64| {
        for i in (at..at + width).rev() {
            text[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(1, 4, year);
    put(6, 2, month);
    put(9, 2, day);
    put(12, 2, ms_of_day / 3_600_000);
    put(15, 2, ms_of_day / 60_000 % 60);
    put(18, 2, ms_of_day / 1000 % 60);
    put(21, 3, ms_of_day % 1000);
    out.push_str(std::str::from_utf8(&text).expect("ASCII digits"));
}

/// The proleptic Gregorian (year, month, day) of a count of days since
/// 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Protocol v2 (PROTOCOL-v2.md): its subprotocol name and message framing.
pub mod v2 {
    use serde_json::Value;

    /// The WebSocket subprotocol a client offers to get v2.
    pub const SUBPROTOCOL: &str = "whiteboard.v2";

    /// Whether a client message is a v2 `resync` request. A cheap test first
    /// (most messages are cursor moves), then a parse.
    pub fn is_resync(text: &str) -> bool {
        #[derive(serde::Deserialize)]
        struct Typed<'a> {
            #[serde(borrow, rename = "type")]
            kind: std::borrow::Cow<'a, str>,
        }
        text.contains("resync")
            && serde_json::from_str::<Typed>(text).is_ok_and(|t| t.kind == "resync")
    }

    /// `{"type":"snapshot","seq":N,`: a v2 snapshot is this, then a v1
    /// snapshot without its opening `{`.
    pub fn snapshot_prefix(seq: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(40);
        out.extend_from_slice(b"{\"type\":\"snapshot\",\"seq\":");
        out.extend_from_slice(seq.to_string().as_bytes());
        out.push(b',');
        out
    }

    /// `{"type":"error","op":KIND,"reason":REASON,"count":N}`: N of the
    /// client's messages were refused by a room limit, the last of them a
    /// `KIND` (a `type` of v1 §3) refused for `REASON` (`board_full`,
    /// `shape_limit`, `memory_full`). Outside the `seq` order: it changes
    /// no state.
    pub fn error_message(
        kind: super::MessageKind,
        reason: super::IgnoredReason,
        count: u32,
    ) -> String {
        format!(
            r#"{{"type":"error","op":"{}","reason":"{}","count":{count}}}"#,
            kind.label(),
            reason.label()
        )
    }

    /// `{"type":"ops","seq":N,"ops":[…]}` from batches of comma-separated ops
    /// as the worker writes them (empty batches are skipped): [`ops_head`]
    /// then [`ops_body`].
    pub fn ops_message<'a>(seq: u64, batches: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
        let mut out = ops_head(seq);
        out.extend_from_slice(&ops_body(batches));
        out
    }

    /// `{"type":"ops","seq":N`: the part of an `ops` message that is each
    /// member's own.
    pub fn ops_head(seq: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(40);
        out.extend_from_slice(b"{\"type\":\"ops\",\"seq\":");
        out.extend_from_slice(seq.to_string().as_bytes());
        out
    }

    /// `,"ops":[…]}`: the part of an `ops` message that members at the same
    /// version share. A user's cursor ops that follow each other (no join or
    /// leave of the user in between) are folded into one: the first one's
    /// place (where an absent cursor would be appended) with the last one's
    /// values, which gives the same state.
    pub fn ops_body<'a>(batches: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
        let mut ops: Vec<&[u8]> = Vec::new();
        // A user's cursor op in `ops`, while it may absorb later ones.
        let mut cursor_at: Vec<(&[u8], usize)> = Vec::new();
        for batch in batches {
            for op in split_ops(batch) {
                match op_user(op) {
                    Some((OpKind::Cursor, user)) => {
                        match cursor_at.iter().find(|(u, _)| *u == user) {
                            Some(&(_, at)) => ops[at] = op,
                            None => {
                                cursor_at.push((user, ops.len()));
                                ops.push(op);
                            }
                        }
                    }
                    Some((OpKind::Presence, user)) => {
                        cursor_at.retain(|(u, _)| *u != user);
                        ops.push(op);
                    }
                    None => ops.push(op),
                }
            }
        }
        let len: usize = ops.iter().map(|op| op.len() + 1).sum();
        let mut out = Vec::with_capacity(len + 12);
        out.extend_from_slice(b",\"ops\":[");
        for (i, op) in ops.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(op);
        }
        out.extend_from_slice(b"]}");
        out
    }

    /// The ops of a batch (`{"op":…},{"op":…}`). `,{"op":"` only occurs between
    /// ops: inside a JSON string a `"` is always escaped.
    fn split_ops(batch: &[u8]) -> impl Iterator<Item = &[u8]> {
        const SEP: &[u8] = b",{\"op\":\"";
        let mut rest = (!batch.is_empty()).then_some(batch);
        std::iter::from_fn(move || {
            let text = rest?;
            match text.windows(SEP.len()).position(|w| w == SEP) {
                Some(end) => {
                    rest = Some(&text[end + 1..]);
                    Some(&text[..end])
                }
                None => {
                    rest = None;
                    Some(text)
                }
            }
        })
    }

    enum OpKind {
        Cursor,
        /// A join or a leave.
        Presence,
    }

    /// A cursor, join or leave op's kind and user (its JSON string, quotes
    /// included, as written: one user is always written the same way).
    fn op_user(op: &[u8]) -> Option<(OpKind, &[u8])> {
        let (kind, rest) = if let Some(rest) = op.strip_prefix(b"{\"op\":\"cursor\",\"userId\":") {
            (OpKind::Cursor, rest)
        } else if let Some(rest) = op
            .strip_prefix(b"{\"op\":\"join\",\"userId\":")
            .or_else(|| op.strip_prefix(b"{\"op\":\"leave\",\"userId\":"))
        {
            (OpKind::Presence, rest)
        } else {
            return None;
        };
        // The string's closing quote: the first `"` not escaped.
        let mut i = 1;
        while i < rest.len() {
            match rest[i] {
                b'\\' => i += 2,
                b'"' => return Some((kind, &rest[..=i])),
                _ => i += 1,
            }
        }
        None
    }

    /// A v2 client's copy of a room: what PROTOCOL-v2.md §2 tells a client to
    /// do, written for tests and the load generator (the reference client is
    /// `clients/typescript`).
    #[derive(Debug, Default)]
    pub struct Replica {
        /// The room as a v1 snapshot would show it (`None` before the first
        /// snapshot and while waiting for one after a gap).
        pub state: Option<Value>,
        /// `seq` of the last message applied.
        pub last_seq: u64,
    }

    /// What a client should do after a message.
    #[derive(Debug, PartialEq)]
    pub enum Applied {
        /// Applied: the replica shows the room as of this message.
        Ok,
        /// A gap or an op that does not fit: send `{"type":"resync"}` (once)
        /// and wait for a snapshot.
        NeedResync,
        /// Ops while waiting for a snapshot: ignored.
        Ignored,
    }

    impl Replica {
        /// Applies one server message (its JSON text).
        pub fn receive(&mut self, text: &str) -> Result<Applied, String> {
            let msg: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
            let seq = msg["seq"].as_u64().ok_or("no seq")?;
            match msg["type"].as_str() {
                Some("snapshot") => {
                    let mut state = msg;
                    let obj = state.as_object_mut().ok_or("not an object")?;
                    obj.remove("type");
                    obj.remove("seq");
                    self.state = Some(state);
                    self.last_seq = seq;
                    Ok(Applied::Ok)
                }
                Some("ops") => {
                    let Some(state) = self.state.as_mut() else {
                        return Ok(Applied::Ignored);
                    };
                    if seq != self.last_seq + 1 {
                        self.state = None;
                        return Ok(Applied::NeedResync);
                    }
                    let ops = msg["ops"].as_array().ok_or("no ops")?;
                    for op in ops {
                        if apply_op(state, op).is_err() {
                            self.state = None;
                            return Ok(Applied::NeedResync);
                        }
                    }
                    self.last_seq = seq;
                    Ok(Applied::Ok)
                }
                _ => Err(format!("unknown message: {text}")),
            }
        }
    }

    /// Applies one op to a room (a v1 snapshot's JSON), as the table of
    /// PROTOCOL-v2.md §2 says; an error for an op naming what is not there.
    pub fn apply_op(state: &mut Value, op: &Value) -> Result<(), String> {
        let str_field = |key: &str| {
            op[key]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("op without {key}: {op}"))
        };
        match op["op"].as_str() {
            Some("join") => {
                let user = str_field("userId")?;
                users(state)?.push(Value::String(user));
            }
            Some("leave") => {
                let user = str_field("userId")?;
                let users = users(state)?;
                let pos = users
                    .iter()
                    .position(|u| u.as_str() == Some(&user))
                    .ok_or_else(|| format!("leave of an unknown user {user}"))?;
                users.remove(pos);
                array(state, "cursors")?.retain(|c| c["userId"].as_str() != Some(&user));
            }
            Some("cursor") => {
                let user = str_field("userId")?;
                let mut cursor = serde_json::Map::new();
                cursor.insert("userId".into(), Value::String(user.clone()));
                for key in ["x", "y", "timestamp"] {
                    cursor.insert(key.into(), op.get(key).cloned().ok_or("cursor field")?);
                }
                let cursors = array(state, "cursors")?;
                match cursors
                    .iter_mut()
                    .find(|c| c["userId"].as_str() == Some(&user))
                {
                    Some(c) => *c = Value::Object(cursor),
                    None => cursors.push(Value::Object(cursor)),
                }
            }
            Some("add") => {
                let shape = op.get("shape").cloned().ok_or("add without shape")?;
                array(state, "shapes")?.push(shape);
            }
            Some("update") => {
                let id = str_field("id")?;
                let set = op["set"].as_object().ok_or("update without set")?;
                let shape = array(state, "shapes")?
                    .iter_mut()
                    .find(|s| s["id"].as_str() == Some(&id))
                    .ok_or_else(|| format!("update of an unknown shape {id}"))?;
                let shape = shape.as_object_mut().ok_or("shape not an object")?;
                for (k, v) in set {
                    shape.insert(k.clone(), v.clone());
                }
            }
            Some("remove") => {
                let id = str_field("id")?;
                let shapes = array(state, "shapes")?;
                let pos = shapes
                    .iter()
                    .position(|s| s["id"].as_str() == Some(&id))
                    .ok_or_else(|| format!("remove of an unknown shape {id}"))?;
                shapes.remove(pos);
            }
            _ => return Err(format!("unknown op {op}")),
        }
        Ok(())
    }

    fn users(state: &mut Value) -> Result<&mut Vec<Value>, String> {
        array(state, "connectedUsers")
    }

    fn array<'a>(state: &'a mut Value, key: &str) -> Result<&'a mut Vec<Value>, String> {
        state
            .get_mut(key)
            .and_then(Value::as_array_mut)
            .ok_or_else(|| format!("no {key}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A merged `ops` message means the same as its batches applied one op at
    /// a time, with a user's consecutive cursor ops folded into one.
    #[test]
    fn merged_ops_fold_a_user_s_cursor_moves_but_not_across_a_leave() {
        let cursor = |user: &str, x: i32| {
            format!(
                r#"{{"op":"cursor","userId":{},"x":{x},"y":0,"timestamp":"t{x}"}}"#,
                serde_json::to_string(user).unwrap()
            )
        };
        let presence = |op: &str, user: &str| {
            format!(
                r#"{{"op":"{op}","userId":{}}}"#,
                serde_json::to_string(user).unwrap()
            )
        };
        let odd = "a\",{\"op\":\"x";
        let batches = [
            [cursor("a", 1), cursor("b", 2), cursor("a", 3)].join(","),
            String::new(),
            [
                presence("leave", "a"),
                presence("join", "a"),
                cursor("a", 4),
                cursor(odd, 5),
            ]
            .join(","),
            [
                cursor("b", 6),
                cursor(odd, 7),
                r#"{"op":"remove","id":"s"}"#.to_owned(),
            ]
            .join(","),
        ];
        let message = v2::ops_message(3, batches.iter().map(|b| b.as_bytes()));
        let message: serde_json::Value = serde_json::from_slice(&message).unwrap();
        assert_eq!(message["seq"], 3);
        let ops = message["ops"].as_array().unwrap();
        let want: Vec<serde_json::Value> = [
            cursor("a", 3),
            cursor("b", 6),
            presence("leave", "a"),
            presence("join", "a"),
            cursor("a", 4),
            cursor(odd, 7),
            r#"{"op":"remove","id":"s"}"#.to_owned(),
        ]
        .iter()
        .map(|op| serde_json::from_str(op).unwrap())
        .collect();
        assert_eq!(*ops, want);
        // The same state as every op applied in turn.
        let start =
            serde_json::json!({"connectedUsers":["a","b",odd],"cursors":[],"shapes":[{"id":"s"}]});
        let (mut folded, mut each) = (start.clone(), start);
        for op in message["ops"].as_array().unwrap() {
            v2::apply_op(&mut folded, op).unwrap();
        }
        for batch in &batches {
            let batch: Vec<serde_json::Value> =
                serde_json::from_str(&format!("[{batch}]")).unwrap();
            for op in &batch {
                v2::apply_op(&mut each, op).unwrap();
            }
        }
        assert_eq!(folded, each);
    }

    fn js(x: f64) -> String {
        let mut s = String::new();
        push_js_number(&mut s, x);
        s
    }

    #[test]
    fn numbers_are_written_as_javascript_writes_them() {
        let cases: &[(f64, &str)] = &[
            (100.0, "100"),
            (-0.0, "0"),
            (1.5, "1.5"),
            (-12.25, "-12.25"),
            (0.1 + 0.2, "0.30000000000000004"),
            (1e21, "1e+21"),
            (1.5e21, "1.5e+21"),
            (123456789012345680000.0, "123456789012345680000"),
            (1e-6, "0.000001"),
            (1e-7, "1e-7"),
            (1.25e-7, "1.25e-7"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (0.5, "0.5"),
            (123.456, "123.456"),
        ];
        for (x, want) in cases {
            assert_eq!(js(*x), *want, "{x:?}");
        }
    }

    #[test]
    fn strings_are_escaped_as_json_stringify_does() {
        let mut s = String::new();
        push_json_string(&mut s, "a\"b\\c\n\t\u{1}\u{7f}é\u{2028}");
        assert_eq!(s, "\"a\\\"b\\\\c\\n\\t\\u0001\u{7f}é\u{2028}\"");
    }

    #[test]
    fn timestamps_have_milliseconds_and_z() {
        let mut s = String::new();
        push_json_timestamp(&mut s, 1_704_110_400_000);
        assert_eq!(s, "\"2024-01-01T12:00:00.000Z\"");
        s.clear();
        push_json_timestamp(&mut s, 1_704_110_400_007);
        assert_eq!(s, "\"2024-01-01T12:00:00.007Z\"");
        s.clear();
        push_json_timestamp(&mut s, 951_825_599_999);
        assert_eq!(s, "\"2000-02-29T11:59:59.999Z\"");
        s.clear();
        push_json_timestamp(&mut s, -1);
        assert_eq!(s, "\"1969-12-31T23:59:59.999Z\"");
    }

    #[test]
    fn timestamps_are_written_as_chrono_writes_them() {
        let chrono_text = |time_ms: i64| {
            let t = chrono::DateTime::from_timestamp_millis(time_ms).unwrap_or_default();
            format!("\"{}\"", t.format("%Y-%m-%dT%H:%M:%S%.3fZ"))
        };
        // Days and leap years across the fast path's range and past its ends
        // (years 0 and 9999, negative and five-digit years, chrono's own ends).
        let mut cases = vec![
            i64::MIN,
            i64::MAX,
            -62_167_219_200_001,
            -62_167_219_200_000,
            253_402_300_799_999,
            253_402_300_800_000,
            8_210_266_876_799_999,
            8_210_266_876_800_000,
        ];
        let mut t: i64 = -62_200_000_000_000;
        while t < 253_500_000_000_000 {
            cases.push(t);
            t += 13_337_777_777; // ~154 days and some milliseconds: every month, every day of the week
        }
        for time_ms in cases {
            let mut s = String::new();
            push_json_timestamp(&mut s, time_ms);
            assert_eq!(s, chrono_text(time_ms), "{time_ms}");
        }
    }

    #[test]
    fn parses_each_message_type() {
        assert_eq!(
            ClientMessage::parse(r##"{"type":"cursor_move","x":1,"y":-2.5,"extra":true}"##)
                .unwrap(),
            ClientMessage::CursorMove { x: 1.0, y: -2.5 }
        );
        assert_eq!(
            ClientMessage::parse(
                r##"{"type":"shape_create","shapeType":"oval","x":1,"y":2,"width":3,"height":4,"id":"mine","fill":"red"}"##
            )
            .unwrap(),
            ClientMessage::ShapeCreate {
                shape_type: ShapeType::Oval,
                x: 1.0,
                y: 2.0,
                width: 3.0,
                height: 4.0,
                text: None,
                fill: Some("red".into()),
                stroke: None,
            }
        );
        assert_eq!(
            ClientMessage::parse(r##"{"type":"shape_update","shapeId":"s1","x":5,"rotation":45}"##)
                .unwrap(),
            ClientMessage::ShapeUpdate {
                shape_id: "s1".into(),
                changes: ShapeChanges {
                    x: Some(5.0),
                    rotation: Some(45.0),
                    ..Default::default()
                }
            }
        );
        assert_eq!(
            ClientMessage::parse(r##"{"type":"shape_delete","shapeId":"s1"}"##).unwrap(),
            ClientMessage::ShapeDelete {
                shape_id: "s1".into()
            }
        );
    }

    #[test]
    fn rejects_invalid_messages() {
        for text in [
            "not json",
            "[]",
            r##"{"x":1,"y":2}"##,
            r##"{"type":"teleport","x":1,"y":2}"##,
            r##"{"type":"cursor_move","x":1}"##,
            r##"{"type":"cursor_move","x":"1","y":2}"##,
            r##"{"type":"cursor_move","x":1e309,"y":2}"##,
            r##"{"type":"shape_create","shapeType":"star","x":1,"y":2,"width":3,"height":4}"##,
            r##"{"type":"shape_create","shapeType":"oval","x":1,"y":2,"width":3}"##,
            r##"{"type":"shape_create","shapeType":"oval","x":1,"y":2,"width":3,"height":4,"text":5}"##,
            r##"{"type":"shape_update","x":1}"##,
            r##"{"type":"shape_update","shapeId":7}"##,
            r##"{"type":"shape_update","shapeId":"s","width":"wide"}"##,
            r##"{"type":"shape_delete"}"##,
        ] {
            assert!(ClientMessage::parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn enforces_lengths_and_ranges() {
        let reason = |text: &str| ClientMessage::parse(text).unwrap_err().reason().label();
        let colour = "#".repeat(MAX_COLOUR_BYTES + 1);
        assert_eq!(
            reason(&format!(
                r#"{{"type":"shape_update","shapeId":"s","fill":"{colour}"}}"#
            )),
            "too_long"
        );
        let id = "i".repeat(MAX_ID_BYTES + 1);
        assert_eq!(
            reason(&format!(r#"{{"type":"shape_delete","shapeId":"{id}"}}"#)),
            "too_long"
        );
        assert_eq!(
            reason(r#"{"type":"cursor_move","x":1e10,"y":0}"#),
            "out_of_range"
        );
        assert_eq!(
            reason(r#"{"type":"cursor_move","x":1e999,"y":0}"#),
            "malformed"
        );
        assert!(ClientMessage::parse(r#"{"type":"cursor_move","x":-1e9,"y":1e9}"#).is_ok());
        // A text is bounded by the message size only: 5,000 CJK characters.
        let ok_text = "中".repeat(5_000);
        assert!(
            ClientMessage::parse(&format!(
                r#"{{"type":"shape_create","shapeType":"text","x":1,"y":2,"width":3,"height":4,"text":"{ok_text}"}}"#
            ))
            .is_ok()
        );
    }
}
