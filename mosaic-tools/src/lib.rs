//! Developer tools for the Mosaic gateway: the code behind three binaries.
//!
//! - `mosaic-device`: a device simulator (one device, or many from one process).
//! - `mosaic-token`: mints device JWTs.
//! - `mosaic-sample-hive`: an HTTP receiver that verifies `X-Mosaic-Signature` and
//!   prints each delivery.
//!
//! # Layout
//!
//! - [`duration`]: human durations on the command line (`500ms`, `30s`, `1h`).
//! - [`token`]: device JWT minting with an HMAC secret or a private key.
//! - [`signature`]: the `X-Mosaic-Signature` scheme (sign and verify).
//! - [`backoff`]: reconnect delays (exponential with jitter) and what each close
//!   code means for a device.
//! - [`answer`]: how a simulated device answers requests.
//! - [`device`]: one simulated device session loop and the counters it reports.
//! - [`hive`]: the sample Hive's router and its readable rendering of a delivery.
#![deny(missing_docs, missing_debug_implementations, unsafe_code)]

pub mod answer;
pub mod backoff;
pub mod device;
pub mod duration;
pub mod hive;
pub mod signature;
pub mod token;
