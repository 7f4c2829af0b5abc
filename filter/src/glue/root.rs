//! The root context: configuration, and the things that outlive any stream — on its timer,
//! registering the namespaces this worker saw (and reading their watermarks back) and sending
//! what writes could not mirror to the sidecar until it acknowledges; when a stream wakes it
//! (and on the timer), sending the mirrors that go after their responses.

use super::{new_request_id, now_ms, queue, ride, shared_fence_add, Metrics, Shared};
use crate::config::{Config, ReadWatermark};
use crate::evict_group::{Flight as GroupFlight, Outcome, Slot};
use crate::exchange::{Exchange, Half, Step};
use crate::fence::Fences;
use crate::metrics::Counter;
use crate::mirrors::MirrorQueue;
use crate::sidecar_api;
use crate::watermark::{self, Tracker};
use proxy_wasm::hostcalls as host;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};
use std::rc::Rc;
use std::time::Duration;

/// How long a registration or an eviction request may take before the next tick gives up on it.
const CALLOUT_TIMEOUT_MS: u64 = 2_000;
/// Backoff of a namespace's evictions: doubling from the first, at most the second.
const EVICT_BACKOFF_MS: (u64, u64) = (500, 30_000);

/// A root callout on its way to the sidecar.
enum InFlight {
    Registration { seq: u64 },
    Eviction { covers: Vec<(String, u64)> },
}

#[derive(Default)]
pub(super) struct Root {
    /// This root context's id (set back as the effective context after resuming a stream).
    id: u32,
    shared: Shared,
    /// At most one callout of each kind at a time: (token, what, sent at).
    registration: Option<(u32, InFlight, u64)>,
    eviction: Option<(u32, InFlight, u64)>,
    /// Mirrors are gathering: the timer runs at `mirror_linger_ms` until the next tick sends them.
    lingering: bool,
    /// When the timer's periodic work (refresh, evictions, expiry) last ran.
    housekept_ms: u64,
    /// `Shared::evictions_sent` when the linger last looked: evictions went since when it moved.
    evictions_seen: u64,
    /// Lingers in a row that kept gathered mirrors waiting because writes kept coming.
    held: u64,
}

impl Root {
    pub(super) fn new(id: u32) -> Root {
        Root {
            id,
            ..Root::default()
        }
    }

    fn config(&self) -> &Config {
        &self.shared.config
    }

    fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    fn call(&self, path: &str, body: &[u8]) -> Result<u32, proxy_wasm::types::Status> {
        let cluster = self.config().sidecar_cluster.as_str();
        let headers = vec![
            (":method", "POST"),
            (":path", path),
            (":authority", cluster),
            ("content-type", "application/json"),
        ];
        self.dispatch_http_call(
            cluster,
            headers,
            Some(body),
            Vec::new(),
            Duration::from_millis(CALLOUT_TIMEOUT_MS),
        )
    }

    /// Sends the tracked namespaces to the sidecar (one registration at a time).
    fn register(&mut self, now: u64) {
        if let Some((_, _, sent)) = &self.registration {
            if now.saturating_sub(*sent) < CALLOUT_TIMEOUT_MS {
                return;
            }
            log::warn!("watermark registration got no answer in {CALLOUT_TIMEOUT_MS} ms");
            self.metrics().record(vec![Counter::WatermarkRefreshFailed]);
            self.registration = None;
        }
        let next = {
            let Ok(mut tracker) = self.shared.tracker.try_borrow_mut() else {
                return;
            };
            let Some(tracker) = tracker.as_mut() else {
                return;
            };
            let next = tracker.registration(now);
            self.metrics().set_tracked(tracker.len());
            next
        };
        let Some(next) = next else {
            return;
        };
        match self.call(sidecar_api::WATERMARKS_PATH, &next.body) {
            Ok(token) => {
                self.registration = Some((token, InFlight::Registration { seq: next.seq }, now));
            }
            Err(status) => {
                log::warn!("could not dispatch the watermark registration: {status:?}");
                self.metrics().record(vec![
                    Counter::WatermarkRefreshFailed,
                    Counter::CalloutDispatchFailed,
                ]);
            }
        }
    }

    /// Sends the fenced namespaces whose time has come (one request at a time).
    fn evict(&mut self, now: u64) {
        if let Some((_, in_flight, sent)) = &self.eviction {
            if now.saturating_sub(*sent) < CALLOUT_TIMEOUT_MS {
                return;
            }
            log::warn!("eviction request got no answer in {CALLOUT_TIMEOUT_MS} ms");
            if let InFlight::Eviction { covers } = in_flight {
                self.evictions_failed(&covers.clone(), now);
            }
            self.eviction = None;
        }
        let Some(batch) = self.shared.fences.try_borrow().ok().and_then(|f| f.due(now)) else {
            return;
        };
        match self.call(sidecar_api::EVICT_PATH, &batch.body) {
            Ok(token) => {
                let covers = batch.covers;
                self.eviction = Some((token, InFlight::Eviction { covers }, now));
            }
            Err(status) => {
                log::warn!("could not dispatch an eviction request: {status:?}");
                self.metrics().record(vec![Counter::CalloutDispatchFailed]);
                self.evictions_failed(&batch.covers, now);
            }
        }
    }

    /// Sends the writes' evictions ahead gathered since the last group, in one callout.
    fn send_evictions(&self) {
        let group = self
            .shared
            .evictions
            .try_borrow_mut()
            .ok()
            .and_then(|mut g| g.take());
        let Some(group) = group else {
            return;
        };
        let n = group.members.len();
        let mut group_headers = group.headers;
        let sent = match sidecar_api::evict_group_body(group.bodies.iter().map(Vec::as_slice)) {
            Some(mut body) => {
                let riders = self.shared.ride(&mut group_headers, &mut body);
                let headers: Vec<(&str, &str)> = group_headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let timeout = Duration::from_millis(self.config().mirror_timeout_ms);
                let cluster = self.config().sidecar_cluster.as_str();
                match self.dispatch_http_call(cluster, headers, Some(&body), Vec::new(), timeout) {
                    Ok(token) => {
                        let now = now_ms();
                        self.shared.rode(token, riders, now);
                        Ok((token, now))
                    }
                    Err(status) => {
                        self.shared.unride(riders);
                        Err(format!("{status:?}"))
                    }
                }
            }
            None => Err("a member's body is not an eviction".to_owned()),
        };
        match sent {
            Ok((token, now)) => {
                self.shared.eviction_sent();
                if let Ok(mut g) = self.shared.evictions.try_borrow_mut() {
                    g.sent(token, group.members, now);
                }
                self.metrics().record(vec![Counter::EvictionGroups]);
            }
            Err(why) => {
                log::warn!("could not dispatch a group of {n} evictions ahead: {why}; fencing their writes");
                self.metrics().record(vec![Counter::CalloutDispatchFailed]);
                let failed = Outcome {
                    ok: false,
                    timed_out: false,
                };
                self.settle_group(&group.members, failed);
            }
        }
    }

    /// A group's outcome: each member learns it, and the writes parked on it are finished here
    /// (mirror queued, a failure fenced) and their responses resumed.
    fn settle_group(&self, members: &[(u32, Slot)], outcome: Outcome) {
        let finish = self
            .shared
            .evictions
            .try_borrow_mut()
            .map(|mut g| g.settle(members, outcome))
            .unwrap_or_default();
        if finish.is_empty() {
            return;
        }
        for (context_id, mut write) in finish {
            let step = write.eviction_settled(outcome.ok, outcome.timed_out);
            self.shared.record(&mut write);
            if step != Some(Step::Resume(Half::Response)) {
                continue;
            }
            let resumed = host::set_effective_context(context_id).and_then(|()| host::resume_http_response());
            if let Err(status) = resumed {
                // The stream is gone (the client hung up): its write was still mirrored.
                log::debug!("could not resume stream {context_id}: {status:?}");
            }
        }
        if let Err(status) = host::set_effective_context(self.id) {
            log::warn!("could not return to the root context: {status:?}");
        }
    }

    /// A group's answer (the callout's, being delivered): its outcome for every member.
    fn group_answered(&self, flight: &GroupFlight, status: Option<u16>, json: bool) {
        let ok = json && status.is_some_and(|s| (200..300).contains(&s));
        let timed_out = !json
            && (status == Some(504)
                || now_ms().saturating_sub(flight.sent_ms) >= self.config().mirror_timeout_ms);
        if !ok {
            log::warn!(
                "a group of {} evictions ahead failed (status {status:?}); fencing their writes",
                flight.members.len()
            );
        }
        self.settle_group(&flight.members, Outcome { ok, timed_out });
    }

    /// Sends the queued mirrors, in batches, while there is room in flight. `now` is the clock if
    /// the caller has read it (else it is read once there is a batch to send).
    fn send_mirrors(&self, mut now: Option<u64>) {
        let cluster = self.config().sidecar_cluster.as_str();
        let timeout = Duration::from_millis(self.config().mirror_timeout_ms);
        loop {
            let batch = self
                .shared
                .mirrors
                .try_borrow_mut()
                .map(|mut q| q.take_batch())
                .unwrap_or_default();
            let Some(first) = batch.first() else {
                return;
            };
            let n = batch.len();
            self.metrics().add_queued(-(n as i64));
            let body = sidecar_api::mirror_batch_body(batch.iter().map(|j| j.body.as_slice()));
            // The first mirror's request id and trace context name the batch in the sidecar's
            // logs and traces.
            let request_id = first.request_id.as_str();
            let mut headers = vec![
                (":method", "POST"),
                (":path", sidecar_api::MIRRORS_PATH),
                (":authority", cluster),
                ("content-type", "application/json"),
                (sidecar_api::REQUEST_ID_HEADER, request_id),
            ];
            headers.extend(first.trace.headers());
            match self.dispatch_http_call(cluster, headers, Some(&body), Vec::new(), timeout) {
                Ok(token) => {
                    let sent_at = *now.get_or_insert_with(now_ms);
                    if let Ok(mut q) = self.shared.mirrors.try_borrow_mut() {
                        q.sent(token, n, sent_at);
                    }
                }
                Err(status) => {
                    log::warn!("could not dispatch a batch of {n} mirrors: {status:?}");
                    let mut counters = vec![Counter::MirrorFailed; n];
                    counters.push(Counter::CalloutDispatchFailed);
                    self.metrics().record(counters);
                }
            }
        }
    }

    fn evictions_failed(&self, covers: &[(String, u64)], now: u64) {
        if let Ok(mut fences) = self.shared.fences.try_borrow_mut() {
            fences.failed(covers, now);
        }
        self.metrics().record(vec![Counter::EvictionsRetried]);
    }

    fn evictions_done(&self, covers: &[(String, u64)]) {
        let released = match self.shared.fences.try_borrow_mut() {
            Ok(mut fences) => fences.acknowledge(covers),
            Err(_) => return,
        };
        for namespace in &released {
            log::info!("fence of namespace '{namespace}' released: the sidecar evicted it");
            shared_fence_add(namespace, -1);
        }
        let n = released.len() as i64;
        if n > 0 {
            self.metrics().add_pending(-n);
            self.metrics()
                .record(vec![Counter::EvictionsAcknowledged; released.len()]);
        }
    }

    /// Stores the sidecar's watermarks: in this worker's tracker, and in shared data, where
    /// every worker's queries read them.
    fn store(&self, body: &[u8], seq: u64) -> Result<usize, String> {
        let now = now_ms();
        let answer = watermark::parse_answer(body, now)?;
        if let Ok(mut tracker) = self.shared.tracker.try_borrow_mut() {
            if let Some(tracker) = tracker.as_mut() {
                tracker.store(&answer);
                tracker.acknowledge(seq);
            }
        }
        for (namespace, known) in &answer {
            let value = known.map(|w| w.encode()).unwrap_or_default();
            let key = watermark::shared_key(namespace);
            if let Err(status) = host::set_shared_data(&key, Some(&value), None) {
                return Err(format!(
                    "could not store the watermark of '{namespace}': {status:?}"
                ));
            }
        }
        Ok(answer.len())
    }

    /// Whether evictions went out since the linger last looked: writes keep coming on this
    /// worker, so their mirrors will follow (and groups for mirrors to ride). Notes what it saw.
    fn evictions_moved(&mut self) -> bool {
        let sent = self.shared.evictions_sent.get();
        let moved = sent != self.evictions_seen;
        self.evictions_seen = sent;
        moved
    }

    /// A linger's tick: what gathered goes in a batch, unless writes keep coming (an eviction
    /// went out during the linger), when it keeps gathering (or rides a group) for up to
    /// `mirror_linger_max_ms` in all; a full batch, or more than `HOLD_BYTES`, goes at once. With nothing gathered the timer
    /// stays at the linger while writes keep coming (a steady flow does not wake the root for
    /// each mirror), else it goes back to the refresh period.
    fn linger_tick(&mut self, now: u64) {
        let (gathered, full) = self.shared.mirrors.try_borrow().map_or((false, false), |q| {
            (q.queued() > 0, q.batch_full() || q.beyond_hold())
        });
        let moved = self.evictions_moved();
        let linger = self.config().mirror_linger_ms.max(1);
        let max_holds = (self.config().mirror_linger_max_ms / linger).saturating_sub(1);
        if moved && !gathered {
            self.held = 0;
        } else if moved && !full && self.held < max_holds {
            self.held += 1;
        } else if gathered {
            // Send what gathered and keep the timer at the linger: while mirrors keep coming,
            // streams need not wake the root (their wake-up stays pending) and the timer is not
            // set twice per linger.
            self.held = 0;
            self.send_mirrors(Some(now));
        } else {
            // A linger with nothing new: back to the refresh period; the next mirror wakes the
            // root again.
            self.held = 0;
            self.lingering = false;
            self.set_tick_period(Duration::from_millis(self.config().watermark_refresh_ms));
            if let Ok(mut q) = self.shared.mirrors.try_borrow_mut() {
                q.woken();
            }
        }
    }

    /// The timer's work: after a linger, send what gathered; each refresh period, the
    /// housekeeping (memory gauge, counters, lost wake-ups, expired flights, watermarks,
    /// evictions).
    fn tick(&mut self, now: u64) {
        if self.lingering {
            self.linger_tick(now);
            if now.saturating_sub(self.housekept_ms) < self.config().watermark_refresh_ms {
                return;
            }
        }
        self.housekept_ms = now;
        self.metrics().report_memory();
        // What the streams and the root counted since the last refresh (see `Metrics`).
        self.metrics().flush();
        // Mirrors a failed or lost wake-up left behind (the next mirror wakes the root again),
        // and flights no answer came for.
        if !self.lingering {
            if let Ok(mut q) = self.shared.mirrors.try_borrow_mut() {
                q.woken();
            }
        }
        self.send_mirrors(Some(now));
        let limit = self.config().mirror_timeout_ms + CALLOUT_TIMEOUT_MS;
        let expired = self
            .shared
            .mirrors
            .try_borrow_mut()
            .map_or(0, |mut q| q.expire(now, limit));
        if expired > 0 {
            self.metrics().record(vec![Counter::MirrorTimeout; expired]);
        }
        if self.config().read_watermark != ReadWatermark::Off {
            self.register(now);
        }
        self.evict(now);
        // A group a lost wake-up left behind, and groups no answer came for.
        self.send_evictions();
        let limit = self.config().mirror_timeout_ms + CALLOUT_TIMEOUT_MS;
        let lost = self
            .shared
            .evictions
            .try_borrow_mut()
            .map(|mut g| g.expire(now, limit))
            .unwrap_or_default();
        let timed_out = Outcome {
            ok: false,
            timed_out: true,
        };
        for flight in lost {
            log::warn!("a group of evictions ahead got no answer in {limit} ms; fencing its writes");
            self.settle_group(&flight.members, timed_out);
        }
    }
}

impl Context for Root {
    /// The VM is shutting down (a new configuration, Envoy draining): record what is pending.
    fn on_done(&mut self) -> bool {
        self.metrics().flush();
        true
    }

    fn on_http_call_response(
        &mut self,
        token: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let mirror = self.shared.mirror_flight(token);
        let group = self
            .shared
            .evictions
            .try_borrow_mut()
            .ok()
            .and_then(|mut g| g.answered(token));
        if group.is_some() || mirror.is_some() {
            // An eviction's answer says all in its status: the body is read for mirrors only.
            let (status, headers, body) = super::call_answer(body_size, mirror.is_some());
            let json = sidecar_api::is_sidecar_answer(&headers);
            if let Some(flight) = group {
                self.group_answered(&flight, status, json);
            }
            if let Some(flight) = mirror {
                // The clock matters only when the sidecar did not answer (a hostcall spared
                // otherwise; the next batch reads it if there is one).
                let now = ride::clock_unless_answered(json);
                self.shared.mirrors_answered(flight, status, json, &body, now);
                // While lingering, the linger's tick decides (the mirrors may ride instead).
                if !self.lingering {
                    self.send_mirrors(now);
                }
            }
            return;
        }
        let in_flight = if let Some((_, what, _)) = self.registration.take_if(|r| r.0 == token) {
            what
        } else if let Some((_, what, _)) = self.eviction.take_if(|e| e.0 == token) {
            what
        } else {
            log::warn!("ignoring a callout answer with unknown token {token}");
            return;
        };
        // An eviction's answer says all in its status (its body is not read).
        let want_body = matches!(in_flight, InFlight::Registration { .. });
        let (status, headers, body) = super::call_answer(body_size, want_body);
        // Only the sidecar's own JSON answer counts (Envoy answers timeouts and an unreachable
        // sidecar itself, in plain text).
        let ok = sidecar_api::is_sidecar_answer(&headers) && status.is_some_and(|s| (200..300).contains(&s));
        match in_flight {
            InFlight::Registration { seq } => {
                let outcome = if ok {
                    self.store(&body, seq)
                } else {
                    Err(format!("the sidecar answered {status:?}"))
                };
                match outcome {
                    Ok(n) => {
                        log::debug!("watermarks of {n} namespaces refreshed");
                        self.metrics().record(vec![Counter::WatermarkRefreshOk]);
                    }
                    Err(e) => {
                        log::warn!("watermark refresh failed: {e}");
                        self.metrics().record(vec![Counter::WatermarkRefreshFailed]);
                    }
                }
            }
            InFlight::Eviction { covers } => {
                if ok {
                    self.evictions_done(&covers);
                } else {
                    log::warn!("eviction request failed (status {status:?}); retrying later");
                    self.evictions_failed(&covers, now_ms());
                }
            }
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = match super::buffers::read(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(bytes) => bytes,
            Err(status) => {
                log::error!("hevlayer: cannot read plugin configuration: host status {status}");
                return false;
            }
        };
        match Config::parse(&bytes) {
            Ok(config) => {
                log::info!(
                    "hevlayer: configured (auth {:?}, body limit {} bytes, sidecar cluster '{}')",
                    config.auth_mode,
                    config.max_body_bytes,
                    config.sidecar_cluster
                );
                self.shared.tick_clock.set(now_ms());
                if config.read_watermark != ReadWatermark::Off {
                    *self.shared.tracker.borrow_mut() = Some(Tracker::new(
                        config.watermark_namespaces,
                        config.watermark_idle_ms,
                    ));
                }
                *self.shared.mirrors.borrow_mut() = MirrorQueue::new(config.mirror_queue_bytes);
                // One queue per worker (a random name): its items wake this root context.
                let name = format!("hevlayer.mirrors.{}", new_request_id());
                match queue::register(&name) {
                    Ok(id) => self.shared.wake_queue.set(Some(id)),
                    Err(status) => log::warn!(
                        "hevlayer: could not register the mirror queue (host status {status}); mirrors after responses go out on the timer"
                    ),
                }
                *self.shared.fences.borrow_mut() = Fences::new(
                    config.fence_namespaces,
                    config.fence_max_ids,
                    EVICT_BACKOFF_MS.0,
                    EVICT_BACKOFF_MS.1,
                );
                // The timer drives the watermark refresh and the evictions.
                self.set_tick_period(Duration::from_millis(config.watermark_refresh_ms));
                self.housekept_ms = now_ms();
                self.shared.metrics = Rc::new(Metrics::define(config.counter_batch));
                self.shared.config = Rc::new(config);
                true
            }
            Err(e) => {
                log::error!("hevlayer: {e}");
                false
            }
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        queue::drain(queue_id);
        self.send_evictions();
        let queued = self.shared.mirrors.try_borrow().is_ok_and(|q| q.queued() > 0);
        if !queued {
            // Woken for evictions only (or the mirrors went out meanwhile, after an answer): the
            // next mirror wakes the root again (a linger's tick does that itself).
            if !self.lingering {
                if let Ok(mut q) = self.shared.mirrors.try_borrow_mut() {
                    q.woken();
                }
            }
            return;
        }
        let linger = self.config().mirror_linger_ms;
        let full = self.shared.mirrors.try_borrow().is_ok_and(|q| q.batch_full());
        if linger > 0 && !full {
            // Let more mirrors gather: the wake-up stays pending (streams do not wake the root
            // again) until the tick that sends them.
            if !self.lingering {
                self.lingering = true;
                // Only evictions from now on count as writes still coming (`linger_tick`).
                self.held = 0;
                self.evictions_seen = self.shared.evictions_sent.get();
                self.set_tick_period(Duration::from_millis(linger));
            }
            return;
        }
        if let Ok(mut q) = self.shared.mirrors.try_borrow_mut() {
            q.woken();
        }
        self.send_mirrors(None);
    }

    fn on_tick(&mut self) {
        let now = now_ms();
        self.shared.tick_clock.set(now);
        self.tick(now);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(super::Filter {
            shared: self.shared.clone(),
            context_id,
            exchange: Exchange::new(Rc::clone(&self.shared.config)),
            request_seen: 0,
            callout: None,
            own_eviction: None,
            grouped: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
