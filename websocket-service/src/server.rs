//! The HTTP side: `GET /v1/connect` (WebSocket upgrade) and the health routes on one
//! port, and [`run`], which wires a replica together and shuts it down in order.
//!
//! Shutdown: the `shutdown` future resolves -> stop accepting -> `/readyz` false ->
//! every session closes with 1001 and publishes its `disconnected` message -> wait
//! for the tracked session tasks within `SHUTDOWN_GRACE_MS` -> announce
//! `gateway.<id>.down` on `mosaic.fleet` -> close the broker connection -> return. Upgraded sockets escape the HTTP server's graceful shutdown,
//! so each session holds a task-tracker token.
//!
//! Bounds: the HTTP server drops a client that does not send its request headers
//! within `HEADER_READ_TIMEOUT_MS` and serves at most `MAX_HTTP_CONNECTIONS` HTTP
//! connections at once ([`mosaic_runtime::serve`]); `GET /v1/connect` answers 503
//! before the upgrade when this replica holds `MAX_CONNECTIONS` WebSocket
//! connections, or `MAX_UNAUTHENTICATED` of them are still authenticating
//! ([`crate::admission`]).

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

use crate::admission::{Admission, Refused};
use crate::auth::KeyError;
use crate::config::Config;
use crate::gateway::Gateway;
use crate::{command, metrics, session};

/// WebSocket read buffer per connection (tungstenite's default is 128 KiB). It is
/// allocated with the connection and kept for its life, so it is sized for the
/// common small frame: a larger frame still fits (the buffer grows to the frame's
/// length, up to `MAX_FRAME_BYTES`), read in pieces of this size.
const READ_BUFFER: usize = 512;
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
    warn_if_short_of_files(&config);
    let admission = Admission::new(
        usize::try_from(config.max_connections).unwrap_or(usize::MAX),
        usize::try_from(config.max_unauthenticated).unwrap_or(usize::MAX),
    );

    let settings = config.broker.settings("websocket-service", id.to_string());
    let (commands, revocations) = gw.broker.start(settings, gw.registry.clone());
    tokio::spawn(command::run(gw.clone(), commands));
    tokio::spawn(crate::command::revocations::run(gw.clone(), revocations));
    tokio::spawn(gw.clone().follow_broker());
    tokio::spawn(crate::command::fleet::announce(gw.clone()));

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
    let server = mosaic_runtime::serve::serve(
        listener,
        router(gw.clone(), admission),
        config.http_limits(),
        async move { token.cancelled().await },
    );
    let mut server = tokio::spawn(server);
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
    crate::command::fleet::announce_down(&gw).await;
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

/// Warns when the process may open fewer files than its connection caps allow: past
/// that limit accepts fail (`EMFILE`) instead of the caps answering 503.
fn warn_if_short_of_files(config: &Config) {
    let needed = config
        .max_connections
        .saturating_add(config.max_http_connections)
        .saturating_add(FILES_BESIDES_CONNECTIONS);
    if let Some(limit) = mosaic_runtime::serve::open_files_limit()
        && limit < needed
    {
        tracing::warn!(
            open_files_limit = limit,
            max_connections = config.max_connections,
            max_http_connections = config.max_http_connections,
            "the open-files limit is below MAX_CONNECTIONS + MAX_HTTP_CONNECTIONS: \
             raise it (ulimit -n) or lower the caps"
        );
    }
}

/// Files the process needs besides its client connections (broker, listener, logs).
const FILES_BESIDES_CONNECTIONS: u64 = 64;

/// What `GET /v1/connect` needs: the replica, and its connection caps.
#[derive(Debug, Clone)]
struct Connect {
    gw: Arc<Gateway>,
    admission: Arc<Admission>,
}

fn router(gw: Arc<Gateway>, admission: Arc<Admission>) -> Router {
    let health = health::router(gw.readiness.clone());
    Router::new()
        .route("/v1/connect", get(connect))
        .with_state(Connect { gw, admission })
        .merge(health)
}

fn unauthorized(message: &str) -> Response {
    let body = serde_json::json!({"error": {"code": code::UNAUTHORIZED, "message": message}});
    (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
}

/// Seconds a device refused with 503 is asked to wait (`Retry-After`).
const RETRY_AFTER_SECS: &str = "5";

/// 503 `unavailable` with `Retry-After`: this replica takes no connection now.
fn unavailable(message: &str) -> Response {
    let body = serde_json::json!({"error": {"code": code::UNAVAILABLE, "message": message}});
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, RETRY_AFTER_SECS)],
        axum::Json(body),
    )
        .into_response()
}

/// 503 for a connection refused at a cap.
fn over_capacity(refused: Refused) -> Response {
    metrics::connection_refused(refused.as_str());
    tracing::debug!(limit = refused.as_str(), "connection refused at a cap");
    unavailable(match refused {
        Refused::MaxConnections => {
            "this gateway holds as many connections as it may; connect again later"
        }
        Refused::MaxUnauthenticated => {
            "too many connections are waiting to authenticate; connect again later, \
             or send the token in an Authorization header"
        }
    })
}

async fn connect(
    State(Connect { gw, admission }): State<Connect>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if gw.shutdown.is_cancelled() {
        return unavailable("shutting down; connect again later");
    }
    // Counted from here: a refused token or a failed upgrade drops the slot.
    let authorization = headers.get(header::AUTHORIZATION);
    let slot = match admission.admit(authorization.is_some()) {
        Ok(slot) => slot,
        Err(refused) => return over_capacity(refused),
    };
    let identity = match authorization {
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
            match gw.verify(token) {
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
            // Boxed once here, so the session's nested futures each hold a pointer
            // to the socket rather than a copy of it.
            session::serve(gw, Box::new(socket), identity, slot).await;
            drop(token);
        })
}
