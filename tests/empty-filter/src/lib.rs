//! A proxy-wasm HTTP filter that does nothing but what every filter must: a context per request.
//! The gateway benchmark runs Envoy with it to show what loading any wasm filter into the request
//! path costs, next to the hevlayer filter and no filter at all. With the plugin configuration
//! `buffer` it also holds each request until the whole body is in (what validating a write before
//! anything goes upstream requires), without looking at it.

#[cfg(target_arch = "wasm32")]
mod glue {
    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, BufferType, ContextType};

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { buffer: false }) });
    }}

    struct Root {
        buffer: bool,
    }

    impl Context for Root {}

    impl RootContext for Root {
        fn on_configure(&mut self, _size: usize) -> bool {
            let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX);
            self.buffer = matches!(config, Ok(Some(bytes)) if bytes == b"buffer");
            true
        }

        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Stream { buffer: self.buffer }))
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Stream {
        buffer: bool,
    }

    impl Context for Stream {}

    impl HttpContext for Stream {
        fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
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
