//! The benchmark's empty filter in our proxy-wasm host: its stand-in evictions (`callout`,
//! `grouped`), whose figures decide whether the product should group its evictions, hold a
//! response until their answer and release it then. Build it first: `make wasm-empty`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hevlayer_tests::wasm_host::{Plugin, Stream, Vm};
use std::path::PathBuf;

const ANSWER: (u16, &[(&str, &str)], &[u8]) = (200, &[("content-type", "application/json")], b"{}");

fn empty_filter(config: &str) -> Vm {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/wasm32-wasip1/release/hevlayer_empty_filter.wasm");
    Plugin::load(&path).unwrap().start(config).unwrap()
}

/// A 1-row write's request, body and all, sent on.
fn send_write(s: &mut Stream<'_>) {
    let body = br#"{"upsert_rows":[{"id":1}]}"#;
    s.request_headers(&[(":method", "POST"), (":path", "/v2/namespaces/n")], false)
        .unwrap();
    s.request_body(body, true).unwrap();
    assert!(
        s.reached_upstream(),
        "the request goes on while its eviction is out"
    );
    assert_eq!(s.upstream_body(), body);
}

#[test]
fn a_request_s_own_callout_holds_its_response_until_answered() {
    let mut vm = empty_filter("callout");
    let mut s = vm.stream().unwrap();
    send_write(&mut s);
    assert_eq!(s.callouts().len(), 1);
    let token = s.callouts()[0].token;
    s.respond(200, &[], b"", "via_upstream").unwrap();
    assert!(s.client_headers().is_none(), "held for the eviction");
    s.answer_callout(token, Some(ANSWER)).unwrap();
    assert_eq!(s.client_status(), Some(200));
}

#[test]
fn a_grouped_eviction_goes_from_the_root_and_resumes_the_waiting_response() {
    let mut vm = empty_filter("grouped");
    // Answered before the response: the response goes on at once.
    let mut s = vm.stream().unwrap();
    send_write(&mut s);
    assert!(s.callouts().is_empty(), "the root sends it, not the request");
    assert_eq!(s.root_callouts().len(), 1);
    let token = s.root_callouts()[0].token;
    s.answer_callout(token, Some(ANSWER)).unwrap();
    s.respond(200, &[], b"", "via_upstream").unwrap();
    assert_eq!(s.client_status(), Some(200));
    s.finish().unwrap();
    vm.forget_root_callouts();

    // Answered after the response came: the root resumes it.
    let mut s = vm.stream().unwrap();
    send_write(&mut s);
    assert_eq!(s.root_callouts().len(), 1);
    let token = s.root_callouts()[0].token;
    s.respond(200, &[], b"", "via_upstream").unwrap();
    assert!(s.client_headers().is_none(), "held for the grouped eviction");
    s.answer_callout(token, Some(ANSWER)).unwrap();
    assert_eq!(s.client_status(), Some(200));
    s.finish().unwrap();

    // A request without a body sends nothing and waits for nothing.
    let mut s = vm.stream().unwrap();
    s.request_headers(&[(":method", "GET"), (":path", "/v1/namespaces")], true)
        .unwrap();
    s.respond(200, &[], b"", "via_upstream").unwrap();
    assert_eq!(s.client_status(), Some(200));
    assert_eq!(s.root_callouts().len(), 1, "no new callout");
}
