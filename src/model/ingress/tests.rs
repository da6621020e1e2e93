//! Unit tests of `model::ingress`.

use super::*;

fn host(s: &str) -> HostPattern {
    HostPattern::parse(s).expect(s)
}

fn host_err(s: &str) -> String {
    HostPattern::parse(s).unwrap_err()
}

fn route(host_text: &str, path: &str, service: Option<&str>) -> IngressRoute {
    IngressRoute {
        name: "r".into(),
        host: host(host_text),
        path: path.into(),
        namespace: "default".into(),
        service: service.map(str::to_string),
        port: PortRef::Name("http".into()),
    }
}

#[test]
fn host_patterns_are_normalized() {
    assert_eq!(host("Shop.Example.COM").as_str(), "shop.example.com");
    assert_eq!(host("shop.example.com.").as_str(), "shop.example.com");
    assert_eq!(host("*.Apps.Example.com").as_str(), "*.apps.example.com");
    assert_eq!(host("*").kind(), HostKind::Any);
    assert_eq!(host("*.a.b").kind(), HostKind::Wildcard("a.b"));
    assert_eq!(host("a.b").kind(), HostKind::Exact("a.b"));
    assert_eq!(host("localhost").kind(), HostKind::Exact("localhost"));
}

#[test]
fn bad_host_patterns_say_why() {
    assert_eq!(host_err("*.a..b"), "\"*.a..b\": empty label");
    assert_eq!(
        "*.a..b".parse::<HostPattern>().unwrap_err().to_string(),
        "host: \"*.a..b\": empty label"
    );
    assert!(host_err("1.2.3.4").contains("is an IP address"));
    assert!(host_err("[::1]").contains("is an IP address"));
    assert!(host_err("::1").contains("is an IP address"));
    assert!(host_err("shop.example.com:80").contains("no port"));
    assert!(host_err("*.com").contains("at least two labels"));
    assert!(host_err("a.*.com").contains("whole first label"));
    assert!(host_err("*foo.example.com").contains("whole first label"));
    assert!(host_err("**").contains("whole first label"));
    assert!(host_err("-a.example.com").contains("begin or end with '-'"));
    assert!(host_err("a_b.example.com").contains("letters, digits and '-'"));
    assert!(host_err(&format!("{}.com", "a".repeat(64))).contains("longer than 63"));
    let long = vec!["a".repeat(63); 4].join(".");
    assert!(
        host_err(&long).contains("longer than 253"),
        "{}",
        long.len()
    );
    assert!(host_err("").contains("is empty"));
    assert!(host_err(".").contains("is empty"));
    assert!(host_err("a..").contains("empty label"));
}

#[test]
fn hosts_match_as_kubernetes_does() {
    let w = host("*.apps.example.com");
    assert!(w.matches(Some("x.apps.example.com")));
    assert!(!w.matches(Some("a.b.apps.example.com")));
    assert!(!w.matches(Some("apps.example.com")));
    assert!(!w.matches(None));
    assert!(host("a.b").matches(Some("a.b")));
    assert!(!host("a.b").matches(Some("x.a.b")));
    assert!(host("*").matches(None));
    assert!(host("*").matches(Some("anything.at.all")));
}

#[test]
fn request_hosts_are_normalized_or_refused() {
    let mut buf = [0u8; MAX_HOST_LEN];
    let mut n = |h: &str| normalize_request_host(h, &mut buf).map(str::to_string);
    assert_eq!(
        n("Shop.Example.com:8443").as_deref(),
        Some("shop.example.com")
    );
    assert_eq!(n("shop.example.com.").as_deref(), Some("shop.example.com"));
    assert_eq!(
        n("shop.example.com.:80").as_deref(),
        Some("shop.example.com")
    );
    assert_eq!(n("localhost").as_deref(), Some("localhost"));
    for bad in [
        "",
        ":80",
        "1.2.3.4",
        "1.2.3.4:80",
        "[::1]:80",
        "::1",
        "a..b",
        "a_b.c",
        "*.a.b",
        "host:port",
        "héllo.com",
        "a.b..",
    ] {
        assert_eq!(n(bad), None, "{bad:?}");
    }
    let long = vec!["a".repeat(63); 4].join(".");
    assert_eq!(n(&long), None);
}

#[test]
fn paths_match_on_segment_boundaries() {
    assert!(path_matches("/api", "/api"));
    assert!(path_matches("/api", "/api/"));
    assert!(path_matches("/api", "/api/x"));
    assert!(!path_matches("/api", "/apix"));
    assert!(!path_matches("/api", "/"));
    assert!(path_matches("/", "/anything"));
    assert!(path_matches("/", ""));
    assert_eq!(request_path("/api?x=/y"), "/api");
    assert_eq!(request_path("/api#frag"), "/api");
    assert_eq!(request_path("?q"), "");
}

#[test]
fn route_paths_are_normalized_or_refused() {
    let ok = |p: &str| normalize_path(p).unwrap();
    assert_eq!(ok("/"), "/");
    assert_eq!(ok("/api/"), "/api");
    assert_eq!(ok("/api/v1"), "/api/v1");
    assert_eq!(ok("/a%20b"), "/a%20b");
    let err = |p: &str| normalize_path(p).unwrap_err().to_string();
    assert!(err("api").contains("must start with '/'"));
    assert!(err("").contains("must start with '/'"));
    assert!(err("//").contains("\"//\""));
    assert!(err("/a//b").contains("\"//\""));
    assert!(err("/a/../b").contains("\"..\""));
    assert!(err("/a/.").contains("\".\""));
    assert!(err("/a?b").contains("'?'"));
    assert!(err("/a#b").contains("'?' or '#'"));
    assert!(err("/a b").contains("printable ASCII"));
    assert!(err("/a\tb").contains("printable ASCII"));
    assert!(err("/é").contains("printable ASCII"));
    assert!(err(&format!("/{}", "a".repeat(1024))).contains("longer than 1024"));
    assert!(err("/a?b").starts_with("path: "));
}

#[test]
fn port_refs() {
    assert_eq!("80".parse::<PortRef>().unwrap(), PortRef::Number(80));
    assert_eq!(
        "http".parse::<PortRef>().unwrap(),
        PortRef::Name("http".into())
    );
    assert_eq!(
        "h2c-web".parse::<PortRef>().unwrap(),
        PortRef::Name("h2c-web".into())
    );
    for bad in [
        "0",
        "65536",
        "",
        "HTTP",
        "-http",
        "http-",
        "a--b",
        "123-456",
        "sixteen-chars-xx",
    ] {
        assert!(bad.parse::<PortRef>().is_err(), "{bad:?}");
    }
    assert_eq!(
        serde_json::to_string(&PortRef::Number(8080)).unwrap(),
        "8080"
    );
    assert_eq!(
        serde_json::from_str::<PortRef>("\"http\"").unwrap(),
        PortRef::Name("http".into())
    );
    assert!(serde_json::from_str::<PortRef>("0").is_err());
    assert!(serde_json::from_str::<PortRef>("-1").is_err());
    assert!(serde_json::from_str::<PortRef>("70000").is_err());
    assert!(serde_json::from_str::<PortRef>("\"80\"").is_err());
    assert!(serde_json::from_str::<PortRef>("true").is_err());
}

#[test]
fn routes_decode_with_defaults_and_normalize() {
    let r = IngressRoute::parse(br#"{"name":"shop","host":"Shop.Example.com","service":"shop","port":"http","path":"/api/"}"#)
        .unwrap();
    assert_eq!(r.host.as_str(), "shop.example.com");
    assert_eq!(r.path, "/api");
    assert_eq!(r.namespace, "default");
    assert_eq!(r.backend_text(), "default/shop:http");
    let r =
        IngressRoute::parse(br#"{"name":"apps","host":"*.apps.example.com","port":80}"#).unwrap();
    assert_eq!(r.path, "/");
    assert_eq!(r.service, None);
    assert_eq!(r.backend_text(), "default/<first label>:80");
    assert_eq!(IngressRoute::parse(&r.to_bytes()), Ok(r));
}

#[test]
fn route_errors_name_the_field() {
    let e = |j: &str| IngressRoute::parse(j.as_bytes()).unwrap_err().to_string();
    // serde_json adds where in the text it stopped.
    assert!(
        e(r#"{"name":"a","host":"*.a..b","port":80}"#)
            .starts_with("ingress route does not decode: host: \"*.a..b\": empty label")
    );
    assert!(e(r#"{"name":"a","host":"a.b","port":80}"#).starts_with("service: is required"));
    assert!(e(r#"{"name":"a","host":"*","port":80}"#).starts_with("service: is required"));
    assert!(
        e(r#"{"name":"a","host":"a.b","service":"s","port":0}"#).contains("port: 0 is outside")
    );
    assert!(e(r#"{"name":"A","host":"a.b","service":"s","port":1}"#).starts_with("name \"A\""));
    assert!(e(r#"{"name":"a","host":"a.b","service":"S","port":1}"#).starts_with("service \"S\""));
    assert!(
        e(r#"{"name":"a","host":"a.b","service":"s","namespace":"","port":1}"#)
            .starts_with("namespace")
    );
    assert!(
        e(r#"{"name":"a","host":"a.b","service":"s","port":1,"path":"x"}"#).starts_with("path: ")
    );
    assert!(e(r#"{"name":"a","host":"a.b","service":"s"}"#).contains("port"));
    let huge = format!(
        r#"{{"name":"a","host":"a.b","service":"s","port":1,"x":"{}"}}"#,
        "x".repeat(MAX_ROUTE_BYTES)
    );
    assert!(e(&huge).contains("larger than"));
}

#[test]
fn validate_refuses_an_unnormalized_path() {
    let mut r = route("a.b", "/api", Some("s"));
    assert!(r.validate().is_ok());
    r.path = "/api/".into();
    assert!(
        r.validate()
            .unwrap_err()
            .to_string()
            .contains("ends in '/'")
    );
    r.path = "/a//b".into();
    assert!(r.validate().is_err());
    let mut r = route("*.a.b", "/", None);
    assert!(r.validate().is_ok());
    r.port = PortRef::Number(0);
    assert!(r.validate().is_err());
}

const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
const KEY: &str = "-----BEGIN EC PRIVATE KEY-----\nMHc\n-----END EC PRIVATE KEY-----\n";

fn cert() -> IngressCert {
    IngressCert {
        name: "shop".into(),
        hosts: vec![host("shop.example.com"), host("*.apps.example.com")],
        cert_pem: CERT.into(),
        key_pem: KEY.into(),
    }
}

#[test]
fn certs_round_trip_and_hide_their_key() {
    let c = cert();
    assert_eq!(IngressCert::parse(&c.to_bytes()), Ok(c.clone()));
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("MHc") && dbg.contains("redacted"), "{dbg}");
    assert!(
        String::from_utf8(c.to_bytes())
            .unwrap()
            .contains("\"keyPem\"")
    );
}

#[test]
fn bad_certs_name_the_field() {
    let e = |c: IngressCert| c.validate().unwrap_err().to_string();
    assert!(
        e(IngressCert {
            hosts: vec![],
            ..cert()
        })
        .starts_with("hosts: ")
    );
    assert!(
        e(IngressCert {
            hosts: vec![host("*")],
            ..cert()
        })
        .starts_with("hosts[0]: ")
    );
    assert!(
        e(IngressCert {
            hosts: vec![host("a.b"), host("A.B")],
            ..cert()
        })
        .contains("listed twice")
    );
    assert!(
        e(IngressCert {
            cert_pem: KEY.into(),
            ..cert()
        })
        .starts_with("certPem: holds no PEM")
    );
    assert!(
        e(IngressCert {
            key_pem: CERT.into(),
            ..cert()
        })
        .starts_with("keyPem: holds no PEM")
    );
    let big = format!("{CERT}{}", "A".repeat(MAX_PEM_BYTES));
    assert!(
        e(IngressCert {
            cert_pem: big,
            ..cert()
        })
        .contains("more than the")
    );
    assert!(
        e(IngressCert {
            name: "Shop".into(),
            ..cert()
        })
        .starts_with("name ")
    );
    let err = IngressCert::parse(br#"{"name":"a","hosts":["a..b"],"certPem":"","keyPem":""}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("hosts[0]: \"a..b\": empty label"), "{err}");
}
