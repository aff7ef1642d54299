//! The service's settings: every field is a flag mirrored by an environment variable.
//!
//! Parse with [`mosaic_runtime::config::parse`] (tests) or
//! [`mosaic_runtime::config::from_process`] (main), then call [`Config::validate`]
//! (`run` does it too). `RUST_LOG` is read by the log filter, not here.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use mosaic_runtime::config::ConfigError;
use mosaic_runtime::telemetry::LogFormat;

/// Shortest API token accepted, in bytes.
pub const MIN_TOKEN_BYTES: usize = 16;

/// The largest `HIVE_TIMEOUT_MS`, `PUBLISH_TIMEOUT_MS`, `SHUTDOWN_GRACE_MS` and
/// `RECONNECT_MAX_MS` (10 minutes).
pub const MAX_TIMEOUT_MS: u64 = 600_000;
/// The largest `RETRY_BASE_MS` and `RETRY_MAX_MS` (1 hour).
pub const MAX_RETRY_MS: u64 = 3_600_000;
/// The largest `HIVE_MAX_AGE_MS` (7 days).
pub const MAX_AGE_MS: u64 = 7 * 24 * 3_600_000;
/// The largest `HEADER_READ_TIMEOUT_MS` (2 minutes).
pub const MAX_HEADER_READ_TIMEOUT_MS: u64 = 120_000;

/// device-service settings.
#[derive(Clone, Parser)]
#[command(name = "device-service", version, about)]
pub struct Config {
    /// RabbitMQ: `AMQP_URL` and the reconnect and timeout bounds of the link.
    #[command(flatten)]
    pub broker: mosaic_amqp::BrokerArgs,

    /// Log format: `json` (one object a line) or `text`.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Address the REST API, health and metrics listen on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8081")]
    pub listen_addr: SocketAddr,

    /// Where every device message is POSTed (http or https URL).
    #[arg(long, env = "HIVE_URL")]
    pub hive_url: reqwest::Url,

    /// When set, every POST carries `X-Mosaic-Signature` (HMAC-SHA256 with this secret).
    #[arg(long, env = "HIVE_SIGNING_SECRET", hide_env_values = true)]
    pub hive_signing_secret: Option<String>,

    /// Comma-separated bearer tokens Hive may use on `/v1` (each at least 16 bytes).
    #[arg(long, env = "API_TOKENS", hide_env_values = true)]
    pub api_tokens: String,

    /// Timeout of one POST to Hive, in milliseconds (connect, send and answer).
    #[arg(long, env = "HIVE_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_MS))]
    pub hive_timeout_ms: u64,

    /// How many deliveries to Hive may be in flight at once (also the AMQP prefetch).
    #[arg(long, env = "HIVE_CONCURRENCY", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..=10_000))]
    pub hive_concurrency: u16,

    /// Attempts per message (in one replica) before it is dead-lettered.
    #[arg(long, env = "HIVE_MAX_ATTEMPTS", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub hive_max_attempts: u32,

    /// Age (since the gateway received it) after which a failing message is dead-lettered, in milliseconds.
    #[arg(long, env = "HIVE_MAX_AGE_MS", default_value_t = 3_600_000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_AGE_MS))]
    pub hive_max_age_ms: u64,

    /// Longest time one replica holds a failing message between attempts, in
    /// milliseconds; past it the message waits out its next delay in the retry queue
    /// instead. Keep it well below RabbitMQ's `consumer_timeout` (30 minutes by
    /// default), which closes a channel that holds a delivery longer.
    #[arg(long, env = "HIVE_HOLD_MAX_MS", default_value_t = 600_000,
          value_parser = clap::value_parser!(u64).range(100..=1_500_000))]
    pub hive_hold_max_ms: u64,

    /// First retry delay, in milliseconds; doubles with each attempt, with jitter.
    #[arg(long, env = "RETRY_BASE_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..=MAX_RETRY_MS))]
    pub retry_base_ms: u64,

    /// Longest delay between two attempts, in milliseconds.
    #[arg(long, env = "RETRY_MAX_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_RETRY_MS))]
    pub retry_max_ms: u64,

    /// Largest accepted REST request body, in bytes (larger ones get 413).
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 256 * 1024,
          value_parser = clap::value_parser!(u64).range(64..=64 * 1024 * 1024))]
    pub max_body_bytes: u64,

    /// Most requests waiting for a device's answer at once in this replica (503 beyond).
    #[arg(long, env = "MAX_PENDING_REQUESTS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_pending_requests: u32,

    /// Longest wait for the broker to confirm a publish, in milliseconds (503 beyond).
    #[arg(long, env = "PUBLISH_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_MS))]
    pub publish_timeout_ms: u64,

    /// This replica's name in its reply queue; a random one when unset.
    #[arg(long, env = "REPLICA_ID")]
    pub replica_id: Option<String>,

    /// On shutdown, how long in-flight deliveries and requests may take to finish, in milliseconds.
    #[arg(long, env = "SHUTDOWN_GRACE_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(0..=MAX_TIMEOUT_MS))]
    pub shutdown_grace_ms: u64,

    /// How long a client has to send the headers of a request, in milliseconds (also
    /// the longest a keep-alive connection may stay idle); slower connections are dropped.
    #[arg(long, env = "HEADER_READ_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..=MAX_HEADER_READ_TIMEOUT_MS))]
    pub header_read_timeout_ms: u64,

    /// HTTP connections served at once; at the cap the server stops accepting until
    /// one closes.
    #[arg(long, env = "MAX_HTTP_CONNECTIONS", default_value_t = 4_096,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_http_connections: u64,

    /// How long presence, kick and listing calls wait for the gateways, in
    /// milliseconds (504 `gateway_timeout` for presence and kick; a listing answers
    /// `partial` with what it has).
    #[arg(long, env = "FLEET_TIMEOUT_MS", default_value_t = 2_000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_MS))]
    pub fleet_timeout_ms: u64,

    /// A gateway replica silent this long (and at least three of its announcement
    /// intervals) is lost: its sessions get `disconnected` with reason
    /// `gateway_lost`, in milliseconds.
    #[arg(long, env = "FLEET_LOST_AFTER_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(300..=MAX_TIMEOUT_MS))]
    pub fleet_lost_after_ms: u64,

    /// Group and broadcast requests (scatter-gather) running at once in this
    /// replica; more get 503 `overloaded` with `Retry-After`.
    #[arg(long, env = "MAX_FANOUTS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_fanouts: u32,

    /// Bytes of device answers this replica's scatter-gather requests hold in memory
    /// at once; past it an answer keeps its status and loses its data
    /// (`"truncated": true`).
    #[arg(long, env = "MAX_FANOUT_ANSWER_BYTES", default_value_t = 64 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..=16 * 1024 * 1024 * 1024))]
    pub max_fanout_answer_bytes: u64,
    /// PostgreSQL (`postgres://user:password@host:port/database`): the device
    /// registry and enrolment. Unset: the v2 routes that need state answer 503
    /// `not_configured`, and everything of v1 works as before.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Most PostgreSQL connections this replica holds open at once.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub database_pool_size: u32,

    /// Longest wait for a PostgreSQL connection (from the pool, or a new one), in
    /// milliseconds; past it the call answers 503 `database_unavailable`.
    #[arg(long, env = "DATABASE_ACQUIRE_TIMEOUT_MS", default_value_t = 2_000,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub database_acquire_timeout_ms: u64,

    /// Longest one SQL statement may run (PostgreSQL's `statement_timeout`), in
    /// milliseconds.
    #[arg(long, env = "DATABASE_STATEMENT_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub database_statement_timeout_ms: u64,

    /// The Ed25519 private key device tokens are signed with: PKCS#8 PEM, either the
    /// text itself or the path of a file holding it. Unset: enrolment, renewal and
    /// `/v1/jwks.json` answer `not_configured` / `unavailable`.
    #[arg(long, env = "TOKEN_SIGNING_KEY", hide_env_values = true)]
    pub token_signing_key: Option<String>,

    /// Lifetime of a minted device token: a number with `s`, `m`, `h` or `d`
    /// (`90d`, `12h`), 1 minute to 365 days.
    #[arg(long, env = "TOKEN_TTL", default_value = "30d", value_parser = parse_token_ttl)]
    pub token_ttl: Duration,

    /// `iss` of minted tokens; unset: none.
    #[arg(long, env = "TOKEN_ISSUER")]
    pub token_issuer: Option<String>,

    /// `aud` of minted tokens; unset: none.
    #[arg(long, env = "TOKEN_AUDIENCE")]
    pub token_audience: Option<String>,
}

/// The shortest `TOKEN_TTL`.
pub const MIN_TOKEN_TTL: Duration = Duration::from_secs(60);
/// The longest `TOKEN_TTL` (365 days): the revocations stream keeps entries longer.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(365 * 86_400);

/// clap value parser for `TOKEN_TTL`: `<n>s`, `<n>m`, `<n>h` or `<n>d`, within
/// [`MIN_TOKEN_TTL`]..=[`MAX_TOKEN_TTL`].
pub fn parse_token_ttl(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| "expected a number with s, m, h or d, e.g. 90d or 12h".to_owned())?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3_600),
        "d" => n.checked_mul(86_400),
        _ => None,
    }
    .ok_or_else(|| "expected a number with s, m, h or d, e.g. 90d or 12h".to_owned())?;
    let d = Duration::from_secs(secs);
    if d < MIN_TOKEN_TTL || d > MAX_TOKEN_TTL {
        return Err("must be between 1 minute and 365 days".to_owned());
    }
    Ok(d)
}

impl fmt::Debug for Config {
    /// Secrets, tokens and the broker URL (it may hold a password) are never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The Hive URL may carry a password too.
        let mut hive_url = self.hive_url.clone();
        if hive_url.password().is_some() {
            let _ = hive_url.set_password(Some("***"));
        }
        f.debug_struct("Config")
            .field("listen_addr", &self.listen_addr)
            .field("hive_url", &hive_url.as_str())
            .field(
                "hive_signing_secret",
                &self.hive_signing_secret.as_ref().map(|_| "***"),
            )
            .field("api_tokens", &"***")
            .field("hive_timeout_ms", &self.hive_timeout_ms)
            .field("hive_concurrency", &self.hive_concurrency)
            .field("hive_max_attempts", &self.hive_max_attempts)
            .field("hive_max_age_ms", &self.hive_max_age_ms)
            .field("retry_base_ms", &self.retry_base_ms)
            .field("retry_max_ms", &self.retry_max_ms)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_pending_requests", &self.max_pending_requests)
            .field("publish_timeout_ms", &self.publish_timeout_ms)
            .field("replica_id", &self.replica_id)
            .field("shutdown_grace_ms", &self.shutdown_grace_ms)
            .field("hive_hold_max_ms", &self.hive_hold_max_ms)
            .field("header_read_timeout_ms", &self.header_read_timeout_ms)
            .field("max_http_connections", &self.max_http_connections)
            .field("fleet_timeout_ms", &self.fleet_timeout_ms)
            .field("fleet_lost_after_ms", &self.fleet_lost_after_ms)
            .field("max_fanouts", &self.max_fanouts)
            .field("max_fanout_answer_bytes", &self.max_fanout_answer_bytes)
            .field("database_url", &self.database_url.as_ref().map(|_| "***"))
            .field("database_pool_size", &self.database_pool_size)
            .field(
                "token_signing_key",
                &self.token_signing_key.as_ref().map(|_| "***"),
            )
            .field("token_ttl", &self.token_ttl)
            .field("token_issuer", &self.token_issuer)
            .field("token_audience", &self.token_audience)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Checks what clap cannot: the tokens and the signing secret (long enough, not a
    /// published placeholder), the Hive URL's scheme, the replica id.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.tokens()?;
        if !matches!(self.hive_url.scheme(), "http" | "https") {
            return Err(ConfigError::new("HIVE_URL", "must be an http or https URL"));
        }
        if let Some(secret) = &self.hive_signing_secret
            && secret.len() < MIN_TOKEN_BYTES
        {
            return Err(ConfigError::new(
                "HIVE_SIGNING_SECRET",
                format!("must have at least {MIN_TOKEN_BYTES} bytes"),
            ));
        }
        if let Some(secret) = &self.hive_signing_secret {
            mosaic_runtime::config::refuse_placeholder("HIVE_SIGNING_SECRET", secret)?;
        }
        if let Some(id) = &self.replica_id {
            let ok = !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !ok {
                return Err(ConfigError::new(
                    "REPLICA_ID",
                    "must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_', '.'",
                ));
            }
        }
        if self.retry_base_ms > self.retry_max_ms {
            return Err(ConfigError::new(
                "RETRY_BASE_MS",
                "must not be larger than RETRY_MAX_MS",
            ));
        }
        self.database()?;
        self.signer()?;
        for (setting, value) in [
            ("TOKEN_ISSUER", &self.token_issuer),
            ("TOKEN_AUDIENCE", &self.token_audience),
        ] {
            if let Some(v) = value
                && (v.is_empty() || v.len() > 256)
            {
                return Err(ConfigError::new(setting, "must have 1 to 256 bytes"));
            }
        }
        Ok(())
    }

    /// The PostgreSQL settings, when `DATABASE_URL` is set: the URL parsed and
    /// checked (scheme, no published placeholder password, no TLS demanded).
    pub fn database(&self) -> Result<Option<crate::store::Settings>, ConfigError> {
        let Some(url) = &self.database_url else {
            return Ok(None);
        };
        let settings = crate::store::Settings::parse(
            url,
            self.database_pool_size as usize,
            Duration::from_millis(self.database_acquire_timeout_ms),
            Duration::from_millis(self.database_statement_timeout_ms),
        )
        .map_err(|e| ConfigError::new("DATABASE_URL", e))?;
        Ok(Some(settings))
    }

    /// The token signer, when `TOKEN_SIGNING_KEY` is set: the key read (from the
    /// value or the file it names) and checked to be an Ed25519 PKCS#8 key.
    pub fn signer(&self) -> Result<Option<crate::tokens::Signer>, ConfigError> {
        let Some(value) = &self.token_signing_key else {
            return Ok(None);
        };
        mosaic_runtime::config::refuse_placeholder("TOKEN_SIGNING_KEY", value)?;
        let pem = if value.trim_start().starts_with("-----BEGIN") {
            value.clone()
        } else {
            std::fs::read_to_string(value.trim()).map_err(|e| {
                ConfigError::new(
                    "TOKEN_SIGNING_KEY",
                    format!("is neither a PEM key nor a readable file ({})", e.kind()),
                )
            })?
        };
        mosaic_runtime::config::refuse_placeholder("TOKEN_SIGNING_KEY", &pem)?;
        let signer = crate::tokens::Signer::new(
            &pem,
            self.token_ttl,
            self.token_issuer.clone(),
            self.token_audience.clone(),
        )
        .map_err(|e| ConfigError::new("TOKEN_SIGNING_KEY", e.to_string()))?;
        Ok(Some(signer))
    }

    /// The API tokens, split and checked (at least one, each long enough, none a
    /// published placeholder).
    pub fn tokens(&self) -> Result<Vec<&str>, ConfigError> {
        let tokens: Vec<&str> = self
            .api_tokens
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        if tokens.is_empty() {
            return Err(ConfigError::new("API_TOKENS", "needs at least one token"));
        }
        if tokens.iter().any(|t| t.len() < MIN_TOKEN_BYTES) {
            return Err(ConfigError::new(
                "API_TOKENS",
                format!("every token must have at least {MIN_TOKEN_BYTES} bytes"),
            ));
        }
        for t in &tokens {
            mosaic_runtime::config::refuse_placeholder("API_TOKENS", t)?;
        }
        Ok(tokens)
    }

    /// [`Config::hive_timeout_ms`] as a duration.
    pub fn hive_timeout(&self) -> Duration {
        Duration::from_millis(self.hive_timeout_ms)
    }

    /// [`Config::publish_timeout_ms`] as a duration.
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }

    /// The HTTP server's bounds.
    pub fn http_limits(&self) -> mosaic_runtime::serve::Limits {
        mosaic_runtime::serve::Limits {
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
            max_connections: usize::try_from(self.max_http_connections).unwrap_or(usize::MAX),
        }
    }

    /// The fleet's settings, with this replica's reply queue.
    pub fn fleet_settings(&self, reply_queue: lapin::types::ShortString) -> crate::fleet::Settings {
        crate::fleet::Settings {
            reply_queue,
            publish_timeout: self.publish_timeout(),
            ask_timeout: Duration::from_millis(self.fleet_timeout_ms),
            lost_after: Duration::from_millis(self.fleet_lost_after_ms),
            max_fanouts: self.max_fanouts as usize,
            max_answer_bytes: usize::try_from(self.max_fanout_answer_bytes).unwrap_or(usize::MAX),
        }
    }

    /// [`Config::shutdown_grace_ms`] as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mosaic_runtime::config::{Parsed, parse};
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut map: HashMap<String, String> = [
            ("HIVE_URL", "http://127.0.0.1:1/hive"),
            ("API_TOKENS", "0123456789abcdef0123"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in vars {
            map.insert(k.to_string(), v.to_string());
        }
        match parse::<Config>(["device-service"], move |k| map.get(k).cloned())? {
            Parsed::Run(c) => {
                c.validate()?;
                Ok(c)
            }
            Parsed::Print(_) => panic!("unexpected print"),
        }
    }

    #[test]
    fn defaults() {
        let c = config(&[]).unwrap();
        assert_eq!(c.listen_addr, "0.0.0.0:8081".parse().unwrap());
        assert_eq!(c.hive_concurrency, 64);
        assert_eq!(c.shutdown_grace_ms, 10_000);
        assert_eq!(c.tokens().unwrap(), vec!["0123456789abcdef0123"]);
        assert_eq!(
            c.http_limits(),
            mosaic_runtime::serve::Limits {
                header_read_timeout: Duration::from_secs(10),
                max_connections: 4_096,
            }
        );
    }

    #[test]
    fn bad_settings_are_named() {
        for (var, value) in [
            ("API_TOKENS", ""),
            ("API_TOKENS", "short"),
            ("API_TOKENS", "0123456789abcdef0123,short"),
            ("HIVE_URL", "ftp://x/"),
            ("HIVE_URL", "not a url"),
            ("HIVE_CONCURRENCY", "0"),
            ("REPLICA_ID", "a b"),
            ("HIVE_SIGNING_SECRET", "tiny"),
        ] {
            let e = config(&[(var, value)]).unwrap_err();
            assert_eq!(e.setting, var, "{var}={value}: {e}");
        }
    }

    #[test]
    fn published_placeholders_are_refused_without_echoing_them() {
        for (var, value) in [
            (
                "HIVE_SIGNING_SECRET",
                "REPLACE-ME-placeholder-hive-signing-secret",
            ),
            (
                "API_TOKENS",
                "REPLACE-ME-placeholder-api-token-1,REPLACE-ME-placeholder-api-token-2",
            ),
            // One placeholder among good tokens is enough to refuse the list.
            (
                "API_TOKENS",
                "0123456789abcdef0123,change-me-to-a-long-random-token",
            ),
        ] {
            let e = config(&[(var, value)]).unwrap_err();
            assert_eq!(e.setting, var, "{e}");
            for part in value.split(',') {
                assert!(!e.to_string().contains(part), "{e}");
            }
        }
    }

    /// Every numeric setting with a value past its range.
    #[test]
    fn numbers_past_their_range_are_refused_and_named() {
        let huge = u64::MAX.to_string();
        for (var, value) in [
            ("HIVE_TIMEOUT_MS", huge.as_str()),
            ("HIVE_CONCURRENCY", "10001"),
            ("HIVE_MAX_ATTEMPTS", "1000001"),
            ("HIVE_MAX_AGE_MS", huge.as_str()),
            ("RETRY_BASE_MS", huge.as_str()),
            ("RETRY_MAX_MS", huge.as_str()),
            ("MAX_BODY_BYTES", huge.as_str()),
            ("MAX_PENDING_REQUESTS", "1000001"),
            ("PUBLISH_TIMEOUT_MS", huge.as_str()),
            ("SHUTDOWN_GRACE_MS", huge.as_str()),
            ("SHUTDOWN_GRACE_MS", "600001"),
            ("RECONNECT_MAX_MS", huge.as_str()),
            ("HEADER_READ_TIMEOUT_MS", "99"),
            ("HEADER_READ_TIMEOUT_MS", "120001"),
            ("MAX_HTTP_CONNECTIONS", "0"),
            ("MAX_HTTP_CONNECTIONS", "1000001"),
            ("FLEET_TIMEOUT_MS", "0"),
            ("FLEET_LOST_AFTER_MS", "299"),
            ("MAX_FANOUTS", "0"),
            ("MAX_FANOUT_ANSWER_BYTES", "1023"),
        ] {
            let e = config(&[(var, value)]).unwrap_err();
            assert_eq!(e.setting, var, "{var}={value}: {e}");
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }

    #[test]
    fn the_largest_values_are_accepted() {
        let c = config(&[
            ("HIVE_TIMEOUT_MS", "600000"),
            ("HIVE_MAX_ATTEMPTS", "1000000"),
            ("HIVE_MAX_AGE_MS", &MAX_AGE_MS.to_string()),
            ("RETRY_BASE_MS", "3600000"),
            ("RETRY_MAX_MS", "3600000"),
            ("MAX_PENDING_REQUESTS", "1000000"),
            ("PUBLISH_TIMEOUT_MS", "600000"),
            ("SHUTDOWN_GRACE_MS", "600000"),
            ("RECONNECT_MAX_MS", "600000"),
            ("HEADER_READ_TIMEOUT_MS", "120000"),
            ("MAX_HTTP_CONNECTIONS", "1000000"),
        ])
        .unwrap();
        assert_eq!(c.shutdown_grace(), Duration::from_secs(600));
        assert_eq!(
            c.http_limits(),
            mosaic_runtime::serve::Limits {
                header_read_timeout: Duration::from_secs(120),
                max_connections: 1_000_000,
            }
        );
    }

    #[test]
    fn debug_hides_secrets() {
        let c = config(&[
            ("HIVE_SIGNING_SECRET", "supersecretsupersecret"),
            ("HIVE_URL", "https://hive:hivepassword@127.0.0.1:1/hive"),
        ])
        .unwrap();
        let text = format!("{c:?}");
        assert!(!text.contains("supersecret"), "{text}");
        assert!(!text.contains("hivepassword"), "{text}");
        assert!(text.contains("127.0.0.1:1/hive"), "{text}");
        assert!(!text.contains("0123456789abcdef0123"), "{text}");
    }
}
