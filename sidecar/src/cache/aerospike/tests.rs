//! The Aerospike backend against the wire-level double (and, with `AEROSPIKE_HOSTS`, a real
//! cluster): the contract, failure handling, and the "nothing half-written" invariants.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aerospike_double::Double;

use super::*;
use crate::cache::{Attributes, DocId, DocumentStore, PipelineStore, StoreBackend};

fn settings(hosts: String, namespace: &str, run: &str) -> AerospikeSettings {
    AerospikeSettings {
        hosts,
        namespace: namespace.to_owned(),
        set_prefix: format!("t{run}_tpuf_"),
        pipeline_set_prefix: format!("t{run}_pl_"),
        op_timeout: Duration::from_millis(2000),
        breaker_open_for: BREAKER_OPEN_FOR,
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

async fn double() -> Double {
    Double::start("127.0.0.1:0", &["hevlayer"]).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aerospike_meets_the_contract_on_the_wire_double() {
    let double = double().await;
    let cache = connected(settings(double.hosts(), "hevlayer", "0")).await;
    assert!(cache.health().await.connected);
    crate::cache::contract::run_all(|| cache.clone()).await;
    assert!(double.commands_served() > 10_000);
}

/// Runs against the cluster `AEROSPIKE_HOSTS` names (in fresh sets); `make test` runs it whenever
/// `AEROSPIKE_HOSTS` is set, by hand:
/// `AEROSPIKE_HOSTS=host:3000 cargo test -p hevlayer-sidecar -- --ignored real_cluster`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a real Aerospike cluster in AEROSPIKE_HOSTS"]
async fn aerospike_meets_the_contract_on_a_real_cluster() {
    let hosts = std::env::var("AEROSPIKE_HOSTS")
        .expect("AEROSPIKE_HOSTS must name the cluster this ignored test runs against");
    let namespace = std::env::var("AEROSPIKE_NAMESPACE").unwrap_or_else(|_| "hevlayer".into());
    let run = format!("{:x}", crate::cache::now_ms());
    let cache = connected(settings(hosts, &namespace, &run)).await;
    crate::cache::contract::run_all(|| cache.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_recovers_when_the_cluster_comes_back() {
    let double = double().await;
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
    let _back = Double::start(&addr, &["hevlayer"]).await.unwrap();
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

    let double = double().await;
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

// ------------------------------------------------------------------ nothing half-written

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::cache::{ClaimArgs, HeartbeatArgs, PipelineMeta, SetStageArgs};

const T0: u64 = 1_000_000_000_000;
const LEASE_MS: u64 = 60_000;
/// Every id the cut scenarios may create.
const IDS: [&str; 9] = ["a0", "a1", "a2", "a3", "a4", "a5", "new", "x1", "x2"];

fn meta(id: &str) -> PipelineMeta {
    PipelineMeta {
        id: id.into(),
        target_namespace: "t".into(),
        distance_metric: "cosine_distance".into(),
        created_at: "2026-01-01T00:00:00Z".into(),
    }
}

fn claim(stage: &str, to: &str, worker: &str, limit: usize, now_ms: u64) -> ClaimArgs {
    ClaimArgs {
        stage: stage.into(),
        claim_stage: to.into(),
        worker_id: worker.into(),
        limit,
        lease_ms: LEASE_MS,
        document_id_prefix: None,
        now_ms,
    }
}

fn set_stage(ids: &[&str], stage: &str, create_missing: bool, now_ms: u64) -> SetStageArgs {
    SetStageArgs {
        document_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
        stage: stage.into(),
        from_stage: None,
        worker_id: None,
        create_missing,
        only_version: None,
        now_ms,
    }
}

/// The operations the cut test interrupts.
#[derive(Debug, Clone, Copy)]
enum Op {
    Create,
    Delete,
    StageNew,
    Restage,
    Claim,
    SetStage,
    SetStageCreate,
    Heartbeat,
    Expire,
}

/// A pipeline with six documents: a0, a1 claimed by w1 (60 s leases), a2..a5 pending.
async fn setup(cache: &Arc<dyn PipelineStore>, p: &str) {
    cache.create_pipeline(meta(p)).await.unwrap();
    for id in &IDS[..6] {
        cache
            .stage_document(p, id, Bytes::from_static(b"[]"), T0)
            .await
            .unwrap();
    }
    assert_eq!(
        cache
            .claim(p, &claim("pending", "embedding", "w1", 2, T0))
            .await
            .unwrap()
            .len(),
        2
    );
}

async fn run(cache: &Arc<dyn PipelineStore>, p: &str, op: Op) -> CacheResult<()> {
    let now = T0 + 1_000;
    match op {
        Op::Create => cache.create_pipeline(meta(&format!("{p}-new"))).await,
        Op::Delete => cache.delete_pipeline(p).await.map(|_| ()),
        Op::StageNew => {
            cache
                .stage_document(p, "new", Bytes::from_static(b"[1]"), now)
                .await
        }
        Op::Restage => {
            cache
                .stage_document(p, "a0", Bytes::from_static(b"[2]"), now)
                .await
        }
        Op::Claim => cache
            .claim(p, &claim("pending", "embedding", "w2", 3, now))
            .await
            .map(|_| ()),
        Op::SetStage => cache
            .set_stage(p, &set_stage(&["a0", "a3", "a4"], "failed", false, now))
            .await
            .map(|_| ()),
        Op::SetStageCreate => cache
            .set_stage(p, &set_stage(&["x1", "x2", "a5"], "indexed", true, now))
            .await
            .map(|_| ()),
        Op::Heartbeat => cache
            .heartbeat(
                p,
                &HeartbeatArgs {
                    document_ids: vec!["a0".into(), "a1".into()],
                    worker_id: "w1".into(),
                    stage: "embedding".into(),
                    now_ms: T0 + 30_000,
                },
            )
            .await
            .map(|_| ()),
        // The two leases run out: status returns them.
        Op::Expire => cache.stage_counts(p, T0 + LEASE_MS + 1).await.map(|_| ()),
    }
}

/// Every document's stage as read one by one.
async fn truth(cache: &Arc<dyn PipelineStore>, p: &str, at: u64) -> BTreeMap<String, BTreeSet<String>> {
    let mut by_stage: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for id in IDS {
        if let Some(doc) = cache.document_stage(p, id, at).await.unwrap() {
            by_stage.entry(doc.stage).or_default().insert(id.to_owned());
        }
    }
    by_stage
}

fn histogram(by_stage: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, u64> {
    by_stage
        .iter()
        .map(|(s, ids)| (s.clone(), ids.len() as u64))
        .collect()
}

/// The invariants after a cut (on a healed node): counts exact right away and later, every
/// document claimable from its stage once every lease ran out, listing consistent.
async fn check(cache: &Arc<dyn PipelineStore>, p: &str, context: &str) {
    let listed: BTreeSet<String> = cache
        .list_pipelines()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    for id in [p.to_owned(), format!("{p}-new")] {
        let exists = cache.get_pipeline(&id).await.unwrap().is_some();
        assert_eq!(listed.contains(&id), exists, "{context}: listing of {id}");
    }
    if cache.get_pipeline(p).await.unwrap().is_none() {
        return;
    }
    for at in [T0 + 2_000, T0 + 10 * LEASE_MS] {
        let expected = truth(cache, p, at).await;
        let counts = cache.stage_counts(p, at).await.unwrap();
        assert_eq!(counts.counts, histogram(&expected), "{context}: counts at {at}");
    }
    // Every lease has run out: each document is claimable from the stage it is in.
    let late = T0 + 10 * LEASE_MS;
    let expected = truth(cache, p, late).await;
    assert_eq!(cache.stage_counts(p, late).await.unwrap().leased, 0, "{context}");
    for (stage, ids) in &expected {
        let got: BTreeSet<String> = cache
            .claim(p, &claim(stage, "checked", "checker", 100, late))
            .await
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(&got, ids, "{context}: claimable from {stage}");
    }
}

async fn heal(double: &Double, cache: &Arc<AerospikeCache>) {
    double.cut_after(None, false);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cache.health().await.connected {
        assert!(
            Instant::now() < deadline,
            "the backend did not recover from a cut"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Cuts each operation after every one of its commands (the command dropped before or after the
/// node applied it), then checks the invariants.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_after_any_command_leaves_exact_counts_and_claimable_documents() {
    let double = double().await;
    let mut s = settings(double.hosts(), "hevlayer", "cut");
    s.breaker_open_for = Duration::ZERO;
    s.op_timeout = Duration::from_millis(500);
    let backend = connected(s).await;
    let cache = backend.clone() as Arc<dyn PipelineStore>;
    let ops = [
        Op::Create,
        Op::Delete,
        Op::StageNew,
        Op::Restage,
        Op::Claim,
        Op::SetStage,
        Op::SetStageCreate,
        Op::Heartbeat,
        Op::Expire,
    ];
    let mut cuts = 0;
    for op in ops {
        // How many commands the operation takes uncut.
        let p = format!("{op:?}-whole");
        setup(&cache, &p).await;
        let before = double.commands_served();
        run(&cache, &p, op).await.unwrap();
        let commands = double.commands_served() - before;
        check(&cache, &p, &format!("{op:?} uncut")).await;
        for k in 0..commands {
            for in_doubt in [false, true] {
                let p = format!("{op:?}-{k}-{in_doubt}");
                setup(&cache, &p).await;
                double.cut_after(Some(k), in_doubt);
                let _ = run(&cache, &p, op).await;
                heal(&double, &backend).await;
                check(
                    &cache,
                    &p,
                    &format!("{op:?} cut after {k} commands (in doubt: {in_doubt})"),
                )
                .await;
                cuts += 1;
            }
        }
    }
    assert!(cuts > 100, "{cuts} cuts");
}

// ------------------------------------------------------------------ leases

/// Entries of every lease-index bucket of a minute.
async fn bucket_sizes(cache: &AerospikeCache, p: &str, minute: i64) -> Vec<usize> {
    let (pipe, _) = cache.open_pipeline(p, |_| Vec::new()).await.unwrap();
    let mut sizes = Vec::new();
    for shard in 0..super::leases::LEASE_SHARDS {
        let rec = cache
            .get(&pipe.set, pipe.bucket_key(minute, shard), Bins::All)
            .await
            .unwrap();
        sizes.push(rec.map_or(0, |r| map_entries(r.bins.get("e")).len()));
    }
    sizes
}

/// A pipeline left alone for three days costs as many commands as it has expired leases, not
/// one per elapsed minute; and the answer comes well within the default 200 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_after_days_idle_costs_per_lease_not_per_minute() {
    let double = double().await;
    let mut s = settings(double.hosts(), "hevlayer", "idle");
    s.op_timeout = Duration::from_millis(200);
    let cache = connected(s).await as Arc<dyn PipelineStore>;
    cache.create_pipeline(meta("idle")).await.unwrap();
    for i in 0..10 {
        cache
            .stage_document("idle", &format!("d{i}"), Bytes::from_static(b"[]"), T0)
            .await
            .unwrap();
    }
    let mut args = claim("pending", "embedding", "w", 10, T0);
    args.lease_ms = 1_000;
    assert_eq!(cache.claim("idle", &args).await.unwrap().len(), 10);
    let later = T0 + 3 * 86_400_000;
    let before = double.commands_served();
    let started = Instant::now();
    let counts = cache.stage_counts("idle", later).await.unwrap();
    let commands = double.commands_served() - before;
    assert_eq!(counts.counts.get("pending"), Some(&10));
    assert_eq!(counts.leased, 0);
    assert!(commands < 120, "{commands} commands for 10 expired leases");
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    // And once returned, a further idle period costs nothing extra.
    let before = double.commands_served();
    cache.stage_counts("idle", later + 86_400_000).await.unwrap();
    assert!(double.commands_served() - before <= 3);
}

/// Leases of one minute spread over small records, and heartbeats replace their entries instead
/// of adding to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_index_records_stay_small_under_claims_and_heartbeats() {
    let double = double().await;
    let backend = connected(settings(double.hosts(), "hevlayer", "small")).await;
    let cache = backend.clone() as Arc<dyn PipelineStore>;
    cache.create_pipeline(meta("small")).await.unwrap();
    let ids: Vec<String> = (0..1600).map(|i| format!("doc-{i:04}")).collect();
    let mut stagers = Vec::new();
    for part in ids.chunks(200) {
        let (cache, part) = (cache.clone(), part.to_vec());
        stagers.push(tokio::spawn(async move {
            for id in part {
                cache
                    .stage_document("small", &id, Bytes::from_static(b"[]"), T0)
                    .await
                    .unwrap();
            }
        }));
    }
    for s in stagers {
        s.await.unwrap();
    }
    let args = claim("pending", "embedding", "w", 2000, T0);
    assert_eq!(cache.claim("small", &args).await.unwrap().len(), 1600);
    let minute = i64::try_from((T0 + LEASE_MS) / 60_000).unwrap();
    let sizes = bucket_sizes(&backend, "small", minute).await;
    assert_eq!(sizes.iter().sum::<usize>(), 1600);
    assert!(sizes.iter().all(|n| *n < 320), "{sizes:?}");
    // Ten heartbeats of 100 documents inside the same minute: still one entry per lease.
    let beating: Vec<String> = ids[..100].to_vec();
    for beat in 1..=10 {
        let hb = HeartbeatArgs {
            document_ids: beating.clone(),
            worker_id: "w".into(),
            stage: "embedding".into(),
            now_ms: T0 + beat,
        };
        assert_eq!(cache.heartbeat("small", &hb).await.unwrap(), 100);
    }
    let sizes = bucket_sizes(&backend, "small", minute).await;
    assert_eq!(
        sizes.iter().sum::<usize>(),
        1600,
        "heartbeats left stale entries: {sizes:?}"
    );
    // Expiry empties the minute and removes it from the directory.
    let counts = cache.stage_counts("small", T0 + 10 * LEASE_MS).await.unwrap();
    assert_eq!(counts.counts.get("pending"), Some(&1600));
    assert_eq!(
        bucket_sizes(&backend, "small", minute)
            .await
            .iter()
            .sum::<usize>(),
        0
    );
}

/// Generations are 16-bit and wrap: every generation-checked step keeps working across 65535 → 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_wraparound_is_harmless() {
    let double = double().await;
    let s = settings(double.hosts(), "hevlayer", "wrap");
    let set = set_name(&s.pipeline_set_prefix, "wrap");
    let cache = connected(s).await as Arc<dyn PipelineStore>;
    cache.create_pipeline(meta("wrap")).await.unwrap();
    for id in ["a", "b", "c"] {
        cache
            .stage_document("wrap", id, Bytes::from_static(b"[]"), T0)
            .await
            .unwrap();
    }
    double.set_generations("hevlayer", &set, 65_535);
    let got = cache
        .claim("wrap", &claim("pending", "embedding", "w", 2, T0))
        .await
        .unwrap();
    assert_eq!(got.len(), 2);
    double.set_generations("hevlayer", &set, 65_535);
    let hb = HeartbeatArgs {
        document_ids: got.clone(),
        worker_id: "w".into(),
        stage: "embedding".into(),
        now_ms: T0 + 1,
    };
    assert_eq!(cache.heartbeat("wrap", &hb).await.unwrap(), 2);
    double.set_generations("hevlayer", &set, 65_535);
    assert_eq!(
        cache
            .set_stage(
                "wrap",
                &set_stage(&[got[0].as_str(), "c"], "indexed", false, T0 + 2)
            )
            .await
            .unwrap(),
        2
    );
    double.set_generations("hevlayer", &set, 65_534);
    cache
        .stage_document("wrap", "c", Bytes::from_static(b"[1]"), T0 + 3)
        .await
        .unwrap();
    let counts = cache.stage_counts("wrap", T0 + 3).await.unwrap();
    assert_eq!(counts.counts.get("indexed"), Some(&1));
    assert_eq!(counts.counts.get("embedding"), Some(&1));
    assert_eq!(counts.counts.get("pending"), Some(&1));
    assert_eq!(
        cache
            .claim("wrap", &claim("pending", "embedding", "w2", 5, T0 + 4))
            .await
            .unwrap(),
        vec!["c"]
    );
}

// ------------------------------------------------------------------ breaker

/// A node that hangs (accepts, never answers) opens the breaker: the first call costs one
/// timeout, the next ones fail fast, `/healthz` says so; a probe abandoned half-way counts as a
/// failure and does not leave the breaker half-open for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_node_opens_the_breaker_and_an_abandoned_probe_does_not_wedge_it() {
    let double = double().await;
    let mut s = settings(double.hosts(), "hevlayer", "hung");
    s.op_timeout = Duration::from_millis(150);
    s.breaker_open_for = Duration::from_millis(300);
    let cache = connected(s).await;
    let id = DocId::Num(1);
    assert!(cache.get_document("ns", &id).await.unwrap().is_none());
    double.set_stalled(true);
    let started = Instant::now();
    assert!(cache.get_document("ns", &id).await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(cache.breaker_state(), BreakerState::Open);
    let health = cache.health().await;
    assert!(!health.connected, "{health:?}");
    let started = Instant::now();
    let err = cache.get_document("ns", &id).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(20));
    assert!(
        matches!(&err, CacheError::Unavailable(m) if m.contains("breaker")),
        "{err:?}"
    );

    // Half-open: the probe is abandoned (its caller gave up) before the node answers.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(cache.breaker_state(), BreakerState::HalfOpen);
    assert!(!cache.health().await.connected, "half-open is not healthy");
    tokio::time::sleep(Duration::from_millis(350)).await;
    let abandoned = tokio::time::timeout(Duration::from_millis(30), cache.get_document("ns", &id)).await;
    assert!(abandoned.is_err(), "the stalled probe was cut by its caller");
    assert_eq!(
        cache.breaker_state(),
        BreakerState::Open,
        "an abandoned probe is a failure"
    );

    // The node comes back: the next probe (here: the health check) closes the breaker.
    double.set_stalled(false);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let health = cache.health().await;
    assert!(health.connected, "{health:?}");
    assert_eq!(cache.breaker_state(), BreakerState::Closed);
    assert!(cache.get_document("ns", &id).await.unwrap().is_none());
}

/// A claim of 100 is about 2.5 commands per document (journal entry, document write, and a
/// shared close), batched and run in parallel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_of_100_costs_about_three_commands_per_document() {
    let double = double().await;
    let cache = connected(settings(double.hosts(), "hevlayer", "cost")).await as Arc<dyn PipelineStore>;
    cache.create_pipeline(meta("cost")).await.unwrap();
    for i in 0..150 {
        cache
            .stage_document("cost", &format!("d{i:03}"), Bytes::from_static(b"[]"), T0)
            .await
            .unwrap();
    }
    let before = double.commands_served();
    let started = Instant::now();
    let got = cache
        .claim("cost", &claim("pending", "embedding", "w", 100, T0))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    let commands = double.commands_served() - before;
    assert_eq!(got.len(), 100);
    println!("claim of 100: {commands} commands, {elapsed:?}");
    assert!(commands <= 300, "{commands} commands");
}
