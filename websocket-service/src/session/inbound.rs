//! Frames from an authenticated device: events, responses, refreshes, `register`,
//! bad frames.

use std::sync::Arc;

use axum::extract::ws::{Message, Utf8Bytes};
use futures_util::Sink;
use mosaic_protocol::close::{self, DisconnectReason};
use mosaic_protocol::frame::{ClientFrame, DeviceEvent, ServerFrame, code};
use tokio::time::Instant;

use super::{Done, End, State, binary_refused, expires_at, send};
use crate::gateway::Gateway;
use crate::message;
use crate::metrics;

/// Publishes a device's event; its confirm (the device's `ack` or `nack`) comes back
/// through the session's in-flight queue. Why not, when it cannot be sent.
fn publish_event(gw: &Gateway, st: &mut State, ev: DeviceEvent) -> Result<(), String> {
    let id = ev.id.clone();
    let m =
        message::event(st.origin, ev, gw.broker.max_headers_bytes()).map_err(|e| e.to_string())?;
    let publish = gw.broker.publish(m);
    st.inflight.push_back(Box::pin(async move {
        let r = publish.await;
        match id {
            Some(id) => Done::Event(id.into(), r),
            None => Done::Quiet,
        }
    }));
    Ok(())
}

/// Publishes a device's answer to one of its pending requests; false when no
/// pending request has this id (expired ones are forgotten on the way).
fn publish_response(
    gw: &Gateway,
    st: &mut State,
    request_id: &str,
    status: &str,
    data: &serde_json::Value,
) -> bool {
    let now = Instant::now();
    let Some(i) = st
        .pending
        .iter()
        .position(|p| *p.id == *request_id && p.deadline > now)
    else {
        st.pending.retain(|p| p.deadline > now);
        return false;
    };
    let p = st.pending.swap_remove(i);
    if let Some(m) = message::response(st.origin, &p.reply_to, &p.id, status, data) {
        let publish = gw.broker.publish(m);
        st.inflight.push_back(Box::pin(async move {
            if let Err(e) = publish.await {
                tracing::warn!(error = %e, "response not confirmed");
            }
            Done::Quiet
        }));
    }
    true
}

/// Applies declared capabilities to the session and publishes the `registered`
/// lifecycle message; the frame to answer with.
fn register(
    gw: &Gateway,
    st: &State,
    declared: mosaic_protocol::fleet::Capabilities,
) -> Result<ServerFrame, mosaic_protocol::frame::FrameError> {
    let (frame, m) = crate::fleet::register(st.origin, &st.info, declared)?;
    gw.tracker.spawn(gw.broker.publish(m));
    Ok(frame)
}

/// A frame the rate limit still held when the session ended: an event is
/// published and a response answered like any other (the session's end waits for
/// their confirms); anything else needed an answer on the socket and is let go.
pub(super) fn handle_held(gw: &Gateway, st: &mut State, text: &str) {
    match ClientFrame::parse(text) {
        Ok(ClientFrame::Event(ev)) => {
            metrics::frame_in("event");
            if publish_event(gw, st, ev).is_err() {
                tracing::debug!("a held event was refused");
            }
        }
        Ok(ClientFrame::Response {
            request_id,
            status,
            data,
        }) => {
            metrics::frame_in("response");
            publish_response(gw, st, &request_id, &status, &data);
        }
        _ => {}
    }
}

/// Handles one frame from an authenticated device: its text, or `None` for a binary
/// frame (refused as a bad frame).
pub(super) async fn handle_text<S>(
    gw: &Arc<Gateway>,
    socket: &mut S,
    st: &mut State,
    exp: &mut u64,
    text: Option<Utf8Bytes>,
) -> Option<End>
where
    S: Sink<Message> + Unpin,
{
    let limits = &gw.limits;
    let parsed = match &text {
        Some(text) => ClientFrame::parse(text.as_str()),
        None => Err(binary_refused()),
    };
    let error = match parsed {
        Ok(ClientFrame::Event(ev)) => {
            metrics::frame_in("event");
            match publish_event(gw, st, ev) {
                Ok(()) => {
                    st.bad_frames = 0;
                    return None;
                }
                Err(e) => ServerFrame::error(code::BAD_FRAME, e),
            }
        }
        Ok(ClientFrame::Response {
            request_id,
            status,
            data,
        }) => {
            metrics::frame_in("response");
            if publish_response(gw, st, &request_id, &status, &data) {
                st.bad_frames = 0;
                return None;
            }
            ServerFrame::error(
                code::UNKNOWN_REQUEST,
                "no pending request with this id for this device",
            )
        }
        Ok(ClientFrame::Register(capabilities)) => {
            metrics::frame_in("register");
            match register(gw, st, capabilities) {
                Ok(f) => {
                    st.bad_frames = 0;
                    return if send(socket, &f, "registered", limits.pong_timeout).await {
                        None
                    } else {
                        Some(End::new(DisconnectReason::Error))
                    };
                }
                Err(e) => ServerFrame::error(e.code, e.message),
            }
        }
        Ok(ClientFrame::Renew) => {
            metrics::frame_in("renew");
            st.bad_frames = 0;
            st.inflight
                .push_back(super::enrolment::renew(gw, st.origin.device));
            return None;
        }
        Ok(ClientFrame::Enrol { .. }) => {
            metrics::frame_in("enrol");
            ServerFrame::error(
                code::BAD_FRAME,
                "already authenticated: send renew for a fresh token",
            )
        }
        Ok(ClientFrame::Auth {
            token,
            capabilities,
        }) => {
            metrics::frame_in("auth");
            return match gw.verify(&token) {
                Ok(i) if i.device == st.origin.device => {
                    st.bad_frames = 0;
                    *exp = i.exp;
                    st.control.set_issued_at(i.iat);
                    let f = ServerFrame::Welcome {
                        device: i.device,
                        session: st.origin.session,
                        expires_at: expires_at(i.exp),
                    };
                    if !send(socket, &f, "welcome", limits.pong_timeout).await {
                        return Some(End::new(DisconnectReason::Error));
                    }
                    if capabilities.is_empty() {
                        return None;
                    }
                    let f = match register(gw, st, capabilities) {
                        Ok(f) => f,
                        Err(e) => ServerFrame::error(e.code, e.message),
                    };
                    if send(socket, &f, "registered", limits.pong_timeout).await {
                        None
                    } else {
                        Some(End::new(DisconnectReason::Error))
                    }
                }
                Ok(_) => {
                    metrics::auth_failure("other_device");
                    tracing::info!("refresh token names another device");
                    Some(End::new(DisconnectReason::Forbidden))
                }
                Err(e) => {
                    metrics::auth_failure(e.as_str());
                    tracing::info!(reason = e.as_str(), "refresh token refused");
                    let f = ServerFrame::error(code::UNAUTHORIZED, e.to_string());
                    send(socket, &f, "error", limits.pong_timeout).await;
                    Some(End::with_close(
                        DisconnectReason::TokenExpired,
                        close::UNAUTHORIZED,
                        "unauthorized",
                    ))
                }
            };
        }
        Err(e) => {
            metrics::frame_in("bad");
            ServerFrame::error(e.code, e.message)
        }
    };
    if let ServerFrame::Error { code: c, .. } = &error
        && c != code::UNKNOWN_REQUEST
    {
        st.bad_frames += 1;
    }
    if !send(socket, &error, "error", limits.pong_timeout).await {
        return Some(End::new(DisconnectReason::Error));
    }
    if st.bad_frames >= limits.max_bad_frames {
        tracing::info!(
            bad_frames = st.bad_frames,
            "closing a device that keeps sending bad frames"
        );
        return Some(End::new(DisconnectReason::PolicyViolation));
    }
    None
}
