//! Test harness: starts the real `session-server` binary on a free loopback port,
//! keeps its logs (printed if the test fails), talks to it with real WebSocket
//! clients, and kills it (by pid) when dropped.

pub mod backend;
pub mod raw;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

pub const SECRET: &str = "integration-test-secret";
/// Upper bound for anything the tests wait for; they normally take milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub struct Server {
    child: Option<Child>,
    pub port: u16,
    logs: Arc<Mutex<Vec<String>>>,
    /// The embedded store's folder, unless the test passed its own (removed
    /// once the server is dropped, after the process is killed).
    data_dir: Option<TempDir>,
    /// The admin token the harness gave the server (unless the test set its
    /// own): [`Server::get`] sends it, so tests read `/status` and `/metrics`.
    admin_token: Option<String>,
}

/// The admin token the harness sets when a test does not set its own.
pub const HARNESS_ADMIN_TOKEN: &str = "harness-admin-token-0123456789";

/// The server binary the tests run: this build's, or `TEST_SERVER_BIN`
/// (another build, e.g. a release one to measure what production would do).
pub fn server_binary() -> String {
    std::env::var("TEST_SERVER_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_session-server").to_string())
}

/// A fresh folder under the system temp dir, never shared by two tests, removed
/// when dropped (see [`TempDir`]).
pub fn temp_dir(what: &str) -> TempDir {
    // Tests of one binary run in parallel threads of one process, and two of
    // them can read the same clock value (it happened in CI, so two servers
    // raced for one data directory's lock): a counter makes the name unique
    // within the process, the pid across processes.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "session-server-test-{what}-{}-{n}-{:x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// A test's folder: removed when its owner (the test, or the [`Server`] that
/// made it) is dropped, so it outlives every server the test starts on it.
/// Kept when the test fails, with its path printed, to be looked into.
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the test failed: its folder is kept: {}", self.0.display());
            return;
        }
        // A killed server's workers may still be writing for a moment (they
        // exit within a second of their supervisor): try again meanwhile.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match std::fs::remove_dir_all(&self.0) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() >= deadline => {
                    eprintln!("could not remove {}: {e}", self.0.display());
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// How the server process is started.
enum Launcher<'a> {
    Direct,
    /// In the cgroup whose `cgroup.procs` file this is.
    InCgroup(&'a Path),
    /// As PID 1 of a new PID namespace.
    PidNamespace,
}

impl Server {
    /// Starts the server with `--workers 2` and the given extra flags.
    pub fn start(extra: &[&str]) -> Server {
        let mut args = vec!["--workers", "2"];
        args.extend_from_slice(extra);
        Server::start_raw(&args, &[("JWT_SECRET", SECRET)])
    }

    /// Starts the server with exactly these flags and environment.
    pub fn start_raw(args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::spawn(args, env, false)
    }

    /// Like [`Server::start_raw`], but the server starts as a member of the
    /// cgroup whose `cgroup.procs` file is `procs` (it moves itself there
    /// before the server runs, so its workers are born in it).
    pub fn start_in_cgroup(procs: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::spawn_with(Launcher::InCgroup(procs), args, env, false)
    }

    /// Like [`Server::start_raw`], but the server is the first process (PID 1)
    /// of a new PID namespace, as a container's entrypoint is (`unshare`);
    /// [`Server::pid`] is then `unshare`'s. `None` (reason printed) where
    /// `unshare` cannot make one (it needs root).
    pub fn start_as_container_init(args: &[&str], env: &[(&str, &str)]) -> Option<Server> {
        let probe = Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "true"])
            .status();
        if !probe.is_ok_and(|s| s.success()) {
            eprintln!(
                "skipped: `unshare --pid --fork --mount-proc` is not available here (it needs root)"
            );
            return None;
        }
        Some(Server::spawn_with(Launcher::PidNamespace, args, env, false))
    }

    fn spawn(args: &[&str], env: &[(&str, &str)], own_group: bool) -> Server {
        Server::spawn_with(Launcher::Direct, args, env, own_group)
    }

    fn spawn_with(
        launcher: Launcher,
        args: &[&str],
        env: &[(&str, &str)],
        own_group: bool,
    ) -> Server {
        let binary = server_binary();
        let binary = binary.as_str();
        let mut cmd = match launcher {
            Launcher::Direct => Command::new(binary),
            Launcher::InCgroup(procs) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(r#"echo $$ > "$0" && exec "$@""#)
                    .arg(procs)
                    .arg(binary);
                sh
            }
            Launcher::PidNamespace => {
                let mut unshare = Command::new("unshare");
                unshare.args(["--pid", "--fork", "--mount-proc", binary]);
                unshare
            }
        };
        if own_group {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        cmd.args(["--port", "0", "--bind", "127.0.0.1"]);
        let data_dir = if args.contains(&"--data-dir") {
            None
        } else {
            let dir = temp_dir("data");
            cmd.arg("--data-dir").arg(dir.as_os_str());
            Some(dir)
        };
        cmd.args(args)
            .env_remove("JWT_SECRET")
            .env_remove("PORT")
            .env_remove("BACKEND_URL")
            .env_remove("SESSION_SERVER_SECRET")
            .env_remove("DATA_DIR")
            .env_remove("LOG_FORMAT")
            .env_remove("HATHORA_ROOMS_PER_PROCESS")
            .env_remove("AGONES")
            .env_remove("AGONES_SDK_GRPC_PORT")
            .env(
                "RUST_LOG",
                std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let admin_token = if env.iter().any(|(k, _)| *k == "ADMIN_TOKEN") {
            None
        } else {
            cmd.env("ADMIN_TOKEN", HARNESS_ADMIN_TOKEN);
            Some(HARNESS_ADMIN_TOKEN.to_owned())
        };
        let mut child = cmd.spawn().expect("spawn session-server");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (port_tx, port_rx) = mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let logs = logs.clone();
            let port_tx = port_tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Some(rest) = line.split("Listening on *:").nth(1) {
                        let port: u16 = rest.trim().parse().expect("port in listening line");
                        let _ = port_tx.send(port);
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let mut server = Server {
            child: Some(child),
            port: 0,
            logs,
            data_dir,
            admin_token,
        };
        match port_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(port) => server.port = port,
            Err(_) => panic!("server did not start; logs:\n{}", server.logs()),
        }
        server
    }

    /// The embedded store's folder the harness made (the test passed none).
    pub fn data_dir(&self) -> &Path {
        self.data_dir
            .as_deref()
            .expect("the harness's data folder (the test passed its own)")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Waits (at most [`PATIENCE`]) until the logs hold `needle`, and returns
    /// them: the harness reads the server's pipes on its own threads, so a
    /// line written before a reply the test saw (or before the exit) may
    /// reach the logs just after it.
    pub async fn logged(&self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let logs = self.logs();
            if logs.contains(needle) {
                return logs;
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?}; logs:\n{logs}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A token for `user` in `room`, with the `host` claim this server expects.
    pub fn token(&self, user: &str, room: &str) -> String {
        sign(json!({"userId": user, "roomId": room, "host": self.host(), "iat": now()}))
    }

    pub fn url(&self, token: &str) -> String {
        format!("ws://{}/?token={token}", self.host())
    }

    /// Connects `user` to `room` and waits for the first snapshot.
    pub async fn join(&self, user: &str, room: &str) -> Client {
        let mut client = self.connect(&self.url(&self.token(user, room))).await;
        client.next_snapshot().await;
        client
    }

    pub async fn connect(&self, url: &str) -> Client {
        match self.try_connect(url).await {
            Ok(client) => client,
            Err(e) => panic!("connect failed: {e}\nlogs:\n{}", self.logs()),
        }
    }

    /// Connects, returning the HTTP status on a refused upgrade.
    pub async fn try_connect(&self, url: &str) -> Result<Client, u16> {
        match tokio::time::timeout(PATIENCE, connect_async(url)).await {
            Ok(Ok((ws, _))) => Ok(Client { ws, last: None }),
            Ok(Err(WsError::Http(response))) => Err(response.status().as_u16()),
            Ok(Err(e)) => panic!("unexpected connect error: {e}"),
            Err(_) => panic!("connect timed out"),
        }
    }

    /// A plain HTTP/1.1 GET; returns status and body.
    /// With the harness's admin token, if it set one (see [`Server::get_with`]
    /// for a request without it).
    pub async fn get(&self, path: &str) -> (u16, String) {
        match &self.admin_token {
            Some(token) => {
                let bearer = format!("Bearer {token}");
                self.get_with(path, &[("Authorization", &bearer)]).await
            }
            None => self.get_with(path, &[]).await,
        }
    }

    /// A plain HTTP/1.1 GET with extra headers; returns status and body.
    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        self.get_for_host(&self.host(), path, headers).await
    }

    /// `GET path` on another port of the server's (its `--internal-port`).
    pub async fn get_at(&self, port: u16, path: &str) -> (u16, String) {
        self.request(
            &format!("127.0.0.1:{port}"),
            &format!("127.0.0.1:{port}"),
            path,
            &[],
        )
        .await
    }

    /// `GET path` with `host` as the `Host` header (as a browser sends the
    /// name in the page's URL), and `headers`: status and body.
    pub async fn get_for_host(
        &self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        self.request(&self.host(), host, path, headers).await
    }

    /// `GET path` to `address`, with `host` as the `Host` header: status and body.
    async fn request(
        &self,
        address: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let mut stream = TcpStream::connect(address).await.unwrap();
        let extra: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tokio::time::timeout(PATIENCE, stream.read_to_string(&mut response))
            .await
            .expect("HTTP response in time")
            .unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// A WebSocket upgrade request for `token`, by hand: returns the status line
    /// code and the raw response head (to check headers such as `Retry-After`).
    pub async fn raw_upgrade(&self, token: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(self.host()).await.unwrap();
        let request = format!(
            "GET /?token={token} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            self.host()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(PATIENCE, stream.read(&mut byte))
                .await
                .expect("response in time")
                .unwrap();
            if n == 0 {
                break;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        (head[9..12].parse().unwrap(), head)
    }

    pub async fn status(&self) -> Value {
        let (code, body) = self.get("/status").await;
        assert_eq!(code, 200);
        serde_json::from_str(&body).unwrap()
    }

    /// Sends a signal to the server process (by pid).
    pub fn signal(&self, name: &str) {
        send_signal(self.pid(), name);
    }

    /// Waits for the server process to exit; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- server logs ----\n{}\n---------------------",
                self.logs()
            );
        }
    }
}

pub fn send_signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

pub fn process_exists(pid: u32) -> bool {
    // A zombie still has a /proc entry; look at its state.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub fn sign(claims: Value) -> String {
    sign_with(claims, SECRET)
}

pub fn sign_with(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The last snapshot received, as text.
    pub last: Option<String>,
}

/// How a connection ended, as the client saw it.
#[derive(Debug, PartialEq)]
pub enum Closed {
    /// A close frame with this code and reason.
    Frame(u16, String),
    /// The connection ended without a close frame.
    Dropped,
}

impl Client {
    /// Connects to `url` with no harness `Server` (a server the test runs in its
    /// own process).
    pub async fn connect_to(url: &str) -> Client {
        let (ws, _) = tokio::time::timeout(PATIENCE, connect_async(url))
            .await
            .expect("connect timed out")
            .expect("connect failed");
        Client { ws, last: None }
    }

    pub async fn send(&mut self, msg: Value) {
        self.send_text(&msg.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    pub async fn send_raw(&mut self, msg: Message) {
        self.ws.send(msg).await.unwrap();
    }

    /// Sends, reporting failure instead of panicking (for attacks the server may
    /// end mid-way).
    pub async fn send_raw_result(&mut self, msg: Message) -> Result<(), String> {
        self.ws.send(msg).await.map_err(|e| e.to_string())
    }

    pub async fn try_send_text(&mut self, text: &str) -> Result<(), String> {
        self.send_raw_result(Message::text(text)).await
    }

    /// The next message of any kind. Panics on error or after [`PATIENCE`].
    async fn next_message(&mut self) -> Message {
        tokio::time::timeout(PATIENCE, self.ws.next())
            .await
            .expect("message in time")
            .expect("connection open")
            .expect("no websocket error")
    }

    /// The next snapshot, as raw text. Panics on close or after [`PATIENCE`].
    pub async fn next_text(&mut self) -> String {
        loop {
            match self.next_message().await {
                Message::Text(t) => {
                    self.last = Some(t.to_string());
                    return t.to_string();
                }
                Message::Close(frame) => panic!("unexpected close: {frame:?}"),
                _ => continue,
            }
        }
    }

    pub async fn next_snapshot(&mut self) -> Value {
        serde_json::from_str(&self.next_text().await).expect("snapshot is JSON")
    }

    /// Reads snapshots until one satisfies `pred`; returns it.
    pub async fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            assert!(
                Instant::now() < deadline,
                "no matching snapshot; last: {:?}",
                self.last
            );
            let snap = self.next_snapshot().await;
            if pred(&snap) {
                return snap;
            }
        }
    }

    /// Moves this client's cursor to a marker position and waits for the snapshot
    /// showing it: every frame sent before has then been applied.
    pub async fn sync(&mut self, user: &str, marker: f64) -> Value {
        self.send(json!({"type":"cursor_move","x":marker,"y":marker}))
            .await;
        self.until(|s| {
            s["cursors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["userId"] == user && c["x"] == marker)
        })
        .await
    }

    /// Reads until a pong arrives (skipping snapshots); returns its payload.
    pub async fn next_pong(&mut self) -> Vec<u8> {
        loop {
            match self.next_message().await {
                Message::Pong(payload) => return payload.to_vec(),
                Message::Close(frame) => panic!("unexpected close: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// Reads until the connection ends; returns how.
    pub async fn closed(&mut self) -> Closed {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await {
                Err(_) => panic!("connection still open after {PATIENCE:?}"),
                Ok(Some(Ok(Message::Close(Some(frame))))) => {
                    return Closed::Frame(frame.code.into(), frame.reason.to_string());
                }
                Ok(Some(Ok(Message::Close(None)))) | Ok(None) | Ok(Some(Err(_))) => {
                    return Closed::Dropped;
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Stays connected and reading (so answering pings) for `duration`; returns
    /// the snapshots received meanwhile. Panics if the connection ends.
    pub async fn read_for(&mut self, duration: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + duration;
        let mut snapshots = 0;
        while let Ok(msg) = tokio::time::timeout_at(deadline, self.ws.next()).await {
            match msg {
                Some(Ok(Message::Text(_))) => snapshots += 1,
                Some(Ok(Message::Close(frame))) => panic!("unexpected close: {frame:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("connection failed: {e}"),
                None => panic!("connection ended"),
            }
        }
        snapshots
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        // Drain until the server's answer so the close is complete.
        let _ = tokio::time::timeout(PATIENCE, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// The `x` of every shape in `shapes` (a JSON array of shapes), in order.
pub fn xs_of(shapes: &Value) -> Vec<i64> {
    shapes
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["x"].as_i64().unwrap())
        .collect()
}

/// Users of a snapshot, in order.
pub fn users(snap: &Value) -> Vec<String> {
    snap["connectedUsers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .collect()
}

pub fn shapes(snap: &Value) -> &Vec<Value> {
    snap["shapes"].as_array().unwrap()
}

impl Client {
    /// Sends every message in one go (as a paste does) while reading what
    /// arrives, as a browser would; returns once all are written.
    pub async fn send_burst(&mut self, texts: Vec<String>) {
        let mut last = None;
        let (mut tx, mut rx) = (&mut self.ws).split();
        let send = async move {
            for text in texts {
                tx.feed(Message::text(text)).await?;
            }
            tx.flush().await
        };
        let read = read_on(&mut rx, &mut last);
        tokio::select! {
            sent = send => sent.expect("burst sent"),
            _ = read => unreachable!(),
        }
        if last.is_some() {
            self.last = last;
        }
    }
}

/// Reads a connection while the caller sends (as a browser does), keeping the
/// last snapshot; never returns, panics if the connection ends.
async fn read_on<S>(rx: &mut S, last: &mut Option<String>)
where
    S: futures_util::Stream<Item = Result<Message, WsError>> + Unpin,
{
    loop {
        match rx.next().await {
            Some(Ok(Message::Text(t))) => *last = Some(t.to_string()),
            Some(Ok(Message::Close(frame))) => panic!("unexpected close: {frame:?}"),
            Some(Ok(_)) => {}
            other => panic!("connection ended: {other:?}"),
        }
    }
}

/// The index of the worker holding `room`, from `/status`.
pub async fn worker_of(server: &Server, room: &str) -> usize {
    let status = server.status().await;
    status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .position(|w| w["rooms"].as_array().unwrap().iter().any(|r| r == room))
        .unwrap_or_else(|| panic!("{room} not placed: {status}"))
}

/// A counter or gauge from the server's `/metrics` (0 when absent).
pub async fn metric(server: &Server, name: &str) -> f64 {
    let (_, body) = server.get("/metrics").await;
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0.0)
}

impl Server {
    /// Like [`Server::start_raw`], but the server leads its own process group (its
    /// workers join it), so a test can signal the whole group as a terminal's
    /// Ctrl-C or systemd does, without signalling the test runner.
    pub fn start_in_own_group(args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::spawn(args, env, true)
    }

    /// Pids of the worker processes, from `/status`.
    pub async fn worker_pids(&self) -> Vec<u32> {
        self.status().await["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["pid"].as_u64().expect("worker running") as u32)
            .collect()
    }
}

/// Sends a signal to every process of the group `pgid` (by its leader's pid).
pub fn signal_group(pgid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} -- -{pgid}");
}

/// Waits until none of `pids` is running; panics at `deadline`.
pub fn wait_all_gone(pids: &[u32], deadline: Instant) {
    while let Some(pid) = pids.iter().find(|&&pid| process_exists(pid)) {
        assert!(
            Instant::now() < deadline,
            "process {pid} still running at the deadline"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Client {
    /// Sends `texts` one every `every` while reading what arrives, as a member
    /// editing in a browser does; returns once all are written. Panics if the
    /// connection ends.
    pub async fn send_paced(&mut self, texts: Vec<String>, every: Duration) {
        let mut last = None;
        let (mut tx, mut rx) = (&mut self.ws).split();
        let send = async move {
            let mut tick = tokio::time::interval(every);
            for text in texts {
                tick.tick().await;
                tx.send(Message::text(text)).await?;
            }
            Ok::<(), WsError>(())
        };
        let read = read_on(&mut rx, &mut last);
        tokio::select! {
            sent = send => sent.expect("paced messages sent"),
            _ = read => unreachable!(),
        }
        if last.is_some() {
            self.last = last;
        }
    }
}

/// Worker pids by worker id, as `/status` reports them (0 while none runs).
pub async fn worker_pids_or_zero(server: &Server) -> Vec<u32> {
    server.status().await["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().unwrap_or(0) as u32)
        .collect()
}

/// Waits until worker `index` runs a process other than `old_pid`, for up to
/// `within`; returns the new pid.
pub async fn wait_replaced_within(
    server: &Server,
    index: usize,
    old_pid: u32,
    within: Duration,
) -> u32 {
    let deadline = Instant::now() + within;
    loop {
        let pid = worker_pids_or_zero(server).await[index];
        if pid != 0 && pid != old_pid {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "worker {index} not replaced within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Server {
    /// One worker persisting to the in-test `backend`, with `args` added (and
    /// `env` added to the secrets it needs).
    pub fn on_backend(backend: &backend::Backend, args: &[&str], env: &[(&str, &str)]) -> Server {
        let url = backend.url();
        let mut all_args = vec!["--workers", "1", "--backend-url", url.as_str()];
        all_args.extend_from_slice(args);
        let mut all_env = vec![
            ("JWT_SECRET", SECRET),
            ("SESSION_SERVER_SECRET", backend::BACKEND_SECRET),
        ];
        all_env.extend_from_slice(env);
        Server::start_raw(&all_args, &all_env)
    }
}

/// `count` creates of text shapes with `chars`-character texts (numbered, so
/// each is distinct): the big room of the recovery tests and benchmark.
pub fn text_shape_creates(count: usize, chars: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            let text = format!("{i:04}{}", "t".repeat(chars - 4));
            json!({"type":"shape_create","shapeType":"text","x":i,"y":0,"width":100,"height":20,"text":text})
                .to_string()
        })
        .collect()
}

impl Server {
    /// Connects `user` to `room` offering the WebSocket subprotocols
    /// `protocols` (one `Sec-WebSocket-Protocol` value); returns the client and
    /// the subprotocol the server chose, without waiting for a message.
    pub async fn connect_offering(
        &self,
        user: &str,
        room: &str,
        protocols: &str,
    ) -> (Client, Option<String>) {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = self
            .url(&self.token(user, room))
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", protocols.parse().unwrap());
        match tokio::time::timeout(PATIENCE, connect_async(request)).await {
            Ok(Ok((ws, response))) => {
                let chosen = response
                    .headers()
                    .get("Sec-WebSocket-Protocol")
                    .map(|v| v.to_str().unwrap().to_owned());
                (Client { ws, last: None }, chosen)
            }
            Ok(Err(e)) => panic!("connect failed: {e}\nlogs:\n{}", self.logs()),
            Err(_) => panic!("connect timed out"),
        }
    }
}

impl Client {
    /// The next text message if one arrives within `wait`. Panics on close.
    pub async fn next_text_within(&mut self, wait: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(Some(Ok(Message::Text(t)))) => {
                    self.last = Some(t.to_string());
                    return Some(t.to_string());
                }
                Ok(Some(Ok(Message::Close(frame)))) => panic!("unexpected close: {frame:?}"),
                Ok(Some(Ok(_))) => continue,
                Ok(other) => panic!("connection ended: {other:?}"),
            }
        }
    }
}

/// A normal client still gets in and gets answers.
pub async fn still_serves(server: &Server, room: &str) {
    let mut client = server.join("normal-user", room).await;
    let snap = client.sync("normal-user", 3.0).await;
    assert_eq!(users(&snap), ["normal-user"]);
    client.close().await;
}

/// Parses the Prometheus text format into `name{labels}` → value.
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap();
            (name.to_owned(), value.parse().unwrap())
        })
        .collect()
}

pub async fn metrics(server: &Server) -> HashMap<String, f64> {
    let (code, body) = server.get("/metrics").await;
    assert_eq!(code, 200);
    parse_metrics(&body)
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `within`.
pub async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    within: Duration,
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The embedded store's file in a data folder (as the server names it).
pub fn db_path(dir: &Path) -> PathBuf {
    dir.join("boards.sqlite3")
}

/// Creates the embedded store's table in `dir` and stores `shapes_text` (the
/// row's raw text) for `room`, as an earlier server would have.
pub fn seed_store(dir: &Path, room: &str, shapes_text: &str) {
    // The store's own schema, created as the server creates it.
    drop(worker::store::sqlite::SqliteStore::open(&db_path(dir)).unwrap());
    let conn = rusqlite::Connection::open(db_path(dir)).unwrap();
    conn.execute(
        "INSERT INTO boards (room_id, shapes, updated_at_ms) VALUES (?1, ?2, 0)",
        rusqlite::params![room, shapes_text],
    )
    .unwrap();
}

/// A text shape as an earlier server stored it: id `s{i}`, x = `i`.
pub fn stored_text_shape(i: usize, text: &str) -> Value {
    json!({"id":format!("s{i}"),"type":"text","x":i,"y":2,"width":3,"height":4,"userId":"earlier",
        "timestamp":"2024-01-01T12:00:00.000Z","text":text,"fill":"#111111","stroke":"#222222","rotation":0})
}

/// Files in `<data>/unsaved/` whose name starts with `prefix`.
pub fn fallback_files(data: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(data.join("unsaved")) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("{prefix}-"))
        })
        .collect();
    files.sort();
    files
}

/// The shapes of a fallback file (the backend's save body).
pub fn fallback_shapes(file: &Path) -> Value {
    let body: Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    assert_eq!(body["data"]["cursors"], json!([]), "{body}");
    body["data"]["shapes"].clone()
}

/// A stored board of `count` text shapes of `chars` characters each (ids
/// `s0`…, x = index): a full board of big shapes for the fault tests.
pub fn big_board(count: usize, chars: usize) -> Value {
    let text = "t".repeat(chars);
    Value::Array((0..count).map(|i| stored_text_shape(i, &text)).collect())
}

/// The children of process `pid`, whichever of its threads started them
/// (from `/proc`).
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut children: Vec<u32> = tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    children.sort();
    children
}

/// The load generator, its own crate's binary: built beside the server by
/// `cargo test --workspace` (the README's test command).
pub fn loadgen_exe() -> std::path::PathBuf {
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_session-server")).with_file_name("loadgen");
    assert!(
        exe.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or `cargo build -p loadgen` first)",
        exe.display()
    );
    exe
}
