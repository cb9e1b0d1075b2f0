//! The supervisor's journal of each room (what rebuilds it after a worker
//! crash) stays bounded and useful during a backend outage: a degraded room (its
//! board could not be loaded) is checkpointed like any other, so after tens of
//! thousands of events a worker crash still loses nothing acknowledged, and big
//! messages cost the journal bytes only until the next checkpoint.

mod util;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use util::backend::{BACKEND_SECRET, Backend, Mode};
use util::*;

const ADMIN: &str = "journal-test-admin-token";

fn rect(x: i64) -> Value {
    json!({"type":"shape_create","shapeType":"rectangle","x":x,"y":0,"width":10,"height":10})
}

fn xs(snap: &Value) -> Vec<i64> {
    shapes(snap)
        .iter()
        .map(|s| s["x"].as_i64().unwrap())
        .collect()
}

/// A server on `backend` whose loads fail (rooms are admitted degraded after
/// 300 ms), with a budget that lets the test send fast.
async fn degraded_server(backend: &Backend) -> Server {
    let url = backend.url();
    Server::start_raw(
        &[
            "--workers",
            "1",
            "--backend-url",
            url.as_str(),
            "--load-wait-ms",
            "300",
            "--persist-debounce-ms",
            "200",
            "--rate-limit-per-sec",
            "100000",
            "--rate-limit-burst",
            "100000",
        ],
        &[
            ("JWT_SECRET", SECRET),
            ("SESSION_SERVER_SECRET", BACKEND_SECRET),
            ("ADMIN_TOKEN", ADMIN),
        ],
    )
}

/// The room's line in the monitor.
async fn monitor_room(server: &Server, room: &str) -> Value {
    let (code, body) = server
        .get_with(
            "/admin/rooms",
            &[("Authorization", &format!("Bearer {ADMIN}"))],
        )
        .await;
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
    assert_eq!(xs(&before), (0..40).collect::<Vec<_>>());
    // Checkpoints kept the journal short although nothing could be saved.
    let line = monitor_room(&server, "outage").await;
    assert!(
        line["journal"].as_u64().unwrap() < 2_000,
        "journal of a degraded room: {line}"
    );

    let pid = worker_pid(&server).await;
    send_signal(pid, "KILL");
    // A move after the kill shows the room as it was, every shape included.
    alice
        .send(json!({"type":"cursor_move","x":2e6,"y":1}))
        .await;
    let after = alice
        .until(|s| {
            s["cursors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["x"] == 2e6)
        })
        .await;
    assert_ne!(worker_pid(&server).await, pid, "the worker was replaced");
    assert_eq!(xs(&after), (0..40).collect::<Vec<_>>());
    assert_eq!(users(&after), ["alice", "bob"]);

    // The store comes back: the stored shape is merged first, and all is saved.
    backend.set_mode(Mode::Normal);
    let merged = bob.until(|s| shapes(s).len() == 41).await;
    let mut expected = vec![-1];
    expected.extend(0..40);
    assert_eq!(xs(&merged), expected);
    let deadline = Instant::now() + PATIENCE;
    while backend.shapes("outage").unwrap().as_array().unwrap().len() != 41 {
        assert!(Instant::now() < deadline, "not saved after the outage");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
