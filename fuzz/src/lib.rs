//! What the fuzz targets share: driving the filter's exchange the way Envoy does (the body in
//! pieces, cumulative, gzip or not) and the JSON comparisons their invariants need.

use hevlayer_filter::config::Config;
use hevlayer_filter::exchange::{Exchange, RequestHead, Step};
use serde_json::Value;
use std::io::Write;
use std::rc::Rc;

/// What the exchange made of a request body.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded: the body that went upstream.
    Forwarded(Vec<u8>),
    /// Answered locally with this status.
    Replied(u16),
}

/// Sends `body` through a fresh exchange as `POST path`, in pieces of `chunk` bytes, gzipped
/// when `gzip`, the stamp clock at `now`.
pub fn drive(path: &str, body: &[u8], chunk: usize, gzip: bool, now: u64) -> Outcome {
    let wire = if gzip {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let _ = enc.write_all(body);
        enc.finish().unwrap_or_default()
    } else {
        body.to_vec()
    };
    let mut ex = Exchange::new(Rc::new(Config::default()));
    let head = RequestHead {
        method: "POST",
        path,
        authorization: Some("Bearer fuzz"),
        content_encoding: gzip.then_some("gzip"),
        request_id: "fuzz",
        ..RequestHead::default()
    };
    match ex.on_request_headers(&head).1 {
        Step::Pause => {}
        Step::Reply(r) => return Outcome::Replied(r.status),
        other => return Outcome::Forwarded(format!("{other:?}").into_bytes()),
    }
    let mut buffered: Vec<u8> = Vec::new();
    let pieces: Vec<&[u8]> = if wire.is_empty() {
        vec![&[]]
    } else {
        wire.chunks(chunk.max(1)).collect()
    };
    let n = pieces.len();
    for (i, piece) in pieces.into_iter().enumerate() {
        buffered.extend_from_slice(piece);
        let end = i + 1 == n;
        let snapshot = buffered.clone();
        let mut read = |start: usize, len: usize| Some(snapshot[start..start + len].to_vec());
        match ex.on_request_body(buffered.len(), end, now, &mut read) {
            Step::Pause if !end => {}
            Step::Reply(r) => return Outcome::Replied(r.status),
            Step::Forward(Some(b)) => return Outcome::Forwarded(b),
            Step::Forward(None) => return Outcome::Forwarded(body.to_vec()),
            other => panic!("unexpected step {other:?}"),
        }
    }
    panic!("the body ended without an outcome")
}

/// Removes `key` from every object, at every depth.
pub fn strip(value: &mut Value, key: &str) {
    match value {
        Value::Object(map) => {
            map.remove(key);
            for v in map.values_mut() {
                strip(v, key);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| strip(v, key)),
        _ => {}
    }
}
