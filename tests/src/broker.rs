//! A private RabbitMQ for tests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::watchdog::Watchdog;

mod node;

pub use node::{CONSUMER_TIMEOUT_TICK, NodeConfig};
pub(crate) use node::{NodeSpec, check_installed, epmd_path, rabbitmqctl};

/// Where Debian's package keeps the scripts that run as the calling user.
pub(crate) const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";
/// How long a node may take to start (6–9 s idle, up to 17 s beside a build).
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(90);

/// Variable naming an already running broker's AMQP URL (vhost `/`).
pub const AMQP_URL_VAR: &str = "MOSAIC_TEST_AMQP_URL";
/// Variable naming the same broker's management API base URL.
pub const MGMT_URL_VAR: &str = "MOSAIC_TEST_MGMT_URL";

/// A RabbitMQ node, private to this process or shared by the whole test run.
#[derive(Debug)]
pub struct Broker {
    amqp_url: String,
    mgmt_url: String,
    amqp_addr: SocketAddr,
    http: reqwest::Client,
    _private: Option<Private>,
}

#[derive(Debug)]
struct Private {
    /// Stops the node when this process exits, or on drop.
    watchdog: Watchdog,
    dir: tempfile::TempDir,
    /// The node's name and its epmd's port, for `rabbitmqctl`.
    node: String,
    epmd: u16,
}

/// The broker shared by every test in this process: the one the environment names,
/// or a private one started on first use.
pub fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(
        || match (std::env::var(AMQP_URL_VAR), std::env::var(MGMT_URL_VAR)) {
            (Ok(amqp), Ok(mgmt)) => Broker::existing(amqp, mgmt).expect("bad broker URLs"),
            _ => Broker::start().expect("could not start a private RabbitMQ"),
        },
    )
}

/// A vhost of its own for one test: every exchange and queue a test declares lives
/// there, so tests running at once never see each other's messages.
#[derive(Debug, Clone)]
pub struct Vhost {
    /// The vhost's name.
    pub name: String,
    /// AMQP URL of the broker with this vhost selected.
    pub amqp_url: String,
}

impl Broker {
    fn existing(amqp_url: String, mgmt_url: String) -> anyhow::Result<Self> {
        let rest = amqp_url
            .split_once('@')
            .map(|(_, r)| r)
            .context("AMQP URL without credentials")?;
        let hostport = rest.split('/').next().unwrap_or(rest);
        let amqp_addr = hostport
            .parse()
            .with_context(|| format!("AMQP host:port {hostport:?} must be numeric"))?;
        Ok(Broker {
            amqp_url: amqp_url.trim_end_matches('/').to_owned(),
            mgmt_url: mgmt_url.trim_end_matches('/').to_owned(),
            amqp_addr,
            http: mgmt_client(),
            _private: None,
        })
    }

    /// Starts a private node on free loopback ports and waits until it serves AMQP
    /// and its management API.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&NodeConfig::default())
    }

    /// Like [`Broker::start`], with extra configuration: a short `consumer_timeout`,
    /// a memory alarm threshold, an application setting in `advanced.config`.
    ///
    /// ```no_run
    /// # use mosaic_tests::{Broker, broker::NodeConfig};
    /// # use std::time::Duration;
    /// let config = NodeConfig::new()
    ///     .consumer_timeout(Duration::from_secs(3))
    ///     .conf("vm_memory_high_watermark.absolute = 200MB");
    /// let broker = Broker::start_with(&config)?;
    /// # anyhow::Ok(())
    /// ```
    pub fn start_with(config: &NodeConfig) -> anyhow::Result<Self> {
        // A port chosen free can be taken by someone else before the node binds it;
        // the node then fails to boot, and a second choice of ports is made.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_once(config) {
                Err(e) if attempt < 3 && e.to_string().contains(PORT_IN_USE) => {
                    eprintln!("RabbitMQ could not bind a port ({e}); trying other ports");
                }
                other => return other,
            }
        }
    }

    fn start_once(config: &NodeConfig) -> anyhow::Result<Self> {
        check_installed()?;
        let dir = tempfile::Builder::new()
            .prefix("mosaic-rabbit-")
            .tempdir()?;
        let [amqp, dist, epmd, mgmt] = free_ports::<4>()?;
        let node = NodeSpec {
            name: format!("mosaic{amqp}@localhost"),
            dir: dir.path().to_owned(),
            amqp,
            dist,
            mgmt,
        };
        node.write_files(config, "")?;

        let mut cmd = Watchdog::command(WATCHDOG);
        cmd.env("HOME", dir.path())
            .envs(node.env(epmd))
            .env("MOSAIC_RABBIT_BIN", RABBITMQ_BIN)
            .env("MOSAIC_EPMD", epmd_path()?)
            .env("MOSAIC_RABBIT_DIR", dir.path())
            // A node that fails to boot writes its crash dump here, not in the
            // caller's working directory.
            .env("ERL_CRASH_DUMP", dir.path().join("log/erl_crash.dump"));
        let watchdog = Watchdog::spawn(cmd, "broker")?;
        // The watchdog says "started" once epmd and the node were launched.
        let line = watchdog.line(Duration::from_secs(30))?;
        if line.trim() != "started" {
            bail!("broker watchdog failed to start: {line:?}");
        }
        let broker = Broker {
            amqp_url: format!("amqp://guest:guest@127.0.0.1:{amqp}"),
            mgmt_url: format!("http://127.0.0.1:{mgmt}"),
            amqp_addr: SocketAddr::from(([127, 0, 0, 1], amqp)),
            http: mgmt_client(),
            _private: Some(Private {
                watchdog,
                dir,
                node: node.name,
                epmd,
            }),
        };
        broker.wait_until_up(mgmt)?;
        Ok(broker)
    }

    fn wait_until_up(&self, mgmt: u16) -> anyhow::Result<()> {
        let started = Instant::now();
        let mgmt_addr = SocketAddr::from(([127, 0, 0, 1], mgmt));
        loop {
            let amqp_up =
                TcpStream::connect_timeout(&self.amqp_addr, Duration::from_millis(200)).is_ok();
            if amqp_up && http_ok(mgmt_addr, "/api/overview") {
                return Ok(());
            }
            if let Some(p) = &self._private
                && let Some(status) = p.watchdog.exited()
            {
                bail!("RabbitMQ exited during start ({status})");
            }
            let out = self
                .log_dir()
                .and_then(|d| std::fs::read_to_string(d.join("server.out")).ok())
                .unwrap_or_default();
            if out.contains("BOOT FAILED") {
                let port_clash = out.contains("port_already_used") || out.contains("eaddrinuse");
                bail!(
                    "RabbitMQ failed to boot{}:\n{out}",
                    if port_clash { PORT_IN_USE } else { "" }
                );
            }
            if started.elapsed() > START_TIMEOUT {
                let out = self
                    .log_dir()
                    .and_then(|d| std::fs::read_to_string(d.join("server.out")).ok())
                    .unwrap_or_default();
                bail!("RabbitMQ did not come up within {START_TIMEOUT:?}; its output:\n{out}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// AMQP URL of the default vhost.
    pub fn amqp_url(&self) -> &str {
        &self.amqp_url
    }

    /// Base URL of the management HTTP API.
    pub fn mgmt_url(&self) -> &str {
        &self.mgmt_url
    }

    /// The AMQP listener's address (for a fault proxy in front of it).
    pub fn amqp_addr(&self) -> SocketAddr {
        self.amqp_addr
    }

    /// Runs `rabbitmqctl` with `args` against a node this process started (to raise
    /// an alarm, say) and returns its output. Blocking; bounded by the tool's own
    /// 30 s timeout. A node started by someone else is refused: changing it would
    /// disturb every test sharing it.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let p = self
            ._private
            .as_ref()
            .context("rabbitmqctl is only run against a node of this process")?;
        rabbitmqctl(p.dir.path(), p.epmd, &p.node, args)
    }

    /// The node's log directory, when this process started the node.
    pub fn log_dir(&self) -> Option<PathBuf> {
        self._private.as_ref().map(|p| p.dir.path().join("log"))
    }

    /// The process id of the node's Erlang VM (`beam.smp`), from its pid file, when
    /// this process started the node: for reading its memory and CPU in `/proc`.
    pub fn pid(&self) -> Option<u32> {
        let p = self._private.as_ref()?;
        std::fs::read_to_string(p.dir.path().join("rabbit.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Creates a fresh vhost named after `test` plus a random suffix, grants the
    /// guest user everything on it, and returns its AMQP URL.
    pub async fn vhost(&self, test: &str) -> Vhost {
        let name = format!("{test}-{}", uuid::Uuid::new_v4().simple());
        let enc = percent(&name);
        let put = |path: String, body: serde_json::Value| {
            let req = self
                .http
                .put(format!("{}{path}", self.mgmt_url))
                .basic_auth("guest", Some("guest"))
                .json(&body);
            async move {
                let res = req.send().await.expect("management API unreachable");
                assert!(
                    res.status().is_success(),
                    "management API refused {path}: {}",
                    res.status()
                );
            }
        };
        put(format!("/api/vhosts/{enc}"), serde_json::json!({})).await;
        put(
            format!("/api/permissions/{enc}/guest"),
            serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}),
        )
        .await;
        Vhost {
            amqp_url: format!("{}/{enc}", self.amqp_url),
            name,
        }
    }

    /// Asks the management API for the JSON at `path` (e.g. `/api/queues/<vhost>`).
    pub async fn mgmt_get(&self, path: &str) -> serde_json::Value {
        self.http
            .get(format!("{}{path}", self.mgmt_url))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .expect("management API unreachable")
            .error_for_status()
            .expect("management API error")
            .json()
            .await
            .expect("management API answered non-JSON")
    }

    /// Stops a private node now (it also stops when the process exits).
    pub fn stop(&self) {
        if let Some(p) = &self._private {
            p.watchdog.stop();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs as `sh -c`: starts a private epmd and the node, prints "started", waits for
/// its stdin to close, then stops the node and epmd and waits for both.
const WATCHDOG: &str = r#"
set -u
B="$MOSAIC_RABBIT_BIN"; D="$MOSAIC_RABBIT_DIR"; EPMD="$MOSAIC_EPMD"
"$EPMD" -port "$ERL_EPMD_PORT" -address 127.0.0.1 >/dev/null 2>&1 </dev/null &
epmd_pid=$!
"$B/rabbitmq-server" >"$D/log/server.out" 2>&1 </dev/null &
node_pid=$!
echo started
cat >/dev/null
kill -TERM "$node_pid" 2>/dev/null
wait "$node_pid" 2>/dev/null
# The node's own children (inet_gethost, erl_child_setup) go with beam; epmd last.
kill -TERM "$epmd_pid" 2>/dev/null
wait "$epmd_pid" 2>/dev/null
rm -rf "$D"
exit 0
"#;

/// What a boot failure over a port taken by someone else says (a retry is worth it).
const PORT_IN_USE: &str = " (a port it was given is in use)";

/// The lowest port [`free_ports`] hands out.
const FREE_PORTS_FROM: u16 = 20_000;

/// Distinct free TCP ports on 127.0.0.1 (all held until every one is chosen), below
/// the kernel's ephemeral range when there is room for them there.
///
/// A port chosen here is bound later by another process: a RabbitMQ node binds its
/// ports seconds later. A port of the ephemeral range (what binding port 0 gives)
/// can be taken meanwhile as the local port of any outgoing connection on the
/// machine, and tests open many (a connection that closes keeps its port in
/// TIME_WAIT for a minute): the node then fails to boot ("could not bind to
/// distribution port"). Outgoing connections never use ports below the range.
/// Each candidate is checked by binding it without `SO_REUSEADDR`, as a server that
/// does not set it would, so a port held in TIME_WAIT is passed over too.
pub fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let low = ephemeral_low().unwrap_or(32_768);
    if low < FREE_PORTS_FROM + 1_000 {
        return ephemeral_ports();
    }
    let span = u128::from(low - FREE_PORTS_FROM);
    let mut held = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    let mut tries = 0;
    while held.len() < N {
        tries += 1;
        if tries > 10_000 {
            bail!("no {N} free ports between {FREE_PORTS_FROM} and {low}");
        }
        let port = FREE_PORTS_FROM + (uuid::Uuid::new_v4().as_u128() % span) as u16;
        let socket = tokio::net::TcpSocket::new_v4()?;
        if socket
            .bind(SocketAddr::from(([127, 0, 0, 1], port)))
            .is_ok()
        {
            ports[held.len()] = port;
            held.push(socket);
        }
    }
    Ok(ports)
}

/// The first port of the kernel's ephemeral range (Linux).
fn ephemeral_low() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// Distinct free ports the kernel chooses (from its ephemeral range).
fn ephemeral_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    let mut ports = [0u16; N];
    for (p, l) in ports.iter_mut().zip(&listeners) {
        *p = l.local_addr()?.port();
    }
    Ok(ports)
}

fn http_ok(addr: SocketAddr, path: &str) -> bool {
    mgmt_get_blocking(addr, path).is_some()
}

/// `GET path` on a management listener as guest, blocking, each step bounded by 2 s;
/// the body of a 200 answer, else `None`.
pub(crate) fn mgmt_get_blocking(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    // guest:guest
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\n\r\n"
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    let status = head.lines().next()?;
    status.contains(" 200 ").then(|| body.to_owned())
}

/// A management API client that keeps no idle connection: tests run on runtimes of
/// their own, and a pooled connection dies with the runtime that opened it.
fn mgmt_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("an HTTP client")
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ports = free_ports::<8>().unwrap();
        let low = ephemeral_low().unwrap_or(32_768);
        for (i, p) in ports.iter().enumerate() {
            assert!(!ports[..i].contains(p), "{ports:?}");
            if low >= FREE_PORTS_FROM + 1_000 {
                assert!(
                    (FREE_PORTS_FROM..low).contains(p),
                    "{p} (range starts at {low})"
                );
            }
            // Free once chosen: a server can listen on it.
            TcpListener::bind(("127.0.0.1", *p)).unwrap();
        }
    }
}
