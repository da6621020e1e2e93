//! Pure overlay planning: which routes, neighbours and FDB entries a node needs for its peers
//! (flannel's VXLAN semantics), and the difference between that and what the kernel holds.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::model::netconf::NetworkConfig;
use crate::model::node_record::LiveClaim;
use crate::model::subnet_lease::{LeaseValue, MacAddr, subnet_from_key};
use crate::store::etcd::KvItem;

/// A peer node as read from its subnet lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The peer's pod subnet.
    pub subnet: Ipv4Network,
    /// The peer's underlay address.
    pub public_ip: Ipv4Addr,
    /// The peer's VTEP MAC.
    pub vtep_mac: MacAddr,
}

/// The local node's side of the plan.
#[derive(Debug, Clone)]
pub struct LocalNode {
    /// This node's pod subnet (excluded from the peers).
    pub subnet: Ipv4Network,
    /// Networks directly connected on the underlay interface (for DirectRouting).
    pub underlay_networks: Vec<Ipv4Network>,
    /// Route directly to peers on the same L2 segment.
    pub direct_routing: bool,
}

/// Where a route to a peer subnet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteVia {
    /// Through the VXLAN device, via the peer's `<subnet>.0` gateway, onlink.
    Vxlan(Ipv4Addr),
    /// Directly through the underlay interface, via the peer's public IP.
    Underlay(Ipv4Addr),
}

/// Overlay state on one node: what is desired, or what the kernel holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayState {
    /// Routes by destination subnet.
    pub routes: BTreeMap<Ipv4Network, RouteVia>,
    /// Permanent neighbours on the VXLAN device: peer gateway → VTEP MAC.
    pub neighbours: BTreeMap<Ipv4Addr, MacAddr>,
    /// FDB entries on the VXLAN device: VTEP MAC → peer public IP.
    pub fdb: BTreeMap<MacAddr, Ipv4Addr>,
}

/// The changes that bring the kernel from `actual` to `desired`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlayDiff {
    /// Routes to add or replace.
    pub put_routes: Vec<(Ipv4Network, RouteVia)>,
    /// Routes to delete (with what the kernel holds now).
    pub del_routes: Vec<(Ipv4Network, RouteVia)>,
    /// Neighbours to add or replace.
    pub put_neighbours: Vec<(Ipv4Addr, MacAddr)>,
    /// Neighbours to delete.
    pub del_neighbours: Vec<(Ipv4Addr, MacAddr)>,
    /// FDB entries to add or replace.
    pub put_fdb: Vec<(MacAddr, Ipv4Addr)>,
    /// FDB entries to delete.
    pub del_fdb: Vec<(MacAddr, Ipv4Addr)>,
}

impl OverlayDiff {
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

/// The gateway address of a subnet in flannel's scheme: the subnet's network address.
pub fn gateway_of(subnet: Ipv4Network) -> Ipv4Addr {
    subnet.network()
}

/// A subnet lease left out because another lease claims the same VTEP MAC or public IP and
/// ranks higher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConflict {
    /// The losing lease's key.
    pub key: String,
    /// Its subnet.
    pub subnet: Ipv4Network,
    /// What it collides with and why the other lease won, for people.
    pub reason: String,
}

/// The peers of a node as decoded from the subnet leases.
#[derive(Debug, Clone, Default)]
pub struct PeerSet {
    /// Peers to program (own subnet excluded), free of conflicts.
    pub peers: Vec<Peer>,
    /// One message per undecodable or out-of-network key.
    pub skipped: Vec<String>,
    /// Leases that lost a conflict (the own lease never does).
    pub conflicts: Vec<LeaseConflict>,
}

/// A decoded lease competing for its VTEP MAC and public IP.
struct Candidate<'a> {
    key: &'a str,
    peer: Peer,
    own: bool,
    claimed_by: Option<&'a str>,
    has_lease: bool,
    mod_revision: i64,
}

impl Candidate<'_> {
    /// Higher wins: the node's own lease, then the lease a live node says it holds, then one
    /// attached to an etcd lease over a lease-less key, then the older one, then subnet order.
    fn rank(
        &self,
    ) -> (
        bool,
        bool,
        bool,
        std::cmp::Reverse<i64>,
        std::cmp::Reverse<u32>,
    ) {
        (
            self.own,
            self.claimed_by.is_some(),
            self.has_lease,
            std::cmp::Reverse(self.mod_revision),
            std::cmp::Reverse(u32::from(self.peer.subnet.network())),
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

/// Decodes peer leases from subnet keys; garbage is skipped and reported, never fatal.
/// Leases that claim the same VTEP MAC or public IP are resolved by [`Candidate::rank`]: a
/// stray or stale key can never displace a live node on its peers.
pub fn peers_from_items<'a>(
    items: impl IntoIterator<Item = &'a KvItem>,
    cfg: &NetworkConfig,
    own_subnet: Option<Ipv4Network>,
    live: &'a [LiveClaim],
) -> PeerSet {
    let mut set = PeerSet::default();
    let mut candidates = Vec::new();
    for it in items {
        let suffix = it.key.rsplit('/').next().unwrap_or_default();
        let subnet = match subnet_from_key(suffix) {
            Ok(s) => s,
            Err(e) => {
                set.skipped.push(format!("{}: {e}", it.key));
                continue;
            }
        };
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
        let peer = Peer {
            subnet,
            public_ip: value.public_ip,
            vtep_mac: data.vtep_mac,
        };
        let claimed_by = live
            .iter()
            .find(|c| c.subnet == subnet && c.vtep_mac == peer.vtep_mac)
            .map(|c| c.node.as_str());
        candidates.push(Candidate {
            key: &it.key,
            peer,
            own,
            claimed_by,
            has_lease: it.lease != 0,
            mod_revision: it.mod_revision,
        });
    }
    candidates.sort_by_key(|c| std::cmp::Reverse(c.rank()));
    let mut by_mac: std::collections::HashMap<MacAddr, usize> = Default::default();
    let mut by_ip: std::collections::HashMap<Ipv4Addr, usize> = Default::default();
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
            set.conflicts.push(LeaseConflict {
                key: c.key.to_string(),
                subnet: c.peer.subnet,
                reason: format!("{what} is also claimed by {}", candidates[w].describe()),
            });
            continue;
        }
        by_mac.insert(c.peer.vtep_mac, i);
        by_ip.insert(c.peer.public_ip, i);
        if !c.own {
            set.peers.push(c.peer.clone());
        }
    }
    set.peers
        .sort_by_key(|p| (u32::from(p.subnet.network()), p.subnet.prefix()));
    set
}

/// Computes the desired overlay state for `local` and its peers (conflict-free, as
/// [`peers_from_items`] returns them).
pub fn desired_state(local: &LocalNode, peers: &[Peer]) -> OverlayState {
    let mut st = OverlayState::default();
    for p in peers.iter().filter(|p| p.subnet != local.subnet) {
        let direct = local.direct_routing
            && local
                .underlay_networks
                .iter()
                .any(|n| n.contains(p.public_ip));
        if direct {
            st.routes.insert(p.subnet, RouteVia::Underlay(p.public_ip));
            continue;
        }
        let gw = gateway_of(p.subnet);
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
pub fn diff(desired: &OverlayState, actual: &OverlayState) -> OverlayDiff {
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
