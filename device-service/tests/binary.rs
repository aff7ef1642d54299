//! The real `device-service` binary: refused settings at start, and SIGTERM.
//!
//! Each test runs the binary with a cleared environment, so only the variables it
//! names reach the service.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use mosaic_tests::hive::HiveStandIn;
use mosaic_tests::{broker, within};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_device-service");
/// How long a test waits for anything.
const WAIT: Duration = Duration::from_secs(30);
/// Exit code of a refused setting (`EX_USAGE`).
const EXIT_CONFIG: i32 = 64;
/// An API token long enough to be accepted.
const TOKEN: &str = "binary-test-token-0123456789";

/// The binary with only `PATH` and `vars` in its environment; killed if the test ends
/// before it does.
fn service(vars: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.envs(vars.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs the binary to its end and asserts exit code 64 with a single stderr line
/// naming `setting`; returns the line.
async fn assert_refused(vars: &[(&str, &str)], setting: &str) -> String {
    let out = within(WAIT, "the binary to exit", service(vars).output())
        .await
        .expect("the binary starts");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "stderr: {lines:?}");
    assert_eq!(lines.len(), 1, "one line expected: {lines:?}");
    assert!(
        lines[0].contains(setting),
        "{setting} not named: {}",
        lines[0]
    );
    lines[0].to_owned()
}

#[tokio::test]
async fn refused_settings_exit_64_with_one_line_naming_them() {
    let line = assert_refused(&[("API_TOKENS", TOKEN)], "HIVE_URL").await;
    assert!(!line.contains(TOKEN), "token printed: {line}");

    assert_refused(&[("HIVE_URL", "http://127.0.0.1:9/hive")], "API_TOKENS").await;

    // One token of the list is too short: named, and no token of the list printed.
    let short = "tiny-t0ken";
    let line = assert_refused(
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
    let [port] = mosaic_tests::broker::free_ports::<1>().expect("a free port");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listen = addr.to_string();
    let hive_url = hive.url();
    let mut child = service(&[
        ("AMQP_URL", &vh.amqp_url),
        ("HIVE_URL", &hive_url),
        ("API_TOKENS", TOKEN),
        ("LISTEN_ADDR", &listen),
        ("SHUTDOWN_GRACE_MS", "5000"),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("the binary starts");

    mosaic_tests::wait::readiness(addr, true, WAIT).await;

    let pid = child.id().expect("the binary is running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "kill -TERM {pid} failed");

    // A process that ignored SIGTERM would still be running when this wait ends.
    let status = within(WAIT, "the binary to exit after SIGTERM", child.wait())
        .await
        .expect("wait for the binary");
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let connect = within(
        WAIT,
        "a connect to the closed port",
        tokio::net::TcpStream::connect(addr),
    )
    .await;
    assert!(connect.is_err(), "{addr} still accepts connections");
}
