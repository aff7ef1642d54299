//! Counters every device of a process updates, for the progress line.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by every device of a process.
#[derive(Debug, Default)]
pub struct Stats {
    /// Devices connected right now.
    pub connected: AtomicU64,
    /// Sessions that reached `welcome`.
    pub sessions: AtomicU64,
    /// Sessions after the first one of a device.
    pub reconnects: AtomicU64,
    /// Events sent (resends included).
    pub sent: AtomicU64,
    /// Events acked.
    pub acked: AtomicU64,
    /// Events nacked (they are sent again).
    pub nacked: AtomicU64,
    /// Requests received.
    pub requests: AtomicU64,
    /// Requests answered.
    pub answered: AtomicU64,
    /// Events received from Hive.
    pub events_in: AtomicU64,
    /// `error` frames received.
    pub errors: AtomicU64,
    /// Devices that stopped for good before the end (token refused, replaced...).
    pub stopped: AtomicU64,
}

impl Stats {
    pub(super) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "connected {} | events sent {} acked {} nacked {} | requests {} answered {} | events in {} | reconnects {} | errors {} | stopped {}",
            g(&self.connected),
            g(&self.sent),
            g(&self.acked),
            g(&self.nacked),
            g(&self.requests),
            g(&self.answered),
            g(&self.events_in),
            g(&self.reconnects),
            g(&self.errors),
            g(&self.stopped),
        )
    }
}
