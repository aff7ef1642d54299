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

/// Every metric name above (the operations guide documents each; a test checks).
pub const ALL: [&str; 6] = [
    DELIVERIES,
    DELIVERY_ATTEMPTS,
    HIVE_SECONDS,
    DEAD_LETTERED,
    REQUESTS,
    REQUEST_SECONDS,
];

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
