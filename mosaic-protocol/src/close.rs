//! WebSocket close codes and the reasons a device session ends.

/// The server is going away (shutdown); the device should reconnect elsewhere.
pub const GOING_AWAY: u16 = 1001;
/// Policy violation: too many bad frames in a row.
pub const POLICY_VIOLATION: u16 = 1008;
/// A frame larger than the configured maximum.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// The server met an unexpected condition; also sent when a device answered no ping
/// in time (the reason text says which).
pub const INTERNAL_ERROR: u16 = 1011;
/// The gateway cannot serve the session now (its broker link is down, or binding
/// the device's command route failed); reconnect after a pause, to any replica.
pub const TRY_AGAIN_LATER: u16 = 1013;
/// Bad token, or the token expired without refresh.
pub const UNAUTHORIZED: u16 = 4401;
/// A refresh token named a different device (`sub`), or the device's tokens were
/// revoked (reason "revoked").
pub const FORBIDDEN: u16 = 4403;
/// No `auth` frame within the auth timeout.
pub const AUTH_TIMEOUT: u16 = 4408;
/// A newer session of the same device replaced this one.
pub const REPLACED: u16 = 4409;
/// Hive ended the session (`DELETE /v1/devices/{device}/session`).
pub const KICKED: u16 = 4410;
/// The device did not read what was sent to it fast enough (outbound queue full).
pub const SLOW_CONSUMER: u16 = 4429;

/// Why a session ended, as carried in the lifecycle `disconnected` message's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DisconnectReason {
    /// The device closed the connection (or the TCP connection ended).
    ClosedByDevice,
    /// The token's `exp` passed with no refresh.
    TokenExpired,
    /// A refresh token named another device.
    Forbidden,
    /// A newer session of the same device took over.
    Replaced,
    /// The device answered no ping in time.
    PingTimeout,
    /// The gateway is shutting down.
    Shutdown,
    /// The device stopped reading and its outbound queue filled.
    SlowConsumer,
    /// The device kept sending bad frames, or sent one over the size limit.
    PolicyViolation,
    /// The gateway could not set the session up with RabbitMQ (closed with 1013
    /// before `welcome`).
    BrokerUnavailable,
    /// Hive ended the session (close 4410).
    Kicked,
    /// The gateway replica holding the session vanished without closing it (a crash,
    /// a network partition): device-service announces this on the gateway's behalf.
    GatewayLost,
    /// Anything else: an I/O error on the socket.
    Error,
    /// The device was disabled or deleted in the registry (closed with 4403
    /// "revoked").
    Revoked,
}

impl DisconnectReason {
    /// The snake_case name used in lifecycle messages, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::ClosedByDevice => "closed_by_device",
            DisconnectReason::TokenExpired => "token_expired",
            DisconnectReason::Forbidden => "forbidden",
            DisconnectReason::Replaced => "replaced",
            DisconnectReason::PingTimeout => "ping_timeout",
            DisconnectReason::Shutdown => "shutdown",
            DisconnectReason::SlowConsumer => "slow_consumer",
            DisconnectReason::PolicyViolation => "policy_violation",
            DisconnectReason::BrokerUnavailable => "broker_unavailable",
            DisconnectReason::Kicked => "kicked",
            DisconnectReason::GatewayLost => "gateway_lost",
            DisconnectReason::Error => "error",
            DisconnectReason::Revoked => "revoked",
        }
    }
}
