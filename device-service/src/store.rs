//! PostgreSQL: the only place that speaks SQL. Nothing here knows HTTP or AMQP.
//!
//! - [`Store`]: a bounded connection pool (deadpool-postgres over tokio-postgres),
//!   each connection with a `statement_timeout`; every wait for a connection is
//!   bounded by the acquire timeout.
//! - `migrate`: the schema migrations, embedded in the binary (`migrations/*.sql`)
//!   and applied at start in one transaction under an advisory lock, so several
//!   replicas starting together apply each one exactly once.
//! - [`devices`], [`enrolments`], [`outbox`]: one module per aggregate. A change of a
//!   device commits together with the bus messages it causes (rows of the outbox), so
//!   a committed change is never left unpublished.
//!
//! Errors are sorted by what the caller does next ([`StoreError`]): not found,
//! conflict (a unique key), or unavailable (try again later).

pub mod devices;
pub mod enrolments;
mod migrate;
pub mod outbox;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tracing::warn;

pub use devices::{Device, DeviceFilter, Edit, NewDevice};
pub use outbox::OutboxMessage;

/// How the store reaches PostgreSQL. Its `Debug` leaves the password out.
#[derive(Clone)]
pub struct Settings {
    config: tokio_postgres::Config,
    pool_size: usize,
    acquire_timeout: Duration,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("hosts", &self.config.get_hosts().len())
            .field("database", &self.config.get_dbname())
            .field("pool_size", &self.pool_size)
            .field("acquire_timeout", &self.acquire_timeout)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// Reads a `postgres://` URL. The error never quotes the URL (it holds a password).
    pub fn parse(
        url: &str,
        pool_size: usize,
        acquire_timeout: Duration,
        statement_timeout: Duration,
    ) -> Result<Self, String> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err("must be a postgres:// or postgresql:// URL".into());
        }
        let mut config: tokio_postgres::Config = url.parse().map_err(|_| {
            "is not a valid PostgreSQL URL (postgres://user:password@host:port/database)".to_owned()
        })?;
        if config.get_hosts().is_empty() {
            return Err("names no host".into());
        }
        if config.get_ssl_mode() == SslMode::Require {
            return Err(
                "asks for sslmode=require, but this build speaks plain TCP to PostgreSQL \
                 (use sslmode=disable or prefer, on a private network)"
                    .into(),
            );
        }
        if let Some(password) = config.get_password() {
            let password = String::from_utf8_lossy(password);
            mosaic_runtime::config::refuse_placeholder("DATABASE_URL", &password)
                .map_err(|e| e.message)?;
        }
        config
            .application_name("mosaic-device-service")
            .connect_timeout(acquire_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .options(format!(
                "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
                statement_timeout.as_millis(),
                (statement_timeout * 4).as_millis()
            ));
        Ok(Settings {
            config,
            pool_size,
            acquire_timeout,
        })
    }
}

/// Why a store call failed, sorted by what the caller does next.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No such row.
    #[error("not found")]
    NotFound,
    /// A unique key is taken; the constraint's name says which.
    #[error("conflict on {0}")]
    Conflict(String),
    /// PostgreSQL cannot be reached, timed out, or failed: try again later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
            let constraint = e
                .as_db_error()
                .and_then(|d| d.constraint())
                .unwrap_or("unique")
                .to_owned();
            return StoreError::Conflict(constraint);
        }
        if let Some(db) = e.as_db_error() {
            warn!(code = db.code().code(), message = db.message(), "SQL error");
        }
        StoreError::Unavailable(e.to_string())
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// The connection pool and every query.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.pool.status();
        f.debug_struct("Store")
            .field("size", &s.size)
            .field("max_size", &s.max_size)
            .finish()
    }
}

impl Store {
    /// A pool for `settings`; nothing connects until the first use.
    pub fn new(settings: &Settings) -> Self {
        let manager = Manager::from_config(
            settings.config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(settings.acquire_timeout))
            .create_timeout(Some(settings.acquire_timeout))
            .recycle_timeout(Some(settings.acquire_timeout))
            .build()
            .expect("a runtime is set, so the pool builds");
        Store { pool }
    }

    /// Applies the embedded migrations that are not applied yet (see `migrate`).
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        let mut client = self.pool.get().await?;
        migrate::run(&mut client).await
    }

    /// One round trip: whether PostgreSQL answers now.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Connections open and idle, for metrics.
    pub fn pool_status(&self) -> (usize, usize) {
        let s = self.pool.status();
        (s.size, s.available)
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }
}
