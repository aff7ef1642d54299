//! Scenario 2, device -> Hive relay, persistent and confirmed: events per second
//! from devices through the gateway, RabbitMQ and device-service to a Hive that
//! answers 200 at once; and device-service alone (a plain AMQP publisher in place of
//! the gateway). Baseline: a bare publisher and consumer on the same quorum queue
//! (device-service's relay queue, while no device-service runs), persistent,
//! confirmed, prefetch as device-service's.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;

use super::{CpuShares, Ctx, Devices};
use crate::baseline;
use crate::load::SimulateJob;
use crate::procfs::{self, LoadMeter, now_us};
use crate::report::{Better, Figure, ScenarioResult, Value};
use crate::stack::Hive;

/// device-service's relay queue (quorum, bound to `mosaic.events`).
pub const RELAY_QUEUE: &str = "mosaic.device-service.relay";
/// device-service's deliveries in flight, and the baseline consumer's prefetch.
const CONCURRENCY: u16 = 64;

/// Runs the scenario: `events` events per phase, from `devices` devices, `rounds`
/// times.
pub async fn run(
    ctx: &Ctx<'_>,
    events: u64,
    devices: usize,
    rounds: usize,
) -> anyhow::Result<ScenarioResult> {
    let stack = ctx.stack;
    let broker = stack.broker_pid;
    let meter = LoadMeter::start();
    let cpus = procfs::Machine::describe(0).cpus;
    let vh = stack.vhost("relay").await;
    let hive = Hive::start().await?;
    let concurrency = CONCURRENCY.to_string();
    let ds_vars = [("HIVE_CONCURRENCY", concurrency.as_str())];
    // device-service declares its topology (the relay queue) once.
    stack
        .device_service(&vh, &hive.url, &ds_vars)
        .await?
        .stop()
        .await;
    let per_device = events.div_ceil(devices.max(1) as u64);
    let events = per_device * devices as u64;
    let (mut base, mut alone, mut path) = (Vec::new(), Vec::new(), Vec::new());
    let mut limits = (String::new(), String::new(), String::new());
    let mut device_counters = json!(null);
    for round in 1..=rounds {
        // Baseline: bare publisher and consumer on the relay queue.
        let shares = CpuShares::start(vec![("broker", vec![broker])]);
        let bar = ctx.bar(events, &format!("bare queue {round}/{rounds}"));
        bar.enable_steady_tick(Duration::from_millis(200));
        let b = baseline::bare_relay(&vh.amqp_url, RELAY_QUEUE, events, CONCURRENCY).await?;
        bar.finish_and_clear();
        limits.0 = shares.describe(cpus).0;
        base.push(b);

        // device-service alone: the same publisher, device-service, Hive.
        let ds = stack.device_service(&vh, &hive.url, &ds_vars).await?;
        let shares = CpuShares::start(vec![
            ("broker", vec![broker]),
            ("device-service", vec![ds.pid]),
        ]);
        let before = hive.events.load(Ordering::Relaxed);
        let t0 = now_us();
        let (_conn, ch) = baseline::confirm_channel(&vh.amqp_url).await?;
        let bar = ctx.bar(events, &format!("device-service {round}/{rounds}"));
        let publishing = tokio::spawn(async move {
            baseline::publish_all(
                &ch,
                mosaic_protocol::exchange::EVENTS,
                events,
                baseline::device_event,
            )
            .await
        });
        let got = wait_hive(&hive, before + events, &bar).await;
        publishing.await??;
        bar.finish_and_clear();
        anyhow::ensure!(
            got >= before + events,
            "Hive got {} of {events} events",
            got - before
        );
        let a = events as f64
            / (hive
                .last_event_us
                .load(Ordering::Relaxed)
                .saturating_sub(t0) as f64
                / 1e6);
        limits.1 = shares.describe(cpus).0;
        alone.push(a);

        // The whole path: simulated devices, the gateway, device-service, Hive.
        // The per-device rate limit is raised: this measures the path, not the limiter.
        let gw = stack
            .gateway(&vh, &[("EVENT_RATE", "10000"), ("EVENT_BURST", "10000")])
            .await?;
        let before = hive.events.load(Ordering::Relaxed);
        // From the start of the devices (their connects included) to the last event
        // at Hive.
        let t0 = now_us();
        let mut devs = Devices::start(
            ctx,
            SimulateJob {
                addrs: vec![gw.addr],
                secret: crate::stack::JWT_SECRET.into(),
                devices,
                interval_ms: Some(1),
                events_per_device: Some(per_device),
                max_in_flight: 32,
                ramp_ms: 0,
                sources: Vec::new(),
            },
        )
        .await?;
        let shares = CpuShares::start(vec![
            ("broker", vec![broker]),
            ("device-service", vec![ds.pid]),
            ("gateway", vec![gw.pid]),
            ("devices", devs.pids()),
        ]);
        let bar = ctx.bar(events, &format!("devices to Hive {round}/{rounds}"));
        let waiting = wait_hive(&hive, before + events, &bar);
        let got = waiting.await;
        bar.finish_and_clear();
        let c = devs
            .wait_until(Duration::from_secs(60), &bar, |c| c.acked, |c| c.finished)
            .await?;
        device_counters = serde_json::to_value(c)?;
        anyhow::ensure!(
            got >= before + events,
            "Hive got {} of {events} device events",
            got - before
        );
        let p = events as f64
            / (hive
                .last_event_us
                .load(Ordering::Relaxed)
                .saturating_sub(t0) as f64
                / 1e6);
        limits.2 = shares.describe(cpus).0;
        path.push(p);
        devs.stop().await;
        gw.stop().await;
        ds.stop().await;
        ctx.say(format!(
            "relay round {round}: bare queue {b:.0} msg/s, device-service alone {a:.0} events/s, devices to Hive {p:.0} events/s"
        ));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (b, a, p) = (median(&mut base), median(&mut alone), median(&mut path));
    let baseline = Value::new("bare publisher + consumer, same quorum queue", b, "msg/s");
    let figures = vec![
        Figure::new(
            Value::new(
                "device -> gateway -> broker -> device-service -> Hive",
                p,
                "events/s",
            ),
            baseline.clone(),
            Better::Higher,
            limits.2.clone(),
        ),
        Figure::new(
            Value::new(
                "AMQP publisher -> broker -> device-service -> Hive",
                a,
                "events/s",
            ),
            baseline,
            Better::Higher,
            limits.1.clone(),
        ),
    ];
    Ok(ScenarioResult {
        scenario: "relay".into(),
        settings: json!({"events": events, "devices": devices, "rounds": rounds, "hive_concurrency": CONCURRENCY, "prefetch": CONCURRENCY}),
        load: meter.finish(),
        figures,
        details: json!({
            "bare_queue_msg_per_s": base, "device_service_alone_events_per_s": alone,
            "devices_to_hive_events_per_s": path, "device_counters": device_counters,
            "bare_queue_cores": limits.0, "device_service_alone_cores": limits.1,
        }),
        plots: Vec::new(),
    })
}

/// Waits until Hive counted `n` device events in all (at most 10 minutes), moving
/// `bar`; the count then.
async fn wait_hive(hive: &Hive, n: u64, bar: &indicatif::ProgressBar) -> u64 {
    let start = hive.events.load(Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        let got = hive.events.load(Ordering::Relaxed);
        bar.set_position(got - start);
        if got >= n || tokio::time::Instant::now() >= deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
