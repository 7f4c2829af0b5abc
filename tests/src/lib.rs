//! Test support for the Layer gateway: a proxy-wasm host on wasmtime that runs the built filter,
//! and the pieces the benchmarks share.

pub mod bench_support;
pub mod wasm_host;
