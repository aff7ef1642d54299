//! The real `websocket-service` binary: refused settings at start, and SIGTERM.
//!
//! Each test runs the binary with a cleared environment, so only the variables it
//! names reach the service.

use std::time::{Duration, Instant};

use mosaic_tests::binary::{Running, WAIT, assert_refused, manifest_literal};
use mosaic_tests::device::{Device, Ended};
use mosaic_tests::{broker, token};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_websocket-service");

#[tokio::test]
async fn refused_settings_exit_64_with_one_line_naming_them() {
    // No key source at all.
    assert_refused(BIN, &[], "JWT_SECRET").await;

    // An address that does not parse.
    let line = assert_refused(
        BIN,
        &[("JWT_SECRET", token::SECRET), ("LISTEN_ADDR", "nowhere")],
        "LISTEN_ADDR",
    )
    .await;
    assert!(!line.contains(token::SECRET), "secret printed: {line}");

    // A secret under 32 bytes: named, never echoed.
    let short = "short-s3cr3t";
    let line = assert_refused(BIN, &[("JWT_SECRET", short)], "JWT_SECRET").await;
    assert!(!line.contains(short), "secret printed: {line}");
}

#[tokio::test]
async fn sigterm_closes_every_session_with_1001_and_exits_0() {
    let vh = broker().vhost("ws-binary-sigterm").await;
    let service = Running::start(
        BIN,
        &[
            ("AMQP_URL", &vh.amqp_url),
            ("JWT_SECRET", token::SECRET),
            ("SHUTDOWN_GRACE_MS", "5000"),
        ],
    )
    .await;
    let (mut a, _) = Device::connect(service.addr, &token::hs256(Uuid::new_v4(), 3600)).await;
    let (mut b, _) = Device::connect(service.addr, &token::hs256(Uuid::new_v4(), 3600)).await;

    service.terminate();
    // A process that ignored SIGTERM would leave both sessions open: the bounded
    // waits below would fail.
    for d in [&mut a, &mut b] {
        let (_, ended) = d.ended_within(WAIT).await;
        assert!(
            matches!(ended, Ended::Close(1001, _)),
            "expected close 1001, got {ended:?}"
        );
    }
    service.assert_exits_cleanly().await;
}

/// The placeholder `JWT_SECRET` the Kubernetes base publishes is long enough to pass
/// the length check, so before the placeholder rule it started a gateway that accepts
/// tokens anyone can sign.
#[tokio::test]
async fn the_manifests_placeholder_secret_is_refused() {
    let placeholder = manifest_literal("JWT_SECRET");
    assert!(placeholder.len() >= 32, "{placeholder}");
    let line = assert_refused(BIN, &[("JWT_SECRET", &placeholder)], "JWT_SECRET").await;
    assert!(line.contains("placeholder"), "{line}");
    assert!(!line.contains(&placeholder), "secret printed: {line}");
}

/// Values that used to start the service and then overflow (a leeway past the
/// current Unix time panicked the token check), or that bound nothing.
#[tokio::test]
async fn numbers_past_their_range_exit_64() {
    let huge = u64::MAX.to_string();
    for var in [
        "JWT_LEEWAY_SECS",
        "PONG_TIMEOUT_MS",
        "PING_INTERVAL_MS",
        "AUTH_TIMEOUT_MS",
        "PUBLISH_TIMEOUT_MS",
        "SHUTDOWN_GRACE_MS",
        "MAX_CONNECTIONS",
        "MAX_UNAUTHENTICATED",
        "HEADER_READ_TIMEOUT_MS",
        "MAX_HTTP_CONNECTIONS",
    ] {
        assert_refused(BIN, &[("JWT_SECRET", token::SECRET), (var, &huge)], var).await;
    }
}

/// A missing or unusable `JWT_PUBLIC_KEYS` file stops the service with exit 64 and one
/// line, before it binds: the test holds `LISTEN_ADDR` itself, so a service that bound
/// first would exit 1 with "cannot listen" instead.
#[tokio::test]
async fn unusable_public_keys_exit_64_before_binding() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN PUBLIC KEY-----\nnot a key\n").unwrap();
    let missing = dir.path().join("missing.json");
    // The base's placeholder JWKS holds no keys.
    let placeholder =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s/base/secrets/jwks.json");
    for path in [&garbage, &missing, &placeholder] {
        let line = assert_refused(
            BIN,
            &[
                ("JWT_PUBLIC_KEYS", path.to_str().unwrap()),
                ("LISTEN_ADDR", &addr),
            ],
            "JWT_PUBLIC_KEYS",
        )
        .await;
        assert!(
            line.starts_with("error: invalid setting JWT_PUBLIC_KEYS: "),
            "{line}"
        );
    }
    drop(held);
}

/// A client that sends half a request line is disconnected at
/// `HEADER_READ_TIMEOUT_MS`; whole requests and upgrades are served meanwhile.
#[tokio::test]
async fn a_slow_client_is_dropped_at_the_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let vh = broker().vhost("ws-binary-slowloris").await;
    mosaic_tests::amqp::relay_stand_in(&vh.amqp_url).await;
    let service = Running::start(
        BIN,
        &[
            ("AMQP_URL", &vh.amqp_url),
            ("JWT_SECRET", token::SECRET),
            ("HEADER_READ_TIMEOUT_MS", "500"),
        ],
    )
    .await;
    let mut slow = tokio::net::TcpStream::connect(service.addr).await.unwrap();
    slow.write_all(b"GET /v1/conn").await.unwrap();
    let started = Instant::now();

    let (d, _) = Device::connect(service.addr, &token::hs256(Uuid::new_v4(), 3600)).await;
    let health = reqwest::get(format!("http://{}/healthz", service.addr))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, slow.read(&mut buf))
        .await
        .expect("the gateway drops the slow client")
        .unwrap_or(0);
    let waited = started.elapsed();
    assert_eq!(n, 0, "expected the connection closed, got {:?}", &buf[..n]);
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    // The upgraded WebSocket is not an HTTP connection: it outlived the timeout.
    let mut d = d;
    d.send(&serde_json::json!({"type": "event", "name": "still-here", "id": "1"}))
        .await;
    assert_eq!(d.recv().await["type"], "ack");
    d.close().await;
    service.terminate();
    service.assert_exits_cleanly().await;
}
