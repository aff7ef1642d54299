//! Scenario 5, soak: many devices for a long while with steady traffic both ways
//! (each device sends an event with an id every `event_every` and waits for its ack;
//! Hive sends requests at a fixed rate, answered by the devices), the gateway's,
//! device-service's and the broker's RSS and open files sampled at a fixed period,
//! and their drift. Baseline: the broker's own drift over the same window, under the
//! same traffic.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use super::{Ctx, Devices};
use crate::load::SimulateJob;
use crate::plot::{self, Series};
use crate::procfs::{LoadMeter, open_files, rss_kib};
use crate::report::{Better, Figure, ScenarioResult, Value};
use crate::stack::{API_TOKEN, Hive};

/// One sample.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    /// Seconds since the soak started.
    t: f64,
    gateway_rss_kib: u64,
    gateway_files: u64,
    device_service_rss_kib: u64,
    device_service_files: u64,
    broker_rss_kib: u64,
    broker_files: u64,
    connected: u64,
    events_acked: u64,
    requests_answered: u64,
}

/// Least-squares slope of `points`, per hour when `x` is in seconds.
fn slope_per_hour(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 { 0.0 } else { sxy / sxx * 3600.0 }
}

/// The soak's settings.
#[derive(Debug, Clone, Copy)]
pub struct Soak {
    /// Devices.
    pub devices: usize,
    /// How long the traffic runs once every device is connected.
    pub duration: Duration,
    /// Sampling period.
    pub sample: Duration,
    /// Time between two events of one device.
    pub event_every: Duration,
    /// Requests per second from Hive, over all devices.
    pub request_rate: u64,
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx<'_>, soak: Soak) -> anyhow::Result<ScenarioResult> {
    let stack = ctx.stack;
    let broker = stack.broker_pid;
    let meter = LoadMeter::start();
    let vh = stack.vhost("soak").await;
    let hive = Hive::start().await?;
    let gw = stack.gateway(&vh, &[]).await?;
    let ds = stack.device_service(&vh, &hive.url, &[]).await?;
    let mut devs = Devices::start(
        ctx,
        SimulateJob {
            addrs: vec![gw.addr],
            secret: crate::stack::JWT_SECRET.into(),
            devices: soak.devices,
            interval_ms: Some(soak.event_every.as_millis() as u64),
            events_per_device: None,
            max_in_flight: 4,
            // Events are spread: a device's first event comes one period after it
            // connects, and devices connect over a period too.
            ramp_ms: soak.event_every.as_millis().min(60_000) as u64,
            sources: Vec::new(),
        },
    )
    .await?;
    let bar = ctx.bar(soak.devices as u64, "soak: devices connecting");
    let c = devs
        .wait_until(
            Duration::from_secs(300),
            &bar,
            |c| c.connected,
            |c| c.connected >= soak.devices as u64,
        )
        .await?;
    bar.finish_and_clear();
    anyhow::ensure!(
        c.connected >= soak.devices as u64,
        "only {} of {} devices connected",
        c.connected,
        soak.devices
    );

    // Requests from Hive, at a fixed rate, for the whole soak.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()?;
    let base = format!("http://{}/v1/devices", ds.addr);
    let ids = devs.ids.clone();
    let rate = soak.request_rate;
    let duration = soak.duration;
    let requests = tokio::spawn(async move {
        let (mut ok, mut other) = (0u64, 0u64);
        if rate == 0 {
            return (ok, other);
        }
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
        let end = Instant::now() + duration;
        let mut pending = tokio::task::JoinSet::new();
        let mut i = 0usize;
        while Instant::now() < end {
            tick.tick().await;
            let req = http
                .post(format!("{base}/{}/requests", ids[i % ids.len()]))
                .bearer_auth(API_TOKEN)
                .json(&json!({"name": "read", "data": {"i": i}, "timeout_ms": 5000}));
            i += 1;
            pending.spawn(async move { matches!(req.send().await, Ok(r) if r.status() == 200) });
            while let Some(r) = pending.try_join_next() {
                if matches!(r, Ok(true)) {
                    ok += 1
                } else {
                    other += 1
                }
            }
        }
        while let Some(r) = pending.join_next().await {
            if matches!(r, Ok(true)) {
                ok += 1
            } else {
                other += 1
            }
        }
        (ok, other)
    });

    let started = Instant::now();
    let bar = ctx.bar(soak.duration.as_secs(), "soak: seconds");
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(soak.sample);
    loop {
        tick.tick().await;
        let t = started.elapsed();
        let c = devs.counters(Duration::from_millis(50)).await?;
        samples.push(Sample {
            t: t.as_secs_f64(),
            gateway_rss_kib: rss_kib(gw.pid),
            gateway_files: open_files(gw.pid),
            device_service_rss_kib: rss_kib(ds.pid),
            device_service_files: open_files(ds.pid),
            broker_rss_kib: rss_kib(broker),
            broker_files: open_files(broker),
            connected: c.connected,
            events_acked: c.acked,
            requests_answered: c.answered,
        });
        bar.set_position(t.as_secs().min(soak.duration.as_secs()));
        if t >= soak.duration {
            break;
        }
    }
    bar.finish_and_clear();
    let (req_ok, req_other) = requests.await?;
    let last = devs.counters(Duration::from_millis(300)).await?;
    devs.stop().await;
    ds.stop().await;
    gw.stop().await;

    // Drift over the soak, the first sample (just after the connects) left out of
    // the slope only when there are enough others.
    let skip = usize::from(samples.len() > 3);
    let series = |f: fn(&Sample) -> u64| -> Vec<(f64, f64)> {
        samples[skip..].iter().map(|s| (s.t, f(s) as f64)).collect()
    };
    let mib_h = |f: fn(&Sample) -> u64| slope_per_hour(&series(f)) / 1024.0;
    let per_h = |f: fn(&Sample) -> u64| slope_per_hour(&series(f));
    let (first, end) = (&samples[skip], samples.last().expect("one sample at least"));
    let figures = vec![
        Figure::new(
            Value::new(
                format!("gateway RSS drift, {} devices", soak.devices),
                mib_h(|s| s.gateway_rss_kib),
                "MiB/h",
            ),
            Value::new(
                "broker RSS drift, same traffic",
                mib_h(|s| s.broker_rss_kib),
                "MiB/h",
            ),
            Better::Lower,
            format!(
                "gateway {} -> {} KiB over {:.0} s",
                first.gateway_rss_kib,
                end.gateway_rss_kib,
                end.t - first.t
            ),
        ),
        Figure::new(
            Value::new(
                "gateway open files drift",
                per_h(|s| s.gateway_files),
                "files/h",
            ),
            Value::new(
                "broker open files drift",
                per_h(|s| s.broker_files),
                "files/h",
            ),
            Better::Lower,
            format!(
                "gateway {} -> {} open files",
                first.gateway_files, end.gateway_files
            ),
        ),
        Figure::new(
            Value::new(
                "device-service RSS drift",
                mib_h(|s| s.device_service_rss_kib),
                "MiB/h",
            ),
            Value::new(
                "broker RSS drift, same traffic",
                mib_h(|s| s.broker_rss_kib),
                "MiB/h",
            ),
            Better::Lower,
            format!(
                "device-service {} -> {} KiB",
                first.device_service_rss_kib, end.device_service_rss_kib
            ),
        ),
    ];
    ctx.say(format!(
        "soak: {} samples; gateway RSS {} -> {} KiB, files {} -> {}; broker RSS {} -> {} KiB; events acked {}, requests {req_ok} ok / {req_other} not, reconnects {}",
        samples.len(), first.gateway_rss_kib, end.gateway_rss_kib, first.gateway_files, end.gateway_files,
        first.broker_rss_kib, end.broker_rss_kib, last.acked, last.reconnects
    ));
    let mut plots = Vec::new();
    let minutes = |f: fn(&Sample) -> u64, scale: f64| -> Vec<(f64, f64)> {
        samples
            .iter()
            .map(|s| (s.t / 60.0, f(s) as f64 / scale))
            .collect()
    };
    if let Some(path) = ctx.plot_path("soak-rss.png") {
        let drawn = plot::lines(
            &path,
            &format!("Soak, {} devices: resident memory", soak.devices),
            "minutes",
            "MiB",
            &[
                Series::new("gateway", minutes(|s| s.gateway_rss_kib, 1024.0)),
                Series::new(
                    "device-service",
                    minutes(|s| s.device_service_rss_kib, 1024.0),
                ),
                Series::new("RabbitMQ", minutes(|s| s.broker_rss_kib, 1024.0)),
            ],
            true,
        );
        match drawn {
            Ok(()) => plots.push("soak-rss.png".into()),
            Err(e) => ctx.say(format!("plot skipped: {e:#}")),
        }
    }
    if let Some(path) = ctx.plot_path("soak-files.png") {
        let drawn = plot::lines(
            &path,
            &format!("Soak, {} devices: open files", soak.devices),
            "minutes",
            "open files",
            &[
                Series::new("gateway", minutes(|s| s.gateway_files, 1.0)),
                Series::new("device-service", minutes(|s| s.device_service_files, 1.0)),
                Series::new("RabbitMQ", minutes(|s| s.broker_files, 1.0)),
            ],
            true,
        );
        match drawn {
            Ok(()) => plots.push("soak-files.png".into()),
            Err(e) => ctx.say(format!("plot skipped: {e:#}")),
        }
    }
    Ok(ScenarioResult {
        scenario: "soak".into(),
        settings: json!({
            "devices": soak.devices, "duration_s": soak.duration.as_secs(),
            "sample_s": soak.sample.as_secs_f64(), "event_every_s": soak.event_every.as_secs_f64(),
            "request_rate": soak.request_rate,
        }),
        load: meter.finish(),
        figures,
        details: json!({
            "samples": samples, "requests_ok": req_ok, "requests_not_ok": req_other,
            "devices": last,
        }),
        plots,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_is_per_hour() {
        let pts = [(0.0, 10.0), (60.0, 11.0), (120.0, 12.0)];
        assert!((slope_per_hour(&pts) - 60.0).abs() < 1e-9);
        assert_eq!(slope_per_hour(&[(0.0, 1.0)]), 0.0);
    }
}
