//! The supervisor: one task per service that keeps a whole [`Link`] alive.
//!
//! Each round connects to the next node, opens the publish channels in confirm mode,
//! runs the service's topology callback on the first of them, opens one channel per
//! consumer (with its prefetch) and starts the consumers; only then is the link
//! announced ([`Amqp::link`], [`Amqp::watch`]). Deliveries leave through one bounded
//! channel per consumer, each with the link it came on. When anything fails (an
//! error on the connection, a closed channel, a consumer that ends, a publish
//! channel on which RabbitMQ has refused every publish for [`crate::REFUSED_FOR`])
//! the link is withdrawn, its [`Link::lost`] token cancelled and the connection
//! closed; the next round starts after a pause that doubles from `reconnect_min` to
//! `reconnect_max`, with jitter.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, Event};
use rand::Rng;
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::link::Link;
use crate::metrics;
use crate::settings::{Settings, endpoint};

/// How often the supervisor checks that every channel is still open.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// What a service asks of every connection.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Confirm-mode publish channels (at least one: the topology runs on the first).
    pub publishers: usize,
    /// Consumers, each on a channel of its own, started after the topology.
    pub consumers: Vec<Consume>,
}

/// One consumer of a [`Plan`].
#[derive(Debug, Clone)]
pub struct Consume {
    /// The queue (declared by the topology callback).
    pub queue: ShortString,
    /// Consumer tag; empty lets the broker choose.
    pub tag: ShortString,
    /// Deliveries unacknowledged at once (`basic.qos`); 0 means no limit.
    pub prefetch: u16,
    /// Deliveries count as acknowledged when sent (no `ack` needed).
    pub no_ack: bool,
    /// Exclusive consumer.
    pub exclusive: bool,
    /// Capacity of the channel the deliveries leave through.
    pub buffer: usize,
    /// Arguments of `basic.consume` (a stream's `x-stream-offset`, say); usually empty.
    pub arguments: FieldTable,
}

/// A delivery, with the link it came on (ack it there; once [`Link::lost`] is
/// cancelled the broker has taken it back).
#[derive(Debug)]
pub struct Incoming {
    /// The delivery.
    pub delivery: Delivery,
    /// Its link.
    pub link: Arc<Link>,
}

impl Incoming {
    /// Whether the link it came on is gone: the broker redelivers it (from a durable
    /// queue) or dropped it (with an exclusive one).
    pub fn is_stale(&self) -> bool {
        self.link.lost.is_cancelled()
    }

    /// Acks it on its link, never waiting past [`crate::ACK_TIMEOUT`] ([`Link::ack`]).
    pub async fn ack(&self) -> bool {
        self.link.ack(&self.delivery).await
    }
}

type Events = Pin<Box<dyn futures_util::Stream<Item = Event> + Send>>;

type TopologyFn =
    dyn Fn(Channel) -> Pin<Box<dyn Future<Output = Result<(), lapin::Error>> + Send>> + Send + Sync;

struct Shared {
    settings: Settings,
    plan: Plan,
    topology: Box<TopologyFn>,
    links: watch::Sender<Option<Arc<Link>>>,
    /// Cleared by [`Amqp::cancel_consumers`]: no consumer starts again.
    consuming: AtomicBool,
    stop: CancellationToken,
}

/// The handle to a service's supervised link.
pub struct Amqp {
    shared: Arc<Shared>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Amqp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Amqp")
            .field("settings", &self.shared.settings)
            .field("connected", &self.shared.links.borrow().is_some())
            .finish_non_exhaustive()
    }
}

/// Why one connection round failed.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("the URL is not a valid AMQP URL")]
    Url,
}

impl Amqp {
    /// Starts supervising a link (on the current tokio runtime) and returns its handle
    /// and one receiver per consumer of `plan`, in order. `topology` declares the
    /// service's exchanges, queues and bindings on a fresh connection; it runs again
    /// on every new connection, so it must be idempotent.
    pub fn start<F, Fut>(
        settings: Settings,
        plan: Plan,
        topology: F,
    ) -> (Amqp, Vec<mpsc::Receiver<Incoming>>)
    where
        F: Fn(Channel) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), lapin::Error>> + Send + 'static,
    {
        assert!(plan.publishers > 0, "a link needs a publish channel");
        let (senders, receivers): (Vec<_>, Vec<_>) = plan
            .consumers
            .iter()
            .map(|c| mpsc::channel(c.buffer.max(1)))
            .unzip();
        metrics::connected(settings.service, false);
        metrics::blocked(settings.service, false);
        let shared = Arc::new(Shared {
            settings,
            plan,
            topology: Box::new(move |ch| Box::pin(topology(ch))),
            links: watch::channel(None).0,
            consuming: AtomicBool::new(true),
            stop: CancellationToken::new(),
        });
        let task = tokio::spawn(supervise(shared.clone(), senders));
        let amqp = Amqp {
            shared,
            task: Mutex::new(Some(task)),
        };
        (amqp, receivers)
    }

    /// The current link, when a whole one is up.
    pub fn link(&self) -> Option<Arc<Link>> {
        self.shared.links.borrow().clone()
    }

    /// Follows the link: a new value each time it comes, goes, or its alarm state
    /// changes.
    pub fn watch(&self) -> watch::Receiver<Option<Arc<Link>>> {
        self.shared.links.subscribe()
    }

    /// Whether a publish could be confirmed now.
    pub fn can_publish(&self) -> bool {
        self.link().is_some_and(|l| l.can_publish())
    }

    /// Stops taking deliveries: cancels every consumer on the current link (bounded
    /// by the close timeout) and starts none on later links. Deliveries already out
    /// can still be acked while the link lasts.
    pub async fn cancel_consumers(&self) {
        self.shared.consuming.store(false, Ordering::Release);
        let Some(link) = self.link() else { return };
        let timeout = self.shared.settings.close_timeout;
        for (ch, tag) in link.consumers.iter().zip(link.consumer_tags.iter()) {
            let cancel = ch.basic_cancel(tag.clone(), BasicCancelOptions::default());
            if !matches!(tokio::time::timeout(timeout, cancel).await, Ok(Ok(()))) {
                debug!(consumer = %tag, "basic.cancel did not complete");
            }
        }
    }

    /// Stops supervising: closes the connection (bounded by the close timeout) and
    /// returns once the supervisor has ended.
    pub async fn shutdown(&self) {
        self.shared.stop.cancel();
        let task = self.task.lock().await.take();
        if let Some(task) = task {
            let bound = self.shared.settings.close_timeout + Duration::from_secs(1);
            if tokio::time::timeout(bound, task).await.is_err() {
                warn!("the broker link did not close in time");
            }
        }
    }
}

impl Drop for Amqp {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

async fn supervise(s: Arc<Shared>, senders: Vec<mpsc::Sender<Incoming>>) {
    let settings = &s.settings;
    let service = settings.service;
    let mut backoff = settings.reconnect_min;
    let mut node = 0usize;
    let mut generation = 0u64;
    while !s.stop.is_cancelled() {
        let url = &settings.urls[node % settings.urls.len()];
        let round = tokio::time::timeout(settings.connect_timeout, build(&s, url, generation + 1));
        let built = tokio::select! {
            r = round => r.unwrap_or(Err(RoundError::Timeout(settings.connect_timeout))),
            _ = s.stop.cancelled() => break,
        };
        match built {
            Ok((link, consumers, events)) => {
                generation = link.generation;
                backoff = settings.reconnect_min;
                let link = Arc::new(link);
                metrics::connection(service, "connected");
                metrics::connected(service, true);
                info!(node = %endpoint(url), generation, "connected to RabbitMQ");
                let failed = CancellationToken::new();
                let mut forwarders = JoinSet::new();
                for (consumer, tx) in consumers.into_iter().zip(&senders) {
                    forwarders.spawn(forward(
                        consumer,
                        tx.clone(),
                        link.clone(),
                        failed.clone(),
                        s.clone(),
                    ));
                }
                s.links.send_replace(Some(link.clone()));
                let lost = hold(&s, &link, events, &failed).await;
                s.links.send_replace(None);
                link.lost.cancel();
                metrics::connected(service, false);
                metrics::blocked(service, false);
                forwarders.abort_all();
                let (code, text) = match &lost {
                    Some(reason) => {
                        metrics::connection(service, "lost");
                        warn!(%reason, generation, "RabbitMQ connection lost; reconnecting");
                        (320, "connection lost")
                    }
                    None => (200, "shutdown"),
                };
                let close = link.conn.close(code, ShortString::from(text));
                let _ = tokio::time::timeout(settings.close_timeout, close).await;
                if lost.is_none() {
                    break;
                }
            }
            Err(e) => {
                metrics::connection(service, "failed");
                warn!(
                    node = %endpoint(url),
                    error = %e,
                    retry_in_ms = backoff.as_millis() as u64,
                    "cannot connect to RabbitMQ"
                );
            }
        }
        // The next attempt goes to the next node (the same one when there is one).
        node = node.wrapping_add(1);
        let pause = jitter(backoff);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = s.stop.cancelled() => break,
        }
        backoff = (backoff * 2).min(settings.reconnect_max);
    }
    s.links.send_replace(None);
    debug!("broker supervisor stopped");
}

/// A random point in the upper half of `d`.
fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + rand::rng().random_range(Duration::ZERO..=d - half)
}

/// One round: connection, channels, topology, consumers.
async fn build(
    s: &Shared,
    url: &str,
    generation: u64,
) -> Result<(Link, Vec<lapin::Consumer>, Events), RoundError> {
    let uri: lapin::uri::AMQPUri = url.parse().map_err(|_| RoundError::Url)?;
    let name = format!("{} {}", s.settings.service, s.settings.id);
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let conn = Connection::connect_uri(uri, props).await?;
    // Listening from the start: an alarm announced during set-up is not missed.
    let events: Events = Box::pin(conn.events_listener());
    let mut publishers = Vec::with_capacity(s.plan.publishers);
    for _ in 0..s.plan.publishers {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        publishers.push(ch);
    }
    (s.topology)(publishers[0].clone()).await?;
    let mut channels = Vec::new();
    let mut consumers = Vec::new();
    let mut tags = Vec::new();
    if s.consuming.load(Ordering::Acquire) {
        for c in &s.plan.consumers {
            let ch = conn.create_channel().await?;
            if c.prefetch > 0 {
                ch.basic_qos(c.prefetch, BasicQosOptions::default()).await?;
            }
            let consumer = ch
                .basic_consume(
                    c.queue.clone(),
                    c.tag.clone(),
                    BasicConsumeOptions {
                        no_ack: c.no_ack,
                        exclusive: c.exclusive,
                        ..Default::default()
                    },
                    c.arguments.clone(),
                )
                .await?;
            tags.push(consumer.tag());
            channels.push(ch);
            consumers.push(consumer);
        }
    }
    let link = Link {
        conn,
        refusals: publishers.iter().map(|_| Default::default()).collect(),
        publishers,
        consumers: channels,
        consumer_tags: tags,
        blocked: AtomicBool::new(false),
        lost: CancellationToken::new(),
        refused: CancellationToken::new(),
        generation,
    };
    Ok((link, consumers, events))
}

/// Moves deliveries from `consumer` to `tx` until either ends; a consumer that ends
/// on its own (not cancelled by us) fails the link.
async fn forward(
    mut consumer: lapin::Consumer,
    tx: mpsc::Sender<Incoming>,
    link: Arc<Link>,
    failed: CancellationToken,
    s: Arc<Shared>,
) {
    loop {
        match consumer.next().await {
            Some(Ok(delivery)) => {
                let incoming = Incoming {
                    delivery,
                    link: link.clone(),
                };
                if tx.send(incoming).await.is_err() {
                    // Nobody reads this consumer's deliveries any more.
                    return;
                }
            }
            Some(Err(e)) => {
                debug!(error = %e, "consumer failed");
                failed.cancel();
                return;
            }
            None => {
                if s.consuming.load(Ordering::Acquire) {
                    failed.cancel();
                }
                return;
            }
        }
    }
}

/// Whether `e` is a soft (channel-level) AMQP error: the broker closed one channel,
/// not the connection.
fn is_channel_error(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(a) if matches!(a.kind(), lapin::protocol::AMQPErrorKind::Soft(_))
    )
}

/// Watches a link until it fails (`Some(reason)`) or the supervisor stops (`None`).
async fn hold(
    s: &Shared,
    link: &Link,
    mut events: Events,
    failed: &CancellationToken,
) -> Option<String> {
    let service = s.settings.service;
    let mut check = tokio::time::interval(CHECK_EVERY);
    loop {
        tokio::select! {
            _ = s.stop.cancelled() => return None,
            _ = failed.cancelled() => return Some("a consumer ended".into()),
            _ = link.refused.cancelled() => {
                return Some("a publish channel refuses every publish".into());
            }
            ev = events.next() => match ev {
                // A channel-level error on a channel outside the link's set (opened
                // with `Link::open_channel`) closes only that channel; one of the
                // set fails the link (its channel is closed by now).
                Some(Event::Error(e)) if is_channel_error(&e) && link.is_open() => {
                    debug!(error = %e, "a channel outside the link's set was closed");
                }
                Some(Event::Error(e)) => return Some(e.to_string()),
                Some(Event::ConnectionBlocked(reason)) => {
                    warn!(reason, "RabbitMQ blocks publishers");
                    link.blocked.store(true, Ordering::Release);
                    metrics::blocked(service, true);
                    s.links.send_modify(|_| {});
                }
                Some(Event::ConnectionUnblocked) => {
                    info!("RabbitMQ accepts publishers again");
                    link.blocked.store(false, Ordering::Release);
                    metrics::blocked(service, false);
                    s.links.send_modify(|_| {});
                }
                Some(_) => {}
                None => return Some("connection events ended".into()),
            },
            _ = check.tick() => if !link.is_open() {
                return Some("a channel closed".into());
            },
        }
    }
}
