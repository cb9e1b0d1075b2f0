//! The physical-ceiling server (`loadgen ceiling`) serves the fanout scenario:
//! the load generator against its own reference, no session-server needed. (The
//! scenarios against the real server are smoke-tested by the server's tests,
//! `tests/loadgen.rs`, which run this crate's binary: having a test here is also
//! what makes `cargo test --workspace` build it.)

use serde_json::Value;

/// Runs `loadgen ARGS`; returns its one JSON result.
fn loadgen(args: &[&str]) -> Value {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .env("JWT_SECRET", "loadgen-test-secret-0123456789")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

#[test]
fn the_ceiling_serves_the_fanout_scenario() {
    serves_the_fanout_scenario(&[]);
}

/// With `--hop`, each message goes through the peer process and back before
/// it is applied: the same result, and the peer is the ceiling's child.
#[test]
fn the_ceiling_with_a_process_hop_serves_the_fanout_scenario() {
    serves_the_fanout_scenario(&["--hop"]);
}

/// The ceiling's process, killed (by pid) when the test ends, passed or not
/// (its peer, if any, exits at the end of its socket).
struct Ceiling(std::process::Child);

impl Drop for Ceiling {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serves_the_fanout_scenario(flags: &[&str]) {
    use std::io::{BufRead, BufReader};
    let mut ceiling = Ceiling(
        std::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
            .args(["ceiling", "--port", "0"])
            .args(flags)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(ceiling.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = format!("ws://{}", line.trim().rsplit(' ').next().unwrap());
    let pid = ceiling.0.id().to_string();
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    assert_eq!(
        children.split_whitespace().count(),
        usize::from(!flags.is_empty()),
        "{children:?}"
    );
    let result = loadgen(&[
        "fanout",
        "--url",
        &url,
        "--rooms",
        "1",
        "--members",
        "3",
        "--hz",
        "20",
        "--seconds",
        "1",
        "--shapes",
        "5",
        "--server-pid",
        &pid,
    ]);
    drop(ceiling);
    assert!(result["moves_seen"].as_u64().unwrap() > 0, "{result}");
    assert!(
        result["bytes_per_snapshot"].as_f64().unwrap() > 750.0,
        "{result}"
    );
    assert_eq!(result["final_state_stale_pairs"], 0, "{result}");
}
