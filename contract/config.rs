//! Configuration: command-line flags with environment fallbacks, turned once into
//! a validated [`Config`] (bad configuration stops start-up with one clear line).

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

/// The command line: serve (the supervisor), or `worker` (what the supervisor
/// starts).
#[derive(Debug, Parser)]
#[command(
    name = "session-server",
    version,
    about = "Real-time session server for collaborative whiteboards: a supervisor owning client connections and worker processes owning rooms"
)]
pub struct Cli {
    /// A role other than the server, if one is named.
    #[command(subcommand)]
    pub mode: Option<Mode>,
    /// The flags of the server, the default role.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// The roles the binary runs besides the server.
#[derive(Debug, Subcommand)]
pub enum Mode {
    /// Internal: run as a room worker for the supervisor that spawned this process.
    #[command(hide = true)]
    Worker(WorkerArgs),
    /// Internal: replay a room (a `contract::ipc::Salvage` on stdin) into a
    /// fallback file, for the supervisor that spawned this process.
    #[command(hide = true)]
    Salvage(SalvageArgs),
}

/// Flags of the server (the supervisor; workers get theirs from it).
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Port to listen on (0 picks a free port; the log says which).
    #[arg(long, env = "PORT", default_value_t = 8000)]
    pub port: u16,
    /// A second port, plain HTTP, for `/healthz`, `/readyz`, `/metrics`,
    /// `/status` and `/admin` only, with connections of its own: the probes
    /// answer even when clients hold every `--max-connections` place [default:
    /// none].
    #[arg(long, env = "INTERNAL_PORT")]
    pub internal_port: Option<u16>,
    /// Address to listen on [default: 0.0.0.0; in dev mode 127.0.0.1].
    #[arg(long, env = "BIND_ADDRESS")]
    pub bind: Option<IpAddr>,
    /// Number of worker processes [default: the CPUs this process may use,
    /// rounding a cgroup CPU quota up: 0.5 CPU → 1].
    #[arg(long, env = "WORKERS")]
    pub workers: Option<usize>,
    /// Total rooms this server holds (Hathora's rooms-per-process); past it,
    /// new rooms get HTTP 503 [default: workers × rooms per worker].
    #[arg(long, env = "HATHORA_ROOMS_PER_PROCESS")]
    pub max_rooms: Option<usize>,
    /// Most rooms one worker holds [default: max rooms / workers, rounded up, or
    /// 100 without a max].
    #[arg(long, env = "ROOMS_PER_WORKER")]
    pub rooms_per_worker: Option<usize>,
    /// Most open connections (HTTP and WebSocket) at once; beyond it new TCP
    /// connections are closed at once. Stay under the process's file descriptor limit.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 15_000)]
    pub max_connections: usize,
    /// Memory the server's processes (supervisor and workers) may hold, in
    /// bytes, or with a suffix (`K`, `M`, `G`; `Ki`, `Mi`, `Gi`); near it new
    /// rooms get 503 and new shapes are refused, before the kernel's OOM killer
    /// decides; `0`: no budget [default: the memory cgroup's limit, if any].
    #[arg(long, env = "MEMORY_LIMIT", value_parser = parse_memory_size)]
    pub memory_limit: Option<u64>,
    /// A client must send its HTTP request headers within this.
    #[arg(long, env = "HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// Largest client message; larger closes the connection with 1009.
    #[arg(long, env = "MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,
    /// Client messages per second per connection (token bucket rate). Over it a
    /// client is slowed down, never dropped: its socket is not read until the
    /// budget allows its next message, and its unsent cursor moves are folded into
    /// the newest. The real client peaks at ~260/s (a 240 Hz mouse while dragging).
    #[arg(long, env = "RATE_LIMIT_PER_SEC", default_value_t = 500)]
    pub rate_limit_per_sec: u32,
    /// Token bucket size: how many messages a client may send at once (a paste of
    /// this many shapes goes through without waiting).
    #[arg(long, env = "RATE_LIMIT_BURST", default_value_t = 1000)]
    pub rate_limit_burst: u32,
    /// A client that, in this many consecutive seconds, sent more than half its
    /// per-second budget over the budget (1.5× the rate) is closed with 1008
    /// "Rate limit". 0: never.
    #[arg(long, env = "RATE_LIMIT_CLOSE_AFTER_SECS", default_value_t = 10)]
    pub rate_limit_close_after_secs: u32,
    /// Development mode: a generated secret when none is given, a whiteboard page
    /// at `/`, a token endpoint for it, and the room monitor without a token.
    #[arg(long, env = "SESSION_SERVER_DEV", default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub dev: bool,
    /// Bearer token for the room monitor (`/admin`); without it (and outside dev
    /// mode) the monitor is off.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,
    /// Accept secrets shorter than 16 bytes (for development only).
    #[arg(long, env = "ALLOW_WEAK_SECRET", default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub allow_weak_secret: bool,
    /// Secret that verifies client tokens (HS256). Prefer the environment variable.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,
    /// Require the token's `host` claim (and check it against the Host header).
    /// Set to false for backends that do not set the claim; a present claim is
    /// still checked.
    #[arg(long, env = "REQUIRE_HOST_CLAIM", default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub require_host_claim: bool,
    /// Interval between pings to an idle client; a client silent for two
    /// intervals is dropped.
    #[arg(long, env = "PING_INTERVAL_MS", default_value_t = 30_000)]
    pub ping_interval_ms: u64,
    /// When a user connects to a room their earlier connection is still in, that
    /// one is pinged; silent for this long, it is replaced by the new one
    /// (a dropped network leaves such ghosts). If it answers, the new one is
    /// refused with 1008 "Duplicate user".
    #[arg(long, env = "TAKEOVER_WAIT_MS", default_value_t = 2_000)]
    pub takeover_wait_ms: u64,
    /// Messages per second a member gets at most once its room sends it more
    /// than `--member-bytes-per-sec` (always the newest state). 0: no cap.
    #[arg(long, env = "MAX_SNAPSHOT_HZ", default_value_t = 60)]
    pub max_snapshot_hz: u32,
    /// What a member may be sent per second before `--max-snapshot-hz`
    /// applies: the bytes of every change its room makes (compressed where
    /// compressed) plus 512 for each message. Below it, every change goes
    /// out at once. 0: the rate always applies.
    #[arg(long, env = "MEMBER_BYTES_PER_SEC", default_value_t = 256 * 1024)]
    pub member_bytes_per_sec: u64,
    /// permessage-deflate (RFC 7692) with clients that offer it (every
    /// browser does): snapshots compressed once per room version for all
    /// such members, client messages inflated within `--max-message-bytes`.
    #[arg(long, env = "COMPRESSION", value_enum, default_value_t = Switch::On)]
    pub compression: Switch,
    /// TLS certificate chain (PEM). With `--tls-key`, the port serves HTTPS and
    /// `wss://`; without both, plain HTTP and `ws://`.
    #[arg(long, env = "TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) matching `--tls-cert`.
    #[arg(long, env = "TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How often the TLS files are checked for a change (then re-read).
    #[arg(long, env = "TLS_RELOAD_CHECK_MS", default_value_t = 10_000)]
    pub tls_reload_check_ms: u64,
    /// Board persistence service (PROTOCOL.md §5). Unset: the embedded store.
    #[arg(long, env = "BACKEND_URL")]
    pub backend_url: Option<String>,
    /// Secret that signs requests to the backend; required with a backend.
    #[arg(long, env = "SESSION_SERVER_SECRET", hide_env_values = true)]
    pub session_server_secret: Option<Secret>,
    /// Folder of the embedded store (used when no backend is set).
    #[arg(long, env = "DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Save a room once it has been quiet this long after a shape change.
    #[arg(long, env = "PERSIST_DEBOUNCE_MS", default_value_t = 2_000)]
    pub persist_debounce_ms: u64,
    /// Save a room at the latest this long after its first unsaved change.
    #[arg(long, env = "PERSIST_MAX_WAIT_MS", default_value_t = 10_000)]
    pub persist_max_wait_ms: u64,
    /// How long members of a new room wait for its shapes to load before they are
    /// admitted to a degraded room (the load keeps retrying; nothing is saved until
    /// it succeeds).
    #[arg(long, env = "LOAD_WAIT_MS", default_value_t = 5_000)]
    pub load_wait_ms: u64,
    /// On SIGTERM, SIGINT or SIGHUP, time allowed for the whole shutdown, from the
    /// signal to exit: saves get all but a reserve for closing clients and
    /// stopping workers. The default fits the 10 s that `docker stop` and
    /// Kubernetes allow before SIGKILL, with a margin.
    #[arg(long, env = "SHUTDOWN_GRACE_MS", default_value_t = 9_000)]
    pub shutdown_grace_ms: u64,
    /// Run the Agones SDK lifecycle (Ready, Health, the `rooms` Counter). On by
    /// itself when `AGONES_SDK_GRPC_PORT` is set, as Agones sets it in the pod.
    /// Needs a build with the `agones` feature (the container image has it).
    #[arg(long, env = "SESSION_SERVER_AGONES", default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub agones: bool,
    /// Port of the Agones SDK server (the sidecar in the pod), on localhost.
    #[arg(long, env = "AGONES_SDK_GRPC_PORT")]
    pub agones_sdk_port: Option<u16>,
    /// What an Agones game server does when its last room closes: `ready` goes
    /// back to the fleet's pool, `shutdown` ends it (one-session servers).
    #[arg(long, env = "AGONES_WHEN_EMPTY", value_enum, default_value_t = WhenEmpty::Ready)]
    pub agones_when_empty: WhenEmpty,
    /// How an Agones game server tells the fleet its rooms: `list`, a List
    /// `rooms` of their ids (an allocation finds a room's server with
    /// `containsValue`), or `counter`, a Counter `rooms` of how many (fleets
    /// that declare only the Counter).
    #[arg(long, env = "AGONES_ROOMS", value_enum, default_value_t = RoomsModel::List)]
    pub agones_rooms: RoomsModel,
    /// After this long, an Agones game server takes no more allocations and shuts
    /// down once it is empty (GameFabric recommends at most 24 h). Unset: never.
    #[arg(long, env = "AGONES_MAX_LIFETIME_SECS")]
    pub agones_max_lifetime_secs: Option<u64>,
    /// How long an allocation may wait for its room to open before its place is
    /// given back, and how long an allocated server stays empty before it goes
    /// back to `Ready` or shuts down (`--agones-when-empty`): a page reload or a
    /// client still connecting keeps its server.
    #[arg(long, env = "AGONES_EMPTY_GRACE_MS", default_value_t = 30_000)]
    pub agones_empty_grace_ms: u64,
    /// Interval of `Health()` pings, well inside the fleet's `health.periodSeconds`.
    #[arg(long, env = "AGONES_HEALTH_INTERVAL_MS", default_value_t = 2_000)]
    pub agones_health_interval_ms: u64,
    /// How long to wait at start-up for the Agones SDK server (the sidecar can
    /// start after this container); unreachable by then: exit 2.
    #[arg(long, env = "AGONES_CONNECT_TIMEOUT_MS", default_value_t = 30_000)]
    pub agones_connect_timeout_ms: u64,
}

/// A feature turned on or off (`--compression on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// Used.
    On,
    /// Not used.
    Off,
}

/// What an Agones game server does when its last room closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WhenEmpty {
    /// Back to `Ready`: the fleet may allocate it again.
    Ready,
    /// `Shutdown`: Agones removes it (and the process exits 0).
    Shutdown,
}

/// The most values an Agones List holds (its capacity's upper bound).
pub const AGONES_LIST_MAX: usize = 1000;

/// How an Agones game server tells the fleet its rooms (`--agones-rooms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoomsModel {
    /// A List `rooms`: the ids of the rooms held; capacity `--max-rooms`.
    List,
    /// A Counter `rooms`: how many rooms are held; capacity `--max-rooms`.
    Counter,
}

/// The Agones SDK lifecycle (`--agones`).
#[derive(Debug, Clone)]
pub struct AgonesSettings {
    /// The SDK server's port; `None`: the SDK's default (9357).
    pub sdk_port: Option<u16>,
    /// What to do when the last room closes (`--agones-when-empty`).
    pub when_empty: WhenEmpty,
    /// The List or the Counter (`--agones-rooms`).
    pub rooms: RoomsModel,
    /// Past this, no more allocations, and shut down once empty.
    pub max_lifetime: Option<Duration>,
    /// How long an allocation waits for its room, and an allocated server
    /// stays empty, before it gives its place back (`--agones-empty-grace-ms`).
    pub empty_grace: Duration,
    /// Between two `Health()` pings.
    pub health_interval: Duration,
    /// How long start-up waits for the SDK server.
    pub connect_timeout: Duration,
}

/// Flags of a worker process, set by the supervisor that spawns it.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Name of the supervisor's local socket to connect to.
    #[arg(long)]
    pub ipc: String,
    /// Slot of this worker in the supervisor's pool (for its logs).
    #[arg(long)]
    pub worker_id: u32,
}

/// Flags of `session-server salvage`.
#[derive(Debug, Clone, Args)]
pub struct SalvageArgs {
    /// One replay, run by the salvage process itself (it retries without the
    /// events that crash it).
    #[arg(long)]
    pub attempt: bool,
}

/// Environment variable carrying the handshake nonce from supervisor to worker
/// (the environment of a process is readable only by its owner, unlike argv).
pub const WORKER_NONCE_ENV: &str = "SESSION_SERVER_WORKER_NONCE";

/// Validated server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Port to listen on (0: a free one).
    pub port: u16,
    /// The internal port (health, metrics, monitor), if any.
    pub internal_port: Option<u16>,
    /// Address to listen on.
    pub bind: IpAddr,
    /// Worker processes.
    pub workers: usize,
    /// Most rooms one worker holds.
    pub rooms_per_worker: usize,
    /// Total rooms across all workers.
    pub max_rooms: usize,
    /// Where this process runs, when Hathora runs it (for logs and metrics).
    pub hathora: HathoraInfo,
    /// How long a user's earlier connection may stay silent to a ping before a
    /// new connection of the user replaces it.
    pub takeover_wait: Duration,
    /// Serve TLS with these files (re-read when they change).
    pub tls: Option<TlsFiles>,
    /// How often the TLS files are checked for a change.
    pub tls_reload_check: Duration,
    /// Verifies client tokens (HS256); generated in dev mode when none is given.
    pub jwt_secret: Secret,
    /// Tokens must carry a `host` claim (a present one is checked either way).
    pub require_host_claim: bool,
    /// Between pings to an idle client; silent for two, it is dropped.
    pub ping_interval: Duration,
    /// Least time between two messages to one member (`--max-snapshot-hz`),
    /// once its room sends it more than `member_bytes_per_sec`.
    pub snapshot_spacing: Option<Duration>,
    /// A member's byte budget (`--member-bytes-per-sec`).
    pub member_bytes_per_sec: u64,
    /// Negotiate permessage-deflate with clients that offer it (`--compression`).
    pub compression: bool,
    /// From the shutdown signal to exit, everything included.
    pub shutdown_grace: Duration,
    /// What clients may do.
    pub limits: Limits,
    /// Development mode (see `--dev`).
    pub dev: bool,
    /// Token for the room monitor, if it is on outside dev mode.
    pub admin_token: Option<Secret>,
    /// What workers need to persist rooms; sent to each worker at its handshake.
    pub persistence: PersistSettings,
    /// Agones SDK lifecycle, when on (`--agones` or `AGONES_SDK_GRPC_PORT`).
    pub agones: Option<AgonesSettings>,
}

/// Rooms per worker when neither it nor a total is given.
const DEFAULT_ROOMS_PER_WORKER: usize = 100;

/// Identity of the Hathora process, from the variables Hathora sets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HathoraInfo {
    /// `HATHORA_PROCESS_ID`.
    pub process_id: Option<String>,
    /// `HATHORA_REGION`.
    pub region: Option<String>,
    /// `HATHORA_APP_ID`.
    pub app_id: Option<String>,
}

/// What the settings depend on beyond the command line, read from the machine
/// by the binary (this crate does no I/O): the CPUs this process may use (a
/// cgroup quota rounded up) and the Hathora process's identity.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Host {
    /// CPUs this process may use: the default number of workers.
    pub cpus: usize,
    /// The memory cgroup's limit in bytes, if one is set.
    pub memory_limit: Option<u64>,
    /// The Hathora variables that are set.
    pub hathora: HathoraInfo,
}

/// Parses a memory size: bytes, or a number with a decimal (`K`, `M`, `G`) or
/// binary (`Ki`, `Mi`, `Gi`) suffix, as Kubernetes writes them (`1Gi`).
pub fn parse_memory_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size in bytes (e.g. 1073741824, 1024Mi, 1Gi)"))?;
    let unit: u64 = match suffix {
        "" => 1,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => {
            return Err(format!(
                "{text:?}: unknown size suffix {suffix:?} (K, M, G, Ki, Mi, Gi)"
            ));
        }
    };
    number
        .checked_mul(unit)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Parses a CPU quota as `"<quota> <period>"` (cgroup v2 `cpu.max`, or v1's two
/// files joined): `Some(cpus)`, or `None` when unlimited (`max`, `-1`) or unreadable.
pub fn cpu_quota(text: &str) -> Option<f64> {
    let mut parts = text.split_whitespace();
    let quota: f64 = parts.next()?.parse().ok()?;
    let period: f64 = parts.next().unwrap_or("100000").parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// Bounds on what clients may do (README, "Limits and security").
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Open connections (HTTP and WebSocket) at once; more are closed at once.
    pub max_connections: usize,
    /// Time a client has to send its HTTP request headers.
    pub handshake_timeout: Duration,
    /// Largest client message; larger closes the connection with 1009.
    pub max_message_bytes: usize,
    /// Client messages per second per connection (the token bucket's rate).
    pub rate_per_sec: u32,
    /// Messages a client may send at once (the token bucket's size).
    pub rate_burst: u32,
    /// Seconds in a row over 1.5× the rate before a client is closed with 1008
    /// "Rate limit"; 0: never.
    pub rate_close_after: u32,
    /// Bytes the server's processes may hold resident (`--memory-limit`, else
    /// the cgroup's limit); `None`: no budget.
    pub memory_limit: Option<u64>,
}

/// Shortest secret accepted without `--allow-weak-secret`: an HS256 key shorter
/// than this can be brute-forced from one token.
pub const MIN_SECRET_BYTES: usize = 16;

/// A secret (`JWT_SECRET`, `SESSION_SERVER_SECRET`, `ADMIN_TOKEN`): it never
/// shows in logs or `Debug` output, from the command line on.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Secret(pub String);

impl Secret {
    /// The secret itself, for the code that signs or checks with it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Length in bytes (see [`MIN_SECRET_BYTES`]).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Empty: given, but counted as not set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// The PEM files of the server's TLS certificate chain and key.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    /// The certificate chain (`--tls-cert`).
    pub cert: PathBuf,
    /// The private key (`--tls-key`).
    pub key: PathBuf,
}

/// Where boards are persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StoreConfig {
    /// The HTTP backend of PROTOCOL.md §5.
    Backend {
        /// `BACKEND_URL`, without a trailing `/`.
        url: String,
        /// `SESSION_SERVER_SECRET`, which signs the requests.
        secret: Secret,
    },
    /// The embedded SQLite store, one file.
    Embedded {
        /// The file: [`EMBEDDED_STORE_FILE`] in `--data-dir`.
        path: PathBuf,
    },
}

impl fmt::Display for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreConfig::Backend { url, .. } => write!(f, "HTTP backend at {url}"),
            StoreConfig::Embedded { path } => {
                write!(f, "embedded SQLite store at {}", path.display())
            }
        }
    }
}

/// The persistence policy, shared by every worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistSettings {
    /// Where boards are kept.
    pub store: StoreConfig,
    /// Save a room once it has been quiet this long after a shape change.
    pub debounce_ms: u64,
    /// Save a room at the latest this long after its first unsaved change.
    pub max_wait_ms: u64,
    /// How long members of a new room wait for its load before they are
    /// admitted to a degraded room.
    pub load_wait_ms: u64,
    /// `--data-dir`: where shapes no store would take are written
    /// (`unsaved/`), with a backend too.
    pub data_dir: PathBuf,
    /// The embedded store's file as the server's first worker opened it at
    /// start-up (its [`Configured`](crate::ipc::FromWorker::Configured) answer):
    /// later workers refuse to save into another file at that path (the folder
    /// was deleted or the file replaced). `None` with a backend, and for the
    /// first worker.
    pub store_identity: Option<FileIdentity>,
}

/// A file's identity, (device, inode): the embedded store's file is known by it,
/// so that a worker never writes into another file at the same path.
pub type FileIdentity = (u64, u64);

/// File name of the embedded store inside `--data-dir`.
pub const EMBEDDED_STORE_FILE: &str = "boards.sqlite3";

/// A configuration the server cannot run with: start-up stops with its message,
/// one line that says what to change.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// No `JWT_SECRET`, outside dev mode.
    #[error("JWT_SECRET is required: set it to the secret the backend signs client tokens with")]
    MissingJwtSecret,
    /// `--workers 0`.
    #[error("--workers must be at least 1")]
    NoWorkers,
    /// No room per worker, or none in all.
    #[error("--rooms-per-worker and HATHORA_ROOMS_PER_PROCESS must be at least 1")]
    NoRooms,
    /// A ping interval too short to measure an answer.
    #[error("--ping-interval-ms must be at least 10")]
    PingTooShort,
    /// A takeover wait too short for a live connection to answer.
    #[error(
        "--takeover-wait-ms must be at least 10 (a live connection needs time to answer a ping)"
    )]
    TakeoverTooShort,
    /// The named secret is shorter than [`MIN_SECRET_BYTES`], and
    /// `--allow-weak-secret` is not set.
    #[error(
        "{0} is shorter than {MIN_SECRET_BYTES} bytes: use a long random secret (or --allow-weak-secret for development)"
    )]
    WeakSecret(&'static str),
    /// A limit of 0 would refuse everything.
    #[error("the rate limit and the connection and message limits must be at least 1")]
    ZeroLimit,
    /// A backend without the secret that signs requests to it.
    #[error(
        "SESSION_SERVER_SECRET is required when BACKEND_URL is set: it signs the requests to the backend"
    )]
    MissingBackendSecret,
    /// A `BACKEND_URL` that is not HTTP(S) (the value given).
    #[error("BACKEND_URL must start with http:// or https://, got {0:?}")]
    BadBackendUrl(String),
    /// A maximum wait before a save shorter than its debounce.
    #[error("--persist-max-wait-ms must be at least --persist-debounce-ms")]
    MaxWaitBelowDebounce,
    /// Agones asked for, in a build without it.
    #[error(
        "--agones (or AGONES_SDK_GRPC_PORT) needs a build with the `agones` feature: cargo build --release --features agones (the container image has it)"
    )]
    AgonesNotBuilt,
    /// A health interval too short to be useful.
    #[error("--agones-health-interval-ms must be at least 10")]
    AgonesHealthTooShort,
    /// More rooms than an Agones List holds (the room limit given).
    #[error(
        "--max-rooms {0} is more than an Agones List holds (1000): lower it, or count rooms with --agones-rooms counter"
    )]
    AgonesListTooSmall(usize),
    /// Dev mode with a real `JWT_SECRET` on an address other than loopback
    /// (the address given).
    #[error(
        "dev mode with JWT_SECRET set listens only on loopback: --bind {0} would let anyone mint tokens that verify under that secret (unset JWT_SECRET, or drop --dev)"
    )]
    DevModePublic(IpAddr),
}

impl ServeArgs {
    /// Checks the arguments and resolves their defaults against `host`.
    pub fn validate(self, host: &Host) -> Result<Config, ConfigError> {
        let generated = || {
            format!(
                "{:016x}{:016x}",
                rand::random::<u64>(),
                rand::random::<u64>()
            )
        };
        let secret_given = self.jwt_secret.as_ref().is_some_and(|s| !s.is_empty());
        let jwt_secret = match self.jwt_secret.filter(|s| !s.is_empty()) {
            Some(secret) => secret,
            None if self.dev => Secret(generated()),
            None => return Err(ConfigError::MissingJwtSecret),
        };
        // Dev mode mints tokens for anyone (`/dev/token`) and opens the monitor:
        // with a real secret that is a skeleton key, so only on loopback.
        let bind = self.bind.unwrap_or(if self.dev {
            IpAddr::from([127, 0, 0, 1])
        } else {
            IpAddr::from([0, 0, 0, 0])
        });
        if self.dev && secret_given && !bind.is_loopback() {
            return Err(ConfigError::DevModePublic(bind));
        }
        if !self.allow_weak_secret && !self.dev && jwt_secret.len() < MIN_SECRET_BYTES {
            return Err(ConfigError::WeakSecret("JWT_SECRET"));
        }
        if self.max_connections == 0
            || self.max_message_bytes == 0
            || self.rate_limit_per_sec == 0
            || self.rate_limit_burst == 0
        {
            return Err(ConfigError::ZeroLimit);
        }
        let workers = self.workers.unwrap_or(host.cpus.max(1));
        if workers == 0 {
            return Err(ConfigError::NoWorkers);
        }
        let rooms_per_worker = match (self.rooms_per_worker, self.max_rooms) {
            (Some(n), _) => n,
            (None, Some(max)) => max.div_ceil(workers),
            (None, None) => DEFAULT_ROOMS_PER_WORKER,
        };
        let max_rooms = self.max_rooms.unwrap_or(rooms_per_worker * workers);
        if rooms_per_worker == 0 || max_rooms == 0 {
            return Err(ConfigError::NoRooms);
        }
        if self.ping_interval_ms < 10 {
            return Err(ConfigError::PingTooShort);
        }
        if self.takeover_wait_ms < 10 {
            return Err(ConfigError::TakeoverTooShort);
        }
        let store = match self.backend_url.filter(|u| !u.is_empty()) {
            Some(url) => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(ConfigError::BadBackendUrl(url));
                }
                let secret = self
                    .session_server_secret
                    .filter(|s| !s.is_empty())
                    .ok_or(ConfigError::MissingBackendSecret)?;
                if !self.allow_weak_secret && secret.len() < MIN_SECRET_BYTES {
                    return Err(ConfigError::WeakSecret("SESSION_SERVER_SECRET"));
                }
                StoreConfig::Backend {
                    url: url.trim_end_matches('/').to_owned(),
                    secret,
                }
            }
            None => StoreConfig::Embedded {
                path: self.data_dir.join(EMBEDDED_STORE_FILE),
            },
        };
        if self.persist_max_wait_ms < self.persist_debounce_ms {
            return Err(ConfigError::MaxWaitBelowDebounce);
        }
        let agones = if self.agones || self.agones_sdk_port.is_some() {
            if self.agones_health_interval_ms < 10 {
                return Err(ConfigError::AgonesHealthTooShort);
            }
            if self.agones_rooms == RoomsModel::List && max_rooms > AGONES_LIST_MAX {
                return Err(ConfigError::AgonesListTooSmall(max_rooms));
            }
            Some(AgonesSettings {
                sdk_port: self.agones_sdk_port,
                when_empty: self.agones_when_empty,
                rooms: self.agones_rooms,
                max_lifetime: self.agones_max_lifetime_secs.map(Duration::from_secs),
                empty_grace: Duration::from_millis(self.agones_empty_grace_ms),
                health_interval: Duration::from_millis(self.agones_health_interval_ms),
                connect_timeout: Duration::from_millis(self.agones_connect_timeout_ms),
            })
        } else {
            None
        };
        Ok(Config {
            port: self.port,
            internal_port: self.internal_port,
            bind,
            workers,
            rooms_per_worker,
            max_rooms,
            hathora: host.hathora.clone(),
            takeover_wait: Duration::from_millis(self.takeover_wait_ms),
            tls: self
                .tls_cert
                .zip(self.tls_key)
                .map(|(cert, key)| TlsFiles { cert, key }),
            tls_reload_check: Duration::from_millis(self.tls_reload_check_ms.max(10)),
            jwt_secret,
            require_host_claim: self.require_host_claim,
            ping_interval: Duration::from_millis(self.ping_interval_ms),
            snapshot_spacing: (self.max_snapshot_hz > 0)
                .then(|| Duration::from_secs(1) / self.max_snapshot_hz),
            compression: self.compression == Switch::On,
            member_bytes_per_sec: self.member_bytes_per_sec,
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            dev: self.dev,
            admin_token: self.admin_token.filter(|t| !t.is_empty()),
            limits: Limits {
                max_connections: self.max_connections,
                handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
                max_message_bytes: self.max_message_bytes,
                rate_per_sec: self.rate_limit_per_sec,
                rate_burst: self.rate_limit_burst,
                rate_close_after: self.rate_limit_close_after_secs,
                memory_limit: match self.memory_limit {
                    Some(0) => None,
                    Some(limit) => Some(limit),
                    None => host.memory_limit,
                },
            },
            agones,
            persistence: PersistSettings {
                store,
                debounce_ms: self.persist_debounce_ms,
                max_wait_ms: self.persist_max_wait_ms,
                load_wait_ms: self.load_wait_ms,
                data_dir: self.data_dir,
                store_identity: None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-CPU machine outside Hathora.
    fn host() -> Host {
        Host {
            cpus: 2,
            memory_limit: None,
            hathora: HathoraInfo::default(),
        }
    }

    #[test]
    fn memory_sizes_parse_as_kubernetes_writes_them() {
        assert_eq!(parse_memory_size("1073741824"), Ok(1 << 30));
        assert_eq!(parse_memory_size("1Gi"), Ok(1 << 30));
        assert_eq!(parse_memory_size("512Mi"), Ok(512 << 20));
        assert_eq!(parse_memory_size("2G"), Ok(2_000_000_000));
        assert_eq!(parse_memory_size("0"), Ok(0));
        assert!(parse_memory_size("1GB").is_err());
        assert!(parse_memory_size("lots").is_err());
        assert!(parse_memory_size("99999999999999Gi").is_err());
    }

    /// `--memory-limit` wins over the cgroup's; `0` turns the budget off.
    #[test]
    fn the_memory_budget_is_the_flag_or_the_cgroup_s_limit() {
        let mut cgroup = host();
        cgroup.memory_limit = Some(1 << 30);
        let budget = |args: &[&str], host: &Host| {
            let mut cli = parse(args);
            cli.serve.jwt_secret = Some(Secret("a-secret-of-sixteen-bytes".into()));
            cli.serve.validate(host).unwrap().limits.memory_limit
        };
        assert_eq!(budget(&[], &host()), None);
        assert_eq!(budget(&[], &cgroup), Some(1 << 30));
        assert_eq!(
            budget(&["--memory-limit", "512Mi"], &cgroup),
            Some(512 << 20)
        );
        assert_eq!(budget(&["--memory-limit", "0"], &cgroup), None);
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("session-server").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn missing_secret_is_a_configuration_error() {
        let cli = parse(&["--workers", "2"]);
        // The environment may define JWT_SECRET; the check is on the value.
        let mut serve = cli.serve;
        serve.jwt_secret = None;
        assert_eq!(
            serve.validate(&host()).unwrap_err(),
            ConfigError::MissingJwtSecret
        );
    }

    #[test]
    fn flags_become_a_config() {
        let cli = parse(&[
            "--port",
            "0",
            "--workers",
            "3",
            "--rooms-per-worker",
            "7",
            "--jwt-secret",
            "a-long-enough-secret",
            "--require-host-claim",
            "false",
        ]);
        let mut serve = cli.serve;
        serve.max_rooms = None;
        let config = serve.validate(&host()).unwrap();
        assert_eq!(config.port, 0);
        assert_eq!(config.workers, 3);
        assert_eq!(config.rooms_per_worker, 7);
        assert_eq!(config.max_rooms, 21);
        assert_eq!(config.jwt_secret.as_str(), "a-long-enough-secret");
        assert!(!config.require_host_claim);
    }

    #[test]
    fn no_secret_shows_in_debug_output() {
        let mut serve = parse(&["--jwt-secret", "jwt-secret-value-0123"]).serve;
        serve.admin_token = Some(Secret("admin-token-value-0123".into()));
        serve.backend_url = Some("http://localhost:3000".into());
        serve.session_server_secret = Some(Secret("backend-secret-value-0123".into()));
        let shown = format!("{serve:?} {:?}", serve.clone().validate(&host()).unwrap());
        for secret in [
            "jwt-secret-value",
            "admin-token-value",
            "backend-secret-value",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("Secret(***)"));
    }

    #[test]
    fn backend_needs_its_secret_and_an_http_url() {
        let mut serve = parse(&["--jwt-secret", "a-long-enough-secret"]).serve;
        serve.backend_url = Some("http://localhost:3000/".into());
        serve.session_server_secret = None;
        assert_eq!(
            serve.clone().validate(&host()).unwrap_err(),
            ConfigError::MissingBackendSecret
        );
        serve.session_server_secret = Some(Secret("b".into()));
        assert_eq!(
            serve.clone().validate(&host()).unwrap_err(),
            ConfigError::WeakSecret("SESSION_SERVER_SECRET")
        );
        serve.allow_weak_secret = true;
        let config = serve.clone().validate(&host()).unwrap();
        assert_eq!(
            config.persistence.store,
            StoreConfig::Backend {
                url: "http://localhost:3000".into(),
                secret: Secret("b".into())
            }
        );
        assert!(!format!("{:?}", config.persistence).contains("\"b\""));
        serve.backend_url = Some("localhost:3000".into());
        assert!(matches!(
            serve.validate(&host()).unwrap_err(),
            ConfigError::BadBackendUrl(_)
        ));
    }

    #[test]
    fn without_backend_the_embedded_store_is_used() {
        let mut serve = parse(&[
            "--jwt-secret",
            "a-long-enough-secret",
            "--data-dir",
            "/tmp/x",
        ])
        .serve;
        serve.backend_url = None;
        assert_eq!(
            serve.validate(&host()).unwrap().persistence.store,
            StoreConfig::Embedded {
                path: "/tmp/x/boards.sqlite3".into()
            }
        );
    }

    #[test]
    fn every_boolean_flag_is_a_bare_switch_and_still_takes_a_value() {
        let secret = ["--jwt-secret", "a-long-enough-secret"];
        let with = |extra: &[&str]| parse(&[&secret[..], extra].concat()).serve;
        let bare = with(&[
            "--dev",
            "--allow-weak-secret",
            "--agones",
            "--require-host-claim",
        ]);
        assert!(bare.dev && bare.allow_weak_secret && bare.agones && bare.require_host_claim);
        let off = with(&[
            "--dev=false",
            "--allow-weak-secret=false",
            "--agones=false",
            "--require-host-claim=false",
        ]);
        assert!(!off.dev && !off.allow_weak_secret && !off.agones && !off.require_host_claim);
        let spaced = with(&[
            "--allow-weak-secret",
            "false",
            "--require-host-claim",
            "false",
        ]);
        assert!(!spaced.allow_weak_secret && !spaced.require_host_claim);
        let defaults = with(&[]);
        assert!(
            !defaults.dev
                && !defaults.allow_weak_secret
                && !defaults.agones
                && defaults.require_host_claim
        );
    }

    #[test]
    fn an_agones_list_holds_at_most_1000_rooms_and_the_counter_any_number() {
        let args = [
            "--jwt-secret",
            "a-long-enough-secret",
            "--agones",
            "--max-rooms",
            "1001",
        ];
        let serve = parse(&args).serve;
        assert_eq!(serve.agones_rooms, RoomsModel::List);
        assert!(matches!(
            serve.validate(&host()),
            Err(ConfigError::AgonesListTooSmall(1001))
        ));
        let serve = parse(&[&args[..], &["--agones-rooms", "counter"]].concat()).serve;
        let config = serve.validate(&host()).unwrap();
        assert_eq!(config.agones.unwrap().rooms, RoomsModel::Counter);
        let serve = parse(&[
            "--jwt-secret",
            "a-long-enough-secret",
            "--agones",
            "--max-rooms",
            "1000",
        ])
        .serve;
        assert!(serve.validate(&host()).is_ok());
    }

    #[test]
    fn cgroup_cpu_quotas_are_parsed() {
        assert_eq!(cpu_quota("max 100000\n"), None);
        assert_eq!(cpu_quota("50000 100000\n"), Some(0.5));
        assert_eq!(cpu_quota("150000 100000"), Some(1.5));
        assert_eq!(cpu_quota("-1 100000"), None); // v1: unlimited
        assert_eq!(cpu_quota("200000"), Some(2.0));
        assert_eq!(cpu_quota(""), None);
        assert_eq!(cpu_quota("garbage"), None);
    }

    #[test]
    fn hathora_rooms_per_process_sets_the_total_and_the_share_per_worker() {
        let mut serve = parse(&["--jwt-secret", "a-long-enough-secret", "--workers", "3"]).serve;
        serve.max_rooms = Some(10);
        serve.rooms_per_worker = None;
        let config = serve.clone().validate(&host()).unwrap();
        assert_eq!((config.max_rooms, config.rooms_per_worker), (10, 4));
        serve.rooms_per_worker = Some(2);
        let config = serve.validate(&host()).unwrap();
        assert_eq!((config.max_rooms, config.rooms_per_worker), (10, 2));
    }

    #[test]
    fn weak_secrets_are_refused_unless_allowed() {
        let mut serve = parse(&["--jwt-secret", "short"]).serve;
        assert_eq!(
            serve.clone().validate(&host()).unwrap_err(),
            ConfigError::WeakSecret("JWT_SECRET")
        );
        serve.allow_weak_secret = true;
        assert!(serve.validate(&host()).is_ok());
    }

    #[test]
    fn zero_workers_is_refused() {
        let cli = parse(&["--workers", "0", "--jwt-secret", "a-long-enough-secret"]);
        assert_eq!(
            cli.serve.validate(&host()).unwrap_err(),
            ConfigError::NoWorkers
        );
    }
}
