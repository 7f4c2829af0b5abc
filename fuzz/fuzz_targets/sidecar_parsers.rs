//! The sidecar's request parsers on any bytes: the mirror callout (parsed and planned), the
//! pipeline bodies, the filter's registration and eviction messages (as the filter defines them
//! and as the sidecar's evict route reads them, ids straight into document ids), and path ids.
//! Errors are fine; panics are not.
#![no_main]

use hevlayer_filter::sidecar_api::{EvictRequest, WatermarkRegistration};
use hevlayer_sidecar::callouts::EvictCallout;
use hevlayer_sidecar::extract::{check_id, parse_json};
use hevlayer_sidecar::mirror::{plan, MirrorCallout};
use hevlayer_sidecar::pipeline::{
    ClaimRequest, CreateRequest, HeartbeatRequest, SetStageRequest, StageRequest, VectorsRequest,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else { return };
    match which % 9 {
        0 => {
            if let Ok(callout) = parse_json::<MirrorCallout>(body) {
                let _ = plan(callout.write, callout.response.as_ref(), which & 0x80 != 0);
            }
        }
        1 => drop(parse_json::<CreateRequest>(body)),
        2 => drop(parse_json::<StageRequest>(body)),
        3 => drop(parse_json::<VectorsRequest>(body)),
        4 => drop(parse_json::<ClaimRequest>(body)),
        5 => drop(parse_json::<HeartbeatRequest>(body)),
        6 => drop(parse_json::<SetStageRequest>(body)),
        7 => {
            drop(parse_json::<WatermarkRegistration>(body));
            drop(parse_json::<EvictRequest>(body));
            drop(parse_json::<EvictCallout>(body));
        }
        _ => drop(check_id("document id", &String::from_utf8_lossy(body))),
    }
});
