//! AMQP header names.
//!
//! On `mosaic.events` the headers table is the device's frame without `type` and
//! `data`, plus the fields the gateway injects ([`INJECTED`]). The body is `data` as
//! JSON bytes. device-service rebuilds Hive's JSON object from the two.

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

/// The names the gateway injects into every device message; a device may not send
/// them as top-level fields (error `reserved_field`).
pub const INJECTED: [&str; 6] = [DEVICE, SESSION, GATEWAY, MESSAGE_ID, RECEIVED_AT, KIND];

/// Whether a device may use `name` as a top-level frame field.
pub fn is_reserved(name: &str) -> bool {
    INJECTED.contains(&name)
}

/// Whether RabbitMQ itself reads a header of this name: `CC` and `BCC` add routing
/// keys, and names starting `x-` drive broker features (dead-lettering, delays,
/// the headers exchange). Any letter case: a name that differs only in case from
/// one the broker reads is refused too. No field a device or Hive supplies may
/// carry such a name.
pub fn is_broker_interpreted(name: &str) -> bool {
    name.eq_ignore_ascii_case("cc")
        || name.eq_ignore_ascii_case("bcc")
        || name.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("x-"))
}

/// `kind` of a device event on `mosaic.events`.
pub const KIND_EVENT: &str = "event";
/// `kind` of a lifecycle message on `mosaic.events`.
pub const KIND_LIFECYCLE: &str = "lifecycle";
