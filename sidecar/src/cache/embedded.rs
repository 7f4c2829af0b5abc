//! The embedded in-process store: the default backend when no Aerospike cluster is configured.
//!
//! Concurrency: a read-write lock over the map of namespaces (and of pipelines), and one mutex
//! per namespace and per pipeline, held only for in-memory work (never across an await), so a
//! claim is atomic with respect to every other operation on the same pipeline. Every operation
//! finishes within one poll, except a mirror batch, which yields between chunks of
//! `MIRROR_CHUNK` ops (see `apply_mirror`).
//!
//! Memory: every record is charged an estimate of its size against a byte budget; a write that
//! would go over it is refused with `CacheError::Full` (nothing is evicted behind the caller's
//! back), like Aerospike's stop-writes.
//!
//! Mirrored documents (their operations, weights and the mirror batch) are in `documents`.

mod documents;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use async_trait::async_trait;
use bytes::Bytes;

use self::documents::{Batch, Garbage, NamespaceDocs};
use super::{
    Attributes, CacheError, CacheHealth, CacheResult, CachedDoc, ClaimArgs, DocId, DocState, DocumentCache,
    HeartbeatArgs, MirrorOp, MirrorReport, PipelineMeta, SetStageArgs, StageCounts, FAILED_REASON_SET_STAGE,
    RATE_WINDOW_SECONDS, STAGE_FAILED, STAGE_INDEXED, STAGE_PENDING,
};

/// Fixed per-record overhead charged on top of the record's payload (map slots, headers).
const RECORD_OVERHEAD: usize = 160;
/// Chunks of a document created by set-stage's `create_missing`.
const EMPTY_CHUNKS: &[u8] = b"[]";
/// Ops a mirror batch applies per hold of its namespace's lock. An op costs ~0.5 µs on the
/// benchmark machine (a busy 2-core VM), so a chunk holds the lock ~150 µs — less than one stage
/// or fetch request takes end to end — which bounds how long a fetch from that namespace (or
/// another mirror into it) waits, and the batch yields to the runtime between chunks so its
/// worker thread serves other requests. Each chunk costs ~2 µs more (the namespace lookup, the
/// lock, the tombstone prune, the yield): ~1.5% of a large batch, where 64 ops would cost 6%
/// and 4,096 would hold the lock for 2 ms.
const MIRROR_CHUNK: usize = 256;

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

struct StagedDoc {
    stage: Arc<str>,
    chunks: Bytes,
    lease: Option<Lease>,
    failed_reason: Option<&'static str>,
    /// Content version: a new one with every stage (see `DocState`).
    version: u64,
}

struct Lease {
    worker_id: Arc<str>,
    expires_ms: u64,
    duration_ms: u64,
    claimed_from: Arc<str>,
}

struct PipelineState {
    meta: PipelineMeta,
    docs: HashMap<Arc<str>, StagedDoc>,
    /// Documents per stage (leased or not): the exact counts.
    counts: HashMap<Arc<str>, u64>,
    /// Unleased documents per stage, ordered by id: what a claim can take (prefix = range scan).
    claimable: HashMap<Arc<str>, BTreeSet<Arc<str>>>,
    /// Active leases ordered by expiry.
    leases: BTreeSet<(u64, Arc<str>)>,
    failed_reasons: HashMap<&'static str, u64>,
    /// (second, documents that became indexed in it), oldest first.
    indexed_per_second: VecDeque<(u64, u64)>,
    /// Bytes charged to the budget for this pipeline's documents.
    bytes: usize,
    /// Set by delete: a request that found the pipeline before the delete must not touch it.
    deleted: bool,
    /// The last content version handed out.
    versions: u64,
}

fn staged_weight(id: &str, chunks: &Bytes) -> usize {
    // The id is held by the doc map, the claimable index and possibly the lease index (shared Arc).
    RECORD_OVERHEAD + id.len() + chunks.len()
}

impl PipelineState {
    fn new(meta: PipelineMeta) -> Self {
        Self {
            meta,
            docs: HashMap::new(),
            counts: HashMap::new(),
            claimable: HashMap::new(),
            leases: BTreeSet::new(),
            failed_reasons: HashMap::new(),
            indexed_per_second: VecDeque::new(),
            bytes: 0,
            deleted: false,
            versions: 0,
        }
    }

    fn next_version(&mut self) -> u64 {
        self.versions += 1;
        self.versions
    }

    fn stage_key(&self, stage: &str) -> Arc<str> {
        self.counts
            .get_key_value(stage)
            .map_or_else(|| Arc::from(stage), |(k, _)| k.clone())
    }

    /// Removes a document from the stage indexes (counts, claimable or lease, failed reason).
    fn unindex(&mut self, id: &Arc<str>) {
        let Some(doc) = self.docs.get_mut(id) else { return };
        if let Some(n) = self.counts.get_mut(&doc.stage) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.counts.remove(&doc.stage);
            }
        }
        match doc.lease.take() {
            Some(lease) => {
                self.leases.remove(&(lease.expires_ms, id.clone()));
            }
            None => {
                if let Some(set) = self.claimable.get_mut(&doc.stage) {
                    set.remove(id);
                    if set.is_empty() {
                        self.claimable.remove(&doc.stage);
                    }
                }
            }
        }
        if let Some(reason) = doc.failed_reason.take() {
            if let Some(n) = self.failed_reasons.get_mut(reason) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.failed_reasons.remove(reason);
                }
            }
        }
    }

    /// Puts an (unindexed) document into `stage`, leased or not, and indexes it.
    fn index(
        &mut self,
        id: &Arc<str>,
        stage: &str,
        lease: Option<Lease>,
        failed_reason: Option<&'static str>,
    ) {
        let stage = self.stage_key(stage);
        *self.counts.entry(stage.clone()).or_insert(0) += 1;
        match &lease {
            Some(l) => {
                self.leases.insert((l.expires_ms, id.clone()));
            }
            None => {
                self.claimable
                    .entry(stage.clone())
                    .or_default()
                    .insert(id.clone());
            }
        }
        let reason = if &*stage == STAGE_FAILED {
            Some(failed_reason.unwrap_or(FAILED_REASON_SET_STAGE))
        } else {
            None
        };
        if let Some(r) = reason {
            *self.failed_reasons.entry(r).or_insert(0) += 1;
        }
        if let Some(doc) = self.docs.get_mut(id) {
            doc.stage = stage;
            doc.lease = lease;
            doc.failed_reason = reason;
        }
    }

    /// Moves a document to `stage` without a lease; records an indexed transition.
    fn move_to(&mut self, id: &Arc<str>, stage: &str, now_ms: u64) {
        let was_indexed = self.docs.get(id).is_some_and(|d| &*d.stage == STAGE_INDEXED);
        self.unindex(id);
        self.index(id, stage, None, None);
        if stage == STAGE_INDEXED && !was_indexed {
            self.record_indexed(now_ms);
        }
    }

    fn record_indexed(&mut self, now_ms: u64) {
        let second = now_ms / 1000;
        match self.indexed_per_second.back_mut() {
            Some((s, n)) if *s == second => *n += 1,
            _ => self.indexed_per_second.push_back((second, 1)),
        }
        self.prune_rate(now_ms);
    }

    fn prune_rate(&mut self, now_ms: u64) {
        let oldest = (now_ms / 1000).saturating_sub(RATE_WINDOW_SECONDS - 1);
        while self.indexed_per_second.front().is_some_and(|(s, _)| *s < oldest) {
            self.indexed_per_second.pop_front();
        }
    }

    /// Returns every document whose lease expired to the stage it was claimed from.
    fn expire_leases(&mut self, now_ms: u64) {
        while let Some((expires, id)) = self.leases.first().cloned() {
            if expires > now_ms {
                break;
            }
            let from = self
                .docs
                .get(&id)
                .and_then(|d| d.lease.as_ref())
                .map(|l| l.claimed_from.clone());
            match from {
                Some(from) => {
                    self.unindex(&id);
                    self.index(&id, &from, None, None);
                }
                None => {
                    self.leases.remove(&(expires, id));
                }
            }
        }
    }

    fn claim(&mut self, args: &ClaimArgs) -> Vec<String> {
        self.expire_leases(args.now_ms);
        let prefix = args.document_id_prefix.as_deref().unwrap_or("");
        let picked: Vec<Arc<str>> = match self.claimable.get(args.stage.as_str()) {
            Some(set) => set
                .range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
                .take_while(|id| id.starts_with(prefix))
                .take(args.limit)
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        let worker: Arc<str> = Arc::from(args.worker_id.as_str());
        let from: Arc<str> = self.stage_key(&args.stage);
        let expires_ms = args.now_ms.saturating_add(args.lease_ms);
        for id in &picked {
            self.unindex(id);
            let lease = Lease {
                worker_id: worker.clone(),
                expires_ms,
                duration_ms: args.lease_ms,
                claimed_from: from.clone(),
            };
            self.index(id, &args.claim_stage, Some(lease), None);
        }
        picked.iter().map(|id| id.to_string()).collect()
    }

    fn heartbeat(&mut self, args: &HeartbeatArgs) -> u64 {
        self.expire_leases(args.now_ms);
        let mut updated = 0;
        let mut seen = HashSet::with_capacity(args.document_ids.len());
        for raw in &args.document_ids {
            if !seen.insert(raw.as_str()) {
                continue;
            }
            let Some((id, doc)) = self.docs.get_key_value(raw.as_str()) else {
                continue;
            };
            let id = id.clone();
            if &*doc.stage != args.stage.as_str() {
                continue;
            }
            let Some(lease) = &doc.lease else { continue };
            if &*lease.worker_id != args.worker_id.as_str() {
                continue;
            }
            let old = lease.expires_ms;
            let new = args.now_ms.saturating_add(lease.duration_ms);
            self.leases.remove(&(old, id.clone()));
            self.leases.insert((new, id.clone()));
            if let Some(lease) = self.docs.get_mut(&id).and_then(|d| d.lease.as_mut()) {
                lease.expires_ms = new;
            }
            updated += 1;
        }
        updated
    }
}

type SharedNamespace = Arc<Mutex<NamespaceDocs>>;

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
        let now = super::now_ms();
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

    /// Runs `f` on a live pipeline under its lock (a pipeline deleted meanwhile is not found).
    fn with_pipeline<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut PipelineState) -> CacheResult<T>,
    ) -> CacheResult<T> {
        let not_found = || CacheError::PipelineNotFound(id.to_owned());
        let p = self
            .pipelines
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
            .ok_or_else(not_found)?;
        let mut state = lock(&p);
        if state.deleted {
            return Err(not_found());
        }
        f(&mut state)
    }
}

#[async_trait]
impl DocumentCache for EmbeddedCache {
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

    async fn get_document(&self, namespace: &str, id: &DocId) -> CacheResult<Option<CachedDoc>> {
        Ok(self
            .namespace(namespace)
            .and_then(|ns| lock(&ns).docs.get(id).map(|(doc, _)| doc.clone())))
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
                attributes,
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
        self.with_docs(namespace, false, |docs, _| {
            docs.patch(&self.budget, id, patch, upserted_at, &mut garbage)
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
        // Patches alone never create anything: no namespace, nothing to merge into.
        let create = ops.iter().any(|op| !matches!(op, MirrorOp::Patch(..)));
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
        let docs = std::mem::take(&mut guard.docs);
        let tombs = std::mem::take(&mut guard.tombs);
        guard.tomb_order.clear();
        self.budget.release(docs.values().map(|(_, w)| *w).sum());
        self.budget.release(tombs.values().map(|t| t.2).sum());
        Ok(docs.len() as u64)
    }

    async fn create_pipeline(&self, meta: PipelineMeta) -> CacheResult<()> {
        let weight =
            RECORD_OVERHEAD + meta.id.len() + meta.target_namespace.len() + meta.distance_metric.len();
        let mut map = self.pipelines.write().unwrap_or_else(PoisonError::into_inner);
        if map.contains_key(&meta.id) {
            return Err(CacheError::PipelineExists(meta.id));
        }
        self.budget.charge(weight, 0)?;
        let mut state = PipelineState::new(meta);
        state.bytes = weight;
        map.insert(state.meta.id.clone(), Arc::new(Mutex::new(state)));
        Ok(())
    }

    async fn get_pipeline(&self, id: &str) -> CacheResult<Option<PipelineMeta>> {
        match self.with_pipeline(id, |state| Ok(state.meta.clone())) {
            Ok(meta) => Ok(Some(meta)),
            Err(CacheError::PipelineNotFound(_)) => Ok(None),
            Err(err) => Err(err),
        }
    }

    async fn list_pipelines(&self) -> CacheResult<Vec<PipelineMeta>> {
        let all: Vec<_> = self
            .pipelines
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let mut metas: Vec<PipelineMeta> = all
            .iter()
            .filter_map(|p| {
                let state = lock(p);
                (!state.deleted).then(|| state.meta.clone())
            })
            .collect();
        metas.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
        Ok(metas)
    }

    async fn delete_pipeline(&self, id: &str) -> CacheResult<bool> {
        let removed = self
            .pipelines
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        Ok(match removed {
            Some(p) => {
                let mut state = lock(&p);
                state.deleted = true;
                let bytes = std::mem::replace(&mut state.bytes, 0);
                // Free the memory now, not when the last in-flight request drops its handle.
                state.docs = HashMap::new();
                state.claimable = HashMap::new();
                state.leases = BTreeSet::new();
                self.budget.release(bytes);
                true
            }
            None => false,
        })
    }

    async fn stage_document(
        &self,
        pipeline: &str,
        document_id: &str,
        chunks_json: Bytes,
        now_ms: u64,
    ) -> CacheResult<()> {
        self.with_pipeline(pipeline, |state| {
            state.expire_leases(now_ms);
            let weight = staged_weight(document_id, &chunks_json);
            let existing = state
                .docs
                .get_key_value(document_id)
                .map(|(k, d)| (k.clone(), staged_weight(k, &d.chunks)));
            let old = existing.as_ref().map_or(0, |(_, w)| *w);
            self.budget.charge(weight, old)?;
            state.bytes = state.bytes + weight - old;
            let id = match existing {
                Some((id, _)) => {
                    state.unindex(&id);
                    id
                }
                None => Arc::from(document_id),
            };
            let pending = state.stage_key(STAGE_PENDING);
            let version = state.next_version();
            state.docs.insert(
                id.clone(),
                StagedDoc {
                    stage: pending,
                    chunks: chunks_json,
                    lease: None,
                    failed_reason: None,
                    version,
                },
            );
            state.index(&id, STAGE_PENDING, None, None);
            Ok(())
        })
    }

    async fn get_chunks(&self, pipeline: &str, document_id: &str) -> CacheResult<Option<Bytes>> {
        self.with_pipeline(pipeline, |state| {
            Ok(state.docs.get(document_id).map(|d| d.chunks.clone()))
        })
    }

    async fn document_stage(
        &self,
        pipeline: &str,
        document_id: &str,
        now_ms: u64,
    ) -> CacheResult<Option<DocState>> {
        self.with_pipeline(pipeline, |state| {
            state.expire_leases(now_ms);
            Ok(state.docs.get(document_id).map(|d| DocState {
                stage: d.stage.to_string(),
                version: d.version,
            }))
        })
    }

    async fn claim(&self, pipeline: &str, args: &ClaimArgs) -> CacheResult<Vec<String>> {
        self.with_pipeline(pipeline, |state| Ok(state.claim(args)))
    }

    async fn heartbeat(&self, pipeline: &str, args: &HeartbeatArgs) -> CacheResult<u64> {
        self.with_pipeline(pipeline, |state| Ok(state.heartbeat(args)))
    }

    async fn set_stage(&self, pipeline: &str, args: &SetStageArgs) -> CacheResult<u64> {
        self.with_pipeline(pipeline, |state| {
            state.expire_leases(args.now_ms);
            let creating = args.create_missing
                && args.from_stage.is_none()
                && args.worker_id.is_none()
                && args.only_version.is_none();
            // Charge every document create_missing adds before changing anything.
            if creating {
                let mut seen = BTreeSet::new();
                let grow: usize = args
                    .document_ids
                    .iter()
                    .filter(|id| !state.docs.contains_key(id.as_str()) && seen.insert(id.as_str()))
                    .map(|id| staged_weight(id, &Bytes::from_static(EMPTY_CHUNKS)))
                    .sum();
                if grow > 0 {
                    self.budget.charge(grow, 0)?;
                    state.bytes += grow;
                }
            }
            let mut updated = 0;
            let mut seen = HashSet::with_capacity(args.document_ids.len());
            for raw in &args.document_ids {
                if !seen.insert(raw.as_str()) {
                    continue;
                }
                let id = match state.docs.get_key_value(raw.as_str()) {
                    Some((id, doc)) => {
                        if args.from_stage.as_deref().is_some_and(|f| f != &*doc.stage) {
                            continue;
                        }
                        if args.only_version.is_some_and(|v| v != doc.version) {
                            continue;
                        }
                        if let Some(worker) = &args.worker_id {
                            if doc
                                .lease
                                .as_ref()
                                .is_none_or(|l| &*l.worker_id != worker.as_str())
                            {
                                continue;
                            }
                        }
                        id.clone()
                    }
                    None => {
                        // A missing document has no stage and no lease: with a from_stage or
                        // worker_id filter it cannot match.
                        if !creating {
                            continue;
                        }
                        let id: Arc<str> = Arc::from(raw.as_str());
                        let placeholder = state.stage_key(&args.stage);
                        let version = state.next_version();
                        state.docs.insert(
                            id.clone(),
                            StagedDoc {
                                stage: placeholder,
                                chunks: Bytes::from_static(EMPTY_CHUNKS),
                                lease: None,
                                failed_reason: None,
                                version,
                            },
                        );
                        state.index(&id, &args.stage, None, None);
                        if args.stage == STAGE_INDEXED {
                            state.record_indexed(args.now_ms);
                        }
                        updated += 1;
                        continue;
                    }
                };
                state.move_to(&id, &args.stage, args.now_ms);
                updated += 1;
            }
            Ok(updated)
        })
    }

    async fn stage_counts(&self, pipeline: &str, now_ms: u64) -> CacheResult<StageCounts> {
        self.with_pipeline(pipeline, |state| {
            state.expire_leases(now_ms);
            state.prune_rate(now_ms);
            Ok(StageCounts {
                counts: state.counts.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                failed_reasons: state
                    .failed_reasons
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), *v))
                    .collect(),
                leased: state.leases.len() as u64,
                indexed_in_window: state.indexed_per_second.iter().map(|(_, n)| n).sum(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn embedded_meets_the_contract() {
        crate::cache::contract::run_all(&|| Arc::new(EmbeddedCache::new(64 << 20)) as Arc<dyn DocumentCache>)
            .await;
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
