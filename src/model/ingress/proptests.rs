//! Property tests of the ingress route and certificate decoders, host patterns and request
//! host normalization; see `util::proptest_support`.

use proptest::prelude::*;

use super::{
    HostPattern, IngressCert, IngressRoute, MAX_HOST_LEN, PortRef, normalize_path,
    normalize_request_host,
};
use crate::util::proptest_support::{
    apply, arb_bytes, arb_json_object, arb_mutation, arb_text, config, names_a_field,
};

const KEYS: &[&str] = &["name", "host", "path", "namespace", "service", "port"];
const PATHS: &[&[&str]] = &[
    &["name"],
    &["host"],
    &["path"],
    &["namespace"],
    &["service"],
    &["port"],
];
const CERT_KEYS: &[&str] = &["name", "hosts", "certPem", "keyPem"];
const CERT_PATHS: &[&[&str]] = &[
    &["name"],
    &["hosts"],
    &["hosts", "0"],
    &["certPem"],
    &["keyPem"],
];

const LABEL: &str = "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?";

/// Valid host patterns: exact names of 1-4 labels, wildcards over 2-3 labels, `*`; in
/// mixed case, sometimes with a trailing dot.
fn arb_host_text() -> impl Strategy<Value = String> {
    let name =
        |n: std::ops::Range<usize>| prop::collection::vec(LABEL, n).prop_map(|l| l.join("."));
    (
        prop_oneof![
            3 => name(1..5),
            2 => name(2..4).prop_map(|n| format!("*.{n}")),
            1 => Just("*".to_string()),
        ],
        any::<bool>(),
        any::<bool>(),
    )
        .prop_filter("IP literals are no hosts", |(h, _, _)| {
            h.parse::<std::net::IpAddr>().is_err()
        })
        .prop_map(|(h, upper, dot)| {
            let h = if upper { h.to_ascii_uppercase() } else { h };
            if dot { format!("{h}.") } else { h }
        })
}

fn arb_port() -> impl Strategy<Value = PortRef> {
    prop_oneof![
        (1u16..=65535).prop_map(PortRef::Number),
        "[a-z]([a-z0-9]{0,6})".prop_map(PortRef::Name),
    ]
}

fn arb_route() -> impl Strategy<Value = IngressRoute> {
    (
        LABEL,
        arb_host_text(),
        prop::collection::vec("[a-zA-Z0-9_%~-]{1,6}", 0..4),
        LABEL,
        proptest::option::of(LABEL),
        arb_port(),
    )
        .prop_map(|(name, host, segs, namespace, service, port)| {
            let host = HostPattern::parse(&host).expect("valid host");
            let service = match service {
                None if !host.is_wildcard() => Some("svc".to_string()),
                s => s,
            };
            IngressRoute {
                name,
                host,
                path: format!("/{}", segs.join("/")),
                namespace,
                service,
                port,
            }
        })
}

fn arb_cert() -> impl Strategy<Value = IngressCert> {
    (
        LABEL,
        prop::collection::btree_set(
            arb_host_text().prop_filter("not *", |h| h != "*" && h != "*."),
            1..4,
        ),
    )
        .prop_map(|(name, hosts)| {
            let mut hosts: Vec<HostPattern> = hosts
                .iter()
                .map(|h| HostPattern::parse(h).expect("valid host"))
                .collect();
            hosts.sort();
            hosts.dedup();
            IngressCert {
                name,
                hosts,
                cert_pem: "-----BEGIN CERTIFICATE-----\nAA\n-----END CERTIFICATE-----\n".into(),
                key_pem: "-----BEGIN PRIVATE KEY-----\nAA\n-----END PRIVATE KEY-----\n".into(),
            }
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn routes_round_trip(r in arb_route()) {
        prop_assert_eq!(IngressRoute::parse(&r.to_bytes()), Ok(r));
    }

    #[test]
    fn certs_round_trip(c in arb_cert()) {
        prop_assert_eq!(IngressCert::parse(&c.to_bytes()), Ok(c));
    }

    #[test]
    fn arbitrary_bytes_and_json_never_panic(
        b in arb_bytes(),
        v in arb_json_object(KEYS),
        w in arb_json_object(CERT_KEYS),
    ) {
        let _ = IngressRoute::parse(&b);
        let _ = IngressCert::parse(&b);
        if let Ok(r) = IngressRoute::parse(v.to_string().as_bytes()) {
            prop_assert!(r.validate().is_ok());
        }
        if let Ok(c) = IngressCert::parse(w.to_string().as_bytes()) {
            prop_assert!(c.validate().is_ok());
        }
    }

    #[test]
    fn mutated_routes_decode_or_name_a_field(r in arb_route(), m in arb_mutation(PATHS, KEYS)) {
        let doc: serde_json::Value = serde_json::from_slice(&r.to_bytes()).expect("own JSON");
        let mutated = apply(doc, &m);
        match IngressRoute::parse(mutated.to_string().as_bytes()) {
            Ok(back) => prop_assert!(back.validate().is_ok()),
            Err(e) => prop_assert!(names_a_field(&e.to_string(), KEYS), "{e} names no field ({mutated})"),
        }
    }

    #[test]
    fn mutated_certs_decode_or_name_a_field(c in arb_cert(), m in arb_mutation(CERT_PATHS, CERT_KEYS)) {
        let doc: serde_json::Value = serde_json::from_slice(&c.to_bytes()).expect("own JSON");
        let mutated = apply(doc, &m);
        match IngressCert::parse(mutated.to_string().as_bytes()) {
            Ok(back) => prop_assert!(back.validate().is_ok()),
            Err(e) => prop_assert!(names_a_field(&e.to_string(), CERT_KEYS), "{e} names no field ({mutated})"),
        }
    }

    #[test]
    fn host_patterns_parse_to_a_fixed_point(s in prop_oneof![arb_host_text(), arb_text(), "[a-zA-Z0-9.*:_-]{0,20}".prop_map(|s: String| s)]) {
        match HostPattern::parse(&s) {
            Ok(h) => {
                prop_assert_eq!(HostPattern::parse(h.as_str()), Ok(h.clone()));
                prop_assert!(h.as_str().len() <= MAX_HOST_LEN);
                prop_assert!(!h.as_str().ends_with('.'));
                prop_assert_eq!(h.as_str().to_ascii_lowercase(), h.as_str());
            }
            Err(e) => prop_assert!(!e.is_empty() && !e.contains('\n'), "{e:?}"),
        }
    }

    #[test]
    fn exact_patterns_and_request_hosts_agree(s in prop_oneof![arb_host_text(), arb_text()]) {
        // A request for the name an exact pattern holds matches it; what a request host
        // normalizes to is itself a valid exact pattern.
        let mut buf = [0u8; MAX_HOST_LEN];
        if let Some(n) = normalize_request_host(&s, &mut buf) {
            let p = HostPattern::parse(n).expect("a normalized request host is a valid pattern");
            prop_assert!(p.matches(Some(n)));
        }
        if let Ok(p) = HostPattern::parse(&s)
            && let super::HostKind::Exact(name) = p.kind()
        {
            let mut buf = [0u8; MAX_HOST_LEN];
            prop_assert_eq!(normalize_request_host(&s, &mut buf), Some(name));
        }
    }

    #[test]
    fn route_paths_normalize_to_a_fixed_point(s in prop_oneof![arb_text(), "/[a-z./?#% -]{0,12}".prop_map(|s: String| s)]) {
        if let Ok(p) = normalize_path(&s) {
            prop_assert_eq!(normalize_path(&p), Ok(p.clone()));
            prop_assert!(p == "/" || !p.ends_with('/'));
        }
    }
}
