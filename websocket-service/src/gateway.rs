//! The state one replica shares between its sessions, its broker connection and its
//! HTTP server.

use std::sync::Arc;
use std::time::Duration;

use mosaic_runtime::health::Readiness;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::auth::{AuthError, Identity, Verifier};
use crate::broker::Broker;
use crate::config::Config;
use crate::fleet::Fleet;
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
    pub registry: Arc<Registry>,
    pub broker: Arc<Broker>,
    pub readiness: Readiness,
    /// The replica's announcements on `mosaic.fleet`.
    pub fleet: Fleet,
    /// Cancelled when shutdown begins: sessions close with 1001.
    pub shutdown: CancellationToken,
    /// Every session task and every reply publish, awaited at shutdown.
    pub tracker: TaskTracker,
    /// Revoked devices, from the revocations stream.
    pub revocations: crate::revocations::Revocations,
    /// Requests to device-service (enrol, renew).
    pub rpc: crate::rpc::Rpc,
}

impl Gateway {
    /// A gateway with default settings and a test secret, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Arc<Gateway> {
        use clap::Parser;
        let config = crate::Config::try_parse_from([
            "ws",
            "--jwt-secret",
            "unit-test-secret-0123456789-abcdefghij",
        ])
        .unwrap();
        Arc::new(Gateway::new(&config).unwrap())
    }

    /// A replica's state from its configuration; nothing connects yet.
    pub fn new(config: &Config) -> Result<Self, crate::auth::KeyError> {
        let id = config.gateway_id.unwrap_or_else(Uuid::new_v4);
        let limits = Limits::from_config(config);
        Ok(Gateway {
            revocations: Default::default(),
            rpc: crate::rpc::Rpc::new(
                format!("mosaic.gateway.{id}"),
                Duration::from_millis(config.rpc_timeout_ms),
            ),
            id,
            broker: Arc::new(Broker::new(id, limits.publish_timeout)),
            limits,
            verifier: Verifier::new(config.keys())?,
            registry: Arc::default(),
            readiness: Readiness::new(),
            fleet: Fleet::new(Duration::from_millis(config.fleet_announce_ms)),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        })
    }

    /// Ready when connected to RabbitMQ with every device bound and every
    /// revocation read, and not shutting down.
    pub fn update_readiness(&self) {
        let caught_up = self.broker.generation() == Some(self.revocations.caught_up());
        self.readiness
            .set(!self.shutdown.is_cancelled() && self.broker.ready() && caught_up);
    }

    /// Verifies a device token: its signature and claims, and that it was not
    /// revoked.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let identity = self.verifier.verify(token)?;
        if self.revocations.is_revoked(identity.device, identity.iat) {
            return Err(AuthError::Revoked);
        }
        Ok(identity)
    }

    /// Keeps the readiness flag in step with the broker link until shutdown.
    pub async fn follow_broker(self: Arc<Self>) {
        let Some(crate::broker::Watch {
            mut links,
            mut synced,
        }) = self.broker.watch()
        else {
            return;
        };
        let mut caught_up = self.revocations.watch();
        loop {
            self.update_readiness();
            tokio::select! {
                r = links.changed() => if r.is_err() { return },
                r = synced.changed() => if r.is_err() { return },
                r = caught_up.changed() => if r.is_err() { return },
                _ = self.shutdown.cancelled() => {
                    self.update_readiness();
                    return;
                }
            }
        }
    }
}
