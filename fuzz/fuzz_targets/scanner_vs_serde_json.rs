//! The scanner and serde_json agree on which byte strings are valid JSON (one meaning per body).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ours = hevlayer_filter::scan::validate(data).is_ok();
    let theirs = serde_json::from_slice::<serde_json::Value>(data).is_ok();
    assert_eq!(ours, theirs, "{:?}", String::from_utf8_lossy(data));
});
