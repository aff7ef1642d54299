//! Messages from Hive towards devices, and the answers that come back.
//!
//! ## On `mosaic.commands`
//!
//! device-service publishes with routing key [`crate::exchange::device_key`] (or
//! [`crate::exchange::BROADCAST_KEY`]), `mandatory` and with publisher confirms, so a
//! message that no gateway queue takes comes back unroutable (HTTP 404). The body is
//! Hive's `data` as JSON bytes; the headers table holds `kind` ([`Kind`]), `id`,
//! `name`, Hive's extra fields and, on requests, `deadline`. A request also sets the
//! AMQP properties `reply_to` (the requesting replica's reply queue),
//! `correlation_id` (the request id) and `expiration` (its timeout).
//!
//! A gateway turns such a message into the device frame
//! `{"type":<kind>, ...headers without kind, "data":<body>}`.
//!
//! A [`Kind::Takeover`] message (headers `kind`, `device`, `session`, `gateway`) is
//! published by a gateway when a device authenticates, with the device's routing key,
//! straight to [`crate::exchange::COMMANDS_DEVICES`] (where the device bindings are;
//! going through the topic exchange would only add a topic match per connect): every
//! other gateway holding an *older* session of that device (sessions are UUIDv7, so
//! they order by time) closes it with 4409. It never reaches a device. A takeover
//! published to `mosaic.commands` works the same way.
//!
//! ## On the reply path
//!
//! A gateway answers a request by publishing to the default exchange with routing key
//! = the request's `reply_to` and `correlation_id` = the request id; headers `kind`
//! ([`ReplyKind`]), `device`, `session`, `gateway`, and `status` (for a response) or
//! `reason` (for an undeliverable request, one of [`undeliverable`]). The body is the
//! device's `data` as JSON bytes (`null` when undeliverable).

/// `kind` header on `mosaic.commands`.
///
/// `event` and `request` reach devices; the other kinds are the fleet's questions to
/// the gateways themselves and never reach a device (see [`crate::fleet`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Fire and forget: the device gets an `event` frame.
    Event,
    /// The device gets a `request` frame and must answer. With a `group.<name>` or
    /// `broadcast` key it is a scatter-gather request: each gateway first answers a
    /// [`ReplyKind::Fanout`] report naming the devices it asked.
    Request,
    /// Session control between gateways; never sent to a device.
    Takeover,
    /// "Is this device connected here?" (key `device.<uuid>`): answered
    /// [`ReplyKind::Presence`] by the gateway holding it.
    Presence,
    /// "End this device's session" (key `device.<uuid>`): the gateway closes it with
    /// 4410 and answers [`ReplyKind::Kicked`].
    Kick,
    /// "List your devices" (key `broadcast`): every gateway answers one page,
    /// [`ReplyKind::Listing`].
    List,
    /// "Announce yourself now" (key `broadcast`): every gateway publishes its
    /// announcement on `mosaic.fleet` at once (a device-service replica that starts
    /// learns the fleet without waiting a whole interval).
    Announce,
}

impl Kind {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Event => "event",
            Kind::Request => "request",
            Kind::Takeover => "takeover",
            Kind::Presence => "presence",
            Kind::Kick => "kick",
            Kind::List => "list",
            Kind::Announce => "announce",
        }
    }

    /// Parses a header value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "event" => Some(Kind::Event),
            "request" => Some(Kind::Request),
            "takeover" => Some(Kind::Takeover),
            "presence" => Some(Kind::Presence),
            "kick" => Some(Kind::Kick),
            "list" => Some(Kind::List),
            "announce" => Some(Kind::Announce),
            _ => None,
        }
    }
}

/// `kind` header on the reply path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// The device answered; `status` header and body carry its answer.
    Response,
    /// The request cannot be answered; the `reason` header says why.
    Undeliverable,
    /// Answer to [`Kind::Presence`]: the body is a [`crate::fleet::Presence`].
    Presence,
    /// Answer to [`Kind::Kick`]: the session is closing.
    Kicked,
    /// Answer to [`Kind::List`]: the body is a [`crate::fleet::Page`].
    Listing,
    /// A gateway's report on a scatter-gather request, sent before any device gets
    /// it: the body is a [`crate::fleet::FanoutReport`].
    Fanout,
}

impl ReplyKind {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyKind::Response => "response",
            ReplyKind::Undeliverable => "undeliverable",
            ReplyKind::Presence => "presence",
            ReplyKind::Kicked => "kicked",
            ReplyKind::Listing => "listing",
            ReplyKind::Fanout => "fanout",
        }
    }

    /// Parses a header value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "response" => Some(ReplyKind::Response),
            "undeliverable" => Some(ReplyKind::Undeliverable),
            "presence" => Some(ReplyKind::Presence),
            "kicked" => Some(ReplyKind::Kicked),
            "listing" => Some(ReplyKind::Listing),
            "fanout" => Some(ReplyKind::Fanout),
            _ => None,
        }
    }
}

/// `reason` values of an undeliverable reply.
pub mod undeliverable {
    /// The device disconnected while the request was pending.
    pub const DEVICE_DISCONNECTED: &str = "device_disconnected";
    /// The request reached a gateway that no longer holds the device.
    pub const DEVICE_NOT_CONNECTED: &str = "device_not_connected";
    /// The device's outbound queue was full (slow consumer), or it holds as many
    /// pending requests as it may.
    pub const DEVICE_BUSY: &str = "device_busy";
    /// The device declared its services, and the request's `name` is not among them.
    pub const SERVICE_NOT_SUPPORTED: &str = "service_not_supported";
}

/// Top-level names Hive may not use as extra fields of an event or request: the
/// gateway builds the device frame from them.
pub const RESERVED_FIELDS: [&str; 6] = ["type", "id", "name", "data", "kind", "deadline"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip() {
        for k in [
            Kind::Event,
            Kind::Request,
            Kind::Takeover,
            Kind::Presence,
            Kind::Kick,
            Kind::List,
            Kind::Announce,
        ] {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        for k in [
            ReplyKind::Response,
            ReplyKind::Undeliverable,
            ReplyKind::Presence,
            ReplyKind::Kicked,
            ReplyKind::Listing,
            ReplyKind::Fanout,
        ] {
            assert_eq!(ReplyKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Kind::parse("x"), None);
    }
}
