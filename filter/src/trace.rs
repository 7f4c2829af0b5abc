//! The W3C trace context of a client request (`traceparent`, `tracestate`), carried verbatim onto
//! every callout the request causes, so the sidecar's work for it joins the client's trace. The
//! filter does not interpret it: the sidecar parses it strictly and ignores an invalid one.

use crate::sidecar_api::{TRACEPARENT_HEADER, TRACESTATE_HEADER};

/// The trace headers of one request, as the client (or Envoy's tracer) sent them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl TraceContext {
    /// From the request headers. `tracestate` means nothing without a `traceparent` (W3C trace
    /// context §3.3), so it is kept only with one; empty values count as absent.
    pub fn from_headers(traceparent: Option<&str>, tracestate: Option<&str>) -> Self {
        let traceparent = traceparent.filter(|v| !v.is_empty()).map(str::to_owned);
        let tracestate = tracestate
            .filter(|v| !v.is_empty() && traceparent.is_some())
            .map(str::to_owned);
        TraceContext {
            traceparent,
            tracestate,
        }
    }

    /// The headers to put on a callout: none, `traceparent`, or both.
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let parent = self.traceparent.as_deref().map(|v| (TRACEPARENT_HEADER, v));
        let state = self.tracestate.as_deref().map(|v| (TRACESTATE_HEADER, v));
        parent.into_iter().chain(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn both_headers_are_carried_verbatim() {
        let trace = TraceContext::from_headers(Some(PARENT), Some("congo=t61rcWkgMzE"));
        let headers: Vec<_> = trace.headers().collect();
        assert_eq!(
            headers,
            vec![("traceparent", PARENT), ("tracestate", "congo=t61rcWkgMzE")]
        );
    }

    #[test]
    fn tracestate_alone_is_dropped_and_empty_values_are_absent() {
        let alone = TraceContext::from_headers(None, Some("congo=t61rcWkgMzE"));
        assert_eq!(alone.headers().count(), 0);
        let empty = TraceContext::from_headers(Some(""), Some(""));
        assert_eq!(empty, TraceContext::default());
        let parent_only = TraceContext::from_headers(Some(PARENT), None);
        assert_eq!(
            parent_only.headers().collect::<Vec<_>>(),
            vec![("traceparent", PARENT)]
        );
    }
}
