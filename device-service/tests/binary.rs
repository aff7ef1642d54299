//! The real `device-service` binary: refused settings at start, and SIGTERM.
//!
//! Each test runs the binary with a cleared environment, so only the variables it
//! names reach the service.

use mosaic_tests::binary::{Running, assert_refused};
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
