//! The ten pipeline routes of SPEC §3.

use std::collections::HashSet;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::cache::{
    Chunk, ClaimArgs, HeartbeatArgs, PipelineMeta, SetStageArgs, RATE_WINDOW_SECONDS, STAGE_FAILED,
    STAGE_INDEXED, STAGE_PENDING,
};
use crate::error::{json_response, raw_json_response, ApiError};
use crate::extract::{check_id, JsonBody, PathParams, RawBody};
use crate::gateway::encode_segment;
use crate::state::SharedState;

pub const DEFAULT_DISTANCE_METRIC: &str = "cosine_distance";
pub const DEFAULT_CLAIM_STAGE: &str = "embedding";
pub const DEFAULT_LIMIT: u64 = 100;
pub const MAX_LIMIT: u64 = 10_000;
pub const DEFAULT_LEASE_SECONDS: i64 = 900;
/// Longest lease a claim may ask for (7 days).
pub const MAX_LEASE_SECONDS: i64 = 7 * 24 * 3600;
/// Most ids one heartbeat or set-stage request may name.
pub const MAX_DOCUMENT_IDS: usize = 10_000;

// ---------------------------------------------------------------- request bodies

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
    vectors: Vec<VectorDoc>,
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

// ---------------------------------------------------------------- helpers

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

/// RFC 3339 UTC timestamp (seconds precision) of epoch milliseconds.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil-from-days (proleptic Gregorian), after H. Hinnant's public-domain algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

async fn require_pipeline(state: &SharedState, id: &str) -> Result<PipelineMeta, ApiError> {
    check_id("pipeline id", id)?;
    state
        .pipelines_op("get_pipeline", |c| {
            let id = id.to_owned();
            async move { c.get_pipeline(&id).await }
        })
        .await?
        .ok_or_else(|| ApiError::pipeline_not_found(id))
}

fn stage_response(pipeline: &str, stage: &str, updated: u64) -> Response {
    json_response(
        StatusCode::OK,
        &json!({ "pipeline_id": pipeline, "stage": stage, "updated": updated }),
    )
}

// ---------------------------------------------------------------- 1-4: pipelines

pub async fn create(
    State(state): State<SharedState>,
    JsonBody(req): JsonBody<CreateRequest>,
) -> Result<Response, ApiError> {
    check_id("id", &req.id)?;
    check_namespace(&req.target_namespace)?;
    let distance_metric = req
        .distance_metric
        .unwrap_or_else(|| DEFAULT_DISTANCE_METRIC.to_owned());
    check_id("distance_metric", &distance_metric)?;
    let meta = PipelineMeta {
        id: req.id,
        target_namespace: req.target_namespace,
        distance_metric,
        created_at: rfc3339(crate::cache::now_ms()),
    };
    state
        .pipelines_op("create_pipeline", |c| {
            let meta = meta.clone();
            async move { c.create_pipeline(meta).await }
        })
        .await?;
    tracing::info!(pipeline = %meta.id, target = %meta.target_namespace, "pipeline created");
    Ok(json_response(StatusCode::CREATED, &meta))
}

pub async fn list(State(state): State<SharedState>) -> Result<Response, ApiError> {
    let pipelines = state
        .pipelines_op("list_pipelines", |c| async move { c.list_pipelines().await })
        .await?;
    Ok(json_response(StatusCode::OK, &json!({ "pipelines": pipelines })))
}

pub async fn delete(
    State(state): State<SharedState>,
    PathParams(id): PathParams<String>,
) -> Result<Response, ApiError> {
    check_id("pipeline id", &id)?;
    if !state
        .pipelines_op("delete_pipeline", |c| {
            let id = id.clone();
            async move { c.delete_pipeline(&id).await }
        })
        .await?
    {
        return Err(ApiError::pipeline_not_found(&id));
    }
    tracing::info!(pipeline = %id, "pipeline deleted");
    Ok(json_response(
        StatusCode::OK,
        &json!({ "status": "OK", "message": format!("pipeline '{id}' and its staged documents were deleted") }),
    ))
}

pub async fn status(
    State(state): State<SharedState>,
    PathParams(id): PathParams<String>,
) -> Result<Response, ApiError> {
    check_id("pipeline id", &id)?;
    let now = state.clock.now_ms();
    let counts = state
        .pipelines_op("stage_counts", |c| {
            let id = id.clone();
            async move { c.stage_counts(&id, now).await }
        })
        .await?;
    let pending = counts.counts.get(STAGE_PENDING).copied().unwrap_or(0);
    let failed = counts.counts.get(STAGE_FAILED).copied().unwrap_or(0);
    let processing = counts.leased;
    let status = if pending > 0 {
        "pending"
    } else if processing > 0 {
        "waiting_on_upstream"
    } else {
        "idle"
    };
    let rate = counts.indexed_in_window as f64 * 60.0 / RATE_WINDOW_SECONDS as f64;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "pipeline_id": id,
            "status": status,
            "counts": counts.counts,
            "failed_reasons": counts.failed_reasons,
            "pending_count": pending,
            "processing_count": processing,
            "failed_count": failed,
            "indexed_rate_per_min": rate,
            "rate_window_seconds": RATE_WINDOW_SECONDS,
        }),
    ))
}

// ---------------------------------------------------------------- 5-7: documents

pub async fn stage(
    State(state): State<SharedState>,
    PathParams((pipeline, document)): PathParams<(String, String)>,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    stage_document(&state, &pipeline, &document, &body).await
}

pub async fn stage_doc_heartbeat(
    State(state): State<SharedState>,
    PathParams(pipeline): PathParams<String>,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    stage_document(&state, &pipeline, "heartbeat", &body).await
}

pub async fn stage_doc_stage(
    State(state): State<SharedState>,
    PathParams(pipeline): PathParams<String>,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    stage_document(&state, &pipeline, "stage", &body).await
}

async fn stage_document(
    state: &SharedState,
    pipeline: &str,
    document: &str,
    body: &[u8],
) -> Result<Response, ApiError> {
    check_id("pipeline id", pipeline)?;
    check_id("document id", document)?;
    let req: StageRequest = crate::extract::parse_json(body)?;
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
    // Sized to the request body (the chunks re-serialise to at most about that) and trimmed, so a
    // staged document holds no spare capacity for as long as it stays staged.
    let mut chunks_json = Vec::with_capacity(body.len());
    serde_json::to_writer(&mut chunks_json, &req.chunks).map_err(|e| ApiError::validation(e.to_string()))?;
    chunks_json.shrink_to_fit();
    let chunks_json = Bytes::from(chunks_json);
    let now = state.clock.now_ms();
    state
        .pipelines_op("stage_document", |c| {
            let (pipeline, document) = (pipeline.to_owned(), document.to_owned());
            async move { c.stage_document(&pipeline, &document, chunks_json, now).await }
        })
        .await?;
    let chunk_ids: Vec<&str> = req.chunks.iter().map(|c| c.id.as_str()).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "pipeline_id": pipeline,
            "document_id": document,
            "stage": STAGE_PENDING,
            "chunk_count": chunk_ids.len(),
            "chunk_ids": chunk_ids,
        }),
    ))
}

pub async fn chunks(
    State(state): State<SharedState>,
    PathParams((pipeline, document)): PathParams<(String, String)>,
) -> Result<Response, ApiError> {
    check_id("pipeline id", &pipeline)?;
    check_id("document id", &document)?;
    match state
        .pipelines_op("get_chunks", |c| {
            let (pipeline, document) = (pipeline.clone(), document.clone());
            async move { c.get_chunks(&pipeline, &document).await }
        })
        .await?
    {
        Some(json) => Ok(raw_json_response(StatusCode::OK, json.to_vec())),
        None => Err(ApiError::not_found(format!(
            "document '{document}' is not staged in pipeline '{pipeline}'"
        ))),
    }
}

/// Builds the `upsert_rows` of a vectors request.
fn vector_rows(vectors: Vec<VectorDoc>) -> Result<Vec<Value>, ApiError> {
    if vectors.is_empty() {
        return Err(ApiError::validation("vectors must not be empty"));
    }
    let mut seen = HashSet::new();
    vectors
        .into_iter()
        .map(|v| {
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
        })
        .collect()
}

pub async fn vectors(
    State(state): State<SharedState>,
    PathParams((pipeline, document)): PathParams<(String, String)>,
    headers: HeaderMap,
    JsonBody(req): JsonBody<VectorsRequest>,
) -> Result<Response, ApiError> {
    check_id("document id", &document)?;
    let meta = require_pipeline(&state, &pipeline).await?;
    let rows = vector_rows(req.vectors)?;
    let now = state.clock.now_ms();
    let doc = state
        .pipelines_op("document_stage", |c| {
            let (pipeline, document) = (pipeline.clone(), document.clone());
            async move { c.document_stage(&pipeline, &document, now).await }
        })
        .await?;
    let Some(doc) = doc else {
        return Err(ApiError::not_found(format!(
            "document '{document}' is not staged in pipeline '{pipeline}'"
        )));
    };
    let authorization = state.gateway.authorization(headers.get("authorization"))?;
    let count = rows.len();
    let write = json!({ "upsert_rows": rows, "distance_metric": meta.distance_metric });
    let body = serde_json::to_vec(&write).map_err(|e| ApiError::validation(e.to_string()))?;
    let path = format!("/v2/namespaces/{}", encode_segment(&meta.target_namespace));
    let upstream = state
        .gateway
        .post_json(&path, body, authorization, headers.get("x-request-id"))
        .await?;
    if !upstream.is_success() {
        tracing::info!(pipeline = %pipeline, status = upstream.status.as_u16(), "vectors write rejected upstream");
        return Ok(upstream.relay());
    }
    // The vectors are written: from here on the answer is the upstream's success, whatever
    // happens to the stage move.
    let indexed = mark_indexed(&state, &pipeline, &document, doc.version).await;
    let rows_affected = serde_json::from_slice::<Value>(&upstream.body)
        .ok()
        .and_then(|v| v.get("rows_affected").and_then(Value::as_u64))
        .unwrap_or(count as u64);
    let target = &meta.target_namespace;
    let message = match &indexed {
        Indexed::Yes => format!("wrote {count} vectors to namespace '{target}'; document '{document}' is indexed"),
        Indexed::Restaged => format!(
            "wrote {count} vectors to namespace '{target}'; document '{document}' was re-staged meanwhile and keeps its stage"
        ),
        Indexed::Failed(err) => format!(
            "wrote {count} vectors to namespace '{target}'; marking document '{document}' indexed failed ({err}): set its stage to indexed again"
        ),
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "status": "OK",
            "message": message,
            "rows_affected": rows_affected,
            "indexed": matches!(indexed, Indexed::Yes),
        }),
    ))
}

/// What became of the stage move after a successful vectors write.
enum Indexed {
    Yes,
    /// The document was re-staged (new chunks) after it was read: these vectors are not its
    /// current content, so it stays where it is.
    Restaged,
    Failed(String),
}

/// Moves the document to `indexed` if its content is still `version`; one retry on a cache
/// failure. Outcomes are counted (`vectors_index`) and failures logged.
async fn mark_indexed(state: &SharedState, pipeline: &str, document: &str, version: u64) -> Indexed {
    let mut last = String::new();
    for attempt in 0..2 {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let args = SetStageArgs {
            document_ids: vec![document.to_owned()],
            stage: STAGE_INDEXED.to_owned(),
            from_stage: None,
            worker_id: None,
            create_missing: false,
            only_version: Some(version),
            now_ms: state.clock.now_ms(),
        };
        let pipeline_id = pipeline.to_owned();
        let result = state
            .pipelines_op(
                "set_stage",
                |c| async move { c.set_stage(&pipeline_id, &args).await },
            )
            .await;
        match result {
            Ok(1) => {
                state.metrics.record_event("vectors_index", "ok");
                return Indexed::Yes;
            }
            Ok(_) => {
                state.metrics.record_event("vectors_index", "restaged");
                tracing::info!(pipeline = %pipeline, "document re-staged during its vectors write; not marked indexed");
                return Indexed::Restaged;
            }
            Err(err) if err.status == StatusCode::SERVICE_UNAVAILABLE => last = err.message,
            Err(err) => {
                last = err.message;
                break;
            }
        }
    }
    state.metrics.record_event("vectors_index", "failed");
    tracing::warn!(pipeline = %pipeline, error = %last, "vectors written but the document could not be marked indexed");
    Indexed::Failed(last)
}

// ---------------------------------------------------------------- 8-10: queue

pub async fn claim(
    State(state): State<SharedState>,
    PathParams(pipeline): PathParams<String>,
    JsonBody(req): JsonBody<ClaimRequest>,
) -> Result<Response, ApiError> {
    check_id("pipeline id", &pipeline)?;
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
        if prefix.len() > crate::extract::MAX_ID_BYTES {
            return Err(ApiError::validation(
                "document_id_prefix is longer than 512 bytes",
            ));
        }
    }
    let args = ClaimArgs {
        stage: stage.clone(),
        claim_stage: claim_stage.clone(),
        worker_id: req.worker_id.clone(),
        limit: usize::try_from(limit).unwrap_or(usize::MAX),
        lease_ms: u64::try_from(lease_seconds).unwrap_or(0) * 1000,
        document_id_prefix: req.document_id_prefix.filter(|p| !p.is_empty()),
        now_ms: state.clock.now_ms(),
    };
    let documents = state
        .pipelines_op("claim", |c| {
            let pipeline = pipeline.clone();
            async move { c.claim(&pipeline, &args).await }
        })
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "pipeline_id": pipeline,
            "stage": stage,
            "claim_stage": claim_stage,
            "worker_id": req.worker_id,
            "documents": documents,
        }),
    ))
}

pub async fn heartbeat(
    State(state): State<SharedState>,
    PathParams(pipeline): PathParams<String>,
    JsonBody(req): JsonBody<HeartbeatRequest>,
) -> Result<Response, ApiError> {
    check_id("pipeline id", &pipeline)?;
    check_id("worker_id", &req.worker_id)?;
    check_document_ids(&req.document_ids)?;
    let stage = req.stage.unwrap_or_else(|| DEFAULT_CLAIM_STAGE.to_owned());
    check_stage("stage", &stage)?;
    let args = HeartbeatArgs {
        document_ids: req.document_ids,
        worker_id: req.worker_id,
        stage: stage.clone(),
        now_ms: state.clock.now_ms(),
    };
    let updated = state
        .pipelines_op("heartbeat", |c| {
            let pipeline = pipeline.clone();
            async move { c.heartbeat(&pipeline, &args).await }
        })
        .await?;
    Ok(stage_response(&pipeline, &stage, updated))
}

pub async fn set_stage(
    State(state): State<SharedState>,
    PathParams(pipeline): PathParams<String>,
    JsonBody(req): JsonBody<SetStageRequest>,
) -> Result<Response, ApiError> {
    check_id("pipeline id", &pipeline)?;
    check_document_ids(&req.document_ids)?;
    check_stage("stage", &req.stage)?;
    if let Some(from) = &req.from_stage {
        check_stage("from_stage", from)?;
    }
    if let Some(worker) = &req.worker_id {
        check_id("worker_id", worker)?;
    }
    let args = SetStageArgs {
        document_ids: req.document_ids,
        stage: req.stage.clone(),
        from_stage: req.from_stage,
        worker_id: req.worker_id,
        create_missing: req.create_missing.unwrap_or(false),
        only_version: None,
        now_ms: state.clock.now_ms(),
    };
    let updated = state
        .pipelines_op("set_stage", |c| {
            let pipeline = pipeline.clone();
            async move { c.set_stage(&pipeline, &args).await }
        })
        .await?;
    Ok(stage_response(&pipeline, &req.stage, updated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_epoch_ms() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_400_000_123), "2026-11-23T02:13:20Z");
    }
}
