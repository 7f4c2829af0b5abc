//! Route classification and the scope each route needs (SPEC §1, §2, §3).

use percent_encoding::percent_decode_str;

/// What the filter does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `POST /v2/namespaces/{ns}`: buffered, validated, stamped, mirrored.
    Write { namespace: String },
    /// `DELETE /v2/namespaces/{ns}`: passes through; purges the cache after success.
    DeleteNamespace { namespace: String },
    /// `GET /v2/namespaces/{ns}/documents/{id}`: answered by the sidecar.
    DocumentFetch,
    /// `/v2/pipelines...`: answered by the sidecar.
    Pipeline,
    /// Any other `/v1` or `/v2` route: untouched.
    Passthrough,
    /// Outside the Turbopuffer API (no auth, untouched).
    Other,
}

impl Route {
    /// Whether the filter must see the request body.
    pub fn needs_body(&self) -> bool {
        matches!(self, Route::Write { .. } | Route::Pipeline | Route::DocumentFetch)
    }

    /// Whether the sidecar answers this route.
    pub fn to_sidecar(&self) -> bool {
        matches!(self, Route::Pipeline | Route::DocumentFetch)
    }
}

/// API key scopes; `Admin` implies the others, `Write` does not imply `Read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }

    /// Whether a key with scope `self` may call a route needing `required`.
    pub fn allows(self, required: Scope) -> bool {
        self == Scope::Admin || self == required
    }
}

/// Classifies a request by method and `:path` (query string ignored, segments percent-decoded).
pub fn classify(method: &str, path: &str) -> Route {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let mut segments = path.split('/').skip(1);
    let version = segments.next().unwrap_or("");
    if version != "v1" && version != "v2" {
        return Route::Other;
    }
    let rest: Vec<&str> = segments.collect();
    if version == "v2" {
        match (method, rest.as_slice()) {
            ("POST", ["namespaces", ns]) if !ns.is_empty() => {
                return Route::Write {
                    namespace: decode(ns),
                }
            }
            ("DELETE", ["namespaces", ns]) if !ns.is_empty() => {
                return Route::DeleteNamespace {
                    namespace: decode(ns),
                }
            }
            ("GET", ["namespaces", ns, "documents", id]) if !ns.is_empty() && !id.is_empty() => {
                return Route::DocumentFetch
            }
            (_, ["pipelines", ..]) => return Route::Pipeline,
            _ => {}
        }
    }
    Route::Passthrough
}

/// The scope a request needs (SPEC §1).
pub fn required_scope(method: &str, path: &str) -> Scope {
    let path = path.split(['?', '#']).next().unwrap_or("").trim_end_matches('/');
    if (method == "POST" && path == "/v2/pipelines")
        || (method == "DELETE" && path.starts_with("/v2/pipelines/"))
    {
        return Scope::Admin;
    }
    if method == "GET"
        || method == "HEAD"
        || (method == "POST"
            && (path.ends_with("/query")
                || path.ends_with("/multi_query")
                || path.ends_with("/explain_query")))
    {
        return Scope::Read;
    }
    Scope::Write
}

fn decode(segment: &str) -> String {
    percent_decode_str(segment).decode_utf8_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_routes() {
        assert_eq!(
            classify("POST", "/v2/namespaces/ns1"),
            Route::Write {
                namespace: "ns1".into()
            }
        );
        assert_eq!(
            classify("POST", "/v2/namespaces/a%2Eb?stainless_overload=copyFrom"),
            Route::Write {
                namespace: "a.b".into()
            }
        );
        assert_eq!(
            classify("DELETE", "/v2/namespaces/ns1"),
            Route::DeleteNamespace {
                namespace: "ns1".into()
            }
        );
        assert_eq!(classify("POST", "/v2/namespaces/ns1/query"), Route::Passthrough);
        assert_eq!(
            classify("GET", "/v2/namespaces/ns1/documents/7"),
            Route::DocumentFetch
        );
        assert_eq!(classify("GET", "/v1/namespaces/ns1/metadata"), Route::Passthrough);
        assert_eq!(classify("PUT", "/v2/pipelines/p/documents/d"), Route::Pipeline);
        assert_eq!(classify("GET", "/v2/pipelines"), Route::Pipeline);
        assert_eq!(classify("POST", "/v2/namespaces/"), Route::Passthrough);
        assert_eq!(classify("GET", "/healthz"), Route::Other);
        assert_eq!(classify("POST", "/v3/namespaces/x"), Route::Other);
        assert!(Route::Write {
            namespace: "x".into()
        }
        .needs_body());
        assert!(!Route::Passthrough.needs_body());
        assert!(Route::Pipeline.to_sidecar() && Route::DocumentFetch.to_sidecar());
    }

    #[test]
    fn scopes() {
        assert_eq!(required_scope("POST", "/v2/pipelines"), Scope::Admin);
        assert_eq!(required_scope("DELETE", "/v2/pipelines/p"), Scope::Admin);
        assert_eq!(required_scope("GET", "/v2/pipelines/p/status"), Scope::Read);
        assert_eq!(required_scope("POST", "/v2/namespaces/n/query"), Scope::Read);
        assert_eq!(
            required_scope("POST", "/v2/namespaces/n/multi_query?x=1"),
            Scope::Read
        );
        assert_eq!(
            required_scope("POST", "/v2/namespaces/n/explain_query"),
            Scope::Read
        );
        assert_eq!(required_scope("POST", "/v2/namespaces/n"), Scope::Write);
        assert_eq!(required_scope("POST", "/v2/pipelines/p/claim"), Scope::Write);
        assert_eq!(required_scope("DELETE", "/v2/namespaces/n"), Scope::Write);
        assert!(Scope::Admin.allows(Scope::Read) && Scope::Admin.allows(Scope::Write));
        assert!(!Scope::Write.allows(Scope::Read) && !Scope::Read.allows(Scope::Write));
        assert!(!Scope::Write.allows(Scope::Admin));
    }
}
