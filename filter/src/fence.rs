//! The fence: what writes could not mirror, kept until the sidecar has evicted it.
//!
//! A write reaches Turbopuffer but not the document cache when its mirror callout fails or times
//! out, or when the stream ends before the filter saw the write's outcome (a client that hangs up
//! after its body went upstream: Turbopuffer may have applied the write). The cache may then hold
//! copies older than Turbopuffer's. The exchange reports each such write as a [`FenceNote`]; the
//! worker's root context keeps them in [`Fences`] and, on its timer, sends them to the sidecar
//! (`POST /internal/v1/evict`) until it acknowledges, backing off between tries. While a namespace
//! is fenced, document fetches through this Envoy bypass the cache.
//!
//! Memory is bounded: a namespace keeps at most `max_ids` ids (beyond that its whole cache is
//! purged instead), and at most `capacity` namespaces are fenced per worker; a write beyond that
//! is counted and left to the sidecar's max age.

use std::collections::{BTreeMap, BTreeSet};

/// What one write could not mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceNote {
    pub namespace: String,
    pub scope: Scope,
    /// The write's stamp (0 when it has none, as a namespace delete).
    pub stamp: u64,
}

/// Which cached documents a write may have left stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// These ids, as the JSON tokens the write spelled them with (`"a"`, `42`).
    Ids(Vec<String>),
    /// Any document of the namespace (filter writes, namespace deletes, too many ids).
    Namespace,
}

/// What became of a note.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// A namespace that was not fenced is now.
    New,
    /// Merged into the namespace's pending eviction.
    Merged,
    /// Merged, and its ids grew past the limit: the namespace will be purged instead.
    BecamePurge,
    /// The worker already fences `capacity` namespaces: dropped (the sidecar's max age bounds it).
    Overflow,
}

#[derive(Debug)]
struct Entry {
    /// `None`: purge the namespace.
    ids: Option<BTreeSet<String>>,
    stamp: u64,
    attempts: u32,
    next_ms: u64,
    /// Bumped by every note, so an acknowledgement of an older send does not drop newer ids.
    version: u64,
}

/// An eviction request ready to send, and what it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub body: Vec<u8>,
    /// (namespace, version sent)
    pub covers: Vec<(String, u64)>,
}

/// The namespaces this worker still has to get evicted.
#[derive(Debug)]
pub struct Fences {
    entries: BTreeMap<String, Entry>,
    capacity: usize,
    max_ids: usize,
    base_backoff_ms: u64,
    max_backoff_ms: u64,
}

impl Default for Fences {
    fn default() -> Self {
        Fences::new(
            crate::config::DEFAULT_FENCE_NAMESPACES,
            crate::config::DEFAULT_FENCE_MAX_IDS,
            500,
            30_000,
        )
    }
}

/// Most namespaces one eviction request carries.
const BATCH_NAMESPACES: usize = 64;

impl Fences {
    pub fn new(capacity: usize, max_ids: usize, base_backoff_ms: u64, max_backoff_ms: u64) -> Self {
        Fences {
            entries: BTreeMap::new(),
            capacity,
            max_ids,
            base_backoff_ms: base_backoff_ms.max(1),
            max_backoff_ms,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether a namespace has an eviction pending.
    pub fn contains(&self, namespace: &str) -> bool {
        self.entries.contains_key(namespace)
    }

    /// Records a write's note; it is due at once.
    pub fn add(&mut self, note: FenceNote, now_ms: u64) -> Added {
        if let Some(entry) = self.entries.get_mut(&note.namespace) {
            entry.version += 1;
            entry.stamp = entry.stamp.max(note.stamp);
            entry.next_ms = entry.next_ms.min(now_ms);
            let was_ids = entry.ids.is_some();
            match (&mut entry.ids, note.scope) {
                (Some(ids), Scope::Ids(new)) => {
                    ids.extend(new);
                    if ids.len() > self.max_ids {
                        entry.ids = None;
                    }
                }
                (ids, _) => *ids = None,
            }
            return if was_ids && entry.ids.is_none() {
                Added::BecamePurge
            } else {
                Added::Merged
            };
        }
        if self.entries.len() >= self.capacity {
            return Added::Overflow;
        }
        let ids = match note.scope {
            Scope::Ids(ids) if ids.len() <= self.max_ids => Some(ids.into_iter().collect()),
            _ => None,
        };
        self.entries.insert(
            note.namespace,
            Entry {
                ids,
                stamp: note.stamp,
                attempts: 0,
                next_ms: now_ms,
                version: 0,
            },
        );
        Added::New
    }

    /// The next eviction request: up to 64 namespaces whose time has come, or `None`.
    pub fn due(&self, now_ms: u64) -> Option<Batch> {
        let due: Vec<(&String, &Entry)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.next_ms <= now_ms)
            .take(BATCH_NAMESPACES)
            .collect();
        if due.is_empty() {
            return None;
        }
        let mut body = b"{\"fences\":[".to_vec();
        let mut covers = Vec::with_capacity(due.len());
        for (i, (namespace, entry)) in due.into_iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            let ids = entry.ids.as_ref().map(|ids| ids.iter().map(String::as_bytes));
            crate::sidecar_api::push_fence(&mut body, namespace, ids, entry.stamp);
            covers.push((namespace.clone(), entry.version));
        }
        body.extend_from_slice(b"]}");
        Some(Batch { body, covers })
    }

    /// The sidecar evicted a batch: returns the namespaces no longer fenced (a note that came
    /// after the batch was built keeps its namespace fenced, due at once).
    pub fn acknowledge(&mut self, covers: &[(String, u64)]) -> Vec<String> {
        let mut released = Vec::new();
        for (namespace, version) in covers {
            if self.entries.get(namespace).is_some_and(|e| e.version == *version) {
                self.entries.remove(namespace);
                released.push(namespace.clone());
            }
        }
        released
    }

    /// A batch failed: each namespace backs off (doubling from the base, at most the maximum).
    pub fn failed(&mut self, covers: &[(String, u64)], now_ms: u64) {
        for (namespace, _) in covers {
            if let Some(e) = self.entries.get_mut(namespace) {
                e.attempts = e.attempts.saturating_add(1);
                let backoff = self
                    .base_backoff_ms
                    .saturating_mul(1u64 << e.attempts.min(20))
                    .min(self.max_backoff_ms);
                e.next_ms = now_ms.saturating_add(backoff);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::sidecar_api::EvictRequest;
    use serde_json::json;

    fn note(ns: &str, ids: &[&str], stamp: u64) -> FenceNote {
        FenceNote {
            namespace: ns.to_owned(),
            scope: Scope::Ids(ids.iter().map(|s| (*s).to_owned()).collect()),
            stamp,
        }
    }

    fn sent(batch: &Batch) -> serde_json::Value {
        // The body is what the sidecar parses.
        let parsed: EvictRequest = serde_json::from_slice(&batch.body).unwrap();
        serde_json::to_value(parsed).unwrap()
    }

    #[test]
    fn notes_merge_per_namespace_and_go_out_as_one_request() {
        let mut f = Fences::new(10, 3, 100, 1_000);
        assert_eq!(f.due(0), None);
        assert_eq!(f.add(note("a", &["\"x\"", "7"], 5), 0), Added::New);
        assert_eq!(f.add(note("a", &["\"x\"", "\"y\""], 9), 0), Added::Merged);
        assert_eq!(
            f.add(
                FenceNote {
                    namespace: "b\"q".into(),
                    scope: Scope::Namespace,
                    stamp: 0
                },
                0
            ),
            Added::New
        );
        assert!(f.contains("a") && f.contains("b\"q") && !f.contains("c"));
        let batch = f.due(0).unwrap();
        assert_eq!(
            sent(&batch),
            json!({"fences": [
                {"namespace": "a", "ids": ["x", "y", 7], "stamp": 9},
                {"namespace": "b\"q", "ids": null, "stamp": 0}
            ]})
        );
        assert_eq!(
            f.acknowledge(&batch.covers),
            vec!["a".to_owned(), "b\"q".to_owned()]
        );
        assert!(f.is_empty());
    }

    #[test]
    fn too_many_ids_become_a_purge_and_capacity_is_kept() {
        let mut f = Fences::new(2, 3, 100, 1_000);
        assert_eq!(f.add(note("a", &["1", "2", "3", "4"], 1), 0), Added::New);
        assert_eq!(f.add(note("b", &["1", "2"], 1), 0), Added::New);
        assert_eq!(f.add(note("b", &["3", "4"], 1), 0), Added::BecamePurge);
        assert_eq!(f.add(note("b", &["5"], 1), 0), Added::Merged);
        assert_eq!(f.add(note("c", &["1"], 1), 0), Added::Overflow);
        assert_eq!(f.len(), 2);
        let v = sent(&f.due(0).unwrap());
        assert_eq!(v["fences"][0]["ids"], json!(null));
        assert_eq!(v["fences"][1]["ids"], json!(null));
    }

    #[test]
    fn failures_back_off_and_a_later_note_survives_an_older_acknowledgement() {
        let mut f = Fences::new(10, 100, 100, 1_000);
        f.add(note("a", &["1"], 1), 0);
        let first = f.due(0).unwrap();
        f.failed(&first.covers, 0);
        assert_eq!(f.due(199), None);
        let second = f.due(200).unwrap();
        f.failed(&second.covers, 200);
        assert_eq!(f.due(599), None);
        for _ in 0..10 {
            f.failed(&second.covers, 1_000);
        }
        assert_eq!(f.due(1_999), None, "capped at the maximum backoff");
        let third = f.due(2_000).unwrap();
        // A new note while the third is in flight: due at once, and not dropped by the ack.
        assert_eq!(f.add(note("a", &["2"], 2), 2_000), Added::Merged);
        assert!(f.acknowledge(&third.covers).is_empty());
        let fourth = f.due(2_000).unwrap();
        assert_eq!(sent(&fourth)["fences"][0]["ids"], json!([1, 2]));
        assert_eq!(f.acknowledge(&fourth.covers), vec!["a".to_owned()]);
    }

    #[test]
    fn a_request_carries_at_most_64_namespaces() {
        let mut f = Fences::new(1_000, 10, 100, 1_000);
        for i in 0..100 {
            f.add(note(&format!("ns-{i:03}"), &["1"], 1), 0);
        }
        let batch = f.due(0).unwrap();
        assert_eq!(batch.covers.len(), 64);
        f.acknowledge(&batch.covers);
        assert_eq!(f.due(0).unwrap().covers.len(), 36);
    }
}
