//! The two callouts a large write through the gateway costs the sidecar, as the filter sends
//! them: `POST /internal/v1/evict` with the write's stamp and its 10,000 ids (the client's 2xx
//! waits for it), then, after the response, the stamped write in a batch mirror
//! (`POST /internal/v1/mirrors`). One at a time on one connection, alternating like successive
//! writes of the same rows (so each eviction finds its ids cached and each mirror finds their
//! tombstones), plus evictions of ids that are not cached (their tombstones renewed).
//!
//! Besides latency, each row gives the sidecar's CPU time per callout: the sidecar runs on a
//! runtime of its own whose threads are named `SIDECAR_THREAD` (workers and blocking threads), and
//! their `/proc/self/task/*/schedstat` is read around each callout, so the load generator's own
//! work is not counted.

use std::time::{Duration, Instant};

use hevlayer_sidecar_api::{
    evict_body, mirror_batch_body, mirror_body, EVICT_PATH, MIRRORS_PATH, STAMP_ATTRIBUTE,
};

/// Name of the sidecar runtime's threads.
pub const SIDECAR_THREAD: &str = "sidecar";
/// Rows (and ids) of a write.
const ROWS: usize = 10_000;
/// Stamp of the first write (2026-01-01); each write adds 1.
const FIRST_STAMP: u64 = 1_767_225_600_000;
/// Fewest callouts per row, whatever `--seconds`.
const MIN_CALLOUTS: usize = 30;

/// One row of the table: latencies (µs) and sidecar CPU (ns) per callout.
#[derive(Default)]
pub struct WriteStats {
    pub name: &'static str,
    latencies_us: Vec<u64>,
    cpu_ns: Vec<u64>,
}

impl WriteStats {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            ..Self::default()
        }
    }

    fn percentile(sorted: &[u64], p: f64) -> u64 {
        let last = sorted.len().saturating_sub(1);
        sorted
            .get(((last as f64) * p).round() as usize)
            .copied()
            .unwrap_or(0)
    }

    /// p50 and p99 latency in µs.
    pub fn p50_p99_us(&self) -> (u64, u64) {
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        (Self::percentile(&sorted, 0.50), Self::percentile(&sorted, 0.99))
    }

    /// Mean and median sidecar CPU per callout, in µs.
    pub fn cpu_mean_p50_us(&self) -> (u64, u64) {
        let mut sorted = self.cpu_ns.clone();
        sorted.sort_unstable();
        let mean = sorted.iter().sum::<u64>() / (sorted.len().max(1) as u64);
        (mean / 1000, Self::percentile(&sorted, 0.50) / 1000)
    }
}

/// CPU time the sidecar runtime's threads have used, in ns.
fn sidecar_cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|comm| comm.trim_end().starts_with(SIDECAR_THREAD))
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The gateway benchmark's small rows, stamped as the filter stamps them.
fn small_rows_write(stamp: u64) -> Vec<u8> {
    let mut out = String::from(r#"{"upsert_rows":["#);
    for i in 0..ROWS {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            r#"{{"id":{i},"title":"row {i}","n":{i},"ok":true,"{STAMP_ATTRIBUTE}":{stamp}}}"#
        ));
    }
    out.push_str("]}");
    out.into_bytes()
}

/// Sends one callout; checks its status and answer and records its latency and sidecar CPU.
async fn callout(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    expected: &str,
    stats: &mut WriteStats,
) -> Result<(), String> {
    let cpu = sidecar_cpu_ns();
    let t = Instant::now();
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("{}: {e}", stats.name))?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| format!("{}: {e}", stats.name))?;
    stats
        .latencies_us
        .push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
    stats.cpu_ns.push(sidecar_cpu_ns().saturating_sub(cpu));
    if !status.is_success() || text != expected {
        return Err(format!(
            "{}: answered {status} {text} (expected {expected})",
            stats.name
        ));
    }
    Ok(())
}

/// The ids `first..first + ROWS` as JSON tokens.
fn id_tokens(first: usize) -> Vec<Vec<u8>> {
    (first..first + ROWS)
        .map(|i| i.to_string().into_bytes())
        .collect()
}

/// Runs the write scenarios against the sidecar at `base` for about `seconds` each; returns the
/// rows: eviction of cached ids, batch mirror, eviction of ids not cached.
pub async fn write_scenarios(base: &str, seconds: Duration) -> Result<[WriteStats; 3], String> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?;
    let (evict_url, mirrors_url) = (format!("{base}{EVICT_PATH}"), format!("{base}{MIRRORS_PATH}"));
    let ids = id_tokens(0);
    let uncached = id_tokens(ROWS);
    let mut evict = WriteStats::new("evict 10,000 ids (cached)");
    let mut mirror = WriteStats::new("batch mirror 10,000 rows");
    let mut evict_uncached = WriteStats::new("evict 10,000 ids (not cached)");
    let mut warm = WriteStats::new("warm-up mirror");
    let write = small_rows_write(FIRST_STAMP);
    let batch = |stamp| mirror_batch_body([mirror_body("bench-writes", stamp, &write, None).as_slice()]);
    let all = r#"{"applied":[true]}"#;
    callout(&client, &mirrors_url, batch(FIRST_STAMP), all, &mut warm).await?;
    let evicted = format!(r#"{{"applied":{ROWS}}}"#);
    let started = Instant::now();
    let mut stamp = FIRST_STAMP;
    while started.elapsed() < seconds || evict.latencies_us.len() < MIN_CALLOUTS {
        stamp += 1;
        let body = evict_body("bench-writes", ids.iter().map(Vec::as_slice), stamp);
        callout(&client, &evict_url, body, &evicted, &mut evict).await?;
        callout(&client, &mirrors_url, batch(stamp), all, &mut mirror).await?;
    }
    let started = Instant::now();
    while started.elapsed() < seconds / 2 || evict_uncached.latencies_us.len() < MIN_CALLOUTS {
        stamp += 1;
        let body = evict_body("bench-writes", uncached.iter().map(Vec::as_slice), stamp);
        callout(&client, &evict_url, body, r#"{"applied":0}"#, &mut evict_uncached).await?;
    }
    Ok([evict, mirror, evict_uncached])
}

/// Prints the rows as a table.
pub fn print_writes(rows: &[WriteStats]) {
    println!("write callouts (one at a time, one connection; CPU: the sidecar's threads per callout)");
    println!(
        "{:<32} {:>6} {:>10} {:>10} {:>14} {:>13}",
        "callout", "n", "p50 us", "p99 us", "CPU mean us", "CPU p50 us"
    );
    for row in rows {
        let (p50, p99) = row.p50_p99_us();
        let (cpu_mean, cpu_p50) = row.cpu_mean_p50_us();
        println!(
            "{:<32} {:>6} {:>10} {:>10} {:>14} {:>13}",
            row.name,
            row.latencies_us.len(),
            p50,
            p99,
            cpu_mean,
            cpu_p50
        );
    }
}
