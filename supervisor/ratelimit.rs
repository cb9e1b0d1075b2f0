//! Per-connection message budget: a token bucket that slows a client down
//! instead of dropping its messages, and a flood detector that tells when a
//! client's input has stayed far beyond any real client's for too long. Pure
//! over instants; the session decides what waiting means (see `Backlog`).
//! The other direction too: a member's byte budget ([`SendBudget`]), which
//! decides when what its room sends it is capped to the newest state at
//! `--max-snapshot-hz`.
//!
//! Why these shapes: the real client sends a `cursor_move` per display frame
//! (60–240/s) and a `shape_update` every 50 ms while dragging, and a paste sends
//! hundreds of creates at once (PROTOCOL.md §8). None of that may be lost or
//! closed; only input that stays several times beyond it is.

use std::time::{Duration, Instant};

/// Length of the flood detector's windows.
const WINDOW: Duration = Duration::from_secs(1);

/// One connection's message budget and flood detector, owned by its session.
pub struct Budget {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    /// Messages over the budget in one window that make it a flooding window:
    /// half the per-second budget (the client offered at least 1.5× its budget).
    flood_threshold: u32,
    /// Close after this many consecutive flooding windows (0: never).
    close_after: u32,
    window_start: Instant,
    over_in_window: u32,
    flooding_windows: u32,
}

impl Budget {
    /// A full bucket of `burst` messages refilled at `per_sec`, closing after
    /// `close_after_secs` flooding windows in a row (0: never).
    pub fn new(per_sec: u32, burst: u32, close_after_secs: u32, now: Instant) -> Budget {
        Budget {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
            flood_threshold: (per_sec / 2).max(1),
            close_after: close_after_secs,
            window_start: now,
            over_in_window: 0,
            flooding_windows: 0,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.last = now;
    }

    /// Whether there is budget left for one more message.
    pub fn has_token(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }

    /// Takes the budget for one message, if there is budget left.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let taken = self.has_token(now);
        if taken {
            self.tokens -= 1.0;
        }
        taken
    }

    /// When the budget for the next message will be there.
    pub fn next_token_at(&self) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        self.last + Duration::from_secs_f64(missing / self.per_sec)
    }

    /// Records a message read ahead over the budget (a cursor move, held or
    /// folded: messages that wait are not read ahead, so cost nothing more).
    /// Returns true when the client has flooded for `close_after` consecutive
    /// windows: it is to be closed.
    pub fn over(&mut self, now: Instant) -> bool {
        // Close the windows that ended: a flooding one extends the flood, any
        // other ends it.
        while now.saturating_duration_since(self.window_start) >= WINDOW {
            if self.over_in_window > self.flood_threshold {
                self.flooding_windows += 1;
            } else {
                self.flooding_windows = 0;
            }
            self.over_in_window = 0;
            self.window_start += WINDOW;
            if now.saturating_duration_since(self.window_start) >= WINDOW {
                // At least one whole window with nothing over the budget.
                self.flooding_windows = 0;
                self.window_start = now;
            }
        }
        self.over_in_window += 1;
        self.close_after > 0 && self.flooding_windows >= self.close_after
    }
}

/// Whether a client message is a `cursor_move`: state, not an event, so an
/// unsent one may be replaced by a newer one. Only messages that find the budget
/// empty are classified; the worker parses them fully.
pub fn is_cursor_move(text: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Kind<'a> {
        #[serde(borrow, rename = "type")]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_str::<Kind>(text).is_ok_and(|k| k.kind.as_deref() == Some("cursor_move"))
}

/// A client's messages not yet forwarded, in arrival order: at most one cursor
/// move (a newer one replaces it: it is folded) followed by at most one other
/// frame. While that other frame waits, the client's socket is not read, so TCP
/// slows the client down and nothing it sent is dropped.
#[derive(Default)]
pub struct Backlog {
    cursor: Option<String>,
    waiting: Option<Released>,
}

/// What leaves the backlog when the budget allows it.
#[derive(Debug, PartialEq)]
pub enum Released {
    /// A message for the room's worker.
    Message(String),
    /// A frame already dealt with (a ping answered, a binary frame ignored) that
    /// still spends the budget: the client's next frames wait for it.
    Spent,
}

/// What became of a message put in the backlog over the budget.
#[derive(Debug, PartialEq)]
pub enum Held {
    /// It waits for the budget; reading pauses meanwhile.
    Waiting,
    /// A cursor move, held while reading goes on (a newer one will replace it).
    Cursor,
    /// A cursor move that replaced an older one, which will never be sent.
    Folded,
}

impl Backlog {
    /// Nothing is held: neither a cursor move nor a waiting frame.
    pub fn is_empty(&self) -> bool {
        self.cursor.is_none() && self.waiting.is_none()
    }

    /// Whether the client's socket may be read: not while a frame that cannot be
    /// folded waits.
    pub fn may_read(&self) -> bool {
        self.waiting.is_none()
    }

    /// Queues a message within the budget, unclassified (parsing it here would
    /// cost every message; the worker parses it).
    pub fn pass(&mut self, text: String) {
        debug_assert!(self.may_read());
        self.waiting = Some(Released::Message(text));
    }

    /// Queues a frame that only spends the budget.
    pub fn spend(&mut self) {
        debug_assert!(self.may_read());
        self.waiting = Some(Released::Spent);
    }

    /// Holds a message over the budget until the budget allows it.
    pub fn hold(&mut self, text: String) -> Held {
        debug_assert!(self.may_read());
        if !is_cursor_move(&text) {
            self.waiting = Some(Released::Message(text));
            Held::Waiting
        } else if self.cursor.replace(text).is_some() {
            Held::Folded
        } else {
            Held::Cursor
        }
    }

    /// The oldest queued item.
    pub fn pop(&mut self) -> Option<Released> {
        self.cursor
            .take()
            .map(Released::Message)
            .or_else(|| self.waiting.take())
    }
}

/// What a member's room would send it, against `--member-bytes-per-sec`
/// (a token bucket of bytes, a quarter of a second's worth deep): while
/// within it, every change goes out at once; over it, the session sends the
/// newest state at the capped rate (`--max-snapshot-hz`). Charged with what
/// the room *would* send, versions skipped under the cap included, so a
/// busy room stays capped rather than flipping in and out of it.
pub struct SendBudget {
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

/// What each message costs besides its bytes: its frame, its TCP segment,
/// the write, and the client's parse and render of one more state. It is
/// why a stream of tiny messages (a v2 member's cursor ops, 600 a second in
/// a busy room) is batched while a quiet room's snapshots are not.
pub const MESSAGE_COST: u64 = 512;

impl SendBudget {
    /// A full budget of `per_sec` bytes a second (0: always over).
    pub fn new(per_sec: u64, now: Instant) -> SendBudget {
        let per_sec = per_sec as f64;
        SendBudget {
            per_sec,
            tokens: per_sec / 4.0,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.per_sec / 4.0);
        self.last = now;
    }

    /// Whether the member is within its budget (changes go out at once).
    pub fn within(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens > 0.0
    }

    /// Charges one message of `bytes` that brings the member `versions`
    /// versions forward (`bytes_per_version`: a snapshot stands for each of
    /// the versions it skipped; an ops message holds all of theirs already).
    /// The debt is bounded by a second's budget: a room that quiets down is
    /// uncapped again within a second.
    pub fn charge(&mut self, bytes: u64, versions: u64, bytes_per_version: bool, now: Instant) {
        self.refill(now);
        let versions = versions.max(1);
        let payload = if bytes_per_version {
            bytes * versions
        } else {
            bytes
        };
        let cost = payload + versions * MESSAGE_COST;
        self.tokens = (self.tokens - cost as f64).max(-self.per_sec);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offers `per_sec` messages a second for `secs` seconds, each taken when
    /// there is budget and otherwise counted over it (as a session does while
    /// folding cursor moves). Returns (taken, over, closed).
    fn offer(budget: &mut Budget, start: Instant, per_sec: u32, secs: u32) -> (u32, u32, bool) {
        let (mut taken, mut over) = (0, 0);
        for i in 0..per_sec * secs {
            let t = start + Duration::from_secs_f64(f64::from(i) / f64::from(per_sec));
            if budget.try_take(t) {
                taken += 1;
            } else {
                over += 1;
                if budget.over(t) {
                    return (taken, over, true);
                }
            }
        }
        (taken, over, false)
    }

    #[test]
    fn the_real_client_at_its_fastest_is_never_over_the_default_budget() {
        // 240 cursor moves + 20 shape updates a second, for a minute.
        let start = Instant::now();
        let mut budget = Budget::new(500, 1000, 10, start);
        assert_eq!(offer(&mut budget, start, 260, 60), (260 * 60, 0, false));
    }

    #[test]
    fn a_paste_of_a_thousand_passes_at_once() {
        let start = Instant::now();
        let mut budget = Budget::new(500, 1000, 10, start);
        assert_eq!((0..1000).filter(|_| budget.try_take(start)).count(), 1000);
        assert!(!budget.try_take(start));
        // The next message's budget is there after 1/500 s.
        assert_eq!(budget.next_token_at(), start + Duration::from_millis(2));
    }

    #[test]
    fn a_sustained_flood_is_closed_after_the_allowed_seconds() {
        let start = Instant::now();
        let mut budget = Budget::new(60, 120, 5, start);
        let (taken, over, closed) = offer(&mut budget, start, 1000, 10);
        assert!(closed);
        // About burst + 5 s × rate taken before the close.
        assert!((400..=500).contains(&taken), "{taken}");
        assert!(over > 4000, "{over}");
    }

    #[test]
    fn slightly_over_the_budget_for_long_is_slowed_never_closed() {
        // 1.4× the budget for a minute: folded or delayed, never closed.
        let start = Instant::now();
        let mut budget = Budget::new(100, 100, 5, start);
        let (_, over, closed) = offer(&mut budget, start, 140, 60);
        assert!(!closed && over > 2000, "{over}");
    }

    #[test]
    fn a_short_flood_is_forgiven() {
        let start = Instant::now();
        let mut budget = Budget::new(60, 120, 5, start);
        let (_, over, closed) = offer(&mut budget, start, 1000, 3);
        assert!(!closed && over > 0);
        // Back within the rate after a pause: no close ever.
        let later = start + Duration::from_secs(5);
        assert_eq!(offer(&mut budget, later, 30, 10), (300, 0, false));
    }

    #[test]
    fn cursor_moves_are_told_from_other_messages() {
        assert!(is_cursor_move(r#"{"type":"cursor_move","x":1,"y":2}"#));
        assert!(is_cursor_move(r#"{"x":1, "type" : "cursor_move"}"#));
        assert!(!is_cursor_move(
            r#"{"type":"shape_create","text":"\"type\":\"cursor_move\""}"#
        ));
        assert!(!is_cursor_move("not json"));
        assert!(!is_cursor_move(r#"{"type":3}"#));
    }

    #[test]
    fn the_backlog_folds_cursor_moves_and_keeps_order() {
        let mut backlog = Backlog::default();
        let cursor = |x: u32| format!(r#"{{"type":"cursor_move","x":{x},"y":0}}"#);
        assert_eq!(backlog.hold(cursor(1)), Held::Cursor);
        assert_eq!(backlog.hold(cursor(2)), Held::Folded);
        assert!(backlog.may_read());
        let create = r#"{"type":"shape_create"}"#.to_owned();
        assert_eq!(backlog.hold(create.clone()), Held::Waiting);
        assert!(!backlog.may_read());
        assert_eq!(backlog.pop(), Some(Released::Message(cursor(2))));
        assert_eq!(backlog.pop(), Some(Released::Message(create)));
        assert!(backlog.is_empty() && backlog.may_read());
        backlog.spend();
        assert!(!backlog.may_read());
        assert_eq!(backlog.pop(), Some(Released::Spent));
        assert_eq!(backlog.pop(), None);
    }

    #[test]
    fn a_member_within_its_byte_budget_gets_every_change_and_a_busy_room_stays_capped() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // The default: a room of 10 moving cursors at 10 Hz (100 snapshots
        // of ~1 KB a second, uncompressed) stays within it.
        let mut budget = SendBudget::new(256 * 1024, t0);
        for i in 0..1000 {
            assert!(budget.within(ms(i * 10)), "change {i}");
            budget.charge(1100, 1, true, ms(i * 10));
        }
        // A v2 member of a busy room: 600 ops messages of 125 bytes a second
        // is over it; capped at 60 Hz, the skipped versions keep it over.
        let mut budget = SendBudget::new(256 * 1024, t0);
        let mut over_at = None;
        for i in 0..600 {
            let now = t0 + Duration::from_micros(i * 1667);
            if !budget.within(now) {
                over_at = Some(i);
                break;
            }
            budget.charge(125, 1, false, now);
        }
        let over_at = over_at.expect("over the budget within a second");
        let start = t0 + Duration::from_micros(over_at * 1667);
        for tick in 1..=120 {
            // At the end of each period, the newest state: 10 versions
            // folded into one ops message of 350 bytes…
            let now = start + Duration::from_micros(tick * 16_667);
            budget.charge(350, 10, false, now);
            // …and the next change, just after, is held again.
            assert!(
                !budget.within(now + Duration::from_micros(1667)),
                "still capped at tick {tick}"
            );
        }
        // The room quiets down: within a second and a quarter, back to at once.
        let quiet = start + Duration::from_micros(120 * 16_667);
        assert!(budget.within(quiet + Duration::from_millis(1250)));
        // 0: always capped.
        assert!(!SendBudget::new(0, t0).within(ms(5000)));
    }
}
