//! The read watermark per namespace (SPEC §2.6).
//!
//! Each Envoy worker registers the namespaces its requests used ([`Watermarks::register`], a
//! callout on a timer) and gets their watermarks back. The poller (module `watermark_poller`)
//! reads each watched namespace's metadata from Turbopuffer through the gateway's listener: when
//! a poll that started at T sees `index.status` `up-to-date`, the watermark becomes T minus the
//! safety margin; while `updating` it holds. Namespaces updating, recently written or without a watermark yet are
//! polled every `poll_ms`; stable ones every `stable_poll_ms`; a failed poll keeps the watermark and
//! backs off. The set is bounded (least recently registered leave) and idle namespaces leave.
//!
//! [`Watermarks`] is the state machine, driven with explicit times so it is tested without a
//! clock; the poller is its I/O.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use axum::http::{HeaderMap, StatusCode};
use hevlayer_sidecar_api::{NamespaceWatermark, WatermarkAnswer, WatermarkRegistration};

/// Settings of the watermark poller (the sidecar's `WATERMARK_*` configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatermarkSettings {
    /// Poll interval of namespaces updating, recently written or without a watermark.
    pub poll_ms: u64,
    /// Poll interval of stable namespaces.
    pub stable_poll_ms: u64,
    /// How long after a write a namespace counts as recently written.
    pub recent_write_ms: u64,
    /// Subtracted from a poll's start time to give the watermark.
    pub margin_ms: u64,
    /// Time limit of one metadata request.
    pub poll_timeout_ms: u64,
    /// Most namespaces watched.
    pub max_namespaces: usize,
    /// A namespace no worker registered for this long leaves.
    pub idle_ms: u64,
    /// Most metadata requests in flight.
    pub concurrency: usize,
    /// Most namespaces with their own watermark-age series in `/metrics` (the oldest ones).
    pub metrics_namespaces: usize,
}

impl Default for WatermarkSettings {
    fn default() -> Self {
        WatermarkSettings {
            poll_ms: 1_000,
            stable_poll_ms: 60_000,
            recent_write_ms: 60_000,
            margin_ms: 500,
            poll_timeout_ms: 2_000,
            max_namespaces: 10_000,
            idle_ms: 600_000,
            concurrency: 8,
            metrics_namespaces: 50,
        }
    }
}

/// What one metadata poll found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollOutcome {
    UpToDate,
    Updating,
    /// The poll failed; `reason` labels the counter, `retry_after_ms` is the upstream's wish.
    Failed {
        reason: &'static str,
        retry_after_ms: Option<u64>,
    },
}

impl PollOutcome {
    /// The counter label.
    pub fn label(self) -> &'static str {
        match self {
            PollOutcome::UpToDate => "up_to_date",
            PollOutcome::Updating => "updating",
            PollOutcome::Failed { reason, .. } => reason,
        }
    }
}

#[derive(Debug)]
struct Entry {
    watermark: Option<u64>,
    updating: bool,
    /// Last registration (least recently registered leave first; idle ones leave).
    registered_ms: u64,
    written_ms: Option<u64>,
    next_poll_ms: u64,
    polling: bool,
    failures: u32,
    /// The bearer a worker last sent for this namespace (passthrough mode).
    authorization: Option<String>,
}

/// A poll to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollJob {
    pub namespace: String,
    pub authorization: Option<String>,
}

/// The watched namespaces and their watermarks.
pub struct Watermarks {
    settings: WatermarkSettings,
    entries: Mutex<HashMap<String, Entry>>,
}

/// What `/metrics` shows of the watermarks at one moment.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WatermarkReport {
    pub namespaces: usize,
    pub updating: usize,
    pub unknown: usize,
    /// The oldest watermarks: (namespace, age in seconds), at most `metrics_namespaces`.
    pub oldest: Vec<(String, f64)>,
    pub max_age_seconds: Option<f64>,
}

impl Watermarks {
    pub fn new(settings: WatermarkSettings) -> Self {
        Watermarks {
            settings,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn settings(&self) -> &WatermarkSettings {
        &self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// A worker's registration: watch these namespaces (a write makes one recently written, a
    /// bearer is what it is polled with) and answer their watermarks.
    pub fn register(&self, registration: WatermarkRegistration, now_ms: u64) -> WatermarkAnswer {
        let mut entries = self.lock();
        let mut answer = Vec::with_capacity(registration.namespaces.len());
        for watched in registration.namespaces {
            if !entries.contains_key(&watched.namespace) && entries.len() >= self.settings.max_namespaces {
                evict_least_recent(&mut entries);
            }
            let entry = entries.entry(watched.namespace.clone()).or_insert_with(|| Entry {
                watermark: None,
                updating: false,
                registered_ms: now_ms,
                written_ms: None,
                next_poll_ms: now_ms,
                polling: false,
                failures: 0,
                authorization: None,
            });
            entry.registered_ms = entry.registered_ms.max(now_ms);
            if watched.written {
                entry.written_ms = Some(now_ms);
                // Recently written again: poll soon, unless backing off from failures.
                if entry.failures == 0 {
                    entry.next_poll_ms = entry.next_poll_ms.min(now_ms + self.settings.poll_ms);
                }
            }
            if let Some(auth) = watched.authorization {
                entry.authorization = Some(auth);
            }
            answer.push(NamespaceWatermark {
                namespace: watched.namespace,
                watermark: entry.watermark,
                updating: entry.updating,
            });
        }
        WatermarkAnswer { watermarks: answer }
    }

    /// Drops idle namespaces and takes up to `limit` polls that are due, marking them in flight.
    pub fn due(&self, now_ms: u64, limit: usize) -> Vec<PollJob> {
        let mut entries = self.lock();
        let idle_ms = self.settings.idle_ms;
        entries.retain(|_, e| e.polling || now_ms.saturating_sub(e.registered_ms) <= idle_ms);
        let mut due: Vec<(&String, &mut Entry)> = entries
            .iter_mut()
            .filter(|(_, e)| !e.polling && e.next_poll_ms <= now_ms)
            .collect();
        due.sort_by_key(|(_, e)| e.next_poll_ms);
        due.into_iter()
            .take(limit)
            .map(|(name, e)| {
                e.polling = true;
                PollJob {
                    namespace: name.clone(),
                    authorization: e.authorization.clone(),
                }
            })
            .collect()
    }

    /// Records a poll that started at `started_ms` and ended at `now_ms`.
    pub fn finish(&self, namespace: &str, started_ms: u64, outcome: PollOutcome, now_ms: u64) {
        let s = &self.settings;
        let mut entries = self.lock();
        let Some(e) = entries.get_mut(namespace) else {
            return;
        };
        e.polling = false;
        match outcome {
            PollOutcome::UpToDate => {
                let candidate = started_ms.saturating_sub(s.margin_ms);
                e.watermark = Some(e.watermark.map_or(candidate, |w| w.max(candidate)));
                e.updating = false;
                e.failures = 0;
                let recent = e
                    .written_ms
                    .is_some_and(|w| now_ms.saturating_sub(w) <= s.recent_write_ms);
                e.next_poll_ms = now_ms + if recent { s.poll_ms } else { s.stable_poll_ms };
            }
            PollOutcome::Updating => {
                e.updating = true;
                e.failures = 0;
                e.next_poll_ms = now_ms + s.poll_ms;
            }
            PollOutcome::Failed { retry_after_ms, .. } => {
                e.failures = e.failures.saturating_add(1);
                let backoff = s
                    .poll_ms
                    .saturating_mul(1u64 << e.failures.min(16))
                    .min(s.stable_poll_ms)
                    .max(retry_after_ms.unwrap_or(0).min(s.stable_poll_ms));
                e.next_poll_ms = now_ms + backoff;
            }
        }
    }

    /// What `/metrics` shows.
    pub fn report(&self, now_ms: u64) -> WatermarkReport {
        let entries = self.lock();
        let mut ages: Vec<(String, f64)> = entries
            .iter()
            .filter_map(|(name, e)| {
                e.watermark
                    .map(|w| (name.clone(), now_ms.saturating_sub(w) as f64 / 1000.0))
            })
            .collect();
        ages.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let max_age_seconds = ages.first().map(|(_, age)| *age);
        ages.truncate(self.settings.metrics_namespaces);
        WatermarkReport {
            namespaces: entries.len(),
            updating: entries.values().filter(|e| e.updating).count(),
            unknown: entries.values().filter(|e| e.watermark.is_none()).count(),
            oldest: ages,
            max_age_seconds,
        }
    }
}

fn evict_least_recent(entries: &mut HashMap<String, Entry>) {
    let oldest = entries
        .iter()
        .filter(|(_, e)| !e.polling)
        .min_by_key(|(_, e)| e.registered_ms)
        .map(|(name, _)| name.clone());
    if let Some(name) = oldest {
        entries.remove(&name);
    }
}

/// Reads a metadata answer: the index status, or why the poll failed.
pub fn outcome_of(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> PollOutcome {
    if status.is_success() {
        let status = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| {
                v.pointer("/index/status")
                    .and_then(|s| s.as_str())
                    .map(str::to_owned)
            });
        return match status.as_deref() {
            Some("up-to-date") => PollOutcome::UpToDate,
            Some("updating") => PollOutcome::Updating,
            _ => failed("unrecognised", None),
        };
    }
    let reason = match status.as_u16() {
        429 => "throttled",
        404 => "not_found",
        401 | 403 => "unauthorized",
        500..=599 => "upstream_error",
        _ => "rejected",
    };
    failed(reason, retry_after_ms(headers))
}

pub fn failed(reason: &'static str, retry_after_ms: Option<u64>) -> PollOutcome {
    PollOutcome::Failed {
        reason,
        retry_after_ms,
    }
}

/// `retry-after-ms`, else `retry-after` in seconds.
fn retry_after_ms(headers: &HeaderMap) -> Option<u64> {
    let number = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    number("retry-after-ms")
        .map(|ms| ms as u64)
        .or_else(|| number("retry-after").map(|s| (s * 1000.0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use hevlayer_sidecar_api::WatchedNamespace;

    fn settings() -> WatermarkSettings {
        WatermarkSettings {
            poll_ms: 1_000,
            stable_poll_ms: 60_000,
            recent_write_ms: 60_000,
            margin_ms: 500,
            max_namespaces: 3,
            idle_ms: 600_000,
            ..WatermarkSettings::default()
        }
    }

    fn reg(names: &[(&str, bool)]) -> WatermarkRegistration {
        WatermarkRegistration {
            namespaces: names
                .iter()
                .map(|(n, written)| WatchedNamespace {
                    namespace: (*n).to_owned(),
                    written: *written,
                    authorization: None,
                })
                .collect(),
        }
    }

    fn watermark(w: &Watermarks, ns: &str, now: u64) -> (Option<u64>, bool) {
        let a = w.register(reg(&[(ns, false)]), now);
        (a.watermarks[0].watermark, a.watermarks[0].updating)
    }

    fn due_names(w: &Watermarks, now: u64) -> Vec<String> {
        let mut names: Vec<String> = w.due(now, 100).into_iter().map(|j| j.namespace).collect();
        names.sort();
        names
    }

    #[test]
    fn up_to_date_sets_the_watermark_and_updating_holds_it() {
        let w = Watermarks::new(settings());
        assert_eq!(watermark(&w, "a", 10_000), (None, false));
        assert_eq!(due_names(&w, 10_000), ["a"]);
        assert!(due_names(&w, 10_000).is_empty(), "in flight: not due twice");
        w.finish("a", 10_000, PollOutcome::UpToDate, 10_020);
        assert_eq!(watermark(&w, "a", 10_030), (Some(9_500), false));
        // Stable and not written: the next poll is a minute away.
        assert!(due_names(&w, 69_000).is_empty());
        assert_eq!(due_names(&w, 70_020), ["a"]);
        w.finish("a", 70_020, PollOutcome::Updating, 70_040);
        assert_eq!(watermark(&w, "a", 70_050), (Some(9_500), true));
        // Updating: polled every second, the watermark holds.
        assert_eq!(due_names(&w, 71_040), ["a"]);
        w.finish("a", 71_040, PollOutcome::UpToDate, 71_060);
        assert_eq!(watermark(&w, "a", 71_070), (Some(70_540), false));
    }

    #[test]
    fn the_watermark_never_moves_back() {
        let w = Watermarks::new(settings());
        w.register(reg(&[("a", false)]), 0);
        w.due(0, 10);
        w.finish("a", 5_000, PollOutcome::UpToDate, 5_000);
        w.due(70_000, 10);
        // A slow poll that started earlier and finished later cannot lower it.
        w.finish("a", 4_000, PollOutcome::UpToDate, 70_000);
        assert_eq!(watermark(&w, "a", 70_001).0, Some(4_500));
    }

    #[test]
    fn writes_make_a_namespace_polled_often_for_a_while() {
        let w = Watermarks::new(settings());
        w.register(reg(&[("a", false)]), 0);
        w.due(0, 10);
        w.finish("a", 0, PollOutcome::UpToDate, 0);
        // A write brings the next poll within a second.
        w.register(reg(&[("a", true)]), 2_000);
        assert!(due_names(&w, 2_999).is_empty());
        assert_eq!(due_names(&w, 3_000), ["a"]);
        w.finish("a", 3_000, PollOutcome::UpToDate, 3_000);
        // Recently written: every second while the write is under a minute old...
        assert_eq!(due_names(&w, 4_000), ["a"]);
        w.finish("a", 4_000, PollOutcome::UpToDate, 62_500);
        // ...then back to the stable interval.
        assert!(due_names(&w, 63_500).is_empty());
        assert_eq!(due_names(&w, 122_500), ["a"]);
    }

    #[test]
    fn failures_keep_the_watermark_and_back_off() {
        let w = Watermarks::new(settings());
        w.register(reg(&[("a", false)]), 0);
        w.due(0, 10);
        w.finish("a", 0, PollOutcome::UpToDate, 0);
        w.due(60_000, 10);
        let throttled = PollOutcome::Failed {
            reason: "throttled",
            retry_after_ms: None,
        };
        w.finish("a", 60_000, throttled, 60_000);
        assert_eq!(watermark(&w, "a", 60_001), (Some(0), false));
        // 2 s, then 4 s, 8 s ... capped at the stable interval.
        assert!(due_names(&w, 61_999).is_empty());
        assert_eq!(due_names(&w, 62_000), ["a"]);
        w.finish("a", 62_000, throttled, 62_000);
        assert!(due_names(&w, 65_999).is_empty());
        assert_eq!(due_names(&w, 66_000), ["a"]);
        for _ in 0..20 {
            w.finish("a", 0, throttled, 100_000);
            w.due(160_000, 10);
        }
        w.finish("a", 0, throttled, 100_000);
        assert!(due_names(&w, 159_999).is_empty());
        assert_eq!(due_names(&w, 160_000), ["a"]);
        // The upstream's retry-after is honoured (within the stable interval).
        let later = PollOutcome::Failed {
            reason: "throttled",
            retry_after_ms: Some(30_000),
        };
        w.finish("a", 0, PollOutcome::UpToDate, 200_000);
        w.register(reg(&[("a", true)]), 200_000);
        w.due(201_000, 10);
        w.finish("a", 201_000, later, 201_000);
        assert!(due_names(&w, 230_999).is_empty());
        assert_eq!(due_names(&w, 231_000), ["a"]);
        // A write during a backoff does not cut it short.
        w.finish("a", 0, later, 231_000);
        w.register(reg(&[("a", true)]), 231_500);
        assert!(due_names(&w, 233_000).is_empty());
    }

    #[test]
    fn the_set_is_bounded_and_idle_namespaces_leave() {
        let w = Watermarks::new(settings());
        w.register(reg(&[("a", false), ("b", false)]), 1);
        w.register(reg(&[("c", false)]), 2);
        w.register(reg(&[("a", false)]), 3);
        w.register(reg(&[("d", false)]), 4);
        assert_eq!(w.len(), 3);
        assert_eq!(
            due_names(&w, 5),
            ["a", "c", "d"],
            "b was the least recently registered"
        );
        for ns in ["a", "c", "d"] {
            w.finish(ns, 5, PollOutcome::UpToDate, 5);
        }
        w.register(reg(&[("d", false)]), 500_000);
        for job in w.due(600_002, 10) {
            w.finish(&job.namespace, 600_002, PollOutcome::UpToDate, 600_002);
        }
        assert_eq!(w.len(), 3);
        w.due(600_004, 10);
        assert_eq!(w.len(), 1, "a and c were not registered for ten minutes");
    }

    #[test]
    fn metadata_answers_are_read() {
        let ok = StatusCode::OK;
        let h = HeaderMap::new();
        assert_eq!(
            outcome_of(
                ok,
                &h,
                br#"{"index":{"status":"up-to-date"},"approx_row_count":3}"#
            ),
            PollOutcome::UpToDate
        );
        assert_eq!(
            outcome_of(ok, &h, br#"{"index":{"status":"updating","unindexed_bytes":10}}"#),
            PollOutcome::Updating
        );
        assert_eq!(outcome_of(ok, &h, br#"{"status":"OK"}"#).label(), "unrecognised");
        assert_eq!(outcome_of(ok, &h, b"<html>").label(), "unrecognised");
        let mut retry = HeaderMap::new();
        retry.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(
            outcome_of(StatusCode::TOO_MANY_REQUESTS, &retry, b"{}"),
            PollOutcome::Failed {
                reason: "throttled",
                retry_after_ms: Some(3_000)
            }
        );
        retry.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(
            outcome_of(StatusCode::TOO_MANY_REQUESTS, &retry, b"{}"),
            PollOutcome::Failed {
                reason: "throttled",
                retry_after_ms: Some(250)
            }
        );
        assert_eq!(
            outcome_of(StatusCode::BAD_GATEWAY, &h, b"").label(),
            "upstream_error"
        );
        assert_eq!(outcome_of(StatusCode::NOT_FOUND, &h, b"").label(), "not_found");
        assert_eq!(outcome_of(StatusCode::FORBIDDEN, &h, b"").label(), "unauthorized");
    }

    #[test]
    fn the_report_lists_the_oldest_watermarks() {
        let w = Watermarks::new(WatermarkSettings {
            metrics_namespaces: 2,
            ..settings()
        });
        w.register(reg(&[("a", false), ("b", false), ("c", false)]), 0);
        w.due(0, 10);
        w.finish("a", 10_500, PollOutcome::UpToDate, 10_500);
        w.finish("b", 5_500, PollOutcome::UpToDate, 5_500);
        let r = w.report(20_000);
        assert_eq!((r.namespaces, r.updating, r.unknown), (3, 0, 1));
        assert_eq!(r.oldest, vec![("b".to_owned(), 15.0), ("a".to_owned(), 10.0)]);
        assert_eq!(r.max_age_seconds, Some(15.0));
    }
}
