//! Property tests of the service and endpoints record decoders and of the CLI port syntax
//! (`--port [NAME=]PORT[:TARGET][/PROTO]`) and selectors (`--selector k=v[,k=v]`); see
//! `util::proptest_support`.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;

use proptest::prelude::*;

use super::{
    EndpointAddress, ExplicitEndpoints, NODE_PORT_MAX, NODE_PORT_MIN, Protocol, Service,
    ServicePort, SessionAffinity, TrafficPolicy,
};
use crate::util::proptest_support::{
    apply, arb_bytes, arb_json, arb_json_object, arb_mutation, arb_text, config, names_a_field,
};

const KEYS: &[&str] = &[
    "namespace",
    "name",
    "clusterIP",
    "ports",
    "selector",
    "sessionAffinity",
    "sessionAffinityTimeout",
    "externalTrafficPolicy",
    "port",
    "targetPort",
    "protocol",
    "nodePort",
];
const PATHS: &[&[&str]] = &[
    &["namespace"],
    &["name"],
    &["clusterIP"],
    &["ports"],
    &["selector"],
    &["sessionAffinity"],
    &["sessionAffinityTimeout"],
    &["externalTrafficPolicy"],
    &["ports", "0"],
    &["ports", "0", "name"],
    &["ports", "0", "port"],
    &["ports", "0", "targetPort"],
    &["ports", "0", "protocol"],
    &["ports", "0", "nodePort"],
];
const ENDPOINT_KEYS: &[&str] = &["addresses", "ip", "node"];
const ENDPOINT_PATHS: &[&[&str]] = &[
    &["addresses"],
    &["addresses", "0"],
    &["addresses", "0", "ip"],
    &["addresses", "0", "node"],
];

const NAME: &str = "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?";

fn arb_protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)]
}

fn arb_port() -> impl Strategy<Value = ServicePort> {
    (
        proptest::option::of(NAME),
        1u16..=65535,
        1u16..=65535,
        arb_protocol(),
        proptest::option::of(NODE_PORT_MIN..=NODE_PORT_MAX),
    )
        .prop_map(
            |(name, port, target_port, protocol, node_port)| ServicePort {
                name,
                port,
                target_port,
                protocol,
                node_port,
            },
        )
}

/// A valid service: valid names, 1-4 ports with distinct port/protocol pairs, no selector or
/// a non-empty one.
fn arb_service() -> impl Strategy<Value = Service> {
    (
        NAME,
        NAME,
        any::<u32>(),
        prop::collection::vec(arb_port(), 1..5),
        // Kubernetes label syntax: an optional DNS-subdomain prefix, a name and a value.
        proptest::option::of(prop::collection::btree_map(
            "([a-z]([a-z0-9-]{0,6}[a-z0-9])?\\.)?[a-z]{1,4}/?[a-z0-9]([a-z0-9._-]{0,8}[a-z0-9])?",
            "([A-Za-z0-9]([A-Za-z0-9._-]{0,10}[A-Za-z0-9])?)?",
            1..4,
        )),
        any::<bool>(),
        1u32..=86400,
        any::<bool>(),
    )
        .prop_map(
            |(namespace, name, ip, ports, selector, affinity, timeout, local)| {
                let mut seen = HashSet::new();
                let ports: Vec<ServicePort> = ports
                    .into_iter()
                    .filter(|p| seen.insert((p.port, p.protocol)))
                    .collect();
                Service {
                    namespace,
                    name,
                    cluster_ip: Ipv4Addr::from(ip),
                    ports,
                    selector: selector.map(|s: BTreeMap<String, String>| s),
                    session_affinity: if affinity {
                        SessionAffinity::ClientIp
                    } else {
                        SessionAffinity::None
                    },
                    session_affinity_timeout: timeout,
                    external_traffic_policy: if local {
                        TrafficPolicy::Local
                    } else {
                        TrafficPolicy::Cluster
                    },
                    cluster_ips: Vec::new(),
                    ip_families: Vec::new(),
                    ip_family_policy: Default::default(),
                }
            },
        )
}

fn arb_endpoints() -> impl Strategy<Value = ExplicitEndpoints> {
    prop::collection::vec(
        (any::<u32>(), proptest::option::of("\\PC{1,20}")).prop_map(|(ip, node)| EndpointAddress {
            ip: Ipv4Addr::from(ip),
            node,
        }),
        0..6,
    )
    .prop_map(|addresses| ExplicitEndpoints { addresses })
}

/// `--port` as a user types it.
fn port_spec(p: &ServicePort) -> String {
    let name = p.name.as_ref().map(|n| format!("{n}=")).unwrap_or_default();
    format!("{name}{}:{}/{}", p.port, p.target_port, p.protocol)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn services_round_trip(s in arb_service()) {
        prop_assert_eq!(Service::parse(&s.to_bytes()), Ok(s));
    }

    #[test]
    fn endpoints_round_trip(e in arb_endpoints()) {
        let bytes = serde_json::to_vec(&e).expect("encodes");
        prop_assert_eq!(ExplicitEndpoints::parse(&bytes), Ok(e));
    }

    #[test]
    fn arbitrary_bytes_and_json_never_panic(b in arb_bytes(), v in arb_json_object(KEYS), w in arb_json(ENDPOINT_KEYS)) {
        let _ = Service::parse(&b);
        let _ = ExplicitEndpoints::parse(&b);
        if let Ok(s) = Service::parse(v.to_string().as_bytes()) {
            prop_assert!(s.validate().is_ok());
        }
        let _ = ExplicitEndpoints::parse(w.to_string().as_bytes());
    }

    #[test]
    fn mutated_services_decode_or_name_a_field(s in arb_service(), m in arb_mutation(PATHS, KEYS)) {
        let doc: serde_json::Value = serde_json::from_slice(&s.to_bytes()).expect("own JSON");
        let mutated = apply(doc, &m);
        match Service::parse(mutated.to_string().as_bytes()) {
            Ok(back) => prop_assert!(back.validate().is_ok()),
            Err(e) => prop_assert!(names_a_field(&e.to_string(), KEYS), "{e} names no field ({mutated})"),
        }
    }

    #[test]
    fn mutated_endpoints_decode_or_name_a_field(
        e in arb_endpoints(),
        m in arb_mutation(ENDPOINT_PATHS, ENDPOINT_KEYS),
    ) {
        let doc = serde_json::to_value(&e).expect("encodes");
        let mutated = apply(doc, &m);
        if let Err(err) = ExplicitEndpoints::parse(mutated.to_string().as_bytes()) {
            prop_assert!(
                names_a_field(&err.to_string(), ENDPOINT_KEYS),
                "{err} names no field ({mutated})"
            );
        }
    }

    #[test]
    fn cli_ports_round_trip(p in arb_port()) {
        let p = ServicePort { node_port: None, ..p };
        let spec = port_spec(&p);
        prop_assert_eq!(spec.parse::<ServicePort>(), Ok(p), "{}", spec);
    }

    #[test]
    fn arbitrary_cli_ports_never_panic_and_what_parses_is_valid(
        s in prop_oneof![arb_text(), "[a-z0-9=:/-]{0,16}".prop_map(|s: String| s)],
    ) {
        match s.parse::<ServicePort>() {
            Ok(p) => {
                prop_assert!(p.port > 0 && p.target_port > 0 && p.node_port.is_none());
                prop_assert_eq!(port_spec(&p).parse::<ServicePort>(), Ok(p));
            }
            Err(e) => {
                let e = e.to_string();
                prop_assert!(!e.is_empty() && !e.contains('\n'), "{e:?}");
            }
        }
    }

    #[test]
    fn cli_selectors_round_trip(
        sel in prop::collection::btree_map(
            "([a-z]([a-z0-9-]{0,6}[a-z0-9])?\\.)?[a-z]{1,4}/?[a-z0-9]([a-z0-9._-]{0,8}[a-z0-9])?",
            "([A-Za-z0-9]([A-Za-z0-9._-]{0,10}[A-Za-z0-9])?)?",
            1..5,
        ),
    ) {
        let text = sel
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        prop_assert_eq!(super::parse_selector(&text), Ok(sel), "{}", text);
    }

    #[test]
    fn arbitrary_cli_selectors_never_panic_and_what_parses_is_label_syntax(
        s in prop_oneof![arb_text(), "[a-zA-Z0-9=,./_ ;-]{0,24}".prop_map(|s: String| s)],
    ) {
        match super::parse_selector(&s) {
            Ok(sel) => {
                prop_assert!(!sel.is_empty());
                for (k, v) in &sel {
                    prop_assert!(super::check_label_key(k).is_ok() && super::check_label_value(v).is_ok());
                }
            }
            Err(e) => prop_assert!(!e.is_empty() && !e.contains('\n'), "{e:?}"),
        }
    }
}
