//! Faults from the store's side, against the real server: a stored board over
//! the room's limits, a store that keeps refusing a room, an unreadable board
//! row, the data folder's lock and a data folder deleted while running.

use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::support::backend::BACKEND_SECRET;
use crate::support::*;

fn create(x: i64, text: &str) -> Value {
    json!({"type":"shape_create","shapeType":"text","x":x,"y":0,"width":10,"height":10,"text":text})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_board_over_the_limits_loads_trimmed_and_keeps_the_cut() {
    let data = temp_dir("big-board");
    // 44 444 shapes of ~500 bytes: 22 MB, over the IPC frame limit as a snapshot.
    let text = "t".repeat(300);
    let board: Vec<Value> = (0..44_444).map(|i| stored_text_shape(i, &text)).collect();
    seed_store(&data, "big", &Value::Array(board.clone()).to_string());
    let data_arg = data.to_str().unwrap();
    let server = Server::start_raw(
        &["--workers", "1", "--data-dir", data_arg],
        &[("JWT_SECRET", SECRET)],
    );
    let pid = server.worker_pids().await;
    let mut alice = server
        .connect(&server.url(&server.token("alice", "big")))
        .await;
    let first = alice.next_snapshot().await;
    assert_eq!(shapes(&first).len(), 1000);
    assert_eq!(
        shapes(&first)[..],
        board[..1000],
        "the first 1000 are kept, in order"
    );
    // Drawing works in the trimmed room, and the worker never crashed.
    alice
        .send(json!({"type":"shape_delete","shapeId":"s0"}))
        .await;
    alice.send(create(5, "new")).await;
    alice
        .until(|s| shapes(s).len() == 1000 && shapes(s)[999]["text"] == "new")
        .await;
    assert_eq!(server.worker_pids().await, pid, "the worker was replaced");
    // The cut is logged and every cut shape is in the fallback file.
    let logs = server.logged("stored board over the room's limits").await;
    assert!(logs.contains("cut=43444"), "{logs}");
    let files = fallback_files(&data, "big");
    assert_eq!(files.len(), 1, "{files:?}");
    let kept: Value = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    assert_eq!(
        kept["data"]["shapes"].as_array().unwrap()[..],
        board[1000..]
    );
}

/// A backend whose boards exist (the load succeeds) but every save is refused,
/// alternately `409` and `404`; counts the refused saves.
struct RefusingBackend {
    port: u16,
    puts: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RefusingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RefusingBackend {
    async fn start(stored: Value) -> RefusingBackend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let puts = Arc::new(AtomicUsize::new(0));
        let stored = Arc::new(Mutex::new(stored));
        let counter = puts.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (puts, stored) = (counter.clone(), stored.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (puts, stored) = (puts.clone(), stored.clone());
                        async move {
                            let (status, body) = if req.method() == Method::GET {
                                let shapes = stored.lock().unwrap().clone();
                                let board = json!({"id":7,"data":{"shapes":shapes,"cursors":[]}});
                                (StatusCode::OK, board.to_string())
                            } else if puts.fetch_add(1, Ordering::SeqCst) % 2 == 0 {
                                (StatusCode::CONFLICT, r#"{"error":"conflict"}"#.to_owned())
                            } else {
                                (StatusCode::NOT_FOUND, r#"{"error":"gone"}"#.to_owned())
                            };
                            let mut res = Response::new(Full::new(Bytes::from(body)));
                            *res.status_mut() = status;
                            Ok::<_, Infallible>(res)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        RefusingBackend { port, puts, task }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_refusing_saves_frees_the_room_into_a_fallback_file() {
    let backend = RefusingBackend::start(json!([stored_text_shape(0, "stored")])).await;
    let url = format!("http://127.0.0.1:{}", backend.port);
    let server = Server::start_raw(
        &["--workers", "1", "--max-rooms", "1", "--backend-url", &url],
        &[
            ("JWT_SECRET", SECRET),
            ("SESSION_SERVER_SECRET", BACKEND_SECRET),
        ],
    );
    let data = server.data_dir().to_path_buf();
    let mut alice = server.join("alice", "refused").await;
    for x in 0..3 {
        alice.send(create(x, &format!("unsaved {x}"))).await;
    }
    let last = alice.until(|s| shapes(s).len() == 4).await;
    alice.close().await;
    // The room is full capacity-wise until it is freed; then a new room fits.
    let mut bob = eventually(Duration::from_secs(30), "a new room to fit", || async {
        server
            .try_connect(&server.url(&server.token("bob", "next")))
            .await
            .ok()
    })
    .await;
    bob.next_snapshot().await;
    assert!(backend.puts.load(Ordering::SeqCst) >= 5);
    let files = fallback_files(&data, "refused");
    assert_eq!(files.len(), 1, "{files:?}");
    let body: Value = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    // Exactly the room's unsaved state, in the backend's save format.
    assert_eq!(body, json!({"data":{"shapes":last["shapes"],"cursors":[]}}));
    let logs = server.logged("the store keeps refusing this room").await;
    let line = logs
        .lines()
        .find(|l| l.contains("the store keeps refusing this room"))
        .unwrap_or_else(|| panic!("no error line naming the room:\n{logs}"));
    assert!(line.contains("ERROR") && line.contains("refused"), "{line}");
    assert!(line.contains(files[0].to_str().unwrap()), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_stored_board_closes_the_room_clearly() {
    let data = temp_dir("broken-row");
    seed_store(&data, "broken", "{not a list of shapes");
    let server = Server::start_raw(
        &["--workers", "1", "--data-dir", data.to_str().unwrap()],
        &[("JWT_SECRET", SECRET)],
    );
    let pid = server.worker_pids().await;
    let broken = server.url(&server.token("alice", "broken"));
    let mut alice = server.connect(&broken).await;
    match alice.closed().await {
        Closed::Frame(1011, reason) => assert!(reason.contains("stored board"), "{reason}"),
        other => panic!("expected a 1011 close, got {other:?}"),
    }
    // The worker's error line comes through its own pipe: it can arrive after
    // the close did (a failure seen once in a loaded run).
    let logged =
        |l: &str| l.contains("ERROR") && l.contains("broken") && l.contains("cannot be read");
    let deadline = Instant::now() + PATIENCE;
    while !server.logs().lines().any(logged) {
        let logs = server.logs();
        assert!(
            Instant::now() < deadline,
            "no error line naming the room:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A second try is refused the same way; the row is untouched; other rooms work
    // on the same worker.
    let mut again = server.connect(&broken).await;
    assert!(matches!(again.closed().await, Closed::Frame(1011, _)));
    let conn = rusqlite::Connection::open(db_path(&data)).unwrap();
    let row: String = conn
        .query_row(
            "SELECT shapes FROM boards WHERE room_id = 'broken'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(row, "{not a list of shapes");
    let mut bob = server.join("bob", "fine").await;
    bob.send(create(1, "ok")).await;
    bob.until(|s| shapes(s).len() == 1).await;
    assert_eq!(server.worker_pids().await, pid, "the worker was replaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_dir_refuses_to_start() {
    let first = Server::start(&[]);
    let data = first.data_dir().to_path_buf();
    let out = run_until_it_exits(&data, "1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("in use by another session-server"),
        "{stderr}"
    );
    // The first one is untouched.
    first.join("alice", "still").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_data_dir_makes_saves_fail_loudly_and_never_starts_a_fresh_database() {
    let server = Server::start_raw(
        &[
            "--workers",
            "1",
            "--persist-debounce-ms",
            "100",
            "--persist-max-wait-ms",
            "200",
        ],
        &[("JWT_SECRET", SECRET)],
    );
    let data = server.data_dir().to_path_buf();
    let ok = "session_server_saves_total{result=\"ok\"}";
    let failed = "session_server_saves_total{result=\"failed\"}";
    let mut alice = server.join("alice", "deleted").await;
    alice.send(create(1, "saved")).await;
    eventually(PATIENCE, "a first save", || async {
        (metric(&server, ok).await >= 1.0).then_some(())
    })
    .await;
    let saved_before = metric(&server, ok).await;
    std::fs::remove_dir_all(&data).unwrap();
    alice.send(create(2, "after the delete")).await;
    eventually(PATIENCE, "a failed save", || async {
        (metric(&server, failed).await >= 1.0).then_some(())
    })
    .await;
    // A worker started now (the old one killed) must not create a fresh database.
    let old = server.worker_pids().await;
    send_signal(old[0], "KILL");
    // (`/status` shows no pid between the death and the replacement.)
    wait_replaced_within(&server, 0, old[0], PATIENCE).await;
    alice.send(create(3, "after the respawn")).await;
    alice.until(|s| shapes(s).len() == 3).await;
    let (status, body) = eventually(Duration::from_secs(25), "/readyz to turn 503", || async {
        let (status, body) = server.get("/readyz").await;
        (status == 503).then_some((status, body))
    })
    .await;
    assert_eq!(status, 503);
    assert!(body.contains("saves failing"), "{body}");
    assert_eq!(
        metric(&server, ok).await,
        saved_before,
        "a save 'succeeded'"
    );
    assert!(!db_path(&data).exists(), "a fresh database was created");
    let logs = server.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("ERROR") && l.contains("boards.sqlite3") && l.contains("missing")),
        "{logs}"
    );
}

/// The store is opened by the first worker, as its answer to its settings: a
/// file that is not a database stops the start (exit 1) with one error naming
/// it, the file is left as it was, and no server serves meanwhile.
#[test]
fn a_store_file_that_is_not_a_database_stops_the_start_naming_it() {
    let data = temp_dir("not-a-database");
    let garbage = "not a database, a text file that someone put here\n".repeat(20);
    std::fs::write(db_path(&data), &garbage).unwrap();
    let out = run_until_it_exits(&data, "2");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let logs = format!("{stdout}{stderr}");
    assert_eq!(out.status.code(), Some(1), "{logs}");
    assert!(!logs.contains("Listening"), "{logs}");
    let line = logs
        .lines()
        .find(|l| l.contains("failed to start"))
        .unwrap_or_else(|| panic!("no start failure logged:\n{logs}"));
    assert!(
        line.contains("ERROR") && line.contains("worker w0"),
        "{line}"
    );
    assert!(line.contains("the store is unusable"), "{line}");
    assert!(line.contains(db_path(&data).to_str().unwrap()), "{line}");
    assert!(line.contains("not a database"), "{line}");
    assert_eq!(std::fs::read_to_string(db_path(&data)).unwrap(), garbage);
}

/// Starts a server with `workers` workers on the embedded store in `data`, which
/// must exit by itself (start-up refused) within the harness's patience; returns
/// its output.
fn run_until_it_exits(data: &Path, workers: &str) -> std::process::Output {
    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_session-server"))
        .args(["--port", "0", "--bind", "127.0.0.1", "--workers", workers])
        .arg("--data-dir")
        .arg(data)
        .env("JWT_SECRET", SECRET)
        .env_remove("BACKEND_URL")
        .env_remove("DATA_DIR")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while server.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            server.kill().unwrap();
            server.wait().unwrap();
            panic!("a server on {} kept running", data.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    server.wait_with_output().unwrap()
}
