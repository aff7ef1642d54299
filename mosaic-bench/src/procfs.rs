//! What `/proc` says about a process and the machine: resident memory, CPU time,
//! open files, the machine's CPU use, and a description of the machine.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Clock ticks per second of `/proc/<pid>/stat` and `/proc/stat` (`USER_HZ`, 100 on
/// every Linux this runs on).
const TICKS: f64 = 100.0;

/// Microseconds since the Unix epoch: comparable between the processes of one
/// machine, which is all the tool needs (every process it starts runs here).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Resident memory of `pid` in KiB (`VmRSS`); 0 when the process is gone.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) of `pid` in seconds; 0 when the process is gone.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name (in parentheses): utime is the 12th field, stime the 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / TICKS
}

/// Open file descriptors of `pid` (entries of `/proc/<pid>/fd`).
pub fn open_files(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// Resident memory of `pid` once it stopped moving: two readings 500 ms apart that
/// differ by at most `tolerance` (a fraction: 0 for an exact match), within `limit`.
/// Returns the last reading either way, and whether it was steady.
pub async fn steady_rss_kib(pid: u32, tolerance: f64, limit: Duration) -> (u64, bool) {
    let deadline = Instant::now() + limit;
    let mut last = rss_kib(pid);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rss_kib(pid);
        let diff = now.abs_diff(last) as f64;
        if diff <= tolerance * last.max(1) as f64 {
            return (now, true);
        }
        last = now;
    }
    (last, false)
}

/// Waits until `pid` uses less than a tenth of a core over half a second, at most
/// `limit`: the previous phase's work (queue deletions, garbage collection) is done.
pub async fn settle(pid: u32, limit: Duration) {
    let deadline = Instant::now() + limit;
    let step = Duration::from_millis(500);
    while Instant::now() < deadline {
        let before = cpu_secs(pid);
        tokio::time::sleep(step).await;
        if cpu_secs(pid) - before < 0.1 * step.as_secs_f64() {
            return;
        }
    }
}

/// Busy and total CPU time of the whole machine so far, in seconds (all cores).
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0.0, 0.0);
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().take(8).sum();
    // idle + iowait
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    ((total - idle) / TICKS, total / TICKS)
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// How busy the machine was during a phase, and how much of that was this run's own
/// processes (the broker, the services, the load processes, this one): the rest is
/// other work sharing the machine.
#[derive(Debug, Clone, Serialize)]
pub struct Load {
    /// Wall time of the phase, seconds.
    pub seconds: f64,
    /// Cores kept busy on average, by anything.
    pub busy_cores: f64,
    /// Of those, by this run's processes.
    pub ours_cores: f64,
    /// Of those, by everything else on the machine.
    pub others_cores: f64,
    /// The 1-minute load average at the start and at the end.
    pub loadavg: [f64; 2],
}

/// CPU time of `pid` and of its children (user + system, seconds): those it
/// waited for (`cutime`, `cstime`) and those running now, one level down. For a
/// server that forks a process per connection (PostgreSQL), that is the server's
/// whole use.
pub fn tree_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let waited = (ticks(13) + ticks(14)) / TICKS;
    let children: f64 = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| parent(*child) == Some(pid))
        .map(cpu_secs)
        .sum();
    cpu_secs(pid) + waited + children
}

/// The parent of `pid`, while it runs.
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The processes this run started (the broker, the services, the load
/// processes; and the servers read with their children), and the CPU of those
/// already ended, so a phase's load can tell this run's work from other work on the
/// machine.
struct Ours {
    ended: f64,
    pids: Vec<u32>,
    trees: Vec<u32>,
}

static OURS: Mutex<Ours> = Mutex::new(Ours {
    ended: 0.0,
    pids: Vec::new(),
    trees: Vec::new(),
});

/// Counts `pid` as this run's from now on.
pub fn track(pid: u32) {
    if let Ok(mut o) = OURS.lock() {
        o.pids.push(pid);
    }
}

/// Counts `pid` and its children as this run's from now on (see
/// [`tree_cpu_secs`]).
pub fn track_tree(pid: u32) {
    if let Ok(mut o) = OURS.lock() {
        o.trees.push(pid);
    }
}

/// Keeps the CPU `pid` (and its children, if tracked with them) used so far and
/// stops reading it: call just before it is stopped.
pub fn retire(pid: u32) {
    if let Ok(mut o) = OURS.lock() {
        if let Some(i) = o.pids.iter().position(|p| *p == pid) {
            o.pids.swap_remove(i);
            o.ended += cpu_secs(pid);
        }
        if let Some(i) = o.trees.iter().position(|p| *p == pid) {
            o.trees.swap_remove(i);
            o.ended += tree_cpu_secs(pid);
        }
    }
}

/// CPU seconds of this run's processes so far, this one included.
fn ours_cpu() -> f64 {
    let me = cpu_secs(std::process::id());
    match OURS.lock() {
        Ok(o) => {
            me + o.ended
                + o.pids.iter().map(|p| cpu_secs(*p)).sum::<f64>()
                + o.trees.iter().map(|p| tree_cpu_secs(*p)).sum::<f64>()
        }
        Err(_) => me,
    }
}

/// Starts measuring a phase's load; [`LoadMeter::finish`] ends it.
#[derive(Debug)]
pub struct LoadMeter {
    started: Instant,
    machine: (f64, f64),
    ours: f64,
    loadavg: f64,
}

impl LoadMeter {
    /// Starts now.
    pub fn start() -> Self {
        LoadMeter {
            started: Instant::now(),
            machine: machine_cpu(),
            ours: ours_cpu(),
            loadavg: loadavg(),
        }
    }

    /// Ends the phase.
    pub fn finish(&self) -> Load {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-9);
        let (busy, _) = machine_cpu();
        let busy_cores = (busy - self.machine.0) / seconds;
        let ours_cores = ((ours_cpu() - self.ours) / seconds).min(busy_cores);
        Load {
            seconds,
            busy_cores,
            ours_cores,
            others_cores: (busy_cores - ours_cores).max(0.0),
            loadavg: [self.loadavg, loadavg()],
        }
    }
}

/// The machine the figures come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Cores the kernel shows.
    pub cpus: usize,
    /// `model name` of the first core.
    pub cpu_model: String,
    /// Memory, GiB.
    pub memory_gib: f64,
    /// Kernel release.
    pub kernel: String,
    /// Open files one process may hold (soft limit after raising it).
    pub open_files_limit: u64,
    /// 1-minute load average when the run started.
    pub loadavg_at_start: f64,
}

impl Machine {
    /// Reads `/proc`.
    pub fn describe(open_files_limit: u64) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model,
            memory_gib: mem_kib / 1024.0 / 1024.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            open_files_limit,
            loadavg_at_start: loadavg(),
        }
    }
}

/// Moves every thread of `pid` onto the cores `cpus` (later threads and children
/// inherit it), with util-linux's `taskset`.
pub fn pin(pid: u32, cpus: std::ops::Range<usize>) -> anyhow::Result<()> {
    let list = format!(
        "{}-{}",
        cpus.start,
        cpus.end.saturating_sub(1).max(cpus.start)
    );
    let out = std::process::Command::new("taskset")
        .args([
            "--all-tasks",
            "--cpu-list",
            "--pid",
            &list,
            &pid.to_string(),
        ])
        .output()
        .map_err(|e| anyhow::anyhow!("taskset (util-linux) could not run: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "taskset {list} {pid}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_cpu_and_files() {
        let me = std::process::id();
        assert!(rss_kib(me) > 0);
        assert!(open_files(me) > 0);
        assert!(cpu_secs(me) >= 0.0);
        assert_eq!(rss_kib(u32::MAX), 0, "no such process");
        assert!(tree_cpu_secs(me) >= cpu_secs(me));
        assert_eq!(parent(me), Some(std::os::unix::process::parent_id()));
    }
}
