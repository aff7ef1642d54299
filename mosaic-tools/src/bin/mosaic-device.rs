//! A device simulator for the Mosaic gateway: one device, or many from one process.
//!
//! ```text
//! mosaic-device --url ws://127.0.0.1:8080/v1/connect --secret "$JWT_SECRET" --count 5
//! mosaic-device --token "$TOKEN" --rate 0 --answer 'fixed:{"on":true}'
//! mosaic-device --secret "$JWT_SECRET" --devices 200 --rate 2 --duration 60s
//! ```

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use mosaic_tools::answer::Answer;
use mosaic_tools::device::{
    self, Credentials, DeviceConfig, DeviceError, EventPlan, Outcome, Output, Stats,
};
use mosaic_tools::token::{KeySource, TokenSpec};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The most devices one process simulates.
const MAX_DEVICES: u32 = 10_000;

/// Simulate Mosaic devices: connect to websocket-service with a token, send events
/// (printing acks), answer requests, print what arrives, and reconnect with
/// exponential backoff and jitter after a close.
///
/// After close 1001 (gateway going away) the device reconnects promptly; after 4401
/// (token refused or expired) it reconnects only if it mints its own tokens
/// (--secret/--key); after 4409 (replaced by a newer connection of the same device)
/// or 4403 it stops.
///
/// Examples:
///
///   # one device, a minted token, 5 events with acks, then exit
///   mosaic-device --secret "$JWT_SECRET" --count 5
///
///   # only listen, answer every request with a fixed reply
///   mosaic-device --token "$TOKEN" --rate 0 --answer 'fixed:{"on":true}'
///
///   # 200 devices, 2 events/s each, for one minute, with a live summary
///   mosaic-device --secret "$JWT_SECRET" --devices 200 --rate 2 --duration 60s
#[derive(Debug, Parser)]
#[command(name = "mosaic-device", version, verbatim_doc_comment)]
struct Args {
    /// The gateway's device endpoint.
    #[arg(
        long,
        env = "MOSAIC_URL",
        hide_env_values = true,
        default_value = "ws://127.0.0.1:8080/v1/connect"
    )]
    url: String,
    /// A device token (JWT). Alternatively give --secret or --key and the simulator
    /// mints (and refreshes) its own.
    #[arg(long, env = "MOSAIC_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A one-time enrolment code: the device sends `enrol` instead of `auth` and
    /// keeps the token it gets for its reconnects (one device only; give --sub).
    #[arg(
        long,
        env = "MOSAIC_ENROL_CODE",
        hide_env_values = true,
        conflicts_with = "token"
    )]
    enrol_code: Option<String>,
    #[command(flatten)]
    keys: KeySource,
    /// `kid` of minted tokens.
    #[arg(long)]
    kid: Option<String>,
    /// `aud` of minted tokens.
    #[arg(long)]
    aud: Option<String>,
    /// `iss` of minted tokens.
    #[arg(long)]
    iss: Option<String>,
    /// A group of minted tokens (the `groups` claim); repeat for several.
    #[arg(long = "group", value_name = "NAME", value_parser = parse_group)]
    groups: Vec<String>,
    /// Lifetime of minted tokens (refreshed in-band at 80 %).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    ttl: Duration,
    /// The device UUID when minting (one device only); random when absent.
    #[arg(long)]
    sub: Option<Uuid>,
    /// Authenticate with an `auth` frame after `hello` instead of the
    /// Authorization header.
    #[arg(long)]
    in_band: bool,
    /// The event name.
    #[arg(long, default_value = "telemetry")]
    event: String,
    /// The event data as JSON; default `{"seq":<n>,"value":<random>}`.
    #[arg(long, value_parser = parse_json)]
    data: Option<Value>,
    /// Events per second per device; 0 sends none (only listens and answers).
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Events per device in all; the device exits once they are all sent and acked.
    /// Without it the device runs until Ctrl-C or --duration.
    #[arg(long)]
    count: Option<u64>,
    /// Send events without `id` (no ack is asked for).
    #[arg(long)]
    no_ids: bool,
    /// How to answer requests: `echo`, `fixed:<json>`, `error`, or `silent` (Hive then gets
    /// a 504 device_timeout).
    #[arg(long, default_value = "echo")]
    answer: Answer,
    /// A service the device offers (a request name it answers); repeat for several.
    /// Declared in the `auth` frame with --in-band, else in a `register` frame after
    /// `welcome`; the gateway then refuses other requests (404
    /// `service_not_supported`). Without it the device takes every request.
    #[arg(long = "service", value_name = "NAME")]
    services: Vec<String>,
    /// Attributes to declare, a JSON object (at most 8 KiB), e.g. '{"fw":"1.2"}'.
    #[arg(long, value_parser = parse_attributes)]
    attributes: Option<serde_json::Map<String, Value>>,
    /// How many devices to simulate, each with its own UUID and token (needs --secret
    /// or --key).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=MAX_DEVICES as i64))]
    devices: u32,
    /// Spread the devices' first connections over this long.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    ramp: Duration,
    /// Stop after this long (e.g. 30s, 5m).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// First reconnect delay.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    backoff_base: Duration,
    /// Longest reconnect delay.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    backoff_max: Duration,
    /// Most events per device waiting for an ack; sending pauses beyond it.
    #[arg(long, default_value_t = 100)]
    max_in_flight: usize,
    /// Print every frame even with several devices.
    #[arg(long)]
    verbose: bool,
    /// Print no frames, only the summary (the default with several devices).
    #[arg(long, conflicts_with = "verbose")]
    quiet: bool,
    /// Prefix of printed lines (one device).
    #[arg(long)]
    label: Option<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    mosaic_tools::duration::parse(s).map_err(|e| e.to_string())
}

fn parse_json(s: &str) -> Result<Value, String> {
    serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))
}

fn parse_group(s: &str) -> Result<String, String> {
    if mosaic_protocol::fleet::valid_group(s) {
        Ok(s.to_owned())
    } else {
        Err("1 to 64 characters of A-Z, a-z, 0-9, `_` and `-`".into())
    }
}

fn parse_attributes(s: &str) -> Result<serde_json::Map<String, Value>, String> {
    match parse_json(s)? {
        Value::Object(m) => {
            let len = serde_json::to_string(&m).map_or(usize::MAX, |t| t.len());
            if len > mosaic_protocol::fleet::MAX_ATTRIBUTES_JSON_BYTES {
                return Err(format!("{len} bytes of JSON; at most 8192"));
            }
            Ok(m)
        }
        _ => Err("must be a JSON object".into()),
    }
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
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        anyhow::bail!("--rate must be a number >= 0");
    }
    let signer = args.keys.signer()?.map(Arc::new);
    if signer.is_none() && args.token.is_none() && args.enrol_code.is_none() {
        anyhow::bail!("give --token, or --secret/--secret-file/--key to mint tokens (see --help)");
    }
    if args.devices > 1 && (signer.is_none() || args.token.is_some()) {
        anyhow::bail!(
            "--devices needs --secret or --key (and no --token): every device mints its own token"
        );
    }
    if args.devices > 1 && args.sub.is_some() {
        anyhow::bail!("--sub names one device; leave it out with --devices");
    }
    let many = args.devices > 1;
    let print_frames = if many { args.verbose } else { !args.quiet };
    let interval = (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate));

    let stats = Arc::new(Stats::default());
    let cancel = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.devices {
        let (device, credentials) = match (&args.token, &signer) {
            _ if args.enrol_code.is_some() => (
                args.sub.unwrap_or_default(),
                mosaic_tools::device::Enrolment::credentials(
                    args.enrol_code.clone().unwrap_or_default(),
                ),
            ),
            (Some(t), _) => (args.sub.unwrap_or_default(), Credentials::Token(t.clone())),
            (None, Some(signer)) => {
                let sub = args.sub.unwrap_or_else(Uuid::new_v4);
                let spec = TokenSpec {
                    sub,
                    ttl: args.ttl,
                    kid: args.kid.clone(),
                    aud: args.aud.clone(),
                    iss: args.iss.clone(),
                    groups: args.groups.clone(),
                };
                let signer = signer.clone();
                (sub, Credentials::Mint { signer, spec })
            }
            (None, None) => unreachable!("checked above"),
        };
        let label = match &args.label {
            Some(l) if !many => l.clone(),
            _ if device.is_nil() => "device".to_owned(),
            _ => device.to_string()[..8].to_owned(),
        };
        let cfg = DeviceConfig {
            url: args.url.clone(),
            device,
            credentials,
            in_band: args.in_band,
            events: EventPlan {
                name: args.event.clone(),
                data: args.data.clone(),
                interval,
                count: args.count,
                with_ids: !args.no_ids,
            },
            answer: args.answer.clone(),
            capabilities: mosaic_protocol::fleet::Capabilities {
                services: (!args.services.is_empty()).then(|| {
                    let mut s = args.services.clone();
                    s.sort();
                    s.dedup();
                    s
                }),
                attributes: args.attributes.clone(),
            },
            backoff_base: args.backoff_base,
            backoff_max: args.backoff_max,
            max_in_flight: args.max_in_flight.max(1),
            output: if print_frames {
                Output::Print {
                    label: label.clone(),
                }
            } else {
                Output::Quiet
            },
            source: None,
        };
        let delay = args.ramp.mul_f64(f64::from(i) / f64::from(args.devices));
        let stats = stats.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => return (label, Ok(Outcome::Cancelled)),
            }
            (label, device::run(cfg, stats, cancel).await)
        });
    }

    let deadline = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let terminate = mosaic_runtime::signal::terminate();
    tokio::pin!(terminate);
    let progress_on = many || args.quiet;
    let tty = std::io::stderr().is_terminal();
    let mut progress = tokio::time::interval(if tty {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(5)
    });
    progress.tick().await;
    let mut failures = 0u32;
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok((label, result))) => {
                    if let Err(e) = result {
                        failures += 1;
                        stats.stopped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        report_failure(&label, &e, tty && progress_on);
                    }
                }
                Some(Err(e)) => {
                    failures += 1;
                    eprintln!("a device task failed: {e}");
                }
            },
            _ = progress.tick(), if progress_on => {
                if tty {
                    eprint!("\r\x1b[K{stats}");
                    let _ = std::io::stderr().flush();
                } else {
                    eprintln!("{stats}");
                }
            }
            _ = &mut deadline, if !cancel.is_cancelled() => cancel.cancel(),
            _ = &mut terminate, if !cancel.is_cancelled() => cancel.cancel(),
        }
    }
    if progress_on {
        if tty {
            eprintln!("\r\x1b[K{stats}");
        } else {
            eprintln!("{stats}");
        }
    }
    if failures > 0 {
        anyhow::bail!("{failures} device(s) stopped with an error");
    }
    Ok(())
}

fn report_failure(label: &str, e: &DeviceError, clear_line: bool) {
    if clear_line {
        eprint!("\r\x1b[K");
    }
    eprintln!("[{label}] stopped: {e}");
}
