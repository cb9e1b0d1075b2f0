//! Persistence end to end (PROTOCOL.md §5): the real server against an in-test
//! HTTP backend implementing the contract, and against the embedded SQLite store
//! across restarts; faults from the store's side in `faults`.

mod faults;

use std::time::{Duration, Instant};

use clap::Parser;
use contract::config::Cli;
use serde_json::{Value, json};

use crate::support::backend::{BACKEND_SECRET, Backend, Mode};
use crate::support::*;

fn with_backend(backend: &Backend, extra: &[&str]) -> Server {
    let url = backend.url();
    let mut args = vec!["--workers", "2", "--backend-url", url.as_str()];
    args.extend_from_slice(extra);
    Server::start_raw(
        &args,
        &[
            ("JWT_SECRET", SECRET),
            ("SESSION_SERVER_SECRET", BACKEND_SECRET),
        ],
    )
}

fn stored_shape(id: &str, x: i64) -> Value {
    json!({"id":id,"type":"rectangle","x":x,"y":2,"width":3,"height":4,"userId":"earlier",
        "timestamp":"2024-01-01T12:00:00.000Z","text":"kept","fill":"#111111","stroke":"#222222","rotation":15})
}

fn rect(x: i64) -> Value {
    json!({"type":"shape_create","shapeType":"rectangle","x":x,"y":0,"width":10,"height":10})
}

fn ids(shapes: &Value) -> Vec<String> {
    shapes
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_shapes_are_in_the_very_first_snapshot() {
    let backend = Backend::start().await;
    let stored = json!([stored_shape("s1", 1), stored_shape("s2", 2)]);
    backend.create_board("room-1", stored.clone());
    let server = with_backend(&backend, &[]);
    let mut alice = server
        .connect(&server.url(&server.token("alice", "room-1")))
        .await;
    let first = alice.next_snapshot().await;
    assert_eq!(first["shapes"], stored);
    assert_eq!(users(&first), ["alice"]);
    let gets: Vec<_> = backend
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET")
        .collect();
    assert_eq!(gets.len(), 1);
    assert_eq!(gets[0].path, "/api/boards/by-room/room-1");
    assert!(gets[0].authorized);
}

/// An outage shorter than the load wait (5 s by default): the load is retried
/// (after 250 ms, 500 ms, 1 s…) and the first snapshot waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_backend_outage_only_delays_the_first_snapshot() {
    const OUTAGE: Duration = Duration::from_millis(1200);
    let backend = Backend::start().await;
    backend.create_board("room-1", json!([stored_shape("s1", 1)]));
    backend.set_mode(Mode::Fail);
    let server = with_backend(&backend, &[]);
    let started = Instant::now();
    let mut alice = server
        .connect(&server.url(&server.token("alice", "room-1")))
        .await;
    tokio::time::sleep(OUTAGE).await;
    backend.set_mode(Mode::Normal);
    let first = alice.next_snapshot().await;
    assert!(started.elapsed() >= OUTAGE);
    assert_eq!(first["shapes"], json!([stored_shape("s1", 1)]));
    let failed_gets = backend
        .requests()
        .iter()
        .filter(|r| r.status == 500)
        .count();
    assert!(
        failed_gets >= 3,
        "load retried quickly: {failed_gets} attempts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_wait_members_draw_in_a_degraded_room_and_nothing_is_overwritten() {
    let backend = Backend::start().await;
    let stored = json!([stored_shape("s1", 1), stored_shape("s2", 2)]);
    backend.create_board("room-1", stored.clone());
    backend.set_mode(Mode::Fail);
    let server = with_backend(
        &backend,
        &[
            "--load-wait-ms",
            "500",
            "--persist-debounce-ms",
            "200",
            "--persist-max-wait-ms",
            "500",
        ],
    );
    let mut alice = server
        .connect(&server.url(&server.token("alice", "room-1")))
        .await;
    let degraded = alice.next_snapshot().await;
    assert_eq!(
        degraded["shapes"],
        json!([]),
        "admitted to an empty, degraded room"
    );
    alice.send(rect(50)).await;
    let drawn = alice.until(|s| shapes(s).len() == 1).await;
    let new_id = shapes(&drawn)[0]["id"].as_str().unwrap().to_owned();
    // While the load fails, nothing is saved (past the maximum wait, when a save
    // would be due): the empty board must not overwrite the real one.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(backend.puts().len(), 0);
    assert_eq!(backend.shapes("room-1").unwrap(), stored);
    backend.set_mode(Mode::Normal);
    // After recovery: stored first, then the new shape, for the client and the backend.
    let merged = alice.until(|s| shapes(s).len() == 3).await;
    assert_eq!(ids(&merged["shapes"]), ["s1", "s2", new_id.as_str()]);
    let saved = backend
        .wait_for_shapes("room-1", PATIENCE, |s| s.as_array().unwrap().len() == 3)
        .await;
    assert_eq!(saved, merged["shapes"]);
}

/// Without flags, a room is saved after 2 s of quiet following a shape change, or
/// at the latest 10 s after its first unsaved change (README "Persistence"). The
/// tests below shorten both with the flags; the policy itself is tested on a
/// paused clock with these values (`worker/persist.rs`).
#[test]
fn by_default_a_save_waits_two_quiet_seconds_and_ten_at_most() {
    let serve = Cli::try_parse_from(["session-server"]).unwrap().serve;
    assert_eq!(serve.persist_debounce_ms, 2_000);
    assert_eq!(serve.persist_max_wait_ms, 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_changes_gives_one_put_after_the_debounce() {
    const DEBOUNCE: Duration = Duration::from_millis(500);
    let backend = Backend::start().await;
    backend.create_board("room-1", json!([]));
    let server = with_backend(&backend, &["--persist-debounce-ms", "500"]);
    let mut alice = server.join("alice", "room-1").await;
    for x in 0..5 {
        alice.send(rect(x)).await;
    }
    alice
        .send(json!({"type":"shape_update","shapeId":"nope","x":1}))
        .await;
    let last_edit = Instant::now();
    let snap = alice.until(|s| shapes(s).len() == 5).await;
    backend
        .wait_for_shapes("room-1", PATIENCE, |s| s.as_array().unwrap().len() == 5)
        .await;
    tokio::time::sleep(DEBOUNCE * 2).await;
    let puts = backend.puts();
    assert_eq!(puts.len(), 1, "one save for the burst");
    let put = &puts[0];
    let after = put.at.duration_since(last_edit);
    let early = Duration::from_millis(100);
    let late = Duration::from_millis(1500);
    assert!(
        after >= DEBOUNCE - early && after <= DEBOUNCE + late,
        "saved {after:?} after the last edit"
    );
    assert_eq!(put.path, format!("/api/boards/{}", 101));
    assert!(put.authorized, "bearer token verifies with the secret");
    assert_eq!(
        put.body.as_ref().unwrap(),
        &json!({"data":{"shapes":snap["shapes"],"cursors":[]}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_moves_never_cause_a_save() {
    let backend = Backend::start().await;
    backend.create_board("room-1", json!([stored_shape("s1", 1)]));
    let server = with_backend(
        &backend,
        &[
            "--persist-debounce-ms",
            "200",
            "--persist-max-wait-ms",
            "400",
        ],
    );
    let mut alice = server.join("alice", "room-1").await;
    for i in 0..30 {
        alice.send(json!({"type":"cursor_move","x":i,"y":i})).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    alice.sync("alice", 999.0).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(backend.puts().len(), 0);
}

/// An edit every 100 ms never leaves the room quiet for its 1 s debounce: it is
/// saved at the latest its maximum wait (2.5 s here) after the first edit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_edits_are_saved_within_the_max_wait() {
    const MAX_WAIT: Duration = Duration::from_millis(2500);
    let backend = Backend::start().await;
    backend.create_board("room-1", json!([]));
    let server = with_backend(
        &backend,
        &[
            "--persist-debounce-ms",
            "1000",
            "--persist-max-wait-ms",
            "2500",
        ],
    );
    let mut alice = server.join("alice", "room-1").await;
    let first_edit = Instant::now();
    for x in 0..35 {
        alice.send(rect(x)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let puts = backend.puts();
    assert!(!puts.is_empty(), "a busy room is saved");
    let first_save = puts[0].at.duration_since(first_edit);
    let early = Duration::from_millis(500);
    let late = Duration::from_millis(1000);
    assert!(
        first_save >= MAX_WAIT - early && first_save <= MAX_WAIT + late,
        "first save {first_save:?} after the first edit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_backend_outage_the_latest_shapes_arrive() {
    let backend = Backend::start().await;
    backend.create_board("room-1", json!([]));
    let server = with_backend(&backend, &["--persist-debounce-ms", "300"]);
    let mut alice = server.join("alice", "room-1").await;
    backend.set_mode(Mode::Fail);
    alice.send(rect(1)).await;
    alice.send(rect(2)).await;
    // Saves fail at 0.3, 0.8 and 1.8 s (then back off); the last shape comes
    // between the second and third.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    alice.send(rect(3)).await;
    let latest = alice.until(|s| shapes(s).len() == 3).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(backend.puts().iter().all(|p| p.status == 500));
    backend.set_mode(Mode::Normal);
    let saved = backend
        .wait_for_shapes("room-1", Duration::from_secs(20), |s| {
            s.as_array().unwrap().len() == 3
        })
        .await;
    assert_eq!(saved, latest["shapes"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_backend_is_timed_out_and_retried() {
    let backend = Backend::start().await;
    backend.create_board("room-1", json!([]));
    let server = with_backend(&backend, &["--persist-debounce-ms", "100"]);
    let mut alice = server.join("alice", "room-1").await;
    backend.set_mode(Mode::Hang);
    alice.send(rect(1)).await;
    let latest = alice.until(|s| shapes(s).len() == 1).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    backend.set_mode(Mode::Normal);
    let saved = backend
        .wait_for_shapes("room-1", Duration::from_secs(20), |s| {
            s.as_array().unwrap().len() == 1
        })
        .await;
    assert_eq!(saved, latest["shapes"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_member_leaving_saves_at_once() {
    let backend = Backend::start().await;
    backend.create_board("room-1", json!([]));
    let server = with_backend(&backend, &[]);
    let mut alice = server.join("alice", "room-1").await;
    alice.send(rect(1)).await;
    let snap = alice.until(|s| shapes(s).len() == 1).await;
    let left = Instant::now();
    alice.close().await;
    let saved = backend
        .wait_for_shapes("room-1", PATIENCE, |s| s.as_array().unwrap().len() == 1)
        .await;
    assert_eq!(saved, snap["shapes"]);
    let put = &backend.puts()[0];
    assert!(
        put.at.duration_since(left) < Duration::from_millis(1000),
        "prompt save"
    );
    // The room is freed afterwards.
    let deadline = Instant::now() + PATIENCE;
    while server.status().await["workers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| !w["rooms"].as_array().unwrap().is_empty())
    {
        assert!(Instant::now() < deadline, "room never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_board_created_after_the_load_is_found_at_save_time() {
    let backend = Backend::start().await;
    let server = with_backend(&backend, &["--persist-debounce-ms", "100"]);
    let mut alice = server.join("alice", "room-1").await;
    alice.send(rect(1)).await;
    let snap = alice.until(|s| shapes(s).len() == 1).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(backend.puts().len(), 0, "no board, nothing to PUT to");
    backend.create_board("room-1", json!([]));
    let saved = backend
        .wait_for_shapes("room-1", PATIENCE, |s| s.as_array().unwrap().len() == 1)
        .await;
    assert_eq!(saved, snap["shapes"]);
    assert_eq!(
        server.logs().matches("has no board for this room").count(),
        1,
        "warned once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_saves_unsaved_edits_then_exits_zero() {
    let backend = Backend::start().await;
    backend.create_board("room-1", json!([]));
    backend.create_board("room-2", json!([]));
    let mut server = with_backend(&backend, &[]);
    let mut alice = server.join("alice", "room-1").await;
    let mut bob = server.join("bob", "room-2").await;
    alice.send(rect(1)).await;
    bob.send(rect(2)).await;
    let a = alice.until(|s| shapes(s).len() == 1).await;
    let b = bob.until(|s| shapes(s).len() == 1).await;
    server.signal("TERM");
    assert_eq!(
        alice.closed().await,
        Closed::Frame(1001, "Going Away".into())
    );
    let code = tokio::task::block_in_place(|| server.wait_exit(PATIENCE));
    assert_eq!(code, Some(0));
    assert_eq!(backend.shapes("room-1").unwrap(), a["shapes"]);
    assert_eq!(backend.shapes("room-2").unwrap(), b["shapes"]);
    server.logged("shutdown: every room saved").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_survives_a_restart() {
    let dir = temp_dir("restart");
    let dir_arg = dir.to_str().unwrap();
    let args = ["--workers", "2", "--data-dir", dir_arg];
    let env = [("JWT_SECRET", SECRET)];
    let before = {
        let mut server = Server::start_raw(&args, &env);
        assert!(server.logs().contains("embedded SQLite store"));
        let mut alice = server.join("alice", "room-1").await;
        alice.send(rect(1)).await;
        alice.send(rect(2)).await;
        let snap = alice.until(|s| shapes(s).len() == 2).await;
        server.signal("TERM");
        assert_eq!(
            tokio::task::block_in_place(|| server.wait_exit(PATIENCE)),
            Some(0)
        );
        snap
    };
    let server = Server::start_raw(&args, &env);
    let mut alice = server
        .connect(&server.url(&server.token("alice", "room-1")))
        .await;
    let after = alice.next_snapshot().await;
    assert_eq!(after["shapes"], before["shapes"]);
}

/// SIGKILL of the whole server loses at most the edits since the last save
/// (the debounce window); everything saved before is there after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_whole_server_loses_at_most_the_unsaved_window() {
    let dir = temp_dir("sigkill");
    let dir_arg = dir.to_str().unwrap();
    let args = [
        "--workers",
        "1",
        "--data-dir",
        dir_arg,
        "--persist-debounce-ms",
        "200",
    ];
    let env = [("JWT_SECRET", SECRET)];
    let saved = {
        let mut server = Server::start_raw(&args, &env);
        let mut alice = server.join("alice", "room-1").await;
        alice.send(rect(1)).await;
        let saved = alice.until(|s| shapes(s).len() == 1).await;
        tokio::time::sleep(Duration::from_millis(1000)).await; // past the debounce: saved
        alice.send(rect(2)).await;
        alice.until(|s| shapes(s).len() == 2).await;
        let worker = server.status().await["workers"][0]["pid"].as_u64().unwrap() as u32;
        send_signal(worker, "KILL");
        server.signal("KILL");
        tokio::task::block_in_place(|| server.wait_exit(PATIENCE));
        saved
    };
    let server = Server::start_raw(&args, &env);
    let mut alice = server
        .connect(&server.url(&server.token("alice", "room-1")))
        .await;
    let after = alice.next_snapshot().await;
    assert_eq!(shapes(&after)[0], shapes(&saved)[0]);
}

#[test]
fn a_backend_without_its_secret_stops_start_up() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_session-server"))
        .args([
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--backend-url",
            "http://127.0.0.1:9",
        ])
        .env("JWT_SECRET", "a-long-enough-test-secret")
        .env_remove("SESSION_SERVER_SECRET")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("SESSION_SERVER_SECRET is required when BACKEND_URL is set"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
}
