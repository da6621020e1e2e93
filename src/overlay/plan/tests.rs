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
