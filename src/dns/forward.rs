//! Names outside the cluster zone go to the node's upstream resolvers (from
//! `/etc/resolv.conf` or `--dns-upstream`), UDP first and TCP when the answer is truncated,
//! with a bounded cache that keeps each answer for its TTL.
//!
//! Bounded everywhere: the queue from the UDP threads (full → SERVFAIL at once), the
//! questions in flight upstream (identical questions share one upstream query, so a
//! forwarding loop cannot multiply), the cache (least recently used goes first). A loop is
//! also looked for at start, as CoreDNS's `loop` plugin does: a random name is sent to each
//! upstream, and an upstream whose probe comes back to this server is not used.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, LowerName, Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{error, info};

use crate::dns::answer::{EDNS_PAYLOAD, Transport, size_limit};
use crate::metrics::DnsMetrics;
use crate::util::rate_limited::RateLimited;

/// The forwarder's limits and upstreams.
#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    /// Upstream resolvers, tried in turn.
    pub upstreams: Vec<SocketAddr>,
    /// How long one upstream gets to answer.
    pub timeout: Duration,
    /// Cached answers at most.
    pub cache_size: usize,
    /// Distinct questions in flight upstream at most.
    pub max_inflight: usize,
    /// Queries queued for the forwarder at most.
    pub queue: usize,
    /// Longest time an answer is cached, whatever its TTL.
    pub max_ttl: u32,
}

impl ForwarderConfig {
    /// Defaults for `upstreams`.
    pub fn new(upstreams: Vec<SocketAddr>) -> Self {
        ForwarderConfig {
            upstreams,
            timeout: Duration::from_secs(2),
            cache_size: 10_000,
            max_inflight: 1024,
            queue: 4096,
            max_ttl: 3600,
        }
    }
}

/// Where the answer to a forwarded query goes.
pub enum ReplyTo {
    /// Back out of the UDP socket it came in on.
    Udp(Arc<UdpSocket>, SocketAddr),
    /// To the TCP connection's task.
    Tcp(tokio::sync::oneshot::Sender<Vec<u8>>),
}

struct Job {
    msg: Box<Message>,
    transport: Transport,
    reply: ReplyTo,
}

/// The handle the server threads submit queries through.
#[derive(Clone)]
pub struct Forwarder {
    tx: mpsc::Sender<Job>,
    metrics: DnsMetrics,
    log: Arc<RateLimited>,
    state: Arc<Mutex<State>>,
}

type Key = (LowerName, RecordType, DNSClass);

struct Cached {
    msg: Message,
    stored: Instant,
    ttl: u32,
}

struct State {
    cache: lru::LruCache<Key, Cached>,
    inflight: HashMap<Key, Vec<(Box<Message>, Transport, ReplyTo)>>,
    upstreams: Vec<SocketAddr>,
    next: usize,
    probe: Option<(LowerName, bool)>,
}

/// The forwarder's task (run on the DNS thread's runtime).
pub struct ForwarderTask {
    rx: mpsc::Receiver<Job>,
    cfg: ForwarderConfig,
    state: Arc<Mutex<State>>,
    metrics: DnsMetrics,
    log: Arc<RateLimited>,
}

impl Forwarder {
    /// The handle and its task. Upstreams equal to one of `own` (our listen addresses)
    /// are dropped at once: they would be a loop.
    pub fn new(
        mut cfg: ForwarderConfig,
        metrics: DnsMetrics,
        own: &[SocketAddr],
    ) -> (Forwarder, ForwarderTask) {
        cfg.upstreams.retain(|u| {
            let looped = own.contains(u);
            if looped {
                error!(upstream = %u, "the cluster DNS address is listed as its own upstream (a forwarding loop); not using it");
            }
            !looped
        });
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        let log = Arc::new(RateLimited::new(Duration::from_secs(10)));
        let cap = NonZeroUsize::new(cfg.cache_size.max(1)).unwrap_or(NonZeroUsize::MIN);
        let state = Arc::new(Mutex::new(State {
            cache: lru::LruCache::new(cap),
            inflight: HashMap::new(),
            upstreams: cfg.upstreams.clone(),
            next: 0,
            probe: None,
        }));
        (
            Forwarder {
                tx,
                metrics: metrics.clone(),
                log: log.clone(),
                state: state.clone(),
            },
            ForwarderTask {
                rx,
                cfg,
                state,
                metrics,
                log,
            },
        )
    }

    /// Whether an unexpired answer to `q` is cached (`tartanctl dns lookup` says so).
    pub fn is_cached(&self, q: &Query) -> bool {
        let key: Key = (LowerName::new(q.name()), q.query_type(), q.query_class());
        lock(&self.state)
            .cache
            .peek(&key)
            .is_some_and(|c| c.stored.elapsed().as_secs() < u64::from(c.ttl))
    }

    /// The upstreams in use (after the loop checks).
    pub fn upstreams(&self) -> Vec<SocketAddr> {
        lock(&self.state).upstreams.clone()
    }

    /// Queues a query; when the queue is full, answers SERVFAIL at once.
    pub fn submit(&self, msg: Box<Message>, transport: Transport, reply: ReplyTo) {
        if let Err(e) = self.tx.try_send(Job {
            msg,
            transport,
            reply,
        }) {
            let job = match e {
                mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
            };
            self.metrics.overload.inc();
            self.log
                .warn("DNS forward queue full; answering SERVFAIL to forwarded names");
            fail(&job.msg, job.transport, job.reply);
        }
    }
}

/// Answers SERVFAIL to a query that will not be forwarded.
fn fail(msg: &Message, transport: Transport, to: ReplyTo) {
    send(to, crate::dns::answer::servfail(msg, transport).bytes);
}

fn send(to: ReplyTo, bytes: Vec<u8>) {
    match to {
        ReplyTo::Udp(sock, peer) => {
            let _ = sock.send_to(&bytes, peer);
        }
        ReplyTo::Tcp(tx) => {
            let _ = tx.send(bytes);
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl ForwarderTask {
    /// Probes the upstreams for loops, then forwards queries until every handle is gone.
    pub async fn run(mut self) {
        let probe_state = self.state.clone();
        let cfg = self.cfg.clone();
        tokio::spawn(async move { probe_loops(probe_state, cfg).await });
        while let Some(job) = self.rx.recv().await {
            self.handle(job);
        }
    }

    fn handle(&self, job: Job) {
        let Some(q) = job.msg.queries.first().cloned() else {
            return;
        };
        let key: Key = (LowerName::new(q.name()), q.query_type(), q.query_class());
        let mut st = lock(&self.state);
        if let Some((probe, seen)) = st.probe.as_mut()
            && *probe == key.0
        {
            *seen = true;
            drop(st);
            fail(&job.msg, job.transport, job.reply);
            return;
        }
        if st.upstreams.is_empty() {
            drop(st);
            let mut r = response_for(
                &job.msg,
                &empty_response(ResponseCode::Refused),
                job.transport,
            );
            if r.is_empty() {
                r = crate::dns::answer::servfail(&job.msg, job.transport).bytes;
            }
            send(job.reply, r);
            return;
        }
        if let Some(c) = st.cache.get(&key) {
            let age = c.stored.elapsed().as_secs();
            if age < u64::from(c.ttl) {
                let mut m = c.msg.clone();
                age_ttls(&mut m, u32::try_from(age).unwrap_or(u32::MAX));
                drop(st);
                self.metrics.cache_hits.inc();
                send(job.reply, response_for(&job.msg, &m, job.transport));
                return;
            }
            st.cache.pop(&key);
        }
        self.metrics.cache_misses.inc();
        if let Some(waiters) = st.inflight.get_mut(&key) {
            if waiters.len() < 64 {
                waiters.push((job.msg, job.transport, job.reply));
                return;
            }
            drop(st);
            self.metrics.overload.inc();
            fail(&job.msg, job.transport, job.reply);
            return;
        }
        if st.inflight.len() >= self.cfg.max_inflight {
            drop(st);
            self.metrics.overload.inc();
            self.log
                .warn("too many DNS questions in flight upstream; answering SERVFAIL");
            fail(&job.msg, job.transport, job.reply);
            return;
        }
        let start = st.next;
        st.next = st.next.wrapping_add(1);
        let ups = st.upstreams.clone();
        let tcp = job.transport == Transport::Tcp;
        st.inflight
            .insert(key.clone(), vec![(job.msg, job.transport, job.reply)]);
        drop(st);
        let state = self.state.clone();
        let (metrics, log, cfg) = (self.metrics.clone(), self.log.clone(), self.cfg.clone());
        tokio::spawn(async move {
            let t0 = Instant::now();
            let got = resolve(&q, &ups, start, &cfg, tcp).await;
            metrics.forward_duration.observe(t0.elapsed().as_secs_f64());
            let mut st = lock(&state);
            let waiters = st.inflight.remove(&key).unwrap_or_default();
            if let Some(m) = &got
                && let Some(ttl) = cache_ttl(m, cfg.max_ttl)
            {
                st.cache.put(
                    key,
                    Cached {
                        msg: m.clone(),
                        stored: Instant::now(),
                        ttl,
                    },
                );
            }
            metrics.cache_entries.set(st.cache.len() as i64);
            drop(st);
            if got.is_none() {
                metrics.forward_failures.inc();
                log.warn("no upstream resolver answered in time; answering SERVFAIL");
            }
            for (msg, transport, reply) in waiters {
                let bytes = match &got {
                    Some(m) => response_for(&msg, m, transport),
                    None => crate::dns::answer::servfail(&msg, transport).bytes,
                };
                send(reply, bytes);
            }
        });
    }
}

fn empty_response(rcode: ResponseCode) -> Message {
    let mut m = Message::response(0, hickory_proto::op::OpCode::Query);
    m.metadata.response_code = rcode;
    m
}

/// `up` (an upstream's answer) re-addressed to the client of `query`: its id, its question
/// as asked, its flags and EDNS, truncated to its size limit.
fn response_for(query: &Message, up: &Message, transport: Transport) -> Vec<u8> {
    let mut r = up.clone();
    r.metadata.id = query.metadata.id;
    r.metadata.recursion_desired = query.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    // We are no authority for what we forward (nor for what we answer from the cache).
    r.metadata.authoritative = false;
    r.metadata.truncation = up.metadata.truncation;
    r.queries = query.queries.clone();
    r.edns = query.edns.as_ref().map(|_| {
        let mut e = Edns::new();
        e.set_max_payload(EDNS_PAYLOAD);
        e
    });
    let limit = size_limit(query, transport);
    match r.to_vec() {
        Ok(b) if b.len() <= limit => b,
        Ok(_) => r.truncate().to_vec().unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// Lowers every TTL by `age` seconds (a cached answer tells how long it stays valid).
fn age_ttls(m: &mut Message, age: u32) {
    for r in m
        .answers
        .iter_mut()
        .chain(m.authorities.iter_mut())
        .chain(m.additionals.iter_mut())
    {
        r.ttl = r.ttl.saturating_sub(age);
    }
}

/// How long an upstream answer may be cached: the smallest TTL of its answers (for a
/// negative answer, of its SOA and the SOA's minimum), capped; None for answers not to keep.
fn cache_ttl(m: &Message, max_ttl: u32) -> Option<u32> {
    let ttl = match m.metadata.response_code {
        ResponseCode::NoError if !m.answers.is_empty() => m.answers.iter().map(|r| r.ttl).min(),
        ResponseCode::NoError | ResponseCode::NXDomain => m
            .authorities
            .iter()
            .filter_map(|r| match &r.data {
                hickory_proto::rr::RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                _ => None,
            })
            .min(),
        _ => None,
    }?;
    (ttl > 0).then_some(ttl.min(max_ttl))
}

/// Asks the upstreams in turn (from `start`), over TCP when `tcp` or when UDP came back
/// truncated; None when none answered usefully in time.
async fn resolve(
    q: &Query,
    ups: &[SocketAddr],
    start: usize,
    cfg: &ForwarderConfig,
    tcp: bool,
) -> Option<Message> {
    let mut last = None;
    for i in 0..ups.len() {
        let up = ups[(start + i) % ups.len()];
        let id: u16 = rand::random();
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(q.clone());
        let mut e = Edns::new();
        e.set_max_payload(EDNS_PAYLOAD);
        m.set_edns(e);
        let Ok(wire) = m.to_vec() else { return None };
        let mut got = if tcp {
            None
        } else {
            exchange_udp(up, &wire, id, q, cfg.timeout).await
        };
        if tcp || got.as_ref().is_some_and(|m| m.metadata.truncation) {
            got = exchange_tcp(up, &wire, id, q, cfg.timeout).await.or(got);
        }
        match got {
            Some(m)
                if !matches!(
                    m.metadata.response_code,
                    ResponseCode::ServFail | ResponseCode::Refused
                ) =>
            {
                return Some(m);
            }
            Some(m) => last = Some(m),
            None => {}
        }
    }
    last
}

fn matches_question(m: &Message, id: u16, q: &Query) -> bool {
    m.metadata.id == id
        && m.queries.len() == 1
        && LowerName::new(m.queries[0].name()) == LowerName::new(q.name())
        && m.queries[0].query_type() == q.query_type()
}

async fn exchange_udp(
    up: SocketAddr,
    wire: &[u8],
    id: u16,
    q: &Query,
    timeout: Duration,
) -> Option<Message> {
    let bind: SocketAddr = if up.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = tokio::net::UdpSocket::bind(bind).await.ok()?;
    sock.connect(up).await.ok()?;
    sock.send(wire).await.ok()?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        // Anything that does not answer our question (id, name, type) is ignored.
        if let Ok(m) = Message::from_vec(&buf[..n])
            && matches_question(&m, id, q)
        {
            return Some(m);
        }
    }
}

async fn exchange_tcp(
    up: SocketAddr,
    wire: &[u8],
    id: u16,
    q: &Query,
    timeout: Duration,
) -> Option<Message> {
    let buf = tokio::time::timeout(timeout, tcp_exchange(up, wire))
        .await
        .ok()?
        .ok()?;
    Message::from_vec(&buf)
        .ok()
        .filter(|m| matches_question(m, id, q))
}

/// One DNS message over TCP to `server` (2-byte length prefix each way); the response's
/// bytes. No timeout of its own: callers bound it.
pub async fn tcp_exchange(server: SocketAddr, wire: &[u8]) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    let mut c = tokio::net::TcpStream::connect(server)
        .await
        .with_context(|| format!("connecting to {server}"))?;
    let len = u16::try_from(wire.len()).context("query too long for TCP")?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(wire);
    c.write_all(&out)
        .await
        .with_context(|| format!("sending to {server}"))?;
    let mut l = [0u8; 2];
    c.read_exact(&mut l)
        .await
        .with_context(|| format!("reading the answer's length from {server}"))?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(l))];
    c.read_exact(&mut buf)
        .await
        .with_context(|| format!("reading the answer from {server}"))?;
    Ok(buf)
}

/// Sends a random name to each upstream; one whose probe arrives back here is dropped.
async fn probe_loops(state: Arc<Mutex<State>>, cfg: ForwarderConfig) {
    let ups = lock(&state).upstreams.clone();
    for up in ups {
        let token: u64 = rand::random();
        let Ok(name) = Name::from_ascii(format!("{token:016x}.tartan-loop-check.")) else {
            continue;
        };
        lock(&state).probe = Some((LowerName::new(&name), false));
        let q = Query::query(name, RecordType::HINFO);
        let _ = resolve(&q, &[up], 0, &cfg, false).await;
        let mut st = lock(&state);
        if st.probe.take().is_some_and(|(_, seen)| seen) {
            error!(upstream = %up, "upstream resolver sends cluster DNS queries back here (a forwarding loop); not using it");
            st.upstreams.retain(|u| *u != up);
        } else {
            info!(upstream = %up, "upstream resolver checked: no forwarding loop");
        }
    }
}

/// Upstream resolvers from a resolv.conf (`nameserver` lines, port 53).
pub fn resolv_conf_upstreams(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next())
                .flatten()
                .and_then(|a| a.parse::<std::net::IpAddr>().ok())
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let t = "# comment\nsearch example.com\nnameserver 192.0.2.1\nnameserver  2001:db8::1\nnameserver bogus\noptions ndots:2\n";
        let u = resolv_conf_upstreams(t);
        assert_eq!(
            u,
            vec![
                "192.0.2.1:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn forwarded_answers_are_never_authoritative() {
        let mut q = Message::query();
        q.metadata.id = 7;
        q.add_query(Query::query(
            Name::from_ascii("example.test.").unwrap(),
            RecordType::A,
        ));
        let mut up = empty_response(ResponseCode::NoError);
        up.metadata.authoritative = true;
        let r = Message::from_vec(&response_for(&q, &up, Transport::Udp)).unwrap();
        assert_eq!(r.metadata.id, 7);
        assert!(!r.metadata.authoritative);
        assert!(r.metadata.recursion_available);
    }

    #[test]
    fn negative_answers_cache_for_the_soa_minimum_and_errors_not_at_all() {
        use hickory_proto::rr::rdata::SOA;
        use hickory_proto::rr::{RData, Record};
        let mut m = empty_response(ResponseCode::NXDomain);
        let soa = SOA::new(Name::root(), Name::root(), 1, 1, 1, 1, 30);
        m.add_authority(Record::from_rdata(Name::root(), 300, RData::SOA(soa)));
        assert_eq!(cache_ttl(&m, 3600), Some(30));
        m.metadata.response_code = ResponseCode::ServFail;
        assert_eq!(cache_ttl(&m, 3600), None);
        let mut ok = empty_response(ResponseCode::NoError);
        ok.add_answer(Record::from_rdata(
            Name::root(),
            86400,
            RData::A(hickory_proto::rr::rdata::A::new(192, 0, 2, 1)),
        ));
        assert_eq!(cache_ttl(&ok, 3600), Some(3600), "capped");
        age_ttls(&mut ok, 100);
        assert_eq!(ok.answers[0].ttl, 86300);
    }
}
