//! Which endpoint a request goes to: round robin or least requests (the fewer in flight of
//! two picked at random, as Envoy does) over a service's ready endpoints, skipping those
//! passive health checking ejected (a backend whose connects fail is left out for a while;
//! when every endpoint is ejected, all are tried again rather than none).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// How a request's endpoint is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Policy {
    /// Each endpoint in turn.
    #[default]
    RoundRobin,
    /// The one with fewer requests in flight, of two chosen at random.
    LeastRequests,
}

/// Consecutive connect failures that eject an endpoint.
const FAILURES_TO_EJECT: u32 = 2;

#[derive(Debug, Default)]
struct Record {
    failures: u32,
    until: Option<Instant>,
}

/// Endpoint choice and passive health, shared by every request.
#[derive(Debug)]
pub struct Balancer {
    policy: Policy,
    eject_for: Duration,
    next: AtomicUsize,
    health: DashMap<SocketAddr, Record, ahash::RandomState>,
    inflight: DashMap<SocketAddr, Arc<AtomicUsize>, ahash::RandomState>,
}

/// Counts a request in flight to an endpoint until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    /// A balancer with `policy` that ejects failing endpoints for `eject_for`.
    pub fn new(policy: Policy, eject_for: Duration) -> Self {
        Balancer {
            policy,
            eject_for,
            next: AtomicUsize::new(0),
            health: DashMap::with_hasher(ahash::RandomState::new()),
            inflight: DashMap::with_hasher(ahash::RandomState::new()),
        }
    }

    /// Whether `addr` is ejected at `now`.
    pub fn is_ejected(&self, addr: SocketAddr, now: Instant) -> bool {
        self.health
            .get(&addr)
            .and_then(|r| r.until)
            .is_some_and(|u| u > now)
    }

    /// A failed connect to `addr`: the second in a row ejects it for a while.
    pub fn failed(&self, addr: SocketAddr, now: Instant) {
        let mut r = self.health.entry(addr).or_default();
        r.failures += 1;
        if r.failures >= FAILURES_TO_EJECT {
            r.until = Some(now + self.eject_for);
        }
    }

    /// A request to `addr` got a response: it is healthy again.
    pub fn succeeded(&self, addr: SocketAddr) {
        if self.health.contains_key(&addr) {
            self.health.remove(&addr);
        }
    }

    /// Endpoints ejected now (for status and explain).
    pub fn ejected(&self, now: Instant) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = self
            .health
            .iter()
            .filter(|r| r.until.is_some_and(|u| u > now))
            .map(|r| *r.key())
            .collect();
        v.sort();
        v
    }

    /// Picks one of `addrs` (already tried ones in `tried` are skipped; None when all were);
    /// healthy ones first.
    pub fn pick(
        &self,
        addrs: &[SocketAddr],
        tried: &[SocketAddr],
        now: Instant,
    ) -> Option<SocketAddr> {
        self.pick_of(addrs.len(), |i| addrs[i], tried, now)
    }

    /// [`Balancer::pick`] over `n` endpoints whose addresses `addr` gives (0..n), so a
    /// request needs no list of its own.
    pub fn pick_of(
        &self,
        n: usize,
        addr: impl Fn(usize) -> SocketAddr,
        tried: &[SocketAddr],
        now: Instant,
    ) -> Option<SocketAddr> {
        let open = |a: &SocketAddr| !tried.contains(a);
        let healthy = |a: &SocketAddr| !self.is_ejected(*a, now);
        if n == 0 {
            return None;
        }
        match self.policy {
            Policy::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let ring = || (0..n).map(|i| addr((start + i) % n));
                ring()
                    .filter(open)
                    .find(healthy)
                    .or_else(|| ring().find(open))
            }
            Policy::LeastRequests => {
                let pool: Vec<SocketAddr> = {
                    let all = || (0..n).map(&addr).filter(open);
                    let h: Vec<SocketAddr> = all().filter(healthy).collect();
                    if h.is_empty() { all().collect() } else { h }
                };
                match pool.len() {
                    0 => None,
                    1 => Some(pool[0]),
                    m => {
                        let i = rand::random_range(0..m);
                        let j = (i + 1 + rand::random_range(0..m - 1)) % m;
                        let (a, b) = (pool[i], pool[j]);
                        Some(if self.load(b) < self.load(a) { b } else { a })
                    }
                }
            }
        }
    }

    fn load(&self, addr: SocketAddr) -> usize {
        self.inflight
            .get(&addr)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Counts a request to `addr` as in flight until the guard drops.
    pub fn start(&self, addr: SocketAddr) -> InFlight {
        // A read lock of the shard on the hot path; the write lock only for a new endpoint.
        let c = match self.inflight.get(&addr) {
            Some(c) => c.clone(),
            None => self.inflight.entry(addr).or_default().clone(),
        };
        c.fetch_add(1, Ordering::Relaxed);
        InFlight(c)
    }

    /// Forgets endpoints that are gone (keeps the maps from growing with pod churn).
    pub fn retain(&self, live: impl Fn(&SocketAddr) -> bool) {
        self.health.retain(|a, _| live(a));
        self.inflight
            .retain(|a, c| live(a) || c.load(Ordering::Relaxed) > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|k| SocketAddr::from(([10, 244, 1, k], 8080)))
            .collect()
    }

    #[test]
    fn round_robin_visits_every_endpoint_in_turn() {
        let b = Balancer::new(Policy::RoundRobin, Duration::from_secs(5));
        let a = addrs(3);
        let now = Instant::now();
        let picks: Vec<SocketAddr> = (0..6).filter_map(|_| b.pick(&a, &[], now)).collect();
        assert_eq!(picks, [a[0], a[1], a[2], a[0], a[1], a[2]]);
    }

    #[test]
    fn failing_endpoints_are_ejected_for_a_while_and_all_ejected_means_try_all() {
        let b = Balancer::new(Policy::RoundRobin, Duration::from_secs(5));
        let a = addrs(2);
        let now = Instant::now();
        b.failed(a[0], now);
        assert!(!b.is_ejected(a[0], now), "one failure does not eject");
        b.failed(a[0], now);
        assert!(b.is_ejected(a[0], now));
        for _ in 0..4 {
            assert_eq!(b.pick(&a, &[], now), Some(a[1]));
        }
        assert_eq!(b.ejected(now), vec![a[0]]);
        // Later it is back.
        let later = now + Duration::from_secs(6);
        assert!(!b.is_ejected(a[0], later));
        // Every endpoint ejected: still one is tried.
        b.failed(a[1], now);
        b.failed(a[1], now);
        assert!(b.pick(&a, &[], now).is_some());
        // A success clears the record.
        b.succeeded(a[0]);
        assert!(!b.is_ejected(a[0], now));
    }

    #[test]
    fn tried_endpoints_are_not_picked_again() {
        for policy in [Policy::RoundRobin, Policy::LeastRequests] {
            let b = Balancer::new(policy, Duration::from_secs(5));
            let a = addrs(3);
            let now = Instant::now();
            let mut tried = Vec::new();
            while let Some(x) = b.pick(&a, &tried, now) {
                assert!(!tried.contains(&x));
                tried.push(x);
            }
            assert_eq!(tried.len(), 3, "{policy:?}");
            assert_eq!(b.pick(&[], &[], now), None);
        }
    }

    #[test]
    fn least_requests_prefers_the_idle_endpoint() {
        let b = Balancer::new(Policy::LeastRequests, Duration::from_secs(5));
        let a = addrs(2);
        let _busy: Vec<InFlight> = (0..5).map(|_| b.start(a[0])).collect();
        let now = Instant::now();
        for _ in 0..20 {
            assert_eq!(b.pick(&a, &[], now), Some(a[1]));
        }
        drop(_busy);
        assert_eq!(b.load(a[0]), 0);
        b.retain(|_| false);
        assert!(b.inflight.is_empty());
    }
}
