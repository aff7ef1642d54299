//! The link's metrics, by name, in one place. Each carries the label `link` (the
//! service's name), so two services in one process stay apart.

use metrics::{counter, gauge};

/// Counter by `link` and `outcome`: connection attempts and losses (`connected`,
/// `failed`, `lost`).
pub const CONNECTIONS: &str = "mosaic_amqp_connections_total";
/// Gauge by `link`: 1 while a whole link is up, else 0.
pub const CONNECTED: &str = "mosaic_amqp_connected";
/// Gauge by `link`: 1 while RabbitMQ blocks this connection's publishers (an alarm).
pub const BLOCKED: &str = "mosaic_amqp_blocked";

/// Every metric name above (the operations guide documents each; a test checks).
pub const ALL: [&str; 3] = [CONNECTIONS, CONNECTED, BLOCKED];

pub(crate) fn connection(link: &'static str, outcome: &'static str) {
    counter!(CONNECTIONS, "link" => link, "outcome" => outcome).increment(1);
}

pub(crate) fn connected(link: &'static str, up: bool) {
    gauge!(CONNECTED, "link" => link).set(if up { 1.0 } else { 0.0 });
}

pub(crate) fn blocked(link: &'static str, blocked: bool) {
    gauge!(BLOCKED, "link" => link).set(if blocked { 1.0 } else { 0.0 });
}
