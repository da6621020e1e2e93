//! Ingress tests: `tartan-ingress` on a lab node, asked from outside (the underlay's infra
//! namespace) by curl, headless Chromium, wrk and a WebSocket client, with routes,
//! certificates and services in a real etcd and backends in pods on two nodes.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::*;
use tartan::lab::http_backend::{start_http_backend, websocket_echo};
use tartan::lab::ingress::LabIngress;
use tartan::lab::{INFRA_IP, Lab, block_on_in_netns, ns_command, wait_for};

const NET16: &[&str] = &["--network", "10.244.0.0/16"];

/// What curl got: body, status, HTTP version.
#[derive(Debug)]
struct Got {
    body: String,
    code: u16,
    version: String,
}

/// curl from the infra namespace (outside the cluster) with `args`; host names resolve to
/// the ingress node through `--resolve` entries.
fn curl(lab: &Lab, ing: &LabIngress, args: &[&str]) -> Result<Got> {
    let ip = ing.node_ip.to_string();
    let mut c = ns_command(&lab.infra, "curl");
    c.args([
        "-s",
        "-S",
        "--max-time",
        "10",
        "-o",
        "-",
        "-w",
        "\n%{http_code} %{http_version}",
    ]);
    for h in [
        "shop.test",
        "blog.apps.test",
        "shop.apps.test",
        "nosvc.apps.test",
        "a.b.apps.test",
        "unknown.test",
        "admin.test",
        "flood.test",
    ] {
        for port in ["80", "443"] {
            c.arg("--resolve").arg(format!("{h}:{port}:{ip}"));
        }
    }
    let out = c
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running curl (make deps installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let mut t = tail.split_whitespace();
    let code = t.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let version = t.next().unwrap_or("").to_string();
    ensure!(
        code != 0,
        "curl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        ing.log_tail(10)
    );
    Ok(Got {
        body: body.to_string(),
        code,
        version,
    })
}

/// The `key=value` / `header: value` lines of a backend's `/echo` answer.
fn field<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    body.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|r| r.strip_prefix('=').or_else(|| r.strip_prefix(": ")))
    })
}

/// A self-signed certificate and key for `host` in `dir`.
fn self_signed(dir: &std::path::Path, tag: &str, host: &str) -> Result<(String, String)> {
    let cert = dir.join(format!("{tag}.pem"));
    let key = dir.join(format!("{tag}-key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
        ])
        .arg("-subj")
        .arg(format!("/CN={host}"))
        .arg("-addext")
        .arg(format!("subjectAltName=DNS:{host}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .context("running openssl")?;
    ensure!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((
        cert.to_string_lossy().into_owned(),
        key.to_string_lossy().into_owned(),
    ))
}

/// A lab of two nodes, a service `shop` with a pod on node 1 and `blog` with one on node 2
/// (each pod runs the lab's HTTP backend on 8080), and the ingress on node 1.
fn setup() -> Result<Option<(Lab, LabIngress)>> {
    setup_with(&[])
}

/// `setup` with `extra` flags for the ingress.
fn setup_with(extra: &[&str]) -> Result<Option<(Lab, LabIngress)>> {
    let Some(mut lab) = lab(2, NET16)? else {
        return Ok(None);
    };
    for i in 0..2 {
        lab.start_daemon(i, &[])?;
    }
    for i in 0..2 {
        lab.wait_subnet(i)?;
    }
    for (i, name) in [(0, "shop"), (1, "blog")] {
        let pod = lab.add_cni_pod(i, &format!("{name}-1"), &[("app", name)])?;
        start_http_backend(&pod.ns, 8080, &format!("{name}-1"))?;
        create_service(
            &lab,
            &[
                name,
                "--port",
                "http=80:8080",
                "--selector",
                &format!("app={name}"),
            ],
        )?;
    }
    let mut args = vec![
        "--http-listen",
        "0.0.0.0:80",
        "--https-listen",
        "0.0.0.0:443",
        "--workers",
        "2",
    ];
    args.extend_from_slice(extra);
    let ing = lab.start_ingress(0, &args)?;
    Ok(Some((lab, ing)))
}

/// wrk with `args` from the infra namespace against the ingress's HTTP port, `Host: host`,
/// path `path`; its report on `wait_with_output`.
fn start_wrk(
    lab: &Lab,
    ing: &LabIngress,
    args: &[&str],
    host: &str,
    path: &str,
) -> Result<std::process::Child> {
    ns_command(&lab.infra, "wrk")
        .args(args)
        .args(["-H", &format!("Host: {host}")])
        .arg(format!("http://{}:80{path}", ing.node_ip))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running wrk (make deps installs it)")
}

/// `tartanctl ingress create NAME --host HOST --service SERVICE --port http`.
fn create_route(lab: &Lab, name: &str, host: &str, service: &str) -> Result<()> {
    lab.tartanctl(&[
        "ingress",
        "create",
        name,
        "--host",
        host,
        "--service",
        service,
        "--port",
        "http",
    ])
    .map(|_| ())
}

/// Waits until `args` get a response for which `ok` holds.
fn wait_curl(lab: &Lab, ing: &LabIngress, args: &[&str], ok: impl Fn(&Got) -> bool) -> Result<Got> {
    let mut last = String::new();
    wait_for(&format!("curl {args:?}"), Duration::from_secs(20), || {
        match curl(lab, ing, args) {
            Ok(g) if ok(&g) => return Some(g),
            Ok(g) => last = format!("{g:?}"),
            Err(e) => last = format!("{e:#}"),
        }
        None
    })
    .with_context(|| format!("last: {last}\n{}", ing.log_tail(20)))
}

#[test]
fn routes_by_host_wildcard_and_path_from_curl_and_a_browser() -> Result<()> {
    let Some((lab, ing)) = setup()? else {
        return Ok(());
    };
    create_route(&lab, "shop", "shop.test", "shop")?;
    lab.tartanctl(&[
        "ingress",
        "create",
        "shop-api",
        "--host",
        "shop.test",
        "--path",
        "/echo/blog",
        "--service",
        "blog",
        "--port",
        "80",
    ])?;
    lab.tartanctl(&[
        "ingress",
        "create",
        "apps",
        "--host",
        "*.apps.test",
        "--port",
        "http",
    ])?;

    // Exact host: the pod on node 1, with the client's address in X-Forwarded-For (a
    // forged one from an untrusted client replaced), Host kept, proto set.
    let g = wait_curl(
        &lab,
        &ing,
        &[
            "-H",
            "X-Forwarded-For: 6.6.6.6",
            "http://shop.test/echo?x=1",
        ],
        |g| g.code == 200,
    )?;
    ensure!(field(&g.body, "name") == Some("shop-1"), "{}", g.body);
    ensure!(field(&g.body, "path") == Some("/echo?x=1"), "{}", g.body);
    ensure!(field(&g.body, "host") == Some("shop.test"), "{}", g.body);
    ensure!(
        field(&g.body, "x-forwarded-for") == Some(&INFRA_IP.to_string()),
        "{}",
        g.body
    );
    ensure!(
        field(&g.body, "x-forwarded-proto") == Some("http"),
        "{}",
        g.body
    );
    ensure!(
        field(&g.body, "x-forwarded-host") == Some("shop.test"),
        "{}",
        g.body
    );
    ensure!(
        g.body
            .contains(&format!("forwarded: for={INFRA_IP};proto=http")),
        "{}",
        g.body
    );
    // A path within the host: another service, on node 2, path untouched.
    let g = curl(&lab, &ing, &["http://shop.test/echo/blog/x"])?;
    ensure!(
        g.code == 200 && field(&g.body, "name") == Some("blog-1"),
        "{g:?}"
    );
    ensure!(field(&g.body, "path") == Some("/echo/blog/x"), "{}", g.body);
    // tartanctl says why: the host chosen, each candidate, the backend and its endpoints.
    let explain = lab.tartanctl(&["ingress", "explain", "shop.test/echo/blog/x"])?;
    for want in [
        "shop-api",
        "chosen",
        "default/blog:80",
        "Target port: 8080",
        ":8080",
    ] {
        ensure!(explain.contains(want), "explain lacks {want:?}:\n{explain}");
    }
    // A request the ingress would not forward fails the command (exit 1), the explanation
    // printed all the same.
    let (ok, explain, err) = lab.tartanctl_status(&["ingress", "explain", "nosvc.apps.test/"])?;
    ensure!(
        !ok && explain.contains("does not exist") && err.contains("would be answered 503"),
        "{explain}{err}"
    );
    let (ok, _, err) = lab.tartanctl_status(&["ingress", "explain", "unknown.test/"])?;
    ensure!(!ok && err.contains("would be answered 404"), "{err}");
    // ... on segment boundaries only.
    let g = curl(&lab, &ing, &["http://shop.test/echo/blogger"])?;
    ensure!(
        g.code == 200 && field(&g.body, "name") == Some("shop-1"),
        "{g:?}"
    );
    // Wildcard subdomain: the service named by the first label.
    let g = curl(&lab, &ing, &["http://blog.apps.test/echo"])?;
    ensure!(
        g.code == 200 && field(&g.body, "name") == Some("blog-1"),
        "{g:?}"
    );
    // HTTP/2 in cleartext (prior knowledge).
    let g = curl(
        &lab,
        &ing,
        &["--http2-prior-knowledge", "http://shop.apps.test/echo"],
    )?;
    ensure!(
        g.code == 200 && g.version == "2" && field(&g.body, "name") == Some("shop-1"),
        "{g:?}"
    );
    // Nothing is forwarded for hosts no route names, nor as a forward proxy; a route to a
    // service that does not exist is 503.
    for (args, want) in [
        (vec!["http://unknown.test/"], 404),
        (vec!["http://a.b.apps.test/"], 404),
        (
            vec![
                "-x",
                &format!("http://{}:80", ing.node_ip),
                "http://example.com/",
            ],
            404,
        ),
        (vec!["http://nosvc.apps.test/"], 503),
    ] {
        let g = curl(&lab, &ing, &args)?;
        ensure!(g.code == want, "{args:?}: {g:?}");
    }
    // Explicit endpoints written straight to etcd (tartanctl refuses them) at the ingress
    // node's loopback, where its admin server listens, and at the node's own address are
    // never sent to: the route answers 503, never the admin's metrics.
    create_service(&lab, &["admin", "--port", "http=80:9403"])?;
    let endpoints = tartan::store::keys::endpoints_key(
        &tartan::store::etcd::EtcdArgs::for_endpoints(&["http://127.0.0.1:2379"]),
        "default",
        "admin",
    );
    lab.etcdctl(&[
        "put",
        &endpoints,
        &format!(
            r#"{{"addresses":[{{"ip":"127.0.0.1"}},{{"ip":"{}"}}]}}"#,
            ing.node_ip
        ),
    ])?;
    lab.tartanctl(&[
        "ingress",
        "create",
        "admin",
        "--host",
        "admin.test",
        "--service",
        "admin",
        "--port",
        "http",
    ])?;
    wait_for(
        "the ingress to skip both endpoints",
        Duration::from_secs(20),
        || {
            ing.log_tail(200)
                .contains(&format!(
                    "explicit endpoint {} is a node's own address",
                    ing.node_ip
                ))
                .then_some(())
        },
    )
    .with_context(|| ing.log_tail(30))?;
    let g = curl(&lab, &ing, &["http://admin.test/metrics"])?;
    ensure!(
        g.code == 503 && !g.body.contains("tartan_ingress"),
        "a refused endpoint was sent to: {g:?}"
    );
    ensure!(
        ing.log_tail(200).contains("endpoint 127.0.0.1 is"),
        "{}",
        ing.log_tail(30)
    );
    // explain leaves them out the same way.
    let (ok, explain, err) = lab.tartanctl_status(&["ingress", "explain", "admin.test/metrics"])?;
    ensure!(
        !ok && explain.contains("no ready endpoints → 503") && !explain.contains("127.0.0.1"),
        "{explain}{err}"
    );
    // The page of the case path routing breaks: its relative m.js loads through the
    // subdomain, with curl and in a real browser.
    let g = curl(&lab, &ing, &["http://shop.apps.test/"])?;
    ensure!(g.code == 200 && g.body.contains("src=\"m.js\""), "{g:?}");
    let g = curl(&lab, &ing, &["http://shop.apps.test/m.js"])?;
    ensure!(g.code == 200 && g.body.contains("loaded"), "{g:?}");
    let profile = lab.dir.join("chromium");
    let out = ns_command(&lab.infra, "chromium")
        .env("HOME", &lab.dir)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!(
            "--host-resolver-rules=MAP *.apps.test {}",
            ing.node_ip
        ))
        .args([
            "--virtual-time-budget=5000",
            "--dump-dom",
            "http://shop.apps.test/",
        ])
        .stdin(Stdio::null())
        .output()
        .context("running chromium (make deps installs it)")?;
    let dom = String::from_utf8_lossy(&out.stdout);
    ensure!(
        dom.contains("<p id=\"loaded\">loaded shop-1</p>"),
        "the browser's DOM lacks what m.js adds:\n{dom}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The access log and the metrics saw it.
    let (code, metrics) = ing.admin_get("/metrics")?;
    ensure!(
        code == 200
            && metrics.contains(
                "tartan_ingress_requests_total{host=\"shop.test\",route=\"shop\",code=\"200\"}"
            ),
        "{metrics}"
    );
    ensure!(
        ing.log_tail(50).contains("status=404"),
        "{}",
        ing.log_tail(20)
    );
    Ok(())
}

#[test]
fn tls_by_sni_websockets_and_changes_under_load() -> Result<()> {
    let Some((mut lab, ing)) = setup()? else {
        return Ok(());
    };
    create_route(&lab, "shop", "shop.test", "shop")?;
    lab.tartanctl(&[
        "ingress",
        "create",
        "apps",
        "--host",
        "*.apps.test",
        "--port",
        "http",
    ])?;
    // Two certificates, put while the ingress runs: each SNI name gets its own.
    let (shop_cert, shop_key) = self_signed(&lab.dir, "shop", "shop.test")?;
    let (apps_cert, apps_key) = self_signed(&lab.dir, "apps", "*.apps.test")?;
    lab.tartanctl(&[
        "ingress",
        "cert",
        "put",
        "shop",
        "--host",
        "shop.test",
        "--cert",
        &shop_cert,
        "--key",
        &shop_key,
    ])?;
    lab.tartanctl(&[
        "ingress",
        "cert",
        "put",
        "apps",
        "--host",
        "*.apps.test",
        "--cert",
        &apps_cert,
        "--key",
        &apps_key,
    ])?;
    let g = wait_curl(
        &lab,
        &ing,
        &["--cacert", &shop_cert, "https://shop.test/echo"],
        |g| g.code == 200,
    )?;
    ensure!(
        field(&g.body, "name") == Some("shop-1") && g.version == "2",
        "{g:?}"
    );
    ensure!(
        field(&g.body, "x-forwarded-proto") == Some("https"),
        "{}",
        g.body
    );
    let g = wait_curl(
        &lab,
        &ing,
        &["--cacert", &apps_cert, "https://blog.apps.test/echo"],
        |g| g.code == 200,
    )?;
    ensure!(field(&g.body, "name") == Some("blog-1"), "{g:?}");
    ensure!(
        curl(&lab, &ing, &["--cacert", &apps_cert, "https://shop.test/"]).is_err(),
        "shop.test was served the *.apps.test certificate"
    );
    // TLS 1.1 is refused.
    ensure!(
        curl(
            &lab,
            &ing,
            &["-k", "--tls-max", "1.1", "https://shop.test/"]
        )
        .is_err()
    );

    // WebSocket through the ingress, to a pod on node 2.
    let addr = SocketAddr::from((ing.node_ip, 80));
    let back = websocket_echo(
        &lab.infra,
        addr,
        "blog.apps.test",
        "/ws",
        "hello through tartan",
        Duration::from_secs(10),
    )?;
    ensure!(back == "hello through tartan", "{back:?}");

    // Under load: a second shop pod joins (endpoint change), then the shop route moves to
    // the blog service (route change); no request fails meanwhile.
    let pod = lab.add_cni_pod(1, "shop-2", &[("app", "shop")])?;
    let wrk = start_wrk(&lab, &ing, &["-t1", "-c8", "-d8s"], "shop.test", "/echo")?;
    let t0 = Instant::now();
    start_http_backend(&pod.ns, 8080, "shop-2")?;
    wait_curl(&lab, &ing, &["http://shop.test/echo"], |g| {
        field(&g.body, "name") == Some("shop-2")
    })?;
    let moved = IngressRouteJson::moved("shop", "shop.test", "blog");
    let key = "/tartan/ingress/routes/shop";
    lab.etcdctl(&["put", key, &moved])?;
    let t_put = Instant::now();
    let g = wait_curl(&lab, &ing, &["http://shop.test/echo"], |g| {
        field(&g.body, "name") == Some("blog-1")
    })?;
    let took = t_put.elapsed();
    ensure!(g.code == 200);
    ensure!(
        t0.elapsed() < Duration::from_secs(8),
        "the changes took longer than the load"
    );
    let out = wrk.wait_with_output()?;
    let report = String::from_utf8_lossy(&out.stdout);
    ensure!(
        report.contains("requests in"),
        "wrk: {report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        !report.contains("Non-2xx") && !report.contains("Socket errors"),
        "requests failed during the changes:\n{report}"
    );
    eprintln!("route change answered after {took:?} (seen by a polling curl)\n{report}");
    // A malformed route written behind tartanctl's back is skipped, the others stay.
    lab.etcdctl(&["put", "/tartan/ingress/routes/bad", "{not json"])?;
    let g = curl(&lab, &ing, &["http://shop.test/echo"])?;
    ensure!(g.code == 200, "{g:?}");
    // Oversized headers are refused, the ingress stays up.
    let big = format!("X-Big: {}", "a".repeat(64 * 1024));
    let g = curl(&lab, &ing, &["-H", &big, "http://shop.test/echo"])?;
    ensure!(g.code == 431 || g.code == 400, "{g:?}");
    let g = curl(&lab, &ing, &["http://shop.test/echo"])?;
    ensure!(g.code == 200, "{g:?}");
    Ok(())
}

/// Route JSON written straight to etcd (an update in place, as an operator's tool would).
struct IngressRouteJson;

impl IngressRouteJson {
    fn moved(name: &str, host: &str, service: &str) -> String {
        serde_json::json!({
            "name": name,
            "host": host,
            "path": "/",
            "namespace": "default",
            "service": service,
            "port": "http",
        })
        .to_string()
    }
}

#[test]
fn a_flood_of_one_host_leaves_the_others_served() -> Result<()> {
    // At most 16 requests of one route in flight; 128 connections flood `flood.test` with
    // requests that stay 200 ms at the pod.
    let Some((lab, ing)) = setup_with(&["--max-inflight-per-route", "16"])? else {
        return Ok(());
    };
    for (name, host, service) in [
        ("flood", "flood.test", "blog"),
        ("shop", "shop.test", "shop"),
    ] {
        create_route(&lab, name, host, service)?;
    }
    wait_curl(&lab, &ing, &["http://flood.test/slow/1"], |g| g.code == 200)?;
    wait_curl(&lab, &ing, &["http://shop.test/echo"], |g| g.code == 200)?;
    let wrk = start_wrk(
        &lab,
        &ing,
        &["-t2", "-c128", "-d8s"],
        "flood.test",
        "/slow/200",
    )?;
    // Once the flood is over its limit (503s counted), the other host is still answered by
    // its own pod, every time.
    let refused = "tartan_ingress_requests_total{host=\"flood.test\",route=\"flood\",code=\"503\"}";
    wait_for(
        "the flood to be refused beyond its limit",
        Duration::from_secs(20),
        || {
            let (_, m) = ing.admin_get("/metrics").ok()?;
            m.contains(refused).then_some(())
        },
    )?;
    let mut answered = 0;
    while answered < 10 {
        let g = curl(&lab, &ing, &["http://shop.test/echo"])?;
        ensure!(
            g.code == 200 && field(&g.body, "name") == Some("shop-1"),
            "during the flood of another host: {g:?}"
        );
        answered += 1;
    }
    let out = wrk.wait_with_output()?;
    let report = String::from_utf8_lossy(&out.stdout);
    ensure!(report.contains("requests in"), "wrk: {report}");
    // The flood itself got both: answers within its limit and 503 beyond it.
    let (_, m) = ing.admin_get("/metrics")?;
    let served = "tartan_ingress_requests_total{host=\"flood.test\",route=\"flood\",code=\"200\"}";
    ensure!(m.contains(served) && m.contains(refused), "{m}");
    ensure!(
        report.contains("Non-2xx"),
        "no request of the flood was refused:\n{report}"
    );
    eprintln!("flood:\n{report}");
    Ok(())
}

/// A gRPC server (Debian's python3-grpcio, no generated code: raw bytes in and out) with a
/// unary method that answers `NAME:request` with a trailer naming the server, a
/// bidirectional stream that sends each message back reversed, and a method that fails with
/// NOT_FOUND.
const GRPC_SERVER: &str = r#"
import sys
from concurrent import futures
import grpc

port, name = sys.argv[1], sys.argv[2]

def unary(req, ctx):
    ctx.set_trailing_metadata((("x-served-by", name),))
    return name.encode() + b":" + req

def stream(reqs, ctx):
    for r in reqs:
        yield r[::-1]

def fail(req, ctx):
    ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + req.decode())

h = grpc.method_handlers_generic_handler("tartan.Echo", {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "Stream": grpc.stream_stream_rpc_method_handler(stream),
    "Fail": grpc.unary_unary_rpc_method_handler(fail),
})
s = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
s.add_generic_rpc_handlers((h,))
s.add_insecure_port("0.0.0.0:" + port)
s.start()
print("ready", flush=True)
s.wait_for_termination()
"#;

/// The client: over cleartext HTTP/2 to the ingress, with `grpc.test` as the authority;
/// prints what each call got.
const GRPC_CLIENT: &str = r#"
import sys
import grpc

target = sys.argv[1]
ch = grpc.insecure_channel(target, options=[("grpc.default_authority", "grpc.test")])
resp, call = ch.unary_unary("/tartan.Echo/Unary").with_call(b"hello", timeout=10)
print("unary", resp.decode(), dict(call.trailing_metadata()).get("x-served-by"))
out = ch.stream_stream("/tartan.Echo/Stream")(iter([b"abc", b"def", b"ghi"]), timeout=10)
print("stream", ",".join(m.decode() for m in out))
try:
    ch.unary_unary("/tartan.Echo/Fail")(b"x", timeout=10)
    print("fail answered")
except grpc.RpcError as e:
    print("fail", e.code().name, e.details())
"#;

/// Kills the process when dropped (also when the test fails).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An HTTP/2 connection without a request in flight is closed after `--idle-timeout-secs`
/// (GOAWAY, then the close), while a request that takes longer than that on the same
/// connection is answered in full.
#[test]
fn an_idle_http2_connection_is_closed_but_not_during_a_long_request() -> Result<()> {
    let Some((lab, ing)) = setup_with(&["--idle-timeout-secs", "2"])? else {
        return Ok(());
    };
    create_route(&lab, "shop", "shop.test", "shop")?;
    wait_curl(&lab, &ing, &["http://shop.test/echo"], |g| g.code == 200)?;
    let addr = SocketAddr::from((ing.node_ip, 80));
    let (code, lasted, closed_after) = block_on_in_netns(&lab.infra, move || async move {
        use http_body_util::BodyExt as _;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .context("connecting")?;
        let (mut tx, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .context("HTTP/2 handshake (h2c)")?;
        let conn = tokio::spawn(conn);
        let t = Instant::now();
        let req = hyper::Request::get("http://shop.test/slow/3500")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .context("request")?;
        let resp = tx.send_request(req).await.context("the long request")?;
        let code = resp.status().as_u16();
        resp.into_body()
            .collect()
            .await
            .context("the long request's body")?;
        let lasted = t.elapsed();
        let t = Instant::now();
        tokio::time::timeout(Duration::from_secs(30), conn)
            .await
            .context("the idle connection was still open after 30 s")?
            .context("the connection task")?
            .context("the connection ended with an error")?;
        anyhow::Ok((code, lasted, t.elapsed()))
    })??;
    ensure!(
        code == 200 && lasted >= Duration::from_millis(3500),
        "the 3.5 s request on the connection: {code} after {lasted:?}\n{}",
        ing.log_tail(20)
    );
    ensure!(
        closed_after >= Duration::from_millis(1500),
        "closed {closed_after:?} after its last request ended, before the 2 s idle timeout"
    );
    Ok(())
}

#[test]
fn grpc_unary_streams_trailers_and_status_pass_through() -> Result<()> {
    let Some((mut lab, ing)) = setup()? else {
        return Ok(());
    };
    let server = lab.dir.join("grpc_server.py");
    let client = lab.dir.join("grpc_client.py");
    std::fs::write(&server, GRPC_SERVER)?;
    std::fs::write(&client, GRPC_CLIENT)?;
    let pod = lab.add_cni_pod(1, "grpc-1", &[("app", "grpc")])?;
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(&server)
        .args(["9090", "grpc-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = KillOnDrop(
        tartan::lab::spawn_in_netns(&pod.ns, cmd)
            .context("starting the gRPC server (make deps installs python3-grpcio)")?,
    );
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.0.stdout.take().context("server stdout")?),
        &mut ready,
    )?;
    ensure!(ready.trim() == "ready", "gRPC server: {ready:?}");
    create_service(
        &lab,
        &["grpc", "--port", "grpc=80:9090", "--selector", "app=grpc"],
    )?;
    lab.tartanctl(&[
        "ingress",
        "create",
        "grpc",
        "--host",
        "grpc.test",
        "--service",
        "grpc",
        "--port",
        "grpc",
    ])?;
    let target = format!("{}:80", ing.node_ip);
    let mut last = String::new();
    let out = wait_for(
        "gRPC calls through the ingress",
        Duration::from_secs(30),
        || {
            let o = ns_command(&lab.infra, "/usr/bin/python3")
                .arg(&client)
                .arg(&target)
                .stdin(Stdio::null())
                .output()
                .ok()?;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            if o.status.success() && text.contains("unary ") {
                return Some(text);
            }
            last = text;
            None
        },
    )
    .with_context(|| format!("last:\n{last}\n{}", ing.log_tail(20)))?;
    eprintln!("{out}");
    ensure!(
        out.contains("unary grpc-1:hello grpc-1"),
        "unary call or its trailer:\n{out}"
    );
    ensure!(
        out.contains("stream cba,fed,ihg"),
        "bidirectional stream:\n{out}"
    );
    ensure!(
        out.contains("fail NOT_FOUND no such thing: x"),
        "the status in the trailers:\n{out}"
    );
    Ok(())
}

/// The ingress answers on the node's IPv6 address beside its IPv4 one (two listeners on one
/// port, each family its own), with the IPv6 client in `X-Forwarded-For` and `Forwarded`.
#[test]
fn the_ingress_serves_ipv6_clients_beside_ipv4_ones() -> Result<()> {
    let Some((mut lab, ing)) = setup_with(&["--http-listen", "[::]:80"])? else {
        return Ok(());
    };
    lab.add_ipv6_underlay()?;
    create_route(&lab, "shop", "shop.test", "shop")?;
    let node6 = lab.nodes[0].ip6.context("node 0 has IPv6")?;
    let [a, b] = tartan::lab::UNDERLAY6;
    let client6 = std::net::Ipv6Addr::new(a, b, 0, 0, 0, 0, 0, 1);
    let curl6 = || -> Result<(String, String)> {
        let out = ns_command(&lab.infra, "curl")
            .args(["-s", "-S", "--max-time", "10", "-w", "\n%{http_code}"])
            .arg("--resolve")
            .arg(format!("shop.test:80:[{node6}]"))
            .arg("http://shop.test/echo")
            .stdin(Stdio::null())
            .output()
            .context("running curl")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        Ok((body.to_string(), code.to_string()))
    };
    let mut last = String::new();
    let body = wait_for("an answer over IPv6", Duration::from_secs(20), || {
        match curl6() {
            Ok((body, code)) if code == "200" => return Some(body),
            Ok((body, code)) => last = format!("{code} {body}"),
            Err(e) => last = format!("{e:#}"),
        }
        None
    })
    .with_context(|| format!("last: {last}\n{}", ing.log_tail(20)))?;
    ensure!(field(&body, "name") == Some("shop-1"), "{body}");
    ensure!(
        field(&body, "x-forwarded-for") == Some(&client6.to_string()),
        "{body}"
    );
    ensure!(
        field(&body, "forwarded").is_some_and(|f| f.contains(&format!("for=\"[{client6}]\""))),
        "{body}"
    );
    // IPv4 on the same port still answers.
    let g = curl(&lab, &ing, &["http://shop.test/echo"])?;
    ensure!(
        g.code == 200 && field(&g.body, "name") == Some("shop-1"),
        "{}",
        g.body
    );
    Ok(())
}
