//! Connection caps: `MAX_CONNECTIONS` and `MAX_UNAUTHENTICATED` answer 503 before the
//! upgrade, and every way a connection ends gives its place back.

use mosaic_tests::device::{Device, Ended};
use mosaic_tests::{broker, eventually, token};
use serde_json::json;
use uuid::Uuid;

use crate::{Gateway, WAIT, device};

/// An upgrade request made with plain HTTP, to read the refusal's headers and body.
async fn upgrade_refusal(gw: &Gateway) -> (u16, Option<String>, serde_json::Value) {
    let res = gw
        .http
        .get(format!("http://{}/v1/connect", gw.addr))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .timeout(WAIT)
        .send()
        .await
        .expect("an HTTP answer");
    let status = res.status().as_u16();
    let retry_after = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = res.json().await.unwrap_or(serde_json::Value::Null);
    (status, retry_after, body)
}

/// Connects, retrying while the gateway answers 503 (a place is given back when the
/// gateway's side of a closed connection has ended, a moment after the close).
async fn connect_once_freed(gw: &Gateway, token: Option<&str>) -> Device {
    eventually(WAIT, "a freed place", || async {
        match Device::try_connect(gw.addr, token).await {
            Ok(d) => Some(d),
            Err(503) => None,
            Err(s) => panic!("unexpected HTTP {s}"),
        }
    })
    .await
}

#[tokio::test]
async fn connection_caps_answer_503_before_the_upgrade() {
    let vh = broker().vhost("ws-limits-caps").await;
    let gw = Gateway::start(
        &vh.amqp_url,
        &[("MAX_CONNECTIONS", "4"), ("MAX_UNAUTHENTICATED", "2")],
    )
    .await;

    // Two devices authenticating in band fill the unauthenticated places.
    let mut u1 = Device::try_connect(gw.addr, None).await.expect("upgrade");
    let u2 = Device::try_connect(gw.addr, None).await.expect("upgrade");
    assert_eq!(u1.recv().await["type"], "hello");
    assert_eq!(Device::try_connect(gw.addr, None).await.err(), Some(503));
    let (status, retry_after, body) = upgrade_refusal(&gw).await;
    assert_eq!(status, 503);
    assert_eq!(retry_after.as_deref(), Some("5"));
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");

    // A device with its token in the header still gets in.
    let (_, t) = device();
    let (a1, _) = Device::connect(gw.addr, &t).await;

    // Authenticating frees an unauthenticated place (not a connection).
    let (d1, t1) = device();
    u1.send(&json!({"type": "auth", "token": t1})).await;
    assert_eq!(u1.recv().await["device"], d1.to_string());
    let u3 = connect_once_freed(&gw, None).await;

    // Four connections: the next one is refused, whatever it carries.
    let (_, t2) = device();
    assert_eq!(
        Device::try_connect(gw.addr, Some(&t2)).await.err(),
        Some(503)
    );
    assert_eq!(Device::try_connect(gw.addr, None).await.err(), Some(503));
    let (status, _, body) = upgrade_refusal(&gw).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (503, &json!("unavailable"))
    );

    // Closing one gives its place back.
    a1.close().await;
    let (a2, _) = {
        let mut d = connect_once_freed(&gw, Some(&t2)).await;
        let welcome = d.recv().await;
        assert_eq!(welcome["type"], "welcome");
        (d, welcome)
    };

    for d in [u1, u2, u3, a2] {
        d.close().await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn refused_tokens_and_auth_timeouts_give_their_place_back() {
    let vh = broker().vhost("ws-limits-release").await;
    let gw = Gateway::start(
        &vh.amqp_url,
        &[
            ("MAX_CONNECTIONS", "1"),
            ("MAX_UNAUTHENTICATED", "1"),
            ("AUTH_TIMEOUT_MS", "300"),
        ],
    )
    .await;
    // A bad token in the header: 401, and the place is free again at once.
    for _ in 0..3 {
        assert_eq!(
            Device::try_connect(gw.addr, Some("not-a-jwt")).await.err(),
            Some(401)
        );
    }
    // A bad token in band: 4401.
    let mut d = Device::try_connect(gw.addr, None).await.expect("upgrade");
    d.recv().await;
    d.send(&json!({"type": "auth", "token": token::hs256(Uuid::nil(), -60)}))
        .await;
    assert!(matches!(
        d.ended_within(WAIT).await.1,
        Ended::Close(4401, _)
    ));
    // No auth in time: 4408.
    let mut d = connect_once_freed(&gw, None).await;
    assert!(matches!(
        d.ended_within(WAIT).await.1,
        Ended::Close(4408, _)
    ));
    // Dropped by the device without a close.
    let d = connect_once_freed(&gw, None).await;
    drop(d);
    // After all that, the one place is free for a device that authenticates.
    let (_, t) = device();
    let mut d = connect_once_freed(&gw, Some(&t)).await;
    assert_eq!(d.recv().await["type"], "welcome");
    d.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn a_session_with_the_longest_durations_runs_and_ends_cleanly() {
    let vh = broker().vhost("ws-longest").await;
    let max = websocket_service::config::MAX_TIMEOUT_MS.to_string();
    let longest_ping = websocket_service::config::MAX_PING_INTERVAL_MS.to_string();
    for ping in ["20", longest_ping.as_str()] {
        // Pings every 20 ms, each with the longest pong timeout; then the longest
        // interval: none of the deadlines may overflow the clock.
        let gw = Gateway::start(
            &vh.amqp_url,
            &[
                ("PONG_TIMEOUT_MS", &max),
                ("AUTH_TIMEOUT_MS", &max),
                ("PING_INTERVAL_MS", ping),
            ],
        )
        .await;
        let (_, tok) = device();
        let (mut d, _) = Device::connect_in_band(gw.addr, &tok).await;
        // The client answers the pings as it reads.
        d.send(&json!({"type":"event","name":"t","id":"1"})).await;
        assert_eq!(d.recv().await, json!({"type":"ack","id":"1"}));
        assert!(d.open_after(std::time::Duration::from_millis(100)).await);
        let stopping = tokio::spawn(gw.stop());
        let (_, ended) = d.ended_within(WAIT).await;
        assert!(matches!(ended, Ended::Close(1001, _)), "{ended:?}");
        // `stop` asserts that `run` returned Ok: no task panicked.
        stopping.await.unwrap();
    }
}
