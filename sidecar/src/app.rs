//! The router, and the service-level routes (health, metrics).

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use hevlayer_sidecar_api::{
    EVICT_MIRRORS_PATH, EVICT_PATH, MIRRORS_PATH, MIRROR_PATH, PURGE_PATH, REQUEST_ID_HEADER, WATERMARKS_PATH,
};
use tracing::field::Empty;
use tracing::{Instrument, Span};

use crate::error::{json_response, ApiError};
use crate::state::SharedState;
use crate::trace::RequestTrace;
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
        .route(EVICT_MIRRORS_PATH, post(callouts::evict_mirrors))
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

/// Counts every request by route and status and logs it, inside a span that carries the request
/// id and the caller's W3C trace context (trace id, parent span id, flags, tracestate), so every
/// line logged while the request is handled names its trace.
async fn observe(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().to_string();
    let span = request_span(&route, &method, request.headers());
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    state.metrics.record_request(&route, &method, status, elapsed);
    let elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    let _entered = span.enter();
    if status >= 400 {
        tracing::info!(status, elapsed_us, "request refused");
    } else {
        tracing::debug!(status, elapsed_us, "request");
    }
    response
}

/// The span of one request: route, method, request id, and the trace context when the
/// `traceparent` is valid (an invalid one is left out, the request goes on).
pub fn request_span(route: &str, method: &str, headers: &HeaderMap) -> Span {
    let request_id = headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let span = tracing::info_span!(
        "request",
        route = %route,
        method = %method,
        request_id,
        trace_id = Empty,
        parent_span_id = Empty,
        trace_flags = Empty,
        tracestate = Empty,
    );
    let trace = RequestTrace::from_headers(headers);
    if let Some(parent) = &trace.parent {
        span.record("trace_id", parent.trace_id.as_str());
        span.record("parent_span_id", parent.parent_id.as_str());
        span.record("trace_flags", format!("{:02x}", parent.flags).as_str());
    }
    if let Some(state) = &trace.tracestate {
        span.record("tracestate", state.as_str());
    }
    span
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
    let mut leased = Vec::new();
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
                leased.push((p.id.clone(), counts.leased));
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
    let body = state.metrics.render(&stages, &leased, connected, &watermarks);
    let mut response = (StatusCode::OK, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A log sink the test reads back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The JSON line logged inside the span of a request with these headers.
    fn logged_span(headers: &[(&'static str, &str)]) -> serde_json::Value {
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .finish();
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, v.parse().unwrap());
        }
        tracing::subscriber::with_default(subscriber, || {
            request_span("/internal/v1/mirror", "POST", &map).in_scope(|| tracing::info!("handled"));
        });
        let line = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let event: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        event["span"].clone()
    }

    #[test]
    fn the_request_span_carries_the_request_id_and_trace_context() {
        let span = logged_span(&[
            ("x-request-id", "client-1"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]);
        assert_eq!(span["request_id"], "client-1");
        assert_eq!(span["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(span["parent_span_id"], "00f067aa0ba902b7");
        assert_eq!(span["trace_flags"], "01");
        assert_eq!(span["tracestate"], "congo=t61rcWkgMzE");
        assert_eq!(span["route"], "/internal/v1/mirror");
    }

    #[test]
    fn an_invalid_traceparent_leaves_the_span_without_trace_fields() {
        let span = logged_span(&[
            ("x-request-id", "client-2"),
            (
                "traceparent",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            ),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]);
        assert_eq!(span["request_id"], "client-2");
        for field in ["trace_id", "parent_span_id", "trace_flags", "tracestate"] {
            assert!(span.get(field).is_none(), "{field}: {span}");
        }
    }
}
