//! Test harness for the Mosaic workspace: a private RabbitMQ (one node or a
//! cluster), a private PostgreSQL, isolation per test, real binaries, a fault proxy,
//! and bounded waits.
//!
//! # Layout
//!
//! - [`mod@broker`]: starts a private RabbitMQ from the distribution's scripts on free
//!   loopback ports, with its own HOME, data and log directories and its own epmd,
//!   optionally with extra configuration ([`broker::NodeConfig`]: a short
//!   `consumer_timeout`, say); or uses the one named by `MOSAIC_TEST_AMQP_URL` /
//!   `MOSAIC_TEST_MGMT_URL` (the test command starts one broker for the whole run and
//!   exports those). Each test takes a fresh vhost with [`broker::Broker::vhost`].
//! - [`cluster`]: a RabbitMQ cluster of several nodes on this machine, sharing one
//!   private epmd and cookie; single nodes stop cleanly, die by SIGKILL, and come back
//!   to rejoin.
//! - [`mod@postgres`]: a private PostgreSQL from the distribution's package, or the one
//!   named by `MOSAIC_TEST_DATABASE_URL`; each test takes a fresh database with
//!   [`postgres::Postgres::database`]; a private server stops and starts again.
//! - [`amqp`]: plain AMQP for tests that play a peer of a service (a gateway, an
//!   observer of an exchange): connect, listen on an exclusive queue.
//! - [`binary`]: a service binary run for real: refused settings, SIGTERM, SIGKILL,
//!   its resident memory, its standard error kept for a failing test.
//! - [`device`]: a test device, a real WebSocket client with bounded receives.
//! - [`token`]: device JWTs signed with the test keys (HMAC, RSA, P-256, Ed25519).
//! - [`hive`]: a real HTTP server standing in for Hive: records every request and
//!   answers from a programmable script.
//! - [`proxy`]: a TCP proxy that can cut every connection and refuse new ones, to
//!   play a broker outage.
//! - [`wait`]: "eventually" helpers: poll a condition until it holds or a timeout ends.
//!
//! Every server the harness starts stops when the process that started it exits,
//! however it exits: a watchdog shell holds the read end of a pipe whose write end
//! only this process holds, and at its end stops the servers and removes their
//! directories.

#![deny(missing_docs, missing_debug_implementations, unsafe_code)]

pub mod amqp;
pub mod binary;
pub mod broker;
pub mod cluster;
pub mod device;
pub mod hive;
pub mod postgres;
pub mod proxy;
pub mod token;
pub mod wait;
mod watchdog;

pub use broker::{Broker, NodeConfig, Vhost, broker};
pub use cluster::Cluster;
pub use postgres::{Postgres, postgres};
pub use proxy::FaultProxy;
pub use wait::{eventually, readiness, within};
