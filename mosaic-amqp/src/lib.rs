//! mosaic-amqp: the supervised RabbitMQ link both Mosaic services use.
//!
//! A service describes what it needs of every connection (a [`Plan`]: publish
//! channels in confirm mode, consumers with their prefetch) and what to declare on it
//! (a topology callback, run again on every new connection), and gets back an
//! [`Amqp`] handle and one bounded receiver of [`Incoming`] deliveries per consumer.
//! The supervisor owns everything about the connection: connecting (to one node or
//! to the next of several), backoff with jitter, re-declaring the topology,
//! RabbitMQ's blocked-publisher alarm, close timeouts, and its metrics. It hands
//! out whole links only: an `Arc<Link>` works, or is withdrawn and replaced.
//!
//! # Layout
//!
//! - [`settings`]: [`Settings`] and the flags/variables both services read
//!   ([`BrokerArgs`]: `AMQP_URL` and the reconnect and timeout bounds).
//! - `supervisor`: [`Amqp`], [`Plan`], [`Consume`], [`Incoming`] and the loop that keeps
//!   a link alive.
//! - `link`: [`Link`] and confirmed publishing ([`Publish`], [`Routed`],
//!   [`PublishError`]).
//! - [`metrics`]: the link's metric names.
//!
//! ```no_run
//! # async fn demo() {
//! use mosaic_amqp::{Amqp, Plan, Publish, Settings};
//! use std::time::Duration;
//!
//! let settings = Settings {
//!     urls: vec!["amqp://guest:guest@127.0.0.1:5672/%2f".into()],
//!     service: "demo",
//!     id: "1".into(),
//!     connect_timeout: Duration::from_secs(10),
//!     reconnect_min: Duration::from_millis(100),
//!     reconnect_max: Duration::from_secs(5),
//!     close_timeout: Duration::from_secs(2),
//! };
//! let plan = Plan { publishers: 1, consumers: vec![] };
//! let (amqp, _deliveries) = Amqp::start(settings, plan, |_channel| async { Ok(()) });
//! let mut links = amqp.watch();
//! let link = links.wait_for(|l| l.is_some()).await.unwrap().clone().unwrap();
//! let m = Publish {
//!     exchange: "",
//!     routing_key: "some-queue".into(),
//!     mandatory: true,
//!     properties: Default::default(),
//!     body: b"hello".to_vec(),
//! };
//! let routed = link.publish(0, m, Duration::from_secs(5)).await;
//! amqp.shutdown().await;
//! # }
//! ```
#![deny(missing_docs, missing_debug_implementations, unsafe_code)]

mod link;
pub mod metrics;
pub mod settings;
mod supervisor;

pub use link::{
    ACK_TIMEOUT, CONTENT_HEADER_RESERVE, Link, Publish, PublishError, REFUSED_AT_LEAST,
    REFUSED_FOR, Routed, header_str, max_headers_bytes,
};
pub use settings::{BrokerArgs, Settings};
pub use supervisor::{Amqp, Consume, Incoming, Plan};
