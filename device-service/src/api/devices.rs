//! The device registry: `/v1/devices`, `/v1/devices/{device}`,
//! `/v1/devices/{device}/enrolments`, and the public `/v1/jwks.json`.
//!
//! HTTP only: each handler reads the request, calls [`crate::registry`] and maps its
//! answer. Without `DATABASE_URL` the routes answer 503 `not_configured`; while
//! PostgreSQL is unreachable, 503 `database_unavailable` with `Retry-After`.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::error::{ApiError, ApiJson, ErrorBody, code, parse_body};
use super::{ApiState, finish, parse_device};
use crate::registry::{DeviceRecord, Enrolment, ListQuery, NewDeviceBody, Page, RegistryError};

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let message = e.to_string();
        match e {
            RegistryError::NotConfigured(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                code::NOT_CONFIGURED,
                message,
            ),
            RegistryError::Unavailable => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                code::DATABASE_UNAVAILABLE,
                message,
            )
            .with_retry_after(1),
            RegistryError::NotFound => {
                ApiError::new(StatusCode::NOT_FOUND, code::DEVICE_NOT_FOUND, message)
            }
            RegistryError::Exists => {
                ApiError::new(StatusCode::CONFLICT, code::DEVICE_EXISTS, message)
            }
            RegistryError::ExternalIdTaken => {
                ApiError::new(StatusCode::CONFLICT, code::EXTERNAL_ID_EXISTS, message)
            }
            RegistryError::Disabled => {
                ApiError::new(StatusCode::CONFLICT, code::DEVICE_DISABLED, message)
            }
            RegistryError::Invalid(_) => ApiError::bad_request(message),
        }
    }
}

/// The listing's query parameters.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only members of this group.
    pub group: Option<String>,
    /// Only enabled (`true`) or disabled (`false`) devices.
    pub enabled: Option<bool>,
    /// Text the name or the external id contains (any letter case).
    pub q: Option<String>,
    /// `true`: the connected devices across every replica (the fleet's listing,
    /// with `group` and `service`); see `GET /v1/devices?connected=true`.
    pub connected: Option<bool>,
    /// With `connected=true`: only devices that declared this service.
    pub service: Option<String>,
}

/// A device record with its presence.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceView {
    /// The record.
    #[serde(flatten)]
    pub record: DeviceRecord,
    /// Where the device is now, as `GET /v1/devices/{device}/presence` answers
    /// (`{"connected":true,...}` or `{"connected":false,"last_seen"}`).
    #[schema(value_type = Object)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence: Option<Value>,
}

/// `POST /v1/devices/{device}/enrolments`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrolmentBody {
    /// How long the code works, 60000 to 2592000000 ms (default 86400000, 24 h).
    pub ttl_ms: Option<u64>,
}

/// Lists the registry, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/devices",
    params(ListParams),
    responses(
        (status = 200, description = "A page of devices, in id order: registry records (`Page`), or with `connected=true` the connected devices across every gateway replica (`DeviceList`, see docs/fleet.md)", body = Page),
        (status = 400, description = "`bad_request`: a bad `limit`, `cursor`, `group` (1 to 64 of `[A-Za-z0-9_-]`), `q` or an unknown parameter", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 503, description = "`not_configured` (no `DATABASE_URL`) or `database_unavailable`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn list_devices(
    State(state): State<ApiState>,
    query: Result<Query<ListParams>, QueryRejection>,
) -> Response {
    let started = Instant::now();
    let res = async {
        let Query(p) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
        if p.connected == Some(true) {
            // The connected devices, from the gateways (docs/fleet.md).
            if p.enabled.is_some() || p.q.is_some() {
                return Err(ApiError::bad_request(
                    "`enabled` and `q` go without `connected=true`",
                ));
            }
            let q = super::fleet::ListParams {
                connected: Some("true".into()),
                group: p.group,
                service: p.service,
                limit: p.limit.map(|l| l.to_string()),
                cursor: p.cursor,
            };
            let list = super::fleet::list_connected(&state, q).await?;
            return Ok(list.into_response());
        }
        if p.service.is_some() {
            return Err(ApiError::bad_request(
                "`service` goes with `connected=true`",
            ));
        }
        let page = state
            .registry
            .list(ListQuery {
                limit: p.limit,
                cursor: p.cursor,
                group: p.group,
                enabled: p.enabled,
                q: p.q,
            })
            .await?;
        Ok(axum::Json(page).into_response())
    }
    .await;
    finish("registry_list", started, res)
}

/// Adds a device to the registry (`registry.<device>.created` follows on the bus).
#[utoipa::path(
    post,
    path = "/v1/devices",
    request_body = NewDeviceBody,
    responses(
        (status = 201, description = "Created; `Location` names it", body = DeviceRecord),
        (status = 400, description = "`bad_request`: a bad or unknown field (name 1-128, external_id 1-128, type 1-64 characters; groups of `[A-Za-z0-9_-]`; attributes an object of at most 8 KiB)", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 409, description = "`device_exists` (the id) or `external_id_exists`", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 503, description = "`not_configured` or `database_unavailable`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn create_device(
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<NewDeviceBody>,
) -> Response {
    let started = Instant::now();
    let res = async {
        let record = state.registry.create(body).await?;
        let location = HeaderValue::from_str(&format!("/v1/devices/{}", record.id))
            .expect("a UUID path is a header value");
        Ok((
            StatusCode::CREATED,
            [(header::LOCATION, location)],
            axum::Json(record),
        ))
    }
    .await;
    finish("registry_create", started, res)
}

/// One device: its record, and its presence.
#[utoipa::path(
    get,
    path = "/v1/devices/{device}",
    params(("device" = Uuid, Path, description = "The device's UUID")),
    responses(
        (status = 200, description = "The record and the presence", body = DeviceView),
        (status = 400, description = "`bad_device_id`", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "`device_not_found`", body = ErrorBody),
        (status = 503, description = "`not_configured` or `database_unavailable`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn get_device(
    State(state): State<ApiState>,
    Path(device): Path<String>,
) -> Response {
    let started = Instant::now();
    let res = async {
        let id = parse_device(&device)?;
        let record = state.registry.get(id).await?;
        // From the gateways; `last_seen` from the record when not connected. A
        // fleet that cannot answer now leaves the record alone.
        let presence = match state.fleet.presence(id).await {
            Ok(p) if p.connected => serde_json::to_value(super::fleet::PresenceBody {
                connected: true,
                session: p.session.map(Into::into),
                last_seen: None,
            })
            .ok(),
            Ok(_) => Some(serde_json::json!({"connected": false, "last_seen": record.last_seen})),
            Err(e) => {
                tracing::debug!(error = %e, "presence unknown for a registry lookup");
                None
            }
        };
        Ok(axum::Json(DeviceView { record, presence }))
    }
    .await;
    finish("registry_get", started, res)
}

/// Changes a device with a JSON merge patch (RFC 7396) of `name`, `groups`,
/// `attributes` and `enabled`. Setting `enabled` to false revokes its tokens and
/// closes its session (4403 "revoked") on whatever gateway holds it.
#[utoipa::path(
    patch,
    path = "/v1/devices/{device}",
    params(("device" = Uuid, Path, description = "The device's UUID")),
    request_body(content = Object, content_type = "application/merge-patch+json",
        description = "A merge patch: `name` (string), `groups` (array, or null for none), `attributes` (an object merged into the current one; null removes a key; null as a whole clears them), `enabled` (boolean)"),
    responses(
        (status = 200, description = "The record after the change", body = DeviceRecord),
        (status = 400, description = "`bad_request`: not an object, a field that cannot change, a bad value; `bad_device_id`", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "`device_not_found`", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 503, description = "`not_configured` or `database_unavailable`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn patch_device(
    State(state): State<ApiState>,
    Path(device): Path<String>,
    ApiJson(patch): ApiJson<Value>,
) -> Response {
    let started = Instant::now();
    let res = async {
        let id = parse_device(&device)?;
        Ok(axum::Json(state.registry.patch(id, patch).await?))
    }
    .await;
    finish("registry_patch", started, res)
}

/// Removes a device: its tokens are revoked and its session closed, its enrolment
/// codes dropped, and `registry.<device>.deleted` follows on the bus.
#[utoipa::path(
    delete,
    path = "/v1/devices/{device}",
    params(("device" = Uuid, Path, description = "The device's UUID")),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "`bad_device_id`", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "`device_not_found`", body = ErrorBody),
        (status = 503, description = "`not_configured` or `database_unavailable`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn delete_device(
    State(state): State<ApiState>,
    Path(device): Path<String>,
) -> Response {
    let started = Instant::now();
    let res = async {
        let id = parse_device(&device)?;
        state.registry.delete(id).await?;
        Ok(StatusCode::NO_CONTENT)
    }
    .await;
    finish("registry_delete", started, res)
}

/// A one-time enrolment code for a registered, enabled device. The device sends it
/// in an `enrol` frame instead of `auth` and receives its token.
#[utoipa::path(
    post,
    path = "/v1/devices/{device}/enrolments",
    params(("device" = Uuid, Path, description = "The device's UUID")),
    request_body(content = EnrolmentBody, description = "Optional; an empty body takes the defaults"),
    responses(
        (status = 201, description = "The code (shown once) and its expiry", body = Enrolment),
        (status = 400, description = "`bad_request`: `ttl_ms` outside 60000..2592000000, an unknown field; `bad_device_id`", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "`device_not_found`: not in the registry", body = ErrorBody),
        (status = 409, description = "`device_disabled`", body = ErrorBody),
        (status = 503, description = "`not_configured` (no `DATABASE_URL` or no `TOKEN_SIGNING_KEY`) or `database_unavailable`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn create_enrolment(
    State(state): State<ApiState>,
    Path(device): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let res = async {
        let id = parse_device(&device)?;
        let body: EnrolmentBody = if body.iter().all(u8::is_ascii_whitespace) {
            EnrolmentBody::default()
        } else {
            let json = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.to_ascii_lowercase().starts_with("application/json"));
            if !json {
                return Err(ApiError::bad_request(
                    "a body must be JSON (Content-Type: application/json)",
                ));
            }
            parse_body(&body)?
        };
        let e = state.registry.enrolment(id, body.ttl_ms).await?;
        Ok((StatusCode::CREATED, axum::Json(e)))
    }
    .await;
    finish("enrolment", started, res)
}

/// The public key of the tokens device-service mints, for the gateways'
/// `JWT_PUBLIC_KEYS`. No token needed.
#[utoipa::path(
    get,
    path = "/v1/jwks.json",
    responses(
        (status = 200, description = "A JWKS document with one Ed25519 (`OKP`) key, `kid` its RFC 7638 thumbprint", content_type = "application/json", body = Object),
        (status = 503, description = "`not_configured`: no `TOKEN_SIGNING_KEY`", body = ErrorBody),
    )
)]
pub(super) async fn jwks(State(state): State<ApiState>) -> Response {
    match state.registry.jwks() {
        Ok(doc) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "max-age=300"),
            ],
            doc,
        )
            .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}
