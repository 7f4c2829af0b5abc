//! What the upstream side of a request means for the client (SPEC §2.4): a real upstream response
//! is relayed; a reply Envoy's router made because it got none becomes 502 or 504 JSON.

use crate::error::LocalReply;

/// Envoy's `response.code_details` for a response that came from the upstream.
pub const VIA_UPSTREAM: &str = "via_upstream";

/// How to treat a response about to go to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseClass {
    /// A real upstream response (or one we have no reason to touch): relay it.
    Relay,
    /// The router answered because the upstream could not be reached: rewrite to this reply.
    Rewrite(LocalReply),
}

/// Classifies a response by status and Envoy's `response.code_details`. `mutates` says whether
/// the request changes data (it decides what a timeout tells the client).
pub fn classify(status: u16, code_details: Option<&str>, mutates: bool) -> ResponseClass {
    let Some(details) = code_details.filter(|d| !d.is_empty() && *d != VIA_UPSTREAM) else {
        return ResponseClass::Relay;
    };
    let (name, detail) = match details.split_once('{') {
        Some((name, rest)) => (name, rest.trim_end_matches('}')),
        None => (details, ""),
    };
    let reply = match name {
        "response_timeout"
        | "upstream_response_timeout"
        | "per_try_timeout"
        | "upstream_per_try_timeout"
        | "upstream_max_stream_duration_reached" => LocalReply::gateway_timeout(mutates),
        "upstream_reset_before_response_started" => {
            LocalReply::upstream_error(&readable(if detail.is_empty() {
                "connection reset"
            } else {
                detail
            }))
        }
        "no_healthy_upstream" => LocalReply::upstream_error("no healthy upstream"),
        "cluster_not_found" => LocalReply::upstream_error("no upstream cluster configured"),
        "maintenance_mode" => LocalReply::upstream_error("upstream cluster in maintenance mode"),
        "request_payload_too_large" => LocalReply::error(
            413,
            "payload_too_large",
            "request body exceeds the proxy's buffer limit",
        ),
        "route_not_found" => LocalReply::error(404, "not_found", "no route for this path"),
        _ if status >= 500 => LocalReply::upstream_error(&readable(details)),
        _ => return ResponseClass::Relay,
    };
    ResponseClass::Rewrite(reply)
}

/// Envoy writes details with underscores for spaces.
fn readable(detail: &str) -> String {
    detail.replace('_', " ").trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The status, kind and message of a rewritten response (`None` when relayed).
    fn rewritten(status: u16, details: &str, mutates: bool) -> Option<(u16, String, String)> {
        match classify(status, Some(details), mutates) {
            ResponseClass::Rewrite(r) => {
                let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
                let text = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
                Some((r.status, text("error"), text("message")))
            }
            ResponseClass::Relay => None,
        }
    }

    #[test]
    fn upstream_responses_are_relayed() {
        assert_eq!(classify(503, Some("via_upstream"), true), ResponseClass::Relay);
        assert_eq!(classify(429, Some("via_upstream"), false), ResponseClass::Relay);
        assert_eq!(classify(200, None, true), ResponseClass::Relay);
        assert_eq!(rewritten(400, "something_new", true), None);
    }

    #[test]
    fn router_replies_are_mapped() {
        let unreachable = |m: &str| {
            Some((
                502,
                "upstream_error".to_owned(),
                format!("could not reach Turbopuffer: {m}"),
            ))
        };
        let cases = [
            (
                503,
                "upstream_reset_before_response_started{connection_failure}",
                unreachable("connection failure"),
            ),
            (
                503,
                "upstream_reset_before_response_started{remote_reset}",
                unreachable("remote reset"),
            ),
            (
                503,
                "upstream_reset_before_response_started",
                unreachable("connection reset"),
            ),
            (503, "no_healthy_upstream", unreachable("no healthy upstream")),
            (
                503,
                "cluster_not_found",
                unreachable("no upstream cluster configured"),
            ),
            (500, "something_new", unreachable("something new")),
            (
                413,
                "request_payload_too_large",
                Some((
                    413,
                    "payload_too_large".to_owned(),
                    "request body exceeds the proxy's buffer limit".to_owned(),
                )),
            ),
            (
                404,
                "route_not_found",
                Some((404, "not_found".to_owned(), "no route for this path".to_owned())),
            ),
        ];
        for (status, details, expected) in cases {
            for mutates in [true, false] {
                assert_eq!(rewritten(status, details, mutates), expected, "{details}");
            }
        }
    }

    #[test]
    fn a_timeout_says_a_mutation_may_have_applied() {
        // `response_timeout` is what Envoy 1.40's router reports when the route timeout fires.
        for details in [
            "response_timeout",
            "upstream_response_timeout",
            "per_try_timeout",
            "upstream_per_try_timeout",
            "upstream_max_stream_duration_reached",
        ] {
            let timeout = |m: &str| Some((504, "gateway_timeout".to_owned(), m.to_owned()));
            assert_eq!(
                rewritten(504, details, true),
                timeout("Turbopuffer did not answer in time; the write may or may not have applied"),
                "{details}"
            );
            assert_eq!(
                rewritten(504, details, false),
                timeout("Turbopuffer did not answer in time"),
                "{details}"
            );
        }
    }
}
