//! The pipeline routes over HTTP: semantics, defaults, and every route's bad inputs.

// The test bodies run through `both_backends!`, so they are not `#[test]` functions themselves.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{dead_url, sidecar, sidecar_on, Backend, Client, FakeGateway};
use serde_json::{json, Value};

async fn lifecycle_and_status_transitions(backend: Backend) {
    let s = sidecar_on(backend, &dead_url().await, &[]).await;
    let c = Client::new(&s);

    // Create with defaults; duplicate is 409; list.
    let a = c
        .post("/v2/pipelines", r#"{"id":"p1","target_namespace":"ns1"}"#)
        .await;
    assert_eq!(a.status, 201, "{}", a.text);
    let created = a.json();
    assert_eq!(created["id"], "p1");
    assert_eq!(created["target_namespace"], "ns1");
    assert_eq!(created["distance_metric"], "cosine_distance");
    assert!(created["created_at"].as_str().unwrap().ends_with('Z'));
    c.post("/v2/pipelines", r#"{"id":"p1","target_namespace":"other"}"#)
        .await
        .error(409, "conflict");
    let a = c
        .post(
            "/v2/pipelines",
            r#"{"id":"p2","target_namespace":"ns2","distance_metric":"euclidean_squared"}"#,
        )
        .await;
    assert_eq!(a.json()["distance_metric"], "euclidean_squared");
    let list = c.get("/v2/pipelines").await.json();
    let ids: Vec<&str> = list["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["p1", "p2"]);

    // idle
    let st = c.status("p1").await;
    assert_eq!(st["status"], "idle");
    for key in ["counts", "failed_reasons"] {
        assert!(st[key].as_object().unwrap().is_empty());
    }
    for key in [
        "pending_count",
        "processing_count",
        "failed_count",
        "rate_window_seconds",
    ] {
        assert!(st[key].is_u64(), "{key}");
    }
    assert!(st["indexed_rate_per_min"].is_f64());

    // Stage → pending.
    let a = c
        .put(
            "/v2/pipelines/p1/documents/doc-1",
            r#"{"chunks":[{"id":"c1","text":"hello"},{"id":"c2","metadata":{"page":2}}]}"#,
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(
        a.json(),
        json!({"pipeline_id":"p1","document_id":"doc-1","stage":"pending","chunk_count":2,"chunk_ids":["c1","c2"]})
    );
    let chunks = c.get("/v2/pipelines/p1/documents/doc-1/chunks").await;
    assert_eq!(
        chunks.json(),
        json!([{"id":"c1","text":"hello"},{"id":"c2","metadata":{"page":2}}])
    );
    let st = c.status("p1").await;
    assert_eq!(st["status"], "pending");
    assert_eq!(st["pending_count"], 1);
    assert_eq!(st["counts"], json!({"pending": 1}));

    // Claim with defaults (Go client omits them) → waiting_on_upstream.
    let a = c.post("/v2/pipelines/p1/claim", r#"{"worker_id":"w1"}"#).await;
    assert_eq!(
        a.json(),
        json!({"pipeline_id":"p1","stage":"pending","claim_stage":"embedding","worker_id":"w1","documents":["doc-1"]})
    );
    let st = c.status("p1").await;
    assert_eq!(st["status"], "waiting_on_upstream");
    assert_eq!(st["processing_count"], 1);
    assert_eq!(st["counts"], json!({"embedding": 1}));

    // Heartbeat with default stage.
    let a = c
        .post(
            "/v2/pipelines/p1/documents/heartbeat",
            r#"{"document_ids":["doc-1","nope"],"worker_id":"w1"}"#,
        )
        .await;
    assert_eq!(
        a.json(),
        json!({"pipeline_id":"p1","stage":"embedding","updated":1})
    );

    // Complete (explicit defaults as the Python client sends them) → idle.
    let a = c
        .post(
            "/v2/pipelines/p1/documents/stage",
            r#"{"document_ids":["doc-1"],"stage":"indexed","create_missing":false,"from_stage":"embedding","worker_id":"w1"}"#,
        )
        .await;
    assert_eq!(
        a.json(),
        json!({"pipeline_id":"p1","stage":"indexed","updated":1})
    );
    let st = c.status("p1").await;
    assert_eq!(st["status"], "idle");
    assert_eq!(st["counts"], json!({"indexed": 1}));
    assert!(st["indexed_rate_per_min"].as_f64().unwrap() > 0.0);

    // Fail one → failed_count and reasons.
    c.stage("p1", "doc-2").await;
    c.post(
        "/v2/pipelines/p1/documents/stage",
        r#"{"document_ids":["doc-2"],"stage":"failed"}"#,
    )
    .await;
    let st = c.status("p1").await;
    assert_eq!(st["failed_count"], 1);
    assert_eq!(st["failed_reasons"], json!({"worker_reported": 1}));

    // Delete drops the pipeline and its documents.
    let a = c.send("DELETE", "/v2/pipelines/p1", None, None).await;
    assert_eq!(a.json()["status"], "OK");
    c.get("/v2/pipelines/p1/status").await.error(404, "not_found");
    c.send("DELETE", "/v2/pipelines/p1", None, None)
        .await
        .error(404, "not_found");
    c.create("p1").await;
    c.get("/v2/pipelines/p1/documents/doc-1/chunks")
        .await
        .error(404, "not_found");
    s.stop().await.unwrap();
}

async fn restaging_replaces_chunks_and_resets_to_pending(backend: Backend) {
    let s = sidecar_on(backend, &dead_url().await, &[]).await;
    let c = Client::new(&s);
    c.create("p").await;
    c.stage("p", "d").await;
    let a = c
        .post("/v2/pipelines/p/claim", r#"{"worker_id":"w","limit":1}"#)
        .await;
    assert_eq!(a.json()["documents"], json!(["d"]));
    let a = c
        .put(
            "/v2/pipelines/p/documents/d",
            r#"{"chunks":[{"id":"n1","text":"new"}]}"#,
        )
        .await;
    assert_eq!(a.json()["chunk_ids"], json!(["n1"]));
    assert_eq!(
        c.get("/v2/pipelines/p/documents/d/chunks").await.json(),
        json!([{"id":"n1","text":"new"}])
    );
    let st = c.status("p").await;
    assert_eq!(st["counts"], json!({"pending": 1}));
    assert_eq!(st["processing_count"], 0);
    // The old lease is gone: the worker's heartbeat no longer counts.
    let a = c
        .post(
            "/v2/pipelines/p/documents/heartbeat",
            r#"{"document_ids":["d"],"worker_id":"w"}"#,
        )
        .await;
    assert_eq!(a.json()["updated"], 0);
}

async fn lease_expiry_and_heartbeat(backend: Backend) {
    let s = sidecar_on(backend, &dead_url().await, &[]).await;
    let c = Client::new(&s);
    c.create("p").await;
    for d in ["a", "b"] {
        c.stage("p", d).await;
    }
    // Custom stages: expiry returns to the stage claimed from.
    c.post(
        "/v2/pipelines/p/documents/stage",
        r#"{"document_ids":["a","b"],"stage":"ocr"}"#,
    )
    .await;
    let a = c
        .post(
            "/v2/pipelines/p/claim",
            r#"{"worker_id":"w","stage":"ocr","claim_stage":"ocr-run","lease_seconds":10}"#,
        )
        .await;
    assert_eq!(a.json()["documents"], json!(["a", "b"]));
    s.state.clock.advance(Duration::from_secs(8));
    let a = c
        .post(
            "/v2/pipelines/p/documents/heartbeat",
            r#"{"document_ids":["a"],"worker_id":"w","stage":"ocr-run"}"#,
        )
        .await;
    assert_eq!(a.json()["updated"], 1);
    s.state.clock.advance(Duration::from_secs(4));
    // b expired (12 s > 10 s); a was extended at 8 s.
    let st = c.status("p").await;
    assert_eq!(st["counts"], json!({"ocr": 1, "ocr-run": 1}));
    assert_eq!(st["processing_count"], 1);
    let a = c
        .post(
            "/v2/pipelines/p/claim",
            r#"{"worker_id":"w2","stage":"ocr","claim_stage":"ocr-run"}"#,
        )
        .await;
    assert_eq!(a.json()["documents"], json!(["b"]));
    // Another worker's heartbeat does not extend w's lease.
    let a = c
        .post(
            "/v2/pipelines/p/documents/heartbeat",
            r#"{"document_ids":["a"],"worker_id":"w2","stage":"ocr-run"}"#,
        )
        .await;
    assert_eq!(a.json()["updated"], 0);
}

async fn set_stage_filters_prefix_claims_and_create_missing(backend: Backend) {
    let s = sidecar_on(backend, &dead_url().await, &[]).await;
    let c = Client::new(&s);
    c.create("p").await;
    for d in ["img-1", "img-2", "txt-1", "txt-2"] {
        c.stage("p", d).await;
    }
    let a = c
        .post(
            "/v2/pipelines/p/claim",
            r#"{"worker_id":"w1","document_id_prefix":"txt-","limit":5}"#,
        )
        .await;
    assert_eq!(a.json()["documents"], json!(["txt-1", "txt-2"]));
    // worker filter: w2 holds nothing.
    let a = c
        .post(
            "/v2/pipelines/p/documents/stage",
            r#"{"document_ids":["txt-1"],"stage":"pending","worker_id":"w2"}"#,
        )
        .await;
    assert_eq!(a.json()["updated"], 0);
    // from_stage filter: only the claimed one moves.
    let a = c
        .post(
            "/v2/pipelines/p/documents/stage",
            r#"{"document_ids":["txt-1","img-1"],"stage":"pending","from_stage":"embedding"}"#,
        )
        .await;
    assert_eq!(a.json()["updated"], 1);
    let a = c
        .post(
            "/v2/pipelines/p/documents/stage",
            r#"{"document_ids":["new-1"],"stage":"pending","create_missing":true}"#,
        )
        .await;
    assert_eq!(a.json()["updated"], 1);
    let st = c.status("p").await;
    assert_eq!(st["counts"], json!({"pending": 4, "embedding": 1}));
    assert_eq!(
        c.get("/v2/pipelines/p/documents/new-1/chunks").await.json(),
        json!([])
    );
}

async fn path_ids_are_percent_decoded_and_reserved_words_are_documents(backend: Backend) {
    let s = sidecar_on(backend, &dead_url().await, &[]).await;
    let c = Client::new(&s);
    c.create("p q").await;
    for (encoded, decoded) in [
        ("a%2Fb%20c%23%3F", "a/b c#?"),
        ("heartbeat", "heartbeat"),
        ("stage", "stage"),
        ("%C3%A9t%C3%A9", "été"),
    ] {
        let a = c
            .put(
                &format!("/v2/pipelines/p%20q/documents/{encoded}"),
                r#"{"chunks":[{"id":"c"}]}"#,
            )
            .await;
        assert_eq!(a.status, 200, "{encoded}: {}", a.text);
        assert_eq!(a.json()["document_id"], decoded);
        let a = c
            .get(&format!("/v2/pipelines/p%20q/documents/{encoded}/chunks"))
            .await;
        assert_eq!(a.json(), json!([{"id":"c"}]), "{encoded}");
    }
    let a = c
        .post("/v2/pipelines/p%20q/claim", r#"{"worker_id":"w","limit":10}"#)
        .await;
    let docs: HashSet<String> = a.json()["documents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(docs.len(), 4);
    assert!(docs.contains("a/b c#?"));
}

/// Each bad request is a JSON error and changes nothing.
async fn bad_inputs_are_json_errors_and_change_nothing(backend: Backend) {
    let s = sidecar_on(backend, &dead_url().await, &[]).await;
    let c = Client::new(&s);
    c.create("p").await;
    c.stage("p", "d").await;
    let before = c.status("p").await;
    let long = "x".repeat(513);

    let cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        // create
        (
            "POST",
            "/v2/pipelines".into(),
            Some("{".into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines".into(),
            Some("[]".into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines".into(),
            Some("".into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines".into(),
            Some(r#"{"id":"x"}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines".into(),
            Some(r#"{"id":1,"target_namespace":"n"}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines".into(),
            Some(r#"{"id":"","target_namespace":"n"}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines".into(),
            Some(format!(r#"{{"id":"{long}","target_namespace":"n"}}"#)),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines".into(),
            Some(r#"{"id":"y","target_namespace":"bad ns!"}"#.into()),
            422,
            "validation_error",
        ),
        // stage
        (
            "PUT",
            "/v2/pipelines/p/documents/d".into(),
            Some("{\"chunks\":".into()),
            422,
            "validation_error",
        ),
        (
            "PUT",
            "/v2/pipelines/p/documents/d".into(),
            Some(r#"{"chunks":{}}"#.into()),
            422,
            "validation_error",
        ),
        (
            "PUT",
            "/v2/pipelines/p/documents/d".into(),
            Some(r#"{}"#.into()),
            422,
            "validation_error",
        ),
        (
            "PUT",
            "/v2/pipelines/p/documents/d".into(),
            Some(r#"{"chunks":[{"text":"no id"}]}"#.into()),
            422,
            "validation_error",
        ),
        (
            "PUT",
            "/v2/pipelines/p/documents/d".into(),
            Some(r#"{"chunks":[{"id":"a","metadata":[1]}]}"#.into()),
            422,
            "validation_error",
        ),
        (
            "PUT",
            "/v2/pipelines/p/documents/d".into(),
            Some(r#"{"chunks":[{"id":"a"},{"id":"a"}]}"#.into()),
            422,
            "validation_error",
        ),
        (
            "PUT",
            format!("/v2/pipelines/p/documents/{long}"),
            Some(r#"{"chunks":[]}"#.into()),
            422,
            "validation_error",
        ),
        (
            "PUT",
            "/v2/pipelines/nope/documents/d".into(),
            Some(r#"{"chunks":[]}"#.into()),
            404,
            "not_found",
        ),
        // chunks
        (
            "GET",
            "/v2/pipelines/p/documents/missing/chunks".into(),
            None,
            404,
            "not_found",
        ),
        (
            "GET",
            "/v2/pipelines/nope/documents/d/chunks".into(),
            None,
            404,
            "not_found",
        ),
        // vectors
        (
            "PUT",
            "/v2/pipelines/p/documents/d/vectors".into(),
            Some("nope".into()),
            422,
            "validation_error",
        ),
        (
            "PUT",
            "/v2/pipelines/p/documents/d/vectors".into(),
            Some(r#"{"vectors":[]}"#.into()),
            422,
            "validation_error",
        ),
        (
            "PUT",
            "/v2/pipelines/p/documents/d/vectors".into(),
            Some(r#"{"vectors":[{"id":"v"}]}"#.into()),
            422,
            "validation_error",
        ),
        (
            "PUT",
            "/v2/pipelines/p/documents/d/vectors".into(),
            Some(r#"{"vectors":[{"id":-1,"vector":[1]}]}"#.into()),
            422,
            "validation_error",
        ),
        (
            "PUT",
            "/v2/pipelines/p/documents/d/vectors".into(),
            Some(r#"{"vectors":[{"id":"v","vector":5}]}"#.into()),
            422,
            "validation_error",
        ),
        (
            "PUT",
            "/v2/pipelines/p/documents/d/vectors".into(),
            Some(r#"{"vectors":[{"id":"v","vector":[1],"attributes":{"id":2}}]}"#.into()),
            422,
            "validation_error",
        ),
        (
            "PUT",
            "/v2/pipelines/p/documents/missing/vectors".into(),
            Some(r#"{"vectors":[{"id":"v","vector":[1]}]}"#.into()),
            404,
            "not_found",
        ),
        (
            "PUT",
            "/v2/pipelines/nope/documents/d/vectors".into(),
            Some(r#"{"vectors":[{"id":"v","vector":[1]}]}"#.into()),
            404,
            "not_found",
        ),
        // claim
        (
            "POST",
            "/v2/pipelines/p/claim".into(),
            Some("{".into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/claim".into(),
            Some(r#"{}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/claim".into(),
            Some(r#"{"worker_id":7}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/claim".into(),
            Some(r#"{"worker_id":"w","limit":"10"}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/claim".into(),
            Some(r#"{"worker_id":"w","limit":0}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/claim".into(),
            Some(r#"{"worker_id":"w","limit":-1}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/claim".into(),
            Some(r#"{"worker_id":"w","lease_seconds":0}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/claim".into(),
            Some(format!(r#"{{"worker_id":"{long}"}}"#)),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/nope/claim".into(),
            Some(r#"{"worker_id":"w"}"#.into()),
            404,
            "not_found",
        ),
        // heartbeat
        (
            "POST",
            "/v2/pipelines/p/documents/heartbeat".into(),
            Some(r#"{"worker_id":"w"}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/documents/heartbeat".into(),
            Some(r#"{"document_ids":"d","worker_id":"w"}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/documents/heartbeat".into(),
            Some(r#"{"document_ids":["d"]}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/documents/heartbeat".into(),
            Some(format!(r#"{{"document_ids":["{long}"],"worker_id":"w"}}"#)),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/nope/documents/heartbeat".into(),
            Some(r#"{"document_ids":["d"],"worker_id":"w"}"#.into()),
            404,
            "not_found",
        ),
        // set stage
        (
            "POST",
            "/v2/pipelines/p/documents/stage".into(),
            Some(r#"{"document_ids":["d"]}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/documents/stage".into(),
            Some(r#"{"document_ids":[1],"stage":"x"}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/documents/stage".into(),
            Some(r#"{"document_ids":["d"],"stage":""}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/documents/stage".into(),
            Some(r#"{"document_ids":["d"],"stage":"x","create_missing":"yes"}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/nope/documents/stage".into(),
            Some(r#"{"document_ids":["d"],"stage":"x"}"#.into()),
            404,
            "not_found",
        ),
        (
            "POST",
            "/v2/pipelines/p/documents/heartbeat".into(),
            Some(r#"{"document_ids":["d"],"worker_id":"w","stage":5}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/documents/stage".into(),
            Some(r#"{"document_ids":["d"],"stage":"x","from_stage":7}"#.into()),
            422,
            "validation_error",
        ),
        // more create, vectors and delete inputs
        (
            "POST",
            "/v2/pipelines".into(),
            Some(r#"{"id":"y","target_namespace":"n","distance_metric":5}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines".into(),
            Some(r#"{"id":"y","target_namespace":"n","distance_metric":["cosine_distance"]}"#.into()),
            422,
            "validation_error",
        ),
        (
            "PUT",
            format!("/v2/pipelines/p/documents/{long}/vectors"),
            Some(r#"{"vectors":[{"id":"v","vector":[1]}]}"#.into()),
            422,
            "validation_error",
        ),
        (
            "PUT",
            "/v2/pipelines/p/documents/d/vectors".into(),
            Some(format!(r#"{{"vectors":[{{"id":"{long}","vector":[1]}}]}}"#)),
            422,
            "validation_error",
        ),
        (
            "PUT",
            format!("/v2/pipelines/{long}/documents/d/vectors"),
            Some(r#"{"vectors":[{"id":"v","vector":[1]}]}"#.into()),
            422,
            "validation_error",
        ),
        (
            "DELETE",
            format!("/v2/pipelines/{long}"),
            None,
            422,
            "validation_error",
        ),
        // every route's remaining malformed, mistyped, missing and oversize inputs
        (
            "PUT",
            format!("/v2/pipelines/{long}/documents/d"),
            Some(r#"{"chunks":[]}"#.into()),
            422,
            "validation_error",
        ),
        (
            "PUT",
            "/v2/pipelines/p/documents/d".into(),
            Some(format!(r#"{{"chunks":[{{"id":"{long}"}}]}}"#)),
            422,
            "validation_error",
        ),
        (
            "GET",
            format!("/v2/pipelines/{long}/documents/d/chunks"),
            None,
            422,
            "validation_error",
        ),
        (
            "GET",
            format!("/v2/pipelines/p/documents/{long}/chunks"),
            None,
            422,
            "validation_error",
        ),
        (
            "PUT",
            "/v2/pipelines/p/documents/d/vectors".into(),
            Some("{}".into()),
            422,
            "validation_error",
        ),
        (
            "PUT",
            "/v2/pipelines/p/documents/d/vectors".into(),
            Some(r#"{"vectors":{"id":"v","vector":[1]}}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            format!("/v2/pipelines/{long}/claim"),
            Some(r#"{"worker_id":"w"}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/claim".into(),
            Some(format!(r#"{{"worker_id":"w","document_id_prefix":"{long}"}}"#)),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/claim".into(),
            Some(r#"{"worker_id":"w","document_id_prefix":3}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/documents/heartbeat".into(),
            Some(r#"{"document_ids":["d"],"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/documents/heartbeat".into(),
            Some(format!(r#"{{"document_ids":["d"],"worker_id":"{long}"}}"#)),
            422,
            "validation_error",
        ),
        (
            "POST",
            format!("/v2/pipelines/{long}/documents/heartbeat"),
            Some(r#"{"document_ids":["d"],"worker_id":"w"}"#.into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/documents/stage".into(),
            Some("{\"document_ids\":".into()),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/documents/stage".into(),
            Some(format!(r#"{{"document_ids":["{long}"],"stage":"x"}}"#)),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/documents/stage".into(),
            Some(format!(r#"{{"document_ids":["d"],"stage":"{long}"}}"#)),
            422,
            "validation_error",
        ),
        (
            "POST",
            "/v2/pipelines/p/documents/stage".into(),
            Some(format!(
                r#"{{"document_ids":["d"],"stage":"x","worker_id":"{long}"}}"#
            )),
            422,
            "validation_error",
        ),
        (
            "POST",
            format!("/v2/pipelines/{long}/documents/stage"),
            Some(r#"{"document_ids":["d"],"stage":"x"}"#.into()),
            422,
            "validation_error",
        ),
        // status / delete / routing
        ("GET", "/v2/pipelines/nope/status".into(), None, 404, "not_found"),
        (
            "GET",
            format!("/v2/pipelines/{long}/status"),
            None,
            422,
            "validation_error",
        ),
        ("DELETE", "/v2/pipelines/nope".into(), None, 404, "not_found"),
        ("GET", "/v2/nothing".into(), None, 404, "not_found"),
        (
            "PATCH",
            "/v2/pipelines".into(),
            Some("{}".into()),
            405,
            "method_not_allowed",
        ),
        (
            "GET",
            "/v2/pipelines/p/documents/%FF/chunks".into(),
            None,
            422,
            "validation_error",
        ),
    ];
    for (method, path, body, status, kind) in &cases {
        let a = c.send(method, path, body.as_deref(), None).await;
        let msg = a.error(*status, kind);
        assert!(!msg.is_empty(), "{method} {path}");
    }
    assert_eq!(c.status("p").await, before);
    assert_eq!(
        c.get("/v2/pipelines/p/documents/d/chunks").await.json(),
        json!([{"id":"c0","text":"t"}])
    );
    let list = c.get("/v2/pipelines").await.json();
    assert_eq!(list["pipelines"].as_array().unwrap().len(), 1);
}

async fn vectors_write_through_the_gateway_and_index_the_document(backend: Backend) {
    let gw = FakeGateway::start(Arc::new(|_path: &str, _body: &Value| {
        (
            200,
            vec![],
            r#"{"status":"OK","message":"documents committed successfully","rows_affected":2,"billing":{}}"#
                .to_owned(),
        )
    }))
    .await;
    let s = sidecar_on(backend, &gw.url, &[]).await;
    let c = Client::new(&s);
    let a = c
        .post(
            "/v2/pipelines",
            r#"{"id":"p","target_namespace":"vec-ns","distance_metric":"euclidean_squared"}"#,
        )
        .await;
    assert_eq!(a.status, 201);
    c.stage("p", "d").await;
    c.post("/v2/pipelines/p/claim", r#"{"worker_id":"w"}"#).await;
    let body = r#"{"vectors":[{"id":"d-0","vector":[0.1,0.2],"attributes":{"page":1}},{"id":7,"vector":"AAAAAAAAAAA="}]}"#;
    let a = c
        .send(
            "PUT",
            "/v2/pipelines/p/documents/d/vectors",
            Some(body),
            Some("Bearer caller-key"),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["status"], "OK");
    assert_eq!(a.json()["rows_affected"], 2);
    let got = gw.requests();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path, "/v2/namespaces/vec-ns");
    assert_eq!(got[0].authorization.as_deref(), Some("Bearer caller-key"));
    assert_eq!(
        got[0].body,
        json!({"upsert_rows":[{"id":"d-0","vector":[0.1,0.2],"page":1},{"id":7,"vector":"AAAAAAAAAAA="}],"distance_metric":"euclidean_squared"})
    );
    let st = c.status("p").await;
    assert_eq!(st["counts"], json!({"indexed": 1}));
    assert_eq!(st["status"], "idle");
}

async fn vectors_failure_is_relayed_and_the_stage_is_unchanged(backend: Backend) {
    let gw = FakeGateway::start(Arc::new(|_path: &str, _body: &Value| {
        (
            429,
            vec![("retry-after", "3"), ("x-request-id", "req-9")],
            r#"{"status":"error","error":"💔 too many unindexed bytes"}"#.to_owned(),
        )
    }))
    .await;
    let s = sidecar_on(backend, &gw.url, &["--gateway-api-key", "sidecar-key"]).await;
    let c = Client::new(&s);
    c.create("p").await;
    c.stage("p", "d").await;
    c.post("/v2/pipelines/p/claim", r#"{"worker_id":"w"}"#).await;
    let before = c.status("p").await;
    // No caller bearer (keys mode): the sidecar's own key is presented.
    let a = c
        .put(
            "/v2/pipelines/p/documents/d/vectors",
            r#"{"vectors":[{"id":"v","vector":[1.0]}]}"#,
        )
        .await;
    assert_eq!(a.status, 429);
    assert_eq!(
        a.text,
        r#"{"status":"error","error":"💔 too many unindexed bytes"}"#
    );
    assert_eq!(a.headers.get("retry-after").unwrap(), "3");
    assert_eq!(a.headers.get("x-request-id").unwrap(), "req-9");
    assert_eq!(
        gw.requests()[0].authorization.as_deref(),
        Some("Bearer sidecar-key")
    );
    assert_eq!(c.status("p").await, before);
}

async fn vectors_with_an_unreachable_gateway_or_no_bearer(backend: Backend) {
    let s = sidecar_on(backend, &dead_url().await, &[]).await;
    let c = Client::new(&s);
    c.create("p").await;
    c.stage("p", "d").await;
    let body = r#"{"vectors":[{"id":"v","vector":[1.0]}]}"#;
    let msg = c
        .send(
            "PUT",
            "/v2/pipelines/p/documents/d/vectors",
            Some(body),
            Some("Bearer k"),
        )
        .await
        .error(502, "upstream_error");
    assert!(msg.contains("could not reach"), "{msg}");
    c.put("/v2/pipelines/p/documents/d/vectors", body)
        .await
        .error(401, "unauthorized");
    assert_eq!(c.status("p").await["counts"], json!({"pending": 1}));
}

/// 8 concurrent workers over HTTP, 2,000 documents: each handed out exactly once.
async fn concurrent_http_claimers_never_share_a_document(backend: Backend) {
    let s = sidecar_on(backend, &dead_url().await, &[]).await;
    let c = Arc::new(Client::new(&s));
    c.create("p").await;
    for i in 0..2000 {
        c.stage("p", &format!("doc-{i}")).await;
    }
    let mut tasks = Vec::new();
    for w in 0..8 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for _ in 0..500 {
                let a = c
                    .post(
                        "/v2/pipelines/p/claim",
                        &format!(r#"{{"worker_id":"w{w}","limit":13}}"#),
                    )
                    .await;
                let docs = a.json()["documents"].as_array().unwrap().clone();
                if docs.is_empty() {
                    break;
                }
                mine.extend(docs.into_iter().map(|d| d.as_str().unwrap().to_owned()));
            }
            mine
        }));
    }
    let mut seen = HashSet::new();
    for t in tasks {
        for d in t.await.unwrap() {
            assert!(seen.insert(d.clone()), "{d} claimed twice");
        }
    }
    assert_eq!(seen.len(), 2000);
    assert_eq!(c.status("p").await["processing_count"], 2000);
}

#[tokio::test]
async fn a_full_cache_is_503_and_nothing_is_half_written() {
    let s = sidecar(&dead_url().await, &["--embedded-cache-bytes", "1048576"]).await;
    let c = Client::new(&s);
    c.create("p").await;
    let big = format!(
        r#"{{"chunks":[{{"id":"c","text":"{}"}}]}}"#,
        "x".repeat(1_100_000)
    );
    let msg = c
        .put("/v2/pipelines/p/documents/big", &big)
        .await
        .error(503, "cache_unavailable");
    assert!(msg.contains("full"), "{msg}");
    c.get("/v2/pipelines/p/documents/big/chunks")
        .await
        .error(404, "not_found");
    assert_eq!(c.status("p").await["counts"], json!({}));
}

#[tokio::test]
async fn an_oversize_body_is_413_json() {
    let s = sidecar(&dead_url().await, &["--max-body-bytes", "1000"]).await;
    let c = Client::new(&s);
    c.create("p").await;
    let big = format!(r#"{{"chunks":[{{"id":"c","text":"{}"}}]}}"#, "x".repeat(2000));
    c.put("/v2/pipelines/p/documents/d", &big)
        .await
        .error(413, "payload_too_large");
    c.get("/v2/pipelines/p/documents/d/chunks")
        .await
        .error(404, "not_found");
}

/// A pipeline idle for days (its lease-expiry bookkeeping days behind) answers in time, and
/// leases that end in different minutes return exactly when due (the clock is moved, not slept).
async fn leases_expire_across_minutes_and_after_days_idle(backend: Backend) {
    let s = sidecar_on(backend, &dead_url().await, &["--cache-op-timeout-ms", "200"]).await;
    let c = Client::new(&s);
    c.create("p").await;
    for d in ["a", "b", "c"] {
        c.stage("p", d).await;
    }
    let claim =
        |limit: u32, lease: u32| format!(r#"{{"worker_id":"w","limit":{limit},"lease_seconds":{lease}}}"#);
    assert_eq!(
        c.post("/v2/pipelines/p/claim", &claim(1, 30)).await.json()["documents"],
        json!(["a"])
    );
    assert_eq!(
        c.post("/v2/pipelines/p/claim", &claim(1, 90)).await.json()["documents"],
        json!(["b"])
    );
    assert_eq!(
        c.post("/v2/pipelines/p/claim", &claim(1, 150)).await.json()["documents"],
        json!(["c"])
    );
    async fn processing(c: &Client) -> u64 {
        c.status("p").await["processing_count"].as_u64().unwrap()
    }
    s.state.clock.advance(Duration::from_secs(29));
    assert_eq!(processing(&c).await, 3);
    s.state.clock.advance(Duration::from_secs(2));
    assert_eq!(processing(&c).await, 2, "the 30 s lease ran out");
    s.state.clock.advance(Duration::from_secs(58));
    assert_eq!(processing(&c).await, 2);
    s.state.clock.advance(Duration::from_secs(2));
    assert_eq!(processing(&c).await, 1, "the 90 s lease ran out, a minute later");
    // Three days of silence.
    s.state.clock.advance(Duration::from_secs(3 * 86_400));
    let started = std::time::Instant::now();
    let st = c.status("p").await;
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(st["counts"], json!({"pending": 3}));
    assert_eq!(st["status"], "pending");
    let a = c.post("/v2/pipelines/p/claim", &claim(10, 60)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["documents"].as_array().unwrap().len(), 3);
}

/// The audit's case: a claim cut by a 25 ms operation timeout (every Aerospike command answered
/// late). Whatever the client got (its documents, or 503 while the claim finished in the
/// background), counts stay exact, every document is claimed or claimable, and leases expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_past_a_tiny_timeout_leaves_nothing_half_written() {
    // 25 ms: the claim runs out of time before its first document (503, nothing claimed);
    // 60 ms: it answers with the documents it won by its deadline.
    for timeout_ms in ["25", "60"] {
        claim_past_a_timeout(timeout_ms).await;
    }
}

async fn claim_past_a_timeout(timeout_ms: &str) {
    let s = sidecar_on(
        Backend::Aerospike,
        &dead_url().await,
        &["--cache-op-timeout-ms", timeout_ms],
    )
    .await;
    let c = Client::new(&s);
    c.create("p").await;
    for i in 0..150 {
        c.stage("p", &format!("doc-{i:03}")).await;
    }
    s.double().unwrap().set_delay(Duration::from_millis(1));
    let a = c
        .post(
            "/v2/pipelines/p/claim",
            r#"{"worker_id":"w","limit":100,"lease_seconds":1}"#,
        )
        .await;
    let answered: Vec<String> = if a.status == 200 {
        a.json()["documents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap().to_owned())
            .collect()
    } else {
        a.error(503, "cache_unavailable");
        Vec::new()
    };
    // Let a claim that went on in the background finish, then look (a 25 ms budget on a debug
    // build: a status may need a second try).
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.double().unwrap().set_delay(Duration::ZERO);
    async fn status(c: &Client) -> Value {
        for _ in 0..20 {
            let a = c.get("/v2/pipelines/p/status").await;
            if a.status == 200 {
                return a.json();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("status kept failing");
    }
    let st = status(&c).await;
    let pending = st["counts"]["pending"].as_u64().unwrap_or(0);
    let embedding = st["counts"]["embedding"].as_u64().unwrap_or(0);
    assert_eq!(pending + embedding, 150, "{st}");
    assert_eq!(st["processing_count"].as_u64().unwrap(), embedding);
    assert!(embedding >= answered.len() as u64);
    // Every lease (also those of documents nobody was told about) runs out.
    s.state.clock.advance(Duration::from_secs(2));
    let st = status(&c).await;
    assert_eq!(st["counts"], json!({"pending": 150}), "{st}");
    assert_eq!(st["processing_count"], 0);
    let mut all = HashSet::new();
    // A 25 ms budget on a debug build on a loaded machine: claims may fail often, so the loop is
    // bounded by time rather than by tries.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        let a = c
            .post("/v2/pipelines/p/claim", r#"{"worker_id":"w2","limit":10}"#)
            .await;
        if a.status != 200 {
            continue;
        }
        let docs = a.json()["documents"].as_array().unwrap().clone();
        if docs.is_empty() && all.len() == 150 {
            break;
        }
        for d in docs {
            assert!(all.insert(d.as_str().unwrap().to_owned()), "{d} claimed twice");
        }
    }
    assert_eq!(all.len(), 150);
}

/// After a successful vectors write the answer is the upstream's success; a document re-staged
/// during the write is not marked indexed, and a cache failure after the write is reported in
/// the answer (and counted), not turned into a 503.
async fn vectors_success_is_relayed_even_when_the_stage_move_cannot_happen(backend: Backend) {
    let gw = FakeGateway::start_with_delay(
        Arc::new(|_path: &str, _body: &Value| {
            (
                200,
                vec![],
                r#"{"status":"OK","message":"ok","rows_affected":1,"billing":{}}"#.to_owned(),
            )
        }),
        Duration::from_millis(400),
    )
    .await;
    let s = Arc::new(sidecar_on(backend, &gw.url, &[]).await);
    let c = Arc::new(Client::new(&s));
    c.create("p").await;
    c.stage("p", "d").await;
    c.post("/v2/pipelines/p/claim", r#"{"worker_id":"w"}"#).await;
    let body = r#"{"vectors":[{"id":"v","vector":[1.0]}]}"#;
    let write = {
        let c = c.clone();
        tokio::spawn(async move {
            c.send(
                "PUT",
                "/v2/pipelines/p/documents/d/vectors",
                Some(body),
                Some("Bearer k"),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    c.put(
        "/v2/pipelines/p/documents/d",
        r#"{"chunks":[{"id":"n","text":"new content"}]}"#,
    )
    .await;
    let a = write.await.unwrap();
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["indexed"], false);
    assert!(
        a.json()["message"].as_str().unwrap().contains("re-staged"),
        "{}",
        a.text
    );
    assert_eq!(c.status("p").await["counts"], json!({"pending": 1}));
    if backend == Backend::Aerospike {
        // The cache refuses writes while the vectors are on their way.
        c.post("/v2/pipelines/p/claim", r#"{"worker_id":"w"}"#).await;
        let write = {
            let c = c.clone();
            tokio::spawn(async move {
                c.send(
                    "PUT",
                    "/v2/pipelines/p/documents/d/vectors",
                    Some(body),
                    Some("Bearer k"),
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.double().unwrap().set_stop_writes(true);
        let a = write.await.unwrap();
        s.double().unwrap().set_stop_writes(false);
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.json()["indexed"], false);
        assert!(
            a.json()["message"].as_str().unwrap().contains("failed"),
            "{}",
            a.text
        );
        assert_eq!(c.status("p").await["counts"], json!({"embedding": 1}));
        let m = c.get("/metrics").await.text;
        assert!(m.contains(r#"kind="vectors_index",result="failed"} 1"#), "{m}");
    }
}

both_backends!(leases_expire_across_minutes_and_after_days_idle);
both_backends!(vectors_success_is_relayed_even_when_the_stage_move_cannot_happen);
both_backends!(lifecycle_and_status_transitions);
both_backends!(restaging_replaces_chunks_and_resets_to_pending);
both_backends!(lease_expiry_and_heartbeat);
both_backends!(set_stage_filters_prefix_claims_and_create_missing);
both_backends!(path_ids_are_percent_decoded_and_reserved_words_are_documents);
both_backends!(bad_inputs_are_json_errors_and_change_nothing);
both_backends!(vectors_write_through_the_gateway_and_index_the_document);
both_backends!(vectors_failure_is_relayed_and_the_stage_is_unchanged);
both_backends!(vectors_with_an_unreachable_gateway_or_no_bearer);
both_backends!(concurrent_http_claimers_never_share_a_document);
