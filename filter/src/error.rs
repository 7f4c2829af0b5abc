//! The JSON error envelope every gateway-made error uses (SPEC §1).

use serde::Serialize;

const TIMEOUT_READ: &str = "Turbopuffer did not answer in time";
const TIMEOUT_MUTATION: &str = "Turbopuffer did not answer in time; the write may or may not have applied";

/// A reply the gateway produces itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u16,
    pub body: Vec<u8>,
    /// Extra response headers (`content-type: application/json` is implied unless given here).
    pub headers: Vec<(String, String)>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    required_scope: Option<&'a str>,
}

impl LocalReply {
    /// `{"error": kind, "message": message}` with `status`.
    pub fn error(status: u16, kind: &str, message: &str) -> Self {
        Self::build(status, kind, message, None)
    }

    /// 403 for a key whose scope is too small.
    pub fn forbidden_scope(required: &str) -> Self {
        Self::build(403, "forbidden", "insufficient API key scope", Some(required))
    }

    fn build(status: u16, kind: &str, message: &str, required_scope: Option<&str>) -> Self {
        let body = serde_json::to_vec(&Envelope {
            error: kind,
            message,
            required_scope,
        })
        .unwrap_or_default();
        LocalReply {
            status,
            body,
            headers: Vec::new(),
        }
    }

    pub fn validation(message: &str) -> Self {
        Self::error(422, "validation_error", message)
    }

    pub fn payload_too_large(limit: u64) -> Self {
        Self::error(
            413,
            "payload_too_large",
            &format!("request body exceeds the gateway limit of {limit} bytes"),
        )
    }

    pub fn unauthorized() -> Self {
        Self::error(
            401,
            "unauthorized",
            "missing or malformed Authorization: Bearer header",
        )
    }

    pub fn upstream_error(reason: &str) -> Self {
        Self::error(
            502,
            "upstream_error",
            &format!("could not reach Turbopuffer: {reason}"),
        )
    }

    /// 504 after the request was sent. A request that changes data (`mutates`) may have been
    /// applied all the same, and the client must know it before retrying; a read has no such
    /// effect to warn about.
    pub fn gateway_timeout(mutates: bool) -> Self {
        let message = if mutates { TIMEOUT_MUTATION } else { TIMEOUT_READ };
        Self::error(504, "gateway_timeout", message)
    }

    pub fn cache_unavailable(reason: &str) -> Self {
        Self::error(
            503,
            "cache_unavailable",
            &format!("document cache sidecar unavailable: {reason}"),
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn envelopes_are_json_with_kind_and_message() {
        let r = LocalReply::validation("bad \"thing\"");
        assert_eq!(r.status, 422);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": "validation_error", "message": "bad \"thing\""})
        );
        let f: serde_json::Value =
            serde_json::from_slice(&LocalReply::forbidden_scope("admin").body).unwrap();
        assert_eq!(f["required_scope"], "admin");
        assert_eq!(f["error"], "forbidden");
    }

    #[test]
    fn timeouts_warn_about_an_applied_write_only_for_mutations() {
        let message = |mutates| {
            let r = LocalReply::gateway_timeout(mutates);
            assert_eq!(r.status, 504);
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(v["error"], "gateway_timeout");
            v["message"].as_str().unwrap().to_owned()
        };
        assert_eq!(
            message(true),
            "Turbopuffer did not answer in time; the write may or may not have applied"
        );
        assert_eq!(message(false), "Turbopuffer did not answer in time");
    }
}
