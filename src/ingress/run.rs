//! `tartan-ingress`'s wiring: one etcd watch per prefix (routes, certificates, and the
//! service/pod/endpoint records the proxy and DNS read too), each change applied where it
//! belongs, one route or one certificate at a time (nothing is re-read or rebuilt whole);
//! the listeners; the admin server (`/metrics`, `/healthz`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use ipnetwork::IpNetwork;
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{error, info, warn};

use crate::ingress::backends::Backends;
use crate::ingress::balance::Policy;
use crate::ingress::metrics::IngressMetrics;
use crate::ingress::proxy::{Proxy, ProxyConfig, bind};
use crate::ingress::tls::{CertStore, certified_key, server_config};
use crate::model::DecodeError;
use crate::model::ingress::{IngressCert, IngressRoute};
use crate::model::service::AddressGuard;
use crate::store::etcd::{Change, EtcdArgs, KvItem, ReflectorEvent, Store};
use crate::store::keys::{ingress_certs_prefix, ingress_routes_prefix};
use crate::store::records::{Feeds, ModelChange, RecordSink, apply_feeds};
use crate::util::rate_limited::RateLimited;

/// `tartan-ingress`'s flags.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "tartan-ingress",
    version,
    about = "tartan's HTTP(S) ingress: routes requests by host and path to services' pods"
)]
pub struct IngressArgs {
    /// etcd connection.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Plain HTTP listen addresses (HTTP/1.1, and HTTP/2 by prior knowledge); by default
    /// every IPv4 and IPv6 address of the node (the IPv6 one is left out, with a warning, on
    /// a kernel without IPv6).
    #[arg(
        long = "http-listen",
        default_value = "0.0.0.0:80,[::]:80",
        value_delimiter = ','
    )]
    pub http_listen: Vec<SocketAddr>,
    /// TLS listen addresses (empty: no TLS).
    #[arg(long = "https-listen", value_delimiter = ',')]
    pub https_listen: Vec<SocketAddr>,
    /// Certificate chain (PEM) served when no certificate in etcd matches the SNI name.
    #[arg(long = "tls-cert", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Its private key (PEM).
    #[arg(long = "tls-key", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Networks whose X-Forwarded-*/Forwarded headers are believed (comma list).
    #[arg(long = "trusted-proxies", value_delimiter = ',')]
    pub trusted_proxies: Vec<IpNetwork>,
    /// Admin listener: /metrics and /healthz.
    #[arg(long = "admin-addr", default_value = "127.0.0.1:9403")]
    pub admin_addr: SocketAddr,
    /// Largest request head in bytes.
    #[arg(long = "max-header-bytes", default_value_t = 32 * 1024)]
    pub max_header_bytes: usize,
    /// Most request headers.
    #[arg(long = "max-headers", default_value_t = 100)]
    pub max_headers: usize,
    /// Largest request body in bytes (larger: 413).
    #[arg(long = "max-body-bytes", default_value_t = 16 << 20)]
    pub max_body_bytes: u64,
    /// Seconds a client has to send a request head (also an idle HTTP/1 connection's life).
    #[arg(long = "header-timeout-secs", default_value_t = 10)]
    pub header_timeout_secs: u64,
    /// Seconds a client connection may stay without a request in flight before it is closed
    /// gracefully (HTTP/2: GOAWAY; kept-alive HTTP/1 connections close at the header timeout).
    #[arg(long = "idle-timeout-secs", default_value_t = 60)]
    pub idle_timeout_secs: u64,
    /// Client connections open at once.
    #[arg(long = "max-connections", default_value_t = 16_384)]
    pub max_connections: usize,
    /// Requests in flight per route (more: 503).
    #[arg(long = "max-inflight-per-route", default_value_t = 4096)]
    pub max_inflight_per_route: usize,
    /// Connect timeout to an endpoint, in milliseconds.
    #[arg(long = "connect-timeout-ms", default_value_t = 2000)]
    pub connect_timeout_ms: u64,
    /// Seconds an endpoint has to answer with its response head.
    #[arg(long = "upstream-timeout-secs", default_value_t = 60)]
    pub upstream_timeout_secs: u64,
    /// Seconds an endpoint whose connects fail is left out.
    #[arg(long = "eject-secs", default_value_t = 10)]
    pub eject_secs: u64,
    /// How an endpoint is chosen per request.
    #[arg(long = "balance", value_enum, default_value_t)]
    pub balance: Policy,
    /// Access log lines per second before sampling.
    #[arg(long = "access-log-per-sec", default_value_t = 50)]
    pub access_log_per_sec: u64,
    /// Worker threads, each serving connections start to end (default: one per core).
    #[arg(long = "workers")]
    pub workers: Option<usize>,
    /// The cluster's service CIDR: explicit endpoints inside it (virtual addresses) are
    /// never sent to, as tartand never programs them.
    #[arg(
        long = "service-cidr",
        env = "TARTAN_SERVICE_CIDR",
        default_value = "10.96.0.0/12"
    )]
    pub service_cidr: ipnetwork::Ipv4Network,
}

impl IngressArgs {
    /// Which explicit endpoints may be sent to: the checks tartand applies to its service
    /// table (never loopback, unspecified, multicast or reserved addresses, this host's own
    /// addresses, an etcd endpoint, or an address of the service CIDR).
    pub fn endpoint_guard(&self) -> AddressGuard {
        AddressGuard {
            node_ips: local_ipv4s(),
            etcd: self.etcd.endpoint_addrs(),
            ..AddressGuard::new(self.service_cidr)
        }
    }

    /// The proxy's limits from the flags.
    pub fn proxy_config(&self) -> ProxyConfig {
        ProxyConfig {
            trusted_proxies: self.trusted_proxies.clone(),
            max_header_bytes: self.max_header_bytes,
            max_headers: self.max_headers,
            max_body_bytes: self.max_body_bytes,
            header_timeout: Duration::from_secs(self.header_timeout_secs.max(1)),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs.max(1)),
            max_connections: self.max_connections.max(1),
            max_inflight_per_route: self.max_inflight_per_route.max(1),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms.max(1)),
            upstream_timeout: Duration::from_secs(self.upstream_timeout_secs.max(1)),
            eject_for: Duration::from_secs(self.eject_secs),
            policy: self.balance,
            access_log_per_sec: self.access_log_per_sec,
        }
    }
}

/// Runs the ingress until SIGINT/SIGTERM.
pub async fn run(args: IngressArgs) -> Result<()> {
    let metrics = IngressMetrics::new();
    let certs = Arc::new(CertStore::new());
    if let (Some(c), Some(k)) = (&args.tls_cert, &args.tls_key) {
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))
        };
        let key = certified_key(&read(c)?, &read(k)?)
            .with_context(|| format!("--tls-cert {} / --tls-key {}", c.display(), k.display()))?;
        certs.set_default(key);
    }
    // Listeners first (one per worker and address, SO_REUSEPORT): a port another program
    // holds is an error at once, before etcd is asked anything. (A second tartan-ingress of
    // the same user on the same port would share it, as a second nginx with reuseport does.)
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let default_http = args.http_listen == default_http_listen();
    let mut listeners = Vec::new();
    for _ in 0..workers {
        let mut mine = Vec::new();
        for a in &args.http_listen {
            if let Some(l) =
                bind_unless_no_ipv6(*a, &args.http_listen, "--http-listen", default_http)?
            {
                mine.push((l, false));
            }
        }
        for a in &args.https_listen {
            let v6only = beside_ipv4(*a, &args.https_listen);
            mine.push((bind(*a, "--https-listen", v6only)?, true));
        }
        listeners.push(mine);
    }
    let store = Store::connect(&args.etcd).await?;
    let backends = Backends::with_guard(args.endpoint_guard());
    let proxy = Arc::new(Proxy::new(
        args.proxy_config(),
        backends.targets(),
        metrics.clone(),
    ));
    let ready = Readiness::default();
    // The records every reader decodes the same way.
    {
        // On a thread of its own: a pod that joins a thousand services recomputes each of
        // them, which must not hold up the request workers.
        let feeds = Feeds::watch(&store, &args.etcd);
        let (etcd, proxy, ready) = (args.etcd.clone(), proxy.clone(), ready.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the records thread's runtime")?;
        std::thread::Builder::new()
            .name("ingress-records".into())
            .spawn(move || {
                rt.block_on(async move {
                    let mut sink = BackendSink {
                        backends,
                        proxy,
                        ready,
                        last_gc: Instant::now(),
                    };
                    apply_feeds(feeds, &etcd, &mut sink).await;
                    error!("the service record feeds ended; endpoints stay as they were");
                })
            })
            .context("cannot start the records thread")?;
    }
    {
        let rx = store.reflect(&ingress_routes_prefix(&args.etcd));
        let prefix = ingress_routes_prefix(&args.etcd);
        let (proxy, ready) = (proxy.clone(), ready.clone());
        tokio::spawn(async move { watch_routes(rx, prefix, proxy, ready).await });
    }
    {
        let rx = store.reflect(&ingress_certs_prefix(&args.etcd));
        let prefix = ingress_certs_prefix(&args.etcd);
        let (certs, metrics) = (certs.clone(), metrics.clone());
        tokio::spawn(async move { watch_certs(rx, prefix, certs, metrics).await });
    }
    let acceptor = if args.https_listen.is_empty() {
        None
    } else {
        Some(tokio_rustls::TlsAcceptor::from(server_config(
            certs.clone(),
        )?))
    };
    // One thread per worker, each with its own runtime, listeners and endpoint pools (as
    // nginx's worker processes): a request is served start to end on one thread.
    for (w, mine) in listeners.into_iter().enumerate() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start a worker runtime")?;
        let (proxy, acceptor) = (proxy.clone(), acceptor.clone());
        std::thread::Builder::new()
            .name(format!("ingress-{w}"))
            .spawn(move || {
                rt.block_on(async move {
                    for (l, tls) in mine {
                        let acc = if tls { acceptor.clone() } else { None };
                        tokio::spawn(proxy.clone().serve(l, acc));
                    }
                    std::future::pending::<()>().await;
                })
            })
            .context("cannot start a worker thread")?;
    }
    serve_admin(args.admin_addr, metrics.clone(), ready.clone()).await?;
    info!(
        http = ?args.http_listen,
        https = ?args.https_listen,
        workers,
        "tartan-ingress serving"
    );
    crate::util::shutdown::shutdown_signal().await;
    info!("tartan-ingress stopping");
    Ok(())
}

/// Whether the route table and the service records were listed once (before that, requests
/// get 503, not a 404 that would be wrong).
#[derive(Clone, Default)]
struct Readiness {
    routes: Arc<AtomicBool>,
    records: Arc<AtomicBool>,
}

impl Readiness {
    fn ready(&self) -> bool {
        self.routes.load(Ordering::Acquire) && self.records.load(Ordering::Acquire)
    }

    /// Opens the proxy once both were listed.
    fn update(&self, proxy: &Proxy) {
        if self.ready() {
            proxy.set_ready();
        }
    }
}

/// The backends model, with the proxy's bookkeeping after each batch.
struct BackendSink {
    backends: Backends,
    proxy: Arc<Proxy>,
    ready: Readiness,
    last_gc: Instant,
}

impl RecordSink for BackendSink {
    fn change(&mut self, c: ModelChange) {
        self.proxy.metrics.changes.inc();
        self.backends.change(c);
    }

    fn held(&self) -> (Vec<String>, Vec<String>, Vec<String>) {
        self.backends.held()
    }

    fn skipped(&mut self, key: &str, e: &DecodeError) {
        self.backends.skipped(key, e);
    }

    fn settled(&mut self, listed: bool, started: Instant) {
        self.backends.settled(listed, started);
        if listed && !self.ready.records.swap(true, Ordering::AcqRel) {
            info!(
                services = self.proxy.targets.len(),
                "service records loaded"
            );
            self.ready.update(&self.proxy);
        }
        if self.last_gc.elapsed() > Duration::from_secs(30) {
            self.last_gc = Instant::now();
            self.proxy.forget_gone_endpoints();
        }
    }
}

/// The part of `key` after `prefix` (a record's name).
/// Whether the IPv6 listener `a` has an IPv4 one on its port in `list` (then it takes IPv6
/// only, so both bind; alone, `[::]:PORT` serves both families).
fn beside_ipv4(a: SocketAddr, list: &[SocketAddr]) -> bool {
    a.is_ipv6() && list.iter().any(|b| b.is_ipv4() && b.port() == a.port())
}

/// `--http-listen`'s default: every IPv4 and every IPv6 address, port 80.
fn default_http_listen() -> Vec<SocketAddr> {
    vec![
        SocketAddr::from(([0, 0, 0, 0], 80)),
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 80)),
    ]
}

/// [`bind`], except that the default IPv6 listener is left out (with a warning) on a kernel
/// without IPv6 (`EAFNOSUPPORT`); an address the operator gave must bind.
fn bind_unless_no_ipv6(
    a: SocketAddr,
    list: &[SocketAddr],
    flag: &str,
    is_default: bool,
) -> Result<Option<std::net::TcpListener>> {
    match bind(a, flag, beside_ipv4(a, list)) {
        Ok(l) => Ok(Some(l)),
        Err(e)
            if is_default
                && a.is_ipv6()
                && e.chain().any(|c| {
                    c.downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.raw_os_error() == Some(nix::libc::EAFNOSUPPORT))
                }) =>
        {
            warn!(address = %a, "this kernel has no IPv6: serving IPv4 only");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn name_of<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
    key.strip_prefix(prefix)
        .filter(|n| !n.is_empty() && !n.contains('/'))
}

/// The names in `held` that a (re)listing of `prefix` no longer has.
fn gone_after_listing(items: &[KvItem], prefix: &str, held: Vec<String>) -> Vec<String> {
    let fresh: std::collections::HashSet<&str> = items
        .iter()
        .filter_map(|i| name_of(&i.key, prefix))
        .collect();
    held.into_iter()
        .filter(|n| !fresh.contains(n.as_str()))
        .collect()
}

/// Applies route records to the proxy's table one at a time.
async fn watch_routes(
    mut rx: UnboundedReceiver<ReflectorEvent>,
    prefix: String,
    proxy: Arc<Proxy>,
    ready: Readiness,
) {
    let log = RateLimited::new(Duration::from_secs(10));
    let put = |it: &KvItem| -> Result<IngressRoute, String> {
        let name = name_of(&it.key, &prefix).ok_or("not <prefix>/<name>")?;
        let r = IngressRoute::parse(&it.value).map_err(|e| e.to_string())?;
        if r.name != name {
            return Err(format!("names route {:?}", r.name));
        }
        Ok(r)
    };
    while let Some(ev) = rx.recv().await {
        let mut table = proxy.routes.write().unwrap_or_else(|e| e.into_inner());
        match ev {
            ReflectorEvent::Reset { items, .. } => {
                let held: Vec<String> = table.routes().map(|r| r.name.clone()).collect();
                for n in gone_after_listing(&items, &prefix, held) {
                    table.remove(&n);
                }
                for it in &items {
                    apply_route(&mut table, put(it), &it.key, &log);
                }
                if !ready.routes.swap(true, Ordering::AcqRel) {
                    info!(routes = table.len(), "ingress routes loaded");
                    ready.update(&proxy);
                }
            }
            ReflectorEvent::Changes { changes, .. } => {
                for c in changes {
                    match c {
                        Change::Put(it) => apply_route(&mut table, put(&it), &it.key, &log),
                        Change::Delete(k) => {
                            if let Some(n) = name_of(&k, &prefix) {
                                table.remove(n);
                            }
                        }
                    }
                    proxy.metrics.changes.inc();
                }
            }
        }
        proxy.metrics.routes.set(table.len() as i64);
    }
    error!("the ingress route watch ended; routes stay as they were");
}

fn apply_route(
    table: &mut crate::ingress::routes::RouteTable,
    r: Result<IngressRoute, String>,
    key: &str,
    log: &RateLimited,
) {
    match r.and_then(|r| table.upsert(r).map_err(|e| e.to_string())) {
        Ok(_) => {}
        // The table keeps what it had for this name: a bad write never removes a route.
        Err(e) => log.warn(&format!("ingress route {key} skipped: {e}")),
    }
}

/// Applies certificate records to the store one at a time.
async fn watch_certs(
    mut rx: UnboundedReceiver<ReflectorEvent>,
    prefix: String,
    certs: Arc<CertStore>,
    metrics: Arc<IngressMetrics>,
) {
    let put = |it: &KvItem| {
        let r = IngressCert::parse(&it.value)
            .map_err(anyhow::Error::from)
            .and_then(|c| certs.put(&c));
        if let Err(e) = r {
            warn!("ingress certificate {} skipped: {e:#}", it.key);
        }
    };
    while let Some(ev) = rx.recv().await {
        match ev {
            ReflectorEvent::Reset { items, .. } => {
                for n in gone_after_listing(&items, &prefix, certs.names()) {
                    certs.remove(&n);
                }
                items.iter().for_each(put);
            }
            ReflectorEvent::Changes { changes, .. } => {
                for c in changes {
                    match c {
                        Change::Put(it) => put(&it),
                        Change::Delete(k) => {
                            if let Some(n) = name_of(&k, &prefix) {
                                certs.remove(n);
                            }
                        }
                    }
                    metrics.changes.inc();
                }
            }
        }
    }
}

async fn serve_admin(
    addr: SocketAddr,
    metrics: Arc<IngressMetrics>,
    ready: Readiness,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--admin-addr: cannot listen on {addr}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let (m, ready) = (metrics.clone(), ready.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (m, ready) = (m.clone(), ready.clone());
                    async move {
                        let (code, body) = match req.uri().path() {
                            "/metrics" => (StatusCode::OK, m.render()),
                            "/healthz" if ready.ready() => (StatusCode::OK, "ok\n".into()),
                            "/healthz" => (StatusCode::SERVICE_UNAVAILABLE, "starting\n".into()),
                            _ => (StatusCode::NOT_FOUND, "not found\n".into()),
                        };
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        *r.status_mut() = code;
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}

/// The IPv4 addresses of this host's interfaces (in the ingress's network namespace).
fn local_ipv4s() -> Vec<std::net::Ipv4Addr> {
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => addrs
            .filter_map(|i| i.address?.as_sockaddr_in().map(|a| a.ip()))
            .collect(),
        Err(e) => {
            warn!(
                "cannot list this host's addresses (explicit endpoints are checked without them): {e}"
            );
            Vec::new()
        }
    }
}
