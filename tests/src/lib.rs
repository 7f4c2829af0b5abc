//! Test support for the Layer gateway: a proxy-wasm host on wasmtime that runs the built filter.
