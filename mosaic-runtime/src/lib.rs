//! Process plumbing shared by the Mosaic services, and nothing else.
//!
//! # Layout
//!
//! - [`config`]: parse a clap configuration from arguments and an injectable
//!   environment, and report a bad setting in one line with exit code 64.
//! - [`telemetry`]: `tracing` set-up from `RUST_LOG` and `LOG_FORMAT`, and the
//!   process-wide Prometheus recorder with its periodic upkeep.
//! - [`health`]: the `/healthz`, `/readyz` and `/metrics` routes and the readiness flag.
//! - [`signal`]: a future that resolves on SIGTERM or SIGINT.
//! - [`serve`]: the HTTP server of both services: an axum router with a header-read
//!   timeout and a cap on open connections.
#![deny(missing_docs, missing_debug_implementations, unsafe_code)]

pub mod config;
pub mod health;
pub mod serve;
pub mod signal;
pub mod telemetry;
