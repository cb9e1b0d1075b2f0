//! The supervisor's HTTP side (hyper 1): the WebSocket upgrade on `/`, with
//! authentication and room placement done before the `101` so that refusals are
//! plain HTTP statuses, plus `/healthz` and `/status`.

use std::convert::Infallible;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::Either;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    ALLOW, CONNECTION, CONTENT_TYPE, HOST, HeaderValue, RETRY_AFTER, SEC_WEBSOCKET_ACCEPT,
    SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION,
    UPGRADE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tracing::{debug, info, warn};

use super::budgets::{ConnectionBudgets, PreAuthClosed, PreAuthPlace};
use super::inflate::Inflater;
use super::metrics::{Metrics, Rejection};
use super::pool::WorkerSlot;
use super::rooms::{ConnState, PlacementError, Registry};
use super::shutdown::Shutdown;
use super::websocket::Negotiated;
use super::{Shared, session, websocket};
use contract::ipc::ConnId;

/// Read buffer per WebSocket. tungstenite's default (128 KiB) is zero-filled on
/// every read: a quarter of the supervisor's CPU at 10 rooms × 10 members, and the
/// bulk of an idle connection's memory. Client messages are small: a cursor move
/// is about 60 bytes, a shape about 150. A larger message is assembled across
/// reads (the buffer grows to its length), so this does not limit message size.
const READ_BUFFER_BYTES: usize = 256;

/// `Retry-After` on a 503 for lack of capacity: rooms free up as members leave.
const RETRY_AFTER_SECS: &str = "5";

type Body = Full<Bytes>;

/// Which of the server's ports a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// Clients' port: every path, `--max-connections` places
    /// ([`budgets`](super::budgets)); one request per connection unless it
    /// upgrades.
    Main,
    /// `--internal-port`: the operational paths, places of its own, so
    /// clients holding the main port's never keep the probes from an answer.
    Internal,
}

/// Largest request head the main port reads (hyper's default buffer is
/// ~400 KiB): an upgrade with a 4 KiB token and a browser's cookies fit, as
/// in nginx's `large_client_header_buffers`.
const MAX_REQUEST_HEAD_BYTES: usize = 32 * 1024;

/// Serves one TCP connection (HTTP/1.1; on the main port upgradable to a
/// WebSocket, and over TLS when the server has a certificate). The TLS
/// handshake is bounded by the same timeout as the request headers, and a
/// failed one is counted by reason. The connection holds `place` until it
/// authenticates (or closes); the server may close it to make room
/// ([`budgets`](super::budgets)).
pub async fn serve_connection(
    stream: TcpStream,
    shared: Arc<Shared>,
    place: PreAuthPlace,
    port: Port,
) {
    let place = Arc::new(place);
    // No HTTP or TLS state until the client sends something: a flood of idle
    // sockets costs a small task each, so the accept loop keeps up.
    tokio::select! {
        readable = stream.readable() => if readable.is_err() {
            return;
        },
        reason = place.closed() => {
            closed_before_authenticating(&shared, reason, port);
            // Closed to make room on the main port and never sent a byte (its
            // task may just not have seen one yet): held open a while if there
            // is room, so that a client reconnecting at once (a flood) waits.
            let made_room = reason != PreAuthClosed::Timeout && port == Port::Main;
            let silent = made_room && !super::budgets::has_sent_anything(stream.as_raw_fd());
            if let Some(_lingering) = silent.then(|| shared.budgets.linger()).flatten() {
                tokio::time::sleep(super::budgets::LINGER).await;
            }
            return;
        }
    }
    place.spoke();
    let _ = stream.set_nodelay(true);
    let serve = async {
        match (port, shared.tls.clone()) {
            (Port::Main, Some(tls)) => {
                // Boxed: the TLS state is large, and a plain connection's task
                // (and the heap it leaves behind) should not carry room for it.
                Box::pin(serve_tls(stream, tls, shared.clone(), place.clone())).await
            }
            _ => serve_http(stream, shared.clone(), place.clone(), port).await,
        }
    };
    tokio::select! {
        () = serve => {}
        reason = place.closed() => closed_before_authenticating(&shared, reason, port),
    }
}

fn closed_before_authenticating(shared: &Shared, reason: PreAuthClosed, port: Port) {
    // Closing to make room was counted when it was decided.
    if reason == PreAuthClosed::Timeout && port == Port::Main {
        shared.metrics.pre_auth_closed(reason);
    }
    debug!(
        reason = reason.label(),
        ?port,
        "connection closed before authenticating"
    );
}

/// The first byte of a TLS record carrying a handshake (a ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// What a plain HTTP request to the TLS port is told, in a 400 (as nginx does).
const PLAIN_HTTP_TO_TLS: &str =
    "This port speaks TLS: connect with https:// or wss:// (plain HTTP was sent).\n";

async fn serve_tls(
    mut stream: TcpStream,
    tls: Arc<super::tls::Tls>,
    shared: Arc<Shared>,
    place: Arc<PreAuthPlace>,
) {
    let timeout = shared.config.limits.handshake_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    // Plain HTTP to the TLS port (an `http://` or `ws://` URL): told so in a
    // short 400 it can read, instead of a TLS alert it cannot.
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] != TLS_HANDSHAKE_RECORD && first[0].is_ascii_alphabetic() => {
            shared.metrics.tls_failure("not_tls");
            debug!("plain HTTP sent to the TLS port; answered 400");
            let response = format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{PLAIN_HTTP_TO_TLS}",
                PLAIN_HTTP_TO_TLS.len()
            );
            let write = tokio::io::AsyncWriteExt::write_all(&mut stream, response.as_bytes());
            let _ = tokio::time::timeout_at(deadline, write).await;
            return;
        }
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return,
        Err(_) => {
            shared.metrics.tls_failure("timeout");
            return;
        }
    }
    match tokio::time::timeout_at(deadline, tls.acceptor.accept(stream)).await {
        Ok(Ok(stream)) => serve_http(stream, shared, place, Port::Main).await,
        Ok(Err(e)) => {
            let reason = super::tls::failure_reason(&e);
            shared.metrics.tls_failure(reason);
            debug!(error = %e, reason, "TLS handshake failed");
        }
        Err(_) => shared.metrics.tls_failure("timeout"),
    }
}

/// Answers one request on a connection holding `place`.
type Router = fn(Request<Incoming>, Arc<Shared>, &PreAuthPlace) -> Answer;

/// A route's response: ready now, or once the slots' tasks have answered
/// (the room monitor).
enum Answer {
    Now(Response<Body>),
    Later(Pin<Box<dyn Future<Output = Response<Body>> + Send>>),
}

impl From<Response<Body>> for Answer {
    fn from(response: Response<Body>) -> Answer {
        Answer::Now(response)
    }
}

async fn serve_http<S>(io: S, shared: Arc<Shared>, place: Arc<PreAuthPlace>, port: Port)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let handshake_timeout = shared.config.limits.handshake_timeout;
    let router: Router = match port {
        Port::Main => route,
        // Plain HTTP, the operational endpoints only (no WebSocket, no dev
        // pages).
        Port::Internal => route_internal,
    };
    let service = service_fn(move |req| {
        let shared = shared.clone();
        place.requested();
        let answer = router(req, shared, &place);
        async move {
            let mut response = match answer {
                Answer::Now(response) => response,
                Answer::Later(response) => response.await,
            };
            // One request per main-port connection unless it upgrades: the port
            // is the clients'; a kept-alive or pipelining client (one that never
            // reads its answers) would hold a pre-auth place and buffers for
            // nothing. (Not hyper's `keep_alive(false)`: it would also replace
            // the 101's `Connection: Upgrade`.)
            if port == Port::Main && response.status() != StatusCode::SWITCHING_PROTOCOLS {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response)
        }
    });
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        // Bounds slow-header (slowloris) and idle connections that never upgrade.
        .header_read_timeout(handshake_timeout);
    if port == Port::Main {
        http.max_buf_size(MAX_REQUEST_HEAD_BYTES);
    }
    if let Err(e) = http
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await
    {
        debug!(error = %e, "HTTP connection ended with an error");
    }
}

/// Every path this server answers. Each takes GET and HEAD (load balancers
/// probe with HEAD); any other method gets 405 with `Allow`.
const PATHS: [&str; 9] = [
    "/",
    "/dev/token",
    "/admin",
    "/admin/rooms",
    "/admin/history",
    "/healthz",
    "/readyz",
    "/metrics",
    "/status",
];

fn route(req: Request<Incoming>, shared: Arc<Shared>, place: &PreAuthPlace) -> Answer {
    let read = req.method() == Method::GET || req.method() == Method::HEAD;
    if req.uri().path() == "/admin/rooms" && read {
        return Answer::Later(super::dev::monitor_json(&req, &shared));
    }
    respond(req, shared, place).into()
}

/// The response of every route but `/admin/rooms`.
fn respond(req: Request<Incoming>, shared: Arc<Shared>, place: &PreAuthPlace) -> Response<Body> {
    let path = req.uri().path();
    if !PATHS.contains(&path) {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut res = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        res.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return res;
    }
    match path {
        "/" if shared.config.dev && !is_websocket_upgrade(&req) => super::dev::board_page(),
        "/" => websocket(req, shared, place),
        "/dev/token" => super::dev::token(&req, &shared.config),
        "/admin" => super::dev::monitor_page(&shared.config),
        "/admin/history" => super::dev::history_json(&req, &shared.config, &shared.history),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => ready(&shared.registry, shared.pool.slots(), &shared.shutdown),
        // Operational endpoints: see `dev::admin_only`.
        "/metrics" => super::dev::metrics_access(&req, &shared.config).unwrap_or_else(|| {
            let slots = shared.pool.slots();
            metrics(&shared.metrics, &shared.registry, slots, &shared.budgets)
        }),
        _ => super::dev::admin_only(&req, &shared.config)
            .unwrap_or_else(|| status(shared.workers_json())),
    }
}

/// The internal port's paths: every one of [`route`]'s but the client's (the
/// WebSocket, the dev board and its tokens).
fn route_internal(req: Request<Incoming>, shared: Arc<Shared>, place: &PreAuthPlace) -> Answer {
    match req.uri().path() {
        "/" | "/dev/token" => text(StatusCode::NOT_FOUND, "not found\n").into(),
        _ => route(req, shared, place),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// 200 when every worker runs, answers pings and holds all its rooms (none is
/// being replaced or restored), the server is not draining, and the store takes
/// saves (not failing for [`SAVES_FAILING_UNREADY_AFTER`]).
fn ready(registry: &Registry, slots: &[Arc<WorkerSlot>], shutdown: &Shutdown) -> Response<Body> {
    use super::rooms::SAVES_FAILING_UNREADY_AFTER;
    let failing = registry
        .saves_failing_for()
        .filter(|d| *d >= SAVES_FAILING_UNREADY_AFTER);
    let down = slots.iter().filter(|slot| !slot.ready()).count();
    if shutdown.is_stopping() {
        text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if down > 0 {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{down} worker(s) not running, not answering or restoring\n"),
        )
    } else if let Some(failing) = failing {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "saves failing for {} s (see the error log)\n",
                failing.as_secs()
            ),
        )
    } else {
        text(StatusCode::OK, "ready\n")
    }
}

fn metrics(
    m: &Metrics,
    registry: &Registry,
    slots: &[Arc<WorkerSlot>],
    budgets: &ConnectionBudgets,
) -> Response<Body> {
    let rooms = registry.rooms_by_worker();
    m.rooms
        .set(rooms.iter().map(Vec::len).sum::<usize>() as i64);
    let mut up = 0;
    for (slot, rooms) in slots.iter().zip(&rooms) {
        let worker = super::metrics::Worker::of(slot.id);
        m.rooms_by_worker
            .get_or_create(&worker)
            .set(rooms.len() as i64);
        let depth = slot.queue_depth();
        m.ipc_queue_depth.get_or_create(&worker).set(depth as i64);
        up += i64::from(slot.pid().is_some());
    }
    m.workers_up.set(up);
    m.pre_auth_connections
        .set(budgets.pre_auth_connections() as i64);
    let mut res = text(StatusCode::OK, m.encode());
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    res
}

fn status(workers: Vec<serde_json::Value>) -> Response<Body> {
    let body = serde_json::json!({ "workers": workers }).to_string();
    let mut res = text(StatusCode::OK, body);
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

fn is_websocket_upgrade(req: &Request<Incoming>) -> bool {
    let has_token = |name, token: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has_token(CONNECTION, "upgrade")
        && has_token(UPGRADE, "websocket")
        && req
            .headers()
            .get(SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v == "13")
        && req.headers().contains_key(SEC_WEBSOCKET_KEY)
}

fn token_param(req: &Request<Incoming>) -> Option<String> {
    let query = req.uri().query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
}

fn websocket(req: Request<Incoming>, shared: Arc<Shared>, place: &PreAuthPlace) -> Response<Body> {
    if !is_websocket_upgrade(&req) {
        shared.metrics.reject(Rejection::NotWebsocket);
        let mut res = text(
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint takes WebSocket connections: ws://HOST/?token=JWT\n",
        );
        res.headers_mut()
            .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return res;
    }
    if shared.shutdown.is_stopping() {
        shared.metrics.reject(Rejection::Draining);
        return text(StatusCode::SERVICE_UNAVAILABLE, "server is shutting down\n");
    }
    let host = req.headers().get(HOST).and_then(|h| h.to_str().ok());
    let identity = match shared.auth.verify(token_param(&req).as_deref(), host) {
        Ok(identity) => identity,
        Err(e) => {
            shared.metrics.reject(Rejection::Unauthorized);
            shared.metrics.auth_failure(e.reason());
            info!(reason = %e, "connection refused (401)");
            return text(StatusCode::UNAUTHORIZED, "unauthorized\n");
        }
    };
    // The session holds a session place for its life.
    let Some(permit) = shared.budgets.session_place() else {
        shared.metrics.reject(Rejection::TooManyConnections);
        return text(StatusCode::SERVICE_UNAVAILABLE, "too many connections\n");
    };
    let conn = ConnId(shared.next_conn.fetch_add(1, Ordering::Relaxed));
    let (conn_state_tx, conn_state) = ConnState::channel();
    let room = match shared.registry.register(
        &identity.room,
        conn,
        identity.user_id.clone(),
        conn_state_tx,
    ) {
        Ok(room) => room,
        Err(e) => {
            shared.metrics.reject(match e {
                PlacementError::MemoryBudget => Rejection::Memory,
                _ => Rejection::NoCapacity,
            });
            warn!(room = %identity.room, "connection refused (503): {e}");
            let mut res = text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n"));
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
            return res;
        }
    };
    // A session now: out of the pre-auth share, never closed to make room.
    place.authenticated();
    let key = req.headers().get(SEC_WEBSOCKET_KEY).expect("checked above");
    let accept = derive_accept_key(key.as_bytes());
    // v2 when the client offers `whiteboard.v2` (PROTOCOL-v2.md), else v1.
    let protocol = websocket::Protocol::negotiate(req.headers());
    // permessage-deflate when the client offers it (every browser does).
    let deflate = shared.config.compression && websocket::deflate_offered(req.headers());

    // Taken now so the session's task holds the upgrade, not the whole request
    // (the task's size is paid by every connection for its whole life).
    let upgrade = hyper::upgrade::on(req);
    let max = shared.config.limits.max_message_bytes;
    let config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        .read_buffer_size(READ_BUFFER_BYTES);
    let inflater = deflate.then(|| Inflater::new(max, shared.metrics.messages_inflated.clone()));
    // Boxed: the upgrade's and the handshake's futures are large and needed
    // only until the session starts; inline, the task would keep their space
    // for the connection's whole life.
    let accepted = Box::pin(async move {
        match upgrade.await {
            Ok(upgraded) => websocket::accept(upgraded, config, inflater).await,
            Err(e) => Err(std::io::Error::other(e)),
        }
    });
    // Chained, not one `async` block: a block awaiting the upgrade and then
    // the session would keep the socket twice (its local and the session's)
    // for the connection's whole life; `then` holds one future at a time.
    let task_shared = shared.clone();
    let task = accepted
        .then(move |socket| match socket {
            Ok(socket) => {
                let negotiated = Negotiated { protocol, deflate };
                Either::Left(session::run(
                    task_shared,
                    socket,
                    room,
                    conn,
                    identity,
                    conn_state,
                    negotiated,
                ))
            }
            Err(e) => {
                debug!(error = %e, "upgrade failed");
                room.leave(conn);
                Either::Right(std::future::ready(()))
            }
        })
        // The session place is held for the session's life.
        .map(move |()| drop(permit));
    // What every connection pays for its whole life (BENCHMARKS.md, idle).
    tracing::trace!(bytes = std::mem::size_of_val(&task), "session task");
    shared.sessions.spawn(task);

    let mut res = Response::new(Full::new(Bytes::new()));
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = res.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    if let Some(chosen) = protocol.response_header() {
        headers.insert(SEC_WEBSOCKET_PROTOCOL, chosen);
    }
    if deflate {
        headers.insert(
            SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static(websocket::DEFLATE_RESPONSE),
        );
    }
    res
}
