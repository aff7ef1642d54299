//! In-band authentication: `hello`, then an `auth` frame within the auth timeout.

use std::time::Duration;

use axum::extract::ws::Message;
use futures_util::{Sink, Stream, StreamExt};
use mosaic_protocol::close;
use mosaic_protocol::fleet::Capabilities;
use mosaic_protocol::frame::{ClientFrame, ServerFrame, code};
use tokio::time::{Instant, sleep_until};

use super::{binary_refused, close_with, is_too_big, send};
use crate::auth::{AuthError, Identity};
use crate::gateway::Gateway;
use crate::metrics;

/// Sends `hello` and waits for a valid `auth` frame; `None` when the connection ends
/// (closed with 4408, 4401, 1008 or 1009 as the case may be). The capabilities the
/// frame declared come back with the identity.
pub(super) async fn authenticate<S, E>(
    gw: &Gateway,
    socket: &mut S,
) -> Option<(Identity, Capabilities)>
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + Unpin,
    E: std::fmt::Display,
{
    let limits = &gw.limits;
    let hello = ServerFrame::Hello {
        auth_timeout_ms: limits.auth_timeout.as_millis() as u64,
    };
    if !send(socket, &hello, "hello", limits.pong_timeout).await {
        return None;
    }
    let deadline = Instant::now() + limits.auth_timeout;
    let mut bad = 0u32;
    loop {
        let msg = tokio::select! {
            m = socket.next() => m,
            _ = sleep_until(deadline) => {
                metrics::auth_failure("timeout");
                tracing::debug!("no auth frame in time");
                close_with(socket, close::AUTH_TIMEOUT, "auth timeout").await;
                return None;
            }
            _ = gw.shutdown.cancelled() => {
                close_with(socket, close::GOING_AWAY, "shutting down").await;
                return None;
            }
        };
        let parsed = match msg {
            None | Some(Ok(Message::Close(_))) => return None,
            Some(Err(e)) => {
                if is_too_big(&e) {
                    close_with(socket, close::MESSAGE_TOO_BIG, "frame too large").await;
                }
                return None;
            }
            Some(Ok(Message::Text(t))) => ClientFrame::parse(t.as_str()),
            Some(Ok(Message::Binary(_))) => {
                metrics::frame_in("binary");
                Err(binary_refused())
            }
            Some(Ok(_)) => continue,
        };
        // Capabilities that cannot travel to Hive refuse the frame: nothing registered.
        let parsed = parsed.and_then(|f| match &f {
            ClientFrame::Auth { capabilities, .. } => crate::fleet::check(capabilities)
                .map(|()| f)
                .map_err(|message| mosaic_protocol::frame::FrameError {
                    code: code::BAD_FRAME,
                    message,
                }),
            _ => Ok(f),
        });
        match parsed {
            Ok(ClientFrame::Enrol { code }) => {
                metrics::frame_in("enrol");
                return super::enrolment::enrol(gw, socket, code)
                    .await
                    .map(|i| (i, Capabilities::default()));
            }
            Ok(ClientFrame::Auth {
                token,
                capabilities,
            }) => {
                metrics::frame_in("auth");
                return match gw.verify(&token) {
                    Ok(i) => Some((i, capabilities)),
                    Err(e) => {
                        refuse(socket, e, limits.pong_timeout).await;
                        None
                    }
                };
            }
            other => {
                bad += 1;
                let message = match other {
                    Err(e) => e.message,
                    Ok(_) => "authenticate first with an auth (or enrol) frame".to_owned(),
                };
                let f = ServerFrame::error(code::BAD_FRAME, message);
                if !send(socket, &f, "error", limits.pong_timeout).await {
                    return None;
                }
                if bad >= limits.max_bad_frames {
                    close_with(socket, close::POLICY_VIOLATION, "too many bad frames").await;
                    return None;
                }
            }
        }
    }
}

async fn refuse<S, E>(socket: &mut S, e: AuthError, limit: Duration)
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + Unpin,
{
    metrics::auth_failure(e.as_str());
    tracing::info!(reason = e.as_str(), "token refused");
    let f = ServerFrame::error(code::UNAUTHORIZED, e.to_string());
    send(socket, &f, "error", limit).await;
    close_with(socket, close::UNAUTHORIZED, "unauthorized").await;
}
