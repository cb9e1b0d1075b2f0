//! `hold-sockets` scenario: an unauthenticated client that holds N idle TCP
//! connections to the server (sending nothing) and reopens each one the server
//! closes, for D seconds: the lock-out attack the connection budgets stop
//! (issue 23). Prints one JSON object: what it opened and how often the server
//! closed it.
//!
//! ```text
//! loadgen hold-sockets --addr 127.0.0.1:8000 --sockets 15000 --from 127.0.0.2 --from 127.0.0.3 --seconds 15
//! ```
//!
//! The sockets are spread over the `--from` addresses in turn (127.0.0.1 when
//! none is given). Once it has made N connections (first opens and reopens) it
//! prints `attacking` on stderr.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;

#[derive(clap::Args, Clone)]
pub struct HoldArgs {
    /// The server's address, e.g. 127.0.0.1:8000.
    #[arg(long)]
    addr: SocketAddr,
    /// Connections held at once.
    #[arg(long, default_value_t = 15_000)]
    sockets: usize,
    /// Source addresses (repeat the flag); each socket binds one of them.
    #[arg(long = "from")]
    from: Vec<IpAddr>,
    #[arg(long, default_value_t = 15.0)]
    seconds: f64,
    /// First opens per second. Faster overflows the server's accept queue:
    /// the kernel then completes the client's side with a SYN cookie and
    /// drops the server's, and a socket that sends nothing never becomes a
    /// connection there (it holds nothing).
    #[arg(long, default_value_t = 5_000.0)]
    open_per_sec: f64,
}

#[derive(Default)]
struct Counts {
    /// Sockets opened at least once.
    first_opened: AtomicU64,
    /// When the last of them was first opened (ms since the start).
    last_first_open_ms: AtomicU64,
    /// Connections established (first opens and reopens).
    opened: AtomicU64,
    /// Connections the server closed (EOF or reset), each reopened.
    closed_by_server: AtomicU64,
    /// Connects that failed (refused, reset during the handshake, no port).
    connect_failures: AtomicU64,
    /// Bytes the server sent (an idle socket should get none).
    bytes_received: AtomicU64,
}

pub async fn run(args: HoldArgs) -> Value {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let from = if args.from.is_empty() {
        vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]
    } else {
        args.from.clone()
    };
    let counts = Arc::new(Counts::default());
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + Duration::from_secs_f64(args.seconds));
    // Says "attacking" once as many connections were made as are to be held
    // (more than the server admits: it closes them, they reopen).
    let monitor = {
        let counts = counts.clone();
        let sockets = args.sockets as u64;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while tokio::time::Instant::now() < deadline {
                tick.tick().await;
                let opened = counts.opened.load(Ordering::Relaxed);
                if opened >= sockets {
                    let first = counts.first_opened.load(Ordering::Relaxed);
                    let ms = start.elapsed().as_millis();
                    eprintln!(
                        "attacking: {opened} connections made after {ms} ms, {first} sockets opened"
                    );
                    return;
                }
            }
        })
    };
    let mut tasks = Vec::with_capacity(args.sockets);
    for i in 0..args.sockets {
        let source = from[i % from.len()];
        let counts = counts.clone();
        tasks.push(tokio::spawn(async move {
            hold_one(args.addr, source, deadline, &counts, start).await;
        }));
        if i % 50 == 49 {
            let due = start + Duration::from_secs_f64((i + 1) as f64 / args.open_per_sec);
            tokio::time::sleep_until(due.into()).await;
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    let _ = monitor.await;
    let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
    json!({
        "scenario": "hold-sockets",
        "sockets": args.sockets,
        "sources": from.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "first_opened": c(&counts.first_opened),
        "ms_to_open_all": (c(&counts.first_opened) == args.sockets as u64)
            .then(|| c(&counts.last_first_open_ms)),
        "opened": c(&counts.opened),
        "closed_by_server": c(&counts.closed_by_server),
        "connect_failures": c(&counts.connect_failures),
        "bytes_received": c(&counts.bytes_received),
        "seconds": start.elapsed().as_secs_f64(),
    })
}

/// Keeps one socket open from `source` until `deadline`, reopening it
/// whenever the server closes it (after a failed connect, 10 ms later).
async fn hold_one(
    server: SocketAddr,
    source: IpAddr,
    deadline: tokio::time::Instant,
    counts: &Counts,
    start: Instant,
) {
    let mut first_open = true;
    let held = async {
        loop {
            let socket = match source {
                IpAddr::V4(_) => TcpSocket::new_v4(),
                IpAddr::V6(_) => TcpSocket::new_v6(),
            };
            let connected = match socket {
                Ok(socket) => match bind_at_connect(&socket, source) {
                    Ok(()) => socket.connect(server).await,
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            let mut stream = match connected {
                Ok(stream) => stream,
                Err(_) => {
                    counts.connect_failures.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            counts.opened.fetch_add(1, Ordering::Relaxed);
            if std::mem::take(&mut first_open) {
                counts.first_opened.fetch_add(1, Ordering::Relaxed);
                let ms = start.elapsed().as_millis() as u64;
                counts.last_first_open_ms.fetch_max(ms, Ordering::Relaxed);
            }
            let mut buf = [0u8; 512];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        counts.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
            counts.closed_by_server.fetch_add(1, Ordering::Relaxed);
        }
    };
    let _ = tokio::time::timeout_at(deadline, held).await;
}

/// Binds `socket` to `source` with its port chosen at `connect` (Linux's
/// `IP_BIND_ADDRESS_NO_PORT`): a port is then needed per server address, not
/// per source address, so tens of thousands of sockets (and the TIME_WAITs
/// of earlier runs) fit in the ephemeral range.
fn bind_at_connect(socket: &TcpSocket, source: IpAddr) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor, and an int option of the right size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    socket.bind(SocketAddr::new(source, 0))
}
