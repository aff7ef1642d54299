//! The RabbitMQ side: topology, the live connection ([`Link`]), and confirmed publishes.
//!
//! One connection carries three channels: the relay consumer's (prefetch =
//! `HIVE_CONCURRENCY`), the reply consumer's (no-ack), and a publish channel in
//! confirm mode shared by the REST API and the dead-letter path. There is no
//! automatic recovery inside lapin: when anything on the connection fails, the
//! supervisor in `lib.rs` drops the whole [`Link`], answers 503 meanwhile, and builds a
//! new one with capped exponential backoff. That keeps one simple rule: either the
//! link is whole, or there is none.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use mosaic_protocol::exchange;

/// The relay queue, shared by every replica.
pub const RELAY_QUEUE: &str = "mosaic.device-service.relay";
/// Where messages Hive will never take, or that exhausted their attempts, are kept.
pub const DEAD_LETTER_QUEUE: &str = "mosaic.device-service.dead-letter";
/// Prefix of each replica's reply queue; the replica id follows.
pub const REPLY_QUEUE_PREFIX: &str = "mosaic.device-service.replies.";

/// A RabbitMQ failure.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker could not be reached, or a channel operation failed.
    #[error("broker error: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker did not answer in time.
    #[error("broker did not answer within {0:?}")]
    Timeout(Duration),
    /// The broker refused to store a published message (negative confirm).
    #[error("broker refused the message")]
    Nacked,
    /// There is no connection to the broker right now.
    #[error("not connected to the broker")]
    NotConnected,
    /// A queue, exchange or routing key longer than AMQP's 255 bytes.
    #[error("name longer than 255 bytes")]
    NameTooLong,
}

/// A whole, working connection: the channels every part of the service uses.
#[derive(Debug)]
pub struct Link {
    /// The connection itself.
    pub conn: Connection,
    /// Confirm-mode channel for REST publishes and dead-letter publishes.
    pub publish: Channel,
    /// Channel of the relay consumer.
    pub relay: Channel,
    /// Channel of the reply consumer.
    pub replies: Channel,
    /// This replica's reply queue (the `reply_to` of its requests).
    pub reply_queue: String,
    /// Set while RabbitMQ blocks publishers (a memory or disk alarm).
    pub blocked: AtomicBool,
}

impl Link {
    /// Whether the connection and every channel are still open.
    pub fn is_open(&self) -> bool {
        self.conn.status().connected()
            && self.publish.status().connected()
            && self.relay.status().connected()
            && self.replies.status().connected()
    }

    /// Whether a publish can be confirmed now: open and not blocked by an alarm.
    pub fn can_publish(&self) -> bool {
        self.is_open() && !self.blocked.load(Ordering::Acquire)
    }
}

/// Connects to `url`, declares the topology and opens the channels, all within `timeout`.
pub async fn connect(
    url: &str,
    replica: &str,
    prefetch: u16,
    timeout: Duration,
) -> Result<Link, BrokerError> {
    let props = ConnectionProperties::default()
        .with_connection_name(format!("device-service {replica}").into());
    let setup = async {
        let conn = Connection::connect(url, props).await?;
        let publish = conn.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        declare_topology(&publish).await?;

        let relay = conn.create_channel().await?;
        relay
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;

        let replies = conn.create_channel().await?;
        let reply_queue = format!("{REPLY_QUEUE_PREFIX}{replica}");
        replies
            .queue_declare(
                name(&reply_queue)?,
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok::<_, BrokerError>(Link {
            conn,
            publish,
            relay,
            replies,
            reply_queue,
            blocked: AtomicBool::new(false),
        })
    };
    match tokio::time::timeout(timeout, setup).await {
        Ok(r) => r,
        Err(_) => Err(BrokerError::Timeout(timeout)),
    }
}

/// Declares both exchanges (as websocket-service does: topic, durable, no arguments),
/// the relay queue with its two bindings, and the dead-letter queue.
pub async fn declare_topology(ch: &Channel) -> Result<(), lapin::Error> {
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
    let mut quorum = FieldTable::default();
    quorum.insert("x-queue-type".into(), long("quorum"));
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(RELAY_QUEUE.into(), durable_queue, quorum.clone())
        .await?;
    for key in [exchange::ALL_EVENTS, exchange::ALL_LIFECYCLE] {
        ch.queue_bind(
            RELAY_QUEUE.into(),
            exchange::EVENTS.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    ch.queue_declare(DEAD_LETTER_QUEUE.into(), durable_queue, quorum)
        .await?;
    Ok(())
}

/// A header value as a `LongString` (never `ShortString`: RabbitMQ closes the
/// connection on one in a headers table).
pub fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// A name from configuration or input, checked for AMQP's 255-byte limit.
pub fn name(s: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(s.to_owned()).map_err(|_| BrokerError::NameTooLong)
}

/// What became of a confirmed publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// The broker stored it in at least one queue.
    Yes,
    /// A mandatory publish that no queue took came back.
    Returned,
}

/// Publishes on the confirm channel and waits for the broker's confirm, all within
/// `timeout`.
pub async fn publish(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    payload: &[u8],
    properties: BasicProperties,
    timeout: Duration,
) -> Result<Routed, BrokerError> {
    let fut = async {
        let confirm = ch
            .basic_publish(
                name(exchange)?,
                name(routing_key)?,
                BasicPublishOptions {
                    mandatory,
                    ..Default::default()
                },
                payload,
                properties,
            )
            .await?;
        let confirmation = confirm.await?;
        if confirmation.is_nack() {
            return Err(BrokerError::Nacked);
        }
        Ok(match confirmation.take_message() {
            Some(_) => Routed::Returned,
            None => Routed::Yes,
        })
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(BrokerError::Timeout(timeout)),
    }
}
