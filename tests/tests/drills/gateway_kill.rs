//! Drill: a websocket-service replica dies by SIGKILL. Its devices see their
//! connections drop, connect to another replica, and work there at once: their
//! events are acked and reach Hive, REST events and requests reach them.
//! (The `disconnected` lifecycle messages of a crashed replica's devices are another
//! feature's.)

use std::os::unix::process::ExitStatusExt;
use std::time::Instant;

use mosaic_tests::device::{Device, Ended};
use mosaic_tests::hive::HiveStandIn;
use mosaic_tests::{broker, token};
use serde_json::json;
use uuid::Uuid;

use crate::{Responder, WAIT, start_gateway, start_relay};

/// Devices on the replica that dies.
const DEVICES: usize = 10;

#[tokio::test]
async fn devices_of_a_killed_gateway_work_on_another_replica() {
    let started = Instant::now();
    let vhost = broker().vhost("drill-gateway-kill").await;
    let hive = HiveStandIn::start().await;
    let relay = start_relay(&vhost.amqp_url, &hive.url(), &[]).await;
    let mut a = start_gateway(&vhost.amqp_url, &[]).await;
    let b = start_gateway(&vhost.amqp_url, &[]).await;

    let mut devices = Vec::new();
    for _ in 0..DEVICES {
        let device = Uuid::new_v4();
        let (mut d, _) = Device::connect(a.addr, &token::hs256(device, 3600)).await;
        d.send(&json!({"type": "event", "name": "drill", "id": "on-a"}))
            .await;
        assert_eq!(d.recv().await, json!({"type": "ack", "id": "on-a"}));
        devices.push((device, d));
    }

    let status = a.kill().await;
    assert_eq!(status.signal(), Some(9), "{status}");
    let killed_at = Instant::now();
    let mut moved = Vec::new();
    for (device, mut d) in devices {
        // No close frame: the process is gone, the kernel closed the socket.
        let (_, ended) = d.ended_within(WAIT).await;
        assert_eq!(ended, Ended::Dropped, "{device}");
        // Right after the kill, RabbitMQ may still be deleting the dead replica's queue,
        // which the device's `connected` message (its takeover notice) is routed to
        // too: the broker can then refuse to confirm it, and the device hears 1013
        // and comes back, as a device should.
        let (mut d, _, _) = Device::connect_retrying(b.addr, &token::hs256(device, 3600), 5).await;
        d.send(&json!({"type": "event", "name": "drill", "id": "on-b"}))
            .await;
        assert_eq!(d.recv().await, json!({"type": "ack", "id": "on-b"}));
        moved.push(Responder::start(device, d));
    }
    let moved_in = killed_at.elapsed();
    for r in &mut moved {
        r.commands_work(relay.addr, "after the move").await;
    }
    let wanted: Vec<String> = moved
        .iter()
        .flat_map(|r| {
            ["on-a", "on-b"].map(|id| mosaic_protocol::message_id(r.device, Some(id)).to_string())
        })
        .collect();
    mosaic_tests::eventually(WAIT, "every event of both replicas at Hive", || {
        let keys = hive.delivered_keys();
        let done = wanted.iter().all(|k| keys.contains_key(k));
        async move { done.then_some(()) }
    })
    .await;
    println!(
        "gateway kill: {DEVICES} devices moved to the other replica and acked there \
         {moved_in:?} after the SIGKILL; {} events sent, {} acked, {} at Hive, 0 lost; \
         commands reached all of them; drill took {:?}",
        wanted.len(),
        wanted.len(),
        wanted.len(),
        started.elapsed()
    );
    drop(moved);
    for service in [b, relay] {
        service.terminate();
        service.assert_exits_cleanly().await;
    }
}
