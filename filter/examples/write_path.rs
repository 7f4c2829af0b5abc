//! Runs the gateway benchmark's 1-row write (4 KB, a base64 vector) through the filter's core N
//! times (default 1), as the glue drives it with an eviction ahead: request headers, body (the
//! stamped write and the eviction callout), the eviction's answer, the 2xx, the end of the
//! stream, and the mirror handed to the worker's queue. A native profile target for the
//! per-write work outside the sidecar (`valgrind --tool=callgrind`; per write = (total at N) -
//! (total at 1), / N-1).

use hevlayer_filter::config::Config;
use hevlayer_filter::exchange::{Exchange, Step};
use std::rc::Rc;

mod common;

fn write_body() -> Vec<u8> {
    // 768 floats as base64 (3,072 bytes -> 4,096 characters), like the official clients send.
    let vector: String = (0..4_096)
        .map(|i| char::from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[i % 64]))
        .collect();
    format!(
        r#"{{"upsert_rows":[{{"id":1,"vector":"{vector}","title":"one"}}],"distance_metric":"cosine_distance"}}"#
    )
    .into_bytes()
}

fn main() {
    let n = common::times();
    let body = write_body();
    let len = body.len().to_string();
    let config = Rc::new(Config::default());
    let json = [("content-type".to_owned(), "application/json".to_owned())];
    let mut mirrored = 0;
    for i in 0..n {
        let mut exchange = Exchange::new(Rc::clone(&config));
        let head = common::post("/v2/namespaces/bench", &len, 1_795_000_000_000);
        let _ = exchange.on_request_headers(&head);
        let stamp = 1_795_000_000_000 + i as u64;
        let step = exchange.on_request_body(body.len(), true, stamp, &mut |start, size| {
            body.get(start..start + size).map(<[u8]>::to_vec)
        });
        if !matches!(step, Step::ForwardWith(..)) {
            eprintln!("expected the write and its eviction, got another step");
            std::process::exit(1);
        }
        let _ = exchange.on_callout_answer(Some(200), &json, b"{}".to_vec(), stamp);
        let _ = exchange.on_response_headers(200, None, false, stamp);
        exchange.on_stream_end();
        let _ = exchange.take_counters();
        let _ = exchange.take_touches();
        mirrored += exchange
            .take_mirrors()
            .iter()
            .map(|m| m.body.len())
            .sum::<usize>();
    }
    println!("{n} writes, {mirrored} mirror bytes");
}
