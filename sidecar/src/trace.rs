//! The W3C trace context a request arrives with (`traceparent`, `tracestate`): the filter passes
//! the client's on every callout, and the request's span records it, so the sidecar's log lines
//! for a request carry the trace they belong to. Parsed strictly; an invalid header is ignored
//! (the request goes on untraced), never refused.

use axum::http::HeaderMap;
use hevlayer_sidecar_api::{TRACEPARENT_HEADER, TRACESTATE_HEADER};

/// A valid version-00 `traceparent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// 32 lowercase hex digits, not all zero.
    pub trace_id: String,
    /// The caller's span: 16 lowercase hex digits, not all zero.
    pub parent_id: String,
    pub flags: u8,
}

impl TraceParent {
    /// Whether the caller sampled the trace (flag bit 0).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// Whether `field` is exactly `len` lowercase hex digits.
fn hex(field: &str, len: usize) -> bool {
    field.len() == len && field.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// An id: `len` lowercase hex digits, not all zero.
fn id(field: &str, len: usize) -> Option<String> {
    (hex(field, len) && field.bytes().any(|b| b != b'0')).then(|| field.to_owned())
}

/// Parses `00-<trace id>-<parent id>-<flags>`. Anything else (another version, a length or
/// character out of place, an all-zero id) is `None`.
pub fn parse_traceparent(value: &str) -> Option<TraceParent> {
    let mut parts = value.split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || version != "00" || !hex(flags, 2) {
        return None;
    }
    Some(TraceParent {
        trace_id: id(trace, 32)?,
        parent_id: id(parent, 16)?,
        flags: u8::from_str_radix(flags, 16).ok()?,
    })
}

/// A request's trace context: the parsed `traceparent`, and the `tracestate` that goes with it
/// (kept only with a valid `traceparent`, as W3C trace context asks).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestTrace {
    pub parent: Option<TraceParent>,
    pub tracestate: Option<String>,
}

impl RequestTrace {
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let parent = text(TRACEPARENT_HEADER).and_then(parse_traceparent);
        let tracestate = text(TRACESTATE_HEADER)
            .filter(|v| parent.is_some() && !v.is_empty())
            .map(str::to_owned);
        RequestTrace { parent, tracestate }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_gives_its_ids_and_flags() {
        let p = parse_traceparent(VALID).unwrap();
        assert_eq!(p.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.parent_id, "00f067aa0ba902b7");
        assert_eq!(p.flags, 1);
        assert!(p.sampled());
        let unsampled = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.sampled());
        // Other flag bits are kept (version 00 defines only the lowest).
        assert_eq!(
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff")
                .unwrap()
                .flags,
            0xff
        );
    }

    #[test]
    fn anything_but_a_strict_version_00_traceparent_is_ignored() {
        let invalid = [
            "",
            "00",
            // Another version, or the forbidden ff.
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // All-zero ids.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Uppercase, non-hex, wrong lengths.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01a",
            // Extra fields (version 00 has exactly four), separators, whitespace.
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736--00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ];
        for value in invalid {
            assert_eq!(parse_traceparent(value), None, "{value:?}");
        }
    }

    #[test]
    fn tracestate_is_kept_only_with_a_valid_traceparent() {
        let mut headers = HeaderMap::new();
        headers.insert("tracestate", "congo=t61rcWkgMzE".parse().unwrap());
        assert_eq!(RequestTrace::from_headers(&headers), RequestTrace::default());
        headers.insert("traceparent", "00-zz".parse().unwrap());
        assert_eq!(RequestTrace::from_headers(&headers), RequestTrace::default());
        headers.insert("traceparent", VALID.parse().unwrap());
        let trace = RequestTrace::from_headers(&headers);
        assert_eq!(trace.parent, parse_traceparent(VALID));
        assert_eq!(trace.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
    }
}
