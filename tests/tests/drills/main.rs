//! Fault drills: the gateway's real binaries, real RabbitMQ nodes, real WebSocket
//! devices and a Hive stand-in, put through the faults production meets; and the
//! relay against RabbitMQ's own behaviour (its timeouts, limits and dead-lettering).
//!
//! - `cluster`: nodes of a three-node cluster stopped, then killed, during traffic,
//!   and started again.
//! - `broker_cut`: both services lose the broker (a stalled network, then a cut) and
//!   get it back.
//! - `relay_kill`: device-service dies by SIGKILL with POSTs in flight.
//! - `gateway_kill`: websocket-service dies by SIGKILL; its devices move to another
//!   replica.
//! - `slow_hive`: Hive answers in 5 s with 550 deliveries queued.
//! - `consumer_timeout`: Hive fails longer than RabbitMQ's `consumer_timeout`.
//! - `dead_letters`: the relay queue's delivery limit, and `CC`/`BCC` headers on a
//!   dead-lettered message.
//!
//! Each drill prints its figures (events sent, acked, arrived at Hive, lost,
//! duplicates; times; memory). The drills with traffic keep a ledger: every id a
//! device saw acked must reach Hive (more than once is allowed, and counted).
//!
//! The services run as the binaries Cargo built (`target/<profile>/websocket-service`
//! and `device-service`), found by [`mosaic_tests::binary::workspace_bin`]:
//! `cargo test --workspace` builds them; to run this test binary alone, build them
//! first (`cargo build -p websocket-service -p device-service`). docs/drills.md
//! lists every drill with its duration.

mod broker_cut;
mod cluster;
mod consumer_timeout;
mod dead_letters;
mod gateway_kill;
mod relay_kill;
mod slow_hive;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use mosaic_tests::binary::{Running, workspace_bin};
use mosaic_tests::device::Device;
use mosaic_tests::hive::HiveStandIn;
use mosaic_tests::{eventually, token, within};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// The API token of every device-service the drills start.
pub const API_TOKEN: &str = "drill-api-token-0123456789";
/// How long a drill waits for a step that should take a second or two.
pub const WAIT: Duration = Duration::from_secs(30);

/// The websocket-service binary.
pub fn websocket_bin() -> String {
    workspace_bin("websocket-service")
}

/// The device-service binary.
pub fn device_bin() -> String {
    workspace_bin("device-service")
}

/// Starts websocket-service against `amqp_url` with the test JWT secret, quick
/// reconnects and `extra` settings (which win); waits until it is ready.
pub async fn start_gateway(amqp_url: &str, extra: &[(&str, &str)]) -> Running {
    let mut vars = vec![
        ("AMQP_URL", amqp_url),
        ("JWT_SECRET", token::SECRET),
        ("PUBLISH_TIMEOUT_MS", "2000"),
        ("RECONNECT_MAX_MS", "500"),
        ("SHUTDOWN_GRACE_MS", "2000"),
    ];
    vars.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
    vars.extend_from_slice(extra);
    Running::start_logged(&websocket_bin(), &vars).await
}

/// Starts device-service against `amqp_url`, delivering to `hive_url`, with quick
/// retries and reconnects and `extra` settings (which win); waits until it is ready.
pub async fn start_relay(amqp_url: &str, hive_url: &str, extra: &[(&str, &str)]) -> Running {
    let mut vars = vec![
        ("AMQP_URL", amqp_url),
        ("HIVE_URL", hive_url),
        ("API_TOKENS", API_TOKEN),
        ("RETRY_BASE_MS", "50"),
        ("RETRY_MAX_MS", "500"),
        ("RECONNECT_MAX_MS", "500"),
        ("SHUTDOWN_GRACE_MS", "2000"),
    ];
    vars.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
    vars.extend_from_slice(extra);
    Running::start_logged(&device_bin(), &vars).await
}

/// `mosaic_amqp_connections_total{link=<link>,outcome=<outcome>}` of a service (0 when
/// the series is absent).
pub async fn link_count(service: &Running, link: &str, outcome: &str) -> u64 {
    let series = format!("mosaic_amqp_connections_total{{link=\"{link}\",outcome=\"{outcome}\"}}");
    service.metric(&series).await.unwrap_or(0.0) as u64
}

/// Waits until `service` has lost its broker link at least `lost` times in all and
/// is ready again: it reconnected by itself.
pub async fn wait_reconnected(service: &Running, link: &str, lost: u64, timeout: Duration) {
    eventually(
        timeout,
        &format!("{link} to lose its link and reconnect"),
        || async {
            (link_count(service, link, "lost").await >= lost
                && service
                    .metric(&format!("mosaic_amqp_connected{{link=\"{link}\"}}"))
                    .await
                    == Some(1.0))
            .then_some(())
        },
    )
    .await;
    mosaic_tests::wait::readiness(service.addr, true, timeout).await;
}

/// `POST <path>` on device-service with the API token: (status, JSON answer).
pub async fn rest(api: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    let res = within(WAIT + Duration::from_secs(5), "a REST answer", async {
        reqwest::Client::new()
            .post(format!("http://{api}{path}"))
            .bearer_auth(API_TOKEN)
            .json(body)
            .send()
            .await
            .expect("device-service answers")
    })
    .await;
    let status = res.status().as_u16();
    let body = res.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// A device that takes commands: it records the events it gets and answers every
/// request `ok` with `{"echo": <the request's data>}`.
#[derive(Debug)]
pub struct Responder {
    pub device: Uuid,
    events: mpsc::Receiver<Value>,
    task: JoinHandle<()>,
}

impl Responder {
    /// Connects a new device to the gateway at `ws`.
    pub async fn connect(ws: SocketAddr) -> Responder {
        let device = Uuid::new_v4();
        let (d, _) = Device::connect(ws, &token::hs256(device, 3600)).await;
        Responder::start(device, d)
    }

    /// Takes over the connection `d` of `device`.
    pub fn start(device: Uuid, mut d: Device) -> Responder {
        let (tx, events) = mpsc::channel(64);
        let task = tokio::spawn(async move {
            loop {
                let f = d.recv_within(Duration::from_secs(3600)).await;
                match f["type"].as_str() {
                    Some("request") => {
                        d.send(&json!({"type": "response", "request_id": f["id"],
                            "status": "ok", "data": {"echo": f["data"]}}))
                            .await;
                    }
                    Some("event") => {
                        let _ = tx.send(f).await;
                    }
                    _ => {}
                }
            }
        });
        Responder {
            device,
            events,
            task,
        }
    }

    /// A REST event to this device is accepted (202) and reaches it; a REST request
    /// is answered by it (200). `what` names the moment, for failures.
    pub async fn commands_work(&mut self, api: SocketAddr, what: &str) {
        let name = format!("drill-{}", Uuid::new_v4().simple());
        let (status, body) = rest(
            api,
            &format!("/v1/devices/{}/events", self.device),
            &json!({"name": name, "data": 1}),
        )
        .await;
        assert_eq!(status, 202, "REST event {what}: {body}");
        let got = within(
            WAIT,
            &format!("the REST event {what} at the device"),
            async {
                loop {
                    let e = self.events.recv().await.expect("the device is connected");
                    if e["name"] == name.as_str() {
                        return e;
                    }
                }
            },
        )
        .await;
        assert_eq!(got["id"], body["id"], "{what}");
        let (status, body) = rest(
            api,
            &format!("/v1/devices/{}/requests", self.device),
            &json!({"name": "ping", "data": what, "timeout_ms": 10000}),
        )
        .await;
        assert_eq!(status, 200, "REST request {what}: {body}");
        assert_eq!(body["status"], "ok", "{body}");
        assert_eq!(body["data"], json!({"echo": what}), "{body}");
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one traffic device did.
#[derive(Debug, Default)]
struct Sent {
    device: Uuid,
    /// Distinct ids sent.
    ids: usize,
    /// Frames sent (resends included).
    frames: usize,
    /// `nack`s received, by code.
    nacks: HashMap<String, usize>,
    /// Ids acked.
    acked: Vec<String>,
}

/// Devices sending events with ids, each one at a time: send, wait for the `ack` or
/// `nack`, resend the same id after a `nack` (100 ms later), pause, next id. Bounded:
/// each device stops after `max_per_device` ids, and all stop at [`Traffic::stop`].
/// A device whose connection ends fails the drill: through a broker outage devices
/// stay connected. Progress is counted per device: the gateway publishes each
/// device's events on one of several channels, and a drill must see every one of
/// them work.
#[derive(Debug)]
pub struct Traffic {
    stop: Arc<AtomicBool>,
    /// Events acked so far, per device.
    acked: Vec<Arc<AtomicUsize>>,
    tasks: Vec<JoinHandle<Sent>>,
}

/// The ledger of a drill's traffic: what devices saw, checked against what Hive got.
#[derive(Debug)]
pub struct Ledger {
    /// Distinct event ids the devices sent.
    pub sent: usize,
    /// Frames sent, resends included.
    pub frames: usize,
    /// `nack`s received, by code.
    pub nacks: HashMap<String, usize>,
    /// The `message_id` of every event a device saw acked.
    pub acked: HashSet<String>,
    /// The `message_id` of every event sent (acked or not).
    pub all: HashSet<String>,
}

/// The ledger against Hive.
#[derive(Debug)]
pub struct Account {
    pub sent: usize,
    pub acked: usize,
    /// Acked events Hive answered 2xx at least once.
    pub arrived: usize,
    /// Acked events Hive never got: must be 0.
    pub lost: usize,
    /// Deliveries of the drill's events past the first of each.
    pub duplicates: usize,
    /// Events sent, never acked (a `nack`, then the drill ended), that reached Hive
    /// anyway: RabbitMQ stored them but its confirm was lost with the connection.
    pub arrived_unacked: usize,
}

impl Traffic {
    /// Connects `devices` devices to the gateway at `ws` and starts them; each pauses
    /// `pace` between two events.
    pub async fn start(
        ws: SocketAddr,
        devices: usize,
        pace: Duration,
        max_per_device: usize,
    ) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let mut acked = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..devices {
            let device = Uuid::new_v4();
            let (d, _) = Device::connect(ws, &token::hs256(device, 3600)).await;
            acked.push(Arc::new(AtomicUsize::new(0)));
            let (stop, acked) = (stop.clone(), acked[acked.len() - 1].clone());
            tasks.push(tokio::spawn(run_device(
                d,
                device,
                pace,
                max_per_device,
                stop,
                acked,
            )));
        }
        Traffic { stop, acked, tasks }
    }

    /// Events acked so far, across devices.
    pub fn acked(&self) -> usize {
        self.acked.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }

    /// Waits until every device has had `more` events acked beyond those acked now.
    pub async fn wait_each_acked_more(&self, more: usize, timeout: Duration, what: &str) {
        let targets: Vec<usize> = self
            .acked
            .iter()
            .map(|a| a.load(Ordering::Relaxed) + more)
            .collect();
        let what = format!("every device to have {more} more events acked {what}");
        eventually(timeout, &what, || async {
            let done = self
                .acked
                .iter()
                .zip(&targets)
                .all(|(a, t)| a.load(Ordering::Relaxed) >= *t);
            done.then_some(())
        })
        .await;
    }

    /// Stops every device (each finishes the event it is on, or gives it up after a
    /// `nack`) and returns the ledger.
    pub async fn stop(mut self) -> Ledger {
        self.stop.store(true, Ordering::Relaxed);
        let mut ledger = Ledger {
            sent: 0,
            frames: 0,
            nacks: HashMap::new(),
            acked: HashSet::new(),
            all: HashSet::new(),
        };
        for task in std::mem::take(&mut self.tasks) {
            let s = within(WAIT, "a traffic device to stop", task)
                .await
                .expect("a traffic device failed");
            ledger.sent += s.ids;
            ledger.frames += s.frames;
            for (code, n) in s.nacks {
                *ledger.nacks.entry(code).or_default() += n;
            }
            for n in 0..s.ids {
                let id = format!("e{n}");
                ledger
                    .all
                    .insert(mosaic_protocol::message_id(s.device, Some(&id)).to_string());
            }
            for id in &s.acked {
                ledger
                    .acked
                    .insert(mosaic_protocol::message_id(s.device, Some(id)).to_string());
            }
        }
        ledger
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn run_device(
    mut d: Device,
    device: Uuid,
    pace: Duration,
    max: usize,
    stop: Arc<AtomicBool>,
    acked_total: Arc<AtomicUsize>,
) -> Sent {
    let mut sent = Sent {
        device,
        ..Default::default()
    };
    'ids: while sent.ids < max && !stop.load(Ordering::Relaxed) {
        let id = format!("e{}", sent.ids);
        sent.ids += 1;
        loop {
            d.send(&json!({"type": "event", "name": "drill", "id": id, "data": {"n": sent.ids}}))
                .await;
            sent.frames += 1;
            // A nack comes within the gateway's PUBLISH_TIMEOUT_MS.
            let f = d.recv_within(Duration::from_secs(20)).await;
            assert_eq!(f["id"], id.as_str(), "an answer for another id: {f}");
            match f["type"].as_str() {
                Some("ack") => {
                    sent.acked.push(id);
                    acked_total.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Some("nack") => {
                    let code = f["code"].as_str().unwrap_or("").to_owned();
                    *sent.nacks.entry(code).or_default() += 1;
                    if stop.load(Ordering::Relaxed) {
                        break 'ids;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => panic!("unexpected frame: {f}"),
            }
        }
        tokio::time::sleep(pace).await;
    }
    d.close().await;
    sent
}

impl Ledger {
    /// Waits until every acked event reached Hive (2xx), then counts.
    pub async fn settle(&self, hive: &HiveStandIn, timeout: Duration) -> Account {
        let missing = |keys: &HashMap<String, usize>| {
            self.acked.iter().filter(|k| !keys.contains_key(*k)).count()
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let keys = loop {
            let keys = hive.delivered_keys();
            let left = missing(&keys);
            if left == 0 {
                break keys;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "{left} of {} acked events never reached Hive within {timeout:?}",
                    self.acked.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let ours: usize = keys
            .iter()
            .filter(|(k, _)| self.all.contains(*k))
            .map(|(_, n)| n)
            .sum();
        let distinct = keys.keys().filter(|k| self.all.contains(*k)).count();
        let arrived = self.acked.iter().filter(|k| keys.contains_key(*k)).count();
        Account {
            sent: self.sent,
            acked: self.acked.len(),
            arrived,
            lost: self.acked.len() - arrived,
            duplicates: ours - distinct,
            arrived_unacked: distinct - arrived,
        }
    }
}

/// Now, RFC 3339 UTC, as the gateway writes `received_at`.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// Publishes a persistent message with `headers` (a JSON object, through the
/// amqp-value-json mapping) and waits for the broker's confirm.
pub async fn publish(ch: &lapin::Channel, exchange: &str, key: &str, headers: Value, body: &[u8]) {
    let headers = headers.as_object().expect("headers are a JSON object");
    let table = amqp_value_json::to_field_table(headers).unwrap();
    publish_table(ch, exchange, key, table, body).await;
}

/// As [`publish`], with a headers table built by hand (values the JSON mapping does
/// not produce, such as `CC`'s array of strings).
pub async fn publish_table(
    ch: &lapin::Channel,
    exchange: &str,
    key: &str,
    headers: lapin::types::FieldTable,
    body: &[u8],
) {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            lapin::BasicProperties::default()
                .with_headers(headers)
                .with_delivery_mode(2),
        )
        .await
        .expect("publish");
    let c = within(WAIT, "a publisher confirm", confirm)
        .await
        .expect("a confirm");
    assert!(c.is_ack(), "the broker refused a drill message");
}

/// Messages ready in `queue` now (a passive declare: exact, without the management
/// API's few seconds of lag; unacked ones are not counted).
pub async fn ready(conn: &lapin::Connection, queue: &str) -> u32 {
    // A channel of its own: a passive declare of a missing queue closes its channel.
    let ch = conn.create_channel().await.expect("a channel");
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{queue}: {e}"));
    let _ = ch.close(200, "".into()).await;
    q.message_count()
}

/// `mosaic_device_deliveries_total{outcome=<outcome>}` of a device-service: deliveries
/// finished that way (each counted once the broker has its ack).
pub async fn finished(service: &Running, outcome: &str) -> u64 {
    let series = format!("mosaic_device_deliveries_total{{outcome=\"{outcome}\"}}");
    service.metric(&series).await.unwrap_or(0.0) as u64
}
