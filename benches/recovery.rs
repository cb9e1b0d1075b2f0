//! Recovery time after a worker is killed: from the SIGKILL to the first
//! post-recovery snapshot at each client, for 1, 10 and 50 rooms of 10 members
//! on the killed worker. Run with `cargo bench --bench recovery`.
//!
//! The server is the release binary, started on loopback with one worker so every
//! room is on the killed one. Kills are spaced past the supervisor's crash-loop
//! window, so every replacement starts at once (as after an isolated crash).

#[path = "../tests/util/mod.rs"]
mod util;

use std::time::{Duration, Instant};

use serde_json::json;
use util::*;

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

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
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
