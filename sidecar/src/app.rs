//! Shared state, the router, and the service-level routes (health, metrics, mirror, purge).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use hevlayer_filter::sidecar_api::{MirrorRequest, MirrorResponse, PurgeRequest, MIRROR_PATH, PURGE_PATH};

use crate::cache::{CacheError, CacheResult, DocumentCache};
use crate::error::{json_response, ApiError};
use crate::extract::JsonBody;
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::mirror::{plan, MirrorOp};
use crate::{documents, pipeline};

/// The clock pipelines use for leases; tests move it forward instead of sleeping.
#[derive(Default)]
pub struct Clock {
    offset_ms: AtomicU64,
}

impl Clock {
    pub fn now_ms(&self) -> u64 {
        crate::cache::now_ms().saturating_add(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Moves this clock forward (tests only need it; harmless otherwise).
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

pub struct AppState {
    pub cache: Arc<dyn DocumentCache>,
    pub gateway: Gateway,
    pub metrics: Metrics,
    pub clock: Clock,
    pub mirror_vectors: bool,
    pub cache_timeout: Duration,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    /// Runs one cache operation under the per-operation timeout and records it. `f` gets the
    /// cache and returns the operation.
    ///
    /// A backend whose operations are several commands (`detach_ops`: Aerospike) runs each in its
    /// own task: when the timeout fires, or the client goes away, the caller stops waiting (503)
    /// but the operation still finishes, so it is never cut between two of its commands.
    pub async fn cache_op<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<dyn DocumentCache>) -> Fut,
        Fut: Future<Output = CacheResult<T>> + Send + 'static,
    {
        let started = Instant::now();
        let timed_out = || {
            CacheError::Unavailable(format!(
                "{op} timed out after {} ms",
                self.cache_timeout.as_millis()
            ))
        };
        let fut = f(self.cache.clone());
        let result = if self.cache.detach_ops() {
            let mut task = tokio::spawn(fut);
            match tokio::time::timeout(self.cache_timeout, &mut task).await {
                Ok(Ok(r)) => r,
                Ok(Err(join)) => Err(CacheError::Unavailable(format!("{op} failed: {join}"))),
                // Dropping the handle leaves the task running to completion.
                Err(_) => Err(timed_out()),
            }
        } else {
            match tokio::time::timeout(self.cache_timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(timed_out()),
            }
        };
        let label = match &result {
            Ok(_) | Err(CacheError::PipelineNotFound(_) | CacheError::PipelineExists(_)) => "ok",
            Err(CacheError::Unavailable(_)) => "unavailable",
            Err(CacheError::Full(_)) => "full",
        };
        self.metrics.record_cache_op(op, label, started.elapsed());
        result.map_err(ApiError::from)
    }
}

pub fn router(state: SharedState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route(MIRROR_PATH, post(mirror))
        .route(PURGE_PATH, post(purge))
        .route("/v2/namespaces/{namespace}/documents/{id}", get(documents::fetch))
        .route("/v2/pipelines", post(pipeline::create).get(pipeline::list))
        .route(
            "/v2/pipelines/{pipeline}",
            axum::routing::delete(pipeline::delete),
        )
        .route("/v2/pipelines/{pipeline}/status", get(pipeline::status))
        .route("/v2/pipelines/{pipeline}/claim", post(pipeline::claim))
        // `heartbeat` and `stage` are also valid document ids: the static routes take PUT too.
        .route(
            "/v2/pipelines/{pipeline}/documents/heartbeat",
            post(pipeline::heartbeat).put(pipeline::stage_doc_heartbeat),
        )
        .route(
            "/v2/pipelines/{pipeline}/documents/stage",
            post(pipeline::set_stage).put(pipeline::stage_doc_stage),
        )
        .route(
            "/v2/pipelines/{pipeline}/documents/{document}",
            put(pipeline::stage),
        )
        .route(
            "/v2/pipelines/{pipeline}/documents/{document}/chunks",
            get(pipeline::chunks),
        )
        .route(
            "/v2/pipelines/{pipeline}/documents/{document}/vectors",
            put(pipeline::vectors),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Counts every request by route and status and logs it.
async fn observe(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().to_string();
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    state.metrics.record_request(&route, &method, status);
    let elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    let request_id = request_id.as_deref().unwrap_or("");
    if status >= 400 {
        tracing::info!(route = %route, method = %method, status, elapsed_us, request_id, "request refused");
    } else {
        tracing::debug!(route = %route, method = %method, status, elapsed_us, request_id, "request");
    }
    response
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route on the sidecar")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

async fn healthz(State(state): State<SharedState>) -> Response {
    let health = state.cache.health().await;
    let status = if health.connected {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(
        status,
        &serde_json::json!({
            "status": if health.connected { "ok" } else { "degraded" },
            "cache": health,
        }),
    )
}

async fn metrics(State(state): State<SharedState>) -> Response {
    let now = state.clock.now_ms();
    let mut stages = Vec::new();
    if let Ok(pipelines) = state
        .cache_op("list_pipelines", |c| async move { c.list_pipelines().await })
        .await
    {
        for p in pipelines {
            let id = p.id.clone();
            if let Ok(counts) = state
                .cache_op(
                    "stage_counts",
                    move |c| async move { c.stage_counts(&id, now).await },
                )
                .await
            {
                stages.extend(
                    counts
                        .counts
                        .into_iter()
                        .map(|(stage, n)| (p.id.clone(), stage, n)),
                );
            }
        }
    }
    let connected = state.cache.health().await.connected;
    let body = state.metrics.render(&stages, connected);
    let mut response = (StatusCode::OK, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Lanes a mirror's documents are spread over (one document's ops stay in order in one lane).
const MIRROR_LANES: usize = 16;

async fn mirror(
    State(state): State<SharedState>,
    JsonBody(req): JsonBody<MirrorRequest>,
) -> Result<Response, ApiError> {
    let ops = match plan(&req.write, req.response.as_ref(), state.mirror_vectors) {
        Ok(ops) => ops,
        Err(message) => {
            state.metrics.record_event("mirror", "invalid");
            return Err(ApiError::validation(message));
        }
    };
    // Detached, so a caller that gives up (the filter's callout timeout) cannot cut a mirror
    // short and leave some documents older than what Turbopuffer now holds.
    let task = tokio::spawn(apply_mirror(state.clone(), req.namespace, req.upserted_at, ops));
    let (applied, failure) = task.await.unwrap_or_else(|e| {
        (
            0,
            Some(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                e.to_string(),
            )),
        )
    });
    if let Some(err) = failure {
        state.metrics.record_event("mirror", "failed");
        return Err(err);
    }
    state.metrics.record_event("mirror", "ok");
    Ok(json_response(StatusCode::OK, &MirrorResponse { applied }))
}

/// Applies the planned ops: each document's ops in order, documents spread over
/// `MIRROR_LANES` concurrent lanes. A document whose write failed is evicted (best effort);
/// returns how many ops took effect and the first failure.
async fn apply_mirror(
    state: SharedState,
    namespace: String,
    upserted_at: u64,
    ops: Vec<MirrorOp>,
) -> (u64, Option<ApiError>) {
    let mut lanes: Vec<Vec<MirrorOp>> = (0..MIRROR_LANES).map(|_| Vec::new()).collect();
    let mut lane_of: std::collections::HashMap<crate::cache::DocId, usize> = std::collections::HashMap::new();
    for op in ops {
        let id = match &op {
            MirrorOp::Upsert(id, _)
            | MirrorOp::Patch(id, _)
            | MirrorOp::Evict(id)
            | MirrorOp::Invalidate(id) => id.clone(),
        };
        let next = lane_of.len() % MIRROR_LANES;
        let lane = *lane_of.entry(id).or_insert(next);
        lanes[lane].push(op);
    }
    let namespace = Arc::new(namespace);
    let mut tasks = tokio::task::JoinSet::new();
    for lane in lanes.into_iter().filter(|l| !l.is_empty()) {
        let state = state.clone();
        let namespace = namespace.clone();
        tasks.spawn(async move {
            let mut applied = 0u64;
            let mut failure = None;
            let mut failed_ids = std::collections::HashSet::new();
            for op in lane {
                let (id, result) = match op {
                    MirrorOp::Upsert(id, attrs) | MirrorOp::Patch(id, attrs) if failed_ids.contains(&id) => {
                        drop(attrs);
                        continue;
                    }
                    MirrorOp::Upsert(id, attrs) => {
                        let r = mirror_op(&state, "upsert_document", &namespace, &id, move |c, ns, id| async move {
                            c.upsert_document(&ns, &id, attrs, upserted_at).await
                        })
                        .await;
                        (id, r)
                    }
                    MirrorOp::Patch(id, attrs) => {
                        let r = mirror_op(&state, "patch_document", &namespace, &id, move |c, ns, id| async move {
                            c.patch_document(&ns, &id, attrs, upserted_at).await
                        })
                        .await;
                        (id, r)
                    }
                    MirrorOp::Evict(id) => {
                        let r = evict(&state, &namespace, &id, upserted_at).await;
                        (id, r)
                    }
                    MirrorOp::Invalidate(id) => {
                        let r = evict(&state, &namespace, &id, upserted_at.saturating_sub(1)).await;
                        (id, r)
                    }
                };
                match result {
                    Ok(true) => applied += 1,
                    Ok(false) => {}
                    Err(err) => {
                        // Leave no stale copy behind what Turbopuffer now holds (copies older than
                        // this write are refused; this write's own state may be cached again).
                        let _ = evict(&state, &namespace, &id, upserted_at.saturating_sub(1)).await;
                        tracing::warn!(namespace = %namespace, error = %err.message, "mirror failed for a document");
                        failed_ids.insert(id);
                        failure.get_or_insert(err);
                    }
                }
            }
            (applied, failure)
        });
    }
    let mut applied = 0;
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((n, f)) => {
                applied += n;
                if let Some(f) = f {
                    failure.get_or_insert(f);
                }
            }
            Err(e) => {
                failure.get_or_insert(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    e.to_string(),
                ));
            }
        }
    }
    (applied, failure)
}

/// One mirror op on `id` of `namespace` through `cache_op`.
async fn mirror_op<F, Fut>(
    state: &SharedState,
    op: &'static str,
    namespace: &Arc<String>,
    id: &crate::cache::DocId,
    f: F,
) -> Result<bool, ApiError>
where
    F: FnOnce(Arc<dyn DocumentCache>, Arc<String>, crate::cache::DocId) -> Fut,
    Fut: Future<Output = CacheResult<bool>> + Send + 'static,
{
    let (ns, id) = (namespace.clone(), id.clone());
    state.cache_op(op, move |c| f(c, ns, id)).await
}

/// Evicts `id`, refusing copies stamped up to `refuse_up_to`.
async fn evict(
    state: &SharedState,
    namespace: &Arc<String>,
    id: &crate::cache::DocId,
    refuse_up_to: u64,
) -> Result<bool, ApiError> {
    mirror_op(
        state,
        "evict_document",
        namespace,
        id,
        move |c, ns, id| async move { c.evict_document(&ns, &id, refuse_up_to).await },
    )
    .await
}

async fn purge(
    State(state): State<SharedState>,
    JsonBody(req): JsonBody<PurgeRequest>,
) -> Result<Response, ApiError> {
    let namespace = req.namespace.clone();
    let result = state
        .cache_op("purge_namespace", move |c| async move {
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
