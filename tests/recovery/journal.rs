//! The supervisor's journal of each room (what rebuilds it after a worker
//! crash) stays bounded and useful during a backend outage: a degraded room (its
//! board could not be loaded) is checkpointed like any other, so after tens of
//! thousands of events a worker crash still loses nothing acknowledged, and big
//! messages cost the journal bytes only until the next checkpoint.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::backend::{Backend, Mode};
use crate::support::*;

fn rect(x: i64) -> Value {
    json!({"type":"shape_create","shapeType":"rectangle","x":x,"y":0,"width":10,"height":10})
}

/// A server on `backend` whose loads fail (rooms are admitted degraded after
/// 300 ms), with a budget that lets the test send fast.
async fn degraded_server(backend: &Backend) -> Server {
    Server::on_backend(
        backend,
        &[
            "--load-wait-ms",
            "300",
            "--persist-debounce-ms",
            "200",
            "--rate-limit-per-sec",
            "100000",
            "--rate-limit-burst",
            "100000",
        ],
        &[],
    )
}

/// The room's line in the monitor.
async fn monitor_room(server: &Server, room: &str) -> Value {
    let (code, body) = server.get("/admin/rooms").await;
    assert_eq!(code, 200);
    let monitor: Value = serde_json::from_str(&body).unwrap();
    monitor["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["room"] == room)
        .cloned()
        .unwrap_or_else(|| panic!("{room} not in {monitor}"))
}

async fn worker_pid(server: &Server) -> u32 {
    server.status().await["workers"][0]["pid"].as_u64().unwrap() as u32
}

/// Kills the room's worker, then moves `client`'s cursor to `marker` and returns
/// the first snapshot showing it: the room as the replacement restored it.
async fn kill_and_look(server: &Server, client: &mut Client, marker: f64) -> Value {
    send_signal(worker_pid(server).await, "KILL");
    client
        .send(json!({"type":"cursor_move","x":marker,"y":1}))
        .await;
    client
        .until(|s| {
            s["cursors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["x"] == marker)
        })
        .await
}

fn cursor_moves(from: usize, count: usize) -> Vec<String> {
    (from..from + count)
        .map(|i| json!({"type":"cursor_move","x":i,"y":1}).to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_room_after_60000_events_recovers_from_a_kill_with_every_shape() {
    let backend = Backend::start().await;
    let stored = json!([{"id":"s1","type":"oval","x":-1,"y":0,"width":1,"height":1,"userId":"x",
        "timestamp":"2024-01-01T12:00:00.000Z","fill":"#000","stroke":"#fff","rotation":0}]);
    backend.create_board("outage", stored);
    backend.set_mode(Mode::Fail);
    let server = degraded_server(&backend).await;
    let mut alice = server.join("alice", "outage").await;
    let mut bob = server.join("bob", "outage").await;

    // 20 shapes, 60,000 cursor moves, 20 more shapes: all acknowledged.
    for x in 0..20 {
        alice.send(rect(x)).await;
    }
    alice.send_burst(cursor_moves(0, 30_000)).await;
    bob.send_burst(cursor_moves(0, 30_000)).await;
    for x in 20..40 {
        bob.send(rect(x)).await;
    }
    alice.sync("alice", 1e6).await;
    let before = bob.sync("bob", 1e6).await;
    assert_eq!(xs_of(&before["shapes"]), (0..40).collect::<Vec<_>>());
    // Checkpoints kept the journal short although nothing could be saved.
    let line = monitor_room(&server, "outage").await;
    assert!(
        line["journal"].as_u64().unwrap() < 2_000,
        "journal of a degraded room: {line}"
    );

    let pid = worker_pid(&server).await;
    let after = kill_and_look(&server, &mut alice, 2e6).await;
    assert_ne!(worker_pid(&server).await, pid, "the worker was replaced");
    assert_eq!(xs_of(&after["shapes"]), (0..40).collect::<Vec<_>>());
    assert_eq!(users(&after), ["alice", "bob"]);

    // The store comes back: the stored shape is merged first, and all is saved.
    backend.set_mode(Mode::Normal);
    let merged = bob.until(|s| shapes(s).len() == 41).await;
    let mut expected = vec![-1];
    expected.extend(0..40);
    assert_eq!(xs_of(&merged["shapes"]), expected);
    let deadline = Instant::now() + PATIENCE;
    while backend.shapes("outage").unwrap().as_array().unwrap().len() != 41 {
        assert!(Instant::now() < deadline, "not saved after the outage");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Big messages (a 50 KB field the room ignores) cost the journal little: it
/// keeps only the fields the room reads, and asks for a checkpoint every MiB.
/// The journal of a degraded room under such a flood stays under 2 MiB, and the
/// room still survives a worker kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn padded_messages_cost_the_journal_only_until_the_next_checkpoint() {
    let backend = Backend::start().await;
    backend.set_mode(Mode::Fail);
    let server = degraded_server(&backend).await;
    let mut alice = server.join("alice", "padded").await;
    let mut bob = server.join("bob", "padded").await;
    let pad = "p".repeat(50_000);
    let padded = |i: usize| json!({"type":"cursor_move","x":i,"y":1,"pad":pad}).to_string();
    // 2 × 300 messages of 50 KB: 30 MB, twice the journal's hard bound.
    alice.send_burst((0..300).map(padded).collect()).await;
    bob.send_burst((0..300).map(padded).collect()).await;
    alice.sync("alice", 1e6).await;
    bob.sync("bob", 1e6).await;
    let line = monitor_room(&server, "padded").await;
    let bytes = line["journalBytes"].as_u64().unwrap();
    assert!(bytes < 2 << 20, "journal bytes after the flood: {line}");
    // Still restorable: a kill loses nothing.
    alice.send(rect(5)).await;
    alice.until(|s| shapes(s).len() == 1).await;
    let after = kill_and_look(&server, &mut alice, 3e6).await;
    assert_eq!(xs_of(&after["shapes"]), [5]);
    assert_eq!(users(&after), ["alice", "bob"]);
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

/// The supervisor's memory through an outage with big messages: two clients
/// send 50 KB messages at 400/s each (within their budget: 20 MB/s each) for
/// `OUTAGE_FLOOD_SECS` (default 60) into degraded rooms, then leave. Prints the supervisor's RSS before,
/// at its peak, and once the rooms are freed. A measurement, not a test (run
/// with `cargo test --release --test server recovery::journal -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement (about a minute)"]
async fn supervisor_memory_through_an_outage_with_big_messages() {
    let secs: u64 = std::env::var("OUTAGE_FLOOD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let backend = Backend::start().await;
    backend.set_mode(Mode::Fail);
    let server = Server::on_backend(&backend, &["--load-wait-ms", "300"], &[]);
    let pid = server.pid();
    let baseline = rss_mib(pid);
    let pad = "p".repeat(50_000);
    let mut flooders = Vec::new();
    for (user, room) in [("a", "outage-1"), ("b", "outage-2")] {
        let mut client = server.join(user, room).await;
        let pad = pad.clone();
        flooders.push(tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut i = 0;
            while start.elapsed() < Duration::from_secs(secs) {
                let batch = (i..i + 20)
                    .map(|i| json!({"type":"cursor_move","x":i,"y":1,"pad":pad}).to_string())
                    .collect();
                client.send_burst(batch).await;
                i += 20;
                // 20 every 50 ms: 400/s.
                tokio::time::sleep_until(start + Duration::from_millis(50) * (i / 20) as u32).await;
            }
            client.close().await;
            i
        }));
    }
    let mut peak = baseline;
    while !flooders.iter().all(|f| f.is_finished()) {
        peak = peak.max(rss_mib(pid));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut sent = 0;
    for f in flooders {
        sent += f.await.unwrap();
    }
    // Rooms freed (nothing unsaved: cursor moves only).
    let deadline = Instant::now() + PATIENCE;
    while !server.status().await["workers"][0]["rooms"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "rooms not freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The supervisor returns freed memory at most 10 s after rooms are freed.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = rss_mib(pid);
    eprintln!(
        "supervisor RSS: baseline {baseline:.1} MiB, peak {peak:.1} MiB, after the rooms are freed {after:.1} MiB ({sent} messages of 50 KB in {secs} s)"
    );
}
