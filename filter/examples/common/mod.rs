//! What the profile examples share (each example uses a part of it).
#![allow(dead_code)]

use hevlayer_filter::exchange::RequestHead;
use hevlayer_filter::write::{plan, render};

/// The first argument as a count, 1 when absent.
pub fn times() -> usize {
    std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1)
}

/// A client's `POST` of `content_length` bytes to `path`, as the glue hands it to the exchange.
pub fn post<'a>(path: &'a str, content_length: &'a str, now_ms: u64) -> RequestHead<'a> {
    RequestHead {
        method: "POST",
        path,
        authorization: Some("Bearer bench"),
        content_length: Some(content_length),
        content_encoding: None,
        accept_encoding: None,
        content_type: Some("application/json"),
        request_id: "0123456789abcdef0123456789abcdef",
        traceparent: None,
        tracestate: None,
        end_of_stream: false,
        now_ms,
        watermarks: None,
        fences: None,
    }
}

/// One write's plan and render, out of line so that a profile can count it alone
/// (`valgrind --tool=callgrind --toggle-collect='*plan_and_render*'`).
#[inline(never)]
pub fn plan_and_render(body: &[u8]) -> usize {
    match plan(body) {
        Ok(p) => render(body, &p, 1_732_400_000_000).len() + p.ids(body).len(),
        Err(e) => {
            eprintln!("{}", e.message());
            std::process::exit(1);
        }
    }
}
