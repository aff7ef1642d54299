//! What a scenario runs against: a private RabbitMQ (with the Web-MQTT plugin for
//! the baselines), the release binaries of the services, and a Hive receiver.
//!
//! Every process started here stops when the tool ends, however it ends: the broker
//! through the test harness's watchdog, each service through a supervising shell
//! that holds a pipe only this process writes to (its end, at this process's exit,
//! sends the service SIGTERM), and the load processes by the end of their standard
//! input.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::body::Bytes;
use mosaic_tests::{Broker, NodeConfig, Vhost};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin};

use crate::procfs::now_us;

/// The gateways' HMAC secret (a bench-only value, never deployed).
pub const JWT_SECRET: &str = "bench-secret-0123456789-0123456789-abcdef";
/// device-service's API token (a bench-only value).
pub const API_TOKEN: &str = "bench-token-0123456789abcdef";
/// How long a service may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The private broker of a run.
#[derive(Debug)]
pub struct Stack {
    /// The node.
    pub broker: Broker,
    /// Its Erlang VM's pid.
    pub broker_pid: u32,
    /// Its Web-MQTT listener (`ws://addr/ws`).
    pub web_mqtt: SocketAddr,
    /// Where the service binaries are.
    pub bin_dir: PathBuf,
    /// The services' `RUST_LOG` (their standard error is this tool's).
    pub service_log: String,
    /// RabbitMQ's version, from the management API.
    pub rabbitmq_version: String,
    /// Erlang's version.
    pub erlang_version: String,
    /// The node's name (for the management API's memory breakdown).
    pub node: String,
}

impl Stack {
    /// Starts a private RabbitMQ with Web-MQTT on a free port; checks the service
    /// binaries are in `bin_dir`.
    pub async fn start(bin_dir: PathBuf, service_log: String) -> anyhow::Result<Self> {
        for bin in ["websocket-service", "device-service"] {
            if !bin_dir.join(bin).is_file() {
                bail!(
                    "{} is missing: build the services first (cargo build --release -p websocket-service -p device-service), or name their directory with --bin-dir",
                    bin_dir.join(bin).display()
                );
            }
        }
        // Free ports are chosen before the node binds them: on a machine where other
        // brokers start too, one may be taken in between. One more try then.
        let mut attempt = 0;
        let (broker, web_mqtt) = loop {
            attempt += 1;
            let [web_mqtt, mqtt] = mosaic_tests::broker::free_ports::<2>()?;
            let config = NodeConfig::new()
                .plugin("rabbitmq_web_mqtt")
                .conf(format!("mqtt.listeners.tcp.default = 127.0.0.1:{mqtt}"))
                .conf("web_mqtt.tcp.ip = 127.0.0.1")
                .conf(format!("web_mqtt.tcp.port = {web_mqtt}"))
                .conf("web_mqtt.max_connections = infinity")
                .conf("mqtt.allow_anonymous = false");
            match tokio::task::spawn_blocking(move || Broker::start_with(&config)).await? {
                Ok(b) => break (b, web_mqtt),
                Err(e) if attempt < 2 => {
                    eprintln!(
                        "mosaic-bench: RabbitMQ did not start ({}); trying again",
                        e.to_string().lines().next().unwrap_or("")
                    );
                }
                Err(e) => return Err(e),
            }
        };
        let broker_pid = broker.pid().context("the broker's pid file holds no pid")?;
        crate::procfs::track(broker_pid);
        let overview = broker.mgmt_get("/api/overview").await;
        let text = |k: &str| overview[k].as_str().unwrap_or_default().to_owned();
        Ok(Stack {
            web_mqtt: SocketAddr::from(([127, 0, 0, 1], web_mqtt)),
            broker_pid,
            bin_dir,
            service_log,
            rabbitmq_version: text("rabbitmq_version"),
            erlang_version: text("erlang_version"),
            node: text("node"),
            broker,
        })
    }

    /// A fresh vhost.
    pub async fn vhost(&self, name: &str) -> Vhost {
        self.broker.vhost(name).await
    }

    /// The node's file and socket limits and use (`fd_total`, `fd_used`,
    /// `sockets_total`, `sockets_used` of `/api/nodes/<node>`).
    pub async fn broker_limits(&self) -> serde_json::Value {
        let v = self
            .broker
            .mgmt_get(&format!("/api/nodes/{}", self.node))
            .await;
        serde_json::json!({
            "fd_total": v["fd_total"], "fd_used": v["fd_used"],
            "sockets_total": v["sockets_total"], "sockets_used": v["sockets_used"],
        })
    }

    /// The last `n` warning and error lines of the broker's log.
    pub fn broker_log(&self, n: usize) -> Vec<String> {
        let Some(dir) = self.broker.log_dir() else {
            return Vec::new();
        };
        let mut lines: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .flat_map(|t| t.lines().map(str::to_owned).collect::<Vec<_>>())
            .filter(|l| l.contains("[error]") || l.contains("[warning]"))
            .collect();
        let skip = lines.len().saturating_sub(n);
        lines.drain(..skip);
        lines
    }

    /// The broker's memory by category, in bytes (`/api/nodes/<node>/memory`),
    /// with `total_erlang` and `total_rss`.
    pub async fn broker_memory(&self) -> serde_json::Map<String, serde_json::Value> {
        let v = self
            .broker
            .mgmt_get(&format!("/api/nodes/{}/memory", self.node))
            .await;
        let mut m = v["memory"].as_object().cloned().unwrap_or_default();
        if let Some(total) = m.remove("total") {
            m.insert("total_erlang".into(), total["erlang"].clone());
            m.insert("total_rss".into(), total["rss"].clone());
        }
        m
    }

    /// Starts one gateway replica (its output is discarded but for errors).
    pub async fn gateway(&self, vhost: &Vhost, extra: &[(&str, &str)]) -> anyhow::Result<Service> {
        let mut vars = vec![
            ("AMQP_URL", vhost.amqp_url.as_str()),
            ("JWT_SECRET", JWT_SECRET),
            ("RUST_LOG", self.service_log.as_str()),
            ("LOG_FORMAT", "text"),
            // At most 19,500 devices and 256 plain HTTP connections: within the 20,000
            // open files a process may hold here.
            ("MAX_CONNECTIONS", "19500"),
            ("MAX_HTTP_CONNECTIONS", "256"),
        ];
        vars.extend_from_slice(extra);
        Service::start(&self.bin_dir.join("websocket-service"), &vars).await
    }

    /// Starts device-service, posting to `hive`.
    pub async fn device_service(
        &self,
        vhost: &Vhost,
        hive: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Service> {
        let mut vars = vec![
            ("AMQP_URL", vhost.amqp_url.as_str()),
            ("HIVE_URL", hive),
            ("API_TOKENS", API_TOKEN),
            ("RUST_LOG", self.service_log.as_str()),
            ("LOG_FORMAT", "text"),
        ];
        vars.extend_from_slice(extra);
        Service::start(&self.bin_dir.join("device-service"), &vars).await
    }
}

/// Runs as `sh -c`: starts the service in the background, prints its pid, waits for
/// standard input to close, then sends it SIGTERM and waits for it.
const SUPERVISE: &str = r#"
"$0" "$@" </dev/null &
pid=$!
echo "$pid"
cat >/dev/null
kill -TERM "$pid" 2>/dev/null
wait "$pid"
"#;

/// A service binary running on a free loopback port.
#[derive(Debug)]
pub struct Service {
    shell: Child,
    pipe: Option<ChildStdin>,
    /// The service's own pid (not the shell's).
    pub pid: u32,
    /// Its `LISTEN_ADDR`.
    pub addr: SocketAddr,
}

impl Service {
    async fn start(bin: &Path, vars: &[(&str, &str)]) -> anyhow::Result<Service> {
        let [port] = mosaic_tests::broker::free_ports::<1>()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut shell = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(SUPERVISE)
            .arg(bin)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(vars.iter().copied())
            .env("LISTEN_ADDR", addr.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Ctrl-C reaches this tool, which stops the services in order.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pipe = shell.stdin.take();
        let out = shell.stdout.take().context("the shell's stdout")?;
        let mut lines = BufReader::new(out).lines();
        let pid: u32 = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .context("the service's pid")??
            .context("the supervising shell ended")?
            .trim()
            .parse()?;
        crate::procfs::track(pid);
        let service = Service {
            shell,
            pipe,
            pid,
            addr,
        };
        service.wait_ready(bin).await?;
        Ok(service)
    }

    async fn wait_ready(&self, bin: &Path) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let url = format!("http://{}/readyz", self.addr);
        let started = Instant::now();
        loop {
            if let Ok(r) = http.get(&url).timeout(Duration::from_secs(2)).send().await
                && r.status() == 200
            {
                return Ok(());
            }
            if crate::procfs::rss_kib(self.pid) == 0 {
                bail!("{} exited during start", bin.display());
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!("{} not ready within {READY_TIMEOUT:?}", bin.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM (by closing the pipe) and waits for the exit, at most 60 s;
    /// returns how long the service took.
    pub async fn stop(mut self) -> Duration {
        let started = Instant::now();
        crate::procfs::retire(self.pid);
        self.pipe = None;
        if tokio::time::timeout(Duration::from_secs(60), self.shell.wait())
            .await
            .is_err()
        {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &self.pid.to_string()])
                .status();
            let _ = self.shell.kill().await;
        }
        started.elapsed()
    }
}

/// A Hive that answers 200 at once, counts deliveries of device events (`"kind":
/// "event"`) and notes when the latest arrived.
#[derive(Debug, Clone)]
pub struct Hive {
    /// `http://127.0.0.1:port/hive`.
    pub url: String,
    /// Device events received.
    pub events: Arc<AtomicU64>,
    /// Every POST received.
    pub posts: Arc<AtomicU64>,
    /// Time of the latest event (µs since the epoch).
    pub last_event_us: Arc<AtomicU64>,
}

impl Hive {
    /// Serves on a free loopback port until the process ends.
    pub async fn start() -> anyhow::Result<Hive> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let hive = Hive {
            url: format!("http://{}/hive", listener.local_addr()?),
            events: Arc::default(),
            posts: Arc::default(),
            last_event_us: Arc::default(),
        };
        let app = axum::Router::new().route(
            "/hive",
            axum::routing::post({
                let hive = hive.clone();
                move |body: Bytes| async move {
                    hive.posts.fetch_add(1, Ordering::Relaxed);
                    const EVENT: &[u8] = b"\"kind\":\"event\"";
                    if body.windows(EVENT.len()).any(|w| w == EVENT) {
                        hive.events.fetch_add(1, Ordering::Relaxed);
                        hive.last_event_us.store(now_us(), Ordering::Relaxed);
                    }
                    axum::http::StatusCode::OK
                }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(hive)
    }

    /// Waits until `n` device events arrived in all, at most `timeout`; the count then.
    pub async fn wait_events(&self, n: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        while self.events.load(Ordering::Relaxed) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.events.load(Ordering::Relaxed)
    }
}

/// The directory of this executable: where `cargo build` puts the service binaries
/// beside it.
pub fn default_bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target/release"))
}
