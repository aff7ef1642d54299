//! websocket-service: devices hold authenticated WebSocket sessions; their events go
//! to RabbitMQ with publisher confirms, and commands from RabbitMQ reach the socket
//! of the device they name.
//!
//! # Layout
//!
//! - [`config`]: settings from flags and the environment.
//! - [`auth`]: JWT verification against a fixed set of HMAC and public keys.
//! - `server`: `GET /v1/connect`, the health routes, and [`run`] with its shutdown
//!   sequence.
//! - `admission`: the connection caps (`MAX_CONNECTIONS`, `MAX_UNAUTHENTICATED`).
//! - `session`: the task that owns one device's socket; `session::handshake` runs
//!   in-band authentication, `session::inbound` handles the device's frames.
//! - `registry`: which sessions this replica holds, and their outbound queues.
//! - `broker`: the RabbitMQ connection, its supervisor, publishing with confirms and
//!   the per-device bindings.
//! - `command`: what the replica receives from RabbitMQ: commands delivered to
//!   sessions; `command::fleet` answers the fleet's commands and announces the
//!   replica; `command::revocations` reads the revocation stream.
//! - `fleet`: a device's capabilities and how they travel, and the announcer's
//!   state.
//! - `message`: the AMQP messages the gateway publishes.
//! - `revocations`: the revoked devices this replica knows, and how far it has read
//!   the stream (readiness waits until it has read it all).
//! - `rpc`: requests to device-service (enrol, renew) and their answers.
//! - [`metrics`]: every metric name of the service.
//!
//! ```no_run
//! # async fn demo() -> Result<(), websocket_service::Error> {
//! let config: websocket_service::Config = mosaic_runtime::config::from_process();
//! let listener = tokio::net::TcpListener::bind(config.listen_addr).await?;
//! websocket_service::run(config, listener, mosaic_runtime::signal::terminate()).await
//! # }
//! ```
#![deny(missing_docs, missing_debug_implementations, unsafe_code)]

mod admission;
pub mod auth;
mod broker;
mod command;
pub mod config;
mod fleet;
mod gateway;
mod message;
pub mod metrics;
mod registry;
mod revocations;
mod rpc;
mod server;
mod session;

pub use broker::PublishError;
pub use config::Config;
pub use server::{Error, run};
