//! The deserializer behind [`from_table`]: AMQP values straight into any
//! `Deserialize` type, with the same rules as `value.rs`.

use std::collections::btree_map;

use amq_protocol_types::{AMQPValue, FieldTable, ShortString};
use serde::de::value::{BorrowedStrDeserializer, SeqDeserializer};
use serde::de::{self, DeserializeOwned, DeserializeSeed, Deserializer, IntoDeserializer, Visitor};
use serde::forward_to_deserialize_any;

use crate::Error;
use crate::value::{decimal_to_string, enter, finite, float32_to_f64, long_string_str};

/// Deserialize a `T` from an AMQP field table, without an intermediate
/// `serde_json::Value`.
///
/// See the [crate documentation](crate#serde) for the rules.
///
/// # Errors
///
/// [`Error::InvalidUtf8`], [`Error::NonFiniteFloat`], [`Error::TooDeep`] as
/// for [`from_field_table`](crate::from_field_table), and [`Error::Custom`]
/// when the table does not fit `T` (missing field, wrong type, ...).
pub fn from_table<T: DeserializeOwned>(table: &FieldTable) -> Result<T, Error> {
    T::deserialize(TableDeserializer { table, depth: 0 })
}

/// Deserializes one AMQP value found at a given nesting depth.
#[derive(Debug, Clone, Copy)]
struct ValueDeserializer<'de> {
    value: &'de AMQPValue,
    depth: usize,
}

/// Deserializes a top-level table (which is not wrapped in an `AMQPValue`).
#[derive(Debug, Clone, Copy)]
struct TableDeserializer<'de> {
    table: &'de FieldTable,
    depth: usize,
}

fn visit_table<'de, V: Visitor<'de>>(
    table: &'de FieldTable,
    depth: usize,
    visitor: V,
) -> Result<V::Value, Error> {
    let mut access = TableAccess {
        entries: table.inner().iter(),
        pending: None,
        depth: enter(depth)?,
    };
    let value = visitor.visit_map(&mut access)?;
    if access.entries.len() == 0 {
        Ok(value)
    } else {
        Err(de::Error::invalid_length(
            table.inner().len(),
            &"fewer entries",
        ))
    }
}

fn visit_array<'de, V: Visitor<'de>>(
    items: &'de [AMQPValue],
    depth: usize,
    visitor: V,
) -> Result<V::Value, Error> {
    let mut access = ArrayAccess {
        items: items.iter(),
        depth: enter(depth)?,
    };
    let value = visitor.visit_seq(&mut access)?;
    if access.items.len() == 0 {
        Ok(value)
    } else {
        Err(de::Error::invalid_length(items.len(), &"fewer elements"))
    }
}

/// Every variant but the containers, by the rules of `value.rs`.
fn visit_scalar<'de, V: Visitor<'de>>(
    value: &'de AMQPValue,
    visitor: V,
) -> Result<V::Value, Error> {
    match value {
        AMQPValue::Void => visitor.visit_unit(),
        AMQPValue::Boolean(b) => visitor.visit_bool(*b),
        AMQPValue::ShortShortInt(i) => visitor.visit_i64(i64::from(*i)),
        AMQPValue::ShortInt(i) => visitor.visit_i64(i64::from(*i)),
        AMQPValue::LongInt(i) => visitor.visit_i64(i64::from(*i)),
        AMQPValue::LongLongInt(i) => visitor.visit_i64(*i),
        AMQPValue::ShortShortUInt(u) => visitor.visit_u64(u64::from(*u)),
        AMQPValue::ShortUInt(u) => visitor.visit_u64(u64::from(*u)),
        AMQPValue::LongUInt(u) => visitor.visit_u64(u64::from(*u)),
        AMQPValue::Timestamp(t) => visitor.visit_u64(*t),
        AMQPValue::Float(f) => visitor.visit_f64(finite(float32_to_f64(*f))?),
        AMQPValue::Double(d) => visitor.visit_f64(finite(*d)?),
        AMQPValue::DecimalValue(d) => visitor.visit_string(decimal_to_string(*d)),
        AMQPValue::ShortString(s) => visitor.visit_borrowed_str(s.as_str()),
        AMQPValue::LongString(s) => visitor.visit_borrowed_str(long_string_str(s)?),
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) | AMQPValue::ByteArray(_) => Err(
            de::Error::invalid_type(unexpected(value), &"a scalar (internal dispatch error)"),
        ),
    }
}

/// An externally tagged enum: a table with exactly one entry.
fn visit_tagged_enum<'de, V: Visitor<'de>>(
    table: &'de FieldTable,
    depth: usize,
    visitor: V,
) -> Result<V::Value, Error> {
    let mut entries = table.inner().iter();
    match (entries.next(), entries.next()) {
        (Some((variant, value)), None) => visitor.visit_enum(EnumAccess {
            variant,
            value: ValueDeserializer {
                value,
                depth: enter(depth)?,
            },
        }),
        _ => Err(de::Error::invalid_value(
            de::Unexpected::Map,
            &"a table with a single key",
        )),
    }
}

impl<'de> Deserializer<'de> for TableDeserializer<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visit_table(self.table, self.depth, visitor)
    }
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        visit_tagged_enum(self.table, self.depth, visitor)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct
        identifier ignored_any
    }
}

impl<'de> Deserializer<'de> for ValueDeserializer<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        // Containers only here; scalars in their own function, to keep this
        // frame (repeated once per nesting level) small in unoptimized builds.
        match self.value {
            AMQPValue::FieldArray(items) => visit_array(items.as_slice(), self.depth, visitor),
            AMQPValue::FieldTable(table) => visit_table(table, self.depth, visitor),
            AMQPValue::ByteArray(bytes) => {
                enter(self.depth)?;
                let mut seq = SeqDeserializer::new(bytes.as_slice().iter().copied());
                let value = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(value)
            }
            scalar => visit_scalar(scalar, visitor),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.value {
            AMQPValue::Void => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.value {
            AMQPValue::ByteArray(bytes) => visitor.visit_borrowed_bytes(bytes.as_slice()),
            AMQPValue::LongString(s) => visitor.visit_borrowed_bytes(s.as_bytes()),
            AMQPValue::ShortString(s) => visitor.visit_borrowed_bytes(s.as_str().as_bytes()),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.value {
            AMQPValue::LongString(s) => {
                visitor.visit_enum(BorrowedStrDeserializer::new(long_string_str(s)?))
            }
            AMQPValue::ShortString(s) => {
                visitor.visit_enum(BorrowedStrDeserializer::new(s.as_str()))
            }
            AMQPValue::FieldTable(table) => visit_tagged_enum(table, self.depth, visitor),
            _ => Err(de::Error::invalid_type(
                unexpected(self.value),
                &"a string or a single-key table",
            )),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        unit unit_struct seq tuple tuple_struct map struct identifier
    }
}

fn unexpected(value: &AMQPValue) -> de::Unexpected<'_> {
    match value {
        AMQPValue::Void => de::Unexpected::Unit,
        AMQPValue::Boolean(b) => de::Unexpected::Bool(*b),
        AMQPValue::FieldArray(_) | AMQPValue::ByteArray(_) => de::Unexpected::Seq,
        AMQPValue::FieldTable(_) => de::Unexpected::Map,
        AMQPValue::Float(_) | AMQPValue::Double(_) => de::Unexpected::Other("float"),
        _ => de::Unexpected::Other("number"),
    }
}

/// Elements of a `FieldArray`.
#[derive(Debug)]
struct ArrayAccess<'de> {
    items: std::slice::Iter<'de, AMQPValue>,
    depth: usize,
}

impl<'de> de::SeqAccess<'de> for ArrayAccess<'de> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        match self.items.next() {
            Some(value) => seed
                .deserialize(ValueDeserializer {
                    value,
                    depth: self.depth,
                })
                .map(Some),
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

/// Entries of a `FieldTable`.
#[derive(Debug)]
struct TableAccess<'de> {
    entries: btree_map::Iter<'de, ShortString, AMQPValue>,
    pending: Option<&'de AMQPValue>,
    depth: usize,
}

impl<'de> de::MapAccess<'de> for TableAccess<'de> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        match self.entries.next() {
            Some((key, value)) => {
                self.pending = Some(value);
                seed.deserialize(KeyDeserializer(key.as_str())).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let value = self
            .pending
            .take()
            .ok_or_else(|| <Error as de::Error>::custom("table value requested before its key"))?;
        seed.deserialize(ValueDeserializer {
            value,
            depth: self.depth,
        })
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// `{variant: value}`.
#[derive(Debug)]
struct EnumAccess<'de> {
    variant: &'de ShortString,
    value: ValueDeserializer<'de>,
}

impl<'de> de::EnumAccess<'de> for EnumAccess<'de> {
    type Error = Error;
    type Variant = ValueDeserializer<'de>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self::Variant), Error> {
        let variant = seed.deserialize(KeyDeserializer(self.variant.as_str()))?;
        Ok((variant, self.value))
    }
}

impl<'de> de::VariantAccess<'de> for ValueDeserializer<'de> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        de::Deserialize::deserialize(self)
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(self)
    }
    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_map(visitor)
    }
}

/// A table key. Integer targets parse it as decimal text (the serializer
/// writes integer map keys that way); everything else sees a string.
#[derive(Debug, Clone, Copy)]
struct KeyDeserializer<'de>(&'de str);

macro_rules! integer_keys {
    ($($method:ident => $visit:ident: $ty:ty),* $(,)?) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            match self.0.parse::<$ty>() {
                Ok(n) => visitor.$visit(n),
                Err(_) => visitor.visit_borrowed_str(self.0),
            }
        })*
    };
}

impl<'de> Deserializer<'de> for KeyDeserializer<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_borrowed_str(self.0)
    }

    integer_keys!(
        deserialize_i8 => visit_i8: i8, deserialize_i16 => visit_i16: i16,
        deserialize_i32 => visit_i32: i32, deserialize_i64 => visit_i64: i64,
        deserialize_i128 => visit_i128: i128, deserialize_u8 => visit_u8: u8,
        deserialize_u16 => visit_u16: u16, deserialize_u32 => visit_u32: u32,
        deserialize_u64 => visit_u64: u64, deserialize_u128 => visit_u128: u128,
    );

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_enum(self.0.into_deserializer())
    }

    forward_to_deserialize_any! {
        bool f32 f64 char str string bytes byte_buf unit unit_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

#[cfg(test)]
mod tests;
