//! websocket-service binary: configuration, logs, bind, run.

use anyhow::Context;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: websocket_service::Config = mosaic_runtime::config::from_process();
    if let Err(e) = config.validate() {
        mosaic_runtime::config::exit(&e);
    }
    mosaic_runtime::telemetry::init_logs(config.log_format);
    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen_addr))?;
    websocket_service::run(config, listener, mosaic_runtime::signal::terminate()).await?;
    Ok(())
}
