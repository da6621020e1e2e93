//! Unit tests of `cli::ingress`: flag parsing and the errors that name the flag.

use clap::Parser;

use super::*;
use crate::util::test_tmp::TmpDir;

#[derive(clap::Parser, Debug)]
struct T {
    #[command(subcommand)]
    cmd: IngressCmd,
}

/// Parses a command line of `ingress`, split at spaces.
fn parse(line: &str) -> Result<IngressCmd, clap::Error> {
    T::try_parse_from(std::iter::once("ingress").chain(line.split_whitespace())).map(|t| t.cmd)
}

fn create(line: &str) -> Result<IngressRoute> {
    match parse(line) {
        Ok(IngressCmd::Create(a)) => route_from_args(a),
        Ok(other) => panic!("not a create: {other:?}"),
        Err(e) => Err(anyhow!(crate::cli::clap_error_line(&e).unwrap_or_default())),
    }
}

#[test]
fn create_builds_the_route() {
    let r = create("create shop --host Shop.Example.com --service shop --port http --path /api/")
        .unwrap();
    assert_eq!(r.host.as_str(), "shop.example.com");
    assert_eq!(r.path, "/api");
    assert_eq!(r.backend_text(), "default/shop:http");
    let r = create("create apps --host *.apps.example.com --port 8080 -n prod").unwrap();
    assert_eq!(r.service, None);
    assert_eq!(r.backend_text(), "prod/<first label>:8080");
    let r = create("create fallback --host * --service web --port 80").unwrap();
    assert!(r.host.is_any());
}

#[test]
fn create_errors_name_the_flag() {
    let e = |line: &str| create(line).unwrap_err().to_string();
    let m = e("create shop --host shop.example.com --port 80");
    assert!(m.starts_with("--service is required"), "{m}");
    assert!(e("create d --host * --port 80").starts_with("--service is required"));
    let m = e("create shop --host *.a..b --service s --port 80");
    assert!(m.contains("--host") && m.contains("empty label"), "{m}");
    let m = e("create shop --host a.b --service s --port HTTP");
    assert!(m.contains("--port"), "{m}");
    let m = e("create shop --host a.b --service s --port 80 --path api");
    assert!(m.starts_with("--path: \"api\": must start with '/'"), "{m}");
    let m = e("create shop --host a.b --service S --port 80");
    assert!(m.starts_with("--service \"S\""), "{m}");
    let m = e("create shop --host a.b --service s --port 80 -n Prod");
    assert!(m.starts_with("--namespace \"Prod\""), "{m}");
    let m = e("create Shop --host a.b --service s --port 80");
    assert!(m.starts_with("ingress route name \"Shop\""), "{m}");
    assert!(!m.contains('\n'));
}

const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";

#[test]
fn cert_put_reads_and_checks_the_files() {
    let dir = TmpDir::new("ingress-cert");
    let write = |n: &str, text: &str| {
        let p = dir.0.join(n);
        std::fs::write(&p, text).unwrap();
        p
    };
    let (cert, key) = (write("c.pem", CERT), write("k.pem", KEY));
    let hosts = vec![HostPattern::parse("shop.example.com").unwrap()];
    let c = cert_from_args("shop".into(), hosts.clone(), &cert, &key).unwrap();
    assert_eq!((c.cert_pem.as_str(), c.key_pem.as_str()), (CERT, KEY));
    let e = cert_from_args("shop".into(), hosts.clone(), &key, &cert)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("--cert ") && e.contains("holds no PEM block of a certificate"),
        "{e}"
    );
    let e = cert_from_args("shop".into(), vec![HostPattern::any()], &cert, &key)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("--host: "), "{e}");
    let e = cert_from_args("shop".into(), hosts.clone(), &dir.0.join("missing"), &key)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("--cert ") && !e.contains('\n'), "{e}");
    let e = cert_from_args("shop".into(), hosts.clone(), &dir.0, &key)
        .unwrap_err()
        .to_string();
    assert!(e.contains("a directory"), "{e}");
    let big = write("big.pem", &format!("{CERT}{}", "A".repeat(MAX_PEM_BYTES)));
    let e = cert_from_args("shop".into(), hosts, &big, &key)
        .unwrap_err()
        .to_string();
    assert!(e.contains("larger than"), "{e}");
    assert!(
        parse("cert put x --cert c --key k").is_err(),
        "--host is required"
    );
}

#[test]
fn list_rows_show_the_backend() {
    let r = create("create apps --host *.apps.example.com --port http").unwrap();
    assert_eq!(
        route_rows(&[r]),
        [[
            "apps",
            "*.apps.example.com",
            "/",
            "default/<first label>:http"
        ]
        .map(String::from)
        .to_vec()]
    );
}

#[test]
fn explain_takes_one_request_and_an_output_format() {
    match parse("explain shop.example.com/api?x=1 -o json") {
        Ok(IngressCmd::Explain {
            request, output, ..
        }) => {
            assert_eq!(request, "shop.example.com/api?x=1");
            assert_eq!(output, OutputFormat::Json);
        }
        other => panic!("not an explain: {other:?}"),
    }
    assert!(parse("explain").is_err(), "the request is required");
}
