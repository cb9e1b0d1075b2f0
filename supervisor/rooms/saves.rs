//! Whether the store keeps refusing saves (for `/readyz`). (Each room's last
//! confirmed save is its recovery's `saved_seq`.)

use std::time::{Duration, Instant};

use super::{Registry, lock};

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
}
