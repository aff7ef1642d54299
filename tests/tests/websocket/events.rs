//! Device -> RabbitMQ: events, confirms, bad frames, lifecycle.

use mosaic_tests::broker;
use mosaic_tests::device::{Device, Ended};
use serde_json::json;

use crate::{Gateway, Observer, WAIT, device};

#[tokio::test]
async fn an_event_reaches_rabbitmq_with_its_frame_as_headers_and_is_acked() {
    let vh = broker().vhost("ws-event").await;
    let gw = Gateway::start(&vh.amqp_url, &[]).await;
    let mut events = Observer::events(&vh.amqp_url).await;
    let (dev, tok) = device();
    let (mut d, welcome) = Device::connect(gw.addr, &tok).await;
    assert_eq!(welcome["device"], dev.to_string());
    let session = welcome["session"].as_str().unwrap().to_owned();

    let connected = events.next_with("lifecycle.").await;
    assert_eq!(connected.routing_key, format!("lifecycle.{dev}.connected"));

    d.send(
        &json!({"type":"event","name":"temp","id":"e-1","data":{"c":21.5,"list":[1,null]},
                   "unit":"C","meta":{"fw":"1.2","ok":true}}),
    )
    .await;
    assert_eq!(d.recv().await, json!({"type":"ack","id":"e-1"}));

    let got = events.next_with("event.").await;
    assert_eq!(got.routing_key, format!("event.{dev}.temp"));
    assert_eq!(got.body, json!({"c":21.5,"list":[1,null]}));
    let h = &got.headers;
    assert_eq!(h["kind"], "event");
    assert_eq!(h["name"], "temp");
    assert_eq!(h["id"], "e-1");
    assert_eq!(h["unit"], "C");
    assert_eq!(h["meta"], json!({"fw":"1.2","ok":true}));
    assert_eq!(h["device"], dev.to_string());
    assert_eq!(h["session"], session);
    assert!(
        h["gateway"]
            .as_str()
            .is_some_and(|g| uuid::Uuid::parse_str(g).is_ok())
    );
    assert!(h["received_at"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert!(!h.contains_key("type") && !h.contains_key("data"));
    let mid = mosaic_protocol::message_id(dev, Some("e-1")).to_string();
    assert_eq!(h["message_id"], mid);
    assert_eq!(got.props.message_id().as_ref().unwrap().as_str(), mid);
    assert_eq!(*got.props.delivery_mode(), Some(2));

    // Without an id: no ack, and a UUIDv7 message id.
    d.send(&json!({"type":"event","name":"beat"})).await;
    let got = events.next_with("event.").await;
    let mid = uuid::Uuid::parse_str(got.headers["message_id"].as_str().unwrap()).unwrap();
    assert_eq!(mid.get_version_num(), 7);
    assert_eq!(got.body, json!(null));
    gw.stop().await;
}

#[tokio::test]
async fn bad_frames_are_answered_and_the_connection_stays_open() {
    let vh = broker().vhost("ws-bad").await;
    let gw = Gateway::start(&vh.amqp_url, &[("MAX_BAD_FRAMES", "4")]).await;
    let (_, tok) = device();
    let (mut d, _) = Device::connect(gw.addr, &tok).await;
    for (text, code) in [
        ("not json", "bad_frame"),
        (
            r#"{"type":"event","name":"x","device":"forged"}"#,
            "reserved_field",
        ),
        (r#"{"type":"dance"}"#, "bad_frame"),
    ] {
        d.send_text(text).await;
        let f = d.recv().await;
        assert_eq!(f["type"], "error", "{text}: {f}");
        assert_eq!(f["code"], code, "{text}: {f}");
    }
    // A good frame resets the count; the connection still works.
    d.send(&json!({"type":"event","name":"ok","id":"1"})).await;
    assert_eq!(d.recv().await["type"], "ack");
    d.send_binary(vec![1, 2, 3]).await;
    assert_eq!(d.recv().await["code"], "bad_frame");
    // Four in a row: closed with 1008.
    for _ in 0..3 {
        d.send_text("[]").await;
    }
    let (frames, ended) = d.ended_within(WAIT).await;
    assert_eq!(frames.len(), 3, "{frames:?}");
    assert_eq!(ended, Ended::Close(1008, "too many bad frames".into()));
    gw.stop().await;
}

#[tokio::test]
async fn an_oversize_frame_closes_with_1009() {
    let vh = broker().vhost("ws-big").await;
    let gw = Gateway::start(&vh.amqp_url, &[("MAX_FRAME_BYTES", "1024")]).await;
    let (_, tok) = device();
    let (mut d, _) = Device::connect(gw.addr, &tok).await;
    let big = json!({"type":"event","name":"big","data":"x".repeat(2000)});
    d.send(&big).await;
    assert_eq!(d.close_code().await, 1009);
    gw.stop().await;
}

#[tokio::test]
async fn lifecycle_messages_frame_each_session() {
    let vh = broker().vhost("ws-life").await;
    let gw = Gateway::start(&vh.amqp_url, &[]).await;
    let mut events = Observer::bind(&vh.amqp_url, "mosaic.events", "lifecycle.#").await;
    let (dev, tok) = device();
    let (d, welcome) = Device::connect(gw.addr, &tok).await;
    let c = events.next().await;
    assert_eq!(c.routing_key, format!("lifecycle.{dev}.connected"));
    assert_eq!(c.headers["kind"], "lifecycle");
    assert_eq!(c.headers["name"], "connected");
    assert_eq!(c.headers["session"], welcome["session"]);
    assert_eq!(*c.props.delivery_mode(), Some(2));
    d.close().await;
    let g = events.next().await;
    assert_eq!(g.routing_key, format!("lifecycle.{dev}.disconnected"));
    assert_eq!(g.headers["reason"], "closed_by_device");
    assert!(g.headers["duration_ms"].as_u64().is_some());
    assert_ne!(g.headers["message_id"], c.headers["message_id"]);
    gw.stop().await;
}

#[tokio::test]
async fn a_fast_device_is_read_slower_not_dropped() {
    let vh = broker().vhost("ws-rate").await;
    let gw = Gateway::start(&vh.amqp_url, &[("EVENT_RATE", "20"), ("EVENT_BURST", "2")]).await;
    let (_, tok) = device();
    let (mut d, _) = Device::connect(gw.addr, &tok).await;
    let started = std::time::Instant::now();
    for i in 0..12 {
        d.send(&json!({"type":"event","name":"n","id":i.to_string()}))
            .await;
    }
    for i in 0..12 {
        assert_eq!(d.recv().await, json!({"type":"ack","id":i.to_string()}));
    }
    // 10 frames beyond the burst at 20 per second take at least 0.5 s to be read.
    assert!(started.elapsed() >= std::time::Duration::from_millis(450));
    gw.stop().await;
}

#[tokio::test]
async fn an_event_the_broker_refuses_is_nacked_rejected() {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let vh = broker().vhost("ws-reject").await;
    let gw = Gateway::start(&vh.amqp_url, &[]).await;
    // A full queue that refuses new messages: the broker nacks what is routed to it.
    let (_conn, ch) = mosaic_tests::amqp::connect(&vh.amqp_url).await;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    ch.queue_declare(
        "full".into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    ch.queue_bind(
        "full".into(),
        "mosaic.events".into(),
        "event.*.refused".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let (_, tok) = device();
    let (mut d, _) = Device::connect(gw.addr, &tok).await;
    d.send(&json!({"type":"event","name":"refused","id":"r1"}))
        .await;
    assert_eq!(
        d.recv().await,
        json!({"type":"nack","id":"r1","code":"rejected"})
    );
    d.send(&json!({"type":"event","name":"accepted","id":"a1"}))
        .await;
    assert_eq!(d.recv().await, json!({"type":"ack","id":"a1"}));
    gw.stop().await;
}
