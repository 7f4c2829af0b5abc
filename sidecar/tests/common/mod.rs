//! Helpers shared by the sidecar's HTTP tests: a sidecar on 127.0.0.1:0 and a fake gateway.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aerospike_double::Double;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hevlayer_sidecar::cache::aerospike::{AerospikeCache, AerospikeSettings};
use hevlayer_sidecar::cache::embedded::EmbeddedCache;
use hevlayer_sidecar::cache::Stores;
use hevlayer_sidecar::config::Config;
use hevlayer_sidecar::RunningSidecar;
use serde_json::Value;
use tokio::net::TcpListener;

/// A request the fake gateway received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub authorization: Option<String>,
    pub body: Value,
}

pub type Responder =
    Arc<dyn Fn(&str, &Value) -> (u16, Vec<(&'static str, &'static str)>, String) + Send + Sync>;

/// Stands in for the gateway listener: records requests and answers with `responder`.
pub struct FakeGateway {
    pub url: String,
    pub received: Arc<Mutex<Vec<Received>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeGateway {
    pub async fn start(responder: Responder) -> Self {
        Self::start_with_delay(responder, Duration::ZERO).await
    }

    /// Like `start`, answering every request `delay` late.
    pub async fn start_with_delay(responder: Responder, delay: Duration) -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let rec = received.clone();
        let handler = move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
            let rec = rec.clone();
            let responder = responder.clone();
            async move {
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let path = uri.path().to_owned();
                rec.lock().unwrap().push(Received {
                    path: path.clone(),
                    authorization: headers
                        .get("authorization")
                        .map(|v| v.to_str().unwrap().to_owned()),
                    body: body.clone(),
                });
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let (status, extra, text) = responder(&path, &body);
                let mut response: Response = (StatusCode::from_u16(status).unwrap(), text).into_response();
                response
                    .headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                for (k, v) in extra {
                    response.headers_mut().insert(k, v.parse().unwrap());
                }
                response
            }
        };
        let app = axum::Router::new().fallback(handler);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            url,
            received,
            stop: Some(tx),
        }
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for FakeGateway {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub fn config(gateway_url: &str, extra: &[&str]) -> Config {
    use clap::Parser;
    let mut args = vec![
        "hevlayer-sidecar",
        "--gateway-url",
        gateway_url,
        "--gateway-timeout-ms",
        "5000",
    ];
    args.extend_from_slice(extra);
    Config::parse_from(args)
}

pub async fn sidecar(gateway_url: &str, extra: &[&str]) -> TestSidecar {
    sidecar_on(Backend::Embedded, gateway_url, extra).await
}

/// Which document cache a test sidecar runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    /// The Aerospike backend, connected to a fresh wire-level double.
    Aerospike,
}

/// A sidecar on 127.0.0.1:0 and, for the Aerospike backend, the double it uses.
pub struct TestSidecar {
    inner: RunningSidecar,
    pub backend: Backend,
    _double: Option<Double>,
}

impl std::ops::Deref for TestSidecar {
    type Target = RunningSidecar;

    fn deref(&self) -> &RunningSidecar {
        &self.inner
    }
}

impl TestSidecar {
    pub async fn stop(self) -> std::io::Result<()> {
        self.inner.stop().await
    }

    /// The double the Aerospike backend talks to (`None` on the embedded store).
    pub fn double(&self) -> Option<&Double> {
        self._double.as_ref()
    }
}

pub async fn sidecar_on(backend: Backend, gateway_url: &str, extra: &[&str]) -> TestSidecar {
    match backend {
        Backend::Embedded => {
            let cfg = config(gateway_url, extra);
            let inner = RunningSidecar::start(
                &cfg,
                Stores::on(Arc::new(EmbeddedCache::new(cfg.embedded_cache_bytes))),
            )
            .await
            .unwrap();
            TestSidecar {
                inner,
                backend,
                _double: None,
            }
        }
        Backend::Aerospike => {
            let double = Double::start("127.0.0.1:0", &["hevlayer"]).await.unwrap();
            let hosts = double.hosts();
            let mut args = vec!["--aerospike-hosts", hosts.as_str()];
            // Generous unless the test sets its own (the double runs in a debug build).
            if !extra.contains(&"--cache-op-timeout-ms") {
                args.extend_from_slice(&["--cache-op-timeout-ms", "10000"]);
            }
            args.extend_from_slice(extra);
            let cfg = config(gateway_url, &args);
            let cache = AerospikeCache::start(AerospikeSettings {
                hosts: hosts.clone(),
                namespace: "hevlayer".into(),
                set_prefix: cfg.set_prefix.clone(),
                pipeline_set_prefix: cfg.pipeline_set_prefix.clone(),
                op_timeout: cfg.cache_op_timeout(),
                breaker_open_for: hevlayer_sidecar::cache::aerospike::BREAKER_OPEN_FOR,
            });
            assert!(
                cache.wait_connected(Duration::from_secs(10)).await,
                "no connection to the double"
            );
            let inner = RunningSidecar::start(&cfg, Stores::on(cache)).await.unwrap();
            TestSidecar {
                inner,
                backend,
                _double: Some(double),
            }
        }
    }
}

/// Runs `async fn NAME(backend: Backend)` as two tests, `NAME::embedded` and `NAME::aerospike`.
#[macro_export]
macro_rules! both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name(super::common::Backend::Embedded).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn aerospike() {
                super::$name(super::common::Backend::Aerospike).await
            }
        }
    };
}

/// A gateway URL nothing listens on.
pub async fn dead_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    url
}

pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// Asserts a JSON error envelope of `status` and `kind`; returns the message.
    pub fn error(&self, status: u16, kind: &str) -> String {
        assert_eq!(self.status, status, "body: {}", self.text);
        assert_eq!(
            self.headers.get("content-type").unwrap(),
            "application/json",
            "{}",
            self.text
        );
        let v = self.json();
        assert_eq!(v["error"], kind, "{}", self.text);
        v["message"].as_str().unwrap().to_owned()
    }
}

pub struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    pub fn new(s: &RunningSidecar) -> Self {
        Self::for_url(&s.url(""))
    }

    pub fn for_url(base: &str) -> Self {
        Self {
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    pub async fn send(&self, method: &str, path: &str, body: Option<&str>, auth: Option<&str>) -> Answer {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        self.send_with(method, path, body, &headers).await
    }

    pub async fn send_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_owned());
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        Answer {
            status,
            headers,
            text,
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send("GET", path, None, None).await
    }

    pub async fn post(&self, path: &str, body: &str) -> Answer {
        self.send("POST", path, Some(body), None).await
    }

    pub async fn put(&self, path: &str, body: &str) -> Answer {
        self.send("PUT", path, Some(body), None).await
    }

    pub async fn create(&self, id: &str) {
        let a = self
            .post(
                "/v2/pipelines",
                &format!(r#"{{"id":"{id}","target_namespace":"target-ns"}}"#),
            )
            .await;
        assert_eq!(a.status, 201, "{}", a.text);
    }

    pub async fn stage(&self, pipeline: &str, doc: &str) {
        let a = self
            .put(
                &format!("/v2/pipelines/{pipeline}/documents/{doc}"),
                r#"{"chunks":[{"id":"c0","text":"t"}]}"#,
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.text);
    }

    pub async fn status(&self, pipeline: &str) -> Value {
        let a = self.get(&format!("/v2/pipelines/{pipeline}/status")).await;
        assert_eq!(a.status, 200, "{}", a.text);
        a.json()
    }
}
