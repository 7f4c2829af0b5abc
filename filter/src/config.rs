//! The plugin configuration: typed, strict, parsed once at configure time.

use crate::route::Scope;
use serde::Deserialize;

pub const DEFAULT_MAX_BODY_BYTES: u64 = 256 * 1024 * 1024;
pub const DEFAULT_SIDECAR_CLUSTER: &str = "layer_sidecar";
pub const DEFAULT_MIRROR_TIMEOUT_MS: u64 = 200;
pub const DEFAULT_SIDECAR_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_WATERMARK_REFRESH_MS: u64 = 500;
pub const DEFAULT_WATERMARK_STALE_MS: u64 = 5_000;
pub const DEFAULT_WATERMARK_NAMESPACES: usize = 1_000;
pub const DEFAULT_WATERMARK_IDLE_MS: u64 = 600_000;
pub const DEFAULT_FENCE_NAMESPACES: usize = 1_000;
pub const DEFAULT_FENCE_MAX_IDS: usize = 1_000;
pub const DEFAULT_EVICT_AHEAD_MAX_IDS: usize = 10_000;
pub const DEFAULT_MIRROR_QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// How long a worker lets mirrors gather before it sends them (after their responses).
pub const DEFAULT_MIRROR_LINGER_MS: u64 = 2;
/// While writes keep coming, mirrors gather up to this long (see `Config::mirror_linger_max_ms`).
pub const DEFAULT_MIRROR_LINGER_MAX_MS: u64 = 20;
/// Counter increments a worker adds up before it records them (each refresh records them too).
pub const DEFAULT_COUNTER_BATCH: u32 = 64;
pub const MAX_COUNTER_BATCH: u32 = 10_000;
/// The longest linger accepted: mirrors wait at most this long (their documents are evicted
/// meanwhile, so fetches go to Turbopuffer).
pub const MAX_MIRROR_LINGER_MS: u64 = 1_000;
/// Most bytes of mirrors that may ride one eviction ahead (a response may wait for that callout).
pub const MAX_MIRROR_RIDE_BYTES: usize = 1024 * 1024;

/// How callers authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// The bearer is the caller's Turbopuffer key, forwarded unchanged.
    #[default]
    Passthrough,
    /// Gateway keys with scopes; the upstream key comes from this configuration.
    Keys,
}

/// Which queries get the read watermark's predicate while a namespace's index is updating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReadWatermark {
    /// Queries that ask for `"consistency":{"level":"eventual"}` (strong ones already see every
    /// acknowledged write).
    #[default]
    Eventual,
    /// Every query, as hev layer does.
    Always,
    /// No watermark: no polling, no predicate, no `x-layer-stable-as-of` (as_of and between
    /// still work).
    Off,
}

/// Whether a write's eviction ahead goes in its own callout or with other writes' in one callout
/// from the worker's root context (group commit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GroupEvictions {
    /// A write sends its own eviction when no other is out on its worker; one that comes while
    /// some are out joins the next group, which the root sends as soon as it runs.
    #[default]
    Adaptive,
    /// Every write's eviction goes in a group (one more hop at low load).
    Always,
    /// Every write sends its own eviction.
    Off,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: String,
    sha256: String,
    scope: Scope,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    auth_mode: AuthMode,
    #[serde(default)]
    keys: Vec<RawKey>,
    upstream_api_key: Option<String>,
    max_body_bytes: Option<u64>,
    sidecar_cluster: Option<String>,
    mirror_timeout_ms: Option<u64>,
    sidecar_timeout_ms: Option<u64>,
    #[serde(default)]
    mirror_vectors: bool,
    #[serde(default)]
    read_watermark: ReadWatermark,
    watermark_refresh_ms: Option<u64>,
    watermark_stale_ms: Option<u64>,
    watermark_namespaces: Option<usize>,
    watermark_idle_ms: Option<u64>,
    fence_namespaces: Option<usize>,
    fence_max_ids: Option<usize>,
    evict_ahead_max_ids: Option<usize>,
    #[serde(default)]
    group_evictions: GroupEvictions,
    mirror_queue_bytes: Option<usize>,
    mirror_linger_ms: Option<u64>,
    mirror_linger_max_ms: Option<u64>,
    mirror_ride_bytes: Option<usize>,
    counter_batch: Option<u32>,
}

/// A gateway key: its SHA-256 digest and scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayKey {
    pub name: String,
    pub digest: [u8; 32],
    pub scope: Scope,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub auth_mode: AuthMode,
    pub keys: Vec<GatewayKey>,
    /// The Turbopuffer key sent upstream in `keys` mode.
    pub upstream_api_key: Option<String>,
    pub max_body_bytes: u64,
    pub sidecar_cluster: String,
    pub mirror_timeout_ms: u64,
    pub sidecar_timeout_ms: u64,
    /// Send vectors to the document cache too (the sidecar's `MIRROR_VECTORS` must agree).
    pub mirror_vectors: bool,
    pub read_watermark: ReadWatermark,
    /// How often each worker's root context refreshes watermarks from the sidecar.
    pub watermark_refresh_ms: u64,
    /// A watermark copy older than this is not used (the sidecar stopped answering).
    pub watermark_stale_ms: u64,
    /// Most namespaces one worker asks the sidecar to watch.
    pub watermark_namespaces: usize,
    /// A namespace not queried or written through a worker for this long leaves its set.
    pub watermark_idle_ms: u64,
    /// Most namespaces one worker fences at once (evictions pending).
    pub fence_namespaces: usize,
    /// Most ids one namespace's fence lists; beyond, its whole cache is purged instead.
    pub fence_max_ids: usize,
    /// A write naming at most this many ids (and no patch, filter or condition) has its cached
    /// documents evicted while Turbopuffer applies it, and its mirror goes after the response;
    /// 0: every write's response waits for its mirror.
    pub evict_ahead_max_ids: usize,
    /// Whether evictions ahead of writes are grouped into one callout per worker.
    pub group_evictions: GroupEvictions,
    /// Most bytes of mirrors one worker holds while they wait to be sent after their responses;
    /// a mirror that does not fit is dropped (and counted): its documents were evicted already.
    pub mirror_queue_bytes: usize,
    /// How long the mirrors that go after their responses gather before one callout carries
    /// them (a batch already full at the wake-up goes at once); 0: each wake-up sends what is
    /// waiting.
    pub mirror_linger_ms: u64,
    /// While writes keep coming on a worker (an eviction went out during a linger), its mirrors
    /// keep gathering, linger after linger, up to this long in all before a batch goes (a lone
    /// write's mirror goes after one linger; a full batch at once). At most `mirror_linger_ms`:
    /// one linger only.
    pub mirror_linger_max_ms: u64,
    /// Most bytes of waiting mirrors a group of evictions ahead takes along (one callout instead
    /// of two); while groups keep going out, a linger's mirrors wait for the next one instead of
    /// a batch. 0: mirrors always go in batches of their own.
    pub mirror_ride_bytes: usize,
    /// How many counter increments a worker adds up before it records them in Envoy's stats (a
    /// hostcall per counter); the root context records what is pending every
    /// `watermark_refresh_ms`, so no count is older than that plus one linger. 1: each is
    /// recorded at once.
    pub counter_batch: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            auth_mode: AuthMode::Passthrough,
            keys: Vec::new(),
            upstream_api_key: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            sidecar_cluster: DEFAULT_SIDECAR_CLUSTER.to_owned(),
            mirror_timeout_ms: DEFAULT_MIRROR_TIMEOUT_MS,
            sidecar_timeout_ms: DEFAULT_SIDECAR_TIMEOUT_MS,
            mirror_vectors: false,
            read_watermark: ReadWatermark::Eventual,
            watermark_refresh_ms: DEFAULT_WATERMARK_REFRESH_MS,
            watermark_stale_ms: DEFAULT_WATERMARK_STALE_MS,
            watermark_namespaces: DEFAULT_WATERMARK_NAMESPACES,
            watermark_idle_ms: DEFAULT_WATERMARK_IDLE_MS,
            fence_namespaces: DEFAULT_FENCE_NAMESPACES,
            fence_max_ids: DEFAULT_FENCE_MAX_IDS,
            evict_ahead_max_ids: DEFAULT_EVICT_AHEAD_MAX_IDS,
            group_evictions: GroupEvictions::Adaptive,
            mirror_queue_bytes: DEFAULT_MIRROR_QUEUE_BYTES,
            mirror_linger_ms: DEFAULT_MIRROR_LINGER_MS,
            mirror_linger_max_ms: DEFAULT_MIRROR_LINGER_MAX_MS,
            mirror_ride_bytes: crate::sidecar_api::RIDE_BYTES,
            counter_batch: DEFAULT_COUNTER_BATCH,
        }
    }
}

impl Config {
    /// Parses and validates the plugin configuration; an empty configuration means defaults.
    pub fn parse(bytes: &[u8]) -> Result<Config, String> {
        let raw: RawConfig = if bytes.iter().all(u8::is_ascii_whitespace) {
            RawConfig::default()
        } else {
            serde_json::from_slice(bytes).map_err(|e| format!("invalid plugin configuration: {e}"))?
        };
        let (keys, upstream_api_key) = auth(&raw)?;
        let mirrors = mirror_tuning(&raw)?;
        let max_body_bytes = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes == 0 {
            return Err("max_body_bytes must be positive".to_owned());
        }
        let sidecar_cluster = raw
            .sidecar_cluster
            .unwrap_or_else(|| DEFAULT_SIDECAR_CLUSTER.to_owned());
        if sidecar_cluster.is_empty() {
            return Err("sidecar_cluster must not be empty".to_owned());
        }
        let mirror_timeout_ms = raw.mirror_timeout_ms.unwrap_or(DEFAULT_MIRROR_TIMEOUT_MS);
        let sidecar_timeout_ms = raw.sidecar_timeout_ms.unwrap_or(DEFAULT_SIDECAR_TIMEOUT_MS);
        if mirror_timeout_ms == 0 || sidecar_timeout_ms == 0 {
            return Err("timeouts must be positive".to_owned());
        }
        let watermark_refresh_ms = raw.watermark_refresh_ms.unwrap_or(DEFAULT_WATERMARK_REFRESH_MS);
        let watermark_stale_ms = raw.watermark_stale_ms.unwrap_or(DEFAULT_WATERMARK_STALE_MS);
        let watermark_namespaces = raw.watermark_namespaces.unwrap_or(DEFAULT_WATERMARK_NAMESPACES);
        let watermark_idle_ms = raw.watermark_idle_ms.unwrap_or(DEFAULT_WATERMARK_IDLE_MS);
        if watermark_refresh_ms == 0 || watermark_namespaces == 0 || watermark_idle_ms == 0 {
            return Err(
                "watermark_refresh_ms, watermark_namespaces and watermark_idle_ms must be positive"
                    .to_owned(),
            );
        }
        let fence_namespaces = raw.fence_namespaces.unwrap_or(DEFAULT_FENCE_NAMESPACES);
        let fence_max_ids = raw.fence_max_ids.unwrap_or(DEFAULT_FENCE_MAX_IDS);
        if fence_namespaces == 0 || fence_max_ids == 0 {
            return Err("fence_namespaces and fence_max_ids must be positive".to_owned());
        }
        let counter_batch = raw.counter_batch.unwrap_or(DEFAULT_COUNTER_BATCH);
        if !(1..=MAX_COUNTER_BATCH).contains(&counter_batch) {
            return Err(format!(
                "counter_batch ({counter_batch}) must be between 1 and {MAX_COUNTER_BATCH}"
            ));
        }
        if watermark_stale_ms <= watermark_refresh_ms {
            return Err(format!(
                "watermark_stale_ms ({watermark_stale_ms}) must be greater than watermark_refresh_ms ({watermark_refresh_ms}), or every copy would be stale before the next refresh"
            ));
        }
        Ok(Config {
            auth_mode: raw.auth_mode,
            keys,
            upstream_api_key,
            max_body_bytes,
            sidecar_cluster,
            mirror_timeout_ms,
            sidecar_timeout_ms,
            mirror_vectors: raw.mirror_vectors,
            read_watermark: raw.read_watermark,
            watermark_refresh_ms,
            watermark_stale_ms,
            watermark_namespaces,
            watermark_idle_ms,
            fence_namespaces,
            fence_max_ids,
            evict_ahead_max_ids: raw.evict_ahead_max_ids.unwrap_or(DEFAULT_EVICT_AHEAD_MAX_IDS),
            group_evictions: raw.group_evictions,
            mirror_queue_bytes: mirrors.queue_bytes,
            mirror_linger_ms: mirrors.linger_ms,
            mirror_linger_max_ms: mirrors.linger_max_ms,
            mirror_ride_bytes: mirrors.ride_bytes,
            counter_batch,
        })
    }
}

/// How the mirrors that go after their responses travel (`Config`'s `mirror_*` fields).
struct MirrorTuning {
    queue_bytes: usize,
    linger_ms: u64,
    linger_max_ms: u64,
    ride_bytes: usize,
}

/// The mirror queue's bound, its lingers and the riders' bytes, checked.
fn mirror_tuning(raw: &RawConfig) -> Result<MirrorTuning, String> {
    let queue_bytes = raw.mirror_queue_bytes.unwrap_or(DEFAULT_MIRROR_QUEUE_BYTES);
    if queue_bytes == 0 {
        return Err("mirror_queue_bytes must be positive".to_owned());
    }
    let linger_ms = raw.mirror_linger_ms.unwrap_or(DEFAULT_MIRROR_LINGER_MS);
    let linger_max_ms = raw.mirror_linger_max_ms.unwrap_or(DEFAULT_MIRROR_LINGER_MAX_MS);
    for (name, value) in [
        ("mirror_linger_ms", linger_ms),
        ("mirror_linger_max_ms", linger_max_ms),
    ] {
        if value > MAX_MIRROR_LINGER_MS {
            return Err(format!("{name} ({value}) must be at most {MAX_MIRROR_LINGER_MS}"));
        }
    }
    let ride_bytes = raw.mirror_ride_bytes.unwrap_or(crate::sidecar_api::RIDE_BYTES);
    if ride_bytes > MAX_MIRROR_RIDE_BYTES {
        return Err(format!(
            "mirror_ride_bytes ({ride_bytes}) must be at most {MAX_MIRROR_RIDE_BYTES}"
        ));
    }
    Ok(MirrorTuning {
        queue_bytes,
        linger_ms,
        linger_max_ms,
        ride_bytes,
    })
}

/// The gateway keys and the upstream key, checked against the auth mode.
fn auth(raw: &RawConfig) -> Result<(Vec<GatewayKey>, Option<String>), String> {
    let mut keys = Vec::with_capacity(raw.keys.len());
    for k in &raw.keys {
        let digest = parse_digest(&k.sha256)
            .ok_or_else(|| format!("key '{}': sha256 must be 64 hex digits", k.name))?;
        keys.push(GatewayKey {
            name: k.name.clone(),
            digest,
            scope: k.scope,
        });
    }
    let upstream_api_key = raw.upstream_api_key.clone().filter(|k| !k.is_empty());
    if raw.auth_mode == AuthMode::Keys {
        if keys.is_empty() {
            return Err("auth_mode \"keys\" needs at least one entry in keys".to_owned());
        }
        if upstream_api_key.is_none() {
            return Err("auth_mode \"keys\" needs upstream_api_key".to_owned());
        }
    } else if !keys.is_empty() {
        return Err("keys are only used with auth_mode \"keys\"".to_owned());
    }
    Ok((keys, upstream_api_key))
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn empty_config_gives_defaults() {
        assert_eq!(Config::parse(b"").unwrap(), Config::default());
        assert_eq!(Config::parse(b"{}").unwrap(), Config::default());
        assert_eq!(Config::default().max_body_bytes, 268_435_456);
    }

    #[test]
    fn keys_mode() {
        let c = Config::parse(
            format!(r#"{{"auth_mode":"keys","keys":[{{"name":"ci","sha256":"{DIGEST}","scope":"write"}}],"upstream_api_key":"tpuf"}}"#)
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(c.auth_mode, AuthMode::Keys);
        assert_eq!(c.keys[0].scope, Scope::Write);
        assert_eq!(c.keys[0].digest[0], 0x9f);
        assert_eq!(c.upstream_api_key.as_deref(), Some("tpuf"));
    }

    #[test]
    fn watermark_settings() {
        let c = Config::parse(
            br#"{"read_watermark":"always","watermark_refresh_ms":250,"watermark_stale_ms":2000,"watermark_namespaces":10,"watermark_idle_ms":60000}"#,
        )
        .unwrap();
        assert_eq!(c.read_watermark, ReadWatermark::Always);
        assert_eq!(
            (
                c.watermark_refresh_ms,
                c.watermark_stale_ms,
                c.watermark_namespaces,
                c.watermark_idle_ms
            ),
            (250, 2000, 10, 60000)
        );
        assert_eq!(
            Config::parse(br#"{"read_watermark":"off"}"#)
                .unwrap()
                .read_watermark,
            ReadWatermark::Off
        );
        assert_eq!(Config::default().read_watermark, ReadWatermark::Eventual);
    }

    #[test]
    fn eviction_grouping_modes() {
        assert_eq!(Config::default().group_evictions, GroupEvictions::Adaptive);
        for (text, mode) in [
            ("adaptive", GroupEvictions::Adaptive),
            ("always", GroupEvictions::Always),
            ("off", GroupEvictions::Off),
        ] {
            let c = Config::parse(format!(r#"{{"group_evictions":"{text}"}}"#).as_bytes()).unwrap();
            assert_eq!(c.group_evictions, mode);
        }
    }

    #[test]
    fn mirrors_ride_evictions_up_to_a_bound_or_not_at_all() {
        assert_eq!(
            Config::default().mirror_ride_bytes,
            crate::sidecar_api::RIDE_BYTES
        );
        for n in [0, 1, MAX_MIRROR_RIDE_BYTES] {
            let c = Config::parse(format!(r#"{{"mirror_ride_bytes":{n}}}"#).as_bytes()).unwrap();
            assert_eq!(c.mirror_ride_bytes, n);
        }
    }

    #[test]
    fn mirrors_gather_up_to_the_longest_linger_while_writes_keep_coming() {
        assert_eq!(
            Config::default().mirror_linger_max_ms,
            DEFAULT_MIRROR_LINGER_MAX_MS
        );
        for n in [0, 2, MAX_MIRROR_LINGER_MS] {
            let c = Config::parse(format!(r#"{{"mirror_linger_max_ms":{n}}}"#).as_bytes()).unwrap();
            assert_eq!(c.mirror_linger_max_ms, n);
        }
    }

    #[test]
    fn bad_configs_fail_loudly() {
        for bad in [
            r#"{"unknown":1}"#,
            r#"{"auth_mode":"open"}"#,
            r#"{"auth_mode":"keys","upstream_api_key":"x"}"#,
            r#"{"auth_mode":"keys","keys":[{"name":"a","sha256":"abc","scope":"read"}],"upstream_api_key":"x"}"#,
            r#"{"auth_mode":"keys","keys":[{"name":"a","sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","scope":"read"}]}"#,
            r#"{"auth_mode":"keys","keys":[{"name":"a","sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","scope":"root"}],"upstream_api_key":"x"}"#,
            r#"{"keys":[{"name":"a","sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","scope":"read"}]}"#,
            r#"{"max_body_bytes":0}"#,
            r#"{"max_body_bytes":-1}"#,
            r#"{"mirror_timeout_ms":0}"#,
            r#"{"sidecar_cluster":""}"#,
            r#"{"read_watermark":"sometimes"}"#,
            r#"{"group_evictions":"never"}"#,
            r#"{"group_evictions":true}"#,
            r#"{"watermark_refresh_ms":0}"#,
            r#"{"watermark_namespaces":0}"#,
            r#"{"fence_max_ids":0}"#,
            r#"{"mirror_queue_bytes":0}"#,
            r#"{"mirror_linger_ms":1001}"#,
            r#"{"mirror_ride_bytes":1048577}"#,
            r#"{"mirror_linger_max_ms":1001}"#,
            r#"{"mirror_ride_bytes":-1}"#,
            r#"{"counter_batch":0}"#,
            r#"{"counter_batch":10001}"#,
            r#"{"watermark_refresh_ms":1000,"watermark_stale_ms":1000}"#,
            "not json",
        ] {
            assert!(Config::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
