//! An in-test HTTP backend implementing PROTOCOL.md §5 faithfully: the two
//! endpoints, their status codes, the bearer check, and a record of every request
//! (time, method, path, body, whether its token verified). It can be switched to
//! fail (500) or hang.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};
use tokio::net::TcpListener;

pub const BACKEND_SECRET: &str = "backend-test-secret";

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Normal,
    /// Every request gets a 500.
    Fail,
    /// Requests never get an answer.
    Hang,
}

#[derive(Clone, Debug)]
pub struct Recorded {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub body: Option<Value>,
    /// The bearer token verified with the secret and carried `sessionServer: true`.
    pub authorized: bool,
    pub status: u16,
}

struct Board {
    id: u64,
    shapes: Value,
}

#[derive(Default)]
struct State {
    boards: HashMap<String, Board>,
    next_id: u64,
    requests: Vec<Recorded>,
    mode: Option<Mode>,
}

pub struct Backend {
    pub port: u16,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State {
            next_id: 100,
            mode: Some(Mode::Normal),
            ..Default::default()
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(req, state).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Backend { port, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a board for `room` holding `shapes`; returns its id.
    pub fn create_board(&self, room: &str, shapes: Value) -> u64 {
        let mut state = self.state.lock().unwrap();
        state.next_id += 1;
        let id = state.next_id;
        state.boards.insert(room.to_owned(), Board { id, shapes });
        id
    }

    /// The shapes stored for `room`, if it has a board.
    pub fn shapes(&self, room: &str) -> Option<Value> {
        let state = self.state.lock().unwrap();
        state.boards.get(room).map(|b| b.shapes.clone())
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = Some(mode);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    pub fn puts(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "PUT")
            .collect()
    }

    /// Waits until `pred` holds for the stored shapes of `room`.
    pub async fn wait_for_shapes(
        &self,
        room: &str,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + within;
        loop {
            if let Some(shapes) = self.shapes(room).filter(|s| pred(s)) {
                return shapes;
            }
            assert!(
                Instant::now() < deadline,
                "backend shapes for {room} never matched; now {:?}",
                self.shapes(room)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn authorized(req: &Request<Incoming>) -> bool {
    let Some(token) = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
    else {
        return false;
    };
    let mut validation = Validation::new(Algorithm::HS256);
    validation.required_spec_claims.clear();
    match jsonwebtoken::decode::<Value>(
        token,
        &DecodingKey::from_secret(BACKEND_SECRET.as_bytes()),
        &validation,
    ) {
        Ok(data) => data.claims["sessionServer"] == true,
        Err(_) => false,
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res
}

async fn handle(req: Request<Incoming>, state: Arc<Mutex<State>>) -> Response<Full<Bytes>> {
    let at = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let authorized = authorized(&req);
    let body_bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Option<Value> = serde_json::from_slice(&body_bytes).ok();
    let mode = state.lock().unwrap().mode.unwrap_or(Mode::Normal);
    if mode == Mode::Hang {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let (status, answer) = {
        let mut state = state.lock().unwrap();
        let (status, answer) = if mode == Mode::Fail {
            (StatusCode::INTERNAL_SERVER_ERROR, json!({"error":"down"}))
        } else if !authorized {
            (StatusCode::UNAUTHORIZED, json!({"error":"unauthorized"}))
        } else if let (&Method::GET, Some(room)) =
            (&method, path.strip_prefix("/api/boards/by-room/"))
        {
            let room = percent_decode(room);
            match state.boards.get(&room) {
                Some(board) => (
                    StatusCode::OK,
                    json!({"id":board.id,"name":"Board","userId":"owner","hathoraRoomId":room,
                        "data":{"shapes":board.shapes,"cursors":[]},
                        "createdAt":"2024-01-01T00:00:00.000Z","updatedAt":"2024-01-01T00:00:00.000Z"}),
                ),
                None => (StatusCode::NOT_FOUND, json!({"error":"Board not found"})),
            }
        } else if let (&Method::PUT, Some(id)) = (&method, path.strip_prefix("/api/boards/")) {
            let id: u64 = id.parse().unwrap_or(0);
            let shapes = body.as_ref().map(|b| b["data"]["shapes"].clone());
            match (state.boards.values_mut().find(|b| b.id == id), shapes) {
                (Some(board), Some(shapes)) if shapes.is_array() => {
                    board.shapes = shapes;
                    (StatusCode::OK, json!({"id":id}))
                }
                (Some(_), _) => (StatusCode::BAD_REQUEST, json!({"error":"bad body"})),
                (None, _) => (StatusCode::NOT_FOUND, json!({"error":"Board not found"})),
            }
        } else {
            (StatusCode::NOT_FOUND, json!({"error":"no route"}))
        };
        state.requests.push(Recorded {
            at,
            method: method.to_string(),
            path: path.clone(),
            body: body.clone(),
            authorized,
            status: status.as_u16(),
        });
        (status, answer)
    };
    reply(status, answer)
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}
