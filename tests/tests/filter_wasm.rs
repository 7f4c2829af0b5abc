//! The built filter `.wasm` in our proxy-wasm host: the scenario table of the write path, checked
//! by outcome (what the client got, what the upstream received, callouts, counters).
//! Build the filter first: `make wasm`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hevlayer_tests::wasm_host::{self, filter, Action, Answer, Body, Stream, Vm};
use serde_json::{json, Value};
use std::io::Write;

const NOW_MS: u64 = 1_795_000_000_123;
/// The filter's `mirror_linger_ms` when a configuration names none.
const DEFAULT_LINGER_MS: u64 = 2;
const JSON: (&str, &str) = ("content-type", "application/json");

/// The sum of the counters an accepted write ends in (exactly one each).
fn mirror_outcomes(vm: &Vm) -> i64 {
    hevlayer_tests::MIRROR_OUTCOMES
        .iter()
        .map(|c| vm.counter(c))
        .sum()
}

/// Every write's response waits for its mirror (no eviction ahead).
const WAITS_FOR_MIRROR: &str = r#"{"evict_ahead_max_ids":0}"#;
/// Mirrors go in batches only (they neither ride groups nor keep gathering while writes keep
/// coming): the tests of the batches alone.
const BATCHES_ONLY: &str = r#"{"read_watermark":"off","mirror_ride_bytes":0,"mirror_linger_max_ms":0}"#;

/// A VM under `config`; mirrors after their responses go at each wake-up (`mirror_linger_ms: 0`)
/// unless `config` says otherwise, so that a test sees them right after the stream.
fn vm(config: &str) -> Vm {
    lingering_vm(&with_default(config, "mirror_linger_ms", 0))
}

/// `config` (a JSON object) with `field` set to `value` unless it names one.
fn with_default(config: &str, field: &str, value: u64) -> String {
    let mut parsed: serde_json::Value = if config.trim().is_empty() {
        serde_json::json!({})
    } else {
        serde_json::from_str(config).unwrap()
    };
    if let Some(object) = parsed.as_object_mut() {
        object.entry(field).or_insert(serde_json::json!(value));
    }
    parsed.to_string()
}

/// A VM under `config` (the default linger unless it names one); each counter increment is
/// recorded at once (`counter_batch: 1`) unless `config` says otherwise, so that a test reads
/// its counters right after the stream.
fn lingering_vm(config: &str) -> Vm {
    let config = with_default(config, "counter_batch", 1);
    let mut vm = filter().unwrap().start(&config).unwrap();
    vm.set_time_ms(NOW_MS);
    vm
}

fn write_headers<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut h = vec![
        (":method", "POST"),
        (":path", "/v2/namespaces/ns"),
        (":authority", "gateway"),
        ("authorization", "Bearer tpuf_key"),
        JSON,
    ];
    h.extend_from_slice(extra);
    h
}

/// Sends a write and returns the stream (the body in chunks of `chunk` bytes).
fn send_write<'v>(vm: &'v mut Vm, body: &[u8], chunk: usize) -> Stream<'v> {
    let mut s = vm.stream().unwrap();
    assert_eq!(
        s.request_headers(&write_headers(&[]), false).unwrap(),
        Action::Pause
    );
    s.request_body_chunked(body, chunk).unwrap();
    s
}

fn upstream_json(s: &Stream<'_>) -> Value {
    serde_json::from_slice(s.upstream_body()).unwrap()
}

fn reply_json(s: &Stream<'_>) -> (u32, Value) {
    let r = s.local_reply().expect("a local reply");
    assert_eq!(r.header("content-type"), Some("application/json"));
    (r.status, r.json())
}

#[test]
fn accepted_write_is_stamped_and_forwarded_byte_for_byte() {
    let mut vm = vm("{}");
    let body = br#"{"upsert_rows": [{"id": 1, "vector": [0.10, 2e3]}, {"id": "b", "t": "x"}], "distance_metric": "cosine_distance"}"#;
    let s = send_write(&mut vm, body, 7);
    assert!(s.reached_upstream(), "{:?}", s.local_reply());
    let expected = format!(
        r#"{{"upsert_rows": [{{"id": 1, "vector": [0.10, 2e3],"_hevlayer_upserted_at":{NOW_MS}}}, {{"id": "b", "t": "x","_hevlayer_upserted_at":{NOW_MS}}}], "distance_metric": "cosine_distance"}}"#
    );
    assert_eq!(String::from_utf8_lossy(s.upstream_body()), expected);
    assert_eq!(
        s.upstream_header("content-length"),
        Some(expected.len().to_string().as_str()),
        "content-length is the stamped body's"
    );
    assert_eq!(s.upstream_header("authorization"), Some("Bearer tpuf_key"));
    assert!(s.upstream_header("x-request-id").is_some_and(|id| id.len() == 36));
    assert_eq!(s.counter("hevlayer.writes_accepted"), 1);
    assert_eq!(s.counter("hevlayer.rows_stamped"), 2);
}

#[test]
fn chunking_never_changes_what_goes_upstream() {
    let body = br#"{"upsert_columns":{"id":[1,2,3],"v":["AAAAAA==","AAAAAA==","AAAAAA=="]},"patch_rows":[{"id":9,"n":null}]}"#;
    let mut outputs = Vec::new();
    for chunk in [1, 7, 64, body.len()] {
        let mut vm = vm("{}");
        let s = send_write(&mut vm, body, chunk);
        assert!(s.reached_upstream());
        outputs.push(s.upstream_body().to_vec());
    }
    assert!(outputs.windows(2).all(|w| w[0] == w[1]));
    let v: Value = serde_json::from_slice(&outputs[0]).unwrap();
    assert_eq!(
        v["upsert_columns"]["_hevlayer_upserted_at"],
        json!([NOW_MS, NOW_MS, NOW_MS])
    );
    assert_eq!(v["patch_rows"][0]["_hevlayer_upserted_at"], json!(NOW_MS));
}

#[test]
fn every_rejection_class_is_a_local_422_and_nothing_goes_upstream() {
    let cases: &[(&[u8], &str, &str)] = &[
        (b"{\"upsert_rows\":[", "invalid_json", "request body is not valid JSON: unexpected end of input at byte 16"),
        (b"[1,2]", "invalid_json", "request body must be a JSON object, found an array at byte 0"),
        (b"{}", "no_operation", "Request must include a native Turbopuffer write operation"),
        (br#"{"upserts":[{"id":1}]}"#, "removed_key", "custom write bodies were removed; use native Turbopuffer write keys such as upsert_rows, patch_rows, patch_columns, and deletes"),
        (br#"{"upsert_rows":[{"id":1,"blobs":{}}]}"#, "removed_key", "document blob writes are no longer supported; store binary payloads externally and write an ordinary attribute with that location"),
        (br#"{"patch_rows":[{"id":1,"_hevlayer_x":1}]}"#, "reserved_attribute", "attribute '_hevlayer_x' uses the reserved _hevlayer_* prefix"),
        (br#"{"upsert_rows":[{"name":"no id"}]}"#, "shape", "upsert_rows entries must include id"),
        (br#"{"upsert_columns":{"id":[1,2],"a":[1]}}"#, "shape", "upsert_columns column 'a' has 1 values for 2 ids"),
        (br#"{"patch_by_filter":{"filters":[],"patch":{"vector":[1]}}}"#, "shape", "patch_by_filter cannot patch vector or vectors values; upsert full rows instead"),
        (br#"{"deletes":"x"}"#, "shape", "deletes must be an array"),
    ];
    for (body, reason, message) in cases {
        let mut vm = vm("{}");
        let s = send_write(&mut vm, body, 5);
        let (status, v) = reply_json(&s);
        assert_eq!(status, 422, "{}", String::from_utf8_lossy(body));
        assert_eq!(v, json!({"error": "validation_error", "message": message}));
        assert!(!s.reached_upstream(), "nothing may reach the upstream");
        assert!(s.upstream_body().is_empty());
        assert_eq!(s.counter(&format!("hevlayer.writes_rejected.{reason}")), 1);
        assert_eq!(s.counter("hevlayer.writes_accepted"), 0);
    }
}

#[test]
fn a_write_without_a_body_is_refused() {
    let mut vm = vm("{}");
    let mut s = vm.stream().unwrap();
    s.request_headers(&write_headers(&[]), true).unwrap();
    let (status, v) = reply_json(&s);
    assert_eq!((status, v["error"].as_str()), (422, Some("validation_error")));
}

#[test]
fn oversize_writes_get_413_from_the_header_and_from_the_running_size() {
    let mut vm = vm(r#"{"max_body_bytes": 64}"#);
    let mut s = vm.stream().unwrap();
    s.request_headers(&write_headers(&[("content-length", "65")]), false)
        .unwrap();
    let (status, v) = reply_json(&s);
    assert_eq!((status, v["error"].as_str()), (413, Some("payload_too_large")));
    assert_eq!(s.counter("hevlayer.payload_too_large"), 1);
    drop(s);

    let body = format!(r#"{{"upsert_rows":[{{"id":1,"text":"{}"}}]}}"#, "x".repeat(80));
    let s = send_write(&mut vm, body.as_bytes(), 16);
    assert_eq!(reply_json(&s).0, 413);
    assert!(!s.reached_upstream());
}

#[test]
fn gzip_bodies_are_decoded_and_forwarded_plain() {
    let plain = br#"{"upsert_rows":[{"id":"g","t":"zipped"}]}"#;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(plain).unwrap();
    let gz = enc.finish().unwrap();
    let mut vm = vm("{}");
    let mut s = vm.stream().unwrap();
    s.request_headers(&write_headers(&[("content-encoding", "gzip")]), false)
        .unwrap();
    s.request_body_chunked(&gz, 3).unwrap();
    assert!(s.reached_upstream(), "{:?}", s.local_reply());
    assert_eq!(s.upstream_header("content-encoding"), None);
    assert_eq!(
        upstream_json(&s)["upsert_rows"][0]["_hevlayer_upserted_at"],
        json!(NOW_MS)
    );
    assert_eq!(s.counter("hevlayer.gzip_decoded"), 1);
    drop(s);

    let mut s = vm.stream().unwrap();
    s.request_headers(&write_headers(&[("content-encoding", "gzip")]), false)
        .unwrap();
    s.request_body_chunked(b"definitely not gzip", 4).unwrap();
    assert_eq!(reply_json(&s).0, 422);
}

#[test]
fn trailers_end_the_body() {
    let mut vm = vm("{}");
    let mut s = vm.stream().unwrap();
    s.request_headers(&write_headers(&[("content-length", "31")]), false)
        .unwrap();
    assert_eq!(
        s.request_body(br#"{"patch_rows":[{"id":1,"#, false).unwrap(),
        Action::Pause
    );
    assert_eq!(s.request_body(br#""a":2}]}"#, false).unwrap(), Action::Pause);
    assert_eq!(
        s.request_trailers(&[("x-checksum", "1")]).unwrap(),
        Action::Continue
    );
    assert!(s.reached_upstream());
    assert_eq!(
        upstream_json(&s)["patch_rows"][0]["_hevlayer_upserted_at"],
        json!(NOW_MS)
    );
    // With trailers the upstream request is chunked: no content-length, stale or new.
    assert_eq!(s.upstream_header("content-length"), None);
}

#[test]
fn an_unchanged_body_keeps_its_content_length_and_a_decoded_one_gets_its_own() {
    let mut vm = vm("{}");
    let body = br#"{"deletes":[1,2]}"#;
    let mut s = vm.stream().unwrap();
    let len = body.len().to_string();
    s.request_headers(&write_headers(&[("content-length", len.as_str())]), false)
        .unwrap();
    s.request_body(body, true).unwrap();
    assert_eq!(s.upstream_body(), body);
    assert_eq!(s.upstream_header("content-length"), Some(len.as_str()));
    s.finish().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(body).unwrap();
    let gz = gz.finish().unwrap();
    let mut s = vm.stream().unwrap();
    let gz_len = gz.len().to_string();
    s.request_headers(
        &write_headers(&[("content-length", gz_len.as_str()), ("content-encoding", "gzip")]),
        false,
    )
    .unwrap();
    s.request_body(&gz, true).unwrap();
    assert_eq!(s.upstream_body(), body);
    assert_eq!(s.upstream_header("content-length"), Some(len.as_str()));
    assert_eq!(s.upstream_header("content-encoding"), None);
}

#[test]
fn passthrough_routes_are_untouched_and_not_buffered() {
    let mut vm = vm("{}");
    for (method, path) in [
        ("POST", "/v2/namespaces/ns/explain_query"),
        ("POST", "/v1/namespaces/ns/query"),
        ("GET", "/v1/namespaces"),
        ("GET", "/v2/namespaces/ns/metadata"),
    ] {
        let mut s = vm.stream().unwrap();
        let headers = [
            (":method", method),
            (":path", path),
            ("authorization", "Bearer k"),
            ("content-length", "9"),
        ];
        assert_eq!(s.request_headers(&headers, false).unwrap(), Action::Continue);
        assert_eq!(s.request_body(b"{\"a\":1.0}", true).unwrap(), Action::Continue);
        assert_eq!(s.upstream_body(), b"{\"a\":1.0}");
        assert_eq!(s.upstream_header("content-length"), Some("9"));
        s.respond(500, &[JSON], b"{\"status\":\"error\"}", "via_upstream")
            .unwrap();
        assert_eq!(s.client_status(), Some(500));
        assert_eq!(s.client_body(), b"{\"status\":\"error\"}");
    }
}

const WRITE_TIMEOUT: &str = "Turbopuffer did not answer in time; the write may or may not have applied";

#[test]
fn router_replies_become_502_and_504_json() {
    let cases = [
        (
            "upstream_reset_before_response_started{remote_connection_failure}",
            502,
            "upstream_error",
            "could not reach Turbopuffer: remote connection failure",
        ),
        (
            "upstream_reset_before_response_started{connection_failure}",
            502,
            "upstream_error",
            "could not reach Turbopuffer: connection failure",
        ),
        (
            "no_healthy_upstream",
            502,
            "upstream_error",
            "could not reach Turbopuffer: no healthy upstream",
        ),
        ("response_timeout", 504, "gateway_timeout", WRITE_TIMEOUT),
        ("upstream_response_timeout", 504, "gateway_timeout", WRITE_TIMEOUT),
        ("upstream_per_try_timeout", 504, "gateway_timeout", WRITE_TIMEOUT),
    ];
    for (details, status, kind, message) in cases {
        let mut vm = vm(WAITS_FOR_MIRROR);
        let mut s = send_write(&mut vm, br#"{"deletes":[1]}"#, 100);
        s.respond(
            503,
            &[("content-type", "text/plain")],
            b"upstream connect error",
            details,
        )
        .unwrap();
        assert_eq!(s.client_status(), Some(status), "{details}");
        assert_eq!(s.client_header("content-type"), Some("application/json"));
        let v: Value = serde_json::from_slice(s.client_body()).unwrap();
        assert_eq!(v, json!({"error": kind, "message": message}), "{details}");
        assert!(s.callouts().is_empty(), "nothing is mirrored after a failure");
        assert_eq!(s.counter(&format!("hevlayer.{kind}")), 1);
    }
}

#[test]
fn a_timeout_on_a_read_does_not_mention_a_write() {
    for (method, path, message) in [
        (
            "POST",
            "/v2/namespaces/ns/explain_query",
            "Turbopuffer did not answer in time",
        ),
        ("GET", "/v1/namespaces", "Turbopuffer did not answer in time"),
        ("DELETE", "/v2/namespaces/ns", WRITE_TIMEOUT),
    ] {
        let mut vm = vm("{}");
        let mut s = vm.stream().unwrap();
        let headers = [
            (":method", method),
            (":path", path),
            ("authorization", "Bearer k"),
        ];
        assert_eq!(s.request_headers(&headers, false).unwrap(), Action::Continue);
        s.respond(
            504,
            &[("content-type", "text/plain")],
            b"upstream request timeout",
            "response_timeout",
        )
        .unwrap();
        assert_eq!(s.client_status(), Some(504), "{method} {path}");
        let v: Value = serde_json::from_slice(s.client_body()).unwrap();
        assert_eq!(
            v,
            json!({"error": "gateway_timeout", "message": message}),
            "{method} {path}"
        );
    }
}

#[test]
fn a_router_reply_without_a_body_still_gets_the_json_envelope() {
    // Envoy's cluster_not_found and route_not_found replies carry no body text.
    let mut vm = vm("{}");
    let mut s = vm.stream().unwrap();
    let headers = [
        (":method", "GET"),
        (":path", "/v1/namespaces"),
        ("authorization", "Bearer k"),
    ];
    s.request_headers(&headers, true).unwrap();
    assert_eq!(
        s.respond(503, &[], b"", "cluster_not_found").unwrap(),
        Action::Pause
    );
    let (status, v) = reply_json(&s);
    assert_eq!(
        (status, v),
        (
            502,
            json!({"error": "upstream_error", "message": "could not reach Turbopuffer: no upstream cluster configured"})
        )
    );
    assert_eq!(s.counter("hevlayer.upstream_error"), 1);
    drop(s);

    // No route: a JSON 404, not counted as an upstream error.
    let mut s = vm.stream().unwrap();
    s.request_headers(&headers, true).unwrap();
    s.respond(404, &[], b"", "route_not_found").unwrap();
    let (status, v) = reply_json(&s);
    assert_eq!(
        (status, v),
        (
            404,
            json!({"error": "not_found", "message": "no route for this path"})
        )
    );
    assert_eq!(s.counter("hevlayer.route_not_found"), 1);
    assert_eq!(s.counter("hevlayer.upstream_error"), 1, "still only the first");
    drop(s);

    // HEAD: Envoy sends no body whatever the reply, and none may be sent; the status and
    // content type change alone.
    let mut s = vm.stream().unwrap();
    let headers = [
        (":method", "HEAD"),
        (":path", "/v1/namespaces"),
        ("authorization", "Bearer k"),
    ];
    s.request_headers(&headers, true).unwrap();
    let envoy = [("content-type", "text/plain"), ("content-length", "24")];
    assert_eq!(
        s.respond(504, &envoy, b"", "response_timeout").unwrap(),
        Action::Continue
    );
    assert!(s.local_reply().is_none());
    assert_eq!(s.client_status(), Some(504));
    assert_eq!(s.client_header("content-type"), Some("application/json"));
    assert_eq!(s.client_header("content-length"), None);
    assert!(s.client_body().is_empty());
}

#[test]
fn upstream_errors_are_relayed_verbatim() {
    let mut vm = vm("{}");
    let mut s = send_write(
        &mut vm,
        br#"{"upsert_rows":[{"id":1}],"upsert_condition":["v","Lt",1]}"#,
        100,
    );
    let body = br#"{"status":"error","error":"slow down"}"#;
    s.respond(429, &[JSON, ("retry-after", "3")], body, "via_upstream")
        .unwrap();
    assert_eq!(s.client_status(), Some(429));
    assert_eq!(s.client_header("retry-after"), Some("3"));
    assert_eq!(s.client_body(), body);
    assert!(s.callouts().is_empty());
}

#[test]
fn successful_writes_wait_for_the_mirror_and_survive_its_failure() {
    for answer in ["ok", "error", "unreachable", "reset"] {
        let mut vm = vm(WAITS_FOR_MIRROR);
        let mut s = send_write(&mut vm, br#"{"upsert_rows":[{"id":7,"a":1}]}"#, 100);
        s.response_headers(200, &[JSON], false, "via_upstream").unwrap();
        assert_eq!(
            s.response_body(br#"{"status":"OK","rows_affected":1}"#, true)
                .unwrap(),
            Action::Pause
        );
        assert!(s.client_headers().is_none(), "the response waits for the mirror");
        let call = s.callouts()[0].clone();
        assert_eq!(call.cluster, "layer_sidecar");
        assert_eq!(call.header(":path"), Some("/internal/v1/mirror"));
        assert_eq!(call.timeout_ms, 200);
        let msg: Value = serde_json::from_slice(&call.body).unwrap();
        assert_eq!(msg["namespace"], "ns");
        assert_eq!(msg["upserted_at"], json!(NOW_MS));
        assert_eq!(
            msg["write"]["upsert_rows"][0]["_hevlayer_upserted_at"],
            json!(NOW_MS)
        );
        match answer {
            "ok" => s
                .answer_callout(call.token, Some((200, &[JSON], b"{\"applied\":1}")))
                .unwrap(),
            "error" => s
                .answer_callout(
                    call.token,
                    Some((503, &[JSON], b"{\"error\":\"cache_unavailable\"}")),
                )
                .unwrap(),
            "unreachable" => s
                .answer_callout(
                    call.token,
                    Some((503, &[("content-type", "text/plain")], b"upstream connect error")),
                )
                .unwrap(),
            _ => s.answer_callout(call.token, None).unwrap(),
        }
        assert_eq!(s.client_status(), Some(200), "{answer}");
        assert_eq!(s.client_body(), br#"{"status":"OK","rows_affected":1}"#);
        let counter = if answer == "ok" {
            "hevlayer.mirror_ok"
        } else {
            "hevlayer.mirror_failed"
        };
        assert_eq!(s.counter(counter), 1, "{answer}");
    }
}

#[test]
fn a_mirror_timeout_is_counted_as_such() {
    // Envoy reports a callout that timed out as its own 504 answer (it is no failure to the
    // async client; only a reset comes without headers). Both, past the timeout, are timeouts.
    let envoy_timeout: Answer<'_> = (
        504,
        &[("content-type", "text/plain")],
        b"upstream request timeout",
    );
    for answer in [Some(envoy_timeout), None] {
        let mut vm = vm(r#"{"mirror_timeout_ms": 50, "evict_ahead_max_ids": 0}"#);
        let mut s = send_write(&mut vm, br#"{"deletes":[1]}"#, 100);
        s.respond(200, &[JSON], br#"{"status":"OK"}"#, "via_upstream")
            .unwrap();
        let token = s.callouts()[0].token;
        s.advance_ms(50);
        s.answer_callout(token, answer).unwrap();
        assert_eq!(s.client_status(), Some(200));
        assert_eq!(s.counter("hevlayer.mirror_timeout"), 1, "{answer:?}");
        assert_eq!(s.counter("hevlayer.mirror_failed"), 0, "{answer:?}");
    }
}

#[test]
fn an_unknown_sidecar_cluster_never_blocks_a_write() {
    let mut vm = vm(WAITS_FOR_MIRROR);
    vm.remove_cluster("layer_sidecar");
    let mut s = send_write(&mut vm, br#"{"deletes":[1]}"#, 100);
    s.respond(200, &[JSON], br#"{"status":"OK"}"#, "via_upstream")
        .unwrap();
    assert_eq!(s.client_status(), Some(200));
    assert_eq!(s.counter("hevlayer.callout_dispatch_failed"), 1);
}

#[test]
fn affected_ids_are_requested_and_stripped_unless_asked_for() {
    let mut vm = vm("{}");
    let mut s = send_write(&mut vm, br#"{"delete_by_filter":["a","Eq",1]}"#, 100);
    assert_eq!(upstream_json(&s)["return_affected_ids"], json!(true));
    let upstream = br#"{"status":"OK","rows_affected":2,"deleted_ids":[4,5],"billing":{}}"#;
    s.respond(200, &[JSON, ("content-length", "66")], upstream, "via_upstream")
        .unwrap();
    let call = s.callouts()[0].clone();
    let msg: Value = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(msg["response"]["deleted_ids"], json!([4, 5]));
    s.answer_callout(call.token, Some((200, &[JSON], b"{\"applied\":2}")))
        .unwrap();
    assert_eq!(
        s.client_body(),
        br#"{"status":"OK","rows_affected":2,"billing":{}}"#
    );
    assert_eq!(s.client_header("content-length"), None);
    assert_eq!(s.counter("hevlayer.affected_ids_stripped"), 1);
    drop(s);

    let mut s = send_write(
        &mut vm,
        br#"{"patch_by_filter":{"filters":[],"patch":{"x":1}},"return_affected_ids":true}"#,
        100,
    );
    let upstream = br#"{"status":"OK","patched_ids":[1]}"#;
    s.respond(200, &[JSON], upstream, "via_upstream").unwrap();
    let token = s.callouts()[0].token;
    s.answer_callout(token, Some((200, &[JSON], b"{}"))).unwrap();
    assert_eq!(s.client_body(), upstream);
}

#[test]
fn every_path_needs_a_key_and_keys_mode_never_forwards_it() {
    let config = format!(
        r#"{{"auth_mode":"keys","upstream_api_key":"tpuf_upstream","keys":[
            {{"name":"r","sha256":"{}","scope":"read"}}]}}"#,
        sha256_hex(b"read-key")
    );
    let mut vm = vm(&config);
    // Envoy routes every path to Turbopuffer, not only /v1 and /v2.
    for path in ["/healthz", "/", "/v3/namespaces", "//v1/../internal"] {
        let mut s = vm.stream().unwrap();
        let headers = [
            (":method", "GET"),
            (":path", path),
            ("authorization", "Bearer read-key"),
        ];
        assert_eq!(s.request_headers(&headers, true).unwrap(), Action::Continue);
        assert!(s.reached_upstream(), "{path}");
        assert_eq!(
            s.upstream_header("authorization"),
            Some("Bearer tpuf_upstream"),
            "{path}"
        );
        assert_eq!(s.upstream_header(":path"), Some(path));
        drop(s);

        let mut s = vm.stream().unwrap();
        s.request_headers(&[(":method", "GET"), (":path", path)], true)
            .unwrap();
        assert_eq!(reply_json(&s).0, 401, "{path}");
        assert!(!s.reached_upstream());
    }
    let mut s = vm.stream().unwrap();
    let headers = [
        (":method", "POST"),
        (":path", "/healthz"),
        ("authorization", "Bearer read-key"),
    ];
    s.request_headers(&headers, true).unwrap();
    let (status, v) = reply_json(&s);
    assert_eq!((status, v["required_scope"].as_str()), (403, Some("write")));
    drop(s);

    // Passthrough mode needs a bearer there too.
    let mut passthrough = self::vm("{}");
    let mut s = passthrough.stream().unwrap();
    s.request_headers(&[(":method", "GET"), (":path", "/healthz")], true)
        .unwrap();
    assert_eq!(reply_json(&s).0, 401);
}

#[test]
fn unnormalised_write_paths_are_validated_and_stamped_and_forwarded_as_sent() {
    for path in [
        "/v2/namespaces/ns/",
        "//v2/namespaces/ns",
        "//v2//namespaces//ns//?x=1",
        "/v2/./namespaces/tmp/../ns",
    ] {
        let mut vm = vm(WAITS_FOR_MIRROR);
        let mut s = vm.stream().unwrap();
        let headers = [
            (":method", "POST"),
            (":path", path),
            ("authorization", "Bearer k"),
        ];
        assert_eq!(
            s.request_headers(&headers, false).unwrap(),
            Action::Pause,
            "{path}"
        );
        s.request_body_chunked(br#"{"upsert_rows":[{"id":1}]}"#, 5)
            .unwrap();
        assert!(s.reached_upstream(), "{path}");
        assert_eq!(s.upstream_header(":path"), Some(path));
        assert_eq!(
            upstream_json(&s)["upsert_rows"][0]["_hevlayer_upserted_at"],
            json!(NOW_MS),
            "{path}"
        );
        s.respond(200, &[JSON], br#"{"status":"OK"}"#, "via_upstream")
            .unwrap();
        let msg: Value = serde_json::from_slice(&s.callouts()[0].body).unwrap();
        assert_eq!(msg["namespace"], "ns", "{path}");
        drop(s);

        let mut s = vm.stream().unwrap();
        s.request_headers(&headers, false).unwrap();
        s.request_body(b"{}", true).unwrap();
        assert_eq!(reply_json(&s).0, 422, "{path}");
        assert!(!s.reached_upstream());
    }
}

#[test]
fn keys_mode_checks_scopes_and_swaps_in_the_upstream_key() {
    let config = format!(
        r#"{{"auth_mode":"keys","upstream_api_key":"tpuf_upstream","keys":[
            {{"name":"w","sha256":"{}","scope":"write"}},
            {{"name":"r","sha256":"{}","scope":"read"}}]}}"#,
        sha256_hex(b"write-key"),
        sha256_hex(b"read-key")
    );
    let mut vm = vm(&config);

    let mut s = vm.stream().unwrap();
    let headers = [
        (":method", "POST"),
        (":path", "/v2/namespaces/ns"),
        ("authorization", "Bearer write-key"),
    ];
    s.request_headers(&headers, false).unwrap();
    s.request_body(br#"{"deletes":[1]}"#, true).unwrap();
    assert!(s.reached_upstream());
    assert_eq!(s.upstream_header("authorization"), Some("Bearer tpuf_upstream"));
    drop(s);

    let mut s = vm.stream().unwrap();
    let headers = [
        (":method", "POST"),
        (":path", "/v2/namespaces/ns"),
        ("authorization", "Bearer read-key"),
    ];
    s.request_headers(&headers, false).unwrap();
    let (status, v) = reply_json(&s);
    assert_eq!(
        (status, v["error"].as_str(), v["required_scope"].as_str()),
        (403, Some("forbidden"), Some("write"))
    );
    drop(s);

    let mut s = vm.stream().unwrap();
    let headers = [
        (":method", "POST"),
        (":path", "/v2/namespaces/ns/query"),
        ("authorization", "Bearer nope"),
    ];
    s.request_headers(&headers, false).unwrap();
    assert_eq!(reply_json(&s).0, 403);
    drop(s);

    let mut s = vm.stream().unwrap();
    s.request_headers(&[(":method", "GET"), (":path", "/v1/namespaces")], true)
        .unwrap();
    let (status, v) = reply_json(&s);
    assert_eq!((status, v["error"].as_str()), (401, Some("unauthorized")));
    assert_eq!(s.counter("hevlayer.auth_forbidden"), 2);
    assert_eq!(s.counter("hevlayer.auth_unauthorized"), 1);
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn pipeline_routes_are_answered_by_the_sidecar() {
    let mut vm = vm("{}");
    let mut s = vm.stream().unwrap();
    let headers = [
        (":method", "PUT"),
        (":path", "/v2/pipelines/p1/documents/d%201"),
        ("authorization", "Bearer k"),
        JSON,
    ];
    assert_eq!(s.request_headers(&headers, false).unwrap(), Action::Pause);
    s.request_body(br#"{"chunks":[{"id":"c1","text":"hi"}]}"#, true)
        .unwrap();
    let call = s.callouts()[0].clone();
    assert_eq!(call.header(":method"), Some("PUT"));
    assert_eq!(call.header(":path"), Some("/v2/pipelines/p1/documents/d%201"));
    assert_eq!(call.header("authorization"), Some("Bearer k"));
    assert_eq!(call.body, br#"{"chunks":[{"id":"c1","text":"hi"}]}"#);
    assert!(!s.reached_upstream(), "pipeline routes never go to Turbopuffer");
    let answer =
        br#"{"pipeline_id":"p1","document_id":"d 1","stage":"pending","chunk_count":1,"chunk_ids":["c1"]}"#;
    s.answer_callout(call.token, Some((200, &[JSON], answer)))
        .unwrap();
    let reply = s.local_reply().unwrap();
    assert_eq!((reply.status, reply.body.as_slice()), (200, answer.as_slice()));
    drop(s);

    // Sidecar down: Envoy answers the call itself (plain text) or the call fails.
    for failure in [Some((503u16, "text/plain")), None] {
        let mut s = vm.stream().unwrap();
        s.request_headers(
            &[
                (":method", "GET"),
                (":path", "/v2/pipelines"),
                ("authorization", "Bearer k"),
            ],
            true,
        )
        .unwrap();
        let token = s.callouts()[0].token;
        match failure {
            Some((status, ct)) => s
                .answer_callout(
                    token,
                    Some((status, &[("content-type", ct)], b"upstream connect error")),
                )
                .unwrap(),
            None => s.answer_callout(token, None).unwrap(),
        }
        let (status, v) = reply_json(&s);
        assert_eq!((status, v["error"].as_str()), (503, Some("cache_unavailable")));
    }
}

#[test]
fn a_relayed_turbopuffer_error_keeps_the_headers_a_client_acts_on() {
    let mut vm = vm("{}");
    let mut s = vm.stream().unwrap();
    let headers = [
        (":method", "PUT"),
        (":path", "/v2/pipelines/p1/documents/d1/vectors"),
        ("authorization", "Bearer k"),
        JSON,
    ];
    s.request_headers(&headers, false).unwrap();
    s.request_body(br#"{"vectors":[{"id":"c1","vector":[0.5]}]}"#, true)
        .unwrap();
    let token = s.callouts()[0].token;
    // What the sidecar relays from Turbopuffer's 429 on the pipeline's write.
    let relayed = [
        JSON,
        ("retry-after", "2"),
        ("retry-after-ms", "1500"),
        ("x-request-id", "tpuf-9f2c"),
        ("x-should-retry", "true"),
    ];
    let mut answer = relayed.to_vec();
    answer.push(("server", "sidecar"));
    let body = br#"{"status":"error","error":"too many requests"}"#;
    s.answer_callout(token, Some((429, &answer, body))).unwrap();
    let reply = s.local_reply().unwrap();
    assert_eq!((reply.status, reply.body.as_slice()), (429, body.as_slice()));
    for (name, value) in relayed {
        assert_eq!(reply.header(name), Some(value), "{name}");
    }
    assert_eq!(reply.header("server"), None);
}

#[test]
fn document_fetch_goes_to_the_sidecar_with_its_cache_header() {
    let mut vm = vm("{}");
    let mut s = vm.stream().unwrap();
    s.request_headers(
        &[
            (":method", "GET"),
            (":path", "/v2/namespaces/ns/documents/42"),
            ("authorization", "Bearer k"),
        ],
        true,
    )
    .unwrap();
    let token = s.callouts()[0].token;
    s.answer_callout(
        token,
        Some((
            200,
            &[JSON, ("x-layer-cache", "hit")],
            br#"{"id":42,"attributes":{}}"#,
        )),
    )
    .unwrap();
    let reply = s.local_reply().unwrap();
    assert_eq!(reply.header("x-layer-cache"), Some("hit"));
}

#[test]
fn namespace_delete_purges_after_success() {
    let mut vm = vm("{}");
    let mut s = vm.stream().unwrap();
    let headers = [
        (":method", "DELETE"),
        (":path", "/v2/namespaces/gone"),
        ("authorization", "Bearer k"),
    ];
    assert_eq!(s.request_headers(&headers, true).unwrap(), Action::Continue);
    assert_eq!(
        s.respond(200, &[JSON], br#"{"status":"ok"}"#, "via_upstream")
            .unwrap(),
        Action::Pause
    );
    let call = s.callouts()[0].clone();
    assert_eq!(call.header(":path"), Some("/internal/v1/purge"));
    assert_eq!(
        serde_json::from_slice::<Value>(&call.body).unwrap(),
        json!({"namespace": "gone"})
    );
    s.answer_callout(call.token, Some((200, &[JSON], b"{\"applied\":0}")))
        .unwrap();
    assert_eq!(s.client_status(), Some(200));
    assert_eq!(s.counter("hevlayer.purge_ok"), 1);
}

#[test]
fn a_bad_configuration_fails_configure() {
    for bad in [
        r#"{"unknown":true}"#,
        r#"{"auth_mode":"keys"}"#,
        r#"{"max_body_bytes":0}"#,
        "not json",
    ] {
        assert!(filter().unwrap().start(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_client_request_id_is_kept() {
    let mut vm = vm("{}");
    let mut s = vm.stream().unwrap();
    s.request_headers(&write_headers(&[("x-request-id", "client-id-1")]), false)
        .unwrap();
    s.request_body(br#"{"deletes":[1]}"#, true).unwrap();
    assert_eq!(s.upstream_header("x-request-id"), Some("client-id-1"));
}

#[test]
fn memory_does_not_grow_across_requests() {
    let mut vm = vm(WAITS_FOR_MIRROR);
    let body = format!(
        r#"{{"upsert_rows":[{}]}}"#,
        (0..200)
            .map(|i| format!(r#"{{"id":{i},"vector":[0.1,0.2,0.3,0.4],"t":"row {i}"}}"#))
            .collect::<Vec<_>>()
            .join(",")
    );
    let run = |vm: &mut Vm| {
        let mut s = send_write(vm, body.as_bytes(), 4096);
        s.respond(200, &[JSON], br#"{"status":"OK"}"#, "via_upstream")
            .unwrap();
        let token = s.callouts()[0].token;
        s.answer_callout(token, Some((200, &[JSON], b"{}"))).unwrap();
        s.finish().unwrap();
    };
    for _ in 0..10 {
        run(&mut vm);
    }
    let after_10 = vm.memory_bytes();
    for _ in 0..200 {
        run(&mut vm);
    }
    assert_eq!(vm.memory_bytes(), after_10);
}

#[test]
fn passthrough_mode_needs_a_bearer_and_forwards_it_unchanged() {
    let mut vm = vm("{}");
    let bad: &[Option<&str>] = &[
        None,
        Some("Basic abc"),
        Some("bearer abc"),
        Some("Bearer "),
        Some("Bearer"),
    ];
    for auth in bad {
        let mut s = vm.stream().unwrap();
        let mut headers = vec![(":method", "POST"), (":path", "/v2/namespaces/ns/query")];
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        s.request_headers(&headers, false).unwrap();
        let (status, v) = reply_json(&s);
        assert_eq!(
            v,
            json!({"error": "unauthorized", "message": "missing or malformed Authorization: Bearer header"}),
            "{auth:?}"
        );
        assert_eq!(status, 401, "{auth:?}");
        assert!(!s.reached_upstream());
    }

    let mut s = vm.stream().unwrap();
    let headers = [
        (":method", "POST"),
        (":path", "/v2/namespaces/ns/explain_query"),
        ("authorization", "Bearer caller-key"),
    ];
    assert_eq!(s.request_headers(&headers, false).unwrap(), Action::Continue);
    assert!(s.local_reply().is_none());
    assert_eq!(s.upstream_header("authorization"), Some("Bearer caller-key"));
}

#[test]
fn client_stamps_are_replaced_and_every_stamped_op_gets_the_same_value() {
    let body = br#"{"upsert_rows":[{"id":1,"_hevlayer_upserted_at":5,"_hevlayer_shard":"s"}],"patch_columns":{"id":["a","b"],"x":[1,2]},"patch_by_filter":{"filters":["id","Eq",1],"patch":{"y":2}},"deletes":[7]}"#;
    for chunk in [1, body.len()] {
        let mut vm = vm("{}");
        let s = send_write(&mut vm, body, chunk);
        assert!(s.reached_upstream(), "{:?}", s.local_reply());
        let v = upstream_json(&s);
        assert_eq!(v["upsert_rows"][0]["_hevlayer_upserted_at"], json!(NOW_MS));
        assert_eq!(v["upsert_rows"][0]["id"], json!(1));
        assert_eq!(
            v["patch_columns"]["_hevlayer_upserted_at"],
            json!([NOW_MS, NOW_MS])
        );
        assert_eq!(
            v["patch_by_filter"]["patch"]["_hevlayer_upserted_at"],
            json!(NOW_MS)
        );
        assert_eq!(v["patch_by_filter"]["patch"]["y"], json!(2));
        assert_eq!(v["deletes"], json!([7]));
        // A filter write asks for the affected ids.
        assert_eq!(v["return_affected_ids"], json!(true));
        let text = String::from_utf8_lossy(s.upstream_body());
        assert_eq!(text.matches("_hevlayer_upserted_at").count(), 3, "{text}");
    }
}

// ---- reads by the stamp ----

fn query_headers(path: &str) -> Vec<(&str, &str)> {
    vec![
        (":method", "POST"),
        (":path", path),
        (":authority", "gateway"),
        ("authorization", "Bearer tpuf_key"),
        JSON,
    ]
}

fn send_query<'v>(vm: &'v mut Vm, body: &[u8], chunk: usize) -> Stream<'v> {
    let mut s = vm.stream().unwrap();
    assert_eq!(
        s.request_headers(&query_headers("/v2/namespaces/ns/query"), false)
            .unwrap(),
        Action::Pause
    );
    s.request_body_chunked(body, chunk).unwrap();
    s
}

/// Runs one tick and answers the registration it sends with `watermarks`; returns what the
/// filter registered.
fn refresh(vm: &mut Vm, watermarks: Value) -> Value {
    let before = vm.root_callouts().len();
    vm.tick().unwrap();
    let calls = vm.root_callouts()[before..].to_vec();
    assert_eq!(calls.len(), 1, "one registration per tick");
    let call = &calls[0];
    assert_eq!(call.cluster, "layer_sidecar");
    assert_eq!(call.header(":path"), Some("/internal/v1/watermarks"));
    assert_eq!(call.header(":method"), Some("POST"));
    let answer = serde_json::to_vec(&json!({ "watermarks": watermarks })).unwrap();
    vm.answer_callout(call.token, Some((200, &[JSON], &answer)))
        .unwrap();
    serde_json::from_slice(&call.body).unwrap()
}

#[test]
fn a_query_with_as_of_reaches_turbopuffer_with_the_predicate_and_nothing_else_changed() {
    let body = br#"{"rank_by": ["id", "asc"], "top_k": 5, "as_of": 1795000000000, "include_attributes": ["_hevlayer_upserted_at"]}"#;
    let mut outputs = Vec::new();
    for chunk in [1, 9, body.len()] {
        let mut vm = vm("{}");
        let s = send_query(&mut vm, body, chunk);
        assert!(s.reached_upstream(), "{:?}", s.local_reply());
        assert_eq!(
            s.upstream_header("content-length"),
            Some(s.upstream_body().len().to_string().as_str())
        );
        assert_eq!(s.counter("hevlayer.queries_rewritten.temporal"), 1);
        outputs.push(s.upstream_body().to_vec());
    }
    assert!(outputs.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(
        String::from_utf8_lossy(&outputs[0]),
        r#"{"filters":["_hevlayer_upserted_at","Lte",1795000000000],"rank_by": ["id", "asc"], "top_k": 5, "include_attributes": ["_hevlayer_upserted_at"]}"#
    );
}

/// With `counter_batch` above 1, increments are added up in the VM and recorded when that many
/// are pending, or at the root context's next tick; nothing is lost or counted twice.
#[test]
fn counters_are_added_up_and_recorded_by_the_batch_or_at_the_tick() {
    let body = br#"{"top_k": 1, "as_of": 5}"#;
    let temporal = "hevlayer.queries_rewritten.temporal";
    let unknown = "hevlayer.queries_without_watermark";
    // Each query counts two increments (a temporal rewrite, no watermark known).
    let mut vm = lingering_vm(r#"{"counter_batch":1000}"#);
    for _ in 0..3 {
        let mut s = send_query(&mut vm, body, body.len());
        s.respond(200, &[JSON], b"{}", "via_upstream").unwrap();
        s.finish().unwrap();
    }
    assert_eq!(vm.counter(temporal), 0, "pending until the tick");
    vm.tick().unwrap();
    assert_eq!((vm.counter(temporal), vm.counter(unknown)), (3, 3));
    vm.tick().unwrap();
    assert_eq!(vm.counter(temporal), 3, "recorded once");

    let mut vm = lingering_vm(r#"{"counter_batch":4}"#);
    for (query, recorded) in [(1, 0), (2, 2), (3, 2), (4, 4)] {
        let mut s = send_query(&mut vm, body, body.len());
        s.respond(200, &[JSON], b"{}", "via_upstream").unwrap();
        s.finish().unwrap();
        assert_eq!(vm.counter(temporal), recorded, "after query {query}");
        assert_eq!(vm.counter(unknown), recorded, "after query {query}");
    }

    // A VM going away (a new configuration, Envoy draining) records what it added up.
    let mut vm = lingering_vm(r#"{"counter_batch":1000}"#);
    let mut s = send_query(&mut vm, body, body.len());
    s.respond(200, &[JSON], b"{}", "via_upstream").unwrap();
    s.finish().unwrap();
    assert_eq!(vm.counter(temporal), 0);
    assert!(vm.shut_down().unwrap(), "done at once");
    assert_eq!((vm.counter(temporal), vm.counter(unknown)), (1, 1));
}

/// Every crossing between Envoy and the module costs far more in Envoy's V8 than its work here
/// (README, Benchmarks): a rewritten query with the `x-request-id` Envoy adds makes five
/// hostcalls (the request headers, its body, the new body, its length, the response status) and
/// Envoy calls in eleven times (eight callbacks, three allocations for what the hostcalls
/// return). More is a regression. Without an `x-request-id` the filter makes one (a random
/// number from the host) and sets it: two more.
#[test]
fn a_rewritten_query_crosses_between_envoy_and_the_module_no_more_than_it_must() {
    let body = br#"{"top_k": 1, "as_of": 5}"#;
    let mut vm = filter().unwrap().start("{}").unwrap();
    vm.set_time_ms(NOW_MS);
    vm.count_crossings();
    let mut per_query = Vec::new();
    for _ in 0..3 {
        let before = vm.crossings();
        let mut s = vm.stream().unwrap();
        let mut headers = query_headers("/v2/namespaces/ns/query");
        headers.push(("x-request-id", "7f0c"));
        assert_eq!(s.request_headers(&headers, false).unwrap(), Action::Pause);
        s.request_body(body, true).unwrap();
        let sent = String::from_utf8_lossy(s.upstream_body()).into_owned();
        assert!(
            sent.contains(r#"["_hevlayer_upserted_at","Lte",5]"#),
            "rewritten: {sent}"
        );
        s.respond(200, &[JSON], b"{}", "via_upstream").unwrap();
        s.finish().unwrap();
        let after = vm.crossings();
        per_query.push((
            after.into_host - before.into_host,
            after.into_module - before.into_module,
        ));
    }
    // The first query also registers the namespace's tracking; the others are the steady state.
    assert_eq!(
        per_query[1..],
        [(5, 11), (5, 11)],
        "hostcalls, calls into the module"
    );

    let before = vm.crossings();
    let mut s = send_query(&mut vm, body, body.len());
    s.respond(200, &[JSON], b"{}", "via_upstream").unwrap();
    s.finish().unwrap();
    let after = vm.crossings();
    assert_eq!(
        after.into_host - before.into_host,
        7,
        "no x-request-id: two hostcalls more"
    );
}

#[test]
fn a_bad_temporal_field_is_a_local_422() {
    let mut vm = vm("{}");
    let s = send_query(&mut vm, br#"{"top_k":1,"between":[9,3]}"#, 4);
    let (status, v) = reply_json(&s);
    assert_eq!(status, 422);
    assert_eq!(
        v,
        json!({"error": "validation_error", "message": "between lower bound 9 is greater than its upper bound 3"})
    );
    assert!(!s.reached_upstream());
    assert_eq!(s.counter("hevlayer.reads_rejected.bad_field"), 1);
}

#[test]
fn watermarks_come_from_the_sidecar_on_a_timer_and_apply_without_a_callout_per_query() {
    let mut vm = vm("{}");
    assert_eq!(vm.tick_period_ms(), 500);
    // Nothing tracked yet: a tick sends nothing.
    vm.tick().unwrap();
    assert!(vm.root_callouts().is_empty());

    // A query before any watermark is known: no header, no predicate, and its namespace is tracked.
    let eventual = br#"{"consistency":{"level":"eventual"},"top_k":1}"#;
    let mut s = send_query(&mut vm, eventual, 100);
    assert_eq!(s.upstream_body(), eventual);
    assert!(s.callouts().is_empty(), "a query never calls out");
    s.respond(200, &[JSON], br#"{"rows":[]}"#, "via_upstream")
        .unwrap();
    assert_eq!(s.client_header("x-layer-stable-as-of"), None);
    assert_eq!(s.counter("hevlayer.queries_without_watermark"), 1);
    s.finish().unwrap();
    // A successful write marks its namespace written.
    let mut s = send_write(&mut vm, br#"{"deletes":[1]}"#, 100);
    s.respond(200, &[JSON], br#"{"status":"OK"}"#, "via_upstream")
        .unwrap();
    let mirror = s.callouts()[0].token;
    s.answer_callout(mirror, Some((200, &[JSON], br#"{"applied":1}"#)))
        .unwrap();
    s.finish().unwrap();
    let mut s = vm.stream().unwrap();
    let mut h = write_headers(&[]);
    h[1] = (":path", "/v2/namespaces/other");
    s.request_headers(&h, false).unwrap();
    s.request_body(br#"{"deletes":[1]}"#, true).unwrap();
    s.respond(200, &[JSON], br#"{"status":"OK"}"#, "via_upstream")
        .unwrap();
    let mirror = s.callouts()[0].token;
    s.answer_callout(mirror, Some((200, &[JSON], br#"{"applied":1}"#)))
        .unwrap();
    s.finish().unwrap();

    let registered = refresh(
        &mut vm,
        json!([{"namespace": "ns", "watermark": 1795000000000u64, "updating": true},
               {"namespace": "other", "watermark": null, "updating": false}]),
    );
    assert_eq!(
        registered,
        json!({"namespaces": [
            {"namespace": "ns", "written": true, "authorization": "Bearer tpuf_key"},
            {"namespace": "other", "written": true, "authorization": "Bearer tpuf_key"}
        ]})
    );
    assert_eq!(vm.counter("hevlayer.watermark_refresh_ok"), 1);
    assert_eq!(vm.counter("hevlayer.watermark_namespaces"), 2);
    assert_eq!(
        vm.shared_data("hevlayer.watermark:ns"),
        Some(format!("1795000000000,1,{NOW_MS}").as_bytes())
    );
    assert_eq!(vm.shared_data("hevlayer.watermark:other"), Some(&b""[..]));

    // Now an eventual query of the updating namespace is bounded and reports the watermark.
    let mut s = send_query(&mut vm, eventual, 100);
    assert_eq!(
        String::from_utf8_lossy(s.upstream_body()),
        r#"{"filters":["_hevlayer_upserted_at","Lte",1795000000000],"consistency":{"level":"eventual"},"top_k":1}"#
    );
    s.respond(200, &[JSON], br#"{"rows":[]}"#, "via_upstream")
        .unwrap();
    assert_eq!(s.client_header("x-layer-stable-as-of"), Some("1795000000000"));
    assert_eq!(s.counter("hevlayer.queries_rewritten.watermark"), 1);
    s.finish().unwrap();
    // A strong one goes on as sent, with the header.
    let mut s = send_query(&mut vm, br#"{"top_k":1}"#, 100);
    assert_eq!(s.upstream_body(), br#"{"top_k":1}"#);
    s.respond(200, &[JSON], br#"{"rows":[]}"#, "via_upstream")
        .unwrap();
    assert_eq!(s.client_header("x-layer-stable-as-of"), Some("1795000000000"));
    s.finish().unwrap();

    // The acknowledged registration carried the writes and keys: the next one carries only
    // what requests used since (the two queries of "ns", with their key).
    let registered = refresh(
        &mut vm,
        json!([{"namespace": "ns", "watermark": 1795000000400u64, "updating": false}]),
    );
    assert_eq!(
        registered,
        json!({"namespaces": [
            {"namespace": "ns", "written": false, "authorization": "Bearer tpuf_key"},
            {"namespace": "other", "written": false}
        ]})
    );

    // When the sidecar stops answering, the copy goes stale and is not used.
    vm.set_time_ms(NOW_MS + 5_001);
    vm.tick().unwrap();
    let token = vm.root_callouts().last().unwrap().token;
    vm.answer_callout(
        token,
        Some((503, &[("content-type", "text/plain")], b"no healthy upstream")),
    )
    .unwrap();
    assert_eq!(vm.counter("hevlayer.watermark_refresh_failed"), 1);
    let mut s = send_query(&mut vm, eventual, 100);
    assert_eq!(s.upstream_body(), eventual);
    s.respond(200, &[JSON], br#"{"rows":[]}"#, "via_upstream")
        .unwrap();
    assert_eq!(s.client_header("x-layer-stable-as-of"), None);
}

#[test]
fn with_the_watermark_off_nothing_is_registered() {
    let mut vm = vm(r#"{"read_watermark":"off"}"#);
    // The timer still runs: it sends evictions when a mirror fails.
    assert_eq!(vm.tick_period_ms(), 500);
    let mut s = send_query(&mut vm, br#"{"as_of":5}"#, 100);
    assert_eq!(
        s.upstream_body(),
        br#"{"filters":["_hevlayer_upserted_at","Lte",5]}"#
    );
    s.respond(200, &[JSON], br#"{"rows":[]}"#, "via_upstream")
        .unwrap();
    s.finish().unwrap();
    vm.tick().unwrap();
    assert!(vm.root_callouts().is_empty());
}

// ---- the fence ----

fn fetch_callout(vm: &mut Vm, namespace: &str) -> (Option<String>, i64) {
    let mut s = vm.stream().unwrap();
    let path = format!("/v2/namespaces/{namespace}/documents/a");
    s.request_headers(
        &[
            (":method", "GET"),
            (":path", &path),
            ("authorization", "Bearer k"),
        ],
        true,
    )
    .unwrap();
    let call = s.callouts()[0].clone();
    let bypass = call.header("x-hevlayer-cache-bypass").map(str::to_owned);
    let token = call.token;
    s.answer_callout(token, Some((200, &[JSON], br#"{"id":"a","attributes":{}}"#)))
        .unwrap();
    (bypass, s.counter("hevlayer.fetches_bypassed"))
}

#[test]
fn a_failed_mirror_is_fenced_until_the_sidecar_evicts_it() {
    let mut vm = vm(r#"{"read_watermark":"off","evict_ahead_max_ids":0}"#);
    let mut s = send_write(
        &mut vm,
        br#"{"upsert_rows":[{"id":"a","t":1},{"id":2,"t":2}]}"#,
        100,
    );
    s.respond(200, &[JSON], br#"{"status":"OK"}"#, "via_upstream")
        .unwrap();
    let mirror = s.callouts()[0].token;
    s.answer_callout(
        mirror,
        Some((503, &[("content-type", "text/plain")], b"no healthy upstream")),
    )
    .unwrap();
    assert_eq!(s.client_status(), Some(200), "the write succeeded all the same");
    s.finish().unwrap();
    assert_eq!(vm.counter("hevlayer.mirror_failed"), 1);
    assert_eq!(vm.counter("hevlayer.evictions_pending"), 1);
    assert_eq!(vm.shared_data("hevlayer.fence:ns"), Some(&b"1"[..]));

    // Meanwhile fetches of the namespace bypass the cache; other namespaces do not.
    assert_eq!(fetch_callout(&mut vm, "ns"), (Some("1".to_owned()), 1));
    assert_eq!(fetch_callout(&mut vm, "elsewhere").0, None);

    // The timer sends the eviction; a failure is retried after a backoff.
    vm.tick().unwrap();
    let call = vm.root_callouts().last().unwrap().clone();
    assert_eq!(call.header(":path"), Some("/internal/v1/evict"));
    let body: Value = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(
        body,
        json!({"fences": [{"namespace": "ns", "ids": ["a", 2], "stamp": NOW_MS}]})
    );
    vm.answer_callout(
        call.token,
        Some((503, &[("content-type", "text/plain")], b"down")),
    )
    .unwrap();
    assert_eq!(vm.counter("hevlayer.evictions_retried"), 1);
    let sent = vm.root_callouts().len();
    vm.tick().unwrap();
    assert_eq!(vm.root_callouts().len(), sent, "backing off");
    vm.set_time_ms(NOW_MS + 1_000);
    vm.tick().unwrap();
    let retry = vm.root_callouts().last().unwrap().clone();
    assert_eq!(retry.body, call.body);
    vm.answer_callout(retry.token, Some((200, &[JSON], br#"{"applied":2}"#)))
        .unwrap();
    assert_eq!(vm.counter("hevlayer.evictions_acknowledged"), 1);
    assert_eq!(vm.counter("hevlayer.evictions_pending"), 0);
    assert_eq!(vm.shared_data("hevlayer.fence:ns"), Some(&b"0"[..]));
    assert_eq!(
        fetch_callout(&mut vm, "ns").0,
        None,
        "evicted: the cache serves again"
    );
    vm.tick().unwrap();
    assert_eq!(vm.root_callouts().len(), sent + 1, "nothing left to send");
}

#[test]
fn every_accepted_write_ends_in_one_mirror_outcome() {
    let mut vm = vm(r#"{"read_watermark":"off","evict_ahead_max_ids":0}"#);
    // Mirrored.
    let mut s = send_write(&mut vm, br#"{"deletes":[1]}"#, 100);
    s.respond(200, &[JSON], br#"{"status":"OK"}"#, "via_upstream")
        .unwrap();
    let t = s.callouts()[0].token;
    s.answer_callout(t, Some((200, &[JSON], br#"{"applied":1}"#)))
        .unwrap();
    s.finish().unwrap();
    // Refused by Turbopuffer.
    let mut s = send_write(&mut vm, br#"{"deletes":[1]}"#, 100);
    s.respond(429, &[JSON], br#"{"status":"error"}"#, "via_upstream")
        .unwrap();
    s.finish().unwrap();
    // The client hung up after its body went upstream: fenced.
    let s = send_write(&mut vm, br#"{"patch_rows":[{"id":9,"x":1}]}"#, 100);
    assert!(s.reached_upstream());
    s.finish().unwrap();
    // Envoy's 504: Turbopuffer did not answer in time; fenced.
    let mut s = send_write(&mut vm, br#"{"deletes":[3]}"#, 100);
    s.respond(
        504,
        &[("content-type", "text/plain")],
        b"upstream request timeout",
        "response_timeout",
    )
    .unwrap();
    s.finish().unwrap();
    // Rejected: never accepted.
    let s = send_write(&mut vm, b"{}", 100);
    s.finish().unwrap();
    assert_eq!(vm.counter("hevlayer.writes_accepted"), 4);
    assert_eq!(mirror_outcomes(&vm), 4);
    assert_eq!(
        (
            vm.counter("hevlayer.mirror_ok"),
            vm.counter("hevlayer.mirror_skipped"),
            vm.counter("hevlayer.writes_unanswered")
        ),
        (1, 1, 2)
    );
    assert_eq!(
        vm.counter("hevlayer.evictions_pending"),
        1,
        "one namespace, two writes"
    );
    vm.tick().unwrap();
    let body: Value = serde_json::from_slice(&vm.root_callouts().last().unwrap().body).unwrap();
    assert_eq!(body["fences"][0]["ids"], json!([3, 9]));
}

#[test]
fn a_request_body_the_host_will_not_hand_over_is_a_500_and_nothing_goes_upstream() {
    let body = br#"{"upsert_rows":[{"id":1,"a":1}]}"#;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(body).unwrap();
    let gzipped = gz.finish().unwrap();
    for (encoding, wire) in [(None, body.to_vec()), (Some("gzip"), gzipped)] {
        let mut vm = vm("{}");
        vm.refuse_reads(Body::Request);
        let mut s = vm.stream().unwrap();
        let extra: Vec<(&str, &str)> = encoding.map(|e| ("content-encoding", e)).into_iter().collect();
        s.request_headers(&write_headers(&extra), false).unwrap();
        s.request_body_chunked(&wire, 8).unwrap();
        let (status, json) = reply_json(&s);
        assert_eq!(status, 500, "{encoding:?}");
        assert_eq!(json["error"], "internal_error");
        assert!(!s.reached_upstream(), "{encoding:?}");
        assert_eq!(s.counter("hevlayer.body_read_failed"), 1);
        assert_eq!(s.counter("hevlayer.writes_accepted"), 0);
    }
}

#[test]
fn a_body_the_host_will_not_replace_is_a_500_and_never_goes_upstream_unstamped() {
    let mut vm = vm("{}");
    vm.refuse_writes(Body::Request);
    let s = send_write(&mut vm, br#"{"upsert_rows":[{"id":1,"a":1}]}"#, 100);
    let (status, json) = reply_json(&s);
    assert_eq!(status, 500);
    assert_eq!(json["error"], "internal_error");
    assert!(!s.reached_upstream());
    assert_eq!(s.counter("hevlayer.body_replace_failed"), 1);
}

#[test]
fn a_write_response_the_host_will_not_hand_over_leaves_the_mirror_undone_and_fenced() {
    let mut vm = vm("{}");
    vm.refuse_reads(Body::Response);
    let mut s = send_write(&mut vm, br#"{"delete_by_filter":["a","Eq",1]}"#, 100);
    let upstream = br#"{"status":"OK","rows_affected":1,"deleted_ids":[4]}"#;
    s.respond(200, &[JSON], upstream, "via_upstream").unwrap();
    assert!(s.callouts().is_empty(), "no mirror without the affected ids");
    assert_eq!(s.client_status(), Some(200), "the write succeeded all the same");
    s.finish().unwrap();
    assert_eq!(vm.counter("hevlayer.body_read_failed"), 1);
    assert_eq!(vm.counter("hevlayer.mirror_failed"), 1);
    assert_eq!(vm.counter("hevlayer.evictions_pending"), 1);
    assert_eq!(vm.shared_data("hevlayer.fence:ns"), Some(&b"1"[..]));
}

// ---- evictions ahead: the mirror after the response ----

/// The root context's mirror batches so far.
fn root_mirrors(vm: &Vm) -> Vec<wasm_host::Callout> {
    root_calls(vm, "/internal/v1/mirrors")
}

/// The root context's callouts to `path`.
fn root_calls(vm: &Vm, path: &str) -> Vec<wasm_host::Callout> {
    vm.root_callouts()
        .iter()
        .filter(|c| c.header(":path") == Some(path))
        .cloned()
        .collect()
}

/// The mirrors a batch callout carries.
fn batch(call: &wasm_host::Callout) -> Vec<Value> {
    let body: Value = serde_json::from_slice(&call.body).unwrap();
    body["mirrors"].as_array().unwrap().clone()
}

/// The sidecar's answer to a batch: each mirror applied or not.
fn batch_answer(applied: &[bool]) -> Vec<u8> {
    serde_json::to_vec(&json!({ "applied": applied })).unwrap()
}

/// Answers every mirror batch sent so far (from `from` on) as all applied.
fn apply_batches(vm: &mut Vm, from: usize) {
    for call in root_mirrors(vm).iter().skip(from) {
        let answer = batch_answer(&vec![true; batch(call).len()]);
        vm.answer_callout(call.token, Some((200, &[JSON], &answer)))
            .unwrap();
    }
}

/// A write answered 2xx after its eviction ahead was answered `evict`.
fn write_ahead(vm: &mut Vm, body: &[u8], evict: Option<Answer<'_>>) {
    let mut s = send_write(vm, body, 100);
    assert!(
        s.reached_upstream(),
        "the write goes on while its eviction is out"
    );
    let call = s.callouts()[0].clone();
    assert_eq!(call.header(":path"), Some("/internal/v1/evict"));
    s.answer_callout(call.token, evict).unwrap();
    s.respond(200, &[JSON], br#"{"status":"OK"}"#, "via_upstream")
        .unwrap();
    assert_eq!(s.client_status(), Some(200), "nothing waits for the mirror");
    s.finish().unwrap();
}

const APPLIED: Answer<'static> = (200, &[JSON], b"{\"applied\":1}");

/// A write's hostcalls that add nothing: its eviction's answer is read by status and headers
/// (its body says nothing more, and its time matters only when the sidecar did not answer), and
/// a linger's tick records no counters (they wait for the refresh period, or a full batch).
#[test]
fn a_write_spares_the_eviction_body_and_the_linger_tick_spares_the_counters() {
    let mut vm = filter().unwrap().start_counting_hostcalls(BATCHES_ONLY).unwrap();
    vm.set_time_ms(NOW_MS);
    let calls = |vm: &Vm, name: &str| vm.hostcalls().get(name).copied().unwrap_or(0);
    // The refresh period's work once (the clock moved since the configuration).
    vm.advance_time_and_tick(500).unwrap();
    for round in 0..3 {
        let (reads, increments, clocks) = (
            calls(&vm, "proxy_get_buffer_bytes"),
            calls(&vm, "proxy_increment_metric"),
            calls(&vm, "proxy_get_current_time_nanoseconds"),
        );
        write_ahead(
            &mut vm,
            format!(r#"{{"deletes":[{round}]}}"#).as_bytes(),
            Some(APPLIED),
        );
        vm.advance_time_and_tick(DEFAULT_LINGER_MS).unwrap();
        apply_batches(&mut vm, round);
        assert_eq!(root_mirrors(&vm).len(), round + 1, "one batch per linger");
        assert_eq!(
            calls(&vm, "proxy_get_buffer_bytes") - reads,
            2,
            "the request body and the mirror batch's answer, not the eviction's"
        );
        assert_eq!(calls(&vm, "proxy_increment_metric"), increments, "round {round}");
        // The stamp and the tick that sends the batch: not the response (a write evicted ahead
        // times no callout), nor the eviction's answer or the batch's, which the sidecar gave
        // (their time matters only for a timeout).
        assert_eq!(
            calls(&vm, "proxy_get_current_time_nanoseconds") - clocks,
            2,
            "round {round}"
        );
    }
    // The refresh period's tick records them.
    vm.advance_time_and_tick(500).unwrap();
    assert!(calls(&vm, "proxy_increment_metric") > 0);
    assert_eq!(vm.counter("hevlayer.mirror_ok"), 3);
}

#[test]
fn a_write_evicts_ahead_and_its_mirror_goes_after_the_response() {
    let mut vm = vm("{}");
    let mut s = send_write(
        &mut vm,
        br#"{"upsert_rows":[{"id":7,"a":1}],"deletes":["x"]}"#,
        100,
    );
    assert!(s.reached_upstream());
    let evict = s.callouts()[0].clone();
    assert_eq!(evict.header(":path"), Some("/internal/v1/evict"));
    assert_eq!(evict.timeout_ms, 200);
    let msg: Value = serde_json::from_slice(&evict.body).unwrap();
    assert_eq!(
        msg,
        json!({"fences":[{"namespace":"ns","ids":[7,"x"],"stamp":NOW_MS}]})
    );
    // Turbopuffer answers before the eviction does: the response waits for it.
    s.response_headers(200, &[JSON], false, "via_upstream").unwrap();
    assert_eq!(
        s.response_body(br#"{"status":"OK"}"#, true).unwrap(),
        Action::Pause
    );
    assert!(
        s.client_headers().is_none(),
        "read-your-writes: not before the eviction"
    );
    assert!(root_mirrors(s_vm(&s)).is_empty());
    s.answer_callout(evict.token, Some(APPLIED)).unwrap();
    assert_eq!(s.client_status(), Some(200));
    assert_eq!(s.client_body(), br#"{"status":"OK"}"#);
    s.finish().unwrap();
    // The stream woke the root context, which sent the mirror.
    let mirrors = root_mirrors(&vm);
    assert_eq!(mirrors.len(), 1);
    assert_eq!(batch(&mirrors[0]).len(), 1);
    let m = batch(&mirrors[0])[0].clone();
    assert_eq!(
        (m["namespace"].clone(), m["upserted_at"].clone()),
        (json!("ns"), json!(NOW_MS))
    );
    assert_eq!(
        m["write"]["upsert_rows"][0]["_hevlayer_upserted_at"],
        json!(NOW_MS)
    );
    assert!(mirrors[0].header("x-request-id").is_some_and(|v| !v.is_empty()));
    assert_eq!(vm.counter("hevlayer.mirror_ok"), 0, "not before its answer");
    apply_batches(&mut vm, 0);
    assert_eq!(
        (
            vm.counter("hevlayer.evict_ahead_ok"),
            vm.counter("hevlayer.mirror_ok"),
            vm.counter("hevlayer.mirrors_queued")
        ),
        (1, 1, 0)
    );
}

/// The stream's VM, for a look at the root's callouts while the stream is open.
fn s_vm<'a>(s: &'a Stream<'_>) -> &'a Vm {
    s.vm()
}

#[test]
fn a_mirror_after_the_response_that_fails_leaves_nothing_to_fence() {
    let envoy_timeout: Answer<'_> = (
        504,
        &[("content-type", "text/plain")],
        b"upstream request timeout",
    );
    let refused: Answer<'_> = (503, &[JSON], b"{\"error\":\"cache_unavailable\"}");
    let not_applied = batch_answer(&[false]);
    let short = batch_answer(&[]);
    for (answer, counter) in [
        (Some(refused), "mirror_failed"),
        (Some(envoy_timeout), "mirror_timeout"),
        (None, "mirror_failed"),
        (Some((200, &[JSON][..], not_applied.as_slice())), "mirror_failed"),
        (Some((200, &[JSON][..], short.as_slice())), "mirror_failed"),
    ] {
        let mut vm = vm(r#"{"read_watermark":"off"}"#);
        write_ahead(&mut vm, br#"{"deletes":[1]}"#, Some(APPLIED));
        let token = root_mirrors(&vm)[0].token;
        vm.answer_callout(token, answer).unwrap();
        assert_eq!(vm.counter(&format!("hevlayer.{counter}")), 1, "{answer:?}");
        // Its documents were evicted before the 2xx: no fence, no eviction to retry.
        assert_eq!(vm.counter("hevlayer.evictions_pending"), 0);
        let before = vm.root_callouts().len();
        vm.advance_time_and_tick(1_000).unwrap();
        assert_eq!(vm.root_callouts().len(), before, "{answer:?}");
    }
}

#[test]
fn a_failed_eviction_ahead_fences_the_write_and_the_2xx_still_goes_out() {
    let plain_503: Answer<'_> = (503, &[("content-type", "text/plain")], b"upstream connect error");
    for answer in [Some(plain_503), None] {
        let mut vm = vm(r#"{"read_watermark":"off"}"#);
        write_ahead(&mut vm, br#"{"upsert_rows":[{"id":9,"x":1}]}"#, answer);
        assert_eq!(vm.counter("hevlayer.evict_ahead_failed"), 1);
        assert_eq!(vm.counter("hevlayer.evictions_pending"), 1);
        assert_eq!(root_mirrors(&vm).len(), 1, "the mirror still goes");
        vm.advance_time_and_tick(1_000).unwrap();
        let retry = vm.root_callouts().last().unwrap().clone();
        assert_eq!(retry.header(":path"), Some("/internal/v1/evict"));
        let body: Value = serde_json::from_slice(&retry.body).unwrap();
        assert_eq!(body["fences"][0]["ids"], json!([9]));
    }
    // The eviction could not even be dispatched: the same.
    let mut vm = vm(r#"{"read_watermark":"off"}"#);
    vm.remove_cluster("layer_sidecar");
    let mut s = send_write(&mut vm, br#"{"deletes":[4]}"#, 100);
    assert!(s.reached_upstream());
    s.respond(200, &[JSON], br#"{"status":"OK"}"#, "via_upstream")
        .unwrap();
    assert_eq!(s.client_status(), Some(200));
    s.finish().unwrap();
    assert_eq!(vm.counter("hevlayer.evict_ahead_failed"), 1);
    assert_eq!(vm.counter("hevlayer.evictions_pending"), 1);
    // Its mirror could not be dispatched either: counted once, as failed.
    assert_eq!(vm.counter("hevlayer.mirror_failed"), 1);
}

// ---- group commit: evictions ahead sent by the root for many writes ----

/// Every write's eviction ahead goes in its worker's group (the host runs one stream at a time,
/// so the adaptive mode, which groups only while another eviction is out, would never group).
const GROUPED: &str = r#"{"read_watermark":"off","group_evictions":"always"}"#;

/// The root's eviction callouts (groups of writes, or fences).
fn root_evictions(vm: &Vm) -> Vec<wasm_host::Callout> {
    root_calls(vm, "/internal/v1/evict")
}

/// The ids of each fence an eviction callout carries.
fn fenced_ids(call: &wasm_host::Callout) -> Vec<Value> {
    let body: Value = serde_json::from_slice(&call.body).unwrap();
    let fences = body["fences"].as_array().unwrap();
    fences.iter().map(|f| f["ids"].clone()).collect()
}

#[test]
fn grouped_evictions_go_in_one_root_callout_and_the_root_resumes_a_waiting_response() {
    let mut vm = vm(GROUPED);
    vm.hold_queues(true);
    // Two writes whose clients left while their 2xx waited for the group: the root still
    // finishes them (their writes applied).
    for id in [1, 2] {
        let mut s = send_write(&mut vm, format!(r#"{{"deletes":[{id}]}}"#).as_bytes(), 100);
        assert!(s.reached_upstream(), "the write goes on while its eviction waits");
        assert!(s.callouts().is_empty(), "the stream sends nothing itself");
        s.response_headers(200, &[JSON], false, "via_upstream").unwrap();
        assert_eq!(s.response_body(b"{}", true).unwrap(), Action::Pause);
        assert!(
            s.client_headers().is_none(),
            "read-your-writes: not before the eviction"
        );
        s.finish().unwrap();
    }
    assert_eq!(vm.queue_names().len(), 1);
    let mut s = send_write(&mut vm, br#"{"upsert_rows":[{"id":3,"a":1}]}"#, 100);
    assert!(s.reached_upstream());
    // The root runs once for all three: one callout.
    s.vm_mut().deliver_queues().unwrap();
    let groups = root_evictions(s.vm());
    assert_eq!(groups.len(), 1);
    assert_eq!(fenced_ids(&groups[0]), [json!([1]), json!([2]), json!([3])]);
    assert_eq!(groups[0].timeout_ms, 200);
    assert!(groups[0].header("x-request-id").is_some_and(|v| !v.is_empty()));
    s.response_headers(200, &[JSON], false, "via_upstream").unwrap();
    assert_eq!(
        s.response_body(br#"{"status":"OK"}"#, true).unwrap(),
        Action::Pause
    );
    assert!(s.client_headers().is_none());
    s.answer_callout(groups[0].token, Some(APPLIED)).unwrap();
    assert_eq!(s.client_status(), Some(200), "the root resumed it");
    assert_eq!(s.client_body(), br#"{"status":"OK"}"#);
    s.finish().unwrap();
    assert_eq!(
        (
            vm.counter("hevlayer.evict_ahead_grouped"),
            vm.counter("hevlayer.eviction_groups"),
            vm.counter("hevlayer.evict_ahead_ok"),
            vm.counter("hevlayer.evictions_pending"),
        ),
        (3, 1, 3, 0)
    );
    // All three mirrors go after their responses, in one batch.
    vm.deliver_queues().unwrap();
    let mirrors = root_mirrors(&vm);
    assert_eq!(mirrors.len(), 1);
    assert_eq!(batch(&mirrors[0]).len(), 3);
    apply_batches(&mut vm, 0);
    assert_eq!(vm.counter("hevlayer.mirror_ok"), 3);
    assert_eq!(vm.counter("hevlayer.writes_unanswered"), 0);
    assert_eq!(mirror_outcomes(&vm), 3, "one outcome per write");
}

#[test]
fn a_group_answered_before_the_response_lets_it_go_at_once() {
    let mut vm = vm(GROUPED);
    let mut s = send_write(&mut vm, br#"{"deletes":[5]}"#, 100);
    let group = root_evictions(s.vm())[0].clone();
    s.answer_callout(group.token, Some(APPLIED)).unwrap();
    s.respond(200, &[JSON], br#"{"status":"OK"}"#, "via_upstream")
        .unwrap();
    assert_eq!(s.client_status(), Some(200));
    s.finish().unwrap();
    assert_eq!(vm.counter("hevlayer.evict_ahead_ok"), 1);
    assert_eq!(root_mirrors(&vm).len(), 1);
}

#[test]
fn a_failed_or_lost_group_fences_its_writes_and_still_resumes_them() {
    let plain_503: Answer<'_> = (503, &[("content-type", "text/plain")], b"upstream connect error");
    for answer in [Some(Some(plain_503)), Some(None), None] {
        let mut vm = vm(GROUPED);
        let mut s = send_write(&mut vm, br#"{"upsert_rows":[{"id":9,"x":1}]}"#, 100);
        let group = root_evictions(s.vm())[0].clone();
        s.respond(200, &[JSON], br#"{"status":"OK"}"#, "via_upstream")
            .unwrap();
        assert!(s.client_headers().is_none());
        match answer {
            Some(answer) => s.answer_callout(group.token, answer).unwrap(),
            // No answer at all: the timer gives up on it.
            None => {
                s.vm_mut().advance_time_and_tick(199).unwrap();
                assert!(s.client_headers().is_none(), "not before the limit");
                s.vm_mut().advance_time_and_tick(2_001).unwrap();
            }
        }
        assert_eq!(s.client_status(), Some(200), "{answer:?}");
        s.finish().unwrap();
        assert_eq!(vm.counter("hevlayer.evict_ahead_failed"), 1, "{answer:?}");
        assert_eq!(vm.counter("hevlayer.evictions_pending"), 1, "{answer:?}");
        assert_eq!(root_mirrors(&vm).len(), 1, "the mirror still goes");
        let late = vm.root_callouts().len();
        if answer.is_none() {
            // The late answer of a group given up on changes nothing.
            vm.answer_callout(group.token, Some(APPLIED)).unwrap();
            assert_eq!(vm.counter("hevlayer.evict_ahead_ok"), 0);
            assert_eq!(vm.root_callouts().len(), late);
        }
    }
    // A group that cannot be dispatched: the same, at once.
    let mut vm = vm(GROUPED);
    vm.hold_queues(true);
    let mut s = send_write(&mut vm, br#"{"deletes":[4]}"#, 100);
    s.vm_mut().remove_cluster("layer_sidecar");
    s.vm_mut().deliver_queues().unwrap();
    s.respond(200, &[JSON], br#"{"status":"OK"}"#, "via_upstream")
        .unwrap();
    assert_eq!(s.client_status(), Some(200));
    s.finish().unwrap();
    assert_eq!(vm.counter("hevlayer.evict_ahead_failed"), 1);
    assert_eq!(vm.counter("hevlayer.evictions_pending"), 1);
}

#[test]
fn without_a_wake_up_the_eviction_goes_alone_or_with_the_next_tick() {
    // Adaptive (the default) with nothing else out on the worker: the write sends its own.
    let mut alone = vm(r#"{"read_watermark":"off"}"#);
    let s = send_write(&mut alone, br#"{"deletes":[1]}"#, 100);
    assert_eq!(s.callouts().len(), 1);
    assert!(root_evictions(s.vm()).is_empty());
    drop(s);
    // A lost wake-up: the tick sends the group.
    let mut grouped = vm(GROUPED);
    grouped.hold_queues(true);
    let mut s = send_write(&mut grouped, br#"{"deletes":[2]}"#, 100);
    s.vm_mut().lose_queue_wakeups();
    s.vm_mut().hold_queues(false);
    assert!(root_evictions(s.vm()).is_empty());
    s.vm_mut().advance_time_and_tick(500).unwrap();
    let group = root_evictions(s.vm())[0].clone();
    s.answer_callout(group.token, Some(APPLIED)).unwrap();
    s.respond(200, &[JSON], b"{}", "via_upstream").unwrap();
    assert_eq!(s.client_status(), Some(200));
}

#[test]
fn one_wake_up_sends_every_mirror_queued_before_the_root_ran_and_the_timer_is_the_fallback() {
    let mut vm = vm(BATCHES_ONLY);
    vm.hold_queues(true);
    for id in 0..3 {
        write_ahead(
            &mut vm,
            format!(r#"{{"deletes":[{id}]}}"#).as_bytes(),
            Some(APPLIED),
        );
    }
    assert!(root_mirrors(&vm).is_empty(), "the root has not run yet");
    assert_eq!(vm.counter("hevlayer.mirrors_queued"), 3);
    assert_eq!(vm.queue_names().len(), 1);
    assert!(vm.queue_names()[0].starts_with("hevlayer.mirrors."));
    vm.deliver_queues().unwrap();
    // Group commit: the three mirrors go in one callout.
    assert_eq!(root_mirrors(&vm).len(), 1);
    assert_eq!(batch(&root_mirrors(&vm)[0]).len(), 3);
    assert_eq!(vm.counter("hevlayer.mirrors_queued"), 0);
    let answer = batch_answer(&[true, false, true]);
    let token = root_mirrors(&vm)[0].token;
    vm.answer_callout(token, Some((200, &[JSON], &answer))).unwrap();
    assert_eq!(
        (
            vm.counter("hevlayer.mirror_ok"),
            vm.counter("hevlayer.mirror_failed")
        ),
        (2, 1)
    );

    // Without a queue the timer sends them.
    let mut vm2 = vm_without_queue_delivery();
    write_ahead(&mut vm2, br#"{"deletes":[1]}"#, Some(APPLIED));
    assert!(root_mirrors(&vm2).is_empty());
    vm2.advance_time_and_tick(500).unwrap();
    assert_eq!(root_mirrors(&vm2).len(), 1);
}

#[test]
fn after_a_lost_wake_up_the_timer_sends_and_the_next_mirror_wakes_the_root_again() {
    let mut vm = vm(r#"{"read_watermark":"off"}"#);
    vm.hold_queues(true);
    write_ahead(&mut vm, br#"{"deletes":[1]}"#, Some(APPLIED));
    vm.lose_queue_wakeups();
    vm.hold_queues(false);
    assert!(root_mirrors(&vm).is_empty());
    vm.advance_time_and_tick(500).unwrap();
    assert_eq!(
        root_mirrors(&vm).len(),
        1,
        "the timer sends what the lost wake-up left"
    );
    write_ahead(&mut vm, br#"{"deletes":[2]}"#, Some(APPLIED));
    assert_eq!(
        root_mirrors(&vm).len(),
        2,
        "the next mirror wakes the root, no tick needed"
    );
}

/// A VM whose queue wake-ups never arrive (held by the host, as if the queue were lost).
fn vm_without_queue_delivery() -> Vm {
    let mut vm = vm(r#"{"read_watermark":"off"}"#);
    vm.hold_queues(true);
    vm
}

#[test]
fn the_mirror_queue_is_bounded_and_a_dropped_mirror_is_counted() {
    let mut vm = vm(r#"{"read_watermark":"off","mirror_queue_bytes":100,"mirror_ride_bytes":0}"#);
    vm.hold_queues(true);
    write_ahead(&mut vm, br#"{"deletes":[1]}"#, Some(APPLIED));
    write_ahead(&mut vm, br#"{"deletes":[2]}"#, Some(APPLIED));
    assert_eq!(vm.counter("hevlayer.mirror_queue_full"), 1);
    assert_eq!(vm.counter("hevlayer.mirror_failed"), 1);
    vm.deliver_queues().unwrap();
    assert_eq!(root_mirrors(&vm).len(), 1);
}

#[test]
fn at_most_four_batches_are_out_at_once_and_what_gathers_meanwhile_goes_as_one() {
    let mut vm = vm(BATCHES_ONLY);
    for id in 0..10 {
        write_ahead(
            &mut vm,
            format!(r#"{{"deletes":[{id}]}}"#).as_bytes(),
            Some(APPLIED),
        );
    }
    let out = root_mirrors(&vm);
    assert_eq!(out.len(), 4, "one batch per write while there is room");
    assert_eq!(vm.counter("hevlayer.mirrors_queued"), 6);
    let answer = batch_answer(&[true]);
    vm.answer_callout(out[0].token, Some((200, &[JSON], &answer)))
        .unwrap();
    let out = root_mirrors(&vm);
    assert_eq!(out.len(), 5, "an answer makes room for the next batch");
    let ids: Vec<Value> = batch(&out[4])
        .iter()
        .map(|m| m["write"]["deletes"][0].clone())
        .collect();
    assert_eq!(ids, (4..10).map(|i| json!(i)).collect::<Vec<_>>(), "in order");
    apply_batches(&mut vm, 1);
    assert_eq!(vm.counter("hevlayer.mirror_ok"), 10);
    assert_eq!(vm.counter("hevlayer.mirrors_queued"), 0);
}

#[test]
fn by_default_mirrors_linger_and_the_next_tick_sends_them_as_one_batch() {
    let config = with_default(BATCHES_ONLY, "counter_batch", 1);
    let mut vm = filter().unwrap().start_counting_hostcalls(&config).unwrap();
    vm.set_time_ms(NOW_MS);
    let wake_ups = |vm: &Vm| {
        vm.hostcalls()
            .get("proxy_enqueue_shared_queue")
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(vm.tick_period_ms(), 500, "the refresh period");
    for id in 0..3 {
        write_ahead(
            &mut vm,
            format!(r#"{{"deletes":[{id}]}}"#).as_bytes(),
            Some(APPLIED),
        );
    }
    assert!(
        root_mirrors(&vm).is_empty(),
        "nothing goes before the linger ends"
    );
    assert_eq!(
        u64::from(vm.tick_period_ms()),
        DEFAULT_LINGER_MS,
        "the timer runs at the linger"
    );
    assert_eq!(wake_ups(&vm), 1, "one wake-up for the three");
    assert_eq!(vm.counter("hevlayer.mirrors_queued"), 3);
    // The linger's tick: one batch. Less than a refresh period since the last one: nothing else
    // of the timer's work runs. Mirrors may keep coming, so the timer stays at the linger.
    vm.advance_time_and_tick(DEFAULT_LINGER_MS).unwrap();
    let out = root_mirrors(&vm);
    assert_eq!(out.len(), 1);
    assert_eq!(batch(&out[0]).len(), 3);
    assert_eq!(vm.root_callouts().len(), 1, "no other root callout");
    assert_eq!(u64::from(vm.tick_period_ms()), DEFAULT_LINGER_MS);
    apply_batches(&mut vm, 0);
    assert_eq!(vm.counter("hevlayer.mirror_ok"), 3);
    assert_eq!(vm.counter("hevlayer.mirrors_queued"), 0);
    // The next write's mirror goes at the next linger tick, without waking the root.
    write_ahead(&mut vm, br#"{"deletes":[9]}"#, Some(APPLIED));
    assert_eq!(wake_ups(&vm), 1);
    vm.advance_time_and_tick(DEFAULT_LINGER_MS).unwrap();
    assert_eq!(root_mirrors(&vm).len(), 2);
    assert_eq!(u64::from(vm.tick_period_ms()), DEFAULT_LINGER_MS);
    apply_batches(&mut vm, 1);
    // A linger with nothing new: back to the refresh period, and the next write lingers again.
    vm.advance_time_and_tick(DEFAULT_LINGER_MS).unwrap();
    assert_eq!(vm.tick_period_ms(), 500);
    write_ahead(&mut vm, br#"{"deletes":[10]}"#, Some(APPLIED));
    assert_eq!(wake_ups(&vm), 2);
    assert_eq!(u64::from(vm.tick_period_ms()), DEFAULT_LINGER_MS);
    vm.advance_time_and_tick(DEFAULT_LINGER_MS).unwrap();
    assert_eq!(root_mirrors(&vm).len(), 3);
}

#[test]
fn a_full_batch_does_not_linger() {
    let mut vm = lingering_vm(r#"{"read_watermark":"off","mirror_linger_ms":50}"#);
    // One write whose mirror is a whole batch's bytes.
    let big = "x".repeat(4 * 1024 * 1024);
    let body = format!(r#"{{"upsert_rows":[{{"id":1,"text":"{big}"}}]}}"#);
    write_ahead(&mut vm, body.as_bytes(), Some(APPLIED));
    assert_eq!(root_mirrors(&vm).len(), 1, "sent at its wake-up");
    assert_eq!(vm.tick_period_ms(), 500, "no linger");
    apply_batches(&mut vm, 0);
    assert_eq!(vm.counter("hevlayer.mirror_ok"), 1);
}

#[test]
fn with_evictions_ahead_every_accepted_write_still_ends_in_one_mirror_outcome() {
    let mut vm = vm(r#"{"read_watermark":"off"}"#);
    // Mirrored after the response.
    write_ahead(&mut vm, br#"{"deletes":[1]}"#, Some(APPLIED));
    apply_batches(&mut vm, 0);
    // Refused by Turbopuffer while its eviction was out.
    let mut s = send_write(&mut vm, br#"{"deletes":[1]}"#, 100);
    s.respond(429, &[JSON], br#"{"status":"error"}"#, "via_upstream")
        .unwrap();
    s.finish().unwrap();
    // The client hung up while the 2xx waited for the eviction: fenced.
    let mut s = send_write(&mut vm, br#"{"deletes":[2]}"#, 100);
    s.response_headers(200, &[JSON], true, "via_upstream").unwrap();
    s.finish().unwrap();
    // A filter write: the response waits for its mirror, as before.
    let mut s = send_write(&mut vm, br#"{"delete_by_filter":["a","Eq",1]}"#, 100);
    assert!(s.callouts().is_empty(), "no eviction ahead for a filter write");
    s.respond(
        200,
        &[JSON],
        br#"{"status":"OK","deleted_ids":[5]}"#,
        "via_upstream",
    )
    .unwrap();
    let t = s.callouts()[0].token;
    s.answer_callout(t, Some(APPLIED)).unwrap();
    s.finish().unwrap();
    assert_eq!(vm.counter("hevlayer.writes_accepted"), 4);
    assert_eq!(mirror_outcomes(&vm), 4);
    assert_eq!(
        (
            vm.counter("hevlayer.mirror_ok"),
            vm.counter("hevlayer.mirror_skipped"),
            vm.counter("hevlayer.writes_unanswered")
        ),
        (2, 1, 1)
    );
}

#[test]
fn memory_does_not_grow_with_mirrors_after_the_response() {
    let mut vm = vm("{}");
    let body = format!(
        r#"{{"upsert_rows":[{}]}}"#,
        (0..200)
            .map(|i| format!(r#"{{"id":{i},"vector":[0.1,0.2,0.3,0.4],"t":"row {i}"}}"#))
            .collect::<Vec<_>>()
            .join(",")
    );
    let run = |vm: &mut Vm| {
        write_ahead(vm, body.as_bytes(), Some(APPLIED));
        apply_batches(vm, 0);
        vm.forget_root_callouts();
    };
    for _ in 0..10 {
        run(&mut vm);
    }
    let after_10 = vm.memory_bytes();
    for _ in 0..200 {
        run(&mut vm);
    }
    assert_eq!(vm.memory_bytes(), after_10);
}

// ---- trace context on callouts ----

/// A W3C traceparent whose trace id ends in `n`.
fn traceparent(n: u8) -> String {
    format!("00-4bf92f3577b34da6a3ce929d0e0e47{n:02x}-00f067aa0ba902b7-01")
}

/// A traced write answered 2xx after its eviction ahead was applied; returns the eviction.
fn traced_write_ahead(vm: &mut Vm, n: u8) -> wasm_host::Callout {
    let request_id = format!("client-{n}");
    let parent = traceparent(n);
    let trace = [
        ("x-request-id", request_id.as_str()),
        ("traceparent", parent.as_str()),
        ("tracestate", "congo=t61rcWkgMzE"),
    ];
    let mut s = vm.stream().unwrap();
    s.request_headers(&write_headers(&trace), false).unwrap();
    s.request_body(format!(r#"{{"deletes":[{n}]}}"#).as_bytes(), true)
        .unwrap();
    let evict = s.callouts()[0].clone();
    s.answer_callout(evict.token, Some(APPLIED)).unwrap();
    s.respond(200, &[JSON], br#"{"status":"OK"}"#, "via_upstream")
        .unwrap();
    s.finish().unwrap();
    evict
}

#[test]
fn every_callout_carries_the_request_id_and_trace_context_and_a_batch_its_first_mirrors() {
    let mut vm = vm(BATCHES_ONLY);
    vm.hold_queues(true);
    let evicts: Vec<_> = (1..=3).map(|n| traced_write_ahead(&mut vm, n)).collect();
    for (n, evict) in (1..=3).zip(&evicts) {
        assert_eq!(evict.header(":path"), Some("/internal/v1/evict"));
        assert_eq!(evict.header("x-request-id"), Some(format!("client-{n}").as_str()));
        assert_eq!(evict.header("traceparent"), Some(traceparent(n).as_str()));
        assert_eq!(evict.header("tracestate"), Some("congo=t61rcWkgMzE"));
    }
    vm.deliver_queues().unwrap();
    let mirrors = root_mirrors(&vm);
    assert_eq!((mirrors.len(), batch(&mirrors[0]).len()), (1, 3));
    assert_eq!(mirrors[0].header("x-request-id"), Some("client-1"));
    assert_eq!(mirrors[0].header("traceparent"), Some(traceparent(1).as_str()));
    assert_eq!(mirrors[0].header("tracestate"), Some("congo=t61rcWkgMzE"));

    // A pipeline route's callout, and one of a request without trace context.
    let parent = traceparent(9);
    for (trace, expected) in [(Some(parent.as_str()), Some(parent.as_str())), (None, None)] {
        let mut s = vm.stream().unwrap();
        let mut headers = vec![
            (":method", "GET"),
            (":path", "/v2/pipelines/p/status"),
            ("authorization", "Bearer tpuf_key"),
            ("x-request-id", "client-9"),
        ];
        headers.extend(trace.map(|t| ("traceparent", t)));
        s.request_headers(&headers, true).unwrap();
        let call = s.callouts()[0].clone();
        assert_eq!(call.header(":path"), Some("/v2/pipelines/p/status"));
        assert_eq!(call.header("x-request-id"), Some("client-9"));
        assert_eq!(call.header("traceparent"), expected);
        assert_eq!(call.header("tracestate"), None);
    }
}

/// The mirrors an eviction callout carries along (none for a plain eviction).
fn riders(call: &wasm_host::Callout) -> Vec<Value> {
    let body: Value = serde_json::from_slice(&call.body).unwrap();
    body["mirrors"].as_array().cloned().unwrap_or_default()
}

const EVICT_MIRRORS: &str = "/internal/v1/evict-mirrors";

/// The root's group callouts, with mirrors riding or not, in the order sent.
fn groups_sent(vm: &Vm) -> Vec<wasm_host::Callout> {
    vm.root_callouts()
        .iter()
        .filter(|c| matches!(c.header(":path"), Some("/internal/v1/evict" | EVICT_MIRRORS)))
        .cloned()
        .collect()
}

/// Sends grouped write `id` (its group goes when the root runs) and holds it there.
fn grouped_write(vm: &mut Vm, id: u32) -> Stream<'_> {
    let mut s = send_write(vm, format!(r#"{{"deletes":[{id}]}}"#).as_bytes(), 100);
    assert!(s.reached_upstream());
    assert!(s.callouts().is_empty(), "the eviction went to the group");
    s.vm_mut().deliver_queues().unwrap();
    s
}

/// Answers the stream's group `answer` and its upstream 200: the client gets its 2xx.
fn finish_grouped(mut s: Stream<'_>, answer: Option<Answer<'_>>) {
    let group = groups_sent(s.vm()).last().cloned().unwrap();
    s.answer_callout(group.token, answer).unwrap();
    s.respond(200, &[JSON], br#"{"status":"OK"}"#, "via_upstream")
        .unwrap();
    assert_eq!(s.client_status(), Some(200), "the 2xx goes out either way");
    s.finish().unwrap();
}

#[test]
fn a_group_of_evictions_carries_the_waiting_mirrors_and_one_answer_settles_both() {
    let mut vm = vm(GROUPED);
    vm.hold_queues(true);
    let s = grouped_write(&mut vm, 1);
    finish_grouped(s, Some(APPLIED));
    assert_eq!(vm.counter("hevlayer.mirrors_queued"), 1);
    let s = grouped_write(&mut vm, 2);
    let group = groups_sent(s.vm());
    assert_eq!(group.len(), 2);
    assert_eq!(group[1].header(":path"), Some(EVICT_MIRRORS));
    assert_eq!(fenced_ids(&group[1]), vec![json!([2])], "the write's own fence");
    let rode = riders(&group[1]);
    assert_eq!(rode.len(), 1);
    assert_eq!(
        rode[0]["write"]["deletes"],
        json!([1]),
        "the earlier write's mirror"
    );
    assert!(root_mirrors(s.vm()).is_empty(), "no batch of its own");
    assert_eq!(s.counter("hevlayer.mirrors_queued"), 0);
    assert_eq!(s.counter("hevlayer.mirror_rode"), 1);
    let answer = batch_answer(&[true]);
    finish_grouped(s, Some((200, &[JSON], &answer)));
    assert_eq!(vm.counter("hevlayer.mirror_ok"), 1);
    assert_eq!(vm.counter("hevlayer.evict_ahead_ok"), 2);
    assert_eq!(vm.counter("hevlayer.evict_ahead_failed"), 0);
    // The second write's mirror waits for the next group, or a batch.
    vm.deliver_queues().unwrap();
    let out = root_mirrors(&vm);
    assert_eq!(out.len(), 1, "one batch: the first mirror went already");
    assert_eq!(batch(&out[0])[0]["write"]["deletes"], json!([2]));
}

#[test]
fn a_stream_alone_sends_its_eviction_without_riders() {
    let mut vm = vm(r#"{"read_watermark":"off"}"#);
    vm.hold_queues(true);
    write_ahead(&mut vm, br#"{"deletes":[1]}"#, Some(APPLIED));
    write_ahead(&mut vm, br#"{"deletes":[2]}"#, Some(APPLIED));
    assert_eq!(vm.counter("hevlayer.mirrors_queued"), 2, "both wait for a batch");
    assert_eq!(vm.counter("hevlayer.mirror_rode"), 0);
}

#[test]
fn when_the_group_fails_its_writes_are_fenced_and_its_riders_fail() {
    for (answer, counter) in [
        (
            Some((500, &[JSON][..], &br#"{"error":"x"}"#[..])),
            "hevlayer.mirror_failed",
        ),
        (
            Some((
                504,
                &[("content-type", "text/plain")][..],
                &b"upstream request timeout"[..],
            )),
            "hevlayer.mirror_timeout",
        ),
        (None, "hevlayer.mirror_failed"),
    ] {
        let mut vm = vm(GROUPED);
        vm.hold_queues(true);
        let s = grouped_write(&mut vm, 1);
        finish_grouped(s, Some(APPLIED));
        let s = grouped_write(&mut vm, 2);
        assert_eq!(groups_sent(s.vm())[1].header(":path"), Some(EVICT_MIRRORS));
        finish_grouped(s, answer);
        assert_eq!(vm.counter("hevlayer.evict_ahead_failed"), 1, "{answer:?}");
        assert_eq!(vm.counter(counter), 1, "{answer:?}");
        assert_eq!(vm.counter("hevlayer.mirror_ok"), 0);
        // The failed write is fenced: the root evicts its documents until acknowledged.
        vm.advance_time_and_tick(500).unwrap();
        let fence = root_evictions(&vm);
        assert_eq!(fence.len(), 2, "the first group and the fence: {answer:?}");
        assert_eq!(fenced_ids(&fence[1]), vec![json!([2])]);
    }
}

#[test]
fn riders_stay_within_their_bytes_and_wait_when_the_group_cannot_go() {
    // A mirror larger than the bound waits for its batch.
    let mut small = vm(r#"{"read_watermark":"off","group_evictions":"always","mirror_ride_bytes":60}"#);
    small.hold_queues(true);
    let s = grouped_write(&mut small, 1);
    finish_grouped(s, Some(APPLIED));
    let s = grouped_write(&mut small, 2);
    assert_eq!(groups_sent(s.vm())[1].header(":path"), Some("/internal/v1/evict"));
    assert_eq!(root_mirrors(s.vm()).len(), 1, "it went in a batch of its own");
    assert_eq!(s.counter("hevlayer.mirror_rode"), 0);
    drop(s);

    // A group that cannot be dispatched gives its riders back (they linger for a batch).
    let mut vm = lingering_vm(GROUPED);
    vm.hold_queues(true);
    let s = grouped_write(&mut vm, 1);
    finish_grouped(s, Some(APPLIED));
    vm.remove_cluster("layer_sidecar");
    let mut s = grouped_write(&mut vm, 2);
    assert_eq!(groups_sent(s.vm()).len(), 1, "nothing more could be sent");
    assert_eq!(s.counter("hevlayer.mirror_rode"), 0);
    assert_eq!(s.counter("hevlayer.mirrors_queued"), 1, "back in the queue");
    assert_eq!(s.counter("hevlayer.mirror_failed"), 0, "not lost");
    s.respond(200, &[JSON], br#"{"status":"OK"}"#, "via_upstream")
        .unwrap();
    assert_eq!(s.client_status(), Some(200));
    s.finish().unwrap();
    assert_eq!(vm.counter("hevlayer.evict_ahead_failed"), 1);
}

#[test]
fn while_groups_go_out_the_linger_leaves_the_mirrors_to_ride_them() {
    let mut vm = lingering_vm(GROUPED);
    let s = grouped_write(&mut vm, 1);
    finish_grouped(s, Some(APPLIED));
    // The first linger: no group went since it began, so the mirror goes in a batch.
    vm.advance_time_and_tick(DEFAULT_LINGER_MS).unwrap();
    assert_eq!(root_mirrors(&vm).len(), 1);
    apply_batches(&mut vm, 0);
    let s = grouped_write(&mut vm, 2);
    finish_grouped(s, Some(APPLIED));
    // A group went during this linger: the mirror waits for the next one.
    vm.advance_time_and_tick(DEFAULT_LINGER_MS).unwrap();
    assert_eq!(root_mirrors(&vm).len(), 1, "no batch while groups go out");
    assert_eq!(vm.counter("hevlayer.mirrors_queued"), 1);
    let s = grouped_write(&mut vm, 3);
    let group = groups_sent(s.vm()).last().cloned().unwrap();
    assert_eq!(group.header(":path"), Some(EVICT_MIRRORS));
    assert_eq!(riders(&group)[0]["write"]["deletes"], json!([2]));
    let answer = batch_answer(&[true]);
    finish_grouped(s, Some((200, &[JSON], &answer)));
    // The writes stop: the first linger without a group sends the last mirror.
    vm.advance_time_and_tick(DEFAULT_LINGER_MS).unwrap();
    assert_eq!(root_mirrors(&vm).len(), 1, "a group went during that linger");
    vm.advance_time_and_tick(DEFAULT_LINGER_MS).unwrap();
    let out = root_mirrors(&vm);
    assert_eq!(out.len(), 2, "at most two lingers late");
    assert_eq!(batch(&out[1])[0]["write"]["deletes"], json!([3]));
    apply_batches(&mut vm, 1);
    assert_eq!(vm.counter("hevlayer.mirror_ok"), 3);
    assert_eq!(vm.counter("hevlayer.mirror_rode"), 1);
}

#[test]
fn while_writes_keep_coming_mirrors_keep_gathering_up_to_the_longest_linger() {
    let mut vm = lingering_vm(r#"{"read_watermark":"off"}"#);
    // A lone write: its mirror goes after one linger.
    write_ahead(&mut vm, br#"{"deletes":[0]}"#, Some(APPLIED));
    vm.advance_time_and_tick(DEFAULT_LINGER_MS).unwrap();
    assert_eq!(root_mirrors(&vm).len(), 1);
    apply_batches(&mut vm, 0);
    // A steady flow, one write per linger: the mirrors keep gathering, at most 20 ms (ten
    // lingers) for the oldest, then go as one batch.
    for id in 1..=9 {
        write_ahead(
            &mut vm,
            format!(r#"{{"deletes":[{id}]}}"#).as_bytes(),
            Some(APPLIED),
        );
        vm.advance_time_and_tick(DEFAULT_LINGER_MS).unwrap();
        assert_eq!(root_mirrors(&vm).len(), 1, "write {id}: still gathering");
    }
    write_ahead(&mut vm, br#"{"deletes":[10]}"#, Some(APPLIED));
    vm.advance_time_and_tick(DEFAULT_LINGER_MS).unwrap();
    let out = root_mirrors(&vm);
    assert_eq!(out.len(), 2);
    assert_eq!(batch(&out[1]).len(), 10, "the ten mirrors in one callout");
    apply_batches(&mut vm, 1);
    assert_eq!(vm.counter("hevlayer.mirror_ok"), 11);
    // The writes stop: the timer goes back to the refresh period.
    vm.advance_time_and_tick(DEFAULT_LINGER_MS).unwrap();
    assert_eq!(vm.tick_period_ms(), 500);
    // With the longest linger at one linger, each linger's mirrors go at once.
    let mut short = lingering_vm(r#"{"read_watermark":"off","mirror_linger_max_ms":2}"#);
    for id in 0..3 {
        write_ahead(
            &mut short,
            format!(r#"{{"deletes":[{id}]}}"#).as_bytes(),
            Some(APPLIED),
        );
        short.advance_time_and_tick(DEFAULT_LINGER_MS).unwrap();
        assert_eq!(root_mirrors(&short).len(), id + 1);
    }
}

#[test]
fn a_backlog_larger_than_the_hold_goes_at_once_while_writes_keep_coming() {
    let mut vm = lingering_vm(r#"{"read_watermark":"off"}"#);
    write_ahead(&mut vm, br#"{"deletes":[0]}"#, Some(APPLIED));
    vm.advance_time_and_tick(DEFAULT_LINGER_MS).unwrap();
    apply_batches(&mut vm, 0);
    // A write whose mirror alone is over 64 KiB, while writes keep coming: not held.
    let big = format!(
        r#"{{"upsert_rows":[{{"id":1,"text":"{}"}}]}}"#,
        "x".repeat(70_000)
    );
    write_ahead(&mut vm, big.as_bytes(), Some(APPLIED));
    vm.advance_time_and_tick(DEFAULT_LINGER_MS).unwrap();
    let out = root_mirrors(&vm);
    assert_eq!(out.len(), 2, "the large mirror went after one linger");
    assert_eq!(batch(&out[1]).len(), 1);
}
