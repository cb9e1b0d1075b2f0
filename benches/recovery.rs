//! Recovery time after a worker is killed: from the SIGKILL to the first
//! post-recovery snapshot at each client, for 1, 10 and 50 rooms of 10 members
//! on the killed worker (`rooms`); for a ~360 KB room whose 5 members edit at
//! 40 updates/s each (`big`); and for 100 degraded rooms, whose store is down
//! (`degraded`). Run with `cargo bench --bench recovery [-- rooms big degraded]`
//! (no argument: all).
//!
//! The server is the release binary, started on loopback with one worker so every
//! room is on the killed one. Kills are spaced past the supervisor's crash-loop
//! window, so every replacement starts at once (as after an isolated crash).

// The tests' harness; the benchmark uses part of it.
#[allow(dead_code)]
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::backend::{Backend, Mode};
use support::*;

const MEMBERS: usize = 10;
const SHAPES_PER_ROOM: i64 = 20;
const KILLS: usize = 5;
/// Longer than the supervisor's `STABLE_RUN`, so no respawn backoff applies.
const BETWEEN_KILLS: Duration = Duration::from_millis(5500);

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn measure(rooms: usize) -> Vec<f64> {
    let server = Server::start_raw(
        &["--workers", "1", "--rooms-per-worker", "100"],
        &[("JWT_SECRET", SECRET), ("RUST_LOG", "warn")],
    );
    let mut clients = Vec::new();
    for r in 0..rooms {
        let room = format!("room-{r}");
        for m in 0..MEMBERS {
            clients.push(server.join(&format!("u{m}"), &room).await);
        }
    }
    // Give each room some shapes, drawn by its first member; let every client
    // read until it has seen them, so all are idle before a kill.
    for r in 0..rooms {
        for x in 0..SHAPES_PER_ROOM {
            let shape = json!({"type":"shape_create","shapeType":"rectangle","x":x,"y":0,"width":1,"height":1});
            clients[r * MEMBERS].send(shape).await;
        }
    }
    for c in clients.iter_mut() {
        c.until(|s| shapes(s).len() == SHAPES_PER_ROOM as usize)
            .await;
    }
    let mut latencies_ms = Vec::new();
    for _ in 0..KILLS {
        tokio::time::sleep(BETWEEN_KILLS).await;
        // Every client waits for its next snapshot, concurrently.
        let (tx, mut rx) = tokio::sync::mpsc::channel(clients.len());
        let mut waiting = Vec::new();
        for mut client in clients.drain(..) {
            let tx = tx.clone();
            waiting.push(tokio::spawn(async move {
                client.next_text().await;
                let _ = tx.send(Instant::now()).await;
                client
            }));
        }
        drop(tx);
        let pid = server.status().await["workers"][0]["pid"].as_u64().unwrap() as u32;
        let killed = Instant::now();
        send_signal(pid, "KILL");
        while let Some(arrived) = rx.recv().await {
            latencies_ms.push(arrived.duration_since(killed).as_secs_f64() * 1000.0);
        }
        for w in waiting {
            clients.push(w.await.unwrap());
        }
    }
    latencies_ms
}

const BIG_SHAPES: usize = 300;
const BIG_MEMBERS: usize = 5;
const TEXT_CHARS: usize = 1000;
/// Each member's update rate in the big room: 40 updates/s.
const EDIT_EVERY: Duration = Duration::from_millis(25);
const BIG_KILLS: usize = 5;

/// The big room: 300 shapes of 1,000-character text, 5 members each typing into
/// a shape at 40 updates/s. Right after each kill every member moves its cursor
/// to a new marker; the time to the first snapshot showing it is the stall that
/// member saw (only the replacement can produce that snapshot).
async fn measure_big() -> (usize, Vec<f64>) {
    let server = Server::start_raw(
        &["--workers", "1"],
        &[("JWT_SECRET", SECRET), ("RUST_LOG", "warn")],
    );
    let mut clients = Vec::new();
    for m in 0..BIG_MEMBERS {
        clients.push(server.join(&format!("u{m}"), "big").await);
    }
    clients[0]
        .send_burst(text_shape_creates(BIG_SHAPES, TEXT_CHARS))
        .await;
    let mut full = serde_json::Value::Null;
    for c in clients.iter_mut() {
        full = c.until(|s| shapes(s).len() == BIG_SHAPES).await;
    }
    let bytes = full.to_string().len();
    let ids: Vec<String> = shapes(&full)[..BIG_MEMBERS]
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    let mut latencies_ms = Vec::new();
    for kill in 0..BIG_KILLS {
        tokio::time::sleep(BETWEEN_KILLS).await;
        let pid = server.status().await["workers"][0]["pid"].as_u64().unwrap() as u32;
        let (tx, mut rx) = tokio::sync::mpsc::channel(BIG_MEMBERS);
        let (kill_tx, kill_rx) = tokio::sync::watch::channel(None::<Instant>);
        let mut editing = Vec::new();
        for (m, mut client) in clients.drain(..).enumerate() {
            let (tx, id) = (tx.clone(), ids[m].clone());
            let mut kill_rx = kill_rx.clone();
            editing.push(tokio::spawn(async move {
                // 1 s of typing, the kill, then the marker and 1 s more.
                let edits = |from: i64| -> Vec<String> {
                    (from..from + 40)
                        .map(|k| {
                            let text = format!("{k:04}{}", "e".repeat(TEXT_CHARS - 4));
                            json!({"type":"shape_update","shapeId":id,"x":k,"text":text})
                                .to_string()
                        })
                        .collect()
                };
                client.send_paced(edits(0), EDIT_EVERY).await;
                let killed = kill_rx.wait_for(Option::is_some).await.unwrap().unwrap();
                let user = format!("u{m}");
                let marker = 1e6 + (kill * BIG_MEMBERS + m) as f64;
                client.sync(&user, marker).await;
                let _ = tx.send(killed.elapsed()).await;
                client.send_paced(edits(40), EDIT_EVERY).await;
                client
            }));
        }
        drop(tx);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        kill_tx.send_replace(Some(Instant::now()));
        send_signal(pid, "KILL");
        let mut stalls = Vec::new();
        while let Some(stall) = rx.recv().await {
            stalls.push(stall);
        }
        for e in editing {
            clients.push(e.await.unwrap());
        }
        for stall in stalls {
            latencies_ms.push(stall.as_secs_f64() * 1000.0);
        }
    }
    (bytes, latencies_ms)
}

const DEGRADED_ROOMS: usize = 100;
const DEGRADED_KILLS: usize = 3;

/// 100 rooms admitted degraded (the backend answers 500 to every request), one
/// member each, each with a shape; kill → first snapshot at each member. Each
/// restore waits `--load-wait-ms` (default 5 s) for a load that fails.
async fn measure_degraded() -> Vec<f64> {
    let backend = Backend::start().await;
    backend.set_mode(Mode::Fail);
    let server = Server::on_backend(
        &backend,
        &["--rooms-per-worker", "100"],
        &[("RUST_LOG", "error")],
    );
    let joins = (0..DEGRADED_ROOMS).map(|r| {
        let server = &server;
        async move {
            let token = server.token(&format!("u{r}"), &format!("room-{r}"));
            let mut client = server.connect(&server.url(&token)).await;
            client.next_snapshot().await;
            client
                .send(json!({"type":"shape_create","shapeType":"rectangle","x":r,"y":0,"width":1,"height":1}))
                .await;
            client.until(|s| shapes(s).len() == 1).await;
            client
        }
    });
    let mut clients = futures_util::future::join_all(joins).await;
    let mut latencies_ms = Vec::new();
    for _ in 0..DEGRADED_KILLS {
        tokio::time::sleep(BETWEEN_KILLS).await;
        let pid = server.status().await["workers"][0]["pid"].as_u64().unwrap() as u32;
        let killed = Instant::now();
        send_signal(pid, "KILL");
        let waits = clients.iter_mut().map(|c| async move {
            c.until(|s| shapes(s).len() == 1).await;
            killed.elapsed().as_secs_f64() * 1000.0
        });
        latencies_ms.extend(futures_util::future::join_all(waits).await);
    }
    latencies_ms
}

fn table(rows: &[(String, Vec<f64>)], header: &str) {
    println!("| {header} | samples | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    for (label, ms) in rows {
        let mut ms = ms.clone();
        ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "| {label} | {} | {:.1} | {:.1} | {:.1} |",
            ms.len(),
            percentile(&ms, 50.0),
            percentile(&ms, 99.0),
            ms[ms.len() - 1]
        );
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let chosen: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wants = |name: &str| chosen.is_empty() || chosen.iter().any(|c| c == name);
    if wants("big") {
        let (bytes, ms) = runtime.block_on(measure_big());
        table(
            &[(
                format!(
                    "1 room, {bytes} B snapshot, {BIG_MEMBERS} members editing at 40/s, {BIG_KILLS} kills"
                ),
                ms,
            )],
            "big room",
        );
    }
    if wants("degraded") {
        let ms = runtime.block_on(measure_degraded());
        table(
            &[(
                format!("{DEGRADED_ROOMS} degraded rooms, load wait 5 s, {DEGRADED_KILLS} kills"),
                ms,
            )],
            "degraded rooms",
        );
    }
    if !wants("rooms") {
        return;
    }
    println!(
        "| rooms on the killed worker | members | kills | samples | p50 ms | p99 ms | max ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    for rooms in [1, 10, 50] {
        let mut ms = runtime.block_on(measure(rooms));
        ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "| {rooms} | {} | {KILLS} | {} | {:.1} | {:.1} | {:.1} |",
            rooms * MEMBERS,
            ms.len(),
            percentile(&ms, 50.0),
            percentile(&ms, 99.0),
            ms[ms.len() - 1]
        );
    }
}
