//! A sample Hive: receives device-service deliveries, checks their signature and
//! prints them.
//!
//! ```text
//! mosaic-sample-hive --listen 127.0.0.1:9000 --secret "$HIVE_SIGNING_SECRET"
//! ```

use std::io::Write;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::http::StatusCode;
use clap::Parser;
use mosaic_tools::hive::{self, HiveConfig};
use mosaic_tools::signature::DEFAULT_TOLERANCE_SECS;

/// A sample Hive for the Mosaic gateway: an HTTP receiver that verifies
/// X-Mosaic-Signature and prints every delivery on one line (kind, device, name,
/// data, extra fields, message_id). Point device-service's HIVE_URL at it.
///
/// A bad or missing signature gets 401; a delivery already seen is marked
/// "(duplicate)" (delivery is at least once: deduplicate by message_id).
#[derive(Debug, Parser)]
#[command(name = "mosaic-sample-hive", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the address is printed).
    #[arg(
        long,
        env = "HIVE_LISTEN",
        hide_env_values = true,
        default_value = "127.0.0.1:9000"
    )]
    listen: SocketAddr,
    /// The signing secret shared with device-service (HIVE_SIGNING_SECRET); without
    /// it, deliveries are accepted unchecked.
    #[arg(long, env = "HIVE_SIGNING_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// How far the signature's timestamp may be from this clock, in seconds.
    #[arg(long, default_value_t = DEFAULT_TOLERANCE_SECS)]
    tolerance_secs: u64,
    /// Answer accepted deliveries with this status (e.g. 503 to watch retries).
    #[arg(long, default_value_t = 200)]
    status: u16,
}

fn main() -> std::process::ExitCode {
    let args = mosaic_runtime::config::from_process();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let status = StatusCode::from_u16(args.status).context("--status is not an HTTP status")?;
    let signed = args.secret.is_some();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    println!(
        "[hive] listening on http://{} ({})",
        listener.local_addr()?,
        if signed {
            "checking X-Mosaic-Signature"
        } else {
            "no secret: signatures not checked"
        }
    );
    hive::serve(
        listener,
        HiveConfig {
            secret: args.secret.map(String::into_bytes),
            tolerance_secs: args.tolerance_secs,
            status,
        },
        |line| {
            let _ = writeln!(std::io::stdout().lock(), "[hive {}] {line}", clock());
        },
        mosaic_runtime::signal::terminate(),
    )
    .await?;
    Ok(())
}

/// `HH:MM:SS` UTC, for the log lines.
fn clock() -> String {
    let s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}
