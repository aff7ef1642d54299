//! Settings, read once at start from flags and the environment.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use mosaic_runtime::config::ConfigError;
use mosaic_runtime::telemetry::LogFormat;
use uuid::Uuid;

/// The shortest HMAC secret accepted, in bytes (RFC 7518 §3.2 for HS256).
pub const MIN_SECRET_BYTES: usize = 32;

/// The largest `JWT_LEEWAY_SECS` (5 minutes): more is no longer clock skew.
pub const MAX_JWT_LEEWAY_SECS: u64 = 300;
/// The largest `AUTH_TIMEOUT_MS`, `PONG_TIMEOUT_MS`, `PUBLISH_TIMEOUT_MS` and
/// `SHUTDOWN_GRACE_MS` (10 minutes).
pub const MAX_TIMEOUT_MS: u64 = 600_000;
/// The largest `PING_INTERVAL_MS` (1 hour).
pub const MAX_PING_INTERVAL_MS: u64 = 3_600_000;
/// The largest `HEADER_READ_TIMEOUT_MS` (2 minutes).
pub const MAX_HEADER_READ_TIMEOUT_MS: u64 = 120_000;
/// The largest `MAX_CONNECTIONS`, `MAX_UNAUTHENTICATED` and `MAX_HTTP_CONNECTIONS`.
pub const MAX_COUNT: u64 = 1_000_000;

/// websocket-service settings. Every field mirrors an environment variable.
#[derive(Clone, Parser)]
#[command(name = "websocket-service", version, about)]
pub struct Config {
    /// RabbitMQ: `AMQP_URL` and the reconnect and timeout bounds of the link.
    #[command(flatten)]
    pub broker: mosaic_amqp::BrokerArgs,

    /// Log format: `json` (one object a line) or `text`. The filter comes from `RUST_LOG`.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Address the WebSocket endpoint and the health routes listen on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen_addr: SocketAddr,

    /// HMAC secret for HS256/HS384/HS512 tokens, at least 32 bytes.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Path to a PEM file (one public key) or a JWKS file (keys chosen by `kid`) for
    /// RS256, ES256 and EdDSA tokens.
    #[arg(long, env = "JWT_PUBLIC_KEYS")]
    pub jwt_public_keys: Option<PathBuf>,

    /// Required `aud` claim; unset means `aud` is not checked.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Required `iss` claim; unset means `iss` is not checked.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    #[arg(long, env = "JWT_LEEWAY_SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(0..=MAX_JWT_LEEWAY_SECS))]
    pub jwt_leeway_secs: u64,

    /// How long a device without an `Authorization` header has to send its `auth` frame.
    #[arg(long, env = "AUTH_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_MS))]
    pub auth_timeout_ms: u64,

    /// Largest WebSocket message accepted from a device, in bytes; larger closes with 1009.
    #[arg(long, env = "MAX_FRAME_BYTES", default_value_t = 256 * 1024, value_parser = clap::value_parser!(u64).range(256..=16 * 1024 * 1024))]
    pub max_frame_bytes: u64,

    /// Interval between pings to each device.
    #[arg(long, env = "PING_INTERVAL_MS", default_value_t = 20_000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_PING_INTERVAL_MS))]
    pub ping_interval_ms: u64,

    /// How long a device has to answer a ping before its connection is closed (also
    /// the longest a write to the device may take).
    #[arg(long, env = "PONG_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_MS))]
    pub pong_timeout_ms: u64,

    /// Frames waiting to be written to one device; when full the device is closed
    /// with 4429 (slow consumer).
    #[arg(long, env = "OUTBOUND_QUEUE", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub outbound_queue: u64,

    /// Events awaiting a publisher confirm per device; when reached, the gateway stops
    /// reading from that device until a confirm arrives.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_in_flight: u64,

    /// Sustained frames per second a device may send; faster devices are read slower.
    #[arg(long, env = "EVENT_RATE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub event_rate: u32,

    /// Frames a device may send at once above `EVENT_RATE`.
    #[arg(long, env = "EVENT_BURST", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub event_burst: u32,

    /// Consecutive bad frames after which a device is closed with 1008.
    #[arg(long, env = "MAX_BAD_FRAMES", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub max_bad_frames: u32,

    /// How long to wait for a publisher confirm before answering `nack` `unavailable`.
    #[arg(long, env = "PUBLISH_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_MS))]
    pub publish_timeout_ms: u64,

    /// How long shutdown waits for sessions to close before the process exits.
    #[arg(long, env = "SHUTDOWN_GRACE_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(0..=MAX_TIMEOUT_MS))]
    pub shutdown_grace_ms: u64,

    /// Interval of this replica's announcements on `mosaic.fleet`, in milliseconds:
    /// device-service declares a replica silent for three intervals (at least its
    /// own `FLEET_LOST_AFTER_MS`) lost.
    #[arg(long, env = "FLEET_ANNOUNCE_MS", default_value_t = 2_000,
          value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub fleet_announce_ms: u64,

    /// WebSocket connections this replica holds at once, authenticated or not; past
    /// it `GET /v1/connect` answers 503 before the upgrade.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 20_000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_COUNT))]
    pub max_connections: u64,

    /// Of those, connections still in the in-band `hello`/`auth` phase; past it a
    /// connection without an `Authorization` header gets 503 before the upgrade.
    #[arg(long, env = "MAX_UNAUTHENTICATED", default_value_t = 1_000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_COUNT))]
    pub max_unauthenticated: u64,

    /// How long a client has to send the headers of its HTTP request (the upgrade
    /// request, a probe, a scrape); slower connections are dropped.
    #[arg(long, env = "HEADER_READ_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..=MAX_HEADER_READ_TIMEOUT_MS))]
    pub header_read_timeout_ms: u64,

    /// HTTP connections served at once, not counting upgraded WebSockets; at the cap
    /// the server stops accepting until one closes.
    #[arg(long, env = "MAX_HTTP_CONNECTIONS", default_value_t = 4_096,
          value_parser = clap::value_parser!(u64).range(1..=MAX_COUNT))]
    pub max_http_connections: u64,

    /// Longest wait for device-service to answer an `enrol` or `renew`, in
    /// milliseconds.
    #[arg(long, env = "RPC_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub rpc_timeout_ms: u64,

    /// This replica's id (names its command queue); a random UUID when unset.
    #[arg(long, env = "GATEWAY_ID")]
    pub gateway_id: Option<Uuid>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets and the broker URL (it holds a password) stay out of logs.
        f.debug_struct("Config")
            .field("listen_addr", &self.listen_addr)
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("jwt_public_keys", &self.jwt_public_keys)
            .field("jwt_audience", &self.jwt_audience)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("auth_timeout_ms", &self.auth_timeout_ms)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("max_connections", &self.max_connections)
            .field("max_unauthenticated", &self.max_unauthenticated)
            .field("gateway_id", &self.gateway_id)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Checks what clap cannot: a key source is set, the HMAC secret is long enough
    /// and not a published placeholder, and the `JWT_PUBLIC_KEYS` file holds usable
    /// keys (it is read here, so a bad file stops the service before it binds). The
    /// error names the variable, never a secret's value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.jwt_secret.is_none() && self.jwt_public_keys.is_none() {
            return Err(ConfigError::new(
                "JWT_SECRET",
                "set JWT_SECRET or JWT_PUBLIC_KEYS (or both)",
            ));
        }
        if let Some(s) = &self.jwt_secret
            && s.len() < MIN_SECRET_BYTES
        {
            return Err(ConfigError::new(
                "JWT_SECRET",
                format!("must be at least {MIN_SECRET_BYTES} bytes"),
            ));
        }
        if let Some(s) = &self.jwt_secret {
            mosaic_runtime::config::refuse_placeholder("JWT_SECRET", s)?;
        }
        if self.jwt_public_keys.is_some() {
            crate::auth::Verifier::new(self.keys()).map_err(|e| {
                ConfigError::new("JWT_PUBLIC_KEYS", e.to_string().replace('\n', " "))
            })?;
        }
        Ok(())
    }

    /// Where the device tokens' keys come from.
    pub fn keys(&self) -> crate::auth::KeySettings<'_> {
        crate::auth::KeySettings {
            secret: self.jwt_secret.as_deref(),
            public_keys: self.jwt_public_keys.as_deref(),
            audience: self.jwt_audience.as_deref(),
            issuer: self.jwt_issuer.as_deref(),
            leeway_secs: self.jwt_leeway_secs,
        }
    }

    /// The HTTP server's bounds.
    pub fn http_limits(&self) -> mosaic_runtime::serve::Limits {
        mosaic_runtime::serve::Limits {
            header_read_timeout: std::time::Duration::from_millis(self.header_read_timeout_ms),
            max_connections: usize::try_from(self.max_http_connections).unwrap_or(usize::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mosaic_runtime::config::{Parsed, parse};
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match parse::<Config>(["websocket-service"], |k| map.get(k).cloned())? {
            Parsed::Run(c) => {
                c.validate()?;
                Ok(c)
            }
            Parsed::Print(_) => panic!("unexpected print"),
        }
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = config(&[("JWT_SECRET", &"k".repeat(32))]).unwrap();
        assert_eq!(c.listen_addr, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.auth_timeout_ms, 10_000);
        assert_eq!(c.max_frame_bytes, 256 * 1024);
        assert_eq!(c.broker.amqp_url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(c.max_connections, 20_000);
        assert_eq!(c.max_unauthenticated, 1_000);
        assert_eq!(
            c.http_limits(),
            mosaic_runtime::serve::Limits {
                header_read_timeout: std::time::Duration::from_secs(10),
                max_connections: 4_096,
            }
        );
    }

    #[test]
    fn a_short_secret_is_refused_without_echoing_it() {
        let e = config(&[("JWT_SECRET", "short-secret-value")]).unwrap_err();
        assert_eq!(e.setting, "JWT_SECRET");
        assert!(!e.to_string().contains("short-secret-value"));
        assert!(!e.to_string().contains('\n'));
    }

    /// An Ed25519 public key (test-only).
    const ED_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----\n\
        MCowBQYDK2VwAyEAYC9U+ocjhnVk6P21GIkR2gS4hCE+m+Fdm2XGUodMHXk=\n\
        -----END PUBLIC KEY-----\n";

    #[test]
    fn some_key_source_is_required() {
        assert_eq!(config(&[]).unwrap_err().setting, "JWT_SECRET");
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("k.pem");
        std::fs::write(&pem, ED_PUBLIC_PEM).unwrap();
        config(&[("JWT_PUBLIC_KEYS", pem.to_str().unwrap())]).unwrap();
    }

    #[test]
    fn unusable_public_keys_are_refused_by_validate() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a key\nat all\n").unwrap();
        let empty = dir.path().join("empty.json");
        std::fs::write(&empty, r#"{"keys": []}"#).unwrap();
        let missing = dir.path().join("missing.pem");
        for path in [&garbage, &empty, &missing] {
            let e = config(&[("JWT_PUBLIC_KEYS", path.to_str().unwrap())]).unwrap_err();
            assert_eq!(e.setting, "JWT_PUBLIC_KEYS", "{e}");
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }

    #[test]
    fn a_published_placeholder_secret_is_refused_without_echoing_it() {
        let placeholder = "REPLACE-ME-placeholder-jwt-hmac-secret-not-for-use";
        let e = config(&[("JWT_SECRET", placeholder)]).unwrap_err();
        assert_eq!(e.setting, "JWT_SECRET");
        assert!(!e.to_string().contains(placeholder), "{e}");
    }

    /// Every numeric setting with a value past its range, including those that used
    /// to overflow the clock or the JWT checks.
    #[test]
    fn numbers_past_their_range_are_refused_and_named() {
        let huge = u64::MAX.to_string();
        let secret = "k".repeat(32);
        for (var, value) in [
            ("JWT_LEEWAY_SECS", huge.as_str()),
            ("JWT_LEEWAY_SECS", "301"),
            ("AUTH_TIMEOUT_MS", huge.as_str()),
            ("MAX_FRAME_BYTES", "17000000"),
            ("PING_INTERVAL_MS", huge.as_str()),
            ("PONG_TIMEOUT_MS", huge.as_str()),
            ("PONG_TIMEOUT_MS", "600001"),
            ("OUTBOUND_QUEUE", "4097"),
            ("MAX_IN_FLIGHT", "4097"),
            ("EVENT_RATE", "10001"),
            ("EVENT_BURST", "100001"),
            ("MAX_BAD_FRAMES", "1001"),
            ("PUBLISH_TIMEOUT_MS", huge.as_str()),
            ("SHUTDOWN_GRACE_MS", huge.as_str()),
            ("MAX_CONNECTIONS", "0"),
            ("MAX_CONNECTIONS", "1000001"),
            ("MAX_UNAUTHENTICATED", "0"),
            ("HEADER_READ_TIMEOUT_MS", "99"),
            ("HEADER_READ_TIMEOUT_MS", "120001"),
            ("MAX_HTTP_CONNECTIONS", "0"),
        ] {
            let e = config(&[("JWT_SECRET", &secret), (var, value)]).unwrap_err();
            assert_eq!(e.setting, var, "{var}={value}: {e}");
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }

    #[test]
    fn the_largest_values_are_accepted() {
        let c = config(&[
            ("JWT_SECRET", &"k".repeat(32)),
            ("JWT_LEEWAY_SECS", "300"),
            ("AUTH_TIMEOUT_MS", "600000"),
            ("PING_INTERVAL_MS", "3600000"),
            ("PONG_TIMEOUT_MS", "600000"),
            ("PUBLISH_TIMEOUT_MS", "600000"),
            ("SHUTDOWN_GRACE_MS", "600000"),
            ("MAX_CONNECTIONS", "1000000"),
            ("MAX_UNAUTHENTICATED", "1000000"),
            ("HEADER_READ_TIMEOUT_MS", "120000"),
            ("MAX_HTTP_CONNECTIONS", "1000000"),
        ])
        .unwrap();
        assert_eq!(c.pong_timeout_ms, MAX_TIMEOUT_MS);
        assert_eq!(c.jwt_leeway_secs, MAX_JWT_LEEWAY_SECS);
        assert_eq!(c.http_limits().max_connections, 1_000_000);
    }

    #[test]
    fn bad_numbers_are_named() {
        let e = config(&[("JWT_SECRET", &"k".repeat(32)), ("AUTH_TIMEOUT_MS", "0")]).unwrap_err();
        assert_eq!(e.setting, "AUTH_TIMEOUT_MS");
    }

    #[test]
    fn debug_hides_the_secret() {
        let c = config(&[("JWT_SECRET", &"s3cr3t".repeat(8))]).unwrap();
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }
}
