//! The encoded size of a headers table (until amqp-value-json provides it).

use lapin::types::{AMQPValue, FieldTable};

/// Bytes a table takes on the wire: a 4-byte length, then per entry a short-string
/// key and a typed value.
pub(crate) fn encoded_len(t: &FieldTable) -> usize {
    4 + t
        .inner()
        .iter()
        .map(|(k, v)| 1 + k.as_str().len() + 1 + raw_len(v))
        .sum::<usize>()
}

fn raw_len(v: &AMQPValue) -> usize {
    match v {
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(a) => 4 + a.as_slice().len(),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(|v| 1 + raw_len(v)).sum::<usize>(),
        AMQPValue::FieldTable(t) => encoded_len(t),
        AMQPValue::Void => 0,
    }
}
