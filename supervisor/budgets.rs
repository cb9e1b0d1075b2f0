//! Connection budgets of the main port (issue 23): who may hold one of the
//! `--max-connections` places.
//!
//! - **Before authentication** a connection (a TCP socket in its TLS or HTTP
//!   phase, or a plain HTTP client such as a probe) holds a place in the
//!   *pre-auth share*: [`PRE_AUTH_SHARE_PERCENT`] of `--max-connections`, and
//!   at most [`PER_ADDRESS`] from one source address (an IPv6 /64). Such a
//!   connection costs nothing to open, so it never locks anyone out: when
//!   its address or the share is full, a new connection closes the *oldest*
//!   one there that has sent nothing yet, instead of being refused (a real
//!   client's pre-auth phase lasts milliseconds; an attacker's idle sockets are
//!   the old, silent ones). A silent socket so closed [lingers](LINGER) a while
//!   first, so that a flood that reconnects at once waits. Once the share
//!   is [nearly full](NEARLY_FULL_PERCENT), sockets that have sent no request
//!   for [`PRESSURED_IDLE_TIMEOUT`] are closed too (as nginx and HAProxy
//!   shorten their timeouts under slowloris); otherwise a socket has
//!   `--handshake-timeout-ms` for its first request.
//! - **Authenticated sessions** (a WebSocket whose token verified) keep the
//!   rest: they move to a session place at the upgrade and are never closed
//!   to make room. When those are all taken, an upgrade is answered 503.
//!
//!
//! Before any of this the kernel holds a socket that sends nothing
//! (`TCP_DEFER_ACCEPT`, set by the accept loop), and the main port answers one
//! request per connection unless it upgrades (`http`). The probes have places
//! of their own on `--internal-port` ([`ConnectionBudgets::internal_port`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The share of `--max-connections` that connections not yet authenticated
/// may hold (at least one place).
pub const PRE_AUTH_SHARE_PERCENT: usize = 25;
/// Connections not yet authenticated from one source address (an IPv4
/// address, an IPv6 /64): enough for a NAT full of real users, whose pre-auth
/// phase is a round trip or two.
pub const PER_ADDRESS: usize = 256;
/// From this fill of the pre-auth share, idle sockets get
/// [`PRESSURED_IDLE_TIMEOUT`] instead of `--handshake-timeout-ms`.
pub const NEARLY_FULL_PERCENT: usize = 75;
/// How long a socket may go without a complete request while the pre-auth
/// share is nearly full: a TLS handshake and an upgrade request over a slow
/// mobile link take well under this.
pub const PRESSURED_IDLE_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle sockets checked against [`PRESSURED_IDLE_TIMEOUT`] per new connection
/// (the oldest ones): bounded work in the accept loop.
const PRESSURE_SCAN: usize = 4;
/// Connections peeked at, oldest first, to find one whose client has sent
/// nothing ([`PreAuth::victim`]).
const SILENCE_SCAN: usize = 16;

/// Whether the client has sent bytes not read yet (or closed): a
/// non-blocking one-byte peek.
pub(crate) fn has_sent_anything(socket: RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: a one-byte buffer that outlives the call. MSG_PEEK leaves the
    // byte for its reader, MSG_DONTWAIT never blocks; on a descriptor that is
    // no longer a socket the call just fails.
    let got = unsafe {
        libc::recv(
            socket,
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    got > 0
}

/// How long a socket closed to make room stays open (see
/// [`ConnectionBudgets::linger`]).
pub const LINGER: Duration = Duration::from_secs(5);

/// Why a connection not yet authenticated was closed by the server:
/// `pre_auth_closed_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreAuthClosed {
    /// Its address had [`PER_ADDRESS`] connections and a newer one came.
    AddressFull,
    /// The pre-auth share was full and a newer connection came.
    ShareFull,
    /// No request within [`PRESSURED_IDLE_TIMEOUT`], the share nearly full.
    IdleUnderPressure,
    /// No request within `--handshake-timeout-ms`.
    Timeout,
}

impl PreAuthClosed {
    /// The metric's label value.
    pub fn label(self) -> &'static str {
        match self {
            PreAuthClosed::AddressFull => "address_full",
            PreAuthClosed::ShareFull => "share_full",
            PreAuthClosed::IdleUnderPressure => "idle_under_pressure",
            PreAuthClosed::Timeout => "timeout",
        }
    }
}

/// The main port's budgets: the pre-auth share (with its per-address cap)
/// and the sessions' places.
pub struct ConnectionBudgets {
    pre_auth: Mutex<PreAuth>,
    pre_auth_share: usize,
    per_address: usize,
    nearly_full: usize,
    handshake_timeout: Duration,
    sessions: Arc<Semaphore>,
    /// Places for closed connections held open a while
    /// ([`ConnectionBudgets::linger`]).
    lingering: Arc<Semaphore>,
}

/// The connections not yet authenticated, oldest first and by address.
#[derive(Default)]
struct PreAuth {
    next_id: u64,
    oldest_first: BTreeMap<u64, Entry>,
    by_address: HashMap<AddressKey, BTreeSet<u64>>,
}

struct Entry {
    address: AddressKey,
    /// The connection's descriptor, only ever peeked at. It may be closed
    /// (and its number reused) just before the entry goes: a peek then reads
    /// another socket, which only changes whom is closed first.
    socket: RawFd,
    admitted: Instant,
    /// What the connection's task and the budgets both see of it.
    state: Arc<PlaceState>,
}

/// A connection's state, shared by its task and its entry.
#[derive(Default)]
struct PlaceState {
    /// Cancelled to close the connection.
    close: CancellationToken,
    /// Set once the client has sent something (its task saw it readable).
    spoken: AtomicBool,
    /// Set once the connection sent a complete request.
    requested: AtomicBool,
    /// Why it was closed, once it was (set before `close` is cancelled).
    closed_for: OnceLock<PreAuthClosed>,
}

/// A source address as the per-address cap counts it: IPv4, or an IPv6 /64
/// (one subscriber's prefix).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum AddressKey {
    V4(u32),
    V6Prefix(u64),
}

impl AddressKey {
    fn of(address: IpAddr) -> AddressKey {
        match address {
            IpAddr::V4(v4) => AddressKey::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressKey::V4(v4.into()),
                None => AddressKey::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

impl ConnectionBudgets {
    /// The budgets of `max_connections` places, each connection given
    /// `handshake_timeout` for its first request.
    pub fn new(max_connections: usize, handshake_timeout: Duration) -> ConnectionBudgets {
        let pre_auth_share = (max_connections * PRE_AUTH_SHARE_PERCENT / 100).max(1);
        let session_places = max_connections.saturating_sub(pre_auth_share).max(1);
        ConnectionBudgets::with(
            pre_auth_share,
            PER_ADDRESS.min(pre_auth_share),
            session_places,
            handshake_timeout,
        )
    }

    /// The internal port's: `places` for anyone (probes, scrapers, an
    /// operator), no per-address cap (a node's probes and a scraper may share
    /// one address), no sessions. The oldest closes to make room, so 64
    /// sockets held there never keep a probe from its answer.
    pub fn internal_port(places: usize, handshake_timeout: Duration) -> ConnectionBudgets {
        ConnectionBudgets::with(places, places, 0, handshake_timeout)
    }

    fn with(
        pre_auth_share: usize,
        per_address: usize,
        session_places: usize,
        handshake_timeout: Duration,
    ) -> ConnectionBudgets {
        ConnectionBudgets {
            pre_auth: Mutex::default(),
            pre_auth_share,
            per_address,
            nearly_full: (pre_auth_share * NEARLY_FULL_PERCENT).div_ceil(100),
            handshake_timeout,
            sessions: Arc::new(Semaphore::new(session_places)),
            lingering: Arc::new(Semaphore::new(0)),
        }
    }

    /// Lets up to `places` sockets closed to make room, that never sent a
    /// byte, stay open for [`LINGER`] before they really close (file
    /// descriptors spare beyond `--max-connections`).
    pub fn with_lingering(mut self, places: usize) -> ConnectionBudgets {
        self.lingering = Arc::new(Semaphore::new(places));
        self
    }

    /// A place to hold a socket closed to make room for [`LINGER`] before
    /// closing it, if one is free. A client that reconnects the moment it is
    /// closed (a flood of idle sockets) then waits: its sockets stop cycling
    /// through the kernel's queues, where real clients' connections wait
    /// behind them. It holds a descriptor, not a place.
    pub fn linger(&self) -> Option<OwnedSemaphorePermit> {
        self.lingering.clone().try_acquire_owned().ok()
    }

    /// Places for connections not yet authenticated.
    pub fn pre_auth_share(&self) -> usize {
        self.pre_auth_share
    }

    /// Places for sessions free now (all of them while none is held).
    #[cfg(test)]
    pub fn session_places(&self) -> usize {
        self.sessions.available_permits()
    }

    /// Connections not yet authenticated, now.
    pub fn pre_auth_connections(&self) -> usize {
        self.lock().oldest_first.len()
    }

    /// A place for a session, if one is free.
    pub fn session_place(&self) -> Option<OwnedSemaphorePermit> {
        self.sessions.clone().try_acquire_owned().ok()
    }

    /// Admits a new connection from `peer` to the pre-auth share, closing
    /// the oldest one of its address, or of the share, when that is full
    /// (and idle ones past [`PRESSURED_IDLE_TIMEOUT`] when the share is
    /// nearly full). Returns the new connection's place and why each
    /// connection closed to make room was closed.
    /// `socket` is the connection's descriptor: whether its client has sent
    /// anything is read from it (a peek) when choosing whom to close.
    pub fn admit(
        self: &Arc<Self>,
        peer: SocketAddr,
        socket: RawFd,
    ) -> (PreAuthPlace, Vec<PreAuthClosed>) {
        let address = AddressKey::of(peer.ip());
        let now = Instant::now();
        let mut closed = Vec::new();
        let mut state = self.lock();
        let of_address = state.by_address.get(&address).map_or(0, BTreeSet::len);
        if of_address >= self.per_address {
            let victim = state.victim(state.by_address[&address].iter().copied());
            if let Some(id) = victim {
                closed.extend(state.close(id, PreAuthClosed::AddressFull));
            }
        } else if state.oldest_first.len() >= self.pre_auth_share {
            let victim = state.victim(state.oldest_first.keys().copied());
            if let Some(id) = victim {
                closed.extend(state.close(id, PreAuthClosed::ShareFull));
            }
        }
        if state.oldest_first.len() >= self.nearly_full {
            // The oldest that have not sent a request (kept-alive clients
            // that have are skipped, within a bound), those past the
            // shortened timeout.
            let idle: Vec<u64> = state
                .oldest_first
                .iter()
                .take(SILENCE_SCAN)
                .filter(|(_, e)| !e.state.requested.load(Ordering::Relaxed))
                .take(PRESSURE_SCAN)
                .filter(|(_, e)| now.duration_since(e.admitted) >= PRESSURED_IDLE_TIMEOUT)
                .map(|(id, _)| *id)
                .collect();
            for id in idle {
                closed.extend(state.close(id, PreAuthClosed::IdleUnderPressure));
            }
        }
        let id = state.next_id;
        state.next_id += 1;
        let place_state = Arc::new(PlaceState::default());
        state.oldest_first.insert(
            id,
            Entry {
                address,
                socket,
                admitted: now,
                state: place_state.clone(),
            },
        );
        state.by_address.entry(address).or_default().insert(id);
        drop(state);
        let place = PreAuthPlace {
            budgets: self.clone(),
            id,
            state: place_state,
            first_request_by: now + self.handshake_timeout,
        };
        (place, closed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PreAuth> {
        // Nothing panics while holding it; a poisoned lock's data is whole.
        self.pre_auth.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PreAuth {
    /// Whom to close to make room among `oldest_first` (ids, oldest first):
    /// the oldest whose client has sent nothing yet, among the first
    /// [`SILENCE_SCAN`]. A real client's
    /// request is then safe from the moment it reaches the server (a peek
    /// sees it before its task has read it; once read, `spoken` says so,
    /// also of a client that sent half a request and waits); an idle
    /// attacker's sockets go first.
    ///
    /// Failing a silent one, the oldest whose request is not being answered
    /// (an upgrade between its token check and its session must not be cut);
    /// the oldest only if every one scanned is.
    fn victim(&self, oldest_first: impl Iterator<Item = u64>) -> Option<u64> {
        let scanned: Vec<(u64, &Entry)> = oldest_first
            .take(SILENCE_SCAN)
            .filter_map(|id| self.oldest_first.get(&id).map(|e| (id, e)))
            .collect();
        let silent =
            |e: &Entry| !e.state.spoken.load(Ordering::Relaxed) && !has_sent_anything(e.socket);
        let not_requested = |e: &Entry| !e.state.requested.load(Ordering::Relaxed);
        scanned
            .iter()
            .find(|(_, e)| silent(e))
            .or_else(|| scanned.iter().find(|(_, e)| not_requested(e)))
            .or(scanned.first())
            .map(|(id, _)| *id)
    }

    /// Takes connection `id` out of the share; with `reason`, also closes
    /// it. Returns the reason if the connection was still there.
    fn close(&mut self, id: u64, reason: PreAuthClosed) -> Option<PreAuthClosed> {
        let entry = self.remove(id)?;
        let _ = entry.state.closed_for.set(reason);
        entry.state.close.cancel();
        Some(reason)
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.oldest_first.remove(&id)?;
        if let Some(ids) = self.by_address.get_mut(&entry.address) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_address.remove(&entry.address);
            }
        }
        Some(entry)
    }
}

/// One connection's place in the pre-auth share, held until it closes or
/// becomes a session ([`PreAuthPlace::authenticated`]).
pub struct PreAuthPlace {
    budgets: Arc<ConnectionBudgets>,
    id: u64,
    state: Arc<PlaceState>,
    first_request_by: Instant,
}

impl PreAuthPlace {
    /// The client has sent something: it is not the one to close first.
    pub fn spoke(&self) {
        self.state.spoken.store(true, Ordering::Relaxed);
    }

    /// The connection sent a complete request: it is no longer idle.
    pub fn requested(&self) {
        self.state.spoken.store(true, Ordering::Relaxed);
        self.state.requested.store(true, Ordering::Relaxed);
    }

    /// The connection is now a session (it holds a session place): it
    /// leaves the pre-auth share and is never closed to make room.
    pub fn authenticated(&self) {
        self.budgets.lock().remove(self.id);
    }

    /// Resolves when the server closes this connection to make room, or when
    /// it sent no request within `--handshake-timeout-ms`; says why. Never,
    /// once [authenticated](PreAuthPlace::authenticated).
    pub async fn closed(&self) -> PreAuthClosed {
        tokio::select! {
            () = self.state.close.cancelled() => {}
            () = tokio::time::sleep_until(self.first_request_by) => {
                if !self.state.requested.load(Ordering::Relaxed) {
                    let timed_out = self.budgets.lock().close(self.id, PreAuthClosed::Timeout);
                    if let Some(reason) = timed_out {
                        return reason;
                    }
                }
                self.state.close.cancelled().await;
            }
        }
        self.state
            .closed_for
            .get()
            .copied()
            .unwrap_or(PreAuthClosed::ShareFull)
    }
}

impl Drop for PreAuthPlace {
    fn drop(&mut self) {
        self.budgets.lock().remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(address: &str) -> SocketAddr {
        SocketAddr::new(address.parse().unwrap(), 40_000)
    }

    /// No socket: a peek fails, as on a socket with nothing to read.
    const SILENT: RawFd = -1;

    #[tokio::test]
    async fn a_client_that_has_sent_its_request_is_not_the_one_closed() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let budgets = Arc::new(ConnectionBudgets::new(4_000, Duration::from_secs(10)));
        let (mut client, server_side) = std::os::unix::net::UnixStream::pair().unwrap();
        let (spoken, _) = budgets.admit(peer("10.0.0.1"), server_side.as_raw_fd());
        client.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        let mut idle = Vec::new();
        for _ in 1..PER_ADDRESS {
            idle.push(budgets.admit(peer("10.0.0.1"), SILENT).0);
        }
        let (_newest, closed) = budgets.admit(peer("10.0.0.1"), SILENT);
        assert_eq!(closed, [PreAuthClosed::AddressFull]);
        assert_eq!(idle[0].closed().await, PreAuthClosed::AddressFull);
        assert!(!spoken.state.close.is_cancelled());
    }

    #[test]
    fn a_quarter_is_pre_auth_and_sessions_keep_the_rest() {
        let budgets = ConnectionBudgets::new(15_000, Duration::from_secs(10));
        assert_eq!(budgets.pre_auth_share(), 3_750);
        assert_eq!(budgets.session_places(), 11_250);
        let tiny = ConnectionBudgets::new(1, Duration::from_secs(10));
        assert_eq!((tiny.pre_auth_share(), tiny.session_places()), (1, 1));
    }

    #[tokio::test]
    async fn a_full_address_closes_its_own_oldest_not_anothers() {
        let budgets = Arc::new(ConnectionBudgets::new(4_000, Duration::from_secs(10)));
        let (other, _) = budgets.admit(peer("10.0.0.9"), SILENT);
        let mut held = Vec::new();
        for _ in 0..PER_ADDRESS {
            let (place, closed) = budgets.admit(peer("10.0.0.1"), SILENT);
            assert_eq!(closed, []);
            held.push(place);
        }
        let (_newest, closed) = budgets.admit(peer("10.0.0.1"), SILENT);
        assert_eq!(closed, [PreAuthClosed::AddressFull]);
        assert_eq!(held[0].closed().await, PreAuthClosed::AddressFull);
        assert!(!other.state.close.is_cancelled() && !held[1].state.close.is_cancelled());
        assert_eq!(budgets.pre_auth_connections(), PER_ADDRESS + 1);
    }

    #[tokio::test]
    async fn ipv6_addresses_count_by_their_64_prefix() {
        let budgets = Arc::new(ConnectionBudgets::new(4_000, Duration::from_secs(10)));
        let mut held = Vec::new();
        for i in 0..PER_ADDRESS {
            held.push(
                budgets
                    .admit(peer(&format!("2001:db8:1:2::{i:x}")), SILENT)
                    .0,
            );
        }
        let (_, closed) = budgets.admit(peer("2001:db8:1:2:ffff::1"), SILENT);
        assert_eq!(closed, [PreAuthClosed::AddressFull]);
        let (_, closed) = budgets.admit(peer("2001:db8:1:3::1"), SILENT);
        assert_eq!(closed, []);
    }

    #[tokio::test]
    async fn a_full_share_closes_the_oldest_and_an_authenticated_one_stays() {
        // 40 places: 10 pre-auth, 30 sessions.
        let budgets = Arc::new(ConnectionBudgets::new(40, Duration::from_secs(10)));
        let (session, _) = budgets.admit(peer("10.0.0.1"), SILENT);
        session.requested();
        session.authenticated();
        let mut held: Vec<PreAuthPlace> = (0..10)
            .map(|i| budgets.admit(peer(&format!("10.0.1.{i}")), SILENT).0)
            .collect();
        let (_newest, closed) = budgets.admit(peer("10.0.2.1"), SILENT);
        assert_eq!(closed, [PreAuthClosed::ShareFull]);
        assert_eq!(held.remove(0).closed().await, PreAuthClosed::ShareFull);
        assert!(!session.state.close.is_cancelled());
        assert_eq!(budgets.pre_auth_connections(), 10);
        drop(held);
        assert_eq!(budgets.pre_auth_connections(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_sockets_get_a_shorter_timeout_when_the_share_is_nearly_full() {
        // 400 places: 100 pre-auth, nearly full from 75. The oldest are 4
        // kept-alive clients that sent requests (a scraper): skipped, so the
        // idle ones behind them still get the shorter timeout.
        let budgets = Arc::new(ConnectionBudgets::new(400, Duration::from_secs(10)));
        let busy: Vec<PreAuthPlace> = (0..4)
            .map(|i| budgets.admit(peer(&format!("10.0.0.{i}")), SILENT).0)
            .collect();
        for place in &busy {
            place.requested();
        }
        let idle: Vec<PreAuthPlace> = (0..71)
            .map(|i| budgets.admit(peer(&format!("10.0.1.{i}")), SILENT).0)
            .collect();
        tokio::time::advance(PRESSURED_IDLE_TIMEOUT).await;
        let (_, closed) = budgets.admit(peer("10.0.2.1"), SILENT);
        assert_eq!(closed, [PreAuthClosed::IdleUnderPressure; PRESSURE_SCAN]);
        assert_eq!(idle[0].closed().await, PreAuthClosed::IdleUnderPressure);
        assert!(busy.iter().all(|p| !p.state.close.is_cancelled()));
        assert!(!idle[PRESSURE_SCAN].state.close.is_cancelled());
    }

    #[tokio::test]
    async fn a_client_that_sent_half_a_request_is_not_taken_for_silent() {
        let budgets = Arc::new(ConnectionBudgets::new(4_000, Duration::from_secs(10)));
        let (waiting, _) = budgets.admit(peer("10.0.0.1"), SILENT);
        // Its task read the first bytes (the peek sees nothing now).
        waiting.spoke();
        let idle: Vec<PreAuthPlace> = (1..PER_ADDRESS)
            .map(|_| budgets.admit(peer("10.0.0.1"), SILENT).0)
            .collect();
        let (_newest, closed) = budgets.admit(peer("10.0.0.1"), SILENT);
        assert_eq!(closed, [PreAuthClosed::AddressFull]);
        assert!(idle[0].state.close.is_cancelled());
        assert!(!waiting.state.close.is_cancelled());
    }

    #[test]
    fn lingering_sockets_are_bounded_by_the_spare_descriptors() {
        let budgets = ConnectionBudgets::new(40, Duration::from_secs(10)).with_lingering(2);
        let first = budgets.linger();
        let second = budgets.linger();
        assert!(first.is_some() && second.is_some());
        assert!(budgets.linger().is_none());
        drop(first);
        assert!(budgets.linger().is_some());
        let none = ConnectionBudgets::new(40, Duration::from_secs(10));
        assert!(none.linger().is_none());
    }

    #[tokio::test]
    async fn a_request_being_answered_is_not_the_one_closed() {
        let budgets = Arc::new(ConnectionBudgets::new(4_000, Duration::from_secs(10)));
        // The oldest is upgrading (its request is being answered); the rest
        // have sent a byte each and wait.
        let (upgrading, _) = budgets.admit(peer("10.0.0.1"), SILENT);
        upgrading.requested();
        let waiting: Vec<PreAuthPlace> = (1..PER_ADDRESS)
            .map(|_| budgets.admit(peer("10.0.0.1"), SILENT).0)
            .collect();
        for place in &waiting {
            place.spoke();
        }
        let (_newest, closed) = budgets.admit(peer("10.0.0.1"), SILENT);
        assert_eq!(closed, [PreAuthClosed::AddressFull]);
        assert!(!upgrading.state.close.is_cancelled());
        assert!(waiting[0].state.close.is_cancelled());
    }

    #[tokio::test]
    async fn the_internal_port_closes_its_oldest_for_a_new_probe() {
        let budgets = Arc::new(ConnectionBudgets::internal_port(
            64,
            Duration::from_secs(10),
        ));
        let held: Vec<PreAuthPlace> = (0..64)
            .map(|_| budgets.admit(peer("10.0.0.1"), SILENT).0)
            .collect();
        let (_probe, closed) = budgets.admit(peer("10.0.0.1"), SILENT);
        assert_eq!(closed, [PreAuthClosed::AddressFull]);
        assert!(held[0].state.close.is_cancelled());
        assert!(budgets.session_place().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_socket_without_a_request_times_out_and_one_with_a_request_does_not() {
        let budgets = Arc::new(ConnectionBudgets::new(15_000, Duration::from_secs(10)));
        let (silent, _) = budgets.admit(peer("10.0.0.1"), SILENT);
        let (talking, _) = budgets.admit(peer("10.0.0.2"), SILENT);
        talking.requested();
        assert_eq!(silent.closed().await, PreAuthClosed::Timeout);
        let still_open = tokio::time::timeout(Duration::from_secs(60), talking.closed()).await;
        assert!(still_open.is_err());
        assert_eq!(budgets.pre_auth_connections(), 1);
    }
}
