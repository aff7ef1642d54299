//! The real `websocket-service` binary: refused settings at start, and SIGTERM.
//!
//! Each test runs the binary with a cleared environment, so only the variables it
//! names reach the service.

use mosaic_tests::binary::{Running, WAIT, assert_refused};
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
