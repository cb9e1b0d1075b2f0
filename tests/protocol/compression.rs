//! permessage-deflate (RFC 7692; issue 24): negotiated with a client that
//! offers it, snapshots compressed once per room version and shared by every
//! such member, the same state once inflated as a client without it gets,
//! and compressed client messages inflated within the message limit.

use serde_json::{Value, json};

use crate::support::raw::{RawClient, RawFrame};
use crate::support::*;

/// What every browser offers.
const BROWSER_OFFER: &str = "permessage-deflate; client_max_window_bits";
/// What the server answers.
const ACCEPTED: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

fn rect(x: usize) -> String {
    json!({"type":"shape_create","shapeType":"rectangle","x":x,"y":200,"width":150,"height":100})
        .to_string()
}

fn cursor(x: f64) -> String {
    json!({"type":"cursor_move","x":x,"y":1}).to_string()
}

/// Reads text frames until one whose text satisfies `pred`; returns the
/// frames read, that one last.
async fn frames_until(client: &mut RawClient, pred: impl Fn(&Value) -> bool) -> Vec<RawFrame> {
    let mut frames = Vec::new();
    loop {
        let frame = client.next_text_frame().await;
        let done = pred(&serde_json::from_str(&frame.text()).expect("JSON"));
        frames.push(frame);
        if done {
            return frames;
        }
    }
}

fn has_cursor_at(x: f64) -> impl Fn(&Value) -> bool {
    move |snap: &Value| {
        let cursors = snap["cursors"].as_array();
        cursors.is_some_and(|c| c.iter().any(|c| c["x"] == x))
    }
}

#[tokio::test]
async fn a_client_offering_deflate_gets_compressed_snapshots_equal_to_the_plain_ones() {
    let server = Server::start(&[]);
    let mut zoe = server.raw_client("zoe", "r", Some(BROWSER_OFFER)).await;
    assert_eq!(zoe.extensions.as_deref(), Some(ACCEPTED));
    let mut pat = server.raw_client("pat", "r", None).await;
    assert_eq!(pat.extensions, None, "not offered, not answered");

    // Long pastes, one sent compressed, one not; then 200 shapes.
    let cjk = json!({"type":"shape_create","shapeType":"text","x":1,"y":1,"width":9,"height":9,
                     "text": "协作白板".repeat(1250)})
    .to_string();
    let emoji = json!({"type":"shape_create","shapeType":"text","x":2,"y":2,"width":9,"height":9,
                       "text": "🎨✏️🧑‍🤝‍🧑".repeat(600)})
    .to_string();
    pat.send_text(&cjk).await;
    zoe.send_compressed(&emoji).await;
    for x in 0..200 {
        zoe.send_compressed(&rect(x)).await;
    }
    pat.send_text(&cursor(4242.0)).await;

    // The final state: every shape and the cursor (the two clients' messages
    // may interleave in any order).
    let done = |s: &Value| shapes(s).len() == 202 && has_cursor_at(4242.0)(s);
    let zoe_frames = frames_until(&mut zoe, done).await;
    let pat_frames = frames_until(&mut pat, done).await;
    // The same final state, byte for byte once inflated.
    let zoe_last = zoe_frames.last().unwrap();
    let pat_last = pat_frames.last().unwrap();
    assert!(
        zoe_last.text() == pat_last.text(),
        "inflated {} bytes, plain {} bytes",
        zoe_last.text().len(),
        pat_last.text().len()
    );
    let snap: Value = serde_json::from_str(&pat_last.text()).unwrap();
    assert_eq!(shapes(&snap).len(), 202);
    // The two pastes, in whichever order the two connections' messages came.
    let texts: Vec<&str> = shapes(&snap)
        .iter()
        .filter_map(|s| s["text"].as_str())
        .collect();
    assert_eq!(texts.len(), 2);
    assert!(texts.contains(&"协作白板".repeat(1250).as_str()));
    assert!(texts.contains(&"🎨✏️🧑‍🤝‍🧑".repeat(600).as_str()));

    // Zoe's are compressed from 1 KiB on; Pat's frames are as before.
    for frame in &zoe_frames {
        let len = frame.text().len();
        assert_eq!(frame.compressed(), len >= 1024, "{len}-byte snapshot");
        assert_eq!(frame.first & 0x30, 0, "RSV2 and RSV3 are never set");
    }
    assert!(
        zoe_last.payload.len() * 4 < zoe_last.text().len(),
        "{} of {}",
        zoe_last.payload.len(),
        zoe_last.text().len()
    );
    for frame in &pat_frames {
        assert_eq!(frame.first, 0x81, "a final text frame, no reserved bit");
        assert_eq!(frame.payload, frame.text().as_bytes());
    }
    assert_eq!(
        metric(&server, "session_server_connections_compressed").await,
        1.0
    );
    assert_eq!(
        metric(&server, "session_server_messages_inflated_total").await,
        201.0
    );
}

#[tokio::test]
async fn a_v2_client_gets_its_snapshot_and_ops_compressed() {
    let server = Server::start(&[]);
    // A v2 member alone in its room takes ops compressed and its snapshots
    // plain: the room's versions are compressed only for v1 members.
    let mut solo = server
        .raw_client_with(
            "solo",
            "v2-only",
            &format!(
                "Sec-WebSocket-Extensions: {BROWSER_OFFER}\r\nSec-WebSocket-Protocol: whiteboard.v2\r\n"
            ),
        )
        .await;
    let first = solo.next_text_frame().await;
    assert!(first.text().starts_with(r#"{"type":"snapshot""#));
    for x in 0..5 {
        solo.send_text(&rect(x)).await;
    }
    solo.send_text(&cursor(3.0)).await;
    frames_until(&mut solo, |m| m.to_string().contains(r#""x":3"#)).await;
    assert_eq!(
        metric(&server, "session_server_snapshots_compressed_total").await,
        0.0
    );

    // A v1 member that negotiated it: the room's versions come compressed,
    // and a v2 member's snapshot is made of them.
    let mut ann = server.raw_client("ann", "v2", Some(BROWSER_OFFER)).await;
    for x in 0..50 {
        ann.send_text(&rect(x)).await;
    }
    ann.send_text(&cursor(7.0)).await;
    frames_until(&mut ann, has_cursor_at(7.0)).await;

    let offer = format!(
        "Sec-WebSocket-Extensions: {BROWSER_OFFER}\r\nSec-WebSocket-Protocol: whiteboard.v2\r\n"
    );
    let mut bea = server.raw_client_with("bea", "v2", &offer).await;
    assert_eq!(bea.extensions.as_deref(), Some(ACCEPTED));
    let first = bea.next_text_frame().await;
    assert!(first.compressed());
    let snapshot: Value = serde_json::from_str(&first.text()).unwrap();
    assert_eq!(snapshot["type"], "snapshot");
    assert_eq!(snapshot["seq"], 0);
    assert_eq!(shapes(&snapshot).len(), 50);
    // Ann's next shapes reach Bea as ops messages, compressed once they are
    // 256 bytes or more.
    for n in 1..=10 {
        let text = format!("{n:02}{}", "note ".repeat(60 + n));
        ann.send_text(&json!({"type":"shape_create","shapeType":"text","x":n,"y":0,"width":1,"height":1,"text":text}).to_string()).await;
        tokio::time::sleep(std::time::Duration::from_millis(40)).await;
    }
    let mut added = 0;
    let mut compressed_ops = 0;
    while added < 10 {
        let frame = bea.next_text_frame().await;
        let text = frame.text();
        let message: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(message["type"], "ops", "{text}");
        // Each holds a create of over 300 bytes.
        assert!(frame.compressed(), "{}-byte message", text.len());
        compressed_ops += 1;
        added += message["ops"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|op| op["op"] == "add")
            .count();
    }
    assert!(compressed_ops > 0);
}

#[tokio::test]
async fn a_compressed_message_past_the_limit_is_closed_1009_and_garbage_1007() {
    let server = Server::start(&[]);
    let mut bomb = server.raw_client("bomb", "z", Some(BROWSER_OFFER)).await;
    bomb.next_text_frame().await;
    // 4 MB of spaces in a text: a few KB compressed, 64 times the limit inflated.
    let text = json!({"type":"shape_create","shapeType":"text","x":1,"y":1,"width":1,"height":1,
                      "text": " ".repeat(4_000_000)})
    .to_string();
    bomb.send_compressed(&text).await;
    assert_eq!(bomb.close_code().await, Some(1009));

    let mut junk = server.raw_client("junk", "z", Some(BROWSER_OFFER)).await;
    junk.next_text_frame().await;
    junk.send_frame(0xc1, &[0xff; 64]).await;
    assert_eq!(junk.close_code().await, Some(1007));

    // Without the extension, RSV1 is a protocol error, as before.
    let mut plain = server.raw_client("plain", "z", None).await;
    plain.next_text_frame().await;
    plain
        .send_frame(0xc1, &crate::support::raw::deflate(rect(1).as_bytes()))
        .await;
    assert_eq!(plain.close_code().await, Some(1002));

    // The room is unharmed, and a compressed message at the limit is taken.
    let mut ok = server.raw_client("ok", "z", Some(BROWSER_OFFER)).await;
    let at_limit =
        json!({"type":"shape_create","shapeType":"text","x":1,"y":1,"width":1,"height":1,
                          "text": "a".repeat(65_536 - 200)})
        .to_string();
    ok.send_compressed(&at_limit).await;
    let frames = frames_until(&mut ok, |s| shapes(s).len() == 1).await;
    assert!(frames.last().unwrap().compressed());
    assert_eq!(
        metric(
            &server,
            "session_server_connections_rejected_total{reason=\"message_too_big\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn a_hundred_members_share_one_compressed_payload_per_version() {
    let server = Server::start(&[]);
    let mut members = Vec::new();
    for i in 0..100 {
        members.push(
            server
                .raw_client(&format!("m{i:03}"), "big", Some(BROWSER_OFFER))
                .await,
        );
    }
    for x in 0..200 {
        members[0].send_text(&rect(x)).await;
    }
    members[0].send_text(&cursor(-1.0)).await;
    for member in &mut members {
        frames_until(member, |s| {
            s["connectedUsers"].as_array().unwrap().len() == 100 && has_cursor_at(-1.0)(s)
        })
        .await;
    }
    let before = metrics(&server).await;
    const VERSIONS: usize = 5;
    for v in 1..=VERSIONS {
        members[1].send_text(&cursor(v as f64)).await;
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    }
    for member in &mut members {
        let frames = frames_until(member, has_cursor_at(VERSIONS as f64)).await;
        assert_eq!(frames.len(), VERSIONS, "every version, none skipped");
        assert!(frames.iter().all(RawFrame::compressed));
    }
    let after = metrics(&server).await;
    let delta = |name: &str| after[name] - before.get(name).copied().unwrap_or(0.0);
    assert_eq!(
        delta("session_server_snapshots_compressed_total"),
        VERSIONS as f64,
        "one compression per version"
    );
    assert_eq!(
        delta("session_server_messages_compressed_total"),
        (100 * VERSIONS) as f64
    );
}

#[tokio::test]
async fn with_compression_off_nothing_is_negotiated() {
    let server = Server::start(&["--compression", "off"]);
    let mut zoe = server.raw_client("zoe", "r", Some(BROWSER_OFFER)).await;
    assert_eq!(zoe.extensions, None);
    for x in 0..20 {
        zoe.send_text(&rect(x)).await;
    }
    let frames = frames_until(&mut zoe, |s| shapes(s).len() == 20).await;
    assert!(frames.iter().all(|f| f.first == 0x81));
}
