//! The contract every `PipelineStore` meets: pipelines, staging, claims, leases, heartbeats,
//! set-stage and counts.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;

use crate::cache::*;

pub type Factory<'a> = &'a (dyn Fn() -> Arc<dyn PipelineStore> + Sync);

pub async fn run_all(factory: Factory<'_>) {
    pipelines_create_list_delete(factory()).await;
    stage_and_restage(factory()).await;
    claim_limit_prefix_and_exclusivity(factory()).await;
    lease_expiry_returns_to_claimed_from_stage(factory()).await;
    heartbeat_extends_only_own_leases(factory()).await;
    set_stage_filters_and_create_missing(factory()).await;
    unknown_pipeline_is_an_error(factory()).await;
    concurrent_claimers_never_share(factory()).await;
    set_stage_only_version_skips_restaged_documents(factory()).await;
    leases_expire_across_minutes_and_after_days_idle(factory()).await;
    heartbeats_and_reclaims_keep_expiry_exact(factory()).await;
}

fn meta(id: &str) -> PipelineMeta {
    PipelineMeta {
        id: id.into(),
        target_namespace: "target".into(),
        distance_metric: "cosine_distance".into(),
        created_at: "2026-01-01T00:00:00Z".into(),
    }
}

fn chunks(text: &str) -> Bytes {
    Bytes::from(format!(r#"[{{"id":"c1","text":"{text}"}}]"#))
}

fn claim_args(stage: &str, claim_stage: &str, worker: &str, limit: usize, now_ms: u64) -> ClaimArgs {
    ClaimArgs {
        stage: stage.into(),
        claim_stage: claim_stage.into(),
        worker_id: worker.into(),
        limit,
        lease_ms: 10_000,
        document_id_prefix: None,
        now_ms,
    }
}

fn set_args(ids: &[&str], stage: &str, now_ms: u64) -> SetStageArgs {
    SetStageArgs {
        document_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
        stage: stage.into(),
        from_stage: None,
        worker_id: None,
        create_missing: false,
        only_version: None,
        now_ms,
    }
}

async fn staged(cache: &Arc<dyn PipelineStore>, pipeline: &str, ids: &[&str], now: u64) {
    cache.create_pipeline(meta(pipeline)).await.unwrap();
    for id in ids {
        cache.stage_document(pipeline, id, chunks(id), now).await.unwrap();
    }
}

async fn count(cache: &Arc<dyn PipelineStore>, pipeline: &str, stage: &str, now: u64) -> u64 {
    cache
        .stage_counts(pipeline, now)
        .await
        .unwrap()
        .counts
        .get(stage)
        .copied()
        .unwrap_or(0)
}

async fn pipelines_create_list_delete(cache: Arc<dyn PipelineStore>) {
    cache.create_pipeline(meta("contract-p1")).await.unwrap();
    cache.create_pipeline(meta("contract-p2")).await.unwrap();
    assert_eq!(
        cache.create_pipeline(meta("contract-p1")).await,
        Err(CacheError::PipelineExists("contract-p1".into()))
    );
    let ids: HashSet<String> = cache
        .list_pipelines()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert!(ids.contains("contract-p1") && ids.contains("contract-p2"));
    assert_eq!(
        cache.get_pipeline("contract-p1").await.unwrap(),
        Some(meta("contract-p1"))
    );
    cache
        .stage_document("contract-p1", "d", chunks("x"), 1)
        .await
        .unwrap();
    assert!(cache.delete_pipeline("contract-p1").await.unwrap());
    assert!(!cache.delete_pipeline("contract-p1").await.unwrap());
    assert!(cache.get_pipeline("contract-p1").await.unwrap().is_none());
    // Re-created: the staged documents are gone.
    cache.create_pipeline(meta("contract-p1")).await.unwrap();
    assert!(cache.get_chunks("contract-p1", "d").await.unwrap().is_none());
    assert_eq!(
        cache.stage_counts("contract-p1", 1).await.unwrap(),
        StageCounts::default()
    );
}

async fn stage_and_restage(cache: Arc<dyn PipelineStore>) {
    let p = "contract-stage";
    let now = 1_000_000;
    staged(&cache, p, &["a", "b"], now).await;
    assert_eq!(cache.get_chunks(p, "a").await.unwrap(), Some(chunks("a")));
    assert_eq!(
        cache
            .document_stage(p, "a", now)
            .await
            .unwrap()
            .map(|d| d.stage)
            .as_deref(),
        Some(STAGE_PENDING)
    );
    assert_eq!(cache.document_stage(p, "zz", now).await.unwrap(), None);
    assert_eq!(
        cache
            .claim(p, &claim_args("pending", "embedding", "w", 1, now))
            .await
            .unwrap(),
        vec!["a"]
    );
    assert_eq!(count(&cache, p, "embedding", now).await, 1);
    // Re-staging replaces the chunks, resets to pending and drops the lease.
    cache.stage_document(p, "a", chunks("new"), now).await.unwrap();
    assert_eq!(cache.get_chunks(p, "a").await.unwrap(), Some(chunks("new")));
    let counts = cache.stage_counts(p, now).await.unwrap();
    assert_eq!(counts.counts.get(STAGE_PENDING), Some(&2));
    assert_eq!(counts.counts.get("embedding"), None);
    assert_eq!(counts.leased, 0);
    // Indexed documents can be re-staged too.
    assert_eq!(
        cache
            .set_stage(p, &set_args(&["b"], STAGE_INDEXED, now))
            .await
            .unwrap(),
        1
    );
    assert_eq!(cache.stage_counts(p, now).await.unwrap().indexed_in_window, 1);
    cache.stage_document(p, "b", chunks("b2"), now).await.unwrap();
    assert_eq!(count(&cache, p, STAGE_PENDING, now).await, 2);
    assert_eq!(count(&cache, p, STAGE_INDEXED, now).await, 0);
}

async fn claim_limit_prefix_and_exclusivity(cache: Arc<dyn PipelineStore>) {
    let p = "contract-claim";
    let now = 2_000_000;
    staged(&cache, p, &["x-1", "x-2", "x-3", "y-1", "y-2"], now).await;
    let mut args = claim_args("pending", "embedding", "w1", 2, now);
    args.document_id_prefix = Some("x-".into());
    let first = cache.claim(p, &args).await.unwrap();
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|d| d.starts_with("x-")));
    let second = cache.claim(p, &args).await.unwrap();
    assert_eq!(second.len(), 1);
    assert!(!first.contains(&second[0]));
    assert!(cache.claim(p, &args).await.unwrap().is_empty());
    let rest = cache
        .claim(p, &claim_args("pending", "embedding", "w2", 100, now))
        .await
        .unwrap();
    let rest: HashSet<String> = rest.into_iter().collect();
    assert_eq!(rest, HashSet::from(["y-1".to_owned(), "y-2".to_owned()]));
    let counts = cache.stage_counts(p, now).await.unwrap();
    assert_eq!(counts.counts.get("embedding"), Some(&5));
    assert_eq!(counts.counts.get(STAGE_PENDING), None);
    assert_eq!(counts.leased, 5);
    // Leased documents in the claim stage are not claimable from it while the lease holds.
    assert!(cache
        .claim(p, &claim_args("embedding", "embedding", "w3", 100, now))
        .await
        .unwrap()
        .is_empty());
}

async fn lease_expiry_returns_to_claimed_from_stage(cache: Arc<dyn PipelineStore>) {
    let p = "contract-expiry";
    let now = 3_000_000;
    staged(&cache, p, &["a", "b"], now).await;
    assert_eq!(
        cache
            .set_stage(p, &set_args(&["a", "b"], "ocr", now))
            .await
            .unwrap(),
        2
    );
    let got = cache
        .claim(p, &claim_args("ocr", "ocr-running", "w", 10, now))
        .await
        .unwrap();
    assert_eq!(got.len(), 2);
    // Just before expiry: still leased.
    let before = cache.stage_counts(p, now + 9_999).await.unwrap();
    assert_eq!(before.counts.get("ocr-running"), Some(&2));
    assert_eq!(before.leased, 2);
    // At expiry: back in `ocr`, claimable by another worker.
    let after = cache.stage_counts(p, now + 10_000).await.unwrap();
    assert_eq!(after.counts.get("ocr"), Some(&2));
    assert_eq!(after.counts.get("ocr-running"), None);
    assert_eq!(after.leased, 0);
    assert_eq!(
        cache
            .document_stage(p, "a", now + 10_000)
            .await
            .unwrap()
            .map(|d| d.stage)
            .as_deref(),
        Some("ocr")
    );
    let again = cache
        .claim(p, &claim_args("ocr", "ocr-running", "w2", 10, now + 10_001))
        .await
        .unwrap();
    assert_eq!(again.len(), 2);
}

async fn heartbeat_extends_only_own_leases(cache: Arc<dyn PipelineStore>) {
    let p = "contract-heartbeat";
    let now = 4_000_000;
    staged(&cache, p, &["a", "b", "c"], now).await;
    let mine = cache
        .claim(p, &claim_args("pending", "embedding", "me", 2, now))
        .await
        .unwrap();
    let theirs = cache
        .claim(p, &claim_args("pending", "embedding", "them", 1, now))
        .await
        .unwrap();
    let hb = |ids: Vec<String>, worker: &str, stage: &str, at: u64| HeartbeatArgs {
        document_ids: ids,
        worker_id: worker.into(),
        stage: stage.into(),
        now_ms: at,
    };
    let mut all = mine.clone();
    all.extend(theirs.clone());
    all.push("missing".into());
    // Only my leases in the right stage count.
    assert_eq!(
        cache
            .heartbeat(p, &hb(all.clone(), "me", "embedding", now + 8_000))
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        cache
            .heartbeat(p, &hb(all.clone(), "me", "pending", now + 8_000))
            .await
            .unwrap(),
        0
    );
    let twice = vec![mine[0].clone(), mine[0].clone()];
    assert_eq!(
        cache
            .heartbeat(p, &hb(twice, "me", "embedding", now + 8_000))
            .await
            .unwrap(),
        1
    );
    // At now + 12 000 their lease (from now) expired; mine (from now + 8 000) holds.
    let counts = cache.stage_counts(p, now + 12_000).await.unwrap();
    assert_eq!(counts.leased, 2);
    assert_eq!(counts.counts.get(STAGE_PENDING), Some(&1));
    assert_eq!(
        cache
            .heartbeat(p, &hb(theirs, "them", "embedding", now + 12_000))
            .await
            .unwrap(),
        0
    );
    assert_eq!(cache.stage_counts(p, now + 18_000).await.unwrap().leased, 0);
}

async fn stage_of(cache: &Arc<dyn PipelineStore>, pipeline: &str, id: &str, now: u64) -> Option<String> {
    cache
        .document_stage(pipeline, id, now)
        .await
        .unwrap()
        .map(|d| d.stage)
}

/// Set-stage's filters, then `create_missing`, then leaving `failed`, on one pipeline (each step
/// starts from what the one before left).
async fn set_stage_filters_and_create_missing(cache: Arc<dyn PipelineStore>) {
    let p = "contract-set";
    let now = 5_000_000;
    staged(&cache, p, &["a", "b", "c", "d"], now).await;
    let claimed = cache
        .claim(p, &claim_args("pending", "embedding", "w1", 2, now))
        .await
        .unwrap();
    assert_eq!(claimed, vec!["a", "b"]);
    set_stage_filters_by_from_stage_and_worker(&cache, p, now).await;
    set_stage_creates_only_when_asked(&cache, p, now).await;
    set_stage_out_of_failed_clears_its_reason(&cache, p, now).await;
}

/// a, b claimed by w1; c, d pending.
async fn set_stage_filters_by_from_stage_and_worker(cache: &Arc<dyn PipelineStore>, p: &str, now: u64) {
    // from_stage filter.
    let mut args = set_args(&["a", "c"], STAGE_FAILED, now);
    args.from_stage = Some("embedding".into());
    assert_eq!(cache.set_stage(p, &args).await.unwrap(), 1);
    assert_eq!(stage_of(cache, p, "a", now).await.as_deref(), Some(STAGE_FAILED));
    assert_eq!(stage_of(cache, p, "c", now).await.as_deref(), Some(STAGE_PENDING));
    // worker_id filter: only documents leased by that worker.
    let mut args = set_args(&["b", "c", "d"], STAGE_INDEXED, now);
    args.worker_id = Some("w2".into());
    assert_eq!(cache.set_stage(p, &args).await.unwrap(), 0);
    args.worker_id = Some("w1".into());
    assert_eq!(cache.set_stage(p, &args).await.unwrap(), 1);
    let counts = cache.stage_counts(p, now).await.unwrap();
    assert_eq!(counts.counts.get(STAGE_INDEXED), Some(&1));
    assert_eq!(counts.counts.get(STAGE_FAILED), Some(&1));
    assert_eq!(counts.failed_reasons.get(FAILED_REASON_SET_STAGE), Some(&1));
    assert_eq!(counts.leased, 0);
    assert_eq!(counts.indexed_in_window, 1);
    // A repeated id counts once.
    assert_eq!(
        cache
            .set_stage(p, &set_args(&["c", "c"], STAGE_PENDING, now))
            .await
            .unwrap(),
        1
    );
}

/// Unknown ids are ignored unless `create_missing`, which stages them with no chunks.
async fn set_stage_creates_only_when_asked(cache: &Arc<dyn PipelineStore>, p: &str, now: u64) {
    assert_eq!(
        cache
            .set_stage(p, &set_args(&["new1"], "pending", now))
            .await
            .unwrap(),
        0
    );
    let mut args = set_args(&["new1", "new2", "c"], "pending", now);
    args.create_missing = true;
    assert_eq!(cache.set_stage(p, &args).await.unwrap(), 3);
    assert_eq!(
        cache.get_chunks(p, "new1").await.unwrap(),
        Some(Bytes::from_static(b"[]"))
    );
    let counts = cache.stage_counts(p, now).await.unwrap();
    assert_eq!(counts.counts.get(STAGE_PENDING), Some(&4));
}

/// Moving out of failed clears its reason; the indexed rate forgets transitions older than the
/// window (backends may bucket the window in up to 10-second steps).
async fn set_stage_out_of_failed_clears_its_reason(cache: &Arc<dyn PipelineStore>, p: &str, now: u64) {
    assert_eq!(
        cache
            .set_stage(p, &set_args(&["a"], STAGE_PENDING, now))
            .await
            .unwrap(),
        1
    );
    let counts = cache.stage_counts(p, now).await.unwrap();
    assert!(counts.failed_reasons.is_empty());
    assert_eq!(counts.counts.values().sum::<u64>(), 6);
    let later = now + (RATE_WINDOW_SECONDS + 11) * 1000;
    assert_eq!(cache.stage_counts(p, later).await.unwrap().indexed_in_window, 0);
}

async fn unknown_pipeline_is_an_error(cache: Arc<dyn PipelineStore>) {
    let p = "contract-missing";
    let nf = Err::<(), _>(CacheError::PipelineNotFound(p.into()));
    assert_eq!(cache.stage_document(p, "d", chunks("x"), 1).await, nf);
    assert_eq!(cache.get_chunks(p, "d").await.map(|_| ()), nf);
    assert_eq!(cache.document_stage(p, "d", 1).await.map(|_| ()), nf);
    assert_eq!(
        cache
            .claim(p, &claim_args("pending", "embedding", "w", 1, 1))
            .await
            .map(|_| ()),
        nf
    );
    let hb = HeartbeatArgs {
        document_ids: vec!["d".into()],
        worker_id: "w".into(),
        stage: "embedding".into(),
        now_ms: 1,
    };
    assert_eq!(cache.heartbeat(p, &hb).await.map(|_| ()), nf);
    assert_eq!(
        cache.set_stage(p, &set_args(&["d"], "x", 1)).await.map(|_| ()),
        nf
    );
    assert_eq!(cache.stage_counts(p, 1).await.map(|_| ()), nf);
    assert!(cache.get_pipeline(p).await.unwrap().is_none());
}

/// 8 concurrent claimers over 2,000 documents: every document is handed out exactly once.
async fn concurrent_claimers_never_share(cache: Arc<dyn PipelineStore>) {
    let p = "contract-concurrent";
    let now = 6_000_000;
    cache.create_pipeline(meta(p)).await.unwrap();
    for i in 0..2000 {
        cache
            .stage_document(p, &format!("doc-{i:05}"), chunks("x"), now)
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for w in 0..8 {
        let cache = cache.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for _ in 0..1000 {
                let got = cache
                    .claim(p, &claim_args("pending", "embedding", &format!("w{w}"), 7, now))
                    .await
                    .unwrap();
                if got.is_empty() {
                    break;
                }
                mine.extend(got);
                tokio::task::yield_now().await;
            }
            mine
        }));
    }
    let mut seen = HashSet::new();
    let mut total = 0;
    for t in tasks {
        for doc in t.await.unwrap() {
            total += 1;
            assert!(seen.insert(doc.clone()), "{doc} was claimed twice");
        }
    }
    assert_eq!(total, 2000);
    let counts = cache.stage_counts(p, now).await.unwrap();
    assert_eq!(counts.counts.get("embedding"), Some(&2000));
    assert_eq!(counts.leased, 2000);
}

async fn set_stage_only_version_skips_restaged_documents(cache: Arc<dyn PipelineStore>) {
    let p = "contract-version";
    let now = 7_000_000;
    staged(&cache, p, &["d"], now).await;
    let first = cache.document_stage(p, "d", now).await.unwrap().unwrap();
    // Claims and set-stage keep the version; only staging changes it.
    cache
        .claim(p, &claim_args("pending", "embedding", "w", 1, now))
        .await
        .unwrap();
    assert_eq!(
        cache.document_stage(p, "d", now).await.unwrap().unwrap().version,
        first.version
    );
    cache.stage_document(p, "d", chunks("again"), now).await.unwrap();
    let second = cache.document_stage(p, "d", now).await.unwrap().unwrap();
    assert_ne!(second.version, first.version);
    let mut args = set_args(&["d"], STAGE_INDEXED, now);
    args.only_version = Some(first.version);
    assert_eq!(cache.set_stage(p, &args).await.unwrap(), 0);
    assert_eq!(count(&cache, p, STAGE_PENDING, now).await, 1);
    args.only_version = Some(second.version);
    assert_eq!(cache.set_stage(p, &args).await.unwrap(), 1);
    assert_eq!(count(&cache, p, STAGE_INDEXED, now).await, 1);
}

/// Leases that expire in different minutes, checked at exact instants (the clock is an
/// argument), then a pipeline left alone for days.
async fn leases_expire_across_minutes_and_after_days_idle(cache: Arc<dyn PipelineStore>) {
    let p = "contract-minutes";
    // 1 s before a minute boundary.
    let t0 = 60_000 * 1_000_000 - 1_000;
    staged(&cache, p, &["a", "b", "c", "d"], t0).await;
    let mut args = claim_args("pending", "embedding", "w", 1, t0);
    for (i, lease_ms) in [500u64, 30_000, 90_000, 3_600_000].into_iter().enumerate() {
        args.lease_ms = lease_ms;
        args.now_ms = t0 + i as u64;
        assert_eq!(cache.claim(p, &args).await.unwrap().len(), 1);
    }
    let leased = |t: u64| {
        let cache = cache.clone();
        async move { cache.stage_counts(p, t).await.unwrap().leased }
    };
    assert_eq!(leased(t0 + 499).await, 4);
    assert_eq!(
        leased(t0 + 500).await,
        3,
        "the 500 ms lease expires in the next minute"
    );
    assert_eq!(leased(t0 + 30_000).await, 3);
    assert_eq!(leased(t0 + 30_001).await, 2);
    assert_eq!(leased(t0 + 90_001).await, 2);
    assert_eq!(leased(t0 + 90_002).await, 1);
    assert_eq!(count(&cache, p, STAGE_PENDING, t0 + 90_002).await, 3);
    // Three days of nothing: the last lease is returned and the pipeline answers as usual.
    let later = t0 + 3 * 86_400_000;
    let counts = cache.stage_counts(p, later).await.unwrap();
    assert_eq!(counts.leased, 0);
    assert_eq!(counts.counts.get(STAGE_PENDING), Some(&4));
    let mut again = claim_args("pending", "embedding", "w2", 10, later);
    again.lease_ms = 1_000;
    assert_eq!(cache.claim(p, &again).await.unwrap().len(), 4);
    assert_eq!(cache.stage_counts(p, later + 1_000).await.unwrap().leased, 0);
}

/// Heartbeats move leases forward without leaving earlier expiries behind: a document expires
/// exactly once, at its latest lease, and a re-claimed document is not returned by its old lease.
async fn heartbeats_and_reclaims_keep_expiry_exact(cache: Arc<dyn PipelineStore>) {
    let p = "contract-beats";
    let now = 9_000_000_000;
    let ids: Vec<String> = (0..40).map(|i| format!("h{i:02}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    staged(&cache, p, &refs, now).await;
    let mut args = claim_args("pending", "embedding", "w", 40, now);
    args.lease_ms = 20_000;
    assert_eq!(cache.claim(p, &args).await.unwrap().len(), 40);
    for beat in 1..=10u64 {
        let hb = HeartbeatArgs {
            document_ids: ids.clone(),
            worker_id: "w".into(),
            stage: "embedding".into(),
            now_ms: now + beat * 10_000,
        };
        assert_eq!(cache.heartbeat(p, &hb).await.unwrap(), 40);
    }
    // Last beat at now + 100 s: leases end at now + 120 s.
    assert_eq!(cache.stage_counts(p, now + 119_999).await.unwrap().leased, 40);
    // Half of them finish and are re-staged and claimed again with a long lease.
    let half: Vec<&str> = refs[..20].to_vec();
    assert_eq!(
        cache
            .set_stage(p, &set_args(&half, STAGE_PENDING, now + 110_000))
            .await
            .unwrap(),
        20
    );
    let mut args = claim_args("pending", "embedding", "w2", 40, now + 110_000);
    args.lease_ms = 600_000;
    assert_eq!(cache.claim(p, &args).await.unwrap().len(), 20);
    let counts = cache.stage_counts(p, now + 120_000).await.unwrap();
    assert_eq!(counts.leased, 20, "only the other half expired");
    assert_eq!(counts.counts.get(STAGE_PENDING), Some(&20));
    assert_eq!(counts.counts.get("embedding"), Some(&20));
}
