//! Mirrored Turbopuffer documents on Aerospike: one set per namespace (`set_name` of the set
//! prefix and the namespace), one record per document (`attrs`: the attributes as JSON, `ts`: the
//! stamp, `at`: when the copy was cached, `del`: 1 on an eviction's tombstone, which lapses after
//! `TOMBSTONE_MS`). Every write is a generation-checked or create-only put, retried on conflict.

use aerospike::{Bin, Bins, Value};
use async_trait::async_trait;

use super::{bin_int, bin_str, ms_i64, set_name, AerospikeCache, Cond, Written, MAX_RMW_ATTEMPTS};
use crate::cache::{
    Attributes, AttributesJson, CacheError, CacheResult, CachedDoc, DocId, DocumentStore, TOMBSTONE_MS,
};

/// A document's record key: its id (a `u64` beyond `i64` as a tagged string).
fn doc_key_value(id: &DocId) -> Value {
    match id {
        DocId::Num(n) => match i64::try_from(*n) {
            Ok(i) => Value::Int(i),
            Err(_) => Value::String(format!("#u64:{n}")),
        },
        DocId::Str(s) => Value::String(s.clone()),
    }
}

impl AerospikeCache {
    fn docs_set(&self, namespace: &str) -> String {
        set_name(&self.settings.set_prefix, namespace)
    }

    /// The cached record of a document: `(generation, stamp, is a tombstone)`.
    fn doc_header(rec: &aerospike::Record) -> (u32, i64, bool) {
        (
            rec.generation,
            bin_int(rec, "ts").unwrap_or(0),
            bin_int(rec, "del").unwrap_or(0) == 1,
        )
    }

    /// Writes a live document (clearing a tombstone) under `cond`. `cached_ms` is when this copy
    /// entered the cache (now, unless a patch keeps the copy's own).
    async fn write_cached(
        &self,
        set: &str,
        id: &DocId,
        text: &str,
        upserted_at: u64,
        cached_ms: u64,
        cond: Cond,
    ) -> CacheResult<Written> {
        let bins = [
            Bin::new("attrs", Value::String(text.to_owned())),
            Bin::new("ts", Value::Int(ms_i64(upserted_at))),
            Bin::new("del", Value::Nil),
            Bin::new("at", Value::Int(ms_i64(cached_ms))),
        ];
        self.put(set, doc_key_value(id), &bins, cond, None).await
    }

    /// Replaces the document with the attributes' JSON `text` unless the cached one, or a
    /// tombstone, carries a newer stamp (`DocumentStore::upsert_document`).
    async fn upsert_text(
        &self,
        namespace: &str,
        id: &DocId,
        text: &str,
        upserted_at: u64,
    ) -> CacheResult<bool> {
        let set = self.docs_set(namespace);
        for _ in 0..MAX_RMW_ATTEMPTS {
            let cond = match self
                .get(&set, doc_key_value(id), Bins::from(["ts", "del"].as_slice()))
                .await?
            {
                // A newer document, or a tombstone of a newer eviction, wins.
                Some(rec) if Self::doc_header(&rec).1 > ms_i64(upserted_at) => return Ok(false),
                Some(rec) => Cond::Gen(rec.generation),
                None => Cond::Create,
            };
            if let Written::Yes = self
                .write_cached(&set, id, text, upserted_at, crate::cache::now_ms(), cond)
                .await?
            {
                return Ok(true);
            }
        }
        Err(CacheError::Unavailable(
            "too much contention on a cached document".into(),
        ))
    }
}

#[async_trait]
impl DocumentStore for AerospikeCache {
    async fn get_document(&self, namespace: &str, id: &DocId) -> CacheResult<Option<CachedDoc>> {
        let set = self.docs_set(namespace);
        let Some(rec) = self.get(&set, doc_key_value(id), Bins::All).await? else {
            return Ok(None);
        };
        let (_, ts, tombstone) = Self::doc_header(&rec);
        if tombstone {
            return Ok(None);
        }
        let attributes = bin_str(&rec, "attrs")
            .and_then(|s| serde_json::from_str::<Attributes>(&s).ok())
            .unwrap_or_default();
        Ok(Some(CachedDoc {
            attributes,
            upserted_at: u64::try_from(ts).unwrap_or(0),
            cached_ms: bin_int(&rec, "at")
                .and_then(|t| u64::try_from(t).ok())
                .unwrap_or(0),
        }))
    }

    async fn upsert_document(
        &self,
        namespace: &str,
        id: &DocId,
        attributes: Attributes,
        upserted_at: u64,
    ) -> CacheResult<bool> {
        let text = serde_json::to_string(&attributes).unwrap_or_else(|_| "{}".into());
        self.upsert_text(namespace, id, &text, upserted_at).await
    }

    /// The text is stored as it is: no map to build and serialise again.
    async fn upsert_document_json(
        &self,
        namespace: &str,
        id: &DocId,
        attributes: AttributesJson,
        upserted_at: u64,
    ) -> CacheResult<bool> {
        self.upsert_text(namespace, id, attributes.as_str(), upserted_at)
            .await
    }

    async fn backfill_document(
        &self,
        namespace: &str,
        id: &DocId,
        attributes: Attributes,
        upserted_at: u64,
    ) -> CacheResult<bool> {
        let set = self.docs_set(namespace);
        let text = serde_json::to_string(&attributes).unwrap_or_else(|_| "{}".into());
        for _ in 0..MAX_RMW_ATTEMPTS {
            let cond = match self
                .get(&set, doc_key_value(id), Bins::from(["ts", "del"].as_slice()))
                .await?
            {
                None => Cond::Create,
                Some(rec) => match Self::doc_header(&rec) {
                    (gen, ts, true) if ts < ms_i64(upserted_at) => Cond::Gen(gen),
                    // Something is cached, or an eviction at least as new refuses this copy.
                    _ => return Ok(false),
                },
            };
            if let Written::Yes = self
                .write_cached(&set, id, &text, upserted_at, crate::cache::now_ms(), cond)
                .await?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn patch_document(
        &self,
        namespace: &str,
        id: &DocId,
        patch: Attributes,
        upserted_at: u64,
    ) -> CacheResult<bool> {
        let set = self.docs_set(namespace);
        for _ in 0..MAX_RMW_ATTEMPTS {
            let rec = self.get(&set, doc_key_value(id), Bins::All).await?;
            let Some((rec, (gen, ts, false))) = rec.map(|r| {
                let header = Self::doc_header(&r);
                (r, header)
            }) else {
                // Nothing to merge into: a tombstone refuses copies up to the patch, so the mirror
                // of an earlier write that arrives after it cannot cache a version without it.
                self.evict_document(namespace, id, crate::cache::patch_tombstone(upserted_at))
                    .await?;
                return Ok(false);
            };
            if ts > ms_i64(upserted_at) {
                return Ok(false);
            }
            let mut merged = bin_str(&rec, "attrs")
                .and_then(|s| serde_json::from_str::<Attributes>(&s).ok())
                .unwrap_or_default();
            for (k, v) in &patch {
                merged.insert(k.clone(), v.clone());
            }
            let text = serde_json::to_string(&merged).unwrap_or_else(|_| "{}".into());
            let cached_ms = bin_int(&rec, "at")
                .and_then(|t| u64::try_from(t).ok())
                .unwrap_or(0);
            if let Written::Yes = self
                .write_cached(&set, id, &text, upserted_at, cached_ms, Cond::Gen(gen))
                .await?
            {
                return Ok(true);
            }
        }
        Err(CacheError::Unavailable(
            "too much contention on a cached document".into(),
        ))
    }

    async fn evict_document(&self, namespace: &str, id: &DocId, refuse_up_to: u64) -> CacheResult<bool> {
        let set = self.docs_set(namespace);
        let ttl = u32::try_from(TOMBSTONE_MS / 1000).unwrap_or(u32::MAX);
        for _ in 0..MAX_RMW_ATTEMPTS {
            let rec = self
                .get(&set, doc_key_value(id), Bins::from(["ts", "del"].as_slice()))
                .await?;
            let (cond, stamp, was_cached) = match &rec {
                None => (Cond::Create, ms_i64(refuse_up_to), false),
                Some(rec) => {
                    let (gen, ts, tombstone) = Self::doc_header(rec);
                    (Cond::Gen(gen), ts.max(ms_i64(refuse_up_to)), !tombstone)
                }
            };
            // The tombstone replaces the document: stamp, marker, no attributes; it lapses.
            let bins = [
                Bin::new("attrs", Value::Nil),
                Bin::new("ts", Value::Int(stamp)),
                Bin::new("del", Value::Int(1)),
                Bin::new("at", Value::Nil),
            ];
            if let Written::Yes = self.put(&set, doc_key_value(id), &bins, cond, Some(ttl)).await? {
                return Ok(was_cached);
            }
        }
        Err(CacheError::Unavailable(
            "too much contention on a cached document".into(),
        ))
    }

    /// Truncates the namespace's set. Aerospike does not say how many records that removed: 0.
    async fn purge_namespace(&self, namespace: &str) -> CacheResult<u64> {
        self.truncate(&self.docs_set(namespace)).await?;
        Ok(0)
    }
}
