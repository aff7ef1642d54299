//! Starts a private RabbitMQ for a test run or a demo, prints its URLs as shell
//! assignments, and keeps it running until this process ends (SIGTERM, SIGINT, or
//! the end of its standard input when `--until-stdin-closes` is given).
//!
//! ```text
//! mosaic-broker --env-file broker.env &
//! . broker.env   # MOSAIC_TEST_AMQP_URL=..., MOSAIC_TEST_MGMT_URL=...
//! ```

use std::io::Write;

fn main() -> anyhow::Result<()> {
    let mut env_file = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--env-file" => env_file = args.next(),
            "-h" | "--help" => {
                println!("usage: mosaic-broker [--env-file FILE]");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    let broker = mosaic_tests::Broker::start()?;
    let text = format!(
        "{}={}\n{}={}\n",
        mosaic_tests::broker::AMQP_URL_VAR,
        broker.amqp_url(),
        mosaic_tests::broker::MGMT_URL_VAR,
        broker.mgmt_url()
    );
    match env_file {
        Some(path) => {
            // Write then rename, so a reader never sees half a file.
            let tmp = format!("{path}.tmp");
            std::fs::write(&tmp, &text)?;
            std::fs::rename(&tmp, &path)?;
        }
        None => {
            print!("{text}");
            std::io::stdout().flush()?;
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        anyhow::Ok(())
    })?;
    broker.stop();
    Ok(())
}
