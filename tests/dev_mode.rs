//! Dev mode (`--dev`): the board page, `/dev/token` and the open monitor, only in
//! dev mode and only on loopback when a real secret is set.

use crate::support::*;

#[tokio::test]
async fn dev_endpoints_exist_only_in_dev_mode() {
    // No ADMIN_TOKEN (an empty one is none): the monitor is off.
    let server = Server::start_raw(
        &["--workers", "2"],
        &[("JWT_SECRET", SECRET), ("ADMIN_TOKEN", "")],
    );
    assert_eq!(server.get("/dev/token?userId=a&roomId=r").await.0, 404);
    assert_eq!(server.get("/admin/rooms").await.0, 404);
    assert_eq!(server.get("/admin").await.0, 404);
    assert_eq!(server.get("/").await.0, 426);

    let dev = Server::start_raw(&["--dev", "--workers", "1"], &[]);
    let (code, page) = dev.get("/").await;
    assert_eq!(code, 200);
    assert!(page.contains("<svg id=\"board\""));
    // The TypeScript client, in the page's import map.
    assert!(page.contains("\"session-client\": \"data:text/javascript;base64,"));
    let (code, body) = dev.get("/dev/token?userId=alice&roomId=r1").await;
    assert_eq!(code, 200);
    let token: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut client = dev
        .connect(&dev.url(token["token"].as_str().unwrap()))
        .await;
    assert_eq!(users(&client.next_snapshot().await), ["alice"]);
    assert_eq!(dev.get("/dev/token?userId=&roomId=r1").await.0, 400);
    let (code, body) = dev.get("/admin/rooms").await;
    assert_eq!(code, 200);
    let monitor: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(monitor["rooms"][0]["room"], "r1");
    assert_eq!(monitor["rooms"][0]["connections"], 1);
    assert_eq!(monitor["connections"], 1);
    // Printed after the listening line, which is all the harness waits for.
    eventually(PATIENCE, "the dev-mode banner", || async {
        dev.logs()
            .contains("Dev mode: open http://localhost:")
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn dev_mode_listens_on_loopback_and_says_what_it_exposes() {
    // No --bind: the harness passes one, so start the binary by hand.
    let data = temp_dir("dev-bind");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_session-server"))
        .args(["--port", "0", "--dev", "--workers", "1"])
        .args(["--data-dir", data.to_str().unwrap()])
        .env_remove("JWT_SECRET")
        .env_remove("BIND_ADDRESS")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .take(50)
            .scan(false, |seen, line| {
                // Up to and including the line about what dev mode exposes.
                let done = *seen;
                *seen = line.contains("Dev mode exposes");
                (!done).then_some(line)
            })
            .collect::<Vec<_>>()
    });
    let lines = tokio::time::timeout(PATIENCE, lines)
        .await
        .unwrap()
        .unwrap();
    send_signal(pid, "KILL");
    let _ = child.wait();
    let all = lines.join("\n");
    assert!(all.contains("Dev mode exposes, on 127.0.0.1:"), "{all}");
    assert!(
        all.contains("/dev/token mints tokens for any user"),
        "{all}"
    );
}

#[test]
fn dev_mode_with_a_real_secret_refuses_a_public_address() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_session-server"))
        .args(["--port", "0", "--dev", "--bind", "0.0.0.0"])
        .env("JWT_SECRET", "a-real-production-secret")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("dev mode with JWT_SECRET set listens only on loopback"),
        "{stderr}"
    );
    assert!(!stderr.contains("a-real-production-secret"), "{stderr}");
}

/// `/dev/token` answers only a page on a loopback name: a foreign `Host` (a
/// DNS-rebinding page whose name now points at 127.0.0.1) or a foreign
/// `Origin` gets 403; a token it mints carries the dev claim, which a server
/// not in dev mode refuses with 401 (`auth_failures_total{reason="dev_token"}`),
/// even with the same secret.
#[tokio::test]
async fn dev_tokens_are_for_loopback_pages_and_never_open_a_production_room() {
    let secret_env = [("JWT_SECRET", SECRET)];
    let dev = Server::start_raw(&["--dev", "--workers", "1"], &secret_env);
    let path = "/dev/token?userId=admin&roomId=victim";
    let port = dev.port;
    let rebinding = format!("rebind.attacker.example:{port}");
    assert_eq!(dev.get_for_host(&rebinding, path, &[]).await.0, 403);
    let attacker_page = [("Origin", "http://rebind.attacker.example")];
    assert_eq!(dev.get_with(path, &attacker_page).await.0, 403);
    assert_eq!(dev.get_with(path, &[("Origin", "null")]).await.0, 403);
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ] {
        let origin = format!("http://{host}");
        let (code, _) = dev.get_for_host(&host, path, &[("Origin", &origin)]).await;
        assert_eq!(code, 200, "{host}");
    }
    let (code, body) = dev.get(path).await;
    assert_eq!(code, 200);
    let token: serde_json::Value = serde_json::from_str(&body).unwrap();
    let token = token["token"].as_str().unwrap().to_owned();
    // The dev server takes its own token.
    let mut admin = dev.connect(&dev.url(&token)).await;
    assert_eq!(users(&admin.next_snapshot().await), ["admin"]);

    // A production server with the same secret: the same claims, re-signed for
    // its host, still carry the dev claim, and are refused.
    let production = Server::start_raw(&["--workers", "1"], &secret_env);
    let claims = serde_json::json!({"userId": "admin", "roomId": "victim",
        "host": production.host(), "iat": now(), "dev": true});
    assert_eq!(production.raw_upgrade(&sign(claims)).await.0, 401);
    let failures = metrics(&production).await;
    assert_eq!(
        failures.get("session_server_auth_failures_total{reason=\"dev_token\"}"),
        Some(&1.0),
        "{failures:?}"
    );
    let plain = serde_json::json!({"userId": "admin", "roomId": "victim",
        "host": production.host(), "iat": now()});
    assert_eq!(production.raw_upgrade(&sign(plain)).await.0, 101);
}
