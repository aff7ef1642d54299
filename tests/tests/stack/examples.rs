//! The example device clients and the simulator against the real stack.
//!
//! Each client is started in its test mode: it sends 3 events with ids, waits for the
//! 3 acks, answers one request and exits 0. The test sends that request through the
//! REST API and checks the client's answer came back, that the client exited 0 and
//! that its events reached Hive with a valid signature.
//!
//! The clients need `python3` with the `websockets` library and `node` with the
//! packages of `examples/node` installed (`npm ci`); the test command installs both.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use mosaic_tests::{eventually, within};
use mosaic_tools::token::{Signer, TokenSpec};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{API_TOKEN, JWT_SECRET, Stack, WAIT};

/// Events each client sends in its test mode.
const EVENTS: usize = 3;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .join("examples")
}

/// Runs one example client against a fresh stack and checks the round trip.
async fn round_trip(test: &str, program: &str, script: &Path, by: &str) {
    let stack = Stack::start(test).await;
    let device = Uuid::new_v4();
    let signer = Signer::hmac(JWT_SECRET.as_bytes(), None).unwrap();
    let token =
        mosaic_tools::token::mint(&signer, &TokenSpec::new(device, Duration::from_secs(600)))
            .unwrap();

    let child = tokio::process::Command::new(program)
        .arg(script)
        .args([
            "--events",
            &EVENTS.to_string(),
            "--interval",
            "0.2",
            "--exit",
            "--service",
            "read-config",
            "--service",
            "reboot",
        ])
        .args(["--timeout", "60"])
        .env("MOSAIC_URL", format!("ws://{}/v1/connect", stack.ws_addr))
        .env("MOSAIC_TOKEN", &token)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));

    // Once the client declared its services, a request for another one is refused
    // by the gateway without reaching it.
    let registered = format!("lifecycle device={device} registered");
    eventually(WAIT, "the client to declare its services", || {
        let lines = stack.hive_lines.lock().unwrap().clone();
        let registered = registered.clone();
        async move { lines.iter().any(|l| l.contains(&registered)).then_some(()) }
    })
    .await;
    let http = reqwest::Client::new();
    let refused = http
        .post(format!(
            "http://{}/v1/devices/{device}/requests",
            stack.api_addr
        ))
        .bearer_auth(API_TOKEN)
        .json(&json!({"name": "not-offered", "timeout_ms": 5000}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), reqwest::StatusCode::NOT_FOUND);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "service_not_supported", "{body}");

    // A request through the REST API.
    let url = format!("http://{}/v1/devices/{device}/requests", stack.api_addr);
    let asked = json!({"name": "read-config", "data": {"keys": ["interval"]}, "timeout_ms": 5000});
    let answer: Value = eventually(WAIT, "the client to answer a request", || {
        let http = http.clone();
        let url = url.clone();
        let asked = asked.clone();
        async move {
            let resp = http
                .post(&url)
                .bearer_auth(API_TOKEN)
                .json(&asked)
                .send()
                .await
                .ok()?;
            if resp.status() == reqwest::StatusCode::NOT_FOUND {
                return None;
            }
            assert_eq!(resp.status(), reqwest::StatusCode::OK, "request answered");
            resp.json().await.ok()
        }
    })
    .await;
    assert_eq!(answer["status"], "ok", "{answer}");
    assert_eq!(answer["data"]["by"], by, "{answer}");
    assert_eq!(answer["data"]["echo"], asked["data"], "{answer}");

    let output = within(WAIT * 2, "the client to exit", child.wait_with_output())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{program} exited with {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    assert_eq!(stdout.matches("<- ack ").count(), EVENTS, "{stdout}");
    assert!(
        stdout.contains(r#"<- registered ["read-config","reboot"]"#)
            || stdout.contains(r#"<- registered ["read-config", "reboot"]"#),
        "{stdout}"
    );

    // The acked events reached Hive, signed.
    let needle = format!("device={device} name=telemetry");
    eventually(WAIT, "the client's events to reach Hive", || {
        let lines = stack.hive_lines.lock().unwrap().clone();
        let needle = needle.clone();
        async move {
            assert!(
                lines.iter().all(|l| !l.starts_with("REFUSED")),
                "Hive refused a delivery: {lines:?}"
            );
            (lines.iter().filter(|l| l.contains(&needle)).count() >= EVENTS).then_some(())
        }
    })
    .await;
    stack.stop().await;
}

fn python_ready() {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import websockets.asyncio.client"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 with the websockets library (>= 13) is needed: pip install websockets"
    );
}

fn node_ready() {
    let ws = examples_dir().join("node/node_modules/ws");
    assert!(
        ws.is_dir(),
        "the Node example's packages are needed: (cd examples/node && npm ci)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_round_trip() {
    python_ready();
    let script = examples_dir().join("python/device.py");
    round_trip("examples-python", "python3", &script, "python").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_client_round_trip() {
    node_ready();
    let script = examples_dir().join("node/device.js");
    round_trip("examples-node", "node", &script, "node").await;
}

/// The simulator (`mosaic-device`'s library) against the same stack: events acked,
/// a fixed answer returned through the REST API, a silent device giving 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_round_trip() {
    use mosaic_tools::answer::Answer;
    use mosaic_tools::device::{
        self, Credentials, DeviceConfig, EventPlan, Outcome, Output, Stats,
    };
    use std::sync::atomic::Ordering;

    let stack = Stack::start("examples-simulator").await;
    let signer = Arc::new(Signer::hmac(JWT_SECRET.as_bytes(), None).unwrap());
    let config = |device: Uuid, answer: Answer, count: Option<u64>| DeviceConfig {
        url: format!("ws://{}/v1/connect", stack.ws_addr),
        device,
        credentials: Credentials::Mint {
            signer: signer.clone(),
            spec: TokenSpec::new(device, Duration::from_secs(600)),
        },
        in_band: false,
        events: EventPlan {
            name: "telemetry".into(),
            data: None,
            interval: count.map(|_| Duration::from_millis(50)),
            count,
            with_ids: true,
        },
        answer,
        capabilities: Default::default(),
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        max_in_flight: 10,
        output: Output::Quiet,
        source: None,
    };
    let cancel = device::CancellationToken::new();
    let stats = Arc::new(Stats::default());

    // A device that answers with a fixed reply, and one that stays silent.
    let answering = Uuid::new_v4();
    let fixed = json!({"firmware": "1.4.2"});
    let answering_task = tokio::spawn(device::run(
        config(answering, Answer::Fixed(fixed.clone()), Some(EVENTS as u64)),
        stats.clone(),
        cancel.clone(),
    ));
    let silent = Uuid::new_v4();
    let silent_task = tokio::spawn(device::run(
        config(silent, Answer::Silent, None),
        Arc::new(Stats::default()),
        cancel.clone(),
    ));

    let http = reqwest::Client::new();
    let ask = |device: Uuid, timeout_ms: u64| {
        let http = http.clone();
        let url = format!("http://{}/v1/devices/{device}/requests", stack.api_addr);
        async move {
            let resp = http
                .post(&url)
                .bearer_auth(API_TOKEN)
                .json(&json!({"name": "version", "data": null, "timeout_ms": timeout_ms}))
                .send()
                .await
                .ok()?;
            if resp.status() == reqwest::StatusCode::NOT_FOUND {
                return None; // not connected yet
            }
            let status = resp.status();
            Some((status, resp.json::<Value>().await.unwrap()))
        }
    };
    let (status, body) = eventually(WAIT, "the simulator to answer", || ask(answering, 5000)).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ok");
    assert_eq!(body["data"], fixed);

    let (status, body) =
        eventually(WAIT, "the silent device to connect", || ask(silent, 300)).await;
    assert_eq!(status, reqwest::StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["error"]["code"], "device_timeout");

    // The answering device finishes its plan: every event sent and acked.
    let outcome = within(WAIT, "the simulator to finish", answering_task)
        .await
        .unwrap()
        .expect("the simulator runs without error");
    assert_eq!(outcome, Outcome::Done);
    assert_eq!(stats.acked.load(Ordering::Relaxed), EVENTS as u64);
    assert_eq!(stats.answered.load(Ordering::Relaxed), 1);

    cancel.cancel();
    let outcome = within(WAIT, "the silent device to stop", silent_task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, Outcome::Cancelled);
    stack.stop().await;
}
