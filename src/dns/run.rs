//! The cluster DNS task of `tartand`: reads the service, pod and endpoints feeds (the same
//! watches the proxy reads, split by `store::records::Feeds::tee`), keeps the [`Catalog`]
//! and so the [`Zone`] current, and runs the [`server`](crate::dns::server) on the cluster
//! DNS address. Answers for the zone are SERVFAIL until every prefix was listed once.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use hickory_proto::rr::Name;
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use tracing::{debug, info};

use crate::dns::answer::Authority;
use crate::dns::catalog::Catalog;
use crate::dns::lookup::DnsHandle;
use crate::dns::server::{DnsServer, ServerConfig};
use crate::dns::zone::{Zone, reverse_apex, reverse_apex6};
use crate::metrics::Metrics;
use crate::store::etcd::EtcdArgs;
use crate::store::records::{Feeds, ModelChange, RecordSink, apply_feeds};

/// What the node's cluster DNS serves and where.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// The cluster domain (`cluster.local.`).
    pub domain: Name,
    /// The cluster DNS address (answered on every node).
    pub dns_ip: Ipv4Addr,
    /// The port (53; tests may use another).
    pub port: u16,
    /// Upstream resolvers for other names.
    pub upstreams: Vec<SocketAddr>,
    /// Record TTL.
    pub ttl: u32,
    /// The service range (reverse names of cluster IPs).
    pub service_cidr: Ipv4Network,
    /// The pod network (reverse names of pods).
    pub cluster_network: Ipv4Network,
    /// The IPv6 pod network of a dual-stack cluster (`ip6.arpa` names of pods).
    pub cluster_network6: Option<Ipv6Network>,
    /// The IPv6 service range (`ip6.arpa` names of IPv6 cluster IPs).
    pub service_cidr6: Option<Ipv6Network>,
}

impl DnsSettings {
    /// The zone this node serves with authority: the cluster domain and the reverse zones of
    /// the service range and the pod network.
    pub fn new_zone(&self) -> Arc<Zone> {
        let mut apexes = vec![
            self.domain.clone(),
            reverse_apex(self.service_cidr),
            reverse_apex(self.cluster_network),
        ];
        apexes.extend(self.cluster_network6.map(reverse_apex6));
        apexes.extend(self.service_cidr6.map(reverse_apex6));
        Arc::new(Zone::new(apexes))
    }

    /// How the answers are made.
    pub fn authority(&self) -> Authority {
        Authority::new(
            self.domain.clone(),
            self.dns_ip,
            self.ttl,
            [self.service_cidr, self.cluster_network]
                .into_iter()
                .map(IpNetwork::V4)
                .chain(self.cluster_network6.map(IpNetwork::V6))
                .chain(self.service_cidr6.map(IpNetwork::V6))
                .collect(),
        )
    }

    /// The server configuration.
    pub fn server_config(&self) -> ServerConfig {
        let addr = SocketAddr::from((self.dns_ip, self.port));
        ServerConfig::new(vec![addr], self.upstreams.clone())
    }
}

/// Starts the server on `zone`, hands its [`DnsHandle`] to `on_start`, and keeps the zone
/// current from `feeds` until they close.
pub async fn run(
    feeds: Feeds,
    keys: EtcdArgs,
    settings: DnsSettings,
    zone: Arc<Zone>,
    metrics: Arc<Metrics>,
    on_start: impl FnOnce(DnsHandle),
) -> Result<()> {
    let server: DnsServer = crate::dns::server::start(
        zone.clone(),
        settings.authority(),
        settings.server_config(),
        metrics.dns.clone(),
    )
    .context("cannot start the cluster DNS")?;
    on_start(DnsHandle {
        zone: zone.clone(),
        auth: settings.authority(),
        forwarder: server.forwarder().clone(),
        server: SocketAddr::from((settings.dns_ip, settings.port)),
        metrics: metrics.dns.clone(),
    });
    info!(
        address = %settings.dns_ip,
        domain = %settings.domain,
        upstreams = ?settings.upstreams,
        "cluster DNS serving"
    );
    let catalog = Catalog::new(zone.clone(), settings.domain.clone(), settings.dns_ip)
        .with_service_cidr6(settings.service_cidr6);
    feed_loop(feeds, &keys, catalog, &zone, &metrics).await;
    drop(server);
    Ok(())
}

/// Applies every feed event to `catalog`; marks the zone ready once all three were listed.
pub async fn feed_loop(
    feeds: Feeds,
    keys: &EtcdArgs,
    catalog: Catalog,
    zone: &Zone,
    metrics: &Metrics,
) {
    let mut sink = ZoneSink {
        catalog,
        zone,
        metrics,
    };
    apply_feeds(feeds, keys, &mut sink).await;
}

/// The catalog, with what a settled batch updates.
struct ZoneSink<'a> {
    catalog: Catalog,
    zone: &'a Zone,
    metrics: &'a Metrics,
}

impl RecordSink for ZoneSink<'_> {
    fn change(&mut self, c: ModelChange) {
        self.catalog.change(c);
    }

    fn held(&self) -> (Vec<String>, Vec<String>, Vec<String>) {
        self.catalog.keys()
    }

    fn skipped(&mut self, key: &str, e: &crate::model::DecodeError) {
        // The proxy counts and reports malformed records; here they only name nothing.
        debug!(%key, "cluster DNS skips record: {e}");
    }

    fn settled(&mut self, listed: bool, started: Instant) {
        if listed && !self.zone.is_ready() {
            self.zone.set_ready();
            info!(names = self.zone.len(), "cluster DNS zone loaded");
        }
        self.metrics.dns.zone_names.set(self.zone.len() as i64);
        self.metrics
            .dns
            .change_seconds
            .observe(started.elapsed().as_secs_f64());
    }
}
