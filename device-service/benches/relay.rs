//! Throughput of the relay against a plain AMQP baseline, and the REST request round
//! trip at a fixed rate, against a real RabbitMQ (the test harness's private broker,
//! or the one `MOSAIC_TEST_AMQP_URL` / `MOSAIC_TEST_MGMT_URL` name).
//!
//! ```text
//! cargo bench -p device-service --bench relay
//! BENCH_MESSAGES=50000 BENCH_ROUNDS=5 BENCH_RATE=1000 BENCH_SECONDS=10 cargo bench -p device-service --bench relay
//! ```
//!
//! 1. Baseline: one publisher sends BENCH_MESSAGES persistent messages with publisher
//!    confirms (up to 256 unconfirmed) to a durable quorum queue, and one consumer
//!    (prefetch 64, one ack per message) takes them: messages per second from the first
//!    publish to the last ack.
//! 2. Relay: the same publisher sends the same number of device events to
//!    `mosaic.events`; device-service (HIVE_CONCURRENCY 64) relays them to a local
//!    HTTP server that answers 200 at once: events per second from the first publish to
//!    the last POST Hive received. Steps 1 and 2 alternate for BENCH_ROUNDS rounds
//!    (default 3); the medians are compared.
//! 3. REST: `POST /v1/devices/{d}/requests` at BENCH_RATE per second for BENCH_SECONDS,
//!    answered at once by a gateway stand-in on the broker: p50, p99 and max latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Map, Value, json};
use tokio::sync::Notify;
use uuid::Uuid;

const TOKEN: &str = "bench-token-0123456789abcdef";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; any filter argument is ignored.
    let n = env_u64("BENCH_MESSAGES", 20_000);
    let rate = env_u64("BENCH_RATE", 1_000);
    let seconds = env_u64("BENCH_SECONDS", 10);
    let broker = mosaic_tests::broker();

    // Rounds alternate baseline and relay, so a noisy neighbour hurts both alike; the
    // medians are reported.
    let rounds = env_u64("BENCH_ROUNDS", 3).max(1);
    let (mut base, mut rel) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let b = baseline(&broker.vhost("bench-baseline").await.amqp_url, n).await?;
        let r = relay(&broker.vhost("bench-relay").await.amqp_url, n).await?;
        println!(
            "round {round}: baseline {b:.0} msg/s, relay {r:.0} events/s ({:.0}%)",
            100.0 * r / b
        );
        base.push(b);
        rel.push(r);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (baseline, relay) = (median(&mut base), median(&mut rel));
    println!(
        "baseline: plain AMQP publisher + consumer, persistent, confirms, quorum queue, prefetch 64: {n} messages, median {baseline:.0} msg/s"
    );
    println!(
        "relay:    device-service to a local Hive (HIVE_CONCURRENCY 64): {n} events, median {relay:.0} events/s = {:.0}% of baseline",
        100.0 * relay / baseline
    );
    rest(&broker.vhost("bench-rest").await.amqp_url, rate, seconds).await?;
    Ok(())
}

async fn channel(url: &str) -> anyhow::Result<(Connection, Channel)> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok((conn, ch))
}

fn quorum() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    t
}

/// Publishes `n` persistent messages, keeping up to 256 unconfirmed.
async fn publish_all(
    ch: &Channel,
    exchange: &str,
    n: u64,
    message: impl Fn(u64) -> (String, FieldTable, Vec<u8>),
) -> anyhow::Result<()> {
    let mut window = std::collections::VecDeque::new();
    for i in 0..n {
        let (key, headers, body) = message(i);
        let confirm = ch
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(key),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_headers(headers)
                    .with_delivery_mode(2),
            )
            .await?;
        window.push_back(confirm);
        if window.len() >= 256 {
            let c = window.pop_front().expect("not empty").await?;
            anyhow::ensure!(c.is_ack(), "broker refused a message");
        }
    }
    for c in window {
        anyhow::ensure!(c.await?.is_ack(), "broker refused a message");
    }
    Ok(())
}

fn event(i: u64) -> (String, FieldTable, Vec<u8>) {
    let device = Uuid::now_v7();
    let mut h = Map::new();
    h.insert("kind".into(), json!("event"));
    h.insert("message_id".into(), json!(Uuid::now_v7().to_string()));
    h.insert("device".into(), json!(device.to_string()));
    h.insert("name".into(), json!("temperature"));
    h.insert("received_at".into(), json!("2026-01-01T00:00:00.000000Z"));
    h.insert("gateway".into(), json!("bench"));
    h.insert("session".into(), json!(Uuid::now_v7().to_string()));
    h.insert("unit".into(), json!("C"));
    let table = amqp_value_json::to_field_table(&h).expect("headers map");
    let body = format!(r#"{{"seq":{i},"value":21.5}}"#).into_bytes();
    (
        mosaic_protocol::exchange::event_key(device, "temperature"),
        table,
        body,
    )
}

async fn baseline(url: &str, n: u64) -> anyhow::Result<f64> {
    let (_pc, pub_ch) = channel(url).await?;
    let (_cc, con_ch) = channel(url).await?;
    let queue = "bench.baseline";
    con_ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            quorum(),
        )
        .await?;
    con_ch.basic_qos(64, BasicQosOptions::default()).await?;
    let mut consumer = con_ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    let consume = tokio::spawn(async move {
        let mut got = 0u64;
        while got < n {
            let d = consumer.next().await.expect("consumer open")?;
            d.acker.ack(BasicAckOptions::default()).await?;
            got += 1;
        }
        Ok::<_, lapin::Error>(())
    });
    publish_all(&pub_ch, "", n, |i| {
        let (_, h, b) = event(i);
        (queue.to_owned(), h, b)
    })
    .await?;
    tokio::time::timeout(Duration::from_secs(600), consume).await???;
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// A Hive that answers 200 at once and counts.
async fn counting_hive() -> anyhow::Result<(String, Arc<AtomicU64>, Arc<Notify>)> {
    let count = Arc::new(AtomicU64::new(0));
    let notify = Arc::new(Notify::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hive", listener.local_addr()?);
    let app = axum::Router::new().route(
        "/hive",
        axum::routing::post({
            let count = count.clone();
            let notify = notify.clone();
            move |_body: axum::body::Bytes| async move {
                count.fetch_add(1, Ordering::Relaxed);
                notify.notify_waiters();
                axum::http::StatusCode::OK
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, count, notify))
}

async fn start_service(
    url: &str,
    hive: &str,
) -> anyhow::Result<(std::net::SocketAddr, tokio::sync::oneshot::Sender<()>)> {
    let vars = [
        ("AMQP_URL", url),
        ("HIVE_URL", hive),
        ("API_TOKENS", TOKEN),
        ("HIVE_CONCURRENCY", "64"),
        ("LOG_FORMAT", "text"),
    ];
    let config =
        match mosaic_runtime::config::parse::<device_service::Config>(["device-service"], |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })? {
            mosaic_runtime::config::Parsed::Run(c) => c,
            mosaic_runtime::config::Parsed::Print(t) => anyhow::bail!("unexpected: {t}"),
        };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(device_service::run(config, listener, async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await
            && r.status() == 200
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "device-service never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((addr, stop))
}

async fn relay(url: &str, n: u64) -> anyhow::Result<f64> {
    let (hive, count, notify) = counting_hive().await?;
    let (_addr, stop) = start_service(url, &hive).await?;
    let (_pc, pub_ch) = channel(url).await?;
    let started = Instant::now();
    publish_all(&pub_ch, mosaic_protocol::exchange::EVENTS, n, event).await?;
    let done = async {
        loop {
            let notified = notify.notified();
            if count.load(Ordering::Relaxed) >= n {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(600), done).await?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = stop.send(());
    Ok(rate)
}

async fn rest(url: &str, rate: u64, seconds: u64) -> anyhow::Result<()> {
    let (hive, _, _) = counting_hive().await?;
    let (addr, stop) = start_service(url, &hive).await?;
    // The gateway stand-in: answers every request at once on its reply path.
    let device = Uuid::now_v7();
    let (_gc, gw) = {
        let conn = Connection::connect(url, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        (conn, ch)
    };
    let q = gw
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    gw.queue_bind(
        q.name().clone(),
        mosaic_protocol::exchange::COMMANDS.into(),
        ShortString::from(mosaic_protocol::exchange::device_key(device)),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let mut consumer = gw
        .basic_consume(
            q.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut reply_headers = Map::new();
    reply_headers.insert("kind".into(), json!("response"));
    reply_headers.insert("status".into(), json!("ok"));
    let reply_headers = amqp_value_json::to_field_table(&reply_headers)?;
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let (Some(to), Some(corr)) = (
                d.properties.reply_to().clone(),
                d.properties.correlation_id().clone(),
            ) else {
                continue;
            };
            let _ = gw
                .basic_publish(
                    "".into(),
                    to,
                    BasicPublishOptions::default(),
                    &d.data,
                    BasicProperties::default()
                        .with_headers(reply_headers.clone())
                        .with_correlation_id(corr),
                )
                .await;
        }
    });

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()?;
    let target = format!("http://{addr}/v1/devices/{device}/requests");
    let body: Value = json!({"name": "read", "data": {"reg": 1}, "timeout_ms": 5000});
    // Warm up connections and caches.
    for _ in 0..200 {
        http.post(&target)
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await?;
    }
    let total = rate * seconds;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut calls = Vec::with_capacity(total as usize);
    let started = Instant::now();
    for _ in 0..total {
        tick.tick().await;
        let http = http.clone();
        let target = target.clone();
        let body = body.clone();
        calls.push(tokio::spawn(async move {
            let t = Instant::now();
            let res = http
                .post(&target)
                .bearer_auth(TOKEN)
                .json(&body)
                .send()
                .await;
            let ok = matches!(&res, Ok(r) if r.status() == 200);
            (t.elapsed(), ok)
        }));
    }
    let sent_in = started.elapsed();
    let mut lat = Vec::with_capacity(calls.len());
    let mut failed = 0;
    for c in calls {
        let (d, ok) = c.await?;
        if !ok {
            failed += 1;
        }
        lat.push(d);
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "rest:     POST /requests at {rate}/s for {seconds} s ({total} sent in {:.1} s, {failed} not 200): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        sent_in.as_secs_f64(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        lat.last().expect("some calls").as_secs_f64() * 1e3,
    );
    let _ = stop.send(());
    Ok(())
}
