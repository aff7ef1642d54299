//! Drill: both services lose the broker while devices send events, and get it back.
//! A fault proxy between them and RabbitMQ first stalls (bytes stop moving both
//! ways, as when a network drops packets: what the services send waits in socket
//! buffers), then cuts every connection (losing what the stall held back) and
//! refuses new ones, then lets them through again. The services recover without a
//! restart, and nothing a device saw acked is lost: a device is acked only on
//! RabbitMQ's confirm, so the events the cut swallowed are nacked and sent again.

use std::time::{Duration, Instant};

use mosaic_tests::hive::HiveStandIn;
use mosaic_tests::{FaultProxy, broker};

use crate::{Responder, Traffic, WAIT, link_count, start_gateway, start_relay, wait_reconnected};

/// Devices sending.
const DEVICES: usize = 8;
/// How long the network drops everything before the cut: shorter than the gateway's
/// `PUBLISH_TIMEOUT_MS` (2 s), so the publishes it holds back are still waiting for
/// their confirms when their connection goes.
const STALL: Duration = Duration::from_secs(1);
/// How long the broker stays unreachable after the cut: several reconnect attempts
/// of each service.
const OUTAGE: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_cut_during_traffic_loses_nothing_acked() {
    let started = Instant::now();
    let vhost = broker().vhost("drill-cut").await;
    let proxy = FaultProxy::start(broker().amqp_addr()).await.unwrap();
    let via_proxy = vhost
        .amqp_url
        .replace(&broker().amqp_addr().to_string(), &proxy.addr().to_string());
    assert_ne!(via_proxy, vhost.amqp_url);
    let hive = HiveStandIn::start().await;
    // device-service first: it declares the relay queue the gateway's events need.
    let mut relay = start_relay(&via_proxy, &hive.url(), &[]).await;
    let mut gateway = start_gateway(&via_proxy, &[]).await;
    let (relay_pid, gateway_pid) = (relay.pid(), gateway.pid());
    let mut responder = Responder::connect(gateway.addr).await;
    responder.commands_work(relay.addr, "before the cut").await;

    let traffic = Traffic::start(gateway.addr, DEVICES, Duration::from_millis(20), 2_000).await;
    traffic
        .wait_each_acked_more(15, WAIT, "before the cut")
        .await;

    proxy.stall();
    let before_stall = traffic.acked();
    tokio::time::sleep(STALL).await;
    // At most the confirms already past the proxy when it stalled, one a device.
    let acked_in_stall = traffic.acked() - before_stall;
    assert!(
        acked_in_stall <= DEVICES,
        "{acked_in_stall} acked in the stall"
    );
    proxy.outage();
    let cut_at = Instant::now();
    for service in [&relay, &gateway] {
        mosaic_tests::wait::readiness(service.addr, false, WAIT).await;
    }
    tokio::time::sleep(OUTAGE.saturating_sub(cut_at.elapsed())).await;
    let acked_during = traffic.acked();
    proxy.restore();
    let restored_at = Instant::now();
    wait_reconnected(&relay, "device-service", 1, WAIT).await;
    wait_reconnected(&gateway, "websocket-service", 1, WAIT).await;
    let recovered_in = restored_at.elapsed();
    responder.commands_work(relay.addr, "after the cut").await;
    traffic
        .wait_each_acked_more(15, WAIT, "after the cut")
        .await;

    let ledger = traffic.stop().await;
    let account = ledger.settle(&hive, Duration::from_secs(60)).await;
    println!(
        "broker cut: {STALL:?} stall ({acked_in_stall} acked in it), then {OUTAGE:?} \
         outage; services ready again {recovered_in:?} after the restore; {account:?}; \
         frames {} (nacks {:?}); acked before the restore {acked_during}",
        ledger.frames, ledger.nacks
    );
    assert_eq!(account.lost, 0, "{account:?}");
    assert!(
        ledger.nacks.get("unavailable").copied().unwrap_or(0) > 0,
        "the devices never saw the outage: {ledger:?}"
    );
    // Recovered by themselves: the same processes, each link lost once and rebuilt.
    assert!(relay.is_running() && gateway.is_running());
    assert_eq!((relay.pid(), gateway.pid()), (relay_pid, gateway_pid));
    for (service, link) in [(&relay, "device-service"), (&gateway, "websocket-service")] {
        assert!(link_count(service, link, "lost").await >= 1, "{link}");
        assert!(link_count(service, link, "connected").await >= 2, "{link}");
    }
    drop(responder);
    for service in [relay, gateway] {
        service.terminate();
        service.assert_exits_cleanly().await;
    }
    println!("broker cut drill took {:?}", started.elapsed());
}
