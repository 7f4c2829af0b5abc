//! Runs the gateway benchmark's 1 KB `as_of` query through the filter's core N times (default 1):
//! request headers, body, response headers and the end of the stream, as the glue drives them,
//! and the worker's namespace tracker. A native profile target for the per-query work
//! (`valgrind --tool=callgrind`; instructions per query = (total at N) - (total at 1), / N-1).
//! With `POLLUTE_MB=M` it touches M MiB between queries, so that each query starts with cold
//! caches as in Envoy: `valgrind --tool=cachegrind --cache-sim=yes` then counts the cache lines
//! of code and data a query brings in (its footprint, which costs more than its instructions
//! there; see `filter-bench --cold`).

use hevlayer_filter::config::Config;
use hevlayer_filter::exchange::{Exchange, Step, WatermarkLookup};
use hevlayer_filter::watermark::Tracker;
use std::rc::Rc;

mod common;

fn query_body() -> Vec<u8> {
    let vector: Vec<String> = (0..110)
        .map(|i| format!("{:.4}", (i as f32 * 0.37).sin()))
        .collect();
    format!(
        r#"{{"rank_by":["vector","ANN",[{}]],"top_k":10,"include_attributes":["title"],"filters":["title","NotEq",null],"as_of":1795000000000}}"#,
        vector.join(",")
    )
    .into_bytes()
}

fn main() {
    let n = common::times();
    let body = query_body();
    let len = body.len().to_string();
    let config = Rc::new(Config::default());
    let mut tracker = Tracker::new(1_000, 60_000);
    let now_ms = 1_795_000_000_000;
    let mut forwarded = 0;
    let pollute_mb = std::env::var("POLLUTE_MB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let mut junk = vec![0u8; pollute_mb.unwrap_or(0) << 20];
    for round in 0..n {
        pollute(&mut junk, round);
        let mut exchange = Exchange::new(Rc::clone(&config));
        let lookup = |namespace: &str| tracker.watermark(namespace);
        let mut head = common::post("/v2/namespaces/bench/query", &len, now_ms);
        head.watermarks = Some(WatermarkLookup(&lookup));
        let _ = exchange.on_request_headers(&head);
        let step = exchange.on_request_body(body.len(), true, 0, &mut |start, size| {
            body.get(start..start + size).map(<[u8]>::to_vec)
        });
        if let Step::Forward(Some(rewritten)) = step {
            forwarded += rewritten.len();
        }
        let _ = exchange.on_response_headers(200, None, false, 0);
        exchange.on_stream_end();
        let _ = exchange.take_counters();
        for touch in exchange.take_touches() {
            tracker.touch(touch, now_ms);
        }
    }
    println!("{n} queries, {forwarded} bytes forwarded");
}

/// Evicts the caches between queries, as Envoy's own work does between a filter's callbacks.
#[inline(never)]
fn pollute(junk: &mut [u8], round: usize) {
    for i in (0..junk.len()).step_by(64) {
        junk[i] = junk[i].wrapping_add(round as u8);
    }
}
