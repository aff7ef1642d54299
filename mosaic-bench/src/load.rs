//! Load processes: the clients (devices, MQTT clients) live in processes of their
//! own, so that no process holds more open files than one process may here, and the
//! coordinator's own measurements are not disturbed by its clients.
//!
//! The coordinator starts this same executable with the hidden `load-process`
//! argument, writes one [`Job`] as a JSON line to its standard input, then
//! [`Command`]s; the load process answers with [`Report`] lines on its standard
//! output. When the coordinator ends, however it ends, the load process sees its
//! standard input close and stops.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;
use uuid::Uuid;

pub mod worker;

/// The hidden argument that makes the executable a load process.
pub const LOAD_PROCESS_ARG: &str = "load-process";

/// Loopback source addresses per load process: 16, so a process holding 10,000
/// connections uses each address for at most 625 of them.
const SOURCES_PER_PROCESS: usize = 16;

/// What one load process does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "job", rename_all = "snake_case")]
pub enum Job {
    /// Open `count` connections and hold them idle.
    Hold(HoldJob),
    /// Run simulated devices (the simulator's device loop).
    Simulate(SimulateJob),
}

/// Where held connections go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// Gateway replicas: connection `i` goes to `addrs[i % len]`, with a header token.
    Gateway {
        /// The replicas' addresses.
        addrs: Vec<SocketAddr>,
        /// The HMAC secret tokens are signed with.
        secret: String,
    },
    /// RabbitMQ's Web-MQTT listener: CONNECT, then SUBSCRIBE to `topic`.
    Mqtt {
        /// The listener.
        addr: SocketAddr,
        /// The one subscription of each client.
        topic: String,
        /// Client ids are `<prefix>-<index>`.
        client_prefix: String,
    },
}

/// Hold idle connections.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HoldJob {
    /// Where.
    pub target: Target,
    /// How many.
    pub count: usize,
    /// The index of the first (connections are numbered across load processes).
    pub first_index: usize,
    /// Connects in flight at once.
    pub concurrency: usize,
    /// Loopback addresses to connect from, in turn.
    pub sources: Vec<IpAddr>,
}

/// Run simulated devices.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimulateJob {
    /// Gateway replicas: device `i` goes to `addrs[i % len]`.
    pub addrs: Vec<SocketAddr>,
    /// The HMAC secret devices mint their tokens with.
    pub secret: String,
    /// How many devices.
    pub devices: usize,
    /// Time between two events of one device; `None`: no events.
    pub interval_ms: Option<u64>,
    /// Events per device in all; `None`: until stopped.
    pub events_per_device: Option<u64>,
    /// Events of one device waiting for their ack at once.
    pub max_in_flight: usize,
    /// First connects spread over this long.
    pub ramp_ms: u64,
    /// Loopback addresses to connect from, in turn.
    pub sources: Vec<IpAddr>,
}

/// What the coordinator asks of a running load process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Forget earlier arrivals: the next frame each connection gets is timed.
    Arm,
    /// Report the arrival times once every connection had a frame, or at the timeout.
    Collect {
        /// Bound on the wait.
        timeout_ms: u64,
    },
    /// Ping every connection (WebSocket ping, or MQTT PINGREQ) and count answers.
    Ping {
        /// Bound on the wait.
        timeout_ms: u64,
    },
    /// List the simulated devices again.
    Devices,
    /// Close every connection and exit.
    Stop,
}

/// What a load process says.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "report", rename_all = "snake_case")]
pub enum Report {
    /// Connects so far.
    Progress {
        /// Open.
        done: usize,
        /// Failed.
        failed: usize,
    },
    /// Every connect was tried.
    Connected {
        /// Open.
        ok: usize,
        /// Failed.
        failed: usize,
        /// When each open one was ready (µs since the epoch), in order.
        times_us: Vec<u64>,
        /// Why the first failure failed.
        first_error: Option<String>,
    },
    /// Armed.
    Armed,
    /// Arrival times since the arming.
    Frames {
        /// Connections that had no frame by the timeout.
        missing: usize,
        /// µs since the epoch, one per connection that had a frame.
        times_us: Vec<u64>,
    },
    /// Answers to a ping round.
    Alive {
        /// Connections that answered.
        alive: usize,
        /// Connections still open.
        open: usize,
    },
    /// The simulated devices' ids.
    Devices {
        /// Ids.
        ids: Vec<Uuid>,
    },
    /// The simulated devices' counters.
    Stats {
        /// Connected now.
        connected: u64,
        /// Events sent.
        sent: u64,
        /// Events acked.
        acked: u64,
        /// Events nacked.
        nacked: u64,
        /// Requests received.
        requests: u64,
        /// Requests answered.
        answered: u64,
        /// Reconnects.
        reconnects: u64,
        /// Devices that stopped with an error.
        stopped: u64,
        /// The last report: every device ended.
        finished: bool,
        /// When (µs since the epoch).
        at_us: u64,
    },
    /// Everything closed; the process exits.
    Stopped,
}

/// One running load process.
#[derive(Debug)]
pub struct LoadProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    reports: mpsc::Receiver<Report>,
    /// Its number (for source addresses and messages).
    pub index: usize,
}

impl LoadProcess {
    /// Starts load process `index` with `job`.
    pub async fn start(index: usize, job: &Job) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("this executable's path")?;
        let mut child = tokio::process::Command::new(exe)
            .arg(LOAD_PROCESS_ARG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a load process")?;
        if let Some(pid) = child.id() {
            crate::procfs::track(pid);
        }
        let mut stdin = child.stdin.take().context("its stdin")?;
        let stdout = child.stdout.take().context("its stdout")?;
        let mut line = serde_json::to_vec(job)?;
        line.push(b'\n');
        stdin.write_all(&line).await?;
        stdin.flush().await?;
        let (tx, reports) = mpsc::channel(1024);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                match serde_json::from_str::<Report>(&l) {
                    Ok(r) => {
                        if tx.send(r).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => eprintln!("load process {index}: unreadable report ({e}): {l}"),
                }
            }
        });
        Ok(LoadProcess {
            child,
            stdin: Some(stdin),
            reports,
            index,
        })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Sends a command.
    pub async fn send(&mut self, command: &Command) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        let mut line = serde_json::to_vec(command)?;
        line.push(b'\n');
        stdin.write_all(&line).await?;
        stdin.flush().await?;
        Ok(())
    }

    /// The next report, waiting at most `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<Report> {
        match self.try_next(timeout).await? {
            Some(r) => Ok(r),
            None => bail!("load process {} said nothing for {timeout:?}", self.index),
        }
    }

    /// The next report, or `None` when none came within `timeout`; an error when the
    /// process ended.
    pub async fn try_next(&mut self, timeout: Duration) -> anyhow::Result<Option<Report>> {
        match tokio::time::timeout(timeout, self.reports.recv()).await {
            Ok(Some(r)) => Ok(Some(r)),
            Ok(None) => bail!("load process {} ended", self.index),
            Err(_) => Ok(None),
        }
    }

    /// The next report that `pick` accepts, skipping the others (progress, stats).
    pub async fn next_matching<T>(
        &mut self,
        timeout: Duration,
        mut pick: impl FnMut(Report) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let Some(t) = pick(self.next(left).await?) {
                return Ok(t);
            }
        }
    }

    /// Asks it to stop and waits (at most 30 s) for it to exit; killed otherwise.
    pub async fn stop(mut self) {
        crate::procfs::retire(self.pid());
        let _ = self.send(&Command::Stop).await;
        self.stdin = None;
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// The loopback addresses load process `index` connects from: 127.0.0.2 onwards,
/// sixteen each, different for every process.
pub fn sources(index: usize) -> Vec<IpAddr> {
    (0..SOURCES_PER_PROCESS)
        .map(|k| {
            let n = 2 + index * SOURCES_PER_PROCESS + k;
            IpAddr::V4(Ipv4Addr::new(127, 0, (n / 250) as u8, (n % 250) as u8 + 1))
        })
        .collect()
}

/// Splits `total` into the fewest parts of at most `per_process` each, as even as
/// can be: `(first_index, count)` per part.
pub fn split(total: usize, per_process: usize) -> Vec<(usize, usize)> {
    let parts = total.div_ceil(per_process.max(1)).max(1);
    let mut out = Vec::with_capacity(parts);
    let mut first = 0;
    for p in 0..parts {
        let count = total / parts + usize::from(p < total % parts);
        out.push((first, count));
        first += count;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_evenly_under_the_cap() {
        assert_eq!(
            split(19_000, 8_000),
            [(0, 6334), (6334, 6333), (12667, 6333)]
        );
        assert_eq!(split(20, 8_000), [(0, 20)]);
        assert_eq!(split(0, 8_000), [(0, 0)]);
    }

    #[test]
    fn processes_use_distinct_loopback_sources() {
        let a = sources(0);
        let b = sources(1);
        assert_eq!(a[0], IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)));
        assert!(a.iter().all(|x| !b.contains(x)));
        assert!(sources(20).iter().all(|x| x.is_loopback()));
    }
}
