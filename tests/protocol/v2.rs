//! Protocol v2 (PROTOCOL-v2.md) and the per-member snapshot rate
//! (`--max-snapshot-hz`), against the real server binary: v1 stays the default
//! and byte-for-byte what it was; a v2 client that applies the ops it gets keeps
//! the room a v1 client sees; a fast room sends each v1 member at most 60
//! snapshots a second and never loses the last one, a calm one every change
//! at once (`--member-bytes-per-sec`).

use std::time::{Duration, Instant};

use contract::protocol::v2::{Applied, Replica};
use serde_json::{Value, json};

use crate::support::*;

const V2: &str = "whiteboard.v2";

/// A v2 client: its connection, its copy of the room and what it received.
struct V2Client {
    client: Client,
    replica: Replica,
    snapshots: usize,
    ops: usize,
    /// Gaps the client saw (each answered by a resync request).
    resyncs: usize,
}

impl V2Client {
    /// Connects offering v2 and reads the first message, which must be a
    /// snapshot.
    async fn join(server: &Server, user: &str, room: &str) -> V2Client {
        let (client, chosen) = server
            .connect_offering(user, room, &format!("chat, {V2}"))
            .await;
        assert_eq!(chosen.as_deref(), Some(V2), "v2 not negotiated");
        let mut c = V2Client {
            client,
            replica: Replica::default(),
            snapshots: 0,
            ops: 0,
            resyncs: 0,
        };
        let first = c.client.next_text().await;
        let parsed: Value = serde_json::from_str(&first).unwrap();
        assert_eq!(parsed["type"], "snapshot", "first message: {first}");
        c.apply(&first).await;
        c
    }

    /// Applies one message as a client does: on a gap, asks for a resync.
    async fn apply(&mut self, text: &str) {
        let kind = serde_json::from_str::<Value>(text).unwrap()["type"].clone();
        if kind == "snapshot" {
            self.snapshots += 1;
        } else {
            self.ops += 1;
        }
        match self.replica.receive(text).unwrap() {
            Applied::Ok | Applied::Ignored => {}
            Applied::NeedResync => {
                self.resyncs += 1;
                self.client.send(json!({"type":"resync"})).await
            }
        }
    }

    /// Reads and applies what arrives for `wait`.
    async fn pump_for(&mut self, wait: Duration) {
        let until = Instant::now() + wait;
        while let Some(text) = self
            .client
            .next_text_within(until.saturating_duration_since(Instant::now()))
            .await
        {
            self.apply(&text).await;
        }
    }

    /// Reads and applies messages until the copy satisfies `pred`.
    async fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        while !self.replica.state.as_ref().is_some_and(&pred) {
            assert!(
                Instant::now() < deadline,
                "state never matched: {:?}",
                self.replica.state
            );
            let text = self.client.next_text().await;
            self.apply(&text).await;
        }
        self.replica.state.clone().unwrap()
    }
}

fn cursor_x(snap: &Value, user: &str) -> Option<f64> {
    snap["cursors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["userId"] == user)
        .and_then(|c| c["x"].as_f64())
}

#[tokio::test]
async fn v2_is_chosen_only_when_offered_and_starts_with_a_snapshot() {
    let server = Server::start(&[]);
    // Not offered: the upgrade is answered as before, without the header.
    let (code, head) = server.raw_upgrade(&server.token("zed", "elsewhere")).await;
    assert_eq!(code, 101);
    assert!(
        !head.to_ascii_lowercase().contains("sec-websocket-protocol"),
        "{head}"
    );
    let mut v1 = server
        .connect(&server.url(&server.token("alice", "neg")))
        .await;
    assert_eq!(
        v1.next_text().await,
        r#"{"connectedUsers":["alice"],"cursors":[],"shapes":[]}"#
    );
    let bob = V2Client::join(&server, "bob", "neg").await;
    let state = bob.replica.state.as_ref().unwrap();
    assert_eq!(state["connectedUsers"], json!(["alice", "bob"]));
    // The v1 member's next snapshot is still a bare v1 snapshot.
    let snap = v1.next_snapshot().await;
    assert_eq!(snap, *state);
    assert_eq!(metric(&server, "session_server_connections_v2").await, 1.0);
}

#[tokio::test]
async fn ops_keep_a_v2_client_equal_to_a_v1_client_through_a_mixed_session() {
    let server = Server::start(&[]);
    let room = "mixed";
    let mut alice = server.join("alice", room).await;
    let mut bob = V2Client::join(&server, "bob", room).await;
    let pump = Duration::from_millis(3);

    // Shapes from both, as a v1 and a v2 client send them (the same messages).
    for i in 0..5 {
        alice
            .send(json!({"type":"shape_create","shapeType":"rectangle","x":i*10,"y":0,"width":50,"height":40}))
            .await;
        bob.pump_for(pump).await;
    }
    bob.client
        .send(json!({"type":"shape_create","shapeType":"text","x":1.5,"y":2,"width":3,"height":4,"text":"héllo \"q\"\n"}))
        .await;
    let snap = alice.until(|s| shapes(s).len() == 6).await;
    let ids: Vec<String> = shapes(&snap)
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();

    // A drag: the whole shape every few ms with cursor moves, while bob moves.
    for step in 0..40 {
        let x = 100.0 + f64::from(step) * 0.5;
        alice.send(json!({"type":"cursor_move","x":x,"y":7})).await;
        if step % 4 == 0 {
            alice
                .send(json!({"type":"shape_update","shapeId":ids[0],"x":x,"y":3,"width":50,"height":40,"rotation":0.25}))
                .await;
        }
        bob.client
            .send(json!({"type":"cursor_move","x":-x,"y":1e-7}))
            .await;
        bob.pump_for(pump).await;
    }

    // Someone joins, draws, and leaves; edits and deletes.
    let mut carol = server.join("carol", room).await;
    carol.send(json!({"type":"cursor_move","x":5,"y":5})).await;
    carol
        .send(json!({"type":"shape_create","shapeType":"oval","x":9,"y":9,"width":1,"height":1,"fill":""}))
        .await;
    bob.pump_for(Duration::from_millis(50)).await;
    carol.close().await;
    alice
        .send(json!({"type":"shape_delete","shapeId":ids[1]}))
        .await;
    bob.client
        .send(
            json!({"type":"shape_update","shapeId":ids[5],"text":"bye","fill":"#000","stroke":""}),
        )
        .await;
    bob.client
        .send(json!({"type":"shape_update","shapeId":"unknown","x":1}))
        .await;
    bob.pump_for(Duration::from_millis(50)).await;

    // Once alice's last move is in, both see the same room.
    let marker = 12_345.0;
    let v1 = alice.sync("alice", marker).await;
    let v2 = bob.until(|s| cursor_x(s, "alice") == Some(marker)).await;
    assert_eq!(v2, v1);
    assert_eq!(shapes(&v1).len(), 6, "5 + 1 + carol's - the deleted one");
    assert!(!users(&v1).contains(&"carol".to_owned()));
    // Never a gap; snapshots only first and where one is smaller than the
    // ops it replaces (several shapes added to a nearly empty room).
    assert_eq!(bob.resyncs, 0);
    assert!(bob.snapshots < bob.ops, "{} snapshots", bob.snapshots);
    assert!(bob.ops >= 10, "ops messages: {}", bob.ops);
    assert!(metric(&server, "session_server_ops_bytes_total").await > 0.0);
}

#[tokio::test]
async fn a_resync_is_answered_with_a_snapshot_and_never_reaches_the_room() {
    let server = Server::start(&[]);
    let mut alice = server.join("alice", "re").await;
    let mut bob = V2Client::join(&server, "bob", "re").await;
    alice
        .send(json!({"type":"shape_create","shapeType":"oval","x":1,"y":2,"width":3,"height":4}))
        .await;
    let v1 = alice.until(|s| shapes(s).len() == 1).await;
    let v1_text = alice.last.clone().unwrap();
    bob.until(|s| shapes(s).len() == 1).await;
    let last_seq = bob.replica.last_seq;

    bob.client.send(json!({"type":"resync"})).await;
    let text = bob.client.next_text().await;
    let msg: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(msg["type"], "snapshot");
    assert_eq!(
        msg["seq"],
        last_seq + 1,
        "seq stays consecutive per connection"
    );
    // The v1 snapshot's bytes, after the v2 header.
    let header = format!(r#"{{"type":"snapshot","seq":{},"#, last_seq + 1);
    assert_eq!(text, format!("{header}{}", &v1_text[1..]));
    bob.apply(&text).await;
    assert_eq!(bob.replica.state.as_ref(), Some(&v1));

    // The room did not change: alice gets nothing.
    assert_eq!(
        alice.next_text_within(Duration::from_millis(300)).await,
        None
    );
    assert_eq!(metric(&server, "session_server_resyncs_total").await, 1.0);

    // A flood of resyncs while the room stays as it was costs nothing more:
    // one answer per room version.
    for _ in 0..50 {
        bob.client.send(json!({"type":"resync"})).await;
    }
    assert_eq!(
        bob.client
            .next_text_within(Duration::from_millis(500))
            .await,
        None
    );
    assert_eq!(metric(&server, "session_server_resyncs_total").await, 51.0);
    // Once the room moves on, a resync is answered again.
    alice.send(json!({"type":"cursor_move","x":5,"y":6})).await;
    let moved = alice.until(|s| s["cursors"][0]["x"] == 5).await;
    bob.until(|s| s["cursors"][0]["x"] == 5).await;
    bob.client.send(json!({"type":"resync"})).await;
    let text = bob.client.next_text().await;
    assert!(text.starts_with(r#"{"type":"snapshot","#), "{text}");
    bob.apply(&text).await;
    assert_eq!(bob.replica.state.as_ref(), Some(&moved));
}

/// A connection gets at most one snapshot a second for its `resync`s: one
/// sent within the second after an answer is answered when that second is
/// over (not dropped), and a flood of 500 a second in a changing room gets
/// one snapshot a second.
#[tokio::test]
async fn resyncs_are_answered_at_most_once_a_second_and_never_dropped() {
    let server = Server::start(&[]);
    let mut alice = server.join("alice", "re1").await;
    let mut bob = V2Client::join(&server, "bob", "re1").await;
    let is_snapshot = |text: &str| text.starts_with(r#"{"type":"snapshot","#);
    bob.client.send(json!({"type":"resync"})).await;
    let first = bob.client.next_text().await;
    assert!(is_snapshot(&first), "{first}");
    let answered = Instant::now();
    bob.apply(&first).await;
    // The room moves on; a resync at once waits for the second to end.
    alice.send(json!({"type":"cursor_move","x":1,"y":1})).await;
    alice.until(|s| s["cursors"][0]["x"] == 1).await;
    bob.until(|s| s["cursors"][0]["x"] == 1).await;
    bob.client.send(json!({"type":"resync"})).await;
    let second = loop {
        let text = bob.client.next_text().await;
        if is_snapshot(&text) {
            break text;
        }
    };
    let waited = answered.elapsed();
    assert!(
        waited >= Duration::from_millis(950) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    bob.apply(&second).await;
    // A flood: 500 resyncs a second for 2 s while the room changes.
    let started = Instant::now();
    let mut snapshots = 0;
    let mut x = 1;
    while started.elapsed() < Duration::from_secs(2) {
        bob.client.send(json!({"type":"resync"})).await;
        if x % 10 == 0 {
            alice.send(json!({"type":"cursor_move","x":x,"y":1})).await;
        }
        x += 1;
        while let Some(text) = bob.client.next_text_within(Duration::from_millis(2)).await {
            snapshots += usize::from(is_snapshot(&text));
        }
    }
    assert!((1..=3).contains(&snapshots), "{snapshots} snapshots in 2 s");
    assert!(metric(&server, "session_server_resyncs_total").await >= 500.0);
}

/// A quiet room (changes slower than the member's rate) sends each v1 member
/// every change at once, as exactly the bytes v1 always sent.
#[tokio::test]
async fn a_quiet_room_sends_v1_members_every_change_byte_for_byte() {
    let server = Server::start(&[]);
    let mut alice = server.join("alice", "quiet").await;
    assert_eq!(
        alice.last.as_deref(),
        Some(r#"{"connectedUsers":["alice"],"cursors":[],"shapes":[]}"#)
    );
    for i in 1..=5 {
        alice
            .send(json!({"type":"cursor_move","x":i,"y":2.5}))
            .await;
        let text = alice.next_text().await;
        let snap: Value = serde_json::from_str(&text).unwrap();
        let timestamp = snap["cursors"][0]["timestamp"].as_str().unwrap();
        assert_eq!(
            text,
            format!(
                r#"{{"connectedUsers":["alice"],"cursors":[{{"userId":"alice","x":{i},"y":2.5,"timestamp":"{timestamp}"}}],"shapes":[]}}"#
            )
        );
        // Quiet: nothing else comes (a skipped change would show here as a
        // missing x, a duplicate as an extra snapshot).
        assert_eq!(
            alice.next_text_within(Duration::from_millis(100)).await,
            None
        );
    }
}

/// Bursts of three changes 2 ms apart, 50 ms between bursts: what a v1
/// member skipped of them (`snapshots_skipped_total`).
async fn skipped_in_bursts(server: &Server, room: &str) -> f64 {
    let mut watcher = server.join("watcher", room).await;
    let mut movers = Vec::new();
    for m in 0..3 {
        movers.push(server.join(&format!("mover{m}"), room).await);
    }
    watcher
        .until(|s| s["connectedUsers"].as_array().unwrap().len() == 4)
        .await;
    let before = metric(server, "session_server_snapshots_skipped_total").await;
    for burst in 0..40 {
        for mover in &mut movers {
            mover
                .send(json!({"type":"cursor_move","x":burst,"y":1}))
                .await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        while watcher
            .next_text_within(Duration::from_millis(50))
            .await
            .is_some()
        {}
    }
    metric(server, "session_server_snapshots_skipped_total").await - before
}

/// A room that sends its members less than their byte budget
/// (`--member-bytes-per-sec`) is not capped: three changes within 5 ms reach
/// a member as three snapshots, none folded. With the budget at 0 the 60 Hz
/// cap applies to every room, and folds them.
#[tokio::test]
async fn a_room_within_the_byte_budget_sends_every_change_at_once() {
    let server = Server::start(&[]);
    let skipped = skipped_in_bursts(&server, "calm").await;
    assert!(skipped <= 4.0, "{skipped} of 120 changes skipped");
    let capped = Server::start(&["--member-bytes-per-sec", "0"]);
    let skipped = skipped_in_bursts(&capped, "calm").await;
    assert!(
        skipped >= 20.0,
        "{skipped} of 120 changes skipped under the cap"
    );
}

/// Cursors moving at 144 Hz: what a v1 member gets in `window`, and its last
/// snapshot once the movers stop. Returns (snapshots, seconds, last snapshot,
/// final x of every mover).
async fn watch_movers_at_144_hz(server: &Server, room: &str) -> (usize, f64, Value, f64) {
    const MOVERS: usize = 3;
    const TICKS: u32 = 288; // 2 s at 144 Hz
    let mut watcher = server.join("watcher", room).await;
    let mut movers = Vec::new();
    for m in 0..MOVERS {
        movers.push(server.join(&format!("mover{m}"), room).await);
    }
    let moving = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / 144.0));
        for t in 0..TICKS {
            tick.tick().await;
            for mover in &mut movers {
                mover.send(json!({"type":"cursor_move","x":t,"y":1})).await;
            }
        }
        movers
    });
    // Past the joins' snapshots: count from the first move on.
    watcher
        .until(|s| s["cursors"].as_array().unwrap().len() == MOVERS)
        .await;
    let started = Instant::now();
    let mut count = 1;
    let mut last_at = started;
    while let Some(text) = watcher.next_text_within(Duration::from_millis(500)).await {
        count += 1;
        last_at = Instant::now();
        assert!(count < 10_000, "{text}");
    }
    let _movers = moving.await.unwrap();
    let last: Value = serde_json::from_str(watcher.last.as_deref().unwrap()).unwrap();
    let seconds = (last_at - started).as_secs_f64();
    (count, seconds, last, f64::from(TICKS - 1))
}

/// Over its byte budget (here 0: always over), a member gets the newest
/// state at the capped rate.
#[tokio::test]
async fn over_its_byte_budget_a_v1_member_gets_at_most_60_snapshots_a_second_and_the_last_state() {
    let server = Server::start(&["--member-bytes-per-sec", "0"]);
    let (count, seconds, last, final_x) = watch_movers_at_144_hz(&server, "fast").await;
    let rate = count as f64 / seconds;
    // At most one per 1/60 s (the timer never fires early), plus the first.
    assert!(
        count as f64 <= seconds * 60.0 + 2.0,
        "{count} snapshots in {seconds:.2} s"
    );
    // And the cap does not starve it: well above half the rate.
    assert!(rate > 30.0, "{count} snapshots in {seconds:.2} s");
    for m in 0..3 {
        assert_eq!(
            cursor_x(&last, &format!("mover{m}")),
            Some(final_x),
            "{last}"
        );
    }
}

/// Without the cap, or with the defaults (three cursors at 144 Hz send a
/// member about 100 KB/s of snapshots, within its 256 KiB/s budget), the
/// same room sends far more: every change the worker publishes.
#[tokio::test]
async fn without_the_cap_or_within_the_budget_the_same_room_sends_far_more() {
    for args in [&["--max-snapshot-hz", "0"][..], &[]] {
        let server = Server::start(args);
        let (count, seconds, last, final_x) = watch_movers_at_144_hz(&server, "fast").await;
        assert!(
            count as f64 > seconds * 100.0,
            "{args:?}: {count} snapshots in {seconds:.2} s"
        );
        for m in 0..3 {
            assert_eq!(
                cursor_x(&last, &format!("mover{m}")),
                Some(final_x),
                "{last}"
            );
        }
    }
}

/// A worker crash rebuilds the room on a replacement: its versions start a new
/// chain, so a v2 member gets a snapshot (not ops that would not apply) and goes
/// on equal to a v1 member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_worker_crash_a_v2_member_gets_a_snapshot_and_stays_equal() {
    let server = Server::start(&[]);
    let room = "crash";
    let mut alice = server.join("alice", room).await;
    let mut bob = V2Client::join(&server, "bob", room).await;
    for x in 0..3 {
        alice
            .send(json!({"type":"shape_create","shapeType":"rectangle","x":x,"y":0,"width":5,"height":5}))
            .await;
    }
    bob.until(|s| shapes(s).len() == 3).await;
    let snapshots_before = bob.snapshots;

    let index = worker_of(&server, room).await;
    let old_pid = worker_pids_or_zero(&server).await[index];
    send_signal(old_pid, "KILL");
    alice
        .send(json!({"type":"shape_create","shapeType":"oval","x":9,"y":9,"width":1,"height":1}))
        .await;
    wait_replaced_within(&server, index, old_pid, PATIENCE).await;

    let marker = 777.0;
    let v1 = alice.sync("alice", marker).await;
    let v2 = bob.until(|s| cursor_x(s, "alice") == Some(marker)).await;
    assert_eq!(v2, v1);
    assert_eq!(shapes(&v1).len(), 4);
    assert!(
        bob.snapshots > snapshots_before,
        "the restored room's first publish reaches v2 members as a snapshot"
    );
    assert_eq!(bob.resyncs, 0);
}

/// A v2 client is told when a room limit refuses its messages: an `error`
/// message naming the refused op, outside the `seq` order (the ops that
/// follow it go on without a gap); a v1 member of the same room gets only
/// snapshots, as v1 always did.
#[tokio::test]
async fn a_v2_client_is_told_of_creates_the_board_budget_refused() {
    let server = Server::start(&[]);
    let mut pat = server.raw_client("pat", "full", None).await;
    let mut ann = server
        .raw_client_with("ann", "full", "Sec-WebSocket-Protocol: whiteboard.v2\r\n")
        .await;
    let text = "\u{1}".repeat(10_000); // 60 KB escaped
    const PASTES: usize = 215;
    // Both read as they go, as browsers do (what they were sent is kept).
    let (mut ann_frames, mut pat_frames) = (Vec::new(), Vec::new());
    for x in 0..PASTES {
        let create = json!({"type":"shape_create","shapeType":"text","x":x,"y":0,"width":1,"height":1,"text":text});
        ann.send_text(&create.to_string()).await;
        if x % 10 == 9 {
            ann_frames.extend(ann.frames_within(Duration::from_millis(5)).await);
            pat_frames.extend(pat.frames_within(Duration::from_millis(5)).await);
        }
    }
    ann.send_text(&json!({"type":"cursor_move","x":-5,"y":0}).to_string())
        .await;
    // Ann's messages up to her cursor: ops and snapshots in seq order, and
    // the errors.
    let (mut refused, mut added, mut last_seq, mut moved) = (0, 0, None::<u64>, false);
    let mut ann_frames = ann_frames.into_iter();
    while !(moved && refused as usize + added == PASTES) {
        let frame = match ann_frames.next() {
            Some(frame) => frame,
            None => ann.next_text_frame().await,
        };
        if frame.opcode() != 0x1 {
            continue;
        }
        let message: Value = serde_json::from_str(&frame.text()).unwrap();
        match message["type"].as_str().unwrap() {
            "error" => {
                assert_eq!(message["op"], "shape_create", "{message}");
                assert_eq!(message["reason"], "board_full", "{message}");
                assert!(message.get("seq").is_none(), "{message}");
                refused += message["count"].as_u64().unwrap();
                continue;
            }
            "snapshot" => added = message["shapes"].as_array().unwrap().len(),
            "ops" => {
                let ops = message["ops"].as_array().unwrap();
                added += ops.iter().filter(|op| op["op"] == "add").count();
            }
            other => panic!("unexpected {other}"),
        }
        let seq = message["seq"].as_u64().unwrap();
        assert_eq!(last_seq.map_or(0, |s| s + 1), seq, "no gap");
        last_seq = Some(seq);
        moved |= message.to_string().contains("\"x\":-5");
    }
    assert!((200..215).contains(&added), "{added} kept");
    assert!(refused >= 1);
    assert!(metric(&server, "session_server_refusals_told_total").await >= 1.0);
    // Pat, in v1, sees the same board and nothing else.
    let mut pat_frames = pat_frames.into_iter();
    loop {
        let frame = match pat_frames.next() {
            Some(frame) => frame,
            None => pat.next_text_frame().await,
        };
        if frame.opcode() != 0x1 {
            continue;
        }
        let text = frame.text();
        let snap: Value = serde_json::from_str(&text).expect("a snapshot");
        assert!(snap.get("type").is_none(), "{}", &text[..80]);
        if shapes(&snap).len() == added && snap["cursors"][0]["x"] == -5 {
            break;
        }
    }
}
