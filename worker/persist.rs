//! When to save a room and when to retry a load: the persistence policy as pure
//! state over instants, so it can be tested without a clock or a store.
//!
//! Save after `debounce` of quiet following a shape change, or at the latest
//! `max_wait` after the first unsaved change. A change made while a save is in
//! flight is not covered by that save and stays unsaved (only what was written
//! is marked clean). A failed save is retried with capped exponential backoff.

use std::time::Duration;

use tokio::time::Instant;

/// First retry delay after a failed save, doubled per failure up to the cap.
pub const SAVE_RETRY_MIN: Duration = Duration::from_millis(500);
/// Longest wait between save retries: a store that is back is used within this.
pub const SAVE_RETRY_MAX: Duration = Duration::from_secs(30);
/// Load retries start fast, so a short backend hiccup only delays the first
/// snapshot a little, and stay frequent while members wait.
pub const LOAD_RETRY_MIN: Duration = Duration::from_millis(250);
/// Longest wait between load retries: a degraded room gets its stored shapes
/// soon after the store is back.
pub const LOAD_RETRY_MAX: Duration = Duration::from_secs(2);

/// When saves are due, shared by a worker's rooms (`--persist-debounce-ms`,
/// `--persist-max-wait-ms`).
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Quiet time after a shape change before a save.
    pub debounce: Duration,
    /// Longest a change stays unsaved while changes keep coming.
    pub max_wait: Duration,
}

/// A room's saving state.
#[derive(Debug, Default)]
pub struct SaveState {
    /// First change not covered by a save that succeeded or is in flight.
    first_unsaved: Option<Instant>,
    /// Latest change.
    last_change: Option<Instant>,
    /// A save is running; holds the `first_unsaved` it covers (restored if it fails).
    in_flight: Option<Instant>,
    /// After a failure: no new attempt before this.
    retry_at: Option<Instant>,
    /// Next retry delay.
    backoff: Option<Duration>,
    /// Save as soon as allowed (room closing, server draining), not after the debounce.
    pub urgent: bool,
}

impl SaveState {
    /// Records a shape change at `now`.
    pub fn changed(&mut self, now: Instant) {
        self.first_unsaved.get_or_insert(now);
        self.last_change = Some(now);
    }

    /// Unsaved changes exist, written or not yet.
    pub fn is_dirty(&self) -> bool {
        self.first_unsaved.is_some() || self.in_flight.is_some()
    }

    /// A save is running.
    pub fn saving(&self) -> bool {
        self.in_flight.is_some()
    }

    /// The previous attempt failed (the next one is a retry).
    pub fn retrying(&self) -> bool {
        self.backoff.is_some()
    }

    /// When the next save should start, if one is needed and none is running.
    pub fn due_at(&self, policy: &Policy) -> Option<Instant> {
        if self.in_flight.is_some() {
            return None;
        }
        let first = self.first_unsaved?;
        if let Some(retry_at) = self.retry_at {
            return Some(retry_at);
        }
        if self.urgent {
            return Some(first);
        }
        let last = self.last_change.unwrap_or(first);
        Some((last + policy.debounce).min(first + policy.max_wait))
    }

    /// A save starts now, covering every change so far.
    pub fn begin(&mut self) {
        debug_assert!(self.in_flight.is_none());
        self.in_flight = self.first_unsaved.take();
    }

    /// The running save was written.
    pub fn succeeded(&mut self) {
        self.in_flight = None;
        self.retry_at = None;
        self.backoff = None;
        if self.first_unsaved.is_none() {
            self.last_change = None;
        }
    }

    /// The running save failed at `now`: its changes are unsaved again, and the
    /// next attempt waits for the backoff.
    pub fn failed(&mut self, now: Instant) {
        if let Some(covered) = self.in_flight.take() {
            self.first_unsaved = Some(self.first_unsaved.map_or(covered, |f| f.min(covered)));
        }
        let delay = self.backoff.unwrap_or(SAVE_RETRY_MIN);
        self.retry_at = Some(now + delay);
        self.backoff = Some((delay * 2).min(SAVE_RETRY_MAX));
    }
}

/// Capped exponential backoff for load retries.
#[derive(Debug, Default)]
pub struct LoadRetry {
    next: Option<Duration>,
}

impl LoadRetry {
    /// The delay before the next attempt, after a failure.
    pub fn after_failure(&mut self) -> Duration {
        let delay = self.next.unwrap_or(LOAD_RETRY_MIN);
        self.next = Some((delay * 2).min(LOAD_RETRY_MAX));
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    const POLICY: Policy = Policy {
        debounce: Duration::from_secs(2),
        max_wait: Duration::from_secs(10),
    };
    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_saved_once_after_two_quiet_seconds() {
        let mut s = SaveState::default();
        assert_eq!(s.due_at(&POLICY), None);
        let start = Instant::now();
        for _ in 0..5 {
            s.changed(Instant::now());
            advance(300 * MS).await;
        }
        let last = start + 1200 * MS;
        assert_eq!(s.due_at(&POLICY), Some(last + 2000 * MS));
    }

    #[tokio::test(start_paused = true)]
    async fn continuous_edits_are_saved_within_the_max_wait() {
        let mut s = SaveState::default();
        let start = Instant::now();
        let mut saved_at = None;
        // An edit every 500 ms for 12 s: the debounce alone would never fire.
        for _ in 0..24 {
            s.changed(Instant::now());
            advance(500 * MS).await;
            if s.due_at(&POLICY).is_some_and(|due| due <= Instant::now()) && saved_at.is_none() {
                saved_at = Some(Instant::now());
                s.begin();
                s.succeeded();
            }
        }
        assert_eq!(saved_at, Some(start + Duration::from_secs(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_during_a_save_stays_unsaved() {
        let mut s = SaveState::default();
        s.changed(Instant::now());
        s.begin();
        assert!(s.is_dirty());
        assert_eq!(s.due_at(&POLICY), None, "no second save while one runs");
        advance(100 * MS).await;
        let during = Instant::now();
        s.changed(during);
        s.succeeded();
        assert!(s.is_dirty());
        assert_eq!(s.due_at(&POLICY), Some(during + 2000 * MS));
        s.begin();
        s.succeeded();
        assert!(!s.is_dirty());
        assert_eq!(s.due_at(&POLICY), None);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_saves_back_off_exponentially_up_to_the_cap() {
        let mut s = SaveState::default();
        let first = Instant::now();
        s.changed(first);
        let mut delays = Vec::new();
        for _ in 0..9 {
            s.begin();
            let now = Instant::now();
            s.failed(now);
            let due = s.due_at(&POLICY).unwrap();
            delays.push((due - now).as_millis() as u64);
            advance(due - now).await;
        }
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert!(s.is_dirty());
        s.begin();
        s.succeeded();
        assert!(!s.is_dirty());
        // The backoff starts over after a success.
        s.changed(Instant::now());
        s.begin();
        let now = Instant::now();
        s.failed(now);
        assert_eq!(s.due_at(&POLICY), Some(now + SAVE_RETRY_MIN));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_save_keeps_the_earliest_unsaved_change() {
        let mut s = SaveState::default();
        let first = Instant::now();
        s.changed(first);
        s.begin();
        advance(100 * MS).await;
        s.changed(Instant::now());
        s.failed(Instant::now());
        assert_eq!(s.first_unsaved, Some(first));
    }

    #[tokio::test(start_paused = true)]
    async fn urgent_rooms_save_at_once_but_respect_the_backoff() {
        let mut s = SaveState::default();
        let t = Instant::now();
        s.changed(t);
        s.urgent = true;
        assert_eq!(s.due_at(&POLICY), Some(t));
        s.begin();
        s.failed(t);
        assert_eq!(s.due_at(&POLICY), Some(t + SAVE_RETRY_MIN));
    }

    #[test]
    fn load_retries_start_fast_and_are_capped() {
        let mut r = LoadRetry::default();
        let delays: Vec<u64> = (0..6)
            .map(|_| r.after_failure().as_millis() as u64)
            .collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 2000, 2000]);
    }
}
