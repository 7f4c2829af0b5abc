//! The pipeline routes' request bodies and their validation: plain functions from a parsed body
//! (and the path's ids) to what the store is asked, or the 422 the client gets. The handlers in
//! `pipeline` only run them and the store operation.

use std::collections::HashSet;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{
    DEFAULT_CLAIM_STAGE, DEFAULT_DISTANCE_METRIC, DEFAULT_LEASE_SECONDS, DEFAULT_LIMIT, MAX_DOCUMENT_IDS,
    MAX_LEASE_SECONDS, MAX_LIMIT,
};
use crate::cache::{Chunk, ClaimArgs, HeartbeatArgs, PipelineMeta, SetStageArgs, STAGE_PENDING};
use crate::error::ApiError;
use crate::extract::{check_id, parse_json, MAX_ID_BYTES};

#[derive(Deserialize)]
pub struct CreateRequest {
    id: String,
    target_namespace: String,
    #[serde(default)]
    distance_metric: Option<String>,
}

#[derive(Deserialize)]
pub struct StageRequest {
    chunks: Vec<Chunk>,
}

#[derive(Deserialize)]
pub struct VectorsRequest {
    pub(super) vectors: Vec<VectorDoc>,
}

#[derive(Deserialize)]
pub struct VectorDoc {
    id: Value,
    #[serde(default)]
    vector: Option<Value>,
    #[serde(default)]
    vectors: Option<Value>,
    #[serde(default)]
    attributes: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
pub struct ClaimRequest {
    worker_id: String,
    #[serde(default)]
    stage: Option<String>,
    #[serde(default)]
    claim_stage: Option<String>,
    #[serde(default)]
    limit: Option<u64>,
    #[serde(default)]
    lease_seconds: Option<i64>,
    #[serde(default)]
    document_id_prefix: Option<String>,
}

#[derive(Deserialize)]
pub struct HeartbeatRequest {
    document_ids: Vec<String>,
    worker_id: String,
    #[serde(default)]
    stage: Option<String>,
}

#[derive(Deserialize)]
pub struct SetStageRequest {
    document_ids: Vec<String>,
    stage: String,
    #[serde(default)]
    from_stage: Option<String>,
    #[serde(default)]
    worker_id: Option<String>,
    #[serde(default)]
    create_missing: Option<bool>,
}

/// A document to stage: its chunks, and the same serialised for the store.
pub struct StagedChunks {
    pub chunks: Vec<Chunk>,
    pub chunks_json: Bytes,
}

fn check_stage(what: &str, stage: &str) -> Result<(), ApiError> {
    check_id(what, stage)
}

fn check_document_ids(ids: &[String]) -> Result<(), ApiError> {
    if ids.len() > MAX_DOCUMENT_IDS {
        return Err(ApiError::validation(format!(
            "document_ids has {} entries; the limit is {MAX_DOCUMENT_IDS}",
            ids.len()
        )));
    }
    ids.iter().try_for_each(|id| check_id("document_ids entries", id))
}

/// Namespace names Turbopuffer accepts: `[A-Za-z0-9-_.]{1,128}`.
fn check_namespace(ns: &str) -> Result<(), ApiError> {
    let ok = !ns.is_empty()
        && ns.len() <= 128
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(ApiError::validation(format!(
            "target_namespace '{ns}' must match [A-Za-z0-9-_.]{{1,128}}"
        )))
    }
}

/// A create: the pipeline's definition, created at `created_at` (RFC 3339).
pub fn validate_create(req: CreateRequest, created_at: String) -> Result<PipelineMeta, ApiError> {
    check_id("id", &req.id)?;
    check_namespace(&req.target_namespace)?;
    let distance_metric = req
        .distance_metric
        .unwrap_or_else(|| DEFAULT_DISTANCE_METRIC.to_owned());
    check_id("distance_metric", &distance_metric)?;
    Ok(PipelineMeta {
        id: req.id,
        target_namespace: req.target_namespace,
        distance_metric,
        created_at,
    })
}

/// A stage of `document` in `pipeline` with `body`: the chunks (ids present and distinct) and
/// their serialised form, sized to the body and trimmed so a staged document holds no spare
/// capacity for as long as it stays staged.
pub fn validate_stage(pipeline: &str, document: &str, body: &[u8]) -> Result<StagedChunks, ApiError> {
    check_id("pipeline id", pipeline)?;
    check_id("document id", document)?;
    let req: StageRequest = parse_json(body)?;
    let mut seen = HashSet::with_capacity(req.chunks.len());
    for chunk in &req.chunks {
        check_id("chunk id", &chunk.id)?;
        if !seen.insert(chunk.id.as_str()) {
            return Err(ApiError::validation(format!(
                "duplicate chunk id '{}' in chunks",
                chunk.id
            )));
        }
    }
    let mut chunks_json = Vec::with_capacity(body.len());
    serde_json::to_writer(&mut chunks_json, &req.chunks).map_err(|e| ApiError::validation(e.to_string()))?;
    chunks_json.shrink_to_fit();
    Ok(StagedChunks {
        chunks: req.chunks,
        chunks_json: Bytes::from(chunks_json),
    })
}

/// Builds the `upsert_rows` of a vectors request.
pub fn vector_rows(vectors: Vec<VectorDoc>) -> Result<Vec<Value>, ApiError> {
    if vectors.is_empty() {
        return Err(ApiError::validation("vectors must not be empty"));
    }
    let mut seen = HashSet::new();
    vectors.into_iter().map(|v| vector_row(v, &mut seen)).collect()
}

/// One `upsert_rows` row of a vectors entry; `seen` holds the ids of the entries before it.
fn vector_row(v: VectorDoc, seen: &mut HashSet<String>) -> Result<Value, ApiError> {
    match &v.id {
        Value::String(s) => check_id("vectors id", s)?,
        Value::Number(n) if n.is_u64() => {}
        _ => {
            return Err(ApiError::validation(
                "vectors id values must be strings or unsigned integers",
            ))
        }
    }
    if !seen.insert(v.id.to_string()) {
        return Err(ApiError::validation(format!("duplicate vectors id {}", v.id)));
    }
    let mut row = Map::new();
    row.insert("id".into(), v.id);
    if v.vector.is_none() && v.vectors.is_none() {
        return Err(ApiError::validation(
            "each vectors entry must include vector or vectors",
        ));
    }
    for (name, value) in [("vector", v.vector), ("vectors", v.vectors)] {
        match value {
            None => {}
            Some(value @ (Value::Array(_) | Value::String(_))) => {
                row.insert(name.into(), value);
            }
            Some(_) => {
                return Err(ApiError::validation(format!(
                    "{name} must be an array of numbers or a base64 string"
                )))
            }
        }
    }
    for (name, value) in v.attributes.unwrap_or_default() {
        if matches!(name.as_str(), "id" | "vector" | "vectors") {
            return Err(ApiError::validation(format!(
                "attributes must not contain '{name}'"
            )));
        }
        row.insert(name, value);
    }
    Ok(Value::Object(row))
}

/// A claim on `pipeline` at `now_ms`, defaults filled in; an empty prefix is no prefix.
pub fn validate_claim(pipeline: &str, req: ClaimRequest, now_ms: u64) -> Result<ClaimArgs, ApiError> {
    check_id("pipeline id", pipeline)?;
    check_id("worker_id", &req.worker_id)?;
    let stage = req.stage.unwrap_or_else(|| STAGE_PENDING.to_owned());
    let claim_stage = req.claim_stage.unwrap_or_else(|| DEFAULT_CLAIM_STAGE.to_owned());
    check_stage("stage", &stage)?;
    check_stage("claim_stage", &claim_stage)?;
    let limit = req.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::validation(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    let lease_seconds = req.lease_seconds.unwrap_or(DEFAULT_LEASE_SECONDS);
    if !(1..=MAX_LEASE_SECONDS).contains(&lease_seconds) {
        return Err(ApiError::validation(format!(
            "lease_seconds must be between 1 and {MAX_LEASE_SECONDS}"
        )));
    }
    if let Some(prefix) = &req.document_id_prefix {
        if prefix.len() > MAX_ID_BYTES {
            return Err(ApiError::validation(
                "document_id_prefix is longer than 512 bytes",
            ));
        }
    }
    Ok(ClaimArgs {
        stage,
        claim_stage,
        worker_id: req.worker_id,
        limit: usize::try_from(limit).unwrap_or(usize::MAX),
        lease_ms: u64::try_from(lease_seconds).unwrap_or(0) * 1000,
        document_id_prefix: req.document_id_prefix.filter(|p| !p.is_empty()),
        now_ms,
    })
}

/// A heartbeat on `pipeline` at `now_ms`; the stage defaults to the default claim stage.
pub fn validate_heartbeat(
    pipeline: &str,
    req: HeartbeatRequest,
    now_ms: u64,
) -> Result<HeartbeatArgs, ApiError> {
    check_id("pipeline id", pipeline)?;
    check_id("worker_id", &req.worker_id)?;
    check_document_ids(&req.document_ids)?;
    let stage = req.stage.unwrap_or_else(|| DEFAULT_CLAIM_STAGE.to_owned());
    check_stage("stage", &stage)?;
    Ok(HeartbeatArgs {
        document_ids: req.document_ids,
        worker_id: req.worker_id,
        stage,
        now_ms,
    })
}

/// A set-stage on `pipeline` at `now_ms`; `create_missing` defaults to false.
pub fn validate_set_stage(
    pipeline: &str,
    req: SetStageRequest,
    now_ms: u64,
) -> Result<SetStageArgs, ApiError> {
    check_id("pipeline id", pipeline)?;
    check_document_ids(&req.document_ids)?;
    check_stage("stage", &req.stage)?;
    if let Some(from) = &req.from_stage {
        check_stage("from_stage", from)?;
    }
    if let Some(worker) = &req.worker_id {
        check_id("worker_id", worker)?;
    }
    Ok(SetStageArgs {
        document_ids: req.document_ids,
        stage: req.stage,
        from_stage: req.from_stage,
        worker_id: req.worker_id,
        create_missing: req.create_missing.unwrap_or(false),
        only_version: None,
        now_ms,
    })
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use serde::de::DeserializeOwned;
    use serde_json::json;

    use super::*;

    fn body<T: DeserializeOwned>(v: Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    /// The 422 message of a refused request.
    fn refused<T: std::fmt::Debug>(result: Result<T, ApiError>) -> String {
        let err = result.unwrap_err();
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY, "{err:?}");
        assert_eq!(err.kind, "validation_error");
        err.message
    }

    impl std::fmt::Debug for StagedChunks {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("StagedChunks")
                .field("chunks", &self.chunks)
                .finish()
        }
    }

    fn long() -> String {
        "x".repeat(MAX_ID_BYTES + 1)
    }

    #[test]
    fn create_checks_id_namespace_and_metric() {
        let create = |v| validate_create(body(v), "t".into());
        let meta = create(json!({"id": "p", "target_namespace": "ns-1_a.b"})).unwrap();
        assert_eq!(meta.distance_metric, DEFAULT_DISTANCE_METRIC);
        assert_eq!(meta.created_at, "t");
        assert_eq!(
            refused(create(json!({"id": "", "target_namespace": "ns"}))),
            "id must not be empty"
        );
        assert_eq!(
            refused(create(json!({"id": "p", "target_namespace": "a/b"}))),
            "target_namespace 'a/b' must match [A-Za-z0-9-_.]{1,128}"
        );
        assert!(
            refused(create(json!({"id": "p", "target_namespace": "n".repeat(129)})))
                .starts_with("target_namespace")
        );
        assert_eq!(
            refused(create(
                json!({"id": "p", "target_namespace": "ns", "distance_metric": ""})
            )),
            "distance_metric must not be empty"
        );
    }

    #[test]
    fn stage_checks_ids_body_and_distinct_chunks() {
        let staged = validate_stage("p", "d", br#"{"chunks":[{"id":"a","text":"x"},{"id":"b"}]}"#).unwrap();
        assert_eq!(staged.chunks.len(), 2);
        assert_eq!(&staged.chunks_json[..], br#"[{"id":"a","text":"x"},{"id":"b"}]"#);
        assert_eq!(
            refused(validate_stage("", "d", b"{}")),
            "pipeline id must not be empty"
        );
        assert_eq!(
            refused(validate_stage("p", &long(), b"{}")),
            format!(
                "document id is {} bytes; the limit is {MAX_ID_BYTES} bytes",
                MAX_ID_BYTES + 1
            )
        );
        assert_eq!(
            refused(validate_stage("p", "d", b"")),
            "request body must be a JSON object; it is empty"
        );
        assert_eq!(
            refused(validate_stage("p", "d", br#"{"chunks":[{"id":""}]}"#)),
            "chunk id must not be empty"
        );
        assert_eq!(
            refused(validate_stage("p", "d", br#"{"chunks":[{"id":"a"},{"id":"a"}]}"#)),
            "duplicate chunk id 'a' in chunks"
        );
    }

    #[test]
    fn vectors_rows_check_every_entry() {
        let rows = |v: Value| vector_rows(body::<VectorsRequest>(json!({ "vectors": v })).vectors);
        assert_eq!(
            rows(json!([{"id": 1, "vector": [0.5], "attributes": {"a": 1}}, {"id": "s", "vectors": "AAA="}]))
                .unwrap(),
            vec![
                json!({"id": 1, "vector": [0.5], "a": 1}),
                json!({"id": "s", "vectors": "AAA="})
            ]
        );
        assert_eq!(refused(rows(json!([]))), "vectors must not be empty");
        assert_eq!(
            refused(rows(json!([{"id": -1, "vector": [1]}]))),
            "vectors id values must be strings or unsigned integers"
        );
        assert_eq!(
            refused(rows(json!([{"id": "", "vector": [1]}]))),
            "vectors id must not be empty"
        );
        assert_eq!(
            refused(rows(json!([{"id": 1, "vector": [1]}, {"id": 1, "vector": [2]}]))),
            "duplicate vectors id 1"
        );
        assert_eq!(
            refused(rows(json!([{"id": 1}]))),
            "each vectors entry must include vector or vectors"
        );
        assert_eq!(
            refused(rows(json!([{"id": 1, "vectors": 3}]))),
            "vectors must be an array of numbers or a base64 string"
        );
        assert_eq!(
            refused(rows(
                json!([{"id": 1, "vector": [1], "attributes": {"vector": 1}}])
            )),
            "attributes must not contain 'vector'"
        );
    }

    #[test]
    fn claim_fills_defaults_and_checks_ranges() {
        let claim = |v| validate_claim("p", body(v), 7);
        let args = claim(json!({"worker_id": "w", "document_id_prefix": ""})).unwrap();
        assert_eq!(
            (
                args.stage.as_str(),
                args.claim_stage.as_str(),
                args.worker_id.as_str()
            ),
            (STAGE_PENDING, DEFAULT_CLAIM_STAGE, "w")
        );
        assert_eq!((args.limit, args.lease_ms, args.now_ms), (100, 900_000, 7));
        assert_eq!(args.document_id_prefix, None);
        let args = claim(
            json!({"worker_id": "w", "limit": MAX_LIMIT, "lease_seconds": 1, "document_id_prefix": "a"}),
        )
        .unwrap();
        assert_eq!((args.limit, args.lease_ms), (10_000, 1_000));
        assert_eq!(args.document_id_prefix.as_deref(), Some("a"));
        assert_eq!(
            refused(validate_claim("", body(json!({"worker_id": "w"})), 0)),
            "pipeline id must not be empty"
        );
        assert_eq!(
            refused(claim(json!({"worker_id": ""}))),
            "worker_id must not be empty"
        );
        assert_eq!(
            refused(claim(json!({"worker_id": "w", "stage": ""}))),
            "stage must not be empty"
        );
        assert_eq!(
            refused(claim(json!({"worker_id": "w", "claim_stage": ""}))),
            "claim_stage must not be empty"
        );
        for limit in [0, MAX_LIMIT + 1] {
            assert_eq!(
                refused(claim(json!({"worker_id": "w", "limit": limit}))),
                "limit must be between 1 and 10000"
            );
        }
        for lease in [0, MAX_LEASE_SECONDS + 1] {
            assert_eq!(
                refused(claim(json!({"worker_id": "w", "lease_seconds": lease}))),
                "lease_seconds must be between 1 and 604800"
            );
        }
        assert_eq!(
            refused(claim(json!({"worker_id": "w", "document_id_prefix": long()}))),
            "document_id_prefix is longer than 512 bytes"
        );
    }

    #[test]
    fn heartbeat_checks_worker_ids_and_stage() {
        let heartbeat = |v| validate_heartbeat("p", body(v), 3);
        let args = heartbeat(json!({"document_ids": ["a"], "worker_id": "w"})).unwrap();
        assert_eq!(args.stage, DEFAULT_CLAIM_STAGE);
        assert_eq!(
            (args.document_ids, args.worker_id, args.now_ms),
            (vec!["a".to_owned()], "w".to_owned(), 3)
        );
        assert_eq!(
            refused(validate_heartbeat(
                "",
                body(json!({"document_ids": [], "worker_id": "w"})),
                0
            )),
            "pipeline id must not be empty"
        );
        assert_eq!(
            refused(heartbeat(json!({"document_ids": [], "worker_id": ""}))),
            "worker_id must not be empty"
        );
        assert_eq!(
            refused(heartbeat(json!({"document_ids": [""], "worker_id": "w"}))),
            "document_ids entries must not be empty"
        );
        let too_many: Vec<String> = (0..=MAX_DOCUMENT_IDS).map(|i| i.to_string()).collect();
        assert_eq!(
            refused(heartbeat(json!({"document_ids": too_many, "worker_id": "w"}))),
            "document_ids has 10001 entries; the limit is 10000"
        );
        assert_eq!(
            refused(heartbeat(
                json!({"document_ids": [], "worker_id": "w", "stage": ""})
            )),
            "stage must not be empty"
        );
    }

    #[test]
    fn set_stage_checks_stages_worker_and_ids() {
        let set = |v| validate_set_stage("p", body(v), 4);
        let args = set(json!({"document_ids": ["a"], "stage": "indexed"})).unwrap();
        assert_eq!(
            (args.stage.as_str(), args.create_missing, args.now_ms),
            ("indexed", false, 4)
        );
        assert_eq!(
            (args.from_stage, args.worker_id, args.only_version),
            (None, None, None)
        );
        let args = set(json!({"document_ids": [], "stage": "s", "from_stage": "f", "worker_id": "w", "create_missing": true}))
            .unwrap();
        assert_eq!(
            (
                args.from_stage.as_deref(),
                args.worker_id.as_deref(),
                args.create_missing
            ),
            (Some("f"), Some("w"), true)
        );
        assert_eq!(
            refused(validate_set_stage(
                "",
                body(json!({"document_ids": [], "stage": "s"})),
                0
            )),
            "pipeline id must not be empty"
        );
        assert_eq!(
            refused(set(json!({"document_ids": [""], "stage": "s"}))),
            "document_ids entries must not be empty"
        );
        assert_eq!(
            refused(set(json!({"document_ids": [], "stage": ""}))),
            "stage must not be empty"
        );
        assert_eq!(
            refused(set(json!({"document_ids": [], "stage": "s", "from_stage": ""}))),
            "from_stage must not be empty"
        );
        assert_eq!(
            refused(set(json!({"document_ids": [], "stage": "s", "worker_id": ""}))),
            "worker_id must not be empty"
        );
    }
}
