//! What production needs (issue 6): metrics that count what happened, health and
//! readiness, capacity from Hathora's settings, JSON logs, and a graceful drain.

mod agones;
mod deploy;
mod shutdown;
mod tls;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::util::backend::{BACKEND_SECRET, Backend, Mode};
use crate::util::*;
use serde_json::json;

/// Parses the Prometheus text format into `name{labels}` → value.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap();
            (name.to_owned(), value.parse().unwrap())
        })
        .collect()
}

async fn metrics(server: &Server) -> HashMap<String, f64> {
    let (code, body) = server.get("/metrics").await;
    assert_eq!(code, 200);
    parse_metrics(&body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_scripted_session() {
    let server = Server::start(&[
        "--persist-debounce-ms",
        "100",
        "--persist-max-wait-ms",
        "200",
    ]);
    let mut alice = server.join("alice", "r1").await;
    let _bob = server.join("bob", "r1").await;
    assert_eq!(
        server.try_connect(&server.url("not-a-token")).await.err(),
        Some(401)
    );
    assert_eq!(server.get("/").await.0, 426);
    for x in 0..3 {
        alice
            .send(
                json!({"type":"shape_create","shapeType":"oval","x":x,"y":0,"width":1,"height":1}),
            )
            .await;
    }
    alice.send(json!({"type":"cursor_move","x":1,"y":1})).await;
    alice.send_text("garbage").await;
    alice
        .send(json!({"type":"shape_update","shapeId":"missing","x":1}))
        .await;
    alice.sync("alice", 42.0).await; // one more cursor_move
    // Workers report counts every second; saves follow the 100 ms debounce.
    let deadline = Instant::now() + PATIENCE;
    let m = loop {
        let m = metrics(&server).await;
        let framed = m.get("session_server_frames_in_total{type=\"cursor_move\"}") == Some(&2.0);
        let saved = m
            .get("session_server_saves_total{result=\"ok\"}")
            .is_some_and(|v| *v >= 1.0);
        if framed && saved {
            break m;
        }
        assert!(Instant::now() < deadline, "metrics never caught up: {m:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let get = |k: &str| {
        m.get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in {m:?}"))
    };
    assert_eq!(get("session_server_connections"), 2.0);
    assert_eq!(get("session_server_connections_accepted_total"), 2.0);
    assert_eq!(
        get("session_server_connections_rejected_total{reason=\"unauthorized\"}"),
        1.0
    );
    assert_eq!(
        get("session_server_connections_rejected_total{reason=\"not_websocket\"}"),
        1.0
    );
    assert_eq!(
        get("session_server_frames_in_total{type=\"shape_create\"}"),
        3.0
    );
    assert_eq!(
        get("session_server_frames_ignored_total{reason=\"malformed\"}"),
        1.0
    );
    assert_eq!(
        get("session_server_frames_ignored_total{reason=\"unknown_shape\"}"),
        1.0
    );
    assert_eq!(get("session_server_rooms"), 1.0);
    assert_eq!(get("session_server_workers_up"), 2.0);
    let saves = get("session_server_saves_total{result=\"ok\"}");
    assert_eq!(get("session_server_save_duration_seconds_count"), saves);
    assert!(get("session_server_snapshots_sent_total") >= 2.0);
    assert!(get("session_server_snapshot_bytes_total") > 100.0);
    assert_eq!(
        get("session_server_fanout_latency_seconds_count"),
        get("session_server_snapshots_sent_total")
    );
    let ipc_depth: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("session_server_ipc_queue_depth{"))
        .map(|(_, v)| *v)
        .sum();
    assert_eq!(ipc_depth, 0.0);
    assert_eq!(server.get("/readyz").await, (200, "ready\n".to_owned()));
}

#[tokio::test]
async fn hathora_rooms_per_process_caps_rooms_with_503_and_retry_after() {
    let server = Server::start_raw(
        &["--workers", "1"],
        &[
            ("JWT_SECRET", SECRET),
            ("HATHORA_ROOMS_PER_PROCESS", "2"),
            ("HATHORA_PROCESS_ID", "proc-7"),
        ],
    );
    let _a = server.join("a", "room-1").await;
    let _b = server.join("b", "room-2").await;
    let (code, head) = server.raw_upgrade(&server.token("c", "room-3")).await;
    assert_eq!(code, 503);
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 5"),
        "{head}"
    );
    // A member of an existing room still gets in.
    let _a2 = server.join("a2", "room-1").await;
    assert!(
        server
            .logs()
            .contains("the server holds its maximum of 2 rooms")
    );
    assert!(
        server.logs().contains("hathora_process_id=\"proc-7\"")
            || server.logs().contains("hathora_process_id=proc-7")
    );
    let (_, body) = server.get("/metrics").await;
    assert!(body.contains("hathora_process_id=\"proc-7\""), "{body}");
    assert!(body.contains("session_server_connections_rejected_total{reason=\"no_capacity\",hathora_process_id=\"proc-7\"} 1")
        || body.contains("session_server_connections_rejected_total{hathora_process_id=\"proc-7\",reason=\"no_capacity\"} 1"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_readyz_503_new_upgrades_503_then_going_away_and_exit_zero() {
    let backend = Backend::start().await;
    backend.create_board("r1", json!([]));
    let url = backend.url();
    let mut server = Server::start_raw(
        &[
            "--workers",
            "1",
            "--backend-url",
            url.as_str(),
            "--shutdown-grace-ms",
            "1500",
        ],
        &[
            ("JWT_SECRET", SECRET),
            ("SESSION_SERVER_SECRET", BACKEND_SECRET),
        ],
    );
    let mut alice = server.join("alice", "r1").await;
    // A hung backend keeps the drain busy for the whole grace period.
    backend.set_mode(Mode::Hang);
    alice
        .send(json!({"type":"shape_create","shapeType":"oval","x":1,"y":0,"width":1,"height":1}))
        .await;
    alice.until(|s| shapes(s).len() == 1).await;
    assert_eq!(server.get("/readyz").await.0, 200);
    let signalled = Instant::now();
    server.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.get("/readyz").await, (503, "draining\n".to_owned()));
    assert_eq!(server.raw_upgrade(&server.token("late", "r2")).await.0, 503);
    assert_eq!(
        alice.closed().await,
        Closed::Frame(1001, "Going Away".into())
    );
    let code = tokio::task::block_in_place(|| server.wait_exit(PATIENCE));
    assert_eq!(code, Some(0));
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "exit within the grace period"
    );
    assert!(
        server.logs().contains("some rooms could not be saved"),
        "{}",
        server.logs()
    );
}

#[tokio::test]
async fn log_format_json_writes_one_json_object_per_line() {
    let server = Server::start_raw(
        &["--workers", "1"],
        &[("JWT_SECRET", SECRET), ("LOG_FORMAT", "json")],
    );
    let _a = server.join("a", "r1").await;
    let logs = server.logs();
    let mut parsed = 0;
    for line in logs.lines().filter(|l| !l.starts_with("Listening on")) {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            value["level"].is_string() && value["fields"].is_object(),
            "{line}"
        );
        parsed += 1;
    }
    assert!(parsed >= 3, "{logs}");
    assert!(logs.contains("\"message\":\"room opened\""), "{logs}");
    assert!(!logs.contains(SECRET));
}
