//! The per-request state machine. The glue feeds it what Envoy reports and carries out the
//! [`Step`] it returns; every decision (and the counters it implies) is made here.

use crate::auth::{authenticate, Credential};
use crate::body::{is_gzip, BodyBuffer, BodyError};
use crate::config::{AuthMode, Config, ReadWatermark};
use crate::error::LocalReply;
use crate::fence::{FenceNote, Scope as FenceScope};
use crate::metrics::{Counter, ReadReason, WriteReason};
use crate::outcome::{classify, ResponseClass};
use crate::reads::{self, WatermarkRule};
use crate::response::strip_affected_ids;
use crate::route::{self, Route, Scope};
use crate::sidecar_api;
use crate::watermark::{Touch, Watermark};
use crate::write::{fence_scope, plan, render, render_mirror, WritePlan};

/// The response header reporting a namespace's read watermark (epoch ms).
pub const STABLE_AS_OF_HEADER: &str = "x-layer-stable-as-of";

/// Looks a namespace's watermark up where the glue keeps it (the worker's own copy, else
/// Envoy's shared data).
#[derive(Clone, Copy)]
pub struct WatermarkLookup<'a>(pub &'a dyn Fn(&str) -> Option<Watermark>);

impl std::fmt::Debug for WatermarkLookup<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WatermarkLookup")
    }
}

/// Tells whether a namespace has an eviction pending (the worker's fences, else other workers'
/// through Envoy's shared data).
#[derive(Clone, Copy)]
pub struct FenceLookup<'a>(pub &'a dyn Fn(&str) -> bool);

impl std::fmt::Debug for FenceLookup<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FenceLookup")
    }
}

/// What Envoy reported about the request headers.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub authorization: Option<&'a str>,
    pub content_length: Option<&'a str>,
    pub content_encoding: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub request_id: &'a str,
    pub end_of_stream: bool,
    /// A clock (epoch ms) for the watermark's freshness: the glue passes a coarse one (its timer's
    /// last tick), which saves a hostcall per request.
    pub now_ms: u64,
    /// Where queries read the watermark of their namespace (none: unknown everywhere).
    pub watermarks: Option<WatermarkLookup<'a>>,
    /// Where document fetches learn whether their namespace is fenced (none: never).
    pub fences: Option<FenceLookup<'a>>,
}

/// Header changes for the glue to make before it carries out the step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderEdits {
    pub set: Vec<(&'static str, String)>,
    pub remove: Vec<&'static str>,
}

/// Headers of a sidecar answer relayed to the client: the cache marker, redirects, and the ones a
/// client acts on, which the sidecar relays from Turbopuffer on failed pipeline writes and
/// document fetches (SPEC §1). Hop-by-hop and server headers stay behind.
const RELAYED_SIDECAR_HEADERS: [&str; 7] = [
    "content-type",
    "x-layer-cache",
    "location",
    "retry-after",
    "retry-after-ms",
    "x-request-id",
    "x-should-retry",
];

/// What a callout is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Mirror,
    Purge,
    /// A pipeline or document-fetch request answered by the sidecar.
    Route,
}

/// An HTTP call to the sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callout {
    pub purpose: Purpose,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
}

/// What the glue does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Let the stream go on.
    Continue,
    /// Hold the stream (Envoy keeps buffering).
    Pause,
    /// Send this reply locally; the request is over.
    Reply(LocalReply),
    /// Replace the buffered body when given, then let the stream go on. A replaced body goes
    /// up with `content-length` set to its length (removed when the request ended with trailers,
    /// where the upstream request is chunked).
    Forward(Option<Vec<u8>>),
    /// Dispatch this callout and hold the stream until [`Exchange::on_callout_answer`].
    Dispatch(Callout),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    /// Collecting the request body.
    Buffering,
    /// The request went upstream.
    Upstream,
    /// Waiting for the sidecar to answer a route callout.
    AwaitingRoute,
    /// Collecting the response body (to read affected ids or replace the body).
    ResponseBuffering,
    /// Waiting for a mirror or purge callout before the response goes on.
    AwaitingMirror,
    /// A local reply was sent; nothing else happens.
    Replied,
    Done,
}

/// How a request body is collected.
enum Collect {
    /// gzip bodies are decoded chunk by chunk as they arrive, so the limit holds on the decoded
    /// size and a bomb is refused early.
    Stream { buffer: BodyBuffer, seen: usize },
    /// Plain bodies stay in Envoy's buffer and are read once, whole, at the end.
    Whole,
}

/// Reads `len` bytes at `start` of the request body Envoy has buffered.
pub type ReadBody<'a> = &'a mut dyn FnMut(usize, usize) -> Vec<u8>;

/// The accepted write, kept for the mirror (rendered for it only after a 2xx).
struct Sent {
    namespace: String,
    stamp: u64,
    /// The client's (decoded) body; the mirror copy is rendered from it with the same stamp.
    body: Vec<u8>,
    plan: WritePlan,
}

/// One request's state.
pub struct Exchange {
    phase: Phase,
    route: Route,
    collect: Option<Collect>,
    /// The request body arrives gzip-encoded and goes upstream decoded.
    decoded: bool,
    sent: Option<Sent>,
    /// Replacement for a router-made response body.
    rewrite: Option<LocalReply>,
    method: String,
    /// Whether the request changes data (any non-read route): a timeout may hide an applied write.
    mutates: bool,
    /// The canonical path, for a route the sidecar answers.
    path: String,
    content_type: Option<String>,
    forward_authorization: Option<String>,
    request_id: String,
    callout_purpose: Option<Purpose>,
    callout_started_ms: u64,
    max_body_bytes: u64,
    mirror_timeout_ms: u64,
    sidecar_timeout_ms: u64,
    sidecar_cluster: String,
    mirror_vectors: bool,
    read_watermark: ReadWatermark,
    /// A document fetch of a fenced namespace: the sidecar is asked to leave the cache alone.
    bypass: bool,
    /// A query's namespace watermark, when known and fresh at the request headers.
    watermark: Option<Watermark>,
    counters: Vec<Counter>,
    touches: Vec<Touch>,
    fences: Vec<FenceNote>,
    fence_max_ids: usize,
    /// The write was accepted and forwarded; `outcome` says whether its one mirror outcome
    /// counter (ok, failed, timeout, skipped, unanswered) was recorded yet.
    accepted: bool,
    outcome: bool,
}

impl Default for Exchange {
    fn default() -> Self {
        Self::new()
    }
}

impl Exchange {
    pub fn new() -> Self {
        Exchange {
            phase: Phase::Start,
            route: Route::Passthrough,
            collect: None,
            decoded: false,
            sent: None,
            rewrite: None,
            method: String::new(),
            // Until the request headers say otherwise, assume the worst.
            mutates: true,
            path: String::new(),
            content_type: None,
            forward_authorization: None,
            request_id: String::new(),
            callout_purpose: None,
            callout_started_ms: 0,
            max_body_bytes: 0,
            mirror_timeout_ms: 0,
            sidecar_timeout_ms: 0,
            sidecar_cluster: String::new(),
            mirror_vectors: false,
            read_watermark: ReadWatermark::Off,
            bypass: false,
            watermark: None,
            counters: Vec::new(),
            touches: Vec::new(),
            fences: Vec::new(),
            fence_max_ids: 0,
            accepted: false,
            outcome: false,
        }
    }

    /// Counters incremented since the last call.
    pub fn take_counters(&mut self) -> Vec<Counter> {
        std::mem::take(&mut self.counters)
    }

    /// Whether the next request or response step needs the clock: to stamp a write, or to time a
    /// callout. Queries and passthrough requests do not, and the glue then skips the hostcall.
    pub fn needs_clock(&self) -> bool {
        !matches!(self.route, Route::Query { .. } | Route::Passthrough)
    }

    /// What writes could not mirror since the last call, for the worker's fences.
    pub fn take_fences(&mut self) -> Vec<FenceNote> {
        std::mem::take(&mut self.fences)
    }

    /// Records an accepted write's one mirror outcome (`MirrorOk`, `MirrorFailed`,
    /// `MirrorTimeout`, `MirrorSkipped` or `WritesUnanswered`).
    fn outcome(&mut self, counter: Counter) {
        if self.accepted && !self.outcome {
            self.outcome = true;
            self.counters.push(counter);
        }
    }

    /// The write kept for its mirror did not reach the cache: fence the documents it may change.
    fn fence_sent(&mut self) {
        if let Some(sent) = self.sent.take() {
            let scope = fence_scope(&sent.body, self.fence_max_ids);
            self.fences.push(FenceNote {
                namespace: sent.namespace,
                scope,
                stamp: sent.stamp,
            });
        }
    }

    /// The stream ended (the glue calls this from Envoy's last callback). A write forwarded whose
    /// outcome never came (the client hung up, Envoy reset the stream) may have been applied by
    /// Turbopuffer: fence it. So is a namespace delete whose purge did not happen.
    pub fn on_stream_end(&mut self) {
        let open = matches!(
            self.phase,
            Phase::Upstream | Phase::ResponseBuffering | Phase::AwaitingMirror
        );
        if !open {
            return;
        }
        self.phase = Phase::Done;
        match &self.route {
            Route::Write { .. } => {
                self.outcome(Counter::WritesUnanswered);
                self.fence_sent();
            }
            Route::DeleteNamespace { namespace } => {
                let namespace = namespace.clone();
                self.fences.push(FenceNote {
                    namespace,
                    scope: FenceScope::Namespace,
                    stamp: 0,
                });
            }
            _ => {}
        }
    }

    /// Namespaces used since the last call, for the watermark tracker.
    pub fn take_touches(&mut self) -> Vec<Touch> {
        std::mem::take(&mut self.touches)
    }

    /// Records that this request used `namespace` (when the watermark is on).
    fn touch(&mut self, namespace: &str, written: bool) {
        if self.read_watermark == ReadWatermark::Off {
            return;
        }
        self.touches.push(Touch {
            namespace: namespace.to_owned(),
            written,
            authorization: self.forward_authorization.clone(),
        });
    }

    /// The counter for a body refused for its encoding, by route.
    fn bad_encoding(&self) -> Counter {
        if matches!(self.route, Route::Query { .. }) {
            Counter::ReadsRejected(ReadReason::BadEncoding)
        } else {
            Counter::WritesRejected(WriteReason::BadEncoding)
        }
    }

    fn reply(&mut self, reply: LocalReply) -> Step {
        self.phase = Phase::Replied;
        self.collect = None;
        Step::Reply(reply)
    }

    /// Request headers: classify, authenticate (every path: Envoy sends them all to Turbopuffer,
    /// and a caller's key must never reach it in keys mode), decide whether to buffer.
    pub fn on_request_headers(&mut self, config: &Config, head: &RequestHead<'_>) -> (HeaderEdits, Step) {
        let mut edits = HeaderEdits::default();
        if self.phase != Phase::Start {
            return (edits, Step::Continue);
        }
        self.route = route::classify(head.method, head.path);
        let scope = route::required_scope(head.method, head.path);
        self.method = head.method.to_owned();
        self.mutates = scope != Scope::Read;
        match authenticate(config, head.authorization, scope) {
            Ok(Credential::Keep) => {
                self.forward_authorization = head.authorization.map(str::to_owned);
            }
            Ok(Credential::Replace(value)) => edits.set.push(("authorization", value)),
            Err(reply) => {
                self.counters.push(if reply.status == 401 {
                    Counter::Unauthorized
                } else {
                    Counter::Forbidden
                });
                log::info!("request {}: rejected by auth ({})", head.request_id, reply.status);
                return (edits, self.reply(reply));
            }
        }
        if config.auth_mode == AuthMode::Keys {
            self.forward_authorization = None;
        }
        self.request_id = head.request_id.to_owned();
        self.max_body_bytes = config.max_body_bytes;
        self.mirror_timeout_ms = config.mirror_timeout_ms;
        self.sidecar_timeout_ms = config.sidecar_timeout_ms;
        self.sidecar_cluster = config.sidecar_cluster.clone();
        self.mirror_vectors = config.mirror_vectors;
        self.read_watermark = config.read_watermark;
        self.fence_max_ids = config.fence_max_ids;
        if let Route::DocumentFetch { namespace } = &self.route {
            if head.fences.is_some_and(|fenced| (fenced.0)(namespace)) {
                self.bypass = true;
                self.counters.push(Counter::FetchesBypassed);
            }
        }
        if let Route::Query { namespace } = &self.route {
            if self.read_watermark != ReadWatermark::Off {
                let namespace = namespace.clone();
                self.watermark = head
                    .watermarks
                    .and_then(|lookup| (lookup.0)(&namespace))
                    .filter(|w| w.is_fresh(head.now_ms, config.watermark_stale_ms));
                self.touch(&namespace, false);
            }
        }
        if !self.route.needs_body() {
            self.phase = Phase::Upstream;
            return (edits, Step::Continue);
        }
        if let Some(len) = head.content_length.and_then(|v| v.trim().parse::<u64>().ok()) {
            if len > config.max_body_bytes {
                self.counters.push(Counter::PayloadTooLarge);
                return (
                    edits,
                    self.reply(LocalReply::payload_too_large(config.max_body_bytes)),
                );
            }
        }
        let gzip = is_gzip(head.content_encoding);
        if let Some(enc) = head
            .content_encoding
            .filter(|e| !gzip && !e.trim().eq_ignore_ascii_case("identity"))
        {
            self.counters.push(self.bad_encoding());
            let message = format!(
                "unsupported content-encoding '{}'; send identity or gzip",
                enc.trim()
            );
            return (edits, self.reply(LocalReply::validation(&message)));
        }
        if gzip {
            self.counters.push(Counter::GzipDecoded);
            edits.remove.push("content-encoding");
        }
        // `content-length` stays: the glue sets it to the new length if the body is replaced
        // (Envoy holds the headers until the body is complete), so an unchanged body goes up as
        // it came.
        if matches!(self.route, Route::Write { .. }) {
            // The filter reads write responses (affected ids); keep them uncompressed.
            edits.remove.push("accept-encoding");
        }
        self.path = route::canonical(head.path);
        self.content_type = head.content_type.map(str::to_owned);
        self.decoded = gzip;
        self.collect = Some(if gzip {
            Collect::Stream {
                buffer: BodyBuffer::new(config.max_body_bytes, true, None),
                seen: 0,
            }
        } else {
            Collect::Whole
        });
        self.phase = Phase::Buffering;
        if head.end_of_stream {
            return (edits, self.finish_request(0, 0, &mut |_, _| Vec::new()));
        }
        (edits, Step::Pause)
    }

    /// Envoy buffered `size` bytes of request body so far (cumulative while the filter pauses).
    /// `read` fetches buffered bytes; `now_ms` is used only if the body completes.
    pub fn on_request_body(
        &mut self,
        size: usize,
        end_of_stream: bool,
        now_ms: u64,
        read: ReadBody<'_>,
    ) -> Step {
        if self.phase != Phase::Buffering {
            return self.after_request();
        }
        if size as u64 > self.max_body_bytes {
            return self.body_error(BodyError::TooLarge);
        }
        if let Some(Collect::Stream { buffer, seen }) = &mut self.collect {
            let start = (*seen).min(size);
            let chunk = read(start, size - start);
            *seen = size;
            if let Err(e) = buffer.push(&chunk) {
                return self.body_error(e);
            }
        }
        if end_of_stream {
            self.finish_request(now_ms, size, read)
        } else {
            Step::Pause
        }
    }

    /// Request trailers end the body (HTTP/2 requests may never flag end of stream on the body).
    pub fn on_request_trailers(&mut self, size: usize, now_ms: u64, read: ReadBody<'_>) -> Step {
        if self.phase != Phase::Buffering {
            return self.after_request();
        }
        self.finish_request(now_ms, size, read)
    }

    /// A request callback outside buffering: keep a replied or sidecar-answered stream held.
    fn after_request(&self) -> Step {
        match self.phase {
            Phase::Replied | Phase::AwaitingRoute => Step::Pause,
            _ => Step::Continue,
        }
    }

    fn body_error(&mut self, e: BodyError) -> Step {
        match e {
            BodyError::TooLarge => {
                self.counters.push(Counter::PayloadTooLarge);
                self.reply(LocalReply::payload_too_large(self.max_body_bytes))
            }
            BodyError::BadGzip(reason) => {
                self.counters.push(self.bad_encoding());
                self.reply(LocalReply::validation(&format!(
                    "request body is not valid gzip: {reason}"
                )))
            }
        }
    }

    fn finish_request(&mut self, now_ms: u64, size: usize, read: ReadBody<'_>) -> Step {
        let decoded = match self.collect.take() {
            Some(Collect::Stream { buffer, .. }) => match buffer.finish() {
                Ok(b) => b,
                Err(e) => return self.body_error(e),
            },
            Some(Collect::Whole) => read(0, size),
            None => return Step::Continue,
        };
        match self.route.clone() {
            Route::Write { namespace } => self.finish_write(namespace, decoded, now_ms),
            Route::Query { namespace } => self.finish_query(&namespace, decoded),
            Route::Pipeline | Route::DocumentFetch { .. } => {
                self.phase = Phase::AwaitingRoute;
                self.callout_purpose = Some(Purpose::Route);
                self.callout_started_ms = now_ms;
                self.counters.push(Counter::SidecarRouted);
                let mut headers = self.callout_headers(&self.method.clone(), &self.path.clone());
                if let Some(ct) = &self.content_type {
                    headers.push(("content-type".to_owned(), ct.clone()));
                }
                if let Some(auth) = &self.forward_authorization {
                    headers.push(("authorization".to_owned(), auth.clone()));
                }
                if self.bypass {
                    headers.push((sidecar_api::BYPASS_HEADER.to_owned(), "1".to_owned()));
                }
                Step::Dispatch(Callout {
                    purpose: Purpose::Route,
                    headers,
                    body: decoded,
                    timeout_ms: self.sidecar_timeout_ms,
                })
            }
            _ => {
                self.phase = Phase::Upstream;
                Step::Continue
            }
        }
    }

    fn finish_write(&mut self, namespace: String, mut body: Vec<u8>, stamp: u64) -> Step {
        let plan = match plan(&body) {
            Ok(p) => p,
            Err(rejection) => {
                self.counters.push(Counter::WritesRejected(rejection.reason()));
                log::info!(
                    "request {}: write to '{namespace}' rejected: {}",
                    self.request_id,
                    rejection.reason().as_str()
                );
                return self.reply(LocalReply::validation(&rejection.message()));
            }
        };
        self.counters.push(Counter::WritesAccepted);
        self.accepted = true;
        if plan.stamped_rows > 0 {
            self.counters.push(Counter::RowsStamped(plan.stamped_rows));
        }
        if plan.response_driven && !plan.client_wants_ids {
            self.counters.push(Counter::AffectedIdsRequested);
        }
        log::debug!(
            "request {}: write to '{namespace}' accepted, {} rows stamped at {stamp}",
            self.request_id,
            plan.stamped_rows
        );
        self.phase = Phase::Upstream;
        // The body is replaced whenever it changed or was decoded from gzip.
        let forward = if !plan.is_identity() {
            Some(render(&body, &plan, stamp))
        } else if self.decoded {
            Some(if plan.mirrors {
                body.clone()
            } else {
                std::mem::take(&mut body)
            })
        } else {
            None
        };
        if plan.mirrors {
            self.sent = Some(Sent {
                namespace,
                stamp,
                body,
                plan,
            });
        }
        Step::Forward(forward)
    }

    /// A complete query body: validate, apply the temporal fields and the watermark, forward.
    fn finish_query(&mut self, namespace: &str, mut body: Vec<u8>) -> Step {
        let rule = WatermarkRule {
            at_ms: self
                .watermark
                .filter(|w| w.updating && self.read_watermark != ReadWatermark::Off)
                .map(|w| w.at_ms),
            always: self.read_watermark == ReadWatermark::Always,
        };
        let plan = match reads::plan(&body, rule) {
            Ok(p) => p,
            Err(rejection) => {
                self.counters.push(Counter::ReadsRejected(rejection.reason()));
                log::info!(
                    "request {}: query of '{namespace}' rejected: {}",
                    self.request_id,
                    rejection.reason().as_str()
                );
                return self.reply(LocalReply::validation(&rejection.message()));
            }
        };
        if plan.temporal > 0 {
            self.counters.push(Counter::QueriesTemporal);
        }
        if plan.watermarked > 0 {
            self.counters.push(Counter::QueriesWatermarked);
        }
        if self.watermark.is_none() && self.read_watermark != ReadWatermark::Off {
            self.counters.push(Counter::QueriesWithoutWatermark);
        }
        self.phase = Phase::Upstream;
        let forward = if !plan.is_identity() {
            Some(reads::render(&body, &plan))
        } else if self.decoded {
            Some(std::mem::take(&mut body))
        } else {
            None
        };
        Step::Forward(forward)
    }

    fn callout_headers(&self, method: &str, path: &str) -> Vec<(String, String)> {
        vec![
            (":method".to_owned(), method.to_owned()),
            (":path".to_owned(), path.to_owned()),
            (":authority".to_owned(), self.sidecar_cluster.clone()),
            (sidecar_api::REQUEST_ID_HEADER.to_owned(), self.request_id.clone()),
        ]
    }

    fn json_callout(&mut self, purpose: Purpose, path: &str, body: Vec<u8>, now_ms: u64) -> Step {
        let mut headers = self.callout_headers("POST", path);
        headers.push(("content-type".to_owned(), "application/json".to_owned()));
        self.phase = Phase::AwaitingMirror;
        self.callout_purpose = Some(purpose);
        self.callout_started_ms = now_ms;
        Step::Dispatch(Callout {
            purpose,
            headers,
            body,
            timeout_ms: self.mirror_timeout_ms,
        })
    }

    /// Response headers. `code_details` is Envoy's `response.code_details`.
    pub fn on_response_headers(
        &mut self,
        status: u16,
        code_details: Option<&str>,
        end_of_stream: bool,
        now_ms: u64,
    ) -> (HeaderEdits, Step) {
        let mut edits = HeaderEdits::default();
        // Envoy may answer while the body is still arriving (its own buffer limit, a reset):
        // such replies are rewritten too. Our own replies and finished exchanges are left alone.
        if !matches!(self.phase, Phase::Start | Phase::Buffering | Phase::Upstream) {
            return (edits, Step::Continue);
        }
        let class = classify(status, code_details, self.mutates);
        if self.phase != Phase::Upstream && class == ResponseClass::Relay {
            return (edits, Step::Continue);
        }
        self.collect = None;
        if let ResponseClass::Rewrite(reply) = class {
            self.counters.push(match reply.status {
                504 => Counter::GatewayTimeout,
                413 => Counter::PayloadTooLarge,
                404 => Counter::RouteNotFound,
                _ => Counter::UpstreamError,
            });
            log::warn!(
                "request {}: no upstream response ({code_details:?}), answering {}",
                self.request_id,
                reply.status
            );
            // No answer from Turbopuffer: a forwarded write may or may not have applied.
            if self.phase == Phase::Upstream {
                self.outcome(Counter::WritesUnanswered);
                self.fence_sent();
                if let Route::DeleteNamespace { namespace } = &self.route {
                    let namespace = namespace.clone();
                    self.fences.push(FenceNote {
                        namespace,
                        scope: FenceScope::Namespace,
                        stamp: 0,
                    });
                }
            }
            self.sent = None;
            // Envoy sends its reply as headers only for a HEAD request (no body allowed: the new
            // status and content type are all the client gets) and when the reply has no body
            // text (`cluster_not_found`, `route_not_found`). With no body to replace, the JSON
            // goes out as our own local reply instead, which Envoy sends straight to the client
            // since the response headers have not left yet.
            if end_of_stream && self.method != "HEAD" {
                return (edits, self.reply(reply));
            }
            edits.set.push((":status", reply.status.to_string()));
            edits.set.push(("content-type", "application/json".to_owned()));
            edits.remove.push("content-length");
            if end_of_stream {
                self.phase = Phase::Done;
                return (edits, Step::Continue);
            }
            self.rewrite = Some(reply);
            self.phase = Phase::ResponseBuffering;
            return (edits, Step::Continue);
        }
        if let (Route::Query { .. }, Some(w)) = (&self.route, self.watermark) {
            edits.set.push((STABLE_AS_OF_HEADER, w.at_ms.to_string()));
        }
        let success = (200..300).contains(&status);
        if !success {
            // Turbopuffer refused the write: nothing changed, nothing to mirror.
            self.outcome(Counter::MirrorSkipped);
            self.phase = Phase::Done;
            self.sent = None;
            return (edits, Step::Continue);
        }
        if let Route::Write { namespace } = &self.route {
            let namespace = namespace.clone();
            self.touch(&namespace, true);
        }
        match &self.route {
            Route::DeleteNamespace { namespace } => {
                let body = sidecar_api::purge_body(namespace);
                (
                    edits,
                    self.json_callout(Purpose::Purge, sidecar_api::PURGE_PATH, body, now_ms),
                )
            }
            Route::Write { .. } => match &self.sent {
                Some(sent) if sent.plan.response_driven && !end_of_stream => {
                    if !sent.plan.client_wants_ids {
                        edits.remove.push("content-length");
                    }
                    self.phase = Phase::ResponseBuffering;
                    (edits, Step::Continue)
                }
                Some(_) => {
                    let step = self.mirror(None, now_ms);
                    (edits, step)
                }
                None => {
                    // Nothing the cache holds changes (schema, copy, branch).
                    self.outcome(Counter::MirrorSkipped);
                    self.phase = Phase::Done;
                    (edits, Step::Continue)
                }
            },
            _ => {
                self.phase = Phase::Done;
                (edits, Step::Continue)
            }
        }
    }

    /// Whether the glue should collect response body chunks until the end of the stream.
    pub fn wants_response_body(&self) -> bool {
        self.phase == Phase::ResponseBuffering
    }

    /// Whether the response must be held: a body chunk arriving while a mirror or purge callout
    /// is outstanding must not let the paused headers go on.
    pub fn holds_response(&self) -> bool {
        matches!(self.phase, Phase::ResponseBuffering | Phase::AwaitingMirror)
    }

    /// The whole response body, once the stream ended. Returns a replacement body (if any) and
    /// the next step.
    pub fn on_response_complete(&mut self, body: &[u8], now_ms: u64) -> (Option<Vec<u8>>, Step) {
        if self.phase != Phase::ResponseBuffering {
            return (None, Step::Continue);
        }
        if let Some(reply) = self.rewrite.take() {
            self.phase = Phase::Done;
            return (Some(reply.body), Step::Continue);
        }
        let strip = self.sent.as_ref().is_some_and(|s| !s.plan.client_wants_ids);
        let replacement = if strip { strip_affected_ids(body) } else { None };
        if replacement.is_some() {
            self.counters.push(Counter::AffectedIdsStripped);
        }
        let step = self.mirror(Some(body), now_ms);
        (replacement, step)
    }

    fn mirror(&mut self, response: Option<&[u8]>, now_ms: u64) -> Step {
        // The write is kept until the mirror's outcome is known: a failed one fences its ids.
        let Some(sent) = self.sent.as_ref() else {
            self.phase = Phase::Done;
            return Step::Continue;
        };
        // The cache gets the stamped write without vectors unless it keeps them.
        let write = if self.mirror_vectors {
            render(&sent.body, &sent.plan, sent.stamp)
        } else {
            render_mirror(&sent.body, &sent.plan, sent.stamp)
        };
        let body = sidecar_api::mirror_body(&sent.namespace, sent.stamp, &write, response);
        self.json_callout(Purpose::Mirror, sidecar_api::MIRROR_PATH, body, now_ms)
    }

    /// A callout came back. `status` is `None` when it was reset (no headers, no `:status`); an
    /// answer that is not JSON is Envoy's own (timeout, unreachable sidecar), not the sidecar's.
    pub fn on_callout_answer(
        &mut self,
        status: Option<u16>,
        headers: &[(String, String)],
        body: Vec<u8>,
        now_ms: u64,
    ) -> Step {
        let Some(purpose) = self.callout_purpose.take() else {
            return Step::Continue;
        };
        let elapsed = now_ms.saturating_sub(self.callout_started_ms);
        // Envoy answers a call it could not deliver or that timed out with its own plain-text
        // reply (503 "upstream connect error ...", 504 "upstream request timeout"), not as a
        // failure; only a reset comes without headers. The sidecar always answers JSON, so any
        // other answer means the sidecar did not answer.
        let json = sidecar_api::is_sidecar_answer(headers);
        // Envoy's own 504 is its callout timeout firing; so is a reset at or past the timeout.
        // (Its timer and the host clock are read at different moments, so elapsed time alone can
        // fall a millisecond short of a timeout that did fire.)
        let envoy_timeout = !json && status == Some(504);
        let status = status.filter(|_| json);
        let timed_out = |limit_ms: u64| status.is_none() && (envoy_timeout || elapsed >= limit_ms);
        match purpose {
            Purpose::Route => {
                if self.phase != Phase::AwaitingRoute {
                    return Step::Continue;
                }
                match status {
                    Some(status) => {
                        let headers = headers
                            .iter()
                            .filter(|(k, _)| {
                                RELAYED_SIDECAR_HEADERS.contains(&k.to_ascii_lowercase().as_str())
                            })
                            .cloned()
                            .collect();
                        self.reply(LocalReply {
                            status,
                            body,
                            headers,
                        })
                    }
                    None => {
                        self.counters.push(Counter::SidecarUnavailable);
                        let why = if timed_out(self.sidecar_timeout_ms) {
                            "timed out"
                        } else {
                            "no response"
                        };
                        self.reply(LocalReply::cache_unavailable(why))
                    }
                }
            }
            Purpose::Mirror | Purpose::Purge => {
                if self.phase != Phase::AwaitingMirror {
                    return Step::Continue;
                }
                self.phase = Phase::Done;
                let ok = status.is_some_and(|s| (200..300).contains(&s));
                let counter = match (purpose, ok) {
                    (Purpose::Purge, true) => Counter::PurgeOk,
                    (Purpose::Purge, false) => Counter::PurgeFailed,
                    (_, true) => Counter::MirrorOk,
                    (_, false) if timed_out(self.mirror_timeout_ms) => Counter::MirrorTimeout,
                    (_, false) => Counter::MirrorFailed,
                };
                if !ok {
                    log::warn!(
                        "request {}: {purpose:?} callout failed (status {status:?}); fencing",
                        self.request_id
                    );
                }
                self.settle(purpose, ok, counter);
                Step::Continue
            }
        }
    }

    /// The glue could not dispatch the callout (unknown cluster, bad headers).
    pub fn on_callout_dispatch_failed(&mut self) -> Step {
        self.counters.push(Counter::CalloutDispatchFailed);
        match self.callout_purpose.take() {
            Some(Purpose::Route) => {
                self.counters.push(Counter::SidecarUnavailable);
                self.reply(LocalReply::cache_unavailable("callout could not be dispatched"))
            }
            Some(purpose) => {
                let counter = if purpose == Purpose::Purge {
                    Counter::PurgeFailed
                } else {
                    Counter::MirrorFailed
                };
                self.settle(purpose, false, counter);
                self.phase = Phase::Done;
                Step::Continue
            }
            None => Step::Continue,
        }
    }

    /// A mirror or purge callout's outcome: counted, and fenced when it did not happen.
    fn settle(&mut self, purpose: Purpose, ok: bool, counter: Counter) {
        match purpose {
            Purpose::Mirror => {
                self.outcome(counter);
                if ok {
                    self.sent = None;
                } else {
                    self.fence_sent();
                }
            }
            _ => {
                self.counters.push(counter);
                if let (false, Route::DeleteNamespace { namespace }) = (ok, &self.route) {
                    let namespace = namespace.clone();
                    self.fences.push(FenceNote {
                        namespace,
                        scope: FenceScope::Namespace,
                        stamp: 0,
                    });
                }
            }
        }
    }
}

/// Formats 16 random bytes as a version-4 UUID (for requests that arrive without an id).
pub fn request_id_from(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests;
