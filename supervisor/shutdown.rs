//! The server's shutdown, held as data: one [`Phase`] that every part reads
//! from one place ([`Shutdown`]), and the deadlines of the stop
//! ([`ShutdownPlan`]), fixed when [`run`](super::run) begins the stop: at the
//! stop, or once start-up is done if the stop came during it (a slow start
//! must not eat the time for saving).
//!
//! | phase | what it means | who reads it |
//! |---|---|---|
//! | [`Running`](Phase::Running) | serving | |
//! | [`Draining`](Phase::Draining) | a stop was asked: rooms are saved while clients stay connected | upgrades and `/readyz` answer 503; sessions stop reading their clients (nothing new is applied, so nothing applied is left unsaved; snapshots still go out); a worker that ends is not replaced; the Agones lifecycle says `Shutdown()`; [`run`](super::run) asks every worker to save by [`saves_until`](ShutdownPlan::saves_until) |
//! | [`Closing`](Phase::Closing) | rooms are saved (or out of time): say goodbye | sessions close their clients with 1001, by [`clients_until`](ShutdownPlan::clients_until) |
//! | [`Stopped`](Phase::Stopped) | clients are gone | no more connections accepted; every worker's socket is closed (they exit at once after a drain), those still running at [`exit_by`](ShutdownPlan::exit_by) are killed; then the process exits |
//!
//! Who moves it: [`Shutdown::stop`] starts draining (a signal, or the Agones
//! lifecycle: when empty, or after its maximum lifetime); [`run`](super::run)
//! then moves it to `Closing` and `Stopped` as each step ends. The phase only
//! moves forward.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Where the server is in its life; see the [module](self) docs for what each
/// phase means and who reads it. Ordered: a later phase compares greater.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Serving.
    Running,
    /// Saving every room before exit; clients stay connected but are not read.
    Draining,
    /// Closing every client with 1001.
    Closing,
    /// No connections; workers are stopped, and the process exits.
    Stopped,
}

/// Of the shutdown budget (`--shutdown-grace-ms`), what is kept after the saves
/// for closing clients (a session waits up to 1 s for the client's answer to its
/// close frame) and then stopping workers (they exit at once after a drain).
pub const SHUTDOWN_RESERVE: Duration = Duration::from_millis(1500);

/// The deadlines of one shutdown, all within the budget from the stop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShutdownPlan {
    /// Workers answer their drain (saved, or not) by then.
    pub saves_until: Instant,
    /// Clients have had their `1001` by then.
    pub clients_until: Instant,
    /// Workers still running then are killed, and the process exits.
    pub exit_by: Instant,
}

impl ShutdownPlan {
    /// Saves get the budget less [`SHUTDOWN_RESERVE`] (at least half of it, so a
    /// short budget still saves); closing clients gets two thirds of the rest,
    /// stopping workers one third.
    pub fn new(stopped: Instant, budget: Duration) -> ShutdownPlan {
        let reserve = SHUTDOWN_RESERVE.min(budget / 2);
        let exit_by = stopped + budget;
        ShutdownPlan {
            saves_until: exit_by - reserve,
            clients_until: exit_by - reserve / 3,
            exit_by,
        }
    }
}

/// The server's shutdown: its [`Phase`], and once it stops, its
/// [`ShutdownPlan`]. Made by [`main`](super::main) (or by a test that calls
/// [`run`](super::run)), which stops it on a signal; cloned into every part
/// that reads it (the acceptor, the HTTP endpoints, the sessions, the pool's
/// worker tasks, the Agones lifecycle). All clones share one phase.
#[derive(Clone)]
pub struct Shutdown(Arc<State>);

struct State {
    phase: watch::Sender<Phase>,
    /// The whole stop's budget (`--shutdown-grace-ms`).
    budget: Duration,
    /// Fixed by [`Shutdown::begin_plan`], when `run` begins the stop.
    plan: OnceLock<ShutdownPlan>,
}

impl Shutdown {
    /// A running server whose stop, once asked, takes at most `budget`.
    pub fn new(budget: Duration) -> Shutdown {
        Shutdown(Arc::new(State {
            phase: watch::Sender::new(Phase::Running),
            budget,
            plan: OnceLock::new(),
        }))
    }

    /// The phase now.
    pub fn phase(&self) -> Phase {
        *self.0.phase.borrow()
    }

    /// Whether a stop was asked (any phase after `Running`).
    pub fn is_stopping(&self) -> bool {
        self.phase() > Phase::Running
    }

    /// Waits until the phase is `phase` or later.
    pub async fn wait_for(&self, phase: Phase) {
        // The sender lives in `self`: the wait cannot fail.
        let _ = self.0.phase.subscribe().wait_for(|now| *now >= phase).await;
    }

    /// Every change of phase, for a task that selects on it (the current phase
    /// counts as seen).
    pub fn subscribe(&self) -> watch::Receiver<Phase> {
        self.0.phase.subscribe()
    }

    /// Asks the server to stop: starts draining. Does nothing if a stop was
    /// already asked.
    pub fn stop(&self) {
        self.advance(Phase::Draining);
    }

    /// Fixes the stop's deadlines from now (the first call; later ones return
    /// the same plan). Called by [`run`](super::run) when it begins the stop,
    /// which is at the stop, or after start-up if the stop came during it.
    pub(super) fn begin_plan(&self) -> ShutdownPlan {
        *self
            .0
            .plan
            .get_or_init(|| ShutdownPlan::new(Instant::now(), self.0.budget))
    }

    /// The stop's deadlines; `None` until `run` has begun the stop.
    pub fn plan(&self) -> Option<ShutdownPlan> {
        self.0.plan.get().copied()
    }

    /// Moves the phase forward to `phase` (never back). For the shutdown
    /// sequence in [`run`](super::run); a stop starts with [`Shutdown::stop`].
    pub(super) fn advance(&self, phase: Phase) {
        self.0.phase.send_if_modified(|now| {
            let later = phase > *now;
            if later {
                *now = phase;
            }
            later
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shutdown_plan_fits_the_budget_and_keeps_the_reserve() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(
            ShutdownPlan::new(t, ms(9000)),
            ShutdownPlan {
                saves_until: t + ms(7500),
                clients_until: t + ms(8500),
                exit_by: t + ms(9000),
            }
        );
        // A short budget: half for saves, the other half split as usual.
        assert_eq!(
            ShutdownPlan::new(t, ms(1500)),
            ShutdownPlan {
                saves_until: t + ms(750),
                clients_until: t + ms(1250),
                exit_by: t + ms(1500),
            }
        );
        let none = ShutdownPlan::new(t, Duration::ZERO);
        assert_eq!((none.saves_until, none.exit_by), (t, t));
    }

    #[tokio::test]
    async fn the_phase_only_moves_forward_and_the_plan_is_fixed_once() {
        let shutdown = Shutdown::new(Duration::from_secs(9));
        assert_eq!((shutdown.phase(), shutdown.plan()), (Phase::Running, None));
        shutdown.stop();
        assert!(shutdown.is_stopping());
        assert_eq!(
            shutdown.plan(),
            None,
            "fixed when the stop begins, not asked"
        );
        let plan = shutdown.begin_plan();
        assert_eq!(shutdown.begin_plan(), plan);
        shutdown.advance(Phase::Closing);
        // A second stop (another signal, the Agones lifecycle) changes nothing.
        shutdown.stop();
        shutdown.advance(Phase::Draining);
        assert_eq!(shutdown.phase(), Phase::Closing);
        assert_eq!(shutdown.plan(), Some(plan));
        shutdown.wait_for(Phase::Draining).await;
        let waiting = shutdown.clone();
        let stopped = tokio::spawn(async move { waiting.wait_for(Phase::Stopped).await });
        tokio::task::yield_now().await;
        assert!(!stopped.is_finished());
        shutdown.advance(Phase::Stopped);
        stopped.await.unwrap();
    }
}
