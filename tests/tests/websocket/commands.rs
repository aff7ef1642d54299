//! RabbitMQ -> device: events, broadcast, requests and responses, takeover.

use mosaic_tests::device::{Device, Ended};
use mosaic_tests::{broker, eventually, within};
use serde_json::json;

use crate::{Gateway, Hive, Observer, WAIT, command_bindings, device};

#[tokio::test]
async fn commands_reach_only_their_device_and_broadcast_reaches_all() {
    let vh = broker().vhost("ws-cmd").await;
    let gw = Gateway::start(&vh.amqp_url, &[]).await;
    let hive = Hive::new(&vh.amqp_url).await;
    let (a, ta) = device();
    let (_b, tb) = device();
    let (mut da, _) = Device::connect(gw.addr, &ta).await;
    let (mut db, _) = Device::connect(gw.addr, &tb).await;

    let id = hive.event(a, "reboot", json!({"in": 5})).await;
    let f = da.recv().await;
    assert_eq!(
        f,
        json!({"type":"event","id":id,"name":"reboot","data":{"in":5}})
    );

    let headers = json!({"kind":"event","id":"b-1","name":"notice","prio":3});
    hive.publish("broadcast", headers, json!("hi"), Default::default())
        .await;
    for d in [&mut da, &mut db] {
        let f = d.recv().await;
        assert_eq!(
            f,
            json!({"type":"event","id":"b-1","name":"notice","prio":3,"data":"hi"})
        );
    }
    // `a` got nothing else: its next frame is the answer to a probe event.
    da.send(&json!({"type":"event","name":"probe","id":"p"}))
        .await;
    assert_eq!(da.recv().await, json!({"type":"ack","id":"p"}));
    gw.stop().await;
}

#[tokio::test]
async fn a_request_is_answered_once_to_its_requester() {
    let vh = broker().vhost("ws-req").await;
    let gw = Gateway::start(&vh.amqp_url, &[]).await;
    let mut hive = Hive::new(&vh.amqp_url).await;
    let (dev, tok) = device();
    let (mut d, welcome) = Device::connect(gw.addr, &tok).await;

    let id = hive.request(dev, "read", json!({"reg": 1}), 10_000).await;
    let f = d.recv().await;
    assert_eq!(f["type"], "request");
    assert_eq!(f["id"], id);
    assert_eq!(f["name"], "read");
    assert_eq!(f["data"], json!({"reg": 1}));
    assert!(f["deadline"].as_str().is_some());

    d.send(&json!({"type":"response","request_id":id,"status":"ok","data":{"v":42}}))
        .await;
    let r = hive.reply().await;
    assert_eq!(r.props.correlation_id().as_ref().unwrap().as_str(), id);
    assert_eq!(r.headers["kind"], "response");
    assert_eq!(r.headers["status"], "ok");
    assert_eq!(r.headers["device"], dev.to_string());
    assert_eq!(r.headers["session"], welcome["session"]);
    assert_eq!(r.body, json!({"v":42}));

    // Twice, or for a request never sent: unknown_request.
    d.send(&json!({"type":"response","request_id":id,"status":"ok"}))
        .await;
    assert_eq!(d.recv().await["code"], "unknown_request");
    d.send(&json!({"type":"response","request_id":"made-up","status":"ok"}))
        .await;
    assert_eq!(d.recv().await["code"], "unknown_request");

    // After its deadline: unknown_request, and nothing reaches the requester.
    let late = hive.request(dev, "slow", json!(null), 300).await;
    assert_eq!(d.recv().await["id"], late);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    d.send(&json!({"type":"response","request_id":late,"status":"ok"}))
        .await;
    assert_eq!(d.recv().await["code"], "unknown_request");

    // Pending when the device leaves: the requester learns at once.
    let id = hive.request(dev, "never", json!(null), 60_000).await;
    assert_eq!(d.recv().await["id"], id);
    d.close().await;
    let r = hive.reply().await;
    assert_eq!(r.props.correlation_id().as_ref().unwrap().as_str(), id);
    assert_eq!(r.headers["kind"], "undeliverable");
    assert_eq!(r.headers["reason"], "device_disconnected");
    gw.stop().await;
}

#[tokio::test]
async fn bindings_follow_connected_devices() {
    let vh = broker().vhost("ws-bind").await;
    let gw = Gateway::start(&vh.amqp_url, &[]).await;
    let (dev, tok) = device();
    let key = format!("device.{dev}");
    let (d, _) = Device::connect(gw.addr, &tok).await;
    let keys = command_bindings(&vh.name).await;
    assert!(keys.contains(&key), "{keys:?}");
    assert!(keys.contains(&"broadcast".to_owned()), "{keys:?}");
    d.close().await;
    eventually(WAIT, "the device binding to go", || async {
        (!command_bindings(&vh.name).await.contains(&key)).then_some(())
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_new_connection_replaces_the_old_on_the_same_replica() {
    let vh = broker().vhost("ws-replace").await;
    let gw = Gateway::start(&vh.amqp_url, &[]).await;
    let mut life = Observer::bind(&vh.amqp_url, "mosaic.events", "lifecycle.*.disconnected").await;
    let hive = Hive::new(&vh.amqp_url).await;
    let (dev, tok) = device();
    let (mut old, _) = Device::connect(gw.addr, &tok).await;
    let (mut new, _) = Device::connect(gw.addr, &tok).await;
    let (_, ended) = old.ended_within(WAIT).await;
    assert_eq!(ended, Ended::Close(4409, "replaced".into()));
    assert_eq!(life.next().await.headers["reason"], "replaced");
    // The new session still receives commands (the old one did not unbind it).
    let id = hive.event(dev, "hello", json!(1)).await;
    assert_eq!(new.recv().await["id"], id);
    gw.stop().await;
}

#[tokio::test]
async fn two_replicas_route_commands_and_the_newest_session_wins() {
    let vh = broker().vhost("ws-two").await;
    let a = Gateway::start(&vh.amqp_url, &[]).await;
    let b = Gateway::start(&vh.amqp_url, &[]).await;
    let mut life = Observer::bind(&vh.amqp_url, "mosaic.events", "lifecycle.*.disconnected").await;
    let hive = Hive::new(&vh.amqp_url).await;
    let (dev, tok) = device();
    let (mut on_b, wb) = Device::connect(b.addr, &tok).await;
    let (other, to) = device();
    let (mut other_on_a, _) = Device::connect(a.addr, &to).await;

    let id = hive.event(dev, "to-b", json!("x")).await;
    assert_eq!(on_b.recv().await["id"], id);
    let id2 = hive.event(other, "to-a", json!("y")).await;
    assert_eq!(other_on_a.recv().await["id"], id2);

    // Reconnect to A: B's session is replaced with 4409.
    let (mut on_a, wa) = Device::connect(a.addr, &tok).await;
    let (_, ended) = on_b.ended_within(WAIT).await;
    assert_eq!(ended, Ended::Close(4409, "replaced".into()));
    let g = life.next().await;
    assert_eq!(g.headers["reason"], "replaced");
    assert_eq!(g.headers["session"], wb["session"]);
    assert_ne!(wa["session"], wb["session"]);
    // Commands now reach A only, once.
    let id3 = hive.event(dev, "to-a-now", json!("z")).await;
    assert_eq!(on_a.recv().await["id"], id3);
    on_a.send(&json!({"type":"event","name":"probe","id":"p"}))
        .await;
    assert_eq!(on_a.recv().await, json!({"type":"ack","id":"p"}));
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn takeover_notices_settle_who_holds_a_device() {
    let vh = broker().vhost("ws-takeover").await;
    let gw = Gateway::start(&vh.amqp_url, &[]).await;
    let hive = Hive::new(&vh.amqp_url).await;
    let older = uuid::Uuid::now_v7();
    let (dev, tok) = device();
    let mut notices = Observer::bind(
        &vh.amqp_url,
        "mosaic.commands.devices",
        &format!("device.{dev}"),
    )
    .await;
    let (mut d, welcome) = Device::connect(gw.addr, &tok).await;
    let own = notices.next().await;
    assert_eq!(own.headers["kind"], "takeover");
    assert_eq!(own.headers["session"], welcome["session"]);
    let gateway = own.headers["gateway"].clone();

    // An older session elsewhere announces itself late: this gateway answers with its
    // own notice, so the other one closes.
    let elsewhere = uuid::Uuid::new_v4().to_string();
    let notice = |session: uuid::Uuid| json!({"kind":"takeover","device":dev.to_string(),"session":session.to_string(),"gateway":elsewhere});
    hive.publish(
        &format!("device.{dev}"),
        notice(older),
        json!(null),
        Default::default(),
    )
    .await;
    notices.next().await; // the notice just published
    let again = notices.next().await;
    assert_eq!(again.headers["session"], welcome["session"]);
    assert_eq!(again.headers["gateway"], gateway);

    // A newer session elsewhere: this one is replaced.
    hive.publish(
        &format!("device.{dev}"),
        notice(uuid::Uuid::now_v7()),
        json!(null),
        Default::default(),
    )
    .await;
    let (_, ended) = d.ended_within(WAIT).await;
    assert_eq!(ended, Ended::Close(4409, "replaced".into()));
    gw.stop().await;
}

/// A request that reaches a replica which does not hold its device (the device left,
/// or moved, after the request was routed) is answered `undeliverable`
/// `device_not_connected` on its `reply_to`.
///
/// The request goes straight into the replica's queue through the default exchange.
/// The queue is named in the `CC` header (sender-selected distribution) while the
/// routing key stays `device.<id>`: RabbitMQ delivers it with that routing key, as a
/// replica receives it from `mosaic.commands`, but no binding of the device is needed.
#[tokio::test]
async fn a_request_reaching_a_replica_without_its_device_is_not_connected() {
    use lapin::BasicProperties;
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};

    let vh = broker().vhost("ws-not-connected").await;
    let gateway = uuid::Uuid::new_v4();
    let gw = Gateway::start(&vh.amqp_url, &[("GATEWAY_ID", &gateway.to_string())]).await;
    let mut hive = Hive::new(&vh.amqp_url).await;
    let dev = uuid::Uuid::new_v4(); // never connects

    let id = uuid::Uuid::new_v4().to_string();
    let deadline = time::OffsetDateTime::now_utc() + std::time::Duration::from_secs(30);
    let deadline = deadline
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let headers = json!({
        "kind": "request", "id": id, "name": "read", "deadline": deadline,
        "CC": [format!("mosaic.gateway.{gateway}")],
    });
    let props = BasicProperties::default()
        .with_reply_to(hive.reply_queue().clone())
        .with_correlation_id(id.clone().into())
        .with_headers(amqp_value_json::to_field_table(headers.as_object().unwrap()).unwrap());
    let ch = hive.0.conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = within(
        WAIT,
        "the publish to be confirmed",
        ch.basic_publish(
            "".into(),
            format!("device.{dev}").as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            br#"{"reg":1}"#,
            props,
        )
        .await
        .unwrap(),
    )
    .await
    .unwrap();
    assert!(confirm.is_ack(), "the broker refused the request");
    assert!(
        confirm.take_message().is_none(),
        "the replica queue mosaic.gateway.{gateway} did not take the request"
    );

    let r = hive.reply().await;
    assert_eq!(r.routing_key, hive.reply_queue().as_str());
    assert_eq!(r.props.correlation_id().as_ref().unwrap().as_str(), id);
    assert_eq!(r.headers["kind"], "undeliverable");
    assert_eq!(r.headers["reason"], "device_not_connected");
    assert_eq!(r.headers["device"], dev.to_string());
    assert_eq!(r.headers["gateway"], gateway.to_string());
    gw.stop().await;
}

/// Publishes an event for `device` to `mosaic.commands`, `mandatory`, as
/// device-service does; true when the broker returned it (no queue took it).
async fn returned(hive: &Hive, device: uuid::Uuid) -> bool {
    let headers = json!({"kind": "event", "id": uuid::Uuid::new_v4().to_string(), "name": "probe"});
    let table = amqp_value_json::to_field_table(headers.as_object().unwrap()).unwrap();
    let confirm = hive
        .0
        .ch
        .basic_publish(
            "mosaic.commands".into(),
            format!("device.{device}").as_str().into(),
            lapin::options::BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"1",
            lapin::BasicProperties::default().with_headers(table),
        )
        .await
        .unwrap();
    let confirmed = within(WAIT, "a publisher confirm", confirm).await.unwrap();
    assert!(confirmed.is_ack(), "the broker refused a command");
    confirmed.take_message().is_some()
}

/// Device bindings live on the direct exchange behind `mosaic.commands`: a
/// `mandatory` command still comes back when no queue at the end of that chain takes
/// it, and reaches the device (not returned) while its gateway holds it.
#[tokio::test]
async fn mandatory_commands_are_returned_through_the_device_exchange() {
    let vh = broker().vhost("ws-mandatory").await;
    let gw = Gateway::start(&vh.amqp_url, &[]).await;
    let hive = Hive::new(&vh.amqp_url).await;
    let e2e = broker()
        .mgmt_get(&format!(
            "/api/exchanges/{}/mosaic.commands/bindings/source",
            vh.name
        ))
        .await;
    let forwards = e2e.as_array().into_iter().flatten().any(|b| {
        b["destination"] == "mosaic.commands.devices"
            && b["destination_type"] == "exchange"
            && b["routing_key"] == "device.*"
    });
    assert!(
        forwards,
        "no device.* binding to the device exchange: {e2e}"
    );

    let (dev, tok) = device();
    // The exchange-to-exchange binding matches, but no queue is bound for the device.
    assert!(
        returned(&hive, dev).await,
        "a command for an offline device was routed"
    );
    let (mut d, _) = Device::connect(gw.addr, &tok).await;
    assert!(
        !returned(&hive, dev).await,
        "a command for a connected device came back"
    );
    let f = d.recv().await;
    assert_eq!(
        (f["type"].clone(), f["name"].clone()),
        (json!("event"), json!("probe")),
        "{f}"
    );
    d.close().await;
    eventually(
        WAIT,
        "commands for the departed device to come back",
        || async { returned(&hive, dev).await.then_some(()) },
    )
    .await;
    gw.stop().await;
}
