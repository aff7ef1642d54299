//! What this replica receives from RabbitMQ: commands from its queue, delivered to
//! the sessions they name; the fleet's messages (`fleet`); the revocation stream
//! (`revocations`).
//!
//! `kind` `event` or `request` becomes the device frame
//! `{"type":<kind>, ...headers without kind, "data":<body>}` in the session's bounded
//! outbound queue; routing key `broadcast` reaches every session here. A full queue
//! closes the session with 4429 (slow consumer) instead of buffering more, except
//! for a broadcast event, which a device with a full queue misses (counted in
//! `mosaic_ws_broadcast_dropped_total`): a burst of broadcasts must not disconnect
//! the fleet. A request that finds no session here, or a full queue, is answered
//! `undeliverable` at once.
//! `kind` `takeover` closes an older local session of the device with 4409.
//!
//! The fleet's kinds (`presence`, `kick`, `list`, `announce`), the `group.<name>`
//! routing key and scatter-gather requests (`request` with `group.<name>` or
//! `broadcast`) are handled by [`fleet`], as are messages from `mosaic.fleet`.

pub(crate) mod fleet;
pub(crate) mod revocations;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use lapin::message::Delivery;
use mosaic_amqp::Incoming;
use mosaic_protocol::close::DisconnectReason;
use mosaic_protocol::command::{Kind, undeliverable};
use mosaic_protocol::{exchange, header};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;
use uuid::Uuid;

use crate::gateway::Gateway;
use crate::message;
use crate::metrics;
use crate::registry::{Outbound, Pending, RequestOut, SessionHandle};

/// Deadline of a request that carries neither `deadline` nor `expiration`.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a request is remembered, whatever its deadline says.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);

fn header_str<'a>(h: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    h.get(name).and_then(Value::as_str)
}

fn header_uuid(h: &Map<String, Value>, name: &str) -> Option<Uuid> {
    header_str(h, name).and_then(|s| Uuid::parse_str(s).ok())
}

/// Delivers the replica's commands until the broker side ends. Each is queued for
/// its session or answered (dispatch never blocks), then acked: acking is what lets
/// the next one come. The ack is bounded: one that came on a link just lost must not
/// stop the loop (the commands of the next link would wait behind it forever).
pub(crate) async fn run(gw: Arc<Gateway>, mut commands: mpsc::Receiver<Incoming>) {
    while let Some(c) = commands.recv().await {
        dispatch(&gw, &c.delivery);
        if !c.ack().await {
            tracing::debug!("a command's ack did not go out; its link is gone");
        }
    }
}

/// Handles one delivery from the replica queue. Never blocks.
pub(crate) fn dispatch(gw: &Arc<Gateway>, d: &Delivery) {
    if d.exchange.as_str() == exchange::FLEET {
        fleet::on_fleet_message(gw, d);
        return;
    }
    let headers = match d.properties.headers().as_ref() {
        Some(t) => match amqp_value_json::from_field_table(t) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "command with unreadable headers dropped");
                return;
            }
        },
        None => Map::new(),
    };
    if header_str(&headers, header::KIND) == Some(mosaic_protocol::registry::KIND_RPC_REPLY) {
        // device-service's answer to an enrol or renew of this replica.
        gw.rpc.answer(d);
        return;
    }
    let Some(kind) = header_str(&headers, header::KIND).and_then(Kind::parse) else {
        tracing::warn!(routing_key = %d.routing_key, "command without a known kind dropped");
        return;
    };
    let key = d.routing_key.as_str();
    if let Some(group) = key.strip_prefix("group.") {
        match kind {
            Kind::Event => {
                let text = frame(kind, headers, &d.data, None);
                fleet::group_event(gw, group, text);
            }
            Kind::Request => fleet::fanout(gw, Some(group), headers, d),
            _ => tracing::warn!(routing_key = %key, "group command of an unexpected kind dropped"),
        }
        return;
    }
    let target = if key == exchange::BROADCAST_KEY {
        None
    } else if let Some(device) = key
        .strip_prefix("device.")
        .and_then(|s| Uuid::parse_str(s).ok())
    {
        Some(device)
    } else {
        tracing::warn!(routing_key = %key, "command with an unexpected routing key dropped");
        return;
    };
    match (kind, target) {
        (Kind::Presence, Some(device)) => return fleet::presence(gw, device, &headers, d),
        (Kind::Kick, Some(device)) => return fleet::kick(gw, device, &headers, d),
        (Kind::List, None) => return fleet::list(gw, &headers, d),
        (Kind::Announce, None) => return gw.fleet.announce_now(),
        (Kind::Request, None) => return fleet::fanout(gw, None, headers, d),
        (Kind::Presence | Kind::Kick | Kind::List | Kind::Announce, _) => {
            tracing::warn!(routing_key = %key, kind = kind.as_str(), "fleet command with an unexpected routing key dropped");
            return;
        }
        _ => {}
    }
    match kind {
        Kind::Takeover => takeover(gw, &headers, target),
        Kind::Event => {
            let text = frame(kind, headers, &d.data, None);
            match target {
                Some(device) => {
                    if let Some(h) = gw.registry.get(device) {
                        let _ = offer(&h, Outbound::Event(text));
                    }
                }
                None => {
                    // A broadcast burst must not close the fleet as slow consumers:
                    // a device whose queue is full misses this one, counted.
                    for h in gw.registry.handles() {
                        if let Err(TrySendError::Full(_)) =
                            h.control.try_send(Outbound::Event(text.clone()))
                        {
                            metrics::broadcast_dropped();
                        }
                    }
                }
            }
        }
        Kind::Request => {
            if let Some(device) = target {
                request(gw, device, headers, d);
            }
        }
        Kind::Presence | Kind::Kick | Kind::List | Kind::Announce => {}
    }
}

fn takeover(gw: &Arc<Gateway>, headers: &Map<String, Value>, target: Option<Uuid>) {
    let (Some(device), Some(session)) = (target, header_uuid(headers, header::SESSION)) else {
        return;
    };
    if header_uuid(headers, header::GATEWAY) == Some(gw.id) {
        return;
    }
    let Some(h) = gw.registry.get(device) else {
        return;
    };
    if h.session < session {
        tracing::info!(%device, session = %h.session, newer = %session, "session replaced on another gateway");
        h.control.close(DisconnectReason::Replaced);
    } else if h.session > session {
        // An older session elsewhere announced itself after ours: it may have bound its
        // queue too late to hear our takeover, so announce ours again.
        let origin = message::Origin {
            device,
            session: h.session,
            gateway: gw.id,
        };
        gw.tracker
            .spawn(gw.broker.publish(message::takeover(origin)));
    }
}

/// The device frame of a command: `{"type":<kind>, ...headers without kind,
/// "deadline"?, "data":<body>}`.
pub(crate) fn frame(
    kind: Kind,
    headers: Map<String, Value>,
    body: &[u8],
    deadline: Option<String>,
) -> Utf8Bytes {
    let mut obj = Map::new();
    obj.insert("type".into(), kind.as_str().into());
    for (k, v) in headers {
        if k != header::KIND {
            obj.insert(k, v);
        }
    }
    if let Some(deadline) = deadline {
        obj.insert(header::DEADLINE.into(), deadline.into());
    }
    let data = serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
    obj.insert("data".into(), data);
    Utf8Bytes::from(Value::Object(obj).to_string())
}

/// Queues `out` for the session; a full queue closes it as a slow consumer.
fn offer(h: &SessionHandle, out: Outbound) -> Result<(), &'static str> {
    match h.control.try_send(out) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(_)) => {
            h.control.close(DisconnectReason::SlowConsumer);
            Err(undeliverable::DEVICE_BUSY)
        }
        Err(TrySendError::Closed(_)) => Err(undeliverable::DEVICE_DISCONNECTED),
    }
}

/// Queues a request for its session, or answers it `undeliverable`; returns the
/// reason when it did the latter.
fn request(
    gw: &Arc<Gateway>,
    device: Uuid,
    headers: Map<String, Value>,
    d: &Delivery,
) -> Option<&'static str> {
    let id = header_str(&headers, header::ID)
        .map(str::to_owned)
        .or_else(|| {
            d.properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string())
        });
    let reply_to = d.properties.reply_to().as_ref().map(|r| r.to_string());
    let (Some(id), Some(reply_to)) = (id, reply_to) else {
        tracing::warn!(%device, "request without id or reply_to dropped");
        return None;
    };
    let now = OffsetDateTime::now_utc();
    let header_deadline = header_str(&headers, header::DEADLINE)
        .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok());
    // The device frame always carries a `deadline`: the header's when it has a valid
    // one, else the one derived here. `expiration` is capped before the addition,
    // which panics on overflow.
    let add_deadline = header_deadline.is_none();
    let deadline_at = header_deadline.unwrap_or_else(|| {
        let expiration = d
            .properties
            .expiration()
            .as_ref()
            .and_then(|e| e.as_str().parse().ok())
            .map(Duration::from_millis);
        now + expiration
            .unwrap_or(DEFAULT_REQUEST_TIMEOUT)
            .min(MAX_REQUEST_TIMEOUT)
    });
    let left = Duration::try_from(deadline_at - now)
        .unwrap_or(Duration::ZERO)
        .min(MAX_REQUEST_TIMEOUT);
    let answer = |reason: &'static str| {
        if let Some(m) = message::undeliverable(device, None, gw.id, &reply_to, &id, reason) {
            gw.tracker.spawn(gw.broker.publish(m));
        }
        Some(reason)
    };
    let Some(h) = gw.registry.get(device) else {
        if gw.registry.moved_recently(device) {
            // Its new replica got this request too and answers it.
            tracing::debug!(%device, "request for a device that moved to another gateway");
            return None;
        }
        return answer(undeliverable::DEVICE_NOT_CONNECTED);
    };
    // A device that declared its services gets only requests for them; the gateway
    // refuses the others at once.
    if let Some(name) = header_str(&headers, header::NAME)
        && !h.info.offers(name)
    {
        return answer(undeliverable::SERVICE_NOT_SUPPORTED);
    }
    let text = frame(
        Kind::Request,
        headers,
        &d.data,
        add_deadline.then(|| message::rfc3339(deadline_at)),
    );
    let out = Outbound::Request(Box::new(RequestOut {
        text,
        pending: Pending {
            id: id.clone().into(),
            reply_to: reply_to.clone().into(),
            deadline: Instant::now() + left,
        },
    }));
    match offer(&h, out) {
        Ok(()) => None,
        Err(reason) => answer(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Control, SessionHandle};
    use lapin::BasicProperties;
    use serde_json::json;

    fn gateway() -> Arc<Gateway> {
        Gateway::for_tests()
    }

    fn delivery(device: Uuid) -> (Map<String, Value>, Delivery) {
        let mut d = Delivery::mock(
            1,
            "mosaic.commands".into(),
            format!("device.{device}").into(),
            false,
            b"{}".to_vec(),
        );
        d.properties = BasicProperties::default()
            .with_reply_to("replies".into())
            .with_correlation_id("r-1".into());
        let h = json!({"kind":"request","id":"r-1","name":"read"});
        (h.as_object().unwrap().clone(), d)
    }

    #[tokio::test]
    async fn requests_that_cannot_reach_their_device_are_answered() {
        let gw = gateway();
        let device = Uuid::new_v4();
        let (h, d) = delivery(device);
        assert_eq!(
            request(&gw, device, h.clone(), &d),
            Some(undeliverable::DEVICE_NOT_CONNECTED)
        );
        // A device that just moved to another replica: that replica answers.
        gw.registry.mark_moved(device);
        assert_eq!(request(&gw, device, h.clone(), &d), None);

        // A session whose queue is full: `device_busy`, and it is closed.
        let control = Arc::new(Control::new(1));
        let handle = SessionHandle {
            session: Uuid::now_v7(),
            control: control.clone(),
            info: Arc::default(),
        };
        gw.registry.insert(device, handle);
        assert_eq!(request(&gw, device, h.clone(), &d), None);
        assert_eq!(
            request(&gw, device, h.clone(), &d),
            Some(undeliverable::DEVICE_BUSY)
        );
        assert_eq!(control.closed().await, DisconnectReason::SlowConsumer);
        let Some(Outbound::Request(req)) = control.close_queue().pop_front() else {
            panic!("the first request was queued");
        };
        assert_eq!(&*req.pending.reply_to, "replies");
        let frame: Value = serde_json::from_str(req.text.as_str()).unwrap();
        assert_eq!(frame["type"], "request");
        assert!(frame["deadline"].as_str().is_some());
    }

    #[tokio::test]
    async fn an_expiration_alone_gives_a_capped_deadline() {
        let gw = gateway();
        let device = Uuid::new_v4();
        let (h, mut d) = delivery(device);
        // No `deadline` header, and an `expiration` no clock can add.
        d.properties = d.properties.with_expiration(u64::MAX.to_string().into());
        let control = Arc::new(Control::new(1));
        let handle = SessionHandle {
            session: Uuid::now_v7(),
            control: control.clone(),
            info: Arc::default(),
        };
        gw.registry.insert(device, handle);
        assert_eq!(request(&gw, device, h, &d), None);
        let Some(Outbound::Request(req)) = control.close_queue().pop_front() else {
            panic!("the request was queued");
        };
        assert!(req.pending.deadline <= Instant::now() + MAX_REQUEST_TIMEOUT);
        let frame: Value = serde_json::from_str(req.text.as_str()).unwrap();
        assert!(frame["deadline"].as_str().is_some(), "{frame}");
    }

    #[test]
    fn a_command_becomes_a_device_frame() {
        let headers = json!({"kind":"event","id":"u1","name":"reboot","prio":3});
        let text = frame(
            Kind::Event,
            headers.as_object().unwrap().clone(),
            br#"{"in":5}"#,
            None,
        );
        let v: Value = serde_json::from_str(text.as_str()).unwrap();
        assert_eq!(
            v,
            json!({"type":"event","id":"u1","name":"reboot","prio":3,"data":{"in":5}})
        );
    }
}
