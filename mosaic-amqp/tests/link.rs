//! The supervised link against a real RabbitMQ: whole links only, re-declared topology,
//! reconnects after cuts and channel errors, several nodes, and the shutdown steps.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use mosaic_amqp::{Amqp, Consume, Incoming, Link, Plan, Publish, PublishError, Routed, Settings};
use mosaic_tests::{FaultProxy, broker, within};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);
const T: Duration = Duration::from_secs(5);

fn settings(urls: Vec<String>) -> Settings {
    Settings {
        urls,
        service: "link-test",
        id: uuid::Uuid::new_v4().simple().to_string(),
        connect_timeout: Duration::from_secs(5),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(200),
        close_timeout: Duration::from_secs(1),
    }
}

/// Proxy URL: the vhost URL with the broker's address replaced by the proxy's.
fn via(proxy: &FaultProxy, vhost_url: &str) -> String {
    vhost_url.replace(&broker().amqp_addr().to_string(), &proxy.addr().to_string())
}

/// A link that declares an exclusive queue `q` and consumes it; counts topology runs.
fn start(urls: Vec<String>, q: &str, runs: Arc<AtomicUsize>) -> (Amqp, mpsc::Receiver<Incoming>) {
    let queue = q.to_owned();
    let plan = Plan {
        publishers: 2,
        consumers: vec![Consume {
            queue: ShortString::from(q),
            tag: ShortString::from(format!("{q}-consumer")),
            prefetch: 16,
            no_ack: false,
            exclusive: true,
            buffer: 16,
            arguments: FieldTable::default(),
        }],
    };
    let (amqp, mut rx) = Amqp::start(settings(urls), plan, move |ch| {
        let queue = queue.clone();
        let runs = runs.clone();
        async move {
            ch.queue_declare(
                ShortString::from(queue),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    (amqp, rx.remove(0))
}

async fn up(amqp: &Amqp, after: u64) -> Arc<Link> {
    let mut w = amqp.watch();
    let l = within(
        WAIT,
        "a whole link",
        w.wait_for(|l| l.as_ref().is_some_and(|l| l.generation() > after)),
    )
    .await
    .unwrap();
    l.clone().unwrap()
}

fn to_queue(q: &str, body: &[u8]) -> Publish {
    Publish {
        exchange: "",
        routing_key: q.to_owned(),
        mandatory: true,
        properties: BasicProperties::default(),
        body: body.to_vec(),
    }
}

async fn next(rx: &mut mpsc::Receiver<Incoming>) -> Incoming {
    within(WAIT, "a delivery", rx.recv()).await.expect("open")
}

#[tokio::test]
async fn a_link_publishes_consumes_and_comes_back_after_a_cut() {
    let vhost = broker().vhost("link-cut").await;
    let proxy = FaultProxy::start(broker().amqp_addr()).await.unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (amqp, mut rx) = start(vec![via(&proxy, &vhost.amqp_url)], "q.cut", runs.clone());
    let link = up(&amqp, 0).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(link.can_publish());

    // Routed and returned, both confirmed.
    let r = link.publish(0, to_queue("q.cut", b"1"), T).await.unwrap();
    assert_eq!(r, Routed::Yes);
    let r = link.publish(1, to_queue("nowhere", b"x"), T).await.unwrap();
    assert_eq!(r, Routed::Returned);
    let d = next(&mut rx).await;
    assert_eq!(d.delivery.data, b"1");
    assert_eq!(d.link.generation(), link.generation());
    d.delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .unwrap();

    // A cut: the link is withdrawn, marked lost, and a new one is built, its
    // topology declared again (the exclusive queue went with the old connection).
    proxy.cut();
    within(
        WAIT,
        "the old link to be marked lost",
        link.lost().cancelled(),
    )
    .await;
    assert!(!link.can_publish());
    let again = up(&amqp, link.generation()).await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let r = again.publish(0, to_queue("q.cut", b"2"), T).await.unwrap();
    assert_eq!(r, Routed::Yes);
    let d = next(&mut rx).await;
    assert_eq!(d.delivery.data, b"2");
    assert!(!d.is_stale());
    amqp.shutdown().await;
    assert!(amqp.link().is_none());
}

#[tokio::test]
async fn a_channel_error_replaces_the_whole_link() {
    let vhost = broker().vhost("link-channel").await;
    let runs = Arc::new(AtomicUsize::new(0));
    let (amqp, _rx) = start(vec![vhost.amqp_url.clone()], "q.chan", runs.clone());
    let link = up(&amqp, 0).await;
    // Publishing to an exchange that does not exist closes that channel (404).
    let bad = Publish {
        exchange: "no-such-exchange",
        ..to_queue("q.chan", b"x")
    };
    assert!(link.publish(1, bad, T).await.is_err());
    within(WAIT, "the link to be given up", link.lost().cancelled()).await;
    let again = up(&amqp, link.generation()).await;
    assert!(again.is_open());
    assert_eq!(
        again.publish(1, to_queue("q.chan", b"y"), T).await.unwrap(),
        Routed::Yes
    );
    amqp.shutdown().await;
}

/// A channel opened outside the link's set may be closed by the broker (here: an
/// exclusive queue another connection holds, 405 RESOURCE_LOCKED) without the link
/// being given up.
#[tokio::test]
async fn an_error_on_a_channel_outside_the_set_leaves_the_link_whole() {
    let vhost = broker().vhost("link-outside").await;
    let (a, _rxa) = start(vec![vhost.amqp_url.clone()], "q.held", Arc::default());
    let (b, _rxb) = start(vec![vhost.amqp_url.clone()], "q.other", Arc::default());
    let _la = up(&a, 0).await;
    let lb = up(&b, 0).await;
    let ch = lb.open_channel().await.unwrap();
    let refused = ch
        .queue_declare(
            ShortString::from("q.held"),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(refused.is_err(), "another connection holds q.held");
    // The supervisor checks every 250 ms; give it a few rounds.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!lb.lost().is_cancelled(), "the link was given up");
    assert_eq!(b.link().unwrap().generation(), lb.generation());
    assert_eq!(
        lb.publish(0, to_queue("q.other", b"z"), T).await.unwrap(),
        Routed::Yes
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_node_is_skipped_for_the_next() {
    let vhost = broker().vhost("link-nodes").await;
    let [dead] = mosaic_tests::broker::free_ports::<1>().unwrap();
    let dead_url = vhost
        .amqp_url
        .replace(&broker().amqp_addr().port().to_string(), &dead.to_string());
    let runs = Arc::new(AtomicUsize::new(0));
    let (amqp, _rx) = start(vec![dead_url, vhost.amqp_url.clone()], "q.nodes", runs);
    let link = up(&amqp, 0).await;
    assert!(link.can_publish());
    amqp.shutdown().await;
}

#[tokio::test]
async fn headers_past_the_frame_are_refused_unsent_and_the_link_survives() {
    let vhost = broker().vhost("link-headers").await;
    let runs = Arc::new(AtomicUsize::new(0));
    let (amqp, mut rx) = start(vec![vhost.amqp_url.clone()], "q.big", runs);
    let link = up(&amqp, 0).await;
    let mut t = FieldTable::default();
    let big = "v".repeat(link.max_headers_bytes());
    t.insert("big".into(), AMQPValue::LongString(LongString::from(big)));
    let m = Publish {
        properties: BasicProperties::default().with_headers(t),
        ..to_queue("q.big", b"x")
    };
    match link.publish(0, m, T).await {
        Err(PublishError::HeadersTooLarge { bytes, max }) => assert!(bytes > max),
        other => panic!("expected HeadersTooLarge, got {other:?}"),
    }
    // The connection is intact: the next message goes through on the same link.
    assert_eq!(
        link.publish(0, to_queue("q.big", b"ok"), T).await.unwrap(),
        Routed::Yes
    );
    assert_eq!(next(&mut rx).await.delivery.data, b"ok");
    assert!(!link.lost().is_cancelled());
    amqp.shutdown().await;
}

#[tokio::test]
async fn cancelled_consumers_take_no_more_deliveries() {
    let vhost = broker().vhost("link-cancel").await;
    let runs = Arc::new(AtomicUsize::new(0));
    let (amqp, mut rx) = start(vec![vhost.amqp_url.clone()], "q.cancel", runs);
    let link = up(&amqp, 0).await;
    amqp.cancel_consumers().await;
    link.publish(0, to_queue("q.cancel", b"later"), T)
        .await
        .unwrap();
    // The message waits in the queue instead of going to the cancelled consumer, and
    // the link stays whole (a consumer we cancelled is not a failure).
    let got = link
        .channel(0)
        .basic_get("q.cancel".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the message is still in the queue");
    assert_eq!(got.delivery.data, b"later");
    assert!(rx.try_recv().is_err());
    assert!(link.can_publish() && !link.lost().is_cancelled());
    amqp.shutdown().await;
    within(WAIT, "the link to close", link.lost().cancelled()).await;
}

/// A channel whose every publish RabbitMQ refuses (negative confirms, for
/// `REFUSED_FOR` and at least `REFUSED_AT_LEAST` times) fails its link, which is
/// replaced; a refusal now and then among confirmed publishes does not.
#[tokio::test]
async fn a_channel_refusing_every_publish_replaces_the_link() {
    let vhost = broker().vhost("link-refused").await;
    let runs = Arc::new(AtomicUsize::new(0));
    let (amqp, _rx) = start(vec![vhost.amqp_url.clone()], "q.refused", runs);
    let link = up(&amqp, 0).await;
    // A queue that is always full and refuses what does not fit.
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    link.channel(0)
        .queue_declare("q.full".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();

    // Refusals on channel 1 between confirmed publishes: the link stays.
    for _ in 0..mosaic_amqp::REFUSED_AT_LEAST * 2 {
        assert!(matches!(
            link.publish(1, to_queue("q.full", b"x"), T).await,
            Err(PublishError::Nacked)
        ));
        assert_eq!(
            link.publish(1, to_queue("q.refused", b"y"), T)
                .await
                .unwrap(),
            Routed::Yes
        );
    }
    // Nothing but refusals on channel 0 (channel 1 still confirms): replaced after
    // REFUSED_FOR.
    let first = std::time::Instant::now();
    let mut refused = 0;
    loop {
        assert!(
            first.elapsed() < mosaic_amqp::REFUSED_FOR + T,
            "still whole after {refused} refusals"
        );
        match link.publish(0, to_queue("q.full", b"x"), T).await {
            Err(PublishError::Nacked) => refused += 1,
            other => panic!("expected a refusal, got {other:?}"),
        }
        if link.refused_all() {
            break;
        }
        assert_eq!(
            link.publish(1, to_queue("q.refused", b"y"), T)
                .await
                .unwrap(),
            Routed::Yes
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(first.elapsed() >= mosaic_amqp::REFUSED_FOR);
    assert!(!link.can_publish());
    within(WAIT, "the link to be given up", link.lost().cancelled()).await;
    let again = up(&amqp, link.generation()).await;
    assert!(again.can_publish());
    amqp.shutdown().await;
}

/// A delivery acked on its live link is acked; one whose link a cut took away is
/// not, and the ack says so at once instead of waiting on a dead connection (a loop
/// that acks one delivery before taking the next would stop there).
#[tokio::test]
async fn an_ack_on_a_lost_link_gives_up_at_once() {
    let vhost = broker().vhost("link-ack").await;
    let proxy = FaultProxy::start(broker().amqp_addr()).await.unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (amqp, mut rx) = start(vec![via(&proxy, &vhost.amqp_url)], "q.ack", runs);
    let link = up(&amqp, 0).await;
    for body in [b"1", b"2"] {
        let r = link.publish(0, to_queue("q.ack", body), T).await.unwrap();
        assert_eq!(r, Routed::Yes);
    }
    let first = next(&mut rx).await;
    let second = next(&mut rx).await;
    assert!(within(WAIT, "an ack on a live link", first.ack()).await);

    proxy.cut();
    within(WAIT, "the link to be marked lost", link.lost().cancelled()).await;
    assert!(second.is_stale());
    let started = std::time::Instant::now();
    assert!(!within(WAIT, "an ack on a lost link", second.ack()).await);
    assert!(started.elapsed() < mosaic_amqp::ACK_TIMEOUT);
    amqp.shutdown().await;
}

/// RabbitMQ's `basic.return` names no delivery tag, and the client library as
/// published hands each return to whichever confirm it completes next (about 26 in
/// 400 swapped here): with routable and unroutable `mandatory` publishes in flight
/// on one channel, a return must still reach the publish it belongs to (a device
/// online must not look offline, an event no queue took must not be acked). The
/// workspace builds a patched client library (vendor/lapin/PATCHED.md).
#[tokio::test]
async fn each_return_reaches_its_own_publish_with_many_in_flight() {
    let vhost = broker().vhost("link-returns").await;
    let runs = Arc::new(AtomicUsize::new(0));
    let (amqp, _rx) = start(vec![vhost.amqp_url.clone()], "q.returns", runs);
    let link = up(&amqp, 0).await;
    for round in 0..5 {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..400usize {
            let link = link.clone();
            // Some routable, some not, in an irregular pattern.
            let routable = (i * 7 + round) % 3 != 0;
            let body = format!("{round}-{i}").into_bytes();
            let m = if routable {
                to_queue("q.returns", &body)
            } else {
                to_queue(&format!("nowhere.{i}"), &body)
            };
            tasks.spawn(async move { (i, routable, link.publish(0, m, T).await) });
        }
        let mut wrong = Vec::new();
        while let Some(r) = tasks.join_next().await {
            let (i, routable, r) = r.unwrap();
            let want = if routable {
                Routed::Yes
            } else {
                Routed::Returned
            };
            if r.as_ref().ok() != Some(&want) {
                wrong.push((i, routable, r));
            }
        }
        assert!(
            wrong.is_empty(),
            "round {round}: {} misattributed, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
    }
}
