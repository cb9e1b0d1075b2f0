//! Memory the configuration promises: in a memory cgroup (as a container's
//! limit), the server reads the limit as its budget and refuses new rooms
//! before the kernel's OOM killer acts; and when the OOM killer does act (the
//! budget turned off), it takes a worker, never the supervisor: the worker is
//! replaced and its rooms come back with their boards, nobody disconnected.
//!
//! The tests make their own cgroup (v1 `memory.limit_in_bytes`, or v2
//! `memory.max`), which needs root; elsewhere they are skipped with the reason
//! printed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::*;

/// Rooms seeded with a full board of big shapes (~10 MB each): more than the
/// limits below can hold.
const ROOMS: usize = 12;
const BIG_SHAPES: usize = 1000;
const TEXT_CHARS: usize = 10_000;
/// The two tests here fill memory on purpose: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// How long the OOM-killed worker's rooms may take to come back.
const RESTORED_WITHIN: Duration = Duration::from_secs(60);

/// A memory cgroup made for one test, removed (once its processes are gone)
/// when dropped.
struct MemoryCgroup {
    dir: PathBuf,
    /// The file holding the limit (`memory.limit_in_bytes` or `memory.max`).
    limit_file: &'static str,
}

impl MemoryCgroup {
    /// A new cgroup limited to `limit` bytes, or `None` (reason printed) where
    /// this process cannot make one.
    fn create(what: &str, limit: u64) -> Option<MemoryCgroup> {
        let name = format!(
            "session-server-test-{what}-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let v2 = Path::new("/sys/fs/cgroup");
        let v2_has_memory = std::fs::read_to_string(v2.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
        let (dir, limit_file) = if v1.join("memory.limit_in_bytes").exists() {
            (v1.join(&name), "memory.limit_in_bytes")
        } else if v2_has_memory {
            let _ = std::fs::write(v2.join("cgroup.subtree_control"), "+memory");
            (v2.join(&name), "memory.max")
        } else {
            eprintln!("skipped: no cgroup memory controller here (neither v1 nor v2)");
            return None;
        };
        if let Err(e) = std::fs::create_dir(&dir) {
            eprintln!(
                "skipped: cannot create a memory cgroup ({}: {e}); the test needs root",
                dir.display()
            );
            return None;
        }
        let cgroup = MemoryCgroup { dir, limit_file };
        cgroup.set_limit(limit);
        // No swap to hide the limit behind (v1 counts it separately).
        let _ = std::fs::write(cgroup.dir.join("memory.swap.max"), "0");
        let _ = std::fs::write(
            cgroup.dir.join("memory.memsw.limit_in_bytes"),
            limit.to_string(),
        );
        Some(cgroup)
    }

    fn set_limit(&self, limit: u64) {
        // v1 refuses a memory limit above the memory+swap one: raise that first.
        let _ = std::fs::write(
            self.dir.join("memory.memsw.limit_in_bytes"),
            limit.to_string(),
        );
        std::fs::write(self.dir.join(self.limit_file), limit.to_string()).unwrap();
        let _ = std::fs::write(
            self.dir.join("memory.memsw.limit_in_bytes"),
            limit.to_string(),
        );
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Its processes were killed with the server; workers exit within a second.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A data folder holding [`ROOMS`] full boards, rooms `big-0`….
fn seeded_data() -> TempDir {
    let data = temp_dir("memory");
    let board = big_board(BIG_SHAPES, TEXT_CHARS).to_string();
    for i in 0..ROOMS {
        seed_store(&data, &format!("big-{i}"), &board);
    }
    data
}

/// Whether a snapshot holds the whole seeded board.
fn is_full_board(text: &str) -> bool {
    let snapshot: serde_json::Value = serde_json::from_str(text).unwrap();
    shapes(&snapshot).len() == BIG_SHAPES
}

/// Restarts of every worker slot, from `/status`.
async fn restarts(server: &Server) -> u64 {
    server.status().await["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["restarts"].as_u64().unwrap())
        .sum()
}

/// With the cgroup's limit as its budget, the server admits full rooms until
/// the budget is nearly spent, then refuses the next room with a 503 (counted
/// as `memory`), and nothing is killed: no worker restarts, the supervisor
/// serves on, every member admitted keeps its room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filling_rooms_to_the_memory_limit_refuses_new_rooms_and_kills_nothing() {
    const LIMIT: u64 = 400 << 20;
    let _alone = ONE_AT_A_TIME.lock().await;
    let Some(cgroup) = MemoryCgroup::create("budget", LIMIT) else {
        return;
    };
    let data = seeded_data();
    let server = Server::start_in_cgroup(
        &cgroup.procs(),
        &["--workers", "2", "--data-dir", data.to_str().unwrap()],
        &[("JWT_SECRET", SECRET)],
    );
    assert_eq!(
        metric(&server, "session_server_memory_limit_bytes").await,
        LIMIT as f64,
        "the budget is the cgroup's limit"
    );
    let mut members = Vec::new();
    let mut refused = None;
    for i in 0..ROOMS {
        let room = format!("big-{i}");
        match server
            .try_connect(&server.url(&server.token(&format!("u{i}"), &room)))
            .await
        {
            Ok(mut member) => {
                assert_eq!(shapes(&member.next_snapshot().await).len(), BIG_SHAPES);
                members.push((format!("u{i}"), member));
            }
            Err(status) => {
                assert_eq!(status, 503, "{}", server.logs());
                refused = Some(i);
                break;
            }
        }
        // The budget is a gauge sampled every 250 ms: rooms opened faster
        // than that could overshoot it (a real server fills over minutes).
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let resident = metric(&server, "session_server_memory_resident_bytes").await;
    eprintln!(
        "memory budget {} MiB: {} full rooms admitted, then refused; resident {:.0} MiB",
        LIMIT >> 20,
        members.len(),
        resident / (1 << 20) as f64
    );
    assert!(refused.is_some(), "every room admitted: {}", server.logs());
    assert!(!members.is_empty());
    assert!(
        metrics(&server).await["session_server_connections_rejected_total{reason=\"memory\"}"]
            >= 1.0
    );
    assert_eq!(
        restarts(&server).await,
        0,
        "nothing was OOM-killed: {}",
        server.logs()
    );
    for (i, (user, member)) in members.iter_mut().enumerate() {
        assert_eq!(users(&member.sync(user, i as f64).await), [user.as_str()]);
    }
    server.logged("memory budget nearly spent").await;
}

/// With the budget off, filling rooms past the cgroup's limit makes the
/// kernel's OOM killer act: it takes a worker (they raise their
/// `oom_score_adj`), never the supervisor. Once the limit is raised, the
/// worker's replacement holds its rooms again, with their boards, and no
/// member was disconnected or closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oom_killer_takes_a_worker_whose_rooms_come_back() {
    const LIMIT: u64 = 300 << 20;
    let _alone = ONE_AT_A_TIME.lock().await;
    let Some(cgroup) = MemoryCgroup::create("oom", LIMIT) else {
        return;
    };
    let data = seeded_data();
    let server = Server::start_in_cgroup(
        &cgroup.procs(),
        &[
            "--workers",
            "2",
            "--data-dir",
            data.to_str().unwrap(),
            "--memory-limit",
            "0",
        ],
        &[("JWT_SECRET", SECRET)],
    );
    for pid in server.worker_pids().await {
        let adj = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
        assert_eq!(adj.trim(), "1000", "worker {pid}");
    }
    let supervisor_adj =
        std::fs::read_to_string(format!("/proc/{}/oom_score_adj", server.pid())).unwrap();
    assert_ne!(supervisor_adj.trim(), "1000");

    let mut members = Vec::new();
    for i in 0..ROOMS {
        let room = format!("big-{i}");
        let mut member = server
            .connect(&server.url(&server.token(&format!("u{i}"), &room)))
            .await;
        // The board, or nothing yet if its worker was killed meanwhile (it
        // comes with the restore).
        let board = member.next_text_within(Duration::from_secs(3)).await;
        members.push((member, board.is_some_and(|text| is_full_board(&text))));
        if restarts(&server).await > 0 {
            break;
        }
    }
    let killed = restarts(&server).await;
    // Room to breathe: the replacement restores everything.
    cgroup.set_limit(LIMIT * 8);
    assert!(
        killed > 0,
        "{} full rooms fit in {} MiB: nothing was OOM-killed",
        members.len(),
        LIMIT >> 20
    );
    assert!(process_exists(server.pid()), "the supervisor was killed");
    eprintln!(
        "OOM killer: {killed} worker(s) killed after {} full rooms in {} MiB; the supervisor lived",
        members.len(),
        LIMIT >> 20
    );
    // Restoring full boards near the limit takes seconds (longer in a debug
    // build): every member still without its board reads until it comes, all
    // at once (a member not read for 20 s would be dropped as a slow reader).
    let waits = members
        .iter_mut()
        .enumerate()
        .filter(|(_, (_, has))| !has)
        .map(|(i, (member, _))| async move {
            let deadline = Instant::now() + RESTORED_WITHIN;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match member.next_text_within(left).await {
                    Some(text) if is_full_board(&text) => return None,
                    Some(_) => continue,
                    None => return Some(i),
                }
            }
        });
    let missing: Vec<usize> = futures_util::future::join_all(waits)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert!(
        missing.is_empty(),
        "boards not back in {RESTORED_WITHIN:?} for members {missing:?}:\n{}",
        server.logs()
    );
    let logs = server.logged("SIGKILL").await;
    assert!(!logs.contains("room closed for its members"), "{logs}");
    assert!(!logs.contains("attributed to a room"), "{logs}");
}
