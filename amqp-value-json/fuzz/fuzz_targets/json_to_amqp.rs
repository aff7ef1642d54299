//! Arbitrary bytes -> JSON (when they parse) -> AMQP -> JSON must give the
//! input back, or a typed error (long key, too deep); never a panic.
#![no_main]

use amqp_value_json::{Error, from_amqp_value, to_amqp_value};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

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

fuzz_target!(|data: &[u8]| {
    // serde_json stops at 128 levels itself.
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    match to_amqp_value(&value) {
        Ok(amqp) => {
            let back = from_amqp_value(&amqp).expect("AMQP made from JSON maps back");
            assert!(same(&back, &value), "{value:?} came back as {back:?}");
        }
        Err(Error::KeyTooLong { key_len }) => assert!(key_len > 255),
        Err(Error::TooDeep { .. }) => {}
        Err(other) => panic!("unexpected error {other:?} for {value:?}"),
    }
});
