//! Connection caps: how many WebSocket connections this replica holds at once
//! (`MAX_CONNECTIONS`), and how many of them may still be in the in-band
//! `hello`/`auth` phase (`MAX_UNAUTHENTICATED`).
//!
//! `GET /v1/connect` takes a [`Slot`] before the upgrade; when a cap is reached it
//! gets none and answers 503. The slot is held by the connection's task and released
//! when it is dropped, whatever ends the connection (a failed upgrade, a refused
//! token, an auth timeout, a close, a panic). The unauthenticated part is released
//! as soon as the device authenticates.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::metrics;

/// The counters of one replica. Shared by the HTTP handler and every slot.
#[derive(Debug)]
pub(crate) struct Admission {
    max_open: usize,
    max_unauthenticated: usize,
    open: AtomicUsize,
    unauthenticated: AtomicUsize,
}

/// Which cap refused a connection (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `MAX_CONNECTIONS`.
    MaxConnections,
    /// `MAX_UNAUTHENTICATED`.
    MaxUnauthenticated,
}

impl Refused {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Refused::MaxConnections => "max_connections",
            Refused::MaxUnauthenticated => "max_unauthenticated",
        }
    }
}

/// One admitted connection. Dropping it gives its place back.
#[derive(Debug)]
pub(crate) struct Slot {
    admission: Arc<Admission>,
    unauthenticated: bool,
}

impl Admission {
    pub(crate) fn new(max_open: usize, max_unauthenticated: usize) -> Arc<Self> {
        Arc::new(Admission {
            max_open,
            max_unauthenticated,
            open: AtomicUsize::new(0),
            unauthenticated: AtomicUsize::new(0),
        })
    }

    /// A slot for a new connection, `authenticated` when its upgrade request carried
    /// a token (checked or about to be); none when a cap is reached.
    pub(crate) fn admit(self: &Arc<Self>, authenticated: bool) -> Result<Slot, Refused> {
        if !take(&self.open, self.max_open) {
            return Err(Refused::MaxConnections);
        }
        if !authenticated && !take(&self.unauthenticated, self.max_unauthenticated) {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::MaxUnauthenticated);
        }
        metrics::socket_opened(!authenticated);
        Ok(Slot {
            admission: self.clone(),
            unauthenticated: !authenticated,
        })
    }

    /// Connections holding a slot.
    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Of those, connections not yet authenticated.
    #[cfg(test)]
    pub(crate) fn unauthenticated(&self) -> usize {
        self.unauthenticated.load(Ordering::Acquire)
    }
}

impl Slot {
    /// The device authenticated: the connection no longer counts against
    /// `MAX_UNAUTHENTICATED`.
    pub(crate) fn authenticated(&mut self) {
        if std::mem::take(&mut self.unauthenticated) {
            self.admission
                .unauthenticated
                .fetch_sub(1, Ordering::AcqRel);
            metrics::socket_authenticated();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.authenticated();
        self.admission.open.fetch_sub(1, Ordering::AcqRel);
        metrics::socket_closed();
    }
}

/// Adds one to `counter` unless it is at `max`; says whether it did.
fn take(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_caps_hold_and_slots_come_back_on_drop() {
        let a = Admission::new(3, 2);
        let u1 = a.admit(false).unwrap();
        let mut u2 = a.admit(false).unwrap();
        assert_eq!(a.admit(false).unwrap_err(), Refused::MaxUnauthenticated);
        // A refusal by the smaller cap takes nothing from the larger one.
        assert_eq!(a.open(), 2);
        let t1 = a.admit(true).unwrap();
        assert_eq!(a.admit(true).unwrap_err(), Refused::MaxConnections);
        assert_eq!(a.admit(false).unwrap_err(), Refused::MaxConnections);

        // Authenticating frees the unauthenticated place only, once.
        u2.authenticated();
        u2.authenticated();
        assert_eq!((a.open(), a.unauthenticated()), (3, 1));
        drop(t1);
        let u3 = a.admit(false).unwrap();
        assert_eq!((a.open(), a.unauthenticated()), (3, 2));

        drop((u1, u2, u3));
        assert_eq!((a.open(), a.unauthenticated()), (0, 0));
    }

    #[test]
    fn concurrent_admissions_never_pass_the_cap() {
        let a = Admission::new(50, 50);
        let admitted = AtomicUsize::new(0);
        let all_tried = std::sync::Barrier::new(8);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let mut held = Vec::new();
                    for _ in 0..100 {
                        if let Ok(slot) = a.admit(false) {
                            held.push(slot);
                        }
                    }
                    admitted.fetch_add(held.len(), Ordering::Relaxed);
                    // Hold them until every thread tried.
                    all_tried.wait();
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), 50);
        assert_eq!(a.open(), 0);
    }
}
