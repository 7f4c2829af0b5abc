//! The sidecar binary on the Aerospike backend, against the wire-level double: two sidecar
//! processes share one "cluster" and never hand out the same document.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aerospike_double::Double;
use common::{dead_url, sidecar_on, Backend, Client};
use serde_json::json;
use tokio::process::{Child, Command};

struct Sidecar {
    _child: Child,
    url: String,
}

async fn free_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

/// Starts the built `hevlayer-sidecar` on the double and waits (bounded) until it is connected.
async fn sidecar_process(hosts: &str) -> Sidecar {
    let listen = format!("127.0.0.1:{}", free_port().await);
    let child = Command::new(env!("CARGO_BIN_EXE_hevlayer-sidecar"))
        .env("SIDECAR_LISTEN", &listen)
        .env("AEROSPIKE_HOSTS", hosts)
        .env("AEROSPIKE_NAMESPACE", "hevlayer")
        .env("GATEWAY_URL", dead_url().await)
        .env("CACHE_OP_TIMEOUT_MS", "10000")
        .env("LOG_LEVEL", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://{listen}");
    let c = Client::for_url(&url);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            Instant::now() < deadline,
            "sidecar on {listen} did not become healthy"
        );
        let healthy = async {
            let resp = reqwest::Client::builder()
                .no_proxy()
                .build()
                .ok()?
                .get(format!("{url}/healthz"))
                .send()
                .await
                .ok()?;
            Some(resp.status().as_u16() == 200)
        };
        if healthy.await == Some(true) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let health = c.get("/healthz").await.json();
    assert_eq!(health["cache"]["backend"], "aerospike");
    Sidecar { _child: child, url }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sidecar_processes_share_the_cluster_and_never_share_a_document() {
    let double = Double::start("127.0.0.1:0", &["hevlayer"]).await.unwrap();
    let a = sidecar_process(&double.hosts()).await;
    let b = sidecar_process(&double.hosts()).await;
    let ca = Arc::new(Client::for_url(&a.url));
    let cb = Arc::new(Client::for_url(&b.url));

    ca.create("shared").await;
    cb.post("/v2/pipelines", r#"{"id":"shared","target_namespace":"x"}"#)
        .await
        .error(409, "conflict");
    assert_eq!(
        cb.get("/v2/pipelines").await.json()["pipelines"][0]["id"],
        "shared"
    );

    // Stage 2,000 documents, half through each process, concurrently.
    let mut stagers = Vec::new();
    for (k, c) in [ca.clone(), cb.clone()].into_iter().enumerate() {
        for part in 0..4 {
            let c = c.clone();
            stagers.push(tokio::spawn(async move {
                for i in (0..250).map(|i| (k * 4 + part) * 250 + i) {
                    c.stage("shared", &format!("doc-{i:04}")).await;
                }
            }));
        }
    }
    for s in stagers {
        s.await.unwrap();
    }
    let st = cb.status("shared").await;
    assert_eq!(st["counts"], json!({"pending": 2000}));
    assert_eq!(st["status"], "pending");

    // 8 claimers, 4 per process.
    let mut tasks = Vec::new();
    for w in 0..8 {
        let c = if w % 2 == 0 { ca.clone() } else { cb.clone() };
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for _ in 0..2000 {
                let a = c
                    .post(
                        "/v2/pipelines/shared/claim",
                        &format!(r#"{{"worker_id":"w{w}","limit":13}}"#),
                    )
                    .await;
                assert_eq!(a.status, 200, "{}", a.text);
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
            assert!(seen.insert(d.clone()), "{d} was claimed twice");
        }
    }
    assert_eq!(seen.len(), 2000);
    let st = ca.status("shared").await;
    assert_eq!(st["counts"], json!({"embedding": 2000}));
    assert_eq!(st["processing_count"], 2000);
    assert_eq!(st["status"], "waiting_on_upstream");

    // Complete some through the other process; chunks are readable from both.
    let a = cb
        .post(
            "/v2/pipelines/shared/documents/stage",
            r#"{"document_ids":["doc-0000","doc-0001"],"stage":"indexed"}"#,
        )
        .await;
    assert_eq!(a.json()["updated"], 2);
    assert_eq!(
        ca.get("/v2/pipelines/shared/documents/doc-0000/chunks")
            .await
            .json(),
        json!([{"id":"c0","text":"t"}])
    );
    let st = ca.status("shared").await;
    assert_eq!(st["counts"], json!({"embedding": 1998, "indexed": 2}));

    // Delete through one, gone for both.
    ca.send("DELETE", "/v2/pipelines/shared", None, None).await;
    cb.get("/v2/pipelines/shared/status")
        .await
        .error(404, "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aerospike_backend_answers_503_when_the_cluster_is_gone() {
    let double = Double::start("127.0.0.1:0", &["hevlayer"]).await.unwrap();
    let s = sidecar_process(&double.hosts()).await;
    let c = Client::for_url(&s.url);
    c.create("p").await;
    c.stage("p", "d").await;
    double.set_stop_writes(true);
    let msg = c
        .put("/v2/pipelines/p/documents/e", r#"{"chunks":[]}"#)
        .await
        .error(503, "cache_unavailable");
    assert!(msg.contains("stop-writes"), "{msg}");
    double.set_stop_writes(false);
    drop(double);
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.get("/v2/pipelines/p/status")
        .await
        .error(503, "cache_unavailable");
    let health = c.get("/healthz").await;
    assert_eq!(health.status, 503);
    assert_eq!(health.json()["cache"]["connected"], false);
}

/// A node that hangs (a stopped process: connections accepted, nothing answered) opens the
/// breaker: one request pays the timeout, the next fail fast, `/healthz` reports it; when the node
/// answers again the sidecar recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_cluster_fails_fast_and_healthz_says_so() {
    let s = sidecar_on(
        Backend::Aerospike,
        &dead_url().await,
        &["--cache-op-timeout-ms", "150"],
    )
    .await;
    let c = Client::new(&s);
    c.create("p").await;
    s.double().unwrap().set_stalled(true);
    let started = Instant::now();
    c.get("/v2/pipelines/p/status")
        .await
        .error(503, "cache_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // The request's own deadline and the stalled command's timeout are both 150 ms, and the
    // command runs on detached: the breaker opens when the command itself gives up, which can be
    // a moment after the 503. Within a bounded wait /healthz says so.
    let deadline = Instant::now() + Duration::from_secs(2);
    let health = loop {
        let health = c.get("/healthz").await;
        if health.status == 503 || Instant::now() > deadline {
            break health;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(health.status, 503, "{}", health.text);
    assert_eq!(health.json()["cache"]["connected"], false);
    assert!(
        health.json()["cache"]["detail"]
            .as_str()
            .unwrap()
            .contains("breaker"),
        "{}",
        health.text
    );
    let started = Instant::now();
    let msg = c
        .get("/v2/pipelines/p/status")
        .await
        .error(503, "cache_unavailable");
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "{:?}",
        started.elapsed()
    );
    assert!(msg.contains("breaker"), "{msg}");
    s.double().unwrap().set_stalled(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.get("/healthz").await.status != 200 {
        assert!(Instant::now() < deadline, "the sidecar did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c.status("p").await["status"], "idle");
}
