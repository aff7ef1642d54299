//! Logs and metrics set-up.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// `LOG_FORMAT`: one JSON object a line, or human-readable text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object a line (for log collectors).
    Json,
    /// Human-readable text.
    #[default]
    Text,
}

/// Installs the global `tracing` subscriber: the filter from `RUST_LOG` (default
/// `info`), the format from `format`. Call once, from `main`.
pub fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_env(crate::config::LOG_FILTER_VAR)
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// How often the recorder's upkeep runs.
pub const UPKEEP_INTERVAL: Duration = if cfg!(test) {
    Duration::from_millis(20)
} else {
    Duration::from_secs(5)
};

static UPKEEP_RUNS: AtomicU64 = AtomicU64::new(0);

/// How many times the recorder's upkeep has run in this process.
pub fn upkeep_runs() -> u64 {
    UPKEEP_RUNS.load(Ordering::Relaxed)
}

/// The process-wide Prometheus recorder, installed on first use, with its upkeep.
///
/// Every service in the process records into it, so metric names carry a
/// per-service prefix. When another recorder was installed first (a test that set
/// its own), the handle still renders, but renders nothing of that recorder.
///
/// Installing it also starts the recorder's upkeep, once per process: a thread that
/// calls [`PrometheusHandle::run_upkeep`] every [`UPKEEP_INTERVAL`]. The recorder
/// keeps every histogram sample until upkeep (or a scrape) folds it into the
/// histogram's buckets, so without it an unscraped process would grow without
/// bound. A thread rather than a task, because it must outlive any one runtime (tests
/// run several services, each on its own).
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0,
                ])
                .expect("static bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            start_upkeep(handle.clone());
            handle
        })
        .clone()
}

fn start_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                handle.run_upkeep();
                UPKEEP_RUNS.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(UPKEEP_INTERVAL);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the metrics upkeep thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upkeep_runs_on_its_own_once_the_recorder_is_installed() {
        let _ = metrics();
        let first = upkeep_runs();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // Several runs with no scrape in between: it runs on an interval, by itself.
        while upkeep_runs() < first + 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "the recorder's upkeep does not run (runs: {})",
                upkeep_runs()
            );
            std::thread::sleep(UPKEEP_INTERVAL);
        }
        // Installing again starts no second thread.
        let _ = metrics();
        let threads = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.trim() == "metrics-upkeep")
            .count();
        assert_eq!(threads, 1);
    }
}
