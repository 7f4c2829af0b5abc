//! A proxy-wasm HTTP filter that does nothing but what every filter must: a context per request.
//! The gateway benchmark runs Envoy with it to show what loading any wasm filter into the request
//! path costs, next to the hevlayer filter and no filter at all. With the plugin configuration
//! `buffer` it also holds each request until the whole body is in (what validating a write before
//! anything goes upstream requires), without looking at it. With `calls:N` it makes N cheap
//! hostcalls (reading `:path`) on each request's headers: what one hostcall costs Envoy.

#[cfg(target_arch = "wasm32")]
mod glue {
    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, BufferType, ContextType, MapType};

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { buffer: false, calls: 0 }) });
    }}

    struct Root {
        buffer: bool,
        calls: usize,
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
            true
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Stream {
                buffer: self.buffer,
                calls: self.calls,
            }))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Stream {
        buffer: bool,
        calls: usize,
    }

    impl Context for Stream {}

    impl HttpContext for Stream {
        fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
            for _ in 0..self.calls {
                let _ = hostcalls::get_map_value(MapType::HttpRequestHeaders, ":path");
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
