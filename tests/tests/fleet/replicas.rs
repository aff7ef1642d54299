//! Two gateways, two device-service replicas, 200 devices.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use mosaic_tests::device::{Device, Ended};
use mosaic_tests::hive::HiveStandIn;
use mosaic_tests::{broker, eventually, within};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use uuid::Uuid;

use crate::{
    Behaviour, ChildGateway, DeviceService, Gateway, Seen, TOKEN, WAIT, ndjson_lines, simulate,
    token,
};

const DEVICES: usize = 200;
/// Devices that declared only the service `other`: never asked.
const NOT_OFFERING: usize = 10;
const SILENT: usize = 15;
const LATE: usize = 15;
const LATE_BY: Duration = Duration::from_millis(1200);

fn behaviour(i: usize) -> Behaviour {
    match i {
        0 => Behaviour::Leave,
        1 => Behaviour::Twice,
        // Spread over both gateways (13 is odd: the indices alternate parity).
        i if i % 13 == 3 && i < 13 * SILENT => Behaviour::Silent,
        i if i % 13 == 6 && i < 13 * LATE => Behaviour::Late(LATE_BY),
        _ => Behaviour::Answer,
    }
}

/// Connects device `i`: even ones to `a`, odd ones to `b`; every one in group
/// `fleet`, every fourth also in `quarter`; the last [`NOT_OFFERING`] declare
/// only the service `other` in their `auth` frame.
async fn connect(
    i: usize,
    device: Uuid,
    a: std::net::SocketAddr,
    b: std::net::SocketAddr,
) -> Device {
    let addr = if i.is_multiple_of(2) { a } else { b };
    let groups: &[&str] = if i.is_multiple_of(4) {
        &["fleet", "quarter"]
    } else {
        &["fleet"]
    };
    let t = token(device, groups);
    if i >= DEVICES - NOT_OFFERING {
        let mut d = Device::try_connect(addr, None).await.expect("upgrade");
        assert_eq!(d.recv().await["type"], "hello");
        d.send(&json!({"type":"auth","token":t,"services":["other"],"attributes":{"model":"x1"}}))
            .await;
        assert_eq!(d.recv().await["type"], "welcome");
        assert_eq!(
            d.recv().await,
            json!({"type":"registered","services":["other"]})
        );
        d
    } else {
        Device::connect(addr, &t).await.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fleet_across_two_gateways_and_two_device_services() {
    mosaic_tests::binary::raise_open_files(4096);
    let vhost = broker().vhost("fleet-replicas").await;
    let hive = HiveStandIn::start().await;
    let a = ChildGateway::start(&vhost.amqp_url).await;
    let b = Gateway::start(&vhost.amqp_url).await;
    let ds1 = DeviceService::start(&vhost.amqp_url, &hive.url(), &[]).await;
    let ds2 = DeviceService::start(&vhost.amqp_url, &hive.url(), &[]).await;
    let ds = [&ds1, &ds2];

    // 200 devices over both gateways.
    let ids: Vec<Uuid> = (0..DEVICES).map(|_| Uuid::new_v4()).collect();
    let (seen_tx, mut seen) = mpsc::channel(4 * DEVICES);
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let d = connect(i, *id, a.process.addr, b.addr).await;
        tasks.push(simulate(d, i, behaviour(i), seen_tx.clone()));
    }
    let on_a: HashSet<Uuid> = ids.iter().step_by(2).copied().collect();
    let gateway_of = |d: &Uuid| if on_a.contains(d) { a.id } else { b.id };

    // Presence of devices on either gateway, through either device-service.
    for s in ds {
        for d in [ids[2], ids[3]] {
            let started = Instant::now();
            let (status, p) = s.get(&format!("/v1/devices/{d}/presence")).await;
            assert_eq!(status, 200, "{p}");
            assert_eq!(p["connected"], true, "{p}");
            assert_eq!(p["gateway"], gateway_of(&d).to_string(), "{p}");
            assert_eq!(p["services"], Value::Null, "{p}");
            assert!(p["groups"].as_array().unwrap().contains(&json!("fleet")));
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{:?}",
                started.elapsed()
            );
        }
        let last = ids[DEVICES - 1];
        let (_, p) = s.get(&format!("/v1/devices/{last}/presence")).await;
        assert_eq!(p["services"], json!(["other"]), "{p}");
        assert_eq!(p["attributes"], json!({"model":"x1"}), "{p}");
        let started = Instant::now();
        let (status, p) = s
            .get(&format!("/v1/devices/{}/presence", Uuid::new_v4()))
            .await;
        assert_eq!((status, p), (200, json!({"connected": false})));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    // The listing finds every device exactly once, through either replica, paged.
    for s in ds {
        let all = s.list_all("", 37).await;
        let listed: Vec<String> = all
            .iter()
            .map(|d| d["device"].as_str().unwrap().to_owned())
            .collect();
        let unique: BTreeSet<&String> = listed.iter().collect();
        assert_eq!(unique.len(), listed.len(), "a device listed twice");
        let want: BTreeSet<String> = ids.iter().map(Uuid::to_string).collect();
        assert_eq!(unique.into_iter().cloned().collect::<BTreeSet<_>>(), want);
        let mut sorted = listed.clone();
        sorted.sort();
        assert_eq!(sorted, listed, "pages in id order");
        for d in &all {
            let id: Uuid = d["device"].as_str().unwrap().parse().unwrap();
            assert_eq!(d["gateway"], gateway_of(&id).to_string());
        }
        let quarter = s.list_all("&group=quarter", 1000).await;
        assert_eq!(quarter.len(), DEVICES / 4);
        let other = s.list_all("&service=other", 7).await;
        assert_eq!(other.len(), NOT_OFFERING);
    }

    // A group request to all 200: each device once, in the right bucket.
    let started = Instant::now();
    let (status, r) = ds1
        .post(
            "/v1/groups/fleet/requests",
            &json!({"name":"read","data":{"q":1},"timeout_ms":3000}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let took = started.elapsed();
    let asked = DEVICES - NOT_OFFERING;
    assert_eq!(r["asked"], asked, "{r}");
    assert_eq!(r["gateways"], 2, "{r}");
    let answers = r["answers"].as_array().unwrap();
    let timed_out = r["timed_out"].as_array().unwrap();
    let left = r["left"].as_array().unwrap();
    assert_eq!(timed_out.len(), SILENT, "{r}");
    assert_eq!(left, &vec![json!(ids[0].to_string())], "{r}");
    assert_eq!(r["busy"], json!([]));
    assert_eq!(answers.len(), asked - SILENT - 1, "{r}");
    let mut everyone: Vec<String> = answers
        .iter()
        .map(|a| a["device"].as_str().unwrap().to_owned())
        .chain(timed_out.iter().map(|d| d.as_str().unwrap().to_owned()))
        .chain(left.iter().map(|d| d.as_str().unwrap().to_owned()))
        .collect();
    everyone.sort();
    let mut want: Vec<String> = ids[..DEVICES - NOT_OFFERING]
        .iter()
        .map(Uuid::to_string)
        .collect();
    want.sort();
    assert_eq!(everyone, want, "each device asked is in exactly one bucket");
    for a in answers {
        let d: Uuid = a["device"].as_str().unwrap().parse().unwrap();
        let i = ids.iter().position(|x| *x == d).unwrap();
        assert_eq!(a["data"], json!({"n": i}));
        assert_eq!(a["status"], "ok");
    }
    for d in timed_out {
        let d: Uuid = d.as_str().unwrap().parse().unwrap();
        let i = ids.iter().position(|x| *x == d).unwrap();
        assert_eq!(behaviour(i), Behaviour::Silent, "device {i} timed out");
    }
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(6),
        "{took:?}"
    );

    // What the devices saw: one request each, the same id, and a second answer refused.
    let request_id = r["id"].as_str().unwrap().to_owned();
    let mut requests = HashMap::new();
    let mut refused = false;
    within(WAIT, "the devices' reports", async {
        while requests.len() < asked || !refused {
            match seen.recv().await.unwrap() {
                (i, Seen::Request(f)) => {
                    assert_eq!(f["id"], request_id.as_str());
                    assert_eq!(f["name"], "read");
                    assert!(f["deadline"].is_string());
                    assert!(requests.insert(i, f).is_none(), "device {i} asked twice");
                }
                (1, Seen::After(f)) => {
                    assert_eq!(f["code"], "unknown_request", "{f}");
                    refused = true;
                }
                (i, Seen::After(f)) => panic!("device {i} got {f}"),
                _ => {}
            }
        }
    })
    .await;
    assert!(requests.keys().all(|i| *i < DEVICES - NOT_OFFERING));

    // Streamed: a broadcast request through the other replica, read line by line.
    let started = Instant::now();
    let res = reqwest::Client::new()
        .post(ds2.url("/v1/broadcast/requests"))
        .bearer_auth(TOKEN)
        .header("accept", "application/x-ndjson")
        .json(&json!({"name":"read","timeout_ms":3000}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/x-ndjson");
    let lines = ndjson_lines(res, started).await;
    let (last_at, last) = lines.last().unwrap();
    let summary = &last["summary"];
    // Device 0 left during the first request: 189 asked now.
    let asked2 = asked - 1;
    assert_eq!(summary["asked"], asked2, "{last}");
    assert_eq!(summary["timed_out"], SILENT, "{last}");
    assert_eq!(summary["answered"], asked2 - SILENT, "{last}");
    assert_eq!(summary["left"], 0);
    let answer_lines = &lines[..lines.len() - 1];
    assert_eq!(answer_lines.len(), asked2 - SILENT);
    let unique: HashSet<&str> = answer_lines
        .iter()
        .map(|(_, l)| {
            l["device"]
                .as_str()
                .expect("an answer line names its device")
        })
        .collect();
    assert_eq!(unique.len(), answer_lines.len(), "one line per device");
    // The prompt answers were streamed before the late ones existed.
    let first_at = answer_lines[0].0;
    assert!(first_at < LATE_BY, "first line after {first_at:?}");
    assert!(*last_at >= Duration::from_millis(2900), "{last_at:?}");

    // Kick, through either replica, a device on either gateway.
    let kicked = [(ids[4], &ds2), (ids[7], &ds1)];
    for (d, s) in kicked {
        let (status, _, body) = s
            .call(
                reqwest::Method::DELETE,
                &format!("/v1/devices/{d}/session"),
                None,
            )
            .await;
        assert_eq!(status, 204, "{body}");
    }
    let mut closes = HashMap::new();
    within(WAIT, "the kicked devices' close", async {
        while closes.len() < 2 {
            if let (i, Seen::Ended(e)) = seen.recv().await.unwrap()
                && (i == 4 || i == 7)
            {
                closes.insert(i, e);
            }
        }
    })
    .await;
    for e in closes.values() {
        assert_eq!(*e, Ended::Close(4410, "kicked".into()));
    }
    for (d, s) in kicked {
        let (status, _, body) = s
            .call(
                reqwest::Method::DELETE,
                &format!("/v1/devices/{d}/session"),
                None,
            )
            .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("device_not_connected"))
        );
    }
    for (d, _) in kicked {
        hive.wait_until(WAIT, "the kicked lifecycle message", |s| {
            s.iter().any(|r| {
                let v = r.json();
                v["device"] == d.to_string()
                    && v["name"] == "disconnected"
                    && v["reason"] == "kicked"
            })
        })
        .await;
    }

    // SIGKILL gateway A: each of its devices still connected gets `gateway_lost`,
    // exactly once, and no device of B does.
    let mut a = a;
    let killed_at = Instant::now();
    a.process.kill().await;
    let gone: HashSet<String> = on_a
        .iter()
        .filter(|d| **d != ids[0] && **d != ids[4])
        .map(Uuid::to_string)
        .collect();
    let lost_for = |s: &[mosaic_tests::hive::Recorded]| -> Vec<String> {
        s.iter()
            .map(|r| r.json())
            .filter(|v| v["name"] == "disconnected" && v["reason"] == "gateway_lost")
            .map(|v| v["device"].as_str().unwrap().to_owned())
            .collect()
    };
    hive.wait_until(
        Duration::from_secs(30),
        "gateway_lost for every device of A",
        |s| {
            let lost: HashSet<String> = lost_for(s).into_iter().collect();
            gone.iter().all(|d| lost.contains(d))
        },
    )
    .await;
    let within_30s = killed_at.elapsed();
    assert!(within_30s < Duration::from_secs(30), "{within_30s:?}");
    // Give a second replica time to (wrongly) publish them again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lost = lost_for(&hive.requests());
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for d in &lost {
        *counts.entry(d.as_str()).or_default() += 1;
    }
    assert!(
        counts.values().all(|n| *n == 1),
        "published once: {counts:?}"
    );
    let lost_set: HashSet<String> = lost.into_iter().collect();
    assert_eq!(lost_set, gone, "exactly the devices of the lost gateway");
    for r in hive.requests() {
        let v = r.json();
        if v["reason"] == "gateway_lost" {
            assert_eq!(v["gateway"], a.id.to_string(), "{v}");
            assert_eq!(v["kind"], "lifecycle", "{v}");
        }
    }
    // The view knows: presence of a device of A is `connected: false` at once.
    let (_, p) = ds2.get(&format!("/v1/devices/{}/presence", ids[2])).await;
    assert_eq!(p["connected"], false, "{p}");
    let survivors = eventually(WAIT, "the listing without A's devices", || async {
        let all = ds1.list_all("", 1000).await;
        (all.len() == DEVICES / 2 - 1).then_some(all)
    })
    .await;
    assert!(survivors.iter().all(|d| d["gateway"] == b.id.to_string()));

    for t in tasks {
        t.abort();
    }
    ds1.stop().await;
    ds2.stop().await;
    b.stop().await;
}
