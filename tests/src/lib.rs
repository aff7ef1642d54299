//! Test harness for the Mosaic workspace: a private RabbitMQ, isolation per test,
//! a fault proxy, and bounded waits.
//!
//! # Layout
//!
//! - [`mod@broker`]: starts a private RabbitMQ from the distribution's scripts on free
//!   loopback ports, with its own HOME, data and log directories and its own epmd; or
//!   uses the one named by `MOSAIC_TEST_AMQP_URL` / `MOSAIC_TEST_MGMT_URL` (the test
//!   command starts one broker for the whole run and exports those). Each test takes a
//!   fresh vhost with [`broker::Broker::vhost`].
//! - [`amqp`]: plain AMQP for tests that play a peer of a service (a gateway, an
//!   observer of an exchange): connect, listen on an exclusive queue.
//! - [`binary`]: a service binary run for real: refused settings, SIGTERM.
//! - [`device`]: a test device, a real WebSocket client with bounded receives.
//! - [`token`]: device JWTs signed with the test keys (HMAC, RSA, P-256, Ed25519).
//! - [`hive`]: a real HTTP server standing in for Hive: records every request and
//!   answers from a programmable script.
//! - [`proxy`]: a TCP proxy that can cut every connection and refuse new ones, to
//!   play a broker outage.
//! - [`wait`]: "eventually" helpers: poll a condition until it holds or a timeout ends.
//!
//! The broker stops when the process that started it exits, however it exits: a
//! watchdog shell holds the read end of a pipe whose write end only this process holds.

#![deny(missing_docs, missing_debug_implementations, unsafe_code)]

pub mod amqp;
pub mod binary;
pub mod broker;
pub mod device;
pub mod hive;
pub mod proxy;
pub mod token;
pub mod wait;

pub use broker::{Broker, Vhost, broker};
pub use proxy::FaultProxy;
pub use wait::{eventually, readiness, within};
