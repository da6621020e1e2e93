//! Every Prometheus metric the daemon exports, in one registry (served by
//! `daemon::admin_http`). A leaf: the loops of every room record here.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    /// Peers currently programmed into the overlay.
    pub peers: Gauge,
    /// Subnet leases left out because another lease claims their VTEP MAC or public IP.
    pub lease_conflicts: Gauge,
    /// Overlay reconcile passes.
    pub reconcile_runs: Counter,
    /// Overlay reconcile passes that failed.
    pub reconcile_errors: Counter,
    /// Kernel operations the reconciler issued (adds, replaces, deletes).
    pub reconcile_operations: Counter,
    /// Subnet and liveness lease renewals that succeeded.
    pub lease_renewals: Counter,
    /// Lease renewals that failed (etcd unreachable).
    pub lease_renewal_failures: Counter,
    /// Seconds from seeing a peer change in etcd to having it programmed.
    pub peer_program_seconds: Histogram,
    /// Subnet keys skipped because their value was malformed.
    pub malformed_records: Counter,
    /// Full service syncs.
    pub service_sync_full: Histogram,
    /// Incremental service syncs.
    pub service_sync_partial: Histogram,
    /// Service syncs that failed.
    pub service_sync_failures: Counter,
    /// Seconds from a service/endpoint change in etcd to its rules being in the kernel.
    pub service_programming_seconds: Histogram,
    /// Map/set elements in the service table.
    pub service_elements: Gauge,
    /// Chains in the service table.
    pub service_chains: Gauge,
    /// Services programmed.
    pub services: Gauge,
    /// Cluster IPs, node ports and explicit endpoints skipped as not allowed (outside the
    /// service CIDR, loopback, the node's or etcd's address, ...), plus contested elements.
    pub service_skipped: Gauge,
    /// Service, pod and endpoints records currently skipped as malformed.
    pub service_records_rejected: Gauge,
    /// Peak resident memory of the daemon (bytes).
    pub peak_rss: Gauge,
    /// The cluster DNS server's metrics.
    pub dns: DnsMetrics,
}

/// Query types counted one by one (others are `other`).
pub const DNS_TYPES: [&str; 8] = ["A", "AAAA", "SRV", "PTR", "SOA", "NS", "ANY", "other"];
/// Response codes counted one by one (others are `other`).
pub const DNS_RCODES: [&str; 7] = [
    "NOERROR", "NXDOMAIN", "SERVFAIL", "FORMERR", "REFUSED", "NOTIMP", "other",
];

/// Histograms by one `server` label.
pub type HistogramFamily = Family<[(&'static str, String); 1], Histogram, fn() -> Histogram>;

/// The cluster DNS server's metrics, named after CoreDNS's where they mean the same.
/// Counters are created up front per label value, so a query costs atomic increments only.
#[derive(Clone)]
pub struct DnsMetrics {
    /// `dns_requests_total{proto, type}`: `[udp, tcp][DNS_TYPES index]`.
    pub requests: [[Counter; DNS_TYPES.len()]; 2],
    /// `dns_responses_total{rcode}` by [`DNS_RCODES`] index.
    pub responses: [Counter; DNS_RCODES.len()],
    /// `dns_request_duration_seconds{server}`: one histogram per server thread (no shared lock).
    pub request_duration: HistogramFamily,
    /// `dns_cache_hits_total` (forwarded names answered from the cache).
    pub cache_hits: Counter,
    /// `dns_cache_misses_total`.
    pub cache_misses: Counter,
    /// `dns_cache_entries`.
    pub cache_entries: Gauge,
    /// `dns_forward_request_duration_seconds`: upstream round trips.
    pub forward_duration: Histogram,
    /// `dns_forward_failures_total`: queries no upstream answered in time.
    pub forward_failures: Counter,
    /// `dns_dropped_total`: queries refused with SERVFAIL or dropped because the server was
    /// saturated (forward queue, in-flight or TCP connection limits).
    pub overload: Counter,
    /// `dns_zone_names`: owner names in the cluster zone.
    pub zone_names: Gauge,
    /// `dns_change_seconds`: from a record change seen in etcd to the zone answering it.
    pub change_seconds: Histogram,
}

fn dns_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_005, 2.0, 20))
}

impl DnsMetrics {
    fn register(registry: &mut Registry) -> DnsMetrics {
        let requests = Family::<[(&'static str, &'static str); 2], Counter>::default();
        let responses = Family::<[(&'static str, &'static str); 1], Counter>::default();
        // Clones of a family's counters share its atomics: the fast path never looks labels up.
        let m = DnsMetrics {
            requests: std::array::from_fn(|p| {
                std::array::from_fn(|t| {
                    let proto = ["udp", "tcp"][p];
                    let labels = [("proto", proto), ("type", DNS_TYPES[t])];
                    requests.get_or_create(&labels).clone()
                })
            }),
            responses: std::array::from_fn(|r| {
                responses.get_or_create(&[("rcode", DNS_RCODES[r])]).clone()
            }),
            request_duration: Family::new_with_constructor(dns_histogram),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_entries: Gauge::default(),
            forward_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            forward_failures: Counter::default(),
            overload: Counter::default(),
            zone_names: Gauge::default(),
            change_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        };
        registry.register(
            "dns_requests",
            "DNS queries received, by transport and type",
            requests,
        );
        registry.register("dns_responses", "DNS responses sent, by rcode", responses);
        registry.register(
            "dns_request_duration_seconds",
            "Seconds from receiving a DNS query to sending its answer (per server thread)",
            m.request_duration.clone(),
        );
        registry.register(
            "dns_cache_hits",
            "Forwarded names answered from the cache",
            m.cache_hits.clone(),
        );
        registry.register(
            "dns_cache_misses",
            "Forwarded names not in the cache",
            m.cache_misses.clone(),
        );
        registry.register(
            "dns_cache_entries",
            "Entries in the forward cache",
            m.cache_entries.clone(),
        );
        registry.register(
            "dns_forward_request_duration_seconds",
            "Round trips to the upstream resolvers",
            m.forward_duration.clone(),
        );
        registry.register(
            "dns_forward_failures",
            "Forwarded queries no upstream answered in time",
            m.forward_failures.clone(),
        );
        registry.register(
            "dns_overload",
            "DNS queries answered SERVFAIL or dropped because a queue or connection limit was reached",
            m.overload.clone(),
        );
        registry.register(
            "dns_zone_names",
            "Owner names in the cluster zone",
            m.zone_names.clone(),
        );
        registry.register(
            "dns_change_seconds",
            "Seconds from a service, endpoint or pod change seen in etcd to the zone answering it",
            m.change_seconds.clone(),
        );
        m
    }
}

/// VmHWM of this process in kB.
fn peak_rss_kb() -> Option<i64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("tartan");
        let lat = || Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        let m = Metrics {
            peers: Gauge::default(),
            lease_conflicts: Gauge::default(),
            reconcile_runs: Counter::default(),
            reconcile_errors: Counter::default(),
            reconcile_operations: Counter::default(),
            lease_renewals: Counter::default(),
            lease_renewal_failures: Counter::default(),
            peer_program_seconds: lat(),
            malformed_records: Counter::default(),
            service_sync_full: lat(),
            service_sync_partial: lat(),
            service_sync_failures: Counter::default(),
            service_programming_seconds: lat(),
            service_elements: Gauge::default(),
            service_chains: Gauge::default(),
            services: Gauge::default(),
            service_skipped: Gauge::default(),
            service_records_rejected: Gauge::default(),
            peak_rss: Gauge::default(),
            dns: DnsMetrics::register(&mut registry),
            registry: Registry::default(),
        };
        registry.register(
            "overlay_peers",
            "Peers programmed into the overlay",
            m.peers.clone(),
        );
        registry.register(
            "overlay_lease_conflicts",
            "Subnet leases left out because another lease claims their VTEP MAC or public IP",
            m.lease_conflicts.clone(),
        );
        registry.register(
            "overlay_reconcile_runs",
            "Overlay reconcile passes",
            m.reconcile_runs.clone(),
        );
        registry.register(
            "overlay_reconcile_errors",
            "Overlay reconcile passes that failed",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "overlay_reconcile_operations",
            "Kernel operations issued by the overlay reconciler",
            m.reconcile_operations.clone(),
        );
        registry.register(
            "lease_renewals",
            "etcd lease renewals that succeeded",
            m.lease_renewals.clone(),
        );
        registry.register(
            "lease_renewal_failures",
            "etcd lease renewals that failed",
            m.lease_renewal_failures.clone(),
        );
        registry.register(
            "overlay_peer_program_seconds",
            "Seconds from a peer change seen in etcd to the peer programmed in the kernel",
            m.peer_program_seconds.clone(),
        );
        registry.register(
            "malformed_records",
            "etcd records skipped because they could not be decoded",
            m.malformed_records.clone(),
        );
        registry.register(
            "service_sync_full_seconds",
            "Duration of full service syncs",
            m.service_sync_full.clone(),
        );
        registry.register(
            "service_sync_partial_seconds",
            "Duration of incremental service syncs",
            m.service_sync_partial.clone(),
        );
        registry.register(
            "service_sync_failures",
            "Service syncs that failed",
            m.service_sync_failures.clone(),
        );
        registry.register(
            "service_programming_seconds",
            "Seconds from a service or endpoint change in etcd to its rules in the kernel",
            m.service_programming_seconds.clone(),
        );
        registry.register(
            "service_elements",
            "Map and set elements in the service table",
            m.service_elements.clone(),
        );
        registry.register(
            "service_chains",
            "Chains in the service table",
            m.service_chains.clone(),
        );
        registry.register("services", "Service ports programmed", m.services.clone());
        registry.register(
            "service_addresses_skipped",
            "Cluster IPs, node ports and explicit endpoints not programmed because they are not allowed or held by another service (see tartanctl explain)",
            m.service_skipped.clone(),
        );
        registry.register(
            "service_records_rejected",
            "Service, pod and endpoints records skipped because they are malformed",
            m.service_records_rejected.clone(),
        );
        registry.register(
            "peak_rss_bytes",
            "Peak resident memory of the daemon",
            m.peak_rss.clone(),
        );

        Arc::new(Metrics { registry, ..m })
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        if let Some(kb) = peak_rss_kb() {
            self.peak_rss.set(kb * 1024);
        }
        let mut s = String::new();
        if encode(&mut s, &self.registry).is_err() {
            s.clear();
        }
        s
    }
}
