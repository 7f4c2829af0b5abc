//! Sidecar benchmark: stage, get-chunks and claim throughput and latency over loopback on the
//! embedded store, next to the same server's `/healthz` as the baseline, plus stage latency with
//! 1,000 vs 1,000,000 staged documents, memory per staged document, and the latency of the mirror
//! callout (`POST /internal/v1/mirror`) for a 1-row and a 10,000-row write.
//!
//! How the size comparison stays honest: the stage scenarios *re-stage* documents already in
//! their pipeline (ids visited in a fixed pseudo-random order over all of them), so "1,000
//! staged" holds exactly 1,000 documents for the whole run and "1,000,000 staged" exactly
//! 1,000,000 — staging new ids would grow the small pipeline by as many documents as the run
//! sends (tens of thousands) and compare nothing in particular. Re-staging is the full stage path
//! (parse, validate, serialise the chunks, replace the document, re-index it as pending).
//!
//! Memory per staged document is measured on documents staged over HTTP (`PUT`, the path clients
//! use), as the growth of the process's RSS divided by the number staged: it includes the
//! request buffers and allocator slack the server path leaves behind, not just the store's own
//! accounting (printed next to it).
//!
//! The mirror callout is on every write's critical path (the filter holds the client's response
//! until the sidecar answers, bounded by its 200 ms callout timeout), so it is measured as the
//! filter sees it: one request at a time on one connection, with the body the filter would send
//! (the stamped write without vectors: `{"id":i,"title":"row i","_hevlayer_upserted_at":..}` rows,
//! the gateway benchmark's write minus its vectors). Each request carries a newer stamp, so every
//! op takes effect: the 10,000-row upsert replaces 10,000 cached documents, the patch merges into
//! them.
//!
//! The write callouts (`writes`): a 10,000-id eviction and a 10,000-row batch mirror, as the
//! gateway sends them for one large write, with the sidecar's CPU time per callout (the sidecar
//! runs on a runtime of its own, so its threads can be told apart from the load generator's).
//!
//! `cargo run --release -p hevlayer-sidecar --bin sidecar-bench -- [--seconds N] [--concurrency N]
//! [--large N] [--writes-only] [--strict]`

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use hevlayer_sidecar::cache::embedded::EmbeddedCache;
use hevlayer_sidecar::cache::{PipelineMeta, PipelineStore, Stores};
use hevlayer_sidecar::config::Config;
use hevlayer_sidecar::RunningSidecar;
use hevlayer_sidecar_api::{mirror_body, MIRROR_PATH, STAMP_ATTRIBUTE};
use tokio::runtime::Handle;

#[path = "sidecar-bench/writes.rs"]
mod writes;

#[derive(Parser)]
struct Args {
    /// Seconds per measured scenario.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Concurrent client connections.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Staged documents for the large-pipeline stage latency and memory check.
    #[arg(long, default_value_t = 1_000_000)]
    large: usize,
    /// Exit non-zero when a target is missed.
    #[arg(long)]
    strict: bool,
    /// Run only the write callouts (eviction and batch mirror): for before/after comparisons.
    #[arg(long)]
    writes_only: bool,
}

/// Rows of the large mirror scenarios.
const MIRROR_ROWS: usize = 10_000;
/// Stamp of the first mirror request (2026-01-01); each request adds 1.
const MIRROR_STAMP: u64 = 1_767_225_600_000;
/// The large-mirror p99 target: a quarter of the filter's 200 ms callout timeout.
const MIRROR_P99_TARGET_US: u64 = 50_000;
/// Bytes of chunk text per document (the issue's 2 KB documents).
const DOC_TEXT_BYTES: usize = 2048;
/// Odd multiplier of the order documents are visited in (a permutation of `0..n` for any n
/// not sharing its factors; the index is reduced modulo n anyway).
const STRIDE: u64 = 0x9e37_79b9_7f4a_7c15;

struct Stats {
    name: String,
    requests: u64,
    elapsed: Duration,
    p50_us: u64,
    p99_us: u64,
}

impl Stats {
    /// The figures of one scenario from its request latencies (µs, any order).
    fn of(name: &str, mut latencies: Vec<u64>, elapsed: Duration) -> Self {
        latencies.sort_unstable();
        Stats {
            name: name.to_owned(),
            requests: latencies.len() as u64,
            elapsed,
            p50_us: percentile(&latencies, 0.50),
            p99_us: percentile(&latencies, 0.99),
        }
    }

    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn doc_body() -> String {
    let text = "x".repeat(DOC_TEXT_BYTES);
    format!(r#"{{"chunks":[{{"id":"c0","text":"{text}"}}]}}"#)
}

#[derive(Clone, Copy)]
enum Scenario {
    Health,
    /// Re-stage one of the pipeline's `preloaded` documents `pre-<i>`.
    Restage,
    GetChunks,
    Claim,
}

/// The `n`-th document of `count` in the benchmark's visiting order.
fn nth_doc(n: u64, count: usize) -> u64 {
    n.wrapping_mul(STRIDE) % count.max(1) as u64
}

/// Runs `scenario` with `concurrency` tasks for `seconds`.
async fn run(
    name: &str,
    base: &str,
    pipeline: &str,
    scenario: Scenario,
    concurrency: usize,
    duration: Duration,
    preloaded: usize,
) -> Result<Stats, String> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(concurrency)
        .build()
        .map_err(|e| e.to_string())?;
    let counter = Arc::new(AtomicU64::new(0));
    let body = Arc::new(doc_body());
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let client = client.clone();
        let counter = counter.clone();
        let body = body.clone();
        let base = base.to_owned();
        let pipeline = pipeline.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(100_000);
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let request = match scenario {
                    Scenario::Health => client.get(format!("{base}/healthz")),
                    Scenario::Restage => client
                        .put(format!(
                            "{base}/v2/pipelines/{pipeline}/documents/pre-{}",
                            nth_doc(n, preloaded)
                        ))
                        .header("content-type", "application/json")
                        .body(body.as_bytes().to_vec()),
                    Scenario::GetChunks => {
                        let doc = nth_doc(n, preloaded);
                        client.get(format!(
                            "{base}/v2/pipelines/{pipeline}/documents/pre-{doc}/chunks"
                        ))
                    }
                    Scenario::Claim => client
                        .post(format!("{base}/v2/pipelines/{pipeline}/claim"))
                        .header("content-type", "application/json")
                        .body(format!(r#"{{"worker_id":"w{worker}","limit":1}}"#)),
                };
                let t = Instant::now();
                match request.send().await {
                    Ok(resp) if resp.status().is_success() => {
                        let _ = resp.bytes().await;
                        latencies.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
                    }
                    _ => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.map_err(|e| e.to_string())?;
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    if errors > 0 {
        return Err(format!("{name}: {errors} requests failed"));
    }
    Ok(Stats::of(name, all, elapsed))
}

/// A stamped write of `rows` rows as the filter mirrors it (no vectors): `op` is `upsert_rows` or
/// `patch_rows`.
fn mirror_write(op: &str, rows: usize, stamp: u64) -> Vec<u8> {
    let word = if op == "patch_rows" { "patched" } else { "row" };
    let mut out = format!(r#"{{"{op}":["#);
    for i in 0..rows {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            r#"{{"id":{i},"title":"{word} {i}","{STAMP_ATTRIBUTE}":{stamp}}}"#
        ));
    }
    out.push_str("]}");
    out.into_bytes()
}

/// Sends `write` as mirror callouts one at a time for `duration` (at least `min` times), each
/// with the next stamp from `stamp`, and checks every answer applied `rows` ops.
async fn run_mirror(
    name: &str,
    base: &str,
    write: &[u8],
    rows: u64,
    stamp: &AtomicU64,
    duration: Duration,
    min: usize,
) -> Result<Stats, String> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!("{base}{MIRROR_PATH}");
    let expected = format!(r#"{{"applied":{rows}}}"#);
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed() < duration || latencies.len() < min {
        let body = mirror_body("bench", stamp.fetch_add(1, Ordering::Relaxed), write, None);
        let t = Instant::now();
        let resp = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| format!("{name}: {e}"))?;
        latencies.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
        if !status.is_success() || text != expected {
            return Err(format!("{name}: answered {status} {text} (expected {expected})"));
        }
    }
    let elapsed = started.elapsed();
    Ok(Stats::of(name, latencies, elapsed))
}

/// The three mirror scenarios, in order (the patch merges into what the large upsert cached).
async fn mirror_scenarios(base: &str, seconds: Duration) -> Result<[Stats; 3], String> {
    let stamp = AtomicU64::new(MIRROR_STAMP);
    let one = mirror_write("upsert_rows", 1, MIRROR_STAMP);
    let upsert = mirror_write("upsert_rows", MIRROR_ROWS, MIRROR_STAMP);
    let patch = mirror_write("patch_rows", MIRROR_ROWS, MIRROR_STAMP);
    println!(
        "mirror callouts: one at a time on one connection; the 10,000-row upsert body is {} bytes",
        upsert.len()
    );
    let rows = MIRROR_ROWS as u64;
    Ok([
        run_mirror("mirror upsert (1 row)", base, &one, 1, &stamp, seconds, 100).await?,
        run_mirror(
            "mirror upsert (10,000 rows)",
            base,
            &upsert,
            rows,
            &stamp,
            seconds,
            30,
        )
        .await?,
        run_mirror(
            "mirror patch (10,000 rows)",
            base,
            &patch,
            rows,
            &stamp,
            seconds,
            30,
        )
        .await?,
    ])
}

fn print_latency(stats: &Stats) {
    println!(
        "{:<28} {:>9} req {:>10.0} req/s                    p50 {:>6} us   p99 {:>6} us",
        stats.name,
        stats.requests,
        stats.rps(),
        stats.p50_us,
        stats.p99_us
    );
}

async fn preload(cache: &EmbeddedCache, pipeline: &str, count: usize) -> Result<(), String> {
    let text = "y".repeat(DOC_TEXT_BYTES);
    for i in 0..count {
        // A distinct allocation per document, as a real stage makes.
        let chunks = Bytes::copy_from_slice(format!(r#"[{{"id":"c0","text":"{text}"}}]"#).as_bytes());
        cache
            .stage_document(pipeline, &format!("pre-{i}"), chunks, 0)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Stages `count` documents `pre-0..` over HTTP, `concurrency` requests at a time.
async fn preload_http(base: &str, pipeline: &str, count: usize, concurrency: usize) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(concurrency)
        .build()
        .map_err(|e| e.to_string())?;
    let next = Arc::new(AtomicU64::new(0));
    let body = Arc::new(doc_body());
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, next, body) = (client.clone(), next.clone(), body.clone());
        let url = format!("{base}/v2/pipelines/{pipeline}/documents/pre-");
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count as u64 {
                    return Ok::<(), String>(());
                }
                let resp = client
                    .put(format!("{url}{i}"))
                    .header("content-type", "application/json")
                    .body(body.as_bytes().to_vec())
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if !resp.status().is_success() {
                    return Err(format!("preload: stage answered {}", resp.status()));
                }
                let _ = resp.bytes().await;
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn meta(id: &str) -> PipelineMeta {
    PipelineMeta {
        id: id.into(),
        target_namespace: "bench".into(),
        distance_metric: "cosine_distance".into(),
        created_at: "1970-01-01T00:00:00Z".into(),
    }
}

fn print(stats: &Stats, baseline: f64) {
    println!(
        "{:<28} {:>9} req {:>10.0} req/s {:>6.1}% of /healthz   p50 {:>6} us   p99 {:>6} us",
        stats.name,
        stats.requests,
        stats.rps(),
        100.0 * stats.rps() / baseline,
        stats.p50_us,
        stats.p99_us
    );
}

/// Where the scenarios run: the sidecar's URL, the connections and the time per scenario.
struct Bench {
    base: String,
    concurrency: usize,
    seconds: Duration,
}

impl Bench {
    /// Runs one HTTP scenario and prints its row against `baseline` (req/s of /healthz); the
    /// baseline run itself passes 0 and prints against its own rate.
    async fn scenario(
        &self,
        name: &str,
        pipeline: &str,
        scenario: Scenario,
        preloaded: usize,
        baseline: f64,
    ) -> Result<Stats, String> {
        let stats = run(
            name,
            &self.base,
            pipeline,
            scenario,
            self.concurrency,
            self.seconds,
            preloaded,
        )
        .await?;
        print(&stats, if baseline > 0.0 { baseline } else { stats.rps() });
        Ok(stats)
    }
}

/// What the verdict is drawn from.
struct Measured {
    baseline: f64,
    stage_small: Stats,
    stage_small_again: Stats,
    stage_large: Stats,
    mirrors: [Stats; 3],
    /// RSS growth per staged document of the large pipeline, when /proc tells it.
    per_doc_rss: Option<f64>,
    /// Budget bytes charged per staged document of the large pipeline.
    per_doc_accounted: f64,
}

/// Documents staged in the small pipeline.
const SMALL: usize = 1_000;

/// Starts the sidecar on the embedded store, on the runtime of `sidecar`.
async fn start_sidecar(sidecar: &Handle) -> Result<(RunningSidecar, Arc<EmbeddedCache>), String> {
    let mut config = Config::defaults();
    config.embedded_cache_bytes = 64 << 30;
    let cache = Arc::new(EmbeddedCache::new(config.embedded_cache_bytes));
    let stores = Stores::on(cache.clone());
    let server = sidecar
        .spawn(async move { RunningSidecar::start(&config, stores).await })
        .await
        .map_err(|e| e.to_string())??;
    Ok((server, cache))
}

async fn bench(args: Args, sidecar: Handle) -> Result<bool, String> {
    let (server, cache) = start_sidecar(&sidecar).await?;
    if args.writes_only {
        let rows = writes::write_scenarios(&server.url(""), Duration::from_secs(args.seconds)).await?;
        writes::print_writes(&rows);
        server.stop().await.map_err(|e| e.to_string())?;
        return Ok(true);
    }
    let bench = Bench {
        base: server.url(""),
        concurrency: args.concurrency,
        seconds: Duration::from_secs(args.seconds),
    };
    println!(
        "sidecar benchmark: embedded store, loopback, {} connections, {}s per scenario, {DOC_TEXT_BYTES}-byte documents",
        args.concurrency, args.seconds
    );
    for p in ["small", "large", "claim"] {
        cache.create_pipeline(meta(p)).await.map_err(|e| e.to_string())?;
    }
    preload_http(&bench.base, "small", SMALL, bench.concurrency).await?;
    let measured = measure(&bench, &cache, &args).await?;
    let ok = verdict(&measured);
    server.stop().await.map_err(|e| e.to_string())?;
    Ok(ok)
}

/// Runs every scenario in order and prints its row.
async fn measure(bench: &Bench, cache: &EmbeddedCache, args: &Args) -> Result<Measured, String> {
    let health = bench
        .scenario("healthz (baseline)", "", Scenario::Health, 0, 0.0)
        .await?;
    let baseline = health.rps();
    let stage_small = bench
        .scenario(
            "stage (1,000 staged)",
            "small",
            Scenario::Restage,
            SMALL,
            baseline,
        )
        .await?;
    bench
        .scenario("get-chunks", "small", Scenario::GetChunks, SMALL, baseline)
        .await?;
    // Claims: enough pending documents that the queue never drains during the run.
    let claimable = (health.rps() as usize * args.seconds as usize * 2).max(10_000);
    preload(cache, "claim", claimable).await?;
    bench
        .scenario("claim (limit 1)", "claim", Scenario::Claim, claimable, baseline)
        .await?;
    let mirrors = mirror_scenarios(&bench.base, bench.seconds).await?;
    for stats in &mirrors {
        print_latency(stats);
    }
    writes::print_writes(&writes::write_scenarios(&bench.base, bench.seconds).await?);
    let (per_doc_rss, per_doc_accounted) = stage_large(bench, cache, args.large).await?;
    // /healthz again: whether the process as a whole (a store holding a million documents, the
    // machine's load now) got slower, which no pipeline-size effect explains.
    bench
        .scenario("healthz (again)", "", Scenario::Health, 0, baseline)
        .await?;
    // The small pipeline again, right before the large one: same process state, same load.
    let stage_small_again = bench
        .scenario(
            "stage (1,000 staged, again)",
            "small",
            Scenario::Restage,
            SMALL,
            baseline,
        )
        .await?;
    let stage_large = bench
        .scenario(
            &format!("stage ({} staged)", args.large),
            "large",
            Scenario::Restage,
            args.large,
            baseline,
        )
        .await?;
    Ok(Measured {
        baseline,
        stage_small,
        stage_small_again,
        stage_large,
        mirrors,
        per_doc_rss,
        per_doc_accounted,
    })
}

/// Stages `large` documents over HTTP; returns the RSS growth per document (when /proc tells it)
/// and the budget bytes charged per document.
async fn stage_large(
    bench: &Bench,
    cache: &EmbeddedCache,
    large: usize,
) -> Result<(Option<f64>, f64), String> {
    let rss_before = rss_bytes();
    let used_before = cache.used_bytes();
    let t = Instant::now();
    preload_http(&bench.base, "large", large, bench.concurrency).await?;
    let rss_after = rss_bytes();
    let used_after = cache.used_bytes();
    println!(
        "staged {large} documents over HTTP in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let per_doc_rss = match (rss_before, rss_after) {
        (Some(b), Some(a)) if large > 0 => Some(a.saturating_sub(b) as f64 / large as f64),
        _ => None,
    };
    let per_doc_accounted = (used_after - used_before) as f64 / large.max(1) as f64;
    Ok((per_doc_rss, per_doc_accounted))
}

/// Prints a PASS or FAIL line per target; true when every one passed.
fn verdict(m: &Measured) -> bool {
    let mut ok = true;
    let mut check = |label: &str, pass: bool, detail: String| {
        println!("{} {label}: {detail}", if pass { "PASS" } else { "FAIL" });
        ok &= pass;
    };
    let stage_ratio = m.stage_small.rps() / m.baseline;
    check(
        "stage throughput >= 50% of /healthz",
        stage_ratio >= 0.5,
        format!("{:.1}%", stage_ratio * 100.0),
    );
    let p50_ratio = m.stage_large.p50_us as f64 / m.stage_small_again.p50_us.max(1) as f64;
    check(
        "stage p50 with the large pipeline within 1.5x of 1,000",
        p50_ratio <= 1.5,
        format!(
            "{} us vs {} us ({p50_ratio:.2}x; first 1,000 run: {} us)",
            m.stage_large.p50_us, m.stage_small_again.p50_us, m.stage_small.p50_us
        ),
    );
    let worst = m.mirrors[1].p99_us.max(m.mirrors[2].p99_us);
    check(
        "10,000-row mirror p99 <= 50 ms (a quarter of the 200 ms callout timeout)",
        worst <= MIRROR_P99_TARGET_US,
        format!(
            "upsert p99 {} us, patch p99 {} us",
            m.mirrors[1].p99_us, m.mirrors[2].p99_us
        ),
    );
    match m.per_doc_rss {
        Some(bytes) => check(
            "memory per staged 2 KB document <= 4 KB",
            bytes <= 4096.0,
            format!(
                "{bytes:.0} bytes RSS ({:.0} bytes charged to the budget)",
                m.per_doc_accounted
            ),
        ),
        None => println!("SKIP memory per staged document: /proc/self/status unavailable"),
    }
    ok
}

fn main() -> ExitCode {
    let args = Args::parse();
    let strict = args.strict;
    // The sidecar on a runtime of its own, its threads named so its CPU time can be read apart.
    let sidecar = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(writes::SIDECAR_THREAD)
        .thread_keep_alive(Duration::from_secs(3600))
        .build();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build();
    let (sidecar, runtime) = match (sidecar, runtime) {
        (Ok(s), Ok(r)) => (s, r),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("sidecar-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(args, sidecar.handle().clone())) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) if !strict => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("sidecar-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
