//! Mirror, purge and document fetch over HTTP, plus the service routes.

// The test bodies run through `both_backends!`, so they are not `#[test]` functions themselves.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::{dead_url, sidecar_on, Backend, Client, FakeGateway};
use hevlayer_sidecar_api::{
    evict_body, evict_mirrors_body, mirror_batch_body, mirror_body, purge_body, BYPASS_HEADER,
    EVICT_MIRRORS_PATH, EVICT_PATH, MIRRORS_PATH, MIRROR_PATH, PURGE_PATH,
};
use serde_json::{json, Value};

async fn mirror(c: &Client, ns: &str, stamp: u64, write: &str, response: Option<&str>) -> Value {
    let body = mirror_body(ns, stamp, write.as_bytes(), response.map(str::as_bytes));
    let a = c.post(MIRROR_PATH, std::str::from_utf8(&body).unwrap()).await;
    assert_eq!(a.status, 200, "{}", a.text);
    a.json()
}

async fn mirrored_writes_are_served_from_the_cache(backend: Backend) {
    let s = sidecar_on(backend, &dead_url().await, &[]).await;
    let c = Client::new(&s);
    let write = r#"{"upsert_rows":[{"id":1,"title":"a","vector":[0.5],"_hevlayer_upserted_at":100},{"id":"s-1","title":"b","_hevlayer_upserted_at":100}],"distance_metric":"cosine_distance"}"#;
    assert_eq!(mirror(&c, "ns", 100, write, None).await, json!({"applied": 2}));
    let a = c.get("/v2/namespaces/ns/documents/1").await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.headers.get("x-layer-cache").unwrap(), "hit");
    // Vectors are not mirrored by default.
    assert_eq!(
        a.json(),
        json!({"id": 1, "attributes": {"title": "a", "_hevlayer_upserted_at": 100}})
    );
    let a = c.get("/v2/namespaces/ns/documents/s-1").await;
    assert_eq!(a.json()["id"], "s-1");

    // Patch merges; an older write does not replace; delete evicts.
    mirror(
        &c,
        "ns",
        200,
        r#"{"patch_rows":[{"id":1,"tag":"x","_hevlayer_upserted_at":200}]}"#,
        None,
    )
    .await;
    let stale = r#"{"upsert_rows":[{"id":1,"title":"old","_hevlayer_upserted_at":150}]}"#;
    assert_eq!(mirror(&c, "ns", 150, stale, None).await, json!({"applied": 0}));
    let a = c.get("/v2/namespaces/ns/documents/1").await;
    assert_eq!(
        a.json()["attributes"],
        json!({"title": "a", "tag": "x", "_hevlayer_upserted_at": 200})
    );
    // A patch to an uncached document creates nothing.
    assert_eq!(
        mirror(&c, "ns", 300, r#"{"patch_rows":[{"id":99,"tag":"y"}]}"#, None).await,
        json!({"applied": 0})
    );
    mirror(&c, "ns", 300, r#"{"deletes":[1]}"#, None).await;
    // Evicted: the fetch now goes upstream (which is down here).
    c.send("GET", "/v2/namespaces/ns/documents/1", None, Some("Bearer k"))
        .await
        .error(502, "upstream_error");

    // Response-driven: only listed ids.
    let cond = r#"{"upsert_rows":[{"id":"a","v":1},{"id":"b","v":1}],"upsert_condition":["v","Lt",{"$ref_new":"v"}]}"#;
    assert_eq!(
        mirror(
            &c,
            "ns",
            400,
            cond,
            Some(r#"{"status":"OK","upserted_ids":["b"]}"#)
        )
        .await,
        json!({"applied": 1})
    );
    assert_eq!(c.get("/v2/namespaces/ns/documents/b").await.status, 200);

    // Every mirror is one `mirror_batch` cache operation; the op-by-op path (Aerospike) also
    // records each document operation it ran.
    let m = c.get("/metrics").await.text;
    assert!(
        m.contains(r#"hevlayer_sidecar_cache_op_seconds_count{op="mirror_batch",result="ok"} 6"#),
        "{m}"
    );
    let per_op = m.contains(r#"op="upsert_document""#);
    assert_eq!(per_op, backend == Backend::Aerospike, "{m}");

    // Purge.
    let a = c
        .post(PURGE_PATH, std::str::from_utf8(&purge_body("ns")).unwrap())
        .await;
    // Aerospike's truncate does not report a count.
    let purged = if backend == Backend::Embedded { 2 } else { 0 };
    assert_eq!(a.json(), json!({ "applied": purged }));
    c.get("/v2/namespaces/ns/documents/b")
        .await
        .error(401, "unauthorized");

    // Bad callouts are JSON errors.
    c.post(MIRROR_PATH, "{").await.error(422, "validation_error");
    c.post(MIRROR_PATH, r#"{"namespace":"ns"}"#)
        .await
        .error(422, "validation_error");
    c.post(
        MIRROR_PATH,
        r#"{"namespace":"ns","upserted_at":1,"write":{"upsert_rows":7}}"#,
    )
    .await
    .error(422, "validation_error");
    c.post(PURGE_PATH, r#"{"ns":"x"}"#)
        .await
        .error(422, "validation_error");
}

async fn mirror_vectors_when_configured(backend: Backend) {
    let s = sidecar_on(backend, &dead_url().await, &["--mirror-vectors", "true"]).await;
    let c = Client::new(&s);
    mirror(
        &c,
        "ns",
        1,
        r#"{"upsert_columns":{"id":[5],"vector":[[1.0]],"t":["x"]}}"#,
        None,
    )
    .await;
    let a = c.get("/v2/namespaces/ns/documents/5").await;
    assert_eq!(a.json()["attributes"], json!({"vector": [1.0], "t": "x"}));
}

async fn a_miss_is_fetched_through_the_gateway_and_backfilled(backend: Backend) {
    let gw = FakeGateway::start(Arc::new(|path: &str, body: &Value| {
        if path == "/v2/namespaces/missing-ns/query" {
            return (
                404,
                vec![],
                r#"{"status":"error","error":"namespace not found"}"#.to_owned(),
            );
        }
        if path == "/v2/namespaces/broken/query" {
            return (
                500,
                vec![("x-request-id", "r1")],
                r#"{"status":"error","error":"boom"}"#.to_owned(),
            );
        }
        let id = &body["filters"][2];
        // A namespace with numeric ids: a string filter is a 400.
        if path == "/v2/namespaces/numeric/query" {
            return match id {
                Value::Number(_) => (200, vec![], json!({"rows": [], "billing": {}}).to_string()),
                _ => (
                    400,
                    vec![],
                    r#"{"status":"error","error":"filter value for id must match uint"}"#.to_owned(),
                ),
            };
        }
        // A namespace with string ids: a numeric filter is a 400.
        let rows = match id {
            Value::Number(_) => {
                return (
                    400,
                    vec![],
                    r#"{"status":"error","error":"wrong id type"}"#.to_owned(),
                )
            }
            Value::String(s) if s == "42" || s == "doc a/b" => {
                json!([{"id": s, "title": "t", "vector": [0.1], "$dist": 0.0, "_hevlayer_upserted_at": 5}])
            }
            _ => json!([]),
        };
        (200, vec![], json!({"rows": rows, "billing": {}}).to_string())
    }))
    .await;
    let s = sidecar_on(backend, &gw.url, &[]).await;
    let c = Client::new(&s);
    let get = |path: &'static str| {
        let c = &c;
        async move { c.send("GET", path, None, Some("Bearer user-key")).await }
    };

    let a = get("/v2/namespaces/ns/documents/42").await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.headers.get("x-layer-cache").unwrap(), "miss");
    assert_eq!(
        a.json(),
        json!({"id": "42", "attributes": {"title": "t", "_hevlayer_upserted_at": 5}})
    );
    let reqs = gw.requests();
    assert_eq!(reqs.len(), 2, "numeric first, then string");
    assert_eq!(reqs[1].body["filters"], json!(["id", "Eq", "42"]));
    assert_eq!(reqs[1].body["include_attributes"], json!(true));
    assert_eq!(reqs[1].authorization.as_deref(), Some("Bearer user-key"));
    // Backfilled: the next read is a hit without going upstream.
    let a = get("/v2/namespaces/ns/documents/42").await;
    assert_eq!(a.headers.get("x-layer-cache").unwrap(), "hit");
    assert_eq!(gw.requests().len(), 2);
    // A mirrored newer write is not hidden by the backfill stamp.
    mirror(
        &c,
        "ns",
        10,
        r#"{"upsert_rows":[{"id":"42","title":"new"}]}"#,
        None,
    )
    .await;
    assert_eq!(
        get("/v2/namespaces/ns/documents/42").await.json()["attributes"],
        json!({"title": "new"})
    );

    let a = get("/v2/namespaces/ns/documents/doc%20a%2Fb").await;
    assert_eq!(a.json()["id"], "doc a/b");
    get("/v2/namespaces/ns/documents/nothing")
        .await
        .error(404, "not_found");
    get("/v2/namespaces/missing-ns/documents/x")
        .await
        .error(404, "not_found");
    // A numeric-id namespace without the document: the string form's 400 is not relayed.
    get("/v2/namespaces/numeric/documents/7")
        .await
        .error(404, "not_found");
    let a = get("/v2/namespaces/broken/documents/x").await;
    assert_eq!(a.status, 500);
    assert_eq!(a.text, r#"{"status":"error","error":"boom"}"#);
    assert_eq!(a.headers.get("x-request-id").unwrap(), "r1");
}

async fn health_metrics_and_graceful_stop(backend: Backend) {
    let s = sidecar_on(backend, &dead_url().await, &[]).await;
    let c = Client::new(&s);
    let a = c.get("/healthz").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["status"], "ok");
    let name = if backend == Backend::Embedded {
        "embedded"
    } else {
        "aerospike"
    };
    assert_eq!(a.json()["cache"]["backend"], name);
    assert_eq!(a.json()["cache"]["connected"], true);
    c.create("p").await;
    c.stage("p", "d").await;
    c.get("/v2/pipelines/zz/status").await;
    let m = c.get("/metrics").await;
    assert_eq!(m.status, 200);
    assert!(m
        .headers
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    for needle in [
        r#"hevlayer_sidecar_requests_total{route="/v2/pipelines/{pipeline}/documents/{document}",method="PUT",status="200"} 1"#,
        r#"hevlayer_sidecar_requests_total{route="/v2/pipelines/{pipeline}/status",method="GET",status="404"} 1"#,
        r#"hevlayer_sidecar_cache_op_seconds_count{op="stage_document",result="ok"} 1"#,
        // Both requests of that route (the 200 and the 404 of another route are apart).
        r#"hevlayer_sidecar_request_seconds_count{route="/v2/pipelines/{pipeline}/documents/{document}"} 1"#,
        r#"hevlayer_sidecar_request_seconds_bucket{route="/v2/pipelines/{pipeline}/status",le="+Inf"} 1"#,
        r#"hevlayer_sidecar_pipeline_documents{pipeline="p",stage="pending"} 1"#,
        r#"hevlayer_sidecar_pipeline_leased{pipeline="p"} 0"#,
        "hevlayer_sidecar_cache_connected 1",
    ] {
        assert!(m.text.contains(needle), "missing {needle} in\n{}", m.text);
    }
    let addr = s.addr;
    s.stop().await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// A numeric id that misses the cache is fetched as a number, backfilled, and served from the
/// cache next time (with its numeric id).
async fn a_numeric_id_miss_is_backfilled(backend: Backend) {
    let gw = FakeGateway::start(Arc::new(|_path: &str, body: &Value| match &body["filters"][2] {
        Value::Number(n) if n.as_u64() == Some(7) => (
            200,
            vec![],
            json!({"rows": [{"id": 7, "title": "seven", "_hevlayer_upserted_at": 3}], "billing": {}})
                .to_string(),
        ),
        Value::Number(_) => (200, vec![], json!({"rows": [], "billing": {}}).to_string()),
        _ => (
            400,
            vec![],
            r#"{"status":"error","error":"filter value for id must match uint"}"#.to_owned(),
        ),
    }))
    .await;
    let s = sidecar_on(backend, &gw.url, &[]).await;
    let c = Client::new(&s);
    let a = c
        .send(
            "GET",
            "/v2/namespaces/numeric/documents/7",
            None,
            Some("Bearer k"),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.headers.get("x-layer-cache").unwrap(), "miss");
    assert_eq!(
        a.json(),
        json!({"id": 7, "attributes": {"title": "seven", "_hevlayer_upserted_at": 3}})
    );
    assert_eq!(
        gw.requests().len(),
        1,
        "the numeric form answered: no string retry"
    );
    let a = c
        .send(
            "GET",
            "/v2/namespaces/numeric/documents/7",
            None,
            Some("Bearer k"),
        )
        .await;
    assert_eq!(a.headers.get("x-layer-cache").unwrap(), "hit");
    assert_eq!(a.json()["id"], 7);
    assert_eq!(gw.requests().len(), 1);
}

/// A fetch that read a row before a concurrent delete was mirrored does not bring the deleted
/// document back into the cache.
async fn a_backfill_older_than_a_concurrent_delete_is_refused(backend: Backend) {
    let gw = FakeGateway::start_with_delay(
        Arc::new(|_path: &str, body: &Value| match &body["filters"][2] {
            Value::String(_) => (
                200,
                vec![],
                json!({"rows": [{"id": "r", "v": "before the delete", "_hevlayer_upserted_at": 5}], "billing": {}})
                    .to_string(),
            ),
            _ => (400, vec![], r#"{"status":"error","error":"wrong id type"}"#.to_owned()),
        }),
        std::time::Duration::from_millis(300),
    )
    .await;
    let s = sidecar_on(backend, &gw.url, &[]).await;
    let c = Arc::new(Client::new(&s));
    let fetch = {
        let c = c.clone();
        tokio::spawn(async move {
            c.send("GET", "/v2/namespaces/ns/documents/r", None, Some("Bearer k"))
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    mirror(&c, "ns", 10, r#"{"deletes":["r"]}"#, None).await;
    let a = fetch.await.unwrap();
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.headers.get("x-layer-cache").unwrap(), "miss");
    // Not cached: the next read goes to Turbopuffer again.
    let a = c
        .send("GET", "/v2/namespaces/ns/documents/r", None, Some("Bearer k"))
        .await;
    assert_eq!(a.headers.get("x-layer-cache").unwrap(), "miss");
    assert_eq!(gw.requests().len(), 2);
    // An older mirrored upsert arriving late does not resurrect it either; a newer one does.
    mirror(&c, "ns", 8, r#"{"upsert_rows":[{"id":"r","v":"late"}]}"#, None).await;
    let a = c
        .send("GET", "/v2/namespaces/ns/documents/r", None, Some("Bearer k"))
        .await;
    assert_eq!(a.headers.get("x-layer-cache").unwrap(), "miss");
    mirror(
        &c,
        "ns",
        20,
        r#"{"upsert_rows":[{"id":"r","v":"re-created"}]}"#,
        None,
    )
    .await;
    let a = c.get("/v2/namespaces/ns/documents/r").await;
    assert_eq!(a.headers.get("x-layer-cache").unwrap(), "hit");
    assert_eq!(a.json()["attributes"]["v"], "re-created");
}

/// A cache that fails (reads, or the backfill) does not fail the fetch: the document comes from
/// Turbopuffer with `x-layer-cache: miss-on-error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_cache_is_a_miss_on_error() {
    let gw = FakeGateway::start(Arc::new(|_path: &str, _body: &Value| {
        (
            200,
            vec![],
            json!({"rows": [{"id": "d", "t": 1, "_hevlayer_upserted_at": 1}], "billing": {}}).to_string(),
        )
    }))
    .await;
    let s = sidecar_on(Backend::Aerospike, &gw.url, &["--cache-op-timeout-ms", "500"]).await;
    let c = Client::new(&s);
    let double = s.double().unwrap();
    // The backfill is refused (stop-writes).
    double.set_stop_writes(true);
    let a = c
        .send("GET", "/v2/namespaces/ns/documents/d", None, Some("Bearer k"))
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.headers.get("x-layer-cache").unwrap(), "miss-on-error");
    assert_eq!(a.json()["attributes"]["t"], 1);
    double.set_stop_writes(false);
    // The cache read itself fails (the node drops every command).
    double.cut_after(Some(0), false);
    let a = c
        .send("GET", "/v2/namespaces/ns/documents/d", None, Some("Bearer k"))
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.headers.get("x-layer-cache").unwrap(), "miss-on-error");
    double.cut_after(None, false);
    let m = c.get("/metrics").await.text;
    assert!(
        m.contains(r#"hevlayer_sidecar_mirror_total{kind="fetch",result="miss_on_error"} 2"#),
        "{m}"
    );
}

/// A stand-in Turbopuffer whose every document is `{"title": "tp"}` stamped 7.
async fn turbopuffer_with_every_document() -> FakeGateway {
    FakeGateway::start(Arc::new(|_path: &str, body: &Value| {
        let id = body["filters"][2].clone();
        let rows = json!([{"id": id, "title": "tp", "_hevlayer_upserted_at": 7}]);
        (200, vec![], json!({"rows": rows, "billing": {}}).to_string())
    }))
    .await
}

async fn fences_evict_what_could_not_be_mirrored(backend: Backend) {
    let gw = turbopuffer_with_every_document().await;
    let s = sidecar_on(backend, &gw.url, &[]).await;
    let c = Client::new(&s);
    let write = r#"{"upsert_rows":[{"id":"a","title":"cached"},{"id":"b","title":"cached"},{"id":3,"title":"cached"}]}"#;
    mirror(&c, "fenced", 5, write, None).await;
    mirror(
        &c,
        "other",
        5,
        r#"{"upsert_rows":[{"id":"a","title":"cached"}]}"#,
        None,
    )
    .await;
    let fences = json!({"fences": [
        {"namespace": "fenced", "ids": ["a", 3], "stamp": 6},
        {"namespace": "other", "ids": null, "stamp": 6}
    ]});
    let a = c.post(EVICT_PATH, &fences.to_string()).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let get = |path: &'static str| {
        let c = &c;
        async move { c.send("GET", path, None, Some("Bearer k")).await }
    };
    // Evicted: Turbopuffer's copy (stamped 7, newer than the fenced write) is fetched and cached.
    let a = get("/v2/namespaces/fenced/documents/a").await;
    assert_eq!(a.headers.get("x-layer-cache").unwrap(), "miss");
    assert_eq!(a.json()["attributes"]["title"], "tp");
    assert_eq!(
        get("/v2/namespaces/fenced/documents/a")
            .await
            .headers
            .get("x-layer-cache")
            .unwrap(),
        "hit"
    );
    assert_eq!(
        get("/v2/namespaces/fenced/documents/3").await.json()["attributes"]["title"],
        "tp"
    );
    // Not fenced: still cached.
    assert_eq!(
        get("/v2/namespaces/fenced/documents/b").await.json()["attributes"]["title"],
        "cached"
    );
    // A whole namespace (ids null) is purged.
    assert_eq!(
        get("/v2/namespaces/other/documents/a").await.json()["attributes"]["title"],
        "tp"
    );
    // Idempotent: retried, it still answers 200.
    assert_eq!(c.post(EVICT_PATH, &fences.to_string()).await.status, 200);
    // A copy older than the fence is refused for a while: a backfill racing the eviction cannot
    // bring the stale version back.
    let old = json!({"fences": [{"namespace": "fenced", "ids": ["b"], "stamp": 9}]});
    assert_eq!(c.post(EVICT_PATH, &old.to_string()).await.status, 200);
    let a = get("/v2/namespaces/fenced/documents/b").await;
    assert_eq!(a.headers.get("x-layer-cache").unwrap(), "miss");
    assert_eq!(
        get("/v2/namespaces/fenced/documents/b")
            .await
            .headers
            .get("x-layer-cache")
            .unwrap(),
        "miss",
        "stamp 7 < 9: not cached"
    );
    for bad in [
        r#"{"fences":[{"namespace":"n","ids":[-1],"stamp":1}]}"#,
        r#"{"fences":[{"namespace":"n","ids":[{"x":1}],"stamp":1}]}"#,
        r#"{"fences":[{"namespace":"n","stamp":1,"extra":1}]}"#,
        r#"{"fences":"n"}"#,
    ] {
        c.post(EVICT_PATH, bad).await.error(422, "validation_error");
    }
}

async fn a_bypassed_fetch_neither_reads_nor_fills_the_cache(backend: Backend) {
    let gw = turbopuffer_with_every_document().await;
    let s = sidecar_on(backend, &gw.url, &[]).await;
    let c = Client::new(&s);
    mirror(
        &c,
        "ns",
        5,
        r#"{"upsert_rows":[{"id":"a","title":"cached"}]}"#,
        None,
    )
    .await;
    let bypassed = |path: &'static str| {
        let c = &c;
        async move {
            c.send_with(
                "GET",
                path,
                None,
                &[("authorization", "Bearer k"), (BYPASS_HEADER, "1")],
            )
            .await
        }
    };
    let a = bypassed("/v2/namespaces/ns/documents/a").await;
    assert_eq!(a.headers.get("x-layer-cache").unwrap(), "bypass");
    assert_eq!(
        a.json()["attributes"]["title"],
        "tp",
        "from Turbopuffer, not the cache"
    );
    let a = bypassed("/v2/namespaces/ns/documents/new").await;
    assert_eq!(a.headers.get("x-layer-cache").unwrap(), "bypass");
    // Nothing was backfilled, and the cached copy is still there for later.
    let a = c
        .send("GET", "/v2/namespaces/ns/documents/new", None, Some("Bearer k"))
        .await;
    assert_eq!(a.headers.get("x-layer-cache").unwrap(), "miss");
    let a = c
        .send("GET", "/v2/namespaces/ns/documents/a", None, Some("Bearer k"))
        .await;
    assert_eq!(a.headers.get("x-layer-cache").unwrap(), "hit");
}

async fn copies_older_than_the_max_age_are_fetched_again(backend: Backend) {
    let gw = turbopuffer_with_every_document().await;
    let s = sidecar_on(backend, &gw.url, &["--cache-max-age-seconds", "1"]).await;
    let c = Client::new(&s);
    mirror(
        &c,
        "ns",
        5,
        r#"{"upsert_rows":[{"id":"a","title":"cached"}]}"#,
        None,
    )
    .await;
    let get = || c.send("GET", "/v2/namespaces/ns/documents/a", None, Some("Bearer k"));
    assert_eq!(get().await.headers.get("x-layer-cache").unwrap(), "hit");
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let a = get().await;
    assert_eq!(
        a.headers.get("x-layer-cache").unwrap(),
        "miss",
        "too old: fetched again"
    );
    assert_eq!(a.json()["attributes"]["title"], "tp");
    // Replaced by the fetched copy, which is fresh.
    let a = get().await;
    assert_eq!(a.headers.get("x-layer-cache").unwrap(), "hit");
    assert_eq!(a.json()["attributes"]["title"], "tp");
    let metrics = c.get("/metrics").await.text;
    assert!(
        metrics.contains(r#"hevlayer_sidecar_mirror_total{kind="fetch",result="expired"} 1"#),
        "{metrics}"
    );
}

both_backends!(fences_evict_what_could_not_be_mirrored);
both_backends!(a_bypassed_fetch_neither_reads_nor_fills_the_cache);
both_backends!(copies_older_than_the_max_age_are_fetched_again);
both_backends!(a_numeric_id_miss_is_backfilled);
both_backends!(a_backfill_older_than_a_concurrent_delete_is_refused);
/// A batch of mirrors is applied in order, each on its own: one the sidecar cannot use fails
/// alone; a batch that does not parse is refused whole.
async fn a_batch_of_mirrors_is_applied_mirror_by_mirror(backend: Backend) {
    let s = sidecar_on(backend, &dead_url().await, &[]).await;
    let c = Client::new(&s);
    let first = mirror_body(
        "ns",
        10,
        br#"{"upsert_rows":[{"id":1,"v":"a","_hevlayer_upserted_at":10}]}"#,
        None,
    );
    // Parses, but its plan fails (a column write without an id column).
    let unusable = mirror_body("ns", 11, br#"{"upsert_columns":{"v":["x"]}}"#, None);
    let second = mirror_body(
        "ns",
        12,
        br#"{"upsert_rows":[{"id":1,"v":"b","_hevlayer_upserted_at":12}],"deletes":[2]}"#,
        None,
    );
    let batch = mirror_batch_body([first.as_slice(), unusable.as_slice(), second.as_slice()]);
    let a = c.post(MIRRORS_PATH, std::str::from_utf8(&batch).unwrap()).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json(), json!({"applied": [true, false, true]}));
    let doc = c.get("/v2/namespaces/ns/documents/1").await;
    assert_eq!(doc.headers.get("x-layer-cache").unwrap(), "hit");
    assert_eq!(
        doc.json()["attributes"]["v"],
        "b",
        "in order: the newer write wins"
    );
    let a = c.post(MIRRORS_PATH, r#"{"mirrors":[{"namespace":"ns"}]}"#).await;
    assert_eq!(a.status, 422, "{}", a.text);
    let whole = mirror_batch_body([
        first.as_slice(),
        br#"{"namespace":"ns","upserted_at":1,"write":{"upsert_rows":"x"}}"#.as_slice(),
    ]);
    let a = c.post(MIRRORS_PATH, std::str::from_utf8(&whole).unwrap()).await;
    assert_eq!(a.status, 422, "{}", a.text);
    let a = c.post(MIRRORS_PATH, r#"{"mirrors":[]}"#).await;
    assert_eq!(a.json(), json!({"applied": []}));
}

both_backends!(a_batch_of_mirrors_is_applied_mirror_by_mirror);

/// Mirrors riding evictions: the fences are evicted first (a mirror older than a fence's write
/// is refused by its tombstone), then the mirrors are applied and answered one by one.
async fn mirrors_ride_evictions(backend: Backend) {
    let s = sidecar_on(backend, &dead_url().await, &[]).await;
    let c = Client::new(&s);
    let row = |id: u32, v: &str, stamp: u64| {
        let write = format!(r#"{{"upsert_rows":[{{"id":{id},"v":"{v}","_hevlayer_upserted_at":{stamp}}}]}}"#);
        mirror_body("ns", stamp, write.as_bytes(), None)
    };
    for id in [1, 5] {
        let body = row(id, "a", 10);
        let a = c.post(MIRROR_PATH, std::str::from_utf8(&body).unwrap()).await;
        assert_eq!(a.status, 200, "{}", a.text);
    }
    // Write 20 names document 5 (its eviction ahead); writes 12 and 15 answered earlier and
    // their mirrors ride along; 15's copy of document 5 is older than the fence.
    let fence = evict_body("ns", [b"5".as_slice()], 20);
    let (one, five) = (row(1, "b", 12), row(5, "old", 15));
    let body = evict_mirrors_body(&fence, [one.as_slice(), five.as_slice()]).unwrap();
    let a = c
        .post(EVICT_MIRRORS_PATH, std::str::from_utf8(&body).unwrap())
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(
        a.json()["applied"].as_array().map(Vec::len),
        Some(2),
        "{}",
        a.text
    );
    assert_eq!(a.json()["applied"][0], true);
    let doc = c.get("/v2/namespaces/ns/documents/1").await;
    assert_eq!(doc.headers.get("x-layer-cache").unwrap(), "hit");
    assert_eq!(doc.json()["attributes"]["v"], "b");
    let doc = c.get("/v2/namespaces/ns/documents/5").await;
    assert_ne!(
        doc.headers.get("x-layer-cache").map(|v| v.to_str().unwrap()),
        Some("hit"),
        "evicted, and the older copy riding along refused: {}",
        doc.text
    );
    // A body the sidecar cannot use is refused whole, nothing applied.
    for bad in [
        r#"{"fences":[],"mirrors":[],"extra":1}"#,
        r#"{"fences":[]}"#,
        r#"{"fences":[{"namespace":"ns","ids":[-1],"stamp":1}],"mirrors":[]}"#,
    ] {
        let a = c.post(EVICT_MIRRORS_PATH, bad).await;
        assert_eq!(a.status, 422, "{bad}: {}", a.text);
    }
    let a = c.post(EVICT_MIRRORS_PATH, r#"{"fences":[],"mirrors":[]}"#).await;
    assert_eq!(a.json(), json!({"applied": []}));
}

both_backends!(mirrors_ride_evictions);
both_backends!(mirrored_writes_are_served_from_the_cache);
both_backends!(mirror_vectors_when_configured);
both_backends!(a_miss_is_fetched_through_the_gateway_and_backfilled);
both_backends!(health_metrics_and_graceful_stop);

/// A document the cache cannot take is evicted rather than left stale; the others are mirrored.
#[tokio::test]
async fn a_failed_mirror_evicts_instead_of_leaving_stale_documents() {
    let s = common::sidecar(&dead_url().await, &["--embedded-cache-bytes", "1048576"]).await;
    let c = Client::new(&s);
    mirror(
        &c,
        "ns",
        1,
        r#"{"upsert_rows":[{"id":1,"v":"old"},{"id":2,"v":"old"}]}"#,
        None,
    )
    .await;
    let huge = "x".repeat(1_100_000);
    let write = format!(r#"{{"upsert_rows":[{{"id":1,"v":"{huge}"}},{{"id":2,"v":"new"}}]}}"#);
    let body = mirror_body("ns", 2, write.as_bytes(), None);
    let a = c.post(MIRROR_PATH, std::str::from_utf8(&body).unwrap()).await;
    a.error(503, "cache_unavailable");
    // 1 could not be written: evicted, so a fetch goes to Turbopuffer instead of serving "old".
    c.send("GET", "/v2/namespaces/ns/documents/1", None, Some("Bearer k"))
        .await
        .error(502, "upstream_error");
    let a = c.get("/v2/namespaces/ns/documents/2").await;
    assert_eq!(a.json()["attributes"]["v"], "new");
}

/// A caller that hangs up once the mirror callout is in (the filter's callout timeout) does not
/// cut the mirror short: every document of the write lands, or the cache would keep older
/// versions of some of them than Turbopuffer holds. (HTTP/1 in today's hyper does not cancel a
/// handler when its caller goes away, but an HTTP/2 stream reset would; the mirror runs detached
/// so that this holds either way. Parsing and planning are backend-independent, so the embedded
/// store stands for both.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_whose_caller_hangs_up_still_lands() {
    use std::time::{Duration, Instant};
    use tokio::io::AsyncWriteExt;
    let s = sidecar_on(Backend::Embedded, &dead_url().await, &[]).await;
    let c = Client::new(&s);
    let rows = 100_000;
    let write = format!(
        r#"{{"upsert_rows":[{}]}}"#,
        (0..rows)
            .map(|i| format!(r#"{{"id":{i},"title":"row {i}","_hevlayer_upserted_at":100}}"#))
            .collect::<Vec<_>>()
            .join(",")
    );
    let body = mirror_body("hangup", 100, write.as_bytes(), None);
    let mut request = format!(
        "POST {MIRROR_PATH} HTTP/1.1\r\nhost: sidecar\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let mut stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    stream.write_all(&request).await.unwrap();
    // Long enough for the sidecar to take the whole body in, far shorter than parsing it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(stream);
    let last = format!("/v2/namespaces/hangup/documents/{}", rows - 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let a = c.get(&last).await;
        if a.status == 200 {
            assert_eq!(a.headers.get("x-layer-cache").unwrap(), "hit");
            break;
        }
        assert!(Instant::now() < deadline, "the mirror never landed: {}", a.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in [0, rows / 2, rows - 1] {
        let a = c.get(&format!("/v2/namespaces/hangup/documents/{id}")).await;
        assert_eq!(a.json()["attributes"]["title"], format!("row {id}"));
    }
}
