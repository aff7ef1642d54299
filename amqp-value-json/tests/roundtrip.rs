//! Round-trip laws, checked through the AMQP wire encoding of
//! `amq-protocol-types` itself:
//!
//! JSON -> `FieldTable` -> bytes -> `FieldTable` -> JSON is the identity, and
//! so is a derived struct -> `to_table` -> bytes -> `from_table`.

use amq_protocol_types::generation::gen_field_table;
use amq_protocol_types::parsing::parse_field_table;
use amqp_value_json::amqp::{AMQPValue, FieldTable, ShortString};
use amqp_value_json::{
    Error, MAX_DEPTH, from_amqp_value, from_field_table, from_table, to_amqp_value, to_field_table,
    to_table,
};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Encode with the library's own generator.
fn to_wire(table: &FieldTable) -> Vec<u8> {
    let generate = gen_field_table(table);
    generate(Vec::new().into()).expect("encode").write
}

/// Parse with the library's own parser; the whole input must be consumed.
fn from_wire(bytes: &[u8]) -> FieldTable {
    let (rest, table) = parse_field_table(bytes).expect("decode");
    assert!(rest.is_empty(), "{} trailing bytes", rest.len());
    table
}

fn through_wire(object: &Map<String, Value>) -> Map<String, Value> {
    let table = to_field_table(object).expect("to table");
    let parsed = from_wire(&to_wire(&table));
    assert_eq!(parsed, table);
    from_field_table(&parsed).expect("back to JSON")
}

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

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>().prop_filter("finite", |f| f.is_finite()),
        prop::sample::select(vec![
            0.0,
            -0.0,
            1e308,
            -1e308,
            f64::MAX,
            f64::MIN,
            f64::MIN_POSITIVE,
            5e-324,
            -5e-324,
            0.1,
        ]),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (i64::MAX as u64..=u64::MAX).prop_map(Value::from),
        prop::sample::select(vec![i64::MIN, i64::MAX, i64::MIN + 1, -1, 0, 1])
            .prop_map(Value::from),
        prop::sample::select(vec![i64::MAX as u64 + 1, u64::MAX]).prop_map(Value::from),
        float().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ]
}

/// Keys up to 255 bytes: arbitrary unicode (including controls and the
/// empty key), and long ASCII keys right at the limit.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "(?s).{0,60}",
        1 => "[a-z]{250,255}",
        1 => "[é🦀]{60,63}",
    ]
}

fn json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(8, 128, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A generated value wrapped in up to `max` arrays/objects.
fn deep(max: usize) -> impl Strategy<Value = Value> {
    (
        json(),
        prop::collection::vec(prop::option::of(key()), 0..=max),
    )
        .prop_map(|(mut value, wrappers)| {
            for wrapper in wrappers {
                value = match wrapper {
                    None => Value::Array(vec![value]),
                    Some(key) => Value::Object(Map::from_iter([(key, value)])),
                };
            }
            value
        })
}

fn wrap(value: Value) -> Map<String, Value> {
    Map::from_iter([("v".to_string(), value)])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn json_through_wire_is_identity(object in prop::collection::btree_map(key(), json(), 0..12)) {
        let object: Map<String, Value> = object.into_iter().collect();
        let back = through_wire(&object);
        prop_assert!(same(&Value::Object(back.clone()), &Value::Object(object.clone())), "{back:?} != {object:?}");
    }

    #[test]
    fn any_json_value_round_trips(value in json()) {
        let back = from_amqp_value(&to_amqp_value(&value).unwrap()).unwrap();
        prop_assert!(same(&back, &value));
        let back = through_wire(&wrap(value.clone()));
        prop_assert!(same(&back["v"], &value));
    }

    #[test]
    fn serde_path_agrees_with_json_path(value in json()) {
        let object = wrap(value);
        let via_json = to_field_table(&object).unwrap();
        prop_assert_eq!(&to_table(&object).unwrap(), &via_json);
        let back: Map<String, Value> = from_table(&via_json).unwrap();
        prop_assert_eq!(back, from_field_table(&via_json).unwrap());
    }

    #[test]
    fn keys_over_255_bytes_are_refused(key in "(?s).{64,100}", pad in 0usize..300) {
        let key = format!("{key}{}", "x".repeat(pad));
        let result = to_field_table(&wrap(Value::Object(Map::from_iter([(key.clone(), Value::Null)]))));
        if key.len() > 255 {
            prop_assert_eq!(result, Err(Error::KeyTooLong { key_len: key.len() }));
        } else {
            prop_assert!(result.is_ok());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn deep_json_through_wire_is_identity(value in deep(200)) {
        let back = through_wire(&wrap(value.clone()));
        prop_assert!(same(&back["v"], &value));
    }
}

#[test]
fn nesting_right_at_the_limit_survives_the_wire() {
    let mut value = Value::from(u64::MAX);
    for _ in 0..MAX_DEPTH - 1 {
        value = Value::Array(vec![value]);
    }
    let back = through_wire(&wrap(value.clone()));
    assert_eq!(back["v"], value);
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Status {
    Online,
    Offline { since: u64 },
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reading {
    sensor: String,
    value: f64,
    raw: i32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Envelope {
    device_id: String,
    seq: u64,
    offset: i64,
    tiny: i8,
    ratio: f32,
    flag: bool,
    note: Option<String>,
    tags: Vec<String>,
    readings: Vec<Reading>,
    status: Status,
    extra: std::collections::BTreeMap<String, i64>,
}

fn reading() -> impl Strategy<Value = Reading> {
    (any::<String>(), float(), any::<i32>()).prop_map(|(sensor, value, raw)| Reading {
        sensor,
        value,
        raw,
    })
}

fn status() -> impl Strategy<Value = Status> {
    prop_oneof![
        Just(Status::Online),
        any::<u64>().prop_map(|since| Status::Offline { since }),
        any::<String>().prop_map(Status::Error),
    ]
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (
        (any::<String>(), any::<u64>(), any::<i64>(), any::<i8>()),
        (
            any::<f32>().prop_filter("finite", |f| f.is_finite()),
            any::<bool>(),
            any::<Option<String>>(),
        ),
        prop::collection::vec(any::<String>(), 0..5),
        prop::collection::vec(reading(), 0..5),
        status(),
        prop::collection::btree_map(key(), any::<i64>(), 0..5),
    )
        .prop_map(
            |(
                (device_id, seq, offset, tiny),
                (ratio, flag, note),
                tags,
                readings,
                status,
                extra,
            )| Envelope {
                device_id,
                seq,
                offset,
                tiny,
                ratio,
                flag,
                note,
                tags,
                readings,
                status,
                extra,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn derived_struct_through_wire_is_identity(envelope in envelope()) {
        let table = to_table(&envelope).unwrap();
        let parsed = from_wire(&to_wire(&table));
        prop_assert_eq!(&parsed, &table);
        let back: Envelope = from_table(&parsed).unwrap();
        prop_assert_eq!(back.ratio.to_bits(), envelope.ratio.to_bits());
        prop_assert_eq!(back, envelope);
    }
}

/// Every `AMQPValue` variant, for the AMQP -> JSON direction.
fn amqp_leaf() -> impl Strategy<Value = AMQPValue> {
    use amqp_value_json::amqp::{ByteArray, DecimalValue, LongString};
    prop_oneof![
        Just(AMQPValue::Void),
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<f32>().prop_map(AMQPValue::Float),
        any::<f64>().prop_map(AMQPValue::Double),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        any::<Vec<u8>>().prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        any::<String>().prop_map(|s| AMQPValue::LongString(LongString::from(s))),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        any::<Vec<u8>>().prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// AMQP -> JSON never panics, gives the same answer before and after the
    /// wire, and JSON -> AMQP -> JSON is then stable.
    #[test]
    fn any_amqp_table_maps_to_json_or_a_typed_error(
        entries in prop::collection::btree_map("(?s).{0,20}", amqp_leaf(), 0..12)
    ) {
        let mut table = FieldTable::default();
        for (k, v) in entries {
            table.insert(ShortString::try_new(k).unwrap(), v);
        }
        let direct = from_field_table(&table);
        let parsed = from_wire(&to_wire(&table));
        let wire = from_field_table(&parsed);
        prop_assert_eq!(&direct, &wire);
        if let Ok(object) = direct {
            let again = from_field_table(&to_field_table(&object).unwrap()).unwrap();
            prop_assert!(same(&Value::Object(again), &Value::Object(object)));
            let typed: Map<String, Value> = from_table(&table).unwrap();
            prop_assert_eq!(typed, from_field_table(&table).unwrap());
        } else {
            let typed_error = matches!(direct, Err(Error::InvalidUtf8 { .. } | Error::NonFiniteFloat));
            prop_assert!(typed_error, "unexpected {:?}", direct);
        }
    }
}

/// Every `AMQPValue` variant, `ShortString` included, nested in arrays and tables.
fn amqp_any() -> impl Strategy<Value = AMQPValue> {
    use amqp_value_json::amqp::FieldArray;
    let leaf = prop_oneof![
        8 => amqp_leaf(),
        1 => "(?s).{0,40}".prop_map(|s| AMQPValue::ShortString(ShortString::try_new(s).unwrap())),
        1 => "[a-z]{255}".prop_map(|s| AMQPValue::ShortString(ShortString::try_new(s).unwrap())),
    ];
    leaf.prop_recursive(6, 96, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8)
                .prop_map(|items| AMQPValue::FieldArray(FieldArray::from(items))),
            prop::collection::btree_map(key(), inner, 0..8).prop_map(|entries| {
                let mut table = FieldTable::default();
                for (k, v) in entries {
                    table.insert(ShortString::try_new(k).unwrap(), v);
                }
                AMQPValue::FieldTable(table)
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// `encoded_len` is the length of what the library's own generator writes.
    #[test]
    fn encoded_len_is_the_wire_length(
        entries in prop::collection::btree_map(key(), amqp_any(), 0..10)
    ) {
        let mut table = FieldTable::default();
        for (k, v) in entries {
            table.insert(ShortString::try_new(k).unwrap(), v);
        }
        prop_assert_eq!(amqp_value_json::encoded_len(&table), to_wire(&table).len());
    }

    #[test]
    fn encoded_len_of_json_tables_is_the_wire_length(
        object in prop::collection::btree_map(key(), json(), 0..12)
    ) {
        let object: Map<String, Value> = object.into_iter().collect();
        let table = to_field_table(&object).unwrap();
        prop_assert_eq!(amqp_value_json::encoded_len(&table), to_wire(&table).len());
    }
}

#[test]
fn encoded_len_of_edge_tables() {
    use amqp_value_json::amqp::FieldArray;
    let empty = FieldTable::default();
    assert_eq!(amqp_value_json::encoded_len(&empty), 4);
    assert_eq!(to_wire(&empty).len(), 4);
    // Small integers: 9 bytes each in AMQP, 2 in JSON.
    let numbers: Vec<Value> = (0..20_000).map(|i| Value::from(i % 10)).collect();
    let table = to_field_table(&wrap(Value::Array(numbers))).unwrap();
    assert_eq!(
        amqp_value_json::encoded_len(&table),
        4 + 1 + 1 + 1 + 4 + 20_000 * 9
    );
    assert_eq!(amqp_value_json::encoded_len(&table), to_wire(&table).len());
    // Deeper than any recursion would like.
    let mut value = AMQPValue::Void;
    for _ in 0..100_000 {
        value = AMQPValue::FieldArray(FieldArray::from(vec![value]));
    }
    let mut table = FieldTable::default();
    table.insert(ShortString::try_new("v").unwrap(), value);
    assert_eq!(
        amqp_value_json::encoded_len(&table),
        4 + 2 + 1 + 100_000 * 5
    );
    // Dropping a value this deep recurses in its destructor: leak it instead.
    std::mem::forget(table);
}
