//! Services in etcd: creation with unique cluster IP and node port allocation (one etcd
//! transaction each), updates, deletion, explicit endpoints.
//!
//! Allocations are keys of their own (`/tartan/alloc/clusterip/<ip>`, for either family,
//! `/tartan/alloc/nodeport/<proto>/<port>`) written in the same transaction as the service,
//! so two concurrent creates can never get the same address or port.

use crate::store::keys::{
    cluster_ip_alloc_key, endpoints_key, node_port_alloc_key, service_key, services_prefix,
};
use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, bail};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use ipnetwork::Ipv4Network;
use rand::RngExt;

use crate::model::service::{
    AddressGuard, ExplicitEndpoints, HEADLESS, IpFamily, IpFamilyPolicy, NODE_PORT_MAX,
    NODE_PORT_MIN, Protocol, Service, valid_name,
};
use crate::store::etcd::{EtcdArgs, Store};

/// A node-port request for one service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodePortRequest {
    /// No node port.
    None,
    /// Any free node port.
    Auto,
    /// This node port.
    Port(u16),
}

/// Why a create transaction failed, when it is not an error to report.
enum CreateConflict {
    /// The service holds exactly what this attempt wrote: an earlier send of it went through.
    OwnWrite,
    /// The drawn cluster IP was taken meanwhile: draw another.
    ClusterIp,
    /// Something else (a drawn node port taken meanwhile): try again, a bounded number of
    /// times.
    Other,
}

/// Access to services in etcd.
pub struct ServiceStore<'a> {
    store: &'a Store,
    keys: &'a EtcdArgs,
    service_cidr: Ipv4Network,
    guard: AddressGuard,
}

impl<'a> ServiceStore<'a> {
    /// Services under `keys`, allocating cluster IPs from `service_cidr`.
    pub fn new(store: &'a Store, keys: &'a EtcdArgs, service_cidr: Ipv4Network) -> Self {
        ServiceStore {
            store,
            keys,
            service_cidr,
            guard: AddressGuard::new(service_cidr),
        }
    }

    /// Refuses (and never allocates) cluster IPs and node ports `guard` refuses.
    pub fn with_guard(mut self, guard: AddressGuard) -> Self {
        self.guard = guard;
        self
    }

    fn random_ip(&self) -> Ipv4Addr {
        // Skip the network address, the first address (kept for the cluster's own API, as
        // Kubernetes does) and the broadcast address.
        let first = u32::from(self.service_cidr.network()) + 2;
        let last = u32::from(self.service_cidr.broadcast()).saturating_sub(1);
        if last < first {
            return self.service_cidr.network();
        }
        Ipv4Addr::from(rand::rng().random_range(first..=last))
    }

    /// A random address of the IPv6 service range, past its network address and the first
    /// one (as for IPv4).
    fn random_ip6(&self) -> Option<Ipv6Addr> {
        let c = self.guard.service_cidr6?;
        let host_bits = 128 - u32::from(c.prefix());
        let size = 1u128.checked_shl(host_bits).unwrap_or(0).max(4);
        let offset = rand::rng().random_range(2..size);
        Some(Ipv6Addr::from(u128::from(c.network()) | offset))
    }

    /// Whether a service created with `policy` gets an IPv6 cluster IP here.
    fn wants_ipv6(&self, policy: IpFamilyPolicy) -> bool {
        match policy {
            IpFamilyPolicy::SingleStack => false,
            IpFamilyPolicy::PreferDualStack | IpFamilyPolicy::RequireDualStack => {
                self.guard.service_cidr6.is_some()
            }
        }
    }

    fn random_node_port() -> u16 {
        rand::rng().random_range(NODE_PORT_MIN..=NODE_PORT_MAX)
    }

    /// Creates `svc` (its `cluster_ip` is ignored unless `explicit_ip`), allocating a cluster
    /// IP and the requested node ports; `explicit_ip` [`HEADLESS`] makes a headless service
    /// (no cluster IP, no node ports). Returns the stored service.
    pub async fn create(
        &self,
        mut svc: Service,
        explicit_ip: Option<Ipv4Addr>,
        node_ports: &[NodePortRequest],
    ) -> Result<Service> {
        let explicit_ports = self.check_create_request(&svc, explicit_ip, node_ports)?;
        let key = service_key(self.keys, &svc.namespace, &svc.name);
        for attempt in 0..200 {
            if !self.assign_addresses(&mut svc, explicit_ip, node_ports, &explicit_ports) {
                continue;
            }
            svc.validate()
                .map_err(|e| anyhow::anyhow!("invalid service: {e}"))?;
            if self
                .store
                .txn_resendable(self.create_txn(&key, &svc))
                .await?
            {
                return Ok(svc);
            }
            match self
                .create_conflict(&key, &svc, explicit_ip, node_ports)
                .await?
            {
                CreateConflict::OwnWrite => return Ok(svc),
                CreateConflict::ClusterIp => continue,
                CreateConflict::Other => {}
            }
            if attempt > 100 {
                break;
            }
        }
        bail!(
            "could not allocate a free cluster IP / node port after many attempts (range exhausted?)"
        )
    }

    /// Checks what `create` was asked for before anything is drawn: no more node ports than
    /// service ports, the explicit cluster IP and node ports allowed by the guard, no explicit
    /// node port twice. Returns the explicit node ports.
    fn check_create_request(
        &self,
        svc: &Service,
        explicit_ip: Option<Ipv4Addr>,
        node_ports: &[NodePortRequest],
    ) -> Result<HashSet<(Protocol, u16)>> {
        if node_ports.len() > svc.ports.len() {
            bail!(
                "{} node ports given for {} service ports",
                node_ports.len(),
                svc.ports.len()
            );
        }
        if svc.ip_family_policy == IpFamilyPolicy::RequireDualStack
            && explicit_ip != Some(HEADLESS)
            && self.guard.service_cidr6.is_none()
        {
            bail!(
                "--ip-family-policy RequireDualStack: there is no IPv6 service range (give \
                 --service-cidr IPV4/LEN,IPV6/LEN, e.g. 10.96.0.0/12,fd00:96::/108)"
            );
        }
        if explicit_ip == Some(HEADLESS) {
            if node_ports
                .iter()
                .any(|r| !matches!(r, NodePortRequest::None))
            {
                bail!("a headless service (--cluster-ip none) has no node ports");
            }
        } else if let Some(ip) = explicit_ip {
            self.guard
                .cluster_ip(ip)
                .map_err(|e| anyhow::anyhow!("--cluster-ip: {e}"))?;
        }
        let mut explicit_ports = HashSet::new();
        for (i, req) in node_ports.iter().enumerate() {
            if let NodePortRequest::Port(p) = req {
                self.guard
                    .node_port(*p)
                    .map_err(|e| anyhow::anyhow!("--node-port: {e}"))?;
                if !explicit_ports.insert((svc.ports[i].protocol, *p)) {
                    bail!(
                        "--node-port {p}/{} is given twice (each service port needs its own)",
                        svc.ports[i].protocol
                    );
                }
            }
        }
        Ok(explicit_ports)
    }

    /// One attempt's addresses: the cluster IP (explicit or drawn) and the node ports
    /// (explicit, or drawn distinct from the others and allowed by the guard). False when
    /// the drawn cluster IP is one the guard refuses (then nothing else is assigned).
    fn assign_addresses(
        &self,
        svc: &mut Service,
        explicit_ip: Option<Ipv4Addr>,
        node_ports: &[NodePortRequest],
        explicit_ports: &HashSet<(Protocol, u16)>,
    ) -> bool {
        svc.cluster_ip = match explicit_ip {
            Some(ip) => ip,
            None => {
                let ip = self.random_ip();
                if self.guard.cluster_ip(ip).is_err() {
                    return false;
                }
                ip
            }
        };
        let dual = self.wants_ipv6(svc.ip_family_policy);
        svc.cluster_ips.clear();
        svc.ip_families.clear();
        if svc.is_headless() {
            if svc.ip_family_policy != IpFamilyPolicy::SingleStack {
                svc.ip_families = vec![IpFamily::IPv4, IpFamily::IPv6];
            }
        } else if dual {
            let Some(ip6) = self
                .random_ip6()
                .filter(|ip| self.guard.cluster_ip6(*ip).is_ok())
            else {
                return false;
            };
            svc.cluster_ips = vec![svc.cluster_ip.into(), ip6.into()];
            svc.ip_families = vec![IpFamily::IPv4, IpFamily::IPv6];
        }
        let mut taken = explicit_ports.clone();
        for (i, req) in node_ports.iter().enumerate() {
            let proto = svc.ports[i].protocol;
            svc.ports[i].node_port = match req {
                NodePortRequest::None => None,
                NodePortRequest::Auto => {
                    // Distinct from the other ports of this service (one transaction may
                    // not write a key twice) and from what the guard refuses.
                    let mut p = Self::random_node_port();
                    while taken.contains(&(proto, p)) || self.guard.node_port(p).is_err() {
                        p = Self::random_node_port();
                    }
                    taken.insert((proto, p));
                    Some(p)
                }
                NodePortRequest::Port(p) => Some(*p),
            };
        }
        true
    }

    /// The create transaction: if the service key, its cluster IP and its node ports are all
    /// free, writes the service and the allocations.
    fn create_txn(&self, key: &str, svc: &Service) -> Txn {
        let id = svc.id();
        let mut cmp = vec![Compare::create_revision(
            key.to_string(),
            CompareOp::Equal,
            0,
        )];
        let mut ops = vec![TxnOp::put(key.to_string(), svc.to_bytes(), None)];
        for ip in svc.cluster_ips() {
            let alloc = cluster_ip_alloc_key(self.keys, ip);
            cmp.push(Compare::create_revision(alloc.clone(), CompareOp::Equal, 0));
            ops.push(TxnOp::put(alloc, id.clone(), None));
        }
        for p in &svc.ports {
            if let Some(np) = p.node_port {
                let k = node_port_alloc_key(self.keys, p.protocol, np);
                cmp.push(Compare::create_revision(k.clone(), CompareOp::Equal, 0));
                ops.push(TxnOp::put(k, id.clone(), None));
            }
        }
        Txn::new().when(cmp).and_then(ops)
    }

    /// Finds out which comparison of a failed create transaction failed: errors for the
    /// service existing and for an explicit cluster IP or node port taken; otherwise what to
    /// do next.
    async fn create_conflict(
        &self,
        key: &str,
        svc: &Service,
        explicit_ip: Option<Ipv4Addr>,
        node_ports: &[NodePortRequest],
    ) -> Result<CreateConflict> {
        let id = svc.id();
        if let Some(kv) = self.store.get(key).await? {
            // An attempt sent again after no answer may find its own earlier write.
            if kv.value == svc.to_bytes() {
                return Ok(CreateConflict::OwnWrite);
            }
            bail!("service {id} already exists");
        }
        if !svc.is_headless()
            && let Some(owner) = self
                .store
                .get(&cluster_ip_alloc_key(self.keys, svc.cluster_ip))
                .await?
        {
            if explicit_ip.is_some() {
                bail!(
                    "cluster IP {} is already taken by service {}",
                    svc.cluster_ip,
                    String::from_utf8_lossy(&owner.value)
                );
            }
            return Ok(CreateConflict::ClusterIp);
        }
        if let Some(ip6) = svc.cluster_ip6()
            && self
                .store
                .get(&cluster_ip_alloc_key(self.keys, ip6))
                .await?
                .is_some()
        {
            return Ok(CreateConflict::ClusterIp);
        }
        for (i, p) in svc.ports.iter().enumerate() {
            let Some(np) = p.node_port else { continue };
            if let Some(owner) = self
                .store
                .get(&node_port_alloc_key(self.keys, p.protocol, np))
                .await?
                && matches!(node_ports.get(i), Some(NodePortRequest::Port(_)))
            {
                bail!(
                    "node port {np}/{} is already taken by service {}",
                    p.protocol,
                    String::from_utf8_lossy(&owner.value)
                );
            }
        }
        Ok(CreateConflict::Other)
    }

    /// Reads one service.
    pub async fn get(&self, namespace: &str, name: &str) -> Result<Option<(Service, i64)>> {
        match self
            .store
            .get(&service_key(self.keys, namespace, name))
            .await?
        {
            None => Ok(None),
            Some(kv) => Ok(Some((
                Service::parse(&kv.value).map_err(|e| {
                    anyhow::anyhow!("stored service {namespace}/{name} is invalid: {e}")
                })?,
                kv.mod_revision,
            ))),
        }
    }

    /// Lists services (optionally of one namespace); malformed records are returned as errors
    /// next to the good ones.
    pub async fn list(&self, namespace: Option<&str>) -> Result<(Vec<Service>, Vec<String>)> {
        let prefix = match namespace {
            Some(ns) => format!("{}{ns}/", services_prefix(self.keys)),
            None => services_prefix(self.keys),
        };
        let (_, items) = self.store.list(&prefix).await?;
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for it in items {
            match Service::parse(&it.value) {
                Ok(s) => good.push(s),
                Err(e) => bad.push(format!("{}: {e}", it.key)),
            }
        }
        good.sort_by_key(Service::id);
        Ok((good, bad))
    }

    /// Replaces an existing service (same cluster IP), re-allocating node ports that changed.
    pub async fn update(&self, svc: &Service) -> Result<()> {
        svc.validate()
            .map_err(|e| anyhow::anyhow!("invalid service: {e}"))?;
        let key = service_key(self.keys, &svc.namespace, &svc.name);
        let (old, rev) = self
            .get(&svc.namespace, &svc.name)
            .await?
            .with_context(|| format!("service {} does not exist", svc.id()))?;
        if old.cluster_ip != svc.cluster_ip || old.cluster_ip6() != svc.cluster_ip6() {
            bail!("the cluster IPs of a service cannot change (delete and re-create it)");
        }
        let old_np: Vec<(Protocol, u16)> = old
            .ports
            .iter()
            .filter_map(|p| p.node_port.map(|n| (p.protocol, n)))
            .collect();
        let new_np: Vec<(Protocol, u16)> = svc
            .ports
            .iter()
            .filter_map(|p| p.node_port.map(|n| (p.protocol, n)))
            .collect();
        let mut cmp = vec![Compare::mod_revision(key.clone(), CompareOp::Equal, rev)];
        let mut ops = vec![TxnOp::put(key.clone(), svc.to_bytes(), None)];
        for (proto, np) in new_np.iter().filter(|x| !old_np.contains(x)) {
            let k = node_port_alloc_key(self.keys, *proto, *np);
            cmp.push(Compare::create_revision(k.clone(), CompareOp::Equal, 0));
            ops.push(TxnOp::put(k, svc.id(), None));
        }
        for (proto, np) in old_np.iter().filter(|x| !new_np.contains(x)) {
            ops.push(TxnOp::delete(
                node_port_alloc_key(self.keys, *proto, *np),
                None,
            ));
        }
        if !self.store.txn(Txn::new().when(cmp).and_then(ops)).await? {
            bail!(
                "service {} changed meanwhile, or a requested node port is taken; try again",
                svc.id()
            );
        }
        Ok(())
    }

    /// Deletes a service with its allocations and explicit endpoints.
    pub async fn delete(&self, namespace: &str, name: &str) -> Result<()> {
        let key = service_key(self.keys, namespace, name);
        let Some(kv) = self.store.get(&key).await? else {
            bail!("service {namespace}/{name} does not exist");
        };
        let mut ops = vec![
            TxnOp::delete(key.clone(), None),
            TxnOp::delete(endpoints_key(self.keys, namespace, name), None),
        ];
        if let Ok(s) = Service::parse(&kv.value) {
            for ip in s.cluster_ips() {
                ops.push(TxnOp::delete(cluster_ip_alloc_key(self.keys, ip), None));
            }
            for p in &s.ports {
                if let Some(np) = p.node_port {
                    ops.push(TxnOp::delete(
                        node_port_alloc_key(self.keys, p.protocol, np),
                        None,
                    ));
                }
            }
        } else {
            // A malformed record still gets deleted; find its allocations by owner.
            let owner = format!("{namespace}/{name}");
            let (_, allocs) = self
                .store
                .list(&crate::store::keys::alloc_prefix(self.keys))
                .await?;
            for a in allocs.into_iter().filter(|a| a.value == owner.as_bytes()) {
                ops.push(TxnOp::delete(a.key, None));
            }
        }
        let cmp = vec![Compare::mod_revision(
            key,
            CompareOp::Equal,
            kv.mod_revision,
        )];
        if !self.store.txn(Txn::new().when(cmp).and_then(ops)).await? {
            // Deleted by someone else meanwhile (concurrent deletes): say so.
            if self
                .store
                .get(&service_key(self.keys, namespace, name))
                .await?
                .is_none()
            {
                bail!("service {namespace}/{name} does not exist");
            }
            bail!("service {namespace}/{name} changed meanwhile; try again");
        }
        Ok(())
    }

    /// Sets the explicit endpoints of a selector-less service.
    pub async fn set_endpoints(
        &self,
        namespace: &str,
        name: &str,
        e: &ExplicitEndpoints,
    ) -> Result<()> {
        let (svc, _) = self
            .get(namespace, name)
            .await?
            .with_context(|| format!("service {namespace}/{name} does not exist"))?;
        if svc.selector.is_some() {
            bail!("service {namespace}/{name} has a selector; its endpoints come from its pods");
        }
        let bytes = serde_json::to_vec(e).context("encoding endpoints")?;
        self.store
            .put(&endpoints_key(self.keys, namespace, name), bytes, 0)
            .await
    }

    /// Reads explicit endpoints.
    pub async fn get_endpoints(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<ExplicitEndpoints>> {
        match self
            .store
            .get(&endpoints_key(self.keys, namespace, name))
            .await?
        {
            None => Ok(None),
            Some(kv) => Ok(Some(ExplicitEndpoints::parse(&kv.value)?)),
        }
    }
}

/// Splits `NAME` or `NAMESPACE/NAME` (with a default namespace) and validates both parts.
pub fn split_id(id: &str, default_ns: &str) -> Result<(String, String)> {
    let (ns, name) = match id.split_once('/') {
        Some((ns, n)) => (ns.to_string(), n.to_string()),
        None => (default_ns.to_string(), id.to_string()),
    };
    if !valid_name(&ns) {
        bail!("namespace {ns:?}: use lowercase letters, digits and '-' (at most 63)");
    }
    if !valid_name(&name) {
        bail!("name {name:?}: use lowercase letters, digits and '-' (at most 63)");
    }
    Ok((ns, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert_eq!(
            split_id("web", "default").unwrap(),
            ("default".into(), "web".into())
        );
        assert_eq!(
            split_id("prod/web", "default").unwrap(),
            ("prod".into(), "web".into())
        );
        assert!(split_id("Web", "default").is_err());
        assert!(split_id("a/b/c", "default").is_err());
        assert!(split_id("", "default").is_err());
    }
}
