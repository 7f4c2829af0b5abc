//! Any bytes as a query body, with or without a watermark, in any chunking, gzipped or not: no
//! panic, the same answer whatever the chunking, and a rewritten query is JSON that drops only
//! `as_of`/`between` and changes only `filters`.
#![no_main]

use hevlayer_fuzz::{drive, Outcome};
use hevlayer_filter::reads::{plan, render, WatermarkRule};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&control, body)) = data.split_first() else { return };
    let chunk = 1 + (control as usize & 0x3f);
    let gzip = control & 0x80 != 0;
    let rule = WatermarkRule {
        at_ms: (control & 0x40 != 0).then_some(99),
        always: control & 0x20 != 0,
    };
    if let Ok(p) = plan(body, rule) {
        let out = render(body, &p);
        let mut sent: serde_json::Value = serde_json::from_slice(&out).expect("rewritten query is JSON");
        let mut client: serde_json::Value = serde_json::from_slice(body).expect("accepted query is JSON");
        let scrub = |v: &mut serde_json::Value| {
            let scrub_one = |o: &mut serde_json::Map<String, serde_json::Value>| {
                for key in ["as_of", "between", "filters"] {
                    o.remove(key);
                }
            };
            if let Some(o) = v.as_object_mut() {
                scrub_one(o);
                if let Some(qs) = o.get_mut("queries").and_then(|q| q.as_array_mut()) {
                    for q in qs.iter_mut().filter_map(|q| q.as_object_mut()) {
                        scrub_one(q);
                    }
                }
            }
        };
        scrub(&mut sent);
        scrub(&mut client);
        assert_eq!(sent, client, "the rewrite changed more than the filters");
    }
    // Through the exchange (no watermark known there): chunking and gzip never change the answer.
    let whole = drive("/v2/namespaces/fuzz/query", body, body.len().max(1), false, 0);
    let pieces = drive("/v2/namespaces/fuzz/query", body, chunk, gzip, 0);
    assert_eq!(whole, pieces);
    if plan(body, WatermarkRule::default()).is_err() {
        assert_eq!(whole, Outcome::Replied(422));
    }
});
