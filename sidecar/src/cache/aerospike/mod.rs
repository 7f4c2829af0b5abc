//! The Aerospike backend (`AEROSPIKE_HOSTS`), with the `aerospike` 3.0 client.
//!
//! Stateless across replicas: everything lives in Aerospike records, and every read-modify-write
//! is a generation-checked write (or a create-only one) retried on conflict, so several sidecars
//! can share one cluster. The layout (sets, keys, bins) is documented in the sidecar's README.
//!
//! Modules: `documents` (the mirrored Turbopuffer documents: the `DocumentStore`), `pipelines`
//! (staged documents and the pipeline operations: the `PipelineStore`; the claim in
//! `pipelines/claim`), `journal` (exact
//! per-stage counts), `queue` (claim queues), `leases` (the lease-expiry index), `breaker` (fail
//! fast while the cluster is unreachable). This file holds the connection, the backend's health
//! and the command helpers every module uses.
//!
//! Failure handling: the client connects in the background (the sidecar starts cold); every
//! command carries the per-operation timeout; a transport failure, a timeout, or a call abandoned
//! before it finished opens the breaker (`breaker`). Stop-writes (`SERVER_FULL`, `FORBIDDEN`) and
//! an oversize record are `Full` and do not open it.
//!
//! **Nothing half-written.** An Aerospike operation is several commands, and any of them can be
//! the last one that happens (a timeout, a node that went away, a killed process). Every
//! operation is ordered so that any prefix of its commands leaves a consistent, recoverable
//! state — each module says how — and generations are never predicted (only compared with what a
//! read returned), so they may wrap at 16 bits.
//!
//! Mirror batches use the trait's op-by-op default (`cache::mirror::apply_op_by_op`): every op is
//! one of the generation-checked single-document writes below, none dropped half-way (the API
//! runs the whole batch in a task of its own), each command bounded by the operation timeout.

mod breaker;
mod documents;
mod journal;
mod leases;
mod pipelines;
mod queue;
mod records;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use aerospike::operations::Operation;
use aerospike::policy::{Expiration, GenerationPolicy, RecordExistsAction};
use aerospike::{
    AdminPolicy, BatchOperation, BatchPolicy, BatchReadPolicy, Bin, Bins, Client, ClientPolicy, Key,
    ReadPolicy, Value, WritePolicy,
};
use async_trait::async_trait;

use self::breaker::Breaker;
pub use self::breaker::BreakerState;
use super::{CacheError, CacheHealth, CacheResult, StoreBackend};

/// Aerospike's longest set name.
const MAX_SET_NAME: usize = 63;
/// Attempts of one generation-checked read-modify-write before giving up.
const MAX_RMW_ATTEMPTS: usize = 64;
/// How long the breaker stays open after a transport failure (the default).
pub const BREAKER_OPEN_FOR: Duration = Duration::from_secs(2);
/// Commands one operation keeps in flight at once.
const PARALLEL: usize = 32;
/// Keys per batch-read command.
const BATCH_KEYS: usize = 256;

#[derive(Debug, Clone)]
pub struct AerospikeSettings {
    pub hosts: String,
    pub namespace: String,
    pub set_prefix: String,
    pub pipeline_set_prefix: String,
    pub op_timeout: Duration,
    /// How long the breaker stays open after a failure (`BREAKER_OPEN_FOR`; tests shorten it).
    pub breaker_open_for: Duration,
}

/// Outcome of a conditional write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Yes,
    /// Generation mismatch, the record already exists (create-only) or does not (update-only).
    Conflict,
}

/// When a write may happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cond {
    Any,
    Create,
    Gen(u32),
}

/// Result codes callers handle themselves (everything else is an error).
const NOT_FOUND: i32 = 2;
const GENERATION: i32 = 3;
const EXISTS: i32 = 5;
const ELEMENT_NOT_FOUND: i32 = 23;
const ELEMENT_EXISTS: i32 = 24;

pub struct AerospikeCache {
    settings: AerospikeSettings,
    client: RwLock<Option<Arc<Client>>>,
    breaker: Breaker,
    /// Pipeline id → incarnation, as last read from the pipeline's record; every use re-reads that
    /// record in the same batch and corrects a stale entry.
    incarnations: Mutex<HashMap<String, String>>,
    /// Pipelines whose overdue leases a background task of this process is returning.
    sweeping: Mutex<HashSet<String>>,
    /// Unique transaction ids: a per-process random seed and a counter.
    ids_seed: u64,
    ids: AtomicU64,
    this: Weak<AerospikeCache>,
}

/// A stable 64-bit FNV-1a hash (set names too long for Aerospike, shard choice).
pub(crate) fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `prefix + id` when it is a valid set name, else `prefix + "#" + hash(id)`.
pub fn set_name(prefix: &str, id: &str) -> String {
    let plain = format!("{prefix}{id}");
    let safe = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if safe && plain.len() <= MAX_SET_NAME {
        plain
    } else {
        format!("{prefix}#{:016x}", fnv1a(id.as_bytes()))
    }
}

fn bin_str(rec: &aerospike::Record, name: &str) -> Option<String> {
    match rec.bins.get(name) {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    }
}

fn bin_int(rec: &aerospike::Record, name: &str) -> Option<i64> {
    match rec.bins.get(name) {
        Some(Value::Int(i)) => Some(*i),
        _ => None,
    }
}

/// The entries of a map bin, whatever map flavour the client decoded it into.
fn map_entries(value: Option<&Value>) -> Vec<(Value, Value)> {
    match value {
        Some(Value::HashMap(m)) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        Some(Value::OrderedMap(m)) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        Some(Value::SortedMap(m)) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        _ => Vec::new(),
    }
}

fn ms_i64(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// Runs `futures` with at most `PARALLEL` in flight and waits for every one of them (none is
/// dropped half-way, which the breaker would count as a failure).
///
/// Takes the futures collected (not a lazy iterator): a closure held across an await point trips
/// the compiler's `Send` check of async trait methods.
async fn all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    use futures_util::StreamExt;
    futures_util::stream::iter(futures)
        .buffered(PARALLEL)
        .collect()
        .await
}

impl AerospikeCache {
    /// Creates the backend and starts connecting in the background.
    pub fn start(settings: AerospikeSettings) -> Arc<Self> {
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let cache = Arc::new_cyclic(|this| Self {
            breaker: Breaker::new(settings.breaker_open_for),
            settings,
            client: RwLock::new(None),
            incarnations: Mutex::new(HashMap::new()),
            sweeping: Mutex::new(HashSet::new()),
            ids_seed: seed,
            ids: AtomicU64::new(0),
            this: this.clone(),
        });
        let weak = Arc::downgrade(&cache);
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                let Some(cache) = weak.upgrade() else { return };
                let policy = ClientPolicy {
                    timeout: u32::try_from(cache.settings.op_timeout.as_millis().max(1000))
                        .unwrap_or(u32::MAX),
                    ..ClientPolicy::default()
                };
                match Client::new(&policy, &cache.settings.hosts).await {
                    Ok(client) => {
                        tracing::info!(hosts = %cache.settings.hosts, "connected to Aerospike");
                        *cache.client.write().unwrap_or_else(PoisonError::into_inner) =
                            Some(Arc::new(client));
                        return;
                    }
                    Err(err) => {
                        tracing::warn!(hosts = %cache.settings.hosts, error = %err, "Aerospike not reachable; retrying");
                    }
                }
                drop(cache);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        });
        cache
    }

    /// Waits up to `timeout` for the background connection (tests, start-up checks).
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self
                .client
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// The breaker's state (`/healthz`, tests).
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// A new id, unique across processes (random seed) and within this one (counter).
    fn unique_id(&self) -> i64 {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        let mixed =
            (self.ids_seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        // Positive, never 0 (0 is "no transaction").
        i64::try_from(mixed >> 1).unwrap_or(1).max(1)
    }

    fn client(&self) -> CacheResult<Arc<Client>> {
        self.client
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| CacheError::Unavailable("cache cold: Aerospike not connected yet".into()))
    }

    fn timeout_ms(&self) -> u32 {
        u32::try_from(self.settings.op_timeout.as_millis())
            .unwrap_or(u32::MAX)
            .max(1)
    }

    fn read_policy(&self) -> ReadPolicy {
        let mut p = ReadPolicy::default();
        p.base_policy.total_timeout = self.timeout_ms();
        p.base_policy.socket_timeout = self.timeout_ms();
        p
    }

    fn batch_policy(&self) -> BatchPolicy {
        let mut p = BatchPolicy::default();
        p.base_policy.total_timeout = self.timeout_ms();
        p.base_policy.socket_timeout = self.timeout_ms();
        p
    }

    fn write_policy(&self, cond: Cond, ttl_seconds: Option<u32>) -> WritePolicy {
        let mut p = WritePolicy::default();
        p.base_policy.total_timeout = self.timeout_ms();
        p.base_policy.socket_timeout = self.timeout_ms();
        // Never resent: a refused generation check then means the write did not happen (the
        // journal relies on it); a lost answer is reported as an error, never as a conflict.
        p.base_policy.max_retries = 0;
        p.expiration = match ttl_seconds {
            Some(s) => Expiration::Seconds(s),
            None => Expiration::Never,
        };
        match cond {
            Cond::Any => {}
            Cond::Create => p.record_exists_action = RecordExistsAction::CreateOnly,
            Cond::Gen(g) => {
                p.generation_policy = GenerationPolicy::ExpectGenEqual;
                p.generation = g;
            }
        }
        p
    }

    fn key(&self, set: &str, key: Value) -> CacheResult<Key> {
        Key::new(self.settings.namespace.clone(), set.to_owned(), key)
            .map_err(|e| CacheError::Unavailable(format!("bad Aerospike key: {e}")))
    }

    /// Maps a client error: `Ok(code)` for the logical result codes callers handle, else the
    /// cache error; the bool says whether it is a transport failure (opens the breaker).
    fn classify(err: &aerospike::Error) -> (Result<i32, CacheError>, bool) {
        let code = err.result_code();
        // Client-side codes are negative; 1 server error, 9 timeout, 11 unavailable, 14 key busy,
        // 18 device overload.
        let transport = code < 0 || matches!(code, 1 | 9 | 11 | 14 | 18);
        let mapped = match code {
            NOT_FOUND | GENERATION | EXISTS | ELEMENT_NOT_FOUND | ELEMENT_EXISTS => Ok(code),
            8 | 22 => Err(CacheError::Full(format!(
                "Aerospike refuses writes (stop-writes): {err}"
            ))),
            13 => Err(CacheError::Full(format!(
                "record larger than Aerospike's record size limit: {err}"
            ))),
            _ => Err(CacheError::Unavailable(format!("Aerospike: {err}"))),
        };
        (mapped, transport)
    }

    /// Runs one client call through the breaker: `Ok(Err(code))` for the logical result codes
    /// (not found, generation, exists, element exists / not found).
    async fn call<T, F>(&self, f: impl FnOnce(Arc<Client>) -> F) -> CacheResult<Result<T, i32>>
    where
        F: std::future::Future<Output = aerospike::Result<T>>,
    {
        let client = self.client()?;
        let call = self.breaker.admit()?;
        match f(client).await {
            Ok(v) => {
                call.finish(false);
                Ok(Ok(v))
            }
            Err(err) => {
                let (mapped, transport) = Self::classify(&err);
                call.finish(transport);
                mapped.map(Err)
            }
        }
    }

    async fn get(&self, set: &str, key: Value, bins: Bins) -> CacheResult<Option<aerospike::Record>> {
        let key = self.key(set, key)?;
        let policy = self.read_policy();
        match self
            .call(|c| async move { c.get(&policy, &key, bins).await })
            .await?
        {
            Ok(rec) => Ok(Some(rec)),
            Err(_) => Ok(None),
        }
    }

    async fn put(
        &self,
        set: &str,
        key: Value,
        bins: &[Bin],
        cond: Cond,
        ttl: Option<u32>,
    ) -> CacheResult<Written> {
        let key = self.key(set, key)?;
        let policy = self.write_policy(cond, ttl);
        match self
            .call(|c| async move { c.put(&policy, &key, bins).await })
            .await?
        {
            Ok(()) => Ok(Written::Yes),
            Err(_) => Ok(Written::Conflict),
        }
    }

    /// Deletes a record (only at generation `gen` when given). True when it was deleted.
    async fn delete(&self, set: &str, key: Value, gen: Option<u32>) -> CacheResult<bool> {
        let key = self.key(set, key)?;
        let policy = self.write_policy(gen.map_or(Cond::Any, Cond::Gen), None);
        match self
            .call(|c| async move { c.delete(&policy, &key).await })
            .await?
        {
            Ok(existed) => Ok(existed),
            Err(_) => Ok(false),
        }
    }

    /// One atomic multi-op command on a record; `Ok(Err(code))` for a logical refusal.
    async fn operate(
        &self,
        set: &str,
        key: Value,
        ops: Vec<Operation>,
        cond: Cond,
        ttl: Option<u32>,
    ) -> CacheResult<Result<aerospike::Record, i32>> {
        let key = self.key(set, key)?;
        let policy = self.write_policy(cond, ttl);
        self.call(|c| async move { c.operate(&policy, &key, &ops).await })
            .await
    }

    /// Reads many records of one set in batch commands; `None` for a missing record.
    async fn batch_get(
        &self,
        set: &str,
        keys: Vec<Value>,
        bins: Bins,
    ) -> CacheResult<Vec<Option<aerospike::Record>>> {
        let mut out = Vec::with_capacity(keys.len());
        for part in keys.chunks(BATCH_KEYS) {
            let rp = BatchReadPolicy::default();
            let mut ops = Vec::with_capacity(part.len());
            for key in part {
                ops.push(BatchOperation::read(
                    &rp,
                    self.key(set, key.clone())?,
                    bins.clone(),
                ));
            }
            let rows = self.run_batch(ops).await?;
            out.extend(rows);
        }
        Ok(out)
    }

    /// Runs read rows (across sets) as one batch command.
    async fn run_batch(&self, mut ops: Vec<BatchOperation>) -> CacheResult<Vec<Option<aerospike::Record>>> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let policy = self.batch_policy();
        let ops_ref = &mut ops;
        match self
            .call(|c| async move { c.batch(&policy, ops_ref).await })
            .await?
        {
            Ok(()) => {}
            Err(code) => {
                return Err(CacheError::Unavailable(format!(
                    "Aerospike batch failed with result code {code}"
                )))
            }
        }
        ops.into_iter()
            .map(|mut op| match op.result_code() {
                Some(aerospike::ResultCode::Ok) => Ok(op.take_record()),
                Some(aerospike::ResultCode::KeyNotFoundError) => Ok(None),
                other => Err(CacheError::Unavailable(format!(
                    "Aerospike batch row failed: {other:?}"
                ))),
            })
            .collect()
    }

    /// Atomically adds `delta` to the integer bin `n` of a record; returns the new value.
    async fn add(&self, set: &str, key: Value, delta: i64) -> CacheResult<i64> {
        let bin = Bin::new("n", Value::Int(delta));
        let ops = vec![
            aerospike::operations::add(&bin),
            aerospike::operations::get_bin("n"),
        ];
        let rec = self
            .operate(set, key, ops, Cond::Any, None)
            .await?
            .map_err(|code| {
                CacheError::Unavailable(format!("Aerospike add failed with result code {code}"))
            })?;
        last_int(&rec)
            .ok_or_else(|| CacheError::Unavailable("Aerospike add returned no counter value".into()))
    }

    async fn truncate(&self, set: &str) -> CacheResult<()> {
        let namespace = self.settings.namespace.clone();
        let set = set.to_owned();
        let policy = AdminPolicy {
            timeout: self.timeout_ms(),
        };
        self.call(|c| async move { c.truncate(&policy, &namespace, &set, 0).await })
            .await?
            .map_err(|code| {
                CacheError::Unavailable(format!("Aerospike truncate failed with result code {code}"))
            })
    }

    /// A health probe for a half-open breaker: one cheap read decides open or closed.
    async fn probe(&self) {
        let set = format!("{}#meta", self.settings.pipeline_set_prefix);
        let _ = self.get(&set, Value::String("#probe".into()), Bins::None).await;
    }
}

/// The last integer an operate returned (its results are positional).
fn last_int(rec: &aerospike::Record) -> Option<i64> {
    let from_results = rec.results.as_ref().and_then(|r| {
        r.iter().rev().find_map(|v| match v {
            Value::Int(i) => Some(*i),
            _ => None,
        })
    });
    from_results.or_else(|| match rec.bins.get("n") {
        Some(Value::Int(i)) => Some(*i),
        Some(Value::MultiResult(list)) => list.iter().rev().find_map(|v| match v {
            Value::Int(i) => Some(*i),
            _ => None,
        }),
        _ => None,
    })
}

#[async_trait]
impl StoreBackend for AerospikeCache {
    async fn health(&self) -> CacheHealth {
        let client = self.client.read().unwrap_or_else(PoisonError::into_inner).clone();
        if client.is_some() && self.breaker.state() == BreakerState::HalfOpen {
            // Nothing else may come along to close it: probe now.
            self.probe().await;
        }
        let (connected, detail) = match client {
            None => (
                false,
                "not connected yet (connecting in the background)".to_owned(),
            ),
            Some(c) => match self.breaker.state() {
                BreakerState::Open => (false, "circuit breaker open".to_owned()),
                BreakerState::HalfOpen => (false, "circuit breaker half-open (probing)".to_owned()),
                BreakerState::Closed if !c.is_connected() => (false, "no cluster node reachable".to_owned()),
                BreakerState::Closed => (
                    true,
                    format!(
                        "hosts {}, namespace {}",
                        self.settings.hosts, self.settings.namespace
                    ),
                ),
            },
        };
        CacheHealth {
            backend: "aerospike",
            connected,
            detail: Some(detail),
        }
    }

    fn detach_ops(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests;
