//! The REST API Hive calls: HTTP only. Each resource has a module of handlers that
//! read the request, call the domain (`crate::commands`, ...) and map its answer and
//! errors to HTTP; no AMQP or SQL here.
//!
//! - `commands`: events and requests to one device, and broadcasts.
//! - `fleet`: presence, the connected-device listing, kick, group events and
//!   scatter-gather requests.
//! - `docs`: the OpenAPI entries of the routes served without auth.
//! - `devices`: the device registry, enrolment codes, and the public JWKS.
//! - `auth`: the bearer tokens; `error`: the one error shape and the JSON extractor.

mod auth;
mod commands;
mod devices;
mod docs;
mod error;
mod fleet;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{AdditionalProperties, Schema};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

pub use auth::Tokens;
pub use commands::{Accepted, Answer, EventBody, RequestBody};
pub use error::{ApiError, ApiJson, ErrorBody, code, parse_body};
pub use fleet::{
    AnswerLine, DeviceEntry, DeviceList, FanoutAnswer, FanoutBody, GroupAccepted, ListParams,
    NDJSON, PresenceBody, Summary, SummaryLine, list_connected, wants_connected,
};

use crate::commands::Commands;
use crate::metrics;

/// What the handlers share: the domain services they call.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// Events and requests to devices.
    pub commands: Arc<Commands>,
    /// Presence, listing, kick, groups and scatter-gather requests.
    pub fleet: Arc<crate::fleet::Fleet>,
    /// The device registry and enrolment.
    pub registry: Arc<crate::registry::Registry>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Mosaic device-service",
        description = "Events and confirmed requests from Hive to devices; the fleet: presence, listing, kick, groups and scatter-gather requests."
    ),
    paths(docs::healthz, docs::readyz, docs::metrics, docs::openapi),
    components(schemas(
        fleet::SummaryLine,
        fleet::Summary,
        fleet::AnswerLine,
        fleet::DeviceList
    )),
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

/// Bounds on what a client sends: the body's size and how long it may take to arrive.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Largest body, in bytes (413 beyond).
    pub max_bytes: usize,
    /// Longest a body may take to arrive once the headers are in (408 beyond).
    pub timeout: std::time::Duration,
}

/// The whole HTTP app: `/v1` behind bearer auth, `/openapi.json`, and `health`
/// (`/healthz`, `/readyz`, `/metrics`) without auth.
pub fn router(state: ApiState, tokens: Tokens, body: BodyLimits, health: Router) -> Router {
    let (v1, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(commands::send_event))
        .routes(routes!(commands::send_request))
        .routes(routes!(commands::broadcast_event))
        .routes(routes!(fleet::presence))
        .routes(routes!(fleet::kick))
        .routes(routes!(fleet::group_event))
        .routes(routes!(fleet::group_request))
        .routes(routes!(fleet::broadcast_request))
        .routes(routes!(devices::list_devices, devices::create_device))
        .routes(routes!(
            devices::get_device,
            devices::patch_device,
            devices::delete_device
        ))
        .routes(routes!(devices::create_enrolment))
        .with_state(state.clone())
        .split_for_parts();
    let (public, public_doc) = OpenApiRouter::new()
        .routes(routes!(devices::jwks))
        .with_state(state)
        .split_for_parts();
    let mut openapi = openapi;
    openapi.merge(public_doc);
    // The bodies take any extra top-level field (`#[serde(flatten)]`).
    if let Some(components) = openapi.components.as_mut() {
        for name in ["EventBody", "RequestBody", "FanoutBody"] {
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
        .merge(public)
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
        .layer(DefaultBodyLimit::max(body.max_bytes))
        .layer(axum::Extension(error::BodyTimeout(body.timeout)))
}

pub(crate) fn finish<T: IntoResponse>(
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

pub(crate) fn parse_device(device: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(device).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            code::BAD_DEVICE_ID,
            "the device id must be a UUID",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::Commands;
    use crate::pending::Pending;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use serde_json::Value;
    use std::time::Duration;
    use tokio::sync::watch;
    use tower::ServiceExt;

    const TOKEN: &str = "test-token-0123456789";

    fn app() -> Router {
        app_with_limit(1024)
    }

    fn fleet_settings() -> crate::fleet::Settings {
        crate::fleet::Settings {
            reply_queue: "replies".into(),
            publish_timeout: Duration::from_secs(1),
            ask_timeout: Duration::from_millis(50),
            lost_after: Duration::from_secs(1),
            max_fanouts: 1,
            max_answer_bytes: 1024,
        }
    }

    fn app_with_limit(max_body_bytes: usize) -> Router {
        let (_tx, rx) = watch::channel(None);
        let pending = Pending::new(10);
        let fleet = crate::fleet::Fleet::new(rx.clone(), pending.clone(), fleet_settings());
        let state = ApiState {
            commands: Arc::new(Commands {
                link: rx,
                pending,
                publish_timeout: Duration::from_secs(1),
                reply_queue: "replies".into(),
            }),
            fleet,
            registry: Arc::new(crate::registry::Registry::new(
                None,
                None,
                Arc::default(),
                mosaic_runtime::health::Readiness::new(),
            )),
        };
        let body = BodyLimits {
            max_bytes: max_body_bytes,
            timeout: Duration::from_millis(300),
        };
        router(state, Tokens::new([TOKEN]), body, Router::new())
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
    async fn a_body_that_never_arrives_is_408_in_bounded_time() {
        // Headers in, body trickling forever: the request is answered, not held.
        let body = Body::from_stream(futures_util::stream::pending::<
            Result<Vec<u8>, std::io::Error>,
        >());
        let req = Request::post(format!("{DEV}/events"))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(body)
            .unwrap();
        let (status, body) = tokio::time::timeout(Duration::from_secs(10), call(app(), req))
            .await
            .expect("an answer within the bound");
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{body}");
        assert_eq!(body["error"]["code"], code::REQUEST_TIMEOUT);
    }

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

    /// Every route the router serves, with its method.
    const SERVED: [(&str, &str); 19] = [
        ("post", "/v1/devices/{device}/events"),
        ("post", "/v1/devices/{device}/requests"),
        ("post", "/v1/broadcast/events"),
        ("get", "/v1/devices/{device}/presence"),
        ("delete", "/v1/devices/{device}/session"),
        ("get", "/v1/devices"),
        ("post", "/v1/devices"),
        ("get", "/v1/devices/{device}"),
        ("patch", "/v1/devices/{device}"),
        ("delete", "/v1/devices/{device}"),
        ("post", "/v1/devices/{device}/enrolments"),
        ("get", "/v1/jwks.json"),
        ("post", "/v1/groups/{group}/events"),
        ("post", "/v1/groups/{group}/requests"),
        ("post", "/v1/broadcast/requests"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
    ];

    fn concrete(path: &str) -> String {
        path.replace("{device}", "0192b9b4-7d2e-7cc1-9a4e-000000000001")
            .replace("{group}", "g")
    }

    #[tokio::test]
    async fn openapi_names_every_route() {
        let req = Request::get("/openapi.json").body(Body::empty()).unwrap();
        let (status, doc) = call(app(), req).await;
        assert_eq!(status, StatusCode::OK);
        let health = Router::new()
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .route("/readyz", axum::routing::get(|| async { "ok" }))
            .route("/metrics", axum::routing::get(|| async { "" }));
        let (_tx, rx) = watch::channel(None);
        let full = || {
            let pending = Pending::new(10);
            let fleet = crate::fleet::Fleet::new(rx.clone(), pending.clone(), fleet_settings());
            let state = ApiState {
                commands: Arc::new(Commands {
                    link: rx.clone(),
                    pending,
                    publish_timeout: Duration::from_secs(1),
                    reply_queue: "replies".into(),
                }),
                fleet,
                registry: Arc::new(crate::registry::Registry::new(
                    None,
                    None,
                    Arc::default(),
                    mosaic_runtime::health::Readiness::new(),
                )),
            };
            let body = BodyLimits {
                max_bytes: 1024,
                timeout: Duration::from_millis(300),
            };
            router(state, Tokens::new([TOKEN]), body, health.clone())
        };
        // Each route served is documented...
        for (method, path) in SERVED {
            assert!(
                doc["paths"][path][method].is_object(),
                "{method} {path} is not documented"
            );
        }
        // ...and each documented route is served (not the fallback's `not_found` or
        // `method_not_allowed`).
        let paths = doc["paths"].as_object().unwrap();
        let mut documented = 0;
        for (path, item) in paths {
            for method in item.as_object().unwrap().keys() {
                documented += 1;
                let req = Request::builder()
                    .method(method.to_uppercase().as_str())
                    .uri(concrete(path))
                    .header("authorization", format!("Bearer {TOKEN}"))
                    .header("content-type", "application/json")
                    .body(Body::from("{}"))
                    .unwrap();
                let (_, body) = call(full(), req).await;
                let code = body["error"]["code"].as_str().unwrap_or_default();
                assert!(
                    code != code::NOT_FOUND && code != code::METHOD_NOT_ALLOWED,
                    "{method} {path} is documented but not served: {body}"
                );
                assert!(
                    SERVED.contains(&(method.as_str(), path.as_str())),
                    "{method} {path} is served but missing from SERVED"
                );
            }
        }
        assert_eq!(documented, SERVED.len());
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
        for name in ["EventBody", "FanoutBody"] {
            let body = &doc["components"]["schemas"][name];
            assert_eq!(body["additionalProperties"], true, "{body}");
            assert!(
                body["required"]
                    .as_array()
                    .unwrap()
                    .contains(&"name".into())
            );
        }
        for name in [
            "PresenceBody",
            "DeviceList",
            "FanoutAnswer",
            "SummaryLine",
            "GroupAccepted",
        ] {
            assert!(doc["components"]["schemas"][name].is_object(), "{name}");
        }
    }
}
