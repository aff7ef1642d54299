//! The relay to Hive: lossless body, idempotency key, signature, ack after 2xx,
//! retries, dead-letter, concurrency, timeouts.

use std::collections::HashSet;
use std::time::Duration;

use hmac::{Hmac, Mac};
use lapin::options::BasicGetOptions;
use mosaic_tests::broker;
use mosaic_tests::hive::{Answer, HiveStandIn};
use serde_json::{Value, json};
use sha2::Sha256;
use uuid::Uuid;

use crate::{Service, channel, publish_event, publish_raw, wait_queue_empty};

const RELAY: &str = "mosaic.device-service.relay";
const DLQ: &str = "mosaic.device-service.dead-letter";
const SECRET: &str = "hive-signing-secret-0123456789";

fn ids(seen: &[mosaic_tests::hive::Recorded]) -> HashSet<String> {
    seen.iter()
        .filter(|r| (200..300).contains(&r.answered))
        .filter_map(|r| r.header("idempotency-key").map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn body_is_lossless_keyed_and_signed_and_acked_after_2xx() {
    let vhost = broker().vhost("relay-lossless").await;
    let hive = HiveStandIn::start().await;
    let svc = Service::start(
        &vhost.amqp_url,
        &hive.url(),
        &[("HIVE_SIGNING_SECRET", SECRET)],
    )
    .await;
    let (_conn, ch) = channel(&vhost.amqp_url).await;
    let device = Uuid::now_v7();

    let extra = json!({
        "unit": "°C",
        "meta": {"tags": ["a", {"deep": [null, true, false]}], "big": 18446744073709551615u64,
                 "neg": -9223372036854775808i64, "float": 1.2345678901234567, "tiny": 1e-300},
        "empty": {}, "list": [], "nothing": null
    });
    let data = br#"{"z":1,"a":[1.5,"x",{"k":null}],"long":123456789012345678901234567890}"#;
    let message_id = publish_event(&ch, device, "temperature", extra.clone(), data).await;

    let seen = hive.wait_for(1, Duration::from_secs(30)).await;
    let r = &seen[0];
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("idempotency-key"), Some(message_id.as_str()));

    // The object: the gateway's fields, the device's extra fields, data byte for byte.
    let body = r.json();
    assert_eq!(body["kind"], "event");
    assert_eq!(body["message_id"], json!(message_id));
    assert_eq!(body["device"], json!(device.to_string()));
    assert_eq!(body["name"], "temperature");
    assert_eq!(body["gateway"], "gw-test");
    for (k, v) in extra.as_object().unwrap() {
        assert_eq!(&body[k], v, "extra field {k}");
    }
    let text = std::str::from_utf8(&r.body).unwrap();
    assert!(
        text.ends_with(&format!(
            r#""data":{}}}"#,
            std::str::from_utf8(data).unwrap()
        )),
        "data not kept byte for byte: {text}"
    );
    assert!(
        text.starts_with(r#"{"kind":"event","message_id":"#),
        "{text}"
    );
    let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(keys.last().unwrap().as_str(), "data");

    // Signature: t=<unix>,v1=hex(HMAC-SHA256(secret, "<t>.<body>")).
    let sig = r.header("x-mosaic-signature").expect("signature header");
    let (t, v1) = sig
        .strip_prefix("t=")
        .and_then(|s| s.split_once(",v1="))
        .expect("t=..,v1=..");
    let t: u64 = t.parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(t.abs_diff(now) < 600, "timestamp {t} vs now {now}");
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&r.body);
    assert_eq!(v1, hex::encode(mac.finalize().into_bytes()));

    // A lifecycle message goes the same way.
    let mut headers = serde_json::Map::new();
    for (k, v) in [
        ("kind", json!("lifecycle")),
        ("message_id", json!(Uuid::now_v7().to_string())),
        ("device", json!(device.to_string())),
        ("name", json!("disconnected")),
        ("reason", json!("closed_by_device")),
        ("duration_ms", json!(1234)),
    ] {
        headers.insert(k.into(), v);
    }
    let key = format!("lifecycle.{device}.disconnected");
    publish_raw(&ch, "mosaic.events", &key, &headers, b"null").await;
    let seen = hive.wait_for(2, Duration::from_secs(30)).await;
    let body = seen[1].json();
    assert_eq!(body["kind"], "lifecycle");
    assert_eq!(body["reason"], "closed_by_device");
    assert_eq!(body["duration_ms"], 1234);
    assert_eq!(body["data"], Value::Null);

    // Acked after the 2xx: nothing left in the queue, and no second POST.
    wait_queue_empty(&vhost.name, RELAY).await;
    assert_eq!(hive.requests().len(), 2);
    svc.stop().await;
}

#[tokio::test]
async fn hive_failing_for_a_while_then_recovering_loses_nothing() {
    let vhost = broker().vhost("relay-recover").await;
    let hive = HiveStandIn::start().await;
    // 500, 503 with Retry-After, 429 and 408 for the first 25 calls, then 200.
    hive.script(|c| match c.n {
        n if n < 25 => match n % 4 {
            0 => Answer::status(500),
            1 => Answer::retry_after(503, "0"),
            2 => Answer::status(429),
            _ => Answer::status(408),
        },
        _ => Answer::status(200),
    });
    let svc = Service::start(&vhost.amqp_url, &hive.url(), &[("HIVE_CONCURRENCY", "4")]).await;
    let (_conn, ch) = channel(&vhost.amqp_url).await;
    let mut want = HashSet::new();
    for i in 0..10 {
        want.insert(publish_event(&ch, Uuid::now_v7(), "n", json!({"i": i}), b"1").await);
    }
    let seen = hive
        .wait_until(Duration::from_secs(60), "all 10 delivered", |s| {
            ids(s) == want
        })
        .await;
    assert!(
        seen.len() >= 35,
        "the failures were retried: {} calls",
        seen.len()
    );
    wait_queue_empty(&vhost.name, RELAY).await;
    wait_queue_empty(&vhost.name, DLQ).await;
    svc.stop().await;
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let vhost = broker().vhost("relay-retry-after").await;
    let hive = HiveStandIn::start().await;
    hive.script(|c| {
        if c.n == 0 {
            Answer::retry_after(429, "2")
        } else {
            Answer::status(200)
        }
    });
    let svc = Service::start(&vhost.amqp_url, &hive.url(), &[]).await;
    let (_conn, ch) = channel(&vhost.amqp_url).await;
    publish_event(&ch, Uuid::now_v7(), "n", json!({}), b"1").await;
    let seen = hive.wait_for(2, Duration::from_secs(30)).await;
    // Without Retry-After the retry would come after RETRY_BASE_MS (20 ms).
    let gap = seen[1].at.duration_since(seen[0].at);
    assert!(gap >= Duration::from_millis(1900), "retried after {gap:?}");
    svc.stop().await;
}

#[tokio::test]
async fn a_refused_message_is_dead_lettered_while_others_flow() {
    let vhost = broker().vhost("relay-dead-letter").await;
    let hive = HiveStandIn::start().await;
    hive.script(|c| {
        if c.json["name"] == "poison" {
            Answer::status(400)
        } else {
            Answer::status(200)
        }
    });
    let svc = Service::start(&vhost.amqp_url, &hive.url(), &[]).await;
    let (_conn, ch) = channel(&vhost.amqp_url).await;
    let poison = publish_event(
        &ch,
        Uuid::now_v7(),
        "poison",
        json!({"nested": {"a": [1]}}),
        b"{\"x\":1}",
    )
    .await;
    let mut want = HashSet::new();
    for i in 0..5 {
        want.insert(publish_event(&ch, Uuid::now_v7(), "fine", json!({"i": i}), b"2").await);
    }
    hive.wait_until(Duration::from_secs(30), "the 5 good ones", |s| {
        ids(s) == want
    })
    .await;
    wait_queue_empty(&vhost.name, RELAY).await;

    // The poison message is in the dead-letter queue with the reason, status,
    // attempts and its original headers and body.
    let got = mosaic_tests::eventually(Duration::from_secs(10), "the dead letter", || async {
        ch.basic_get(DLQ.into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
    })
    .await;
    let headers =
        amqp_value_json::from_field_table(got.properties.headers().as_ref().unwrap()).unwrap();
    assert_eq!(headers["x-mosaic-reason"], "rejected");
    assert_eq!(headers["x-mosaic-status"], 400);
    assert_eq!(headers["x-mosaic-attempts"], 1);
    assert!(
        headers["x-mosaic-last-error"]
            .as_str()
            .unwrap()
            .contains("400")
    );
    assert_eq!(headers["message_id"], json!(poison));
    assert_eq!(headers["nested"], json!({"a": [1]}));
    assert_eq!(got.delivery.data, b"{\"x\":1}");
    assert_eq!(
        hive.requests()
            .iter()
            .filter(|r| r.json()["name"] == "poison")
            .count(),
        1
    );

    // Replay: publish it back to the relay queue as it is; Hive now takes it, and the
    // x-mosaic-* headers do not reach Hive.
    hive.script(|_| Answer::status(200));
    let before = hive.requests().len();
    let mut replay = headers.clone();
    replay.insert("x-delivery-count".into(), json!(3));
    publish_raw(&ch, "", RELAY, &replay, &got.delivery.data).await;
    got.delivery
        .acker
        .ack(lapin::options::BasicAckOptions::default())
        .await
        .unwrap();
    let seen = hive.wait_for(before + 1, Duration::from_secs(30)).await;
    let body = seen[before].json();
    assert_eq!(body["message_id"], json!(poison));
    assert_eq!(body["nested"], json!({"a": [1]}));
    assert!(
        body.as_object()
            .unwrap()
            .keys()
            .all(|k| !k.starts_with("x-")),
        "{body}"
    );
    svc.stop().await;
}

#[tokio::test]
async fn a_message_failing_forever_does_not_block_the_ones_behind_it() {
    let vhost = broker().vhost("relay-stuck").await;
    let hive = HiveStandIn::start().await;
    hive.script(|c| {
        if c.json["name"] == "stuck" {
            Answer::status(502)
        } else {
            Answer::status(200)
        }
    });
    let svc = Service::start(
        &vhost.amqp_url,
        &hive.url(),
        &[("HIVE_MAX_ATTEMPTS", "100000"), ("HIVE_CONCURRENCY", "4")],
    )
    .await;
    let (_conn, ch) = channel(&vhost.amqp_url).await;
    let stuck = publish_event(&ch, Uuid::now_v7(), "stuck", json!({}), b"0").await;
    let mut want = HashSet::new();
    for i in 0..20 {
        want.insert(publish_event(&ch, Uuid::now_v7(), "fine", json!({"i": i}), b"1").await);
    }
    let seen = hive
        .wait_until(Duration::from_secs(30), "the 20 behind it", |s| {
            ids(s) == want
        })
        .await;
    assert!(
        seen.iter()
            .any(|r| r.header("idempotency-key") == Some(stuck.as_str()))
    );
    // The stuck one is still being retried, neither delivered nor given up.
    let calls = |s: &[mosaic_tests::hive::Recorded]| {
        s.iter()
            .filter(|r| r.header("idempotency-key") == Some(stuck.as_str()))
            .count()
    };
    let before = calls(&seen);
    hive.wait_until(
        Duration::from_secs(30),
        "more retries of the stuck one",
        |s| calls(s) >= before + 2,
    )
    .await;
    assert!(!ids(&hive.requests()).contains(&stuck));
    let dead = ch
        .basic_get(DLQ.into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap();
    assert!(dead.is_none(), "the stuck message was dead-lettered");
    svc.stop().await;
}

#[tokio::test]
async fn a_message_that_exhausts_its_attempts_is_dead_lettered() {
    let vhost = broker().vhost("relay-exhausted").await;
    let hive = HiveStandIn::start().await;
    hive.script(|_| Answer::status(502));
    let svc = Service::start(&vhost.amqp_url, &hive.url(), &[("HIVE_MAX_ATTEMPTS", "3")]).await;
    let (_conn, ch) = channel(&vhost.amqp_url).await;
    let stuck = publish_event(
        &ch,
        Uuid::now_v7(),
        "stuck",
        json!({"a": [1, {"b": null}]}),
        b"0",
    )
    .await;
    let got =
        mosaic_tests::eventually(Duration::from_secs(30), "the exhausted message", || async {
            ch.basic_get(DLQ.into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
        })
        .await;
    let headers =
        amqp_value_json::from_field_table(got.properties.headers().as_ref().unwrap()).unwrap();
    assert_eq!(headers["x-mosaic-reason"], "exhausted");
    assert_eq!(headers["x-mosaic-status"], 502);
    assert_eq!(headers["x-mosaic-attempts"], 3);
    assert_eq!(headers["message_id"], json!(stuck));
    assert_eq!(headers["a"], json!([1, {"b": null}]));
    assert_eq!(hive.requests().len(), 3);
    wait_queue_empty(&vhost.name, RELAY).await;
    svc.stop().await;
}

#[tokio::test]
async fn hive_hanging_past_the_timeout_is_retried_and_many_posts_run_at_once() {
    let vhost = broker().vhost("relay-hang").await;
    let hive = HiveStandIn::start().await;
    // The first call hangs far past HIVE_TIMEOUT_MS; the next 16 hang a little, so
    // they are seen in flight together; then everything is quick.
    hive.script(|c| match c.n {
        0 => Answer::hang(Duration::from_secs(30)),
        1..=16 => Answer::hang(Duration::from_millis(2500)),
        _ => Answer::status(200),
    });
    let svc = Service::start(
        &vhost.amqp_url,
        &hive.url(),
        &[("HIVE_TIMEOUT_MS", "4000"), ("HIVE_CONCURRENCY", "32")],
    )
    .await;
    let (_conn, ch) = channel(&vhost.amqp_url).await;
    let first = publish_event(&ch, Uuid::now_v7(), "first", json!({}), b"0").await;
    hive.wait_for(1, Duration::from_secs(30)).await;
    let mut want = HashSet::from([first.clone()]);
    for i in 0..40 {
        want.insert(publish_event(&ch, Uuid::now_v7(), "n", json!({"i": i}), b"1").await);
    }
    // Many POSTs in flight at once (the stand-in has not answered them yet).
    hive.wait_until(
        Duration::from_secs(30),
        "10 POSTs in flight together",
        |s| s.iter().filter(|r| r.answered == 0).count() >= 10,
    )
    .await;
    let seen = hive
        .wait_until(Duration::from_secs(60), "all delivered", |s| ids(s) == want)
        .await;
    // The hanging POST timed out and the message was sent again with the same key.
    let tries = seen
        .iter()
        .filter(|r| r.header("idempotency-key") == Some(first.as_str()))
        .count();
    assert!(tries >= 2, "first message tried {tries} times");
    wait_queue_empty(&vhost.name, RELAY).await;
    svc.stop().await;
}

#[tokio::test]
async fn a_malformed_message_is_dead_lettered() {
    let vhost = broker().vhost("relay-malformed").await;
    let hive = HiveStandIn::start().await;
    let svc = Service::start(&vhost.amqp_url, &hive.url(), &[]).await;
    let (_conn, ch) = channel(&vhost.amqp_url).await;
    let mut headers = serde_json::Map::new();
    headers.insert("message_id".into(), json!("m-1"));
    publish_raw(&ch, "mosaic.events", "event.x.y", &headers, b"{not json").await;
    let got =
        mosaic_tests::eventually(Duration::from_secs(30), "the malformed message", || async {
            ch.basic_get(DLQ.into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
        })
        .await;
    let headers =
        amqp_value_json::from_field_table(got.properties.headers().as_ref().unwrap()).unwrap();
    assert_eq!(headers["x-mosaic-reason"], "malformed");
    assert_eq!(headers["x-mosaic-routing-key"], "event.x.y");
    assert!(hive.requests().is_empty());
    svc.stop().await;
}

#[tokio::test]
async fn hive_refusing_connections_then_coming_up_gets_everything() {
    let vhost = broker().vhost("relay-hive-down").await;
    // A port where nothing listens yet: every POST is refused.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://{addr}/hive/events");
    // Attempts are plenty, so nothing is given up while Hive is down.
    let svc = Service::start(&vhost.amqp_url, &url, &[("HIVE_MAX_ATTEMPTS", "100000")]).await;
    let (_conn, ch) = channel(&vhost.amqp_url).await;
    let mut want = HashSet::new();
    for i in 0..5 {
        want.insert(publish_event(&ch, Uuid::now_v7(), "n", json!({"i": i}), b"0").await);
    }
    // Taken and being retried: unacknowledged, not dead-lettered.
    mosaic_tests::eventually(
        Duration::from_secs(30),
        "5 unacked in the relay queue",
        || async { (crate::queue_counts(&vhost.name, RELAY).await? == (0, 5)).then_some(()) },
    )
    .await;
    let hive = HiveStandIn::start_at(addr).await;
    hive.wait_until(Duration::from_secs(30), "all 5 delivered", |s| {
        ids(s) == want
    })
    .await;
    wait_queue_empty(&vhost.name, RELAY).await;
    wait_queue_empty(&vhost.name, DLQ).await;
    svc.stop().await;
}
