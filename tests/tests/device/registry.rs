//! The registry routes of device-service against a real PostgreSQL and RabbitMQ:
//! every route and its errors, hostile input, the settings it runs without, and
//! PostgreSQL stopped and started under v1 traffic.

use std::time::Duration;

use mosaic_tests::hive::HiveStandIn;
use mosaic_tests::{broker, postgres};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{Service, TOKEN, channel, publish_event};

const WAIT: Duration = Duration::from_secs(30);

async fn call(
    svc: &Service,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method.parse().unwrap(), svc.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_owned());
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let bytes = res.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn every_registry_route_and_its_errors() {
    let vhost = broker().vhost("registry-routes").await;
    let db = postgres().database("registry_routes").await;
    let hive = HiveStandIn::start().await;
    let svc = Service::start(
        &vhost.amqp_url,
        &hive.url(),
        &[
            ("DATABASE_URL", &db),
            ("TOKEN_SIGNING_KEY", mosaic_tests::token::ED_PRIVATE_PEM),
        ],
    )
    .await;
    let t = Some(TOKEN);
    let id = Uuid::new_v4();
    let create = json!({"id": id, "name": "pump-1", "external_id": "SN-1", "type": "pump",
        "groups": ["plant-a", "pumps"], "attributes": {"fw": "1.0", "loc": {"row": 2}}})
    .to_string();
    let (s, rec) = call(&svc, "POST", "/v1/devices", t, Some(&create)).await;
    assert_eq!(s, 201, "{rec}");
    assert_eq!(rec["id"], id.to_string());
    assert_eq!(rec["groups"], json!(["plant-a", "pumps"]));
    assert_eq!(rec["enabled"], true);
    assert!(rec["activated_at"].is_null());

    // Duplicates, and a second device without an id.
    let (s, e) = call(&svc, "POST", "/v1/devices", t, Some(&create)).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("device_exists"))
    );
    let (s, e) = call(
        &svc,
        "POST",
        "/v1/devices",
        t,
        Some(r#"{"name":"other","external_id":"SN-1"}"#),
    )
    .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("external_id_exists"))
    );
    let (s, other) = call(
        &svc,
        "POST",
        "/v1/devices",
        t,
        Some(r#"{"name":"valve-9","groups":["plant-b"]}"#),
    )
    .await;
    assert_eq!(s, 201, "{other}");
    let other_id = other["id"].as_str().unwrap().to_owned();

    // Hostile and bad bodies.
    let long = "n".repeat(129);
    let big_attributes = json!({"name": "x", "attributes": {"pad": "x".repeat(9000)}}).to_string();
    let long_name = json!({"name": long}).to_string();
    for body in [
        "{nope",
        r#"{"name":""}"#,
        &long_name,
        r#"{"name":"a","groups":["bad group"]}"#,
        r#"{"name":"a","groups":"plant"}"#,
        r#"{"name":"a","attributes":[1]}"#,
        &big_attributes,
        r#"{"name":"a","enabled":false}"#,
        r#"{"name":"a","id":"not-a-uuid"}"#,
        r#"{"name":"a","kind":"x"}"#,
        r#"{"name":"a\u0000b"}"#,
        r#"{"name":"a","attributes":{"n":18446744073709551616}}"#,
    ] {
        let (s, e) = call(&svc, "POST", "/v1/devices", t, Some(body)).await;
        assert_eq!(s, 400, "{body}: {e}");
        assert_eq!(e["error"]["code"], "bad_request", "{body}: {e}");
    }
    // No token, a wrong token: 401 on every registry route (not on the JWKS).
    for (m, p) in [
        ("GET", "/v1/devices".to_owned()),
        ("POST", "/v1/devices".to_owned()),
        ("GET", format!("/v1/devices/{id}")),
        ("PATCH", format!("/v1/devices/{id}")),
        ("DELETE", format!("/v1/devices/{id}")),
        ("POST", format!("/v1/devices/{id}/enrolments")),
    ] {
        for token in [None, Some("wrong-token-0123456789")] {
            let (s, e) = call(&svc, m, &p, token, Some("{}")).await;
            assert_eq!(s, 401, "{m} {p}: {e}");
        }
    }
    let (s, jwks) = call(&svc, "GET", "/v1/jwks.json", None, None).await;
    assert_eq!(s, 200);
    assert_eq!(jwks["keys"][0]["kty"], "OKP");
    assert_eq!(jwks["keys"][0]["crv"], "Ed25519");

    // Read.
    let (s, got) = call(&svc, "GET", &format!("/v1/devices/{id}"), t, None).await;
    assert_eq!(s, 200);
    assert_eq!(got["attributes"]["loc"]["row"], 2);
    for (path, status, code) in [
        ("/v1/devices/nope".to_owned(), 400, "bad_device_id"),
        (
            format!("/v1/devices/{}", Uuid::new_v4()),
            404,
            "device_not_found",
        ),
    ] {
        let (s, e) = call(&svc, "GET", &path, t, None).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (status, Some(code)),
            "{path}"
        );
    }

    // Listing: filters and pages.
    let list = |q: &str| format!("/v1/devices{q}");
    let (s, page) = call(&svc, "GET", &list("?group=plant-a"), t, None).await;
    assert_eq!(s, 200);
    assert_eq!(page["devices"].as_array().unwrap().len(), 1);
    assert_eq!(page["devices"][0]["id"], id.to_string());
    let (_, page) = call(&svc, "GET", &list("?q=VALVE"), t, None).await;
    assert_eq!(page["devices"][0]["id"], other_id.as_str());
    let (_, page) = call(&svc, "GET", &list("?q=sn-"), t, None).await;
    assert_eq!(page["devices"].as_array().unwrap().len(), 1, "{page}");
    let (_, page) = call(&svc, "GET", &list("?q=%25"), t, None).await;
    assert_eq!(
        page["devices"].as_array().unwrap().len(),
        0,
        "a literal %: {page}"
    );
    let (_, first) = call(&svc, "GET", &list("?limit=1"), t, None).await;
    assert_eq!(first["devices"].as_array().unwrap().len(), 1);
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let (_, second) = call(
        &svc,
        "GET",
        &list(&format!("?limit=1&cursor={cursor}")),
        t,
        None,
    )
    .await;
    assert_eq!(second["devices"].as_array().unwrap().len(), 1);
    assert!(second["next_cursor"].is_null(), "{second}");
    assert_ne!(first["devices"][0]["id"], second["devices"][0]["id"]);
    for q in [
        "?limit=0",
        "?limit=1001",
        "?limit=x",
        "?cursor=zzz",
        "?group=a%20b",
        "?enabled=maybe",
        "?nope=1",
        "?service=x",
    ] {
        let (s, e) = call(&svc, "GET", &list(q), t, None).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "{q}: {e}"
        );
    }

    // Merge patch.
    let (s, p) = call(
        &svc,
        "PATCH",
        &format!("/v1/devices/{id}"),
        t,
        Some(r#"{"name":"pump-1b","attributes":{"fw":"1.1","loc":null,"new":true},"groups":null}"#),
    )
    .await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["name"], "pump-1b");
    assert_eq!(p["attributes"], json!({"fw": "1.1", "new": true}));
    assert_eq!(p["groups"], json!([]));
    assert_eq!(p["external_id"], "SN-1");
    for body in [
        r#"[1]"#,
        r#"{"external_id":"x"}"#,
        r#"{"name":null}"#,
        r#"{"enabled":"no"}"#,
        r#"{"groups":[1]}"#,
        r#"{"attributes":5}"#,
    ] {
        let (s, e) = call(&svc, "PATCH", &format!("/v1/devices/{id}"), t, Some(body)).await;
        assert_eq!(s, 400, "{body}: {e}");
    }
    let (s, _) = call(
        &svc,
        "PATCH",
        &format!("/v1/devices/{}", Uuid::new_v4()),
        t,
        Some("{}"),
    )
    .await;
    assert_eq!(s, 404);

    // Enrolment codes.
    let (s, e) = call(
        &svc,
        "POST",
        &format!("/v1/devices/{id}/enrolments"),
        t,
        None,
    )
    .await;
    assert_eq!(s, 201, "{e}");
    assert_eq!(e["code"].as_str().unwrap().len(), 29);
    for (body, status) in [
        (r#"{"ttl_ms":59999}"#, 400),
        (r#"{"ttl_ms":2592000001}"#, 400),
        (r#"{"ttl_ms":"1"}"#, 400),
        (r#"{"other":1}"#, 400),
        (r#"{"ttl_ms":60000}"#, 201),
    ] {
        let (s, e) = call(
            &svc,
            "POST",
            &format!("/v1/devices/{id}/enrolments"),
            t,
            Some(body),
        )
        .await;
        assert_eq!(s, status, "{body}: {e}");
    }
    let (s, e) = call(
        &svc,
        "POST",
        &format!("/v1/devices/{}/enrolments", Uuid::new_v4()),
        t,
        None,
    )
    .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (404, Some("device_not_found"))
    );
    let (s, _) = call(&svc, "POST", "/v1/devices/x/enrolments", t, None).await;
    assert_eq!(s, 400);

    // Delete.
    let (s, _) = call(&svc, "DELETE", &format!("/v1/devices/{id}"), t, None).await;
    assert_eq!(s, 204);
    let (s, _) = call(&svc, "DELETE", &format!("/v1/devices/{id}"), t, None).await;
    assert_eq!(s, 404);

    // Every change reached Hive in order, with kind `registry`.
    let device = id.to_string();
    let seen = hive
        .wait_until(WAIT, "created, updated, deleted at Hive", |seen| {
            seen.iter()
                .filter(|r| r.json()["device"] == device.as_str())
                .count()
                >= 3
        })
        .await;
    let names: Vec<Value> = seen
        .iter()
        .map(|r| r.json())
        .filter(|b| b["device"] == device.as_str())
        .map(|b| {
            assert_eq!(b["kind"], "registry", "{b}");
            b["name"].clone()
        })
        .collect();
    assert_eq!(
        names,
        vec![json!("created"), json!("updated"), json!("deleted")]
    );
    svc.stop().await;
}

#[tokio::test]
async fn without_a_database_or_a_key_the_v2_routes_answer_not_configured() {
    let vhost = broker().vhost("registry-unconfigured").await;
    let hive = HiveStandIn::start().await;
    let svc = Service::start(&vhost.amqp_url, &hive.url(), &[]).await;
    let id = Uuid::new_v4();
    for (m, p) in [
        ("GET", "/v1/devices".to_owned()),
        ("POST", "/v1/devices".to_owned()),
        ("GET", format!("/v1/devices/{id}")),
        ("DELETE", format!("/v1/devices/{id}")),
        ("POST", format!("/v1/devices/{id}/enrolments")),
    ] {
        let body = (m == "POST" && p == "/v1/devices").then_some(r#"{"name":"x"}"#);
        let (s, e) = call(&svc, m, &p, Some(TOKEN), body).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (503, Some("not_configured")),
            "{m} {p}"
        );
    }
    let (s, e) = call(&svc, "GET", "/v1/jwks.json", None, None).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (503, Some("not_configured"))
    );
    svc.stop().await;

    // A database but no signing key: the registry works, enrolment does not.
    let db = postgres().database("registry_no_key").await;
    let svc = Service::start(&vhost.amqp_url, &hive.url(), &[("DATABASE_URL", &db)]).await;
    let (s, rec) = call(
        &svc,
        "POST",
        "/v1/devices",
        Some(TOKEN),
        Some(r#"{"name":"x"}"#),
    )
    .await;
    assert_eq!(s, 201);
    let path = format!("/v1/devices/{}/enrolments", rec["id"].as_str().unwrap());
    let (s, e) = call(&svc, "POST", &path, Some(TOKEN), None).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (503, Some("not_configured"))
    );
    svc.stop().await;
}

/// Lifecycle messages (as a gateway publishes them) activate a registered device
/// once and move its `last_seen`.
#[tokio::test]
async fn connects_activate_a_device_once_and_move_last_seen() {
    let vhost = broker().vhost("registry-seen").await;
    let db = postgres().database("registry_seen").await;
    let hive = HiveStandIn::start().await;
    let svc = Service::start(&vhost.amqp_url, &hive.url(), &[("DATABASE_URL", &db)]).await;
    let (s, rec) = call(
        &svc,
        "POST",
        "/v1/devices",
        Some(TOKEN),
        Some(r#"{"name":"x"}"#),
    )
    .await;
    assert_eq!(s, 201);
    let id: Uuid = rec["id"].as_str().unwrap().parse().unwrap();
    let (_conn, ch) = channel(&vhost.amqp_url).await;
    for name in ["connected", "disconnected", "connected"] {
        let mut h = serde_json::Map::new();
        for (k, v) in [
            ("kind", "lifecycle"),
            ("name", name),
            ("gateway", "gw-test"),
        ] {
            h.insert(k.into(), json!(v));
        }
        h.insert("device".into(), json!(id.to_string()));
        h.insert("session".into(), json!(Uuid::now_v7().to_string()));
        h.insert("message_id".into(), json!(Uuid::now_v7().to_string()));
        h.insert("received_at".into(), json!(crate::now_rfc3339()));
        crate::publish_raw(
            &ch,
            "mosaic.events",
            &format!("lifecycle.{id}.{name}"),
            &h,
            b"null",
        )
        .await;
    }
    // An unregistered device's connect is relayed and changes nothing.
    publish_event(&ch, Uuid::new_v4(), "t", json!({}), b"1").await;
    let device = id.to_string();
    hive.wait_until(WAIT, "the activation at Hive", |seen| {
        seen.iter().any(|r| {
            let b = r.json();
            b["kind"] == "registry" && b["name"] == "activated" && b["device"] == device.as_str()
        })
    })
    .await;
    let rec = mosaic_tests::eventually(WAIT, "last_seen", || async {
        let (_, r) = call(&svc, "GET", &format!("/v1/devices/{id}"), Some(TOKEN), None).await;
        r["last_seen"].is_string().then_some(r)
    })
    .await;
    assert!(rec["activated_at"].is_string());
    // Only once, even after the second connect.
    hive.wait_for(6, WAIT).await;
    let activations = hive
        .requests()
        .iter()
        .filter(|r| r.json()["name"] == "activated")
        .count();
    assert_eq!(activations, 1);
    svc.stop().await;
}

/// PostgreSQL stopped under traffic: the relay and the v1 API go on, `/readyz` is
/// false (`/readyz/broker` true), the v2 routes answer 503; started again, v2 comes
/// back by itself.
#[tokio::test]
async fn postgres_stopped_and_started_under_traffic() {
    let pg = mosaic_tests::Postgres::start().expect("a private PostgreSQL");
    let db = pg.database("outage").await;
    let vhost = broker().vhost("registry-pg-outage").await;
    let hive = HiveStandIn::start().await;
    let svc = Service::start(
        &vhost.amqp_url,
        &hive.url(),
        &[
            ("DATABASE_URL", &db),
            ("DATABASE_ACQUIRE_TIMEOUT_MS", "500"),
        ],
    )
    .await;
    let (s, _) = call(
        &svc,
        "POST",
        "/v1/devices",
        Some(TOKEN),
        Some(r#"{"name":"a"}"#),
    )
    .await;
    assert_eq!(s, 201);
    let (_conn, ch) = channel(&vhost.amqp_url).await;

    pg.stop_server().unwrap();
    svc.wait_ready(false).await;
    let (s, _) = svc.get("/readyz/broker").await;
    assert_eq!(s, 200);
    let (s, e) = call(&svc, "GET", "/v1/devices", Some(TOKEN), None).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (503, Some("database_unavailable"))
    );
    // v1 goes on: device events reach Hive, lifecycle messages too.
    let before = hive.requests().len();
    for i in 0..20 {
        publish_event(
            &ch,
            Uuid::new_v4(),
            "t",
            json!({}),
            format!("{i}").as_bytes(),
        )
        .await;
    }
    hive.wait_for(before + 20, WAIT).await;
    let (s, e) = svc
        .post(
            &format!("/v1/devices/{}/events", Uuid::new_v4()),
            &json!({"name": "x"}),
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (404, Some("device_not_connected"))
    );

    pg.start_server().unwrap();
    svc.wait_ready(true).await;
    let (s, page) = call(&svc, "GET", "/v1/devices", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{page}");
    assert_eq!(page["devices"].as_array().unwrap().len(), 1);
    svc.stop().await;
}
