//! The document cache: two stores, each a trait implemented by the embedded in-process store
//! (`embedded`, the default) and by the Aerospike backend (`aerospike`, with `AEROSPIKE_HOSTS`)
//! with the same semantics; `contract` is the test suites both pass. The README documents the
//! Aerospike layout.
//!
//! - `DocumentStore`: mirrored Turbopuffer documents, per namespace, keyed by document id
//!   (written one at a time or as a mirror batch, `mirror`);
//! - `PipelineStore`: pipelines and their staged documents (chunks, stage, lease).
//!
//! Both extend `StoreBackend` (health, whether operations must run detached); `Stores` holds one
//! handle to each.

pub mod aerospike;
pub mod embedded;
pub mod mirror;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use self::mirror::{MirrorOp, MirrorReport};

/// Attribute map of a cached document (everything but `id`).
pub type Attributes = serde_json::Map<String, Value>;

/// A document's attributes as the JSON object text they came as in a write (row-form upserts:
/// every member but `id`), kept as text so a store can hold them as they are instead of building
/// and weighing a map. It holds a JSON object without a repeated key: only the mirror parser makes
/// one (`from_object_text`), from text serde_json validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AttributesJson(Box<str>);

impl AttributesJson {
    /// `text` must be a JSON object without a repeated key.
    pub fn from_object_text(text: String) -> Self {
        Self(text.into_boxed_str())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The attributes as a map (for a merge, a backend that stores maps, a fetch).
    pub fn to_map(&self) -> Attributes {
        serde_json::from_str(&self.0).unwrap_or_default()
    }

    /// The text, to be freed later (see the embedded store's garbage).
    pub fn into_string(self) -> String {
        self.0.into_string()
    }
}

/// A Turbopuffer document id: unsigned integer or string (UUIDs are strings).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DocId {
    Num(u64),
    Str(String),
}

impl DocId {
    /// The id of a JSON value, when it is a valid Turbopuffer id.
    pub fn from_json(value: &Value) -> Option<Self> {
        match value {
            Value::String(s) => Some(Self::Str(s.clone())),
            Value::Number(n) => n.as_u64().map(Self::Num),
            _ => None,
        }
    }

    /// Like `from_json`, moving a string id out of the value instead of copying it.
    pub fn from_json_owned(value: Value) -> Option<Self> {
        match value {
            Value::String(s) => Some(Self::Str(s)),
            Value::Number(n) => n.as_u64().map(Self::Num),
            _ => None,
        }
    }

    pub fn to_json(&self) -> Value {
        match self {
            Self::Num(n) => Value::from(*n),
            Self::Str(s) => Value::from(s.as_str()),
        }
    }

    /// Bytes this id costs in memory accounting.
    pub fn weight(&self) -> usize {
        match self {
            Self::Num(_) => 8,
            Self::Str(s) => s.len(),
        }
    }
}

/// A JSON id read straight into a `DocId` (no `Value` in between): a string, or an integer that
/// fits a `u64`; anything else is an error naming what ids may be.
impl<'de> Deserialize<'de> for DocId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IdVisitor;
        impl serde::de::Visitor<'_> for IdVisitor {
            type Value = DocId;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a document id (a string or an unsigned integer)")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<DocId, E> {
                Ok(DocId::Num(n))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<DocId, E> {
                Ok(DocId::Str(s.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, s: String) -> Result<DocId, E> {
                Ok(DocId::Str(s))
            }
        }
        deserializer.deserialize_any(IdVisitor)
    }
}

/// A cached document and the stamp of the write that produced its current state.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedDoc {
    pub attributes: Attributes,
    pub upserted_at: u64,
    /// When the document's current copy entered the cache (epoch ms): set by upserts and
    /// backfills, kept by patches (which merge into a copy that was already there). Fetches serve
    /// no copy older than the configured max age. 0 when unknown (then it is too old).
    pub cached_ms: u64,
}

/// A staged chunk, as sent by the client and returned by get-chunks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Map<String, Value>>,
}

/// A pipeline's definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineMeta {
    pub id: String,
    pub target_namespace: String,
    pub distance_metric: String,
    pub created_at: String,
}

/// Arguments of a claim: move up to `limit` unleased documents from `stage` to `claim_stage`.
#[derive(Debug, Clone)]
pub struct ClaimArgs {
    pub stage: String,
    pub claim_stage: String,
    pub worker_id: String,
    pub limit: usize,
    pub lease_ms: u64,
    pub document_id_prefix: Option<String>,
    pub now_ms: u64,
}

/// Arguments of a heartbeat: extend the leases `worker_id` holds on `document_ids` in `stage`.
#[derive(Debug, Clone)]
pub struct HeartbeatArgs {
    pub document_ids: Vec<String>,
    pub worker_id: String,
    pub stage: String,
    pub now_ms: u64,
}

/// Arguments of a set-stage.
#[derive(Debug, Clone)]
pub struct SetStageArgs {
    pub document_ids: Vec<String>,
    pub stage: String,
    pub from_stage: Option<String>,
    pub worker_id: Option<String>,
    pub create_missing: bool,
    /// Only documents whose content version (`DocState::version`) is this one: a document
    /// re-staged since it was read is left alone.
    pub only_version: Option<u64>,
    pub now_ms: u64,
}

/// A staged document's stage and content version. The version changes with every
/// `stage_document` (new chunks) and with nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocState {
    pub stage: String,
    pub version: u64,
}

/// Exact counts for a pipeline's status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageCounts {
    /// Documents per stage (stages with no documents are absent).
    pub counts: BTreeMap<String, u64>,
    /// Documents currently in `failed`, per reason.
    pub failed_reasons: BTreeMap<String, u64>,
    /// Documents holding an unexpired lease.
    pub leased: u64,
    /// Documents that became `indexed` within the rate window.
    pub indexed_in_window: u64,
}

/// Seconds over which `indexed_rate_per_min` is measured.
pub const RATE_WINDOW_SECONDS: u64 = 60;
/// The failure reason recorded when a document is moved to `failed` by set-stage.
pub const FAILED_REASON_SET_STAGE: &str = "worker_reported";
pub const STAGE_PENDING: &str = "pending";
pub const STAGE_INDEXED: &str = "indexed";
pub const STAGE_FAILED: &str = "failed";

/// Whether the cache backend is usable, for `/healthz`.
#[derive(Debug, Clone, Serialize)]
pub struct CacheHealth {
    pub backend: &'static str,
    pub connected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheError {
    /// The backend cannot be reached or timed out; nothing was written.
    Unavailable(String),
    /// The backend refuses writes because it is full (embedded budget, Aerospike stop-writes).
    Full(String),
    PipelineNotFound(String),
    PipelineExists(String),
}

impl std::fmt::Display for CacheError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unavailable(m) => write!(f, "unavailable: {m}"),
            Self::Full(m) => write!(f, "full: {m}"),
            Self::PipelineNotFound(id) => write!(f, "pipeline '{id}' not found"),
            Self::PipelineExists(id) => write!(f, "pipeline '{id}' already exists"),
        }
    }
}

impl std::error::Error for CacheError {}

pub type CacheResult<T> = Result<T, CacheError>;

/// What each store says about the backend behind it. Every backend implements both stores with
/// the same semantics; each method is atomic with respect to the others on the same record.
#[async_trait]
pub trait StoreBackend: Send + Sync {
    async fn health(&self) -> CacheHealth;

    /// Whether an operation is several commands that a dropped future would cut short (Aerospike):
    /// the API then runs each operation to completion in its own task, whatever the caller does.
    /// The embedded store's operations finish within one poll and cannot be cut. (A mirror batch,
    /// `apply_mirror`, always runs in a task of its own, whatever this says.)
    fn detach_ops(&self) -> bool {
        false
    }
}

/// Mirrored Turbopuffer documents, per namespace, keyed by document id.
#[async_trait]
pub trait DocumentStore: StoreBackend {
    async fn get_document(&self, namespace: &str, id: &DocId) -> CacheResult<Option<CachedDoc>>;
    /// Replaces the document unless the cached one carries a newer stamp. True when written.
    async fn upsert_document(
        &self,
        namespace: &str,
        id: &DocId,
        attributes: Attributes,
        upserted_at: u64,
    ) -> CacheResult<bool>;
    /// `upsert_document` with the attributes as JSON text (row-form upserts). Default: as a map.
    async fn upsert_document_json(
        &self,
        namespace: &str,
        id: &DocId,
        attributes: AttributesJson,
        upserted_at: u64,
    ) -> CacheResult<bool> {
        self.upsert_document(namespace, id, attributes.to_map(), upserted_at)
            .await
    }
    /// Merges into the document only when it is cached and not newer. True when merged. When
    /// nothing is cached (or only a tombstone), leaves a tombstone refusing copies up to the
    /// patch's own stamp ([`patch_tombstone`]): an earlier write's mirror that arrives after the
    /// patch must not cache a version without it.
    async fn patch_document(
        &self,
        namespace: &str,
        id: &DocId,
        patch: Attributes,
        upserted_at: u64,
    ) -> CacheResult<bool>;
    /// Removes the cached document (true when one was cached) and leaves a short-lived tombstone
    /// carrying `refuse_up_to`: until it lapses, a backfill with a stamp at or below it and an
    /// upsert with a stamp below it are refused, so a write older than the eviction cannot bring
    /// the document back.
    async fn evict_document(&self, namespace: &str, id: &DocId, refuse_up_to: u64) -> CacheResult<bool>;
    /// Caches a document fetched from Turbopuffer, only when nothing is cached for it and no
    /// tombstone refuses `upserted_at` (see `evict_document`). True when written.
    async fn backfill_document(
        &self,
        namespace: &str,
        id: &DocId,
        attributes: Attributes,
        upserted_at: u64,
    ) -> CacheResult<bool>;
    /// Applies the planned mirror of one write stamped `upserted_at` to `namespace`'s documents:
    /// each document's ops in order, under the single-document rules above, a failed op evicting
    /// its document (the contract is in `mirror`'s module docs). Default: op by op through the
    /// methods above (`mirror::apply_op_by_op`).
    async fn apply_mirror(&self, namespace: &str, ops: Vec<MirrorOp>, upserted_at: u64) -> MirrorReport {
        mirror::apply_op_by_op(self, namespace, ops, upserted_at).await
    }
    /// Removes every cached document of a namespace; returns how many when the backend can tell
    /// (Aerospike's truncate cannot: 0).
    async fn purge_namespace(&self, namespace: &str) -> CacheResult<u64>;
}

/// Pipelines and their staged documents (chunks, stage, lease). Claims are atomic per document
/// (two claimers never receive the same document while its lease holds). Expired leases are
/// returned to the stage they were claimed from before any pipeline operation observes them.
#[async_trait]
pub trait PipelineStore: StoreBackend {
    async fn create_pipeline(&self, meta: PipelineMeta) -> CacheResult<()>;
    async fn get_pipeline(&self, id: &str) -> CacheResult<Option<PipelineMeta>>;
    async fn list_pipelines(&self) -> CacheResult<Vec<PipelineMeta>>;
    /// Deletes the pipeline and its staged documents. False when it did not exist.
    async fn delete_pipeline(&self, id: &str) -> CacheResult<bool>;
    /// Stores the chunks (a serialised JSON array) and sets the document to `pending`, replacing
    /// any earlier chunks, stage and lease.
    async fn stage_document(
        &self,
        pipeline: &str,
        document_id: &str,
        chunks_json: Bytes,
        now_ms: u64,
    ) -> CacheResult<()>;
    /// The serialised JSON array of the document's chunks.
    async fn get_chunks(&self, pipeline: &str, document_id: &str) -> CacheResult<Option<Bytes>>;
    /// The document's current stage and content version.
    async fn document_stage(
        &self,
        pipeline: &str,
        document_id: &str,
        now_ms: u64,
    ) -> CacheResult<Option<DocState>>;
    async fn claim(&self, pipeline: &str, args: &ClaimArgs) -> CacheResult<Vec<String>>;
    async fn heartbeat(&self, pipeline: &str, args: &HeartbeatArgs) -> CacheResult<u64>;
    async fn set_stage(&self, pipeline: &str, args: &SetStageArgs) -> CacheResult<u64>;
    async fn stage_counts(&self, pipeline: &str, now_ms: u64) -> CacheResult<StageCounts>;
}

/// The two stores the sidecar serves from. Built from one backend (`Stores::on`) they are the
/// same object behind two handles.
#[derive(Clone)]
pub struct Stores {
    pub documents: Arc<dyn DocumentStore>,
    pub pipelines: Arc<dyn PipelineStore>,
}

impl Stores {
    /// Both stores on one backend.
    pub fn on<B: DocumentStore + PipelineStore + 'static>(backend: Arc<B>) -> Self {
        Self {
            documents: backend.clone(),
            pipelines: backend,
        }
    }

    /// The backends' health, for `/healthz` and `/metrics`: asked once when both stores are one
    /// backend; otherwise the first store that is not connected, else the document store's.
    pub async fn health(&self) -> CacheHealth {
        let documents = self.documents.health().await;
        let same = std::ptr::addr_eq(Arc::as_ptr(&self.documents), Arc::as_ptr(&self.pipelines));
        if same || !documents.connected {
            return documents;
        }
        let pipelines = self.pipelines.health().await;
        if pipelines.connected {
            documents
        } else {
            pipelines
        }
    }
}

/// How long an eviction's tombstone refuses older writes (`evict_document`).
pub const TOMBSTONE_MS: u64 = 60_000;

/// Milliseconds since the Unix epoch from the host clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
pub mod contract;

/// The `refuse_up_to` of the tombstone a patch leaves when it finds nothing cached: upserts up to
/// and including its stamp are refused (an earlier write can carry the same millisecond), and so
/// is a backfill of the patched version, until the tombstone lapses or a newer write is cached.
pub fn patch_tombstone(upserted_at: u64) -> u64 {
    upserted_at.saturating_add(1)
}
