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
use bytes::Bytes;
use hevlayer_filter::sidecar_api::{MirrorResponse, PurgeRequest, MIRROR_PATH, PURGE_PATH};

use crate::cache::mirror::{error_label, result_label};
use crate::cache::{CacheError, CacheResult, DocumentCache};
use crate::error::{json_response, ApiError};
use crate::extract::{parse_json, JsonBody, RawBody};
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::mirror::{plan, MirrorCallout, MirrorOp};
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
        self.metrics
            .record_cache_op(op, result_label(&result), started.elapsed());
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

/// The mirror callout. Once its body is in, the mirror runs detached: a caller that gives up
/// (the filter's callout timeout) cannot cut it short while it is parsed, planned or applied and
/// leave some documents older than what Turbopuffer now holds.
async fn mirror(State(state): State<SharedState>, RawBody(body): RawBody) -> Result<Response, ApiError> {
    tokio::spawn(run_mirror(state, body)).await.unwrap_or_else(|e| {
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            e.to_string(),
        ))
    })
}

/// Parses, plans and applies one mirror callout. The body is parsed here rather than by
/// `JsonBody` so that any body it cannot use (malformed, or a write of the wrong shape) counts as
/// an `invalid` mirror.
async fn run_mirror(state: SharedState, body: Bytes) -> Result<Response, ApiError> {
    let MirrorCallout {
        namespace,
        upserted_at,
        write,
        response,
    } = match parse_json(&body) {
        Ok(callout) => callout,
        Err(err) => {
            state.metrics.record_event("mirror", "invalid");
            return Err(err);
        }
    };
    // Everything needed is parsed out: free the (possibly large) body before applying.
    drop(body);
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
    Ok(json_response(StatusCode::OK, &MirrorResponse { applied }))
}

/// Applies the planned ops as one batch (`DocumentCache::apply_mirror`: each document's ops in
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
    let report = state.cache.apply_mirror(&namespace, ops, upserted_at).await;
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
