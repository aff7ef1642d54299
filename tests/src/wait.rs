//! Bounded waits: every wait in a test ends, with a message saying what never happened.

use std::future::Future;
use std::time::Duration;

/// Awaits `fut` for at most `timeout`, panicking with `what` when it takes longer.
pub async fn within<T>(timeout: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(timeout, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `timeout`;
/// panics with `what` when it never does.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `GET http://<addr>/readyz` until it answers 200 (`ready`) or 503 (not
/// ready), for at most `timeout`; panics when it never does.
pub async fn readiness(addr: std::net::SocketAddr, ready: bool, timeout: Duration) {
    let want = if ready { 200 } else { 503 };
    let url = format!("http://{addr}/readyz");
    let http = reqwest::Client::new();
    eventually(timeout, &format!("{url} to answer {want}"), || async {
        let res = http
            .get(&url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        (res.status().as_u16() == want).then_some(())
    })
    .await;
}
