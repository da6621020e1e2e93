use std::collections::BTreeMap;

use super::*;
use crate::model::service::{
    DEFAULT_AFFINITY_TIMEOUT, EndpointAddress, HEADLESS, SessionAffinity, TrafficPolicy,
};

pub(crate) fn svc(name: &str, ip: Ipv4Addr, sel: Option<&str>) -> Service {
    Service {
        namespace: "shop".into(),
        name: name.into(),
        cluster_ip: ip,
        ports: vec![
            "http=80:8080/tcp".parse().unwrap(),
            "9000/udp".parse().unwrap(),
        ],
        selector: sel.map(|v| BTreeMap::from([("app".to_string(), v.to_string())])),
        session_affinity: SessionAffinity::None,
        session_affinity_timeout: DEFAULT_AFFINITY_TIMEOUT,
        external_traffic_policy: TrafficPolicy::Cluster,
        cluster_ips: Vec::new(),
        ip_families: Vec::new(),
        ip_family_policy: Default::default(),
    }
}

pub(crate) fn pod(name: &str, ip: [u8; 4], app: &str) -> PodRecord {
    PodRecord {
        ip6: None,
        container_id: format!("c-{name}"),
        ifname: "eth0".into(),
        node: "n1".into(),
        ip: Ipv4Addr::from(ip),
        namespace: "shop".into(),
        name: name.into(),
        labels: BTreeMap::from([("app".to_string(), app.to_string())]),
    }
}

pub(crate) fn catalog() -> (Arc<Zone>, Catalog) {
    let zone = Arc::new(Zone::new(vec![
        Name::from_ascii("cluster.local.").unwrap(),
        Name::from_ascii("10.in-addr.arpa.").unwrap(),
    ]));
    let c = Catalog::new(
        zone.clone(),
        Name::from_ascii("cluster.local.").unwrap(),
        Ipv4Addr::new(10, 96, 0, 10),
    );
    (zone, c)
}

fn records(zone: &Zone, name: &str) -> Vec<Rdata> {
    let n = LowerName::new(&Name::from_ascii(name).unwrap());
    let mut v: Vec<Rdata> = zone.with_entry(&n, |e| {
        e.map(|e| e.records.iter().map(|r| r.0.clone()).collect())
            .unwrap_or_default()
    });
    v.sort_by_key(|r| format!("{r:?}"));
    v
}

fn a(ip: [u8; 4]) -> Rdata {
    Rdata::A(Ipv4Addr::from(ip))
}

#[test]
fn a_service_has_its_name_ptr_and_srv_per_named_port() {
    let (zone, mut c) = catalog();
    c.change(ModelChange::PutService(
        "/k/shop/web".into(),
        svc("web", Ipv4Addr::new(10, 96, 0, 7), Some("web")),
    ));
    assert_eq!(
        records(&zone, "web.shop.svc.cluster.local."),
        vec![a([10, 96, 0, 7])]
    );
    assert_eq!(
        records(&zone, "7.0.96.10.in-addr.arpa."),
        vec![Rdata::Ptr(
            Name::from_ascii("web.shop.svc.cluster.local.").unwrap()
        )]
    );
    let srv = records(&zone, "_http._tcp.web.shop.svc.cluster.local.");
    assert_eq!(
        srv,
        vec![Rdata::Srv {
            priority: 0,
            weight: 100,
            port: 80,
            target: Name::from_ascii("web.shop.svc.cluster.local.").unwrap()
        }]
    );
    // The unnamed UDP port has no SRV name.
    assert!(records(&zone, "_udp.web.shop.svc.cluster.local.").is_empty());
    c.change(ModelChange::DeleteService("/k/shop/web".into()));
    assert_eq!(
        zone.len(),
        2,
        "only ns.dns.cluster.local and dns.cluster.local remain"
    );
}

#[test]
fn a_headless_service_follows_its_pods() {
    let (zone, mut c) = catalog();
    c.change(ModelChange::PutService(
        "/k/shop/db".into(),
        svc("db", HEADLESS, Some("db")),
    ));
    assert!(records(&zone, "db.shop.svc.cluster.local.").is_empty());
    c.change(ModelChange::PutPod(
        "/p/1".into(),
        pod("db-0", [10, 244, 1, 5], "db"),
    ));
    c.change(ModelChange::PutPod(
        "/p/2".into(),
        pod("Not_A_Label", [10, 244, 2, 6], "db"),
    ));
    c.change(ModelChange::PutPod(
        "/p/3".into(),
        pod("web-0", [10, 244, 2, 7], "web"),
    ));
    assert_eq!(
        records(&zone, "db.shop.svc.cluster.local."),
        vec![a([10, 244, 1, 5]), a([10, 244, 2, 6])]
    );
    assert_eq!(
        records(&zone, "db-0.db.shop.svc.cluster.local."),
        vec![a([10, 244, 1, 5])]
    );
    assert_eq!(
        records(&zone, "10-244-2-6.db.shop.svc.cluster.local."),
        vec![a([10, 244, 2, 6])]
    );
    let srv = records(&zone, "_http._tcp.db.shop.svc.cluster.local.");
    assert_eq!(srv.len(), 2);
    assert!(srv.iter().all(|r| matches!(
        r,
        Rdata::Srv {
            port: 8080,
            weight: 50,
            ..
        }
    )));
    // Relabelled away: gone from the service, still a pod.
    c.change(ModelChange::PutPod(
        "/p/1".into(),
        pod("db-0", [10, 244, 1, 5], "other"),
    ));
    assert_eq!(
        records(&zone, "db.shop.svc.cluster.local."),
        vec![a([10, 244, 2, 6])]
    );
    assert!(records(&zone, "db-0.db.shop.svc.cluster.local.").is_empty());
    assert_eq!(
        records(&zone, "10-244-1-5.shop.pod.cluster.local."),
        vec![a([10, 244, 1, 5])]
    );
    c.change(ModelChange::DeletePod("/p/2".into()));
    assert!(records(&zone, "db.shop.svc.cluster.local.").is_empty());
    assert!(records(&zone, "6.2.244.10.in-addr.arpa.").is_empty());
}

#[test]
fn a_headless_service_with_explicit_endpoints() {
    let (zone, mut c) = catalog();
    c.change(ModelChange::PutService(
        "/k/shop/ext".into(),
        svc("ext", HEADLESS, None),
    ));
    c.change(ModelChange::PutEndpoints(
        "shop/ext".into(),
        ExplicitEndpoints {
            addresses: vec![EndpointAddress {
                ip: Ipv4Addr::new(192, 168, 9, 9),
                node: None,
            }],
        },
    ));
    assert_eq!(
        records(&zone, "ext.shop.svc.cluster.local."),
        vec![a([192, 168, 9, 9])]
    );
    c.change(ModelChange::DeleteEndpoints("shop/ext".into()));
    assert!(records(&zone, "ext.shop.svc.cluster.local.").is_empty());
}
