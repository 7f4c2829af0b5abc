//! The proxy-wasm glue: moves headers and bytes between Envoy and [`Exchange`] and carries out the
//! steps it returns. Every hostcall result is handled; nothing here panics.

mod buffers;
mod queue;
mod ride;
mod root;

use crate::config::Config;
use crate::error::LocalReply;
use crate::evict_group::{joins_group, Groups, Member, Slot};
use crate::exchange::{
    request_id_from, Callout, Exchange, FenceLookup, Half, HeaderEdits, MirrorJob, Purpose, RequestHead,
    Step, WatermarkLookup,
};
use crate::fence::{Added, FenceNote, Fences};
use crate::metrics::{Counter, EVICTIONS_PENDING, MIRRORS_QUEUED, NAMESPACES_TRACKED, VM_MEMORY_BYTES};
use crate::mirrors::{Accepted, MirrorQueue};
use crate::sidecar_api;
use crate::watermark::{self, Tracker, Watermark};
use proxy_wasm::hostcalls as host;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, LogLevel, MapType, MetricType, Status};
use root::Root;
use std::cell::{Cell, RefCell};
// A fast hash (foldhash, seeded per process): these maps sit on every request's path.
use foldhash::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> { Box::new(Root::new(id)) });
}}

/// Counter ids and the gauges, defined once per VM at configure time.
///
/// Each increment is a hostcall, and a hostcall costs Envoy about a microsecond: so with a
/// `counter_batch` above 1, increments (gauges' too) are added up here and recorded once
/// `counter_batch` of them are pending, at the root context's refresh tick, and when the VM
/// goes away.
#[derive(Default)]
struct Metrics {
    ids: HashMap<&'static str, u32>,
    tracked: Option<u32>,
    pending: Option<u32>,
    queued: Option<u32>,
    memory: Option<u32>,
    /// This VM's share of the memory gauge, as last added.
    memory_reported: Cell<u64>,
    /// Increments to record: (metric id, amount), and how many were added up in them.
    unrecorded: RefCell<Vec<(u32, i64)>>,
    unrecorded_count: Cell<u32>,
    batch: u32,
}

impl Metrics {
    fn define(batch: u32) -> Metrics {
        let mut ids = HashMap::default();
        for name in Counter::all_names() {
            match host::define_metric(MetricType::Counter, name) {
                Ok(id) => {
                    ids.insert(name, id);
                }
                Err(status) => log::warn!("could not define metric {name}: {status:?}"),
            }
        }
        let gauge = |name: &str| {
            host::define_metric(MetricType::Gauge, name)
                .map_err(|status| log::warn!("could not define metric {name}: {status:?}"))
                .ok()
        };
        Metrics {
            ids,
            tracked: gauge(NAMESPACES_TRACKED),
            pending: gauge(EVICTIONS_PENDING),
            queued: gauge(MIRRORS_QUEUED),
            memory: gauge(VM_MEMORY_BYTES),
            memory_reported: Cell::new(0),
            unrecorded: RefCell::new(Vec::new()),
            unrecorded_count: Cell::new(0),
            batch,
        }
    }

    /// Adds `delta` to a counter or gauge: at once, or to the increments recorded later.
    fn add(&self, id: u32, delta: i64) {
        if self.batch > 1 {
            if let Ok(mut unrecorded) = self.unrecorded.try_borrow_mut() {
                match unrecorded.iter_mut().find(|(i, _)| *i == id) {
                    Some((_, amount)) => *amount += delta,
                    None => unrecorded.push((id, delta)),
                }
                drop(unrecorded);
                let count = self.unrecorded_count.get() + 1;
                self.unrecorded_count.set(count);
                if count >= self.batch {
                    self.flush();
                }
                return;
            }
        }
        if let Err(status) = host::increment_metric(id, delta) {
            log::debug!("could not increment metric {id}: {status:?}");
        }
    }

    /// Records the increments added up so far.
    fn flush(&self) {
        let Ok(mut unrecorded) = self.unrecorded.try_borrow_mut() else {
            return;
        };
        self.unrecorded_count.set(0);
        for (id, amount) in unrecorded.drain(..).filter(|(_, amount)| *amount != 0) {
            if let Err(status) = host::increment_metric(id, amount) {
                log::debug!("could not increment metric {id}: {status:?}");
            }
        }
    }

    /// Brings this VM's share of the memory gauge to its linear memory's size now.
    fn report_memory(&self) {
        let Some(id) = self.memory else { return };
        let bytes = (core::arch::wasm32::memory_size(0) as u64).saturating_mul(65_536);
        let delta = bytes as i64 - self.memory_reported.get() as i64;
        if delta != 0 && host::increment_metric(id, delta).is_ok() {
            self.memory_reported.set(bytes);
        }
    }

    /// Adds to the evictions-pending gauge (every worker adds its own).
    fn add_pending(&self, delta: i64) {
        if let Some(id) = self.pending {
            self.add(id, delta);
        }
    }

    /// Adds to the mirrors-queued gauge (every worker adds its own).
    fn add_queued(&self, delta: i64) {
        if let Some(id) = self.queued {
            self.add(id, delta);
        }
    }

    fn set_tracked(&self, namespaces: usize) {
        if let Some(id) = self.tracked {
            if let Err(status) = host::record_metric(id, namespaces as u64) {
                log::debug!("could not record {NAMESPACES_TRACKED}: {status:?}");
            }
        }
    }

    fn record(&self, counters: Vec<Counter>) {
        for counter in counters {
            if let Some(&id) = self.ids.get(counter.name()) {
                self.add(id, i64::try_from(counter.amount()).unwrap_or(i64::MAX));
            }
        }
    }
}

/// Where a step is carried out: it decides how "continue" and "reply" are expressed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Site {
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    Callout,
}

/// What a VM's streams share with its root context.
#[derive(Default, Clone)]
struct Shared {
    config: Rc<Config>,
    metrics: Rc<Metrics>,
    /// The namespaces this VM's requests used (`None` with the watermark off).
    tracker: Rc<RefCell<Option<Tracker>>>,
    /// What this VM's writes could not mirror, until the sidecar evicts it.
    fences: Rc<RefCell<Fences>>,
    /// Mirrors that go after their responses, sent by the root context.
    mirrors: Rc<RefCell<MirrorQueue>>,
    /// The shared queue that wakes the root context to send them (`None`: the timer does).
    wake_queue: Rc<Cell<Option<u32>>>,
    /// The clock at the last tick: coarse (one refresh interval), but free for streams to read.
    tick_clock: Rc<Cell<u64>>,
    /// Writes whose evictions ahead travel in groups from the root context (group commit), and
    /// the writes parked on them.
    evictions: Rc<RefCell<Groups<Exchange>>>,
    /// Evictions ahead that streams sent themselves, outstanding on this worker.
    evictions_own: Rc<Cell<usize>>,
    /// Eviction callouts this worker has sent (a stream's own, or a group): while they keep
    /// going, writes keep coming, and a linger's mirrors keep gathering (or ride the groups).
    evictions_sent: Rc<Cell<u64>>,
}

/// A stream's own eviction ahead, outstanding: counted in [`Shared::evictions_own`] until it is
/// answered or the stream goes away.
struct OwnEviction(Rc<Cell<usize>>);

impl OwnEviction {
    fn new(count: &Rc<Cell<usize>>) -> Self {
        count.set(count.get() + 1);
        OwnEviction(Rc::clone(count))
    }
}

impl Drop for OwnEviction {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

impl Shared {
    /// Takes a stream's fence notes: kept until evicted, and marked in shared data so every
    /// worker's fetches of the namespace bypass the cache meanwhile.
    fn fence(&self, notes: Vec<FenceNote>) {
        let Ok(mut fences) = self.fences.try_borrow_mut() else {
            return;
        };
        let now = self.tick_clock.get();
        for note in notes {
            let namespace = note.namespace.clone();
            log::warn!("fencing namespace '{namespace}': a write could not be mirrored");
            match fences.add(note, now) {
                Added::New => {
                    shared_fence_add(&namespace, 1);
                    self.metrics.add_pending(1);
                }
                Added::Merged => {}
                Added::BecamePurge => self.metrics.record(vec![Counter::EvictionsAsPurge]),
                Added::Overflow => {
                    log::error!("fence full: '{namespace}' is left to the sidecar's max age");
                    self.metrics.record(vec![Counter::FenceOverflow]);
                }
            }
        }
    }

    /// Takes a stream's mirrors into the worker's queue and wakes the root context to send them.
    /// A mirror that does not fit is dropped: its documents were evicted before its response.
    fn queue_mirrors(&self, jobs: Vec<MirrorJob>) {
        let Ok(mut queue) = self.mirrors.try_borrow_mut() else {
            // Unreachable in one thread: the root never holds the queue across a stream callback.
            self.metrics.record(vec![Counter::MirrorFailed; jobs.len()]);
            return;
        };
        for job in jobs {
            let request_id = job.request_id.clone();
            match queue.push(job) {
                Accepted::Full => {
                    log::warn!("request {request_id}: mirror queue full; the mirror is dropped");
                    self.metrics
                        .record(vec![Counter::MirrorQueueFull, Counter::MirrorFailed]);
                    continue;
                }
                Accepted::Wake => {
                    let woke = self.wake_queue.get().map(queue::wake);
                    if !matches!(woke, Some(Ok(()))) {
                        log::debug!("could not wake the root context ({woke:?}); the timer sends the mirror");
                        queue.woken();
                    }
                }
                Accepted::Queued => {}
            }
            self.metrics.add_queued(1);
        }
    }

    /// Takes what an exchange produced since the last call: counters, fences, mirrors, the
    /// namespaces it used.
    fn record(&self, exchange: &mut Exchange) {
        self.metrics.record(exchange.take_counters());
        let fences = exchange.take_fences();
        if !fences.is_empty() {
            self.fence(fences);
        }
        let mirrors = exchange.take_mirrors();
        if !mirrors.is_empty() {
            self.queue_mirrors(mirrors);
        }
        let touches = exchange.take_touches();
        if touches.is_empty() {
            return;
        }
        if let Ok(mut tracker) = self.tracker.try_borrow_mut() {
            if let Some(tracker) = tracker.as_mut() {
                let now = self.tick_clock.get();
                for touch in touches {
                    tracker.touch(touch, now);
                }
            }
        }
    }

    /// Whether a write's eviction ahead joins the worker's group rather than going alone: by
    /// configuration, and adaptively when another eviction is already out on this worker (at
    /// low load a write never waits for the root's extra hop). Only with a queue to wake the
    /// root.
    fn groups_eviction(&self) -> bool {
        if self.wake_queue.get().is_none() {
            return false;
        }
        let groups_out = self.evictions.try_borrow().map_or(0, |g| g.in_flight());
        joins_group(self.config.group_evictions, self.evictions_own.get(), groups_out)
    }

    /// An eviction callout (a stream's own or a group) went out: writes keep coming.
    fn eviction_sent(&self) {
        self.evictions_sent.set(self.evictions_sent.get() + 1);
    }

    /// Whether fetches of `namespace` must bypass the cache: this worker fences it, or another.
    fn fenced(&self, namespace: &str) -> bool {
        let local = self.fences.try_borrow().is_ok_and(|f| f.contains(namespace));
        local || shared_fence_count(namespace) > 0
    }
}

/// A query's watermark, from shared data (empty or missing: unknown).
fn shared_watermark(namespace: &str) -> Option<Watermark> {
    match host::get_shared_data(&watermark::shared_key(namespace)) {
        Ok((Some(bytes), _)) => Watermark::decode(&bytes),
        _ => None,
    }
}

fn fence_key(namespace: &str) -> String {
    format!("hevlayer.fence:{namespace}")
}

/// How many workers fence `namespace` (shared data, ASCII decimal).
fn shared_fence_count(namespace: &str) -> i64 {
    match host::get_shared_data(&fence_key(namespace)) {
        Ok((Some(bytes), _)) => std::str::from_utf8(&bytes)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

/// Adds `delta` to the number of workers fencing `namespace`, with compare-and-swap (workers
/// write it concurrently).
fn shared_fence_add(namespace: &str, delta: i64) {
    let key = fence_key(namespace);
    for _ in 0..16 {
        let (current, cas) = match host::get_shared_data(&key) {
            Ok((value, cas)) => (
                value
                    .and_then(|b| std::str::from_utf8(&b).ok().and_then(|s| s.parse::<i64>().ok()))
                    .unwrap_or(0),
                cas,
            ),
            Err(_) => (0, None),
        };
        let next = (current + delta).max(0).to_string();
        match host::set_shared_data(&key, Some(next.as_bytes()), cas) {
            Ok(()) => return,
            Err(Status::CasMismatch) => continue,
            Err(status) => {
                log::warn!("could not mark the fence of '{namespace}': {status:?}");
                return;
            }
        }
    }
    log::warn!("could not mark the fence of '{namespace}': too much contention");
}

struct Filter {
    shared: Shared,
    context_id: u32,
    exchange: Exchange,
    /// Request body bytes Envoy has buffered (reported cumulatively while the filter pauses).
    request_seen: usize,
    /// The outstanding callout's token.
    callout: Option<u32>,
    /// The write's eviction ahead, sent by the stream itself and not answered yet.
    own_eviction: Option<OwnEviction>,
    /// The write's eviction ahead went in the worker's group: the root puts its outcome here.
    grouped: Option<Slot>,
}

fn now_ms() -> u64 {
    let now = host::get_current_time().unwrap_or_else(|_| std::time::SystemTime::now());
    now.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A callout's answer: its status (`None` when it was reset, or when its body cannot be read:
/// an answer the filter cannot see is no answer), headers and body. Unless `want_body` (an
/// answer read for its status alone), the body stays unread (a hostcall and an allocation) and
/// of the headers only `content-type` is kept, which tells the sidecar's answers from Envoy's.
fn call_answer(body_size: usize, want_body: bool) -> (Option<u16>, Vec<(String, String)>, Vec<u8>) {
    let pairs = buffers::pairs(MapType::HttpCallResponseHeaders).unwrap_or_default();
    let [status, content_type] = pairs.get_many([":status", "content-type"]);
    let status = status.and_then(|v| v.parse::<u16>().ok());
    if !want_body {
        let headers = content_type
            .map(|v| vec![("content-type".to_owned(), v.to_owned())])
            .unwrap_or_default();
        return (status, headers, Vec::new());
    }
    let headers = pairs.to_vec();
    if body_size == 0 {
        return (status, headers, Vec::new());
    }
    match read_body(BufferType::HttpCallResponseBody, 0, body_size) {
        Some(body) => (status, headers, body),
        None => (None, headers, Vec::new()),
    }
}

fn header(map: MapType, name: &str) -> Option<String> {
    host::get_map_value(map, name).ok().flatten()
}

fn apply(map: MapType, edits: &HeaderEdits) {
    for name in &edits.remove {
        if let Err(status) = host::remove_map_value(map, name) {
            log::warn!("could not remove header {name}: {status:?}");
        }
    }
    for (name, value) in &edits.set {
        if let Err(status) = host::set_map_value(map, name, Some(value)) {
            log::warn!("could not set header {name}: {status:?}");
        }
    }
}

/// `None` when Envoy refuses (the exchange answers or fences, and counts it).
fn read_body(buffer: BufferType, start: usize, len: usize) -> Option<Vec<u8>> {
    match buffers::read(buffer, start, len) {
        Ok(bytes) => Some(bytes),
        Err(status) => {
            log::error!("could not read {buffer:?}: host status {status}");
            None
        }
    }
}

fn read_request_body(start: usize, len: usize) -> Option<Vec<u8>> {
    read_body(BufferType::HttpRequestBody, start, len)
}

fn new_request_id() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // No entropy source: fall back to the clock, which is still unique enough for logs.
        bytes[..8].copy_from_slice(&now_ms().to_le_bytes());
    }
    request_id_from(bytes)
}

/// Replaces the buffered request body and makes `content-length` agree with it (the headers are
/// still held): set to the new length, or removed when the request ended with trailers (the
/// upstream request is then chunked, as the client's was).
fn replace_request_body(body: &[u8], buffered: usize, site: Site) -> Result<(), LocalReply> {
    let failed = |what: &str, status: &dyn std::fmt::Debug| {
        log::error!("could not {what}: host status {status:?}");
        LocalReply::error(500, "internal_error", &format!("the gateway could not {what}"))
    };
    buffers::replace(BufferType::HttpRequestBody, 0, buffered, body)
        .map_err(|s| failed("replace the request body", &s))?;
    let map = MapType::HttpRequestHeaders;
    let length = if site == Site::RequestTrailers {
        None
    } else {
        Some(body.len().to_string())
    };
    host::set_map_value(map, "content-length", length.as_deref())
        .map_err(|s| failed("set the request's content-length", &s))?;
    Ok(())
}

fn send_reply(reply: &LocalReply) {
    let mut headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        headers.push(("content-type", "application/json"));
    }
    if let Err(status) = host::send_http_response(u32::from(reply.status), headers, Some(&reply.body)) {
        log::error!("could not send local reply {}: {status:?}", reply.status);
    }
}

impl Filter {
    fn record(&mut self) {
        self.shared.record(&mut self.exchange);
    }

    /// Sends the write's eviction ahead: in the worker's group when it should and the root
    /// could be woken, else alone. False when it could not be dispatched.
    fn send_eviction(&mut self, call: Callout) -> bool {
        let call = match (
            self.shared.groups_eviction(),
            self.shared.evictions.try_borrow_mut(),
        ) {
            (true, Ok(mut groups)) => {
                let slot = Slot::default();
                let member = Member {
                    context_id: self.context_id,
                    call,
                    slot: Rc::clone(&slot),
                };
                let woke = if groups.join(member) {
                    self.shared.wake_queue.get().map(queue::wake)
                } else {
                    Some(Ok(()))
                };
                if matches!(woke, Some(Ok(()))) {
                    self.grouped = Some(slot);
                    self.shared.metrics.record(vec![Counter::EvictAheadGrouped]);
                    return true;
                }
                // Nobody would send the group now: the eviction goes alone.
                log::debug!("could not wake the root context ({woke:?}); the eviction goes alone");
                match groups.leave(self.context_id) {
                    Some(member) => member.call,
                    None => return false,
                }
            }
            _ => call,
        };
        if self.dispatch(&call).is_err() {
            return false;
        }
        self.shared.eviction_sent();
        self.own_eviction = Some(OwnEviction::new(&self.shared.evictions_own));
        true
    }

    /// The group's outcome, once the root has put it in the slot: the exchange learns it (a
    /// failed eviction fences the write).
    fn settle_grouped(&mut self) {
        let Some(outcome) = self.grouped.as_ref().and_then(|slot| slot.get()) else {
            return;
        };
        self.grouped = None;
        if self.exchange.is_parked() {
            // The root settled the write itself.
            return;
        }
        let _ = self.exchange.eviction_settled(outcome.ok, outcome.timed_out);
        self.record();
    }

    /// A response that waits for a grouped eviction still out: the write goes to the root,
    /// which finishes it and resumes the stream when the group is answered.
    fn park(&mut self) {
        if self.grouped.is_none() {
            return;
        }
        let Ok(mut groups) = self.shared.evictions.try_borrow_mut() else {
            return;
        };
        if let Some(write) = self.exchange.park() {
            groups.park(self.context_id, write);
        }
    }

    /// The host clock when the exchange needs it (stamps, callout timing); 0 otherwise.
    fn clock(&self) -> u64 {
        if self.exchange.needs_clock() {
            now_ms()
        } else {
            0
        }
    }

    fn dispatch(&mut self, call: &Callout) -> Result<(), ()> {
        let headers: Vec<(&str, &str)> = call
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        match host::dispatch_http_call(
            &self.shared.config.sidecar_cluster,
            headers,
            Some(&call.body),
            Vec::new(),
            Duration::from_millis(call.timeout_ms),
        ) {
            Ok(token) => {
                self.callout = Some(token);
                Ok(())
            }
            Err(status) => {
                log::warn!(
                    "could not dispatch {:?} callout to '{}': {status:?}",
                    call.purpose,
                    self.shared.config.sidecar_cluster
                );
                Err(())
            }
        }
    }

    /// Replaces the buffered request body when a new one is given. False when Envoy refused:
    /// then the client got a 500 and nothing goes upstream (never a body that should have
    /// changed, such as an unstamped write).
    fn replace_body(&mut self, body: Option<Vec<u8>>, site: Site, body_len: usize) -> bool {
        let Some(body) = body.filter(|_| site != Site::RequestHeaders) else {
            return true;
        };
        match replace_request_body(&body, body_len, site) {
            Ok(()) => true,
            Err(reply) => {
                self.shared.metrics.record(vec![Counter::BodyReplaceFailed]);
                send_reply(&reply);
                self.record();
                false
            }
        }
    }

    /// Carries out a step; `body_len` is the size of the buffered body a `Forward` replaces.
    fn execute(&mut self, step: Step, site: Site, body_len: usize) -> Action {
        let action = match step {
            Step::Continue => Action::Continue,
            Step::Resume(half) => {
                let resumed = match half {
                    Half::Request => host::resume_http_request(),
                    Half::Response => host::resume_http_response(),
                };
                if let Err(status) = resumed {
                    log::warn!("could not resume the stream: {status:?}");
                }
                Action::Continue
            }
            Step::Pause => Action::Pause,
            Step::Reply(reply) => {
                send_reply(&reply);
                Action::Pause
            }
            Step::Forward(body) => {
                if !self.replace_body(body, site, body_len) {
                    return Action::Pause;
                }
                Action::Continue
            }
            Step::ForwardWith(body, call) => {
                if !self.replace_body(body, site, body_len) {
                    return Action::Pause;
                }
                let sent = if call.purpose == Purpose::EvictAhead {
                    self.send_eviction(call)
                } else {
                    self.dispatch(&call).is_ok()
                };
                if !sent {
                    // The exchange fences the write instead; the request goes on either way.
                    let _ = self.exchange.on_callout_dispatch_failed();
                }
                Action::Continue
            }
            Step::Dispatch(call) => match self.dispatch(&call) {
                Ok(()) => Action::Pause,
                Err(()) => {
                    let next = self.exchange.on_callout_dispatch_failed();
                    self.record();
                    return self.execute(next, site, body_len);
                }
            },
        };
        self.record();
        action
    }
}

impl Context for Filter {
    fn on_http_call_response(
        &mut self,
        token: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        match self.callout {
            Some(expected) if expected == token => self.callout = None,
            _ => {
                log::warn!("ignoring a callout answer with unknown token {token}");
                return;
            }
        }
        // A stream has one callout out at a time: an own eviction is answered now, if any.
        self.own_eviction = None;
        let eviction = self.exchange.awaits_eviction();
        let (status, headers, body) = call_answer(body_size, !eviction);
        // An eviction's time matters only when the sidecar did not answer it (was it the
        // timeout?): the clock is a hostcall, spared otherwise.
        let now = if eviction && sidecar_api::is_sidecar_answer(&headers) {
            0
        } else {
            now_ms()
        };
        let step = self.exchange.on_callout_answer(status, &headers, body, now);
        self.execute(step, Site::Callout, 0);
    }
}

impl HttpContext for Filter {
    /// The stream is over: a write whose outcome never came is fenced.
    fn on_log(&mut self) {
        self.settle_grouped();
        self.exchange.on_stream_end();
        self.record();
    }

    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let map = MapType::HttpRequestHeaders;
        // One hostcall for the whole map instead of one per header, read in place.
        let headers = buffers::pairs(map).unwrap_or_default();
        let [method, path, authorization, content_length, content_encoding, accept_encoding, content_type, request_id, traceparent, tracestate] =
            headers.get_many([
                ":method",
                ":path",
                "authorization",
                "content-length",
                "content-encoding",
                "accept-encoding",
                "content-type",
                "x-request-id",
                sidecar_api::TRACEPARENT_HEADER,
                sidecar_api::TRACESTATE_HEADER,
            ]);
        // A tracked namespace's watermark is in this worker's own copy (no hostcall); any
        // other's in shared data.
        let tracker = Rc::clone(&self.shared.tracker);
        let lookup = move |namespace: &str| {
            let local = tracker
                .try_borrow()
                .ok()
                .and_then(|t| t.as_ref().and_then(|t| t.lookup(namespace)));
            local.unwrap_or_else(|| shared_watermark(namespace))
        };
        let shared = self.shared.clone();
        let fenced = move |namespace: &str| shared.fenced(namespace);
        let generated;
        let request_id = match request_id.filter(|v| !v.is_empty()) {
            Some(id) => id,
            None => {
                generated = new_request_id();
                if let Err(status) = host::set_map_value(map, "x-request-id", Some(&generated)) {
                    log::debug!("could not add x-request-id: {status:?}");
                }
                generated.as_str()
            }
        };
        let head = RequestHead {
            method: method.unwrap_or_default(),
            path: path.unwrap_or_default(),
            authorization,
            content_length,
            content_encoding,
            accept_encoding,
            content_type,
            request_id,
            traceparent,
            tracestate,
            end_of_stream,
            now_ms: self.shared.tick_clock.get(),
            watermarks: Some(WatermarkLookup(&lookup)),
            fences: Some(FenceLookup(&fenced)),
        };
        let (edits, step) = self.exchange.on_request_headers(&head);
        apply(map, &edits);
        self.execute(step, Site::RequestHeaders, 0)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.request_seen = body_size;
        let step =
            self.exchange
                .on_request_body(body_size, end_of_stream, self.clock(), &mut read_request_body);
        self.execute(step, Site::RequestBody, body_size)
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        let size = self.request_seen;
        let step = self
            .exchange
            .on_request_trailers(size, self.clock(), &mut read_request_body);
        self.execute(step, Site::RequestTrailers, size)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let map = MapType::HttpResponseHeaders;
        let status = header(map, ":status")
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        // Envoy's own replies (no upstream response) are never 2xx or 3xx: only other statuses
        // need the (costlier) property read that tells them apart.
        let details = if (200..400).contains(&status) {
            None
        } else {
            host::get_property(vec!["response", "code_details"])
                .ok()
                .flatten()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
        };
        self.settle_grouped();
        let now = if self.exchange.response_needs_clock() {
            now_ms()
        } else {
            0
        };
        let (edits, step) = self
            .exchange
            .on_response_headers(status, details.as_deref(), end_of_stream, now);
        apply(map, &edits);
        let action = self.execute(step, Site::ResponseHeaders, 0);
        if action == Action::Pause {
            self.park();
        }
        action
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.exchange.is_parked() {
            // Held until the root resumes the stream; after that, body goes on.
            let settled = self.grouped.as_ref().is_none_or(|slot| slot.get().is_some());
            return if settled { Action::Continue } else { Action::Pause };
        }
        if !self.exchange.wants_response_body() {
            // Returning Continue here would release headers paused for a mirror callout.
            return if self.exchange.holds_response() {
                Action::Pause
            } else {
                Action::Continue
            };
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = read_body(BufferType::HttpResponseBody, 0, body_size);
        let (replacement, step) = self.exchange.on_response_complete(body.as_deref(), self.clock());
        if let Some(new_body) = replacement {
            if let Err(status) = buffers::replace(BufferType::HttpResponseBody, 0, body_size, &new_body) {
                self.shared.metrics.record(vec![Counter::BodyReplaceFailed]);
                log::error!("could not replace the response body: host status {status}");
            }
        }
        self.execute(step, Site::ResponseBody, body_size)
    }
}
