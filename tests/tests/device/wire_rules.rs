//! What Hive may not put in a REST body: names RabbitMQ reads itself, headers too
//! large for one AMQP frame, extra fields over 64 KiB, integers past 64 bits. Each is
//! refused before anything is published, and the broker link keeps working.

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use mosaic_tests::hive::HiveStandIn;
use mosaic_tests::{broker, within};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{Gateway, Service};

/// Publishes a marker to `device.<device>` on `mosaic.commands` and checks it is the
/// next (so the first) command the gateway holds.
async fn nothing_before_marker(gw: &mut Gateway, device: Uuid) {
    let confirm =
        gw.0.ch
            .basic_publish(
                "mosaic.commands".into(),
                mosaic_protocol::exchange::device_key(device)
                    .as_str()
                    .into(),
                BasicPublishOptions::default(),
                b"\"marker\"",
                BasicProperties::default().with_headers(
                    amqp_value_json::to_field_table(json!({"kind":"marker"}).as_object().unwrap())
                        .unwrap(),
                ),
            )
            .await
            .unwrap();
    within(
        std::time::Duration::from_secs(10),
        "the marker's confirm",
        confirm,
    )
    .await
    .unwrap();
    let (headers, body, _) = gw.next().await;
    assert_eq!(
        (headers["kind"].clone(), body),
        (json!("marker"), json!("marker")),
        "a command came before the marker: {headers:?}"
    );
}

#[tokio::test]
async fn broker_names_big_integers_and_oversize_bodies_are_refused() {
    let vhost = broker().vhost("api-wire-rules").await;
    let hive = HiveStandIn::start().await;
    let svc = Service::start(&vhost.amqp_url, &hive.url(), &[]).await;
    let device = Uuid::now_v7();
    let other = Uuid::now_v7();
    let mut gw = Gateway::hold(&vhost.amqp_url, &[device], true).await;
    let mut theirs = Gateway::hold(&vhost.amqp_url, &[other], false).await;
    let their_key = mosaic_protocol::exchange::device_key(other);
    let paths = [
        format!("/v1/devices/{device}/events"),
        format!("/v1/devices/{device}/requests"),
        "/v1/broadcast/events".to_owned(),
    ];

    let mut n = 0;
    let mut expect = async |path: &str, body: Value, status: u16, code: &str| {
        let (got, answer) = svc.post(path, &body).await;
        let shown = body.to_string();
        let shown = &shown[..shown.len().min(100)];
        assert_eq!(got, status, "{path} {shown}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{path} {shown}: {answer}");
        // The link still works: a good event goes through at once.
        n += 1;
        let (got, answer) = svc
            .post(&paths[0], &json!({"name": "fine", "data": n}))
            .await;
        assert_eq!(got, 202, "after {path} {shown}: {answer}");
    };
    for path in &paths {
        for body in [
            // Not an array of strings: RabbitMQ would close the publishing channel.
            json!({"name": "t", "CC": "x"}),
            // Arrays of strings: RabbitMQ would copy the command to the other device.
            json!({"name": "t", "CC": [their_key]}),
            json!({"name": "t", "BCC": [their_key]}),
            json!({"name": "t", "cc": [their_key]}),
            json!({"name": "t", "x-death": [{"count": 1}]}),
            json!({"name": "t", "X-Match": "any"}),
        ] {
            expect(path, body, 400, "reserved_field").await;
        }
        // About 40 KB of JSON, 180 KB as AMQP headers: past frame_max.
        expect(
            path,
            json!({"name": "t", "n": vec![7; 20_000]}),
            413,
            "body_too_large",
        )
        .await;
        // Over 64 KiB of extra fields.
        let pad = "x".repeat(70_000);
        expect(
            path,
            json!({"name": "t", "pad": pad}),
            413,
            "body_too_large",
        )
        .await;
    }

    // Integers past 64 bits (`json!` cannot write them: send the text).
    let http = reqwest::Client::new();
    for path in &paths {
        for text in [
            r#"{"name":"t","data":{"v":[1,18446744073709551616]}}"#,
            r#"{"name":"t","n":-9223372036854775809}"#,
        ] {
            let res = within(
                std::time::Duration::from_secs(10),
                "a REST answer",
                http.post(svc.url(path))
                    .bearer_auth(crate::TOKEN)
                    .header("content-type", "application/json")
                    .body(text)
                    .send(),
            )
            .await
            .unwrap();
            assert_eq!(res.status().as_u16(), 400, "{path} {text}");
            let answer: Value = res.json().await.unwrap();
            assert_eq!(answer["error"]["code"], "bad_request", "{answer}");
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(message.contains("outside the range"), "{message}");
        }
    }

    // Only the good events were published, in order; nothing reached the other device.
    for i in 1..=n {
        let (headers, data, _) = gw.next().await;
        assert_eq!((headers["name"].clone(), data), (json!("fine"), json!(i)));
    }
    nothing_before_marker(&mut gw, device).await;
    nothing_before_marker(&mut theirs, other).await;

    // Right at the edges: the largest integers, and headers that still fit.
    let (got, answer) = svc
        .post(
            &paths[0],
            &json!({"name": "edge", "data": [u64::MAX, i64::MIN], "n": vec![7; 13_000]}),
        )
        .await;
    assert_eq!(got, 202, "{answer}");
    let (headers, data, _) = gw.next().await;
    assert_eq!(data, json!([u64::MAX, i64::MIN]));
    assert_eq!(headers["n"], json!(vec![7; 13_000]));
    svc.stop().await;
}
