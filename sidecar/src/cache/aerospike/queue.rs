//! Claim queues: per stage, the documents that entered it, in order.
//!
//! Records (`<part>` = `<len>:<stage>`): `{inc}:q:<part>:t` (`n`, the next slot number, atomic
//! add), `{inc}:q:<part>:h` (`n`, the first slot not yet consumed, compare-and-set), and chunk
//! records `{inc}:q:<part>:c:<n / 256>` whose map bin `s` holds slot number →
//! `[document id, generation the document had when the slot was taken, time]`, or `""` once
//! consumed (or given up). A chunk the head has passed is marked `closed` and lapses after a day.
//!
//! A slot is written **before** the document write that points to it (`qn` on the document), so a
//! document in a stage is always reachable from that stage's queue. A claim that reaches a slot
//! whose document does not point back to it tells the two cases apart by generation: if the
//! document is still at the generation the slot recorded, its write may still land (pending: the
//! slot is kept; after `GRACE_MS` the claim fences the document — bumps its generation — so that
//! write never lands); otherwise that write can no longer succeed and the slot is stale
//! (consumed). A slot number taken (tail incremented) but never written is given up by the claim
//! that finds it missing (create-only `""`), so the head never waits for a dead writer; the writer
//! then takes another slot, as it does when its chunk was closed (every slot of a closed chunk is
//! written, so a create-only slot write there fails).

use std::collections::HashMap;

use aerospike::operations::{maps, MapOrder, MapPolicy, MapWriteFlags};
use aerospike::{Bin, Bins, Value};

use super::records::Pipe;
use super::{bin_int, map_entries, AerospikeCache, Cond, ELEMENT_EXISTS, MAX_RMW_ATTEMPTS};
use crate::cache::{CacheError, CacheResult};

/// Slots per chunk record.
pub const CHUNK: i64 = 256;
/// How long a closed chunk is kept (a straggling writer must still find it closed).
const CLOSED_TTL_SECONDS: u32 = 86_400;

pub fn stage_part(stage: &str) -> String {
    format!("{}:{stage}", stage.len())
}

fn key_ordered(flags: MapWriteFlags) -> MapPolicy {
    MapPolicy::new(MapOrder::KeyOrdered, flags)
}

/// A slot as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    Consumed,
    /// `gen`: the document's generation when the slot was taken (0: it did not exist).
    Doc {
        id: String,
        gen: i64,
        taken_ms: i64,
    },
}

impl Slot {
    fn parse(v: Value) -> Option<Self> {
        match v {
            Value::String(s) if s.is_empty() => Some(Self::Consumed),
            Value::List(items) => match items.as_slice() {
                [Value::String(id), Value::Int(gen), Value::Int(taken)] => Some(Self::Doc {
                    id: id.clone(),
                    gen: *gen,
                    taken_ms: *taken,
                }),
                _ => None,
            },
            _ => None,
        }
    }
}

/// A chunk as read: its slots, and whether the head has passed it.
pub struct Chunk {
    pub slots: HashMap<i64, Slot>,
    pub closed: bool,
}

impl AerospikeCache {
    /// Appends a slot for `id` (now at generation `gen`, 0 when absent) to `stage`'s queue;
    /// returns its number.
    pub(super) async fn enqueue(
        &self,
        pipe: &Pipe,
        stage: &str,
        id: &str,
        gen: u32,
        now_ms: u64,
    ) -> CacheResult<i64> {
        let part = stage_part(stage);
        for _ in 0..MAX_RMW_ATTEMPTS {
            let n = self.add(&pipe.set, pipe.key(&format!("q:{part}:t")), 1).await? - 1;
            let slot = Value::List(vec![
                Value::String(id.to_owned()),
                Value::Int(i64::from(gen)),
                Value::Int(super::ms_i64(now_ms)),
            ]);
            let ops = vec![maps::put(
                &key_ordered(MapWriteFlags::CREATE_ONLY),
                "s",
                Value::Int(n),
                slot,
            )];
            match self
                .operate(&pipe.set, pipe.chunk_key(&part, n / CHUNK), ops, Cond::Any, None)
                .await?
            {
                Ok(_) => return Ok(n),
                // A claim gave this slot up before we wrote it (or its chunk is closed): take
                // another.
                Err(ELEMENT_EXISTS) => continue,
                Err(code) => {
                    return Err(CacheError::Unavailable(format!(
                        "enqueue failed with result code {code}"
                    )))
                }
            }
        }
        Err(CacheError::Unavailable("could not enqueue a document".into()))
    }

    pub(super) async fn read_chunk(&self, pipe: &Pipe, part: &str, chunk: i64) -> CacheResult<Chunk> {
        let rec = self
            .get(&pipe.set, pipe.chunk_key(part, chunk), Bins::All)
            .await?;
        Ok(match rec {
            None => Chunk {
                slots: HashMap::new(),
                closed: false,
            },
            Some(rec) => Chunk {
                slots: map_entries(rec.bins.get("s"))
                    .into_iter()
                    .filter_map(|(k, v)| match k {
                        Value::Int(n) => Slot::parse(v).map(|s| (n, s)),
                        _ => None,
                    })
                    .collect(),
                closed: bin_int(&rec, "closed") == Some(1),
            },
        })
    }

    /// Gives up slots taken but not written (create-only `""`: a writer that got there first
    /// keeps its slot).
    pub(super) async fn give_up_slots(
        &self,
        pipe: &Pipe,
        part: &str,
        chunk: i64,
        slots: &[i64],
    ) -> CacheResult<()> {
        let flags = MapWriteFlags::CREATE_ONLY | MapWriteFlags::NO_FAIL | MapWriteFlags::PARTIAL;
        self.empty_slots(pipe, part, chunk, slots, flags).await
    }

    /// Marks slots consumed.
    pub(super) async fn consume_slots(
        &self,
        pipe: &Pipe,
        part: &str,
        chunk: i64,
        slots: &[i64],
    ) -> CacheResult<()> {
        self.empty_slots(pipe, part, chunk, slots, MapWriteFlags::DEFAULT)
            .await
    }

    /// Writes `""` into `slots` of a queue chunk with the given map write flags.
    async fn empty_slots(
        &self,
        pipe: &Pipe,
        part: &str,
        chunk: i64,
        slots: &[i64],
        flags: MapWriteFlags,
    ) -> CacheResult<()> {
        if slots.is_empty() {
            return Ok(());
        }
        let items: HashMap<Value, Value> = slots
            .iter()
            .map(|n| (Value::Int(*n), Value::String(String::new())))
            .collect();
        let ops = vec![maps::put_items(&key_ordered(flags), "s", items)];
        self.operate(&pipe.set, pipe.chunk_key(part, chunk), ops, Cond::Any, None)
            .await?
            .map(|_| ())
            .map_err(|code| CacheError::Unavailable(format!("queue update failed with result code {code}")))
    }

    /// Moves the head from `head` (at generation `head_gen`, `None`: no head record yet) to
    /// `new_head` and closes the chunks it passed. A lost race leaves the head to the winner.
    pub(super) async fn advance_head(
        &self,
        pipe: &Pipe,
        part: &str,
        head: i64,
        head_gen: Option<u32>,
        new_head: i64,
    ) -> CacheResult<()> {
        if new_head <= head {
            return Ok(());
        }
        let cond = head_gen.map_or(Cond::Create, Cond::Gen);
        let bins = [Bin::new("n", Value::Int(new_head))];
        let written = self
            .put(&pipe.set, pipe.key(&format!("q:{part}:h")), &bins, cond, None)
            .await?;
        if written == super::Written::Conflict {
            return Ok(());
        }
        let closes: Vec<_> = (head / CHUNK..new_head / CHUNK)
            .map(|chunk| async move {
                let bins = [Bin::new("closed", Value::Int(1))];
                // A chunk that cannot be closed now stays open: harmless, its slots are consumed.
                let _ = self
                    .put(
                        &pipe.set,
                        pipe.chunk_key(part, chunk),
                        &bins,
                        Cond::Any,
                        Some(CLOSED_TTL_SECONDS),
                    )
                    .await;
            })
            .collect();
        super::all(closes).await;
        Ok(())
    }
}
