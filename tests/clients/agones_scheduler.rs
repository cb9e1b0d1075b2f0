//! The backend's Agones scheduler (`clients/agones-scheduler`, issue 26):
//! `npm test` there builds it with tsc and runs node's test runner against a
//! fake Agones allocator that evaluates the allocation's selectors as Agones
//! does, over real mutual TLS (throwaway certificates made with `openssl`).
//! Needs node, openssl and `npm ci --prefix clients/agones-scheduler`, which
//! `.ci/run` installs; run it with
//! `cargo test --test server clients::agones_scheduler -- --include-ignored`.

#[test]
#[ignore = "needs node, openssl and clients/agones-scheduler/node_modules (installed by .ci/run)"]
fn the_agones_scheduler_passes_its_tests_against_a_fake_allocator() {
    super::npm_test("agones-scheduler", &[]);
}
