//! The PostgreSQL baseline: the distribution's `pgbench` against the same server,
//! in a database of its own: its TPC-B-like write transaction and its select-only
//! one, each transaction's latency from pgbench's own log.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use mosaic_tests::Postgres;

use crate::procfs;

/// What one pgbench run measured.
#[derive(Debug, Clone)]
pub struct Run {
    /// Transactions per second, as pgbench reports it (without connection time).
    pub tps: f64,
    /// Transactions done.
    pub transactions: u64,
    /// Transactions that failed.
    pub failed: u64,
    /// Each transaction's latency, ms, sorted.
    pub latencies_ms: Vec<f64>,
}

/// `pgbench`'s connection options for database `db` of `pg` (superuser, trust).
fn command(pg: &Postgres, db: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(pg.program("pgbench"));
    cmd.args(["-h", "127.0.0.1", "-p", &pg.addr().port().to_string()])
        .args(["-U", "postgres"])
        .arg(db)
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs `cmd` at most `limit`, counting it as this run's work; its standard output.
async fn output(mut cmd: tokio::process::Command, limit: Duration) -> anyhow::Result<String> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().context("starting pgbench")?;
    if let Some(pid) = child.id() {
        procfs::track(pid);
    }
    let pid = child.id();
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .with_context(|| format!("pgbench took over {limit:?}"))??;
    if let Some(pid) = pid {
        procfs::retire(pid);
    }
    if !out.status.success() {
        bail!(
            "pgbench failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `pgbench -i -s <scale>` into `db` (a fresh database): the four tables, 100,000
/// accounts per unit of scale.
pub async fn init(pg: &Postgres, db: &str, scale: u32) -> anyhow::Result<()> {
    let mut cmd = command(pg, db);
    cmd.args(["-i", "-q", "-s", &scale.to_string()]);
    output(cmd, Duration::from_secs(300)).await?;
    Ok(())
}

/// `pgbench -c <clients> -j 2 -T <seconds> -l` (with `-S` when `select_only`) on
/// `db`, initialised by [`init`].
pub async fn run(
    pg: &Postgres,
    db: &str,
    clients: usize,
    seconds: u64,
    select_only: bool,
) -> anyhow::Result<Run> {
    let logs = tempfile::Builder::new()
        .prefix("mosaic-pgbench-")
        .tempdir()?;
    let mut cmd = command(pg, db);
    cmd.current_dir(logs.path())
        .args(["-c", &clients.to_string()])
        .args(["-j", &clients.min(2).to_string()])
        .args(["-T", &seconds.to_string()])
        .arg("-l");
    if select_only {
        cmd.arg("-S");
    }
    let text = output(cmd, Duration::from_secs(seconds + 120)).await?;
    let tps = field(&text, "tps = ").context("pgbench printed no tps")?;
    let transactions = field(&text, "number of transactions actually processed: ").unwrap_or(0.0);
    let failed = field(&text, "number of failed transactions: ").unwrap_or(0.0);
    let mut latencies_ms = log_latencies(logs.path())?;
    latencies_ms.sort_by(f64::total_cmp);
    Ok(Run {
        tps,
        transactions: transactions as u64,
        failed: failed as u64,
        latencies_ms,
    })
}

/// The number after `prefix` on the first line that has it.
fn field(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix(prefix)?;
        let number: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        number.parse().ok()
    })
}

/// Latencies (ms) from pgbench's per-transaction logs in `dir` (`pgbench_log.<pid>`
/// and one more file per extra thread): the third field is the latency in µs.
fn log_latencies(dir: &Path) -> anyhow::Result<Vec<f64>> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with("pgbench_log.")
        {
            continue;
        }
        let text = std::fs::read_to_string(entry.path())?;
        all.extend(text.lines().filter_map(|l| {
            let us: f64 = l.split_whitespace().nth(2)?.parse().ok()?;
            Some(us / 1e3)
        }));
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pgbench_output() {
        let text = "transaction type: <builtin: TPC-B (sort of)>\n\
            number of transactions actually processed: 12345\n\
            number of failed transactions: 0 (0.000%)\n\
            latency average = 12.9 ms\n\
            initial connection time = 5.1 ms\n\
            tps = 1234.567890 (without initial connection time)\n";
        assert_eq!(field(text, "tps = "), Some(1234.56789));
        assert_eq!(
            field(text, "number of transactions actually processed: "),
            Some(12345.0)
        );
        assert_eq!(field(text, "number of failed transactions: "), Some(0.0));
        assert_eq!(field(text, "nothing: "), None);
    }

    #[test]
    fn reads_pgbench_logs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("pgbench_log.42"),
            "0 1 1500 0 1700000000 1\n1 1 250 0 1700000000 2\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("pgbench_log.42.1"), "2 1 1000 0 1 3\n").unwrap();
        std::fs::write(dir.path().join("other"), "9 9 9 9\n").unwrap();
        let mut l = log_latencies(dir.path()).unwrap();
        l.sort_by(f64::total_cmp);
        assert_eq!(l, [0.25, 1.0, 1.5]);
    }
}
