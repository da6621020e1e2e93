//! What `tartand` serves on `/status` (next to `/metrics`): the node, its subnet, its peers,
//! and every service with its backends and packet counters, for `tartanctl explain`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use crate::api::status::{BackendReport, PeerStatus, ServiceReport, StatusReport};
use tokio::sync::watch;

use crate::model::netconf::NetworkConfig;
use crate::overlay::plan::PeerSet;
use crate::proxy::run::ProxyStatus;

/// Where status requests for the service proxy go.
pub type ProxyRequests = tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<ProxyStatus>>;
use crate::kernel::nft_elements::{KeyBuilder, NftSocket};
use crate::model::service::IpFamily;
use crate::node::subnet_keeper::OwnLease;
use crate::proxy::rules::Family;

struct Inner {
    own: Option<watch::Receiver<Option<OwnLease>>>,
    /// What the overlay reconciler last programmed.
    peers: Option<watch::Receiver<Arc<PeerSet>>>,
    cfg: Option<NetworkConfig>,
    proxy: Option<ProxyRequests>,
    dns: Option<crate::dns::lookup::DnsHandle>,
}

/// Live sources of the status report.
pub struct DaemonStatus {
    node: String,
    inner: Mutex<Inner>,
}

impl DaemonStatus {
    /// A status source for `node`.
    pub fn new(node: &str) -> Self {
        DaemonStatus {
            node: node.to_string(),
            inner: Mutex::new(Inner {
                own: None,
                peers: None,
                cfg: None,
                proxy: None,
                dns: None,
            }),
        }
    }

    /// Attaches the overlay sources: the own lease, the peer set the reconciler publishes
    /// after each programmed pass, the network config.
    pub fn set_own(
        &self,
        own: watch::Receiver<Option<OwnLease>>,
        peers: watch::Receiver<Arc<PeerSet>>,
        cfg: NetworkConfig,
    ) {
        if let Ok(mut i) = self.inner.lock() {
            i.own = Some(own);
            i.peers = Some(peers);
            i.cfg = Some(cfg);
        }
    }

    /// Attaches the service proxy (it answers status requests on this channel).
    pub fn set_proxy(&self, p: ProxyRequests) {
        if let Ok(mut i) = self.inner.lock() {
            i.proxy = Some(p);
        }
    }

    /// Attaches the running cluster DNS.
    pub fn set_dns(&self, h: crate::dns::lookup::DnsHandle) {
        if let Ok(mut i) = self.inner.lock() {
            i.dns = Some(h);
        }
    }

    /// Looks a name up on this node's cluster DNS (`/dns`).
    pub async fn dns_lookup(
        &self,
        name: &str,
        qtype: hickory_proto::rr::RecordType,
    ) -> anyhow::Result<crate::api::status::DnsLookupReport> {
        let h = self
            .inner
            .lock()
            .ok()
            .and_then(|i| i.dns.clone())
            .ok_or_else(|| anyhow::anyhow!("the cluster DNS is not running on this node"))?;
        h.lookup(&self.node, name, qtype).await
    }

    /// Builds the report, reading packet counters from the kernel.
    pub async fn report(&self) -> StatusReport {
        let mut r = StatusReport {
            node: self.node.clone(),
            ..Default::default()
        };
        let proxy = {
            let Ok(i) = self.inner.lock() else { return r };
            let own = i.own.as_ref().and_then(|o| o.borrow().clone());
            r.network = i.cfg.as_ref().map(|c| c.network.to_string());
            r.dns = i.dns.as_ref().map(|d| d.report());
            r.subnet = own.as_ref().map(|o| o.subnet.to_string());
            r.reservation = own.as_ref().is_some_and(|o| o.etcd_lease == 0);
            r.subnet6 = own.as_ref().and_then(|o| o.subnet6).map(|s| s.to_string());
            if let Some(peers) = &i.peers {
                // The peers as programmed: no lease is decoded per request.
                let set = peers.borrow();
                r.peers = set.peers.iter().map(peer_status).collect();
                r.peers6 = set.peers6.iter().map(peer_status).collect();
            }
            i.proxy.clone()
        };
        let Some(proxy) = proxy else { return r };
        let (tx, rx) = tokio::sync::oneshot::channel();
        if proxy.send(tx).await.is_err() {
            return r;
        }
        let Ok(ps) = rx.await else { return r };
        r.services_synced = ps.synced;
        r.service_error = ps.last_error.clone();
        r.service_elements = ps.elements;
        r.service_chains = ps.chains;
        r.rejected_records = ps.rejected.clone();
        r.rejected_total = ps.rejected_total;
        let counters = match &ps.table {
            Some(t) => read_counters(Family::V4, t).await,
            None => Counters::default(),
        };
        r.services = service_reports(&ps, Family::V4, &counters);
        if let Some(ps6) = &ps.ipv6 {
            r.service_error6 = ps6.last_error.clone();
            r.services_synced6 = Some(ps6.synced);
            let counters6 = match &ps6.table {
                Some(t) => read_counters(Family::V6, t).await,
                None => Counters::default(),
            };
            let mut halves: HashMap<String, ServiceReport> =
                service_reports(ps6, Family::V6, &counters6)
                    .into_iter()
                    .map(|s| (s.id.clone(), s))
                    .collect();
            for s in &mut r.services {
                s.ipv6 = halves.remove(&s.id).map(Box::new);
            }
        }
        r
    }
}

/// Packet counters of the service table, from the kernel's set elements.
#[derive(Debug, Default)]
struct Counters {
    /// `no_endpoints` key (cluster IP . proto . port) → connections refused.
    refused: HashMap<Vec<u8>, u64>,
    /// (`backends` key without its slot, endpoint address) → connections over its slots.
    balanced: HashMap<(Vec<u8>, IpAddr), u64>,
}

/// The reports of the services `ps` (one family's table, counters read from it) programs.
fn service_reports(ps: &ProxyStatus, family: Family, counters: &Counters) -> Vec<ServiceReport> {
    let mut out = Vec::new();
    for s in &ps.services {
        let svc = &s.service;
        let mut connections = 0;
        let mut refused = 0;
        let Some(vip) = svc.cluster_ip_of(family.ip_family()) else {
            continue;
        };
        let mut per_backend: HashMap<IpAddr, u64> = HashMap::new();
        for p in &svc.ports {
            let key = KeyBuilder::new()
                .ip(vip)
                .proto(p.protocol.number())
                .port(p.port)
                .build();
            refused += counters.refused.get(&key).copied().unwrap_or(0);
            for b in &s.backends {
                if let Some(v) = counters.balanced.get(&(key.clone(), b.ip)) {
                    *per_backend.entry(b.ip).or_default() += v;
                    connections += v;
                }
            }
        }
        out.push(ServiceReport {
            id: s.id.clone(),
            cluster_ip: vip.to_string(),
            ports: svc
                .ports
                .iter()
                .map(|p| {
                    let mut d = format!("{}/{} -> {}", p.port, p.protocol, p.target_port);
                    if let Some(np) = p.node_port {
                        d.push_str(&format!(", node port {np}"));
                    }
                    if let Some(n) = &p.name {
                        d = format!("{n}: {d}");
                    }
                    d
                })
                .collect(),
            options: {
                let mut o = Vec::new();
                if svc.session_affinity == crate::model::service::SessionAffinity::ClientIp {
                    o.push(format!(
                        "client-IP affinity for {} s",
                        svc.session_affinity_timeout
                    ));
                }
                if svc.external_traffic_policy == crate::model::service::TrafficPolicy::Local {
                    o.push("node ports use local endpoints only and keep client addresses".into());
                }
                o
            },
            backends: s
                .backends
                .iter()
                .map(|b| BackendReport {
                    ip: b.ip.to_string(),
                    node: b.node.clone(),
                    connections: per_backend.get(&b.ip).copied().unwrap_or(0),
                })
                .collect(),
            connections,
            refused,
            problems: s.problems.clone(),
            uncounted: !crate::proxy::rules::counted_slots(crate::proxy::rules::slot_count(
                s.backends.len(),
            )),
            ipv6: None,
        });
    }
    out
}

/// Reads the counters of `no_endpoints` and `backends` with one netlink dump each. Verdict
/// maps cannot carry counters (the kernel refuses element expressions there), so connections
/// are counted where they are balanced; services big enough for the uncounted `big_backends`
/// are not counted at all. A failure leaves the counts at zero (logged).
async fn read_counters(family: Family, table: &str) -> Counters {
    let table = table.to_string();
    let nfproto = family.nfproto();
    let dumped = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut sock = NftSocket::open()?;
        Ok((
            sock.dump_elements(nfproto, &table, "no_endpoints")?,
            sock.dump_elements(nfproto, &table, "backends")?,
        ))
    })
    .await;
    let (refused, balanced) = match dumped {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            tracing::warn!("reading the service table's counters: {e:#}");
            return Counters::default();
        }
        Err(e) => {
            tracing::warn!("reading the service table's counters: {e}");
            return Counters::default();
        }
    };
    let mut c = Counters::default();
    for e in refused {
        if let Some((packets, _)) = e.counter {
            *c.refused.entry(e.key).or_default() += packets;
        }
    }
    for e in balanced {
        let (Some((packets, _)), Some(d)) = (e.counter, e.data.as_deref()) else {
            continue;
        };
        // A `backends` key without its slot: cluster IP . proto . port (4-byte registers, the
        // address 4 or 16 bytes); the data starts with the endpoint address.
        let alen = match family.ip_family() {
            IpFamily::IPv4 => 4,
            IpFamily::IPv6 => 16,
        };
        let (Some(port_key), Some(ip)) = (e.key.get(..alen + 8), d.get(..alen)) else {
            continue;
        };
        let ip = match <[u8; 16]>::try_from(ip) {
            Ok(o) => IpAddr::V6(Ipv6Addr::from(o)),
            Err(_) => match <[u8; 4]>::try_from(ip) {
                Ok(o) => IpAddr::V4(Ipv4Addr::from(o)),
                Err(_) => continue,
            },
        };
        *c.balanced.entry((port_key.to_vec(), ip)).or_default() += packets;
    }
    c
}

/// A programmed peer of either family, for the report.
fn peer_status<F: crate::overlay::plan::Family>(p: &crate::overlay::plan::Peer<F>) -> PeerStatus
where
    F::Net: std::fmt::Display,
    F::Addr: std::fmt::Display,
{
    PeerStatus {
        subnet: p.subnet.to_string(),
        public_ip: p.public_ip.to_string(),
        vtep_mac: p.vtep_mac.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::subnet_lease::MacAddr;
    use crate::overlay::plan::{LeaseConflict, Peer};

    #[tokio::test]
    async fn peers_come_from_what_the_reconciler_published() {
        let status = DaemonStatus::new("n1");
        let cfg = NetworkConfig::parse(br#"{"Network":"10.244.0.0/16"}"#).unwrap();
        let (_own_tx, own_rx) = watch::channel(Some(OwnLease {
            subnet: "10.244.1.0/24".parse().unwrap(),
            subnet6: Some("fd00:10:244:1::/64".parse().unwrap()),
            etcd_lease: 7,
        }));
        let (peers_tx, peers_rx) = watch::channel(Arc::<PeerSet>::default());
        status.set_own(own_rx, peers_rx, cfg);
        let r = status.report().await;
        assert_eq!(r.subnet.as_deref(), Some("10.244.1.0/24"));
        assert!(r.peers.is_empty(), "nothing programmed yet");
        peers_tx.send_replace(Arc::new(PeerSet {
            peers: vec![Peer {
                subnet: "10.244.2.0/24".parse().unwrap(),
                public_ip: "192.168.1.2".parse().unwrap(),
                vtep_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            }],
            peers6: vec![Peer {
                subnet: "fd00:10:244:2::/64".parse().unwrap(),
                public_ip: "fd00:1::2".parse().unwrap(),
                vtep_mac: MacAddr([2, 0, 0, 0, 6, 2]),
            }],
            skipped: vec!["garbage".into()],
            conflicts: vec![LeaseConflict {
                key: "/coreos.com/network/subnets/10.244.8.0-24".into(),
                subnet: "10.244.8.0/24".parse().unwrap(),
                reason: "stray".into(),
            }],
            ..PeerSet::default()
        }));
        let r = status.report().await;
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json["peers"],
            serde_json::json!([{
                "subnet": "10.244.2.0/24",
                "publicIp": "192.168.1.2",
                "vtepMac": "02:00:00:00:00:02",
            }])
        );
        assert_eq!(json["subnet6"], "fd00:10:244:1::/64");
        assert_eq!(
            json["peers6"],
            serde_json::json!([{
                "subnet": "fd00:10:244:2::/64",
                "publicIp": "fd00:1::2",
                "vtepMac": "02:00:00:00:06:02",
            }])
        );
        assert_eq!(json["network"], "10.244.0.0/16");
        assert_eq!(json["reservation"], false);
    }
}
