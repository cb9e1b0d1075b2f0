//! The Agones SDK lifecycle (`--agones`, or `AGONES_SDK_GRPC_PORT` set by Agones
//! in the pod): how this server behaves as a game server of an Agones fleet
//! (GameFabric, or self-hosted Kubernetes with Agones).
//!
//! - `Ready()` once the port listens and every worker is up.
//! - `Health()` every `--agones-health-interval-ms`, only while every worker runs
//!   and answers its pings (what `/readyz` checks of the workers): a wedged or
//!   crash-looping server goes quiet and Agones replaces it. A wedged worker is
//!   itself replaced within 5 s, well inside the fleet's health window.
//! - The `rooms` Counter: capacity `--max-rooms`, count the rooms placed (open,
//!   saving or restoring: what holds capacity), set on every change, so that an
//!   allocator can pick a server with room for one more.
//! - The first room of an empty server `Allocate()`s it (a server holding rooms
//!   must not be scaled down as `Ready`); when the last one closes the server goes
//!   back to `Ready()` or `Shutdown()`s (`--agones-when-empty`).
//! - After `--agones-max-lifetime-secs`: no more allocations (the capacity
//!   follows the count down) and `Shutdown()` once empty.
//! - Every shutdown (a signal, the two above) tells Agones `Shutdown()` and then
//!   runs the usual drain: rooms saved, clients closed, exit 0.

use std::sync::Arc;
use std::time::Duration;

use agones::Sdk;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::Shared;
use crate::config::{AgonesSettings, WhenEmpty};

/// The Counter a fleet declares for this server (see `deploy/agones/fleet.yaml`).
pub const ROOMS_COUNTER: &str = "rooms";
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
    let unreachable = |reason: String| SdkUnreachable {
        port,
        waited: settings.connect_timeout,
        reason,
    };
    match tokio::time::timeout(settings.connect_timeout, Sdk::new(Some(port), None)).await {
        Ok(Ok(sdk)) => Ok(sdk),
        Ok(Err(e)) => Err(unreachable(e.to_string())),
        Err(_) => Err(unreachable("no answer".into())),
    }
}

/// Runs the lifecycle until the server stops; then tells Agones `Shutdown()`.
pub async fn run(sdk: Sdk, shared: Arc<Shared>, settings: AgonesSettings) {
    let started = Instant::now();
    let mut lifecycle = Lifecycle {
        sdk,
        max_rooms: shared.registry.max_rooms() as i64,
        told: Told::default(),
        allocated: false,
        retiring: false,
        shut_down: false,
    };
    // Ready only once every worker is up (they start in parallel with this).
    while !workers_healthy(&shared) {
        tokio::select! {
            _ = shared.stop.cancelled() => return lifecycle.shutdown(&shared).await,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    let mut placed = shared.registry.placed_rooms();
    let mut rooms = *placed.borrow_and_update() as i64;
    lifecycle.sync_counter(rooms).await;
    let mut ready_pending = !lifecycle.call(Call::Ready).await;
    if !ready_pending {
        info!(
            capacity = lifecycle.max_rooms,
            "agones: Ready (rooms counter capacity {})", lifecycle.max_rooms
        );
    }
    if rooms > 0 {
        lifecycle.allocate().await;
        ready_pending = false;
    }

    let mut health = lifecycle.sdk.health_check();
    let mut was_healthy = true;
    let mut tick = tokio::time::interval(settings.health_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let retire_at = settings.max_lifetime.map(|d| started + d);
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => break,
            _ = tick.tick() => {
                let healthy = workers_healthy(&shared);
                if healthy && health.send(()).await.is_err() {
                    // The health stream ended (the sidecar restarted): a new one.
                    health = lifecycle.sdk.health_check();
                    let _ = health.send(()).await;
                }
                if healthy != was_healthy {
                    if healthy {
                        info!("agones: workers healthy again; Health() resumed");
                    } else {
                        warn!("agones: a worker is down or not answering; Health() withheld until it is back");
                    }
                    was_healthy = healthy;
                }
                // Calls that failed are made again (`Ready` only while empty: a
                // server holding rooms stays allocated).
                if ready_pending && rooms == 0 && lifecycle.call(Call::Ready).await {
                    ready_pending = false;
                    lifecycle.allocated = false;
                    info!("agones: Ready");
                }
                if rooms > 0 && !lifecycle.allocated {
                    lifecycle.allocate().await;
                }
                lifecycle.sync_counter(rooms).await;
            }
            changed = placed.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = *placed.borrow_and_update() as i64;
                let before = std::mem::replace(&mut rooms, now);
                if now > 0 && !lifecycle.allocated {
                    lifecycle.allocate().await;
                    ready_pending = false;
                }
                lifecycle.sync_counter(now).await;
                if now == 0 && before > 0 {
                    if lifecycle.retiring {
                        info!("agones: the last room closed after the maximum lifetime; shutting down");
                        return lifecycle.shutdown(&shared).await;
                    }
                    match settings.when_empty {
                        WhenEmpty::Ready => {
                            if lifecycle.call(Call::Ready).await {
                                lifecycle.allocated = false;
                                info!("agones: the last room closed; Ready for a new allocation");
                            } else {
                                ready_pending = true;
                            }
                        }
                        WhenEmpty::Shutdown => {
                            info!("agones: the last room closed; shutting down (--agones-when-empty shutdown)");
                            return lifecycle.shutdown(&shared).await;
                        }
                    }
                }
            }
            _ = async { tokio::time::sleep_until(retire_at.expect("guarded")).await }, if retire_at.is_some() && !lifecycle.retiring => {
                lifecycle.retiring = true;
                if rooms == 0 {
                    info!("agones: maximum lifetime reached with no room open; shutting down");
                    return lifecycle.shutdown(&shared).await;
                }
                info!(rooms, "agones: maximum lifetime reached; no more allocations, shutting down once the open rooms close");
                lifecycle.sync_counter(rooms).await;
            }
        }
    }
    lifecycle.shutdown(&shared).await;
}

/// Every worker runs, answers its pings and holds all its rooms.
fn workers_healthy(shared: &Shared) -> bool {
    shared.pool.slots().iter().all(|slot| slot.ready())
}

/// What Agones was last told of the `rooms` Counter (`None`: not yet, or the
/// call failed and is made again).
#[derive(Default)]
struct Told {
    count: Option<i64>,
    capacity: Option<i64>,
    /// The last attempt failed (and was logged).
    failing: bool,
}

/// The SDK's lifecycle calls.
#[derive(Debug, Clone, Copy)]
enum Call {
    Ready,
    Allocate,
    Shutdown,
}

struct Lifecycle {
    sdk: Sdk,
    max_rooms: i64,
    told: Told,
    /// Told `Allocate()` since the server was last empty.
    allocated: bool,
    /// Past the maximum lifetime: capacity follows the count down.
    retiring: bool,
    shut_down: bool,
}

impl Lifecycle {
    /// One lifecycle call, bounded; a failure is logged. True if it succeeded.
    async fn call(&mut self, call: Call) -> bool {
        let sdk = &mut self.sdk;
        let answer = tokio::time::timeout(CALL_TIMEOUT, async {
            match call {
                Call::Ready => sdk.ready().await,
                Call::Allocate => sdk.allocate().await,
                Call::Shutdown => sdk.shutdown().await,
            }
        })
        .await;
        match answer {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                warn!(error = %e, "agones: {call:?}() failed; trying again");
                false
            }
            Err(_) => {
                warn!("agones: {call:?}() got no answer in {CALL_TIMEOUT:?}; trying again");
                false
            }
        }
    }

    async fn allocate(&mut self) {
        if self.call(Call::Allocate).await {
            self.allocated = true;
            info!("agones: a room opened; Allocated");
        }
    }

    /// Tells Agones the `rooms` Counter (count `rooms`, capacity `--max-rooms`,
    /// or `rooms` once retiring), in the order that keeps count ≤ capacity.
    async fn sync_counter(&mut self, rooms: i64) {
        let capacity = if self.retiring { rooms } else { self.max_rooms };
        // Agones refuses a count above the capacity: lower the count first when
        // the capacity goes below the count it has (or may have).
        let count_first = self.told.count.is_none_or(|told| capacity < told);
        let mut beta = self.sdk.beta().clone();
        for step in if count_first { [0, 1] } else { [1, 0] } {
            let (told, want, what) = if step == 0 {
                (&mut self.told.count, rooms, "count")
            } else {
                (&mut self.told.capacity, capacity, "capacity")
            };
            if *told == Some(want) {
                continue;
            }
            let call = async {
                if step == 0 {
                    beta.set_counter_count(ROOMS_COUNTER, want).await
                } else {
                    beta.set_counter_capacity(ROOMS_COUNTER, want).await
                }
            };
            match tokio::time::timeout(CALL_TIMEOUT, call).await {
                Ok(Ok(())) => *told = Some(want),
                failed => {
                    *told = None;
                    // Said once per streak of failures, not on every retry.
                    if !std::mem::replace(&mut self.told.failing, true) {
                        let error = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!("no answer in {CALL_TIMEOUT:?}"),
                        };
                        error!(%error, "agones: cannot set the `{ROOMS_COUNTER}` counter's {what} to {want} (is it declared in the Fleet's spec.template.spec.counters?); trying again every health interval");
                    }
                    return;
                }
            }
        }
        if std::mem::replace(&mut self.told.failing, false) {
            info!(
                count = rooms,
                capacity, "agones: the `{ROOMS_COUNTER}` counter is set again"
            );
        }
    }

    /// Tells Agones `Shutdown()` (once), then starts the server's own drain.
    async fn shutdown(&mut self, shared: &Shared) {
        if !std::mem::replace(&mut self.shut_down, true) && self.call(Call::Shutdown).await {
            info!("agones: Shutdown");
        }
        shared.stop.cancel();
    }
}
