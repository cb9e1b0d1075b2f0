//! Worker crashes (DESIGN.md properties 2 and 3): clients stay connected, rooms
//! come back exactly as they were, and workers never
//! outlive their supervisor. Faults in the supervisor–worker link: a big room
//! killed while its members edit recovers (the IPC cannot deadlock), degraded
//! rooms restore in parallel, and a worker that stops answering is replaced.

mod crash_loops;
mod journal;
mod orphans;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::backend::{BACKEND_SECRET, Backend, Mode};
use crate::support::*;

fn rect(x: i64) -> Value {
    json!({"type":"shape_create","shapeType":"rectangle","x":x,"y":0,"width":10,"height":10})
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
    let new_pid = wait_replaced_within(&server, index, old_pid, PATIENCE).await;
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
    server
        .logged(&format!("pid {old_pid} exit status: signal: 9 (SIGKILL)"))
        .await;
    server.logged("restoring its rooms on a replacement").await;
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
        wait_replaced_within(&server, index, pid, PATIENCE).await;
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

/// Bound on each whole test: a deadlock fails it instead of hanging the suite.
const TEST_BOUND: Duration = Duration::from_secs(120);

/// Kills a process this test stopped, if it still runs when the test ends (a
/// stopped worker would never notice its supervisor is gone).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if process_exists(self.0) {
            let _ = std::process::Command::new("kill")
                .arg("-KILL")
                .arg(self.0.to_string())
                .status();
        }
    }
}

async fn bounded(test: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(TEST_BOUND, test)
        .await
        .expect("test finished within its bound (a hang here is a deadlock)");
}

const BIG_SHAPES: usize = 300;
const TEXT_CHARS: usize = 1000;
const MEMBERS: usize = 5;
/// Each member's updates, at [`EDIT_EVERY`]: 4 s of editing at 40 updates/s.
const EDITS: i64 = 160;
const EDIT_EVERY: Duration = Duration::from_millis(25);
/// Every this many updates a member also creates a small shape.
const CREATE_EVERY: i64 = 20;
/// When the worker is killed, after the editing starts: by then the journal
/// holds ~2 s of updates carrying 1,000-character texts (~400 KB, more than the
/// socket buffer).
const KILL_AFTER: Duration = Duration::from_secs(2);

/// A ~360 KB room whose 5 members edit texts at 40 updates/s each while its
/// worker is killed: the restore writes a checkpoint and journal larger than the
/// socket buffer while the new worker writes 360 KB snapshots (both directions
/// full at once). The room recovers with
/// every update and every shape, and a room placed afterwards works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_room_killed_under_concurrent_edits_recovers_and_loses_nothing() {
    bounded(async {
        let server = Server::start_raw(&["--workers", "1"], &[("JWT_SECRET", SECRET)]);
        let mut members = Vec::new();
        for m in 0..MEMBERS {
            members.push(server.join(&format!("u{m}"), "big").await);
        }
        members[0]
            .send_burst(text_shape_creates(BIG_SHAPES, TEXT_CHARS))
            .await;
        let mut full = Value::Null;
        for member in members.iter_mut() {
            full = member.until(|s| shapes(s).len() == BIG_SHAPES).await;
        }
        let snapshot_bytes = full.to_string().len();
        assert!(snapshot_bytes > 350_000, "snapshot of {snapshot_bytes} bytes");
        let targets: Vec<String> = shapes(&full)[..MEMBERS]
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect();

        let old_pid = worker_pids_or_zero(&server).await[0];
        let mut editors = Vec::new();
        for (m, mut member) in members.into_iter().enumerate() {
            let target = targets[m].clone();
            editors.push(tokio::spawn(async move {
                let mut texts = Vec::new();
                for k in 1..=EDITS {
                    // Typing into a text shape: each update carries the text.
                    let text = format!("{k:04}{}", "e".repeat(TEXT_CHARS - 4));
                    texts.push(
                        json!({"type":"shape_update","shapeId":target,"x":k * 10 + m as i64,"text":text})
                            .to_string(),
                    );
                    if k % CREATE_EVERY == 0 {
                        texts.push(rect(100_000 + m as i64 * 1000 + k).to_string());
                    }
                }
                member.send_paced(texts, EDIT_EVERY).await;
                member
            }));
        }
        tokio::time::sleep(KILL_AFTER).await;
        send_signal(old_pid, "KILL");
        let mut members = Vec::new();
        for editor in editors {
            members.push(editor.await.expect("editor ran"));
        }
        wait_replaced_within(&server, 0, old_pid, Duration::from_secs(30)).await;

        // Each member's frames are applied once its marker shows; in turn, so
        // the last one's snapshot holds everyone's frames.
        let mut last = Value::Null;
        for (m, member) in members.iter_mut().enumerate() {
            last = member.sync(&format!("u{m}"), 1e6 + m as f64).await;
        }
        let all = shapes(&last);
        assert_eq!(all.len(), BIG_SHAPES + MEMBERS * (EDITS / CREATE_EVERY) as usize);
        for (m, target) in targets.iter().enumerate() {
            let shape = all.iter().find(|s| s["id"] == target.as_str()).unwrap();
            assert_eq!(shape["x"], EDITS * 10 + m as i64, "u{m}'s last update");
            assert!(shape["text"].as_str().unwrap().starts_with(&format!("{EDITS:04}e")));
        }
        let xs: HashSet<i64> = all.iter().map(|s| s["x"].as_i64().unwrap()).collect();
        for m in 0..MEMBERS as i64 {
            for k in (CREATE_EVERY..=EDITS).step_by(CREATE_EVERY as usize) {
                assert!(xs.contains(&(100_000 + m * 1000 + k)), "u{m}'s shape {k}");
            }
        }
        for (i, shape) in all[MEMBERS..BIG_SHAPES].iter().enumerate() {
            let i = i + MEMBERS;
            assert!(shape["text"].as_str().unwrap().starts_with(&format!("{i:04}t")));
        }
        let ids: HashSet<&str> = all.iter().map(|s| s["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), all.len(), "ids unique");
        // Every member ends on that same newest snapshot.
        for member in members.iter_mut() {
            let seen: Value = serde_json::from_str(member.last.as_deref().unwrap()).unwrap();
            if seen != last {
                member.until(|s| *s == last).await;
            }
        }

        // The replacement serves new rooms too.
        let mut newcomer = server.join("nora", "after").await;
        newcomer.send(rect(1)).await;
        newcomer.until(|s| shapes(s).len() == 1).await;
        assert_eq!(server.status().await["workers"][0]["restarts"], 1);
    })
    .await;
}

const DEGRADED_ROOMS: usize = 10;
const LOAD_WAIT_MS: u64 = 1000;

/// Ten degraded rooms (their store is down, so each restore waits
/// `--load-wait-ms` for a load) come back after a worker kill in about the time
/// of one, each with its shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degraded_rooms_restore_in_parallel() {
    bounded(async {
        let backend = Backend::start().await;
        backend.set_mode(Mode::Fail);
        let load_wait = LOAD_WAIT_MS.to_string();
        let server = Server::on_backend(&backend, &["--load-wait-ms", &load_wait], &[]);
        let joins = (0..DEGRADED_ROOMS).map(|r| {
            let server = &server;
            async move {
                let token = server.token(&format!("u{r}"), &format!("room-{r}"));
                let mut client = server.connect(&server.url(&token)).await;
                let degraded = client.next_snapshot().await;
                assert_eq!(degraded["shapes"], json!([]), "admitted degraded");
                client.send(rect(r as i64)).await;
                client.until(|s| shapes(s).len() == 1).await;
                client
            }
        });
        let mut clients = futures_util::future::join_all(joins).await;

        let pid = worker_pids_or_zero(&server).await[0];
        send_signal(pid, "KILL");
        let killed = Instant::now();
        // One at a time would take DEGRADED_ROOMS × the load wait (10 s).
        let bound = Duration::from_millis(LOAD_WAIT_MS * 4);
        let waits = clients
            .iter_mut()
            .enumerate()
            .map(|(r, client)| async move {
                let snap = tokio::time::timeout(bound, client.next_snapshot())
                    .await
                    .unwrap_or_else(|_| panic!("room-{r} not back within {bound:?} of the kill"));
                let at = killed.elapsed();
                let xs: Vec<i64> = shapes(&snap)
                    .iter()
                    .map(|s| s["x"].as_i64().unwrap())
                    .collect();
                assert_eq!(xs, [r as i64], "room-{r} came back with its shape");
                at
            });
        let times = futures_util::future::join_all(waits).await;
        let slowest = times.iter().max().unwrap();
        eprintln!("degraded rooms back after {times:?}");
        assert!(
            *slowest < bound,
            "{DEGRADED_ROOMS} degraded rooms took {slowest:?} to come back (bound {bound:?})"
        );
    })
    .await;
}

/// A worker that stops answering (SIGSTOP) is noticed, `/readyz` turns 503, the
/// worker is killed and replaced, its room comes back with its state and the
/// frame sent meanwhile, and `/readyz` is 200 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_is_killed_and_replaced() {
    bounded(async {
        let server = Server::start(&[]);
        // Placed in turn on the least loaded worker: "stuck" ends on the worker
        // with fewer rooms, where a new room would go next.
        let _other_1 = server.join("carol", "other-1").await;
        let mut alice = server.join("alice", "stuck").await;
        let _other_2 = server.join("dave", "other-2").await;
        for x in 0..2 {
            alice.send(rect(x)).await;
        }
        let before = alice.until(|s| shapes(s).len() == 2).await;
        let index = worker_of(&server, "stuck").await;
        let pid = worker_pids_or_zero(&server).await[index];
        assert_eq!(server.get("/readyz").await.0, 200);

        send_signal(pid, "STOP");
        let _cleanup = KillOnDrop(pid);
        let stopped = Instant::now();
        alice.send(rect(2)).await;
        // Noticed: /readyz says so well before the worker is replaced.
        loop {
            let (code, body) = server.get("/readyz").await;
            if code == 503 {
                assert!(body.contains("not answering"), "{body}");
                break;
            }
            assert!(
                stopped.elapsed() < Duration::from_secs(10),
                "/readyz still 200 after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Meanwhile a new room goes to the worker that answers, and is served
        // at once.
        let joined = Instant::now();
        let _fresh = server.join("erin", "fresh").await;
        assert!(
            joined.elapsed() < Duration::from_secs(1),
            "{:?}",
            joined.elapsed()
        );
        assert_ne!(worker_of(&server, "fresh").await, index);
        wait_replaced_within(&server, index, pid, Duration::from_secs(20)).await;
        while process_exists(pid) {
            assert!(
                stopped.elapsed() < Duration::from_secs(20),
                "stopped worker still there"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let after = alice.until(|s| shapes(s).len() == 3).await;
        assert_eq!(shapes(&after)[..2], shapes(&before)[..]);
        assert_eq!(shapes(&after)[2]["x"], 2);
        let ready_by = Instant::now() + Duration::from_secs(10);
        while server.get("/readyz").await.0 != 200 {
            assert!(
                Instant::now() < ready_by,
                "/readyz not 200 after the replacement"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server.logged("worker stopped answering; killing it").await;
        server.logged("exit status: signal: 9 (SIGKILL)").await;
    })
    .await;
}
