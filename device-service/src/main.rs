//! device-service: parse the settings, start logs, bind, run until SIGTERM.
//!
//! Exit codes: 0 after a shutdown on SIGTERM or SIGINT (and for `--help`,
//! `--version`, `--print-settings`); 64 for a missing or invalid setting, before
//! anything is bound; 1 when the service cannot listen on `LISTEN_ADDR` or fails
//! while running. Every error is one line on stderr.

use device_service::{Config, run};
use mosaic_runtime::{config, signal, telemetry};

#[tokio::main]
async fn main() {
    let config: Config = config::from_process();
    if let Err(e) = config.validate() {
        config::exit(&e);
    }
    telemetry::init_logs(config.log_format);
    let listener = match tokio::net::TcpListener::bind(config.listen_addr).await {
        Ok(l) => l,
        Err(e) => config::fail(format_args!(
            "cannot listen on {} (LISTEN_ADDR): {e}",
            config.listen_addr
        )),
    };
    if let Err(e) = run(config, listener, signal::terminate()).await {
        config::fail(e);
    }
}
