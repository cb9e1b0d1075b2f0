//! Property tests (the stable-Rust stand-in for fuzzing: `cargo fuzz` needs a
//! nightly toolchain, which this project's machines do not have): the client
//! message parser, the IPC decoder and the token check never panic on arbitrary
//! input, and the room state machine keeps its invariants and stays deterministic
//! under arbitrary sequences of valid and invalid messages from several members.

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use serde_json::{Value, json};
use session_server::ipc::{self, ConnId, FromWorker, RoomEvent, RoomId, Stamped, ToWorker};
use session_server::protocol::{ClientMessage, MAX_MEMBERS_PER_ROOM, MAX_SHAPES_PER_ROOM};
use session_server::supervisor::auth::Authenticator;
use session_server::worker::room::Room;

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
        Op::Join(c, u) => RoomEvent::Join {
            conn: ConnId(*c),
            user_id: format!("user{u}"),
        },
        Op::Leave(c) => RoomEvent::Leave { conn: ConnId(*c) },
        Op::Send(c, text) => RoomEvent::Message {
            conn: ConnId(*c),
            text: text.clone(),
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
            assert!(text.as_str().unwrap().len() <= 10_000);
        }
        assert!(shape["fill"].as_str().unwrap().len() <= 64);
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_parser_never_panics(text in ".{0,200}") {
        let _ = ClientMessage::parse(&text);
    }

    #[test]
    fn the_parser_never_panics_on_near_misses(text in message()) {
        if let Ok(msg) = ClientMessage::parse(&text) {
            // Whatever is accepted respects the limits.
            let value: Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(value["type"].as_str().unwrap(), msg.kind());
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
            event: RoomEvent::Message { conn: ConnId(conn), text },
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
