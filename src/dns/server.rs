//! The sockets of the cluster DNS, on threads of their own so that a query flood competes
//! only with itself: blocking UDP worker threads, and one thread with a small tokio runtime
//! for TCP and the upstream forwarder. By default the workers share one UDP socket per
//! address (the kernel hands each datagram to one waiting worker, so any idle worker takes
//! the next query); `UdpSockets::PerWorker` gives each its own `SO_REUSEPORT` socket, where
//! the kernel pins each client address to one worker by hash. Every limit is fixed at
//! start: worker count, TCP connections, forward queue, queries in flight upstream.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tracing::warn;

use crate::dns::answer::{Authority, Outcome, Reply, Transport, answer};
use crate::dns::answer_cache::AnswerCache;
use crate::dns::forward::{Forwarder, ForwarderConfig, ReplyTo};
use crate::dns::zone::Zone;
use crate::metrics::{DNS_RCODES, DNS_TYPES, DnsMetrics};
use crate::util::rate_limited::RateLimited;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Addresses to answer on (UDP and TCP), e.g. `10.96.0.10:53`.
    pub listen: Vec<SocketAddr>,
    /// UDP worker threads per address.
    pub udp_threads: usize,
    /// Whether the UDP workers of an address share its socket.
    pub udp_sockets: UdpSockets,
    /// TCP connections open at once (more are closed at accept).
    pub max_tcp: usize,
    /// A TCP connection idle this long is closed.
    pub tcp_idle: Duration,
    /// Zone answers kept encoded, over all UDP workers (`dns::answer_cache`; 0 = off).
    pub answer_cache: usize,
    /// The forwarder's settings.
    pub forward: ForwarderConfig,
}

impl ServerConfig {
    /// Defaults for `listen` and `upstreams`.
    pub fn new(listen: Vec<SocketAddr>, upstreams: Vec<SocketAddr>) -> Self {
        ServerConfig {
            listen,
            udp_threads: std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
            udp_sockets: UdpSockets::Shared,
            max_tcp: 256,
            tcp_idle: Duration::from_secs(10),
            // About 200 bytes each: at most ~13 MiB, enough for every distinct question of a
            // busy cluster between two changes.
            answer_cache: 65_536,
            forward: ForwarderConfig::new(upstreams),
        }
    }
}

/// How the UDP workers of one address get their datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpSockets {
    /// One socket, read by every worker: a query waits only if all workers are busy. With few
    /// clients (a node's pods behind one resolver library, or a benchmark's two sockets) this
    /// keeps the tail short where hashing could put every client on one worker.
    Shared,
    /// One `SO_REUSEPORT` socket per worker: no shared receive queue, but each client address
    /// always lands on the same worker.
    PerWorker,
}

/// A running server; dropping it stops every thread (within about half a second).
pub struct DnsServer {
    forwarder: Forwarder,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    rt_stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl DnsServer {
    /// The forwarder (its cache and upstreams, for status and lookups).
    pub fn forwarder(&self) -> &Forwarder {
        &self.forwarder
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(tx) = self.rt_stop.take() {
            let _ = tx.send(());
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Everything a worker needs to answer.
struct Shared {
    zone: Arc<Zone>,
    auth: Authority,
    metrics: DnsMetrics,
    log: RateLimited,
    /// Entries of each UDP worker's answer cache.
    answer_cache_entries: usize,
}

/// Binds every socket (errors name the address), then starts the threads.
pub fn start(
    zone: Arc<Zone>,
    auth: Authority,
    cfg: ServerConfig,
    metrics: DnsMetrics,
) -> Result<DnsServer> {
    let shared = Arc::new(Shared {
        zone,
        auth,
        metrics,
        log: RateLimited::new(Duration::from_secs(10)),
        answer_cache_entries: cfg.answer_cache / cfg.udp_threads.max(1) / cfg.listen.len().max(1),
    });
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    for addr in &cfg.listen {
        let bind = || -> Result<UdpSocket> {
            bind_udp(*addr, cfg.udp_sockets == UdpSockets::PerWorker)
                .with_context(|| format!("cannot bind DNS on udp {addr}"))
        };
        let first = bind()?;
        for _ in 1..cfg.udp_threads.max(1) {
            udp.push(match cfg.udp_sockets {
                UdpSockets::Shared => first
                    .try_clone()
                    .with_context(|| format!("cannot share the DNS socket on udp {addr}"))?,
                UdpSockets::PerWorker => bind()?,
            });
        }
        udp.push(first);
        tcp.push(bind_tcp(*addr).with_context(|| format!("cannot bind DNS on tcp {addr}"))?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (rt_stop, rt_stopped) = tokio::sync::oneshot::channel();
    let (fwd, fwd_task) = Forwarder::new(cfg.forward.clone(), shared.metrics.clone(), &cfg.listen);
    let mut threads = Vec::new();
    {
        let shared = shared.clone();
        let cfg = cfg.clone();
        let fwd = fwd.clone();
        threads.push(
            std::thread::Builder::new()
                .name("dns-tcp-fwd".into())
                .spawn(move || run_async_side(shared, cfg, tcp, fwd, fwd_task, rt_stopped))
                .context("cannot start the DNS TCP thread")?,
        );
    }
    for (i, sock) in udp.into_iter().enumerate() {
        let shared = shared.clone();
        let stop = stop.clone();
        let fwd = fwd.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || udp_worker(i, sock, shared, fwd, stop))
                .context("cannot start a DNS UDP thread")?,
        );
    }
    Ok(DnsServer {
        forwarder: fwd,
        stop,
        threads,
        rt_stop: Some(rt_stop),
    })
}

fn bind_udp(addr: SocketAddr, reuse_port: bool) -> Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(reuse_port)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    // Room for bursts: queries wait in the kernel, not in our memory.
    let _ = s.set_recv_buffer_size(4 << 20);
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn bind_tcp(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Index of a query type in [`DNS_TYPES`].
fn type_index(t: Option<RecordType>) -> usize {
    match t {
        Some(RecordType::A) => 0,
        Some(RecordType::AAAA) => 1,
        Some(RecordType::SRV) => 2,
        Some(RecordType::PTR) => 3,
        Some(RecordType::SOA) => 4,
        Some(RecordType::NS) => 5,
        Some(RecordType::ANY) => 6,
        _ => DNS_TYPES.len() - 1,
    }
}

/// Index of a response code in [`DNS_RCODES`].
pub fn rcode_index(r: ResponseCode) -> usize {
    match r {
        ResponseCode::NoError => 0,
        ResponseCode::NXDomain => 1,
        ResponseCode::ServFail => 2,
        ResponseCode::FormErr => 3,
        ResponseCode::Refused => 4,
        ResponseCode::NotImp => 5,
        _ => DNS_RCODES.len() - 1,
    }
}

impl Shared {
    fn count(&self, transport: Transport, reply: &Reply) {
        self.count_parts(transport, reply.qtype, reply.rcode);
    }

    fn count_parts(&self, transport: Transport, qtype: Option<RecordType>, rcode: ResponseCode) {
        let p = usize::from(transport == Transport::Tcp);
        self.metrics.requests[p][type_index(qtype)].inc();
        self.metrics.responses[rcode_index(rcode)].inc();
        if rcode == ResponseCode::FormErr {
            self.log
                .warn("answered FORMERR to a query that does not decode");
        }
    }
}

/// Datagrams one worker takes from (and answers to) the kernel per system call.
const BATCH: usize = 32;
/// Receive buffer per datagram: larger than any EDNS query we accept (a longer datagram is
/// cut and fails to decode).
const QUERY_MAX: usize = 2048;

fn udp_worker(
    i: usize,
    sock: UdpSocket,
    shared: Arc<Shared>,
    fwd: Forwarder,
    stop: Arc<AtomicBool>,
) {
    use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};
    use std::io::{IoSlice, IoSliceMut};
    use std::os::fd::AsRawFd;

    let sock = Arc::new(sock);
    let fd = sock.as_raw_fd();
    let hist = shared
        .metrics
        .request_duration
        .get_or_create(&[("server", format!("udp-{i}"))])
        .clone();
    let mut bufs = vec![[0u8; QUERY_MAX]; BATCH];
    let mut rx_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut tx_headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut got: Vec<(usize, SockaddrStorage)> = Vec::with_capacity(BATCH);
    // Response buffers are kept from batch to batch (no allocation for a cached answer).
    let mut outs: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(512)).collect();
    let mut dests: Vec<Option<SockaddrStorage>> = Vec::with_capacity(BATCH);
    let mut cache = AnswerCache::new(shared.answer_cache_entries);
    while !stop.load(Ordering::Acquire) {
        got.clear();
        {
            let mut iovs: Vec<[IoSliceMut<'_>; 1]> =
                bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
            // Blocks (up to the socket's read timeout) for the first datagram, then takes
            // whatever else is already queued.
            match recvmmsg(
                fd,
                &mut rx_headers,
                iovs.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            ) {
                Ok(msgs) => {
                    for m in msgs {
                        if let Some(a) = m.address {
                            got.push((m.bytes, a));
                        }
                    }
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    shared.log.warn(&format!("DNS udp receive failed: {e}"));
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
        }
        let t0 = Instant::now();
        // Read before answering: an answer made from a newer zone is stored under an older
        // generation and is only ever a miss.
        let generation = shared.zone.generation();
        dests.clear();
        for (k, (n, addr)) in got.iter().enumerate() {
            let query = &bufs[k][..(*n).min(QUERY_MAX)];
            let out = &mut outs[dests.len()];
            if let Some(hit) = cache.get(query, generation, out) {
                shared.count_parts(Transport::Udp, Some(hit.qtype), hit.rcode);
                dests.push(Some(*addr));
                continue;
            }
            match answer(&shared.zone, &shared.auth, query, Transport::Udp) {
                Outcome::Reply(r) => {
                    shared.count(Transport::Udp, &r);
                    cache.put(query, generation, &r.bytes, r.rcode, r.qtype, r.truncated);
                    *out = r.bytes;
                    dests.push(Some(*addr));
                }
                Outcome::Forward(msg) => {
                    let qtype = msg.queries.first().map(|q| q.query_type());
                    shared.metrics.requests[0][type_index(qtype)].inc();
                    let peer = addr
                        .as_sockaddr_in()
                        .map(|a| SocketAddr::from((a.ip(), a.port())))
                        .or_else(|| {
                            addr.as_sockaddr_in6()
                                .map(|a| SocketAddr::from((a.ip(), a.port())))
                        });
                    if let Some(peer) = peer {
                        fwd.submit(msg, Transport::Udp, ReplyTo::Udp(sock.clone(), peer));
                    }
                }
                Outcome::Drop => {}
            }
        }
        if !dests.is_empty() {
            let slices: Vec<[IoSlice<'_>; 1]> = outs[..dests.len()]
                .iter()
                .map(|b| [IoSlice::new(b)])
                .collect();
            let _ = sendmmsg(
                fd,
                &mut tx_headers,
                slices.iter(),
                &dests,
                [],
                MsgFlags::empty(),
            );
            // One duration per batch: the time its answers took, recorded for each of them.
            let secs = t0.elapsed().as_secs_f64();
            for _ in 0..dests.len() {
                hist.observe(secs);
            }
        }
    }
}

fn run_async_side(
    shared: Arc<Shared>,
    cfg: ServerConfig,
    listeners: Vec<std::net::TcpListener>,
    fwd: Forwarder,
    fwd_task: crate::dns::forward::ForwarderTask,
    stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            warn!("cannot start the DNS TCP runtime: {e}; DNS over TCP and forwarding are off");
            return;
        }
    };
    rt.block_on(async move {
        tokio::spawn(fwd_task.run());
        let limit = Arc::new(Semaphore::new(cfg.max_tcp));
        for l in listeners {
            let Ok(l) = tokio::net::TcpListener::from_std(l) else {
                continue;
            };
            let (shared, fwd, limit) = (shared.clone(), fwd.clone(), limit.clone());
            let idle = cfg.tcp_idle;
            tokio::spawn(async move {
                loop {
                    let Ok((conn, _)) = l.accept().await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        shared.metrics.overload.inc();
                        shared
                            .log
                            .warn("DNS TCP connection limit reached; closing new connections");
                        continue;
                    };
                    let (shared, fwd) = (shared.clone(), fwd.clone());
                    tokio::spawn(async move {
                        tcp_conn(conn, &shared, &fwd, idle).await;
                        drop(permit);
                    });
                }
            });
        }
        let _ = stopped.await;
    });
}

/// Answers length-prefixed queries on one connection, in order, until it goes idle.
async fn tcp_conn(
    mut conn: tokio::net::TcpStream,
    shared: &Shared,
    fwd: &Forwarder,
    idle: Duration,
) {
    let hist = shared
        .metrics
        .request_duration
        .get_or_create(&[("server", "tcp".to_string())])
        .clone();
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(idle, conn.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let n = usize::from(u16::from_be_bytes(len));
        let mut buf = vec![0u8; n];
        match tokio::time::timeout(idle, conn.read_exact(&mut buf)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let t0 = Instant::now();
        let reply = match answer(&shared.zone, &shared.auth, &buf, Transport::Tcp) {
            Outcome::Reply(r) => {
                shared.count(Transport::Tcp, &r);
                r.bytes
            }
            Outcome::Forward(msg) => {
                let qtype = msg.queries.first().map(|q| q.query_type());
                shared.metrics.requests[1][type_index(qtype)].inc();
                let (tx, rx) = tokio::sync::oneshot::channel();
                fwd.submit(msg, Transport::Tcp, ReplyTo::Tcp(tx));
                match rx.await {
                    Ok(b) => b,
                    Err(_) => return,
                }
            }
            Outcome::Drop => return,
        };
        let Ok(rlen) = u16::try_from(reply.len()) else {
            return;
        };
        let mut out = Vec::with_capacity(reply.len() + 2);
        out.extend_from_slice(&rlen.to_be_bytes());
        out.extend_from_slice(&reply);
        if conn.write_all(&out).await.is_err() {
            return;
        }
        hist.observe(t0.elapsed().as_secs_f64());
    }
}
