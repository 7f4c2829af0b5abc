//! Exact per-stage counts without multi-record transactions.
//!
//! A pipeline's counters live in `JOURNAL_SHARDS` journal records (`{inc}:j:{k}`, a document goes to
//! shard `fnv1a(id) % JOURNAL_SHARDS`): bin `c` maps counter names (`s:<stage>` documents in a
//! stage, `l` leased documents, `r:<reason>` failed documents by reason) to counts, bin `x` maps
//! 10-second buckets to documents that became `indexed` in them, and bin `j` maps a document id to
//! the journal entry of its transition in flight.
//!
//! A transition that changes what a document counts as (stage, leased, failure reason) is:
//!   1. **open**: one atomic operate on the document's shard that creates `j[id]` (create-only:
//!      one transition per document at a time) *and* moves the counters;
//!   2. the document write (generation-checked), which records the entry's `tx` on the document;
//!   3. **close**: remove the entry (by value, so only that entry).
//!
//! Any prefix of these leaves a recoverable state: after 1 alone the counters already count the
//! new state, but the entry says so and how to undo it; whether step 2 happened is on the document
//! (`tx`). Readers (status) resolve open entries — an entry whose `tx` is not on the document is
//! reported as not applied — so counts are exact at every moment. An entry older than
//! `GRACE_MS`, or one whose owner lost its document write, is repaired: *fence* the document
//! (bump its generation so a slow owner's write can no longer land), then undo the counters and
//! drop the entry in one generation-checked command on the shard. Writes that do not change what
//! a document counts as (re-staging a pending document, heartbeats) skip the journal and keep the
//! document's `tx`.

use std::collections::BTreeMap;

use aerospike::operations::{maps, MapOrder, MapPolicy, MapReturnType, MapWriteFlags, Operation};
use aerospike::{Bins, Value};

use super::records::{Pipe, StagedRecord};
use super::{
    map_entries, ms_i64, AerospikeCache, Cond, Written, ELEMENT_EXISTS, GENERATION, MAX_RMW_ATTEMPTS,
};
use crate::cache::{
    CacheError, CacheResult, StageCounts, FAILED_REASON_SET_STAGE, RATE_WINDOW_SECONDS, STAGE_INDEXED,
};

/// Journal/counter records per pipeline (status reads them all in one batch).
pub const JOURNAL_SHARDS: u64 = 32;
/// An entry older than this (by the operations' clock) is presumed abandoned and repaired.
pub const GRACE_MS: u64 = 5_000;
/// Width of the indexed-rate buckets.
const RATE_BUCKET_SECONDS: u64 = 10;

/// What a document counts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acct {
    pub stage: String,
    pub leased: bool,
    pub reason: String,
}

impl Acct {
    fn value(&self) -> Value {
        Value::List(vec![
            Value::String(self.stage.clone()),
            Value::Int(i64::from(self.leased)),
            Value::String(self.reason.clone()),
        ])
    }

    fn parse(value: &Value) -> Option<Option<Self>> {
        match value {
            Value::Nil => Some(None),
            Value::List(items) => match items.as_slice() {
                [Value::String(stage), Value::Int(leased), Value::String(reason)] => Some(Some(Self {
                    stage: stage.clone(),
                    leased: *leased == 1,
                    reason: reason.clone(),
                })),
                _ => None,
            },
            _ => None,
        }
    }
}

/// A transition in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub tx: i64,
    pub created_ms: i64,
    pub old: Option<Acct>,
    pub new: Option<Acct>,
    /// The indexed-rate bucket it counted in, when it moved the document into `indexed`.
    pub rate_bucket: Option<i64>,
}

impl Entry {
    pub fn new(tx: i64, now_ms: u64, old: Option<Acct>, new: Option<Acct>) -> Self {
        let into_indexed = new.as_ref().is_some_and(|n| n.stage == STAGE_INDEXED)
            && old.as_ref().is_none_or(|o| o.stage != STAGE_INDEXED);
        let bucket = i64::try_from(now_ms / 1000 / RATE_BUCKET_SECONDS).unwrap_or(0);
        Self {
            tx,
            created_ms: ms_i64(now_ms),
            old,
            new,
            rate_bucket: into_indexed.then_some(bucket),
        }
    }

    pub fn value(&self) -> Value {
        let acct = |a: &Option<Acct>| a.as_ref().map_or(Value::Nil, Acct::value);
        Value::List(vec![
            Value::Int(self.tx),
            Value::Int(self.created_ms),
            acct(&self.old),
            acct(&self.new),
            self.rate_bucket.map_or(Value::Nil, Value::Int),
        ])
    }

    fn parse(value: &Value) -> Option<Self> {
        let Value::List(items) = value else { return None };
        match items.as_slice() {
            [Value::Int(tx), Value::Int(created), old, new, bucket] => Some(Self {
                tx: *tx,
                created_ms: *created,
                old: Acct::parse(old)?,
                new: Acct::parse(new)?,
                rate_bucket: match bucket {
                    Value::Int(b) => Some(*b),
                    _ => None,
                },
            }),
            _ => None,
        }
    }

    /// Counter changes this transition makes (zero changes omitted).
    pub fn deltas(&self) -> BTreeMap<String, i64> {
        deltas(self.old.as_ref(), self.new.as_ref())
    }
}

pub fn deltas(old: Option<&Acct>, new: Option<&Acct>) -> BTreeMap<String, i64> {
    let mut d: BTreeMap<String, i64> = BTreeMap::new();
    for (acct, sign) in [(old, -1), (new, 1)] {
        let Some(a) = acct else { continue };
        *d.entry(format!("s:{}", a.stage)).or_default() += sign;
        if a.leased {
            *d.entry("l".to_owned()).or_default() += sign;
        }
        if !a.reason.is_empty() {
            *d.entry(format!("r:{}", a.reason)).or_default() += sign;
        }
    }
    d.retain(|_, v| *v != 0);
    d
}

pub fn shard_of(id: &str) -> u64 {
    super::fnv1a(id.as_bytes()) % JOURNAL_SHARDS
}

fn ordered() -> MapPolicy {
    MapPolicy::new(MapOrder::KeyOrdered, MapWriteFlags::DEFAULT)
}

/// The counter ops of `entry`, applied with `sign` (1 to apply, -1 to undo).
fn counter_ops(entry: &Entry, sign: i64, now_ms: u64) -> Vec<Operation> {
    let mut ops: Vec<Operation> = entry
        .deltas()
        .into_iter()
        .map(|(k, d)| maps::increment_value(&ordered(), "c", Value::String(k), Value::Int(d * sign)))
        .collect();
    if let Some(bucket) = entry.rate_bucket {
        ops.push(maps::increment_value(
            &ordered(),
            "x",
            Value::Int(bucket),
            Value::Int(sign),
        ));
        // Forget buckets well outside the rate window.
        let keep_from = now_ms / 1000 / RATE_BUCKET_SECONDS;
        let keep_from = keep_from.saturating_sub(RATE_WINDOW_SECONDS / RATE_BUCKET_SECONDS + 2);
        ops.push(maps::remove_by_key_range(
            "x",
            Value::Nil,
            Value::Int(i64::try_from(keep_from).unwrap_or(0)),
            MapReturnType::NONE,
        ));
    }
    ops
}

/// What opening an entry did.
pub enum Opened {
    Yes,
    /// Another transition of the document is in flight (its entry is `j[id]`).
    Busy,
}

impl AerospikeCache {
    /// Step 1: records the entry and moves the counters, atomically.
    pub(super) async fn journal_open(
        &self,
        pipe: &Pipe,
        id: &str,
        entry: &Entry,
        now_ms: u64,
    ) -> CacheResult<Opened> {
        let create_only = MapPolicy::new(MapOrder::KeyOrdered, MapWriteFlags::CREATE_ONLY);
        let mut ops = vec![maps::put(
            &create_only,
            "j",
            Value::String(id.to_owned()),
            entry.value(),
        )];
        ops.extend(counter_ops(entry, 1, now_ms));
        match self
            .operate(&pipe.set, pipe.journal_key(shard_of(id)), ops, Cond::Any, None)
            .await?
        {
            Ok(_) => Ok(Opened::Yes),
            Err(ELEMENT_EXISTS) => Ok(Opened::Busy),
            Err(code) => Err(CacheError::Unavailable(format!(
                "journal open failed with result code {code}"
            ))),
        }
    }

    /// Step 3 for many documents: drops their (applied) entries, one command per shard.
    pub(super) async fn journal_close(&self, pipe: &Pipe, entries: Vec<(String, Entry)>) {
        let mut by_shard: BTreeMap<u64, Vec<Value>> = BTreeMap::new();
        for (id, entry) in entries {
            by_shard.entry(shard_of(&id)).or_default().push(entry.value());
        }
        let closes: Vec<_> = by_shard
            .into_iter()
            .map(|(shard, values)| async move {
                let ops = values
                    .into_iter()
                    .map(|v| maps::remove_by_value("j", v, MapReturnType::NONE))
                    .collect();
                // Best effort: an entry left behind is applied (its tx is on the document), and
                // readers treat it so until it is repaired.
                let _ = self
                    .operate(&pipe.set, pipe.journal_key(shard), ops, Cond::Any, None)
                    .await;
            })
            .collect();
        super::all(closes).await;
    }

    /// The entry in flight for `id`, if any.
    pub(super) async fn journal_entry(&self, pipe: &Pipe, id: &str) -> CacheResult<Option<Entry>> {
        let rec = self
            .get(
                &pipe.set,
                pipe.journal_key(shard_of(id)),
                Bins::from(["j"].as_slice()),
            )
            .await?;
        Ok(rec.and_then(|r| {
            map_entries(r.bins.get("j"))
                .into_iter()
                .find(|(k, _)| matches!(k, Value::String(s) if s == id))
                .and_then(|(_, v)| Entry::parse(&v))
        }))
    }

    /// Settles an entry whose owner may be gone or lost its write: if its tx is on the document
    /// it is dropped; otherwise the document is fenced and the counters undone.
    pub(super) async fn journal_repair(
        &self,
        pipe: &Pipe,
        id: &str,
        entry: &Entry,
        now_ms: u64,
    ) -> CacheResult<()> {
        for _ in 0..MAX_RMW_ATTEMPTS {
            let doc = self.read_state(pipe, id).await?;
            if doc.as_ref().is_some_and(|d| d.tx == entry.tx) {
                self.journal_close(pipe, vec![(id.to_owned(), entry.clone())])
                    .await;
                return Ok(());
            }
            // Fence: a write still on its way (generation-checked against what its owner read)
            // can no longer land once the generation moved.
            let fenced = match &doc {
                Some(d) => self.fence(pipe, id, d).await?,
                None => self.fence_missing(pipe, id).await?,
            };
            if fenced == Written::Yes {
                tracing::info!(pipeline = %pipe.id, tx = entry.tx, "undoing the counts of an abandoned document move");
                return self.journal_undo(pipe, id, entry, now_ms).await;
            }
        }
        Err(CacheError::Unavailable(format!(
            "too much contention repairing the journal of '{id}'"
        )))
    }

    /// Undoes the counters of an entry the document never took, and drops it: one
    /// generation-checked command, so an entry is undone at most once.
    pub(super) async fn journal_undo(
        &self,
        pipe: &Pipe,
        id: &str,
        entry: &Entry,
        now_ms: u64,
    ) -> CacheResult<()> {
        let key = pipe.journal_key(shard_of(id));
        for _ in 0..MAX_RMW_ATTEMPTS {
            let Some(rec) = self
                .get(&pipe.set, key.clone(), Bins::from(["j"].as_slice()))
                .await?
            else {
                return Ok(());
            };
            let present = map_entries(rec.bins.get("j"))
                .iter()
                .any(|(_, v)| Entry::parse(v).as_ref() == Some(entry));
            if !present {
                return Ok(());
            }
            let mut ops = vec![maps::remove_by_value("j", entry.value(), MapReturnType::NONE)];
            ops.extend(counter_ops(entry, -1, now_ms));
            match self
                .operate(&pipe.set, key.clone(), ops, Cond::Gen(rec.generation), None)
                .await?
            {
                Ok(_) => return Ok(()),
                Err(GENERATION) => continue,
                Err(code) => {
                    return Err(CacheError::Unavailable(format!(
                        "journal undo failed with result code {code}"
                    )))
                }
            }
        }
        Err(CacheError::Unavailable(
            "too much contention undoing a journal entry".into(),
        ))
    }

    /// The counts of a pipeline: counters summed over shards, corrected for open entries whose
    /// document write has not happened (and repairing the abandoned ones).
    pub(super) async fn journal_counts(&self, pipe: &Pipe, now_ms: u64) -> CacheResult<StageCounts> {
        let keys = (0..JOURNAL_SHARDS).map(|k| pipe.journal_key(k)).collect();
        let shards = self.batch_get(&pipe.set, keys, Bins::All).await?;
        let mut sums: BTreeMap<String, i64> = BTreeMap::new();
        let mut rate: BTreeMap<i64, i64> = BTreeMap::new();
        let mut open: Vec<(String, Entry)> = Vec::new();
        for rec in shards.iter().flatten() {
            for (k, v) in map_entries(rec.bins.get("c")) {
                if let (Value::String(k), Value::Int(v)) = (k, v) {
                    *sums.entry(k).or_default() += v;
                }
            }
            for (k, v) in map_entries(rec.bins.get("x")) {
                if let (Value::Int(k), Value::Int(v)) = (k, v) {
                    *rate.entry(k).or_default() += v;
                }
            }
            for (k, v) in map_entries(rec.bins.get("j")) {
                if let (Value::String(id), Some(entry)) = (k, Entry::parse(&v)) {
                    open.push((id, entry));
                }
            }
        }
        if !open.is_empty() {
            let ids: Vec<String> = open.iter().map(|(id, _)| id.clone()).collect();
            let docs = self.read_states(pipe, &ids).await?;
            for ((id, entry), doc) in open.iter().zip(docs) {
                let stale = entry.created_ms.saturating_add(ms_i64(GRACE_MS)) <= ms_i64(now_ms);
                if doc.as_ref().is_some_and(|d| d.tx == entry.tx) {
                    // Applied; an owner that never closed it would block the document's next move.
                    if stale {
                        self.journal_close(pipe, vec![(id.clone(), entry.clone())]).await;
                    }
                    continue;
                }
                // Not applied (yet): report the document as it is.
                for (k, d) in entry.deltas() {
                    *sums.entry(k).or_default() -= d;
                }
                if let Some(b) = entry.rate_bucket {
                    *rate.entry(b).or_default() -= 1;
                }
                if stale {
                    self.journal_repair(pipe, id, entry, now_ms).await?;
                }
            }
        }
        Ok(to_counts(&sums, &rate, now_ms))
    }
}

fn to_counts(sums: &BTreeMap<String, i64>, rate: &BTreeMap<i64, i64>, now_ms: u64) -> StageCounts {
    let mut counts = StageCounts::default();
    for (k, v) in sums {
        let n = u64::try_from(*v).unwrap_or(0);
        if n == 0 {
            continue;
        }
        if let Some(stage) = k.strip_prefix("s:") {
            counts.counts.insert(stage.to_owned(), n);
        } else if let Some(reason) = k.strip_prefix("r:") {
            // Only the reason set-stage records is reported (the only one there is).
            if reason == FAILED_REASON_SET_STAGE {
                counts.failed_reasons.insert(reason.to_owned(), n);
            }
        } else if k == "l" {
            counts.leased = n;
        }
    }
    let newest = now_ms / 1000 / RATE_BUCKET_SECONDS;
    let oldest_second = (now_ms / 1000).saturating_sub(RATE_WINDOW_SECONDS - 1);
    counts.indexed_in_window = rate
        .iter()
        .filter(|(b, _)| {
            let b = u64::try_from(**b).unwrap_or(0);
            b <= newest && b * RATE_BUCKET_SECONDS + RATE_BUCKET_SECONDS > oldest_second
        })
        .map(|(_, n)| u64::try_from(*n).unwrap_or(0))
        .sum();
    counts
}

impl StagedRecord {
    /// What this document counts as (`None`: it does not exist).
    pub fn acct(&self) -> Option<Acct> {
        self.present().then(|| Acct {
            stage: self.stage.clone(),
            leased: self.leased(),
            reason: self.reason.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acct(stage: &str, leased: bool, reason: &str) -> Acct {
        Acct {
            stage: stage.into(),
            leased,
            reason: reason.into(),
        }
    }

    #[test]
    fn entries_round_trip_and_count_moves() {
        let e = Entry::new(
            7,
            123_000,
            Some(acct("pending", false, "")),
            Some(acct("indexed", false, "")),
        );
        assert_eq!(Entry::parse(&e.value()), Some(e.clone()));
        assert_eq!(e.rate_bucket, Some(12));
        let d = e.deltas();
        assert_eq!(d.get("s:pending"), Some(&-1));
        assert_eq!(d.get("s:indexed"), Some(&1));
        let e = Entry::new(8, 0, None, Some(acct("failed", true, "worker_reported")));
        assert_eq!(Entry::parse(&e.value()), Some(e.clone()));
        assert_eq!(e.deltas().len(), 3);
        assert!(deltas(Some(&acct("p", false, "")), Some(&acct("p", false, ""))).is_empty());
    }
}
