//! `make soak`: `make run`'s processes (envoy/run.sh: minifugu, the sidecar with its embedded
//! cache, Envoy with the filter) under a long mixed load, with faults now and then, then checks
//! that nothing went wrong: no unexpected status, the counters reconcile, memory stays flat, no
//! panic or VM restart in Envoy's log.
//!
//! The mix: writes of every class (accepted, gzip, each 422 reason, 413), queries (some with
//! `as_of`), document fetches, and the pipeline flow (stage, claim, heartbeat, vectors, set stage).
//! The faults: the sidecar stalled past the mirror timeout, and the upstream stalled past the
//! route timeout (Envoy answers 504). Within a fault window (and a grace after it) 5xx answers
//! are expected; anywhere else, each request class has its own expected statuses.
//!
//! `soak [--requests N] [--concurrency C]` (defaults 1,000,000 and 8).

use base64::Engine as _;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wasmtime::{bail, Result};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

const NAMESPACES: u64 = 10;
const IDS: u64 = 1_000;
const PIPELINE_DOCS: u64 = 500;
/// Bodies above this get 413 (the soak's gateway runs with this limit).
const BODY_LIMIT: usize = 1 << 20;
const ROUTE_TIMEOUT_S: u64 = 2;

/// The request classes of the mix, with their weights per 1,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Write,
    GzipWrite,
    Rejected(&'static str),
    TooLarge,
    Query,
    QueryAsOf,
    Fetch,
    Stage,
    Claim,
    Heartbeat,
    Vectors,
    SetStage,
}

const MIX: [(Class, u32); 17] = [
    (Class::Write, 360),
    (Class::GzipWrite, 30),
    (Class::Rejected("invalid_json"), 5),
    (Class::Rejected("no_operation"), 5),
    (Class::Rejected("removed_key"), 5),
    (Class::Rejected("reserved_attribute"), 5),
    (Class::Rejected("shape"), 5),
    (Class::Rejected("bad_encoding"), 4),
    (Class::TooLarge, 1),
    (Class::Query, 150),
    (Class::QueryAsOf, 100),
    (Class::Fetch, 200),
    (Class::Stage, 40),
    (Class::Claim, 30),
    (Class::Heartbeat, 20),
    (Class::Vectors, 25),
    (Class::SetStage, 15),
];

/// A tiny deterministic generator (xorshift), one per client.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn pick(rng: &mut Rng) -> Class {
    let mut roll = rng.below(1_000) as u32;
    for (class, weight) in MIX {
        if roll < weight {
            return class;
        }
        roll -= weight;
    }
    Class::Write
}

/// The statuses a class may get outside a fault window.
fn expected(class: Class, status: u16) -> bool {
    match class {
        Class::Write | Class::GzipWrite => status == 200,
        // A namespace not written yet is a 404.
        Class::Query | Class::QueryAsOf => matches!(status, 200 | 404),
        Class::Rejected(_) => status == 422,
        Class::TooLarge => status == 413,
        // A document not written yet is a 404; a namespace not created yet too.
        Class::Fetch => matches!(status, 200 | 404),
        Class::Stage | Class::Claim | Class::Heartbeat | Class::SetStage => status == 200,
        // The document may not have been staged yet.
        Class::Vectors => matches!(status, 200 | 404),
    }
}

/// One request of a class: method, path, body, extra headers.
fn request(class: Class, rng: &mut Rng) -> (&'static str, String, Vec<u8>, Vec<(&'static str, String)>) {
    let ns = format!("soak-{}", rng.below(NAMESPACES));
    let id = rng.below(IDS);
    let write = |rng: &mut Rng| {
        let rows: Vec<String> = (0..1 + rng.below(4))
            .map(|i| {
                format!(
                    r#"{{"id":{},"n":{},"t":"soak text {}"}}"#,
                    (id + i) % IDS,
                    rng.below(1_000_000),
                    rng.below(100)
                )
            })
            .collect();
        match rng.below(10) {
            0 => format!(r#"{{"deletes":[{id}]}}"#),
            1 => format!(r#"{{"patch_rows":[{{"id":{id},"n":{}}}]}}"#, rng.below(100)),
            _ => format!(r#"{{"upsert_rows":[{}]}}"#, rows.join(",")),
        }
    };
    match class {
        Class::Write => (
            "POST",
            format!("/v2/namespaces/{ns}"),
            write(rng).into_bytes(),
            vec![],
        ),
        Class::GzipWrite => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            let _ = enc.write_all(write(rng).as_bytes());
            (
                "POST",
                format!("/v2/namespaces/{ns}"),
                enc.finish().unwrap_or_default(),
                vec![("content-encoding", "gzip".to_owned())],
            )
        }
        Class::Rejected(reason) => {
            let (body, headers): (&str, Vec<(&'static str, String)>) = match reason {
                "invalid_json" => (r#"{"upsert_rows":["#, vec![]),
                "no_operation" => ("{}", vec![]),
                "removed_key" => (r#"{"upserts":[{"id":1}]}"#, vec![]),
                "reserved_attribute" => (r#"{"upsert_rows":[{"id":1,"_hevlayer_x":1}]}"#, vec![]),
                "shape" => (r#"{"upsert_columns":{"id":[1,2],"a":[1]}}"#, vec![]),
                _ => (r#"{"deletes":[1]}"#, vec![("content-encoding", "br".to_owned())]),
            };
            (
                "POST",
                format!("/v2/namespaces/{ns}"),
                body.as_bytes().to_vec(),
                headers,
            )
        }
        Class::TooLarge => {
            let big = format!(
                r#"{{"upsert_rows":[{{"id":1,"t":"{}"}}]}}"#,
                "x".repeat(BODY_LIMIT)
            );
            ("POST", format!("/v2/namespaces/{ns}"), big.into_bytes(), vec![])
        }
        Class::Query => (
            "POST",
            format!("/v2/namespaces/{ns}/query"),
            br#"{"rank_by":["id","asc"],"top_k":5,"include_attributes":["n"]}"#.to_vec(),
            vec![],
        ),
        Class::QueryAsOf => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let body = format!(
                r#"{{"rank_by":["id","asc"],"top_k":5,"as_of":{},"filters":["id","Gte",0]}}"#,
                now - rng.below(60_000)
            );
            (
                "POST",
                format!("/v2/namespaces/{ns}/query"),
                body.into_bytes(),
                vec![],
            )
        }
        Class::Fetch => (
            "GET",
            format!("/v2/namespaces/{ns}/documents/{id}"),
            vec![],
            vec![],
        ),
        Class::Stage => {
            let doc = rng.below(PIPELINE_DOCS);
            let body = format!(r#"{{"chunks":[{{"id":"c-{doc}","text":"chunk of document {doc}"}}]}}"#);
            (
                "PUT",
                format!("/v2/pipelines/soak/documents/d-{doc}"),
                body.into_bytes(),
                vec![],
            )
        }
        Class::Claim => (
            "POST",
            "/v2/pipelines/soak/claim".to_owned(),
            format!(
                r#"{{"worker_id":"w-{}","limit":5,"lease_seconds":30}}"#,
                rng.below(4)
            )
            .into_bytes(),
            vec![],
        ),
        Class::Heartbeat => {
            let doc = rng.below(PIPELINE_DOCS);
            let body = format!(
                r#"{{"worker_id":"w-{}","document_ids":["d-{doc}"]}}"#,
                rng.below(4)
            );
            (
                "POST",
                "/v2/pipelines/soak/documents/heartbeat".to_owned(),
                body.into_bytes(),
                vec![],
            )
        }
        Class::Vectors => {
            let doc = rng.below(PIPELINE_DOCS);
            let v: Vec<u8> = (0..8).flat_map(|i| (i as f32 * 0.1).to_le_bytes()).collect();
            let b64 = base64::engine::general_purpose::STANDARD.encode(v);
            let body = format!(r#"{{"vectors":[{{"id":"c-{doc}","vector":"{b64}"}}]}}"#);
            (
                "PUT",
                format!("/v2/pipelines/soak/documents/d-{doc}/vectors"),
                body.into_bytes(),
                vec![],
            )
        }
        Class::SetStage => {
            let doc = rng.below(PIPELINE_DOCS);
            let body = format!(r#"{{"document_ids":["d-{doc}"],"stage":"pending","create_missing":true}}"#);
            (
                "POST",
                "/v2/pipelines/soak/documents/stage".to_owned(),
                body.into_bytes(),
                vec![],
            )
        }
    }
}

/// The stack `envoy/run.sh` starts, stopped (SIGINT to its process group) when dropped.
struct Stack {
    run: Child,
    gateway: u16,
    admin: u16,
    sidecar: u16,
    minifugu: u16,
    logs: PathBuf,
}

impl Drop for Stack {
    fn drop(&mut self) {
        // What stops run.sh from outside: its TERM trap stops every process it started. (Not
        // INT: a program started in the background inherits INT ignored, and a shell cannot
        // trap a signal ignored on entry.) Signals go to positive pids only, each by name.
        signal(self.run.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.run.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Whatever of this run is left (run.sh exports the ports to all it starts).
        for pid in pids_with_env(&format!("GATEWAY_PORT={}", self.gateway)) {
            signal(pid, "KILL");
        }
        signal(self.run.id(), "KILL");
        let _ = self.run.wait();
    }
}

/// Every process whose environment holds `env`.
fn pids_with_env(env: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id() && environ_has(pid, env))
        .collect()
}

fn start_stack() -> Result<Stack> {
    let (gateway, admin, sidecar, minifugu) = (free_port()?, free_port()?, free_port()?, free_port()?);
    // Its own process group, so a Ctrl-C meant for this program does not reach it twice.
    let mut run = Command::new(root().join("envoy/run.sh"))
        .process_group(0)
        .env("GATEWAY_PORT", gateway.to_string())
        .env("ADMIN_PORT", admin.to_string())
        .env("SIDECAR_PORT", sidecar.to_string())
        .env("MINIFUGU_PORT", minifugu.to_string())
        .env("ROUTE_TIMEOUT", format!("{ROUTE_TIMEOUT_S}s"))
        .env("MAX_BODY_BYTES", BODY_LIMIT.to_string())
        .env_remove("TURBOPUFFER_URL")
        .env_remove("TURBOPUFFER_API_KEY")
        .env_remove("AUTH_MODE")
        .env_remove("AEROSPIKE_HOSTS")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let Some(stdout) = run.stdout.take() else {
        bail!("no stdout from run.sh")
    };
    let mut logs = PathBuf::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(rest) = line.trim().strip_prefix("logs") {
            logs = PathBuf::from(rest.trim().split('{').next().unwrap_or(""));
        }
        if line.contains("Ctrl-C stops everything.") {
            return Ok(Stack {
                run,
                gateway,
                admin,
                sidecar,
                minifugu,
                logs,
            });
        }
    }
    bail!("run.sh ended before the gateway was ready")
}

/// The pid of the process whose command line holds all of `parts` and whose environment holds
/// `env` (the sidecar, minifugu, Envoy of this run, not of another).
fn pid_of(parts: &[&str], env: &str) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if parts.iter().all(|p| cmdline.contains(p)) && environ_has(pid, env) {
            return Some(pid);
        }
    }
    None
}

fn environ_has(pid: u32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|e| String::from_utf8_lossy(&e).contains(needle))
        .unwrap_or(false)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Sends signal `sig` (a name: INT, STOP, CONT, KILL) to one process; never to a group.
fn signal(pid: u32, sig: &str) {
    if pid == 0 {
        return;
    }
    let _ = Command::new("kill")
        .args(["-s", sig, "--", &pid.to_string()])
        .status();
}

async fn counters(client: &reqwest::Client, admin: u16) -> Result<BTreeMap<String, i64>> {
    let text = client
        .get(format!(
            "http://127.0.0.1:{admin}/stats?filter=^wasmcustom\\.hevlayer\\."
        ))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(": ")?;
            Some((
                k.trim_start_matches("wasmcustom.").to_owned(),
                v.trim().parse().ok()?,
            ))
        })
        .collect())
}

/// Fault windows: (start, end) since the run started, for the status check.
#[derive(Default)]
struct Faults(Mutex<Vec<(Duration, Duration)>>);

impl Faults {
    fn add(&self, start: Duration, end: Duration) {
        if let Ok(mut w) = self.0.lock() {
            w.push((start, end));
        }
    }

    /// Whether `at` falls in a window, or in the grace after one (the route timeout and a
    /// second: requests that started before the window ended may answer late).
    fn covers(&self, at: Duration, until: Duration) -> bool {
        let grace = Duration::from_secs(ROUTE_TIMEOUT_S + 1);
        self.0
            .lock()
            .map(|w| w.iter().any(|(s, e)| until >= *s && at <= *e + grace))
            .unwrap_or(false)
    }
}

#[derive(Default)]
struct Tally {
    by_class: BTreeMap<String, BTreeMap<u16, u64>>,
    unexpected: Vec<String>,
    in_fault: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| {
        args.windows(2)
            .find(|w| w[0] == name)
            .and_then(|w| w[1].parse().ok())
            .unwrap_or(default)
    };
    let total = arg("--requests", 1_000_000);
    let concurrency = arg("--concurrency", 8);
    let stack = start_stack()?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        .build()?;
    let base = format!("http://127.0.0.1:{}", stack.gateway);
    // run.sh exports the ports, so each of its processes has them in its environment.
    let ours = format!("GATEWAY_PORT={}", stack.gateway);
    let sidecar_pid = pid_of(
        &["hevlayer-sidecar", &format!("127.0.0.1:{}", stack.sidecar)],
        &ours,
    );
    let minifugu_pid = pid_of(
        &[".tools/bin/minifugu"],
        &format!("MINIFUGU_LISTEN=127.0.0.1:{}", stack.minifugu),
    );
    let (Some(sidecar_pid), Some(minifugu_pid)) = (sidecar_pid, minifugu_pid) else {
        bail!("could not find the sidecar and minifugu processes")
    };
    // From here every write counts (the access log has them all).
    let before = counters(&client, stack.admin).await?;
    // Every namespace exists (with its schema) before the mix writes patches and deletes to it.
    for ns in 0..NAMESPACES {
        let r = client
            .post(format!("{base}/v2/namespaces/soak-{ns}"))
            .header("authorization", "Bearer soak")
            .body(r#"{"upsert_rows":[{"id":0,"n":0,"t":"seed"}]}"#)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("seeding soak-{ns}: {}", r.status());
        }
    }
    let create = client
        .post(format!("{base}/v2/pipelines"))
        .header("authorization", "Bearer soak")
        .body(r#"{"id":"soak","target_namespace":"soak-vectors"}"#)
        .send()
        .await?;
    if !create.status().is_success() {
        bail!("pipeline create: {}", create.status());
    }
    let started = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let faults = Arc::new(Faults::default());
    let done = Arc::new(AtomicBool::new(false));

    // Faults every 20 s, alternating: the sidecar stalled past the mirror timeout, the upstream
    // stalled past the route timeout.
    let fault_task = {
        let (faults, done) = (faults.clone(), done.clone());
        tokio::spawn(async move {
            let mut n = 0u32;
            while !done.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(20)).await;
                if done.load(Ordering::Relaxed) {
                    break;
                }
                n += 1;
                let (pid, hold) = if n % 2 == 1 {
                    (sidecar_pid, Duration::from_millis(600))
                } else {
                    (minifugu_pid, Duration::from_millis(ROUTE_TIMEOUT_S * 1000 + 500))
                };
                // The window is known before it opens: answers that come during it are judged by it.
                let start = started.elapsed();
                faults.add(start, start + hold + Duration::from_millis(100));
                signal(pid, "STOP");
                tokio::time::sleep(hold).await;
                signal(pid, "CONT");
            }
            n
        })
    };

    // Memory: the filter VMs' linear memory (a gauge the filter keeps) and the sidecar's RSS.
    let samples: Arc<Mutex<Vec<(f64, i64, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let (client, samples, done, sent) = (client.clone(), samples.clone(), done.clone(), sent.clone());
        let admin = stack.admin;
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let vm = counters(&client, admin)
                    .await
                    .ok()
                    .and_then(|c| c.get("hevlayer.vm_memory_bytes").copied())
                    .unwrap_or(0);
                let progress = sent.load(Ordering::Relaxed) as f64 / total as f64;
                if let Ok(mut s) = samples.lock() {
                    s.push((progress, vm, rss_kib(sidecar_pid)));
                }
            }
        })
    };

    let mut clients = Vec::new();
    for c in 0..concurrency {
        let (client, base, sent, tally, faults) = (
            client.clone(),
            base.clone(),
            sent.clone(),
            tally.clone(),
            faults.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (c + 1));
            while sent.fetch_add(1, Ordering::Relaxed) < total {
                let class = pick(&mut rng);
                let (method, path, body, headers) = request(class, &mut rng);
                let at = started.elapsed();
                let mut req = match method {
                    "GET" => client.get(format!("{base}{path}")),
                    "PUT" => client.put(format!("{base}{path}")),
                    _ => client.post(format!("{base}{path}")),
                }
                .header("authorization", "Bearer soak")
                .header("content-type", "application/json");
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                if !body.is_empty() {
                    req = req.body(body);
                }
                let (status, answer) = match req.send().await {
                    Ok(r) => {
                        let s = r.status().as_u16();
                        let b = r.bytes().await.unwrap_or_default();
                        (s, b)
                    }
                    Err(_) => (0, Default::default()),
                };
                let until = started.elapsed();
                let Ok(mut t) = tally.lock() else { continue };
                *t.by_class
                    .entry(format!("{class:?}"))
                    .or_default()
                    .entry(status)
                    .or_insert(0) += 1;
                if !expected(class, status) {
                    if faults.covers(at, until) && (status >= 500 || status == 0) {
                        t.in_fault += 1;
                    } else if t.unexpected.len() < 20 {
                        let text = String::from_utf8_lossy(&answer[..answer.len().min(160)]).into_owned();
                        t.unexpected
                            .push(format!("{class:?} {method} {path}: {status} at {at:?}: {text}"));
                    } else {
                        t.unexpected.push(String::new());
                    }
                }
            }
        }));
    }
    for c in clients {
        c.await?;
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let fault_count = fault_task.await.unwrap_or(0);
    sampler.await?;
    // Let the last mirrors, evictions and timers settle before reading the counters.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = counters(&client, stack.admin).await?;
    let delta = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);

    // Stopped first: Envoy flushes its access log on the way out.
    let logs = stack.logs.clone();
    drop(stack);
    // Writes that reached the upstream: Envoy's access log (POST /v2/namespaces/{ns} with an
    // upstream host), the sidecar's pipeline writes included.
    let log = std::fs::read_to_string(logs.join("access.log")).unwrap_or_default();
    let upstream_writes = log
        .lines()
        .filter(|l| {
            let Some(req) = l.split('"').nth(1) else {
                return false;
            };
            let mut parts = req.split_whitespace();
            let (method, path) = (parts.next(), parts.next().unwrap_or(""));
            let path = path.split('?').next().unwrap_or("");
            method == Some("POST")
                && path.starts_with("/v2/namespaces/")
                && path.trim_end_matches('/').matches('/').count() == 3
                && !l.trim_end().ends_with("\"-\"")
        })
        .count() as i64;
    let envoy_log = std::fs::read_to_string(logs.join("envoy.log")).unwrap_or_default();
    let panics = envoy_log
        .lines()
        .filter(|l| {
            l.contains("panicked")
                || l.contains("Plugin configured to fail closed")
                || l.contains("VM failed")
        })
        .count();
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();

    let tally = match Arc::try_unwrap(tally) {
        Ok(m) => m.into_inner().unwrap_or_default(),
        Err(_) => bail!("clients still hold the tally"),
    };
    println!(
        "soak: {total} requests from {concurrency} clients in {:.0} s ({:.0} req/s), {fault_count} faults",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    println!("{:<28} statuses", "class");
    for (class, statuses) in &tally.by_class {
        let s: Vec<String> = statuses.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        println!("{class:<28} {}", s.join(", "));
    }
    let mut failures = Vec::new();
    let unexpected = tally.unexpected.len();
    println!(
        "unexpected statuses: {unexpected} (5xx within fault windows: {})",
        tally.in_fault
    );
    for u in tally.unexpected.iter().filter(|u| !u.is_empty()).take(10) {
        println!("  {u}");
    }
    if unexpected > 0 {
        failures.push(format!("{unexpected} unexpected statuses"));
    }
    let accepted = delta("hevlayer.writes_accepted");
    let outcomes: i64 = hevlayer_tests::MIRROR_OUTCOMES.iter().map(|c| delta(c)).sum();
    println!("writes accepted by the filter {accepted}, reached the upstream {upstream_writes}; mirror outcomes {outcomes} (ok {}, failed {}, timeout {}, skipped {}, unanswered {})",
        delta("hevlayer.mirror_ok"), delta("hevlayer.mirror_failed"), delta("hevlayer.mirror_timeout"), delta("hevlayer.mirror_skipped"), delta("hevlayer.writes_unanswered"));
    if accepted != upstream_writes {
        failures.push(format!(
            "writes accepted {accepted} != writes the upstream received {upstream_writes}"
        ));
    }
    if outcomes != accepted {
        failures.push(format!(
            "mirror outcomes {outcomes} != writes accepted {accepted}"
        ));
    }
    println!(
        "fences: evictions acknowledged {}, retried {}, pending at the end {}; fetches bypassed {}",
        delta("hevlayer.evictions_acknowledged"),
        delta("hevlayer.evictions_retried"),
        after.get("hevlayer.evictions_pending").copied().unwrap_or(0),
        delta("hevlayer.fetches_bypassed")
    );
    // Memory: the last tenth of the run against the first tenth after a warm-up tenth.
    let window = |lo: f64, hi: f64| -> (f64, f64) {
        let picked: Vec<&(f64, i64, u64)> = samples.iter().filter(|s| s.0 >= lo && s.0 < hi).collect();
        let n = picked.len().max(1) as f64;
        (
            picked.iter().map(|s| s.1 as f64).sum::<f64>() / n,
            picked.iter().map(|s| s.2 as f64).sum::<f64>() / n,
        )
    };
    let (vm_first, rss_first) = window(0.1, 0.2);
    let (vm_last, rss_last) = window(0.9, 1.01);
    println!(
        "memory: filter VMs {:.0} KiB -> {:.0} KiB ({:+.1}%), sidecar RSS {:.0} KiB -> {:.0} KiB ({:+.1}%)",
        vm_first / 1024.0,
        vm_last / 1024.0,
        (vm_last / vm_first - 1.0) * 100.0,
        rss_first,
        rss_last,
        (rss_last / rss_first - 1.0) * 100.0
    );
    if vm_last > vm_first * 1.05 {
        failures.push("the filter VMs' memory grew by more than 5%".to_owned());
    }
    if rss_last > rss_first * 1.05 {
        failures.push("the sidecar's RSS grew by more than 5%".to_owned());
    }
    println!("Envoy log: {panics} panics or VM failures");
    if panics > 0 {
        failures.push(format!("{panics} panics or VM failures in Envoy's log"));
    }
    if failures.is_empty() {
        println!("soak passed");
        Ok(())
    } else {
        for f in &failures {
            println!("SOAK FAILED: {f}");
        }
        bail!("{} soak check(s) failed", failures.len())
    }
}
