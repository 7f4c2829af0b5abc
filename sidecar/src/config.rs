//! Configuration from flags and environment, validated once at start.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use crate::watermark::WatermarkSettings;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "hevlayer-sidecar",
    about = "Layer gateway sidecar: document cache, mirror and pipeline API"
)]
pub struct Config {
    /// Address the sidecar listens on.
    #[arg(long, env = "SIDECAR_LISTEN", default_value = "127.0.0.1:9090")]
    pub listen: SocketAddr,

    /// Gateway (Envoy listener) URL the sidecar sends Turbopuffer requests through.
    #[arg(long, env = "GATEWAY_URL", default_value = "http://127.0.0.1:8080")]
    pub gateway_url: String,

    /// Bearer the sidecar presents to the gateway when the request it serves carries none
    /// (the filter's `keys` mode). In passthrough mode the caller's bearer is forwarded instead.
    #[arg(long, env = "GATEWAY_API_KEY", hide_env_values = true)]
    pub gateway_api_key: Option<String>,

    /// Time limit for one request to the gateway, in milliseconds.
    #[arg(long, env = "GATEWAY_TIMEOUT_MS", default_value_t = 30_000)]
    pub gateway_timeout_ms: u64,

    /// Comma-separated Aerospike seed hosts (`host:port`). Unset or empty: the embedded store is
    /// used.
    #[arg(long, env = "AEROSPIKE_HOSTS")]
    pub aerospike_hosts: Option<String>,

    /// Aerospike namespace holding the cache.
    #[arg(long, env = "AEROSPIKE_NAMESPACE", default_value = "hevlayer")]
    pub aerospike_namespace: String,

    /// Set-name prefix for mirrored Turbopuffer namespaces.
    #[arg(long, env = "AEROSPIKE_SET_PREFIX", default_value = "tpuf_")]
    pub set_prefix: String,

    /// Set-name prefix for pipelines.
    #[arg(long, env = "AEROSPIKE_PIPELINE_SET_PREFIX", default_value = "pl_")]
    pub pipeline_set_prefix: String,

    /// Byte budget of the embedded store; writes beyond it are refused.
    #[arg(long, env = "EMBEDDED_CACHE_BYTES", default_value_t = 1 << 30)]
    pub embedded_cache_bytes: usize,

    /// Also cache the `vector` attribute of mirrored documents.
    #[arg(long, env = "MIRROR_VECTORS", default_value_t = false, action = clap::ArgAction::Set)]
    pub mirror_vectors: bool,

    /// Time limit of one document-cache operation, in milliseconds.
    #[arg(long, env = "CACHE_OP_TIMEOUT_MS", default_value_t = 200)]
    pub cache_op_timeout_ms: u64,

    /// The oldest cached copy of a document a fetch serves, in seconds: older copies are fetched
    /// from Turbopuffer again and replaced. It bounds how long an entry can stay stale when an
    /// Envoy died with evictions still to send.
    #[arg(long, env = "CACHE_MAX_AGE_SECONDS", default_value_t = 600)]
    pub cache_max_age_seconds: u64,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "SIDECAR_MAX_BODY_BYTES", default_value_t = 256 << 20)]
    pub max_body_bytes: usize,

    /// Threads serving requests (the runtime's workers, or with `SIDECAR_PINNED_CONNECTIONS` the
    /// connections' own threads); 0: one per CPU core.
    #[arg(long, env = "SIDECAR_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,

    /// Serve each connection on one of the serving threads for its whole life (a single-threaded
    /// runtime each) instead of on one shared work-stealing runtime: less CPU per callout, a
    /// longer tail under many busy connections (README, Serving).
    #[arg(long, env = "SIDECAR_PINNED_CONNECTIONS", default_value_t = false, action = clap::ArgAction::Set)]
    pub pinned_connections: bool,

    /// Watermark poll interval of namespaces updating, recently written or without a watermark.
    #[arg(long, env = "WATERMARK_POLL_MS", default_value_t = 1_000)]
    pub watermark_poll_ms: u64,

    /// Watermark poll interval of stable namespaces.
    #[arg(long, env = "WATERMARK_STABLE_POLL_MS", default_value_t = 60_000)]
    pub watermark_stable_poll_ms: u64,

    /// How long after a write through the gateway a namespace is polled at the fast interval.
    #[arg(long, env = "WATERMARK_RECENT_WRITE_MS", default_value_t = 60_000)]
    pub watermark_recent_write_ms: u64,

    /// Safety margin: a poll started at T that sees the index up to date sets the watermark to
    /// T minus this.
    #[arg(long, env = "WATERMARK_MARGIN_MS", default_value_t = 500)]
    pub watermark_margin_ms: u64,

    /// Time limit of one namespace-metadata request.
    #[arg(long, env = "WATERMARK_POLL_TIMEOUT_MS", default_value_t = 2_000)]
    pub watermark_poll_timeout_ms: u64,

    /// Most namespaces watched (the least recently registered leave first).
    #[arg(long, env = "WATERMARK_MAX_NAMESPACES", default_value_t = 10_000)]
    pub watermark_max_namespaces: usize,

    /// A namespace no Envoy registered for this long stops being watched.
    #[arg(long, env = "WATERMARK_IDLE_MS", default_value_t = 600_000)]
    pub watermark_idle_ms: u64,

    /// Most metadata requests in flight at once.
    #[arg(long, env = "WATERMARK_CONCURRENCY", default_value_t = 8)]
    pub watermark_concurrency: usize,

    /// Most namespaces with their own watermark-age series in /metrics (the oldest watermarks).
    #[arg(long, env = "WATERMARK_METRICS_NAMESPACES", default_value_t = 50)]
    pub watermark_metrics_namespaces: usize,

    /// Log level: error, warn, info, debug or trace.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log as JSON lines (default) or human-readable text.
    #[arg(long, env = "LOG_JSON", default_value_t = true, action = clap::ArgAction::Set)]
    pub log_json: bool,
}

/// Most `SIDECAR_WORKER_THREADS` accepted (more is a typo, not a plan).
pub const MAX_WORKER_THREADS: usize = 1024;

/// What checking a configuration yields: the settings its checks parsed, so nothing parses them
/// again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated {
    pub gateway_url: GatewayUrl,
    pub log_level: tracing::Level,
}

/// The parts of a gateway URL the sidecar needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayUrl {
    /// `http://host:port` without a trailing slash.
    pub base: String,
}

impl Config {
    /// A configuration with every default, for tests and benchmarks.
    pub fn defaults() -> Self {
        Self::parse_from(["hevlayer-sidecar"])
    }

    /// The Aerospike seeds, when the Aerospike backend is configured. An empty (or blank) value
    /// counts as unset, so `AEROSPIKE_HOSTS= make run` uses the embedded store instead of failing
    /// validation: that is how shells and env files spell "not set".
    pub fn aerospike_hosts(&self) -> Option<&str> {
        self.aerospike_hosts
            .as_deref()
            .filter(|hosts| !hosts.trim().is_empty())
    }

    /// Checks the whole configuration, once, at start; the error names the bad setting.
    pub fn validate(&self) -> Result<Validated, String> {
        let gateway_url = parse_gateway_url(&self.gateway_url)?;
        if self.gateway_timeout_ms == 0 {
            return Err("GATEWAY_TIMEOUT_MS must be greater than 0".into());
        }
        if self.cache_op_timeout_ms == 0 {
            return Err("CACHE_OP_TIMEOUT_MS must be greater than 0".into());
        }
        if self.cache_max_age_seconds == 0 {
            return Err("CACHE_MAX_AGE_SECONDS must be greater than 0".into());
        }
        if self.embedded_cache_bytes < 1 << 20 {
            return Err("EMBEDDED_CACHE_BYTES must be at least 1048576 (1 MiB)".into());
        }
        if self.max_body_bytes == 0 {
            return Err("SIDECAR_MAX_BODY_BYTES must be greater than 0".into());
        }
        if self.worker_threads > MAX_WORKER_THREADS {
            return Err(format!(
                "SIDECAR_WORKER_THREADS must be at most {MAX_WORKER_THREADS} (0: one per CPU core)"
            ));
        }
        if self
            .gateway_api_key
            .as_deref()
            .is_some_and(|k| k.trim().is_empty())
        {
            return Err("GATEWAY_API_KEY is set but empty".into());
        }
        if self.watermark_poll_ms == 0
            || self.watermark_poll_timeout_ms == 0
            || self.watermark_max_namespaces == 0
            || self.watermark_idle_ms == 0
            || self.watermark_concurrency == 0
        {
            return Err(
                "WATERMARK_POLL_MS, WATERMARK_POLL_TIMEOUT_MS, WATERMARK_MAX_NAMESPACES, WATERMARK_IDLE_MS and WATERMARK_CONCURRENCY must be greater than 0"
                    .into(),
            );
        }
        if self.watermark_stable_poll_ms < self.watermark_poll_ms {
            return Err(format!(
                "WATERMARK_STABLE_POLL_MS ({}) must be at least WATERMARK_POLL_MS ({})",
                self.watermark_stable_poll_ms, self.watermark_poll_ms
            ));
        }
        let log_level = self.log_level.parse::<tracing::Level>().map_err(|_| {
            format!(
                "LOG_LEVEL '{}' is not one of error, warn, info, debug, trace",
                self.log_level
            )
        })?;
        if let Some(hosts) = self.aerospike_hosts() {
            let ok = hosts.split(',').all(|h| {
                h.trim()
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
            });
            if !ok {
                return Err(format!(
                    "AEROSPIKE_HOSTS '{hosts}' must be a comma-separated list of host:port"
                ));
            }
        }
        if self.aerospike_namespace.is_empty()
            || self.set_prefix.is_empty()
            || self.pipeline_set_prefix.is_empty()
        {
            return Err("AEROSPIKE_NAMESPACE and the set prefixes must not be empty".into());
        }
        if self.set_prefix == self.pipeline_set_prefix {
            return Err("AEROSPIKE_SET_PREFIX and AEROSPIKE_PIPELINE_SET_PREFIX must differ".into());
        }
        Ok(Validated {
            gateway_url,
            log_level,
        })
    }

    pub fn gateway_timeout(&self) -> Duration {
        Duration::from_millis(self.gateway_timeout_ms)
    }

    pub fn cache_op_timeout(&self) -> Duration {
        Duration::from_millis(self.cache_op_timeout_ms)
    }

    pub fn watermark_settings(&self) -> WatermarkSettings {
        WatermarkSettings {
            poll_ms: self.watermark_poll_ms,
            stable_poll_ms: self.watermark_stable_poll_ms,
            recent_write_ms: self.watermark_recent_write_ms,
            margin_ms: self.watermark_margin_ms,
            poll_timeout_ms: self.watermark_poll_timeout_ms,
            max_namespaces: self.watermark_max_namespaces,
            idle_ms: self.watermark_idle_ms,
            concurrency: self.watermark_concurrency,
            metrics_namespaces: self.watermark_metrics_namespaces,
        }
    }
}

fn parse_gateway_url(raw: &str) -> Result<GatewayUrl, String> {
    let rest = raw.strip_prefix("http://").ok_or_else(|| {
        format!("GATEWAY_URL '{raw}' must start with http:// (the sidecar talks to the local listener)")
    })?;
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') || authority.contains('?') || authority.contains('#') {
        return Err(format!(
            "GATEWAY_URL '{raw}' must be http://host:port with no path"
        ));
    }
    Ok(GatewayUrl {
        base: format!("http://{authority}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let cfg = Config::defaults();
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:9090");
        let valid = cfg.validate().unwrap();
        assert_eq!(valid.gateway_url.base, "http://127.0.0.1:8080");
        assert_eq!(valid.log_level, tracing::Level::INFO);
        assert!(!cfg.mirror_vectors);
        assert_eq!(cfg.aerospike_namespace, "hevlayer");
        assert_eq!(cfg.watermark_settings(), WatermarkSettings::default());
    }

    #[test]
    fn bad_settings_are_named() {
        let bad = |args: &[&str]| {
            let mut all = vec!["hevlayer-sidecar"];
            all.extend_from_slice(args);
            Config::try_parse_from(all)
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate().map(|_| ()))
        };
        assert!(bad(&["--gateway-url", "https://x"])
            .unwrap_err()
            .contains("GATEWAY_URL"));
        assert!(bad(&["--gateway-url", "http://x/path"])
            .unwrap_err()
            .contains("GATEWAY_URL"));
        assert!(bad(&["--cache-op-timeout-ms", "0"])
            .unwrap_err()
            .contains("CACHE_OP_TIMEOUT_MS"));
        assert!(bad(&["--embedded-cache-bytes", "10"])
            .unwrap_err()
            .contains("EMBEDDED_CACHE_BYTES"));
        assert!(bad(&["--log-level", "loud"]).unwrap_err().contains("LOG_LEVEL"));
        assert!(bad(&["--aerospike-hosts", "a"])
            .unwrap_err()
            .contains("AEROSPIKE_HOSTS"));
        assert!(bad(&["--aerospike-hosts", "a:3000,b"])
            .unwrap_err()
            .contains("AEROSPIKE_HOSTS"));
        assert!(bad(&["--aerospike-hosts", "a:3000,10.0.0.2:3100"]).is_ok());
        assert!(bad(&["--aerospike-hosts", "a:3000,"])
            .unwrap_err()
            .contains("AEROSPIKE_HOSTS"));
        assert!(bad(&["--listen", "nope"]).is_err());
        assert!(bad(&["--watermark-poll-ms", "0"])
            .unwrap_err()
            .contains("WATERMARK_POLL_MS"));
        assert!(bad(&[
            "--watermark-poll-ms",
            "5000",
            "--watermark-stable-poll-ms",
            "1000"
        ])
        .unwrap_err()
        .contains("WATERMARK_STABLE_POLL_MS"));
        assert!(bad(&["--gateway-url", "http://127.0.0.1:1/"]).is_ok());
        assert!(bad(&["--gateway-timeout-ms", "0"])
            .unwrap_err()
            .contains("GATEWAY_TIMEOUT_MS"));
        assert!(bad(&["--cache-max-age-seconds", "0"])
            .unwrap_err()
            .contains("CACHE_MAX_AGE_SECONDS"));
        assert!(bad(&["--max-body-bytes", "0"])
            .unwrap_err()
            .contains("SIDECAR_MAX_BODY_BYTES"));
        assert!(bad(&["--worker-threads", "1025"])
            .unwrap_err()
            .contains("SIDECAR_WORKER_THREADS"));
        assert!(bad(&["--worker-threads", "-1"]).is_err());
        assert!(bad(&["--worker-threads", "1"]).is_ok());
        assert!(bad(&["--gateway-api-key", " "])
            .unwrap_err()
            .contains("GATEWAY_API_KEY"));
        assert!(bad(&["--aerospike-namespace", ""])
            .unwrap_err()
            .contains("AEROSPIKE_NAMESPACE"));
        assert!(bad(&["--set-prefix", "x_", "--pipeline-set-prefix", "x_"])
            .unwrap_err()
            .contains("must differ"));
    }

    #[test]
    fn the_log_level_is_parsed_once_by_validation() {
        let cfg = Config::try_parse_from(["hevlayer-sidecar", "--log-level", "debug"]).unwrap();
        assert_eq!(cfg.validate().unwrap().log_level, tracing::Level::DEBUG);
    }

    /// `AEROSPIKE_HOSTS=` (empty, as `AEROSPIKE_HOSTS= make run` or an env file sets it) means
    /// unset: valid, and the embedded store. The binary is checked with the real environment
    /// variable in `tests/process.rs`; here the flag takes the same path.
    #[test]
    fn empty_aerospike_hosts_means_the_embedded_store() {
        for empty in ["", " ", "\t"] {
            let cfg = Config::try_parse_from(["hevlayer-sidecar", "--aerospike-hosts", empty]).unwrap();
            assert!(cfg.validate().is_ok(), "{empty:?}");
            assert_eq!(cfg.aerospike_hosts(), None, "{empty:?}");
        }
        let cfg = Config::try_parse_from(["hevlayer-sidecar", "--aerospike-hosts", "a:3000"]).unwrap();
        assert_eq!(cfg.aerospike_hosts(), Some("a:3000"));
    }
}
