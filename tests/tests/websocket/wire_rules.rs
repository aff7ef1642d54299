//! What a device may not put on the wire: names RabbitMQ reads itself, headers too
//! large for one AMQP frame, extra fields over 64 KiB, integers past 64 bits. Each is
//! refused with an error frame, nothing reaches RabbitMQ, and the session and the
//! replica's broker link keep working.

use lapin::options::BasicPublishOptions;
use mosaic_tests::broker;
use mosaic_tests::device::Device;
use serde_json::{Value, json};

use crate::{Gateway, Observer, WAIT, device};

/// Sends `frame` and expects an error frame with `code`; then an event with an id,
/// which must be acked: the session and the broker link still work.
async fn refused_then_acked(d: &mut Device, frame: &Value, code: &str, n: usize) {
    let text = frame.to_string();
    let shown = &text[..text.len().min(100)];
    d.send_text(&text).await;
    let answer = d.recv().await;
    assert_eq!(answer["type"], "error", "{shown}: {answer}");
    assert_eq!(answer["code"], code, "{shown}: {answer}");
    assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
    let id = format!("after-{n}");
    d.send(&json!({"type":"event","name":"fine","id":id})).await;
    let answer = d.recv_within(WAIT).await;
    assert_eq!(answer, json!({"type":"ack","id":id}), "after {shown}");
}

/// Publishes a marker to `key` on `mosaic.events` through `observer`'s own
/// connection and checks it is the next (so the first) message the observer holds.
async fn nothing_before_marker(observer: &mut Observer, key: &str) {
    let confirm = observer
        .0
        .ch
        .basic_publish(
            "mosaic.events".into(),
            key.into(),
            BasicPublishOptions::default(),
            b"\"marker\"",
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap();
    mosaic_tests::within(WAIT, "the marker's confirm", confirm)
        .await
        .unwrap();
    let got = observer.next().await;
    assert_eq!(
        got.routing_key, key,
        "a message came before the marker: {got:?}"
    );
}

#[tokio::test]
async fn names_rabbitmq_reads_are_refused_and_copy_nothing() {
    let vh = broker().vhost("ws-broker-names").await;
    let gw = Gateway::start(&vh.amqp_url, &[]).await;
    let (_, tok) = device();
    let (other, _) = device();
    // Everything addressed to another device's keys.
    let mut theirs =
        Observer::bind(&vh.amqp_url, "mosaic.events", &format!("event.{other}.#")).await;
    let (mut d, _) = Device::connect(gw.addr, &tok).await;
    let their_key = format!("event.{other}.t");
    let frames = [
        // Not an array of strings: RabbitMQ would close the publishing channel.
        json!({"type":"event","name":"t","id":"a","CC":"x"}),
        // Arrays of strings: RabbitMQ would copy the event onto the other device's key.
        json!({"type":"event","name":"t","id":"b","CC":[their_key]}),
        json!({"type":"event","name":"t","id":"c","BCC":[their_key]}),
        json!({"type":"event","name":"t","id":"d","cc":[their_key]}),
        json!({"type":"event","name":"t","id":"e","Bcc":[their_key]}),
        json!({"type":"event","name":"t","id":"f","x-death":[{"count":1,"queue":"q"}]}),
        json!({"type":"event","name":"t","id":"g","X-Match":"any"}),
    ];
    for (n, frame) in frames.iter().enumerate() {
        refused_then_acked(&mut d, frame, "reserved_field", n).await;
    }
    nothing_before_marker(&mut theirs, &format!("event.{other}.marker")).await;
    gw.stop().await;
}

#[tokio::test]
async fn oversize_headers_big_integers_and_long_extras_are_bad_frames() {
    let vh = broker().vhost("ws-limits").await;
    let gw = Gateway::start(&vh.amqp_url, &[]).await;
    let (dev, tok) = device();
    let mut mine = Observer::bind(&vh.amqp_url, "mosaic.events", &format!("event.{dev}.big")).await;
    let (mut d, _) = Device::connect(gw.addr, &tok).await;

    // 20,000 small numbers: about 40 KB of JSON, 180 KB as AMQP headers, past
    // frame_max (a header frame that large closes the whole broker connection).
    let numbers = json!({"type":"event","name":"big","id":"n","n":vec![7; 20_000]});
    assert!(numbers.to_string().len() < 64 * 1024);
    // 70,000 bytes of extra fields as JSON (a table that would still fit a frame).
    let long = json!({"type":"event","name":"big","id":"l","pad":"x".repeat(70_000)});
    for (n, frame) in [numbers, long].iter().enumerate() {
        refused_then_acked(&mut d, frame, "bad_frame", n).await;
    }
    // Integers past 64 bits, in data and in an extra field.
    for (n, text) in [
        r#"{"type":"event","name":"big","id":"i2","data":{"v":[1,18446744073709551616]}}"#,
        r#"{"type":"event","name":"big","id":"i3","n":-9223372036854775809}"#,
        r#"{"type":"event","name":"big","id":"i4","data":123456789012345678901234567890}"#,
    ]
    .into_iter()
    .enumerate()
    {
        d.send_text(text).await;
        let answer = d.recv().await;
        assert_eq!(answer["code"], "bad_frame", "{text}: {answer}");
        assert!(
            answer["message"]
                .as_str()
                .is_some_and(|m| m.contains("outside the range")),
            "{answer}"
        );
        d.send(&json!({"type":"event","name":"fine","id":format!("ok-{n}")}))
            .await;
        assert_eq!(d.recv().await["type"], "ack");
    }
    // None of them reached RabbitMQ.
    nothing_before_marker(&mut mine, &format!("event.{dev}.big")).await;

    // Right at the edges: the largest integers, and a table that still fits.
    let edge = json!({"type":"event","name":"big","id":"edge","data":[u64::MAX, i64::MIN],
                      "n":vec![7; 13_000]});
    d.send(&edge).await;
    assert_eq!(d.recv().await, json!({"type":"ack","id":"edge"}));
    let got = mine.next().await;
    assert_eq!(got.body, json!([u64::MAX, i64::MIN]));
    assert_eq!(got.headers["n"], json!(vec![7; 13_000]));
    gw.stop().await;
}
