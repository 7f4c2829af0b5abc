//! The routes the filter calls out to: mirror a write, purge a namespace, register the namespaces
//! a worker has seen and read their watermarks.

use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use hevlayer_sidecar_api::{MirrorBatchResponse, MirrorResponse, PurgeRequest, WatermarkRegistration};
use serde::Deserialize;

use crate::cache::mirror::error_label;
use crate::cache::DocId;
use crate::error::{json_response, ApiError};
use crate::extract::{parse_json, JsonBody, RawBody};
use crate::mirror::{plan, MirrorCallout, MirrorOp};
use crate::state::SharedState;

/// The mirror callout. Once its body is in, the mirror runs detached: a caller that gives up
/// (the filter's callout timeout) cannot cut it short while it is parsed, planned or applied and
/// leave some documents older than what Turbopuffer now holds.
pub async fn mirror(State(state): State<SharedState>, RawBody(body): RawBody) -> Result<Response, ApiError> {
    let heavy = heavy_pool(&state, &body);
    detached(heavy, run_mirror(state, body)).await
}

/// Several mirrors in one callout (a worker's root context sends the mirrors that go after their
/// responses this way). Detached like a single mirror; the answer says, per mirror, whether it
/// was applied. A batch that does not parse is refused whole (422).
pub async fn mirrors(State(state): State<SharedState>, RawBody(body): RawBody) -> Result<Response, ApiError> {
    let heavy = heavy_pool(&state, &body);
    detached(heavy, run_batch(state, body)).await
}

/// Mirror bodies from this size on run on the shared runtime (`AppState::heavy`): a 10,000-row
/// batch is several ms of CPU that would otherwise hold up every connection of its thread
/// (`server`), among them evictions a response waits for. Smaller ones (a 1-row write's mirror
/// is about 4 KB; riders are at most 64 KiB by default) stay on their thread, which wakes no other.
pub const HEAVY_BODY_BYTES: usize = 64 << 10;

/// Where a mirror callout with this body runs: None on its connection's thread.
fn heavy_pool(state: &SharedState, body: &Bytes) -> Option<tokio::runtime::Handle> {
    state.heavy.clone().filter(|_| body.len() >= HEAVY_BODY_BYTES)
}

/// Runs a mirror handler in a task of its own (on `pool`, else where the caller runs), so that
/// the caller going away cannot cut it short.
async fn detached(
    pool: Option<tokio::runtime::Handle>,
    work: impl std::future::Future<Output = Result<Response, ApiError>> + Send + 'static,
) -> Result<Response, ApiError> {
    let task = match pool {
        Some(pool) => pool.spawn(work),
        None => tokio::spawn(work),
    };
    task.await.unwrap_or_else(|e| {
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            e.to_string(),
        ))
    })
}

/// Parses a mirror callout's body; one the sidecar cannot use counts as an `invalid` mirror.
fn parse_mirror<T: serde::de::DeserializeOwned>(state: &SharedState, body: &Bytes) -> Result<T, ApiError> {
    parse_json(body).inspect_err(|_| state.metrics.record_event("mirror", "invalid"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MirrorBatch {
    mirrors: Vec<MirrorCallout>,
}

async fn run_batch(state: SharedState, body: Bytes) -> Result<Response, ApiError> {
    let batch: MirrorBatch = parse_mirror(&state, &body)?;
    drop(body);
    let mut applied = Vec::with_capacity(batch.mirrors.len());
    for callout in batch.mirrors {
        applied.push(apply_callout(&state, callout).await.is_ok());
    }
    Ok(json_response(StatusCode::OK, &MirrorBatchResponse { applied }))
}

/// Plans and applies one parsed mirror, and records its outcome.
async fn apply_callout(state: &SharedState, callout: MirrorCallout) -> Result<u64, ApiError> {
    let MirrorCallout {
        namespace,
        upserted_at,
        write,
        response,
    } = callout;
    let ops = match plan(write, response.as_ref(), state.mirror_vectors) {
        Ok(ops) => ops,
        Err(message) => {
            state.metrics.record_event("mirror", "invalid");
            return Err(ApiError::validation(message));
        }
    };
    let (applied, failure) = apply_mirror(state.clone(), namespace, upserted_at, ops).await;
    if let Some(err) = failure {
        state.metrics.record_event("mirror", "failed");
        return Err(err);
    }
    state.metrics.record_event("mirror", "ok");
    Ok(applied)
}

/// Parses, plans and applies one mirror callout. The body is parsed here rather than by
/// `JsonBody` so that any body it cannot use (malformed, or a write of the wrong shape) counts as
/// an `invalid` mirror.
async fn run_mirror(state: SharedState, body: Bytes) -> Result<Response, ApiError> {
    let callout: MirrorCallout = parse_mirror(&state, &body)?;
    // Everything needed is parsed out: free the (possibly large) body before applying.
    drop(body);
    let applied = apply_callout(&state, callout).await?;
    Ok(json_response(StatusCode::OK, &MirrorResponse { applied }))
}

/// Applies the planned ops as one batch (`DocumentStore::apply_mirror`: each document's ops in
/// order, a document whose write failed evicted) and records it: one `mirror_batch` cache
/// operation for the whole batch, plus the single-document operations a backend without a batch
/// path ran. Returns how many ops took effect and the first failure.
async fn apply_mirror(
    state: SharedState,
    namespace: String,
    upserted_at: u64,
    ops: Vec<MirrorOp>,
) -> (u64, Option<ApiError>) {
    let started = Instant::now();
    let report = state
        .stores
        .documents
        .apply_mirror(&namespace, ops, upserted_at)
        .await;
    let label = report.failure.as_ref().map_or("ok", error_label);
    state.metrics.record_cache_ops(&report.ops);
    state
        .metrics
        .record_cache_op("mirror_batch", label, started.elapsed());
    if let Some(err) = &report.failure {
        tracing::warn!(
            namespace = %namespace,
            failed_documents = report.failed,
            error = %err,
            "mirror failed for some documents (evicted instead)"
        );
    }
    (report.applied, report.failure.map(ApiError::from))
}

pub async fn purge(
    State(state): State<SharedState>,
    JsonBody(req): JsonBody<PurgeRequest>,
) -> Result<Response, ApiError> {
    let namespace = req.namespace.clone();
    let result = state
        .documents_op("purge_namespace", move |c| async move {
            c.purge_namespace(&namespace).await
        })
        .await;
    state
        .metrics
        .record_event("purge", if result.is_ok() { "ok" } else { "failed" });
    let applied = result?;
    tracing::info!(namespace = %req.namespace, purged = applied, "namespace purged");
    Ok(json_response(StatusCode::OK, &MirrorResponse { applied }))
}

/// A worker registers the namespaces its requests used and gets their watermarks back.
pub async fn watermarks(
    State(state): State<SharedState>,
    JsonBody(registration): JsonBody<WatermarkRegistration>,
) -> Response {
    let answer = state.watermarks.register(registration, crate::cache::now_ms());
    json_response(StatusCode::OK, &answer)
}

/// An eviction callout: `hevlayer_sidecar_api::EvictRequest`, the one definition of the message,
/// with each fence's ids read straight into document ids (a test keeps the two in step). An id
/// that is neither a string nor an unsigned integer makes the body invalid (422).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvictCallout {
    fences: Vec<FenceCallout>,
}

/// `hevlayer_sidecar_api::Fence`, its ids parsed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FenceCallout {
    namespace: String,
    ids: Option<Vec<DocId>>,
    stamp: u64,
}

/// Evicts documents a write changes: sent with the write (its eviction ahead, before its mirror
/// goes after the response) and for what the filter could not mirror (a write whose mirror
/// failed, timed out, or whose outcome it never saw). Each fence's ids, their tombstones refusing
/// copies older than the fence's stamp, or a whole namespace. Idempotent, so the filter retries
/// until it gets a 2xx.
pub async fn evict(
    State(state): State<SharedState>,
    JsonBody(request): JsonBody<EvictCallout>,
) -> Result<Response, ApiError> {
    let applied = run_evictions(&state, request.fences).await?;
    Ok(json_response(StatusCode::OK, &MirrorResponse { applied }))
}

/// `hevlayer_sidecar_api::EvictMirrorsRequest`: evictions ahead with mirrors riding along.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvictMirrorsCallout {
    fences: Vec<FenceCallout>,
    mirrors: Vec<MirrorCallout>,
}

/// Evictions ahead with the mirrors of earlier writes riding along: the evictions and the
/// mirrors run side by side (the answer, which a client's response may wait for, takes the
/// longer of the two, not their sum), the mirrors in their order. The answer is 2xx only when
/// every fence was evicted (else the error, and the filter fences those writes and counts the
/// mirrors failed), with each mirror's outcome like a batch's. Detached like a mirror. Running
/// them together is safe for freshness, as two callouts in flight at once always were: a mirror
/// of a document that one of the fences evicts is older than that fence's write, so either it
/// lands first and is evicted, or the fence's tombstone refuses it.
pub async fn evict_mirrors(
    State(state): State<SharedState>,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let heavy = heavy_pool(&state, &body);
    detached(heavy, async move {
        let request: EvictMirrorsCallout = parse_mirror(&state, &body)?;
        drop(body);
        let mirror_state = state.clone();
        let mirrors = tokio::spawn(async move {
            let mut applied = Vec::with_capacity(request.mirrors.len());
            for callout in request.mirrors {
                applied.push(apply_callout(&mirror_state, callout).await.is_ok());
            }
            applied
        });
        let evicted = run_evictions(&state, request.fences).await;
        let applied = mirrors
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", e.to_string()))?;
        evicted?;
        Ok(json_response(StatusCode::OK, &MirrorBatchResponse { applied }))
    })
    .await
}

/// Carries out an eviction callout's fences, in order; the first failure ends it.
async fn run_evictions(state: &SharedState, fences: Vec<FenceCallout>) -> Result<u64, ApiError> {
    let plans = fences.into_iter().map(|f| (f.namespace, f.ids, f.stamp));
    let mut applied = 0;
    for (namespace, ids, stamp) in plans {
        let outcome = match ids {
            None => {
                let ns = namespace.clone();
                state
                    .documents_op(
                        "purge_namespace",
                        move |c| async move { c.purge_namespace(&ns).await },
                    )
                    .await
            }
            // Invalidations: copies older than the fenced write are refused for a while, the
            // write's own version (if Turbopuffer applied it) may be cached again.
            Some(ids) => {
                let ops = ids.into_iter().map(MirrorOp::Invalidate).collect();
                match apply_mirror(state.clone(), namespace.clone(), stamp, ops).await {
                    (n, None) => Ok(n),
                    (_, Some(err)) => Err(err),
                }
            }
        };
        match outcome {
            Ok(n) => applied += n,
            Err(err) => {
                state.metrics.record_event("evict", "failed");
                return Err(err);
            }
        }
    }
    state.metrics.record_event("evict", "ok");
    // Every write that evicts ahead sends one of these, so they log at debug level; failures
    // (above) are counted and answered as errors.
    tracing::debug!(applied, "documents evicted");
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use hevlayer_sidecar_api::{evict_body, EvictRequest, Fence};

    use super::*;

    /// The thread a detached handler ran on (its error message carries the name).
    async fn ran_on(pool: Option<tokio::runtime::Handle>) -> String {
        let answer = detached(pool, async {
            let name = std::thread::current().name().unwrap_or("?").to_owned();
            Err(ApiError::new(StatusCode::IM_A_TEAPOT, "where", name))
        })
        .await;
        match answer {
            Err(e) => e.message,
            Ok(_) => panic!("the handler answers an error"),
        }
    }

    /// A large mirror runs on the shared runtime, a small one where its connection is served.
    #[test]
    fn large_mirrors_run_on_the_shared_runtime() {
        let shared = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("shared-test")
            .build()
            .unwrap();
        let lane = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let here = std::thread::current().name().unwrap_or("?").to_owned();
        let (small, large) =
            lane.block_on(async { (ran_on(None).await, ran_on(Some(shared.handle().clone())).await) });
        assert_eq!(small, here);
        assert_eq!(large, "shared-test");
    }

    /// `EvictCallout` reads what the filter sends (`evict_body`) field for field; destructuring
    /// `Fence` without `..` makes a field added there fail to compile here until the callout has it.
    #[test]
    fn the_evict_callout_parses_what_the_filter_sends() {
        let ids: [&[u8]; 3] = [b"7", br#""a\"b""#, br#""\u0062""#];
        let body = evict_body("ns", ids, 42);
        let request: EvictRequest = serde_json::from_slice(&body).unwrap();
        let callout: EvictCallout = serde_json::from_slice(&body).unwrap();
        let [Fence {
            namespace,
            ids,
            stamp,
        }] = request.fences.as_slice()
        else {
            panic!("one fence");
        };
        let [fence] = callout.fences.as_slice() else {
            panic!("one fence");
        };
        assert_eq!((&fence.namespace, fence.stamp), (namespace, *stamp));
        let expected: Vec<DocId> = ids.iter().flatten().filter_map(DocId::from_json).collect();
        assert_eq!(fence.ids.as_ref(), Some(&expected));
        let purge = br#"{"fences":[{"namespace":"n","ids":null,"stamp":1}]}"#;
        let callout: EvictCallout = serde_json::from_slice(purge).unwrap();
        assert!(callout.fences[0].ids.is_none());
        for bad in [r#"[-1]"#, r#"[1.5]"#, r#"[{"x":1}]"#, r#"[true]"#] {
            let body = format!(r#"{{"fences":[{{"namespace":"n","ids":{bad},"stamp":1}}]}}"#);
            assert!(serde_json::from_str::<EvictCallout>(&body).is_err(), "{bad}");
        }
    }
}
