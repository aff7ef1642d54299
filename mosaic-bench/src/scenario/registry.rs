//! Scenario 6, the registry: what revocations cost a gateway, and what the REST
//! registry does on PostgreSQL.
//!
//! 1. **Revocations cost nothing per connect.** The idle scenario's gateway connects
//!    (no Web-MQTT phase) on one broker, in two vhosts: one whose
//!    `mosaic.revocations` stream is empty, one into which revocations of other
//!    devices were appended (in device-service's format) before any gateway
//!    started. Each phase starts a fresh replica, which replays the stream before it
//!    is ready (its `mosaic_ws_revoked_devices` gauge is checked), notes its RSS,
//!    takes the devices and notes its RSS again. The phases alternate for a few
//!    rounds (medians compared); the empty stream is the baseline.
//! 2. **Registry throughput beside pgbench.** A private PostgreSQL (the test
//!    harness's), device-service on it, `C` REST clients creating devices and then
//!    reading them; the baseline is the distribution's `pgbench` on the same server
//!    with as many clients, its TPC-B-like write transaction and its select-only one.

use std::time::{Duration, Instant};

use serde_json::json;

use super::{CpuShares, Ctx};
use crate::plot::{self, Series};
use crate::procfs::{self, LoadMeter};
use crate::report::{Better, Figure, ScenarioResult, Value, percentile};
use crate::stack::Hive;

pub mod api;
pub mod gateway;
pub mod pgbench;
pub mod revocations;

use gateway::{Boot, boot};

/// The scenario's settings.
#[derive(Debug, Clone)]
pub struct Registry {
    /// Devices connecting in each gateway phase.
    pub devices: usize,
    /// Revocations in the loaded stream.
    pub revocations: usize,
    /// Rounds of the two gateway phases.
    pub rounds: usize,
    /// Concurrent REST clients, and pgbench's `-c`.
    pub clients: usize,
    /// Most devices created.
    pub creates: usize,
    /// Most reads.
    pub reads: usize,
    /// Longest each REST phase runs, and pgbench's `-T`.
    pub seconds: u64,
}

/// The median (the mean of the middle two for an even count); NaN when empty.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx<'_>, s: &Registry) -> anyhow::Result<ScenarioResult> {
    let meter = LoadMeter::start();
    let mut figures = Vec::new();
    let mut plots = Vec::new();

    // 1. Revocations and connects.
    let stack = ctx.stack;
    let empty_vh = stack.vhost("registry-empty").await;
    let loaded_vh = stack.vhost("registry-revoked").await;
    let load_s = revocations::load(&loaded_vh.amqp_url, s.revocations).await?;
    ctx.say(format!(
        "registry: {} revocations appended to the stream in {load_s:.2} s ({:.0}/s)",
        s.revocations,
        s.revocations as f64 / load_s.max(1e-9)
    ));
    let mut boots = Vec::new();
    for round in 1..=s.rounds {
        // Alternate which goes first, so drift in the machine's load hits both.
        let order = if round % 2 == 1 {
            [
                ("empty", &empty_vh, 0),
                ("loaded", &loaded_vh, s.revocations),
            ]
        } else {
            [
                ("loaded", &loaded_vh, s.revocations),
                ("empty", &empty_vh, 0),
            ]
        };
        for (stream, vh, expect) in order {
            boots.push(boot(ctx, vh, s.devices, expect, stream, round).await?);
        }
    }
    let of = |stream: &str, f: &dyn Fn(&Boot) -> f64| {
        median(boots.iter().filter(|b| b.stream == stream).map(f).collect())
    };
    let rate = (
        of("loaded", &|b| b.connect_rate),
        of("empty", &|b| b.connect_rate),
    );
    let per = (
        of("loaded", &|b| b.rss_per_device_kib),
        of("empty", &|b| b.rss_per_device_kib),
    );
    let ready_rss = (
        of("loaded", &|b| b.rss_ready_kib as f64),
        of("empty", &|b| b.rss_ready_kib as f64),
    );
    let ready_s = (of("loaded", &|b| b.ready_s), of("empty", &|b| b.ready_s));
    let failed: usize = boots.iter().map(|b| b.failed).sum();
    let rounds_of = |stream: &str, f: &dyn Fn(&Boot) -> String| {
        boots
            .iter()
            .filter(|b| b.stream == stream)
            .map(f)
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let (n, r) = (s.devices, s.revocations);
    let last_loaded = boots.iter().rfind(|b| b.stream == "loaded");
    let refused = if failed > 0 {
        format!(" ({failed} refused over all phases)")
    } else {
        String::new()
    };
    figures.push(Figure::new(
        Value::new(
            format!("gateway connect rate, {n} devices, {r} revocations held{refused}"),
            rate.0,
            "/s",
        ),
        Value::new("the same, empty revocation stream", rate.1, "/s"),
        Better::Higher,
        format!(
            "median of {} rounds ({} vs {}); loaded phase {}",
            s.rounds,
            rounds_of("loaded", &|b| format!("{:.0}", b.connect_rate)),
            rounds_of("empty", &|b| format!("{:.0}", b.connect_rate)),
            last_loaded.map_or("", |b| b.limit.as_str())
        ),
    ));
    figures.push(Figure::new(
        Value::new(
            format!("gateway RSS per idle device, {r} revocations held"),
            per.0,
            "KiB",
        ),
        Value::new("the same, empty revocation stream", per.1, "KiB"),
        Better::Lower,
        format!(
            "median of {} rounds ({} vs {} KiB)",
            s.rounds,
            rounds_of("loaded", &|b| format!("{:.2}", b.rss_per_device_kib)),
            rounds_of("empty", &|b| format!("{:.2}", b.rss_per_device_kib)),
        ),
    ));
    let held_kib = ready_rss.0 - ready_rss.1;
    figures.push(Figure::new(
        Value::new(format!("gateway RSS when ready, {r} revocations held"), ready_rss.0, "KiB"),
        Value::new("the same, empty revocation stream", ready_rss.1, "KiB"),
        Better::Lower,
        format!(
            "holding {r} revocations: {held_kib:.0} KiB ({:.0} bytes each), the map and what reading the stream left allocated",
            held_kib * 1024.0 / r.max(1) as f64
        ),
    ));
    figures.push(Figure::new(
        Value::new(
            format!("gateway start to ready, {r} revocations replayed"),
            ready_s.0 * 1e3,
            "ms",
        ),
        Value::new("the same, empty revocation stream", ready_s.1 * 1e3, "ms"),
        Better::Lower,
        format!(
            "replaying {r} revocations adds {:.0} ms; appending them took {load_s:.2} s",
            (ready_s.0 - ready_s.1) * 1e3
        ),
    ));
    if let Some(path) = ctx.plot_path("registry-connect-rate.png") {
        let last = |stream: &str| {
            boots
                .iter()
                .rfind(|b| b.stream == stream)
                .map(|b| b.offsets.clone())
                .unwrap_or_default()
        };
        let (l, e) = (last("loaded"), last("empty"));
        let seconds = l
            .last()
            .copied()
            .unwrap_or(0.0)
            .max(e.last().copied().unwrap_or(0.0));
        let bucket = (seconds / 40.0).max(0.1);
        let drawn = plot::lines(
            &path,
            &format!("Gateway connect rate, {n} devices (last round)"),
            "seconds since the first connect",
            "connects per second",
            &[
                Series::new(
                    format!("{r} revocations held"),
                    plot::rate_over_time(&l, bucket),
                ),
                Series::new("empty revocation stream", plot::rate_over_time(&e, bucket)),
            ],
            false,
        );
        match drawn {
            Ok(()) => plots.push("registry-connect-rate.png".into()),
            Err(e) => ctx.say(format!("plot skipped: {e:#}")),
        }
    }

    // 2. The registry beside pgbench, on one private PostgreSQL.
    let (rest, rest_figures, rest_plot) = registry_vs_pgbench(ctx, s).await?;
    figures.extend(rest_figures);
    plots.extend(rest_plot);

    Ok(ScenarioResult {
        scenario: "registry".into(),
        settings: json!({
            "devices": s.devices, "revocations": s.revocations, "rounds": s.rounds,
            "clients": s.clients, "creates": s.creates, "reads": s.reads,
            "seconds": s.seconds, "concurrency": ctx.concurrency,
        }),
        load: meter.finish(),
        figures,
        details: json!({
            "revocations_append_s": load_s,
            "gateway": boots,
            "rest": rest,
        }),
        plots,
    })
}

/// Part 2: device-service's creates and reads, and pgbench's write and read-only
/// runs, on one private PostgreSQL.
async fn registry_vs_pgbench(
    ctx: &Ctx<'_>,
    s: &Registry,
) -> anyhow::Result<(serde_json::Value, Vec<Figure>, Option<String>)> {
    let stack = ctx.stack;
    let broker = stack.broker_pid;
    let cpus = procfs::Machine::describe(0).cpus;
    let pg = tokio::task::spawn_blocking(mosaic_tests::Postgres::start).await??;
    let server = pg.server_pid().unwrap_or(0);
    procfs::track_tree(server);
    let result = async {
        let registry_url = pg.database("registry").await;
        let pgbench_url = pg.database("pgbench").await;
        let pgbench_db = pgbench_url.rsplit('/').next().unwrap_or_default().to_owned();
        let hive = Hive::start().await?;
        let vh = stack.vhost("registry-api").await;
        let pool = (s.clients + 1).to_string();
        let ds = stack
            .device_service(
                &vh,
                &hive.url,
                &[
                    ("DATABASE_URL", registry_url.as_str()),
                    ("DATABASE_POOL_SIZE", pool.as_str()),
                    ("TOKEN_SIGNING_KEY", mosaic_tests::token::ED_PRIVATE_PEM),
                ],
            )
            .await?;
        let limit = Duration::from_secs(s.seconds);
        let shares = |with_ds: bool| {
            let mut groups = vec![("broker", vec![broker])];
            if with_ds {
                groups.push(("device-service", vec![ds.pid]));
            }
            CpuShares::start(groups).with_children("postgres", server)
        };

        pgbench::init(&pg, &pgbench_db, 1).await?;
        let sh = shares(false);
        let bar = ctx.bar(s.seconds, "pgbench TPC-B-like");
        bar.enable_steady_tick(Duration::from_millis(200));
        let write = pgbench::run(&pg, &pgbench_db, s.clients, s.seconds, false).await?;
        bar.finish_and_clear();
        let (write_limit, _) = sh.describe(cpus);

        let sh = shares(true);
        let bar = ctx.bar(s.creates as u64, "registry creates");
        bar.enable_steady_tick(Duration::from_millis(200));
        let creates = api::creates(ds.addr, s.clients, s.creates, limit).await?;
        bar.finish_and_clear();
        let (create_limit, create_cores) = sh.describe(cpus);
        // Each create's registry message is published from the outbox after the
        // answer, then relayed to Hive: how far the outbox got during the creates,
        // and a wait (bounded) until every message reached Hive, so that the next
        // phases do not share the machine with the backlog.
        let outbox_at_end = revocations::metric(ds.addr, "mosaic_device_outbox_published_total")
            .await?
            .unwrap_or(0.0) as u64;
        let published_wait = Instant::now();
        let want = creates.ok as u64;
        while hive.posts.load(std::sync::atomic::Ordering::Relaxed) < want
            && published_wait.elapsed() < Duration::from_secs(180)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let published = hive.posts.load(std::sync::atomic::Ordering::Relaxed);
        let published_s = published_wait.elapsed().as_secs_f64();
        ctx.say(format!(
            "registry: {} creates ({} failed) in {:.1} s, {:.0}/s, p50 {:.2} ms, p99 {:.2} ms; outbox published {outbox_at_end} by their end, {published} at Hive {published_s:.1} s after; pgbench TPC-B-like {:.0} tps, p50 {:.2} ms, p99 {:.2} ms",
            creates.ok,
            creates.failed,
            creates.seconds,
            creates.rate(),
            percentile(&creates.latencies_ms, 0.5),
            percentile(&creates.latencies_ms, 0.99),
            write.tps,
            percentile(&write.latencies_ms, 0.5),
            percentile(&write.latencies_ms, 0.99),
        ));
        if let Some(e) = &creates.first_error {
            ctx.say(format!("registry: first failed create: {e}"));
        }

        let sh = shares(false);
        let bar = ctx.bar(s.seconds, "pgbench select-only");
        bar.enable_steady_tick(Duration::from_millis(200));
        let select = pgbench::run(&pg, &pgbench_db, s.clients, s.seconds, true).await?;
        bar.finish_and_clear();
        let (select_limit, _) = sh.describe(cpus);

        let sh = shares(true);
        let bar = ctx.bar(s.reads as u64, "registry reads");
        bar.enable_steady_tick(Duration::from_millis(200));
        let reads = api::reads(ds.addr, s.clients, s.reads, limit, &creates.ids).await?;
        bar.finish_and_clear();
        let (read_limit, read_cores) = sh.describe(cpus);
        ctx.say(format!(
            "registry: {} reads ({} failed) in {:.1} s, {:.0}/s, p50 {:.2} ms, p99 {:.2} ms; pgbench -S {:.0} tps, p50 {:.2} ms, p99 {:.2} ms",
            reads.ok,
            reads.failed,
            reads.seconds,
            reads.rate(),
            percentile(&reads.latencies_ms, 0.5),
            percentile(&reads.latencies_ms, 0.99),
            select.tps,
            percentile(&select.latencies_ms, 0.5),
            percentile(&select.latencies_ms, 0.99),
        ));
        if let Some(e) = &reads.first_error {
            ctx.say(format!("registry: first failed read: {e}"));
        }
        ds.stop().await;

        let c = s.clients;
        let failed = |p: &api::Phase| {
            if p.failed > 0 {
                format!(", {} failed", p.failed)
            } else {
                String::new()
            }
        };
        let mut figures = vec![
            Figure::new(
                Value::new(
                    format!("registry creates (POST /v1/devices), {c} clients{}", failed(&creates)),
                    creates.rate(),
                    "/s",
                ),
                Value::new(format!("pgbench TPC-B-like, -c {c}"), write.tps, "tx/s"),
                Better::Higher,
                format!("registry: {create_limit}; pgbench: {write_limit}"),
            ),
            Figure::new(
                Value::new(
                    format!("registry reads (GET /v1/devices/{{id}}), {c} clients{}", failed(&reads)),
                    reads.rate(),
                    "/s",
                ),
                Value::new(format!("pgbench -S (select-only), -c {c}"), select.tps, "tx/s"),
                Better::Higher,
                format!("registry: {read_limit}; pgbench: {select_limit}"),
            ),
        ];
        for (p, name) in [(0.5, "p50"), (0.99, "p99")] {
            figures.push(Figure::new(
                Value::new(format!("registry create {name}"), percentile(&creates.latencies_ms, p), "ms"),
                Value::new(format!("pgbench TPC-B-like {name}"), percentile(&write.latencies_ms, p), "ms"),
                Better::Lower,
                "a create is HTTP + JSON + one transaction of two INSERTs; a TPC-B-like transaction is five statements",
            ));
        }
        for (p, name) in [(0.5, "p50"), (0.99, "p99")] {
            figures.push(Figure::new(
                Value::new(format!("registry read {name}"), percentile(&reads.latencies_ms, p), "ms"),
                Value::new(format!("pgbench -S {name}"), percentile(&select.latencies_ms, p), "ms"),
                Better::Lower,
                "a read is HTTP + one SELECT + a presence ask through the broker; -S is one SELECT",
            ));
        }
        let plot = latency_plot(ctx, &creates, &write, &reads, &select);
        let details = json!({
            "creates": {"ok": creates.ok, "failed": creates.failed, "first_error": creates.first_error,
                "seconds": creates.seconds, "rate": creates.rate(), "max_ms": creates.latencies_ms.last(),
                "outbox_published_during": outbox_at_end,
                "published_to_hive": published, "published_wait_s": published_s, "cores": create_cores},
            "reads": {"ok": reads.ok, "failed": reads.failed, "first_error": reads.first_error,
                "seconds": reads.seconds, "rate": reads.rate(), "max_ms": reads.latencies_ms.last(),
                "cores": read_cores},
            "pgbench_write": {"tps": write.tps, "transactions": write.transactions, "failed": write.failed},
            "pgbench_select": {"tps": select.tps, "transactions": select.transactions, "failed": select.failed},
            "database_pool_size": s.clients + 1,
        });
        anyhow::Ok((details, figures, plot))
    }
    .await;
    procfs::retire(server);
    pg.shutdown();
    result
}

/// The latency histograms of the four runs, up to the largest p99.
fn latency_plot(
    ctx: &Ctx<'_>,
    creates: &api::Phase,
    write: &pgbench::Run,
    reads: &api::Phase,
    select: &pgbench::Run,
) -> Option<String> {
    let path = ctx.plot_path("registry-latency.png")?;
    let runs = [
        ("registry create", &creates.latencies_ms),
        ("pgbench TPC-B-like", &write.latencies_ms),
        ("registry read", &reads.latencies_ms),
        ("pgbench -S", &select.latencies_ms),
    ];
    let upper = runs
        .iter()
        .map(|(_, v)| percentile(v, 0.99))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        * 1.2;
    let series: Vec<Series> = runs
        .iter()
        .map(|(name, v)| {
            let clipped: Vec<f64> = v.iter().copied().filter(|x| *x <= upper).collect();
            Series::new(*name, plot::histogram(&clipped, upper, 60))
        })
        .collect();
    let drawn = plot::lines(
        &path,
        "Registry and pgbench latency (up to the largest p99)",
        "milliseconds",
        "% of requests per bin",
        &series,
        false,
    );
    match drawn {
        Ok(()) => Some("registry-latency.png".into()),
        Err(e) => {
            ctx.say(format!("plot skipped: {e:#}"));
            None
        }
    }
}
