//! Scenario 4, broadcast to every connected device: devices spread over several
//! gateway replicas; `POST /v1/broadcast/events` to device-service; the time until
//! the last device has the frame. Baseline: RabbitMQ's Web-MQTT plugin holding as
//! many MQTT-over-WebSocket clients subscribed to one topic, and one message
//! published to that topic: the time until the last client has it.

use std::time::Duration;

use serde_json::json;

use super::{CpuShares, Ctx, Held, gateway_target, ms_since};
use crate::baseline;
use crate::load::Target;
use crate::plot::{self, Series};
use crate::procfs::{self, LoadMeter, now_us};
use crate::report::{Better, Figure, ScenarioResult, Value, percentile};
use crate::stack::{API_TOKEN, Hive};

/// The MQTT topic of the baseline's broadcast.
const TOPIC: &str = "mosaic/broadcast";
/// Bound on one broadcast reaching everyone.
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(120);

/// One broadcast round: arrival times in ms after the call.
fn summary(t0: u64, times: &[u64]) -> Vec<f64> {
    let mut v: Vec<f64> = times.iter().map(|t| ms_since(t0, *t)).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Runs the scenario: `devices` over `replicas` gateways, `rounds` broadcasts each.
pub async fn run(
    ctx: &Ctx<'_>,
    devices: usize,
    replicas: usize,
    rounds: usize,
) -> anyhow::Result<ScenarioResult> {
    let stack = ctx.stack;
    let broker = stack.broker_pid;
    let meter = LoadMeter::start();
    let cpus = procfs::Machine::describe(0).cpus;
    let vh = stack.vhost("broadcast").await;
    let hive = Hive::start().await?;
    let ds = stack.device_service(&vh, &hive.url, &[]).await?;
    let mut gateways = Vec::new();
    for _ in 0..replicas {
        gateways.push(
            stack
                .gateway(&vh, &[("PING_INTERVAL_MS", "600000")])
                .await?,
        );
    }
    let addrs = gateways.iter().map(|g| g.addr).collect();
    let mut held = Held::open(
        ctx,
        gateway_target(addrs),
        devices,
        &format!("gateway x{replicas} {devices}"),
    )
    .await?;
    anyhow::ensure!(held.ok > 0, "no device connected: {:?}", held.first_error);
    // The connects' lifecycle messages reach Hive first; let the broker settle.
    procfs::settle(broker, Duration::from_secs(60)).await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/broadcast/events", ds.addr);
    let mut gw_rounds = Vec::new();
    let mut gw_missing = 0;
    let mut shares_text = String::new();
    for round in 0..rounds {
        held.arm().await?;
        let mut pids = vec![ds.pid];
        pids.extend(gateways.iter().map(|g| g.pid));
        let shares = CpuShares::start(vec![("broker", vec![broker]), ("services", pids)]);
        let t0 = now_us();
        let res = http
            .post(&url)
            .bearer_auth(API_TOKEN)
            .json(&json!({"name": "bench-broadcast", "data": {"round": round}}))
            .timeout(Duration::from_secs(30))
            .send()
            .await?;
        anyhow::ensure!(res.status() == 202, "broadcast answered {}", res.status());
        let (times, missing) = held.collect(ARRIVAL_TIMEOUT).await?;
        shares_text = shares.describe(cpus).0;
        gw_missing += missing;
        gw_rounds.push(summary(t0, &times));
    }
    let gw_open = held.ok;
    held.close().await;
    for g in gateways {
        g.stop().await;
    }
    ds.stop().await;
    procfs::settle(broker, Duration::from_secs(60)).await;

    // Baseline: Web-MQTT.
    let target = Target::Mqtt {
        addr: stack.web_mqtt,
        topic: TOPIC.into(),
        client_prefix: "broadcast".into(),
    };
    let mut mqtt = Held::open(ctx, target, devices, &format!("Web-MQTT {devices}")).await?;
    procfs::settle(broker, Duration::from_secs(60)).await;
    let mut mq_rounds = Vec::new();
    let mut mq_missing = 0;
    let mut mq_shares = String::new();
    for round in 0..rounds {
        mqtt.arm().await?;
        let shares = CpuShares::start(vec![("broker", vec![broker])]);
        let body = json!({"round": round}).to_string();
        // Web-MQTT lives in the default vhost.
        let default_vhost = format!("{}/%2f", stack.broker.amqp_url());
        let t0 = baseline::mqtt_publish(&default_vhost, TOPIC, body.as_bytes()).await?;
        let (times, missing) = mqtt.collect(ARRIVAL_TIMEOUT).await?;
        mq_shares = shares.describe(cpus).0;
        mq_missing += missing;
        mq_rounds.push(summary(t0, &times));
    }
    let mq_open = mqtt.ok;
    mqtt.close().await;

    // The median round by its last arrival.
    let median_round = |rounds: &[Vec<f64>]| -> Vec<f64> {
        let mut v: Vec<&Vec<f64>> = rounds.iter().collect();
        v.sort_by(|a, b| {
            a.last()
                .copied()
                .unwrap_or(f64::INFINITY)
                .total_cmp(&b.last().copied().unwrap_or(f64::INFINITY))
        });
        v.get(v.len() / 2).map(|r| (*r).clone()).unwrap_or_default()
    };
    let (gw, mq) = (median_round(&gw_rounds), median_round(&mq_rounds));
    let lasts = |r: &[Vec<f64>]| {
        r.iter()
            .map(|v| v.last().copied().unwrap_or(f64::NAN))
            .collect::<Vec<_>>()
    };
    ctx.say(format!(
        "broadcast: gateway last device after {:?} ms ({gw_missing} missed), Web-MQTT last client after {:?} ms ({mq_missing} missed)",
        lasts(&gw_rounds), lasts(&mq_rounds)
    ));
    let figures = vec![
        Figure::new(
            Value::new(
                format!("broadcast: last of {gw_open} devices ({replicas} replicas) has the frame"),
                percentile(&gw, 1.0),
                "ms",
            ),
            Value::new(
                format!("Web-MQTT: last of {mq_open} clients has the message"),
                percentile(&mq, 1.0),
                "ms",
            ),
            Better::Lower,
            format!("during the broadcast {shares_text}; Web-MQTT {mq_shares}"),
        ),
        Figure::new(
            Value::new(
                "broadcast: half the devices have it",
                percentile(&gw, 0.5),
                "ms",
            ),
            Value::new(
                "Web-MQTT: half the clients have it",
                percentile(&mq, 0.5),
                "ms",
            ),
            Better::Lower,
            "the writes to every socket, spread over the replicas' cores".to_owned(),
        ),
    ];
    let mut plots = Vec::new();
    let name = format!("broadcast-arrival-{devices}.png");
    if let Some(path) = ctx.plot_path(&name) {
        let upper = percentile(&gw, 1.0).max(percentile(&mq, 1.0)) * 1.05;
        let drawn = plot::lines(
            &path,
            &format!("Broadcast to {devices} connections: arrival times (median round)"),
            "milliseconds after the call",
            "% of connections per bin",
            &[
                Series::new(
                    format!("gateway, {replicas} replicas"),
                    plot::histogram(&gw, upper, 50),
                ),
                Series::new("Web-MQTT", plot::histogram(&mq, upper, 50)),
            ],
            false,
        );
        match drawn {
            Ok(()) => plots.push(name),
            Err(e) => ctx.say(format!("plot skipped: {e:#}")),
        }
    }
    Ok(ScenarioResult {
        scenario: "broadcast".into(),
        settings: json!({"devices": devices, "replicas": replicas, "rounds": rounds}),
        load: meter.finish(),
        figures,
        details: json!({
            "gateway": {"open": gw_open, "missed": gw_missing, "last_ms_per_round": lasts(&gw_rounds)},
            "web_mqtt": {"open": mq_open, "missed": mq_missing, "last_ms_per_round": lasts(&mq_rounds)},
        }),
        plots,
    })
}
