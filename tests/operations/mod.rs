//! Operating the server: metrics that count what happened, JSON logs, the
//! operational endpoints and the room monitor behind the admin token, health
//! for load balancers; shutdown in `shutdown`, TLS in `tls`, the deployment
//! manifests in `deploy`, the Agones lifecycle in `agones` (a fake SDK server) and
//! `agones_local` (Agones' own SDK server in local mode).

mod agones;
mod agones_local;
mod deploy;
mod shutdown;
mod tls;

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_scripted_session() {
    let server = Server::start(&[
        "--persist-debounce-ms",
        "100",
        "--persist-max-wait-ms",
        "200",
    ]);
    let mut alice = server.join("alice", "r1").await;
    let _bob = server.join("bob", "r1").await;
    assert_eq!(
        server.try_connect(&server.url("not-a-token")).await.err(),
        Some(401)
    );
    assert_eq!(server.get("/").await.0, 426);
    for x in 0..3 {
        alice
            .send(
                json!({"type":"shape_create","shapeType":"oval","x":x,"y":0,"width":1,"height":1}),
            )
            .await;
    }
    alice.send(json!({"type":"cursor_move","x":1,"y":1})).await;
    alice.send_text("garbage").await;
    alice
        .send(json!({"type":"shape_update","shapeId":"missing","x":1}))
        .await;
    alice.sync("alice", 42.0).await; // one more cursor_move
    // Workers report counts every second; saves follow the 100 ms debounce.
    let deadline = Instant::now() + PATIENCE;
    let m = loop {
        let m = metrics(&server).await;
        let framed = m.get("session_server_frames_in_total{type=\"cursor_move\"}") == Some(&2.0);
        let saved = m
            .get("session_server_saves_total{result=\"ok\"}")
            .is_some_and(|v| *v >= 1.0);
        if framed && saved {
            break m;
        }
        assert!(Instant::now() < deadline, "metrics never caught up: {m:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let get = |k: &str| {
        m.get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in {m:?}"))
    };
    assert_eq!(get("session_server_connections"), 2.0);
    assert_eq!(get("session_server_connections_accepted_total"), 2.0);
    assert_eq!(
        get("session_server_connections_rejected_total{reason=\"unauthorized\"}"),
        1.0
    );
    assert_eq!(
        get("session_server_connections_rejected_total{reason=\"not_websocket\"}"),
        1.0
    );
    assert_eq!(
        get("session_server_frames_in_total{type=\"shape_create\"}"),
        3.0
    );
    assert_eq!(
        get("session_server_frames_ignored_total{reason=\"malformed\"}"),
        1.0
    );
    assert_eq!(
        get("session_server_frames_ignored_total{reason=\"unknown_shape\"}"),
        1.0
    );
    assert_eq!(get("session_server_rooms"), 1.0);
    assert_eq!(get("session_server_workers_up"), 2.0);
    let saves = get("session_server_saves_total{result=\"ok\"}");
    assert_eq!(get("session_server_save_duration_seconds_count"), saves);
    assert!(get("session_server_snapshots_sent_total") >= 2.0);
    assert!(get("session_server_snapshot_bytes_total") > 100.0);
    assert_eq!(
        get("session_server_fanout_latency_seconds_count"),
        get("session_server_snapshots_sent_total")
    );
    let ipc_depth: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("session_server_ipc_queue_depth{"))
        .map(|(_, v)| *v)
        .sum();
    assert_eq!(ipc_depth, 0.0);
    assert_eq!(server.get("/readyz").await, (200, "ready\n".to_owned()));
}

#[tokio::test]
async fn log_format_json_writes_one_json_object_per_line() {
    let server = Server::start_raw(
        &["--workers", "1"],
        &[("JWT_SECRET", SECRET), ("LOG_FORMAT", "json")],
    );
    let _a = server.join("a", "r1").await;
    let logs = server.logged("\"message\":\"room opened\"").await;
    let mut parsed = 0;
    for line in logs.lines().filter(|l| !l.starts_with("Listening on")) {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            value["level"].is_string() && value["fields"].is_object(),
            "{line}"
        );
        parsed += 1;
    }
    assert!(parsed >= 3, "{logs}");
    assert!(!logs.contains(SECRET));
}

/// A raw HTTP request; returns the status and the response head.
async fn request(server: &Server, method: &str, path: &str, headers: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(server.host()).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{headers}\r\n",
        server.host()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    (response[9..12].parse().unwrap(), response)
}

#[tokio::test]
async fn operational_endpoints_need_the_admin_token_and_health_answers_head() {
    let token = "ops-token-0123456789";
    let server = Server::start_raw(
        &["--workers", "1"],
        &[("JWT_SECRET", SECRET), ("ADMIN_TOKEN", token)],
    );
    let bearer = format!("Authorization: Bearer {token}\r\n");
    for path in ["/status", "/admin/rooms", "/metrics"] {
        assert_eq!(request(&server, "GET", path, "").await.0, 401, "{path}");
        assert_eq!(
            request(&server, "GET", path, &bearer).await.0,
            200,
            "{path}"
        );
    }
    // Without ADMIN_TOKEN, /status and the monitor are off; /metrics is open.
    let open = Server::start_raw(
        &["--workers", "1"],
        &[("JWT_SECRET", SECRET), ("ADMIN_TOKEN", "")],
    );
    assert_eq!(request(&open, "GET", "/status", "").await.0, 404);
    assert_eq!(request(&open, "GET", "/metrics", "").await.0, 200);
    // Health for load balancers: HEAD works, other methods get 405 with Allow.
    for path in ["/healthz", "/readyz"] {
        let (code, head) = request(&open, "HEAD", path, "").await;
        assert_eq!(code, 200, "{head}");
        assert!(!head.contains("\r\n\r\nok"), "no body for HEAD: {head}");
    }
    let (code, head) = request(&open, "POST", "/healthz", "Content-Length: 0\r\n").await;
    assert_eq!(code, 405);
    assert!(
        head.to_ascii_lowercase().contains("allow: get, head"),
        "{head}"
    );
    assert_eq!(request(&open, "DELETE", "/nowhere", "").await.0, 404);
}

#[tokio::test]
async fn the_monitor_needs_the_admin_token_outside_dev_mode() {
    let server = Server::start_raw(
        &["--workers", "1"],
        &[
            ("JWT_SECRET", SECRET),
            ("ADMIN_TOKEN", "monitor-token-1234"),
        ],
    );
    let _alice = server.join("alice", "r1").await;
    assert_eq!(server.get("/admin/rooms").await.0, 401);
    assert_eq!(server.get("/admin").await.0, 200);
    let (code, body) = server
        .get_with(
            "/admin/rooms",
            &[("Authorization", "Bearer monitor-token-1234")],
        )
        .await;
    assert_eq!(code, 200);
    let monitor: serde_json::Value = serde_json::from_str(&body).unwrap();
    // Members and shapes come from the worker's summary, sent every second.
    assert_eq!(monitor["rooms"][0]["room"], "r1");
    let (code, _) = server
        .get_with("/admin/rooms", &[("Authorization", "Bearer wrong")])
        .await;
    assert_eq!(code, 401);
}

/// `/admin/history`: the same access as the monitor; one sample a second whose
/// connections series ends at the live count and whose message rate saw the
/// traffic (issue 27).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_s_history_samples_every_second_behind_the_admin_token() {
    let server = Server::start_raw(
        &["--workers", "1"],
        &[
            ("JWT_SECRET", SECRET),
            ("ADMIN_TOKEN", "history-token-1234"),
        ],
    );
    assert_eq!(server.get_with("/admin/history", &[]).await.0, 401);
    let mut alice = server.join("alice", "r1").await;
    let _bob = server.join("bob", "r1").await;
    for i in 0..50 {
        alice
            .send(json!({"type": "cursor_move", "x": i, "y": i}))
            .await;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let history = || async {
        let (code, body) = server
            .get_with(
                "/admin/history",
                &[("Authorization", "Bearer history-token-1234")],
            )
            .await;
        assert_eq!(code, 200);
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let deadline = Instant::now() + PATIENCE;
    loop {
        let json = history().await;
        let samples = json["samples"].as_array().unwrap();
        let seen_traffic = samples
            .iter()
            .any(|s| s["messagesInPerSec"].as_f64().unwrap() > 0.0);
        let last = samples.last().unwrap();
        if seen_traffic && last["connections"] == 2 && last["rooms"] == 1 {
            assert_eq!(json["everyMs"], 1000);
            // About one a second.
            let at = |i: usize| samples[i]["atMs"].as_u64().unwrap();
            if samples.len() >= 3 {
                let step = at(samples.len() - 1) - at(samples.len() - 2);
                assert!((500..=2500).contains(&step), "{step} ms between samples");
            }
            assert!(samples.iter().any(|s| s["fanoutP99Ms"].as_f64().is_some()));
            break;
        }
        assert!(Instant::now() < deadline, "{json}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The internal port (`--internal-port`) has connections of its own: with
/// every pre-auth place of the main port held by stalled sockets (an
/// attacker's, each a byte into its request), `/healthz`, `/readyz` and
/// `/metrics` answer there at once; the main port answers too, closing the
/// oldest stalled sockets for the newer connections; 64 stalled sockets on
/// the internal port do not keep a probe from its answer either (the oldest
/// closes); the internal port serves no client (no WebSocket, no dev page).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_port_answers_probes_while_clients_hold_every_place() {
    // 40 places: 10 for connections not yet authenticated.
    const PRE_AUTH_PLACES: usize = 10;
    let internal_port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let port_arg = internal_port.to_string();
    let server = Server::start(&["--max-connections", "40", "--internal-port", &port_arg]);
    let internal = |path: &'static str| {
        let host = format!("127.0.0.1:{internal_port}");
        async move {
            let mut stream = TcpStream::connect(&host).await.unwrap();
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {HARNESS_ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            tokio::time::timeout(Duration::from_secs(1), stream.read_to_string(&mut answer))
                .await
                .expect("an answer within 1 s")
                .unwrap();
            answer
        }
    };
    // A byte each: a socket that sends nothing waits in the kernel until it
    // does (TCP_DEFER_ACCEPT), taking no place at all.
    let stalled = |address: String| async move {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(b"G").await.unwrap();
        stream
    };
    let mut idle = Vec::new();
    for _ in 0..4 * PRE_AUTH_PLACES {
        idle.push(stalled(server.host()).await);
    }
    // The main port still answers: each new connection closed the oldest
    // idle one.
    let (code, _) = server.get("/healthz").await;
    assert_eq!(code, 200);
    let mut closed = 0;
    for stream in &mut idle {
        let mut byte = [0u8; 1];
        // A closed one reads its end at once; an open one waits.
        let read = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut byte)).await;
        closed += usize::from(matches!(read, Ok(Ok(0) | Err(_))));
    }
    assert!(
        closed >= 3 * PRE_AUTH_PLACES,
        "{closed} of {} idle sockets closed",
        idle.len()
    );
    assert!(internal("/healthz").await.starts_with("HTTP/1.1 200 OK"));
    assert!(internal("/readyz").await.starts_with("HTTP/1.1 200 OK"));
    let mut held_internal = Vec::new();
    for _ in 0..64 {
        held_internal.push(stalled(format!("127.0.0.1:{internal_port}")).await);
    }
    assert!(internal("/healthz").await.starts_with("HTTP/1.1 200 OK"));
    let metrics = internal("/metrics").await;
    assert!(
        metrics.contains("session_server_pre_auth_closed_total{reason=\"address_full\"}"),
        "{metrics}"
    );
    assert!(internal("/").await.starts_with("HTTP/1.1 404"));
    drop(idle);
}

/// The command the design names (`supervisor --workers N`) is the same program:
/// it starts its workers and serves a room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisor_command_the_design_names_starts_its_workers_and_serves() {
    use std::io::BufRead;
    let data = temp_dir("supervisor-name");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_supervisor"))
        .args(["--workers", "2", "--port", "0", "--bind", "127.0.0.1"])
        .arg("--data-dir")
        .arg(data.as_os_str())
        .env("JWT_SECRET", SECRET)
        .env_remove("PORT")
        .env_remove("AGONES_SDK_GRPC_PORT")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the supervisor binary starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(port) = line.split("Listening on *:").nth(1) {
                let _ = tx.send(port.trim().parse::<u16>().unwrap());
            }
        }
    });
    let port = rx.recv_timeout(PATIENCE).expect("it listens");
    let host = format!("127.0.0.1:{port}");
    let token = sign(json!({"userId": "alice", "roomId": "designed", "host": host, "iat": now()}));
    let mut alice = Client::connect_to(&format!("ws://{host}/?token={token}")).await;
    let snapshot = alice.next_snapshot().await;
    assert_eq!(users(&snapshot), ["alice"]);
    // Every worker runs: /readyz says so.
    let mut http = TcpStream::connect(&host).await.unwrap();
    http.write_all(
        format!("GET /readyz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    http.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    send_signal(child.id(), "TERM");
    let exited = child.wait().unwrap();
    assert_eq!(exited.code(), Some(0));
}
