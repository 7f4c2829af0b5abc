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

/// Classifies a response by status and Envoy's `response.code_details`.
pub fn classify(status: u16, code_details: Option<&str>) -> ResponseClass {
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
        | "upstream_max_stream_duration_reached" => LocalReply::gateway_timeout(),
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

    fn status_of(c: ResponseClass) -> u16 {
        match c {
            ResponseClass::Rewrite(r) => r.status,
            ResponseClass::Relay => 0,
        }
    }

    #[test]
    fn upstream_responses_are_relayed() {
        assert_eq!(classify(503, Some("via_upstream")), ResponseClass::Relay);
        assert_eq!(classify(429, Some("via_upstream")), ResponseClass::Relay);
        assert_eq!(classify(200, None), ResponseClass::Relay);
    }

    #[test]
    fn router_replies_are_mapped() {
        let c = classify(
            503,
            Some("upstream_reset_before_response_started{connection_failure}"),
        );
        match &c {
            ResponseClass::Rewrite(r) => {
                assert_eq!(r.status, 502);
                let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
                assert_eq!(v["error"], "upstream_error");
                assert_eq!(v["message"], "could not reach Turbopuffer: connection failure");
            }
            ResponseClass::Relay => unreachable!(),
        }
        assert_eq!(status_of(classify(503, Some("no_healthy_upstream"))), 502);
        assert_eq!(
            status_of(classify(
                503,
                Some("upstream_reset_before_response_started{remote_reset}")
            )),
            502
        );
        assert_eq!(status_of(classify(504, Some("upstream_response_timeout"))), 504);
        // What Envoy 1.40's router reports when the route timeout fires.
        assert_eq!(status_of(classify(504, Some("response_timeout"))), 504);
        assert_eq!(status_of(classify(504, Some("upstream_per_try_timeout"))), 504);
        assert_eq!(status_of(classify(413, Some("request_payload_too_large"))), 413);
        assert_eq!(status_of(classify(404, Some("route_not_found"))), 404);
        assert_eq!(status_of(classify(500, Some("something_new"))), 502);
        assert_eq!(classify(400, Some("something_new")), ResponseClass::Relay);
    }
}
