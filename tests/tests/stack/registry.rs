//! The registry with the whole product: device-service on a real PostgreSQL,
//! gateways on the same broker, real WebSocket devices and the simulator.
//!
//! - enrolment end to end: a device created through the REST API enrols with a
//!   one-time code, connects, is activated, and the code works once;
//! - two devices race one code on two gateways: exactly one enrols;
//! - renewal, and revocation: disabling closes the live session (4403 "revoked")
//!   within 2 s, and a gateway started afterwards refuses the old token; re-enabling
//!   does not revive it, a fresh enrolment does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mosaic_runtime::config::{Parsed, parse};
use mosaic_tests::device::{Device, Ended};
use mosaic_tests::hive::HiveStandIn;
use mosaic_tests::{broker, postgres, within};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::WAIT;

const API: &str = "registry-test-api-token-0123";

struct Fleet {
    api: SocketAddr,
    amqp_url: String,
    jwks: tempfile::TempDir,
    hive: HiveStandIn,
    http: reqwest::Client,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn env_of(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Fleet {
    /// device-service (registry and signing key) with a Hive stand-in, no gateway yet.
    async fn start(test: &str) -> Fleet {
        let vhost = broker().vhost(test).await;
        let db = postgres().database(test).await;
        let hive = HiveStandIn::start().await;
        let env = env_of(&[
            ("AMQP_URL", &vhost.amqp_url),
            ("HIVE_URL", &hive.url()),
            ("API_TOKENS", API),
            ("DATABASE_URL", &db),
            ("TOKEN_SIGNING_KEY", mosaic_tests::token::ED_PRIVATE_PEM),
            ("TOKEN_TTL", "1h"),
            ("RETRY_BASE_MS", "20"),
            ("RETRY_MAX_MS", "200"),
            ("SHUTDOWN_GRACE_MS", "2000"),
        ]);
        let config =
            match parse::<device_service::Config>(["device-service"], |k| env.get(k).cloned()) {
                Ok(Parsed::Run(c)) => c,
                other => panic!("bad device-service config: {other:?}"),
            };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = listener.local_addr().unwrap();
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            device_service::run(config, listener, async move {
                let _ = rx.await;
            })
            .await
            .expect("device-service runs");
        });
        mosaic_tests::wait::readiness(api, true, WAIT).await;
        let http = reqwest::Client::new();
        // The gateways verify minted tokens with the key device-service publishes.
        let jwks = tempfile::tempdir().unwrap();
        let doc = http
            .get(format!("http://{api}/v1/jwks.json"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        std::fs::write(jwks.path().join("jwks.json"), doc).unwrap();
        Fleet {
            api,
            amqp_url: vhost.amqp_url,
            jwks,
            hive,
            http,
            stops: vec![stop],
            tasks: vec![task],
        }
    }

    /// Starts a gateway and waits until it is ready (revocations read).
    async fn gateway(&mut self) -> SocketAddr {
        let keys = self.jwks.path().join("jwks.json");
        let env = env_of(&[
            ("AMQP_URL", &self.amqp_url),
            ("JWT_SECRET", mosaic_tests::token::SECRET),
            ("JWT_PUBLIC_KEYS", keys.to_str().unwrap()),
            ("SHUTDOWN_GRACE_MS", "2000"),
        ]);
        let config = match parse::<websocket_service::Config>(["websocket-service"], |k| {
            env.get(k).cloned()
        }) {
            Ok(Parsed::Run(c)) => c,
            other => panic!("bad websocket-service config: {other:?}"),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = oneshot::channel::<()>();
        self.stops.push(stop);
        self.tasks.push(tokio::spawn(async move {
            websocket_service::run(config, listener, async move {
                let _ = rx.await;
            })
            .await
            .expect("websocket-service runs");
        }));
        mosaic_tests::wait::readiness(addr, true, WAIT).await;
        addr
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("http://{}{path}", self.api);
        let mut req = self
            .http
            .request(method.parse().unwrap(), url)
            .bearer_auth(API);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = within(WAIT, "a REST answer", req.send()).await.unwrap();
        let status = res.status().as_u16();
        let bytes = res.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// A registered device and a fresh code for it.
    async fn device_with_code(&self, name: &str) -> (Uuid, String) {
        let (status, record) = self
            .call("POST", "/v1/devices", Some(json!({"name": name})))
            .await;
        assert_eq!(status, 201, "{record}");
        let id: Uuid = record["id"].as_str().unwrap().parse().unwrap();
        let code = self.code(id).await;
        (id, code)
    }

    async fn code(&self, id: Uuid) -> String {
        let (status, e) = self
            .call(
                "POST",
                &format!("/v1/devices/{id}/enrolments"),
                Some(json!({"ttl_ms": 600_000})),
            )
            .await;
        assert_eq!(status, 201, "{e}");
        e["code"].as_str().unwrap().to_owned()
    }

    async fn stop(mut self) {
        for s in self.stops.drain(..).rev() {
            let _ = s.send(());
        }
        for t in self.tasks.drain(..) {
            within(WAIT, "the fleet to stop", t)
                .await
                .expect("no task panicked");
        }
    }
}

/// Connects without a token and sends `enrol`; returns the device and its first
/// frame after `hello`.
async fn enrol(gw: SocketAddr, code: &str) -> (Device, Result<Value, Ended>) {
    let mut d = Device::try_connect(gw, None).await.expect("upgrade");
    assert_eq!(d.recv().await["type"], "hello");
    d.send(&json!({"type": "enrol", "code": code})).await;
    let first = d.frame_or_end(WAIT).await;
    (d, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_with_the_simulator_activates_the_device_and_the_code_works_once() {
    use mosaic_tools::answer::Answer;
    use mosaic_tools::device::{self, DeviceConfig, Enrolment, EventPlan, Outcome, Output, Stats};

    let mut fleet = Fleet::start("registry-enrolment").await;
    let gw = fleet.gateway().await;
    let (id, code) = fleet.device_with_code("boiler-7").await;

    let credentials = Enrolment::credentials(code.clone());
    let stats = Arc::new(Stats::default());
    let config = DeviceConfig {
        url: format!("ws://{gw}/v1/connect"),
        device: id,
        credentials: credentials.clone(),
        in_band: true,
        events: EventPlan {
            name: "telemetry".into(),
            data: None,
            interval: Some(Duration::from_millis(50)),
            count: Some(3),
            with_ids: true,
        },
        answer: Answer::Silent,
        capabilities: Default::default(),
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        max_in_flight: 10,
        output: Output::Quiet,
        source: None,
    };
    let outcome = within(
        WAIT,
        "the simulator to enrol and send its events",
        device::run(config, stats.clone(), device::CancellationToken::new()),
    )
    .await
    .expect("the simulator runs");
    assert_eq!(outcome, Outcome::Done);
    assert_eq!(stats.acked.load(std::sync::atomic::Ordering::Relaxed), 3);
    let mosaic_tools::device::Credentials::Enrol(e) = &credentials else {
        unreachable!()
    };
    assert!(e.token().is_some(), "the simulator kept its token");

    // Hive heard of the creation and the first connect, with kind `registry`.
    let device = id.to_string();
    fleet
        .hive
        .wait_until(WAIT, "registry created and activated at Hive", |seen| {
            let names: Vec<Value> = seen
                .iter()
                .map(|r| r.json())
                .filter(|b| b["kind"] == "registry" && b["device"] == device.as_str())
                .map(|b| b["name"].clone())
                .collect();
            names.contains(&json!("created")) && names.contains(&json!("activated"))
        })
        .await;
    let activated = fleet
        .hive
        .requests()
        .into_iter()
        .map(|r| r.json())
        .find(|b| b["kind"] == "registry" && b["name"] == "activated")
        .unwrap();
    assert_eq!(activated["data"]["id"], device.as_str(), "{activated}");
    assert!(activated["at"].is_string(), "{activated}");
    let record = mosaic_tests::eventually(WAIT, "last_seen to be recorded", || async {
        let (_, r) = fleet.call("GET", &format!("/v1/devices/{id}"), None).await;
        r["last_seen"].is_string().then_some(r)
    })
    .await;
    assert!(record["activated_at"].is_string(), "{record}");

    // The code was used: a second enrolment with it is refused.
    let (mut d, first) = enrol(gw, &code).await;
    let error = first.expect("an error frame");
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], "unauthorized", "{error}");
    assert_eq!(d.close_code().await, 4401);
    // An unknown code, and one far too long, the same.
    for bad in ["AAAAA-BBBBB".to_owned(), "x".repeat(10_000)] {
        let (mut d, first) = enrol(gw, &bad).await;
        assert_eq!(first.expect("an error frame")["code"], "unauthorized");
        assert_eq!(d.close_code().await, 4401);
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_raced_by_two_devices_on_two_gateways_enrols_exactly_one() {
    let mut fleet = Fleet::start("registry-race").await;
    let a = fleet.gateway().await;
    let b = fleet.gateway().await;
    for round in 0..3 {
        let (id, code) = fleet.device_with_code(&format!("raced-{round}")).await;
        let mut d1 = Device::try_connect(a, None).await.unwrap();
        let mut d2 = Device::try_connect(b, None).await.unwrap();
        assert_eq!(d1.recv().await["type"], "hello");
        assert_eq!(d2.recv().await["type"], "hello");
        let frame = json!({"type": "enrol", "code": code});
        tokio::join!(d1.send(&frame), d2.send(&frame));
        let (f1, f2) = tokio::join!(d1.frame_or_end(WAIT), d2.frame_or_end(WAIT));
        let frames = [f1.unwrap(), f2.unwrap()];
        let enrolled: Vec<&Value> = frames.iter().filter(|f| f["type"] == "enrolled").collect();
        assert_eq!(enrolled.len(), 1, "round {round}: {frames:?}");
        assert_eq!(enrolled[0]["device"], id.to_string());
        let refused: Vec<&Value> = frames.iter().filter(|f| f["type"] == "error").collect();
        assert_eq!(refused.len(), 1, "round {round}: {frames:?}");
        assert_eq!(refused[0]["code"], "unauthorized");
        // The winner continues as authenticated; the loser is closed with 4401.
        let (winner, loser) = if frames[0]["type"] == "enrolled" {
            (&mut d1, &mut d2)
        } else {
            (&mut d2, &mut d1)
        };
        assert_eq!(winner.recv().await["type"], "welcome");
        assert_eq!(loser.close_code().await, 4401);
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_and_revocation_across_gateways_old_and_new() {
    let mut fleet = Fleet::start("registry-revocation").await;
    let gw = fleet.gateway().await;
    let (id, code) = fleet.device_with_code("meter-1").await;

    let (mut d, first) = enrol(gw, &code).await;
    let enrolled = first.unwrap();
    assert_eq!(enrolled["type"], "enrolled", "{enrolled}");
    let welcome = d.recv().await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["device"], id.to_string());
    let first_token = enrolled["token"].as_str().unwrap().to_owned();

    // Renewal: a fresh token, which the session now runs under.
    d.send(&json!({"type": "renew"})).await;
    let renewed = d.recv().await;
    assert_eq!(renewed["type"], "renewed", "{renewed}");
    let renewed_token = renewed["token"].as_str().unwrap().to_owned();
    assert!(renewed["expires_at"].is_string());
    let (mut other, _) = Device::connect(gw, &renewed_token).await;
    // That replaced the first session (one session per device).
    assert_eq!(d.close_code().await, 4409);

    // A device outside the registry (an HS256 token) cannot renew.
    let stranger = Uuid::new_v4();
    let (mut s, _) = Device::connect(gw, &mosaic_tests::token::hs256(stranger, 600)).await;
    s.send(&json!({"type": "renew"})).await;
    let refused = s.recv().await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["code"], "forbidden", "{refused}");

    // Disabling closes the live session within 2 s.
    let started = Instant::now();
    let (status, _) = fleet
        .call(
            "PATCH",
            &format!("/v1/devices/{id}"),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, ended) = other.ended_within(Duration::from_secs(5)).await;
    let took = started.elapsed();
    assert_eq!(ended, Ended::Close(4403, "revoked".into()));
    assert!(took < Duration::from_secs(2), "closed after {took:?}");

    // Refused at once on this gateway, and on one started after the revocation.
    let late = fleet.gateway().await;
    for g in [gw, late] {
        for t in [&first_token, &renewed_token] {
            assert_eq!(Device::try_connect(g, Some(t)).await.unwrap_err(), 401);
        }
        let mut d = Device::try_connect(g, None).await.unwrap();
        d.recv().await;
        d.send(&json!({"type": "auth", "token": renewed_token}))
            .await;
        let e = d.recv().await;
        assert_eq!(e["code"], "unauthorized", "{e}");
        assert_eq!(d.close_code().await, 4401);
    }
    // No code for a disabled device.
    let (status, e) = fleet
        .call("POST", &format!("/v1/devices/{id}/enrolments"), None)
        .await;
    assert_eq!(status, 409, "{e}");
    assert_eq!(e["error"]["code"], "device_disabled");

    // Re-enabled: the old tokens stay revoked; a fresh enrolment works.
    let (status, _) = fleet
        .call(
            "PATCH",
            &format!("/v1/devices/{id}"),
            Some(json!({"enabled": true})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        Device::try_connect(late, Some(&renewed_token))
            .await
            .unwrap_err(),
        401
    );
    let code = fleet.code(id).await;
    let (mut d, first) = enrol(late, &code).await;
    assert_eq!(first.unwrap()["type"], "enrolled");
    assert_eq!(d.recv().await["type"], "welcome");

    // Deleting closes it too.
    let (status, _) = fleet
        .call("DELETE", &format!("/v1/devices/{id}"), None)
        .await;
    assert_eq!(status, 204);
    let (_, ended) = d.ended_within(Duration::from_secs(5)).await;
    assert_eq!(ended, Ended::Close(4403, "revoked".into()));
    s.close().await;
    fleet.stop().await;
}
