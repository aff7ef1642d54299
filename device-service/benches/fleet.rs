//! The fleet against a real RabbitMQ, with same-run baselines (the test harness's
//! private broker, or the one `MOSAIC_TEST_AMQP_URL` / `MOSAIC_TEST_MGMT_URL` name).
//!
//! ```text
//! cargo bench -p device-service --bench fleet
//! BENCH_DEVICES=2000 BENCH_RATE=500 BENCH_SECONDS=5 BENCH_ROUNDS=3 cargo bench -p device-service --bench fleet
//! ```
//!
//! Two gateway replicas (this bench binary run again as child processes, each a
//! websocket-service) and one device-service (its binary, a child process) share one
//! broker; BENCH_DEVICES devices (default 10,000), half on each gateway, are real
//! WebSocket clients in this process that answer every request at once.
//!
//! 1. Presence: `GET /v1/devices/{device}/presence` for random connected devices at
//!    BENCH_RATE per second (default 1,000) for BENCH_SECONDS (default 10): p50, p99,
//!    max. Beside it, the floor: a plain AMQP request/reply round trip (publish with
//!    `reply_to`, a responder answering at once on the default exchange) at the same
//!    rate on the same broker.
//! 2. Scatter-gather: `POST /v1/broadcast/requests` to every device: the time until the
//!    call returns with every answer, against a plain `POST /v1/broadcast/events`
//!    reaching the same devices (time until the last device received it). Rounds
//!    alternate (BENCH_ROUNDS, default 3); medians are reported.
//! 3. Listing: every connected device through `GET /v1/devices?connected=true`, pages
//!    of 1,000: the time, and device-service's resident memory before and at its
//!    peak during the listing.
//!
//! Figures are printed, never asserted. `BENCH_SLOW=1` also prints every presence or
//! round trip over 100 ms with its offset in the run, to tell a stall of the machine
//! (every call at once) from a slow path.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use mosaic_runtime::config::{Parsed, parse};
use mosaic_tests::binary::Running;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use uuid::Uuid;

const TOKEN: &str = "bench-token-0123456789abcdef";
const SECRET: &str = "bench-jwt-secret-0123456789abcdefghijkl";
/// The variable that makes this binary a gateway, holding its settings.
const CHILD: &str = "MOSAIC_BENCH_GATEWAY";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    if let Ok(settings) = std::env::var(CHILD) {
        return rt.block_on(gateway(settings));
    }
    rt.block_on(bench())
}

/// A gateway replica (the child process).
async fn gateway(settings: String) -> anyhow::Result<()> {
    mosaic_tests::binary::raise_open_files(1 << 20);
    let mut env: HashMap<String, String> = settings
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let listen = std::env::var("LISTEN_ADDR")?;
    env.insert("LISTEN_ADDR".into(), listen.clone());
    let config =
        match parse::<websocket_service::Config>(["websocket-service"], |k| env.get(k).cloned()) {
            Ok(Parsed::Run(c)) => c,
            other => anyhow::bail!("bad gateway settings: {other:?}"),
        };
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    websocket_service::run(config, listener, mosaic_runtime::signal::terminate()).await?;
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn report(name: &str, mut v: Vec<Duration>, failed: usize) {
    v.sort();
    println!(
        "{name}: {} done, {failed} failed, p50 {}, p99 {}, max {}",
        v.len(),
        ms(percentile(&v, 0.50)),
        ms(percentile(&v, 0.99)),
        ms(v.last().copied().unwrap_or_default())
    );
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// What the simulated devices saw.
#[derive(Default)]
struct Seen {
    events: AtomicUsize,
    answered: AtomicUsize,
    all_events: Notify,
    target: AtomicUsize,
}

fn token(device: Uuid) -> String {
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": device, "exp": exp, "groups": ["bench"]}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("a token")
}

/// One device: connects, then answers every request at once and counts events.
async fn device(addr: std::net::SocketAddr, id: Uuid, seen: Arc<Seen>, up: mpsc::Sender<bool>) {
    let mut req = format!("ws://{addr}/v1/connect")
        .into_client_request()
        .expect("a URL");
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", token(id))).expect("a header"),
    );
    let connected = tokio::time::timeout(Duration::from_secs(60), async {
        let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (mut ws, _) = tokio_tungstenite::client_async(req, stream).await.ok()?;
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.as_str().contains("\"welcome\"") => Some(ws),
            _ => None,
        }
    })
    .await
    .ok()
    .flatten();
    let Some(ws) = connected else {
        let _ = up.send(false).await;
        return;
    };
    let _ = up.send(true).await;
    let (mut tx, mut rx) = ws.split();
    while let Some(Ok(m)) = rx.next().await {
        let Message::Text(t) = m else { continue };
        let Ok(f) = serde_json::from_str::<Value>(t.as_str()) else {
            continue;
        };
        match f["type"].as_str() {
            Some("request") => {
                let answer =
                    json!({"type":"response","request_id":f["id"],"status":"ok","data":{"v":1}});
                if tx.send(Message::text(answer.to_string())).await.is_err() {
                    return;
                }
                seen.answered.fetch_add(1, Ordering::Relaxed);
            }
            Some("event") => {
                let n = seen.events.fetch_add(1, Ordering::AcqRel) + 1;
                if n == seen.target.load(Ordering::Acquire) {
                    seen.all_events.notify_one();
                }
            }
            _ => {}
        }
    }
}

async fn hive() -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().route("/hive", axum::routing::post(|| async { "ok" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

async fn bench() -> anyhow::Result<()> {
    let n = env_u64("BENCH_DEVICES", 10_000) as usize;
    let rate = env_u64("BENCH_RATE", 1_000);
    let seconds = env_u64("BENCH_SECONDS", 10);
    let rounds = env_u64("BENCH_ROUNDS", 3).max(1) as usize;
    let files = mosaic_tests::binary::raise_open_files(n as u64 + 1024);
    anyhow::ensure!(
        files >= n as u64 + 256,
        "the open-files limit ({files}) is too low for {n} devices"
    );
    let broker = mosaic_tests::broker();
    let vhost = broker.vhost("bench-fleet").await;
    let hive = hive().await?;
    let exe = std::env::current_exe()?;
    let exe = exe.to_str().expect("a UTF-8 path");
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let settings = format!(
            "AMQP_URL={}\nJWT_SECRET={SECRET}\nMAX_UNAUTHENTICATED=100000\nLOG_FORMAT=text\n",
            vhost.amqp_url
        );
        let g = Running::spawn_logged(exe, &[], &[(CHILD, &settings), ("RUST_LOG", "warn")]);
        mosaic_tests::readiness(g.addr, true, Duration::from_secs(60)).await;
        gateways.push(g);
    }
    let hive_url = format!("http://{hive}/hive");
    let ds = Running::start_logged(
        env!("CARGO_BIN_EXE_device-service"),
        &[
            ("AMQP_URL", &vhost.amqp_url),
            ("HIVE_URL", &hive_url),
            ("API_TOKENS", TOKEN),
            ("HIVE_CONCURRENCY", "256"),
            ("FLEET_TIMEOUT_MS", "30000"),
            ("MAX_PENDING_REQUESTS", "100000"),
            ("RUST_LOG", "warn"),
        ],
    )
    .await;
    let api = ds.addr;
    println!("fleet bench: {n} devices over 2 gateway replicas, 1 device-service");

    // The devices.
    let seen = Arc::new(Seen::default());
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
    let (up_tx, mut up_rx) = mpsc::channel(1024);
    let started = Instant::now();
    let connecting = Arc::new(tokio::sync::Semaphore::new(256));
    for (i, id) in ids.iter().enumerate() {
        let addr = gateways[i % 2].addr;
        let permit = connecting.clone().acquire_owned().await?;
        let (seen, up, id) = (seen.clone(), up_tx.clone(), *id);
        tokio::spawn(async move {
            let (tx, mut rx) = mpsc::channel(1);
            tokio::spawn(device(addr, id, seen, tx));
            let ok = rx.recv().await.unwrap_or(false);
            drop(permit);
            let _ = up.send(ok).await;
        });
    }
    drop(up_tx);
    let mut ok = 0;
    while let Some(up) = up_rx.recv().await {
        ok += usize::from(up);
    }
    println!(
        "connected {ok} of {n} devices in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    anyhow::ensure!(ok == n, "not every device connected");

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(2048)
        .build()?;

    // 1. Presence, and the raw AMQP round trip beside it.
    let floor = amqp_round_trips(&vhost.amqp_url, rate, seconds).await?;
    let presence = presence(&http, api, &ids, rate, seconds).await?;
    report(
        &format!("raw AMQP request/reply at {rate}/s"),
        floor.0,
        floor.1,
    );
    report(&format!("presence at {rate}/s"), presence.0, presence.1);

    // 2. Scatter-gather against a plain broadcast event.
    let (mut fans, mut casts) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        seen.events.store(0, Ordering::Release);
        seen.target.store(n, Ordering::Release);
        let t = Instant::now();
        let (status, body) =
            post(&http, api, "/v1/broadcast/events", json!({"name":"ping"})).await?;
        anyhow::ensure!(status == 202, "broadcast event: {status} {body}");
        tokio::time::timeout(Duration::from_secs(120), seen.all_events.notified())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "only {} devices got the broadcast",
                    seen.events.load(Ordering::Acquire)
                )
            })?;
        let cast = t.elapsed();
        let t = Instant::now();
        let (status, body) = post(
            &http,
            api,
            "/v1/broadcast/requests",
            json!({"name":"read","timeout_ms":120000}),
        )
        .await?;
        let fan = t.elapsed();
        anyhow::ensure!(status == 200, "broadcast request: {status}");
        let answers = body["answers"].as_array().map_or(0, Vec::len);
        println!(
            "round {round}: broadcast event to {n} devices {}, scatter-gather {} (asked {}, answered {answers}, timed out {}) = {:.2}x",
            ms(cast),
            ms(fan),
            body["asked"],
            body["timed_out"].as_array().map_or(0, Vec::len),
            fan.as_secs_f64() / cast.as_secs_f64()
        );
        fans.push(fan);
        casts.push(cast);
    }
    let (fan, cast) = (median(&mut fans), median(&mut casts));
    println!(
        "scatter-gather to {n} devices: median {} until the last answer reached the caller; plain broadcast event: median {} until the last device got it; ratio {:.2}",
        ms(fan),
        ms(cast),
        fan.as_secs_f64() / cast.as_secs_f64()
    );

    // 3. Listing, and device-service's memory meanwhile.
    let before = ds.rss_bytes().unwrap_or(0);
    let peak = Arc::new(AtomicU64::new(before));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn({
        let (peak, stop, pid) = (peak.clone(), stop.clone(), ds.pid());
        async move {
            while !stop.load(Ordering::Acquire) {
                if let Some(r) = mosaic_tests::binary::rss_bytes(pid) {
                    peak.fetch_max(r, Ordering::AcqRel);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let t = Instant::now();
    let mut listed = 0;
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let url = format!("http://{api}/v1/devices?connected=true&limit=1000{cursor}");
        let page: Value = http
            .get(url)
            .bearer_auth(TOKEN)
            .send()
            .await?
            .json()
            .await?;
        pages += 1;
        listed += page["devices"].as_array().map_or(0, Vec::len);
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    let took = t.elapsed();
    stop.store(true, Ordering::Release);
    let _ = sampler.await;
    println!(
        "listing: {listed} devices in {pages} pages of 1000 in {}; device-service RSS {:.1} MiB before, {:.1} MiB at its peak",
        ms(took),
        before as f64 / (1 << 20) as f64,
        peak.load(Ordering::Acquire) as f64 / (1 << 20) as f64
    );
    for g in &gateways {
        g.terminate();
    }
    ds.terminate();
    Ok(())
}

async fn post(
    http: &reqwest::Client,
    api: std::net::SocketAddr,
    path: &str,
    body: Value,
) -> anyhow::Result<(u16, Value)> {
    let res = http
        .post(format!("http://{api}{path}"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await?;
    let status = res.status().as_u16();
    Ok((status, res.json().await.unwrap_or(Value::Null)))
}

/// Runs `one` at `rate` per second for `seconds`; returns the latencies and failures.
async fn at_rate<F, Fut>(rate: u64, seconds: u64, one: F) -> (Vec<Duration>, usize)
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = bool> + Send + 'static,
{
    let total = rate * seconds;
    let (tx, mut rx) = mpsc::channel(total.max(1) as usize);
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..total {
        tick.tick().await;
        let fut = one(i);
        let tx = tx.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let ok = tokio::time::timeout(Duration::from_secs(10), fut)
                .await
                .unwrap_or(false);
            let took = t.elapsed();
            if std::env::var("BENCH_SLOW").is_ok() && took > Duration::from_millis(100) {
                eprintln!("slow: at {:?} took {:?}", t.duration_since(t0), took);
            }
            let _ = tx.send((ok, took)).await;
        });
    }
    drop(tx);
    let (mut v, mut failed) = (Vec::new(), 0);
    while let Some((ok, d)) = rx.recv().await {
        if ok {
            v.push(d);
        } else {
            failed += 1;
        }
    }
    (v, failed)
}

async fn presence(
    http: &reqwest::Client,
    api: std::net::SocketAddr,
    ids: &[Uuid],
    rate: u64,
    seconds: u64,
) -> anyhow::Result<(Vec<Duration>, usize)> {
    let ask = |i: u64| {
        let http = http.clone();
        let url = format!(
            "http://{api}/v1/devices/{}/presence",
            ids[(i as usize * 7919) % ids.len()]
        );
        async move {
            match http.get(url).bearer_auth(TOKEN).send().await {
                Ok(r) if r.status() == 200 => r
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["connected"] == true),
                _ => false,
            }
        }
    };
    // Warm up connections and caches.
    for i in 0..200 {
        ask(i).await;
    }
    Ok(at_rate(rate, seconds, ask).await)
}

/// The floor: publish with `reply_to`, a responder answers at once.
async fn amqp_round_trips(
    url: &str,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<(Vec<Duration>, usize)> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let responder = conn.create_channel().await?;
    let q = responder
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
    let mut requests = responder
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
    tokio::spawn(async move {
        while let Some(Ok(d)) = requests.next().await {
            let (Some(to), Some(corr)) = (
                d.properties.reply_to().clone(),
                d.properties.correlation_id().clone(),
            ) else {
                continue;
            };
            let _ = responder
                .basic_publish(
                    "".into(),
                    to,
                    BasicPublishOptions::default(),
                    b"{}",
                    BasicProperties::default().with_correlation_id(corr),
                )
                .await;
        }
    });
    let client = conn.create_channel().await?;
    let replies = client
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
    let mut answers = client
        .basic_consume(
            replies.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let waiting: Arc<std::sync::Mutex<HashMap<String, tokio::sync::oneshot::Sender<()>>>> =
        Arc::default();
    tokio::spawn({
        let waiting = waiting.clone();
        async move {
            while let Some(Ok(d)) = answers.next().await {
                if let Some(c) = d.properties.correlation_id()
                    && let Some(tx) = waiting.lock().unwrap().remove(c.as_str())
                {
                    let _ = tx.send(());
                }
            }
        }
    });
    let queue = q.name().clone();
    let reply_to = replies.name().clone();
    let ask = |i: u64| {
        let (client, queue, reply_to, waiting) = (
            client.clone(),
            queue.clone(),
            reply_to.clone(),
            waiting.clone(),
        );
        async move {
            let id = format!("r{i}");
            let (tx, rx) = tokio::sync::oneshot::channel();
            waiting.lock().unwrap().insert(id.clone(), tx);
            let sent = client
                .basic_publish(
                    "".into(),
                    queue,
                    BasicPublishOptions::default(),
                    b"{}",
                    BasicProperties::default()
                        .with_reply_to(reply_to)
                        .with_correlation_id(ShortString::from(id)),
                )
                .await
                .is_ok();
            sent && rx.await.is_ok()
        }
    };
    for i in 0..200 {
        ask(u64::MAX - i).await;
    }
    let r = at_rate(rate, seconds, ask).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(r)
}
