//! Unit tests of `proxy::rules`.

use super::*;
use crate::model::service::{DEFAULT_AFFINITY_TIMEOUT, Protocol};
use std::net::{IpAddr, Ipv6Addr};

fn ctx() -> NodeContext {
    NodeContext {
        node: "n1".into(),
        family: crate::proxy::rules::Family::V4,
        cluster_network: "10.244.0.0/16".parse().unwrap(),
        service_cidr: "10.96.0.0/12".parse().unwrap(),
        balancing: Balancing::RoundRobin,
    }
}

fn svc(node_port: Option<u16>, affinity: bool, local: bool) -> Service {
    let mut p: ServicePort = "80:8080/tcp".parse().unwrap();
    p.node_port = node_port;
    Service {
        namespace: "default".into(),
        name: "web".into(),
        cluster_ip: "10.96.0.10".parse().unwrap(),
        ports: vec![p],
        selector: Some([("app".to_string(), "web".to_string())].into()),
        session_affinity: if affinity {
            SessionAffinity::ClientIp
        } else {
            SessionAffinity::None
        },
        session_affinity_timeout: DEFAULT_AFFINITY_TIMEOUT,
        external_traffic_policy: if local {
            TrafficPolicy::Local
        } else {
            TrafficPolicy::Cluster
        },
        cluster_ips: Vec::new(),
        ip_families: Vec::new(),
        ip_family_policy: Default::default(),
    }
}

fn backends(n: u8) -> Vec<Backend> {
    (0..n)
        .map(|i| Backend {
            ip: Ipv4Addr::new(10, 244, i % 2 + 1, 10 + i).into(),
            node: Some(format!("n{}", i % 2 + 1).into()),
        })
        .collect()
}

fn all(r: &PortRules) -> Vec<Element> {
    let mut v = r.elements.clone();
    v.extend(r.blocks.iter().flat_map(SlotBlock::elements));
    v
}

fn count(r: &PortRules, set: SetName) -> usize {
    all(r).iter().filter(|e| e.set == set).count()
}

#[test]
fn cluster_ip_with_endpoints() {
    let s = svc(None, false, false);
    let r = port_rules(&s, &s.ports[0], &backends(3), &ctx(), None);
    assert_eq!(count(&r, SetName::ServiceIps), 1);
    assert_eq!(count(&r, SetName::Backends), 3);
    assert_eq!(count(&r, SetName::NoEndpoints), 0);
    assert_eq!(
        r.chains.iter().collect::<Vec<_>>(),
        vec![&DynChain::Cluster {
            n: 3,
            affinity: false
        }]
    );
    let verdict = &r
        .elements
        .iter()
        .find(|e| e.set == SetName::ServiceIps)
        .unwrap()
        .data;
    assert_eq!(verdict.to_elem_data(), ElemData::Goto("svc_3".into()));
    // Backend slots carry the target port.
    let b = all(&r)
        .into_iter()
        .find(|e| e.set == SetName::Backends)
        .unwrap();
    assert_eq!(
        b.data,
        endpoint_value(Ipv4Addr::new(10, 244, 1, 10).into(), 8080)
    );
}

#[test]
fn no_endpoints_rejects() {
    let s = svc(Some(30080), false, false);
    let r = port_rules(&s, &s.ports[0], &[], &ctx(), None);
    assert_eq!(count(&r, SetName::NoEndpoints), 1);
    assert_eq!(count(&r, SetName::NoEndpointNodePorts), 1);
    assert_eq!(r.elements.len(), 2);
    assert!(r.chains.is_empty());
}

#[test]
fn node_port_policies() {
    let s = svc(Some(30080), false, false);
    let r = port_rules(&s, &s.ports[0], &backends(4), &ctx(), None);
    assert_eq!(count(&r, SetName::NodePortBackends), 4);
    assert!(r.chains.contains(&DynChain::NodePort {
        n: 4,
        affinity: false,
        local: false
    }));
    // Local: only n1's two endpoints.
    let s = svc(Some(30080), false, true);
    let r = port_rules(&s, &s.ports[0], &backends(4), &ctx(), None);
    assert_eq!(count(&r, SetName::NodePortBackends), 2);
    assert_eq!(
        count(&r, SetName::Backends),
        4,
        "cluster IP still uses every endpoint"
    );
    assert!(r.chains.contains(&DynChain::NodePort {
        n: 2,
        affinity: false,
        local: true
    }));
    // Local with no endpoint on this node: drop.
    let other = NodeContext {
        node: "n9".into(),
        family: crate::proxy::rules::Family::V4,
        ..ctx()
    };
    let r = port_rules(&s, &s.ports[0], &backends(4), &other, None);
    let np = r
        .elements
        .iter()
        .find(|e| e.set == SetName::ServiceNodePorts)
        .unwrap();
    assert_eq!(np.data, Data::Goto(Target::NodePortDrop));
}

#[test]
fn affinity_adds_sticky_chain_and_recorder() {
    let s = svc(Some(30080), true, false);
    let r = port_rules(&s, &s.ports[0], &backends(2), &ctx(), None);
    assert_eq!(count(&r, SetName::AffinityServices), 1);
    assert_eq!(count(&r, SetName::AffinityNodePorts), 1);
    assert!(r.chains.contains(&DynChain::AffinityRecord {
        timeout: DEFAULT_AFFINITY_TIMEOUT
    }));
    let c = DynChain::Cluster {
        n: 2,
        affinity: true,
    };
    assert!(r.chains.contains(&c));
    assert!(c.rules(&ctx()).iter().any(|l| l.contains("map @affinity")));
}

#[test]
fn masquerade_marking() {
    let c = DynChain::Cluster {
        n: 1,
        affinity: false,
    }
    .rules(&ctx());
    assert!(c[0].starts_with("ip saddr != 10.244.0.0/16 meta mark set"));
    let np = DynChain::NodePort {
        n: 1,
        affinity: false,
        local: false,
    }
    .rules(&ctx());
    assert!(np[0].starts_with("meta mark set"));
    let npl = DynChain::NodePort {
        n: 1,
        affinity: false,
        local: true,
    }
    .rules(&ctx());
    assert!(
        !npl.iter().any(|l| l.contains("mark")),
        "local policy keeps the client address"
    );
}

#[test]
fn elements_render_like_nft() {
    let s = svc(None, false, false);
    let r = port_rules(&s, &s.ports[0], &backends(1), &ctx(), None);
    let texts: Vec<(String, String)> = all(&r)
        .iter()
        .map(|e| describe(e.set, e.key.as_slice(), &e.data.to_elem_data()))
        .collect();
    assert!(texts.contains(&("10.96.0.10 . tcp . 80".into(), "goto svc_1".into())));
    assert!(texts.contains(&(
        "10.96.0.10 . tcp . 80 . 0".into(),
        "10.244.1.10 . 8080".into()
    )));
    let h = hairpin_element(Ipv4Addr::new(10, 244, 1, 2).into());
    assert_eq!(
        describe(h.set, h.key.as_slice(), &h.data.to_elem_data()).0,
        "10.244.1.2 . 10.244.1.2"
    );
    assert_eq!(SetName::from_name("backends"), Some(SetName::Backends));
}

#[test]
fn udp_keys_differ_from_tcp() {
    let mut s = svc(None, false, false);
    s.ports[0].protocol = Protocol::Udp;
    let r = port_rules(&s, &s.ports[0], &backends(1), &ctx(), None);
    let k = r.elements[0].key;
    assert_eq!(k.as_slice()[4], 17);
}

#[test]
fn build_and_activate_scripts() {
    let needed = [DynChain::Cluster {
        n: 2,
        affinity: false,
    }]
    .into();
    let st = Structure::for_chains(&needed);
    let s = build_script("tartan_svc2", &ctx(), &st);
    assert!(s.starts_with("table ip tartan_svc2\ndelete table ip tartan_svc2\n"));
    assert!(s.contains("\tchain svc_2 {"));
    assert!(s.contains("\tchain np_local_aff_16 {"));
    assert!(s.contains("\tchain np_local_aff_262144 {"));
    assert!(!s.contains("\tchain svc_17 {"), "no exact chain above 16");
    assert!(!s.contains("hook"), "the build step must not hook anything");
    assert!(s.contains(&structure_tag(&ctx())));
    let a = activate_script(Family::V4, "tartan_svc2", Some("tartan_svc"));
    assert!(a.contains("add chain ip tartan_svc2 nat_prerouting { type nat hook prerouting"));
    assert!(a.trim_end().ends_with("delete table ip tartan_svc"));
}

#[test]
fn structure_is_fixed_and_names_round_trip() {
    let needed: BTreeSet<DynChain> = [
        DynChain::Cluster {
            n: 64,
            affinity: false,
        },
        DynChain::AffinityRecord { timeout: 60 },
    ]
    .into();
    let st = Structure::for_chains(&needed);
    assert!(st.missing(&needed).is_empty());
    // 6 kinds × (16 exact + 11 power-of-two + 12 quarter-step moduli) + 1 recorder,
    // whatever the services.
    assert_eq!(st.chains().len(), 6 * 39 + 1);
    let other = DynChain::AffinityRecord { timeout: 61 };
    assert_eq!(st.missing(&[other].into()), [other].into());
    let odd = DynChain::NodePort {
        n: 65,
        affinity: false,
        local: true,
    };
    assert_eq!(st.missing(&[odd].into()), [odd].into());
    let names: Vec<String> = st.chains().iter().map(DynChain::name).collect();
    let back = Structure::from_chain_names(names.iter().map(String::as_str));
    assert_eq!(back, st);
    for c in st.chains() {
        assert_eq!(parse_dyn_chain(&c.name()), Some(c));
    }
    assert_eq!(parse_dyn_chain("services"), None);
    assert_eq!(parse_dyn_chain("svc_x"), None);
    assert_eq!(other_table(TABLES[0]), TABLES[1]);
    let add = add_recorder_script("tartan_svc", &other, &ctx());
    assert!(add.starts_with("add chain ip tartan_svc aff_record_61\n"));
    assert!(add.contains("add rule ip tartan_svc aff_record_61 meta l4proto"));
}

fn ips(n: usize) -> Vec<IpAddr> {
    (0..n as u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(0x0af4_0000 + i)))
        .collect()
}

fn shares(eps: &[IpAddr], slots: &[u32]) -> Vec<usize> {
    let mut c = vec![0; eps.len()];
    for s in slots {
        c[*s as usize] += 1;
    }
    c
}

#[test]
fn slot_counts() {
    assert_eq!(slot_count(1), 1);
    assert_eq!(slot_count(16), 16);
    assert_eq!(slot_count(17), 256);
    assert_eq!(slot_count(4096), 32_768);
    assert_eq!(slot_count(4097), 32_768);
    assert_eq!(slot_count(8192), 32_768);
    assert_eq!(slot_count(8193), 40_960);
    assert_eq!(slot_count(10_000), 40_960);
    assert_eq!(slot_count(10_241), 49_152);
    assert_eq!(slot_count(16_385), 81_920);
    assert_eq!(slot_count(65_536), MAX_SLOTS);
    let all: Vec<u32> = moduli().collect();
    assert!(all.windows(2).all(|w| w[0] < w[1]), "ascending: {all:?}");
    assert_eq!(all.len(), 16 + 11 + 12);
    assert_eq!(all.last(), Some(&MAX_SLOTS));
    assert!(
        (17..70_000).all(|n| slot_count(n) <= slot_count(n + 1)),
        "monotonic"
    );
    assert_eq!(slot_count(1_000_000), MAX_SLOTS);
    for n in [1usize, 16, 17, 33, 1000, 10_000, 40_000] {
        let m = slot_count(n);
        assert!(
            moduli().any(|x| x == m),
            "{n} endpoints: no chain for mod {m}"
        );
        if n > EXACT_MAX as usize && m < MAX_SLOTS {
            let per = if m > LARGE_SLOTS {
                LARGE_SLOTS_PER_ENDPOINT
            } else {
                SLOTS_PER_ENDPOINT
            };
            assert!(m as usize >= per as usize * n);
        }
    }
}

#[test]
fn small_counts_map_slot_i_to_endpoint_i() {
    for n in 1..=16 {
        let e = ips(n);
        assert_eq!(
            assign_slots(&e, &[], &[]),
            (0..n as u32).collect::<Vec<_>>()
        );
    }
}

#[test]
fn slots_spread_evenly_and_deterministically() {
    for n in [17usize, 100, 1000, 3000, 10_000] {
        let e = ips(n);
        let a = assign_slots(&e, &[], &[]);
        let m = slot_count(n) as usize;
        assert_eq!(a.len(), m);
        let c = shares(&e, &a);
        let (lo, hi) = (m / n, m.div_ceil(n));
        assert!(c.iter().all(|x| *x == lo || *x == hi), "{n}: {c:?}");
        assert_eq!(a, assign_slots(&e, &[], &[]), "deterministic");
    }
}

/// The slots whose endpoint differs between two assignments of the same slot count.
fn moved(a: &[IpAddr], b: &[IpAddr]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

fn resolve(e: &[IpAddr], a: &[u32]) -> Vec<IpAddr> {
    a.iter().map(|i| e[*i as usize]).collect()
}

#[test]
fn one_endpoint_change_moves_only_its_share() {
    let e = ips(1001);
    let slots = assign_slots(&e, &[], &[]);
    let before = resolve(&e, &slots);
    let m = before.len();
    let share = m.div_ceil(e.len());
    // Remove one endpoint (in the middle: indices shift, slots must not).
    let mut fewer = e.clone();
    fewer.remove(500);
    let a = assign_slots(&fewer, &e, &slots);
    let after = resolve(&fewer, &a);
    assert_eq!(after.len(), m);
    assert!(
        moved(&before, &after) <= share,
        "{}",
        moved(&before, &after)
    );
    let c = shares(&fewer, &a);
    assert!(
        c.iter()
            .all(|x| *x == m / fewer.len() || *x == m.div_ceil(fewer.len()))
    );
    // Add one endpoint.
    let mut more = e.clone();
    more.insert(3, Ipv4Addr::new(10, 250, 0, 1).into());
    let after = resolve(&more, &assign_slots(&more, &e, &slots));
    assert!(
        moved(&before, &after) <= share,
        "{}",
        moved(&before, &after)
    );
    assert!(after.contains(&Ipv4Addr::new(10, 250, 0, 1).into()));
    // Replace one (remove + add in one change).
    more.remove(600);
    let after = resolve(&more, &assign_slots(&more, &e, &slots));
    assert!(moved(&before, &after) <= 2 * share);
}

#[test]
fn doubling_the_slot_count_keeps_the_old_slots() {
    // 31 endpoints → 256 slots; 33 → 512: slot s and s + 256 inherit old slot s.
    let e = ips(33);
    let small_slots = assign_slots(&e[..31], &[], &[]);
    let small = resolve(&e[..31], &small_slots);
    let big = resolve(&e, &assign_slots(&e, &e[..31], &small_slots));
    assert_eq!(big.len(), 512);
    assert!(moved(&small, &big[..256]) <= 2 * 512usize.div_ceil(33));
    assert!(moved(&small, &big[256..]) <= 2 * 512usize.div_ceil(33));
}

#[test]
fn large_ports_use_slot_blocks() {
    let s = svc(Some(30080), false, false);
    let many: Vec<Backend> = ips(40)
        .into_iter()
        .map(|ip| Backend { ip, node: None })
        .collect();
    let r = port_rules(&s, &s.ports[0], &many, &ctx(), None);
    assert_eq!(r.blocks.len(), 2);
    assert!(r.blocks.iter().all(|b| b.len() == 512));
    assert!(r.chains.contains(&DynChain::Cluster {
        n: 512,
        affinity: false
    }));
    let e: Vec<Element> = r.blocks[0].elements().collect();
    let (k, d) = describe(e[3].set, e[3].key.as_slice(), &e[3].data.to_elem_data());
    assert_eq!(k, "10.96.0.10 . tcp . 80 . 3");
    assert!(d.ends_with(" . 8080"), "{d}");
    // Fed its own result, nothing changes.
    assert_eq!(port_rules(&s, &s.ports[0], &many, &ctx(), Some(&r)), r);
}

fn ctx6() -> NodeContext {
    NodeContext {
        family: Family::V6,
        cluster_network: "fd00:10:244::/56".parse().unwrap(),
        service_cidr: "fd00:96::/108".parse().unwrap(),
        ..ctx()
    }
}

fn dual(node_port: Option<u16>, affinity: bool) -> Service {
    Service {
        cluster_ips: vec!["10.96.0.10".parse().unwrap(), "fd00:96::a".parse().unwrap()],
        ip_families: vec![IpFamily::IPv4, IpFamily::IPv6],
        ip_family_policy: crate::model::service::IpFamilyPolicy::RequireDualStack,
        ..svc(node_port, affinity, false)
    }
}

#[test]
fn the_ipv6_table_has_the_same_structure_in_ip6_words() {
    let st = Structure::for_chains(&[DynChain::AffinityRecord { timeout: 60 }].into());
    let s = build_script("tartan_svc", &ctx6(), &st);
    assert!(
        s.starts_with("table ip6 tartan_svc\ndelete table ip6 tartan_svc\n"),
        "{s}"
    );
    for want in [
        "map service_ips { typeof ip6 daddr . meta l4proto . th dport : verdict; }",
        "set hairpin { typeof ip6 saddr . ip6 daddr; }",
        "ip6 daddr fd00:96::/108 goto cluster_ip_refused",
        "ip6 daddr != ::1 fib daddr type local meta l4proto . th dport vmap @service_nodeports",
        "ip6 saddr != fd00:10:244::/56 meta mark set",
        "dnat ip6 to ip6 daddr . meta l4proto . th dport . numgen inc mod 3 map @backends",
        "update @affinity { ip6 saddr . ct original ip6 daddr",
    ] {
        assert!(s.contains(want), "{want} missing");
    }
    // No IPv4 word, and the cluster DNS exemption (an IPv4 address) is the IPv4 table's.
    assert!(!s.contains(" ip daddr") && !s.contains(" ip saddr") && !s.contains("10.96.0.10"));
    let a = activate_script(Family::V6, "tartan_svc", None);
    assert!(a.contains("add chain ip6 tartan_svc nat_prerouting"));
    assert!(a.contains("ct status dnat ip6 saddr . ip6 daddr @hairpin masquerade"));
    assert!(marker_chain(&ctx6()).starts_with("tag_v"));
    assert!(
        !marker_chain(&ctx6()).contains(':'),
        "{}",
        marker_chain(&ctx6())
    );
}

#[test]
fn a_dual_stack_service_gets_ipv6_elements_in_the_ipv6_table_only() {
    let s = dual(Some(30080), true);
    let b6: Vec<Backend> = (1..=3u16)
        .map(|i| Backend {
            ip: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x244, i, 0, 0, 0, 10)),
            node: Some("n1".into()),
        })
        .collect();
    let r = port_rules(&s, &s.ports[0], &b6, &ctx6(), None);
    let texts: Vec<(SetName, String, String)> = all(&r)
        .iter()
        .map(|e| {
            let (k, d) = describe(e.set, e.key.as_slice(), &e.data.to_elem_data());
            (e.set, k, d)
        })
        .collect();
    // Client-IP affinity is not programmed in IPv6 (nft cannot build its recorder there).
    assert!(
        !r.elements
            .iter()
            .any(|e| e.set == SetName::AffinityServices)
            && !r
                .chains
                .iter()
                .any(|c| matches!(c, DynChain::AffinityRecord { .. })),
        "{:?}",
        r.chains
    );
    for want in [
        (SetName::ServiceIps, "fd00:96::a . tcp . 80", "goto svc_3"),
        (
            SetName::Backends,
            "fd00:96::a . tcp . 80 . 2",
            "fd00:10:244:3::a . 8080",
        ),
        (SetName::ServiceNodePorts, "tcp . 30080", "goto np_3"),
    ] {
        assert!(
            texts.contains(&(want.0, want.1.to_string(), want.2.to_string())),
            "{want:?} missing from {texts:?}"
        );
    }
    // Key and data widths as the kernel's registers hold them.
    let vip_key = r
        .elements
        .iter()
        .find(|e| e.set == SetName::ServiceIps)
        .unwrap();
    assert_eq!(vip_key.key.as_slice().len(), 24);
    assert_eq!(r.blocks[0].key(0).as_slice().len(), 28);
    match r.blocks[0].data(0).to_elem_data() {
        ElemData::Value(v) => assert_eq!(v.len(), 20),
        other => panic!("{other:?}"),
    }
    let h = hairpin_element(b6[0].ip);
    assert_eq!(h.key.as_slice().len(), 32);
    assert_eq!(
        describe(h.set, h.key.as_slice(), &h.data.to_elem_data()).0,
        "fd00:10:244:1::a . fd00:10:244:1::a"
    );
    // An IPv4-only service has nothing in the IPv6 table.
    let v4 = svc(Some(30080), false, false);
    assert_eq!(
        port_rules(&v4, &v4.ports[0], &b6, &ctx6(), None),
        PortRules::default()
    );
}
