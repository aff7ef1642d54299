//! A private node with extra configuration: a short `consumer_timeout` closes the
//! channel holding an unacked delivery, within the documented bounds.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use mosaic_tests::broker::CONSUMER_TIMEOUT_TICK;
use mosaic_tests::{Broker, NodeConfig, within};
use tokio::task::block_in_place;

use crate::{WAIT, assert_nothing_left};

const TIMEOUT: Duration = Duration::from_secs(2);

/// A channel consuming from a fresh queue of its own, with one delivery received and
/// not yet acked; returns the time of the delivery.
async fn holding_one(conn: &Connection) -> (Channel, Consumer, lapin::message::Delivery, Instant) {
    let ch = conn.create_channel().await.expect("a channel");
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("a queue");
    let mut consumer = ch
        .basic_consume(
            q.name().clone(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    ch.basic_publish(
        "".into(),
        q.name().clone(),
        BasicPublishOptions::default(),
        b"held",
        BasicProperties::default(),
    )
    .await
    .expect("publish");
    let delivery = within(WAIT, "the delivery", consumer.next())
        .await
        .expect("the consumer is open")
        .expect("a delivery");
    (ch, consumer, delivery, Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_consumer_timeout_closes_the_holding_channel() {
    let config = NodeConfig::new().consumer_timeout(TIMEOUT);
    let broker = block_in_place(|| Broker::start_with(&config)).expect("a private node");
    let dir = broker
        .log_dir()
        .and_then(|d| d.parent().map(ToOwned::to_owned))
        .expect("a private node has a directory");
    let conn = within(
        WAIT,
        "a connection",
        Connection::connect(broker.amqp_url(), ConnectionProperties::default()),
    )
    .await
    .expect("connect");

    // One channel holds its delivery; another acks its own at once and keeps going.
    let (held, mut held_consumer, _delivery, delivered) = holding_one(&conn).await;
    let (acking, _acking_consumer, acked, _) = holding_one(&conn).await;
    acked.ack(BasicAckOptions::default()).await.expect("ack");

    let bound = TIMEOUT + CONSUMER_TIMEOUT_TICK + Duration::from_secs(2);
    let end = within(bound, "the held channel to close", held_consumer.next()).await;
    let elapsed = delivered.elapsed();
    println!("consumer_timeout {TIMEOUT:?}: channel closed {elapsed:?} after the delivery");
    let err = match end {
        Some(Err(e)) => e.to_string(),
        other => panic!("the consumer should end with the channel's error: {other:?}"),
    };
    assert!(
        err.contains("PRECONDITION_FAILED") && err.contains("delivery acknowledgement"),
        "{err}"
    );
    assert!(
        elapsed >= TIMEOUT,
        "closed after {elapsed:?}, before the timeout"
    );
    assert!(!held.status().connected(), "the held channel is closed");
    assert!(acking.status().connected(), "the acking channel stays open");

    let _ = conn.close(200, "done".into()).await;
    block_in_place(|| broker.stop());
    assert_nothing_left(&dir).await;
}
