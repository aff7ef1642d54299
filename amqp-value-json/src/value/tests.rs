use amq_protocol_types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString};
use serde_json::{Map, Value, json};

use super::*;

fn roundtrip(value: &Value) -> Value {
    let amqp = to_amqp_value(value).expect("to AMQP");
    from_amqp_value(&amqp).expect("back to JSON")
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn nested_arrays(levels: usize) -> Value {
    let mut value = json!("leaf");
    for _ in 0..levels {
        value = Value::Array(vec![value]);
    }
    value
}

fn nested_objects(levels: usize) -> Value {
    let mut value = json!(null);
    for i in 0..levels {
        let mut map = Map::new();
        map.insert(format!("k{i}"), value);
        value = Value::Object(map);
    }
    value
}

fn nested_tables(levels: usize) -> AMQPValue {
    let mut value = AMQPValue::Void;
    for _ in 0..levels {
        let mut table = FieldTable::default();
        table.insert(table_key("k").unwrap(), value);
        value = AMQPValue::FieldTable(table);
    }
    value
}

#[test]
fn key_of_255_bytes_is_accepted() {
    let key = "k".repeat(255);
    let table = to_field_table(&object(json!({ key.clone(): 1 }))).unwrap();
    assert!(table.contains_key(&key));
}

#[test]
fn key_over_255_bytes_is_a_typed_error() {
    let key = "k".repeat(256);
    let err = to_field_table(&object(json!({ key: 1 }))).unwrap_err();
    assert_eq!(err, Error::KeyTooLong { key_len: 256 });
}

#[test]
fn key_limit_counts_bytes_not_chars() {
    // 85 three-byte chars = 255 bytes: fine; 86 = 258 bytes: refused.
    let ok = "€".repeat(85);
    assert!(to_field_table(&object(json!({ ok: true }))).is_ok());
    let long = "€".repeat(86);
    let err = to_amqp_value(&json!({ "outer": [{ long: true }] })).unwrap_err();
    assert_eq!(err, Error::KeyTooLong { key_len: 258 });
}

#[test]
fn integers_in_i64_range_are_long_long_ints() {
    for i in [
        0,
        1,
        -1,
        255,
        256,
        i64::from(i32::MAX) + 1,
        i64::MAX,
        i64::MIN,
    ] {
        let value = json!(i);
        assert_eq!(to_amqp_value(&value).unwrap(), AMQPValue::LongLongInt(i));
        assert_eq!(roundtrip(&value), value);
    }
}

#[test]
fn integers_above_i64_max_travel_as_timestamps() {
    for u in [i64::MAX as u64 + 1, u64::MAX] {
        let value = json!(u);
        assert_eq!(to_amqp_value(&value).unwrap(), AMQPValue::Timestamp(u));
        let back = roundtrip(&value);
        assert_eq!(back.as_u64(), Some(u));
        assert_eq!(back, value);
    }
}

#[test]
fn floats_round_trip_bit_for_bit() {
    for f in [
        0.0,
        -0.0,
        1.0,
        -1.5,
        0.1,
        1e308,
        -1e308,
        f64::MAX,
        f64::MIN,
        f64::MIN_POSITIVE,
        5e-324,
        9_007_199_254_740_993.0,
    ] {
        let value = json!(f);
        assert_eq!(to_amqp_value(&value).unwrap(), AMQPValue::Double(f));
        let back = roundtrip(&value);
        assert!(back.is_f64(), "{f} stays a float");
        assert_eq!(back.as_f64().unwrap().to_bits(), f.to_bits(), "{f}");
    }
}

#[test]
fn null_bool_string() {
    assert_eq!(to_amqp_value(&json!(null)).unwrap(), AMQPValue::Void);
    assert_eq!(
        to_amqp_value(&json!(true)).unwrap(),
        AMQPValue::Boolean(true)
    );
    assert_eq!(
        to_amqp_value(&json!("hé")).unwrap(),
        AMQPValue::LongString(LongString::from("hé"))
    );
    for value in [
        json!(null),
        json!(true),
        json!(false),
        json!(""),
        json!("a\0b"),
    ] {
        assert_eq!(roundtrip(&value), value);
    }
}

#[test]
fn strings_never_become_short_strings() {
    fn assert_no_short_string(value: &AMQPValue) {
        match value {
            AMQPValue::ShortString(s) => panic!("short string {s} emitted"),
            AMQPValue::FieldArray(items) => {
                items.as_slice().iter().for_each(assert_no_short_string)
            }
            AMQPValue::FieldTable(table) => table
                .into_iter()
                .for_each(|(_, v)| assert_no_short_string(v)),
            _ => {}
        }
    }
    let value = json!({"a": "x", "b": ["y", {"c": "z"}], "d": ""});
    assert_no_short_string(&to_amqp_value(&value).unwrap());
}

#[test]
fn unicode_keys_and_strings() {
    let value = json!({
        "ключ": "значение",
        "🔑": "🦀",
        "": "empty key",
        "mixed ñ 中文 \u{10FFFF}": ["\u{0}", "\u{FEFF}"],
    });
    assert_eq!(roundtrip(&value), value);
    let table = to_field_table(&object(value.clone())).unwrap();
    assert_eq!(Value::Object(from_field_table(&table).unwrap()), value);
}

#[test]
fn empty_containers() {
    for value in [
        json!({}),
        json!([]),
        json!({"a": {}, "b": [], "c": [[], {}]}),
    ] {
        assert_eq!(roundtrip(&value), value);
    }
    assert_eq!(to_field_table(&Map::new()).unwrap(), FieldTable::default());
    assert_eq!(
        from_field_table(&FieldTable::default()).unwrap(),
        Map::new()
    );
}

#[test]
fn deep_nesting_of_200_levels_round_trips() {
    for value in [nested_arrays(200), nested_objects(200)] {
        assert_eq!(roundtrip(&value), value);
    }
}

#[test]
fn nesting_is_limited_with_a_typed_error() {
    let too_deep = Error::TooDeep {
        max_depth: MAX_DEPTH,
    };
    assert!(to_amqp_value(&nested_arrays(MAX_DEPTH)).is_ok());
    assert_eq!(
        to_amqp_value(&nested_arrays(MAX_DEPTH + 1)),
        Err(too_deep.clone())
    );
    assert_eq!(
        to_amqp_value(&nested_objects(MAX_DEPTH + 1)),
        Err(too_deep.clone())
    );
    assert!(from_amqp_value(&nested_tables(MAX_DEPTH)).is_ok());
    assert_eq!(
        from_amqp_value(&nested_tables(MAX_DEPTH + 1)),
        Err(too_deep.clone())
    );
    assert_eq!(from_amqp_value(&nested_tables(1_000)), Err(too_deep));
}

#[test]
fn non_utf8_long_string_is_a_typed_error() {
    let value = AMQPValue::LongString(LongString::from(vec![b'o', b'k', 0xff, b'!']));
    assert_eq!(
        from_amqp_value(&value),
        Err(Error::InvalidUtf8 { valid_up_to: 2 })
    );
    let mut table = FieldTable::default();
    table.insert(table_key("h").unwrap(), value);
    assert_eq!(
        from_field_table(&table),
        Err(Error::InvalidUtf8 { valid_up_to: 2 })
    );
}

#[test]
fn every_amqp_variant_has_a_rule() {
    let mut inner = FieldTable::default();
    inner.insert(table_key("x").unwrap(), AMQPValue::ShortShortInt(-1));
    let cases = [
        (AMQPValue::Boolean(true), json!(true)),
        (AMQPValue::ShortShortInt(i8::MIN), json!(-128)),
        (AMQPValue::ShortShortUInt(u8::MAX), json!(255)),
        (AMQPValue::ShortInt(i16::MIN), json!(-32768)),
        (AMQPValue::ShortUInt(u16::MAX), json!(65535)),
        (AMQPValue::LongInt(i32::MIN), json!(i32::MIN)),
        (AMQPValue::LongUInt(u32::MAX), json!(u32::MAX)),
        (AMQPValue::LongLongInt(i64::MIN), json!(i64::MIN)),
        (AMQPValue::Float(0.1), json!(0.1)),
        (AMQPValue::Float(-0.0), json!(-0.0)),
        (AMQPValue::Float(f32::MAX), json!(3.4028235e38)),
        (AMQPValue::Double(2.5), json!(2.5)),
        (
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 1234,
            }),
            json!("12.34"),
        ),
        (AMQPValue::ShortString("short".into()), json!("short")),
        (AMQPValue::LongString("long".into()), json!("long")),
        (
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::Void,
                AMQPValue::LongInt(7),
            ])),
            json!([null, 7]),
        ),
        (AMQPValue::Timestamp(1_700_000_000), json!(1_700_000_000u64)),
        (AMQPValue::FieldTable(inner), json!({"x": -1})),
        (
            AMQPValue::ByteArray(ByteArray::from(vec![0, 1, 255])),
            json!([0, 1, 255]),
        ),
        (AMQPValue::Void, json!(null)),
    ];
    for (amqp, expected) in cases {
        let json = from_amqp_value(&amqp).unwrap();
        assert_eq!(json, expected, "{amqp:?}");
        if let (Some(a), Some(b)) = (json.as_f64(), expected.as_f64()) {
            assert_eq!(a.to_bits(), b.to_bits(), "{amqp:?}");
        }
    }
}

#[test]
fn non_finite_floats_from_amqp_are_refused() {
    for value in [
        AMQPValue::Float(f32::NAN),
        AMQPValue::Float(f32::INFINITY),
        AMQPValue::Double(f64::NAN),
        AMQPValue::Double(f64::NEG_INFINITY),
    ] {
        assert_eq!(
            from_amqp_value(&value),
            Err(Error::NonFiniteFloat),
            "{value:?}"
        );
    }
}

#[test]
fn decimal_rendering_is_exact() {
    let cases = [
        (0, 0, "0"),
        (0, 42, "42"),
        (1, 5, "0.5"),
        (3, 5, "0.005"),
        (2, 1234, "12.34"),
        (2, 1200, "12.00"),
        (4, 1234, "0.1234"),
        (10, u32::MAX, "0.4294967295"),
    ];
    for (scale, value, text) in cases {
        assert_eq!(decimal_to_string(DecimalValue { scale, value }), text);
    }
    let tiny = decimal_to_string(DecimalValue {
        scale: 255,
        value: 1,
    });
    assert_eq!(tiny, format!("0.{}1", "0".repeat(254)));
}

#[test]
fn integer_objects_keep_order_independent_equality() {
    // FieldTable sorts its keys; JSON object equality ignores order.
    let value = json!({"z": 1, "a": 2, "m": [1, 2, 3]});
    assert_eq!(roundtrip(&value), value);
}

#[test]
fn max_depth_fits_a_small_stack_even_unoptimized() {
    // Guard against frame growth: both directions at the limit on a 1 MiB
    // thread (half the default for spawned and tokio worker threads).
    let handle = std::thread::Builder::new()
        .stack_size(1024 * 1024)
        .spawn(|| {
            let value = nested_objects(MAX_DEPTH);
            let amqp = to_amqp_value(&value).unwrap();
            let back = from_amqp_value(&amqp).unwrap();
            assert_eq!(back, value);
            let value = nested_arrays(MAX_DEPTH);
            assert_eq!(
                from_amqp_value(&to_amqp_value(&value).unwrap()).unwrap(),
                value
            );
        })
        .unwrap();
    handle.join().unwrap();
}
