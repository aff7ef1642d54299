//! device-service: relays every device message from RabbitMQ to Hive, at least once,
//! and gives Hive a REST API to send events and confirmed requests to devices.
//!
//! # Layout
//!
//! - [`config`]: the settings (flags mirrored by environment variables).
//! - [`broker`]: RabbitMQ topology, the live connection ([`broker::Link`]) and
//!   confirmed publishes.
//! - [`relay`]: one task per delivery, POST to Hive, retry with backoff, dead-letter,
//!   ack after the outcome.
//! - [`hive`]: the POST body rebuilt from headers and body, its signature, and the
//!   sorting of Hive's answers into delivered / retry / rejected.
//! - [`pending`]: requests waiting for a device's answer, and the reply-queue consumer.
//! - [`api`]: the REST API (bearer auth, events, requests, broadcast, OpenAPI).
//! - [`metrics`]: every metric name.
//!
//! [`run`] ties them together: it serves HTTP on the given listener while a
//! supervisor keeps one [`broker::Link`] alive, rebuilding it with capped backoff
//! whenever the broker goes away (`/readyz` is false and the API answers 503
//! meanwhile).
//!
//! ```no_run
//! # async fn demo() -> Result<(), device_service::Error> {
//! use device_service::{Config, run};
//! use mosaic_runtime::config::{Parsed, parse};
//!
//! let vars = |name: &str| match name {
//!     "HIVE_URL" => Some("http://127.0.0.1:9000/hive".to_owned()),
//!     "API_TOKENS" => Some("a-token-of-some-length".to_owned()),
//!     _ => None,
//! };
//! let Ok(Parsed::Run(config)) = parse::<Config>(["device-service"], vars) else { return Ok(()) };
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! run(config, listener, std::future::pending()).await
//! # }
//! ```
#![deny(missing_docs, missing_debug_implementations, unsafe_code)]

pub mod api;
pub mod broker;
pub mod config;
pub mod hive;
pub mod metrics;
pub mod pending;
pub mod relay;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use mosaic_runtime::health::Readiness;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::Config;

use crate::broker::Link;
use crate::pending::Pending;
use crate::relay::{Relay, RetryPolicy};

/// Why [`run`] stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] mosaic_runtime::config::ConfigError),
    /// The HTTP client towards Hive could not be built.
    #[error(transparent)]
    Client(#[from] hive::ClientError),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Serve(#[from] std::io::Error),
}

/// Runs the service on `listener` until `shutdown` resolves, then shuts down in order:
/// `/readyz` false and the relay consumer cancelled; new HTTP connections refused;
/// in-flight POSTs to Hive and HTTP requests given `SHUTDOWN_GRACE_MS` to finish
/// (messages still waiting for a retry are handed back to the queue at once; any
/// message left unacked is redelivered, to another replica if one runs); then the
/// broker connection is closed.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    config.validate()?;
    // Install the metrics recorder before anything records.
    let _ = mosaic_runtime::telemetry::metrics();
    let tokens = api::Tokens::new(config.tokens()?);
    let replica = config
        .replica_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let concurrency = usize::from(config.hive_concurrency);
    let hive = hive::Hive::new(
        config.hive_url.clone(),
        config.hive_signing_secret.as_deref(),
        config.hive_timeout(),
        concurrency,
    )?;
    let readiness = Readiness::new();
    let cancel = CancellationToken::new();
    let (link_tx, link_rx) = watch::channel::<Option<Arc<Link>>>(None);
    let pending = Pending::new(config.max_pending_requests as usize);
    let relay = Arc::new(Relay {
        hive,
        policy: RetryPolicy {
            base: Duration::from_millis(config.retry_base_ms),
            max: Duration::from_millis(config.retry_max_ms),
            max_attempts: config.hive_max_attempts,
            max_age: Duration::from_millis(config.hive_max_age_ms),
        },
        slots: Arc::new(Semaphore::new(concurrency)),
        tasks: TaskTracker::new(),
        shutdown: cancel.clone(),
        publish_timeout: config.publish_timeout(),
    });
    let grace = config.shutdown_grace();
    info!(
        listen = %listener.local_addr()?,
        replica = %replica,
        concurrency,
        "device-service starting"
    );

    let http_done = CancellationToken::new();
    let supervisor = tokio::spawn(supervise(Supervisor {
        url: config.amqp_url.clone(),
        replica,
        prefetch: config.hive_concurrency,
        connect_timeout: config.publish_timeout().max(Duration::from_secs(5)),
        reconnect_max: Duration::from_millis(config.reconnect_max_ms),
        grace,
        relay,
        pending: pending.clone(),
        link_tx,
        readiness: readiness.clone(),
        cancel: cancel.clone(),
        http_done: http_done.clone(),
    }));

    tokio::spawn({
        let cancel = cancel.clone();
        let readiness = readiness.clone();
        async move {
            tokio::select! {
                _ = shutdown => info!("shutdown requested"),
                _ = cancel.cancelled() => {}
            }
            readiness.set(false);
            cancel.cancel();
        }
    });

    let state = api::ApiState {
        link: link_rx,
        pending,
        publish_timeout: config.publish_timeout(),
    };
    let health = mosaic_runtime::health::router(readiness);
    let app = api::router(state, tokens, config.max_body_bytes as usize, health);
    let server = mosaic_runtime::serve::serve(
        listener,
        app,
        config.http_limits(),
        cancel.clone().cancelled_owned(),
    );
    let served = tokio::select! {
        r = server => r,
        _ = async { cancel.cancelled().await; tokio::time::sleep(grace).await } => {
            warn!("HTTP requests still running after the grace period; closing");
            Ok(())
        }
    };
    // Stop the supervisor too if the server ended by itself.
    cancel.cancel();
    http_done.cancel();
    if let Err(e) = supervisor.await {
        warn!(error = %e, "broker supervisor panicked");
    }
    info!("device-service stopped");
    Ok(served?)
}

struct Supervisor {
    url: String,
    replica: String,
    prefetch: u16,
    connect_timeout: Duration,
    reconnect_max: Duration,
    grace: Duration,
    relay: Arc<Relay>,
    pending: Arc<Pending>,
    link_tx: watch::Sender<Option<Arc<Link>>>,
    readiness: Readiness,
    cancel: CancellationToken,
    http_done: CancellationToken,
}

enum LinkEnd {
    Lost,
    Shutdown,
}

/// Keeps one link alive until shutdown.
async fn supervise(s: Supervisor) {
    let first = Duration::from_millis(100);
    let mut backoff = first;
    loop {
        if s.cancel.is_cancelled() {
            break;
        }
        match broker::connect(&s.url, &s.replica, s.prefetch, s.connect_timeout).await {
            Ok(link) => {
                info!("connected to the broker");
                backoff = first;
                if let LinkEnd::Shutdown = serve_link(&s, link).await {
                    return;
                }
            }
            Err(e) => warn!(error = %e, ?backoff, "cannot connect to the broker; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = s.cancel.cancelled() => break,
        }
        backoff = (backoff * 2).min(s.reconnect_max);
    }
    // Shut down while disconnected: nothing holds a delivery that could still be acked.
    s.relay.tasks.close();
    let _ = tokio::time::timeout(s.grace, s.relay.tasks.wait()).await;
}

/// Runs the consumers on `link` until it fails or shutdown.
async fn serve_link(s: &Supervisor, link: Link) -> LinkEnd {
    // The replica id is checked to be short, so the tag is always a valid name.
    let tag = broker::name(&format!("relay-{}", s.replica)).unwrap_or_default();
    let consumers = async {
        let relay = link
            .relay
            .basic_consume(
                broker::RELAY_QUEUE.into(),
                tag.clone(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let replies = link
            .replies
            .basic_consume(
                broker::name(&link.reply_queue).unwrap_or_else(|_| "".into()),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok::<_, lapin::Error>((relay, replies))
    };
    let (relay_consumer, reply_consumer) = match consumers.await {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot start consumers");
            let _ =
                tokio::time::timeout(Duration::from_secs(1), link.conn.close(320, "".into())).await;
            return LinkEnd::Lost;
        }
    };
    let link = Arc::new(link);
    let stop = CancellationToken::new();
    s.link_tx.send_replace(Some(link.clone()));
    if !s.cancel.is_cancelled() {
        s.readiness.set(true);
    }
    let end = tokio::select! {
        _ = s.relay.consume(relay_consumer, link.clone(), stop.clone()) => LinkEnd::Lost,
        _ = s.pending.consume(reply_consumer) => LinkEnd::Lost,
        _ = watch_link(&link, &s.readiness, &s.cancel) => LinkEnd::Lost,
        _ = s.cancel.cancelled() => LinkEnd::Shutdown,
    };
    stop.cancel();
    s.readiness.set(false);
    match end {
        LinkEnd::Lost => {
            warn!("lost the broker connection; reconnecting");
            s.link_tx.send_replace(None);
            s.pending.fail_all();
            let _ =
                tokio::time::timeout(Duration::from_secs(1), link.conn.close(320, "".into())).await;
        }
        LinkEnd::Shutdown => {
            let deadline = tokio::time::Instant::now() + s.grace;
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                link.relay.basic_cancel(tag, BasicCancelOptions::default()),
            )
            .await;
            s.relay.tasks.close();
            if tokio::time::timeout_at(deadline, s.relay.tasks.wait())
                .await
                .is_err()
            {
                warn!("deliveries still running after the grace period; they will be redelivered");
            }
            let _ = tokio::time::timeout_at(deadline, s.http_done.cancelled()).await;
            s.link_tx.send_replace(None);
            s.pending.fail_all();
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                link.conn.close(200, "shutdown".into()),
            )
            .await;
        }
    }
    end
}

/// Resolves when the connection or one of its channels fails. While RabbitMQ blocks
/// publishers (an alarm), the link is marked blocked and the replica not ready, so the
/// API answers 503 at once instead of waiting for a confirm that will not come.
async fn watch_link(link: &Link, readiness: &Readiness, cancel: &CancellationToken) {
    let mut events = link.conn.events_listener();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(lapin::Event::Error(e)) => {
                    warn!(error = %e, "broker connection error");
                    return;
                }
                Some(lapin::Event::ConnectionBlocked(reason)) => {
                    warn!(reason, "the broker blocks publishers");
                    link.blocked.store(true, std::sync::atomic::Ordering::Release);
                    readiness.set(false);
                }
                Some(lapin::Event::ConnectionUnblocked) => {
                    info!("the broker accepts publishers again");
                    link.blocked.store(false, std::sync::atomic::Ordering::Release);
                    if !cancel.is_cancelled() {
                        readiness.set(true);
                    }
                }
                Some(_) => {}
                None => return,
            },
            _ = tick.tick() => if !link.is_open() { return },
        }
    }
}
