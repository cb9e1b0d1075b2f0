//! What the real browser client does must just work (PROTOCOL.md §8): a mouse
//! at display rate while dragging, a paste of many shapes, a room filled in
//! acknowledged batches. No limit may lose or close such a client's work.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

/// The fastest display the real client meets: a cursor move per frame.
const MOUSE_HZ: u32 = 240;
/// While a shape is dragged the client sends it every 50 ms.
const DRAG_HZ: u32 = 20;

#[tokio::test]
async fn a_mouse_at_240_hz_while_dragging_for_15_s_stays_connected_and_nothing_is_lost() {
    let server = Server::start(&[]);
    let mut mover = server.join("mover", "drag").await;
    let mut watcher = server.join("watcher", "drag").await;
    mover
        .send(json!({"type":"shape_create","shapeType":"rectangle","x":0,"y":0,"width":50,"height":40}))
        .await;
    let snap = watcher.until(|s| shapes(s).len() == 1).await;
    let shape_id = shapes(&snap)[0]["id"].as_str().unwrap().to_owned();

    // Cursor moves on a 240 Hz clock, a shape update every 12th tick (20/s),
    // reading between ticks as a browser does.
    let seconds = 15;
    let ticks = MOUSE_HZ * seconds;
    let start = tokio::time::Instant::now();
    let (mut moves, mut updates) = (0u32, 0u32);
    for tick in 0..ticks {
        let (x, y) = (f64::from(tick), f64::from(tick % 500));
        mover.send(json!({"type":"cursor_move","x":x,"y":y})).await;
        moves += 1;
        if tick % (MOUSE_HZ / DRAG_HZ) == 0 || tick == ticks - 1 {
            mover
                .send(json!({"type":"shape_update","shapeId":shape_id,"x":x,"y":y}))
                .await;
            updates += 1;
        }
        let next = start + Duration::from_secs_f64(f64::from(tick + 1) / f64::from(MOUSE_HZ));
        mover
            .read_for(next.saturating_duration_since(tokio::time::Instant::now()))
            .await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    assert!(
        elapsed < f64::from(seconds) * 1.5,
        "the sender fell behind: {elapsed:.1} s"
    );
    eprintln!(
        "sent {moves} cursor moves and {updates} shape updates in {elapsed:.1} s ({:.0}/s)",
        f64::from(moves + updates) / elapsed
    );

    // The other member ends on the final cursor and the final shape position.
    let last = f64::from(ticks - 1);
    let end = watcher
        .until(|s| {
            s["cursors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["userId"] == "mover" && c["x"] == last)
                && shapes(s)[0]["x"] == last
        })
        .await;
    assert_eq!(shapes(&end)[0]["y"], f64::from((ticks - 1) % 500));
    // Still connected, both of them, and nothing was held back or folded.
    let snap = mover.sync("mover", -1.0).await;
    assert_eq!(users(&snap), ["mover", "watcher"]);
    assert_eq!(
        metric(&server, "session_server_frames_rate_limited_total").await,
        0.0
    );
    assert_eq!(
        metric(&server, "session_server_cursor_moves_folded_total").await,
        0.0
    );
}

fn create(i: usize) -> String {
    json!({"type":"shape_create","shapeType":"rectangle","x":i,"y":0,"width":10,"height":10})
        .to_string()
}

#[tokio::test]
async fn a_paste_of_1000_shapes_in_one_burst_arrives_whole_and_in_order() {
    let server = Server::start(&[]);
    let mut paster = server.join("paster", "paste").await;
    paster.send_burst((0..1000).map(create).collect()).await;
    let snap = paster.until(|s| shapes(s).len() == 1000).await;
    let xs: Vec<u64> = shapes(&snap)
        .iter()
        .map(|s| s["x"].as_u64().unwrap())
        .collect();
    assert_eq!(xs, (0..1000).collect::<Vec<u64>>());
}

#[tokio::test]
async fn twice_the_burst_is_slowed_down_not_dropped() {
    // A budget of 100/s with bursts of 50: 300 creates in one go must all arrive,
    // in order, the ones beyond the burst paced by the budget.
    let server = Server::start(&["--rate-limit-per-sec", "100", "--rate-limit-burst", "50"]);
    let mut paster = server.join("paster", "paste").await;
    let start = Instant::now();
    paster.send_burst((0..300).map(create).collect()).await;
    let snap = paster.until(|s| shapes(s).len() == 300).await;
    let took = start.elapsed();
    let xs: Vec<u64> = shapes(&snap)
        .iter()
        .map(|s| s["x"].as_u64().unwrap())
        .collect();
    assert_eq!(xs, (0..300).collect::<Vec<u64>>());
    // 250 beyond the burst at 100/s: about 2.5 s (the budget was really applied).
    assert!(took >= Duration::from_millis(2000), "{took:?}");
    assert!(metric(&server, "session_server_frames_rate_limited_total").await >= 200.0);
    assert_eq!(
        metric(
            &server,
            "session_server_connections_rejected_total{reason=\"rate_limit\"}"
        )
        .await,
        0.0
    );
}

#[tokio::test]
async fn a_room_fills_to_1000_shapes_in_acknowledged_batches_of_20() {
    let server = Server::start(&[]);
    let mut filler = server.join("filler", "fill").await;
    for batch in 0..50 {
        filler
            .send_burst((batch * 20..(batch + 1) * 20).map(create).collect())
            .await;
        filler.until(|s| shapes(s).len() == (batch + 1) * 20).await;
    }
    // The cap still holds: one more is ignored.
    filler.send_text(&create(1000)).await;
    let snap = filler.sync("filler", 7.0).await;
    assert_eq!(shapes(&snap).len(), 1000);
}
