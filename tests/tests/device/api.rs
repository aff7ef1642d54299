//! The REST API against the real broker, with a gateway played by plain lapin.

use std::time::Duration;

use mosaic_tests::broker;
use mosaic_tests::hive::HiveStandIn;
use mosaic_tests::within;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{Gateway, Service, TOKEN};

#[tokio::test]
async fn events_reach_the_gateway_or_answer_404() {
    let vhost = broker().vhost("api-events").await;
    let hive = HiveStandIn::start().await;
    let svc = Service::start(&vhost.amqp_url, &hive.url(), &[]).await;
    let device = Uuid::now_v7();
    let mut gw = Gateway::hold(&vhost.amqp_url, &[device], true).await;

    let body = json!({"name": "reboot", "data": {"in": [1, 2.5, null]}, "priority": 3, "meta": {"by": "ops"}});
    let (status, answer) = svc
        .post(&format!("/v1/devices/{device}/events"), &body)
        .await;
    assert_eq!(status, 202, "{answer}");
    let id = answer["id"].as_str().expect("an id");
    Uuid::parse_str(id).unwrap();
    let (headers, data, props) = gw.next().await;
    assert_eq!(headers["kind"], "event");
    assert_eq!(headers["id"], json!(id));
    assert_eq!(headers["name"], "reboot");
    assert_eq!(headers["priority"], 3);
    assert_eq!(headers["meta"], json!({"by": "ops"}));
    assert!(headers.get("data").is_none());
    assert_eq!(data, json!({"in": [1, 2.5, null]}));
    assert!(props.reply_to().is_none());

    // No gateway holds this one.
    let (status, answer) = svc
        .post(
            &format!("/v1/devices/{}/events", Uuid::now_v7()),
            &json!({"name": "x"}),
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(answer["error"]["code"], "device_not_connected");

    // Broadcast reaches the gateway through the `broadcast` key.
    let (status, answer) = svc
        .post("/v1/broadcast/events", &json!({"name": "all", "data": 7}))
        .await;
    assert_eq!(status, 202, "{answer}");
    let (headers, data, _) = gw.next().await;
    assert_eq!(headers["name"], "all");
    assert_eq!(headers["id"], answer["id"]);
    assert_eq!(data, json!(7));

    // Reserved names and bad ids are refused before anything is published.
    let (status, answer) = svc
        .post(
            &format!("/v1/devices/{device}/events"),
            &json!({"name": "x", "deadline": "y"}),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (400, json!("reserved_field"))
    );
    let (status, answer) = svc
        .post("/v1/devices/not-a-uuid/events", &json!({"name": "x"}))
        .await;
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (400, json!("bad_device_id"))
    );
    svc.stop().await;
}

#[tokio::test]
async fn requests_are_answered_timed_out_or_cut_short() {
    let vhost = broker().vhost("api-requests").await;
    let hive = HiveStandIn::start().await;
    let svc = std::sync::Arc::new(Service::start(&vhost.amqp_url, &hive.url(), &[]).await);
    let device = Uuid::now_v7();
    let mut gw = Gateway::hold(&vhost.amqp_url, &[device], false).await;
    let path = format!("/v1/devices/{device}/requests");

    // Answered: 200 with the device's status and data.
    let call = tokio::spawn({
        let svc = svc.clone();
        let path = path.clone();
        async move {
            svc.post(
                &path,
                &json!({"name": "read", "data": {"reg": 4}, "timeout_ms": 20000, "unit": "V"}),
            )
            .await
        }
    });
    let (headers, data, props) = gw.next().await;
    assert_eq!(headers["kind"], "request");
    assert_eq!(headers["name"], "read");
    assert_eq!(headers["unit"], "V");
    assert_eq!(data, json!({"reg": 4}));
    let deadline = headers["deadline"].as_str().unwrap();
    time::OffsetDateTime::parse(deadline, &time::format_description::well_known::Rfc3339)
        .expect("deadline is RFC 3339");
    assert_eq!(
        props.expiration().as_ref().map(|e| e.as_str()),
        Some("20000")
    );
    assert_eq!(
        props.correlation_id().as_ref().map(|c| c.to_string()),
        headers["id"].as_str().map(str::to_owned)
    );
    assert!(
        props
            .reply_to()
            .as_ref()
            .unwrap()
            .as_str()
            .starts_with("mosaic.device-service.replies.")
    );
    gw.reply(
        &props,
        "response",
        json!({"status": "ok", "device": device.to_string()}),
        &json!({"volts": 3.3}),
    )
    .await;
    let (status, answer) = within(Duration::from_secs(10), "the answer", call)
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["id"], headers["id"]);
    assert_eq!(answer["status"], "ok");
    assert_eq!(answer["data"], json!({"volts": 3.3}));

    // No answer in time: 504.
    let (status, answer) = svc
        .post(&path, &json!({"name": "slow", "timeout_ms": 300}))
        .await;
    assert_eq!(status, 504, "{answer}");
    assert_eq!(answer["error"]["code"], "device_timeout");
    let _ = gw.next().await;

    // The gateway reports the device disconnected: 404 at once, long before the timeout.
    let call = tokio::spawn({
        let svc = svc.clone();
        let path = path.clone();
        async move {
            svc.post(&path, &json!({"name": "cut", "timeout_ms": 300000}))
                .await
        }
    });
    let (_, _, props) = gw.next().await;
    gw.reply(
        &props,
        "undeliverable",
        json!({"reason": "device_disconnected"}),
        &Value::Null,
    )
    .await;
    let (status, answer) = within(Duration::from_secs(10), "the 404", call)
        .await
        .unwrap();
    assert_eq!(status, 404, "{answer}");
    assert_eq!(answer["error"]["code"], "device_not_connected");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("device_disconnected")
    );

    // An error status from the device is passed on as it is.
    let call = tokio::spawn({
        let svc = svc.clone();
        let path = path.clone();
        async move { svc.post(&path, &json!({"name": "bad"})).await }
    });
    let (_, _, props) = gw.next().await;
    gw.reply(
        &props,
        "response",
        json!({"status": "error"}),
        &json!("no such register"),
    )
    .await;
    let (status, answer) = within(Duration::from_secs(10), "the answer", call)
        .await
        .unwrap();
    assert_eq!((status, answer["status"].clone()), (200, json!("error")));
    assert_eq!(answer["data"], "no such register");

    // No gateway holds the device: 404 at once.
    let (status, answer) = svc
        .post(
            &format!("/v1/devices/{}/requests", Uuid::now_v7()),
            &json!({"name": "x", "timeout_ms": 300000}),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (404, json!("device_not_connected"))
    );

    // timeout_ms outside 1..=300000.
    for t in [json!(0), json!(300001), json!(-1), json!("10")] {
        let (status, answer) = svc
            .post(&path, &json!({"name": "x", "timeout_ms": t}))
            .await;
        assert_eq!(status, 400, "timeout_ms {t}: {answer}");
    }
    std::sync::Arc::into_inner(svc).unwrap().stop().await;
}

#[tokio::test]
async fn auth_openapi_health_and_body_limits() {
    let vhost = broker().vhost("api-auth").await;
    let hive = HiveStandIn::start().await;
    let svc = Service::start(&vhost.amqp_url, &hive.url(), &[("MAX_BODY_BYTES", "1024")]).await;
    let http = reqwest::Client::new();
    let url = svc.url(&format!("/v1/devices/{}/events", Uuid::now_v7()));
    for auth in [
        None,
        Some("Bearer wrong-token-0123456789"),
        Some("Basic abc"),
        Some(TOKEN),
    ] {
        let mut req = http.post(&url).json(&json!({"name": "x"}));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 401, "{auth:?}");
        assert_eq!(res.headers()["www-authenticate"], "Bearer");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    let big = json!({"name": "x", "data": "a".repeat(2000)});
    let (status, answer) = svc
        .post(&format!("/v1/devices/{}/events", Uuid::now_v7()), &big)
        .await;
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (413, json!("body_too_large"))
    );
    let res = http
        .post(&url)
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{\"name\":")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");

    let (status, doc) = svc.get("/openapi.json").await;
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    assert!(doc["paths"]["/v1/devices/{device}/requests"]["post"].is_object());
    assert_eq!(svc.get("/healthz").await.0, 200);
    assert_eq!(svc.get("/readyz").await.0, 200);
    svc.stop().await;
}

#[tokio::test]
async fn two_replicas_share_the_relay_and_each_gets_its_own_answers() {
    let vhost = broker().vhost("api-replicas").await;
    let hive_a = HiveStandIn::start().await;
    let hive_b = HiveStandIn::start().await;
    // Each Hive stand-in is slow enough that one replica cannot take every message.
    for h in [&hive_a, &hive_b] {
        h.script(|_| mosaic_tests::hive::Answer::hang(Duration::from_millis(100)));
    }
    let vars = [("HIVE_CONCURRENCY", "2")];
    let a = std::sync::Arc::new(Service::start(&vhost.amqp_url, &hive_a.url(), &vars).await);
    let b = std::sync::Arc::new(Service::start(&vhost.amqp_url, &hive_b.url(), &vars).await);

    // The relay queue is shared: 30 events, each delivered, spread over both.
    let (_conn, ch) = crate::channel(&vhost.amqp_url).await;
    let mut want = std::collections::HashSet::new();
    for i in 0..30 {
        want.insert(crate::publish_event(&ch, Uuid::now_v7(), "n", json!({"i": i}), b"0").await);
    }
    mosaic_tests::eventually(
        Duration::from_secs(60),
        "30 deliveries over both replicas",
        || async {
            let got: std::collections::HashSet<String> = hive_a
                .delivered()
                .into_iter()
                .chain(hive_b.delivered())
                .filter_map(|r| r.header("idempotency-key").map(str::to_owned))
                .collect();
            (got == want).then_some(())
        },
    )
    .await;
    assert!(!hive_a.delivered().is_empty() && !hive_b.delivered().is_empty());

    // Requests through either replica reach the device's gateway, and each answer
    // goes back to the replica that asked.
    let device = Uuid::now_v7();
    let mut gw = Gateway::hold(&vhost.amqp_url, &[device], false).await;
    let path = format!("/v1/devices/{device}/requests");
    let calls: Vec<_> = [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
        .map(|(i, svc)| {
            let path = path.clone();
            tokio::spawn(async move { svc.post(&path, &json!({"name": "who", "data": i})).await })
        })
        .collect();
    let mut reply_queues = std::collections::HashSet::new();
    for _ in 0..4 {
        let (_, data, props) = gw.next().await;
        reply_queues.insert(props.reply_to().clone().unwrap().to_string());
        gw.reply(
            &props,
            "response",
            json!({"status": "ok"}),
            &json!({"echo": data}),
        )
        .await;
    }
    assert_eq!(reply_queues.len(), 2, "one reply queue per replica");
    for (i, call) in calls.into_iter().enumerate() {
        let (status, answer) = within(Duration::from_secs(10), "an answer", call)
            .await
            .unwrap();
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["data"], json!({"echo": i}));
    }
    std::sync::Arc::into_inner(a).unwrap().stop().await;
    std::sync::Arc::into_inner(b).unwrap().stop().await;
}

#[tokio::test]
async fn waiting_requests_are_bounded() {
    let vhost = broker().vhost("api-bounded").await;
    let hive = HiveStandIn::start().await;
    let svc = std::sync::Arc::new(
        Service::start(
            &vhost.amqp_url,
            &hive.url(),
            &[("MAX_PENDING_REQUESTS", "1")],
        )
        .await,
    );
    let device = Uuid::now_v7();
    let mut gw = Gateway::hold(&vhost.amqp_url, &[device], false).await;
    let path = format!("/v1/devices/{device}/requests");
    let first = tokio::spawn({
        let svc = svc.clone();
        let path = path.clone();
        async move {
            svc.post(&path, &json!({"name": "one", "timeout_ms": 60000}))
                .await
        }
    });
    let (_, _, props) = gw.next().await;
    // The map is full: the next request is refused at once.
    let (status, answer) = svc.post(&path, &json!({"name": "two"})).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "overloaded");
    // Answering the first frees the slot.
    gw.reply(&props, "response", json!({"status": "ok"}), &json!(1))
        .await;
    let (status, _) = within(Duration::from_secs(10), "the first answer", first)
        .await
        .unwrap();
    assert_eq!(status, 200);
    let second = tokio::spawn({
        let svc = svc.clone();
        async move { svc.post_full(&path, &json!({"name": "three"})).await }
    });
    let (_, _, props) = gw.next().await;
    gw.reply(
        &props,
        "undeliverable",
        json!({"reason": "device_busy"}),
        &Value::Null,
    )
    .await;
    // A device that is connected but full is busy, not offline.
    let (status, headers, answer) = within(Duration::from_secs(10), "the second answer", second)
        .await
        .unwrap();
    assert_eq!(
        (status, answer["error"]["code"].clone()),
        (503, json!("device_busy"))
    );
    assert_eq!(headers["retry-after"], "1");
    std::sync::Arc::into_inner(svc).unwrap().stop().await;
}
