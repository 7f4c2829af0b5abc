//! Pipelines on Aerospike: the pipeline records, staged documents, and the operations of the
//! pipeline API, built on `journal` (counts), `queue` (claims) and `leases` (expiry).
//!
//! A pipeline is a record in `<pipeline prefix>#meta` (key: its id) holding its definition and
//! an *incarnation* (a random id given at create), plus an entry in the listing index. Every
//! record of the pipeline lives in its set under keys prefixed by the incarnation, so a request
//! still in flight for a deleted pipeline writes where no later pipeline of the same id looks:
//! create needs no truncate, and delete's truncate is only garbage collection.
//!
//! Orders (any prefix of an operation leaves a consistent state):
//! - create: listing index entry, then the pipeline record (a listing entry without a record is
//!   skipped by readers);
//! - delete: the pipeline record, then the index entry, then the set (each later step only
//!   collects what is already unreachable);
//! - a document move (stage, set-stage, claim, expiry): queue slot first when it enters a
//!   queue (`queue`), lease index entries first when it takes a lease (`leases`), then the
//!   journal entry with the counters (`journal`), then the document write, then the entry close.
//!
//! A document record with an empty `stage` is a placeholder (written by a repair to fence a
//! create that never happened): it reads as absent.

mod claim;

use std::collections::HashSet;
use std::time::Duration;

use aerospike::operations::{maps, MapOrder, MapPolicy, MapReturnType, MapWriteFlags, Operation};
use aerospike::{BatchOperation, BatchReadPolicy, Bin, Bins, Value};
use async_trait::async_trait;
use bytes::Bytes;

use super::journal::{deltas, Entry, Opened, GRACE_MS};
use super::records::{state_bins, Pipe, StagedRecord, QN_NONE};
use super::{all, bin_str, map_entries, ms_i64, AerospikeCache, Cond, Written, MAX_RMW_ATTEMPTS};
use crate::cache::{
    CacheError, CacheResult, ClaimArgs, DocState, HeartbeatArgs, PipelineMeta, PipelineStore, SetStageArgs,
    StageCounts, STAGE_PENDING,
};

/// A document move: from `old` (as read; `None`: no record) to `next`.
struct Move {
    id: String,
    old: Option<StagedRecord>,
    next: StagedRecord,
    /// Chunks written too (stage, create-missing).
    chunks: Option<String>,
    /// Give the document a new content version (stage, create-missing).
    new_version: bool,
}

enum Moved {
    /// Done; the journal entry to close, if the move was journaled.
    Yes(Option<Entry>),
    /// Another move of the document is in flight.
    Busy,
    /// The document changed since it was read.
    Conflict,
}

/// Whether the heartbeat's worker holds the document's lease in the heartbeat's stage.
fn holds_lease(d: &StagedRecord, args: &HeartbeatArgs) -> bool {
    d.present() && d.stage == args.stage && d.leased() && d.worker == args.worker_id
}

/// Runs the async closure over `ids` in parallel and counts the `true`s; the first error wins.
async fn count_true<F, Fut>(ids: &[String], f: F) -> CacheResult<u64>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = CacheResult<bool>>,
{
    let mut updated = 0;
    let mut failure = None;
    let futures: Vec<_> = ids.iter().cloned().map(f).collect();
    for result in all(futures).await {
        match result {
            Ok(true) => updated += 1,
            Ok(false) => {}
            Err(err) => {
                failure.get_or_insert(err);
            }
        }
    }
    match failure {
        Some(err) => Err(err),
        None => Ok(updated),
    }
}

impl AerospikeCache {
    fn pipelines_set(&self) -> String {
        format!("{}#meta", self.settings.pipeline_set_prefix)
    }

    fn pipeline_index_set(&self) -> String {
        format!("{}#index", self.settings.pipeline_set_prefix)
    }

    fn meta_from(id: &str, rec: &aerospike::Record) -> PipelineMeta {
        PipelineMeta {
            id: id.to_owned(),
            target_namespace: bin_str(rec, "target").unwrap_or_default(),
            distance_metric: bin_str(rec, "metric").unwrap_or_default(),
            created_at: bin_str(rec, "created").unwrap_or_default(),
        }
    }

    fn remember_incarnation(&self, id: &str, inc: Option<&str>) {
        let mut map = self
            .incarnations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match inc {
            Some(inc) => {
                if map.len() >= 10_000 {
                    map.clear();
                }
                map.insert(id.to_owned(), inc.to_owned());
            }
            None => {
                map.remove(id);
            }
        }
    }

    /// Reads the pipeline's record and, in the same batch, the records `extra` names in its set
    /// (keyed by the incarnation this process last saw; read again if that was stale).
    pub(super) async fn open_pipeline(
        &self,
        id: &str,
        extra: impl Fn(&Pipe) -> Vec<(Value, Bins)>,
    ) -> CacheResult<(Pipe, Vec<Option<aerospike::Record>>)> {
        let set = super::set_name(&self.settings.pipeline_set_prefix, id);
        let mut inc = self
            .incarnations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .cloned();
        for _ in 0..3 {
            let guess = inc.clone().map(|inc| Pipe {
                id: id.to_owned(),
                set: set.clone(),
                inc,
            });
            let rp = BatchReadPolicy::default();
            let mut rows = vec![BatchOperation::read(
                &rp,
                self.key(&self.pipelines_set(), Value::String(id.to_owned()))?,
                Bins::All,
            )];
            if let Some(pipe) = &guess {
                for (key, bins) in extra(pipe) {
                    rows.push(BatchOperation::read(&rp, self.key(&set, key)?, bins));
                }
            }
            let mut records = self.run_batch(rows).await?.into_iter();
            let Some(meta) = records.next().flatten() else {
                self.remember_incarnation(id, None);
                return Err(CacheError::PipelineNotFound(id.to_owned()));
            };
            let actual = bin_str(&meta, "inc").unwrap_or_default();
            match guess {
                Some(pipe) if pipe.inc == actual => return Ok((pipe, records.collect())),
                _ => {
                    self.remember_incarnation(id, Some(&actual));
                    inc = Some(actual);
                }
            }
        }
        Err(CacheError::Unavailable(format!(
            "pipeline '{id}' is being re-created; try again"
        )))
    }

    pub(super) async fn read_state(&self, pipe: &Pipe, id: &str) -> CacheResult<Option<StagedRecord>> {
        Ok(self
            .get(&pipe.set, pipe.doc_key(id), state_bins())
            .await?
            .map(|r| StagedRecord::from_record(&r)))
    }

    pub(super) async fn read_states(
        &self,
        pipe: &Pipe,
        ids: &[String],
    ) -> CacheResult<Vec<Option<StagedRecord>>> {
        let keys = ids.iter().map(|id| pipe.doc_key(id)).collect();
        Ok(self
            .batch_get(&pipe.set, keys, state_bins())
            .await?
            .into_iter()
            .map(|r| r.map(|r| StagedRecord::from_record(&r)))
            .collect())
    }

    /// Bumps a document's generation (keeping everything else) if it is still at the one read.
    pub(super) async fn fence(&self, pipe: &Pipe, id: &str, doc: &StagedRecord) -> CacheResult<Written> {
        let bins = [Bin::new("tx", Value::Int(doc.tx))];
        self.put(
            &pipe.set,
            pipe.doc_key(id),
            &bins,
            Cond::Gen(doc.generation),
            None,
        )
        .await
    }

    /// Fences a create that has not happened: a placeholder record.
    pub(super) async fn fence_missing(&self, pipe: &Pipe, id: &str) -> CacheResult<Written> {
        let bins = [
            Bin::new("stage", Value::String(String::new())),
            Bin::new("tx", Value::Int(0)),
        ];
        self.put(&pipe.set, pipe.doc_key(id), &bins, Cond::Create, None)
            .await
    }

    /// Applies one move (see the module doc for the order of its commands).
    async fn apply_move(&self, pipe: &Pipe, mv: Move, now_ms: u64) -> CacheResult<Moved> {
        let Move {
            id,
            old,
            mut next,
            chunks,
            new_version,
        } = mv;
        let old_acct = old.as_ref().and_then(StagedRecord::acct);
        let new_acct = next.acct();
        let cond = old.as_ref().map_or(Cond::Create, |o| Cond::Gen(o.generation));
        next.ver = if new_version {
            self.unique_id()
        } else {
            old.as_ref().map_or(0, |o| o.ver)
        };
        next.qn = QN_NONE;
        if !next.leased() {
            let gen = old.as_ref().map_or(0, |o| o.generation);
            next.qn = self.enqueue(pipe, &next.stage, &id, gen, now_ms).await?;
        }
        let journaled = !deltas(old_acct.as_ref(), new_acct.as_ref()).is_empty();
        let entry = if journaled {
            let entry = Entry::new(self.unique_id(), now_ms, old_acct, new_acct);
            if let Opened::Busy = self.journal_open(pipe, &id, &entry, now_ms).await? {
                return Ok(Moved::Busy);
            }
            next.tx = entry.tx;
            Some(entry)
        } else {
            next.tx = old.as_ref().map_or(0, |o| o.tx);
            None
        };
        let mut bins = next.bins();
        if let Some(chunks) = chunks {
            bins.push(Bin::new("chunks", Value::String(chunks)));
        }
        match self.put(&pipe.set, pipe.doc_key(&id), &bins, cond, None).await? {
            Written::Yes => Ok(Moved::Yes(entry)),
            Written::Conflict => {
                if let Some(entry) = &entry {
                    // The server refused the write (and writes are never retried by the client,
                    // so it cannot land later): the entry's counters must not stand.
                    self.journal_undo(pipe, &id, entry, now_ms).await?;
                }
                Ok(Moved::Conflict)
            }
        }
    }

    /// Waits for, or repairs, the move in flight on `id`.
    async fn settle_busy(&self, pipe: &Pipe, id: &str, now_ms: u64) -> CacheResult<()> {
        if !self.settle_stale(pipe, id, now_ms).await? {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// Repairs the move in flight on `id` if it is older than `GRACE_MS` (its owner is presumed
    /// gone). True when nothing is in flight any more.
    async fn settle_stale(&self, pipe: &Pipe, id: &str, now_ms: u64) -> CacheResult<bool> {
        match self.journal_entry(pipe, id).await? {
            Some(e) if e.created_ms.saturating_add(ms_i64(GRACE_MS)) <= ms_i64(now_ms) => {
                self.journal_repair(pipe, id, &e, now_ms).await?;
                Ok(true)
            }
            Some(_) => Ok(false),
            None => Ok(true),
        }
    }

    /// Moves `id` with `plan` (from its current state to the next one, or `None`: leave it),
    /// re-reading and retrying on conflict. True when moved.
    async fn move_with<F>(
        &self,
        pipe: &Pipe,
        id: &str,
        mut doc: Option<StagedRecord>,
        now_ms: u64,
        plan: F,
    ) -> CacheResult<bool>
    where
        F: Fn(Option<&StagedRecord>) -> Option<(StagedRecord, Option<String>, bool)>,
    {
        for attempt in 0..MAX_RMW_ATTEMPTS {
            if attempt > 0 {
                doc = self.read_state(pipe, id).await?;
            }
            let current = doc.as_ref().filter(|d| d.present());
            let Some((next, chunks, new_version)) = plan(current) else {
                return Ok(false);
            };
            let mv = Move {
                id: id.to_owned(),
                old: doc.clone(),
                next,
                chunks,
                new_version,
            };
            match self.apply_move(pipe, mv, now_ms).await? {
                Moved::Yes(entry) => {
                    if let Some(entry) = entry {
                        self.journal_close(pipe, vec![(id.to_owned(), entry)]).await;
                    }
                    return Ok(true);
                }
                Moved::Busy => self.settle_busy(pipe, id, now_ms).await?,
                Moved::Conflict => {}
            }
        }
        Err(CacheError::Unavailable(format!(
            "too much contention on staged document '{id}'"
        )))
    }

    /// Returns an expired lease's document to the stage it was claimed from (if that lease is
    /// still the one indexed).
    pub(super) async fn expire_one(&self, pipe: &Pipe, id: &str, expires: i64, now: i64) -> CacheResult<()> {
        let now_ms = u64::try_from(now).unwrap_or(0);
        let doc = self.read_state(pipe, id).await?;
        self.move_with(pipe, id, doc, now_ms, |doc| {
            let doc = doc?;
            if !doc.leased() || doc.lease_expires != expires || doc.lease_expires > now {
                return None;
            }
            Some((StagedRecord::unleased(&doc.from), None, false))
        })
        .await
        .map(|_| ())
    }

    /// One map operation on the pipeline listing (the `m` bin of the index record `all`).
    async fn update_pipeline_index(&self, op: Operation) -> CacheResult<()> {
        self.operate(
            &self.pipeline_index_set(),
            Value::String("all".into()),
            vec![op],
            Cond::Any,
            None,
        )
        .await?
        .map(|_| ())
        .map_err(|code| {
            CacheError::Unavailable(format!("pipeline index update failed with result code {code}"))
        })
    }

    // ------------------------------------------------------------------ the operations

    pub(super) async fn pipeline_create(&self, meta: PipelineMeta) -> CacheResult<()> {
        let set = super::set_name(&self.settings.pipeline_set_prefix, &meta.id);
        // Listed first: a listing entry without a pipeline record is skipped by readers.
        let policy = MapPolicy::new(MapOrder::KeyOrdered, MapWriteFlags::DEFAULT);
        self.update_pipeline_index(maps::put(
            &policy,
            "m",
            Value::String(meta.id.clone()),
            Value::String(meta.created_at.clone()),
        ))
        .await?;
        let inc = format!("{:016x}", self.unique_id());
        let bins = [
            Bin::new("target", Value::String(meta.target_namespace.clone())),
            Bin::new("metric", Value::String(meta.distance_metric.clone())),
            Bin::new("created", Value::String(meta.created_at.clone())),
            Bin::new("set", Value::String(set)),
            Bin::new("inc", Value::String(inc.clone())),
        ];
        match self
            .put(
                &self.pipelines_set(),
                Value::String(meta.id.clone()),
                &bins,
                Cond::Create,
                None,
            )
            .await?
        {
            Written::Yes => {
                self.remember_incarnation(&meta.id, Some(&inc));
                Ok(())
            }
            Written::Conflict => Err(CacheError::PipelineExists(meta.id)),
        }
    }

    pub(super) async fn pipeline_get(&self, id: &str) -> CacheResult<Option<PipelineMeta>> {
        Ok(self
            .get(&self.pipelines_set(), Value::String(id.to_owned()), Bins::All)
            .await?
            .map(|rec| Self::meta_from(id, &rec)))
    }

    pub(super) async fn pipeline_list(&self) -> CacheResult<Vec<PipelineMeta>> {
        let index = self
            .get(&self.pipeline_index_set(), Value::String("all".into()), Bins::All)
            .await?;
        let ids: Vec<String> = map_entries(index.as_ref().and_then(|r| r.bins.get("m")))
            .into_iter()
            .filter_map(|(k, _)| match k {
                Value::String(s) => Some(s),
                _ => None,
            })
            .collect();
        let keys = ids.iter().map(|id| Value::String(id.clone())).collect();
        let records = self.batch_get(&self.pipelines_set(), keys, Bins::All).await?;
        let mut metas: Vec<PipelineMeta> = ids
            .iter()
            .zip(records)
            .filter_map(|(id, rec)| rec.map(|r| Self::meta_from(id, &r)))
            .collect();
        metas.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
        Ok(metas)
    }

    pub(super) async fn pipeline_delete(&self, id: &str) -> CacheResult<bool> {
        let meta_key = Value::String(id.to_owned());
        let Some(rec) = self
            .get(&self.pipelines_set(), meta_key.clone(), Bins::All)
            .await?
        else {
            return Ok(false);
        };
        let set =
            bin_str(&rec, "set").unwrap_or_else(|| super::set_name(&self.settings.pipeline_set_prefix, id));
        if !self
            .delete(&self.pipelines_set(), meta_key.clone(), Some(rec.generation))
            .await?
        {
            return Ok(false);
        }
        self.remember_incarnation(id, None);
        self.update_pipeline_index(maps::remove_by_key(
            "m",
            Value::String(id.to_owned()),
            MapReturnType::NONE,
        ))
        .await?;
        // Garbage collection only (the records are unreachable now). Skipped if the pipeline was
        // already re-created, whose records share the set.
        if self
            .get(&self.pipelines_set(), meta_key, Bins::None)
            .await?
            .is_none()
        {
            self.truncate(&set).await?;
        }
        Ok(true)
    }

    pub(super) async fn pipeline_stage(
        &self,
        pipeline: &str,
        id: &str,
        chunks: Bytes,
        now_ms: u64,
    ) -> CacheResult<()> {
        let (pipe, rows) = self
            .open_pipeline(pipeline, |p| {
                vec![(p.dir_key(), Bins::All), (p.doc_key(id), state_bins())]
            })
            .await?;
        let mut rows = rows.into_iter();
        let dir = rows.next().flatten();
        let mut doc = rows.next().flatten().map(|r| StagedRecord::from_record(&r));
        if self.expire_leases(&pipe, dir.as_ref(), now_ms).await? {
            doc = self.read_state(&pipe, id).await?;
        }
        let chunks = String::from_utf8_lossy(&chunks).into_owned();
        self.move_with(&pipe, id, doc, now_ms, |_| {
            Some((StagedRecord::unleased(STAGE_PENDING), Some(chunks.clone()), true))
        })
        .await
        .map(|_| ())
    }

    pub(super) async fn pipeline_chunks(&self, pipeline: &str, id: &str) -> CacheResult<Option<Bytes>> {
        let (_, rows) = self
            .open_pipeline(pipeline, |p| {
                vec![(p.doc_key(id), Bins::from(["chunks", "stage"].as_slice()))]
            })
            .await?;
        Ok(rows
            .into_iter()
            .next()
            .flatten()
            .filter(|r| bin_str(r, "stage").is_some_and(|s| !s.is_empty()))
            .map(|r| Bytes::from(bin_str(&r, "chunks").unwrap_or_else(|| "[]".into()).into_bytes())))
    }

    pub(super) async fn pipeline_document_state(
        &self,
        pipeline: &str,
        id: &str,
        now_ms: u64,
    ) -> CacheResult<Option<DocState>> {
        let (pipe, rows) = self
            .open_pipeline(pipeline, |p| {
                vec![(p.dir_key(), Bins::All), (p.doc_key(id), state_bins())]
            })
            .await?;
        let mut rows = rows.into_iter();
        let dir = rows.next().flatten();
        let mut doc = rows.next().flatten().map(|r| StagedRecord::from_record(&r));
        if self.expire_leases(&pipe, dir.as_ref(), now_ms).await? {
            doc = self.read_state(&pipe, id).await?;
        }
        Ok(doc.filter(StagedRecord::present).map(|d| DocState {
            stage: d.stage,
            version: u64::try_from(d.ver).unwrap_or(0),
        }))
    }

    pub(super) async fn pipeline_counts(&self, pipeline: &str, now_ms: u64) -> CacheResult<StageCounts> {
        let (pipe, rows) = self
            .open_pipeline(pipeline, |p| vec![(p.dir_key(), Bins::All)])
            .await?;
        let dir = rows.into_iter().next().flatten();
        self.expire_leases(&pipe, dir.as_ref(), now_ms).await?;
        self.journal_counts(&pipe, now_ms).await
    }

    pub(super) async fn pipeline_set_stage(&self, pipeline: &str, args: &SetStageArgs) -> CacheResult<u64> {
        let (pipe, rows) = self
            .open_pipeline(pipeline, |p| vec![(p.dir_key(), Bins::All)])
            .await?;
        let dir = rows.into_iter().next().flatten();
        self.expire_leases(&pipe, dir.as_ref(), args.now_ms).await?;
        let creating = args.create_missing
            && args.from_stage.is_none()
            && args.worker_id.is_none()
            && args.only_version.is_none();
        let mut seen = HashSet::new();
        let ids: Vec<String> = args
            .document_ids
            .iter()
            .filter(|id| seen.insert(id.as_str()))
            .cloned()
            .collect();
        let docs = self.read_states(&pipe, &ids).await?;
        let first: std::collections::HashMap<String, Option<StagedRecord>> =
            ids.iter().cloned().zip(docs).collect();
        let pipe = &pipe;
        let first = &first;
        count_true(&ids, |id| async move {
            let doc = first.get(&id).cloned().flatten();
            self.move_with(pipe, &id, doc, args.now_ms, |doc| match doc {
                None if !creating => None,
                None => Some((StagedRecord::unleased(&args.stage), Some("[]".to_owned()), true)),
                Some(doc) => {
                    if args.from_stage.as_deref().is_some_and(|f| f != doc.stage) {
                        return None;
                    }
                    if args
                        .worker_id
                        .as_deref()
                        .is_some_and(|w| !doc.leased() || doc.worker != w)
                    {
                        return None;
                    }
                    if args
                        .only_version
                        .is_some_and(|v| u64::try_from(doc.ver).ok() != Some(v))
                    {
                        return None;
                    }
                    Some((StagedRecord::unleased(&args.stage), None, false))
                }
            })
            .await
        })
        .await
    }

    pub(super) async fn pipeline_heartbeat(&self, pipeline: &str, args: &HeartbeatArgs) -> CacheResult<u64> {
        let (pipe, rows) = self
            .open_pipeline(pipeline, |p| vec![(p.dir_key(), Bins::All)])
            .await?;
        let dir = rows.into_iter().next().flatten();
        self.expire_leases(&pipe, dir.as_ref(), args.now_ms).await?;
        let held = self.held_leases(&pipe, args).await?;
        let now = ms_i64(args.now_ms);
        // New index entries before the new leases.
        let fresh: Vec<(String, i64)> = held
            .iter()
            .map(|(id, d)| (id.clone(), now.saturating_add(d.lease_ms)))
            .collect();
        self.lease_index_add(&pipe, &fresh).await?;
        let pipe = &pipe;
        let extending: Vec<_> = held
            .into_iter()
            .map(|(id, doc)| self.extend_lease(pipe, id, doc, args))
            .collect();
        let mut stale = Vec::new();
        let mut updated = 0;
        let mut failure = None;
        for result in all(extending).await {
            match result {
                Ok(Some((id, old, new))) => {
                    updated += 1;
                    if old != new {
                        stale.push((id, old));
                    }
                }
                Ok(None) => {}
                Err(err) => {
                    failure.get_or_insert(err);
                }
            }
        }
        self.lease_index_remove(pipe, &stale).await;
        match failure {
            Some(err) => Err(err),
            None => Ok(updated),
        }
    }

    /// The heartbeat's documents (each once) whose lease in its stage its worker holds.
    async fn held_leases(
        &self,
        pipe: &Pipe,
        args: &HeartbeatArgs,
    ) -> CacheResult<Vec<(String, StagedRecord)>> {
        let mut seen = HashSet::new();
        let ids: Vec<String> = args
            .document_ids
            .iter()
            .filter(|id| seen.insert(id.as_str()))
            .cloned()
            .collect();
        let docs = self.read_states(pipe, &ids).await?;
        Ok(ids
            .into_iter()
            .zip(docs)
            .filter_map(|(id, d)| d.filter(|d| holds_lease(d, args)).map(|d| (id, d)))
            .collect())
    }

    /// Extends one held lease by its length from now (a generation-checked write, retried while
    /// the worker still holds it). `Some((id, old expiry, new expiry))` when extended.
    async fn extend_lease(
        &self,
        pipe: &Pipe,
        id: String,
        doc: StagedRecord,
        args: &HeartbeatArgs,
    ) -> CacheResult<Option<(String, i64, i64)>> {
        let now = ms_i64(args.now_ms);
        let mut doc = doc;
        let mut indexed = now.saturating_add(doc.lease_ms);
        for _ in 0..MAX_RMW_ATTEMPTS {
            let mut next = doc.clone();
            next.lease_expires = now.saturating_add(doc.lease_ms);
            if next.lease_expires != indexed {
                // The lease length changed since the entries were written: index this one.
                self.lease_index_add(pipe, &[(id.clone(), next.lease_expires)])
                    .await?;
                indexed = next.lease_expires;
            }
            let bins = next.bins();
            match self
                .put(
                    &pipe.set,
                    pipe.doc_key(&id),
                    &bins,
                    Cond::Gen(doc.generation),
                    None,
                )
                .await?
            {
                Written::Yes => return Ok(Some((id, doc.lease_expires, next.lease_expires))),
                Written::Conflict => match self.read_state(pipe, &id).await? {
                    Some(d) if holds_lease(&d, args) => doc = d,
                    _ => return Ok(None),
                },
            }
        }
        Ok(None)
    }
}

#[async_trait]
impl PipelineStore for AerospikeCache {
    async fn create_pipeline(&self, meta: PipelineMeta) -> CacheResult<()> {
        self.pipeline_create(meta).await
    }

    async fn get_pipeline(&self, id: &str) -> CacheResult<Option<PipelineMeta>> {
        self.pipeline_get(id).await
    }

    async fn list_pipelines(&self) -> CacheResult<Vec<PipelineMeta>> {
        self.pipeline_list().await
    }

    async fn delete_pipeline(&self, id: &str) -> CacheResult<bool> {
        self.pipeline_delete(id).await
    }

    async fn stage_document(
        &self,
        pipeline: &str,
        document_id: &str,
        chunks_json: Bytes,
        now_ms: u64,
    ) -> CacheResult<()> {
        self.pipeline_stage(pipeline, document_id, chunks_json, now_ms)
            .await
    }

    async fn get_chunks(&self, pipeline: &str, document_id: &str) -> CacheResult<Option<Bytes>> {
        self.pipeline_chunks(pipeline, document_id).await
    }

    async fn document_stage(
        &self,
        pipeline: &str,
        document_id: &str,
        now_ms: u64,
    ) -> CacheResult<Option<DocState>> {
        self.pipeline_document_state(pipeline, document_id, now_ms).await
    }

    async fn claim(&self, pipeline: &str, args: &ClaimArgs) -> CacheResult<Vec<String>> {
        self.pipeline_claim(pipeline, args).await
    }

    async fn heartbeat(&self, pipeline: &str, args: &HeartbeatArgs) -> CacheResult<u64> {
        self.pipeline_heartbeat(pipeline, args).await
    }

    async fn set_stage(&self, pipeline: &str, args: &SetStageArgs) -> CacheResult<u64> {
        self.pipeline_set_stage(pipeline, args).await
    }

    async fn stage_counts(&self, pipeline: &str, now_ms: u64) -> CacheResult<StageCounts> {
        self.pipeline_counts(pipeline, now_ms).await
    }
}
