//! device-service: parse the settings, start logs, bind, run until SIGTERM.

use device_service::{Config, run};
use mosaic_runtime::{config, signal, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = config::from_process();
    if let Err(e) = config.validate() {
        config::exit(&e);
    }
    telemetry::init_logs(config.log_format);
    let listener = tokio::net::TcpListener::bind(config.listen_addr).await?;
    run(config, listener, signal::terminate()).await?;
    Ok(())
}
