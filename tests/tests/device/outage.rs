//! Broker outage, metrics and shutdown.

use std::collections::HashSet;
use std::time::Duration;

use mosaic_tests::hive::{Answer, HiveStandIn};
use mosaic_tests::{FaultProxy, broker, eventually, within};
use serde_json::json;
use uuid::Uuid;

use crate::{Gateway, Service, channel, publish_event, queue_counts, wait_queue_empty};

const RELAY: &str = "mosaic.device-service.relay";

#[tokio::test]
async fn broker_outage_answers_503_at_once_and_everything_recovers() {
    let vhost = broker().vhost("outage").await;
    let proxy = FaultProxy::start(broker().amqp_addr()).await.unwrap();
    let via_proxy = vhost
        .amqp_url
        .replace(&broker().amqp_addr().to_string(), &proxy.addr().to_string());
    assert_ne!(via_proxy, vhost.amqp_url);
    let hive = HiveStandIn::start().await;
    let svc = Service::start(&via_proxy, &hive.url(), &[]).await;
    let device = Uuid::now_v7();
    let mut gw = Gateway::hold(&vhost.amqp_url, &[device], false).await;
    let events = format!("/v1/devices/{device}/events");
    assert_eq!(svc.post(&events, &json!({"name": "before"})).await.0, 202);
    let _ = gw.next().await;

    // A request waiting for its answer when the connection drops gets 503, not a 504
    // a minute later: its reply queue went with the connection.
    let svc = std::sync::Arc::new(svc);
    let waiting = tokio::spawn({
        let svc = svc.clone();
        let path = format!("/v1/devices/{device}/requests");
        async move {
            svc.post(&path, &json!({"name": "r", "timeout_ms": 60000}))
                .await
        }
    });
    let _ = gw.next().await;

    proxy.outage();
    let (status, answer) = within(
        Duration::from_secs(10),
        "the waiting request's answer",
        waiting,
    )
    .await
    .unwrap();
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "broker_unavailable");
    svc.wait_ready(false).await;
    for path in [
        events.clone(),
        format!("/v1/devices/{device}/requests"),
        "/v1/broadcast/events".into(),
    ] {
        let (status, answer) = within(
            Duration::from_secs(3),
            "an immediate 503",
            svc.post(&path, &json!({"name": "during", "timeout_ms": 60000})),
        )
        .await;
        assert_eq!(status, 503, "{path}: {answer}");
        assert_eq!(answer["error"]["code"], "broker_unavailable");
    }
    // Devices keep sending meanwhile: the messages wait in RabbitMQ.
    let (_conn, ch) = channel(&vhost.amqp_url).await;
    let mut want = HashSet::new();
    for i in 0..5 {
        want.insert(publish_event(&ch, Uuid::now_v7(), "during", json!({"i": i}), b"0").await);
    }

    proxy.restore();
    svc.wait_ready(true).await;
    hive.wait_until(
        Duration::from_secs(30),
        "the messages sent during the outage",
        |s| {
            let got: HashSet<String> = s
                .iter()
                .filter_map(|r| r.header("idempotency-key").map(str::to_owned))
                .collect();
            want.is_subset(&got)
        },
    )
    .await;
    let (status, answer) = svc.post(&events, &json!({"name": "after"})).await;
    assert_eq!(status, 202, "{answer}");
    wait_queue_empty(&vhost.name, RELAY).await;
    std::sync::Arc::into_inner(svc).unwrap().stop().await;
}

#[tokio::test]
async fn shutdown_finishes_in_flight_posts_and_hands_back_waiting_ones() {
    let vhost = broker().vhost("shutdown").await;
    let hive = HiveStandIn::start().await;
    hive.script(|c| {
        if c.json["name"] == "slow" {
            Answer::hang(Duration::from_millis(1500))
        } else {
            Answer::status(503)
        }
    });
    let svc = Service::start(
        &vhost.amqp_url,
        &hive.url(),
        &[("RETRY_BASE_MS", "60000"), ("RETRY_MAX_MS", "60000")],
    )
    .await;
    let (_conn, ch) = channel(&vhost.amqp_url).await;
    let slow = publish_event(&ch, Uuid::now_v7(), "slow", json!({}), b"0").await;
    let waiting = publish_event(&ch, Uuid::now_v7(), "waiting", json!({}), b"0").await;
    // The slow POST is in flight; the other failed once and waits a minute to retry.
    hive.wait_until(Duration::from_secs(30), "both messages at Hive", |s| {
        s.iter().any(|r| r.json()["name"] == "slow")
            && s.iter()
                .any(|r| r.json()["name"] == "waiting" && r.answered == 503)
    })
    .await;
    within(Duration::from_secs(20), "shutdown", svc.stop()).await;

    // The in-flight one finished and was acked; the waiting one is back in the queue.
    let seen = hive.requests();
    let slow_calls: Vec<_> = seen
        .iter()
        .filter(|r| r.header("idempotency-key") == Some(slow.as_str()))
        .collect();
    assert_eq!(slow_calls.len(), 1);
    assert_eq!(slow_calls[0].answered, 200);
    eventually(
        Duration::from_secs(30),
        "one message back in the relay queue",
        || async { (queue_counts(&vhost.name, RELAY).await? == (1, 0)).then_some(()) },
    )
    .await;
    let got = ch
        .basic_get(
            RELAY.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the handed-back message");
    let headers =
        amqp_value_json::from_field_table(got.properties.headers().as_ref().unwrap()).unwrap();
    assert_eq!(headers["message_id"], json!(waiting));
}

#[tokio::test]
async fn metrics_count_deliveries_attempts_and_requests() {
    let vhost = broker().vhost("metrics").await;
    let hive = HiveStandIn::start().await;
    hive.script(|c| {
        if c.n == 0 {
            Answer::status(500)
        } else {
            Answer::status(200)
        }
    });
    let svc = Service::start(&vhost.amqp_url, &hive.url(), &[]).await;
    let (_conn, ch) = channel(&vhost.amqp_url).await;
    publish_event(&ch, Uuid::now_v7(), "m", json!({}), b"0").await;
    hive.wait_until(Duration::from_secs(30), "a delivery", |s| {
        s.iter().any(|r| r.answered == 200)
    })
    .await;
    let _ = svc
        .post(
            &format!("/v1/devices/{}/events", Uuid::now_v7()),
            &json!({"name": "x"}),
        )
        .await;
    let text = eventually(Duration::from_secs(10), "the metrics", || async {
        let (status, text) = svc.get("/metrics").await;
        (status == 200 && text.contains("mosaic_device_deliveries_total{outcome=\"delivered\"}"))
            .then_some(text)
    })
    .await;
    for name in [
        "mosaic_device_delivery_attempts_total",
        "mosaic_device_hive_seconds_bucket",
        "mosaic_device_requests_total{endpoint=\"event\",outcome=\"device_not_connected\"}",
        "mosaic_device_request_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    svc.stop().await;
}

#[tokio::test]
async fn a_message_in_flight_when_its_replica_loses_the_broker_goes_to_another() {
    let vhost = broker().vhost("outage-redeliver").await;
    let proxy = FaultProxy::start(broker().amqp_addr()).await.unwrap();
    let via_proxy = vhost
        .amqp_url
        .replace(&broker().amqp_addr().to_string(), &proxy.addr().to_string());
    let hive_a = HiveStandIn::start().await;
    hive_a.script(|_| Answer::hang(Duration::from_secs(2)));
    let hive_b = HiveStandIn::start().await;
    let a = Service::start(&via_proxy, &hive_a.url(), &[]).await;
    let (_conn, ch) = channel(&vhost.amqp_url).await;
    let id = publish_event(&ch, Uuid::now_v7(), "in-flight", json!({"k": 1}), b"7").await;
    hive_a.wait_for(1, Duration::from_secs(30)).await;

    // Replica A loses the broker while its POST is in flight; B is running.
    let b = Service::start(&vhost.amqp_url, &hive_b.url(), &[]).await;
    proxy.outage();
    let seen = hive_b
        .wait_until(Duration::from_secs(30), "the redelivery at B", |s| {
            s.iter().any(|r| r.answered == 200)
        })
        .await;
    assert_eq!(seen[0].header("idempotency-key"), Some(id.as_str()));
    assert_eq!(seen[0].json()["k"], 1);
    wait_queue_empty(&vhost.name, RELAY).await;
    a.stop().await;
    b.stop().await;
}

/// A resource alarm: RabbitMQ blocks publishing connections. device-service turns not
/// ready and answers 503 `broker_unavailable` at once instead of waiting for confirms
/// that cannot come, then serves again by itself when the alarm clears. On a node of
/// its own: an alarm blocks every publisher of a node, and other tests share theirs.
#[tokio::test]
async fn a_broker_alarm_answers_503_until_it_clears() {
    let node = within(
        Duration::from_secs(120),
        "a private RabbitMQ",
        tokio::task::spawn_blocking(mosaic_tests::Broker::start),
    )
    .await
    .unwrap()
    .expect("a private RabbitMQ");
    let node = std::sync::Arc::new(node);
    let ctl = |args: &'static [&'static str]| {
        let node = node.clone();
        within(
            Duration::from_secs(60),
            "rabbitmqctl",
            tokio::task::spawn_blocking(move || node.ctl(args)),
        )
    };
    let vhost = node.vhost("alarm").await;
    let hive = HiveStandIn::start().await;
    let svc = Service::start(&vhost.amqp_url, &hive.url(), &[]).await;
    let device = Uuid::now_v7();
    let mut gw = Gateway::hold(&vhost.amqp_url, &[device], false).await;
    let events = format!("/v1/devices/{device}/events");
    assert_eq!(svc.post(&events, &json!({"name": "before"})).await.0, 202);
    assert_eq!(gw.next().await.0["name"], "before");

    // Every byte is over a 1 MB watermark: the memory alarm goes off at once.
    ctl(&["set_vm_memory_high_watermark", "absolute", "1MB"])
        .await
        .unwrap()
        .expect("raising the alarm");
    // RabbitMQ tells a connection it is blocked when that connection publishes, so
    // the first event after the alarm may still be taken, or may find no confirm.
    let (status, answer) = svc.post(&events, &json!({"name": "first"})).await;
    assert!(status == 202 || status == 503, "{status}: {answer}");
    svc.wait_ready(false).await;
    let (status, answer) = within(
        Duration::from_secs(3),
        "an immediate 503",
        svc.post(&events, &json!({"name": "blocked"})),
    )
    .await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "broker_unavailable");

    ctl(&["set_vm_memory_high_watermark", "0.4"])
        .await
        .unwrap()
        .expect("clearing the alarm");
    svc.wait_ready(true).await;
    assert_eq!(svc.post(&events, &json!({"name": "after"})).await.0, 202);
    // The device gets it (after "first", if that one was taken).
    let mut names = Vec::new();
    while names.last().is_none_or(|n| n != "after") {
        names.push(gw.next().await.0["name"].as_str().unwrap_or("").to_owned());
        assert!(names.len() <= 2, "unexpected commands: {names:?}");
    }
    assert!(!names.iter().any(|n| n == "blocked"), "{names:?}");
    svc.stop().await;
}
