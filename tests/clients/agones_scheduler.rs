//! The backend's Agones scheduler (`clients/agones-scheduler`, issue 26):
//! `npm test` there builds it with tsc and runs node's test runner against a
//! fake Agones allocator that evaluates the allocation's selectors as Agones
//! does, over real mutual TLS (throwaway certificates made with `openssl`).
//! Needs node, openssl and `npm ci --prefix clients/agones-scheduler`, which
//! `.ci/run` installs; run it with
//! `cargo test --test server clients::agones_scheduler -- --include-ignored`.

use std::process::Command;

#[test]
#[ignore = "needs node, openssl and clients/agones-scheduler/node_modules (installed by .ci/run)"]
fn the_agones_scheduler_passes_its_tests_against_a_fake_allocator() {
    let output = Command::new("npm")
        .args(["test", "--prefix"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/clients/agones-scheduler"
        ))
        .output()
        .expect("npm runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "npm test --prefix clients/agones-scheduler failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("ℹ fail 0"), "{stdout}");
    assert!(!stdout.contains("ℹ pass 0"), "{stdout}");
    eprintln!("{stdout}");
}
