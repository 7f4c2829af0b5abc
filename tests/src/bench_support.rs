//! Shared pieces of the benchmarks: a best-of-rounds timer and a driver that pushes whole write
//! requests through the built filter in the proxy-wasm host.

use std::hint::black_box;
use std::time::{Duration, Instant};
use wasmtime::Result;

/// Runs a closure repeatedly and reports the best seconds per call over several rounds (the
/// machines are shared and noisy; the best round is the least disturbed one).
pub struct Timer {
    pub rounds: u32,
    pub round_time: Duration,
}

impl Default for Timer {
    fn default() -> Self {
        Timer {
            rounds: 5,
            round_time: Duration::from_millis(300),
        }
    }
}

impl Timer {
    pub fn best(&self, mut f: impl FnMut() -> Result<u32>) -> Result<f64> {
        black_box(f()?);
        let mut best = f64::INFINITY;
        for _ in 0..self.rounds {
            let start = Instant::now();
            let mut calls = 0u32;
            while start.elapsed() < self.round_time || calls == 0 {
                black_box(f()?);
                calls += 1;
            }
            best = best.min(start.elapsed().as_secs_f64() / f64::from(calls));
        }
        Ok(best)
    }
}

/// The benchmarks' 1 KB vector query (110 numbers, a caller filter), with `as_of` or without.
pub fn query_body(as_of: bool) -> Vec<u8> {
    let vector: Vec<String> = (0..110)
        .map(|i| format!("{:.4}", (i as f32 * 0.37).sin()))
        .collect();
    let as_of = if as_of { r#","as_of":1795000000000"# } else { "" };
    format!(
        r#"{{"rank_by":["vector","ANN",[{}]],"top_k":10,"include_attributes":["title"],"filters":["title","NotEq",null]{as_of}}}"#,
        vector.join(",")
    )
    .into_bytes()
}

/// Pushes whole write requests through the built filter, as Envoy would deliver them.
pub struct FilterRun {
    vm: crate::wasm_host::Vm,
    /// The timer's period between lingers (the refresh period).
    refresh_ms: u32,
}

impl FilterRun {
    pub fn new() -> Result<Self> {
        Self::with_config("{}")
    }

    fn of_vm(vm: crate::wasm_host::Vm) -> Self {
        let refresh_ms = vm.tick_period_ms();
        FilterRun { vm, refresh_ms }
    }

    /// A run of another build (the empty filter, say) under a plugin configuration.
    pub fn of_module(path: &std::path::Path, config: &str) -> Result<Self> {
        Ok(Self::of_vm(crate::wasm_host::Plugin::load(path)?.start(config)?))
    }

    /// A run of this filter that counts its hostcalls by name (not for timings).
    pub fn counting_hostcalls() -> Result<Self> {
        Ok(Self::of_vm(
            crate::wasm_host::filter()?.start_counting_hostcalls("{}")?,
        ))
    }

    /// The VM the run drives (to count its crossings, say).
    pub fn vm_mut(&mut self) -> &mut crate::wasm_host::Vm {
        &mut self.vm
    }

    /// A run under a plugin configuration (JSON).
    pub fn with_config(config: &str) -> Result<Self> {
        Ok(Self::of_vm(crate::wasm_host::filter()?.start(config)?))
    }

    /// One write: headers and the body in 64 KiB chunks until the stamped body goes upstream,
    /// then a response: with `respond` a 2xx, with the callouts it brings answered at once (the
    /// eviction ahead and the mirror the root context sends after the response, or the mirror
    /// the response waits for), else a 429 (a refused write: nothing to mirror; a stream that
    /// ended with no answer at all would be a hang-up, whose fence scans the body again).
    /// Returns the size of the body the upstream received.
    pub fn write(&mut self, body: &[u8], respond: bool) -> Result<u32> {
        let len = body.len().to_string();
        let mut s = self.vm.stream()?;
        s.request_headers(
            &[
                (":method", "POST"),
                (":path", "/v2/namespaces/bench"),
                ("authorization", "Bearer bench"),
                ("content-type", "application/json"),
                ("content-length", &len),
            ],
            false,
        )?;
        s.request_body_chunked(body, 64 * 1024)?;
        if !s.reached_upstream() {
            wasmtime::bail!(
                "the filter did not forward the benchmark write: {:?}",
                s.local_reply()
            );
        }
        let sent = u32::try_from(s.upstream_body().len())?;
        let answer: crate::wasm_host::Answer<'_> =
            (200, &[("content-type", "application/json")], b"{\"applied\":1}");
        if !respond {
            s.respond(
                429,
                &[("content-type", "application/json")],
                br#"{"status":"error"}"#,
                "via_upstream",
            )?;
            s.finish()?;
            return Ok(sent);
        }
        // The eviction ahead (if any) is answered while the upstream works.
        if let Some(token) = s.callouts().first().map(|c| c.token) {
            s.answer_callout(token, Some(answer))?;
        }
        let answered = s.callouts().len();
        s.respond(
            200,
            &[("content-type", "application/json")],
            br#"{"status":"OK"}"#,
            "via_upstream",
        )?;
        // A mirror the response waits for.
        if let Some(token) = s.callouts().get(answered).map(|c| c.token) {
            s.answer_callout(token, Some(answer))?;
        }
        s.finish()?;
        // The mirror lingers: Envoy's timer would fire the tick that sends it.
        if self.vm.tick_period_ms() != self.refresh_ms {
            self.vm.tick()?;
        }
        // A mirror the root context sent after the response (one write at a time: a batch of one).
        let batch: crate::wasm_host::Answer<'_> = (
            200,
            &[("content-type", "application/json")],
            b"{\"applied\":[true]}",
        );
        let tokens: Vec<u32> = self.vm.root_callouts().iter().map(|c| c.token).collect();
        for token in tokens {
            self.vm.answer_callout(token, Some(batch))?;
        }
        self.vm.forget_root_callouts();
        Ok(sent)
    }

    /// One query: headers, the body in one piece, the (rewritten) body read back, and a 200.
    /// Returns the size of the body the upstream received.
    pub fn query(&mut self, body: &[u8]) -> Result<u32> {
        let len = body.len().to_string();
        let mut s = self.vm.stream()?;
        s.request_headers(
            &[
                (":method", "POST"),
                (":path", "/v2/namespaces/bench/query"),
                ("authorization", "Bearer bench"),
                ("content-type", "application/json"),
                ("content-length", &len),
                ("x-request-id", "bench"),
            ],
            false,
        )?;
        s.request_body(body, true)?;
        if !s.reached_upstream() {
            wasmtime::bail!(
                "the filter did not forward the benchmark query: {:?}",
                s.local_reply()
            );
        }
        let sent = u32::try_from(s.upstream_body().len())?;
        s.respond(
            200,
            &[("content-type", "application/json")],
            br#"{"rows":[]}"#,
            "via_upstream",
        )?;
        s.finish()?;
        Ok(sent)
    }

    pub fn memory_bytes(&self) -> usize {
        self.vm.memory_bytes()
    }
}
