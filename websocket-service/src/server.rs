//! The HTTP side: `GET /v1/connect` (WebSocket upgrade) and the health routes on one
//! port, and [`run`], which wires a replica together and shuts it down in order.
//!
//! Shutdown: the `shutdown` future resolves -> stop accepting -> `/readyz` false ->
//! every session closes with 1001 and publishes its `disconnected` message -> wait
//! for the tracked session tasks within `SHUTDOWN_GRACE_MS` -> close the broker
//! connection -> return. Upgraded sockets escape axum's graceful shutdown, so each
//! session holds a task-tracker token.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use mosaic_protocol::frame::code;
use mosaic_runtime::config::ConfigError;
use mosaic_runtime::health;
use tokio::net::TcpListener;

use crate::auth::KeyError;
use crate::config::Config;
use crate::gateway::Gateway;
use crate::{command, metrics, session};

/// WebSocket read buffer per connection (tungstenite's default is 128 KiB).
const READ_BUFFER: usize = 2 * 1024;
/// Writes are flushed per message, so no write buffer is kept between messages.
const WRITE_BUFFER: usize = 0;

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is missing or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `JWT_PUBLIC_KEYS` could not be loaded.
    #[error("invalid setting JWT_PUBLIC_KEYS: {0}")]
    Keys(#[from] KeyError),
    /// The HTTP server failed.
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs one replica on `listener` until `shutdown` resolves, then shuts down in
/// order (see the module docs) and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    config.validate()?;
    let gw = Arc::new(Gateway::new(&config)?);
    let id = gw.id;
    tracing::info!(gateway = %id, addr = ?listener.local_addr().ok(), "websocket-service listening");

    let settings = config.broker.settings("websocket-service", id.to_string());
    let commands = gw.broker.start(settings, gw.registry.clone());
    tokio::spawn(command::run(gw.clone(), commands));
    tokio::spawn(gw.clone().follow_broker());

    let token = gw.shutdown.clone();
    tokio::spawn({
        let gw = gw.clone();
        async move {
            shutdown.await;
            tracing::info!("shutdown: closing every session with 1001");
            gw.shutdown.cancel();
            gw.update_readiness();
        }
    });
    let server = axum::serve(listener, router(gw.clone()))
        .with_graceful_shutdown(async move { token.cancelled().await });
    let mut server = tokio::spawn(server.into_future());
    let early = tokio::select! {
        r = &mut server => Some(r),
        _ = gw.shutdown.cancelled() => None,
    };
    if early.is_some() {
        // The server stopped on its own: the sessions still have to close.
        gw.shutdown.cancel();
        gw.update_readiness();
    }

    let grace = Duration::from_millis(config.shutdown_grace_ms);
    gw.tracker.close();
    if tokio::time::timeout(grace, gw.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            sessions = gw.registry.len(),
            "shutdown grace period over with sessions still open"
        );
    }
    gw.broker.shutdown().await;
    let result = match early {
        Some(r) => r,
        None => match tokio::time::timeout(Duration::from_secs(1), &mut server).await {
            Ok(r) => r,
            Err(_) => {
                server.abort();
                Ok(Ok(()))
            }
        },
    };
    tracing::info!("websocket-service stopped");
    match result {
        Ok(r) => r.map_err(Error::Io),
        Err(_) => Ok(()),
    }
}

fn router(gw: Arc<Gateway>) -> Router {
    let health = health::router(gw.readiness.clone());
    Router::new()
        .route("/v1/connect", get(connect))
        .with_state(gw)
        .merge(health)
}

fn unauthorized(message: &str) -> Response {
    let body = serde_json::json!({"error": {"code": code::UNAUTHORIZED, "message": message}});
    (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
}

async fn connect(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if gw.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    let identity = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(value) => {
            let token = value.to_str().ok().and_then(|v| {
                // The scheme is case-insensitive (RFC 7235).
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
            let Some(token) = token else {
                metrics::auth_failure("malformed");
                return unauthorized("expected `Authorization: Bearer <jwt>`");
            };
            match gw.verifier.verify(token) {
                Ok(i) => Some(i),
                Err(e) => {
                    metrics::auth_failure(e.as_str());
                    tracing::info!(reason = e.as_str(), "token refused before upgrade");
                    return unauthorized(&e.to_string());
                }
            }
        }
    };
    let max = gw.limits.max_frame_bytes;
    let token = gw.tracker.token();
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(max.max(64 * 1024) * 4)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            session::serve(gw, socket, identity).await;
            drop(token);
        })
}
