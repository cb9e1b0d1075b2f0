//! A big room does not slow its neighbours (issue 24): while a member of a
//! 4 MB room moves at 144 Hz, a member of a small room on the same worker
//! still sees its own moves come back quickly. The big room's snapshots are
//! spaced by their size (`SNAPSHOT_BYTES_PER_ROOM_PER_SEC` in the worker).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4_mb_room_moving_at_144_hz_leaves_its_neighbour_s_latency_alone() {
    let server = Server::start_raw(&["--workers", "1"], &[("JWT_SECRET", SECRET)]);
    // The big room's members read everything they are sent, as a browser
    // would, but do not parse it: the test measures the server, not itself.
    let mut mover = server.raw_client("mover", "big", None).await;
    let mut watcher = server.raw_client("watcher", "big", None).await;
    let text = "板".repeat(20_000); // 60 KB
    for x in 0..70 {
        let create = json!({"type":"shape_create","shapeType":"text","x":x,"y":0,"width":1,"height":1,"text":text});
        mover.send_text(&create.to_string()).await;
        watcher.discard_for(Duration::from_millis(1)).await;
    }
    loop {
        let frame = mover.next_text_frame().await;
        if frame.payload.len() > 4_000_000 {
            break;
        }
    }
    let moving = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / 144.0));
        for t in 0..(144 * 6) {
            tick.tick().await;
            let moved = json!({"type":"cursor_move","x":t,"y":1});
            mover.send_text(&moved.to_string()).await;
            mover.discard_for(Duration::from_millis(1)).await;
        }
    });
    let watching = tokio::spawn(async move { watcher.discard_for(Duration::from_secs(7)).await });

    // The neighbour: its own cursor, 20 times a second, each move timed
    // until it comes back.
    let mut small = server.join("small", "neighbour").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut latencies = Vec::new();
    for i in 0..100 {
        let sent = Instant::now();
        small.send(json!({"type":"cursor_move","x":i,"y":2})).await;
        small.until(|s| s["cursors"][0]["x"] == i).await;
        latencies.push(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    latencies.sort();
    let at = |p: usize| latencies[latencies.len() * p / 100];
    let (p50, p95, p99) = (at(50), at(95), at(99));
    moving.await.unwrap();
    let big_bytes = watching.await.unwrap();
    eprintln!(
        "neighbour p50 {p50:?} p95 {p95:?} p99 {p99:?}; the big room's watcher got {} MB",
        big_bytes / 1_000_000
    );
    // The target (p99 < 25 ms) is a benchmark's, on a release build
    // (BENCHMARKS.md); here, in a debug build sharing two cores with other
    // tests, a bound the unspaced room breaks (p95 100-116 ms when measured).
    assert!(
        p95 < Duration::from_millis(60),
        "neighbour p50 {p50:?} p95 {p95:?} p99 {p99:?}"
    );
}
