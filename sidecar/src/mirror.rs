//! Mirroring a successful write into the document cache (SPEC §2.5) and purging a namespace.
//!
//! The mirror callout body (`MirrorRequest`) is parsed as a `MirrorCallout`: the same JSON, with
//! the write's rows parsed straight into ids and attribute maps (`WriteBody`) instead of into a
//! JSON tree the planner would walk again. For a large write that second walk is a cold pass over
//! every row (each row's map and keys are separate allocations, long out of the CPU's caches by
//! then), and the tree allocates an `"id"` key per row only to drop it. `plan` then turns the
//! parsed write (and, for response-driven writes, the upstream response) into cache operations,
//! moving every row's attributes (no copy); the handler hands them to the cache as one batch
//! (`DocumentStore::apply_mirror`), which applies each document's ops in order.

mod json_row;

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use self::json_row::{JsonRowSeed, RowAttributes, VECTOR_ATTRIBUTE};
pub use crate::cache::MirrorOp;
use crate::cache::{Attributes, AttributesJson, DocId};

/// A mirror callout: `hevlayer_sidecar_api::MirrorRequest`, the one definition of the
/// message, parsed with the write as a `WriteBody` (a test keeps the two in step).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorCallout {
    pub namespace: String,
    pub upserted_at: u64,
    pub write: WriteBody,
    #[serde(default)]
    pub response: Option<Value>,
}

/// What the mirror needs of a stamped write: its rows (row form parsed into rows, column form
/// kept as JSON), its deletes, and whether it has a `delete_condition` or a `patch_by_filter`.
/// Every other key is skipped without being built. Like a JSON object, a repeated key keeps its
/// last value.
#[derive(Debug, Default)]
pub struct WriteBody {
    upsert_rows: Option<Vec<Row>>,
    upsert_columns: Option<Value>,
    patch_rows: Option<Vec<Row>>,
    patch_columns: Option<Value>,
    deletes: Option<Value>,
    delete_condition: bool,
    patch_by_filter: bool,
}

/// A row of `upsert_rows` (read as text, `json_row`) or `patch_rows` (parsed into a map): its id
/// and every other attribute.
#[derive(Debug)]
struct Row {
    id: DocId,
    attributes: RowAttributes,
}

/// The write keys `WriteBody` keeps.
enum WriteKey {
    UpsertRows,
    UpsertColumns,
    PatchRows,
    PatchColumns,
    Deletes,
    DeleteCondition,
    PatchByFilter,
    Other,
}

impl WriteKey {
    fn of(key: &str) -> Self {
        match key {
            "upsert_rows" => Self::UpsertRows,
            "upsert_columns" => Self::UpsertColumns,
            "patch_rows" => Self::PatchRows,
            "patch_columns" => Self::PatchColumns,
            "deletes" => Self::Deletes,
            "delete_condition" => Self::DeleteCondition,
            "patch_by_filter" => Self::PatchByFilter,
            _ => Self::Other,
        }
    }
}

impl<'de> Deserialize<'de> for WriteKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = WriteKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a write key")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<WriteKey, E> {
                Ok(WriteKey::of(key))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

impl<'de> Deserialize<'de> for WriteBody {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(WriteVisitor)
    }
}

struct WriteVisitor;

impl<'de> Visitor<'de> for WriteVisitor {
    type Value = WriteBody;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("write to be a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WriteBody, A::Error> {
        let mut write = WriteBody::default();
        while let Some(key) = map.next_key::<WriteKey>()? {
            match key {
                WriteKey::UpsertRows => {
                    write.upsert_rows = Some(map.next_value_seed(RowsSeed("upsert_rows"))?)
                }
                WriteKey::PatchRows => write.patch_rows = Some(map.next_value_seed(RowsSeed("patch_rows"))?),
                WriteKey::UpsertColumns => write.upsert_columns = Some(map.next_value()?),
                WriteKey::PatchColumns => write.patch_columns = Some(map.next_value()?),
                WriteKey::Deletes => write.deletes = Some(map.next_value()?),
                WriteKey::DeleteCondition => {
                    map.next_value::<IgnoredAny>()?;
                    write.delete_condition = true;
                }
                WriteKey::PatchByFilter => {
                    map.next_value::<IgnoredAny>()?;
                    write.patch_by_filter = true;
                }
                WriteKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(write)
    }
}

/// The rows of the row-form operation named `.0`.
struct RowsSeed(&'static str);

impl<'de> DeserializeSeed<'de> for RowsSeed {
    type Value = Vec<Row>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Vec<Row>, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RowsSeed {
    type Value = Vec<Row>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} to be an array of row objects", self.0)
    }

    /// Upserted rows are read as text (stored as they came); patched ones into maps (merged).
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Row>, A::Error> {
        let mut rows = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        if self.0 == "upsert_rows" {
            let mut seen = Vec::new();
            while let Some((id, attributes)) = seq.next_element_seed(JsonRowSeed {
                op: self.0,
                seen: &mut seen,
            })? {
                rows.push(Row { id, attributes });
            }
        } else {
            while let Some(row) = seq.next_element_seed(RowSeed(self.0))? {
                rows.push(row);
            }
        }
        Ok(rows)
    }
}

/// One row of the row-form operation named `.0`.
struct RowSeed(&'static str);

impl<'de> DeserializeSeed<'de> for RowSeed {
    type Value = Row;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Row, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RowSeed {
    type Value = Row;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} entries to be objects", self.0)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Row, A::Error> {
        let mut id = None;
        let mut attributes = Map::new();
        let mut has_vector = false;
        while let Some(key) = map.next_key::<RowKey>()? {
            match key {
                RowKey::Id => id = Some(map.next_value::<Value>()?),
                RowKey::Attribute(name) => {
                    has_vector |= name == VECTOR_ATTRIBUTE;
                    let value = map.next_value::<Value>()?;
                    attributes.insert(name, value);
                }
            }
        }
        let id = id.and_then(DocId::from_json_owned).ok_or_else(|| {
            de::Error::custom(format!(
                "{} entries must include a string or unsigned integer id",
                self.0
            ))
        })?;
        Ok(Row {
            id,
            attributes: RowAttributes::Map {
                map: attributes,
                has_vector,
            },
        })
    }
}

/// A row's key: `id` (never allocated) or an attribute name.
enum RowKey {
    Id,
    Attribute(String),
}

impl<'de> Deserialize<'de> for RowKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = RowKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an attribute name")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<RowKey, E> {
                Ok(if key == "id" {
                    RowKey::Id
                } else {
                    RowKey::Attribute(key.to_owned())
                })
            }
            fn visit_string<E: de::Error>(self, key: String) -> Result<RowKey, E> {
                Ok(if key == "id" {
                    RowKey::Id
                } else {
                    RowKey::Attribute(key)
                })
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// The attributes a write gives a document: a map, or the JSON text a row came as.
enum Written {
    Map(Attributes),
    Json(AttributesJson),
}

impl Written {
    fn upsert(self, id: DocId) -> MirrorOp {
        match self {
            Self::Map(map) => MirrorOp::Upsert(id, map),
            Self::Json(json) => MirrorOp::UpsertJson(id, json),
        }
    }

    fn patch(self, id: DocId) -> MirrorOp {
        match self {
            Self::Map(map) => MirrorOp::Patch(id, map),
            Self::Json(json) => MirrorOp::Patch(id, json.to_map()),
        }
    }
}

/// A row's id and attributes (everything but `id`, and `vector` only with `mirror_vectors`).
fn row_pair(row: Row, mirror_vectors: bool) -> (DocId, Written) {
    let written = match row.attributes {
        RowAttributes::Map { mut map, has_vector } => {
            if has_vector && !mirror_vectors {
                map.remove(VECTOR_ATTRIBUTE);
            }
            Written::Map(map)
        }
        RowAttributes::Text { mut object, vector } => {
            if let Some(vector) = vector.filter(|_| mirror_vectors) {
                object.pop();
                if object.len() > 1 {
                    object.push(',');
                }
                object.push_str(r#""vector":"#);
                object.push_str(&vector);
                object.push('}');
            }
            Written::Json(AttributesJson::from_object_text(object))
        }
    };
    (row.id, written)
}

/// Rows of a column-form operation (`upsert_columns`, `patch_columns`).
fn columns_of(op: &str, value: Value, mirror_vectors: bool) -> Result<Vec<(DocId, Attributes)>, String> {
    let Value::Object(mut columns) = value else {
        return Err(format!("{op} must be an object of column arrays"));
    };
    let Some(Value::Array(ids)) = columns.remove("id") else {
        return Err(format!("{op} must include an id column array"));
    };
    let mut rows: Vec<(DocId, Attributes)> = ids
        .into_iter()
        .map(|id| {
            DocId::from_json_owned(id)
                .map(|id| (id, Map::new()))
                .ok_or_else(|| format!("{op} id values must be strings or unsigned integers"))
        })
        .collect::<Result<_, _>>()?;
    for (name, column) in columns {
        if !mirror_vectors && name == VECTOR_ATTRIBUTE {
            continue;
        }
        let Value::Array(values) = column else {
            return Err(format!("{op} column '{name}' must be an array"));
        };
        if values.len() != rows.len() {
            return Err(format!(
                "{op} column '{name}' has {} values for {} ids",
                values.len(),
                rows.len()
            ));
        }
        for ((_, attrs), v) in rows.iter_mut().zip(values) {
            attrs.insert(name.clone(), v);
        }
    }
    Ok(rows)
}

fn ids_of(op: &str, value: &Value) -> Result<Vec<DocId>, String> {
    let ids = value.as_array().ok_or_else(|| format!("{op} must be an array"))?;
    ids.iter()
        .map(|id| {
            DocId::from_json(id).ok_or_else(|| format!("{op} values must be strings or unsigned integers"))
        })
        .collect()
}

/// Upserted or patched rows of a write, in request order (rows form, then columns form).
fn written_rows(
    rows: Option<Vec<Row>>,
    columns: Option<Value>,
    columns_key: &str,
    mirror_vectors: bool,
) -> Result<Vec<(DocId, Written)>, String> {
    let mut out: Vec<(DocId, Written)> = rows
        .unwrap_or_default()
        .into_iter()
        .map(|row| row_pair(row, mirror_vectors))
        .collect();
    if let Some(v) = columns {
        let rows = columns_of(columns_key, v, mirror_vectors)?;
        out.extend(rows.into_iter().map(|(id, map)| (id, Written::Map(map))));
    }
    Ok(out)
}

/// Plans the cache effects of a write that Turbopuffer accepted.
///
/// Without a response: deletes evict, patches merge, upserts replace.
/// With a response (conditional and filter writes): only the ids it lists are touched; ids
/// deleted or patched by filter are evicted (evicting is always safe), listed upserts replace,
/// listed patches merge.
pub fn plan(
    write: WriteBody,
    response: Option<&Value>,
    mirror_vectors: bool,
) -> Result<Vec<MirrorOp>, String> {
    let upserts = written_rows(
        write.upsert_rows,
        write.upsert_columns,
        "upsert_columns",
        mirror_vectors,
    )?;
    let patches = written_rows(
        write.patch_rows,
        write.patch_columns,
        "patch_columns",
        mirror_vectors,
    )?;
    let deletes = match &write.deletes {
        Some(v) => ids_of("deletes", v)?,
        None => Vec::new(),
    };
    let mut ops = Vec::with_capacity(deletes.len() + patches.len() + upserts.len());
    match response {
        None => {
            ops.extend(deletes.into_iter().map(MirrorOp::Evict));
            ops.extend(patches.into_iter().map(|(id, a)| a.patch(id)));
            ops.extend(upserts.into_iter().map(|(id, a)| a.upsert(id)));
        }
        Some(response) => {
            let listed = |key: &str| -> Result<Vec<DocId>, String> {
                match response.get(key) {
                    None | Some(Value::Null) => Ok(Vec::new()),
                    Some(v) => ids_of(key, v),
                }
            };
            let deleted = listed("deleted_ids")?;
            let patched = listed("patched_ids")?;
            let upserted: HashSet<DocId> = listed("upserted_ids")?.into_iter().collect();
            // Deleted ids (by filter or explicitly) and unconditional deletes: evicted first, as
            // delete_by_filter runs before everything else upstream. Under a delete_condition
            // only the ids Turbopuffer deleted go.
            ops.extend(deleted.into_iter().map(MirrorOp::Evict));
            if !write.delete_condition {
                ops.extend(deletes.into_iter().map(MirrorOp::Evict));
            }
            if write.patch_by_filter {
                ops.extend(patched.into_iter().map(MirrorOp::Invalidate));
            } else {
                let patched: HashSet<DocId> = patched.into_iter().collect();
                ops.extend(
                    patches
                        .into_iter()
                        .filter(|(id, _)| patched.contains(id))
                        .map(|(id, a)| a.patch(id)),
                );
            }
            ops.extend(
                upserts
                    .into_iter()
                    .filter(|(id, _)| upserted.contains(id))
                    .map(|(id, a)| a.upsert(id)),
            );
        }
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attrs(v: Value) -> Attributes {
        v.as_object().cloned().unwrap()
    }

    /// The ops with row-form upserts' text parsed into maps, to compare with expected maps.
    fn maps(ops: Vec<MirrorOp>) -> Vec<MirrorOp> {
        ops.into_iter()
            .map(|op| match op {
                MirrorOp::UpsertJson(id, json) => MirrorOp::Upsert(id, json.to_map()),
                op => op,
            })
            .collect()
    }

    /// Upserted rows are kept as the text they came as (every member but `id`; `vector` only
    /// with `mirror_vectors`, appended), an escaped key escaped again; a row with a repeated key
    /// is parsed into a map (the last value wins); patched rows are maps.
    #[test]
    fn upserted_rows_are_kept_as_text() {
        let text = r#"{"upsert_rows":[{"a" : [1, 2],"id":1,"vector":[0.5],"t\u0065xt":"\u00e9"},
            {"id":"x"},{"id":2,"b":1,"b":2}],"patch_rows":[{"id":3,"p":1}]}"#;
        let json = |vectors| -> Vec<String> {
            let write: WriteBody = serde_json::from_str(text).unwrap();
            plan(write, None, vectors)
                .unwrap()
                .into_iter()
                .map(|op| match op {
                    MirrorOp::UpsertJson(_, json) => json.as_str().to_owned(),
                    MirrorOp::Upsert(_, map) => format!("map {}", Value::Object(map)),
                    MirrorOp::Patch(_, map) => format!("patch {}", Value::Object(map)),
                    op => format!("{op:?}"),
                })
                .collect()
        };
        assert_eq!(
            json(false),
            [
                r#"patch {"p":1}"#,
                r#"{"a":[1, 2],"text":"\u00e9"}"#,
                "{}",
                r#"map {"b":2}"#
            ]
        );
        assert_eq!(json(true)[1], r#"{"a":[1, 2],"text":"\u00e9","vector":[0.5]}"#);
        let write: WriteBody = serde_json::from_str(r#"{"upsert_rows":[{"vector":[1],"id":1}]}"#).unwrap();
        assert_eq!(
            maps(plan(write, None, true).unwrap()),
            vec![MirrorOp::Upsert(DocId::Num(1), attrs(json!({"vector": [1]})))]
        );
    }

    /// Parses `write` as the callout handler does, then plans it; a parse error is an error too.
    fn plan_json(
        write: &Value,
        response: Option<&Value>,
        mirror_vectors: bool,
    ) -> Result<Vec<MirrorOp>, String> {
        let text = write.to_string();
        let parsed: WriteBody = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        plan(parsed, response, mirror_vectors).map(maps)
    }

    #[test]
    fn plain_write_upserts_patches_and_deletes() {
        let write = json!({
            "upsert_rows": [{"id": 1, "a": 1, "vector": [0.1], "_hevlayer_upserted_at": 5}],
            "upsert_columns": {"id": ["x", "y"], "b": [true, false], "vector": ["AAAA", "AAAA"]},
            "patch_rows": [{"id": 2, "c": "z"}],
            "patch_columns": {"id": [3], "d": [null]},
            "deletes": [4, "w"]
        });
        let ops = plan_json(&write, None, false).unwrap();
        assert_eq!(
            ops,
            vec![
                MirrorOp::Evict(DocId::Num(4)),
                MirrorOp::Evict(DocId::Str("w".into())),
                MirrorOp::Patch(DocId::Num(2), attrs(json!({"c": "z"}))),
                MirrorOp::Patch(DocId::Num(3), attrs(json!({"d": null}))),
                MirrorOp::Upsert(DocId::Num(1), attrs(json!({"a": 1, "_hevlayer_upserted_at": 5}))),
                MirrorOp::Upsert(DocId::Str("x".into()), attrs(json!({"b": true}))),
                MirrorOp::Upsert(DocId::Str("y".into()), attrs(json!({"b": false}))),
            ]
        );
        let with_vectors = plan_json(&write, None, true).unwrap();
        assert_eq!(
            with_vectors[4],
            MirrorOp::Upsert(
                DocId::Num(1),
                attrs(json!({"a": 1, "vector": [0.1], "_hevlayer_upserted_at": 5}))
            )
        );
    }

    #[test]
    fn response_driven_write_touches_only_listed_ids() {
        let write = json!({
            "upsert_rows": [{"id": 1, "v": 1}, {"id": 2, "v": 2}],
            "patch_rows": [{"id": 3, "p": 1}, {"id": 4, "p": 1}],
            "upsert_condition": ["v", "Lt", {"$ref_new": "v"}],
            "patch_condition": ["p", "Eq", null]
        });
        let response = json!({"upserted_ids": [2], "patched_ids": [4]});
        let ops = plan_json(&write, Some(&response), false).unwrap();
        assert_eq!(
            ops,
            vec![
                MirrorOp::Patch(DocId::Num(4), attrs(json!({"p": 1}))),
                MirrorOp::Upsert(DocId::Num(2), attrs(json!({"v": 2}))),
            ]
        );
    }

    #[test]
    fn conditional_deletes_evict_only_the_deleted_ids() {
        let write = json!({"deletes": [1, 2], "delete_condition": ["v", "Eq", 1]});
        let response = json!({"deleted_ids": [1]});
        let ops = plan_json(&write, Some(&response), false).unwrap();
        assert_eq!(ops, vec![MirrorOp::Evict(DocId::Num(1))]);
        // Without a condition every listed delete goes, whatever the response lists.
        let write = json!({"deletes": [1, 2], "upsert_condition": ["v", "Eq", 1]});
        let ops = plan_json(&write, Some(&json!({})), false).unwrap();
        assert_eq!(
            ops,
            vec![MirrorOp::Evict(DocId::Num(1)), MirrorOp::Evict(DocId::Num(2))]
        );
    }

    #[test]
    fn filter_writes_evict_returned_ids() {
        let write = json!({
            "delete_by_filter": ["a", "Eq", 1],
            "patch_by_filter": {"filters": ["b", "Eq", 2], "patch": {"c": 3}},
            "upsert_rows": [{"id": 9, "a": 1}]
        });
        let response = json!({"deleted_ids": [9, 8], "patched_ids": ["p"], "upserted_ids": [9]});
        let ops = plan_json(&write, Some(&response), false).unwrap();
        assert_eq!(
            ops,
            vec![
                MirrorOp::Evict(DocId::Num(9)),
                MirrorOp::Evict(DocId::Num(8)),
                MirrorOp::Invalidate(DocId::Str("p".into())),
                MirrorOp::Upsert(DocId::Num(9), attrs(json!({"a": 1}))),
            ]
        );
        // No ids returned: nothing to do.
        assert!(plan_json(&write, Some(&json!({"status": "OK"})), false)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn malformed_writes_are_errors() {
        assert!(plan_json(&json!([]), None, false).is_err());
        assert!(plan_json(&json!({"upsert_rows": {}}), None, false).is_err());
        assert!(plan_json(&json!({"upsert_rows": [{"a": 1}]}), None, false).is_err());
        assert!(plan_json(&json!({"upsert_columns": {"id": [1], "a": [1, 2]}}), None, false).is_err());
        assert!(plan_json(&json!({"deletes": [-1]}), None, false).is_err());
        assert!(plan_json(&json!({"deletes": []}), Some(&json!({"deleted_ids": "x"})), false).is_err());
        assert!(plan_json(&json!({"patch_rows": [7]}), None, false).is_err());
        assert!(plan_json(&json!({"upsert_rows": [{"id": -3}]}), None, false).is_err());
        assert!(plan_json(&json!({"upsert_rows": [{"id": [1]}]}), None, false).is_err());
        let message = plan_json(&json!({"patch_rows": [{"a": 1}]}), None, false).unwrap_err();
        assert!(message.contains("patch_rows entries must include"), "{message}");
        let message = plan_json(&json!({"upsert_rows": 7}), None, false).unwrap_err();
        assert!(
            message.contains("upsert_rows to be an array of row objects"),
            "{message}"
        );
    }

    /// Keys the mirror does not use are skipped whatever they hold; a repeated key keeps its last
    /// value, as in a JSON object; `id` and `vector` never reach the cached attributes (unless
    /// vectors are mirrored) and a row's string id is taken as is.
    #[test]
    fn the_write_is_parsed_like_a_json_object() {
        let text = r#"{"schema":{"a":{"type":"string"}},"upsert_rows":[{"id":9}],
            "upsert_rows":[{"vector":[1.5],"id":"u-\u00e9","t":1,"t":2,"id":"u"}],
            "distance_metric":"cosine_distance","unknown":[{"deep":[null]}]}"#;
        let write: WriteBody = serde_json::from_str(text).unwrap();
        assert_eq!(
            plan(write, None, false).map(maps).unwrap(),
            vec![MirrorOp::Upsert(DocId::Str("u".into()), attrs(json!({"t": 2})))]
        );
        let write: WriteBody = serde_json::from_str(text).unwrap();
        assert_eq!(
            plan(write, None, true).map(maps).unwrap(),
            vec![MirrorOp::Upsert(
                DocId::Str("u".into()),
                attrs(json!({"t": 2, "vector": [1.5]}))
            )]
        );
        let escaped: WriteBody =
            serde_json::from_str(r#"{"patch_rows":[{"i\u0064":"\u00e9","x":1}]}"#).unwrap();
        assert_eq!(
            plan(escaped, None, false).map(maps).unwrap(),
            vec![MirrorOp::Patch(DocId::Str("é".into()), attrs(json!({"x": 1})))]
        );
    }

    /// `MirrorCallout` reads the message the filter sends (`MirrorRequest`, built by
    /// `mirror_body`) field for field; destructuring `MirrorRequest` without `..` makes a field
    /// added there fail to compile here until `MirrorCallout` has it too.
    #[test]
    fn the_callout_parses_what_the_filter_sends() {
        use hevlayer_sidecar_api::{mirror_body, MirrorRequest};
        let body = mirror_body(
            "ns",
            7,
            br#"{"upsert_rows":[{"id":1,"a":"x"}],"upsert_condition":["a","Eq",null]}"#,
            Some(br#"{"upserted_ids":[1]}"#),
        );
        let MirrorRequest {
            namespace,
            upserted_at,
            write: _,
            response,
        } = serde_json::from_slice(&body).unwrap();
        let callout: MirrorCallout = serde_json::from_slice(&body).unwrap();
        assert_eq!(callout.namespace, namespace);
        assert_eq!(callout.upserted_at, upserted_at);
        assert_eq!(callout.response, response);
        assert_eq!(
            plan(callout.write, callout.response.as_ref(), false)
                .map(maps)
                .unwrap(),
            vec![MirrorOp::Upsert(DocId::Num(1), attrs(json!({"a": "x"})))]
        );
        let bare: MirrorCallout = serde_json::from_slice(&mirror_body("n", 1, b"{}", None)).unwrap();
        assert!(bare.response.is_none());
        // Unknown envelope fields are refused, as `MirrorRequest` refuses them.
        let extra = br#"{"namespace":"n","upserted_at":1,"write":{},"extra":1}"#;
        assert!(serde_json::from_slice::<MirrorCallout>(extra).is_err());
        assert!(serde_json::from_slice::<MirrorRequest>(extra).is_err());
    }
}
