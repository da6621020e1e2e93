//! Unit tests of `tartanctl ingress explain`: request parsing, backend resolution, output.

use std::collections::BTreeMap;

use super::*;
use crate::model::ingress::{HostPattern, IngressRoute};
use crate::model::pod::PodRecord;
use crate::model::service::{DEFAULT_AFFINITY_TIMEOUT, Service, SessionAffinity, TrafficPolicy};
use crate::store::records::ModelChange;

#[test]
fn a_request_is_host_then_path() {
    let p = |s: &str| parse_request(s).expect(s);
    let pair = |h: &str, t: &str| (h.to_string(), t.to_string());
    assert_eq!(
        p("shop.example.com/api/x?y=1"),
        pair("shop.example.com", "/api/x?y=1")
    );
    assert_eq!(p("shop.example.com"), pair("shop.example.com", "/"));
    assert_eq!(p("shop.example.com?y=1"), pair("shop.example.com", "/?y=1"));
    assert_eq!(p("http://h:8080/p"), pair("h:8080", "/p"));
    assert_eq!(p("HTTPS://user@h/p#f"), pair("h", "/p#f"));
    assert_eq!(p("https://h"), pair("h", "/"));
    assert_eq!(p("[::1]:80/x"), pair("[::1]:80", "/x"));
    for bad in ["", "/api", "http:///x", "ftp://h/x", "a b/x"] {
        assert!(parse_request(bad).is_err(), "{bad:?}");
    }
}

fn route(name: &str, host: &str, path: &str, service: Option<&str>, port: PortRef) -> IngressRoute {
    IngressRoute {
        name: name.into(),
        host: HostPattern::parse(host).expect(host),
        path: path.into(),
        namespace: "default".into(),
        service: service.map(str::to_string),
        port,
    }
}

fn svc(name: &str, app: &str) -> Service {
    Service {
        namespace: "default".into(),
        name: name.into(),
        cluster_ip: "10.96.0.7".parse().expect("ip"),
        ports: vec!["web=80:8080/tcp".parse().expect("port")],
        selector: Some(BTreeMap::from([("app".to_string(), app.to_string())])),
        session_affinity: SessionAffinity::None,
        session_affinity_timeout: DEFAULT_AFFINITY_TIMEOUT,
        external_traffic_policy: TrafficPolicy::Cluster,
        cluster_ips: Vec::new(),
        ip_families: Vec::new(),
        ip_family_policy: Default::default(),
    }
}

fn pod(name: &str, ip: &str, app: &str) -> PodRecord {
    PodRecord {
        ip6: None,
        container_id: format!("c-{name}"),
        ifname: "eth0".into(),
        node: "n1".into(),
        ip: ip.parse().expect("ip"),
        namespace: "default".into(),
        name: name.into(),
        labels: BTreeMap::from([("app".to_string(), app.to_string())]),
    }
}

/// Routes for shop.example.com (`/api` by name, `/static` by an unknown name), a wildcard
/// without a service, a default backend; services shop (two pods) and empty (none).
fn fixture() -> (RouteTable, Backends) {
    let mut t = RouteTable::new();
    for r in [
        route(
            "shop-api",
            "shop.example.com",
            "/api",
            Some("shop"),
            PortRef::Name("web".into()),
        ),
        route(
            "shop-static",
            "shop.example.com",
            "/static",
            Some("shop"),
            PortRef::Name("http".into()),
        ),
        route("apps", "*.example.com", "/", None, PortRef::Number(80)),
        route("fallback", "*", "/", Some("empty"), PortRef::Number(80)),
    ] {
        t.upsert(r).expect("valid route");
    }
    let mut b = Backends::new();
    for s in [svc("shop", "shop"), svc("empty", "nothing")] {
        b.change(ModelChange::PutService(format!("/s/{}", s.name), s));
    }
    for p in [
        pod("a", "10.244.1.9", "shop"),
        pod("b", "10.244.1.5", "shop"),
    ] {
        b.change(ModelChange::PutPod(format!("/p/{}", p.name), p));
    }
    (t, b)
}

#[test]
fn a_matched_request_resolves_its_port_and_endpoints() {
    let (t, b) = fixture();
    let e = explain_request(&t, &b.targets(), "Shop.Example.com", "/api/x?y=1");
    let be = e.backend.as_ref().expect("matched");
    assert_eq!(be.target_port, Some(8080));
    assert_eq!(be.endpoints, ["10.244.1.5:8080", "10.244.1.9:8080"]);
    let text = render(&e);
    assert_eq!(
        text,
        "Host:    shop.example.com (from \"Shop.Example.com\")\n\
         Path:    /api/x\n\
         Chosen host: shop.example.com\n\
         Candidates:\n\
         \x20 ROUTE        HOST              PATH     VERDICT\n\
         \x20 shop-static  shop.example.com  /static  path does not match\n\
         \x20 shop-api     shop.example.com  /api     chosen\n\
         \x20 apps         *.example.com     /        host not chosen: shop.example.com has routes\n\
         \x20 fallback     *                 /        default backend not needed\n\
         Route:   shop-api\n\
         Backend: default/shop:web\n\
         Target port: 8080\n\
         Endpoints: 10.244.1.5:8080, 10.244.1.9:8080\n"
    );
    let json = serde_json::to_value(&e).expect("json");
    assert_eq!(json["chosenHost"], "shop.example.com");
    assert_eq!(json["outcome"]["matched"]["route"], "shop-api");
    assert_eq!(json["backend"]["targetPort"], 8080);
}

#[test]
fn an_unknown_port_name_is_a_503_with_the_reason() {
    let (t, b) = fixture();
    let e = explain_request(&t, &b.targets(), "shop.example.com", "/static/a.css");
    let text = render(&e);
    assert!(
        text.contains(
            "Target port: none: service default/shop has no port named \"http\" (ports: \
             80/tcp \"web\") → 503\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("Endpoints: 10.244.1.5, 10.244.1.9 (no port to send to)"),
        "{text}"
    );
}

#[test]
fn a_missing_service_and_an_empty_one_are_told_apart() {
    let (t, b) = fixture();
    // The wildcard names the service after the first label: there is no service blog.
    let e = explain_request(&t, &b.targets(), "blog.example.com", "/");
    let text = render(&e);
    assert!(text.contains("Backend: default/blog:80\n"), "{text}");
    assert!(
        text.contains("Target port: none: service default/blog does not exist → 503\n"),
        "{text}"
    );
    assert!(!text.contains("Endpoints:"), "{text}");
    // No path of the chosen host matches: the default backend, whose service has no pods.
    let e = explain_request(&t, &b.targets(), "shop.example.com", "/");
    let text = render(&e);
    assert!(
        text.contains("Route:   fallback (default backend: no path of shop.example.com matches)"),
        "{text}"
    );
    assert!(
        text.contains("Endpoints: no ready endpoints → 503\n"),
        "{text}"
    );
}

#[test]
fn no_match_says_why() {
    let (mut t, b) = fixture();
    t.remove("fallback");
    let e = explain_request(&t, &b.targets(), "shop.example.com", "/");
    assert_eq!(e.backend, None);
    let text = render(&e);
    assert!(
        text.ends_with(
            "No route: no path of shop.example.com matches /, nor of the default backend `*` \
             → 404\n"
        ),
        "{text}"
    );
    let e = explain_request(&t, &b.targets(), "10.0.0.1", "/");
    let text = render(&e);
    assert!(text.contains("not a DNS name"), "{text}");
    assert!(text.contains("Chosen host: none"), "{text}");
    let e = explain_request(&t, &b.targets(), "a.b.example.com", "/");
    let text = render(&e);
    assert!(
        text.contains("Near miss: apps (*.example.com): the host has more than one label"),
        "{text}"
    );
}

#[test]
fn refusal_gives_the_proxys_status_and_reason() {
    let (mut t, b) = fixture();
    let refusal = |t: &RouteTable, host: &str, path: &str| {
        explain_request(t, &b.targets(), host, path).refusal()
    };
    assert_eq!(refusal(&t, "shop.example.com", "/api/x"), None);
    let (code, why) = refusal(&t, "shop.example.com", "/static/a.css").expect("no such port");
    assert_eq!(code, 503);
    assert!(why.contains("no port named \"http\""), "{why}");
    assert_eq!(
        refusal(&t, "blog.example.com", "/"),
        Some((503, "service default/blog does not exist".into()))
    );
    assert_eq!(
        refusal(&t, "shop.example.com", "/"),
        Some((503, "service default/empty has no ready endpoints".into()))
    );
    t.remove("fallback");
    assert_eq!(
        refusal(&t, "shop.example.com", "/"),
        Some((404, "no route matches".into()))
    );
}
