//! The example device clients and the simulator against the real stack.
//!
//! Each client is started in its test mode: it sends 3 events with ids, waits for the
//! 3 acks, answers one request and exits 0. The test sends that request through the
//! REST API and checks the client's answer came back, that the client exited 0 and
//! that its events reached Hive with a valid signature.
//!
//! The Python client also enrols: against a stack with the registry it trades a
//! one-time code for a token, keeps the token in its file and renews it, is seen
//! connected by the registry and Hive, starts again from the file, and the code does
//! not work a second time.
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
    let asked = json!({"name": "read-config", "data": {"keys": ["interval"]}, "timeout_ms": 5000});
    let answer = answer_from(&stack, device, &asked).await;
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

/// Asks `device` a request through the REST API until it is connected and answers;
/// returns the answer.
async fn answer_from(stack: &Stack, device: Uuid, asked: &Value) -> Value {
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/devices/{device}/requests", stack.api_addr);
    eventually(WAIT, "the client to answer a request", || {
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
                return None; // not connected yet
            }
            assert_eq!(resp.status(), reqwest::StatusCode::OK, "request answered");
            resp.json().await.ok()
        }
    })
    .await
}

/// The Python client with `args`, bounded by its own `--timeout` and killed if the
/// test ends first; nothing of the test's own environment configures it.
fn python_client(stack: &Stack, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new("python3")
        .arg(examples_dir().join("python/device.py"))
        .args(args)
        .args(["--timeout", "40"])
        .env("MOSAIC_URL", format!("ws://{}/v1/connect", stack.ws_addr))
        .env_remove("MOSAIC_TOKEN")
        .env_remove("MOSAIC_ENROL_CODE")
        .env_remove("MOSAIC_TOKEN_FILE")
        .env_remove("MOSAIC_DEVICE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("cannot start python3")
}

/// Waits for the client to exit (it gives up after its `--timeout`, well within
/// this wait): its exit code, standard output and error.
async fn ended(child: tokio::process::Child) -> (Option<i32>, String, String) {
    let out = within(WAIT * 2, "the client to exit", child.wait_with_output())
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The claims of a JWT, read without checking the signature.
fn claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWT has three parts");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url claims");
    serde_json::from_slice(&bytes).expect("JSON claims")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_enrols_with_a_code_keeps_its_token_and_the_code_works_once() {
    use std::os::unix::fs::PermissionsExt;

    python_ready();
    let stack = Stack::start_registry("examples-python-enrol").await;
    let (status, record) = stack
        .call("POST", "/v1/devices", Some(json!({"name": "python-enrol"})))
        .await;
    assert_eq!(status, 201, "{record}");
    let device: Uuid = record["id"].as_str().unwrap().parse().unwrap();
    let (status, enrolment) = stack
        .call(
            "POST",
            &format!("/v1/devices/{device}/enrolments"),
            Some(json!({"ttl_ms": 600_000})),
        )
        .await;
    assert_eq!(status, 201, "{enrolment}");
    let code = enrolment["code"].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("device.token");
    let token_path = token_file.to_str().unwrap();
    let id = device.to_string();

    // First start: no token. It enrols, keeps the token, renews it at once
    // (`--renew-at 0`), sends its events and answers a request on that session.
    let client = python_client(
        &stack,
        &[
            "--enrol-code",
            &code,
            "--token-file",
            token_path,
            "--device",
            &id,
            "--renew-at",
            "0",
            "--events",
            "2",
            "--interval",
            "0.2",
            "--exit",
        ],
    );
    let asked = json!({"name": "read-config", "data": {"n": 1}, "timeout_ms": 5000});
    assert_eq!(answer_from(&stack, device, &asked).await["status"], "ok");
    let (code_of, stdout, stderr) = ended(client).await;
    assert_eq!(code_of, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let at = |needle: &str| {
        stdout
            .find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} in:\n{stdout}"))
    };
    assert!(at(&format!("<- enrolled {id} ")) < at(&format!("connected as {id} ")));
    assert!(at(&format!("connected as {id} ")) < at("<- renewed "));

    // The token file holds the renewed token, for this device, readable by its
    // owner only; neither the token nor the code was printed.
    let meta = std::fs::metadata(&token_file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(claims(&token)["sub"], id.as_str());
    for secret in [token.as_str(), code.as_str()] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "a secret was printed"
        );
    }

    // device-service saw it connect: activated once, and `last_seen` recorded.
    eventually(WAIT, "registry.<id>.activated at Hive", || async {
        let seen = stack.hive_seen(&format!("device={id} name=activated"));
        (!seen.is_empty()).then_some(())
    })
    .await;
    assert!(
        !stack
            .hive_seen(&format!("lifecycle device={id} connected"))
            .is_empty()
    );
    let record = eventually(WAIT, "last_seen to be recorded", || async {
        let (_, r) = stack
            .call("GET", &format!("/v1/devices/{device}"), None)
            .await;
        r["last_seen"].is_string().then_some(r)
    })
    .await;
    assert!(record["activated_at"].is_string(), "{record}");

    // The code does not work a second time: `unauthorized`, close 4401, exit 2,
    // and no token file.
    let other_file = dir.path().join("other.token");
    let client = python_client(
        &stack,
        &[
            "--enrol-code",
            &code,
            "--token-file",
            other_file.to_str().unwrap(),
            "--events",
            "1",
            "--exit",
        ],
    );
    let (code_of, stdout, stderr) = ended(client).await;
    assert_eq!(code_of, Some(2), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stderr.contains("enrolment refused: unauthorized"),
        "{stderr}"
    );
    assert!(!other_file.exists());

    // A later start uses the token file and never sends the (used) code.
    let client = python_client(
        &stack,
        &[
            "--enrol-code",
            &code,
            "--token-file",
            token_path,
            "--events",
            "1",
            "--exit",
        ],
    );
    let asked = json!({"name": "read-config", "data": {"n": 2}, "timeout_ms": 5000});
    assert_eq!(answer_from(&stack, device, &asked).await["status"], "ok");
    let (code_of, stdout, stderr) = ended(client).await;
    assert_eq!(code_of, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(!stdout.contains("<- enrolled"), "{stdout}");
    assert!(stdout.contains(&format!("connected as {id} ")), "{stdout}");
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
