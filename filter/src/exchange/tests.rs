#![allow(clippy::unwrap_used, clippy::panic)]
use super::*;
use crate::metrics::Counter;

const NOW: u64 = 1_732_400_000_000;

/// Starts an exchange under `config`: what the glue does when Envoy creates a stream (with the
/// VM's configuration) and reports its request headers.
trait Begin {
    fn headers(&mut self, config: &Config, head: &RequestHead<'_>) -> (HeaderEdits, Step);
}

impl Begin for Exchange {
    fn headers(&mut self, config: &Config, head: &RequestHead<'_>) -> (HeaderEdits, Step) {
        *self = Exchange::new(Rc::new(config.clone()));
        self.on_request_headers(head)
    }
}

/// An exchange driven the way Envoy drives it: body chunks accumulate in Envoy's buffer while
/// the filter pauses, and the exchange reads from that buffer.
struct Driver {
    ex: Exchange,
    wire: Vec<u8>,
}

impl Driver {
    fn new() -> Self {
        Driver {
            ex: Exchange::new(Rc::default()),
            wire: Vec::new(),
        }
    }

    fn feed(&mut self, chunk: &[u8], end: bool, now: u64) -> Step {
        self.wire.extend_from_slice(chunk);
        let wire = &self.wire;
        let mut read = |start: usize, len: usize| Some(wire[start..start + len].to_vec());
        self.ex.on_request_body(wire.len(), end, now, &mut read)
    }

    fn trailers(&mut self, now: u64) -> Step {
        let wire = &self.wire;
        let mut read = |start: usize, len: usize| Some(wire[start..start + len].to_vec());
        self.ex.on_request_trailers(wire.len(), now, &mut read)
    }
}

impl std::ops::Deref for Driver {
    type Target = Exchange;
    fn deref(&self) -> &Exchange {
        &self.ex
    }
}

impl std::ops::DerefMut for Driver {
    fn deref_mut(&mut self) -> &mut Exchange {
        &mut self.ex
    }
}

fn head<'a>(method: &'a str, path: &'a str) -> RequestHead<'a> {
    RequestHead {
        method,
        path,
        authorization: Some("Bearer k"),
        request_id: "rid",
        ..RequestHead::default()
    }
}

/// The configuration where every write's response waits for its mirror (no eviction ahead).
fn waits_for_mirror() -> Config {
    Config {
        evict_ahead_max_ids: 0,
        ..Config::default()
    }
}

fn json(reply: &LocalReply) -> serde_json::Value {
    serde_json::from_slice(&reply.body).unwrap()
}

fn start_write(config: &Config) -> Driver {
    let mut ex = Driver::new();
    let (edits, step) = ex.headers(config, &head("POST", "/v2/namespaces/ns"));
    assert_eq!(step, Step::Pause);
    assert!(
        !edits.remove.contains(&"content-length"),
        "the glue sets it if the body changes"
    );
    ex
}

fn forwarded(step: Step) -> Vec<u8> {
    match step {
        Step::Forward(Some(b)) | Step::ForwardWith(Some(b), _) => b,
        other => panic!("expected a forwarded body, got {other:?}"),
    }
}

#[test]
fn write_is_buffered_validated_and_stamped_across_chunks() {
    let config = Config::default();
    let body = br#"{"upsert_rows":[{"id":1,"v":[1,2]}]}"#;
    let mut ex = start_write(&config);
    for chunk in body[..body.len() - 3].chunks(5) {
        assert_eq!(ex.feed(chunk, false, NOW), Step::Pause);
    }
    let out = forwarded(ex.feed(&body[body.len() - 3..], true, NOW));
    assert_eq!(
        out,
        br#"{"upsert_rows":[{"id":1,"v":[1,2],"_hevlayer_upserted_at":1732400000000}]}"#
    );
    let counters = ex.take_counters();
    assert!(counters.contains(&Counter::WritesAccepted));
    assert!(counters.contains(&Counter::RowsStamped(1)));
}

#[test]
fn trailers_finish_the_body() {
    let config = waits_for_mirror();
    let mut ex = start_write(&config);
    assert_eq!(ex.feed(br#"{"deletes":[1]}"#, false, NOW), Step::Pause);
    // Unchanged and not decoded: the buffered body goes on as it is.
    assert_eq!(ex.trailers(NOW), Step::Forward(None));
}

#[test]
fn invalid_writes_get_a_local_422() {
    let config = Config::default();
    let mut ex = start_write(&config);
    match ex.feed(b"{}", true, NOW) {
        Step::Reply(r) => {
            assert_eq!(r.status, 422);
            assert_eq!(
                json(&r)["message"],
                "Request must include a native Turbopuffer write operation"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        ex.take_counters(),
        vec![Counter::WritesRejected(WriteReason::NoOperation)]
    );
    assert_eq!(ex.trailers(NOW), Step::Pause);
    // After the reply nothing else happens, whatever Envoy calls next.
    assert_eq!(
        ex.on_response_headers(200, Some("via_upstream"), false, NOW).1,
        Step::Continue
    );
}

#[test]
fn a_write_without_a_body_is_rejected() {
    let mut ex = Driver::new();
    let mut h = head("POST", "/v2/namespaces/ns");
    h.end_of_stream = true;
    match ex.headers(&Config::default(), &h).1 {
        Step::Reply(r) => assert_eq!(r.status, 422),
        other => panic!("{other:?}"),
    }
}

#[test]
fn oversize_bodies_get_413_by_header_and_by_size() {
    let config = Config {
        max_body_bytes: 10,
        ..Config::default()
    };
    let mut ex = Driver::new();
    let mut h = head("POST", "/v2/namespaces/ns");
    h.content_length = Some("11");
    match ex.headers(&config, &h).1 {
        Step::Reply(r) => assert_eq!(
            (r.status, json(&r)["error"].as_str()),
            (413, Some("payload_too_large"))
        ),
        other => panic!("{other:?}"),
    }
    let mut ex = start_write(&config);
    assert_eq!(ex.feed(b"{\"deletes\"", false, NOW), Step::Pause);
    match ex.feed(b":[1]}", false, NOW) {
        Step::Reply(r) => assert_eq!(r.status, 413),
        other => panic!("{other:?}"),
    }
    assert_eq!(ex.take_counters(), vec![Counter::PayloadTooLarge]);
}

/// Write responses are read (affected ids): a client's `accept-encoding` is removed so they come
/// uncompressed; none sent, nothing to remove (each removal is a hostcall). Queries keep it.
#[test]
fn writes_drop_accept_encoding_only_when_sent() {
    let mut h = head("POST", "/v2/namespaces/ns");
    let (edits, _) = Driver::new().headers(&Config::default(), &h);
    assert!(edits.remove.is_empty(), "{edits:?}");
    h.accept_encoding = Some("gzip, deflate");
    let (edits, _) = Driver::new().headers(&Config::default(), &h);
    assert_eq!(edits.remove, ["accept-encoding"]);
    let mut q = head("POST", "/v2/namespaces/ns/query");
    q.accept_encoding = Some("gzip");
    let (edits, _) = Driver::new().headers(&Config::default(), &q);
    assert!(edits.remove.is_empty(), "{edits:?}");
}

#[test]
fn gzip_bodies_are_decoded_and_unknown_encodings_refused() {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(br#"{"deletes":["a"]}"#).unwrap();
    let gz = enc.finish().unwrap();
    let mut ex = Driver::new();
    let mut h = head("POST", "/v2/namespaces/ns");
    h.content_encoding = Some("gzip");
    let (edits, _) = ex.headers(&Config::default(), &h);
    assert!(edits.remove.contains(&"content-encoding"));
    assert_eq!(forwarded(ex.feed(&gz, true, NOW)), br#"{"deletes":["a"]}"#);

    let mut ex = Driver::new();
    h.content_encoding = Some("br");
    match ex.headers(&Config::default(), &h).1 {
        Step::Reply(r) => assert_eq!(r.status, 422),
        other => panic!("{other:?}"),
    }
}

#[test]
fn passthrough_routes_are_untouched() {
    for (m, p) in [
        ("POST", "/v2/namespaces/ns/explain_query"),
        ("POST", "/v1/namespaces/ns/query"),
        ("GET", "/v1/namespaces"),
        ("DELETE", "/v2/namespaces/ns"),
        ("GET", "/healthz"),
        ("POST", "/v3/namespaces/x"),
    ] {
        let mut ex = Driver::new();
        let (edits, step) = ex.headers(&Config::default(), &head(m, p));
        assert_eq!((edits, step), (HeaderEdits::default(), Step::Continue), "{m} {p}");
    }
}

fn keys_config(scope: crate::route::Scope) -> Config {
    use sha2::Digest;
    Config {
        auth_mode: AuthMode::Keys,
        keys: vec![crate::config::GatewayKey {
            name: "k".into(),
            digest: sha2::Sha256::digest(b"k").into(),
            scope,
        }],
        upstream_api_key: Some("up".into()),
        ..Config::default()
    }
}

#[test]
fn every_path_is_authenticated_and_gets_the_upstream_key_in_keys_mode() {
    // Envoy routes every path to Turbopuffer: outside /v1 and /v2 too, a caller's key must not
    // reach it.
    let config = keys_config(crate::route::Scope::Admin);
    for (m, p) in [
        ("GET", "/healthz"),
        ("GET", "/"),
        ("POST", "/v3/namespaces/x"),
        ("HEAD", "/v2/namespaces/x"),
        ("OPTIONS", "*"),
    ] {
        let mut ex = Driver::new();
        let (edits, step) = ex.headers(&config, &head(m, p));
        assert_eq!(step, Step::Continue, "{m} {p}");
        assert_eq!(
            edits.set,
            vec![("authorization", "Bearer up".to_owned())],
            "{m} {p}"
        );

        for config in [Config::default(), config.clone()] {
            let mut ex = Driver::new();
            let mut h = head(m, p);
            h.authorization = None;
            match ex.headers(&config, &h).1 {
                Step::Reply(r) => assert_eq!(json(&r)["error"], "unauthorized", "{m} {p}"),
                other => panic!("{m} {p}: {other:?}"),
            }
        }
    }
    // Scopes hold there too: a read key may GET anything but POST nothing.
    let read = keys_config(crate::route::Scope::Read);
    assert_eq!(
        Driver::new().headers(&read, &head("GET", "/healthz")).1,
        Step::Continue
    );
    match Driver::new().headers(&read, &head("POST", "/v3/x")).1 {
        Step::Reply(r) => assert_eq!(json(&r)["required_scope"], "write"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn path_variants_of_a_write_are_validated_and_stamped() {
    for path in [
        "/v2/namespaces/ns/",
        "//v2/namespaces/ns",
        "//v2//namespaces/ns/",
        "/v2/namespaces/./ns",
        "/v2/namespaces/other/../ns",
    ] {
        let mut ex = Driver::new();
        assert_eq!(
            ex.headers(&waits_for_mirror(), &head("POST", path)).1,
            Step::Pause,
            "{path}"
        );
        match ex.feed(b"{}", true, NOW) {
            Step::Reply(r) => assert_eq!(r.status, 422, "{path}"),
            other => panic!("{path}: {other:?}"),
        }

        let mut ex = Driver::new();
        ex.headers(&waits_for_mirror(), &head("POST", path));
        let out = forwarded(ex.feed(br#"{"upsert_rows":[{"id":1}]}"#, true, NOW));
        assert_eq!(
            out, br#"{"upsert_rows":[{"id":1,"_hevlayer_upserted_at":1732400000000}]}"#,
            "{path}"
        );
        let (_, Step::Dispatch(call)) = ex.on_response_headers(200, Some("via_upstream"), false, NOW) else {
            panic!("{path}: no mirror")
        };
        let msg: sidecar_api::MirrorRequest = serde_json::from_slice(&call.body).unwrap();
        assert_eq!(msg.namespace, "ns", "{path}");
    }
}

#[test]
fn the_sidecar_is_asked_for_the_canonical_path() {
    let mut ex = Driver::new();
    let mut h = head("GET", "//v2/pipelines/p//status/?verbose=1");
    h.end_of_stream = true;
    let (_, Step::Dispatch(call)) = ex.headers(&Config::default(), &h) else {
        panic!()
    };
    assert!(call
        .headers
        .contains(&(":path".to_owned(), "/v2/pipelines/p/status?verbose=1".to_owned())));
}

#[test]
fn missing_bearer_is_401() {
    let mut ex = Driver::new();
    let mut h = head("POST", "/v2/namespaces/ns/query");
    h.authorization = None;
    match ex.headers(&Config::default(), &h).1 {
        Step::Reply(r) => assert_eq!(json(&r)["error"], "unauthorized"),
        other => panic!("{other:?}"),
    }
    assert_eq!(ex.take_counters(), vec![Counter::Unauthorized]);
}

const WRITE_TIMEOUT: &str = "Turbopuffer did not answer in time; the write may or may not have applied";
const READ_TIMEOUT: &str = "Turbopuffer did not answer in time";

#[test]
fn router_replies_become_502_and_504() {
    for (details, status, kind, message) in [
        (
            "upstream_reset_before_response_started{connection_failure}",
            502,
            "upstream_error",
            "could not reach Turbopuffer: connection failure",
        ),
        ("upstream_response_timeout", 504, "gateway_timeout", WRITE_TIMEOUT),
    ] {
        let mut ex = start_write(&Config::default());
        forwarded(ex.feed(br#"{"upsert_rows":[{"id":1}]}"#, true, NOW));
        let (edits, step) = ex.on_response_headers(503, Some(details), false, NOW);
        assert_eq!(step, Step::Continue);
        assert!(edits.set.contains(&(":status", status.to_string())));
        assert!(ex.wants_response_body());
        let (body, step) = ex.on_response_complete(Some(b"upstream connect error"), NOW);
        assert_eq!(step, Step::Continue);
        let v: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
        assert_eq!(v, serde_json::json!({"error": kind, "message": message}));
    }
}

/// The 504 body a route gets when the router's timeout fires on it.
fn timeout_message(method: &str, path: &str) -> String {
    let mut ex = Driver::new();
    let (_, step) = ex.headers(&waits_for_mirror(), &head(method, path));
    if step == Step::Pause {
        assert!(matches!(
            ex.feed(br#"{"deletes":[1]}"#, true, NOW),
            Step::Forward(_)
        ));
    }
    let (edits, _) = ex.on_response_headers(504, Some("response_timeout"), false, NOW);
    assert!(
        edits.set.contains(&(":status", "504".to_owned())),
        "{method} {path}"
    );
    let (body, _) = ex.on_response_complete(Some(b"upstream request timeout"), NOW);
    let v: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
    assert_eq!(v["error"], "gateway_timeout");
    v["message"].as_str().unwrap().to_owned()
}

#[test]
fn a_timeout_warns_about_an_applied_write_only_on_mutations() {
    for (method, path, message) in [
        ("POST", "/v2/namespaces/ns", WRITE_TIMEOUT),
        ("DELETE", "/v2/namespaces/ns", WRITE_TIMEOUT),
        ("POST", "/v2/namespaces/ns/hint_cache_warm", WRITE_TIMEOUT),
        ("PATCH", "/v1/namespaces/ns/schema", WRITE_TIMEOUT),
        ("POST", "/v2/namespaces/ns/query", READ_TIMEOUT),
        ("POST", "/v2/namespaces/ns/multi_query", READ_TIMEOUT),
        ("POST", "/v2/namespaces/ns/explain_query", READ_TIMEOUT),
        ("GET", "/v1/namespaces/ns/metadata", READ_TIMEOUT),
        ("HEAD", "/v1/namespaces", READ_TIMEOUT),
    ] {
        assert_eq!(timeout_message(method, path), message, "{method} {path}");
    }
}

#[test]
fn a_bodiless_router_reply_becomes_a_local_json_reply_except_for_head() {
    for (method, path) in [("GET", "/v1/namespaces"), ("POST", "/v2/namespaces/ns/query")] {
        let mut ex = Driver::new();
        ex.headers(&Config::default(), &head(method, path));
        match ex.on_response_headers(503, Some("cluster_not_found"), true, NOW) {
            (edits, Step::Reply(r)) => {
                assert_eq!(edits, HeaderEdits::default());
                assert_eq!(
                    (r.status, json(&r)),
                    (
                        502,
                        serde_json::json!({"error": "upstream_error", "message": "could not reach Turbopuffer: no upstream cluster configured"})
                    )
                );
            }
            other => panic!("{method} {path}: {other:?}"),
        }
        assert_eq!(ex.take_counters(), vec![Counter::UpstreamError]);
    }
    // No body may answer a HEAD request: the status and content type are rewritten alone.
    let mut ex = Driver::new();
    ex.headers(&Config::default(), &head("HEAD", "/v1/namespaces"));
    let (edits, step) = ex.on_response_headers(504, Some("response_timeout"), true, NOW);
    assert_eq!(step, Step::Continue);
    assert!(edits.set.contains(&(":status", "504".to_owned())));
    assert!(edits
        .set
        .contains(&("content-type", "application/json".to_owned())));
    assert!(edits.remove.contains(&"content-length"));
    assert!(!ex.wants_response_body() && !ex.holds_response());
}

#[test]
fn upstream_errors_pass_verbatim_and_are_not_mirrored() {
    let mut ex = start_write(&Config::default());
    forwarded(ex.feed(br#"{"upsert_rows":[{"id":1}]}"#, true, NOW));
    let (edits, step) = ex.on_response_headers(429, Some("via_upstream"), false, NOW);
    assert_eq!((edits, step), (HeaderEdits::default(), Step::Continue));
    assert!(!ex.wants_response_body());
}

#[test]
fn successful_writes_are_mirrored_before_the_response_goes_on() {
    let mut ex = start_write(&waits_for_mirror());
    forwarded(ex.feed(br#"{"upsert_rows":[{"id":1}]}"#, true, NOW));
    let (_, step) = ex.on_response_headers(200, Some("via_upstream"), false, NOW + 1);
    let Step::Dispatch(call) = step else {
        panic!("{step:?}")
    };
    assert_eq!(call.purpose, Purpose::Mirror);
    // Body chunks arriving meanwhile are held with the headers.
    assert!(ex.holds_response() && !ex.wants_response_body());
    assert_eq!(call.timeout_ms, 200);
    assert!(call
        .headers
        .contains(&(":path".to_owned(), "/internal/v1/mirror".to_owned())));
    let msg: sidecar_api::MirrorRequest = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(msg.namespace, "ns");
    assert_eq!(msg.upserted_at, NOW);
    assert_eq!(msg.write["upsert_rows"][0]["_hevlayer_upserted_at"], NOW);
    assert!(msg.response.is_none());
    // The answer resumes the response, held since the mirror went out.
    assert_eq!(
        ex.on_callout_answer(Some(200), &json_type(), b"{}".to_vec(), NOW + 5),
        Step::Resume(Half::Response)
    );
    assert!(ex.take_counters().contains(&Counter::MirrorOk));
    assert!(!ex.holds_response());
    // A late or repeated answer is ignored.
    assert_eq!(
        ex.on_callout_answer(Some(200), &[], Vec::new(), NOW + 6),
        Step::Continue
    );
}

/// The headers of a JSON answer, as the sidecar sends.
fn json_type() -> Vec<(String, String)> {
    vec![("content-type".to_owned(), "application/json".to_owned())]
}

#[test]
fn mirror_failures_and_timeouts_never_change_the_response() {
    let plain = vec![("content-type".to_owned(), "text/plain".to_owned())];
    // (status, headers, ms after dispatch, what is counted)
    for (status, headers, elapsed, counter) in [
        (Some(500), json_type(), 3, Counter::MirrorFailed),
        // A reset (no headers) before the timeout.
        (None, Vec::new(), 3, Counter::MirrorFailed),
        (None, Vec::new(), 250, Counter::MirrorTimeout),
        // Envoy's own answers: the sidecar unreachable, and the callout timing out.
        (Some(503), plain.clone(), 3, Counter::MirrorFailed),
        (Some(504), plain.clone(), 200, Counter::MirrorTimeout),
        // Envoy's timer can fire a millisecond before the host clock says the timeout is up.
        (Some(504), plain.clone(), 199, Counter::MirrorTimeout),
        // The sidecar's own 504 is an answer, not a timeout.
        (Some(504), json_type(), 3, Counter::MirrorFailed),
        // A 2xx that is not the sidecar's JSON answer is not a mirror that happened.
        (Some(200), plain.clone(), 3, Counter::MirrorFailed),
    ] {
        let mut ex = start_write(&waits_for_mirror());
        assert!(matches!(
            ex.feed(br#"{"deletes":[1]}"#, true, NOW),
            Step::Forward(None)
        ));
        let (_, step) = ex.on_response_headers(200, Some("via_upstream"), false, NOW);
        assert!(matches!(step, Step::Dispatch(_)));
        assert_eq!(
            ex.on_callout_answer(status, &headers, Vec::new(), NOW + elapsed),
            Step::Resume(Half::Response)
        );
        assert!(ex.take_counters().contains(&counter), "{status:?} {elapsed}");
    }
    let mut ex = start_write(&waits_for_mirror());
    assert!(matches!(
        ex.feed(br#"{"deletes":[1]}"#, true, NOW),
        Step::Forward(None)
    ));
    ex.on_response_headers(200, Some("via_upstream"), false, NOW);
    assert_eq!(ex.on_callout_dispatch_failed(), Step::Continue);
}

#[test]
fn response_driven_writes_strip_ids_the_client_did_not_ask_for() {
    let mut ex = start_write(&Config::default());
    let out = forwarded(ex.feed(br#"{"delete_by_filter":["a","Eq",1]}"#, true, NOW));
    assert!(out.starts_with(br#"{"return_affected_ids":true,"#));
    let (edits, step) = ex.on_response_headers(200, Some("via_upstream"), false, NOW);
    assert_eq!(step, Step::Continue);
    assert!(edits.remove.contains(&"content-length"));
    assert!(ex.wants_response_body());
    let upstream = br#"{"status":"OK","rows_affected":1,"deleted_ids":[4],"billing":{}}"#;
    let (body, step) = ex.on_response_complete(Some(upstream), NOW);
    assert_eq!(
        body.unwrap(),
        br#"{"status":"OK","rows_affected":1,"billing":{}}"#
    );
    let Step::Dispatch(call) = step else { panic!() };
    let msg: sidecar_api::MirrorRequest = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(msg.response.unwrap()["deleted_ids"][0], 4);
}

#[test]
fn response_driven_writes_keep_ids_the_client_asked_for() {
    let mut ex = start_write(&Config::default());
    let body = br#"{"delete_by_filter":["a","Eq",1],"return_affected_ids":true}"#;
    assert_eq!(ex.feed(body, true, NOW), Step::Forward(None));
    let (edits, _) = ex.on_response_headers(200, Some("via_upstream"), false, NOW);
    assert!(edits.remove.is_empty());
    let (body, step) = ex.on_response_complete(Some(br#"{"deleted_ids":[4]}"#), NOW);
    assert!(body.is_none());
    assert!(matches!(step, Step::Dispatch(_)));
}

#[test]
fn namespace_delete_purges_after_success() {
    let mut ex = Driver::new();
    assert_eq!(
        ex.headers(&Config::default(), &head("DELETE", "/v2/namespaces/n%201"))
            .1,
        Step::Continue
    );
    let (_, step) = ex.on_response_headers(200, Some("via_upstream"), false, NOW);
    let Step::Dispatch(call) = step else { panic!() };
    assert_eq!(call.purpose, Purpose::Purge);
    let msg: sidecar_api::PurgeRequest = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(msg.namespace, "n 1");
    ex.on_callout_answer(Some(200), &json_type(), b"{}".to_vec(), NOW);
    assert!(ex.take_counters().contains(&Counter::PurgeOk));
}

#[test]
fn pipeline_routes_go_to_the_sidecar() {
    let mut ex = Driver::new();
    let mut h = head("PUT", "/v2/pipelines/p/documents/d");
    h.content_type = Some("application/json");
    assert_eq!(ex.headers(&Config::default(), &h).1, Step::Pause);
    let Step::Dispatch(call) = ex.feed(br#"{"chunks":[]}"#, true, NOW) else {
        panic!()
    };
    assert_eq!(call.purpose, Purpose::Route);
    assert_eq!(call.body, br#"{"chunks":[]}"#);
    assert!(call.headers.contains(&(":method".to_owned(), "PUT".to_owned())));
    assert!(call
        .headers
        .contains(&("authorization".to_owned(), "Bearer k".to_owned())));
    let headers = vec![
        ("content-type".to_owned(), "application/json".to_owned()),
        ("server".to_owned(), "x".to_owned()),
    ];
    match ex.on_callout_answer(Some(201), &headers, b"{\"ok\":1}".to_vec(), NOW) {
        Step::Reply(r) => {
            assert_eq!(r.status, 201);
            assert_eq!(
                r.headers,
                vec![("content-type".to_owned(), "application/json".to_owned())]
            );
        }
        other => panic!("{other:?}"),
    }
    // Sidecar down: 503 cache_unavailable.
    let mut ex = Driver::new();
    let mut h = head("GET", "/v2/pipelines");
    h.end_of_stream = true;
    let (_, step) = ex.headers(&Config::default(), &h);
    assert!(matches!(step, Step::Dispatch(_)));
    match ex.on_callout_answer(None, &[], Vec::new(), NOW) {
        Step::Reply(r) => assert_eq!(json(&r)["error"], "cache_unavailable"),
        other => panic!("{other:?}"),
    }
    // Envoy's own plain-text 503 for an unreachable cluster is not the sidecar's answer.
    let mut ex = Driver::new();
    assert!(matches!(ex.headers(&Config::default(), &h).1, Step::Dispatch(_)));
    let envoy_reply = vec![("content-type".to_owned(), "text/plain".to_owned())];
    match ex.on_callout_answer(Some(503), &envoy_reply, b"upstream connect error".to_vec(), NOW) {
        Step::Reply(r) => assert_eq!(
            (r.status, json(&r)["error"].as_str()),
            (503, Some("cache_unavailable"))
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn sidecar_answers_keep_the_headers_a_client_acts_on() {
    let mut ex = Driver::new();
    let mut h = head("PUT", "/v2/pipelines/p/documents/d/vectors");
    h.content_type = Some("application/json");
    ex.headers(&Config::default(), &h);
    let Step::Dispatch(_) = ex.feed(br#"{"vectors":[]}"#, true, NOW) else {
        panic!()
    };
    // A Turbopuffer 429 on the pipeline's write, as the sidecar relays it.
    let relayed = [
        ("Content-Type", "application/json"),
        ("Retry-After", "2"),
        ("retry-after-ms", "1500"),
        ("x-request-id", "tpuf-req-9"),
        ("x-should-retry", "true"),
        ("x-layer-cache", "miss"),
        ("location", "/v2/pipelines/p"),
    ];
    let mut headers: Vec<(String, String)> = relayed
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    headers.push(("server".to_owned(), "axum".to_owned()));
    headers.push(("connection".to_owned(), "keep-alive".to_owned()));
    headers.push(("content-length".to_owned(), "2".to_owned()));
    match ex.on_callout_answer(Some(429), &headers, b"{}".to_vec(), NOW) {
        Step::Reply(r) => {
            assert_eq!(r.status, 429);
            assert_eq!(r.headers, headers[..relayed.len()].to_vec());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn keys_mode_replaces_the_callers_key_and_never_forwards_it() {
    let config = keys_config(crate::route::Scope::Write);
    let mut ex = Driver::new();
    let (edits, _) = ex.headers(&config, &head("POST", "/v2/namespaces/ns"));
    assert!(edits.set.contains(&("authorization", "Bearer up".to_owned())));
    let mut ex = Driver::new();
    let mut h = head("PUT", "/v2/pipelines/p/documents/d");
    h.end_of_stream = true;
    let (_, Step::Dispatch(call)) = ex.headers(&config, &h) else {
        panic!()
    };
    assert!(!call.headers.iter().any(|(k, _)| k == "authorization"));
    let mut ex = Driver::new();
    match ex.headers(&config, &head("POST", "/v2/namespaces/ns/query")).1 {
        Step::Reply(r) => assert_eq!(json(&r)["required_scope"], "read"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn request_ids_are_uuid_v4() {
    let id = request_id_from([0xff; 16]);
    assert_eq!(id, "ffffffff-ffff-4fff-bfff-ffffffffffff");
    let counting: [u8; 16] = std::array::from_fn(|i| i as u8 * 17);
    assert_eq!(request_id_from(counting), "00112233-4455-4677-8899-aabbccddeeff");
}

fn run_write(body: &[u8], chunks: &[usize], gzip: bool) -> Step {
    let mut ex = Driver::new();
    let mut h = head("POST", "/v2/namespaces/ns");
    if gzip {
        h.content_encoding = Some("gzip");
    }
    let (_, step) = ex.headers(&Config::default(), &h);
    assert_eq!(step, Step::Pause);
    let mut at = 0;
    let mut sizes = chunks.iter().cycle();
    loop {
        let n = (*sizes.next().unwrap()).max(1).min(body.len() - at);
        let end = at + n == body.len();
        let step = ex.feed(&body[at..at + n], end, NOW);
        at += n;
        if end || step != Step::Pause {
            return step;
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

    /// Whatever the chunking and the encoding, the exchange decides the same. A generated body
    /// may be cut short, so rejections are covered too.
    #[test]
    fn the_forwarded_body_does_not_depend_on_chunking(
        body in crate::write::bodies::write_body(),
        cut in proptest::option::weighted(0.2, proptest::prelude::any::<proptest::sample::Index>()),
        chunks in proptest::collection::vec(1usize..64, 1..8),
        gzip in proptest::prelude::any::<bool>(),
    ) {
        let mut plain = body.into_bytes();
        if let Some(cut) = cut {
            plain.truncate(cut.index(plain.len()));
        }
        if plain.is_empty() {
            // Envoy flags an empty body on the headers, not with a body callback.
            return Ok(());
        }
        let wire = if gzip {
            use std::io::Write;
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&plain).unwrap();
            enc.finish().unwrap()
        } else {
            plain.clone()
        };
        let whole = run_write(&wire, &[wire.len()], gzip);
        let chunked = run_write(&wire, &chunks, gzip);
        proptest::prop_assert_eq!(&whole, &chunked);
        // And the same as the plain body sent in one piece, apart from the decoded flag.
        let reference = run_write(&plain, &[plain.len()], false);
        match (&reference, &chunked) {
            (Step::Forward(None), Step::Forward(Some(b))) => proptest::prop_assert_eq!(b.as_slice(), plain.as_slice()),
            (Step::ForwardWith(None, a), Step::ForwardWith(Some(b), c)) => {
                proptest::prop_assert_eq!(b.as_slice(), plain.as_slice());
                proptest::prop_assert_eq!(a, c);
            }
            _ => proptest::prop_assert_eq!(&reference, &chunked),
        }
    }
}

#[test]
fn envoys_own_413_during_buffering_becomes_json() {
    let mut ex = start_write(&Config::default());
    assert_eq!(ex.feed(b"{\"deletes\"", false, NOW), Step::Pause);
    let (edits, step) = ex.on_response_headers(413, Some("request_payload_too_large"), false, NOW);
    assert_eq!(step, Step::Continue);
    assert!(edits.set.contains(&(":status", "413".to_owned())));
    let (body, _) = ex.on_response_complete(Some(b"Payload Too Large"), NOW);
    let v: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
    assert_eq!(v["error"], "payload_too_large");
    // A body callback after that changes nothing.
    assert_eq!(ex.feed(b"x", true, NOW), Step::Continue);
}

#[test]
fn the_mirror_carries_no_vectors_unless_configured() {
    let body = br#"{"upsert_rows":[{"id":1,"vector":[0.5,0.5],"t":"x"}]}"#;
    for (mirror_vectors, expect_vector) in [(false, false), (true, true)] {
        let config = Config {
            mirror_vectors,
            ..waits_for_mirror()
        };
        let mut ex = start_write(&config);
        let up = forwarded(ex.feed(body, true, NOW));
        assert!(String::from_utf8_lossy(&up).contains("\"vector\":[0.5,0.5]"));
        let (_, Step::Dispatch(call)) = ex.on_response_headers(200, Some("via_upstream"), false, NOW) else {
            panic!()
        };
        let msg: sidecar_api::MirrorRequest = serde_json::from_slice(&call.body).unwrap();
        let row = &msg.write["upsert_rows"][0];
        assert_eq!(row.get("vector").is_some(), expect_vector);
        assert_eq!(row["t"], "x");
        assert_eq!(row["_hevlayer_upserted_at"], NOW);
    }
}

// ---- reads by the stamp ----

fn updating_watermark(_namespace: &str) -> Option<Watermark> {
    Some(Watermark {
        at_ms: 1_700_000_000_000,
        updating: true,
        refreshed_ms: NOW,
    })
}

fn stable_watermark(_namespace: &str) -> Option<Watermark> {
    Some(Watermark {
        at_ms: 1_700_000_000_000,
        updating: false,
        refreshed_ms: NOW,
    })
}

fn start_query(config: &Config, lookup: Option<fn(&str) -> Option<Watermark>>, now: u64) -> Driver {
    let mut ex = Driver::new();
    let mut h = head("POST", "/v2/namespaces/ns/query");
    let lookup = lookup.map(|f| move |ns: &str| f(ns));
    h.watermarks = lookup.as_ref().map(|f| WatermarkLookup(f));
    h.now_ms = now;
    let (edits, step) = ex.headers(config, &h);
    assert_eq!(step, Step::Pause);
    assert!(
        !edits.remove.contains(&"content-length"),
        "the glue sets it if the body changes"
    );
    ex
}

#[test]
fn queries_get_their_temporal_predicate_across_chunks() {
    let body = br#"{"rank_by":["id","asc"],"top_k":5,"as_of":1700000000123}"#;
    let mut ex = start_query(&Config::default(), None, NOW);
    for chunk in body[..body.len() - 1].chunks(3) {
        assert_eq!(ex.feed(chunk, false, NOW), Step::Pause);
    }
    let out = forwarded(ex.feed(&body[body.len() - 1..], true, NOW));
    assert_eq!(
        out,
        br#"{"filters":["_hevlayer_upserted_at","Lte",1700000000123],"rank_by":["id","asc"],"top_k":5}"#
    );
    let counters = ex.take_counters();
    assert!(counters.contains(&Counter::QueriesTemporal));
    assert!(counters.contains(&Counter::QueriesWithoutWatermark));
    // The query's namespace is tracked for the watermark, with the caller's key (passthrough).
    let touches = ex.take_touches();
    assert_eq!(touches.len(), 1);
    assert_eq!(touches[0].namespace, "ns");
    assert!(!touches[0].written);
    assert_eq!(touches[0].authorization.as_deref(), Some("Bearer k"));
    // No watermark known: no header on the response.
    let (edits, _) = ex.on_response_headers(200, Some("via_upstream"), false, NOW);
    assert!(edits.set.is_empty());
}

#[test]
fn a_plain_query_goes_on_unchanged_and_gzip_is_decoded() {
    use std::io::Write;
    let body = br#"{"rank_by":["id","asc"],"top_k":5}"#;
    let mut ex = start_query(&Config::default(), None, NOW);
    assert_eq!(ex.feed(body, true, NOW), Step::Forward(None));
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(br#"{"as_of":3}"#).unwrap();
    let gz = enc.finish().unwrap();
    let mut ex = Driver::new();
    let mut h = head("POST", "/v2/namespaces/ns/query");
    h.content_encoding = Some("gzip");
    let (edits, _) = ex.headers(&Config::default(), &h);
    assert!(edits.remove.contains(&"content-encoding"));
    for chunk in gz.chunks(4) {
        let _ = ex.feed(chunk, false, NOW);
    }
    assert_eq!(
        forwarded(ex.feed(b"", true, NOW)),
        br#"{"filters":["_hevlayer_upserted_at","Lte",3]}"#
    );
    let mut ex = Driver::new();
    let _ = ex.headers(&Config::default(), &h);
    match ex.feed(b"not gzip", true, NOW) {
        Step::Reply(r) => assert_eq!(r.status, 422),
        other => panic!("{other:?}"),
    }
    assert!(ex
        .take_counters()
        .contains(&Counter::ReadsRejected(ReadReason::BadEncoding)));
}

#[test]
fn bad_queries_get_a_local_422_and_are_counted_as_reads() {
    let mut ex = start_query(&Config::default(), None, NOW);
    match ex.feed(br#"{"as_of":-5}"#, true, NOW) {
        Step::Reply(r) => {
            assert_eq!(r.status, 422);
            assert_eq!(json(&r)["error"], "validation_error");
            assert!(json(&r)["message"].as_str().unwrap().starts_with("as_of must be"));
        }
        other => panic!("{other:?}"),
    }
    assert!(ex
        .take_counters()
        .contains(&Counter::ReadsRejected(ReadReason::BadField)));
    let mut ex = start_query(&Config::default(), None, NOW);
    match ex.feed(b"{\"top_k\":", true, NOW) {
        Step::Reply(r) => assert!(json(&r)["message"].as_str().unwrap().ends_with("at byte 9")),
        other => panic!("{other:?}"),
    }
    assert!(ex
        .take_counters()
        .contains(&Counter::ReadsRejected(ReadReason::InvalidJson)));
}

#[test]
fn an_updating_namespace_bounds_eventual_queries_and_every_query_reports_the_watermark() {
    let config = Config::default();
    let mut ex = start_query(&config, Some(updating_watermark), NOW);
    let out = forwarded(ex.feed(br#"{"consistency":{"level":"eventual"},"top_k":1}"#, true, NOW));
    assert_eq!(
        out,
        br#"{"filters":["_hevlayer_upserted_at","Lte",1700000000000],"consistency":{"level":"eventual"},"top_k":1}"#
    );
    assert!(ex.take_counters().contains(&Counter::QueriesWatermarked));
    let (edits, _) = ex.on_response_headers(200, Some("via_upstream"), false, NOW);
    assert_eq!(edits.set, vec![(STABLE_AS_OF_HEADER, "1700000000000".to_owned())]);
    // A strong query is left alone, but still reports the watermark (errors too).
    let mut ex = start_query(&config, Some(updating_watermark), NOW);
    assert_eq!(ex.feed(br#"{"top_k":1}"#, true, NOW), Step::Forward(None));
    let (edits, _) = ex.on_response_headers(400, Some("via_upstream"), false, NOW);
    assert_eq!(edits.set[0].0, STABLE_AS_OF_HEADER);
    // `always` applies it to strong queries too.
    let always = Config {
        read_watermark: ReadWatermark::Always,
        ..Config::default()
    };
    let mut ex = start_query(&always, Some(updating_watermark), NOW);
    assert!(forwarded(ex.feed(br#"{"top_k":1}"#, true, NOW)).starts_with(br#"{"filters":["#));
    // An up-to-date namespace: no predicate, the header all the same.
    let mut ex = start_query(&always, Some(stable_watermark), NOW);
    assert_eq!(ex.feed(br#"{"top_k":1}"#, true, NOW), Step::Forward(None));
    let (edits, _) = ex.on_response_headers(200, Some("via_upstream"), false, NOW);
    assert_eq!(edits.set.len(), 1);
}

#[test]
fn a_stale_watermark_is_not_used() {
    let config = Config::default();
    let later = NOW + config.watermark_stale_ms + 1;
    let mut ex = start_query(&config, Some(updating_watermark), later);
    assert_eq!(
        ex.feed(br#"{"consistency":{"level":"eventual"}}"#, true, later),
        Step::Forward(None)
    );
    assert!(ex.take_counters().contains(&Counter::QueriesWithoutWatermark));
    let (edits, _) = ex.on_response_headers(200, Some("via_upstream"), false, later);
    assert!(edits.set.is_empty());
}

#[test]
fn with_the_watermark_off_nothing_is_tracked_or_reported() {
    let off = Config {
        read_watermark: ReadWatermark::Off,
        ..Config::default()
    };
    let mut ex = start_query(&off, Some(updating_watermark), NOW);
    let out = forwarded(ex.feed(br#"{"as_of":4,"consistency":{"level":"eventual"}}"#, true, NOW));
    assert_eq!(
        out,
        br#"{"filters":["_hevlayer_upserted_at","Lte",4],"consistency":{"level":"eventual"}}"#
    );
    assert!(ex.take_touches().is_empty());
    assert!(!ex.take_counters().contains(&Counter::QueriesWithoutWatermark));
    let (edits, _) = ex.on_response_headers(200, Some("via_upstream"), false, NOW);
    assert!(edits.set.is_empty());
    let mut ex = start_write(&off);
    let _ = ex.feed(br#"{"deletes":[1]}"#, true, NOW);
    let _ = ex.on_response_headers(200, Some("via_upstream"), false, NOW);
    assert!(ex.take_touches().is_empty());
}

#[test]
fn only_successful_writes_mark_their_namespace_written() {
    let config = Config::default();
    let mut ex = start_write(&config);
    let _ = ex.feed(br#"{"deletes":[1]}"#, true, NOW);
    assert!(ex.take_touches().is_empty());
    let _ = ex.on_response_headers(500, Some("via_upstream"), false, NOW);
    assert!(ex.take_touches().is_empty());
    let mut ex = start_write(&config);
    let _ = ex.feed(br#"{"deletes":[1]}"#, true, NOW);
    let _ = ex.on_response_headers(200, Some("via_upstream"), false, NOW);
    let touches = ex.take_touches();
    assert_eq!(touches.len(), 1);
    assert!(touches[0].written && touches[0].namespace == "ns");
}

#[test]
fn keys_mode_never_hands_the_callers_key_to_the_tracker() {
    let config = keys_config(crate::route::Scope::Admin);
    let mut ex = Driver::new();
    let (edits, _) = ex.headers(&config, &head("POST", "/v2/namespaces/ns/query"));
    assert_eq!(edits.set[0], ("authorization", "Bearer up".to_owned()));
    let touches = ex.take_touches();
    assert_eq!(touches.len(), 1);
    assert_eq!(touches[0].authorization, None);
}

// ---- the fence ----

use crate::fence::{FenceNote, Scope as FenceScope};

/// A write of `body`, forwarded, with its response headers `status`: the exchange after them.
fn answered_write(body: &[u8], status: u16, details: &str) -> (Driver, Step) {
    let mut ex = start_write(&waits_for_mirror());
    let _ = ex.feed(body, true, NOW);
    let (_, step) = ex.on_response_headers(status, Some(details), false, NOW);
    (ex, step)
}

/// The mirror outcome counters an exchange recorded (each accepted write has exactly one).
fn outcomes(counters: &[Counter]) -> Vec<Counter> {
    counters
        .iter()
        .copied()
        .filter(|c| {
            matches!(
                c,
                Counter::MirrorOk
                    | Counter::MirrorFailed
                    | Counter::MirrorTimeout
                    | Counter::MirrorSkipped
                    | Counter::WritesUnanswered
            )
        })
        .collect()
}

#[test]
fn a_mirror_that_did_not_happen_fences_the_writes_ids() {
    let body = br#"{"upsert_rows":[{"id":"a","t":1},{"id":7}],"deletes":["z"]}"#;
    let expected = FenceNote {
        namespace: "ns".into(),
        scope: FenceScope::Ids(vec!["\"a\"".into(), "7".into(), "\"z\"".into()]),
        stamp: NOW,
    };
    // Failed, timed out, or never dispatched: the same fence.
    for (status, elapsed, counter) in [
        (Some(500), 3, Counter::MirrorFailed),
        (None, 300, Counter::MirrorTimeout),
    ] {
        let (mut ex, step) = answered_write(body, 200, "via_upstream");
        assert!(matches!(step, Step::Dispatch(_)));
        ex.on_callout_answer(status, &json_type(), Vec::new(), NOW + elapsed);
        assert_eq!(ex.take_fences(), vec![expected.clone()]);
        assert_eq!(outcomes(&ex.take_counters()), vec![counter]);
        ex.on_stream_end();
        assert!(
            ex.take_fences().is_empty() && ex.take_counters().is_empty(),
            "one outcome"
        );
    }
    let (mut ex, _) = answered_write(body, 200, "via_upstream");
    ex.on_callout_dispatch_failed();
    assert_eq!(ex.take_fences(), vec![expected]);
    assert_eq!(outcomes(&ex.take_counters()), vec![Counter::MirrorFailed]);
}

#[test]
fn a_mirror_that_happened_fences_nothing() {
    let (mut ex, _) = answered_write(br#"{"deletes":[1]}"#, 200, "via_upstream");
    ex.on_callout_answer(Some(200), &json_type(), br#"{"applied":1}"#.to_vec(), NOW + 1);
    ex.on_stream_end();
    assert!(ex.take_fences().is_empty());
    assert_eq!(outcomes(&ex.take_counters()), vec![Counter::MirrorOk]);
}

#[test]
fn a_write_whose_outcome_never_came_is_fenced() {
    // The client hung up after the body went upstream.
    let mut ex = start_write(&Config::default());
    let _ = ex.feed(br#"{"patch_rows":[{"id":5,"x":1}]}"#, true, NOW);
    ex.on_stream_end();
    assert_eq!(
        ex.take_fences(),
        vec![FenceNote {
            namespace: "ns".into(),
            scope: FenceScope::Ids(vec!["5".into()]),
            stamp: NOW
        }]
    );
    assert_eq!(outcomes(&ex.take_counters()), vec![Counter::WritesUnanswered]);
    // Hung up while the mirror of a 2xx was in flight: its answer will never be seen.
    let (mut ex, _) = answered_write(br#"{"deletes":[1]}"#, 200, "via_upstream");
    ex.on_stream_end();
    assert_eq!(ex.take_fences().len(), 1);
    assert_eq!(outcomes(&ex.take_counters()), vec![Counter::WritesUnanswered]);
    // Envoy's own 504 (Turbopuffer did not answer in time): the write may have applied.
    let (mut ex, _) = answered_write(br#"{"deletes":[1]}"#, 504, "response_timeout");
    assert_eq!(ex.take_fences().len(), 1);
    assert_eq!(outcomes(&ex.take_counters()), vec![Counter::WritesUnanswered]);
    // A filter write: the whole namespace.
    let mut ex = start_write(&Config::default());
    let _ = ex.feed(br#"{"delete_by_filter":["a","Eq",1]}"#, true, NOW);
    ex.on_stream_end();
    assert_eq!(ex.take_fences()[0].scope, FenceScope::Namespace);
}

#[test]
fn writes_with_nothing_to_mirror_are_skipped_not_fenced() {
    for (body, status) in [
        (&br#"{"deletes":[1]}"#[..], 429),
        (&br#"{"deletes":[1]}"#[..], 400),
        (&br#"{"schema":{"a":{"type":"string"}}}"#[..], 200),
    ] {
        let (mut ex, step) = answered_write(body, status, "via_upstream");
        assert_eq!(step, Step::Continue);
        ex.on_stream_end();
        assert!(ex.take_fences().is_empty());
        assert_eq!(
            outcomes(&ex.take_counters()),
            vec![Counter::MirrorSkipped],
            "{status}"
        );
    }
    // A rejected write was never accepted: no outcome at all.
    let mut ex = start_write(&Config::default());
    let _ = ex.feed(b"{}", true, NOW);
    ex.on_stream_end();
    assert!(outcomes(&ex.take_counters()).is_empty());
}

#[test]
fn a_failed_purge_fences_the_namespace() {
    let mut ex = Driver::new();
    ex.headers(&Config::default(), &head("DELETE", "/v2/namespaces/gone"));
    let (_, step) = ex.on_response_headers(200, Some("via_upstream"), true, NOW);
    assert!(matches!(step, Step::Dispatch(_)));
    ex.on_callout_answer(Some(503), &[], Vec::new(), NOW + 1);
    assert_eq!(
        ex.take_fences(),
        vec![FenceNote {
            namespace: "gone".into(),
            scope: FenceScope::Namespace,
            stamp: 0
        }]
    );
}

#[test]
fn a_fetch_of_a_fenced_namespace_bypasses_the_cache() {
    let fenced = |ns: &str| ns == "fenced";
    for (ns, bypass) in [("fenced", true), ("other", false)] {
        let mut ex = Driver::new();
        let path = format!("/v2/namespaces/{ns}/documents/7");
        let mut h = head("GET", &path);
        h.end_of_stream = true;
        h.fences = Some(FenceLookup(&fenced));
        let (_, step) = ex.headers(&Config::default(), &h);
        let Step::Dispatch(call) = step else {
            panic!("{step:?}")
        };
        let has = call.headers.iter().any(|(k, _)| k == sidecar_api::BYPASS_HEADER);
        assert_eq!(has, bypass, "{ns}");
        assert_eq!(ex.take_counters().contains(&Counter::FetchesBypassed), bypass);
    }
}

#[test]
fn a_request_body_envoy_will_not_hand_over_is_a_500_and_nothing_goes_upstream() {
    for gzip in [false, true] {
        let mut ex = Exchange::new(Rc::default());
        let mut h = head("POST", "/v2/namespaces/ns");
        h.content_encoding = gzip.then_some("gzip");
        assert_eq!(ex.on_request_headers(&h).1, Step::Pause);
        let mut refuse = |_: usize, _: usize| None;
        let Step::Reply(reply) = ex.on_request_body(10, true, NOW, &mut refuse) else {
            panic!("expected a local reply")
        };
        assert_eq!(reply.status, 500, "gzip {gzip}");
        assert_eq!(json(&reply)["error"], "internal_error");
        let counters = ex.take_counters();
        assert!(counters.contains(&Counter::BodyReadFailed), "{counters:?}");
        assert!(!counters.contains(&Counter::WritesAccepted));
        // The stream stays held: nothing of it goes upstream.
        assert_eq!(ex.on_request_trailers(10, NOW, &mut refuse), Step::Pause);
    }
}

#[test]
fn a_write_response_envoy_will_not_hand_over_leaves_the_mirror_undone_and_fenced() {
    let mut ex = start_write(&Config::default());
    forwarded(ex.feed(br#"{"delete_by_filter":["a","Eq",1]}"#, true, NOW));
    let (_, step) = ex.on_response_headers(200, Some("via_upstream"), false, NOW);
    assert_eq!(step, Step::Continue);
    assert!(ex.wants_response_body());
    let (replacement, step) = ex.on_response_complete(None, NOW);
    assert_eq!((replacement, step), (None, Step::Continue));
    let counters = ex.take_counters();
    assert!(counters.contains(&Counter::BodyReadFailed), "{counters:?}");
    assert!(counters.contains(&Counter::MirrorFailed), "{counters:?}");
    let fences = ex.take_fences();
    assert_eq!(fences.len(), 1);
    assert_eq!(fences[0].namespace, "ns");
    assert_eq!(fences[0].stamp, NOW);
    // Its one outcome is recorded: the stream's end adds nothing.
    ex.on_stream_end();
    assert!(ex.take_counters().is_empty());
    assert!(ex.take_fences().is_empty());
}

#[test]
fn each_callout_answer_resumes_the_half_it_held() {
    // A purge holds the response.
    let mut ex = Driver::new();
    ex.headers(&Config::default(), &head("DELETE", "/v2/namespaces/ns"));
    let (_, step) = ex.on_response_headers(200, Some("via_upstream"), false, NOW);
    assert!(matches!(step, Step::Dispatch(_)));
    assert_eq!(
        ex.on_callout_answer(Some(200), &json_type(), b"{}".to_vec(), NOW),
        Step::Resume(Half::Response)
    );
    // A route callout (the request half) is answered with a reply, never resumed upstream.
    let mut ex = Driver::new();
    ex.headers(&Config::default(), &head("GET", "/v2/pipelines/p/status"));
    let Step::Dispatch(_) = ex.feed(b"", true, NOW) else {
        panic!("expected a route callout")
    };
    assert!(matches!(
        ex.on_callout_answer(Some(200), &json_type(), b"{}".to_vec(), NOW),
        Step::Reply(_)
    ));
    // An answer with no callout outstanding resumes nothing.
    assert_eq!(
        ex.on_callout_answer(Some(200), &json_type(), b"{}".to_vec(), NOW),
        Step::Continue
    );
}

// ---- evictions ahead: the mirror after the response ----

/// A write forwarded with its eviction ahead: the exchange and the eviction callout.
fn write_ahead(body: &[u8]) -> (Driver, Callout) {
    let mut ex = start_write(&Config::default());
    match ex.feed(body, true, NOW) {
        Step::ForwardWith(_, call) => (ex, call),
        other => panic!("expected a forward with its eviction, got {other:?}"),
    }
}

/// The one mirror an exchange handed to the worker's queue.
fn handed_off(ex: &mut Exchange) -> sidecar_api::MirrorRequest {
    let jobs = ex.take_mirrors();
    assert_eq!(jobs.len(), 1, "one mirror per write");
    assert_eq!(jobs[0].request_id, "rid");
    serde_json::from_slice(&jobs[0].body).unwrap()
}

#[test]
fn a_write_evicts_the_ids_it_names_while_turbopuffer_applies_it() {
    let body = br#"{"upsert_rows":[{"id":"a","vector":[1,2]},{"id":7}],"deletes":["z"]}"#;
    let (mut ex, call) = write_ahead(body);
    assert_eq!(call.purpose, Purpose::EvictAhead);
    assert_eq!(call.timeout_ms, 200);
    assert!(call
        .headers
        .contains(&(":path".to_owned(), sidecar_api::EVICT_PATH.to_owned())));
    let evict: sidecar_api::EvictRequest = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(
        evict.fences,
        vec![sidecar_api::Fence {
            namespace: "ns".into(),
            ids: Some(vec!["a".into(), 7.into(), "z".into()]),
            stamp: NOW,
        }]
    );
    // The eviction is answered while the upstream works: nothing to resume.
    assert_eq!(
        ex.on_callout_answer(Some(200), &json_type(), br#"{"applied":1}"#.to_vec(), NOW + 1),
        Step::Continue
    );
    // The 2xx goes on at once; the mirror goes to the worker's queue, which records its outcome.
    let (_, step) = ex.on_response_headers(200, Some("via_upstream"), false, NOW + 2);
    assert_eq!(step, Step::Continue);
    assert!(!ex.holds_response());
    let msg = handed_off(&mut ex);
    assert_eq!((msg.namespace.as_str(), msg.upserted_at), ("ns", NOW));
    assert_eq!(msg.write["upsert_rows"][0]["_hevlayer_upserted_at"], NOW);
    assert!(msg.write["upsert_rows"][0].get("vector").is_none());
    let counters = ex.take_counters();
    assert!(counters.contains(&Counter::EvictAheadOk));
    assert_eq!(outcomes(&counters), vec![], "the queue records the outcome");
    ex.on_stream_end();
    assert!(ex.take_fences().is_empty() && outcomes(&ex.take_counters()).is_empty());
}

#[test]
fn the_response_needs_the_clock_only_to_time_a_callout_it_waits_for() {
    let body = br#"{"upsert_rows":[{"id":1}]}"#;
    // Evicted ahead: the mirror is handed off untimed.
    let (ex, _) = write_ahead(body);
    assert!(!ex.response_needs_clock());
    // Waiting for its mirror: the callout is timed.
    let mut ex = start_write(&waits_for_mirror());
    assert!(matches!(ex.feed(body, true, NOW), Step::Forward(_)));
    assert!(ex.response_needs_clock());
    // A query starts no callout.
    let ex = start_query(&Config::default(), None, NOW);
    assert!(!ex.response_needs_clock());
}

#[test]
fn a_2xx_waits_for_an_eviction_still_out() {
    let (mut ex, _) = write_ahead(br#"{"upsert_rows":[{"id":1}]}"#);
    let (_, step) = ex.on_response_headers(200, Some("via_upstream"), false, NOW + 1);
    assert_eq!(step, Step::Pause);
    assert!(ex.holds_response() && !ex.wants_response_body());
    assert!(ex.take_mirrors().is_empty(), "no mirror before the eviction");
    assert_eq!(
        ex.on_callout_answer(Some(200), &json_type(), b"{}".to_vec(), NOW + 3),
        Step::Resume(Half::Response)
    );
    assert_eq!(handed_off(&mut ex).upserted_at, NOW);
    assert!(!ex.holds_response());
    // A repeated answer changes nothing.
    assert_eq!(
        ex.on_callout_answer(Some(200), &json_type(), Vec::new(), NOW + 4),
        Step::Continue
    );
    assert!(ex.take_mirrors().is_empty());
}

#[test]
fn a_failed_eviction_ahead_fences_the_write_and_still_mirrors_it() {
    let body = br#"{"upsert_rows":[{"id":5,"x":1}]}"#;
    let fence = FenceNote {
        namespace: "ns".into(),
        scope: FenceScope::Ids(vec!["5".into()]),
        stamp: NOW,
    };
    let plain = vec![("content-type".to_owned(), "text/plain".to_owned())];
    for (status, headers, elapsed) in [
        (Some(500), json_type(), 3),
        (Some(504), plain.clone(), 200),
        (Some(503), plain.clone(), 3),
        (None, Vec::new(), 3),
    ] {
        for answered_first in [true, false] {
            let (mut ex, _) = write_ahead(body);
            let step = if answered_first {
                assert_eq!(
                    ex.on_callout_answer(status, &headers, Vec::new(), NOW + elapsed),
                    Step::Continue
                );
                ex.on_response_headers(200, Some("via_upstream"), false, NOW + elapsed)
                    .1
            } else {
                assert_eq!(
                    ex.on_response_headers(200, Some("via_upstream"), false, NOW).1,
                    Step::Pause
                );
                ex.on_callout_answer(status, &headers, Vec::new(), NOW + elapsed)
            };
            let expected = if answered_first {
                Step::Continue
            } else {
                Step::Resume(Half::Response)
            };
            assert_eq!(step, expected, "{status:?}");
            assert_eq!(ex.take_fences(), vec![fence.clone()], "{status:?}");
            assert!(ex.take_counters().contains(&Counter::EvictAheadFailed));
            handed_off(&mut ex);
        }
    }
    // Never dispatched: the same.
    let (mut ex, _) = write_ahead(body);
    assert_eq!(ex.on_callout_dispatch_failed(), Step::Continue);
    assert_eq!(ex.take_fences(), vec![fence]);
    assert!(ex.take_counters().contains(&Counter::EvictAheadFailed));
    assert_eq!(
        ex.on_response_headers(200, Some("via_upstream"), false, NOW).1,
        Step::Continue
    );
    handed_off(&mut ex);
}

#[test]
fn a_write_waiting_for_its_grouped_eviction_is_parked_and_settled_by_whoever_holds_it() {
    // Settled before the response: the response goes on at once.
    let (mut ex, _) = write_ahead(br#"{"upsert_rows":[{"id":1}]}"#);
    assert_eq!(ex.eviction_settled(true, false), Some(Step::Continue));
    assert!(ex.park().is_none(), "nothing waits yet");
    let (_, step) = ex.on_response_headers(200, Some("via_upstream"), false, NOW + 1);
    assert_eq!(step, Step::Continue);
    assert!(ex.take_counters().contains(&Counter::EvictAheadOk));
    handed_off(&mut ex);

    // The response came first: the write moves out, the stream's exchange only holds the
    // response, and the write is finished where it went.
    let (mut ex, _) = write_ahead(br#"{"upsert_rows":[{"id":1}]}"#);
    let (_, step) = ex.on_response_headers(200, Some("via_upstream"), false, NOW + 1);
    assert_eq!(step, Step::Pause);
    ex.take_counters();
    let mut parked = ex.park().expect("the response waits");
    assert!(ex.is_parked() && ex.holds_response() && !ex.wants_response_body());
    assert!(ex.park().is_none(), "parked once");
    assert_eq!(
        parked.eviction_settled(false, true),
        Some(Step::Resume(Half::Response))
    );
    assert_eq!(
        parked.take_fences().len(),
        1,
        "a failed eviction fences the write"
    );
    assert!(parked.take_counters().contains(&Counter::EvictAheadFailed));
    assert_eq!(handed_off(&mut parked).upserted_at, NOW);
    assert_eq!(parked.eviction_settled(true, false), None, "settled once");
    // The stream ending leaves nothing to fence or count: the write is the root's.
    ex.on_stream_end();
    assert!(ex.take_fences().is_empty() && ex.take_counters().is_empty() && ex.take_mirrors().is_empty());
}

#[test]
fn a_refused_write_with_an_eviction_out_is_not_mirrored() {
    let (mut ex, _) = write_ahead(br#"{"upsert_rows":[{"id":1}]}"#);
    let (_, step) = ex.on_response_headers(429, Some("via_upstream"), false, NOW + 1);
    assert_eq!(step, Step::Continue);
    assert_eq!(outcomes(&ex.take_counters()), vec![Counter::MirrorSkipped]);
    // The eviction's late answer, even a failure, changes nothing: the write did not apply.
    assert_eq!(
        ex.on_callout_answer(Some(500), &json_type(), Vec::new(), NOW + 5),
        Step::Continue
    );
    assert!(ex.take_mirrors().is_empty() && ex.take_fences().is_empty());
}

#[test]
fn a_client_gone_while_the_2xx_waits_for_the_eviction_is_fenced() {
    let (mut ex, _) = write_ahead(br#"{"deletes":[3]}"#);
    ex.on_response_headers(200, Some("via_upstream"), false, NOW + 1);
    ex.on_stream_end();
    assert_eq!(outcomes(&ex.take_counters()), vec![Counter::WritesUnanswered]);
    assert_eq!(ex.take_fences().len(), 1);
    assert!(ex.take_mirrors().is_empty());
}

#[test]
fn only_writes_that_name_every_document_they_change_evict_ahead() {
    let config = Config {
        evict_ahead_max_ids: 2,
        ..Config::default()
    };
    for (body, ahead) in [
        (&br#"{"deletes":[1,2]}"#[..], true),
        (br#"{"deletes":[1,2,3]}"#, false),
        (br#"{"upsert_columns":{"id":[1,2],"x":[1,2]}}"#, true),
        (br#"{"delete_by_filter":["a","Eq",1]}"#, false),
        (
            br#"{"patch_by_filter":{"filters":["a","Eq",1],"patch":{"b":1}}}"#,
            false,
        ),
        (
            br#"{"upsert_rows":[{"id":1}],"upsert_condition":["v","Lt",1]}"#,
            false,
        ),
    ] {
        let mut ex = start_write(&config);
        let step = ex.feed(body, true, NOW);
        let text = String::from_utf8_lossy(body);
        assert_eq!(matches!(step, Step::ForwardWith(..)), ahead, "{text}: {step:?}");
        assert!(matches!(step, Step::Forward(_) | Step::ForwardWith(..)), "{text}");
    }
    // Nothing the cache holds changes: no eviction, no mirror.
    let mut ex = start_write(&Config::default());
    assert!(matches!(
        ex.feed(br#"{"schema":{"a":"string"}}"#, true, NOW),
        Step::Forward(_)
    ));
}

// ---- trace context on callouts ----

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACESTATE: &str = "congo=t61rcWkgMzE";

/// `head` with the client's trace context.
fn traced<'a>(method: &'a str, path: &'a str) -> RequestHead<'a> {
    RequestHead {
        traceparent: Some(TRACEPARENT),
        tracestate: Some(TRACESTATE),
        ..head(method, path)
    }
}

/// The request id and trace headers a callout carries, in order.
fn identity(call: &Callout) -> Vec<(String, String)> {
    let names = ["x-request-id", "traceparent", "tracestate"];
    call.headers
        .iter()
        .filter(|(k, _)| names.contains(&k.as_str()))
        .cloned()
        .collect()
}

fn traced_identity() -> Vec<(String, String)> {
    vec![
        ("x-request-id".to_owned(), "rid".to_owned()),
        ("traceparent".to_owned(), TRACEPARENT.to_owned()),
        ("tracestate".to_owned(), TRACESTATE.to_owned()),
    ]
}

#[test]
fn route_callouts_carry_the_request_id_and_trace_context() {
    let mut ex = Driver::new();
    let mut h = traced("GET", "/v2/pipelines/p/status");
    h.end_of_stream = true;
    let (_, Step::Dispatch(call)) = ex.headers(&Config::default(), &h) else {
        panic!("expected a route callout")
    };
    assert_eq!(identity(&call), traced_identity());
}

#[test]
fn evictions_mirrors_and_purges_carry_the_trace_context() {
    // The eviction ahead, then the mirror handed to the worker's queue.
    let mut ex = Driver::new();
    assert_eq!(
        ex.headers(&Config::default(), &traced("POST", "/v2/namespaces/ns"))
            .1,
        Step::Pause
    );
    let Step::ForwardWith(_, evict) = ex.feed(br#"{"upsert_rows":[{"id":1}]}"#, true, NOW) else {
        panic!("expected the eviction ahead")
    };
    assert_eq!(identity(&evict), traced_identity());
    ex.on_callout_answer(Some(200), &json_type(), b"{}".to_vec(), NOW + 1);
    ex.on_response_headers(200, Some("via_upstream"), true, NOW + 2);
    let jobs = ex.take_mirrors();
    assert_eq!(jobs.len(), 1);
    let expected = crate::trace::TraceContext::from_headers(Some(TRACEPARENT), Some(TRACESTATE));
    assert_eq!(jobs[0].trace, expected);

    // A mirror the response waits for.
    let mut ex = Driver::new();
    ex.headers(&waits_for_mirror(), &traced("POST", "/v2/namespaces/ns"));
    forwarded(ex.feed(br#"{"upsert_rows":[{"id":1}]}"#, true, NOW));
    let (_, Step::Dispatch(mirror)) = ex.on_response_headers(200, Some("via_upstream"), false, NOW) else {
        panic!("expected the mirror")
    };
    assert_eq!(mirror.purpose, Purpose::Mirror);
    assert_eq!(identity(&mirror), traced_identity());

    // The purge of a deleted namespace.
    let mut ex = Driver::new();
    ex.headers(&Config::default(), &traced("DELETE", "/v2/namespaces/gone"));
    let (_, Step::Dispatch(purge)) = ex.on_response_headers(200, Some("via_upstream"), false, NOW) else {
        panic!("expected the purge")
    };
    assert_eq!(purge.purpose, Purpose::Purge);
    assert_eq!(identity(&purge), traced_identity());
}

#[test]
fn without_a_traceparent_callouts_carry_the_request_id_alone() {
    let mut ex = Driver::new();
    let mut h = head("GET", "/v2/pipelines/p/status");
    // A tracestate means nothing without a traceparent.
    h.tracestate = Some(TRACESTATE);
    h.end_of_stream = true;
    let (_, Step::Dispatch(call)) = ex.headers(&Config::default(), &h) else {
        panic!("expected a route callout")
    };
    assert_eq!(
        identity(&call),
        vec![("x-request-id".to_owned(), "rid".to_owned())]
    );
}
