//! websocket-service binary: configuration, logs, bind, run.
//!
//! Exit codes: 0 after a shutdown on SIGTERM or SIGINT (and for `--help`,
//! `--version`, `--print-settings`); 64 for a missing or invalid setting, before
//! anything is bound; 1 when the service cannot listen on `LISTEN_ADDR` or fails
//! while running. Every error is one line on stderr.

#[tokio::main]
async fn main() {
    let config: websocket_service::Config = mosaic_runtime::config::from_process();
    if let Err(e) = config.validate() {
        mosaic_runtime::config::exit(&e);
    }
    mosaic_runtime::telemetry::init_logs(config.log_format);
    let listener = match tokio::net::TcpListener::bind(config.listen_addr).await {
        Ok(l) => l,
        Err(e) => mosaic_runtime::config::fail(format_args!(
            "cannot listen on {} (LISTEN_ADDR): {e}",
            config.listen_addr
        )),
    };
    if let Err(e) =
        websocket_service::run(config, listener, mosaic_runtime::signal::terminate()).await
    {
        mosaic_runtime::config::fail(e);
    }
}
