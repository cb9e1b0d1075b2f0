//! One client cannot lock everyone out (issue 23): an unauthenticated client
//! holding thousands of idle TCP sockets (sending nothing, reopening each one
//! the server closes) leaves real users' joins and the probes answered. The
//! attacker is the load generator's `hold-sockets` scenario, its own process.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// The attacks load two cores: one at a time.
static ONE_ATTACK_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long the probes run while the sockets are held, and how often.
const PROBE_FOR: Duration = Duration::from_secs(15);
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// What a real user and a probe may wait.
const JOIN_WITHIN: Duration = Duration::from_secs(2);
const HEALTH_WITHIN: Duration = Duration::from_secs(1);

/// 15,000 idle sockets, all from 127.0.0.1, the address the real users
/// connect from too (a NAT they share with the attacker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifteen_thousand_idle_sockets_from_one_address_lock_nobody_out() {
    let _one = ONE_ATTACK_AT_A_TIME.lock().await;
    let attack = under_attack(15_000, &["127.0.0.1".to_string()]).await;
    // The server closed the sockets over the address's cap, again and again.
    assert!(
        attack["closed_by_server"].as_u64().unwrap() > 10_000,
        "{attack}"
    );
}

/// 15,000 idle sockets from 60 other addresses, 250 each: under the
/// per-address cap, so only the pre-auth share (a quarter of the default
/// 15,000 places: 3,750) holds them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifteen_thousand_idle_sockets_spread_over_addresses_lock_nobody_out() {
    let _one = ONE_ATTACK_AT_A_TIME.lock().await;
    let from: Vec<String> = (2..62).map(|i| format!("127.0.0.{i}")).collect();
    let attack = under_attack(15_000, &from).await;
    assert!(
        attack["closed_by_server"].as_u64().unwrap() > 10_000,
        "{attack}"
    );
}

/// Starts a server (with an internal port for its probes), has a member in a
/// room, starts `hold-sockets` with `sockets` spread over `from`, and once
/// they are held probes for [`PROBE_FOR`]: every [`PROBE_EVERY`] a new user
/// joins (first snapshot within [`JOIN_WITHIN`]) and `/healthz` is asked on
/// the internal port (within [`HEALTH_WITHIN`]); at most one miss of each.
/// The member already in the room stays. Returns the attacker's report.
async fn under_attack(sockets: usize, from: &[String]) -> Value {
    let internal_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = Server::start(&["--internal-port", &internal_port.to_string()]);
    let mut alice = server.join("alice", "board").await;

    let mut args = vec![
        "hold-sockets".to_string(),
        "--addr".into(),
        server.host(),
        "--sockets".into(),
        sockets.to_string(),
        "--seconds".into(),
        "25".into(),
    ];
    for address in from {
        args.extend(["--from".to_string(), address.clone()]);
    }
    let mut attacker = Attacker::start(&args);
    attacker.wait_until_holding(Duration::from_secs(8));

    let mut join_times = Vec::new();
    let mut join_misses = Vec::new();
    let mut health_misses = Vec::new();
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < PROBE_FOR {
        let url = server.url(&server.token(&format!("user-{round}"), "board"));
        let (joined, healthy) = tokio::join!(join_time(url), health(internal_port));
        join_times.extend(joined);
        if joined.is_none_or(|t| t > JOIN_WITHIN) {
            join_misses.push((round, joined));
        }
        if !healthy {
            health_misses.push(round);
        }
        round += 1;
        tokio::time::sleep_until((started + PROBE_EVERY * round).into()).await;
    }
    let report = attacker.report();
    assert!(
        join_misses.len() <= 1,
        "joins missed (round, time to first snapshot): {join_misses:?} of {round}\nattacker: {report}"
    );
    assert!(
        health_misses.len() <= 1,
        "/healthz missed in rounds {health_misses:?} of {round}\nattacker: {report}"
    );
    assert!(
        report["opened"].as_u64().unwrap() >= sockets as u64,
        "{report}"
    );
    // Alice was never closed: she still sees the room.
    let snap = alice.sync("alice", 42.0).await;
    assert!(users(&snap).contains(&"alice".to_string()));
    join_times.sort();
    eprintln!(
        "joins: median {:?}, slowest {:?}, missed {join_misses:?}; /healthz missed {health_misses:?}; attacker {report}",
        join_times.get(join_times.len() / 2),
        join_times.last()
    );
    report
}

/// Time from connecting to the first snapshot, if within [`JOIN_WITHIN`] × 2.
async fn join_time(url: String) -> Option<Duration> {
    let started = Instant::now();
    tokio::time::timeout(JOIN_WITHIN * 2, async {
        let (mut ws, _) = connect_async(url).await.ok()?;
        loop {
            match ws.next().await? {
                Ok(Message::Text(_)) => break,
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        let elapsed = started.elapsed();
        let _ = ws.close(None).await;
        Some(elapsed)
    })
    .await
    .ok()
    .flatten()
}

/// `GET /healthz` on the internal port answered 200 within [`HEALTH_WITHIN`].
async fn health(port: u16) -> bool {
    let probe = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.ok()?;
        Some(answer.starts_with("HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(HEALTH_WITHIN, probe).await,
        Ok(Some(true))
    )
}

/// The `hold-sockets` process (killed by pid if the test ends early).
struct Attacker {
    child: Child,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Attacker {
    fn start(args: &[String]) -> Attacker {
        let mut child = Command::new(loadgen_exe())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, stderr) = std::sync::mpsc::channel();
        let lines = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Attacker { child, stderr }
    }

    fn wait_until_holding(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) if line.starts_with("attacking") => return,
                Ok(_) => {}
                Err(_) => panic!("hold-sockets did not make its connections within {within:?}"),
            }
        }
    }

    /// Waits for the run's end; its JSON report.
    fn report(mut self) -> Value {
        let mut stdout = String::new();
        std::io::Read::read_to_string(self.child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "hold-sockets failed: {stdout}");
        serde_json::from_str(stdout.trim()).unwrap()
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
