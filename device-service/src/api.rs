//! The REST API Hive calls: events and requests to devices, and broadcasts.
//!
//! Each call publishes one message to `mosaic.commands` on the shared confirm
//! channel and waits for the broker's confirm (bounded by `PUBLISH_TIMEOUT_MS`):
//! no connection, a timeout or a negative confirm is 503 `broker_unavailable` at
//! once. Events and requests are `mandatory`: a message that no gateway queue takes
//! comes back, which is 404 `device_not_connected`. Broadcasts are not mandatory:
//! with no device connected there is nobody to tell, and the answer is still 202.

mod auth;
mod error;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use lapin::BasicProperties;
use lapin::types::{FieldTable, ShortString};
use mosaic_protocol::command::{Kind, RESERVED_FIELDS, undeliverable};
use mosaic_protocol::frame::MAX_NAME_CHARS;
use mosaic_protocol::{exchange, header};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::watch;
use tracing::{debug, warn};
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{AdditionalProperties, Schema};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

pub use auth::Tokens;
pub use error::{ApiError, ApiJson, ErrorBody, code, parse_body};

use mosaic_amqp::{Link, Publish, PublishError, Routed};

use crate::broker::long;
use crate::metrics;
use crate::pending::{Pending, Reply};

/// Default `timeout_ms` of a request.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Largest `timeout_ms` of a request.
pub const MAX_TIMEOUT_MS: u64 = 300_000;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// The broker link, `None` while disconnected.
    pub link: watch::Receiver<Option<Arc<Link>>>,
    /// Requests waiting for answers.
    pub pending: Arc<Pending>,
    /// Bound on each publish and its confirm.
    pub publish_timeout: Duration,
    /// This replica's reply queue (the `reply_to` of its requests).
    pub reply_queue: ShortString,
}

impl ApiState {
    fn link(&self) -> Result<Arc<Link>, ApiError> {
        match &*self.link.borrow() {
            Some(l) if l.can_publish() => Ok(l.clone()),
            _ => Err(ApiError::broker_unavailable()),
        }
    }
}

/// An event for one device, or for all of them. Any other top-level field travels to
/// the device unchanged.
#[derive(Debug, Deserialize, ToSchema)]
pub struct EventBody {
    /// 1 to 128 characters.
    pub name: String,
    /// Any JSON; `null` when absent.
    #[serde(default)]
    pub data: Value,
    /// Any other top-level field travels to the device unchanged, except the reserved
    /// `type`, `id`, `kind`, `deadline`, and `CC`, `BCC` and `x-...` in any letter case
    /// (RabbitMQ reads those); at most 64 KiB of them as JSON text.
    #[serde(flatten)]
    #[schema(ignore)]
    pub extra: Map<String, Value>,
}

/// A request to one device. Any other top-level field travels to the device unchanged.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RequestBody {
    /// 1 to 128 characters.
    pub name: String,
    /// Any JSON; `null` when absent.
    #[serde(default)]
    pub data: Value,
    /// How long to wait for the device's answer, 1 to 300000 ms (default 10000).
    pub timeout_ms: Option<u64>,
    /// Extra fields, as for events.
    #[serde(flatten)]
    #[schema(ignore)]
    pub extra: Map<String, Value>,
}

/// A message was accepted.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    /// The message's id, as the device sees it.
    pub id: Uuid,
}

/// The device's answer to a request.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Answer {
    /// The request's id.
    pub id: Uuid,
    /// The device's status (`ok`, `error` or its own).
    pub status: String,
    /// The device's data.
    pub data: Value,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Mosaic device-service",
        description = "Events and confirmed requests from Hive to devices."
    ),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The whole HTTP app: `/v1` behind bearer auth, `/openapi.json`, and `health`
/// (`/healthz`, `/readyz`, `/metrics`) without auth.
pub fn router(state: ApiState, tokens: Tokens, max_body_bytes: usize, health: Router) -> Router {
    let (v1, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(send_event))
        .routes(routes!(send_request))
        .routes(routes!(broadcast_event))
        .with_state(state)
        .split_for_parts();
    let mut openapi = openapi;
    // The bodies take any extra top-level field (`#[serde(flatten)]`).
    if let Some(components) = openapi.components.as_mut() {
        for name in ["EventBody", "RequestBody"] {
            if let Some(RefOr::T(Schema::Object(o))) = components.schemas.get_mut(name) {
                o.additional_properties = Some(Box::new(AdditionalProperties::FreeForm(true)));
            }
        }
    }
    let v1 = v1.layer(axum::middleware::from_fn_with_state(
        tokens,
        auth::require_token,
    ));
    // Serialized once; each request only clones the shared bytes.
    let openapi = axum::body::Bytes::from(
        serde_json::to_vec(&openapi).expect("the OpenAPI document serializes"),
    );
    Router::new()
        .merge(v1)
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let doc = openapi.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        doc,
                    )
                }
            }),
        )
        .merge(health)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, code::NOT_FOUND, "no such route")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                code::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
}

/// Sends an event to one device (fire and forget).
#[utoipa::path(
    post,
    path = "/v1/devices/{device}/events",
    params(("device" = Uuid, Path, description = "The device's UUID")),
    request_body = EventBody,
    responses(
        (status = 202, description = "A gateway holding the device took the event", body = Accepted),
        (status = 400, description = "`bad_request`: bad body (an integer outside -2^63..2^64-1 included); `reserved_field`: an extra field named `type`, `id`, `kind`, `deadline`, `CC`, `BCC` or `x-...` (any case); `bad_device_id`", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No gateway holds the device", body = ErrorBody),
        (status = 413, description = "`body_too_large`: body over `MAX_BODY_BYTES`, extra fields over 64 KiB as JSON text, or headers too large for one AMQP frame", body = ErrorBody),
        (status = 503, description = "Broker unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn send_event(
    State(state): State<ApiState>,
    Path(device): Path<String>,
    ApiJson(body): ApiJson<EventBody>,
) -> Response {
    let started = Instant::now();
    let res = event(&state, Some(&device), body).await;
    finish("event", started, res)
}

/// Sends an event to every connected device.
#[utoipa::path(
    post,
    path = "/v1/broadcast/events",
    request_body = EventBody,
    responses(
        (status = 202, description = "Published to every connected device", body = Accepted),
        (status = 400, description = "`bad_request`: bad body (an integer outside -2^63..2^64-1 included); `reserved_field`: an extra field named `type`, `id`, `kind`, `deadline`, `CC`, `BCC` or `x-...` (any case)", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 413, description = "`body_too_large`: body over `MAX_BODY_BYTES`, extra fields over 64 KiB as JSON text, or headers too large for one AMQP frame", body = ErrorBody),
        (status = 503, description = "Broker unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn broadcast_event(
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<EventBody>,
) -> Response {
    let started = Instant::now();
    let res = event(&state, None, body).await;
    finish("broadcast", started, res)
}

/// Sends a request to one device and waits for its answer.
#[utoipa::path(
    post,
    path = "/v1/devices/{device}/requests",
    params(("device" = Uuid, Path, description = "The device's UUID")),
    request_body = RequestBody,
    responses(
        (status = 200, description = "The device answered", body = Answer),
        (status = 400, description = "`bad_request`: bad body or `timeout_ms` (an integer outside -2^63..2^64-1 included); `reserved_field`: an extra field named `type`, `id`, `kind`, `deadline`, `CC`, `BCC` or `x-...` (any case); `bad_device_id`", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No gateway holds the device, or it disconnected", body = ErrorBody),
        (status = 413, description = "`body_too_large`: body over `MAX_BODY_BYTES`, extra fields over 64 KiB as JSON text, or headers too large for one AMQP frame", body = ErrorBody),
        (status = 503, description = "Broker unavailable, or too many pending requests", body = ErrorBody),
        (status = 504, description = "The device did not answer in time", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
async fn send_request(
    State(state): State<ApiState>,
    Path(device): Path<String>,
    ApiJson(body): ApiJson<RequestBody>,
) -> Response {
    let started = Instant::now();
    let res = request(&state, &device, body).await;
    finish("request", started, res)
}

/// A publish that was not confirmed: 413 when the headers cannot travel at all,
/// else 503 (the broker is unavailable, blocked or did not confirm in time).
fn publish_failed(what: &str, e: PublishError) -> ApiError {
    warn!(error = %e, "publishing {what} failed");
    match e {
        PublishError::HeadersTooLarge { .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            code::BODY_TOO_LARGE,
            "the extra fields do not fit in one AMQP header frame",
        ),
        _ => ApiError::broker_unavailable(),
    }
}

fn finish<T: IntoResponse>(
    endpoint: &'static str,
    started: Instant,
    res: Result<T, ApiError>,
) -> Response {
    let outcome = match &res {
        Ok(_) => "ok",
        Err(e) => e.code,
    };
    metrics::request(endpoint, outcome, started.elapsed());
    match res {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    }
}

fn parse_device(device: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(device).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            code::BAD_DEVICE_ID,
            "the device id must be a UUID",
        )
    })
}

/// Checks the name and extra fields of an event or request and builds its headers
/// table (with `deadline` for a request): 400 `bad_request` for a bad name or an
/// extra field AMQP cannot carry, 400 `reserved_field` for a name the gateway or
/// RabbitMQ reads, 413 `body_too_large` for extra fields over 64 KiB of JSON or a
/// table that would not fit in one AMQP content-header frame of the default size
/// ([`mosaic_amqp::max_headers_bytes`]; the link checks the negotiated size again).
pub fn command_headers(
    kind: Kind,
    id: Uuid,
    name: &str,
    extra: &Map<String, Value>,
    deadline: Option<&str>,
) -> Result<FieldTable, ApiError> {
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        return Err(ApiError::bad_request(format!(
            "field `name` must have 1 to {MAX_NAME_CHARS} characters"
        )));
    }
    if let Some(k) = extra.keys().find(|k| RESERVED_FIELDS.contains(&k.as_str())) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            code::RESERVED_FIELD,
            format!("field `{k}` is reserved"),
        ));
    }
    header::check_extra(extra).map_err(|e| match e {
        header::ExtraError::BrokerReserved(_) => {
            ApiError::new(StatusCode::BAD_REQUEST, code::RESERVED_FIELD, e.to_string())
        }
        e => too_large(e.to_string()),
    })?;
    let mut table = amqp_value_json::to_field_table(extra)
        .map_err(|e| ApiError::bad_request(format!("extra fields: {e}")))?;
    table.insert(header::KIND.into(), long(kind.as_str()));
    table.insert(header::ID.into(), long(&id.to_string()));
    table.insert(header::NAME.into(), long(name));
    if let Some(deadline) = deadline {
        table.insert(header::DEADLINE.into(), long(deadline));
    }
    let len = amqp_value_json::encoded_len(&table);
    let max = mosaic_amqp::max_headers_bytes(0);
    if len > max {
        return Err(too_large(format!(
            "the extra fields take {len} bytes as AMQP headers; at most {max} fit in one message header"
        )));
    }
    Ok(table)
}

fn too_large(message: String) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, code::BODY_TOO_LARGE, message)
}

fn properties(id: Uuid, headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_headers(headers)
        .with_message_id(ShortString::from(id.to_string()))
        .with_content_type("application/json".into())
        .with_delivery_mode(1)
}

async fn event(
    state: &ApiState,
    device: Option<&str>,
    body: EventBody,
) -> Result<(StatusCode, axum::Json<Accepted>), ApiError> {
    let device = device.map(parse_device).transpose()?;
    let id = Uuid::now_v7();
    let table = command_headers(Kind::Event, id, &body.name, &body.extra, None)?;
    let payload = serde_json::to_vec(&body.data).expect("JSON values serialize");
    let link = state.link()?;
    let (key, mandatory) = match device {
        Some(d) => (exchange::device_key(d), true),
        None => (exchange::BROADCAST_KEY.to_owned(), false),
    };
    let m = Publish {
        exchange: exchange::COMMANDS,
        routing_key: key,
        mandatory,
        properties: properties(id, table),
        body: payload,
    };
    let routed = link
        .publish(0, m, state.publish_timeout)
        .await
        .map_err(|e| publish_failed("an event", e))?;
    match routed {
        Routed::Yes => Ok((StatusCode::ACCEPTED, axum::Json(Accepted { id }))),
        Routed::Returned if mandatory => {
            Err(ApiError::not_connected("no gateway holds this device"))
        }
        Routed::Returned => Ok((StatusCode::ACCEPTED, axum::Json(Accepted { id }))),
    }
}

async fn request(
    state: &ApiState,
    device: &str,
    body: RequestBody,
) -> Result<axum::Json<Answer>, ApiError> {
    let device = parse_device(device)?;
    let timeout_ms = body.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if !(1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
        return Err(ApiError::bad_request(format!(
            "field `timeout_ms` must be 1 to {MAX_TIMEOUT_MS}"
        )));
    }
    let timeout = Duration::from_millis(timeout_ms);
    let id = Uuid::now_v7();
    let deadline = time::OffsetDateTime::now_utc() + timeout;
    let deadline = deadline
        .format(&time::format_description::well_known::Rfc3339)
        .expect("a current time formats as RFC 3339");
    let table = command_headers(Kind::Request, id, &body.name, &body.extra, Some(&deadline))?;
    let payload = serde_json::to_vec(&body.data).expect("JSON values serialize");
    let link = state.link()?;
    let mut ticket = state.pending.register(id).map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code::OVERLOADED,
            e.to_string(),
        )
    })?;
    let props = properties(id, table)
        .with_reply_to(state.reply_queue.clone())
        .with_correlation_id(ShortString::from(id.to_string()))
        .with_expiration(ShortString::from(timeout_ms.to_string()));
    // `timeout_ms` bounds the whole call, the publish's confirm included.
    let m = Publish {
        exchange: exchange::COMMANDS,
        routing_key: exchange::device_key(device),
        mandatory: true,
        properties: props,
        body: payload,
    };
    let publish_and_wait = async {
        let routed = link
            .publish(0, m, state.publish_timeout)
            .await
            .map_err(|e| publish_failed("a request", e))?;
        if routed == Routed::Returned {
            return Err(ApiError::not_connected("no gateway holds this device"));
        }
        // The answer comes to this link's reply queue: if the link goes, so does
        // the queue, and no answer will come.
        tokio::select! {
            r = &mut ticket.rx => Ok(r),
            _ = link.lost().cancelled() => Ok(Ok(Reply::BrokerLost)),
        }
    };
    match tokio::time::timeout(timeout, publish_and_wait).await {
        Ok(Err(e)) => Err(e),
        Ok(Ok(Ok(Reply::Response { status, data }))) => {
            let data = if data.iter().all(u8::is_ascii_whitespace) {
                Value::Null
            } else {
                serde_json::from_slice(&data).map_err(|e| {
                    debug!(error = %e, "device answer is not JSON");
                    ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        code::BAD_REPLY,
                        "the device's answer is not JSON",
                    )
                })?
            };
            Ok(axum::Json(Answer { id, status, data }))
        }
        Ok(Ok(Ok(Reply::Undeliverable { reason }))) if reason == undeliverable::DEVICE_BUSY => {
            Err(ApiError::device_busy())
        }
        Ok(Ok(Ok(Reply::Undeliverable { reason }))) => Err(ApiError::not_connected(format!(
            "the request could not be delivered: {reason}"
        ))),
        Ok(Ok(Ok(Reply::BrokerLost) | Err(_))) => Err(ApiError::broker_unavailable()),
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            code::DEVICE_TIMEOUT,
            format!("the device did not answer within {timeout_ms} ms"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    const TOKEN: &str = "test-token-0123456789";

    fn app() -> Router {
        app_with_limit(1024)
    }

    fn app_with_limit(max_body_bytes: usize) -> Router {
        let (_tx, rx) = watch::channel(None);
        let state = ApiState {
            link: rx,
            pending: Pending::new(10),
            publish_timeout: Duration::from_secs(1),
            reply_queue: "replies".into(),
        };
        router(state, Tokens::new([TOKEN]), max_body_bytes, Router::new())
    }

    async fn call(app: Router, req: Request<Body>) -> (StatusCode, Value) {
        let res = app.oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    fn post(path: &str, token: Option<&str>, body: &str) -> Request<Body> {
        let mut b = Request::post(path).header("content-type", "application/json");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(Body::from(body.to_owned())).unwrap()
    }

    const DEV: &str = "/v1/devices/0192b9b4-7d2e-7cc1-9a4e-000000000001";

    #[tokio::test]
    async fn errors_have_one_shape() {
        let ev = format!("{DEV}/events");
        let rq = format!("{DEV}/requests");
        let big = format!(r#"{{"name":"x","data":"{}"}}"#, "a".repeat(2000));
        let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
            (
                post(&ev, None, "{}"),
                StatusCode::UNAUTHORIZED,
                code::UNAUTHORIZED,
            ),
            (
                post(&ev, Some("wrong-token-0123456789"), "{}"),
                StatusCode::UNAUTHORIZED,
                code::UNAUTHORIZED,
            ),
            (
                post(&ev, Some(TOKEN), "{nope"),
                StatusCode::BAD_REQUEST,
                code::BAD_REQUEST,
            ),
            (
                post(&ev, Some(TOKEN), r#"{"data":1}"#),
                StatusCode::BAD_REQUEST,
                code::BAD_REQUEST,
            ),
            (
                post(&ev, Some(TOKEN), r#"{"name":""}"#),
                StatusCode::BAD_REQUEST,
                code::BAD_REQUEST,
            ),
            (
                post(&ev, Some(TOKEN), r#"{"name":"a","kind":"x"}"#),
                StatusCode::BAD_REQUEST,
                code::RESERVED_FIELD,
            ),
            (
                post(&ev, Some(TOKEN), &big),
                StatusCode::PAYLOAD_TOO_LARGE,
                code::BODY_TOO_LARGE,
            ),
            (
                post("/v1/devices/nope/events", Some(TOKEN), r#"{"name":"a"}"#),
                StatusCode::BAD_REQUEST,
                code::BAD_DEVICE_ID,
            ),
            (
                post(&rq, Some(TOKEN), r#"{"name":"a","timeout_ms":0}"#),
                StatusCode::BAD_REQUEST,
                code::BAD_REQUEST,
            ),
            (
                post(&rq, Some(TOKEN), r#"{"name":"a","timeout_ms":300001}"#),
                StatusCode::BAD_REQUEST,
                code::BAD_REQUEST,
            ),
            (
                post(&rq, Some(TOKEN), r#"{"name":"a","timeout_ms":"5"}"#),
                StatusCode::BAD_REQUEST,
                code::BAD_REQUEST,
            ),
            (
                post(&ev, Some(TOKEN), r#"{"name":"a"}"#),
                StatusCode::SERVICE_UNAVAILABLE,
                code::BROKER_UNAVAILABLE,
            ),
            (
                post("/v1/nowhere", Some(TOKEN), "{}"),
                StatusCode::NOT_FOUND,
                code::NOT_FOUND,
            ),
            (
                Request::get(ev.as_str())
                    .header("authorization", format!("Bearer {TOKEN}"))
                    .body(Body::empty())
                    .unwrap(),
                StatusCode::METHOD_NOT_ALLOWED,
                code::METHOD_NOT_ALLOWED,
            ),
        ];
        for (req, status, code) in cases {
            let what = format!("{} {}", req.method(), req.uri());
            let (got, body) = call(app(), req).await;
            assert_eq!(got, status, "{what}: {body}");
            assert_eq!(body["error"]["code"], code, "{what}: {body}");
            assert!(body["error"]["message"].is_string(), "{what}: {body}");
        }
    }

    /// What RabbitMQ reads, integers past 64 bits and oversize headers are refused
    /// before anything is published (with no broker, what passes is a 503).
    #[tokio::test]
    async fn broker_names_big_integers_and_oversize_headers_are_refused() {
        let ev = format!("{DEV}/events");
        let rq = format!("{DEV}/requests");
        let mut cases: Vec<(String, String, StatusCode, &str)> = Vec::new();
        for path in [ev.as_str(), rq.as_str(), "/v1/broadcast/events"] {
            for name in ["CC", "cc", "BCC", "Bcc", "x-death", "X-Match", "x-"] {
                let body = serde_json::json!({"name": "a", (name): ["device.x"]}).to_string();
                cases.push((
                    path.into(),
                    body,
                    StatusCode::BAD_REQUEST,
                    code::RESERVED_FIELD,
                ));
            }
            for body in [
                r#"{"name":"a","data":{"v":[18446744073709551616]}}"#,
                r#"{"name":"a","n":-9223372036854775809}"#,
            ] {
                cases.push((
                    path.into(),
                    body.into(),
                    StatusCode::BAD_REQUEST,
                    code::BAD_REQUEST,
                ));
            }
            let long = serde_json::json!({"name": "a", "pad": "x".repeat(70_000)}).to_string();
            let many = serde_json::json!({"name": "a", "n": vec![7; 20_000]}).to_string();
            for body in [long, many] {
                cases.push((
                    path.into(),
                    body,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    code::BODY_TOO_LARGE,
                ));
            }
            // Right at the edges, and names that only look alike: accepted.
            for body in [
                r#"{"name":"a","data":[18446744073709551615,-9223372036854775808],"ccx":1,"x_y":2,"big":"18446744073709551616"}"#.to_owned(),
                serde_json::json!({"name": "a", "n": vec![7; 13_000]}).to_string(),
                serde_json::json!({"name": "a", "data": vec![7; 100_000]}).to_string(),
            ] {
                cases.push((path.into(), body, StatusCode::SERVICE_UNAVAILABLE, code::BROKER_UNAVAILABLE));
            }
        }
        cases.push((
            rq.clone(),
            r#"{"name":"a","timeout_ms":18446744073709551616}"#.into(),
            StatusCode::BAD_REQUEST,
            code::BAD_REQUEST,
        ));
        for (path, body, status, code) in cases {
            let what = format!("{path} {}", &body[..body.len().min(80)]);
            let (got, answer) =
                call(app_with_limit(256 * 1024), post(&path, Some(TOKEN), &body)).await;
            assert_eq!(got, status, "{what}: {answer}");
            assert_eq!(answer["error"]["code"], code, "{what}: {answer}");
        }
    }

    #[tokio::test]
    async fn json_content_types_are_those_axum_takes() {
        for (content_type, status) in [
            ("application/json", StatusCode::SERVICE_UNAVAILABLE),
            (
                "Application/JSON; charset=utf-8",
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                "application/cloudevents+json",
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            ("text/json", StatusCode::BAD_REQUEST),
            ("application/xml", StatusCode::BAD_REQUEST),
        ] {
            let req = Request::post(format!("{DEV}/events"))
                .header("content-type", content_type)
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(Body::from(r#"{"name":"a"}"#))
                .unwrap();
            let (got, answer) = call(app(), req).await;
            assert_eq!(got, status, "{content_type}: {answer}");
        }
        let req = Request::post(format!("{DEV}/events"))
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Body::from(r#"{"name":"a"}"#))
            .unwrap();
        let (got, answer) = call(app(), req).await;
        assert_eq!(got, StatusCode::BAD_REQUEST, "{answer}");
        assert_eq!(answer["error"]["code"], code::BAD_REQUEST);
    }

    #[tokio::test]
    async fn openapi_names_every_route() {
        let req = Request::get("/openapi.json").body(Body::empty()).unwrap();
        let (status, doc) = call(app(), req).await;
        assert_eq!(status, StatusCode::OK);
        for path in [
            "/v1/devices/{device}/events",
            "/v1/devices/{device}/requests",
            "/v1/broadcast/events",
        ] {
            assert!(doc["paths"][path]["post"].is_object(), "{path}: {doc}");
        }
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
        let event = &doc["components"]["schemas"]["EventBody"];
        assert_eq!(event["additionalProperties"], true, "{event}");
        assert!(
            event["required"]
                .as_array()
                .unwrap()
                .contains(&"name".into())
        );
    }
}
