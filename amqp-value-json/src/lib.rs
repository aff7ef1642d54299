//! Lossless mapping between JSON values and AMQP 0-9-1 field values and tables.
//!
//! AMQP message headers and queue/exchange arguments are *field tables*
//! ([`FieldTable`](amqp::FieldTable): sorted string keys of at most 255 bytes mapping to typed
//! [`AMQPValue`](amqp::AMQPValue)s). This crate converts them to and from `serde_json` values,
//! and to and from any serde type, without going through the broker or any I/O.
//! The types are those of `amq-protocol-types`, the same ones `lapin::types`
//! re-exports.
//!
//! ```
//! use amqp_value_json::{from_field_table, to_field_table};
//! use amqp_value_json::amqp::AMQPValue;
//! use serde_json::json;
//!
//! let headers = json!({"device": "d-42", "seq": 7, "tags": ["a", "b"], "ttl": null});
//! let object = headers.as_object().expect("an object");
//!
//! let table = to_field_table(object)?;
//! assert_eq!(table.inner()["seq"], AMQPValue::LongLongInt(7));
//!
//! let back = from_field_table(&table)?;
//! assert_eq!(&back, object);
//! # Ok::<(), amqp_value_json::Error>(())
//! ```
//!
//! With serde types, no intermediate `serde_json::Value` is built:
//!
//! ```
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! struct Meta { device: String, seq: u64, retry: Option<u8> }
//!
//! let meta = Meta { device: "d-42".into(), seq: 7, retry: None };
//! let table = amqp_value_json::to_table(&meta)?;
//! assert_eq!(amqp_value_json::from_table::<Meta>(&table)?, meta);
//! # Ok::<(), amqp_value_json::Error>(())
//! ```
//!
//! # JSON -> AMQP
//!
//! | JSON | AMQP |
//! |---|---|
//! | object | `FieldTable`; a key over 255 bytes is [`Error::KeyTooLong`] |
//! | array | `FieldArray` |
//! | string | `LongString` (never `ShortString`: RabbitMQ closes the connection on one) |
//! | integer in `i64` range | `LongLongInt`, always, whatever its size |
//! | integer above `i64::MAX` | `Timestamp` (an unsigned 64-bit field), which maps back to the same number |
//! | float | `Double` (always finite: JSON has no NaN or infinity) |
//! | `true` / `false` | `Boolean` |
//! | `null` | `Void` |
//!
//! So **JSON -> AMQP -> JSON is the identity** for every JSON value whose
//! object keys fit in 255 bytes and whose nesting is at most [`MAX_DEPTH`]:
//! integer/float distinction, the sign of `-0.0` and every `u64` included.
//! Object key order is not kept (field tables are sorted), which JSON object
//! equality ignores.
//!
//! # AMQP -> JSON
//!
//! Every [`AMQPValue`](amqp::AMQPValue) variant has a rule, so values written by other clients
//! convert too:
//!
//! | AMQP | JSON |
//! |---|---|
//! | `FieldTable` | object |
//! | `FieldArray` | array |
//! | `LongString` | string; if it is not UTF-8, [`Error::InvalidUtf8`] (never a lossy replacement) |
//! | `ShortString` | string |
//! | `Boolean` | bool |
//! | `ShortShortInt`, `ShortInt`, `LongInt`, `LongLongInt` (signed) | integer |
//! | `ShortShortUInt`, `ShortUInt`, `LongUInt` (unsigned) | integer |
//! | `Timestamp` | unsigned integer (seconds, unchanged) |
//! | `Double` | number; NaN and infinities are [`Error::NonFiniteFloat`] |
//! | `Float` | number: the `f64` nearest the shortest decimal that reads back as the same `f32`, so `0.1f32` gives `0.1`; NaN and infinities are [`Error::NonFiniteFloat`] |
//! | `DecimalValue {scale, value}` | string with the exact decimal, trailing zeros kept: `{2, 1234}` gives `"12.34"`, `{3, 5}` gives `"0.005"` |
//! | `ByteArray` | array of integers `0..=255` (as `serde_json` writes bytes) |
//! | `Void` | `null` |
//!
//! AMQP -> JSON -> AMQP is therefore the identity only for the variants JSON ->
//! AMQP produces (`LongString` text, `LongLongInt`, `Timestamp` above
//! `i64::MAX`, finite `Double`, `Boolean`, `Void`, arrays and tables of them);
//! the other variants come back as their canonical counterpart.
//!
//! # Serde
//!
//! [`to_table`] and [`from_table`] are a `serde::Serializer` and a
//! `serde::Deserializer` over the AMQP types and follow the rules above:
//! `to_table(x)` gives the same table as `to_field_table` on
//! `serde_json::to_value(x)`, and deserializing into `serde_json::Value` gives
//! what [`from_amqp_value`] gives. The exceptions: non-finite floats are an
//! error rather than `null`, serde byte strings become `ByteArray` rather than
//! an array of numbers, and bool or float map keys are refused with
//! [`Error::KeyNotString`]. In addition:
//!
//! - Rust integers of every width become `LongLongInt` (`Timestamp` above
//!   `i64::MAX`); `i128`/`u128` outside `i64::MIN..=u64::MAX` are
//!   [`Error::IntegerOutOfRange`]. `f32` becomes `Double`.
//! - Byte slices (`serialize_bytes`, e.g. `serde_bytes`) become `ByteArray`;
//!   `deserialize_bytes` accepts `ByteArray`, `LongString` (even non-UTF-8)
//!   and `ShortString`.
//! - `None` and `()` become `Void`; enums are externally tagged, as in
//!   `serde_json` (`"Variant"` or `{"Variant": ...}`).
//! - Map keys may be strings, chars, integers or unit variants; integer keys
//!   are written as decimal text and parsed back.
//! - [`to_table`] refuses a value that does not serialize as a map or struct
//!   with [`Error::NotATable`].
//!
//! # Depth
//!
//! All conversions recurse once per nested array or table and stop with
//! [`Error::TooDeep`] beyond [`MAX_DEPTH`] (256) levels, so no input can
//! overflow the stack here. At the limit, measured in an unoptimized build,
//! the value functions use under 768 KiB of stack and the serde path into
//! `serde_json::Value` under 1 MiB (under 256 KiB each when optimized): within
//! the 2 MiB of a default spawned or tokio worker thread. (Values nested thousands of levels
//! deep can still overflow the stack when they are *dropped*, or encoded and
//! parsed by the AMQP codec, which has no depth limit: the frame size bounds
//! that input.)
//!
//! # Wire size
//!
//! [`encoded_len`] gives the exact number of bytes a table takes on the wire, so a
//! publisher can refuse a table that would not fit its connection's `frame_max`
//! before RabbitMQ closes the connection over it.
//!
//! # Layout
//!
//! - `error`: the [`Error`] enum.
//! - `value`: `serde_json::Value` <-> [`AMQPValue`](amqp::AMQPValue) and the per-variant rules.
//! - `ser`: the serializer behind [`to_table`].
//! - `de`: the deserializer behind [`from_table`].
//! - `size`: [`encoded_len`], the wire size of a table.
#![deny(missing_docs, missing_debug_implementations, unsafe_code)]

mod de;
mod error;
mod ser;
mod size;
mod value;

/// The AMQP types this crate maps to, re-exported from `amq-protocol-types`
/// (they are the same types as `lapin::types`).
pub mod amqp {
    pub use amq_protocol_types::{
        AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
    };
}

pub use de::from_table;
pub use error::Error;
pub use ser::to_table;
pub use size::encoded_len;
pub use value::{MAX_DEPTH, from_amqp_value, from_field_table, to_amqp_value, to_field_table};
