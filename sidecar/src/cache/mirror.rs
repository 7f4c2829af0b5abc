//! Applying a planned mirror (SPEC §2.5) to a backend: the ops `crate::mirror::plan` produces,
//! what applying a batch of them reports, and the op-by-op path every backend gets by default
//! (`DocumentStore::apply_mirror`). The embedded store overrides it with a batch that takes its
//! namespace lock once per chunk of ops; both must meet the same contract (`contract/documents.rs`):
//!
//! - each document's ops take effect in plan order;
//! - the single-document rules hold for every op: a newer `_hevlayer_upserted_at` wins, a
//!   tombstone refuses older upserts, a patch merges only into a cached document (with none, it
//!   leaves a tombstone refusing copies up to its own stamp), the embedded byte budget refuses
//!   rather than evicts;
//! - an op that fails (unavailable, full) does not stop the batch: its document is evicted, best
//!   effort, with a tombstone refusing copies older than this write (so no stale copy outlives
//!   what Turbopuffer now holds), its later upserts and patches in the batch are skipped (its
//!   later evictions still run), and every other document is still mirrored;
//! - `applied` counts the ops that took effect (written, merged, or evicted a cached document);
//!   the failure-eviction of a failed document is not counted;
//! - the reported failure is the one of the earliest failed op in plan order.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use super::{Attributes, AttributesJson, CacheError, CacheResult, DocId, DocumentStore};

/// One effect on the cached document of `id`.
#[derive(Debug, Clone, PartialEq)]
pub enum MirrorOp {
    /// Replace the cached document (unless it is newer).
    Upsert(DocId, Attributes),
    /// `Upsert` with the attributes as the JSON text they came as (row-form upserts).
    UpsertJson(DocId, AttributesJson),
    /// Merge into the cached document if it is cached (and not newer).
    Patch(DocId, Attributes),
    /// Drop the cached document: it was deleted (a tombstone refuses copies up to this write).
    Evict(DocId),
    /// Drop the cached document: it changed upstream in a way the mirror cannot replay
    /// (`patch_by_filter`); copies older than this write are refused.
    Invalidate(DocId),
}

impl MirrorOp {
    pub fn id(&self) -> &DocId {
        match self {
            Self::Upsert(id, _)
            | Self::UpsertJson(id, _)
            | Self::Patch(id, _)
            | Self::Evict(id)
            | Self::Invalidate(id) => id,
        }
    }

    /// The cache operation applying it, as metrics name it.
    pub fn cache_op(&self) -> &'static str {
        match self {
            Self::Upsert(..) | Self::UpsertJson(..) => "upsert_document",
            Self::Patch(..) => "patch_document",
            Self::Evict(_) | Self::Invalidate(_) => "evict_document",
        }
    }
}

/// The stamp up to which the tombstone of an eviction refuses copies: a delete refuses this
/// write's own stamp too (the document is gone as of it); an invalidation or a failed op only
/// older ones (this write's state may be cached again).
pub fn refuse_up_to(op: &MirrorOp, upserted_at: u64) -> u64 {
    match op {
        MirrorOp::Evict(_) => upserted_at,
        _ => upserted_at.saturating_sub(1),
    }
}

/// The time and outcome of one cache operation, for `hevlayer_sidecar_cache_op_seconds`.
#[derive(Debug, Clone, PartialEq)]
pub struct OpTiming {
    pub op: &'static str,
    pub result: &'static str,
    pub elapsed: Duration,
}

/// The metrics label of a cache operation's result.
pub fn result_label<T>(result: &CacheResult<T>) -> &'static str {
    result.as_ref().err().map_or("ok", error_label)
}

/// The metrics label of a cache operation that failed (a missing or duplicate pipeline is an
/// answer, not a failure of the cache).
pub fn error_label(err: &CacheError) -> &'static str {
    match err {
        CacheError::PipelineNotFound(_) | CacheError::PipelineExists(_) => "ok",
        CacheError::Unavailable(_) => "unavailable",
        CacheError::Full(_) => "full",
    }
}

/// What applying a mirror batch did.
#[derive(Debug, Default)]
pub struct MirrorReport {
    /// Ops that took effect.
    pub applied: u64,
    /// Documents an op failed for (each counted once).
    pub failed: u64,
    /// The failure of the earliest failed op in plan order.
    pub failure: Option<CacheError>,
    /// The single-document operations the op-by-op path ran; empty when the backend applied the
    /// batch as a whole (the API then records the batch as one `mirror_batch` operation).
    pub ops: Vec<OpTiming>,
}

/// Lanes the op-by-op path spreads documents over (one document's ops stay in order in one lane).
pub const MIRROR_LANES: usize = 16;

/// What one lane did; `failure` carries the plan index of its earliest failed op.
#[derive(Default)]
struct LaneReport {
    applied: u64,
    failed: u64,
    failure: Option<(usize, CacheError)>,
    ops: Vec<OpTiming>,
}

/// The default `apply_mirror`: each op through the single-document methods, documents spread
/// over `MIRROR_LANES` lanes polled concurrently (one document's ops in order in one lane).
///
/// Nothing here is spawned or timed out: the API runs the whole batch in a task of its own (a
/// caller giving up cannot cut it), so every operation runs to completion, and a backend bounds
/// each of its commands itself (Aerospike: `CACHE_OP_TIMEOUT_MS` per command, and the breaker).
pub async fn apply_op_by_op<C: DocumentStore + ?Sized>(
    cache: &C,
    namespace: &str,
    ops: Vec<MirrorOp>,
    upserted_at: u64,
) -> MirrorReport {
    let lanes = spread(ops);
    let reports = join_all(
        lanes
            .into_iter()
            .filter(|lane| !lane.is_empty())
            .map(|lane| run_lane(cache, namespace, lane, upserted_at)),
    )
    .await;
    let mut report = MirrorReport::default();
    let mut earliest: Option<(usize, CacheError)> = None;
    for lane in reports {
        report.applied += lane.applied;
        report.failed += lane.failed;
        report.ops.extend(lane.ops);
        if let Some((at, err)) = lane.failure {
            if earliest.as_ref().is_none_or(|(first, _)| at < *first) {
                earliest = Some((at, err));
            }
        }
    }
    report.failure = earliest.map(|(_, err)| err);
    report
}

/// Spreads ops over lanes by document, round robin in order of first appearance, each op with
/// its plan index.
fn spread(ops: Vec<MirrorOp>) -> Vec<Vec<(usize, MirrorOp)>> {
    let mut lanes: Vec<Vec<(usize, MirrorOp)>> = (0..MIRROR_LANES).map(|_| Vec::new()).collect();
    let mut lane_of: HashMap<DocId, usize> = HashMap::new();
    for (at, op) in ops.into_iter().enumerate() {
        let next = lane_of.len() % MIRROR_LANES;
        let lane = *lane_of.entry(op.id().clone()).or_insert(next);
        if let Some(l) = lanes.get_mut(lane) {
            l.push((at, op));
        }
    }
    lanes
}

async fn run_lane<C: DocumentStore + ?Sized>(
    cache: &C,
    namespace: &str,
    lane: Vec<(usize, MirrorOp)>,
    upserted_at: u64,
) -> LaneReport {
    let mut report = LaneReport::default();
    let mut failed_ids = std::collections::HashSet::new();
    for (at, op) in lane {
        let skipped = matches!(
            op,
            MirrorOp::Upsert(..) | MirrorOp::UpsertJson(..) | MirrorOp::Patch(..)
        ) && failed_ids.contains(op.id());
        if skipped {
            continue;
        }
        let name = op.cache_op();
        let refuse = refuse_up_to(&op, upserted_at);
        let started = Instant::now();
        let (id, result) = match op {
            MirrorOp::Upsert(id, attrs) => {
                let r = cache.upsert_document(namespace, &id, attrs, upserted_at).await;
                (id, r)
            }
            MirrorOp::UpsertJson(id, json) => {
                let r = cache
                    .upsert_document_json(namespace, &id, json, upserted_at)
                    .await;
                (id, r)
            }
            MirrorOp::Patch(id, attrs) => {
                let r = cache.patch_document(namespace, &id, attrs, upserted_at).await;
                (id, r)
            }
            MirrorOp::Evict(id) | MirrorOp::Invalidate(id) => {
                let r = cache.evict_document(namespace, &id, refuse).await;
                (id, r)
            }
        };
        report.ops.push(timing(name, &result, started));
        match result {
            Ok(true) => report.applied += 1,
            Ok(false) => {}
            Err(err) => {
                let started = Instant::now();
                // Best effort: leave no stale copy behind what Turbopuffer now holds.
                let evicted = cache
                    .evict_document(namespace, &id, upserted_at.saturating_sub(1))
                    .await;
                report.ops.push(timing("evict_document", &evicted, started));
                if failed_ids.insert(id) {
                    report.failed += 1;
                }
                if report.failure.is_none() {
                    report.failure = Some((at, err));
                }
            }
        }
    }
    report
}

fn timing<T>(op: &'static str, result: &CacheResult<T>, started: Instant) -> OpTiming {
    OpTiming {
        op,
        result: result_label(result),
        elapsed: started.elapsed(),
    }
}
