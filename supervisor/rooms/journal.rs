//! A room's journal: every event stamped since the worker's last checkpoint of
//! the room, so that checkpoint plus journal rebuild the room exactly if its
//! worker fails. Bounded by events and by bytes; a journal past its bounds drops
//! what it holds and asks for a checkpoint, and the room is restorable again as
//! soon as a checkpoint covering the dropped events arrives. Large messages are
//! kept as their parsed fields only (fields the room ignores, such as padding,
//! are not kept). Pure: no I/O, no clock.

use std::collections::VecDeque;

use contract::ipc::{RoomEvent, RoomId, Stamped};
use contract::protocol::ClientMessage;

/// Events, and bytes, after which the worker is asked for a checkpoint (then
/// again after as many more), so a room with no saves (cursor traffic, or a
/// degraded room) keeps a short journal.
pub const CHECKPOINT_EVERY_EVENTS: usize = 1000;
/// The bytes' half of that rule: 1 MiB of journal asks for a checkpoint too.
pub const CHECKPOINT_EVERY_BYTES: usize = 1 << 20;
/// Hard bounds per room. Reached only when checkpoints stop coming (a room still
/// loading, a worker that does not answer): the journal is then dropped, and the
/// room cannot be restored exactly until the next checkpoint.
pub const JOURNAL_MAX_EVENTS: usize = 50_000;
/// The bytes' half of those bounds: 16 MiB, counted as [`Journal::bytes`].
pub const JOURNAL_MAX_BYTES: usize = 16 << 20;
// A room's queued messages (at most the worker's budget) must fit twice in
// its journal: see `worker_queue::MESSAGE_KIB`.
const _: () = assert!(2 * crate::worker_queue::MESSAGE_KIB as usize * 1024 <= JOURNAL_MAX_BYTES);
/// What an event costs besides its text (ids, seq, time, queue slot).
const EVENT_OVERHEAD_BYTES: usize = 96;
/// Messages longer than this are journaled as the fields the room reads. Below
/// it, parsing in the supervisor would cost more than the bytes it saves (a
/// cursor move is ~50 bytes, a shape ~150).
const COMPACT_OVER_BYTES: usize = 1024;
/// The fields of every client message (PROTOCOL.md §3); the room ignores any
/// other, so the journal need not keep them.
const MESSAGE_FIELDS: [&str; 11] = [
    "type",
    "x",
    "y",
    "width",
    "height",
    "rotation",
    "shapeType",
    "shapeId",
    "text",
    "fill",
    "stroke",
];

/// One room's events since its last checkpoint, in sequence order, with the
/// bookkeeping that says when to ask for the next checkpoint and whether the
/// room is still restorable. Each room's recovery state holds one; a restore
/// replays it after the checkpoint.
#[derive(Default)]
pub struct Journal {
    events: VecDeque<Entry>,
    bytes: usize,
    /// Events and bytes recorded since a checkpoint was last asked for.
    events_since_request: usize,
    bytes_since_request: usize,
    /// Events up to this seq were dropped (the journal outgrew its bounds) and no
    /// checkpoint covers them yet.
    gap_through: Option<u64>,
}

/// An event as the journal holds it: without its room, which is the
/// journal's (a room id per event was a heap copy of it per message).
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    seq: u64,
    time_ms: i64,
    event: RoomEvent,
}

/// What the journal needs after recording an event.
#[derive(Debug, PartialEq)]
pub enum Recorded {
    /// Nothing to do: the journal is within its checkpoint interval.
    Kept,
    /// Ask the worker for a checkpoint now.
    WantsCheckpoint,
}

/// Bytes an event holds in the journal.
fn size_of(event: &RoomEvent) -> usize {
    EVENT_OVERHEAD_BYTES
        + match event {
            RoomEvent::Message { text, .. } => text.len(),
            RoomEvent::Join { user_id, .. } => user_id.len(),
            RoomEvent::Leave { .. } | RoomEvent::MemoryBudget { .. } => 0,
        }
}

/// The event as the journal keeps it: a large message reduced to what the room
/// reads of it, with the same effect when replayed. An invalid one (the room
/// ignores it) becomes an empty message, which the room ignores too.
fn journal_form(event: &RoomEvent) -> RoomEvent {
    let RoomEvent::Message { conn, text } = event else {
        return event.clone();
    };
    if text.len() <= COMPACT_OVER_BYTES {
        return event.clone();
    }
    let compact = match ClientMessage::parse(text) {
        // Valid, so an object without duplicate fields: keeping only the known
        // fields parses to the same message.
        Ok(_) => serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
            .map(|mut fields| {
                fields.retain(|name, _| MESSAGE_FIELDS.contains(&name.as_str()));
                serde_json::Value::Object(fields).to_string()
            })
            .unwrap_or_default(),
        Err(_) => String::new(),
    };
    RoomEvent::Message {
        conn: *conn,
        text: compact.into(),
    }
}

impl Journal {
    /// Keeps `stamped` (in its journal form) after the events already held. Past
    /// the hard bounds, drops every earlier event first: the room is then not
    /// restorable until a checkpoint covers them.
    pub fn record(&mut self, stamped: &Stamped) -> Recorded {
        // The one copy the journal keeps (the original goes to the worker).
        let entry = Entry {
            seq: stamped.seq,
            time_ms: stamped.time_ms,
            event: journal_form(&stamped.event),
        };
        let size = size_of(&entry.event);
        if self.events.len() >= JOURNAL_MAX_EVENTS || self.bytes + size > JOURNAL_MAX_BYTES {
            tracing::error!(
                room = %stamped.room,
                events = self.events.len(),
                bytes = self.bytes,
                "journal over its bounds without a checkpoint; dropped: until the next checkpoint the room cannot be restored after a worker failure"
            );
            if let Some(last) = self.events.back() {
                self.gap_through = Some(last.seq);
            }
            self.events.clear();
            self.bytes = 0;
            self.events_since_request = 0;
            self.bytes_since_request = 0;
            self.push(entry, size);
            return Recorded::WantsCheckpoint;
        }
        self.push(entry, size);
        if self.events_since_request >= CHECKPOINT_EVERY_EVENTS
            || self.bytes_since_request >= CHECKPOINT_EVERY_BYTES
        {
            self.events_since_request = 0;
            self.bytes_since_request = 0;
            return Recorded::WantsCheckpoint;
        }
        Recorded::Kept
    }

    fn push(&mut self, entry: Entry, size: usize) {
        self.events.push_back(entry);
        self.bytes += size;
        self.events_since_request += 1;
        self.bytes_since_request += size;
    }

    /// A checkpoint covers every event up to `seq`: they leave the journal, and a
    /// gap it covers is closed.
    pub fn checkpointed(&mut self, seq: u64) {
        while self.events.front().is_some_and(|s| s.seq <= seq) {
            if let Some(entry) = self.events.pop_front() {
                self.bytes -= size_of(&entry.event);
            }
        }
        if self.gap_through.is_some_and(|gap| gap <= seq) {
            self.gap_through = None;
        }
    }

    /// A new instance of the room: nothing before it matters.
    pub fn clear(&mut self) {
        *self = Journal::default();
    }

    /// Whether checkpoint plus journal still rebuild the room exactly.
    pub fn restorable(&self) -> bool {
        self.gap_through.is_none()
    }

    /// The events held, oldest first, as `room`'s: what a restore sends
    /// after the checkpoint.
    pub fn stamped<'a>(&'a self, room: &'a RoomId) -> impl Iterator<Item = Stamped> + 'a {
        self.events.iter().map(|entry| Stamped {
            room: room.clone(),
            seq: entry.seq,
            time_ms: entry.time_ms,
            event: entry.event.clone(),
        })
    }

    /// The sequence numbers of the events held, oldest first.
    #[cfg(test)]
    pub fn seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.events.iter().map(|entry| entry.seq)
    }

    /// Events held.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Bytes held, as counted against [`JOURNAL_MAX_BYTES`] (text plus a fixed
    /// overhead per event).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use contract::ipc::{ConnId, RoomId};
    use serde_json::json;

    fn stamped(seq: u64, text: String) -> Stamped {
        Stamped {
            room: RoomId("r".into()),
            seq,
            time_ms: 0,
            event: RoomEvent::Message {
                conn: ConnId(1),
                text: text.into(),
            },
        }
    }

    /// A valid message (a text shape) of about `text_len` bytes: the journal
    /// keeps all of it.
    fn message(seq: u64, text_len: usize) -> Stamped {
        let create = json!({"type":"shape_create","shapeType":"text","x":1,"y":2,
            "width":3,"height":4,"text":"x".repeat(text_len)});
        stamped(seq, create.to_string())
    }

    #[test]
    fn checkpoints_are_asked_for_by_events_and_by_bytes() {
        let mut journal = Journal::default();
        let asks = (1..=3000)
            .filter(|&seq| journal.record(&message(seq, 10)) == Recorded::WantsCheckpoint)
            .count();
        assert_eq!(asks, 3);
        // 9 KB messages: a checkpoint every MiB, every 115 messages.
        let size = size_of(&message(1, 9_000).event) as u64;
        let every = (CHECKPOINT_EVERY_BYTES as u64).div_ceil(size);
        assert_eq!(every, 115);
        let mut journal = Journal::default();
        let asks: Vec<u64> = (1..=500)
            .filter(|&seq| journal.record(&message(seq, 9_000)) == Recorded::WantsCheckpoint)
            .collect();
        assert_eq!(asks, [every, 2 * every, 3 * every, 4 * every]);
        assert_eq!(journal.bytes() as u64, 500 * size);
    }

    #[test]
    fn a_checkpoint_trims_what_it_covers() {
        let mut journal = Journal::default();
        for seq in 1..=10 {
            journal.record(&message(seq, 100));
        }
        journal.checkpointed(7);
        let left: Vec<u64> = journal.seqs().collect();
        assert_eq!(left, [8, 9, 10]);
        assert_eq!(journal.bytes(), 3 * size_of(&message(1, 100).event));
    }

    #[test]
    fn an_overflow_is_recovered_by_the_next_checkpoint() {
        let mut journal = Journal::default();
        // 16 MiB of 9 KB messages without a checkpoint.
        let mut seq = 0;
        while journal.restorable() {
            seq += 1;
            journal.record(&message(seq, 9_000));
        }
        assert_eq!(
            seq,
            1 + JOURNAL_MAX_BYTES as u64 / size_of(&message(1, 9_000).event) as u64
        );
        assert!(journal.bytes() <= JOURNAL_MAX_BYTES);
        // The overflowing event is kept; everything before it was dropped.
        assert_eq!(journal.seqs().collect::<Vec<_>>(), [seq]);
        journal.record(&message(seq + 1, 10));
        // A checkpoint older than the gap does not close it; one covering it does.
        journal.checkpointed(seq - 2);
        assert!(!journal.restorable());
        journal.checkpointed(seq);
        assert!(journal.restorable());
        assert_eq!(journal.seqs().collect::<Vec<_>>(), [seq + 1]);
    }

    #[test]
    fn the_event_count_is_bounded_too() {
        let mut journal = Journal::default();
        for seq in 1..=(JOURNAL_MAX_EVENTS as u64 + 1) {
            journal.record(&message(seq, 1));
        }
        assert!(!journal.restorable());
        assert_eq!(journal.len(), 1);
    }

    #[test]
    fn large_messages_are_kept_as_what_the_room_reads() {
        let pad = "p".repeat(50_000);
        let text = "t".repeat(5_000);
        let cases = [
            json!({"type":"cursor_move","x":1.5,"y":-2,"pad":pad}),
            json!({"pad":pad,"type":"shape_create","shapeType":"text","x":1,"y":2,"width":3,
                "height":4,"text":text,"fill":"#000","stroke":"#111","extra":{"a":[1,2]}}),
            json!({"type":"shape_update","shapeId":"abc","rotation":45,"text":text,"pad":pad}),
            json!({"type":"shape_delete","shapeId":"abc","pad":pad}),
        ];
        for case in cases {
            let raw = case.to_string();
            let kept = journal_form(&stamped(1, raw.clone()).event);
            let RoomEvent::Message { text: kept, .. } = kept else {
                panic!("still a message");
            };
            assert!(!kept.contains("pad") && kept.len() < 12_000, "{kept}");
            assert_eq!(
                ClientMessage::parse(&kept).unwrap(),
                ClientMessage::parse(&raw).unwrap()
            );
        }
        // Invalid (duplicate field, unknown type): ignored either way.
        let dup = format!(r#"{{"type":"cursor_move","x":1,"x":2,"y":0,"pad":"{pad}"}}"#);
        assert!(ClientMessage::parse(&dup).is_err());
        let kept = journal_form(&stamped(2, dup).event);
        assert_eq!(
            kept,
            RoomEvent::Message {
                conn: ConnId(1),
                text: "".into()
            }
        );
        // Small messages are kept as they came.
        let small = json!({"type":"cursor_move","x":1,"y":2,"extra":1}).to_string();
        assert_eq!(
            journal_form(&stamped(3, small.clone()).event),
            stamped(3, small).event
        );
    }
}
