//! A room's state machine: members, cursors and shapes, changed only by stamped
//! events. No I/O and no clock: applying the same events to the same opening state
//! always gives the same room (ids and timestamps included), which is what lets a
//! crashed worker's rooms be rebuilt by replay.

use indexmap::IndexMap;

use crate::compressed::CompressedShapes;

use contract::deflate::MIN_COMPRESSED_SNAPSHOT_BYTES;
use contract::ipc::{ConnId, JoinRejection, MAX_FRAME_LEN, RoomEvent, RoomId, Stamped};
use contract::protocol::{
    ClientMessage, DEFAULT_FILL, DEFAULT_STROKE, IgnoredReason, InvalidMessage, MAX_BOARD_BYTES,
    MAX_MEMBERS_PER_ROOM, MAX_SHAPES_PER_ROOM, MAX_SNAPSHOT_BYTES, MessageKind, ShapeChanges,
    ShapeType, push_js_number, push_json_string, push_json_timestamp,
};

// A snapshot (or a checkpoint, which holds the same shapes) within the budgets
// always fits an IPC frame, with a margin for the frame's other fields; so
// does a snapshot with its compressed form, which is sent only when smaller.
const _: () = assert!(2 * MAX_SNAPSHOT_BYTES + 1024 * 1024 < MAX_FRAME_LEN);

/// What applying one event did.
#[derive(Debug, PartialEq)]
pub enum Effect {
    /// A join was admitted; the state changed.
    Joined,
    /// A join was refused; the state did not change.
    Rejected(JoinRejection),
    /// Members or cursors changed; members need a new snapshot.
    Presence,
    /// Shapes changed: members need a new snapshot and the room needs saving.
    Shapes,
    /// Nothing changed, for the reason given.
    Ignored(Ignored),
    /// A setting no member sees changed (the memory budget).
    Unseen,
}

/// Why an event changed nothing: logged and counted by its
/// [`reason`](Self::reason), never sent to the client.
#[derive(Debug)]
pub enum Ignored {
    /// A frame or leave from a connection that is not a member (refused or gone).
    NotAMember,
    /// The frame does not parse or breaks a limit.
    Invalid(InvalidMessage),
    /// An update or delete of a shape the room does not have.
    UnknownShape,
    /// An update to a stored shape kept verbatim (see `Shape`).
    OpaqueShape,
    /// A create in a room that has [`MAX_SHAPES_PER_ROOM`] shapes.
    ShapeLimit,
    /// The shape would take the room's board past [`MAX_BOARD_BYTES`].
    BoardFull,
    /// A create while the server's memory budget is nearly spent.
    MemoryFull,
}

impl Ignored {
    /// Why, as the worker reports it (the metrics' label).
    pub fn reason(&self) -> IgnoredReason {
        match self {
            Ignored::NotAMember => IgnoredReason::NotAMember,
            Ignored::Invalid(why) => why.reason(),
            Ignored::UnknownShape => IgnoredReason::UnknownShape,
            Ignored::OpaqueShape => IgnoredReason::OpaqueShape,
            Ignored::ShapeLimit => IgnoredReason::ShapeLimit,
            Ignored::BoardFull => IgnoredReason::BoardFull,
            Ignored::MemoryFull => IgnoredReason::MemoryFull,
        }
    }
}

/// Two reasons are equal when they have the same label (an invalid message's
/// parse error is not compared).
impl PartialEq for Ignored {
    fn eq(&self, other: &Ignored) -> bool {
        self.reason() == other.reason()
    }
}

impl From<InvalidMessage> for Ignored {
    fn from(e: InvalidMessage) -> Self {
        Ignored::Invalid(e)
    }
}

/// A room's snapshot, as [`Room::snapshot`] makes it.
#[derive(Debug)]
pub struct Snapshot {
    /// The JSON every member gets.
    pub json: String,
    /// Its compressed form (see `FromWorker::Snapshot`), if a member asked
    /// for it and it is smaller.
    pub deflated: Option<Vec<u8>>,
    /// Bytes compressed to make it (chunks kept from earlier snapshots cost
    /// nothing): the work that counts against the room's spacing.
    pub compressed_bytes: usize,
}

/// What [`Room::merge_stored`] did.
#[derive(Debug, Default)]
pub struct Merged {
    /// Stored shapes kept verbatim (not understood by this server).
    pub opaque: usize,
    /// Shapes cut to keep the room within its budgets: (id, JSON), in order.
    pub cut: Vec<(String, String)>,
}

/// A room's whole state (see [`Room::image`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoomImage {
    /// The room instance's seed of shape ids.
    pub id_seed: u64,
    /// The last event applied.
    pub last_seq: u64,
    /// (connection, user, speaks v2, takes compressed snapshots)
    pub members: Vec<(ConnId, String, bool, bool)>,
    /// (user, x, y, time in ms since the Unix epoch), in first-move order.
    pub cursors: Vec<(String, f64, f64, i64)>,
    /// The shapes, as the JSON array the store keeps.
    pub shapes_json: String,
    /// Creates are refused (see [`RoomEvent::MemoryBudget`]).
    pub memory_full: bool,
}

struct Member {
    conn: ConnId,
    user_id: String,
    /// Speaks protocol v2: while one member does, the room records ops.
    v2: bool,
    /// Negotiated permessage-deflate: while one member did, snapshots come
    /// compressed too.
    deflate: bool,
}

/// A cursor and its JSON encoding, made when it moves (a room's snapshots
/// repeat every cursor; only the mover's changes).
struct Cursor {
    x: f64,
    y: f64,
    time_ms: i64,
    json: String,
}

impl Cursor {
    fn new(user_id: &str, x: f64, y: f64, time_ms: i64) -> Cursor {
        let mut json = String::with_capacity(96);
        json.push_str("{\"userId\":");
        push_json_string(&mut json, user_id);
        json.push_str(",\"x\":");
        push_js_number(&mut json, x);
        json.push_str(",\"y\":");
        push_js_number(&mut json, y);
        json.push_str(",\"timestamp\":");
        push_json_timestamp(&mut json, time_ms);
        json.push('}');
        Cursor {
            x,
            y,
            time_ms,
            json,
        }
    }
}

/// A shape and its JSON encoding, kept so that a snapshot re-encodes only shapes
/// that changed since the last one.
struct Shape {
    /// `None` for a stored shape this server does not understand (unknown type or
    /// fields): it is kept verbatim, shown and saved as it was, and can be deleted
    /// but not updated. Nothing stored is ever dropped.
    fields: Option<ShapeFields>,
    json: String,
    /// Names this version of the shape within its room (a new one for each
    /// change): compressed chunks of the board are kept while their shapes'
    /// revisions are the same (see `compressed`). Not part of the room's
    /// state: a restored room numbers its shapes afresh.
    rev: u64,
}

#[derive(Clone)]
struct ShapeFields {
    kind: ShapeType,
    x: f64,
    y: f64,
    width: f64,
    height: f64,
    rotation: f64,
    user_id: String,
    time_ms: i64,
    text: Option<String>,
    fill: String,
    stroke: String,
}

/// One room's members, cursors and shapes, each kept with its JSON (so a
/// snapshot re-encodes only what changed), and the v2 ops since the last
/// publish. Changed only by [`apply`](Self::apply) and
/// [`merge_stored`](Self::merge_stored); a checkpoint holds its
/// [`image`](Self::image).
pub struct Room {
    id: RoomId,
    id_seed: u64,
    /// In join order.
    members: Vec<Member>,
    /// By user id, in first-move order.
    cursors: IndexMap<String, Cursor>,
    /// By shape id, in creation order (stored shapes first).
    shapes: IndexMap<String, Shape>,
    /// Sequence number of the last event applied.
    last_seq: u64,
    /// The changes since the last [`Room::take_ops`], as protocol v2 ops
    /// (PROTOCOL-v2.md §2), comma-separated: a v2 member applies them to the
    /// snapshot it has to get the one a v1 member gets.
    ops: String,
    /// Whether `ops` holds every change since the last `take_ops`. False for a
    /// new room (there is no previous publish to apply them to), after a restore
    /// or a merge of stored shapes (not expressed as ops), and when the ops
    /// outgrew [`MAX_OPS_BYTES`] (a snapshot is then the smaller message).
    ops_continuous: bool,
    /// Members speaking v2 (ops are recorded only while there is one).
    v2_members: usize,
    /// Members taking compressed snapshots (compressed only while there is one).
    deflate_members: usize,
    /// The last compressed snapshot's chunks of shapes, reused while unchanged.
    compressed: CompressedShapes,
    /// The next shape revision (see `Shape::rev`).
    next_rev: u64,
    /// The server's memory budget is nearly spent: creates are refused.
    memory_full: bool,
}

/// Bytes of ops a room keeps between two publishes; beyond it members that
/// missed them get a snapshot instead (the smaller message by then for most
/// rooms; a snapshot is at most [`MAX_SNAPSHOT_BYTES`]).
const MAX_OPS_BYTES: usize = 256 * 1024;

impl Room {
    /// An empty room; `id_seed` (random per room instance) starts the id of
    /// every shape it creates.
    pub fn new(id: RoomId, id_seed: u64) -> Room {
        Room {
            id,
            id_seed,
            members: Vec::new(),
            cursors: IndexMap::new(),
            shapes: IndexMap::new(),
            last_seq: 0,
            ops: String::new(),
            ops_continuous: false,
            v2_members: 0,
            deflate_members: 0,
            compressed: CompressedShapes::default(),
            next_rev: 0,
            memory_full: false,
        }
    }

    /// A revision no shape of the room had (see `Shape::rev`).
    fn new_rev(&mut self) -> u64 {
        self.next_rev += 1;
        self.next_rev
    }

    /// The ops since the previous call, comma-separated (see `ops`), or `None`
    /// if they do not cover every change since then: a member that has the
    /// previous publish then needs a snapshot.
    pub fn take_ops(&mut self) -> Option<String> {
        if std::mem::replace(&mut self.ops_continuous, true) {
            Some(std::mem::take(&mut self.ops))
        } else {
            self.ops.clear();
            None
        }
    }

    /// Appends one op, written by `write` (which starts after `{"op":`). Only
    /// while a member speaks v2: a v1-only room records none (its publishes
    /// carry no ops, and a v2 member's first message is a snapshot anyway).
    fn push_op(&mut self, write: impl FnOnce(&mut String)) {
        if self.v2_members == 0 {
            self.ops_continuous = false;
            self.ops.clear();
            return;
        }
        if !self.ops_continuous {
            return;
        }
        if !self.ops.is_empty() {
            self.ops.push(',');
        }
        self.ops.push_str("{\"op\":");
        write(&mut self.ops);
        if self.ops.len() > MAX_OPS_BYTES {
            self.ops_continuous = false;
            self.ops = String::new();
        }
    }

    /// Sequence number of the last event applied.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Puts the stored shapes before the room's current ones (which were drawn
    /// while the load was pending), within the room's budgets: every shape past
    /// [`MAX_SHAPES_PER_ROOM`] or past [`MAX_BOARD_BYTES`] (stored ones first,
    /// in order) is cut and returned so the caller can keep it elsewhere: a
    /// board over the limits must not make a snapshot bigger than an IPC frame.
    pub fn merge_stored(&mut self, stored: Vec<serde_json::Value>) -> Merged {
        let mut merged = IndexMap::with_capacity(stored.len().min(MAX_SHAPES_PER_ROOM));
        let mut result = Merged::default();
        let mut board_bytes = 0;
        let mut keep = |merged: &mut IndexMap<String, Shape>, id: String, shape: Shape| {
            let bytes = Shape::board_bytes(&shape.json);
            if board_bytes + bytes > MAX_BOARD_BYTES || merged.len() >= MAX_SHAPES_PER_ROOM {
                result.cut.push((id, shape.json));
            } else {
                board_bytes += bytes;
                if shape.fields.is_none() {
                    result.opaque += 1;
                }
                merged.insert(id, shape);
            }
        };
        for (index, value) in stored.into_iter().enumerate() {
            let (mut id, mut shape) = Shape::from_stored(value, index);
            if merged.contains_key(&id) || self.shapes.contains_key(&id) {
                // Two stored shapes with one id: keep both, the second verbatim.
                id = format!("{id}~{index}");
                shape.fields = None;
            }
            keep(&mut merged, id, shape);
        }
        for (id, shape) in self.shapes.drain(..) {
            keep(&mut merged, id, shape);
        }
        self.shapes = merged;
        for index in 0..self.shapes.len() {
            let rev = self.new_rev();
            self.shapes[index].rev = rev;
        }
        // Not expressed as ops: members get a snapshot.
        self.ops_continuous = false;
        self.ops = String::new();
        result
    }

    /// The shapes as the JSON array the store keeps.
    pub fn shapes_json(&self) -> String {
        let mut out = String::with_capacity(self.shapes_len() + 2);
        self.push_shapes(&mut out);
        out
    }

    /// Bytes of the shapes' cached JSON, with separators.
    fn shapes_len(&self) -> usize {
        self.shapes.values().map(|s| s.json.len() + 1).sum()
    }

    /// Appends the shapes as a JSON array (their cached encodings, in order).
    fn push_shapes(&self, out: &mut String) {
        out.push('[');
        push_separated(out, self.shapes.values(), |out, shape| {
            out.push_str(&shape.json)
        });
        out.push(']');
    }

    /// What the board takes of [`MAX_BOARD_BYTES`]: its shapes' JSON, with
    /// a separator each. Summed for each create and update (at most
    /// [`MAX_SHAPES_PER_ROOM`] additions: microseconds), instead of a
    /// total kept right through every restore and merge.
    fn board_bytes(&self) -> usize {
        self.shapes
            .values()
            .map(|shape| Shape::board_bytes(&shape.json))
            .sum()
    }

    /// Shapes on the board.
    pub fn shape_count(&self) -> usize {
        self.shapes.len()
    }

    /// Which room this is.
    pub fn id(&self) -> &RoomId {
        &self.id
    }

    /// Connections admitted.
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// Applies an event (see [`apply_counted`](Self::apply_counted)).
    pub fn apply(&mut self, stamped: &Stamped) -> Effect {
        self.apply_counted(stamped).0
    }

    /// Applies an event; also returns the client message's `type` when the event
    /// is a valid client message (for metrics).
    pub fn apply_counted(&mut self, stamped: &Stamped) -> (Effect, Option<MessageKind>) {
        self.last_seq = stamped.seq;
        match &stamped.event {
            RoomEvent::Join {
                conn,
                user_id,
                v2,
                deflate,
            } => (self.join(*conn, user_id, *v2, *deflate), None),
            RoomEvent::Leave { conn } => (self.leave(*conn), None),
            RoomEvent::Message { conn, text } => {
                let Some(user_id) = self.user_of(*conn) else {
                    return (Effect::Ignored(Ignored::NotAMember), None);
                };
                let user_id = user_id.to_owned();
                match ClientMessage::parse(text) {
                    Ok(msg) => {
                        let kind = msg.kind();
                        (self.handle(&user_id, msg, stamped), Some(kind))
                    }
                    Err(e) => (Effect::Ignored(e.into()), None),
                }
            }
            RoomEvent::MemoryBudget { full } => {
                self.memory_full = *full;
                (Effect::Unseen, None)
            }
        }
    }

    /// Whether `conn` is a member speaking protocol v2.
    pub fn speaks_v2(&self, conn: ConnId) -> bool {
        self.members.iter().any(|m| m.conn == conn && m.v2)
    }

    fn user_of(&self, conn: ConnId) -> Option<&str> {
        self.members
            .iter()
            .find(|m| m.conn == conn)
            .map(|m| m.user_id.as_str())
    }

    fn join(&mut self, conn: ConnId, user_id: &str, v2: bool, deflate: bool) -> Effect {
        if self.members.iter().any(|m| m.user_id == user_id) {
            return Effect::Rejected(JoinRejection::DuplicateUser);
        }
        if self.members.len() >= MAX_MEMBERS_PER_ROOM {
            return Effect::Rejected(JoinRejection::RoomFull);
        }
        self.members.push(Member {
            conn,
            user_id: user_id.to_owned(),
            v2,
            deflate,
        });
        self.v2_members += usize::from(v2);
        self.deflate_members += usize::from(deflate);
        self.push_op(|out| {
            out.push_str("\"join\",\"userId\":");
            push_json_string(out, user_id);
            out.push('}');
        });
        Effect::Joined
    }

    fn leave(&mut self, conn: ConnId) -> Effect {
        let Some(pos) = self.members.iter().position(|m| m.conn == conn) else {
            return Effect::Ignored(Ignored::NotAMember);
        };
        let member = self.members.remove(pos);
        self.v2_members -= usize::from(member.v2);
        self.deflate_members -= usize::from(member.deflate);
        if self.deflate_members == 0 {
            self.compressed.clear();
        }
        self.cursors.shift_remove(&member.user_id);
        self.push_op(|out| {
            out.push_str("\"leave\",\"userId\":");
            push_json_string(out, &member.user_id);
            out.push('}');
        });
        Effect::Presence
    }

    fn handle(&mut self, user_id: &str, msg: ClientMessage, stamped: &Stamped) -> Effect {
        match msg {
            ClientMessage::CursorMove { x, y } => {
                let cursor = Cursor::new(user_id, x, y, stamped.time_ms);
                // `{"userId":…}` becomes `{"op":"cursor","userId":…}`.
                self.push_op(|out| {
                    out.push_str("\"cursor\",");
                    out.push_str(&cursor.json[1..]);
                });
                self.cursors.insert(user_id.to_owned(), cursor);
                Effect::Presence
            }
            ClientMessage::ShapeCreate {
                shape_type,
                x,
                y,
                width,
                height,
                text,
                fill,
                stroke,
            } => {
                if self.shapes.len() >= MAX_SHAPES_PER_ROOM {
                    return Effect::Ignored(Ignored::ShapeLimit);
                }
                if self.memory_full {
                    return Effect::Ignored(Ignored::MemoryFull);
                }
                let id = self.shape_id(stamped.seq);
                let fields = ShapeFields {
                    kind: shape_type,
                    x,
                    y,
                    width,
                    height,
                    rotation: 0.0,
                    user_id: user_id.to_owned(),
                    time_ms: stamped.time_ms,
                    text,
                    // As the reference's `fill || default`: an empty string is absent.
                    fill: non_empty_or(fill, DEFAULT_FILL),
                    stroke: non_empty_or(stroke, DEFAULT_STROKE),
                };
                let mut shape = Shape::new(&id, fields);
                shape.rev = self.new_rev();
                if self.board_bytes() + Shape::board_bytes(&shape.json) > MAX_BOARD_BYTES {
                    return Effect::Ignored(Ignored::BoardFull);
                }
                self.push_op(|out| {
                    out.push_str("\"add\",\"shape\":");
                    out.push_str(&shape.json);
                    out.push('}');
                });
                self.shapes.insert(id, shape);
                Effect::Shapes
            }
            ClientMessage::ShapeUpdate { shape_id, changes } => {
                let board_bytes = self.board_bytes();
                let rev = self.new_rev();
                let Some(shape) = self.shapes.get_mut(&shape_id) else {
                    return Effect::Ignored(Ignored::UnknownShape);
                };
                let Some(fields) = &mut shape.fields else {
                    return Effect::Ignored(Ignored::OpaqueShape);
                };
                // Checked on the result: an update may grow a shape past its budget.
                let mut updated = fields.clone();
                let present = Present::of(&changes);
                updated.update(changes, stamped.time_ms);
                let mut json = String::with_capacity(shape.json.len());
                updated.encode(&shape_id, &mut json);
                json.shrink_to_fit();
                if json.len() > shape.json.len()
                    && board_bytes - shape.json.len() + json.len() > MAX_BOARD_BYTES
                {
                    return Effect::Ignored(Ignored::BoardFull);
                }
                shape.json = json;
                shape.rev = rev;
                self.push_op(|out| {
                    out.push_str("\"update\",\"id\":");
                    push_json_string(out, &shape_id);
                    out.push_str(",\"set\":{");
                    updated.encode_set(present, out);
                    out.push_str("}}");
                });
                if let Some(fields) = self
                    .shapes
                    .get_mut(&shape_id)
                    .and_then(|s| s.fields.as_mut())
                {
                    *fields = updated;
                }
                Effect::Shapes
            }
            ClientMessage::ShapeDelete { shape_id } => {
                if self.shapes.shift_remove(&shape_id).is_some() {
                    self.push_op(|out| {
                        out.push_str("\"remove\",\"id\":");
                        push_json_string(out, &shape_id);
                        out.push('}');
                    });
                    Effect::Shapes
                } else {
                    Effect::Ignored(Ignored::UnknownShape)
                }
            }
        }
    }

    /// A shape id unique across room instances (random seed) and within one
    /// (sequence numbers never repeat), and reproducible on replay.
    fn shape_id(&self, seq: u64) -> String {
        format!("{:x}-{:x}", self.id_seed, seq)
    }

    /// The room's whole state, for a checkpoint.
    pub fn image(&self) -> RoomImage {
        RoomImage {
            id_seed: self.id_seed,
            last_seq: self.last_seq,
            members: self
                .members
                .iter()
                .map(|m| (m.conn, m.user_id.clone(), m.v2, m.deflate))
                .collect(),
            cursors: self
                .cursors
                .iter()
                .map(|(user, c)| (user.clone(), c.x, c.y, c.time_ms))
                .collect(),
            shapes_json: self.shapes_json(),
            memory_full: self.memory_full,
        }
    }

    /// The room a checkpoint describes, exactly (ids, order, timestamps).
    pub fn from_image(id: RoomId, image: RoomImage) -> Room {
        let mut room = Room::new(id, image.id_seed);
        room.last_seq = image.last_seq;
        room.members = image
            .members
            .into_iter()
            .map(|(conn, user_id, v2, deflate)| Member {
                conn,
                user_id,
                v2,
                deflate,
            })
            .collect();
        room.v2_members = room.members.iter().filter(|m| m.v2).count();
        room.deflate_members = room.members.iter().filter(|m| m.deflate).count();
        room.cursors = image
            .cursors
            .into_iter()
            .map(|(user, x, y, time_ms)| {
                let cursor = Cursor::new(&user, x, y, time_ms);
                (user, cursor)
            })
            .collect();
        let shapes: Vec<serde_json::Value> =
            serde_json::from_str(&image.shapes_json).unwrap_or_default();
        room.merge_stored(shapes);
        room.memory_full = image.memory_full;
        room
    }

    /// The snapshot every member gets, as JSON text.
    pub fn snapshot_json(&self) -> String {
        self.snapshot_and_head().0
    }

    /// The snapshot every member gets, as JSON text, and while a member
    /// negotiated permessage-deflate its compressed form (see
    /// `FromWorker::Snapshot`): made from the shapes' chunks compressed for
    /// earlier snapshots where unchanged, and sent only if smaller.
    pub fn snapshot(&mut self) -> Snapshot {
        let (json, head_end) = self.snapshot_and_head();
        if self.deflate_members == 0 || json.len() < MIN_COMPRESSED_SNAPSHOT_BYTES {
            return Snapshot {
                json,
                deflated: None,
                compressed_bytes: 0,
            };
        }
        let mut deflated = Vec::with_capacity(json.len() / 8);
        let shapes = self.shapes.values().map(|s| (s.rev, s.json.as_str()));
        let compressed_bytes = self
            .compressed
            .snapshot(&json[1..head_end], shapes, &mut deflated);
        let smaller = deflated.len() < json.len();
        Snapshot {
            json,
            deflated: smaller.then_some(deflated),
            compressed_bytes,
        }
    }

    /// The snapshot's JSON, and where its shapes start (after `"shapes":[`).
    fn snapshot_and_head(&self) -> (String, usize) {
        // Sized to fit (ids that need escaping aside): a 12 MB board's
        // snapshot must not grow, and double, at its end.
        let members: usize = self.members.iter().map(|m| m.user_id.len() + 3).sum();
        let cursors: usize = self.cursors.values().map(|c| c.json.len() + 1).sum();
        let mut out = String::with_capacity(64 + members + cursors + self.shapes_len());
        out.push_str("{\"connectedUsers\":[");
        push_separated(&mut out, &self.members, |out, member| {
            push_json_string(out, &member.user_id)
        });
        out.push_str("],\"cursors\":[");
        push_separated(&mut out, self.cursors.values(), |out, cursor| {
            out.push_str(&cursor.json)
        });
        out.push_str("],\"shapes\":");
        let head_end = out.len() + 1;
        self.push_shapes(&mut out);
        out.push('}');
        (out, head_end)
    }
}

/// Which fields of a `shape_update` were present (the ones it changes).
#[derive(Clone, Copy)]
struct Present {
    x: bool,
    y: bool,
    width: bool,
    height: bool,
    rotation: bool,
    text: bool,
    fill: bool,
    stroke: bool,
}

impl Present {
    fn of(changes: &ShapeChanges) -> Present {
        Present {
            x: changes.x.is_some(),
            y: changes.y.is_some(),
            width: changes.width.is_some(),
            height: changes.height.is_some(),
            rotation: changes.rotation.is_some(),
            text: changes.text.is_some(),
            fill: changes.fill.is_some(),
            stroke: changes.stroke.is_some(),
        }
    }
}

/// Appends each of `items` with `push`, separated by commas (a JSON array's
/// inside).
fn push_separated<T>(
    out: &mut String,
    items: impl IntoIterator<Item = T>,
    mut push: impl FnMut(&mut String, T),
) {
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push(out, item);
    }
}

fn non_empty_or(value: Option<String>, default: &str) -> String {
    value
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// The keys of a shape this server understands (PROTOCOL.md §4).
const SHAPE_KEYS: [&str; 12] = [
    "id",
    "type",
    "x",
    "y",
    "width",
    "height",
    "userId",
    "timestamp",
    "text",
    "fill",
    "stroke",
    "rotation",
];

impl Shape {
    /// What a shape of this JSON takes of the board budget (its JSON and the
    /// comma between it and the next in a snapshot).
    fn board_bytes(json: &str) -> usize {
        json.len() + 1
    }

    fn new(id: &str, fields: ShapeFields) -> Shape {
        let mut json = String::new();
        fields.encode(id, &mut json);
        // Grown by doubling: a 12 KB shape would hold 16 KB for its life.
        json.shrink_to_fit();
        Shape {
            fields: Some(fields),
            json,
            rev: 0,
        }
    }

    /// A shape read from the store: understood if it has exactly the known
    /// fields with the right types, otherwise kept verbatim.
    fn from_stored(value: serde_json::Value, index: usize) -> (String, Shape) {
        if let Some((id, fields)) = ShapeFields::parse_stored(&value) {
            let shape = Shape::new(&id, fields);
            return (id, shape);
        }
        let id = value["id"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("stored-{index}"));
        let shape = Shape {
            fields: None,
            json: value.to_string(),
            rev: 0,
        };
        (id, shape)
    }
}

impl ShapeFields {
    fn parse_stored(value: &serde_json::Value) -> Option<(String, ShapeFields)> {
        use serde::Deserialize;
        let obj = value.as_object()?;
        if obj.keys().any(|k| !SHAPE_KEYS.contains(&k.as_str())) {
            return None;
        }
        let num = |key: &str| obj.get(key)?.as_f64();
        let string = |key: &str| obj.get(key)?.as_str().map(str::to_owned);
        let timestamp = chrono::DateTime::parse_from_rfc3339(obj.get("timestamp")?.as_str()?)
            .ok()?
            .timestamp_millis();
        let text = match obj.get("text") {
            None => None,
            Some(serde_json::Value::String(t)) => Some(t.clone()),
            Some(_) => return None,
        };
        let fields = ShapeFields {
            kind: ShapeType::deserialize(obj.get("type")?).ok()?,
            x: num("x")?,
            y: num("y")?,
            width: num("width")?,
            height: num("height")?,
            rotation: match obj.get("rotation") {
                None => 0.0,
                Some(r) => r.as_f64()?,
            },
            user_id: string("userId")?,
            time_ms: timestamp,
            text,
            fill: string("fill")?,
            stroke: string("stroke")?,
        };
        Some((string("id")?, fields))
    }

    fn update(&mut self, changes: ShapeChanges, time_ms: i64) {
        let ShapeChanges {
            x,
            y,
            width,
            height,
            rotation,
            text,
            fill,
            stroke,
        } = changes;
        self.x = x.unwrap_or(self.x);
        self.y = y.unwrap_or(self.y);
        self.width = width.unwrap_or(self.width);
        self.height = height.unwrap_or(self.height);
        self.rotation = rotation.unwrap_or(self.rotation);
        if text.is_some() {
            self.text = text;
        }
        self.fill = fill.unwrap_or_else(|| std::mem::take(&mut self.fill));
        self.stroke = stroke.unwrap_or_else(|| std::mem::take(&mut self.stroke));
        self.time_ms = time_ms;
    }

    /// The fields an update changed, with the new timestamp, as the members of
    /// the `set` object of an `update` op.
    fn encode_set(&self, present: Present, out: &mut String) {
        out.push_str("\"timestamp\":");
        push_json_timestamp(out, self.time_ms);
        for (name, on, value) in [
            ("x", present.x, self.x),
            ("y", present.y, self.y),
            ("width", present.width, self.width),
            ("height", present.height, self.height),
            ("rotation", present.rotation, self.rotation),
        ] {
            if on {
                out.push_str(",\"");
                out.push_str(name);
                out.push_str("\":");
                push_js_number(out, value);
            }
        }
        for (name, value) in [
            ("text", self.text.as_deref().filter(|_| present.text)),
            ("fill", Some(self.fill.as_str()).filter(|_| present.fill)),
            (
                "stroke",
                Some(self.stroke.as_str()).filter(|_| present.stroke),
            ),
        ] {
            if let Some(value) = value {
                out.push_str(",\"");
                out.push_str(name);
                out.push_str("\":");
                push_json_string(out, value);
            }
        }
    }

    /// Encodes the shape with the reference's field order.
    fn encode(&self, id: &str, out: &mut String) {
        out.clear();
        out.push_str("{\"id\":");
        push_json_string(out, id);
        out.push_str(",\"type\":");
        push_json_string(out, self.kind.as_str());
        for (name, value) in [
            ("x", self.x),
            ("y", self.y),
            ("width", self.width),
            ("height", self.height),
        ] {
            out.push_str(",\"");
            out.push_str(name);
            out.push_str("\":");
            push_js_number(out, value);
        }
        out.push_str(",\"userId\":");
        push_json_string(out, &self.user_id);
        out.push_str(",\"timestamp\":");
        push_json_timestamp(out, self.time_ms);
        if let Some(text) = &self.text {
            out.push_str(",\"text\":");
            push_json_string(out, text);
        }
        out.push_str(",\"fill\":");
        push_json_string(out, &self.fill);
        out.push_str(",\"stroke\":");
        push_json_string(out, &self.stroke);
        out.push_str(",\"rotation\":");
        push_js_number(out, self.rotation);
        out.push('}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_704_110_400_000; // 2024-01-01T12:00:00.000Z

    struct Script {
        room: Room,
        seq: u64,
    }

    impl Script {
        fn new() -> Script {
            Script {
                room: Room::new(RoomId("r".into()), 0xab),
                seq: 0,
            }
        }

        fn apply(&mut self, event: RoomEvent) -> Effect {
            self.seq += 1;
            let stamped = Stamped {
                room: RoomId("r".into()),
                seq: self.seq,
                time_ms: T0 + self.seq as i64,
                event,
            };
            self.room.apply(&stamped)
        }

        /// A v2 member joins (so the room records ops; see
        /// `a_room_records_ops_only_while_a_member_speaks_v2` for v1 members).
        fn join(&mut self, conn: u64, user: &str) -> Effect {
            self.join_speaking(conn, user, true)
        }

        fn join_speaking(&mut self, conn: u64, user: &str, v2: bool) -> Effect {
            self.apply(RoomEvent::Join {
                conn: ConnId(conn),
                user_id: user.into(),
                v2,
                deflate: false,
            })
        }

        fn send(&mut self, conn: u64, text: &str) -> Effect {
            self.apply(RoomEvent::Message {
                conn: ConnId(conn),
                text: text.into(),
            })
        }

        fn snapshot(&self) -> String {
            self.room.snapshot_json()
        }
    }

    /// A compressed snapshot's segments, inflated, with the `{` put back.
    fn inflated(deflated: &[u8]) -> String {
        let payload = &deflated[..deflated.len() - 4];
        let json = contract::deflate::inflate_message(payload, 1 << 24).unwrap();
        format!("{{{}", String::from_utf8(json).unwrap())
    }

    #[test]
    fn snapshots_come_compressed_too_only_while_a_member_negotiated_it() {
        let mut s = Script::new();
        s.join_speaking(1, "ann", false);
        for i in 0..20 {
            s.send(1, &format!(r#"{{"type":"shape_create","shapeType":"text","x":{i},"y":0,"width":1,"height":1,"text":"雪🎉"}}"#));
        }
        let Snapshot { json, deflated, .. } = s.room.snapshot();
        assert_eq!(json, s.snapshot());
        assert_eq!(deflated, None, "nobody asked for it");
        s.apply(RoomEvent::Join {
            conn: ConnId(2),
            user_id: "bob".into(),
            v2: false,
            deflate: true,
        });
        let Snapshot { json, deflated, .. } = s.room.snapshot();
        assert!(json.capacity() < json.len() + 64, "sized to fit, not grown");
        let deflated = deflated.expect("bob takes compressed snapshots");
        assert!(
            deflated.len() * 3 < json.len(),
            "{} of {}",
            deflated.len(),
            json.len()
        );
        assert_eq!(inflated(&deflated), json);
        // A cursor move and a shape update: still the same JSON once inflated.
        s.send(2, r#"{"type":"cursor_move","x":5,"y":6}"#);
        let first = s.room.shapes.get_index(0).unwrap().0.clone();
        s.send(
            2,
            &format!(r#"{{"type":"shape_update","shapeId":"{first}","x":99}}"#),
        );
        let Snapshot { json, deflated, .. } = s.room.snapshot();
        assert_eq!(inflated(&deflated.unwrap()), json);
        // A restored room keeps who asked for it.
        let mut restored = Room::from_image(RoomId("r".into()), s.room.image());
        let Snapshot { json, deflated, .. } = restored.snapshot();
        assert_eq!(inflated(&deflated.unwrap()), json);
        s.apply(RoomEvent::Leave { conn: ConnId(2) });
        assert_eq!(s.room.snapshot().deflated, None, "bob left");
        assert_eq!(
            s.room.compressed.chunk_count(),
            0,
            "nothing kept for nobody"
        );
    }

    #[test]
    fn a_room_records_ops_only_while_a_member_speaks_v2() {
        let mut s = Script::new();
        s.join_speaking(1, "ann", false);
        s.room.take_ops();
        s.send(1, r#"{"type":"cursor_move","x":1,"y":2}"#);
        assert_eq!(s.room.take_ops(), None, "a v1-only room records none");
        assert!(s.room.ops.capacity() == 0 || s.room.ops.is_empty());
        // A v1 change, then a v2 member joins, between two publishes: the ops
        // cannot lead from the previous publish (the change was not recorded).
        s.send(1, r#"{"type":"cursor_move","x":2,"y":2}"#);
        s.join_speaking(2, "bob", true);
        assert_eq!(s.room.take_ops(), None);
        // From then on every change is recorded.
        s.send(1, r#"{"type":"cursor_move","x":3,"y":4}"#);
        let ops = s.room.take_ops().expect("recorded while bob speaks v2");
        assert!(
            ops.starts_with(r#"{"op":"cursor","userId":"ann","x":3,"y":4,"#),
            "{ops}"
        );
        // A restore keeps who speaks v2.
        s.room = Room::from_image(RoomId("r".into()), s.room.image());
        s.room.take_ops();
        s.send(1, r#"{"type":"cursor_move","x":5,"y":6}"#);
        assert!(s.room.take_ops().is_some());
        // The last v2 member leaves: nothing is recorded any more.
        s.apply(RoomEvent::Leave { conn: ConnId(2) });
        s.room.take_ops();
        s.send(1, r#"{"type":"cursor_move","x":7,"y":8}"#);
        assert_eq!(s.room.take_ops(), None);
        // A v2 member joining right after a publish, nothing else between:
        // its join leads from that publish.
        s.join_speaking(3, "cy", true);
        assert_eq!(
            s.room.take_ops().as_deref(),
            Some(r#"{"op":"join","userId":"cy"}"#)
        );
    }

    #[test]
    fn snapshot_after_a_sequence_of_messages_is_exact() {
        let mut s = Script::new();
        assert_eq!(s.join(1, "alice"), Effect::Joined); // seq 1
        assert_eq!(s.join(2, "bob"), Effect::Joined); // seq 2
        assert_eq!(
            s.send(2, r##"{"type":"cursor_move","x":10,"y":20.5}"##), // seq 3
            Effect::Presence
        );
        assert_eq!(
            s.send(1, r##"{"type":"cursor_move","x":1,"y":2}"##), // seq 4
            Effect::Presence
        );
        s.send(
            1,
            r##"{"type":"shape_create","shapeType":"rectangle","x":100,"y":200,"width":150,"height":100,"text":"Hello World"}"##,
        ); // seq 5 -> id ab-5
        s.send(
            2,
            r##"{"type":"shape_create","shapeType":"line","x":0,"y":0,"width":1.5,"height":-2,"fill":"#000","stroke":""}"##,
        ); // seq 6 -> id ab-6
        s.send(
            1,
            r##"{"type":"shape_update","shapeId":"ab-5","x":150,"rotation":45}"##,
        ); // seq 7
        s.send(2, r##"{"type":"cursor_move","x":11,"y":21}"##); // seq 8: bob's cursor stays first
        assert_eq!(
            s.snapshot(),
            concat!(
                r##"{"connectedUsers":["alice","bob"],"##,
                r##""cursors":[{"userId":"bob","x":11,"y":21,"timestamp":"2024-01-01T12:00:00.008Z"},"##,
                r##"{"userId":"alice","x":1,"y":2,"timestamp":"2024-01-01T12:00:00.004Z"}],"##,
                r##""shapes":[{"id":"ab-5","type":"rectangle","x":150,"y":200,"width":150,"height":100,"userId":"alice","timestamp":"2024-01-01T12:00:00.007Z","text":"Hello World","fill":"#3b82f6","stroke":"#1d4ed8","rotation":45},"##,
                r##"{"id":"ab-6","type":"line","x":0,"y":0,"width":1.5,"height":-2,"userId":"bob","timestamp":"2024-01-01T12:00:00.006Z","fill":"#000","stroke":"#1d4ed8","rotation":0}]}"##
            )
        );
    }

    #[test]
    fn leave_removes_member_and_cursor_but_keeps_shapes() {
        let mut s = Script::new();
        s.join(1, "alice");
        s.join(2, "bob");
        s.send(1, r##"{"type":"cursor_move","x":1,"y":2}"##);
        s.send(
            1,
            r##"{"type":"shape_create","shapeType":"oval","x":1,"y":2,"width":3,"height":4}"##,
        );
        assert_eq!(
            s.apply(RoomEvent::Leave { conn: ConnId(1) }),
            Effect::Presence
        );
        let snap: serde_json::Value = serde_json::from_str(&s.snapshot()).unwrap();
        assert_eq!(snap["connectedUsers"], serde_json::json!(["bob"]));
        assert_eq!(snap["cursors"], serde_json::json!([]));
        assert_eq!(snap["shapes"].as_array().unwrap().len(), 1);
        assert_eq!(s.room.member_count(), 1);
    }

    #[test]
    fn duplicate_user_is_rejected_and_original_kept() {
        let mut s = Script::new();
        s.join(1, "alice");
        assert_eq!(
            s.join(2, "alice"),
            Effect::Rejected(JoinRejection::DuplicateUser)
        );
        // The rejected connection's leave must not remove the original member.
        assert_eq!(
            s.apply(RoomEvent::Leave { conn: ConnId(2) }),
            Effect::Ignored(Ignored::NotAMember)
        );
        // Nor can it send anything.
        assert_eq!(
            s.send(2, r##"{"type":"cursor_move","x":1,"y":2}"##),
            Effect::Ignored(Ignored::NotAMember)
        );
        assert_eq!(
            s.snapshot(),
            r##"{"connectedUsers":["alice"],"cursors":[],"shapes":[]}"##
        );
        // Once the first connection has left, the user can join again.
        s.apply(RoomEvent::Leave { conn: ConnId(1) });
        assert_eq!(s.join(3, "alice"), Effect::Joined);
    }

    #[test]
    fn room_admits_one_hundred_members() {
        let mut s = Script::new();
        for i in 0..100 {
            assert_eq!(s.join(i, &format!("u{i}")), Effect::Joined);
        }
        assert_eq!(
            s.join(100, "u100"),
            Effect::Rejected(JoinRejection::RoomFull)
        );
        assert_eq!(s.room.member_count(), 100);
    }

    #[test]
    fn shape_limit_is_one_thousand() {
        let mut s = Script::new();
        s.join(1, "a");
        let create =
            r##"{"type":"shape_create","shapeType":"text","x":1,"y":2,"width":3,"height":4}"##;
        for _ in 0..1000 {
            assert_eq!(s.send(1, create), Effect::Shapes);
        }
        assert_eq!(s.send(1, create), Effect::Ignored(Ignored::ShapeLimit));
        // Deleting one makes room for one more.
        let first_id = s.room.shapes.keys().next().unwrap().clone();
        s.send(
            1,
            &format!(r##"{{"type":"shape_delete","shapeId":"{first_id}"}}"##),
        );
        assert_eq!(s.send(1, create), Effect::Shapes);
        assert_eq!(s.room.shapes.len(), 1000);
    }

    #[test]
    fn invalid_frames_change_nothing() {
        let mut s = Script::new();
        s.join(1, "a");
        s.send(
            1,
            r##"{"type":"shape_create","shapeType":"oval","x":1,"y":2,"width":3,"height":4}"##,
        );
        let before = s.snapshot();
        for text in [
            "garbage",
            r##"{"type":"shape_update","shapeId":"nope","x":1}"##,
            r##"{"type":"shape_delete","shapeId":"nope"}"##,
            r##"{"type":"shape_update","shapeId":"ab-2","x":"1"}"##,
            r##"{"type":"cursor_move","x":1e999,"y":0}"##,
        ] {
            assert!(matches!(s.send(1, text), Effect::Ignored(_)), "{text}");
        }
        assert_eq!(s.snapshot(), before);
    }

    #[test]
    fn update_changes_only_present_fields() {
        let mut s = Script::new();
        s.join(1, "a");
        s.send(
            1,
            r##"{"type":"shape_create","shapeType":"text","x":1,"y":2,"width":3,"height":4,"text":"hi","fill":"#111","stroke":"#222"}"##,
        );
        s.send(
            1,
            r##"{"type":"shape_update","shapeId":"ab-2","y":9,"id":"evil","userId":"evil"}"##,
        );
        let snap: serde_json::Value = serde_json::from_str(&s.snapshot()).unwrap();
        assert_eq!(
            snap["shapes"][0],
            serde_json::json!({"id":"ab-2","type":"text","x":1,"y":9,"width":3,"height":4,
                "userId":"a","timestamp":"2024-01-01T12:00:00.003Z","text":"hi",
                "fill":"#111","stroke":"#222","rotation":0})
        );
    }

    #[test]
    fn same_events_give_the_same_room() {
        let run = || {
            let mut s = Script::new();
            s.join(1, "a");
            s.send(
                1,
                r##"{"type":"shape_create","shapeType":"arrow","x":1,"y":2,"width":3,"height":4}"##,
            );
            s.send(1, r##"{"type":"cursor_move","x":5,"y":6}"##);
            s.snapshot()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn stored_shapes_come_first_and_unknown_ones_are_kept_verbatim() {
        let mut s = Script::new();
        s.join(1, "a");
        s.send(
            1,
            r##"{"type":"shape_create","shapeType":"oval","x":1,"y":2,"width":3,"height":4}"##,
        );
        let known = serde_json::json!({"id":"k","type":"text","x":1.5,"y":2,"width":3,"height":4,
            "userId":"u","timestamp":"2024-01-01T12:00:00.000Z","text":"t","fill":"#000","stroke":"#fff","rotation":0});
        let extra_field = serde_json::json!({"id":"z","type":"oval","x":1,"y":2,"width":3,"height":4,
            "userId":"u","timestamp":"2024-01-01T12:00:00.000Z","fill":"#000","stroke":"#fff","rotation":0,"zIndex":3});
        let unknown_type = serde_json::json!({"id":"star","type":"star","points":5});
        let merged = s.room.merge_stored(vec![
            known.clone(),
            extra_field.clone(),
            unknown_type.clone(),
            known.clone(),
        ]);
        assert!(merged.cut.is_empty());
        assert_eq!(merged.opaque, 3, "extra field, unknown type, duplicate id");
        let saved: serde_json::Value = serde_json::from_str(&s.room.shapes_json()).unwrap();
        let shapes = saved.as_array().unwrap();
        assert_eq!(shapes.len(), 5);
        assert_eq!(shapes[0], known);
        assert_eq!(shapes[1], extra_field);
        assert_eq!(shapes[2], unknown_type);
        assert_eq!(shapes[3], known);
        assert_eq!(shapes[4]["id"], "ab-2");
        // Verbatim shapes can be deleted, not updated; understood ones can be updated.
        assert_eq!(
            s.send(1, r##"{"type":"shape_update","shapeId":"star","x":1}"##),
            Effect::Ignored(Ignored::OpaqueShape)
        );
        assert_eq!(
            s.send(1, r##"{"type":"shape_update","shapeId":"k","x":9}"##),
            Effect::Shapes
        );
        assert_eq!(
            s.send(1, r##"{"type":"shape_delete","shapeId":"star"}"##),
            Effect::Shapes
        );
        assert_eq!(s.room.shape_count(), 4);
    }

    #[test]
    fn long_texts_are_kept_and_the_board_budget_refuses_what_would_pass_it() {
        let mut s = Script::new();
        s.join(1, "a");
        let create = |text: &str| {
            format!(
                r#"{{"type":"shape_create","shapeType":"text","x":1,"y":2,"width":3,"height":4,"text":"{text}"}}"#
            )
        };
        // Pastes a real user makes: 5,000 CJK characters (15 KB), 3,000 emoji
        // (12 KB), 10,000 control characters (60 KB once escaped).
        let pastes = [
            "中".repeat(5_000),
            "😀".repeat(3_000),
            "\\u0001".repeat(10_000),
        ];
        for paste in &pastes {
            assert_eq!(s.send(1, &create(paste)), Effect::Shapes);
        }
        assert_eq!(s.room.shape_count(), 3);
        // Shapes of 60 KB each fill the 12 MiB budget at the 209th; that
        // create is refused and the room is unchanged.
        let big = "\\u0001".repeat(10_000);
        let mut created = 3;
        loop {
            let before = s.room.shapes_json();
            match s.send(1, &create(&big)) {
                Effect::Shapes => created += 1,
                refused => {
                    assert_eq!(refused, Effect::Ignored(Ignored::BoardFull));
                    assert_eq!(s.room.shapes_json(), before);
                    break;
                }
            }
            assert!(created < MAX_SHAPES_PER_ROOM, "the budget never refused");
        }
        assert!(s.room.board_bytes() <= MAX_BOARD_BYTES);
        assert!(s.room.board_bytes() + 60_000 > MAX_BOARD_BYTES);
        assert!(s.snapshot().len() <= MAX_SNAPSHOT_BYTES);
        // An update that would grow a shape past the budget is refused and
        // leaves it as it was; one that shrinks it is taken.
        let shapes = s.room.shapes_json();
        let id = "ab-3";
        let update = |text: &str| {
            format!(r#"{{"type":"shape_update","shapeId":"{id}","x":7,"text":"{text}"}}"#)
        };
        assert_eq!(
            s.send(1, &update(&"\\u0002".repeat(12_000))),
            Effect::Ignored(Ignored::BoardFull)
        );
        assert_eq!(s.room.shapes_json(), shapes);
        assert_eq!(s.send(1, &update("short")), Effect::Shapes);
    }

    #[test]
    fn a_stored_board_over_the_budgets_is_trimmed_in_order() {
        let mut s = Script::new();
        s.join(1, "a");
        s.send(
            1,
            r#"{"type":"shape_create","shapeType":"rectangle","x":1,"y":2,"width":3,"height":4}"#,
        );
        let stored = |i: usize, text: &str| {
            serde_json::json!({"id":format!("s{i}"),"type":"text","x":1,"y":2,"width":3,"height":4,
                "userId":"u","timestamp":"2024-01-01T12:00:00.000Z","text":text,"fill":"#000","stroke":"#fff","rotation":0})
        };
        // Past the shape limit: the last stored ones and the room's own go.
        let board: Vec<serde_json::Value> = (0..MAX_SHAPES_PER_ROOM + 4)
            .map(|i| stored(i, "t"))
            .collect();
        let merged = s.room.merge_stored(board);
        assert_eq!(s.room.shape_count(), MAX_SHAPES_PER_ROOM);
        let cut: Vec<&str> = merged.cut.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(cut, ["s1000", "s1001", "s1002", "s1003", "ab-2"]);
        // Past the byte budget: 300 shapes of 60 KB, those past 12 MiB go.
        let mut s = Script::new();
        s.join(1, "a");
        let huge = "\u{1}".repeat(10_000);
        let board: Vec<serde_json::Value> = (0..300).map(|i| stored(i, &huge)).collect();
        let merged = s.room.merge_stored(board);
        let kept = s.room.shape_count();
        assert!((200..300).contains(&kept), "{kept}");
        assert_eq!(merged.cut.len(), 300 - kept);
        assert_eq!(merged.cut[0].0, format!("s{kept}"));
        assert!(s.room.board_bytes() <= MAX_BOARD_BYTES);
        assert!(s.snapshot().len() <= MAX_SNAPSHOT_BYTES);
    }

    #[test]
    fn an_image_rebuilds_the_room_exactly() {
        let mut s = Script::new();
        s.join(1, "a");
        s.join(2, "b");
        s.send(2, r##"{"type":"cursor_move","x":1.5,"y":2}"##);
        s.send(
            1,
            r##"{"type":"shape_create","shapeType":"text","x":1,"y":2,"width":3,"height":4,"text":"é\n"}"##,
        );
        s.send(1, r##"{"type":"cursor_move","x":0.1,"y":1e21}"##);
        let image = s.room.image();
        let bytes = postcard::to_stdvec(&image).unwrap();
        let back: RoomImage = postcard::from_bytes(&bytes).unwrap();
        let rebuilt = Room::from_image(RoomId("r".into()), back);
        assert_eq!(rebuilt.snapshot_json(), s.snapshot());
        assert_eq!(rebuilt.last_seq(), s.seq);
        // It goes on exactly as the original would.
        let mut original = s;
        let mut copy = Script {
            room: rebuilt,
            seq: original.seq,
        };
        for script in [&mut original, &mut copy] {
            script.send(
                2,
                r##"{"type":"shape_create","shapeType":"arrow","x":1,"y":2,"width":3,"height":4}"##,
            );
            script.apply(RoomEvent::Leave { conn: ConnId(1) });
        }
        assert_eq!(copy.snapshot(), original.snapshot());
    }

    /// The room as a v2 client sees it: its snapshot with `ops` applied.
    fn apply_ops(snapshot: &str, ops: &str) -> serde_json::Value {
        let mut state: serde_json::Value = serde_json::from_str(snapshot).unwrap();
        let ops: Vec<serde_json::Value> = serde_json::from_str(&format!("[{ops}]")).unwrap();
        for op in &ops {
            contract::protocol::v2::apply_op(&mut state, op).unwrap();
        }
        state
    }

    #[test]
    fn ops_turn_each_published_snapshot_into_the_next() {
        let mut s = Script::new();
        assert_eq!(
            s.room.take_ops(),
            None,
            "a new room has no previous snapshot"
        );
        s.join(1, "alice");
        let before = s.snapshot();
        assert_eq!(
            s.room.take_ops().as_deref(),
            Some(r#"{"op":"join","userId":"alice"}"#)
        );
        assert_eq!(s.room.take_ops().as_deref(), Some(""));
        s.join(2, "bob");
        s.send(1, r#"{"type":"cursor_move","x":1,"y":2.5}"#);
        s.send(2, r#"{"type":"cursor_move","x":3,"y":4}"#);
        s.send(1, r#"{"type":"cursor_move","x":5,"y":6}"#);
        s.send(
            1,
            r#"{"type":"shape_create","shapeType":"text","x":0,"y":0,"width":10,"height":10}"#,
        );
        s.send(2, r#"{"type":"shape_create","shapeType":"oval","x":1,"y":1,"width":2,"height":2,"fill":"red"}"#);
        let ops = s.room.take_ops().unwrap();
        let after = s.snapshot();
        assert_eq!(
            apply_ops(&before, &ops),
            serde_json::from_str::<serde_json::Value>(&after).unwrap()
        );
        assert!(ops.starts_with(r#"{"op":"join","userId":"bob"},{"op":"cursor","userId":"alice","x":1,"y":2.5,"timestamp":"#), "{ops}");

        let before = after;
        let shapes: serde_json::Value = serde_json::from_str(&before).unwrap();
        let first = shapes["shapes"][0]["id"].as_str().unwrap().to_owned();
        let second = shapes["shapes"][1]["id"].as_str().unwrap().to_owned();
        s.send(
            2,
            &format!(
                r#"{{"type":"shape_update","shapeId":"{first}","x":40,"text":"hi","stroke":""}}"#
            ),
        );
        s.send(
            2,
            &format!(r#"{{"type":"shape_update","shapeId":"{first}","rotation":0.5,"width":0.1}}"#),
        );
        s.send(
            1,
            &format!(r#"{{"type":"shape_delete","shapeId":"{second}"}}"#),
        );
        s.send(1, r#"{"type":"shape_delete","shapeId":"nope"}"#);
        s.apply(RoomEvent::Leave { conn: ConnId(1) });
        let ops = s.room.take_ops().unwrap();
        let after = s.snapshot();
        assert_eq!(
            apply_ops(&before, &ops),
            serde_json::from_str::<serde_json::Value>(&after).unwrap()
        );
        assert!(ops.contains(&format!(r#"{{"op":"update","id":"{first}","set":{{"timestamp":"2024-01-01T12:00:00.008Z","x":40,"text":"hi","stroke":""}}}}"#)), "{ops}");
        assert!(
            ops.contains(
                r#""set":{"timestamp":"2024-01-01T12:00:00.009Z","width":0.1,"rotation":0.5}"#
            ),
            "{ops}"
        );
        assert!(ops.ends_with(r#"{"op":"leave","userId":"alice"}"#), "{ops}");
    }

    #[test]
    fn a_merge_or_a_restore_breaks_the_chain_of_ops() {
        let mut s = Script::new();
        s.room.take_ops();
        s.join(1, "alice");
        s.room.merge_stored(vec![]);
        assert_eq!(s.room.take_ops(), None, "a merge is not expressed as ops");
        s.send(1, r#"{"type":"cursor_move","x":1,"y":2}"#);
        assert!(s.room.take_ops().is_some());
        let mut restored = Room::from_image(RoomId("r".into()), s.room.image());
        assert_eq!(
            restored.take_ops(),
            None,
            "a restored room has no previous snapshot"
        );
    }

    #[test]
    fn ops_that_outgrow_their_budget_become_a_snapshot() {
        let mut s = Script::new();
        s.room.take_ops();
        s.join(1, "alice");
        let text = "x".repeat(9_000);
        for _ in 0..40 {
            s.send(1, &format!(r#"{{"type":"shape_create","shapeType":"text","x":0,"y":0,"width":1,"height":1,"text":"{text}"}}"#));
        }
        assert_eq!(s.room.take_ops(), None);
        s.send(1, r#"{"type":"cursor_move","x":1,"y":2}"#);
        assert!(s.room.take_ops().is_some_and(|ops| ops.len() < 200));
    }
}
