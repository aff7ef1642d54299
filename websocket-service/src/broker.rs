//! The RabbitMQ side: one connection per replica, re-established by a supervisor.
//!
//! The supervisor connects, declares `mosaic.events` and `mosaic.commands` (topic,
//! durable) and `mosaic.commands.devices` (direct, durable, bound to `mosaic.commands`
//! with `device.*`), opens a few confirm-mode publish channels, declares this
//! replica's exclusive, auto-delete queue `mosaic.gateway.<gateway-id>` bound to
//! `broadcast` on `mosaic.commands`, and consumes it on a second channel. When the
//! connection is lost it marks the broker unavailable (`/readyz` false, events get
//! `nack` `unavailable`), reconnects with backoff and rebinds every device the
//! registry holds: bindings are restored from the sessions this replica holds, not
//! replayed from history.
//!
//! Each device is served by one publish channel (picked from its id), so its events,
//! lifecycle messages and bindings reach the broker in order.
//!
//! Per-device bindings (`device.<uuid>`) are made on the direct exchange
//! `mosaic.commands.devices`, not on the topic exchange: a direct binding is one
//! route row in the broker, where a topic binding also updates the topic trie, and
//! a device connect is dominated by that cost. Publishers are unaffected: they still
//! publish `device.<uuid>` to `mosaic.commands`, the exchange-to-exchange binding
//! forwards it, and a `mandatory` message that reaches no queue at the end of the
//! chain still comes back.
//!
//! The bindings go through one topology task, in order, on the device's publish
//! channel: binds with `nowait`, so thousands of connects per second do not wait a
//! round trip each; a later publish on the same channel (the session's takeover
//! notice) is confirmed only after the broker applied the bind.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use mosaic_protocol::exchange;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::gateway::Gateway;
use crate::message::Outgoing;
use crate::metrics;

/// How long one connection attempt (and its topology set-up) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff between connection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Confirm-mode publish channels. RabbitMQ runs each channel in one process, so a
/// few of them let the broker use more than one core for a replica's traffic.
const PUBLISH_CHANNELS: usize = 4;
/// Commands delivered to this replica and not yet acknowledged.
const COMMAND_PREFETCH: u16 = 512;
/// Topology operations waiting for the topology task.
const TOPOLOGY_QUEUE: usize = 4096;

/// Why a message was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// No broker connection, or no confirm within the publish timeout.
    #[error("broker unavailable")]
    Unavailable,
    /// The broker answered with a negative confirm.
    #[error("broker rejected the message")]
    Rejected,
}

/// Why the broker connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// An AMQP operation failed.
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    /// The attempt took longer than its timeout.
    #[error("timed out")]
    Timeout,
    /// `AMQP_URL` does not parse. The parser's message can quote the whole URL,
    /// password included, so it is not kept.
    #[error("AMQP_URL is not a valid AMQP URL")]
    Url,
}

enum TopologyOp {
    Bind(Uuid, oneshot::Sender<()>),
    Unbind(Uuid),
    Resync,
}

/// Handle to the broker connection shared by every session.
#[derive(Debug)]
pub(crate) struct Broker {
    url: String,
    queue: String,
    /// The confirm-mode publish channels; empty while disconnected.
    channels: RwLock<Vec<Channel>>,
    topology: mpsc::Sender<TopologyOp>,
    topology_rx: std::sync::Mutex<Option<mpsc::Receiver<TopologyOp>>>,
    publish_timeout: Duration,
}

impl std::fmt::Debug for TopologyOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TopologyOp::Bind(d, _) => write!(f, "Bind({d})"),
            TopologyOp::Unbind(d) => write!(f, "Unbind({d})"),
            TopologyOp::Resync => write!(f, "Resync"),
        }
    }
}

impl Broker {
    pub fn new(url: String, gateway: Uuid, publish_timeout: Duration) -> Self {
        let (tx, rx) = mpsc::channel(TOPOLOGY_QUEUE);
        Broker {
            url,
            queue: format!("mosaic.gateway.{gateway}"),
            channels: RwLock::new(Vec::new()),
            topology: tx,
            topology_rx: std::sync::Mutex::new(Some(rx)),
            publish_timeout,
        }
    }

    /// The publish channel of `device`: every message and binding about one device
    /// goes through the same channel, so the broker applies them in order.
    fn channel_for(&self, device: Uuid) -> Option<Channel> {
        let channels = self.channels.read().unwrap();
        if channels.is_empty() {
            return None;
        }
        let i = (device.as_u128() % channels.len() as u128) as usize;
        Some(channels[i].clone())
    }

    /// Whether the publish channels are open now.
    pub fn available(&self) -> bool {
        let channels = self.channels.read().unwrap();
        !channels.is_empty() && channels.iter().all(|c| c.status().connected())
    }

    /// Publishes `m` and waits for the broker's confirm, at most the publish timeout.
    /// The returned future owns everything it needs.
    pub fn publish(
        &self,
        m: Outgoing,
    ) -> impl Future<Output = Result<(), PublishError>> + Send + 'static {
        let channel = self.channel_for(m.device);
        let timeout = self.publish_timeout;
        async move {
            let channel = channel.ok_or(PublishError::Unavailable)?;
            let key = ShortString::try_new(m.routing_key).map_err(|_| PublishError::Rejected)?;
            let started = Instant::now();
            let confirmed = tokio::time::timeout(timeout, async {
                channel
                    .basic_publish(
                        m.exchange.into(),
                        key,
                        BasicPublishOptions::default(),
                        &m.body,
                        m.properties,
                    )
                    .await?
                    .await
            })
            .await;
            match confirmed {
                Ok(Ok(c)) if c.is_ack() => {
                    metrics::confirm_latency(started.elapsed().as_secs_f64());
                    Ok(())
                }
                Ok(Ok(_)) => Err(PublishError::Rejected),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "publish failed");
                    Err(PublishError::Unavailable)
                }
                Err(_) => Err(PublishError::Unavailable),
            }
        }
    }

    /// Binds `device.<device>` on the direct exchange to this replica's queue; returns
    /// once the bind was sent on the publish channel (publish after it to know it was applied).
    pub async fn bind(&self, device: Uuid) {
        let (tx, rx) = oneshot::channel();
        let _ = tokio::time::timeout(self.publish_timeout, async {
            if self
                .topology
                .send(TopologyOp::Bind(device, tx))
                .await
                .is_ok()
            {
                let _ = rx.await;
            }
        })
        .await;
    }

    /// Removes the device's binding unless a session of it is registered again by
    /// the time the topology task gets to it.
    pub async fn unbind(&self, device: Uuid) {
        let op = self.topology.send(TopologyOp::Unbind(device));
        let _ = tokio::time::timeout(self.publish_timeout, op).await;
    }

    /// Runs the topology task and the connection supervisor until `stop`.
    pub async fn run(gw: Arc<Gateway>, stop: CancellationToken) {
        let rx = gw.broker.topology_rx.lock().unwrap().take();
        let topology = rx.map(|rx| tokio::spawn(topology_task(gw.clone(), rx)));
        supervise(&gw, &stop).await;
        if let Some(t) = topology {
            t.abort();
        }
    }
}

async fn topology_task(gw: Arc<Gateway>, mut rx: mpsc::Receiver<TopologyOp>) {
    let broker = &gw.broker;
    let queue = ShortString::from(broker.queue.clone());
    let bind = |ch: Channel, device: Uuid| {
        let queue = queue.clone();
        async move {
            let key = ShortString::from(exchange::device_key(device));
            ch.queue_bind(
                queue,
                exchange::COMMANDS_DEVICES.into(),
                key,
                QueueBindOptions { nowait: true },
                FieldTable::default(),
            )
            .await
        }
    };
    while let Some(op) = rx.recv().await {
        if broker.channels.read().unwrap().is_empty() {
            // Reconnecting: the resync after the connection comes back binds everyone.
            continue;
        }
        match op {
            TopologyOp::Bind(device, done) => {
                let Some(ch) = broker.channel_for(device) else {
                    continue;
                };
                if let Err(e) = bind(ch, device).await {
                    tracing::warn!(%device, error = %e, "queue.bind failed");
                }
                let _ = done.send(());
            }
            TopologyOp::Unbind(device) => {
                if gw.registry.contains(device) {
                    continue;
                }
                let Some(ch) = broker.channel_for(device) else {
                    continue;
                };
                let key = ShortString::from(exchange::device_key(device));
                let res = tokio::time::timeout(
                    broker.publish_timeout,
                    ch.queue_unbind(
                        queue.clone(),
                        exchange::COMMANDS_DEVICES.into(),
                        key,
                        FieldTable::default(),
                    ),
                )
                .await;
                if !matches!(res, Ok(Ok(()))) {
                    tracing::debug!(%device, "queue.unbind failed; the queue goes with the connection");
                }
            }
            TopologyOp::Resync => {
                let devices = gw.registry.devices();
                let n = devices.len();
                for device in devices {
                    let Some(ch) = broker.channel_for(device) else {
                        break;
                    };
                    if let Err(e) = bind(ch, device).await {
                        tracing::warn!(%device, error = %e, "queue.bind failed during resync");
                        break;
                    }
                }
                tracing::info!(devices = n, "device bindings restored");
            }
        }
    }
}

async fn setup(broker: &Broker) -> Result<(Connection, Vec<Channel>, Consumer), ConnectError> {
    let uri: AMQPUri = broker.url.parse().map_err(|_| ConnectError::Url)?;
    let conn = Connection::connect_uri(uri, ConnectionProperties::default()).await?;
    let mut channels = Vec::with_capacity(PUBLISH_CHANNELS);
    for _ in 0..PUBLISH_CHANNELS {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        channels.push(ch);
    }
    let ch = &channels[0];
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for (name, kind) in [
        (exchange::EVENTS, ExchangeKind::Topic),
        (exchange::COMMANDS, ExchangeKind::Topic),
        (exchange::COMMANDS_DEVICES, ExchangeKind::Direct),
    ] {
        ch.exchange_declare(name.into(), kind, durable, FieldTable::default())
            .await?;
    }
    // Idempotent: every replica makes the same binding at every connect.
    ch.exchange_bind(
        exchange::COMMANDS_DEVICES.into(),
        exchange::COMMANDS.into(),
        exchange::ALL_DEVICES.into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let queue = ShortString::from(broker.queue.clone());
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
    ch.queue_bind(
        queue.clone(),
        exchange::COMMANDS.into(),
        exchange::BROADCAST_KEY.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let consume = conn.create_channel().await?;
    // Bounded: at most this many commands on their way from the broker at once.
    consume
        .basic_qos(COMMAND_PREFETCH, BasicQosOptions::default())
        .await?;
    let consumer = consume
        .basic_consume(
            queue,
            ShortString::from(format!("{}-consumer", broker.queue)),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((conn, channels, consumer))
}

async fn supervise(gw: &Arc<Gateway>, stop: &CancellationToken) {
    let broker = &gw.broker;
    let mut backoff = BACKOFF_MIN;
    while !stop.is_cancelled() {
        let attempt = tokio::select! {
            r = tokio::time::timeout(CONNECT_TIMEOUT, setup(broker)) => r.unwrap_or(Err(ConnectError::Timeout)),
            _ = stop.cancelled() => break,
        };
        let (conn, channels, mut consumer) = match attempt {
            Ok(parts) => parts,
            Err(e) => {
                metrics::broker_connection("failed");
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot connect to RabbitMQ");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => break,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        metrics::broker_connection("connected");
        tracing::info!(queue = %broker.queue, "connected to RabbitMQ");
        *broker.channels.write().unwrap() = channels.clone();
        let _ = broker.topology.send(TopologyOp::Resync).await;
        gw.update_readiness();
        let mut events = conn.events_listener();
        let mut check = tokio::time::interval(Duration::from_millis(500));
        let lost = loop {
            tokio::select! {
                d = consumer.next() => match d {
                    Some(Ok(d)) => {
                        let acker = d.acker.clone();
                        crate::command::dispatch(gw, d);
                        // Dispatch never blocks: the command is queued for its session
                        // or answered; acking it is what lets the next one come.
                        let _ = acker.ack(BasicAckOptions::default()).await;
                    }
                    Some(Err(e)) => break Some(e.to_string()),
                    None => break Some("consumer ended".into()),
                },
                ev = events.next() => match ev {
                    Some(lapin::Event::Error(e)) => break Some(e.to_string()),
                    Some(_) => {}
                    None => break Some("connection events ended".into()),
                },
                _ = check.tick() => if !conn.status().connected() || channels.iter().any(|c| !c.status().connected()) {
                    break Some("channel closed".into());
                },
                _ = stop.cancelled() => break None,
            }
        };
        broker.channels.write().unwrap().clear();
        gw.update_readiness();
        match lost {
            Some(reason) => {
                metrics::broker_connection("lost");
                tracing::warn!(%reason, "RabbitMQ connection lost; reconnecting");
                let _ = tokio::time::timeout(
                    Duration::from_millis(200),
                    conn.close(320, "lost".into()),
                )
                .await;
            }
            None => {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    conn.close(200, "shutdown".into()),
                )
                .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_malformed_url_stays_out_of_the_error_text() {
        // No `//`: the URL parser refuses it and quotes it whole, password included.
        let b = Broker::new(
            "amqp:guest:s3cret@rabbit".into(),
            Uuid::new_v4(),
            Duration::from_millis(50),
        );
        let Err(e) = setup(&b).await else {
            panic!("connected to a malformed URL")
        };
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }
}
