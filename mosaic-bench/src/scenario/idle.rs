//! Scenario 1, idle devices: memory per authenticated idle device (the gateway's
//! RSS) and the connect rate, at each size; beside RabbitMQ's own Web-MQTT plugin
//! holding as many MQTT-over-WebSocket clients with one subscription each (the
//! broker's RSS per client, its connect rate), and the broker alone doing the broker
//! work of the same connects.
//!
//! Each size runs on a broker of its own (the caller starts one per size: the
//! Erlang VM keeps memory it freed, so a broker that held 10,000 clients would
//! lend it to the next 19,000 and hide their cost): Web-MQTT first (the broker's
//! memory is read before any other phase grew its allocators), then the
//! broker-alone connects, then the gateway (a fresh replica, so its idle RSS is its
//! own).

use std::time::Duration;

use serde_json::json;

use super::{CpuShares, Ctx, Held, gateway_target};
use crate::baseline;
use crate::load::Target;
use crate::plot::{self, Series};
use crate::procfs::{self, LoadMeter, cpu_secs, open_files, steady_rss_kib};
use crate::report::{Better, Figure, ScenarioResult, Value};

/// The MQTT topic every baseline client subscribes to.
pub const MQTT_TOPIC: &str = "mosaic/bench";

/// One size's readings.
#[derive(Debug, Clone, serde::Serialize)]
struct Size {
    devices: usize,
    gateway: serde_json::Value,
    web_mqtt: serde_json::Value,
    broker_alone: serde_json::Value,
}

/// Runs the scenario at each of `sizes` (on the one broker of `ctx`: give one size
/// per fresh broker for clean broker figures).
pub async fn run(ctx: &Ctx<'_>, sizes: &[usize], hold: Duration) -> anyhow::Result<ScenarioResult> {
    let stack = ctx.stack;
    let broker = stack.broker_pid;
    let meter = LoadMeter::start();
    let mut figures = Vec::new();
    let mut details = Vec::new();
    let mut plots = Vec::new();
    let cpus = procfs::Machine::describe(0).cpus;
    for &n in sizes {
        let vh = stack.vhost(&format!("idle-{n}")).await;
        procfs::settle(broker, Duration::from_secs(30)).await;

        // 1. Web-MQTT: the broker's own WebSocket clients.
        let (broker_before, _) = steady_rss_kib(broker, 0.01, Duration::from_secs(15)).await;
        let mem_before = stack.broker_memory().await;
        let cpu_before = cpu_secs(broker);
        let target = Target::Mqtt {
            addr: stack.web_mqtt,
            topic: MQTT_TOPIC.into(),
            client_prefix: format!("idle{n}"),
        };
        let shares = CpuShares::start(vec![("broker", vec![broker])]);
        let mut mqtt = Held::open(ctx, target, n, &format!("Web-MQTT {n}")).await?;
        let mqtt_cpu = (cpu_secs(broker) - cpu_before) * 1e6 / mqtt.ok.max(1) as f64;
        let (mqtt_limit, mqtt_shares) = shares.describe(cpus);
        let (broker_after, mqtt_steady) =
            steady_rss_kib(broker, 0.01, Duration::from_secs(30)).await;
        let mem_after = stack.broker_memory().await;
        let broker_limits = stack.broker_limits().await;
        let mqtt_per = broker_after.saturating_sub(broker_before) as f64 / mqtt.ok.max(1) as f64;
        let (mqtt_alive, mqtt_open) = mqtt.ping(Duration::from_secs(60)).await?;
        let broker_log = if mqtt_alive < mqtt.ok {
            stack.broker_log(12)
        } else {
            Vec::new()
        };
        if !broker_log.is_empty() {
            ctx.say(format!(
                "idle {n}: only {mqtt_alive} of {} Web-MQTT clients answered a ping ({mqtt_open} still open); the broker's log ends:\n  {}",
                mqtt.ok,
                broker_log.join("\n  ")
            ));
        }
        let breakdown: serde_json::Map<String, serde_json::Value> = mem_after
            .iter()
            .filter_map(|(k, v)| {
                let d = v.as_f64()? - mem_before.get(k)?.as_f64()?;
                (d.abs() >= 1024.0 * mqtt.ok as f64 / 10.0)
                    .then(|| (k.clone(), json!(d / 1024.0 / mqtt.ok.max(1) as f64)))
            })
            .collect();
        ctx.say(format!(
            "idle {n}: Web-MQTT {} clients ({} failed) at {:.0}/s; broker RSS {} -> {} KiB, {mqtt_per:.1} KiB per client{}",
            mqtt.ok,
            mqtt.failed,
            mqtt.rate(),
            broker_before,
            broker_after,
            if mqtt_steady { "" } else { " (not steady)" }
        ));
        let mqtt_offsets = mqtt.offsets();
        let mqtt_failed = mqtt.failed;
        let mqtt_ok = mqtt.ok;
        let mqtt_rate = mqtt.rate();
        let mqtt_json = json!({
            "open": mqtt.ok, "failed": mqtt.failed, "first_error": mqtt.first_error,
            "connect_rate": mqtt_rate, "seconds": mqtt.seconds(),
            "broker_rss_kib": [broker_before, broker_after], "rss_steady": mqtt_steady,
            "rss_per_client_kib": mqtt_per, "broker_cpu_us_per_connect": mqtt_cpu,
            "alive_after_ping": mqtt_alive, "open_after_ping": mqtt_open,
            "broker_log": broker_log, "broker_limits": broker_limits, "cores": mqtt_shares,
            "broker_memory_delta_kib_per_client": breakdown,
        });
        mqtt.close().await;
        procfs::settle(broker, Duration::from_secs(60)).await;

        // 2. The broker alone, doing the broker work of each gateway connect.
        let bar = ctx.bar(n as u64, &format!("broker alone {n}"));
        bar.enable_steady_tick(Duration::from_millis(200));
        let alone = baseline::connect_work(&vh.amqp_url, n, ctx.concurrency, broker).await?;
        bar.finish_and_clear();
        let alone_started =
            alone.times_us.first().copied().unwrap_or(0) - (1e6 / alone.rate.max(1e-9)) as u64;
        let alone_offsets: Vec<f64> = alone
            .times_us
            .iter()
            .map(|t| t.saturating_sub(alone_started) as f64 / 1e6)
            .collect();
        ctx.say(format!(
            "idle {n}: broker alone {:.0} connects/s, broker CPU {:.0} µs per connect",
            alone.rate, alone.broker_us
        ));
        procfs::settle(broker, Duration::from_secs(30)).await;

        // 3. The gateway.
        let gw = stack
            .gateway(&vh, &[("PING_INTERVAL_MS", "600000")])
            .await?;
        let (gw_before, _) = steady_rss_kib(gw.pid, 0.0, Duration::from_secs(5)).await;
        let (gw_cpu0, broker_cpu0) = (cpu_secs(gw.pid), cpu_secs(broker));
        let shares = CpuShares::start(vec![("broker", vec![broker]), ("gateway", vec![gw.pid])]);
        let mut held = Held::open(
            ctx,
            gateway_target(vec![gw.addr]),
            n,
            &format!("gateway {n}"),
        )
        .await?;
        let (mut gw_limit, gw_shares) = shares.describe(cpus);
        let gw_cpu = (cpu_secs(gw.pid) - gw_cpu0) * 1e6 / held.ok.max(1) as f64;
        let broker_cpu = (cpu_secs(broker) - broker_cpu0) * 1e6 / held.ok.max(1) as f64;
        let (gw_after, gw_steady) = steady_rss_kib(gw.pid, 0.0, Duration::from_secs(10)).await;
        let files = open_files(gw.pid);
        let per = gw_after.saturating_sub(gw_before) as f64 / held.ok.max(1) as f64;
        let (alive, _) = held.ping(Duration::from_secs(60)).await?;
        ctx.say(format!(
            "idle {n}: gateway {} devices ({} failed) at {:.0}/s; RSS {gw_before} -> {gw_after} KiB, {per:.2} KiB per device{}; gateway CPU {gw_cpu:.0} µs, broker CPU {broker_cpu:.0} µs per connect; {alive} answer a ping",
            held.ok,
            held.failed,
            held.rate(),
            if gw_steady { "" } else { " (not steady)" }
        ));
        if !hold.is_zero() {
            ctx.say(format!("idle {n}: holding for {} s", hold.as_secs()));
            tokio::time::sleep(hold).await;
        }
        let gw_offsets = held.offsets();
        let gw_failed = held.failed;
        let gw_rate = held.rate();
        if let Some(e) = &held.first_error {
            gw_limit.push_str(&format!("; first failure: {e}"));
        }
        let gw_json = json!({
            "open": held.ok, "failed": held.failed, "first_error": held.first_error,
            "connect_rate": gw_rate, "seconds": held.seconds(),
            "rss_kib": [gw_before, gw_after], "rss_steady": gw_steady,
            "rss_per_device_kib": per, "open_files": files,
            "gateway_cpu_us_per_connect": gw_cpu, "broker_cpu_us_per_connect": broker_cpu,
            "alive_after_ping": alive, "cores": gw_shares,
        });
        held.close().await;
        let shutdown = gw.stop().await;

        let refused = if gw_failed > 0 {
            format!(" ({gw_failed} refused)")
        } else {
            String::new()
        };
        let mqtt_refused = if mqtt_failed > 0 {
            format!(" ({mqtt_failed} failed)")
        } else {
            String::new()
        };
        // Clients the broker dropped after their SUBACK hold no memory: the reading
        // is then no baseline.
        let mqtt_dropped = if mqtt_alive < mqtt_ok {
            format!(" (only {mqtt_alive} of {mqtt_ok} still answer: not comparable)")
        } else {
            String::new()
        };
        figures.push(Figure::new(
            Value::new(format!("gateway connect rate, {n} devices{refused}"), gw_rate, "/s"),
            Value::new(
                "broker alone, same broker work per connect",
                alone.rate,
                "/s",
            ),
            Better::Higher,
            format!(
                "{gw_limit}; broker CPU {broker_cpu:.0} µs per gateway connect vs {:.0} µs alone; gateway CPU {gw_cpu:.0} µs per connect",
                alone.broker_us
            ),
        ));
        figures.push(Figure::new(
            Value::new(
                format!("gateway connect rate, {n} devices{refused}"),
                gw_rate,
                "/s",
            ),
            Value::new(
                format!("Web-MQTT connect + subscribe rate{mqtt_refused}"),
                mqtt_rate,
                "/s",
            ),
            Better::Higher,
            format!("Web-MQTT phase {mqtt_limit}; broker CPU {mqtt_cpu:.0} µs per MQTT connect"),
        ));
        figures.push(Figure::new(
            Value::new(format!("gateway RSS per idle device, {n}"), per, "KiB"),
            Value::new(format!("Web-MQTT: broker RSS per client{mqtt_dropped}"), mqtt_per, "KiB"),
            Better::Lower,
            "our code: the gateway's per-session state and buffers (the broker's share of a gateway device is one binding)",
        ));
        if let Some(path) = ctx.plot_path(&format!("idle-connect-rate-{n}.png")) {
            let seconds = [&gw_offsets, &mqtt_offsets, &alone_offsets]
                .iter()
                .filter_map(|v| v.last().copied())
                .fold(0.0f64, f64::max);
            let bucket = (seconds / 40.0).max(0.1);
            let drawn = plot::lines(
                &path,
                &format!("Connect rate over time, {n} connections"),
                "seconds since the first connect",
                "connects per second",
                &[
                    Series::new(
                        "gateway (WebSocket + JWT)",
                        plot::rate_over_time(&gw_offsets, bucket),
                    ),
                    Series::new(
                        "broker alone (same broker work)",
                        plot::rate_over_time(&alone_offsets, bucket),
                    ),
                    Series::new(
                        "Web-MQTT (connect + subscribe)",
                        plot::rate_over_time(&mqtt_offsets, bucket),
                    ),
                ],
                false,
            );
            match drawn {
                Ok(()) => plots.push(format!("idle-connect-rate-{n}.png")),
                Err(e) => ctx.say(format!("plot skipped: {e:#}")),
            }
        }
        details.push(Size {
            devices: n,
            gateway: json!({"shutdown_s": shutdown.as_secs_f64(), "run": gw_json}),
            web_mqtt: mqtt_json,
            broker_alone: json!({
                "work": alone.work, "connect_rate": alone.rate,
                "broker_cpu_us_per_connect": alone.broker_us,
                "client_cpu_us_per_connect": alone.client_us,
            }),
        });
    }
    Ok(ScenarioResult {
        scenario: "idle".into(),
        settings: json!({"devices": sizes, "concurrency": ctx.concurrency, "per_process": ctx.per_process, "hold_s": hold.as_secs()}),
        load: meter.finish(),
        figures,
        details: serde_json::to_value(details)?,
        plots,
    })
}

/// The memory-per-connection plot over the sizes of `results` (idle runs); the file
/// name when drawn.
pub fn memory_plot(plots: Option<&std::path::Path>, results: &[ScenarioResult]) -> Option<String> {
    let path = plots?.join("idle-memory.png");
    let mut gateway = Vec::new();
    let mut mqtt = Vec::new();
    for size in results
        .iter()
        .filter(|r| r.scenario == "idle")
        .filter_map(|r| r.details.as_array())
        .flatten()
    {
        let n = size["devices"].as_f64().unwrap_or(0.0);
        if let Some(v) = size["gateway"]["run"]["rss_per_device_kib"].as_f64() {
            gateway.push((n, v));
        }
        let w = &size["web_mqtt"];
        if let Some(v) = w["rss_per_client_kib"].as_f64()
            && w["alive_after_ping"] == w["open"]
        {
            mqtt.push((n, v));
        }
    }
    let drawn = plot::lines(
        &path,
        "Memory per idle connection (a fresh broker and gateway per size)",
        "connections held",
        "KiB per connection",
        &[
            Series::new("gateway RSS per device", gateway),
            Series::new("Web-MQTT: broker RSS per client", mqtt),
        ],
        true,
    );
    match drawn {
        Ok(()) => Some("idle-memory.png".into()),
        Err(e) => {
            eprintln!("plot skipped: {e:#}");
            None
        }
    }
}
