//! Layer gateway write filter.
//!
//! Everything except `glue` is plain Rust with no proxy-wasm dependency, tested natively: route
//! classification, auth, body accumulation, the single-pass JSON scanner, validation and stamping,
//! the query rewrite and the read watermark, and the mapping of upstream outcomes. `glue` (wasm32
//! only) moves bytes and headers between Envoy and that core and carries out its decisions.

pub mod auth;
pub mod body;
pub mod config;
pub mod error;
pub mod evict_group;
pub mod exchange;
pub mod fence;
pub mod metrics;
pub mod mirrors;
pub mod outcome;
pub mod pairs;
pub mod reads;
pub mod response;
pub mod route;
pub mod scan;
/// The callout wire types live in their own small crate, which the sidecar depends on instead of
/// on this one.
pub use hevlayer_sidecar_api as sidecar_api;
pub mod trace;
pub mod watermark;
pub mod write;

#[cfg(all(target_arch = "wasm32", feature = "glue"))]
mod glue;
