//! AMQP header names.
//!
//! On `mosaic.events` the headers table is the device's frame without `type` and
//! `data`, plus the fields the gateway injects ([`INJECTED`]). The body is `data` as
//! JSON bytes. device-service rebuilds Hive's JSON object from the two.
//!
//! Header names are ours, with limits: RabbitMQ reads some names itself
//! ([`is_broker_reserved`]), and a headers table must fit one AMQP content-header
//! frame (the services check the encoded table against their connection's
//! `frame_max`). [`check_extra`] applies the rules on the fields a device or Hive
//! supplies.

use serde_json::{Map, Value};

/// The device's UUID.
pub const DEVICE: &str = "device";
/// The session's UUID (UUIDv7, so later sessions sort after earlier ones).
pub const SESSION: &str = "session";
/// The id of the websocket-service replica that holds the session.
pub const GATEWAY: &str = "gateway";
/// The message's identity end to end (see [`crate::message_id`]).
pub const MESSAGE_ID: &str = "message_id";
/// When the gateway received the frame, RFC 3339 with microseconds, UTC.
pub const RECEIVED_AT: &str = "received_at";
/// What the message is: see [`crate::command::Kind`] and the `kind` values on events.
pub const KIND: &str = "kind";
/// The event, request or lifecycle name.
pub const NAME: &str = "name";
/// The id the device gave an event, or the id of a command sent to a device.
pub const ID: &str = "id";
/// Why a session ended (lifecycle `disconnected`), or why a request failed.
pub const REASON: &str = "reason";
/// How long a session lasted, in milliseconds (lifecycle `disconnected`).
pub const DURATION_MS: &str = "duration_ms";
/// The device's answer status on a response.
pub const STATUS: &str = "status";
/// A request's deadline, RFC 3339.
pub const DEADLINE: &str = "deadline";
/// The services a device declared (lifecycle `connected` and `registered`).
pub const SERVICES: &str = "services";
/// The attributes a device declared (lifecycle `connected` and `registered`).
pub const ATTRIBUTES: &str = "attributes";
/// The groups of a device's session (lifecycle `connected`).
pub const GROUPS: &str = "groups";
/// When the session began, RFC 3339 (lifecycle messages of device-service).
pub const CONNECTED_AT: &str = "connected_at";
/// A fleet command's paging cursor: list devices after this id.
pub const AFTER: &str = "after";
/// A fleet command's page size.
pub const LIMIT: &str = "limit";
/// A fleet command's group filter (or the group a fan-out targets).
pub const GROUP: &str = "group";
/// A fleet command's service filter.
pub const SERVICE: &str = "service";
/// A lifecycle `connected` message sent again for a session that had been declared
/// lost (`true`), see `docs/fleet.md`.
pub const RESUMED: &str = "resumed";

/// The names the gateway injects into every device message; a device may not send
/// them as top-level fields (error `reserved_field`).
pub const INJECTED: [&str; 6] = [DEVICE, SESSION, GATEWAY, MESSAGE_ID, RECEIVED_AT, KIND];

/// Whether a device may use `name` as a top-level frame field.
pub fn is_reserved(name: &str) -> bool {
    INJECTED.contains(&name)
}

/// Whether RabbitMQ itself reads a header of this name, so that a device or Hive
/// may not supply it: `CC` and `BCC` (extra routing keys; a `CC` that is not an array
/// of strings closes the publishing channel) and every name starting `x-` (broker
/// features), in any letter case.
///
/// ```
/// use mosaic_protocol::header::is_broker_reserved;
/// assert!(is_broker_reserved("CC") && is_broker_reserved("bcc"));
/// assert!(is_broker_reserved("x-death") && is_broker_reserved("X-Match"));
/// assert!(!is_broker_reserved("ccx") && !is_broker_reserved("x_death"));
/// ```
pub fn is_broker_reserved(name: &str) -> bool {
    name.eq_ignore_ascii_case("cc")
        || name.eq_ignore_ascii_case("bcc")
        || name
            .get(..2)
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case("x-"))
}

/// Largest size of the extra fields of one device frame or REST body, as compact
/// JSON text (`bad_frame`; 413 on REST).
pub const MAX_EXTRA_JSON_BYTES: usize = 64 * 1024;

/// Why the extra fields of a frame or body were refused by [`check_extra`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExtraError {
    /// A name RabbitMQ reads itself (see [`is_broker_reserved`]).
    #[error(
        "field `{0}` is reserved: RabbitMQ reads `CC`, `BCC` and `x-` names itself (in any letter case)"
    )]
    BrokerReserved(String),
    /// Over [`MAX_EXTRA_JSON_BYTES`].
    #[error(
        "the extra fields take {len} bytes as JSON text; at most {MAX_EXTRA_JSON_BYTES} are allowed"
    )]
    TooLarge {
        /// Their size as compact JSON text.
        len: usize,
    },
}

/// Checks the extra (pass-through) fields of a device frame or a REST body: no name
/// RabbitMQ reads itself, and at most [`MAX_EXTRA_JSON_BYTES`] of JSON text.
///
/// The size of the headers table built from them is checked separately, against the
/// connection's frame size, once the table exists.
pub fn check_extra(extra: &Map<String, Value>) -> Result<(), ExtraError> {
    if let Some(name) = extra.keys().find(|k| is_broker_reserved(k)) {
        return Err(ExtraError::BrokerReserved(quote_name(name)));
    }
    let len = crate::json::text_len(extra);
    if len > MAX_EXTRA_JSON_BYTES {
        return Err(ExtraError::TooLarge { len });
    }
    Ok(())
}

/// A field name for an error message: at most 64 characters.
fn quote_name(name: &str) -> String {
    match name.char_indices().nth(64) {
        Some((i, _)) => format!("{}…", &name[..i]),
        None => name.to_owned(),
    }
}

/// `kind` of a device event on `mosaic.events`.
pub const KIND_EVENT: &str = "event";
/// `kind` of a lifecycle message on `mosaic.events`.
pub const KIND_LIFECYCLE: &str = "lifecycle";
