//! Mirroring a successful write into the document cache (SPEC §2.5) and purging a namespace.
//!
//! `plan` turns the stamped write (and, for response-driven writes, the upstream response) into
//! cache operations; the handler applies them in order.

use std::collections::HashSet;

use serde_json::{Map, Value};

use crate::cache::{Attributes, DocId};

/// One effect on the cached document of `id`.
#[derive(Debug, Clone, PartialEq)]
pub enum MirrorOp {
    /// Replace the cached document (unless it is newer).
    Upsert(DocId, Attributes),
    /// Merge into the cached document if it is cached (and not newer).
    Patch(DocId, Attributes),
    /// Drop the cached document: it was deleted (a tombstone refuses copies up to this write).
    Evict(DocId),
    /// Drop the cached document: it changed upstream in a way the mirror cannot replay
    /// (`patch_by_filter`); copies older than this write are refused.
    Invalidate(DocId),
}

/// The attribute holding a document's vector; cached only with `mirror_vectors`.
const VECTOR_ATTRIBUTE: &str = "vector";

fn row_attributes(row: &Map<String, Value>, mirror_vectors: bool) -> Attributes {
    row.iter()
        .filter(|(k, _)| k.as_str() != "id" && (mirror_vectors || k.as_str() != VECTOR_ATTRIBUTE))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Rows of a row-form operation (`upsert_rows`, `patch_rows`).
fn rows_of(op: &str, value: &Value, mirror_vectors: bool) -> Result<Vec<(DocId, Attributes)>, String> {
    let rows = value
        .as_array()
        .ok_or_else(|| format!("{op} must be an array of row objects"))?;
    rows.iter()
        .map(|row| {
            let row = row
                .as_object()
                .ok_or_else(|| format!("{op} entries must be objects"))?;
            let id = row
                .get("id")
                .and_then(DocId::from_json)
                .ok_or_else(|| format!("{op} entries must include a string or unsigned integer id"))?;
            Ok((id, row_attributes(row, mirror_vectors)))
        })
        .collect()
}

/// Rows of a column-form operation (`upsert_columns`, `patch_columns`).
fn columns_of(op: &str, value: &Value, mirror_vectors: bool) -> Result<Vec<(DocId, Attributes)>, String> {
    let columns = value
        .as_object()
        .ok_or_else(|| format!("{op} must be an object of column arrays"))?;
    let ids = columns
        .get("id")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{op} must include an id column array"))?;
    let mut rows: Vec<(DocId, Attributes)> = ids
        .iter()
        .map(|id| {
            DocId::from_json(id)
                .map(|id| (id, Map::new()))
                .ok_or_else(|| format!("{op} id values must be strings or unsigned integers"))
        })
        .collect::<Result<_, _>>()?;
    for (name, column) in columns {
        if name == "id" || (!mirror_vectors && name == VECTOR_ATTRIBUTE) {
            continue;
        }
        let values = column
            .as_array()
            .ok_or_else(|| format!("{op} column '{name}' must be an array"))?;
        if values.len() != rows.len() {
            return Err(format!(
                "{op} column '{name}' has {} values for {} ids",
                values.len(),
                rows.len()
            ));
        }
        for ((_, attrs), v) in rows.iter_mut().zip(values) {
            attrs.insert(name.clone(), v.clone());
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

/// Upserted and patched rows of a write, in request order (rows form, then columns form).
fn written_rows(
    write: &Map<String, Value>,
    rows_key: &str,
    columns_key: &str,
    mirror_vectors: bool,
) -> Result<Vec<(DocId, Attributes)>, String> {
    let mut out = Vec::new();
    if let Some(v) = write.get(rows_key) {
        out.extend(rows_of(rows_key, v, mirror_vectors)?);
    }
    if let Some(v) = write.get(columns_key) {
        out.extend(columns_of(columns_key, v, mirror_vectors)?);
    }
    Ok(out)
}

/// Plans the cache effects of a write that Turbopuffer accepted.
///
/// Without a response: deletes evict, patches merge, upserts replace.
/// With a response (conditional and filter writes): only the ids it lists are touched; ids
/// deleted or patched by filter are evicted (evicting is always safe), listed upserts replace,
/// listed patches merge.
pub fn plan(write: &Value, response: Option<&Value>, mirror_vectors: bool) -> Result<Vec<MirrorOp>, String> {
    let write = write.as_object().ok_or("write must be a JSON object")?;
    let upserts = written_rows(write, "upsert_rows", "upsert_columns", mirror_vectors)?;
    let patches = written_rows(write, "patch_rows", "patch_columns", mirror_vectors)?;
    let deletes = match write.get("deletes") {
        Some(v) => ids_of("deletes", v)?,
        None => Vec::new(),
    };
    let mut ops = Vec::new();
    match response {
        None => {
            ops.extend(deletes.into_iter().map(MirrorOp::Evict));
            ops.extend(patches.into_iter().map(|(id, a)| MirrorOp::Patch(id, a)));
            ops.extend(upserts.into_iter().map(|(id, a)| MirrorOp::Upsert(id, a)));
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
            if !write.contains_key("delete_condition") {
                ops.extend(deletes.into_iter().map(MirrorOp::Evict));
            }
            if write.contains_key("patch_by_filter") {
                ops.extend(patched.into_iter().map(MirrorOp::Invalidate));
            } else {
                let patched: HashSet<DocId> = patched.into_iter().collect();
                ops.extend(
                    patches
                        .into_iter()
                        .filter(|(id, _)| patched.contains(id))
                        .map(|(id, a)| MirrorOp::Patch(id, a)),
                );
            }
            ops.extend(
                upserts
                    .into_iter()
                    .filter(|(id, _)| upserted.contains(id))
                    .map(|(id, a)| MirrorOp::Upsert(id, a)),
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

    #[test]
    fn plain_write_upserts_patches_and_deletes() {
        let write = json!({
            "upsert_rows": [{"id": 1, "a": 1, "vector": [0.1], "_hevlayer_upserted_at": 5}],
            "upsert_columns": {"id": ["x", "y"], "b": [true, false], "vector": ["AAAA", "AAAA"]},
            "patch_rows": [{"id": 2, "c": "z"}],
            "patch_columns": {"id": [3], "d": [null]},
            "deletes": [4, "w"]
        });
        let ops = plan(&write, None, false).unwrap();
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
        let with_vectors = plan(&write, None, true).unwrap();
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
        let ops = plan(&write, Some(&response), false).unwrap();
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
        let ops = plan(&write, Some(&response), false).unwrap();
        assert_eq!(ops, vec![MirrorOp::Evict(DocId::Num(1))]);
        // Without a condition every listed delete goes, whatever the response lists.
        let write = json!({"deletes": [1, 2], "upsert_condition": ["v", "Eq", 1]});
        let ops = plan(&write, Some(&json!({})), false).unwrap();
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
        let ops = plan(&write, Some(&response), false).unwrap();
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
        assert!(plan(&write, Some(&json!({"status": "OK"})), false)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn malformed_writes_are_errors() {
        assert!(plan(&json!([]), None, false).is_err());
        assert!(plan(&json!({"upsert_rows": {}}), None, false).is_err());
        assert!(plan(&json!({"upsert_rows": [{"a": 1}]}), None, false).is_err());
        assert!(plan(&json!({"upsert_columns": {"id": [1], "a": [1, 2]}}), None, false).is_err());
        assert!(plan(&json!({"deletes": [-1]}), None, false).is_err());
        assert!(plan(&json!({"deletes": []}), Some(&json!({"deleted_ids": "x"})), false).is_err());
    }
}
