//! What device-service asks of RabbitMQ: its queues, its consumers and its topology,
//! on the supervised link of `mosaic-amqp`.
//!
//! One connection carries a confirm-mode publish channel (the REST API, dead
//! letters, parked retries) and two consumers, each on a channel of its own: the
//! relay queue (prefetch = `HIVE_CONCURRENCY`, manual acks) and this replica's reply
//! queue (no-ack). The link is whole or absent: when anything on it fails, the
//! supervisor withdraws it (the API answers 503, `/readyz` is false) and builds a new
//! one, declaring this topology again.
//!
//! ## Queues
//!
//! - `mosaic.device-service.relay` (quorum, shared by every replica): bound to
//!   `mosaic.events` with `event.#` and `lifecycle.#`. It dead-letters explicitly
//!   (at least once) to the dead-letter queue: a message RabbitMQ gives up on (its
//!   delivery limit, [`DELIVERY_LIMIT`]) lands there instead of being dropped.
//! - `mosaic.device-service.dead-letter` (quorum): what Hive refused, what exhausted
//!   its attempts, what could not become a POST, and what RabbitMQ gave up on.
//! - `mosaic.device-service.retry` (quorum): messages parked between two attempts
//!   when holding them longer would outlive RabbitMQ's `consumer_timeout`; each one
//!   expires after its delay and RabbitMQ dead-letters it back to the relay queue.
//! - `mosaic.device-service.replies.<replica>` (exclusive, auto-delete): answers to
//!   this replica's requests.
//! - `mosaic.device-service.fleet.<replica>` (exclusive, auto-delete, no-ack, its own
//!   consumer): gateway announcements from `mosaic.fleet` and lifecycle messages, for
//!   the fleet's view (`crate::fleet`), which declares it.
//! - `mosaic.device-service.rpc` (auto-delete, shared by every replica): requests
//!   from the gateways (enrol, renew). It exists only while some replica consumes
//!   it, so a gateway's `mandatory` request comes back at once when none runs.
//! - `mosaic.revocations` (a stream): revocations, appended through the outbox and
//!   read by every gateway (see `mosaic_protocol::registry`).
//!
//! The relay queue is also bound with `registry.#`: Hive gets the registry's
//! messages with `kind` `registry`.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};
use mosaic_amqp::{Consume, Plan};
use mosaic_protocol::{exchange, registry};

/// The relay queue, shared by every replica.
pub const RELAY_QUEUE: &str = "mosaic.device-service.relay";
/// Where messages Hive will never take, or that exhausted their attempts, are kept.
pub const DEAD_LETTER_QUEUE: &str = "mosaic.device-service.dead-letter";
/// Where a message waits out its next retry delay outside any consumer.
pub const RETRY_QUEUE: &str = "mosaic.device-service.retry";
/// Prefix of each replica's reply queue; the replica id follows.
pub const REPLY_QUEUE_PREFIX: &str = "mosaic.device-service.replies.";
/// Deliveries of one message after which RabbitMQ dead-letters it by itself (a
/// message that keeps crashing or losing its consumer). Set explicitly: RabbitMQ 4
/// quorum queues default to 20 and then drop the message unless a dead-letter target
/// is set.
pub const DELIVERY_LIMIT: i64 = 50;

/// Prefix of each replica's fleet queue (announcements of the gateways and every
/// lifecycle message); the replica id follows.
pub const FLEET_QUEUE_PREFIX: &str = "mosaic.device-service.fleet.";
/// The queue whose exclusive holder is the fleet's leader (see `crate::fleet`).
pub const LEADER_QUEUE: &str = "mosaic.device-service.leader";
/// Requests from the gateways handled at once by one replica.
pub const RPC_PREFETCH: u16 = 32;

/// This replica's fleet queue.
pub fn fleet_queue(replica: &str) -> ShortString {
    ShortString::from(format!("{FLEET_QUEUE_PREFIX}{replica}"))
}

/// Declares `mosaic.fleet` and this replica's fleet queue with its two bindings.
pub async fn declare_fleet(ch: &Channel, queue: ShortString) -> Result<(), lapin::Error> {
    ch.exchange_declare(
        exchange::FLEET.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(
        queue.clone(),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    for (ex, key) in [
        (exchange::FLEET, exchange::ALL_GATEWAYS),
        (exchange::EVENTS, exchange::ALL_LIFECYCLE),
    ] {
        ch.queue_bind(
            queue.clone(),
            ex.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(())
}

/// Index of the consumers in [`plan`].
pub const RELAY_CONSUMER: usize = 0;
/// Index of the reply consumer in [`plan`].
pub const REPLY_CONSUMER: usize = 1;
/// Index of the gateway-request consumer in [`plan`].
pub const RPC_CONSUMER: usize = 2;
/// Index of the fleet consumer in [`plan`].
pub const FLEET_CONSUMER: usize = 3;

/// This replica's reply queue.
pub fn reply_queue(replica: &str) -> ShortString {
    // The replica id is checked to be short at start, so the name always fits.
    ShortString::from(format!("{REPLY_QUEUE_PREFIX}{replica}"))
}

/// One publish channel; the relay consumer (prefetch `prefetch`) and the reply
/// consumer, in that order.
pub fn plan(replica: &str, prefetch: u16) -> Plan {
    Plan {
        publishers: 1,
        consumers: vec![
            Consume {
                queue: RELAY_QUEUE.into(),
                tag: ShortString::from(format!("relay-{replica}")),
                prefetch,
                no_ack: false,
                exclusive: false,
                buffer: usize::from(prefetch),
                arguments: FieldTable::default(),
            },
            Consume {
                queue: reply_queue(replica),
                tag: ShortString::from(format!("replies-{replica}")),
                prefetch: 0,
                no_ack: true,
                exclusive: true,
                buffer: 1024,
                arguments: FieldTable::default(),
            },
            Consume {
                queue: registry::RPC_QUEUE.into(),
                tag: ShortString::from(format!("rpc-{replica}")),
                prefetch: RPC_PREFETCH,
                no_ack: false,
                exclusive: false,
                buffer: usize::from(RPC_PREFETCH),
                arguments: FieldTable::default(),
            },
            Consume {
                queue: fleet_queue(replica),
                tag: ShortString::from(format!("fleet-{replica}")),
                prefetch: 0,
                no_ack: true,
                exclusive: true,
                buffer: 4096,
                arguments: FieldTable::default(),
            },
        ],
    }
}

/// The revocations stream's arguments (the gateways declare it the same way).
pub fn revocations_arguments() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-queue-type".into(), long("stream"));
    t.insert("x-max-age".into(), long(registry::REVOCATIONS_MAX_AGE));
    t
}

/// Declares both exchanges (as websocket-service does: topic, durable, no
/// arguments), the relay, dead-letter and retry queues with the relay queue's two
/// bindings, and the replica's reply queue.
pub async fn declare(
    ch: Channel,
    reply_queue: ShortString,
    fleet_queue: ShortString,
) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for ex in [exchange::EVENTS, exchange::COMMANDS] {
        ch.exchange_declare(
            ex.into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
    }
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(RELAY_QUEUE.into(), durable_queue, relay_arguments())
        .await?;
    for key in [
        exchange::ALL_EVENTS,
        exchange::ALL_LIFECYCLE,
        registry::ALL_REGISTRY,
    ] {
        ch.queue_bind(
            RELAY_QUEUE.into(),
            exchange::EVENTS.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    ch.queue_declare(DEAD_LETTER_QUEUE.into(), durable_queue, quorum())
        .await?;
    ch.queue_declare(RETRY_QUEUE.into(), durable_queue, retry_arguments())
        .await?;
    ch.queue_declare(
        reply_queue,
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    declare_fleet(&ch, fleet_queue).await?;
    ch.queue_declare(
        registry::RPC_QUEUE.into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(
        registry::REVOCATIONS_STREAM.into(),
        durable_queue,
        revocations_arguments(),
    )
    .await?;
    Ok(())
}

fn quorum() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-queue-type".into(), long("quorum"));
    t
}

/// Dead-letters to `target` on the default exchange, at least once (RabbitMQ needs
/// `reject-publish` overflow for that).
fn dead_letters_to(target: &str) -> FieldTable {
    let mut t = quorum();
    t.insert("x-dead-letter-exchange".into(), long(""));
    t.insert("x-dead-letter-routing-key".into(), long(target));
    t.insert("x-dead-letter-strategy".into(), long("at-least-once"));
    t.insert("x-overflow".into(), long("reject-publish"));
    t
}

/// The relay queue's arguments.
pub fn relay_arguments() -> FieldTable {
    let mut t = dead_letters_to(DEAD_LETTER_QUEUE);
    t.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(DELIVERY_LIMIT),
    );
    t
}

/// The retry queue's arguments: an expired message goes back to the relay queue.
pub fn retry_arguments() -> FieldTable {
    dead_letters_to(RELAY_QUEUE)
}

/// A header value as a `LongString` (never `ShortString`: RabbitMQ closes the
/// connection on one in a headers table).
pub fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}
