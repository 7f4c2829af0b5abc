//! The per-request state machine. The glue feeds it what Envoy reports and carries out the
//! [`Step`] it returns; every decision (and the counters it implies) is made here.

use crate::auth::{authenticate, Credential};
use crate::body::{is_gzip, BodyError, GzipBody};
use crate::config::{AuthMode, Config, ReadWatermark};
use crate::error::LocalReply;
use crate::fence::{FenceNote, Scope as FenceScope};
use crate::metrics::{Counter, ReadReason, WriteReason};
use crate::outcome::{classify, ResponseClass};
use crate::reads::{self, WatermarkRule};
use crate::response::strip_affected_ids;
use crate::route::{self, Route, Scope};
use crate::sidecar_api;
use crate::trace::TraceContext;
use crate::watermark::{Touch, Watermark};
use crate::write::{fence_scope, plan, render, render_mirror, WritePlan};
use std::rc::Rc;

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
    /// The client's `accept-encoding`: removed from writes (their responses are read).
    pub accept_encoding: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub request_id: &'a str,
    /// The W3C `traceparent` and `tracestate` headers, passed on on every callout.
    pub traceparent: Option<&'a str>,
    pub tracestate: Option<&'a str>,
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

/// Headers of a sidecar answer relayed to the client besides the ones it relays from Turbopuffer
/// ([`sidecar_api::RELAYED_UPSTREAM_HEADERS`]): its content type, the cache marker, redirects.
const SIDECAR_HEADERS: [&str; 3] = ["content-type", "x-layer-cache", "location"];

/// Whether a header of a sidecar answer goes on to the client.
fn relayed(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SIDECAR_HEADERS.contains(&name.as_str()) || sidecar_api::RELAYED_UPSTREAM_HEADERS.contains(&name.as_str())
}

/// What a callout is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Mirror,
    Purge,
    /// A write's eviction of the documents it names, sent with the write: the response waits
    /// for it, the mirror then goes after the response.
    EvictAhead,
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

/// A half of the stream: the one a callout holds is resumed when it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    Request,
    Response,
}

/// What the glue does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Let the stream go on (the answer to the Envoy callback being handled).
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
    /// Replace the buffered body when given (as `Forward`), dispatch this callout, and let the
    /// request go on: the callout runs while the upstream works. A dispatch that fails is
    /// reported to [`Exchange::on_callout_dispatch_failed`], whose step is then ignored.
    ForwardWith(Option<Vec<u8>>, Callout),
    /// A callout was answered: resume this half of the stream, held since the callout went out.
    Resume(Half),
}

/// Reads `len` bytes at `start` of the request body Envoy has buffered; `None` when Envoy
/// refused.
pub type ReadBody<'a> = &'a mut dyn FnMut(usize, usize) -> Option<Vec<u8>>;

/// What the request headers said, which the later steps read.
struct Request {
    route: Route,
    method: String,
    request_id: String,
    /// The client's trace context, carried onto every callout.
    trace: TraceContext,
    /// Whether the request changes data (any non-read route): a timeout may hide an applied write.
    mutates: bool,
    /// The caller's credential, forwarded on callouts (passthrough auth only).
    forward_authorization: Option<String>,
    /// A query's namespace watermark, when known and fresh at the request headers.
    watermark: Option<Watermark>,
}

/// Where the exchange is, with what that step needs.
enum Phase {
    Start,
    /// Collecting the request body.
    Buffering(Buffering),
    /// The request went upstream; a write that mirrors is kept for its mirror.
    Upstream {
        sent: Option<Sent>,
    },
    /// Waiting for the sidecar to answer a route callout.
    AwaitingRoute {
        started_ms: u64,
    },
    /// Collecting the response body.
    ResponseBuffering(ResponseWork),
    /// Turbopuffer answered 2xx while the write's eviction ahead was still out: the response
    /// waits for it (read-your-writes), then the mirror goes after the response.
    AwaitingEviction {
        sent: Sent,
    },
    /// Waiting for a mirror or purge callout before the response goes on. The write is kept
    /// until its mirror's outcome is known: a failed one fences its ids.
    AwaitingMirror {
        purpose: Purpose,
        started_ms: u64,
        sent: Option<Sent>,
    },
    /// The write's response waits for an eviction that travels in the worker's group: the write
    /// itself went to the root context (see [`Exchange::park`]); this exchange only holds the
    /// response until the stream is resumed.
    Parked,
    /// A local reply was sent; nothing else happens.
    Replied,
    Done,
}

/// A request body being collected. Plain bodies stay in Envoy's buffer and are read once, whole,
/// at the end; gzip bodies are decoded chunk by chunk as they arrive, so the limit holds on the
/// decoded size and a bomb is refused early.
struct Buffering {
    gzip: Option<Gzip>,
    /// For a route the sidecar answers: what its callout carries.
    sidecar: Option<SidecarRequest>,
}

struct Gzip {
    body: GzipBody,
    /// Wire bytes already decoded (Envoy reports the buffered size cumulatively).
    seen: usize,
}

/// What a route callout carries besides the body.
struct SidecarRequest {
    /// The canonical path.
    path: String,
    content_type: Option<String>,
    /// A document fetch of a fenced namespace: the sidecar is asked to leave the cache alone.
    bypass: bool,
}

/// Why the response body is collected.
enum ResponseWork {
    /// Envoy's own reply (no upstream response): its body becomes this JSON.
    Rewrite(LocalReply),
    /// A response-driven write: the affected ids are read for the mirror (and stripped when the
    /// client did not ask for them).
    Mirror(Sent),
}

/// The accepted write, kept for the mirror (rendered for it only after a 2xx).
struct Sent {
    namespace: String,
    stamp: u64,
    /// The client's (decoded) body; the mirror copy is rendered from it with the same stamp.
    body: Vec<u8>,
    plan: WritePlan,
    ahead: Ahead,
}

/// Whether a write's cached documents are evicted ahead of Turbopuffer's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ahead {
    /// No: the response waits for the mirror (filter and conditional writes, which change
    /// documents the body does not name; patches, which merge into cached copies; writes naming
    /// too many ids).
    Off,
    /// The eviction is out, since this time.
    Outstanding { started_ms: u64 },
    /// The eviction was answered (a failed one fenced the write): no copy older than the write
    /// is served any more, so the mirror may go after the response.
    Settled,
}

/// A write's mirror that goes after its response: the root context sends it (a callout no stream
/// waits for) and records its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorJob {
    pub request_id: String,
    /// The write's trace context (a batch carries its first mirror's).
    pub trace: TraceContext,
    /// The `MirrorRequest` body.
    pub body: Vec<u8>,
}

/// Where an exchange is with its one mirror outcome counter (ok, failed, timeout, skipped,
/// unanswered): only an accepted write has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MirrorOutcome {
    NotAWrite,
    Pending,
    Recorded,
}

/// One request's state.
pub struct Exchange {
    /// The plugin configuration, shared by every stream of the VM.
    config: Rc<Config>,
    request: Request,
    phase: Phase,
    mirror_outcome: MirrorOutcome,
    counters: Vec<Counter>,
    touches: Vec<Touch>,
    fences: Vec<FenceNote>,
    mirrors: Vec<MirrorJob>,
}

impl Exchange {
    pub fn new(config: Rc<Config>) -> Self {
        Exchange {
            config,
            request: Request {
                route: Route::Passthrough,
                method: String::new(),
                request_id: String::new(),
                trace: TraceContext::default(),
                // Until the request headers say otherwise, assume the worst.
                mutates: true,
                forward_authorization: None,
                watermark: None,
            },
            phase: Phase::Start,
            mirror_outcome: MirrorOutcome::NotAWrite,
            counters: Vec::new(),
            touches: Vec::new(),
            fences: Vec::new(),
            mirrors: Vec::new(),
        }
    }

    /// Counters incremented since the last call.
    pub fn take_counters(&mut self) -> Vec<Counter> {
        std::mem::take(&mut self.counters)
    }

    /// Whether the next request or response step needs the clock: to stamp a write, or to time a
    /// callout. Queries and passthrough requests do not, and the glue then skips the hostcall.
    pub fn needs_clock(&self) -> bool {
        !matches!(self.request.route, Route::Query { .. } | Route::Passthrough)
    }

    /// Whether the response headers' step needs the clock: to time the mirror or purge callout
    /// the response will wait for. A write evicted ahead hands its mirror off untimed, and
    /// other responses start no callout.
    pub fn response_needs_clock(&self) -> bool {
        match (&self.request.route, &self.phase) {
            (Route::DeleteNamespace { .. }, _) => true,
            (Route::Write { .. }, Phase::Upstream { sent: Some(sent) }) => sent.ahead == Ahead::Off,
            _ => false,
        }
    }

    /// What writes could not mirror since the last call, for the worker's fences.
    pub fn take_fences(&mut self) -> Vec<FenceNote> {
        std::mem::take(&mut self.fences)
    }

    /// Mirrors to send after their responses, for the worker's mirror queue. Each carries its
    /// write's one mirror outcome, which the queue records.
    pub fn take_mirrors(&mut self) -> Vec<MirrorJob> {
        std::mem::take(&mut self.mirrors)
    }

    /// Namespaces used since the last call, for the watermark tracker.
    pub fn take_touches(&mut self) -> Vec<Touch> {
        std::mem::take(&mut self.touches)
    }

    /// Records an accepted write's one mirror outcome (`MirrorOk`, `MirrorFailed`,
    /// `MirrorTimeout`, `MirrorSkipped` or `WritesUnanswered`).
    fn outcome(&mut self, counter: Counter) {
        if self.mirror_outcome == MirrorOutcome::Pending {
            self.mirror_outcome = MirrorOutcome::Recorded;
            self.counters.push(counter);
        }
    }

    /// A write kept for its mirror did not reach the cache: fence the documents it may change.
    fn fence(&mut self, sent: &Sent) {
        let note = fence_note(sent, self.config.fence_max_ids);
        self.fences.push(note);
    }

    /// A namespace delete whose purge did not happen: fence the whole namespace.
    fn fence_purge(&mut self) {
        if let Route::DeleteNamespace { namespace } = &self.request.route {
            let namespace = namespace.clone();
            self.fences.push(FenceNote {
                namespace,
                scope: FenceScope::Namespace,
                stamp: 0,
            });
        }
    }

    /// The stream ended (the glue calls this from Envoy's last callback). A write forwarded whose
    /// outcome never came (the client hung up, Envoy reset the stream) may have been applied by
    /// Turbopuffer: fence it. So is a namespace delete whose purge did not happen.
    pub fn on_stream_end(&mut self) {
        let sent = match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Upstream { sent } | Phase::AwaitingMirror { sent, .. } => sent,
            Phase::AwaitingEviction { sent } => Some(sent),
            Phase::ResponseBuffering(ResponseWork::Mirror(sent)) => Some(sent),
            // Envoy's own reply: counted and fenced when it came.
            Phase::ResponseBuffering(ResponseWork::Rewrite(_)) => return,
            other => {
                self.phase = other;
                return;
            }
        };
        match &self.request.route {
            Route::Write { .. } => {
                self.outcome(Counter::WritesUnanswered);
                if let Some(sent) = sent {
                    self.fence(&sent);
                }
            }
            Route::DeleteNamespace { .. } => self.fence_purge(),
            _ => {}
        }
    }

    /// Records that this request used `namespace` (when the watermark is on).
    fn touch(&mut self, namespace: &str, written: bool) {
        let touch = self.touch_of(namespace, written);
        self.touches.extend(touch);
    }

    fn touch_of(&self, namespace: &str, written: bool) -> Option<Touch> {
        if self.config.read_watermark == ReadWatermark::Off {
            return None;
        }
        Some(Touch {
            namespace: namespace.to_owned(),
            written,
            authorization: self.request.forward_authorization.clone(),
        })
    }

    /// The counter for a body refused for its encoding, by route.
    fn bad_encoding(&self) -> Counter {
        if matches!(self.request.route, Route::Query { .. }) {
            Counter::ReadsRejected(ReadReason::BadEncoding)
        } else {
            Counter::WritesRejected(WriteReason::BadEncoding)
        }
    }

    fn reply(&mut self, reply: LocalReply) -> Step {
        self.phase = Phase::Replied;
        Step::Reply(reply)
    }

    /// Request headers: classify, authenticate (every path: Envoy sends them all to Turbopuffer,
    /// and a caller's key must never reach it in keys mode), decide whether to buffer.
    pub fn on_request_headers(&mut self, head: &RequestHead<'_>) -> (HeaderEdits, Step) {
        let mut edits = HeaderEdits::default();
        if !matches!(self.phase, Phase::Start) {
            return (edits, Step::Continue);
        }
        let (route, scope) = route::classify_with_scope(head.method, head.path);
        self.request.route = route;
        self.request.method = head.method.to_owned();
        if let Err(reply) = self.authenticate(head, scope, &mut edits) {
            return (edits, self.reply(reply));
        }
        self.request.request_id = head.request_id.to_owned();
        self.request.trace = TraceContext::from_headers(head.traceparent, head.tracestate);
        let bypass = self.look_up(head);
        if !self.request.route.needs_body() {
            self.phase = Phase::Upstream { sent: None };
            return (edits, Step::Continue);
        }
        let step = self.start_body(head, bypass, &mut edits);
        (edits, step)
    }

    /// Checks the caller's credential for the route's scope; in keys mode the caller's key is
    /// replaced by the upstream key and never kept.
    fn authenticate(
        &mut self,
        head: &RequestHead<'_>,
        scope: Scope,
        edits: &mut HeaderEdits,
    ) -> Result<(), LocalReply> {
        self.request.mutates = scope != Scope::Read;
        match authenticate(&self.config, head.authorization, scope) {
            Ok(Credential::Keep) if self.config.auth_mode != AuthMode::Keys => {
                self.request.forward_authorization = head.authorization.map(str::to_owned);
            }
            Ok(Credential::Keep) => {}
            Ok(Credential::Replace(value)) => edits.set.push(("authorization", value)),
            Err(reply) => {
                self.counters.push(if reply.status == 401 {
                    Counter::Unauthorized
                } else {
                    Counter::Forbidden
                });
                log::info!("request {}: rejected by auth ({})", head.request_id, reply.status);
                return Err(reply);
            }
        }
        Ok(())
    }

    /// What the request's namespace has in the worker's lookups: a query's watermark (kept in
    /// the request), and whether a document fetch must bypass the cache (returned).
    fn look_up(&mut self, head: &RequestHead<'_>) -> bool {
        match &self.request.route {
            Route::DocumentFetch { namespace } => {
                let fenced = head.fences.is_some_and(|fenced| (fenced.0)(namespace));
                if fenced {
                    self.counters.push(Counter::FetchesBypassed);
                }
                fenced
            }
            Route::Query { namespace } if self.config.read_watermark != ReadWatermark::Off => {
                let watermark = head
                    .watermarks
                    .and_then(|lookup| (lookup.0)(namespace))
                    .filter(|w| w.is_fresh(head.now_ms, self.config.watermark_stale_ms));
                let touch = self.touch_of(namespace, false);
                self.request.watermark = watermark;
                self.touches.extend(touch);
                false
            }
            _ => false,
        }
    }

    /// A route whose body the filter reads: refuse what is too large or encoded otherwise than
    /// gzip or identity, then buffer.
    fn start_body(&mut self, head: &RequestHead<'_>, bypass: bool, edits: &mut HeaderEdits) -> Step {
        let limit = self.config.max_body_bytes;
        if let Some(len) = head.content_length.and_then(|v| v.trim().parse::<u64>().ok()) {
            if len > limit {
                self.counters.push(Counter::PayloadTooLarge);
                return self.reply(LocalReply::payload_too_large(limit));
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
            return self.reply(LocalReply::validation(&message));
        }
        if gzip {
            self.counters.push(Counter::GzipDecoded);
            edits.remove.push("content-encoding");
        }
        // `content-length` stays: the glue sets it to the new length if the body is replaced
        // (Envoy holds the headers until the body is complete), so an unchanged body goes up as
        // it came.
        let sidecar = match self.request.route {
            Route::Pipeline | Route::DocumentFetch { .. } => Some(SidecarRequest {
                path: route::canonical(head.path),
                content_type: head.content_type.map(str::to_owned),
                bypass,
            }),
            Route::Write { .. } => {
                // The filter reads write responses (affected ids); keep them uncompressed. (Only
                // when sent: each removal is a hostcall.)
                if head.accept_encoding.is_some() {
                    edits.remove.push("accept-encoding");
                }
                None
            }
            _ => None,
        };
        self.phase = Phase::Buffering(Buffering {
            gzip: gzip.then(|| Gzip {
                body: GzipBody::new(limit),
                seen: 0,
            }),
            sidecar,
        });
        if head.end_of_stream {
            return self.finish_request(0, 0, &mut |_, _| Some(Vec::new()));
        }
        Step::Pause
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
        let limit = self.config.max_body_bytes;
        let Phase::Buffering(buffering) = &mut self.phase else {
            return self.after_request();
        };
        if size as u64 > limit {
            return self.body_error(BodyError::TooLarge);
        }
        if let Some(gzip) = &mut buffering.gzip {
            let start = gzip.seen.min(size);
            let Some(chunk) = read(start, size - start) else {
                return self.body_unreadable();
            };
            gzip.seen = size;
            if let Err(e) = gzip.body.push(&chunk) {
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
        if !matches!(self.phase, Phase::Buffering(_)) {
            return self.after_request();
        }
        self.finish_request(now_ms, size, read)
    }

    /// A request callback outside buffering: keep a replied or sidecar-answered stream held.
    fn after_request(&self) -> Step {
        match self.phase {
            Phase::Replied | Phase::AwaitingRoute { .. } => Step::Pause,
            _ => Step::Continue,
        }
    }

    fn body_error(&mut self, e: BodyError) -> Step {
        match e {
            BodyError::TooLarge => {
                self.counters.push(Counter::PayloadTooLarge);
                self.reply(LocalReply::payload_too_large(self.config.max_body_bytes))
            }
            BodyError::BadGzip(reason) => {
                self.counters.push(self.bad_encoding());
                self.reply(LocalReply::validation(&format!(
                    "request body is not valid gzip: {reason}"
                )))
            }
        }
    }

    /// Envoy would not hand over the buffered request body: nothing goes upstream (an unread
    /// write cannot be validated or stamped).
    fn body_unreadable(&mut self) -> Step {
        self.counters.push(Counter::BodyReadFailed);
        log::error!(
            "request {}: could not read the request body",
            self.request.request_id
        );
        self.reply(LocalReply::error(
            500,
            "internal_error",
            "the gateway could not read the request body",
        ))
    }

    fn finish_request(&mut self, now_ms: u64, size: usize, read: ReadBody<'_>) -> Step {
        let buffering = match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Buffering(buffering) => buffering,
            other => {
                self.phase = other;
                return Step::Continue;
            }
        };
        let decoded = buffering.gzip.is_some();
        let body = match buffering.gzip {
            Some(gzip) => match gzip.body.finish() {
                Ok(body) => body,
                Err(e) => return self.body_error(e),
            },
            None => match read(0, size) {
                Some(body) => body,
                None => return self.body_unreadable(),
            },
        };
        match (&self.request.route, buffering.sidecar) {
            (Route::Write { namespace }, _) => {
                let namespace = namespace.clone();
                self.finish_write(namespace, body, decoded, now_ms)
            }
            (Route::Query { namespace }, _) => {
                let namespace = namespace.clone();
                self.finish_query(&namespace, body, decoded)
            }
            (_, Some(sidecar)) => self.route_callout(sidecar, body, now_ms),
            _ => {
                self.phase = Phase::Upstream { sent: None };
                Step::Continue
            }
        }
    }

    /// A pipeline or document-fetch request goes to the sidecar, which answers it.
    fn route_callout(&mut self, sidecar: SidecarRequest, body: Vec<u8>, now_ms: u64) -> Step {
        self.counters.push(Counter::SidecarRouted);
        let mut headers = self.callout_headers(&self.request.method, &sidecar.path);
        if let Some(ct) = sidecar.content_type {
            headers.push(("content-type".to_owned(), ct));
        }
        if let Some(auth) = &self.request.forward_authorization {
            headers.push(("authorization".to_owned(), auth.clone()));
        }
        if sidecar.bypass {
            headers.push((sidecar_api::BYPASS_HEADER.to_owned(), "1".to_owned()));
        }
        self.phase = Phase::AwaitingRoute { started_ms: now_ms };
        Step::Dispatch(Callout {
            purpose: Purpose::Route,
            headers,
            body,
            timeout_ms: self.config.sidecar_timeout_ms,
        })
    }

    fn finish_write(&mut self, namespace: String, mut body: Vec<u8>, decoded: bool, stamp: u64) -> Step {
        let plan = match plan(&body) {
            Ok(p) => p,
            Err(rejection) => {
                self.counters.push(Counter::WritesRejected(rejection.reason()));
                log::info!(
                    "request {}: write to '{namespace}' rejected: {}",
                    self.request.request_id,
                    rejection.reason().as_str()
                );
                return self.reply(LocalReply::validation(&rejection.message()));
            }
        };
        self.counters.push(Counter::WritesAccepted);
        self.mirror_outcome = MirrorOutcome::Pending;
        if plan.stamped_rows > 0 {
            self.counters.push(Counter::RowsStamped(plan.stamped_rows));
        }
        if plan.response_driven && !plan.client_wants_ids {
            self.counters.push(Counter::AffectedIdsRequested);
        }
        log::debug!(
            "request {}: write to '{namespace}' accepted, {} rows stamped at {stamp}",
            self.request.request_id,
            plan.stamped_rows
        );
        // The body is replaced whenever it changed or was decoded from gzip.
        let forward = if !plan.is_identity() {
            Some(render(&body, &plan, stamp))
        } else if decoded {
            Some(if plan.mirrors {
                body.clone()
            } else {
                std::mem::take(&mut body)
            })
        } else {
            None
        };
        if !plan.mirrors {
            self.phase = Phase::Upstream { sent: None };
            return Step::Forward(forward);
        }
        let limit = self.config.evict_ahead_max_ids;
        // Patches merge into cached copies, which an eviction ahead would remove: their
        // responses wait for the mirror, as filter and conditional writes do.
        let ahead = !plan.response_driven && !plan.patches && limit > 0 && plan.ids(&body).len() <= limit;
        let mut sent = Sent {
            namespace,
            stamp,
            body,
            plan,
            ahead: Ahead::Off,
        };
        if !ahead {
            self.phase = Phase::Upstream { sent: Some(sent) };
            return Step::Forward(forward);
        }
        let evict = sidecar_api::evict_body(&sent.namespace, sent.plan.ids(&sent.body), stamp);
        sent.ahead = Ahead::Outstanding { started_ms: stamp };
        self.phase = Phase::Upstream { sent: Some(sent) };
        let mut headers = self.callout_headers("POST", sidecar_api::EVICT_PATH);
        headers.push(("content-type".to_owned(), "application/json".to_owned()));
        Step::ForwardWith(
            forward,
            Callout {
                purpose: Purpose::EvictAhead,
                headers,
                body: evict,
                timeout_ms: self.config.mirror_timeout_ms,
            },
        )
    }

    /// A complete query body: validate, apply the temporal fields and the watermark, forward.
    fn finish_query(&mut self, namespace: &str, mut body: Vec<u8>, decoded: bool) -> Step {
        let on = self.config.read_watermark != ReadWatermark::Off;
        let rule = WatermarkRule {
            at_ms: self
                .request
                .watermark
                .filter(|w| w.updating && on)
                .map(|w| w.at_ms),
            always: self.config.read_watermark == ReadWatermark::Always,
        };
        let plan = match reads::plan(&body, rule) {
            Ok(p) => p,
            Err(rejection) => {
                self.counters.push(Counter::ReadsRejected(rejection.reason()));
                log::info!(
                    "request {}: query of '{namespace}' rejected: {}",
                    self.request.request_id,
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
        if self.request.watermark.is_none() && on {
            self.counters.push(Counter::QueriesWithoutWatermark);
        }
        self.phase = Phase::Upstream { sent: None };
        let forward = if !plan.is_identity() {
            Some(reads::render(&body, &plan))
        } else if decoded {
            Some(std::mem::take(&mut body))
        } else {
            None
        };
        Step::Forward(forward)
    }

    /// The headers every callout of this request carries: the pseudo-headers, the request id and
    /// the client's trace context.
    fn callout_headers(&self, method: &str, path: &str) -> Vec<(String, String)> {
        let mut headers = vec![
            (":method".to_owned(), method.to_owned()),
            (":path".to_owned(), path.to_owned()),
            (":authority".to_owned(), self.config.sidecar_cluster.clone()),
            (
                sidecar_api::REQUEST_ID_HEADER.to_owned(),
                self.request.request_id.clone(),
            ),
        ];
        let trace = self.request.trace.headers();
        headers.extend(trace.map(|(k, v)| (k.to_owned(), v.to_owned())));
        headers
    }

    /// A mirror or purge callout; the response waits for it.
    fn json_callout(
        &mut self,
        purpose: Purpose,
        path: &str,
        body: Vec<u8>,
        now_ms: u64,
        sent: Option<Sent>,
    ) -> Step {
        let mut headers = self.callout_headers("POST", path);
        headers.push(("content-type".to_owned(), "application/json".to_owned()));
        self.phase = Phase::AwaitingMirror {
            purpose,
            started_ms: now_ms,
            sent,
        };
        Step::Dispatch(Callout {
            purpose,
            headers,
            body,
            timeout_ms: self.config.mirror_timeout_ms,
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
        let forwarded = matches!(self.phase, Phase::Upstream { .. });
        if !forwarded && !matches!(self.phase, Phase::Start | Phase::Buffering(_)) {
            return (edits, Step::Continue);
        }
        let class = classify(status, code_details, self.request.mutates);
        if !forwarded && class == ResponseClass::Relay {
            return (edits, Step::Continue);
        }
        let sent = match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Upstream { sent } => sent,
            _ => None,
        };
        if let ResponseClass::Rewrite(reply) = class {
            let step = self.rewrite(reply, code_details, forwarded, sent, end_of_stream, &mut edits);
            return (edits, step);
        }
        if let (Route::Query { .. }, Some(w)) = (&self.request.route, self.request.watermark) {
            edits.set.push((STABLE_AS_OF_HEADER, w.at_ms.to_string()));
        }
        if !(200..300).contains(&status) {
            // Turbopuffer refused the write: nothing changed, nothing to mirror.
            self.outcome(Counter::MirrorSkipped);
            return (edits, Step::Continue);
        }
        let step = self.succeeded(sent, end_of_stream, now_ms, &mut edits);
        (edits, step)
    }

    /// Envoy answered instead of Turbopuffer (no upstream response): the client gets our JSON
    /// error, and a forwarded write or delete may or may not have applied, so it is fenced.
    fn rewrite(
        &mut self,
        reply: LocalReply,
        code_details: Option<&str>,
        forwarded: bool,
        sent: Option<Sent>,
        end_of_stream: bool,
        edits: &mut HeaderEdits,
    ) -> Step {
        self.counters.push(match reply.status {
            504 => Counter::GatewayTimeout,
            413 => Counter::PayloadTooLarge,
            404 => Counter::RouteNotFound,
            _ => Counter::UpstreamError,
        });
        log::warn!(
            "request {}: no upstream response ({code_details:?}), answering {}",
            self.request.request_id,
            reply.status
        );
        if forwarded {
            self.outcome(Counter::WritesUnanswered);
            if let Some(sent) = sent {
                self.fence(&sent);
            }
            self.fence_purge();
        }
        // Envoy sends its reply as headers only for a HEAD request (no body allowed: the new
        // status and content type are all the client gets) and when the reply has no body
        // text (`cluster_not_found`, `route_not_found`). With no body to replace, the JSON
        // goes out as our own local reply instead, which Envoy sends straight to the client
        // since the response headers have not left yet.
        if end_of_stream && self.request.method != "HEAD" {
            return self.reply(reply);
        }
        edits.set.push((":status", reply.status.to_string()));
        edits.set.push(("content-type", "application/json".to_owned()));
        edits.remove.push("content-length");
        if !end_of_stream {
            self.phase = Phase::ResponseBuffering(ResponseWork::Rewrite(reply));
        }
        Step::Continue
    }

    /// Turbopuffer answered 2xx: mirror a write (now, or once its affected ids are read), purge
    /// a deleted namespace.
    fn succeeded(
        &mut self,
        sent: Option<Sent>,
        end_of_stream: bool,
        now_ms: u64,
        edits: &mut HeaderEdits,
    ) -> Step {
        match &self.request.route {
            Route::DeleteNamespace { namespace } => {
                let body = sidecar_api::purge_body(namespace);
                self.json_callout(Purpose::Purge, sidecar_api::PURGE_PATH, body, now_ms, None)
            }
            Route::Write { namespace } => {
                let namespace = namespace.clone();
                self.touch(&namespace, true);
                match sent {
                    Some(sent) if sent.plan.response_driven && !end_of_stream => {
                        if !sent.plan.client_wants_ids {
                            edits.remove.push("content-length");
                        }
                        self.phase = Phase::ResponseBuffering(ResponseWork::Mirror(sent));
                        Step::Continue
                    }
                    Some(sent) => self.mirror(sent, None, now_ms),
                    None => {
                        // Nothing the cache holds changes (schema, copy, branch).
                        self.outcome(Counter::MirrorSkipped);
                        Step::Continue
                    }
                }
            }
            _ => Step::Continue,
        }
    }

    /// Whether the glue should collect response body chunks until the end of the stream.
    pub fn wants_response_body(&self) -> bool {
        matches!(self.phase, Phase::ResponseBuffering(_))
    }

    /// Whether the response must be held: a body chunk arriving while a mirror or purge callout
    /// is outstanding must not let the paused headers go on.
    pub fn holds_response(&self) -> bool {
        matches!(
            self.phase,
            Phase::ResponseBuffering(_)
                | Phase::AwaitingMirror { .. }
                | Phase::AwaitingEviction { .. }
                | Phase::Parked
        )
    }

    /// Whether the write went to the root context to wait for its group's eviction.
    pub fn is_parked(&self) -> bool {
        matches!(self.phase, Phase::Parked)
    }

    /// A write whose response waits for its eviction ahead, sent in the worker's group, goes to
    /// the root context, which settles it ([`Exchange::eviction_settled`]) when the group is
    /// answered, even if the stream is gone by then (Envoy calls no stream callback after the
    /// root resumes a response that had ended). Returns the write's exchange; this one stays
    /// behind, parked, and holds the response. `None` when the response is not waiting.
    pub fn park(&mut self) -> Option<Exchange> {
        if !matches!(self.phase, Phase::AwaitingEviction { .. }) {
            return None;
        }
        let mut stub = Exchange::new(Rc::clone(&self.config));
        stub.request.request_id = self.request.request_id.clone();
        stub.request.mutates = self.request.mutates;
        stub.phase = Phase::Parked;
        Some(std::mem::replace(self, stub))
    }

    /// The write's eviction ahead, sent in a group, was answered (`ok`) or not. Returns the
    /// step when the response was waiting for it (resume it), `None` otherwise.
    pub fn eviction_settled(&mut self, ok: bool, timed_out: bool) -> Option<Step> {
        self.eviction_answered(ok, timed_out)
    }

    /// The whole response body once the stream ended (`None`: Envoy would not hand it over).
    /// Returns a replacement body (if any) and the next step.
    pub fn on_response_complete(&mut self, body: Option<&[u8]>, now_ms: u64) -> (Option<Vec<u8>>, Step) {
        let work = match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::ResponseBuffering(work) => work,
            other => {
                self.phase = other;
                return (None, Step::Continue);
            }
        };
        let sent = match work {
            ResponseWork::Rewrite(reply) => return (Some(reply.body), Step::Continue),
            ResponseWork::Mirror(sent) => sent,
        };
        let Some(body) = body else {
            // Without the affected ids the mirror cannot know which documents changed.
            self.counters.push(Counter::BodyReadFailed);
            log::error!(
                "request {}: could not read the write's response; fencing",
                self.request.request_id
            );
            self.outcome(Counter::MirrorFailed);
            self.fence(&sent);
            return (None, Step::Continue);
        };
        let replacement = if sent.plan.client_wants_ids {
            None
        } else {
            strip_affected_ids(body)
        };
        if replacement.is_some() {
            self.counters.push(Counter::AffectedIdsStripped);
        }
        let step = self.mirror(sent, Some(body), now_ms);
        (replacement, step)
    }

    /// The `MirrorRequest` body of a write: the stamped write without vectors unless the cache
    /// keeps them, and the upstream's answer when the mirror needs its affected ids.
    fn mirror_body(&self, sent: &Sent, response: Option<&[u8]>) -> Vec<u8> {
        let write = if self.config.mirror_vectors {
            render(&sent.body, &sent.plan, sent.stamp)
        } else {
            render_mirror(&sent.body, &sent.plan, sent.stamp)
        };
        sidecar_api::mirror_body(&sent.namespace, sent.stamp, &write, response)
    }

    /// After a 2xx: the mirror, which the response waits for unless the write's documents were
    /// evicted ahead (then it waits for that eviction at most, and the mirror goes after it).
    fn mirror(&mut self, sent: Sent, response: Option<&[u8]>, now_ms: u64) -> Step {
        match sent.ahead {
            Ahead::Off => {}
            Ahead::Outstanding { .. } => {
                self.phase = Phase::AwaitingEviction { sent };
                return Step::Pause;
            }
            Ahead::Settled => {
                self.hand_off(&sent, response);
                return Step::Continue;
            }
        }
        let body = self.mirror_body(&sent, response);
        self.json_callout(
            Purpose::Mirror,
            sidecar_api::MIRROR_PATH,
            body,
            now_ms,
            Some(sent),
        )
    }

    /// Gives the write's mirror to the worker's queue, which sends it after the response and
    /// records its outcome.
    fn hand_off(&mut self, sent: &Sent, response: Option<&[u8]>) {
        let body = self.mirror_body(sent, response);
        if self.mirror_outcome == MirrorOutcome::Pending {
            self.mirror_outcome = MirrorOutcome::Recorded;
        }
        self.mirrors.push(MirrorJob {
            request_id: self.request.request_id.clone(),
            trace: self.request.trace.clone(),
            body,
        });
    }

    /// The eviction ahead of a write was answered (`ok`) or not: a failed one fences the write's
    /// documents. Returns the step, when an eviction was outstanding.
    fn eviction_answered(&mut self, ok: bool, timed_out: bool) -> Option<Step> {
        let (sent, held) = match &mut self.phase {
            Phase::Upstream { sent: Some(sent) } => (sent, false),
            Phase::AwaitingEviction { sent } => (sent, true),
            _ => return None,
        };
        if !matches!(sent.ahead, Ahead::Outstanding { .. }) {
            return None;
        }
        sent.ahead = Ahead::Settled;
        if ok {
            self.counters.push(Counter::EvictAheadOk);
        } else {
            let note = fence_note(sent, self.config.fence_max_ids);
            log::warn!(
                "request {}: the eviction ahead of the write {}; fencing",
                self.request.request_id,
                if timed_out { "timed out" } else { "failed" }
            );
            self.counters.push(Counter::EvictAheadFailed);
            self.fences.push(note);
        }
        if !held {
            return Some(Step::Continue);
        }
        let Phase::AwaitingEviction { sent } = std::mem::replace(&mut self.phase, Phase::Done) else {
            return None;
        };
        self.hand_off(&sent, None);
        Some(Step::Resume(Half::Response))
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
        if let Some(started_ms) = self.eviction_started() {
            let json = sidecar_api::is_sidecar_answer(headers);
            let ok = json && status.is_some_and(|s| (200..300).contains(&s));
            let timed_out = !json
                && (status == Some(504)
                    || now_ms.saturating_sub(started_ms) >= self.config.mirror_timeout_ms);
            return self.eviction_answered(ok, timed_out).unwrap_or(Step::Continue);
        }
        let (purpose, started_ms, sent) = match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::AwaitingRoute { started_ms } => (Purpose::Route, started_ms, None),
            Phase::AwaitingMirror {
                purpose,
                started_ms,
                sent,
            } => (purpose, started_ms, sent),
            // No callout outstanding (the stream is over): nothing to resume.
            other => {
                self.phase = other;
                return Step::Continue;
            }
        };
        let elapsed = now_ms.saturating_sub(started_ms);
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
        if purpose == Purpose::Route {
            let Some(status) = status else {
                self.counters.push(Counter::SidecarUnavailable);
                let why = if timed_out(self.config.sidecar_timeout_ms) {
                    "timed out"
                } else {
                    "no response"
                };
                return self.reply(LocalReply::cache_unavailable(why));
            };
            let headers = headers.iter().filter(|(k, _)| relayed(k)).cloned().collect();
            return self.reply(LocalReply {
                status,
                body,
                headers,
            });
        }
        let ok = status.is_some_and(|s| (200..300).contains(&s));
        let counter = match (purpose, ok) {
            (Purpose::Purge, true) => Counter::PurgeOk,
            (Purpose::Purge, false) => Counter::PurgeFailed,
            (_, true) => Counter::MirrorOk,
            (_, false) if timed_out(self.config.mirror_timeout_ms) => Counter::MirrorTimeout,
            (_, false) => Counter::MirrorFailed,
        };
        if !ok {
            log::warn!(
                "request {}: {purpose:?} callout failed (status {status:?}); fencing",
                self.request.request_id
            );
        }
        self.settle(purpose, ok, counter, sent);
        Step::Resume(Half::Response)
    }

    /// The glue could not dispatch the callout (unknown cluster, bad headers); the answer is
    /// for the callback that asked for it.
    pub fn on_callout_dispatch_failed(&mut self) -> Step {
        self.counters.push(Counter::CalloutDispatchFailed);
        if self.eviction_started().is_some() {
            return self.eviction_answered(false, false).unwrap_or(Step::Continue);
        }
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::AwaitingRoute { .. } => {
                self.counters.push(Counter::SidecarUnavailable);
                self.reply(LocalReply::cache_unavailable("callout could not be dispatched"))
            }
            Phase::AwaitingMirror { purpose, sent, .. } => {
                let counter = if purpose == Purpose::Purge {
                    Counter::PurgeFailed
                } else {
                    Counter::MirrorFailed
                };
                self.settle(purpose, false, counter, sent);
                Step::Continue
            }
            other => {
                self.phase = other;
                Step::Continue
            }
        }
    }

    /// Whether the callout outstanding is the write's eviction ahead (whose answer is read by
    /// its status alone).
    pub fn awaits_eviction(&self) -> bool {
        self.eviction_started().is_some()
    }

    /// When the write's eviction ahead went out, while it is outstanding.
    fn eviction_started(&self) -> Option<u64> {
        match &self.phase {
            Phase::Upstream { sent: Some(sent) } | Phase::AwaitingEviction { sent } => match sent.ahead {
                Ahead::Outstanding { started_ms } => Some(started_ms),
                _ => None,
            },
            _ => None,
        }
    }

    /// A mirror or purge callout's outcome: counted, and fenced when it did not happen.
    fn settle(&mut self, purpose: Purpose, ok: bool, counter: Counter, sent: Option<Sent>) {
        if purpose == Purpose::Mirror {
            self.outcome(counter);
        } else {
            self.counters.push(counter);
        }
        if !ok {
            match sent {
                Some(sent) => self.fence(&sent),
                None => self.fence_purge(),
            }
        }
    }
}

/// The fence of a write that may have changed documents the cache did not follow.
fn fence_note(sent: &Sent, max_ids: usize) -> FenceNote {
    FenceNote {
        namespace: sent.namespace.clone(),
        scope: fence_scope(&sent.body, max_ids),
        stamp: sent.stamp,
    }
}

/// Formats 16 random bytes as a version-4 UUID (for requests that arrive without an id).
pub fn request_id_from(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(36);
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            id.push('-');
        }
        id.push(char::from(HEX[usize::from(b >> 4)]));
        id.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    id
}

#[cfg(test)]
mod tests;
