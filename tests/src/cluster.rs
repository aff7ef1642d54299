//! A RabbitMQ cluster of several nodes on this machine, private to the test process.
//!
//! Nodes are numbered from 0. Each node has its own name (`mosaic<epmd>-<i>@localhost`), AMQP, distribution and
//! management ports, and its own data and log directories. The nodes share one
//! private epmd (Erlang nodes find each other through it) and one Erlang cookie
//! (`.erlang.cookie` in the shared `HOME`). They cluster at first boot by classic
//! peer discovery: each lists all the node names, the first to take the discovery
//! lock starts the cluster and the others join it.
//!
//! One watchdog shell owns epmd and every node: commands on its pipe stop, kill and
//! start single nodes; when the pipe closes (the test process ended, however it
//! ended) it stops every node, then epmd, and removes the directories.
//!
//! The control methods block (a node takes seconds to start or stop): call them from
//! a multi-threaded runtime through `tokio::task::block_in_place`, or from
//! `spawn_blocking`.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::broker::{
    self, NodeConfig, NodeSpec, RABBITMQ_BIN, START_TIMEOUT, epmd_path, free_ports,
    mgmt_get_blocking, rabbitmqctl,
};
use crate::watchdog::Watchdog;

/// How long a clean stop of one node may take (6 s measured for a member of a
/// three-node cluster holding a quorum queue, on a loaded two-core machine).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// A cluster of RabbitMQ nodes on loopback, stopped when the test process exits.
///
/// ```no_run
/// # use mosaic_tests::Cluster;
/// let cluster = Cluster::start(3)?;
/// let urls = cluster.amqp_urls(); // "amqp://guest:guest@127.0.0.1:P0,amqp://...:P1,..."
/// cluster.stop_node(1)?;
/// cluster.start_node(1)?; // same data directory: it rejoins
/// # anyhow::Ok(())
/// ```
#[derive(Debug)]
pub struct Cluster {
    nodes: Vec<NodeSpec>,
    epmd: u16,
    /// `HOME` of every node (the cookie) and the parent of their directories.
    dir: tempfile::TempDir,
    /// The nodes stopped or killed through [`Cluster::stop_node`] and
    /// [`Cluster::kill_node`], and not started since.
    down: Mutex<BTreeSet<usize>>,
    watchdog: Watchdog,
}

impl Cluster {
    /// Starts `n` nodes and waits until all of them are running members of one
    /// cluster and serve AMQP and the management API.
    pub fn start(n: usize) -> anyhow::Result<Cluster> {
        Self::start_with(n, &NodeConfig::default())
    }

    /// Like [`Cluster::start`], with the same extra configuration on every node.
    pub fn start_with(n: usize, config: &NodeConfig) -> anyhow::Result<Cluster> {
        broker::check_installed()?;
        if n == 0 {
            bail!("a cluster needs at least one node");
        }
        let dir = tempfile::Builder::new()
            .prefix("mosaic-cluster-")
            .tempdir()?;
        let [epmd] = free_ports::<1>()?;
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let [amqp, dist, mgmt] = free_ports::<3>()?;
            nodes.push(NodeSpec {
                name: format!("mosaic{epmd}-{i}@localhost"),
                dir: dir.path().join(format!("n{i}")),
                amqp,
                dist,
                mgmt,
            });
        }
        let mut discovery = String::from(
            "cluster_formation.peer_discovery_backend = classic_config\n\
             cluster_formation.discovery_retry_limit = 3\n\
             cluster_formation.discovery_retry_interval = 300\n",
        );
        for (i, node) in nodes.iter().enumerate() {
            writeln!(
                discovery,
                "cluster_formation.classic_config.nodes.{} = {}",
                i + 1,
                node.name
            )?;
        }
        // One cookie for every node and for rabbitmqctl, written before any node
        // starts (nodes starting together would each write their own).
        let cookie = dir.path().join(".erlang.cookie");
        std::fs::write(&cookie, uuid::Uuid::new_v4().simple().to_string())?;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))?;
        for node in &nodes {
            node.write_files(config, &discovery)?;
            let mut env = format!("export HOME={}\n", quote(&dir.path().to_string_lossy()));
            for (k, v) in node.env(epmd) {
                writeln!(env, "export {k}={}", quote(&v.to_string_lossy()))?;
            }
            std::fs::write(node.dir.join("env.sh"), env)?;
        }

        let mut cmd = Watchdog::command(WATCHDOG);
        cmd.env("MOSAIC_RABBIT_BIN", RABBITMQ_BIN)
            .env("MOSAIC_RABBIT_DIR", dir.path())
            .env("MOSAIC_EPMD", epmd_path()?)
            .env("MOSAIC_EPMD_PORT", epmd.to_string())
            .env("MOSAIC_NODES", n.to_string());
        let watchdog = Watchdog::spawn(cmd, "cluster")?;
        let line = watchdog.line(Duration::from_secs(30))?;
        if line.trim() != "started" {
            bail!("cluster watchdog failed to start: {line:?}");
        }
        let cluster = Cluster {
            nodes,
            epmd,
            dir,
            down: Mutex::new(BTreeSet::new()),
            watchdog,
        };
        let all: Vec<usize> = (0..n).collect();
        cluster.wait_running(&all, START_TIMEOUT)?;
        Ok(cluster)
    }

    /// How many nodes the cluster has.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node (never: [`Cluster::start`] refuses zero).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s Erlang name, `mosaic<epmd>-<i>@localhost`.
    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Node `i`'s AMQP URL (vhost `/`, user guest).
    pub fn amqp_url(&self, i: usize) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}", self.nodes[i].amqp)
    }

    /// Every node's AMQP URL, comma-joined, in node order.
    pub fn amqp_urls(&self) -> String {
        (0..self.len())
            .map(|i| self.amqp_url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `i`'s AMQP listener (for a fault proxy in front of it).
    pub fn amqp_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.nodes[i].amqp))
    }

    /// Base URL of node `i`'s management HTTP API (guest/guest).
    pub fn mgmt_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].mgmt)
    }

    /// The cluster's directory: the shared `HOME` with the cookie, and each node's
    /// directory `n<i>/`. Removed when the cluster stops.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Node `i`'s log directory (`<node name>.log`, `server.out`).
    pub fn log_dir(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("log")
    }

    /// Runs `rabbitmqctl -n <node i> args` and returns its output. Blocking; bounded
    /// by the tool's own 30 s timeout.
    pub fn ctl(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        rabbitmqctl(self.dir.path(), self.epmd, &self.nodes[i].name, args)
    }

    /// The names of the nodes that node `i`'s management API reports running, or
    /// `None` when it does not answer.
    pub fn running_nodes(&self, i: usize) -> Option<Vec<String>> {
        let mgmt = SocketAddr::from(([127, 0, 0, 1], self.nodes[i].mgmt));
        let body = mgmt_get_blocking(mgmt, "/api/nodes?columns=name,running")?;
        let nodes: Vec<serde_json::Value> = serde_json::from_str(&body).ok()?;
        Some(
            nodes
                .iter()
                .filter(|n| n["running"] == serde_json::Value::Bool(true))
                .filter_map(|n| n["name"].as_str().map(str::to_owned))
                .collect(),
        )
    }

    /// Waits until every node in `nodes` serves AMQP and one of them reports all of
    /// them running members of the cluster; fails after `timeout`, or at once when
    /// the watchdog is gone.
    pub fn wait_running(&self, nodes: &[usize], timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        let want: Vec<&str> = nodes.iter().map(|&i| self.node_name(i)).collect();
        let mut last = None;
        loop {
            let amqp_up = nodes.iter().all(|&i| {
                TcpStream::connect_timeout(&self.amqp_addr(i), Duration::from_millis(200)).is_ok()
            });
            if amqp_up {
                for &i in nodes {
                    if let Some(running) = self.running_nodes(i) {
                        if want.iter().all(|w| running.iter().any(|r| r == w)) {
                            return Ok(());
                        }
                        last = Some(running);
                    }
                }
            }
            if let Some(status) = self.watchdog.exited() {
                bail!("the cluster watchdog exited ({status})");
            }
            if started.elapsed() > timeout {
                let logs: String = nodes
                    .iter()
                    .map(|&i| {
                        let out = std::fs::read_to_string(self.log_dir(i).join("server.out"))
                            .unwrap_or_default();
                        format!("--- {} ---\n{out}\n", self.node_name(i))
                    })
                    .collect();
                bail!(
                    "nodes {want:?} not all running within {timeout:?} (last seen running: \
                     {last:?}); their output:\n{logs}"
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops node `i` cleanly (SIGTERM to its launcher, as a service manager does)
    /// and waits until its process has exited. Its data directory stays.
    pub fn stop_node(&self, i: usize) -> anyhow::Result<()> {
        self.command("stop", i, STOP_TIMEOUT)?;
        self.down.lock().unwrap().insert(i);
        Ok(())
    }

    /// Kills node `i`'s Erlang VM with SIGKILL (a crash, a lost machine) and waits
    /// until it is gone. Its data directory stays.
    pub fn kill_node(&self, i: usize) -> anyhow::Result<()> {
        self.command("kill", i, STOP_TIMEOUT)?;
        self.down.lock().unwrap().insert(i);
        Ok(())
    }

    /// Starts node `i` again on its ports and data directory (after a clean stop when
    /// it is running) and waits until it and every other node not stopped through
    /// this type are reported running members of one cluster: it has rejoined.
    pub fn start_node(&self, i: usize) -> anyhow::Result<()> {
        self.command("start", i, Duration::from_secs(30))?;
        let up: Vec<usize> = {
            let mut down = self.down.lock().unwrap();
            down.remove(&i);
            (0..self.len()).filter(|n| !down.contains(n)).collect()
        };
        self.wait_running(&up, START_TIMEOUT)
    }

    fn command(&self, verb: &str, i: usize, timeout: Duration) -> anyhow::Result<()> {
        if i >= self.len() {
            bail!("no node {i} in a cluster of {}", self.len());
        }
        let answer = self
            .watchdog
            .send(&format!("{verb} {i}"), timeout)
            .with_context(|| format!("{verb} node {i}"))?;
        let done = match verb {
            "stop" => "stopped",
            "kill" => "killed",
            _ => "started",
        };
        if answer.trim() != format!("{done} {i}") {
            bail!("{verb} node {i}: the watchdog answered {answer:?}");
        }
        Ok(())
    }

    /// Stops every node, then epmd, and removes the directories (also done when the
    /// process exits, or on drop).
    pub fn stop(&self) {
        self.watchdog.stop();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `s` in single quotes for `sh`.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs as `sh -c`: starts epmd and every node, prints "started", then serves
/// commands on its standard input, one per line, each answered with one line:
/// `stop I` -> `stopped I` (SIGTERM to the launcher, which stops the VM cleanly),
/// `kill I` -> `killed I` (SIGKILL to the VM), `start I` -> `started I` (after a
/// clean stop when it was running). At
/// end-of-file it stops every node, then epmd, and removes the directories.
const WATCHDOG: &str = r#"
set -u
B="$MOSAIC_RABBIT_BIN"; D="$MOSAIC_RABBIT_DIR"; N="$MOSAIC_NODES"
"$MOSAIC_EPMD" -port "$MOSAIC_EPMD_PORT" -address 127.0.0.1 >/dev/null 2>&1 </dev/null &
epmd_pid=$!
launch() {
  rm -f "$D/n$1/rabbit.pid"
  ( . "$D/n$1/env.sh"; exec "$B/rabbitmq-server" ) >>"$D/n$1/log/server.out" 2>&1 </dev/null &
  eval "pid_$1=$!"
}
stop_node() {
  eval "p=\${pid_$1:-}"
  if [ -n "$p" ]; then
    kill -TERM "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  fi
  eval "pid_$1="
}
kill_node() {
  eval "p=\${pid_$1:-}"
  [ -n "$p" ] || return 1
  # The VM is the launcher's child; the pid file names it once it has booted.
  vm=$(cat "$D/n$1/rabbit.pid" 2>/dev/null || true)
  [ -n "$vm" ] && [ -r "/proc/$vm/stat" ] || return 1
  read -r _ _ _ parent _ <"/proc/$vm/stat"
  [ "$parent" = "$p" ] || return 1
  kill -KILL "$vm" 2>/dev/null
  wait "$p" 2>/dev/null
  eval "pid_$1="
}
i=0; while [ "$i" -lt "$N" ]; do launch "$i"; i=$((i + 1)); done
echo started
while read -r verb node; do
  case "$verb" in
    start) stop_node "$node"; launch "$node"; echo "started $node" ;;
    stop) stop_node "$node"; echo "stopped $node" ;;
    kill) if kill_node "$node"; then echo "killed $node"; else echo "no VM running for node $node"; fi ;;
    *) echo "unknown command $verb" ;;
  esac
done
# Signal every node first so that they stop together, then wait for each.
i=0
while [ "$i" -lt "$N" ]; do
  eval "p=\${pid_$i:-}"
  [ -n "$p" ] && kill -TERM "$p" 2>/dev/null
  i=$((i + 1))
done
i=0; while [ "$i" -lt "$N" ]; do stop_node "$i"; i=$((i + 1)); done
kill -TERM "$epmd_pid" 2>/dev/null
wait "$epmd_pid" 2>/dev/null
rm -rf "$D"
exit 0
"#;
