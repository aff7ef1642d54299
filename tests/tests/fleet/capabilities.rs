//! Capabilities, groups and the fleet routes' answers to bad input, with one gateway
//! and one device-service.

use std::time::Duration;

use mosaic_tests::device::Device;
use mosaic_tests::hive::HiveStandIn;
use mosaic_tests::{broker, within};
use serde_json::{Value, json};
use tokio::time::Instant;
use uuid::Uuid;

use crate::{DeviceService, Gateway, TOKEN, WAIT, token};

fn is(v: &Value, device: Uuid, name: &str) -> bool {
    v["device"] == device.to_string() && v["kind"] == "lifecycle" && v["name"] == name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_groups_and_their_refusals() {
    let vhost = broker().vhost("fleet-capabilities").await;
    let hive = HiveStandIn::start().await;
    let gw = Gateway::start(&vhost.amqp_url).await;
    let ds = DeviceService::start(&vhost.amqp_url, &hive.url(), &[]).await;

    // Capabilities in `auth`: in the `connected` message with the token's groups.
    let a = Uuid::new_v4();
    let mut da = Device::try_connect(gw.addr, None).await.unwrap();
    assert_eq!(da.recv().await["type"], "hello");
    da.send(&json!({"type":"auth","token":token(a, &["g1", "g2"]),"services":["reboot","read"],"attributes":{"fw":"1.0"}}))
        .await;
    assert_eq!(da.recv().await["type"], "welcome");
    assert_eq!(
        da.recv().await,
        json!({"type":"registered","services":["read","reboot"]})
    );
    let seen = hive
        .wait_until(WAIT, "connected with capabilities", |s| {
            s.iter().any(|r| is(&r.json(), a, "connected"))
        })
        .await;
    let c = seen
        .iter()
        .map(|r| r.json())
        .find(|v| is(v, a, "connected"))
        .unwrap();
    assert_eq!(c["services"], json!(["read", "reboot"]), "{c}");
    assert_eq!(c["attributes"], json!({"fw":"1.0"}), "{c}");
    assert_eq!(c["groups"], json!(["g1", "g2"]), "{c}");

    // `register` later: `registered` frame and lifecycle message; presence follows.
    da.send(&json!({"type":"register","services":["reboot"],"attributes":{"fw":"1.1"}}))
        .await;
    assert_eq!(
        da.recv().await,
        json!({"type":"registered","services":["reboot"]})
    );
    let seen = hive
        .wait_until(WAIT, "registered", |s| {
            s.iter().any(|r| is(&r.json(), a, "registered"))
        })
        .await;
    let r = seen
        .iter()
        .map(|r| r.json())
        .find(|v| is(v, a, "registered"))
        .unwrap();
    assert_eq!(r["services"], json!(["reboot"]), "{r}");
    assert_eq!(r["attributes"], json!({"fw":"1.1"}), "{r}");
    // Too large: `bad_frame`, nothing registered.
    da.send(&json!({"type":"register","attributes":{"blob":"x".repeat(9000)}}))
        .await;
    let e = da.recv().await;
    assert_eq!(e["code"], "bad_frame", "{e}");
    let (_, p) = ds.get(&format!("/v1/devices/{a}/presence")).await;
    assert_eq!(p["attributes"], json!({"fw":"1.1"}), "{p}");
    assert_eq!(p["services"], json!(["reboot"]), "{p}");

    // A request for a service it did not declare: 404 at once, the device never sees it.
    let started = Instant::now();
    let (status, body) = ds
        .post(
            &format!("/v1/devices/{a}/requests"),
            &json!({"name":"read","timeout_ms":5000}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "service_not_supported");
    assert!(started.elapsed() < Duration::from_secs(2));
    // A declared one reaches it.
    let ds_url = ds.url(&format!("/v1/devices/{a}/requests"));
    let call = tokio::spawn(async move {
        reqwest::Client::new()
            .post(ds_url)
            .bearer_auth(TOKEN)
            .json(&json!({"name":"reboot","timeout_ms":5000}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    let req = da.recv().await;
    assert_eq!(req["name"], "reboot");
    da.send(&json!({"type":"response","request_id":req["id"],"status":"ok","data":null}))
        .await;
    assert_eq!(within(WAIT, "the answer", call).await.unwrap(), 200);

    // Groups: an event reaches members only.
    let b = Uuid::new_v4();
    let (mut db, _) = Device::connect(gw.addr, &token(b, &["g2"])).await;
    let (status, body) = ds
        .post("/v1/groups/g1/events", &json!({"name":"hi","data":1}))
        .await;
    assert_eq!((status, &body["gateways"]), (202, &json!(1)), "{body}");
    let ev = da.recv().await;
    assert_eq!(
        (ev["type"].as_str(), ev["name"].as_str()),
        (Some("event"), Some("hi"))
    );
    assert_eq!(ev["id"], body["id"]);
    let (status, body) = ds
        .post("/v1/groups/g2/events", &json!({"name":"both"}))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(da.recv().await["name"], "both");
    assert_eq!(
        db.recv().await["name"],
        "both",
        "b is in g2 but not g1: it never saw `hi`"
    );
    let (status, body) = ds
        .post("/v1/groups/nobody/events", &json!({"name":"x"}))
        .await;
    assert_eq!((status, &body["gateways"]), (202, &json!(0)), "{body}");

    // A fan-out: a member that does not offer the service is not asked, and cannot
    // answer; a busy member (its pending requests full) is busy, not offline.
    let c = Uuid::new_v4();
    let mut dc = Device::try_connect(gw.addr, None).await.unwrap();
    dc.recv().await;
    dc.send(&json!({"type":"auth","token":token(c, &["g2"]),"services":["other"]}))
        .await;
    dc.recv().await;
    dc.recv().await;
    // Fill b's pending requests (64 per session) with requests it never answers.
    let mut fillers = Vec::new();
    for _ in 0..64 {
        let url = ds.url(&format!("/v1/devices/{b}/requests"));
        fillers.push(tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(TOKEN)
                .json(&json!({"name":"hold","timeout_ms":20000}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for _ in 0..64 {
        assert_eq!(db.recv().await["name"], "hold");
    }
    let url = ds.url("/v1/groups/g2/requests");
    let fan = tokio::spawn(async move {
        let res = reqwest::Client::new()
            .post(url)
            .bearer_auth(TOKEN)
            .json(&json!({"name":"reboot","timeout_ms":4000}))
            .send()
            .await
            .unwrap();
        (res.status().as_u16(), res.json::<Value>().await.unwrap())
    });
    let req = da.recv().await;
    assert_eq!(req["name"], "reboot");
    // c was not asked: its answer with that id is refused.
    dc.send(&json!({"type":"response","request_id":req["id"],"status":"ok"}))
        .await;
    assert_eq!(dc.recv().await["code"], "unknown_request");
    da.send(&json!({"type":"response","request_id":req["id"],"status":"ok","data":{"v":1}}))
        .await;
    let (status, r) = within(WAIT, "the fan-out", fan).await.unwrap();
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["asked"], 2, "{r}");
    assert_eq!(
        r["answers"],
        json!([{"device":a,"status":"ok","data":{"v":1}}]),
        "{r}"
    );
    assert_eq!(r["busy"], json!([b]), "{r}");
    assert_eq!(r["timed_out"], json!([]), "{r}");
    for f in fillers {
        f.abort();
    }

    // A token whose `groups` is not an array of names is a bad token.
    let mut claims = mosaic_tests::token::claims(Uuid::new_v4(), 60);
    claims["groups"] = json!("g1");
    let bad = mosaic_tests::token::sign(jsonwebtoken::Algorithm::HS256, None, &claims);
    assert_eq!(
        Device::try_connect(gw.addr, Some(&bad)).await.unwrap_err(),
        401
    );

    // Hostile input on every fleet route.
    let http = reqwest::Client::new();
    let dev = format!("/v1/devices/{a}");
    let cases: Vec<(reqwest::Method, String, Option<Value>, u16, &str)> = vec![
        (
            reqwest::Method::GET,
            "/v1/devices/nope/presence".into(),
            None,
            400,
            "bad_device_id",
        ),
        (
            reqwest::Method::DELETE,
            "/v1/devices/nope/session".into(),
            None,
            400,
            "bad_device_id",
        ),
        (
            reqwest::Method::POST,
            "/v1/groups/a.b/events".into(),
            Some(json!({"name":"x"})),
            400,
            "bad_group",
        ),
        (
            reqwest::Method::POST,
            "/v1/groups/%23/requests".into(),
            Some(json!({"name":"x"})),
            400,
            "bad_group",
        ),
        (
            reqwest::Method::POST,
            format!("/v1/groups/{}/events", "x".repeat(65)),
            Some(json!({"name":"x"})),
            400,
            "bad_group",
        ),
        (
            reqwest::Method::GET,
            "/v1/devices?connected=true&group=a*".into(),
            None,
            400,
            "bad_group",
        ),
        (
            reqwest::Method::GET,
            "/v1/devices?connected=true&limit=0".into(),
            None,
            400,
            "bad_request",
        ),
        (
            reqwest::Method::GET,
            "/v1/devices?connected=true&limit=1001".into(),
            None,
            400,
            "bad_request",
        ),
        (
            reqwest::Method::GET,
            "/v1/devices?connected=true&cursor=nope".into(),
            None,
            400,
            "bad_request",
        ),
        (
            reqwest::Method::GET,
            "/v1/devices?connected=true&enabled=true".into(),
            None,
            400,
            "bad_request",
        ),
        (
            reqwest::Method::POST,
            "/v1/broadcast/requests".into(),
            Some(json!({"name":"x","timeout_ms":0})),
            400,
            "bad_request",
        ),
        (
            reqwest::Method::POST,
            "/v1/broadcast/requests".into(),
            Some(json!({"name":""})),
            400,
            "bad_request",
        ),
        (
            reqwest::Method::POST,
            "/v1/broadcast/requests".into(),
            Some(json!({"name":"x","CC":["device.x"]})),
            400,
            "reserved_field",
        ),
        (
            reqwest::Method::POST,
            "/v1/groups/g1/requests".into(),
            Some(json!({"name":"x","pad":"x".repeat(300_000)})),
            413,
            "body_too_large",
        ),
        (
            reqwest::Method::DELETE,
            format!("/v1/devices/{}/session", Uuid::new_v4()),
            None,
            404,
            "device_not_connected",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let mut req = http
            .request(method.clone(), ds.url(&path))
            .bearer_auth(TOKEN);
        if let Some(b) = &body {
            req = req.json(b);
        }
        let res = req.send().await.unwrap();
        let got = res.status().as_u16();
        let v: Value = res.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (got, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{method} {path}: {v}"
        );
    }
    for (method, path) in [
        (reqwest::Method::GET, format!("{dev}/presence")),
        (reqwest::Method::DELETE, format!("{dev}/session")),
        (reqwest::Method::GET, "/v1/devices?connected=true".into()),
        (reqwest::Method::POST, "/v1/groups/g1/events".into()),
        (reqwest::Method::POST, "/v1/groups/g1/requests".into()),
        (reqwest::Method::POST, "/v1/broadcast/requests".into()),
    ] {
        let res = http
            .request(method.clone(), ds.url(&path))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 401, "{method} {path}");
    }
    // The device is still there after all that.
    let (_, p) = ds.get(&format!("{dev}/presence")).await;
    assert_eq!(p["connected"], true);

    ds.stop().await;
    gw.stop().await;
}
