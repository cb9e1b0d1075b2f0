//! Connections that stop answering: idle clients are pinged and silent ones
//! dropped; a user's second connection is refused while the first is alive and
//! replaces it once the first stopped answering (PROTOCOL.md §8: a reconnect
//! after the network dropped must just work).

use std::time::{Duration, Instant};

use clap::Parser;
use contract::config::Cli;
use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn idle_clients_are_pinged_and_silent_ones_dropped() {
    let server = Server::start(&["--ping-interval-ms", "500"]);
    let mut watcher = server.join("watcher", "r1").await;
    // A client that never reads never answers pings.
    let silent = server.join("silent", "r1").await;
    watcher.until(|s| users(s) == ["watcher", "silent"]).await;
    let snap = watcher.until(|s| users(s) == ["watcher"]).await;
    assert_eq!(users(&snap), ["watcher"]);
    // The watcher, idle but reading (so answering pings), is still connected.
    assert_eq!(watcher.read_for(Duration::from_millis(2000)).await, 0);
    assert_eq!(users(&watcher.sync("watcher", 1.0).await), ["watcher"]);
    drop(silent);
}

#[tokio::test]
async fn a_duplicate_user_is_closed_and_the_original_untouched() {
    let server = Server::start(&[]);
    let mut alice = server.join("alice", "r1").await;
    // The original is a live client: it keeps reading, and so answers the ping
    // that the duplicate's arrival triggers (a silent one would be replaced).
    let reading = tokio::spawn(async move {
        alice.read_for(Duration::from_secs(1)).await;
        alice
    });
    let mut alice2 = server
        .connect(&server.url(&server.token("alice", "r1")))
        .await;
    assert_eq!(
        alice2.closed().await,
        Closed::Frame(1008, "Duplicate user".into())
    );
    let mut alice = reading.await.unwrap();
    // The original still receives snapshots: bob's join reaches her.
    let _bob = server.join("bob", "r1").await;
    let snap = alice.until(|s| users(s) == ["alice", "bob"]).await;
    assert_eq!(users(&snap), ["alice", "bob"]);
    let snap = alice.sync("alice", 3.0).await;
    assert_eq!(users(&snap), ["alice", "bob"]);
    // Once the first connection has closed, the user can join again.
    alice.close().await;
    let mut again = server
        .connect(&server.url(&server.token("alice", "r1")))
        .await;
    let snap = again
        .until(|s| users(s).contains(&"alice".to_owned()))
        .await;
    assert_eq!(users(&snap), ["bob", "alice"]);
}

/// An earlier connection of the same user gets 2 s to answer by default (README
/// "Limits and security"); the test below shortens it with the flag.
#[test]
fn by_default_an_earlier_connection_gets_two_seconds_to_answer() {
    let serve = Cli::try_parse_from(["session-server"]).unwrap().serve;
    assert_eq!(serve.takeover_wait_ms, 2_000);
}

#[tokio::test]
async fn a_connection_that_stopped_answering_is_replaced_by_its_user_s_new_one() {
    const TAKEOVER_WAIT: Duration = Duration::from_millis(800);
    let server = Server::start(&["--takeover-wait-ms", "800"]);
    // The ghost: its network vanished, so it never reads or answers again.
    let mut ghost = server.join("alice", "lost").await;
    let mut bob = server.join("bob", "lost").await;
    // Silent for longer than the takeover wait (a connection heard from within
    // it counts as alive without being asked).
    tokio::time::sleep(TAKEOVER_WAIT + Duration::from_millis(100)).await;

    let start = Instant::now();
    let mut again = server
        .connect(&server.url(&server.token("alice", "lost")))
        .await;
    let snap = again.next_snapshot().await;
    let took = start.elapsed();
    assert!(
        took < TAKEOVER_WAIT + Duration::from_secs(1),
        "replaced after {took:?}"
    );
    assert!(
        took >= TAKEOVER_WAIT * 3 / 4,
        "the ghost was given its time: {took:?}"
    );
    assert_eq!(users(&snap), ["bob", "alice"]);
    bob.until(|s| users(s) == ["bob", "alice"]).await;
    // The new connection is a full member.
    again.send(json!({"type":"cursor_move","x":5,"y":6})).await;
    bob.until(|s| {
        s["cursors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["userId"] == "alice" && c["x"] == 5)
    })
    .await;
    // Had the ghost come back, it would find itself closed with a clear reason.
    assert_eq!(
        ghost.closed().await,
        Closed::Frame(4000, "Replaced by a new connection".into())
    );
    assert_eq!(
        metric(&server, "session_server_connections_replaced_total").await,
        1.0
    );
}

#[tokio::test]
async fn a_live_connection_is_not_replaced_and_the_new_one_is_refused() {
    let server = Server::start(&[]);
    let mut alive = server.join("carol", "kept").await;
    // Carol's first page keeps reading (and so answers pings) meanwhile.
    let reader = tokio::spawn(async move {
        alive.read_for(Duration::from_secs(3)).await;
        alive
    });
    let start = Instant::now();
    let mut second = server
        .connect(&server.url(&server.token("carol", "kept")))
        .await;
    assert_eq!(
        second.closed().await,
        Closed::Frame(1008, "Duplicate user".into())
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let mut alive = reader.await.unwrap();
    let snap = alive.sync("carol", 9.0).await;
    assert_eq!(users(&snap), ["carol"]);
    assert_eq!(
        metric(
            &server,
            "session_server_connections_rejected_total{reason=\"duplicate_user\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(&server, "session_server_connections_replaced_total").await,
        0.0
    );
}

#[tokio::test]
async fn a_reload_whose_old_socket_closes_meanwhile_just_joins() {
    let server = Server::start(&[]);
    let old = server.join("dave", "reload").await;
    let url = server.url(&server.token("dave", "reload"));
    let (new, ()) = tokio::join!(server.connect(&url), old.close());
    let mut new = new;
    let snap = new.until(|s| users(s) == ["dave"]).await;
    assert_eq!(users(&snap), ["dave"]);
}

#[tokio::test]
async fn a_connection_heard_from_just_now_is_kept_without_waiting_for_a_ping() {
    let server = Server::start(&[]);
    let mut busy = server.join("erin", "recent").await;
    // Erin just moved her mouse; her client is busy and does not read right now.
    busy.send(json!({"type":"cursor_move","x":1,"y":1})).await;
    let start = Instant::now();
    let mut second = server
        .connect(&server.url(&server.token("erin", "recent")))
        .await;
    assert_eq!(
        second.closed().await,
        Closed::Frame(1008, "Duplicate user".into())
    );
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    let snap = busy.sync("erin", 2.0).await;
    assert_eq!(users(&snap), ["erin"]);
}
