//! The clients that use this server, against the real binary: the dev board in
//! a real browser, the TypeScript client's own tests, and the load generator;
//! and the backend's Agones scheduler against a fake allocator.

mod agones_scheduler;
mod browser;
mod loadgen;
mod typescript;

use std::process::Command;

/// Runs `npm test` in `clients/<package>` with `env`; returns what it
/// printed, after checking it passed and node's test runner ran at least one
/// test and failed none.
fn npm_test(package: &str, env: &[(&str, &str)]) -> String {
    let dir = format!("{}/clients/{package}", env!("CARGO_MANIFEST_DIR"));
    let output = Command::new("npm")
        .args(["test", "--prefix", &dir])
        .envs(env.iter().copied())
        .env_remove("JWT_SECRET")
        .output()
        .expect("npm runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "npm test --prefix clients/{package} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("ℹ fail 0"), "{stdout}");
    assert!(!stdout.contains("ℹ pass 0"), "{stdout}");
    eprintln!("{stdout}");
    stdout
}
