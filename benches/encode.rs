//! Snapshot encoding cost against room size: a cursor move in a room with 0, 100
//! and 1,000 shapes. Each shape's JSON is cached when it changes, so a snapshot
//! after a cursor move copies the cached bytes instead of re-encoding every shape.
//! `ten_cursors`: the fan-out's rooms, snapshots plain and compressed for
//! permessage-deflate. `room_4mb`: the same in a room of ~4 MB of snapshot JSON, plain and
//! compressed for permessage-deflate (see `room_4mb`).
//! Run with `cargo bench --bench encode` (`ENCODE_SERVER_ALLOC=1`: with the
//! server's allocator settings, see `main`).

use contract::ipc::{ConnId, RoomEvent, RoomId, Stamped};
use worker::room::Room;

fn main() {
    // `ENCODE_SERVER_ALLOC=1`: the allocator set up as in the server's
    // processes (blocks from 128 KiB mapped on their own and unmapped when
    // freed), so a big snapshot's buffers are fresh pages every time, as the
    // worker's are. Without it, glibc's defaults (freed blocks reused).
    if std::env::var("ENCODE_SERVER_ALLOC").is_ok_and(|v| v == "1") {
        contract::alloc::configure();
    }
    room_4mb::check();
    divan::main();
}

/// A room of 10 members and `shapes` rectangles; with `deflate`, its first
/// member negotiated permessage-deflate.
fn room_with(shapes: u64, deflate: bool) -> (Room, u64) {
    let creates = (0..shapes).map(|i| {
        format!(
            r#"{{"type":"shape_create","shapeType":"rectangle","x":{i},"y":{},"width":150,"height":100,"text":"shape {i}"}}"#,
            i * 3
        )
    });
    room_of(deflate, creates)
}

/// A room of 10 members (with `deflate`, the first negotiated it) after
/// `creates`, sent by its members in turn; and its last sequence number.
fn room_of(deflate: bool, creates: impl IntoIterator<Item = String>) -> (Room, u64) {
    let mut room = Room::new(RoomId("bench".into()), 7);
    let mut seq = 0;
    let mut apply = |room: &mut Room, event: RoomEvent| {
        seq += 1;
        room.apply(&Stamped {
            room: RoomId("bench".into()),
            seq,
            time_ms: 1_704_110_400_000 + seq as i64,
            event,
        });
    };
    for m in 0..10 {
        apply(
            &mut room,
            RoomEvent::Join {
                conn: ConnId(m),
                user_id: format!("user-{m}"),
                v2: false,
                // One member is enough for the room to compress.
                deflate: deflate && m == 0,
            },
        );
    }
    for (i, text) in creates.into_iter().enumerate() {
        apply(
            &mut room,
            RoomEvent::Message {
                conn: ConnId(i as u64 % 10),
                text: text.into(),
            },
        );
    }
    (room, seq)
}

/// One cursor move applied, then the snapshot every member gets.
#[divan::bench(args = [0, 100, 1000])]
fn cursor_move_then_snapshot(bencher: divan::Bencher, shapes: u64) {
    let (mut room, mut seq) = room_with(shapes, false);
    bencher.bench_local(|| {
        seq += 1;
        room.apply(&Stamped {
            room: RoomId("bench".into()),
            seq,
            time_ms: 1_704_110_400_000 + seq as i64,
            event: RoomEvent::Message {
                conn: ConnId(3),
                text: format!(r#"{{"type":"cursor_move","x":{seq},"y":5}}"#).into(),
            },
        });
        divan::black_box(room.snapshot_json())
    });
}

/// One shape moved (its JSON re-encoded), then the snapshot.
#[divan::bench(args = [100, 1000])]
fn shape_update_then_snapshot(bencher: divan::Bencher, shapes: u64) {
    let (mut room, mut seq) = room_with(shapes, false);
    // Shape ids are `{seed:x}-{seq:x}`; shapes were created at seqs 11…
    let target = format!("7-{:x}", 11);
    bencher.bench_local(|| {
        seq += 1;
        room.apply(&Stamped {
            room: RoomId("bench".into()),
            seq,
            time_ms: 1_704_110_400_000 + seq as i64,
            event: RoomEvent::Message {
                conn: ConnId(3),
                text: format!(r#"{{"type":"shape_update","shapeId":"{target}","x":{seq}}}"#).into(),
            },
        });
        divan::black_box(room.snapshot_json())
    });
}

/// The rooms of the load generator's fan-out (10 members, every one's cursor
/// on the board, 0 or 200 shapes): a cursor move (the movers in turn), then
/// the snapshot, plain or with its compressed form (a member negotiated
/// permessage-deflate: members and cursors compressed, the shapes' chunks
/// reused; `Room::snapshot`), what the worker makes per version.
mod ten_cursors {
    use contract::ipc::{ConnId, RoomEvent, RoomId, Stamped};
    use worker::room::Room;

    fn cursor_move(room: &mut Room, seq: u64) {
        room.apply(&Stamped {
            room: RoomId("bench".into()),
            seq,
            time_ms: 1_704_110_400_000 + seq as i64,
            event: RoomEvent::Message {
                conn: ConnId(seq % 10),
                text: format!(r#"{{"type":"cursor_move","x":{seq},"y":5}}"#).into(),
            },
        });
    }

    fn room(shapes: u64, deflate: bool) -> (Room, u64) {
        let (mut room, mut seq) = super::room_with(shapes, deflate);
        for _ in 0..10 {
            seq += 1;
            cursor_move(&mut room, seq);
        }
        room.snapshot(); // the chunks compressed once
        (room, seq)
    }

    #[divan::bench(args = [0, 200])]
    fn snapshot_json(bencher: divan::Bencher, shapes: u64) {
        let (mut room, mut seq) = room(shapes, false);
        bencher.bench_local(|| {
            seq += 1;
            cursor_move(&mut room, seq);
            divan::black_box(room.snapshot_json())
        });
    }

    /// With a member that negotiated compression. With no shapes the
    /// snapshot (~840 bytes) is under `MIN_COMPRESSED_SNAPSHOT_BYTES` and
    /// goes plain: the figure is then what that check costs.
    #[divan::bench(args = [0, 200])]
    fn compressed_snapshot(bencher: divan::Bencher, shapes: u64) {
        let (mut room, mut seq) = room(shapes, true);
        bencher.bench_local(|| {
            seq += 1;
            cursor_move(&mut room, seq);
            let snapshot = room.snapshot();
            let big = snapshot.json.len() >= contract::deflate::MIN_COMPRESSED_SNAPSHOT_BYTES;
            assert_eq!(snapshot.deflated.is_some(), big);
            divan::black_box(snapshot)
        });
    }
}

/// A room of ~4 MB of snapshot JSON: 10 members, 1,000 `text` shapes of ~4 KB
/// of words each. Per snapshot: the plain JSON; the compressed snapshot
/// (`Room::snapshot` with a member that negotiated deflate) after a cursor
/// move (every 32 KiB chunk of shapes reused) and after one shape's update
/// (its chunk compressed again); and, for comparison, the whole JSON
/// compressed in one piece (`deflate_message`: compressing without chunks).
/// Each figure includes applying the client message.
mod room_4mb {
    use contract::deflate::{SYNC_TRAILER, deflate_message, inflate_message};
    use contract::ipc::{ConnId, RoomEvent, RoomId, Stamped};
    use worker::room::Room;

    const SHAPES: u64 = 1000;
    /// Characters of each shape's text.
    const TEXT_BYTES: usize = 4000;

    /// Words drawn by a fixed pseudo-random sequence: text that compresses
    /// about as prose does (a repeated string would compress far better).
    fn text(shape: u64) -> String {
        const WORDS: &[&str] = &[
            "the", "board", "arrow", "points", "to", "a", "new", "idea", "we", "should", "draw",
            "before", "friday", "meeting", "with", "design", "team", "and", "review", "this",
            "sketch", "of", "layout", "for", "login", "page", "then", "move", "boxes", "left",
            "right", "above", "below", "colour", "blue", "green", "bold", "note", "question",
            "answer", "why", "not", "maybe", "later", "today", "user", "flow", "checkout", "cart",
            "price", "total", "error", "message", "shown", "when", "empty", "input", "field",
            "button", "click", "opens", "dialog", "closes", "saves",
        ];
        let mut state = shape.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut out = format!("Note {shape}:");
        while out.len() < TEXT_BYTES {
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            out.push(' ');
            out.push_str(WORDS[(state % WORDS.len() as u64) as usize]);
            if state.is_multiple_of(11) {
                out.push('.');
            }
        }
        out
    }

    /// The room, its last sequence number, and the id of its middle shape.
    fn room(deflate: bool) -> (Room, u64, String) {
        let creates = (0..SHAPES).map(|i| {
            format!(
                r#"{{"type":"shape_create","shapeType":"text","x":{i},"y":{},"width":400,"height":300,"text":"{}"}}"#,
                i * 3,
                text(i)
            )
        });
        let (room, seq) = super::room_of(deflate, creates);
        assert_eq!(room.shape_count(), SHAPES as usize, "every shape created");
        // Shape ids are `{seed:x}-{seq:x}`; shapes were created at seqs 11…
        let middle = format!("7-{:x}", 11 + SHAPES / 2);
        (room, seq, middle)
    }

    fn message(room: &mut Room, seq: u64, text: String) {
        room.apply(&Stamped {
            room: RoomId("bench".into()),
            seq,
            time_ms: 1_704_110_400_000 + seq as i64,
            event: RoomEvent::Message {
                conn: ConnId(3),
                text: text.into(),
            },
        });
    }

    fn cursor_move(room: &mut Room, seq: u64) {
        message(
            room,
            seq,
            format!(r#"{{"type":"cursor_move","x":{seq},"y":5}}"#),
        );
    }

    /// A compressed room: its first snapshot made (every chunk compressed
    /// once, as the room's first snapshot after the join does).
    fn compressed_room() -> (Room, u64, String) {
        let (mut room, seq, middle) = room(true);
        room.snapshot().deflated.expect("smaller compressed");
        (room, seq, middle)
    }

    /// Checks that the compressed snapshot (after a cursor move and after a
    /// shape update) inflates to the JSON, and prints the sizes.
    pub fn check() {
        let (mut room, mut seq, middle) = compressed_room();
        let mut sizes = None;
        for update in [false, true] {
            seq += 1;
            if update {
                let text = format!(r#"{{"type":"shape_update","shapeId":"{middle}","x":{seq}}}"#);
                message(&mut room, seq, text);
            } else {
                cursor_move(&mut room, seq);
            }
            let worker::room::Snapshot {
                json,
                deflated: compressed,
                ..
            } = room.snapshot();
            let compressed = compressed.expect("smaller compressed");
            let payload = compressed
                .strip_suffix(&SYNC_TRAILER)
                .expect("segments end on a sync flush");
            let inflated = inflate_message(payload, 1 << 26).expect("inflates");
            // The segments leave out the opening `{` (a stored segment adds it).
            assert_eq!(&json.as_bytes()[1..], &inflated[..], "inflates to the JSON");
            sizes = Some((
                json.len(),
                compressed.len(),
                deflate_message(json.as_bytes()).len(),
            ));
        }
        let (json, chunked, whole) = sizes.expect("measured");
        println!(
            "room_4mb: {} shapes, snapshot {json} bytes of JSON, {chunked} compressed in chunks, \
             {whole} compressed whole",
            room.shape_count()
        );
    }

    /// A cursor move, then the plain snapshot JSON.
    #[divan::bench(sample_count = 100)]
    fn cursor_move_then_snapshot_json(bencher: divan::Bencher) {
        let (mut room, mut seq, _) = room(false);
        bencher.bench_local(|| {
            seq += 1;
            cursor_move(&mut room, seq);
            divan::black_box(room.snapshot_json())
        });
    }

    /// A cursor move, then the snapshot and its compressed form: the head
    /// (members, cursors) compressed, every chunk of shapes reused.
    #[divan::bench(sample_count = 100)]
    fn cursor_move_then_compressed_snapshot(bencher: divan::Bencher) {
        let (mut room, mut seq, _) = compressed_room();
        bencher.bench_local(|| {
            seq += 1;
            cursor_move(&mut room, seq);
            let snapshot = room.snapshot();
            assert!(snapshot.deflated.is_some());
            divan::black_box(snapshot)
        });
    }

    /// The middle shape moved, then the snapshot and its compressed form: the
    /// head and that shape's chunk (~32 KiB) compressed, the others reused.
    #[divan::bench(sample_count = 100)]
    fn shape_update_then_compressed_snapshot(bencher: divan::Bencher) {
        let (mut room, mut seq, middle) = compressed_room();
        bencher.bench_local(|| {
            seq += 1;
            message(
                &mut room,
                seq,
                format!(r#"{{"type":"shape_update","shapeId":"{middle}","x":{seq}}}"#),
            );
            let snapshot = room.snapshot();
            assert!(snapshot.deflated.is_some());
            divan::black_box(snapshot)
        });
    }

    /// A cursor move, then the plain snapshot JSON compressed in one piece:
    /// what each snapshot would cost without the chunks.
    #[divan::bench(sample_count = 30)]
    fn cursor_move_then_whole_snapshot_deflated(bencher: divan::Bencher) {
        let (mut room, mut seq, _) = room(false);
        bencher.bench_local(|| {
            seq += 1;
            cursor_move(&mut room, seq);
            let json = room.snapshot_json();
            divan::black_box(deflate_message(json.as_bytes()))
        });
    }
}
