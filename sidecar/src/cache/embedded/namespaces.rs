//! The embedded `DocumentStore`: the map of namespaces, each one's documents behind its own lock
//! (`documents::NamespaceDocs`), and the mirror batch, applied in chunks of that lock.

use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;

use super::documents::{Batch, Body, Garbage, NamespaceDocs};
use super::{lock, EmbeddedCache};
use crate::cache::{Attributes, CacheResult, CachedDoc, DocId, DocumentStore, MirrorOp, MirrorReport};

/// One namespace's documents, shared by the requests on it.
pub(super) type SharedNamespace = Arc<Mutex<NamespaceDocs>>;

/// Ops a mirror batch applies per hold of its namespace's lock. An op costs ~0.5 µs on the
/// benchmark machine (a busy 2-core VM), so a chunk holds the lock ~150 µs — less than one stage
/// or fetch request takes end to end — which bounds how long a fetch from that namespace (or
/// another mirror into it) waits, and the batch yields to the runtime between chunks so its
/// worker thread serves other requests. Each chunk costs ~2 µs more (the namespace lookup, the
/// lock, the tombstone prune, the yield): ~1.5% of a large batch, where 64 ops would cost 6%
/// and 4,096 would hold the lock for 2 ms.
pub(super) const MIRROR_CHUNK: usize = 256;

/// Frees what a mirror batch replaced. A large batch's (thousands of attribute maps, a third of
/// the batch's time, mostly the allocator coalescing cold memory) is freed on a blocking thread,
/// after the batch has answered: off the write's critical path, which waits for the mirror. A
/// small one, or one outside a tokio runtime, is freed here.
fn free_later(garbage: Garbage) {
    if garbage.len() < MIRROR_CHUNK {
        return;
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn_blocking(move || drop(garbage));
    }
}

impl EmbeddedCache {
    fn namespace(&self, ns: &str) -> Option<SharedNamespace> {
        self.namespaces
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(ns)
            .cloned()
    }

    fn namespace_or_create(&self, ns: &str) -> SharedNamespace {
        if let Some(found) = self.namespace(ns) {
            return found;
        }
        let mut map = self.namespaces.write().unwrap_or_else(PoisonError::into_inner);
        map.entry(ns.to_owned()).or_default().clone()
    }

    /// Runs `f` on the live documents of `namespace` under its lock, after pruning lapsed
    /// tombstones; creates the namespace when `create`, else answers `None` when it does not
    /// exist. A namespace purged between the lookup and the lock is looked up again (see
    /// `NamespaceDocs::dropped`). `f` gets the time the tombstones were pruned at.
    fn with_docs<T>(
        &self,
        namespace: &str,
        create: bool,
        f: impl FnOnce(&mut NamespaceDocs, u64) -> T,
    ) -> Option<T> {
        let now = crate::cache::now_ms();
        loop {
            let ns = if create {
                self.namespace_or_create(namespace)
            } else {
                self.namespace(namespace)?
            };
            let mut guard = lock(&ns);
            if guard.dropped {
                continue;
            }
            let freed = guard.prune_tombs(now);
            self.budget.release(freed);
            return Some(f(&mut guard, now));
        }
    }
}

#[async_trait]
impl DocumentStore for EmbeddedCache {
    async fn get_document(&self, namespace: &str, id: &DocId) -> CacheResult<Option<CachedDoc>> {
        Ok(self.namespace(namespace).and_then(|ns| lock(&ns).doc(id)))
    }

    async fn upsert_document(
        &self,
        namespace: &str,
        id: &DocId,
        attributes: Attributes,
        upserted_at: u64,
    ) -> CacheResult<bool> {
        let mut garbage = Garbage::new();
        self.with_docs(namespace, true, |docs, now| {
            docs.upsert(
                &self.budget,
                id.clone(),
                Body::Map(attributes),
                upserted_at,
                now,
                &mut garbage,
            )
        })
        .map_or(Ok(false), |r| r.map_err(|refused| refused.error))
    }

    async fn patch_document(
        &self,
        namespace: &str,
        id: &DocId,
        patch: Attributes,
        upserted_at: u64,
    ) -> CacheResult<bool> {
        let mut garbage = Garbage::new();
        // A patch of an uncached document leaves a tombstone (which may need the namespace).
        self.with_docs(namespace, true, |docs, now| {
            docs.patch(&self.budget, id, patch, upserted_at, now, &mut garbage)
        })
        .unwrap_or(Ok(false))
    }

    async fn evict_document(&self, namespace: &str, id: &DocId, refuse_up_to: u64) -> CacheResult<bool> {
        let mut garbage = Garbage::new();
        Ok(self
            .with_docs(namespace, true, |docs, now| {
                docs.evict(&self.budget, id.clone(), refuse_up_to, now, &mut garbage)
            })
            .unwrap_or(false))
    }

    async fn backfill_document(
        &self,
        namespace: &str,
        id: &DocId,
        attributes: Attributes,
        upserted_at: u64,
    ) -> CacheResult<bool> {
        self.with_docs(namespace, true, |docs, now| {
            docs.backfill(&self.budget, id, attributes, upserted_at, now)
        })
        .unwrap_or(Ok(false))
    }

    /// One batch: each hold of the namespace's lock applies the next `MIRROR_CHUNK` ops in plan
    /// order (so each document's ops stay in order), then the lock is released, what the chunk
    /// replaced is freed, and the task yields before the next chunk. Between chunks other
    /// requests run: a fetch may see the first chunks' documents before the later ones are
    /// written, as it could between two writes; a purge in between takes the chunks before it.
    /// The API runs a batch in a task of its own, so it is never cut between two chunks; a caller
    /// dropping the future directly stops it between two ops (each op is applied or not).
    async fn apply_mirror(&self, namespace: &str, ops: Vec<MirrorOp>, upserted_at: u64) -> MirrorReport {
        // Every op may leave something, a patch of an uncached document its tombstone.
        let create = !ops.is_empty();
        let mut batch = Batch::new(upserted_at);
        let mut ops = ops.into_iter();
        let mut garbage = Garbage::new();
        while ops.len() > 0 {
            let found = self.with_docs(namespace, create, |docs, now| {
                for op in ops.by_ref().take(MIRROR_CHUNK) {
                    batch.apply(docs, &self.budget, op, now, &mut garbage);
                }
            });
            if found.is_none() || ops.len() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        free_later(garbage);
        batch.into_report()
    }

    async fn purge_namespace(&self, namespace: &str) -> CacheResult<u64> {
        let removed = self
            .namespaces
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(namespace);
        let Some(ns) = removed else { return Ok(0) };
        let mut guard = lock(&ns);
        guard.dropped = true;
        let (docs, charged) = guard.take_all();
        self.budget.release(charged);
        Ok(docs)
    }
}
