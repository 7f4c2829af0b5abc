//! The Aerospike backend (`AEROSPIKE_HOSTS`), with the `aerospike` 3.0 client.
//!
//! Stateless across replicas: everything lives in Aerospike records, and every read-modify-write
//! is a generation-checked write retried on conflict, so two sidecars can share one cluster. The
//! layout (sets, keys, bins) is documented in the sidecar's README.
//!
//! Failure handling: the client connects in the background (the sidecar starts cold); every
//! command carries the per-operation timeout; a transport failure opens a circuit breaker for
//! two seconds, during which calls fail in microseconds with `Unavailable`, then one probe is let
//! through. Stop-writes (`SERVER_FULL`, `FORBIDDEN`) is `Full` and does not open the breaker.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use aerospike::policy::{Expiration, GenerationPolicy, RecordExistsAction};
use aerospike::{
    operations, AdminPolicy, Bin, Bins, Client, ClientPolicy, Key, ReadPolicy, Value, WritePolicy,
};
use async_trait::async_trait;
use bytes::Bytes;
use serde_json::Value as Json;

use super::{
    Attributes, CacheError, CacheHealth, CacheResult, CachedDoc, ClaimArgs, DocId, DocumentCache,
    HeartbeatArgs, PipelineMeta, SetStageArgs, StageCounts, FAILED_REASON_SET_STAGE, RATE_WINDOW_SECONDS,
    STAGE_FAILED, STAGE_INDEXED, STAGE_PENDING,
};

/// Aerospike's longest set name.
const MAX_SET_NAME: usize = 63;
/// Attempts of one generation-checked read-modify-write before giving up.
const MAX_RMW_ATTEMPTS: usize = 64;
/// How long the breaker stays open after a transport failure.
const BREAKER_OPEN_FOR: Duration = Duration::from_secs(2);
/// Width of the indexed-rate buckets.
const RATE_BUCKET_SECONDS: u64 = 10;
/// Slot number meaning "queued, slot not yet recorded on the document".
const QN_ENQUEUEING: i64 = -2;
const QN_NONE: i64 = -1;

#[derive(Debug, Clone)]
pub struct AerospikeSettings {
    pub hosts: String,
    pub namespace: String,
    pub set_prefix: String,
    pub pipeline_set_prefix: String,
    pub op_timeout: Duration,
}

/// Outcome of a conditional write.
enum Written {
    Yes,
    /// Generation mismatch or the record already exists: re-read and retry.
    Conflict,
}

/// When a write may happen.
#[derive(Clone, Copy)]
enum Cond {
    Any,
    Create,
    Gen(u32),
}

struct Breaker {
    open_until: Mutex<Option<Instant>>,
    probing: AtomicBool,
}

impl Breaker {
    /// Whether a call may go out now (a closed breaker, or the single half-open probe).
    fn admit(&self) -> Result<bool, CacheError> {
        let open_until = *self.open_until.lock().unwrap_or_else(PoisonError::into_inner);
        match open_until {
            None => Ok(false),
            Some(until) if Instant::now() < until => Err(CacheError::Unavailable(
                "cache cold: Aerospike circuit breaker open".into(),
            )),
            Some(_) => {
                if self.probing.swap(true, Ordering::AcqRel) {
                    Err(CacheError::Unavailable(
                        "cache cold: Aerospike circuit breaker open".into(),
                    ))
                } else {
                    Ok(true)
                }
            }
        }
    }

    fn record(&self, probe: bool, transport_failure: bool) {
        let mut open_until = self.open_until.lock().unwrap_or_else(PoisonError::into_inner);
        if transport_failure {
            *open_until = Some(Instant::now() + BREAKER_OPEN_FOR);
        } else if probe || open_until.is_some() {
            *open_until = None;
        }
        if probe {
            self.probing.store(false, Ordering::Release);
        }
    }

    fn is_open(&self) -> bool {
        self.open_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|u| Instant::now() < u)
    }
}

pub struct AerospikeCache {
    settings: AerospikeSettings,
    client: RwLock<Option<Arc<Client>>>,
    breaker: Breaker,
}

/// A stable 64-bit FNV-1a hash, for set names too long for Aerospike.
fn fnv1a(data: &[u8]) -> u64 {
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

fn doc_key_value(id: &DocId) -> Value {
    match id {
        DocId::Num(n) => match i64::try_from(*n) {
            Ok(i) => Value::Int(i),
            Err(_) => Value::String(format!("#u64:{n}")),
        },
        DocId::Str(s) => Value::String(s.clone()),
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

fn ms_i64(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// A staged document as stored (bins of `d:<id>` in the pipeline's set).
#[derive(Clone, Debug)]
struct StagedRecord {
    generation: u32,
    chunks: String,
    stage: String,
    qn: i64,
    worker: String,
    lease_expires: i64,
    lease_ms: i64,
    from: String,
    reason: String,
}

impl StagedRecord {
    fn from_record(rec: &aerospike::Record) -> Self {
        Self {
            generation: rec.generation,
            chunks: bin_str(rec, "chunks").unwrap_or_else(|| "[]".into()),
            stage: bin_str(rec, "stage").unwrap_or_default(),
            qn: bin_int(rec, "qn").unwrap_or(QN_NONE),
            worker: bin_str(rec, "worker").unwrap_or_default(),
            lease_expires: bin_int(rec, "lexp").unwrap_or(0),
            lease_ms: bin_int(rec, "lms").unwrap_or(0),
            from: bin_str(rec, "from").unwrap_or_default(),
            reason: bin_str(rec, "reason").unwrap_or_default(),
        }
    }

    fn leased(&self) -> bool {
        self.lease_expires > 0
    }

    fn bins(&self) -> Vec<Bin> {
        vec![
            Bin::new("chunks", Value::String(self.chunks.clone())),
            Bin::new("stage", Value::String(self.stage.clone())),
            Bin::new("qn", Value::Int(self.qn)),
            Bin::new("worker", Value::String(self.worker.clone())),
            Bin::new("lexp", Value::Int(self.lease_expires)),
            Bin::new("lms", Value::Int(self.lease_ms)),
            Bin::new("from", Value::String(self.from.clone())),
            Bin::new("reason", Value::String(self.reason.clone())),
        ]
    }

    fn clear_lease(&mut self) {
        self.worker.clear();
        self.lease_expires = 0;
        self.lease_ms = 0;
        self.from.clear();
    }
}

fn doc_key(id: &str) -> String {
    format!("d:{id}")
}

fn stage_part(stage: &str) -> String {
    format!("{}:{stage}", stage.len())
}

impl AerospikeCache {
    /// Creates the backend and starts connecting in the background.
    pub fn start(settings: AerospikeSettings) -> Arc<Self> {
        let cache = Arc::new(Self {
            settings,
            client: RwLock::new(None),
            breaker: Breaker {
                open_until: Mutex::new(None),
                probing: AtomicBool::new(false),
            },
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

    fn write_policy(&self, cond: Cond) -> WritePolicy {
        let mut p = WritePolicy::default();
        p.base_policy.total_timeout = self.timeout_ms();
        p.base_policy.socket_timeout = self.timeout_ms();
        p.expiration = Expiration::Never;
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

    /// Runs one client call through the breaker and classifies its error: `Ok(Err(code))` for the
    /// logical result codes callers handle (2 not found, 3 generation, 5 exists).
    async fn call<T, F>(&self, f: impl FnOnce(Arc<Client>) -> F) -> CacheResult<Result<T, i32>>
    where
        F: std::future::Future<Output = aerospike::Result<T>>,
    {
        let client = self.client()?;
        let probe = self.breaker.admit()?;
        match f(client).await {
            Ok(v) => {
                self.breaker.record(probe, false);
                Ok(Ok(v))
            }
            Err(err) => {
                let code = err.result_code();
                // Transport trouble (client-side codes are negative) and an overloaded or
                // unavailable node open the breaker; answers about the data do not.
                let transport = code < 0 || matches!(code, 1 | 9 | 11 | 14 | 18);
                self.breaker.record(probe, transport);
                match code {
                    2 | 3 | 5 => Ok(Err(code)),
                    8 | 22 => Err(CacheError::Full(format!(
                        "Aerospike refuses writes (stop-writes): {err}"
                    ))),
                    13 => Err(CacheError::Full(format!(
                        "record larger than Aerospike's record size limit: {err}"
                    ))),
                    _ => Err(CacheError::Unavailable(format!("Aerospike: {err}"))),
                }
            }
        }
    }

    async fn get(&self, set: &str, key: Value) -> CacheResult<Option<aerospike::Record>> {
        let key = self.key(set, key)?;
        let policy = self.read_policy();
        match self
            .call(|c| async move { c.get(&policy, &key, Bins::All).await })
            .await?
        {
            Ok(rec) => Ok(Some(rec)),
            Err(_) => Ok(None),
        }
    }

    async fn put(&self, set: &str, key: Value, bins: &[Bin], cond: Cond) -> CacheResult<Written> {
        let key = self.key(set, key)?;
        let policy = self.write_policy(cond);
        match self
            .call(|c| async move { c.put(&policy, &key, bins).await })
            .await?
        {
            Ok(()) => Ok(Written::Yes),
            Err(2) => Ok(Written::Conflict),
            Err(_) => Ok(Written::Conflict),
        }
    }

    async fn delete(&self, set: &str, key: Value) -> CacheResult<bool> {
        let key = self.key(set, key)?;
        let policy = self.write_policy(Cond::Any);
        match self
            .call(|c| async move { c.delete(&policy, &key).await })
            .await?
        {
            Ok(existed) => Ok(existed),
            Err(_) => Ok(false),
        }
    }

    /// Atomically adds `delta` to the integer bin `n` of a record; returns the new value.
    async fn add(&self, set: &str, key: Value, delta: i64, ttl_seconds: Option<u32>) -> CacheResult<i64> {
        let key = self.key(set, key)?;
        let mut policy = self.write_policy(Cond::Any);
        if let Some(ttl) = ttl_seconds {
            policy.expiration = Expiration::Seconds(ttl);
        }
        let bin = Bin::new("n", Value::Int(delta));
        let rec = self
            .call(|c| async move {
                let ops = [operations::add(&bin), operations::get_bin("n")];
                c.operate(&policy, &key, &ops).await
            })
            .await?
            .map_err(|code| {
                CacheError::Unavailable(format!("Aerospike operate failed with result code {code}"))
            })?;
        let value = match rec.bins.get("n") {
            Some(Value::Int(i)) => Some(*i),
            Some(Value::MultiResult(list)) => list.iter().rev().find_map(|v| match v {
                Value::Int(i) => Some(*i),
                _ => None,
            }),
            _ => None,
        };
        value.ok_or_else(|| CacheError::Unavailable("Aerospike operate returned no counter value".into()))
    }

    async fn counter(&self, set: &str, key: &str) -> CacheResult<i64> {
        Ok(self
            .get(set, Value::String(key.to_owned()))
            .await?
            .and_then(|r| bin_int(&r, "n"))
            .unwrap_or(0))
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

    /// Generation-checked read-modify-write of a JSON-text bin `v` holding a list of strings.
    async fn update_list(&self, set: &str, key: &str, f: impl Fn(&mut Vec<Json>) -> bool) -> CacheResult<()> {
        for _ in 0..MAX_RMW_ATTEMPTS {
            let rec = self.get(set, Value::String(key.to_owned())).await?;
            let (mut list, cond) = match &rec {
                Some(r) => {
                    let list = bin_str(r, "v")
                        .and_then(|s| serde_json::from_str::<Vec<Json>>(&s).ok())
                        .unwrap_or_default();
                    (list, Cond::Gen(r.generation))
                }
                None => (Vec::new(), Cond::Create),
            };
            if !f(&mut list) {
                return Ok(());
            }
            let text = serde_json::to_string(&list).unwrap_or_else(|_| "[]".into());
            if let Written::Yes = self
                .put(
                    set,
                    Value::String(key.to_owned()),
                    &[Bin::new("v", Value::String(text))],
                    cond,
                )
                .await?
            {
                return Ok(());
            }
        }
        Err(CacheError::Unavailable(format!(
            "too much contention on {set}/{key}"
        )))
    }

    async fn read_list(&self, set: &str, key: &str) -> CacheResult<Vec<Json>> {
        Ok(self
            .get(set, Value::String(key.to_owned()))
            .await?
            .and_then(|r| bin_str(&r, "v"))
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default())
    }

    // ------------------------------------------------------------------ pipelines

    /// One record per pipeline (key = pipeline id). `#` never appears in a pipeline's own set name
    /// except before a 16-digit hash, so these cannot collide with one.
    fn pipelines_set(&self) -> String {
        format!("{}#meta", self.settings.pipeline_set_prefix)
    }

    /// The list of pipeline ids (key `all`).
    fn pipeline_index_set(&self) -> String {
        format!("{}#index", self.settings.pipeline_set_prefix)
    }

    fn pipeline_set(&self, pipeline: &str) -> String {
        set_name(&self.settings.pipeline_set_prefix, pipeline)
    }

    /// The pipeline's set, or `PipelineNotFound`.
    async fn require_pipeline(&self, pipeline: &str) -> CacheResult<String> {
        match self
            .get(&self.pipelines_set(), Value::String(pipeline.to_owned()))
            .await?
        {
            Some(rec) => Ok(bin_str(&rec, "set").unwrap_or_else(|| self.pipeline_set(pipeline))),
            None => Err(CacheError::PipelineNotFound(pipeline.to_owned())),
        }
    }

    async fn read_doc(&self, set: &str, id: &str) -> CacheResult<Option<StagedRecord>> {
        Ok(self
            .get(set, Value::String(doc_key(id)))
            .await?
            .map(|r| StagedRecord::from_record(&r)))
    }

    async fn write_doc(&self, set: &str, id: &str, doc: &StagedRecord, cond: Cond) -> CacheResult<Written> {
        self.put(set, Value::String(doc_key(id)), &doc.bins(), cond).await
    }

    /// Adds `stage` to the pipeline's stage registry (read, and written only when new).
    async fn register_stage(&self, set: &str, stage: &str) -> CacheResult<()> {
        self.update_list(set, "stages", |list| {
            if list.iter().any(|s| s.as_str() == Some(stage)) {
                false
            } else {
                list.push(Json::from(stage));
                true
            }
        })
        .await
    }

    async fn count(&self, set: &str, stage: &str, delta: i64) -> CacheResult<()> {
        if delta > 0 {
            self.register_stage(set, stage).await?;
        }
        self.add(
            set,
            Value::String(format!("c:{}", stage_part(stage))),
            delta,
            None,
        )
        .await
        .map(|_| ())
    }

    /// Bookkeeping for a document leaving `old` (if any) and entering `new`.
    async fn account(
        &self,
        set: &str,
        old: Option<&StagedRecord>,
        new: &StagedRecord,
        now_ms: u64,
    ) -> CacheResult<()> {
        if let Some(old) = old {
            self.count(set, &old.stage, -1).await?;
            if old.leased() {
                self.add(set, Value::String("leased".into()), -1, None).await?;
            }
            if !old.reason.is_empty() {
                self.add(set, Value::String(format!("fr:{}", old.reason)), -1, None)
                    .await?;
            }
        }
        self.count(set, &new.stage, 1).await?;
        if new.leased() {
            self.add(set, Value::String("leased".into()), 1, None).await?;
        }
        if !new.reason.is_empty() {
            self.add(set, Value::String(format!("fr:{}", new.reason)), 1, None)
                .await?;
        }
        if new.stage == STAGE_INDEXED && old.is_none_or(|o| o.stage != STAGE_INDEXED) {
            let bucket = now_ms / 1000 / RATE_BUCKET_SECONDS;
            let ttl = u32::try_from(RATE_WINDOW_SECONDS * 3).unwrap_or(u32::MAX);
            self.add(set, Value::String(format!("ix:{bucket}")), 1, Some(ttl))
                .await?;
        }
        Ok(())
    }

    /// Appends a slot for `id` to `stage`'s queue; returns its number.
    async fn enqueue(&self, set: &str, stage: &str, id: &str) -> CacheResult<i64> {
        let part = stage_part(stage);
        for _ in 0..MAX_RMW_ATTEMPTS {
            let n = self
                .add(set, Value::String(format!("q:t:{part}")), 1, None)
                .await?
                - 1;
            let slot = Value::String(format!("q:s:{part}:{n}"));
            let bins = [
                Bin::new("doc", Value::String(id.to_owned())),
                Bin::new("done", Value::Int(0)),
            ];
            // A claimer that found this slot missing may have tombstoned it: take the next one.
            if let Written::Yes = self.put(set, slot, &bins, Cond::Create).await? {
                return Ok(n);
            }
        }
        Err(CacheError::Unavailable("could not enqueue a document".into()))
    }

    /// Moves a document into `stage` (unleased, queued for claims), replacing `doc`'s state with
    /// `next`. Returns false when the document changed under us (the caller re-reads).
    async fn place(
        &self,
        set: &str,
        id: &str,
        old: Option<&StagedRecord>,
        mut next: StagedRecord,
        now_ms: u64,
    ) -> CacheResult<bool> {
        next.qn = QN_ENQUEUEING;
        let cond = old.map_or(Cond::Create, |o| Cond::Gen(o.generation));
        if let Written::Conflict = self.write_doc(set, id, &next, cond).await? {
            return Ok(false);
        }
        self.account(set, old, &next, now_ms).await?;
        let n = self.enqueue(set, &next.stage, id).await?;
        // Record the slot unless the document moved on meanwhile (then the slot goes stale).
        let written_generation = old.map_or(1, |o| o.generation.wrapping_add(1));
        next.qn = n;
        let _ = self
            .write_doc(set, id, &next, Cond::Gen(written_generation))
            .await?;
        Ok(true)
    }

    /// Returns documents whose lease expired to the stage they were claimed from.
    async fn expire_leases(&self, set: &str, now_ms: u64) -> CacheResult<()> {
        let now_min = now_ms / 60_000;
        let cursor = self.get(set, Value::String("lc".into())).await?;
        let (start, cursor_gen) = match &cursor {
            Some(r) => (
                u64::try_from(bin_int(r, "n").unwrap_or(0)).unwrap_or(0),
                Some(r.generation),
            ),
            None => (now_min, None),
        };
        let mut next_cursor = start;
        for minute in start..=now_min {
            let bucket = format!("lb:{minute}");
            let entries = self.read_list(set, &bucket).await?;
            let mut due = Vec::new();
            for e in &entries {
                let (Some(id), Some(exp)) =
                    (e.get(0).and_then(Json::as_str), e.get(1).and_then(Json::as_i64))
                else {
                    continue;
                };
                if exp <= ms_i64(now_ms) {
                    due.push((id.to_owned(), exp));
                }
            }
            for (id, exp) in &due {
                self.expire_one(set, id, *exp, now_ms).await?;
            }
            if minute < now_min {
                let _ = self.delete(set, Value::String(bucket)).await?;
                next_cursor = minute + 1;
            } else if !due.is_empty() {
                let due: HashSet<(&str, i64)> = due.iter().map(|(id, exp)| (id.as_str(), *exp)).collect();
                self.update_list(set, &bucket, |list| {
                    let before = list.len();
                    list.retain(|e| {
                        let id = e.get(0).and_then(Json::as_str).unwrap_or_default();
                        let exp = e.get(1).and_then(Json::as_i64).unwrap_or_default();
                        !due.contains(&(id, exp))
                    });
                    list.len() != before
                })
                .await?;
            }
        }
        if cursor_gen.is_none() || next_cursor != start {
            let cond = cursor_gen.map_or(Cond::Create, Cond::Gen);
            let bins = [Bin::new("n", Value::Int(ms_i64(next_cursor)))];
            let _ = self.put(set, Value::String("lc".into()), &bins, cond).await?;
        }
        Ok(())
    }

    async fn expire_one(&self, set: &str, id: &str, expires: i64, now_ms: u64) -> CacheResult<()> {
        for _ in 0..MAX_RMW_ATTEMPTS {
            let Some(doc) = self.read_doc(set, id).await? else {
                return Ok(());
            };
            if !doc.leased() || doc.lease_expires != expires || doc.lease_expires > ms_i64(now_ms) {
                return Ok(());
            }
            let mut next = doc.clone();
            next.stage = doc.from.clone();
            next.clear_lease();
            if self.place(set, id, Some(&doc), next, now_ms).await? {
                return Ok(());
            }
        }
        Ok(())
    }

    async fn add_lease_entries(&self, set: &str, entries: &[(String, i64)]) -> CacheResult<()> {
        let mut by_minute: std::collections::BTreeMap<i64, Vec<Json>> = std::collections::BTreeMap::new();
        for (id, exp) in entries {
            by_minute
                .entry(exp / 60_000)
                .or_default()
                .push(Json::from(vec![Json::from(id.as_str()), Json::from(*exp)]));
        }
        for (minute, new) in by_minute {
            self.update_list(set, &format!("lb:{minute}"), |list| {
                list.extend(new.iter().cloned());
                true
            })
            .await?;
        }
        Ok(())
    }
}

#[async_trait]
impl DocumentCache for AerospikeCache {
    async fn health(&self) -> CacheHealth {
        let client = self.client.read().unwrap_or_else(PoisonError::into_inner).clone();
        let (connected, detail) = match client {
            None => (
                false,
                "not connected yet (connecting in the background)".to_owned(),
            ),
            Some(_) if self.breaker.is_open() => (false, "circuit breaker open".to_owned()),
            Some(c) if !c.is_connected() => (false, "no cluster node reachable".to_owned()),
            Some(_) => (
                true,
                format!(
                    "hosts {}, namespace {}",
                    self.settings.hosts, self.settings.namespace
                ),
            ),
        };
        CacheHealth {
            backend: "aerospike",
            connected,
            detail: Some(detail),
        }
    }

    async fn get_document(&self, namespace: &str, id: &DocId) -> CacheResult<Option<CachedDoc>> {
        let set = set_name(&self.settings.set_prefix, namespace);
        let Some(rec) = self.get(&set, doc_key_value(id)).await? else {
            return Ok(None);
        };
        let attributes = bin_str(&rec, "attrs")
            .and_then(|s| serde_json::from_str::<Attributes>(&s).ok())
            .unwrap_or_default();
        let upserted_at = u64::try_from(bin_int(&rec, "ts").unwrap_or(0)).unwrap_or(0);
        Ok(Some(CachedDoc {
            attributes,
            upserted_at,
        }))
    }

    async fn upsert_document(
        &self,
        namespace: &str,
        id: &DocId,
        attributes: Attributes,
        upserted_at: u64,
    ) -> CacheResult<bool> {
        let set = set_name(&self.settings.set_prefix, namespace);
        let text = serde_json::to_string(&attributes).unwrap_or_else(|_| "{}".into());
        let bins = [
            Bin::new("attrs", Value::String(text)),
            Bin::new("ts", Value::Int(ms_i64(upserted_at))),
        ];
        for _ in 0..MAX_RMW_ATTEMPTS {
            let cond = match self.get(&set, doc_key_value(id)).await? {
                Some(rec) if bin_int(&rec, "ts").unwrap_or(0) > ms_i64(upserted_at) => return Ok(false),
                Some(rec) => Cond::Gen(rec.generation),
                None => Cond::Create,
            };
            if let Written::Yes = self.put(&set, doc_key_value(id), &bins, cond).await? {
                return Ok(true);
            }
        }
        Err(CacheError::Unavailable(
            "too much contention on a cached document".into(),
        ))
    }

    async fn patch_document(
        &self,
        namespace: &str,
        id: &DocId,
        patch: Attributes,
        upserted_at: u64,
    ) -> CacheResult<bool> {
        let set = set_name(&self.settings.set_prefix, namespace);
        for _ in 0..MAX_RMW_ATTEMPTS {
            let Some(rec) = self.get(&set, doc_key_value(id)).await? else {
                return Ok(false);
            };
            if bin_int(&rec, "ts").unwrap_or(0) > ms_i64(upserted_at) {
                return Ok(false);
            }
            let mut merged = bin_str(&rec, "attrs")
                .and_then(|s| serde_json::from_str::<Attributes>(&s).ok())
                .unwrap_or_default();
            for (k, v) in &patch {
                merged.insert(k.clone(), v.clone());
            }
            let text = serde_json::to_string(&merged).unwrap_or_else(|_| "{}".into());
            let bins = [
                Bin::new("attrs", Value::String(text)),
                Bin::new("ts", Value::Int(ms_i64(upserted_at))),
            ];
            if let Written::Yes = self
                .put(&set, doc_key_value(id), &bins, Cond::Gen(rec.generation))
                .await?
            {
                return Ok(true);
            }
        }
        Err(CacheError::Unavailable(
            "too much contention on a cached document".into(),
        ))
    }

    async fn evict_document(&self, namespace: &str, id: &DocId) -> CacheResult<bool> {
        self.delete(&set_name(&self.settings.set_prefix, namespace), doc_key_value(id))
            .await
    }

    /// Truncates the namespace's set. Aerospike does not say how many records that removed: 0.
    async fn purge_namespace(&self, namespace: &str) -> CacheResult<u64> {
        self.truncate(&set_name(&self.settings.set_prefix, namespace))
            .await?;
        Ok(0)
    }

    async fn create_pipeline(&self, meta: PipelineMeta) -> CacheResult<()> {
        let set = self.pipeline_set(&meta.id);
        let bins = [
            Bin::new("target", Value::String(meta.target_namespace.clone())),
            Bin::new("metric", Value::String(meta.distance_metric.clone())),
            Bin::new("created", Value::String(meta.created_at.clone())),
            Bin::new("set", Value::String(set.clone())),
        ];
        if let Written::Conflict = self
            .put(
                &self.pipelines_set(),
                Value::String(meta.id.clone()),
                &bins,
                Cond::Create,
            )
            .await?
        {
            return Err(CacheError::PipelineExists(meta.id));
        }
        // Drop anything a request still in flight wrote for an earlier pipeline of the same id.
        self.truncate(&set).await?;
        let id = meta.id.clone();
        self.update_list(&self.pipeline_index_set(), "all", |list| {
            if list.iter().any(|v| v.as_str() == Some(id.as_str())) {
                false
            } else {
                list.push(Json::from(id.as_str()));
                true
            }
        })
        .await
    }

    async fn get_pipeline(&self, id: &str) -> CacheResult<Option<PipelineMeta>> {
        Ok(self
            .get(&self.pipelines_set(), Value::String(id.to_owned()))
            .await?
            .map(|rec| PipelineMeta {
                id: id.to_owned(),
                target_namespace: bin_str(&rec, "target").unwrap_or_default(),
                distance_metric: bin_str(&rec, "metric").unwrap_or_default(),
                created_at: bin_str(&rec, "created").unwrap_or_default(),
            }))
    }

    async fn list_pipelines(&self) -> CacheResult<Vec<PipelineMeta>> {
        let ids = self.read_list(&self.pipeline_index_set(), "all").await?;
        let mut metas = Vec::new();
        for id in ids.iter().filter_map(Json::as_str) {
            if let Some(meta) = self.get_pipeline(id).await? {
                metas.push(meta);
            }
        }
        metas.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
        Ok(metas)
    }

    async fn delete_pipeline(&self, id: &str) -> CacheResult<bool> {
        let Some(rec) = self
            .get(&self.pipelines_set(), Value::String(id.to_owned()))
            .await?
        else {
            return Ok(false);
        };
        let set = bin_str(&rec, "set").unwrap_or_else(|| self.pipeline_set(id));
        if !self
            .delete(&self.pipelines_set(), Value::String(id.to_owned()))
            .await?
        {
            return Ok(false);
        }
        self.update_list(&self.pipeline_index_set(), "all", |list| {
            let before = list.len();
            list.retain(|v| v.as_str() != Some(id));
            list.len() != before
        })
        .await?;
        self.truncate(&set).await?;
        Ok(true)
    }

    async fn stage_document(
        &self,
        pipeline: &str,
        document_id: &str,
        chunks_json: Bytes,
        now_ms: u64,
    ) -> CacheResult<()> {
        let set = self.require_pipeline(pipeline).await?;
        let chunks = String::from_utf8_lossy(&chunks_json).into_owned();
        for _ in 0..MAX_RMW_ATTEMPTS {
            let old = self.read_doc(&set, document_id).await?;
            let next = StagedRecord {
                generation: 0,
                chunks: chunks.clone(),
                stage: STAGE_PENDING.to_owned(),
                qn: QN_NONE,
                worker: String::new(),
                lease_expires: 0,
                lease_ms: 0,
                from: String::new(),
                reason: String::new(),
            };
            if self.place(&set, document_id, old.as_ref(), next, now_ms).await? {
                return Ok(());
            }
        }
        Err(CacheError::Unavailable(
            "too much contention on a staged document".into(),
        ))
    }

    async fn get_chunks(&self, pipeline: &str, document_id: &str) -> CacheResult<Option<Bytes>> {
        let set = self.require_pipeline(pipeline).await?;
        Ok(self
            .read_doc(&set, document_id)
            .await?
            .map(|d| Bytes::from(d.chunks.into_bytes())))
    }

    async fn document_stage(
        &self,
        pipeline: &str,
        document_id: &str,
        now_ms: u64,
    ) -> CacheResult<Option<String>> {
        let set = self.require_pipeline(pipeline).await?;
        self.expire_leases(&set, now_ms).await?;
        Ok(self.read_doc(&set, document_id).await?.map(|d| d.stage))
    }

    async fn claim(&self, pipeline: &str, args: &ClaimArgs) -> CacheResult<Vec<String>> {
        let set = self.require_pipeline(pipeline).await?;
        self.expire_leases(&set, args.now_ms).await?;
        let part = stage_part(&args.stage);
        let head_rec = self.get(&set, Value::String(format!("q:h:{part}"))).await?;
        let head = head_rec.as_ref().and_then(|r| bin_int(r, "n")).unwrap_or(0);
        let tail = self.counter(&set, &format!("q:t:{part}")).await?;
        let prefix = args.document_id_prefix.as_deref().unwrap_or("");
        let lease_expires = ms_i64(args.now_ms.saturating_add(args.lease_ms));
        let mut claimed = Vec::new();
        let mut new_head = head;
        let mut contiguous = true;
        let mut i = head;
        let mut attempts = 0;
        while claimed.len() < args.limit && i < tail {
            let slot_key = Value::String(format!("q:s:{part}:{i}"));
            let slot = match self.get(&set, slot_key.clone()).await? {
                Some(s) => s,
                None => {
                    // Not written yet or never will be: tombstone it so its writer takes another.
                    let bins = [
                        Bin::new("doc", Value::String(String::new())),
                        Bin::new("done", Value::Int(1)),
                    ];
                    let _ = self.put(&set, slot_key.clone(), &bins, Cond::Create).await?;
                    continue;
                }
            };
            let mut consumed = bin_int(&slot, "done").unwrap_or(0) == 1;
            if !consumed {
                let id = bin_str(&slot, "doc").unwrap_or_default();
                let doc = self.read_doc(&set, &id).await?;
                let live = doc
                    .as_ref()
                    .filter(|d| d.stage == args.stage && !d.leased() && (d.qn == i || d.qn == QN_ENQUEUEING));
                match live {
                    None => consumed = true,
                    Some(_) if !id.starts_with(prefix) => {}
                    Some(doc) => {
                        let mut next = doc.clone();
                        next.stage = args.claim_stage.clone();
                        next.qn = QN_NONE;
                        next.worker = args.worker_id.clone();
                        next.lease_expires = lease_expires;
                        next.lease_ms = ms_i64(args.lease_ms);
                        next.from = args.stage.clone();
                        match self
                            .write_doc(&set, &id, &next, Cond::Gen(doc.generation))
                            .await?
                        {
                            Written::Yes => {
                                self.account(&set, Some(doc), &next, args.now_ms).await?;
                                claimed.push(id);
                                consumed = true;
                            }
                            Written::Conflict => {
                                attempts += 1;
                                if attempts < 8 {
                                    continue; // re-read this slot's document
                                }
                            }
                        }
                    }
                }
                if consumed {
                    let bins = [Bin::new("done", Value::Int(1))];
                    let _ = self
                        .put(&set, slot_key, &bins, Cond::Gen(slot.generation))
                        .await?;
                }
            }
            attempts = 0;
            if consumed && contiguous {
                new_head = i + 1;
            } else {
                contiguous = false;
            }
            i += 1;
        }
        if new_head > head {
            let cond = head_rec
                .as_ref()
                .map_or(Cond::Create, |r| Cond::Gen(r.generation));
            let bins = [Bin::new("n", Value::Int(new_head))];
            if let Written::Yes = self
                .put(&set, Value::String(format!("q:h:{part}")), &bins, cond)
                .await?
            {
                for n in head..new_head {
                    let _ = self
                        .delete(&set, Value::String(format!("q:s:{part}:{n}")))
                        .await?;
                }
            }
        }
        let entries: Vec<(String, i64)> = claimed.iter().map(|id| (id.clone(), lease_expires)).collect();
        self.add_lease_entries(&set, &entries).await?;
        Ok(claimed)
    }

    async fn heartbeat(&self, pipeline: &str, args: &HeartbeatArgs) -> CacheResult<u64> {
        let set = self.require_pipeline(pipeline).await?;
        self.expire_leases(&set, args.now_ms).await?;
        let mut seen = HashSet::new();
        let mut entries = Vec::new();
        for id in &args.document_ids {
            if !seen.insert(id.as_str()) {
                continue;
            }
            for _ in 0..MAX_RMW_ATTEMPTS {
                let Some(doc) = self.read_doc(&set, id).await? else {
                    break;
                };
                if doc.stage != args.stage || !doc.leased() || doc.worker != args.worker_id {
                    break;
                }
                let mut next = doc.clone();
                next.lease_expires = ms_i64(args.now_ms).saturating_add(doc.lease_ms);
                if let Written::Yes = self.write_doc(&set, id, &next, Cond::Gen(doc.generation)).await? {
                    entries.push((id.clone(), next.lease_expires));
                    break;
                }
            }
        }
        self.add_lease_entries(&set, &entries).await?;
        Ok(entries.len() as u64)
    }

    async fn set_stage(&self, pipeline: &str, args: &SetStageArgs) -> CacheResult<u64> {
        let set = self.require_pipeline(pipeline).await?;
        self.expire_leases(&set, args.now_ms).await?;
        let creating = args.create_missing && args.from_stage.is_none() && args.worker_id.is_none();
        let mut seen = HashSet::new();
        let mut updated = 0;
        for id in &args.document_ids {
            if !seen.insert(id.as_str()) {
                continue;
            }
            for _ in 0..MAX_RMW_ATTEMPTS {
                let old = self.read_doc(&set, id).await?;
                match &old {
                    None if !creating => break,
                    None => {}
                    Some(doc) => {
                        if args.from_stage.as_deref().is_some_and(|f| f != doc.stage) {
                            break;
                        }
                        if args
                            .worker_id
                            .as_deref()
                            .is_some_and(|w| !doc.leased() || doc.worker != w)
                        {
                            break;
                        }
                    }
                }
                let mut next = old.clone().unwrap_or(StagedRecord {
                    generation: 0,
                    chunks: "[]".into(),
                    stage: String::new(),
                    qn: QN_NONE,
                    worker: String::new(),
                    lease_expires: 0,
                    lease_ms: 0,
                    from: String::new(),
                    reason: String::new(),
                });
                next.stage = args.stage.clone();
                next.clear_lease();
                next.reason = if args.stage == STAGE_FAILED {
                    FAILED_REASON_SET_STAGE.to_owned()
                } else {
                    String::new()
                };
                if self.place(&set, id, old.as_ref(), next, args.now_ms).await? {
                    updated += 1;
                    break;
                }
            }
        }
        Ok(updated)
    }

    async fn stage_counts(&self, pipeline: &str, now_ms: u64) -> CacheResult<StageCounts> {
        let set = self.require_pipeline(pipeline).await?;
        self.expire_leases(&set, now_ms).await?;
        let mut counts = StageCounts::default();
        for stage in self
            .read_list(&set, "stages")
            .await?
            .iter()
            .filter_map(Json::as_str)
        {
            let n = self.counter(&set, &format!("c:{}", stage_part(stage))).await?;
            if n > 0 {
                counts
                    .counts
                    .insert(stage.to_owned(), u64::try_from(n).unwrap_or(0));
            }
        }
        let failed = self
            .counter(&set, &format!("fr:{FAILED_REASON_SET_STAGE}"))
            .await?;
        if failed > 0 {
            counts.failed_reasons.insert(
                FAILED_REASON_SET_STAGE.to_owned(),
                u64::try_from(failed).unwrap_or(0),
            );
        }
        counts.leased = u64::try_from(self.counter(&set, "leased").await?).unwrap_or(0);
        let newest = now_ms / 1000 / RATE_BUCKET_SECONDS;
        let oldest_second = (now_ms / 1000).saturating_sub(RATE_WINDOW_SECONDS - 1);
        let mut bucket = newest;
        loop {
            if bucket * RATE_BUCKET_SECONDS + RATE_BUCKET_SECONDS - 1 < oldest_second {
                break;
            }
            let n = self.counter(&set, &format!("ix:{bucket}")).await?;
            counts.indexed_in_window += u64::try_from(n).unwrap_or(0);
            if bucket == 0 {
                break;
            }
            bucket -= 1;
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(hosts: String, namespace: &str, run: &str) -> AerospikeSettings {
        AerospikeSettings {
            hosts,
            namespace: namespace.to_owned(),
            set_prefix: format!("t{run}_tpuf_"),
            pipeline_set_prefix: format!("t{run}_pl_"),
            op_timeout: Duration::from_millis(2000),
        }
    }

    async fn connected(settings: AerospikeSettings) -> Arc<AerospikeCache> {
        let cache = AerospikeCache::start(settings);
        assert!(
            cache.wait_connected(Duration::from_secs(10)).await,
            "could not connect to Aerospike"
        );
        cache
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn aerospike_meets_the_contract_on_the_wire_double() {
        let double = aerospike_double::Double::start("127.0.0.1:0", &["hevlayer"])
            .await
            .unwrap();
        let cache = connected(settings(double.hosts(), "hevlayer", "0")).await;
        assert!(cache.health().await.connected);
        crate::cache::contract::run_all(&|| cache.clone() as Arc<dyn DocumentCache>).await;
        assert!(double.commands_served() > 10_000);
    }

    /// With `AEROSPIKE_HOSTS` set, the same contract runs against that cluster (in fresh sets).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn aerospike_meets_the_contract_on_a_real_cluster_when_configured() {
        let Ok(hosts) = std::env::var("AEROSPIKE_HOSTS") else {
            return;
        };
        let namespace = std::env::var("AEROSPIKE_NAMESPACE").unwrap_or_else(|_| "hevlayer".into());
        let run = format!("{:x}", crate::cache::now_ms());
        let cache = connected(settings(hosts, &namespace, &run)).await;
        crate::cache::contract::run_all(&|| cache.clone() as Arc<dyn DocumentCache>).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_backend_recovers_when_the_cluster_comes_back() {
        let double = aerospike_double::Double::start("127.0.0.1:0", &["hevlayer"])
            .await
            .unwrap();
        let addr = double.hosts();
        let mut s = settings(addr.clone(), "hevlayer", "3");
        s.op_timeout = Duration::from_millis(200);
        let cache = connected(s).await;
        assert!(cache
            .upsert_document("ns", &DocId::Num(1), Attributes::new(), 1)
            .await
            .unwrap());
        drop(double);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(cache.get_document("ns", &DocId::Num(1)).await.is_err());
        // The node is back (empty, as after a restart without persistence) on the same address.
        let _back = aerospike_double::Double::start(&addr, &["hevlayer"])
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if cache.get_document("ns", &DocId::Num(1)).await == Ok(None) {
                break;
            }
            assert!(Instant::now() < deadline, "the backend did not recover");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(cache.health().await.connected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_cluster_fails_fast_and_a_stop_writes_node_is_full() {
        // Nothing listens: the sidecar starts cold and answers Unavailable at once.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = listener.local_addr().unwrap().to_string();
        drop(listener);
        let cold = AerospikeCache::start(settings(dead, "hevlayer", "1"));
        let started = Instant::now();
        let err = cold.get_document("ns", &DocId::Num(1)).await.unwrap_err();
        assert!(
            matches!(&err, CacheError::Unavailable(m) if m.contains("cache cold")),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_millis(50));
        assert!(!cold.health().await.connected);

        let double = aerospike_double::Double::start("127.0.0.1:0", &["hevlayer"])
            .await
            .unwrap();
        let cache = connected(settings(double.hosts(), "hevlayer", "2")).await;
        double.set_stop_writes(true);
        let err = cache
            .upsert_document("ns", &DocId::Num(1), Attributes::new(), 1)
            .await
            .unwrap_err();
        assert!(matches!(err, CacheError::Full(_)), "{err:?}");
        assert!(
            cache.health().await.connected,
            "stop-writes does not open the breaker"
        );
        double.set_stop_writes(false);
        assert!(cache
            .upsert_document("ns", &DocId::Num(1), Attributes::new(), 1)
            .await
            .unwrap());

        // The node goes away: the first failure opens the breaker, the next calls fail fast.
        drop(double);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let first = cache.get_document("ns", &DocId::Num(1)).await;
        assert!(first.is_err());
        let started = Instant::now();
        let err = cache.get_document("ns", &DocId::Num(1)).await.unwrap_err();
        assert!(matches!(&err, CacheError::Unavailable(_)), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "{:?}",
            started.elapsed()
        );
        assert!(!cache.health().await.connected);
    }

    #[test]
    fn set_names_fit_aerospike() {
        assert_eq!(set_name("tpuf_", "my-ns.1"), "tpuf_my-ns.1");
        let long = set_name("pl_", &"x".repeat(100));
        assert!(long.len() <= MAX_SET_NAME && long.starts_with("pl_#"));
        assert_ne!(set_name("pl_", "a b"), set_name("pl_", "a c"));
        assert_eq!(set_name("pl_", "a b"), set_name("pl_", "a b"));
    }

    #[test]
    fn breaker_opens_then_lets_one_probe_through() {
        let b = Breaker {
            open_until: Mutex::new(None),
            probing: AtomicBool::new(false),
        };
        assert_eq!(b.admit(), Ok(false));
        b.record(false, true);
        assert!(b.is_open());
        assert!(b.admit().is_err());
        *b.open_until.lock().unwrap() = Some(Instant::now() - Duration::from_millis(1));
        assert_eq!(b.admit(), Ok(true));
        assert!(b.admit().is_err(), "only one probe at a time");
        b.record(true, false);
        assert_eq!(b.admit(), Ok(false));
    }
}
