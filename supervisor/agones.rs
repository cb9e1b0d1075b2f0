//! The Agones SDK lifecycle (`--agones`, or `AGONES_SDK_GRPC_PORT` set by Agones
//! in the pod): how this server behaves as a game server of an Agones fleet
//! (GameFabric, or self-hosted Kubernetes with Agones).
//!
//! - `Ready()` once the port listens and every worker is up.
//! - `Health()` every `--agones-health-interval-ms`, from its own task, while
//!   every worker runs and answers its pings: a wedged or crash-looping server
//!   goes quiet and Agones replaces it. (A wedged worker is itself replaced within
//!   5 s; a worker restoring rooms after a crash counts as healthy.)
//! - The `rooms` List (`--agones-rooms list`, the default): capacity
//!   `--max-rooms`; values = the ids of the rooms placed here (open, saving or
//!   restoring) plus ids an allocation added for a room that has not opened yet
//!   (a reservation: `deploy/agones/allocation.yaml` adds the room's id, so the
//!   next allocation for it finds this server with `containsValue`). A room's id
//!   is added when it is placed and removed when it is freed; a reservation whose
//!   room does not open within `--agones-empty-grace-ms` is removed.
//! - Or the `rooms` Counter (`--agones-rooms counter`, for fleets that declare
//!   only it): count = the rooms placed here plus reservations. An allocation
//!   increments it; the server only ever changes the count by differences (a
//!   room that opened without a reservation: +1; a room that closed: −1), so it
//!   never erases a reservation made meanwhile.
//! - At start, before the first `Ready()`, the List (or the count) is set to
//!   what the server holds: values left from an earlier life are not
//!   reservations (nothing allocates a server that is not Ready).
//! - The first room (or reservation) makes the server `Allocated`; once it has
//!   held nothing for `--agones-empty-grace-ms` (a reload, a client still
//!   connecting keep it), it goes back to `Ready()` or `Shutdown()`s
//!   (`--agones-when-empty`).
//! - After `--agones-max-lifetime-secs`: no free place (capacity = count), and
//!   `Shutdown()` once it holds nothing.
//! - Every shutdown (a signal, the two above) tells Agones `Shutdown()` and then
//!   runs the usual drain: rooms saved, clients closed, exit 0.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use agones::Sdk;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::Shared;
use super::rooms::Placed;
use super::shutdown::Phase;
use contract::config::{AgonesSettings, RoomsModel, WhenEmpty};

/// The List (or Counter) a fleet declares for this server (see `deploy/agones/fleet.yaml`).
pub const ROOMS_KEY: &str = "rooms";
/// The SDK server's port when neither `--agones-sdk-port` nor the environment
/// names one (the SDK's own default).
const DEFAULT_SDK_PORT: u16 = 9357;
/// Bound on each SDK call, so a stuck sidecar cannot stall the lifecycle.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The SDK server did not answer at start-up: a configuration error (exit 2).
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot reach the Agones SDK server on localhost:{port} within {} ms ({reason}): is the Agones sidecar running? Without Agones, unset AGONES_SDK_GRPC_PORT and --agones",
    waited.as_millis()
)]
pub struct SdkUnreachable {
    port: u16,
    waited: Duration,
    reason: String,
}

/// Connects to the SDK server, waiting up to `--agones-connect-timeout-ms` for
/// it (the sidecar may start after this container).
pub async fn connect(settings: &AgonesSettings) -> Result<Sdk, SdkUnreachable> {
    let port = settings.sdk_port.unwrap_or(DEFAULT_SDK_PORT);
    let deadline = Instant::now() + settings.connect_timeout;
    let mut reason = "nothing answered: not listening, or not an Agones SDK server".to_owned();
    // The SDK gives up after 30 s of its own: asked again until our deadline.
    while let Some(left) = deadline
        .checked_duration_since(Instant::now())
        .filter(|left| !left.is_zero())
    {
        match tokio::time::timeout(left, Sdk::new(Some(port), None)).await {
            Ok(Ok(sdk)) => return Ok(sdk),
            Ok(Err(e)) => reason = e.to_string(),
            Err(_) => break,
        }
    }
    Err(SdkUnreachable {
        port,
        waited: settings.connect_timeout,
        reason,
    })
}

/// Runs the lifecycle until the server stops, and tells Agones `Shutdown()` as
/// soon as the stop begins, whatever the lifecycle is waiting for (a slow
/// sidecar must not keep Agones from hearing it).
pub async fn run(sdk: Sdk, shared: Arc<Shared>, settings: AgonesSettings) {
    let told = Arc::new(Told::default());
    let mut lifecycle = tokio::spawn(lifecycle(
        sdk.clone(),
        shared.clone(),
        settings,
        told.clone(),
    ));
    shared.shutdown.wait_for(Phase::Draining).await;
    tell_shutdown(sdk, &told).await;
    // The lifecycle ends by itself once it sees the stop; one stuck in a call
    // is not waited for.
    if tokio::time::timeout(CALL_TIMEOUT, &mut lifecycle)
        .await
        .is_err()
    {
        lifecycle.abort();
    }
}

/// Whether `Shutdown()` was sent. The state calls (`Ready`, `Allocate`,
/// `Shutdown`) are made under its lock, so that none follows `Shutdown()`:
/// the lifecycle's own calls and the stop's run in two tasks.
type Told = tokio::sync::Mutex<bool>;

/// `Shutdown()`, once per server whoever asks first.
async fn tell_shutdown(mut sdk: Sdk, told: &Told) {
    let mut told = told.lock().await;
    if std::mem::replace(&mut *told, true) {
        return;
    }
    match bounded(sdk.shutdown()).await {
        Ok(()) => info!("agones: Shutdown"),
        Err(error) => warn!(%error, "agones: Shutdown() failed"),
    }
}

/// The lifecycle proper (see the module's comment).
async fn lifecycle(sdk: Sdk, shared: Arc<Shared>, settings: AgonesSettings, told: Arc<Told>) {
    let started = Instant::now();
    let mut lifecycle = Lifecycle::new(sdk, &shared, &settings, told);
    // Ready only once every worker is up (they start in parallel with this).
    while !workers_answering(&shared) {
        tokio::select! {
            () = shared.shutdown.wait_for(Phase::Draining) => return lifecycle.shutdown(&shared).await,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    let health = tokio::spawn(keep_healthy(
        lifecycle.sdk.clone(),
        shared.clone(),
        settings.health_interval,
    ));
    lifecycle
        .run(
            &shared,
            settings.health_interval,
            settings.max_lifetime.map(|d| started + d),
        )
        .await;
    health.abort();
}

/// Every worker runs and answers its pings.
fn workers_answering(shared: &Shared) -> bool {
    shared.pool.slots().iter().all(|slot| slot.answering())
}

/// `Health()` every `every` while the workers answer; apart from the other
/// calls, so a slow one never delays a ping.
async fn keep_healthy(sdk: Sdk, shared: Arc<Shared>, every: Duration) {
    let mut pings = sdk.health_check();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_healthy = true;
    loop {
        tick.tick().await;
        let healthy = workers_answering(&shared);
        if healthy {
            match pings.try_send(()) {
                // Full: the stream is stalled; it catches up or ends.
                Ok(()) | Err(TrySendError::Full(())) => {}
                Err(TrySendError::Closed(())) => {
                    // The stream ended (the sidecar restarted): a new one.
                    pings = sdk.health_check();
                    let _ = pings.try_send(());
                }
            }
        }
        if healthy != was_healthy {
            if healthy {
                info!("agones: workers answer again; Health() resumed");
            } else {
                warn!(
                    "agones: a worker is down or not answering; Health() withheld until it is back"
                );
            }
            was_healthy = healthy;
        }
    }
}

/// An SDK call within [`CALL_TIMEOUT`]; its failure said in words.
async fn bounded<T>(
    call: impl std::future::Future<Output = agones::errors::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(describe(e)),
        Err(_) => Err(format!("no answer in {CALL_TIMEOUT:?}")),
    }
}

/// Several SDK calls within [`CALL_TIMEOUT`], their errors already in words.
async fn within<T>(
    calls: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(CALL_TIMEOUT, calls)
        .await
        .unwrap_or_else(|_| Err(format!("no answer in {CALL_TIMEOUT:?}")))
}

/// An SDK error in words: for an RPC, its gRPC code and the SDK server's
/// message (the crate's own `Display` says only "rpc failure").
fn describe(error: agones::errors::Error) -> String {
    match error {
        agones::errors::Error::Rpc(status) => format!(
            "gRPC {:?} ({}): {}",
            status.code(),
            i32::from(status.code()),
            status.message()
        ),
        other => other.to_string(),
    }
}

/// What the SDK server answers when a value is already in the List, or not in
/// it: nothing to do (it answers UNKNOWN with these words, in a cluster as in
/// local mode).
fn already_so(error: &str) -> bool {
    error.contains("already exists")
        || error.contains("already in List")
        || error.contains("not found")
}

/// The SDK's lifecycle calls.
#[derive(Debug, Clone, Copy)]
enum Call {
    Ready,
    Allocate,
}

struct Lifecycle {
    sdk: Sdk,
    model: RoomsModel,
    when_empty: WhenEmpty,
    grace: Duration,
    max_rooms: i64,
    /// The registry's rooms, as last seen.
    placed: Placed,
    /// Counter: rooms closed since the counter was last updated for them.
    closed_unaccounted: i64,
    /// List: the room ids this server listed for its own rooms (removed at once
    /// when the room is freed), and since when each other value (a
    /// reservation) has been seen.
    listed: HashSet<String>,
    reservations: HashMap<String, Instant>,
    /// Allocations whose room has not opened (Agones' count less our rooms), and
    /// since when that number has not changed.
    reserved: i64,
    reserved_since: Instant,
    /// `Allocated` (by an allocation, or by us) since the last `Ready()`.
    allocated: bool,
    /// `Ready()` failed: asked again while the server holds nothing.
    ready_due: bool,
    /// Holding no room and no reservation since then.
    empty_since: Option<Instant>,
    /// Past the maximum lifetime.
    retiring: bool,
    /// The last List or Counter update failed (and was logged).
    rooms_failing: bool,
    /// The List or Counter has been brought in line once: until then, what it
    /// holds is from before this server (a failed first read must not turn a
    /// stale value into a reservation later).
    settled: bool,
    /// `Shutdown()` was sent (here or by `run` when the stop began).
    told: Arc<Told>,
}

impl Lifecycle {
    fn new(sdk: Sdk, shared: &Shared, settings: &AgonesSettings, told: Arc<Told>) -> Lifecycle {
        Lifecycle {
            sdk,
            model: settings.rooms,
            when_empty: settings.when_empty,
            grace: settings.empty_grace,
            max_rooms: shared.registry.max_rooms() as i64,
            placed: Placed::default(),
            closed_unaccounted: 0,
            listed: HashSet::new(),
            reservations: HashMap::new(),
            reserved: 0,
            reserved_since: Instant::now(),
            allocated: false,
            ready_due: false,
            empty_since: None,
            retiring: false,
            rooms_failing: false,
            settled: false,
            told,
        }
    }

    async fn run(&mut self, shared: &Shared, tick_every: Duration, retire_at: Option<Instant>) {
        let mut placed = shared.registry.placed_rooms();
        self.placed = *placed.borrow_and_update();
        self.reconcile(shared, true).await;
        if self.call(Call::Ready).await {
            info!(capacity = self.max_rooms, "agones: Ready");
        } else {
            self.ready_due = true;
        }
        // The first tick is at once: a room already held is Allocated then.
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shared.shutdown.wait_for(Phase::Draining) => break,
                changed = placed.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let now = *placed.borrow_and_update();
                    self.rooms_changed(shared, now).await;
                }
                _ = tick.tick() => {
                    self.reconcile(shared, false).await;
                    if self.ready_due && self.holds_nothing() && self.call(Call::Ready).await {
                        self.ready_due = false;
                        self.allocated = false;
                        info!("agones: Ready");
                    }
                }
                _ = async { tokio::time::sleep_until(retire_at.expect("guarded")).await }, if retire_at.is_some() && !self.retiring => {
                    self.retiring = true;
                    info!(rooms = self.placed.now, "agones: maximum lifetime reached; no more allocations, shutting down once no room is left");
                    self.reconcile(shared, false).await;
                }
            }
            // Holding a room or a reservation: Allocated (again, after a failed
            // call, or when our own Ready() raced an allocation).
            if !self.allocated && !self.holds_nothing() {
                self.allocate().await;
            }
            match self.when_empty_now() {
                Some(WhenEmpty::Ready) => {
                    if self.call(Call::Ready).await {
                        self.allocated = false;
                        info!("agones: no room for the grace period; Ready for a new allocation");
                    } else {
                        self.ready_due = true;
                        self.allocated = false;
                    }
                }
                Some(WhenEmpty::Shutdown) => {
                    info!("agones: no room left; shutting down");
                    break;
                }
                None => {}
            }
        }
        self.shutdown(shared).await;
    }

    fn holds_nothing(&self) -> bool {
        self.placed.now == 0 && self.reserved == 0
    }

    /// The registry's rooms changed: rooms opened (maybe and closed again
    /// since the last look) and closed.
    async fn rooms_changed(&mut self, shared: &Shared, now: Placed) {
        let before = std::mem::replace(&mut self.placed, now);
        let opened = now.opened - before.opened;
        let closed = before.now as u64 + opened - now.now as u64;
        self.closed_unaccounted += closed as i64;
        if opened > 0 {
            // A room opened (maybe closed again since): not empty since before.
            self.empty_since = None;
        }
        self.reconcile(shared, false).await;
    }

    /// The action due when the server has held nothing long enough.
    fn when_empty_now(&mut self) -> Option<WhenEmpty> {
        if !self.holds_nothing() {
            self.empty_since = None;
            return None;
        }
        let since = *self.empty_since.get_or_insert_with(Instant::now);
        if self.retiring {
            return Some(WhenEmpty::Shutdown);
        }
        if !self.allocated || since.elapsed() < self.grace {
            return None;
        }
        Some(self.when_empty)
    }

    /// One lifecycle call, bounded; a failure is logged. True if it succeeded.
    async fn call(&mut self, call: Call) -> bool {
        let told = self.told.clone();
        let told = told.lock().await;
        if *told {
            return false; // the server is stopping: nothing after Shutdown()
        }
        let sdk = &mut self.sdk;
        let answer = bounded(async {
            match call {
                Call::Ready => sdk.ready().await,
                Call::Allocate => sdk.allocate().await,
            }
        })
        .await;
        drop(told);
        if let Err(error) = &answer {
            warn!(%error, "agones: {call:?}() failed; trying again");
        }
        answer.is_ok()
    }

    async fn allocate(&mut self) {
        if self.call(Call::Allocate).await {
            self.allocated = true;
            self.ready_due = false;
            info!(
                rooms = self.placed.now,
                reserved = self.reserved,
                "agones: holding a room; Allocated"
            );
        }
    }

    /// Brings the `rooms` List or Counter in line with the rooms held. At start
    /// (`initial`), and until it has once gone through, what it holds from
    /// before is not a reservation.
    async fn reconcile(&mut self, shared: &Shared, initial: bool) {
        let initial = initial || !self.settled;
        match self.model {
            RoomsModel::List => {
                self.reconcile_list(shared.registry.placed_ids(), initial)
                    .await
            }
            RoomsModel::Counter => self.reconcile_counter(initial).await,
        }
    }

    /// Brings the `rooms` List in line: every room held listed, a room freed
    /// removed at once, values an allocation added for a room to come
    /// (reservations) kept for the grace and then removed, and the capacity
    /// `--max-rooms` (the length, once retiring). Only values it sees change
    /// are touched, so a value an allocation adds meanwhile stays.
    async fn reconcile_list(&mut self, held: Vec<String>, initial: bool) {
        let mut beta = self.sdk.beta().clone();
        let read = bounded(async {
            let values = beta.get_list_values(ROOMS_KEY).await?;
            let capacity = beta.get_list_capacity(ROOMS_KEY).await?;
            Ok((values, capacity))
        })
        .await;
        let (values, capacity) = match read {
            Ok(list) => list,
            Err(error) => return self.rooms_failed("read", error),
        };
        let held: HashSet<String> = held.into_iter().collect();
        let listed: HashSet<&String> = values.iter().collect();
        let mut remove = Vec::new();
        self.reservations
            .retain(|value, _| listed.contains(value) && !held.contains(value));
        for value in values.iter().filter(|value| !held.contains(*value)) {
            if initial || self.listed.contains(value) {
                remove.push(value.clone());
                continue;
            }
            let since = *self
                .reservations
                .entry(value.clone())
                .or_insert_with(Instant::now);
            if since.elapsed() >= self.grace {
                warn!(room = %value, "agones: an allocation added this room's id and the room never opened here; the place is given back");
                remove.push(value.clone());
            }
        }
        let add: Vec<&String> = held.iter().filter(|room| !listed.contains(room)).collect();
        let length = values.len() - remove.len() + add.len();
        // Rooms of ours from now on, even if the update stops halfway (an id
        // appended before a failure is freed at once when its room closes).
        self.listed.extend(held.iter().cloned());
        let want_capacity = if self.retiring {
            length as i64
        } else {
            self.max_rooms
        };
        // Agones refuses a value past the capacity: removals first, then the
        // capacity when it grows, the additions, the capacity when it shrinks.
        let result = within(async {
            for value in &remove {
                match beta
                    .delete_list_value(ROOMS_KEY, value)
                    .await
                    .map_err(describe)
                {
                    Err(error) if !already_so(&error) => return Err(error),
                    _ => {}
                }
            }
            if want_capacity > capacity {
                beta.set_list_capacity(ROOMS_KEY, want_capacity)
                    .await
                    .map_err(describe)?;
            }
            for value in &add {
                match beta
                    .append_list_value(ROOMS_KEY, value)
                    .await
                    .map_err(describe)
                {
                    Err(error) if !already_so(&error) => return Err(error),
                    _ => {}
                }
            }
            if want_capacity < capacity {
                beta.set_list_capacity(ROOMS_KEY, want_capacity)
                    .await
                    .map_err(describe)?;
            }
            Ok(())
        })
        .await;
        if let Err(error) = result {
            return self.rooms_failed("update", error);
        }
        for value in &remove {
            self.reservations.remove(value);
        }
        self.listed = held;
        self.reserved = self.reservations.len() as i64;
        self.rooms_in_line(length as i64, want_capacity);
    }

    /// Brings the `rooms` Counter in line: every room counted, closed rooms'
    /// places given back, reservations kept until they open or expire, and the
    /// capacity `--max-rooms` (the count, once retiring). Changes the count only
    /// by differences, so an allocation's increment made meanwhile stays.
    async fn reconcile_counter(&mut self, initial: bool) {
        let mut beta = self.sdk.beta().clone();
        let read = bounded(async {
            let count = beta.get_counter_count(ROOMS_KEY).await?;
            let capacity = beta.get_counter_capacity(ROOMS_KEY).await?;
            Ok((count, capacity))
        })
        .await;
        let (count, capacity) = match read {
            Ok(counter) => counter,
            Err(error) => return self.rooms_failed("read", error),
        };
        let rooms = self.placed.now as i64;
        // Every open room counted; closed rooms' places back; at start, a count
        // from before is no reservation.
        let mut want = if initial {
            rooms
        } else {
            (count - self.closed_unaccounted).max(rooms)
        };
        let reserved = want - rooms;
        if reserved != self.reserved {
            self.reserved = reserved;
            self.reserved_since = Instant::now();
        } else if reserved > 0 && self.reserved_since.elapsed() >= self.grace {
            warn!(
                reserved,
                "agones: allocated places whose room never opened are given back"
            );
            want = rooms;
            self.reserved = 0;
            self.reserved_since = Instant::now();
        }
        let want_capacity = if self.retiring { want } else { self.max_rooms };
        // Agones refuses a count above the capacity: the capacity first when it
        // grows, the count first when the capacity shrinks.
        let capacity_first = want_capacity >= capacity;
        for step in if capacity_first { [1, 0] } else { [0, 1] } {
            let update = async {
                if step == 0 {
                    match want - count {
                        0 => Ok(()),
                        up if up > 0 => beta.increment_counter(ROOMS_KEY, up).await,
                        down => beta.decrement_counter(ROOMS_KEY, -down).await,
                    }
                } else {
                    if want_capacity == capacity {
                        return Ok(());
                    }
                    beta.set_counter_capacity(ROOMS_KEY, want_capacity).await
                }
            };
            match bounded(update).await {
                Ok(()) => {
                    if step == 0 {
                        self.closed_unaccounted = 0;
                    }
                }
                Err(error) => return self.rooms_failed("update", error),
            }
        }
        self.rooms_in_line(want, want_capacity);
    }

    /// Said once after a streak of failures.
    fn rooms_in_line(&mut self, count: i64, capacity: i64) {
        self.settled = true;
        if std::mem::replace(&mut self.rooms_failing, false) {
            info!(
                count,
                capacity,
                "agones: the `{ROOMS_KEY}` {} is in line again",
                self.model_name()
            );
        }
    }

    /// Said once per streak of failures, not on every retry.
    fn rooms_failed(&mut self, what: &str, error: String) {
        if !std::mem::replace(&mut self.rooms_failing, true) {
            let (model, field) = match self.model {
                RoomsModel::List => ("List", "lists"),
                RoomsModel::Counter => ("Counter", "counters"),
            };
            // The hint that fits what the SDK server said.
            let hint = if error.contains("not found") {
                format!(
                    "is it declared in the Fleet's spec.template.spec.{field}? `--agones-rooms` says which one the server uses"
                )
            } else if error.contains("capacity") || error.contains("out of range") {
                "more rooms and reservations than its capacity (--max-rooms)".to_owned()
            } else {
                "the SDK server did not answer as expected".to_owned()
            };
            error!(%error, "agones: cannot {what} the `{ROOMS_KEY}` {model} ({hint}); trying again every health interval");
        }
    }

    fn model_name(&self) -> &'static str {
        match self.model {
            RoomsModel::List => "List",
            RoomsModel::Counter => "Counter",
        }
    }

    /// Tells Agones `Shutdown()` (once), then starts the server's own drain.
    async fn shutdown(&mut self, shared: &Shared) {
        tell_shutdown(self.sdk.clone(), &self.told).await;
        shared.shutdown.stop();
    }
}
