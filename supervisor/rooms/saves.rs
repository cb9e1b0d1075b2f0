//! What the store has confirmed: each room's last saved event (so a worker
//! lost at shutdown can name the rooms whose changes may be lost), and whether
//! saves keep failing (for `/readyz`).

use std::time::{Duration, Instant};

use super::{Registry, lock};
use contract::ipc::{RoomId, WorkerId};

/// Saves failing with none succeeding for this long make `/readyz` answer 503:
/// longer than a blip (a failed save is retried after 0.5, 1, 2, 4 s…), short
/// enough that an orchestrator stops sending rooms to a server that cannot keep them.
pub const SAVES_FAILING_UNREADY_AFTER: Duration = Duration::from_secs(10);
/// A failure older than this no longer counts (no room is left retrying: they
/// were saved elsewhere or freed); it is above the 30 s cap of save retries.
const SAVE_FAILURE_FORGOTTEN_AFTER: Duration = Duration::from_secs(45);

#[derive(Default)]
pub(super) struct SaveHealth {
    /// First failed save since the last success.
    failing_since: Option<Instant>,
    last_failure: Option<Instant>,
}

impl Registry {
    /// A worker finished a save attempt (`ok`: written).
    pub fn save_finished(&self, ok: bool) {
        let mut health = lock(&self.save_health);
        if ok {
            *health = SaveHealth::default();
        } else {
            let now = Instant::now();
            health.failing_since.get_or_insert(now);
            health.last_failure = Some(now);
        }
    }

    /// How long saves have been failing with none succeeding, if the last
    /// failure is recent.
    pub fn saves_failing_for(&self) -> Option<Duration> {
        let health = lock(&self.save_health);
        let recent = health
            .last_failure
            .is_some_and(|t| t.elapsed() < SAVE_FAILURE_FORGOTTEN_AFTER);
        health
            .failing_since
            .filter(|_| recent)
            .map(|since| since.elapsed())
    }

    /// The worker saved `room` up to event `seq`.
    pub fn saved(&self, room: &RoomId, worker: WorkerId, seq: u64) {
        if let Some(entry) = self.on_worker(room, worker) {
            let recovery = &mut lock(&entry.state).recovery;
            recovery.saved_seq = recovery.saved_seq.max(seq);
        }
    }

    /// Rooms on `worker` with events since their last confirmed save, sorted:
    /// those whose changes may be lost if the worker is lost now (a superset:
    /// joins and cursor moves count too, the supervisor does not read events).
    pub fn unconfirmed_rooms(&self, worker: WorkerId) -> Vec<RoomId> {
        let table = lock(&self.table);
        let mut rooms: Vec<RoomId> = table
            .rooms
            .values()
            .filter(|e| e.worker == worker)
            .filter(|e| {
                let recovery = &lock(&e.state).recovery;
                recovery.last_seq > recovery.saved_seq
            })
            .map(|e| e.id.clone())
            .collect();
        rooms.sort();
        rooms
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use contract::ipc::{ConnId, WorkerId};

    #[tokio::test]
    async fn rooms_with_events_since_their_last_confirmed_save_are_listed() {
        let (registry, _frames) = registry(2, 2, 100);
        for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
            let conn = ConnId(i as u64);
            let handle = registry
                .register(&room(name), conn, "u".into(), commands().0)
                .unwrap();
            handle.join(conn, None).await.unwrap(); // seq 1
            handle.forward(conn, "m".into()).await.unwrap(); // seq 2
        }
        // a and c are on worker 0, b on worker 1.
        assert_eq!(
            registry.unconfirmed_rooms(WorkerId(0)),
            [room("a"), room("c")]
        );
        registry.saved(&room("a"), WorkerId(0), 2);
        registry.saved(&room("c"), WorkerId(0), 1);
        registry.saved(&room("b"), WorkerId(0), 2); // not b's worker: ignored
        assert_eq!(registry.unconfirmed_rooms(WorkerId(0)), [room("c")]);
        assert_eq!(registry.unconfirmed_rooms(WorkerId(1)), [room("b")]);
    }
}
