//! Scenario 3, Hive -> device request round trip at a fixed rate: `POST
//! /v1/devices/{d}/requests` to device-service, through RabbitMQ and the gateway to a
//! simulated device that answers at once, and back; p50, p99 and p999. Baseline: the
//! raw AMQP request/reply round trip (two broker hops) at the same rate, on the same
//! broker.

use std::time::{Duration, Instant};

use serde_json::json;

use super::{CpuShares, Ctx, Devices};
use crate::baseline;
use crate::load::SimulateJob;
use crate::plot::{self, Series};
use crate::procfs::{self, LoadMeter};
use crate::report::{Better, Figure, ScenarioResult, Value, percentile};
use crate::stack::{API_TOKEN, Hive};

/// Runs the scenario: `rate` requests per second for `seconds`, spread over
/// `devices` devices.
pub async fn run(
    ctx: &Ctx<'_>,
    rate: u64,
    seconds: u64,
    devices: usize,
) -> anyhow::Result<ScenarioResult> {
    let stack = ctx.stack;
    let broker = stack.broker_pid;
    let meter = LoadMeter::start();
    let cpus = procfs::Machine::describe(0).cpus;
    let vh = stack.vhost("request").await;
    let hive = Hive::start().await?;

    // Baseline first: the raw AMQP round trip.
    let shares = CpuShares::start(vec![("broker", vec![broker])]);
    let bar = ctx.bar(rate * seconds, "raw AMQP request/reply");
    bar.enable_steady_tick(Duration::from_millis(200));
    let (mut raw, raw_missing) = baseline::request_reply(&vh.amqp_url, rate, seconds).await?;
    bar.finish_and_clear();
    let (raw_limit, _) = shares.describe(cpus);
    raw.sort_by(f64::total_cmp);

    // The gateway path.
    let gw = stack.gateway(&vh, &[]).await?;
    let ds = stack.device_service(&vh, &hive.url, &[]).await?;
    let mut devs = Devices::start(
        ctx,
        SimulateJob {
            addrs: vec![gw.addr],
            secret: crate::stack::JWT_SECRET.into(),
            devices,
            interval_ms: None,
            events_per_device: None,
            max_in_flight: 1,
            ramp_ms: 0,
            sources: Vec::new(),
        },
    )
    .await?;
    let bar = ctx.bar(devices as u64, "devices connecting");
    let c = devs
        .wait_until(
            Duration::from_secs(120),
            &bar,
            |c| c.connected,
            |c| c.connected >= devices as u64,
        )
        .await?;
    bar.finish_and_clear();
    anyhow::ensure!(
        c.connected >= devices as u64,
        "only {} of {devices} devices connected",
        c.connected
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .timeout(Duration::from_secs(15))
        .build()?;
    let base = format!("http://{}/v1/devices", ds.addr);
    let body = json!({"name": "read", "data": {"reg": 1}, "timeout_ms": 5000});
    let call = |i: usize| {
        let url = format!("{base}/{}/requests", devs.ids[i % devs.ids.len()]);
        let req = http.post(url).bearer_auth(API_TOKEN).json(&body);
        async move {
            let t = Instant::now();
            let status = req.send().await.map(|r| r.status().as_u16()).unwrap_or(0);
            (t.elapsed().as_secs_f64() * 1e3, status)
        }
    };
    // Warm up: connections to device-service, caches, the broker's queues.
    let warm = (rate as usize / 5).clamp(10, 200);
    futures_util::future::join_all((0..warm).map(call)).await;

    let total = rate * seconds;
    let shares = CpuShares::start(vec![
        ("broker", vec![broker]),
        ("gateway", vec![gw.pid]),
        ("device-service", vec![ds.pid]),
        ("devices", devs.pids()),
    ]);
    let bar = ctx.bar(total, &format!("REST requests at {rate}/s"));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut calls = Vec::with_capacity(total as usize);
    let started = Instant::now();
    for i in 0..total as usize {
        tick.tick().await;
        calls.push(tokio::spawn(call(i)));
        if i % 100 == 0 {
            bar.set_position(i as u64);
        }
    }
    let sent_in = started.elapsed().as_secs_f64();
    let mut lat = Vec::with_capacity(calls.len());
    let mut not_ok = 0usize;
    for c in calls {
        let (ms, status) = c.await?;
        if status != 200 {
            not_ok += 1;
        }
        lat.push(ms);
    }
    bar.finish_and_clear();
    let (gw_limit, gw_shares) = shares.describe(cpus);
    lat.sort_by(f64::total_cmp);
    devs.stop().await;
    ds.stop().await;
    gw.stop().await;

    let pct = [(0.50, "p50"), (0.99, "p99"), (0.999, "p999")];
    let mut figures = Vec::new();
    for (p, name) in pct {
        figures.push(Figure::new(
            Value::new(format!("REST request round trip {name} at {rate}/s"), percentile(&lat, p), "ms"),
            Value::new(format!("raw AMQP request/reply {name}"), percentile(&raw, p), "ms"),
            Better::Lower,
            if name == "p50" {
                format!("{gw_limit}; raw AMQP phase {raw_limit}")
            } else {
                "the tail: scheduling on a shared 2-core machine (every process of the path and the load share it), then the broker".into()
            },
        ));
    }
    ctx.say(format!(
        "request: {total} sent in {sent_in:.1} s ({not_ok} not 200): p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms; raw AMQP p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms ({raw_missing} unanswered)",
        percentile(&lat, 0.5), percentile(&lat, 0.99), percentile(&lat, 0.999),
        percentile(&raw, 0.5), percentile(&raw, 0.99), percentile(&raw, 0.999),
    ));
    let mut plots = Vec::new();
    if let Some(path) = ctx.plot_path("request-latency.png") {
        let upper = percentile(&lat, 0.999).max(percentile(&raw, 0.999)) * 1.2;
        let clip = |v: &[f64]| {
            v.iter()
                .copied()
                .filter(|x| *x <= upper)
                .collect::<Vec<_>>()
        };
        let drawn = plot::lines(
            &path,
            &format!("Request round trip at {rate}/s (up to the larger p99.9)"),
            "milliseconds",
            "% of requests per bin",
            &[
                Series::new(
                    "REST -> device -> REST",
                    plot::histogram(&clip(&lat), upper, 60),
                ),
                Series::new(
                    "raw AMQP request/reply",
                    plot::histogram(&clip(&raw), upper, 60),
                ),
            ],
            false,
        );
        match drawn {
            Ok(()) => plots.push("request-latency.png".into()),
            Err(e) => ctx.say(format!("plot skipped: {e:#}")),
        }
    }
    Ok(ScenarioResult {
        scenario: "request".into(),
        settings: json!({"rate": rate, "seconds": seconds, "devices": devices, "timeout_ms": 5000}),
        load: meter.finish(),
        figures,
        details: json!({
            "sent": total, "sent_in_s": sent_in, "not_200": not_ok,
            "max_ms": lat.last(), "raw_max_ms": raw.last(), "raw_unanswered": raw_missing,
            "cores": gw_shares,
        }),
        plots,
    })
}
