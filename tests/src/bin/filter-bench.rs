//! `make bench-filter`: the write filter's throughput on three generated write bodies, measured in
//! one run four ways — the core natively, the core inside wasmtime (bench-only module), the whole
//! built filter `.wasm` through our proxy-wasm host — next to a `serde_json::Value`
//! parse-and-reserialize baseline natively and inside wasmtime. Prints MB/s and ratios, and checks
//! that the filter's linear memory does not grow over 1,000 requests of the largest body.
//!
//! The targets (the whole filter in wasmtime) are printed as met or missed; with
//! `--strict` a missed one fails the run. The older checks (400 MB/s and 5x the Value baseline
//! on number arrays, flat linear memory) fail the run either way.

use base64::Engine as _;
use hevlayer_tests::bench_support::{query_body, FilterRun, Timer};
use std::path::PathBuf;
use wasmtime::error::Context;
use wasmtime::{bail, Result};
use wasmtime::{Engine, Instance, Linker, Module, Store, TypedFunc};

struct Fixture {
    name: &'static str,
    body: Vec<u8>,
}

/// A deterministic pseudo-random stream, so every run measures the same bytes.
struct Lcg(u64);

impl Lcg {
    fn next_f32(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn fixtures() -> Vec<Fixture> {
    let mut rng = Lcg(42);
    let dims = 1536;
    let mut numbers = String::from("{\"upsert_rows\":[");
    let mut base64 = String::from("{\"upsert_rows\":[");
    for i in 0..100 {
        let v: Vec<f32> = (0..dims).map(|_| rng.next_f32()).collect();
        if i > 0 {
            numbers.push(',');
            base64.push(',');
        }
        let text: Vec<String> = v.iter().map(|f| f.to_string()).collect();
        numbers.push_str(&format!(
            "{{\"id\":{i},\"vector\":[{}],\"title\":\"document {i}\",\"source\":\"bench\"}}",
            text.join(",")
        ));
        let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
        base64.push_str(&format!(
            "{{\"id\":{i},\"vector\":\"{}\",\"title\":\"document {i}\",\"source\":\"bench\"}}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        ));
    }
    numbers.push_str("],\"distance_metric\":\"cosine_distance\"}");
    base64.push_str("],\"distance_metric\":\"cosine_distance\"}");
    let mut small = String::from("{\"upsert_rows\":[");
    for i in 0..10_000 {
        if i > 0 {
            small.push(',');
        }
        small.push_str(&format!(
            "{{\"id\":\"doc-{i}\",\"title\":\"title {i}\",\"score\":{},\"tags\":[\"a\",\"b\"],\"published\":true}}",
            i % 97
        ));
    }
    small.push_str("]}");
    vec![
        Fixture {
            name: "100 x 1536 numbers",
            body: numbers.into_bytes(),
        },
        Fixture {
            name: "100 x 1536 base64",
            body: base64.into_bytes(),
        },
        Fixture {
            name: "10,000 small rows",
            body: small.into_bytes(),
        },
    ]
}

/// The bench-only module: the same core and baseline compiled to wasm.
struct BenchModule {
    store: Store<()>,
    instance: Instance,
    alloc: TypedFunc<u32, u32>,
    free: TypedFunc<(u32, u32), ()>,
}

impl BenchModule {
    fn load(engine: &Engine, path: &PathBuf) -> Result<Self> {
        let module = Module::from_file(engine, path)
            .with_context(|| format!("{} (build it with `make bench-filter`)", path.display()))?;
        let mut store = Store::new(engine, ());
        let mut linker = Linker::new(engine);
        linker.define_unknown_imports_as_traps(&module)?;
        let instance = linker.instantiate(&mut store, &module)?;
        let alloc = instance.get_typed_func(&mut store, "bench_alloc")?;
        let free = instance.get_typed_func(&mut store, "bench_free")?;
        Ok(BenchModule {
            store,
            instance,
            alloc,
            free,
        })
    }

    /// Copies `body` in and runs `func` on it once; returns the output length.
    fn run(&mut self, func: &str, body: &[u8]) -> Result<u32> {
        let f: TypedFunc<(u32, u32), u32> = self.instance.get_typed_func(&mut self.store, func)?;
        let len = u32::try_from(body.len())?;
        let ptr = self.alloc.call(&mut self.store, len)?;
        let memory = self
            .instance
            .get_memory(&mut self.store, "memory")
            .context("no memory export")?;
        memory.write(&mut self.store, ptr as usize, body)?;
        let out = f.call(&mut self.store, (ptr, len))?;
        self.free.call(&mut self.store, (ptr, len))?;
        if out == u32::MAX {
            bail!("{func} refused the fixture");
        }
        Ok(out)
    }
}

/// One of the targets: a measured figure against its bound.
struct Target {
    what: String,
    measured: f64,
    bound: f64,
    unit: &'static str,
    /// True when the figure must stay at or below the bound (a time), false for a floor.
    ceiling: bool,
}

impl Target {
    fn floor(what: &str, measured: f64, bound: f64, unit: &'static str) -> Self {
        Target {
            what: what.to_owned(),
            measured,
            bound,
            unit,
            ceiling: false,
        }
    }

    fn ceiling(what: &str, measured: f64, bound: f64, unit: &'static str) -> Self {
        Target {
            ceiling: true,
            ..Target::floor(what, measured, bound, unit)
        }
    }

    fn met(&self) -> bool {
        if self.ceiling {
            self.measured <= self.bound
        } else {
            self.measured >= self.bound
        }
    }

    fn line(&self) -> String {
        format!(
            "{:<48} {:>9.1} {:<5} {} {:>7.0} {:<5} {}",
            self.what,
            self.measured,
            self.unit,
            if self.ceiling { "<=" } else { ">=" },
            self.bound,
            self.unit,
            if self.met() { "met" } else { "MISSED" }
        )
    }
}

/// The throughput floor for a fixture's whole-filter figure, in MB/s.
fn throughput_target(fixture: &str) -> Option<f64> {
    if fixture.contains("numbers") {
        Some(2_000.0)
    } else if fixture.contains("base64") {
        Some(5_000.0)
    } else if fixture.contains("small rows") {
        Some(1_000.0)
    } else {
        None
    }
}

fn workspace_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// The gateway benchmark's 1-row write: 4 KB, a 768-dim base64 vector.
fn one_row_body() -> String {
    let bytes: Vec<u8> = (0..768u32)
        .flat_map(|i| (i as f32 / 768.0).to_le_bytes())
        .collect();
    format!(
        "{{\"upsert_rows\":[{{\"id\":1,\"vector\":\"{}\",\"title\":\"one\"}}],\"distance_metric\":\"cosine_distance\"}}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// `--cold`: the 1 KB as_of query and a 1-row write through the empty filter and through this
/// one, in caches warm from the last request and in caches another program's data has just been
/// through (as Envoy's own work between a filter's callbacks leaves them), with the crossings
/// between host and module per request. In Envoy a request costs far more than its warm figure
/// here: this shows how much of that cold caches explain, and what a change to the path's
/// footprint does.
fn cold_report() -> Result<()> {
    let query = query_body(true);
    let write = one_row_body();
    let empty = workspace_file("target/wasm32-wasip1/release/hevlayer_empty_filter.wasm");
    // (label, run, whether it is this filter: the empty one cannot answer a write's callouts).
    let mut runs = [
        ("empty filter", FilterRun::of_module(&empty, "")?, false),
        ("hevlayer filter", FilterRun::new()?, true),
    ];
    // The 1 KB as_of query, and the 1-row write answered 2xx with its callouts.
    let request = |run: &mut FilterRun, ours: bool, kind: usize| -> Result<()> {
        match kind {
            0 => run.query(&query).map(drop),
            _ => run.write(write.as_bytes(), ours).map(drop),
        }
    };
    let kinds = ["1 KB as_of query", "1-row write (4 KB) with its callouts"];
    for (label, run, ours) in &mut runs {
        run.vm_mut().count_crossings();
        for (kind, name) in kinds.iter().enumerate() {
            request(run, *ours, kind)?;
            let before = run.vm_mut().crossings();
            request(run, *ours, kind)?;
            let after = run.vm_mut().crossings();
            println!(
                "{label}, {name}: {} hostcalls and {} calls into the module",
                after.into_host - before.into_host,
                after.into_module - before.into_module
            );
        }
    }
    let mut counting = FilterRun::counting_hostcalls()?;
    for (kind, name) in kinds.iter().enumerate() {
        request(&mut counting, true, kind)?;
        let before = counting.vm_mut().hostcalls();
        request(&mut counting, true, kind)?;
        let calls: Vec<String> = counting
            .vm_mut()
            .hostcalls()
            .into_iter()
            .map(|(import, n)| (import.clone(), n - before.get(&import).copied().unwrap_or(0)))
            .filter(|(_, n)| *n > 0)
            .map(|(import, n)| format!("{import} {n}"))
            .collect();
        println!("hevlayer filter, {name}, hostcalls: {}", calls.join(", "));
    }
    // 2 MiB: about this machine's L2 (the code and data then come from L3); 32 MiB: its L3 too.
    let sizes = [0usize, 2 << 20, 32 << 20];
    let mut junk = vec![0u8; 32 << 20];
    let requests = 2000u32;
    println!("us per request (best of 3) with the caches evicted by touching N MiB before each:");
    for (kind, name) in kinds.iter().enumerate() {
        for (label, run, ours) in &mut runs {
            let mut figures = Vec::new();
            for &size in &sizes {
                let mut best = f64::INFINITY;
                for _ in 0..3 {
                    let mut took = std::time::Duration::ZERO;
                    for round in 0..requests {
                        for i in (0..size).step_by(64) {
                            junk[i] = junk[i].wrapping_add(round as u8);
                        }
                        let started = std::time::Instant::now();
                        request(run, *ours, kind)?;
                        took += started.elapsed();
                    }
                    best = best.min(took.as_secs_f64() * 1e6 / f64::from(requests));
                }
                figures.push(format!("{} MiB {best:.1}", size >> 20));
            }
            println!("  {name}, {label}: {}", figures.join(", "));
        }
    }
    std::hint::black_box(&junk);
    Ok(())
}

fn main() -> Result<()> {
    let strict = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--strict") => true,
        // For `perf record` (with `HEVLAYER_PERFMAP=1` for the filter's symbols): only the 1-row
        // write with its callouts, 200,000 times; the small-rows write 3,000 times, the numbers
        // write 4,000 times or the base64 write 10,000 times, each answered 429 (the table's
        // "filter" column); or the 1 KB as_of query 300,000 times.
        Some("--profile-query") => {
            let mut filter = FilterRun::new()?;
            let query = query_body(true);
            for _ in 0..300_000 {
                filter.query(&query)?;
            }
            return Ok(());
        }
        Some(
            which @ ("--profile-one-row" | "--profile-small-rows" | "--profile-numbers" | "--profile-base64"),
        ) => {
            let mut filter = FilterRun::new()?;
            let mut fixtures = fixtures().into_iter().map(|f| f.body);
            let (body, times) = match which {
                "--profile-one-row" => (one_row_body().into_bytes(), 200_000),
                "--profile-numbers" => (fixtures.next().unwrap_or_default(), 4000),
                "--profile-base64" => (fixtures.nth(1).unwrap_or_default(), 10_000),
                _ => (fixtures.next_back().unwrap_or_default(), 3000),
            };
            for _ in 0..times {
                filter.write(&body, which == "--profile-one-row")?;
            }
            return Ok(());
        }
        Some("--cold") => return cold_report(),
        Some(other) => {
            bail!("unknown argument {other:?} (usage: filter-bench [--strict | --cold | --profile-one-row | --profile-small-rows | --profile-numbers | --profile-base64 | --profile-query])")
        }
    };
    let fixtures = fixtures();
    let engine = Engine::default();
    let bench_wasm = workspace_file("target/wasm32-wasip1/release/hevlayer_wasm_bench.wasm");
    let mut module = BenchModule::load(&engine, &bench_wasm)?;
    let mut filter = FilterRun::new()?;
    let timer = Timer::default();

    let mut failures = Vec::new();
    // The scanner's wasm SIMD paths against their byte-at-a-time reference, at every offset of
    // every fixture's first 64 KiB and of arbitrary bytes.
    let mut rng = Lcg(7);
    let noise: Vec<u8> = (0..65_536)
        .map(|_| {
            rng.next_f32();
            (rng.0 >> 33) as u8
        })
        .collect();
    let mut checked = 0;
    for bytes in fixtures
        .iter()
        .map(|f| &f.body[..f.body.len().min(65_536)])
        .chain([noise.as_slice()])
    {
        let wrong = module.run("bench_check_blocks", bytes)?;
        if wrong != 0 {
            failures.push(format!(
                "the wasm SIMD scanner paths disagree with the reference at {wrong} offsets"
            ));
        }
        checked += bytes.len();
    }
    println!("wasm SIMD scanner paths checked against the byte-at-a-time reference at {checked} offsets");
    println!(
        "filter benchmark (MB/s of client body; best of {} rounds)",
        timer.rounds
    );
    println!(
        "{:<20} {:>9} {:>8} {:>8} {:>10} {:>10} {:>8} {:>13} {:>9} {:>9}",
        "fixture",
        "bytes",
        "core",
        "value",
        "core-wasm",
        "value-wasm",
        "filter",
        "filter+mirror",
        "wasm/val",
        "filt/val"
    );
    let mut targets = Vec::new();

    for f in &fixtures {
        let body = f.body.as_slice();
        let mb = body.len() as f64 / 1e6;
        let core = mb / timer.best(|| Ok(hevlayer_wasm_bench::core(body)))?;
        let value = mb / timer.best(|| Ok(hevlayer_wasm_bench::value(body)))?;
        let core_wasm = mb / timer.best(|| module.run("bench_core", body))?;
        let value_wasm = mb / timer.best(|| module.run("bench_value", body))?;
        let whole = mb / timer.best(|| filter.write(body, false))?;
        let mirrored = mb / timer.best(|| filter.write(body, true))?;
        println!(
            "{:<20} {:>9} {:>8.0} {:>8.0} {:>10.0} {:>10.0} {:>8.0} {:>13.0} {:>8.1}x {:>8.1}x",
            f.name,
            body.len(),
            core,
            value,
            core_wasm,
            value_wasm,
            whole,
            mirrored,
            core_wasm / value_wasm,
            whole / value_wasm
        );
        if let Some(bound) = throughput_target(f.name) {
            targets.push(Target::floor(
                &format!("{}: filter in wasmtime", f.name),
                whole,
                bound,
                "MB/s",
            ));
        }
        if f.name.contains("numbers") {
            if whole < 400.0 {
                failures.push(format!(
                    "filter in wasmtime {whole:.0} MB/s < 400 MB/s on {}",
                    f.name
                ));
            }
            if whole < 5.0 * value_wasm {
                failures.push(format!(
                    "filter {:.1}x the wasm Value baseline < 5x on {}",
                    whole / value_wasm,
                    f.name
                ));
            }
        }
    }
    println!("columns: core/value = native; core-wasm/value-wasm = the same code inside wasmtime;");
    println!("         filter = the built filter .wasm through the proxy-wasm host: headers, the body in");
    println!("         64 KiB chunks, the stamped body read back, a 429 answer; filter+mirror answers 2xx");
    println!("         instead, with the mirror callout carrying the stamped write to the sidecar.");
    println!("         Ratios use value-wasm.");

    // The fixed cost of one request: the gateway benchmark's 1-row write (4 KB, a 768-dim base64
    // vector) through the whole filter, per request rather than per byte.
    let one_row = one_row_body();
    let alone = timer.best(|| filter.write(one_row.as_bytes(), false))?;
    let with_mirror = timer.best(|| filter.write(one_row.as_bytes(), true))?;
    println!(
        "1 row ({} bytes) through the whole filter in wasmtime: {:.1} us per request, {:.1} us with the 2xx and its mirror callout",
        one_row.len(),
        alone * 1e6,
        with_mirror * 1e6
    );

    targets.push(Target::ceiling(
        "1-row write through the whole filter",
        alone * 1e6,
        4.0,
        "us",
    ));
    targets.push(Target::ceiling(
        "1-row write with its mirror callout",
        with_mirror * 1e6,
        6.0,
        "us",
    ));

    // A 1 KB vector query with as_of (the gateway benchmark's): the read rewrite per request.
    let query = query_body(true);
    let per_query = timer.best(|| filter.query(&query))?;
    println!(
        "1 KB query with as_of ({} bytes) through the whole filter in wasmtime: {:.1} us per request",
        query.len(),
        per_query * 1e6
    );

    let largest = fixtures
        .iter()
        .max_by_key(|f| f.body.len())
        .map(|f| f.body.as_slice())
        .unwrap_or(&[]);
    let mut fresh = FilterRun::new()?;
    for _ in 0..10 {
        fresh.write(largest, true)?;
    }
    let after_10 = fresh.memory_bytes();
    for _ in 10..1000 {
        fresh.write(largest, true)?;
    }
    let after_1000 = fresh.memory_bytes();
    println!(
        "filter linear memory: {} KiB after 10 requests of the largest body, {} KiB after 1,000",
        after_10 / 1024,
        after_1000 / 1024
    );
    if after_1000 > after_10 {
        failures.push(format!(
            "linear memory grew from {after_10} to {after_1000} bytes"
        ));
    }
    targets.push(Target::ceiling(
        "linear memory growth over 1,000 largest bodies",
        (after_1000.saturating_sub(after_10) / 1024) as f64,
        0.0,
        "KiB",
    ));
    println!("issue targets (the whole filter in wasmtime):");
    for t in &targets {
        println!("  {}", t.line());
    }
    let missed = targets.iter().filter(|t| !t.met()).count();
    for f in &failures {
        println!("TARGET MISSED: {f}");
    }
    match (failures.len(), missed) {
        (0, 0) => {
            println!("verdict: all targets met");
            Ok(())
        }
        (0, m) if !strict => {
            println!("verdict: {m} issue target(s) missed (reported only; --strict fails on them)");
            Ok(())
        }
        (f, m) if strict => bail!("{f} check(s) failed, {m} issue target(s) missed"),
        (f, m) => bail!("{f} check(s) failed ({m} issue target(s) missed, reported only)"),
    }
}
