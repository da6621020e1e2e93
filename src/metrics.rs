//! Every Prometheus metric the daemon exports, in one registry (served by
//! `daemon::admin_http`). A leaf: the loops of every room record here.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
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
