//! The whole product in one process: RabbitMQ, websocket-service and device-service
//! started in-process through their `run`, with a Hive in front of device-service.
//!
//! - `e2e`: real devices, the REST API and a recording Hive stand-in: what a device
//!   sends reaches Hive unchanged, what Hive sends reaches the device, and requests
//!   end honestly (answered, device gone, device offline).
//! - `numbers`: random device frames (property test) and awkward number texts reach
//!   Hive with every number exactly as the device sent it.
//! - `examples`: the example device clients (`examples/python`, `examples/node`) and
//!   the simulator against the sample Hive of `mosaic-tools`; the Python client also
//!   enrols with a one-time code against a stack with the registry.
//! - `docs`: the operators' documentation against the code, and docs/provisioning.md
//!   run command by command against a stack with the registry.
//! - `registry`: enrolment, renewal and revocation across gateways.

mod docs;
mod e2e;
mod examples;
mod numbers;
mod registry;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mosaic_runtime::config::{Parsed, parse};
use mosaic_tests::{broker, postgres, within};
use mosaic_tools::hive::HiveConfig;
use tokio::sync::oneshot;

const JWT_SECRET: &str = "examples-test-jwt-secret-0123456789abcdef";
const HIVE_SECRET: &str = "examples-test-hive-secret-0123";
const API_TOKEN: &str = "examples-test-api-token-0123";
/// How long a test waits for anything (the clients start interpreters).
const WAIT: Duration = Duration::from_secs(30);

/// Both services, the sample Hive, and what Hive received.
struct Stack {
    ws_addr: SocketAddr,
    api_addr: SocketAddr,
    /// What the sample Hive printed, when the stack runs it.
    hive_lines: Arc<Mutex<Vec<String>>>,
    /// With the registry: the JWKS document device-service publishes, which the
    /// gateway reads as `JWT_PUBLIC_KEYS`.
    jwks: Option<tempfile::TempDir>,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn stop_future(rx: oneshot::Receiver<()>) {
    let _ = rx.await;
}

fn env_of(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Stack {
    /// The services with the sample Hive of `mosaic-tools` as Hive.
    async fn start(test: &str) -> Stack {
        Stack::start_sample_hive(test, false).await
    }

    /// The same with the registry: device-service on a fresh PostgreSQL database with
    /// a token signing key, and a gateway that trusts the tokens it mints.
    async fn start_registry(test: &str) -> Stack {
        Stack::start_sample_hive(test, true).await
    }

    async fn start_sample_hive(test: &str, registry: bool) -> Stack {
        let mut stops = Vec::new();
        let mut tasks = Vec::new();

        // The sample Hive.
        let hive_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hive_addr = hive_listener.local_addr().unwrap();
        let hive_lines = Arc::new(Mutex::new(Vec::new()));
        let (stop, rx) = oneshot::channel();
        stops.push(stop);
        let lines = hive_lines.clone();
        tasks.push(tokio::spawn(async move {
            let cfg = HiveConfig::new(Some(HIVE_SECRET.as_bytes().to_vec()));
            mosaic_tools::hive::serve(
                hive_listener,
                cfg,
                move |l| lines.lock().unwrap().push(l),
                stop_future(rx),
            )
            .await
            .expect("sample Hive runs");
        }));

        let hive_url = format!("http://{hive_addr}/hive");
        Stack::start_services(test, &hive_url, registry, hive_lines, stops, tasks).await
    }

    /// The services, delivering to the Hive at `hive_url`.
    async fn start_with_hive(test: &str, hive_url: &str) -> Stack {
        Stack::start_services(
            test,
            hive_url,
            false,
            Arc::default(),
            Vec::new(),
            Vec::new(),
        )
        .await
    }

    async fn start_services(
        test: &str,
        hive_url: &str,
        registry: bool,
        hive_lines: Arc<Mutex<Vec<String>>>,
        mut stops: Vec<oneshot::Sender<()>>,
        mut tasks: Vec<tokio::task::JoinHandle<()>>,
    ) -> Stack {
        let vhost = broker().vhost(test).await;

        // device-service.
        let mut pairs = vec![
            ("AMQP_URL", vhost.amqp_url.clone()),
            ("HIVE_URL", hive_url.to_owned()),
            ("HIVE_SIGNING_SECRET", HIVE_SECRET.to_owned()),
            ("API_TOKENS", API_TOKEN.to_owned()),
            ("RETRY_BASE_MS", "20".to_owned()),
            ("RETRY_MAX_MS", "200".to_owned()),
            ("SHUTDOWN_GRACE_MS", "2000".to_owned()),
        ];
        if registry {
            pairs.push(("DATABASE_URL", postgres().database(test).await));
            pairs.push((
                "TOKEN_SIGNING_KEY",
                mosaic_tests::token::ED_PRIVATE_PEM.to_owned(),
            ));
        }
        let env: HashMap<String, String> =
            pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        let config =
            match parse::<device_service::Config>(["device-service"], |k| env.get(k).cloned()) {
                Ok(Parsed::Run(c)) => c,
                other => panic!("bad device-service test config: {other:?}"),
            };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api_addr = listener.local_addr().unwrap();
        let (stop, rx) = oneshot::channel();
        stops.push(stop);
        tasks.push(tokio::spawn(async move {
            device_service::run(config, listener, stop_future(rx))
                .await
                .expect("device-service runs");
        }));

        // With the registry, the gateway verifies the tokens device-service mints
        // with the key it publishes.
        let jwks = if registry {
            mosaic_tests::wait::readiness(api_addr, true, WAIT).await;
            let doc = within(
                WAIT,
                "the JWKS document",
                reqwest::get(format!("http://{api_addr}/v1/jwks.json")),
            )
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .text()
            .await
            .unwrap();
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("jwks.json"), doc).unwrap();
            Some(dir)
        } else {
            None
        };

        // websocket-service.
        let keys = jwks
            .as_ref()
            .map(|d| d.path().join("jwks.json").to_string_lossy().into_owned());
        let mut env = env_of(&[("AMQP_URL", &vhost.amqp_url), ("JWT_SECRET", JWT_SECRET)]);
        if let Some(keys) = keys {
            env.insert("JWT_PUBLIC_KEYS".to_owned(), keys);
        }
        let config = match parse::<websocket_service::Config>(["websocket-service"], |k| {
            env.get(k).cloned()
        }) {
            Ok(Parsed::Run(c)) => c,
            other => panic!("bad websocket-service test config: {other:?}"),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ws_addr = listener.local_addr().unwrap();
        let (stop, rx) = oneshot::channel();
        stops.push(stop);
        tasks.push(tokio::spawn(async move {
            websocket_service::run(config, listener, stop_future(rx))
                .await
                .expect("websocket-service runs");
        }));

        let stack = Stack {
            ws_addr,
            api_addr,
            hive_lines,
            jwks,
            stops,
            tasks,
        };
        for addr in [ws_addr, api_addr] {
            mosaic_tests::wait::readiness(addr, true, WAIT).await;
        }
        stack
    }

    /// A call to device-service's REST API with the API token: status and JSON body
    /// (`Null` when there is none).
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = reqwest::Client::new()
            .request(
                method.parse().unwrap(),
                format!("http://{}{path}", self.api_addr),
            )
            .bearer_auth(API_TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = within(WAIT, "a REST answer", req.send()).await.unwrap();
        let status = res.status().as_u16();
        let bytes = within(WAIT, "a REST body", res.bytes()).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }

    /// Lines the sample Hive printed that contain `needle`.
    fn hive_seen(&self, needle: &str) -> Vec<String> {
        let lines = self.hive_lines.lock().unwrap();
        lines
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    async fn stop(mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for task in self.tasks.drain(..) {
            within(WAIT, "the stack to stop", task)
                .await
                .expect("no task panicked");
        }
    }
}
