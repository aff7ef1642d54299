//! The three-node cluster: it forms, a quorum queue spans it, it keeps serving with a
//! node down, and a node that comes back (after a clean stop or a hard kill) rejoins.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use mosaic_tests::{Cluster, eventually, within};
use serde_json::Value;
use tokio::task::block_in_place;

use crate::{WAIT, assert_nothing_left};

async fn channel(url: &str) -> (Connection, Channel) {
    let conn = within(
        WAIT,
        "an AMQP connection",
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .expect("connect");
    let ch = conn.create_channel().await.expect("a channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    (conn, ch)
}

/// The quorum queue's members and online members, from node `via`'s management API.
async fn members(cluster: &Cluster, via: usize, queue: &str) -> Option<(usize, usize)> {
    let res = reqwest::Client::new()
        .get(format!("{}/api/queues/%2F/{queue}", cluster.mgmt_url(via)))
        .basic_auth("guest", Some("guest"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let q: Value = res.error_for_status().ok()?.json().await.ok()?;
    let count = |k: &str| q[k].as_array().map(Vec::len);
    Some((count("members")?, count("online")?))
}

async fn publish_confirmed(ch: &Channel, queue: &str, bodies: &[String]) {
    for body in bodies {
        let confirm = within(
            WAIT,
            "a publisher confirm",
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish"),
        )
        .await
        .expect("a confirmation");
        assert!(confirm.is_ack(), "{body} was not confirmed: {confirm:?}");
    }
}

/// Consumes `n` messages from `queue` through a connection of its own to `url`.
async fn consume(url: &str, queue: &str, n: usize) -> Vec<String> {
    let (conn, ch) = channel(url).await;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut got = Vec::new();
    while got.len() < n {
        let d = within(WAIT, "a delivery", consumer.next())
            .await
            .expect("the consumer is open")
            .expect("a delivery");
        d.ack(BasicAckOptions::default()).await.expect("ack");
        got.push(String::from_utf8(d.data).expect("UTF-8"));
    }
    conn.close(200, "done".into()).await.expect("close");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_form_keep_serving_and_rejoin() {
    let started = Instant::now();
    let cluster = block_in_place(|| Cluster::start(3)).expect("a three-node cluster");
    println!("cluster of 3 running in {:?}", started.elapsed());
    let dir = cluster.dir().to_owned();

    // Formed: every node reports all three running.
    for i in 0..3 {
        let mut running = cluster.running_nodes(i).expect("management API answers");
        running.sort();
        let mut want: Vec<String> = (0..3).map(|n| cluster.node_name(n).to_owned()).collect();
        want.sort();
        assert_eq!(running, want, "node {i}'s view of the cluster");
    }
    assert_eq!(cluster.amqp_urls().split(',').count(), 3);
    let status = block_in_place(|| cluster.ctl(0, &["cluster_status", "--formatter", "json"]))
        .expect("rabbitmqctl cluster_status");
    let status: Value = serde_json::from_str(&status).expect("JSON status");
    assert_eq!(status["running_nodes"].as_array().map(Vec::len), Some(3));

    // A quorum queue declared through node 0 has a member on each node.
    let queue = format!("harness-qq-{}", uuid::Uuid::new_v4().simple());
    let (_c0, ch0) = channel(&cluster.amqp_url(0)).await;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    ch0.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("a quorum queue");
    let all_online = eventually(WAIT, "three online members", || async {
        members(&cluster, 0, &queue)
            .await
            .filter(|&(m, o)| m == 3 && o == 3)
    })
    .await;
    assert_eq!(all_online, (3, 3));

    // Node 1 stopped cleanly: publishes through node 0 are still confirmed, and a
    // consumer on node 2 gets them.
    let stopping = Instant::now();
    block_in_place(|| cluster.stop_node(1)).expect("stop node 1");
    println!("node 1 stopped cleanly in {:?}", stopping.elapsed());
    eventually(WAIT, "node 1 reported down", || async {
        cluster
            .running_nodes(0)
            .filter(|r| r.len() == 2 && !r.iter().any(|n| n == cluster.node_name(1)))
    })
    .await;
    let first: Vec<String> = (0..20).map(|i| format!("while-stopped-{i}")).collect();
    publish_confirmed(&ch0, &queue, &first).await;
    assert_eq!(
        consume(&cluster.amqp_url(2), &queue, first.len()).await,
        first
    );

    // It comes back on the same data directory and rejoins.
    let restarting = Instant::now();
    block_in_place(|| cluster.start_node(1)).expect("node 1 rejoins");
    println!(
        "node 1 back after a clean stop in {:?}",
        restarting.elapsed()
    );
    eventually(WAIT, "node 1's queue member online again", || async {
        members(&cluster, 1, &queue)
            .await
            .filter(|&(m, o)| m == 3 && o == 3)
    })
    .await;

    // Node 1 killed hard: the same holds, and it rejoins again.
    let killing = Instant::now();
    block_in_place(|| cluster.kill_node(1)).expect("kill node 1");
    println!("node 1 killed in {:?}", killing.elapsed());
    let second: Vec<String> = (0..20).map(|i| format!("while-killed-{i}")).collect();
    publish_confirmed(&ch0, &queue, &second).await;
    assert_eq!(
        consume(&cluster.amqp_url(2), &queue, second.len()).await,
        second
    );
    let restarted = Instant::now();
    block_in_place(|| cluster.start_node(1)).expect("node 1 rejoins after a kill");
    println!("node 1 back after a kill in {:?}", restarted.elapsed());
    let mut running = cluster.running_nodes(1).expect("node 1's management API");
    running.sort();
    assert_eq!(
        running.len(),
        3,
        "node 1's view after rejoining: {running:?}"
    );
    // Node 1 serves the queue again: a publish through it is confirmed.
    let (_c1, ch1) = channel(&cluster.amqp_url(1)).await;
    publish_confirmed(&ch1, &queue, &["through-node-1".to_owned()]).await;

    // Stopping the cluster leaves nothing behind.
    block_in_place(|| cluster.stop());
    assert_nothing_left(&dir).await;
}

/// The process that owns a cluster dies by SIGKILL: the watchdog still stops every
/// node and epmd and removes the directories.
#[tokio::test]
async fn a_cluster_stops_when_its_owner_is_killed() {
    let (mut child, dir) = crate::spawn_owner("cluster::cluster_owner").await;
    child.kill().await.expect("SIGKILL the owner");
    child.wait().await.expect("reap the owner");
    assert_nothing_left(&dir).await;
}

/// Run by [`a_cluster_stops_when_its_owner_is_killed`] in a child process: starts a
/// one-node cluster, prints its directory, and waits to be killed.
#[test]
#[ignore = "a child process of a_cluster_stops_when_its_owner_is_killed"]
fn cluster_owner() {
    if !crate::is_owner_child() {
        return;
    }
    let cluster = Cluster::start(1).expect("a one-node cluster");
    crate::announce_and_wait(cluster.dir());
}
