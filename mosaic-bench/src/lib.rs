//! `mosaic-bench`: the Mosaic load tool. Each scenario runs the real services
//! (release binaries) against a private RabbitMQ it starts, and measures every figure
//! beside a baseline taken in the same run on the same broker; the results go to a
//! table on standard output, a JSON file and PNG plots.
//!
//! ```text
//! mosaic-bench --json results.json --plots plots/ idle --devices 1000,10000,19000
//! ```
//!
//! # Layout
//!
//! - [`cli`]: the command line, and running the scenarios it names.
//! - [`stack`]: the private broker (with Web-MQTT), the services as child processes,
//!   a Hive receiver (the registry scenario adds the harness's private PostgreSQL).
//! - [`load`]: load processes, each holding at most a few thousand connections, and
//!   the line protocol between them and the coordinator; [`load::worker`] is the
//!   load process's side.
//! - [`mqtt`]: the least of MQTT 3.1.1 over WebSocket the baselines need.
//! - [`baseline`]: plain AMQP clients doing the broker's share of the same work.
//! - [`scenario`]: the six scenarios and what they share.
//! - [`procfs`]: memory, CPU and open files from `/proc`; the machine's load.
//! - [`report`]: figures beside baselines, the table, the JSON file.
//! - [`plot`]: the PNG charts.
#![deny(missing_docs, missing_debug_implementations, unsafe_code)]

pub mod baseline;
pub mod cli;
pub mod load;
pub mod mqtt;
pub mod plot;
pub mod procfs;
pub mod report;
pub mod scenario;
pub mod stack;
