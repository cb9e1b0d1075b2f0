//! Load generator (issue 5), `fanout` scenario: R rooms × U members, each member
//! sends `cursor_move` at H Hz for D seconds (send times spread, not bursts), and
//! every member parses every snapshot it receives. Prints one JSON result.
//!
//! Latency: each move carries its send time (µs since the run started) as `y` and
//! its sender's index as `x`; a member that sees a newer `y` for a sender than it
//! saw before records now − y. Moves a member never saw (superseded by a newer one
//! before it could) are counted. The server's CPU seconds and RSS (supervisor plus
//! its worker processes, from /proc) are sampled around the measured window.
//!
//! With `--deflate` every member offers permessage-deflate and reads compressed
//! messages inflated (see `deflate.rs`); what the messages took on the wire is
//! reported next to their inflated bytes.
//!
//! ```text
//! loadgen fanout --url ws://127.0.0.1:8000 --secret S --rooms 10 --members 10 --hz 10 --seconds 10 --server-pid PID
//! ```

mod ceiling;
mod deflate;
mod hold;
mod memory;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use contract::protocol::v2::{self, Applied, Replica};
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[derive(Parser)]
#[command(name = "loadgen", about = "Load generator for session-server")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Cursor moves fanned out to every member of each room.
    Fanout(FanoutArgs),
    /// Idle connections: server RSS per connection.
    Idle(IdleArgs),
    /// Connect → first snapshot → close, C at a time: handshakes per second.
    Churn(ChurnArgs),
    /// Full rooms: resident memory of the supervisor and of each worker while
    /// R rooms of S shapes are open, and after everyone has left.
    Memory(memory::MemoryArgs),
    /// Idle TCP sockets that never send a byte, reopened when closed: the
    /// lock-out attack on the connection budgets.
    HoldSockets(hold::HoldArgs),
    /// Run the physical-ceiling server (minimal fan-out, no parsing, no IPC) on
    /// 127.0.0.1:PORT; point `fanout` at it to measure the floor.
    Ceiling {
        #[arg(long, default_value_t = 18990)]
        port: u16,
        /// Pass every client message through a second process (which sends
        /// it straight back) before applying it: the floor of an architecture
        /// whose rooms live in another process than the sockets.
        #[arg(long)]
        hop: bool,
    },
    /// The second process of `ceiling --hop` (started by it: echoes each
    /// message on the socket inherited as file descriptor FD).
    #[command(hide = true)]
    CeilingPeer {
        #[arg(long)]
        fd: i32,
    },
}

#[derive(clap::Args, Clone)]
struct FanoutArgs {
    /// Server address, e.g. ws://127.0.0.1:8000.
    #[arg(long)]
    url: String,
    /// The server's JWT_SECRET.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    secret: String,
    #[arg(long, default_value_t = 10)]
    rooms: usize,
    #[arg(long, default_value_t = 10)]
    members: usize,
    /// Cursor moves per second per member.
    #[arg(long, default_value_t = 10.0)]
    hz: f64,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Shapes created in each room (by its first member) before the measured
    /// window, so every snapshot carries them.
    #[arg(long, default_value_t = 0)]
    shapes: usize,
    /// Extra members per room that join and then never read (nor send): slow
    /// clients, to see whether they slow the others down.
    #[arg(long, default_value_t = 0)]
    slow_members: usize,
    /// Supervisor pid, for CPU and RSS accounting (its children are included).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Members speak protocol v2 (PROTOCOL-v2.md): one snapshot, then ops
    /// applied to a copy of the room.
    #[arg(long, default_value_t = false)]
    v2: bool,
    /// Members offer permessage-deflate (RFC 7692), as browsers do, and
    /// inflate the messages that come compressed.
    #[arg(long, default_value_t = false)]
    deflate: bool,
}

#[derive(clap::Args, Clone)]
struct IdleArgs {
    #[arg(long)]
    url: String,
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    secret: String,
    /// Connections to open.
    #[arg(long, default_value_t = 5000)]
    connections: usize,
    /// Members per room.
    #[arg(long, default_value_t = 10)]
    members: usize,
    /// Connections opened at once.
    #[arg(long, default_value_t = 64)]
    parallel: usize,
    /// Source addresses to spread connections over (127.0.0.1 … 127.0.0.N).
    #[arg(long, default_value_t = 1)]
    sources: u8,
    #[arg(long)]
    server_pid: u32,
}

#[derive(clap::Args, Clone)]
struct ChurnArgs {
    #[arg(long)]
    url: String,
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    secret: String,
    /// Connections in flight at once.
    #[arg(long, default_value_t = 20)]
    concurrency: usize,
    /// Rooms the connections are spread over.
    #[arg(long, default_value_t = 10)]
    rooms: usize,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[arg(long)]
    server_pid: Option<u32>,
}

/// C loops of connect → first snapshot → close, for D seconds.
async fn churn(args: ChurnArgs) -> Value {
    let host = host_of(&args.url);
    let usage_before = args.server_pid.map(server_usage);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for c in 0..args.concurrency {
        let (host, args) = (host.clone(), args.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies_us = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let user = format!("c{c}-{i}");
                let room = format!("churn-{}", (c + i as usize) % args.rooms);
                i += 1;
                let url = format!(
                    "{}/?token={}",
                    args.url.trim_end_matches('/'),
                    token(&args.secret, &host, &user, &room)
                );
                let t = Instant::now();
                let Ok((mut ws, _)) = connect(url).await else {
                    continue;
                };
                if let Some(Ok(_)) = ws.next().await {
                    latencies_us.push(t.elapsed().as_micros() as u64);
                }
                let _ = ws.close(None).await;
            }
            latencies_us
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("churn task"));
    }
    let window = start.elapsed().as_secs_f64();
    let usage_after = args.server_pid.map(server_usage);
    all.sort_unstable();
    let cpu = match (usage_before, usage_after) {
        (Some((a, _)), Some((b, _))) => Some(b - a),
        _ => None,
    };
    let ms = |us: u64| us as f64 / 1000.0;
    json!({
        "scenario": "churn",
        "concurrency": args.concurrency,
        "handshakes": all.len(),
        "handshakes_per_sec": all.len() as f64 / window,
        "connect_to_first_snapshot_ms": {
            "p50": ms(percentile(&all, 50.0)),
            "p99": ms(percentile(&all, 99.0)),
            "max": ms(all.last().copied().unwrap_or(0)),
        },
        "server_cpu_share": cpu.map(|c| c / window),
    })
}

/// Opens N connections (each waits for its first snapshot), holds them, and
/// reports the server's RSS growth per connection.
async fn idle(args: IdleArgs) -> Value {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let host = host_of(&args.url);
    let (_, rss_before) = server_usage(args.server_pid);
    let started = Instant::now();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(args.parallel));
    let mut tasks = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let permit = semaphore.clone().acquire_owned().await.expect("semaphore");
        let room = format!("idle-{}", i / args.members);
        let user = format!("i{i}");
        let url = format!(
            "{}/?token={}",
            args.url.trim_end_matches('/'),
            token(&args.secret, &host, &user, &room)
        );
        let source =
            std::net::Ipv4Addr::new(127, 0, 0, 1 + (i % usize::from(args.sources.max(1))) as u8);
        let host = host.clone();
        tasks.push(tokio::spawn(async move {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.bind((source, 0).into()).expect("bind source");
            let addr: std::net::SocketAddr = host.parse().expect("host:port");
            let stream = socket.connect(addr).await.expect("connect");
            let (mut ws, _) =
                tokio_tungstenite::client_async_with_config(url, stream, Some(client_config()))
                    .await
                    .expect("handshake");
            ws.next().await.expect("first snapshot").expect("no error");
            drop(permit);
            ws
        }));
    }
    let mut sockets = Vec::with_capacity(tasks.len());
    for task in tasks {
        sockets.push(task.await.expect("connection"));
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, rss_after) = server_usage(args.server_pid);
    let per_connection_kib = (rss_after.saturating_sub(rss_before)) as f64 / sockets.len() as f64;
    drop(sockets);
    json!({
        "scenario": "idle",
        "connections": args.connections,
        "members": args.members,
        "connect_seconds": connect_seconds,
        "server_rss_kib_before": rss_before,
        "server_rss_kib_after": rss_after,
        "server_rss_kib_per_connection": per_connection_kib,
    })
}

/// A snapshot as the generator reads it: the whole document is parsed and
/// validated as JSON, but only the cursors are kept (shapes are skipped over).
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Snapshot {
    #[allow(dead_code)]
    connected_users: serde::de::IgnoredAny,
    cursors: Vec<CursorPos>,
    #[allow(dead_code)]
    shapes: serde::de::IgnoredAny,
}

#[derive(serde::Deserialize)]
struct CursorPos {
    x: f64,
    y: f64,
}

fn as_u64(v: f64) -> Option<u64> {
    (v >= 0.0 && v.fract() == 0.0).then_some(v as u64)
}

/// What one member saw.
#[derive(Default)]
struct Seen {
    latencies_us: Vec<u64>,
    /// Newest `y` seen per sender.
    newest: HashMap<u64, u64>,
    snapshots: u64,
    bytes: u64,
    /// What the messages took on the wire (see [`Wire`]).
    wire_bytes: u64,
    /// Messages that came compressed.
    compressed: u64,
    /// Moves seen, per sender.
    moves_seen: u64,
    /// v2 gaps (see `v2_gaps`).
    gaps: u64,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The supervisor and its children: (CPU seconds, RSS KiB).
fn server_usage(pid: u32) -> (f64, u64) {
    let mut pids = vec![pid];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map_or(vec![], |(_, r)| r.split_whitespace().collect());
            if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
                pids.push(child);
            }
        }
    }
    let (mut cpu, mut rss) = (0.0, 0);
    for p in pids {
        cpu += cpu_seconds(&p.to_string());
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{p}/status")) {
            rss += status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (cpu, rss)
}

/// tungstenite's default read buffer (128 KiB) is zero-filled on every read: at
/// 1 room × 100 members that alone kept the generator's core busy. Snapshots are
/// assembled across reads, so a smaller buffer does not limit their size.
fn client_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(16 * 1024)
}

/// A client connection, plain or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}
type Socket = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

/// The CA that `wss://` servers' certificates must chain to
/// (`LOADGEN_TLS_CA`, a PEM file), loaded once.
fn tls_connector() -> tokio_rustls::TlsConnector {
    static CONNECTOR: std::sync::OnceLock<tokio_rustls::TlsConnector> = std::sync::OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            let path =
                std::env::var("LOADGEN_TLS_CA").expect("wss:// needs LOADGEN_TLS_CA (a PEM file)");
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(&path).expect("LOADGEN_TLS_CA readable") {
                roots
                    .add(cert.expect("a PEM certificate"))
                    .expect("a CA certificate");
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            tokio_rustls::TlsConnector::from(Arc::new(config))
        })
        .clone()
}

/// Connects (`ws://` or `wss://`) with [`client_config`] and `TCP_NODELAY` (as
/// browsers do).
async fn connect(url: String) -> Result<(Socket, ()), Box<dyn std::error::Error + Send + Sync>> {
    let (ws, _) = connect_offering(url, None, false).await?;
    Ok((ws, ()))
}

/// What a member's text messages took on the wire, taken in the order
/// tungstenite yields them: logged by the transcoder with `--deflate`; else
/// each is one unmasked frame (what the server sends), its header computed.
#[derive(Clone, Default)]
struct Wire(Option<Arc<deflate::WireLog>>);

impl Wire {
    /// The next text message's wire size; `len` its bytes as read. Call once
    /// for every text message read.
    fn next(&self, len: usize) -> deflate::Received {
        match &self.0 {
            Some(log) => log.take().expect("the transcoder logs every text message"),
            None => deflate::Received {
                wire_bytes: deflate::plain_wire_bytes(len),
                compressed: false,
            },
        }
    }

    /// Compressed messages that failed to inflate (the connection ended then).
    fn errors(&self) -> u64 {
        self.0.as_ref().map_or(0, |log| log.errors())
    }
}

/// Connects offering a WebSocket subprotocol (fails if the server does not
/// choose it) and, with `deflate`, permessage-deflate (fails if the server does
/// not accept it).
async fn connect_offering(
    url: String,
    subprotocol: Option<&str>,
    deflate: bool,
) -> Result<(Socket, Wire), Box<dyn std::error::Error + Send + Sync>> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let (tls, rest) = match url.strip_prefix("wss://") {
        Some(rest) => (true, rest),
        None => (false, url.trim_start_matches("ws://")),
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    let tcp = tokio::net::TcpStream::connect(authority).await?;
    tcp.set_nodelay(true)?;
    let io: Box<dyn Io> = if tls {
        let name = authority
            .rsplit_once(':')
            .map_or(authority, |(h, _)| h)
            .to_owned();
        let name = rustls::pki_types::ServerName::try_from(name)?;
        Box::new(tls_connector().connect(name, tcp).await?)
    } else {
        Box::new(tcp)
    };
    let mut wire = Wire::default();
    let io: Box<dyn Io> = if deflate {
        let log = Arc::new(deflate::WireLog::default());
        wire = Wire(Some(log.clone()));
        Box::new(deflate::Inflating::new(io, log))
    } else {
        io
    };
    let mut request = url.into_client_request()?;
    if let Some(subprotocol) = subprotocol {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", subprotocol.parse()?);
    }
    if deflate {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Extensions", deflate::OFFER.parse()?);
    }
    let (ws, response) =
        tokio_tungstenite::client_async_with_config(request, io, Some(client_config())).await?;
    if deflate {
        let accepted = response
            .headers()
            .get_all("Sec-WebSocket-Extensions")
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.contains("permessage-deflate")));
        if !accepted {
            return Err("the server did not accept permessage-deflate".into());
        }
    }
    Ok((ws, wire))
}

/// The `host:port` of a `ws://` or `wss://` URL (the token's `host` claim).
fn host_of(url: &str) -> String {
    url.trim_start_matches("wss://")
        .trim_start_matches("ws://")
        .trim_end_matches('/')
        .to_owned()
}

fn token(secret: &str, host: &str, user: &str, room: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"userId": user, "roomId": room, "host": host}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("signing")
}

async fn fanout(args: FanoutArgs) -> Value {
    let host = host_of(&args.url);
    let total = args.rooms * args.members;
    // Connect everyone first and wait for each first snapshot.
    let mut sockets = Vec::with_capacity(total);
    // v2: each member's copy of its room.
    let mut replicas = Vec::with_capacity(total);
    let mut wires = Vec::with_capacity(total);
    for i in 0..total {
        let room = format!("room-{}", i / args.members);
        let user = format!("m{i}");
        let url = format!(
            "{}/?token={}",
            args.url.trim_end_matches('/'),
            token(&args.secret, &host, &user, &room)
        );
        let (mut ws, wire) =
            connect_offering(url, args.v2.then_some(v2::SUBPROTOCOL), args.deflate)
                .await
                .expect("connect");
        let first = ws.next().await.expect("first snapshot").expect("no error");
        if let Message::Text(text) = &first {
            wire.next(text.len());
        }
        let mut replica = Replica::default();
        if args.v2 {
            replica
                .receive(first.to_text().expect("text"))
                .expect("v2 snapshot");
        }
        sockets.push(ws);
        replicas.push(replica);
        wires.push(wire);
    }
    let mut slow = Vec::with_capacity(args.rooms * args.slow_members);
    for room in 0..args.rooms {
        for k in 0..args.slow_members {
            let user = format!("slow{room}-{k}");
            let url = format!(
                "{}/?token={}",
                args.url.trim_end_matches('/'),
                token(&args.secret, &host, &user, &format!("room-{room}"))
            );
            let (ws, _) = connect_offering(url, None, args.deflate)
                .await
                .expect("connect");
            slow.push(ws); // held, never read
        }
    }
    if args.shapes > 0 {
        create_shapes(
            &mut sockets,
            &mut replicas,
            &wires,
            args.v2,
            args.members,
            args.shapes,
        )
        .await;
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let sent = Arc::new(AtomicU64::new(0));
    // Each member's last move (its `y`), to check everyone ends on the newest state.
    let last_sent: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let usage_before = args.server_pid.map(server_usage);
    let own_cpu_before = own_cpu_seconds();
    let measure_start = Instant::now();
    let period = Duration::from_secs_f64(1.0 / args.hz);
    let mut tasks = Vec::new();
    let members = sockets.into_iter().zip(replicas).zip(wires.clone());
    for (i, ((ws, mut replica), wire)) in members.enumerate() {
        let (mut sink, mut stream) = ws.split();
        let v2 = args.v2;
        let sent = sent.clone();
        let last_sent = last_sent.clone();
        let me = i as u64;
        // Spread senders over the period instead of bursting together.
        let offset = period.mul_f64(i as f64 / total as f64);
        let sender = tokio::spawn(async move {
            let mut next = tokio::time::Instant::from_std(start) + offset;
            loop {
                tokio::time::sleep_until(next).await;
                if Instant::now() >= deadline {
                    break;
                }
                let y = start.elapsed().as_micros() as u64;
                let msg = json!({"type":"cursor_move","x":me,"y":y}).to_string();
                if sink.send(Message::text(msg)).await.is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                last_sent[i].store(y, Ordering::Relaxed);
                next += period;
            }
            sink
        });
        let receiver = tokio::spawn(async move {
            let mut seen = Seen::default();
            let drain_until = deadline + Duration::from_millis(500);
            while let Ok(Some(Ok(msg))) =
                tokio::time::timeout_at(tokio::time::Instant::from_std(drain_until), stream.next())
                    .await
            {
                let Message::Text(text) = msg else { continue };
                let now = start.elapsed().as_micros() as u64;
                seen.snapshots += 1;
                seen.bytes += text.len() as u64;
                let wire = wire.next(text.len());
                seen.wire_bytes += wire.wire_bytes;
                seen.compressed += u64::from(wire.compressed);
                let cursors: Vec<(f64, f64)> = if v2 {
                    if replica.receive(&text).expect("v2 message") == Applied::NeedResync {
                        seen.gaps += 1;
                    }
                    let Some(state) = &replica.state else {
                        continue;
                    };
                    state["cursors"]
                        .as_array()
                        .expect("cursors")
                        .iter()
                        .map(|c| {
                            (
                                c["x"].as_f64().unwrap_or(-1.0),
                                c["y"].as_f64().unwrap_or(-1.0),
                            )
                        })
                        .collect()
                } else {
                    let snap: Snapshot = serde_json::from_str(&text).expect("snapshot is JSON");
                    snap.cursors.iter().map(|c| (c.x, c.y)).collect()
                };
                for (x, y) in cursors {
                    let (Some(x), Some(y)) = (as_u64(x), as_u64(y)) else {
                        continue;
                    };
                    if x == me {
                        continue;
                    }
                    let newest = seen.newest.entry(x).or_insert(0);
                    if y > *newest {
                        *newest = y;
                        seen.moves_seen += 1;
                        seen.latencies_us.push(now.saturating_sub(y));
                    }
                }
            }
            seen
        });
        tasks.push((sender, receiver));
    }
    let mut all = Seen::default();
    // (receiver, sender) pairs in a room where the receiver's last snapshot did
    // not show the sender's last move.
    let mut stale_pairs = 0u64;
    for (i, (sender, receiver)) in tasks.into_iter().enumerate() {
        let _ = sender.await;
        let seen = receiver.await.expect("receiver");
        let room = i / args.members;
        for j in room * args.members..(room + 1) * args.members {
            let last = last_sent[j].load(Ordering::Relaxed);
            if j != i && last > 0 && seen.newest.get(&(j as u64)) != Some(&last) {
                stale_pairs += 1;
            }
        }
        all.latencies_us.extend(seen.latencies_us);
        all.snapshots += seen.snapshots;
        all.bytes += seen.bytes;
        all.wire_bytes += seen.wire_bytes;
        all.compressed += seen.compressed;
        all.moves_seen += seen.moves_seen;
        all.gaps += seen.gaps;
    }
    let window = measure_start.elapsed().as_secs_f64();
    let usage_after = args.server_pid.map(server_usage);
    let own_cpu_after = own_cpu_seconds();
    drop(slow);
    all.latencies_us.sort_unstable();
    let sent = sent.load(Ordering::Relaxed);
    // Each move should reach the other members of its room.
    let expected = sent * (args.members as u64 - 1);
    let ms = |us: u64| us as f64 / 1000.0;
    let cpu = match (usage_before, usage_after) {
        (Some((a, _)), Some((b, _))) => Some(b - a),
        _ => None,
    };
    json!({
        "scenario": "fanout",
        "rooms": args.rooms, "members": args.members, "hz": args.hz, "seconds": args.seconds,
        "shapes": args.shapes, "slow_members": args.slow_members,
        "protocol": if args.v2 { "v2" } else { "v1" },
        "deflate": args.deflate,
        "messages_sent": sent,
        "snapshots_received": all.snapshots,
        "bytes_per_snapshot": all.bytes as f64 / all.snapshots.max(1) as f64,
        "deliveries_per_sec": all.snapshots as f64 / window,
        // Message payloads (WebSocket frame headers not included): into each
        // member, and out of the server (into every member together).
        "bytes_per_sec": all.bytes as f64 / window,
        "bytes_per_sec_per_member": all.bytes as f64 / window / total as f64,
        "messages_per_sec_per_member": all.snapshots as f64 / window / total as f64,
        // On the wire: each message's frame headers (2–10 bytes) and payloads
        // as sent, i.e. compressed where compressed; without --deflate, the
        // payloads above and one header each. Next to `bytes_per_sec_per_member`
        // (inflated), the ratio is what compression saved.
        "wire_bytes_per_snapshot": all.wire_bytes as f64 / all.snapshots.max(1) as f64,
        "wire_bytes_per_sec_per_member": all.wire_bytes as f64 / window / total as f64,
        "messages_compressed": all.compressed,
        // Compressed messages that did not inflate, or broke the extension's
        // framing (each ended its connection; the generator says which).
        "deflate_errors": wires.iter().map(Wire::errors).sum::<u64>(),
        // v2: batches a member could not apply (then it waits for a snapshot).
        "v2_gaps": all.gaps,
        "moves_expected": expected,
        "moves_seen": all.moves_seen,
        "moves_superseded": expected.saturating_sub(all.moves_seen),
        // 0 when every member's last snapshot showed every other member's last move.
        "final_state_stale_pairs": stale_pairs,
        "latency_ms": {
            "p50": ms(percentile(&all.latencies_us, 50.0)),
            "p90": ms(percentile(&all.latencies_us, 90.0)),
            "p99": ms(percentile(&all.latencies_us, 99.0)),
            "max": ms(all.latencies_us.last().copied().unwrap_or(0)),
        },
        "server_cpu_seconds": cpu,
        "server_cpu_share": cpu.map(|c| c / window),
        "server_cpu_us_per_delivery": cpu.map(|c| c * 1e6 / all.snapshots.max(1) as f64),
        // A move conveyed: one member's move seen by one other member.
        "server_cpu_us_per_conveyed_move": cpu.map(|c| c * 1e6 / all.moves_seen.max(1) as f64),
        "server_rss_kib": usage_after.map(|(_, rss)| rss),
        // Near 1.0 means the generator itself was the bottleneck.
        "loadgen_cpu_share": (own_cpu_after - own_cpu_before) / window,
    })
}

/// Each room's first member creates `count` shapes; then every member reads until
/// its snapshot shows them all, so the measured window starts from a quiet room.
async fn create_shapes<S>(
    sockets: &mut [tokio_tungstenite::WebSocketStream<S>],
    replicas: &mut [Replica],
    wires: &[Wire],
    v2: bool,
    members: usize,
    count: usize,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    for creator in sockets.iter_mut().step_by(members) {
        for k in 0..count {
            // Written by hand, in this order: the ceiling copies the fields from
            // `"x"` on (json! would sort the keys).
            let msg = format!(
                r#"{{"type":"shape_create","shapeType":"rectangle","x":{},"y":{},"width":120,"height":80}}"#,
                40 * (k % 25),
                30 * (k / 25)
            );
            creator.send(Message::text(msg)).await.expect("send shape");
        }
    }
    for ((ws, replica), wire) in sockets.iter_mut().zip(replicas).zip(wires) {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
                .await
                .expect("snapshot with every shape within 30 s")
                .expect("open")
                .expect("no error");
            let Message::Text(text) = msg else { continue };
            wire.next(text.len());
            let snapshot: Value = if v2 {
                replica.receive(&text).expect("v2 message");
                replica.state.clone().unwrap_or_default()
            } else {
                serde_json::from_str(&text).expect("snapshot is JSON")
            };
            if snapshot["shapes"].as_array().map_or(0, Vec::len) >= count {
                break;
            }
        }
    }
}

/// This process's CPU seconds (user + system).
fn own_cpu_seconds() -> f64 {
    cpu_seconds("self")
}

/// CPU seconds (user + system) of `/proc/{pid}`; 0 if it is gone.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, r)| r.split_whitespace().collect());
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after ')',
    // in USER_HZ (100 on Linux) ticks.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = match cli.scenario {
        Scenario::Fanout(args) => runtime.block_on(fanout(args)),
        Scenario::Idle(args) => runtime.block_on(idle(args)),
        Scenario::Churn(args) => runtime.block_on(churn(args)),
        Scenario::Memory(args) => runtime.block_on(memory::run(args)),
        Scenario::HoldSockets(args) => runtime.block_on(hold::run(args)),
        Scenario::Ceiling { port, hop } => {
            drop(runtime);
            ceiling::run(port, hop);
            return;
        }
        Scenario::CeilingPeer { fd } => {
            drop(runtime);
            ceiling::peer(fd);
            return;
        }
    };
    println!("{result}");
}
