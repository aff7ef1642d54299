//! The broker settings both services read, and their checks.

use std::time::Duration;

use lapin::uri::AMQPUri;

/// The default `AMQP_URL`.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How a service reaches RabbitMQ and how hard it tries.
#[derive(Clone)]
pub struct Settings {
    /// One URL per node; a connection attempt goes to the next one after a failure.
    pub urls: Vec<String>,
    /// The service's name: metric label `link`, and the start of the connection name
    /// RabbitMQ shows (`<service> <id>`).
    pub service: &'static str,
    /// This replica's id, the end of the connection name.
    pub id: String,
    /// Bound on one connection attempt with its channels and topology.
    pub connect_timeout: Duration,
    /// First pause after a failed attempt or a lost connection.
    pub reconnect_min: Duration,
    /// Longest pause between attempts (the pause doubles up to this, with jitter).
    pub reconnect_max: Duration,
    /// Bound on closing a connection and on cancelling consumers.
    pub close_timeout: Duration,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URLs hold passwords.
        f.debug_struct("Settings")
            .field("nodes", &self.urls.len())
            .field("service", &self.service)
            .field("id", &self.id)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("close_timeout", &self.close_timeout)
            .finish()
    }
}

/// The broker settings as flags mirrored by environment variables; services
/// `#[command(flatten)]` them into their own configuration.
#[derive(Clone, clap::Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL, vhost included (percent-encoded; `%2f` is `/`). Several URLs
    /// separated by commas (the nodes of a cluster) are tried in turn.
    #[arg(
        long,
        env = "AMQP_URL",
        value_parser = amqp_urls,
        default_value = DEFAULT_URL,
        hide_env_values = true,
        hide_default_value = true
    )]
    pub amqp_url: String,

    /// Bound on one attempt to connect to RabbitMQ and set up channels and topology, in milliseconds.
    #[arg(long, env = "AMQP_CONNECT_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..=300_000))]
    pub amqp_connect_timeout_ms: u64,

    /// First pause before reconnecting to RabbitMQ, in milliseconds; it doubles (with jitter) up to `RECONNECT_MAX_MS`.
    #[arg(long, env = "RECONNECT_MIN_MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub reconnect_min_ms: u64,

    /// Longest wait between two attempts to reconnect to RabbitMQ, in milliseconds.
    #[arg(long, env = "RECONNECT_MAX_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub reconnect_max_ms: u64,

    /// Bound on closing the RabbitMQ connection and cancelling consumers, in milliseconds.
    #[arg(long, env = "AMQP_CLOSE_TIMEOUT_MS", default_value_t = 2_000,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub amqp_close_timeout_ms: u64,
}

impl std::fmt::Debug for BrokerArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerArgs")
            .field("amqp_url", &"<redacted>")
            .field("amqp_connect_timeout_ms", &self.amqp_connect_timeout_ms)
            .field("reconnect_min_ms", &self.reconnect_min_ms)
            .field("reconnect_max_ms", &self.reconnect_max_ms)
            .field("amqp_close_timeout_ms", &self.amqp_close_timeout_ms)
            .finish()
    }
}

impl BrokerArgs {
    /// The settings of a link for `service`, replica `id`.
    pub fn settings(&self, service: &'static str, id: impl Into<String>) -> Settings {
        Settings {
            urls: split_urls(&self.amqp_url),
            service,
            id: id.into(),
            connect_timeout: Duration::from_millis(self.amqp_connect_timeout_ms),
            reconnect_min: Duration::from_millis(self.reconnect_min_ms),
            reconnect_max: Duration::from_millis(self.reconnect_max_ms.max(self.reconnect_min_ms)),
            close_timeout: Duration::from_millis(self.amqp_close_timeout_ms),
        }
    }
}

/// The URLs of a comma-separated `AMQP_URL`, trimmed, empty items dropped.
pub fn split_urls(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// clap value parser for `AMQP_URL`: one URL or several separated by commas, each
/// one the AMQP client accepts. The error never quotes the value (it holds passwords).
pub fn amqp_urls(value: &str) -> Result<String, String> {
    let urls = split_urls(value);
    if urls.is_empty() {
        return Err("needs at least one AMQP URL".to_owned());
    }
    for (i, url) in urls.iter().enumerate() {
        if url.parse::<AMQPUri>().is_err() {
            let which = if urls.len() > 1 {
                format!("item {} is not", i + 1)
            } else {
                "not".to_owned()
            };
            return Err(format!(
                "{which} a valid AMQP URL (expected amqp://user:password@host:port/vhost, \
                 the vhost percent-encoded)"
            ));
        }
    }
    Ok(value.to_owned())
}

/// `host:port` of a URL, for logs (never the credentials).
pub(crate) fn endpoint(url: &str) -> String {
    match url.parse::<AMQPUri>() {
        Ok(u) => format!("{}:{}", u.authority.host, u.authority.port),
        Err(_) => "<invalid URL>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_of_urls_are_checked_item_by_item() {
        assert!(amqp_urls(DEFAULT_URL).is_ok());
        let two = "amqp://u:p@a:5672/%2f, amqp://u:p@b:5673/%2f";
        assert!(amqp_urls(two).is_ok());
        assert_eq!(split_urls(two).len(), 2);
        for bad in [
            "",
            " , ",
            "amqp:guest:s3cret@rabbit",
            "amqp://u:p@a/%2f,http://u:s3cret@b/",
        ] {
            let e = amqp_urls(bad).unwrap_err();
            assert!(!e.contains("s3cret"), "{e}");
        }
        assert!(
            amqp_urls("amqp://u:p@a/%2f,nope")
                .unwrap_err()
                .contains("item 2")
        );
    }

    #[test]
    fn endpoints_leave_credentials_out() {
        assert_eq!(endpoint("amqp://u:s3cret@rabbit:5673/%2f"), "rabbit:5673");
    }
}
