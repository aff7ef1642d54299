//! Starts a private PostgreSQL for a test run or a demo, prints its admin URL as a
//! shell assignment, and keeps it running until this process ends (SIGTERM, SIGINT).
//! However this process ends, the server stops and its files are removed.
//!
//! ```text
//! mosaic-postgres --env-file postgres.env &
//! . postgres.env   # MOSAIC_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:PORT/postgres
//! ```

use std::io::Write;

fn main() -> anyhow::Result<()> {
    let mut env_file = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--env-file" => {
                env_file = Some(
                    args.next()
                        .ok_or_else(|| anyhow::anyhow!("--env-file needs a path"))?,
                )
            }
            "-h" | "--help" => {
                println!("usage: mosaic-postgres [--env-file FILE]");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    let pg = mosaic_tests::Postgres::start()?;
    let text = format!(
        "{}={}\n",
        mosaic_tests::postgres::DATABASE_URL_VAR,
        pg.admin_url()
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
    pg.shutdown();
    Ok(())
}
