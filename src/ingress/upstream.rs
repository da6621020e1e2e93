//! Connections to endpoints over HTTP/1.1: one worker's keep-alive pool per endpoint
//! address, with a connect timeout, and an answer to "was the request sent?" when an attempt
//! fails (a retry needs it). A request that did not leave is handed back unspent, so the
//! proxy can send it elsewhere without having kept a copy.
//!
//! A connection goes back to the pool when the response body it carried was read to its
//! end; a body dropped early closes its connection (HTTP/1.1 has no other way to abandon a
//! response). Idle connections are reused newest first and dropped after the idle timeout.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::ingress::proxy::ProxyBody;

/// Why an attempt failed, and whether the request can be sent again.
#[derive(Debug)]
pub enum Failure {
    /// No connection could be made (refused, unreachable, timed out); nothing was sent, and
    /// the request is given back.
    Connect(std::io::Error, Box<Request<ProxyBody>>),
    /// The connection closed before the request was written; it is given back.
    NotSent(hyper::Error, Box<Request<ProxyBody>>),
    /// The request was (at least partly) sent and no response head came back.
    Exchange(hyper::Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e, _) => write!(f, "connect: {e}"),
            Failure::NotSent(e, _) => write!(f, "connection closed before the request: {e}"),
            Failure::Exchange(e) => write!(f, "{e}"),
        }
    }
}

/// An idle connection and since when.
struct Idle {
    conn: SendRequest<ProxyBody>,
    since: Instant,
}

/// One worker's HTTP/1.1 connections to endpoints, pooled per address.
pub struct Http1Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>, ahash::RandomState>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_endpoint: usize,
    last_sweep: Mutex<Instant>,
}

impl Http1Pool {
    /// A pool that gives up connecting after `connect_timeout`, closes connections idle for
    /// `idle_timeout`, and keeps at most `max_idle_per_endpoint` idle per endpoint.
    pub fn new(
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle_per_endpoint: usize,
    ) -> Self {
        Http1Pool {
            idle: Mutex::new(HashMap::default()),
            connect_timeout,
            idle_timeout,
            max_idle_per_endpoint: max_idle_per_endpoint.max(1),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// Sends `req` (origin-form target, its own `Host`) to `addr` on an idle connection or a
    /// new one. The response's body must be wrapped in [`Lease::body`] for the connection to
    /// be reused.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        mut req: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Lease), Failure> {
        loop {
            let (mut conn, reused) = match self.checkout(addr) {
                Some(c) => (c, true),
                None => match self.connect(addr).await {
                    Ok(c) => (c, false),
                    Err(e) => return Err(Failure::Connect(e, Box::new(req))),
                },
            };
            // An idle connection the endpoint closed, or one whose last response is not
            // finished on its side yet: wait for it, or take the next.
            if let Err(e) = conn.ready().await {
                if reused {
                    continue;
                }
                return Err(Failure::NotSent(e, Box::new(req)));
            }
            match conn.try_send_request(req).await {
                Ok(resp) => {
                    let lease = Lease {
                        back: Some((conn, self.clone(), addr)),
                    };
                    return Ok((resp, lease));
                }
                Err(mut e) => match e.take_message() {
                    // A reused connection that went away just then: the next one.
                    Some(r) if reused => req = r,
                    Some(r) => return Err(Failure::NotSent(e.into_error(), Box::new(r))),
                    None => return Err(Failure::Exchange(e.into_error())),
                },
            }
        }
    }

    /// The newest usable idle connection to `addr`.
    fn checkout(&self, addr: SocketAddr) -> Option<SendRequest<ProxyBody>> {
        self.sweep_now_and_then();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(&addr)?;
        while let Some(i) = list.pop() {
            if !i.conn.is_closed() && i.since.elapsed() < self.idle_timeout {
                return Some(i.conn);
            }
        }
        None
    }

    /// Opens a connection to `addr` and starts its task.
    async fn connect(&self, addr: SocketAddr) -> std::io::Result<SendRequest<ProxyBody>> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", self.connect_timeout),
                )
            })??;
        tcp.set_nodelay(true)?;
        let (conn, task) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            // Errors reach the request that was in flight; an idle connection the endpoint
            // closed just ends.
            let _ = task.with_upgrades().await;
        });
        Ok(conn)
    }

    /// Puts `conn` back as idle (the oldest beyond the limit, and expired ones, are closed).
    fn release(&self, addr: SocketAddr, conn: SendRequest<ProxyBody>) {
        if conn.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(addr).or_default();
        let expired = list
            .iter()
            .take_while(|i| now.duration_since(i.since) >= self.idle_timeout)
            .count();
        let over = (list.len() + 1).saturating_sub(self.max_idle_per_endpoint);
        list.drain(..expired.max(over).min(list.len()));
        list.push(Idle { conn, since: now });
    }

    /// Every few seconds, drops expired and closed idle connections of every endpoint (also
    /// of endpoints no request goes to any more).
    fn sweep_now_and_then(&self) {
        let now = Instant::now();
        {
            let mut last = self.last_sweep.lock().unwrap_or_else(|e| e.into_inner());
            if now.duration_since(*last) < Duration::from_secs(5) {
                return;
            }
            *last = now;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|_, list| {
            list.retain(|i| !i.conn.is_closed() && now.duration_since(i.since) < self.idle_timeout);
            !list.is_empty()
        });
    }

    /// Idle connections held (for tests and the metrics).
    pub fn idle_count(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.values().map(Vec::len).sum()
    }

    #[cfg(test)]
    fn idle_count_open(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.values()
            .flatten()
            .filter(|i| !i.conn.is_closed())
            .count()
    }
}

/// The right to put a response's connection back into its pool once the body was read.
pub struct Lease {
    back: Option<(SendRequest<ProxyBody>, Arc<Http1Pool>, SocketAddr)>,
}

impl Lease {
    /// `body` (the response's), returning the connection to the pool at its end.
    pub fn body(self, body: Incoming) -> PooledBody {
        PooledBody { body, lease: self }
    }

    fn give_back(&mut self) {
        if let Some((conn, pool, addr)) = self.back.take() {
            pool.release(addr, conn);
        }
    }
}

/// A response body from an endpoint; its connection is reused once it was read to the end.
pub struct PooledBody {
    body: Incoming,
    lease: Lease,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.lease.give_back(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.lease.give_back(),
            // An error: the connection is not reusable; dropping it closes it.
            Poll::Ready(Some(Err(_))) => this.lease.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // Read to its end (or empty from the start): the connection can carry another.
        if self.body.is_end_stream() {
            self.lease.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn get(path: &str) -> Request<ProxyBody> {
        let mut r = Request::new(Empty::new().map_err(|e| match e {}).boxed());
        *r.uri_mut() = path.parse().expect("a path");
        r.headers_mut()
            .insert(hyper::header::HOST, "t.test".parse().expect("a host"));
        r
    }

    /// A loopback HTTP/1.1 server that answers every request on a connection with its
    /// connection's number, closing after `per_conn` responses; returns its address.
    async fn numbered_server(per_conn: usize) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let addr = l.local_addr().expect("its address");
        tokio::spawn(async move {
            let mut n = 0usize;
            while let Ok((mut s, _)) = l.accept().await {
                n += 1;
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = Vec::new();
                    for _ in 0..per_conn {
                        while !have.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => have.extend_from_slice(&buf[..k]),
                            }
                        }
                        let end = have
                            .windows(4)
                            .position(|w| w == b"\r\n\r\n")
                            .map_or(0, |p| p + 4);
                        have.drain(..end);
                        let body = n.to_string();
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn body_of(pool: &Arc<Http1Pool>, addr: SocketAddr) -> String {
        let (resp, lease) = pool.send(addr, get("/")).await.expect("an answer");
        let body = lease.body(resp.into_body());
        let bytes = body.collect().await.expect("a body").to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn a_connection_read_to_its_end_is_reused() {
        let addr = numbered_server(100).await;
        let pool = Arc::new(Http1Pool::new(
            Duration::from_secs(2),
            Duration::from_secs(60),
            8,
        ));
        assert_eq!(body_of(&pool, addr).await, "1");
        assert_eq!(pool.idle_count(), 1);
        assert_eq!(body_of(&pool, addr).await, "1", "the same connection");
        // A response whose body is dropped unread does not come back to the pool.
        let (resp, lease) = pool.send(addr, get("/")).await.expect("an answer");
        assert_eq!(pool.idle_count(), 0);
        drop(lease.body(resp.into_body()));
        assert_eq!(
            body_of(&pool, addr).await,
            "2",
            "a body dropped unread closes its connection"
        );
    }

    #[tokio::test]
    async fn a_connection_the_endpoint_closed_is_never_handed_out() {
        // Each connection answers once and closes.
        let addr = numbered_server(1).await;
        let pool = Arc::new(Http1Pool::new(
            Duration::from_secs(2),
            Duration::from_secs(60),
            8,
        ));
        for want in ["1", "2", "3"] {
            assert_eq!(body_of(&pool, addr).await, want);
            // Once the connection's task saw the endpoint close it, it is never handed out.
            let deadline = Instant::now() + Duration::from_secs(10);
            while pool.idle_count_open() > 0 {
                assert!(Instant::now() < deadline, "the close was never seen");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    #[tokio::test]
    async fn a_refused_connect_gives_the_request_back() {
        // A port nothing listens on (bound, then closed).
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
            l.local_addr().expect("its address")
        };
        let pool = Arc::new(Http1Pool::new(
            Duration::from_secs(2),
            Duration::from_secs(60),
            8,
        ));
        match pool.send(addr, get("/again")).await {
            Err(Failure::Connect(_, req)) => assert_eq!(req.uri().path(), "/again"),
            Err(other) => panic!("expected a connect failure, got {other}"),
            Ok(_) => panic!("nothing listens there"),
        }
    }

    #[tokio::test]
    async fn idle_connections_past_the_limit_or_the_timeout_are_closed() {
        let addr = numbered_server(100).await;
        let pool = Arc::new(Http1Pool::new(
            Duration::from_secs(2),
            Duration::from_millis(50),
            2,
        ));
        // Three responses in flight at once: three connections, two kept.
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(pool.send(addr, get("/")).await.expect("an answer"));
        }
        for (resp, lease) in held {
            let _ = lease.body(resp.into_body()).collect().await;
        }
        assert_eq!(pool.idle_count(), 2);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(
            pool.checkout(addr).is_none(),
            "expired connections are not reused"
        );
    }
}
