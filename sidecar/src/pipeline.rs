//! The ten pipeline routes of SPEC §3. Their bodies are validated by the plain functions of
//! `requests`; the handlers run those, then the store operation, and answer.

mod requests;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use self::requests::{
    validate_claim, validate_create, validate_heartbeat, validate_set_stage, validate_stage, vector_rows,
};
pub use self::requests::{
    ClaimRequest, CreateRequest, HeartbeatRequest, SetStageRequest, StageRequest, VectorDoc, VectorsRequest,
};
use crate::cache::{
    PipelineMeta, SetStageArgs, RATE_WINDOW_SECONDS, STAGE_FAILED, STAGE_INDEXED, STAGE_PENDING,
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
    let meta = validate_create(req, rfc3339(crate::cache::now_ms()))?;
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
    let staged = validate_stage(pipeline, document, body)?;
    let chunks_json = staged.chunks_json;
    let now = state.clock.now_ms();
    state
        .pipelines_op("stage_document", |c| {
            let (pipeline, document) = (pipeline.to_owned(), document.to_owned());
            async move { c.stage_document(&pipeline, &document, chunks_json, now).await }
        })
        .await?;
    let chunk_ids: Vec<&str> = staged.chunks.iter().map(|c| c.id.as_str()).collect();
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
    let args = validate_claim(&pipeline, req, state.clock.now_ms())?;
    let (stage, claim_stage, worker_id) = (
        args.stage.clone(),
        args.claim_stage.clone(),
        args.worker_id.clone(),
    );
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
            "worker_id": worker_id,
            "documents": documents,
        }),
    ))
}

pub async fn heartbeat(
    State(state): State<SharedState>,
    PathParams(pipeline): PathParams<String>,
    JsonBody(req): JsonBody<HeartbeatRequest>,
) -> Result<Response, ApiError> {
    let args = validate_heartbeat(&pipeline, req, state.clock.now_ms())?;
    let stage = args.stage.clone();
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
    let args = validate_set_stage(&pipeline, req, state.clock.now_ms())?;
    let stage = args.stage.clone();
    let updated = state
        .pipelines_op("set_stage", |c| {
            let pipeline = pipeline.clone();
            async move { c.set_stage(&pipeline, &args).await }
        })
        .await?;
    Ok(stage_response(&pipeline, &stage, updated))
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
