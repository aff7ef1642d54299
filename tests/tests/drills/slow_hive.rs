//! Drill: Hive answers every POST in 5 s, with 500 such deliveries queued and 50 that
//! Hive answers at once among them. Deliveries proceed `HIVE_CONCURRENCY` at a time
//! (never more), so the queue drains in two rounds of 5 s, not in 500 of them; a
//! message Hive answers at once waits only for the slots the slow ones hold, never
//! behind them; and device-service's memory stays bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use device_service::broker::RELAY_QUEUE;
use mosaic_tests::broker;
use mosaic_tests::hive::{Answer, HiveStandIn, Recorded};
use serde_json::json;
use uuid::Uuid;

use crate::start_relay;

/// Deliveries Hive answers in [`SLOW`].
const SLOW_MESSAGES: usize = 500;
/// One message in this many is answered at once (50 of 550).
const FAST_EVERY: usize = 11;
/// How long Hive takes with a slow one.
const SLOW: Duration = Duration::from_secs(5);
/// `HIVE_CONCURRENCY`: two rounds of [`SLOW`] for [`SLOW_MESSAGES`].
const CONCURRENCY: usize = 250;
/// The bound on device-service's resident memory during the drill: its memory
/// request in the Kubernetes base (k8s/base/device-service.yaml), half its limit.
/// A replica busy with `HIVE_CONCURRENCY` slow POSTs must fit what the scheduler
/// reserves for it. It holds at most `HIVE_CONCURRENCY` deliveries (the prefetch),
/// each a task, a message of a few hundred bytes and an HTTP connection (a few KiB of
/// buffers): about 5 MiB at 250 over the idle process. Measured (debug build): see
/// docs/drills.md.
const RSS_BOUND: u64 = 128 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_hive_costs_slots_not_the_queue() {
    let started = Instant::now();
    let vhost = broker().vhost("drill-slow-hive").await;
    let hive = HiveStandIn::start().await;
    hive.script(|c| {
        if c.json["name"] == "fast" {
            Answer::status(200)
        } else {
            Answer::hang(SLOW)
        }
    });

    // The queue exists and is full before device-service starts: declared as
    // device-service declares it, then filled.
    let (conn, ch) = mosaic_tests::amqp::connect(&vhost.amqp_url).await;
    device_service::broker::declare(
        ch.clone(),
        "drill-slow-hive-replies".into(),
        "drill-slow-hive-fleet".into(),
    )
    .await
    .expect("device-service's topology");
    let total = SLOW_MESSAGES + SLOW_MESSAGES / (FAST_EVERY - 1);
    // For each fast message, how many slow ones are ahead of it in the queue.
    let mut slow_ahead = std::collections::HashMap::new();
    let mut slow_so_far = 0;
    for i in 0..total {
        let fast = i % FAST_EVERY == FAST_EVERY - 1;
        let id = Uuid::now_v7().to_string();
        let name = if fast { "fast" } else { "slow" };
        let headers = json!({
            "kind": "event", "message_id": id, "device": Uuid::new_v4().to_string(),
            "name": name, "session": Uuid::now_v7().to_string(), "gateway": "drill",
            "received_at": crate::now_rfc3339(),
        });
        crate::publish(&ch, "", RELAY_QUEUE, headers, b"{\"reading\":1}").await;
        if fast {
            slow_ahead.insert(id, slow_so_far);
        } else {
            slow_so_far += 1;
        }
    }
    assert_eq!(slow_so_far, SLOW_MESSAGES);

    // The same binary idle, for scale.
    let idle_vhost = broker().vhost("drill-slow-hive-idle").await;
    let idle = start_relay(&idle_vhost.amqp_url, &hive.url(), &[]).await;
    let idle_rss = idle.rss_bytes().expect("device-service runs");
    idle.terminate();
    idle.assert_exits_cleanly().await;

    let concurrency = CONCURRENCY.to_string();
    let relay = start_relay(
        &vhost.amqp_url,
        &hive.url(),
        &[
            ("HIVE_CONCURRENCY", &concurrency),
            ("HIVE_TIMEOUT_MS", "30000"),
        ],
    )
    .await;
    let relay = Arc::new(relay);
    let sampling = Arc::new(AtomicBool::new(true));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn({
        let (relay, sampling, peak) = (relay.clone(), sampling.clone(), peak.clone());
        async move {
            while sampling.load(Ordering::Relaxed) {
                if let Some(rss) = relay.rss_bytes() {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let seen = hive
        .wait_until(Duration::from_secs(60), "every delivery answered", |s| {
            s.iter().filter(|r| r.answered == 200).count() >= total
        })
        .await;
    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();
    let peak = peak.load(Ordering::Relaxed);
    let after = relay.rss_bytes().expect("device-service runs");

    let t0 = seen.iter().map(|r| r.at).min().unwrap();
    let end = seen.iter().filter_map(|r| r.answered_at).max().unwrap();
    let drained = end - t0;
    let in_flight = max_in_flight(&seen);
    let mut fast_waits = Vec::new();
    let slow_answers: Vec<Instant> = seen
        .iter()
        .filter(|r| r.json()["name"] == "slow")
        .filter_map(|r| r.answered_at)
        .collect();
    for r in seen.iter().filter(|r| r.json()["name"] == "fast") {
        let key = r.header("idempotency-key").unwrap();
        let ahead = slow_ahead[key];
        let waited = r.at - t0;
        // Judged by what happened before it, not by the clock (the machine may be
        // busy): only whole rounds of slow ones ahead of it may have finished before
        // it reached Hive; none while fewer than CONCURRENCY slow ones are ahead.
        let finished_before = slow_answers.iter().filter(|a| **a < r.at).count();
        let allowed = (ahead / CONCURRENCY) * CONCURRENCY;
        assert!(
            finished_before <= allowed,
            "a fast message behind {ahead} slow ones reached Hive after {finished_before} \
             slow ones were answered (at most {allowed}), {waited:?} after the first POST"
        );
        fast_waits.push((ahead, waited));
    }
    let first_round_fast = fast_waits
        .iter()
        .filter(|(a, _)| *a < CONCURRENCY)
        .map(|(_, w)| *w)
        .max()
        .unwrap();
    println!(
        "slow Hive: {total} deliveries ({SLOW_MESSAGES} answered in {SLOW:?}, {} at once), \
         HIVE_CONCURRENCY {CONCURRENCY}: drained in {drained:?} (serially: {:?}); at most \
         {in_flight} POSTs at once; the fast ones with fewer than {CONCURRENCY} slow ones \
         ahead reached Hive within {first_round_fast:?}; device-service RSS {} MiB idle, \
         peak {} MiB, {} MiB after (bound {} MiB); drill took {:?}",
        total - SLOW_MESSAGES,
        SLOW * SLOW_MESSAGES as u32,
        idle_rss / (1 << 20),
        peak / (1 << 20),
        after / (1 << 20),
        RSS_BOUND / (1 << 20),
        started.elapsed()
    );
    assert_eq!(seen.len(), total, "one POST per message");
    // Every slot used, never more: the slow ones are delivered CONCURRENCY at a time.
    assert_eq!(in_flight, CONCURRENCY, "POSTs at once");
    assert!(peak < RSS_BOUND, "RSS peak {peak} bytes");
    mosaic_tests::eventually(crate::WAIT, "every delivery acked", || async {
        (crate::finished(&relay, "delivered").await == total as u64).then_some(())
    })
    .await;
    assert_eq!(crate::ready(&conn, RELAY_QUEUE).await, 0);
    let _ = conn.close(200, "".into()).await;
    let relay = Arc::into_inner(relay).expect("the sampler is done");
    relay.terminate();
    relay.assert_exits_cleanly().await;
}

/// The most requests Hive was holding at one instant.
fn max_in_flight(seen: &[Recorded]) -> usize {
    let mut edges: Vec<(Instant, i64)> = Vec::new();
    for r in seen {
        edges.push((r.at, 1));
        edges.push((r.answered_at.expect("answered"), -1));
    }
    // At equal instants, an answer frees its slot before the next request takes it.
    edges.sort_by_key(|&(t, d)| (t, d));
    let (mut now, mut max) = (0i64, 0i64);
    for (_, d) in edges {
        now += d;
        max = max.max(now);
    }
    max as usize
}
