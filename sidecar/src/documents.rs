//! `GET /v2/namespaces/{ns}/documents/{id}`: the cache first, else Turbopuffer through the gateway
//! (a query filtered on the id), then backfill.
//!
//! Two things keep a cached copy from being served: a copy older than the max age (it is fetched
//! again and replaced), and the filter's bypass header, which it sends while an eviction for the
//! namespace is pending (a write's mirror failed): then the cache is neither read nor written.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hevlayer_sidecar_api::{BYPASS_HEADER, STAMP_ATTRIBUTE};
use serde_json::{json, Value};

use crate::cache::{Attributes, CachedDoc, DocId};
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

/// Why the cache did not answer.
enum Lookup {
    /// Nothing cached under any id form.
    Miss,
    /// A copy older than the max age: fetched again and replaced.
    Expired,
    /// The cache failed: served from Turbopuffer, not written back.
    Failed,
    /// The filter asked for the cache to be left alone.
    Bypassed,
}

pub async fn fetch(
    State(state): State<SharedState>,
    PathParams((namespace, raw_id)): PathParams<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_id("namespace", &namespace)?;
    check_id("document id", &raw_id)?;
    let ids = candidates(&raw_id);
    let lookup = if headers.contains_key(BYPASS_HEADER) {
        Lookup::Bypassed
    } else {
        match cached(&state, &namespace, &ids).await {
            Ok((id, doc)) => {
                state.metrics.record_event("fetch", "hit");
                return Ok(with_cache_header(
                    json_response(StatusCode::OK, &document_body(&id, doc.attributes)),
                    "hit",
                ));
            }
            Err(lookup) => lookup,
        }
    };
    let (id, attributes) = match from_turbopuffer(&state, &namespace, &ids, &headers).await? {
        Upstream::Found(id, attributes) => (id, attributes),
        Upstream::Relay(response) => return Ok(response),
        Upstream::NotFound => {
            state.metrics.record_event("fetch", "not_found");
            return Err(ApiError::not_found(format!(
                "document '{raw_id}' not found in namespace '{namespace}'"
            )));
        }
    };
    let (label, event) = write_back(&state, &namespace, &id, &attributes, lookup).await;
    state.metrics.record_event("fetch", event);
    Ok(with_cache_header(
        json_response(StatusCode::OK, &document_body(&id, attributes)).into_response(),
        label,
    ))
}

/// Looks the document up under each id form; a copy older than the max age does not count.
async fn cached(state: &SharedState, namespace: &str, ids: &[DocId]) -> Result<(DocId, CachedDoc), Lookup> {
    let now = crate::cache::now_ms();
    let mut expired = false;
    for id in ids {
        let (ns, key) = (namespace.to_owned(), id.clone());
        match state
            .documents_op(
                "get_document",
                move |c| async move { c.get_document(&ns, &key).await },
            )
            .await
        {
            Ok(Some(doc)) if now.saturating_sub(doc.cached_ms) <= state.doc_max_age_ms => {
                return Ok((id.clone(), doc));
            }
            Ok(Some(_)) => expired = true,
            Ok(None) => {}
            Err(err) => {
                tracing::warn!(namespace = %namespace, error = %err.message, "cache read failed on fetch");
                return Err(Lookup::Failed);
            }
        }
    }
    Err(if expired { Lookup::Expired } else { Lookup::Miss })
}

/// What Turbopuffer answered for the document.
enum Upstream {
    Found(DocId, Attributes),
    NotFound,
    /// An error to relay verbatim.
    Relay(Response),
}

/// Queries Turbopuffer (through the gateway) for the document under each id form in turn: a
/// numeric filter on a string-id namespace (or the reverse) is a 400, and then the other form is
/// tried.
async fn from_turbopuffer(
    state: &SharedState,
    namespace: &str,
    ids: &[DocId],
    headers: &HeaderMap,
) -> Result<Upstream, ApiError> {
    let authorization = state.gateway.authorization(headers.get("authorization"))?;
    let path = format!("/v2/namespaces/{}/query", encode_segment(namespace));
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
            if !last && upstream.status == StatusCode::BAD_REQUEST {
                continue;
            }
            // The other form matched the namespace's id type and found nothing: not found.
            if answered && upstream.status == StatusCode::BAD_REQUEST {
                break;
            }
            return Ok(Upstream::Relay(upstream.relay()));
        }
        answered = true;
        if let Some((found, row)) = first_row(&upstream.body, id)? {
            return Ok(Upstream::Found(found, attributes_of(state, row)));
        }
    }
    Ok(Upstream::NotFound)
}

/// A row of a query answer: its id and its members.
type Row = (DocId, serde_json::Map<String, Value>);

/// The first row of a query answer, with its id (the queried one if the row has none).
fn first_row(body: &[u8], queried: &DocId) -> Result<Option<Row>, ApiError> {
    let parsed: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::upstream(format!("Turbopuffer returned an unreadable query response: {e}")))?;
    let Some(row) = parsed
        .get("rows")
        .and_then(Value::as_array)
        .and_then(|rows| rows.first())
        .and_then(Value::as_object)
    else {
        return Ok(None);
    };
    let id = row
        .get("id")
        .and_then(DocId::from_json)
        .unwrap_or_else(|| queried.clone());
    Ok(Some((id, row.clone())))
}

/// A row's attributes as the cache keeps them: no id, no `$` fields, vectors only if mirrored.
fn attributes_of(state: &SharedState, row: serde_json::Map<String, Value>) -> Attributes {
    row.into_iter()
        .filter(|(k, _)| k != "id" && !k.starts_with('$') && (state.mirror_vectors || k != "vector"))
        .collect()
}

/// Writes the fetched copy back when the lookup allows it; returns the `x-layer-cache` label and
/// the metric event.
/// A miss is backfilled (create-only, and refused by a tombstone of an eviction at least as new
/// as this copy: a delete mirrored while this fetch was in flight is not undone); an expired copy
/// is replaced (unless the cache meanwhile holds a newer stamp).
async fn write_back(
    state: &SharedState,
    namespace: &str,
    id: &DocId,
    attributes: &Attributes,
    lookup: Lookup,
) -> (&'static str, &'static str) {
    let upserted_at = attributes
        .get(STAMP_ATTRIBUTE)
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let (ns, key, attrs) = (namespace.to_owned(), id.clone(), attributes.clone());
    let expired = matches!(lookup, Lookup::Expired);
    let result = match lookup {
        Lookup::Bypassed => return ("bypass", "bypass"),
        Lookup::Failed => return ("miss-on-error", "miss_on_error"),
        Lookup::Miss => {
            state
                .documents_op("backfill_document", move |c| async move {
                    c.backfill_document(&ns, &key, attrs, upserted_at).await
                })
                .await
        }
        Lookup::Expired => {
            state
                .documents_op("refresh_document", move |c| async move {
                    c.upsert_document(&ns, &key, attrs, upserted_at).await
                })
                .await
        }
    };
    match result {
        Ok(_) if expired => ("miss", "expired"),
        Ok(_) => ("miss", "miss"),
        Err(err) => {
            tracing::warn!(namespace = %namespace, error = %err.message, "cache backfill failed");
            ("miss-on-error", "miss_on_error")
        }
    }
}
