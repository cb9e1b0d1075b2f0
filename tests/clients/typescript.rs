//! The TypeScript client (`clients/typescript`, issue 16) against this server:
//! `npm test` there builds it with tsc and runs node's test runner (unit tests of
//! the apply logic, a fake v2 server, and the real binary given by
//! `SESSION_SERVER_BIN`). Needs node and `npm ci --prefix clients/typescript`,
//! which `.ci/run` installs; run it with
//! `cargo test --test server clients::typescript -- --include-ignored`.

#[test]
#[ignore = "needs node and clients/typescript/node_modules (installed by .ci/run)"]
fn the_typescript_client_passes_its_tests_against_this_server() {
    super::npm_test(
        "typescript",
        &[("SESSION_SERVER_BIN", env!("CARGO_BIN_EXE_session-server"))],
    );
}
