//! Every metric the service records, by name, in one place.
//!
//! Each function is a named event: call sites never spell a metric name.

use std::time::Duration;

/// Deliveries finished, by `outcome`: `delivered`, `dead_lettered`, `requeued`.
pub const DELIVERIES: &str = "mosaic_device_deliveries_total";
/// POSTs made to Hive (every attempt, retries included).
pub const DELIVERY_ATTEMPTS: &str = "mosaic_device_delivery_attempts_total";
/// Duration of one POST to Hive, by `result` (`2xx`, `retry`, `reject`, `error`).
pub const HIVE_SECONDS: &str = "mosaic_device_hive_seconds";
/// Messages sent to the dead-letter queue, by `reason`.
pub const DEAD_LETTERED: &str = "mosaic_device_dead_lettered_total";
/// REST calls that publish to devices, by `endpoint` and `outcome` (the error code, or `ok`).
pub const REQUESTS: &str = "mosaic_device_requests_total";
/// Duration of REST calls that publish to devices, by `endpoint`.
pub const REQUEST_SECONDS: &str = "mosaic_device_request_seconds";

/// Fleet calls by `call` (`list`, `group_event`, `fanout`) and `outcome`.
pub const FLEET_CALLS: &str = "mosaic_device_fleet_calls_total";
/// Devices of finished scatter-gather requests, by `bucket` (`answered`,
/// `timed_out`, `left`, `busy`).
pub const FANOUT_DEVICES: &str = "mosaic_device_fanout_devices_total";
/// Answers to a fan-out refused: from a device not asked, or a second one.
pub const FANOUT_REFUSED: &str = "mosaic_device_fanout_refused_total";
/// Fan-out answers whose data was dropped at `MAX_FANOUT_ANSWER_BYTES`.
pub const FANOUT_TRUNCATED: &str = "mosaic_device_fanout_truncated_total";
/// Gateway replicas declared lost (silent past `FLEET_LOST_AFTER_MS`).
pub const GATEWAYS_LOST: &str = "mosaic_device_gateways_lost_total";
/// `gateway_lost` disconnects published by this replica as leader.
pub const GATEWAY_LOST_SESSIONS: &str = "mosaic_device_gateway_lost_sessions_total";
/// Gauge: live gateway replicas in this replica's view.
pub const GATEWAYS: &str = "mosaic_device_gateways";
/// Gauge: 1 while this replica leads the fleet's gateway-loss announcements.
pub const LEADER: &str = "mosaic_device_fleet_leader";
/// Committed registry changes, by `change` (`created`, `updated`, `deleted`, `activated`).
pub const REGISTRY_CHANGES: &str = "mosaic_device_registry_changes_total";
/// Outbox messages the broker confirmed (then removed from the outbox).
pub const OUTBOX_PUBLISHED: &str = "mosaic_device_outbox_published_total";
/// Gauge: messages waiting in the outbox, as of the last drain.
pub const OUTBOX_PENDING: &str = "mosaic_device_outbox_pending";
/// Enrolment events, by `outcome` (`issued`, `enrolled`, `refused`, `not_configured`).
pub const ENROLMENTS: &str = "mosaic_device_enrolments_total";
/// Device tokens minted, by `reason` (`enrol`, `renew`).
pub const TOKENS_MINTED: &str = "mosaic_device_tokens_minted_total";
/// Gauge: 1 while PostgreSQL answers and the schema is migrated, else 0.
pub const DATABASE_UP: &str = "mosaic_device_database_up";
/// Sightings (`last_seen`, activation) not recorded, by `reason` (`full`, `database`).
pub const SIGHTINGS_DROPPED: &str = "mosaic_device_sightings_dropped_total";
/// Gateway requests (enrol, renew) answered, by `op` and `result`.
pub const RPC_REQUESTS: &str = "mosaic_device_rpc_requests_total";

/// Every metric name above (the operations guide documents each; a test checks).
pub const ALL: [&str; 22] = [
    DELIVERIES,
    DELIVERY_ATTEMPTS,
    HIVE_SECONDS,
    DEAD_LETTERED,
    REQUESTS,
    REQUEST_SECONDS,
    FLEET_CALLS,
    FANOUT_DEVICES,
    FANOUT_REFUSED,
    FANOUT_TRUNCATED,
    GATEWAYS_LOST,
    GATEWAY_LOST_SESSIONS,
    GATEWAYS,
    LEADER,
    REGISTRY_CHANGES,
    OUTBOX_PUBLISHED,
    OUTBOX_PENDING,
    ENROLMENTS,
    TOKENS_MINTED,
    DATABASE_UP,
    SIGHTINGS_DROPPED,
    RPC_REQUESTS,
];

/// A fleet call ended.
pub fn fleet_call(call: &'static str, outcome: &'static str) {
    metrics::counter!(FLEET_CALLS, "call" => call, "outcome" => outcome).increment(1);
}

/// A fan-out ended with this many devices in each bucket (`answered`, `timed_out`,
/// `left`, `busy`).
pub fn fanout_finished(buckets: [(&'static str, usize); 4]) {
    fleet_call("fanout", "ok");
    for (bucket, n) in buckets {
        metrics::counter!(FANOUT_DEVICES, "bucket" => bucket).increment(n as u64);
    }
}

/// An answer to a fan-out was refused.
pub fn fanout_refused() {
    metrics::counter!(FANOUT_REFUSED).increment(1);
}

/// A fan-out answer lost its data to the memory cap.
pub fn fanout_truncated() {
    metrics::counter!(FANOUT_TRUNCATED).increment(1);
}

/// A gateway replica was declared lost.
pub fn gateway_lost() {
    metrics::counter!(GATEWAYS_LOST).increment(1);
}

/// `n` `gateway_lost` disconnects were published.
pub fn gateway_lost_sessions(n: usize) {
    metrics::counter!(GATEWAY_LOST_SESSIONS).increment(n as u64);
}

/// The view and the leadership now.
pub fn fleet_state(gateways: usize, leader: bool) {
    metrics::gauge!(GATEWAYS).set(gateways as f64);
    metrics::gauge!(LEADER).set(if leader { 1.0 } else { 0.0 });
}

/// A registry change committed.
pub fn registry_change(change: &'static str) {
    metrics::counter!(REGISTRY_CHANGES, "change" => change).increment(1);
}

/// `n` outbox messages confirmed; `pending` still wait.
pub fn outbox_published(n: usize) {
    metrics::counter!(OUTBOX_PUBLISHED).increment(n as u64);
}

/// Messages waiting in the outbox.
pub fn outbox_pending(n: i64) {
    metrics::gauge!(OUTBOX_PENDING).set(n as f64);
}

/// An enrolment event.
pub fn enrolment(outcome: &'static str) {
    metrics::counter!(ENROLMENTS, "outcome" => outcome).increment(1);
}

/// A token minted.
pub fn token_minted(reason: &'static str) {
    metrics::counter!(TOKENS_MINTED, "reason" => reason).increment(1);
}

/// Whether PostgreSQL is up.
pub fn database_up(up: bool) {
    metrics::gauge!(DATABASE_UP).set(if up { 1.0 } else { 0.0 });
}

/// Sightings not recorded.
pub fn sightings_dropped(reason: &'static str, n: usize) {
    metrics::counter!(SIGHTINGS_DROPPED, "reason" => reason).increment(n as u64);
}

/// A gateway request answered.
pub fn rpc(op: &'static str, result: &'static str) {
    metrics::counter!(RPC_REQUESTS, "op" => op, "result" => result).increment(1);
}

/// A delivery left this replica: acked after Hive's 2xx, dead-lettered, or handed back.
pub fn delivery_finished(outcome: &'static str) {
    metrics::counter!(DELIVERIES, "outcome" => outcome).increment(1);
}

/// One POST to Hive ended after `took`, with `result`.
pub fn hive_attempt(result: &'static str, took: Duration) {
    metrics::counter!(DELIVERY_ATTEMPTS).increment(1);
    metrics::histogram!(HIVE_SECONDS, "result" => result).record(took.as_secs_f64());
}

/// A message was published to the dead-letter queue.
pub fn dead_lettered(reason: &'static str) {
    metrics::counter!(DEAD_LETTERED, "reason" => reason).increment(1);
}

/// A REST call to `endpoint` ended with `outcome` after `took`.
pub fn request(endpoint: &'static str, outcome: &'static str, took: Duration) {
    metrics::counter!(REQUESTS, "endpoint" => endpoint, "outcome" => outcome).increment(1);
    metrics::histogram!(REQUEST_SECONDS, "endpoint" => endpoint).record(took.as_secs_f64());
}
