//! Unit tests of `ingress::backends`: selector pods, explicit endpoints, pods moving between
//! services, deletions, relisting, and resolving a route's port.

use std::collections::BTreeMap;

use super::*;
use crate::model::service::{
    DEFAULT_AFFINITY_TIMEOUT, EndpointAddress, HEADLESS, SessionAffinity, TrafficPolicy,
};
use crate::store::etcd::{EtcdArgs, KvItem};
use crate::store::keys::{endpoints_prefix, pods_prefix, service_key};
use crate::store::records::{RecordKind, decode, gone_after_listing};

fn keys() -> EtcdArgs {
    EtcdArgs::for_endpoints(&["http://127.0.0.1:2379"])
}

fn svc(ns: &str, name: &str, app: Option<&str>) -> Service {
    Service {
        namespace: ns.into(),
        name: name.into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 7),
        ports: vec![
            "web=80:8080/tcp".parse().expect("port"),
            "9000/udp".parse().expect("port"),
        ],
        selector: app.map(|v| BTreeMap::from([("app".to_string(), v.to_string())])),
        session_affinity: SessionAffinity::None,
        session_affinity_timeout: DEFAULT_AFFINITY_TIMEOUT,
        external_traffic_policy: TrafficPolicy::Cluster,
        cluster_ips: Vec::new(),
        ip_families: Vec::new(),
        ip_family_policy: Default::default(),
    }
}

fn pod(ns: &str, name: &str, ip: [u8; 4], app: &str) -> PodRecord {
    PodRecord {
        ip6: None,
        container_id: format!("c-{name}"),
        ifname: "eth0".into(),
        node: "n1".into(),
        ip: Ipv4Addr::from(ip),
        namespace: ns.into(),
        name: name.into(),
        labels: BTreeMap::from([("app".to_string(), app.to_string())]),
    }
}

fn svc_key(s: &Service) -> String {
    service_key(&keys(), &s.namespace, &s.name)
}

fn pod_key(p: &PodRecord) -> String {
    format!("{}n1/{}/eth0", pods_prefix(&keys()), p.container_id)
}

fn put_svc(b: &mut Backends, s: Service) {
    b.change(ModelChange::PutService(svc_key(&s), s));
}

fn put_pod(b: &mut Backends, p: PodRecord) {
    b.change(ModelChange::PutPod(pod_key(&p), p));
}

fn endpoints(ips: &[[u8; 4]]) -> ExplicitEndpoints {
    ExplicitEndpoints {
        addresses: ips
            .iter()
            .map(|ip| EndpointAddress {
                ip: Ipv4Addr::from(*ip),
                node: None,
            })
            .collect(),
    }
}

/// The addresses of `ns/name` as text, or `None` when it has no targets.
fn addrs(t: &Targets, ns: &str, name: &str) -> Option<Vec<String>> {
    t.get(ns, name)
        .map(|s| s.addrs.iter().map(ToString::to_string).collect())
}

fn generation(t: &Targets, ns: &str, name: &str) -> u64 {
    t.get(ns, name).map_or(0, |s| s.generation)
}

#[test]
fn a_selector_service_goes_to_the_pods_it_selects_in_its_namespace() {
    let mut b = Backends::new();
    let t = b.targets();
    put_pod(&mut b, pod("shop", "w2", [10, 244, 1, 9], "web"));
    put_pod(&mut b, pod("shop", "w1", [10, 244, 1, 5], "web"));
    put_pod(&mut b, pod("shop", "db", [10, 244, 1, 6], "db"));
    put_pod(&mut b, pod("other", "w3", [10, 244, 2, 5], "web"));
    put_svc(&mut b, svc("shop", "web", Some("web")));
    assert_eq!(
        addrs(&t, "shop", "web"),
        Some(vec!["10.244.1.5".into(), "10.244.1.9".into()])
    );
    let s = t.get("shop", "web").expect("targets");
    assert_eq!((s.namespace.as_str(), s.name.as_str()), ("shop", "web"));
    assert_eq!(s.ports.len(), 2);
    // A pod added later joins; the generation moves.
    let g = s.generation;
    put_pod(&mut b, pod("shop", "w4", [10, 244, 1, 7], "web"));
    assert_eq!(
        addrs(&t, "shop", "web"),
        Some(vec![
            "10.244.1.5".into(),
            "10.244.1.7".into(),
            "10.244.1.9".into()
        ])
    );
    assert!(generation(&t, "shop", "web") > g);
    assert_eq!(t.len(), 1);
    assert!(t.get("shop", "db").is_none());
}

#[test]
fn two_pods_with_one_address_count_once() {
    let mut b = Backends::new();
    put_svc(&mut b, svc("shop", "web", Some("web")));
    put_pod(&mut b, pod("shop", "a", [10, 244, 1, 5], "web"));
    put_pod(&mut b, pod("shop", "b", [10, 244, 1, 5], "web"));
    assert_eq!(
        addrs(&b.targets(), "shop", "web"),
        Some(vec!["10.244.1.5".into()])
    );
}

#[test]
fn a_service_without_a_selector_goes_to_its_explicit_endpoints() {
    let mut b = Backends::new();
    let t = b.targets();
    put_svc(&mut b, svc("shop", "ext", None));
    // Known, but nothing to send to yet.
    assert_eq!(addrs(&t, "shop", "ext"), Some(vec![]));
    // Pods never count for it.
    put_pod(&mut b, pod("shop", "w1", [10, 244, 1, 5], "web"));
    b.change(ModelChange::PutEndpoints(
        "shop/ext".into(),
        endpoints(&[[192, 168, 0, 9], [192, 168, 0, 2], [192, 168, 0, 9]]),
    ));
    assert_eq!(
        addrs(&t, "shop", "ext"),
        Some(vec!["192.168.0.2".into(), "192.168.0.9".into()])
    );
    b.change(ModelChange::DeleteEndpoints("shop/ext".into()));
    assert_eq!(addrs(&t, "shop", "ext"), Some(vec![]));
    // Endpoints of a service that does not exist publish nothing.
    b.change(ModelChange::PutEndpoints(
        "shop/nope".into(),
        endpoints(&[[192, 168, 0, 1]]),
    ));
    assert!(t.get("shop", "nope").is_none());
    // ... until it is created.
    put_svc(&mut b, svc("shop", "nope", None));
    assert_eq!(addrs(&t, "shop", "nope"), Some(vec!["192.168.0.1".into()]));
}

#[test]
fn explicit_endpoints_the_guard_refuses_are_never_targets() {
    let guard = crate::model::service::AddressGuard {
        node_ips: vec![Ipv4Addr::new(192, 168, 0, 7)],
        etcd: vec!["192.168.0.8:2379".parse().unwrap()],
        ..crate::model::service::AddressGuard::new("10.96.0.0/12".parse().unwrap())
    };
    let mut b = Backends::with_guard(guard);
    let t = b.targets();
    put_svc(&mut b, svc("shop", "ext", None));
    b.change(ModelChange::PutEndpoints(
        "shop/ext".into(),
        endpoints(&[
            [127, 0, 0, 1],
            [192, 168, 0, 7],
            [192, 168, 0, 8],
            [10, 96, 0, 20],
            [0, 0, 0, 0],
            [224, 0, 0, 1],
            [192, 168, 0, 2],
        ]),
    ));
    assert_eq!(addrs(&t, "shop", "ext"), Some(vec!["192.168.0.2".into()]));
}

#[test]
fn a_headless_service_has_targets() {
    let mut b = Backends::new();
    let mut s = svc("shop", "web", Some("web"));
    s.cluster_ip = HEADLESS;
    put_svc(&mut b, s);
    put_pod(&mut b, pod("shop", "w1", [10, 244, 1, 5], "web"));
    assert_eq!(
        addrs(&b.targets(), "shop", "web"),
        Some(vec!["10.244.1.5".into()])
    );
}

#[test]
fn a_pod_whose_labels_change_moves_between_services() {
    let mut b = Backends::new();
    let t = b.targets();
    put_svc(&mut b, svc("shop", "web", Some("web")));
    put_svc(&mut b, svc("shop", "api", Some("api")));
    put_svc(&mut b, svc("shop", "ext", None));
    put_pod(&mut b, pod("shop", "p", [10, 244, 1, 5], "web"));
    let (g_api, g_ext) = (generation(&t, "shop", "api"), generation(&t, "shop", "ext"));
    assert_eq!(addrs(&t, "shop", "web"), Some(vec!["10.244.1.5".into()]));
    put_pod(&mut b, pod("shop", "p", [10, 244, 1, 5], "api"));
    assert_eq!(addrs(&t, "shop", "web"), Some(vec![]));
    assert_eq!(addrs(&t, "shop", "api"), Some(vec!["10.244.1.5".into()]));
    assert!(generation(&t, "shop", "api") > g_api);
    // A service the pod never concerned is not recomputed.
    assert_eq!(generation(&t, "shop", "ext"), g_ext);
    // A pod update that changes nothing for a service keeps its generation.
    let g = generation(&t, "shop", "api");
    let mut p = pod("shop", "p", [10, 244, 1, 5], "api");
    p.node = "n2".into();
    put_pod(&mut b, p);
    assert_eq!(generation(&t, "shop", "api"), g);
}

#[test]
fn a_pod_moving_namespace_leaves_the_old_one() {
    let mut b = Backends::new();
    let t = b.targets();
    put_svc(&mut b, svc("shop", "web", Some("web")));
    put_svc(&mut b, svc("blog", "web", Some("web")));
    put_pod(&mut b, pod("shop", "p", [10, 244, 1, 5], "web"));
    put_pod(&mut b, pod("blog", "p", [10, 244, 1, 5], "web"));
    assert_eq!(addrs(&t, "shop", "web"), Some(vec![]));
    assert_eq!(addrs(&t, "blog", "web"), Some(vec!["10.244.1.5".into()]));
    assert!(!b.pods_by_ns.contains_key("shop"));
}

#[test]
fn a_deleted_pod_leaves_its_services() {
    let mut b = Backends::new();
    let t = b.targets();
    put_svc(&mut b, svc("shop", "web", Some("web")));
    let p = pod("shop", "p", [10, 244, 1, 5], "web");
    let key = pod_key(&p);
    put_pod(&mut b, p);
    put_pod(&mut b, pod("shop", "q", [10, 244, 1, 6], "web"));
    b.change(ModelChange::DeletePod(key.clone()));
    assert_eq!(addrs(&t, "shop", "web"), Some(vec!["10.244.1.6".into()]));
    // Deleting it again changes nothing.
    let g = generation(&t, "shop", "web");
    b.change(ModelChange::DeletePod(key));
    assert_eq!(generation(&t, "shop", "web"), g);
}

#[test]
fn a_deleted_service_withdraws_its_targets() {
    let mut b = Backends::new();
    let t = b.targets();
    let s = svc("shop", "web", Some("web"));
    let key = svc_key(&s);
    put_svc(&mut b, s);
    put_pod(&mut b, pod("shop", "p", [10, 244, 1, 5], "web"));
    b.change(ModelChange::DeleteService(key));
    assert!(t.get("shop", "web").is_none());
    assert!(t.is_empty());
    assert!(b.selecting_by_ns.is_empty() && b.key_of_id.is_empty());
    // Its pods still come back when it is created again, under a new generation.
    let g = b.generation;
    put_svc(&mut b, svc("shop", "web", Some("web")));
    assert_eq!(addrs(&t, "shop", "web"), Some(vec!["10.244.1.5".into()]));
    assert!(generation(&t, "shop", "web") > g);
}

#[test]
fn a_service_update_recomputes_it() {
    let mut b = Backends::new();
    let t = b.targets();
    put_svc(&mut b, svc("shop", "web", Some("web")));
    put_pod(&mut b, pod("shop", "p", [10, 244, 1, 5], "web"));
    put_pod(&mut b, pod("shop", "q", [10, 244, 1, 6], "api"));
    put_svc(&mut b, svc("shop", "web", Some("api")));
    assert_eq!(addrs(&t, "shop", "web"), Some(vec!["10.244.1.6".into()]));
    // A selector-less version goes to its explicit endpoints instead.
    put_svc(&mut b, svc("shop", "web", None));
    assert_eq!(addrs(&t, "shop", "web"), Some(vec![]));
    assert!(b.selecting_by_ns.is_empty());
}

/// Applies a listing of `kind` as `store::records::apply_feeds` does: deletions of what it
/// lacks, then a put per item.
fn relist(b: &mut Backends, kind: RecordKind, items: &[KvItem]) {
    let keys = keys();
    for c in gone_after_listing(kind, items, b.held(), &keys) {
        b.change(c);
    }
    for it in items {
        b.change(decode(kind, it, &keys).expect("decodes"));
    }
}

fn item(key: String, value: Vec<u8>) -> KvItem {
    KvItem {
        key,
        value,
        lease: 0,
        mod_revision: 1,
    }
}

#[test]
fn a_relisting_replaces_what_was_held() {
    let mut b = Backends::new();
    let t = b.targets();
    let (web, api, ext) = (
        svc("shop", "web", Some("web")),
        svc("shop", "api", Some("api")),
        svc("shop", "ext", None),
    );
    let (p, q) = (
        pod("shop", "p", [10, 244, 1, 5], "web"),
        pod("shop", "q", [10, 244, 1, 6], "web"),
    );
    for s in [&web, &api, &ext] {
        put_svc(&mut b, s.clone());
    }
    put_pod(&mut b, p.clone());
    put_pod(&mut b, q.clone());
    b.change(ModelChange::PutEndpoints(
        "shop/ext".into(),
        endpoints(&[[192, 168, 0, 1]]),
    ));
    assert!(!b.is_listed());
    // The relisting lacks api, pod q and ext's endpoints.
    relist(
        &mut b,
        RecordKind::Services,
        &[
            item(svc_key(&web), web.to_bytes()),
            item(svc_key(&ext), ext.to_bytes()),
        ],
    );
    relist(&mut b, RecordKind::Pods, &[item(pod_key(&p), p.to_bytes())]);
    relist(&mut b, RecordKind::Endpoints, &[]);
    b.settled(true, Instant::now());
    assert!(b.is_listed());
    assert!(t.get("shop", "api").is_none());
    assert_eq!(addrs(&t, "shop", "web"), Some(vec!["10.244.1.5".into()]));
    assert_eq!(addrs(&t, "shop", "ext"), Some(vec![]));
    let (mut services, pods, eps) = b.held();
    services.sort();
    assert_eq!(services, [svc_key(&ext), svc_key(&web)]);
    assert_eq!(pods, [pod_key(&p)]);
    assert!(eps.is_empty());
    // Explicit endpoints come back through a listing of their prefix.
    let key = format!("{}shop/ext", endpoints_prefix(&keys()));
    relist(
        &mut b,
        RecordKind::Endpoints,
        &[item(
            key,
            br#"{"addresses":[{"ip":"192.168.0.3"}]}"#.to_vec(),
        )],
    );
    assert_eq!(addrs(&t, "shop", "ext"), Some(vec!["192.168.0.3".into()]));
}

#[test]
fn settled_before_every_listing_is_not_listed() {
    let mut b = Backends::new();
    b.settled(false, Instant::now());
    assert!(!b.is_listed());
    b.settled(true, Instant::now());
    b.settled(false, Instant::now());
    assert!(b.is_listed(), "once listed, always listed");
}

fn targets_with(ports: &[&str]) -> ServiceTargets {
    ServiceTargets {
        namespace: "default".into(),
        name: "shop".into(),
        ports: ports.iter().map(|p| p.parse().expect("port")).collect(),
        addrs: vec![],
        generation: 1,
    }
}

#[test]
fn target_port_by_number_and_by_name() {
    let t = targets_with(&["web=80:8080/tcp", "admin=9000/tcp", "53/udp"]);
    assert_eq!(t.target_port(&PortRef::Number(80)), Ok(8080));
    assert_eq!(t.target_port(&PortRef::Number(9000)), Ok(9000));
    assert_eq!(t.target_port(&PortRef::Name("web".into())), Ok(8080));
    // A number is the service port, not the target port.
    assert_eq!(
        t.target_port(&PortRef::Number(8080)),
        Err(
            "service default/shop has no port 8080 (ports: 80/tcp \"web\", 9000/tcp \"admin\", \
             53/udp)"
                .into()
        )
    );
}

#[test]
fn target_port_explains_an_unknown_name() {
    let t = targets_with(&["web=80:8080/tcp"]);
    assert_eq!(
        t.target_port(&PortRef::Name("http".into())),
        Err("service default/shop has no port named \"http\" (ports: 80/tcp \"web\")".into())
    );
    let none = targets_with(&[]);
    assert_eq!(
        none.target_port(&PortRef::Number(80)),
        Err("service default/shop has no port 80 (ports: none)".into())
    );
}

#[test]
fn target_port_serves_tcp_only() {
    let t = targets_with(&["dns=53/udp"]);
    for p in [PortRef::Number(53), PortRef::Name("dns".into())] {
        let e = t.target_port(&p).expect_err("udp only");
        assert!(e.contains("is not TCP"), "{e}");
        assert!(e.contains("53/udp \"dns\""), "{e}");
    }
    // The TCP port of a number both protocols use is found.
    let t = targets_with(&["53:5353/udp", "53:5354/tcp"]);
    assert_eq!(t.target_port(&PortRef::Number(53)), Ok(5354));
}

#[test]
fn a_lookup_with_an_overlong_id_still_works() {
    let mut b = Backends::new();
    let long = "n".repeat(100);
    put_svc(&mut b, svc(&long, &long, None));
    assert!(b.targets().get(&long, &long).is_some());
    assert!(b.targets().get(&long, "x").is_none());
}
