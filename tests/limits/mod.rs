//! Hostile clients (issue 7), against the real server: bad tokens, oversize and
//! malformed frames, floods, clients that never read, half-open upgrades and
//! connection churn. After each attack the server still serves a normal client.

mod real_clients;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::util::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// A normal client still gets in and gets answers.
async fn still_serves(server: &Server, room: &str) {
    let mut client = server.join("normal-user", room).await;
    let snap = client.sync("normal-user", 3.0).await;
    assert_eq!(users(&snap), ["normal-user"]);
    client.close().await;
}

#[tokio::test]
async fn every_bad_token_is_refused_before_the_upgrade_and_counted_by_reason() {
    let server = Server::start(&[]);
    let host = server.host();
    let cases = [
        (
            "bad_signature",
            sign_with(
                json!({"userId":"a","roomId":"r","host":host}),
                "some-other-long-secret",
            ),
        ),
        (
            "expired",
            sign(json!({"userId":"a","roomId":"r","host":host,"exp":now() - 3600})),
        ),
        (
            "not_yet_valid",
            sign(json!({"userId":"a","roomId":"r","host":host,"nbf":now() + 3600})),
        ),
        (
            "wrong_host",
            sign(json!({"userId":"a","roomId":"r","host":"evil:1"})),
        ),
        ("malformed", sign(json!({"roomId":"r","host":host}))),
        (
            "bad_claims",
            sign(json!({"userId":"a".repeat(200),"roomId":"r","host":host})),
        ),
        ("malformed", "e30.e30.e30".to_owned()),
        ("too_large", "a".repeat(5000)),
    ];
    for (_, token) in &cases {
        assert_eq!(
            server.try_connect(&server.url(token)).await.err(),
            Some(401)
        );
    }
    let (_, body) = server.get("/metrics").await;
    let m = parse_metrics(&body);
    let count = |reason: &str| {
        m.get(&format!(
            "session_server_auth_failures_total{{reason=\"{reason}\"}}"
        ))
        .copied()
    };
    assert_eq!(count("bad_signature"), Some(1.0));
    assert_eq!(count("expired"), Some(1.0));
    assert_eq!(count("not_yet_valid"), Some(1.0));
    assert_eq!(count("wrong_host"), Some(1.0));
    assert_eq!(count("bad_claims"), Some(1.0));
    assert_eq!(count("malformed"), Some(2.0));
    assert_eq!(count("too_large"), Some(1.0));
    assert!(!server.logs().contains(&"a".repeat(5000)));
    still_serves(&server, "r").await;
}

#[tokio::test]
async fn a_one_mib_frame_is_closed_with_1009() {
    let server = Server::start(&[]);
    let mut attacker = server.join("attacker", "r").await;
    let huge = json!({"type":"cursor_move","x":1,"y":1,"pad":"x".repeat(1 << 20)}).to_string();
    let _ = attacker.try_send_text(&huge).await;
    assert_eq!(
        attacker.closed().await,
        Closed::Frame(1009, "Message too big".into())
    );
    still_serves(&server, "r").await;
}

#[tokio::test]
async fn malformed_utf8_ends_that_connection_only() {
    let server = Server::start(&[]);
    let mut bystander = server.join("bystander", "r").await;
    let mut attacker = server.join("attacker", "r").await;
    let bad = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    let _ = attacker.send_raw_result(Message::Frame(bad)).await;
    let ended = attacker.closed().await;
    assert!(
        matches!(ended, Closed::Dropped | Closed::Frame(_, _)),
        "{ended:?}"
    );
    let snap = bystander.until(|s| users(s) == ["bystander"]).await;
    assert_eq!(users(&snap), ["bystander"]);
    still_serves(&server, "other").await;
}

#[tokio::test]
async fn fragmented_messages_are_reassembled() {
    let server = Server::start(&[]);
    let mut alice = server.join("alice", "r").await;
    let text = json!({"type":"cursor_move","x":77,"y":88}).to_string();
    let (first, second) = text.split_at(10);
    alice
        .send_raw(Message::Frame(Frame::message(
            first.as_bytes().to_vec(),
            OpCode::Data(Data::Text),
            false,
        )))
        .await;
    alice
        .send_raw(Message::Frame(Frame::message(
            second.as_bytes().to_vec(),
            OpCode::Data(Data::Continue),
            true,
        )))
        .await;
    let snap = alice
        .until(|s| s["cursors"].as_array().unwrap().len() == 1)
        .await;
    assert_eq!(snap["cursors"][0]["x"], 77);
}

/// Round-trip time of one cursor move of `client` (send → snapshot showing it).
async fn rtt(client: &mut Client, user: &str, marker: f64) -> Duration {
    let start = Instant::now();
    client.sync(user, marker).await;
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooder_does_not_slow_others_and_is_closed_after_a_sustained_flood() {
    let server = Server::start(&["--rate-limit-close-after-secs", "2"]);
    let mut neighbour = server.join("neighbour", "flooded").await;
    let mut elsewhere = server.join("elsewhere", "quiet").await;
    let mut baseline = Vec::new();
    for i in 0..20 {
        baseline.push(rtt(&mut neighbour, "neighbour", 1000.0 + f64::from(i)).await);
        baseline.push(rtt(&mut elsewhere, "elsewhere", 1000.0 + f64::from(i)).await);
    }
    let mut flooder = server.join("flooder", "flooded").await;
    let flood = tokio::spawn(async move {
        let start = Instant::now();
        let mut sent = 0u64;
        // ~10,000 messages/s until the server closes the connection.
        while start.elapsed() < Duration::from_secs(8) {
            for _ in 0..100 {
                let msg = json!({"type":"cursor_move","x":sent,"y":0}).to_string();
                if flooder.try_send_text(&msg).await.is_err() {
                    return (sent, flooder);
                }
                sent += 1;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (sent, flooder)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut during = Vec::new();
    for i in 0..20 {
        during.push(rtt(&mut neighbour, "neighbour", 2000.0 + f64::from(i)).await);
        during.push(rtt(&mut elsewhere, "elsewhere", 2000.0 + f64::from(i)).await);
    }
    baseline.sort();
    during.sort();
    let (base_p50, flood_p50) = (baseline[baseline.len() / 2], during[during.len() / 2]);
    let bound = (base_p50 * 20).max(Duration::from_millis(50));
    assert!(
        flood_p50 <= bound,
        "p50 {flood_p50:?} during the flood vs {base_p50:?} without"
    );
    assert!(
        during[during.len() - 1] < Duration::from_secs(1),
        "max {:?}",
        during[during.len() - 1]
    );
    let (sent, mut flooder) = flood.await.unwrap();
    assert!(sent > 5000, "the flood was real: {sent}");
    assert_eq!(
        flooder.closed().await,
        Closed::Frame(1008, "Rate limit".into())
    );
    assert!(metric(&server, "session_server_frames_rate_limited_total").await > 1000.0);
    assert_eq!(
        metric(
            &server,
            "session_server_connections_rejected_total{reason=\"rate_limit\"}"
        )
        .await,
        1.0
    );
    // Counted once, under its real reason.
    assert_eq!(
        metric(
            &server,
            "session_server_connections_rejected_total{reason=\"duplicate_user\"}"
        )
        .await,
        0.0
    );
    still_serves(&server, "after-the-flood").await;
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_stays_bounded_and_slows_nobody() {
    let server = Server::start(&[
        "--rate-limit-per-sec",
        "100000",
        "--rate-limit-burst",
        "100000",
    ]);
    let _never_reads = server.join("sleeper", "r").await;
    let mut active = server.join("active", "r").await;
    let rss_before = rss_kib(server.pid());
    // 400 snapshots growing to ~2 MB each: far more than socket buffers hold.
    let text = "t".repeat(5000);
    for x in 0..400 {
        active
            .send(json!({"type":"shape_create","shapeType":"text","x":x,"y":0,"width":1,"height":1,"text":text}))
            .await;
    }
    let start = Instant::now();
    let snap = active.sync("active", 1.0).await;
    assert_eq!(shapes(&snap).len(), 400);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "room not slowed: {:?}",
        start.elapsed()
    );
    let rss_after = rss_kib(server.pid());
    // The sleeper holds at most the newest snapshot, not 400 of them (~400 MB).
    assert!(
        rss_after < rss_before + 100 * 1024,
        "RSS {rss_before} → {rss_after} KiB"
    );
    still_serves(&server, "other").await;
}

#[tokio::test]
async fn half_open_upgrades_time_out_and_do_not_block_others() {
    let server = Server::start(&["--handshake-timeout-ms", "1000"]);
    let mut half_open = Vec::new();
    for _ in 0..200 {
        let mut stream = TcpStream::connect(server.host()).await.unwrap();
        stream
            .write_all(b"GET /?token=abc HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        half_open.push(stream);
    }
    still_serves(&server, "r").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut closed = 0;
    for stream in &mut half_open {
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await {
            Ok(Ok(_)) | Ok(Err(_)) => closed += 1, // a 408 and/or EOF
            Err(_) => {}
        }
    }
    assert_eq!(closed, 200, "every half-open upgrade was timed out");
    still_serves(&server, "r").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_connect_disconnect_cycles_leak_nothing() {
    let server = Server::start(&[]);
    let mut tasks = Vec::new();
    for t in 0..4 {
        let url_base = server.host();
        let tokens: Vec<String> = (0..300)
            .map(|i| server.token(&format!("u{t}-{i}"), &format!("room-{}", i % 7)))
            .collect();
        tasks.push(tokio::spawn(async move {
            for token in tokens {
                let (mut ws, _) =
                    tokio_tungstenite::connect_async(format!("ws://{url_base}/?token={token}"))
                        .await
                        .unwrap();
                use futures_util::StreamExt;
                let first = ws.next().await.unwrap().unwrap();
                assert!(first.is_text());
                ws.close(None).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, body) = server.get("/metrics").await;
        let m = parse_metrics(&body);
        let open = m["session_server_connections"];
        let rooms = m["session_server_rooms"];
        if open == 0.0 && rooms == 0.0 {
            assert_eq!(m["session_server_connections_accepted_total"], 1200.0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {open} connections and {rooms} rooms"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    still_serves(&server, "r").await;
}

#[tokio::test]
async fn binary_frames_are_ignored_and_counted() {
    let server = Server::start(&[]);
    let mut alice = server.join("alice", "r").await;
    alice.send_raw(Message::binary(vec![0u8; 100])).await;
    let snap = alice.sync("alice", 5.0).await;
    assert_eq!(users(&snap), ["alice"]);
    assert_eq!(
        metric(&server, "session_server_binary_frames_total").await,
        1.0
    );
}

#[test]
fn a_weak_secret_stops_start_up() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_session-server"))
        .args(["--port", "0", "--bind", "127.0.0.1"])
        .env("JWT_SECRET", "short")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("shorter than 16 bytes"));
}

#[test]
fn dev_mode_with_a_real_secret_refuses_a_public_address() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_session-server"))
        .args(["--port", "0", "--dev", "--bind", "0.0.0.0"])
        .env("JWT_SECRET", "a-real-production-secret")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("dev mode with JWT_SECRET set listens only on loopback"),
        "{stderr}"
    );
    assert!(!stderr.contains("a-real-production-secret"), "{stderr}");
}

#[tokio::test]
async fn dev_mode_listens_on_loopback_and_says_what_it_exposes() {
    // No --bind: the harness passes one, so start the binary by hand.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_session-server"))
        .args(["--port", "0", "--dev", "--workers", "1"])
        .args(["--data-dir", temp_dir("dev-bind").to_str().unwrap()])
        .env_remove("JWT_SECRET")
        .env_remove("BIND_ADDRESS")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .take(50)
            .scan(false, |seen, line| {
                // Up to and including the line about what dev mode exposes.
                let done = *seen;
                *seen = line.contains("Dev mode exposes");
                (!done).then_some(line)
            })
            .collect::<Vec<_>>()
    });
    let lines = tokio::time::timeout(PATIENCE, lines)
        .await
        .unwrap()
        .unwrap();
    send_signal(pid, "KILL");
    let _ = child.wait();
    let all = lines.join("\n");
    assert!(all.contains("Dev mode exposes, on 127.0.0.1:"), "{all}");
    assert!(
        all.contains("/dev/token mints tokens for any user"),
        "{all}"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_ids_that_are_path_segments_are_refused_before_the_backend() {
    let backend = crate::util::backend::Backend::start().await;
    let url = backend.url();
    let server = Server::start_raw(
        &["--workers", "1", "--backend-url", url.as_str()],
        &[
            ("JWT_SECRET", SECRET),
            (
                "SESSION_SERVER_SECRET",
                crate::util::backend::BACKEND_SECRET,
            ),
        ],
    );
    for room in [".", ".."] {
        let token = server.token("mallory", room);
        assert_eq!(
            server.try_connect(&server.url(&token)).await.err(),
            Some(401)
        );
    }
    assert_eq!(
        metric(
            &server,
            "session_server_auth_failures_total{reason=\"bad_room_id\"}"
        )
        .await,
        2.0
    );
    // A room id with dots inside is an ordinary one.
    let mut fine = server.join("alice", "..a.b..").await;
    fine.sync("alice", 1.0).await;
    let paths: Vec<String> = backend.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/api/boards/by-room/..a.b.."], "{paths:?}");
}

/// A user id with a newline and a NUL makes one log line, with both written as
/// escapes, in the human format and in JSON.
#[tokio::test]
async fn client_strings_cannot_forge_log_lines() {
    for format in ["human", "json"] {
        let server = Server::start_raw(
            &["--workers", "1"],
            &[
                ("JWT_SECRET", SECRET),
                ("LOG_FORMAT", format),
                ("RUST_LOG", "debug"),
            ],
        );
        let user = "eve\nINFO forged line\0";
        let token = sign(json!({"userId": user, "roomId": "r\n1", "host": server.host()}));
        let client = server.connect(&server.url(&token)).await;
        client.close().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let logs = server.logs();
        assert!(!logs.contains('\0'), "{format}: a NUL reached the log");
        assert!(
            !logs.lines().any(|l| l.starts_with("INFO forged line")),
            "{format}: a forged line:\n{logs}"
        );
        let opened: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("session opened"))
            .collect();
        assert_eq!(opened.len(), 1, "{format}:\n{logs}");
        // JSON escapes the escapes' backslashes once more.
        let escaped = match format {
            "json" => r"eve\\nINFO forged line\\u{0}",
            _ => r"eve\nINFO forged line\u{0}",
        };
        assert!(opened[0].contains(escaped), "{format}: {}", opened[0]);
    }
}
