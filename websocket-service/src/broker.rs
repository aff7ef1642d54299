//! The RabbitMQ side of a replica, on the supervised link of `mosaic-amqp`.
//!
//! Every connection gets: `mosaic.events` and `mosaic.commands` (topic, durable),
//! `mosaic.commands.devices` (direct, durable, bound to `mosaic.commands` with
//! `device.*`), a few confirm-mode publish channels, and this replica's exclusive,
//! auto-delete queue `mosaic.gateway.<gateway-id>` bound to `broadcast`, consumed
//! on a channel of its own. Commands leave this module through a bounded channel
//! ([`Broker::start`] returns its receiver); what to bind again after a reconnect
//! comes in through the [`Held`] callback. This module knows nothing of sessions.
//!
//! The revocations stream (`mosaic.revocations`, see `mosaic_protocol::registry`)
//! is declared here too and consumed from its first entry on a channel of its own;
//! its deliveries leave through a second receiver ([`Broker::start`]).
//!
//! Each device is served by one publish channel (picked from its id), so its events,
//! lifecycle messages and bindings reach the broker in order.
//!
//! Per-device bindings (`device.<uuid>`) are made on the direct exchange
//! `mosaic.commands.devices`, not on the topic exchange: a direct binding is one
//! route row in the broker, where a topic binding also updates the topic trie, and a
//! device connect is dominated by that cost. Publishers still publish `device.<uuid>`
//! to `mosaic.commands`; the exchange-to-exchange binding forwards it, and a
//! `mandatory` message that reaches no queue at the end of the chain still comes back.
//!
//! Bindings go through one topology task, in order, on the device's publish channel,
//! with `nowait`, so thousands of connects per second do not wait a round trip each;
//! a later publish on the same channel (the session's takeover notice) is confirmed
//! only after the broker applied the bind, and fails if the bind failed (a failed
//! bind closes the channel). When a new link comes up the task binds every device
//! the replica holds, and the replica is ready only once that is done.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};
use mosaic_amqp::{Amqp, Consume, Incoming, Link, Plan, Publish, Routed, Settings};
use mosaic_protocol::{exchange, registry};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use uuid::Uuid;

use crate::message::Outgoing;
use crate::metrics;

/// Confirm-mode publish channels. RabbitMQ runs each channel in one process, so a
/// few of them let the broker use more than one core for a replica's traffic.
const PUBLISH_CHANNELS: usize = 4;
/// Commands delivered to this replica and not yet acknowledged.
const COMMAND_PREFETCH: u16 = 512;
/// Topology operations waiting for the topology task.
const TOPOLOGY_QUEUE: usize = 4096;
/// Revocations delivered and not yet acknowledged (a stream needs a prefetch).
const REVOCATIONS_PREFETCH: u16 = 1000;

/// Why a message was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// No broker connection, an alarm, or no confirm within the publish timeout.
    #[error("broker unavailable")]
    Unavailable,
    /// The broker answered with a negative confirm, or the message cannot be sent.
    #[error("broker rejected the message")]
    Rejected,
    /// No queue took the message (`mandatory` publish returned).
    #[error("no queue takes the message")]
    Unroutable,
}

/// Which devices this replica holds: what the topology task binds again on a new
/// connection, and whether an unbind is still due.
pub(crate) trait Held: Send + Sync + 'static {
    /// Every device held now.
    fn devices(&self) -> Vec<Uuid>;
    /// Whether a session of `device` is held now.
    fn holds(&self, device: Uuid) -> bool;
    /// Every group with a session held now.
    fn groups(&self) -> Vec<String>;
    /// Whether a session of `group` is held now.
    fn has_group(&self, group: &str) -> bool;
}

/// What readiness depends on: the link, and the generation whose bindings are made.
#[derive(Debug)]
pub(crate) struct Watch {
    pub links: watch::Receiver<Option<Arc<Link>>>,
    pub synced: watch::Receiver<u64>,
}

enum TopologyOp {
    /// Bind the device; answer whether the bind was sent on a link.
    Bind(Uuid, oneshot::Sender<bool>),
    Unbind(Uuid),
    /// Bind or unbind each group as [`Held::has_group`] says now; answer whether
    /// every bind was sent on a link.
    SyncGroups(Vec<String>, Option<oneshot::Sender<bool>>),
}

/// Handle to the replica's broker link, shared by every session.
#[derive(Debug)]
pub(crate) struct Broker {
    queue: String,
    publish_timeout: Duration,
    amqp: OnceLock<Amqp>,
    topology: mpsc::Sender<TopologyOp>,
    topology_rx: std::sync::Mutex<Option<mpsc::Receiver<TopologyOp>>>,
    /// The generation of the link whose device bindings are all made.
    synced: watch::Sender<u64>,
    /// Bumped whenever the set of bound groups changes.
    groups_changed: watch::Sender<u64>,
    gateway: Uuid,
}

impl std::fmt::Debug for TopologyOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TopologyOp::Bind(d, _) => write!(f, "Bind({d})"),
            TopologyOp::Unbind(d) => write!(f, "Unbind({d})"),
            TopologyOp::SyncGroups(g, _) => write!(f, "SyncGroups({g:?})"),
        }
    }
}

impl Broker {
    /// A handle that is not connected yet ([`Broker::start`] connects).
    pub fn new(gateway: Uuid, publish_timeout: Duration) -> Self {
        let (tx, rx) = mpsc::channel(TOPOLOGY_QUEUE);
        Broker {
            queue: format!("mosaic.gateway.{gateway}"),
            publish_timeout,
            amqp: OnceLock::new(),
            topology: tx,
            topology_rx: std::sync::Mutex::new(Some(rx)),
            synced: watch::channel(0).0,
            groups_changed: watch::channel(0).0,
            gateway,
        }
    }

    /// This replica's command queue.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Changes whenever the set of bound groups changes.
    pub fn groups_changed(&self) -> watch::Receiver<u64> {
        self.groups_changed.subscribe()
    }

    /// Starts the supervised link and the topology task; returns this replica's
    /// command deliveries and the revocations stream's. Call once.
    pub fn start(
        self: &Arc<Self>,
        settings: Settings,
        held: Arc<dyn Held>,
    ) -> (mpsc::Receiver<Incoming>, mpsc::Receiver<Incoming>) {
        let queue = ShortString::from(self.queue.clone());
        let plan = Plan {
            publishers: PUBLISH_CHANNELS,
            consumers: vec![
                Consume {
                    queue: queue.clone(),
                    tag: ShortString::from(format!("{}-consumer", self.queue)),
                    prefetch: COMMAND_PREFETCH,
                    no_ack: false,
                    exclusive: true,
                    buffer: usize::from(COMMAND_PREFETCH),
                    arguments: FieldTable::default(),
                },
                Consume {
                    queue: registry::REVOCATIONS_STREAM.into(),
                    tag: ShortString::from(format!("{}-revocations", self.queue)),
                    prefetch: REVOCATIONS_PREFETCH,
                    no_ack: false,
                    exclusive: false,
                    buffer: usize::from(REVOCATIONS_PREFETCH),
                    arguments: {
                        let mut t = FieldTable::default();
                        t.insert("x-stream-offset".into(), long("first"));
                        t
                    },
                },
            ],
        };
        let lost_key = ShortString::from(exchange::gateway_lost_key(self.gateway));
        let (amqp, mut rx) = Amqp::start(settings, plan, move |ch| {
            declare(ch, queue.clone(), lost_key.clone())
        });
        let links = amqp.watch();
        assert!(self.amqp.set(amqp).is_ok(), "the broker starts once");
        let ops = self.topology_rx.lock().unwrap().take();
        if let Some(ops) = ops {
            tokio::spawn(topology_task(self.clone(), held, ops, links));
        }
        let revocations = rx.remove(1);
        (rx.remove(0), revocations)
    }

    /// Follows the link (`None` before [`Broker::start`]).
    pub fn links(&self) -> Option<watch::Receiver<Option<Arc<Link>>>> {
        self.amqp.get().map(Amqp::watch)
    }

    /// The current link's generation, when connected.
    pub fn generation(&self) -> Option<u64> {
        self.link().map(|l| l.generation())
    }

    /// Closes the link (bounded); nothing is published afterwards.
    pub async fn shutdown(&self) {
        if let Some(a) = self.amqp.get() {
            a.shutdown().await;
        }
    }

    fn link(&self) -> Option<Arc<Link>> {
        self.amqp.get().and_then(Amqp::link)
    }

    /// Follows the link and its bindings: changes whenever readiness may have.
    pub fn watch(&self) -> Option<Watch> {
        let a = self.amqp.get()?;
        Some(Watch {
            links: a.watch(),
            synced: self.synced.subscribe(),
        })
    }

    /// Ready: a link that can publish, with every held device bound on it.
    pub fn ready(&self) -> bool {
        self.link()
            .is_some_and(|l| l.can_publish() && *self.synced.borrow() == l.generation())
    }

    /// The largest headers table a publish may carry now: the negotiated frame size
    /// less the rest of a content-header frame (the protocol's default frame size
    /// while disconnected).
    pub fn max_headers_bytes(&self) -> usize {
        self.link()
            .map_or(mosaic_amqp::max_headers_bytes(0), |l| l.max_headers_bytes())
    }

    /// Publishes `m` and waits for the broker's confirm, at most the publish timeout.
    /// The returned future owns everything it needs.
    pub fn publish(
        &self,
        m: Outgoing,
    ) -> impl Future<Output = Result<(), PublishError>> + Send + 'static {
        let link = self.link();
        let timeout = self.publish_timeout;
        async move {
            let link = link.ok_or(PublishError::Unavailable)?;
            let mandatory = m.mandatory;
            let publish = Publish {
                exchange: m.exchange,
                routing_key: m.routing_key,
                mandatory,
                properties: m.properties,
                body: m.body,
            };
            let started = Instant::now();
            match link.publish(channel_of(m.device), publish, timeout).await {
                Ok(Routed::Yes) => {
                    metrics::confirm_latency(started.elapsed().as_secs_f64());
                    Ok(())
                }
                Ok(Routed::Returned) => Err(PublishError::Unroutable),
                Err(e) => {
                    tracing::debug!(error = %e, "publish not confirmed");
                    Err(match e {
                        mosaic_amqp::PublishError::Nacked
                        | mosaic_amqp::PublishError::NameTooLong
                        | mosaic_amqp::PublishError::HeadersTooLarge { .. } => {
                            PublishError::Rejected
                        }
                        _ => PublishError::Unavailable,
                    })
                }
            }
        }
    }

    /// Binds `device.<device>` on the direct exchange to this replica's queue. True
    /// once the bind was sent on a live link: a confirmed publish on the device's
    /// channel after it proves the broker applied it.
    pub async fn bind(&self, device: Uuid) -> bool {
        let (tx, rx) = oneshot::channel();
        let sent = tokio::time::timeout(self.publish_timeout, async {
            self.topology
                .send(TopologyOp::Bind(device, tx))
                .await
                .is_ok()
                && rx.await.unwrap_or(false)
        })
        .await;
        sent.unwrap_or(false)
    }

    /// Binds `group.<name>` for each of `groups` that a held session belongs to, and
    /// unbinds the others (see [`Held::has_group`]). True once every bind was sent on
    /// a live link.
    pub async fn sync_groups(&self, groups: &[String]) -> bool {
        if groups.is_empty() {
            return true;
        }
        let (tx, rx) = oneshot::channel();
        let sent = tokio::time::timeout(self.publish_timeout, async {
            self.topology
                .send(TopologyOp::SyncGroups(groups.to_vec(), Some(tx)))
                .await
                .is_ok()
                && rx.await.unwrap_or(false)
        })
        .await;
        sent.unwrap_or(false)
    }

    /// As [`Broker::sync_groups`], without waiting for the outcome (a session that
    /// ends).
    pub async fn release_groups(&self, groups: &[String]) {
        if groups.is_empty() {
            return;
        }
        let op = self
            .topology
            .send(TopologyOp::SyncGroups(groups.to_vec(), None));
        let _ = tokio::time::timeout(self.publish_timeout, op).await;
    }

    /// Removes the device's binding unless a session of it is held again by the time
    /// the topology task gets to it.
    pub async fn unbind(&self, device: Uuid) {
        let op = self.topology.send(TopologyOp::Unbind(device));
        let _ = tokio::time::timeout(self.publish_timeout, op).await;
    }
}

/// A header or argument value as a `LongString`.
fn long(s: &str) -> lapin::types::AMQPValue {
    lapin::types::AMQPValue::LongString(s.into())
}

/// The publish channel of a device.
fn channel_of(device: Uuid) -> usize {
    (device.as_u128() % PUBLISH_CHANNELS as u128) as usize
}

/// The publish channel of a group's binding.
fn channel_of_group(group: &str) -> usize {
    group
        .bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b.into()))
        % PUBLISH_CHANNELS
}

/// The topology every connection of a replica needs.
async fn declare(
    ch: Channel,
    queue: ShortString,
    lost_key: ShortString,
) -> Result<(), lapin::Error> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for (name, kind) in [
        (exchange::EVENTS, ExchangeKind::Topic),
        (exchange::COMMANDS, ExchangeKind::Topic),
        (exchange::COMMANDS_DEVICES, ExchangeKind::Direct),
        (exchange::FLEET, ExchangeKind::Topic),
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
    let mut stream = FieldTable::default();
    stream.insert("x-queue-type".into(), long("stream"));
    stream.insert("x-max-age".into(), long(registry::REVOCATIONS_MAX_AGE));
    ch.queue_declare(
        registry::REVOCATIONS_STREAM.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        stream,
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
    ch.queue_bind(
        queue.clone(),
        exchange::COMMANDS.into(),
        exchange::BROADCAST_KEY.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        queue,
        exchange::FLEET.into(),
        lost_key,
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

async fn bind_group_on(
    link: &Link,
    queue: &ShortString,
    group: &str,
    bind: bool,
) -> lapin::Result<()> {
    let ch = link.channel(channel_of_group(group));
    let key = ShortString::from(exchange::group_key(group));
    if bind {
        ch.queue_bind(
            queue.clone(),
            exchange::COMMANDS.into(),
            key,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    } else {
        ch.queue_unbind(
            queue.clone(),
            exchange::COMMANDS.into(),
            key,
            FieldTable::default(),
        )
        .await
    }
}

async fn bind_on(link: &Link, queue: &ShortString, device: Uuid, wait: bool) -> lapin::Result<()> {
    link.channel(channel_of(device))
        .queue_bind(
            queue.clone(),
            exchange::COMMANDS_DEVICES.into(),
            ShortString::from(exchange::device_key(device)),
            QueueBindOptions { nowait: !wait },
            FieldTable::default(),
        )
        .await
}

/// Binds every held device on a new link: `nowait` binds, then one waited bind per
/// channel as a barrier (a channel answers in order).
async fn resync(link: &Link, queue: &ShortString, held: &dyn Held) -> lapin::Result<usize> {
    let devices = held.devices();
    for &device in &devices {
        bind_on(link, queue, device, false).await?;
    }
    let mut last = [None; PUBLISH_CHANNELS];
    for &device in &devices {
        last[channel_of(device)] = Some(device);
    }
    for device in last.into_iter().flatten() {
        bind_on(link, queue, device, true).await?;
    }
    Ok(devices.len())
}

/// Binds every held group on a new link.
async fn resync_groups(
    link: &Link,
    queue: &ShortString,
    held: &dyn Held,
    bound: &mut HashSet<String>,
) -> lapin::Result<()> {
    bound.clear();
    for g in held.groups() {
        bind_group_on(link, queue, &g, true).await?;
        bound.insert(g);
    }
    Ok(())
}

async fn topology_task(
    broker: Arc<Broker>,
    held: Arc<dyn Held>,
    mut ops: mpsc::Receiver<TopologyOp>,
    mut links: watch::Receiver<Option<Arc<Link>>>,
) {
    let queue = ShortString::from(broker.queue.clone());
    // The last generation a resync was tried on: a link whose resync failed is
    // failing, and the next one is synced instead.
    let mut tried = 0;
    // The groups bound on the current link.
    let mut bound = HashSet::new();
    loop {
        let link = links.borrow_and_update().clone();
        if let Some(link) = &link
            && link.generation() != tried
        {
            tried = link.generation();
            let synced = match resync_groups(link, &queue, &*held, &mut bound).await {
                Ok(()) => resync(link, &queue, &*held).await,
                Err(e) => Err(e),
            };
            broker.groups_changed.send_modify(|v| *v += 1);
            match synced {
                Ok(n) => {
                    tracing::info!(
                        devices = n,
                        groups = bound.len(),
                        generation = tried,
                        "device and group bindings made"
                    );
                    broker.synced.send_replace(tried);
                }
                Err(e) => tracing::warn!(error = %e, "binding the held devices failed"),
            }
            continue;
        }
        tokio::select! {
            op = ops.recv() => match op {
                None => return,
                Some(TopologyOp::Bind(device, done)) => {
                    let sent = match &link {
                        Some(link) => match bind_on(link, &queue, device, false).await {
                            Ok(()) => true,
                            Err(e) => {
                                tracing::warn!(%device, error = %e, "queue.bind failed");
                                false
                            }
                        },
                        None => false,
                    };
                    let _ = done.send(sent);
                }
                Some(TopologyOp::SyncGroups(groups, done)) => {
                    let mut ok = link.is_some();
                    let mut changed = false;
                    if let Some(link) = &link {
                        for g in groups {
                            let want = held.has_group(&g);
                            if want == bound.contains(&g) {
                                continue;
                            }
                            match bind_group_on(link, &queue, &g, want).await {
                                Ok(()) => {
                                    changed = true;
                                    if want {
                                        bound.insert(g);
                                    } else {
                                        bound.remove(&g);
                                    }
                                }
                                Err(e) => {
                                    tracing::warn!(group = %g, error = %e, "group binding failed");
                                    ok = false;
                                }
                            }
                        }
                    }
                    if changed {
                        broker.groups_changed.send_modify(|v| *v += 1);
                    }
                    if let Some(done) = done {
                        let _ = done.send(ok);
                    }
                }
                Some(TopologyOp::Unbind(device)) => {
                    let Some(link) = &link else { continue };
                    if held.holds(device) {
                        continue;
                    }
                    let unbind = link.channel(channel_of(device)).queue_unbind(
                        queue.clone(),
                        exchange::COMMANDS_DEVICES.into(),
                        ShortString::from(exchange::device_key(device)),
                        FieldTable::default(),
                    );
                    if !matches!(tokio::time::timeout(broker.publish_timeout, unbind).await, Ok(Ok(()))) {
                        tracing::debug!(%device, "queue.unbind failed; the queue goes with the connection");
                    }
                }
            },
            changed = links.changed() => if changed.is_err() { return },
        }
    }
}
