use std::process::ExitCode;

use clap::Parser;
use hevlayer_sidecar::config::Config;
use tokio::net::TcpListener;

fn init_logs(config: &Config, level: tracing::Level) {
    let builder = tracing_subscriber::fmt().with_max_level(level).with_target(false);
    if config.log_json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed now, before serving, so a signal that
/// arrives before the first connection is not lost (a lazily polled handler would be).
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Err(err), _) | (_, Err(err)) => {
                tracing::warn!(error = %err, "cannot install signal handlers; stop with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
        tracing::info!("shutdown signal received; finishing in-flight requests");
    }
}

fn main() -> ExitCode {
    let config = Config::parse();
    let valid = match config.validate() {
        Ok(valid) => valid,
        Err(message) => {
            eprintln!("hevlayer-sidecar: invalid configuration: {message}");
            return ExitCode::from(2);
        }
    };
    // The main runtime serves the connections, or with pinned connections accepts them and runs
    // the background work (the watermark poller, the Aerospike client's upkeep) and large
    // mirrors while requests are served on as many threads of their own (`serve`).
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        runtime.worker_threads(config.worker_threads);
    }
    match runtime.enable_all().build() {
        Ok(runtime) => runtime.block_on(run(config, valid)),
        Err(err) => {
            eprintln!("hevlayer-sidecar: cannot start the runtime: {err}");
            ExitCode::from(1)
        }
    }
}

async fn run(config: Config, valid: hevlayer_sidecar::config::Validated) -> ExitCode {
    init_logs(&config, valid.log_level);
    let state = match hevlayer_sidecar::build_state(&config, &valid) {
        Ok(s) => s,
        Err(message) => {
            tracing::error!(error = %message, "cannot start");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(err) => {
            tracing::error!(listen = %config.listen, error = %err, "cannot bind");
            return ExitCode::from(1);
        }
    };
    tracing::info!(
        listen = %config.listen,
        backend = if config.aerospike_hosts().is_some() { "aerospike" } else { "embedded" },
        aerospike_hosts = config.aerospike_hosts().unwrap_or(""),
        budget_bytes = config.embedded_cache_bytes,
        gateway_url = %config.gateway_url,
        mirror_vectors = config.mirror_vectors,
        worker_threads = config.worker_threads,
        pinned_connections = config.pinned_connections,
        "sidecar listening"
    );
    match hevlayer_sidecar::serve(
        listener,
        state,
        config.max_body_bytes,
        hevlayer_sidecar::Serving::of(&config),
        shutdown_signal(),
    )
    .await
    {
        Ok(()) => {
            tracing::info!("sidecar stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!(error = %err, "server failed");
            ExitCode::from(1)
        }
    }
}
