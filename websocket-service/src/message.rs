//! The AMQP messages the gateway publishes: device events, lifecycle messages,
//! takeovers and answers to requests. Pure functions, no I/O.

use lapin::BasicProperties;
use lapin::types::ShortString;
use mosaic_protocol::close::DisconnectReason;
use mosaic_protocol::command::{Kind, ReplyKind};
use mosaic_protocol::exchange::{self, Lifecycle};
use mosaic_protocol::frame::DeviceEvent;
use mosaic_protocol::header;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use uuid::Uuid;

/// A message ready for `basic_publish`.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    /// The device the message is about: picks the publish channel, so everything
    /// about one device keeps its order.
    pub device: Uuid,
    pub exchange: &'static str,
    pub routing_key: String,
    /// Whether a message no queue takes comes back (and fails the publish).
    pub mandatory: bool,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

/// Who sent a message: the ids every message of a session carries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin {
    pub device: Uuid,
    pub session: Uuid,
    pub gateway: Uuid,
}

impl Origin {
    fn headers(&self, kind: &str) -> Map<String, Value> {
        let mut h = Map::new();
        h.insert(header::KIND.into(), kind.into());
        h.insert(header::DEVICE.into(), self.device.to_string().into());
        h.insert(header::SESSION.into(), self.session.to_string().into());
        h.insert(header::GATEWAY.into(), self.gateway.to_string().into());
        h
    }
}

/// Now, RFC 3339 in UTC with microseconds: `2026-01-02T03:04:05.123456Z`.
pub(crate) fn now_rfc3339() -> String {
    rfc3339(OffsetDateTime::now_utc())
}

/// `t` as RFC 3339 in UTC with microseconds, always six digits (sortable text).
pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

fn json_body(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("JSON values always serialize")
}

fn persistent(message_id: Uuid) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
        .with_message_id(ShortString::from(message_id.to_string()))
        .with_timestamp(OffsetDateTime::now_utc().unix_timestamp().max(0) as u64)
}

/// Why a device event cannot be published (the device gets `bad_frame`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum EventError {
    /// A field name does not fit an AMQP table (over 255 bytes), or nesting is too deep.
    #[error(transparent)]
    Table(#[from] amqp_value_json::Error),
    /// The headers table would not fit one AMQP frame: the broker would close the
    /// connection over it.
    #[error(
        "the event's fields take {len} bytes as AMQP headers; at most {max} fit in one message header"
    )]
    TableTooLarge { len: usize, max: usize },
}

/// A device event for `mosaic.events`: headers are the frame without `type` and
/// `data` plus the injected names; the body is `data`. Fails when a field name does
/// not fit an AMQP table (over 255 bytes), nesting is too deep, or the table would
/// be larger than `max_table_bytes` on the wire.
pub(crate) fn event(
    origin: Origin,
    ev: DeviceEvent,
    max_table_bytes: usize,
) -> Result<Outgoing, EventError> {
    let message_id = mosaic_protocol::message_id(origin.device, ev.id.as_deref());
    let routing_key = exchange::event_key(origin.device, &ev.name);
    let mut h = ev.extra;
    h.insert(header::NAME.into(), ev.name.into());
    if let Some(id) = ev.id {
        h.insert(header::ID.into(), id.into());
    }
    h.extend(origin.headers(header::KIND_EVENT));
    h.insert(header::MESSAGE_ID.into(), message_id.to_string().into());
    h.insert(header::RECEIVED_AT.into(), now_rfc3339().into());
    let table = amqp_value_json::to_field_table(&h)?;
    let len = amqp_value_json::encoded_len(&table);
    if len > max_table_bytes {
        return Err(EventError::TableTooLarge {
            len,
            max: max_table_bytes,
        });
    }
    Ok(Outgoing {
        device: origin.device,
        exchange: exchange::EVENTS,
        routing_key,
        // A device hears `ack` only when a queue took its event.
        mandatory: true,
        properties: persistent(message_id).with_headers(table),
        body: json_body(&ev.data),
    })
}

/// A lifecycle message; `ended` carries the reason and duration of a disconnect.
pub(crate) fn lifecycle(
    origin: Origin,
    event: Lifecycle,
    ended: Option<(DisconnectReason, u64)>,
) -> Outgoing {
    lifecycle_with(origin, event, ended, Map::new())
}

/// A lifecycle message with more fields (`services`, `attributes`, `groups`): they
/// were checked to map to an AMQP table ([`crate::fleet::check`]).
pub(crate) fn lifecycle_with(
    origin: Origin,
    event: Lifecycle,
    ended: Option<(DisconnectReason, u64)>,
    fields: Map<String, Value>,
) -> Outgoing {
    let message_id = Uuid::now_v7();
    let mut h = fields;
    h.extend(origin.headers(header::KIND_LIFECYCLE));
    h.insert(header::NAME.into(), event.as_str().into());
    h.insert(header::MESSAGE_ID.into(), message_id.to_string().into());
    h.insert(header::RECEIVED_AT.into(), now_rfc3339().into());
    if let Some((reason, ms)) = ended {
        h.insert(header::REASON.into(), reason.as_str().into());
        h.insert(header::DURATION_MS.into(), ms.into());
    }
    Outgoing {
        device: origin.device,
        exchange: exchange::EVENTS,
        routing_key: exchange::lifecycle_key(origin.device, event),
        mandatory: true,
        properties: persistent(message_id).with_headers(
            amqp_value_json::to_field_table(&h).expect("lifecycle headers always fit"),
        ),
        body: b"null".to_vec(),
    }
}

/// The takeover notice other replicas react to (see `mosaic_protocol::command`).
pub(crate) fn takeover(origin: Origin) -> Outgoing {
    let h = origin.headers(Kind::Takeover.as_str());
    Outgoing {
        device: origin.device,
        exchange: exchange::COMMANDS_DEVICES,
        routing_key: exchange::device_key(origin.device),
        mandatory: false,
        properties: BasicProperties::default().with_headers(
            amqp_value_json::to_field_table(&h).expect("takeover headers always fit"),
        ),
        body: b"null".to_vec(),
    }
}

/// A device's answer to a request, for the requester's reply queue.
pub(crate) fn response(
    origin: Origin,
    reply_to: &str,
    request_id: &str,
    status: &str,
    data: &Value,
) -> Option<Outgoing> {
    let mut h = origin.headers(ReplyKind::Response.as_str());
    h.insert(header::STATUS.into(), status.into());
    reply(origin.device, h, reply_to, request_id, json_body(data))
}

/// An answer of the gateway itself to a fleet command (presence, kick, listing,
/// fan-out report), for the requester's reply queue; the body is JSON.
pub(crate) fn fleet_reply(
    kind: ReplyKind,
    gateway: Uuid,
    device: Option<Uuid>,
    reply_to: &str,
    request_id: &str,
    body: Vec<u8>,
) -> Option<Outgoing> {
    let mut h = Map::new();
    h.insert(header::KIND.into(), kind.as_str().into());
    h.insert(header::GATEWAY.into(), gateway.to_string().into());
    if let Some(d) = device {
        h.insert(header::DEVICE.into(), d.to_string().into());
    }
    reply(device.unwrap_or(gateway), h, reply_to, request_id, body)
}

/// "This request cannot be answered", for the requester's reply queue.
pub(crate) fn undeliverable(
    device: Uuid,
    session: Option<Uuid>,
    gateway: Uuid,
    reply_to: &str,
    request_id: &str,
    reason: &str,
) -> Option<Outgoing> {
    let mut h = Map::new();
    h.insert(
        header::KIND.into(),
        ReplyKind::Undeliverable.as_str().into(),
    );
    h.insert(header::DEVICE.into(), device.to_string().into());
    if let Some(s) = session {
        h.insert(header::SESSION.into(), s.to_string().into());
    }
    h.insert(header::GATEWAY.into(), gateway.to_string().into());
    h.insert(header::REASON.into(), reason.into());
    reply(device, h, reply_to, request_id, b"null".to_vec())
}

pub(crate) fn reply(
    device: Uuid,
    h: Map<String, Value>,
    reply_to: &str,
    request_id: &str,
    body: Vec<u8>,
) -> Option<Outgoing> {
    let correlation = ShortString::try_new(request_id.to_owned()).ok()?;
    Some(Outgoing {
        device,
        exchange: "",
        routing_key: reply_to.to_owned(),
        // A requester that is gone has nobody to tell.
        mandatory: false,
        properties: BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_correlation_id(correlation)
            .with_headers(amqp_value_json::to_field_table(&h).ok()?),
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn origin() -> Origin {
        Origin {
            device: Uuid::new_v4(),
            session: Uuid::now_v7(),
            gateway: Uuid::new_v4(),
        }
    }

    #[test]
    fn an_event_carries_its_frame_in_headers_and_data_in_the_body() {
        let o = origin();
        let mut extra = Map::new();
        extra.insert("unit".into(), json!("C"));
        let ev = DeviceEvent {
            name: "temp".into(),
            data: json!({"c": 21.5}),
            id: Some("7".into()),
            extra,
        };
        let m = event(o, ev, mosaic_amqp::max_headers_bytes(0)).unwrap();
        assert_eq!(m.routing_key, format!("event.{}.temp", o.device));
        assert_eq!(m.body, br#"{"c":21.5}"#);
        let h =
            amqp_value_json::from_field_table(m.properties.headers().as_ref().unwrap()).unwrap();
        assert_eq!(h["unit"], "C");
        assert_eq!(h["name"], "temp");
        assert_eq!(h["id"], "7");
        assert_eq!(h["kind"], "event");
        assert_eq!(h["device"], o.device.to_string());
        let mid = mosaic_protocol::message_id(o.device, Some("7")).to_string();
        assert_eq!(h["message_id"], mid);
        assert_eq!(m.properties.message_id().as_ref().unwrap().as_str(), mid);
        assert_eq!(*m.properties.delivery_mode(), Some(2));
    }

    #[test]
    fn an_event_whose_headers_would_not_fit_one_frame_is_refused() {
        // 20,000 small numbers: 40 KB of JSON, 180 KB of AMQP.
        let mut extra = Map::new();
        extra.insert("n".into(), json!(vec![7; 20_000]));
        let ev = |extra| DeviceEvent {
            name: "big".into(),
            data: Value::Null,
            id: None,
            extra,
        };
        let err = event(origin(), ev(extra), mosaic_amqp::max_headers_bytes(0)).unwrap_err();
        assert!(
            matches!(err, EventError::TableTooLarge { len, .. } if len > 180_000),
            "{err}"
        );
        // The limit is the caller's: the same event fits a larger one.
        let mut extra = Map::new();
        extra.insert("n".into(), json!(vec![7; 20_000]));
        let m = event(origin(), ev(extra), 1 << 20).unwrap();
        let table = m.properties.headers().as_ref().unwrap();
        assert!(amqp_value_json::encoded_len(table) > mosaic_amqp::max_headers_bytes(0));
    }

    #[test]
    fn a_disconnect_says_why_and_how_long() {
        let m = lifecycle(
            origin(),
            Lifecycle::Disconnected,
            Some((DisconnectReason::Replaced, 1234)),
        );
        let h =
            amqp_value_json::from_field_table(m.properties.headers().as_ref().unwrap()).unwrap();
        assert_eq!(h["reason"], "replaced");
        assert_eq!(h["duration_ms"], 1234);
        assert_eq!(h["kind"], "lifecycle");
        assert_eq!(h["name"], "disconnected");
    }

    #[test]
    fn timestamps_have_six_fraction_digits() {
        let t = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.000000Z");
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_012_345_999).unwrap();
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.012345Z");
        let s = now_rfc3339();
        assert_eq!(s.len(), "2023-11-14T22:13:20.000000Z".len(), "{s}");
    }
}
