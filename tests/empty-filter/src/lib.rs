//! A proxy-wasm HTTP filter that does nothing but what every filter must: a context per request.
//! The gateway benchmark runs Envoy with it to show what loading any wasm filter into the request
//! path costs, next to the hevlayer filter and no filter at all. With the plugin configuration
//! `buffer` it also holds each request until the whole body is in (what validating a write before
//! anything goes upstream requires), without looking at it. With `calls:N` it makes N cheap
//! hostcalls (reading `:path`) on each request's headers: what one hostcall costs Envoy. With
//! `spin:N` it hashes a 1 KiB buffer N times (FNV-1a, byte by byte) on each request's headers:
//! what a known amount of plain wasm work costs in Envoy's engine, to set against the same loop
//! run natively (`spin_native` below, which the benchmark prints beside it).

#[cfg(target_arch = "wasm32")]
mod glue {
    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, BufferType, ContextType, MapType};

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { buffer: false, calls: 0, spin: 0 }) });
    }}

    struct Root {
        buffer: bool,
        calls: usize,
        spin: usize,
    }

    impl Context for Root {}

    impl RootContext for Root {
        fn on_configure(&mut self, _size: usize) -> bool {
            let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX);
            let config = config.ok().flatten().unwrap_or_default();
            self.buffer = config == b"buffer";
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
            if self.buffer && !end_of_stream {
                Action::Pause
            } else {
                Action::Continue
            }
        }

        fn on_http_request_body(&mut self, _body_size: usize, end_of_stream: bool) -> Action {
            if self.buffer && !end_of_stream {
                Action::Pause
            } else {
                Action::Continue
            }
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
