//! Numbers arrive unchanged: device frames with random extra fields and data go
//! through a real websocket-service, RabbitMQ, device-service and a Hive stand-in,
//! and Hive's JSON must hold exactly the frame's values (integer or float, every bit
//! of every double, `-0.0` included).

use std::cell::{Cell, RefCell};
use std::time::Duration;

use mosaic_protocol::header;
use mosaic_tests::device::Device;
use mosaic_tests::hive::{HiveStandIn, Recorded};
use mosaic_tools::token::{Signer, TokenSpec};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::{JWT_SECRET, Stack, WAIT};

/// How many random frames one run sends.
const CASES: u32 = 128;

fn token(device: Uuid) -> String {
    let signer = Signer::hmac(JWT_SECRET.as_bytes(), None).unwrap();
    mosaic_tools::token::mint(&signer, &TokenSpec::new(device, Duration::from_secs(600))).unwrap()
}

/// Doubles that trip careless code: rounding neighbours, the extremes, `-0.0`, and
/// two that serde_json reads one bit off unless built with `float_roundtrip`.
fn awkward() -> Vec<f64> {
    vec![
        0.1 + 0.2,
        0.1,
        5e-324,
        -5e-324,
        f64::MAX,
        f64::MIN,
        f64::MIN_POSITIVE,
        f64::EPSILON,
        -0.0,
        0.0,
        1e16,
        9007199254740993.0,
        "1.0715660391465826e-75".parse().unwrap(),
        "2.2250738585072011e-308".parse().unwrap(),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (i64::MAX as u64..=u64::MAX).prop_map(Value::from),
        prop::sample::select(vec![i64::MIN, i64::MAX, -1, 0, 1]).prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        prop::sample::select(awkward()).prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        "[0-9\"\\\\.eE+-]{0,24}".prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(("(?s).{0,12}", inner), 0..6)
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}

/// A top-level name a device may use for an extra field.
fn extra_name() -> impl Strategy<Value = String> {
    "[a-zA-Zé🦀_][a-zA-Z0-9é🦀 _.-]{0,15}".prop_filter("not reserved", |k| {
        !header::is_reserved(k)
            && !header::is_broker_reserved(k)
            && !["type", "name", "id", "data"].contains(&k.as_str())
    })
}

fn extras() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::vec((extra_name(), json_value()), 0..6)
        .prop_map(|entries| entries.into_iter().collect())
}

/// `v` with every object's keys sorted: AMQP tables are sorted, so Hive sees the
/// extra fields' nested keys in name order.
fn sorted(v: &Value) -> Value {
    match v {
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        Value::Object(m) => {
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), sorted(v)))
                    .collect(),
            )
        }
        other => other.clone(),
    }
}

/// Equal as values, and equal as text once keys are sorted: the text tells `1`
/// from `1.0`, `-0.0` from `0.0` and every bit of a double (serde_json writes the
/// shortest text that reads back as the same double).
fn exactly(got: &Value, want: &Value) -> Result<(), TestCaseError> {
    prop_assert_eq!(got, want);
    let (g, w) = (sorted(got).to_string(), sorted(want).to_string());
    prop_assert_eq!(g, w);
    Ok(())
}

fn find<'a>(seen: &'a [Recorded], id: &str) -> Option<&'a Recorded> {
    seen.iter().find(|r| r.json()["id"] == id)
}

#[test]
fn random_device_frames_reach_hive_exactly() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let hive = rt.block_on(HiveStandIn::start());
    let stack = rt.block_on(Stack::start_with_hive("e2e-numbers", &hive.url()));
    let device = Uuid::new_v4();
    let (d, _) = rt.block_on(Device::connect(stack.ws_addr, &token(device)));
    let d = RefCell::new(d);
    let n = Cell::new(0u32);

    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&(extras(), json_value()), |(extra, data)| {
        n.set(n.get() + 1);
        let id = format!("p-{}", n.get());
        let mut frame = Map::new();
        frame.insert("type".into(), json!("event"));
        frame.insert("name".into(), json!("prop"));
        frame.insert("id".into(), json!(id));
        frame.insert("data".into(), data.clone());
        frame.extend(extra.clone());
        let text = Value::Object(frame).to_string();
        let mut d = d.borrow_mut();
        rt.block_on(async {
            d.send_text(&text).await;
            let ack = d.recv().await;
            prop_assert_eq!(&ack, &json!({"type": "ack", "id": id}), "{}", text);
            let seen = hive
                .wait_until(WAIT, &format!("event {id} at Hive"), |s| {
                    find(s, &id).is_some()
                })
                .await;
            let rec = find(&seen, &id).unwrap();
            let got = rec.json();
            exactly(&got["data"], &data)?;
            // The body's `data` is the text the gateway wrote, byte for byte.
            let tail = format!("\"data\":{data}}}");
            prop_assert!(
                rec.body.ends_with(tail.as_bytes()),
                "{} does not end with {}",
                String::from_utf8_lossy(&rec.body),
                tail
            );
            for (k, v) in &extra {
                exactly(&got[k], v)?;
            }
            let mut keys: Vec<&str> = got
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            keys.sort_unstable();
            let mut want: Vec<&str> = extra.keys().map(String::as_str).collect();
            want.extend(header::INJECTED);
            want.extend(["name", "id", "data"]);
            want.sort_unstable();
            prop_assert_eq!(keys, want);
            Ok(())
        })
    });
    rt.block_on(async {
        d.into_inner().close().await;
        stack.stop().await;
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(n.get() >= CASES, "only {} cases ran", n.get());
}

/// Number texts chosen by hand, checked against the standard library's own exact
/// reading of the same text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awkward_number_texts_reach_hive_exactly() {
    let hive = HiveStandIn::start().await;
    let stack = Stack::start_with_hive("e2e-number-texts", &hive.url()).await;
    let device = Uuid::new_v4();
    let (mut d, _) = Device::connect(stack.ws_addr, &token(device)).await;
    let floats = [
        "0.30000000000000004",
        "5e-324",
        "4.9406564584124654e-324",
        "1.7976931348623157e308",
        "-0.0",
        "1.0715660391465826e-75",
        "2.2250738585072011e-308",
        "-1.81996730402717e-179",
        "1E+2",
        "0.1000000000000000055511151231257827",
    ];
    let list = floats.join(",");
    let ints = "[18446744073709551615,-9223372036854775808,9223372036854775808,-0,0,-1]";
    let text = format!(
        r#"{{"type":"event","name":"texts","id":"t-1","data":[{list}],"extra":{{"f":[{list}]}},
            "ints":{ints}}}"#
    );
    d.send_text(&text).await;
    assert_eq!(d.recv().await, json!({"type": "ack", "id": "t-1"}));
    let seen = hive
        .wait_until(WAIT, "the event at Hive", |s| find(s, "t-1").is_some())
        .await;
    let got = find(&seen, "t-1").unwrap().json();
    for list in [&got["data"], &got["extra"]["f"]] {
        let list = list.as_array().expect("an array");
        assert_eq!(list.len(), floats.len());
        for (got, text) in list.iter().zip(floats) {
            let want: f64 = text.parse().unwrap();
            assert!(got.is_f64(), "{text} came back as {got}");
            assert_eq!(
                got.as_f64().unwrap().to_bits(),
                want.to_bits(),
                "{text} came back as {got}"
            );
        }
    }
    // `-0` is read as the float `-0.0`: the sign is kept.
    assert_eq!(
        got["ints"].to_string(),
        "[18446744073709551615,-9223372036854775808,9223372036854775808,-0.0,0,-1]"
    );
    d.close().await;
    stack.stop().await;
}
