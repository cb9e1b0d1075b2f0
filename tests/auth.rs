//! Who may connect: the token in the upgrade request (PROTOCOL.md §1) checked
//! before the upgrade, every refusal counted by its reason and kept out of the
//! logs, and the secrets the check needs at start-up.

use serde_json::json;

use crate::util::*;

#[tokio::test]
async fn token_is_found_among_other_query_parameters() {
    let server = Server::start(&[]);
    let token = server.token("alice", "r1");
    let url = format!("ws://{}/?v=1&token={token}&x=2", server.host());
    let mut alice = server.connect(&url).await;
    assert_eq!(users(&alice.next_snapshot().await), ["alice"]);
}

#[tokio::test]
async fn bad_tokens_are_refused_with_401_before_the_upgrade() {
    let server = Server::start(&[]);
    let host = server.host();
    let good = server.token("alice", "r1");
    let mut tampered = good.clone();
    tampered.pop();
    tampered.push(if good.ends_with('A') { 'B' } else { 'A' });
    let cases: Vec<(&str, String)> = vec![
        ("bad signature", tampered),
        (
            "wrong secret",
            sign_with(
                json!({"userId":"a","roomId":"r1","host":host}),
                "not-the-secret",
            ),
        ),
        (
            // {"alg":"none","typ":"JWT"}.{"userId":"a","roomId":"r1"}.
            "alg none",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJ1c2VySWQiOiJhIiwicm9vbUlkIjoicjEifQ.".into(),
        ),
        (
            "expired",
            sign(json!({"userId":"a","roomId":"r1","host":host,"exp":now() - 3600})),
        ),
        (
            "not yet valid",
            sign(json!({"userId":"a","roomId":"r1","host":host,"nbf":now() + 3600})),
        ),
        (
            "wrong host",
            sign(json!({"userId":"a","roomId":"r1","host":"other.example:8000"})),
        ),
        ("missing host", sign(json!({"userId":"a","roomId":"r1"}))),
        ("missing userId", sign(json!({"roomId":"r1","host":host}))),
        ("missing roomId", sign(json!({"userId":"a","host":host}))),
        ("not a JWT", "hello".into()),
    ];
    for (what, token) in &cases {
        let status = server.try_connect(&server.url(token)).await.err();
        assert_eq!(status, Some(401), "{what}");
    }
    let no_token = format!("ws://{host}/");
    assert_eq!(
        server.try_connect(&no_token).await.err(),
        Some(401),
        "no token"
    );
    // Tokens never reach the logs.
    let logs = server.logs();
    for (what, token) in &cases {
        let signature = token.rsplit('.').next().unwrap();
        if signature.len() > 8 {
            assert!(!logs.contains(signature), "{what}: token in logs");
        }
    }
    assert!(logs.contains("connection refused (401)"));
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

#[tokio::test]
async fn every_bad_token_is_refused_before_the_upgrade_and_counted_by_reason() {
    let server = Server::start(&[]);
    let host = server.host();
    let cases = [
        (
            "bad_signature",
            sign_with(
                json!({"userId":"a","roomId":"r","host":host}),
                "some-other-long-secret",
            ),
        ),
        (
            "expired",
            sign(json!({"userId":"a","roomId":"r","host":host,"exp":now() - 3600})),
        ),
        (
            "not_yet_valid",
            sign(json!({"userId":"a","roomId":"r","host":host,"nbf":now() + 3600})),
        ),
        (
            "wrong_host",
            sign(json!({"userId":"a","roomId":"r","host":"evil:1"})),
        ),
        ("malformed", sign(json!({"roomId":"r","host":host}))),
        (
            "bad_claims",
            sign(json!({"userId":"a".repeat(200),"roomId":"r","host":host})),
        ),
        ("malformed", "e30.e30.e30".to_owned()),
        ("too_large", "a".repeat(5000)),
    ];
    for (_, token) in &cases {
        assert_eq!(
            server.try_connect(&server.url(token)).await.err(),
            Some(401)
        );
    }
    let (_, body) = server.get("/metrics").await;
    let m = parse_metrics(&body);
    let count = |reason: &str| {
        m.get(&format!(
            "session_server_auth_failures_total{{reason=\"{reason}\"}}"
        ))
        .copied()
    };
    assert_eq!(count("bad_signature"), Some(1.0));
    assert_eq!(count("expired"), Some(1.0));
    assert_eq!(count("not_yet_valid"), Some(1.0));
    assert_eq!(count("wrong_host"), Some(1.0));
    assert_eq!(count("bad_claims"), Some(1.0));
    assert_eq!(count("malformed"), Some(2.0));
    assert_eq!(count("too_large"), Some(1.0));
    assert!(!server.logs().contains(&"a".repeat(5000)));
    still_serves(&server, "r").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_ids_that_are_path_segments_are_refused_before_the_backend() {
    let backend = crate::util::backend::Backend::start().await;
    let url = backend.url();
    let server = Server::start_raw(
        &["--workers", "1", "--backend-url", url.as_str()],
        &[
            ("JWT_SECRET", SECRET),
            (
                "SESSION_SERVER_SECRET",
                crate::util::backend::BACKEND_SECRET,
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
