//! Liveness, backpressure, broker outage, shutdown and metrics.

use std::time::Duration;

use mosaic_tests::device::{Device, Ended};
use mosaic_tests::{FaultProxy, broker};
use serde_json::json;

use crate::{Gateway, Hive, Observer, WAIT, device};

#[tokio::test]
async fn a_device_that_answers_no_ping_is_closed() {
    let vh = broker().vhost("ws-ping").await;
    let gw = Gateway::start(
        &vh.amqp_url,
        &[("PING_INTERVAL_MS", "200"), ("PONG_TIMEOUT_MS", "300")],
    )
    .await;
    let mut life = Observer::bind(&vh.amqp_url, "mosaic.events", "lifecycle.*.disconnected").await;
    let (silent, tok) = device();
    // This device never reads, so it never answers a ping.
    let (_silent, _) = Device::connect(gw.addr, &tok).await;
    // A device that reads answers pings and stays.
    let (_, tok2) = device();
    let (mut alive, _) = Device::connect(gw.addr, &tok2).await;
    let reader = tokio::spawn(async move {
        let open = alive.open_after(Duration::from_millis(1500)).await;
        (open, alive)
    });
    let g = life.next().await;
    assert_eq!(g.headers["reason"], "ping_timeout");
    assert_eq!(g.headers["device"], silent.to_string());
    // The reading device answered every ping for several intervals and stayed.
    let (open, alive) = reader.await.unwrap();
    assert!(open);
    drop(alive);
    gw.stop().await;
}

#[tokio::test]
async fn a_device_that_stops_reading_is_closed_as_slow_consumer() {
    let vh = broker().vhost("ws-slow").await;
    let gw = Gateway::start(
        &vh.amqp_url,
        &[("OUTBOUND_QUEUE", "4"), ("PONG_TIMEOUT_MS", "1000")],
    )
    .await;
    let mut life = Observer::bind(&vh.amqp_url, "mosaic.events", "lifecycle.*.disconnected").await;
    let hive = Hive::new(&vh.amqp_url).await;
    let (dev, tok) = device();
    let (_d, _) = Device::connect(gw.addr, &tok).await;
    let big = json!("x".repeat(256 * 1024));
    for _ in 0..200 {
        hive.event(dev, "flood", big.clone()).await;
    }
    let g = life.next().await;
    assert_eq!(g.headers["reason"], "slow_consumer");
    let (_, metrics) = gw.get("/metrics").await;
    assert!(
        metrics.contains("mosaic_ws_closes_total{code=\"4429\"}"),
        "{metrics}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_broker_outage_nacks_events_and_everything_recovers() {
    let vh = broker().vhost("ws-outage").await;
    let proxy = FaultProxy::start(broker().amqp_addr()).await.unwrap();
    let path = vh.amqp_url.rsplit_once('/').unwrap().1;
    let via_proxy = format!("amqp://guest:guest@{}/{path}", proxy.addr());
    let gw = Gateway::start(&via_proxy, &[("PUBLISH_TIMEOUT_MS", "1000")]).await;
    let hive = Hive::new(&vh.amqp_url).await;
    let (dev, tok) = device();
    let (mut d, _) = Device::connect(gw.addr, &tok).await;

    proxy.outage();
    gw.wait_ready(false).await;
    d.send(&json!({"type":"event","name":"t","id":"during"}))
        .await;
    assert_eq!(
        d.recv().await,
        json!({"type":"nack","id":"during","code":"unavailable"})
    );

    proxy.restore();
    gw.wait_ready(true).await;
    // The device stayed connected; events are acked again.
    d.send(&json!({"type":"event","name":"t","id":"after"}))
        .await;
    assert_eq!(d.recv().await, json!({"type":"ack","id":"after"}));
    // Its binding was restored: commands reach it.
    let id = hive.event(dev, "again", json!(1)).await;
    assert_eq!(d.recv().await["id"], id);
    let (_, metrics) = gw.get("/metrics").await;
    assert!(
        metrics.contains("mosaic_ws_nacks_total{code=\"unavailable\"}"),
        "{metrics}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_closes_every_device_with_1001() {
    let vh = broker().vhost("ws-stop").await;
    let gw = Gateway::start(&vh.amqp_url, &[]).await;
    let mut life = Observer::bind(&vh.amqp_url, "mosaic.events", "lifecycle.*.disconnected").await;
    let (_, t1) = device();
    let (_, t2) = device();
    let (mut d1, _) = Device::connect(gw.addr, &t1).await;
    let (mut d2, _) = Device::connect(gw.addr, &t2).await;
    let (_, metrics) = gw.get("/metrics").await;
    assert!(metrics.contains("mosaic_ws_connections"), "{metrics}");
    assert!(
        metrics.contains("mosaic_ws_frames_out_total{type=\"welcome\"}"),
        "{metrics}"
    );
    let addr = gw.addr;
    let stopping = tokio::spawn(gw.stop());
    for d in [&mut d1, &mut d2] {
        let (_, ended) = d.ended_within(WAIT).await;
        assert!(matches!(ended, Ended::Close(1001, _)), "{ended:?}");
    }
    for _ in 0..2 {
        assert_eq!(life.next().await.headers["reason"], "shutdown");
    }
    tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .unwrap()
        .unwrap();
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn a_slow_broker_makes_the_gateway_stop_reading_the_device() {
    let vh = broker().vhost("ws-slowbroker").await;
    let proxy = crate::StallProxy::start(broker().amqp_addr()).await;
    let path = vh.amqp_url.rsplit_once('/').unwrap().1;
    let via_proxy = format!("amqp://guest:guest@{}/{path}", proxy.addr);
    let gw = Gateway::start(
        &via_proxy,
        &[("MAX_IN_FLIGHT", "2"), ("PUBLISH_TIMEOUT_MS", "30000")],
    )
    .await;
    let (_, tok) = device();
    let (mut d, _) = Device::connect(gw.addr, &tok).await;

    // The broker stops confirming: two events fill the device's in-flight window.
    proxy.stall(true);
    d.send(&json!({"type":"event","name":"t","id":"1"})).await;
    d.send(&json!({"type":"event","name":"t","id":"2"})).await;
    // Were the gateway still reading, this bad frame would be answered at once,
    // before the (held back) acks.
    d.send_text("not json").await;
    let (_, metrics) = gw.get("/metrics").await;
    assert!(metrics.contains("mosaic_ws_connections"), "{metrics}");
    proxy.stall(false);
    // The first answer is the first ack: the bad frame was not read while the
    // window was full. Then the window opens and both other answers come.
    assert_eq!(d.recv().await, json!({"type":"ack","id":"1"}));
    let mut rest = [d.recv().await, d.recv().await];
    rest.sort_by_key(|f| f["type"].as_str().map(str::to_owned));
    assert_eq!(rest[0], json!({"type":"ack","id":"2"}));
    assert_eq!(rest[1]["code"], "bad_frame");
    gw.stop().await;
}
