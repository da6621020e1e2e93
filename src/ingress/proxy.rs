//! The HTTP(S) entry point: accepts client connections (HTTP/1.1 with keep-alive, HTTP/2
//! over TLS by ALPN or in cleartext by prior knowledge), finds each request's route by host
//! and path, and forwards it straight to one of the service's ready endpoints (pod
//! addresses) over a per-endpoint keep-alive pool; `Upgrade`s (WebSocket) are passed
//! through as byte streams; gRPC (HTTP/2 with `application/grpc`) goes to the endpoint over
//! HTTP/2.
//!
//! Safe by default: a request whose host no route names is answered 404 and never sent
//! anywhere taken from the request; header size and count, body size, header read time
//! (slowloris; also the idle time of a kept-alive HTTP/1 connection), the idle time of any
//! connection without a request in flight (HTTP/2 gets a GOAWAY), connections and requests
//! in flight per route are bounded; retries happen only before a request was sent
//! (a failed connect) or, for idempotent requests without a body, after a failed exchange.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dashmap::DashMap;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use ipnetwork::IpNetwork;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::info;

use crate::ingress::backends::Targets;
use crate::ingress::balance::{Balancer, Policy};
use crate::ingress::headers::{
    Hop, is_trusted, requested_upgrade, set_forwarded, strip_hop_by_hop,
};
use crate::ingress::metrics::IngressMetrics;
use crate::ingress::routes::{RouteHit, RouteTable};
use crate::ingress::upstream::{Failure, Http1Pool};
use crate::util::rate_limited::RateLimited;

/// An error inside a body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy sends (requests to endpoints, responses to clients).
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// A client connection's byte stream, plain or TLS (one code path serves both).
trait ClientIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ClientIo for T {}

/// Requests in flight on one client connection, and when the last one ended: what its idle
/// timeout is counted from.
struct ConnActivity {
    opened: Instant,
    inflight: AtomicUsize,
    /// Milliseconds from `opened` to the end of the last request.
    last_end_ms: AtomicU64,
}

impl ConnActivity {
    fn new() -> Self {
        ConnActivity {
            opened: Instant::now(),
            inflight: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
        }
    }

    /// Counts a request in flight until the guard (kept by its response body) is dropped.
    fn begin(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        InflightGuard(self.clone())
    }

    /// When the connection will have been idle for `idle`: `idle` after the last request
    /// ended, or, while one is in flight, `idle` from now (checked again then).
    fn idle_deadline(&self, idle: Duration) -> Instant {
        if self.inflight.load(Ordering::Acquire) > 0 {
            return Instant::now() + idle;
        }
        self.opened + Duration::from_millis(self.last_end_ms.load(Ordering::Acquire)) + idle
    }
}

/// One request in flight on a client connection.
struct InflightGuard(Arc<ConnActivity>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = u64::try_from(a.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.last_end_ms.fetch_max(ms, Ordering::AcqRel);
        a.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted in flight until it is sent or dropped.
struct Tracked {
    body: ProxyBody,
    _guard: InflightGuard,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Limits and timeouts of the proxy.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Peers whose `X-Forwarded-*`/`Forwarded` headers are kept and extended.
    pub trusted_proxies: Vec<IpNetwork>,
    /// Largest request head (bytes; at least 8 KiB).
    pub max_header_bytes: usize,
    /// Most request headers.
    pub max_headers: usize,
    /// Largest request body (bytes); larger is 413.
    pub max_body_bytes: u64,
    /// Time for a client to send a request head (and for an idle HTTP/1 connection to send
    /// its next one).
    pub header_timeout: Duration,
    /// How long a client connection may stay without a request in flight before it is closed
    /// gracefully (HTTP/2: GOAWAY, streams already begun finish); kept-alive HTTP/1
    /// connections are closed sooner, at `header_timeout`.
    pub idle_timeout: Duration,
    /// Client connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// Requests in flight per route; more get 503 (one flooded host cannot take every
    /// connection to the endpoints from the others).
    pub max_inflight_per_route: usize,
    /// Connect timeout to an endpoint.
    pub connect_timeout: Duration,
    /// Time for an endpoint to answer with its response head.
    pub upstream_timeout: Duration,
    /// How long a failing endpoint is left out.
    pub eject_for: Duration,
    /// How endpoints are chosen.
    pub policy: Policy,
    /// Access log lines per second before sampling starts.
    pub access_log_per_sec: u64,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            trusted_proxies: Vec::new(),
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_body_bytes: 16 << 20,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 16_384,
            max_inflight_per_route: 4096,
            connect_timeout: Duration::from_secs(2),
            upstream_timeout: Duration::from_secs(60),
            eject_for: Duration::from_secs(10),
            policy: Policy::RoundRobin,
            access_log_per_sec: 50,
        }
    }
}

/// What every request reads: routes, targets, balancer, clients, metrics.
pub struct Proxy {
    /// The route table (a change takes the write lock for one route).
    pub routes: RwLock<RouteTable>,
    /// Each service's ready endpoints.
    pub targets: Arc<Targets>,
    /// Endpoint choice and passive health.
    pub balancer: Balancer,
    /// The metrics.
    pub metrics: Arc<IngressMetrics>,
    cfg: ProxyConfig,
    conns: Arc<Semaphore>,
    inflight: DashMap<String, Arc<AtomicUsize>, ahash::RandomState>,
    log: AccessLog,
    warn: RateLimited,
    ready: AtomicBool,
}

/// The connections to endpoints of one worker thread: keep-alive pools per endpoint, HTTP/1.1
/// and HTTP/2 (each worker has its own, so a request never waits on another thread).
pub struct Clients {
    http1: Arc<Http1Pool>,
    http2: Client<HttpConnector, ProxyBody>,
    /// This worker's handles on the per-route metrics (a request finds its counter without
    /// building label strings; only this thread takes the lock).
    counters: std::sync::Mutex<HashMap<String, RouteCounters, ahash::RandomState>>,
}

/// One route's metric handles (shared with the registry's families).
#[derive(Default)]
struct RouteCounters {
    host: String,
    by_code: Vec<(u16, prometheus_client::metrics::counter::Counter)>,
    upstream: Option<prometheus_client::metrics::histogram::Histogram>,
}

impl Clients {
    /// Pools with the connect timeout of `cfg`.
    pub fn new(cfg: &ProxyConfig) -> Self {
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(cfg.connect_timeout));
        conn.set_nodelay(true);
        conn.enforce_http(true);
        let http1 = Arc::new(Http1Pool::new(
            cfg.connect_timeout,
            Duration::from_secs(60),
            1024,
        ));
        let http2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(conn);
        Clients {
            http1,
            http2,
            counters: std::sync::Mutex::new(HashMap::default()),
        }
    }
}

/// Who a connection came from.
#[derive(Debug, Clone, Copy)]
struct Peer {
    addr: SocketAddr,
    tls: bool,
    trusted: bool,
}

impl Proxy {
    /// A proxy over `targets` with an empty route table.
    pub fn new(cfg: ProxyConfig, targets: Arc<Targets>, metrics: Arc<IngressMetrics>) -> Self {
        Proxy {
            routes: RwLock::new(RouteTable::new()),
            targets,
            balancer: Balancer::new(cfg.policy, cfg.eject_for),
            metrics,
            conns: Arc::new(Semaphore::new(cfg.max_connections)),
            log: AccessLog::new(cfg.access_log_per_sec),
            inflight: DashMap::with_hasher(ahash::RandomState::new()),
            warn: RateLimited::new(Duration::from_secs(10)),
            ready: AtomicBool::new(false),
            cfg,
        }
    }

    /// Opens the proxy: routes and endpoints were listed (until then every request gets
    /// 503, never a 404 that would be wrong).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Accepts connections on `listener` until the process ends; with `tls`, each is a TLS
    /// connection first (handshake within the header timeout).
    pub async fn serve(
        self: Arc<Self>,
        listener: std::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("ingress listener: {e}");
                return;
            }
        };
        let clients = Arc::new(Clients::new(&self.cfg));
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.cfg.header_timeout)
            .max_buf_size(self.cfg.max_header_bytes.max(8192))
            .max_headers(self.cfg.max_headers)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(256)
            .max_header_list_size(u32::try_from(self.cfg.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let builder = Arc::new(builder);
        loop {
            let (stream, addr) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors and the like: wait instead of spinning.
                    self.warn.warn(&format!("ingress accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = self.conns.clone().try_acquire_owned() else {
                self.metrics.refused.inc();
                self.warn
                    .warn("ingress connection limit reached; closing new connections");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let peer = Peer {
                addr,
                tls: tls.is_some(),
                trusted: is_trusted(addr.ip(), &self.cfg.trusted_proxies),
            };
            let (me, builder, tls) = (self.clone(), builder.clone(), tls.clone());
            let clients = clients.clone();
            tokio::spawn(async move {
                me.metrics.active.inc();
                let io: Option<Box<dyn ClientIo>> = match tls {
                    None => Some(Box::new(stream)),
                    Some(acc) => {
                        let hs = tokio::time::timeout(me.cfg.header_timeout, acc.accept(stream));
                        match hs.await {
                            Ok(Ok(s)) => Some(Box::new(s)),
                            _ => None,
                        }
                    }
                };
                if let Some(io) = io {
                    let activity = Arc::new(ConnActivity::new());
                    let (svc_me, svc_activity) = (me.clone(), activity.clone());
                    let svc = hyper::service::service_fn(move |req| {
                        let (me, clients) = (svc_me.clone(), clients.clone());
                        let guard = svc_activity.begin();
                        async move {
                            let resp = me.handle(req, peer, &clients).await;
                            Ok::<_, Infallible>(resp.map(|body| Tracked {
                                body,
                                _guard: guard,
                            }))
                        }
                    });
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
                    let mut conn = std::pin::pin!(conn);
                    let mut closing = false;
                    loop {
                        let idle_at = activity.idle_deadline(me.cfg.idle_timeout);
                        tokio::select! {
                            _ = conn.as_mut() => break,
                            _ = tokio::time::sleep_until(idle_at.into()), if !closing => {
                                if activity.idle_deadline(me.cfg.idle_timeout) <= Instant::now() {
                                    conn.as_mut().graceful_shutdown();
                                    closing = true;
                                }
                            }
                        }
                    }
                }
                me.metrics.active.dec();
                drop(permit);
            });
        }
    }

    /// One request: route, pick, forward, answer.
    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: Peer,
        clients: &Clients,
    ) -> Response<ProxyBody> {
        let t0 = Instant::now();
        let line = LogLine::of(&req);
        if !self.ready.load(Ordering::Acquire) {
            let resp = short(StatusCode::SERVICE_UNAVAILABLE, "starting");
            return self.finish(t0, &peer, &line, None, resp, clients);
        }
        let Some(host) = line.host() else {
            return self.finish(
                t0,
                &peer,
                &line,
                None,
                short(StatusCode::BAD_REQUEST, "no Host"),
                clients,
            );
        };
        let path = line.path_and_query();
        let found = {
            let table = self.routes.read().unwrap_or_else(|e| e.into_inner());
            table.lookup(host, path).map(|m| m.hit())
        };
        let Some(r) = found else {
            return self.finish(
                t0,
                &peer,
                &line,
                None,
                short(StatusCode::NOT_FOUND, "no route"),
                clients,
            );
        };
        let resp = self.forward(req, &r, host, peer, clients).await;
        self.finish(t0, &peer, &line, Some(&r), resp, clients)
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        r: &RouteHit,
        host: &str,
        peer: Peer,
        clients: &Clients,
    ) -> Response<ProxyBody> {
        let route = r.route();
        let Some(t) = self.targets.get(r.namespace(), r.service()) else {
            return short(StatusCode::SERVICE_UNAVAILABLE, "no such service");
        };
        let port = match t.target_port(r.port()) {
            Ok(p) => p,
            Err(e) => {
                self.warn
                    .warn(&format!("ingress route {}: {e}", route.name));
                return short(StatusCode::SERVICE_UNAVAILABLE, "no such service port");
            }
        };
        if t.addrs.is_empty() {
            return short(StatusCode::SERVICE_UNAVAILABLE, "no ready endpoints");
        }
        if let Some(len) = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            && len > self.cfg.max_body_bytes
        {
            return short(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
        }
        let _slot = match self.route_slot(&route.name) {
            Some(s) => s,
            None => return short(StatusCode::SERVICE_UNAVAILABLE, "route overloaded"),
        };
        let upgrade = (req.version() == Version::HTTP_11)
            .then(|| requested_upgrade(req.headers()))
            .flatten();
        let mut client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let grpc = req.version() == Version::HTTP_2
            && req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/grpc"));
        let (parts, body) = req.into_parts();
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers, upgrade.as_ref());
        if !headers.contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(host)
        {
            headers.insert(header::HOST, v);
        }
        set_forwarded(
            &mut headers,
            Hop {
                peer: canonical(peer.addr.ip()),
                proto: if peer.tls { "https" } else { "http" },
                host: Some(host),
                trusted: peer.trusted,
            },
        );
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let bodiless = body.is_end_stream();
        let idempotent = matches!(
            parts.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        let limit = usize::try_from(self.cfg.max_body_bytes).unwrap_or(usize::MAX);
        let body = Limited::new(body, limit)
            .map_err(|e| -> BoxError { e })
            .boxed();
        let version = if grpc {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        // A copy to send again after a failed exchange: only of a request that is safe to
        // repeat. Any other request is sent again only when it never left (it comes back).
        let again = (bodiless && idempotent).then(|| (parts.method.clone(), headers.clone()));
        let mut next = Some(upstream_request(parts.method, headers, body, version));
        let ips = &t.addrs;
        let mut tried = [SocketAddr::from(([0, 0, 0, 0], 0)); MAX_ATTEMPTS];
        let mut attempts = 0;
        let mut failed = "no endpoint answered";
        let mut upgraded = false;
        while attempts < MAX_ATTEMPTS {
            let Some(addr) = self.balancer.pick_of(
                ips.len(),
                |i| SocketAddr::from((ips[i], port)),
                &tried[..attempts],
                Instant::now(),
            ) else {
                break;
            };
            let Some(mut up) = next.take() else {
                break;
            };
            if attempts > 0 {
                self.metrics.retries.inc();
            }
            tried[attempts] = addr;
            attempts += 1;
            let _in_flight = self.balancer.start(addr);
            let sent = Instant::now();
            let res = if grpc {
                let Ok(uri) = format!("http://{addr}{pq}").parse::<Uri>() else {
                    return short(StatusCode::BAD_REQUEST, "bad request target");
                };
                *up.uri_mut() = uri;
                tokio::time::timeout(self.cfg.upstream_timeout, clients.http2.request(up))
                    .await
                    .map(|r| {
                        r.map(|resp| resp.map(|b| b.map_err(|e| -> BoxError { e.into() }).boxed()))
                            .map_err(|e| {
                                let connect = e.is_connect();
                                (e.to_string(), connect, None)
                            })
                    })
            } else {
                *up.uri_mut() = Uri::from(pq.clone());
                tokio::time::timeout(self.cfg.upstream_timeout, clients.http1.send(addr, up))
                    .await
                    .map(|r| match r {
                        Ok((mut resp, lease)) => {
                            if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                                && let Some(client_up) = client_upgrade.take()
                            {
                                pass_upgrade(client_up, &mut resp);
                                upgraded = true;
                            }
                            Ok(resp.map(|b| {
                                lease.body(b).map_err(|e| -> BoxError { e.into() }).boxed()
                            }))
                        }
                        Err(Failure::Connect(e, req)) => Err((e.to_string(), true, Some(req))),
                        Err(Failure::NotSent(e, req)) => Err((e.to_string(), false, Some(req))),
                        Err(f @ Failure::Exchange(_)) => Err((f.to_string(), false, None)),
                    })
            };
            match res {
                Err(_) => {
                    self.metrics.upstream_failures.inc();
                    return short(StatusCode::GATEWAY_TIMEOUT, "endpoint timed out");
                }
                Ok(Ok(resp)) => {
                    self.balancer.succeeded(addr);
                    self.count(
                        clients,
                        route.host.as_str(),
                        &route.name,
                        0,
                        Some(sent.elapsed().as_secs_f64()),
                    );
                    let (mut parts, b) = resp.into_parts();
                    if upgraded {
                        let up_value = parts.headers.get(header::UPGRADE).cloned();
                        strip_hop_by_hop(&mut parts.headers, up_value.as_ref());
                        return Response::from_parts(parts, empty());
                    }
                    strip_hop_by_hop(&mut parts.headers, None);
                    return Response::from_parts(parts, b);
                }
                Ok(Err((why, connect, unsent))) => {
                    self.metrics.upstream_failures.inc();
                    if connect {
                        self.balancer.failed(addr, Instant::now());
                    }
                    self.warn.warn(&format!(
                        "ingress route {}: endpoint {addr}: {why}",
                        route.name
                    ));
                    failed = "endpoint failed";
                    // Again only what never reached the endpoint, or what is safe to repeat.
                    next = match (unsent, &again) {
                        (Some(req), _) => Some(*req),
                        (None, Some((method, headers))) => Some(upstream_request(
                            method.clone(),
                            headers.clone(),
                            empty(),
                            version,
                        )),
                        (None, None) => None,
                    };
                }
            }
        }
        short(StatusCode::BAD_GATEWAY, failed)
    }

    /// A slot among the route's requests in flight, or None when it has too many.
    fn route_slot(&self, route: &str) -> Option<RouteSlot> {
        let c = match self.inflight.get(route) {
            Some(c) => c.clone(),
            None => self.inflight.entry(route.to_string()).or_default().clone(),
        };
        if c.fetch_add(1, Ordering::AcqRel) >= self.cfg.max_inflight_per_route {
            c.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(RouteSlot(c))
    }

    /// Counts and logs a response.
    fn finish(
        &self,
        t0: Instant,
        peer: &Peer,
        line: &LogLine,
        r: Option<&RouteHit>,
        mut resp: Response<ProxyBody>,
        clients: &Clients,
    ) -> Response<ProxyBody> {
        let code = resp.status().as_u16();
        let (host, route) = r.map_or(("-", "-"), |r| {
            (r.route().host.as_str(), r.route().name.as_str())
        });
        self.count(clients, host, route, code, None);
        if self.log.admit() {
            info!(
                target: "access",
                peer = %peer.addr,
                method = %line.method,
                host = line.host().unwrap_or("-"),
                path = line.path(),
                route = %route,
                status = code,
                ms = t0.elapsed().as_secs_f64() * 1000.0,
            );
        } else {
            self.metrics.log_suppressed.inc();
        }
        resp.headers_mut()
            .entry(header::SERVER)
            .or_insert(HeaderValue::from_static("tartan-ingress"));
        resp
    }

    /// Counts a response of `route` (host pattern `host`) with `code` (0: none), and its
    /// upstream time.
    fn count(&self, clients: &Clients, host: &str, route: &str, code: u16, upstream: Option<f64>) {
        let mut map = clients.counters.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 100_000 {
            // Routes come and go; a worker's handles are only a cache of the families.
            map.clear();
        }
        let rc = match map.get_mut(route) {
            Some(rc) => rc,
            None => map.entry(route.to_string()).or_default(),
        };
        if rc.host != host {
            *rc = RouteCounters {
                host: host.to_string(),
                ..Default::default()
            };
        }
        match rc.by_code.iter().find(|(c, _)| *c == code) {
            _ if code == 0 => {}
            Some((_, counter)) => {
                counter.inc();
            }
            None => {
                let counter = self
                    .metrics
                    .requests
                    .get_or_create(&[
                        ("host", host.to_string()),
                        ("route", route.to_string()),
                        ("code", code.to_string()),
                    ])
                    .clone();
                counter.inc();
                rc.by_code.push((code, counter));
            }
        }
        if let Some(secs) = upstream {
            rc.upstream
                .get_or_insert_with(|| {
                    self.metrics
                        .upstream_duration
                        .get_or_create(&[("route", route.to_string())])
                        .clone()
                })
                .observe(secs);
        }
    }

    /// Forgets balancer state of endpoints no service has any more.
    pub fn forget_gone_endpoints(&self) {
        let live = self.targets.all_addrs();
        self.balancer.retain(|a| match a.ip() {
            IpAddr::V4(v4) => live.contains(&v4),
            IpAddr::V6(_) => false,
        });
    }
}

/// A request in flight on a route, released on drop.
struct RouteSlot(Arc<AtomicUsize>);

impl Drop for RouteSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the access log says of a request (shared with the request: nothing is copied).
struct LogLine {
    method: Method,
    /// The request's `:authority`, else its `Host` header.
    host: Option<HeaderValue>,
    target: Option<PathAndQuery>,
}

impl LogLine {
    fn of(req: &Request<Incoming>) -> Self {
        let host = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .or_else(|| req.headers().get(header::HOST).cloned());
        LogLine {
            method: req.method().clone(),
            host,
            target: req.uri().path_and_query().cloned(),
        }
    }

    /// The host asked for, if it is text.
    fn host(&self) -> Option<&str> {
        self.host.as_ref().and_then(|v| v.to_str().ok())
    }

    /// The request target (path and query).
    fn path_and_query(&self) -> &str {
        self.target.as_ref().map_or("/", PathAndQuery::as_str)
    }

    /// The path without the query.
    fn path(&self) -> &str {
        self.target.as_ref().map_or("/", PathAndQuery::path)
    }
}

/// Attempts per request (the first and at most two retries on other endpoints).
const MAX_ATTEMPTS: usize = 3;

/// A request to an endpoint (its target is set per attempt).
fn upstream_request(
    method: Method,
    headers: hyper::HeaderMap,
    body: ProxyBody,
    version: Version,
) -> Request<ProxyBody> {
    let mut up = Request::new(body);
    *up.method_mut() = method;
    *up.version_mut() = version;
    *up.headers_mut() = headers;
    up
}

/// Joins the client's and the endpoint's connections once both switched protocols.
fn pass_upgrade(client: hyper::upgrade::OnUpgrade, resp: &mut Response<Incoming>) {
    let upstream = hyper::upgrade::on(resp);
    tokio::spawn(async move {
        if let (Ok(a), Ok(b)) = tokio::join!(client, upstream) {
            let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
            let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
        }
    });
}

/// An IPv4 peer seen through an IPv6 socket is reported as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn empty() -> ProxyBody {
    Empty::new().map_err(|e| match e {}).boxed()
}

/// A short plain-text answer made by the ingress itself.
fn short(status: StatusCode, why: &str) -> Response<ProxyBody> {
    let body = format!("{} {why}\n", status.as_u16());
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        header::HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// Access log sampling: the first `per_sec` lines of each second are written, the rest
/// counted.
struct AccessLog {
    per_sec: u64,
    second: AtomicU64,
    count: AtomicU64,
    start: Instant,
}

impl AccessLog {
    fn new(per_sec: u64) -> Self {
        AccessLog {
            per_sec,
            second: AtomicU64::new(0),
            count: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    fn admit(&self) -> bool {
        let now = self.start.elapsed().as_secs();
        // Reads only, once the second's lines are used up: no cache line shared between
        // the workers is written per request.
        if self.second.load(Ordering::Relaxed) != now
            && self.second.swap(now, Ordering::Relaxed) != now
        {
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.load(Ordering::Relaxed) >= self.per_sec {
            return false;
        }
        self.count.fetch_add(1, Ordering::Relaxed) < self.per_sec
    }
}

/// Binds a listener (errors name the address and the flag); `SO_REUSEPORT`, so each worker
/// thread has its own and the kernel spreads connections over them. With `v6only` an IPv6
/// listener takes IPv6 only (`IPV6_V6ONLY`), so `0.0.0.0:80` and `[::]:80` bind side by
/// side; without it `[::]:80` alone takes both families, as before.
pub fn bind(addr: SocketAddr, flag: &str, v6only: bool) -> Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .with_context(|| format!("{flag}: cannot open a socket for {addr}"))?;
    if addr.is_ipv6() && v6only {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())
        .with_context(|| format!("{flag}: cannot listen on {addr}"))?;
    s.listen(4096)?;
    Ok(s.into())
}

#[cfg(test)]
mod loopback_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_samples_past_its_rate() {
        let l = AccessLog::new(3);
        let admitted = (0..10).filter(|_| l.admit()).count();
        assert_eq!(admitted, 3);
    }

    #[test]
    fn short_answers_are_plain_text() {
        let r = short(StatusCode::NOT_FOUND, "no route");
        assert_eq!(r.status(), 404);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
    }

    #[test]
    fn idle_time_counts_from_the_last_request_end_and_never_during_one() {
        let a = Arc::new(ConnActivity::new());
        let idle = Duration::from_secs(60);
        // Never used: idle from the moment it opened.
        assert_eq!(a.idle_deadline(idle), a.opened + idle);
        let first = a.begin();
        let second = a.begin();
        // In flight: the deadline keeps moving (checked again later).
        let before = Instant::now();
        assert!(a.idle_deadline(idle) >= before + idle);
        drop(first);
        assert!(
            a.idle_deadline(idle) >= before + idle,
            "one is still in flight"
        );
        std::thread::sleep(Duration::from_millis(5));
        drop(second);
        // Both done: idle from when the last one ended.
        let deadline = a.idle_deadline(idle);
        assert!(
            deadline >= a.opened + idle + Duration::from_millis(5),
            "{deadline:?}"
        );
        assert!(deadline <= Instant::now() + idle);
        // A body dropped unsent ends its request too.
        let body = Tracked {
            body: empty(),
            _guard: a.begin(),
        };
        let before = Instant::now();
        assert!(a.idle_deadline(idle) >= before + idle);
        drop(body);
        assert_eq!(a.inflight.load(Ordering::Acquire), 0);
    }

    #[test]
    fn mapped_peers_are_reported_as_ipv4() {
        let ip: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(canonical(ip).to_string(), "192.0.2.1");
    }
}
