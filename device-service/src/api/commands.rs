//! `/v1/devices/{device}/events`, `/v1/devices/{device}/requests` and
//! `/v1/broadcast/events`: events and requests to devices.
//!
//! Each call publishes one message to `mosaic.commands` and waits for the broker's
//! confirm (bounded by `PUBLISH_TIMEOUT_MS`): no connection, a timeout or a negative
//! confirm is 503 `broker_unavailable` at once. Events and requests are `mandatory`:
//! a message no gateway queue takes comes back, which is 404 `device_not_connected`.
//! Broadcasts are not mandatory: with no device connected there is nobody to tell,
//! and the answer is still 202.

use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, ApiJson, ErrorBody, code};
use super::{ApiState, finish, parse_device};
use crate::commands::{CommandError, Target};

/// Default `timeout_ms` of a request.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Largest `timeout_ms` of a request.
pub const MAX_TIMEOUT_MS: u64 = 300_000;

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
        (status = 408, description = "`request_timeout`: the body did not arrive within `HEADER_READ_TIMEOUT_MS`", body = ErrorBody),
        (status = 404, description = "No gateway holds the device", body = ErrorBody),
        (status = 413, description = "`body_too_large`: body over `MAX_BODY_BYTES`, extra fields over 64 KiB as JSON text, or headers too large for one AMQP frame", body = ErrorBody),
        (status = 503, description = "Broker unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn send_event(
    State(state): State<ApiState>,
    Path(device): Path<String>,
    ApiJson(body): ApiJson<EventBody>,
) -> Response {
    let started = Instant::now();
    let res = match parse_device(&device) {
        Ok(d) => event(&state, Target::Device(d), body).await,
        Err(e) => Err(e),
    };
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
        (status = 408, description = "`request_timeout`: the body did not arrive within `HEADER_READ_TIMEOUT_MS`", body = ErrorBody),
        (status = 413, description = "`body_too_large`: body over `MAX_BODY_BYTES`, extra fields over 64 KiB as JSON text, or headers too large for one AMQP frame", body = ErrorBody),
        (status = 503, description = "Broker unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn broadcast_event(
    State(state): State<ApiState>,
    ApiJson(body): ApiJson<EventBody>,
) -> Response {
    let started = Instant::now();
    let res = event(&state, Target::Broadcast, body).await;
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
        (status = 404, description = "`device_not_connected`: no gateway holds the device, or it disconnected; `service_not_supported`: the device declared its services and `name` is not one of them (refused by its gateway, never sent to the device)", body = ErrorBody),
        (status = 408, description = "`request_timeout`: the body did not arrive within `HEADER_READ_TIMEOUT_MS`", body = ErrorBody),
        (status = 413, description = "`body_too_large`: body over `MAX_BODY_BYTES`, extra fields over 64 KiB as JSON text, or headers too large for one AMQP frame", body = ErrorBody),
        (status = 503, description = "`broker_unavailable`; `overloaded`: too many pending requests; `device_busy` (with `Retry-After`): the device is connected but cannot take more now", body = ErrorBody),
        (status = 504, description = "The device did not answer in time", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn send_request(
    State(state): State<ApiState>,
    Path(device): Path<String>,
    ApiJson(body): ApiJson<RequestBody>,
) -> Response {
    let started = Instant::now();
    let res = request(&state, &device, body).await;
    finish("request", started, res)
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        let message = e.to_string();
        match e {
            CommandError::BadName | CommandError::Unmappable(_) => ApiError::bad_request(message),
            CommandError::Reserved(_)
            | CommandError::Extra(mosaic_protocol::header::ExtraError::BrokerReserved(_)) => {
                ApiError::new(StatusCode::BAD_REQUEST, code::RESERVED_FIELD, message)
            }
            CommandError::Extra(_) | CommandError::TableTooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, code::BODY_TOO_LARGE, message)
            }
            CommandError::NotConnected | CommandError::Undeliverable(_) => {
                ApiError::not_connected(message)
            }
            CommandError::DeviceBusy => ApiError::device_busy(),
            CommandError::ServiceNotSupported(_) => {
                ApiError::new(StatusCode::NOT_FOUND, code::SERVICE_NOT_SUPPORTED, message)
            }
            CommandError::Timeout(_) => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, code::DEVICE_TIMEOUT, message)
            }
            CommandError::BadReply => {
                ApiError::new(StatusCode::BAD_GATEWAY, code::BAD_REPLY, message)
            }
            CommandError::Overloaded(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code::OVERLOADED, message)
            }
            CommandError::BrokerUnavailable => ApiError::broker_unavailable(),
        }
    }
}

async fn event(
    state: &ApiState,
    target: Target,
    body: EventBody,
) -> Result<(StatusCode, axum::Json<Accepted>), ApiError> {
    let id = state
        .commands
        .event(target, &body.name, &body.data, &body.extra)
        .await?;
    Ok((StatusCode::ACCEPTED, axum::Json(Accepted { id })))
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
    let (id, answer) = state
        .commands
        .request(device, &body.name, &body.data, &body.extra, timeout)
        .await?;
    Ok(axum::Json(Answer {
        id,
        status: answer.status,
        data: answer.data,
    }))
}
