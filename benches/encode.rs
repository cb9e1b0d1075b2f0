//! Snapshot encoding cost against room size: a cursor move in a room with 0, 100
//! and 1,000 shapes. Each shape's JSON is cached when it changes, so a snapshot
//! after a cursor move copies the cached bytes instead of re-encoding every shape.
//! Run with `cargo bench --bench encode`.

use contract::ipc::{ConnId, RoomEvent, RoomId, Stamped};
use worker::room::Room;

fn main() {
    divan::main();
}

fn room_with(shapes: u64) -> (Room, u64) {
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
                deflate: false,
            },
        );
    }
    for i in 0..shapes {
        let text = format!(
            r#"{{"type":"shape_create","shapeType":"rectangle","x":{i},"y":{},"width":150,"height":100,"text":"shape {i}"}}"#,
            i * 3
        );
        apply(
            &mut room,
            RoomEvent::Message {
                conn: ConnId(i % 10),
                text,
            },
        );
    }
    (room, seq)
}

/// One cursor move applied, then the snapshot every member gets.
#[divan::bench(args = [0, 100, 1000])]
fn cursor_move_then_snapshot(bencher: divan::Bencher, shapes: u64) {
    let (mut room, mut seq) = room_with(shapes);
    bencher.bench_local(|| {
        seq += 1;
        room.apply(&Stamped {
            room: RoomId("bench".into()),
            seq,
            time_ms: 1_704_110_400_000 + seq as i64,
            event: RoomEvent::Message {
                conn: ConnId(3),
                text: format!(r#"{{"type":"cursor_move","x":{seq},"y":5}}"#),
            },
        });
        divan::black_box(room.snapshot_json())
    });
}

/// One shape moved (its JSON re-encoded), then the snapshot.
#[divan::bench(args = [100, 1000])]
fn shape_update_then_snapshot(bencher: divan::Bencher, shapes: u64) {
    let (mut room, mut seq) = room_with(shapes);
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
                text: format!(r#"{{"type":"shape_update","shapeId":"{target}","x":{seq}}}"#),
            },
        });
        divan::black_box(room.snapshot_json())
    });
}
