//! Smoke run of the load generator (issue 5), so the tool keeps working: a
//! second of the fanout scenario against a test server. No timing is asserted.

mod util;

use util::*;

#[test]
fn fanout_runs_and_reports_what_it_measured() {
    let server = Server::start(&[
        "--rate-limit-per-sec",
        "100000",
        "--rate-limit-burst",
        "100000",
    ]);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["fanout", "--url", &format!("ws://{}", server.host())])
        .args([
            "--rooms",
            "2",
            "--members",
            "3",
            "--hz",
            "20",
            "--seconds",
            "1",
        ])
        .args(["--server-pid", &server.pid().to_string()])
        .env("JWT_SECRET", SECRET)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(result["scenario"], "fanout");
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
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["idle", "--url", &format!("ws://{}", server.host())])
        .args(["--connections", "40", "--members", "10", "--sources", "2"])
        .args(["--server-pid", &server.pid().to_string()])
        .env("JWT_SECRET", SECRET)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(result["scenario"], "idle");
    assert_eq!(result["connections"], 40);
    assert!(result["server_rss_kib_after"].as_u64().unwrap() > 1000);
}

#[test]
fn the_ceiling_serves_the_fanout_scenario() {
    use std::io::{BufRead, BufReader};
    let mut ceiling = std::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["ceiling", "--port", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(ceiling.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_owned();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["fanout", "--url", &format!("ws://{addr}")])
        .args([
            "--rooms",
            "1",
            "--members",
            "3",
            "--hz",
            "20",
            "--seconds",
            "1",
        ])
        .args(["--server-pid", &ceiling.id().to_string()])
        .env("JWT_SECRET", "any-secret-the-ceiling-ignores")
        .output()
        .unwrap();
    let _ = ceiling.kill();
    let _ = ceiling.wait();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(result["moves_seen"].as_u64().unwrap() > 0, "{result}");
}

#[test]
fn churn_runs_and_reports_handshakes() {
    let server = Server::start(&[]);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["churn", "--url", &format!("ws://{}", server.host())])
        .args(["--concurrency", "4", "--seconds", "1"])
        .args(["--server-pid", &server.pid().to_string()])
        .env("JWT_SECRET", SECRET)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(result["scenario"], "churn");
    assert!(result["handshakes"].as_u64().unwrap() > 0, "{result}");
    assert!(
        result["connect_to_first_snapshot_ms"]["p50"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}
