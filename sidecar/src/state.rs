//! The state every handler shares: the document and pipeline stores, the gateway client, metrics, the clock and the
//! watermarks. Handlers use it; it uses no handler.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cache::mirror::result_label;
use crate::cache::{CacheError, CacheResult, DocumentStore, PipelineStore, StoreBackend, Stores};
use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::watermark::Watermarks;

/// The clock pipelines use for leases; tests move it forward instead of sleeping.
#[derive(Default)]
pub struct Clock {
    offset_ms: AtomicU64,
}

impl Clock {
    pub fn now_ms(&self) -> u64 {
        crate::cache::now_ms().saturating_add(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Moves this clock forward (tests only need it; harmless otherwise).
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

pub struct AppState {
    pub stores: Stores,
    pub gateway: Gateway,
    pub metrics: Metrics,
    pub clock: Clock,
    pub mirror_vectors: bool,
    pub cache_timeout: Duration,
    /// Fetches serve no cached copy older than this (`CACHE_MAX_AGE_SECONDS`).
    pub doc_max_age_ms: u64,
    pub watermarks: Watermarks,
    /// The runtime the state was built on (the main one, shared by its threads): large mirror
    /// callouts run there rather than on their connection's thread (`callouts::detached`), so a
    /// 10,000-row batch never holds up the evictions on the same thread. None outside a runtime.
    pub heavy: Option<tokio::runtime::Handle>,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    /// Runs one operation of the document store under the per-operation timeout and records it
    /// (`run_op`). `f` gets the store and returns the operation.
    pub async fn documents_op<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<dyn DocumentStore>) -> Fut,
        Fut: Future<Output = CacheResult<T>> + Send + 'static,
    {
        self.run_op(op, &self.stores.documents, f).await
    }

    /// Runs one operation of the pipeline store under the per-operation timeout and records it
    /// (`run_op`). `f` gets the store and returns the operation.
    pub async fn pipelines_op<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<dyn PipelineStore>) -> Fut,
        Fut: Future<Output = CacheResult<T>> + Send + 'static,
    {
        self.run_op(op, &self.stores.pipelines, f).await
    }

    /// Runs one store operation under the per-operation timeout and records it.
    ///
    /// A backend whose operations are several commands (`detach_ops`: Aerospike) runs each in its
    /// own task: when the timeout fires, or the client goes away, the caller stops waiting (503)
    /// but the operation still finishes, so it is never cut between two of its commands.
    async fn run_op<S, T, F, Fut>(&self, op: &'static str, store: &Arc<S>, f: F) -> Result<T, ApiError>
    where
        S: StoreBackend + ?Sized,
        T: Send + 'static,
        F: FnOnce(Arc<S>) -> Fut,
        Fut: Future<Output = CacheResult<T>> + Send + 'static,
    {
        let started = Instant::now();
        let timed_out = || {
            CacheError::Unavailable(format!(
                "{op} timed out after {} ms",
                self.cache_timeout.as_millis()
            ))
        };
        let fut = f(store.clone());
        let result = if store.detach_ops() {
            let mut task = tokio::spawn(fut);
            match tokio::time::timeout(self.cache_timeout, &mut task).await {
                Ok(Ok(r)) => r,
                Ok(Err(join)) => Err(CacheError::Unavailable(format!("{op} failed: {join}"))),
                // Dropping the handle leaves the task running to completion.
                Err(_) => Err(timed_out()),
            }
        } else {
            match tokio::time::timeout(self.cache_timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(timed_out()),
            }
        };
        self.metrics
            .record_cache_op(op, result_label(&result), started.elapsed());
        result.map_err(ApiError::from)
    }
}
