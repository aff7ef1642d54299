//! `enrol` (before authentication) and `renew` (after): both ask device-service
//! through [`crate::rpc`] and hand the device a token it minted.

use std::sync::Arc;

use axum::extract::ws::Message;
use futures_util::{Sink, Stream};
use mosaic_protocol::close;
use mosaic_protocol::frame::{ServerFrame, code};
use mosaic_protocol::registry::{RpcReply, RpcRequest, refusal};
use uuid::Uuid;

use super::{Done, close_with, expires_at, send};
use crate::auth::Identity;
use crate::gateway::Gateway;
use crate::metrics;
use crate::rpc::RpcError;

/// Trades an enrolment code for a token: `enrolled` is sent and the identity
/// returned, or the device gets `unauthorized` and 4401 (`None`).
pub(super) async fn enrol<S, E>(gw: &Gateway, socket: &mut S, code: String) -> Option<Identity>
where
    S: Stream<Item = Result<Message, E>> + Sink<Message> + Unpin,
{
    let limit = gw.limits.pong_timeout;
    let refused = |message: &str| ServerFrame::error(code::UNAUTHORIZED, message);
    let frame = if code.len() > mosaic_protocol::registry::MAX_CODE_BYTES {
        refused("enrolment code refused")
    } else {
        let request = RpcRequest::Enrol { code };
        match gw.rpc.call(&gw.broker, &request, Uuid::nil()).await {
            Ok(RpcReply::Token {
                device,
                token,
                expires_at,
            }) => match gw.verify(&token) {
                Ok(identity) if identity.device == device => {
                    let f = ServerFrame::Enrolled {
                        device,
                        token,
                        expires_at,
                    };
                    tracing::info!(%device, "device enrolled");
                    return if send(socket, &f, "enrolled", limit).await {
                        Some(identity)
                    } else {
                        None
                    };
                }
                _ => {
                    tracing::warn!(
                        "a token minted by device-service does not verify here: \
                         is its key (GET /v1/jwks.json) in JWT_PUBLIC_KEYS?"
                    );
                    refused("enrolment is not available on this gateway")
                }
            },
            Ok(RpcReply::Refused { code: c }) if c == refusal::UNAVAILABLE => {
                refused("enrolment is unavailable now; try again later")
            }
            Ok(RpcReply::Refused { .. }) => refused("enrolment code refused"),
            Err(RpcError::NoService | RpcError::Unavailable) => {
                refused("enrolment is unavailable now; try again later")
            }
        }
    };
    metrics::auth_failure("enrolment");
    tracing::info!("enrolment refused");
    send(socket, &frame, "error", limit).await;
    close_with(socket, close::UNAUTHORIZED, "unauthorized").await;
    None
}

/// Asks for a fresh token; the answer comes back through the session's in-flight
/// queue as [`Done::Renewed`].
pub(super) fn renew(gw: &Arc<Gateway>, device: Uuid) -> super::Confirm {
    let gw = gw.clone();
    Box::pin(async move {
        let reply = gw
            .rpc
            .call(&gw.broker, &RpcRequest::Renew { device }, device)
            .await;
        Done::Renewed(reply)
    })
}

/// What a `renew` came to: the frame for the device, and the new identity when a
/// token was granted (the session then runs under it).
pub(super) fn renewed(
    gw: &Gateway,
    device: Uuid,
    reply: Result<RpcReply, RpcError>,
) -> (ServerFrame, Option<Identity>) {
    match reply {
        Ok(RpcReply::Token {
            token, expires_at, ..
        }) => match gw.verify(&token) {
            Ok(identity) if identity.device == device => (
                ServerFrame::Renewed {
                    token,
                    expires_at: expires_at_or(expires_at, identity.exp),
                },
                Some(identity),
            ),
            _ => {
                tracing::warn!(
                    "a renewed token does not verify here: is device-service's key in JWT_PUBLIC_KEYS?"
                );
                (
                    ServerFrame::error(
                        code::UNAVAILABLE,
                        "renewal is not available on this gateway",
                    ),
                    None,
                )
            }
        },
        Ok(RpcReply::Refused { code: c }) if c == refusal::FORBIDDEN => (
            ServerFrame::error(
                code::FORBIDDEN,
                "this device is not registered or is disabled",
            ),
            None,
        ),
        _ => (
            ServerFrame::error(
                code::UNAVAILABLE,
                "renewal is unavailable now; try again later",
            ),
            None,
        ),
    }
}

fn expires_at_or(given: String, exp: u64) -> String {
    if given.is_empty() {
        expires_at(exp)
    } else {
        given
    }
}
