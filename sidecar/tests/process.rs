//! The `hevlayer-sidecar` binary: configuration errors and SIGTERM.

#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Client, FakeGateway};
use serde_json::{json, Value};
use tokio::process::Command;

/// Starts the sidecar binary on a free loopback port with `env` set (and `AEROSPIKE_HOSTS` removed
/// unless `env` names it) and waits, bounded, until it listens. Killed when dropped.
async fn start_sidecar(env: &[(&str, &str)]) -> (tokio::process::Child, u16) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hevlayer-sidecar"));
    cmd.env("SIDECAR_LISTEN", format!("127.0.0.1:{port}"))
        .env_remove("AEROSPIKE_HOSTS")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the sidecar exited with {status} instead of starting");
        }
        assert!(Instant::now() < deadline, "the sidecar did not start listening");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (child, port)
}

#[tokio::test]
async fn a_bad_setting_exits_2_naming_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_hevlayer-sidecar"))
        .env("GATEWAY_URL", "https://gateway.invalid")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("GATEWAY_URL"));
}

/// `AEROSPIKE_HOSTS=` (as in `AEROSPIKE_HOSTS= make run`) is "unset": the sidecar starts on the
/// embedded store instead of refusing the setting.
#[tokio::test]
async fn an_empty_aerospike_hosts_means_the_embedded_store() {
    let (mut child, port) = start_sidecar(&[("AEROSPIKE_HOSTS", "")]).await;
    let a = Client::for_url(&format!("http://127.0.0.1:{port}"))
        .get("/healthz")
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["cache"]["backend"], "embedded");
    child.kill().await.unwrap();
}

/// A running sidecar's threads whose name starts with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim().starts_with(prefix))
        .count()
}

#[tokio::test]
async fn sidecar_worker_threads_sets_the_serving_threads() {
    for (pinned, prefix) in [("false", "tokio-rt-worker"), ("true", "sidecar-lane-")] {
        for (setting, expected) in [("1", 1), ("3", 3)] {
            let (mut child, port) = start_sidecar(&[
                ("SIDECAR_WORKER_THREADS", setting),
                ("SIDECAR_PINNED_CONNECTIONS", pinned),
            ])
            .await;
            let a = Client::for_url(&format!("http://127.0.0.1:{port}"))
                .get("/healthz")
                .await;
            assert_eq!(a.status, 200, "{}", a.text);
            let pid = child.id().unwrap();
            let what = format!("SIDECAR_WORKER_THREADS={setting} SIDECAR_PINNED_CONNECTIONS={pinned}");
            assert_eq!(threads_named(pid, prefix), expected, "{what}");
            if pinned == "false" {
                assert_eq!(threads_named(pid, "sidecar-lane-"), 0, "{what}");
            }
            child.kill().await.unwrap();
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_hevlayer-sidecar"))
        .env("SIDECAR_WORKER_THREADS", "5000")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SIDECAR_WORKER_THREADS"));
}

#[tokio::test]
async fn sigterm_stops_the_sidecar_cleanly() {
    let (mut child, _port) = start_sidecar(&[]).await;
    let pid = child.id().unwrap().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM must be a graceful stop");
}

/// A request in flight when SIGTERM arrives (here a document fetch waiting on a slow gateway)
/// completes with its response; then the process exits 0. Shared and pinned serving alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_request_finish() {
    for pinned in ["false", "true"] {
        in_flight_request_finishes(pinned).await;
    }
}

async fn in_flight_request_finishes(pinned: &str) {
    let gw = FakeGateway::start_with_delay(
        Arc::new(|_path: &str, _body: &Value| {
            (
                200,
                vec![],
                json!({"rows": [{"id": "d", "t": "slow"}], "billing": {}}).to_string(),
            )
        }),
        Duration::from_millis(700),
    )
    .await;
    let (mut child, port) = start_sidecar(&[
        ("GATEWAY_URL", &gw.url),
        ("LOG_LEVEL", "warn"),
        ("SIDECAR_PINNED_CONNECTIONS", pinned),
    ])
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let c = Arc::new(Client::for_url(&format!("http://127.0.0.1:{port}")));
    let in_flight = {
        let c = c.clone();
        tokio::spawn(async move {
            c.send("GET", "/v2/namespaces/ns/documents/d", None, Some("Bearer k"))
                .await
        })
    };
    // Until the gateway has the request, it is not in flight yet.
    while gw.requests().is_empty() {
        assert!(Instant::now() < deadline, "the fetch never reached the gateway");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap()
        .success());
    let a = in_flight.await.unwrap();
    assert_eq!(a.status, 200, "pinned {pinned}: {}", a.text);
    assert_eq!(a.json(), json!({"id": "d", "attributes": {"t": "slow"}}));
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
