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
    route_of(method, segments(path).as_slice())
}

/// The scope a request needs (SPEC §1), judged on the canonical path.
pub fn required_scope(method: &str, path: &str) -> Scope {
    scope_of(method, segments(path).as_slice())
}

/// [`classify`] and [`required_scope`] with one pass over the path.
pub fn classify_with_scope(method: &str, path: &str) -> (Route, Scope) {
    let segments = segments(path);
    let segments = segments.as_slice();
    (route_of(method, segments), scope_of(method, segments))
}

fn route_of(method: &str, segments: &[&str]) -> Route {
    match (method, segments) {
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

fn scope_of(method: &str, segments: &[&str]) -> Scope {
    match (method, segments) {
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
    let segments = segments(path);
    for segment in segments.as_slice() {
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

/// A path's segments: up to [`Segments::INLINE`] without allocating (every route the filter
/// reads has fewer), more on the heap.
struct Segments<'a> {
    inline: [&'a str; Segments::INLINE],
    len: usize,
    spilled: Vec<&'a str>,
}

impl<'a> Segments<'a> {
    const INLINE: usize = 8;

    fn push(&mut self, segment: &'a str) {
        if self.len < Self::INLINE {
            self.inline[self.len] = segment;
        } else {
            if self.spilled.is_empty() {
                self.spilled.extend_from_slice(&self.inline);
            }
            self.spilled.push(segment);
        }
        self.len += 1;
    }

    fn pop(&mut self) {
        if self.len > Self::INLINE {
            self.spilled.pop();
        }
        self.len = self.len.saturating_sub(1);
        if self.len <= Self::INLINE {
            self.spilled.clear();
        }
    }

    fn as_slice(&self) -> &[&'a str] {
        if self.len > Self::INLINE {
            &self.spilled
        } else {
            &self.inline[..self.len]
        }
    }
}

/// The path's segments after removing empty segments (repeated or trailing slashes) and dot
/// segments, `..` dropping the segment before it. Only literal dots count: `%2E` stays a
/// segment, since any byte may be a document id. (A byte loop: this runs on every request.)
fn segments(path: &str) -> Segments<'_> {
    let bytes = path.as_bytes();
    let end = bytes
        .iter()
        .position(|&b| b == b'?' || b == b'#')
        .unwrap_or(bytes.len());
    let mut out = Segments {
        inline: [""; Segments::INLINE],
        len: 0,
        spilled: Vec::new(),
    };
    let mut start = 0;
    let slashes = bytes[..end].iter().enumerate().filter(|(_, &b)| b == b'/');
    for i in slashes.map(|(i, _)| i).chain([end]) {
        // `start` and `i` sit next to ASCII bytes (or the ends), so both are char boundaries.
        match path.get(start..i).unwrap_or_default() {
            "" | "." => {}
            ".." => out.pop(),
            segment => out.push(segment),
        }
        start = i + 1;
    }
    out
}

fn decode(segment: &str) -> String {
    if !segment.contains('%') {
        return segment.to_owned();
    }
    percent_decode_str(segment).decode_utf8_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition [`segments`] is held to: the standard library's splitting.
    fn segments_by_split(path: &str) -> Vec<&str> {
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

    proptest! {
        #[test]
        fn segments_match_their_definition(path in "[/a.?#%é2E]{0,24}|(/(a|b|..|.)){0,14}") {
            let fast = segments(&path);
            let reference = segments_by_split(&path);
            prop_assert_eq!(fast.as_slice(), reference.as_slice());
            prop_assert_eq!(decode(&path), percent_decode_str(&path).decode_utf8_lossy().into_owned());
        }
    }

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
