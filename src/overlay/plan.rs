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
mod tests {
    use super::*;

    fn cfg() -> NetworkConfig {
        NetworkConfig::parse(br#"{"Network":"10.244.0.0/16"}"#).unwrap()
    }

    fn item(key: &str, value: &str) -> KvItem {
        KvItem {
            key: format!("/coreos.com/network/subnets/{key}"),
            value: value.as_bytes().to_vec(),
            lease: 1,
            mod_revision: 1,
        }
    }

    fn lease_json(ip: &str, mac: &str) -> String {
        format!(
            r#"{{"PublicIP":"{ip}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
        )
    }

    fn local(subnet: &str, direct: bool) -> LocalNode {
        LocalNode {
            subnet: subnet.parse().unwrap(),
            underlay_networks: vec!["192.168.1.0/24".parse().unwrap()],
            direct_routing: direct,
        }
    }

    #[test]
    fn decodes_peers_and_skips_garbage() {
        let items = vec![
            item(
                "10.244.1.0-24",
                &lease_json("192.168.1.1", "02:00:00:00:00:01"),
            ),
            item(
                "10.244.2.0-24",
                &lease_json("192.168.1.2", "02:00:00:00:00:02"),
            ),
            item("10.244.3.0-24", "garbage{"),
            item(
                "not-a-subnet",
                &lease_json("192.168.1.4", "02:00:00:00:00:04"),
            ),
            item(
                "10.99.0.0-24",
                &lease_json("192.168.1.5", "02:00:00:00:00:05"),
            ),
            item("10.244.6.0-24", &lease_json("192.168.1.6", "zz")),
            item("10.244.7.0-24", r#"{"PublicIP":"192.168.1.7"}"#),
        ];
        let set = peers_from_items(&items, &cfg(), Some("10.244.1.0/24".parse().unwrap()), &[]);
        let (peers, skipped) = (set.peers, set.skipped);
        assert_eq!(peers.len(), 1);
        assert_eq!(
            peers[0].subnet,
            "10.244.2.0/24".parse::<Ipv4Network>().unwrap()
        );
        assert_eq!(skipped.len(), 4, "{skipped:?}");
    }

    #[test]
    fn vxlan_entries_per_peer() {
        let peers = vec![Peer {
            subnet: "10.244.2.0/24".parse().unwrap(),
            public_ip: "192.168.1.2".parse().unwrap(),
            vtep_mac: "02:00:00:00:00:02".parse().unwrap(),
        }];
        let st = desired_state(&local("10.244.1.0/24", false), &peers);
        let gw: Ipv4Addr = "10.244.2.0".parse().unwrap();
        assert_eq!(st.routes.values().next(), Some(&RouteVia::Vxlan(gw)));
        assert_eq!(st.neighbours.get(&gw), Some(&peers[0].vtep_mac));
        assert_eq!(st.fdb.get(&peers[0].vtep_mac), Some(&peers[0].public_ip));
    }

    #[test]
    fn direct_routing_only_on_same_l2() {
        let peers = vec![
            Peer {
                subnet: "10.244.2.0/24".parse().unwrap(),
                public_ip: "192.168.1.2".parse().unwrap(),
                vtep_mac: "02:00:00:00:00:02".parse().unwrap(),
            },
            Peer {
                subnet: "10.244.3.0/24".parse().unwrap(),
                public_ip: "172.16.0.3".parse().unwrap(),
                vtep_mac: "02:00:00:00:00:03".parse().unwrap(),
            },
        ];
        let st = desired_state(&local("10.244.1.0/24", true), &peers);
        assert_eq!(
            st.routes[&"10.244.2.0/24".parse().unwrap()],
            RouteVia::Underlay("192.168.1.2".parse().unwrap())
        );
        assert!(matches!(
            st.routes[&"10.244.3.0/24".parse().unwrap()],
            RouteVia::Vxlan(_)
        ));
        assert_eq!(st.neighbours.len(), 1);
        assert_eq!(st.fdb.len(), 1);
    }

    fn kv(key: &str, ip: &str, mac: &str, lease: i64, rev: i64) -> KvItem {
        KvItem {
            lease,
            mod_revision: rev,
            ..item(key, &lease_json(ip, mac))
        }
    }

    fn claim(node: &str, subnet: &str, mac: &str) -> LiveClaim {
        LiveClaim {
            node: node.into(),
            subnet: subnet.parse().unwrap(),
            vtep_mac: mac.parse().unwrap(),
        }
    }

    fn subnets(set: &PeerSet) -> Vec<String> {
        set.peers.iter().map(|p| p.subnet.to_string()).collect()
    }

    #[test]
    fn a_stray_key_with_a_live_nodes_mac_never_displaces_it() {
        // The stray sorts first by subnet, has no etcd lease and is older: the live node's
        // lease still wins, on every peer.
        let mac = "02:00:00:00:00:05";
        let items = vec![
            kv("10.244.2.0-24", "192.168.1.99", mac, 0, 1),
            kv("10.244.5.0-24", "192.168.1.5", mac, 7, 9),
        ];
        let live = [claim("node5", "10.244.5.0/24", mac)];
        let set = peers_from_items(
            &items,
            &cfg(),
            Some("10.244.1.0/24".parse().unwrap()),
            &live,
        );
        assert_eq!(subnets(&set), ["10.244.5.0/24"]);
        assert_eq!(set.conflicts.len(), 1);
        assert_eq!(set.conflicts[0].subnet.to_string(), "10.244.2.0/24");
        assert!(
            set.conflicts[0].reason.contains("live node node5"),
            "{:?}",
            set.conflicts[0]
        );
    }

    #[test]
    fn a_shared_public_ip_goes_to_the_lease_its_node_holds() {
        // A node that lost its state directory leased a new subnet; the old lease lingers.
        let items = vec![
            kv("10.244.3.0-24", "192.168.1.3", "02:00:00:00:00:03", 4, 2),
            kv("10.244.8.0-24", "192.168.1.3", "02:00:00:00:00:09", 5, 8),
        ];
        let live = [claim("node3", "10.244.8.0/24", "02:00:00:00:00:09")];
        let set = peers_from_items(&items, &cfg(), None, &live);
        assert_eq!(subnets(&set), ["10.244.8.0/24"]);
        assert!(set.conflicts[0].reason.contains("public IP 192.168.1.3"));
    }

    #[test]
    fn a_stray_key_with_this_nodes_mac_is_no_peer() {
        let mac = "02:00:00:00:00:01";
        let items = vec![
            kv("10.244.1.0-24", "192.168.1.1", mac, 3, 5),
            kv("10.244.0.0-24", "192.168.1.50", mac, 0, 1),
        ];
        let set = peers_from_items(&items, &cfg(), Some("10.244.1.0/24".parse().unwrap()), &[]);
        assert!(set.peers.is_empty());
        assert!(set.conflicts[0].reason.contains("this node's own lease"));
    }

    #[test]
    fn without_live_claims_a_lease_beats_a_bare_key_and_older_beats_newer() {
        let mac = "02:00:00:00:00:07";
        let items = vec![
            kv("10.244.2.0-24", "192.168.1.2", mac, 0, 1),
            kv("10.244.7.0-24", "192.168.1.7", mac, 9, 20),
            kv("10.244.9.0-24", "192.168.1.9", mac, 9, 30),
        ];
        let set = peers_from_items(&items, &cfg(), None, &[]);
        assert_eq!(subnets(&set), ["10.244.7.0/24"]);
        assert_eq!(set.conflicts.len(), 2);
    }

    #[test]
    fn diff_adds_replaces_and_removes() {
        let mut desired = OverlayState::default();
        let mut actual = OverlayState::default();
        let a: Ipv4Network = "10.244.2.0/24".parse().unwrap();
        let b: Ipv4Network = "10.244.3.0/24".parse().unwrap();
        let c: Ipv4Network = "10.244.4.0/24".parse().unwrap();
        desired.routes.insert(a, RouteVia::Vxlan(a.network()));
        desired.routes.insert(b, RouteVia::Vxlan(b.network()));
        actual
            .routes
            .insert(b, RouteVia::Underlay("192.168.1.3".parse().unwrap()));
        actual.routes.insert(c, RouteVia::Vxlan(c.network()));
        let d = diff(&desired, &actual);
        assert_eq!(d.put_routes.len(), 2);
        assert_eq!(d.del_routes, vec![(c, RouteVia::Vxlan(c.network()))]);
        assert!(diff(&desired, &desired).is_empty());
    }
}
