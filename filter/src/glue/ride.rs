//! Mirrors riding evictions ahead: a group of evictions the root sends anyway (under load, see
//! `group_evictions`) takes the oldest waiting mirrors along, up to `mirror_ride_bytes`, so that
//! one callout does the work of two; its answer settles both. A stream's own eviction (a write
//! alone on its worker) takes none: measured, a mirror on the callout a lone write's response
//! waits for made that write slower, for no callout saved that mattered at that load.

use super::{now_ms, Shared};
use crate::exchange::MirrorJob;
use crate::metrics::Counter;
use crate::mirrors::Flight;
use crate::sidecar_api;

/// Mirrors taken to ride one eviction ahead.
pub(super) struct Riders(Vec<MirrorJob>);

impl Riders {
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Shared {
    /// Lets the waiting mirrors ride an eviction about to go: its body and `:path` become the
    /// combined ones when any do. The riders must then be given to [`Shared::rode`] once the
    /// callout went, or back to [`Shared::unride`] if it could not go.
    pub(super) fn ride(&self, headers: &mut [(String, String)], body: &mut Vec<u8>) -> Riders {
        let limit = self.config.mirror_ride_bytes;
        if limit == 0 {
            return Riders(Vec::new());
        }
        let riders = self
            .mirrors
            .try_borrow_mut()
            .map(|mut q| q.take_riders(limit))
            .unwrap_or_default();
        if riders.is_empty() {
            return Riders(riders);
        }
        let combined = sidecar_api::evict_mirrors_body(body, riders.iter().map(|j| j.body.as_slice()));
        let Some(combined) = combined else {
            // Not an eviction body: the mirrors wait for a batch (still counted as queued).
            if let Ok(mut q) = self.mirrors.try_borrow_mut() {
                q.put_back(riders);
            }
            return Riders(Vec::new());
        };
        *body = combined;
        for (name, value) in headers.iter_mut() {
            if name == ":path" {
                sidecar_api::EVICT_MIRRORS_PATH.clone_into(value);
            }
        }
        self.metrics.add_queued(-(riders.len() as i64));
        Riders(riders)
    }

    /// The eviction the riders were given to could not go: they wait for a batch again.
    pub(super) fn unride(&self, riders: Riders) {
        if riders.is_empty() {
            return;
        }
        let n = riders.0.len() as i64;
        if let Ok(mut q) = self.mirrors.try_borrow_mut() {
            q.put_back(riders.0);
            self.metrics.add_queued(n);
        } else {
            self.metrics.record(vec![Counter::MirrorFailed; riders.0.len()]);
        }
    }

    /// The eviction the riders were given to went as callout `token` at `sent_ms` (its answer's
    /// timing tells a timeout from a failure).
    pub(super) fn rode(&self, token: u32, riders: Riders, sent_ms: u64) {
        if riders.is_empty() {
            return;
        }
        let n = riders.0.len();
        if let Ok(mut q) = self.mirrors.try_borrow_mut() {
            q.rode(token, n, sent_ms);
        }
        self.metrics.record(vec![Counter::MirrorRode; n]);
    }

    /// The mirrors of callout `token` (a batch's, or riders'), if it carried any.
    pub(super) fn mirror_flight(&self, token: u32) -> Option<Flight> {
        self.mirrors
            .try_borrow_mut()
            .ok()
            .and_then(|mut q| q.answered(token))
    }

    /// A batch's or riders' answer: each mirror's outcome. Only the sidecar's JSON 2xx answers
    /// for its mirrors (a mirror it does not list counts as failed); Envoy's 504 (or a reset at
    /// the timeout) is a timeout of every mirror. `now` is needed only for an answer that is
    /// not the sidecar's (was it the timeout?).
    pub(super) fn mirrors_answered(
        &self,
        flight: Flight,
        status: Option<u16>,
        json: bool,
        body: &[u8],
        now: Option<u64>,
    ) {
        let elapsed = now.map_or(0, |now| now.saturating_sub(flight.sent_ms));
        let answered = json && status.is_some_and(|s| (200..300).contains(&s));
        let applied: Vec<bool> = if answered {
            serde_json::from_slice::<sidecar_api::MirrorBatchResponse>(body)
                .map(|r| r.applied)
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let ok = applied.iter().take(flight.mirrors).filter(|a| **a).count();
        let not_ok =
            if !answered && !json && (status == Some(504) || elapsed >= self.config.mirror_timeout_ms) {
                Counter::MirrorTimeout
            } else {
                Counter::MirrorFailed
            };
        if ok < flight.mirrors {
            // Nothing stale: the writes' documents were evicted before their responses.
            log::warn!(
                "{} of {} mirrors after their responses did not happen (status {status:?})",
                flight.mirrors - ok,
                flight.mirrors
            );
        }
        let mut counters = vec![Counter::MirrorOk; ok];
        counters.extend(std::iter::repeat_n(not_ok, flight.mirrors - ok));
        self.metrics.record(counters);
    }
}

/// The clock for an answer's outcome: read only when the sidecar did not answer.
pub(super) fn clock_unless_answered(json: bool) -> Option<u64> {
    if json {
        None
    } else {
        Some(now_ms())
    }
}
