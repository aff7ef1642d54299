//! The serializer behind [`to_table`]: any `Serialize` type straight to AMQP
//! values, with the same rules as `value.rs`.

use std::collections::BTreeMap;

use amq_protocol_types::{AMQPValue, ByteArray, FieldArray, FieldTable, ShortString};
use serde::ser::{self, Serialize};

use crate::Error;
use crate::value::{
    enter, float_to_amqp, signed_to_amqp, string_to_amqp, table_key, unsigned_to_amqp,
};

/// Serialize a map or struct into an AMQP field table, without an
/// intermediate `serde_json::Value`.
///
/// See the [crate documentation](crate#serde) for the rules.
///
/// # Errors
///
/// [`Error::NotATable`] if `value` does not serialize as a map or struct,
/// [`Error::KeyTooLong`], [`Error::KeyNotString`], [`Error::NonFiniteFloat`],
/// [`Error::IntegerOutOfRange`], [`Error::TooDeep`], or [`Error::Custom`] from
/// the type's own `Serialize` implementation.
pub fn to_table<T: Serialize + ?Sized>(value: &T) -> Result<FieldTable, Error> {
    match value.serialize(ValueSerializer { depth: 0 })? {
        AMQPValue::FieldTable(table) => Ok(table),
        _ => Err(Error::NotATable),
    }
}

/// Serializes one value at a given nesting depth.
#[derive(Debug, Clone, Copy)]
struct ValueSerializer {
    depth: usize,
}

fn u128_to_amqp(u: u128) -> Result<AMQPValue, Error> {
    u64::try_from(u)
        .map(unsigned_to_amqp)
        .map_err(|_| Error::IntegerOutOfRange)
}

/// A table `{variant: value}` for externally tagged enum variants.
fn tagged(variant: &str, value: AMQPValue) -> Result<AMQPValue, Error> {
    let mut table = BTreeMap::new();
    table.insert(table_key(variant)?, value);
    Ok(AMQPValue::FieldTable(FieldTable::from(table)))
}

impl ser::Serializer for ValueSerializer {
    type Ok = AMQPValue;
    type Error = Error;
    type SerializeSeq = SeqSerializer;
    type SerializeTuple = SeqSerializer;
    type SerializeTupleStruct = SeqSerializer;
    type SerializeTupleVariant = SeqSerializer;
    type SerializeMap = MapSerializer;
    type SerializeStruct = MapSerializer;
    type SerializeStructVariant = MapSerializer;

    fn serialize_bool(self, v: bool) -> Result<AMQPValue, Error> {
        Ok(AMQPValue::Boolean(v))
    }
    fn serialize_i8(self, v: i8) -> Result<AMQPValue, Error> {
        Ok(signed_to_amqp(v.into()))
    }
    fn serialize_i16(self, v: i16) -> Result<AMQPValue, Error> {
        Ok(signed_to_amqp(v.into()))
    }
    fn serialize_i32(self, v: i32) -> Result<AMQPValue, Error> {
        Ok(signed_to_amqp(v.into()))
    }
    fn serialize_i64(self, v: i64) -> Result<AMQPValue, Error> {
        Ok(signed_to_amqp(v))
    }
    fn serialize_i128(self, v: i128) -> Result<AMQPValue, Error> {
        match i64::try_from(v) {
            Ok(i) => Ok(signed_to_amqp(i)),
            Err(_) => u128::try_from(v)
                .map_err(|_| Error::IntegerOutOfRange)
                .and_then(u128_to_amqp),
        }
    }
    fn serialize_u8(self, v: u8) -> Result<AMQPValue, Error> {
        Ok(unsigned_to_amqp(v.into()))
    }
    fn serialize_u16(self, v: u16) -> Result<AMQPValue, Error> {
        Ok(unsigned_to_amqp(v.into()))
    }
    fn serialize_u32(self, v: u32) -> Result<AMQPValue, Error> {
        Ok(unsigned_to_amqp(v.into()))
    }
    fn serialize_u64(self, v: u64) -> Result<AMQPValue, Error> {
        Ok(unsigned_to_amqp(v))
    }
    fn serialize_u128(self, v: u128) -> Result<AMQPValue, Error> {
        u128_to_amqp(v)
    }
    fn serialize_f32(self, v: f32) -> Result<AMQPValue, Error> {
        float_to_amqp(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> Result<AMQPValue, Error> {
        float_to_amqp(v)
    }
    fn serialize_char(self, v: char) -> Result<AMQPValue, Error> {
        Ok(string_to_amqp(v.encode_utf8(&mut [0; 4])))
    }
    fn serialize_str(self, v: &str) -> Result<AMQPValue, Error> {
        Ok(string_to_amqp(v))
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<AMQPValue, Error> {
        Ok(AMQPValue::ByteArray(ByteArray::from(v)))
    }
    fn serialize_none(self) -> Result<AMQPValue, Error> {
        Ok(AMQPValue::Void)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<AMQPValue, Error> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<AMQPValue, Error> {
        Ok(AMQPValue::Void)
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<AMQPValue, Error> {
        Ok(AMQPValue::Void)
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<AMQPValue, Error> {
        Ok(string_to_amqp(variant))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<AMQPValue, Error> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<AMQPValue, Error> {
        let inner = value.serialize(ValueSerializer {
            depth: enter(self.depth)?,
        })?;
        tagged(variant, inner)
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<SeqSerializer, Error> {
        SeqSerializer::new(self.depth, len, None)
    }
    fn serialize_tuple(self, len: usize) -> Result<SeqSerializer, Error> {
        SeqSerializer::new(self.depth, Some(len), None)
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<SeqSerializer, Error> {
        SeqSerializer::new(self.depth, Some(len), None)
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<SeqSerializer, Error> {
        SeqSerializer::new(enter(self.depth)?, Some(len), Some(variant))
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<MapSerializer, Error> {
        MapSerializer::new(self.depth, None)
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<MapSerializer, Error> {
        MapSerializer::new(self.depth, None)
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<MapSerializer, Error> {
        MapSerializer::new(enter(self.depth)?, Some(variant))
    }
}

/// Collects a sequence into a `FieldArray` (wrapped as `{variant: [...]}` for
/// tuple variants).
#[derive(Debug)]
struct SeqSerializer {
    /// Depth of the elements.
    depth: usize,
    items: Vec<AMQPValue>,
    variant: Option<&'static str>,
}

impl SeqSerializer {
    fn new(depth: usize, len: Option<usize>, variant: Option<&'static str>) -> Result<Self, Error> {
        Ok(Self {
            depth: enter(depth)?,
            // The hint comes from the value being serialized: cap it.
            items: Vec::with_capacity(len.unwrap_or(0).min(1024)),
            variant,
        })
    }

    fn push<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        let value = value.serialize(ValueSerializer { depth: self.depth })?;
        self.items.push(value);
        Ok(())
    }

    fn finish(self) -> Result<AMQPValue, Error> {
        let array = AMQPValue::FieldArray(FieldArray::from(self.items));
        match self.variant {
            Some(variant) => tagged(variant, array),
            None => Ok(array),
        }
    }
}

impl ser::SerializeSeq for SeqSerializer {
    type Ok = AMQPValue;
    type Error = Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.push(value)
    }
    fn end(self) -> Result<AMQPValue, Error> {
        self.finish()
    }
}

impl ser::SerializeTuple for SeqSerializer {
    type Ok = AMQPValue;
    type Error = Error;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.push(value)
    }
    fn end(self) -> Result<AMQPValue, Error> {
        self.finish()
    }
}

impl ser::SerializeTupleStruct for SeqSerializer {
    type Ok = AMQPValue;
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.push(value)
    }
    fn end(self) -> Result<AMQPValue, Error> {
        self.finish()
    }
}

impl ser::SerializeTupleVariant for SeqSerializer {
    type Ok = AMQPValue;
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.push(value)
    }
    fn end(self) -> Result<AMQPValue, Error> {
        self.finish()
    }
}

/// Collects a map or struct into a `FieldTable` (wrapped as
/// `{variant: {...}}` for struct variants).
#[derive(Debug)]
struct MapSerializer {
    /// Depth of the values.
    depth: usize,
    entries: BTreeMap<ShortString, AMQPValue>,
    pending_key: Option<ShortString>,
    variant: Option<&'static str>,
}

impl MapSerializer {
    fn new(depth: usize, variant: Option<&'static str>) -> Result<Self, Error> {
        Ok(Self {
            depth: enter(depth)?,
            entries: BTreeMap::new(),
            pending_key: None,
            variant,
        })
    }

    fn insert<T: Serialize + ?Sized>(&mut self, key: ShortString, value: &T) -> Result<(), Error> {
        let value = value.serialize(ValueSerializer { depth: self.depth })?;
        self.entries.insert(key, value);
        Ok(())
    }

    fn finish(self) -> Result<AMQPValue, Error> {
        let table = AMQPValue::FieldTable(FieldTable::from(self.entries));
        match self.variant {
            Some(variant) => tagged(variant, table),
            None => Ok(table),
        }
    }
}

impl ser::SerializeMap for MapSerializer {
    type Ok = AMQPValue;
    type Error = Error;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Error> {
        self.pending_key = Some(key.serialize(KeySerializer)?);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        let key = self
            .pending_key
            .take()
            .ok_or_else(|| <Error as ser::Error>::custom("map value serialized before its key"))?;
        self.insert(key, value)
    }
    fn end(self) -> Result<AMQPValue, Error> {
        self.finish()
    }
}

impl ser::SerializeStruct for MapSerializer {
    type Ok = AMQPValue;
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        self.insert(table_key(key)?, value)
    }
    fn end(self) -> Result<AMQPValue, Error> {
        self.finish()
    }
}

impl ser::SerializeStructVariant for MapSerializer {
    type Ok = AMQPValue;
    type Error = Error;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        self.insert(table_key(key)?, value)
    }
    fn end(self) -> Result<AMQPValue, Error> {
        self.finish()
    }
}

/// Serializes a map key to a table key: strings, chars, integers (as
/// decimal text), unit variants and newtypes of those.
#[derive(Debug, Clone, Copy)]
struct KeySerializer;

type Impossible = ser::Impossible<ShortString, Error>;

macro_rules! integer_keys {
    ($($method:ident: $ty:ty),* $(,)?) => {
        $(fn $method(self, v: $ty) -> Result<ShortString, Error> {
            table_key(&v.to_string())
        })*
    };
}

impl ser::Serializer for KeySerializer {
    type Ok = ShortString;
    type Error = Error;
    type SerializeSeq = Impossible;
    type SerializeTuple = Impossible;
    type SerializeTupleStruct = Impossible;
    type SerializeTupleVariant = Impossible;
    type SerializeMap = Impossible;
    type SerializeStruct = Impossible;
    type SerializeStructVariant = Impossible;

    integer_keys!(
        serialize_i8: i8, serialize_i16: i16, serialize_i32: i32, serialize_i64: i64,
        serialize_i128: i128, serialize_u8: u8, serialize_u16: u16, serialize_u32: u32,
        serialize_u64: u64, serialize_u128: u128,
    );

    fn serialize_str(self, v: &str) -> Result<ShortString, Error> {
        table_key(v)
    }
    fn serialize_char(self, v: char) -> Result<ShortString, Error> {
        table_key(v.encode_utf8(&mut [0; 4]))
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<ShortString, Error> {
        table_key(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<ShortString, Error> {
        value.serialize(self)
    }
    fn serialize_bool(self, _v: bool) -> Result<ShortString, Error> {
        Err(Error::KeyNotString)
    }
    fn serialize_f32(self, _v: f32) -> Result<ShortString, Error> {
        Err(Error::KeyNotString)
    }
    fn serialize_f64(self, _v: f64) -> Result<ShortString, Error> {
        Err(Error::KeyNotString)
    }
    fn serialize_bytes(self, _v: &[u8]) -> Result<ShortString, Error> {
        Err(Error::KeyNotString)
    }
    fn serialize_none(self) -> Result<ShortString, Error> {
        Err(Error::KeyNotString)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _value: &T) -> Result<ShortString, Error> {
        Err(Error::KeyNotString)
    }
    fn serialize_unit(self) -> Result<ShortString, Error> {
        Err(Error::KeyNotString)
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<ShortString, Error> {
        Err(Error::KeyNotString)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result<ShortString, Error> {
        Err(Error::KeyNotString)
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Impossible, Error> {
        Err(Error::KeyNotString)
    }
    fn serialize_tuple(self, _len: usize) -> Result<Impossible, Error> {
        Err(Error::KeyNotString)
    }
    fn serialize_tuple_struct(self, _name: &'static str, _len: usize) -> Result<Impossible, Error> {
        Err(Error::KeyNotString)
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Impossible, Error> {
        Err(Error::KeyNotString)
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Impossible, Error> {
        Err(Error::KeyNotString)
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Impossible, Error> {
        Err(Error::KeyNotString)
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Impossible, Error> {
        Err(Error::KeyNotString)
    }
}
