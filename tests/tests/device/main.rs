//! device-service against the real broker and a real HTTP server standing in for Hive.
//!
//! The gateway side is played with plain lapin where a test needs it: events are
//! published to `mosaic.events` as websocket-service publishes them, and commands
//! are consumed from `mosaic.commands` and answered on the reply path as the
//! mosaic-protocol command docs describe.

mod api;
mod outage;
mod registry;
mod relay;
mod wire_rules;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel};
use mosaic_runtime::config::{Parsed, parse};
use mosaic_tests::amqp::Listener;
use mosaic_tests::{eventually, within};
use serde_json::{Map, Value, json};
use tokio::sync::oneshot;
use uuid::Uuid;

/// The API token every test service accepts.
pub const TOKEN: &str = "device-test-token-0123456789";

/// A running device-service.
#[derive(Debug)]
pub struct Service {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), device_service::Error>>>,
    http: reqwest::Client,
}

impl Service {
    /// Starts device-service against `amqp_url` and `hive_url` with test-friendly
    /// retry settings, overridden by `vars`; waits until `/readyz` is 200.
    pub async fn start(amqp_url: &str, hive_url: &str, vars: &[(&str, &str)]) -> Service {
        let svc = Service::start_unready(amqp_url, hive_url, vars).await;
        svc.wait_ready(true).await;
        svc
    }

    /// As [`Service::start`], without waiting for readiness.
    pub async fn start_unready(amqp_url: &str, hive_url: &str, vars: &[(&str, &str)]) -> Service {
        let mut env: HashMap<String, String> = [
            ("AMQP_URL", amqp_url),
            ("HIVE_URL", hive_url),
            ("API_TOKENS", TOKEN),
            ("LISTEN_ADDR", "127.0.0.1:0"),
            ("RETRY_BASE_MS", "20"),
            ("RETRY_MAX_MS", "200"),
            ("HIVE_TIMEOUT_MS", "5000"),
            ("RECONNECT_MAX_MS", "200"),
            ("SHUTDOWN_GRACE_MS", "5000"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in vars {
            env.insert(k.to_string(), v.to_string());
        }
        let config =
            match parse::<device_service::Config>(["device-service"], move |k| env.get(k).cloned())
            {
                Ok(Parsed::Run(c)) => c,
                other => panic!("bad test config: {other:?}"),
            };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(device_service::run(config, listener, async move {
            let _ = stopped.await;
        }));
        Service {
            addr,
            stop: Some(stop),
            task: Some(task),
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits until `/readyz` says `ready`.
    pub async fn wait_ready(&self, ready: bool) {
        mosaic_tests::wait::readiness(self.addr, ready, Duration::from_secs(30)).await;
    }

    /// `POST path` with the test token and a JSON body: (status, JSON answer).
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, _, answer) = self.post_full(path, body).await;
        (status, answer)
    }

    /// As [`Service::post`], with the answer's headers.
    pub async fn post_full(
        &self,
        path: &str,
        body: &Value,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let res = within(Duration::from_secs(30), "a REST answer", async {
            self.http
                .post(self.url(path))
                .bearer_auth(TOKEN)
                .json(body)
                .send()
                .await
                .expect("device-service reachable")
        })
        .await;
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let bytes = res.bytes().await.unwrap();
        (
            status,
            headers,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// `GET path`: (status, body text).
    pub async fn get(&self, path: &str) -> (u16, String) {
        let res = self.http.get(self.url(path)).send().await.unwrap();
        (res.status().as_u16(), res.text().await.unwrap())
    }

    /// Asks the service to shut down and waits for `run` to return.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let task = self.task.take().unwrap();
        within(Duration::from_secs(30), "device-service to stop", task)
            .await
            .expect("run panicked")
            .expect("run failed");
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A connection and a confirm-mode channel, with the Mosaic exchanges declared.
pub use mosaic_tests::amqp::connect as channel;

/// Publishes a device event to `mosaic.events` as a gateway does: `fields` become the
/// headers (plus the injected ones), `data` the body. Returns the message id.
pub async fn publish_event(
    ch: &Channel,
    device: Uuid,
    name: &str,
    fields: Value,
    data: &[u8],
) -> String {
    let message_id = Uuid::now_v7().to_string();
    let mut headers: Map<String, Value> = match fields {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    headers.insert("kind".into(), json!("event"));
    headers.insert("message_id".into(), json!(message_id));
    headers.insert("device".into(), json!(device.to_string()));
    headers.insert("name".into(), json!(name));
    headers.insert("session".into(), json!(Uuid::now_v7().to_string()));
    headers.insert("gateway".into(), json!("gw-test"));
    headers.insert("received_at".into(), json!(now_rfc3339()));
    publish_raw(
        ch,
        "mosaic.events",
        &mosaic_protocol::exchange::event_key(device, name),
        &headers,
        data,
    )
    .await;
    message_id
}

/// Publishes persistent, with confirm, `headers` through the amqp-value-json mapping.
pub async fn publish_raw(
    ch: &Channel,
    exchange: &str,
    key: &str,
    headers: &Map<String, Value>,
    data: &[u8],
) {
    let table = amqp_value_json::to_field_table(headers).unwrap();
    let confirm = ch
        .basic_publish(
            ShortString::from(exchange),
            ShortString::from(key),
            BasicPublishOptions::default(),
            data,
            BasicProperties::default()
                .with_headers(table)
                .with_delivery_mode(2),
        )
        .await
        .unwrap();
    let c = within(Duration::from_secs(10), "a publisher confirm", confirm)
        .await
        .unwrap();
    assert!(c.is_ack(), "the broker refused a test message");
}

/// Now, RFC 3339 UTC with microseconds, as the gateway writes `received_at`.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// A queue's counters from the management API: (ready, unacked).
pub async fn queue_counts(vhost: &str, queue: &str) -> Option<(u64, u64)> {
    let enc: String = vhost
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let q = mosaic_tests::broker()
        .mgmt_get(&format!("/api/queues/{enc}/{queue}"))
        .await;
    Some((
        q["messages_ready"].as_u64()?,
        q["messages_unacknowledged"].as_u64()?,
    ))
}

/// Waits until `queue` holds no message, ready or unacked (the management API lags a
/// few seconds behind).
pub async fn wait_queue_empty(vhost: &str, queue: &str) {
    eventually(
        Duration::from_secs(30),
        &format!("{queue} to be empty"),
        || async { (queue_counts(vhost, queue).await? == (0, 0)).then_some(()) },
    )
    .await;
}

/// Plays a gateway holding `device`: a queue bound to `device.<uuid>` (and to
/// `broadcast` when asked) on `mosaic.commands`.
#[derive(Debug)]
pub struct Gateway(Listener);

impl Gateway {
    pub async fn hold(amqp_url: &str, devices: &[Uuid], broadcast: bool) -> Gateway {
        let mut keys: Vec<String> = devices
            .iter()
            .map(|d| mosaic_protocol::exchange::device_key(*d))
            .collect();
        if broadcast {
            keys.push(mosaic_protocol::exchange::BROADCAST_KEY.into());
        }
        Gateway(Listener::start(amqp_url, mosaic_protocol::exchange::COMMANDS, &keys).await)
    }

    /// The next command: (headers as JSON, body as JSON, properties).
    pub async fn next(&mut self) -> (Map<String, Value>, Value, BasicProperties) {
        let d = within(
            Duration::from_secs(10),
            "a command at the gateway",
            self.0.consumer.next(),
        )
        .await
        .expect("consumer ended")
        .expect("consumer failed");
        let headers =
            amqp_value_json::from_field_table(d.properties.headers().as_ref().unwrap()).unwrap();
        let body = serde_json::from_slice(&d.data).unwrap();
        (headers, body, d.properties)
    }

    /// Answers a request as a gateway does: to `reply_to` through the default exchange.
    pub async fn reply(&self, request: &BasicProperties, kind: &str, extra: Value, data: &Value) {
        let mut headers = match extra {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        headers.insert("kind".into(), json!(kind));
        headers.insert("gateway".into(), json!("gw-test"));
        let table = amqp_value_json::to_field_table(&headers).unwrap();
        let reply_to = request.reply_to().clone().expect("a request has reply_to");
        let correlation = request
            .correlation_id()
            .clone()
            .expect("a request has correlation_id");
        self.0
            .ch
            .basic_publish(
                "".into(),
                reply_to,
                BasicPublishOptions::default(),
                &serde_json::to_vec(data).unwrap(),
                BasicProperties::default()
                    .with_headers(table)
                    .with_correlation_id(correlation),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
}
