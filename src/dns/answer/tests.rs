use std::net::Ipv6Addr;
use std::sync::Arc;

use hickory_proto::op::Message;
use hickory_proto::rr::{Name, RData, RecordType};
use ipnetwork::Ipv6Network;
use proptest::prelude::*;

use super::*;
use crate::dns::catalog::Catalog;
use crate::dns::catalog::tests_support::{catalog, pod, svc};
use crate::model::service::{HEADLESS, Service};
use crate::store::records::ModelChange;

fn auth() -> Authority {
    Authority::new(
        Name::from_ascii("cluster.local.").unwrap(),
        Ipv4Addr::new(10, 96, 0, 10),
        5,
        vec![
            "10.96.0.0/12".parse().unwrap(),
            "10.244.0.0/16".parse().unwrap(),
        ],
    )
}

fn loaded() -> (Arc<Zone>, Catalog) {
    let (zone, mut c) = catalog();
    c.change(ModelChange::PutService(
        "/k/shop/web".into(),
        svc("web", Ipv4Addr::new(10, 96, 0, 7), Some("web")),
    ));
    c.change(ModelChange::PutService(
        "/k/shop/db".into(),
        svc("db", HEADLESS, Some("db")),
    ));
    for i in 0..60u8 {
        c.change(ModelChange::PutPod(
            format!("/p/{i}"),
            pod(&format!("db-{i}"), [10, 244, 1, i + 1], "db"),
        ));
    }
    zone.set_ready();
    (zone, c)
}

fn query(name: &str, t: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 0x1234;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    if let Some(p) = edns {
        let mut e = Edns::new();
        e.set_max_payload(p);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn ask(zone: &Zone, name: &str, t: RecordType, edns: Option<u16>, tr: Transport) -> Message {
    match answer(zone, &auth(), &query(name, t, edns), tr) {
        Outcome::Reply(r) => Message::from_vec(&r.bytes).unwrap(),
        o => panic!("{name}: {o:?}"),
    }
}

#[test]
fn a_service_name_answers_with_its_cluster_ip_in_any_case() {
    let (zone, _c) = loaded();
    let m = ask(
        &zone,
        "WEB.Shop.svc.cluster.local.",
        RecordType::A,
        None,
        Transport::Udp,
    );
    assert_eq!(m.metadata.id, 0x1234);
    assert!(m.metadata.authoritative);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        m.queries[0].name().to_ascii(),
        "WEB.Shop.svc.cluster.local.",
        "question as asked"
    );
    assert_eq!(m.answers.len(), 1);
    assert_eq!(m.answers[0].data, RData::A(A::new(10, 96, 0, 7)));
    assert_eq!(m.answers[0].ttl, 5);
}

#[test]
fn nxdomain_and_nodata_carry_the_soa() {
    let (zone, _c) = loaded();
    let m = ask(
        &zone,
        "nope.shop.svc.cluster.local.",
        RecordType::A,
        None,
        Transport::Udp,
    );
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(matches!(m.authorities[0].data, RData::SOA(_)));
    for (name, t) in [
        ("web.shop.svc.cluster.local.", RecordType::AAAA),
        ("shop.svc.cluster.local.", RecordType::A),
        ("_tcp.web.shop.svc.cluster.local.", RecordType::SRV),
    ] {
        let m = ask(&zone, name, t, None, Transport::Udp);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
        assert!(m.answers.is_empty(), "{name}");
        assert!(matches!(m.authorities[0].data, RData::SOA(_)), "{name}");
    }
    // No wildcards: `*` is a label like any other.
    let m = ask(
        &zone,
        "*.shop.svc.cluster.local.",
        RecordType::A,
        None,
        Transport::Udp,
    );
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

#[test]
fn the_apex_has_soa_and_ns_with_its_address() {
    let (zone, _c) = loaded();
    let m = ask(
        &zone,
        "cluster.local.",
        RecordType::NS,
        None,
        Transport::Udp,
    );
    assert!(matches!(m.answers[0].data, RData::NS(_)));
    assert_eq!(m.additionals[0].data, RData::A(A::new(10, 96, 0, 10)));
    let m = ask(
        &zone,
        "cluster.local.",
        RecordType::SOA,
        None,
        Transport::Udp,
    );
    assert!(matches!(m.answers[0].data, RData::SOA(_)));
    let m = ask(
        &zone,
        "ns.dns.cluster.local.",
        RecordType::A,
        None,
        Transport::Udp,
    );
    assert_eq!(m.answers[0].data, RData::A(A::new(10, 96, 0, 10)));
}

#[test]
fn srv_answers_carry_target_addresses() {
    let (zone, _c) = loaded();
    let m = ask(
        &zone,
        "_http._tcp.web.shop.svc.cluster.local.",
        RecordType::SRV,
        Some(1232),
        Transport::Udp,
    );
    assert_eq!(m.answers.len(), 1);
    let RData::SRV(srv) = &m.answers[0].data else {
        panic!()
    };
    assert_eq!(srv.port, 80);
    assert!(
        m.additionals
            .iter()
            .any(|r| r.data == RData::A(A::new(10, 96, 0, 7)))
    );
}

#[test]
fn ptr_for_cluster_ips_and_pods_and_nxdomain_inside_our_ranges_only() {
    let (zone, _c) = loaded();
    let m = ask(
        &zone,
        "7.0.96.10.in-addr.arpa.",
        RecordType::PTR,
        None,
        Transport::Udp,
    );
    assert_eq!(
        m.answers[0].data,
        RData::PTR(PTR(Name::from_ascii("web.shop.svc.cluster.local.").unwrap()))
    );
    let m = ask(
        &zone,
        "3.1.244.10.in-addr.arpa.",
        RecordType::PTR,
        None,
        Transport::Udp,
    );
    assert_eq!(
        m.answers[0].data.to_string(),
        "10-244-1-3.shop.pod.cluster.local."
    );
    let m = ask(
        &zone,
        "99.99.96.10.in-addr.arpa.",
        RecordType::PTR,
        None,
        Transport::Udp,
    );
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let out = answer(
        &zone,
        &auth(),
        &query("1.2.0.192.in-addr.arpa.", RecordType::PTR, None),
        Transport::Udp,
    );
    assert!(
        matches!(out, Outcome::Forward(_)),
        "outside our ranges: forwarded"
    );
    let out = answer(
        &zone,
        &auth(),
        &query("example.com.", RecordType::A, None),
        Transport::Udp,
    );
    assert!(matches!(out, Outcome::Forward(_)));
}

#[test]
fn a_big_answer_is_truncated_over_udp_and_whole_over_tcp() {
    let (zone, _c) = loaded();
    let m = ask(
        &zone,
        "db.shop.svc.cluster.local.",
        RecordType::A,
        None,
        Transport::Udp,
    );
    assert!(m.metadata.truncation, "60 A records do not fit 512 bytes");
    assert!(m.answers.is_empty());
    let m = ask(
        &zone,
        "db.shop.svc.cluster.local.",
        RecordType::A,
        Some(4096),
        Transport::Udp,
    );
    assert!(!m.metadata.truncation, "they fit our 1232-byte EDNS limit");
    assert_eq!(m.answers.len(), 60);
    assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), Some(EDNS_PAYLOAD));
    let m = ask(
        &zone,
        "db.shop.svc.cluster.local.",
        RecordType::A,
        None,
        Transport::Tcp,
    );
    assert_eq!(m.answers.len(), 60);
}

#[test]
fn any_over_udp_gets_rfc8482() {
    let (zone, _c) = loaded();
    let m = ask(
        &zone,
        "web.shop.svc.cluster.local.",
        RecordType::ANY,
        None,
        Transport::Udp,
    );
    assert!(matches!(m.answers[0].data, RData::HINFO(_)));
    let m = ask(
        &zone,
        "web.shop.svc.cluster.local.",
        RecordType::ANY,
        None,
        Transport::Tcp,
    );
    assert_eq!(m.answers[0].data, RData::A(A::new(10, 96, 0, 7)));
}

#[test]
fn bad_queries_get_formerr_notimp_badvers_or_nothing() {
    let (zone, _c) = loaded();
    let a = auth();
    assert!(matches!(
        answer(&zone, &a, &[1, 2, 3], Transport::Udp),
        Outcome::Drop
    ));
    let mut garbage = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    garbage.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]); // a compression pointer to itself
    match answer(&zone, &a, &garbage, Transport::Udp) {
        Outcome::Reply(r) => {
            assert_eq!(r.rcode, ResponseCode::FormErr);
            assert_eq!(&r.bytes[..2], &[0xab, 0xcd]);
        }
        o => panic!("{o:?}"),
    }
    let mut resp = query("web.shop.svc.cluster.local.", RecordType::A, None);
    resp[2] |= 0x80;
    assert!(
        matches!(answer(&zone, &a, &resp, Transport::Udp), Outcome::Drop),
        "never answer a response"
    );
    let mut m =
        Message::from_vec(&query("web.shop.svc.cluster.local.", RecordType::A, None)).unwrap();
    m.metadata.op_code = hickory_proto::op::OpCode::Update;
    match answer(&zone, &a, &m.to_vec().unwrap(), Transport::Udp) {
        Outcome::Reply(r) => assert_eq!(r.rcode, ResponseCode::NotImp),
        o => panic!("{o:?}"),
    }
    let mut m = Message::from_vec(&query(
        "web.shop.svc.cluster.local.",
        RecordType::A,
        Some(1232),
    ))
    .unwrap();
    if let Some(e) = m.edns.as_mut() {
        e.set_version(1);
    }
    match answer(&zone, &a, &m.to_vec().unwrap(), Transport::Udp) {
        Outcome::Reply(r) => assert_eq!(r.rcode, ResponseCode::BADVERS),
        o => panic!("{o:?}"),
    }
}

#[test]
fn before_the_zone_is_loaded_answers_are_servfail_not_denials() {
    let (zone, _c) = catalog();
    let m = ask(
        &zone,
        "web.shop.svc.cluster.local.",
        RecordType::A,
        None,
        Transport::Udp,
    );
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
}

/// One loaded zone for every proptest case.
static SHARED: std::sync::LazyLock<Arc<Zone>> = std::sync::LazyLock::new(|| loaded().0);

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Any bytes at all: no panic, and a reply is never bigger than the UDP limit.
    #[test]
    fn any_bytes_are_answered_or_dropped_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let zone = SHARED.clone();
        if let Outcome::Reply(r) = answer(&zone, &auth(), &bytes, Transport::Udp) {
            prop_assert!(r.bytes.len() <= usize::from(EDNS_PAYLOAD));
        }
    }

    /// Mutated valid queries (the decoder's interesting paths): no panic.
    #[test]
    fn mutated_queries_do_not_panic(flips in proptest::collection::vec((0usize..64, any::<u8>()), 1..6), t in 0u16..300) {
        let zone = SHARED.clone();
        let mut q = query("_http._tcp.web.shop.svc.cluster.local.", RecordType::from(t), Some(1232));
        for (i, b) in flips {
            let n = q.len();
            q[i % n] = b;
        }
        let _ = answer(&zone, &auth(), &q, Transport::Udp);
        let _ = answer(&zone, &auth(), &q, Transport::Tcp);
    }
}

#[test]
fn dual_stack_pods_answer_aaaa_and_ip6_arpa_ptr_and_headless_names_carry_both_families() {
    let net6: Ipv6Network = "fd00:10:244::/56".parse().unwrap();
    let zone = Arc::new(Zone::new(vec![
        Name::from_ascii("cluster.local.").unwrap(),
        Name::from_ascii("10.in-addr.arpa.").unwrap(),
        crate::dns::zone::reverse_apex6(net6),
        crate::dns::zone::reverse_apex6("fd00:96::/108".parse().unwrap()),
    ]));
    let mut c = Catalog::new(
        zone.clone(),
        Name::from_ascii("cluster.local.").unwrap(),
        Ipv4Addr::new(10, 96, 0, 10),
    )
    .with_service_cidr6(Some("fd00:96::/108".parse().unwrap()));
    let auth = Authority::new(
        Name::from_ascii("cluster.local.").unwrap(),
        Ipv4Addr::new(10, 96, 0, 10),
        5,
        vec![
            "10.96.0.0/12".parse().unwrap(),
            "10.244.0.0/16".parse().unwrap(),
            IpNetwork::V6(net6),
            "fd00:96::/108".parse().unwrap(),
        ],
    );
    let v6: Ipv6Addr = "fd00:10:244:1::5".parse().unwrap();
    let mut p = pod("db-0", [10, 244, 1, 5], "db");
    p.ip6 = Some(v6);
    c.change(ModelChange::PutService(
        "/k/shop/db".into(),
        Service {
            ip_family_policy: crate::model::service::IpFamilyPolicy::PreferDualStack,
            ..svc("db", HEADLESS, Some("db"))
        },
    ));
    // The same pods behind a single-stack headless service: IPv4 only, as Kubernetes' endpoint
    // slices of that family.
    c.change(ModelChange::PutService(
        "/k/shop/db4".into(),
        svc("db4", HEADLESS, Some("db")),
    ));
    // A dual-stack service: AAAA of its IPv6 cluster IP, PTR back.
    c.change(ModelChange::PutService(
        "/k/shop/web".into(),
        Service {
            cluster_ips: vec!["10.96.0.7".parse().unwrap(), "fd00:96::7".parse().unwrap()],
            ip_families: vec![
                crate::model::service::IpFamily::IPv4,
                crate::model::service::IpFamily::IPv6,
            ],
            ip_family_policy: crate::model::service::IpFamilyPolicy::RequireDualStack,
            ..svc("web", Ipv4Addr::new(10, 96, 0, 7), Some("web"))
        },
    ));
    // An IPv6 cluster IP outside the node's IPv6 service range: nothing programs it here,
    // so no AAAA sends clients there.
    c.change(ModelChange::PutService(
        "/k/shop/far".into(),
        Service {
            cluster_ips: vec!["10.96.0.8".parse().unwrap(), "fd00:97::8".parse().unwrap()],
            ip_families: vec![
                crate::model::service::IpFamily::IPv4,
                crate::model::service::IpFamily::IPv6,
            ],
            ip_family_policy: crate::model::service::IpFamilyPolicy::RequireDualStack,
            ..svc("far", Ipv4Addr::new(10, 96, 0, 8), Some("far"))
        },
    ));
    c.change(ModelChange::PutPod("/p/0".into(), p));
    zone.set_ready();
    let ask = |name: &str, t: RecordType| -> Message {
        match answer(&zone, &auth, &query(name, t, None), Transport::Udp) {
            Outcome::Reply(r) => Message::from_vec(&r.bytes).unwrap(),
            o => panic!("{name}: {o:?}"),
        }
    };
    let data =
        |m: &Message| -> Vec<String> { m.answers.iter().map(|r| r.data.to_string()).collect() };
    let m = ask("fd00-10-244-1--5.shop.pod.cluster.local.", RecordType::AAAA);
    assert_eq!(data(&m), ["fd00:10:244:1::5"]);
    let m = ask("fd00-10-244-1--5.shop.pod.cluster.local.", RecordType::A);
    assert!(m.answers.is_empty(), "the IPv6 name has no A: NODATA");
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    let m = ask("10-244-1-5.shop.pod.cluster.local.", RecordType::A);
    assert_eq!(data(&m), ["10.244.1.5"]);
    let rev = crate::dns::zone::reverse_name6(v6).to_ascii();
    let m = ask(&rev, RecordType::PTR);
    assert_eq!(data(&m), ["fd00-10-244-1--5.shop.pod.cluster.local."]);
    for (name, t, want) in [
        (
            "db.shop.svc.cluster.local.",
            RecordType::AAAA,
            "fd00:10:244:1::5",
        ),
        ("db.shop.svc.cluster.local.", RecordType::A, "10.244.1.5"),
        (
            "db-0.db.shop.svc.cluster.local.",
            RecordType::AAAA,
            "fd00:10:244:1::5",
        ),
    ] {
        assert_eq!(data(&ask(name, t)), [want], "{name} {t}");
    }
    assert!(
        ask("db4.shop.svc.cluster.local.", RecordType::AAAA)
            .answers
            .is_empty()
    );
    assert_eq!(
        data(&ask("db4.shop.svc.cluster.local.", RecordType::A)),
        ["10.244.1.5"]
    );
    assert_eq!(
        data(&ask("web.shop.svc.cluster.local.", RecordType::AAAA)),
        ["fd00:96::7"]
    );
    assert_eq!(
        data(&ask("web.shop.svc.cluster.local.", RecordType::A)),
        ["10.96.0.7"]
    );
    assert!(
        ask("far.shop.svc.cluster.local.", RecordType::AAAA)
            .answers
            .is_empty()
    );
    assert_eq!(
        data(&ask("far.shop.svc.cluster.local.", RecordType::A)),
        ["10.96.0.8"]
    );
    let vip6 = crate::dns::zone::reverse_name6("fd00:96::7".parse().unwrap()).to_ascii();
    assert_eq!(
        data(&ask(&vip6, RecordType::PTR)),
        ["web.shop.svc.cluster.local."]
    );
    // SRV targets carry both addresses as additional records.
    let m = ask("_http._tcp.db.shop.svc.cluster.local.", RecordType::SRV);
    let mut extra: Vec<String> = m.additionals.iter().map(|r| r.data.to_string()).collect();
    extra.sort();
    assert_eq!(extra, ["10.244.1.5", "fd00:10:244:1::5"]);
    // Inside our IPv6 range but naming nothing: NXDOMAIN; outside it, or not a full address:
    // forwarded.
    let gone = crate::dns::zone::reverse_name6("fd00:10:244:1::99".parse().unwrap()).to_ascii();
    assert_eq!(
        ask(&gone, RecordType::PTR).metadata.response_code,
        ResponseCode::NXDomain
    );
    for other in [
        crate::dns::zone::reverse_name6("2001:db8::1".parse().unwrap()).to_ascii(),
        "1.0.0.2.ip6.arpa.".to_string(),
    ] {
        let out = answer(
            &zone,
            &auth,
            &query(&other, RecordType::PTR, None),
            Transport::Udp,
        );
        assert!(matches!(out, Outcome::Forward(_)), "{other}: forwarded");
    }
    // The pod going away removes every name of both families.
    c.change(ModelChange::DeletePod("/p/0".into()));
    assert_eq!(
        ask("fd00-10-244-1--5.shop.pod.cluster.local.", RecordType::AAAA)
            .metadata
            .response_code,
        ResponseCode::NXDomain
    );
    assert_eq!(
        ask(&rev, RecordType::PTR).metadata.response_code,
        ResponseCode::NXDomain
    );
    assert!(
        ask("db.shop.svc.cluster.local.", RecordType::AAAA)
            .answers
            .is_empty()
    );
}
