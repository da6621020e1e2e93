//! What each service's ingress traffic goes to: its ports and its ready endpoint addresses,
//! kept from the decoded service, pod and endpoints records ([`ModelChange`]s, fed by
//! `store::records::apply_feeds`) and published as [`Targets`], which the proxy's threads
//! read once per request.
//!
//! The endpoints are the proxy's and the DNS catalog's: a service with a selector goes to the
//! pods of its namespace it selects (a registered pod is a ready one: the node registers it
//! once its network is up and its record goes with the node's lease); a service without one
//! goes to its explicit endpoint addresses. A headless service has targets too: the ingress
//! connects to the endpoints, never to a cluster IP.
//!
//! Incremental: a pod change recomputes only the services of its namespace that select the
//! pod as it was or as it is; a service change recomputes that service; an endpoints change
//! that one. A recompute that changes nothing keeps the published value (and its
//! generation), so the proxy's per-service balancer state survives it.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;

use crate::model::ingress::{MAX_LABEL_LEN, PortRef};
use crate::model::pod::PodRecord;
use crate::model::service::{AddressGuard, ExplicitEndpoints, Protocol, Service, ServicePort};
use crate::store::records::{ModelChange, RecordSink};

/// Longest `namespace/name` of a valid service (two DNS labels and the slash); longer ids
/// (of records that skipped validation) are looked up with an allocated key.
const MAX_ID_LEN: usize = 2 * MAX_LABEL_LEN + 1;

/// Where one service's ingress traffic goes, as published for the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceTargets {
    /// The service's namespace.
    pub namespace: String,
    /// The service's name.
    pub name: String,
    /// The service's ports.
    pub ports: Vec<ServicePort>,
    /// The ready endpoint addresses, sorted, each once.
    pub addrs: Vec<Ipv4Addr>,
    /// Changes whenever the ports or addresses do (unique across services and over time:
    /// the proxy keys its per-service balancer state on it).
    pub generation: u64,
}

impl ServiceTargets {
    /// The endpoint port a route's `port` resolves to: [`PortRef::Number`] matches the
    /// service port of that number, [`PortRef::Name`] the port of that name; either gives its
    /// target port. Only TCP ports are served. The error says why, naming the service and
    /// its ports: `service default/shop has no port named "http" (ports: 80/tcp "web")`.
    pub fn target_port(&self, port: &PortRef) -> Result<u16, String> {
        let is = |p: &&ServicePort| match port {
            PortRef::Number(n) => p.port == *n,
            PortRef::Name(n) => p.name.as_deref() == Some(n.as_str()),
        };
        if let Some(p) = self
            .ports
            .iter()
            .filter(is)
            .find(|p| p.protocol == Protocol::Tcp)
        {
            return Ok(p.target_port);
        }
        let what = match port {
            PortRef::Number(n) => format!("port {n}"),
            PortRef::Name(n) => format!("port named {n:?}"),
        };
        let ports = self.ports_text();
        if self.ports.iter().any(|p| is(&p)) {
            return Err(format!(
                "service {}/{}'s {what} is not TCP, and the ingress forwards TCP only (ports: \
                 {ports})",
                self.namespace, self.name
            ));
        }
        Err(format!(
            "service {}/{} has no {what} (ports: {ports})",
            self.namespace, self.name
        ))
    }

    /// The ports as people read them: `80/tcp "web", 53/udp`, or `none`.
    pub fn ports_text(&self) -> String {
        if self.ports.is_empty() {
            return "none".into();
        }
        let mut out = String::new();
        for (i, p) in self.ports.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            let _ = write!(out, "{}/{}", p.port, p.protocol);
            if let Some(n) = &p.name {
                let _ = write!(out, " {n:?}");
            }
        }
        out
    }
}

/// Every service's [`ServiceTargets`], shared with the proxy's threads: cheap to read per
/// request (a sharded map; a lookup allocates nothing for a valid service id).
#[derive(Debug, Default)]
pub struct Targets {
    by_id: DashMap<String, Arc<ServiceTargets>, ahash::RandomState>,
}

impl Targets {
    /// The targets of service `namespace/service`, if it exists.
    pub fn get(&self, namespace: &str, service: &str) -> Option<Arc<ServiceTargets>> {
        let len = namespace.len() + 1 + service.len();
        if len > MAX_ID_LEN {
            return self
                .by_id
                .get(format!("{namespace}/{service}").as_str())
                .map(|t| Arc::clone(t.value()));
        }
        let mut buf = [0u8; MAX_ID_LEN];
        buf[..namespace.len()].copy_from_slice(namespace.as_bytes());
        buf[namespace.len()] = b'/';
        buf[namespace.len() + 1..len].copy_from_slice(service.as_bytes());
        // Two strings and a '/' are UTF-8.
        let id = std::str::from_utf8(&buf[..len]).ok()?;
        self.by_id.get(id).map(|t| Arc::clone(t.value()))
    }

    /// How many services have targets.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no service has targets.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Every endpoint address of every service (to forget state of endpoints gone).
    pub fn all_addrs(&self) -> std::collections::HashSet<std::net::Ipv4Addr> {
        self.by_id
            .iter()
            .flat_map(|t| t.value().addrs.clone())
            .collect()
    }
}

/// The services, pods and explicit endpoints the [`Targets`] are computed from; a
/// [`RecordSink`].
#[derive(Debug, Default)]
pub struct Backends {
    /// Etcd key → service.
    services: HashMap<String, Service>,
    /// `namespace/name` → the service's etcd key.
    key_of_id: HashMap<String, String>,
    /// Namespace → ids of its services with a selector (the ones pods can change).
    selecting_by_ns: HashMap<String, BTreeSet<String>>,
    /// Etcd key → pod record.
    pods: HashMap<String, PodRecord>,
    /// Namespace → keys of its pods.
    pods_by_ns: HashMap<String, BTreeSet<String>>,
    /// `namespace/name` → explicit endpoints.
    endpoints: HashMap<String, ExplicitEndpoints>,
    /// What is published.
    targets: Arc<Targets>,
    /// The last generation handed out.
    generation: u64,
    /// Whether every prefix was listed once.
    listed: bool,
    /// Which explicit endpoint addresses may be sent to (as tartand's service table admits
    /// them: never loopback, this host's own addresses, etcd, or a virtual address).
    guard: Option<AddressGuard>,
}

/// Adds `item` to the set of `map[group]`.
fn index(map: &mut HashMap<String, BTreeSet<String>>, group: &str, item: &str) {
    map.entry(group.to_string())
        .or_default()
        .insert(item.to_string());
}

/// Removes `item` from the set of `map[group]`, and the set when it empties.
fn unindex(map: &mut HashMap<String, BTreeSet<String>>, group: &str, item: &str) {
    if let Some(set) = map.get_mut(group) {
        set.remove(item);
        if set.is_empty() {
            map.remove(group);
        }
    }
}

impl Backends {
    /// Nothing known yet; explicit endpoints unchecked (tests).
    pub fn new() -> Self {
        Self::default()
    }

    /// Nothing known yet; explicit endpoints the `guard` refuses are left out (and said so
    /// in the log once per change of the service or its endpoints).
    pub fn with_guard(guard: AddressGuard) -> Self {
        Backends {
            guard: Some(guard),
            ..Self::default()
        }
    }

    /// The published targets (the same map for the life of `self`, updated in place).
    pub fn targets(&self) -> Arc<Targets> {
        self.targets.clone()
    }

    /// Whether every prefix was listed at least once: before that, a service without
    /// targets may only not be known yet.
    pub fn is_listed(&self) -> bool {
        self.listed
    }

    fn put_service(&mut self, key: String, s: Service) {
        let id = s.id();
        if let Some(old) = self.services.remove(&key) {
            self.forget_service(&old);
            if old.id() != id {
                self.recompute(&old.id());
            }
        }
        if s.selector.is_some() {
            index(&mut self.selecting_by_ns, &s.namespace, &id);
        }
        self.key_of_id.insert(id.clone(), key.clone());
        self.services.insert(key, s);
        self.recompute(&id);
    }

    fn delete_service(&mut self, key: &str) {
        if let Some(old) = self.services.remove(key) {
            self.forget_service(&old);
            self.recompute(&old.id());
        }
    }

    /// Takes a service out of the indexes (not out of `services`).
    fn forget_service(&mut self, s: &Service) {
        let id = s.id();
        unindex(&mut self.selecting_by_ns, &s.namespace, &id);
        self.key_of_id.remove(&id);
    }

    fn put_pod(&mut self, key: String, p: PodRecord) {
        let old = self.pods.remove(&key);
        if let Some(o) = &old {
            unindex(&mut self.pods_by_ns, &o.namespace, &key);
        }
        index(&mut self.pods_by_ns, &p.namespace, &key);
        let ids = self.selecting(old.as_ref(), Some(&p));
        self.pods.insert(key, p);
        for id in ids {
            self.recompute(&id);
        }
    }

    fn delete_pod(&mut self, key: &str) {
        if let Some(old) = self.pods.remove(key) {
            unindex(&mut self.pods_by_ns, &old.namespace, key);
            for id in self.selecting(Some(&old), None) {
                self.recompute(&id);
            }
        }
    }

    /// The ids of the services that select `old` or `new`.
    fn selecting(&self, old: Option<&PodRecord>, new: Option<&PodRecord>) -> BTreeSet<String> {
        let mut ids = BTreeSet::new();
        for p in [old, new].into_iter().flatten() {
            for id in self.selecting_by_ns.get(&p.namespace).into_iter().flatten() {
                if self.service(id).is_some_and(|s| s.selects(p)) {
                    ids.insert(id.clone());
                }
            }
        }
        ids
    }

    fn service(&self, id: &str) -> Option<&Service> {
        self.key_of_id.get(id).and_then(|k| self.services.get(k))
    }

    /// The ready endpoint addresses of `s`, sorted, each once.
    fn addresses(&self, s: &Service) -> Vec<Ipv4Addr> {
        let mut addrs: Vec<Ipv4Addr> = match &s.selector {
            Some(_) => self
                .pods_by_ns
                .get(&s.namespace)
                .into_iter()
                .flatten()
                .filter_map(|k| self.pods.get(k))
                .filter(|p| s.selects(p))
                .map(|p| p.ip)
                .collect(),
            None => self
                .endpoints
                .get(&s.id())
                .map(|e| {
                    e.addresses
                        .iter()
                        .map(|a| a.ip)
                        .filter(|ip| self.admitted(s, *ip))
                        .collect()
                })
                .unwrap_or_default(),
        };
        addrs.sort_unstable();
        addrs.dedup();
        addrs
    }

    /// Whether the guard admits the explicit endpoint `ip` of `s` (logged when it does not).
    fn admitted(&self, s: &Service, ip: Ipv4Addr) -> bool {
        match self.guard.as_ref().map(|g| g.endpoint(ip)) {
            None | Some(Ok(())) => true,
            Some(Err(why)) => {
                tracing::warn!(service = %s.id(), "ingress skips an explicit {why}");
                false
            }
        }
    }

    /// Recomputes and publishes the targets of service `id` (or withdraws them when it is
    /// gone); an unchanged result keeps the published value.
    fn recompute(&mut self, id: &str) {
        let Some(s) = self.service(id) else {
            self.targets.by_id.remove(id);
            return;
        };
        let ports = s.ports.clone();
        let addrs = self.addresses(s);
        let (namespace, name) = (s.namespace.clone(), s.name.clone());
        let same = self
            .targets
            .by_id
            .get(id)
            .is_some_and(|t| t.ports == ports && t.addrs == addrs);
        if same {
            return;
        }
        self.generation += 1;
        let t = ServiceTargets {
            namespace,
            name,
            ports,
            addrs,
            generation: self.generation,
        };
        self.targets.by_id.insert(id.to_string(), Arc::new(t));
    }
}

impl RecordSink for Backends {
    fn change(&mut self, c: ModelChange) {
        match c {
            ModelChange::PutService(key, s) => self.put_service(key, s),
            ModelChange::DeleteService(key) => self.delete_service(&key),
            ModelChange::PutPod(key, p) => self.put_pod(key, p),
            ModelChange::DeletePod(key) => self.delete_pod(&key),
            ModelChange::PutEndpoints(id, e) => {
                self.endpoints.insert(id.clone(), e);
                self.recompute(&id);
            }
            ModelChange::DeleteEndpoints(id) => {
                if self.endpoints.remove(&id).is_some() {
                    self.recompute(&id);
                }
            }
        }
    }

    fn held(&self) -> (Vec<String>, Vec<String>, Vec<String>) {
        (
            self.services.keys().cloned().collect(),
            self.pods.keys().cloned().collect(),
            self.endpoints.keys().cloned().collect(),
        )
    }

    fn settled(&mut self, listed: bool, _started: Instant) {
        if listed && !self.listed {
            self.listed = true;
            tracing::debug!(services = self.targets.len(), "ingress backends listed");
        }
    }
}

#[cfg(test)]
mod tests;
