//! Property tests (the stable-Rust stand-in for fuzzing: `cargo fuzz` needs a
//! nightly toolchain, which this project's machines do not have): the client
//! message parser, the IPC decoder and the token check never panic on arbitrary
//! input, and the room state machine keeps its invariants and stays deterministic
//! under arbitrary sequences of valid and invalid messages from several members.

use bytes::{BufMut, BytesMut};
use contract::ipc::{self, ConnId, FromWorker, RoomEvent, RoomId, Stamped, ToWorker};
use contract::protocol::{ClientMessage, MAX_MEMBERS_PER_ROOM, MAX_SHAPES_PER_ROOM, v2};
use proptest::prelude::*;
use serde_json::{Value, json};
use supervisor::Authenticator;
use worker::room::Room;

const SEED: u64 = 0xab;

/// 512 cases per property in CI; `PROPTEST_CASES=N` for a longer local run.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// Numbers a hostile client might send.
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-2000.0f64..2000.0).prop_map(|n| json!(n)),
        Just(json!(0)),
        Just(json!(-0.0)),
        Just(json!(1e9)),
        Just(json!(1e10)),
        Just(json!(5e-324)),
        Just(json!("12")),
        Just(json!(null)),
        Just(json!([1])),
    ]
}

fn string() -> impl Strategy<Value = Value> {
    prop_oneof![
        "[a-z#0-9 ]{0,12}".prop_map(|s| json!(s)),
        Just(json!("\u{0}\"\\\n\u{2028}é")),
        (0usize..3).prop_map(|n| json!("x".repeat([65, 129, 10_001][n]))),
        Just(json!(7)),
    ]
}

/// A client message: usually well-formed, often with a bad field, sometimes junk.
/// `shapes` is how many shapes may exist, to aim updates and deletes at real ids.
fn message() -> impl Strategy<Value = String> {
    let shape_type = prop_oneof![
        Just("rectangle"),
        Just("oval"),
        Just("text"),
        Just("line"),
        Just("arrow"),
        Just("star")
    ];
    let target = prop_oneof![
        (1u64..80).prop_map(|seq| json!(format!("{SEED:x}-{seq:x}"))),
        Just(json!("nope")),
        Just(json!(3)),
    ];
    prop_oneof![
        3 => (number(), number()).prop_map(|(x, y)| json!({"type":"cursor_move","x":x,"y":y}).to_string()),
        4 => (shape_type, number(), number(), number(), number(), proptest::option::of(string()), proptest::option::of(string()))
            .prop_map(|(t, x, y, w, h, text, fill)| {
                let mut m = json!({"type":"shape_create","shapeType":t,"x":x,"y":y,"width":w,"height":h,"id":"mine"});
                if let Some(text) = text { m["text"] = text; }
                if let Some(fill) = fill { m["fill"] = fill; }
                m.to_string()
            }),
        3 => (target.clone(), proptest::option::of(number()), proptest::option::of(string()))
            .prop_map(|(id, x, stroke)| {
                let mut m = json!({"type":"shape_update","shapeId":id});
                if let Some(x) = x { m["x"] = x; }
                if let Some(stroke) = stroke { m["stroke"] = stroke; }
                m.to_string()
            }),
        2 => target.prop_map(|id| json!({"type":"shape_delete","shapeId":id}).to_string()),
        1 => ".{0,40}",
        1 => Just("{\"type\":\"cursor_move\",\"x\":1e999,\"y\":0}".to_owned()),
    ]
}

#[derive(Clone, Debug)]
enum Op {
    Join(u64, u8),
    Leave(u64),
    Send(u64, String),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0u64..6, 0u8..4).prop_map(|(c, u)| Op::Join(c, u)),
        1 => (0u64..6).prop_map(Op::Leave),
        8 => (0u64..6, message()).prop_map(|(c, m)| Op::Send(c, m)),
    ]
}

fn stamped(seq: u64, op: &Op) -> Stamped {
    let event = match op {
        // Even connections speak v2: the room records ops only while one of
        // them is a member, so the v2 property also crosses rooms without.
        Op::Join(c, u) => RoomEvent::Join {
            conn: ConnId(*c),
            user_id: format!("user{u}"),
            v2: c % 2 == 0,
            deflate: c % 3 == 0,
        },
        Op::Leave(c) => RoomEvent::Leave { conn: ConnId(*c) },
        Op::Send(c, text) => RoomEvent::Message {
            conn: ConnId(*c),
            text: text.clone().into(),
        },
    };
    Stamped {
        room: RoomId("r".into()),
        seq,
        time_ms: 1_704_110_400_000 + seq as i64 * 7,
        event,
    }
}

fn check_invariants(snapshot: &str) {
    let snap: Value = serde_json::from_str(snapshot).expect("snapshot parses");
    let users: Vec<&str> = snap["connectedUsers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    let mut unique = users.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), users.len(), "a user is in the room twice");
    assert!(users.len() <= MAX_MEMBERS_PER_ROOM);
    for cursor in snap["cursors"].as_array().unwrap() {
        assert!(
            users.contains(&cursor["userId"].as_str().unwrap()),
            "cursor of a non-member"
        );
        assert!(cursor["x"].is_number() && cursor["y"].is_number());
    }
    let shapes = snap["shapes"].as_array().unwrap();
    assert!(shapes.len() <= MAX_SHAPES_PER_ROOM);
    let mut ids: Vec<&str> = shapes.iter().map(|s| s["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), shapes.len(), "duplicate shape id");
    for shape in shapes {
        for field in ["id", "type", "userId", "timestamp", "fill", "stroke"] {
            assert!(shape[field].is_string(), "{field} missing in {shape}");
        }
        for field in ["x", "y", "width", "height", "rotation"] {
            let n = shape[field]
                .as_f64()
                .unwrap_or_else(|| panic!("{field} in {shape}"));
            assert!(n.is_finite() && n.abs() <= 1e9);
        }
        if let Some(text) = shape.get("text") {
            // Bounded by the message size (64 KiB) only.
            assert!(text.as_str().unwrap().len() <= 64 * 1024);
        }
        assert!(shape["fill"].as_str().unwrap().len() <= 64);
    }
}

/// A realistic client message for the v2 property: valid most of the time,
/// aimed at shapes that exist (ids are `{SEED}-{seq}` of the creating frame).
fn v2_message() -> impl Strategy<Value = String> {
    let coord = prop_oneof![
        (-2000.0f64..2000.0).prop_map(|n| json!(n)),
        (-50i32..50).prop_map(|n| json!(n)),
        Just(json!(1e9)),
        Just(json!(-0.0)),
    ];
    let text = prop_oneof![
        Just(json!("")),
        "[a-z \"\\\n]{0,8}".prop_map(|s| json!(s)),
        Just(json!("\u{0}é\u{2028}"))
    ];
    let target = (1u64..40).prop_map(|seq| format!("{SEED:x}-{seq:x}"));
    let field = prop_oneof![
        Just("x"),
        Just("y"),
        Just("width"),
        Just("height"),
        Just("rotation"),
        Just("text"),
        Just("fill"),
        Just("stroke")
    ];
    prop_oneof![
        4 => (coord.clone(), coord.clone()).prop_map(|(x, y)| json!({"type":"cursor_move","x":x,"y":y}).to_string()),
        3 => (prop_oneof![Just("rectangle"), Just("oval"), Just("text"), Just("line"), Just("arrow")], coord.clone(), coord.clone(), coord.clone(), coord.clone(), proptest::option::of(text.clone()), proptest::option::of(text.clone()))
            .prop_map(|(t, x, y, w, h, text, fill)| {
                let mut m = json!({"type":"shape_create","shapeType":t,"x":x,"y":y,"width":w,"height":h});
                if let Some(text) = text { m["text"] = text; }
                if let Some(fill) = fill { m["fill"] = fill; }
                m.to_string()
            }),
        4 => (target.clone(), proptest::collection::vec((field, coord, text), 0..4))
            .prop_map(|(id, changes)| {
                let mut m = json!({"type":"shape_update","shapeId":id});
                for (field, n, t) in changes {
                    m[field] = if ["text", "fill", "stroke"].contains(&field) { t } else { n };
                }
                m.to_string()
            }),
        1 => target.prop_map(|id| json!({"type":"shape_delete","shapeId":id}).to_string()),
        1 => message(),
    ]
}

/// A step of the v2 property: a room event, or what the server and the
/// network do with the room's publishes.
#[derive(Clone, Debug)]
enum V2Step {
    Event(Op),
    /// The worker publishes; the member's session sends it at once, or holds
    /// it back (the member's rate) and sends it with the next one.
    Publish {
        deliver: bool,
    },
    /// The next ops message to the client is lost (a client bug, a proxy…).
    DropNext,
    /// The worker crashes and the room is rebuilt from its checkpoint.
    Restore,
    /// The stored board arrives late and is merged.
    Merge,
}

fn v2_step() -> impl Strategy<Value = V2Step> {
    prop_oneof![
        2 => (0u64..4, 0u8..4).prop_map(|(c, u)| V2Step::Event(Op::Join(c, u))),
        1 => (0u64..4).prop_map(|c| V2Step::Event(Op::Leave(c))),
        12 => (0u64..4, v2_message().boxed()).prop_map(|(c, m)| V2Step::Event(Op::Send(c, m))),
        6 => any::<bool>().prop_map(|deliver| V2Step::Publish { deliver }),
        1 => Just(V2Step::DropNext),
        1 => Just(V2Step::Restore),
        1 => Just(V2Step::Merge),
    ]
}

/// The supervisor's side of one v2 member, reduced to what decides its
/// messages: the batches published since the member's last message.
struct V2Member {
    replica: v2::Replica,
    next_seq: u64,
    /// Batches the member has not been sent, in order; `None` for a publish
    /// not reachable by ops (then a snapshot is due).
    missed: Vec<Option<String>>,
    has_any: bool,
    drop_next: bool,
}

impl V2Member {
    /// Sends what brings the client to `snapshot` (the room's newest publish);
    /// answers a resync at once with a snapshot.
    fn deliver(&mut self, snapshot: &str, resync: bool) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let batches: Option<Vec<String>> = std::mem::take(&mut self.missed).into_iter().collect();
        let (message, is_ops) = match batches {
            Some(batches) if self.has_any && !resync => {
                let ops = v2::ops_message(seq, batches.iter().map(|b| b.as_bytes()));
                (String::from_utf8(ops).unwrap(), true)
            }
            _ => {
                let mut m = String::from_utf8(v2::snapshot_prefix(seq)).unwrap();
                m.push_str(&snapshot[1..]);
                (m, false)
            }
        };
        self.has_any = true;
        if is_ops && std::mem::take(&mut self.drop_next) {
            return;
        }
        match self.replica.receive(&message).unwrap() {
            v2::Applied::Ok => {
                let want: Value = serde_json::from_str(snapshot).unwrap();
                assert_eq!(self.replica.state.as_ref(), Some(&want), "after {message}");
            }
            v2::Applied::NeedResync => self.deliver(snapshot, true),
            v2::Applied::Ignored => panic!("ops ignored: the replica waits for no snapshot"),
        }
    }
}

proptest! {
    #![proptest_config(config())]

    /// Protocol v2: a client that applies the ops of every batch to its first
    /// snapshot has the room a v1 client sees, whatever the events, however
    /// batches are grouped by the member's rate, and after a lost batch (the
    /// client asks for a resync), a crash (restore) or a late board load.
    #[test]
    fn v2_ops_applied_to_the_first_snapshot_give_the_v1_snapshot(steps in proptest::collection::vec(v2_step(), 1..150)) {
        let mut room = Room::new(RoomId("r".into()), SEED);
        let mut member = V2Member { replica: v2::Replica::default(), next_seq: 0, missed: Vec::new(), has_any: false, drop_next: false };
        let mut seq = 0;
        for step in steps {
            match step {
                V2Step::Event(op) => {
                    seq += 1;
                    room.apply(&stamped(seq, &op));
                }
                V2Step::Publish { deliver } => {
                    member.missed.push(room.take_ops());
                    if deliver {
                        member.deliver(&room.snapshot_json(), false);
                    }
                }
                V2Step::DropNext => member.drop_next = true,
                V2Step::Restore => room = Room::from_image(RoomId("r".into()), room.image()),
                V2Step::Merge => {
                    let stored = json!({"id":format!("stored-{seq}"),"type":"oval","x":1,"y":2,"width":3,"height":4,
                        "userId":"old","timestamp":"2024-01-01T00:00:00.000Z","fill":"#fff","stroke":"#000","rotation":0});
                    room.merge_stored(vec![stored]);
                }
            }
        }
        // The newest state always reaches the client in the end (the member's
        // rate never loses it).
        member.missed.push(room.take_ops());
        member.drop_next = false;
        member.deliver(&room.snapshot_json(), false);
    }

    #[test]
    fn the_parser_never_panics(text in ".{0,200}") {
        let _ = ClientMessage::parse(&text);
    }

    #[test]
    fn the_parser_never_panics_on_near_misses(text in message()) {
        if let Ok(msg) = ClientMessage::parse(&text) {
            // Whatever is accepted respects the limits.
            let value: Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(value["type"].as_str().unwrap(), msg.kind().label());
        }
    }

    #[test]
    fn the_ipc_decoder_never_panics(body in proptest::collection::vec(any::<u8>(), 0..300), declared in 0u32..400) {
        // Raw bytes, and the same bytes behind a plausible length prefix.
        let mut raw = BytesMut::from(&body[..]);
        while let Ok(Some(_)) = ipc::decode::<ToWorker>(&mut raw) {}
        let mut framed = BytesMut::new();
        framed.put_u32(declared);
        framed.put_slice(&body);
        let _ = ipc::decode::<FromWorker>(&mut framed);
    }

    #[test]
    fn ipc_frames_round_trip(seq in any::<u64>(), time in any::<i64>(), conn in any::<u64>(), text in ".{0,100}", room in ".{0,20}") {
        let frame = ToWorker::Event(Stamped {
            room: RoomId(room),
            seq,
            time_ms: time,
            event: RoomEvent::Message { conn: ConnId(conn), text: text.into() },
        });
        let mut buf = BytesMut::new();
        ipc::encode(&frame, &mut buf).unwrap();
        prop_assert_eq!(ipc::decode::<ToWorker>(&mut buf).unwrap(), Some(frame));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn the_token_check_never_panics(token in ".{0,300}", host in proptest::option::of("[a-z:0-9]{0,20}")) {
        let auth = Authenticator::new("property-test-secret", true);
        let _ = auth.verify(Some(&token), host.as_deref());
    }

    #[test]
    fn rooms_keep_their_invariants_and_replay_exactly(ops in proptest::collection::vec(op(), 1..80)) {
        let mut room = Room::new(RoomId("r".into()), SEED);
        let frames: Vec<Stamped> = ops.iter().enumerate().map(|(i, op)| stamped(i as u64 + 1, op)).collect();
        for frame in &frames {
            room.apply(frame);
            check_invariants(&room.snapshot_json());
        }
        // Replaying the same stamped frames gives the same room.
        let mut replay = Room::new(RoomId("r".into()), SEED);
        for frame in &frames {
            replay.apply(frame);
        }
        prop_assert_eq!(replay.snapshot_json(), room.snapshot_json());
        // And so does a checkpoint of it.
        let image = room.image();
        let rebuilt = Room::from_image(RoomId("r".into()), image);
        prop_assert_eq!(rebuilt.snapshot_json(), room.snapshot_json());
    }
}
