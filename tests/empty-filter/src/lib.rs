//! A proxy-wasm HTTP filter that does nothing but what every filter must: a context per request.
//! The gateway benchmark runs Envoy with it to show what loading any wasm filter into the request
//! path costs, next to the hevlayer filter and no filter at all. With the plugin configuration
//! `buffer` it also holds each request until the whole body is in (what validating a write before
//! anything goes upstream requires), without looking at it. With `calls:N` it makes N cheap
//! hostcalls (reading `:path`) on each request's headers: what one hostcall costs Envoy. With
//! `spin:N` it hashes a 1 KiB buffer N times (FNV-1a, byte by byte) on each request's headers:
//! what a known amount of plain wasm work costs in Envoy's engine, to set against the same loop
//! run natively (`spin_native` below, which the benchmark prints beside it). With `reads` it
//! buffers each request and makes the reads any filter that looks at a query must make (the
//! request headers, the whole body, the response status); with `rewrites` also the writes of a
//! rewrite (the body replaced, `content-length` set; both to what they were): the floor of a
//! query-rewriting filter, without any work of its own.
//!
//! Two more modes measure what batching a write's eviction through the root context would save
//! (the group commit issue 11 suggests), with nothing else of the product's work: with `callout`
//! each request, once its body is in, sends one callout to the sidecar cluster and goes on
//! upstream, and its response waits for that callout's answer (a write's eviction ahead, as the
//! product sends it today); with `grouped` the request instead hands its context id to the
//! worker's root context (through a shared queue that wakes it), which sends one callout for all
//! the requests waiting and, on its answer, resumes each request whose response waits
//! (`proxy_set_effective_context`, then `proxy_continue_stream`). With `streamed` the root sends
//! the same group as one message on a gRPC stream it keeps open to the cluster `layer_stream`
//! (opened when first needed, again after it closes), and the answer is the stand-in's next
//! message: what a group costs when it is not an HTTP callout of its own. With `direct` the root
//! only keeps that stream open (from its tick), and each request sends its own message on it
//! (with the root as its effective context for that one hostcall), no queue or wake-up between:
//! the answers come to the root in order, which settles the requests as with `grouped`.

#[cfg(target_arch = "wasm32")]
mod glue {
    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, BufferType, ContextType, MapType};
    use std::cell::RefCell;
    use std::collections::HashSet;
    use std::time::Duration;

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> {
            Box::new(Root { id, buffer: false, calls: 0, spin: 0, touch: 0, eviction: Eviction::None, queue: None })
        });
    }}

    /// How a request's stand-in eviction goes (`callout`, `grouped`).
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Eviction {
        None,
        OwnCallout,
        Grouped,
        Streamed,
        Direct,
    }

    /// A worker's grouped evictions: requests waiting to be sent, the batch in flight, the
    /// requests whose eviction is out and that have not ended, answers not yet seen by their
    /// request, and requests whose response waits.
    #[derive(Default)]
    struct Group {
        waiting: Vec<u32>,
        in_flight: Option<(u32, Vec<u32>)>,
        live: HashSet<u32>,
        answered: HashSet<u32>,
        parked: HashSet<u32>,
        /// `streamed`, `direct`: the open gRPC stream's token.
        stream: Option<u32>,
        /// `direct`: the requests whose message is out, in the order sent.
        sent: std::collections::VecDeque<u32>,
    }

    thread_local! {
        static GROUP: RefCell<Group> = RefCell::new(Group::default());
    }

    const CLUSTER: &str = "layer_sidecar";
    const STREAM_CLUSTER: &str = "layer_stream";

    /// Sends one message on the worker's stream (opening it first if need be); the token it went
    /// on, to match the answer.
    fn send_on_stream(g: &mut Group, ids: &[u32]) -> Option<u32> {
        let token = match g.stream {
            Some(token) => token,
            None => {
                let token =
                    hostcalls::open_grpc_stream(STREAM_CLUSTER, "hevlayer.Bench", "Evict", Vec::new())
                        .ok()?;
                g.stream = Some(token);
                token
            }
        };
        let message: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
        match hostcalls::send_grpc_stream_message(token, Some(&message), false) {
            Ok(()) => Some(token),
            Err(_) => {
                g.stream = None;
                None
            }
        }
    }

    fn send_eviction() -> Option<u32> {
        hostcalls::dispatch_http_call(
            CLUSTER,
            vec![
                (":method", "POST"),
                (":path", "/internal/v1/evict"),
                (":authority", "layer-sidecar"),
                ("content-type", "application/json"),
            ],
            Some(br#"{"fences":[]}"#),
            Vec::new(),
            Duration::from_secs(1),
        )
        .ok()
    }

    struct Root {
        id: u32,
        buffer: bool,
        calls: usize,
        spin: usize,
        /// 0: no reads; 1: `reads`; 2: `rewrites`.
        touch: u8,
        eviction: Eviction,
        queue: Option<u32>,
    }

    impl Root {
        /// Sends one callout for every request waiting, unless one is in flight.
        fn send_group(&self) {
            let unsent = GROUP.with(|g| {
                let mut g = g.borrow_mut();
                if g.in_flight.is_some() || g.waiting.is_empty() {
                    return Vec::new();
                }
                let ids = std::mem::take(&mut g.waiting);
                let sent = if self.eviction == Eviction::Streamed {
                    send_on_stream(&mut g, &ids)
                } else {
                    send_eviction()
                };
                match sent {
                    Some(token) => {
                        g.in_flight = Some((token, ids));
                        Vec::new()
                    }
                    None => ids,
                }
            });
            // Not sent: settled at once, so that no response waits forever.
            self.settle(unsent);
        }

        /// Tells each request its eviction is done: a waiting response is resumed, any other
        /// request finds it so when its response comes.
        fn settle(&self, ids: Vec<u32>) {
            if ids.is_empty() {
                return;
            }
            for id in ids {
                let parked = GROUP.with(|g| {
                    let mut g = g.borrow_mut();
                    let parked = g.parked.remove(&id);
                    // A request that already ended has nobody to tell.
                    if !parked && g.live.contains(&id) {
                        g.answered.insert(id);
                    }
                    parked
                });
                if parked && hostcalls::set_effective_context(id).is_ok() {
                    let _ = hostcalls::resume_http_response();
                }
            }
            let _ = hostcalls::set_effective_context(self.id);
        }
    }

    impl Root {
        /// The answer to the group in flight on `token` came (or can no longer come).
        fn group_done(&self, token: u32) {
            let ids = GROUP.with(|g| {
                let mut g = g.borrow_mut();
                match g.in_flight.take() {
                    Some((t, ids)) if t == token => ids,
                    other => {
                        g.in_flight = other;
                        Vec::new()
                    }
                }
            });
            self.settle(ids);
            self.send_group();
        }
    }

    impl Context for Root {
        fn on_http_call_response(&mut self, token: u32, _headers: usize, _body: usize, _trailers: usize) {
            self.group_done(token);
        }

        fn on_grpc_stream_message(&mut self, token: u32, _message_size: usize) {
            if self.eviction == Eviction::Direct {
                let id = GROUP.with(|g| g.borrow_mut().sent.pop_front());
                self.settle(id.into_iter().collect());
            } else {
                self.group_done(token);
            }
        }

        fn on_grpc_stream_close(&mut self, token: u32, _status_code: u32) {
            let sent = GROUP.with(|g| {
                let mut g = g.borrow_mut();
                if g.stream == Some(token) {
                    g.stream = None;
                }
                g.sent.drain(..).collect()
            });
            self.settle(sent);
            self.group_done(token);
        }
    }

    impl RootContext for Root {
        fn on_configure(&mut self, _size: usize) -> bool {
            let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX);
            let config = config.ok().flatten().unwrap_or_default();
            self.touch = match config.as_slice() {
                b"reads" => 1,
                b"rewrites" => 2,
                b"plan" | b"exchange" if !cfg!(feature = "core") => {
                    let _ = hostcalls::log(
                        proxy_wasm::types::LogLevel::Error,
                        "the plan and exchange modes need the build with the `core` feature",
                    );
                    return false;
                }
                b"plan" => 3,
                b"exchange" => 4,
                _ => 0,
            };
            self.buffer = config == b"buffer" || self.touch > 0;
            self.calls = std::str::from_utf8(&config)
                .ok()
                .and_then(|c| c.strip_prefix("calls:"))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            self.spin = std::str::from_utf8(&config)
                .ok()
                .and_then(|c| c.strip_prefix("spin:"))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            self.eviction = match config.as_slice() {
                b"callout" => Eviction::OwnCallout,
                b"grouped" => Eviction::Grouped,
                b"streamed" => Eviction::Streamed,
                b"direct" => Eviction::Direct,
                _ => Eviction::None,
            };
            self.buffer |= self.eviction != Eviction::None;
            if self.eviction == Eviction::Direct {
                hostcalls::set_tick_period(Duration::from_millis(100)).ok();
            }
            if matches!(self.eviction, Eviction::Grouped | Eviction::Streamed) {
                // One queue per worker: a name of its own (the clock's nanoseconds).
                let nanos = hostcalls::get_current_time()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                self.queue =
                    hostcalls::register_shared_queue(&format!("empty.group.{nanos}.{}", self.id)).ok();
            }
            true
        }

        fn on_tick(&mut self) {
            // `direct`: the stream is opened by the root, so that its answers come to the root.
            GROUP.with(|g| {
                let mut g = g.borrow_mut();
                if g.stream.is_none() {
                    g.stream =
                        hostcalls::open_grpc_stream(STREAM_CLUSTER, "hevlayer.Bench", "Evict", Vec::new())
                            .ok();
                }
            });
        }

        fn on_queue_ready(&mut self, queue_id: u32) {
            while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
            self.send_group();
        }

        fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Stream {
                id: context_id,
                root: self.id,
                buffer: self.buffer,
                calls: self.calls,
                spin: self.spin,
                touch: self.touch,
                headers: Vec::new(),
                eviction: self.eviction,
                queue: self.queue,
                started: false,
                token: None,
                answered: false,
                parked: false,
            }))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Stream {
        id: u32,
        root: u32,
        buffer: bool,
        calls: usize,
        spin: usize,
        touch: u8,
        headers: Vec<(String, String)>,
        eviction: Eviction,
        queue: Option<u32>,
        /// Whether this request's stand-in eviction went out (to the sidecar or the root).
        started: bool,
        /// `callout`: the request's own callout, its answer, whether its response waits for it.
        token: Option<u32>,
        answered: bool,
        parked: bool,
    }

    impl Stream {
        /// The body is in: the stand-in eviction goes out (or to the root), the request goes on.
        fn evict(&mut self) {
            self.started = self.eviction != Eviction::None;
            match self.eviction {
                Eviction::None => {}
                Eviction::OwnCallout => {
                    self.token = send_eviction();
                    self.answered = self.token.is_none();
                }
                Eviction::Direct => {
                    let sent = GROUP.with(|g| {
                        let mut g = g.borrow_mut();
                        let token = g.stream?;
                        hostcalls::set_effective_context(self.root).ok()?;
                        let sent =
                            hostcalls::send_grpc_stream_message(token, Some(&self.id.to_le_bytes()), false);
                        let _ = hostcalls::set_effective_context(self.id);
                        sent.ok()?;
                        g.sent.push_back(self.id);
                        g.live.insert(self.id);
                        Some(())
                    });
                    if sent.is_none() {
                        GROUP.with(|g| {
                            let mut g = g.borrow_mut();
                            g.answered.insert(self.id);
                            g.live.insert(self.id);
                        });
                    }
                }
                Eviction::Grouped | Eviction::Streamed => {
                    GROUP.with(|g| {
                        let mut g = g.borrow_mut();
                        g.waiting.push(self.id);
                        g.live.insert(self.id);
                    });
                    let woken = self
                        .queue
                        .is_some_and(|q| hostcalls::enqueue_shared_queue(q, Some(&[1u8])).is_ok());
                    if !woken {
                        GROUP.with(|g| g.borrow_mut().answered.insert(self.id));
                    }
                }
            }
        }
    }

    impl Context for Stream {
        fn on_http_call_response(&mut self, token: u32, _headers: usize, _body: usize, _trailers: usize) {
            if self.token != Some(token) {
                return;
            }
            self.answered = true;
            if self.parked {
                self.parked = false;
                let _ = hostcalls::resume_http_response();
            }
        }

        fn on_done(&mut self) -> bool {
            if matches!(
                self.eviction,
                Eviction::Grouped | Eviction::Streamed | Eviction::Direct
            ) {
                GROUP.with(|g| {
                    let mut g = g.borrow_mut();
                    g.live.remove(&self.id);
                    g.answered.remove(&self.id);
                    g.parked.remove(&self.id);
                });
            }
            true
        }
    }

    impl HttpContext for Stream {
        fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
            for _ in 0..self.calls {
                let _ = hostcalls::get_map_value(MapType::HttpRequestHeaders, ":path");
            }
            if self.spin > 0 {
                std::hint::black_box(super::spin(self.spin));
            }
            if self.touch > 0 {
                self.headers = hostcalls::get_map(MapType::HttpRequestHeaders).unwrap_or_default();
            }
            if self.buffer && !end_of_stream {
                Action::Pause
            } else {
                Action::Continue
            }
        }

        fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
            if self.buffer && !end_of_stream {
                return Action::Pause;
            }
            self.evict();
            if self.touch > 0 {
                let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size);
                let body = body.ok().flatten().unwrap_or_default();
                #[cfg(feature = "core")]
                let body = match self.touch {
                    3 => super::experiment::plan(&body),
                    4 => super::experiment::exchange(&self.headers, body),
                    _ => body,
                };
                if self.touch > 1 {
                    let _ = hostcalls::set_buffer(BufferType::HttpRequestBody, 0, body_size, &body);
                    let length = body.len().to_string();
                    let _ = hostcalls::set_map_value(
                        MapType::HttpRequestHeaders,
                        "content-length",
                        Some(&length),
                    );
                }
            }
            Action::Continue
        }

        fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
            if self.touch > 0 {
                std::hint::black_box(hostcalls::get_map_value(MapType::HttpResponseHeaders, ":status").ok());
            }
            let waits = match self.eviction {
                _ if !self.started => false,
                Eviction::None => false,
                Eviction::OwnCallout => {
                    self.parked = !self.answered;
                    self.parked
                }
                // The root keeps the grouped requests that wait (it resumes them).
                Eviction::Grouped | Eviction::Streamed | Eviction::Direct => GROUP.with(|g| {
                    let mut g = g.borrow_mut();
                    let waits = !g.answered.remove(&self.id);
                    if waits {
                        g.parked.insert(self.id);
                    }
                    waits
                }),
            };
            if waits {
                Action::Pause
            } else {
                Action::Continue
            }
        }
    }
}

/// The `plan` and `exchange` modes: the filter's own work on a query inside this filter, without
/// its glue: `plan` only the rewrite's core (`reads::plan` and `reads::render`), `exchange` the
/// whole decision core a query passes through (`Exchange`: route, auth, limits, the rewrite,
/// the response), each request with a context of its own. Between them and the product's column
/// is what the product's glue costs; between `rewrites` and `plan` what the rewrite's code costs
/// when it runs once per request in caches Envoy's own work left cold.
#[cfg(all(target_arch = "wasm32", feature = "core"))]
mod experiment {
    use hevlayer_filter::config::Config;
    use hevlayer_filter::exchange::{Exchange, RequestHead, Step};
    use hevlayer_filter::reads::{plan as read_plan, render, WatermarkRule};
    use std::rc::Rc;

    pub fn plan(body: &[u8]) -> Vec<u8> {
        match read_plan(body, WatermarkRule::default()) {
            Ok(p) if !p.is_identity() => render(body, &p),
            _ => body.to_vec(),
        }
    }

    thread_local! {
        static CONFIG: Rc<Config> = Rc::new(Config::default());
    }

    pub fn exchange(headers: &[(String, String)], body: Vec<u8>) -> Vec<u8> {
        let get = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let head = RequestHead {
            method: get(":method").unwrap_or(""),
            path: get(":path").unwrap_or(""),
            authorization: get("authorization"),
            content_length: get("content-length"),
            content_type: get("content-type"),
            request_id: "0123456789abcdef0123456789abcdef",
            now_ms: 1_795_000_000_000,
            ..RequestHead::default()
        };
        let mut exchange = Exchange::new(CONFIG.with(Rc::clone));
        let _ = exchange.on_request_headers(&head);
        let step = exchange.on_request_body(body.len(), true, 0, &mut |start, size| {
            body.get(start..start + size).map(<[u8]>::to_vec)
        });
        let out = match step {
            Step::Forward(Some(rewritten)) => rewritten,
            _ => body,
        };
        let _ = exchange.on_response_headers(200, None, false, 0);
        exchange.on_stream_end();
        std::hint::black_box(exchange.take_counters());
        out
    }
}

/// FNV-1a over a 1 KiB buffer, `rounds` times: a fixed amount of plain work (loads, a multiply
/// chain, a loop) whose cost per round can be compared between engines.
pub fn spin(rounds: usize) -> u64 {
    let buffer: [u8; 1024] = std::array::from_fn(|i| (i * 7 + 3) as u8);
    let buffer = std::hint::black_box(buffer);
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for _ in 0..rounds {
        for &byte in &buffer {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// Nanoseconds per round of [`spin`] on this machine, natively (the best of a few timings).
pub fn spin_native_ns() -> f64 {
    let rounds = 20_000;
    (0..5)
        .map(|_| {
            let started = std::time::Instant::now();
            std::hint::black_box(spin(std::hint::black_box(rounds)));
            started.elapsed().as_secs_f64() * 1e9 / rounds as f64
        })
        .fold(f64::INFINITY, f64::min)
}
