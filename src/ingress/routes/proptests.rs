//! Property test of the route table: after any sequence of upserts and removes, `lookup`
//! (and `explain`'s outcome and chosen host) equal a brute-force linear matcher over the
//! routes that are left.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::sample::select;

use super::{Outcome, RouteTable, Verdict};
use crate::model::ingress::{
    HostKind, HostPattern, IngressRoute, MAX_HOST_LEN, PortRef, normalize_request_host,
    path_matches, request_path,
};
use crate::util::proptest_support::config;

const NAMES: &[&str] = &["a", "b", "c", "d", "e", "f"];
const HOSTS: &[&str] = &[
    "a.example.com",
    "b.example.com",
    "x.a.example.com",
    "*.example.com",
    "*.a.example.com",
    "*.x.a.example.com",
    "*",
];
const PATHS: &[&str] = &["/", "/api", "/api/v1", "/apix", "/b", "/b/c"];
const REQUEST_HOSTS: &[&str] = &[
    "a.example.com",
    "A.Example.COM:8080",
    "a.example.com.",
    "b.example.com",
    "q.example.com",
    "x.a.example.com",
    "y.x.a.example.com",
    "z.y.x.a.example.com",
    "example.com",
    "1.2.3.4",
    "[::1]:80",
    "bad_host",
    "",
];
const REQUEST_PATHS: &[&str] = &[
    "/",
    "",
    "/api",
    "/api/",
    "/api/v1/x",
    "/apix",
    "/api?x=1",
    "/b/c/d",
    "/bc",
    "/z",
];

#[derive(Debug, Clone)]
enum Op {
    Upsert(IngressRoute),
    Remove(&'static str),
}

fn arb_route() -> impl Strategy<Value = IngressRoute> {
    (
        select(NAMES),
        select(HOSTS),
        select(PATHS),
        proptest::option::of(select(&["s1", "s2"][..])),
        prop_oneof![
            Just(PortRef::Number(80)),
            Just(PortRef::Name("http".into()))
        ],
    )
        .prop_map(|(name, host, path, service, port)| {
            let host = HostPattern::parse(host).expect("valid host");
            let service = match service {
                None if !host.is_wildcard() => Some("svc"),
                s => s,
            };
            IngressRoute {
                name: name.into(),
                host,
                path: path.into(),
                namespace: "default".into(),
                service: service.map(str::to_string),
                port,
            }
        })
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => arb_route().prop_map(Op::Upsert),
        1 => select(NAMES).prop_map(Op::Remove),
    ]
}

/// How specific a route's host is: exact 0, wildcard 1, `*` 2.
fn rank(r: &IngressRoute) -> u8 {
    match r.host.kind() {
        HostKind::Exact(_) => 0,
        HostKind::Wildcard(_) => 1,
        HostKind::Any => 2,
    }
}

/// The winner by the rules read literally: the most specific host pattern other than `*`
/// among the routes whose host matches is chosen; the route of that pattern with the longest
/// matching path (then the smaller name) wins; failing that, the `*` route so chosen; the
/// backend as `ns/service:port`.
fn brute_force(
    routes: &BTreeMap<String, IngressRoute>,
    host: &str,
    path: &str,
) -> Option<(String, String)> {
    let mut buf = [0u8; MAX_HOST_LEN];
    let host = normalize_request_host(host, &mut buf);
    let path = request_path(path);
    let matching = || routes.values().filter(|r| r.host.matches(host));
    let chosen = matching()
        .filter(|r| !r.host.is_any())
        .min_by_key(|r| rank(r))
        .map(|r| r.host.clone());
    let best_of = |pattern: &HostPattern| {
        matching()
            .filter(|r| &r.host == pattern && path_matches(&r.path, path))
            .min_by_key(|r| (Reverse(r.path.len()), r.name.clone()))
    };
    let best = chosen
        .and_then(|h| best_of(&h))
        .or_else(|| best_of(&HostPattern::any()))?;
    let service = match &best.service {
        Some(s) => s.clone(),
        None => host?.split('.').next()?.to_string(),
    };
    Some((
        best.name.clone(),
        format!("{}/{service}:{}", best.namespace, best.port),
    ))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn lookup_equals_a_linear_matcher(ops in prop::collection::vec(arb_op(), 1..24)) {
        let mut table = RouteTable::new();
        let mut model: BTreeMap<String, IngressRoute> = BTreeMap::new();
        for op in &ops {
            match op {
                Op::Upsert(r) => {
                    let old = table.upsert(r.clone()).expect("valid route");
                    prop_assert_eq!(old, model.insert(r.name.clone(), r.clone()));
                }
                Op::Remove(n) => prop_assert_eq!(table.remove(n), model.remove(*n)),
            }
        }
        prop_assert_eq!(table.len(), model.len());
        for (n, r) in &model {
            prop_assert_eq!(table.get(n), Some(r));
        }
        for h in REQUEST_HOSTS {
            for p in REQUEST_PATHS {
                let want = brute_force(&model, h, p);
                let got = table
                    .lookup(h, p)
                    .map(|m| (m.route().name.clone(), m.backend().to_string()));
                prop_assert_eq!(&got, &want, "{} {}", h, p);
                let e = table.explain(h, p);
                let explained = match &e.outcome {
                    Outcome::Matched { route, .. } => Some(route.clone()),
                    Outcome::NoMatch(_) => None,
                };
                prop_assert_eq!(explained, want.map(|(n, _)| n));
                let chosen = e.candidates.iter().find(|c| c.host != "*").map(|c| c.host.clone());
                prop_assert_eq!(e.chosen_host, chosen);
                prop_assert_eq!(
                    e.candidates.iter().filter(|c| c.verdict == Verdict::Chosen).count(),
                    usize::from(matches!(e.outcome, Outcome::Matched { .. }))
                );
            }
        }
    }
}
