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

#[cfg(target_arch = "wasm32")]
mod glue {
    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, BufferType, ContextType, MapType};

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { buffer: false, calls: 0, spin: 0, touch: 0 }) });
    }}

    struct Root {
        buffer: bool,
        calls: usize,
        spin: usize,
        /// 0: no reads; 1: `reads`; 2: `rewrites`.
        touch: u8,
    }

    impl Context for Root {}

    impl RootContext for Root {
        fn on_configure(&mut self, _size: usize) -> bool {
            let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX);
            let config = config.ok().flatten().unwrap_or_default();
            self.touch = match config.as_slice() {
                b"reads" => 1,
                b"rewrites" => 2,
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
            true
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Stream {
                buffer: self.buffer,
                calls: self.calls,
                spin: self.spin,
                touch: self.touch,
            }))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Stream {
        buffer: bool,
        calls: usize,
        spin: usize,
        touch: u8,
    }

    impl Context for Stream {}

    impl HttpContext for Stream {
        fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
            for _ in 0..self.calls {
                let _ = hostcalls::get_map_value(MapType::HttpRequestHeaders, ":path");
            }
            if self.spin > 0 {
                std::hint::black_box(super::spin(self.spin));
            }
            if self.touch > 0 {
                std::hint::black_box(hostcalls::get_map(MapType::HttpRequestHeaders).ok());
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
            if self.touch > 0 {
                let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size);
                let body = body.ok().flatten().unwrap_or_default();
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
            Action::Continue
        }
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
