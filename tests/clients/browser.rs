//! The dev board in a real browser (issue 8): Debian's chromium driven by
//! playwright-core (`tests/browser/board.mjs`). The board connects with the
//! TypeScript client (`clients/typescript`) over protocol v2, falling back to v1
//! (`?protocol=v1` forces v1); the browser test ends by checking that the pages
//! speak v2, which fails until the server speaks it (PROTOCOL-v2.md). Needs `chromium` and
//! `npm ci --prefix tests/browser`, which `.ci/run` installs; run it with
//! `cargo test --test server clients::browser -- --include-ignored`. Screenshots are kept in
//! `target/browser-artifacts/`.

use std::process::Command;

use crate::support::*;

/// Where the scripts keep their screenshots.
const ARTIFACTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/browser-artifacts");

/// Runs `tests/browser/<script>` (playwright-core driving chromium) against the
/// dev server `server`; returns what it printed, after checking it passed.
fn run_script(script: &str, server: &Server, pass: &str) -> String {
    run_node(script, &format!("http://127.0.0.1:{}", server.port), pass)
}

/// Runs `node tests/browser/<script> <first> <artifacts>`; returns what it
/// printed, after checking it exited 0 and printed `pass`.
fn run_node(script: &str, first: &str, pass: &str) -> String {
    let output = Command::new("node")
        .arg(format!(
            "{}/tests/browser/{script}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .arg(first)
        .arg(ARTIFACTS)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains(pass), "{stdout}");
    // The steps, with what the page sent (shown with `--nocapture`).
    eprintln!("{stdout}");
    stdout
}

#[test]
#[ignore = "needs chromium and tests/browser/node_modules (installed by .ci/run)"]
fn two_pages_draw_together_and_survive_a_worker_crash() {
    let server = Server::start_raw(&["--dev", "--workers", "2"], &[]);
    run_script("board.mjs", &server, "[browser] pass");
    for shot in [
        "1-bob-sees.png",
        "2-bob-after-crash.png",
        "3-bob-after-drag.png",
    ] {
        let size = std::fs::metadata(format!("{ARTIFACTS}/{shot}"))
            .unwrap()
            .len();
        assert!(size > 1000, "{shot} is {size} bytes");
    }
}

/// The board's v2 path where the real server cannot be made to misbehave:
/// `tests/browser/board-v2-fake.mjs` serves the page this server serves in dev
/// mode with a small v2 room of its own, which loses one batch for one page on
/// purpose (one resync must follow) and answers one token slowly (a double
/// click on Join must make one connection).
#[test]
#[ignore = "needs chromium and tests/browser/node_modules (installed by .ci/run)"]
fn the_board_speaks_v2_to_a_v2_server() {
    let server = Server::start_raw(&["--dev", "--workers", "1"], &[]);
    run_script("board-v2-fake.mjs", &server, "[browser-v2] pass");
}

/// Issue 25: pages using the TypeScript client's drop-in `SessionClient` as the
/// public React client uses its own, while the server is stopped with SIGTERM
/// and started again 3 s later on the same port and data dir
/// (`tests/browser/restart.mjs` runs the server itself): the board is back by
/// itself within 5 s with every shape, `onClose` never called; after `1008` and
/// `4000` the page does not reconnect. Prints the time from the restart to the
/// board (shown with `--nocapture`).
#[test]
#[ignore = "needs chromium and tests/browser/node_modules (installed by .ci/run)"]
fn pages_come_back_by_themselves_after_a_server_restart() {
    run_node("restart.mjs", &server_binary(), "[restart] pass");
}

/// Issue 27: the monitor (`/admin`) while two rooms are driven plots
/// `/admin/history`'s samples (the connections line ends at the live count)
/// and puts the hottest room first, with its sparkline
/// (`tests/browser/monitor.mjs`; screenshot `monitor.png`).
#[test]
#[ignore = "needs chromium and tests/browser/node_modules (installed by .ci/run)"]
fn the_monitor_plots_its_history_and_puts_the_hottest_room_first() {
    let server = Server::start_raw(&["--dev", "--workers", "2"], &[]);
    run_script("monitor.mjs", &server, "[monitor] pass");
    let size = std::fs::metadata(format!("{ARTIFACTS}/monitor.png"))
        .unwrap()
        .len();
    assert!(size > 1000, "monitor.png is {size} bytes");
}

/// permessage-deflate with Node's `ws` (`tests/browser/ws-deflate.mjs`): a
/// client compressing everything it sends and one that does not see the same
/// room byte for byte, and a zip bomb is closed with 1009.
#[test]
#[ignore = "needs node and tests/browser/node_modules (installed by .ci/run)"]
fn node_ws_with_per_message_deflate_sees_the_same_room() {
    let server = Server::start_raw(&["--dev", "--workers", "1"], &[]);
    run_script("ws-deflate.mjs", &server, "[ws-deflate] pass");
}
