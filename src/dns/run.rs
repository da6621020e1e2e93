//! The cluster DNS task of `tartand`: reads the service, pod and endpoints feeds (the same
//! watches the proxy reads, split by `store::records::Feeds::tee`), keeps the [`Catalog`]
//! and so the [`Zone`] current, and runs the [`server`](crate::dns::server) on the cluster
//! DNS address. Answers for the zone are SERVFAIL until every prefix was listed once.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use hickory_proto::rr::Name;
use ipnetwork::Ipv4Network;
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{debug, info};

use crate::dns::answer::Authority;
use crate::dns::catalog::Catalog;
use crate::dns::lookup::DnsHandle;
use crate::dns::server::{DnsServer, ServerConfig};
use crate::dns::zone::{Zone, reverse_apex};
use crate::metrics::Metrics;
use crate::store::etcd::{Change, EtcdArgs, ReflectorEvent};
use crate::store::records::{Feeds, RecordKind, decode, deletion, gone_after_listing};

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
}

impl DnsSettings {
    /// The zone this node serves with authority: the cluster domain and the reverse zones of
    /// the service range and the pod network.
    pub fn new_zone(&self) -> Arc<Zone> {
        Arc::new(Zone::new(vec![
            self.domain.clone(),
            reverse_apex(self.service_cidr),
            reverse_apex(self.cluster_network),
        ]))
    }

    /// How the answers are made.
    pub fn authority(&self) -> Authority {
        Authority::new(
            self.domain.clone(),
            self.dns_ip,
            self.ttl,
            vec![self.service_cidr, self.cluster_network],
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
    let catalog = Catalog::new(zone.clone(), settings.domain.clone(), settings.dns_ip);
    feed_loop(feeds, &keys, catalog, &zone, &metrics).await;
    drop(server);
    Ok(())
}

/// Applies every feed event to `catalog`; marks the zone ready once all three were listed.
pub async fn feed_loop(
    feeds: Feeds,
    keys: &EtcdArgs,
    mut catalog: Catalog,
    zone: &Zone,
    metrics: &Metrics,
) {
    let mut sources = [
        (RecordKind::Services, feeds.services, false),
        (RecordKind::Pods, feeds.pods, false),
        (RecordKind::Endpoints, feeds.endpoints, false),
    ];
    loop {
        let got = {
            let futs = sources
                .iter_mut()
                .enumerate()
                .map(|(i, s)| Box::pin(async move { s.1.recv().await.map(|e| (i, e)) }));
            futures::future::select_all(futs).await.0
        };
        let Some((i, ev)) = got else { return };
        let t0 = Instant::now();
        absorb(sources[i].0, ev, &mut catalog, keys, metrics);
        sources[i].2 = true;
        drain(&mut sources, &mut catalog, keys, metrics);
        if sources.iter().all(|s| s.2) && !zone.is_ready() {
            zone.set_ready();
            info!(names = zone.len(), "cluster DNS zone loaded");
        }
        metrics.dns.zone_names.set(zone.len() as i64);
        metrics
            .dns
            .change_seconds
            .observe(t0.elapsed().as_secs_f64());
    }
}

type Source = (RecordKind, UnboundedReceiver<ReflectorEvent>, bool);

fn drain(sources: &mut [Source], catalog: &mut Catalog, keys: &EtcdArgs, metrics: &Metrics) {
    for s in sources.iter_mut() {
        while let Ok(ev) = s.1.try_recv() {
            absorb(s.0, ev, catalog, keys, metrics);
            s.2 = true;
        }
    }
}

fn absorb(
    kind: RecordKind,
    ev: ReflectorEvent,
    catalog: &mut Catalog,
    keys: &EtcdArgs,
    metrics: &Metrics,
) {
    match ev {
        ReflectorEvent::Reset { items, .. } => {
            // A (re)listing replaces this kind: what the catalog holds that it lacks is gone.
            let gone = gone_after_listing(kind, &items, catalog.keys(), keys);
            for c in gone {
                catalog.change(c);
            }
            for it in &items {
                put(kind, it, catalog, keys, metrics);
            }
        }
        ReflectorEvent::Changes { changes, .. } => {
            for c in changes {
                match c {
                    Change::Put(it) => put(kind, &it, catalog, keys, metrics),
                    Change::Delete(k) => {
                        if let Some(c) = deletion(kind, &k, keys) {
                            catalog.change(c);
                        }
                    }
                }
            }
        }
    }
}

fn put(
    kind: RecordKind,
    it: &crate::store::etcd::KvItem,
    catalog: &mut Catalog,
    keys: &EtcdArgs,
    _metrics: &Metrics,
) {
    match decode(kind, it, keys) {
        Ok(c) => catalog.change(c),
        // The proxy counts and reports malformed records; here they only name nothing.
        Err(e) => debug!(key = %it.key, "cluster DNS skips record: {e}"),
    }
}
