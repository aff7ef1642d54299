//! Authentication: header and in-band, keys by kid, refused tokens, refresh, expiry.

use std::time::Duration;

use jsonwebtoken::Algorithm;
use mosaic_tests::device::{Device, Ended};
use mosaic_tests::{broker, token};
use serde_json::json;
use uuid::Uuid;

use crate::{Gateway, Observer, WAIT, device};

#[tokio::test]
async fn a_bad_header_token_gets_401_before_any_upgrade() {
    let vh = broker().vhost("ws-401").await;
    let gw = Gateway::start(&vh.amqp_url, &[]).await;
    let d = Uuid::new_v4();
    let expired = token::sign(Algorithm::HS256, None, &token::claims(d, -30));
    let no_sub = token::sign(Algorithm::HS256, None, &json!({"exp": token::now() + 60}));
    let bad_sub = token::sign(
        Algorithm::HS256,
        None,
        &json!({"sub": "dev-1", "exp": token::now() + 60}),
    );
    let no_exp = token::sign(Algorithm::HS256, None, &json!({"sub": d.to_string()}));
    let unsigned = token::unsigned(&token::claims(d, 60));
    let mut tampered = token::hs256(d, 60);
    tampered.push('x');
    // RS256 with no public keys configured.
    let rs = token::sign(Algorithm::RS256, None, &token::claims(d, 60));
    for (why, t) in [
        ("expired", expired),
        ("no sub", no_sub),
        ("sub not a UUID", bad_sub),
        ("no exp", no_exp),
        ("alg none", unsigned),
        ("tampered", tampered),
        ("RS256 without keys", rs),
        ("garbage", "abc".into()),
    ] {
        assert_eq!(
            Device::try_connect(gw.addr, Some(&t)).await.err(),
            Some(401),
            "{why}"
        );
    }
    let res = gw
        .http
        .get(format!("http://{}/v1/connect", gw.addr))
        .header("authorization", "Bearer nope")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    let (_, metrics) = gw.get("/metrics").await;
    assert!(
        metrics.contains("mosaic_ws_auth_failures_total"),
        "{metrics}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn in_band_auth_hello_welcome_timeout_and_refusal() {
    let vh = broker().vhost("ws-inband").await;
    let gw = Gateway::start(&vh.amqp_url, &[("AUTH_TIMEOUT_MS", "500")]).await;
    let (dev, tok) = device();
    let (d, welcome) = Device::connect_in_band(gw.addr, &tok).await;
    assert_eq!(welcome["device"], dev.to_string());
    let session = Uuid::parse_str(welcome["session"].as_str().unwrap()).unwrap();
    assert_eq!(session.get_version_num(), 7);
    assert!(welcome["expires_at"].as_str().unwrap().ends_with('Z'));
    d.close().await;

    // No auth frame in time: 4408.
    let mut d = Device::try_connect(gw.addr, None).await.unwrap();
    assert_eq!(
        d.recv().await,
        json!({"type":"hello","auth_timeout_ms":500})
    );
    assert_eq!(d.close_code().await, 4408);

    // A bad token in band: error unauthorized, then 4401.
    let mut d = Device::try_connect(gw.addr, None).await.unwrap();
    d.recv().await;
    d.send(&json!({"type":"auth","token": token::hs256(Uuid::new_v4(), -60)}))
        .await;
    let (frames, ended) = d.ended_within(WAIT).await;
    assert_eq!(frames[0]["type"], "error");
    assert_eq!(frames[0]["code"], "unauthorized");
    assert!(matches!(ended, Ended::Close(4401, _)), "{ended:?}");
    gw.stop().await;
}

#[tokio::test]
async fn public_keys_from_jwks_are_chosen_by_kid() {
    let vh = broker().vhost("ws-jwks").await;
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, token::JWKS).unwrap();
    let gw = Gateway::start(
        &vh.amqp_url,
        &[
            ("JWT_PUBLIC_KEYS", jwks.to_str().unwrap()),
            ("JWT_AUDIENCE", "mosaic"),
            ("JWT_ISSUER", "tests"),
        ],
    )
    .await;
    let claims = |d: Uuid| json!({"sub": d.to_string(), "exp": token::now() + 60, "aud": "mosaic", "iss": "tests"});
    for (alg, kid) in [
        (Algorithm::RS256, "rsa-1"),
        (Algorithm::ES256, "ec-1"),
        (Algorithm::EdDSA, "ed-1"),
        (Algorithm::HS256, "ignored"),
    ] {
        let d = Uuid::new_v4();
        let (dev, welcome) =
            Device::connect(gw.addr, &token::sign(alg, Some(kid), &claims(d))).await;
        assert_eq!(welcome["device"], d.to_string(), "{alg:?}");
        dev.close().await;
    }
    let d = Uuid::new_v4();
    for (why, t) in [
        (
            "unknown kid",
            token::sign(Algorithm::RS256, Some("../../etc/passwd"), &claims(d)),
        ),
        (
            "ES256 token naming the RSA key",
            token::sign(Algorithm::ES256, Some("rsa-1"), &claims(d)),
        ),
        (
            "RS256 token naming the EC key",
            token::sign(Algorithm::RS256, Some("ec-1"), &claims(d)),
        ),
        ("no kid", token::sign(Algorithm::RS256, None, &claims(d))),
        (
            "wrong aud",
            token::sign(
                Algorithm::RS256,
                Some("rsa-1"),
                &json!({"sub": d.to_string(), "exp": token::now() + 60, "aud": "other", "iss": "tests"}),
            ),
        ),
        (
            "no iss",
            token::sign(
                Algorithm::RS256,
                Some("rsa-1"),
                &json!({"sub": d.to_string(), "exp": token::now() + 60, "aud": "mosaic"}),
            ),
        ),
        (
            "nbf ahead",
            token::sign(
                Algorithm::RS256,
                Some("rsa-1"),
                &json!({"sub": d.to_string(), "exp": token::now() + 60, "nbf": token::now() + 60, "aud": "mosaic", "iss": "tests"}),
            ),
        ),
    ] {
        assert_eq!(
            Device::try_connect(gw.addr, Some(&t)).await.err(),
            Some(401),
            "{why}"
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_pem_public_key_verifies_tokens_without_kid() {
    let vh = broker().vhost("ws-pem").await;
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("key.pem");
    std::fs::write(&pem, token::ED_PUBLIC_PEM).unwrap();
    let gw = Gateway::start(&vh.amqp_url, &[("JWT_PUBLIC_KEYS", pem.to_str().unwrap())]).await;
    let d = Uuid::new_v4();
    let (dev, welcome) = Device::connect(
        gw.addr,
        &token::sign(Algorithm::EdDSA, None, &token::claims(d, 60)),
    )
    .await;
    assert_eq!(welcome["device"], d.to_string());
    dev.close().await;
    let rs = token::sign(Algorithm::RS256, None, &token::claims(d, 60));
    assert_eq!(
        Device::try_connect(gw.addr, Some(&rs)).await.err(),
        Some(401)
    );
    gw.stop().await;
}

#[tokio::test]
async fn refresh_extends_the_session_and_expiry_closes_it() {
    let vh = broker().vhost("ws-refresh").await;
    let gw = Gateway::start(&vh.amqp_url, &[("JWT_LEEWAY_SECS", "0")]).await;
    let mut life = Observer::bind(&vh.amqp_url, "mosaic.events", "lifecycle.*.disconnected").await;
    let dev = Uuid::new_v4();
    let (mut d, first) = Device::connect(gw.addr, &token::hs256(dev, 2)).await;
    d.send(&json!({"type":"auth","token": token::hs256(dev, 3600)}))
        .await;
    let again = d.recv().await;
    assert_eq!(again["type"], "welcome");
    assert_eq!(again["session"], first["session"]);
    assert!(again["expires_at"].as_str() > first["expires_at"].as_str());

    // A refresh naming another device: 4403.
    d.send(&json!({"type":"auth","token": token::hs256(Uuid::new_v4(), 3600)}))
        .await;
    assert_eq!(d.close_code().await, 4403);
    assert_eq!(life.next().await.headers["reason"], "forbidden");

    // No refresh: closed with 4401 "token expired" once exp passes.
    let (mut d, _) = Device::connect(gw.addr, &token::hs256(dev, 1)).await;
    let (_, ended) = d.ended_within(Duration::from_secs(10)).await;
    assert_eq!(ended, Ended::Close(4401, "token expired".into()));
    assert_eq!(life.next().await.headers["reason"], "token_expired");
    gw.stop().await;
}

#[test]
fn a_short_secret_is_refused_at_start() {
    let env = |k: &str| match k {
        "JWT_SECRET" => Some("too-short".to_owned()),
        _ => None,
    };
    let c = match mosaic_runtime::config::parse::<websocket_service::Config>(["ws"], env).unwrap() {
        mosaic_runtime::config::Parsed::Run(c) => c,
        mosaic_runtime::config::Parsed::Print(_) => unreachable!(),
    };
    let e = c.validate().unwrap_err();
    assert_eq!(e.setting, "JWT_SECRET");
    assert!(!e.to_string().contains("too-short"));
}

#[tokio::test]
async fn a_token_accepted_within_the_leeway_lasts_until_the_leeway_passes() {
    let vh = broker().vhost("ws-leeway").await;
    let gw = Gateway::start(&vh.amqp_url, &[("JWT_LEEWAY_SECS", "3")]).await;
    let dev = Uuid::new_v4();
    // Expired a second ago, within the leeway: welcomed, and the session is usable
    // (not closed the moment it starts) until `exp` plus the leeway.
    let (mut d, _) = Device::connect(gw.addr, &token::hs256(dev, -1)).await;
    d.send(&json!({"type":"event","name":"t","id":"1"})).await;
    assert_eq!(d.recv().await, json!({"type":"ack","id":"1"}));
    let (_, ended) = d.ended_within(Duration::from_secs(10)).await;
    assert_eq!(ended, Ended::Close(4401, "token expired".into()));
    gw.stop().await;
}
