//! The lease-expiry index: which leases expire when, so that returning expired documents costs
//! as much as there are expired leases, whatever time passed since the last operation.
//!
//! Records: buckets `{inc}:x:<minute>:<shard>` (a lease goes to the minute it expires in and to
//! shard `fnv1a(id) % LEASE_SHARDS`), whose map bin `e` holds `"<expiry ms, 20 digits>|<id>"` → 1
//! (one entry per lease, so writers never read-modify-write a shared list; keys sort by expiry,
//! so a key range selects the due ones); and the directory `{inc}:x:dir`, whose map bin `m`
//! holds minute → a nonce, one entry per minute that has (or may have) buckets.
//!
//! Order, and why any prefix is safe:
//! - A writer (claim, heartbeat) writes its bucket entries, then the directory entry (a fresh
//!   nonce), then the lease on the document. Cut before the lease: entries without a lease, which
//!   expiry skips. A heartbeat removes its old entry only after the new lease is written.
//! - Expiry reads the directory, and for each minute not after now reads the due keys of that
//!   minute's buckets, returns those documents (each only if its lease is still that one),
//!   removes the processed keys, deletes a past minute's emptied bucket with a generation check
//!   (so an entry added since is not lost), and removes the minute from the directory only if its
//!   nonce is still the one it read (so a writer that came back since is not lost) and every
//!   bucket is gone. Progress is saved bucket by bucket; a cut repeats at most that bucket's
//!   work, which is idempotent.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use aerospike::operations::{maps, MapOrder, MapPolicy, MapReturnType, MapWriteFlags};
use aerospike::{BatchOperation, BatchReadPolicy, Value};

use super::records::Pipe;
use super::{all, map_entries, ms_i64, AerospikeCache, Cond};
use crate::cache::{CacheError, CacheResult};

/// Buckets per minute.
pub const LEASE_SHARDS: u64 = 8;

fn minute_of(expires_ms: i64) -> i64 {
    expires_ms.div_euclid(60_000)
}

fn entry_key(expires_ms: i64, id: &str) -> String {
    format!("{expires_ms:020}|{id}")
}

fn parse_entry_key(key: &str) -> Option<(i64, &str)> {
    let (exp, id) = key.split_once('|')?;
    Some((exp.parse().ok()?, id))
}

fn ordered() -> MapPolicy {
    MapPolicy::new(MapOrder::KeyOrdered, MapWriteFlags::DEFAULT)
}

impl AerospikeCache {
    /// Indexes leases `(id, expiry)`: buckets first, then the directory.
    pub(super) async fn lease_index_add(&self, pipe: &Pipe, leases: &[(String, i64)]) -> CacheResult<()> {
        let mut buckets: BTreeMap<(i64, u64), HashMap<Value, Value>> = BTreeMap::new();
        for (id, exp) in leases {
            let shard = super::fnv1a(id.as_bytes()) % LEASE_SHARDS;
            buckets
                .entry((minute_of(*exp), shard))
                .or_default()
                .insert(Value::String(entry_key(*exp, id)), Value::Int(1));
        }
        if buckets.is_empty() {
            return Ok(());
        }
        let minutes: Vec<i64> = {
            let mut m: Vec<i64> = buckets.keys().map(|(minute, _)| *minute).collect();
            m.dedup();
            m
        };
        let writes: Vec<_> = buckets
            .into_iter()
            .map(|((minute, shard), items)| async move {
                let ops = vec![maps::put_items(&ordered(), "e", items)];
                self.operate(&pipe.set, pipe.bucket_key(minute, shard), ops, Cond::Any, None)
                    .await?
                    .map(|_| ())
                    .map_err(|code| {
                        CacheError::Unavailable(format!("lease index write failed with result code {code}"))
                    })
            })
            .collect();
        for written in all(writes).await {
            written?;
        }
        let items: HashMap<Value, Value> = minutes
            .into_iter()
            .map(|m| (Value::Int(m), Value::Int(self.unique_id())))
            .collect();
        let ops = vec![maps::put_items(&ordered(), "m", items)];
        self.operate(&pipe.set, pipe.dir_key(), ops, Cond::Any, None)
            .await?
            .map(|_| ())
            .map_err(|code| {
                CacheError::Unavailable(format!("lease directory write failed with result code {code}"))
            })
    }

    /// Drops index entries of leases that were replaced (best effort: a stale entry is skipped
    /// by expiry, which checks the lease on the document).
    pub(super) async fn lease_index_remove(&self, pipe: &Pipe, leases: &[(String, i64)]) {
        let mut buckets: BTreeMap<(i64, u64), Vec<Value>> = BTreeMap::new();
        for (id, exp) in leases {
            let shard = super::fnv1a(id.as_bytes()) % LEASE_SHARDS;
            buckets
                .entry((minute_of(*exp), shard))
                .or_default()
                .push(Value::String(entry_key(*exp, id)));
        }
        let removals: Vec<_> = buckets
            .into_iter()
            .map(|((minute, shard), keys)| async move {
                let ops = vec![maps::remove_by_key_list("e", keys, MapReturnType::NONE)];
                let _ = self
                    .operate(&pipe.set, pipe.bucket_key(minute, shard), ops, Cond::Any, None)
                    .await;
            })
            .collect();
        all(removals).await;
    }

    /// Returns the documents whose lease expired at `now_ms`, minute by minute, until done (true)
    /// or `deadline` (false: the rest is still indexed). `dir` is the directory record as read.
    pub(super) async fn expire_due(
        &self,
        pipe: &Pipe,
        dir: Option<&aerospike::Record>,
        now_ms: u64,
        deadline: Instant,
    ) -> CacheResult<bool> {
        let now = ms_i64(now_ms);
        let now_minute = minute_of(now);
        let mut due: Vec<(i64, Value)> = dir
            .map(|d| map_entries(d.bins.get("m")))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| match k {
                Value::Int(minute) if minute <= now_minute => Some((minute, v)),
                _ => None,
            })
            .collect();
        due.sort_by_key(|(m, _)| *m);
        for (minute, nonce) in due {
            if Instant::now() >= deadline {
                return Ok(false);
            }
            self.expire_minute(pipe, minute, nonce, now, minute < now_minute)
                .await?;
        }
        Ok(true)
    }

    /// One minute of the index: expire its due leases, then clean up what was processed.
    async fn expire_minute(
        &self,
        pipe: &Pipe,
        minute: i64,
        nonce: Value,
        now: i64,
        past: bool,
    ) -> CacheResult<()> {
        let upto = Value::String(format!("{:020}", now.saturating_add(1)));
        let rp = BatchReadPolicy::default();
        let mut rows = Vec::with_capacity(LEASE_SHARDS as usize);
        for shard in 0..LEASE_SHARDS {
            let key = self.key(&pipe.set, pipe.bucket_key(minute, shard))?;
            let op = maps::get_by_key_range("e", Value::Nil, upto.clone(), MapReturnType::KEY);
            rows.push(BatchOperation::read_ops(&rp, key, vec![op]));
        }
        let buckets = self.run_batch(rows).await?;
        let mut emptied = 0;
        let mut failure = None;
        for (shard, bucket) in (0..LEASE_SHARDS).zip(buckets) {
            let Some(bucket) = bucket else {
                emptied += 1;
                continue;
            };
            let keys = match bucket.bins.get("e") {
                Some(Value::List(keys)) => keys.clone(),
                _ => Vec::new(),
            };
            let entries: Vec<(String, i64, String)> = keys
                .iter()
                .filter_map(|k| match k {
                    Value::String(s) => parse_entry_key(s).map(|(exp, id)| (s.clone(), exp, id.to_owned())),
                    _ => None,
                })
                .collect();
            let expiries: Vec<_> = entries
                .iter()
                .map(|(_, exp, id)| {
                    let (exp, id) = (*exp, id.clone());
                    async move { self.expire_one(pipe, &id, exp, now).await }
                })
                .collect();
            let results = all(expiries).await;
            let mut done = Vec::new();
            for ((key, _, _), result) in entries.iter().zip(results) {
                match result {
                    Ok(()) => done.push(Value::String(key.clone())),
                    Err(err) => {
                        failure.get_or_insert(err);
                    }
                }
            }
            let all_done = done.len() == entries.len();
            if self
                .clean_bucket(pipe, minute, shard, done, past && all_done, bucket.generation)
                .await?
            {
                emptied += 1;
            }
        }
        if let Some(err) = failure {
            return Err(err);
        }
        if past && emptied == LEASE_SHARDS {
            let ops = vec![maps::remove_by_value("m", nonce, MapReturnType::NONE)];
            self.operate(&pipe.set, pipe.dir_key(), ops, Cond::Any, None)
                .await?
                .map_err(|code| {
                    CacheError::Unavailable(format!("lease directory update failed with result code {code}"))
                })?;
        }
        Ok(())
    }

    /// Removes processed keys from a bucket; with `drop_if_empty`, a bucket left empty is deleted
    /// (at the generation that emptied it, so an entry added since survives). `generation`: the
    /// bucket's generation as read. True when the bucket is gone.
    async fn clean_bucket(
        &self,
        pipe: &Pipe,
        minute: i64,
        shard: u64,
        done: Vec<Value>,
        drop_if_empty: bool,
        generation: u32,
    ) -> CacheResult<bool> {
        let key = pipe.bucket_key(minute, shard);
        if done.is_empty() {
            if !drop_if_empty {
                return Ok(false);
            }
            return self.delete(&pipe.set, key, Some(generation)).await;
        }
        let ops = vec![
            maps::remove_by_key_list("e", done, MapReturnType::NONE),
            maps::size("e"),
        ];
        let rec = self
            .operate(&pipe.set, key.clone(), ops, Cond::Any, None)
            .await?
            .map_err(|code| {
                CacheError::Unavailable(format!("lease index update failed with result code {code}"))
            })?;
        let left = super::last_int(&rec).unwrap_or(1);
        if !drop_if_empty || left > 0 {
            return Ok(false);
        }
        self.delete(&pipe.set, key, Some(rec.generation)).await
    }

    /// Runs expiry for an operation: up to half its time budget inline; the rest continues in a
    /// background sweep (one per pipeline per process) so the operation can answer in time.
    /// True when something may have changed (the caller re-reads what it read before).
    pub(super) async fn expire_leases(
        &self,
        pipe: &Pipe,
        dir: Option<&aerospike::Record>,
        now_ms: u64,
    ) -> CacheResult<bool> {
        let has_due = dir.is_some_and(|d| {
            map_entries(d.bins.get("m"))
                .iter()
                .any(|(k, _)| matches!(k, Value::Int(m) if *m <= minute_of(ms_i64(now_ms))))
        });
        if !has_due {
            return Ok(false);
        }
        let deadline = Instant::now() + self.settings.op_timeout / 2;
        if !self.expire_due(pipe, dir, now_ms, deadline).await? {
            self.spawn_sweep(pipe.clone(), now_ms);
        }
        Ok(true)
    }

    fn spawn_sweep(&self, pipe: Pipe, now_ms: u64) {
        {
            let mut sweeping = self
                .sweeping
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !sweeping.insert(pipe.id.clone()) {
                return;
            }
        }
        let Some(this) = self.this.upgrade() else { return };
        tokio::spawn(async move {
            tracing::info!(pipeline = %pipe.id, "returning overdue leases in the background");
            for _ in 0..10_000 {
                let dir = match this.get(&pipe.set, pipe.dir_key(), aerospike::Bins::All).await {
                    Ok(dir) => dir,
                    Err(err) => {
                        tracing::warn!(pipeline = %pipe.id, error = %err, "lease sweep stopped");
                        break;
                    }
                };
                let deadline =
                    Instant::now() + this.settings.op_timeout.max(std::time::Duration::from_secs(1));
                match this.expire_due(&pipe, dir.as_ref(), now_ms, deadline).await {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(err) => {
                        tracing::warn!(pipeline = %pipe.id, error = %err, "lease sweep stopped");
                        break;
                    }
                }
            }
            this.sweeping
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&pipe.id);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_keys_sort_by_expiry_and_parse_back() {
        let a = entry_key(59_999, "z|with|bars");
        let b = entry_key(60_000, "a");
        assert!(a < b);
        assert_eq!(parse_entry_key(&a), Some((59_999, "z|with|bars")));
        assert_eq!(minute_of(59_999), 0);
        assert_eq!(minute_of(60_000), 1);
    }
}
