//! Idle-connection bench: starts the release gateway as its own process, opens N
//! authenticated WebSocket connections to it over loopback, and prints the
//! gateway's resident memory per connection and the connect rate.
//!
//! ```sh
//! cargo build --release -p websocket-service
//! BENCH_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f BENCH_CONNECTIONS=10000 \
//!     cargo bench -p websocket-service --bench connections
//! ```
//!
//! Settings (environment): `BENCH_AMQP_URL` (a running RabbitMQ; default the local
//! one), `BENCH_CONNECTIONS` (N, default 1000, at most 19000), `BENCH_CONCURRENCY`
//! (connects in flight, default 256), `BENCH_GATEWAY` (the gateway binary; default
//! the workspace's `target/release/websocket-service`), `BENCH_HOLD_SECS` (keep the
//! connections open this long after measuring, at most 600; default 0: several bench
//! processes started together then measure several replicas at their peak at once),
//! `BENCH_BROKER_PID` (optional: the pid of the broker's `beam.smp` on this machine;
//! when given, its CPU per connect is printed too), `BENCH_BASELINE` (`full`, the
//! default; `minimal`; `off`: see below).
//!
//! Baseline, measured first in the same run: the broker alone. A plain AMQP client
//! (no gateway, no WebSocket) asks RabbitMQ for exactly what one device connect asks
//! of it: a `device.<id>` binding to an exclusive queue on `mosaic.commands.devices`,
//! a takeover notice to that key (which comes back to the queue's consumer, as a
//! replica's own notice does) and a persistent lifecycle message on `mosaic.events`,
//! both confirmed, N times with the same concurrency (`minimal` leaves the takeover
//! notice out: a binding and a lifecycle message are the least that routing commands
//! to one replica and announcing the device need). The gateway's connect rate is
//! then printed as a ratio of that rate: on a machine where the broker, the gateway
//! and the bench client share the cores, it says how much of the broker's own limit
//! the gateway reaches.
//!
//! Loopback only; every wait is bounded.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use jsonwebtoken::{EncodingKey, Header};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use mosaic_protocol::command::Kind;
use mosaic_protocol::exchange::{self, Lifecycle};
use mosaic_protocol::header;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const SECRET: &str = "bench-secret-0123456789-0123456789-abcdef";
const MAX_CONNECTIONS: usize = 19_000;
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Client connections come from 127.0.0.2 up to 127.0.0.(1 + this).
const SOURCE_ADDRS: usize = 16;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time (user + system) of `pid` in seconds, from /proc.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Resident memory of `pid` in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Resident memory of `pid` once it stopped changing: the same in two readings
/// 250 ms apart (at most 5 s of readings).
async fn steady_rss_kib(pid: u32) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = rss_kib(pid);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = rss_kib(pid);
        if now == last {
            break;
        }
        last = now;
    }
    last
}

struct Gateway(Child);

impl Gateway {
    /// Sends SIGTERM and waits (at most 30 s) for the process to exit; returns how
    /// long it took, or `None` when it had to be killed.
    fn terminate(&mut self) -> Option<Duration> {
        let started = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.terminate();
        }
    }
}

fn token(device: uuid::Uuid) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims = serde_json::json!({"sub": device.to_string(), "exp": exp});
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// What the broker-alone baseline measured.
struct Baseline {
    /// The broker operations per connect.
    work: &'static str,
    rate: f64,
    broker_us: Option<f64>,
    client_us: f64,
}

fn table(pairs: &[(&str, String)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(
            ShortString::from(*k),
            AMQPValue::LongString(LongString::from(v.as_str())),
        );
    }
    t
}

/// The broker's share of `n` device connects, asked by a plain AMQP client: see the
/// module documentation.
async fn broker_alone(
    amqp: &str,
    n: usize,
    concurrency: usize,
    broker_pid: Option<u32>,
    with_takeover: bool,
) -> anyhow::Result<Baseline> {
    const CHANNELS: usize = 4;
    let conn = tokio::time::timeout(
        STEP_TIMEOUT,
        Connection::connect(amqp, ConnectionProperties::default()),
    )
    .await??;
    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        channels.push(ch);
    }
    let ch = &channels[0];
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        exchange::EVENTS.into(),
        ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        exchange::COMMANDS_DEVICES.into(),
        ExchangeKind::Direct,
        durable,
        FieldTable::default(),
    )
    .await?;
    let gateway = uuid::Uuid::new_v4();
    let queue = ShortString::from(format!("bench.baseline.{gateway}"));
    ch.queue_declare(
        queue.clone(),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    // The replica's consumer: every takeover notice comes back here and is acked.
    let consume = conn.create_channel().await?;
    consume.basic_qos(512, BasicQosOptions::default()).await?;
    let mut consumer = consume
        .basic_consume(
            queue.clone(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let acking = tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let _ = d.acker.ack(BasicAckOptions::default()).await;
        }
    });

    let broker_before = broker_pid.map(cpu_secs);
    let client_before = cpu_secs(std::process::id());
    let started = Instant::now();
    let limit = Arc::new(Semaphore::new(concurrency));
    let mut connects = FuturesUnordered::new();
    for i in 0..n {
        let permit = limit.clone().acquire_owned().await?;
        let ch = channels[i % CHANNELS].clone();
        let queue = queue.clone();
        connects.push(tokio::spawn(async move {
            let device = uuid::Uuid::new_v4();
            let session = uuid::Uuid::now_v7();
            let ids = [
                (header::DEVICE, device.to_string()),
                (header::SESSION, session.to_string()),
                (header::GATEWAY, gateway.to_string()),
            ];
            let key = exchange::device_key(device);
            let done = tokio::time::timeout(STEP_TIMEOUT, async {
                ch.queue_bind(
                    queue,
                    exchange::COMMANDS_DEVICES.into(),
                    key.clone().into(),
                    QueueBindOptions { nowait: true },
                    FieldTable::default(),
                )
                .await?;
                let mut takeover = ids.to_vec();
                takeover.push((header::KIND, Kind::Takeover.as_str().into()));
                let mut lifecycle = ids.to_vec();
                lifecycle.extend([
                    (header::KIND, header::KIND_LIFECYCLE.into()),
                    (header::NAME, Lifecycle::Connected.as_str().into()),
                    (header::MESSAGE_ID, uuid::Uuid::now_v7().to_string()),
                    (header::RECEIVED_AT, "2026-01-01T00:00:00.000000Z".into()),
                ]);
                let t = if with_takeover {
                    let confirm = ch
                        .basic_publish(
                            exchange::COMMANDS_DEVICES.into(),
                            key.into(),
                            BasicPublishOptions::default(),
                            b"null",
                            BasicProperties::default().with_headers(table(&takeover)),
                        )
                        .await?;
                    Some(confirm)
                } else {
                    None
                };
                let l = ch
                    .basic_publish(
                        exchange::EVENTS.into(),
                        exchange::lifecycle_key(device, Lifecycle::Connected).into(),
                        BasicPublishOptions::default(),
                        b"null",
                        BasicProperties::default()
                            .with_delivery_mode(2)
                            .with_headers(table(&lifecycle)),
                    )
                    .await?;
                let taken_over = match t {
                    Some(t) => t.await?.is_ack(),
                    None => true,
                };
                Ok::<bool, lapin::Error>(taken_over && l.await?.is_ack())
            })
            .await;
            drop(permit);
            matches!(done, Ok(Ok(true)))
        }));
    }
    let mut ok = 0usize;
    while let Some(r) = connects.next().await {
        if matches!(r, Ok(true)) {
            ok += 1;
        }
    }
    anyhow::ensure!(ok == n, "baseline: {} of {n} connects failed", n - ok);
    let elapsed = started.elapsed();
    let baseline = Baseline {
        work: if with_takeover {
            "binding, takeover notice, lifecycle message"
        } else {
            "binding, lifecycle message"
        },
        rate: n as f64 / elapsed.as_secs_f64(),
        broker_us: broker_pid
            .zip(broker_before)
            .map(|(p, b)| (cpu_secs(p) - b) * 1e6 / n as f64),
        client_us: (cpu_secs(std::process::id()) - client_before) * 1e6 / n as f64,
    };
    let _ = tokio::time::timeout(STEP_TIMEOUT, conn.close(200, "done".into())).await;
    acking.abort();
    queue_gone(amqp, &queue).await?;
    Ok(baseline)
}

/// Waits (at most 20 s) until RabbitMQ deleted the exclusive `queue` of a closed
/// connection: its N bindings go in the same deletion, which takes the broker a while.
async fn queue_gone(amqp: &str, queue: &ShortString) -> anyhow::Result<()> {
    let conn = Connection::connect(amqp, ConnectionProperties::default()).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        // A passive declare answers 404 once the queue is gone (405 while it exists
        // and is still exclusive to the closed connection); a failure closes the channel.
        let ch = conn.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        match ch
            .queue_declare(queue.clone(), passive, FieldTable::default())
            .await
        {
            Err(e) if matches!(e.kind(), lapin::ErrorKind::ProtocolError(a) if a.get_id() == 404) =>
            {
                let _ = conn.close(200, "done".into()).await;
                return Ok(());
            }
            Ok(_) => {
                let _ = ch.close(200, "again".into()).await;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the baseline's queue was not deleted within 20 s")
}

/// Waits until the broker's CPU is idle again (at most 20 s).
async fn settle(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let step = Duration::from_millis(500);
    while Instant::now() < deadline {
        let before = cpu_secs(pid);
        tokio::time::sleep(step).await;
        if cpu_secs(pid) - before < 0.1 * step.as_secs_f64() {
            return;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let n: usize = env_or("BENCH_CONNECTIONS", 1000).min(MAX_CONNECTIONS);
    let concurrency: usize = env_or("BENCH_CONCURRENCY", 256);
    let amqp: String = env_or(
        "BENCH_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
    );
    let default_bin = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/release/websocket-service"
    );
    let bin: String = env_or("BENCH_GATEWAY", default_bin.to_owned());
    let broker_pid: Option<u32> = std::env::var("BENCH_BROKER_PID")
        .ok()
        .and_then(|v| v.trim().parse().ok());
    let with_takeover = match env_or("BENCH_BASELINE", "full".to_owned()).as_str() {
        "full" => Some(true),
        "minimal" => Some(false),
        "off" => None,
        other => anyhow::bail!("BENCH_BASELINE is full, minimal or off, not {other:?}"),
    };
    let baseline = match with_takeover {
        Some(t) => {
            let b = broker_alone(&amqp, n, concurrency, broker_pid, t).await?;
            if let Some(pid) = broker_pid {
                settle(pid).await;
            }
            Some(b)
        }
        None => None,
    };

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(&bin)
        .env_clear()
        .env("AMQP_URL", &amqp)
        .env("LISTEN_ADDR", &addr)
        .env("JWT_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .env("PING_INTERVAL_MS", "600000")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot start {bin}: {e} (build it with cargo build --release -p websocket-service)"
            )
        })?;
    let pid = child.id();
    let mut gateway = Gateway(child);

    // Ready = connected to RabbitMQ.
    let http = reqwest_lite(&addr);
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        if http.ready().await {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "gateway not ready in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = steady_rss_kib(pid).await;

    let tokens: Vec<String> = (0..n).map(|_| token(uuid::Uuid::new_v4())).collect();
    let limit = Arc::new(Semaphore::new(concurrency));
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024);
    let broker_before = broker_pid.map(cpu_secs);
    let cpu_before = cpu_secs(pid);
    let client_before = cpu_secs(std::process::id());
    let started = Instant::now();
    let mut connecting = FuturesUnordered::new();
    let gateway_addr: std::net::SocketAddr = addr.parse()?;
    for (i, t) in tokens.into_iter().enumerate() {
        let permit = limit.clone().acquire_owned().await?;
        let url = format!("ws://{addr}/v1/connect");
        connecting.push(tokio::spawn(async move {
            let mut req = url.into_client_request().unwrap();
            req.headers_mut().insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
            );
            let res = tokio::time::timeout(STEP_TIMEOUT, async {
                // Spread over source addresses: past about 14,000 connections from one
                // address, Linux scans its whole port range on each connect(), and
                // the client would measure that instead of the gateway.
                let src = std::net::Ipv4Addr::new(127, 0, 0, 2 + (i % SOURCE_ADDRS) as u8);
                let socket = tokio::net::TcpSocket::new_v4().ok()?;
                socket.bind((src, 0).into()).ok()?;
                let stream = socket.connect(gateway_addr).await.ok()?;
                let (mut ws, _) =
                    tokio_tungstenite::client_async_with_config(req, stream, Some(config))
                        .await
                        .ok()?;
                // Wait for the welcome: the session is registered and bound.
                match ws.next().await {
                    Some(Ok(m)) if m.is_text() => Some(ws),
                    _ => None,
                }
            })
            .await
            .ok()
            .flatten();
            drop(permit);
            res
        }));
    }
    let mut open = Vec::with_capacity(n);
    let mut failed = 0usize;
    while let Some(r) = connecting.next().await {
        match r {
            Ok(Some(ws)) => open.push(ws),
            _ => failed += 1,
        }
    }
    let elapsed = started.elapsed();
    let cpu = cpu_secs(pid) - cpu_before;
    let client_cpu = cpu_secs(std::process::id()) - client_before;
    let broker_cpu = broker_pid.zip(broker_before).map(|(p, b)| cpu_secs(p) - b);
    // After the last welcome, the allocator and the broker traffic settle first.
    let after = steady_rss_kib(pid).await;
    let per = (after.saturating_sub(before) as f64) / open.len().max(1) as f64;
    println!("connections        {} open, {failed} failed", open.len());
    println!(
        "connect rate       {:.0} connections/s ({} in {:.2} s, {concurrency} in flight)",
        open.len() as f64 / elapsed.as_secs_f64(),
        open.len(),
        elapsed.as_secs_f64()
    );
    println!(
        "gateway RSS        {before} KiB idle -> {after} KiB with {} connections",
        open.len()
    );
    println!("RSS per connection {per:.1} KiB");
    println!(
        "gateway CPU        {:.0} µs per connect ({cpu:.2} s for {} connects; the bench client shares the machine)",
        cpu * 1e6 / open.len().max(1) as f64,
        open.len()
    );
    println!(
        "bench client CPU   {:.0} µs per connect",
        client_cpu * 1e6 / open.len().max(1) as f64
    );
    if let Some(b) = broker_cpu {
        println!(
            "broker CPU         {:.0} µs per connect ({b:.2} s for {} connects)",
            b * 1e6 / open.len().max(1) as f64,
            open.len()
        );
    }
    if let Some(b) = &baseline {
        let rate = open.len() as f64 / elapsed.as_secs_f64();
        println!(
            "baseline           broker alone ({}): {:.0} connects/s{}, its client {:.0} µs per connect",
            b.work,
            b.rate,
            b.broker_us
                .map(|us| format!(", broker CPU {us:.0} µs per connect"))
                .unwrap_or_default(),
            b.client_us
        );
        println!(
            "gateway / baseline {:.2} (connect rate through the gateway / broker alone)",
            rate / b.rate
        );
    }
    println!(
        "gateway capacity   {:.0} connects per second of one core (1 s / gateway CPU per connect)",
        open.len() as f64 / cpu.max(1e-9)
    );
    let hold = Duration::from_secs(env_or("BENCH_HOLD_SECS", 0u64).min(600));
    if !hold.is_zero() {
        println!(
            "holding            {} connections for {} s from unix time {}",
            open.len(),
            hold.as_secs(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs()
        );
        tokio::time::sleep(hold).await;
        // Still there: every socket answers a ping with a pong.
        let mut alive = 0usize;
        for ws in open.iter_mut() {
            use futures_util::SinkExt;
            let ping = tokio_tungstenite::tungstenite::Message::Ping(Vec::new().into());
            if ws.send(ping).await.is_ok() {
                let pong = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
                if matches!(pong, Ok(Some(Ok(m))) if m.is_pong()) {
                    alive += 1;
                }
            }
        }
        println!(
            "after holding      {alive} of {} connections answer a ping",
            open.len()
        );
    }
    let sessions = open.len();
    match gateway.terminate() {
        Some(t) => println!(
            "shutdown           SIGTERM to exit in {:.2} s with {sessions} sessions open",
            t.as_secs_f64()
        ),
        None => println!("shutdown           did not exit within 30 s"),
    }
    drop(open);
    Ok(())
}

/// A minimal HTTP/1.1 GET of `/readyz`, to keep the bench's dependencies small.
fn reqwest_lite(addr: &str) -> Ready {
    Ready(addr.to_owned())
}

struct Ready(String);

impl Ready {
    async fn ready(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(Ok(mut s)) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(&self.0),
        )
        .await
        else {
            return false;
        };
        let req = format!(
            "GET /readyz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.0
        );
        if s.write_all(req.as_bytes()).await.is_err() {
            return false;
        }
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
        buf.starts_with(b"HTTP/1.1 200")
    }
}
