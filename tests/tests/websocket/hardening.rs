//! Nothing accepted is lost, nothing is promised that does not hold: events no queue
//! takes, devices whose command route could not be made, frames held by the rate
//! limit, close frames under a burst, broadcast bursts, and RabbitMQ's alarms.

use std::time::Duration;

use lapin::options::ExchangeDeleteOptions;
use mosaic_tests::device::{Device, Ended};
use mosaic_tests::{FaultProxy, broker, eventually, within};
use serde_json::{Value, json};

use crate::{Gateway, Hive, Observer, WAIT, device};

/// The value of a counter without labels in a Prometheus text page (0 when absent).
fn counter(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn an_event_no_queue_takes_is_nacked_unroutable_not_acked() {
    let vh = broker().vhost("ws-unroutable").await;
    // Nothing consumes `mosaic.events` yet (no device-service ever ran here).
    let gw = Gateway::start_bare(&vh.amqp_url, &[]).await;
    let (_, tok) = device();
    let (mut d, _) = Device::connect(gw.addr, &tok).await;
    d.send(&json!({"type":"event","name":"t","id":"lost?"}))
        .await;
    assert_eq!(
        d.recv().await,
        json!({"type":"nack","id":"lost?","code":"unroutable"})
    );
    // Once a queue takes events, the same event is acked.
    let mut events = Observer::events(&vh.amqp_url).await;
    d.send(&json!({"type":"event","name":"t","id":"kept"}))
        .await;
    assert_eq!(d.recv().await, json!({"type":"ack","id":"kept"}));
    assert_eq!(events.next_with("event.").await.headers["id"], "kept");
    gw.stop().await;
}

#[tokio::test]
async fn a_device_is_refused_with_1013_while_the_broker_is_away() {
    let vh = broker().vhost("ws-refuse").await;
    let proxy = FaultProxy::start(broker().amqp_addr()).await.unwrap();
    let path = vh.amqp_url.rsplit_once('/').unwrap().1;
    let via_proxy = format!("amqp://guest:guest@{}/{path}", proxy.addr());
    let gw = Gateway::start(&via_proxy, &[]).await;
    proxy.outage();
    gw.wait_ready(false).await;
    // Commands could not reach it: no `welcome`, a close it may retry.
    let (_, tok) = device();
    let mut d = Device::try_connect(gw.addr, Some(&tok)).await.unwrap();
    let (frames, ended) = d.ended_within(WAIT).await;
    assert!(frames.is_empty(), "{frames:?}");
    assert!(matches!(ended, Ended::Close(1013, _)), "{ended:?}");

    proxy.restore();
    gw.wait_ready(true).await;
    let (mut d, _) = Device::connect(gw.addr, &tok).await;
    d.send(&json!({"type":"event","name":"t","id":"1"})).await;
    assert_eq!(d.recv().await, json!({"type":"ack","id":"1"}));
    gw.stop().await;
}

#[tokio::test]
async fn a_device_whose_binding_fails_is_refused_then_served_after_recovery() {
    let vh = broker().vhost("ws-bindfail").await;
    let gw = Gateway::start(&vh.amqp_url, &[]).await;
    let hive = Hive::new(&vh.amqp_url).await;
    // The exchange the device bindings go to disappears: the next queue.bind fails
    // (404), which closes the gateway's channel.
    let (conn, ch) = mosaic_tests::amqp::connect(&vh.amqp_url).await;
    ch.exchange_delete(
        "mosaic.commands.devices".into(),
        ExchangeDeleteOptions::default(),
    )
    .await
    .unwrap();
    let (dev, tok) = device();
    let mut d = Device::try_connect(gw.addr, Some(&tok)).await.unwrap();
    let (frames, ended) = d.ended_within(WAIT).await;
    assert!(frames.is_empty(), "welcomed without a route: {frames:?}");
    assert!(matches!(ended, Ended::Close(1013, _)), "{ended:?}");

    // The gateway rebuilds its link, topology included; the device retries and is
    // served, commands reaching it.
    let mut served = None;
    for _ in 0..50 {
        let mut d = Device::try_connect(gw.addr, Some(&tok)).await.unwrap();
        let first = d.frame_or_end(WAIT).await;
        if first.as_ref().is_ok_and(|f| f["type"] == "welcome") {
            served = Some(d);
            break;
        }
        gw.wait_ready(true).await;
    }
    let mut d = served.expect("the device is served after the gateway recovered");
    let id = hive.event(dev, "hello", json!(1)).await;
    assert_eq!(d.recv().await["id"], id);
    let _ = conn.close(200, "".into()).await;
    gw.stop().await;
}

#[tokio::test]
async fn a_frame_held_by_the_rate_limit_is_published_when_the_session_ends() {
    let vh = broker().vhost("ws-held").await;
    let gw = Gateway::start(&vh.amqp_url, &[("EVENT_RATE", "1"), ("EVENT_BURST", "1")]).await;
    let mut events = Observer::events(&vh.amqp_url).await;
    let (_, tok) = device();
    let (mut d, _) = Device::connect(gw.addr, &tok).await;
    d.send(&json!({"type":"event","name":"t","id":"first"}))
        .await;
    assert_eq!(d.recv().await, json!({"type":"ack","id":"first"}));
    let (_, page) = gw.get("/metrics").await;
    let before = counter(&page, "mosaic_ws_rate_limited_total");
    // The bucket is empty: this one is read and held for about a second.
    d.send(&json!({"type":"event","name":"t","id":"held"}))
        .await;
    eventually(WAIT, "the frame to be held", || async {
        let (_, page) = gw.get("/metrics").await;
        (counter(&page, "mosaic_ws_rate_limited_total") > before).then_some(())
    })
    .await;
    // The session ends (shutdown) while the frame is held: it is published anyway.
    let stopping = tokio::spawn(gw.stop());
    let mut ids = Vec::new();
    while ids.len() < 2 {
        let got = events.next_with("event.").await;
        ids.push(got.headers["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids, ["first", "held"]);
    within(WAIT, "the gateway to stop", stopping).await.unwrap();
}

#[tokio::test]
async fn a_burst_of_bad_frames_still_receives_its_close_frame() {
    let vh = broker().vhost("ws-burst").await;
    let gw = Gateway::start(&vh.amqp_url, &[("MAX_BAD_FRAMES", "50")]).await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let addr = gw.addr;
        tasks.push(tokio::spawn(async move {
            let (_, tok) = device();
            // A small receive window: the gateway's answers queue up on its side, so
            // when it closes, its close frame is still in its send buffer. Closing a
            // socket with unread input resets the connection and throws that away.
            let mut d = Device::try_connect_with(addr, Some(&tok), Some(4096))
                .await
                .unwrap();
            assert_eq!(d.recv().await["type"], "welcome");
            // 120 bad frames at once, none of the answers read yet: the gateway
            // closes after the fiftieth while the rest are still unread on its side.
            for i in 0..120 {
                if !d.try_send_text(&format!("not json {i}")).await {
                    break;
                }
            }
            d.ended_within(WAIT).await
        }));
    }
    for t in tasks {
        let (frames, ended) = t.await.unwrap();
        assert_eq!(ended, Ended::Close(1008, "too many bad frames".into()));
        assert_eq!(frames.len(), 50);
        assert!(frames.iter().all(|f| f["code"] == "bad_frame"));
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_broadcast_burst_drops_for_a_full_device_instead_of_closing_it() {
    let vh = broker().vhost("ws-broadcast").await;
    // A long pong timeout: a device that stops reading for a while is not a dead one.
    let gw = Gateway::start(
        &vh.amqp_url,
        &[("OUTBOUND_QUEUE", "4"), ("PONG_TIMEOUT_MS", "60000")],
    )
    .await;
    let hive = Hive::new(&vh.amqp_url).await;
    let (dev, tok) = device();
    let (mut d, _) = Device::connect(gw.addr, &tok).await;
    let (_, page) = gw.get("/metrics").await;
    let dropped_before = counter(&page, "mosaic_ws_broadcast_dropped_total");
    // The device reads nothing while 100 broadcasts of 256 KiB arrive: its socket
    // buffers and then its queue fill.
    let big = json!("x".repeat(256 * 1024));
    for i in 0..100 {
        let headers = json!({"kind":"event","id":format!("b{i}"),"name":"burst"});
        hive.publish(
            "broadcast",
            headers,
            big.clone(),
            lapin::BasicProperties::default(),
        )
        .await;
    }
    eventually(WAIT, "broadcasts to be dropped", || async {
        let (_, page) = gw.get("/metrics").await;
        (counter(&page, "mosaic_ws_broadcast_dropped_total") > dropped_before).then_some(())
    })
    .await;
    // The device reads again: it is still connected and gets what was queued for it;
    // every broadcast was either delivered or counted as dropped.
    let mut seen = 0;
    loop {
        let (_, page) = gw.get("/metrics").await;
        let dropped = counter(&page, "mosaic_ws_broadcast_dropped_total") - dropped_before;
        if seen + dropped as usize == 100 {
            assert!(seen > 0, "nothing delivered, {dropped} dropped");
            break;
        }
        let f: Value = d.recv_within(WAIT).await;
        assert_eq!(f["name"], "burst", "{f}");
        seen += 1;
    }
    // And an event addressed to it still reaches it.
    let id = hive.event(dev, "after", json!(1)).await;
    assert_eq!(d.recv().await["id"], id);
    gw.stop().await;
}

/// A resource alarm: RabbitMQ blocks publishers. The gateway turns not ready and
/// nacks events `unavailable` at once instead of waiting for confirms that cannot
/// come, then serves again by itself. On a node of its own: an alarm blocks every
/// publisher of a node, and other tests share theirs.
#[tokio::test]
async fn a_broker_alarm_nacks_events_at_once_until_it_clears() {
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
    let vh = node.vhost("ws-alarm").await;
    // A confirm that does not come would hold an event for 60 s.
    let gw = Gateway::start(&vh.amqp_url, &[("PUBLISH_TIMEOUT_MS", "60000")]).await;
    let (_, tok_a) = device();
    let (_, tok_b) = device();
    let (mut a, _) = Device::connect(gw.addr, &tok_a).await;
    let (mut b, _) = Device::connect(gw.addr, &tok_b).await;
    a.send(&json!({"type":"event","name":"t","id":"before"}))
        .await;
    assert_eq!(a.recv().await, json!({"type":"ack","id":"before"}));

    ctl(&["set_vm_memory_high_watermark", "absolute", "1MB"])
        .await
        .unwrap()
        .expect("raising the alarm");
    // RabbitMQ blocks a connection when it next publishes: this event may be taken
    // before, or wait for its confirm until the alarm clears; either way the gateway
    // learns it is blocked.
    a.send(&json!({"type":"event","name":"t","id":"first"}))
        .await;
    gw.wait_ready(false).await;
    // Another device's event is refused at once, not held for the publish timeout.
    b.send(&json!({"type":"event","name":"t","id":"blocked"}))
        .await;
    assert_eq!(
        b.recv_within(Duration::from_secs(5)).await,
        json!({"type":"nack","id":"blocked","code":"unavailable"})
    );

    ctl(&["set_vm_memory_high_watermark", "0.4"])
        .await
        .unwrap()
        .expect("clearing the alarm");
    gw.wait_ready(true).await;
    // The event sent as the alarm went off was stored after all, or refused.
    let first = a.recv().await;
    assert_eq!(first["id"], "first", "{first}");
    b.send(&json!({"type":"event","name":"t","id":"after"}))
        .await;
    assert_eq!(b.recv().await, json!({"type":"ack","id":"after"}));
    gw.stop().await;
}
