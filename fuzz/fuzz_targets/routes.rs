//! Any method, path and header values: route classification, scopes, authentication and the
//! content-encoding check never panic; the canonical form of a path classifies (and needs the
//! same scope) like the path itself; a key is accepted only with the exact `Bearer ` prefix.
#![no_main]

use hevlayer_filter::auth::{authenticate, Credential};
use hevlayer_filter::body::is_gzip;
use hevlayer_filter::config::Config;
use hevlayer_filter::route::{canonical, classify, required_scope};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let method = parts.next().unwrap_or("POST");
    let path = parts.next().unwrap_or("");
    let header = parts.next().unwrap_or("");
    let route = classify(method, path);
    let scope = required_scope(method, path);
    let canon = canonical(path);
    assert_eq!(classify(method, &canon), route, "{path:?} -> {canon:?}");
    assert_eq!(required_scope(method, &canon), scope, "{path:?} -> {canon:?}");
    assert_eq!(canonical(&canon), canon, "canonical is idempotent");
    let _ = is_gzip(Some(header));
    match authenticate(&Config::default(), Some(header), scope) {
        Ok(Credential::Keep) => assert!(header.starts_with("Bearer ") && header.len() > 7, "{header:?}"),
        Ok(Credential::Replace(_)) => panic!("passthrough mode never replaces the key"),
        Err(reply) => assert_eq!(reply.status, 401),
    }
});
