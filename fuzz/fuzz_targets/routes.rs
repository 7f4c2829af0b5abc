//! Any method and path: classification and scopes never panic, and the canonical form of a path
//! classifies (and needs the same scope) like the path itself.
#![no_main]

use hevlayer_filter::route::{canonical, classify, required_scope};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (method, path) = text.split_once('\n').unwrap_or(("POST", &text));
    let route = classify(method, path);
    let scope = required_scope(method, path);
    let canon = canonical(path);
    assert_eq!(classify(method, &canon), route, "{path:?} -> {canon:?}");
    assert_eq!(required_scope(method, &canon), scope, "{path:?} -> {canon:?}");
    assert_eq!(canonical(&canon), canon, "canonical is idempotent");
});
