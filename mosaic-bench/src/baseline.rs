//! The broker alone: plain AMQP clients asking RabbitMQ for the same work the
//! services ask of it, on the same broker in the same run.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use mosaic_protocol::command::Kind;
use mosaic_protocol::exchange::{self, Lifecycle};
use mosaic_protocol::header;
use serde_json::{Map, json};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::procfs::{cpu_secs, now_us};

/// Bound on one broker step.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// What the broker-alone connect baseline measured.
#[derive(Debug, Clone)]
pub struct ConnectWork {
    /// The broker operations per connect, in words.
    pub work: &'static str,
    /// Connects per second.
    pub rate: f64,
    /// Broker CPU per connect, µs.
    pub broker_us: f64,
    /// The AMQP client's CPU per connect, µs (this process).
    pub client_us: f64,
    /// When each connect was done (µs since the epoch).
    pub times_us: Vec<u64>,
}

fn table(pairs: &[(&str, String)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(
            ShortString::from(*k),
            AMQPValue::LongString(LongString::from(v.as_str())),
        );
    }
    t
}

async fn connect(url: &str) -> anyhow::Result<Connection> {
    Ok(tokio::time::timeout(
        STEP_TIMEOUT,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await??)
}

/// The broker's share of `n` device connects, asked by a plain AMQP client: per
/// connect, a `device.<id>` binding to an exclusive queue on
/// `mosaic.commands.devices`, a takeover notice to that key (it comes back to the
/// queue's consumer, as a replica's own notice does) and a persistent, `mandatory`
/// `connected` lifecycle message on `mosaic.events`, both confirmed, with the
/// properties the gateway sets; `concurrency` connects at
/// once, as the gateway's clients do.
pub async fn connect_work(
    amqp: &str,
    n: usize,
    concurrency: usize,
    broker_pid: u32,
) -> anyhow::Result<ConnectWork> {
    const CHANNELS: usize = 4;
    let conn = connect(amqp).await?;
    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        channels.push(ch);
    }
    let ch = &channels[0];
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        exchange::EVENTS.into(),
        ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        exchange::COMMANDS_DEVICES.into(),
        ExchangeKind::Direct,
        durable,
        FieldTable::default(),
    )
    .await?;
    let gateway = Uuid::new_v4();
    let queue = ShortString::from(format!("bench.baseline.{gateway}"));
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
    // The replica's consumer: every takeover notice comes back here and is acked.
    let consume = conn.create_channel().await?;
    consume.basic_qos(512, BasicQosOptions::default()).await?;
    let mut consumer = consume
        .basic_consume(
            queue.clone(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let acking = tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let _ = d.acker.ack(BasicAckOptions::default()).await;
        }
    });

    let broker_before = cpu_secs(broker_pid);
    let client_before = cpu_secs(std::process::id());
    let started = Instant::now();
    let limit = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut connects = FuturesUnordered::new();
    let mut times_us = Vec::with_capacity(n);
    let mut failed = 0usize;
    let mut spawned = 0usize;
    while spawned < n || !connects.is_empty() {
        tokio::select! {
            permit = limit.clone().acquire_owned(), if spawned < n => {
                let permit = permit?;
                let ch = channels[spawned % CHANNELS].clone();
                let queue = queue.clone();
                connects.push(tokio::spawn(async move {
                    let r = tokio::time::timeout(STEP_TIMEOUT, one_connect(ch, queue, gateway)).await;
                    drop(permit);
                    matches!(r, Ok(Ok(true)))
                }));
                spawned += 1;
            }
            Some(r) = connects.next() => {
                if matches!(r, Ok(true)) {
                    times_us.push(now_us());
                } else {
                    failed += 1;
                }
            }
        }
    }
    anyhow::ensure!(failed == 0, "broker alone: {failed} of {n} connects failed");
    let elapsed = started.elapsed();
    let result = ConnectWork {
        work: "binding, takeover notice, lifecycle message",
        rate: n as f64 / elapsed.as_secs_f64(),
        broker_us: (cpu_secs(broker_pid) - broker_before) * 1e6 / n.max(1) as f64,
        client_us: (cpu_secs(std::process::id()) - client_before) * 1e6 / n.max(1) as f64,
        times_us,
    };
    let _ = tokio::time::timeout(STEP_TIMEOUT, conn.close(200, "done".into())).await;
    acking.abort();
    queue_gone(amqp, &queue).await?;
    Ok(result)
}

async fn one_connect(ch: Channel, queue: ShortString, gateway: Uuid) -> anyhow::Result<bool> {
    let device = Uuid::new_v4();
    let session = Uuid::now_v7();
    let ids = [
        (header::DEVICE, device.to_string()),
        (header::SESSION, session.to_string()),
        (header::GATEWAY, gateway.to_string()),
    ];
    let key = exchange::device_key(device);
    ch.queue_bind(
        queue,
        exchange::COMMANDS_DEVICES.into(),
        key.clone().into(),
        QueueBindOptions { nowait: true },
        FieldTable::default(),
    )
    .await?;
    let mut takeover = ids.to_vec();
    takeover.push((header::KIND, Kind::Takeover.as_str().into()));
    let mut lifecycle = ids.to_vec();
    lifecycle.extend([
        (header::KIND, header::KIND_LIFECYCLE.into()),
        (header::NAME, Lifecycle::Connected.as_str().into()),
        (header::MESSAGE_ID, Uuid::now_v7().to_string()),
        (header::RECEIVED_AT, "2026-01-01T00:00:00.000000Z".into()),
    ]);
    let t = ch
        .basic_publish(
            exchange::COMMANDS_DEVICES.into(),
            key.into(),
            BasicPublishOptions::default(),
            b"null",
            BasicProperties::default().with_headers(table(&takeover)),
        )
        .await?;
    // `mandatory`, as the gateway's: with no relay queue bound (the idle scenario
    // runs no device-service) RabbitMQ returns it, and that is work too.
    let l = ch
        .basic_publish(
            exchange::EVENTS.into(),
            exchange::lifecycle_key(device, Lifecycle::Connected).into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"null",
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(Uuid::now_v7().to_string().into())
                .with_timestamp(0)
                .with_headers(table(&lifecycle)),
        )
        .await?;
    Ok(t.await?.is_ack() && l.await?.is_ack())
}

/// Waits (at most 30 s) until RabbitMQ deleted the exclusive `queue` of a closed
/// connection: its bindings go in the same deletion, which takes the broker a while.
async fn queue_gone(amqp: &str, queue: &ShortString) -> anyhow::Result<()> {
    let conn = connect(amqp).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        // A passive declare answers 404 once the queue is gone (405 while it exists
        // and is still exclusive to the closed connection); a failure closes the channel.
        let ch = conn.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        match ch
            .queue_declare(queue.clone(), passive, FieldTable::default())
            .await
        {
            Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(a) if a.get_id() == 404) =>
            {
                let _ = conn.close(200, "done".into()).await;
                return Ok(());
            }
            Ok(_) => {
                let _ = ch.close(200, "again".into()).await;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the baseline's queue was not deleted within 30 s")
}

/// A confirm-mode channel on a connection of its own.
pub async fn confirm_channel(url: &str) -> anyhow::Result<(Connection, Channel)> {
    let conn = connect(url).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok((conn, ch))
}

/// A device event as the gateway publishes it: routing key, headers, body.
pub fn device_event(i: u64) -> (String, FieldTable, Vec<u8>) {
    let device = Uuid::now_v7();
    let mut h = Map::new();
    h.insert("kind".into(), json!("event"));
    h.insert("message_id".into(), json!(Uuid::now_v7().to_string()));
    h.insert("device".into(), json!(device.to_string()));
    h.insert("name".into(), json!("telemetry"));
    h.insert("received_at".into(), json!("2026-01-01T00:00:00.000000Z"));
    h.insert("gateway".into(), json!("bench"));
    h.insert("session".into(), json!(Uuid::now_v7().to_string()));
    let table = amqp_value_json::to_field_table(&h).unwrap_or_default();
    let body = format!(r#"{{"seq":{i},"value":21.5}}"#).into_bytes();
    (exchange::event_key(device, "telemetry"), table, body)
}

/// Publishes `n` persistent messages to `exchange`, up to 256 unconfirmed.
pub async fn publish_all(
    ch: &Channel,
    exchange: &str,
    n: u64,
    message: impl Fn(u64) -> (String, FieldTable, Vec<u8>),
) -> anyhow::Result<()> {
    let mut window = VecDeque::new();
    for i in 0..n {
        let (key, headers, body) = message(i);
        let confirm = ch
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(key),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_headers(headers)
                    .with_delivery_mode(2),
            )
            .await?;
        window.push_back(confirm);
        if window.len() >= 256 {
            let c = window.pop_front().expect("not empty").await?;
            anyhow::ensure!(c.is_ack(), "the broker refused a message");
        }
    }
    for c in window {
        anyhow::ensure!(c.await?.is_ack(), "the broker refused a message");
    }
    Ok(())
}

/// A bare publisher and consumer on `queue` (bound to `mosaic.events`, as the relay
/// queue is): `n` device events published persistent and confirmed to
/// `mosaic.events`, consumed with prefetch `prefetch` and one ack each. Messages per
/// second from the first publish to the last ack.
pub async fn bare_relay(url: &str, queue: &str, n: u64, prefetch: u16) -> anyhow::Result<f64> {
    let (_pc, publisher) = confirm_channel(url).await?;
    let (_cc, consumer_ch) = confirm_channel(url).await?;
    consumer_ch
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = consumer_ch
        .basic_consume(
            queue.into(),
            "bench-bare-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    let consume = tokio::spawn(async move {
        let mut got = 0u64;
        while got < n {
            match consumer.next().await {
                Some(Ok(d)) => {
                    d.acker.ack(BasicAckOptions::default()).await?;
                    got += 1;
                }
                Some(Err(e)) => return Err(anyhow::Error::from(e)),
                None => anyhow::bail!("the consumer ended"),
            }
        }
        Ok(())
    });
    publish_all(&publisher, exchange::EVENTS, n, device_event).await?;
    tokio::time::timeout(Duration::from_secs(600), consume).await???;
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// The raw AMQP request/reply round trip at `rate` per second for `seconds`: a
/// requester publishes each request (with `reply_to` and a correlation id) to a
/// responder's queue; the responder publishes the body back to the reply queue. Two
/// broker hops, as a REST request to a device takes (device-service to the gateway,
/// and back). Round-trip times in milliseconds, and how many got no answer in 10 s.
pub async fn request_reply(
    url: &str,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<(Vec<f64>, usize)> {
    let requester = connect(url).await?;
    let responder = connect(url).await?;
    let rq = requester.create_channel().await?;
    let rs = responder.create_channel().await?;
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let reply_q = rq
        .queue_declare("".into(), exclusive, FieldTable::default())
        .await?;
    let work_q = rs
        .queue_declare("".into(), exclusive, FieldTable::default())
        .await?;
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut work = rs
        .basic_consume(
            work_q.name().clone(),
            "".into(),
            no_ack,
            FieldTable::default(),
        )
        .await?;
    let answer = rs.clone();
    let responding = tokio::spawn(async move {
        while let Some(Ok(d)) = work.next().await {
            let (Some(to), Some(corr)) = (
                d.properties.reply_to().clone(),
                d.properties.correlation_id().clone(),
            ) else {
                continue;
            };
            let _ = answer
                .basic_publish(
                    "".into(),
                    to,
                    BasicPublishOptions::default(),
                    &d.data,
                    BasicProperties::default().with_correlation_id(corr),
                )
                .await;
        }
    });
    let mut replies = rq
        .basic_consume(
            reply_q.name().clone(),
            "".into(),
            no_ack,
            FieldTable::default(),
        )
        .await?;
    let total = rate * seconds;
    let sent: Arc<std::sync::Mutex<Vec<Option<Instant>>>> =
        Arc::new(std::sync::Mutex::new(vec![None; total as usize]));
    let collecting = tokio::spawn({
        let sent = sent.clone();
        async move {
            let mut lat = Vec::with_capacity(total as usize);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds + 10);
            while (lat.len() as u64) < total {
                let d = match tokio::time::timeout_at(deadline, replies.next()).await {
                    Ok(Some(Ok(d))) => d,
                    _ => break,
                };
                let i: Option<usize> = d
                    .properties
                    .correlation_id()
                    .as_ref()
                    .and_then(|c| c.as_str().parse().ok());
                let t = i.and_then(|i| sent.lock().ok()?.get(i).copied().flatten());
                if let Some(t) = t {
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            lat
        }
    });
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let body = json!({"name": "read", "data": {"reg": 1}}).to_string();
    for i in 0..total {
        tick.tick().await;
        if let Ok(mut s) = sent.lock() {
            s[i as usize] = Some(Instant::now());
        }
        rq.basic_publish(
            "".into(),
            work_q.name().clone(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default()
                .with_reply_to(reply_q.name().clone())
                .with_correlation_id(i.to_string().into()),
        )
        .await?;
    }
    let lat = collecting.await?;
    responding.abort();
    let _ = requester.close(200, "done".into()).await;
    let _ = responder.close(200, "done".into()).await;
    let missing = total as usize - lat.len();
    Ok((lat, missing))
}

/// Publishes one message to RabbitMQ's MQTT exchange (`amq.topic`) under the routing
/// key of MQTT topic `topic` (`a/b` is `a.b`), confirmed; returns the time (µs since
/// the epoch) just before the publish.
pub async fn mqtt_publish(url: &str, topic: &str, body: &[u8]) -> anyhow::Result<u64> {
    let (conn, ch) = confirm_channel(url).await?;
    let key = topic.replace('/', ".");
    let t0 = now_us();
    let confirm = ch
        .basic_publish(
            "amq.topic".into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await?
        .await?;
    anyhow::ensure!(confirm.is_ack(), "the broker refused the publish");
    let _ = conn.close(200, "done".into()).await;
    Ok(t0)
}
