//! The whole product in one process: RabbitMQ, websocket-service and device-service
//! started in-process through their `run`, with a Hive in front of device-service.
//!
//! - `e2e`: real devices, the REST API and a recording Hive stand-in: what a device
//!   sends reaches Hive unchanged, what Hive sends reaches the device, and requests
//!   end honestly (answered, device gone, device offline).
//! - `numbers`: random device frames (property test) and awkward number texts reach
//!   Hive with every number exactly as the device sent it.
//! - `examples`: the example device clients (`examples/python`, `examples/node`) and
//!   the simulator against the sample Hive of `mosaic-tools`.

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
use mosaic_tests::{broker, within};
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
        Stack::start_services(test, &hive_url, hive_lines, stops, tasks).await
    }

    /// The services, delivering to the Hive at `hive_url`.
    async fn start_with_hive(test: &str, hive_url: &str) -> Stack {
        Stack::start_services(test, hive_url, Arc::default(), Vec::new(), Vec::new()).await
    }

    async fn start_services(
        test: &str,
        hive_url: &str,
        hive_lines: Arc<Mutex<Vec<String>>>,
        mut stops: Vec<oneshot::Sender<()>>,
        mut tasks: Vec<tokio::task::JoinHandle<()>>,
    ) -> Stack {
        let vhost = broker().vhost(test).await;
        // websocket-service.
        let env = env_of(&[("AMQP_URL", &vhost.amqp_url), ("JWT_SECRET", JWT_SECRET)]);
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

        // device-service.
        let env = env_of(&[
            ("AMQP_URL", &vhost.amqp_url),
            ("HIVE_URL", hive_url),
            ("HIVE_SIGNING_SECRET", HIVE_SECRET),
            ("API_TOKENS", API_TOKEN),
            ("RETRY_BASE_MS", "20"),
            ("RETRY_MAX_MS", "200"),
            ("SHUTDOWN_GRACE_MS", "2000"),
        ]);
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

        let stack = Stack {
            ws_addr,
            api_addr,
            hive_lines,
            stops,
            tasks,
        };
        for addr in [ws_addr, api_addr] {
            mosaic_tests::wait::readiness(addr, true, WAIT).await;
        }
        stack
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
