//! The Mosaic gateway's wire vocabulary, shared by every part that speaks it.
//!
//! # Layout
//!
//! - [`exchange`]: the two RabbitMQ exchanges and their routing-key builders.
//! - [`header`]: AMQP header names the services inject or read, the reserved names,
//!   and the limits on the fields a device or Hive supplies.
//! - [`json`]: exact JSON parsing: integers outside `i64::MIN..=u64::MAX` refused.
//! - [`frame`]: the JSON frames a device and the gateway exchange over the WebSocket,
//!   with a parser for device frames that keeps unknown top-level fields.
//! - [`close`]: WebSocket close codes and the reasons a session ends.
//! - [`command`]: the messages that cross `mosaic.commands` and the reply path
//!   between device-service and websocket-service.
//! - [`fleet`]: group names, declared capabilities, and the bodies of the fleet's
//!   messages (gateway announcements, presence, listing pages, fan-out reports).
//! - [`registry`]: the device registry's bus messages, the revocations stream, and
//!   the gateway -> device-service requests (enrol, renew).
//!
//! No I/O lives here: only names, shapes and the rules that both ends must share.
#![deny(missing_docs, missing_debug_implementations, unsafe_code)]

pub mod close;
pub mod command;
pub mod exchange;
pub mod fleet;
pub mod frame;
pub mod header;
pub mod json;
pub mod registry;

/// Namespace for UUIDv5 message ids derived from (device, device-chosen id).
///
/// A device that resends an event with the same `id` gets the same `message_id`, so
/// Hive can deduplicate end to end.
pub const MESSAGE_ID_NAMESPACE: uuid::Uuid = uuid::uuid!("3f0f2f4e-8a1b-4d61-9b84-6d6f73616963");

/// The `message_id` of a device event: UUIDv5 of (device, id) when the device gave an
/// id, so a resent event keeps its identity, and a fresh UUIDv7 otherwise.
pub fn message_id(device: uuid::Uuid, id: Option<&str>) -> uuid::Uuid {
    match id {
        Some(id) => {
            let mut name = Vec::with_capacity(16 + id.len());
            name.extend_from_slice(device.as_bytes());
            name.extend_from_slice(id.as_bytes());
            uuid::Uuid::new_v5(&MESSAGE_ID_NAMESPACE, &name)
        }
        None => uuid::Uuid::now_v7(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_is_stable_per_device_and_id() {
        let a = uuid::Uuid::now_v7();
        let b = uuid::Uuid::now_v7();
        assert_eq!(message_id(a, Some("x")), message_id(a, Some("x")));
        assert_ne!(message_id(a, Some("x")), message_id(b, Some("x")));
        assert_ne!(message_id(a, Some("x")), message_id(a, Some("y")));
        assert_eq!(message_id(a, Some("x")).get_version_num(), 5);
        assert_eq!(message_id(a, None).get_version_num(), 7);
        assert_ne!(message_id(a, None), message_id(a, None));
    }
}
