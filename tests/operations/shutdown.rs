//! Shutdown by signal, end to end: SIGINT and SIGTERM sent to the supervisor
//! alone or to its whole process group (Ctrl-C in a terminal, systemd's
//! KillMode=control-group) save every unsaved room, close clients with 1001 and
//! end every process of the group within 10 s (what `docker stop` and Kubernetes
//! allow before SIGKILL), even when the backend never answers or a worker dies
//! during the shutdown; meanwhile `/readyz` says draining and new upgrades get
//! `503`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::backend::{BACKEND_SECRET, Backend, Mode};
use crate::support::*;

/// What `docker stop` and Kubernetes wait before SIGKILL.
const KILL_AFTER: Duration = Duration::from_secs(10);
/// The exit code of a stop that left rooms unsaved (README, "Drain").
const NOT_ALL_SAVED: i32 = supervisor::StopOutcome::NOT_ALL_SAVED_EXIT_CODE as i32;

#[derive(Clone, Copy)]
enum Target {
    /// Every process of the server's group: supervisor and workers.
    Group,
    /// The supervisor alone.
    Supervisor,
}

fn rect(x: i64) -> Value {
    json!({"type":"shape_create","shapeType":"rectangle","x":x,"y":0,"width":10,"height":10})
}

fn send(server: &Server, target: Target, signal: &str) {
    match target {
        Target::Group => signal_group(server.pid(), signal),
        Target::Supervisor => server.signal(signal),
    }
}

/// The client gets `1001 Going Away`, then hangs up (as a browser does; the
/// test client would not answer the close frame while nothing reads it).
async fn goes_away(mut client: Client) {
    assert_eq!(
        client.closed().await,
        Closed::Frame(1001, "Going Away".into())
    );
}

/// Waits for the supervisor's exit code and for every process of the group to be
/// gone, within [`KILL_AFTER`] of `signalled`; returns the code and how long the
/// supervisor took to exit.
fn exit_within_budget(server: &mut Server, pids: &[u32], signalled: Instant) -> (i32, Duration) {
    let left = KILL_AFTER.saturating_sub(signalled.elapsed());
    let code = tokio::task::block_in_place(|| server.wait_exit(left));
    let took = signalled.elapsed();
    wait_all_gone(pids, signalled + KILL_AFTER);
    (code.expect("exit code, not a signal"), took)
}

/// Two rooms on two workers, each with a shape not saved yet (the signal comes
/// well before the 2 s debounce): the signal saves both, closes both clients with
/// 1001, exits 0 once its workers are gone and leaves no process behind; a
/// restart on the same store has the shapes.
async fn unsaved_rooms_are_saved_on(signal: &str, target: Target) {
    let dir = temp_dir("shutdown");
    let dir_arg = dir.to_str().unwrap();
    let args = ["--workers", "2", "--data-dir", dir_arg];
    let env = [("JWT_SECRET", SECRET)];
    let mut server = Server::start_in_own_group(&args, &env);
    let mut alice = server.join("alice", "room-1").await;
    let mut bob = server.join("bob", "room-2").await;
    alice.send(rect(1)).await;
    bob.send(rect(2)).await;
    bob.send(rect(3)).await;
    let a = alice.until(|s| shapes(s).len() == 1).await;
    let b = bob.until(|s| shapes(s).len() == 2).await;
    let workers = server.worker_pids().await;
    assert_eq!(workers.len(), 2);
    let mut pids = workers.clone();
    pids.push(server.pid());

    let signalled = Instant::now();
    send(&server, target, signal);
    for client in [alice, bob] {
        goes_away(client).await;
    }
    let left = KILL_AFTER.saturating_sub(signalled.elapsed());
    tokio::task::block_in_place(|| server.wait_exit(left));
    // The supervisor ends its workers before it exits.
    for pid in workers {
        assert!(!process_exists(pid), "worker {pid} outlived the supervisor");
    }
    let (code, took) = exit_within_budget(&mut server, &pids, signalled);
    assert_eq!(code, 0, "{}", server.logs());
    eprintln!("SIG{signal} to the {target}: exit {took:?} after the signal");
    let logs = server.logged("shutdown: every room saved").await;
    assert!(!logs.contains("restoring its rooms"), "{logs}");
    drop(server);

    let server = Server::start_raw(&args, &env);
    for (user, room, before) in [("carol", "room-1", a), ("dave", "room-2", b)] {
        let mut client = server.connect(&server.url(&server.token(user, room))).await;
        let after = client.next_snapshot().await;
        assert_eq!(after["shapes"], before["shapes"], "{room}");
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Target::Group => "process group",
            Target::Supervisor => "supervisor",
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_to_the_process_group_saves_closes_and_exits_zero() {
    unsaved_rooms_are_saved_on("INT", Target::Group).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_process_group_saves_closes_and_exits_zero() {
    unsaved_rooms_are_saved_on("TERM", Target::Group).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_to_the_supervisor_saves_closes_and_exits_zero() {
    unsaved_rooms_are_saved_on("INT", Target::Supervisor).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_supervisor_saves_closes_and_exits_zero() {
    unsaved_rooms_are_saved_on("TERM", Target::Supervisor).await;
}

/// A server on the in-test backend, in its own process group, with the default
/// shutdown budget, and one member in each of `rooms` (boards exist).
async fn with_backend(backend: &Backend, rooms: &[&str]) -> (Server, Vec<Client>) {
    let url = backend.url();
    let server = Server::start_in_own_group(
        &["--workers", "2", "--backend-url", url.as_str()],
        &[
            ("JWT_SECRET", SECRET),
            ("SESSION_SERVER_SECRET", BACKEND_SECRET),
        ],
    );
    let mut clients = Vec::new();
    for (i, room) in rooms.iter().enumerate() {
        backend.create_board(room, json!([]));
        clients.push(server.join(&format!("user-{i}"), room).await);
    }
    (server, clients)
}

/// A backend that never answers: the saves give up in time, every shape the
/// members saw (a long CJK paste among them) is in a fallback file under
/// `<data-dir>/unsaved/`, the log names
/// the room and its file, the exit code says that not everything was saved
/// (3), and the whole group is gone within 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_never_answers_puts_every_shape_in_a_fallback_file_within_ten_seconds() {
    let backend = Backend::start().await;
    let (mut server, mut clients) = with_backend(&backend, &["hung-room"]).await;
    backend.set_mode(Mode::Hang);
    for x in 1..=30 {
        clients[0].send(rect(x)).await;
        clients[0].until(|s| shapes(s).len() == x as usize).await;
    }
    // A long pasted text in CJK with emoji: kept byte for byte in the file.
    let pasted = "白板の共同編集🎨✏️、保存できなかった図形も失わない。".repeat(50);
    clients[0]
        .send(json!({"type":"shape_create","shapeType":"text","x":31,"y":0,"width":10,"height":10,"text":pasted}))
        .await;
    let seen = clients[0].until(|s| shapes(s).len() == 31).await["shapes"].clone();
    assert_eq!(seen[30]["text"], pasted);
    let mut pids = server.worker_pids().await;
    pids.push(server.pid());

    let signalled = Instant::now();
    signal_group(server.pid(), "TERM");
    goes_away(clients.remove(0)).await;
    let (code, took) = exit_within_budget(&mut server, &pids, signalled);
    assert_eq!(code, NOT_ALL_SAVED, "{}", server.logs());
    eprintln!("hung backend, SIGTERM to the process group: exit {took:?} after the signal");
    let files = fallback_files(server.data_dir(), "hung-room");
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files[0].to_string_lossy().ends_with("-unsaved.json"),
        "{files:?}"
    );
    assert_eq!(fallback_shapes(&files[0]), seen);
    let logs = server.logged("some rooms could not be saved").await;
    let summary = logs
        .lines()
        .find(|l| l.contains("some rooms could not be saved"))
        .unwrap_or_else(|| panic!("no shutdown summary: {logs}"));
    assert!(summary.contains("hung-room"), "{summary}");
    assert!(summary.contains(&*files[0].to_string_lossy()), "{summary}");
    assert_eq!(backend.shapes("hung-room"), Some(json!([])));
}

/// Makes a folder read-only for everyone, root included (mode 0555, which the
/// embedded store checks before each save, and the immutable attribute, which
/// stops even root from creating a file in it), until dropped. `None`, with
/// the reason printed, where the attribute cannot be set (a root run on a file
/// system without it).
struct ReadOnly(std::path::PathBuf);

impl ReadOnly {
    fn make(dir: &std::path::Path) -> Option<ReadOnly> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        let guard = ReadOnly(dir.to_owned());
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .unwrap()
            .stdout
            == b"0\n";
        if root {
            let set = std::process::Command::new("chattr")
                .arg("+i")
                .arg(dir)
                .status();
            if !set.is_ok_and(|s| s.success()) {
                eprintln!(
                    "skipped: running as root and `chattr +i` is not available here, so the folder cannot be made read-only for root"
                );
                return None;
            }
        }
        Some(guard)
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
        let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o755));
    }
}

/// The embedded store's folder turns read-only (a volume remounted read-only
/// after disk errors): saves fail, and no fallback file can be written, so
/// every shape the members saw is in the worker's error line (the documented
/// last resort), the exit code is 3, and the group is gone within 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_data_dir_puts_every_shape_in_the_log_within_ten_seconds() {
    let data = temp_dir("read-only");
    let mut server = Server::start_in_own_group(
        &["--workers", "1", "--data-dir", data.to_str().unwrap()],
        &[("JWT_SECRET", SECRET), ("LOG_FORMAT", "json")],
    );
    let mut alice = server.join("alice", "ro-room").await;
    let Some(_read_only) = ReadOnly::make(&data) else {
        return;
    };
    let mut seen = json!([]);
    for x in 1..=20 {
        alice.send(rect(x)).await;
        seen = alice.until(|s| shapes(s).len() == x as usize).await["shapes"].clone();
    }
    let mut pids = server.worker_pids().await;
    pids.push(server.pid());

    let signalled = Instant::now();
    signal_group(server.pid(), "TERM");
    goes_away(alice).await;
    let (code, took) = exit_within_budget(&mut server, &pids, signalled);
    assert_eq!(code, NOT_ALL_SAVED, "{}", server.logs());
    eprintln!("read-only data dir, SIGTERM: exit {took:?} after the signal");
    let logs = server.logged("\"shapes_json\":").await;
    let line: Value = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["shapes_json"].is_string())
        .unwrap_or_else(|| panic!("no error line with the shapes: {logs}"));
    assert_eq!(line["level"], "ERROR", "{line}");
    assert_eq!(line["fields"]["room"], "ro-room", "{line}");
    let logged: Value =
        serde_json::from_str(line["fields"]["shapes_json"].as_str().unwrap()).unwrap();
    assert_eq!(logged, seen);
    assert!(!data.join("unsaved").exists());
}

/// A worker killed while the shutdown waits for saves is not replaced (a
/// replacement would only delay the exit), its rooms are named in the log and
/// replayed from the supervisor's journal into fallback files, the other
/// worker's room goes to its own fallback file, and the shutdown completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_during_the_shutdown_is_not_restarted_and_its_rooms_are_kept() {
    let backend = Backend::start().await;
    let (mut server, mut clients) = with_backend(&backend, &["room-a", "room-b"]).await;
    // Both rooms stay unsaved, so the shutdown waits for its saves.
    backend.set_mode(Mode::Hang);
    let mut seen = HashMap::new();
    for (room, client) in ["room-a", "room-b"].into_iter().zip(&mut clients) {
        client.send(rect(1)).await;
        client.send(rect(2)).await;
        let snapshot = client.until(|s| shapes(s).len() == 2).await;
        seen.insert(room, snapshot["shapes"].clone());
    }
    let status = server.status().await;
    let workers = status["workers"].as_array().unwrap();
    let victim = workers[0]["pid"].as_u64().unwrap() as u32;
    let victim_rooms = workers[0]["rooms"].clone();
    let mut pids = server.worker_pids().await;
    pids.push(server.pid());

    let signalled = Instant::now();
    server.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    send_signal(victim, "KILL");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Still draining (the other worker waits for its save): /status answers.
    let status = server.status().await;
    for worker in status["workers"].as_array().unwrap() {
        assert_eq!(worker["restarts"], 0, "{status}");
    }
    assert_eq!(status["workers"][0]["pid"], Value::Null, "{status}");

    for client in clients {
        goes_away(client).await;
    }
    let (code, took) = exit_within_budget(&mut server, &pids, signalled);
    assert_eq!(code, NOT_ALL_SAVED, "{}", server.logs());
    eprintln!("worker killed during the shutdown: exit {took:?} after the signal");
    let logs = server.logged("shutdown: the room's worker was lost").await;
    assert!(!logs.contains("restoring its rooms"), "{logs}");
    let not_replaced = logs
        .lines()
        .find(|l| l.contains("not replaced"))
        .unwrap_or_else(|| panic!("no log of the lost worker: {logs}"));
    let room = victim_rooms[0].as_str().unwrap();
    assert!(not_replaced.contains(room), "{not_replaced}");
    // Nothing only in memory: both rooms' shapes are in fallback files, the
    // lost worker's replayed by the supervisor.
    for (room, shapes) in &seen {
        let files = fallback_files(server.data_dir(), room);
        assert_eq!(files.len(), 1, "{room}: {files:?}\n{logs}");
        assert!(
            files[0].to_string_lossy().ends_with("-unsaved.json"),
            "{files:?}"
        );
        assert_eq!(&fallback_shapes(&files[0]), shapes, "{room}");
    }
    assert!(logs.contains("shutdown: the room's worker was lost; its shapes, replayed from the supervisor's journal, are in the file"), "{logs}");
}

/// While rooms are saved for a shutdown, clients' frames are no longer read:
/// nothing a client sees applied can miss the save. A shape sent during the
/// save is never shown (nor stored); the one sent before is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_new_is_applied_while_rooms_are_saved() {
    let backend = Backend::start().await;
    let (mut server, mut clients) = with_backend(&backend, &["late-room"]).await;
    let mut client = clients.remove(0);
    // The backend is slow: the shutdown's save takes a second.
    backend.set_mode(Mode::Hang);
    client.send(rect(1)).await;
    client.until(|s| shapes(s).len() == 1).await;
    let pids = vec![server.pid()];

    let signalled = Instant::now();
    server.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    backend.set_mode(Mode::Normal);
    client.send(rect(2)).await;
    // The client's last snapshot before the 1001 still has one shape.
    assert_eq!(
        client.closed().await,
        Closed::Frame(1001, "Going Away".into())
    );
    let last: Value = serde_json::from_str(client.last.as_deref().unwrap()).unwrap();
    assert_eq!(shapes(&last).len(), 1, "{last}");
    let (code, _) = exit_within_budget(&mut server, &pids, signalled);
    assert_eq!(code, 0);
    let stored = backend.shapes("late-room").unwrap();
    assert_eq!(stored.as_array().unwrap().len(), 1, "{stored}");
    assert_eq!(stored[0]["x"], 1);
}

/// The log level changes nothing: with `RUST_LOG=warn` the server serves until a
/// signal, then shuts down as usual. (The shutdown's first signal was once awaited
/// inside an `info!` macro, which skips its arguments when the level is off: the
/// server then stopped right after starting.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_log_level_serves_until_the_signal() {
    let mut server = Server::start_raw(
        &["--workers", "1"],
        &[("JWT_SECRET", SECRET), ("RUST_LOG", "warn")],
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut client = server.join("quiet", "room").await;
    client.sync("quiet", 1.0).await;
    let pids = vec![server.pid()];
    let signalled = Instant::now();
    server.signal("TERM");
    goes_away(client).await;
    let (code, _) = exit_within_budget(&mut server, &pids, signalled);
    assert_eq!(code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_readyz_503_new_upgrades_503_then_going_away_and_exits() {
    let backend = Backend::start().await;
    backend.create_board("r1", json!([]));
    let url = backend.url();
    let mut server = Server::start_raw(
        &[
            "--workers",
            "1",
            "--backend-url",
            url.as_str(),
            "--shutdown-grace-ms",
            "1500",
        ],
        &[
            ("JWT_SECRET", SECRET),
            ("SESSION_SERVER_SECRET", BACKEND_SECRET),
        ],
    );
    let mut alice = server.join("alice", "r1").await;
    // A hung backend keeps the drain busy for the whole grace period.
    backend.set_mode(Mode::Hang);
    alice
        .send(json!({"type":"shape_create","shapeType":"oval","x":1,"y":0,"width":1,"height":1}))
        .await;
    alice.until(|s| shapes(s).len() == 1).await;
    assert_eq!(server.get("/readyz").await.0, 200);
    let signalled = Instant::now();
    server.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.get("/readyz").await, (503, "draining\n".to_owned()));
    assert_eq!(server.raw_upgrade(&server.token("late", "r2")).await.0, 503);
    assert_eq!(
        alice.closed().await,
        Closed::Frame(1001, "Going Away".into())
    );
    let code = tokio::task::block_in_place(|| server.wait_exit(PATIENCE));
    assert_eq!(code, Some(NOT_ALL_SAVED));
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "exit within the grace period"
    );
    server.logged("some rooms could not be saved").await;
}

/// The supervisor run inside the test's own process, its workers being the
/// server's binary (`WorkerProgram::Binary`): it serves a client, and a stop
/// through its `Shutdown` handle goes through every phase, saves the room,
/// closes the client with 1001 and returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervisor_run_in_process_serves_and_stops_through_its_phases() {
    use clap::Parser;
    use contract::config::{Cli, Host, Secret};
    use supervisor::WorkerProgram;
    use supervisor::{Phase, Shutdown};

    let data = temp_dir("in-process");
    let args = [
        "session-server",
        "--workers",
        "1",
        "--persist-debounce-ms",
        "100",
    ];
    let mut cli = Cli::try_parse_from(args).unwrap();
    cli.serve.jwt_secret = Some(Secret(SECRET.into()));
    cli.serve.data_dir = data.to_path_buf();
    cli.serve.backend_url = None;
    let config = cli.serve.validate(&Host::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let shutdown = Shutdown::new(config.shutdown_grace);
    let program = WorkerProgram::Binary(env!("CARGO_BIN_EXE_session-server").into());
    let server = tokio::spawn(supervisor::run(config, listener, shutdown.clone(), program));

    let token = sign(json!({"userId": "alice", "roomId": "inside", "host": host, "iat": now()}));
    let mut alice = Client::connect_to(&format!("ws://{host}/?token={token}")).await;
    alice.next_snapshot().await;
    alice.send(rect(1)).await;
    alice.until(|s| shapes(s).len() == 1).await;
    assert_eq!(shutdown.phase(), Phase::Running);

    shutdown.stop();
    assert!(
        matches!(alice.closed().await, Closed::Frame(1001, _)),
        "clients are closed with 1001"
    );
    let outcome = tokio::time::timeout(KILL_AFTER, server)
        .await
        .expect("run returns within the grace")
        .unwrap()
        .expect("run ends without an error");
    assert_eq!(outcome, supervisor::StopOutcome::EverythingSaved);
    assert_eq!(shutdown.phase(), Phase::Stopped);
    let store = rusqlite::Connection::open(data.join("boards.sqlite3")).unwrap();
    let saved: String = store
        .query_row(
            "SELECT shapes FROM boards WHERE room_id = 'inside'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    let saved: Value = serde_json::from_str(&saved).unwrap();
    assert_eq!(saved.as_array().map(Vec::len), Some(1), "{saved}");
}
