//! Which gateway replicas exist: a view built from their announcements on
//! `mosaic.fleet`.
//!
//! Each gateway announces itself every `FLEET_ANNOUNCE_MS` (`gateway.<id>.up`, with
//! its session count and the groups it has bound), at once when its groups change,
//! and `gateway.<id>.down` at a clean shutdown. A gateway silent for longer than
//! three of its intervals (and at least `FLEET_LOST_AFTER_MS`) is lost. A fan-out
//! waits for exactly the live gateways (those holding the group, for a group call),
//! instead of always waiting for its deadline.
//!
//! A replica that starts asks every gateway to announce at once (`kind` `announce`
//! on `broadcast`); until it has heard one announcement, or one interval has passed,
//! the view is not *warm* and fleet calls wait for it (within their deadline).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use mosaic_protocol::fleet::Announcement;
use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

/// One live gateway.
#[derive(Debug, Clone)]
pub struct Gateway {
    /// Its latest announcement.
    pub announcement: Announcement,
    /// When it was heard.
    pub heard: Instant,
}

/// What an announcement changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// A gateway not in the view before.
    New,
    /// A known gateway, again.
    Again,
    /// A gateway left cleanly.
    Down,
    /// An announcement older than the one held (ignored).
    Stale,
}

/// The live gateways.
#[derive(Debug)]
pub struct View {
    gateways: Mutex<HashMap<Uuid, Gateway>>,
    /// Bumped on every change of the set of gateways or their groups.
    changed: watch::Sender<u64>,
    warm: watch::Sender<bool>,
    lost_after: Duration,
}

impl View {
    /// An empty view; a gateway silent longer than `lost_after` (or three of its
    /// intervals, whichever is longer) is lost.
    pub fn new(lost_after: Duration) -> Self {
        View {
            gateways: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
            warm: watch::channel(false).0,
            lost_after,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Gateway>> {
        self.gateways.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes an announcement (`up`), or a gateway's clean exit (`down`).
    pub fn heard(&self, a: Announcement, up: bool) -> Heard {
        self.warm.send_replace(true);
        let mut map = self.lock();
        if !up {
            let gone = map.remove(&a.gateway).is_some();
            drop(map);
            if gone {
                self.changed.send_modify(|v| *v += 1);
            }
            return Heard::Down;
        }
        let id = a.gateway;
        let now = Instant::now();
        let (heard, groups_changed) = match map.get(&id) {
            Some(g) if g.announcement.seq > a.seq && g.announcement.started_at == a.started_at => {
                return Heard::Stale;
            }
            Some(g) => (
                Heard::Again,
                g.announcement.groups.keys().ne(a.groups.keys()),
            ),
            None => (Heard::New, true),
        };
        map.insert(
            id,
            Gateway {
                announcement: a,
                heard: now,
            },
        );
        drop(map);
        if groups_changed {
            self.changed.send_modify(|v| *v += 1);
        }
        heard
    }

    /// Removes the gateways silent for too long and returns them.
    pub fn expire(&self) -> Vec<Uuid> {
        let now = Instant::now();
        let mut lost = Vec::new();
        self.lock().retain(|id, g| {
            let silence =
                (Duration::from_millis(g.announcement.interval_ms) * 3).max(self.lost_after);
            let alive = now.duration_since(g.heard) <= silence;
            if !alive {
                lost.push(*id);
            }
            alive
        });
        if !lost.is_empty() {
            self.changed.send_modify(|v| *v += 1);
        }
        lost
    }

    /// Every live gateway.
    pub fn live(&self) -> Vec<Uuid> {
        self.lock().keys().copied().collect()
    }

    /// The live gateways that have bound `group`.
    pub fn with_group(&self, group: &str) -> Vec<Uuid> {
        self.lock()
            .iter()
            .filter(|(_, g)| g.announcement.groups.contains_key(group))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether `gateway` is live.
    pub fn is_live(&self, gateway: Uuid) -> bool {
        self.lock().contains_key(&gateway)
    }

    /// Every live gateway with its latest announcement.
    pub fn snapshot(&self) -> Vec<Gateway> {
        self.lock().values().cloned().collect()
    }

    /// Changes whenever a gateway comes, goes, or changes its groups.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Declares the view warm (an announcement was heard, or long enough passed).
    pub fn set_warm(&self) {
        self.warm.send_replace(true);
    }

    /// Waits until the view is warm, at most until `deadline`.
    pub async fn warmed(&self, deadline: Instant) {
        let mut warm = self.warm.subscribe();
        let _ = tokio::time::timeout_at(deadline, warm.wait_for(|w| *w)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn ann(gateway: Uuid, seq: u64, groups: &[&str]) -> Announcement {
        Announcement {
            gateway,
            queue: "q".into(),
            sessions: 1,
            groups: groups
                .iter()
                .map(|g| (g.to_string(), 1))
                .collect::<BTreeMap<_, _>>(),
            interval_ms: 10,
            seq,
            started_at: "t".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn gateways_come_change_and_go() {
        let v = View::new(Duration::from_millis(100));
        let mut changes = v.changes();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(v.heard(ann(a, 1, &["x"]), true), Heard::New);
        assert_eq!(v.heard(ann(b, 1, &[]), true), Heard::New);
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();
        assert_eq!(v.heard(ann(a, 2, &["x"]), true), Heard::Again);
        assert!(!changes.has_changed().unwrap());
        assert_eq!(v.heard(ann(a, 1, &[]), true), Heard::Stale);
        assert_eq!(v.with_group("x"), vec![a]);
        tokio::time::advance(Duration::from_millis(60)).await;
        v.heard(ann(b, 2, &[]), true);
        tokio::time::advance(Duration::from_millis(60)).await;
        assert_eq!(v.expire(), vec![a]);
        assert_eq!(v.live(), vec![b]);
        assert_eq!(v.heard(ann(b, 3, &[]), false), Heard::Down);
        assert!(v.live().is_empty());
    }
}
