//! The embedded in-process store: the default backend when no Aerospike cluster is configured.
//!
//! Concurrency: a read-write lock over the map of namespaces (and of pipelines), and one mutex
//! per namespace and per pipeline, held only for in-memory work (never across an await), so a
//! claim is atomic with respect to every other operation on the same pipeline. Every operation
//! finishes within one poll, except a mirror batch, which yields between chunks of
//! `MIRROR_CHUNK` ops (see `namespaces`).
//!
//! Memory: every record is charged an estimate of its size against a byte budget; a write that
//! would go over it is refused with `CacheError::Full` (nothing is evicted behind the caller's
//! back), like Aerospike's stop-writes.
//!
//! Modules: `namespaces` (the `DocumentStore`: the namespaces and the mirror batch), `documents`
//! (one namespace's documents: their operations, weights and the batch's steps), `pipelines` (the
//! `PipelineStore`). This file holds the store, its byte budget and its health.

mod documents;
mod namespaces;
mod pipelines;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use async_trait::async_trait;

use self::namespaces::SharedNamespace;
use self::pipelines::PipelineState;
use super::{CacheError, CacheHealth, CacheResult, StoreBackend};

/// Fixed per-record overhead charged on top of the record's payload (map slots, headers).
const RECORD_OVERHEAD: usize = 160;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Default)]
struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    /// Charges `grow - shrink` bytes; refuses when growth would exceed the limit.
    fn charge(&self, grow: usize, shrink: usize) -> CacheResult<()> {
        if grow <= shrink {
            self.used.fetch_sub(shrink - grow, Ordering::AcqRel);
            return Ok(());
        }
        let delta = grow - shrink;
        let mut used = self.used.load(Ordering::Acquire);
        loop {
            let next = used.saturating_add(delta);
            if next > self.limit {
                return Err(CacheError::Full(format!(
                    "embedded store byte budget of {} bytes is exhausted ({used} bytes in use, {delta} more \
                     needed); delete pipelines or raise the budget",
                    self.limit
                )));
            }
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(actual) => used = actual,
            }
        }
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// The embedded store.
pub struct EmbeddedCache {
    budget: Budget,
    namespaces: RwLock<HashMap<String, SharedNamespace>>,
    pipelines: RwLock<HashMap<String, Arc<Mutex<PipelineState>>>>,
}

impl EmbeddedCache {
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            budget: Budget {
                limit: budget_bytes,
                used: AtomicUsize::new(0),
            },
            namespaces: RwLock::new(HashMap::new()),
            pipelines: RwLock::new(HashMap::new()),
        }
    }

    /// Bytes currently charged against the budget.
    pub fn used_bytes(&self) -> usize {
        self.budget.used.load(Ordering::Acquire)
    }
}

#[async_trait]
impl StoreBackend for EmbeddedCache {
    async fn health(&self) -> CacheHealth {
        CacheHealth {
            backend: "embedded",
            connected: true,
            detail: Some(format!(
                "{} of {} bytes in use",
                self.used_bytes(),
                self.budget.limit
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::namespaces::MIRROR_CHUNK;
    use super::*;
    use crate::cache::{
        Attributes, DocId, DocumentStore, MirrorOp, PipelineMeta, PipelineStore, STAGE_PENDING,
    };

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn embedded_meets_the_contract() {
        crate::cache::contract::run_all(&|| Arc::new(EmbeddedCache::new(64 << 20))).await;
    }

    #[tokio::test]
    async fn full_budget_refuses_writes_and_changes_nothing() {
        let cache = EmbeddedCache::new(4096);
        let meta = PipelineMeta {
            id: "p".into(),
            target_namespace: "t".into(),
            distance_metric: "cosine_distance".into(),
            created_at: String::new(),
        };
        cache.create_pipeline(meta).await.unwrap();
        cache
            .stage_document("p", "small", Bytes::from_static(b"[]"), 1)
            .await
            .unwrap();
        let used = cache.used_bytes();
        let big = Bytes::from(vec![b' '; 8192]);
        let err = cache
            .stage_document("p", "big", big.clone(), 1)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, CacheError::Full(m) if m.contains("budget")),
            "{err:?}"
        );
        assert_eq!(cache.used_bytes(), used);
        assert_eq!(cache.get_chunks("p", "big").await.unwrap(), None);
        // Re-staging an existing document with too much fails and keeps the old chunks and stage.
        assert!(cache.stage_document("p", "small", big, 1).await.is_err());
        assert_eq!(
            cache.get_chunks("p", "small").await.unwrap(),
            Some(Bytes::from_static(b"[]"))
        );
        assert_eq!(
            cache
                .stage_counts("p", 1)
                .await
                .unwrap()
                .counts
                .get(STAGE_PENDING),
            Some(&1)
        );
        // Documents too.
        let mut attrs = Attributes::new();
        attrs.insert("blob".into(), serde_json::Value::String("x".repeat(8192)));
        assert!(matches!(
            cache.upsert_document("ns", &DocId::Num(1), attrs, 1).await,
            Err(CacheError::Full(_))
        ));
        assert!(cache.get_document("ns", &DocId::Num(1)).await.unwrap().is_none());
        // Purging counts what it removed.
        let mut attrs = Attributes::new();
        attrs.insert("a".into(), serde_json::Value::from(1));
        cache
            .upsert_document("ns", &DocId::Num(2), attrs, 1)
            .await
            .unwrap();
        assert_eq!(cache.purge_namespace("ns").await.unwrap(), 1);
        assert_eq!(cache.purge_namespace("ns").await.unwrap(), 0);
        // Deleting frees the budget.
        assert!(cache.delete_pipeline("p").await.unwrap());
        assert_eq!(cache.used_bytes(), 0);
    }

    fn attrs(v: serde_json::Value) -> Attributes {
        v.as_object().cloned().unwrap()
    }

    fn big(bytes: usize) -> Attributes {
        attrs(serde_json::json!({ "blob": "x".repeat(bytes) }))
    }

    /// A refusal in the middle of a batch: the ops before it stay applied, the refused document
    /// is reported failed and evicted (no stale copy is left), its later upserts and patches are
    /// skipped, and every later op of other documents is still applied. The embedded batch and
    /// the op-by-op default answer alike.
    #[tokio::test]
    async fn a_budget_refusal_mid_batch_evicts_that_document_only() {
        for batched in [true, false] {
            let cache = EmbeddedCache::new(16 << 10);
            for doc in [2, 5] {
                cache
                    .upsert_document("ns", &DocId::Num(doc), attrs(serde_json::json!({"v": "old"})), 1)
                    .await
                    .unwrap();
            }
            let ops = vec![
                MirrorOp::Upsert(DocId::Num(1), attrs(serde_json::json!({"v": 1}))),
                MirrorOp::Upsert(DocId::Num(2), big(32 << 10)),
                MirrorOp::Patch(DocId::Num(2), attrs(serde_json::json!({"p": 1}))),
                MirrorOp::Upsert(DocId::Num(2), attrs(serde_json::json!({"v": "small"}))),
                MirrorOp::Upsert(DocId::Num(3), attrs(serde_json::json!({"v": 3}))),
                MirrorOp::Patch(DocId::Num(5), big(32 << 10)),
                MirrorOp::Evict(DocId::Num(4)),
                MirrorOp::Patch(DocId::Num(1), attrs(serde_json::json!({"p": 1}))),
            ];
            let report = if batched {
                cache.apply_mirror("ns", ops, 5).await
            } else {
                crate::cache::mirror::apply_op_by_op(&cache, "ns", ops, 5).await
            };
            let what = if batched { "batch" } else { "op by op" };
            assert!(
                matches!(&report.failure, Some(CacheError::Full(_))),
                "{what}: {report:?}"
            );
            // Applied: upsert 1, upsert 3, patch 1 (evicting the uncached 4 took no effect).
            assert_eq!((report.applied, report.failed), (3, 2), "{what}");
            let get = |doc: u64| {
                let id = DocId::Num(doc);
                let cache = &cache;
                async move { cache.get_document("ns", &id).await }
            };
            assert_eq!(
                get(1).await.unwrap().unwrap().attributes,
                attrs(serde_json::json!({"v": 1, "p": 1}))
            );
            assert!(get(2).await.unwrap().is_none(), "{what}: 2 was refused: evicted");
            assert_eq!(
                get(3).await.unwrap().unwrap().attributes,
                attrs(serde_json::json!({"v": 3}))
            );
            assert!(
                get(5).await.unwrap().is_none(),
                "{what}: 5's patch was refused: evicted"
            );
            // The failed documents' tombstones refuse older copies, not this write's own state.
            assert!(!cache
                .backfill_document("ns", &DocId::Num(2), Attributes::new(), 4)
                .await
                .unwrap());
            assert!(cache
                .backfill_document("ns", &DocId::Num(2), Attributes::new(), 5)
                .await
                .unwrap());
            cache.purge_namespace("ns").await.unwrap();
            assert_eq!(cache.used_bytes(), 0, "{what}: the budget is released exactly");
        }
    }

    /// A batch longer than one chunk releases the namespace lock and yields between chunks: on a
    /// single-threaded runtime, a fetch from the same namespace and a stage run (and see the
    /// first chunks applied) while the batch is still in progress, not after it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_large_batch_lets_fetches_and_stages_run_between_chunks() {
        let cache = Arc::new(EmbeddedCache::new(64 << 20));
        cache
            .create_pipeline(PipelineMeta {
                id: "p".into(),
                target_namespace: "ns".into(),
                distance_metric: "cosine_distance".into(),
                created_at: String::new(),
            })
            .await
            .unwrap();
        let n = (MIRROR_CHUNK * 8) as u64;
        let ops = (0..n)
            .map(|i| MirrorOp::Upsert(DocId::Num(i), attrs(serde_json::json!({"i": i}))))
            .collect();
        let batch = {
            let cache = cache.clone();
            tokio::spawn(async move { cache.apply_mirror("ns", ops, 1).await })
        };
        tokio::task::yield_now().await;
        let mut interleaved = 0;
        while !batch.is_finished() {
            let first = cache.get_document("ns", &DocId::Num(0)).await.unwrap();
            let last = cache.get_document("ns", &DocId::Num(n - 1)).await.unwrap();
            cache
                .stage_document("p", "d", Bytes::from_static(b"[]"), 1)
                .await
                .unwrap();
            if !batch.is_finished() {
                assert!(first.is_some(), "the first chunk is applied before the test runs");
                assert!(last.is_none(), "the last chunk is not applied yet");
                interleaved += 1;
            }
            tokio::task::yield_now().await;
        }
        assert!(interleaved >= 4, "ran between {interleaved} chunks");
        assert_eq!(batch.await.unwrap().applied, n);
    }

    /// On a multi-threaded runtime, a fetch made while a long batch runs on another worker
    /// answers long before the batch ends: it waits for one chunk at most.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fetch_does_not_wait_for_a_whole_batch() {
        let cache = Arc::new(EmbeddedCache::new(1 << 30));
        let n = 200_000u64;
        let ops: Vec<MirrorOp> = (0..n)
            .map(|i| MirrorOp::Upsert(DocId::Num(i), attrs(serde_json::json!({"i": i}))))
            .collect();
        let started = std::time::Instant::now();
        let batch = {
            let cache = cache.clone();
            tokio::spawn(async move { cache.apply_mirror("ns", ops, 1).await })
        };
        // Wait until the batch has begun.
        while cache.get_document("ns", &DocId::Num(0)).await.unwrap().is_none() {
            tokio::task::yield_now().await;
        }
        let fetch = std::time::Instant::now();
        assert!(cache
            .get_document("ns", &DocId::Num(n - 1))
            .await
            .unwrap()
            .is_none());
        let waited = fetch.elapsed();
        let still_running = !batch.is_finished();
        assert_eq!(batch.await.unwrap().applied, n);
        let whole = started.elapsed();
        assert!(
            still_running,
            "the batch ended before the fetch answered ({whole:?})"
        );
        assert!(
            waited * 4 < whole,
            "the fetch waited {waited:?} of a {whole:?} batch"
        );
    }
}
