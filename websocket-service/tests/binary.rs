//! The real `websocket-service` binary: refused settings at start, and SIGTERM.
//!
//! Each test runs the binary with a cleared environment, so only the variables it
//! names reach the service.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use mosaic_tests::device::{Device, Ended};
use mosaic_tests::{broker, token, within};
use tokio::process::Command;
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_websocket-service");
/// How long a test waits for anything.
const WAIT: Duration = Duration::from_secs(30);
/// Exit code of a refused setting (`EX_USAGE`).
const EXIT_CONFIG: i32 = 64;

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

/// Runs the binary to its end; returns its exit code and its stderr lines.
async fn refused(vars: &[(&str, &str)]) -> (Option<i32>, Vec<String>) {
    let out = within(WAIT, "the binary to exit", service(vars).output())
        .await
        .expect("the binary starts");
    let stderr = String::from_utf8_lossy(&out.stderr);
    (
        out.status.code(),
        stderr.lines().map(str::to_owned).collect(),
    )
}

/// Asserts exit code 64 and a single stderr line naming `setting`; returns the line.
fn assert_refused(result: (Option<i32>, Vec<String>), setting: &str) -> String {
    let (code, lines) = result;
    assert_eq!(code, Some(EXIT_CONFIG), "stderr: {lines:?}");
    assert_eq!(lines.len(), 1, "one line expected: {lines:?}");
    let line = lines.into_iter().next().unwrap_or_default();
    assert!(line.contains(setting), "{setting} not named: {line}");
    line
}

#[tokio::test]
async fn refused_settings_exit_64_with_one_line_naming_them() {
    // No key source at all.
    assert_refused(refused(&[]).await, "JWT_SECRET");

    // An address that does not parse.
    let line = assert_refused(
        refused(&[("JWT_SECRET", token::SECRET), ("LISTEN_ADDR", "nowhere")]).await,
        "LISTEN_ADDR",
    );
    assert!(!line.contains(token::SECRET), "secret printed: {line}");

    // A secret under 32 bytes: named, never echoed.
    let short = "short-s3cr3t";
    let line = assert_refused(refused(&[("JWT_SECRET", short)]).await, "JWT_SECRET");
    assert!(!line.contains(short), "secret printed: {line}");
}

#[tokio::test]
async fn sigterm_closes_every_session_with_1001_and_exits_0() {
    let vh = broker().vhost("ws-binary-sigterm").await;
    let [port] = mosaic_tests::broker::free_ports::<1>().expect("a free port");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listen = addr.to_string();
    let mut child = service(&[
        ("AMQP_URL", &vh.amqp_url),
        ("JWT_SECRET", token::SECRET),
        ("LISTEN_ADDR", &listen),
        ("SHUTDOWN_GRACE_MS", "5000"),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("the binary starts");

    mosaic_tests::wait::readiness(addr, true, WAIT).await;

    let (mut a, _) = Device::connect(addr, &token::hs256(Uuid::new_v4(), 3600)).await;
    let (mut b, _) = Device::connect(addr, &token::hs256(Uuid::new_v4(), 3600)).await;

    let pid = child.id().expect("the binary is running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "kill -TERM {pid} failed");

    // A process that ignored SIGTERM would leave both sessions open: the bounded
    // waits below would fail.
    for d in [&mut a, &mut b] {
        let (_, ended) = d.ended_within(WAIT).await;
        assert!(
            matches!(ended, Ended::Close(1001, _)),
            "expected close 1001, got {ended:?}"
        );
    }
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
