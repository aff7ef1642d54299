//! The registry's REST API under load: `C` clients, each sending its next request
//! as soon as the previous one is answered, until a count or a time is reached.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use crate::stack::API_TOKEN;

/// Bound on one request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// What one phase measured.
#[derive(Debug, Clone, Default)]
pub struct Phase {
    /// Requests answered with the expected status.
    pub ok: usize,
    /// The others (another status, or no answer).
    pub failed: usize,
    /// What the first failure was.
    pub first_error: Option<String>,
    /// From the first request to the last answer.
    pub seconds: f64,
    /// Every request's latency, ms, sorted.
    pub latencies_ms: Vec<f64>,
    /// The devices created (creates only), in no particular order.
    pub ids: Vec<Uuid>,
}

impl Phase {
    /// Successful requests per second.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.seconds.max(1e-9)
    }
}

fn client(clients: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .timeout(REQUEST_TIMEOUT)
        .build()?)
}

/// One request's outcome: its latency, and the device it created or an error.
type Outcome = (f64, Result<Option<Uuid>, String>);

/// Runs `clients` loops of `one(i)` (`i` counts requests over all clients) until
/// `max` requests were sent or `limit` passed.
async fn drive<F, Fut>(clients: usize, max: usize, limit: Duration, one: F) -> Phase
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Outcome>,
{
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + limit;
    let worker = |_| {
        let next = next.clone();
        let one = &one;
        async move {
            let mut got: Vec<Outcome> = Vec::new();
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= max {
                    break;
                }
                got.push(one(i).await);
            }
            got
        }
    };
    let results = futures_util::future::join_all((0..clients.max(1)).map(worker)).await;
    let seconds = started.elapsed().as_secs_f64();
    let mut phase = Phase {
        seconds,
        ..Phase::default()
    };
    for (ms, r) in results.into_iter().flatten() {
        phase.latencies_ms.push(ms);
        match r {
            Ok(id) => {
                phase.ok += 1;
                phase.ids.extend(id);
            }
            Err(e) => {
                phase.failed += 1;
                phase.first_error.get_or_insert(e);
            }
        }
    }
    phase.latencies_ms.sort_by(f64::total_cmp);
    phase
}

/// Sends `request`; `Ok` when the answer has status `expect` (its body read whole,
/// so the connection is reused).
async fn call(request: reqwest::RequestBuilder, expect: u16) -> (f64, Result<(), String>) {
    let t = Instant::now();
    let r = match request.send().await {
        Ok(r) if r.status().as_u16() == expect => {
            r.bytes().await.map(|_| ()).map_err(|e| e.to_string())
        }
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            Err(format!(
                "{status}: {}",
                body.chars().take(200).collect::<String>()
            ))
        }
        Err(e) => Err(e.to_string()),
    };
    (t.elapsed().as_secs_f64() * 1e3, r)
}

/// `POST /v1/devices` with distinct bodies (an id, a name, an `external_id` unique
/// to this run, a type, a group, an attribute), expecting 201.
pub async fn creates(
    api: SocketAddr,
    clients: usize,
    max: usize,
    limit: Duration,
) -> anyhow::Result<Phase> {
    let http = client(clients)?;
    let url = format!("http://{api}/v1/devices");
    let run = Uuid::new_v4().simple().to_string();
    let run = &run[..8];
    Ok(drive(clients, max, limit, |i| {
        let id = Uuid::new_v4();
        let body = json!({
            "id": id,
            "name": format!("bench device {i}"),
            "external_id": format!("BENCH-{run}-{i:07}"),
            "type": "bench",
            "groups": ["bench"],
            "attributes": {"site": "loopback", "index": i},
        });
        let req = http.post(&url).bearer_auth(API_TOKEN).json(&body);
        async move {
            let (ms, r) = call(req, 201).await;
            (ms, r.map(|()| Some(id)))
        }
    })
    .await)
}

/// `GET /v1/devices/{id}` of `ids` in turn, expecting 200.
pub async fn reads(
    api: SocketAddr,
    clients: usize,
    max: usize,
    limit: Duration,
    ids: &[Uuid],
) -> anyhow::Result<Phase> {
    anyhow::ensure!(!ids.is_empty(), "no device to read");
    let http = client(clients)?;
    Ok(drive(clients, max, limit, |i| {
        let url = format!("http://{api}/v1/devices/{}", ids[i % ids.len()]);
        let req = http.get(url).bearer_auth(API_TOKEN);
        async move {
            let (ms, r) = call(req, 200).await;
            (ms, r.map(|()| None))
        }
    })
    .await)
}
