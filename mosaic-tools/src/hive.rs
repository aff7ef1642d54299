//! The sample Hive: an HTTP receiver for device-service deliveries.
//!
//! Every `POST` (any path) is checked against `X-Mosaic-Signature` when a secret is
//! configured (401 `bad_signature` otherwise), printed as one readable line, and
//! answered `200 {"ok":true}` (or the status configured, to watch retries). Message
//! ids already seen are marked `(duplicate)`: delivery is at least once.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::signature;

/// How many message ids the duplicate check remembers.
pub const SEEN_CAPACITY: usize = 10_000;

/// The fields every delivery has; the rest are the device's extra fields.
const KNOWN: [&str; 9] = [
    "kind",
    "id",
    "message_id",
    "device",
    "name",
    "received_at",
    "gateway",
    "session",
    "data",
];

/// What the receiver does.
#[derive(Debug, Clone)]
pub struct HiveConfig {
    /// The signing secret shared with device-service; `None` accepts unsigned posts.
    pub secret: Option<Vec<u8>>,
    /// How far the signature's `t` may be from now, in seconds.
    pub tolerance_secs: u64,
    /// The status to answer accepted deliveries with (2xx normally).
    pub status: StatusCode,
}

impl HiveConfig {
    /// Checks signatures with `secret` (when given) and the default tolerance, and
    /// answers 200.
    pub fn new(secret: Option<Vec<u8>>) -> Self {
        HiveConfig {
            secret,
            tolerance_secs: signature::DEFAULT_TOLERANCE_SECS,
            status: StatusCode::OK,
        }
    }
}

struct Hive {
    cfg: HiveConfig,
    seen: Mutex<Seen>,
    print: Box<dyn Fn(String) + Send + Sync>,
}

impl std::fmt::Debug for Hive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hive")
            .field("status", &self.cfg.status)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Seen {
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl Seen {
    /// Remembers `id`; true when it was seen before.
    fn check(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return true;
        }
        if self.order.len() >= SEEN_CAPACITY
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.order.push_back(id.to_owned());
        self.set.insert(id.to_owned());
        false
    }
}

/// The receiver's router; each accepted or refused delivery is passed to `print` as
/// one line.
pub fn router(cfg: HiveConfig, print: impl Fn(String) + Send + Sync + 'static) -> Router {
    let state = Arc::new(Hive {
        cfg,
        seen: Mutex::new(Seen::default()),
        print: Box::new(print),
    });
    Router::new().fallback(receive).with_state(state)
}

/// Serves [`router`] on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: HiveConfig,
    print: impl Fn(String) + Send + Sync + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(cfg, print))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn receive(
    State(hive): State<Arc<Hive>>,
    method: axum::http::Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if method != axum::http::Method::POST {
        return (StatusCode::METHOD_NOT_ALLOWED, "POST deliveries here\n").into_response();
    }
    if let Some(secret) = &hive.cfg.secret {
        let header = headers.get(signature::HEADER).and_then(|v| v.to_str().ok());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if let Err(e) = signature::verify(header, &body, secret, now, hive.cfg.tolerance_secs) {
            (hive.print)(format!("REFUSED (401): {e}"));
            return error(StatusCode::UNAUTHORIZED, "bad_signature", &e.to_string());
        }
    }
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            (hive.print)(format!("REFUSED (400): body is not JSON: {e}"));
            return error(StatusCode::BAD_REQUEST, "bad_body", "body is not JSON");
        }
    };
    let duplicate = value
        .get("message_id")
        .and_then(Value::as_str)
        .is_some_and(|id| hive.seen.lock().expect("not poisoned").check(id));
    let mut line = describe(&value);
    if duplicate {
        line.push_str(" (duplicate)");
    }
    if let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok())
        && value.get("message_id").and_then(Value::as_str) != Some(key)
    {
        line.push_str(&format!(" (Idempotency-Key {key} differs from message_id)"));
    }
    (hive.print)(line);
    (
        hive.cfg.status,
        axum::Json(json!({"ok": hive.cfg.status.is_success()})),
    )
        .into_response()
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// One readable line for a delivery.
pub fn describe(delivery: &Value) -> String {
    let Some(obj) = delivery.as_object() else {
        return format!("? {delivery}");
    };
    let s = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or("?");
    let extra: Map<String, Value> = obj
        .iter()
        .filter(|(k, _)| !KNOWN.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut line = match s("kind") {
        "lifecycle" => format!("lifecycle device={} {}", s("device"), s("name")),
        kind => {
            let id = match obj.get("id").and_then(Value::as_str) {
                Some(id) => format!(" id={id}"),
                None => String::new(),
            };
            format!(
                "{kind:<9} device={} name={}{id} data={}",
                s("device"),
                s("name"),
                obj.get("data").unwrap_or(&Value::Null)
            )
        }
    };
    if !extra.is_empty() {
        // For lifecycle messages this shows `reason` (and `duration_ms`).
        line.push_str(&format!(" {}", Value::Object(extra)));
    }
    line.push_str(&format!(" message_id={}", s("message_id")));
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    const SECRET: &[u8] = b"hive-secret";

    fn app(lines: Arc<Mutex<Vec<String>>>) -> Router {
        router(
            HiveConfig {
                secret: Some(SECRET.to_vec()),
                tolerance_secs: 300,
                status: StatusCode::OK,
            },
            move |l| lines.lock().unwrap().push(l),
        )
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    async fn post(app: &Router, body: &str, sig: Option<String>) -> StatusCode {
        let mut req = Request::post("/hive").header("content-type", "application/json");
        if let Some(sig) = sig {
            req = req.header(signature::HEADER, sig);
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::from(body.to_owned())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let _ = resp.into_body().collect().await.unwrap();
        status
    }

    #[tokio::test]
    async fn signed_deliveries_are_accepted_and_printed() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let app = app(lines.clone());
        let body = r#"{"kind":"event","message_id":"m1","device":"d1","name":"temp","data":{"c":21},"unit":"C"}"#;
        let sig = signature::sign(SECRET, now(), body.as_bytes());
        assert_eq!(post(&app, body, Some(sig.clone())).await, StatusCode::OK);
        assert_eq!(post(&app, body, Some(sig)).await, StatusCode::OK);
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].contains("device=d1 name=temp data={\"c\":21}"),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains(r#"{"unit":"C"}"#), "{}", lines[0]);
        assert!(!lines[0].contains("duplicate"));
        assert!(lines[1].ends_with("(duplicate)"), "{}", lines[1]);
    }

    #[tokio::test]
    async fn bad_signatures_get_401() {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let app = app(lines.clone());
        let body = r#"{"kind":"event","message_id":"m2"}"#;
        let old = signature::sign(SECRET, now() - 3600, body.as_bytes());
        let wrong = signature::sign(b"wrong", now(), body.as_bytes());
        let good = signature::sign(SECRET, now(), body.as_bytes());
        assert_eq!(post(&app, body, Some(old)).await, StatusCode::UNAUTHORIZED);
        assert_eq!(
            post(&app, body, Some(wrong)).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(post(&app, body, None).await, StatusCode::UNAUTHORIZED);
        let tampered = body.replace("m2", "m3");
        assert_eq!(
            post(&app, &tampered, Some(good)).await,
            StatusCode::UNAUTHORIZED
        );
        assert!(
            lines
                .lock()
                .unwrap()
                .iter()
                .all(|l| l.starts_with("REFUSED"))
        );
    }

    #[test]
    fn event_lines_show_the_device_id_and_extras() {
        let line = describe(&json!({
            "kind":"event","name":"temp","device":"d","message_id":"m","id":"e-1",
            "received_at":"t","gateway":"g","session":"s","data":[1],"unit":"C"
        }));
        assert_eq!(
            line,
            r#"event     device=d name=temp id=e-1 data=[1] {"unit":"C"} message_id=m"#
        );
    }

    #[test]
    fn lifecycle_lines_show_the_reason() {
        let line = describe(&json!({
            "kind":"lifecycle","name":"disconnected","device":"d","message_id":"m",
            "reason":"replaced"
        }));
        assert_eq!(
            line,
            r#"lifecycle device=d disconnected {"reason":"replaced"} message_id=m"#
        );
    }

    #[test]
    fn the_seen_set_is_bounded() {
        let mut seen = Seen::default();
        for i in 0..SEEN_CAPACITY + 5 {
            assert!(!seen.check(&i.to_string()));
        }
        assert_eq!(seen.order.len(), SEEN_CAPACITY);
        assert!(!seen.check("0"), "the oldest was forgotten");
        assert!(seen.check(&(SEEN_CAPACITY + 4).to_string()));
    }
}
