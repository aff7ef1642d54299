//! The fleet deliveries of a gateway replica: its announcements, and how it answers
//! device-service's fleet commands.
//!
//! - Announcements: every `FLEET_ANNOUNCE_MS`, at once when a group gains its first
//!   session here or loses its last, on each new broker link and when asked
//!   (`kind` `announce`), the replica publishes `gateway.<id>.up` on `mosaic.fleet`
//!   (an [`Announcement`]); at a clean shutdown, `gateway.<id>.down`.
//! - Fleet commands from `mosaic.commands` (see `mosaic_protocol::command::Kind`):
//!   `presence` and `kick` for one device, `list` (one page of this replica's
//!   devices), and scatter-gather `request`s to a group or to every device: the
//!   replica first publishes its [`FanoutReport`] (the devices it is about to ask,
//!   leaving out those whose declared services lack the request's name) and waits
//!   for its confirm, so the report reaches the requester before any answer; then
//!   each device gets the request. A device whose outbound queue is full is answered
//!   `undeliverable` `device_busy` on its behalf (it is not closed, as a burst must
//!   not disconnect a group).
//! - `gateway.<id>.lost` on `mosaic.fleet`: device-service declared this replica lost
//!   (it fell silent, a long broker outage) and published `disconnected` for its
//!   sessions; the replica publishes `connected` again (`resumed: true`) for every
//!   session it still holds.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::ShortString;
use mosaic_protocol::close::DisconnectReason;
use mosaic_protocol::command::{Kind, ReplyKind, undeliverable};
use mosaic_protocol::exchange::{self, Lifecycle};
use mosaic_protocol::fleet::{Announcement, Connected, FanoutReport, Page, Presence};
use mosaic_protocol::header;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;
use uuid::Uuid;

use super::frame;
use crate::fleet::connected_fields;
use crate::gateway::Gateway;
use crate::message::{self, Origin, Outgoing};
use crate::metrics;
use crate::registry::{Outbound, Pending, RequestOut, SessionHandle};

/// The largest page a `list` command gets.
pub(crate) const MAX_PAGE: usize = 1000;
/// Deadline of a fan-out request that carries neither `deadline` nor `expiration`.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a fan-out request is remembered.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);
/// `connected` messages published at once when the replica resumes its sessions.
const RESUME_CONCURRENCY: usize = 256;

/// How the fleet sees one session.
pub(crate) fn describe(gw: &Gateway, device: Uuid, h: &SessionHandle) -> Connected {
    let c = h.info.capabilities();
    Connected {
        device,
        gateway: gw.id,
        session: h.session,
        connected_at: message::rfc3339(h.info.connected_at),
        services: c.services,
        attributes: c.attributes,
        groups: h.info.groups.clone(),
    }
}

/// `reply_to` and the request id (the `id` header or `correlation_id`).
fn address(headers: &Map<String, Value>, d: &Delivery) -> Option<(String, String)> {
    let id = headers
        .get(header::ID)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| {
            d.properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string())
        })?;
    let reply_to = d.properties.reply_to().as_ref()?.to_string();
    Some((reply_to, id))
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("fleet bodies serialize")
}

fn send(gw: &Gateway, m: Option<Outgoing>) {
    if let Some(m) = m {
        gw.tracker.spawn(gw.broker.publish(m));
    }
}

/// `kind` `presence` for one device: answered with its session, or
/// `{"connected":false}`; not at all when the device just moved to another replica
/// (that one answers).
pub(crate) fn presence(
    gw: &Arc<Gateway>,
    device: Uuid,
    headers: &Map<String, Value>,
    d: &Delivery,
) {
    metrics::fleet_command("presence");
    let Some((reply_to, id)) = address(headers, d) else {
        tracing::debug!(%device, "presence question without reply address dropped");
        return;
    };
    let body = match gw.registry.get(device) {
        Some(h) => Presence {
            connected: true,
            session: Some(describe(gw, device, &h)),
        },
        None if gw.registry.moved_recently(device) => return,
        None => Presence {
            connected: false,
            session: None,
        },
    };
    send(
        gw,
        message::fleet_reply(
            ReplyKind::Presence,
            gw.id,
            Some(device),
            &reply_to,
            &id,
            json(&body),
        ),
    );
}

/// `kind` `kick` for one device: its session closes with 4410 (lifecycle reason
/// `kicked`) and the requester hears `kicked`; `device_not_connected` when no session
/// is held here (nothing when it just moved).
pub(crate) fn kick(gw: &Arc<Gateway>, device: Uuid, headers: &Map<String, Value>, d: &Delivery) {
    metrics::fleet_command("kick");
    let Some((reply_to, id)) = address(headers, d) else {
        tracing::debug!(%device, "kick without reply address dropped");
        return;
    };
    let m = match gw.registry.get(device) {
        Some(h) => {
            tracing::info!(%device, session = %h.session, "session kicked");
            h.control.close(DisconnectReason::Kicked);
            message::fleet_reply(
                ReplyKind::Kicked,
                gw.id,
                Some(device),
                &reply_to,
                &id,
                b"null".to_vec(),
            )
        }
        None if gw.registry.moved_recently(device) => return,
        None => message::undeliverable(
            device,
            None,
            gw.id,
            &reply_to,
            &id,
            undeliverable::DEVICE_NOT_CONNECTED,
        ),
    };
    send(gw, m);
}

/// Whether a session matches a listing's filters.
fn matches(h: &SessionHandle, group: Option<&str>, service: Option<&str>) -> bool {
    group.is_none_or(|g| h.info.groups.iter().any(|x| x == g))
        && service.is_none_or(|s| {
            h.info
                .capabilities
                .lock()
                .unwrap()
                .services
                .as_ref()
                .is_some_and(|list| list.iter().any(|x| x == s))
        })
}

/// One page of this replica's devices: ids after `after`, filtered, in id order.
pub(crate) fn page(
    gw: &Gateway,
    after: Option<Uuid>,
    limit: usize,
    group: Option<&str>,
    service: Option<&str>,
) -> Page {
    let entries = match group {
        Some(g) => gw.registry.members(g),
        None => gw.registry.entries(),
    };
    let mut picked: Vec<(Uuid, SessionHandle)> = entries
        .into_iter()
        .filter(|(d, h)| after.is_none_or(|a| *d > a) && matches(h, group, service))
        .collect();
    let limit = limit.clamp(1, MAX_PAGE);
    let more = picked.len() > limit;
    if more {
        picked.select_nth_unstable_by_key(limit, |(d, _)| *d);
        picked.truncate(limit);
    }
    picked.sort_unstable_by_key(|(d, _)| *d);
    Page {
        gateway: gw.id,
        devices: picked.iter().map(|(d, h)| describe(gw, *d, h)).collect(),
        more,
    }
}

/// `kind` `list`: answers one page (headers `after`, `limit`, `group`, `service`).
pub(crate) fn list(gw: &Arc<Gateway>, headers: &Map<String, Value>, d: &Delivery) {
    metrics::fleet_command("list");
    let Some((reply_to, id)) = address(headers, d) else {
        tracing::debug!("list without reply address dropped");
        return;
    };
    let after = headers
        .get(header::AFTER)
        .and_then(Value::as_str)
        .and_then(|s| Uuid::parse_str(s).ok());
    let limit = headers
        .get(header::LIMIT)
        .and_then(Value::as_u64)
        .map_or(MAX_PAGE, |n| n.min(MAX_PAGE as u64) as usize);
    let group = headers.get(header::GROUP).and_then(Value::as_str);
    let service = headers.get(header::SERVICE).and_then(Value::as_str);
    let body = page(gw, after, limit, group, service);
    send(
        gw,
        message::fleet_reply(ReplyKind::Listing, gw.id, None, &reply_to, &id, json(&body)),
    );
}

/// An event for every member of `group` held here; a member whose queue is full
/// misses it (counted), as with broadcasts.
pub(crate) fn group_event(gw: &Gateway, group: &str, text: axum::extract::ws::Utf8Bytes) {
    metrics::fleet_command("group_event");
    for (_, h) in gw.registry.members(group) {
        if let Err(TrySendError::Full(_)) = h.control.try_send(Outbound::Event(text.clone())) {
            metrics::broadcast_dropped();
        }
    }
}

/// The deadline of a fan-out request: its `deadline` header, else now + its
/// `expiration`, else the default; the frame gets `deadline` when the header had
/// none.
fn deadline_of(headers: &Map<String, Value>, d: &Delivery) -> (OffsetDateTime, bool) {
    let now = OffsetDateTime::now_utc();
    if let Some(t) = headers
        .get(header::DEADLINE)
        .and_then(Value::as_str)
        .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
    {
        return (t, false);
    }
    let expiration = d
        .properties
        .expiration()
        .as_ref()
        .and_then(|e| e.as_str().parse().ok())
        .map(Duration::from_millis);
    (
        now + expiration
            .unwrap_or(DEFAULT_REQUEST_TIMEOUT)
            .min(MAX_REQUEST_TIMEOUT),
        true,
    )
}

/// A scatter-gather request to `group` (or to every device here, `None`): report the
/// devices asked, wait for the report's confirm, then ask each of them.
pub(crate) fn fanout(
    gw: &Arc<Gateway>,
    group: Option<&str>,
    headers: Map<String, Value>,
    d: &Delivery,
) {
    metrics::fleet_command(if group.is_some() {
        "group_request"
    } else {
        "broadcast_request"
    });
    let Some((reply_to, id)) = address(&headers, d) else {
        tracing::debug!("fan-out request without reply address dropped");
        return;
    };
    let name = headers
        .get(header::NAME)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let targets: Vec<(Uuid, SessionHandle)> = match group {
        Some(g) => gw.registry.members(g),
        None => gw.registry.entries(),
    }
    .into_iter()
    .filter(|(_, h)| h.info.offers(&name))
    .collect();
    let (deadline_at, add_deadline) = deadline_of(&headers, d);
    let left = Duration::try_from(deadline_at - OffsetDateTime::now_utc())
        .unwrap_or(Duration::ZERO)
        .min(MAX_REQUEST_TIMEOUT);
    let text = frame(
        Kind::Request,
        headers,
        &d.data,
        add_deadline.then(|| message::rfc3339(deadline_at)),
    );
    let report = FanoutReport {
        gateway: gw.id,
        asked: targets.iter().map(|(d, _)| *d).collect(),
    };
    let Some(m) = message::fleet_reply(
        ReplyKind::Fanout,
        gw.id,
        None,
        &reply_to,
        &id,
        json(&report),
    ) else {
        return;
    };
    metrics::fanout_asked(targets.len());
    let gw2 = gw.clone();
    gw.tracker.spawn(async move {
        if let Err(e) = gw2.broker.publish(m).await {
            tracing::warn!(error = %e, request = %id, "fan-out report not confirmed; the request is not sent");
            return;
        }
        let deadline = Instant::now() + left;
        let id: Box<str> = id.into();
        let reply_to: Box<str> = reply_to.into();
        for (device, h) in targets {
            let out = Outbound::Request(Box::new(RequestOut {
                text: text.clone(),
                pending: Pending {
                    id: id.clone(),
                    reply_to: reply_to.clone(),
                    deadline,
                },
            }));
            let reason = match h.control.try_send(out) {
                Ok(()) => continue,
                Err(TrySendError::Full(_)) => undeliverable::DEVICE_BUSY,
                Err(TrySendError::Closed(_)) => undeliverable::DEVICE_DISCONNECTED,
            };
            send(
                &gw2,
                message::undeliverable(device, Some(h.session), gw2.id, &reply_to, &id, reason),
            );
        }
    });
}

/// A message from `mosaic.fleet` on this replica's queue: `gateway.<id>.lost` for
/// this replica.
pub(crate) fn on_fleet_message(gw: &Arc<Gateway>, d: &Delivery) {
    if d.routing_key.as_str() != exchange::gateway_lost_key(gw.id) {
        return;
    }
    metrics::fleet_command("resume");
    let entries = gw.registry.entries();
    tracing::warn!(
        sessions = entries.len(),
        "device-service declared this gateway lost; announcing its sessions again"
    );
    gw.fleet.announce_now();
    let gw2 = gw.clone();
    gw.tracker.spawn(async move {
        futures_util::stream::iter(entries)
            .map(|(device, h)| {
                let origin = Origin {
                    device,
                    session: h.session,
                    gateway: gw2.id,
                };
                let mut fields = connected_fields(&h.info);
                fields.insert(header::RESUMED.into(), true.into());
                gw2.broker.publish(message::lifecycle_with(
                    origin,
                    Lifecycle::Connected,
                    None,
                    fields,
                ))
            })
            .buffer_unordered(RESUME_CONCURRENCY)
            .for_each(|_| async {})
            .await;
    });
}

fn announcement(gw: &Gateway) -> Announcement {
    Announcement {
        gateway: gw.id,
        queue: gw.broker.queue().to_owned(),
        sessions: gw.registry.len() as u64,
        groups: gw.registry.group_counts().into_iter().collect(),
        interval_ms: gw.fleet.interval.as_millis() as u64,
        seq: gw.fleet.next_seq(),
        started_at: gw.fleet.started_at().to_owned(),
    }
}

fn on_fleet_exchange(gw: &Gateway, routing_key: String, body: Vec<u8>) -> Outgoing {
    // An announcement older than three intervals says nothing true any more.
    let ttl = (gw.fleet.interval * 3).as_millis().to_string();
    Outgoing {
        device: gw.id,
        exchange: exchange::FLEET,
        routing_key,
        mandatory: false,
        properties: BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_expiration(ShortString::from(ttl)),
        body,
    }
}

/// Publishes `gateway.<id>.up` every interval and whenever asked, until shutdown.
pub(crate) async fn announce(gw: Arc<Gateway>) {
    let mut groups = gw.broker.groups_changed();
    loop {
        let a = announcement(&gw);
        let m = on_fleet_exchange(&gw, exchange::gateway_up_key(gw.id), json(&a));
        if gw.broker.publish(m).await.is_ok() {
            metrics::announced();
        }
        tokio::select! {
            _ = tokio::time::sleep(gw.fleet.interval) => {}
            _ = gw.fleet.asked() => {}
            r = groups.changed() => if r.is_err() { return },
            _ = gw.shutdown.cancelled() => return,
        }
    }
}

/// Publishes `gateway.<id>.down` (at a clean shutdown, once the sessions are closed).
pub(crate) async fn announce_down(gw: &Gateway) {
    let mut a = announcement(gw);
    a.sessions = 0;
    a.groups.clear();
    let m = on_fleet_exchange(gw, exchange::gateway_down_key(gw.id), json(&a));
    if let Err(e) = gw.broker.publish(m).await {
        tracing::debug!(error = %e, "the down announcement was not confirmed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Control;
    use crate::registry::SessionInfo;
    use mosaic_protocol::fleet::Capabilities;

    fn gateway() -> Arc<Gateway> {
        Gateway::for_tests()
    }

    fn hold(gw: &Gateway, groups: &[&str], services: Option<&[&str]>) -> (Uuid, Arc<Control>) {
        let device = Uuid::new_v4();
        let control = Arc::new(Control::new(4));
        let caps = Capabilities {
            services: services.map(|s| s.iter().map(|x| x.to_string()).collect()),
            attributes: None,
        };
        gw.registry.insert(
            device,
            SessionHandle {
                session: Uuid::now_v7(),
                control: control.clone(),
                info: Arc::new(SessionInfo {
                    connected_at: time::OffsetDateTime::now_utc(),
                    groups: groups.iter().map(|g| g.to_string()).collect(),
                    capabilities: std::sync::Mutex::new(caps),
                }),
            },
        );
        (device, control)
    }

    #[test]
    fn pages_are_in_id_order_filtered_and_exact() {
        let gw = gateway();
        let mut held = Vec::new();
        for i in 0..25 {
            let groups: &[&str] = if i % 2 == 0 { &["even"] } else { &["odd"] };
            let services: Option<&[&str]> = if i % 5 == 0 { Some(&["reboot"]) } else { None };
            held.push(hold(&gw, groups, services));
        }
        let mut all: Vec<Uuid> = held.iter().map(|(d, _)| *d).collect();
        all.sort();
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let p = page(&gw, after, 7, None, None);
            seen.extend(p.devices.iter().map(|c| c.device));
            after = p.devices.last().map(|c| c.device);
            if !p.more {
                break;
            }
        }
        assert_eq!(seen, all);
        let even = page(&gw, None, 100, Some("even"), None);
        assert_eq!(even.devices.len(), 13);
        assert!(even.devices.iter().all(|c| c.groups == ["even"]));
        let reboot = page(&gw, None, 100, None, Some("reboot"));
        assert_eq!(reboot.devices.len(), 5);
        assert!(page(&gw, None, 100, Some("none"), None).devices.is_empty());
    }
}
