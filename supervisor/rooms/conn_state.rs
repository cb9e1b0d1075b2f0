//! What the task that owns a room tells each of its connections' sessions
//! ([`ConnState`]), and the one-slot channel that carries it: also the
//! session's doorbell, rung when its room publishes a new state or the
//! server's shutdown phase moves, so a session waits on this one cell (and its
//! client's socket) rather than on a watch per source.
//!
//! Why not a `tokio::sync::watch`: every connection has one for its whole
//! life, and a `watch` is ~380 bytes (eight `Notify`s for many receivers) and
//! ~120 more in the session's future while it waits, and each wait registers
//! in and leaves a locked list; here there is one receiver, so one waker is
//! enough: ~110 bytes, and waiting is a poll of the cell itself.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use tokio::sync::watch;

use super::fanout::SnapshotCell;
use crate::close::CloseReason;
use contract::protocol::{IgnoredReason, MessageKind};

/// What the supervisor tells a connection's session: its membership, which only
/// moves forward (pending → admitted → closed), and how many times a newer
/// connection of the same user asked whether this one is still alive. A
/// session that sees only the last value has missed nothing it needs.
#[derive(Debug, Clone)]
pub struct ConnState {
    /// Where the connection stands in its room.
    pub membership: Membership,
    /// Bumped to ask the session to ping its client at once; the session answers
    /// with [`RoomHandle::alive`](super::RoomHandle::alive) when its client is
    /// next heard from.
    pub probes: u32,
    /// The client's messages refused by a room limit so far (see
    /// `FromWorker::Refused`), and what the last one asked and why: a v2
    /// session tells its client of the ones it has not told yet.
    pub refused: u32,
    /// The last refused message's kind and reason.
    pub last_refused: Option<(MessageKind, IgnoredReason)>,
}

impl ConnState {
    /// A connection registered and not yet admitted.
    pub fn pending() -> ConnState {
        ConnState {
            membership: Membership::Pending,
            probes: 0,
            refused: 0,
            last_refused: None,
        }
    }

    /// A new connection's channel, its state [`pending`](Self::pending).
    pub fn channel() -> (ConnStateSender, ConnStateReceiver) {
        let cell = Arc::new(Cell {
            state: Mutex::new(ConnState::pending()),
            version: AtomicU64::new(0),
            rung: AtomicBool::new(false),
            muted: AtomicBool::new(false),
            sender_gone: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        let receiver = ConnStateReceiver {
            cell: cell.clone(),
            seen: 0,
        };
        (ConnStateSender { cell }, receiver)
    }
}

/// A connection's standing in its room.
#[derive(Debug, Clone)]
pub enum Membership {
    /// Waiting for the worker to admit the join.
    Pending,
    /// The worker admitted the join: from now on, send the room's snapshots.
    Admitted(watch::Receiver<SnapshotCell>),
    /// Close the connection for this reason.
    Closed(CloseReason),
}

struct Cell {
    state: Mutex<ConnState>,
    /// Bumped, under the lock, by every change.
    version: AtomicU64,
    /// Rung since the session last woke (see [`ConnStateSender::ring`]).
    rung: AtomicBool,
    /// The session holds the room's new states back for now (its rate): a
    /// publish does not wake it (see [`ConnStateReceiver::mute`]).
    muted: AtomicBool,
    sender_gone: AtomicBool,
    /// The session's, while it waits for a change.
    waker: AtomicWaker,
}

impl Cell {
    fn lock(&self) -> MutexGuard<'_, ConnState> {
        // A panic while the state was changed leaves a whole value (each
        // change is a few field writes): go on with it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The room's end of a connection's [`ConnState`] (its slot's task has it).
pub struct ConnStateSender {
    cell: Arc<Cell>,
}

impl ConnStateSender {
    /// Changes the state and wakes the session.
    pub fn send_modify(&self, change: impl FnOnce(&mut ConnState)) {
        self.send_if_modified(|state| {
            change(state);
            true
        });
    }

    /// Changes the state; wakes the session if `change` says it changed it.
    pub fn send_if_modified(&self, change: impl FnOnce(&mut ConnState) -> bool) -> bool {
        let changed = {
            let mut state = self.cell.lock();
            let changed = change(&mut state);
            if changed {
                self.cell.version.fetch_add(1, Ordering::Release);
            }
            changed
        };
        if changed {
            self.cell.waker.wake();
        }
        changed
    }
}

impl ConnStateSender {
    /// The room published a new state: wakes the session to send it, unless
    /// it holds states back for now (it sends the newest when its timer ends).
    pub fn ring(&self) {
        // The room stored its new state before this; the session unmutes,
        // then looks at the state (`mute`). The fences (one each side) make
        // sure one of the two sees the other's store: else a publish and an
        // unmute at once could each miss the other, and the session stay on
        // an old state until the next publish (a red-team review).
        std::sync::atomic::fence(Ordering::SeqCst);
        if !self.cell.muted.load(Ordering::Relaxed) {
            self.ring_always();
        }
    }

    /// Wakes the session to look at what it reads outside this cell (the
    /// shutdown phase), muted or not.
    pub fn ring_always(&self) {
        self.cell.rung.store(true, Ordering::Release);
        self.cell.waker.wake();
    }
}

impl Drop for ConnStateSender {
    fn drop(&mut self) {
        self.cell.sender_gone.store(true, Ordering::Release);
        self.cell.waker.wake();
    }
}

/// The session's end of its [`ConnState`].
pub struct ConnStateReceiver {
    cell: Arc<Cell>,
    /// The version last read with [`borrow_and_update`](Self::borrow_and_update).
    seen: u64,
}

/// The sender is gone (its room forgot the connection).
#[derive(Debug, PartialEq, Eq)]
pub struct SenderGone;

/// Why a session woke (see [`ConnStateReceiver::woken`]).
#[derive(Debug, PartialEq, Eq)]
pub struct Woken {
    /// The state changed since it was last read.
    pub state: bool,
    /// The cell was rung.
    pub rung: bool,
}

impl ConnStateReceiver {
    /// Waits for a change not yet read; `Err` once the sender is gone and
    /// every change has been read (as `watch::Receiver::changed`). Rings are
    /// left for [`woken`](Self::woken), which sessions use.
    #[cfg(test)]
    pub async fn changed(&mut self) -> Result<(), SenderGone> {
        std::future::poll_fn(|cx| self.poll(cx, false).map_ok(|_| ())).await
    }

    /// Waits for a change not yet read or a ring (which it takes); `Err` once
    /// the sender is gone and every change has been read.
    pub async fn woken(&mut self) -> Result<Woken, SenderGone> {
        std::future::poll_fn(|cx| self.poll(cx, true)).await
    }

    fn poll(&self, cx: &mut Context<'_>, rings: bool) -> Poll<Result<Woken, SenderGone>> {
        if let Some(ready) = self.ready(rings) {
            return Poll::Ready(ready);
        }
        self.cell.waker.register(cx.waker());
        // A change between the first look and the registration woke no one.
        match self.ready(rings) {
            Some(ready) => Poll::Ready(ready),
            None => Poll::Pending,
        }
    }

    fn ready(&self, rings: bool) -> Option<Result<Woken, SenderGone>> {
        let state = self.cell.version.load(Ordering::Acquire) != self.seen;
        let rung = rings && self.cell.rung.swap(false, Ordering::AcqRel);
        if state || rung {
            Some(Ok(Woken { state, rung }))
        } else if self.cell.sender_gone.load(Ordering::Acquire) {
            Some(Err(SenderGone))
        } else {
            None
        }
    }

    /// Whether the room's publishes do not ring the session (see
    /// [`mute`](Self::mute)).
    pub fn muted(&self) -> bool {
        self.cell.muted.load(Ordering::Relaxed)
    }

    /// While muted, the room's publishes do not ring (the session holds
    /// its member's new states back until its rate allows the newest).
    /// Unmuted, the session must then look at the room's state itself: a
    /// publish while it was muted did not ring (see [`ConnStateSender::ring`]
    /// for the fence that pairs with this one).
    pub fn mute(&self, muted: bool) {
        self.cell.muted.store(muted, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// Whether a change has not been read yet.
    #[cfg(test)]
    pub fn has_changed(&self) -> bool {
        self.cell.version.load(Ordering::Acquire) != self.seen
    }

    /// The state now, marked as read.
    pub fn borrow_and_update(&mut self) -> MutexGuard<'_, ConnState> {
        let state = self.cell.lock();
        self.seen = self.cell.version.load(Ordering::Acquire);
        state
    }

    /// The state now, not marked as read.
    pub fn borrow(&self) -> MutexGuard<'_, ConnState> {
        self.cell.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_change_wakes_the_waiting_session_and_the_last_value_is_read() {
        let (sender, mut receiver) = ConnState::channel();
        assert!(!receiver.has_changed());
        let waiting = tokio::spawn(async move {
            receiver.changed().await.unwrap();
            let probes = receiver.borrow_and_update().probes;
            (receiver, probes)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        sender.send_modify(|s| s.probes = 1);
        sender.send_modify(|s| s.probes = 2);
        let (mut receiver, probes) = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .unwrap();
        assert!(probes == 2 || (probes == 1 && receiver.has_changed()));
        drop(receiver.borrow_and_update());
        assert!(!receiver.has_changed());
        // A change that changed nothing does not wake.
        assert!(!sender.send_if_modified(|_| false));
        assert!(!receiver.has_changed());
        // The sender gone: a change not read yet first, then the end.
        sender.send_modify(|s| s.membership = Membership::Closed(CloseReason::GoingAway));
        drop(sender);
        assert_eq!(receiver.changed().await, Ok(()));
        assert!(matches!(
            receiver.borrow_and_update().membership,
            Membership::Closed(CloseReason::GoingAway)
        ));
        assert_eq!(receiver.changed().await, Err(SenderGone));
    }

    #[tokio::test]
    async fn a_ring_wakes_the_session_unless_muted_and_is_taken_once() {
        let (sender, mut receiver) = ConnState::channel();
        sender.ring();
        let woken = receiver.woken().await.unwrap();
        assert_eq!(
            woken,
            Woken {
                state: false,
                rung: true
            }
        );
        // Taken: the next wait waits.
        let waiting = tokio::time::timeout(Duration::from_millis(50), receiver.woken()).await;
        assert!(waiting.is_err(), "woken without a ring");
        // Muted, a publish's ring does not wake it; a phase's does.
        receiver.mute(true);
        sender.ring();
        let waiting = tokio::time::timeout(Duration::from_millis(50), receiver.woken()).await;
        assert!(waiting.is_err(), "woken while muted");
        sender.ring_always();
        assert_eq!(
            receiver.woken().await.unwrap(),
            Woken {
                state: false,
                rung: true
            }
        );
        receiver.mute(false);
        // A change and a ring together: one wake says both.
        sender.send_modify(|s| s.probes += 1);
        sender.ring();
        assert_eq!(
            receiver.woken().await.unwrap(),
            Woken {
                state: true,
                rung: true
            }
        );
        // `changed` ignores rings and leaves them for `woken`.
        drop(receiver.borrow_and_update());
        sender.ring();
        let waiting = tokio::time::timeout(Duration::from_millis(50), receiver.changed()).await;
        assert!(waiting.is_err(), "changed() woke for a ring");
        assert_eq!(
            receiver.woken().await.unwrap(),
            Woken {
                state: false,
                rung: true
            }
        );
    }

    #[tokio::test]
    async fn a_sender_dropped_while_the_session_waits_ends_the_wait() {
        let (sender, mut receiver) = ConnState::channel();
        let waiting = tokio::spawn(async move { receiver.changed().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(sender);
        let ended = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(ended.expect("woken").unwrap(), Err(SenderGone));
    }
}
