//! Development mode and the room monitor: the built-in whiteboard page, the
//! token endpoint it uses (dev mode only), and a read-only view of workers, rooms
//! and connections (dev mode, or with `ADMIN_TOKEN`).

use std::pin::Pin;
use std::sync::{Arc, LazyLock};

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HOST, HeaderValue, ORIGIN};
use hyper::{Request, Response, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use super::Shared;
use super::history::History;
use contract::config::Config;
use contract::ipc::Escaped;

const BOARD_PAGE: &str = include_str!("dev/board.html");
const MONITOR_PAGE: &str = include_str!("dev/monitor.html");
/// The TypeScript client (`clients/typescript`) as `tsc` compiled it: the board
/// page imports it. Its `dist/` is committed, so that `cargo run -- --dev`
/// needs nothing but cargo; the client's tests fail when it is not what `tsc`
/// makes of the source.
const CLIENT_JS: &str = include_str!("../clients/typescript/dist/index.js");
/// Where the board page's import map names the client module.
const CLIENT_URL_SLOT: &str = "\"session-client\": \"\"";

/// The board page with the client module in its import map (a `data:` URL: the
/// page stays one response, and needs no route of its own).
static BOARD: LazyLock<String> = LazyLock::new(|| {
    let url = format!(
        "\"session-client\": \"data:text/javascript;base64,{}\"",
        base64::engine::general_purpose::STANDARD.encode(CLIENT_JS)
    );
    assert!(
        BOARD_PAGE.contains(CLIENT_URL_SLOT),
        "board.html has the import map slot"
    );
    BOARD_PAGE.replacen(CLIENT_URL_SLOT, &url, 1)
});

type Body = Full<Bytes>;

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut res = Response::new(Full::new(body.into()));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    res.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn not_found() -> Response<Body> {
    respond(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        "not found\n",
    )
}

/// `GET /` without an upgrade, in dev mode: the whiteboard.
pub fn board_page() -> Response<Body> {
    respond(StatusCode::OK, "text/html; charset=utf-8", BOARD.as_str())
}

/// `GET /dev/token?userId=…&roomId=…`: a client token signed with the dev secret,
/// for the host the page was loaded from. Exists only in dev mode, and answers
/// only a loopback `Host` (and `Origin`, when there is one): a page from
/// another name (DNS rebinding to 127.0.0.1) gets 403. The token carries the
/// [`DEV_CLAIM`](crate::auth::DEV_CLAIM), which a server not in dev mode refuses.
pub fn token<B>(req: &Request<B>, config: &Config) -> Response<Body> {
    if !config.dev {
        return not_found();
    }
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|h: &HeaderValue| h.to_str().ok())
    };
    let host_ok = header(HOST).is_some_and(is_loopback_host);
    let origin_ok = req.headers().get(ORIGIN).is_none_or(|origin| {
        origin
            .to_str()
            .ok()
            .and_then(|o| {
                o.strip_prefix("http://")
                    .or_else(|| o.strip_prefix("https://"))
            })
            .is_some_and(is_loopback_host)
    });
    if !host_ok || !origin_ok {
        let shown = |value: Option<&str>| Escaped(value.unwrap_or("-")).to_string();
        tracing::warn!(host = %shown(header(HOST)), origin = %shown(header(ORIGIN)), "dev token refused (403): not a loopback host or origin");
        return respond(
            StatusCode::FORBIDDEN,
            "text/plain; charset=utf-8",
            "dev tokens are minted only for pages on localhost, 127.0.0.1 or [::1]\n",
        );
    }
    let query = req.uri().query().unwrap_or("");
    let param = |name: &str| {
        form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .filter(|v| !v.is_empty() && v.len() <= contract::protocol::MAX_ID_BYTES)
    };
    let (Some(user_id), Some(room_id)) = (param("userId"), param("roomId")) else {
        return respond(
            StatusCode::BAD_REQUEST,
            "text/plain; charset=utf-8",
            "userId and roomId are required (1 to 128 bytes)\n",
        );
    };
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let claims = json!({"userId": user_id, "roomId": room_id, "host": host,
        "iat": jsonwebtoken::get_current_timestamp(), crate::auth::DEV_CLAIM: true});
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(config.jwt_secret.as_str().as_bytes()),
    )
    .expect("HS256 signing cannot fail");
    respond(
        StatusCode::OK,
        "application/json",
        json!({ "token": token }).to_string(),
    )
}

/// Whether `host` (a `Host` header, or an origin without its scheme) names
/// this machine's loopback: `localhost`, `127.0.0.1` or `[::1]`, with or
/// without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((address, rest)) if rest.is_empty() || is_port(rest) => return address == "::1",
            _ => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, port)) if is_port(&format!(":{port}")) => name,
            Some(_) => return false,
            None => host,
        },
    };
    name.eq_ignore_ascii_case("localhost") || name == "127.0.0.1"
}

/// `:PORT`, digits only.
fn is_port(text: &str) -> bool {
    text.strip_prefix(':').is_some_and(|port| {
        !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit())
    })
}

/// Whether the monitor is on, and this request may see it.
enum Access {
    Off,
    Denied,
    Allowed,
}

fn access<B>(req: &Request<B>, config: &Config) -> Access {
    if config.dev {
        return Access::Allowed;
    }
    let Some(expected) = &config.admin_token else {
        return Access::Off;
    };
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    // Constant-time comparison: the token is a secret.
    let matches = given.is_some_and(|g| {
        g.len() == expected.len()
            && g.bytes()
                .zip(expected.as_str().bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if matches {
        Access::Allowed
    } else {
        Access::Denied
    }
}

/// The refusal for an operational endpoint (`/status`, `/admin/rooms`), if
/// this request may not see it: 404 when they are off (no `ADMIN_TOKEN`,
/// outside dev mode), 401 without the right bearer token. `None`: allowed.
pub fn admin_only<B>(req: &Request<B>, config: &Config) -> Option<Response<Body>> {
    match access(req, config) {
        Access::Off => Some(not_found()),
        Access::Denied => Some(unauthorized()),
        Access::Allowed => None,
    }
}

/// `/metrics` is for a scraper on a private network: open without
/// `ADMIN_TOKEN`, and behind it (bearer) once it is set.
pub fn metrics_access<B>(req: &Request<B>, config: &Config) -> Option<Response<Body>> {
    match access(req, config) {
        Access::Off | Access::Allowed => None,
        Access::Denied => Some(unauthorized()),
    }
}

fn unauthorized() -> Response<Body> {
    respond(
        StatusCode::UNAUTHORIZED,
        "text/plain; charset=utf-8",
        "unauthorized\n",
    )
}

/// `GET /admin`: the monitor page (it fetches `/admin/rooms` with the token from
/// the page's `#token=` fragment outside dev mode).
pub fn monitor_page(config: &Config) -> Response<Body> {
    if config.dev || config.admin_token.is_some() {
        respond(StatusCode::OK, "text/html; charset=utf-8", MONITOR_PAGE)
    } else {
        not_found()
    }
}

/// `GET /admin/rooms`: workers, rooms and connections, as JSON.
/// (Answered once every slot's task has listed its rooms.)
pub fn monitor_json<B>(
    req: &Request<B>,
    shared: &Arc<Shared>,
) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> {
    if let Some(refused) = admin_only(req, &shared.config) {
        return Box::pin(std::future::ready(refused));
    }
    let shared = shared.clone();
    Box::pin(async move {
        let rooms = shared.registry.monitor().await;
        let body = json!({
            "workers": shared.workers_json(),
            "rooms": rooms,
            "connections": shared.metrics.connections.get(),
            "draining": shared.shutdown.is_stopping(),
        });
        respond(StatusCode::OK, "application/json", body.to_string())
    })
}

/// `GET /admin/history`: the monitor's last 15 minutes, one sample a second.
pub fn history_json<B>(
    req: &Request<B>,
    config: &Config,
    history: &std::sync::Mutex<History>,
) -> Response<Body> {
    if let Some(refused) = admin_only(req, config) {
        return refused;
    }
    let body = super::rooms::lock(history).to_json().to_string();
    respond(StatusCode::OK, "application/json", body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_board_page_carries_the_typescript_client() {
        let page = BOARD.as_str();
        let start = page
            .find("\"session-client\": \"data:text/javascript;base64,")
            .expect("the import map names the client");
        let encoded = &page[start..].split("base64,").nth(1).unwrap();
        let encoded = &encoded[..encoded.find('"').unwrap()];
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(String::from_utf8(decoded).unwrap(), CLIENT_JS);
        assert!(CLIENT_JS.contains("export function connect("));
        assert!(page.contains("from \"session-client\""));
    }

    #[test]
    fn loopback_hosts_are_the_three_names_with_or_without_a_port() {
        for host in [
            "localhost",
            "localhost:8000",
            "LOCALHOST:8000",
            "127.0.0.1",
            "127.0.0.1:8000",
            "[::1]",
            "[::1]:8000",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "rebind.attacker.example:8000",
            "localhost.attacker.example",
            "127.0.0.1.nip.io:8000",
            "evil.com#127.0.0.1",
            "[::1]x",
            "localhost:80a",
            "localhost:",
            "",
            "10.0.0.1:8000",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
