//! The AMQP 0-9-1 wire size of a field table, without encoding it.

use amq_protocol_types::{AMQPValue, FieldTable};

/// The exact number of bytes `table` takes on the wire, as `amq-protocol-types`
/// (and so lapin) encodes it: the 4-byte length prefix included.
///
/// Use it to refuse a table before publishing it: RabbitMQ closes the whole
/// connection (501 `FRAME_ERROR`) over a content-header frame larger than the
/// negotiated `frame_max`. JSON text is no guide: a small integer in an array takes
/// 2 bytes of JSON (`1,`) and 9 in AMQP (type tag and 8-byte `LongLongInt`).
///
/// The walk uses its own stack, not recursion, so any nesting depth is fine.
///
/// ```
/// use amqp_value_json::{encoded_len, to_field_table};
/// use serde_json::json;
///
/// let object = json!({"n": [1, 2, 3]});
/// let table = to_field_table(object.as_object().unwrap())?;
/// // 4 (table length) + 1 + 1 ("n") + 1 (tag 'A') + 4 (array length) + 3 * 9
/// assert_eq!(encoded_len(&table), 38);
/// # Ok::<(), amqp_value_json::Error>(())
/// ```
pub fn encoded_len(table: &FieldTable) -> usize {
    let mut len = 0;
    let mut pending: Vec<&AMQPValue> = Vec::new();
    len += table_len(table, &mut pending);
    while let Some(value) = pending.pop() {
        len += raw_len(value, &mut pending);
    }
    len
}

/// A table's length prefix, and each entry's key and type tag; its values are
/// pushed on `pending`.
fn table_len<'a>(table: &'a FieldTable, pending: &mut Vec<&'a AMQPValue>) -> usize {
    let mut len = 4;
    for (key, value) in table {
        // Key as a short string (length byte + bytes), then the type tag.
        len += 1 + key.as_str().len() + 1;
        pending.push(value);
    }
    len
}

/// A value's size without its type tag; nested values are pushed on `pending`.
fn raw_len<'a>(value: &'a AMQPValue, pending: &mut Vec<&'a AMQPValue>) -> usize {
    match value {
        AMQPValue::Void => 0,
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        AMQPValue::FieldArray(items) => {
            let items = items.as_slice();
            pending.extend(items);
            // Length prefix, and a type tag per element.
            4 + items.len()
        }
        AMQPValue::FieldTable(table) => table_len(table, pending),
    }
}
