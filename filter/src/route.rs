//! Route classification and the scope each route needs (SPEC §1, §2, §3).
//!
//! Envoy may hand the filter a path it did not normalise (`normalize_path` and `merge_slashes`
//! are off by default, and mesh deployments may leave them off), while Turbopuffer may still
//! resolve it to a canonical route. So every decision here is made on the canonical form:
//! repeated and trailing slashes merged away and `.`/`..` segments resolved (RFC 3986 §5.2.4).
//! The `:path` itself goes upstream as the client sent it.

use percent_encoding::percent_decode_str;

/// What the filter does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `POST /v2/namespaces/{ns}`: buffered, validated, stamped, mirrored.
    Write { namespace: String },
    /// `POST /v2/namespaces/{ns}/query` and `/multi_query`: buffered; the temporal fields and the
    /// read watermark become filters (SPEC §2.6).
    Query { namespace: String },
    /// `DELETE /v2/namespaces/{ns}`: passes through; purges the cache after success.
    DeleteNamespace { namespace: String },
    /// `GET /v2/namespaces/{ns}/documents/{id}`: answered by the sidecar.
    DocumentFetch { namespace: String },
    /// `/v2/pipelines...`: answered by the sidecar.
    Pipeline,
    /// Every other path (Envoy routes them all to Turbopuffer): authenticated, otherwise untouched.
    Passthrough,
}

impl Route {
    /// Whether the filter must see the request body.
    pub fn needs_body(&self) -> bool {
        matches!(
            self,
            Route::Write { .. } | Route::Query { .. } | Route::Pipeline | Route::DocumentFetch { .. }
        )
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

/// Classifies a request by method and canonical path (query string ignored, the namespace
/// percent-decoded).
pub fn classify(method: &str, path: &str) -> Route {
    match (method, segments(path).as_slice()) {
        ("POST", ["v2", "namespaces", ns]) => Route::Write {
            namespace: decode(ns),
        },
        ("POST", ["v2", "namespaces", ns, "query" | "multi_query"]) => Route::Query {
            namespace: decode(ns),
        },
        ("DELETE", ["v2", "namespaces", ns]) => Route::DeleteNamespace {
            namespace: decode(ns),
        },
        ("GET", ["v2", "namespaces", ns, "documents", _]) => Route::DocumentFetch {
            namespace: decode(ns),
        },
        (_, ["v2", "pipelines", ..]) => Route::Pipeline,
        _ => Route::Passthrough,
    }
}

/// The scope a request needs (SPEC §1), judged on the canonical path.
pub fn required_scope(method: &str, path: &str) -> Scope {
    let segments = segments(path);
    match (method, segments.as_slice()) {
        ("POST", ["v2", "pipelines"]) | ("DELETE", ["v2", "pipelines", _, ..]) => Scope::Admin,
        ("GET" | "HEAD", _) => Scope::Read,
        ("POST", [.., "query" | "multi_query" | "explain_query"]) => Scope::Read,
        _ => Scope::Write,
    }
}

/// The canonical form of a path, query string kept: what the sidecar is asked for, so that its
/// routing agrees with [`classify`].
pub fn canonical(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for segment in segments(path) {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() {
        out.push('/');
    }
    if let Some((_, query)) = path.split_once('?') {
        out.push('?');
        out.push_str(query.split('#').next().unwrap_or_default());
    }
    out
}

/// The path's segments after removing empty segments (repeated or trailing slashes) and dot
/// segments, `..` dropping the segment before it. Only literal dots count: `%2E` stays a
/// segment, since any byte may be a document id.
fn segments(path: &str) -> Vec<&str> {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let mut out = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            _ => out.push(segment),
        }
    }
    out
}

fn decode(segment: &str) -> String {
    percent_decode_str(segment).decode_utf8_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(ns: &str) -> Route {
        Route::Write { namespace: ns.into() }
    }

    fn query(ns: &str) -> Route {
        Route::Query { namespace: ns.into() }
    }

    fn fetch(ns: &str) -> Route {
        Route::DocumentFetch { namespace: ns.into() }
    }

    #[test]
    fn classifies_routes() {
        let cases = [
            ("POST", "/v2/namespaces/ns1", write("ns1")),
            (
                "POST",
                "/v2/namespaces/a%2Eb?stainless_overload=copyFrom",
                write("a.b"),
            ),
            (
                "DELETE",
                "/v2/namespaces/ns1",
                Route::DeleteNamespace {
                    namespace: "ns1".into(),
                },
            ),
            ("POST", "/v2/namespaces/ns1/query", query("ns1")),
            ("POST", "/v2/namespaces/ns1/multi_query?x=1", query("ns1")),
            ("POST", "/v2/namespaces/ns1/explain_query", Route::Passthrough),
            ("POST", "/v1/namespaces/ns1/query", Route::Passthrough),
            ("GET", "/v2/namespaces/ns1/query", Route::Passthrough),
            ("GET", "/v2/namespaces/ns1/documents/7", fetch("ns1")),
            ("GET", "/v1/namespaces/ns1/metadata", Route::Passthrough),
            ("PUT", "/v2/pipelines/p/documents/d", Route::Pipeline),
            ("GET", "/v2/pipelines", Route::Pipeline),
            ("POST", "/v2/namespaces/", Route::Passthrough),
            ("POST", "/v1/namespaces/x", Route::Passthrough),
            // Outside the Turbopuffer API too: Envoy sends every path to Turbopuffer.
            ("GET", "/healthz", Route::Passthrough),
            ("POST", "/v3/namespaces/x", Route::Passthrough),
            ("GET", "/", Route::Passthrough),
            ("GET", "", Route::Passthrough),
        ];
        for (method, path, route) in cases {
            assert_eq!(classify(method, path), route, "{method} {path}");
        }
        assert!(write("x").needs_body() && query("x").needs_body());
        assert!(!Route::Passthrough.needs_body());
    }

    #[test]
    fn path_variants_classify_like_the_canonical_path() {
        let variants = [
            ("POST", "/v2/namespaces/x", write("x")),
            ("POST", "/v2/namespaces/x/", write("x")),
            ("POST", "//v2/namespaces/x", write("x")),
            ("POST", "//v2//namespaces//x//", write("x")),
            ("POST", "/v2/./namespaces/x/.", write("x")),
            ("POST", "/v2/namespaces/y/../x", write("x")),
            ("POST", "/../v2/namespaces/x", write("x")),
            ("POST", "/v2/namespaces/x/query/..?a=b", write("x")),
            (
                "POST",
                "/v2/namespaces/x/?stainless_overload=branchFrom",
                write("x"),
            ),
            ("POST", "/v2/namespaces/a%2Fb/", write("a/b")),
            (
                "DELETE",
                "/v2//namespaces/x/",
                Route::DeleteNamespace {
                    namespace: "x".into(),
                },
            ),
            ("GET", "//v2/namespaces/x/documents/7/", fetch("x")),
            ("GET", "/v2/namespaces/x/./documents//7", fetch("x")),
            ("GET", "/v1/../v2/pipelines/", Route::Pipeline),
            ("POST", "/v2/namespaces/x/./query", query("x")),
            ("POST", "/v2/namespaces/x/query/", query("x")),
            (
                "POST",
                "//v2/namespaces/a%2Fb//query?stainless_overload=multiQuery",
                query("a/b"),
            ),
            // Encoded dots are not dot segments: they may be a document id.
            ("GET", "/v2/namespaces/x/documents/%2E%2E", fetch("x")),
            ("POST", "/v2/namespaces/x/%2e", Route::Passthrough),
        ];
        for (method, path, route) in variants {
            assert_eq!(classify(method, path), route, "{method} {path}");
        }
    }

    #[test]
    fn scopes() {
        let cases = [
            ("POST", "/v2/pipelines", Scope::Admin),
            ("POST", "//v2/pipelines/", Scope::Admin),
            ("DELETE", "/v2/pipelines/p", Scope::Admin),
            ("DELETE", "/v2/pipelines/p/", Scope::Admin),
            ("GET", "/v2/pipelines/p/status", Scope::Read),
            ("HEAD", "/v2/namespaces/n", Scope::Read),
            ("POST", "/v2/namespaces/n/query", Scope::Read),
            ("POST", "/v2/namespaces/n/query/", Scope::Read),
            ("POST", "/v2/namespaces/n/multi_query?x=1", Scope::Read),
            ("POST", "/v2/namespaces/n/explain_query", Scope::Read),
            ("POST", "/v2/namespaces/n", Scope::Write),
            ("POST", "/v2/namespaces/n/query/..", Scope::Write),
            ("POST", "/v2/pipelines/p/claim", Scope::Write),
            ("DELETE", "/v2/namespaces/n", Scope::Write),
            ("GET", "/healthz", Scope::Read),
            ("POST", "/anything", Scope::Write),
            ("OPTIONS", "*", Scope::Write),
        ];
        for (method, path, scope) in cases {
            assert_eq!(required_scope(method, path), scope, "{method} {path}");
        }
        assert!(Scope::Admin.allows(Scope::Read) && Scope::Admin.allows(Scope::Write));
        assert!(!Scope::Write.allows(Scope::Read) && !Scope::Read.allows(Scope::Write));
        assert!(!Scope::Write.allows(Scope::Admin));
    }

    #[test]
    fn canonical_paths_keep_the_query_string() {
        let cases = [
            (
                "/v2/pipelines/p/documents/d%201",
                "/v2/pipelines/p/documents/d%201",
            ),
            ("//v2/pipelines//p/status/?x=1", "/v2/pipelines/p/status?x=1"),
            ("/v2/pipelines/p/../q/claim", "/v2/pipelines/q/claim"),
            ("/", "/"),
            ("//?a", "/?a"),
        ];
        for (path, expected) in cases {
            assert_eq!(canonical(path), expected, "{path}");
        }
    }
}
