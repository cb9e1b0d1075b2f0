//! Per-connection message rate limit: a token bucket, plus a flood detector that
//! tells when a client has been over the limit for too long. Pure over instants.

use std::time::{Duration, Instant};

#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Forward the message.
    Admit,
    /// Drop it (counted).
    Drop,
    /// The client has flooded for too long: close it with 1008 "Rate limit".
    Close,
}

pub struct RateLimit {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    /// Close after this many consecutive seconds with drops.
    close_after: u32,
    window_start: Instant,
    dropped_in_window: bool,
    flooding_secs: u32,
}

const WINDOW: Duration = Duration::from_secs(1);

impl RateLimit {
    pub fn new(per_sec: u32, burst: u32, close_after_secs: u32, now: Instant) -> RateLimit {
        RateLimit {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
            close_after: close_after_secs,
            window_start: now,
            dropped_in_window: false,
            flooding_secs: 0,
        }
    }

    pub fn check(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.last = now;
        // Close the windows that ended: a window with drops extends the flood, one
        // without ends it.
        while now.saturating_duration_since(self.window_start) >= WINDOW {
            if self.dropped_in_window {
                self.flooding_secs += 1;
            } else {
                self.flooding_secs = 0;
            }
            self.dropped_in_window = false;
            self.window_start += WINDOW;
            if now.saturating_duration_since(self.window_start) >= 2 * WINDOW {
                // Whole windows without any message: no flood.
                self.flooding_secs = 0;
                self.window_start = now;
            }
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Admit;
        }
        self.dropped_in_window = true;
        if self.close_after > 0 && self.flooding_secs >= self.close_after {
            Verdict::Close
        } else {
            Verdict::Drop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(limit: &mut RateLimit, start: Instant, per_sec: u32, secs: u32) -> (u32, u32, bool) {
        let (mut admitted, mut dropped) = (0, 0);
        for i in 0..per_sec * secs {
            let t = start + Duration::from_secs_f64(f64::from(i) / f64::from(per_sec));
            match limit.check(t) {
                Verdict::Admit => admitted += 1,
                Verdict::Drop => dropped += 1,
                Verdict::Close => return (admitted, dropped, true),
            }
        }
        (admitted, dropped, false)
    }

    #[test]
    fn a_client_within_the_rate_is_never_limited() {
        let start = Instant::now();
        let mut limit = RateLimit::new(60, 120, 5, start);
        assert_eq!(run(&mut limit, start, 60, 20), (1200, 0, false));
    }

    #[test]
    fn a_burst_passes_then_the_excess_is_dropped() {
        let start = Instant::now();
        let mut limit = RateLimit::new(60, 120, 5, start);
        let mut admitted = 0;
        for _ in 0..500 {
            if limit.check(start) == Verdict::Admit {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 120);
    }

    #[test]
    fn a_sustained_flood_is_closed_after_the_allowed_seconds() {
        let start = Instant::now();
        let mut limit = RateLimit::new(60, 120, 5, start);
        let (admitted, dropped, closed) = run(&mut limit, start, 1000, 10);
        assert!(closed);
        // About burst + 5 s × rate admitted before the close.
        assert!((400..=500).contains(&admitted), "{admitted}");
        assert!(dropped > 4000, "{dropped}");
    }

    #[test]
    fn a_short_flood_is_forgiven() {
        let start = Instant::now();
        let mut limit = RateLimit::new(60, 120, 5, start);
        let (_, dropped, closed) = run(&mut limit, start, 1000, 3);
        assert!(!closed && dropped > 0);
        // Back within the rate after a pause: no close ever.
        let later = start + Duration::from_secs(5);
        assert_eq!(run(&mut limit, later, 30, 10), (300, 0, false));
    }
}
