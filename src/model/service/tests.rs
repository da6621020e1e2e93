//! Unit tests of `model::service`.

use super::*;

fn pod(ns: &str, labels: &[(&str, &str)]) -> PodRecord {
    PodRecord {
        ip6: None,
        container_id: "c".into(),
        ifname: "eth0".into(),
        node: "n1".into(),
        ip: Ipv4Addr::new(10, 244, 1, 2),
        namespace: ns.into(),
        name: "p".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn svc() -> Service {
    Service {
        namespace: "default".into(),
        name: "web".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
        ports: vec!["http=80:8080/tcp".parse().unwrap()],
        selector: Some([("app".to_string(), "web".to_string())].into()),
        session_affinity: SessionAffinity::None,
        session_affinity_timeout: DEFAULT_AFFINITY_TIMEOUT,
        external_traffic_policy: TrafficPolicy::Cluster,
        cluster_ips: Vec::new(),
        ip_families: Vec::new(),
        ip_family_policy: Default::default(),
    }
}

#[test]
fn port_syntax() {
    let p: ServicePort = "dns=53:5353/udp".parse().unwrap();
    assert_eq!(p.name.as_deref(), Some("dns"));
    assert_eq!(
        (p.port, p.target_port, p.protocol),
        (53, 5353, Protocol::Udp)
    );
    let p: ServicePort = "80".parse().unwrap();
    assert_eq!((p.port, p.target_port, p.protocol), (80, 80, Protocol::Tcp));
    for bad in ["0", "70000", "80:x", "80/sctp", "Bad=80", "", ":80"] {
        assert!(bad.parse::<ServicePort>().is_err(), "{bad} should fail");
    }
    let e = |s: &str| s.parse::<ServicePort>().unwrap_err().to_string();
    assert_eq!(e("80/sctp"), "protocol \"sctp\" is not tcp or udp");
    assert_eq!(
        e("http=0"),
        "port \"0\" in \"http=0\" is not a port 1-65535"
    );
    assert_eq!(
        e("80:x"),
        "target port \"x\" in \"80:x\" is not a port 1-65535"
    );
    assert_eq!(
        e("Bad=80"),
        "port name \"Bad\" must be lowercase letters, digits and '-'"
    );
}

#[test]
fn selection_is_per_namespace_and_all_labels() {
    let s = svc();
    assert!(s.selects(&pod("default", &[("app", "web"), ("tier", "x")])));
    assert!(!s.selects(&pod("other", &[("app", "web")])));
    assert!(!s.selects(&pod("default", &[("app", "db")])));
    let mut explicit = svc();
    explicit.selector = None;
    assert!(!explicit.selects(&pod("default", &[("app", "web")])));
}

#[test]
fn validation() {
    assert!(svc().validate().is_ok());
    let mut s = svc();
    s.ports.push(s.ports[0].clone());
    assert!(s.validate().is_err());
    assert_eq!(
        s.validate().unwrap_err().to_string(),
        format!("ports: port {}/tcp is listed twice", s.ports[0].port)
    );
    let mut s = svc();
    s.ports[0].node_port = Some(80);
    assert_eq!(
        s.validate().unwrap_err().to_string(),
        "ports[0].nodePort 80 is outside 30000-32767"
    );
    let mut s = svc();
    s.ports[0].target_port = 0;
    assert_eq!(
        s.validate().unwrap_err(),
        DecodeError::out_of_range("ports[0].targetPort", 0, 1, 65535)
    );
    let mut s = svc();
    s.selector = Some(BTreeMap::new());
    assert!(
        s.validate()
            .unwrap_err()
            .to_string()
            .starts_with("selector: ")
    );
    let mut s = svc();
    s.name = "Web".into();
    assert_eq!(
        s.validate().unwrap_err().to_string(),
        "name \"Web\" is not a valid name"
    );
    let mut s = svc();
    s.session_affinity_timeout = 0;
    assert_eq!(
        s.validate().unwrap_err().to_string(),
        "sessionAffinityTimeout 0 is outside 1-86400 seconds"
    );
    assert!(matches!(
        Service::parse(b"{not json"),
        Err(DecodeError::Json { .. })
    ));
    let e = Service::parse(br#"{"namespace":"a"}"#).unwrap_err();
    assert!(
        e.to_string().starts_with("service does not decode: "),
        "{e}"
    );
}

#[test]
fn json_roundtrip() {
    let s = svc();
    let back = Service::parse(&s.to_bytes()).unwrap();
    assert_eq!(s, back);
    let text = String::from_utf8(s.to_bytes()).unwrap();
    assert!(text.contains("\"clusterIP\":\"10.96.0.10\""), "{text}");
    // A headless service is stored as Kubernetes writes it, and cannot have node ports.
    let mut h = s.clone();
    h.cluster_ip = HEADLESS;
    let text = String::from_utf8(h.to_bytes()).unwrap();
    assert!(text.contains("\"clusterIP\":\"None\""), "{text}");
    assert!(Service::parse(text.as_bytes()).unwrap().is_headless());
    assert!(Service::parse(&text.replace("\"None\"", "\"0.0.0.0\"").into_bytes()).is_err());
    h.ports[0].node_port = Some(30080);
    assert!(h.validate().is_err());
    assert!(text.contains("\"targetPort\":8080"), "{text}");
}

fn guard() -> AddressGuard {
    AddressGuard {
        service_cidr: "10.96.0.0/12".parse().unwrap(),
        service_cidr6: None,
        cluster_network: Some("10.244.0.0/16".parse().unwrap()),
        node_ips: vec![Ipv4Addr::new(192, 168, 77, 2)],
        etcd: vec!["192.168.170.2:2379".parse().unwrap()],
    }
}

#[test]
fn cluster_ips_table() {
    let g = guard();
    for (ip, want) in [
        ("10.96.0.9", None),
        ("10.96.0.10", Some("reserved for the cluster DNS")),
        ("10.111.255.254", None),
        ("10.96.0.0", Some("network or broadcast")),
        ("10.111.255.255", Some("network or broadcast")),
        ("192.168.170.2", Some("etcd endpoint")),
        ("192.168.77.2", Some("node's own")),
        ("10.200.0.1", Some("outside the service CIDR")),
        ("127.0.0.1", Some("loopback")),
        ("0.0.0.0", Some("unspecified")),
        ("224.0.0.1", Some("multicast")),
        ("255.255.255.255", Some("broadcast")),
        ("240.1.2.3", Some("reserved")),
    ] {
        let r = g.cluster_ip(ip.parse().unwrap());
        match want {
            None => assert!(r.is_ok(), "{ip}: {r:?}"),
            Some(w) => assert!(r.as_ref().is_err_and(|e| e.contains(w)), "{ip}: {r:?}"),
        }
    }
    // A cluster IP in the pod network (only possible with overlapping ranges) is refused.
    let mut g = guard();
    g.cluster_network = Some("10.96.0.0/16".parse().unwrap());
    assert!(g.cluster_ip("10.96.1.1".parse().unwrap()).is_err());
}

#[test]
fn endpoints_table() {
    let g = guard();
    for (ip, ok) in [
        ("10.244.1.5", true),
        ("192.168.1.20", true),
        ("0.0.0.0", false),
        ("127.0.0.1", false),
        ("255.255.255.255", false),
        ("239.1.1.1", false),
        ("192.168.170.2", false),
        ("192.168.77.2", false),
        ("10.96.0.10", false),
    ] {
        assert_eq!(g.endpoint(ip.parse().unwrap()).is_ok(), ok, "{ip}");
    }
    let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let e = ExplicitEndpoints::from_args(&args(&["10.1.1.1", "10.1.1.2@n1"]), &g).unwrap();
    assert_eq!(e.addresses[1].node.as_deref(), Some("n1"));
    for bad in [
        &["10.1.1.1", "10.1.1.1"][..],
        &["127.0.0.1"],
        &["x"],
        &["10.1.1.1@"],
        &["10.1.1.1@a b"],
    ] {
        let r = ExplicitEndpoints::from_args(&args(bad), &g);
        assert!(r.is_err(), "{bad:?}");
    }
}

#[test]
fn node_ports_table() {
    let mut g = guard();
    assert!(g.node_port(30080).is_ok());
    assert!(g.node_port(2379).is_err());
    g.etcd.push("10.0.0.5:32379".parse().unwrap());
    assert!(g.node_port(32379).unwrap_err().contains("etcd"));
}

#[test]
fn service_cidr_table() {
    let ctx = RangeContext {
        underlay: vec!["192.168.77.0/24".parse().unwrap()],
        etcd: vec![Ipv4Addr::new(192, 168, 170, 2)],
    };
    let net = Some("10.244.0.0/16".parse().unwrap());
    for (c, want) in [
        ("10.96.0.0/12", None),
        ("0.0.0.0/0", Some("every address")),
        ("10.244.0.0/16", Some("cluster network")),
        ("10.0.0.0/8", Some("cluster network")),
        ("192.168.77.0/28", Some("underlay network 192.168.77.0/24")),
        ("192.168.170.2/32", Some("etcd endpoint 192.168.170.2")),
        ("127.0.0.0/16", Some("loopback")),
        ("169.254.0.0/24", Some("link-local")),
        ("224.0.0.0/8", Some("multicast")),
        ("10.96.0.0/31", Some("too small")),
    ] {
        let r = check_service_cidr(c.parse().unwrap(), net, &ctx);
        match want {
            None => assert!(r.is_ok(), "{c}: {r:?}"),
            Some(w) => assert!(r.as_ref().is_err_and(|e| e.contains(w)), "{c}: {r:?}"),
        }
    }
    let svc = Some("10.96.0.0/12".parse().unwrap());
    for (n, ok) in [
        ("10.244.0.0/16", true),
        ("10.64.0.0/10", false),
        ("0.0.0.0/0", false),
        ("127.0.0.0/8", false),
        ("192.168.170.0/24", false),
    ] {
        assert_eq!(
            check_cluster_network(n.parse().unwrap(), svc, &ctx).is_ok(),
            ok,
            "{n}"
        );
    }
}

#[test]
fn selector_table() {
    let ok = [
        ("app=web", vec![("app", "web")]),
        ("app=web,tier=fe", vec![("app", "web"), ("tier", "fe")]),
        ("example.com/app=web", vec![("example.com/app", "web")]),
        ("app=", vec![("app", "")]),
        ("App_1.x=V-2", vec![("App_1.x", "V-2")]),
    ];
    for (s, want) in ok {
        let got = parse_selector(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        let want: BTreeMap<String, String> = want
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(got, want, "{s}");
    }
    let long = "a".repeat(64);
    let bad = [
        ("", "empty"),
        ("app=web,,", "empty"),
        (",app=web", "empty"),
        ("a=b=c", "more than one '='"),
        ("app=web;x=y", "app=web;x=y"),
        ("app=web,app=db", "given twice"),
        ("app = web", "app = web"),
        ("app=we b", "we b"),
        ("app", "not key=value"),
        ("=web", "empty name"),
        ("-app=web", "begin and end"),
        ("app=web-", "begin and end"),
        ("Example.com/app=web", "prefix"),
        ("/app=web", "prefix"),
    ];
    for (s, want) in bad {
        let e = parse_selector(s).expect_err(s);
        assert!(e.contains(want), "{s}: {e}");
    }
    let e = parse_selector(&format!("{long}=x")).unwrap_err();
    assert!(e.contains("63"), "{e}");
    let e = parse_selector(&format!("a={long}")).unwrap_err();
    assert!(e.contains("63"), "{e}");
}

#[test]
fn ip_families_policy_and_cluster_ips_are_checked_as_kubernetes_does() {
    let v4: IpAddr = "10.96.0.10".parse().unwrap();
    let v6: IpAddr = "fd00:96::a".parse().unwrap();
    let dual = |policy: IpFamilyPolicy| Service {
        cluster_ips: vec![v4, v6],
        ip_families: vec![IpFamily::IPv4, IpFamily::IPv6],
        ip_family_policy: policy,
        ..svc()
    };
    for p in [
        IpFamilyPolicy::PreferDualStack,
        IpFamilyPolicy::RequireDualStack,
    ] {
        let s = dual(p);
        let back = Service::parse(&s.to_bytes()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.cluster_ip6(), Some("fd00:96::a".parse().unwrap()));
        assert_eq!(back.cluster_ip_of(IpFamily::IPv6), Some(v6));
        assert_eq!(back.cluster_ips().collect::<Vec<_>>(), [v4, v6]);
    }
    // Kubernetes' field names and values.
    let text = String::from_utf8(dual(IpFamilyPolicy::RequireDualStack).to_bytes()).unwrap();
    assert!(
        text.contains(r#""clusterIPs":["10.96.0.10","fd00:96::a"]"#)
            && text.contains(r#""ipFamilies":["IPv4","IPv6"]"#)
            && text.contains(r#""ipFamilyPolicy":"RequireDualStack""#),
        "{text}"
    );
    // A record from before dual-stack is an IPv4 single-stack service, and stays as written.
    let old = svc();
    assert_eq!(old.cluster_ips().collect::<Vec<_>>(), [v4]);
    assert_eq!(old.cluster_ip6(), None);
    let old_text = String::from_utf8(old.to_bytes()).unwrap();
    assert!(
        !old_text.contains("clusterIPs") && !old_text.contains("ipFamil"),
        "{old_text}"
    );
    let cases: Vec<(Service, &str)> = vec![
        (
            dual(IpFamilyPolicy::SingleStack),
            "ipFamilyPolicy: SingleStack with two cluster IPs",
        ),
        (
            Service {
                ip_family_policy: IpFamilyPolicy::RequireDualStack,
                ..svc()
            },
            "ipFamilyPolicy: RequireDualStack with only an IPv4 cluster IP",
        ),
        (
            Service {
                cluster_ips: vec![v6, v4],
                ..dual(IpFamilyPolicy::RequireDualStack)
            },
            "clusterIPs: the first must be clusterIP 10.96.0.10",
        ),
        (
            Service {
                cluster_ips: vec![v4, "10.96.0.11".parse().unwrap()],
                ..dual(IpFamilyPolicy::RequireDualStack)
            },
            "clusterIPs: 10.96.0.11: the second must be IPv6",
        ),
        (
            Service {
                cluster_ips: vec![v4, "::1".parse().unwrap()],
                ..dual(IpFamilyPolicy::RequireDualStack)
            },
            "clusterIPs: ::1 cannot be a cluster IP",
        ),
        (
            Service {
                ip_families: vec![IpFamily::IPv6, IpFamily::IPv4],
                ..dual(IpFamilyPolicy::RequireDualStack)
            },
            "ipFamilies: IPv6-primary services are not supported",
        ),
        (
            Service {
                ip_families: vec![IpFamily::IPv4, IpFamily::IPv4],
                ..dual(IpFamilyPolicy::RequireDualStack)
            },
            "ipFamilies: [IPv4, IPv4] must name each family at most once",
        ),
        (
            Service {
                ip_families: vec![IpFamily::IPv4],
                ..dual(IpFamilyPolicy::RequireDualStack)
            },
            "ipFamilies: [IPv4] do not match the families of clusterIPs [IPv4, IPv6]",
        ),
        (
            Service {
                cluster_ip: HEADLESS,
                ..dual(IpFamilyPolicy::PreferDualStack)
            },
            "clusterIPs: a headless service has no cluster IPs",
        ),
        (
            Service {
                cluster_ip: HEADLESS,
                cluster_ips: Vec::new(),
                ..dual(IpFamilyPolicy::SingleStack)
            },
            "ipFamilyPolicy: SingleStack with two ipFamilies",
        ),
    ];
    for (s, want) in cases {
        let e = Service::parse(&s.to_bytes()).unwrap_err().to_string();
        assert!(e.contains(want), "{e:?} should say {want:?}");
    }
    // Not a family, not an address: a decode error naming the field.
    let bad = old_text.replace(
        r#""clusterIP":"10.96.0.10""#,
        r#""clusterIP":"10.96.0.10","ipFamilies":["IPv5"]"#,
    );
    let e = Service::parse(bad.as_bytes()).unwrap_err().to_string();
    assert!(e.contains("IPv5"), "{e}");
    // A headless service may name the families its name answers with.
    let hl = Service {
        cluster_ip: HEADLESS,
        ip_families: vec![IpFamily::IPv4, IpFamily::IPv6],
        ip_family_policy: IpFamilyPolicy::RequireDualStack,
        ..svc()
    };
    assert_eq!(Service::parse(&hl.to_bytes()).unwrap(), hl);
}

#[test]
fn service_cidrs_take_one_range_per_family_and_ipv6_ranges_are_checked() {
    let c: ServiceCidrs = "10.96.0.0/12,fd00:96::/108".parse().unwrap();
    assert_eq!(c.v4, "10.96.0.0/12".parse::<Ipv4Network>().unwrap());
    assert_eq!(c.v6, Some("fd00:96::/108".parse().unwrap()));
    assert_eq!(c.to_string(), "10.96.0.0/12,fd00:96::/108");
    let swapped: ServiceCidrs = "fd00:96::/108, 10.96.0.0/12".parse().unwrap();
    assert_eq!(swapped, c);
    let one: ServiceCidrs = "10.96.0.0/12".parse().unwrap();
    assert_eq!((one.v6, one.to_string().as_str()), (None, "10.96.0.0/12"));
    for (bad, why) in [
        ("fd00:96::/108", "has no IPv4 range"),
        ("10.96.0.0/12,10.100.0.0/16", "two ranges of one family"),
        (
            "10.96.0.0/12,fd00::/108,fd01::/108",
            "two ranges of one family",
        ),
        ("10.96.0.0/12,", "is not a CIDR"),
        ("10.96.0.0/33", "is not a CIDR"),
    ] {
        let e = bad.parse::<ServiceCidrs>().unwrap_err();
        assert!(e.contains(why), "{bad}: {e}");
    }
    let net6: Option<Ipv6Network> = Some("fd00:10:244::/56".parse().unwrap());
    assert!(check_service_cidr6("fd00:96::/108".parse().unwrap(), net6, &[]).is_ok());
    let node: Ipv6Network = "fd00:77::11/128".parse().unwrap();
    let lan: Ipv6Network = "fd00:78::/64".parse().unwrap();
    for (bad, why) in [
        ("fd00:77::/120", "contains the node address fd00:77::11"),
        (
            "fd00:78::/108",
            "overlaps the underlay network fd00:78::/64",
        ),
        ("::ffff:10.96.0.0/108", "IPv4-mapped"),
    ] {
        let e = check_service_cidr6(bad.parse().unwrap(), net6, &[node, lan]).unwrap_err();
        assert!(e.contains(why), "{bad}: {e}");
    }
    for (bad, why) in [
        (
            "fd00:10:244:1::/108",
            "overlaps the IPv6 cluster network fd00:10:244::/56",
        ),
        ("fe80::/108", "overlaps link-local"),
        ("ff02::/108", "overlaps multicast"),
        ("::1/128", "overlaps"),
        ("fd00::/48", "too large"),
        ("fd00:96::/124", "too small"),
    ] {
        let e = check_service_cidr6(bad.parse().unwrap(), net6, &[]).unwrap_err();
        assert!(e.contains(why), "{bad}: {e}");
    }
    let g = AddressGuard {
        service_cidr6: c.v6,
        ..AddressGuard::new(c.v4)
    };
    assert!(g.cluster_ip6("fd00:96::a".parse().unwrap()).is_ok());
    assert!(
        g.cluster_ip6("fd00:96::".parse().unwrap())
            .unwrap_err()
            .contains("network address")
    );
    assert!(
        g.cluster_ip6("fd00:97::a".parse().unwrap())
            .unwrap_err()
            .contains("outside")
    );
    assert!(
        AddressGuard::new(c.v4)
            .cluster_ip6("fd00:96::a".parse().unwrap())
            .unwrap_err()
            .contains("no IPv6 service range")
    );
}
