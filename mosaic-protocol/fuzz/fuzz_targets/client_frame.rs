//! Arbitrary bytes as a device's text frame: the integer scan, exact parsing and
//! the frame parser must never panic, must agree with serde_json, and an accepted
//! event must satisfy every rule the gateway relies on before publishing it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mosaic_protocol::frame::{ClientFrame, MAX_ID_CHARS, MAX_NAME_CHARS, code};
use mosaic_protocol::{header, json};
use serde_json::Value;

/// Whether `literal` is `-`? digits, outside `i64::MIN..=u64::MAX`.
fn out_of_range_integer(literal: &[u8]) -> bool {
    let digits = literal.strip_prefix(b"-").unwrap_or(literal);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let significant = digits.iter().skip_while(|&&d| d == b'0').count();
    if significant > 30 {
        return true;
    }
    let value: i128 = std::str::from_utf8(literal).unwrap().parse().unwrap();
    value < i128::from(i64::MIN) || value > i128::from(u64::MAX)
}

fuzz_target!(|data: &[u8]| {
    // The scan never panics on any bytes, and what it reports is a real
    // out-of-range integer literal of the input.
    if let Err(e) = json::check_integers(data) {
        let literal = &data[e.offset..e.offset + e.len];
        assert!(
            out_of_range_integer(literal),
            "reported {:?}",
            String::from_utf8_lossy(literal)
        );
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    // parse_exact is serde_json plus the integer rule.
    let plain = serde_json::from_str::<Value>(text);
    match json::parse_exact(text) {
        Ok(v) => assert_eq!(Some(&v), plain.as_ref().ok()),
        Err(json::Error::Syntax(_)) => assert!(plain.is_err()),
        Err(json::Error::OutOfRange(_)) => assert!(plain.is_ok()),
        Err(other) => panic!("unexpected error {other:?}"),
    }

    match ClientFrame::parse(text) {
        Ok(ClientFrame::Event(ev)) => {
            let chars = ev.name.chars().count();
            assert!((1..=MAX_NAME_CHARS).contains(&chars));
            assert!(
                ev.id
                    .as_ref()
                    .is_none_or(|id| id.chars().count() <= MAX_ID_CHARS)
            );
            for k in ev.extra.keys() {
                assert!(!header::is_reserved(k), "{k}");
                assert!(!header::is_broker_reserved(k), "{k}");
                assert!(!["type", "name", "id", "data"].contains(&k.as_str()), "{k}");
            }
            assert!(json::text_len(&ev.extra) <= header::MAX_EXTRA_JSON_BYTES);
        }
        Ok(_) => {}
        Err(e) => assert!(
            e.code == code::BAD_FRAME || e.code == code::RESERVED_FIELD,
            "{}",
            e.code
        ),
    }
});
