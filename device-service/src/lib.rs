//! device-service: relays every device message from RabbitMQ to Hive, at least once,
//! and gives Hive a REST API to send events and confirmed requests to devices.
//!
//! # Layout
//!
//! - [`config`]: the settings (flags mirrored by environment variables).
//! - [`broker`]: what the service asks of RabbitMQ: its queues, consumers and
//!   topology, declared on every connection of the supervised link (`mosaic-amqp`).
//! - [`relay`]: one task per delivery, POST to Hive, retry with backoff, park in the
//!   retry queue, dead-letter, ack after the outcome.
//! - [`hive`]: the POST body rebuilt from headers and body, its signature, and the
//!   sorting of Hive's answers into delivered / retry / rejected.
//! - [`commands`]: events and requests to devices on `mosaic.commands`, and their
//!   answers, in plain Rust types.
//! - [`pending`]: requests waiting for a device's answer, and the reply-queue consumer.
//! - [`api`]: the REST API, HTTP only (bearer auth, one module per resource, the
//!   error shape, OpenAPI); it calls the domain modules above.
//! - [`metrics`]: every metric name.
//!
//! [`run`] ties them together: it serves HTTP on the given listener while
//! `mosaic-amqp` keeps one whole link alive, rebuilding it with capped backoff
//! whenever the broker goes away (`/readyz` is false and the API answers 503
//! meanwhile, as while RabbitMQ blocks publishers).
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
pub mod commands;
pub mod config;
pub mod hive;
pub mod metrics;
pub mod pending;
pub mod relay;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use mosaic_amqp::{Amqp, Link};
use mosaic_runtime::health::Readiness;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::Config;

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
    let pending = Pending::new(config.max_pending_requests as usize);
    let relay = Arc::new(Relay {
        hive,
        policy: RetryPolicy {
            base: Duration::from_millis(config.retry_base_ms),
            max: Duration::from_millis(config.retry_max_ms),
            max_attempts: config.hive_max_attempts,
            max_age: Duration::from_millis(config.hive_max_age_ms),
        },
        hold_max: Duration::from_millis(config.hive_hold_max_ms),
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

    let reply_queue = broker::reply_queue(&replica);
    let (amqp, mut consumers) = Amqp::start(
        config.broker.settings("device-service", replica.clone()),
        broker::plan(&replica, config.hive_concurrency),
        {
            let reply_queue = reply_queue.clone();
            move |ch| broker::declare(ch, reply_queue.clone())
        },
    );
    let amqp = Arc::new(amqp);
    let replies = consumers.remove(broker::REPLY_CONSUMER);
    let deliveries = consumers.remove(broker::RELAY_CONSUMER);
    let consuming = tokio::spawn(relay.clone().consume(deliveries));
    tokio::spawn(pending.clone().consume(replies));
    tokio::spawn(follow_link(amqp.watch(), readiness.clone(), cancel.clone()));

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
        commands: Arc::new(commands::Commands {
            link: amqp.watch(),
            pending: pending.clone(),
            publish_timeout: config.publish_timeout(),
            reply_queue,
        }),
    };
    let health = mosaic_runtime::health::router(readiness);
    let body = api::BodyLimits {
        max_bytes: config.max_body_bytes as usize,
        timeout: Duration::from_millis(config.header_read_timeout_ms),
    };
    let app = api::router(state, tokens, body, health);
    let server = mosaic_runtime::serve::serve(
        listener,
        app,
        config.http_limits(),
        cancel.clone().cancelled_owned(),
    );
    // Once shutdown begins: no more deliveries, and the ones in flight finish or go
    // back to the queue, within the grace period.
    let drain = tokio::spawn({
        let cancel = cancel.clone();
        let relay = relay.clone();
        let amqp = amqp.clone();
        async move {
            cancel.cancelled().await;
            let deadline = tokio::time::Instant::now() + grace;
            amqp.cancel_consumers().await;
            let _ = consuming.await;
            relay.tasks.close();
            if tokio::time::timeout_at(deadline, relay.tasks.wait())
                .await
                .is_err()
            {
                warn!("deliveries still running after the grace period; they will be redelivered");
            }
        }
    });
    let served = tokio::select! {
        r = server => r,
        _ = async { cancel.cancelled().await; tokio::time::sleep(grace).await } => {
            warn!("HTTP requests still running after the grace period; closing");
            Ok(())
        }
    };
    // Stop everything else too if the server ended by itself.
    cancel.cancel();
    let _ = tokio::time::timeout(grace + Duration::from_secs(5), drain).await;
    pending.fail_all();
    amqp.shutdown().await;
    info!("device-service stopped");
    Ok(served?)
}

/// Keeps `/readyz` in step with the link: ready while a whole link can publish (not
/// while RabbitMQ blocks publishers: the API then answers 503 at once) and until
/// shutdown begins.
async fn follow_link(
    mut links: watch::Receiver<Option<Arc<Link>>>,
    readiness: Readiness,
    cancel: CancellationToken,
) {
    loop {
        let up = links
            .borrow_and_update()
            .as_ref()
            .is_some_and(|l| l.can_publish());
        readiness.set(up && !cancel.is_cancelled());
        tokio::select! {
            r = links.changed() => if r.is_err() { return },
            _ = cancel.cancelled() => {
                readiness.set(false);
                return;
            }
        }
    }
}
