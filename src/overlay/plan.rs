//! Pure overlay planning: which routes, neighbours and FDB entries a node needs for its peers
//! (flannel's VXLAN semantics), and the difference between that and what the kernel holds.
//! The plan is the same for both address families ([`V4`], [`V6`]): a dual-stack node has
//! one VXLAN device per family (flannel's `flannel.<VNI>` and `flannel-v6.<VNI>`), each
//! with its own VTEP MAC, and one plan for each.

use std::collections::BTreeMap;
use std::fmt::{Debug, Display};
use std::hash::Hash;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};

use crate::model::netconf::NetworkConfig;
use crate::model::node_record::LiveClaim;
use crate::model::subnet_lease::{LeaseValue, MacAddr, SubnetKey, VxlanBackendData};
use crate::store::etcd::KvItem;

/// An address family as the overlay plan sees it: its address and subnet types.
pub trait Family: Copy + Debug + Default + Eq + Ord + Hash + Send + Sync + 'static {
    /// An address of the family.
    type Addr: Copy + Debug + Display + Eq + Ord + Hash + Send + Sync + 'static;
    /// A subnet of the family.
    type Net: Copy + Debug + Display + Eq + Ord + Hash + Send + Sync + 'static;
    /// "IPv4" or "IPv6", for messages.
    const NAME: &'static str;
    /// The subnet's network address.
    fn network(net: Self::Net) -> Self::Addr;
    /// The subnet's prefix length.
    fn prefix(net: Self::Net) -> u8;
    /// Whether `addr` is inside `net`.
    fn contains(net: Self::Net, addr: Self::Addr) -> bool;
}

/// IPv4: `flannel.<VNI>`, the lease's `PublicIP` and `BackendData`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct V4;

/// IPv6: `flannel-v6.<VNI>`, the lease's `PublicIPv6` and `BackendV6Data`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct V6;

impl Family for V4 {
    type Addr = Ipv4Addr;
    type Net = Ipv4Network;
    const NAME: &'static str = "IPv4";
    fn network(net: Ipv4Network) -> Ipv4Addr {
        net.network()
    }
    fn prefix(net: Ipv4Network) -> u8 {
        net.prefix()
    }
    fn contains(net: Ipv4Network, addr: Ipv4Addr) -> bool {
        net.contains(addr)
    }
}

impl Family for V6 {
    type Addr = Ipv6Addr;
    type Net = Ipv6Network;
    const NAME: &'static str = "IPv6";
    fn network(net: Ipv6Network) -> Ipv6Addr {
        net.network()
    }
    fn prefix(net: Ipv6Network) -> u8 {
        net.prefix()
    }
    fn contains(net: Ipv6Network, addr: Ipv6Addr) -> bool {
        net.contains(addr)
    }
}

/// A peer node as read from its subnet lease (one family's half of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer<F: Family = V4> {
    /// The peer's pod subnet.
    pub subnet: F::Net,
    /// The peer's underlay address.
    pub public_ip: F::Addr,
    /// The peer's VTEP MAC (of its device of this family).
    pub vtep_mac: MacAddr,
}

/// The local node's side of the plan.
#[derive(Debug, Clone)]
pub struct LocalNode<F: Family = V4> {
    /// This node's pod subnet (excluded from the peers).
    pub subnet: F::Net,
    /// Networks directly connected on the underlay interface (for DirectRouting).
    pub underlay_networks: Vec<F::Net>,
    /// Route directly to peers on the same L2 segment.
    pub direct_routing: bool,
}

/// Where a route to a peer subnet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteVia<F: Family = V4> {
    /// Through the VXLAN device, via the peer's subnet address as gateway, onlink.
    Vxlan(F::Addr),
    /// Directly through the underlay interface, via the peer's public IP.
    Underlay(F::Addr),
}

/// Overlay state on one node: what is desired, or what the kernel holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayState<F: Family = V4> {
    /// Routes by destination subnet.
    pub routes: BTreeMap<F::Net, RouteVia<F>>,
    /// Permanent neighbours on the VXLAN device: peer gateway → VTEP MAC.
    pub neighbours: BTreeMap<F::Addr, MacAddr>,
    /// FDB entries on the VXLAN device: VTEP MAC → peer public IP.
    pub fdb: BTreeMap<MacAddr, F::Addr>,
}

impl<F: Family> Default for OverlayState<F> {
    fn default() -> Self {
        OverlayState {
            routes: BTreeMap::new(),
            neighbours: BTreeMap::new(),
            fdb: BTreeMap::new(),
        }
    }
}

/// The changes that bring the kernel from `actual` to `desired`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayDiff<F: Family = V4> {
    /// Routes to add or replace.
    pub put_routes: Vec<(F::Net, RouteVia<F>)>,
    /// Routes to delete (with what the kernel holds now).
    pub del_routes: Vec<(F::Net, RouteVia<F>)>,
    /// Neighbours to add or replace.
    pub put_neighbours: Vec<(F::Addr, MacAddr)>,
    /// Neighbours to delete.
    pub del_neighbours: Vec<(F::Addr, MacAddr)>,
    /// FDB entries to add or replace.
    pub put_fdb: Vec<(MacAddr, F::Addr)>,
    /// FDB entries to delete.
    pub del_fdb: Vec<(MacAddr, F::Addr)>,
}

impl<F: Family> Default for OverlayDiff<F> {
    fn default() -> Self {
        OverlayDiff {
            put_routes: Vec::new(),
            del_routes: Vec::new(),
            put_neighbours: Vec::new(),
            del_neighbours: Vec::new(),
            put_fdb: Vec::new(),
            del_fdb: Vec::new(),
        }
    }
}

impl<F: Family> OverlayDiff<F> {
    /// True when nothing needs to change.
    pub fn is_empty(&self) -> bool {
        self.put_routes.is_empty()
            && self.del_routes.is_empty()
            && self.put_neighbours.is_empty()
            && self.del_neighbours.is_empty()
            && self.put_fdb.is_empty()
            && self.del_fdb.is_empty()
    }

    /// Number of kernel operations the diff needs.
    pub fn len(&self) -> usize {
        self.put_routes.len()
            + self.del_routes.len()
            + self.put_neighbours.len()
            + self.del_neighbours.len()
            + self.put_fdb.len()
            + self.del_fdb.len()
    }
}

/// The gateway address of a subnet in flannel's scheme: the subnet's network address (for
/// IPv6 too: flannel routes a peer's `fd00:10:244:3::/64` via `fd00:10:244:3::`, onlink).
pub fn gateway_of<F: Family>(subnet: F::Net) -> F::Addr {
    F::network(subnet)
}

/// A subnet lease (one family's half) left out because another lease claims the same VTEP
/// MAC or public IP and ranks higher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConflict<F: Family = V4> {
    /// The losing lease's key.
    pub key: String,
    /// Its subnet.
    pub subnet: F::Net,
    /// What it collides with and why the other lease won, for people.
    pub reason: String,
}

/// The peers of a node as decoded from the subnet leases.
#[derive(Debug, Clone, Default)]
pub struct PeerSet {
    /// IPv4 peers to program (own subnet excluded), free of conflicts.
    pub peers: Vec<Peer>,
    /// IPv6 peers (the IPv6 halves of dual-stack leases), when the network has IPv6.
    pub peers6: Vec<Peer<V6>>,
    /// One message per undecodable or out-of-network key.
    pub skipped: Vec<String>,
    /// IPv6 halves left out (key, why) while their IPv4 half is a peer: the IPv6 subnet is
    /// outside the network's IPv6 pool, or the value lacks or garbles its IPv6 fields.
    pub ipv6_ignored: Vec<(String, String)>,
    /// IPv4 halves that lost a conflict (the own lease never does).
    pub conflicts: Vec<LeaseConflict>,
    /// IPv6 halves that lost a conflict.
    pub conflicts6: Vec<LeaseConflict<V6>>,
}

/// A decoded lease half competing for its VTEP MAC and public IP.
struct Candidate<'a, F: Family> {
    key: &'a str,
    peer: Peer<F>,
    own: bool,
    claimed_by: Option<&'a str>,
    has_lease: bool,
    mod_revision: i64,
}

impl<'a, F: Family> Candidate<'a, F> {
    /// The half `peer` of the lease `it`; `claimed_by` is the live node holding the lease.
    fn of(it: &'a KvItem, peer: Peer<F>, own: bool, claimed_by: Option<&'a str>) -> Self {
        Candidate {
            key: &it.key,
            peer,
            own,
            claimed_by,
            has_lease: it.lease != 0,
            mod_revision: it.mod_revision,
        }
    }

    /// Higher wins: the node's own lease, then the lease a live node says it holds, then one
    /// attached to an etcd lease over a lease-less key, then the older one, then subnet order.
    fn rank(
        &self,
    ) -> (
        bool,
        bool,
        bool,
        std::cmp::Reverse<i64>,
        std::cmp::Reverse<F::Addr>,
    ) {
        (
            self.own,
            self.claimed_by.is_some(),
            self.has_lease,
            std::cmp::Reverse(self.mod_revision),
            std::cmp::Reverse(F::network(self.peer.subnet)),
        )
    }

    fn describe(&self) -> String {
        match (self.own, self.claimed_by) {
            (true, _) => format!("{} (this node's own lease)", self.peer.subnet),
            (false, Some(n)) => format!("{} (held by the live node {n})", self.peer.subnet),
            (false, None) if self.has_lease => format!("{} (an older lease)", self.peer.subnet),
            (false, None) => format!("{} (an older lease-less key)", self.peer.subnet),
        }
    }
}

/// One family's candidates, in the order they were read.
struct Candidates<'a, F: Family>(Vec<Candidate<'a, F>>);

impl<'a, F: Family> Candidates<'a, F> {
    /// Keeps, for every VTEP MAC and every public IP, the highest-ranked claim; the rest are
    /// conflicts. Returns the peers (own lease left out) in subnet order.
    fn resolve(mut self) -> (Vec<Peer<F>>, Vec<LeaseConflict<F>>) {
        let candidates = &mut self.0;
        candidates.sort_by_key(|c| std::cmp::Reverse(c.rank()));
        let mut peers = Vec::new();
        let mut conflicts = Vec::new();
        let mut by_mac: std::collections::HashMap<MacAddr, usize> = Default::default();
        let mut by_ip: std::collections::HashMap<F::Addr, usize> = Default::default();
        for (i, c) in candidates.iter().enumerate() {
            let winner = by_mac
                .get(&c.peer.vtep_mac)
                .map(|w| (*w, format!("VTEP MAC {}", c.peer.vtep_mac)))
                .or_else(|| {
                    by_ip
                        .get(&c.peer.public_ip)
                        .map(|w| (*w, format!("public IP {}", c.peer.public_ip)))
                });
            if let Some((w, what)) = winner {
                conflicts.push(LeaseConflict {
                    key: c.key.to_string(),
                    subnet: c.peer.subnet,
                    reason: format!("{what} is also claimed by {}", candidates[w].describe()),
                });
                continue;
            }
            by_mac.insert(c.peer.vtep_mac, i);
            by_ip.insert(c.peer.public_ip, i);
            if !c.own {
                peers.push(c.peer.clone());
            }
        }
        peers.sort_by_key(|p| (F::network(p.subnet), F::prefix(p.subnet)));
        (peers, conflicts)
    }
}

/// Decodes peer leases from subnet keys; garbage is skipped and reported, never fatal.
/// Leases that claim the same VTEP MAC or public IP are resolved by [`Candidate::rank`]: a
/// stray or stale key can never displace a live node on its peers. A dual-stack key gives an
/// IPv4 peer and, when the network has IPv6 and the value carries `PublicIPv6` and
/// `BackendV6Data`, an IPv6 peer; a bad IPv6 half is reported and leaves the IPv4 half in
/// place (one bad field never cuts a node off from the other family).
pub fn peers_from_items<'a>(
    items: impl IntoIterator<Item = &'a KvItem>,
    cfg: &NetworkConfig,
    own_subnet: Option<Ipv4Network>,
    live: &'a [LiveClaim],
) -> PeerSet {
    let mut set = PeerSet::default();
    let mut v4 = Candidates::<V4>(Vec::new());
    let mut v6 = Candidates::<V6>(Vec::new());
    for it in items {
        let suffix = it.key.rsplit('/').next().unwrap_or_default();
        let key = match SubnetKey::parse(suffix) {
            Ok(k) => k,
            Err(e) => {
                set.skipped.push(format!("{}: {e}", it.key));
                continue;
            }
        };
        let subnet = key.v4;
        let own = Some(subnet) == own_subnet;
        if !own && (!cfg.network.contains(subnet.network()) || subnet.prefix() != cfg.subnet_len) {
            set.skipped.push(format!(
                "{}: subnet {subnet} is not a /{} inside {}",
                it.key, cfg.subnet_len, cfg.network
            ));
            continue;
        }
        let value = match LeaseValue::parse(&it.value) {
            Ok(v) => v,
            Err(e) => {
                if !own {
                    set.skipped.push(format!("{}: {e}", it.key));
                }
                continue;
            }
        };
        let data = match value.vxlan_data() {
            Ok(d) => d,
            // A bare reservation (no backend data yet) is not a peer; say so only for others.
            Err(_) if value.backend_data.is_none() && value.backend_type.is_empty() => continue,
            Err(e) => {
                if !own {
                    set.skipped.push(format!("{}: {e}", it.key));
                }
                continue;
            }
        };
        let claim = live
            .iter()
            .find(|c| c.subnet == subnet && c.vtep_mac == data.vtep_mac)
            .map(|c| c.node.as_str());
        let peer = Peer {
            subnet,
            public_ip: value.public_ip,
            vtep_mac: data.vtep_mac,
        };
        v4.0.push(Candidate::of(it, peer, own, claim));
        match ipv6_half(cfg, key, &value) {
            Ok(Some(peer)) => v6.0.push(Candidate::of(it, peer, own, claim)),
            Ok(None) => {}
            Err(why) if !own => set.ipv6_ignored.push((it.key.clone(), why)),
            Err(_) => {}
        }
    }
    (set.peers, set.conflicts) = v4.resolve();
    (set.peers6, set.conflicts6) = v6.resolve();
    set
}

/// The IPv6 peer a lease's key and value describe: `None` when the network or the key has
/// no IPv6; an error, for people, when the key's IPv6 subnet is outside the network's IPv6
/// pool or the value lacks or garbles its IPv6 fields.
fn ipv6_half(
    cfg: &NetworkConfig,
    key: SubnetKey,
    value: &LeaseValue,
) -> Result<Option<Peer<V6>>, String> {
    let (Some(pool), Some(subnet)) = (&cfg.ipv6, key.v6) else {
        return Ok(None);
    };
    if !pool.network.contains(subnet.network()) || subnet.prefix() != pool.subnet_len {
        return Err(format!(
            "subnet {subnet} is not a /{} inside {}",
            pool.subnet_len, pool.network
        ));
    }
    match value.vxlan_v6_data() {
        Ok(Some((public_ip, VxlanBackendData { vtep_mac, .. }))) => Ok(Some(Peer {
            subnet,
            public_ip,
            vtep_mac,
        })),
        Ok(None) => Err("the value has no PublicIPv6 and no BackendV6Data".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Computes the desired overlay state for `local` and its peers of one family
/// (conflict-free, as [`peers_from_items`] returns them).
pub fn desired_state<F: Family>(local: &LocalNode<F>, peers: &[Peer<F>]) -> OverlayState<F> {
    let mut st = OverlayState::default();
    for p in peers.iter().filter(|p| p.subnet != local.subnet) {
        let direct = local.direct_routing
            && local
                .underlay_networks
                .iter()
                .any(|n| F::contains(*n, p.public_ip));
        if direct {
            st.routes.insert(p.subnet, RouteVia::Underlay(p.public_ip));
            continue;
        }
        let gw = gateway_of::<F>(p.subnet);
        st.routes.insert(p.subnet, RouteVia::Vxlan(gw));
        st.neighbours.insert(gw, p.vtep_mac);
        st.fdb.insert(p.vtep_mac, p.public_ip);
    }
    st
}

/// Entries to put and entries to delete.
type PutDel<K, V> = (Vec<(K, V)>, Vec<(K, V)>);

fn diff_maps<K: Ord + Copy, V: PartialEq + Copy>(
    desired: &BTreeMap<K, V>,
    actual: &BTreeMap<K, V>,
) -> PutDel<K, V> {
    let put = desired
        .iter()
        .filter(|(k, v)| actual.get(k) != Some(v))
        .map(|(k, v)| (*k, *v))
        .collect();
    let del = actual
        .iter()
        .filter(|(k, _)| !desired.contains_key(k))
        .map(|(k, v)| (*k, *v))
        .collect();
    (put, del)
}

/// The operations that turn `actual` into `desired`.
pub fn diff<F: Family>(desired: &OverlayState<F>, actual: &OverlayState<F>) -> OverlayDiff<F> {
    let (put_routes, del_routes) = diff_maps(&desired.routes, &actual.routes);
    let (put_neighbours, del_neighbours) = diff_maps(&desired.neighbours, &actual.neighbours);
    let (put_fdb, del_fdb) = diff_maps(&desired.fdb, &actual.fdb);
    OverlayDiff {
        put_routes,
        del_routes,
        put_neighbours,
        del_neighbours,
        put_fdb,
        del_fdb,
    }
}

#[cfg(test)]
mod tests;
