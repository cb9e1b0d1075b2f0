//! The supervisor: one process that owns every client connection. It
//! authenticates upgrades, places rooms on workers, forwards client frames to the
//! owning worker, fans the worker's snapshots out, and keeps the worker processes
//! running. It never interprets room state.

#![deny(missing_docs)]

#[cfg(feature = "agones")]
mod agones;
mod auth;
mod budgets;
mod close;
mod dev;
mod history;
mod host;
mod http;
mod inflate;
mod memory;
mod metrics;
mod pool;
mod ratelimit;
mod rooms;
mod session;
mod shutdown;
mod tls;
mod websocket;
mod worker_queue;

// What the binary (`src/`) and the tests use; the rest is the crate's own.
pub use auth::Authenticator;
pub use host::{AGONES_BUILT, detect as detect_host};
pub use memory::ROOMS_REFUSED_AT;
pub use pool::WorkerProgram;
pub use shutdown::{Phase, Shutdown};
pub use tls::load as load_tls;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use contract::config::{Config, PersistSettings, StoreConfig};
use http::Port;
use pool::{DrainReport, WorkerPool};
use rooms::Registry;
use shutdown::ShutdownPlan;

/// State shared by every connection task: made once by [`run`], handed to each
/// accepted connection, and read by the HTTP endpoints, the sessions and the
/// Agones lifecycle.
pub(crate) struct Shared {
    /// The validated command line.
    pub config: Config,
    /// Every metric the server exposes at `/metrics`.
    pub metrics: Arc<metrics::Metrics>,
    /// Verifies each upgrade's token.
    pub auth: Authenticator,
    /// Which worker holds each room; where a connection gets its room's handle.
    pub registry: Arc<Registry>,
    /// The worker processes (their ids, pids, health; the drain at shutdown).
    pub pool: WorkerPool,
    /// Source of connection ids.
    pub next_conn: AtomicU64,
    /// Every WebSocket session, so shutdown can wait for their close frames.
    pub sessions: TaskTracker,
    /// Where the server is in its life (running, or which step of its stop).
    pub shutdown: Shutdown,
    /// The TLS acceptor, when the server has a certificate (`--tls-cert`).
    pub tls: Option<Arc<tls::Tls>>,
    /// The main port's `--max-connections` places: the pre-auth share and the
    /// sessions' places.
    pub budgets: Arc<budgets::ConnectionBudgets>,
    /// The monitor's last 15 minutes (`/admin`, `/admin/history`).
    pub history: std::sync::Mutex<history::History>,
}

impl Shared {
    /// Each worker's id, pid, restarts and rooms (for `/status` and the monitor).
    pub fn workers_json(&self) -> Vec<serde_json::Value> {
        let rooms = self.registry.rooms_by_worker();
        self.pool
            .slots()
            .iter()
            .zip(rooms)
            .map(|(slot, rooms)| {
                serde_json::json!({
                    "id": slot.id.0,
                    "pid": slot.pid(),
                    "restarts": slot.restarts(),
                    "rooms": rooms.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
                })
            })
            .collect()
    }
}

/// Entry point: binds the port, handles signals, runs the server.
pub fn main(config: Config) -> anyhow::Result<StopOutcome> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(async {
        let listener = TcpListener::bind((config.bind, config.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", config.bind, config.port))?;
        let shutdown = Shutdown::new(config.shutdown_grace);
        tokio::spawn(watch_signals(shutdown.clone()));
        run(config, listener, shutdown, WorkerProgram::ThisExecutable).await
    });
    // Everything the stop needed has been awaited (the supervisor runs
    // nothing else on blocking threads); one still running waits on a child
    // stopped before its exec (`pool::program::start`), and must not delay
    // the exit past the stop's budget (a red-team run measured the 2 s wait
    // this had before landing past a container's 10 s SIGKILL).
    runtime.shutdown_background();
    outcome.inspect_err(|e| {
        // Another server owns the data: a configuration error, one line, exit 2.
        if let Some(in_use) = e.downcast_ref::<DataDirInUse>() {
            eprintln!("session-server: {in_use}");
            std::process::exit(2);
        }
        #[cfg(feature = "agones")]
        if let Some(unreachable) = e.downcast_ref::<agones::SdkUnreachable>() {
            eprintln!("session-server: {unreachable}");
            std::process::exit(2);
        }
    })
}

/// SIGTERM, SIGINT or SIGHUP starts a graceful stop; a second one exits at once.
async fn watch_signals(shutdown: Shutdown) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        warn!("cannot install signal handlers");
        return;
    };
    let mut next = async || {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = hup.recv() => "SIGHUP",
        }
    };
    // Awaited outside the log macros: a macro skips its arguments when its
    // level is filtered out (RUST_LOG=warn would then stop the server at once).
    let first = next().await;
    info!("{first}: shutting down");
    shutdown.stop();
    let second = next().await;
    warn!("second signal ({second}): exiting now");
    std::process::exit(130);
}

/// How a stop ended: what the process's exit code says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Every room's changes are in the store (exit 0).
    EverythingSaved,
    /// Some room's changes are not in the store: its shapes are in a fallback
    /// file (or the log) named in the shutdown's error line, or its worker
    /// did not answer. Exit [`NOT_ALL_SAVED_EXIT_CODE`](Self::NOT_ALL_SAVED_EXIT_CODE).
    NotAllSaved,
}

impl StopOutcome {
    /// The exit code of a stop that left rooms unsaved, so an orchestrator (a
    /// pod's last state, `docker ps -a`, systemd) shows that an operator has
    /// fallback files to replay.
    pub const NOT_ALL_SAVED_EXIT_CODE: u8 = 3;
}

/// Runs the server on `listener` until `shutdown` is stopped, then runs the
/// stop through its phases (see [`shutdown`]). `shutdown` is made with
/// `config.shutdown_grace` as its budget (see [`main`]); workers run `program`
/// (the server itself: [`WorkerProgram::ThisExecutable`]; tests that run the
/// supervisor in their own process name the server's binary).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: Shutdown,
    program: WorkerProgram,
) -> anyhow::Result<StopOutcome> {
    // Held (locked) until `run` returns, that is for the server's life.
    let _data_lock = lock_data_dir(&config.persistence)?;
    let internal =
        match config.internal_port {
            Some(port) => Some(TcpListener::bind((config.bind, port)).await.with_context(
                || format!("cannot listen on {}:{port} (--internal-port)", config.bind),
            )?),
            None => None,
        };
    let connection_capacity = raise_fd_limit(config.limits.max_connections);
    info!(store = %config.persistence.store, "persistence");
    let (registry, inboxes) =
        Registry::new(config.workers, config.rooms_per_worker, config.max_rooms);
    let registry = Arc::new(registry);
    let metrics = Arc::new(metrics::Metrics::new(&config.hathora));
    // Descriptors past `--max-connections` (and the internal port's) hold
    // lingering sockets, at most as many as `--max-connections` (a socket's
    // kernel buffers are memory too).
    let spare_descriptors = connection_capacity
        .map_or(0, |c| {
            c.saturating_sub((config.limits.max_connections + INTERNAL_CONNECTIONS) as u64)
        })
        .min(config.limits.max_connections as u64);
    let budgets = Arc::new(
        budgets::ConnectionBudgets::new(
            config.limits.max_connections,
            config.limits.handshake_timeout,
        )
        .with_lingering(spare_descriptors as usize),
    );
    let pool = WorkerPool::start(
        inboxes,
        config.persistence.clone(),
        program,
        registry.clone(),
        metrics.clone(),
        shutdown.clone(),
    )
    .await
    // The workers that did start go too, also when `run` is called inside a
    // longer-lived process (a test).
    .inspect_err(|_| abandon_start(&shutdown))?;
    // Then Agones (the store is checked first, by the first worker's answer):
    // without its SDK server there is nothing to run for (exit 2). Either way
    // no client is connected yet, so the workers just go.
    #[cfg(feature = "agones")]
    let agones_sdk = match &config.agones {
        Some(settings) => {
            let sdk = tokio::select! {
                sdk = agones::connect(settings) => sdk.map(Some),
                () = shutdown.wait_for(Phase::Draining) => Ok(None),
            };
            if !matches!(sdk, Ok(Some(_))) {
                abandon_start(&shutdown);
                pool.stopped().await;
            }
            match sdk? {
                Some(sdk) => Some(sdk),
                // A stop while waiting for the sidecar: nothing to drain yet.
                None => return Ok(StopOutcome::EverythingSaved),
            }
        }
        None => None,
    };
    let hathora = &config.hathora;
    info!(
        workers = config.workers,
        rooms_per_worker = config.rooms_per_worker,
        max_rooms = config.max_rooms,
        require_host_claim = config.require_host_claim,
        hathora_process_id = hathora.process_id.as_deref().unwrap_or("-"),
        hathora_region = hathora.region.as_deref().unwrap_or("-"),
        hathora_app_id = hathora.app_id.as_deref().unwrap_or("-"),
        "workers started"
    );
    let tls = match &config.tls {
        Some(files) => {
            let tls = Arc::new(tls::Tls::new(files)?);
            tokio::spawn(tls.clone().watch(
                files.clone(),
                config.tls_reload_check,
                metrics.clone(),
            ));
            info!(cert = %files.cert.display(), "serving TLS (https://, wss://)");
            Some(tls)
        }
        None => None,
    };
    let shared = Arc::new(Shared {
        tls,
        auth: Authenticator::new(config.jwt_secret.as_str(), config.require_host_claim)
            .accepting_dev_tokens(config.dev),
        metrics,
        config,
        registry,
        pool,
        next_conn: AtomicU64::new(1),
        sessions: TaskTracker::new(),
        shutdown: shutdown.clone(),
        budgets,
        history: Default::default(),
    });

    let port = listener.local_addr()?.port();
    defer_accept_until_data(&listener, shared.config.limits.handshake_timeout);
    // Accepting goes on while draining (so `/readyz` can say 503 and late
    // upgrades get a clear 503); it stops once every client is closed.
    tokio::spawn(ring_sessions_on_phase(
        shared.shutdown.clone(),
        shared.registry.clone(),
    ));
    tokio::spawn(ring_sessions_for_pings(
        shared.registry.clone(),
        shared.config.ping_interval,
        shared.shutdown.clone(),
    ));
    let acceptor = tokio::spawn(accept(listener, shared.clone(), Port::Main));
    if let Some(listener) = internal {
        defer_accept_until_data(&listener, shared.config.limits.handshake_timeout);
        info!(
            port = listener.local_addr()?.port(),
            "internal port: /healthz, /readyz, /metrics, /status, /admin"
        );
        tokio::spawn(accept(listener, shared.clone(), Port::Internal));
    }
    tokio::spawn(memory::return_freed_memory(shared.registry.placed_rooms()));
    tokio::spawn(history::sample(shared.clone()));
    if let Some(limit) = shared.config.limits.memory_limit {
        info!(
            limit_mib = limit >> 20,
            "memory budget: new rooms refused from {:.0}% of it, new shapes from {:.0}%",
            memory::ROOMS_REFUSED_AT * 100.0,
            memory::SHAPES_REFUSED_AT * 100.0
        );
        tokio::spawn(memory::enforce_budget(shared.clone(), limit));
    }
    // The line the seed documents; printed whatever the log filter is.
    println!("Listening on *:{port}");
    if shared.config.dev {
        println!(
            "Dev mode: open http://localhost:{port}/ in two browser tabs (room monitor: http://localhost:{port}/admin)"
        );
        // Said loudly: what dev mode opens, and to whom.
        let bind = shared.config.bind;
        println!(
            "Dev mode exposes, on {bind}:{port}: /dev/token mints tokens for any user and room, and /admin, /status and /metrics answer without a token. For development only."
        );
        warn!(%bind, port, "dev mode: /dev/token mints tokens for anyone who can reach this address");
    }
    #[cfg(feature = "agones")]
    let agones_task = agones_sdk
        .zip(shared.config.agones.clone())
        .map(|(sdk, settings)| {
            info!("agones: SDK server reached");
            tokio::spawn(agones::run(sdk, shared.clone(), settings))
        });
    shutdown.wait_for(Phase::Draining).await;

    // Save first, while clients are still connected (and not read: see
    // `Phase::Draining`); then say goodbye. Every step is cut to the plan, so
    // the whole shutdown fits in the budget.
    // The deadlines count from here: a stop that came during start-up gets
    // the whole budget once the server is up, as one that comes later does.
    let plan = shutdown.begin_plan();
    info!(
        budget_ms = shared.config.shutdown_grace.as_millis() as u64,
        "saving rooms before exit"
    );
    let outcome = save_every_room(&shared, &plan).await;

    shutdown.advance(Phase::Closing);
    shared.sessions.close();
    if tokio::time::timeout_at(plan.clients_until, shared.sessions.wait())
        .await
        .is_err()
    {
        warn!("some sessions did not close in time");
    }
    shutdown.advance(Phase::Stopped);
    let _ = acceptor.await;
    shared.pool.stopped().await;
    #[cfg(feature = "agones")]
    if let Some(mut task) = agones_task {
        // It told Agones `Shutdown()` when the stop began; a sidecar slow to
        // answer gets a little longer, not the whole grace.
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
    info!("stopped");
    Ok(outcome)
}

/// The stop's saves: asks every worker to save by the plan's `saves_until`;
/// a worker lost meanwhile (ended, or silent) wrote nothing, so its rooms are
/// replayed from the supervisor's journal into fallback files, within the
/// clients' time. Logs the outcome: every room saved, or which were not and
/// where their shapes are.
async fn save_every_room(shared: &Shared, plan: &ShutdownPlan) -> StopOutcome {
    let drained = shared.pool.drain(plan.saves_until).await;
    // Every lost worker's rooms at once: the clients' time is all they get.
    let reports =
        futures_util::future::join_all(drained.into_iter().map(|(worker, report)| async move {
            let mut report = match report {
                Some(report) => report,
                None => DrainReport {
                    saved: 0,
                    unsaved: shared.registry.unconfirmed_rooms(worker).await,
                    lost: true,
                    fallback: Vec::new(),
                },
            };
            if report.lost {
                report.fallback = shared
                    .pool
                    .salvage_unconfirmed(worker, plan.clients_until)
                    .await;
            }
            (worker, report)
        }))
        .await;
    // Quarantined rooms still being replayed, or whose replay failed.
    let unsalvaged = shared.pool.settle_salvages(plan.clients_until).await;
    let saved: u32 = reports.iter().map(|(_, r)| r.saved).sum();
    let unsaved: Vec<&str> = reports
        .iter()
        .flat_map(|(_, r)| r.unsaved.iter().map(|room| room.0.as_str()))
        .collect();
    let lost: Vec<String> = reports
        .iter()
        .filter(|(_, r)| r.lost)
        .map(|(id, _)| id.to_string())
        .collect();
    let fallback: Vec<String> = reports
        .iter()
        .flat_map(|(_, r)| r.fallback.iter())
        .map(|f| match &f.file {
            Ok(file) => format!("{}: {file}", f.room),
            Err(why) => format!("{}: no file ({why})", f.room),
        })
        .collect();
    if unsaved.is_empty() && lost.is_empty() && unsalvaged.is_empty() {
        info!(saved, "shutdown: every room saved");
        StopOutcome::EverythingSaved
    } else {
        error!(saved, ?unsaved, ?fallback, workers_lost = ?lost, quarantined_not_in_a_file_yet = ?unsalvaged, "shutdown: some rooms could not be saved; their shapes are in the fallback files named (exit code {})", StopOutcome::NOT_ALL_SAVED_EXIT_CODE);
        StopOutcome::NotAllSaved
    }
}

/// Ends a start that goes no further (no client was ever connected, so there is
/// nothing to save): the workers' sockets close and they exit by themselves
/// (killed only past the stop's budget).
fn abandon_start(shutdown: &Shutdown) {
    shutdown.stop();
    shutdown.begin_plan();
    shutdown.advance(Phase::Stopped);
}

/// Connections the internal port serves at once (probes, a scraper, an
/// operator); past them the oldest closes for a new one.
const INTERNAL_CONNECTIONS: usize = 64;

/// Sessions wait on their own cell, not on the shutdown phase (see
/// `rooms::conn_state`): each move of the phase rings them all, through
/// their rooms' slot tasks.
async fn ring_sessions_on_phase(shutdown: Shutdown, registry: Arc<Registry>) {
    let mut phase = shutdown.subscribe();
    // A stop during start-up moved it before this task began.
    phase.mark_changed();
    while phase.changed().await.is_ok() {
        let now = *phase.borrow_and_update();
        if now > Phase::Running {
            registry.phase_moved();
        }
        if now == Phase::Stopped {
            return;
        }
    }
}

/// Sessions have no ping timer of their own (a timer per idle connection is
/// memory every connection pays): one share of them is rung every
/// `ping_every` ÷ [`rooms::PING_SHARES`], so each is rung once an interval,
/// and a session takes a ring as its ping tick (see `session`).
async fn ring_sessions_for_pings(
    registry: Arc<Registry>,
    ping_every: Duration,
    shutdown: Shutdown,
) {
    let mut ticks = tokio::time::interval(ping_every / rooms::PING_SHARES as u32);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stopped = shutdown.wait_for(Phase::Stopped);
    tokio::pin!(stopped);
    for tick in 0u64.. {
        tokio::select! {
            _ = ticks.tick() => registry.ping_tick(tick % rooms::PING_SHARES),
            () = &mut stopped => return,
        }
    }
}

/// Accepts connections on `port` until the server is [`Phase::Stopped`]. Each
/// connection takes a place in its port's budget ([`budgets`]), which may close
/// older ones to make room; on the main port it moves to a session place if it
/// authenticates.
async fn accept(listener: TcpListener, shared: Arc<Shared>, port: Port) {
    let budgets = match port {
        Port::Main => shared.budgets.clone(),
        Port::Internal => Arc::new(budgets::ConnectionBudgets::internal_port(
            INTERNAL_CONNECTIONS,
            shared.config.limits.handshake_timeout,
        )),
    };
    let mut made_room = MadeRoom::default();
    let stopped = shared.shutdown.wait_for(Phase::Stopped);
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            () = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let socket = std::os::fd::AsRawFd::as_raw_fd(&stream);
                    let (place, closed) = budgets.admit(peer, socket);
                    match port {
                        Port::Main => {
                            for &reason in &closed {
                                shared.metrics.pre_auth_closed(reason);
                            }
                            made_room.count(closed.len(), &budgets);
                        }
                        Port::Internal => {
                            for _ in &closed {
                                shared.metrics.internal_connections_closed.inc();
                            }
                        }
                    }
                    tokio::spawn(http::serve_connection(stream, shared.clone(), place, port));
                }
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Asks the kernel to hand a connection to `accept` only once its client has
/// sent something (Linux's `TCP_DEFER_ACCEPT`, nginx's `deferred`), or after
/// `timeout` without: a real client sends its TLS hello or its request at
/// once, so a flood of idle sockets waits in the kernel's handshake queue
/// instead of taking places, and turns over once per timeout instead of as
/// fast as it can reconnect.
fn defer_accept_until_data(listener: &TcpListener, timeout: Duration) {
    let seconds = timeout.as_secs().max(1) as libc::c_int;
    // SAFETY: a valid listening socket, and an int option of the right size.
    let set = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(listener),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const seconds).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot set TCP_DEFER_ACCEPT: idle sockets take pre-auth places as soon as they connect");
    }
}

/// Says, at most once a minute, how many connections not yet authenticated
/// were closed to make room: one line at 3 a.m., not one per socket of a flood.
#[derive(Default)]
struct MadeRoom {
    since_said: usize,
    said_at: Option<std::time::Instant>,
}

impl MadeRoom {
    const EVERY: Duration = Duration::from_secs(60);

    fn count(&mut self, closed: usize, budgets: &budgets::ConnectionBudgets) {
        self.since_said += closed;
        if self.since_said == 0 || self.said_at.is_some_and(|at| at.elapsed() < Self::EVERY) {
            return;
        }
        warn!(
            closed = self.since_said,
            pre_auth_share = budgets.pre_auth_share(),
            per_address = budgets::PER_ADDRESS,
            "connections not yet authenticated closed to make room for newer ones (an address over its cap or the pre-auth share full: a flood of idle sockets?); sessions are not affected; pre_auth_closed_total has the reasons"
        );
        self.since_said = 0;
        self.said_at = Some(std::time::Instant::now());
    }
}

/// File descriptors kept for everything but client connections (worker sockets,
/// the store, logs, listeners).
const RESERVED_FDS: u64 = 64;

/// Raises the soft file-descriptor limit to the hard one (each connection is a
/// descriptor) and says how many connections that allows; returns that.
fn raise_fd_limit(max_connections: usize) -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            let capacity = limit.saturating_sub(RESERVED_FDS);
            info!(
                fd_limit = limit,
                connection_capacity = capacity,
                "file descriptor limit"
            );
            if (max_connections as u64) > capacity {
                warn!(
                    max_connections,
                    capacity,
                    "--max-connections is above what the file descriptor limit allows; raise the hard limit (ulimit -Hn, LimitNOFILE=, docker --ulimit nofile=) or lower --max-connections"
                );
            }
            Some(capacity)
        }
        Err(e) => {
            warn!(error = %e, "cannot read or raise the file descriptor limit");
            None
        }
    }
}

/// Lock file in `--data-dir`: one server per embedded store, since two would
/// overwrite each other's rooms.
const DATA_LOCK_FILE: &str = "session-server.lock";

/// Start-up refused: another server holds the data folder's lock.
#[derive(Debug, thiserror::Error)]
#[error(
    "data directory {0} is in use by another session-server (lock {1} is held); refusing to start"
)]
pub struct DataDirInUse(String, String);

/// Fails start-up with a clear message if the embedded store's folder is locked
/// by another server. Returns the folder's lock, held by the caller for the
/// server's life. (The store itself is checked by the first worker, whose answer
/// to its settings says whether it could open it: see `pool::WorkerPool::start`.
/// The backend is checked by use: it may legitimately be down at start.)
fn lock_data_dir(settings: &PersistSettings) -> anyhow::Result<Option<std::fs::File>> {
    let StoreConfig::Embedded { .. } = &settings.store else {
        return Ok(None);
    };
    let dir = &settings.data_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating data folder {}", dir.display()))?;
    let lock_path = dir.join(DATA_LOCK_FILE);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening lock file {}", lock_path.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(
                DataDirInUse(dir.display().to_string(), lock_path.display().to_string()).into(),
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", lock_path.display()));
        }
    }
    Ok(Some(lock))
}
