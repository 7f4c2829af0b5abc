//! `make bench-gateway`: write latency and throughput through the real Envoy with the filter,
//! next to the same Envoy configuration without it, in one run, against an upstream that answers
//! at once (so the gateway's own cost is what is measured). Also the stage route through Envoy
//! next to the sidecar called directly.
//!
//! Needs `make tools wasm sidecar` (the Makefile target builds them first).

use axum::body::Bytes;
use axum::routing::any;
use axum::Router;
use base64::Engine as _;
use hevlayer_tests::bench_support::query_body;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::{bail, Result};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Child processes, killed when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn wait_ready(client: &reqwest::Client, url: &str) -> Result<()> {
    for _ in 0..200 {
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{url} did not become ready")
}

/// Which wasm filter an Envoy runs in front of its router.
#[derive(Clone, Copy)]
enum Filter<'a> {
    None,
    /// A filter module at this path, with the plugin configuration render.py gives it unless
    /// another is named (the empty filter's `buffer`).
    Wasm(&'a Path, Option<&'a str>),
}

/// CPU time a process has used, all threads, in nanoseconds (`/proc/PID/task/*/schedstat`).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn start_envoy(
    procs: &mut Procs,
    name: &str,
    filter: Filter<'_>,
    upstream: u16,
    sidecar: u16,
    link: Link,
) -> Result<(u16, u16, u32)> {
    let (port, admin) = (free_port()?, free_port()?);
    let dir = root().join(".run/bench");
    std::fs::create_dir_all(&dir)?;
    let config = dir.join(format!("{name}.yaml"));
    let mut render = Command::new("python3");
    match filter {
        Filter::None => render.env("HEVLAYER_FILTER", "off"),
        Filter::Wasm(path, _) => render.env("HEVLAYER_FILTER", "on").env("FILTER_WASM", path),
    };
    let status = render
        .arg(root().join("envoy/render.py"))
        .args(["--profile", "local", "--out"])
        .arg(&config)
        .env("GATEWAY_PORT", port.to_string())
        .env("ADMIN_PORT", admin.to_string())
        .env("SIDECAR_PORT", sidecar.to_string())
        .env("TURBOPUFFER_URL", format!("http://127.0.0.1:{upstream}"))
        .env("TURBOPUFFER_API_KEY", "")
        .env("ACCESS_LOG", "/dev/null")
        .status()?;
    if !status.success() {
        bail!("render.py failed");
    }
    if let Filter::Wasm(_, Some(plugin_config)) = filter {
        // The plugin configuration is the one single-quoted `value:` line of the template.
        let rendered = std::fs::read_to_string(&config)?;
        let replaced: Vec<String> = rendered
            .lines()
            .map(|line| match line.trim_start().strip_prefix("value: '") {
                Some(_) => format!(
                    "{}value: '{plugin_config}'",
                    &line[..line.len() - line.trim_start().len()]
                ),
                None => line.to_owned(),
            })
            .collect();
        std::fs::write(&config, replaced.join("\n"))?;
    }
    match link {
        Link::Http1 => {}
        Link::Http2 => speak_h2_to_sidecar(&config)?,
        Link::Stream(port) => add_stream_cluster(&config, port)?,
    }
    let envoy = root().join(".tools/venv/bin/envoy");
    if !envoy.exists() {
        bail!("{} is missing: run `make tools`", envoy.display());
    }
    let child = Command::new(envoy)
        .arg("-c")
        .arg(&config)
        .args([
            "--concurrency",
            "1",
            "--base-id",
            &admin.to_string(),
            "--log-level",
            // error, not warn: the no-callout Envoy would log every failed dispatch otherwise
            "error",
        ])
        .stdout(Stdio::null())
        .stderr(log_file(&format!("envoy-{admin}.log"))?)
        .spawn()?;
    let pid = child.id();
    procs.0.push(child);
    Ok((port, admin, pid))
}

/// How an Envoy reaches its sidecar, beyond the rendered configuration.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Link {
    /// As rendered: HTTP/1.1 callouts to `layer_sidecar`.
    Http1,
    /// `layer_sidecar` over HTTP/2.
    Http2,
    /// One more cluster, `layer_stream`, an HTTP/2 one to the gRPC stand-in on this port.
    Stream(u16),
}

/// Adds the cluster `layer_stream` (HTTP/2, for gRPC) to a rendered configuration, ahead of
/// `layer_sidecar`.
fn add_stream_cluster(config: &Path, port: u16) -> Result<()> {
    let rendered = std::fs::read_to_string(config)?;
    let cluster = format!(
        "  - name: layer_stream
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: layer_stream
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}
  - name: layer_sidecar"
    );
    if !rendered.contains("\n  - name: layer_sidecar\n") {
        bail!("no layer_sidecar cluster in {}", config.display());
    }
    std::fs::write(config, rendered.replacen("  - name: layer_sidecar", &cluster, 1))?;
    Ok(())
}

/// Makes the rendered configuration's `layer_sidecar` cluster speak HTTP/2 (h2c, one connection
/// for all callouts) instead of HTTP/1.1 (a connection per concurrent callout).
fn speak_h2_to_sidecar(config: &Path) -> Result<()> {
    let rendered = std::fs::read_to_string(config)?;
    let mut out = Vec::new();
    let mut in_cluster = false;
    let mut done = false;
    for line in rendered.lines() {
        out.push(line.to_owned());
        if line.trim() == "- name: layer_sidecar" {
            in_cluster = true;
        } else if in_cluster && !done && line.trim_start().starts_with("connect_timeout:") {
            let indent = &line[..line.len() - line.trim_start().len()];
            for extra in [
                "typed_extension_protocol_options:",
                "  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:",
                "    \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "    explicit_http_config: { http2_protocol_options: {} }",
            ] {
                out.push(format!("{indent}{extra}"));
            }
            done = true;
        }
    }
    if !done {
        bail!("no layer_sidecar cluster in {}", config.display());
    }
    std::fs::write(config, out.join("\n"))?;
    Ok(())
}

fn start_sidecar(procs: &mut Procs, port: u16, gateway: u16, worker_threads: usize) -> Result<u32> {
    let bin = root().join("target/release/hevlayer-sidecar");
    if !bin.exists() {
        bail!("{} is missing: run `make sidecar`", bin.display());
    }
    let child = Command::new(bin)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--gateway-url", &format!("http://127.0.0.1:{gateway}")])
        .args(["--log-level", "info"])
        .args(["--worker-threads", &worker_threads.to_string()])
        // Its log (refused requests and anything worse) is kept for a look after a run.
        .stdout(log_file(&format!("sidecar-{port}.log"))?)
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id();
    procs.0.push(child);
    Ok(pid)
}

/// A log file in `.run/bench/` (replaced), for a child's output.
fn log_file(name: &str) -> Result<std::fs::File> {
    let dir = root().join(".run/bench");
    std::fs::create_dir_all(&dir)?;
    Ok(std::fs::File::create(dir.join(name))?)
}

/// Serves `app` (any path, no body limit) on a free loopback port, for the life of the benchmark.
async fn serve(app: Router) -> Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let app = app.layer(axum::extract::DefaultBodyLimit::disable());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(port)
}

/// A Turbopuffer stand-in that reads the body and answers at once (namespace metadata says the
/// index is up to date, so the product's read watermark is known, as against Turbopuffer).
async fn start_upstream(delay: Duration) -> Result<u16> {
    let answer = move |uri: axum::http::Uri, body: Bytes| async move {
        if !delay.is_zero() {
            // A thread's sleep, not tokio's timer: the timer wheel's millisecond ticks would make
            // the delay anything from 5 to 6 ms depending on when the request came.
            let _ = tokio::task::spawn_blocking(move || std::thread::sleep(delay)).await;
        }
        let n = body.len();
        let text = if uri.path().ends_with("/metadata") {
            r#"{"approx_row_count":1,"index":{"status":"up-to-date"}}"#.to_owned()
        } else {
            format!(r#"{{"status":"OK","message":"read {n} bytes","rows_affected":1,"billing":{{}}}}"#)
        };
        ([("content-type", "application/json")], text)
    };
    serve(Router::new().fallback(any(answer))).await
}

/// Messages each gRPC stand-in has answered (`streamed`, `direct`).
static STREAM_MESSAGES: [std::sync::atomic::AtomicU64; 2] = [
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
];

/// A gRPC stand-in for `--group-commit`'s `streamed` mode: each stream it is opened answers every
/// message (a 5-byte frame header, then the message) with a short one, at once and in order.
async fn start_stream_stub(answered: &'static std::sync::atomic::AtomicU64) -> Result<u16> {
    use axum::response::IntoResponse;
    use http_body_util::BodyExt;
    let answer = move |mut body: axum::body::Body| async move {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
        tokio::spawn(async move {
            let mut pending = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(data) = frame.into_data() else { continue };
                pending.extend_from_slice(&data);
                while pending.len() >= 5 {
                    let len = u32::from_be_bytes([pending[1], pending[2], pending[3], pending[4]]);
                    let end = 5 + len as usize;
                    if pending.len() < end {
                        break;
                    }
                    pending.drain(..end);
                    answered.fetch_add(1, Ordering::Relaxed);
                    let reply = Bytes::from_static(&[0, 0, 0, 0, 2, b'o', b'k']);
                    if tx.send(reply).await.is_err() {
                        return;
                    }
                }
            }
        });
        let replies = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
        });
        (
            [("content-type", "application/grpc")],
            axum::body::Body::from_stream(replies),
        )
            .into_response()
    };
    serve(Router::new().fallback(any(answer))).await
}

/// A sidecar stand-in that answers every mirror callout at once: what the callout hop itself costs.
async fn start_mirror_stub() -> Result<u16> {
    async fn answer(_body: Bytes) -> ([(&'static str, &'static str); 1], &'static str) {
        ([("content-type", "application/json")], r#"{"applied":1}"#)
    }
    serve(Router::new().fallback(any(answer))).await
}

fn write_body(rows: usize, dims: usize) -> Vec<u8> {
    let mut out = String::from("{\"upsert_rows\":[");
    for i in 0..rows {
        if i > 0 {
            out.push(',');
        }
        let v: Vec<u8> = (0..dims)
            .flat_map(|d| ((i * dims + d) as f32 * 0.001).sin().to_le_bytes())
            .collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(v);
        out.push_str(&format!(r#"{{"id":{i},"vector":"{b64}","title":"row {i}"}}"#));
    }
    out.push_str("],\"distance_metric\":\"cosine_distance\"}");
    out.into_bytes()
}

/// `rows` rows with a `dims`-dimension vector written as a JSON number array (how curl and
/// hand-written clients send vectors).
fn write_body_numbers(rows: usize, dims: usize) -> Vec<u8> {
    let mut out = String::from("{\"upsert_rows\":[");
    for i in 0..rows {
        if i > 0 {
            out.push(',');
        }
        let v: Vec<String> = (0..dims)
            .map(|d| format!("{}", ((i * dims + d) as f32 * 0.001).sin()))
            .collect();
        out.push_str(&format!(
            r#"{{"id":{i},"vector":[{}],"title":"row {i}"}}"#,
            v.join(",")
        ));
    }
    out.push_str("],\"distance_metric\":\"cosine_distance\"}");
    out.into_bytes()
}

/// `rows` small rows without vectors (attributes only).
fn small_rows_body(rows: usize) -> Vec<u8> {
    let rows: Vec<String> = (0..rows)
        .map(|i| format!(r#"{{"id":{i},"title":"row {i}","n":{i},"ok":true}}"#))
        .collect();
    format!(r#"{{"upsert_rows":[{}]}}"#, rows.join(",")).into_bytes()
}

struct Latency {
    p50_us: f64,
    p99_us: f64,
    /// Envoy's CPU time per request (all its threads).
    cpu_us: f64,
    /// Its sidecar's CPU time per request (each Envoy that has one has its own).
    sidecar_cpu_us: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

/// Rounds each measurement is split into, the Envoys taking turns, so that a slow spell of the
/// shared machine falls on every Envoy alike instead of on whichever was measured then.
const ROUNDS: usize = 5;

/// Requests per turn for small requests (see [`Turns::Of`]).
const SHORT_TURN: usize = 20;
/// KiB the `--spin-cost` Envoy's filter hashes per request.
const SPIN_ROUNDS: usize = 16;

/// The spinning Envoy's extra CPU per request over the empty filter's, per KiB hashed, beside
/// the same loop run natively: how much slower plain wasm code runs in Envoy's engine.
fn spin_report(setups: &[Setup], figures: &[Latency]) -> Result<()> {
    let find = |prefix: &str| setups.iter().position(|s| s.label.starts_with(prefix));
    let (Some(empty), Some(spin)) = (find("empty wasm filter"), find("empty, spin")) else {
        bail!("the spin report needs the empty filter's Envoy and the spinning one");
    };
    let (Some(empty), Some(spin)) = (figures.get(empty), figures.get(spin)) else {
        bail!("the spin report needs the 35 B query's figures of both Envoys");
    };
    let in_envoy = (spin.cpu_us - empty.cpu_us) * 1000.0 / SPIN_ROUNDS as f64;
    let native = hevlayer_empty_filter::spin_native_ns();
    println!(
        "spin: {in_envoy:.0} ns of Envoy CPU per KiB hashed in wasm, {native:.0} ns natively ({:.1}x)",
        in_envoy / native
    );
    Ok(())
}

/// One request; its latency.
async fn one(client: &reqwest::Client, method: &str, url: &str, body: &Bytes) -> Result<Duration> {
    let t = Instant::now();
    let req = match method {
        "PUT" => client.put(url),
        _ => client.post(url),
    };
    let r = req
        .header("authorization", "Bearer bench")
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await?;
    let status = r.status();
    r.bytes().await?;
    if !status.is_success() {
        bail!("{url}: status {status}");
    }
    Ok(t.elapsed())
}

/// How many requests an Envoy gets in a row before the next one's turn, within a round.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Turns {
    /// Its whole share of the round (large requests: a share is short anyway).
    Blocks,
    /// This many (small requests: short turns, so that a slow spell of the machine falls on all
    /// Envoys alike; still back to back, as a client at c=1 sends them, so that what one request
    /// leaves behind, like the mirrors after a response, meets the next one).
    Of(usize),
}

/// The processes behind one Envoy: itself and its sidecar (0: none measured).
#[derive(Clone, Copy, Default)]
struct Pids {
    envoy: u32,
    sidecar: u32,
}

/// Latency percentiles of `n` requests to each URL, measured in [`ROUNDS`] rounds in which the
/// Envoys take `turns`, and the CPU time per request of the processes behind each (`pids`).
async fn latencies(
    client: &reqwest::Client,
    method: &str,
    urls: &[String],
    pids: &[Pids],
    body: &[u8],
    n: usize,
    turns: Turns,
) -> Result<Vec<Latency>> {
    let body = Bytes::copy_from_slice(body);
    let per_round = n.div_ceil(ROUNDS);
    let warmup = (per_round / 10).max(1);
    let mut all: Vec<Vec<Duration>> = vec![Vec::with_capacity(n); urls.len()];
    let mut cpu = vec![(0u64, 0u64); urls.len()];
    let pid = |i: usize| pids.get(i).copied().unwrap_or_default();
    let usage = |i: usize| (cpu_ns(pid(i).envoy), cpu_ns(pid(i).sidecar));
    let each = warmup + per_round;
    let turn = match turns {
        Turns::Blocks => each,
        Turns::Of(k) => k.max(1),
    };
    for _ in 0..ROUNDS {
        let before: Vec<(u64, u64)> = (0..urls.len()).map(usage).collect();
        for start in (0..each).step_by(turn) {
            for (url, samples_of) in urls.iter().zip(&mut all) {
                for k in start..(start + turn).min(each) {
                    let took = one(client, method, url, &body).await?;
                    if k >= warmup {
                        samples_of.push(took);
                    }
                }
            }
        }
        for (i, (b, c)) in before.into_iter().zip(&mut cpu).enumerate() {
            let (envoy, sidecar) = usage(i);
            c.0 += envoy.saturating_sub(b.0);
            c.1 += sidecar.saturating_sub(b.1);
        }
    }
    let requests = (ROUNDS * (per_round + warmup)) as f64;
    Ok(all
        .into_iter()
        .zip(cpu)
        .map(|(mut s, (envoy, sidecar))| {
            s.sort_unstable();
            Latency {
                p50_us: percentile(&s, 0.5),
                p99_us: percentile(&s, 0.99),
                cpu_us: envoy as f64 / 1e3 / requests,
                sidecar_cpu_us: sidecar as f64 / 1e3 / requests,
            }
        })
        .collect())
}

/// Requests done by `concurrency` clients in about `seconds`, and the seconds it really took.
async fn throughput(
    client: &reqwest::Client,
    url: &str,
    body: &[u8],
    concurrency: usize,
    seconds: u64,
) -> Result<(f64, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let body = Bytes::copy_from_slice(body);
    let mut tasks = Vec::new();
    let start = Instant::now();
    for _ in 0..concurrency {
        let (client, url, body, stop) = (client.clone(), url.to_owned(), body.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = client
                    .post(&url)
                    .header("authorization", "Bearer bench")
                    .body(body.clone())
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        done += 1;
                    }
                    _ => return Err(format!("{url}: a request failed")),
                }
            }
            Ok(done)
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in tasks {
        match t.await {
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => bail!("{e}"),
            Err(e) => bail!("{e}"),
        }
    }
    Ok((total as f64, start.elapsed().as_secs_f64()))
}

/// Prints one case: p50/p99 and the p50 ratio to the first Envoy, then a line with each
/// Envoy's CPU time per request and its ratio; records a miss when the last Envoy's p50 ratio is
/// over `limit`.
fn print_row(name: &str, bytes: usize, figures: &[Latency], limit: f64, missed: &mut Vec<String>) {
    let Some(base) = figures.first() else {
        return;
    };
    print!("{name:<18} {bytes:>9}");
    for f in figures {
        print!(" {:>12}", format!("{:.0}/{:.0}us", f.p50_us, f.p99_us));
        print!(" {:>6.2}x", f.p50_us / base.p50_us);
    }
    println!();
    print!("{:<18} {:>9}", "  Envoy CPU/req", "");
    for f in figures {
        print!(" {:>12}", format!("{:.0}us", f.cpu_us));
        print!(" {:>6.2}x", f.cpu_us / base.cpu_us);
    }
    println!();
    print!("{:<18} {:>9}", "  sidecar CPU/req", "");
    for f in figures {
        print!(" {:>12} {:>7}", format!("{:.0}us", f.sidecar_cpu_us), "");
    }
    println!();
    let ratio = figures.last().map_or(0.0, |f| f.p50_us / base.p50_us);
    if ratio > limit {
        missed.push(format!("{name}: p50 ratio {ratio:.2} > {limit}"));
    }
}

/// One Envoy of the comparison.
struct Setup {
    label: String,
    port: u16,
    pids: Pids,
}

fn url(setup: &Setup, path: &str) -> String {
    format!("http://127.0.0.1:{}{path}", setup.port)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let strict = args.iter().any(|a| a == "--strict");
    // `--queries`: only the query rows (a quick look at the per-request cost). `--variant
    // LABEL=PATH`: one more Envoy running another build of the filter, next to the others.
    let queries_only = args.iter().any(|a| a == "--queries");
    // `--hostcall-cost`: one more Envoy, the empty filter making 20 hostcalls per request.
    let hostcall_cost = args.iter().any(|a| a == "--hostcall-cost");
    // `--group-commit`: two more Envoys, the empty filter sending a stand-in eviction per
    // request whose response waits for it, from the request itself or grouped by the worker's
    // root context (what batching the product's evictions would save).
    let group_commit = args.iter().any(|a| a == "--group-commit");
    // `--spin-cost`: one more Envoy, the empty filter hashing 16 KiB per request (plain wasm
    // work): what a known loop costs in Envoy's engine against the same loop run natively.
    let spin_cost = args.iter().any(|a| a == "--spin-cost");
    // `--floor`: four more Envoys, the empty filter making the reads any query-reading filter
    // must make (headers, body, status), those plus a rewrite's writes (body, length), and those
    // plus the filter's own query core run inside it: the rewrite alone (`plan`), and the whole
    // decision core without the product's glue (`exchange`; `make wasm-floor`).
    let floor = args.iter().any(|a| a == "--floor");
    // `--slow-breakdown`: the 5 ms-upstream row with the breakdown's Envoys too (empty filter,
    // the filter without callouts, with callouts answered at once), not only the two ends.
    let slow_breakdown = args.iter().any(|a| a == "--slow-breakdown");
    // `--sidecar-threads N`: one more Envoy running the product, whose sidecar serves with N
    // threads (`SIDECAR_WORKER_THREADS`; the others have the default, one per core).
    let sidecar_threads: Option<usize> = match args.windows(2).find(|w| w[0] == "--sidecar-threads") {
        Some(w) => match w[1].parse() {
            Ok(n) => Some(n),
            Err(_) => bail!("--sidecar-threads takes a number of threads, got {:?}", w[1]),
        },
        None => None,
    };
    // `--sidecar-h2`: one more Envoy running the product, whose callouts reach its sidecar over
    // HTTP/2 (one h2c connection) instead of HTTP/1.1.
    let sidecar_h2 = args.iter().any(|a| a == "--sidecar-h2");
    // `--profile-throughput SECONDS`: only the product, 16 clients sending 1-row writes for that
    // long, its Envoy's and sidecar's pids written to `target/gateway-bench.pids` first (for
    // `perf record -p`).
    let profile_seconds: Option<u64> = match args.windows(2).find(|w| w[0] == "--profile-throughput") {
        Some(w) => match w[1].parse() {
            Ok(n) => Some(n),
            Err(_) => bail!("--profile-throughput takes seconds, got {:?}", w[1]),
        },
        None => None,
    };
    // `--quick`: the small requests only (1-row writes, the 5 ms-upstream row, the queries, the
    // 1-row throughput).
    let quick = args.iter().any(|a| a == "--quick");
    let variants: Vec<(String, PathBuf)> = args
        .windows(2)
        .filter(|w| w[0] == "--variant")
        .filter_map(|w| {
            w[1].split_once('=')
                .map(|(l, p)| (l.to_owned(), PathBuf::from(p)))
        })
        .collect();
    // `--setting LABEL=JSON`: one more Envoy running this filter with that plugin configuration,
    // and a sidecar of its own (to compare a setting).
    let settings: Vec<(String, String)> = args
        .windows(2)
        .filter(|w| w[0] == "--setting")
        .filter_map(|w| w[1].split_once('=').map(|(l, c)| (l.to_owned(), c.to_owned())))
        .collect();
    let spin_config = format!("spin:{SPIN_ROUNDS}");
    let wasm = root().join("target/wasm32-wasip1/release/hevlayer_filter.wasm");
    let empty = root().join("target/wasm32-wasip1/release/hevlayer_empty_filter.wasm");
    for module in [&wasm, &empty] {
        if !module.exists() {
            bail!("{} is missing: run `make bench-gateway`", module.display());
        }
    }
    // `--floor`'s `plan` and `exchange` modes: the empty filter built with the filter's core.
    let cored = root().join("target/floor/wasm32-wasip1/release/hevlayer_empty_filter.wasm");
    if floor && !cored.exists() {
        bail!("{} is missing: run `make wasm-floor`", cored.display());
    }
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(32)
        .build()?;
    let upstream = start_upstream(Duration::ZERO).await?;
    let slow_upstream = start_upstream(Duration::from_millis(5)).await?;
    let stub = start_mirror_stub().await?;
    let stream_stubs = if group_commit {
        [
            start_stream_stub(&STREAM_MESSAGES[0]).await?,
            start_stream_stub(&STREAM_MESSAGES[1]).await?,
        ]
    } else {
        [0, 0]
    };
    let sidecar = free_port()?;
    // "mirror waits" has a sidecar of its own, so that each sidecar's CPU is one Envoy's; so
    // does each `--setting`.
    let waits_sidecar = free_port()?;
    let setting_sidecars = settings
        .iter()
        .map(|_| free_port())
        .collect::<Result<Vec<u16>>>()?;
    let threads_sidecar = free_port()?;
    let h2_sidecar = free_port()?;
    let mut with_sidecar = vec![sidecar, waits_sidecar];
    with_sidecar.extend(&setting_sidecars);
    if sidecar_threads.is_some() {
        with_sidecar.push(threads_sidecar);
    }
    if sidecar_h2 {
        with_sidecar.push(h2_sidecar);
    }
    let mut procs = Procs(Vec::new());
    // The first is the baseline, the last the product; the ones between show where the product's
    // extra time goes.
    let plan = [
        ("no filter", Filter::None, stub),
        ("empty wasm filter", Filter::Wasm(&empty, None), stub),
        ("empty, buffering", Filter::Wasm(&empty, Some("buffer")), stub),
        // The filter's defaults with a callout cluster Envoy does not have: every mirror callout
        // fails at dispatch, so this is the filter's own work without the callout hop.
        (
            "filter, no callout",
            Filter::Wasm(
                &wasm,
                Some(r#"{"auth_mode":"passthrough","sidecar_cluster":"absent"}"#),
            ),
            stub,
        ),
        ("instant mirror", Filter::Wasm(&wasm, None), stub),
        // The product as it was: every write's 2xx waits for its mirror.
        (
            "mirror waits",
            Filter::Wasm(&wasm, Some(r#"{"evict_ahead_max_ids":0}"#)),
            waits_sidecar,
        ),
        ("hevlayer", Filter::Wasm(&wasm, None), sidecar),
    ];
    let mut setups = Vec::new();
    let mut admins = Vec::new();
    // Variants go before the product, which stays last.
    let (product_plan, others) = plan.split_last().map_or((None, &plan[..]), |(p, o)| (Some(p), o));
    let mut all: Vec<(String, Filter<'_>, u16)> = others
        .iter()
        .map(|(label, filter, port)| ((*label).to_owned(), *filter, *port))
        .collect();
    all.extend(
        variants
            .iter()
            // The defaults of whatever build it is: the rendered configuration may carry
            // fields an older build does not know (and would refuse).
            .map(|(label, path)| (label.clone(), Filter::Wasm(path.as_path(), Some("{}")), stub)),
    );
    if group_commit {
        for (label, mode) in [
            ("empty, own callout", "callout"),
            ("empty, grouped callout", "grouped"),
            ("empty, grouped on a stream", "streamed"),
            ("empty, own message on a stream", "direct"),
        ] {
            all.push((label.to_owned(), Filter::Wasm(&empty, Some(mode)), stub));
        }
    }
    if hostcall_cost {
        all.push((
            "empty, 20 hostcalls".to_owned(),
            Filter::Wasm(&empty, Some("calls:20")),
            stub,
        ));
    }
    if floor {
        for mode in ["reads", "rewrites"] {
            all.push((format!("empty, {mode}"), Filter::Wasm(&empty, Some(mode)), stub));
        }
        for mode in ["plan", "exchange"] {
            all.push((format!("empty, {mode}"), Filter::Wasm(&cored, Some(mode)), stub));
        }
    }
    if spin_cost {
        all.push((
            format!("empty, spin {SPIN_ROUNDS}"),
            Filter::Wasm(&empty, Some(&spin_config)),
            stub,
        ));
    }
    all.extend(
        settings
            .iter()
            .zip(&setting_sidecars)
            .map(|((label, config), port)| (label.clone(), Filter::Wasm(&wasm, Some(config)), *port)),
    );
    if let Some(n) = sidecar_threads {
        all.push((
            format!("sidecar {n} thread(s)"),
            Filter::Wasm(&wasm, None),
            threads_sidecar,
        ));
    }
    if sidecar_h2 {
        all.push((
            "sidecar over h2".to_owned(),
            Filter::Wasm(&wasm, None),
            h2_sidecar,
        ));
    }
    all.extend(product_plan.map(|(label, filter, port)| ((*label).to_owned(), *filter, *port)));
    for (i, (label, filter, sidecar_port)) in all.into_iter().enumerate() {
        let link = if sidecar_port == h2_sidecar {
            Link::Http2
        } else if matches!(filter, Filter::Wasm(_, Some("streamed"))) {
            Link::Stream(stream_stubs[0])
        } else if matches!(filter, Filter::Wasm(_, Some("direct"))) {
            Link::Stream(stream_stubs[1])
        } else {
            Link::Http1
        };
        let (port, admin, pid) = start_envoy(
            &mut procs,
            &format!("envoy-{i}"),
            filter,
            upstream,
            sidecar_port,
            link,
        )?;
        // The Envoys whose callouts go to a sidecar have one each.
        let sidecar_pid = if with_sidecar.contains(&sidecar_port) {
            let threads = if sidecar_port == threads_sidecar {
                sidecar_threads.unwrap_or(0)
            } else {
                0
            };
            start_sidecar(&mut procs, sidecar_port, port, threads)?
        } else {
            0
        };
        setups.push(Setup {
            label,
            port,
            pids: Pids {
                envoy: pid,
                sidecar: sidecar_pid,
            },
        });
        admins.push(admin);
    }
    let Some(product) = setups.last() else {
        bail!("no Envoys were started")
    };
    let product_sidecar = product.pids.sidecar;
    // The same two ends in front of an upstream that answers after 5 ms, nearer a real
    // Turbopuffer: how much of a write's time the gateway adds there.
    let mut slow_plan = vec![("no filter", Filter::None, stub)];
    if slow_breakdown {
        slow_plan.extend(plan[1..plan.len() - 1].iter().copied());
    }
    slow_plan.push(("hevlayer", Filter::Wasm(&wasm, None), sidecar));
    let mut slow = Vec::new();
    for (i, (label, filter, sidecar_port)) in slow_plan.into_iter().enumerate() {
        let (port, admin, pid) = start_envoy(
            &mut procs,
            &format!("envoy-slow-{i}"),
            filter,
            slow_upstream,
            sidecar_port,
            Link::Http1,
        )?;
        slow.push(Setup {
            label: label.to_owned(),
            port,
            pids: Pids {
                envoy: pid,
                // The slow Envoys share the fast ones' sidecars (measured at another time).
                sidecar: if sidecar_port == sidecar {
                    product_sidecar
                } else {
                    0
                },
            },
        });
        admins.push(admin);
    }
    for admin in &admins {
        wait_ready(&client, &format!("http://127.0.0.1:{admin}/ready")).await?;
    }
    for port in &with_sidecar {
        wait_ready(&client, &format!("http://127.0.0.1:{port}/healthz")).await?;
    }

    if let Some(seconds) = profile_seconds {
        let pids = format!("{} {}\n", product.pids.envoy, product_sidecar);
        std::fs::write(root().join("target/gateway-bench.pids"), pids)?;
        let url = format!("http://127.0.0.1:{}/v2/namespaces/bench", product.port);
        let (n, elapsed) = throughput(&client, &url, &write_body(1, 768), 16, seconds).await?;
        println!("{}: {:.0} writes/s", product.label, n / elapsed);
        drop(procs);
        return Ok(());
    }
    println!("gateway benchmark: Envoy 1.40, one worker each, in front of an upstream that answers at once;");
    println!("vectors as base64 like the official clients send them. p50 (and p99) per Envoy, and the ratio");
    println!("to the Envoy without a filter measured in the same run:");
    println!("  empty wasm filter: a proxy-wasm filter that only creates its context (any filter's floor)");
    println!("  empty, buffering:  the same, holding each request until its whole body is in");
    println!("  filter, no callout: the hevlayer filter with a callout cluster Envoy lacks (the filter's own work)");
    println!("  instant mirror:    the hevlayer filter, its callouts answered at once by a stand-in");
    println!("  mirror waits:      the hevlayer filter and the sidecar, every 2xx waiting for its mirror");
    println!("  hevlayer:          the hevlayer filter and the sidecar (the product: evictions ahead,");
    println!("                     mirrors after the response)");
    print!("{:<18} {:>9}", "request", "bytes");
    for setup in &setups {
        print!(" {:>20}", setup.label);
    }
    println!();
    // (name, body, requests, the product's p50 ratio target)
    let cases = [
        ("1 row", write_body(1, 768), 2000, 1.35),
        ("100 x 768", write_body(100, 768), 300, 1.20),
        ("100 x 768 numbers", write_body_numbers(100, 768), 200, 1.30),
        ("10,000 small rows", small_rows_body(10_000), 100, 1.30),
        ("10,000 x 768", write_body(10_000, 768), 30, 1.25),
    ];
    let mut missed = Vec::new();
    let writes: Vec<String> = setups.iter().map(|s| url(s, "/v2/namespaces/bench")).collect();
    let pids: Vec<Pids> = setups.iter().map(|s| s.pids).collect();
    let labels: Vec<&str> = setups.iter().map(|s| s.label.as_str()).collect();
    let mut chart = Vec::new();
    let chosen = cases
        .iter()
        .filter(|_| !queries_only)
        .filter(|(name, ..)| !quick || *name == "1 row");
    for (name, body, n, limit) in chosen {
        // Short requests take short turns; longer ones one turn per round.
        let turns = if body.len() < 64 * 1024 {
            Turns::Of(SHORT_TURN)
        } else {
            Turns::Blocks
        };
        let figures = latencies(&client, "POST", &writes, &pids, body, *n, turns).await?;
        print_row(name, body.len(), &figures, *limit, &mut missed);
        chart.push(serde_json::json!({
            "case": name,
            "bytes": body.len(),
            "labels": labels,
            "p50_us": figures.iter().map(|f| f.p50_us).collect::<Vec<_>>(),
            "envoy_cpu_us": figures.iter().map(|f| f.cpu_us).collect::<Vec<_>>(),
            "sidecar_cpu_us": figures.iter().map(|f| f.sidecar_cpu_us).collect::<Vec<_>>(),
        }));
    }
    if !chart.is_empty() && !quick {
        // For `tests/tools/bench_chart.py`, which draws the README's chart from it.
        let out = root().join(".run/bench/gateway.json");
        std::fs::write(&out, serde_json::to_vec_pretty(&chart)?)?;
        println!("write figures saved to {}", out.display());
    }
    if !queries_only {
        let slow_writes: Vec<String> = slow.iter().map(|s| url(s, "/v2/namespaces/bench")).collect();
        let slow_pids: Vec<Pids> = slow.iter().map(|s| s.pids).collect();
        let body = &cases[0].1;
        let f = latencies(
            &client,
            "POST",
            &slow_writes,
            &slow_pids,
            body,
            600,
            Turns::Of(SHORT_TURN),
        )
        .await?;
        let last = f.len() - 1;
        let ratio = f[last].p50_us / f[0].p50_us;
        println!(
            "1 row, upstream answering after 5 ms: p50 {:.0}us without the filter, {:.0}us hevlayer ({ratio:.3}x)",
            f[0].p50_us, f[last].p50_us
        );
        for (setup, figures) in slow.iter().zip(&f).skip(1).take(last.saturating_sub(1)) {
            println!(
                "  {}: p50 {:.0}us ({:.3}x), Envoy CPU {:.0}us per request",
                setup.label,
                figures.p50_us,
                figures.p50_us / f[0].p50_us,
                figures.cpu_us
            );
        }
        if ratio > 1.03 {
            missed.push(format!("1 row with a 5 ms upstream: p50 ratio {ratio:.3} > 1.03"));
        }
    }

    let one = &cases[0].1;
    let queries: Vec<String> = setups
        .iter()
        .map(|s| url(s, "/v2/namespaces/bench/query"))
        .collect();
    let small = br#"{"rank_by":["id","asc"],"top_k":1}"#.to_vec();
    let mut figures_of_35b = Vec::new();
    for (name, body, limit) in [
        ("query, 35 B", small, f64::INFINITY),
        ("query 1 KB", query_body(false), f64::INFINITY),
        ("query 1 KB, as_of", query_body(true), 1.15),
    ] {
        let figures = latencies(
            &client,
            "POST",
            &queries,
            &pids,
            &body,
            2000,
            Turns::Of(SHORT_TURN),
        )
        .await?;
        print_row(name, body.len(), &figures, limit, &mut missed);
        if figures_of_35b.is_empty() {
            figures_of_35b = figures;
        }
    }
    if spin_cost {
        spin_report(&setups, &figures_of_35b)?;
    }
    if queries_only {
        callout_stats(&client, &setups, &admins).await?;
        drop(procs);
        return report(&missed, strict);
    }
    print!("{:<24}", "1 row, 16 clients");
    // Interleaved like the latencies: one second per Envoy per round.
    let mut done = vec![(0.0, 0.0); setups.len()];
    for _ in 0..3 {
        for (url, (requests, seconds)) in writes.iter().zip(&mut done) {
            let (n, elapsed) = throughput(&client, url, one, 16, 1).await?;
            *requests += n;
            *seconds += elapsed;
        }
    }
    let rates: Vec<f64> = done.iter().map(|(n, s)| n / s).collect();
    let product_ratio = rates.last().map_or(0.0, |r| r / rates[0]);
    for rps in &rates {
        print!(" {:>12} {:>6.2}x", format!("{rps:.0}/s"), rps / rates[0]);
    }
    println!();
    if product_ratio < 0.6 {
        missed.push(format!("throughput ratio {product_ratio:.2} < 0.6"));
    }
    if quick {
        callout_stats(&client, &setups, &admins).await?;
        drop(procs);
        return report(&missed, strict);
    }

    let chunks = br#"{"chunks":[{"id":"c1","text":"a short chunk of staged text"}]}"#;
    let create = r#"{"id":"bench","target_namespace":"bench-target"}"#;
    client
        .post(format!("http://127.0.0.1:{sidecar}/v2/pipelines"))
        .header("content-type", "application/json")
        .body(create)
        .send()
        .await?;
    let stage = [
        url(product, "/v2/pipelines/bench/documents/d1"),
        format!("http://127.0.0.1:{sidecar}/v2/pipelines/bench/documents/d1"),
    ];
    let Ok([via, direct]) = <[Latency; 2]>::try_from(
        latencies(&client, "PUT", &stage, &[], chunks, 1000, Turns::Of(SHORT_TURN)).await?,
    ) else {
        bail!("two stage figures expected");
    };
    println!(
        "stage route p50/p99: {:.0}/{:.0}us through Envoy, {:.0}/{:.0}us sidecar direct ({:.2}x at p50)",
        via.p50_us,
        via.p99_us,
        direct.p50_us,
        direct.p99_us,
        via.p50_us / direct.p50_us
    );
    callout_stats(&client, &setups, &admins).await?;
    drop(procs);
    report(&missed, strict)
}

/// What the callouts did: connection reuse on the callout cluster (a new connection per callout
/// would be a cost of its own) and the filter's mirror counters, per Envoy.
async fn callout_stats(client: &reqwest::Client, setups: &[Setup], admins: &[u16]) -> Result<()> {
    for (setup, admin) in setups.iter().zip(admins) {
        let stats = client
            .get(format!(
                "http://127.0.0.1:{admin}/stats?filter=^(cluster\\.layer_(sidecar|stream)\\.upstream_(cx|rq)_total|wasmcustom\\.hevlayer\\.((mirror|evict_ahead)_.*|eviction_groups))$"
            ))
            .send()
            .await?
            .text()
            .await?;
        let figures: Vec<&str> = stats.lines().map(str::trim).collect();
        println!("{}: {}", setup.label, figures.join(", "));
    }
    for (mode, answered) in ["streamed", "direct"].iter().zip(&STREAM_MESSAGES) {
        let n = answered.load(Ordering::Relaxed);
        if n > 0 {
            println!("gRPC stand-in ({mode}): {n} messages answered");
        }
    }
    Ok(())
}

/// Prints the targets missed (with `strict`, an error when there are any).
fn report(missed: &[String], strict: bool) -> Result<()> {
    if missed.is_empty() {
        println!("targets met");
        return Ok(());
    }
    for m in missed {
        println!("TARGET MISSED: {m}");
    }
    if strict {
        bail!("{} gateway benchmark target(s) missed", missed.len());
    }
    Ok(())
}
