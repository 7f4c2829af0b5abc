//! The contract every `DocumentStore` meets: mirrored documents, their stamps, tombstones and
//! mirror batches.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::cache::*;

pub type Factory<'a> = &'a (dyn Fn() -> Arc<dyn DocumentStore> + Sync);

pub async fn run_all(factory: Factory<'_>) {
    documents_upsert_get_evict(factory()).await;
    documents_stamp_ordering(factory()).await;
    documents_patch_merges_only_cached(factory()).await;
    a_patch_of_an_uncached_document_refuses_older_copies(factory()).await;
    documents_purge_is_per_namespace(factory()).await;
    documents_know_when_they_were_cached(factory()).await;
    evictions_refuse_older_copies(factory()).await;
    mirror_batch_keeps_the_single_document_rules(factory()).await;
    mirror_batch_keeps_each_documents_order(factory()).await;
    text_upserts_keep_the_single_document_rules(factory()).await;
}

fn attrs(v: Value) -> Attributes {
    v.as_object().cloned().unwrap()
}

async fn documents_upsert_get_evict(cache: Arc<dyn DocumentStore>) {
    let ns = "contract-docs";
    let num = DocId::Num(7);
    let s = DocId::Str("7".into());
    assert!(cache.get_document(ns, &num).await.unwrap().is_none());
    assert!(cache
        .upsert_document(ns, &num, attrs(json!({"a": 1})), 10)
        .await
        .unwrap());
    assert!(cache
        .upsert_document(ns, &s, attrs(json!({"a": "s"})), 10)
        .await
        .unwrap());
    let got = cache.get_document(ns, &num).await.unwrap().unwrap();
    assert_eq!(got.attributes, attrs(json!({"a": 1})));
    assert_eq!(got.upserted_at, 10);
    assert_eq!(
        cache.get_document(ns, &s).await.unwrap().unwrap().attributes,
        attrs(json!({"a": "s"}))
    );
    assert!(cache
        .get_document("contract-other", &num)
        .await
        .unwrap()
        .is_none());
    assert!(cache.evict_document(ns, &num, 10).await.unwrap());
    assert!(!cache.evict_document(ns, &num, 10).await.unwrap());
    assert!(cache.get_document(ns, &num).await.unwrap().is_none());
    assert!(cache.get_document(ns, &s).await.unwrap().is_some());
}

async fn documents_stamp_ordering(cache: Arc<dyn DocumentStore>) {
    let ns = "contract-order";
    let id = DocId::Str("d".into());
    assert!(cache
        .upsert_document(ns, &id, attrs(json!({"v": 2})), 200)
        .await
        .unwrap());
    // An older write never replaces a newer document.
    assert!(!cache
        .upsert_document(ns, &id, attrs(json!({"v": 1})), 100)
        .await
        .unwrap());
    assert!(!cache
        .patch_document(ns, &id, attrs(json!({"p": 1})), 100)
        .await
        .unwrap());
    assert_eq!(
        cache.get_document(ns, &id).await.unwrap().unwrap().attributes,
        attrs(json!({"v": 2}))
    );
    // The same or a newer stamp does.
    assert!(cache
        .upsert_document(ns, &id, attrs(json!({"v": 3})), 200)
        .await
        .unwrap());
    assert!(cache
        .upsert_document(ns, &id, attrs(json!({"v": 4})), 300)
        .await
        .unwrap());
    assert_eq!(
        cache.get_document(ns, &id).await.unwrap().unwrap().attributes,
        attrs(json!({"v": 4}))
    );
}

async fn documents_patch_merges_only_cached(cache: Arc<dyn DocumentStore>) {
    let ns = "contract-patch";
    let id = DocId::Num(1);
    // No phantom documents.
    assert!(!cache
        .patch_document(ns, &id, attrs(json!({"p": 1})), 10)
        .await
        .unwrap());
    assert!(cache.get_document(ns, &id).await.unwrap().is_none());
    // (Its tombstone refuses copies up to its stamp: a later write is cached.)
    assert!(cache
        .upsert_document(ns, &id, attrs(json!({"a": 1, "b": 2})), 12)
        .await
        .unwrap());
    assert!(cache
        .patch_document(ns, &id, attrs(json!({"b": 3, "c": null})), 20)
        .await
        .unwrap());
    let got = cache.get_document(ns, &id).await.unwrap().unwrap();
    assert_eq!(got.attributes, attrs(json!({"a": 1, "b": 3, "c": null})));
    assert_eq!(got.upserted_at, 20);
}

/// A patch's mirror can overtake the mirror of an earlier write (that one may wait in a batch
/// after its response): with nothing cached to merge into, the patch leaves a tombstone, so the
/// earlier write's version, which lacks the patch, is never cached after it, even when both
/// carry the same millisecond.
async fn a_patch_of_an_uncached_document_refuses_older_copies(cache: Arc<dyn DocumentStore>) {
    let ns = "contract-patch-first";
    let id = |s: &str| DocId::Str(s.into());
    assert!(!cache
        .patch_document(ns, &id("a"), attrs(json!({"p": 2})), 20)
        .await
        .unwrap());
    assert!(!cache
        .upsert_document(ns, &id("a"), attrs(json!({"p": 1})), 10)
        .await
        .unwrap());
    for stamp in [15, 20] {
        let late = cache
            .apply_mirror(ns, vec![MirrorOp::Upsert(id("a"), attrs(json!({"p": 1})))], stamp)
            .await;
        assert_eq!(late.applied, 0, "{stamp}");
    }
    assert!(!cache
        .backfill_document(ns, &id("a"), attrs(json!({"p": 1})), 20)
        .await
        .unwrap());
    assert!(cache.get_document(ns, &id("a")).await.unwrap().is_none());
    // A later write is cached as usual.
    assert!(cache
        .upsert_document(ns, &id("a"), attrs(json!({"p": 3})), 30)
        .await
        .unwrap());
    // The same through mirror batches, and over an older tombstone (which the patch extends).
    assert!(!cache.evict_document(ns, &id("b"), 5).await.unwrap());
    for doc in ["b", "c"] {
        let patch = vec![MirrorOp::Patch(id(doc), attrs(json!({"p": 2})))];
        assert_eq!(cache.apply_mirror(ns, patch, 20).await.applied, 0);
        let earlier = vec![MirrorOp::Upsert(id(doc), attrs(json!({"p": 1})))];
        assert_eq!(cache.apply_mirror(ns, earlier, 10).await.applied, 0, "{doc}");
        assert!(cache.get_document(ns, &id(doc)).await.unwrap().is_none(), "{doc}");
    }
}

async fn documents_purge_is_per_namespace(cache: Arc<dyn DocumentStore>) {
    for i in 0..5u64 {
        cache
            .upsert_document("contract-purge", &DocId::Num(i), attrs(json!({"i": i})), 1)
            .await
            .unwrap();
    }
    cache
        .upsert_document("contract-keep", &DocId::Num(0), attrs(json!({})), 1)
        .await
        .unwrap();
    // The count is informational (Aerospike's truncate cannot tell it): the effect is what counts.
    cache.purge_namespace("contract-purge").await.unwrap();
    assert!(cache
        .get_document("contract-purge", &DocId::Num(1))
        .await
        .unwrap()
        .is_none());
    assert!(cache
        .get_document("contract-keep", &DocId::Num(0))
        .await
        .unwrap()
        .is_some());
}

/// Each copy knows when it entered the cache (fetches serve none older than the max age):
/// upserts, backfills and mirrors set it, patches keep it.
async fn documents_know_when_they_were_cached(cache: Arc<dyn DocumentStore>) {
    let ns = "contract-cache-time";
    let (a, b, c) = (DocId::Num(1), DocId::Str("b".into()), DocId::Str("c".into()));
    let before = crate::cache::now_ms();
    assert!(cache
        .upsert_document(ns, &a, attrs(json!({"x": 1})), 10)
        .await
        .unwrap());
    assert!(cache
        .backfill_document(ns, &b, attrs(json!({"y": 1})), 10)
        .await
        .unwrap());
    let first = cache.get_document(ns, &a).await.unwrap().unwrap().cached_ms;
    let after = crate::cache::now_ms();
    assert!(
        (before..=after).contains(&first),
        "{before} <= {first} <= {after}"
    );
    let backfilled = cache.get_document(ns, &b).await.unwrap().unwrap().cached_ms;
    assert!((before..=after).contains(&backfilled));
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert!(cache
        .patch_document(ns, &a, attrs(json!({"z": 2})), 11)
        .await
        .unwrap());
    let patched = cache.get_document(ns, &a).await.unwrap().unwrap();
    assert_eq!(
        (patched.cached_ms, patched.upserted_at),
        (first, 11),
        "a patch keeps the cache time"
    );
    assert!(cache
        .upsert_document(ns, &a, attrs(json!({"x": 3})), 12)
        .await
        .unwrap());
    assert!(cache.get_document(ns, &a).await.unwrap().unwrap().cached_ms >= first + 20);
    let report = cache
        .apply_mirror(ns, vec![MirrorOp::Upsert(c.clone(), attrs(json!({"m": 1})))], 13)
        .await;
    assert!(report.failure.is_none());
    assert!(cache.get_document(ns, &c).await.unwrap().unwrap().cached_ms >= first + 20);
}

/// An eviction's tombstone: a backfill at or below its stamp, and an upsert below it, are refused
/// (a fetch or a mirror older than a delete cannot resurrect the document).
async fn evictions_refuse_older_copies(cache: Arc<dyn DocumentStore>) {
    let ns = "contract-tomb";
    let id = DocId::Str("d".into());
    assert!(cache
        .upsert_document(ns, &id, attrs(json!({"v": 1})), 50)
        .await
        .unwrap());
    assert!(cache.evict_document(ns, &id, 100).await.unwrap());
    assert!(cache.get_document(ns, &id).await.unwrap().is_none());
    for stamp in [90, 100] {
        assert!(!cache
            .backfill_document(ns, &id, attrs(json!({"v": "old"})), stamp)
            .await
            .unwrap());
    }
    assert!(!cache
        .upsert_document(ns, &id, attrs(json!({"v": "old"})), 99)
        .await
        .unwrap());
    assert!(cache.get_document(ns, &id).await.unwrap().is_none());
    // A copy newer than the eviction is cached; a backfill never replaces what is cached.
    assert!(cache
        .backfill_document(ns, &id, attrs(json!({"v": "new"})), 101)
        .await
        .unwrap());
    assert!(!cache
        .backfill_document(ns, &id, attrs(json!({"v": "newer"})), 500)
        .await
        .unwrap());
    let got = cache.get_document(ns, &id).await.unwrap().unwrap();
    assert_eq!(got.attributes, attrs(json!({"v": "new"})));
    // An eviction of an uncached document still refuses older copies; a mirror of the same
    // write (equal stamp) is not refused.
    let other = DocId::Num(5);
    assert!(!cache.evict_document(ns, &other, 200).await.unwrap());
    assert!(!cache
        .backfill_document(ns, &other, attrs(json!({})), 150)
        .await
        .unwrap());
    assert!(cache
        .upsert_document(ns, &other, attrs(json!({"same": "write"})), 200)
        .await
        .unwrap());
    assert!(cache.get_document(ns, &other).await.unwrap().is_some());
}

/// `apply_mirror` applies every op under the single-document rules: newer stamps win, a
/// tombstone refuses older upserts, patches merge only into cached documents, evictions leave
/// tombstones; `applied` counts the ops that took effect.
async fn mirror_batch_keeps_the_single_document_rules(cache: Arc<dyn DocumentStore>) {
    let ns = "contract-batch";
    let id = |s: &str| DocId::Str(s.into());
    let stamp = 1_000;
    for (doc, v) in [("newer", 2_000), ("cached", 500), ("gone", 500), ("inv", 500)] {
        assert!(cache
            .upsert_document(ns, &id(doc), attrs(json!({"a": 1, "b": 1})), v)
            .await
            .unwrap());
    }
    assert!(!cache.evict_document(ns, &id("tomb"), 1_500).await.unwrap());
    let ops = vec![
        MirrorOp::Upsert(id("a"), attrs(json!({"v": 1}))),
        MirrorOp::Patch(id("a"), attrs(json!({"p": 2}))),
        MirrorOp::Upsert(id("newer"), attrs(json!({"v": "old"}))),
        MirrorOp::Patch(id("newer"), attrs(json!({"p": "old"}))),
        MirrorOp::Upsert(id("tomb"), attrs(json!({"v": "old"}))),
        MirrorOp::Patch(id("phantom"), attrs(json!({"p": 1}))),
        MirrorOp::Patch(id("cached"), attrs(json!({"b": 2, "c": 3}))),
        MirrorOp::Evict(id("gone")),
        MirrorOp::Upsert(id("b"), attrs(json!({"v": 1}))),
        MirrorOp::Evict(id("b")),
        MirrorOp::Evict(id("c")),
        MirrorOp::Upsert(id("c"), attrs(json!({"v": 2}))),
        MirrorOp::Invalidate(id("inv")),
    ];
    let report = cache.apply_mirror(ns, ops, stamp).await;
    assert!(report.failure.is_none(), "{:?}", report.failure);
    assert_eq!((report.applied, report.failed), (8, 0));
    let get = |doc: &'static str| {
        let cache = cache.clone();
        async move { cache.get_document(ns, &id(doc)).await.unwrap() }
    };
    let a = get("a").await.unwrap();
    assert_eq!(
        (a.attributes, a.upserted_at),
        (attrs(json!({"v": 1, "p": 2})), stamp)
    );
    assert_eq!(
        get("newer").await.unwrap().attributes,
        attrs(json!({"a": 1, "b": 1}))
    );
    assert!(get("tomb").await.is_none());
    assert!(get("phantom").await.is_none());
    let cached = get("cached").await.unwrap();
    assert_eq!(
        (cached.attributes, cached.upserted_at),
        (attrs(json!({"a": 1, "b": 2, "c": 3})), stamp)
    );
    assert!(get("gone").await.is_none() && get("b").await.is_none() && get("inv").await.is_none());
    // An eviction's tombstone refuses nothing of this write's own stamp...
    assert_eq!(get("c").await.unwrap().attributes, attrs(json!({"v": 2})));
    // ...but a delete's refuses copies up to it, an invalidation's only older ones.
    assert!(!cache
        .backfill_document(ns, &id("gone"), attrs(json!({})), stamp)
        .await
        .unwrap());
    assert!(!cache
        .upsert_document(ns, &id("gone"), attrs(json!({})), stamp - 1)
        .await
        .unwrap());
    assert!(!cache
        .backfill_document(ns, &id("inv"), attrs(json!({})), stamp - 1)
        .await
        .unwrap());
    assert!(cache
        .backfill_document(ns, &id("inv"), attrs(json!({"fresh": true})), stamp)
        .await
        .unwrap());
    // An empty batch, and patches alone into a namespace with nothing cached, change nothing.
    assert_eq!(cache.apply_mirror(ns, Vec::new(), stamp).await.applied, 0);
    let patches = vec![MirrorOp::Patch(DocId::Num(1), attrs(json!({"p": 1})))];
    let report = cache.apply_mirror("contract-batch-empty", patches, stamp).await;
    assert_eq!((report.applied, report.failure), (0, None));
    assert!(cache
        .get_document("contract-batch-empty", &DocId::Num(1))
        .await
        .unwrap()
        .is_none());
}

/// Each document's ops take effect in plan order, however many documents a batch spans (the
/// op-by-op default spreads them over lanes, the embedded store over chunks of its lock).
async fn mirror_batch_keeps_each_documents_order(cache: Arc<dyn DocumentStore>) {
    let ns = "contract-batch-order";
    let n = 600u64;
    let mut ops = Vec::new();
    ops.extend((0..n).map(|i| MirrorOp::Upsert(DocId::Num(i), attrs(json!({"n": i})))));
    ops.extend((0..n).map(|i| MirrorOp::Patch(DocId::Num(i), attrs(json!({"m": i})))));
    ops.extend(
        (0..n)
            .filter(|i| i % 2 == 0)
            .map(|i| MirrorOp::Evict(DocId::Num(i))),
    );
    ops.extend(
        (0..n)
            .filter(|i| i % 4 == 0)
            .map(|i| MirrorOp::Upsert(DocId::Num(i), attrs(json!({"again": i})))),
    );
    let report = cache.apply_mirror(ns, ops, 10).await;
    assert!(report.failure.is_none(), "{:?}", report.failure);
    assert_eq!(report.applied, n + n + n / 2 + n / 4);
    for i in 0..n {
        let got = cache.get_document(ns, &DocId::Num(i)).await.unwrap();
        let expected = match i % 4 {
            0 => Some(attrs(json!({"again": i}))),
            2 => None,
            _ => Some(attrs(json!({"n": i, "m": i}))),
        };
        assert_eq!(got.map(|d| d.attributes), expected, "document {i}");
    }
}

/// Upserts carrying their attributes as JSON text (row-form writes) read back as the same
/// attributes, merge a later patch, lose to a newer copy, are refused by a newer tombstone and
/// replace an older tombstone's document, in a batch and one at a time.
async fn text_upserts_keep_the_single_document_rules(cache: Arc<dyn DocumentStore>) {
    let ns = "contract-text";
    let text = |t: &str| AttributesJson::from_object_text(t.to_owned());
    let get = |n: u64| {
        let cache = cache.clone();
        async move { cache.get_document(ns, &DocId::Num(n)).await.unwrap() }
    };
    assert!(cache
        .upsert_document(ns, &DocId::Num(2), attrs(json!({"v": "newer"})), 9)
        .await
        .unwrap());
    assert!(!cache.evict_document(ns, &DocId::Num(3), 9).await.unwrap());
    assert!(!cache.evict_document(ns, &DocId::Num(4), 4).await.unwrap());
    let ops = vec![
        MirrorOp::UpsertJson(DocId::Num(1), text(r#"{"t" : "\u00e9", "n":[1, 2]}"#)),
        MirrorOp::Patch(DocId::Num(1), attrs(json!({"p": true}))),
        MirrorOp::UpsertJson(DocId::Num(2), text(r#"{"v":"older"}"#)),
        MirrorOp::UpsertJson(DocId::Num(3), text(r#"{"v":"older"}"#)),
        MirrorOp::UpsertJson(DocId::Num(4), text(r#"{}"#)),
    ];
    let report = cache.apply_mirror(ns, ops, 5).await;
    assert_eq!((report.applied, report.failed), (3, 0), "{report:?}");
    let one = get(1).await.unwrap();
    assert_eq!(one.attributes, attrs(json!({"t": "é", "n": [1, 2], "p": true})));
    assert_eq!(one.upserted_at, 5);
    assert_eq!(get(2).await.unwrap().attributes, attrs(json!({"v": "newer"})));
    assert!(get(3).await.is_none(), "the tombstone refuses stamp 5");
    assert_eq!(get(4).await.unwrap().attributes, Attributes::new());
    assert!(cache
        .upsert_document_json(ns, &DocId::Num(1), text(r#"{"w":1}"#), 6)
        .await
        .unwrap());
    assert!(!cache
        .upsert_document_json(ns, &DocId::Num(2), text(r#"{"w":1}"#), 6)
        .await
        .unwrap());
    assert_eq!(get(1).await.unwrap().attributes, attrs(json!({"w": 1})));
}
