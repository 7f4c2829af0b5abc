//! The watermark poller against a stand-in Turbopuffer (in the gateway's place) that answers
//! `updating`, `up-to-date`, 429 and hangs as a test tells it to.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::{sidecar, Client};
use serde_json::{json, Value};
use tokio::net::TcpListener;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Index {
    UpToDate,
    Updating,
    Throttled,
    Hang,
}

/// One metadata poll as the stand-in saw it.
#[derive(Clone, Debug)]
struct Poll {
    namespace: String,
    authorization: Option<String>,
}

#[derive(Default)]
struct Upstream {
    index: Mutex<HashMap<String, Index>>,
    polls: Mutex<Vec<Poll>>,
}

impl Upstream {
    fn set(&self, namespace: &str, index: Index) {
        self.index.lock().unwrap().insert(namespace.to_owned(), index);
    }

    fn polls_of(&self, namespace: &str) -> Vec<Poll> {
        self.polls
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.namespace == namespace)
            .cloned()
            .collect()
    }
}

/// The stand-in: `GET /v1/namespaces/{ns}/metadata` answers by the namespace's `Index`.
async fn stand_in() -> (String, Arc<Upstream>) {
    let upstream = Arc::new(Upstream::default());
    let state = upstream.clone();
    let handler = move |Path(namespace): Path<String>, headers: HeaderMap| {
        let state = state.clone();
        async move {
            state.polls.lock().unwrap().push(Poll {
                namespace: namespace.clone(),
                authorization: headers
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_owned()),
            });
            let index = state
                .index
                .lock()
                .unwrap()
                .get(&namespace)
                .copied()
                .unwrap_or(Index::UpToDate);
            let body = |status: &str| json!({"approx_row_count": 1, "index": {"status": status}}).to_string();
            let response: Response = match index {
                Index::UpToDate => (StatusCode::OK, body("up-to-date")).into_response(),
                Index::Updating => (StatusCode::OK, body("updating")).into_response(),
                Index::Throttled => (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after-ms", "400")],
                    r#"{"status":"error","error":"slow down"}"#,
                )
                    .into_response(),
                Index::Hang => {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    (StatusCode::OK, body("up-to-date")).into_response()
                }
            };
            response
        }
    };
    let app = axum::Router::new().route("/v1/namespaces/{namespace}/metadata", axum::routing::get(handler));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, upstream)
}

const FAST: &[&str] = &[
    "--watermark-poll-ms",
    "50",
    "--watermark-stable-poll-ms",
    "400",
    "--watermark-margin-ms",
    "500",
    "--watermark-poll-timeout-ms",
    "300",
];

fn now_ms() -> u64 {
    hevlayer_sidecar::cache::now_ms()
}

/// Registers `namespaces` and returns the answer's entries by namespace.
async fn register(client: &Client, namespaces: Value) -> HashMap<String, Value> {
    let a = client
        .post(
            "/internal/v1/watermarks",
            &json!({ "namespaces": namespaces }).to_string(),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    a.json()["watermarks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["namespace"].as_str().unwrap().to_owned(), w.clone()))
        .collect()
}

/// Re-registers `namespace` until `check` holds for its entry (bounded).
async fn wait_for(client: &Client, namespace: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let entry = register(client, json!([{ "namespace": namespace }])).await[namespace].clone();
        if check(&entry) {
            return entry;
        }
        assert!(
            Instant::now() < deadline,
            "{namespace}: {what} not seen; last {entry}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metrics(client: &Client) -> String {
    let a = client.get("/metrics").await;
    assert_eq!(a.status, 200);
    a.text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_to_date_sets_the_watermark_updating_holds_it() {
    let (url, upstream) = stand_in().await;
    let s = sidecar(&url, FAST).await;
    let client = Client::new(&s);
    let before = now_ms();
    let first = register(
        &client,
        json!([{ "namespace": "a", "written": true, "authorization": "Bearer caller-key" }]),
    )
    .await;
    assert_eq!(first["a"]["watermark"], Value::Null, "unknown until a poll");
    let known = wait_for(&client, "a", "a watermark", |e| e["watermark"].is_u64()).await;
    let w1 = known["watermark"].as_u64().unwrap();
    // A poll that started at T sets T - 500 ms.
    assert!(w1 + 500 >= before && w1 + 500 <= now_ms(), "{w1} vs {before}");
    assert_eq!(known["updating"], false);
    let polls = upstream.polls_of("a");
    assert_eq!(polls[0].authorization.as_deref(), Some("Bearer caller-key"));

    upstream.set("a", Index::Updating);
    let updating = wait_for(&client, "a", "updating", |e| e["updating"] == true).await;
    let held = updating["watermark"].as_u64().unwrap();
    assert!(held >= w1);
    // While updating, polls go on at the fast interval and the watermark holds.
    let n = upstream.polls_of("a").len();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        upstream.polls_of("a").len() >= n + 2,
        "polled every 50 ms while updating"
    );
    let still = register(&client, json!([{ "namespace": "a" }])).await;
    assert_eq!(still["a"]["watermark"].as_u64(), Some(held));

    let resumed = now_ms();
    upstream.set("a", Index::UpToDate);
    let moved = wait_for(&client, "a", "the watermark moving on", |e| {
        e["updating"] == false && e["watermark"].as_u64().unwrap() > held
    })
    .await;
    assert!(moved["watermark"].as_u64().unwrap() + 500 >= resumed);
    let text = metrics(&client).await;
    assert!(
        text.contains("hevlayer_sidecar_watermark_polls_total{result=\"updating\"}"),
        "{text}"
    );
    assert!(text.contains("hevlayer_sidecar_watermark_polls_total{result=\"up_to_date\"}"));
    assert!(text.contains("hevlayer_sidecar_watermark_age_seconds{namespace=\"a\"}"));
    assert!(text.contains("hevlayer_sidecar_watermark_namespaces{state=\"all\"} 1"));
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_hangs_keep_the_watermark_and_back_off() {
    let (url, upstream) = stand_in().await;
    let s = sidecar(&url, FAST).await;
    let client = Client::new(&s);
    register(
        &client,
        json!([{ "namespace": "t", "written": true, "authorization": "Bearer k" }]),
    )
    .await;
    let known = wait_for(&client, "t", "a watermark", |e| e["watermark"].is_u64()).await;
    let w = known["watermark"].as_u64().unwrap();

    // 429 with retry-after-ms 400: at most a poll every 400 ms, against every 50 ms before.
    upstream.set("t", Index::Throttled);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let from = upstream.polls_of("t").len();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let throttled = upstream.polls_of("t").len() - from;
    assert!(
        (1..=4).contains(&throttled),
        "{throttled} polls in 1.2 s while throttled"
    );
    let entry = register(&client, json!([{ "namespace": "t", "written": true }])).await;
    assert!(
        entry["t"]["watermark"].as_u64().unwrap() >= w,
        "a failure never loses the watermark"
    );

    // A hang: each poll gives up after 300 ms; registrations still answer at once.
    upstream.set("t", Index::Hang);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let started = Instant::now();
    let entry = register(&client, json!([{ "namespace": "t" }])).await;
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "registration waited on a poll"
    );
    let kept = entry["t"]["watermark"].as_u64().unwrap();
    assert!(kept >= w);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = metrics(&client).await;
        if text.contains("hevlayer_sidecar_watermark_polls_total{result=\"timeout\"}") {
            assert!(text.contains("hevlayer_sidecar_watermark_polls_total{result=\"throttled\"}"));
            break;
        }
        assert!(Instant::now() < deadline, "no timed-out poll counted: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let entry = register(&client, json!([{ "namespace": "t" }])).await;
    assert_eq!(
        entry["t"]["watermark"].as_u64(),
        Some(kept),
        "hangs keep the watermark"
    );

    // Back to normal: the watermark moves on.
    upstream.set("t", Index::UpToDate);
    wait_for(&client, "t", "recovery", |e| {
        e["watermark"].as_u64().unwrap() > kept
    })
    .await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_set_stays_bounded_and_polls_use_the_configured_key_without_a_callers() {
    let (url, upstream) = stand_in().await;
    let mut args = FAST.to_vec();
    args.extend_from_slice(&[
        "--watermark-max-namespaces",
        "5",
        "--gateway-api-key",
        "sidecar-key",
    ]);
    let s = sidecar(&url, &args).await;
    let client = Client::new(&s);
    for batch in 0..10 {
        let names: Vec<Value> = (0..5)
            .map(|i| json!({ "namespace": format!("ns-{batch}-{i}") }))
            .collect();
        register(&client, Value::Array(names)).await;
    }
    let text = metrics(&client).await;
    assert!(
        text.contains("hevlayer_sidecar_watermark_namespaces{state=\"all\"} 5"),
        "{text}"
    );
    wait_for(&client, "ns-9-4", "a watermark", |e| e["watermark"].is_u64()).await;
    let polls = upstream.polls_of("ns-9-4");
    assert_eq!(polls[0].authorization.as_deref(), Some("Bearer sidecar-key"));
    // Namespace names go in the path percent-encoded.
    register(&client, json!([{ "namespace": "a/b c" }])).await;
    wait_for(&client, "a/b c", "a watermark", |e| e["watermark"].is_u64()).await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_any_key_a_namespace_is_not_polled_and_that_is_counted() {
    let (url, upstream) = stand_in().await;
    let s = sidecar(&url, FAST).await;
    let client = Client::new(&s);
    register(&client, json!([{ "namespace": "nokey" }])).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = metrics(&client).await;
        if text.contains("hevlayer_sidecar_watermark_polls_total{result=\"no_credential\"}") {
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(upstream.polls_of("nokey").is_empty());
    let entry = register(&client, json!([{ "namespace": "nokey" }])).await;
    assert_eq!(entry["nokey"]["watermark"], Value::Null);
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_registration_is_a_422() {
    let (url, _upstream) = stand_in().await;
    let s = sidecar(&url, FAST).await;
    let client = Client::new(&s);
    for bad in [
        r#"{"namespaces":"a"}"#,
        r#"{"namespaces":[{"name":"a"}]}"#,
        r#"{"namespaces":[{"namespace":"a","written":"yes"}]}"#,
        "[]",
        "{",
    ] {
        client
            .post("/internal/v1/watermarks", bad)
            .await
            .error(422, "validation_error");
    }
    s.stop().await.unwrap();
}
