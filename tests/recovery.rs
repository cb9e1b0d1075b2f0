//! Worker crashes (DESIGN.md properties 2 and 3): clients stay connected, rooms
//! come back exactly as they were, a poison room is isolated, and workers never
//! outlive their supervisor.

mod util;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use util::backend::{BACKEND_SECRET, Backend};
use util::*;

fn rect(x: i64) -> Value {
    json!({"type":"shape_create","shapeType":"rectangle","x":x,"y":0,"width":10,"height":10})
}

/// Waits until worker `index` runs a process other than `old_pid`.
async fn wait_replaced(server: &Server, index: usize, old_pid: u32) -> u32 {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let pid = worker_pids_or_zero(server).await[index];
        if pid != 0 && pid != old_pid {
            return pid;
        }
        assert!(Instant::now() < deadline, "worker {index} not replaced");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_a_killed_worker_s_rooms_stay_connected_and_lose_nothing() {
    let server = Server::start(&[]);
    let mut alice = server.join("alice", "room-a").await;
    let mut bob = server.join("bob", "room-a").await;
    let mut carol = server.join("carol", "room-b").await; // on the other worker
    for x in 0..5 {
        alice.send(rect(x)).await;
    }
    alice.send(json!({"type":"cursor_move","x":7,"y":8})).await;
    bob.send(json!({"type":"shape_update","shapeId":"none","x":1}))
        .await;
    let before = alice
        .until(|s| shapes(s).len() == 5 && !s["cursors"].as_array().unwrap().is_empty())
        .await;
    carol.send(rect(100)).await;
    let carol_before = carol.until(|s| shapes(s).len() == 1).await;

    let index = worker_of(&server, "room-a").await;
    let old_pid = worker_pids_or_zero(&server).await[index];
    send_signal(old_pid, "KILL");
    // Frames sent during the recovery are held and applied after it, in order.
    for x in 5..8 {
        bob.send(rect(x)).await;
    }
    let new_pid = wait_replaced(&server, index, old_pid).await;
    assert!(process_exists(new_pid));

    // Nobody saw a close (a close makes these calls panic), everyone gets a
    // snapshot again, and the room is exactly as before plus the new shapes.
    let after = alice.until(|s| shapes(s).len() == 8).await;
    assert_eq!(shapes(&after)[..5], shapes(&before)[..]);
    let xs: Vec<i64> = shapes(&after)
        .iter()
        .map(|s| s["x"].as_i64().unwrap())
        .collect();
    assert_eq!(xs, [0, 1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(users(&after), ["alice", "bob"]);
    assert_eq!(after["cursors"], before["cursors"]);
    let bob_view = bob.until(|s| shapes(s).len() == 8).await;
    assert_eq!(bob_view["shapes"], after["shapes"]);
    // The room goes on: new shapes get new ids, members can still leave and join.
    alice.send(rect(8)).await;
    let later = bob.until(|s| shapes(s).len() == 9).await;
    let ids: std::collections::HashSet<&str> = shapes(&later)
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 9);
    // The other worker's room was never touched.
    assert_eq!(
        carol.sync("carol", 1.0).await["shapes"],
        carol_before["shapes"]
    );
    let status = server.status().await;
    assert_eq!(status["workers"][index]["restarts"], 1);
    let logs = server.logs();
    assert!(
        logs.contains(&format!("pid {old_pid} exit status: signal: 9 (SIGKILL)")),
        "{logs}"
    );
    assert!(logs.contains("restoring its rooms on a replacement"));
}

/// 20 kills of random workers while rooms on every worker are being edited: at
/// the end the clients, the store (after a final save) and a model of every
/// frame sent agree exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kills_under_load_lose_nothing() {
    const ROOMS: usize = 6;
    const SHAPES_PER_ROOM: i64 = 120;
    let backend = Backend::start().await;
    for r in 0..ROOMS {
        backend.create_board(&format!("room-{r}"), json!([]));
    }
    let url = backend.url();
    let server = Server::start_raw(
        &[
            "--workers",
            "3",
            "--backend-url",
            url.as_str(),
            "--persist-debounce-ms",
            "100",
            "--persist-max-wait-ms",
            "300",
        ],
        &[
            ("JWT_SECRET", SECRET),
            ("SESSION_SERVER_SECRET", BACKEND_SECRET),
        ],
    );
    let mut clients = Vec::new();
    for r in 0..ROOMS {
        clients.push(
            server
                .join(&format!("user-{r}"), &format!("room-{r}"))
                .await,
        );
    }
    // Writers: each room's client creates shapes x = 0, 1, 2, … at a steady pace.
    let mut writers = Vec::new();
    for (r, mut client) in clients.into_iter().enumerate() {
        writers.push(tokio::spawn(async move {
            for x in 0..SHAPES_PER_ROOM {
                client.send(rect(x)).await;
                if x % 10 == 0 {
                    client.send(json!({"type":"cursor_move","x":x,"y":r})).await;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            client
        }));
    }
    // Killer: 20 kills of random workers, each after the previous replacement is up.
    let mut rng_state = 0x2545F4914F6CDD1Du64;
    let mut kills = 0;
    while kills < 20 {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        let index = (rng_state % 3) as usize;
        let pid = worker_pids_or_zero(&server).await[index];
        if pid == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        send_signal(pid, "KILL");
        kills += 1;
        wait_replaced(&server, index, pid).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut clients = Vec::new();
    for w in writers {
        clients.push(w.await.unwrap());
    }
    // The model: each room holds exactly the shapes its client created, in order.
    let model: Vec<i64> = (0..SHAPES_PER_ROOM).collect();
    let mut finals = HashMap::new();
    for (r, client) in clients.iter_mut().enumerate() {
        let user = format!("user-{r}");
        let snap = client.sync(&user, 12345.0).await;
        let xs: Vec<i64> = shapes(&snap)
            .iter()
            .map(|s| s["x"].as_i64().unwrap())
            .collect();
        assert_eq!(xs, model, "room-{r}");
        assert!(shapes(&snap).iter().all(|s| s["userId"] == user.as_str()));
        let ids: std::collections::HashSet<&str> = shapes(&snap)
            .iter()
            .map(|s| s["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), model.len(), "ids unique in room-{r}");
        finals.insert(r, snap["shapes"].clone());
    }
    // Final save: every member leaves; the store then holds exactly what clients saw.
    for client in clients {
        client.close().await;
    }
    for (r, shapes) in finals {
        let stored = backend
            .wait_for_shapes(&format!("room-{r}"), PATIENCE, |s| *s == shapes)
            .await;
        assert_eq!(stored, shapes);
    }
    let restarts: u64 = server.status().await["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["restarts"].as_u64().unwrap())
        .sum();
    assert_eq!(restarts, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_room_is_closed_alone_and_everything_else_recovers() {
    let server = Server::start_raw(
        &["--workers", "2"],
        &[("JWT_SECRET", SECRET), ("SESSION_SERVER_TEST_POISON", "1")],
    );
    // Placement is least-loaded first: poison → w0, elsewhere → w1, neighbour → w0.
    let mut poisoner = server.join("mallory", "poison").await;
    let mut elsewhere = server.join("erin", "elsewhere").await;
    let mut neighbour = server.join("nina", "neighbour").await;
    assert_eq!(
        worker_of(&server, "poison").await,
        worker_of(&server, "neighbour").await
    );
    assert_ne!(
        worker_of(&server, "poison").await,
        worker_of(&server, "elsewhere").await
    );
    neighbour.send(rect(1)).await;
    let neighbour_before = neighbour.until(|s| shapes(s).len() == 1).await;
    let elsewhere_pid = worker_pids_or_zero(&server).await[worker_of(&server, "elsewhere").await];

    poisoner
        .send(json!({"type":"cursor_move","x":1,"y":1,"note":"__poison_test_frame__"}))
        .await;
    assert_eq!(
        poisoner.closed().await,
        Closed::Frame(1011, "Room closed: it repeatedly crashed the server".into())
    );
    // The neighbour on the same worker recovers with its state; no close seen.
    neighbour.send(rect(2)).await;
    let after = neighbour.until(|s| shapes(s).len() == 2).await;
    assert_eq!(shapes(&after)[0], shapes(&neighbour_before)[0]);
    // The other worker was never touched.
    assert_eq!(
        worker_pids_or_zero(&server).await[worker_of(&server, "elsewhere").await],
        elsewhere_pid
    );
    assert_eq!(users(&elsewhere.sync("erin", 2.0).await), ["erin"]);
    assert!(server.logs().contains("room closed for its members (1011)"));
    let rooms: Vec<Value> = server.status().await["workers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["rooms"].as_array().unwrap().clone())
        .collect();
    assert!(!rooms.contains(&json!("poison")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_exit_within_a_second_of_their_supervisor() {
    let mut server = Server::start(&[]);
    let _alice = server.join("alice", "r1").await;
    let pids = worker_pids_or_zero(&server).await;
    assert!(pids.iter().all(|p| process_exists(*p)));
    server.signal("KILL");
    let killed = Instant::now();
    tokio::task::block_in_place(|| server.wait_exit(PATIENCE));
    for pid in pids {
        while process_exists(pid) {
            assert!(
                killed.elapsed() < Duration::from_secs(1),
                "worker {pid} outlived its supervisor"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
