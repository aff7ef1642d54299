//! The fleet side of a gateway replica's state: the announcer's state, and what a
//! device declares about itself (its capabilities) and how that travels.
//!
//! - Capabilities: a device's `services` and `attributes` (from its `auth` or a
//!   `register` frame) live in its session's [`SessionInfo`]; the `connected`
//!   lifecycle message carries them with the session's groups, and a later
//!   `register` publishes `lifecycle.<device>.registered`.
//! - [`Fleet`]: the announcer's state (interval, sequence, "announce now"). The
//!   announcements themselves and the fleet commands are handled with the other
//!   deliveries, in `command::fleet`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mosaic_protocol::exchange::Lifecycle;
use mosaic_protocol::fleet::Capabilities;
use mosaic_protocol::frame::{FrameError, ServerFrame, code};
use mosaic_protocol::header;
use serde_json::{Map, Value};
use tokio::sync::Notify;

use crate::message::{self, Origin, Outgoing};
use crate::metrics;
use crate::registry::SessionInfo;

/// The replica's announcer state.
#[derive(Debug)]
pub(crate) struct Fleet {
    /// Interval of the periodic announcements.
    pub interval: Duration,
    now: Notify,
    seq: AtomicU64,
    started_at: String,
}

impl Fleet {
    pub fn new(interval: Duration) -> Self {
        Fleet {
            interval,
            now: Notify::new(),
            seq: AtomicU64::new(0),
            started_at: message::now_rfc3339(),
        }
    }

    /// Asks the announcer to announce at once.
    pub fn announce_now(&self) {
        self.now.notify_one();
    }

    /// Resolves when an announcement is asked for ([`Fleet::announce_now`]).
    pub async fn asked(&self) {
        self.now.notified().await;
    }

    /// The sequence number of the next announcement (1, 2, ...).
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// When this replica started, RFC 3339.
    pub fn started_at(&self) -> &str {
        &self.started_at
    }
}

/// Checks that declared attributes can travel in AMQP headers.
pub(crate) fn check(c: &Capabilities) -> Result<(), String> {
    if let Some(a) = &c.attributes {
        amqp_value_json::to_field_table(a)
            .map_err(|e| format!("field `attributes` cannot be carried: {e}"))?;
    }
    Ok(())
}

fn capability_fields(c: &Capabilities, h: &mut Map<String, Value>) {
    h.insert(
        header::SERVICES.into(),
        c.services
            .as_ref()
            .map_or(Value::Null, |s| Value::from(s.clone())),
    );
    h.insert(
        header::ATTRIBUTES.into(),
        c.attributes.clone().map_or(Value::Null, Value::Object),
    );
}

/// The fields a `connected` message carries besides the usual ones.
pub(crate) fn connected_fields(info: &SessionInfo) -> Map<String, Value> {
    let mut h = Map::new();
    capability_fields(&info.capabilities(), &mut h);
    h.insert(header::GROUPS.into(), Value::from(info.groups.clone()));
    h
}

/// The `registered` frame for the session's current capabilities.
pub(crate) fn registered_frame(info: &SessionInfo) -> ServerFrame {
    ServerFrame::Registered {
        services: info.capabilities().services,
    }
}

/// Applies a `register` frame (or the capabilities of a refresh `auth` frame): checks
/// it and updates the session; returns the `registered` frame and the
/// `lifecycle.<device>.registered` message to publish. A refused declaration
/// registers nothing.
pub(crate) fn register(
    origin: Origin,
    info: &SessionInfo,
    declared: Capabilities,
) -> Result<(ServerFrame, Outgoing), FrameError> {
    check(&declared).map_err(|message| FrameError {
        code: code::BAD_FRAME,
        message,
    })?;
    let now = {
        let mut c = info.capabilities.lock().unwrap();
        c.update(declared);
        c.clone()
    };
    let mut h = Map::new();
    capability_fields(&now, &mut h);
    let m = message::lifecycle_with(origin, Lifecycle::Registered, None, h);
    metrics::fleet_command("register");
    Ok((
        ServerFrame::Registered {
            services: now.services,
        },
        m,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_that_cannot_travel_are_refused() {
        let mut a = Map::new();
        let mut deep = Value::Null;
        for _ in 0..=amqp_value_json::MAX_DEPTH {
            deep = Value::Array(vec![deep]);
        }
        a.insert("deep".into(), deep);
        let c = Capabilities {
            services: None,
            attributes: Some(a),
        };
        assert!(check(&c).is_err());
        assert!(check(&Capabilities::default()).is_ok());
    }
}
