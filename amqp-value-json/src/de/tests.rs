//! Tests of the serde path (both directions).

use std::collections::{BTreeMap, HashMap};

use amq_protocol_types::{AMQPValue, ByteArray, DecimalValue, FieldTable, LongString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::value::table_key;
use crate::{Error, MAX_DEPTH, from_field_table, from_table, to_field_table, to_table};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Kind {
    Plain,
    Wrapped(i32),
    Pair(u8, String),
    Named { a: bool, b: Option<f64> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Inner {
    id: String,
    values: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Envelope {
    small: i8,
    big: u64,
    huge: u64,
    min: i64,
    wide: i128,
    ratio: f64,
    single: f32,
    flag: bool,
    letter: char,
    text: String,
    none: Option<String>,
    some: Option<u16>,
    unit: (),
    tuple: (u8, String),
    inner: Inner,
    list: Vec<Inner>,
    kinds: Vec<Kind>,
    by_number: BTreeMap<u32, String>,
    by_name: HashMap<String, Value>,
    raw: Vec<u8>,
}

fn sample() -> Envelope {
    Envelope {
        small: -8,
        big: 42,
        huge: u64::MAX,
        min: i64::MIN,
        wide: -5,
        ratio: -0.0,
        single: 0.1,
        flag: true,
        letter: 'é',
        text: "héllo 🦀".into(),
        none: None,
        some: Some(7),
        unit: (),
        tuple: (1, "one".into()),
        inner: Inner {
            id: "a".into(),
            values: vec![1, -1],
        },
        list: vec![],
        kinds: vec![
            Kind::Plain,
            Kind::Wrapped(-3),
            Kind::Pair(9, "nine".into()),
            Kind::Named { a: false, b: None },
        ],
        by_number: [(1, "x".into()), (20, "y".into())].into(),
        by_name: [("k".to_string(), json!({"deep": [1, "two", null]}))].into(),
        raw: vec![0, 255],
    }
}

#[test]
fn derived_struct_round_trips() {
    let value = sample();
    let table = to_table(&value).unwrap();
    let back: Envelope = from_table(&table).unwrap();
    assert_eq!(back, value);
    assert_eq!(back.ratio.to_bits(), (-0.0f64).to_bits());
}

#[test]
fn serde_path_matches_json_path() {
    let value = sample();
    let via_serde = to_table(&value).unwrap();
    let json = serde_json::to_value(&value).unwrap();
    let via_json = to_field_table(json.as_object().unwrap()).unwrap();
    assert_eq!(via_serde, via_json);

    let as_json: Map<String, Value> = from_table(&via_serde).unwrap();
    assert_eq!(as_json, from_field_table(&via_serde).unwrap());
    assert_eq!(Value::Object(as_json), json);
}

#[test]
fn serializer_emits_the_documented_variants() {
    let table = to_table(&sample()).unwrap();
    let get = |k: &str| table.inner()[k].clone();
    assert_eq!(get("small"), AMQPValue::LongLongInt(-8));
    assert_eq!(get("huge"), AMQPValue::Timestamp(u64::MAX));
    assert_eq!(get("single"), AMQPValue::Double(f64::from(0.1f32)));
    assert_eq!(
        get("text"),
        AMQPValue::LongString(LongString::from("héllo 🦀"))
    );
    assert_eq!(get("letter"), AMQPValue::LongString(LongString::from("é")));
    assert_eq!(get("none"), AMQPValue::Void);
    assert_eq!(get("unit"), AMQPValue::Void);
    let AMQPValue::FieldTable(by_number) = get("by_number") else {
        panic!("by_number is a table")
    };
    assert!(by_number.contains_key("20"));
}

#[test]
fn bytes_become_byte_arrays_and_back() {
    struct Bytes<'a>(&'a [u8]);
    impl Serialize for Bytes<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }
    #[derive(Debug, PartialEq)]
    struct ByteBuf(Vec<u8>);
    impl<'de> Deserialize<'de> for ByteBuf {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl serde::de::Visitor<'_> for V {
                type Value = ByteBuf;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E>(self, v: &[u8]) -> Result<ByteBuf, E> {
                    Ok(ByteBuf(v.to_vec()))
                }
            }
            d.deserialize_byte_buf(V)
        }
    }

    let table = to_table(&BTreeMap::from([("b", Bytes(&[1, 2, 0xff]))])).unwrap();
    assert_eq!(
        table.inner()["b"],
        AMQPValue::ByteArray(ByteArray::from(vec![1, 2, 0xff]))
    );
    let back: BTreeMap<String, ByteBuf> = from_table(&table).unwrap();
    assert_eq!(back["b"], ByteBuf(vec![1, 2, 0xff]));

    // Non-UTF-8 long strings are readable as bytes, not as strings.
    let mut table = FieldTable::default();
    table.insert(
        table_key("b").unwrap(),
        AMQPValue::LongString(vec![0xff].into()),
    );
    let back: BTreeMap<String, ByteBuf> = from_table(&table).unwrap();
    assert_eq!(back["b"], ByteBuf(vec![0xff]));
    let err = from_table::<BTreeMap<String, String>>(&table).unwrap_err();
    assert_eq!(err, Error::InvalidUtf8 { valid_up_to: 0 });
}

#[test]
fn to_table_refuses_non_tables() {
    assert_eq!(to_table(&[1, 2]), Err(Error::NotATable));
    assert_eq!(to_table("text"), Err(Error::NotATable));
    assert_eq!(to_table(&Kind::Plain), Err(Error::NotATable));
    // A struct variant is a single-key table.
    let table = to_table(&Kind::Named { a: true, b: None }).unwrap();
    assert_eq!(
        from_table::<Kind>(&table).unwrap(),
        Kind::Named { a: true, b: None }
    );
}

#[test]
fn serializer_errors_are_typed() {
    let long = BTreeMap::from([("k".repeat(256), 1)]);
    assert_eq!(to_table(&long), Err(Error::KeyTooLong { key_len: 256 }));
    assert_eq!(
        to_table(&BTreeMap::from([("x", i128::MIN)])),
        Err(Error::IntegerOutOfRange)
    );
    assert_eq!(
        to_table(&BTreeMap::from([("x", u128::from(u64::MAX) + 1)])),
        Err(Error::IntegerOutOfRange)
    );
    assert_eq!(
        to_table(&BTreeMap::from([("x", u128::from(u64::MAX))]))
            .unwrap()
            .inner()["x"],
        AMQPValue::Timestamp(u64::MAX)
    );
    assert_eq!(
        to_table(&BTreeMap::from([("x", f64::NAN)])),
        Err(Error::NonFiniteFloat)
    );
    assert_eq!(
        to_table(&BTreeMap::from([("x", f32::INFINITY)])),
        Err(Error::NonFiniteFloat)
    );
    assert_eq!(
        to_table(&BTreeMap::from([((1, 2), 1)])),
        Err(Error::KeyNotString)
    );
    assert_eq!(
        to_table(&BTreeMap::from([(true, 1)])),
        Err(Error::KeyNotString)
    );
}

#[test]
fn deserializer_errors_are_typed() {
    let mut table = FieldTable::default();
    table.insert(table_key("x").unwrap(), AMQPValue::Double(f64::NAN));
    assert_eq!(
        from_table::<Map<String, Value>>(&table),
        Err(Error::NonFiniteFloat)
    );

    let table = to_table(&json!({"id": 5})).unwrap();
    let err = from_table::<Inner>(&table).unwrap_err();
    assert!(matches!(err, Error::Custom(_)), "{err:?}");
}

#[test]
fn foreign_variants_deserialize_into_typed_fields() {
    let mut table = FieldTable::default();
    let mut put = |k: &str, v: AMQPValue| {
        table.insert(table_key(k).unwrap(), v);
    };
    put("a", AMQPValue::ShortShortUInt(200));
    put("b", AMQPValue::LongInt(-7));
    put("c", AMQPValue::Float(1.5));
    put("d", AMQPValue::ShortString("s".into()));
    put(
        "e",
        AMQPValue::DecimalValue(DecimalValue {
            scale: 1,
            value: 15,
        }),
    );
    put("f", AMQPValue::Timestamp(1_700_000_000));

    #[derive(Debug, Deserialize, PartialEq)]
    struct Foreign {
        a: u8,
        b: i16,
        c: f32,
        d: String,
        e: String,
        f: u64,
    }
    let got: Foreign = from_table(&table).unwrap();
    assert_eq!(
        got,
        Foreign {
            a: 200,
            b: -7,
            c: 1.5,
            d: "s".into(),
            e: "1.5".into(),
            f: 1_700_000_000
        }
    );
    assert!(from_table::<BTreeMap<String, i8>>(&table).is_err());
}

#[test]
fn deep_nesting_through_serde() {
    let mut value = json!(1);
    for _ in 0..199 {
        value = json!([value]);
    }
    let wrapped = json!({ "v": value });
    let table = to_table(&wrapped).unwrap();
    let back: Value = from_table(&table).unwrap();
    assert_eq!(back, wrapped);

    let mut value = json!(1);
    for _ in 0..MAX_DEPTH {
        value = json!([value]);
    }
    let too_deep = json!({ "v": value });
    let err = Error::TooDeep {
        max_depth: MAX_DEPTH,
    };
    assert_eq!(to_table(&too_deep), Err(err.clone()));
    let table = to_field_table(json!({ "v": too_deep["v"][0] }).as_object().unwrap()).unwrap();
    let nested = FieldTable::from(BTreeMap::from([(
        table_key("w").unwrap(),
        AMQPValue::FieldTable(table),
    )]));
    assert_eq!(from_table::<Value>(&nested), Err(err));
}
