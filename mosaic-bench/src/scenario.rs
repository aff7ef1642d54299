//! The scenarios, and what they share: held connections spread over load processes,
//! progress bars, and the CPU shares that say what limited a phase.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::load::{self, Command, HoldJob, Job, LoadProcess, Report, SimulateJob, Target};
use crate::procfs::{self, cpu_secs};
use crate::stack::Stack;

pub mod broadcast;
pub mod idle;
pub mod registry;
pub mod relay;
pub mod request;
pub mod soak;

/// Bound on a load process's answer to a command that waits for nothing.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// What every scenario gets.
#[derive(Debug)]
pub struct Ctx<'a> {
    /// The broker and the binaries.
    pub stack: &'a Stack,
    /// Where PNG plots go, if anywhere.
    pub plots: Option<PathBuf>,
    /// Most connections one load process holds.
    pub per_process: usize,
    /// Connects in flight at once, over all load processes.
    pub concurrency: usize,
    /// Draw progress bars (on a terminal).
    pub progress: bool,
}

impl Ctx<'_> {
    /// A progress bar of `len` steps, or a hidden one.
    pub fn bar(&self, len: u64, what: &str) -> ProgressBar {
        let bar = if self.progress {
            ProgressBar::new(len)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>28} [{bar:36}] {pos:>6}/{len:6} {per_sec:>12} {elapsed:>4}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(what.to_owned());
        bar
    }

    /// Prints a line about a finished phase (above any bar).
    pub fn say(&self, line: impl AsRef<str>) {
        eprintln!("{}", line.as_ref());
    }

    /// A plot's path, when plots are wanted.
    pub fn plot_path(&self, name: &str) -> Option<PathBuf> {
        self.plots.as_ref().map(|d| d.join(name))
    }
}

/// Connections held open by load processes.
#[derive(Debug)]
pub struct Held {
    procs: Vec<LoadProcess>,
    /// When each connection was ready, µs since the epoch, sorted.
    pub times_us: Vec<u64>,
    /// When the connects started.
    pub started_us: u64,
    /// Connections open.
    pub ok: usize,
    /// Connects that failed.
    pub failed: usize,
    /// Why the first failure failed.
    pub first_error: Option<String>,
}

impl Held {
    /// Opens `n` connections to `target` from as many load processes as the
    /// per-process cap needs, with a progress bar.
    pub async fn open(ctx: &Ctx<'_>, target: Target, n: usize, what: &str) -> anyhow::Result<Held> {
        let parts = load::split(n, ctx.per_process);
        let per_proc_concurrency = ctx.concurrency.div_ceil(parts.len()).max(1);
        let started_us = procfs::now_us();
        let mut procs = Vec::new();
        for (i, (first, count)) in parts.iter().enumerate() {
            let job = Job::Hold(HoldJob {
                target: target.clone(),
                count: *count,
                first_index: *first,
                concurrency: per_proc_concurrency,
                sources: load::sources(i),
            });
            procs.push(LoadProcess::start(i, &job).await?);
        }
        let bar = ctx.bar(n as u64, what);
        let mut done = vec![0usize; procs.len()];
        let mut times_us = Vec::with_capacity(n);
        let (mut ok, mut failed, mut first_error) = (0, 0, None);
        // Bounded: each load process bounds each connect; this bounds the whole.
        let limit = Duration::from_secs(120 + n as u64 / 20);
        let deadline = tokio::time::Instant::now() + limit;
        let mut finished = vec![false; procs.len()];
        while !finished.iter().all(|f| *f) {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{what}: connects not done within {limit:?}"
            );
            for (i, p) in procs.iter_mut().enumerate() {
                if finished[i] {
                    continue;
                }
                match p.try_next(Duration::from_millis(50)).await? {
                    Some(Report::Progress { done: d, failed: f }) => done[i] = d + f,
                    Some(Report::Connected {
                        ok: o,
                        failed: f,
                        times_us: t,
                        first_error: e,
                    }) => {
                        done[i] = o + f;
                        ok += o;
                        failed += f;
                        times_us.extend(t);
                        if first_error.is_none() {
                            first_error = e;
                        }
                        finished[i] = true;
                    }
                    _ => {}
                }
                bar.set_position(done.iter().sum::<usize>() as u64);
            }
        }
        bar.finish_and_clear();
        times_us.sort_unstable();
        Ok(Held {
            procs,
            times_us,
            started_us,
            ok,
            failed,
            first_error,
        })
    }

    /// Connects per second from the start to the last connection ready.
    pub fn rate(&self) -> f64 {
        let last = self.times_us.last().copied().unwrap_or(self.started_us);
        self.ok as f64 / ((last.saturating_sub(self.started_us)) as f64 / 1e6).max(1e-6)
    }

    /// Seconds from the start to the last connection ready.
    pub fn seconds(&self) -> f64 {
        let last = self.times_us.last().copied().unwrap_or(self.started_us);
        last.saturating_sub(self.started_us) as f64 / 1e6
    }

    /// Ready times in seconds from the start (for the connect-rate plot).
    pub fn offsets(&self) -> Vec<f64> {
        self.times_us
            .iter()
            .map(|t| t.saturating_sub(self.started_us) as f64 / 1e6)
            .collect()
    }

    /// The load processes' pids.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.pid()).collect()
    }

    /// Forgets earlier frames: the next frame each connection gets is timed.
    pub async fn arm(&mut self) -> anyhow::Result<()> {
        for p in &mut self.procs {
            p.send(&Command::Arm).await?;
        }
        for p in &mut self.procs {
            p.next_matching(ANSWER_TIMEOUT, |r| matches!(r, Report::Armed).then_some(()))
                .await?;
        }
        Ok(())
    }

    /// Arrival times (µs since the epoch) of the frame each connection got since
    /// [`Held::arm`], waiting at most `timeout`; and how many got none.
    pub async fn collect(&mut self, timeout: Duration) -> anyhow::Result<(Vec<u64>, usize)> {
        let timeout_ms = timeout.as_millis() as u64;
        for p in &mut self.procs {
            p.send(&Command::Collect { timeout_ms }).await?;
        }
        let mut all = Vec::new();
        let mut missing = 0;
        for p in &mut self.procs {
            let (t, m) = p
                .next_matching(timeout + ANSWER_TIMEOUT, |r| match r {
                    Report::Frames { times_us, missing } => Some((times_us, missing)),
                    _ => None,
                })
                .await?;
            all.extend(t);
            missing += m;
        }
        all.sort_unstable();
        Ok((all, missing))
    }

    /// Pings every connection; how many answered within `timeout`, and how many
    /// were still open.
    pub async fn ping(&mut self, timeout: Duration) -> anyhow::Result<(usize, usize)> {
        let timeout_ms = timeout.as_millis() as u64;
        for p in &mut self.procs {
            p.send(&Command::Ping { timeout_ms }).await?;
        }
        let (mut alive, mut open) = (0, 0);
        for p in &mut self.procs {
            let (a, o) = p
                .next_matching(timeout + ANSWER_TIMEOUT, |r| match r {
                    Report::Alive { alive, open } => Some((alive, open)),
                    _ => None,
                })
                .await?;
            alive += a;
            open += o;
        }
        Ok((alive, open))
    }

    /// Closes every connection and ends the load processes.
    pub async fn close(self) {
        futures_util::future::join_all(self.procs.into_iter().map(LoadProcess::stop)).await;
    }
}

/// Simulated devices (the simulator's device loop) in load processes.
#[derive(Debug)]
pub struct Devices {
    procs: Vec<LoadProcess>,
    /// The devices' ids.
    pub ids: Vec<uuid::Uuid>,
    /// The latest counters of each process.
    latest: Vec<Counters>,
}

/// The simulated devices' counters, summed.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Counters {
    /// Connected now.
    pub connected: u64,
    /// Events sent.
    pub sent: u64,
    /// Events acked.
    pub acked: u64,
    /// Events nacked.
    pub nacked: u64,
    /// Requests received.
    pub requests: u64,
    /// Requests answered.
    pub answered: u64,
    /// Reconnects.
    pub reconnects: u64,
    /// Devices stopped by an error.
    pub stopped: u64,
    /// Every device of every process ended.
    pub finished: bool,
}

impl Devices {
    /// Starts `job.devices` simulated devices over load processes.
    pub async fn start(ctx: &Ctx<'_>, job: SimulateJob) -> anyhow::Result<Devices> {
        let parts = load::split(job.devices, ctx.per_process);
        let mut procs = Vec::new();
        let mut ids = Vec::new();
        for (i, (_, count)) in parts.iter().enumerate() {
            let mut j = job.clone();
            j.devices = *count;
            j.sources = load::sources(i);
            let mut p = LoadProcess::start(i, &Job::Simulate(j)).await?;
            let got = p
                .next_matching(ANSWER_TIMEOUT, |r| match r {
                    Report::Devices { ids } => Some(ids),
                    _ => None,
                })
                .await?;
            ids.extend(got);
            procs.push(p);
        }
        let n = procs.len();
        Ok(Devices {
            procs,
            ids,
            latest: vec![Counters::default(); n],
        })
    }

    /// The load processes' pids.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.pid()).collect()
    }

    /// Reads the reports that arrived (waiting at most `wait` for the first) and
    /// returns the sums.
    pub async fn counters(&mut self, wait: Duration) -> anyhow::Result<Counters> {
        for (i, p) in self.procs.iter_mut().enumerate() {
            let mut timeout = wait;
            while let Ok(r) = p.next(timeout).await {
                if let Report::Stats {
                    connected,
                    sent,
                    acked,
                    nacked,
                    requests,
                    answered,
                    reconnects,
                    stopped,
                    finished,
                    ..
                } = r
                {
                    self.latest[i] = Counters {
                        connected,
                        sent,
                        acked,
                        nacked,
                        requests,
                        answered,
                        reconnects,
                        stopped,
                        finished,
                    };
                }
                if matches!(r, Report::Stopped) || self.latest[i].finished {
                    break;
                }
                timeout = Duration::from_millis(1);
            }
        }
        let mut sum = Counters {
            finished: true,
            ..Counters::default()
        };
        for c in &self.latest {
            sum.connected += c.connected;
            sum.sent += c.sent;
            sum.acked += c.acked;
            sum.nacked += c.nacked;
            sum.requests += c.requests;
            sum.answered += c.answered;
            sum.reconnects += c.reconnects;
            sum.stopped += c.stopped;
            sum.finished &= c.finished;
        }
        Ok(sum)
    }

    /// Waits until `check` holds for the counters, at most `timeout`, updating `bar`
    /// with `position`; the counters then.
    pub async fn wait_until(
        &mut self,
        timeout: Duration,
        bar: &ProgressBar,
        position: impl Fn(&Counters) -> u64,
        check: impl Fn(&Counters) -> bool,
    ) -> anyhow::Result<Counters> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.counters(Duration::from_millis(300)).await?;
            bar.set_position(position(&c));
            if check(&c) || Instant::now() >= deadline || c.finished {
                return Ok(c);
            }
        }
    }

    /// Stops every device and the load processes.
    pub async fn stop(self) {
        futures_util::future::join_all(self.procs.into_iter().map(LoadProcess::stop)).await;
    }
}

/// CPU used by groups of processes between two readings.
#[derive(Debug)]
pub struct CpuShares {
    started: Instant,
    groups: Vec<Group>,
}

/// A named group of processes, read alone or with their children.
#[derive(Debug)]
struct Group {
    name: String,
    pids: Vec<u32>,
    with_children: bool,
    before: f64,
}

impl Group {
    fn read(&self) -> f64 {
        let one = if self.with_children {
            procfs::tree_cpu_secs
        } else {
            cpu_secs
        };
        self.pids.iter().map(|p| one(*p)).sum()
    }
}

impl CpuShares {
    /// Starts reading: `groups` are names and their pids.
    pub fn start(groups: Vec<(&str, Vec<u32>)>) -> Self {
        let mut shares = CpuShares {
            started: Instant::now(),
            groups: Vec::new(),
        };
        for (name, pids) in groups {
            shares.add(name, pids, false);
        }
        shares
    }

    /// Also reads `pid` with its children (a server that forks per connection).
    pub fn with_children(mut self, name: &str, pid: u32) -> Self {
        self.add(name, vec![pid], true);
        self
    }

    fn add(&mut self, name: &str, pids: Vec<u32>, with_children: bool) {
        let mut g = Group {
            name: name.to_owned(),
            pids,
            with_children,
            before: 0.0,
        };
        g.before = g.read();
        self.groups.push(g);
    }

    /// CPU seconds of each group since the start, and the wall time.
    pub fn finish(&self) -> (Vec<(String, f64)>, f64) {
        let wall = self.started.elapsed().as_secs_f64();
        let used = self
            .groups
            .iter()
            .map(|g| (g.name.clone(), (g.read() - g.before).max(0.0)))
            .collect();
        (used, wall)
    }

    /// "cores busy: broker 0.93, gateway 0.61, ..." over the phase, plus what the
    /// rest of the machine used, for the "what limits it" column.
    pub fn describe(&self, cpus: usize) -> (String, serde_json::Value) {
        let (used, wall) = self.finish();
        let mut parts: Vec<String> = used
            .iter()
            .map(|(n, s)| format!("{n} {:.2}", s / wall.max(1e-9)))
            .collect();
        let json: serde_json::Map<String, serde_json::Value> = used
            .iter()
            .map(|(n, s)| (n.clone(), serde_json::json!(s / wall.max(1e-9))))
            .collect();
        parts.push(format!("of {cpus} cores"));
        (format!("cores busy: {}", parts.join(", ")), json.into())
    }
}

/// Time from `t0` (µs since the epoch) in milliseconds.
pub fn ms_since(t0: u64, t: u64) -> f64 {
    t.saturating_sub(t0) as f64 / 1e3
}

/// The gateway target for held connections.
pub fn gateway_target(addrs: Vec<std::net::SocketAddr>) -> Target {
    Target::Gateway {
        addrs,
        secret: crate::stack::JWT_SECRET.to_owned(),
    }
}
