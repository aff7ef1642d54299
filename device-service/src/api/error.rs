//! The one error shape of the REST API: `{"error":{"code","message"}}`.

use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, MissingJsonContentType};
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;

/// Error codes of the REST API.
pub mod code {
    /// No or a wrong bearer token.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// The body is not what the endpoint takes.
    pub const BAD_REQUEST: &str = "bad_request";
    /// `{device}` is not a UUID.
    pub const BAD_DEVICE_ID: &str = "bad_device_id";
    /// The body uses a name the gateway builds the device frame from, or one
    /// RabbitMQ reads itself (`CC`, `BCC`, `x-...`, in any letter case).
    pub const RESERVED_FIELD: &str = "reserved_field";
    /// The body is larger than `MAX_BODY_BYTES`, its extra fields take more than
    /// 64 KiB as JSON, or its headers would not fit one AMQP frame.
    pub const BODY_TOO_LARGE: &str = "body_too_large";
    /// No gateway holds the device.
    pub const DEVICE_NOT_CONNECTED: &str = "device_not_connected";
    /// The device did not answer in time.
    pub const DEVICE_TIMEOUT: &str = "device_timeout";
    /// The device answered something that is not JSON.
    pub const BAD_REPLY: &str = "bad_reply";
    /// RabbitMQ cannot be reached or did not confirm in time.
    pub const BROKER_UNAVAILABLE: &str = "broker_unavailable";
    /// Too many requests wait for devices in this replica.
    pub const OVERLOADED: &str = "overloaded";
    /// The device is connected but cannot take more now (its pending requests or its
    /// outbound queue are full); try again after `Retry-After`.
    pub const DEVICE_BUSY: &str = "device_busy";
    /// The device declared its services, and the request's `name` is not one of them.
    pub const SERVICE_NOT_SUPPORTED: &str = "service_not_supported";
    /// A group name is not 1 to 64 characters of `A-Za-z0-9_-`.
    pub const BAD_GROUP: &str = "bad_group";
    /// No gateway answered a fleet question in time.
    pub const GATEWAY_TIMEOUT: &str = "gateway_timeout";
    /// No such route.
    pub const NOT_FOUND: &str = "not_found";
    /// The request body did not arrive within the time allowed.
    pub const REQUEST_TIMEOUT: &str = "request_timeout";
    /// The route exists, not with this method.
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// The route needs a setting this service runs without (`DATABASE_URL`,
    /// `TOKEN_SIGNING_KEY`).
    pub const NOT_CONFIGURED: &str = "not_configured";
    /// PostgreSQL cannot be reached or failed; try again after `Retry-After`.
    pub const DATABASE_UNAVAILABLE: &str = "database_unavailable";
    /// No device with this id in the registry.
    pub const DEVICE_NOT_FOUND: &str = "device_not_found";
    /// A device with this id is in the registry.
    pub const DEVICE_EXISTS: &str = "device_exists";
    /// Another device has this `external_id`.
    pub const EXTERNAL_ID_EXISTS: &str = "external_id_exists";
    /// The device is disabled (no enrolment code for it).
    pub const DEVICE_DISABLED: &str = "device_disabled";
}

/// An API error: a status, a snake_case code and a message for Hive's developers.
/// Internal detail is logged where the error arises, never put in the message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// One of [`code`].
    pub code: &'static str,
    /// What went wrong.
    pub message: String,
    /// Seconds for a `Retry-After` header, when trying again later may succeed.
    pub retry_after: Option<u32>,
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message of an error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// snake_case code, e.g. `device_not_connected`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same error with a `Retry-After` of `seconds`.
    pub fn with_retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// 503 with [`code::DEVICE_BUSY`] and `Retry-After: 1`: connected, not offline.
    pub fn device_busy() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code::DEVICE_BUSY,
            "the device is connected but cannot take more requests now; try again shortly",
        )
        .with_retry_after(1)
    }

    /// 400 with [`code::BAD_REQUEST`].
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code::BAD_REQUEST, message)
    }

    /// 503 with [`code::BROKER_UNAVAILABLE`].
    pub fn broker_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            code::BROKER_UNAVAILABLE,
            "the message broker is unavailable; try again later",
        )
    }

    /// 404 with [`code::DEVICE_NOT_CONNECTED`].
    pub fn not_connected(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code::DEVICE_NOT_CONNECTED, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        let mut res = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                code::BODY_TOO_LARGE,
                "the request body is too large",
            );
        }
        ApiError::bad_request(r.body_text())
    }
}

/// How long a request body may take to arrive once its headers are in (a request
/// extension the router sets; without it, no bound).
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub std::time::Duration);

/// A JSON body, as `axum::Json` reads it (JSON content type, body limit), with its
/// rejections in the API's error shape, and numbers exact: see [`parse_body`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !json_content_type(req.headers()) {
            return Err(JsonRejection::from(MissingJsonContentType::default()).into());
        }
        // A client that trickles its body holds a connection and a task: bounded.
        let timeout = req.extensions().get::<BodyTimeout>().map(|t| t.0);
        let read = Bytes::from_request(req, state);
        let bytes = match timeout {
            Some(t) => tokio::time::timeout(t, read).await.map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    code::REQUEST_TIMEOUT,
                    "the request body did not arrive in time",
                )
            })?,
            None => read.await,
        }
        .map_err(JsonRejection::from)?;
        parse_body(&bytes).map(ApiJson)
    }
}

/// Reads a request body: JSON into `T`, and then refused when an integer literal
/// anywhere in it lies outside `i64::MIN..=u64::MAX` (it could not reach the device
/// unchanged). Both are 400 `bad_request`.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let axum::Json(v) = axum::Json::<T>::from_bytes(bytes)?;
    mosaic_protocol::json::check_integers(bytes)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(v)
}

/// `application/json` or `application/<anything>+json`, parameters allowed: what
/// `axum::Json` accepts.
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    let subtype = subtype.to_ascii_lowercase();
    kind.eq_ignore_ascii_case("application") && (subtype == "json" || subtype.ends_with("+json"))
}
