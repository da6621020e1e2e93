//! Unit tests of `ingress::routes`: every precedence rule, incremental upserts and removes,
//! explanations.

use super::*;

fn route(name: &str, host: &str, path: &str, service: Option<&str>) -> IngressRoute {
    IngressRoute {
        name: name.into(),
        host: HostPattern::parse(host).expect(host),
        path: path.into(),
        namespace: "default".into(),
        service: service.map(str::to_string),
        port: PortRef::Name("http".into()),
    }
}

fn table(routes: &[(&str, &str, &str, Option<&str>)]) -> RouteTable {
    let mut t = RouteTable::new();
    for (n, h, p, s) in routes {
        t.upsert(route(n, h, p, *s)).expect("valid route");
    }
    t
}

/// The winning route's name and backend text, or `-`.
fn at(t: &RouteTable, host: &str, path: &str) -> String {
    match t.lookup(host, path) {
        Some(m) => format!("{} {}", m.route().name, m.backend()),
        None => "-".into(),
    }
}

fn winner(t: &RouteTable, host: &str, path: &str) -> String {
    t.lookup(host, path)
        .map_or_else(|| "-".into(), |m| m.route().name.clone())
}

#[test]
fn exact_host_beats_wildcard_beats_default() {
    let t = table(&[
        ("exact", "shop.example.com", "/", Some("shop")),
        ("wild", "*.example.com", "/", None),
        ("default", "*", "/", Some("fallback")),
    ]);
    assert_eq!(at(&t, "shop.example.com", "/"), "exact default/shop:http");
    assert_eq!(at(&t, "blog.example.com", "/x"), "wild default/blog:http");
    assert_eq!(at(&t, "example.org", "/"), "default default/fallback:http");
}

#[test]
fn a_wildcard_matches_exactly_one_label() {
    let t = table(&[("wild", "*.apps.example.com", "/", None)]);
    assert_eq!(at(&t, "x.apps.example.com", "/"), "wild default/x:http");
    assert_eq!(winner(&t, "a.b.apps.example.com", "/"), "-");
    assert_eq!(winner(&t, "apps.example.com", "/"), "-");
}

#[test]
fn a_longer_wildcard_suffix_beats_a_shorter_one() {
    let t = table(&[
        ("short", "*.example.com", "/", Some("short")),
        ("long", "*.apps.example.com", "/", Some("long")),
    ]);
    assert_eq!(winner(&t, "x.apps.example.com", "/"), "long");
    assert_eq!(winner(&t, "apps.example.com", "/"), "short");
}

#[test]
fn the_default_backend_is_last_and_catches_what_is_not_a_name() {
    let t = table(&[
        ("exact", "shop.example.com", "/", Some("shop")),
        ("default", "*", "/", Some("fallback")),
    ]);
    for h in ["1.2.3.4", "[::1]:8080", "bad_host", "", "a..b"] {
        assert_eq!(winner(&t, h, "/"), "default", "{h:?}");
    }
    let t = table(&[("exact", "shop.example.com", "/", Some("shop"))]);
    assert_eq!(winner(&t, "1.2.3.4", "/"), "-");
}

#[test]
fn request_hosts_are_normalized() {
    let t = table(&[
        ("exact", "shop.example.com", "/", Some("shop")),
        ("wild", "*.example.com", "/", None),
    ]);
    assert_eq!(winner(&t, "SHOP.Example.Com", "/"), "exact");
    assert_eq!(winner(&t, "shop.example.com:8443", "/"), "exact");
    assert_eq!(winner(&t, "shop.example.com.", "/"), "exact");
    // The service taken from the first label is lowercase too.
    assert_eq!(at(&t, "Blog.EXAMPLE.com:80", "/"), "wild default/blog:http");
}

#[test]
fn paths_match_on_segment_boundaries_and_the_longest_wins() {
    let t = table(&[
        ("root", "a.example.com", "/", Some("root")),
        ("api", "a.example.com", "/api", Some("api")),
        ("v1", "a.example.com", "/api/v1", Some("v1")),
    ]);
    assert_eq!(winner(&t, "a.example.com", "/api"), "api");
    assert_eq!(winner(&t, "a.example.com", "/api/"), "api");
    assert_eq!(winner(&t, "a.example.com", "/api/x"), "api");
    assert_eq!(winner(&t, "a.example.com", "/apix"), "root");
    assert_eq!(winner(&t, "a.example.com", "/api/v1/users"), "v1");
    assert_eq!(winner(&t, "a.example.com", "/api/v10"), "api");
    assert_eq!(winner(&t, "a.example.com", "/"), "root");
    assert_eq!(winner(&t, "a.example.com", ""), "root");
}

#[test]
fn the_query_string_is_ignored() {
    let t = table(&[
        ("root", "a.example.com", "/", Some("root")),
        ("api", "a.example.com", "/api", Some("api")),
    ]);
    assert_eq!(winner(&t, "a.example.com", "/api?x=/y"), "api");
    assert_eq!(winner(&t, "a.example.com", "/apix?/api"), "root");
    assert_eq!(winner(&t, "a.example.com", "/api#top"), "api");
}

#[test]
fn the_most_specific_host_with_routes_is_chosen_before_any_path() {
    let t = table(&[
        ("exact-api", "shop.example.com", "/api", Some("api")),
        ("wild", "*.example.com", "/static", Some("static")),
        ("wild-root", "*.example.com", "/", Some("wild-root")),
        ("default", "*", "/", Some("fallback")),
    ]);
    assert_eq!(winner(&t, "shop.example.com", "/api/x"), "exact-api");
    // The exact host has routes, so its wildcard is never looked at: no path of the exact
    // host matches, and the default backend takes the request.
    assert_eq!(winner(&t, "shop.example.com", "/static/a.css"), "default");
    assert_eq!(winner(&t, "shop.example.com", "/"), "default");
    // Another host under the wildcard: the wildcard is chosen.
    assert_eq!(winner(&t, "blog.example.com", "/static/a.css"), "wild");
    assert_eq!(winner(&t, "blog.example.com", "/api"), "wild-root");
}

#[test]
fn no_path_of_the_chosen_host_and_no_default_is_no_match() {
    let t = table(&[
        ("exact-api", "shop.example.com", "/api", Some("api")),
        ("wild", "*.example.com", "/", Some("wild")),
        ("default-img", "*", "/img", Some("img")),
    ]);
    assert_eq!(winner(&t, "shop.example.com", "/"), "-");
    // The default backend's routes are path-matched too.
    assert_eq!(winner(&t, "shop.example.com", "/img/a.png"), "default-img");
    let t = table(&[
        ("wild-api", "*.example.com", "/api", Some("api")),
        ("other", "shop.example.com", "/", Some("shop")),
    ]);
    assert_eq!(winner(&t, "blog.example.com", "/"), "-");
    assert_eq!(winner(&t, "blog.example.com", "/api/v1"), "wild-api");
}

#[test]
fn a_more_specific_host_beats_a_longer_path() {
    let t = table(&[
        ("exact", "shop.example.com", "/", Some("shop")),
        ("wild", "*.example.com", "/api/v1", Some("api")),
    ]);
    assert_eq!(winner(&t, "shop.example.com", "/api/v1"), "exact");
}

#[test]
fn equal_host_and_path_are_ordered_by_name() {
    let t = table(&[
        ("b", "a.example.com", "/x", Some("b")),
        ("a", "a.example.com", "/x", Some("a")),
    ]);
    assert_eq!(winner(&t, "a.example.com", "/x"), "a");
}

#[test]
fn wildcard_routes_with_a_service_use_it() {
    let t = table(&[("wild", "*.example.com", "/", Some("gateway"))]);
    assert_eq!(at(&t, "x.example.com", "/"), "wild default/gateway:http");
}

#[test]
fn an_upsert_that_changes_the_host_moves_the_route() {
    let mut t = table(&[("r", "a.example.com", "/", Some("s"))]);
    assert_eq!(winner(&t, "a.example.com", "/"), "r");
    let old = t
        .upsert(route("r", "b.example.com", "/", Some("s")))
        .unwrap();
    assert_eq!(
        old.map(|o| o.host.to_string()).as_deref(),
        Some("a.example.com")
    );
    assert_eq!(winner(&t, "a.example.com", "/"), "-");
    assert_eq!(winner(&t, "b.example.com", "/"), "r");
    assert_eq!(t.len(), 1);
    // The emptied bucket is gone.
    assert!(!t.exact.contains_key("a.example.com"));
    t.upsert(route("r", "*.example.com", "/", None)).unwrap();
    assert_eq!(winner(&t, "b.example.com", "/"), "r");
    assert!(t.exact.is_empty());
    t.upsert(route("r", "*", "/", Some("s"))).unwrap();
    assert!(t.wildcard.is_empty());
    assert_eq!(winner(&t, "1.2.3.4", "/"), "r");
}

#[test]
fn an_upsert_that_changes_the_path_reorders_the_bucket() {
    let mut t = table(&[
        ("long", "a.example.com", "/api/v1", Some("long")),
        ("short", "a.example.com", "/api", Some("short")),
    ]);
    assert_eq!(winner(&t, "a.example.com", "/api/v1"), "long");
    t.upsert(route("short", "a.example.com", "/api/v1/x", Some("short")))
        .unwrap();
    assert_eq!(winner(&t, "a.example.com", "/api/v1/x"), "short");
    assert_eq!(winner(&t, "a.example.com", "/api/v1"), "long");
    assert_eq!(winner(&t, "a.example.com", "/api"), "-");
}

#[test]
fn remove_takes_the_route_out() {
    let mut t = table(&[
        ("a", "a.example.com", "/", Some("a")),
        ("d", "*", "/", Some("d")),
    ]);
    assert_eq!(t.remove("a").map(|r| r.name), Some("a".into()));
    assert_eq!(winner(&t, "a.example.com", "/"), "d");
    assert!(t.remove("a").is_none());
    assert!(t.get("a").is_none());
    assert_eq!(t.get("d").map(|r| r.name.as_str()), Some("d"));
    t.remove("d");
    assert!(t.is_empty());
    assert_eq!(winner(&t, "a.example.com", "/"), "-");
}

#[test]
fn an_invalid_upsert_leaves_the_table_as_it_was() {
    let mut t = table(&[("r", "a.example.com", "/", Some("s"))]);
    assert!(t.upsert(route("r", "b.example.com", "/", None)).is_err());
    assert!(
        t.upsert(route("r", "b.example.com", "/x/", Some("s")))
            .is_err()
    );
    assert_eq!(winner(&t, "a.example.com", "/"), "r");
    assert_eq!(t.len(), 1);
}

/// The candidates of an explanation as (route, verdict).
fn verdicts(e: &Explanation) -> Vec<(&str, Verdict)> {
    e.candidates
        .iter()
        .map(|c| (c.route.as_str(), c.verdict))
        .collect()
}

#[test]
fn explain_says_who_won_and_why_the_others_lost() {
    let t = table(&[
        ("exact", "shop.example.com", "/api", Some("shop")),
        ("exact-v2", "shop.example.com", "/api/v2", Some("shop-v2")),
        ("wild", "*.example.com", "/", None),
        ("wild2", "*.example.com", "/", None),
        ("wild-long", "*.example.com", "/api/v1", None),
        ("default", "*", "/", Some("fallback")),
        ("deep", "*.x.shop.example.com", "/", None),
        ("other", "other.example.com", "/", Some("other")),
    ]);
    // The exact host has routes: the wildcards are not looked at, and since no path of the
    // exact host matches `/`, the default backend takes the request.
    let e = t.explain("Shop.Example.com:443", "/?q=1");
    assert_eq!(e.host.as_deref(), Some("shop.example.com"));
    assert_eq!(e.chosen_host.as_deref(), Some("shop.example.com"));
    assert_eq!(e.path, "/");
    assert_eq!(
        verdicts(&e),
        [
            ("exact-v2", Verdict::PathDoesNotMatch),
            ("exact", Verdict::PathDoesNotMatch),
            ("wild-long", Verdict::HostNotChosen),
            ("wild", Verdict::HostNotChosen),
            ("wild2", Verdict::HostNotChosen),
            ("default", Verdict::Chosen),
        ]
    );
    assert_eq!(
        e.outcome,
        Outcome::Matched {
            route: "default".into(),
            rank: HostRank::Default,
            backend: BackendRef {
                namespace: "default".into(),
                service: "fallback".into(),
                port: PortRef::Name("http".into()),
            },
        }
    );
    let e = t.explain("shop.example.com", "/api/x");
    assert_eq!(
        verdicts(&e),
        [
            ("exact-v2", Verdict::PathDoesNotMatch),
            ("exact", Verdict::Chosen),
            ("wild-long", Verdict::HostNotChosen),
            ("wild", Verdict::HostNotChosen),
            ("wild2", Verdict::HostNotChosen),
            ("default", Verdict::DefaultNotNeeded),
        ]
    );
    let e = t.explain("shop.example.com", "/api/v2/x");
    assert_eq!(
        verdicts(&e)[..2],
        [
            ("exact-v2", Verdict::Chosen),
            ("exact", Verdict::ShorterPath)
        ]
    );
    // A host only the wildcard matches: its routes compete by path.
    let e = t.explain("blog.example.com", "/api/v1/x");
    assert_eq!(e.chosen_host.as_deref(), Some("*.example.com"));
    assert_eq!(
        verdicts(&e),
        [
            ("wild-long", Verdict::Chosen),
            ("wild", Verdict::ShorterPath),
            ("wild2", Verdict::ShorterPath),
            ("default", Verdict::DefaultNotNeeded),
        ]
    );
    let e = t.explain("blog.example.com", "/");
    assert_eq!(
        verdicts(&e),
        [
            ("wild-long", Verdict::PathDoesNotMatch),
            ("wild", Verdict::Chosen),
            ("wild2", Verdict::SameHostAndPath),
            ("default", Verdict::DefaultNotNeeded),
        ]
    );
    assert!(matches!(
        &e.outcome,
        Outcome::Matched { backend, rank: HostRank::Wildcard, .. } if backend.service == "blog"
    ));
    let e = t.explain("a.b.example.com", "/");
    assert_eq!(e.chosen_host, None);
    assert_eq!(
        e.near_misses,
        [
            NearMiss {
                route: "wild".into(),
                host: "*.example.com".into(),
                why: NearMissReason::MoreThanOneLabel,
            },
            NearMiss {
                route: "wild-long".into(),
                host: "*.example.com".into(),
                why: NearMissReason::MoreThanOneLabel,
            },
            NearMiss {
                route: "wild2".into(),
                host: "*.example.com".into(),
                why: NearMissReason::MoreThanOneLabel,
            }
        ]
    );
    let e = t.explain("x.shop.example.com", "/");
    assert_eq!(e.near_misses[0].why, NearMissReason::NoLabelInFront);
}

#[test]
fn explain_says_why_nothing_matched() {
    let reason = |t: &RouteTable, h: &str, p: &str| match t.explain(h, p).outcome {
        Outcome::NoMatch(r) => Some(r),
        Outcome::Matched { .. } => None,
    };
    let t = RouteTable::new();
    assert_eq!(reason(&t, "a.b", "/"), Some(NoMatchReason::NoRoutes));
    let t = table(&[("a", "a.example.com", "/api", Some("a"))]);
    assert_eq!(
        reason(&t, "1.2.3.4", "/"),
        Some(NoMatchReason::HostNotAName)
    );
    assert_eq!(
        reason(&t, "b.example.com", "/"),
        Some(NoMatchReason::NoHostMatches)
    );
    assert_eq!(
        reason(&t, "a.example.com", "/apix"),
        Some(NoMatchReason::NoPathMatches {
            host: "a.example.com".into()
        })
    );
    assert_eq!(reason(&t, "a.example.com", "/api"), None);
    let json = serde_json::to_string(&t.explain("a.example.com", "/x")).unwrap();
    assert!(
        json.contains("\"noMatch\":{\"noPathMatches\":{\"host\":\"a.example.com\"}}"),
        "{json}"
    );
    // Only default-backend routes match the host, and none of their paths.
    let t = table(&[
        ("a", "a.example.com", "/", Some("a")),
        ("d", "*", "/img", Some("d")),
    ]);
    assert_eq!(
        reason(&t, "b.example.com", "/"),
        Some(NoMatchReason::NoPathMatches { host: "*".into() })
    );
}
