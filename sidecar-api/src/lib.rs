//! The filter <-> sidecar callout messages, defined once for both sides (the filter re-exports
//! this crate as `hevlayer_filter::sidecar_api`; the sidecar depends on it alone).
//!
//! The filter builds request bodies by splicing byte slices it already holds (the stamped write and
//! the upstream response) so that it never parses or re-serialises a large write to talk to the
//! sidecar; the sidecar deserialises them with the types below.

use serde::{Deserialize, Serialize};

/// Mirror a successful write into the document cache.
pub const MIRROR_PATH: &str = "/internal/v1/mirror";
/// Several mirrors in one callout (`{"mirrors":[<MirrorRequest>...]}`): how a worker's root
/// context sends the mirrors that go after their responses, as many as are waiting.
pub const MIRRORS_PATH: &str = "/internal/v1/mirrors";
/// Purge a namespace's cached documents after `DELETE /v2/namespaces/{ns}` succeeded.
pub const PURGE_PATH: &str = "/internal/v1/purge";
/// Register watched namespaces and read their watermarks (the filter's root context, on a timer).
pub const WATERMARKS_PATH: &str = "/internal/v1/watermarks";
/// Evict what writes could not mirror (the filter's root context, until acknowledged).
pub const EVICT_PATH: &str = "/internal/v1/evict";
/// Evictions ahead with mirrors riding along (`{"fences":[...],"mirrors":[<MirrorRequest>...]}`,
/// see [`evict_mirrors_body`]): the sidecar answers 2xx only when every fence was evicted, with
/// each mirror's outcome (a [`MirrorBatchResponse`]). A worker's mirrors that wait for a batch
/// go this way when a group of evictions goes out anyway, which spares the batch its callout.
pub const EVICT_MIRRORS_PATH: &str = "/internal/v1/evict-mirrors";
/// Most bytes of mirror bodies that ride one eviction by default (a larger backlog waits for its
/// own batch, so that an eviction responses wait for never carries a large mirror).
pub const RIDE_BYTES: usize = 64 * 1024;
/// On a document-fetch callout: leave the cache alone (neither read nor backfill), because an
/// eviction for the namespace is pending. The sidecar answers `x-layer-cache: bypass`.
pub const BYPASS_HEADER: &str = "x-hevlayer-cache-bypass";
/// Header carrying the request id on every callout.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// W3C trace context of the client request, passed on on every callout it causes (the sidecar
/// records it on its request span; an invalid one is ignored there, never refused).
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// The W3C `tracestate` that goes with `traceparent` (only passed on with one).
pub const TRACESTATE_HEADER: &str = "tracestate";

/// The attribute the filter stamps on every row a write produces (epoch ms, SPEC §2.3); the
/// sidecar reads it from the rows it caches.
pub const STAMP_ATTRIBUTE: &str = "_hevlayer_upserted_at";

/// Headers of a Turbopuffer answer a client acts on: the sidecar relays them from Turbopuffer on
/// failed pipeline writes and document fetches, and the filter passes them on from the sidecar's
/// answer (SPEC §1). Hop-by-hop and server headers stay behind.
pub const RELAYED_UPSTREAM_HEADERS: [&str; 4] =
    ["retry-after", "retry-after-ms", "x-request-id", "x-should-retry"];

/// Whether a callout's answer is the sidecar's own: it always answers JSON, while Envoy answers a
/// call it could not deliver or that timed out itself, in plain text (503, 504).
pub fn is_sidecar_answer(headers: &[(String, String)]) -> bool {
    headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("content-type") && v.trim_start().starts_with("application/json")
    })
}

/// Body of `POST MIRROR_PATH`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorRequest {
    /// Turbopuffer namespace the write went to.
    pub namespace: String,
    /// The request's `_hevlayer_upserted_at` stamp (epoch ms).
    pub upserted_at: u64,
    /// The stamped write body exactly as it went upstream.
    pub write: serde_json::Value,
    /// The upstream 2xx response body, present for response-driven writes (conditional and filter
    /// writes); effects then apply only to the ids it lists.
    #[serde(default)]
    pub response: Option<serde_json::Value>,
}

/// Answer to `POST MIRRORS_PATH`: for each mirror of the batch, in order, whether it was
/// applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorBatchResponse {
    pub applied: Vec<bool>,
}

/// Builds a `POST MIRRORS_PATH` body from `MirrorRequest` bodies (see [`mirror_body`]).
pub fn mirror_batch_body<'a>(mirrors: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = b"{\"mirrors\":[".to_vec();
    for (i, mirror) in mirrors.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(mirror);
    }
    out.extend_from_slice(b"]}");
    out
}

/// Body of `POST PURGE_PATH`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    pub namespace: String,
}

/// Successful answer to a mirror or purge callout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MirrorResponse {
    /// Number of cached documents written, merged or evicted.
    pub applied: u64,
}

/// Body of `POST EVICT_PATH`: what the filter could not mirror.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvictRequest {
    pub fences: Vec<Fence>,
}

/// Body of `POST EVICT_MIRRORS_PATH`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvictMirrorsRequest {
    pub fences: Vec<Fence>,
    pub mirrors: Vec<MirrorRequest>,
}

/// One namespace's documents to evict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fence {
    pub namespace: String,
    /// The ids to evict; `None`: every cached document of the namespace (a purge).
    pub ids: Option<Vec<serde_json::Value>>,
    /// The newest stamp among the writes fenced: the evictions' tombstones refuse copies up to it.
    pub stamp: u64,
}

/// Body of `POST WATERMARKS_PATH`: the namespaces one Envoy worker has seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatermarkRegistration {
    pub namespaces: Vec<WatchedNamespace>,
}

/// One namespace to watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchedNamespace {
    pub namespace: String,
    /// A write to it succeeded since the last acknowledged registration.
    #[serde(default)]
    pub written: bool,
    /// The caller's `authorization` (passthrough mode), sent when a request used it since the
    /// last acknowledged registration: the sidecar polls the namespace's metadata with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<String>,
}

/// Answer to `POST WATERMARKS_PATH`: the watermark of each registered namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatermarkAnswer {
    pub watermarks: Vec<NamespaceWatermark>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceWatermark {
    pub namespace: String,
    /// Epoch ms: every write stamped at or before it is indexed. `None` until a poll saw the
    /// index up to date.
    pub watermark: Option<u64>,
    /// The index was updating at the last successful poll.
    pub updating: bool,
}

/// Builds a `MirrorRequest` body from the raw bytes the filter holds, without parsing them.
/// `write` must be a JSON object (the filter only mirrors bodies it validated) and `response`,
/// when given, the upstream's JSON body.
pub fn mirror_body(namespace: &str, upserted_at: u64, write: &[u8], response: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(write.len() + response.map_or(0, <[u8]>::len) + namespace.len() + 80);
    out.extend_from_slice(b"{\"namespace\":");
    push_json_string(&mut out, namespace);
    out.extend_from_slice(b",\"upserted_at\":");
    push_decimal(&mut out, upserted_at);
    out.extend_from_slice(b",\"write\":");
    out.extend_from_slice(write);
    out.extend_from_slice(b",\"response\":");
    match response {
        Some(body) => out.extend_from_slice(body),
        None => out.extend_from_slice(b"null"),
    }
    out.push(b'}');
    out
}

/// Appends one [`Fence`] object of an [`EvictRequest`] body, without parsing anything: `ids` are
/// JSON tokens (strings or unsigned integers, as the client spelled them, which the filter
/// validated); `None` evicts the whole namespace.
pub fn push_fence<'a>(
    body: &mut Vec<u8>,
    namespace: &str,
    ids: Option<impl IntoIterator<Item = &'a [u8]>>,
    stamp: u64,
) {
    body.extend_from_slice(b"{\"namespace\":");
    push_json_string(body, namespace);
    body.extend_from_slice(b",\"ids\":");
    match ids {
        None => body.extend_from_slice(b"null"),
        Some(ids) => {
            body.push(b'[');
            for (i, id) in ids.into_iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(id);
            }
            body.push(b']');
        }
    }
    body.extend_from_slice(b",\"stamp\":");
    push_decimal(body, stamp);
    body.push(b'}');
}

/// Appends `text` as a JSON string (the callout bodies are built on every write).
fn push_json_string(out: &mut Vec<u8>, text: &str) {
    let plain = text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\');
    if plain {
        out.reserve(text.len() + 2);
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        // Writing a &str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, text);
    }
}

/// The decimal digits of `n`, written at the end of `buf` (no `fmt`, no allocation: the filter
/// spells a stamp or a bound on every write and query).
pub fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut first = buf.len();
    for slot in buf.iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        first -= 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.get(first..).unwrap_or_default()
}

/// Appends `n` in decimal.
pub fn push_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(decimal(n, &mut [0; 20]));
}

/// An [`EvictRequest`] body with the one fence of a write stamped `stamp` that names `ids`.
pub fn evict_body<'a>(namespace: &str, ids: impl IntoIterator<Item = &'a [u8]>, stamp: u64) -> Vec<u8> {
    let mut body = Vec::with_capacity(96 + namespace.len());
    body.extend_from_slice(EVICT_HEAD);
    push_fence(&mut body, namespace, Some(ids), stamp);
    body.extend_from_slice(EVICT_TAIL);
    body
}

const EVICT_HEAD: &[u8] = b"{\"fences\":[";
const EVICT_TAIL: &[u8] = b"]}";

/// One [`EvictRequest`] body with the fences of several [`evict_body`] bodies: a worker's group
/// of writes' evictions, sent in one callout. `None` when a body is not an `evict_body` one (a
/// fence must never be dropped silently: the caller counts the group as failed).
pub fn evict_group_body<'a>(bodies: impl IntoIterator<Item = &'a [u8]>) -> Option<Vec<u8>> {
    let mut out = EVICT_HEAD.to_vec();
    for body in bodies {
        let fences = body.strip_prefix(EVICT_HEAD)?.strip_suffix(EVICT_TAIL)?;
        if out.len() > EVICT_HEAD.len() {
            out.push(b',');
        }
        out.extend_from_slice(fences);
    }
    out.extend_from_slice(EVICT_TAIL);
    Some(out)
}

/// An `EVICT_MIRRORS_PATH` body: an [`evict_body`] or [`evict_group_body`] body with
/// `MirrorRequest` bodies (see [`mirror_body`]) added. `None` when `evict` is not such a body.
pub fn evict_mirrors_body<'a>(evict: &[u8], mirrors: impl IntoIterator<Item = &'a [u8]>) -> Option<Vec<u8>> {
    let fences = evict.strip_prefix(EVICT_HEAD)?.strip_suffix(EVICT_TAIL)?;
    let mut out = Vec::with_capacity(evict.len() + 16);
    out.extend_from_slice(EVICT_HEAD);
    out.extend_from_slice(fences);
    out.extend_from_slice(b"],\"mirrors\":[");
    for (i, mirror) in mirrors.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(mirror);
    }
    out.extend_from_slice(EVICT_TAIL);
    Some(out)
}

/// Body of `POST PURGE_PATH`.
pub fn purge_body(namespace: &str) -> Vec<u8> {
    serde_json::to_vec(&PurgeRequest {
        namespace: namespace.to_owned(),
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_and_numbers_are_written_as_serde_json_writes_them() {
        for text in [
            "",
            "ns",
            "a\"b",
            "back\\slash",
            "tab\there",
            "\u{1}",
            "é ünï €",
            "\u{7f}/x",
        ] {
            let mut out = b"[".to_vec();
            push_json_string(&mut out, text);
            assert_eq!(
                out,
                format!("[{}", serde_json::to_string(text).unwrap()).into_bytes(),
                "{text:?}"
            );
        }
        for n in [0, 7, 10, 99, 1_795_000_000_000, u64::MAX] {
            let mut out = b"x".to_vec();
            push_decimal(&mut out, n);
            assert_eq!(out, format!("x{n}").into_bytes());
            assert_eq!(decimal(n, &mut [0; 20]), n.to_string().as_bytes());
        }
    }

    #[test]
    fn mirror_batches_carry_mirror_requests_in_order() {
        let one = mirror_body("a", 1, br#"{"deletes":[1]}"#, None);
        let two = mirror_body("b", 2, br#"{"deletes":[2]}"#, Some(br#"{"ids":[2]}"#));
        let batch = mirror_batch_body([one.as_slice(), two.as_slice()]);
        #[derive(Deserialize)]
        struct Batch {
            mirrors: Vec<MirrorRequest>,
        }
        let parsed: Batch = serde_json::from_slice(&batch).unwrap();
        let names: Vec<(&str, u64)> = parsed
            .mirrors
            .iter()
            .map(|m| (m.namespace.as_str(), m.upserted_at))
            .collect();
        assert_eq!(names, vec![("a", 1), ("b", 2)]);
        assert_eq!(mirror_batch_body(std::iter::empty()), br#"{"mirrors":[]}"#);
    }

    #[test]
    fn grouped_evict_bodies_keep_every_fence() {
        let a = evict_body("a", [b"1".as_slice(), b"\"x\""], 5);
        let b = evict_body("b \"q\"", [b"2".as_slice()], 6);
        let group = evict_group_body([a.as_slice(), b.as_slice()]).unwrap();
        let parsed: EvictRequest = serde_json::from_slice(&group).unwrap();
        let one_by_one: Vec<Fence> = [a, b]
            .iter()
            .flat_map(|body| serde_json::from_slice::<EvictRequest>(body).unwrap().fences)
            .collect();
        assert_eq!(parsed.fences, one_by_one);
        assert_eq!(parsed.fences.len(), 2);
        assert_eq!(evict_group_body([b"{}".as_slice()]), None);
        assert_eq!(
            evict_group_body(Vec::<&[u8]>::new()).as_deref(),
            Some(b"{\"fences\":[]}".as_slice())
        );
    }

    #[test]
    fn mirrors_ride_an_eviction_body_whole() {
        let a = evict_body("a", [b"1".as_slice()], 5);
        let b = evict_body("b", [b"2".as_slice()], 6);
        let group = evict_group_body([a.as_slice(), b.as_slice()]).unwrap();
        let m1 = mirror_body("m", 3, br#"{"upsert_rows":[{"id":1}]}"#, None);
        let m2 = mirror_body("n \"q\"", 4, br#"{"deletes":[2]}"#, Some(br#"{"ok":true}"#));
        let body = evict_mirrors_body(&group, [m1.as_slice(), m2.as_slice()]).unwrap();
        let parsed: EvictMirrorsRequest = serde_json::from_slice(&body).unwrap();
        let alone: EvictRequest = serde_json::from_slice(&group).unwrap();
        assert_eq!(parsed.fences, alone.fences);
        let mirrors: Vec<MirrorRequest> = [m1, m2]
            .iter()
            .map(|m| serde_json::from_slice(m).unwrap())
            .collect();
        assert_eq!(parsed.mirrors, mirrors);
        let none = evict_mirrors_body(&a, std::iter::empty()).unwrap();
        let parsed: EvictMirrorsRequest = serde_json::from_slice(&none).unwrap();
        assert!(parsed.mirrors.is_empty());
        assert_eq!(evict_mirrors_body(b"{}", std::iter::empty()), None);
    }

    #[test]
    fn evict_bodies_parse_as_evict_requests() {
        let ids: [&[u8]; 3] = [b"7", br#""a\"b""#, br#""\u0062""#];
        let body = evict_body("ns \"q\"", ids, 42);
        let parsed: EvictRequest = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            parsed.fences,
            vec![Fence {
                namespace: "ns \"q\"".to_owned(),
                ids: Some(vec![
                    serde_json::json!(7),
                    serde_json::json!("a\"b"),
                    serde_json::json!("b")
                ]),
                stamp: 42,
            }]
        );
        let mut whole = Vec::new();
        push_fence(&mut whole, "n", None::<[&[u8]; 0]>, 0);
        let fence: Fence = serde_json::from_slice(&whole).unwrap();
        assert_eq!(fence.ids, None);
    }

    #[test]
    fn mirror_body_parses_into_the_sidecar_type() {
        let body = mirror_body(
            "ns \"q\"",
            42,
            br#"{"upsert_rows":[{"id":1}]}"#,
            Some(br#"{"upserted_ids":[1]}"#),
        );
        let parsed: MirrorRequest = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed.namespace, "ns \"q\"");
        assert_eq!(parsed.upserted_at, 42);
        assert_eq!(parsed.write["upsert_rows"][0]["id"], 1);
        assert_eq!(parsed.response.unwrap()["upserted_ids"][0], 1);
        let no_resp: MirrorRequest = serde_json::from_slice(&mirror_body("n", 1, b"{}", None)).unwrap();
        assert!(no_resp.response.is_none());
    }

    #[test]
    fn purge_body_round_trips() {
        let parsed: PurgeRequest = serde_json::from_slice(&purge_body("a/b")).unwrap();
        assert_eq!(parsed.namespace, "a/b");
    }
}
