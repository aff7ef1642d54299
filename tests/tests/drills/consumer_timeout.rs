//! The relay against RabbitMQ's `consumer_timeout`, on a node of its own where the
//! timeout is 3 s (and checked every second): Hive fails for longer than that.
//!
//! - With `HIVE_HOLD_MAX_MS` below the timeout, device-service never holds a
//!   delivery long enough for the broker to take its channel: it parks the message
//!   in the retry queue (it expires back into the relay queue after `RETRY_MAX_MS`),
//!   its broker link is never lost, and the message reaches Hive once Hive recovers.
//! - The attempt count goes on across parks (`x-mosaic-parked-attempts`): on a second
//!   such replica, a message Hive always fails is dead-lettered after exactly
//!   `HIVE_MAX_ATTEMPTS` POSTs, though one holding never makes that many.
//! - The same with `HIVE_HOLD_MAX_MS` above the timeout: the broker closes the
//!   channel and the link is lost. This proves the first case's assertion can fail.
//!
//! The three replicas run at once, each in a vhost of its own on the one node.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use device_service::broker::{DEAD_LETTER_QUEUE, RELAY_QUEUE, RETRY_QUEUE};
use lapin::options::BasicGetOptions;
use mosaic_tests::binary::Running;
use mosaic_tests::broker::{CONSUMER_TIMEOUT_TICK, NodeConfig};
use mosaic_tests::hive::{Answer, HiveStandIn};
use mosaic_tests::{Broker, eventually, within};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{WAIT, link_count, start_relay};

/// The node's `consumer_timeout`.
const CONSUMER_TIMEOUT: Duration = Duration::from_secs(3);
/// `HIVE_MAX_ATTEMPTS` of the replica that proves the count is carried. One holding
/// of at most `HOLD_BELOW` makes at most 7 POSTs (delays of at least 50, 100, 200,
/// 250, 250... ms), so only a count carried across parks reaches it.
const MAX_ATTEMPTS: usize = 12;
/// `HIVE_HOLD_MAX_MS` below the timeout.
const HOLD_BELOW: &str = "1200";
/// `HIVE_HOLD_MAX_MS` above it.
const HOLD_ABOVE: &str = "20000";

fn relay_settings<'a>(hold: &'a str, max_attempts: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("HIVE_HOLD_MAX_MS", hold),
        ("RETRY_BASE_MS", "100"),
        ("RETRY_MAX_MS", "500"),
        ("HIVE_MAX_ATTEMPTS", max_attempts),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_hive_never_costs_the_relay_its_broker_link() {
    let started = Instant::now();
    let node = within(
        Duration::from_secs(120),
        "a RabbitMQ node with a 3 s consumer_timeout",
        tokio::task::spawn_blocking(|| {
            Broker::start_with(&NodeConfig::new().consumer_timeout(CONSUMER_TIMEOUT))
        }),
    )
    .await
    .unwrap()
    .expect("a private RabbitMQ");
    let node_up = started.elapsed();
    let parks = node.vhost("drill-parks").await;
    let carries = node.vhost("drill-carries").await;
    let holds = node.vhost("drill-holds").await;

    // Every Hive fails every message until `healthy`; "forever" always fails.
    let healthy = Arc::new(AtomicBool::new(false));
    let script = {
        let healthy = healthy.clone();
        move |c: &mosaic_tests::hive::Call<'_>| {
            if c.json["name"] == "forever" || !healthy.load(Ordering::Relaxed) {
                Answer::status(503)
            } else {
                Answer::status(200)
            }
        }
    };
    let hive_parks = HiveStandIn::start().await;
    let hive_carries = HiveStandIn::start().await;
    let hive_holds = HiveStandIn::start().await;
    for hive in [&hive_parks, &hive_carries, &hive_holds] {
        hive.script(script.clone());
    }
    let max = MAX_ATTEMPTS.to_string();
    let parking = start_relay(
        &parks.amqp_url,
        &hive_parks.url(),
        &relay_settings(HOLD_BELOW, "1000"),
    )
    .await;
    let carrying = start_relay(
        &carries.amqp_url,
        &hive_carries.url(),
        &relay_settings(HOLD_BELOW, &max),
    )
    .await;
    let holding = start_relay(
        &holds.amqp_url,
        &hive_holds.url(),
        &relay_settings(HOLD_ABOVE, "1000"),
    )
    .await;

    let (parks_conn, parks_ch) = mosaic_tests::amqp::connect(&parks.amqp_url).await;
    let (carries_conn, carries_ch) = mosaic_tests::amqp::connect(&carries.amqp_url).await;
    let (_holds_conn, holds_ch) = mosaic_tests::amqp::connect(&holds.amqp_url).await;
    let recovers = publish(&parks_ch, "recovers").await;
    let forever = publish(&carries_ch, "forever").await;
    let recovers_held = publish(&holds_ch, "recovers").await;
    let failing_since = Instant::now();

    // Hive stays down until the message has been failing for longer than the
    // timeout can take to act, and both replicas have shown their way of waiting.
    let acts_within = CONSUMER_TIMEOUT + CONSUMER_TIMEOUT_TICK + Duration::from_millis(500);
    eventually(
        WAIT,
        "a park, a lost link, and the timeout's worth of failing",
        || async {
            (failing_since.elapsed() > acts_within
                && parked(&parking).await >= 2
                && link_count(&holding, "device-service", "lost").await >= 1)
                .then_some(())
        },
    )
    .await;
    healthy.store(true, Ordering::Relaxed);
    let failed_for = failing_since.elapsed();

    for (hive, id) in [(&hive_parks, &recovers), (&hive_holds, &recovers_held)] {
        hive.wait_until(WAIT, "the message delivered once Hive recovered", |s| {
            s.iter()
                .any(|r| r.answered == 200 && r.header("idempotency-key") == Some(id))
        })
        .await;
    }
    // The one that always fails is dead-lettered after exactly MAX_ATTEMPTS POSTs,
    // counted across its parks.
    let dead = within(
        WAIT,
        "the exhausted message in the dead-letter queue",
        async {
            loop {
                let got = carries_ch
                    .basic_get(DEAD_LETTER_QUEUE.into(), BasicGetOptions { no_ack: true })
                    .await
                    .expect("basic.get");
                if let Some(m) = got {
                    let h = m.delivery.properties.headers().clone().unwrap_or_default();
                    return Value::Object(amqp_value_json::from_field_table(&h).unwrap());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await;
    let posts = |hive: &HiveStandIn, id: &str| {
        hive.requests()
            .iter()
            .filter(|r| r.header("idempotency-key") == Some(id))
            .count()
    };
    let lost = |service| link_count(service, "device-service", "lost");
    let (lost_parking, lost_carrying, lost_holding) = (
        lost(&parking).await,
        lost(&carrying).await,
        lost(&holding).await,
    );
    println!(
        "consumer_timeout {CONSUMER_TIMEOUT:?} (node up in {node_up:?}); Hive failed for \
         {failed_for:?}. HIVE_HOLD_MAX_MS {HOLD_BELOW}: {} parks, link lost {lost_parking} \
         times, the message delivered after {} POSTs; a message always failing \
         dead-lettered after {} POSTs and {} parks (HIVE_MAX_ATTEMPTS {MAX_ATTEMPTS}), link \
         lost {lost_carrying} times. HIVE_HOLD_MAX_MS {HOLD_ABOVE}: link lost \
         {lost_holding} times, the message delivered after {} POSTs; drill took {:?}",
        parked(&parking).await,
        posts(&hive_parks, &recovers),
        posts(&hive_carries, &forever),
        parked(&carrying).await,
        posts(&hive_holds, &recovers_held),
        started.elapsed()
    );
    for (service, lost) in [(&parking, lost_parking), (&carrying, lost_carrying)] {
        assert_eq!(lost, 0, "a parking replica lost its link");
        assert_eq!(link_count(service, "device-service", "connected").await, 1);
    }
    assert!(lost_holding >= 1, "the holding replica kept its link");
    assert_eq!(parked(&holding).await, 0);
    assert_eq!(dead["message_id"], forever.as_str());
    assert_eq!(dead["x-mosaic-reason"], "exhausted");
    assert_eq!(dead["x-mosaic-attempts"], json!(MAX_ATTEMPTS));
    assert_eq!(posts(&hive_carries, &forever), MAX_ATTEMPTS);
    assert!(
        parked(&carrying).await >= 2,
        "the count went on over several parks"
    );
    // Both settled (acked) and nothing left waiting anywhere.
    eventually(WAIT, "both messages settled", || async {
        (crate::finished(&parking, "delivered").await == 1
            && crate::finished(&carrying, "dead_lettered").await == 1)
            .then_some(())
    })
    .await;
    for conn in [&parks_conn, &carries_conn] {
        for queue in [RELAY_QUEUE, RETRY_QUEUE] {
            assert_eq!(crate::ready(conn, queue).await, 0, "{queue}");
        }
    }
    for service in [parking, carrying, holding] {
        service.terminate();
        service.assert_exits_cleanly().await;
    }
    tokio::task::spawn_blocking(move || drop(node))
        .await
        .unwrap();
}

/// `mosaic_device_deliveries_total{outcome="parked"}` of a replica.
async fn parked(service: &Running) -> u64 {
    service
        .metric("mosaic_device_deliveries_total{outcome=\"parked\"}")
        .await
        .unwrap_or(0.0) as u64
}

/// Publishes an event named `name` to `mosaic.events`; returns its message id.
async fn publish(ch: &lapin::Channel, name: &str) -> String {
    let device = Uuid::new_v4();
    let message_id = Uuid::now_v7().to_string();
    let headers = json!({
        "kind": "event", "message_id": message_id, "device": device.to_string(),
        "name": name, "session": Uuid::now_v7().to_string(), "gateway": "drill",
        "received_at": crate::now_rfc3339(),
    });
    crate::publish(
        ch,
        mosaic_protocol::exchange::EVENTS,
        &mosaic_protocol::exchange::event_key(device, name),
        headers,
        b"1",
    )
    .await;
    message_id
}
