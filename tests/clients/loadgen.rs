//! Smoke runs of the load generator (issue 5), so the tool keeps working: each
//! scenario for about a second against a test server (or the ceiling). No timing
//! is asserted.

use serde_json::Value;

use crate::support::*;

/// Runs `loadgen ARGS` with the test secret; returns its one JSON result.
fn loadgen(args: &[&str]) -> Value {
    let output = std::process::Command::new(loadgen_exe())
        .args(args)
        .env("JWT_SECRET", SECRET)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

/// Runs `loadgen SCENARIO ARGS` against `server` (its URL and pid added).
fn loadgen_on(server: &Server, scenario: &str, args: &[&str]) -> Value {
    let (url, pid) = (format!("ws://{}", server.host()), server.pid().to_string());
    let mut all = vec![scenario, "--url", &url];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--server-pid", &pid]);
    loadgen(&all)
}

#[test]
fn fanout_runs_and_reports_what_it_measured() {
    let server = Server::start(&[
        "--rate-limit-per-sec",
        "100000",
        "--rate-limit-burst",
        "100000",
    ]);
    let result = loadgen_on(
        &server,
        "fanout",
        &[
            "--rooms",
            "2",
            "--members",
            "3",
            "--hz",
            "20",
            "--seconds",
            "1",
            "--shapes",
            "5",
            "--slow-members",
            "1",
        ],
    );
    assert_eq!(result["scenario"], "fanout");
    assert_eq!(result["shapes"], 5);
    assert_eq!(result["slow_members"], 1);
    // Every snapshot carries the 5 shapes (each over 150 bytes).
    assert!(
        result["bytes_per_snapshot"].as_f64().unwrap() > 750.0,
        "{result}"
    );
    assert_eq!(result["final_state_stale_pairs"], 0, "{result}");
    let sent = result["messages_sent"].as_u64().unwrap();
    assert!(
        (30..=130).contains(&sent),
        "6 members × 20 Hz × 1 s: {sent}"
    );
    assert_eq!(result["moves_expected"].as_u64().unwrap(), sent * 2);
    let seen = result["moves_seen"].as_u64().unwrap();
    assert!(seen > 0 && seen <= sent * 2, "{result}");
    assert!(result["snapshots_received"].as_u64().unwrap() > 0);
    assert!(result["latency_ms"]["p50"].as_f64().unwrap() > 0.0);
    assert!(result["server_cpu_seconds"].as_f64().is_some());
    assert!(result["server_rss_kib"].as_u64().unwrap() > 1000);
}

#[test]
fn idle_runs_and_reports_memory_per_connection() {
    let server = Server::start(&[]);
    let result = loadgen_on(
        &server,
        "idle",
        &["--connections", "40", "--members", "10", "--sources", "2"],
    );
    assert_eq!(result["scenario"], "idle");
    assert_eq!(result["connections"], 40);
    assert!(result["server_rss_kib_after"].as_u64().unwrap() > 1000);
}

#[test]
fn churn_runs_and_reports_handshakes() {
    let server = Server::start(&[]);
    let result = loadgen_on(&server, "churn", &["--concurrency", "4", "--seconds", "1"]);
    assert_eq!(result["scenario"], "churn");
    assert!(result["handshakes"].as_u64().unwrap() > 0, "{result}");
    assert!(
        result["connect_to_first_snapshot_ms"]["p50"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

#[test]
fn memory_runs_and_reports_each_process_while_full_and_after() {
    let server = Server::start(&[]);
    let result = loadgen_on(
        &server,
        "memory",
        &[
            "--rooms",
            "2",
            "--members",
            "2",
            "--shapes",
            "30",
            "--text-chars",
            "200",
            "--edit-every-ms",
            "50",
            "--settle-secs",
            "0.5",
            "--after-secs",
            "0.5",
            "--admin-token",
            HARNESS_ADMIN_TOKEN,
        ],
    );
    assert_eq!(result["scenario"], "memory");
    assert_eq!(
        result["shapes_seen_per_member"],
        serde_json::json!([30, 30, 30, 30])
    );
    assert_eq!(result["during"]["workers"].as_array().unwrap().len(), 2);
    assert!(result["during"]["total_rss_kib"].as_u64().unwrap() > 1000);
    assert!(result["busy_max_total_rss_kib"].as_u64().unwrap() > 1000);
    assert_eq!(result["after"].as_array().unwrap().len(), 1);
}
