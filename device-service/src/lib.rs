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
//! - [`fleet`]: presence, listing, kick, groups and scatter-gather requests across
//!   every gateway replica; the view of the live gateways from their announcements,
//!   and the `gateway_lost` disconnects of a vanished one.
//! - [`registry`]: the device registry and enrolment (v2), in plain Rust types: records,
//!   validation, the bus messages of each change, one-time codes, token minting.
//! - [`tokens`]: Ed25519 device tokens and their JWKS.
//! - [`store`]: PostgreSQL only: the pool, the embedded migrations, one module per
//!   aggregate (devices, enrolments, outbox).
//! - [`outbox`]: publishes the store's outbox (registry messages, revocations) once
//!   committed, removing each message after the broker's confirm.
//! - [`seen`]: `last_seen` and activation from lifecycle messages, off the relay's path.
//! - [`rpc`]: the gateways' requests (enrol, renew) on `mosaic.device-service.rpc`.
//! - [`api`]: the REST API, HTTP only (bearer auth, one module per resource, the
//!   error shape, OpenAPI); it calls the domain modules above.
//! - [`metrics`]: every metric name.
//!
//! [`run`] ties them together: it serves HTTP on the given listener while
//! `mosaic-amqp` keeps one whole link alive, rebuilding it with capped backoff
//! whenever the broker goes away (`/readyz` is false and the API answers 503
//! meanwhile, as while RabbitMQ blocks publishers). With `DATABASE_URL`, a task
//! migrates the schema (retrying until PostgreSQL answers) and then checks the
//! database every second: `/readyz` is false while it is unreachable, the v2 routes
//! answer 503 `database_unavailable`, and everything of v1 (relay, events, requests)
//! goes on; `/readyz/broker` follows the broker alone.
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
pub mod fleet;
pub mod hive;
pub mod metrics;
pub mod outbox;
pub mod pending;
pub mod registry;
pub mod relay;
pub mod rpc;
pub mod seen;
pub mod store;
pub mod tokens;

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
    let health = Health::new(config.database_url.is_some());
    let readiness = health.all.clone();
    let cancel = CancellationToken::new();
    let store = config.database()?.as_ref().map(store::Store::new);
    let outbox_wake = Arc::new(tokio::sync::Notify::new());
    let registry = registry::Registry::new(
        store.clone(),
        config.signer()?,
        outbox_wake.clone(),
        health.database.clone(),
    );
    let seen = store.as_ref().map(|_| Arc::new(seen::Seen::default()));
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
        seen: seen.clone(),
    });
    let grace = config.shutdown_grace();
    info!(
        listen = %listener.local_addr()?,
        replica = %replica,
        concurrency,
        "device-service starting"
    );

    let reply_queue = broker::reply_queue(&replica);
    let fleet_queue = broker::fleet_queue(&replica);
    let (amqp, mut consumers) = Amqp::start(
        config.broker.settings("device-service", replica.clone()),
        broker::plan(&replica, config.hive_concurrency),
        {
            let reply_queue = reply_queue.clone();
            move |ch| broker::declare(ch, reply_queue.clone(), fleet_queue.clone())
        },
    );
    let amqp = Arc::new(amqp);
    let fleet_deliveries = consumers.remove(broker::FLEET_CONSUMER);
    let rpc_requests = consumers.remove(broker::RPC_CONSUMER);
    let replies = consumers.remove(broker::REPLY_CONSUMER);
    let deliveries = consumers.remove(broker::RELAY_CONSUMER);
    let consuming = tokio::spawn(relay.clone().consume(deliveries));
    tokio::spawn(pending.clone().consume(replies));
    tokio::spawn(rpc::serve(
        registry.clone(),
        rpc_requests,
        relay.tasks.clone(),
        config.publish_timeout(),
    ));
    tokio::spawn(follow_link(amqp.watch(), health.clone(), cancel.clone()));
    if let Some(store) = &store {
        tokio::spawn(watch_database(
            store.clone(),
            health.clone(),
            cancel.clone(),
        ));
        tokio::spawn(outbox::drain(
            store.clone(),
            amqp.watch(),
            outbox_wake.clone(),
            config.publish_timeout(),
            cancel.clone(),
        ));
    }
    if let Some(seen) = &seen {
        let seen = seen.clone();
        let registry = registry.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move { seen.run(registry, cancel).await });
    }

    tokio::spawn({
        let cancel = cancel.clone();
        let readiness = readiness.clone();
        let health_on_stop = health.clone();
        async move {
            tokio::select! {
                _ = shutdown => info!("shutdown requested"),
                _ = cancel.cancelled() => {}
            }
            readiness.set(false);
            health_on_stop.update(true);
            cancel.cancel();
        }
    });

    let fleet = fleet::Fleet::new(
        amqp.watch(),
        pending.clone(),
        config.fleet_settings(reply_queue.clone()),
    );
    tokio::spawn(fleet.clone().consume(fleet_deliveries));
    tokio::spawn(fleet.clone().run(cancel.clone()));
    let state = api::ApiState {
        commands: Arc::new(commands::Commands {
            link: amqp.watch(),
            pending: pending.clone(),
            publish_timeout: config.publish_timeout(),
            reply_queue,
        }),
        fleet,
        registry: Arc::new(registry),
    };
    let broker_ready = health.broker.clone();
    let health = mosaic_runtime::health::router(readiness).route(
        "/readyz/broker",
        axum::routing::get(move || {
            let ready = broker_ready.get();
            async move {
                if ready {
                    (axum::http::StatusCode::OK, "ready\n")
                } else {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
        }),
    );
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

/// The readiness flags: the broker link, the database (always up when none is
/// configured), and both together (`/readyz`).
#[derive(Debug, Clone)]
struct Health {
    broker: Readiness,
    database: Readiness,
    all: Readiness,
}

impl Health {
    fn new(has_database: bool) -> Self {
        let database = Readiness::new();
        database.set(!has_database);
        Health {
            broker: Readiness::new(),
            database,
            all: Readiness::new(),
        }
    }

    fn update(&self, shutting_down: bool) {
        let broker = self.broker.get() && !shutting_down;
        if shutting_down {
            self.broker.set(false);
        }
        self.all.set(broker && self.database.get());
    }
}

/// Keeps the broker's readiness in step with the link: ready while a whole link can
/// publish (not while RabbitMQ blocks publishers: the API then answers 503 at once)
/// and until shutdown begins.
async fn follow_link(
    mut links: watch::Receiver<Option<Arc<Link>>>,
    health: Health,
    cancel: CancellationToken,
) {
    loop {
        let up = links
            .borrow_and_update()
            .as_ref()
            .is_some_and(|l| l.can_publish());
        health.broker.set(up && !cancel.is_cancelled());
        health.update(cancel.is_cancelled());
        tokio::select! {
            r = links.changed() => if r.is_err() { return },
            _ = cancel.cancelled() => {
                health.update(true);
                return;
            }
        }
    }
}

/// How often the database is checked.
const DATABASE_CHECK: Duration = Duration::from_secs(1);

/// Migrates the schema (again and again until it works), then checks PostgreSQL
/// every [`DATABASE_CHECK`]; the database's readiness follows.
async fn watch_database(store: store::Store, health: Health, cancel: CancellationToken) {
    let mut migrated = false;
    let mut was_up = None;
    loop {
        if !migrated {
            match store.migrate().await {
                Ok(n) => {
                    info!(applied = n, "database schema up to date");
                    migrated = true;
                }
                Err(e) => warn!(error = %e, "cannot migrate the database yet; retrying"),
            }
        }
        let up = migrated && store.ping().await.is_ok();
        if was_up != Some(up) {
            if up {
                info!("database reachable");
            } else if migrated {
                warn!("database unreachable: v2 routes answer 503, v1 goes on");
            }
            was_up = Some(up);
        }
        metrics::database_up(up);
        health.database.set(up);
        health.update(cancel.is_cancelled());
        tokio::select! {
            _ = tokio::time::sleep(DATABASE_CHECK) => {}
            _ = cancel.cancelled() => return,
        }
    }
}
