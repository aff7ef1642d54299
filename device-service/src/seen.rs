//! Sightings: `last_seen` and first activation from the `connected` and
//! `disconnected` lifecycle messages the relay already consumes.
//!
//! The relay only notes a sighting in a bounded in-memory map (one entry per device,
//! the latest time kept) and goes on: it never waits for the database. A task writes
//! the map to PostgreSQL every [`FLUSH_INTERVAL`]. While PostgreSQL is down the map
//! keeps the latest sighting per device, up to [`MAX_PENDING`] devices (further
//! devices are counted in `mosaic_device_sightings_dropped_total` and dropped), and
//! is written once it is back; a sighting this replica held when it stopped is lost.
//! A device whose first connect was lost that way is activated at its next connect.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use lapin::message::Delivery;
use mosaic_protocol::header;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use uuid::Uuid;

use crate::metrics;
use crate::registry::{Registry, RegistryError};
use mosaic_amqp::header_str;

/// How often sightings are written.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(250);
/// Most devices whose sightings wait at once.
pub const MAX_PENDING: usize = 50_000;
/// Most devices written in one transaction.
const CHUNK: usize = 500;

/// Sightings waiting to be written.
#[derive(Debug, Default)]
pub struct Seen {
    pending: Mutex<HashMap<Uuid, (OffsetDateTime, bool)>>,
}

impl Seen {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, (OffsetDateTime, bool)>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes the sighting a lifecycle delivery carries (anything else is ignored).
    pub fn observe(&self, d: &Delivery) {
        if !d.routing_key.as_str().starts_with("lifecycle.") {
            return;
        }
        let headers = d.properties.headers().as_ref();
        let connected = match header_str(headers, header::NAME) {
            Some("connected") => true,
            Some("disconnected") => false,
            _ => return,
        };
        let Some(device) = header_str(headers, header::DEVICE).and_then(|s| s.parse().ok()) else {
            return;
        };
        let at = header_str(headers, header::RECEIVED_AT)
            .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
            .unwrap_or_else(OffsetDateTime::now_utc);
        self.note(device, at, connected);
    }

    /// Notes one sighting.
    pub fn note(&self, device: Uuid, at: OffsetDateTime, connected: bool) {
        let mut map = self.lock();
        let len = map.len();
        match map.get_mut(&device) {
            Some(e) => {
                e.0 = e.0.max(at);
                e.1 |= connected;
            }
            None if len < MAX_PENDING => {
                map.insert(device, (at, connected));
            }
            None => metrics::sightings_dropped("full", 1),
        }
    }

    fn take(&self) -> Vec<(Uuid, OffsetDateTime, bool)> {
        self.lock().drain().map(|(d, (at, c))| (d, at, c)).collect()
    }

    /// Writes sightings until `cancel` (then once more).
    pub async fn run(&self, registry: Registry, cancel: CancellationToken) {
        loop {
            let stop = tokio::select! {
                _ = tokio::time::sleep(FLUSH_INTERVAL) => false,
                _ = cancel.cancelled() => true,
            };
            let batch = self.take();
            for chunk in batch.chunks(CHUNK) {
                match registry.record_seen(chunk).await {
                    Ok(_) => {}
                    Err(RegistryError::NotConfigured(_)) => return,
                    Err(e) => {
                        debug!(error = %e, "sightings not written; keeping them");
                        for (d, at, c) in chunk {
                            self.note(*d, *at, *c);
                        }
                    }
                }
            }
            if stop {
                return;
            }
        }
    }
}
