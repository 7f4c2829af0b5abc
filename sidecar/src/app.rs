//! The router, and the service-level routes (health, metrics).

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use hevlayer_sidecar_api::{EVICT_PATH, MIRRORS_PATH, MIRROR_PATH, PURGE_PATH, WATERMARKS_PATH};

use crate::error::{json_response, ApiError};
use crate::state::SharedState;
use crate::{callouts, documents, pipeline};

pub fn router(state: SharedState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route(MIRROR_PATH, post(callouts::mirror))
        .route(MIRRORS_PATH, post(callouts::mirrors))
        .route(PURGE_PATH, post(callouts::purge))
        .route(WATERMARKS_PATH, post(callouts::watermarks))
        .route(EVICT_PATH, post(callouts::evict))
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
    let health = state.stores.health().await;
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
        .pipelines_op("list_pipelines", |c| async move { c.list_pipelines().await })
        .await
    {
        for p in pipelines {
            let id = p.id.clone();
            if let Ok(counts) = state
                .pipelines_op(
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
    let connected = state.stores.health().await.connected;
    let watermarks = state.watermarks.report(crate::cache::now_ms());
    let body = state.metrics.render(&stages, connected, &watermarks);
    let mut response = (StatusCode::OK, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
