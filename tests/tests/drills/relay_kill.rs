//! Drill: device-service dies by SIGKILL while Hive holds its POSTs open. RabbitMQ
//! still holds the messages (unacked); another replica delivers each one again, with
//! the same `Idempotency-Key`.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use mosaic_tests::broker;
use mosaic_tests::hive::{Answer, HiveStandIn};
use serde_json::json;

use device_service::broker::RELAY_QUEUE;

use crate::{WAIT, start_relay};

/// Messages in flight when the replica dies.
const MESSAGES: usize = 20;

#[tokio::test]
async fn a_replica_killed_mid_delivery_leaves_every_message_to_the_next() {
    let started = Instant::now();
    let vhost = broker().vhost("drill-relay-kill").await;
    let hive = HiveStandIn::start().await;
    // Hive holds every POST open (longer than the drill) until the kill.
    hive.script(|_| Answer::hang(Duration::from_secs(120)));
    let mut a = start_relay(
        &vhost.amqp_url,
        &hive.url(),
        &[("HIVE_TIMEOUT_MS", "300000")],
    )
    .await;
    let (conn, ch) = mosaic_tests::amqp::connect(&vhost.amqp_url).await;
    let mut ids = Vec::new();
    for i in 0..MESSAGES {
        ids.push(publish(&ch, i).await);
    }
    // Every message is being POSTed by A, and Hive answers none of them.
    hive.wait_for(MESSAGES, WAIT).await;
    assert!(hive.requests().iter().all(|r| r.answered == 0));

    let status = a.kill().await;
    assert_eq!(status.signal(), Some(9), "{status}");
    let killed_at = Instant::now();
    // From now on Hive answers at once, as the next replica's POSTs show.
    hive.script(|_| Answer::status(200));
    let b = start_relay(&vhost.amqp_url, &hive.url(), &[]).await;
    let seen = hive
        .wait_until(WAIT, "every message delivered by the next replica", |s| {
            s.iter().filter(|r| r.answered == 200).count() >= MESSAGES
        })
        .await;
    let redelivered_in = killed_at.elapsed();

    let mut calls: HashMap<&str, Vec<u16>> = HashMap::new();
    for r in &seen {
        calls
            .entry(r.header("idempotency-key").expect("an Idempotency-Key"))
            .or_default()
            .push(r.answered);
    }
    for id in &ids {
        let answers = calls
            .get(id.as_str())
            .unwrap_or_else(|| panic!("{id} never at Hive"));
        // Its first POST (cut off by the kill), then the next replica's, same key.
        assert_eq!(answers.len(), 2, "{id}: {answers:?}");
        assert_eq!(answers[1], 200, "{id}: {answers:?}");
    }
    assert_eq!(
        calls.len(),
        MESSAGES,
        "only the drill's messages: {calls:?}"
    );
    mosaic_tests::eventually(WAIT, "every message acked by the next replica", || async {
        (crate::finished(&b, "delivered").await == MESSAGES as u64).then_some(())
    })
    .await;
    assert_eq!(crate::ready(&conn, RELAY_QUEUE).await, 0);
    println!(
        "relay kill: {MESSAGES} messages in flight at the SIGKILL, {MESSAGES} redelivered \
         with the same Idempotency-Key {redelivered_in:?} after it (next replica's start \
         included), 0 lost; drill took {:?}",
        started.elapsed()
    );
    b.terminate();
    b.assert_exits_cleanly().await;
}

/// Publishes an event as a gateway would; returns its message id.
async fn publish(ch: &lapin::Channel, i: usize) -> String {
    let device = uuid::Uuid::new_v4();
    let message_id = mosaic_protocol::message_id(device, Some(&format!("k{i}"))).to_string();
    let headers = json!({
        "kind": "event", "message_id": message_id, "device": device.to_string(),
        "name": "drill", "session": uuid::Uuid::now_v7().to_string(), "gateway": "drill",
        "received_at": crate::now_rfc3339(),
    });
    crate::publish(
        ch,
        mosaic_protocol::exchange::EVENTS,
        &mosaic_protocol::exchange::event_key(device, "drill"),
        headers,
        b"1",
    )
    .await;
    message_id
}
