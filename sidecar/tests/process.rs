//! The `hevlayer-sidecar` binary: configuration errors and SIGTERM.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::time::{Duration, Instant};

use tokio::process::Command;

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

#[tokio::test]
async fn sigterm_stops_the_sidecar_cleanly() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_hevlayer-sidecar"))
        .env("SIDECAR_LISTEN", format!("127.0.0.1:{port}"))
        .env_remove("AEROSPIKE_HOSTS")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "the sidecar did not start listening");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = child.id().unwrap().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM must be a graceful stop");
}
