//! The command line, and running the scenarios it names.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::procfs::{self, Machine};
use crate::report::Run;
use crate::scenario::{self, Ctx};
use crate::stack::{Stack, default_bin_dir};

/// The most devices one scenario holds (over every replica and load process).
const MAX_DEVICES: usize = 60_000;
/// The most devices one gateway replica holds here (open files: 20,000 a process).
const MAX_PER_REPLICA: usize = 19_000;

/// Load scenarios against the real Mosaic services, each figure beside a baseline
/// measured in the same run on the same (private) RabbitMQ.
///
/// Starts what it needs (a private RabbitMQ with the Web-MQTT plugin, the release
/// binaries of websocket-service and device-service found beside this executable, a
/// Hive receiver, load processes) and stops everything when it ends. Prints a
/// table; writes a JSON results file and PNG plots when asked. Loopback only; every
/// loop is bounded in count and time.
///
/// Examples:
///
///   mosaic-bench --json idle.json --plots plots idle --devices 1000,10000,19000
///   mosaic-bench relay --events 20000
///   mosaic-bench request --rate 1000 --seconds 10
///   mosaic-bench broadcast --devices 19000 --replicas 3
///   mosaic-bench soak --devices 10000 --duration 10m
///   mosaic-bench registry --devices 10000 --revocations 10000 --clients 16
///   mosaic-bench all --tiny    # every scenario at a tiny size (the smoke test)
#[derive(Debug, Parser)]
#[command(name = "mosaic-bench", version, verbatim_doc_comment)]
pub struct Args {
    /// Write the results (every figure, baseline, ratio, the machine's load, raw
    /// series) to this JSON file.
    #[arg(long, global = true)]
    pub json: Option<PathBuf>,
    /// Write PNG plots into this directory.
    #[arg(long, global = true)]
    pub plots: Option<PathBuf>,
    /// Where the service binaries are (default: beside this executable).
    #[arg(long, global = true)]
    pub bin_dir: Option<PathBuf>,
    /// The most connections one load process holds.
    #[arg(long, global = true, default_value_t = 8_000, value_parser = clap::value_parser!(u64).range(100..=18_000))]
    pub per_process: u64,
    /// Connects in flight at once (over all load processes).
    #[arg(long, global = true, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub concurrency: u64,
    /// The services' log filter (`RUST_LOG`); their logs go to standard error.
    /// `warn` shows why a device was refused.
    #[arg(long, global = true, default_value = "error")]
    pub service_log: String,
    /// No progress bars (they are drawn only on a terminal anyway).
    #[arg(long, global = true)]
    pub no_progress: bool,
    /// Split the cores: the broker on the first N, this tool and everything it
    /// starts (services, load processes, baselines' clients) on the rest, so that
    /// neither side competes with the other for a core. Needs more than N cores.
    #[arg(long, global = true, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub broker_cores: Option<u64>,
    /// The scenario.
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// The scenarios.
#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// 1. Idle devices: gateway memory per device and connect rate, beside Web-MQTT
    ///    and the broker alone doing the same broker work.
    Idle {
        /// Sizes, comma-separated (each at most 19,000: one replica).
        #[arg(long, value_delimiter = ',', default_value = "1000,10000,19000")]
        devices: Vec<usize>,
        /// Keep the gateway's connections open this long after measuring (e.g.
        /// `60s`; at most 10 minutes).
        #[arg(long, default_value = "0s", value_parser = parse_duration)]
        hold: Duration,
    },
    /// 2. Device -> Hive relay, persistent and confirmed, beside a bare publisher
    ///    and consumer on the same quorum queue.
    Relay {
        /// Events per phase.
        #[arg(long, default_value_t = 20_000)]
        events: u64,
        /// Devices sending them.
        #[arg(long, default_value_t = 200)]
        devices: usize,
        /// Rounds (baseline and relay alternate; medians are reported).
        #[arg(long, default_value_t = 1)]
        rounds: usize,
    },
    /// 3. Hive -> device request round trip at a fixed rate (p50/p99/p999), beside
    ///    the raw AMQP request/reply round trip.
    Request {
        /// Requests per second.
        #[arg(long, default_value_t = 1_000)]
        rate: u64,
        /// For how long, seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Devices answering them.
        #[arg(long, default_value_t = 100)]
        devices: usize,
    },
    /// 4. Broadcast to every connected device over several gateway replicas: time
    ///    until the last has the frame, beside Web-MQTT.
    Broadcast {
        /// Devices in all.
        #[arg(long, default_value_t = 19_000)]
        devices: usize,
        /// Gateway replicas.
        #[arg(long, default_value_t = 3)]
        replicas: usize,
        /// Broadcasts (the median round is reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// 5. Soak: devices with steady traffic; RSS and open files sampled, drift
    ///    reported beside the broker's.
    Soak {
        /// Devices.
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// How long (at most 2 h).
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        duration: Duration,
        /// Sampling period.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        sample: Duration,
        /// Time between two events of one device.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        event_every: Duration,
        /// Requests per second from Hive, over all devices.
        #[arg(long, default_value_t = 20)]
        request_rate: u64,
    },
    /// 6. Registry: the gateway's connect rate and memory per device with
    ///    revocations held beside an empty revocation stream; device-service's
    ///    creates and reads on a private PostgreSQL beside pgbench on the same server.
    Registry {
        /// Devices connecting in each gateway phase (at most 19,000: one replica).
        #[arg(long, default_value_t = 10_000)]
        devices: usize,
        /// Revocations (of other devices) loaded into the stream.
        #[arg(long, default_value_t = 10_000)]
        revocations: usize,
        /// Rounds of the two gateway phases, alternated (medians are reported).
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Concurrent REST clients, and pgbench's clients (`-c`).
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Most devices created.
        #[arg(long, default_value_t = 100_000)]
        creates: usize,
        /// Most reads.
        #[arg(long, default_value_t = 200_000)]
        reads: usize,
        /// Longest each REST phase runs, seconds; pgbench's `-T`.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Every scenario in turn on one broker, at one small size: `--tiny` (20 devices,
    /// a few seconds each) is the smoke test.
    All {
        /// 20 devices, 400 events, 100 requests/s for 2 s, a 6 s soak, 100
        /// revocations and 1 s registry phases.
        #[arg(long)]
        tiny: bool,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    mosaic_tools::duration::parse(s).map_err(|e| e.to_string())
}

fn check(scenario: &Scenario) -> anyhow::Result<()> {
    use anyhow::ensure;
    match scenario {
        Scenario::Idle { devices, hold } => {
            ensure!(!devices.is_empty(), "--devices: give at least one size");
            ensure!(
                devices.iter().all(|d| (1..=MAX_PER_REPLICA).contains(d)),
                "--devices: each size between 1 and {MAX_PER_REPLICA} (one replica)"
            );
            ensure!(
                *hold <= Duration::from_secs(600),
                "--hold: at most 10 minutes"
            );
        }
        Scenario::Relay {
            events,
            devices,
            rounds,
        } => {
            ensure!((1..=2_000_000).contains(events), "--events: 1 to 2,000,000");
            ensure!((1..=5_000).contains(devices), "--devices: 1 to 5,000");
            ensure!((1..=10).contains(rounds), "--rounds: 1 to 10");
        }
        Scenario::Request {
            rate,
            seconds,
            devices,
        } => {
            ensure!(
                (1..=20_000).contains(rate),
                "--rate: 1 to 20,000 per second"
            );
            ensure!((1..=600).contains(seconds), "--seconds: 1 to 600");
            ensure!((1..=5_000).contains(devices), "--devices: 1 to 5,000");
        }
        Scenario::Broadcast {
            devices,
            replicas,
            rounds,
        } => {
            ensure!(
                (1..=MAX_DEVICES).contains(devices),
                "--devices: 1 to {MAX_DEVICES}"
            );
            ensure!((1..=8).contains(replicas), "--replicas: 1 to 8");
            ensure!(
                devices.div_ceil(*replicas) <= MAX_PER_REPLICA,
                "--devices: at most {MAX_PER_REPLICA} per replica"
            );
            ensure!((1..=20).contains(rounds), "--rounds: 1 to 20");
        }
        Scenario::Soak {
            devices,
            duration,
            sample,
            event_every,
            request_rate,
        } => {
            ensure!(
                (1..=MAX_PER_REPLICA).contains(devices),
                "--devices: 1 to {MAX_PER_REPLICA}"
            );
            ensure!(
                *duration <= Duration::from_secs(7200),
                "--duration: at most 2 h"
            );
            ensure!(
                *sample >= Duration::from_millis(500) && *sample <= *duration.max(sample),
                "--sample: at least 500ms"
            );
            ensure!(
                *event_every >= Duration::from_millis(100),
                "--event-every: at least 100ms"
            );
            ensure!(*request_rate <= 5_000, "--request-rate: at most 5,000");
        }
        Scenario::Registry {
            devices,
            revocations,
            rounds,
            clients,
            creates,
            reads,
            seconds,
        } => {
            ensure!(
                (1..=MAX_PER_REPLICA).contains(devices),
                "--devices: 1 to {MAX_PER_REPLICA}"
            );
            ensure!(
                (1..=1_000_000).contains(revocations),
                "--revocations: 1 to 1,000,000"
            );
            ensure!((1..=10).contains(rounds), "--rounds: 1 to 10");
            ensure!((1..=200).contains(clients), "--clients: 1 to 200");
            ensure!(
                (1..=1_000_000).contains(creates),
                "--creates: 1 to 1,000,000"
            );
            ensure!((1..=5_000_000).contains(reads), "--reads: 1 to 5,000,000");
            ensure!((1..=600).contains(seconds), "--seconds: 1 to 600");
        }
        Scenario::All { .. } => {}
    }
    Ok(())
}

/// Runs the scenario `args` names; stops everything on Ctrl-C or SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    check(&args.scenario)?;
    let files = mosaic_tests::binary::raise_open_files(20_000);
    let machine = Machine::describe(files);
    let started_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    if let Some(dir) = &args.plots {
        std::fs::create_dir_all(dir)?;
    }
    let bin_dir = args.bin_dir.clone().unwrap_or_else(default_bin_dir);
    let split = match args.broker_cores {
        Some(n) => {
            let n = n as usize;
            anyhow::ensure!(
                n < machine.cpus,
                "--broker-cores {n}: the machine has {} cores, and the rest need one",
                machine.cpus
            );
            // Pinned before anything starts, so every process started after
            // inherits the rest; the broker is moved to its own cores once up.
            procfs::pin(std::process::id(), n..machine.cpus)?;
            Some(n)
        }
        None => None,
    };
    eprintln!(
        "mosaic-bench: {} cores ({}), {:.0} GiB, load average {:.2}; starting a private RabbitMQ",
        machine.cpus, machine.cpu_model, machine.memory_gib, machine.loadavg_at_start
    );
    let settings = Settings {
        service_log: args.service_log.clone(),
        plots: args.plots.clone(),
        per_process: args.per_process as usize,
        concurrency: args.concurrency as usize,
        progress: !args.no_progress && std::io::stderr().is_terminal(),
        broker_cores: split.map(|n| (n, machine.cpus)),
    };
    let mut run = Run {
        tool: format!("mosaic-bench {}", env!("CARGO_PKG_VERSION")),
        started_at,
        machine,
        broker: serde_json::Value::Null,
        scenarios: Vec::new(),
    };
    let work = scenarios(&settings, bin_dir, &args.scenario, &mut run);
    let interrupted = tokio::select! {
        r = work => { r?; false }
        _ = mosaic_runtime::signal::terminate() => true,
    };
    // Everything this run started stops as its handles drop: services by their
    // pipes, load processes by their standard input, the broker by its watchdog.
    if interrupted {
        anyhow::bail!("interrupted: everything started was stopped");
    }
    println!("{}", run.table());
    if let Some(path) = &args.json {
        run.write_json(path)?;
        eprintln!("mosaic-bench: results in {}", path.display());
    }
    if let Some(dir) = &args.plots {
        let n: usize = run.scenarios.iter().map(|s| s.plots.len()).sum();
        eprintln!("mosaic-bench: {n} plots in {}", dir.display());
    }
    Ok(())
}

/// What every scenario's context takes from the command line.
struct Settings {
    service_log: String,
    plots: Option<PathBuf>,
    per_process: usize,
    concurrency: usize,
    progress: bool,
    /// `--broker-cores` and the machine's cores.
    broker_cores: Option<(usize, usize)>,
}

impl Settings {
    fn ctx<'a>(&self, stack: &'a Stack) -> Ctx<'a> {
        Ctx {
            stack,
            plots: self.plots.clone(),
            per_process: self.per_process,
            concurrency: self.concurrency,
            progress: self.progress,
        }
    }
}

/// Starts a private broker and notes its versions in the run.
async fn broker(
    settings: &Settings,
    bin_dir: &std::path::Path,
    run: &mut Run,
) -> anyhow::Result<Stack> {
    let stack = Stack::start(bin_dir.to_owned(), settings.service_log.clone()).await?;
    eprintln!(
        "mosaic-bench: RabbitMQ {} (Erlang {}), Web-MQTT on {}",
        stack.rabbitmq_version, stack.erlang_version, stack.web_mqtt
    );
    let mut cores = serde_json::Value::Null;
    if let Some((n, cpus)) = settings.broker_cores {
        procfs::pin(stack.broker_pid, 0..n)?;
        eprintln!("mosaic-bench: the broker on cores 0..{n}, everything else on {n}..{cpus}");
        cores = serde_json::json!({"broker": format!("0..{n}"), "rest": format!("{n}..{cpus}")});
    }
    run.broker = serde_json::json!({
        "rabbitmq": stack.rabbitmq_version, "erlang": stack.erlang_version, "cores": cores,
    });
    Ok(stack)
}

async fn scenarios(
    settings: &Settings,
    bin_dir: PathBuf,
    which: &Scenario,
    run: &mut Run,
) -> anyhow::Result<()> {
    if let Scenario::Idle { devices, hold } = which {
        // A broker of its own per size: see the idle scenario's documentation.
        for &n in devices {
            let stack = broker(settings, &bin_dir, run).await?;
            let result = scenario::idle::run(&settings.ctx(&stack), &[n], *hold).await?;
            run.scenarios.push(result);
        }
        if let Some(plot) = scenario::idle::memory_plot(settings.plots.as_deref(), &run.scenarios)
            && let Some(last) = run.scenarios.last_mut()
        {
            last.plots.push(plot);
        }
        return Ok(());
    }
    let stack = broker(settings, &bin_dir, run).await?;
    let ctx = &settings.ctx(&stack);
    let out = &mut run.scenarios;
    match which {
        Scenario::Idle { .. } => unreachable!("handled above"),
        Scenario::Relay {
            events,
            devices,
            rounds,
        } => out.push(scenario::relay::run(ctx, *events, *devices, *rounds).await?),
        Scenario::Request {
            rate,
            seconds,
            devices,
        } => out.push(scenario::request::run(ctx, *rate, *seconds, *devices).await?),
        Scenario::Broadcast {
            devices,
            replicas,
            rounds,
        } => out.push(scenario::broadcast::run(ctx, *devices, *replicas, *rounds).await?),
        Scenario::Soak {
            devices,
            duration,
            sample,
            event_every,
            request_rate,
        } => out.push(
            scenario::soak::run(
                ctx,
                scenario::soak::Soak {
                    devices: *devices,
                    duration: *duration,
                    sample: *sample,
                    event_every: *event_every,
                    request_rate: *request_rate,
                },
            )
            .await?,
        ),
        Scenario::Registry {
            devices,
            revocations,
            rounds,
            clients,
            creates,
            reads,
            seconds,
        } => out.push(
            scenario::registry::run(
                ctx,
                &scenario::registry::Registry {
                    devices: *devices,
                    revocations: *revocations,
                    rounds: *rounds,
                    clients: *clients,
                    creates: *creates,
                    reads: *reads,
                    seconds: *seconds,
                },
            )
            .await?,
        ),
        Scenario::All { tiny } => {
            let n = if *tiny { 20 } else { 1_000 };
            out.push(scenario::idle::run(ctx, &[n], Duration::ZERO).await?);
            if let Some(plot) = scenario::idle::memory_plot(ctx.plots.as_deref(), out)
                && let Some(last) = out.last_mut()
            {
                last.plots.push(plot);
            }
            out.push(scenario::relay::run(ctx, (n * 20) as u64, n, 1).await?);
            out.push(scenario::request::run(ctx, 100, if *tiny { 2 } else { 10 }, n).await?);
            out.push(scenario::broadcast::run(ctx, n, 2, 1).await?);
            out.push(
                scenario::soak::run(
                    ctx,
                    scenario::soak::Soak {
                        devices: n,
                        duration: Duration::from_secs(if *tiny { 6 } else { 60 }),
                        sample: Duration::from_secs(if *tiny { 2 } else { 10 }),
                        event_every: Duration::from_secs(1),
                        request_rate: 10,
                    },
                )
                .await?,
            );
            out.push(
                scenario::registry::run(
                    ctx,
                    &scenario::registry::Registry {
                        devices: n,
                        revocations: if *tiny { 100 } else { 10_000 },
                        rounds: 1,
                        clients: if *tiny { 2 } else { 16 },
                        creates: if *tiny { 200 } else { 100_000 },
                        reads: if *tiny { 400 } else { 200_000 },
                        seconds: if *tiny { 1 } else { 10 },
                    },
                )
                .await?,
            );
        }
    }
    Ok(())
}
