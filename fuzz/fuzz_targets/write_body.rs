//! Any bytes as a write body, in any chunking, gzipped or not: the exchange never panics, its
//! answer does not depend on the chunking or gzip, and an accepted body goes upstream meaning
//! exactly what the client sent, plus the stamps (minus client stamps and shards).
#![no_main]

use hevlayer_fuzz::{drive, strip, Outcome};
use hevlayer_filter::write::{plan, render};
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_795_000_000_123;

fuzz_target!(|data: &[u8]| {
    let Some((&control, body)) = data.split_first() else { return };
    let chunk = 1 + (control as usize & 0x3f);
    let gzip = control & 0x80 != 0;
    let whole = drive("/v2/namespaces/fuzz", body, body.len().max(1), false, NOW);
    let pieces = drive("/v2/namespaces/fuzz", body, chunk, gzip, NOW);
    assert_eq!(whole, pieces, "chunking or gzip changed the answer");
    match plan(body) {
        Ok(p) => {
            let out = render(body, &p, NOW);
            assert_eq!(whole, Outcome::Forwarded(out.clone()));
            let mut sent: serde_json::Value = serde_json::from_slice(&out).expect("stamped body is JSON");
            let mut client: serde_json::Value = serde_json::from_slice(body).expect("accepted body is JSON");
            for key in ["_hevlayer_upserted_at", "_hevlayer_shard"] {
                strip(&mut sent, key);
                strip(&mut client, key);
            }
            for v in [&mut sent, &mut client] {
                if let Some(o) = v.as_object_mut() {
                    o.remove("return_affected_ids");
                }
            }
            assert_eq!(sent, client, "the stamped body means something else");
        }
        Err(_) => assert_eq!(whole, Outcome::Replied(422)),
    }
});
