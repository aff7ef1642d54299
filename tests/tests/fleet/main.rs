//! The fleet (contract section 7) across several replicas: two gateways (one of them
//! a child process, so that it can die by SIGKILL) and two device-service replicas on
//! one broker, real WebSocket devices, and a recording Hive stand-in.
//!
//! - `replicas`: presence, listing, kick, group and broadcast requests (JSON and
//!   NDJSON) through either device-service, and `gateway_lost` after a SIGKILL.
//! - `capabilities`: `register` and capabilities in `auth`, lifecycle `registered`,
//!   `service_not_supported`, group events, and hostile input on the fleet routes.
//!
//! The child gateway is this test binary run again with the ignored test
//! [`child_gateway`] selected and its settings in the environment: a real process
//! running the current code, without depending on a separately built binary.

mod capabilities;
mod replicas;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use mosaic_runtime::config::{Parsed, parse};
use mosaic_tests::binary::Running;
use mosaic_tests::device::{Device, Ended};
use mosaic_tests::{readiness, within};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use uuid::Uuid;

/// The API token every device-service here accepts.
pub const TOKEN: &str = "fleet-test-api-token-0123456789";
/// How long a test waits for anything.
pub const WAIT: Duration = Duration::from_secs(30);
/// The variable that tells [`child_gateway`] to run, holding its settings.
const CHILD_ENV: &str = "MOSAIC_FLEET_CHILD";

/// Settings of a gateway: fast announcements, so a lost one is noticed quickly.
fn gateway_vars(amqp_url: &str, id: Uuid) -> Vec<(String, String)> {
    vec![
        ("AMQP_URL".into(), amqp_url.into()),
        ("JWT_SECRET".into(), mosaic_tests::token::SECRET.into()),
        ("GATEWAY_ID".into(), id.to_string()),
        ("FLEET_ANNOUNCE_MS".into(), "300".into()),
        ("RECONNECT_MAX_MS".into(), "500".into()),
        ("SHUTDOWN_GRACE_MS".into(), "2000".into()),
    ]
}

/// A gateway in this process.
#[derive(Debug)]
pub struct Gateway {
    pub id: Uuid,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Gateway {
    pub async fn start(amqp_url: &str) -> Gateway {
        let id = Uuid::new_v4();
        let env: HashMap<String, String> = gateway_vars(amqp_url, id).into_iter().collect();
        let config = match parse::<websocket_service::Config>(["websocket-service"], |k| {
            env.get(k).cloned()
        }) {
            Ok(Parsed::Run(c)) => c,
            other => panic!("bad gateway config: {other:?}"),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            websocket_service::run(config, listener, async {
                let _ = rx.await;
            })
            .await
            .expect("the gateway runs");
        });
        readiness(addr, true, WAIT).await;
        Gateway {
            id,
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            within(WAIT, "the gateway to stop", t).await.unwrap();
        }
    }
}

/// A gateway in a child process.
#[derive(Debug)]
pub struct ChildGateway {
    pub id: Uuid,
    pub process: Running,
}

impl ChildGateway {
    pub async fn start(amqp_url: &str) -> ChildGateway {
        let id = Uuid::new_v4();
        let vars = gateway_vars(amqp_url, id);
        let settings: String = vars.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        let exe = std::env::current_exe().expect("the test binary's path");
        let process = Running::spawn_logged(
            exe.to_str().expect("a UTF-8 path"),
            &["child_gateway", "--exact", "--ignored", "--nocapture"],
            &[(CHILD_ENV, &settings)],
        );
        readiness(process.addr, true, WAIT).await;
        ChildGateway { id, process }
    }
}

/// Runs a gateway when this binary was started as a child by [`ChildGateway`];
/// otherwise does nothing.
#[test]
#[ignore = "the child process of the fleet tests; does nothing when run alone"]
fn child_gateway() {
    let Ok(settings) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut env: HashMap<String, String> = settings
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let listen = std::env::var("LISTEN_ADDR").expect("LISTEN_ADDR");
    env.insert("LISTEN_ADDR".into(), listen.clone());
    let config =
        match parse::<websocket_service::Config>(["websocket-service"], |k| env.get(k).cloned()) {
            Ok(Parsed::Run(c)) => c,
            other => panic!("bad child gateway config: {other:?}"),
        };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen).await.unwrap();
        websocket_service::run(config, listener, std::future::pending())
            .await
            .expect("the child gateway runs");
    });
}

/// A device-service replica in this process.
#[derive(Debug)]
pub struct DeviceService {
    pub addr: SocketAddr,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl DeviceService {
    pub async fn start(amqp_url: &str, hive_url: &str, vars: &[(&str, &str)]) -> DeviceService {
        let mut env: HashMap<String, String> = [
            ("AMQP_URL", amqp_url),
            ("HIVE_URL", hive_url),
            ("API_TOKENS", TOKEN),
            ("RETRY_BASE_MS", "20"),
            ("RETRY_MAX_MS", "200"),
            ("RECONNECT_MAX_MS", "500"),
            ("SHUTDOWN_GRACE_MS", "2000"),
            ("FLEET_LOST_AFTER_MS", "1500"),
            ("FLEET_TIMEOUT_MS", "3000"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in vars {
            env.insert(k.to_string(), v.to_string());
        }
        let config =
            match parse::<device_service::Config>(["device-service"], |k| env.get(k).cloned()) {
                Ok(Parsed::Run(c)) => c,
                other => panic!("bad device-service config: {other:?}"),
            };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            device_service::run(config, listener, async {
                let _ = rx.await;
            })
            .await
            .expect("device-service runs");
        });
        readiness(addr, true, WAIT).await;
        DeviceService {
            addr,
            http: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `method path` with the token and an optional JSON body: (status, headers, JSON).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.request(method, self.url(path)).bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = within(WAIT, "a REST answer", req.send())
            .await
            .expect("device-service reachable");
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let bytes = within(WAIT, "a REST body", res.bytes()).await.unwrap();
        (
            status,
            headers,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let (s, _, v) = self.call(reqwest::Method::GET, path, None).await;
        (s, v)
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (s, _, v) = self.call(reqwest::Method::POST, path, Some(body)).await;
        (s, v)
    }

    /// Every connected device through the listing, page by page.
    pub async fn list_all(&self, query: &str, limit: u32) -> Vec<Value> {
        let mut all = Vec::new();
        let mut cursor = String::new();
        for _ in 0..1000 {
            let (status, page) = self
                .get(&format!(
                    "/v1/devices?connected=true&limit={limit}{query}{cursor}"
                ))
                .await;
            assert_eq!(status, 200, "{page}");
            assert_eq!(page["partial"], false, "{page}");
            let devices = page["devices"].as_array().unwrap();
            assert!(devices.len() <= limit as usize);
            all.extend(devices.iter().cloned());
            match page["next_cursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => return all,
            }
        }
        panic!("the listing did not end");
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            within(WAIT, "device-service to stop", t).await.unwrap();
        }
    }
}

/// An HS256 device token with `groups`.
pub fn token(device: Uuid, groups: &[&str]) -> String {
    let mut c = mosaic_tests::token::claims(device, 600);
    c["groups"] = json!(groups);
    mosaic_tests::token::sign(jsonwebtoken::Algorithm::HS256, None, &c)
}

/// How a simulated device answers requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// At once, with `{"n": <its index>}`.
    Answer,
    /// After this long.
    Late(Duration),
    /// Never.
    Silent,
    /// Closes its connection when the first request arrives.
    Leave,
    /// Answers twice; reports the second answer's refusal.
    Twice,
}

/// What a simulated device saw.
#[derive(Debug)]
pub enum Seen {
    /// A request frame (before answering it).
    Request(Value),
    /// A frame after its answer (an error for a second answer).
    After(Value),
    /// The end of its connection.
    Ended(Ended),
}

/// A device that answers requests as told, reporting what it sees.
pub fn simulate(
    mut d: Device,
    n: usize,
    behaviour: Behaviour,
    seen: tokio::sync::mpsc::Sender<(usize, Seen)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let frame = match d.frame_or_end(Duration::from_secs(120)).await {
                Ok(f) => f,
                Err(end) => {
                    let _ = seen.send((n, Seen::Ended(end))).await;
                    return;
                }
            };
            if frame["type"] != "request" {
                let _ = seen.send((n, Seen::After(frame))).await;
                continue;
            }
            let _ = seen.send((n, Seen::Request(frame.clone()))).await;
            let answer = json!({"type": "response", "request_id": frame["id"], "status": "ok", "data": {"n": n}});
            match behaviour {
                Behaviour::Answer => d.send(&answer).await,
                Behaviour::Late(after) => {
                    tokio::time::sleep(after).await;
                    d.send(&answer).await;
                }
                Behaviour::Silent => {}
                Behaviour::Leave => {
                    d.close().await;
                    let _ = seen.send((n, Seen::Ended(Ended::Dropped))).await;
                    return;
                }
                Behaviour::Twice => {
                    d.send(&answer).await;
                    d.send(&answer).await;
                }
            }
        }
    })
}

/// Reads an NDJSON body line by line, noting when each line arrived.
pub async fn ndjson_lines(
    mut res: reqwest::Response,
    started: tokio::time::Instant,
) -> Vec<(Duration, Value)> {
    let mut buf = Vec::new();
    let mut lines = Vec::new();
    within(WAIT, "the NDJSON body", async {
        while let Some(chunk) = res.chunk().await.expect("a body chunk") {
            buf.extend_from_slice(&chunk);
            while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                let v: Value = serde_json::from_slice(&line[..line.len() - 1])
                    .unwrap_or_else(|e| panic!("not a JSON line: {e}"));
                lines.push((started.elapsed(), v));
            }
        }
    })
    .await;
    assert!(buf.is_empty(), "a partial last line");
    lines
}
