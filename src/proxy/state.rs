//! The service proxy's in-memory model and its incremental planner: services, pods and
//! explicit endpoints as seen in etcd, the backends selected for each service, and what was
//! last written to the kernel. A change to one pod or service recomputes only the services it
//! touches and yields only the element changes they need. Pure: no I/O.

use std::collections::BTreeSet;

// A fast seeded hasher: the model hashes a few hundred thousand keys per full sync.
type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
type HashSet<K> = std::collections::HashSet<K, ahash::RandomState>;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use crate::kernel::nft_elements::{ElemData, SetOp};
#[cfg(test)]
use crate::model::pod::PodRecord;
use crate::model::service::{
    AddressGuard, Backend, ExplicitEndpoints, Protocol, Service, SessionAffinity,
};
use crate::proxy::rules::{
    Data, DynChain, Family, Key, MAX_SLOTS, NodeContext, PortRules, SetName, SlotBlock,
    hairpin_element, port_rules,
};

pub use crate::store::records::ModelChange;

/// A backend that left a service, for connection-tracking and affinity cleanup.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RemovedBackend {
    /// The service's cluster IP (of the table's family).
    pub cluster_ip: IpAddr,
    /// Service port.
    pub port: u16,
    /// Node port, if any.
    pub node_port: Option<u16>,
    /// Protocol.
    pub protocol: Protocol,
    /// The backend address.
    pub ip: IpAddr,
    /// The backend port.
    pub target_port: u16,
    /// Whether the service uses client-IP affinity.
    pub affinity: bool,
}

/// A UDP service port that went from no endpoints to some.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RevivedPort {
    /// The cluster IP (of the table's family).
    pub cluster_ip: IpAddr,
    /// The service port.
    pub port: u16,
    /// The node port, if any.
    pub node_port: Option<u16>,
}

/// Everything one sync must do, in order.
#[derive(Debug, Clone, Default)]
pub struct SyncPlan {
    /// Big services were left dirty for the next plan ([`ServiceState::plan_small_first`]).
    pub deferred: bool,
    /// Chains the new elements reference that no element referenced before.
    pub add_chains: BTreeSet<DynChain>,
    /// Chains no element references any more (removed after the element batch).
    pub drop_chains: BTreeSet<DynChain>,
    /// The element batch (one kernel transaction).
    pub ops: Vec<(String, SetOp)>,
    /// Backends that left services (UDP flows to clear, affinity entries to drop).
    pub removed: Vec<RemovedBackend>,
    /// UDP service ports that just got their first endpoint: flows conntrack still sends to
    /// the refusal must be cleared so clients reach the new endpoints.
    pub revived: Vec<RevivedPort>,
    /// Number of services whose rules were recomputed.
    pub recomputed: usize,
    /// Elements added plus deleted.
    pub element_changes: usize,
    /// Problems found (conflicting services, ...), to be logged.
    pub warnings: Vec<String>,
}

impl SyncPlan {
    /// True when the kernel needs nothing.
    pub fn is_empty(&self) -> bool {
        self.add_chains.is_empty() && self.drop_chains.is_empty() && self.ops.is_empty()
    }
}

type ElemKey = (SetName, Key);

/// Shared, interned text (node names, namespaces, labels, service ids repeat a lot).
type Sym = Arc<str>;

/// What the model keeps of a pod: only what selection and rules need, with interned text.
#[derive(Debug, Clone)]
struct PodEntry {
    /// The pod's address of the table's family.
    ip: IpAddr,
    node: Sym,
    namespace: Sym,
    labels: Box<[(Sym, Sym)]>,
}

/// Services with more endpoints than this are planned after the others when both change at
/// once ([`ServiceState::plan_small_first`]): their slot tables are in the uncounted maps
/// and a change of theirs can rewrite thousands of slots.
pub const BIG_SERVICE: usize = 512;

/// Pods with one label, by (address, pod key) → node.
type PodList = std::collections::BTreeMap<(IpAddr, Sym), Sym>;

/// The model and what was applied.
#[derive(Debug)]
pub struct ServiceState {
    ctx: NodeContext,
    /// Which cluster IPs, node ports and explicit endpoints may be programmed.
    guard: AddressGuard,
    /// Service id → what of it was not programmed, and why (for explain and a metric).
    problems: HashMap<Sym, Vec<String>>,
    interned: HashSet<Sym>,
    services: HashMap<String, Service>,
    service_key_by_id: HashMap<Sym, String>,
    pods: HashMap<Sym, PodEntry>,
    explicit: HashMap<String, ExplicitEndpoints>,
    /// (namespace, label, value) → the pods with that label, by (address, pod key), with
    /// their node: in address order, so a one-label selector reads its backends off sorted.
    pod_index: HashMap<(Sym, Sym, Sym), PodList>,
    /// (namespace, label, value) → service ids whose selector has that pair.
    selector_index: HashMap<(Sym, Sym, Sym), HashSet<Sym>>,
    /// Service id → backends (sorted).
    backends: HashMap<Sym, Vec<Backend>>,
    /// Service id → rules per port, as applied.
    applied_rules: HashMap<Sym, Vec<PortRules>>,
    /// Every applied element and the service owning it.
    applied: HashMap<ElemKey, (Data, Sym)>,
    chain_refs: HashMap<DynChain, usize>,
    hairpin: HashSet<IpAddr>,
    dirty: HashSet<Sym>,
    hairpin_dirty: bool,
    /// Elements another service holds, with the services that also want them.
    waiting: HashMap<ElemKey, HashSet<Sym>>,
    /// Backend slots applied (held in `applied_rules` as blocks, not in `applied`).
    slot_elements: usize,
}

fn selects(s: &Service, pod: &PodEntry) -> bool {
    match &s.selector {
        None => false,
        Some(sel) => {
            *pod.namespace == *s.namespace
                && sel
                    .iter()
                    .all(|(k, v)| pod.labels.iter().any(|(pk, pv)| **pk == **k && **pv == **v))
        }
    }
}

impl ServiceState {
    /// An empty model for this node, keeping services inside the node's service CIDR and
    /// off its cluster network.
    pub fn new(ctx: NodeContext) -> Self {
        let guard = match (ctx.service_cidr, ctx.cluster_network) {
            (ipnetwork::IpNetwork::V4(c), net) => AddressGuard {
                cluster_network: match net {
                    ipnetwork::IpNetwork::V4(n) => Some(n),
                    ipnetwork::IpNetwork::V6(_) => None,
                },
                ..AddressGuard::new(c)
            },
            // An IPv6 table consults only the IPv6 range (explicit endpoints, the one IPv4
            // check, are IPv4 and never programmed there).
            (ipnetwork::IpNetwork::V6(c), _) => AddressGuard {
                service_cidr6: Some(c),
                ..AddressGuard::new(ipnetwork::Ipv4Network::from(Ipv4Addr::UNSPECIFIED))
            },
        };
        Self::with_guard(ctx, guard)
    }

    /// An empty model that programs only what `guard` admits (tartand adds its own and
    /// etcd's addresses); the rest is skipped and reported by [`ServiceState::problems`].
    pub fn with_guard(ctx: NodeContext, guard: AddressGuard) -> Self {
        ServiceState {
            ctx,
            guard,
            problems: HashMap::default(),
            interned: HashSet::default(),
            services: HashMap::default(),
            service_key_by_id: HashMap::default(),
            pods: HashMap::default(),
            explicit: HashMap::default(),
            pod_index: HashMap::default(),
            selector_index: HashMap::default(),
            backends: HashMap::default(),
            applied_rules: HashMap::default(),
            applied: HashMap::default(),
            chain_refs: HashMap::default(),
            hairpin: HashSet::default(),
            dirty: HashSet::default(),
            hairpin_dirty: false,
            waiting: HashMap::default(),
            slot_elements: 0,
        }
    }

    fn intern(&mut self, s: &str) -> Sym {
        if let Some(x) = self.interned.get(s) {
            return x.clone();
        }
        let x: Sym = Arc::from(s);
        self.interned.insert(x.clone());
        x
    }

    /// The node context.
    pub fn context(&self) -> &NodeContext {
        &self.ctx
    }

    /// Number of services known.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Number of elements applied.
    pub fn element_count(&self) -> usize {
        self.applied.len() + self.hairpin.len() + self.slot_elements
    }

    /// Chains currently referenced.
    pub fn chains(&self) -> BTreeSet<DynChain> {
        self.chain_refs.keys().copied().collect()
    }

    /// Etcd keys of the services, pod records and explicit endpoints (`namespace/name`) held.
    pub fn keys(&self) -> (Vec<String>, Vec<String>, Vec<String>) {
        (
            self.services.keys().cloned().collect(),
            self.pods.keys().map(|k| k.to_string()).collect(),
            self.explicit.keys().cloned().collect(),
        )
    }

    /// What of service `id` was not programmed, and why (empty when all of it was).
    pub fn problems(&self, id: &str) -> &[String] {
        self.problems.get(id).map_or(&[][..], |p| p.as_slice())
    }

    /// Number of cluster IPs, node ports, explicit endpoints and contested elements currently
    /// skipped.
    pub fn problem_count(&self) -> usize {
        self.problems.values().map(Vec::len).sum()
    }

    /// Skips what of `s` the guard refuses: the whole service for a refused cluster IP, a
    /// headless service or one without a cluster IP of the table's family (returns false),
    /// single node ports otherwise. Reasons go to `problems`.
    fn admit(&self, s: &mut Service, problems: &mut Vec<String>) -> bool {
        // Headless: no virtual IP, nothing to program (its name resolves to its endpoints).
        let checked = match s.cluster_ip_of(self.ctx.family.ip_family()) {
            None => return false,
            Some(IpAddr::V4(ip)) => self.guard.cluster_ip(ip),
            Some(IpAddr::V6(ip)) => self.guard.cluster_ip6(ip),
        };
        if let Err(e) = checked {
            problems.push(format!("not programmed: {e}"));
            return false;
        }
        if s.session_affinity == SessionAffinity::ClientIp && !self.ctx.family.has_affinity() {
            problems.push(
                "client-IP affinity is not applied to the IPv6 cluster IP (nft cannot build \
                 the IPv6 affinity recorder): each new connection is balanced"
                    .into(),
            );
        }
        for p in s.ports.iter_mut() {
            if let Some(np) = p.node_port
                && let Err(e) = self.guard.node_port(np)
            {
                problems.push(format!(
                    "node port of {}/{} not programmed: {e}",
                    p.port, p.protocol
                ));
                p.node_port = None;
            }
        }
        true
    }

    /// Services with their current backends (for status output).
    pub fn services_with_backends(&self) -> Vec<(&Service, &[Backend])> {
        let mut v: Vec<_> = self
            .services
            .values()
            .map(|s| {
                let b = self
                    .backends
                    .get(s.id().as_str())
                    .map_or(&[][..], |b| b.as_slice());
                (s, b)
            })
            .collect();
        v.sort_by_key(|(s, _)| s.id());
        v
    }

    fn mark_pod_services(&mut self, pod: &PodEntry) {
        for (k, v) in pod.labels.iter() {
            let pair = (pod.namespace.clone(), k.clone(), v.clone());
            if let Some(ids) = self.selector_index.get(&pair) {
                for id in ids {
                    if let Some(key) = self.service_key_by_id.get(id)
                        && let Some(s) = self.services.get(key)
                        && selects(s, pod)
                    {
                        self.dirty.insert(id.clone());
                    }
                }
            }
        }
        if *pod.node == *self.ctx.node {
            self.hairpin_dirty = true;
        }
    }

    fn index_service(&mut self, s: &Service, id: &Sym, add: bool) {
        if let Some(sel) = &s.selector {
            for (k, v) in sel {
                let pair = (self.intern(&s.namespace), self.intern(k), self.intern(v));
                let e = self.selector_index.entry(pair).or_default();
                if add {
                    e.insert(id.clone());
                } else {
                    e.remove(id);
                }
            }
        }
    }

    fn remove_pod(&mut self, key: &str) {
        if let Some((k, old)) = self.pods.remove_entry(key) {
            for (lk, lv) in old.labels.iter() {
                let pair = (old.namespace.clone(), lk.clone(), lv.clone());
                if let Some(set) = self.pod_index.get_mut(&pair) {
                    set.remove(&(old.ip, k.clone()));
                    if set.is_empty() {
                        self.pod_index.remove(&pair);
                    }
                }
            }
            self.mark_pod_services(&old);
        }
    }

    fn remove_service(&mut self, key: &str) {
        if let Some(old) = self.services.remove(key) {
            let id = self.intern(&old.id());
            self.index_service(&old, &id, false);
            self.service_key_by_id.remove(&id);
            self.dirty.insert(id);
        }
    }

    /// Applies one change to the model and marks what it affects.
    pub fn change(&mut self, c: ModelChange) {
        match c {
            ModelChange::PutService(key, s) => {
                self.remove_service(&key);
                let id = self.intern(&s.id());
                self.index_service(&s, &id, true);
                self.service_key_by_id.insert(id.clone(), key.clone());
                self.dirty.insert(id);
                self.services.insert(key, s);
            }
            ModelChange::DeleteService(key) => self.remove_service(&key),
            ModelChange::PutPod(key, p) => {
                self.remove_pod(&key);
                // The pod's address of this table's family; a pod without one is no endpoint
                // here (an IPv4-only pod in the IPv6 table).
                let ip = match self.ctx.family {
                    Family::V4 => IpAddr::V4(p.ip),
                    Family::V6 => match p.ip6 {
                        Some(a) => IpAddr::V6(a),
                        None => return,
                    },
                };
                let key: Sym = Arc::from(key.as_str());
                let entry = PodEntry {
                    ip,
                    node: self.intern(&p.node),
                    namespace: self.intern(&p.namespace),
                    labels: p
                        .labels
                        .iter()
                        .map(|(k, v)| (self.intern(k), self.intern(v)))
                        .collect(),
                };
                for (lk, lv) in entry.labels.iter() {
                    self.pod_index
                        .entry((entry.namespace.clone(), lk.clone(), lv.clone()))
                        .or_default()
                        .insert((entry.ip, key.clone()), entry.node.clone());
                }
                self.mark_pod_services(&entry);
                self.pods.insert(key, entry);
            }
            ModelChange::DeletePod(key) => self.remove_pod(&key),
            ModelChange::PutEndpoints(id, e) => {
                self.explicit.insert(id.clone(), e);
                let id = self.intern(&id);
                self.dirty.insert(id);
            }
            ModelChange::DeleteEndpoints(id) => {
                self.explicit.remove(&id);
                let id = self.intern(&id);
                self.dirty.insert(id);
            }
        }
    }

    fn compute_backends(&self, s: &Service, problems: &mut Vec<String>) -> Vec<Backend> {
        let mut out: Vec<Backend> = match &s.selector {
            Some(sel) => {
                // Walk the smallest posting list among the selector's pairs (in address
                // order, so the result comes out sorted).
                let mut smallest: Option<&PodList> = None;
                for (k, v) in sel {
                    // Every label text a pod uses is interned; a text that is not cannot match.
                    let (Some(ns), Some(k), Some(v)) = (
                        self.interned.get(s.namespace.as_str()),
                        self.interned.get(k.as_str()),
                        self.interned.get(v.as_str()),
                    ) else {
                        return Vec::new();
                    };
                    let pair = (ns.clone(), k.clone(), v.clone());
                    match self.pod_index.get(&pair) {
                        None => return Vec::new(),
                        Some(l) => {
                            if smallest.is_none_or(|m| l.len() < m.len()) {
                                smallest = Some(l);
                            }
                        }
                    }
                }
                let list = smallest.into_iter().flatten();
                let mut out: Vec<Backend> = if sel.len() == 1 {
                    // The list is exactly the pods of the namespace with that one label.
                    list.map(|((ip, _), node)| Backend {
                        ip: *ip,
                        node: Some(node.clone()),
                    })
                    .collect()
                } else {
                    list.filter(|((_, k), _)| self.pods.get(k).is_some_and(|p| selects(s, p)))
                        .map(|((ip, _), node)| Backend {
                            ip: *ip,
                            node: Some(node.clone()),
                        })
                        .collect()
                };
                // Sorted by address already; one backend per address.
                out.dedup_by(|a, b| a.ip == b.ip);
                return out;
            }
            // Explicit endpoints are IPv4 addresses: none in the IPv6 table.
            None if self.ctx.family == Family::V6 => Vec::new(),
            None => self
                .explicit
                .get(&s.id())
                .map(|e| {
                    e.addresses
                        .iter()
                        .filter(|a| match self.guard.endpoint(a.ip) {
                            Ok(()) => true,
                            Err(why) => {
                                problems.push(format!("skipped: {why}"));
                                false
                            }
                        })
                        .map(|a| Backend {
                            ip: IpAddr::V4(a.ip),
                            node: a.node.as_deref().map(|n| {
                                self.interned
                                    .get(n)
                                    .cloned()
                                    .unwrap_or_else(|| Arc::from(n))
                            }),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        out.sort_unstable();
        out.dedup_by(|a, b| a.ip == b.ip);
        out
    }

    /// Whether some service waits to be recomputed (see [`ServiceState::plan_small_first`]).
    #[cfg(test)]
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Like [`ServiceState::plan`], but when big services (more than [`BIG_SERVICE`]
    /// endpoints as applied) and others are dirty together, plans only the others and leaves
    /// the big ones dirty for the next call: a small service's change then reaches the kernel
    /// in its own small batch instead of waiting behind tens of thousands of slot writes.
    pub fn plan_small_first(&mut self) -> SyncPlan {
        let big: Vec<Sym> = self
            .dirty
            .iter()
            .filter(|id| {
                self.backends
                    .get(*id)
                    .is_some_and(|b| b.len() > BIG_SERVICE)
            })
            .cloned()
            .collect();
        if big.is_empty() || big.len() == self.dirty.len() {
            return self.plan();
        }
        for id in &big {
            self.dirty.remove(id);
        }
        let mut plan = self.plan();
        self.dirty.extend(big);
        plan.deferred = true;
        plan
    }

    /// Recomputes every dirty service and returns the plan that brings the kernel there.
    /// The plan is considered applied once returned; on failure call [`ServiceState::reset_applied`]
    /// and plan a full sync. Phases: each dirty service's delta ([`ServiceState::plan_service`]),
    /// the hairpin set, chain reference counts, then one merged list of set operations.
    pub fn plan(&mut self) -> SyncPlan {
        let mut plan = SyncPlan::default();
        let mut acc = PendingOps::default();
        // Releasing a contested element makes the services waiting for it dirty again; a
        // second round picks them up.
        for _round in 0..3 {
            let dirty: Vec<Sym> = self.dirty.drain().collect();
            if dirty.is_empty() {
                break;
            }
            for id in dirty {
                plan.recomputed += 1;
                self.plan_service(id, &mut plan, &mut acc);
            }
        }
        self.plan_hairpin(&mut acc);
        self.count_chain_refs(std::mem::take(&mut acc.chain_delta), &mut plan);
        acc.merge_into(&mut plan);
        plan
    }

    /// Service `id`'s part of a plan: recomputes its backends and rules, records removed and
    /// revived backends in `plan`, and queues its element, slot and chain changes in `acc`.
    fn plan_service(&mut self, id: Sym, plan: &mut SyncPlan, acc: &mut PendingOps) {
        let mut svc = self
            .service_key_by_id
            .get(&id)
            .and_then(|k| self.services.get(k))
            .cloned();
        let known = svc.is_some();
        let mut problems = Vec::new();
        if let Some(s) = svc.as_mut()
            && !self.admit(s, &mut problems)
        {
            // Programmed as if deleted; still listed (with the reason) in status.
            svc = None;
        }
        let old_rules = self.applied_rules.remove(&id).unwrap_or_default();
        let old_backends = self.backends.remove(&id).unwrap_or_default();
        let (new_rules, new_backends) = match &svc {
            Some(s) => {
                let b = self.compute_backends(s, &mut problems);
                let r: Vec<PortRules> = s
                    .ports
                    .iter()
                    .enumerate()
                    .map(|(i, p)| port_rules(s, p, &b, &self.ctx, old_rules.get(i)))
                    .collect();
                (r, b)
            }
            None => (Vec::new(), Vec::new()),
        };
        let vip = svc
            .as_ref()
            .and_then(|s| s.cluster_ip_of(self.ctx.family.ip_family()));
        note_backend_changes(
            &id,
            svc.as_ref().zip(vip),
            &old_backends,
            &new_backends,
            plan,
        );
        let kept_rules = self.diff_elements(
            &id,
            svc.as_ref(),
            &old_rules,
            new_rules,
            &mut problems,
            plan,
            acc,
        );
        for r in &old_rules {
            for c in &r.chains {
                *acc.chain_delta.entry(*c).or_default() -= 1;
            }
        }
        if known && !problems.is_empty() {
            self.problems.insert(id.clone(), problems);
        } else {
            self.problems.remove(&id);
        }
        let old_blocks: Vec<&SlotBlock> = old_rules.iter().flat_map(|r| r.blocks.iter()).collect();
        let new_blocks: Vec<&SlotBlock> = kept_rules.iter().flat_map(|r| r.blocks.iter()).collect();
        diff_blocks(&old_blocks, &new_blocks, &mut acc.dels, &mut acc.adds);
        let slots = |v: &[&SlotBlock]| v.iter().map(|b| b.len()).sum::<usize>();
        self.slot_elements = self.slot_elements + slots(&new_blocks) - slots(&old_blocks);
        if svc.is_some() {
            self.applied_rules.insert(id.clone(), kept_rules);
            self.backends.insert(id, new_backends);
        }
    }

    /// Queues the element changes from `old_rules` to `new_rules` for service `id`, element by
    /// element: an element another service holds is skipped (and waited for), one it no longer
    /// wants is deleted and passed to a waiting service. Returns the rules it now holds.
    #[allow(clippy::too_many_arguments)]
    fn diff_elements(
        &mut self,
        id: &Sym,
        svc: Option<&Service>,
        old_rules: &[PortRules],
        new_rules: Vec<PortRules>,
        problems: &mut Vec<String>,
        plan: &mut SyncPlan,
        acc: &mut PendingOps,
    ) -> Vec<PortRules> {
        let old_elems: HashMap<ElemKey, Data> = if old_rules.is_empty() {
            HashMap::default()
        } else {
            old_rules
                .iter()
                .flat_map(|r| r.elements.iter())
                .map(|e| ((e.set, e.key), e.data))
                .collect()
        };
        let mut kept_rules = Vec::with_capacity(new_rules.len());
        let mut new_keys: HashSet<ElemKey> = HashSet::default();
        let mut block_keys: HashSet<ElemKey> = HashSet::default();
        for (pi, r) in new_rules.into_iter().enumerate() {
            let mut kept = PortRules::default();
            for e in r.elements {
                let k = (e.set, e.key);
                if let Some((_, owner)) = self.applied.get(&k)
                    && *owner != *id
                {
                    self.waiting.entry(k).or_default().insert(id.clone());
                    let vip = svc.and_then(|s| s.cluster_ip_of(self.ctx.family.ip_family()));
                    let what = svc
                        .zip(vip)
                        .map_or_else(String::new, |(s, vip)| describe(e.set, s, vip, pi));
                    let text = format!("{what} is held by service {owner}; skipped");
                    plan.warnings.push(format!("service {id}: {text}"));
                    if !problems.contains(&text) {
                        problems.push(text);
                    }
                    continue;
                }
                if !new_keys.insert(k) {
                    continue;
                }
                match old_elems.get(&k) {
                    Some(d) if *d == e.data => {}
                    Some(_) => {
                        acc.dels
                            .entry(e.set)
                            .or_default()
                            .push(e.key.as_slice().to_vec());
                        acc.adds
                            .entry(e.set)
                            .or_default()
                            .push((e.key.as_slice().to_vec(), e.data.to_elem_data()));
                        self.applied.insert(k, (e.data, id.clone()));
                    }
                    None => {
                        acc.adds
                            .entry(e.set)
                            .or_default()
                            .push((e.key.as_slice().to_vec(), e.data.to_elem_data()));
                        self.applied.insert(k, (e.data, id.clone()));
                    }
                }
                kept.elements.push(e);
            }
            // A slot block belongs to whoever holds its port's verdict element (once).
            kept.blocks = r
                .blocks
                .into_iter()
                .filter(|b| {
                    new_keys.contains(&(b.verdict_set(), b.base))
                        && block_keys.insert((b.set, b.base))
                })
                .collect();
            kept.chains = r.chains;
            for c in &kept.chains {
                *acc.chain_delta.entry(*c).or_default() += 1;
            }
            kept_rules.push(kept);
        }
        for (k, _) in old_elems {
            if !new_keys.contains(&k) {
                if self.applied.get(&k).is_some_and(|(_, o)| *o == *id) {
                    self.applied.remove(&k);
                }
                if let Some(w) = self.waiting.remove(&k) {
                    self.dirty.extend(w.into_iter().filter(|w| w != id));
                }
                acc.dels
                    .entry(k.0)
                    .or_default()
                    .push(k.1.as_slice().to_vec());
            }
        }
        kept_rules
    }

    /// Queues the hairpin pairs for this node's pods, if they changed.
    fn plan_hairpin(&mut self, acc: &mut PendingOps) {
        if std::mem::take(&mut self.hairpin_dirty) {
            let want: HashSet<IpAddr> = self
                .pods
                .values()
                .filter(|p| *p.node == *self.ctx.node)
                .map(|p| p.ip)
                .collect();
            for ip in self.hairpin.difference(&want) {
                acc.dels
                    .entry(SetName::Hairpin)
                    .or_default()
                    .push(hairpin_element(*ip).key.as_slice().to_vec());
            }
            for ip in want.difference(&self.hairpin) {
                acc.adds
                    .entry(SetName::Hairpin)
                    .or_default()
                    .push((hairpin_element(*ip).key.as_slice().to_vec(), ElemData::None));
            }
            self.hairpin = want;
        }
    }

    /// Applies the chains' reference count changes; chains that gain their first user or lose
    /// their last go into the plan.
    fn count_chain_refs(&mut self, chain_delta: HashMap<DynChain, i64>, plan: &mut SyncPlan) {
        for (c, d) in chain_delta {
            if d == 0 {
                continue;
            }
            let before = self.chain_refs.get(&c).copied().unwrap_or(0) as i64;
            let after = (before + d).max(0);
            if before == 0 && after > 0 {
                plan.add_chains.insert(c);
            }
            if after == 0 {
                if before > 0 {
                    plan.drop_chains.insert(c);
                }
                self.chain_refs.remove(&c);
            } else {
                self.chain_refs.insert(c, after as usize);
            }
        }
    }

    /// Forgets what was applied and marks everything dirty: the next [`ServiceState::plan`]
    /// describes the whole table (callers flush every set first).
    pub fn reset_applied(&mut self) {
        self.applied_rules.clear();
        self.applied.clear();
        self.chain_refs.clear();
        self.hairpin.clear();
        self.backends.clear();
        self.waiting.clear();
        self.slot_elements = 0;
        let ids: Vec<String> = self.services.values().map(Service::id).collect();
        self.dirty = ids.iter().map(|i| self.intern(i)).collect();
        self.hairpin_dirty = true;
    }

    /// A full plan: flush every set, then add everything (one transaction).
    pub fn plan_full(&mut self) -> SyncPlan {
        self.reset_applied();
        let mut plan = self.plan();
        let mut ops: Vec<(String, SetOp)> = SetName::ALL
            .iter()
            .map(|s| (s.as_str().to_string(), SetOp::Flush))
            .collect();
        // A full plan never deletes single elements (the sets were flushed).
        ops.extend(
            plan.ops
                .drain(..)
                .filter(|(_, op)| matches!(op, SetOp::Add(_))),
        );
        plan.ops = ops;
        // A full sync knows nothing of what was there before: no cleanup to do.
        plan.removed.clear();
        plan.revived.clear();
        plan
    }
}

/// Records in `plan` what the backend change of service `id` means beyond the table: UDP ports
/// that got their first endpoint (refused flows to clear) and endpoints that left (their
/// conntrack and affinity entries), and warns when a service exceeds the slot limit.
fn note_backend_changes(
    id: &Sym,
    svc: Option<(&Service, IpAddr)>,
    old_backends: &[Backend],
    new_backends: &[Backend],
    plan: &mut SyncPlan,
) {
    if new_backends.len() > MAX_SLOTS as usize {
        plan.warnings.push(format!(
            "service {id} has {} endpoints; only the first {MAX_SLOTS} get slots",
            new_backends.len()
        ));
    }
    if let Some((s, vip)) = svc
        && old_backends.is_empty()
        && !new_backends.is_empty()
    {
        for p in s.ports.iter().filter(|p| p.protocol == Protocol::Udp) {
            plan.revived.push(RevivedPort {
                cluster_ip: vip,
                port: p.port,
                node_port: p.node_port,
            });
        }
    }
    if let Some((s, vip)) = svc {
        // Both lists are sorted by address: a merge finds the ones that left.
        let mut rest = new_backends.iter().map(|b| b.ip).peekable();
        let left = old_backends.iter().filter(|b| {
            while rest.next_if(|ip| *ip < b.ip).is_some() {}
            rest.peek() != Some(&b.ip)
        });
        for b in left {
            for p in &s.ports {
                plan.removed.push(RemovedBackend {
                    cluster_ip: vip,
                    port: p.port,
                    node_port: p.node_port,
                    protocol: p.protocol,
                    ip: b.ip,
                    target_port: p.target_port,
                    affinity: s.session_affinity == SessionAffinity::ClientIp,
                });
            }
        }
    }
}

type Dels = HashMap<SetName, Vec<Vec<u8>>>;
type Adds = HashMap<SetName, Vec<(Vec<u8>, ElemData)>>;

/// The set operations and chain reference changes a plan collects before they are merged.
#[derive(Default)]
struct PendingOps {
    dels: Dels,
    adds: Adds,
    chain_delta: HashMap<DynChain, i64>,
}

impl PendingOps {
    /// Appends the queued deletes and adds to `plan`, per set in a fixed order (deletes before
    /// adds, so a rewritten key is deleted then added in the same batch).
    fn merge_into(mut self, plan: &mut SyncPlan) {
        for set in SetName::ALL {
            if let Some(d) = self.dels.remove(&set) {
                plan.element_changes += d.len();
                plan.ops.push((set.as_str().to_string(), SetOp::Delete(d)));
            }
            if let Some(a) = self.adds.remove(&set) {
                plan.element_changes += a.len();
                plan.ops.push((set.as_str().to_string(), SetOp::Add(a)));
            }
        }
    }
}

/// Queues the slot changes from the `old` blocks of a service to its `new` ones. Blocks of the
/// same set and port key are compared slot by slot (a stable assignment changes few slots);
/// the others are deleted or added whole. Linear in the slots, no hashing.
fn diff_blocks(old: &[&SlotBlock], new: &[&SlotBlock], dels: &mut Dels, adds: &mut Adds) {
    let same = |a: &SlotBlock, b: &SlotBlock| a.set == b.set && a.base == b.base;
    for n in new {
        let o = old.iter().find(|o| same(o, n));
        let len = o.map_or(0, |o| o.len());
        for s in 0..len.max(n.len()) {
            let (had, has) = (s < len, s < n.len());
            if had && has && o.is_some_and(|o| o.data(s) == n.data(s)) {
                continue;
            }
            if had {
                dels.entry(n.set)
                    .or_default()
                    .push(n.key(s).as_slice().to_vec());
            }
            if has {
                adds.entry(n.set)
                    .or_default()
                    .push((n.key(s).as_slice().to_vec(), n.data(s).to_elem_data()));
            }
        }
    }
    for o in old.iter().filter(|o| !new.iter().any(|n| same(o, n))) {
        let d = dels.entry(o.set).or_default();
        d.extend((0..o.len()).map(|s| o.key(s).as_slice().to_vec()));
    }
}

/// What an element of port `pi` of `s` stands for, in the operator's terms.
fn describe(set: SetName, s: &Service, vip: IpAddr, pi: usize) -> String {
    let Some(p) = s.ports.get(pi) else {
        return format!("an element of {}", set.as_str());
    };
    match set {
        SetName::ServiceNodePorts
        | SetName::NodePortBackends
        | SetName::BigNodePortBackends
        | SetName::NoEndpointNodePorts
        | SetName::AffinityNodePorts => match p.node_port {
            Some(np) => format!("node port {np}/{}", p.protocol),
            None => format!("a node port of {}/{}", p.port, p.protocol),
        },
        _ => match vip {
            IpAddr::V4(a) => format!("{a}:{}/{}", p.port, p.protocol),
            IpAddr::V6(a) => format!("[{a}]:{}/{}", p.port, p.protocol),
        },
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod memory_probe {
    use super::*;
    use crate::model::service::{DEFAULT_AFFINITY_TIMEOUT, TrafficPolicy};

    fn probe_ctx() -> NodeContext {
        NodeContext {
            node: "n1".into(),
            family: crate::proxy::rules::Family::V4,
            cluster_network: "10.244.0.0/16".parse().unwrap(),
            service_cidr: "10.96.0.0/12".parse().unwrap(),
            balancing: Default::default(),
        }
    }

    fn rss() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    #[ignore]
    fn memory_10k() {
        let n: u32 = std::env::var("PROBE_SERVICES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000);
        let ctx = probe_ctx();
        let r0 = rss();
        let mut st = ServiceState::new(ctx);
        let t0 = std::time::Instant::now();
        for i in 0..n {
            st.change(ModelChange::PutService(
                format!("/tartan/services/bench/s{i}"),
                Service {
                    namespace: "bench".into(),
                    name: format!("s{i}"),
                    cluster_ip: Ipv4Addr::from(0x0a60_0000 + i),
                    ports: vec!["80:8080/tcp".parse().unwrap()],
                    selector: Some([("app".to_string(), format!("a{i}"))].into()),
                    session_affinity: SessionAffinity::None,
                    session_affinity_timeout: DEFAULT_AFFINITY_TIMEOUT,
                    external_traffic_policy: TrafficPolicy::Cluster,
                    cluster_ips: Vec::new(),
                    ip_families: Vec::new(),
                    ip_family_policy: Default::default(),
                },
            ));
            for k in 0..5 {
                st.change(ModelChange::PutPod(
                    format!("/tartan/pods/elsewhere/c{i}x{k}/eth0"),
                    PodRecord {
                        ip6: None,
                        container_id: format!("c{i}x{k}"),
                        ifname: "eth0".into(),
                        node: "elsewhere".into(),
                        ip: Ipv4Addr::from(0x0ac8_0000 + i * 8 + k),
                        namespace: "bench".into(),
                        name: format!("p{i}x{k}"),
                        labels: [("app".to_string(), format!("a{i}"))].into(),
                    },
                ));
            }
        }
        let r1 = rss();
        let t1 = std::time::Instant::now();
        let plan = st.plan_full();
        let t2 = std::time::Instant::now();
        eprintln!("model built in {:?}, full plan in {:?}", t1 - t0, t2 - t1);
        let r2 = rss();
        let n: usize = plan
            .ops
            .iter()
            .map(|(_, o)| match o {
                SetOp::Add(v) => v.len(),
                _ => 0,
            })
            .sum();
        drop(plan);
        let r3 = rss();
        eprintln!(
            "model {} MB, +plan {} MB ({n} elements), after dropping plan {} MB",
            (r1 - r0) / 1024,
            (r2 - r1) / 1024,
            (r3 - r0) / 1024
        );
    }

    /// Growth of one service 1 → 10,000 endpoints in steps of 100, then single changes:
    /// plan time and element changes (run in release with `--ignored --nocapture`).
    #[test]
    #[ignore]
    fn big_service_probe() {
        let ctx = probe_ctx();
        let mut st = ServiceState::new(ctx);
        st.change(ModelChange::PutService(
            "/s/big".into(),
            Service {
                namespace: "d".into(),
                name: "big".into(),
                cluster_ip: Ipv4Addr::new(10, 96, 0, 1),
                ports: vec!["80:8080/tcp".parse().unwrap()],
                selector: Some([("app".to_string(), "big".to_string())].into()),
                session_affinity: SessionAffinity::None,
                session_affinity_timeout: DEFAULT_AFFINITY_TIMEOUT,
                external_traffic_policy: TrafficPolicy::Cluster,
                cluster_ips: Vec::new(),
                ip_families: Vec::new(),
                ip_family_policy: Default::default(),
            },
        ));
        let pod = |k: u32| {
            (
                format!("/p/x/c{k}/eth0"),
                PodRecord {
                    ip6: None,
                    container_id: format!("c{k}"),
                    ifname: "eth0".into(),
                    node: "x".into(),
                    ip: Ipv4Addr::from(0x0ac8_0000 + k),
                    namespace: "d".into(),
                    name: format!("p{k}"),
                    labels: [("app".to_string(), "big".to_string())].into(),
                },
            )
        };
        let t = std::time::Instant::now();
        let (mut changes, mut plan_t) = (0, std::time::Duration::ZERO);
        for step in 0..100u32 {
            for k in step * 100..(step + 1) * 100 {
                let (key, p) = pod(k);
                st.change(ModelChange::PutPod(key, p));
            }
            let t0 = std::time::Instant::now();
            let p = st.plan();
            plan_t += t0.elapsed();
            changes += p.element_changes;
        }
        eprintln!(
            "growth: {:?} total, plan {plan_t:?}, {changes} element changes",
            t.elapsed()
        );
        let mut worst = std::time::Duration::ZERO;
        for k in 0..100u32 {
            let (key, p) = pod(20_000 + k);
            st.change(ModelChange::PutPod(key, p));
            let t0 = std::time::Instant::now();
            let p = st.plan();
            worst = worst.max(t0.elapsed());
            assert!(p.element_changes < 40, "{}", p.element_changes);
        }
        eprintln!("one endpoint added: plan worst {worst:?}");
        let svc = st.services.get("/s/big").unwrap().clone();
        let id: Sym = Arc::from("d/big");
        for _ in 0..3 {
            let t0 = std::time::Instant::now();
            let b = st.compute_backends(&svc, &mut Vec::new());
            let t1 = std::time::Instant::now();
            let prev = &st.applied_rules[&id][0];
            let r = port_rules(&svc, &svc.ports[0], &b, &st.ctx, Some(prev));
            let t2 = std::time::Instant::now();
            let (mut d, mut a) = (Dels::default(), Adds::default());
            diff_blocks(&[&prev.blocks[0]], &[&r.blocks[0]], &mut d, &mut a);
            let t3 = std::time::Instant::now();
            let _c = r.clone();
            eprintln!(
                "backends {:?}, port_rules {:?}, diff {:?}, clone {:?}",
                t1 - t0,
                t2 - t1,
                t3 - t2,
                t3.elapsed()
            );
        }
    }

    /// One pod leaving and rejoining 1,000 services that all select it (the ingress bench's
    /// `changes-pods` case): plan time and element changes (run in release with
    /// `--ignored --nocapture`).
    #[test]
    #[ignore]
    fn pod_change_with_1000_services() {
        let ctx = probe_ctx();
        let mut st = ServiceState::new(ctx);
        for i in 0..1000u32 {
            st.change(ModelChange::PutService(
                format!("/tartan/services/bench/s{i}"),
                Service {
                    namespace: "bench".into(),
                    name: format!("s{i}"),
                    cluster_ip: Ipv4Addr::from(0x0a60_0000 + i),
                    ports: vec!["80:8080/tcp".parse().unwrap()],
                    selector: Some([("app".to_string(), "bench".to_string())].into()),
                    session_affinity: SessionAffinity::None,
                    session_affinity_timeout: DEFAULT_AFFINITY_TIMEOUT,
                    external_traffic_policy: TrafficPolicy::Cluster,
                    cluster_ips: Vec::new(),
                    ip_families: Vec::new(),
                    ip_family_policy: Default::default(),
                },
            ));
        }
        let pod = |k: u32| {
            (
                format!("/tartan/pods/n{}/c{k}/eth0", k % 2),
                PodRecord {
                    ip6: None,
                    container_id: format!("c{k}"),
                    ifname: "eth0".into(),
                    node: format!("n{}", k % 2),
                    ip: Ipv4Addr::from(0x0af4_0000 + k),
                    namespace: "bench".into(),
                    name: format!("p{k}"),
                    labels: [("app".to_string(), "bench".to_string())].into(),
                },
            )
        };
        for k in 0..4 {
            let (key, p) = pod(k);
            st.change(ModelChange::PutPod(key, p));
        }
        let _ = st.plan_full();
        for _ in 0..5 {
            let (key, p) = pod(2);
            let t0 = std::time::Instant::now();
            st.change(ModelChange::DeletePod(key.clone()));
            let pl = st.plan();
            let t1 = std::time::Instant::now();
            st.change(ModelChange::PutPod(key, p));
            let pl2 = st.plan();
            eprintln!(
                "delete: {:?} ({} recomputed, {} element changes, {} ops), put: {:?} ({} changes)",
                t1 - t0,
                pl.recomputed,
                pl.element_changes,
                pl.ops.len(),
                t1.elapsed(),
                pl2.element_changes
            );
        }
    }
}
