//! Revoked devices, as read from the `mosaic.revocations` stream (see
//! `mosaic_protocol::registry` and `command::revocations`, which reads it).
//!
//! The latest `revoked_at` per device, in memory: checking a token at connect costs
//! one map lookup and no database call; and how far this replica has read (it is
//! ready only once it has read back its own marker on the current link).

use std::collections::HashMap;
use std::sync::RwLock;

use tokio::sync::watch;
use uuid::Uuid;

use crate::metrics;

/// The revocations this replica knows, and how far it has read.
#[derive(Debug)]
pub(crate) struct Revocations {
    revoked: RwLock<HashMap<Uuid, u64>>,
    /// The link generation whose marker was read back (0: none yet).
    caught_up: watch::Sender<u64>,
}

impl Default for Revocations {
    fn default() -> Self {
        Revocations {
            revoked: RwLock::default(),
            caught_up: watch::channel(0).0,
        }
    }
}

impl Revocations {
    /// Whether a token of `device` issued at `iat` is revoked.
    pub fn is_revoked(&self, device: Uuid, iat: Option<u64>) -> bool {
        let map = self.revoked.read().unwrap_or_else(|e| e.into_inner());
        map.get(&device)
            .is_some_and(|at| iat.is_none_or(|i| i <= *at))
    }

    /// Records a revocation; returns the device's latest one.
    pub fn revoke(&self, device: Uuid, at: u64) -> u64 {
        let mut map = self.revoked.write().unwrap_or_else(|e| e.into_inner());
        let entry = map.entry(device).or_insert(at);
        *entry = (*entry).max(at);
        let latest = *entry;
        metrics::revoked_devices(map.len());
        latest
    }

    /// The generation of the link on which this replica caught up.
    pub fn caught_up(&self) -> u64 {
        *self.caught_up.borrow()
    }

    /// Changes when the replica catches up on a new link.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.caught_up.subscribe()
    }

    /// Records that this replica read back its marker on link `generation`: it holds
    /// every revocation made before.
    pub fn caught_up_on(&self, generation: u64) {
        self.caught_up.send_replace(generation);
    }
}
