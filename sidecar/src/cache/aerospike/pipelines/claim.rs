//! The claim on Aerospike: a walk along the stage's queue from its head, chunk by chunk. Each
//! slot names a document and the generation it had when the slot was taken; what the slot is
//! worth is decided by `classify_slot` (a plain function) from the document as read now, and the
//! walk then claims the documents it may take, fences abandoned slots and consumes dead ones.
//! The head moves past the slots consumed without a gap.

use std::collections::HashSet;
use std::time::Instant;

use aerospike::{Bins, Value};

use super::super::journal::{Entry, GRACE_MS};
use super::super::queue::{stage_part, Slot, CHUNK};
use super::super::records::{reason_for, Pipe, StagedRecord};
use super::super::{all, bin_int, ms_i64, AerospikeCache, Written, PARALLEL};
use super::{Move, Moved};
use crate::cache::{CacheError, CacheResult, ClaimArgs};

/// A claim's progress along the queue.
struct Walk {
    /// Past this no new document is taken.
    deadline: Instant,
    /// The deadline stopped the walk with documents possibly left to take.
    out_of_time: bool,
    claimed: Vec<String>,
    to_close: Vec<(String, Entry)>,
    /// The first slot not known to be consumed (where the head may move).
    new_head: i64,
    contiguous: bool,
    failure: Option<CacheError>,
}

impl Walk {
    /// Records slots `range` as examined: all consumed but `kept`.
    fn pass(&mut self, range: std::ops::Range<i64>, kept: &HashSet<i64>) {
        for k in range {
            if self.contiguous && !kept.contains(&k) {
                self.new_head = k + 1;
            } else {
                self.contiguous = false;
            }
        }
    }
}

/// Where one step of the walk looks: slots `from..end` of chunk `chunk` of the queue `part`.
struct ChunkRange<'a> {
    pipe: &'a Pipe,
    part: &'a str,
    chunk: i64,
    from: i64,
    end: i64,
}

/// A slot that names a document: slot number, document id, the document's generation when the
/// slot was taken, and when it was taken.
struct Listed {
    k: i64,
    id: String,
    gen: i64,
    taken_ms: i64,
}

/// What a listed slot is worth to this claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotFate {
    /// The document is unleased in the claimed stage and points at this slot: take it.
    Claim,
    /// Leave the slot for later: a document of another prefix, or a write that may still
    /// point the document here.
    Keep,
    /// The document has moved on since the slot was taken: the slot is dead.
    Consume,
    /// The write that took the slot is older than the grace period and never happened: fence
    /// the document (then the slot is dead), unless something moved it meanwhile.
    Fence,
}

/// Decides a listed slot from the document as read now (`None`: no record). Slot numbers are per
/// queue: only a document in `stage` can point at slot `slot.k`.
fn classify_slot(slot: &Listed, doc: Option<&StagedRecord>, stage: &str, prefix: &str, now: i64) -> SlotFate {
    let points_here = doc.is_some_and(|d| d.present() && d.stage == stage && d.qn == slot.k && !d.leased());
    if points_here {
        return if slot.id.starts_with(prefix) {
            SlotFate::Claim
        } else {
            SlotFate::Keep
        };
    }
    // Does the write that would point the document here still have a chance?
    let current_gen = doc.map_or(0, |d| i64::from(d.generation));
    if current_gen != slot.gen {
        SlotFate::Consume
    } else if slot.taken_ms.saturating_add(ms_i64(GRACE_MS)) <= now {
        SlotFate::Fence
    } else {
        SlotFate::Keep
    }
}

/// What examining one chunk decided, slot by slot.
#[derive(Default)]
struct Sorted {
    wanted: Vec<(i64, String, StagedRecord)>,
    consumed: Vec<i64>,
    kept: HashSet<i64>,
}

impl AerospikeCache {
    pub(super) async fn pipeline_claim(&self, pipeline: &str, args: &ClaimArgs) -> CacheResult<Vec<String>> {
        // Past this point no new document is taken: the claim answers in time with what it won
        // (every won document fully claimed), or 503 if it won none (and changed nothing).
        let soft_deadline = Instant::now() + self.settings.op_timeout * 6 / 10;
        let part = stage_part(&args.stage);
        let queue_keys = |p: &Pipe| {
            vec![
                (p.key(&format!("q:{part}:h")), Bins::All),
                (p.key(&format!("q:{part}:t")), Bins::All),
            ]
        };
        let (pipe, rows) = self
            .open_pipeline(pipeline, |p| {
                let mut keys = vec![(p.dir_key(), Bins::All)];
                keys.extend(queue_keys(p));
                keys
            })
            .await?;
        let mut rows = rows.into_iter();
        let dir = rows.next().flatten();
        let mut head_rec = rows.next().flatten();
        let mut tail_rec = rows.next().flatten();
        if self.expire_leases(&pipe, dir.as_ref(), args.now_ms).await? {
            let keys: Vec<Value> = queue_keys(&pipe).into_iter().map(|(k, _)| k).collect();
            let mut fresh = self.batch_get(&pipe.set, keys, Bins::All).await?.into_iter();
            head_rec = fresh.next().flatten();
            tail_rec = fresh.next().flatten();
        }
        let head = head_rec.as_ref().and_then(|r| bin_int(r, "n")).unwrap_or(0);
        let head_gen = head_rec.as_ref().map(|r| r.generation);
        let tail = tail_rec.as_ref().and_then(|r| bin_int(r, "n")).unwrap_or(0);
        let mut walk = Walk {
            deadline: soft_deadline,
            out_of_time: false,
            claimed: Vec::new(),
            to_close: Vec::new(),
            new_head: head,
            contiguous: true,
            failure: None,
        };
        let mut n = head;
        while n < tail && walk.claimed.len() < args.limit {
            if Instant::now() >= walk.deadline {
                walk.out_of_time = true;
                break;
            }
            let chunk = n / CHUNK;
            let end = tail.min((chunk + 1) * CHUNK);
            let range = ChunkRange {
                pipe: &pipe,
                part: &part,
                chunk,
                from: n,
                end,
            };
            self.claim_from_chunk(&range, args, &mut walk).await;
            if walk.failure.is_some() {
                break;
            }
            n = end;
        }
        self.journal_close(&pipe, std::mem::take(&mut walk.to_close))
            .await;
        if let Err(err) = self
            .advance_head(&pipe, &part, head, head_gen, walk.new_head)
            .await
        {
            walk.failure.get_or_insert(err);
        }
        match walk.failure {
            // Documents already won are leased: hand them out rather than orphan them.
            Some(err) if walk.claimed.is_empty() => Err(err),
            None if walk.claimed.is_empty() && walk.out_of_time => Err(CacheError::Unavailable(format!(
                "claim ran out of time before taking a document ({} ms budget); nothing was claimed",
                self.settings.op_timeout.as_millis()
            ))),
            _ => Ok(walk.claimed),
        }
    }

    /// Examines one chunk's slots: claims live documents, consumes stale slots.
    async fn claim_from_chunk(&self, range: &ChunkRange<'_>, args: &ClaimArgs, walk: &mut Walk) {
        if let Err(err) = self.try_claim_from_chunk(range, args, walk).await {
            walk.failure.get_or_insert(err);
            walk.contiguous = false;
        }
    }

    async fn try_claim_from_chunk(
        &self,
        range: &ChunkRange<'_>,
        args: &ClaimArgs,
        walk: &mut Walk,
    ) -> CacheResult<()> {
        let Some((listed, kept)) = self.list_slots(range).await? else {
            walk.pass(range.from..range.end, &HashSet::new());
            return Ok(());
        };
        let mut sorted = self.sort_slots(range.pipe, listed, args).await?;
        sorted.kept.extend(kept);
        let room = args.limit.saturating_sub(walk.claimed.len());
        let later = sorted.wanted.split_off(room.min(sorted.wanted.len()));
        sorted.kept.extend(later.iter().map(|(k, _, _)| *k));
        let wanted = std::mem::take(&mut sorted.wanted);
        if !wanted.is_empty() {
            self.claim_wanted(range.pipe, wanted, args, walk, &mut sorted)
                .await?;
        }
        self.consume_slots(range.pipe, range.part, range.chunk, &sorted.consumed)
            .await?;
        walk.pass(range.from..range.end, &sorted.kept);
        Ok(())
    }

    /// The chunk's slots in the range that name a document, and the empty ones (kept); `None`
    /// when the head has passed the chunk. Slots never written are given up first (so no late
    /// writer can fill them behind the walk).
    async fn list_slots(&self, range: &ChunkRange<'_>) -> CacheResult<Option<(Vec<Listed>, HashSet<i64>)>> {
        let ChunkRange {
            pipe, part, chunk, ..
        } = *range;
        let mut slots = self.read_chunk(pipe, part, chunk).await?;
        if slots.closed {
            return Ok(None);
        }
        let missing: Vec<i64> = (range.from..range.end)
            .filter(|k| !slots.slots.contains_key(k))
            .collect();
        if !missing.is_empty() {
            self.give_up_slots(pipe, part, chunk, &missing).await?;
            slots = self.read_chunk(pipe, part, chunk).await?;
        }
        let mut listed = Vec::new();
        let mut kept = HashSet::new();
        for k in range.from..range.end {
            match slots.slots.get(&k) {
                Some(Slot::Consumed) => {}
                Some(Slot::Doc { id, gen, taken_ms }) => listed.push(Listed {
                    k,
                    id: id.clone(),
                    gen: *gen,
                    taken_ms: *taken_ms,
                }),
                None => {
                    kept.insert(k);
                }
            }
        }
        Ok(Some((listed, kept)))
    }

    /// Reads the listed slots' documents and decides each slot (`classify_slot`), fencing the
    /// abandoned ones.
    async fn sort_slots(&self, pipe: &Pipe, listed: Vec<Listed>, args: &ClaimArgs) -> CacheResult<Sorted> {
        let ids: Vec<String> = listed.iter().map(|slot| slot.id.clone()).collect();
        let docs = self.read_states(pipe, &ids).await?;
        let prefix = args.document_id_prefix.as_deref().unwrap_or("");
        let now = ms_i64(args.now_ms);
        let mut sorted = Sorted::default();
        for (slot, doc) in listed.into_iter().zip(docs) {
            match classify_slot(&slot, doc.as_ref(), &args.stage, prefix, now) {
                SlotFate::Claim => sorted.wanted.push((slot.k, slot.id, doc.unwrap_or_default())),
                SlotFate::Keep => {
                    sorted.kept.insert(slot.k);
                }
                SlotFate::Consume => sorted.consumed.push(slot.k),
                SlotFate::Fence => {
                    let fenced = match &doc {
                        Some(d) => self.fence(pipe, &slot.id, d).await?,
                        None => self.fence_missing(pipe, &slot.id).await?,
                    };
                    if fenced == Written::Yes {
                        sorted.consumed.push(slot.k);
                    } else {
                        sorted.kept.insert(slot.k);
                    }
                }
            }
        }
        Ok(sorted)
    }

    /// Leases and claims the wanted documents: their lease index entries first, then the moves
    /// in groups, checking the deadline between them: past it the claim answers with what it
    /// won (each won document is fully claimed), rather than time out.
    async fn claim_wanted(
        &self,
        pipe: &Pipe,
        wanted: Vec<(i64, String, StagedRecord)>,
        args: &ClaimArgs,
        walk: &mut Walk,
        sorted: &mut Sorted,
    ) -> CacheResult<()> {
        let expires = ms_i64(args.now_ms).saturating_add(ms_i64(args.lease_ms));
        let leases: Vec<(String, i64)> = wanted.iter().map(|(_, id, _)| (id.clone(), expires)).collect();
        self.lease_index_add(pipe, &leases).await?;
        let mut groups = wanted.into_iter().peekable();
        while groups.peek().is_some() {
            if Instant::now() >= walk.deadline {
                sorted.kept.extend(groups.by_ref().map(|(k, _, _)| k));
                walk.out_of_time = true;
                break;
            }
            let moves: Vec<_> = groups
                .by_ref()
                .take(PARALLEL)
                .map(|(k, id, doc)| async move {
                    let result = self.claim_one(pipe, k, &id, doc, args, expires).await;
                    (k, id, result)
                })
                .collect();
            for (k, id, result) in all(moves).await {
                match result {
                    Ok(Moved::Yes(entry)) => {
                        sorted.consumed.push(k);
                        if let Some(entry) = entry {
                            walk.to_close.push((id.clone(), entry));
                        }
                        walk.claimed.push(id);
                    }
                    // Someone else is moving it: look again next time.
                    Ok(Moved::Busy | Moved::Conflict) => {
                        sorted.kept.insert(k);
                    }
                    Err(err) => {
                        sorted.kept.insert(k);
                        walk.failure.get_or_insert(err);
                    }
                }
            }
        }
        Ok(())
    }

    /// Claims one document found live at slot `k`. A move in flight on it that its owner
    /// abandoned is repaired and the claim tried again once.
    async fn claim_one(
        &self,
        pipe: &Pipe,
        k: i64,
        id: &str,
        doc: StagedRecord,
        args: &ClaimArgs,
        expires: i64,
    ) -> CacheResult<Moved> {
        let mut doc = doc;
        for attempt in 0..2 {
            let next = StagedRecord {
                stage: args.claim_stage.clone(),
                worker: args.worker_id.clone(),
                lease_expires: expires,
                lease_ms: ms_i64(args.lease_ms),
                from: args.stage.clone(),
                reason: reason_for(&args.claim_stage),
                ..StagedRecord::default()
            };
            let mv = Move {
                id: id.to_owned(),
                old: Some(doc),
                next,
                chunks: None,
                new_version: false,
            };
            match self.apply_move(pipe, mv, args.now_ms).await? {
                Moved::Busy if attempt == 0 && self.settle_stale(pipe, id, args.now_ms).await? => {
                    match self.read_state(pipe, id).await? {
                        Some(d) if d.present() && d.stage == args.stage && d.qn == k && !d.leased() => {
                            doc = d
                        }
                        _ => return Ok(Moved::Conflict),
                    }
                }
                other => return Ok(other),
            }
        }
        Ok(Moved::Busy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_000_000;

    fn slot(k: i64, id: &str, gen: i64, taken_ms: i64) -> Listed {
        Listed {
            k,
            id: id.to_owned(),
            gen,
            taken_ms,
        }
    }

    /// A document in `stage` at queue slot `qn`, generation `generation`.
    fn doc(stage: &str, qn: i64, generation: u32) -> StagedRecord {
        StagedRecord {
            generation,
            stage: stage.to_owned(),
            qn,
            ..StagedRecord::default()
        }
    }

    #[test]
    fn a_document_pointing_at_its_slot_is_claimed_when_its_id_has_the_prefix() {
        let d = doc("pending", 4, 2);
        assert_eq!(
            classify_slot(&slot(4, "ab", 1, NOW), Some(&d), "pending", "", NOW),
            SlotFate::Claim
        );
        assert_eq!(
            classify_slot(&slot(4, "ab", 1, NOW), Some(&d), "pending", "a", NOW),
            SlotFate::Claim
        );
        assert_eq!(
            classify_slot(&slot(4, "ab", 1, NOW), Some(&d), "pending", "b", NOW),
            SlotFate::Keep
        );
    }

    #[test]
    fn a_leased_or_moved_document_does_not_point_here() {
        let mut leased = doc("pending", 4, 2);
        leased.lease_expires = NOW + 1;
        // Not pointing here, and its generation differs from the slot's: the slot is dead.
        for d in [leased, doc("embedding", 4, 2), doc("pending", 5, 2)] {
            assert_eq!(
                classify_slot(&slot(4, "a", 1, NOW), Some(&d), "pending", "", NOW),
                SlotFate::Consume
            );
        }
        // A placeholder (no stage) reads as absent.
        let placeholder = doc("", 4, 3);
        assert_eq!(
            classify_slot(&slot(4, "a", 1, NOW), Some(&placeholder), "pending", "", NOW),
            SlotFate::Consume
        );
    }

    #[test]
    fn a_slot_whose_write_may_still_happen_is_kept_until_the_grace_period_then_fenced() {
        let grace = ms_i64(GRACE_MS);
        let d = doc("indexed", 9, 3);
        // The document still has the generation the slot was taken at: the write may come.
        assert_eq!(
            classify_slot(&slot(4, "a", 3, NOW), Some(&d), "pending", "", NOW),
            SlotFate::Keep
        );
        assert_eq!(
            classify_slot(&slot(4, "a", 3, NOW - grace + 1), Some(&d), "pending", "", NOW),
            SlotFate::Keep
        );
        assert_eq!(
            classify_slot(&slot(4, "a", 3, NOW - grace), Some(&d), "pending", "", NOW),
            SlotFate::Fence
        );
        // A slot taken for a document that did not exist (generation 0) and still does not.
        assert_eq!(
            classify_slot(&slot(4, "a", 0, NOW), None, "pending", "", NOW),
            SlotFate::Keep
        );
        assert_eq!(
            classify_slot(&slot(4, "a", 0, NOW - grace), None, "pending", "", NOW),
            SlotFate::Fence
        );
        assert_eq!(
            classify_slot(&slot(4, "a", 2, NOW), None, "pending", "", NOW),
            SlotFate::Consume
        );
    }

    #[test]
    fn the_walk_moves_the_head_past_consumed_slots_up_to_the_first_kept_one() {
        let mut walk = Walk {
            deadline: Instant::now(),
            out_of_time: false,
            claimed: Vec::new(),
            to_close: Vec::new(),
            new_head: 0,
            contiguous: true,
            failure: None,
        };
        walk.pass(0..3, &HashSet::new());
        assert_eq!(walk.new_head, 3);
        walk.pass(3..6, &HashSet::from([4]));
        assert_eq!((walk.new_head, walk.contiguous), (4, false));
        walk.pass(6..8, &HashSet::new());
        assert_eq!(walk.new_head, 4);
    }
}
