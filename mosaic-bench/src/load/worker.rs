//! The load process's side: read one [`Job`], do it, answer [`Command`]s, and write
//! [`Report`]s, one JSON object a line on standard output. The end of standard input
//! (the coordinator exited, however it exited) ends the process.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header};
use mosaic_tools::answer::Answer;
use mosaic_tools::device::{self, Credentials, DeviceConfig, EventPlan, Output, Stats};
use mosaic_tools::token::{Signer, TokenSpec};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Command, HoldJob, Job, Report, SimulateJob, Target};
use crate::mqtt;
use crate::procfs::now_us;

/// Bound on one connect (TCP, upgrade, authentication or subscription).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the whole life of a load process, whatever the coordinator says.
const LIFETIME: Duration = Duration::from_secs(3 * 3600);

type Ws = WebSocketStream<TcpStream>;

fn emit(report: &Report) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, report);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// Runs the load process: reads its job from standard input, then commands.
pub async fn run() -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await??
        .ok_or_else(|| anyhow::anyhow!("no job on standard input"))?;
    let job: Job = serde_json::from_str(&first)?;
    let (commands_tx, commands) = tokio::sync::mpsc::channel::<Command>(16);
    // Standard input: commands, and its end stops everything.
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Command>(&line) {
                    Ok(c) => {
                        if commands_tx.send(c).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => eprintln!("load process: bad command {line:?}: {e}"),
                }
            }
            stop.cancel();
        }
    });
    let work = async {
        match job {
            Job::Hold(job) => hold(job, commands, stop.clone()).await,
            Job::Simulate(job) => simulate(job, commands, stop.clone()).await,
        }
    };
    tokio::select! {
        r = work => r,
        _ = tokio::time::sleep(LIFETIME) => anyhow::bail!("the load process ran past its lifetime"),
    }
}

/// One held connection's shared state.
struct Shared {
    /// Time (µs) of the first text frame or PUBLISH since the last arming; 0: none.
    arrivals: Vec<AtomicU64>,
    /// How many of `arrivals` are set.
    arrived: AtomicUsize,
    /// Answers to the latest ping round.
    pongs: AtomicUsize,
    /// Connections still open.
    open: AtomicUsize,
}

fn token(secret: &str, device: Uuid) -> String {
    let exp = now_us() / 1_000_000 + 6 * 3600;
    let claims = serde_json::json!({"sub": device.to_string(), "exp": exp});
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap_or_default()
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024)
}

async fn tcp_from(source: IpAddr, peer: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(peer).await
}

/// Opens one connection: for the gateway, until `welcome`; for MQTT, until SUBACK.
async fn open(target: &Target, i: usize, source: IpAddr) -> Result<Ws, String> {
    match target {
        Target::Gateway { addrs, secret } => {
            let addr = addrs[i % addrs.len()];
            let mut req = format!("ws://{addr}/v1/connect")
                .into_client_request()
                .map_err(|e| e.to_string())?;
            let t = token(secret, Uuid::new_v4());
            req.headers_mut().insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {t}")).map_err(|e| e.to_string())?,
            );
            let stream = tcp_from(source, addr).await.map_err(|e| e.to_string())?;
            let (mut ws, _) =
                tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config()))
                    .await
                    .map_err(|e| e.to_string())?;
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.as_str().contains("\"welcome\"") => Ok(ws),
                other => Err(format!("no welcome: {other:?}")),
            }
        }
        Target::Mqtt {
            addr,
            topic,
            client_prefix,
        } => {
            let mut req = format!("ws://{addr}/ws")
                .into_client_request()
                .map_err(|e| e.to_string())?;
            req.headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
            let stream = tcp_from(source, *addr).await.map_err(|e| e.to_string())?;
            let (mut ws, _) =
                tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config()))
                    .await
                    .map_err(|e| e.to_string())?;
            let id = format!("{client_prefix}-{i}");
            ws.send(Message::binary(mqtt::connect(&id, "guest", "guest", 0)))
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = Vec::new();
            expect(&mut ws, &mut buf, |p| matches!(p, mqtt::Packet::ConnAck(0))).await?;
            ws.send(Message::binary(mqtt::subscribe(1, topic)))
                .await
                .map_err(|e| e.to_string())?;
            expect(
                &mut ws,
                &mut buf,
                |p| matches!(p, mqtt::Packet::SubAck(1, q) if q.first() == Some(&0)),
            )
            .await?;
            Ok(ws)
        }
    }
}

/// Reads MQTT packets until one satisfies `want`.
async fn expect(
    ws: &mut Ws,
    buf: &mut Vec<u8>,
    want: impl Fn(&mqtt::Packet) -> bool,
) -> Result<(), String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                buf.extend_from_slice(&b);
                let packets = mqtt::read(buf).ok_or("not MQTT")?;
                if packets.iter().any(&want) {
                    return Ok(());
                }
                if let Some(p) = packets.first() {
                    return Err(format!("unexpected {p:?}"));
                }
            }
            Some(Ok(Message::Close(f))) => return Err(format!("closed: {f:?}")),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("connection ended".into()),
        }
    }
}

/// Holds the connection: notes the arrival of frames, answers ping rounds, closes
/// on `stop`.
async fn keep(
    mut ws: Ws,
    slot: usize,
    mqtt: bool,
    shared: Arc<Shared>,
    mut ping: watch::Receiver<u64>,
    stop: CancellationToken,
) {
    let mut buf = Vec::new();
    let mut awaiting_pong = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                break;
            }
            changed = ping.changed() => {
                if changed.is_err() { continue; }
                let msg = if mqtt { Message::binary(mqtt::pingreq()) } else { Message::Ping(Bytes::new()) };
                if ws.send(msg).await.is_err() { break; }
                awaiting_pong = true;
            }
            msg = ws.next() => {
                let arrived = match msg {
                    Some(Ok(Message::Text(_))) => true,
                    Some(Ok(Message::Binary(b))) if mqtt => {
                        buf.extend_from_slice(&b);
                        let packets = mqtt::read(&mut buf).unwrap_or_default();
                        if awaiting_pong && packets.contains(&mqtt::Packet::PingResp) {
                            awaiting_pong = false;
                            shared.pongs.fetch_add(1, Ordering::Relaxed);
                        }
                        packets.iter().any(|p| matches!(p, mqtt::Packet::Publish(..)))
                    }
                    Some(Ok(Message::Pong(_))) => {
                        if awaiting_pong {
                            awaiting_pong = false;
                            shared.pongs.fetch_add(1, Ordering::Relaxed);
                        }
                        false
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => false,
                };
                if arrived
                    && shared.arrivals[slot]
                        .compare_exchange(0, now_us(), Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    shared.arrived.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    shared.open.fetch_sub(1, Ordering::Relaxed);
}

async fn hold(
    job: HoldJob,
    mut commands: tokio::sync::mpsc::Receiver<Command>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let n = job.count;
    let shared = Arc::new(Shared {
        arrivals: (0..n).map(|_| AtomicU64::new(0)).collect(),
        arrived: AtomicUsize::new(0),
        pongs: AtomicUsize::new(0),
        open: AtomicUsize::new(0),
    });
    let (ping_tx, ping_rx) = watch::channel(0u64);
    let mqtt = matches!(job.target, Target::Mqtt { .. });
    let target = Arc::new(job.target);
    let limit = Arc::new(Semaphore::new(job.concurrency.max(1)));
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut connecting = FuturesUnordered::new();
    let mut tasks = Vec::with_capacity(n);
    let progress = tokio::spawn({
        let (done, failed) = (done.clone(), failed.clone());
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                emit(&Report::Progress {
                    done: done.load(Ordering::Relaxed),
                    failed: failed.load(Ordering::Relaxed),
                });
            }
        }
    });
    let mut times_us = Vec::with_capacity(n);
    let mut first_error = None;
    let mut spawned = 0usize;
    let mut slot = 0usize;
    while spawned < n || !connecting.is_empty() {
        tokio::select! {
            permit = limit.clone().acquire_owned(), if spawned < n => {
                let permit = permit?;
                let i = job.first_index + spawned;
                let source = job.sources[spawned % job.sources.len()];
                let target = target.clone();
                connecting.push(async move {
                    let r = tokio::time::timeout(CONNECT_TIMEOUT, open(&target, i, source)).await;
                    drop(permit);
                    match r {
                        Ok(r) => r,
                        Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
                    }
                });
                spawned += 1;
            }
            Some(r) = connecting.next() => match r {
                Ok(ws) => {
                    times_us.push(now_us());
                    done.fetch_add(1, Ordering::Relaxed);
                    shared.open.fetch_add(1, Ordering::Relaxed);
                    tasks.push(tokio::spawn(keep(ws, slot, mqtt, shared.clone(), ping_rx.clone(), stop.clone())));
                    slot += 1;
                }
                Err(e) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first_error.get_or_insert(e);
                }
            },
            _ = stop.cancelled() => break,
        }
    }
    progress.abort();
    let ok = times_us.len();
    emit(&Report::Connected {
        ok,
        failed: failed.load(Ordering::Relaxed),
        times_us,
        first_error,
    });
    loop {
        let command = tokio::select! {
            c = commands.recv() => c,
            _ = stop.cancelled() => None,
        };
        match command {
            None | Some(Command::Stop) => break,
            Some(Command::Arm) => {
                for a in &shared.arrivals {
                    a.store(0, Ordering::Relaxed);
                }
                shared.arrived.store(0, Ordering::Relaxed);
                emit(&Report::Armed);
            }
            Some(Command::Collect { timeout_ms }) => {
                let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
                while shared.arrived.load(Ordering::Relaxed) < ok
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let times: Vec<u64> = shared
                    .arrivals
                    .iter()
                    .map(|a| a.load(Ordering::Relaxed))
                    .filter(|t| *t > 0)
                    .collect();
                emit(&Report::Frames {
                    missing: ok - times.len(),
                    times_us: times,
                });
            }
            Some(Command::Ping { timeout_ms }) => {
                shared.pongs.store(0, Ordering::Relaxed);
                ping_tx.send_modify(|g| *g += 1);
                let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
                while shared.pongs.load(Ordering::Relaxed) < ok
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                emit(&Report::Alive {
                    alive: shared.pongs.load(Ordering::Relaxed),
                    open: shared.open.load(Ordering::Relaxed),
                });
            }
            Some(Command::Devices) => emit(&Report::Devices { ids: Vec::new() }),
        }
    }
    stop.cancel();
    let closing = futures_util::future::join_all(tasks);
    let _ = tokio::time::timeout(Duration::from_secs(20), closing).await;
    emit(&Report::Stopped);
    Ok(())
}

async fn simulate(
    job: SimulateJob,
    mut commands: tokio::sync::mpsc::Receiver<Command>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let signer = Arc::new(Signer::hmac(job.secret.as_bytes(), None)?);
    let stats = Arc::new(Stats::default());
    let mut ids = Vec::with_capacity(job.devices);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..job.devices {
        let device = Uuid::new_v4();
        ids.push(device);
        let cfg = DeviceConfig {
            url: format!("ws://{}/v1/connect", job.addrs[i % job.addrs.len()]),
            device,
            credentials: Credentials::Mint {
                signer: signer.clone(),
                spec: TokenSpec::new(device, Duration::from_secs(6 * 3600)),
            },
            in_band: false,
            events: EventPlan {
                name: "telemetry".into(),
                data: None,
                interval: job.interval_ms.map(Duration::from_millis),
                count: job.events_per_device,
                with_ids: true,
            },
            answer: Answer::Echo,
            capabilities: Default::default(),
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(5),
            max_in_flight: job.max_in_flight.max(1),
            output: Output::Quiet,
            source: Some(job.sources[i % job.sources.len()]),
        };
        // Spread the first connects over the ramp, so they do not all land at once.
        let delay = Duration::from_millis(job.ramp_ms).mul_f64(i as f64 / job.devices as f64);
        let (stats, stop) = (stats.clone(), stop.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return,
            }
            if device::run(cfg, stats.clone(), stop).await.is_err() {
                stats.stopped.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    emit(&Report::Devices { ids: ids.clone() });
    let snapshot = |stats: &Stats| Report::Stats {
        connected: stats.connected.load(Ordering::Relaxed),
        sent: stats.sent.load(Ordering::Relaxed),
        acked: stats.acked.load(Ordering::Relaxed),
        nacked: stats.nacked.load(Ordering::Relaxed),
        requests: stats.requests.load(Ordering::Relaxed),
        answered: stats.answered.load(Ordering::Relaxed),
        reconnects: stats.reconnects.load(Ordering::Relaxed),
        stopped: stats.stopped.load(Ordering::Relaxed),
        finished: false,
        at_us: now_us(),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => emit(&snapshot(&stats)),
            c = commands.recv() => match c {
                None | Some(Command::Stop) => break,
                Some(Command::Devices) => emit(&Report::Devices { ids: ids.clone() }),
                Some(_) => {}
            },
            joined = tasks.join_next() => if joined.is_none() { break },
            _ = stop.cancelled() => break,
        }
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let mut last = snapshot(&stats);
    if let Report::Stats { finished, .. } = &mut last {
        *finished = true;
    }
    emit(&last);
    emit(&Report::Stopped);
    Ok(())
}
