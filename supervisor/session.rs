//! One client's WebSocket session, after the upgrade: join the room, forward the
//! client's frames to the room's worker, send the room's newest snapshot whenever
//! it changes, ping when idle, and leave when either side ends.
//!
//! Reading and writing run in one task under one `select!`, so their fates are
//! tied: whichever ends, the session ends.
//!
//! A client over its message budget is slowed down, not dropped (see
//! `ratelimit`); a user whose earlier connection vanished without a close takes
//! its place once it fails to answer a ping (`take_over`).

use std::borrow::Cow;
use std::num::{NonZeroU32, NonZeroU64};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio::time::Sleep;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{Instrument, debug, info, info_span};

use super::Shared;
use super::auth::Identity;
use super::close::CloseReason;
use super::inflate::InflateFailure;
use super::metrics::Metrics;
use super::ratelimit::{Backlog, Budget, Held, Released, SendBudget};
use super::rooms::{
    ConnStateReceiver, Holder, Membership, Published, RoomHandle, SnapshotCell, Woken,
};
use super::shutdown::{Phase, Shutdown};
use super::websocket::{ClientReader, ClientWriter, Negotiated, Protocol};
use contract::deflate::{
    InflateError, MIN_COMPRESSED_OPS_BYTES, SYNC_TRAILER, deflate_message, stored_segment,
};
use contract::ipc::{ConnId, Escaped};

/// A send that cannot complete in this time means the client is not reading at
/// all; it is dropped. (A slow client only ever gets the newest snapshot, so it
/// never builds a backlog.)
const WRITE_TIMEOUT: Duration = Duration::from_secs(20);
/// A v2 connection gets at most one snapshot for a `resync` this often; a
/// later request waits for the end of the period (it is never dropped).
const RESYNC_EVERY: Duration = Duration::from_secs(1);
/// A v2 `ops` message is compressed for its member only up to this size: it
/// is each member's own (a busy room's cursor batches are ~1 KB); a big one
/// (a paste's shapes) would cost the supervisor a compression per member.
const MAX_COMPRESSED_OPS_BYTES: usize = 16 * 1024;
/// How long to wait for the client's answer to our close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// When a user's earlier connection proves alive, how long a new connection of
/// the user waits for it to leave anyway (a page reload races its old socket's
/// close), checking every `LEAVING_POLL`.
const LEAVING_GRACE: Duration = Duration::from_millis(500);
const LEAVING_POLL: Duration = Duration::from_millis(20);
/// Why the session ended, and what close frame (if any) the client gets.
enum End {
    /// The client closed or vanished; nothing more to send.
    ClientGone,
    /// Close the connection for this reason.
    Close(CloseReason),
}

impl From<CloseReason> for End {
    fn from(reason: CloseReason) -> End {
        End::Close(reason)
    }
}

/// What a session reads of the server: its settings, its metrics, its
/// shutdown phase.
#[derive(Clone, Copy)]
pub(crate) struct SessionContext<'a> {
    pub(crate) config: &'a contract::config::Config,
    pub(crate) metrics: &'a Metrics,
    pub(crate) shutdown: &'a Shutdown,
}

impl<'a> SessionContext<'a> {
    fn of(shared: &'a Shared) -> SessionContext<'a> {
        SessionContext {
            config: &shared.config,
            metrics: &shared.metrics,
            shutdown: &shared.shutdown,
        }
    }
}

/// A session as `negotiated` at the upgrade (see [`Protocol::negotiate`] and
/// [`deflate_offered`](super::websocket::deflate_offered)).
///
/// Not an `async fn`: that would keep a second copy of the arguments in the
/// future, which every connection pays for its whole life.
pub(crate) fn run(
    shared: Arc<Shared>,
    (mut stream, mut sink): (ClientReader, ClientWriter),
    room: RoomHandle,
    conn: ConnId,
    identity: Identity,
    mut conn_state: ConnStateReceiver,
    negotiated: Negotiated,
) -> impl Future<Output = ()> {
    let span = info_span!("session", room = %room.id(), user = %Escaped(&identity.user_id), %conn, worker = %room.worker());
    async move {
        // What is live across this block's awaits is kept by every
        // connection for its whole life: the context is made where it is
        // used, not held.
        let started_secs = clock_secs();
        shared.metrics.connections_accepted.inc();
        count_connection(&shared.metrics, negotiated, 1);
        debug!(?negotiated, "session opened");
        let replace = take_over(SessionContext::of(&shared), &room, conn).await;
        // A v2 join has the worker record ops (batches are kept from the
        // room's next publish). Compressed snapshots are asked for v1 only:
        // v2 takes ops, compressed here, and a snapshot only now and then;
        // its room's every version compressed for that would be spent for
        // nothing. (A v2 member gets the compressed snapshot when a v1 member
        // of its room asked for one.)
        let v2 = negotiated.protocol == Protocol::V2;
        room.join(conn, replace, v2, negotiated.deflate && !v2);
        // Held here and served by reference: a session moved into `serve`
        // would be kept twice in the future (its argument and its local).
        let end = {
            let mut session = Session::new(
                SessionContext::of(&shared),
                &room,
                conn,
                &mut sink,
                negotiated,
            );
            session.serve(&mut stream, &mut conn_state).await
        };
        if let End::Close(reason) = end {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                if sink.close(reason.code(), reason.text()).await.is_ok() {
                    // Let the client answer so it sees a clean close handshake.
                    while let Some(Ok(_)) = stream.next().await {}
                }
            })
            .await;
        }
        room.leave(conn);
        count_connection(&shared.metrics, negotiated, -1);
        let how = match end {
            End::ClientGone => "client gone".to_owned(),
            End::Close(reason) => {
                if let Some(rejection) = reason.rejection() {
                    shared.metrics.reject(rejection);
                }
                format!("closed {} {}", reason.code(), reason.text())
            }
        };
        debug!(
            seconds = clock_secs().saturating_sub(started_secs),
            "session ended: {how}"
        );
    }
    .instrument(span)
}

/// A session opens (`by` 1) or ends (-1): the connection gauges.
fn count_connection(metrics: &Metrics, negotiated: Negotiated, by: i64) {
    metrics.connections.inc_by(by);
    if negotiated.protocol == Protocol::V2 {
        metrics.connections_v2.inc_by(by);
    }
    if negotiated.deflate {
        metrics.connections_compressed.inc_by(by);
    }
}

/// Seconds since the first session began: 4 bytes in a session's future,
/// where an `Instant` takes 16.
fn clock_secs() -> u32 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let secs = EPOCH.get_or_init(Instant::now).elapsed().as_secs();
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// A user reconnecting after a dropped network (Wi-Fi change, laptop lid, a
/// proxy that lost the connection) finds their earlier connection still in the
/// room: nothing told the server it is gone. It is pinged at once; if it stays
/// silent for `--takeover-wait-ms`, this connection takes its place (returned).
/// If it answers, this one joins as usual and the worker refuses it as a
/// duplicate; if it leaves meanwhile, this one simply joins.
async fn take_over(context: SessionContext<'_>, room: &RoomHandle, conn: ConnId) -> Option<ConnId> {
    let Holder::Probed {
        conn: old,
        mut answer,
    } = room.probe_holder(conn).await
    else {
        return None;
    };
    let alive = async { answer.wait_for(|alive| *alive).await.is_ok() };
    match tokio::time::timeout(context.config.takeover_wait, alive).await {
        Ok(true) => {
            // Alive, or heard from just now: perhaps a reloading page whose close
            // is on its way. Give it a moment to leave before the worker decides.
            let until = Instant::now() + LEAVING_GRACE;
            while Instant::now() < until && room.is_joined(old).await {
                tokio::time::sleep(LEAVING_POLL).await;
            }
            info!(%old, "the user's earlier connection is alive");
            None
        }
        Ok(false) => None,
        Err(_) => {
            info!(%old, "the user's earlier connection did not answer a ping; replacing it");
            context.metrics.connections_replaced.inc();
            Some(old)
        }
    }
}

/// One client's session once joined: what it holds between two wakes, and
/// one method per thing that wakes it (see [`serve`](Self::serve)).
struct Session<'a> {
    context: SessionContext<'a>,
    room: &'a RoomHandle,
    conn: ConnId,
    sink: &'a mut ClientWriter,
    /// What the client is sent, and when.
    outbox: Outbox,
    /// The room's snapshots, once the worker admitted the join; until then
    /// nothing is sent.
    snapshots: Option<watch::Receiver<SnapshotCell>>,
    /// The client's message budget, and the messages that found it empty.
    budget: Budget,
    backlog: Backlog,
    /// Wakes the session when the budget allows the oldest held message.
    /// Boxed and only there while messages are held: an idle connection pays
    /// 8 bytes for it, and a session within its budget never touches the
    /// timer wheel.
    budget_timer: Option<Pin<Box<Sleep>>>,
    /// A v2 `resync` that came within [`RESYNC_EVERY`] of the last one answered.
    resync_timer: Option<Pin<Box<Sleep>>>,
    /// When the client was last heard from.
    last_heard: Instant,
    /// Probes (a newer connection of this user asking whether this one is
    /// alive) seen, and whether one waits for the client to be heard from.
    probes_seen: u32,
    probe_waiting: bool,
    /// A ring from then on is a ping tick (see `on_ring_for_pings`).
    next_ping_tick: Instant,
}

impl<'a> Session<'a> {
    fn new(
        context: SessionContext<'a>,
        room: &'a RoomHandle,
        conn: ConnId,
        sink: &'a mut ClientWriter,
        negotiated: Negotiated,
    ) -> Session<'a> {
        let v2 = negotiated.protocol == Protocol::V2;
        let limits = &context.config.limits;
        Session {
            context,
            room,
            conn,
            sink,
            outbox: Outbox::new(v2, negotiated.deflate, context.config),
            snapshots: None,
            budget: Budget::new(
                limits.rate_per_sec,
                limits.rate_burst,
                limits.rate_close_after,
                Instant::now(),
            ),
            backlog: Backlog::default(),
            budget_timer: None,
            resync_timer: None,
            last_heard: Instant::now(),
            probes_seen: 0,
            probe_waiting: false,
            next_ping_tick: Instant::now() + context.config.ping_interval * 3 / 4,
        }
    }

    /// Serves the session until either side ends it. Reading and writing run
    /// under one `select!`, so their fates are tied.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments twice in its future (see `within`)"
    )]
    fn serve<'b>(
        &'b mut self,
        stream: &'b mut ClientReader,
        conn_state: &'b mut ConnStateReceiver,
    ) -> impl Future<Output = End> + 'b {
        async move {
            // Not read while rooms are saved for a shutdown.
            let mut reading = true;
            loop {
                // Every move of the phase rings the session's cell.
                match self.context.shutdown.phase() {
                    Phase::Running => {}
                    Phase::Draining => reading = false,
                    Phase::Closing | Phase::Stopped => return CloseReason::GoingAway.into(),
                }
                let step = tokio::select! {
                    // The supervisor told the session something, its room
                    // published, or the phase moved (looked at above).
                    woken = conn_state.woken() => match woken {
                        Ok(woken) => self.on_woken(woken, conn_state).await,
                        Err(_) => Err(room_gone(conn_state)),
                    },
                    // A resync held to one a second: answered now.
                    _ = async { self.resync_timer.as_mut().expect("guarded").await }, if self.resync_timer.is_some() => {
                        self.resync_timer = None;
                        let rx = self.snapshots.as_mut();
                        self.outbox.answer_resync(self.context.metrics, self.room, self.sink, rx).await
                    }
                    // The budget allows the oldest held message: it goes below.
                    _ = async { self.budget_timer.as_mut().expect("guarded").await }, if self.budget_timer.is_some() => {
                        self.budget_timer = None;
                        Ok(())
                    }
                    // The member's rate allows the newest state, held back since a change.
                    _ = async { self.outbox.timer.as_mut().expect("guarded").await }, if self.outbox.timer_armed => {
                        self.outbox.timer_armed = false;
                        let rx = self.snapshots.as_mut().expect("a timer only runs once admitted");
                        self.outbox.send_newest(self.context.metrics, self.room, self.sink, rx).await
                    }
                    // Not read while a frame waits for the budget: TCP then slows the
                    // client down, and nothing it sent is lost.
                    frame = stream.next(), if reading && self.backlog.may_read() => match self.on_frame(frame) {
                        Ok(reply) => self.reply(reply).await,
                        Err(end) => Err(end),
                    },
                };
                if let Err(end) = step {
                    return end;
                }
                // Muted while the rate holds states back: the room's publishes
                // do not wake it then. Once unmuted, one may have come unrung.
                let held = self.outbox.timer_armed;
                if held != conn_state.muted() {
                    conn_state.mute(held);
                    if !held && let Err(end) = self.send_what_the_room_published().await {
                        return end;
                    }
                }
                self.forward_what_the_budget_allows().await;
            }
        }
    }

    /// The session's cell woke it: its state changed, or it was rung (its
    /// room published, or the phase moved).
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments twice in its future (see `within`)"
    )]
    fn on_woken<'b>(
        &'b mut self,
        woken: Woken,
        conn_state: &'b mut ConnStateReceiver,
    ) -> impl Future<Output = Result<(), End>> + 'b {
        async move {
            if woken.state {
                self.on_conn_state(conn_state).await?;
            }
            if woken.rung {
                self.on_ring_for_pings().await?;
            }
            self.send_what_the_room_published().await
        }
    }

    /// Pings are timed by rings (every connection is rung once a ping
    /// interval, see `ring_sessions_for_pings`): the first ring three
    /// quarters of an interval or more after the last tick is the next tick
    /// (a room's publishes ring too, more often).
    async fn on_ring_for_pings(&mut self) -> Result<(), End> {
        let now = Instant::now();
        if now < self.next_ping_tick {
            return Ok(());
        }
        let ping_every = self.context.config.ping_interval;
        self.next_ping_tick = now + ping_every * 3 / 4;
        self.on_ping_tick(ping_every).await
    }

    /// Sends the room's newest state if the client has not had it, unless
    /// the member's rate holds it back (the timer's branch sends the newest
    /// then; the watch keeps it).
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments twice in its future (see `within`)"
    )]
    fn send_what_the_room_published(&mut self) -> impl Future<Output = Result<(), End>> + '_ {
        async move {
            let Some(rx) = self.snapshots.as_mut() else {
                return Ok(());
            };
            if self.outbox.timer_armed || !rx.has_changed().unwrap_or(false) || self.outbox.hold() {
                return Ok(());
            }
            self.outbox
                .send_newest(self.context.metrics, self.room, self.sink, rx)
                .await
        }
    }

    /// The supervisor told the session something: its membership, a refusal
    /// to tell a v2 client, a probe.
    async fn on_conn_state(&mut self, conn_state: &mut ConnStateReceiver) -> Result<(), End> {
        let (refusal, probed) = {
            let state = conn_state.borrow_and_update();
            match &state.membership {
                Membership::Pending => {}
                Membership::Admitted(rx) => {
                    if self.snapshots.is_none() {
                        self.snapshots = Some(rx.clone());
                    }
                }
                Membership::Closed(reason) => return Err((*reason).into()),
            }
            let mut refusal = None;
            if let (Some(v2), Some((kind, reason))) = (self.outbox.v2.as_mut(), state.last_refused)
            {
                refusal = (state.refused > v2.refused_told).then(|| {
                    contract::protocol::v2::error_message(
                        kind,
                        reason,
                        state.refused - v2.refused_told,
                    )
                });
                v2.refused_told = state.refused;
            }
            let probed = std::mem::replace(&mut self.probes_seen, state.probes) != state.probes;
            (refusal, probed)
        };
        // A v2 client is told of its messages a room limit refused.
        if let Some(error) = refusal {
            self.context.metrics.refusals_told.inc();
            written(self.sink.text(error.as_bytes())).await?;
        }
        if probed {
            if self.last_heard.elapsed() < self.context.config.takeover_wait {
                // Heard from just now: alive, no need to ask.
                self.room.alive(self.conn);
            } else {
                self.probe_waiting = true;
                written(self.sink.ping()).await?;
            }
        }
        Ok(())
    }

    /// A frame from the client, or its end: what to answer it, if anything.
    /// Not async: the frame (a large value) is gone before any write, which
    /// keeps it out of the session's future (every connection pays for it).
    fn on_frame(&mut self, frame: Option<Result<Message, WsError>>) -> Result<Reply, End> {
        let metrics = self.context.metrics;
        let now = Instant::now();
        self.last_heard = now;
        if self.probe_waiting && matches!(frame, Some(Ok(ref m)) if !m.is_close()) {
            self.probe_waiting = false;
            self.room.alive(self.conn);
        }
        let within_budget = self.backlog.is_empty() && self.budget.has_token(now);
        if !within_budget
            && matches!(frame, Some(Ok(ref m)) if m.is_text() || m.is_binary() || m.is_ping() || m.is_pong())
        {
            metrics.frames_rate_limited.inc();
        }
        match frame {
            Some(Ok(Message::Text(text)))
                if self.outbox.v2.is_some() && contract::protocol::v2::is_resync(text.as_str()) =>
            {
                // Answered here, not forwarded (the room does not change),
                // but it counts against the budget.
                metrics.resyncs.inc();
                self.backlog.spend();
                // One answer per room version: a resync flood in a quiet room
                // costs one snapshot, not one each.
                let answered = self
                    .snapshots
                    .as_ref()
                    .is_some_and(|rx| self.outbox.resync_answered(rx));
                let v2 = self.outbox.v2.as_mut().expect("guarded");
                let too_soon = v2
                    .resync_answered_at
                    .map(|at| at + RESYNC_EVERY)
                    .filter(|due| *due > now);
                // Answered by the resync timer's branch: at once, or once
                // the period is over (a later request within it joins this
                // one). (Not from here: the answer's write would sit in the
                // session's future, which every connection pays for.)
                let due = match (answered, too_soon) {
                    (false, Some(due)) => due,
                    _ => now,
                };
                if self.resync_timer.is_none() {
                    self.resync_timer = Some(Box::pin(tokio::time::sleep_until(due.into())));
                }
                Ok(Reply::None)
            }
            Some(Ok(Message::Text(text))) => {
                let text = String::from(text.as_str());
                if within_budget {
                    self.backlog.pass(text);
                    return Ok(Reply::None);
                }
                match self.backlog.hold(text) {
                    Held::Waiting => Ok(Reply::None),
                    held => {
                        if held == Held::Folded {
                            metrics.cursor_moves_folded.inc();
                        }
                        if self.budget.over(now) {
                            info!(
                                "client kept sending cursor moves far over its message budget; closing it"
                            );
                            return Err(CloseReason::RateLimit.into());
                        }
                        Ok(Reply::None)
                    }
                }
            }
            Some(Ok(Message::Binary(bytes))) => {
                metrics.binary_frames.inc();
                debug!(
                    len = bytes.len(),
                    "binary frame ignored (the protocol is text)"
                );
                // Ignored, but not free: it counts against the budget.
                self.backlog.spend();
                Ok(Reply::None)
            }
            Some(Ok(Message::Ping(payload))) => {
                self.backlog.spend();
                Ok(Reply::Pong(payload))
            }
            Some(Ok(Message::Pong(_))) => {
                self.backlog.spend();
                Ok(Reply::None)
            }
            Some(Ok(Message::Frame(_))) => Ok(Reply::None),
            // Echo the client's close code, as RFC 6455 §5.5.1 asks.
            Some(Ok(Message::Close(frame))) => {
                Ok(Reply::Close(frame.map_or(1000, |f| u16::from(f.code))))
            }
            None => Err(End::ClientGone),
            Some(Err(e)) => Err(read_failed(e)),
        }
    }

    /// Answers a client's frame (see [`on_frame`](Self::on_frame)).
    async fn reply(&mut self, reply: Reply) -> Result<(), End> {
        match reply {
            Reply::None => Ok(()),
            Reply::Pong(payload) => written(self.sink.pong(&payload)).await,
            Reply::Close(code) => {
                let _ = within(CLOSE_TIMEOUT, self.sink.close(code, "")).await;
                Err(End::ClientGone)
            }
        }
    }

    /// The ping interval: drops a client silent for two intervals, pings one
    /// silent for half of one.
    async fn on_ping_tick(&mut self, ping_every: Duration) -> Result<(), End> {
        let silent = self.last_heard.elapsed();
        if silent >= 2 * ping_every {
            info!(
                silent_ms = silent.as_millis() as u64,
                "client silent; dropping it"
            );
            return Err(End::ClientGone);
        }
        // Half an interval, not a whole one: the pong to the previous ping
        // arrives just after that tick, so at this tick the client has been
        // silent for a little less than an interval, and must be pinged again
        // to be heard before the next tick's check.
        if silent >= ping_every / 2 {
            written(self.sink.ping()).await?;
        }
        Ok(())
    }

    /// The one place client messages go to the room's worker: what the budget
    /// allows, oldest first; the timer is set for the rest.
    async fn forward_what_the_budget_allows(&mut self) {
        while !self.backlog.is_empty() && self.budget.try_take(Instant::now()) {
            if let Some(Released::Message(text)) = self.backlog.pop() {
                // Fails only if the server is gone: its stop closes the session.
                let _ = self.room.forward(self.conn, text.into()).await;
            }
        }
        if !self.backlog.is_empty() && self.budget_timer.is_none() {
            let at = self.budget.next_token_at().into();
            self.budget_timer = Some(Box::pin(tokio::time::sleep_until(at)));
        }
    }
}

/// What a client's frame asks the session to write.
enum Reply {
    None,
    /// The pong to its ping.
    Pong(Bytes),
    /// The echo of its close (then the session ends).
    Close(u16),
}

/// A write to the client that must complete within [`WRITE_TIMEOUT`]: else
/// the client is not reading at all, and is dropped.
fn written<E>(write: impl Future<Output = Result<(), E>>) -> impl Future<Output = Result<(), End>> {
    within(WRITE_TIMEOUT, write).map(|written| match written {
        Some(Ok(())) => Ok(()),
        _ => Err(End::ClientGone),
    })
}

/// `future`'s output if it comes within `limit` (`None` if not), as
/// `tokio::time::timeout` gives it, with two differences that matter to a
/// session's future (which every connection keeps for its life, sized for its
/// largest write): the timer is made only once the future waits (a write to a
/// client usually completes at its first poll), and boxed, so it takes 8
/// bytes of the future rather than a timer's few hundred. Not an `async fn`:
/// that would keep `future` twice (its argument and its local).
fn within<F: Future>(limit: Duration, future: F) -> Within<F> {
    Within {
        future,
        limit,
        timer: None,
    }
}

pin_project_lite::pin_project! {
    /// See [`within`].
    struct Within<F> {
        #[pin]
        future: F,
        limit: Duration,
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl<F: Future> Future for Within<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Some(output));
        }
        let limit = *this.limit;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        timer.as_mut().poll(cx).map(|()| None)
    }
}

/// How a failed read ends the session.
fn read_failed(e: WsError) -> End {
    match e {
        WsError::Capacity(e) => {
            info!(error = %e, "client frame over the size limit");
            CloseReason::TooBig.into()
        }
        // The client broke RFC 6455: told so with its close code (§7.4.1)
        // rather than a dropped connection.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::ClientGone,
        WsError::Protocol(e) => {
            info!(error = %e, "client broke the WebSocket protocol");
            CloseReason::ProtocolError.into()
        }
        WsError::Utf8(e) => {
            info!(error = %e, "client sent a text frame that is not UTF-8");
            CloseReason::InvalidUtf8.into()
        }
        // permessage-deflate (`inflate`): a message inflating past the limit
        // is too big however small it came.
        WsError::Io(e) if inflate_failure(&e).is_some() => {
            let why = inflate_failure(&e).expect("guarded");
            info!(error = %why, "client sent a compressed message that cannot be taken");
            match why {
                InflateFailure::Inflate(InflateError::TooBig) => CloseReason::TooBig.into(),
                InflateFailure::Inflate(InflateError::Corrupt) => {
                    CloseReason::InvalidCompressed.into()
                }
                InflateFailure::Protocol => CloseReason::ProtocolError.into(),
            }
        }
        e => {
            debug!(error = %e, "read failed");
            End::ClientGone
        }
    }
}

/// The room went (its slot's task dropped it): with the close it asked for,
/// if it asked for one.
fn room_gone(conn_state: &ConnStateReceiver) -> End {
    match &conn_state.borrow().membership {
        Membership::Closed(reason) => End::Close(*reason),
        _ => End::Close(CloseReason::RoomUnavailable),
    }
}

/// Why the inflater refused a client's input, if that is what `e` is.
fn inflate_failure(e: &std::io::Error) -> Option<InflateFailure> {
    e.get_ref()?.downcast_ref::<InflateFailure>().copied()
}

/// A stored DEFLATE segment of `{`: a v1 message compressed is this and the
/// worker's segments of the snapshot without its `{`.
fn stored_brace() -> &'static [u8] {
    static BRACE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BRACE.get_or_init(|| {
        let mut out = Vec::new();
        stored_segment(b"{", &mut out);
        out
    })
}

/// What a session sends its client, and when: the room's newest state, at most
/// once per `--max-snapshot-hz` period. A change after a quiet period goes out
/// at once; a change within the period waits for its end (one timer, only while
/// a change waits), and whatever changed meanwhile goes out as one message. The
/// watch always holds the newest state, so the last one is never lost.
///
/// This is the per-member rate. The worker's big-room spacing
/// (`DELIVERIES_PER_ROOM_PER_SEC` in `worker/core.rs`) stays: it bounds how
/// often a big busy room's snapshot is encoded and carried over IPC at all
/// (every 5 ms for 100 members), which saves the worker's CPU; the per-member
/// rate (every 16.7 ms at the default 60 Hz) then bounds what each member gets.
/// With the default, the per-member rate is the tighter of the two for every
/// room size, so members see it alone.
///
/// A v1 client gets the snapshot. A v2 client (PROTOCOL-v2.md) gets the ops
/// batches it missed as one `ops` message when the room keeps them all and
/// they are smaller than the snapshot, else a `snapshot`; always a snapshot
/// first, and after a `resync`.
pub(crate) struct Outbox {
    /// Least time between two messages once over the budget, in nanoseconds
    /// (`None`: no cap; at most a second, as `--max-snapshot-hz` is at least
    /// 1). Four bytes, not a `Duration`'s sixteen: every connection pays.
    spacing_ns: Option<NonZeroU32>,
    /// What the room would send this member, against `--member-bytes-per-sec`:
    /// within it, every change goes out at once.
    budget: SendBudget,
    /// When the last message was sent (kept only with a cap).
    last_sent: Option<Instant>,
    /// Wakes the session when the period ends, while a change waits for it
    /// (`timer_armed`). Made at the first hold and reset after: a busy room
    /// holds each member up to 60 times a second.
    timer: Option<Pin<Box<Sleep>>>,
    timer_armed: bool,
    /// Version of the room state the client has, to count the ones skipped
    /// and, in v2, to know which batches lead from it to the newest
    /// (versions count from 1: `None` takes no room beside the number).
    last_version: Option<NonZeroU64>,
    /// A v2 member's own state (`None` for v1: every connection pays for
    /// what is inline here, idle or not).
    v2: Option<Box<V2Outbox>>,
    /// permessage-deflate was negotiated: snapshots go compressed (the
    /// worker's shared segments), and so do v2 ops messages of at least
    /// [`MIN_COMPRESSED_OPS_BYTES`] (each member's own, compressed here).
    deflate: bool,
}

#[derive(Default)]
struct V2Outbox {
    /// The `seq` of the next message (consecutive per connection).
    next_seq: u64,
    /// The client asked for a snapshot.
    resync: bool,
    /// The version of the last snapshot sent for a resync (another resync is
    /// answered only once the room has moved on).
    resync_version: Option<u64>,
    /// When that snapshot was made ([`RESYNC_EVERY`]).
    resync_answered_at: Option<Instant>,
    /// Refused messages the client was told of (`ConnState::refused`).
    refused_told: u32,
}

/// A v2 message: a snapshot's prefix (the v1 snapshot follows without its
/// `{`), or an `ops` message as its member's own head and a body (shared by
/// every member one version behind: `Published::step_ops`).
enum V2Message {
    Snapshot(Vec<u8>),
    Ops { head: Vec<u8>, body: Bytes },
}

impl Outbox {
    fn new(v2: bool, deflate: bool, config: &contract::config::Config) -> Outbox {
        Outbox {
            spacing_ns: config.snapshot_spacing.and_then(|spacing| {
                NonZeroU32::new(u32::try_from(spacing.as_nanos()).unwrap_or(u32::MAX))
            }),
            budget: SendBudget::new(config.member_bytes_per_sec, Instant::now()),
            last_sent: None,
            timer: None,
            timer_armed: false,
            last_version: None,
            v2: v2.then(Box::default),
            deflate,
        }
    }

    /// Whether the member's rate holds a change back; if so, starts the timer
    /// that sends the newest state when the period ends. Never while its room
    /// sends it less than its byte budget.
    fn hold(&mut self) -> bool {
        let spacing = self
            .spacing_ns
            .map(|ns| Duration::from_nanos(ns.get().into()));
        let Some(at) = self.last_sent.zip(spacing).map(|(l, s)| l + s) else {
            return false;
        };
        let now = Instant::now();
        if at <= now || self.budget.within(now) {
            return false;
        }
        match &mut self.timer {
            Some(timer) => timer.as_mut().reset(at.into()),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(at.into()))),
        }
        self.timer_armed = true;
        true
    }

    /// v2: answers a `resync` with a snapshot of the room's newest version,
    /// unless the client has that one already; now, or when the member's rate
    /// allows (the timer's branch sends it then).
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments twice in its future (see `within`)"
    )]
    fn answer_resync<'a>(
        &'a mut self,
        metrics: &'a Metrics,
        room: &'a RoomHandle,
        sink: &'a mut ClientWriter,
        snapshots: Option<&'a mut watch::Receiver<SnapshotCell>>,
    ) -> impl Future<Output = Result<(), End>> + 'a {
        async move {
            let answered = snapshots
                .as_deref()
                .is_some_and(|rx| self.resync_answered(rx));
            let Some(v2) = self.v2.as_mut() else {
                return Ok(());
            };
            v2.resync = !answered;
            match snapshots {
                Some(rx) if v2.resync && !self.timer_armed && !self.hold() => {
                    self.send_newest(metrics, room, sink, rx).await
                }
                _ => Ok(()),
            }
        }
    }

    /// v2: a resync was answered with a snapshot of the room's newest version.
    fn resync_answered(&self, rx: &watch::Receiver<SnapshotCell>) -> bool {
        let newest = rx.borrow().as_ref().map(|p| p.version);
        newest.is_some()
            && self
                .v2
                .as_ref()
                .is_some_and(|v2| v2.resync_version == newest)
    }

    /// Sends the room's newest state, if the client does not have it yet (or,
    /// in v2, asked for a snapshot).
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn keeps its arguments twice in its future (see `within`)"
    )]
    fn send_newest<'a>(
        &'a mut self,
        metrics: &'a Metrics,
        room: &'a RoomHandle,
        sink: &'a mut ClientWriter,
        rx: &'a mut watch::Receiver<SnapshotCell>,
    ) -> impl Future<Output = Result<(), End>> + 'a {
        async move {
            let Some(snapshot) = rx.borrow_and_update().clone() else {
                return Ok(());
            };
            let last_version = self.last_version.map(NonZeroU64::get);
            if let Some(last) = last_version {
                if last == snapshot.version && !self.v2.as_ref().is_some_and(|v2| v2.resync) {
                    return Ok(());
                }
                metrics
                    .snapshots_skipped
                    .inc_by(snapshot.version.saturating_sub(last + 1));
            }
            let message = if let Some(v2) = self.v2.as_mut() {
                match v2.message(last_version, &snapshot) {
                    Some(message) => Some(message),
                    None => {
                        // Publishes that changed nothing: nothing to send.
                        self.last_version = NonZeroU64::new(snapshot.version);
                        return Ok(());
                    }
                }
            } else {
                None
            };
            self.last_version = NonZeroU64::new(snapshot.version);
            if self.spacing_ns.is_some() {
                self.last_sent = Some(Instant::now());
            }
            // The shared segments, their last trailer off (RFC 7692 §7.2.1).
            let deflated = snapshot
                .deflated
                .as_deref()
                .filter(|_| self.deflate)
                .map(|d| d.strip_suffix(&SYNC_TRAILER).unwrap_or(d));
            // A v1 message's head is shared by every member; a v2 one is its own.
            let compressed_head: Option<Cow<'static, [u8]>> = match (&message, deflated) {
                (None, Some(_)) => Some(Cow::Borrowed(stored_brace())),
                (Some(V2Message::Snapshot(head)), Some(_)) => {
                    let mut prefix = Vec::with_capacity(head.len() + 10);
                    stored_segment(head, &mut prefix);
                    Some(Cow::Owned(prefix))
                }
                // Each member's own, so compressed only while that is cheap, and
                // sent so only if it came out smaller.
                (Some(V2Message::Ops { head, body }), _)
                    if self.deflate
                        && (MIN_COMPRESSED_OPS_BYTES..=MAX_COMPRESSED_OPS_BYTES)
                            .contains(&(head.len() + body.len())) =>
                {
                    Some(deflate_message(&[&head[..], &body[..]].concat()))
                        .filter(|payload| payload.len() < head.len() + body.len())
                        .map(Cow::Owned)
                }
                _ => None,
            };
            let frame = match (&message, &compressed_head) {
                (Some(V2Message::Ops { .. }), Some(payload)) => sink.compressed_text(payload, &[]),
                (_, Some(head)) => sink.compressed_text(head, deflated.expect("a snapshot's head")),
                (None, None) => sink.text(&snapshot.message),
                (Some(V2Message::Snapshot(head)), None) => {
                    sink.text_parts(head, &snapshot.message[1..])
                }
                (Some(V2Message::Ops { head, body }), None) => sink.text_parts(head, body),
            };
            match within(WRITE_TIMEOUT, frame).await {
                Some(Ok(())) => {
                    let (wire_bytes, per_version) = match (&message, &compressed_head) {
                        (Some(V2Message::Ops { .. }), Some(payload)) => (payload.len(), false),
                        (Some(V2Message::Ops { head, body }), None) => {
                            (head.len() + body.len(), false)
                        }
                        (_, Some(head)) => (head.len() + deflated.map_or(0, <[u8]>::len), true),
                        (Some(V2Message::Snapshot(head)), None) => {
                            (head.len() + snapshot.message.len() - 1, true)
                        }
                        (None, None) => (snapshot.message.len(), true),
                    };
                    room.sent(wire_bytes);
                    metrics
                        .bytes_sent
                        .fetch_add(wire_bytes as u64, std::sync::atomic::Ordering::Relaxed);
                    let versions =
                        last_version.map_or(1, |last| snapshot.version.saturating_sub(last));
                    self.budget
                        .charge(wire_bytes as u64, versions, per_version, Instant::now());
                    if compressed_head.is_some() {
                        metrics.messages_compressed.inc();
                        metrics.compressed_bytes.inc_by(wire_bytes as u64);
                    }
                    match message {
                        Some(V2Message::Ops { head, body }) => {
                            metrics.ops_sent.inc();
                            metrics.ops_bytes.inc_by((head.len() + body.len()) as u64);
                        }
                        Some(V2Message::Snapshot(head)) => {
                            metrics.snapshots_sent.inc();
                            metrics
                                .snapshot_bytes
                                .inc_by((head.len() + snapshot.message.len() - 1) as u64);
                        }
                        None => {
                            metrics.snapshots_sent.inc();
                            metrics.snapshot_bytes.inc_by(snapshot.message.len() as u64);
                        }
                    }
                    let latency = snapshot.at.elapsed().as_secs_f64();
                    metrics.fanout_latency.observe(latency);
                    metrics.fanout_counts.observe(latency);
                    Ok(())
                }
                Some(Err(e)) => {
                    debug!(error = %e, "write failed");
                    Err(End::ClientGone)
                }
                None => {
                    info!("client not reading for {WRITE_TIMEOUT:?}; dropping it");
                    Err(End::ClientGone)
                }
            }
        }
    }
}

impl V2Outbox {
    /// The v2 message that brings the client to `snapshot` (`None` if the
    /// publishes since its last message changed nothing).
    fn message(&mut self, last_version: Option<u64>, snapshot: &Published) -> Option<V2Message> {
        use contract::protocol::v2::{ops_body, ops_head, snapshot_prefix};
        if self.resync {
            self.resync_version = Some(snapshot.version);
            self.resync_answered_at = Some(Instant::now());
        }
        // A resync, or the first message, is a snapshot.
        let last = last_version.filter(|_| !std::mem::take(&mut self.resync));
        let limit = snapshot.message.len();
        // One version behind (the usual case): the body every such member shares.
        let step = snapshot.step_ops.clone().filter(|body| {
            last.is_some_and(|last| last + 1 == snapshot.version) && body.len() <= limit
        });
        let body = step.or_else(|| {
            let batches = snapshot.step.as_ref()?.since(last?, limit)?;
            // Publishes that changed nothing: nothing to send.
            Some(if batches.iter().all(|ops| ops.is_empty()) {
                Bytes::new()
            } else {
                Bytes::from(ops_body(batches.iter().map(|b| &b[..])))
            })
        });
        if body.as_ref().is_some_and(Bytes::is_empty) {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        Some(match body {
            Some(body) => V2Message::Ops {
                head: ops_head(seq),
                body,
            },
            None => V2Message::Snapshot(snapshot_prefix(seq)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn within_gives_the_output_or_none_once_the_limit_is_past() {
        let limit = Duration::from_secs(10);
        // Ready at its first poll: its output, and no timer was made.
        let mut ready = std::pin::pin!(within(limit, async { 7 }));
        let waker = std::task::Waker::noop();
        let polled = ready.as_mut().poll(&mut Context::from_waker(waker));
        assert_eq!(polled, Poll::Ready(Some(7)));
        assert!(ready.timer.is_none());
        // Ready after a while within the limit.
        let started = tokio::time::Instant::now();
        let late = within(limit, tokio::time::sleep(Duration::from_secs(9))).await;
        assert_eq!(late, Some(()));
        assert_eq!(started.elapsed(), Duration::from_secs(9));
        // Never ready: `None` at the limit.
        let started = tokio::time::Instant::now();
        let never = within(limit, std::future::pending::<()>()).await;
        assert_eq!(never, None);
        assert_eq!(started.elapsed(), limit);
    }
}
