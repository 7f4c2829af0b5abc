//! Test support for the Layer gateway: a proxy-wasm host on wasmtime that runs the built filter,
//! and the pieces the benchmarks share.

pub mod bench_support;
pub mod wasm_host;

/// The filter's counters an accepted write ends in, exactly one each (the wasm tests and the
/// soak reconcile them against `hevlayer.writes_accepted`).
pub const MIRROR_OUTCOMES: [&str; 5] = [
    "hevlayer.mirror_ok",
    "hevlayer.mirror_failed",
    "hevlayer.mirror_timeout",
    "hevlayer.mirror_skipped",
    "hevlayer.writes_unanswered",
];
