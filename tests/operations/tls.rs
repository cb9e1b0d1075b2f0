//! Native TLS: `wss://` and HTTPS on the server's one port, with a throwaway CA
//! made at run time. Certificates rotate when their files change; bad files stop
//! start-up with a clear line; a bad replacement keeps the old certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// A certificate authority the test clients trust.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

fn ca() -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        issuer: Issuer::new(params, key),
        der: cert.der().clone(),
    }
}

/// A certificate for `localhost` and 127.0.0.1, signed by `ca`: (cert PEM, key
/// PEM, cert DER).
fn leaf(ca: &Ca, expired: bool) -> (String, String, CertificateDer<'static>) {
    let mut params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    if expired {
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().clone())
}

fn write_pair(dir: &Path, cert: &str, key: &str) -> (PathBuf, PathBuf) {
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    (cert_path, key_path)
}

fn tls_server(cert: &Path, key: &Path) -> Server {
    Server::start_raw(
        &[
            "--workers",
            "1",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--tls-reload-check-ms",
            "100",
        ],
        &[("JWT_SECRET", SECRET)],
    )
}

/// A TLS connection to the server, trusting only `ca`.
async fn tls_connect(port: u16, ca: &Ca) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The certificate the server presents to a new handshake.
async fn served_certificate(port: u16, ca: &Ca) -> CertificateDer<'static> {
    let tls = tls_connect(port, ca).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// A GET over TLS (with the harness's admin token); returns status and body.
async fn https_get(port: u16, ca: &Ca, path: &str) -> (u16, String) {
    let mut tls = tls_connect(port, ca).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\nAuthorization: Bearer {HARNESS_ADMIN_TOKEN}\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, tls.read_to_end(&mut response)).await;
    let response = String::from_utf8_lossy(&response).into_owned();
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (response[9..12].parse().unwrap(), body)
}

async fn wss_join(
    port: u16,
    ca: &Ca,
    user: &str,
    room: &str,
) -> WebSocketStream<TlsStream<TcpStream>> {
    let host = format!("localhost:{port}");
    let token = sign(json!({"userId": user, "roomId": room, "host": host}));
    let tls = tls_connect(port, ca).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(format!("wss://{host}/?token={token}"), tls)
        .await
        .unwrap();
    ws
}

async fn next_snapshot<S>(ws: &mut WebSocketStream<S>) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match tokio::time::timeout(PATIENCE, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(_)) => {}
            other => panic!("connection ended: {other:?}"),
        }
    }
}

/// Draws a shape and moves the cursor; returns the snapshot showing both,
/// without the server-chosen id and timestamps.
async fn script<S>(ws: &mut WebSocketStream<S>) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let create = json!({"type":"shape_create","shapeType":"oval","x":1,"y":2,"width":3,"height":4,"text":"hi"});
    ws.send(Message::text(create.to_string())).await.unwrap();
    ws.send(Message::text(
        json!({"type":"cursor_move","x":5,"y":6}).to_string(),
    ))
    .await
    .unwrap();
    loop {
        let mut snap = next_snapshot(ws).await;
        if !snap["cursors"].as_array().unwrap().is_empty() && !shapes(&snap).is_empty() {
            for shape in snap["shapes"].as_array_mut().unwrap() {
                shape.as_object_mut().unwrap().remove("id");
                shape.as_object_mut().unwrap().remove("timestamp");
            }
            for cursor in snap["cursors"].as_array_mut().unwrap() {
                cursor.as_object_mut().unwrap().remove("timestamp");
            }
            return snap;
        }
    }
}

#[tokio::test]
async fn a_wss_client_gets_the_same_snapshots_as_a_ws_client() {
    let ca = ca();
    let dir = temp_dir("tls");
    let (cert, key, _) = leaf(&ca, false);
    let (cert_path, key_path) = write_pair(&dir, &cert, &key);
    let tls = tls_server(&cert_path, &key_path);
    let plain = Server::start(&[]);

    let mut over_tls = wss_join(tls.port, &ca, "alice", "r").await;
    next_snapshot(&mut over_tls).await;
    let tls_snapshot = script(&mut over_tls).await;
    let plain_url = plain.url(&plain.token("bob", "r2"));
    let (mut ws, _) = tokio_tungstenite::connect_async(plain_url).await.unwrap();
    next_snapshot(&mut ws).await;
    let mut plain_snapshot = script(&mut ws).await;
    // Same content but for who drew it.
    plain_snapshot["connectedUsers"] = json!(["alice"]);
    for item in ["shapes", "cursors"] {
        for entry in plain_snapshot[item].as_array_mut().unwrap() {
            entry["userId"] = json!("alice");
        }
    }
    assert_eq!(tls_snapshot, plain_snapshot);
    // Health answers on the same port, over TLS.
    assert_eq!(
        https_get(tls.port, &ca, "/healthz").await,
        (200, "ok\n".into())
    );
}

/// permessage-deflate works over TLS as over plain TCP: compressed snapshots
/// out, a compressed message in.
#[tokio::test]
async fn a_wss_client_compresses_both_ways() {
    use crate::support::raw::RawClient;
    let ca = ca();
    let dir = temp_dir("tls");
    let (cert, key, _) = leaf(&ca, false);
    let (cert_path, key_path) = write_pair(&dir, &cert, &key);
    let server = tls_server(&cert_path, &key_path);
    let host = format!("localhost:{}", server.port);
    let token = sign(json!({"userId": "zoe", "roomId": "z", "host": host}));
    let tls = tls_connect(server.port, &ca).await.unwrap();
    let offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
    let mut zoe = RawClient::upgrade(tls, &host, &token, offer).await;
    assert!(
        zoe.extensions
            .as_deref()
            .unwrap()
            .starts_with("permessage-deflate")
    );
    zoe.next_text_frame().await;
    let text = "雪".repeat(3000);
    let create = json!({"type":"shape_create","shapeType":"text","x":1,"y":1,"width":1,"height":1,"text":text});
    zoe.send_compressed(&create.to_string()).await;
    let frame = zoe.next_text_frame().await;
    assert!(frame.compressed());
    let snap: Value = serde_json::from_str(&frame.text()).unwrap();
    assert_eq!(snap["shapes"][0]["text"], text);
}

#[tokio::test]
async fn the_certificate_rotates_when_its_files_change_and_a_bad_one_is_not_taken() {
    let ca = ca();
    let dir = temp_dir("tls-rotate");
    let (cert_a, key_a, der_a) = leaf(&ca, false);
    let (cert_path, key_path) = write_pair(&dir, &cert_a, &key_a);
    let server = tls_server(&cert_path, &key_path);
    assert_eq!(served_certificate(server.port, &ca).await, der_a);
    let mut open = wss_join(server.port, &ca, "alice", "r").await;
    next_snapshot(&mut open).await;

    // Renewed in place (as a mounted Kubernetes Secret is).
    let (cert_b, key_b, der_b) = leaf(&ca, false);
    write_pair(&dir, &cert_b, &key_b);
    let deadline = Instant::now() + PATIENCE;
    while served_certificate(server.port, &ca).await != der_b {
        assert!(Instant::now() < deadline, "new certificate not served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The connection opened before the swap keeps working.
    open.send(Message::text(
        json!({"type":"cursor_move","x":7,"y":8}).to_string(),
    ))
    .await
    .unwrap();
    loop {
        let snap = next_snapshot(&mut open).await;
        if snap["cursors"][0]["x"] == 7 {
            break;
        }
    }

    // A bad replacement (a key that does not match) is refused; B stays.
    let (_, key_c, _) = leaf(&ca, false);
    std::fs::write(&key_path, key_c).unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, metrics) = https_get(server.port, &ca, "/metrics").await;
        if metrics.contains("session_server_tls_reloads_total{result=\"failed\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bad pair not noticed:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(served_certificate(server.port, &ca).await, der_b);
    server
        .logged("cannot be used; keeping the previous certificate")
        .await;
}

/// Plain HTTP to the TLS port (an `http://` or `ws://` URL) gets a short 400
/// saying that the port speaks TLS, as nginx answers, and is counted.
#[tokio::test]
async fn plain_http_to_the_tls_port_gets_a_400_saying_so_and_is_counted() {
    let ca = ca();
    let dir = temp_dir("tls-plain");
    let (cert, key, _) = leaf(&ca, false);
    let (cert_path, key_path) = write_pair(&dir, &cert, &key);
    let server = tls_server(&cert_path, &key_path);
    let mut tcp = TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(answer.contains("This port speaks TLS"), "{answer}");
    let (_, metrics) = https_get(server.port, &ca, "/metrics").await;
    assert!(
        metrics.contains("session_server_tls_handshake_failures_total{reason=\"not_tls\"} 1"),
        "{metrics}"
    );
}

#[test]
fn unusable_tls_files_stop_start_up_naming_the_file() {
    let ca = ca();
    let dir = temp_dir("tls-bad");
    let (cert, key, _) = leaf(&ca, false);
    let (_, other_key, _) = leaf(&ca, false);
    let (expired, expired_key, _) = leaf(&ca, true);
    let start = |cert: &str, key: &str| {
        let cert_path = dir.join(format!("{}.crt", cert.len()));
        std::fs::write(&cert_path, cert).unwrap();
        let key_path = dir.join(format!("{}.key", key.len()));
        std::fs::write(&key_path, key).unwrap();
        run_with(&cert_path, &key_path)
    };
    let run = |cert: &Path, key: &Path| run_with(cert, key);
    let (code, err) = run(&dir.join("missing.crt"), &dir.join("missing.key"));
    assert_eq!(code, Some(2));
    assert!(err.contains("missing.crt"), "{err}");
    let (code, err) = start(&cert, &other_key);
    assert_eq!(code, Some(2));
    assert!(err.contains("does not match the certificate"), "{err}");
    let (code, err) = start(&expired, &expired_key);
    assert_eq!(code, Some(2));
    assert!(err.contains("expired"), "{err}");
    let (code, err) = start("not a certificate", &key);
    assert_eq!(code, Some(2));
    assert!(err.contains("no PEM certificate"), "{err}");
}

fn run_with(cert: &Path, key: &Path) -> (Option<i32>, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_session-server"))
        .args(["--port", "0", "--bind", "127.0.0.1"])
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .env("JWT_SECRET", SECRET)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
