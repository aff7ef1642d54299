//! The relay queue's dead-lettering, against RabbitMQ's own behaviour.
//!
//! - A message RabbitMQ redelivers past the relay queue's delivery limit lands in the
//!   dead-letter queue (the queue's explicit `x-dead-letter-*` arguments, at least
//!   once) instead of being dropped or requeued for ever.
//! - A message carrying `CC`/`BCC` headers (a raw publisher's, not a gateway's) that
//!   Hive refuses is dead-lettered once, and no copy reaches the queues its `CC`/`BCC`
//!   name; nor does RabbitMQ's own dead-lettering send one there.

use std::time::Instant;

use device_service::broker::{DEAD_LETTER_QUEUE, DELIVERY_LIMIT, RELAY_QUEUE};
use futures_util::StreamExt;
use lapin::Channel;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use mosaic_tests::hive::{Answer, HiveStandIn};
use mosaic_tests::{broker, within};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{WAIT, start_relay};

/// A device event's headers as a gateway writes them, plus `extra` (set by hand: a
/// `CC` array of strings is not what the JSON mapping makes of an array).
fn event_headers(device: Uuid, extra: &[(&str, AMQPValue)]) -> (String, FieldTable) {
    let message_id = Uuid::now_v7().to_string();
    let json = json!({
        "kind": "event", "message_id": message_id, "device": device.to_string(),
        "name": "drill", "session": Uuid::now_v7().to_string(), "gateway": "drill",
        "received_at": crate::now_rfc3339(),
    });
    let mut table = amqp_value_json::to_field_table(json.as_object().unwrap()).unwrap();
    for (k, v) in extra {
        table.insert((*k).into(), v.clone());
    }
    (message_id, table)
}

/// An AMQP array of long strings, as RabbitMQ wants `CC` and `BCC`.
fn keys(names: &[&str]) -> AMQPValue {
    AMQPValue::FieldArray(FieldArray::from(
        names
            .iter()
            .map(|n| AMQPValue::LongString(LongString::from(*n)))
            .collect::<Vec<_>>(),
    ))
}

/// Declares a plain queue (bound to nothing) and returns its name.
async fn plain_queue(ch: &Channel, name: &str) -> String {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("a plain queue");
    name.to_owned()
}

/// The message in the dead-letter queue (taken off it), as JSON headers.
async fn take_dead_letter(ch: &Channel) -> (Value, Vec<u8>) {
    let got = ch
        .basic_get(DEAD_LETTER_QUEUE.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
        .expect("a dead letter");
    let headers = got
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    let json = amqp_value_json::from_field_table(&headers).expect("JSON headers");
    (Value::Object(json), got.delivery.data)
}

#[tokio::test]
async fn a_message_redelivered_past_the_limit_is_dead_lettered_not_dropped() {
    let started = Instant::now();
    let vhost = broker().vhost("drill-delivery-limit").await;
    let (conn, ch) = mosaic_tests::amqp::connect(&vhost.amqp_url).await;
    // The topology exactly as device-service declares it on every connection; no
    // device-service consumes.
    device_service::broker::declare(
        ch.clone(),
        "drill-delivery-limit-replies".into(),
        "drill-delivery-limit-fleet".into(),
    )
    .await
    .expect("device-service's topology");
    let cc = plain_queue(&ch, "drill-delivery-limit-cc").await;
    let device = Uuid::new_v4();
    let (message_id, headers) = event_headers(device, &[("CC", keys(&[&cc]))]);
    crate::publish_table(
        &ch,
        mosaic_protocol::exchange::EVENTS,
        &mosaic_protocol::exchange::event_key(device, "drill"),
        headers,
        b"{\"n\":1}",
    )
    .await;

    // A consumer that fails the message every time: nack, requeue.
    let failing = conn.create_channel().await.unwrap();
    failing
        .basic_qos(1, BasicQosOptions::default())
        .await
        .unwrap();
    let mut relay = failing
        .basic_consume(
            RELAY_QUEUE.into(),
            "drill-failing".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut dead = ch
        .basic_consume(
            DEAD_LETTER_QUEUE.into(),
            "drill-dead".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut deliveries = 0i64;
    let dead_letter = within(WAIT, "the message in the dead-letter queue", async {
        loop {
            tokio::select! {
                d = relay.next() => {
                    let d = d.expect("the relay consumer is open").expect("a delivery");
                    deliveries += 1;
                    d.nack(BasicNackOptions { requeue: true, ..Default::default() })
                        .await
                        .expect("nack");
                }
                d = dead.next() => return d.expect("the dead-letter consumer is open")
                    .expect("a dead letter"),
            }
        }
    })
    .await;
    let headers = dead_letter.properties.headers().clone().unwrap_or_default();
    let json = amqp_value_json::from_field_table(&headers).expect("JSON headers");
    println!(
        "delivery limit {DELIVERY_LIMIT}: delivered {deliveries} times, then dead-lettered \
         by RabbitMQ ({}); drill took {:?}",
        json["x-first-death-reason"],
        started.elapsed()
    );
    // RabbitMQ counts returns: the message goes after the limit's worth of them.
    assert_eq!(deliveries, DELIVERY_LIMIT + 1);
    assert_eq!(json["message_id"], message_id.as_str());
    assert_eq!(json["x-first-death-reason"], "delivery_limit");
    assert_eq!(json["x-first-death-queue"], RELAY_QUEUE);
    assert_eq!(dead_letter.data, b"{\"n\":1}");
    // With a dead-letter routing key of its own, RabbitMQ drops `CC` from the dead
    // letter: nothing reached the queue the original's `CC` named.
    assert!(!json.contains_key("CC"), "{json:?}");
    assert_eq!(crate::ready(&conn, &cc).await, 0);
    assert_eq!(crate::ready(&conn, RELAY_QUEUE).await, 0);
}

#[tokio::test]
async fn a_refused_message_with_cc_and_bcc_is_dead_lettered_once_and_goes_nowhere_else() {
    let started = Instant::now();
    let vhost = broker().vhost("drill-cc").await;
    let hive = HiveStandIn::start().await;
    hive.script(|_| Answer::status(422));
    let relay = start_relay(&vhost.amqp_url, &hive.url(), &[]).await;
    let (conn, ch) = mosaic_tests::amqp::connect(&vhost.amqp_url).await;
    let cc = plain_queue(&ch, "drill-cc-target").await;
    let bcc = plain_queue(&ch, "drill-bcc-target").await;

    // The control: on this broker, a copy published to the default exchange with
    // these headers (as a dead letter is) would land in both queues.
    let (_, control) = event_headers(
        Uuid::new_v4(),
        &[("CC", keys(&[&cc])), ("BCC", keys(&[&bcc]))],
    );
    crate::publish_table(&ch, "", "drill-no-such-queue", control, b"0").await;
    assert_eq!(
        (
            crate::ready(&conn, &cc).await,
            crate::ready(&conn, &bcc).await
        ),
        (1, 1)
    );
    for q in [&cc, &bcc] {
        ch.queue_purge(q.as_str().into(), Default::default())
            .await
            .unwrap();
    }

    // A raw publisher's event naming both queues; the topic exchange routes its
    // `CC`/`BCC` keys to no queue, only the event key to the relay queue.
    let device = Uuid::new_v4();
    let (message_id, headers) =
        event_headers(device, &[("CC", keys(&[&cc])), ("BCC", keys(&[&bcc]))]);
    crate::publish_table(
        &ch,
        mosaic_protocol::exchange::EVENTS,
        &mosaic_protocol::exchange::event_key(device, "drill"),
        headers,
        b"{\"n\":2}",
    )
    .await;
    hive.wait_for(1, WAIT).await;
    // Counted once the original is acked, after the dead letter's confirm.
    mosaic_tests::eventually(WAIT, "the message dead-lettered", || async {
        (crate::finished(&relay, "dead_lettered").await == 1).then_some(())
    })
    .await;

    let posts = hive.requests();
    assert_eq!(posts.len(), 1, "one POST: Hive refused it for good");
    assert_eq!(
        posts[0].header("idempotency-key"),
        Some(message_id.as_str())
    );
    assert_eq!(
        crate::ready(&conn, DEAD_LETTER_QUEUE).await,
        1,
        "dead-lettered once"
    );
    assert_eq!(crate::ready(&conn, RELAY_QUEUE).await, 0);
    assert_eq!(
        (
            crate::ready(&conn, &cc).await,
            crate::ready(&conn, &bcc).await
        ),
        (0, 0),
        "a copy reached a queue named by CC or BCC"
    );
    let (dead, body) = take_dead_letter(&ch).await;
    assert_eq!(dead["message_id"], message_id.as_str());
    assert_eq!(dead["x-mosaic-reason"], "rejected");
    assert_eq!(dead["x-mosaic-status"], 422);
    assert!(
        dead.get("CC").is_none() && dead.get("BCC").is_none(),
        "{dead}"
    );
    assert_eq!(body, b"{\"n\":2}");
    println!(
        "CC/BCC: Hive refused the message (422) once, 1 dead letter, 0 copies in the CC \
         and BCC queues; drill took {:?}",
        started.elapsed()
    );
    let _ = conn.close(200, "".into()).await;
    relay.terminate();
    relay.assert_exits_cleanly().await;
}
