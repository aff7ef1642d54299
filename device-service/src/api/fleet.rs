//! The fleet routes: presence, the connected-device listing, kick, group events, and
//! scatter-gather requests to a group or to every device. HTTP only: the work is
//! `crate::fleet`'s.
//!
//! `GET /v1/devices` is shared with the registry listing (`api::devices`): with
//! `connected=true` that handler calls [`list_connected`] here.

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use super::commands::{DEFAULT_TIMEOUT_MS, EventBody, MAX_TIMEOUT_MS};
use super::error::{ApiError, ApiJson, ErrorBody, code};
use super::{ApiState, finish, parse_device};
use crate::fleet::{
    Audience, Call, DeviceAnswer, FleetError, Listed, Outcome, Query as FleetQuery,
};

/// The media type of a streamed scatter-gather answer.
pub const NDJSON: &str = "application/x-ndjson";

impl From<FleetError> for ApiError {
    fn from(e: FleetError) -> Self {
        let message = e.to_string();
        match e {
            FleetError::Command(e) => e.into(),
            FleetError::BadGroup => {
                ApiError::new(StatusCode::BAD_REQUEST, code::BAD_GROUP, message)
            }
            FleetError::BadCursor => ApiError::bad_request(message),
            FleetError::NotConnected => ApiError::not_connected(message),
            FleetError::Timeout(_) => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, code::GATEWAY_TIMEOUT, message)
            }
            FleetError::Overloaded => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code::OVERLOADED, message)
                    .with_retry_after(1)
            }
        }
    }
}

/// A connected device, as the gateway holding it describes it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceEntry {
    /// The device.
    pub device: Uuid,
    /// The gateway replica holding its session (the `gateway` of its lifecycle
    /// messages).
    pub gateway: Uuid,
    /// The session.
    pub session: Uuid,
    /// When the session began, RFC 3339.
    pub connected_at: String,
    /// The services it declared; `null` when it declared none (every request
    /// reaches it).
    pub services: Option<Vec<String>>,
    /// The attributes it declared; `null` when none.
    #[schema(value_type = Option<Object>)]
    pub attributes: Option<Map<String, Value>>,
    /// Its session's groups (from its token).
    pub groups: Vec<String>,
}

impl From<mosaic_protocol::fleet::Connected> for DeviceEntry {
    fn from(c: mosaic_protocol::fleet::Connected) -> Self {
        DeviceEntry {
            device: c.device,
            gateway: c.gateway,
            session: c.session,
            connected_at: c.connected_at,
            services: c.services,
            attributes: c.attributes,
            groups: c.groups,
        }
    }
}

/// Whether a device is connected, and its session when it is: `{"connected":false}`
/// or `{"connected":true,"device","gateway","session","connected_at","services",
/// "attributes","groups"}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PresenceBody {
    /// Whether some gateway holds the device.
    pub connected: bool,
    /// The session, when connected (its fields sit at the top level).
    #[serde(flatten)]
    pub session: Option<DeviceEntry>,
    /// When not connected and a registry is configured: the time of its latest
    /// connect or disconnect (RFC 3339), `null` when never seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Option<String>>,
}

/// One page of connected devices.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceList {
    /// The devices, in id order.
    pub devices: Vec<DeviceEntry>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    pub next_cursor: Option<Uuid>,
    /// How many gateway replicas answered.
    pub gateways: usize,
    /// True when a live gateway did not answer within `FLEET_TIMEOUT_MS`: its
    /// devices are missing from this page.
    pub partial: bool,
}

impl From<Listed> for DeviceList {
    fn from(l: Listed) -> Self {
        DeviceList {
            devices: l.devices.into_iter().map(Into::into).collect(),
            next_cursor: l.next,
            gateways: l.gateways,
            partial: l.partial,
        }
    }
}

/// An event taken for a group.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GroupAccepted {
    /// The event's id, as the devices see it.
    pub id: Uuid,
    /// Gateway replicas holding members of the group (0: no member is connected).
    pub gateways: usize,
}

/// A scatter-gather request. Any other top-level field travels to the devices
/// unchanged.
#[derive(Debug, Deserialize, ToSchema)]
pub struct FanoutBody {
    /// 1 to 128 characters; a device that declared services without it is not asked.
    pub name: String,
    /// Any JSON; `null` when absent.
    #[serde(default)]
    pub data: Value,
    /// How long to wait for the answers, 1 to 300000 ms (default 10000).
    pub timeout_ms: Option<u64>,
    /// Extra fields, as for events.
    #[serde(flatten)]
    #[schema(ignore)]
    pub extra: Map<String, Value>,
}

/// One device's answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AnswerLine {
    /// The device.
    pub device: Uuid,
    /// Its status.
    pub status: String,
    /// Its data.
    pub data: Value,
    /// Present (true) when this replica held too many answers and dropped the data.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

impl From<DeviceAnswer> for AnswerLine {
    fn from(a: DeviceAnswer) -> Self {
        AnswerLine {
            device: a.device,
            status: a.status,
            data: a.data,
            truncated: a.truncated,
        }
    }
}

/// Every answer of a scatter-gather request. Each device asked is in exactly one of
/// `answers`, `timed_out`, `left` and `busy`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FanoutAnswer {
    /// The request's id (every device got the same).
    pub id: Uuid,
    /// Devices asked (those whose declared services lack `name` are not).
    pub asked: usize,
    /// The answers.
    pub answers: Vec<AnswerLine>,
    /// Devices that did not answer within `timeout_ms`.
    pub timed_out: Vec<Uuid>,
    /// Devices that disconnected before answering (or whose gateway was lost).
    pub left: Vec<Uuid>,
    /// Devices connected but unable to take the request (outbound queue or pending
    /// requests full): busy, not offline.
    pub busy: Vec<Uuid>,
    /// Gateway replicas that reported the devices they asked.
    pub gateways: usize,
}

/// The last line of a streamed (NDJSON) answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SummaryLine {
    /// The counts.
    pub summary: Summary,
}

/// Counts of a scatter-gather request.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Summary {
    /// The request's id.
    pub id: Uuid,
    /// Devices asked.
    pub asked: usize,
    /// Answer lines sent.
    pub answered: usize,
    /// Devices that did not answer in time.
    pub timed_out: usize,
    /// Devices that disconnected before answering.
    pub left: usize,
    /// Devices too busy to take it.
    pub busy: usize,
    /// Gateway replicas that reported.
    pub gateways: usize,
}

impl Summary {
    fn of(id: Uuid, o: &Outcome) -> Self {
        Summary {
            id,
            asked: o.asked,
            answered: o.answered,
            timed_out: o.timed_out.len(),
            left: o.left.len(),
            busy: o.busy.len(),
            gateways: o.gateways,
        }
    }
}

/// The query of `GET /v1/devices`, as text (each field checked here, with a clear
/// error).
#[derive(Debug, Default, Deserialize)]
pub struct ListParams {
    /// `true`: list the connected devices (this module).
    pub connected: Option<String>,
    /// Members of this group only.
    pub group: Option<String>,
    /// Devices that declared this service only.
    pub service: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Whether a `GET /v1/devices` query asks for connected devices.
pub fn wants_connected(p: &ListParams) -> bool {
    p.connected.as_deref() == Some("true")
}

fn check_group(group: &str) -> Result<(), ApiError> {
    if mosaic_protocol::fleet::valid_group(group) {
        Ok(())
    } else {
        Err(FleetError::BadGroup.into())
    }
}

/// Whether a device is connected, asked of the gateway that holds it.
#[utoipa::path(
    get,
    path = "/v1/devices/{device}/presence",
    params(("device" = Uuid, Path, description = "The device's UUID")),
    responses(
        (status = 200, description = "`{\"connected\":false}` (with `last_seen` when the registry knows the device), or `connected: true` with its session", body = PresenceBody),
        (status = 400, description = "`bad_device_id`", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 503, description = "`broker_unavailable`; `overloaded`: too many pending calls", body = ErrorBody),
        (status = 504, description = "`gateway_timeout`: the gateway holding the device did not answer within `FLEET_TIMEOUT_MS`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn presence(
    State(state): State<ApiState>,
    Path(device): Path<String>,
) -> Response {
    let started = Instant::now();
    let res = async {
        let device = parse_device(&device)?;
        Ok::<_, ApiError>(axum::Json(presence_of(&state, device).await?))
    }
    .await;
    finish("presence", started, res)
}

/// A device's presence from the gateways; when it is not connected and the registry
/// knows it, with `last_seen`.
pub async fn presence_of(state: &ApiState, device: Uuid) -> Result<PresenceBody, ApiError> {
    let p = state.fleet.presence(device).await?;
    let last_seen = if p.connected {
        None
    } else {
        // No registry, or a device it does not hold: no `last_seen`.
        state
            .registry
            .last_seen(device)
            .await
            .ok()
            .map(|t| t.map(crate::registry::rfc3339))
    };
    Ok(PresenceBody {
        connected: p.connected,
        session: p.session.map(Into::into),
        last_seen,
    })
}

/// Ends a device's session: the device is closed with 4410 `kicked`.
#[utoipa::path(
    delete,
    path = "/v1/devices/{device}/session",
    params(("device" = Uuid, Path, description = "The device's UUID")),
    responses(
        (status = 204, description = "The session is closing (close 4410, lifecycle `disconnected` with reason `kicked`)"),
        (status = 400, description = "`bad_device_id`", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "`device_not_connected`", body = ErrorBody),
        (status = 503, description = "`broker_unavailable`", body = ErrorBody),
        (status = 504, description = "`gateway_timeout`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn kick(State(state): State<ApiState>, Path(device): Path<String>) -> Response {
    let started = Instant::now();
    let res = async {
        let device = parse_device(&device)?;
        state.fleet.kick(device).await?;
        Ok::<_, ApiError>(StatusCode::NO_CONTENT)
    }
    .await;
    finish("kick", started, res)
}

/// The connected-device listing of `GET /v1/devices?connected=true`.
pub async fn list_connected(
    state: &ApiState,
    p: ListParams,
) -> Result<axum::Json<DeviceList>, ApiError> {
    if let Some(g) = &p.group {
        check_group(g)?;
    }
    if let Some(s) = &p.service
        && (s.is_empty() || s.chars().count() > mosaic_protocol::fleet::MAX_SERVICE_CHARS)
    {
        return Err(ApiError::bad_request(
            "`service` must have 1 to 128 characters",
        ));
    }
    let limit = match p.limit.as_deref() {
        None => crate::fleet::DEFAULT_PAGE,
        Some(l) => match l.parse::<u32>() {
            Ok(n) if (1..=crate::fleet::MAX_PAGE).contains(&n) => n,
            _ => return Err(ApiError::bad_request("`limit` must be 1 to 1000")),
        },
    };
    let after = match p.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(Uuid::parse_str(c).map_err(|_| FleetError::BadCursor)?),
    };
    let q = FleetQuery {
        group: p.group,
        service: p.service,
        limit,
        after,
    };
    Ok(axum::Json(state.fleet.list(&q).await?.into()))
}

/// Sends an event to every connected member of a group.
#[utoipa::path(
    post,
    path = "/v1/groups/{group}/events",
    params(("group" = String, Path, description = "1 to 64 of `A-Za-z0-9_-`")),
    request_body = EventBody,
    responses(
        (status = 202, description = "Published to the group's gateways", body = GroupAccepted),
        (status = 400, description = "`bad_group`; `bad_request`; `reserved_field`", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 503, description = "`broker_unavailable`", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn group_event(
    State(state): State<ApiState>,
    Path(group): Path<String>,
    ApiJson(body): ApiJson<EventBody>,
) -> Response {
    let started = Instant::now();
    let res = async {
        check_group(&group)?;
        let (id, gateways) = state
            .fleet
            .group_event(&group, &body.name, &body.data, &body.extra)
            .await?;
        Ok::<_, ApiError>((
            StatusCode::ACCEPTED,
            axum::Json(GroupAccepted { id, gateways }),
        ))
    }
    .await;
    finish("group_event", started, res)
}

/// A scatter-gather request to every connected member of a group.
#[utoipa::path(
    post,
    path = "/v1/groups/{group}/requests",
    params(("group" = String, Path, description = "1 to 64 of `A-Za-z0-9_-`")),
    request_body = FanoutBody,
    responses(
        (status = 200, description = "Every device asked answered, or `timeout_ms` passed (JSON); or the answers streamed as NDJSON (`AnswerLine` lines, then a `SummaryLine`)", body = FanoutAnswer,
         content((FanoutAnswer = "application/json"), (AnswerLine = "application/x-ndjson"))),
        (status = 400, description = "`bad_group`; `bad_request` (bad body or `timeout_ms`); `reserved_field`", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 503, description = "`broker_unavailable`; `overloaded` (with `Retry-After`): `MAX_FANOUTS` requests run already", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn group_request(
    State(state): State<ApiState>,
    Path(group): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<FanoutBody>,
) -> Response {
    let started = Instant::now();
    if let Err(e) = check_group(&group) {
        return finish::<Response>("group_request", started, Err(e));
    }
    scatter(
        state,
        Audience::Group(group),
        headers,
        body,
        "group_request",
        started,
    )
    .await
}

/// A scatter-gather request to every connected device.
#[utoipa::path(
    post,
    path = "/v1/broadcast/requests",
    request_body = FanoutBody,
    responses(
        (status = 200, description = "Every device asked answered, or `timeout_ms` passed (JSON); or the answers streamed as NDJSON (`AnswerLine` lines, then a `SummaryLine`)", body = FanoutAnswer,
         content((FanoutAnswer = "application/json"), (AnswerLine = "application/x-ndjson"))),
        (status = 400, description = "`bad_request` (bad body or `timeout_ms`); `reserved_field`", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 413, description = "`body_too_large`", body = ErrorBody),
        (status = 503, description = "`broker_unavailable`; `overloaded` (with `Retry-After`): `MAX_FANOUTS` requests run already", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(super) async fn broadcast_request(
    State(state): State<ApiState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<FanoutBody>,
) -> Response {
    scatter(
        state,
        Audience::Everyone,
        headers,
        body,
        "broadcast_request",
        Instant::now(),
    )
    .await
}

fn wants_ndjson(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case(NDJSON)
        })
}

async fn scatter(
    state: ApiState,
    audience: Audience,
    headers: HeaderMap,
    body: FanoutBody,
    endpoint: &'static str,
    started: Instant,
) -> Response {
    let timeout_ms = body.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if !(1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
        return finish::<Response>(
            endpoint,
            started,
            Err(ApiError::bad_request(format!(
                "field `timeout_ms` must be 1 to {MAX_TIMEOUT_MS}"
            ))),
        );
    }
    let call = state
        .fleet
        .fanout(
            audience,
            &body.name,
            &body.data,
            &body.extra,
            Duration::from_millis(timeout_ms),
        )
        .await;
    let call = match call {
        Ok(c) => c,
        Err(e) => return finish::<Response>(endpoint, started, Err(e.into())),
    };
    if wants_ndjson(&headers) {
        // The status is known now; the body follows as the answers come.
        let _ = finish::<StatusCode>(endpoint, started, Ok(StatusCode::OK));
        return stream(call);
    }
    let id = call.id;
    let (answers, o) = call.all().await;
    let body = FanoutAnswer {
        id,
        asked: o.asked,
        answers: answers.into_iter().map(Into::into).collect(),
        timed_out: o.timed_out,
        left: o.left,
        busy: o.busy,
        gateways: o.gateways,
    };
    finish(endpoint, started, Ok(axum::Json(body)))
}

fn line<T: Serialize>(v: &T, out: &mut Vec<u8>) {
    serde_json::to_writer(&mut *out, v).expect("answer lines serialize");
    out.push(b'\n');
}

/// The answers as NDJSON lines while they arrive, then the summary line.
fn stream(call: Call) -> Response {
    let lines = futures_util::stream::unfold(Some(call), |call| async move {
        let mut call = call?;
        let ready = call.next().await;
        let mut out = Vec::new();
        if ready.is_empty() {
            let o = call.finish();
            line(
                &SummaryLine {
                    summary: Summary::of(call.id, &o),
                },
                &mut out,
            );
            return Some((Ok::<_, std::convert::Infallible>(Bytes::from(out)), None));
        }
        for a in ready {
            line(&AnswerLine::from(a), &mut out);
        }
        Some((Ok(Bytes::from(out)), Some(call)))
    });
    let mut res = Body::from_stream(lines).into_response();
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    res
}
