//! Which gateway holds which session, from the lifecycle messages every replica
//! reads, and what becomes of the sessions of a gateway that vanished.
//!
//! Every replica follows `lifecycle.#` on its own exclusive queue and keeps, per
//! gateway, the sessions it holds; on each new broker link it starts again from a
//! listing of every gateway (disconnects heard while the listing runs are kept as
//! tombstones, so a session that ended meanwhile is not added back). When the view
//! declares a gateway lost, its sessions become *orphans*. Only the leader (the
//! replica whose connection holds the exclusive queue `mosaic.device-service.leader`)
//! publishes, for each orphan, `lifecycle.<device>.disconnected` with reason
//! `gateway_lost` (its `message_id` is derived from the session, so a repeat by a
//! later leader has the same idempotency key), then `gateway.<id>.lost` on
//! `mosaic.fleet`; every replica that hears that announcement forgets the orphans.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use uuid::Uuid;

#[derive(Debug, Clone, Copy)]
struct Entry {
    session: Uuid,
    gateway: Uuid,
}

#[derive(Debug, Default)]
struct Inner {
    by_device: HashMap<Uuid, Entry>,
    by_gateway: HashMap<Uuid, HashSet<Uuid>>,
    orphans: HashMap<Uuid, Vec<(Uuid, Uuid)>>,
    tombstones: Option<HashSet<Uuid>>,
}

impl Inner {
    fn detach(&mut self, device: Uuid, e: Entry) {
        if let Some(set) = self.by_gateway.get_mut(&e.gateway) {
            set.remove(&device);
            if set.is_empty() {
                self.by_gateway.remove(&e.gateway);
            }
        }
    }

    fn attach(&mut self, device: Uuid, session: Uuid, gateway: Uuid) {
        if let Some(old) = self.by_device.get(&device).copied() {
            // Sessions are UUIDv7: an older one's message arriving late changes nothing.
            if old.session > session {
                return;
            }
            self.detach(device, old);
        }
        self.by_device.insert(device, Entry { session, gateway });
        self.by_gateway.entry(gateway).or_default().insert(device);
    }
}

/// The sessions each gateway holds, as far as lifecycle messages tell.
#[derive(Debug, Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A `connected` message.
    pub fn connected(&self, device: Uuid, session: Uuid, gateway: Uuid) {
        self.lock().attach(device, session, gateway);
    }

    /// A `disconnected` message.
    pub fn disconnected(&self, device: Uuid, session: Uuid) {
        let mut i = self.lock();
        if let Some(t) = i.tombstones.as_mut() {
            t.insert(session);
        }
        if let Some(e) = i.by_device.get(&device).copied()
            && e.session == session
        {
            i.by_device.remove(&device);
            i.detach(device, e);
        }
    }

    /// Starts again from a listing: until [`Sessions::end_bootstrap`], sessions that
    /// end are remembered so the listing does not add them back.
    pub fn begin_bootstrap(&self) {
        let mut i = self.lock();
        *i = Inner {
            orphans: std::mem::take(&mut i.orphans),
            tombstones: Some(HashSet::new()),
            ..Default::default()
        };
    }

    /// A session a listing found.
    pub fn listed(&self, device: Uuid, session: Uuid, gateway: Uuid) {
        let mut i = self.lock();
        if i.tombstones.as_ref().is_some_and(|t| t.contains(&session)) {
            return;
        }
        i.attach(device, session, gateway);
    }

    /// The listing is complete.
    pub fn end_bootstrap(&self) {
        self.lock().tombstones = None;
    }

    /// The gateway is lost: its sessions become orphans; returns how many.
    pub fn lose(&self, gateway: Uuid) -> usize {
        let mut i = self.lock();
        let devices = i.by_gateway.remove(&gateway).unwrap_or_default();
        let mut orphans = Vec::with_capacity(devices.len());
        for d in devices {
            if let Some(e) = i.by_device.remove(&d) {
                orphans.push((d, e.session));
            }
        }
        let n = orphans.len();
        if n > 0 {
            i.orphans.entry(gateway).or_default().extend(orphans);
        }
        n
    }

    /// Gateways with orphans to announce.
    pub fn orphaned_gateways(&self) -> Vec<Uuid> {
        self.lock().orphans.keys().copied().collect()
    }

    /// The orphans of `gateway`, `(device, session)`.
    pub fn orphans(&self, gateway: Uuid) -> Vec<(Uuid, Uuid)> {
        self.lock()
            .orphans
            .get(&gateway)
            .cloned()
            .unwrap_or_default()
    }

    /// Forgets the orphans of `gateway` (announced, by this replica or the leader).
    pub fn forget_orphans(&self, gateway: Uuid) {
        self.lock().orphans.remove(&gateway);
    }

    /// Sessions tracked now.
    pub fn len(&self) -> usize {
        self.lock().by_device.len()
    }

    /// Whether none is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sessions tracked for `gateway`.
    pub fn held_by(&self, gateway: Uuid) -> usize {
        self.lock().by_gateway.get(&gateway).map_or(0, HashSet::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_follow_their_devices() {
        let s = Sessions::default();
        let (g1, g2) = (Uuid::new_v4(), Uuid::new_v4());
        let d = Uuid::new_v4();
        let (s1, s2) = (Uuid::now_v7(), Uuid::now_v7());
        s.connected(d, s1, g1);
        s.connected(d, s2, g2);
        // The old session's messages come late: nothing moves back.
        s.connected(d, s1, g1);
        s.disconnected(d, s1);
        assert_eq!((s.held_by(g1), s.held_by(g2)), (0, 1));
        assert_eq!(s.lose(g1), 0);
        assert_eq!(s.lose(g2), 1);
        assert_eq!(s.orphans(g2), vec![(d, s2)]);
        assert!(s.is_empty());
        s.forget_orphans(g2);
        assert!(s.orphaned_gateways().is_empty());
    }

    #[test]
    fn a_listing_does_not_revive_a_session_that_ended_meanwhile() {
        let s = Sessions::default();
        let g = Uuid::new_v4();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let (sa, sb) = (Uuid::now_v7(), Uuid::now_v7());
        s.begin_bootstrap();
        s.disconnected(a, sa);
        s.listed(a, sa, g);
        s.listed(b, sb, g);
        s.end_bootstrap();
        assert_eq!(s.held_by(g), 1);
    }
}
