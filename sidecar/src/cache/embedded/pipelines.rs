//! The embedded `PipelineStore`: each pipeline's staged documents behind its own lock, with the
//! indexes a claim, a lease expiry and the exact counts need.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use bytes::Bytes;

use super::{lock, EmbeddedCache, RECORD_OVERHEAD};
use crate::cache::{
    CacheError, CacheResult, ClaimArgs, DocState, HeartbeatArgs, PipelineMeta, PipelineStore, SetStageArgs,
    StageCounts, FAILED_REASON_SET_STAGE, RATE_WINDOW_SECONDS, STAGE_FAILED, STAGE_INDEXED, STAGE_PENDING,
};

/// Chunks of a document created by set-stage's `create_missing`.
const EMPTY_CHUNKS: &[u8] = b"[]";

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

pub(super) struct PipelineState {
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

impl EmbeddedCache {
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
impl PipelineStore for EmbeddedCache {
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
