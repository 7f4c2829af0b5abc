//! The Layer gateway sidecar: document cache, mirror API and pipeline API (see README.md).

pub mod app;
pub mod cache;
pub mod callouts;
pub mod config;
pub mod documents;
pub mod error;
pub mod extract;
pub mod gateway;
pub mod metrics;
pub mod mirror;
pub mod pipeline;
mod server;
pub mod state;
pub mod trace;
pub mod watermark;
mod watermark_poller;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::cache::aerospike::{AerospikeCache, AerospikeSettings};
use crate::cache::embedded::EmbeddedCache;
use crate::cache::Stores;
use crate::config::{Config, Validated};
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::state::{AppState, Clock, SharedState};
use crate::watermark::Watermarks;

/// Builds the shared state from a configuration and what its validation yielded.
pub fn build_state(config: &Config, valid: &Validated) -> Result<SharedState, String> {
    build_state_with_cache(config, &valid.gateway_url, cache_backend(config))
}

/// The stores on the configured backend: Aerospike when `AEROSPIKE_HOSTS` is set and not empty
/// (connecting in the background; call from inside a tokio runtime), else the embedded store.
pub fn cache_backend(config: &Config) -> Stores {
    match config.aerospike_hosts() {
        Some(hosts) => Stores::on(AerospikeCache::start(AerospikeSettings {
            hosts: hosts.to_owned(),
            namespace: config.aerospike_namespace.clone(),
            set_prefix: config.set_prefix.clone(),
            pipeline_set_prefix: config.pipeline_set_prefix.clone(),
            op_timeout: config.cache_op_timeout(),
            breaker_open_for: crate::cache::aerospike::BREAKER_OPEN_FOR,
        })),
        None => Stores::on(Arc::new(EmbeddedCache::new(config.embedded_cache_bytes))),
    }
}

/// Builds the shared state around given stores.
pub fn build_state_with_cache(
    config: &Config,
    gateway_url: &config::GatewayUrl,
    stores: Stores,
) -> Result<SharedState, String> {
    let gateway = Gateway::new(
        gateway_url,
        config.gateway_api_key.clone(),
        config.gateway_timeout(),
    )?;
    Ok(Arc::new(AppState {
        stores,
        gateway,
        metrics: Metrics::default(),
        clock: Clock::default(),
        mirror_vectors: config.mirror_vectors,
        cache_timeout: config.cache_op_timeout(),
        doc_max_age_ms: config.cache_max_age_seconds.saturating_mul(1000),
        watermarks: Watermarks::new(config.watermark_settings()),
        heavy: tokio::runtime::Handle::try_current().ok(),
    }))
}

/// How the sidecar's connections are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// Each connection on one of this many threads (0: one per CPU core) for its whole life
    /// (`server`).
    Lanes(usize),
    /// Every connection on the runtime `serve` runs on.
    Shared,
}

impl Serving {
    pub fn of(config: &Config) -> Self {
        if config.pinned_connections {
            Serving::Lanes(config.worker_threads)
        } else {
            Serving::Shared
        }
    }
}

/// Serves the sidecar on `listener` (and polls watermarks) until `shutdown` resolves, then
/// finishes in-flight requests.
pub async fn serve(
    listener: TcpListener,
    state: SharedState,
    max_body_bytes: usize,
    serving: Serving,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let poller = tokio::spawn(watermark_poller::run_poller(state.clone()));
    let router = app::router(state, max_body_bytes);
    let served = match serving {
        Serving::Shared => {
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
        Serving::Lanes(lanes) => {
            let lanes = match lanes {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n => n,
            };
            server::serve(listener, router, lanes, shutdown).await
        }
    };
    poller.abort();
    served
}

/// A sidecar running on a background task (tests and benchmarks): bound to `127.0.0.1:0`, stopped
/// when dropped.
pub struct RunningSidecar {
    pub addr: SocketAddr,
    pub state: SharedState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl RunningSidecar {
    pub async fn start(config: &Config, stores: Stores) -> Result<Self, String> {
        let valid = config.validate()?;
        let state = build_state_with_cache(config, &valid.gateway_url, stores)?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(serve(
            listener,
            state.clone(),
            config.max_body_bytes,
            Serving::of(config),
            async move {
                let _ = rx.await;
            },
        ));
        Ok(Self {
            addr,
            state,
            stop: Some(tx),
            task: Some(task),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops accepting, waits for in-flight requests, and returns the server's result.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(task) => task.await.unwrap_or_else(|e| Err(std::io::Error::other(e))),
            None => Ok(()),
        }
    }
}

impl Drop for RunningSidecar {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}
