//! Arbitrary bytes as the body of an event or request on the REST API: reading and
//! checking it must never panic, a refusal must be one of the documented answers,
//! and an accepted body must become a headers table that fits one AMQP frame and
//! carries every extra field unchanged.
#![no_main]

use amqp_value_json::{encoded_len, from_field_table};
use device_service::api::{EventBody, RequestBody, parse_body};
use device_service::commands::{CommandError, headers};
use libfuzzer_sys::fuzz_target;
use mosaic_protocol::command::Kind;
use mosaic_protocol::header;
use serde_json::{Map, Value};

/// Equality that also tells `0.0` from `-0.0` and integers from floats.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            (x.is_i64(), x.is_u64(), x.is_f64()) == (y.is_i64(), y.is_u64(), y.is_f64())
                && match (x.as_f64(), y.as_f64()) {
                    (Some(p), Some(q)) if x.is_f64() => p.to_bits() == q.to_bits(),
                    _ => x == y,
                }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fn check(kind: Kind, name: &str, extra: &Map<String, Value>, deadline: Option<&str>) {
    let id = uuid::Uuid::nil();
    match headers(kind, id, name, extra, deadline) {
        Ok(table) => {
            assert!(encoded_len(&table) <= mosaic_amqp::max_headers_bytes(0));
            let back = from_field_table(&table).expect("a table made from JSON maps back");
            for (k, v) in extra {
                assert!(same(&back[k], v), "{k}: {v} came back as {}", back[k]);
                assert!(!header::is_broker_reserved(k), "{k}");
            }
            assert_eq!(back[header::NAME], name);
            assert_eq!(back[header::KIND], kind.as_str());
            let fixed = 3 + usize::from(deadline.is_some());
            assert_eq!(back.len(), extra.len() + fixed);
        }
        Err(e) => assert!(
            matches!(
                e,
                CommandError::BadName
                    | CommandError::Reserved(_)
                    | CommandError::Extra(_)
                    | CommandError::Unmappable(_)
                    | CommandError::TableTooLarge { .. }
            ),
            "{e}"
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    match parse_body::<EventBody>(data) {
        Ok(body) => check(Kind::Event, &body.name, &body.extra, None),
        Err(e) => assert_eq!((e.status.as_u16(), e.code), (400, "bad_request")),
    }
    match parse_body::<RequestBody>(data) {
        Ok(body) => check(
            Kind::Request,
            &body.name,
            &body.extra,
            Some("2030-01-01T00:00:00Z"),
        ),
        Err(e) => assert_eq!((e.status.as_u16(), e.code), (400, "bad_request")),
    }
});
