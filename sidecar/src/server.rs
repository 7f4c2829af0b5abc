//! How the sidecar serves its connections: one listener, accepted on the main runtime, and each
//! connection handed for its whole life to one of N single-threaded runtimes ("lanes", each on a
//! thread of its own), in turn. A connection's requests, and the tasks they spawn (a detached
//! mirror), then run on one thread: no worker wakes another to steal work, which in a shared
//! multi-threaded runtime cost about 30 us of CPU per callout on a 2-core machine (`gateway-bench
//! --sidecar-threads`). Envoy keeps its connections to the sidecar open and opens more under
//! load, so the lanes share the load by connection.

use std::future::Future;
use std::net::SocketAddr;

use axum::serve::Listener;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

/// Connections accepted and not yet taken up by their lane; beyond it the next lane gets them.
const LANE_BACKLOG: usize = 256;

/// A lane's side of the hand-over: the connections the acceptor gives it.
struct Handed {
    connections: mpsc::Receiver<(std::net::TcpStream, SocketAddr)>,
    local: SocketAddr,
}

impl Listener for Handed {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Some((stream, peer)) = self.connections.recv().await else {
                // The acceptor stopped: the lane's graceful shutdown ends its serve loop.
                return std::future::pending().await;
            };
            // Registered with this lane's runtime (the one polling this future).
            match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => return (stream, peer),
                Err(err) => tracing::warn!(peer = %peer, error = %err, "cannot take up a connection"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// One lane: its hand-over queue and how it ended.
struct Lane {
    connections: mpsc::Sender<(std::net::TcpStream, SocketAddr)>,
    done: oneshot::Receiver<std::io::Result<()>>,
}

/// Starts `lanes` threads, each serving `router` on a runtime of its own until `stop` turns true
/// (then finishing its in-flight requests).
fn start_lanes(
    lanes: usize,
    router: &Router,
    local: SocketAddr,
    stop: &watch::Receiver<bool>,
) -> std::io::Result<Vec<Lane>> {
    (0..lanes.max(1))
        .map(|index| {
            let (connections, receiver) = mpsc::channel(LANE_BACKLOG);
            let (finished, done) = oneshot::channel();
            // Its blocking threads (freeing what a large mirror replaced) are named apart from
            // the lanes: the process test counts lanes by name, `sidecar-bench` all `sidecar*`.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .thread_name("sidecar-blocking")
                .enable_all()
                .build()?;
            let router = router.clone();
            let mut stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("sidecar-lane-{index}"))
                .spawn(move || {
                    let listener = Handed {
                        connections: receiver,
                        local,
                    };
                    let served = runtime.block_on(async move {
                        axum::serve(listener, router)
                            .with_graceful_shutdown(async move {
                                let _ = stop.wait_for(|stopped| *stopped).await;
                            })
                            .await
                    });
                    let _ = finished.send(served);
                })?;
            Ok(Lane { connections, done })
        })
        .collect()
}

/// Gives a connection to the lane whose turn it is or, when that one's backlog is full (its
/// thread is stuck) or its thread has ended, to the next that takes it: one lane in trouble never
/// stops the others from getting connections. False when none takes it.
fn hand_over(lanes: &[Lane], turn: usize, mut connection: (std::net::TcpStream, SocketAddr)) -> bool {
    for offset in 0..lanes.len() {
        let lane = &lanes[turn.wrapping_add(offset) % lanes.len()];
        match lane.connections.try_send(connection) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Full(back) | mpsc::error::TrySendError::Closed(back)) => {
                connection = back;
            }
        }
    }
    false
}

/// Serves `router` on `listener` with `lanes` single-threaded runtimes until `shutdown` resolves,
/// then stops accepting and waits for every lane to finish its in-flight requests.
pub async fn serve(
    mut listener: TcpListener,
    router: Router,
    lanes: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let lanes = start_lanes(lanes, &router, local, &stopped)?;
    let mut shutdown = std::pin::pin!(shutdown);
    let mut turn = 0usize;
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = Listener::accept(&mut listener) => accepted,
        };
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(peer = %peer, error = %err, "cannot hand over a connection");
                continue;
            }
        };
        if !hand_over(&lanes, turn, (stream, peer)) {
            tracing::error!(peer = %peer, "no serving thread takes connections; connection dropped");
        }
        turn = turn.wrapping_add(1);
    }
    let _ = stop.send(true);
    let mut result = Ok(());
    for lane in lanes {
        drop(lane.connections);
        let served = lane
            .done
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("a serving thread panicked")));
        result = result.and(served);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Two requests on one kept-alive connection; the thread names that served them.
    async fn two_requests(addr: SocketAddr) -> [String; 2] {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut names = [String::new(), String::new()];
        for name in &mut names {
            stream
                .write_all(b"GET /lane HTTP/1.1\r\nhost: sidecar\r\n\r\n")
                .await
                .unwrap();
            let mut answer = Vec::new();
            let mut chunk = [0u8; 1024];
            // The handler's answer is one short response; read until its body is in.
            while !answer.ends_with(b"#") {
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed: {}", String::from_utf8_lossy(&answer));
                answer.extend_from_slice(&chunk[..n]);
            }
            let text = String::from_utf8(answer).unwrap();
            let body = text.split("\r\n\r\n").nth(1).unwrap();
            *name = body.trim_end_matches('#').to_owned();
        }
        names
    }

    /// A lane with a full backlog or an ended thread is passed over; none left: false.
    #[test]
    fn a_lane_that_cannot_take_a_connection_is_passed_over() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let connection = || (std::net::TcpStream::connect(addr).unwrap(), addr);
        let lane = |capacity| {
            let (connections, receiver) = mpsc::channel(capacity);
            let (_finished, done) = oneshot::channel();
            (Lane { connections, done }, receiver)
        };
        let (full, _full_rx) = lane(1);
        full.connections.try_send(connection()).unwrap();
        let (ended, ended_rx) = lane(4);
        drop(ended_rx);
        let (open, mut open_rx) = lane(4);
        let lanes = [full, ended, open];
        assert!(hand_over(&lanes, 0, connection()));
        assert!(hand_over(&lanes, 1, connection()));
        assert_eq!(
            open_rx.len(),
            2,
            "both went to the one lane that takes connections"
        );
        open_rx.close();
        assert!(!hand_over(&lanes, 2, connection()));
    }

    #[tokio::test]
    async fn connections_take_turns_over_the_lanes_and_stay_on_theirs() {
        let router = Router::new().route(
            "/lane",
            get(|| async { format!("{}#", std::thread::current().name().unwrap_or("?")) }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, router, 2, async move {
            let _ = stopped.await;
        }));
        let mut seen = Vec::new();
        for _ in 0..4 {
            let [first, second] = two_requests(addr).await;
            assert_eq!(first, second, "a connection's requests are served on one lane");
            seen.push(first);
        }
        assert_eq!(
            seen,
            [
                "sidecar-lane-0",
                "sidecar-lane-1",
                "sidecar-lane-0",
                "sidecar-lane-1"
            ]
        );
        stop.send(()).unwrap();
        let served = tokio::time::timeout(std::time::Duration::from_secs(10), server)
            .await
            .expect("serve stops after its shutdown signal");
        served.unwrap().unwrap();
    }
}
