//! The state one replica shares between its sessions, its broker connection and its
//! HTTP server.

use std::time::Duration;

use mosaic_runtime::health::Readiness;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::auth::Verifier;
use crate::broker::Broker;
use crate::config::Config;
use crate::registry::Registry;

/// Per-session limits, from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub auth_timeout: Duration,
    pub max_frame_bytes: usize,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub outbound_queue: usize,
    pub max_in_flight: usize,
    pub event_rate: u32,
    pub event_burst: u32,
    pub max_bad_frames: u32,
    pub publish_timeout: Duration,
}

impl Limits {
    pub fn from_config(c: &Config) -> Self {
        Limits {
            auth_timeout: Duration::from_millis(c.auth_timeout_ms),
            max_frame_bytes: c.max_frame_bytes as usize,
            ping_interval: Duration::from_millis(c.ping_interval_ms),
            pong_timeout: Duration::from_millis(c.pong_timeout_ms),
            outbound_queue: c.outbound_queue as usize,
            max_in_flight: c.max_in_flight as usize,
            event_rate: c.event_rate,
            event_burst: c.event_burst,
            max_bad_frames: c.max_bad_frames,
            publish_timeout: Duration::from_millis(c.publish_timeout_ms),
        }
    }
}

/// Everything a replica's tasks share.
#[derive(Debug)]
pub(crate) struct Gateway {
    pub id: Uuid,
    pub limits: Limits,
    pub verifier: Verifier,
    pub registry: Registry,
    pub broker: Broker,
    pub readiness: Readiness,
    /// Cancelled when shutdown begins: sessions close with 1001.
    pub shutdown: CancellationToken,
    /// Every session task and every reply publish, awaited at shutdown.
    pub tracker: TaskTracker,
}

impl Gateway {
    /// A replica's state from its configuration; nothing connects yet.
    pub fn new(config: &Config) -> Result<Self, crate::auth::KeyError> {
        let id = config.gateway_id.unwrap_or_else(Uuid::new_v4);
        let limits = Limits::from_config(config);
        Ok(Gateway {
            id,
            broker: Broker::new(config.amqp_url.clone(), id, limits.publish_timeout),
            limits,
            verifier: Verifier::from_config(config)?,
            registry: Registry::default(),
            readiness: Readiness::new(),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        })
    }

    /// Ready when connected to RabbitMQ and not shutting down.
    pub fn update_readiness(&self) {
        self.readiness
            .set(!self.shutdown.is_cancelled() && self.broker.available());
    }
}
