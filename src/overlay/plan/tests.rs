//! Unit tests of `overlay::plan`.

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
    let mut desired = OverlayState::<V4>::default();
    let mut actual = OverlayState::<V4>::default();
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

fn cfg_dual() -> NetworkConfig {
    NetworkConfig::parse(
        br#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","IPv6SubnetLen":64}"#,
    )
    .unwrap()
}

fn lease_json_dual(ip: &str, mac: &str, ip6: &str, mac6: &str) -> String {
    format!(
        r#"{{"PublicIP":"{ip}","PublicIPv6":"{ip6}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}"#
    )
}

/// Node `n`'s dual-stack lease: `10.244.n.0/24` and `fd00:10:244:n::/64`, underlay
/// `192.168.1.n`, IPv4 VTEP MAC `02:00:00:00:00:0n`; its IPv6 address and MAC as given.
fn dual(n: u8, ip6: &str, mac6: &str, lease: i64, rev: i64) -> KvItem {
    KvItem {
        lease,
        mod_revision: rev,
        ..item(
            &format!("10.244.{n}.0-24&fd00:10:244:{n}::-64"),
            &lease_json_dual(
                &format!("192.168.1.{n}"),
                &format!("02:00:00:00:00:{n:02}"),
                ip6,
                mac6,
            ),
        )
    }
}

fn subnets6(set: &PeerSet) -> Vec<String> {
    set.peers6.iter().map(|p| p.subnet.to_string()).collect()
}

#[test]
fn a_dual_stack_lease_gives_a_peer_per_family_with_its_own_vtep() {
    let items = vec![
        dual(1, "fd00:1::1", "02:00:00:00:06:01", 1, 1),
        dual(2, "fd00:1::2", "02:00:00:00:06:02", 1, 1),
        // A node of the same network without IPv6 yet: an IPv4 peer only.
        item(
            "10.244.3.0-24",
            &lease_json("192.168.1.3", "02:00:00:00:00:03"),
        ),
    ];
    let set = peers_from_items(
        &items,
        &cfg_dual(),
        Some("10.244.1.0/24".parse().unwrap()),
        &[],
    );
    assert!(set.skipped.is_empty(), "{:?}", set.skipped);
    assert_eq!(subnets(&set), ["10.244.2.0/24", "10.244.3.0/24"]);
    assert_eq!(subnets6(&set), ["fd00:10:244:2::/64"]);
    let p = &set.peers6[0];
    assert_eq!(p.public_ip, "fd00:1::2".parse::<Ipv6Addr>().unwrap());
    assert_eq!(p.vtep_mac.to_string(), "02:00:00:00:06:02");

    let local6 = LocalNode::<V6> {
        subnet: "fd00:10:244:1::/64".parse().unwrap(),
        underlay_networks: vec!["fd00:1::/64".parse().unwrap()],
        direct_routing: false,
    };
    let st = desired_state(&local6, &set.peers6);
    let gw: Ipv6Addr = "fd00:10:244:2::".parse().unwrap();
    assert_eq!(
        st.routes.get(&"fd00:10:244:2::/64".parse().unwrap()),
        Some(&RouteVia::Vxlan(gw))
    );
    assert_eq!(st.neighbours.get(&gw), Some(&p.vtep_mac));
    assert_eq!(st.fdb.get(&p.vtep_mac), Some(&p.public_ip));

    // DirectRouting: the peer's IPv6 underlay address is on our segment.
    let direct = LocalNode::<V6> {
        direct_routing: true,
        ..local6
    };
    let st = desired_state(&direct, &set.peers6);
    assert_eq!(
        st.routes.values().collect::<Vec<_>>(),
        [&RouteVia::Underlay(p.public_ip)]
    );
    assert!(st.neighbours.is_empty() && st.fdb.is_empty());
}

#[test]
fn a_bad_ipv6_half_is_reported_and_leaves_the_ipv4_peer_in_place() {
    let items = vec![
        // The IPv6 subnet is outside the network's IPv6 pool.
        item(
            "10.244.2.0-24&fd00:99::-64",
            &lease_json_dual(
                "192.168.1.2",
                "02:00:00:00:00:02",
                "fd00:1::2",
                "02:00:00:00:06:02",
            ),
        ),
        // The key is dual-stack, the value has no IPv6 fields.
        item(
            "10.244.3.0-24&fd00:10:244:3::-64",
            &lease_json("192.168.1.3", "02:00:00:00:00:03"),
        ),
        // BackendV6Data without PublicIPv6.
        item(
            "10.244.4.0-24&fd00:10:244:4::-64",
            r#"{"PublicIP":"192.168.1.4","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:04"},"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:06:04"}}"#,
        ),
        // A multicast IPv6 VTEP MAC.
        item(
            "10.244.5.0-24&fd00:10:244:5::-64",
            &lease_json_dual(
                "192.168.1.5",
                "02:00:00:00:00:05",
                "fd00:1::5",
                "01:00:5e:00:00:05",
            ),
        ),
        // The key's IPv6 part is not a /64.
        item(
            "10.244.6.0-24&fd00:10:244:6::-80",
            &lease_json_dual(
                "192.168.1.6",
                "02:00:00:00:00:06",
                "fd00:1::6",
                "02:00:00:00:06:06",
            ),
        ),
    ];
    let set = peers_from_items(&items, &cfg_dual(), None, &[]);
    assert_eq!(
        subnets(&set),
        [
            "10.244.2.0/24",
            "10.244.3.0/24",
            "10.244.4.0/24",
            "10.244.5.0/24",
            "10.244.6.0/24"
        ]
    );
    assert!(set.peers6.is_empty(), "{:?}", set.peers6);
    assert!(set.skipped.is_empty(), "{:#?}", set.skipped);
    assert_eq!(set.ipv6_ignored.len(), 5, "{:#?}", set.ipv6_ignored);
    for ((key, why), what) in set.ipv6_ignored.iter().zip([
        "not a /64 inside fd00:10:244::/56",
        "no PublicIPv6 and no BackendV6Data",
        "PublicIPv6",
        "VtepMAC",
        "not a /64 inside",
    ]) {
        assert!(key.contains("&fd00:") && why.contains(what), "{key}: {why}");
    }
}

#[test]
fn without_ipv6_in_the_network_a_keys_ipv6_part_is_left_alone() {
    let items = vec![item(
        "10.244.2.0-24&fd00:10:244:2::-64",
        &lease_json_dual(
            "192.168.1.2",
            "02:00:00:00:00:02",
            "fd00:1::2",
            "02:00:00:00:06:02",
        ),
    )];
    let set = peers_from_items(&items, &cfg(), None, &[]);
    assert_eq!(subnets(&set), ["10.244.2.0/24"]);
    assert!(set.peers6.is_empty() && set.skipped.is_empty());
}

#[test]
fn ipv6_halves_conflict_on_their_own_vtep_mac_and_address() {
    // Two leases share an IPv6 VTEP MAC (their IPv4 halves differ): the one a live node
    // holds keeps its IPv6 peer; the IPv4 halves are both fine.
    let mac6 = "02:00:00:00:06:07";
    let stray = dual(2, "fd00:1::2", mac6, 0, 1);
    let held = dual(7, "fd00:1::7", mac6, 7, 9);
    // Same IPv6 underlay address as the held lease, another MAC.
    let shared_ip = dual(8, "fd00:1::7", "02:00:00:00:06:08", 5, 3);
    let live = [claim("node7", "10.244.7.0/24", "02:00:00:00:00:07")];
    let set = peers_from_items(&[stray, held, shared_ip], &cfg_dual(), None, &live);
    assert_eq!(
        subnets(&set),
        ["10.244.2.0/24", "10.244.7.0/24", "10.244.8.0/24"]
    );
    assert!(set.conflicts.is_empty(), "{:?}", set.conflicts);
    assert_eq!(subnets6(&set), ["fd00:10:244:7::/64"]);
    let reasons: Vec<_> = set.conflicts6.iter().map(|c| c.reason.as_str()).collect();
    assert_eq!(set.conflicts6.len(), 2, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains(&format!("VTEP MAC {mac6}")) && r.contains("live node node7"))
    );
    assert!(reasons.iter().any(|r| r.contains("public IP fd00:1::7")));
}
