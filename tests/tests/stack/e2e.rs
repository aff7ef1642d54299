//! End to end: real devices on websocket-service, the REST API of device-service,
//! RabbitMQ between them, and a recording Hive stand-in.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mosaic_tests::device::Device;
use mosaic_tests::hive::{HiveStandIn, Recorded};
use mosaic_tests::within;
use mosaic_tools::token::{Signer, TokenSpec};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{API_TOKEN, HIVE_SECRET, JWT_SECRET, Stack, WAIT};

fn token(device: Uuid) -> String {
    let signer = Signer::hmac(JWT_SECRET.as_bytes(), None).unwrap();
    mosaic_tools::token::mint(&signer, &TokenSpec::new(device, Duration::from_secs(600))).unwrap()
}

fn is_for(r: &Recorded, device: Uuid, kind: &str, name: &str) -> bool {
    let v = r.json();
    v["device"] == device.to_string() && v["kind"] == kind && v["name"] == name
}

/// Every clause of the Hive webhook for one device event: the object the device
/// sent arrives whole (nested extra fields included), with the injected fields, the
/// idempotency key and a valid signature; lifecycle messages bracket the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_event_reaches_hive_unchanged() {
    let hive = HiveStandIn::start().await;
    let stack = Stack::start_with_hive("e2e-upstream", &hive.url()).await;
    let device = Uuid::new_v4();
    let (mut d, welcome) = Device::connect(stack.ws_addr, &token(device)).await;
    let session = welcome["session"].as_str().unwrap().to_owned();

    let data = json!({"t": 21.5, "tags": ["a", {"b": null}], "big": u64::MAX, "neg": i64::MIN});
    let unit = json!("°C");
    let meta = json!({"fw": {"v": [1, 2, 3], "ok": true}, "n": -7, "max": u64::MAX, "f": 0.1, "e": [], "o": {}});
    d.send(
        &json!({"type": "event", "name": "reading", "id": "r-1", "data": data,
        "unit": unit, "meta": meta}),
    )
    .await;
    assert_eq!(d.recv().await, json!({"type": "ack", "id": "r-1"}));

    let seen = hive
        .wait_until(WAIT, "the event at Hive", |s| {
            s.iter().any(|r| is_for(r, device, "event", "reading"))
        })
        .await;
    let rec = seen
        .iter()
        .find(|r| is_for(r, device, "event", "reading"))
        .unwrap();
    let got = rec.json();
    let message_id = mosaic_protocol::message_id(device, Some("r-1")).to_string();
    assert_eq!(got["data"], data);
    assert_eq!(got["unit"], unit);
    assert_eq!(got["meta"], meta);
    assert_eq!(got["id"], "r-1");
    assert_eq!(got["session"], session.as_str());
    assert_eq!(got["message_id"], message_id.as_str());
    assert!(got["gateway"].as_str().is_some_and(|g| !g.is_empty()));
    let received_at = got["received_at"].as_str().unwrap();
    time::OffsetDateTime::parse(received_at, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("received_at {received_at:?} is not RFC 3339: {e}"));
    let keys: BTreeSet<&str> = got
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let expected: BTreeSet<&str> = [
        "kind",
        "message_id",
        "device",
        "name",
        "received_at",
        "gateway",
        "session",
        "id",
        "unit",
        "meta",
        "data",
    ]
    .into();
    assert_eq!(keys, expected, "{got}");

    assert_eq!(rec.header("idempotency-key"), Some(message_id.as_str()));
    assert_eq!(rec.header("content-type"), Some("application/json"));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    mosaic_tools::signature::verify(
        rec.header("x-mosaic-signature"),
        &rec.body,
        HIVE_SECRET.as_bytes(),
        now,
        300,
    )
    .expect("a valid X-Mosaic-Signature");

    hive.wait_until(WAIT, "the connected lifecycle message", |s| {
        s.iter()
            .any(|r| is_for(r, device, "lifecycle", "connected"))
    })
    .await;
    d.close().await;
    let seen = hive
        .wait_until(WAIT, "the disconnected lifecycle message", |s| {
            s.iter()
                .any(|r| is_for(r, device, "lifecycle", "disconnected"))
        })
        .await;
    let gone = seen
        .iter()
        .find(|r| is_for(r, device, "lifecycle", "disconnected"))
        .unwrap()
        .json();
    assert_eq!(gone["reason"], "closed_by_device", "{gone}");
    assert_eq!(gone["session"], session.as_str());
    assert!(gone["duration_ms"].is_u64(), "{gone}");
    stack.stop().await;
}

/// Hive's event reaches the device with its extra fields; Hive's request is answered
/// by the device and the answer comes back through the REST call; a second answer
/// to the same request is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hive_events_and_requests_reach_the_device() {
    let hive = HiveStandIn::start().await;
    let stack = Stack::start_with_hive("e2e-downstream", &hive.url()).await;
    let device = Uuid::new_v4();
    let (mut d, _) = Device::connect(stack.ws_addr, &token(device)).await;

    let api = Api(stack.api_addr);
    let (status, body) = api.post(
        &format!("/v1/devices/{device}/events"),
        json!({"name": "config", "data": {"interval": 5}, "priority": "high", "tags": [1, {"x": null}]}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("an event id").to_owned();
    assert_eq!(
        d.recv().await,
        json!({"type": "event", "id": id, "name": "config", "data": {"interval": 5},
            "priority": "high", "tags": [1, {"x": null}]})
    );

    let path = format!("/v1/devices/{device}/requests");
    let asking = tokio::spawn(async move {
        api.post(
            &path,
            json!({"name": "reboot", "data": {"delay": 1}, "timeout_ms": 20000}),
        )
        .await
    });
    let request = d.recv().await;
    assert_eq!(request["type"], "request", "{request}");
    assert_eq!(request["name"], "reboot");
    assert_eq!(request["data"], json!({"delay": 1}));
    assert!(request["deadline"].is_string(), "{request}");
    let request_id = request["id"].as_str().unwrap().to_owned();
    let answer = json!({"type": "response", "request_id": request_id, "status": "ok",
        "data": {"rebooting": true}});
    d.send(&answer).await;
    let (status, body) = within(WAIT, "the REST request to return", asking)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"id": request_id, "status": "ok", "data": {"rebooting": true}})
    );

    // Once only.
    d.send(&answer).await;
    let err = d.recv().await;
    assert_eq!(err["type"], "error", "{err}");
    assert_eq!(err["code"], "unknown_request", "{err}");
    d.close().await;
    stack.stop().await;
}

/// A request whose device disconnects before answering ends at once with 404, not
/// after its timeout; requests and events for a device no gateway holds get 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_end_honestly_when_the_device_is_gone() {
    let hive = HiveStandIn::start().await;
    let stack = Stack::start_with_hive("e2e-gone", &hive.url()).await;
    let device = Uuid::new_v4();
    let (mut d, _) = Device::connect(stack.ws_addr, &token(device)).await;

    let path = format!("/v1/devices/{device}/requests");
    let api = Api(stack.api_addr);
    // The timeout is far longer than the bound this test waits: only the gateway's
    // report of the disconnect can end the call in time.
    let asking = tokio::spawn(async move {
        api.post(
            &path,
            json!({"name": "slow", "data": null, "timeout_ms": 300000}),
        )
        .await
    });
    let request = d.recv().await;
    assert_eq!(request["type"], "request", "{request}");
    d.close().await;
    let (status, body) = within(WAIT, "the request to end after the disconnect", asking)
        .await
        .unwrap();
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "device_not_connected", "{body}");

    let offline = Uuid::new_v4();
    for (path, body) in [
        (
            format!("/v1/devices/{offline}/events"),
            json!({"name": "x", "data": 1}),
        ),
        (
            format!("/v1/devices/{offline}/requests"),
            json!({"name": "x", "data": 1, "timeout_ms": 300000}),
        ),
    ] {
        let (status, answer) =
            within(WAIT, "a 404 for an offline device", api.post(&path, body)).await;
        assert_eq!(status, 404, "{path}: {answer}");
        assert_eq!(answer["error"]["code"], "device_not_connected", "{answer}");
    }
    stack.stop().await;
}

/// device-service's REST API, authenticated; `Copy`, for calls from spawned tasks.
#[derive(Clone, Copy)]
struct Api(std::net::SocketAddr);

impl Api {
    /// POSTs `body` to `path`; returns the status and the JSON answer.
    async fn post(self, path: &str, body: Value) -> (u16, Value) {
        let resp = reqwest::Client::new()
            .post(format!("http://{}{path}", self.0))
            .bearer_auth(API_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("device-service answers");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("a JSON answer"))
    }
}
