//! Arbitrary bytes -> AMQP field table (when they parse) -> JSON -> AMQP must
//! never panic; for tables made only of the variants JSON -> AMQP produces,
//! the table must come back unchanged.
#![no_main]

use amq_protocol_types::parsing::parse_field_table;
use amq_protocol_types::{AMQPValue, FieldTable};
use amqp_value_json::{Error, from_field_table, from_table, to_field_table};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

/// The upstream parser recurses without a limit: keep its input (and so its
/// nesting) small enough for its own stack use.
const MAX_INPUT: usize = 4096;

/// True if JSON -> AMQP gives exactly this value back.
fn canonical(value: &AMQPValue) -> bool {
    match value {
        AMQPValue::Void | AMQPValue::Boolean(_) | AMQPValue::LongLongInt(_) => true,
        AMQPValue::Double(d) => d.is_finite(),
        AMQPValue::Timestamp(t) => *t > i64::MAX as u64,
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).is_ok(),
        AMQPValue::FieldArray(items) => items.as_slice().iter().all(canonical),
        AMQPValue::FieldTable(table) => canonical_table(table),
        _ => false,
    }
}

fn canonical_table(table: &FieldTable) -> bool {
    table.into_iter().all(|(_, v)| canonical(v))
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT {
        return;
    }
    let Ok((_, table)) = parse_field_table(data) else {
        return;
    };
    match from_field_table(&table) {
        Ok(object) => {
            let again = to_field_table(&object).expect("JSON made from AMQP maps back");
            if canonical_table(&table) {
                assert_eq!(again, table);
            }
            let typed: Map<String, Value> = from_table(&table).expect("serde path agrees");
            assert_eq!(typed, object);
        }
        Err(Error::InvalidUtf8 { .. } | Error::NonFiniteFloat | Error::TooDeep { .. }) => {
            let typed = from_table::<Map<String, Value>>(&table);
            assert!(
                typed.is_err(),
                "serde path accepted what the value path refused"
            );
        }
        Err(other) => panic!("unexpected error {other:?}"),
    }
});
