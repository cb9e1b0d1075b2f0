//! The supervisor's metrics, served at `/metrics` in the Prometheus text format
//! (`prometheus-client`). Workers report their frame counts and save outcomes over
//! IPC; gauges of current state are read at scrape time.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry as PromRegistry;

use crate::budgets::PreAuthClosed;
use contract::config::HathoraInfo;
use contract::ipc::WorkerId;

/// Why a connection was refused: `connections_rejected_total{reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Rejected {
    /// Why it was refused.
    pub reason: Rejection,
}

/// Every reason a connection is refused (the label values are the snake_case
/// names dashboards already use).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Rejection {
    /// A plain HTTP request to the WebSocket path.
    NotWebsocket,
    /// The server is shutting down.
    Draining,
    /// The token did not verify (`auth_failures_total` says why).
    Unauthorized,
    /// Every session place taken (`--max-connections` less the pre-auth
    /// share): an upgrade answered 503.
    TooManyConnections,
    /// No worker can take another room.
    NoCapacity,
    /// The memory budget is nearly spent: no new room.
    Memory,
    /// The room has its maximum of members.
    RoomFull,
    /// The user is already in the room (and replacing is off).
    DuplicateUser,
    /// The client sent faster than its rate limit.
    RateLimit,
    /// A client frame over `--max-message-bytes`.
    MessageTooBig,
}

impl Rejection {
    fn label(self) -> &'static str {
        match self {
            Rejection::NotWebsocket => "not_websocket",
            Rejection::Draining => "draining",
            Rejection::Unauthorized => "unauthorized",
            Rejection::TooManyConnections => "too_many_connections",
            Rejection::NoCapacity => "no_capacity",
            Rejection::Memory => "memory",
            Rejection::RoomFull => "room_full",
            Rejection::DuplicateUser => "duplicate_user",
            Rejection::RateLimit => "rate_limit",
            Rejection::MessageTooBig => "message_too_big",
        }
    }
}

impl EncodeLabelValue for Rejection {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.label())
    }
}

/// A reason label whose values the supervisor's own code names (an
/// authentication failure's, a TLS handshake failure's): fixed strings.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Why {
    /// A snake_case name from the code that failed
    /// ([`AuthError::reason`](crate::auth::AuthError::reason),
    /// [`failure_reason`](crate::tls::failure_reason), `timeout`).
    pub reason: &'static str,
}

/// A client frame's message type (`type="cursor_move"`), as the worker that
/// parsed it names it: a string over IPC.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    /// The message's `type`.
    pub r#type: &'static str,
}

/// The `worker` label of a per-worker metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Worker {
    /// Which worker.
    pub worker: WorkerLabel,
}

impl Worker {
    /// The label for worker `id`.
    pub fn of(id: WorkerId) -> Worker {
        Worker {
            worker: WorkerLabel(id),
        }
    }
}

/// A worker label reads as the worker's id (`w0`). A wrapper: the id is the
/// contract's, which the metrics library has no business in.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct WorkerLabel(pub WorkerId);

impl EncodeLabelValue for WorkerLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        write!(encoder, "{}", self.0)
    }
}

/// How an attempt ended (`result="ok"`): a save's, a certificate reload's.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `ok`, `failed`, or (saves) `no_board`.
    pub result: &'static str,
}

/// Every metric the server exposes, each named here as it appears at
/// `/metrics` (`session_server_` prefix; counters gain `_total`). One per
/// server, shared by the connection tasks (through [`Shared`](crate::Shared)),
/// the worker links (the workers' reports) and the pool (restarts). Every
/// series carries the Hathora process, region and app ids when the host sets
/// them.
pub struct Metrics {
    registry: PromRegistry,
    /// `connections`: open client WebSocket sessions.
    pub connections: Gauge,
    /// `connections_accepted_total`: WebSocket upgrades accepted.
    pub connections_accepted: Counter,
    /// `connections_rejected_total{reason}`: connections refused or closed by
    /// the server, by [`Rejection`].
    pub connections_rejected: Family<Rejected, Counter>,
    /// `auth_failures_total{reason}`: tokens refused, by
    /// [`AuthError::reason`](crate::auth::AuthError::reason).
    pub auth_failures: Family<Why, Counter>,
    /// `frames_rate_limited_total`: client frames that found their
    /// connection's message budget empty (delayed, or folded if a cursor move).
    pub frames_rate_limited: Counter,
    /// `cursor_moves_folded_total`: cursor moves over the budget replaced by a
    /// newer one before being sent.
    pub cursor_moves_folded: Counter,
    /// `connections_replaced_total`: connections that did not answer a ping
    /// when their user connected again, closed for the new one.
    pub connections_replaced: Counter,
    /// `binary_frames_total`: binary client frames, ignored (the protocol is
    /// text).
    pub binary_frames: Counter,
    /// `tls_handshake_failures_total{reason}`: failed TLS handshakes, by
    /// [`failure_reason`](crate::tls::failure_reason) or `timeout`.
    pub tls_handshake_failures: Family<Why, Counter>,
    /// `tls_reloads_total{result}`: re-reads of changed certificate files,
    /// `ok` or `failed` (the old certificate stays).
    pub tls_reloads: Family<Outcome, Counter>,
    /// `rooms`: rooms placed on workers (set at scrape time).
    pub rooms: Gauge,
    /// `rooms_by_worker{worker}`: rooms placed on each worker (set at scrape
    /// time).
    pub rooms_by_worker: Family<Worker, Gauge>,
    /// `workers_up`: worker processes running (set at scrape time).
    pub workers_up: Gauge,
    /// `worker_restarts_total{worker}`: processes started to replace a worker
    /// that failed.
    pub worker_restarts: Family<Worker, Counter>,
    /// `frames_in_total{type}`: valid client frames, by message type (counted
    /// by the workers).
    pub frames_in: Family<Kind, Counter>,
    /// `frames_ignored_total{reason}`: client frames the workers ignored, by
    /// their reason.
    pub frames_ignored: Family<Why, Counter>,
    /// `snapshots_sent_total`: snapshots written to clients (v1, and v2 full
    /// snapshots).
    pub snapshots_sent: Counter,
    /// `snapshot_bytes_total`: bytes of those snapshots.
    pub snapshot_bytes: Counter,
    /// `snapshots_skipped_total`: versions a slow client never received
    /// because a newer snapshot superseded them.
    pub snapshots_skipped: Counter,
    /// `connections_v2`: open sessions speaking protocol v2 (also in
    /// `connections`).
    pub connections_v2: Gauge,
    /// `connections_compressed`: open sessions that negotiated
    /// permessage-deflate (also in `connections`).
    pub connections_compressed: Gauge,
    /// `snapshots_compressed_total`: snapshots that came from the workers
    /// compressed, each once for all of its room's members.
    pub snapshots_compressed: Counter,
    /// `messages_compressed_total`: messages written to clients compressed.
    pub messages_compressed: Counter,
    /// `compressed_bytes_total`: payload bytes of those messages, as sent
    /// (`snapshot_bytes_total` and `ops_bytes_total` count them uncompressed).
    pub compressed_bytes: Counter,
    /// `messages_inflated_total`: compressed messages clients sent.
    pub messages_inflated: Counter,
    /// `refusals_told_total`: v2 `error` messages telling a client a room
    /// limit refused its messages.
    pub refusals_told: Counter,
    /// `ops_sent_total`: protocol v2 ops messages written to clients.
    pub ops_sent: Counter,
    /// `ops_bytes_total`: bytes of those ops messages.
    pub ops_bytes: Counter,
    /// `resyncs_total`: protocol v2 resync requests from clients.
    pub resyncs: Counter,
    /// `saves_total{result}`: the workers' save attempts, by
    /// [`SaveResult::label`](contract::ipc::SaveResult::label).
    pub saves: Family<Outcome, Counter>,
    /// `save_retries_total`: save attempts that followed a failed one.
    pub save_retries: Counter,
    /// `save_duration_seconds`: time of a save attempt, as the worker measured
    /// it (buckets 1 ms to ~16 s).
    pub save_duration: Histogram,
    /// `fanout_latency_seconds`: from a snapshot reaching the supervisor to
    /// its write to a client (buckets 50 µs to ~0.8 s).
    pub fanout_latency: Histogram,
    /// The same deliveries by bucket, for the monitor's p50 and p99 per second
    /// (not at `/metrics`).
    pub fanout_counts: LatencyCounts,
    /// Bytes written to clients as sent, compressed or not (the monitor's
    /// bytes out; not at `/metrics`, where the kinds are counted apart).
    pub bytes_sent: std::sync::atomic::AtomicU64,
    /// `ipc_queue_depth{worker}`: frames queued for each worker, not yet
    /// written to its socket (set at scrape time).
    pub ipc_queue_depth: Family<Worker, Gauge>,
    /// `pre_auth_connections`: main-port connections not yet authenticated,
    /// in the pre-auth share (set at scrape time).
    pub pre_auth_connections: Gauge,
    /// `pre_auth_closed_total{reason}`: connections not yet authenticated that
    /// the server closed, by [`PreAuthClosed::label`].
    pub pre_auth_closed: Family<Why, Counter>,
    /// `internal_connections_closed_total`: internal-port connections closed
    /// to make room for a newer one (its places all taken).
    pub internal_connections_closed: Counter,
    /// `memory_resident_bytes`: resident memory of the supervisor and its
    /// workers, as the memory budget last measured it.
    pub memory_resident: Gauge,
    /// `memory_limit_bytes`: the memory budget (`--memory-limit` or the
    /// cgroup's limit; 0: none).
    pub memory_limit: Gauge,
}

impl Metrics {
    /// Every metric at zero, registered under `session_server_` with the
    /// Hathora ids that `hathora` has as constant labels.
    pub fn new(hathora: &HathoraInfo) -> Metrics {
        let labels: Vec<(Cow<'static, str>, Cow<'static, str>)> = [
            ("hathora_process_id", &hathora.process_id),
            ("hathora_region", &hathora.region),
            ("hathora_app_id", &hathora.app_id),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (Cow::Borrowed(k), Cow::Owned(v))))
        .collect();
        let mut registry =
            PromRegistry::with_prefix_and_labels("session_server", labels.into_iter());
        let m = Metrics {
            connections: Gauge::default(),
            connections_accepted: Counter::default(),
            connections_rejected: Family::default(),
            auth_failures: Family::default(),
            frames_rate_limited: Counter::default(),
            cursor_moves_folded: Counter::default(),
            connections_replaced: Counter::default(),
            binary_frames: Counter::default(),
            tls_handshake_failures: Family::default(),
            tls_reloads: Family::default(),
            rooms: Gauge::default(),
            rooms_by_worker: Family::default(),
            workers_up: Gauge::default(),
            worker_restarts: Family::default(),
            frames_in: Family::default(),
            frames_ignored: Family::default(),
            snapshots_sent: Counter::default(),
            snapshot_bytes: Counter::default(),
            snapshots_skipped: Counter::default(),
            connections_v2: Gauge::default(),
            connections_compressed: Gauge::default(),
            snapshots_compressed: Counter::default(),
            messages_compressed: Counter::default(),
            compressed_bytes: Counter::default(),
            messages_inflated: Counter::default(),
            refusals_told: Counter::default(),
            ops_sent: Counter::default(),
            ops_bytes: Counter::default(),
            resyncs: Counter::default(),
            saves: Family::default(),
            save_retries: Counter::default(),
            // 1 ms .. ~16 s
            save_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            // 50 µs .. ~0.8 s
            fanout_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 15)),
            fanout_counts: Default::default(),
            bytes_sent: Default::default(),
            ipc_queue_depth: Family::default(),
            pre_auth_connections: Gauge::default(),
            pre_auth_closed: Family::default(),
            internal_connections_closed: Counter::default(),
            memory_resident: Gauge::default(),
            memory_limit: Gauge::default(),
            registry: PromRegistry::default(),
        };
        registry.register(
            "connections",
            "Open client WebSocket connections",
            m.connections.clone(),
        );
        registry.register(
            "connections_accepted",
            "WebSocket upgrades accepted",
            m.connections_accepted.clone(),
        );
        registry.register(
            "connections_rejected",
            "Connections refused or closed by the server, by reason",
            m.connections_rejected.clone(),
        );
        registry.register(
            "auth_failures",
            "Tokens refused, by reason",
            m.auth_failures.clone(),
        );
        registry.register(
            "frames_rate_limited",
            "Client frames that found their connection's message budget empty (delayed, or folded if a cursor move)",
            m.frames_rate_limited.clone(),
        );
        registry.register(
            "cursor_moves_folded",
            "Cursor moves over the message budget replaced by a newer one before being sent",
            m.cursor_moves_folded.clone(),
        );
        registry.register(
            "connections_replaced",
            "Connections that did not answer a ping when their user connected again, replaced by the new connection",
            m.connections_replaced.clone(),
        );
        registry.register(
            "binary_frames",
            "Binary client frames, ignored (the protocol is text)",
            m.binary_frames.clone(),
        );
        registry.register(
            "pre_auth_connections",
            "Main-port connections not yet authenticated (the pre-auth share)",
            m.pre_auth_connections.clone(),
        );
        registry.register(
            "pre_auth_closed",
            "Connections not yet authenticated closed by the server, by reason (address_full, share_full: to make room for a newer one; idle_under_pressure, timeout: no request in time)",
            m.pre_auth_closed.clone(),
        );
        registry.register(
            "internal_connections_closed",
            "Internal-port connections closed to make room for a newer one (all its places taken)",
            m.internal_connections_closed.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by reason (not_tls: plain HTTP to the TLS port)",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "tls_reloads",
            "Re-reads of changed TLS certificate files, by result",
            m.tls_reloads.clone(),
        );
        registry.register("rooms", "Rooms placed on workers", m.rooms.clone());
        registry.register(
            "rooms_by_worker",
            "Rooms placed on each worker",
            m.rooms_by_worker.clone(),
        );
        registry.register(
            "workers_up",
            "Worker processes running",
            m.workers_up.clone(),
        );
        registry.register(
            "worker_restarts",
            "Worker processes replaced after a failure",
            m.worker_restarts.clone(),
        );
        registry.register(
            "memory_resident_bytes",
            "Resident memory of the supervisor and its workers",
            m.memory_resident.clone(),
        );
        registry.register(
            "memory_limit_bytes",
            "The memory budget (0: none)",
            m.memory_limit.clone(),
        );
        registry.register(
            "frames_in",
            "Valid client frames, by message type",
            m.frames_in.clone(),
        );
        registry.register(
            "frames_ignored",
            "Client frames ignored, by reason",
            m.frames_ignored.clone(),
        );
        registry.register(
            "snapshots_sent",
            "Snapshots written to clients",
            m.snapshots_sent.clone(),
        );
        registry.register(
            "snapshot_bytes",
            "Bytes of snapshots written to clients",
            m.snapshot_bytes.clone(),
        );
        registry.register(
            "snapshots_skipped",
            "Snapshots a slow client skipped because a newer one superseded them",
            m.snapshots_skipped.clone(),
        );
        registry.register(
            "connections_v2",
            "Open connections speaking protocol v2 (in `connections` too)",
            m.connections_v2.clone(),
        );
        registry.register(
            "connections_compressed",
            "Open connections that negotiated permessage-deflate (in `connections` too)",
            m.connections_compressed.clone(),
        );
        registry.register(
            "snapshots_compressed",
            "Snapshots the workers compressed, each once for all members of its room",
            m.snapshots_compressed.clone(),
        );
        registry.register(
            "messages_compressed",
            "Messages written to clients compressed (permessage-deflate)",
            m.messages_compressed.clone(),
        );
        registry.register(
            "compressed_bytes",
            "Payload bytes of the messages written compressed, as sent",
            m.compressed_bytes.clone(),
        );
        registry.register(
            "refusals_told",
            "v2 error messages telling a client a room limit refused its messages",
            m.refusals_told.clone(),
        );
        registry.register(
            "messages_inflated",
            "Compressed messages from clients, inflated",
            m.messages_inflated.clone(),
        );
        registry.register(
            "ops_sent",
            "Protocol v2 ops messages written to clients (v2 snapshots count as snapshots)",
            m.ops_sent.clone(),
        );
        registry.register(
            "ops_bytes",
            "Bytes of protocol v2 ops messages written to clients",
            m.ops_bytes.clone(),
        );
        registry.register(
            "resyncs",
            "Protocol v2 resync requests from clients",
            m.resyncs.clone(),
        );
        registry.register("saves", "Save attempts, by result", m.saves.clone());
        registry.register(
            "save_retries",
            "Save attempts after a failed one",
            m.save_retries.clone(),
        );
        registry.register(
            "save_duration_seconds",
            "Time of a save attempt",
            m.save_duration.clone(),
        );
        registry.register(
            "fanout_latency_seconds",
            "From a snapshot reaching the supervisor to its write to a client",
            m.fanout_latency.clone(),
        );
        registry.register(
            "ipc_queue_depth",
            "Frames queued for each worker",
            m.ipc_queue_depth.clone(),
        );
        Metrics { registry, ..m }
    }

    /// A changed certificate was loaded (`ok`) or refused (`failed`).
    pub fn tls_reload(&self, loaded: bool) {
        let result = if loaded { "ok" } else { "failed" };
        self.tls_reloads.get_or_create(&Outcome { result }).inc();
    }

    /// A TLS handshake failed, for `reason`.
    pub fn tls_failure(&self, reason: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&Why { reason })
            .inc();
    }

    /// A connection not yet authenticated was closed by the server.
    pub fn pre_auth_closed(&self, reason: PreAuthClosed) {
        self.pre_auth_closed
            .get_or_create(&Why {
                reason: reason.label(),
            })
            .inc();
    }

    /// A connection was refused or closed by the server, for `reason`.
    pub fn reject(&self, reason: Rejection) {
        self.connections_rejected
            .get_or_create(&Rejected { reason })
            .inc();
    }

    /// A token was refused, for `reason`.
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures.get_or_create(&Why { reason }).inc();
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Fan-out latency buckets: upper bounds 50 µs × 2^i (the `/metrics`
/// histogram's), the last one for anything slower.
pub const LATENCY_BUCKETS: usize = 16;

/// Fan-out latencies counted by bucket, so that the monitor's sampler
/// (`history`) can tell the last second's p50 and p99 (the `/metrics` histogram cannot be read back).
#[derive(Default)]
pub struct LatencyCounts([AtomicU64; LATENCY_BUCKETS]);

impl LatencyCounts {
    /// One delivery `seconds` after its change was ready.
    pub fn observe(&self, seconds: f64) {
        let mut bound = 0.000_05;
        let mut bucket = 0;
        while bucket < LATENCY_BUCKETS - 1 && seconds > bound {
            bound *= 2.0;
            bucket += 1;
        }
        self.0[bucket].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn read(&self) -> [u64; LATENCY_BUCKETS] {
        std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worker label is typed; what a scrape shows is unchanged.
    #[test]
    fn a_worker_label_shows_the_worker_id() {
        let m = Metrics::new(&HathoraInfo::default());
        let worker = Worker::of(WorkerId(3));
        m.worker_restarts.get_or_create(&worker).inc();
        m.rooms_by_worker.get_or_create(&worker).set(2);
        let text = m.encode();
        assert!(
            text.contains("session_server_worker_restarts_total{worker=\"w3\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("session_server_rooms_by_worker{worker=\"w3\"} 2\n"),
            "{text}"
        );
    }
}
