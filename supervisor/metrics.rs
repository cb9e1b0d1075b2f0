//! The supervisor's metrics, served at `/metrics` in the Prometheus text format
//! (`prometheus-client`). Workers report their frame counts and save outcomes over
//! IPC; gauges of current state are read at scrape time.

use std::borrow::Cow;
use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry as PromRegistry;

use contract::config::HathoraInfo;
use contract::ipc::WorkerId;

/// A reason label whose values come from the worker (frames it ignored, by
/// why): strings over IPC.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

/// Why a connection was refused: `connections_rejected_total{reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Rejected {
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
    /// `--max-connections` reached.
    TooManyConnections,
    /// No worker can take another room.
    NoCapacity,
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
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Worker {
    pub worker: WorkerLabel,
}

impl Worker {
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub result: &'static str,
}

pub struct Metrics {
    registry: PromRegistry,
    pub connections: Gauge,
    pub connections_accepted: Counter,
    pub connections_rejected: Family<Rejected, Counter>,
    pub auth_failures: Family<Why, Counter>,
    pub frames_rate_limited: Counter,
    pub cursor_moves_folded: Counter,
    pub connections_replaced: Counter,
    pub binary_frames: Counter,
    pub tls_handshake_failures: Family<Why, Counter>,
    pub tls_reloads: Family<Outcome, Counter>,
    pub rooms: Gauge,
    pub rooms_by_worker: Family<Worker, Gauge>,
    pub workers_up: Gauge,
    pub worker_restarts: Family<Worker, Counter>,
    pub frames_in: Family<Kind, Counter>,
    pub frames_ignored: Family<Reason, Counter>,
    pub snapshots_sent: Counter,
    pub snapshot_bytes: Counter,
    pub snapshots_skipped: Counter,
    pub connections_v2: Gauge,
    pub ops_sent: Counter,
    pub ops_bytes: Counter,
    pub resyncs: Counter,
    pub saves: Family<Outcome, Counter>,
    pub save_retries: Counter,
    pub save_duration: Histogram,
    pub fanout_latency: Histogram,
    pub ipc_queue_depth: Family<Worker, Gauge>,
}

impl Metrics {
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
            ops_sent: Counter::default(),
            ops_bytes: Counter::default(),
            resyncs: Counter::default(),
            saves: Family::default(),
            save_retries: Counter::default(),
            // 1 ms .. ~16 s
            save_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            // 50 µs .. ~0.8 s
            fanout_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 15)),
            ipc_queue_depth: Family::default(),
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

    pub fn tls_failure(&self, reason: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&Why { reason })
            .inc();
    }

    pub fn reject(&self, reason: Rejection) {
        self.connections_rejected
            .get_or_create(&Rejected { reason })
            .inc();
    }

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
