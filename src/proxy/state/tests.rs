//! Unit tests of `proxy::state`.

use super::*;
use crate::model::service::{DEFAULT_AFFINITY_TIMEOUT, EndpointAddress, TrafficPolicy};

fn ctx() -> NodeContext {
    NodeContext {
        node: "n1".into(),
        family: crate::proxy::rules::Family::V4,
        cluster_network: "10.244.0.0/16".parse().unwrap(),
        service_cidr: "10.96.0.0/12".parse().unwrap(),
        balancing: Default::default(),
    }
}

fn svc(name: &str, ip: [u8; 4], app: &str) -> Service {
    Service {
        namespace: "default".into(),
        name: name.into(),
        cluster_ip: Ipv4Addr::from(ip),
        ports: vec!["80:8080/tcp".parse().unwrap()],
        selector: Some([("app".to_string(), app.to_string())].into()),
        session_affinity: SessionAffinity::None,
        session_affinity_timeout: DEFAULT_AFFINITY_TIMEOUT,
        external_traffic_policy: TrafficPolicy::Cluster,
        cluster_ips: Vec::new(),
        ip_families: Vec::new(),
        ip_family_policy: Default::default(),
    }
}

fn pod(id: &str, ip: [u8; 4], node: &str, app: &str) -> (String, PodRecord) {
    (
        format!("/tartan/pods/{node}/{id}/eth0"),
        PodRecord {
            ip6: None,
            container_id: id.into(),
            ifname: "eth0".into(),
            node: node.into(),
            ip: Ipv4Addr::from(ip),
            namespace: "default".into(),
            name: id.into(),
            labels: [("app".to_string(), app.to_string())].into(),
        },
    )
}

fn adds(p: &SyncPlan, set: SetName) -> usize {
    p.ops
        .iter()
        .filter(|(s, _)| s == set.as_str())
        .map(|(_, op)| match op {
            SetOp::Add(v) => v.len(),
            _ => 0,
        })
        .sum()
}

fn dels(p: &SyncPlan, set: SetName) -> usize {
    p.ops
        .iter()
        .filter(|(s, _)| s == set.as_str())
        .map(|(_, op)| match op {
            SetOp::Delete(v) => v.len(),
            _ => 0,
        })
        .sum()
}

#[test]
fn service_then_pods_then_removal() {
    let mut st = ServiceState::new(ctx());
    st.change(ModelChange::PutService(
        "/s/web".into(),
        svc("web", [10, 96, 0, 100], "web"),
    ));
    let p = st.plan();
    assert_eq!(adds(&p, SetName::NoEndpoints), 1);
    assert!(p.add_chains.is_empty());
    let (k1, p1) = pod("a", [10, 244, 1, 2], "n1", "web");
    st.change(ModelChange::PutPod(k1.clone(), p1));
    let p = st.plan();
    assert_eq!(dels(&p, SetName::NoEndpoints), 1);
    assert_eq!(adds(&p, SetName::ServiceIps), 1);
    assert_eq!(adds(&p, SetName::Backends), 1);
    assert_eq!(adds(&p, SetName::Hairpin), 1);
    assert_eq!(p.add_chains.len(), 1);
    let (k2, p2) = pod("b", [10, 244, 2, 2], "n2", "web");
    st.change(ModelChange::PutPod(k2, p2));
    let p = st.plan();
    // The verdict moves from svc_1 to svc_2: one delete + one add; one new backend slot.
    assert_eq!(dels(&p, SetName::ServiceIps), 1);
    assert_eq!(adds(&p, SetName::ServiceIps), 1);
    assert_eq!(adds(&p, SetName::Backends), 1);
    assert_eq!(
        p.add_chains.iter().next(),
        Some(&DynChain::Cluster {
            n: 2,
            affinity: false
        })
    );
    st.change(ModelChange::DeletePod(k1));
    let p = st.plan();
    assert_eq!(p.removed.len(), 1);
    assert_eq!(p.removed[0].ip, Ipv4Addr::new(10, 244, 1, 2));
    assert_eq!(dels(&p, SetName::Hairpin), 1);
    st.change(ModelChange::DeleteService("/s/web".into()));
    let p = st.plan();
    assert_eq!(dels(&p, SetName::ServiceIps), 1);
    assert_eq!(dels(&p, SetName::Backends), 1);
    assert_eq!(st.element_count(), 0);
    assert!(st.chains().is_empty());
}

#[test]
fn unrelated_pod_touches_nothing() {
    let mut st = ServiceState::new(ctx());
    for i in 0..100u8 {
        st.change(ModelChange::PutService(
            format!("/s/s{i}"),
            svc(&format!("s{i}"), [10, 96, 1, i], &format!("app{i}")),
        ));
    }
    st.plan();
    let (k, p) = pod("x", [10, 244, 2, 9], "n2", "app7");
    st.change(ModelChange::PutPod(k, p));
    let p = st.plan();
    assert_eq!(p.recomputed, 1, "only the selecting service is recomputed");
}

#[test]
fn explicit_endpoints() {
    let mut st = ServiceState::new(ctx());
    let mut s = svc("ext", [10, 96, 0, 20], "none");
    s.selector = None;
    st.change(ModelChange::PutService("/s/ext".into(), s));
    st.change(ModelChange::PutEndpoints(
        "default/ext".into(),
        ExplicitEndpoints {
            addresses: vec![
                EndpointAddress {
                    ip: Ipv4Addr::new(192, 168, 1, 5),
                    node: None,
                },
                EndpointAddress {
                    ip: Ipv4Addr::new(192, 168, 1, 6),
                    node: None,
                },
            ],
        },
    ));
    let p = st.plan();
    assert_eq!(adds(&p, SetName::Backends), 2);
}

#[test]
fn conflicting_cluster_ip_is_skipped_with_a_warning() {
    let mut st = ServiceState::new(ctx());
    st.change(ModelChange::PutService(
        "/s/a".into(),
        svc("a", [10, 96, 0, 100], "a"),
    ));
    st.plan();
    st.change(ModelChange::PutService(
        "/s/b".into(),
        svc("b", [10, 96, 0, 100], "b"),
    ));
    let p = st.plan();
    assert_eq!(p.warnings.len(), 1);
    assert_eq!(adds(&p, SetName::NoEndpoints), 0);
    // When a goes away, b gets the address.
    st.change(ModelChange::DeleteService("/s/a".into()));
    let p = st.plan();
    assert_eq!(dels(&p, SetName::NoEndpoints), 1);
    assert_eq!(adds(&p, SetName::NoEndpoints), 1);
    assert_eq!(st.element_count(), 1);
}

#[test]
fn full_plan_flushes_then_adds() {
    let mut st = ServiceState::new(ctx());
    st.change(ModelChange::PutService(
        "/s/web".into(),
        svc("web", [10, 96, 0, 100], "web"),
    ));
    let (k, p) = pod("a", [10, 244, 1, 2], "n1", "web");
    st.change(ModelChange::PutPod(k, p));
    st.plan();
    let full = st.plan_full();
    assert_eq!(
        full.ops
            .iter()
            .filter(|(_, o)| matches!(o, SetOp::Flush))
            .count(),
        SetName::ALL.len()
    );
    assert!(full.ops.iter().all(|(_, o)| !matches!(o, SetOp::Delete(_))));
    assert_eq!(adds(&full, SetName::ServiceIps), 1);
    assert_eq!(full.add_chains.len(), 1);
    // Nothing left to do afterwards.
    assert!(st.plan().is_empty());
}

#[test]
fn label_change_moves_pod_between_services() {
    let mut st = ServiceState::new(ctx());
    st.change(ModelChange::PutService(
        "/s/a".into(),
        svc("a", [10, 96, 0, 1], "a"),
    ));
    st.change(ModelChange::PutService(
        "/s/b".into(),
        svc("b", [10, 96, 0, 2], "b"),
    ));
    let (k, p) = pod("x", [10, 244, 1, 5], "n1", "a");
    st.change(ModelChange::PutPod(k.clone(), p));
    st.plan();
    let (_, mut p) = pod("x", [10, 244, 1, 5], "n1", "b");
    p.labels.insert("app".into(), "b".into());
    st.change(ModelChange::PutPod(k, p));
    let plan = st.plan();
    assert_eq!(plan.recomputed, 2);
    assert_eq!(
        adds(&plan, SetName::NoEndpoints),
        1,
        "a lost its only backend"
    );
    assert_eq!(dels(&plan, SetName::NoEndpoints), 1, "b gained one");
}

#[test]
fn refused_addresses_are_skipped_and_reported() {
    let guard = AddressGuard {
        cluster_network: Some("10.244.0.0/16".parse().unwrap()),
        node_ips: vec![Ipv4Addr::new(192, 168, 77, 2)],
        etcd: vec!["192.168.170.2:2379".parse().unwrap()],
        ..AddressGuard::new("10.96.0.0/12".parse().unwrap())
    };
    let mut st = ServiceState::with_guard(ctx(), guard);
    // The etcd member's address as a cluster IP (written by hand into etcd).
    let mut etcd_svc = svc("etcd", [192, 168, 170, 2], "x");
    etcd_svc.ports = vec!["2379/tcp".parse().unwrap()];
    etcd_svc.selector = None;
    st.change(ModelChange::PutService("/s/etcd".into(), etcd_svc));
    st.change(ModelChange::PutEndpoints(
        "default/etcd".into(),
        ExplicitEndpoints {
            addresses: vec![EndpointAddress {
                ip: Ipv4Addr::new(10, 244, 1, 2),
                node: None,
            }],
        },
    ));
    st.change(ModelChange::PutService(
        "/s/out".into(),
        svc("out", [10, 200, 0, 1], "x"),
    ));
    let p = st.plan();
    assert!(p.ops.is_empty(), "nothing is programmed: {:?}", p.ops);
    assert!(st.problems("default/etcd")[0].contains("etcd endpoint"));
    assert!(st.problems("default/out")[0].contains("outside the service CIDR"));
    assert_eq!(st.problem_count(), 2);
    // Explicit endpoints: loopback and the etcd address skipped, the rest used.
    let mut ext = svc("ext", [10, 96, 0, 30], "x");
    ext.selector = None;
    ext.ports[0].node_port = Some(30001);
    st.change(ModelChange::PutService("/s/ext".into(), ext));
    st.change(ModelChange::PutEndpoints(
        "default/ext".into(),
        ExplicitEndpoints {
            addresses: ["127.0.0.1", "192.168.170.2", "10.244.1.9"]
                .iter()
                .map(|a| EndpointAddress {
                    ip: a.parse().unwrap(),
                    node: None,
                })
                .collect(),
        },
    ));
    let p = st.plan();
    assert_eq!(adds(&p, SetName::Backends), 1);
    assert_eq!(st.problems("default/ext").len(), 2);
    // A service deleted takes its report with it.
    st.change(ModelChange::DeleteService("/s/out".into()));
    st.plan();
    assert!(st.problems("default/out").is_empty());
    // A later, good service is programmed.
    st.change(ModelChange::PutService(
        "/s/ok".into(),
        svc("ok", [10, 96, 0, 40], "x"),
    ));
    let p = st.plan();
    assert_eq!(adds(&p, SetName::NoEndpoints), 1);
}

#[test]
fn node_port_conflict_is_named_in_words() {
    let mut st = ServiceState::new(ctx());
    let mut a = svc("a", [10, 96, 0, 100], "a");
    a.ports[0].node_port = Some(30001);
    let mut b = svc("b", [10, 96, 0, 11], "b");
    b.ports[0].node_port = Some(30001);
    st.change(ModelChange::PutService("/s/a".into(), a));
    st.plan();
    st.change(ModelChange::PutService("/s/b".into(), b));
    let p = st.plan();
    assert_eq!(
        p.warnings,
        vec!["service default/b: node port 30001/tcp is held by service default/a; skipped"]
    );
    assert_eq!(
        st.problems("default/b"),
        ["node port 30001/tcp is held by service default/a; skipped"]
    );
}

fn big(st: &mut ServiceState, app: &str, n: u32) {
    for i in 0..n {
        let (k, p) = pod(
            &format!("{app}{i}"),
            (0x0ac8_0000 + i).to_be_bytes(),
            "n2",
            app,
        );
        st.change(ModelChange::PutPod(k, p));
    }
}

#[test]
fn big_service_endpoint_change_touches_only_its_share() {
    let mut st = ServiceState::new(ctx());
    st.change(ModelChange::PutService(
        "/s/big".into(),
        svc("big", [10, 96, 0, 100], "big"),
    ));
    big(&mut st, "big", 1000);
    let p = st.plan();
    // 1000 endpoints → 8192 slots on the fixed `mod 8192` chain.
    assert_eq!(adds(&p, SetName::BigBackends), 8192);
    let chain = DynChain::Cluster {
        n: 8192,
        affinity: false,
    };
    assert_eq!(p.add_chains, [chain].into());
    assert_eq!(st.element_count(), 8193);
    let share = 8192usize.div_ceil(1000);
    // One more endpoint: it takes ⌊8192/1001⌋ slots from the others, nothing else moves.
    let (k, pd) = pod("extra", [10, 201, 0, 1], "n2", "big");
    st.change(ModelChange::PutPod(k.clone(), pd));
    let p = st.plan();
    assert!(p.add_chains.is_empty() && p.drop_chains.is_empty());
    let moved = adds(&p, SetName::BigBackends);
    assert!(
        (8192 / 1001..=share).contains(&moved),
        "{moved} slots moved"
    );
    assert_eq!(
        dels(&p, SetName::BigBackends),
        moved,
        "slots are rewritten, not added"
    );
    assert_eq!(adds(&p, SetName::ServiceIps), 0, "the verdict stays");
    // And it leaves again.
    st.change(ModelChange::DeletePod(k));
    let p = st.plan();
    assert!(adds(&p, SetName::BigBackends) <= share);
    assert_eq!(p.removed.len(), 1);
    assert_eq!(st.element_count(), 8193);
    // Deleting the service leaves nothing.
    st.change(ModelChange::DeleteService("/s/big".into()));
    let p = st.plan();
    assert_eq!(dels(&p, SetName::BigBackends), 8192);
    assert_eq!(p.drop_chains, [chain].into());
    assert_eq!(st.element_count(), 0);
    assert!(st.chains().is_empty());
}

#[test]
fn a_service_past_the_counted_size_moves_to_the_uncounted_map_and_grows_in_quarter_steps() {
    let mut st = ServiceState::new(ctx());
    st.change(ModelChange::PutService(
        "/s/huge".into(),
        svc("huge", [10, 96, 0, 13], "huge"),
    ));
    // 512 endpoints: 4,096 slots, still counted.
    big(&mut st, "huge", 512);
    let p = st.plan();
    assert_eq!(adds(&p, SetName::Backends), 4096);
    assert_eq!(adds(&p, SetName::BigBackends), 0);
    // One more: 8,192 slots in the uncounted map, the counted block deleted whole, in the
    // same plan as the verdict's switch to the `mod 8192` chain.
    big(&mut st, "huge", 513);
    let p = st.plan();
    assert_eq!(dels(&p, SetName::Backends), 4096);
    assert_eq!(adds(&p, SetName::BigBackends), 8192);
    let chain = DynChain::Cluster {
        n: 8192,
        affinity: false,
    };
    assert_eq!(p.add_chains, [chain].into());
    assert!(
        chain
            .rules(&ctx())
            .iter()
            .any(|r| r.ends_with("map @big_backends"))
    );
    // Past 32,768 slots the table grows by a quarter, not by doubling: 8,192 -> 8,193
    // endpoints writes the 8,192 new slots and the new endpoint's share, nothing more.
    big(&mut st, "huge", 8192);
    st.plan();
    assert_eq!(st.element_count(), 32_769);
    big(&mut st, "huge", 8193);
    let p = st.plan();
    assert_eq!(
        dels(&p, SetName::BigBackends),
        adds(&p, SetName::BigBackends) - 8192
    );
    assert!(
        adds(&p, SetName::BigBackends) <= 8192 + 2 * 5 + 40,
        "{}",
        adds(&p, SetName::BigBackends)
    );
    assert_eq!(st.element_count(), 40_961);
    // One more endpoint moves only its share, within the big map.
    let (k, pd) = pod("extra", [10, 201, 0, 2], "n2", "huge");
    st.change(ModelChange::PutPod(k, pd));
    let p = st.plan();
    let moved = adds(&p, SetName::BigBackends);
    assert!((1..=5).contains(&moved), "{moved} slots moved");
    assert_eq!(adds(&p, SetName::Backends) + dels(&p, SetName::Backends), 0);
    // Deleted, it leaves nothing in either map.
    st.change(ModelChange::DeleteService("/s/huge".into()));
    let p = st.plan();
    assert_eq!(dels(&p, SetName::BigBackends), 40_960);
    assert_eq!(st.element_count(), 0);
}

#[test]
fn small_services_are_planned_before_a_big_one_that_changed_with_them() {
    let mut st = ServiceState::new(ctx());
    st.change(ModelChange::PutService(
        "/s/big".into(),
        svc("big", [10, 96, 0, 14], "big"),
    ));
    st.change(ModelChange::PutService(
        "/s/small".into(),
        svc("small", [10, 96, 0, 15], "small"),
    ));
    big(&mut st, "big", 600);
    st.plan();
    // The big one grows by 400 while the small one gets its endpoint.
    big(&mut st, "big", 1000);
    let (k, p) = pod("s0", [10, 244, 1, 9], "n2", "small");
    st.change(ModelChange::PutPod(k, p));
    let first = st.plan_small_first();
    assert_eq!(first.recomputed, 1);
    assert_eq!(
        adds(&first, SetName::Backends),
        1,
        "the small one's endpoint"
    );
    assert_eq!(adds(&first, SetName::BigBackends), 0);
    assert!(st.has_dirty() && first.deferred);
    let second = st.plan_small_first();
    assert_eq!(second.recomputed, 1);
    assert!(adds(&second, SetName::BigBackends) > 0);
    assert!(!st.has_dirty() && !second.deferred);
    assert!(st.plan_small_first().is_empty());
}

#[test]
fn growing_past_a_power_of_two_switches_chain_in_one_plan() {
    let mut st = ServiceState::new(ctx());
    st.change(ModelChange::PutService(
        "/s/g".into(),
        svc("g", [10, 96, 0, 11], "g"),
    ));
    big(&mut st, "g", 16);
    st.plan();
    big(&mut st, "g", 17);
    let p = st.plan();
    // 16 exact slots → 256 slots: the first 16 slot keys are rewritten or kept, the rest added.
    assert_eq!(
        p.add_chains,
        [DynChain::Cluster {
            n: 256,
            affinity: false
        }]
        .into()
    );
    assert_eq!(dels(&p, SetName::ServiceIps), 1);
    assert_eq!(adds(&p, SetName::ServiceIps), 1);
    assert!(adds(&p, SetName::Backends) >= 240);
    assert_eq!(st.element_count(), 257);
    let full = st.plan_full();
    assert_eq!(adds(&full, SetName::Backends), 256);
}

#[test]
fn contested_cluster_ip_passes_its_slots_to_the_waiting_service() {
    let mut st = ServiceState::new(ctx());
    st.change(ModelChange::PutService(
        "/s/a".into(),
        svc("a", [10, 96, 0, 12], "a"),
    ));
    big(&mut st, "a", 20);
    st.plan();
    st.change(ModelChange::PutService(
        "/s/b".into(),
        svc("b", [10, 96, 0, 12], "b"),
    ));
    big(&mut st, "b", 30);
    let p = st.plan();
    assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
    assert_eq!(
        adds(&p, SetName::Backends),
        0,
        "b's slots wait with its verdict"
    );
    st.change(ModelChange::DeleteService("/s/a".into()));
    let p = st.plan();
    // a's 256 slots go, b's 256 come (same keys: delete then add in one batch).
    assert_eq!(dels(&p, SetName::Backends), 256);
    assert_eq!(adds(&p, SetName::Backends), 256);
    assert_eq!(st.element_count(), 257);
}

#[test]
fn the_ipv6_model_programs_dual_stack_services_with_the_pods_ipv6_addresses() {
    let ctx6 = NodeContext {
        family: crate::proxy::rules::Family::V6,
        cluster_network: "fd00:10:244::/56".parse().unwrap(),
        service_cidr: "fd00:96::/108".parse().unwrap(),
        ..ctx()
    };
    let mut st = ServiceState::new(ctx6);
    let dual = Service {
        cluster_ips: vec!["10.96.0.5".parse().unwrap(), "fd00:96::5".parse().unwrap()],
        ip_families: vec![
            crate::model::service::IpFamily::IPv4,
            crate::model::service::IpFamily::IPv6,
        ],
        ip_family_policy: crate::model::service::IpFamilyPolicy::RequireDualStack,
        ..svc("web", [10, 96, 0, 5], "web")
    };
    st.change(ModelChange::PutService("/s/web".into(), dual.clone()));
    // An IPv4-only service and an IPv4-only pod: nothing of them in the IPv6 table.
    st.change(ModelChange::PutService(
        "/s/old".into(),
        svc("old", [10, 96, 0, 6], "web"),
    ));
    let (k1, mut p1) = pod("a", [10, 244, 1, 2], "n1", "web");
    p1.ip6 = Some("fd00:10:244:1::2".parse().unwrap());
    let (k2, p2) = pod("b", [10, 244, 2, 2], "n2", "web");
    st.change(ModelChange::PutPod(k1, p1));
    st.change(ModelChange::PutPod(k2, p2));
    let plan = st.plan();
    assert_eq!(
        adds(&plan, SetName::ServiceIps),
        1,
        "only the dual-stack one"
    );
    assert_eq!(adds(&plan, SetName::Backends), 1, "only the pod with IPv6");
    assert_eq!(adds(&plan, SetName::Hairpin), 1);
    let svcs = st.services_with_backends();
    let web = svcs.iter().find(|(s, _)| s.name == "web").unwrap();
    assert_eq!(
        web.1.iter().map(|b| b.ip.to_string()).collect::<Vec<_>>(),
        ["fd00:10:244:1::2"]
    );
    // The pod leaving is a removed backend of the IPv6 cluster IP.
    st.change(ModelChange::DeletePod("/tartan/pods/n1/a/eth0".into()));
    let plan = st.plan();
    assert_eq!(adds(&plan, SetName::NoEndpoints), 1);
    assert_eq!(plan.removed.len(), 1);
    assert_eq!(plan.removed[0].cluster_ip.to_string(), "fd00:96::5");
    // An IPv6 cluster IP outside the node's IPv6 range is refused with the reason.
    let mut stray = dual;
    stray.name = "stray".into();
    stray.cluster_ips[1] = "fd00:97::5".parse().unwrap();
    stray.cluster_ip = "10.96.0.7".parse().unwrap();
    stray.cluster_ips[0] = "10.96.0.7".parse().unwrap();
    st.change(ModelChange::PutService("/s/stray".into(), stray));
    st.plan();
    assert!(
        st.problems("default/stray")
            .iter()
            .any(|p| p.contains("outside the service CIDR fd00:96::/108")),
        "{:?}",
        st.problems("default/stray")
    );
}
