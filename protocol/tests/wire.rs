//! The wire format is pinned: one request and one reply of every operation,
//! and one of every batch item, are encoded here and compared byte for byte
//! with `tests/wire.golden`. A change to any message's encoding, and any new
//! operation or reply, fails this test until the golden file is updated on
//! purpose (`HSMD_UPDATE_GOLDEN=1 cargo test -p hsmd-protocol --test wire`).
//!
//! The samples are made by a deserializer that builds one value of any
//! serde type (variant `i` of the message enum, the first variant of every
//! enum inside it, `1` for numbers, `"s"` for strings, one element for
//! sequences), so no variant is left out by hand and none needs listing.

use std::fmt::Write as _;

use protocol::{codec, BatchItem, Operation, Reply};
use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer as _, Visitor};

/// Deserializes one sample value; `top` picks the variant of the outermost enum.
struct Sample {
    top: Option<u32>,
}

#[derive(Debug)]
struct Error(String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

/// The names of the outermost enum's variants, seen while sampling.
static VARIANTS: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());

fn inner() -> Sample {
    Sample { top: None }
}

impl<'de> Deserializer<'de> for Sample {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_u64(1)
    }
    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_bool(true)
    }
    fn deserialize_i8<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_i8(1)
    }
    fn deserialize_i16<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_i16(1)
    }
    fn deserialize_i32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_i32(1)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_i64(1)
    }
    fn deserialize_u8<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_u8(1)
    }
    fn deserialize_u16<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_u16(1)
    }
    fn deserialize_u32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_u32(1)
    }
    fn deserialize_u64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_u64(1)
    }
    fn deserialize_f32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_f32(0.5)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_f64(0.5)
    }
    fn deserialize_char<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_char('c')
    }
    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_str("s")
    }
    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_string("s".to_owned())
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_bytes(&[0xb1, 0xb2])
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_byte_buf(vec![0xb1, 0xb2])
    }
    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_some(inner())
    }
    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_unit()
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(self, _: &'static str, v: V) -> Result<V::Value, Error> {
        v.visit_unit()
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, v: V) -> Result<V::Value, Error> {
        v.visit_newtype_struct(inner())
    }
    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_seq(Seq(1))
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, Error> {
        v.visit_seq(Seq(len))
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(self, _: &'static str, len: usize, v: V) -> Result<V::Value, Error> {
        v.visit_seq(Seq(len))
    }
    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_map(Map(1))
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        v.visit_seq(Seq(fields.len()))
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        let index = match self.top {
            Some(i) => {
                let mut seen = VARIANTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                seen.clear();
                seen.extend_from_slice(variants);
                if i as usize >= variants.len() {
                    return Err(Error(format!("no variant {i}")));
                }
                i
            }
            None => 0,
        };
        v.visit_enum(Enum(index))
    }
    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_u32(0)
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_unit()
    }
}

struct Seq(usize);

impl<'de> de::SeqAccess<'de> for Seq {
    type Error = Error;
    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
        if self.0 == 0 {
            return Ok(None);
        }
        self.0 -= 1;
        seed.deserialize(inner()).map(Some)
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.0)
    }
}

struct Map(usize);

impl<'de> de::MapAccess<'de> for Map {
    type Error = Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        if self.0 == 0 {
            return Ok(None);
        }
        self.0 -= 1;
        seed.deserialize(inner()).map(Some)
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        seed.deserialize(inner())
    }
}

struct Enum(u32);

impl<'de> de::EnumAccess<'de> for Enum {
    type Error = Error;
    type Variant = Self;
    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self), Error> {
        let index: de::value::U32Deserializer<Error> = self.0.into_deserializer();
        Ok((seed.deserialize(index)?, self))
    }
}

impl<'de> de::VariantAccess<'de> for Enum {
    type Error = Error;
    fn unit_variant(self) -> Result<(), Error> {
        Ok(())
    }
    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(inner())
    }
    fn tuple_variant<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, Error> {
        v.visit_seq(Seq(len))
    }
    fn struct_variant<V: Visitor<'de>>(self, fields: &'static [&'static str], v: V) -> Result<V::Value, Error> {
        v.visit_seq(Seq(fields.len()))
    }
}

/// Every variant of `T` (an enum), sampled, named and encoded.
fn every_variant<T>(kind: &str, out: &mut String) -> usize
where
    T: serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let mut i = 0u32;
    loop {
        let value = match T::deserialize(Sample { top: Some(i) }) {
            Ok(v) => v,
            Err(e) if e.0.starts_with("no variant") => return i as usize,
            Err(e) => panic!("{kind} variant {i}: {e}"),
        };
        let name = VARIANTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)[i as usize];
        let bytes = codec::encode_body(&value).unwrap_or_else(|e| panic!("{kind}::{name}: {e}"));
        // The encoding reads back as the same value.
        let back: T = codec::decode_body(&bytes).unwrap_or_else(|e| panic!("{kind}::{name} does not decode: {e}"));
        assert_eq!(format!("{back:?}"), format!("{value:?}"), "{kind}::{name}");
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let _ = writeln!(out, "{kind}::{name} {hex}");
        i += 1;
    }
}

/// One sample of a struct, encoded.
fn envelope<T: serde::de::DeserializeOwned + serde::Serialize>() -> Vec<u8> {
    let value = T::deserialize(inner()).unwrap_or_else(|e| panic!("{e}"));
    codec::encode_body(&value).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_request_and_reply_encodes_as_pinned() {
    let mut text = String::new();
    let operations = every_variant::<Operation>("Operation", &mut text);
    every_variant::<Reply>("Reply", &mut text);
    every_variant::<BatchItem>("BatchItem", &mut text);
    // The envelopes around them, and the handshake.
    for (kind, bytes) in [
        ("Request", envelope::<protocol::Request>()),
        ("Response", envelope::<protocol::Response>()),
        ("ClientHello", envelope::<protocol::ClientHello>()),
        ("ServerHello", envelope::<protocol::ServerHello>()),
    ] {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let _ = writeln!(text, "{kind} {hex}");
    }
    assert_eq!(
        operations as u32,
        protocol::message::OPERATION_VARIANTS,
        "OPERATION_VARIANTS disagrees with the Operation enum"
    );
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/wire.golden");
    if std::env::var_os("HSMD_UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &text).expect("write the golden file");
        return;
    }
    let pinned = std::fs::read_to_string(path).unwrap_or_default();
    let differ: Vec<String> = text
        .lines()
        .filter(|l| !pinned.lines().any(|p| p == *l))
        .map(|l| format!("  now:    {l}"))
        .chain(
            pinned
                .lines()
                .filter(|p| !text.lines().any(|l| l == *p))
                .map(|p| format!("  pinned: {p}")),
        )
        .collect();
    assert!(
        differ.is_empty(),
        "the wire encoding changed (or a message was added or removed):\n{}\n\
         if that is meant, update tests/wire.golden with HSMD_UPDATE_GOLDEN=1 and say so in docs/protocol.md",
        differ.join("\n")
    );
}
