//! Where rooms go: spread over separate worker processes, and refused with `503`
//! when the server is full (its workers' room budget, or Hathora's rooms per
//! process), while existing rooms still take members.

use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn rooms_are_spread_over_separate_worker_processes() {
    let server = Server::start(&[]);
    let _a = server.join("alice", "room-a").await;
    let _b = server.join("bob", "room-b").await;
    let status = server.status().await;
    let workers = status["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    let pids: Vec<u32> = workers
        .iter()
        .map(|w| w["pid"].as_u64().unwrap() as u32)
        .collect();
    assert_ne!(pids[0], pids[1]);
    for pid in &pids {
        assert_ne!(*pid, server.pid());
        assert!(process_exists(*pid), "worker {pid} is a live process");
    }
    let mut rooms: Vec<&str> = workers
        .iter()
        .map(|w| {
            assert_eq!(w["rooms"].as_array().unwrap().len(), 1, "{status}");
            w["rooms"][0].as_str().unwrap()
        })
        .collect();
    rooms.sort();
    assert_eq!(rooms, ["room-a", "room-b"]);
}

#[tokio::test]
async fn new_rooms_are_refused_with_503_when_every_worker_is_full() {
    let server = Server::start_raw(
        &["--workers", "2", "--rooms-per-worker", "1"],
        &[("JWT_SECRET", SECRET)],
    );
    let a = server.join("alice", "room-a").await;
    let _b = server.join("bob", "room-b").await;
    let refused = server
        .try_connect(&server.url(&server.token("carol", "room-c")))
        .await;
    assert_eq!(refused.err(), Some(503));
    // An existing room still takes members.
    let _a2 = server.join("dave", "room-a").await;
    // Once a room is empty and freed, its capacity is available again.
    a.close().await;
    drop(_a2);
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        match server
            .try_connect(&server.url(&server.token("carol", "room-c")))
            .await
        {
            Ok(mut c) => {
                assert_eq!(users(&c.next_snapshot().await), ["carol"]);
                break;
            }
            Err(503) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(code) => panic!("still refused with {code}"),
        }
    }
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
    server
        .logged("the server holds its maximum of 2 rooms")
        .await;
    assert!(
        server.logs().contains("hathora_process_id=\"proc-7\"")
            || server.logs().contains("hathora_process_id=proc-7")
    );
    let (_, body) = server.get("/metrics").await;
    assert!(body.contains("hathora_process_id=\"proc-7\""), "{body}");
    assert!(body.contains("session_server_connections_rejected_total{reason=\"no_capacity\",hathora_process_id=\"proc-7\"} 1")
        || body.contains("session_server_connections_rejected_total{hathora_process_id=\"proc-7\",reason=\"no_capacity\"} 1"), "{body}");
}
