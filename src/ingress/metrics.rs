//! The ingress's Prometheus metrics (`tartan_ingress_*`), one registry of its own (the
//! ingress is its own process). Labels are bounded: a route's host pattern and name (never
//! the request's host, which a client chooses), and the status code.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a request: the route's host pattern, the route's name, the status code.
pub type RequestLabels = [(&'static str, String); 3];
/// Histograms by route.
pub type RouteHistograms = Family<[(&'static str, String); 1], Histogram, fn() -> Histogram>;

fn upstream_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
}

/// Every ingress metric.
pub struct IngressMetrics {
    registry: Registry,
    /// `requests_total{host, route, code}`.
    pub requests: Family<RequestLabels, Counter>,
    /// `upstream_duration_seconds{route}`: from sending to the endpoint to its response
    /// headers.
    pub upstream_duration: RouteHistograms,
    /// `connections_active`.
    pub active: Gauge,
    /// `connections_refused_total`: accepted and closed at once (connection limit).
    pub refused: Counter,
    /// `upstream_failures_total`: connects or exchanges with an endpoint that failed.
    pub upstream_failures: Counter,
    /// `retries_total`: requests sent again to another endpoint.
    pub retries: Counter,
    /// `routes`: routes in the table.
    pub routes: Gauge,
    /// `route_changes_total`: route, certificate and endpoint changes applied.
    pub changes: Counter,
    /// `access_log_suppressed_total`: access log lines left out by sampling.
    pub log_suppressed: Counter,
}

impl IngressMetrics {
    /// A registry with every metric.
    pub fn new() -> Arc<IngressMetrics> {
        let mut registry = Registry::with_prefix("tartan_ingress");
        let requests = Family::<RequestLabels, Counter>::default();
        let upstream_duration: RouteHistograms = Family::new_with_constructor(upstream_histogram);
        let m = IngressMetrics {
            requests: requests.clone(),
            upstream_duration: upstream_duration.clone(),
            active: Gauge::default(),
            refused: Counter::default(),
            upstream_failures: Counter::default(),
            retries: Counter::default(),
            routes: Gauge::default(),
            changes: Counter::default(),
            log_suppressed: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by route host, route and status code",
            requests,
        );
        registry.register(
            "upstream_duration_seconds",
            "Time from sending a request to an endpoint to its response headers",
            upstream_duration,
        );
        registry.register(
            "connections_active",
            "Client connections open",
            m.active.clone(),
        );
        registry.register(
            "connections_refused",
            "Client connections closed at accept because the connection limit was reached",
            m.refused.clone(),
        );
        registry.register(
            "upstream_failures",
            "Connects to or exchanges with endpoints that failed",
            m.upstream_failures.clone(),
        );
        registry.register(
            "retries",
            "Requests sent again to another endpoint",
            m.retries.clone(),
        );
        registry.register("routes", "Routes in the table", m.routes.clone());
        registry.register(
            "changes",
            "Route, certificate and endpoint changes applied",
            m.changes.clone(),
        );
        registry.register(
            "access_log_suppressed",
            "Access log lines left out by sampling under load",
            m.log_suppressed.clone(),
        );
        Arc::new(IngressMetrics { registry, ..m })
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = encode(&mut s, &self.registry);
        s
    }
}
