//! Metric names and the events that update them. Every metric of this service is
//! named here and nowhere else.

use metrics::{counter, gauge, histogram};

/// Gauge: authenticated device sessions open on this replica.
pub const CONNECTIONS: &str = "mosaic_ws_connections";
/// Counter by `reason`: refused tokens and auth timeouts.
pub const AUTH_FAILURES: &str = "mosaic_ws_auth_failures_total";
/// Counter by `type`: frames received from devices.
pub const FRAMES_IN: &str = "mosaic_ws_frames_in_total";
/// Counter by `type`: frames sent to devices.
pub const FRAMES_OUT: &str = "mosaic_ws_frames_out_total";
/// Histogram, seconds: from publish to broker confirm.
pub const PUBLISH_CONFIRM_SECONDS: &str = "mosaic_ws_publish_confirm_seconds";
/// Counter by `code`: `nack` frames sent to devices.
pub const NACKS: &str = "mosaic_ws_nacks_total";
/// Counter by `code`: WebSocket close codes sent to devices.
pub const CLOSES: &str = "mosaic_ws_closes_total";

/// Counter: broadcast events a device missed because its outbound queue was full.
pub const BROADCAST_DROPPED: &str = "mosaic_ws_broadcast_dropped_total";

/// Counter: device frames held back by the per-device rate limit (`EVENT_RATE`).
pub const RATE_LIMITED: &str = "mosaic_ws_rate_limited_total";

/// Gauge: WebSocket connections open on this replica, authenticated or not (the
/// number `MAX_CONNECTIONS` caps).
pub const SOCKETS: &str = "mosaic_ws_sockets";
/// Gauge: of those, connections still in the `hello`/`auth` phase (the number
/// `MAX_UNAUTHENTICATED` caps).
pub const UNAUTHENTICATED_SOCKETS: &str = "mosaic_ws_unauthenticated_sockets";
/// Counter by `limit` (`max_connections`, `max_unauthenticated`): upgrade requests
/// refused with 503 because a connection cap was reached.
pub const CONNECTIONS_REFUSED: &str = "mosaic_ws_connections_refused_total";

/// Counter by `command` (`presence`, `kick`, `list`, `group_event`, `group_request`,
/// `broadcast_request`, `register`, `resume`): fleet commands handled by this replica.
pub const FLEET_COMMANDS: &str = "mosaic_ws_fleet_commands_total";
/// Counter: devices asked by scatter-gather requests on this replica.
pub const FANOUT_ASKED: &str = "mosaic_ws_fanout_asked_total";
/// Counter: announcements this replica published on `mosaic.fleet`.
pub const ANNOUNCEMENTS: &str = "mosaic_ws_fleet_announcements_total";
/// Gauge: devices with a revocation this replica knows of.
pub const REVOKED_DEVICES: &str = "mosaic_ws_revoked_devices";
/// Counter by `op` (`enrol`, `renew`) and `result` (`token`, `refused`,
/// `no_service`, `unavailable`): requests to device-service.
pub const RPC_REQUESTS: &str = "mosaic_ws_rpc_requests_total";

/// Every metric name above (the operations guide documents each; a test checks).
pub const ALL: [&str; 17] = [
    REVOKED_DEVICES,
    RPC_REQUESTS,
    CONNECTIONS,
    AUTH_FAILURES,
    FRAMES_IN,
    FRAMES_OUT,
    PUBLISH_CONFIRM_SECONDS,
    NACKS,
    CLOSES,
    BROADCAST_DROPPED,
    RATE_LIMITED,
    SOCKETS,
    UNAUTHENTICATED_SOCKETS,
    CONNECTIONS_REFUSED,
    FLEET_COMMANDS,
    FANOUT_ASKED,
    ANNOUNCEMENTS,
];

pub(crate) fn fleet_command(command: &'static str) {
    counter!(FLEET_COMMANDS, "command" => command).increment(1);
}

pub(crate) fn fanout_asked(n: usize) {
    counter!(FANOUT_ASKED).increment(n as u64);
}

pub(crate) fn announced() {
    counter!(ANNOUNCEMENTS).increment(1);
}

pub(crate) fn session_opened() {
    gauge!(CONNECTIONS).increment(1.0);
}

pub(crate) fn session_closed() {
    gauge!(CONNECTIONS).decrement(1.0);
}

pub(crate) fn auth_failure(reason: &'static str) {
    counter!(AUTH_FAILURES, "reason" => reason).increment(1);
}

pub(crate) fn frame_in(kind: &'static str) {
    counter!(FRAMES_IN, "type" => kind).increment(1);
}

pub(crate) fn frame_out(kind: &'static str) {
    counter!(FRAMES_OUT, "type" => kind).increment(1);
}

pub(crate) fn confirm_latency(secs: f64) {
    histogram!(PUBLISH_CONFIRM_SECONDS).record(secs);
}

pub(crate) fn nack(code: &'static str) {
    counter!(NACKS, "code" => code).increment(1);
}

pub(crate) fn close(code: u16) {
    counter!(CLOSES, "code" => code.to_string()).increment(1);
}

pub(crate) fn broadcast_dropped() {
    counter!(BROADCAST_DROPPED).increment(1);
}

pub(crate) fn rate_limited() {
    counter!(RATE_LIMITED).increment(1);
}

pub(crate) fn socket_opened(unauthenticated: bool) {
    gauge!(SOCKETS).increment(1.0);
    if unauthenticated {
        gauge!(UNAUTHENTICATED_SOCKETS).increment(1.0);
    }
}

pub(crate) fn socket_authenticated() {
    gauge!(UNAUTHENTICATED_SOCKETS).decrement(1.0);
}

pub(crate) fn socket_closed() {
    gauge!(SOCKETS).decrement(1.0);
}

pub(crate) fn connection_refused(limit: &'static str) {
    counter!(CONNECTIONS_REFUSED, "limit" => limit).increment(1);
}

pub(crate) fn revoked_devices(n: usize) {
    gauge!(REVOKED_DEVICES).set(n as f64);
}

pub(crate) fn rpc(op: &'static str, result: &'static str) {
    counter!(RPC_REQUESTS, "op" => op, "result" => result).increment(1);
}
