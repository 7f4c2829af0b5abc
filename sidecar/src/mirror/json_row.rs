//! An upsert row read as text: its members but `id` and `vector` copied into one JSON object
//! string as they came (each value's bytes borrowed from the body, `&RawValue`), so the store can
//! keep the row as it is. One allocation per row instead of a map node, a key per attribute and
//! every string value, and nothing per attribute to weigh or free later. The vector's text is kept
//! apart (cached only with `mirror_vectors`). A row with a repeated key is parsed into a map, as a
//! JSON object is (the last value wins).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::cache::{Attributes, DocId};

/// The attribute holding a document's vector; cached only with `mirror_vectors`.
pub const VECTOR_ATTRIBUTE: &str = "vector";

/// A row's attributes (everything but `id`).
#[derive(Debug)]
pub enum RowAttributes {
    /// Parsed into a map; `has_vector` notes whether it holds a `vector`, so rows without one
    /// are not searched again.
    Map { map: Attributes, has_vector: bool },
    /// A JSON object of every member but `id` and `vector`, and the vector's JSON text.
    Text { object: String, vector: Option<String> },
}

/// One row of `.op` read as text; `.seen` is the caller's buffer for the row's keys (reused from
/// row to row), to find a repeated one.
pub struct JsonRowSeed<'a, 'de> {
    pub op: &'static str,
    pub seen: &'a mut Vec<Cow<'de, str>>,
}

impl<'de> DeserializeSeed<'de> for JsonRowSeed<'_, 'de> {
    type Value = (DocId, RowAttributes);

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for JsonRowSeed<'_, 'de> {
    type Value = (DocId, RowAttributes);

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} entries to be objects", self.op)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        self.seen.clear();
        let mut id = None;
        let mut object = String::with_capacity(96);
        object.push('{');
        let mut vector = None;
        let mut repeated = false;
        while let Some(key) = map.next_key::<TextKey<'de>>()? {
            let name = match key {
                TextKey::Id => {
                    id = Some(map.next_value::<Value>()?);
                    continue;
                }
                TextKey::Name(name) => name,
            };
            let value: &'de RawValue = map.next_value()?;
            if name == VECTOR_ATTRIBUTE {
                vector = Some(value.get().to_owned());
                continue;
            }
            repeated |= self.seen.contains(&name);
            if object.len() > 1 {
                object.push(',');
            }
            push_key(&mut object, &name, matches!(name, Cow::Borrowed(_)));
            object.push(':');
            object.push_str(value.get());
            self.seen.push(name);
        }
        object.push('}');
        let id = id.and_then(DocId::from_json_owned).ok_or_else(|| {
            de::Error::custom(format!(
                "{} entries must include a string or unsigned integer id",
                self.op
            ))
        })?;
        if repeated {
            return Ok((id, as_map(&object, vector).map_err(de::Error::custom)?));
        }
        Ok((id, RowAttributes::Text { object, vector }))
    }
}

/// A row with a repeated key as a map (the last value of a key wins, as in a JSON object).
fn as_map(object: &str, vector: Option<String>) -> Result<RowAttributes, serde_json::Error> {
    let mut map: Attributes = serde_json::from_str(object)?;
    let has_vector = vector.is_some();
    if let Some(text) = vector {
        map.insert(VECTOR_ATTRIBUTE.to_owned(), serde_json::from_str(&text)?);
    }
    Ok(RowAttributes::Map { map, has_vector })
}

/// Appends `"name"`. A key borrowed from the body (`verbatim`) had no escape in it, and a string
/// that needs none is written back as it was; any other is escaped again.
fn push_key(object: &mut String, name: &str, verbatim: bool) {
    if verbatim {
        object.push('"');
        object.push_str(name);
        object.push('"');
    } else {
        // Serialising a &str cannot fail.
        object.push_str(&serde_json::to_string(name).unwrap_or_default());
    }
}

/// A row's key: `id`, or an attribute name borrowed from the body when it has no escape.
enum TextKey<'de> {
    Id,
    Name(Cow<'de, str>),
}

impl<'de> Deserialize<'de> for TextKey<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = TextKey<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an attribute name")
            }
            fn visit_borrowed_str<E: de::Error>(self, key: &'de str) -> Result<TextKey<'de>, E> {
                Ok(if key == "id" {
                    TextKey::Id
                } else {
                    TextKey::Name(Cow::Borrowed(key))
                })
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<TextKey<'de>, E> {
                self.visit_string(key.to_owned())
            }
            fn visit_string<E: de::Error>(self, key: String) -> Result<TextKey<'de>, E> {
                Ok(if key == "id" {
                    TextKey::Id
                } else {
                    TextKey::Name(Cow::Owned(key))
                })
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}
