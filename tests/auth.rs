//! Who may connect: the token in the upgrade request (PROTOCOL.md §1) checked
//! before the upgrade, every refusal counted by its reason and kept out of the
//! logs, and the secrets the check needs at start-up.

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn token_is_found_among_other_query_parameters() {
    let server = Server::start(&[]);
    let token = server.token("alice", "r1");
    let url = format!("ws://{}/?v=1&token={token}&x=2", server.host());
    let mut alice = server.connect(&url).await;
    assert_eq!(users(&alice.next_snapshot().await), ["alice"]);
}

/// Every bad token is refused with `401` before the upgrade, counted under its
/// reason and never written to the logs; the server still serves afterwards.
#[tokio::test]
async fn every_bad_token_is_refused_before_the_upgrade_and_counted_by_reason() {
    let server = Server::start(&[]);
    let host = server.host();
    // The signature's first character changed (its last one carries padding
    // bits: changed, it can make bad base64 rather than a wrong signature).
    let good = server.token("alice", "r1");
    let (signed, signature) = good.rsplit_once('.').unwrap();
    let other = if signature.starts_with('A') { 'B' } else { 'A' };
    let tampered = format!("{signed}.{other}{}", &signature[1..]);
    // (what, the reason it is counted under, the token)
    let cases: Vec<(&str, &str, String)> = vec![
        ("bad signature", "bad_signature", tampered),
        (
            "wrong secret",
            "bad_signature",
            sign_with(
                json!({"userId":"a","roomId":"r1","host":host}),
                "not-the-secret",
            ),
        ),
        (
            "another long secret",
            "bad_signature",
            sign_with(
                json!({"userId":"a","roomId":"r","host":host}),
                "some-other-long-secret",
            ),
        ),
        (
            // {"alg":"none","typ":"JWT"}.{"userId":"a","roomId":"r1"}.
            "alg none",
            "malformed",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJ1c2VySWQiOiJhIiwicm9vbUlkIjoicjEifQ.".into(),
        ),
        (
            "expired",
            "expired",
            sign(json!({"userId":"a","roomId":"r1","host":host,"exp":now() - 3600})),
        ),
        (
            "not yet valid",
            "not_yet_valid",
            sign(json!({"userId":"a","roomId":"r1","host":host,"nbf":now() + 3600})),
        ),
        (
            "wrong host",
            "wrong_host",
            sign(json!({"userId":"a","roomId":"r1","host":"other.example:8000"})),
        ),
        (
            "another wrong host",
            "wrong_host",
            sign(json!({"userId":"a","roomId":"r","host":"evil:1"})),
        ),
        (
            "missing host",
            "wrong_host",
            sign(json!({"userId":"a","roomId":"r1"})),
        ),
        (
            "missing userId",
            "malformed",
            sign(json!({"roomId":"r1","host":host})),
        ),
        (
            "missing roomId",
            "malformed",
            sign(json!({"userId":"a","host":host})),
        ),
        (
            "userId too long",
            "bad_claims",
            sign(json!({"userId":"a".repeat(200),"roomId":"r","host":host})),
        ),
        ("not a JWT", "malformed", "hello".into()),
        ("empty parts", "malformed", "e30.e30.e30".to_owned()),
        ("too large", "too_large", "a".repeat(5000)),
    ];
    for (what, _, token) in &cases {
        let status = server.try_connect(&server.url(token)).await.err();
        assert_eq!(status, Some(401), "{what}");
    }
    let no_token = format!("ws://{host}/");
    assert_eq!(
        server.try_connect(&no_token).await.err(),
        Some(401),
        "no token"
    );
    let m = metrics(&server).await;
    let count = |reason: &str| {
        m.get(&format!(
            "session_server_auth_failures_total{{reason=\"{reason}\"}}"
        ))
        .copied()
    };
    let mut expected: std::collections::BTreeMap<&str, f64> = [("missing_token", 1.0)].into();
    for (_, reason, _) in &cases {
        *expected.entry(reason).or_default() += 1.0;
    }
    for (reason, n) in expected {
        assert_eq!(count(reason), Some(n), "{reason}");
    }
    // Tokens never reach the logs.
    let logs = server.logged("connection refused (401)").await;
    for (what, _, token) in &cases {
        let signature = token.rsplit('.').next().unwrap();
        if signature.len() > 8 {
            assert!(!logs.contains(signature), "{what}: token in logs");
        }
    }
    assert!(!logs.contains(&"a".repeat(5000)));
    assert!(logs.contains("connection refused (401)"));
    still_serves(&server, "r").await;
}

#[tokio::test]
async fn expiring_token_still_valid_is_accepted() {
    let server = Server::start(&[]);
    let token = sign(json!({"userId":"a","roomId":"r1","host":server.host(),"exp":now() + 3600}));
    let mut client = server.connect(&server.url(&token)).await;
    assert_eq!(users(&client.next_snapshot().await), ["a"]);
}

#[tokio::test]
async fn host_claim_can_be_made_optional_but_is_still_checked_when_present() {
    let server = Server::start(&["--require-host-claim", "false"]);
    let no_host = sign(json!({"userId":"a","roomId":"r1"}));
    let mut client = server.connect(&server.url(&no_host)).await;
    assert_eq!(users(&client.next_snapshot().await), ["a"]);
    let wrong_host = sign(json!({"userId":"b","roomId":"r1","host":"elsewhere:1"}));
    assert_eq!(
        server.try_connect(&server.url(&wrong_host)).await.err(),
        Some(401)
    );
}

#[test]
fn missing_jwt_secret_stops_start_up_with_one_clear_line() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_session-server"))
        .args(["--port", "0", "--bind", "127.0.0.1"])
        .env_remove("JWT_SECRET")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("JWT_SECRET is required"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_ids_that_are_path_segments_are_refused_before_the_backend() {
    let backend = crate::support::backend::Backend::start().await;
    let url = backend.url();
    let server = Server::start_raw(
        &["--workers", "1", "--backend-url", url.as_str()],
        &[
            ("JWT_SECRET", SECRET),
            (
                "SESSION_SERVER_SECRET",
                crate::support::backend::BACKEND_SECRET,
            ),
        ],
    );
    for room in [".", ".."] {
        let token = server.token("mallory", room);
        assert_eq!(
            server.try_connect(&server.url(&token)).await.err(),
            Some(401)
        );
    }
    assert_eq!(
        metric(
            &server,
            "session_server_auth_failures_total{reason=\"bad_room_id\"}"
        )
        .await,
        2.0
    );
    // A room id with dots inside is an ordinary one.
    let mut fine = server.join("alice", "..a.b..").await;
    fine.sync("alice", 1.0).await;
    let paths: Vec<String> = backend.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/api/boards/by-room/..a.b.."], "{paths:?}");
}

#[test]
fn a_weak_secret_stops_start_up() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_session-server"))
        .args(["--port", "0", "--bind", "127.0.0.1"])
        .env("JWT_SECRET", "short")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("shorter than 16 bytes"));
}
