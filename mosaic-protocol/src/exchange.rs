//! The exchanges and the routing keys on them.
//!
//! Publishers use [`EVENTS`] and [`COMMANDS`] only. [`COMMANDS_DEVICES`] is internal
//! to the gateways: a direct exchange bound to [`COMMANDS`] with [`ALL_DEVICES`], on
//! which each gateway binds its queue with [`device_key`] for every device it holds.
//! A direct binding costs the broker far less than a topic one, and a message
//! published `mandatory` to [`COMMANDS`] that no queue takes at the end of the chain
//! is still returned to its publisher.
//!
//! Routing keys are limited to 255 bytes by AMQP. An event name may be up to 128
//! characters (up to 512 bytes of UTF-8), so [`event_key`] shortens the name part at a
//! character boundary when the whole key would not fit; the full name always travels
//! in the `name` header.

use uuid::Uuid;

/// Topic exchange, durable: everything devices send towards Hive.
pub const EVENTS: &str = "mosaic.events";
/// Topic exchange, durable: everything Hive sends towards devices.
pub const COMMANDS: &str = "mosaic.commands";

/// Topic exchange, durable: the fleet's own traffic between replicas. Gateways
/// announce themselves here ([`gateway_up_key`], [`gateway_down_key`]); a
/// device-service replica announces a gateway it declared lost
/// ([`gateway_lost_key`]). Nothing a device or Hive sends travels on it.
pub const FLEET: &str = "mosaic.fleet";
/// Binding pattern on [`FLEET`] for every gateway announcement.
pub const ALL_GATEWAYS: &str = "gateway.#";

/// Direct exchange, durable: the per-device bindings of the gateways
/// ([`device_key`]). Bound to [`COMMANDS`] with [`ALL_DEVICES`]; nobody publishes to
/// it directly.
pub const COMMANDS_DEVICES: &str = "mosaic.commands.devices";
/// Binding pattern of [`COMMANDS_DEVICES`] on [`COMMANDS`]: every [`device_key`].
pub const ALL_DEVICES: &str = "device.*";

/// Routing key on [`COMMANDS`] that every connected device receives.
pub const BROADCAST_KEY: &str = "broadcast";

/// Binding pattern on [`EVENTS`] for every device event.
pub const ALL_EVENTS: &str = "event.#";
/// Binding pattern on [`EVENTS`] for every lifecycle message.
pub const ALL_LIFECYCLE: &str = "lifecycle.#";

/// The longest routing key AMQP carries, in bytes.
pub const MAX_ROUTING_KEY_BYTES: usize = 255;

/// `event.<device>.<name>`, the name shortened at a char boundary if the key would
/// pass [`MAX_ROUTING_KEY_BYTES`].
pub fn event_key(device: Uuid, name: &str) -> String {
    let mut key = format!("event.{device}.");
    let room = MAX_ROUTING_KEY_BYTES - key.len();
    let mut end = name.len().min(room);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    key.push_str(&name[..end]);
    key
}

/// `lifecycle.<device>.<connected|disconnected|registered>`.
pub fn lifecycle_key(device: Uuid, event: Lifecycle) -> String {
    format!("lifecycle.{device}.{}", event.as_str())
}

/// `device.<device>`: the key on [`COMMANDS`] that reaches one device (and the
/// binding key of its gateway's queue on [`COMMANDS_DEVICES`]).
pub fn device_key(device: Uuid) -> String {
    format!("device.{device}")
}

/// `group.<name>`: the key on [`COMMANDS`] that reaches every connected member of a
/// group (see [`crate::fleet::valid_group`] for the names). Each gateway replica
/// binds its queue once per group that one of its sessions belongs to.
pub fn group_key(group: &str) -> String {
    format!("group.{group}")
}

/// `gateway.<id>.up`: a gateway replica's periodic announcement on [`FLEET`].
pub fn gateway_up_key(gateway: Uuid) -> String {
    format!("gateway.{gateway}.up")
}

/// `gateway.<id>.down`: a gateway replica that shuts down cleanly says so on [`FLEET`].
pub fn gateway_down_key(gateway: Uuid) -> String {
    format!("gateway.{gateway}.down")
}

/// `gateway.<id>.lost`: device-service declared the gateway lost (it fell silent).
pub fn gateway_lost_key(gateway: Uuid) -> String {
    format!("gateway.{gateway}.lost")
}

/// The lifecycle events of a device session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// The device authenticated and its session began.
    Connected,
    /// The session ended; the message carries a `reason`.
    Disconnected,
    /// The device declared its services or attributes again (a `register` frame).
    Registered,
}

impl Lifecycle {
    /// The name used in routing keys and in the `name` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Connected => "connected",
            Lifecycle::Disconnected => "disconnected",
            Lifecycle::Registered => "registered",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "connected" => Some(Lifecycle::Connected),
            "disconnected" => Some(Lifecycle::Disconnected),
            "registered" => Some(Lifecycle::Registered),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_contract_shape() {
        let d = Uuid::nil();
        assert_eq!(
            event_key(d, "temp"),
            "event.00000000-0000-0000-0000-000000000000.temp"
        );
        assert_eq!(
            lifecycle_key(d, Lifecycle::Disconnected),
            "lifecycle.00000000-0000-0000-0000-000000000000.disconnected"
        );
        assert_eq!(device_key(d), "device.00000000-0000-0000-0000-000000000000");
    }

    #[test]
    fn long_names_are_cut_at_a_char_boundary() {
        let name = "é".repeat(128); // 256 bytes
        let key = event_key(Uuid::nil(), &name);
        assert!(key.len() <= MAX_ROUTING_KEY_BYTES);
        assert!(key.len() >= MAX_ROUTING_KEY_BYTES - 1);
        assert!(key.ends_with('é'));
    }
}
