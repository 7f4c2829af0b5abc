//! `GET /v2/namespaces/{ns}/documents/{id}`: the cache first, else Turbopuffer through the gateway
//! (a query filtered on the id), then backfill.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::cache::{Attributes, DocId};
use crate::error::{json_response, ApiError};
use crate::extract::{check_id, PathParams};
use crate::gateway::encode_segment;
use crate::state::SharedState;

const CACHE_HEADER: &str = "x-layer-cache";

/// Candidate ids for a path segment: a decimal segment may be an unsigned-integer id or a string id.
fn candidates(raw: &str) -> Vec<DocId> {
    match raw.parse::<u64>() {
        Ok(n) if n.to_string() == raw => vec![DocId::Num(n), DocId::Str(raw.to_owned())],
        _ => vec![DocId::Str(raw.to_owned())],
    }
}

fn document_body(id: &DocId, attributes: Attributes) -> Value {
    json!({ "id": id.to_json(), "attributes": attributes })
}

fn with_cache_header(mut response: Response, value: &'static str) -> Response {
    response
        .headers_mut()
        .insert(CACHE_HEADER, HeaderValue::from_static(value));
    response
}

pub async fn fetch(
    State(state): State<SharedState>,
    PathParams((namespace, raw_id)): PathParams<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_id("namespace", &namespace)?;
    check_id("document id", &raw_id)?;
    let ids = candidates(&raw_id);

    let mut cache_failed = false;
    for id in &ids {
        let (ns, key) = (namespace.clone(), id.clone());
        match state
            .cache_op(
                "get_document",
                move |c| async move { c.get_document(&ns, &key).await },
            )
            .await
        {
            Ok(Some(doc)) => {
                state.metrics.record_event("fetch", "hit");
                return Ok(with_cache_header(
                    json_response(StatusCode::OK, &document_body(id, doc.attributes)),
                    "hit",
                ));
            }
            Ok(None) => {}
            Err(err) => {
                tracing::warn!(namespace = %namespace, error = %err.message, "cache read failed on fetch");
                cache_failed = true;
                break;
            }
        }
    }

    let authorization = state.gateway.authorization(headers.get("authorization"))?;
    let path = format!("/v2/namespaces/{}/query", encode_segment(&namespace));
    let mut found: Option<(DocId, serde_json::Map<String, Value>)> = None;
    // Whether an earlier id form was a valid filter for this namespace (answered 2xx).
    let mut answered = false;
    for (i, id) in ids.iter().enumerate() {
        let query = json!({
            "filters": ["id", "Eq", id.to_json()],
            "rank_by": ["id", "asc"],
            "top_k": 1,
            "include_attributes": true,
        });
        let body = serde_json::to_vec(&query).unwrap_or_default();
        let upstream = state
            .gateway
            .post_json(&path, body, authorization.clone(), headers.get("x-request-id"))
            .await?;
        let last = i + 1 == ids.len();
        if upstream.status == StatusCode::NOT_FOUND {
            return Err(ApiError::not_found(format!("namespace '{namespace}' not found")));
        }
        if !upstream.is_success() {
            // A numeric filter on a string-id namespace (or the reverse) is a 400: try the other form.
            if !last && upstream.status == StatusCode::BAD_REQUEST {
                continue;
            }
            // The other form matched the namespace's id type and found nothing: not found.
            if answered && upstream.status == StatusCode::BAD_REQUEST {
                break;
            }
            return Ok(upstream.relay());
        }
        answered = true;
        let parsed: Value = serde_json::from_slice(&upstream.body).map_err(|e| {
            ApiError::upstream(format!("Turbopuffer returned an unreadable query response: {e}"))
        })?;
        let row = parsed
            .get("rows")
            .and_then(Value::as_array)
            .and_then(|rows| rows.first())
            .and_then(Value::as_object);
        if let Some(row) = row {
            let row_id = row
                .get("id")
                .and_then(DocId::from_json)
                .unwrap_or_else(|| id.clone());
            found = Some((row_id, row.clone()));
            break;
        }
    }
    let Some((id, row)) = found else {
        state.metrics.record_event("fetch", "not_found");
        return Err(ApiError::not_found(format!(
            "document '{raw_id}' not found in namespace '{namespace}'"
        )));
    };

    let attributes: Attributes = row
        .into_iter()
        .filter(|(k, _)| k != "id" && !k.starts_with('$') && (state.mirror_vectors || k != "vector"))
        .collect();
    let upserted_at = attributes
        .get("_hevlayer_upserted_at")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    if !cache_failed {
        // Create-only, and refused by a tombstone of an eviction at least as new as this copy:
        // a delete mirrored while this fetch was in flight is not undone.
        let (ns, key, attrs) = (namespace.clone(), id.clone(), attributes.clone());
        let backfill = state
            .cache_op("backfill_document", move |c| async move {
                c.backfill_document(&ns, &key, attrs, upserted_at).await
            })
            .await;
        if let Err(err) = backfill {
            tracing::warn!(namespace = %namespace, error = %err.message, "cache backfill failed");
            cache_failed = true;
        }
    }
    let label = if cache_failed { "miss-on-error" } else { "miss" };
    state
        .metrics
        .record_event("fetch", if cache_failed { "miss_on_error" } else { "miss" });
    Ok(with_cache_header(
        json_response(StatusCode::OK, &document_body(&id, attributes)).into_response(),
        label,
    ))
}
