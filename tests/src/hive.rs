//! A real HTTP server standing in for Hive: it records every request and answers
//! from a programmable script.
//!
//! ```no_run
//! # async fn demo() {
//! use mosaic_tests::hive::{Answer, HiveStandIn};
//! let hive = HiveStandIn::start().await;
//! // 500 for the first three calls, then 200.
//! hive.script(|call| if call.n < 3 { Answer::status(500) } else { Answer::status(200) });
//! // ... point HIVE_URL at hive.url() ...
//! let seen = hive.wait_for(4, std::time::Duration::from_secs(10)).await;
//! # }
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::Notify;

/// One request Hive received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// 0-based index among all requests.
    pub n: usize,
    /// Request headers.
    pub headers: HeaderMap,
    /// Request body, as received.
    pub body: Bytes,
    /// When it arrived.
    pub at: Instant,
    /// The status the stand-in answered (0 while it is still hanging).
    pub answered: u16,
    /// When it answered (`None` while it is still hanging).
    pub answered_at: Option<Instant>,
}

impl Recorded {
    /// The body parsed as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// A header as a string.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What the script sees of a call.
#[derive(Debug)]
pub struct Call<'a> {
    /// 0-based index among all requests.
    pub n: usize,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// Request body.
    pub body: &'a Bytes,
    /// The body as JSON (`Null` when it is not JSON).
    pub json: serde_json::Value,
}

/// How the stand-in answers a call.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status.
    pub status: u16,
    /// `Retry-After` value to send, if any.
    pub retry_after: Option<String>,
    /// Wait this long before answering (play a hanging Hive).
    pub delay: Duration,
}

impl Answer {
    /// Answer `status` at once.
    pub fn status(status: u16) -> Self {
        Answer {
            status,
            retry_after: None,
            delay: Duration::ZERO,
        }
    }

    /// Answer `status` with `Retry-After: <value>`.
    pub fn retry_after(status: u16, value: &str) -> Self {
        Answer {
            retry_after: Some(value.to_owned()),
            ..Answer::status(status)
        }
    }

    /// Hang for `delay`, then answer 200.
    pub fn hang(delay: Duration) -> Self {
        Answer {
            delay,
            ..Answer::status(200)
        }
    }
}

type Script = Arc<dyn Fn(&Call<'_>) -> Answer + Send + Sync>;

struct Inner {
    seen: Mutex<Vec<Recorded>>,
    script: Mutex<Script>,
    changed: Notify,
}

/// The Hive stand-in; stops when dropped.
pub struct HiveStandIn {
    addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for HiveStandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HiveStandIn")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl HiveStandIn {
    /// Starts on a free loopback port, answering 200 to everything.
    pub async fn start() -> Self {
        Self::start_at("127.0.0.1:0".parse().expect("an address")).await
    }

    /// Starts on `addr` (e.g. a port that was refusing connections until now).
    pub async fn start_at(addr: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        let inner = Arc::new(Inner {
            seen: Mutex::new(Vec::new()),
            script: Mutex::new(Arc::new(|_: &Call<'_>| Answer::status(200))),
            changed: Notify::new(),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        HiveStandIn { addr, inner, task }
    }

    /// The URL to configure as `HIVE_URL`.
    pub fn url(&self) -> String {
        format!("http://{}/hive/events", self.addr)
    }

    /// Replaces the script; calls already answered keep their answers.
    pub fn script(&self, f: impl Fn(&Call<'_>) -> Answer + Send + Sync + 'static) {
        *self.inner.script.lock().unwrap() = Arc::new(f);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.seen.lock().unwrap().clone()
    }

    /// The requests answered 2xx so far.
    pub fn delivered(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| (200..300).contains(&r.answered))
            .collect()
    }

    /// How many times each `Idempotency-Key` was answered 2xx so far (cheap enough to
    /// poll with thousands of requests recorded: no body is copied).
    pub fn delivered_keys(&self) -> HashMap<String, usize> {
        let seen = self.inner.seen.lock().unwrap();
        let mut keys = HashMap::new();
        for r in seen.iter().filter(|r| (200..300).contains(&r.answered)) {
            if let Some(k) = r.header("idempotency-key") {
                *keys.entry(k.to_owned()).or_insert(0) += 1;
            }
        }
        keys
    }

    /// Waits until at least `n` requests arrived (panics after `timeout`).
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        self.wait_until(timeout, &format!("{n} requests to Hive"), |seen| {
            seen.len() >= n
        })
        .await
    }

    /// Waits until `done` holds for the recorded requests (panics after `timeout`).
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&[Recorded]) -> bool,
    ) -> Vec<Recorded> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.changed.notified();
            {
                let seen = self.inner.seen.lock().unwrap();
                if done(&seen) {
                    return seen.clone();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let seen = self.requests();
                let statuses: Vec<u16> = seen.iter().map(|r| r.answered).collect();
                panic!(
                    "timed out after {timeout:?} waiting for {what}; answers so far: {statuses:?}"
                );
            }
        }
    }
}

impl Drop for HiveStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let script = inner.script.lock().unwrap().clone();
    let n = {
        let mut seen = inner.seen.lock().unwrap();
        let n = seen.len();
        seen.push(Recorded {
            n,
            headers: headers.clone(),
            body: body.clone(),
            at: Instant::now(),
            answered: 0,
            answered_at: None,
        });
        n
    };
    let answer = script(&Call {
        n,
        headers: &headers,
        body: &body,
        json,
    });
    if !answer.delay.is_zero() {
        inner.changed.notify_waiters();
        tokio::time::sleep(answer.delay).await;
    }
    {
        let mut seen = inner.seen.lock().unwrap();
        seen[n].answered = answer.status;
        seen[n].answered_at = Some(Instant::now());
    }
    inner.changed.notify_waiters();
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut res = (status, format!("stand-in answered {}", answer.status)).into_response();
    if let Some(ra) = answer
        .retry_after
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        res.headers_mut().insert("retry-after", ra);
    }
    res
}
