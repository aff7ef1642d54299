//! Hive, as seen from the relay: the POST body, its signature, and what an answer means.
//!
//! [`body`] rebuilds the device's JSON object from an AMQP message (headers through
//! the amqp-value-json mapping, `data` copied byte for byte from the message body).
//! [`Hive::post`] sends one attempt and sorts the outcome into [`Outcome`]: delivered,
//! worth retrying, or refused for good.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use hmac::{Hmac, Mac};
use lapin::types::FieldTable;
use mosaic_protocol::header;
use reqwest::StatusCode;
use reqwest::header::HeaderValue;
use serde_json::{Map, Value};
use sha2::Sha256;

/// Header carrying the HMAC signature.
pub const SIGNATURE_HEADER: &str = "x-mosaic-signature";
/// Header carrying the message id, for Hive to deduplicate redeliveries.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// Keys of the rebuilt object that come first, in the contract's order; the device's
/// extra fields follow in name order, then `data`.
const LEADING_KEYS: [&str; 7] = [
    header::KIND,
    header::MESSAGE_ID,
    header::DEVICE,
    header::NAME,
    header::RECEIVED_AT,
    header::GATEWAY,
    header::SESSION,
];

/// How much of an error answer's body is kept for logs and dead-letter headers.
const ERROR_TEXT_BYTES: usize = 512;

/// Why a message cannot become a Hive POST at all.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The headers table holds something JSON cannot carry.
    #[error("headers do not map to JSON: {0}")]
    Headers(#[from] amqp_value_json::Error),
    /// The message body is not JSON.
    #[error("body is not JSON: {0}")]
    Data(serde_json::Error),
}

/// Whether a header was added by RabbitMQ or by this service (dead-lettering,
/// redelivery counts) rather than by the gateway: such headers never reach Hive.
pub fn is_broker_header(name: &str) -> bool {
    name.starts_with("x-mosaic-")
        || name == "x-delivery-count"
        || name == "x-death"
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
}

/// The JSON object Hive receives: the headers (without broker headers) plus
/// `"data": <body>`, the body's bytes kept exactly as the gateway wrote them.
pub fn body(headers: Option<&FieldTable>, data: &[u8]) -> Result<Vec<u8>, BodyError> {
    let mut fields = match headers {
        Some(h) => amqp_value_json::from_field_table(h)?,
        None => Map::new(),
    };
    fields.retain(|k, _| !is_broker_header(k) && k != "data");
    let mut ordered = Map::with_capacity(fields.len());
    for key in LEADING_KEYS {
        if let Some(v) = fields.remove(key) {
            ordered.insert(key.to_owned(), v);
        }
    }
    let mut rest: Vec<(String, Value)> = fields.into_iter().collect();
    rest.sort_by(|a, b| a.0.cmp(&b.0));
    ordered.extend(rest);

    let data = trim_ascii(data);
    let data: &[u8] = if data.is_empty() {
        b"null"
    } else {
        serde_json::from_slice::<serde::de::IgnoredAny>(data).map_err(BodyError::Data)?;
        data
    };
    let head = serde_json::to_vec(&Value::Object(ordered)).expect("a JSON map always serializes");
    // `head` is `{...}`: reopen it and append `"data":<body>`.
    let mut out = Vec::with_capacity(head.len() + data.len() + 10);
    out.extend_from_slice(&head[..head.len() - 1]);
    if head.len() > 2 {
        out.push(b',');
    }
    out.extend_from_slice(b"\"data\":");
    out.extend_from_slice(data);
    out.push(b'}');
    Ok(out)
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub fn signature(secret: &[u8], unix_seconds: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(unix_seconds.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "t={unix_seconds},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// What one POST attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Hive answered 2xx: ack the message.
    Delivered,
    /// 408, 429, 5xx, a timeout or a connection error: try again later.
    Retry {
        /// The HTTP status, when Hive answered.
        status: Option<u16>,
        /// Hive's `Retry-After`, when it sent a usable one.
        retry_after: Option<Duration>,
        /// What went wrong, for logs and the dead-letter headers.
        error: String,
    },
    /// Any other answer: Hive will never take this message.
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The start of Hive's answer, for the dead-letter headers.
        error: String,
    },
}

impl Outcome {
    /// The metric label of this outcome.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Delivered => "2xx",
            Outcome::Retry {
                status: Some(_), ..
            } => "retry",
            Outcome::Retry { status: None, .. } => "error",
            Outcome::Rejected { .. } => "reject",
        }
    }
}

/// Whether a status is worth retrying.
pub fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// Parses `Retry-After`: delay seconds, or an HTTP date (RFC 7231 IMF-fixdate).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let at = time::PrimitiveDateTime::parse(value, &format)
        .ok()?
        .assume_utc();
    let at = SystemTime::from(at);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The HTTP client towards Hive.
#[derive(Debug, Clone)]
pub struct Hive {
    client: reqwest::Client,
    url: reqwest::Url,
    secret: Option<Vec<u8>>,
}

/// The client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client: {0}")]
pub struct ClientError(#[from] reqwest::Error);

impl Hive {
    /// A client POSTing to `url`, each POST bounded by `timeout`, at most `concurrency`
    /// idle connections kept.
    pub fn new(
        url: reqwest::Url,
        secret: Option<&str>,
        timeout: Duration,
        concurrency: usize,
    ) -> Result<Self, ClientError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(concurrency)
            .user_agent(concat!("mosaic-device-service/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Hive {
            client,
            url,
            secret: secret.map(|s| s.as_bytes().to_vec()),
        })
    }

    /// One POST of `body` with `Idempotency-Key: message_id`.
    pub async fn post(&self, message_id: &HeaderValue, body: Bytes) -> Outcome {
        let mut req = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(IDEMPOTENCY_HEADER, message_id);
        if let Some(secret) = &self.secret {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            req = req.header(SIGNATURE_HEADER, signature(secret, now, &body));
        }
        let mut res = match req.body(body).send().await {
            Ok(res) => res,
            Err(e) => {
                let kind = if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "connect"
                } else {
                    "request"
                };
                return Outcome::Retry {
                    status: None,
                    retry_after: None,
                    // Without the URL: it may carry credentials.
                    error: format!("{kind} error: {}", error_chain(&e.without_url())),
                };
            }
        };
        let status = res.status();
        if status.is_success() {
            // Drain the answer so the connection goes back to the pool.
            let _ = res.bytes().await;
            return Outcome::Delivered;
        }
        let retry_after = res
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        // Only the start of the answer is kept: read no more of it than that.
        let mut text = Vec::new();
        while text.len() < ERROR_TEXT_BYTES {
            match res.chunk().await {
                Ok(Some(chunk)) => text.extend_from_slice(&chunk),
                _ => break,
            }
        }
        text.truncate(ERROR_TEXT_BYTES);
        let text = String::from_utf8_lossy(&text);
        let error = format!("HTTP {}: {}", status.as_u16(), text.trim());
        if is_retryable(status) {
            Outcome::Retry {
                status: Some(status.as_u16()),
                retry_after,
                error,
            }
        } else {
            Outcome::Rejected {
                status: status.as_u16(),
                error,
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table(v: Value) -> FieldTable {
        amqp_value_json::to_field_table(v.as_object().unwrap()).unwrap()
    }

    #[test]
    fn body_keeps_the_contract_order_and_raw_data() {
        let h = table(json!({
            "zeta": {"nested": [1, 2.5, null, true]},
            "session": "s", "gateway": "g", "received_at": "r", "name": "temp",
            "device": "d", "message_id": "m", "kind": "event", "alpha": "a",
            "x-delivery-count": 2, "x-mosaic-reason": "rejected"
        }));
        let data = br#"{"b":1,"a":12345678901234567890123}"#;
        let out = String::from_utf8(body(Some(&h), data).unwrap()).unwrap();
        assert_eq!(
            out,
            r#"{"kind":"event","message_id":"m","device":"d","name":"temp","received_at":"r","gateway":"g","session":"s","alpha":"a","zeta":{"nested":[1,2.5,null,true]},"data":{"b":1,"a":12345678901234567890123}}"#
        );
    }

    #[test]
    fn body_edge_cases() {
        assert_eq!(body(None, b"").unwrap(), br#"{"data":null}"#);
        assert_eq!(body(None, b" [1] \n").unwrap(), br#"{"data":[1]}"#);
        assert!(matches!(body(None, b"{nope"), Err(BodyError::Data(_))));
    }

    #[test]
    fn signature_is_hmac_of_t_dot_body() {
        // Computed independently: HMAC-SHA256("key", "1700000000.{}").
        let sig = signature(b"key", 1_700_000_000, b"{}");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"key").unwrap();
        mac.update(b"1700000000.{}");
        let want = hex::encode(mac.finalize().into_bytes());
        assert_eq!(sig, format!("t=1700000000,v1={want}"));
        assert_eq!(want.len(), 64);
    }

    #[test]
    fn statuses_sort_into_retry_and_reject() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(is_retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 410, 413, 422, 301] {
            assert!(!is_retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
    }

    #[tokio::test]
    async fn a_failed_post_names_no_credentials_of_the_url() {
        let url = "http://hive:url-password-0123@127.0.0.1:1/hive?key=url-password-4567"
            .parse()
            .unwrap();
        let hive = Hive::new(url, None, Duration::from_secs(5), 1).unwrap();
        let key = HeaderValue::from_static("m");
        match hive.post(&key, Bytes::from_static(b"{}")).await {
            Outcome::Retry {
                status: None,
                error,
                ..
            } => assert!(!error.contains("url-password"), "{error}"),
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_767); // Sun, 06 Nov 1994 08:49:27 GMT
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }
}
