#![allow(clippy::unwrap_used, clippy::panic)]
use super::*;
use crate::metrics::Counter;

const NOW: u64 = 1_732_400_000_000;

/// An exchange driven the way Envoy drives it: body chunks accumulate in Envoy's buffer while
/// the filter pauses, and the exchange reads from that buffer.
struct Driver {
    ex: Exchange,
    wire: Vec<u8>,
}

impl Driver {
    fn new() -> Self {
        Driver {
            ex: Exchange::new(),
            wire: Vec::new(),
        }
    }

    fn feed(&mut self, chunk: &[u8], end: bool, now: u64) -> Step {
        self.wire.extend_from_slice(chunk);
        let wire = &self.wire;
        let mut read = |start: usize, len: usize| wire[start..start + len].to_vec();
        self.ex.on_request_body(wire.len(), end, now, &mut read)
    }

    fn trailers(&mut self, now: u64) -> Step {
        let wire = &self.wire;
        let mut read = |start: usize, len: usize| wire[start..start + len].to_vec();
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

fn json(reply: &LocalReply) -> serde_json::Value {
    serde_json::from_slice(&reply.body).unwrap()
}

fn start_write(config: &Config) -> Driver {
    let mut ex = Driver::new();
    let (edits, step) = ex.on_request_headers(config, &head("POST", "/v2/namespaces/ns"));
    assert_eq!(step, Step::Pause);
    assert!(edits.remove.contains(&"content-length"));
    ex
}

fn forwarded(step: Step) -> Vec<u8> {
    match step {
        Step::Forward(Some(b)) => b,
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
    let config = Config::default();
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
    assert_eq!(ex.take_counters(), vec![Counter::WritesRejected("no_operation")]);
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
    match ex.on_request_headers(&Config::default(), &h).1 {
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
    match ex.on_request_headers(&config, &h).1 {
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

#[test]
fn gzip_bodies_are_decoded_and_unknown_encodings_refused() {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(br#"{"deletes":["a"]}"#).unwrap();
    let gz = enc.finish().unwrap();
    let mut ex = Driver::new();
    let mut h = head("POST", "/v2/namespaces/ns");
    h.content_encoding = Some("gzip");
    let (edits, _) = ex.on_request_headers(&Config::default(), &h);
    assert!(edits.remove.contains(&"content-encoding"));
    assert_eq!(forwarded(ex.feed(&gz, true, NOW)), br#"{"deletes":["a"]}"#);

    let mut ex = Driver::new();
    h.content_encoding = Some("br");
    match ex.on_request_headers(&Config::default(), &h).1 {
        Step::Reply(r) => assert_eq!(r.status, 422),
        other => panic!("{other:?}"),
    }
}

#[test]
fn passthrough_routes_are_untouched() {
    for (m, p) in [
        ("POST", "/v2/namespaces/ns/query"),
        ("GET", "/v1/namespaces"),
        ("DELETE", "/v2/namespaces/ns"),
        ("GET", "/healthz"),
        ("POST", "/v3/namespaces/x"),
    ] {
        let mut ex = Driver::new();
        let (edits, step) = ex.on_request_headers(&Config::default(), &head(m, p));
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
        let (edits, step) = ex.on_request_headers(&config, &head(m, p));
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
            match ex.on_request_headers(&config, &h).1 {
                Step::Reply(r) => assert_eq!(json(&r)["error"], "unauthorized", "{m} {p}"),
                other => panic!("{m} {p}: {other:?}"),
            }
        }
    }
    // Scopes hold there too: a read key may GET anything but POST nothing.
    let read = keys_config(crate::route::Scope::Read);
    assert_eq!(
        Driver::new()
            .on_request_headers(&read, &head("GET", "/healthz"))
            .1,
        Step::Continue
    );
    match Driver::new().on_request_headers(&read, &head("POST", "/v3/x")).1 {
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
            ex.on_request_headers(&Config::default(), &head("POST", path)).1,
            Step::Pause,
            "{path}"
        );
        match ex.feed(b"{}", true, NOW) {
            Step::Reply(r) => assert_eq!(r.status, 422, "{path}"),
            other => panic!("{path}: {other:?}"),
        }

        let mut ex = Driver::new();
        ex.on_request_headers(&Config::default(), &head("POST", path));
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
    let (_, Step::Dispatch(call)) = ex.on_request_headers(&Config::default(), &h) else {
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
    match ex.on_request_headers(&Config::default(), &h).1 {
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
        let (body, step) = ex.on_response_complete(b"upstream connect error", NOW);
        assert_eq!(step, Step::Continue);
        let v: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
        assert_eq!(v, serde_json::json!({"error": kind, "message": message}));
    }
}

/// The 504 body a route gets when the router's timeout fires on it.
fn timeout_message(method: &str, path: &str) -> String {
    let mut ex = Driver::new();
    let (_, step) = ex.on_request_headers(&Config::default(), &head(method, path));
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
    let (body, _) = ex.on_response_complete(b"upstream request timeout", NOW);
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
        ex.on_request_headers(&Config::default(), &head(method, path));
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
    ex.on_request_headers(&Config::default(), &head("HEAD", "/v1/namespaces"));
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
    let mut ex = start_write(&Config::default());
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
    assert_eq!(
        ex.on_callout_answer(Some(200), &json_type(), b"{}".to_vec(), NOW + 5),
        Step::Continue
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
        let mut ex = start_write(&Config::default());
        assert!(matches!(
            ex.feed(br#"{"deletes":[1]}"#, true, NOW),
            Step::Forward(None)
        ));
        let (_, step) = ex.on_response_headers(200, Some("via_upstream"), false, NOW);
        assert!(matches!(step, Step::Dispatch(_)));
        assert_eq!(
            ex.on_callout_answer(status, &headers, Vec::new(), NOW + elapsed),
            Step::Continue
        );
        assert!(ex.take_counters().contains(&counter), "{status:?} {elapsed}");
    }
    let mut ex = start_write(&Config::default());
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
    let (body, step) = ex.on_response_complete(upstream, NOW);
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
    let (body, step) = ex.on_response_complete(br#"{"deleted_ids":[4]}"#, NOW);
    assert!(body.is_none());
    assert!(matches!(step, Step::Dispatch(_)));
}

#[test]
fn namespace_delete_purges_after_success() {
    let mut ex = Driver::new();
    assert_eq!(
        ex.on_request_headers(&Config::default(), &head("DELETE", "/v2/namespaces/n%201"))
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
    assert_eq!(ex.on_request_headers(&Config::default(), &h).1, Step::Pause);
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
    let (_, step) = ex.on_request_headers(&Config::default(), &h);
    assert!(matches!(step, Step::Dispatch(_)));
    match ex.on_callout_answer(None, &[], Vec::new(), NOW) {
        Step::Reply(r) => assert_eq!(json(&r)["error"], "cache_unavailable"),
        other => panic!("{other:?}"),
    }
    // Envoy's own plain-text 503 for an unreachable cluster is not the sidecar's answer.
    let mut ex = Driver::new();
    assert!(matches!(
        ex.on_request_headers(&Config::default(), &h).1,
        Step::Dispatch(_)
    ));
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
    ex.on_request_headers(&Config::default(), &h);
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
    let (edits, _) = ex.on_request_headers(&config, &head("POST", "/v2/namespaces/ns"));
    assert!(edits.set.contains(&("authorization", "Bearer up".to_owned())));
    let mut ex = Driver::new();
    let mut h = head("PUT", "/v2/pipelines/p/documents/d");
    h.end_of_stream = true;
    let (_, Step::Dispatch(call)) = ex.on_request_headers(&config, &h) else {
        panic!()
    };
    assert!(!call.headers.iter().any(|(k, _)| k == "authorization"));
    let mut ex = Driver::new();
    match ex
        .on_request_headers(&config, &head("POST", "/v2/namespaces/ns/query"))
        .1
    {
        Step::Reply(r) => assert_eq!(json(&r)["required_scope"], "read"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn request_ids_are_uuid_v4() {
    let id = request_id_from([0xff; 16]);
    assert_eq!(id, "ffffffff-ffff-4fff-bfff-ffffffffffff");
}

fn run_write(body: &[u8], chunks: &[usize], gzip: bool) -> Step {
    let mut ex = Driver::new();
    let mut h = head("POST", "/v2/namespaces/ns");
    if gzip {
        h.content_encoding = Some("gzip");
    }
    let (_, step) = ex.on_request_headers(&Config::default(), &h);
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
    let (body, _) = ex.on_response_complete(b"Payload Too Large", NOW);
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
            ..Config::default()
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
