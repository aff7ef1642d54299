//! Settings, read once at start from flags and the environment.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use mosaic_runtime::config::ConfigError;
use mosaic_runtime::telemetry::LogFormat;
use uuid::Uuid;

/// The shortest HMAC secret accepted, in bytes (RFC 7518 §3.2 for HS256).
pub const MIN_SECRET_BYTES: usize = 32;

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
    #[arg(long, env = "JWT_LEEWAY_SECS", default_value_t = 5)]
    pub jwt_leeway_secs: u64,

    /// How long a device without an `Authorization` header has to send its `auth` frame.
    #[arg(long, env = "AUTH_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub auth_timeout_ms: u64,

    /// Largest WebSocket message accepted from a device, in bytes; larger closes with 1009.
    #[arg(long, env = "MAX_FRAME_BYTES", default_value_t = 256 * 1024, value_parser = clap::value_parser!(u64).range(256..=16 * 1024 * 1024))]
    pub max_frame_bytes: u64,

    /// Interval between pings to each device.
    #[arg(long, env = "PING_INTERVAL_MS", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub ping_interval_ms: u64,

    /// How long a device has to answer a ping before its connection is closed.
    #[arg(long, env = "PONG_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
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
    #[arg(long, env = "EVENT_RATE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub event_rate: u32,

    /// Frames a device may send at once above `EVENT_RATE`.
    #[arg(long, env = "EVENT_BURST", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub event_burst: u32,

    /// Consecutive bad frames after which a device is closed with 1008.
    #[arg(long, env = "MAX_BAD_FRAMES", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_bad_frames: u32,

    /// How long to wait for a publisher confirm before answering `nack` `unavailable`.
    #[arg(long, env = "PUBLISH_TIMEOUT_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub publish_timeout_ms: u64,

    /// How long shutdown waits for sessions to close before the process exits.
    #[arg(long, env = "SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,

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
            .field("gateway_id", &self.gateway_id)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Checks what clap cannot: a key source is set and the HMAC secret is long enough.
    /// The error names the variable, never its value.
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
        Ok(())
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
    }

    #[test]
    fn a_short_secret_is_refused_without_echoing_it() {
        let e = config(&[("JWT_SECRET", "short-secret-value")]).unwrap_err();
        assert_eq!(e.setting, "JWT_SECRET");
        assert!(!e.to_string().contains("short-secret-value"));
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn some_key_source_is_required() {
        assert_eq!(config(&[]).unwrap_err().setting, "JWT_SECRET");
        config(&[("JWT_PUBLIC_KEYS", "/k.pem")]).unwrap();
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
