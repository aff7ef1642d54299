//! Plain AMQP for tests that play a peer of a service: a gateway, Hive's requester,
//! an observer of an exchange.

use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};

use crate::within;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Connects to `url` within a bounded time, and opens a channel in confirm mode with
/// the two Mosaic exchanges declared as the services declare them.
pub async fn connect(url: &str) -> (Connection, Channel) {
    let conn = within(
        CONNECT_TIMEOUT,
        "an AMQP connection",
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .expect("connect to the test broker");
    let ch = conn.create_channel().await.expect("an AMQP channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    for name in [
        mosaic_protocol::exchange::EVENTS,
        mosaic_protocol::exchange::COMMANDS,
    ] {
        ch.exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the Mosaic exchanges");
    }
    (conn, ch)
}

/// A server-named exclusive queue bound to `exchange` with each of `keys`, consumed
/// without acks. Keep the connection: the queue lives as long as it does.
#[derive(Debug)]
pub struct Listener {
    /// The connection that owns the queue.
    pub conn: Connection,
    /// A confirm-mode channel, for publishing too.
    pub ch: Channel,
    /// The queue's name (for `reply_to`).
    pub queue: ShortString,
    /// Its deliveries.
    pub consumer: Consumer,
}

impl Listener {
    /// Declares, binds and consumes; `keys` may be empty (a reply queue).
    pub async fn start(url: &str, exchange: &str, keys: &[String]) -> Listener {
        let (conn, ch) = connect(url).await;
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("an exclusive queue");
        for key in keys {
            ch.queue_bind(
                q.name().clone(),
                exchange.into(),
                ShortString::from(key.as_str()),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("a binding");
        }
        let consumer = ch
            .basic_consume(
                q.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("a consumer");
        Listener {
            conn,
            ch,
            queue: q.name().clone(),
            consumer,
        }
    }
}

/// A queue bound to everything on `mosaic.events` that keeps only the newest message:
/// something takes device events, as device-service's relay queue does, so a
/// gateway acks them (with nothing bound, events are nacked `unroutable`).
pub async fn relay_stand_in(url: &str) {
    use lapin::types::AMQPValue;
    let (conn, ch) = connect(url).await;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    let q = "relay-stand-in";
    ch.queue_declare(q.into(), QueueDeclareOptions::default(), args)
        .await
        .expect("the relay stand-in queue");
    ch.queue_bind(
        q.into(),
        mosaic_protocol::exchange::EVENTS.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("its binding");
    let _ = conn.close(200, "".into()).await;
}
