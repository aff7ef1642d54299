//! The real `device-service` binary: refused settings at start, and SIGTERM.
//!
//! Each test runs the binary with a cleared environment, so only the variables it
//! names reach the service.

use std::time::{Duration, Instant};

use mosaic_tests::binary::{Running, WAIT, assert_refused, manifest_literal};
use mosaic_tests::broker;
use mosaic_tests::hive::HiveStandIn;

const BIN: &str = env!("CARGO_BIN_EXE_device-service");
/// An API token long enough to be accepted.
const TOKEN: &str = "binary-test-token-0123456789";

#[tokio::test]
async fn refused_settings_exit_64_with_one_line_naming_them() {
    let line = assert_refused(BIN, &[("API_TOKENS", TOKEN)], "HIVE_URL").await;
    assert!(!line.contains(TOKEN), "token printed: {line}");

    assert_refused(
        BIN,
        &[("HIVE_URL", "http://127.0.0.1:9/hive")],
        "API_TOKENS",
    )
    .await;

    // One token of the list is too short: named, and no token of the list printed.
    let short = "tiny-t0ken";
    let line = assert_refused(
        BIN,
        &[
            ("HIVE_URL", "http://127.0.0.1:9/hive"),
            ("API_TOKENS", &format!("{TOKEN},{short}")),
        ],
        "API_TOKENS",
    )
    .await;
    assert!(!line.contains(TOKEN), "token printed: {line}");
    assert!(!line.contains(short), "token printed: {line}");
}

#[tokio::test]
async fn sigterm_stops_the_binary_with_exit_0() {
    let vh = broker().vhost("dev-binary-sigterm").await;
    let hive = HiveStandIn::start().await;
    let hive_url = hive.url();
    let service = Running::start(
        BIN,
        &[
            ("AMQP_URL", &vh.amqp_url),
            ("HIVE_URL", &hive_url),
            ("API_TOKENS", TOKEN),
            ("SHUTDOWN_GRACE_MS", "5000"),
        ],
    )
    .await;
    service.terminate();
    service.assert_exits_cleanly().await;
}

/// The placeholder secrets the Kubernetes base publishes pass the length checks, so
/// before the placeholder rule they started a device-service whose API anyone holding
/// the repository could call.
#[tokio::test]
async fn the_manifests_placeholder_secrets_are_refused() {
    let hive = ("HIVE_URL", "http://127.0.0.1:9/hive");
    let api_tokens = manifest_literal("API_TOKENS");
    let line = assert_refused(BIN, &[hive, ("API_TOKENS", &api_tokens)], "API_TOKENS").await;
    for t in api_tokens.split(',') {
        assert!(!line.contains(t), "token printed: {line}");
    }
    let signing = manifest_literal("HIVE_SIGNING_SECRET");
    let line = assert_refused(
        BIN,
        &[
            hive,
            ("API_TOKENS", TOKEN),
            ("HIVE_SIGNING_SECRET", &signing),
        ],
        "HIVE_SIGNING_SECRET",
    )
    .await;
    assert!(!line.contains(&signing), "secret printed: {line}");
}

/// Values that used to be accepted and bound nothing.
#[tokio::test]
async fn numbers_past_their_range_exit_64() {
    let huge = u64::MAX.to_string();
    for var in [
        "SHUTDOWN_GRACE_MS",
        "HIVE_MAX_AGE_MS",
        "RETRY_BASE_MS",
        "RETRY_MAX_MS",
        "RECONNECT_MAX_MS",
        "HEADER_READ_TIMEOUT_MS",
        "MAX_HTTP_CONNECTIONS",
    ] {
        assert_refused(
            BIN,
            &[
                ("HIVE_URL", "http://127.0.0.1:9/hive"),
                ("API_TOKENS", TOKEN),
                (var, &huge),
            ],
            var,
        )
        .await;
    }
}

/// With `MAX_HTTP_CONNECTIONS=2`, two clients that never send a request hold both
/// places: a third client's request is answered only once the header-read timeout
/// has dropped them, and then at once.
#[tokio::test]
async fn idle_connections_are_capped_and_dropped_at_the_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let vh = broker().vhost("dev-binary-slowloris").await;
    let hive = HiveStandIn::start().await;
    let hive_url = hive.url();
    let service = Running::start(
        BIN,
        &[
            ("AMQP_URL", &vh.amqp_url),
            ("HIVE_URL", &hive_url),
            ("API_TOKENS", TOKEN),
            ("HEADER_READ_TIMEOUT_MS", "1000"),
            ("MAX_HTTP_CONNECTIONS", "2"),
        ],
    )
    .await;
    let mut held = Vec::new();
    let connect_idle = || async {
        let mut c = tokio::net::TcpStream::connect(service.addr).await.unwrap();
        c.write_all(b"GET /heal").await.unwrap();
        c
    };
    held.push(connect_idle().await);
    held.push(connect_idle().await);
    let started = Instant::now();
    let mut third = tokio::net::TcpStream::connect(service.addr).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, third.read_to_string(&mut answer))
        .await
        .expect("the third client is answered")
        .unwrap();
    let waited = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Not before the two idle clients were dropped (1 s after they connected).
    assert!(
        waited >= Duration::from_millis(700),
        "answered past the cap: {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    for mut c in held {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(WAIT, c.read(&mut buf))
            .await
            .expect("the idle client is dropped")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    service.terminate();
    service.assert_exits_cleanly().await;
}

/// A change committed while RabbitMQ is out of reach, then SIGKILL before it could
/// be published: the outbox keeps it, and the next replica to start publishes it.
#[tokio::test]
async fn the_outbox_survives_a_sigkill_between_commit_and_publish() {
    let pg = mosaic_tests::postgres();
    let db = pg.database("outbox_sigkill").await;
    let vh = broker().vhost("dev-binary-outbox").await;
    let hive = HiveStandIn::start().await;
    let proxy = mosaic_tests::FaultProxy::start(broker().amqp_addr())
        .await
        .unwrap();
    let via_proxy = vh
        .amqp_url
        .replace(&broker().amqp_addr().to_string(), &proxy.addr().to_string());
    let hive_url = hive.url();
    let vars = |amqp: &str| {
        vec![
            ("AMQP_URL", amqp.to_owned()),
            ("HIVE_URL", hive_url.clone()),
            ("API_TOKENS", TOKEN.to_owned()),
            ("DATABASE_URL", db.clone()),
            ("RECONNECT_MAX_MS", "200".to_owned()),
        ]
    };
    let a_vars = vars(&via_proxy);
    let a_vars: Vec<(&str, &str)> = a_vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut a = Running::start_logged(BIN, &a_vars).await;
    let http = reqwest::Client::new();
    let broker_ready = format!("http://{}/readyz/broker", a.addr);
    proxy.outage();
    mosaic_tests::eventually(WAIT, "device-service to lose the broker", || async {
        let s = http.get(&broker_ready).send().await.ok()?.status();
        (s == 503).then_some(())
    })
    .await;
    let res = http
        .post(format!("http://{}/v1/devices", a.addr))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"name": "committed-not-published"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 201);
    let record: serde_json::Value = res.json().await.unwrap();
    let id = record["id"].as_str().unwrap().to_owned();
    a.kill().await;
    let waiting = pg.psql(&db, "SELECT count(*) FROM outbox").await.unwrap();
    assert_eq!(waiting.trim(), "1", "the change waits in the outbox");

    let b_vars = vars(&vh.amqp_url);
    let b_vars: Vec<(&str, &str)> = b_vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let b = Running::start_logged(BIN, &b_vars).await;
    hive.wait_until(WAIT, "the committed change at Hive", |seen| {
        seen.iter().any(|r| {
            let b = r.json();
            b["kind"] == "registry" && b["name"] == "created" && b["device"] == id.as_str()
        })
    })
    .await;
    mosaic_tests::eventually(WAIT, "the outbox to empty", || async {
        let n = pg.psql(&db, "SELECT count(*) FROM outbox").await.ok()?;
        (n.trim() == "0").then_some(())
    })
    .await;
    b.terminate();
    b.assert_exits_cleanly().await;
}
