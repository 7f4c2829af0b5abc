//! The embedded store's mirrored documents: one namespace's documents and eviction tombstones,
//! the single-document operations on them, what the byte budget charges for them, and the mirror
//! batch (`Batch`), which applies many ops under one hold of the namespace lock with the same
//! operations the single-document methods use, so both paths cannot drift apart.
//!
//! Weights: a document is charged `RECORD_OVERHEAD` + its id + the JSON length of its attributes,
//! estimated by walking them (`value_weight`) instead of serialising them (which cost a
//! serialisation per write, a tenth of a large mirror's time). The walk is
//! additive over attributes, so a patch re-weighs only the attributes it replaces. Every charge is
//! stored next to what it paid for, and a release always gives back the stored figure, so the
//! budget stays exact whatever the estimate's error.

use std::collections::{BTreeMap, HashSet};

use serde_json::Value;

use super::{Budget, RECORD_OVERHEAD};
use crate::cache::mirror::{refuse_up_to, MirrorOp, MirrorReport};
use crate::cache::{
    patch_tombstone, Attributes, AttributesJson, CacheError, CacheResult, CachedDoc, DocId, TOMBSTONE_MS,
};

/// Bytes a float is charged: its shortest decimal form is 1 to 24 bytes, and typical
/// non-round values (scores, coordinates) take 16 to 20.
const FLOAT_WEIGHT: usize = 18;

/// Bytes charged for a cached document.
pub(super) fn doc_weight(id: &DocId, attributes: &Attributes) -> usize {
    RECORD_OVERHEAD + id.weight() + attributes_weight(attributes)
}

/// A cached document's attributes: as the JSON text a row-form upsert sent (stored as it came:
/// no map to build, weigh or free per attribute), or a map (backfills, column-form upserts, and a
/// document once a patch merged into it).
pub(super) enum Body {
    Map(Attributes),
    Json(AttributesJson),
}

impl Body {
    /// The JSON length of the attributes: exact for text, estimated for a map (`value_weight`).
    fn weight(&self) -> usize {
        match self {
            Self::Map(map) => attributes_weight(map),
            Self::Json(json) => json.as_str().len(),
        }
    }

    fn to_map(&self) -> Attributes {
        match self {
            Self::Map(map) => map.clone(),
            Self::Json(json) => json.to_map(),
        }
    }

    /// What is freed with it, as garbage.
    fn into_value(self) -> Value {
        match self {
            Self::Map(map) => Value::Object(map),
            Self::Json(json) => Value::String(json.into_string()),
        }
    }
}

/// A cached document in the store: `CachedDoc` with its attributes as stored.
pub(super) struct StoredDoc {
    body: Body,
    upserted_at: u64,
    cached_ms: u64,
}

impl StoredDoc {
    fn to_cached(&self) -> CachedDoc {
        CachedDoc {
            attributes: self.body.to_map(),
            upserted_at: self.upserted_at,
            cached_ms: self.cached_ms,
        }
    }
}

/// The JSON length of an attribute map: braces and each member (`entry_weight`).
fn attributes_weight(attributes: &Attributes) -> usize {
    2 + attributes.iter().map(|(k, v)| entry_weight(k, v)).sum::<usize>()
}

/// One `"key":value,` member.
fn entry_weight(key: &str, value: &Value) -> usize {
    key.len() + 4 + value_weight(value)
}

/// A value's JSON length, without serialising it: exact for null, booleans, integers and strings
/// without escapes (an escaped character counts 1 byte instead of 2 to 6), one byte more per
/// non-empty array or object (every member counts its comma, the last one too); a float counts
/// `FLOAT_WEIGHT`. Nesting is bounded by the JSON parser's recursion limit.
fn value_weight(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(true) => 4,
        Value::Bool(false) => 5,
        Value::Number(n) => number_weight(n),
        Value::String(s) => s.len() + 2,
        Value::Array(items) => 2 + items.iter().map(|v| value_weight(v) + 1).sum::<usize>(),
        Value::Object(map) => attributes_weight(map),
    }
}

fn number_weight(n: &serde_json::Number) -> usize {
    if let Some(u) = n.as_u64() {
        digits(u)
    } else if let Some(i) = n.as_i64() {
        1 + digits(i.unsigned_abs())
    } else {
        FLOAT_WEIGHT
    }
}

fn digits(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

/// Values a write under the namespace lock replaced or discarded: dropped by the caller after
/// the lock is released, so freeing them does not lengthen the lock hold.
pub(super) type Garbage = Vec<Value>;

/// An upsert the budget refused, with the id it did not store.
pub(super) struct Refused {
    pub id: DocId,
    pub error: CacheError,
}

/// What a namespace holds for an id: its cached document or the tombstone of its eviction (never
/// both: caching a document clears its tombstone, evicting it leaves one), with the bytes charged.
pub(super) enum Entry {
    Doc {
        doc: StoredDoc,
        charged: usize,
    },
    /// Refuses copies stamped up to `refuse_up_to` (see `NamespaceDocs::evict`) until `lapses`.
    Tomb {
        refuse_up_to: u64,
        lapses: u64,
        charged: usize,
    },
}

/// An id's entry, and whether the id is in the lapse queue (`NamespaceDocs::lapse_queue`).
pub(super) struct Slot {
    entry: Entry,
    queued: bool,
}

/// The map of a namespace's ids: foldhash, seeded per process (ids come from clients), several
/// times faster than SipHash on a `DocId`.
type SlotMap = std::collections::HashMap<DocId, Slot, foldhash::fast::RandomState>;

/// One namespace's cached documents and eviction tombstones, one entry per id, so an eviction
/// of a cached document, or the upsert that follows it, is one lookup that turns the entry into
/// the other in place. `dropped` is set when the namespace is purged, so a writer that looked the
/// map up before the purge retries on a new one instead of writing into (and charging the budget
/// for) a map nobody can reach.
#[derive(Default)]
pub(super) struct NamespaceDocs {
    slots: SlotMap,
    /// Ids that may hold a tombstone, by the time it lapses at the earliest: each id at most once
    /// (`Slot::queued`), so writing the same ids again and again (evict, mirror, evict...) queues
    /// nothing new. A tombstone renewed after it was queued is moved to its new lapse time when
    /// its old one comes; an id whose tombstone gave way to a document leaves the queue then.
    lapse_queue: BTreeMap<u64, Vec<DocId>>,
    pub dropped: bool,
}

impl NamespaceDocs {
    /// A copy of the cached document of `id`.
    pub fn doc(&self, id: &DocId) -> Option<CachedDoc> {
        match self.slots.get(id).map(|s| &s.entry) {
            Some(Entry::Doc { doc, .. }) => Some(doc.to_cached()),
            _ => None,
        }
    }

    /// Drops lapsed tombstones; returns the bytes they were charged.
    pub fn prune_tombs(&mut self, now_ms: u64) -> usize {
        let mut freed = 0;
        while let Some(entry) = self.lapse_queue.first_entry() {
            if *entry.key() > now_ms {
                break;
            }
            for id in entry.remove() {
                freed += self.lapse(id, now_ms);
            }
        }
        freed
    }

    /// The queue reached `id`: drops its tombstone if it lapsed (returning its charge), queues it
    /// again if it was renewed, or takes it out of the queue if it holds a document now.
    fn lapse(&mut self, id: DocId, now_ms: u64) -> usize {
        let Some(slot) = self.slots.get_mut(&id) else {
            return 0;
        };
        match slot.entry {
            Entry::Tomb { lapses, charged, .. } if lapses <= now_ms => {
                self.slots.remove(&id);
                charged
            }
            Entry::Tomb { lapses, .. } => {
                self.lapse_queue.entry(lapses).or_default().push(id);
                0
            }
            Entry::Doc { .. } => {
                slot.queued = false;
                0
            }
        }
    }

    /// Replaces the document unless the cached one is newer or a tombstone refuses the stamp.
    /// True when written; a full budget changes nothing.
    pub fn upsert(
        &mut self,
        budget: &Budget,
        id: DocId,
        body: Body,
        upserted_at: u64,
        now_ms: u64,
        garbage: &mut Garbage,
    ) -> Result<bool, Refused> {
        let weight = RECORD_OVERHEAD + id.weight() + body.weight();
        let doc = StoredDoc {
            body,
            upserted_at,
            cached_ms: now_ms,
        };
        let entry = Entry::Doc { doc, charged: weight };
        let Some(slot) = self.slots.get_mut(&id) else {
            if let Err(error) = budget.charge(weight, 0) {
                return Err(Refused { id, error });
            }
            self.slots.insert(id, Slot { entry, queued: false });
            return Ok(true);
        };
        // A tombstone refusing the stamp, or a newer document, wins.
        let old = match &slot.entry {
            Entry::Tomb {
                refuse_up_to: newer, ..
            }
            | Entry::Doc {
                doc: StoredDoc {
                    upserted_at: newer, ..
                },
                ..
            } if *newer > upserted_at => {
                garbage.extend(entry.into_value());
                return Ok(false);
            }
            Entry::Tomb { charged, .. } | Entry::Doc { charged, .. } => *charged,
        };
        if let Err(error) = budget.charge(weight, old) {
            return Err(Refused { id, error });
        }
        if let Some(replaced) = std::mem::replace(&mut slot.entry, entry).into_value() {
            garbage.push(replaced);
        }
        Ok(true)
    }

    /// Merges into the document only when it is cached and not newer. True when merged; a full
    /// budget changes nothing. With nothing cached, leaves a tombstone refusing older copies.
    pub fn patch(
        &mut self,
        budget: &Budget,
        id: &DocId,
        patch: Attributes,
        upserted_at: u64,
        now_ms: u64,
        garbage: &mut Garbage,
    ) -> CacheResult<bool> {
        let Some(Slot {
            entry: Entry::Doc { doc: cached, charged },
            ..
        }) = self.slots.get_mut(id)
        else {
            // Nothing to merge into: a tombstone refuses copies up to the patch, so the mirror of
            // an earlier write that arrives after it cannot cache a version without it.
            garbage.push(Value::Object(patch));
            self.evict(budget, id.clone(), patch_tombstone(upserted_at), now_ms, garbage);
            return Ok(false);
        };
        if cached.upserted_at > upserted_at {
            garbage.push(Value::Object(patch));
            return Ok(false);
        }
        // Re-weigh only what changes (the weight is additive over attributes).
        // Text is parsed into a map to merge into, once.
        if let Body::Json(json) = &cached.body {
            cached.body = Body::Map(json.to_map());
        }
        let Body::Map(attributes) = &mut cached.body else {
            garbage.push(Value::Object(patch));
            return Ok(false);
        };
        let (mut grow, mut shrink) = (0, 0);
        for (k, v) in &patch {
            grow += entry_weight(k, v);
            if let Some(prev) = attributes.get(k) {
                shrink += entry_weight(k, prev);
            }
        }
        let weight = (*charged + grow).saturating_sub(shrink);
        budget.charge(weight, *charged)?;
        for (k, v) in patch {
            if let Some(prev) = attributes.insert(k, v) {
                garbage.push(prev);
            }
        }
        cached.upserted_at = upserted_at;
        *charged = weight;
        Ok(true)
    }

    /// Removes the document (true when one was cached) and leaves a tombstone refusing copies up
    /// to `refuse_up_to` (or the removed document's stamp, or an earlier tombstone's, if newer)
    /// until `now_ms + TOMBSTONE_MS`. Best effort: a full budget keeps the eviction but cannot
    /// keep the tombstone (a tombstone never costs more than the document it replaces).
    pub fn evict(
        &mut self,
        budget: &Budget,
        id: DocId,
        refuse_up_to: u64,
        now_ms: u64,
        garbage: &mut Garbage,
    ) -> bool {
        let weight = RECORD_OVERHEAD + id.weight();
        let lapses = now_ms.saturating_add(TOMBSTONE_MS);
        let Some(slot) = self.slots.get_mut(&id) else {
            if budget.charge(weight, 0).is_ok() {
                let entry = Entry::Tomb {
                    refuse_up_to,
                    lapses,
                    charged: weight,
                };
                self.slots.insert(id.clone(), Slot { entry, queued: true });
                self.lapse_queue.entry(lapses).or_default().push(id);
            }
            return false;
        };
        let (was_cached, newer, old) = match &slot.entry {
            Entry::Doc { doc, charged } => (true, doc.upserted_at, *charged),
            Entry::Tomb {
                refuse_up_to,
                charged,
                ..
            } => (false, *refuse_up_to, *charged),
        };
        // Never refused: the tombstone costs what the old one did, or less than the document.
        if budget.charge(weight, old).is_err() {
            return was_cached;
        }
        let tomb = Entry::Tomb {
            refuse_up_to: refuse_up_to.max(newer),
            lapses,
            charged: weight,
        };
        if let Entry::Doc { doc, .. } = std::mem::replace(&mut slot.entry, tomb) {
            garbage.push(doc.body.into_value());
        }
        if !slot.queued {
            slot.queued = true;
            self.lapse_queue.entry(lapses).or_default().push(id);
        }
        was_cached
    }

    /// Caches a fetched document only when nothing is cached for it and no tombstone refuses
    /// `upserted_at`. True when written; a full budget changes nothing.
    pub fn backfill(
        &mut self,
        budget: &Budget,
        id: &DocId,
        attributes: Attributes,
        upserted_at: u64,
        now_ms: u64,
    ) -> CacheResult<bool> {
        let old = match self.slots.get(id).map(|s| &s.entry) {
            Some(Entry::Doc { .. }) => return Ok(false),
            Some(Entry::Tomb { refuse_up_to, .. }) if *refuse_up_to >= upserted_at => return Ok(false),
            Some(Entry::Tomb { charged, .. }) => *charged,
            None => 0,
        };
        let weight = doc_weight(id, &attributes);
        budget.charge(weight, old)?;
        let doc = StoredDoc {
            body: Body::Map(attributes),
            upserted_at,
            cached_ms: now_ms,
        };
        let entry = Entry::Doc { doc, charged: weight };
        match self.slots.get_mut(id) {
            Some(slot) => slot.entry = entry,
            None => {
                self.slots.insert(id.clone(), Slot { entry, queued: false });
            }
        }
        Ok(true)
    }

    /// Empties the namespace; returns how many documents it held and the bytes everything held
    /// was charged.
    pub fn take_all(&mut self) -> (u64, usize) {
        self.lapse_queue.clear();
        let slots = std::mem::take(&mut self.slots);
        let mut docs = 0;
        let mut charged = 0;
        for slot in slots.values() {
            match slot.entry {
                Entry::Doc { charged: c, .. } => {
                    docs += 1;
                    charged += c;
                }
                Entry::Tomb { charged: c, .. } => charged += c,
            }
        }
        (docs, charged)
    }
}

impl Entry {
    /// What the entry held that is freed with it (a tombstone holds nothing).
    fn into_value(self) -> Option<Value> {
        match self {
            Self::Doc { doc, .. } => Some(doc.body.into_value()),
            Self::Tomb { .. } => None,
        }
    }
}

/// A mirror batch in progress on the embedded store: applies ops one at a time to the locked
/// namespace with the single-document operations above, under the contract of
/// `crate::cache::mirror`.
pub(super) struct Batch {
    upserted_at: u64,
    report: MirrorReport,
    /// Documents an op failed for: their later upserts and patches are skipped.
    failed: HashSet<DocId>,
}

impl Batch {
    pub fn new(upserted_at: u64) -> Self {
        Self {
            upserted_at,
            report: MirrorReport::default(),
            failed: HashSet::new(),
        }
    }

    pub fn into_report(self) -> MirrorReport {
        self.report
    }

    fn skips(&self, op: &MirrorOp) -> bool {
        matches!(
            op,
            MirrorOp::Upsert(..) | MirrorOp::UpsertJson(..) | MirrorOp::Patch(..)
        ) && !self.failed.is_empty()
            && self.failed.contains(op.id())
    }

    pub fn apply(
        &mut self,
        docs: &mut NamespaceDocs,
        budget: &Budget,
        op: MirrorOp,
        now_ms: u64,
        garbage: &mut Garbage,
    ) {
        if self.skips(&op) {
            return;
        }
        let stamp = self.upserted_at;
        let refuse = refuse_up_to(&op, stamp);
        let outcome = match op {
            MirrorOp::Upsert(id, attrs) => docs
                .upsert(budget, id, Body::Map(attrs), stamp, now_ms, garbage)
                .map_err(|r| (r.id, r.error)),
            MirrorOp::UpsertJson(id, json) => docs
                .upsert(budget, id, Body::Json(json), stamp, now_ms, garbage)
                .map_err(|r| (r.id, r.error)),
            MirrorOp::Patch(id, attrs) => match docs.patch(budget, &id, attrs, stamp, now_ms, garbage) {
                Ok(took) => Ok(took),
                Err(error) => Err((id, error)),
            },
            MirrorOp::Evict(id) | MirrorOp::Invalidate(id) => {
                Ok(docs.evict(budget, id, refuse, now_ms, garbage))
            }
        };
        match outcome {
            Ok(took) => self.report.applied += u64::from(took),
            Err((id, error)) => {
                // Leave no stale copy behind what Turbopuffer now holds.
                docs.evict(budget, id.clone(), stamp.saturating_sub(1), now_ms, garbage);
                if self.failed.insert(id) {
                    self.report.failed += 1;
                }
                self.report.failure.get_or_insert(error);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn attrs(v: Value) -> Attributes {
        v.as_object().cloned().unwrap_or_default()
    }

    /// The walk gives the JSON length plus one byte per non-empty object or array (each member
    /// counts a comma, the last one too) for everything but floats and escapes.
    #[test]
    fn weights_follow_the_json_length() {
        for v in [
            json!({}),
            json!({"a": 1}),
            json!({"title": "row 1", "n": -12, "t": true, "f": false, "z": null}),
            json!({"tags": ["a", "b"], "nested": {"k": [1, 2, {"x": "y"}]}, "empty": [], "o": {}}),
            json!({"big": u64::MAX, "neg": i64::MIN}),
        ] {
            let map = attrs(v);
            let text = serde_json::to_string(&map).unwrap_or_default();
            let containers =
                text.matches(['{', '[']).count() - text.matches("{}").count() - text.matches("[]").count();
            assert_eq!(attributes_weight(&map), text.len() + containers, "{text}");
        }
        assert_eq!(value_weight(&json!(0.25)), FLOAT_WEIGHT);
    }

    /// What a document is charged always equals the weight of what it holds, however it got
    /// there (upsert, patches replacing, adding and nesting attributes), and the budget holds
    /// exactly the sum; evicting and pruning give it all back.
    #[test]
    fn charges_stay_exact_through_upserts_patches_and_evictions() {
        let budget = Budget {
            limit: 1 << 20,
            used: std::sync::atomic::AtomicUsize::new(0),
        };
        let mut docs = NamespaceDocs::default();
        let mut garbage = Garbage::new();
        let id = DocId::Str("doc".into());
        let upserted = docs.upsert(
            &budget,
            id.clone(),
            Body::Map(attrs(json!({"a": "xx", "b": [1, 2]}))),
            1,
            5,
            &mut garbage,
        );
        assert!(matches!(upserted, Ok(true)));
        for (stamp, patch) in [
            (2, json!({"a": "a much longer value"})),
            (3, json!({"c": {"deep": [true, null]}, "b": 7})),
            (4, json!({"a": "", "d": -1})),
        ] {
            assert!(docs
                .patch(&budget, &id, attrs(patch), stamp, 5, &mut garbage)
                .unwrap());
            let Some(Slot {
                entry: Entry::Doc { doc, charged },
                ..
            }) = docs.slots.get(&id)
            else {
                panic!("the document is cached");
            };
            let Body::Map(attributes) = &doc.body else {
                panic!("a map upserted");
            };
            assert_eq!(*charged, doc_weight(&id, attributes));
            assert_eq!(doc.cached_ms, 5, "a patch keeps the copy's cache time");
            assert_eq!(budget.used.load(std::sync::atomic::Ordering::Acquire), *charged);
        }
        assert!(docs.evict(&budget, id.clone(), 4, 10, &mut garbage));
        let tomb = RECORD_OVERHEAD + id.weight();
        assert_eq!(budget.used.load(std::sync::atomic::Ordering::Acquire), tomb);
        budget.release(docs.prune_tombs(10 + TOMBSTONE_MS));
        assert_eq!(budget.used.load(std::sync::atomic::Ordering::Acquire), 0);
    }

    /// Writing the same ids again and again (evict, upsert, evict...) queues each id once, a
    /// renewed tombstone refuses older copies until its own lapse (not its first one), and a
    /// lapsed one gives its charge back.
    #[test]
    fn the_lapse_queue_holds_each_id_once() {
        let budget = Budget {
            limit: 1 << 20,
            used: std::sync::atomic::AtomicUsize::new(0),
        };
        let mut docs = NamespaceDocs::default();
        let mut garbage = Garbage::new();
        let id = DocId::Num(7);
        for write in 0..100u64 {
            let now = 1_000 + write;
            docs.prune_tombs(now);
            docs.evict(&budget, id.clone(), write, now, &mut garbage);
            let upserted = docs.upsert(
                &budget,
                id.clone(),
                Body::Map(attrs(json!({"w": write}))),
                write + 1,
                now,
                &mut garbage,
            );
            assert!(matches!(upserted, Ok(true)));
        }
        assert_eq!(docs.lapse_queue.values().map(Vec::len).sum::<usize>(), 1);
        // Evicted at 2,000: the tombstone holds until 2,000 + TOMBSTONE_MS, past its queued time.
        docs.evict(&budget, id.clone(), 200, 2_000, &mut garbage);
        budget.release(docs.prune_tombs(1_000 + TOMBSTONE_MS));
        assert!(docs
            .backfill(&budget, &id, Attributes::new(), 150, 1_000 + TOMBSTONE_MS)
            .is_ok_and(|w| !w));
        budget.release(docs.prune_tombs(2_000 + TOMBSTONE_MS));
        assert!(docs.slots.is_empty() && docs.lapse_queue.is_empty());
        assert_eq!(budget.used.load(std::sync::atomic::Ordering::Acquire), 0);
        assert!(docs
            .backfill(&budget, &id, Attributes::new(), 150, 2_000 + TOMBSTONE_MS)
            .is_ok_and(|w| w));
    }
}
