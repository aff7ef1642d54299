//! `serde_json::Value` <-> [`AMQPValue`] and object <-> [`FieldTable`].
//!
//! Also home of the per-variant rules shared with the serde path in
//! `ser.rs` / `de.rs`, so both paths map every value the same way.

use std::collections::BTreeMap;

use amq_protocol_types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use serde_json::{Map, Number, Value};

use crate::Error;

/// Deepest nesting of arrays and tables the conversions accept.
///
/// The outermost array or table is level 1. Deeper input is refused with
/// [`Error::TooDeep`] instead of risking a stack overflow: the conversions
/// recurse once per level.
pub const MAX_DEPTH: usize = 256;

/// Map a JSON value to the AMQP field value that carries it.
///
/// See the [crate documentation](crate#json---amqp) for the rules.
///
/// # Errors
///
/// [`Error::KeyTooLong`] for an object key over 255 bytes,
/// [`Error::TooDeep`] for nesting beyond [`MAX_DEPTH`].
pub fn to_amqp_value(value: &Value) -> Result<AMQPValue, Error> {
    json_to_amqp(value, 0)
}

/// Map a JSON object to an AMQP field table (for example message headers).
///
/// # Errors
///
/// As [`to_amqp_value`].
pub fn to_field_table(object: &Map<String, Value>) -> Result<FieldTable, Error> {
    object_to_table(object, enter(0)?)
}

/// Map an AMQP field value to JSON.
///
/// Every variant has a rule, listed in the [crate documentation](crate#amqp---json).
///
/// # Errors
///
/// [`Error::InvalidUtf8`] for a long string that is not UTF-8,
/// [`Error::NonFiniteFloat`] for NaN or infinity,
/// [`Error::TooDeep`] for nesting beyond [`MAX_DEPTH`].
pub fn from_amqp_value(value: &AMQPValue) -> Result<Value, Error> {
    amqp_to_json(value, 0)
}

/// Map an AMQP field table to a JSON object.
///
/// # Errors
///
/// As [`from_amqp_value`].
pub fn from_field_table(table: &FieldTable) -> Result<Map<String, Value>, Error> {
    table_to_object(table, enter(0)?)
}

/// Step one level deeper, failing past [`MAX_DEPTH`].
pub(crate) fn enter(depth: usize) -> Result<usize, Error> {
    let depth = depth + 1;
    if depth > MAX_DEPTH {
        Err(Error::TooDeep {
            max_depth: MAX_DEPTH,
        })
    } else {
        Ok(depth)
    }
}

// The recursive functions keep only the containers in their own frame and
// leave scalars to separate functions: unoptimized builds give a function one
// stack slot per temporary of every match arm, and these frames repeat once
// per nesting level.
fn json_to_amqp(value: &Value, depth: usize) -> Result<AMQPValue, Error> {
    match value {
        Value::Array(items) => {
            let depth = enter(depth)?;
            let mut array = Vec::with_capacity(items.len());
            for item in items {
                array.push(json_to_amqp(item, depth)?);
            }
            Ok(AMQPValue::FieldArray(FieldArray::from(array)))
        }
        Value::Object(object) => Ok(AMQPValue::FieldTable(object_to_table(
            object,
            enter(depth)?,
        )?)),
        scalar => json_scalar_to_amqp(scalar, depth),
    }
}

fn json_scalar_to_amqp(value: &Value, depth: usize) -> Result<AMQPValue, Error> {
    match value {
        Value::Null => Ok(AMQPValue::Void),
        Value::Bool(b) => Ok(AMQPValue::Boolean(*b)),
        Value::Number(n) => number_to_amqp(n),
        Value::String(s) => Ok(string_to_amqp(s)),
        Value::Array(_) | Value::Object(_) => json_to_amqp(value, depth),
    }
}

fn object_to_table(object: &Map<String, Value>, depth: usize) -> Result<FieldTable, Error> {
    let mut table = BTreeMap::new();
    for (key, value) in object {
        table.insert(table_key(key)?, json_to_amqp(value, depth)?);
    }
    Ok(FieldTable::from(table))
}

/// A table key, checked: `ShortString::from` panics above 255 bytes.
pub(crate) fn table_key(key: &str) -> Result<ShortString, Error> {
    ShortString::try_new(key).map_err(|_| Error::KeyTooLong { key_len: key.len() })
}

/// Strings always become long strings: RabbitMQ closes the connection on a
/// short string in a field value.
pub(crate) fn string_to_amqp(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes()))
}

/// Integers in `i64` range become `LongLongInt`; larger ones (up to
/// `u64::MAX`) become `Timestamp`, whose reverse rule is an unsigned number.
pub(crate) fn signed_to_amqp(i: i64) -> AMQPValue {
    AMQPValue::LongLongInt(i)
}

/// See [`signed_to_amqp`].
pub(crate) fn unsigned_to_amqp(u: u64) -> AMQPValue {
    match i64::try_from(u) {
        Ok(i) => AMQPValue::LongLongInt(i),
        Err(_) => AMQPValue::Timestamp(u),
    }
}

/// Finite floats become `Double`.
pub(crate) fn float_to_amqp(f: f64) -> Result<AMQPValue, Error> {
    if f.is_finite() {
        Ok(AMQPValue::Double(f))
    } else {
        Err(Error::NonFiniteFloat)
    }
}

fn number_to_amqp(n: &Number) -> Result<AMQPValue, Error> {
    if let Some(i) = n.as_i64() {
        Ok(signed_to_amqp(i))
    } else if let Some(u) = n.as_u64() {
        Ok(unsigned_to_amqp(u))
    } else if let Some(f) = n.as_f64() {
        float_to_amqp(f)
    } else {
        Err(Error::IntegerOutOfRange)
    }
}

fn amqp_to_json(value: &AMQPValue, depth: usize) -> Result<Value, Error> {
    match value {
        AMQPValue::FieldArray(items) => {
            let depth = enter(depth)?;
            let mut array = Vec::with_capacity(items.as_slice().len());
            for item in items.as_slice() {
                array.push(amqp_to_json(item, depth)?);
            }
            Ok(Value::Array(array))
        }
        AMQPValue::FieldTable(table) => Ok(Value::Object(table_to_object(table, enter(depth)?)?)),
        AMQPValue::ByteArray(bytes) => {
            enter(depth)?;
            Ok(byte_array_to_json(bytes))
        }
        scalar => amqp_scalar_to_json(scalar, depth),
    }
}

fn amqp_scalar_to_json(value: &AMQPValue, depth: usize) -> Result<Value, Error> {
    Ok(match value {
        AMQPValue::Void => Value::Null,
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(i) => Value::from(*i),
        AMQPValue::ShortShortUInt(u) => Value::from(*u),
        AMQPValue::ShortInt(i) => Value::from(*i),
        AMQPValue::ShortUInt(u) => Value::from(*u),
        AMQPValue::LongInt(i) => Value::from(*i),
        AMQPValue::LongUInt(u) => Value::from(*u),
        AMQPValue::LongLongInt(i) => Value::from(*i),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::Float(f) => finite_number(float32_to_f64(*f))?,
        AMQPValue::Double(d) => finite_number(*d)?,
        AMQPValue::DecimalValue(d) => Value::String(decimal_to_string(*d)),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Value::String(long_string_str(s)?.to_owned()),
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) | AMQPValue::ByteArray(_) => {
            return amqp_to_json(value, depth);
        }
    })
}

fn table_to_object(table: &FieldTable, depth: usize) -> Result<Map<String, Value>, Error> {
    let mut object = Map::with_capacity(table.inner().len());
    for (key, value) in table {
        object.insert(key.as_str().to_owned(), amqp_to_json(value, depth)?);
    }
    Ok(object)
}

fn byte_array_to_json(bytes: &ByteArray) -> Value {
    Value::Array(bytes.as_slice().iter().map(|&b| Value::from(b)).collect())
}

fn finite_number(f: f64) -> Result<Value, Error> {
    Number::from_f64(f)
        .map(Value::Number)
        .ok_or(Error::NonFiniteFloat)
}

/// A long string as `&str`, or [`Error::InvalidUtf8`].
pub(crate) fn long_string_str(s: &LongString) -> Result<&str, Error> {
    std::str::from_utf8(s.as_bytes()).map_err(|e| Error::InvalidUtf8 {
        valid_up_to: e.valid_up_to(),
    })
}

/// An AMQP `Float` as the `f64` nearest to its shortest decimal form, so that
/// `0.1f32` becomes `0.1`, not `0.10000000149011612`. Non-finite values stay
/// non-finite (and are refused by the callers).
pub(crate) fn float32_to_f64(f: f32) -> f64 {
    if !f.is_finite() {
        return f64::from(f);
    }
    // `Display` for f32 prints the shortest decimal that reads back as `f`.
    f.to_string().parse::<f64>().unwrap_or(f64::from(f))
}

/// A finite `f64` for serde visitors, or [`Error::NonFiniteFloat`].
pub(crate) fn finite(f: f64) -> Result<f64, Error> {
    if f.is_finite() {
        Ok(f)
    } else {
        Err(Error::NonFiniteFloat)
    }
}

/// The exact decimal text of `value * 10^-scale`, e.g. `{scale: 2, value: 1234}`
/// is `"12.34"` and `{scale: 3, value: 5}` is `"0.005"`. Trailing zeros are kept.
pub(crate) fn decimal_to_string(d: DecimalValue) -> String {
    let digits = d.value.to_string();
    let scale = usize::from(d.scale);
    if scale == 0 {
        return digits;
    }
    let mut out = String::with_capacity(digits.len().max(scale + 1) + 1);
    if digits.len() <= scale {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', scale - digits.len()));
        out.push_str(&digits);
    } else {
        let (int, frac) = digits.split_at(digits.len() - scale);
        out.push_str(int);
        out.push('.');
        out.push_str(frac);
    }
    out
}

#[cfg(test)]
mod tests;
