//! The TypeScript client (`clients/typescript`, issue 16) against this server:
//! `npm test` there builds it with tsc and runs node's test runner (unit tests of
//! the apply logic, a fake v2 server, and the real binary given by
//! `SESSION_SERVER_BIN`). Needs node and `npm ci --prefix clients/typescript`,
//! which `.ci/run` installs; run it with
//! `cargo test --test server clients::typescript -- --include-ignored`.

use std::process::Command;

#[test]
#[ignore = "needs node and clients/typescript/node_modules (installed by .ci/run)"]
fn the_typescript_client_passes_its_tests_against_this_server() {
    let output = Command::new("npm")
        .args(["test", "--prefix"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/clients/typescript"))
        .env("SESSION_SERVER_BIN", env!("CARGO_BIN_EXE_session-server"))
        .env_remove("JWT_SECRET")
        .output()
        .expect("npm runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "npm test --prefix clients/typescript failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // node's test runner summary: at least one test ran, none failed.
    assert!(stdout.contains("ℹ fail 0"), "{stdout}");
    assert!(!stdout.contains("ℹ pass 0"), "{stdout}");
    eprintln!("{stdout}");
}
