//! websocket-service against a real RabbitMQ, with real WebSocket clients.
//!
//! Each test takes a vhost of its own and starts the service in-process through the
//! same `run` the binary calls, on `127.0.0.1:0`.

mod auth;
mod commands;
mod events;
mod hardening;
mod limits;
mod resilience;
mod wire_rules;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use mosaic_tests::amqp::Listener;
use mosaic_tests::{broker, token, within};
use serde_json::{Map, Value};
use tokio::sync::oneshot;
use uuid::Uuid;

/// How long a test waits for anything.
const WAIT: Duration = Duration::from_secs(10);

/// One websocket-service replica running in this process.
struct Gateway {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), websocket_service::Error>>,
    http: reqwest::Client,
}

impl Gateway {
    /// Starts a replica against `amqp_url` with the test secret and `extra` settings,
    /// and waits until it is ready. A queue takes what devices send, as
    /// device-service's relay queue would (else events are nacked `unroutable`).
    async fn start(amqp_url: &str, extra: &[(&str, &str)]) -> Gateway {
        mosaic_tests::amqp::relay_stand_in(amqp_url).await;
        Gateway::start_bare(amqp_url, extra).await
    }

    /// As [`Gateway::start`], with nothing consuming `mosaic.events`.
    async fn start_bare(amqp_url: &str, extra: &[(&str, &str)]) -> Gateway {
        let gw = Gateway::start_unready(amqp_url, extra).await;
        gw.wait_ready(true).await;
        gw
    }

    async fn start_unready(amqp_url: &str, extra: &[(&str, &str)]) -> Gateway {
        let mut env: HashMap<String, String> = HashMap::new();
        env.insert("AMQP_URL".into(), amqp_url.into());
        env.insert("JWT_SECRET".into(), token::SECRET.into());
        for (k, v) in extra {
            env.insert((*k).into(), (*v).into());
        }
        let config = match mosaic_runtime::config::parse::<websocket_service::Config>(
            ["websocket-service"],
            |k| env.get(k).cloned(),
        )
        .expect("valid test configuration")
        {
            mosaic_runtime::config::Parsed::Run(c) => c,
            mosaic_runtime::config::Parsed::Print(_) => unreachable!(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(websocket_service::run(config, listener, async move {
            let _ = stopped.await;
        }));
        Gateway {
            addr,
            stop: Some(stop),
            task,
            http: reqwest::Client::new(),
        }
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let res = within(
            WAIT,
            path,
            self.http.get(format!("http://{}{path}", self.addr)).send(),
        )
        .await
        .expect("HTTP request");
        let status = res.status().as_u16();
        (status, res.text().await.unwrap_or_default())
    }

    async fn wait_ready(&self, ready: bool) {
        mosaic_tests::wait::readiness(self.addr, ready, Duration::from_secs(30)).await;
    }

    /// Stops the replica (as SIGTERM would) and waits for `run` to return.
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        within(Duration::from_secs(30), "run to return", &mut self.task)
            .await
            .expect("run panicked")
            .expect("run failed");
    }
}

/// A message read from RabbitMQ.
#[derive(Debug)]
struct Got {
    routing_key: String,
    headers: Map<String, Value>,
    body: Value,
    props: BasicProperties,
}

/// A queue of its own bound to an exchange with a pattern.
struct Observer(Listener);

impl Observer {
    /// Binds a fresh queue to `exchange` with `pattern`.
    async fn bind(url: &str, exchange: &str, pattern: &str) -> Observer {
        Observer(Listener::start(url, exchange, &[pattern.to_owned()]).await)
    }

    /// Every message on `mosaic.events`.
    async fn events(url: &str) -> Observer {
        Observer::bind(url, "mosaic.events", "#").await
    }

    async fn next(&mut self) -> Got {
        let d = within(WAIT, "a message from RabbitMQ", self.0.consumer.next())
            .await
            .expect("consumer ended")
            .expect("delivery");
        let headers = d
            .properties
            .headers()
            .as_ref()
            .map(|t| amqp_value_json::from_field_table(t).unwrap())
            .unwrap_or_default();
        Got {
            routing_key: d.routing_key.to_string(),
            headers,
            body: serde_json::from_slice(&d.data).unwrap_or(Value::Null),
            props: d.properties,
        }
    }

    /// The next message whose routing key starts with `prefix`, skipping others.
    async fn next_with(&mut self, prefix: &str) -> Got {
        for _ in 0..100 {
            let g = self.next().await;
            if g.routing_key.starts_with(prefix) {
                return g;
            }
        }
        panic!("no message with routing key {prefix}*");
    }
}

/// Publishes a command the way device-service does.
struct Hive(Listener);

impl Hive {
    async fn new(url: &str) -> Hive {
        Hive(Listener::start(url, "", &[]).await)
    }

    /// The queue its replies arrive on.
    fn reply_queue(&self) -> &ShortString {
        &self.0.queue
    }

    async fn publish(&self, key: &str, headers: Value, body: Value, props: BasicProperties) {
        let table = amqp_value_json::to_field_table(headers.as_object().unwrap()).unwrap();
        let confirm = self
            .0
            .ch
            .basic_publish(
                "mosaic.commands".into(),
                key.into(),
                BasicPublishOptions::default(),
                &serde_json::to_vec(&body).unwrap(),
                props.with_headers(table),
            )
            .await
            .unwrap();
        let confirmed = within(WAIT, "a publisher confirm", confirm).await.unwrap();
        assert!(confirmed.is_ack(), "the broker refused a command");
    }

    /// Sends an event to `device`.
    async fn event(&self, device: Uuid, name: &str, data: Value) -> String {
        let id = Uuid::new_v4().to_string();
        let headers = serde_json::json!({"kind": "event", "id": id, "name": name});
        self.publish(
            &format!("device.{device}"),
            headers,
            data,
            BasicProperties::default(),
        )
        .await;
        id
    }

    /// Sends a request to `device` with the reply queue of this Hive.
    async fn request(&self, device: Uuid, name: &str, data: Value, timeout_ms: u64) -> String {
        let id = Uuid::new_v4().to_string();
        let deadline = time::OffsetDateTime::now_utc() + Duration::from_millis(timeout_ms);
        let deadline = deadline
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let headers =
            serde_json::json!({"kind": "request", "id": id, "name": name, "deadline": deadline});
        let props = BasicProperties::default()
            .with_reply_to(self.reply_queue().clone())
            .with_correlation_id(id.clone().into())
            .with_expiration(timeout_ms.to_string().into());
        self.publish(&format!("device.{device}"), headers, data, props)
            .await;
        id
    }

    async fn reply(&mut self) -> Got {
        let d = within(WAIT, "a reply", self.0.consumer.next())
            .await
            .expect("consumer ended")
            .expect("delivery");
        Got {
            routing_key: d.routing_key.to_string(),
            headers: amqp_value_json::from_field_table(d.properties.headers().as_ref().unwrap())
                .unwrap(),
            body: serde_json::from_slice(&d.data).unwrap_or(Value::Null),
            props: d.properties,
        }
    }
}

/// A device id and its HS256 token (valid for an hour).
fn device() -> (Uuid, String) {
    let d = Uuid::new_v4();
    (d, token::hs256(d, 3600))
}

/// Lists the routing keys that bind a queue to `mosaic.commands` (`broadcast`) or to
/// the direct exchange behind it, `mosaic.commands.devices` (`device.<uuid>`).
async fn command_bindings(vhost: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for ex in ["mosaic.commands", "mosaic.commands.devices"] {
        let v = broker()
            .mgmt_get(&format!("/api/exchanges/{vhost}/{ex}/bindings/source"))
            .await;
        keys.extend(
            v.as_array()
                .into_iter()
                .flatten()
                .filter(|b| b["destination_type"] == "queue")
                .filter_map(|b| b["routing_key"].as_str().map(str::to_owned)),
        );
    }
    keys
}

/// A TCP proxy in front of the broker that can hold back what the broker sends (its
/// confirms, deliveries and replies) while letting the client's bytes through: a
/// broker that is slow to confirm.
struct StallProxy {
    addr: SocketAddr,
    stalled: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl StallProxy {
    async fn start(upstream: SocketAddr) -> StallProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stalled, _) = tokio::sync::watch::channel(false);
        let gate = stalled.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                let mut open = gate.subscribe();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        // Wait while stalled, then forward one read.
                        if open.wait_for(|s| !*s).await.is_err() {
                            return;
                        }
                        match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if open.wait_for(|s| !*s).await.is_err()
                                    || cw.write_all(&buf[..n]).await.is_err()
                                {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        StallProxy {
            addr,
            stalled,
            task,
        }
    }

    fn stall(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
