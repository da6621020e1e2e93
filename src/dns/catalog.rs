//! From model objects to owner names and records, with CoreDNS's kubernetes-plugin names:
//!
//! - a service with a cluster IP: `<svc>.<ns>.svc.<zone>` A → cluster IP, PTR back, and SRV
//!   `_<port>._<proto>.<svc>.<ns>.svc.<zone>` → (port, the service name) per named port;
//! - a headless service: `<svc>.<ns>.svc.<zone>` A → every ready endpoint, and per endpoint
//!   `<host>.<svc>.<ns>.svc.<zone>` A, where `<host>` is the pod's name when it is a DNS
//!   label and the dashed address (`10-244-1-5`) otherwise; SRV per named port and endpoint
//!   → (target port, that host name);
//! - a pod: `<a-b-c-d>.<ns>.pod.<zone>` A and the PTR of its address back to it (only for
//!   pods that exist: CoreDNS's `pods verified`); on a dual-stack network also
//!   `<dashed IPv6>.<ns>.pod.<zone>` AAAA (`fd00-10-244-1--5`, CoreDNS's form: `:` → `-`) and
//!   its `ip6.arpa` PTR; a dual-stack service's name has AAAA → its IPv6 cluster IP (and
//!   that address's PTR); a headless service whose families include IPv6 (`ipFamilies`, or a
//!   dual-stack `ipFamilyPolicy`, as Kubernetes' endpoint slices go) carries each pod's AAAA
//!   beside its A.
//!
//! A change replaces exactly that object's records in the [`Zone`]: the old ones are
//! recomputed from the object it replaces (only headless services, whose records depend on
//! their pods, are remembered), so the catalog holds no second copy of the zone.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use hickory_proto::rr::{LowerName, Name};

use crate::dns::zone::{Origin, Rdata, Zone, reverse_name, reverse_name6};
use crate::model::pod::PodRecord;
use crate::model::service::{ExplicitEndpoints, IpFamily, IpFamilyPolicy, Service, valid_name};
use crate::store::records::ModelChange;

/// The SRV owner name of one named port.
struct SrvName {
    name: LowerName,
    port: u16,
    target_port: u16,
}

/// One record as the catalog hands it to the zone.
type Record = (LowerName, Rdata, Origin);

/// The model the DNS names are made from, and what each object put into the zone.
pub struct Catalog {
    zone: Arc<Zone>,
    domain: Name,
    services: HashMap<String, Service>,
    key_of_id: HashMap<String, String>,
    endpoints: HashMap<String, ExplicitEndpoints>,
    pods: HashMap<String, PodRecord>,
    pods_by_ns: HashMap<String, BTreeSet<String>>,
    headless_by_ns: HashMap<String, BTreeSet<String>>,
    /// What each headless service put into the zone (other objects' records are recomputed).
    headless_records: HashMap<String, Vec<Record>>,
    /// Names that could not be formed (too long), skipped.
    pub skipped: u64,
    /// The IPv6 service range this node programs: an IPv6 cluster IP outside it (or any, with
    /// none) gets no AAAA, so no client is sent where nothing answers.
    service_cidr6: Option<ipnetwork::Ipv6Network>,
}

impl Catalog {
    /// An empty catalog writing into `zone` for the cluster domain `domain` (e.g.
    /// `cluster.local.`), with the server's own name `ns.dns.<zone>` → `dns_ip`.
    pub fn new(zone: Arc<Zone>, domain: Name, dns_ip: Ipv4Addr) -> Self {
        if let Ok(ns) = Name::from_ascii("ns.dns").and_then(|n| n.append_domain(&domain)) {
            zone.add(&LowerName::new(&ns), Rdata::A(dns_ip), Origin::Server);
        }
        Catalog {
            zone,
            domain,
            services: HashMap::new(),
            key_of_id: HashMap::new(),
            endpoints: HashMap::new(),
            pods: HashMap::new(),
            pods_by_ns: HashMap::new(),
            headless_by_ns: HashMap::new(),
            headless_records: HashMap::new(),
            skipped: 0,
            service_cidr6: None,
        }
    }

    /// Publishes AAAA for IPv6 cluster IPs inside `range` (the node's IPv6 service range).
    pub fn with_service_cidr6(mut self, range: Option<ipnetwork::Ipv6Network>) -> Self {
        self.service_cidr6 = range;
        self
    }

    /// The etcd keys of the services, pods and the ids of the explicit endpoints held.
    pub fn keys(&self) -> (Vec<String>, Vec<String>, Vec<String>) {
        (
            self.services.keys().cloned().collect(),
            self.pods.keys().cloned().collect(),
            self.endpoints.keys().cloned().collect(),
        )
    }

    /// Applies one record change to the zone.
    pub fn change(&mut self, c: ModelChange) {
        match c {
            ModelChange::PutService(key, s) => {
                let id = s.id();
                let old = self.services.insert(key.clone(), s);
                if let Some(old) = &old {
                    self.unindex_headless(old);
                }
                if let Some(s) = self.services.get(&key)
                    && s.is_headless()
                    && s.selector.is_some()
                {
                    self.headless_by_ns
                        .entry(s.namespace.clone())
                        .or_default()
                        .insert(id.clone());
                }
                self.key_of_id.insert(id.clone(), key);
                self.refresh_service(&id, old.as_ref());
            }
            ModelChange::DeleteService(key) => {
                if let Some(old) = self.services.remove(&key) {
                    self.unindex_headless(&old);
                    let id = old.id();
                    self.key_of_id.remove(&id);
                    self.refresh_service(&id, Some(&old));
                }
            }
            ModelChange::PutEndpoints(id, e) => {
                self.endpoints.insert(id.clone(), e);
                self.refresh_headless(&id);
            }
            ModelChange::DeleteEndpoints(id) => {
                if self.endpoints.remove(&id).is_some() {
                    self.refresh_headless(&id);
                }
            }
            ModelChange::PutPod(key, p) => {
                let old = self.pods.insert(key.clone(), p.clone());
                if let Some(o) = &old {
                    self.unindex_pod(&key, o);
                }
                self.pods_by_ns
                    .entry(p.namespace.clone())
                    .or_default()
                    .insert(key.clone());
                let before = old
                    .as_ref()
                    .map(|o| self.pod_records(o))
                    .unwrap_or_default();
                let after = self.pod_records(&p);
                self.swap(&before, &after);
                self.refresh_selecting(old.as_ref(), Some(&p));
            }
            ModelChange::DeletePod(key) => {
                if let Some(old) = self.pods.remove(&key) {
                    self.unindex_pod(&key, &old);
                    let before = self.pod_records(&old);
                    self.swap(&before, &[]);
                    self.refresh_selecting(Some(&old), None);
                }
            }
        }
    }

    fn unindex_headless(&mut self, s: &Service) {
        if let Some(set) = self.headless_by_ns.get_mut(&s.namespace) {
            set.remove(&s.id());
            if set.is_empty() {
                self.headless_by_ns.remove(&s.namespace);
            }
        }
    }

    fn unindex_pod(&mut self, key: &str, p: &PodRecord) {
        if let Some(set) = self.pods_by_ns.get_mut(&p.namespace) {
            set.remove(key);
            if set.is_empty() {
                self.pods_by_ns.remove(&p.namespace);
            }
        }
    }

    /// Recomputes the headless services that select `old` or `new`.
    fn refresh_selecting(&mut self, old: Option<&PodRecord>, new: Option<&PodRecord>) {
        let mut ids = BTreeSet::new();
        for p in [old, new].into_iter().flatten() {
            for id in self.headless_by_ns.get(&p.namespace).into_iter().flatten() {
                let selects = self
                    .key_of_id
                    .get(id)
                    .and_then(|k| self.services.get(k))
                    .is_some_and(|s| s.selects(p));
                if selects {
                    ids.insert(id.clone());
                }
            }
        }
        for id in ids {
            self.refresh_headless(&id);
        }
    }

    /// Replaces service `id`'s records. A service with a cluster IP is recomputed from `old`
    /// (its records depend on the service alone); a headless one's records (which depend on
    /// its pods) are remembered, and only those.
    fn refresh_service(&mut self, id: &str, old: Option<&Service>) {
        let before = match old {
            Some(o) if !o.is_headless() => self.cluster_ip_records(o),
            _ => self.headless_records.remove(id).unwrap_or_default(),
        };
        let current = self
            .key_of_id
            .get(id)
            .and_then(|k| self.services.get(k))
            .cloned();
        let after = match &current {
            Some(s) if !s.is_headless() => self.cluster_ip_records(s),
            Some(s) => self.headless_service_records(s),
            None => Vec::new(),
        };
        self.swap(&before, &after);
        if current.is_some_and(|s| s.is_headless()) && !after.is_empty() {
            self.headless_records.insert(id.to_string(), after);
        }
    }

    /// Recomputes service `id` when it is headless (its endpoints or pods changed).
    fn refresh_headless(&mut self, id: &str) {
        let headless = self
            .key_of_id
            .get(id)
            .and_then(|k| self.services.get(k))
            .is_some_and(Service::is_headless);
        if headless || self.headless_records.contains_key(id) {
            self.refresh_service(id, None);
        }
    }

    /// Removes `before` and adds `after`, touching only the records that differ.
    fn swap(&self, before: &[Record], after: &[Record]) {
        let old_set: HashSet<&Record> = before.iter().collect();
        let new_set: HashSet<&Record> = after.iter().collect();
        for r in before.iter().filter(|r| !new_set.contains(r)) {
            self.zone.remove(&r.0, &r.1, r.2);
        }
        for r in after.iter().filter(|r| !old_set.contains(r)) {
            self.zone.add(&r.0, r.1.clone(), r.2);
        }
    }

    /// `<svc>.<ns>.svc.<zone>` and the SRV names of its named ports.
    fn service_names(&self, s: &Service) -> Option<(Name, Vec<SrvName>)> {
        let name = Name::from_ascii(format!("{}.{}.svc", s.name, s.namespace))
            .and_then(|n| n.append_domain(&self.domain))
            .ok()?;
        let srv = s
            .ports
            .iter()
            .filter_map(|p| {
                let pn = p.name.as_deref()?;
                let proto = p.protocol.to_string().to_ascii_lowercase();
                let n = Name::from_ascii(format!("_{pn}._{proto}"))
                    .and_then(|n| n.append_domain(&name))
                    .ok()?;
                Some(SrvName {
                    name: LowerName::new(&n),
                    port: p.port,
                    target_port: p.target_port,
                })
            })
            .collect();
        Some((name, srv))
    }

    /// A service with a cluster IP: A, PTR back, SRV per named port.
    fn cluster_ip_records(&self, s: &Service) -> Vec<Record> {
        let Some((name, srv)) = self.service_names(s) else {
            return Vec::new();
        };
        let mut out = vec![
            (
                LowerName::new(&name),
                Rdata::A(s.cluster_ip),
                Origin::Service,
            ),
            (
                LowerName::new(&reverse_name(s.cluster_ip)),
                Rdata::Ptr(name.clone()),
                Origin::Service,
            ),
        ];
        if let Some(ip6) = s
            .cluster_ip6()
            .filter(|ip| self.service_cidr6.is_some_and(|r| r.contains(*ip)))
        {
            out.push((LowerName::new(&name), Rdata::Aaaa(ip6), Origin::Service));
            out.push((
                LowerName::new(&reverse_name6(ip6)),
                Rdata::Ptr(name.clone()),
                Origin::Service,
            ));
        }
        for sn in srv {
            out.push((
                sn.name,
                srv_data(0, 100, sn.port, name.clone()),
                Origin::Service,
            ));
        }
        out
    }

    /// A headless service: A per endpoint on its name and on each endpoint's host name, SRV
    /// per named port and endpoint.
    fn headless_service_records(&mut self, s: &Service) -> Vec<Record> {
        let Some((name, srv)) = self.service_names(s) else {
            self.skipped += 1;
            return Vec::new();
        };
        let lname = LowerName::new(&name);
        let eps = self.headless_endpoints(s);
        let with_v6 = s.ip_families.contains(&IpFamily::IPv6)
            || s.ip_family_policy != IpFamilyPolicy::SingleStack;
        let weight = u16::try_from((100 / eps.len().max(1)).max(1)).unwrap_or(1);
        let mut out = Vec::new();
        for (ip, ip6, host) in &eps {
            let addrs: Vec<Rdata> = std::iter::once(Rdata::A(*ip))
                .chain(ip6.filter(|_| with_v6).map(Rdata::Aaaa))
                .collect();
            for a in &addrs {
                out.push((lname.clone(), a.clone(), Origin::Endpoint));
            }
            let Ok(host_name) = Name::from_ascii(host).and_then(|h| h.append_domain(&name)) else {
                self.skipped += 1;
                continue;
            };
            for a in addrs {
                out.push((LowerName::new(&host_name), a, Origin::Endpoint));
            }
            for sn in &srv {
                let r = srv_data(0, weight, sn.target_port, host_name.clone());
                out.push((sn.name.clone(), r, Origin::Endpoint));
            }
        }
        out
    }

    /// A headless service's ready endpoints (IPv4, the pod's IPv6 if any) with their host
    /// labels, sorted by address.
    fn headless_endpoints(&self, s: &Service) -> Vec<(Ipv4Addr, Option<Ipv6Addr>, String)> {
        let mut eps: Vec<(Ipv4Addr, Option<Ipv6Addr>, String)> = match &s.selector {
            None => self
                .endpoints
                .get(&s.id())
                .map(|e| {
                    e.addresses
                        .iter()
                        .map(|a| (a.ip, None, dashed(a.ip)))
                        .collect()
                })
                .unwrap_or_default(),
            Some(_) => self
                .pods_by_ns
                .get(&s.namespace)
                .into_iter()
                .flatten()
                .filter_map(|k| self.pods.get(k))
                .filter(|p| s.selects(p))
                .map(|p| {
                    let host = if valid_name(&p.name) {
                        p.name.clone()
                    } else {
                        dashed(p.ip)
                    };
                    (p.ip, p.ip6, host)
                })
                .collect(),
        };
        eps.sort();
        eps.dedup_by_key(|e| e.0);
        eps
    }

    fn pod_records(&self, p: &PodRecord) -> Vec<Record> {
        let mut out = Vec::new();
        for ip in std::iter::once(IpAddr::V4(p.ip)).chain(p.ip6.map(IpAddr::V6)) {
            let Ok(name) = Name::from_ascii(format!("{}.{}.pod", dashed_ip(ip), p.namespace))
                .and_then(|n| n.append_domain(&self.domain))
            else {
                continue;
            };
            let (addr, reverse) = match ip {
                IpAddr::V4(a) => (Rdata::A(a), reverse_name(a)),
                IpAddr::V6(a) => (Rdata::Aaaa(a), reverse_name6(a)),
            };
            out.push((LowerName::new(&name), addr, Origin::Pod));
            out.push((LowerName::new(&reverse), Rdata::Ptr(name), Origin::Pod));
        }
        out
    }
}

fn srv_data(priority: u16, weight: u16, port: u16, target: Name) -> Rdata {
    Rdata::Srv {
        priority,
        weight,
        port,
        target,
    }
}

/// `10.244.1.5` → `10-244-1-5`.
pub fn dashed(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("{}-{}-{}-{}", o[0], o[1], o[2], o[3])
}

/// A pod's address as a DNS label, CoreDNS's way: `10-244-1-5`, `fd00-10-244-1--5`.
pub fn dashed_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => dashed(a),
        IpAddr::V6(a) => a.to_string().replace(':', "-"),
    }
}

#[cfg(test)]
pub(crate) mod tests;

/// Fixtures other test modules of the room share.
#[cfg(test)]
pub(crate) mod tests_support {
    pub(crate) use super::tests::{catalog, pod, svc};
}
