//! Unit tests of `node::subnet_alloc`.

use super::*;
use crate::model::subnet_lease::MacAddr;
use rand::SeedableRng;

fn cfg(json: &str) -> NetworkConfig {
    NetworkConfig::parse(json.as_bytes()).unwrap()
}

fn lease(subnet: &str, node: Option<&str>, ip: [u8; 4], etcd_lease: i64) -> ExistingSubnet {
    let mac: MacAddr = "02:00:00:00:00:01".parse().unwrap();
    let mut v = LeaseValue::vxlan(Ipv4Addr::from(ip), 1, mac, node.unwrap_or(""));
    v.node_name = node.map(str::to_string);
    ExistingSubnet {
        subnet: subnet.parse().unwrap(),
        subnet6: None,
        value: Some(v),
        etcd_lease,
        mod_revision: 5,
    }
}

fn rng() -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(7)
}

#[test]
fn picks_free_subnet_in_range() {
    let c = cfg(r#"{"Network":"10.1.0.0/22","SubnetLen":24}"#);
    // 10.1.0.0 skipped, 10.1.1.0 and 10.1.2.0 taken: only 10.1.3.0 is free.
    let ex = vec![
        lease("10.1.1.0/24", Some("a"), [1, 1, 1, 1], 9),
        lease("10.1.2.0/24", Some("b"), [1, 1, 1, 2], 9),
    ];
    for _ in 0..10 {
        assert_eq!(
            decide(&c, &ex, "c", Ipv4Addr::new(1, 1, 1, 3), None, &mut rng()),
            Decision::Create {
                subnet: "10.1.3.0/24".parse().unwrap()
            }
        );
    }
}

#[test]
fn exhausted() {
    let c = cfg(r#"{"Network":"10.1.0.0/23","SubnetLen":25}"#);
    let ex = vec![
        lease("10.1.0.128/25", Some("a"), [1, 1, 1, 1], 9),
        lease("10.1.1.0/25", Some("b"), [1, 1, 1, 2], 9),
        lease("10.1.1.128/25", Some("c"), [1, 1, 1, 3], 9),
    ];
    assert_eq!(
        decide(&c, &ex, "d", Ipv4Addr::new(1, 1, 1, 4), None, &mut rng()),
        Decision::Exhausted
    );
}

#[test]
fn garbage_keys_count_as_taken() {
    let c = cfg(r#"{"Network":"10.1.0.0/23","SubnetLen":25}"#);
    let mut g = lease("10.1.0.128/25", None, [0, 0, 0, 0], 9);
    g.value = None;
    let ex = vec![g, lease("10.1.1.0/25", Some("b"), [1, 1, 1, 2], 9)];
    assert_eq!(
        decide(&c, &ex, "d", Ipv4Addr::new(1, 1, 1, 4), None, &mut rng()),
        Decision::Create {
            subnet: "10.1.1.128/25".parse().unwrap()
        }
    );
}

#[test]
fn reuses_own_lease_by_name_then_ip() {
    let c = cfg(r#"{"Network":"10.1.0.0/16"}"#);
    let ex = vec![
        lease("10.1.5.0/24", Some("me"), [9, 9, 9, 9], 77),
        lease("10.1.6.0/24", Some("other"), [1, 1, 1, 1], 78),
    ];
    // Same name, new address: still ours.
    assert_eq!(
        decide(&c, &ex, "me", Ipv4Addr::new(1, 1, 1, 1), None, &mut rng()),
        Decision::Reuse {
            subnet: "10.1.5.0/24".parse().unwrap(),
            etcd_lease: 77,
            mod_revision: 5
        }
    );
    // A flannel lease (no NodeName) is matched by PublicIP.
    let ex = vec![lease("10.1.7.0/24", None, [2, 2, 2, 2], 79)];
    assert!(matches!(
        decide(&c, &ex, "x", Ipv4Addr::new(2, 2, 2, 2), None, &mut rng()),
        Decision::Reuse { etcd_lease: 79, .. }
    ));
}

#[test]
fn reservation_wins_and_stays_leaseless() {
    let c = cfg(r#"{"Network":"10.1.0.0/16"}"#);
    let ex = vec![
        lease("10.1.5.0/24", Some("me"), [1, 1, 1, 1], 77),
        lease("10.1.9.0/24", None, [1, 1, 1, 1], 0),
    ];
    assert_eq!(
        decide(&c, &ex, "me", Ipv4Addr::new(1, 1, 1, 1), None, &mut rng()),
        Decision::Reuse {
            subnet: "10.1.9.0/24".parse().unwrap(),
            etcd_lease: 0,
            mod_revision: 5
        }
    );
}

#[test]
fn preferred_subnet_from_state_file() {
    let c = cfg(r#"{"Network":"10.1.0.0/16"}"#);
    let p: Ipv4Network = "10.1.42.0/24".parse().unwrap();
    assert_eq!(
        decide(
            &c,
            &[],
            "me",
            Ipv4Addr::new(1, 1, 1, 1),
            Some(p),
            &mut rng()
        ),
        Decision::Create { subnet: p }
    );
    // Taken by someone else: pick another.
    let ex = vec![lease("10.1.42.0/24", Some("other"), [3, 3, 3, 3], 5)];
    match decide(
        &c,
        &ex,
        "me",
        Ipv4Addr::new(1, 1, 1, 1),
        Some(p),
        &mut rng(),
    ) {
        Decision::Create { subnet } => assert_ne!(subnet, p),
        d => panic!("{d:?}"),
    }
    // Not leasable any more (config changed): ignored.
    let bad: Ipv4Network = "10.2.0.0/24".parse().unwrap();
    match decide(
        &c,
        &[],
        "me",
        Ipv4Addr::new(1, 1, 1, 1),
        Some(bad),
        &mut rng(),
    ) {
        Decision::Create { subnet } => assert!(c.is_leasable(subnet)),
        d => panic!("{d:?}"),
    }
}

#[test]
fn huge_network_probes() {
    let c = cfg(r#"{"Network":"10.0.0.0/8","SubnetLen":30}"#);
    match decide(&c, &[], "me", Ipv4Addr::new(1, 1, 1, 1), None, &mut rng()) {
        Decision::Create { subnet } => assert!(c.is_leasable(subnet)),
        d => panic!("{d:?}"),
    }
}

#[test]
fn random_spread() {
    let c = cfg(r#"{"Network":"10.1.0.0/16"}"#);
    let mut r = rng();
    let picks: HashSet<_> = (0..50)
        .map(|_| decide(&c, &[], "me", Ipv4Addr::new(1, 1, 1, 1), None, &mut r))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|d| format!("{d:?}"))
        .collect();
    assert!(
        picks.len() > 30,
        "random choice should spread, got {}",
        picks.len()
    );
}

#[test]
fn leases_left_by_an_earlier_config_are_released_and_reservations_kept() {
    let v = |node: Option<&str>| {
        LeaseValue {
            node_name: node.map(str::to_string),
            ..LeaseValue::parse(
                br#"{"PublicIP":"192.168.1.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}"#,
            )
            .unwrap()
        }
    };
    let e = |s: &str, node: Option<&str>, lease: i64| ExistingSubnet {
        subnet: s.parse().unwrap(),
        subnet6: None,
        value: Some(v(node)),
        etcd_lease: lease,
        mod_revision: 1,
    };
    let existing = vec![
        e("10.245.3.0/24", Some("n1"), 5),  // ours, old network: released
        e("10.244.9.0/24", Some("n1"), 6),  // ours, kept
        e("10.244.10.0/24", Some("n1"), 7), // ours, a second lease: released
        e("10.245.4.0/24", Some("n1"), 0),  // our reservation: kept
        e("10.245.5.0/24", None, 8),        // flannel's (matched by IP only): left alone
        e("10.245.6.0/24", Some("n2"), 9),  // another node's
    ];
    let kept = SubnetKey::parse("10.244.9.0-24").unwrap();
    let stale: Vec<String> = stale_own(&existing, "n1", kept)
        .iter()
        .map(|e| e.subnet.to_string())
        .collect();
    assert_eq!(stale, ["10.245.3.0/24", "10.244.10.0/24"]);
    // The network became dual-stack: the node now holds the same IPv4 subnet under a key
    // naming its IPv6 subnet too, and the old IPv4-only key is given back.
    let dual = SubnetKey::parse("10.244.9.0-24&fc00:0:0:1::-64").unwrap();
    let mut renamed = existing.clone();
    renamed.push(with_v6(
        e("10.244.9.0/24", Some("n1"), 6),
        "fc00:0:0:1::/64",
    ));
    let stale: Vec<String> = stale_own(&renamed, "n1", dual)
        .iter()
        .map(|e| {
            format!(
                "{}{}",
                e.subnet,
                e.subnet6.map(|s| format!("&{s}")).unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(stale, ["10.245.3.0/24", "10.244.9.0/24", "10.244.10.0/24"]);
}

fn pool6() -> Ipv6Pool {
    // A /62 in /64s: four subnets, the first never leased (flannel's SubnetMin default).
    cfg(r#"{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/62"}"#)
        .ipv6
        .expect("dual-stack")
}

fn with_v6(mut e: ExistingSubnet, v6: &str) -> ExistingSubnet {
    e.subnet6 = Some(v6.parse().unwrap());
    e
}

#[test]
fn an_ipv6_subnet_is_kept_then_remembered_then_picked_free() {
    let p = pool6();
    let net = |s: &str| -> Ipv6Network { s.parse().unwrap() };
    let other = with_v6(
        lease("10.1.1.0/24", Some("a"), [1, 1, 1, 1], 9),
        "fc00:0:0:1::/64",
    );
    let ex = vec![other];
    // Its own key's subnet stays, even though the remembered one differs.
    assert_eq!(
        decide_v6(
            &p,
            &ex,
            Some(net("fc00:0:0:2::/64")),
            Some(net("fc00:0:0:3::/64")),
            None,
            &mut rng()
        ),
        Some(net("fc00:0:0:2::/64"))
    );
    // Not leasable (the network's first subnet, or another length): not kept.
    for bad in ["fc00::/64", "fc00:0:0:2::/65"] {
        let got = decide_v6(&p, &ex, Some(net(bad)), None, None, &mut rng()).expect("free ones");
        assert!(
            p.is_leasable(got) && got != net("fc00:0:0:1::/64"),
            "{bad}: {got}"
        );
    }
    // The remembered one when free, never one another key names.
    assert_eq!(
        decide_v6(
            &p,
            &ex,
            None,
            Some(net("fc00:0:0:3::/64")),
            None,
            &mut rng()
        ),
        Some(net("fc00:0:0:3::/64"))
    );
    for seed in 0..20 {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let got = decide_v6(&p, &ex, None, Some(net("fc00:0:0:1::/64")), None, &mut r);
        assert!(
            matches!(got, Some(g) if g == net("fc00:0:0:2::/64") || g == net("fc00:0:0:3::/64")),
            "{got:?}"
        );
    }
}

#[test]
fn no_free_ipv6_subnet_is_none() {
    let p = pool6();
    let ex: Vec<ExistingSubnet> = ["fc00:0:0:1::/64", "fc00:0:0:2::/64", "fc00:0:0:3::/64"]
        .iter()
        .enumerate()
        .map(|(i, v6)| {
            with_v6(
                lease(&format!("10.1.{i}.0/24"), Some("a"), [1, 1, 1, 1], 9),
                v6,
            )
        })
        .collect();
    assert_eq!(decide_v6(&p, &ex, None, None, None, &mut rng()), None);
}

#[test]
fn a_new_node_takes_the_ipv6_subnet_paired_with_its_ipv4_one_when_free() {
    let p = pool6();
    let net = |s: &str| -> Ipv6Network { s.parse().unwrap() };
    let ex = vec![with_v6(
        lease("10.1.1.0/24", Some("a"), [1, 1, 1, 1], 9),
        "fc00:0:0:1::/64",
    )];
    // Free: taken, whatever the random choice would be (two nodes starting at once hold
    // different IPv4 subnets, so they get different IPv6 ones).
    for seed in 0..20u64 {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        assert_eq!(
            decide_v6(&p, &ex, None, None, Some(net("fc00:0:0:2::/64")), &mut r),
            Some(net("fc00:0:0:2::/64"))
        );
    }
    // Taken by another key: a random free one instead.
    let got = decide_v6(
        &p,
        &ex,
        None,
        None,
        Some(net("fc00:0:0:1::/64")),
        &mut rng(),
    )
    .expect("free ones");
    assert_ne!(got, net("fc00:0:0:1::/64"));
    // A remembered subnet comes first.
    assert_eq!(
        decide_v6(
            &p,
            &ex,
            None,
            Some(net("fc00:0:0:3::/64")),
            Some(net("fc00:0:0:2::/64")),
            &mut rng()
        ),
        Some(net("fc00:0:0:3::/64"))
    );
}
