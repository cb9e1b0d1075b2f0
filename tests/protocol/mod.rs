//! The client protocol (PROTOCOL.md §1–4), one test per rule, with the real
//! binary (a supervisor and its worker processes) and real WebSocket clients;
//! the WebSocket framing the protocol rides on (pings, closes, fragments, big
//! frames); connection liveness in `liveness`, protocol v2 in `v2`,
//! permessage-deflate in `compression`.

mod compression;
mod liveness;
mod v2;

use std::time::Duration;

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::support::*;

fn rect(x: f64) -> Value {
    json!({"type":"shape_create","shapeType":"rectangle","x":x,"y":200,"width":150,"height":100})
}

// ---- §1 Connection ----------------------------------------------------------

#[tokio::test]
async fn valid_token_joins_and_receives_the_exact_first_snapshot() {
    let server = Server::start(&[]);
    let mut alice = server
        .connect(&server.url(&server.token("alice", "r1")))
        .await;
    assert_eq!(
        alice.next_text().await,
        r#"{"connectedUsers":["alice"],"cursors":[],"shapes":[]}"#
    );
}

#[tokio::test]
async fn plain_http_gets_clear_statuses() {
    let server = Server::start(&[]);
    let (code, body) = server
        .get(&format!("/?token={}", server.token("a", "r")))
        .await;
    assert_eq!(code, 426);
    assert!(body.contains("WebSocket"));
    assert_eq!(server.get("/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(server.get("/nope").await.0, 404);
}

// ---- §2 Rooms and membership ------------------------------------------------

#[tokio::test]
async fn the_101st_member_is_closed_with_room_is_full() {
    let server = Server::start(&[]);
    let mut members = Vec::new();
    for i in 0..100 {
        members.push(server.join(&format!("u{i}"), "big").await);
    }
    let mut extra = server
        .connect(&server.url(&server.token("u100", "big")))
        .await;
    assert_eq!(
        extra.closed().await,
        Closed::Frame(1008, "Room is full".into())
    );
    // The room is intact: the first member still sees all 100 and can act.
    let snap = members[0].sync("u0", 7.0).await;
    assert_eq!(users(&snap).len(), 100);
    assert!(!users(&snap).contains(&"u100".to_owned()));
}

#[tokio::test]
async fn the_same_user_may_be_in_two_rooms() {
    let server = Server::start(&[]);
    let mut in_one = server.join("alice", "r1").await;
    let mut in_two = server.join("alice", "r2").await;
    assert_eq!(users(&in_one.sync("alice", 1.0).await), ["alice"]);
    assert_eq!(users(&in_two.sync("alice", 2.0).await), ["alice"]);
}

#[tokio::test]
async fn join_and_leave_broadcast_and_leaving_removes_the_cursor() {
    let server = Server::start(&[]);
    let mut alice = server.join("alice", "r1").await;
    let mut bob = server.join("bob", "r1").await;
    assert_eq!(
        users(&alice.until(|s| users(s).len() == 2).await),
        ["alice", "bob"]
    );
    bob.sync("bob", 5.0).await;
    let snap = alice
        .until(|s| s["cursors"].as_array().unwrap().len() == 1)
        .await;
    assert_eq!(snap["cursors"][0]["userId"], "bob");
    bob.close().await;
    let snap = alice.until(|s| users(s) == ["alice"]).await;
    assert_eq!(snap["cursors"], json!([]));
}

#[tokio::test]
async fn rooms_are_isolated() {
    let server = Server::start(&[]);
    let mut a = server.join("alice", "room-a").await;
    let mut b = server.join("bob", "room-b").await;
    a.send(rect(1.0)).await;
    let snap_a = a.sync("alice", 1.0).await;
    assert_eq!(shapes(&snap_a).len(), 1);
    let snap_b = b.sync("bob", 2.0).await;
    assert_eq!(users(&snap_b), ["bob"]);
    assert_eq!(shapes(&snap_b).len(), 0);
    assert_eq!(snap_b["cursors"].as_array().unwrap().len(), 1);
}

// ---- §3 Client -> server messages -------------------------------------------

#[tokio::test]
async fn shape_create_assigns_id_user_timestamp_and_defaults() {
    let server = Server::start(&[]);
    let mut alice = server.join("alice", "r1").await;
    alice
        .send(
            json!({"type":"shape_create","shapeType":"rectangle","x":100,"y":200,
            "width":150,"height":100,"text":"Hello World",
            "id":"chosen","userId":"mallory","timestamp":"1999-01-01T00:00:00.000Z"}),
        )
        .await;
    alice
        .send(
            json!({"type":"shape_create","shapeType":"oval","x":1.5,"y":-2,"width":3,"height":4,
            "fill":"#ef4444","stroke":"#dc2626"}),
        )
        .await;
    let snap = alice.until(|s| shapes(s).len() == 2).await;
    let first = &shapes(&snap)[0];
    let id = first["id"].as_str().unwrap();
    let ts = first["timestamp"].as_str().unwrap();
    assert_ne!(id, "chosen");
    assert_ne!(ts, "1999-01-01T00:00:00.000Z");
    assert_eq!(
        first,
        &json!({"id":id,"type":"rectangle","x":100,"y":200,"width":150,"height":100,
            "userId":"alice","timestamp":ts,"text":"Hello World",
            "fill":"#3b82f6","stroke":"#1d4ed8","rotation":0})
    );
    let second = &shapes(&snap)[1];
    assert_ne!(second["id"], first["id"]);
    assert_eq!(second["fill"], "#ef4444");
    assert_eq!(second["stroke"], "#dc2626");
    assert_eq!(second["type"], "oval");
    assert!(second.get("text").is_none());
}

#[tokio::test]
async fn shape_update_changes_only_present_fields_and_refreshes_timestamp() {
    let server = Server::start(&[]);
    let mut alice = server.join("alice", "r1").await;
    alice
        .send(
            json!({"type":"shape_create","shapeType":"text","x":10,"y":20,"width":30,"height":40,
            "text":"hi","fill":"#111111","stroke":"#222222"}),
        )
        .await;
    let created = alice.until(|s| shapes(s).len() == 1).await;
    let shape = shapes(&created)[0].clone();
    tokio::time::sleep(Duration::from_millis(5)).await;
    alice
        .send(json!({"type":"shape_update","shapeId":shape["id"],"x":15,"rotation":45,"userId":"mallory"}))
        .await;
    let updated = alice.until(|s| shapes(s)[0]["x"] == 15).await;
    let mut expected = shape.clone();
    expected["x"] = json!(15);
    expected["rotation"] = json!(45);
    let new_ts = shapes(&updated)[0]["timestamp"].clone();
    assert!(new_ts.as_str().unwrap() > shape["timestamp"].as_str().unwrap());
    expected["timestamp"] = new_ts;
    assert_eq!(shapes(&updated)[0], expected);
}

#[tokio::test]
async fn any_member_may_update_and_delete_any_shape() {
    let server = Server::start(&[]);
    let mut alice = server.join("alice", "r1").await;
    let mut bob = server.join("bob", "r1").await;
    alice.send(rect(1.0)).await;
    alice.send(rect(2.0)).await;
    let snap = bob.until(|s| shapes(s).len() == 2).await;
    let (first, second) = (
        shapes(&snap)[0]["id"].clone(),
        shapes(&snap)[1]["id"].clone(),
    );
    bob.send(json!({"type":"shape_update","shapeId":second,"fill":"#000000"}))
        .await;
    bob.send(json!({"type":"shape_delete","shapeId":first}))
        .await;
    let snap = alice
        .until(|s| shapes(s).len() == 1 && shapes(s)[0]["fill"] == "#000000")
        .await;
    assert_eq!(shapes(&snap)[0]["id"], second);
    assert_eq!(shapes(&snap)[0]["userId"], "alice");
}

#[tokio::test]
async fn invalid_frames_are_ignored_and_the_connection_stays_usable() {
    let server = Server::start(&[]);
    let mut alice = server.join("alice", "r1").await;
    alice.send(rect(1.0)).await;
    let before = alice.sync("alice", 1.0).await;
    let id = shapes(&before)[0]["id"].clone();
    for bad in [
        "not json".to_owned(),
        "[1,2]".into(),
        r#"{"type":"teleport","x":1,"y":1}"#.into(),
        r#"{"type":"cursor_move","x":1}"#.into(),
        r#"{"type":"cursor_move","x":"5","y":5}"#.into(),
        r#"{"type":"cursor_move","x":1e309,"y":5}"#.into(),
        r#"{"type":"shape_create","shapeType":"star","x":1,"y":2,"width":3,"height":4}"#.into(),
        r#"{"type":"shape_create","shapeType":"oval","x":1,"y":2,"width":3}"#.into(),
        r#"{"type":"shape_create","shapeType":"oval","x":1,"y":2,"width":3,"height":4,"fill":7}"#
            .into(),
        r#"{"type":"shape_update","shapeId":"no-such-shape","x":9}"#.into(),
        format!(r#"{{"type":"shape_update","shapeId":{id},"x":"9"}}"#),
        r#"{"type":"shape_delete","shapeId":"no-such-shape"}"#.into(),
        r#"{"type":"shape_delete"}"#.into(),
    ] {
        alice.send_text(&bad).await;
    }
    alice.send_raw(Message::binary(vec![1u8, 2, 3])).await;
    let after = alice.sync("alice", 1.0).await;
    assert_eq!(after["shapes"], before["shapes"]);
    assert_eq!(users(&after), ["alice"]);
}

#[tokio::test]
async fn a_room_holds_at_most_1000_shapes() {
    // This test sends faster than the default rate limit allows.
    let server = Server::start(&[
        "--rate-limit-per-sec",
        "100000",
        "--rate-limit-burst",
        "100000",
    ]);
    let mut alice = server.join("alice", "r1").await;
    for i in 0..1005 {
        alice.send(rect(i as f64)).await;
    }
    let snap = alice.sync("alice", -1.0).await;
    assert_eq!(shapes(&snap).len(), 1000);
    assert_eq!(shapes(&snap)[999]["x"], 999);
}

// ---- §4 Server -> client messages -------------------------------------------

#[tokio::test]
async fn snapshot_order_is_join_first_move_and_creation_order() {
    let server = Server::start(&[]);
    let mut carol = server.join("carol", "r1").await;
    let mut alice = server.join("alice", "r1").await;
    let mut bob = server.join("bob", "r1").await;
    bob.sync("bob", 1.0).await;
    carol.sync("carol", 2.0).await;
    alice.sync("alice", 3.0).await;
    bob.send(rect(10.0)).await;
    bob.sync("bob", 4.0).await; // moves again: bob's cursor keeps its place
    alice.send(rect(20.0)).await;
    alice.sync("alice", 5.0).await;
    carol.send(rect(30.0)).await;
    let snap = carol.sync("carol", 6.0).await;
    assert_eq!(users(&snap), ["carol", "alice", "bob"]);
    let cursor_users: Vec<&str> = snap["cursors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["userId"].as_str().unwrap())
        .collect();
    assert_eq!(cursor_users, ["bob", "carol", "alice"]);
    let xs: Vec<i64> = shapes(&snap)
        .iter()
        .map(|s| s["x"].as_i64().unwrap())
        .collect();
    assert_eq!(xs, [10, 20, 30]);
}

#[tokio::test]
async fn timestamps_are_iso_milliseconds_and_numbers_read_as_javascript() {
    let server = Server::start(&[]);
    let mut alice = server.join("alice", "r1").await;
    alice
        .send(json!({"type":"shape_create","shapeType":"line","x":100,"y":0.5,"width":0.000001,"height":-0.0000001}))
        .await;
    alice
        .send(json!({"type":"cursor_move","x":100.0,"y":2.25}))
        .await;
    let text = loop {
        let text = alice.next_text().await;
        if text.contains("\"cursors\":[{") {
            break text;
        }
    };
    assert!(
        text.contains(r#""x":100,"y":0.5,"width":0.000001,"height":-1e-7,"#),
        "{text}"
    );
    assert!(text.contains(r#""x":100,"y":2.25,"#), "{text}");
    let snap: Value = serde_json::from_str(&text).unwrap();
    for ts in [
        &snap["cursors"][0]["timestamp"],
        &snap["shapes"][0]["timestamp"],
    ] {
        let ts = ts.as_str().unwrap();
        // 2026-11-25T20:00:00.123Z
        assert_eq!(ts.len(), 24, "{ts}");
        assert_eq!(&ts[10..11], "T");
        assert_eq!(&ts[19..20], ".");
        assert!(ts.ends_with('Z'));
        assert!(ts[20..23].chars().all(|c| c.is_ascii_digit()));
    }
}

// ---- WebSocket framing (RFC 6455) ------------------------------------------

/// The server answers a client's ping with the same payload, and a client's close
/// with a close frame echoing its code (RFC 6455 §5.5.1–5.5.3).
#[tokio::test]
async fn pings_are_answered_and_closes_echoed() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    let server = Server::start(&[]);
    let mut alice = server.join("alice", "room-control").await;
    alice
        .send_raw(Message::Ping(b"are you there".to_vec().into()))
        .await;
    assert_eq!(alice.next_pong().await, b"are you there");
    alice
        .send_raw(Message::Close(Some(CloseFrame {
            code: 4000.into(),
            reason: "bye".into(),
        })))
        .await;
    assert_eq!(alice.closed().await, Closed::Frame(4000, String::new()));
}

/// A snapshot over 64 KiB (the 8-byte length form of a frame header) arrives
/// whole and parses.
#[tokio::test]
async fn snapshots_over_64_kib_arrive_whole() {
    let server = Server::start(&[]);
    let mut alice = server.join("alice", "room-big").await;
    let text = "x".repeat(9_000);
    for i in 0..8 {
        alice
            .send(json!({"type":"shape_create","shapeType":"text","x":i,"y":0,"width":10,"height":10,"text":text}))
            .await;
    }
    let snap = alice.until(|s| shapes(s).len() == 8).await;
    assert!(alice.last.as_ref().unwrap().len() > 65_536);
    assert!(shapes(&snap).iter().all(|s| s["text"] == text.as_str()));
}

#[tokio::test]
async fn fragmented_messages_are_reassembled() {
    let server = Server::start(&[]);
    let mut alice = server.join("alice", "r").await;
    let text = json!({"type":"cursor_move","x":77,"y":88}).to_string();
    let (first, second) = text.split_at(10);
    alice
        .send_raw(Message::Frame(Frame::message(
            first.as_bytes().to_vec(),
            OpCode::Data(Data::Text),
            false,
        )))
        .await;
    alice
        .send_raw(Message::Frame(Frame::message(
            second.as_bytes().to_vec(),
            OpCode::Data(Data::Continue),
            true,
        )))
        .await;
    let snap = alice
        .until(|s| s["cursors"].as_array().unwrap().len() == 1)
        .await;
    assert_eq!(snap["cursors"][0]["x"], 77);
}
