//! The monitor's short memory (`/admin` plots it, `/admin/history` serves it):
//! one sample a second of what an operator asks at 3 a.m. (is traffic rising,
//! is fan-out getting slower, are saves failing, did a worker restart), for
//! the last 15 minutes, in rings of fixed size: no storage, nothing to
//! install, and memory that stays flat however long the server runs.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;

use super::Shared;
use super::metrics::{Kind, LATENCY_BUCKETS, Metrics, Outcome, Worker};
use super::rooms::RoomTraffic;
use contract::ipc::WorkerId;
use contract::protocol::MessageKind;

/// Samples kept: 15 minutes at one a second.
pub const SAMPLES_KEPT: usize = 900;
/// Worker restarts kept (as events on the time axis).
pub const EVENTS_KEPT: usize = 200;
/// Each room's rates kept, for its sparkline: the last minute.
pub const ROOM_SAMPLES_KEPT: usize = 60;
/// Between two samples.
pub const EVERY: Duration = Duration::from_secs(1);

/// The `q` quantile of the counts (per bucket), in milliseconds: the upper
/// bound of the bucket it falls in; None without a delivery.
fn quantile_ms(counts: &[u64; LATENCY_BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in counts.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(0.05 * 2f64.powi(i as i32));
        }
    }
    None
}

/// Cumulative counts read from the metrics at one instant.
#[derive(Clone, Copy, Default, Debug, PartialEq)]
pub struct Totals {
    /// Client messages the workers applied.
    pub messages_in: u64,
    /// Snapshots and v2 ops messages sent.
    pub messages_out: u64,
    /// Bytes written to clients, as sent (compressed or not).
    pub bytes_out: u64,
    /// Saves that succeeded.
    pub saves_ok: u64,
    /// Saves that failed (to be retried).
    pub saves_failed: u64,
    /// Worker processes started to replace one.
    pub worker_restarts: u64,
    /// Fan-out deliveries by latency bucket.
    pub fanout: [u64; LATENCY_BUCKETS],
}

/// Levels at one instant.
#[derive(Clone, Copy, Default, Debug, PartialEq)]
pub struct Levels {
    /// Open client connections.
    pub connections: i64,
    /// Rooms placed.
    pub rooms: i64,
    /// Client events the supervisor journals for rooms whose worker has not
    /// checkpointed them yet (what a worker crash would replay).
    pub journal: u64,
}

/// One second of the server.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Sample {
    /// Unix time, ms.
    pub at_ms: u64,
    /// Open client connections.
    pub connections: i64,
    /// Rooms placed.
    pub rooms: i64,
    /// Client messages applied, per second.
    pub messages_in_per_sec: f64,
    /// Snapshots and ops messages sent, per second.
    pub messages_out_per_sec: f64,
    /// Their bytes, per second.
    pub bytes_out_per_sec: f64,
    /// Fan-out latency's median over the interval (None: nothing delivered).
    pub fanout_p50_ms: Option<f64>,
    /// Its 99th percentile.
    pub fanout_p99_ms: Option<f64>,
    /// Saves done over the interval.
    pub saves: u64,
    /// Saves failed over the interval.
    pub saves_failed: u64,
    /// Journaled events not yet checkpointed.
    pub journal: u64,
}

/// Something that happened at an instant (a worker restarted).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Unix time, ms.
    pub at_ms: u64,
    /// What happened (`worker_restart`).
    pub kind: &'static str,
    /// How many times in the interval.
    pub count: u64,
}

/// A room's last minute, and its totals at the last sample.
#[derive(Default)]
struct RoomSeries {
    totals: (u64, u64),
    messages_in_per_sec: VecDeque<f64>,
    bytes_out_per_sec: VecDeque<f64>,
}

/// The rings.
#[derive(Default)]
pub struct History {
    samples: VecDeque<Sample>,
    events: VecDeque<Event>,
    last: Option<(u64, Totals)>,
    /// The rooms placed at the last sample (a room freed leaves with it).
    rooms: HashMap<String, RoomSeries>,
}

impl History {
    /// A sample at `at_ms` from the totals, levels and rooms' traffic read
    /// then: rates over the interval since the last one.
    pub fn record(&mut self, at_ms: u64, totals: Totals, levels: Levels, rooms: Vec<RoomTraffic>) {
        let (before_ms, before) = self.last.unwrap_or((at_ms, totals));
        let seconds = (at_ms.saturating_sub(before_ms) as f64 / 1000.0).max(0.001);
        let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / seconds;
        let fanout: [u64; LATENCY_BUCKETS] =
            std::array::from_fn(|i| totals.fanout[i].saturating_sub(before.fanout[i]));
        let restarts = totals
            .worker_restarts
            .saturating_sub(before.worker_restarts);
        if restarts > 0 {
            push_bounded(
                &mut self.events,
                Event {
                    at_ms,
                    kind: "worker_restart",
                    count: restarts,
                },
                EVENTS_KEPT,
            );
        }
        let sample = Sample {
            at_ms,
            connections: levels.connections,
            rooms: levels.rooms,
            messages_in_per_sec: rate(totals.messages_in, before.messages_in),
            messages_out_per_sec: rate(totals.messages_out, before.messages_out),
            bytes_out_per_sec: rate(totals.bytes_out, before.bytes_out),
            fanout_p50_ms: quantile_ms(&fanout, 0.5),
            fanout_p99_ms: quantile_ms(&fanout, 0.99),
            saves: totals.saves_ok.saturating_sub(before.saves_ok),
            saves_failed: totals.saves_failed.saturating_sub(before.saves_failed),
            journal: levels.journal,
        };
        push_bounded(&mut self.samples, sample, SAMPLES_KEPT);
        self.last = Some((at_ms, totals));
        let mut before = std::mem::take(&mut self.rooms);
        for RoomTraffic {
            room,
            messages_in,
            bytes_out,
            ..
        } in rooms
        {
            // A room new since the last sample counts from 0.
            let mut series = before.remove(&room).unwrap_or_default();
            let (messages_before, bytes_before) = series.totals;
            push_bounded(
                &mut series.messages_in_per_sec,
                rate(messages_in, messages_before),
                ROOM_SAMPLES_KEPT,
            );
            push_bounded(
                &mut series.bytes_out_per_sec,
                rate(bytes_out, bytes_before),
                ROOM_SAMPLES_KEPT,
            );
            series.totals = (messages_in, bytes_out);
            self.rooms.insert(room, series);
        }
    }

    /// What `/admin/history` serves.
    pub fn to_json(&self) -> serde_json::Value {
        let mut rooms: Vec<_> = self
            .rooms
            .iter()
            .map(|(room, series)| {
                serde_json::json!({
                    "room": room,
                    "messagesInPerSec": series.messages_in_per_sec,
                    "bytesOutPerSec": series.bytes_out_per_sec,
                })
            })
            .collect();
        rooms.sort_by(|a, b| a["room"].as_str().cmp(&b["room"].as_str()));
        serde_json::json!({
            "everyMs": EVERY.as_millis() as u64,
            "kept": SAMPLES_KEPT,
            "samples": self.samples,
            "events": self.events,
            "rooms": rooms,
        })
    }

    /// Samples, events and rooms held now (for the bounds' test).
    #[cfg(test)]
    pub fn held(&self) -> (usize, usize, usize) {
        (self.samples.len(), self.events.len(), self.rooms.len())
    }
}

fn push_bounded<T>(ring: &mut VecDeque<T>, item: T, kept: usize) {
    if ring.len() == kept {
        ring.pop_front();
    }
    ring.push_back(item);
}

/// Reads the metrics' cumulative counts.
fn totals(metrics: &Metrics, workers: usize) -> Totals {
    let kinds = [
        MessageKind::CursorMove,
        MessageKind::ShapeCreate,
        MessageKind::ShapeUpdate,
        MessageKind::ShapeDelete,
    ];
    let messages_in = kinds
        .iter()
        .map(|kind| {
            metrics
                .frames_in
                .get_or_create(&Kind {
                    r#type: kind.label(),
                })
                .get()
        })
        .sum();
    let saves = |result: &'static str| metrics.saves.get_or_create(&Outcome { result }).get();
    let worker_restarts = (0..workers)
        .map(|id| {
            metrics
                .worker_restarts
                .get_or_create(&Worker::of(WorkerId(id as u32)))
                .get()
        })
        .sum();
    Totals {
        messages_in,
        messages_out: metrics.snapshots_sent.get() + metrics.ops_sent.get(),
        bytes_out: metrics.bytes_sent.load(Ordering::Relaxed),
        saves_ok: saves("ok"),
        saves_failed: saves("failed"),
        worker_restarts,
        fanout: metrics.fanout_counts.read(),
    }
}

/// Takes a sample every second until the server stops.
pub async fn sample(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let totals = totals(&shared.metrics, shared.config.workers);
        let rooms = shared.registry.traffic().await;
        let levels = Levels {
            connections: shared.metrics.connections.get(),
            rooms: shared.registry.placed_rooms().borrow().now as i64,
            journal: rooms.iter().map(|room| room.journal).sum(),
        };
        super::rooms::lock(&shared.history).record(at_ms, totals, levels, rooms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::LatencyCounts;

    fn room(id: &str, messages_in: u64, bytes_out: u64) -> RoomTraffic {
        RoomTraffic {
            room: id.to_owned(),
            messages_in,
            bytes_out,
            journal: 0,
        }
    }

    fn totals_at(second: u64) -> Totals {
        let mut fanout = [0; LATENCY_BUCKETS];
        fanout[2] = 99 * second; // 99 a second at ≤ 0.2 ms
        fanout[6] = second; // one a second at ≤ 3.2 ms
        Totals {
            messages_in: 10 * second,
            messages_out: 100 * second,
            bytes_out: 5_000 * second,
            saves_ok: second / 2,
            saves_failed: 0,
            worker_restarts: u64::from(second >= 30),
            fanout,
        }
    }

    #[test]
    fn rates_quantiles_and_restarts_come_from_the_interval() {
        let mut history = History::default();
        let levels = Levels {
            connections: 7,
            rooms: 2,
            journal: 3,
        };
        for second in 0..=40 {
            let rooms = vec![
                room("hot", 9 * second, 4_000 * second),
                room("calm", second, 1_000 * second),
            ];
            history.record(1_000 * second, totals_at(second), levels, rooms);
        }
        let json = history.to_json();
        let last = &json["samples"][40];
        assert_eq!(last["messagesInPerSec"], 10.0);
        assert_eq!(last["messagesOutPerSec"], 100.0);
        assert_eq!(last["bytesOutPerSec"], 5000.0);
        assert_eq!(last["fanoutP50Ms"], 0.2);
        assert_eq!(last["fanoutP99Ms"], 0.2);
        assert_eq!(last["connections"], 7);
        assert_eq!(last["journal"], 3);
        // The first sample has no interval: rates 0, no latency.
        assert_eq!(json["samples"][0]["messagesInPerSec"], 0.0);
        assert_eq!(json["samples"][0]["fanoutP50Ms"], serde_json::Value::Null);
        assert_eq!(
            json["events"],
            serde_json::json!([{"atMs": 30_000, "kind": "worker_restart", "count": 1}])
        );
        // Per room, the last minute's rates (sorted by room).
        assert_eq!(json["rooms"][1]["room"], "hot");
        assert_eq!(json["rooms"][1]["messagesInPerSec"][40], 9.0);
        assert_eq!(json["rooms"][1]["bytesOutPerSec"][40], 4000.0);
        assert_eq!(json["rooms"][0]["messagesInPerSec"][40], 1.0);
        // A room freed leaves the history with its last sample.
        history.record(
            41_000,
            totals_at(41),
            levels,
            vec![room("hot", 369, 164_000)],
        );
        assert_eq!(history.held().2, 1);
    }

    #[test]
    fn the_slowest_hundredth_shows_in_p99() {
        let mut counts = [0; LATENCY_BUCKETS];
        counts[0] = 97;
        counts[9] = 3; // ≤ 25.6 ms
        assert_eq!(quantile_ms(&counts, 0.5), Some(0.05));
        assert_eq!(quantile_ms(&counts, 0.99), Some(25.6));
        assert_eq!(quantile_ms(&[0; LATENCY_BUCKETS], 0.5), None);
        let buckets = LatencyCounts::default();
        for seconds in [0.00001, 0.00005, 0.0001, 0.003, 10.0] {
            buckets.observe(seconds);
        }
        let read = buckets.read();
        assert_eq!((read[0], read[1], read[6], read[15]), (2, 1, 1, 1));
    }

    /// An hour of samples (and a restart every 10 s): the rings hold what
    /// they keep and no more, so memory stays flat.
    #[tokio::test(start_paused = true)]
    async fn an_hour_of_samples_keeps_fifteen_minutes() {
        let mut history = History::default();
        let mut restarts = 0;
        let started = tokio::time::Instant::now();
        for second in 0..3_600u64 {
            tokio::time::sleep(EVERY).await;
            if second % 10 == 0 {
                restarts += 1;
            }
            let totals = Totals {
                worker_restarts: restarts,
                ..totals_at(second)
            };
            // 20 rooms at a time, a new one every minute (freed ones leave).
            let rooms = (0..20)
                .map(|r| room(&format!("room-{}", second / 60 + r), second, 100 * second))
                .collect();
            history.record(1_000 * second, totals, Levels::default(), rooms);
            assert!(history.held().0 <= SAMPLES_KEPT);
        }
        assert_eq!(started.elapsed(), Duration::from_secs(3_600));
        assert_eq!(history.held(), (SAMPLES_KEPT, EVENTS_KEPT, 20));
        let json = history.to_json();
        assert_eq!(
            json["rooms"][0]["messagesInPerSec"]
                .as_array()
                .unwrap()
                .len(),
            ROOM_SAMPLES_KEPT
        );
        for room in json["rooms"].as_array().unwrap() {
            assert!(room["messagesInPerSec"].as_array().unwrap().len() <= ROOM_SAMPLES_KEPT);
        }
        // The oldest kept is 15 minutes before the newest.
        assert_eq!(json["samples"][0]["atMs"], 2_700_000);
        assert_eq!(json["samples"][SAMPLES_KEPT - 1]["atMs"], 3_599_000);
        assert!(history.samples.capacity() <= 2 * SAMPLES_KEPT);
    }
}
