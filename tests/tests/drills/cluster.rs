//! Drill: a three-node RabbitMQ cluster loses the node both services are connected
//! to while devices send events, and the node comes back and rejoins; twice: first
//! the first node of `AMQP_URL`'s list, cleanly stopped (as a service manager
//! stops it); then the node the services moved to, killed with SIGKILL (a crash).
//! Nothing a device saw acked is lost, and commands (a REST event, a REST request)
//! reach a connected device once the services have moved to another node, with the
//! node down and after it is back.
//!
//! The crash found a fault: a publish channel opened just after a quorum queue's
//! leader died can stay bound to the dead leader, and RabbitMQ 3.10 nacks every
//! publish on it for good; mosaic-amqp now replaces a link whose channel refuses
//! every publish for `REFUSED_FOR` (`mosaic_amqp::REFUSED_FOR`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use mosaic_tests::binary::Running;
use mosaic_tests::hive::HiveStandIn;
use mosaic_tests::{Cluster, eventually, within};
use serde_json::Value;

use crate::{Responder, Traffic, WAIT, start_gateway, start_relay, wait_reconnected};

/// How long a cluster may take to form, or a node to stop or rejoin, on a loaded
/// two-core machine.
const NODE_WAIT: Duration = Duration::from_secs(180);
/// How long the services may take to notice the node is gone and move.
const MOVE_WAIT: Duration = Duration::from_secs(60);

/// Runs a blocking cluster operation off the async workers, bounded.
async fn on_cluster<T: Send + 'static>(
    cluster: &Arc<Cluster>,
    what: &str,
    f: impl FnOnce(&Cluster) -> anyhow::Result<T> + Send + 'static,
) -> T {
    let cluster = cluster.clone();
    within(
        NODE_WAIT,
        what,
        tokio::task::spawn_blocking(move || f(&cluster)),
    )
    .await
    .expect("the cluster operation panicked")
    .unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

/// The node each service's connection is on (by the connection names `<service>
/// <replica>`), as a running node's management API lists them, once both services
/// are listed and `ok` holds for the list (it lags behind for a moment).
async fn nodes_of(
    cluster: &Cluster,
    what: &str,
    ok: impl Fn(&[(String, String)]) -> bool,
) -> Vec<(String, String)> {
    eventually(WAIT, what, || async {
        for via in 0..cluster.len() {
            let Some(on) = connections(cluster, via).await else {
                continue;
            };
            let listed = ["device-service", "websocket-service"]
                .iter()
                .all(|s| on.iter().any(|(n, _)| n == s));
            if listed && ok(&on) {
                return Some(on);
            }
        }
        None
    })
    .await
}

async fn connections(cluster: &Cluster, via: usize) -> Option<Vec<(String, String)>> {
    let res = reqwest::Client::new()
        .get(format!(
            "{}/api/connections?columns=user_provided_name,node",
            cluster.mgmt_url(via)
        ))
        .basic_auth("guest", Some("guest"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let list: Vec<Value> = res.error_for_status().ok()?.json().await.ok()?;
    Some(
        list.iter()
            .filter_map(|c| {
                let name = c["user_provided_name"].as_str()?;
                let service = name.split(' ').next()?.to_owned();
                Some((service, c["node"].as_str()?.to_owned()))
            })
            .collect(),
    )
}

/// Which way a node goes down.
#[derive(Debug, Clone, Copy)]
enum Down {
    Stop,
    Kill,
}

/// What one outage took.
#[derive(Debug)]
struct Outage {
    down: Down,
    node: usize,
    /// The stop or kill itself.
    went_in: Duration,
    /// From the stop or kill until both services were ready on another node.
    moved_in: Duration,
    /// Starting the node again until it rejoined the cluster.
    rejoined_in: Duration,
}

impl Outage {
    fn describe(&self) -> String {
        format!(
            "{:?} node {} in {:?}, services ready elsewhere {:?} after, rejoined in {:?}",
            self.down, self.node, self.went_in, self.moved_in, self.rejoined_in
        )
    }
}

/// Takes down the node both services are connected to, checks that they move and
/// that events and commands flow with it down, brings it back, and checks again.
async fn outage(
    cluster: &Arc<Cluster>,
    services: (&Running, &Running),
    responder: &mut Responder,
    traffic: &Traffic,
    down: Down,
    lost_before: u64,
) -> Outage {
    let (relay, gateway) = services;
    let on = nodes_of(cluster, "both services on one node", |on| {
        on.iter().all(|(_, n)| *n == on[0].1)
    })
    .await;
    let node = (0..cluster.len())
        .find(|&i| on[0].1 == cluster.node_name(i))
        .expect("a node of the cluster");
    let name = cluster.node_name(node).to_owned();
    let going = Instant::now();
    match down {
        Down::Stop => on_cluster(cluster, "stopping a node", move |c| c.stop_node(node)).await,
        Down::Kill => on_cluster(cluster, "killing a node", move |c| c.kill_node(node)).await,
    }
    let went_in = going.elapsed();
    wait_reconnected(relay, "device-service", lost_before + 1, MOVE_WAIT).await;
    wait_reconnected(gateway, "websocket-service", lost_before + 1, MOVE_WAIT).await;
    let moved_in = going.elapsed();
    nodes_of(cluster, "both services listed on other nodes", |on| {
        !on.iter().any(|(_, n)| *n == name)
    })
    .await;
    let what = format!("with node {node} down ({down:?})");
    responder.commands_work(relay.addr, &what).await;
    traffic.wait_each_acked_more(15, MOVE_WAIT, &what).await;

    let starting = Instant::now();
    on_cluster(cluster, "starting the node again", move |c| {
        c.start_node(node)
    })
    .await;
    let rejoined_in = starting.elapsed();
    let what = format!("after node {node} rejoined");
    responder.commands_work(relay.addr, &what).await;
    traffic.wait_each_acked_more(15, MOVE_WAIT, &what).await;
    Outage {
        down,
        node,
        went_in,
        moved_in,
        rejoined_in,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_stopped_or_killed_during_traffic_lose_nothing_acked() {
    let started = Instant::now();
    let cluster = Arc::new(
        within(
            NODE_WAIT,
            "a three-node cluster",
            tokio::task::spawn_blocking(|| Cluster::start(3)),
        )
        .await
        .unwrap()
        .expect("a three-node cluster"),
    );
    let formed_in = started.elapsed();
    let urls = cluster.amqp_urls();
    let hive = HiveStandIn::start().await;
    let relay = start_relay(&urls, &hive.url(), &[]).await;
    let gateway = start_gateway(&urls, &[]).await;

    // Both services start on the first node of the list: that is the one to stop.
    let first = cluster.node_name(0).to_owned();
    let on = nodes_of(&cluster, "both services listed", |_| true).await;
    assert!(on.iter().all(|(_, node)| *node == first), "{on:?}");

    let mut responder = Responder::connect(gateway.addr).await;
    responder
        .commands_work(relay.addr, "before the outages")
        .await;
    let traffic = Traffic::start(gateway.addr, 8, Duration::from_millis(50), 5_000).await;
    traffic
        .wait_each_acked_more(15, WAIT, "before the outages")
        .await;
    let services = (&relay, &gateway);
    let stop = outage(&cluster, services, &mut responder, &traffic, Down::Stop, 0).await;
    assert_eq!(stop.node, 0);
    let kill = outage(&cluster, services, &mut responder, &traffic, Down::Kill, 1).await;

    let ledger = traffic.stop().await;
    let account = ledger.settle(&hive, Duration::from_secs(120)).await;
    println!(
        "cluster: formed in {formed_in:?}; {}; {}; {account:?}; frames {} (nacks {:?}); \
         drill took {:?}",
        stop.describe(),
        kill.describe(),
        ledger.frames,
        ledger.nacks,
        started.elapsed()
    );
    assert_eq!(account.lost, 0, "{account:?}");
    drop(responder);
    for service in [relay, gateway] {
        service.terminate();
        service.assert_exits_cleanly().await;
    }
    on_cluster(&cluster, "stopping the cluster", |c| {
        c.stop();
        Ok(())
    })
    .await;
}
