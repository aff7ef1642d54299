//! The HTTP server both services run: an axum router on hyper's HTTP/1 server, with
//! the two bounds `axum::serve` has no knob for.
//!
//! - **A header-read timeout.** A client has [`Limits::header_read_timeout`] to send
//!   the headers of a request, counted from the moment the connection is ready for
//!   one: after the accept, and again after each response on a keep-alive
//!   connection. A client that opens a connection and sends nothing, or trickles half
//!   a request line (slowloris), is disconnected when it passes; so is a keep-alive
//!   connection left idle that long.
//! - **A cap on open connections.** At most [`Limits::max_connections`] connections
//!   are served at once. At the cap the server stops accepting until one closes:
//!   new connections wait in the kernel's listen backlog (and past it the client's
//!   TCP stack retries), so the process never holds more. A connection upgraded to
//!   a WebSocket is handed to its handler and no longer counts here (the
//!   websocket-service bounds those itself).
//!
//! Shutdown works as with `axum::serve(..).with_graceful_shutdown(..)`: when the
//! `shutdown` future resolves the listener is closed, idle connections close,
//! requests in progress finish, and [`serve`] returns once every connection is
//! gone. Upgraded connections are not waited for: their handlers own them.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long to wait before accepting again after an accept error such as `EMFILE`
/// (out of file descriptors), which retrying at once would only repeat.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The bounds of the HTTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest time a client may take to send a request's headers, from the moment
    /// the connection is ready for a request (also the longest idle time of a
    /// keep-alive connection between two requests).
    pub header_read_timeout: Duration,
    /// Most HTTP connections served at once; at the cap the server stops accepting
    /// until one closes. At least 1.
    pub max_connections: usize,
}

/// Serves `app` on `listener` within `limits` until `shutdown` resolves, then shuts
/// down gracefully (see the module docs) and returns.
///
/// It returns `Ok(())` after a shutdown; accept errors are logged and retried, never
/// returned (the `Result` keeps the shape of `axum::serve`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut shutdown = pin!(shutdown);
    let mut at_cap = false;

    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if !at_cap {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "HTTP connection cap reached; accepting again when a connection closes"
                    );
                    at_cap = true;
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break, // never closed; nothing left to serve
                    },
                    _ = &mut shutdown => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "accept failed; accepting again in 1 s");
                    tokio::select! {
                        _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                        _ = &mut shutdown => break,
                    }
                }
            },
            _ = &mut shutdown => break,
        };
        if at_cap && slots.available_permits() > 0 {
            at_cap = false;
        }
        let conn = builder
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()))
            .with_upgrades();
        let stop = stop.clone();
        connections.spawn(async move {
            let mut conn = pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                // A header-read timeout, a client that went away, a malformed request.
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
            drop(slot);
        });
    }

    drop(listener);
    stop.cancel();
    connections.close();
    connections.wait().await;
    Ok(())
}

/// The process's soft limit on open files (`ulimit -n`), when the system says
/// (Linux: `/proc/self/limits`); `None` when unknown or unlimited.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Errors of one connection that the next accept does not repeat.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode, header};
    use axum::response::Response;
    use axum::routing::get;
    use std::net::SocketAddr;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const WAIT: Duration = Duration::from_secs(10);

    /// `GET /` answers "hi"; `GET /echo` upgrades to a raw byte echo (protocol `echo`).
    fn app() -> Router {
        Router::new().route("/", get(|| async { "hi" })).route(
            "/echo",
            get(|mut req: Request<Body>| async move {
                let upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    let Ok(upgraded) = upgrade.await else { return };
                    let mut io = TokioIo::new(upgraded);
                    let mut buf = [0u8; 64];
                    while let Ok(n @ 1..) = io.read(&mut buf).await {
                        if io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                Response::builder()
                    .status(StatusCode::SWITCHING_PROTOCOLS)
                    .header(header::CONNECTION, "upgrade")
                    .header(header::UPGRADE, "echo")
                    .body(Body::empty())
                    .unwrap()
            }),
        )
    }

    struct Server {
        addr: SocketAddr,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    async fn start(header_read_timeout: Duration, max_connections: usize) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let limits = Limits {
            header_read_timeout,
            max_connections,
        };
        let task = tokio::spawn(serve(listener, app(), limits, async move {
            let _ = stopped.await;
        }));
        Server {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// Reads until the peer closes; how long that took. Panics past `WAIT`.
    async fn closed_after(conn: &mut TcpStream) -> Duration {
        let started = Instant::now();
        let mut buf = [0u8; 256];
        tokio::time::timeout(WAIT, async {
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await
        .expect("the server closes the connection");
        started.elapsed()
    }

    /// Sends `GET <path>` on a fresh connection and reads the whole answer.
    async fn fetch(addr: SocketAddr, path: &str) -> String {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(WAIT, conn.read_to_string(&mut out))
            .await
            .expect("an answer in time")
            .unwrap();
        out
    }

    #[tokio::test]
    async fn half_a_request_line_is_cut_off_at_the_header_timeout() {
        let timeout = Duration::from_millis(300);
        let server = start(timeout, 16).await;
        let mut slow = TcpStream::connect(server.addr).await.unwrap();
        slow.write_all(b"GET /healt").await.unwrap();
        let silent_started = Instant::now();
        let mut silent = TcpStream::connect(server.addr).await.unwrap();
        // Meanwhile a whole request is answered at once.
        assert!(fetch(server.addr, "/").await.ends_with("hi"));
        let waited = closed_after(&mut slow).await;
        assert!(waited >= timeout / 2, "closed too early: {waited:?}");
        assert!(waited < timeout * 4, "closed too late: {waited:?}");
        // A connection that sends nothing at all is cut off too.
        closed_after(&mut silent).await;
        let silent_waited = silent_started.elapsed();
        assert!(silent_waited < timeout * 4, "{silent_waited:?}");
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_at_the_header_timeout() {
        let timeout = Duration::from_millis(300);
        let server = start(timeout, 16).await;
        let mut conn = TcpStream::connect(server.addr).await.unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = conn.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        let waited = closed_after(&mut conn).await;
        assert!(waited < timeout * 4, "{waited:?}");
    }

    #[tokio::test]
    async fn upgraded_connections_work_and_outlive_the_header_timeout() {
        let timeout = Duration::from_millis(200);
        let server = start(timeout, 1).await;
        let mut conn = TcpStream::connect(server.addr).await.unwrap();
        conn.write_all(
            b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tokio::time::timeout(WAIT, conn.read_exact(&mut byte))
                .await
                .expect("a response head")
                .unwrap();
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
        // Idle past the header timeout: the upgraded stream is not an HTTP connection.
        tokio::time::sleep(timeout * 3).await;
        conn.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        tokio::time::timeout(WAIT, conn.read_exact(&mut echo))
            .await
            .expect("the echo")
            .unwrap();
        assert_eq!(&echo, b"ping");
        // And it no longer holds the only connection slot.
        assert!(fetch(server.addr, "/").await.ends_with("hi"));
    }

    #[tokio::test]
    async fn at_the_cap_new_connections_wait_until_one_closes() {
        let server = start(Duration::from_secs(30), 2).await;
        let mut held = vec![
            TcpStream::connect(server.addr).await.unwrap(),
            TcpStream::connect(server.addr).await.unwrap(),
        ];
        // Both held connections are being served before the third arrives.
        for c in &mut held {
            c.write_all(b"GET /").await.unwrap();
        }
        let waiting = tokio::spawn(fetch(server.addr, "/"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "answered past the connection cap");
        held.pop();
        let answer = tokio::time::timeout(WAIT, waiting)
            .await
            .expect("answered once a slot is free")
            .unwrap();
        assert!(answer.ends_with("hi"), "{answer}");
    }

    #[test]
    fn the_open_files_limit_is_read() {
        let limit = open_files_limit().expect("a limit on Linux");
        assert!(limit >= 64, "{limit}");
    }

    #[tokio::test]
    async fn shutdown_stops_accepting_and_returns() {
        let mut server = start(Duration::from_secs(30), 16).await;
        let mut idle = TcpStream::connect(server.addr).await.unwrap();
        assert!(fetch(server.addr, "/").await.ends_with("hi"));
        server.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(WAIT, &mut server.task)
            .await
            .expect("serve returns after the shutdown")
            .unwrap()
            .unwrap();
        // The idle connection was closed, and the port no longer accepts.
        closed_after(&mut idle).await;
        assert!(TcpStream::connect(server.addr).await.is_err());
    }
}
