//! Limits and security: hostile clients against the real server (oversize and
//! malformed frames, floods, clients that never read or stall, half-open
//! upgrades, connection churn, forged log lines, over-budget pastes). After each
//! attack the server still serves a normal client. What real clients do must
//! never trip a limit: `real_clients`.

mod big_rooms;
mod lockout;
mod memory;
mod real_clients;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::support::*;

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
    // Closed with RFC 6455's code for data that is not what its type says.
    assert_eq!(
        attacker.closed().await,
        Closed::Frame(1007, "Invalid UTF-8".into())
    );
    let snap = bystander.until(|s| users(s) == ["bystander"]).await;
    assert_eq!(users(&snap), ["bystander"]);
    still_serves(&server, "other").await;
}

/// A frame that breaks RFC 6455 (a reserved bit set, no extension agreed; a
/// ping in fragments) is answered with its close code, 1002, not a dropped
/// connection; the room goes on.
#[tokio::test]
async fn a_protocol_violation_is_closed_with_1002() {
    let server = Server::start(&[]);
    let mut bystander = server.join("bystander", "r").await;
    let reserved_bit = {
        let mut frame = Frame::message(b"{}".to_vec(), OpCode::Data(Data::Text), true);
        frame.header_mut().rsv1 = true;
        frame
    };
    let fragmented_ping = {
        let mut frame = Frame::ping(b"p".to_vec());
        frame.header_mut().is_final = false;
        frame
    };
    for (what, frame) in [
        ("reserved bit", reserved_bit),
        ("fragmented ping", fragmented_ping),
    ] {
        let mut attacker = server.join("attacker", "r").await;
        let _ = attacker.send_raw_result(Message::Frame(frame)).await;
        assert_eq!(
            attacker.closed().await,
            Closed::Frame(1002, "Protocol error".into()),
            "{what}"
        );
        bystander.until(|s| users(s) == ["bystander"]).await;
    }
    still_serves(&server, "other").await;
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
        // A newline, a NUL, then a right-to-left override and a line separator.
        let user = "eve\nINFO forged line\0\u{202E}nimda\u{2028}";
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
            "json" => r"eve\\nINFO forged line\\u{0}\\u{202e}nimda\\u{2028}",
            _ => r"eve\nINFO forged line\u{0}\u{202e}nimda\u{2028}",
        };
        assert!(opened[0].contains(escaped), "{format}: {}", opened[0]);
        for raw in ['\u{202E}', '\u{2028}'] {
            assert!(!logs.contains(raw), "{format}: {raw:?} reached the log");
        }
    }
}

#[tokio::test]
async fn a_reader_that_stalls_never_delays_the_others_and_ends_with_the_newest() {
    // This test sends faster than the default rate limit allows.
    let server = Server::start(&[
        "--rate-limit-per-sec",
        "100000",
        "--rate-limit-burst",
        "100000",
    ]);
    let mut stalled = server.join("stalled", "r1").await;
    let mut active = server.join("active", "r1").await;
    // Each snapshot carries ~1000 shapes' worth of text, so the stalled client's
    // socket buffers fill quickly while it reads nothing.
    for i in 0..300 {
        active
            .send(
                json!({"type":"shape_create","shapeType":"text","x":i,"y":0,"width":1,"height":1,
                "text":"x".repeat(200)}),
            )
            .await;
    }
    for i in 0..200 {
        active.send(json!({"type":"cursor_move","x":i,"y":i})).await;
    }
    let last = active.sync("active", 9999.0).await;
    assert_eq!(shapes(&last).len(), 300);
    // Now the stalled client reads: it may skip snapshots, but ends with the newest.
    let got = stalled.until(|s| *s == last).await;
    assert_eq!(got, last);
}

/// Pastes a real user makes are kept and reach the other member unchanged:
/// 5,000 CJK characters (15 KB), 3,000 emoji (12 KB), 10,000 control
/// characters (60 KB as sent, escaped).
#[tokio::test]
async fn long_pastes_are_kept_and_reach_the_other_member_unchanged() {
    let server = Server::start(&[]);
    let mut alice = server.join("alice", "paste").await;
    let mut bob = server.join("bob", "paste").await;
    let pastes = [
        "中文".repeat(2_500),
        "😀".repeat(3_000),
        "\u{1}".repeat(10_000),
    ];
    for (x, text) in pastes.iter().enumerate() {
        alice.send(create(x as i64, text)).await;
    }
    assert!(create(2, &pastes[2]).to_string().len() > 60_000);
    let snap = bob.until(|s| shapes(s).len() == 3).await;
    let texts: Vec<&str> = shapes(&snap)
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, pastes.iter().map(String::as_str).collect::<Vec<_>>());
}

/// A board has a byte budget (12 MiB of shapes' JSON), not a per-shape cap: of
/// 300 pastes of 10,000 control characters (60 KB each once escaped, 18 MB in
/// all, over the 16 MiB IPC frame), those that fit are kept, the rest refused
/// and counted; the worker never crashes and the room goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_board_past_its_byte_budget_refuses_the_rest_and_never_crashes_a_worker() {
    let server = Server::start_raw(&["--workers", "1"], &[("JWT_SECRET", SECRET)]);
    let mut alice = server.join("alice", "paste").await;
    let pid = server.worker_pids().await;
    let text = "\u{1}".repeat(10_000);
    let paste: Vec<String> = (0..300).map(|x| create(x, &text).to_string()).collect();
    assert!(paste[0].len() < 64 * 1024 && paste[0].len() > 60_000);
    alice.send_burst(paste).await;
    let snap = alice.sync("alice", 7.0).await;
    let kept = shapes(&snap).len();
    // 12 MiB / 60,1xx bytes: 209 fit.
    assert!((200..230).contains(&kept), "{kept} shapes kept");
    assert_eq!(xs_of(&snap["shapes"]), (0..kept as i64).collect::<Vec<_>>());
    let ignored = "session_server_frames_ignored_total{reason=\"board_full\"}";
    eventually(PATIENCE, "the refused creates counted", || async {
        (metric(&server, ignored).await == (300 - kept) as f64).then_some(())
    })
    .await;
    // The room keeps working, on the same worker process: a delete makes room.
    alice
        .send(json!({"type":"shape_delete","shapeId":shapes(&snap)[0]["id"]}))
        .await;
    alice.send(create(1000, "hello")).await;
    let snap = alice
        .until(|s| shapes(s).last().is_some_and(|s| s["text"] == "hello"))
        .await;
    assert_eq!(shapes(&snap).len(), kept);
    assert_eq!(server.worker_pids().await, pid, "the worker was replaced");
    assert!(
        !server.logs().contains("worker exited"),
        "{}",
        server.logs()
    );
}

/// The main port answers one request per connection unless it upgrades: a
/// client pipelining requests it never reads (to make the server buffer the
/// answers) gets the first answer and the end of the connection.
#[tokio::test]
async fn the_main_port_answers_one_request_per_connection() {
    let server = Server::start(&[]);
    let mut stream = TcpStream::connect(server.host()).await.unwrap();
    let request = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    stream
        .write_all(request.repeat(3).as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut answer))
        .await
        .expect("the connection closed")
        .unwrap();
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 1, "{answer}");
    // A request head over 32 KiB is refused (431), not buffered.
    let mut stream = TcpStream::connect(server.host()).await.unwrap();
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(64 * 1024)
    );
    let _ = stream.write_all(huge.as_bytes()).await;
    let mut answer = String::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_string(&mut answer)).await;
    assert!(
        answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large"),
        "{answer}"
    );
    still_serves(&server, "r").await;
}

fn create(x: i64, text: &str) -> Value {
    json!({"type":"shape_create","shapeType":"text","x":x,"y":0,"width":10,"height":10,"text":text})
}
