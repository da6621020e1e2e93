//! The HTTP ingress beside nginx: the same 1,000 host routes (`s<i>.bench.test` → service
//! `s<i>` port `http`) in both, the same four backend pods (`lab::http_backend`, two per
//! node, every service selecting all four), `wrk` as the client, interleaved rounds in
//! rotating order, on the same machine and the same two cores.
//!
//! - tartan: `tartan-ingress --workers 2` in node 1's namespace (HTTP :80, HTTPS :443), routes
//!   and services read from etcd; its access log is sampled (50 lines/s, the default);
//! - nginx: `worker_processes 2` in the same namespace (HTTP :8081, HTTPS :8443), one
//!   `server` per route and one `upstream` per service (the four pods, `keepalive 16`),
//!   `access_log off`, `keepalive_requests` raised so neither server closes wrk's
//!   connections, `reuseport` on its listeners as tartan-ingress has (one socket per worker:
//!   without it the connections opened together at a run's start can all land on one worker);
//! - wrk (`-t2 -c64 --latency`, a Lua script rotating the Host header over the 1,000 hosts,
//!   path `/small`: the backend's 6-byte answer) in the lab's infra namespace, towards node 1's
//!   underlay address. For HTTPS wrk's SNI name is the URL's host, here node 1's address (wrk
//!   has no `--resolve`), so both servers present their default certificate (the same
//!   self-signed `*.bench.test`); routing still follows the Host header.
//!
//! Sections (name words on the command line select them):
//!
//! - `saturation-http`, `saturation-https`: requests/s at saturation, latency p50/p99 at
//!   saturation, non-2xx responses and socket errors (which must be 0 for tartan); then, in
//!   the same round, latency p50/p99 *at a fixed rate* (`TARTAN_INGRESS_BENCH_RATE` requests/s
//!   over 64 keep-alive connections, the same 1,000 hosts in turn; wrk has no fixed-rate mode,
//!   so the bench's own open-loop client `lab::fixed_rate` sends it, counting each request's
//!   latency from when it was due);
//! - `changes-wrk`, `changes-fixed-rate`: load for `TARTAN_INGRESS_BENCH_CHANGE_SECS` (wrk at
//!   saturation, or the fixed rate) while 100 changes are applied (one per `secs / 100`):
//!   route moves to another service alternating with one endpoint taken out of one service
//!   (an explicit endpoints record rewritten), then put back; failed requests and p99 against
//!   a steady run of the same length and load. nginx gets the same changes by a rewritten
//!   config and `nginx -s reload`; the etcd changes are made in both servers' runs, so
//!   tartand's work on them loads the machine alike;
//! - `changes-pods-fixed-rate`: the same at the fixed rate, but the endpoint changes are pod
//!   records deleted and put back: each pod leaves and rejoins all 1,000 services, and both
//!   nodes' tartand reprogram them all on the same two cores as the load;
//! - `memory`: tartan-ingress's VmRSS with 1,000 and with 10,000 routes, nginx's (master and
//!   workers, proportional set size) with 1,000 and 10,000 `server` blocks.
//!
//! Run: `cargo bench --bench ingress [-- SECTION...]`; environment:
//! `TARTAN_INGRESS_BENCH_ROUNDS` (3), `TARTAN_INGRESS_BENCH_SECS` (10),
//! `TARTAN_INGRESS_BENCH_CHANGE_SECS` (60), `TARTAN_INGRESS_BENCH_RATE` (5000: about a third
//! of what either server reaches at saturation on a 2-core machine, where the client, the
//! backends and the server share the cores; at 10,000 the machine is nearly saturated and
//! the tail is its queue).

mod common;

use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustls::pki_types::ServerName;
use tartan::lab::fixed_rate::{FixedRate, run as fixed_rate_run, tls_client_config};
use tartan::lab::http_backend::{start_http_backend, websocket_echo};
use tartan::lab::ingress::{LabIngress, admin_get};
use tartan::lab::{
    Lab, block_on_in_netns, in_netns, ns_command, require_root, run, spawn_in_netns, wait_for,
};
use tartan::model::ingress::{HostPattern, IngressRoute, PortRef};
use tartan::model::pod::PodRecord;
use tartan::model::service::{
    DEFAULT_AFFINITY_TIMEOUT, EndpointAddress, ExplicitEndpoints, Service, SessionAffinity,
    TrafficPolicy,
};
use tartan::netbench::service_bed::{txn_batches, vip};
use tartan::store::etcd::{EtcdArgs, Store};
use tartan::store::keys::{endpoints_key, ingress_route_key, pods_prefix, service_key};

/// Routes (and services) of the main figures.
const ROUTES: u32 = 1_000;
/// Routes of the `memory` section's second figure.
const MANY_ROUTES: u32 = 10_000;
/// Backend pods; pod `k` runs on node `k % 2`.
const PODS: usize = 4;
/// The last this many services have no selector but an explicit endpoints record listing
/// the same four pods (Kubernetes' Endpoints of a selector-less service): the `changes`
/// sections change one endpoint of one service through them.
const EXPLICIT: u32 = 10;
const BACKEND_PORT: u16 = 8080;
const NAMESPACE: &str = "default";
const DOMAIN: &str = "bench.test";
const WRK_ARGS: [&str; 2] = ["-t2", "-c64"];
/// Connections of the fixed-rate load (as many as wrk's).
const FIXED_CONNECTIONS: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Tartan,
    Nginx,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Tartan => "tartan",
            Kind::Nginx => "nginx",
        }
    }

    fn port(self, scheme: Scheme) -> u16 {
        match (self, scheme) {
            (Kind::Tartan, Scheme::Http) => 80,
            (Kind::Tartan, Scheme::Https) => 443,
            (Kind::Nginx, Scheme::Http) => 8081,
            (Kind::Nginx, Scheme::Https) => 8443,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn name(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

struct Config {
    rounds: usize,
    secs: u32,
    change_secs: u32,
    /// Requests/s of the fixed-rate runs.
    rate: u32,
}

impl Config {
    fn from_env() -> Config {
        let var = |k: &str, d: u32| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        Config {
            rounds: var("TARTAN_INGRESS_BENCH_ROUNDS", 3).max(1) as usize,
            secs: var("TARTAN_INGRESS_BENCH_SECS", 10).max(1),
            change_secs: var("TARTAN_INGRESS_BENCH_CHANGE_SECS", 60).max(10),
            rate: var("TARTAN_INGRESS_BENCH_RATE", 5_000).max(100),
        }
    }
}

fn host(name: &str) -> String {
    format!("{name}.{DOMAIN}")
}

/// The lab: two nodes with tartand, the backend pods, 1,000 services and routes in etcd.
struct Bed {
    lab: Lab,
    /// Pod names and addresses, in order.
    pods: Vec<(String, Ipv4Addr)>,
    cert: PathBuf,
    key: PathBuf,
    script: PathBuf,
}

impl Bed {
    fn node_ip(&self) -> Ipv4Addr {
        self.lab.nodes[0].ip
    }

    fn addr(&self, kind: Kind, scheme: Scheme) -> SocketAddr {
        SocketAddr::from((self.node_ip(), kind.port(scheme)))
    }
}

fn etcd_keys() -> EtcdArgs {
    EtcdArgs::for_endpoints(&["http://127.0.0.1:2379"])
}

/// Runs `f` with a fresh etcd connection made inside the lab's infra namespace.
fn with_store<T, F, Fut>(lab: &Lab, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(Store) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
{
    block_on_in_netns(&lab.infra, move || async move {
        let store = Store::connect(&etcd_keys()).await?;
        f(store).await
    })?
}

/// Puts `kvs` in batches of 100 per transaction.
fn etcd_put_all(lab: &Lab, kvs: Vec<(String, Vec<u8>)>) -> Result<()> {
    with_store(lab, move |store| async move {
        let ops = kvs
            .into_iter()
            .map(|(k, v)| etcd_client::TxnOp::put(k, v, None))
            .collect();
        txn_batches(&store, ops).await
    })
}

/// Whether service `s<i>` has explicit endpoints instead of a selector.
fn explicit(i: u32) -> bool {
    i >= ROUTES - EXPLICIT
}

/// Service `s<i>`: port `http` 80 → 8080, selecting every backend pod (`app=bench`), or,
/// for the last [`EXPLICIT`], without a selector (its endpoints: [`endpoints_kv`]).
fn service(i: u32) -> Result<Service> {
    Ok(Service {
        namespace: NAMESPACE.into(),
        name: format!("s{i}"),
        cluster_ip: vip(i),
        ports: vec!["http=80:8080/tcp".parse()?],
        selector: (!explicit(i)).then(|| [("app".to_string(), "bench".to_string())].into()),
        session_affinity: SessionAffinity::None,
        session_affinity_timeout: DEFAULT_AFFINITY_TIMEOUT,
        external_traffic_policy: TrafficPolicy::Cluster,
        cluster_ips: Vec::new(),
        ip_families: Vec::new(),
        ip_family_policy: Default::default(),
    })
}

/// Route `name`: host `<name>.bench.test` → service `s<service>` port `http`.
fn route(name: &str, service: u32) -> Result<IngressRoute> {
    let r = IngressRoute {
        name: name.to_string(),
        host: HostPattern::parse(&host(name)).map_err(anyhow::Error::msg)?,
        path: "/".into(),
        namespace: NAMESPACE.into(),
        service: Some(format!("s{service}")),
        port: PortRef::Name("http".into()),
    };
    r.validate()
        .with_context(|| format!("bench route {name}"))?;
    Ok(r)
}

/// The explicit endpoints record of service `s<service>`: every pod but `without`.
fn endpoints_kv(
    bed_pods: &[(String, Ipv4Addr)],
    service: u32,
    without: Option<usize>,
) -> Result<(String, Vec<u8>)> {
    let eps = ExplicitEndpoints {
        addresses: bed_pods
            .iter()
            .enumerate()
            .filter(|(k, _)| Some(*k) != without)
            .map(|(_, (_, ip))| EndpointAddress {
                ip: *ip,
                node: None,
            })
            .collect(),
    };
    Ok((
        endpoints_key(&etcd_keys(), NAMESPACE, &format!("s{service}")),
        serde_json::to_vec(&eps).context("encoding an endpoints record")?,
    ))
}

fn route_kv(name: &str, service: u32) -> Result<(String, Vec<u8>)> {
    Ok((
        ingress_route_key(&etcd_keys(), name),
        route(name, service)?.to_bytes(),
    ))
}

/// The self-signed `*.bench.test` certificate both servers present.
fn make_cert(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("bench-cert.pem"), dir.join("bench-key.pem"));
    run(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        &format!("/CN=*.{DOMAIN}"),
        "-addext",
        &format!("subjectAltName=DNS:*.{DOMAIN}"),
        // A server certificate, not a CA: the fixed-rate client (rustls) trusts it as itself.
        "-addext",
        "basicConstraints=critical,CA:FALSE",
        "-days",
        "2",
        "-keyout",
        &key.to_string_lossy(),
        "-out",
        &cert.to_string_lossy(),
    ]))
    .context("making the bench certificate")?;
    Ok((cert, key))
}

/// wrk's script: every request names the next of the 1,000 hosts.
fn write_wrk_script(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("hosts.lua");
    let script = format!(
        "local hosts = {{}}\n\
         for i = 0, {last} do hosts[#hosts + 1] = \"s\" .. i .. \".{DOMAIN}\" end\n\
         local n = 0\n\
         request = function()\n  n = n + 1\n  \
         return wrk.format(\"GET\", \"/small\", {{ Host = hosts[(n % #hosts) + 1] }})\nend\n",
        last = ROUTES - 1
    );
    std::fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn setup() -> Result<Bed> {
    let mut lab = Lab::new(2, bins())?;
    tartan::lab::cleanup_on_signal(&lab.id)?;
    lab.start_etcd()?;
    lab.init_network(&["--network", "10.244.0.0/16"])?;
    for i in 0..2 {
        lab.start_daemon(i, &[])?;
    }
    for i in 0..2 {
        lab.wait_subnet(i)?;
    }
    let mut pods = Vec::new();
    for k in 0..PODS {
        let name = format!("web{k}");
        let pod = lab.add_cni_pod(k % 2, &name, &[("app", "bench")])?;
        start_http_backend(&pod.ns, BACKEND_PORT, &name)?;
        pods.push((name, pod.ip));
    }
    let t = Instant::now();
    let mut kvs = Vec::new();
    for i in 0..ROUTES {
        let s = service(i)?;
        kvs.push((
            service_key(&etcd_keys(), &s.namespace, &s.name),
            s.to_bytes(),
        ));
        kvs.push(route_kv(&format!("s{i}"), i)?);
        if explicit(i) {
            kvs.push(endpoints_kv(&pods, i, None)?);
        }
    }
    etcd_put_all(&lab, kvs)?;
    println!(
        "setup: 2 nodes, {PODS} backend pods ({}), {ROUTES} services ({EXPLICIT} of them with \
         explicit endpoints) and routes written to etcd in {:.1} s",
        pods.iter()
            .map(|(n, ip)| format!("{n} {ip}"))
            .collect::<Vec<_>>()
            .join(", "),
        t.elapsed().as_secs_f64()
    );
    let (cert, key) = make_cert(&lab.dir)?;
    let script = write_wrk_script(&lab.dir)?;
    Ok(Bed {
        lab,
        pods,
        cert,
        key,
        script,
    })
}

/// A value of the ingress's `/metrics`.
fn ingress_metric(ns: &str, name: &str) -> Option<f64> {
    let (code, body) = admin_get(ns, "/metrics").ok()?;
    if code != 200 {
        return None;
    }
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn wait_routes(ing: &LabIngress, want: u32) -> Result<()> {
    wait_for(
        &format!("tartan_ingress_routes to be {want}"),
        Duration::from_secs(60),
        || {
            (ingress_metric(&ing.ns, "tartan_ingress_routes") == Some(f64::from(want)))
                .then_some(())
        },
    )
    .with_context(|| ing.log_tail(20))
}

fn start_tartan(bed: &Bed) -> Result<LabIngress> {
    let (cert, key) = (
        bed.cert.to_string_lossy().into_owned(),
        bed.key.to_string_lossy().into_owned(),
    );
    let t = Instant::now();
    let ing = bed.lab.start_ingress(
        0,
        &[
            "--http-listen",
            "0.0.0.0:80",
            "--https-listen",
            "0.0.0.0:443",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--workers",
            "2",
        ],
    )?;
    wait_routes(&ing, ROUTES)?;
    println!(
        "tartan: tartan-ingress ready with {ROUTES} routes {:.2} s after its start",
        t.elapsed().as_secs_f64()
    );
    Ok(ing)
}

/// What nginx is told: route name → service index, which pods are endpoints, and which
/// (service, pod) endpoints are gone from one service only.
#[derive(Clone)]
struct NginxModel {
    routes: BTreeMap<String, u32>,
    pods: Vec<(Ipv4Addr, bool)>,
    gone: BTreeSet<(u32, usize)>,
}

impl NginxModel {
    fn new(bed: &Bed) -> NginxModel {
        NginxModel {
            routes: (0..ROUTES).map(|i| (format!("s{i}"), i)).collect(),
            pods: bed.pods.iter().map(|(_, ip)| (*ip, true)).collect(),
            gone: BTreeSet::new(),
        }
    }
}

/// nginx in node 1's namespace; stopped (SIGTERM, then SIGKILL) on drop.
struct Nginx {
    child: Child,
    dir: PathBuf,
    conf: PathBuf,
    ns: String,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The whole nginx configuration for `model`.
fn nginx_conf(dir: &Path, cert: &Path, key: &Path, model: &NginxModel) -> String {
    let d = dir.display();
    let mut c = format!(
        "worker_processes 2;\nworker_rlimit_nofile 20000;\ndaemon off;\nuser root;\n\
         pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  default_type text/plain;\n\
         client_body_temp_path {d}/client_temp;\n  proxy_temp_path {d}/proxy_temp;\n  \
         fastcgi_temp_path {d}/fastcgi_temp;\n  uwsgi_temp_path {d}/uwsgi_temp;\n  \
         scgi_temp_path {d}/scgi_temp;\n  \
         server_names_hash_max_size 65536;\n  server_names_hash_bucket_size 128;\n  \
         keepalive_requests 100000000;\n  \
         ssl_certificate {};\n  ssl_certificate_key {};\n  \
         server {{ listen 8081 default_server reuseport; listen 8443 ssl default_server reuseport; \
         server_name _; return 404; }}\n",
        cert.display(),
        key.display()
    );
    let used: BTreeSet<u32> = model.routes.values().copied().collect();
    for s in used {
        let _ = write!(c, "  upstream up_s{s} {{");
        for (_, (ip, _)) in model
            .pods
            .iter()
            .enumerate()
            .filter(|(k, (_, on))| *on && !model.gone.contains(&(s, *k)))
        {
            let _ = write!(c, " server {ip}:{BACKEND_PORT};");
        }
        c.push_str(" keepalive 16; keepalive_requests 100000000; }\n");
    }
    for (name, s) in &model.routes {
        let _ = writeln!(
            c,
            "  server {{ listen 8081; listen 8443 ssl; server_name {}; location / {{ \
             proxy_pass http://up_s{s}; proxy_http_version 1.1; proxy_set_header Connection \"\"; \
             proxy_set_header Host $host; \
             proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; }} }}",
            host(name)
        );
    }
    c.push_str("}\n");
    c
}

impl Nginx {
    fn start(bed: &Bed, model: &NginxModel) -> Result<Nginx> {
        let dir = bed.lab.dir.join("nginx");
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("nginx.conf");
        let ns = bed.lab.nodes[0].ns.clone();
        std::fs::write(&conf, nginx_conf(&dir, &bed.cert, &bed.key, model))?;
        let log = std::fs::File::create(dir.join("stderr.log"))?;
        let mut cmd = Command::new("nginx");
        cmd.arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = spawn_in_netns(&ns, cmd).context("starting nginx")?;
        Ok(Nginx {
            child,
            dir,
            conf,
            ns,
        })
    }

    fn error_log(&self) -> String {
        let mut s = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
        s.push_str(&std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default());
        s
    }

    /// Rewrites the config for `model` and tells nginx to load it (`nginx -s reload`).
    fn reload(&self, bed: &Bed, model: &NginxModel) -> Result<()> {
        std::fs::write(
            &self.conf,
            nginx_conf(&self.dir, &bed.cert, &bed.key, model),
        )?;
        run(ns_command(&self.ns, "nginx")
            .arg("-p")
            .arg(&self.dir)
            .arg("-c")
            .arg(&self.conf)
            .args(["-s", "reload"]))
        .map(|_| ())
        .with_context(|| self.error_log())
    }

    /// The master's worker processes.
    fn workers(&self) -> Vec<u32> {
        let master = self.child.id();
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| {
                        let after = s.rsplit_once(')')?.1;
                        after.split_whitespace().nth(1)?.parse::<u32>().ok()
                    })
                    == Some(master)
            })
            .collect()
    }
}

/// One HTTP/1.1 request from the calling namespace's view: status and body.
fn http_get(addr: SocketAddr, host: &str, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .with_context(|| format!("reading the answer of {addr} to {host}{path}"))?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status line in {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    Ok((code, body))
}

/// `http_get` from the lab's infra namespace (where wrk runs).
fn get_from_infra(bed: &Bed, addr: SocketAddr, host: &str, path: &str) -> Result<(u16, String)> {
    let h = host.to_string();
    let p = path.to_string();
    in_netns(&bed.lab.infra, move || http_get(addr, &h, &p))?
}

/// One HTTPS request the way wrk makes it (SNI = node 1's address, the route's Host header),
/// with curl: status and body.
fn https_get(bed: &Bed, addr: SocketAddr, host: &str, path: &str) -> Result<(u16, String)> {
    let out = run(ns_command(&bed.lab.infra, "curl").args([
        "-sk",
        "--max-time",
        "5",
        "-H",
        &format!("Host: {host}"),
        "-w",
        "\n%{http_code}",
        &format!("https://{addr}{path}"),
    ]))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

/// Waits until `kind` answers, then checks its answers: the page, the small answer from
/// every backend, the forwarded headers, 404 for an unknown host, HTTPS as wrk asks, and
/// (tartan) a WebSocket echo.
fn check_answers(bed: &Bed, kind: Kind) -> Result<()> {
    let addr = bed.addr(kind, Scheme::Http);
    let name = kind.name();
    wait_for(
        &format!("{name} to answer s{} as a route", ROUTES - 1),
        Duration::from_secs(60),
        || {
            get_from_infra(bed, addr, &host(&format!("s{}", ROUTES - 1)), "/small")
                .ok()
                .filter(|(c, _)| *c == 200)
        },
    )?;
    let (code, page) = get_from_infra(bed, addr, &host("s1"), "/")?;
    if code != 200 || !page.contains("<script src=\"m.js\">") {
        bail!("{name}: GET / for s1 answered {code} {page:?}");
    }
    // One route's service, asked 40 times: each server balances per service (nginx per
    // upstream and worker), so every pod answers.
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let (code, body) = get_from_infra(bed, addr, &host("s17"), "/small")?;
        if code != 200 {
            bail!("{name}: /small for s17 answered {code} {body:?}");
        }
        seen.insert(body.trim().to_string());
    }
    let want: BTreeSet<String> = bed.pods.iter().map(|(n, _)| n.clone()).collect();
    if seen != want {
        bail!("{name}: 40 requests for s17 reached {seen:?}, expected every pod {want:?}");
    }
    let (code, echo) = get_from_infra(bed, addr, &host("s7"), "/echo?x=1")?;
    let client = tartan::lab::INFRA_IP;
    if code != 200
        || !echo.contains("host: s7.bench.test\n")
        || !echo.contains("path=/echo?x=1\n")
        || !echo.contains(&format!("x-forwarded-for: {client}"))
    {
        bail!("{name}: /echo for s7 answered {code}:\n{echo}");
    }
    let (code, body) = get_from_infra(bed, addr, &host("nx"), "/small")?;
    if code != 404 {
        bail!("{name}: an unknown host answered {code} {body:?}, expected 404");
    }
    let (code, body) = https_get(bed, bed.addr(kind, Scheme::Https), &host("s5"), "/small")?;
    if code != 200 || !want.contains(body.trim()) {
        bail!("{name}: HTTPS (SNI = the address) /small for s5 answered {code} {body:?}");
    }
    if kind == Kind::Tartan {
        let back = websocket_echo(
            &bed.lab.infra,
            addr,
            &host("s3"),
            "/ws",
            "hello through the ingress",
            Duration::from_secs(5),
        )?;
        if back != "hello through the ingress" {
            bail!("{name}: the WebSocket echo came back as {back:?}");
        }
    }
    println!(
        "{name}: answers the page, /small from all {PODS} pods, /echo with Host and \
         X-Forwarded-For, 404 for an unknown host, HTTPS with SNI = the address{}",
        if kind == Kind::Tartan {
            ", a WebSocket echo"
        } else {
            ""
        }
    );
    Ok(())
}

/// What one wrk run reported.
#[derive(Debug, Clone, Default)]
struct WrkRun {
    rps: f64,
    requests: u64,
    p50_us: f64,
    p99_us: f64,
    non2xx: u64,
    socket_errors: u64,
}

impl WrkRun {
    fn failed(&self) -> u64 {
        self.non2xx + self.socket_errors
    }
}

fn wrk_args(url: &str, script: &Path, secs: u32) -> Vec<String> {
    let mut a: Vec<String> = WRK_ARGS.iter().map(|s| s.to_string()).collect();
    a.extend([
        format!("-d{secs}s"),
        "--latency".into(),
        "-s".into(),
        script.display().to_string(),
        url.to_string(),
    ]);
    a
}

fn url(bed: &Bed, kind: Kind, scheme: Scheme) -> String {
    format!("{}://{}/small", scheme.name(), bed.addr(kind, scheme))
}

fn wrk(infra: &str, args: &[String]) -> Result<WrkRun> {
    let mut cmd = Command::new("wrk");
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = spawn_in_netns(infra, cmd)?
        .wait_with_output()
        .context("waiting for wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk {} failed: {} {}",
            args.join(" "),
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_wrk(&text).with_context(|| format!("reading wrk's output:\n{text}"))
}

/// The load a run puts on a server.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// wrk at saturation.
    Wrk,
    /// The bench's open-loop client at this many requests/s.
    FixedRate(u32),
}

impl Load {
    fn describe(self) -> String {
        match self {
            Load::Wrk => format!("wrk {} (saturation)", WRK_ARGS.join(" ")),
            Load::FixedRate(r) => {
                format!("{r} requests/s fixed rate over {FIXED_CONNECTIONS} connections")
            }
        }
    }
}

/// One run of `secs` of `load` on `kind` by `scheme`, from the lab's infra namespace.
fn load_run(bed: &Bed, kind: Kind, scheme: Scheme, secs: u32, load: Load) -> Result<WrkRun> {
    match load {
        Load::Wrk => wrk(
            &bed.lab.infra,
            &wrk_args(&url(bed, kind, scheme), &bed.script, secs),
        ),
        Load::FixedRate(rate) => fixed_rate(bed, kind, scheme, secs, rate),
    }
}

/// `secs` of `rate` requests/s (`lab::fixed_rate`) rotating over the 1,000 hosts; with HTTPS
/// the SNI name is `s0.bench.test` (the same wildcard certificate either way).
fn fixed_rate(bed: &Bed, kind: Kind, scheme: Scheme, secs: u32, rate: u32) -> Result<WrkRun> {
    let tls = match scheme {
        Scheme::Http => None,
        Scheme::Https => Some((
            tls_client_config(&bed.cert)?,
            ServerName::try_from(host("s0")).context("SNI name")?,
        )),
    };
    let load = FixedRate {
        addr: bed.addr(kind, scheme),
        tls,
        hosts: (0..ROUTES).map(|i| host(&format!("s{i}"))).collect(),
        path: "/small".into(),
        rate,
        connections: FIXED_CONNECTIONS,
        duration: Duration::from_secs(secs.into()),
    };
    let r = block_on_in_netns(&bed.lab.infra, move || fixed_rate_run(load))??;
    if let Some(e) = &r.first_error {
        println!(
            "  {} {}: {} of {} requests failed on the connection, the first: {e}",
            kind.name(),
            scheme.name(),
            r.errors,
            r.requests()
        );
    }
    let p99 = r.quantile_us(0.99);
    let (late, windows, most) = r.late_windows(p99 as u64, 10);
    println!(
        "  {} {}: {late} requests at or above the p99 ({:.2} ms), in {windows} windows of 10 ms, \
         at most {most} in one",
        kind.name(),
        scheme.name(),
        p99 / 1e3
    );
    Ok(WrkRun {
        rps: r.rate(),
        requests: r.requests(),
        p50_us: r.quantile_us(0.5),
        p99_us: p99,
        non2xx: r.non2xx,
        socket_errors: r.errors,
    })
}

/// `1.23ms` → 1230.0 (µs).
fn duration_us(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v,
        "ms" => v * 1e3,
        "s" => v * 1e6,
        "m" => v * 60e6,
        _ => return None,
    })
}

fn parse_wrk(text: &str) -> Result<WrkRun> {
    let field = |key: &str| -> Option<&str> {
        text.lines()
            .find_map(|l| l.trim_start().strip_prefix(key))
            .map(str::trim)
    };
    let pct = |p: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.trim_start().strip_prefix(p))
            .and_then(|v| duration_us(v.trim()))
    };
    let rps = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .context("no 'Requests/sec:'")?;
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let socket_errors = field("Socket errors:").map_or(0, |v| {
        v.split(',')
            .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
            .sum()
    });
    let non2xx = field("Non-2xx or 3xx responses:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(WrkRun {
        rps,
        requests,
        p50_us: pct("50%").context("no 50% latency (--latency)")?,
        p99_us: pct("99%").context("no 99% latency (--latency)")?,
        non2xx,
        socket_errors,
    })
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 50.0)
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)))
}

#[derive(Default)]
struct Cell {
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    non2xx: u64,
    socket_errors: u64,
    requests: u64,
    /// The fixed-rate runs.
    fixed: FixedCell,
}

/// The fixed-rate runs of one server and scheme.
#[derive(Default)]
struct FixedCell {
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    failed: u64,
    requests: u64,
}

fn describe(r: &WrkRun) -> String {
    format!(
        "{:>8.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} requests, {} non-2xx, {} socket errors",
        r.rps,
        r.p50_us / 1e3,
        r.p99_us / 1e3,
        r.requests,
        r.non2xx,
        r.socket_errors
    )
}

fn saturation(
    bed: &Bed,
    kinds: &[Kind],
    schemes: &[Scheme],
    cfg: &Config,
) -> Result<BTreeMap<(Scheme, Kind), Cell>> {
    println!(
        "saturation: wrk {} (HTTPS: SNI = the address)",
        wrk_args("URL", &bed.script, cfg.secs).join(" ")
    );
    let mut results: BTreeMap<(Scheme, Kind), Cell> = BTreeMap::new();
    for round in 0..cfg.rounds {
        let mut order = kinds.to_vec();
        order.rotate_left(round % kinds.len().max(1));
        let idle = wait_quiet();
        if idle <= 0.9 {
            println!(
                "round {}: the machine did not go idle within 60 s ({:.0} % idle); load {}",
                round + 1,
                idle * 100.0,
                std::fs::read_to_string("/proc/loadavg")
                    .unwrap_or_default()
                    .trim()
            );
        }
        for scheme in schemes {
            for k in &order {
                let r = wrk(
                    &bed.lab.infra,
                    &wrk_args(&url(bed, *k, *scheme), &bed.script, cfg.secs),
                )?;
                println!(
                    "round {} {:>5} {:>6}: {}",
                    round + 1,
                    scheme.name(),
                    k.name(),
                    describe(&r)
                );
                let c = results.entry((*scheme, *k)).or_default();
                c.rps.push(r.rps);
                c.p50.push(r.p50_us);
                c.p99.push(r.p99_us);
                c.non2xx += r.non2xx;
                c.socket_errors += r.socket_errors;
                c.requests += r.requests;
            }
            for k in &order {
                let r = fixed_rate(bed, *k, *scheme, cfg.secs, cfg.rate)?;
                println!(
                    "round {} {:>5} {:>6}: at {} req/s: {}",
                    round + 1,
                    scheme.name(),
                    k.name(),
                    cfg.rate,
                    describe(&r)
                );
                let f = &mut results.entry((*scheme, *k)).or_default().fixed;
                f.rps.push(r.rps);
                f.p50.push(r.p50_us);
                f.p99.push(r.p99_us);
                f.failed += r.failed();
                f.requests += r.requests;
            }
        }
    }
    Ok(results)
}

fn report(results: &BTreeMap<(Scheme, Kind), Cell>, cfg: &Config) {
    println!(
        "\nmedians of {} rounds ({} s per run, wrk {} --latency, 1,000 hosts rotated; latency at \
         saturation):",
        cfg.rounds,
        cfg.secs,
        WRK_ARGS.join(" ")
    );
    println!(
        "| scheme | server | req/s at saturation (min–max) | p50 ms | p99 ms (min–max) | non-2xx (all runs) | socket errors (all runs) | requests (all runs) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for ((scheme, kind), c) in results {
        let (lo, hi) = min_max(&c.rps);
        let (plo, phi) = min_max(&c.p99);
        println!(
            "| {} | {} | {:.0} ({lo:.0}–{hi:.0}) | {:.2} | {:.2} ({:.2}–{:.2}) | {} | {} | {} |",
            scheme.name(),
            kind.name(),
            median(&c.rps),
            median(&c.p50) / 1e3,
            median(&c.p99) / 1e3,
            plo / 1e3,
            phi / 1e3,
            c.non2xx,
            c.socket_errors,
            c.requests,
        );
    }
    println!(
        "\nat a fixed rate ({} requests/s, {FIXED_CONNECTIONS} connections, {} s per run, \
         latency counted from when each request was due), medians of {} rounds:",
        cfg.rate, cfg.secs, cfg.rounds
    );
    println!(
        "| scheme | server | req/s achieved | p50 ms | p99 ms (min–max) | failed (all runs) | requests (all runs) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for ((scheme, kind), c) in results {
        let f = &c.fixed;
        let (plo, phi) = min_max(&f.p99);
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} ({:.2}–{:.2}) | {} | {} |",
            scheme.name(),
            kind.name(),
            median(&f.rps),
            median(&f.p50) / 1e3,
            median(&f.p99) / 1e3,
            plo / 1e3,
            phi / 1e3,
            f.failed,
            f.requests,
        );
    }
    println!("\ntartan / nginx (medians):");
    for scheme in [Scheme::Http, Scheme::Https] {
        let (Some(t), Some(n)) = (
            results.get(&(scheme, Kind::Tartan)),
            results.get(&(scheme, Kind::Nginx)),
        ) else {
            continue;
        };
        println!(
            "  {}: req/s {:.2}x, p50 {:.2}x, p99 {:.2}x at saturation; at {} req/s p50 {:.2}x, \
             p99 {:.2}x",
            scheme.name(),
            median(&t.rps) / median(&n.rps),
            median(&t.p50) / median(&n.p50),
            median(&t.p99) / median(&n.p99),
            cfg.rate,
            median(&t.fixed.p50) / median(&n.fixed.p50),
            median(&t.fixed.p99) / median(&n.fixed.p99),
        );
    }
}

/// `VmRSS` and the proportional set size (`Pss` of `smaps_rollup`) of `pid`, in KiB.
fn rss_pss_kb(pid: u32) -> (u64, u64) {
    let field = |file: &str, key: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(key))?
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    (field("status", "VmRSS:"), field("smaps_rollup", "Pss:"))
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// nginx's memory: the master and its workers, summed (RSS counts shared pages once per
/// process; PSS shares them out).
fn nginx_memory(ngx: &Nginx) -> String {
    let mut pids = vec![ngx.child.id()];
    pids.extend(ngx.workers());
    let (rss, pss) = pids
        .iter()
        .map(|p| rss_pss_kb(*p))
        .fold((0, 0), |(a, b), (r, p)| (a + r, b + p));
    format!(
        "{} processes, PSS {:.1} MiB (RSS summed {:.1} MiB)",
        pids.len(),
        mib(pss),
        mib(rss)
    )
}

fn tartan_memory(ing: &LabIngress) -> String {
    let (rss, pss) = rss_pss_kb(ing.pid());
    format!("VmRSS {:.1} MiB (PSS {:.1} MiB)", mib(rss), mib(pss))
}

/// The pod record of address `ip`: key, value and lease.
fn pod_record(lab: &Lab, ip: Ipv4Addr) -> Result<(String, Vec<u8>, i64)> {
    let prefix = pods_prefix(&etcd_keys());
    let (_, items) = with_store(lab, move |s| async move { s.list(&prefix).await })?;
    items
        .into_iter()
        .find(|kv| PodRecord::parse(&kv.value).is_ok_and(|p| p.ip == ip))
        .map(|kv| (kv.key, kv.value, kv.lease))
        .with_context(|| format!("no pod record for {ip}"))
}

/// One of the `changes` section's changes, as applied to etcd and to nginx's model.
enum Change {
    /// Route `s<route>` now goes to service `s<service>`.
    MoveRoute { route: u32, service: u32 },
    /// Pod `k`'s record is deleted (it leaves every service's endpoints).
    PodGone(usize),
    /// Pod `k`'s record is back.
    PodBack(usize),
    /// Pod `pod` leaves the explicit endpoints of service `s<service>` (of that one only).
    EndpointGone { service: u32, pod: usize },
    /// Pod `pod` is back in them.
    EndpointBack { service: u32, pod: usize },
}

/// What the odd changes of a `changes` section change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChangeSet {
    /// One endpoint of one service (an explicit endpoints record rewritten): what a pod
    /// of one service coming and going is.
    Endpoints,
    /// A pod record deleted and put back: the pod leaves and rejoins all 1,000 services, so
    /// every node's tartand reprograms them all, on the same two cores.
    Pods,
}

impl ChangeSet {
    fn describe(self) -> String {
        match self {
            ChangeSet::Endpoints => format!(
                "25 endpoints taken out of one service's endpoints record and 25 put back (the \
                 {EXPLICIT} services with explicit endpoints in turn)"
            ),
            ChangeSet::Pods => format!(
                "25 pod records deleted and 25 put back (each pod leaves and rejoins all \
                 {ROUTES} services)"
            ),
        }
    }
}

/// Change `c` of 100: even ones move a route (`s<c/2*7>` → the service 500 further on),
/// odd ones take an endpoint or a pod away and bring it back in turn.
fn change(c: u32, set: ChangeSet) -> Change {
    if c.is_multiple_of(2) {
        let route = (c / 2 * 7) % ROUTES;
        return Change::MoveRoute {
            route,
            service: (route + ROUTES / 2) % ROUTES,
        };
    }
    let pod = ((c / 4) as usize) % PODS;
    let gone = (c / 2).is_multiple_of(2);
    match set {
        ChangeSet::Pods if gone => Change::PodGone(pod),
        ChangeSet::Pods => Change::PodBack(pod),
        ChangeSet::Endpoints => {
            let service = ROUTES - EXPLICIT + (c / 4) % EXPLICIT;
            if gone {
                Change::EndpointGone { service, pod }
            } else {
                Change::EndpointBack { service, pod }
            }
        }
    }
}

type PodRecords = Vec<(String, Vec<u8>, i64)>;

/// The changes of one `changes` section: what they change, and the pod records as setup
/// wrote them (to delete and put back).
struct ChangePlan {
    set: ChangeSet,
    records: PodRecords,
}

fn apply_to_etcd(bed: &Bed, ch: &Change, records: &PodRecords) -> Result<()> {
    let lab = &bed.lab;
    match ch {
        Change::MoveRoute { route, service } => {
            let (k, v) = route_kv(&format!("s{route}"), *service)?;
            with_store(lab, move |s| async move { s.put(&k, v, 0).await })
        }
        Change::PodGone(p) => {
            let key = records[*p].0.clone();
            with_store(
                lab,
                move |s| async move { s.delete(&key).await.map(|_| ()) },
            )
        }
        Change::PodBack(p) => {
            let (key, value, lease) = records[*p].clone();
            with_store(lab, move |s| async move { s.put(&key, value, lease).await })
        }
        Change::EndpointGone { service, pod } => {
            etcd_put_all(lab, vec![endpoints_kv(&bed.pods, *service, Some(*pod))?])
        }
        Change::EndpointBack { service, .. } => {
            etcd_put_all(lab, vec![endpoints_kv(&bed.pods, *service, None)?])
        }
    }
}

fn apply_to_model(model: &mut NginxModel, ch: &Change) {
    match ch {
        Change::MoveRoute { route, service } => {
            model.routes.insert(format!("s{route}"), *service);
        }
        Change::PodGone(p) => model.pods[*p].1 = false,
        Change::PodBack(p) => model.pods[*p].1 = true,
        Change::EndpointGone { service, pod } => {
            model.gone.insert((*service, *pod));
        }
        Change::EndpointBack { service, pod } => {
            model.gone.remove(&(*service, *pod));
        }
    }
}

/// Puts every route, endpoints record and pod record back as setup wrote them.
fn undo_changes(bed: &Bed, records: &PodRecords) -> Result<()> {
    let mut kvs = Vec::new();
    for c in 0..100 {
        if let Change::MoveRoute { route, .. } = change(c, ChangeSet::Endpoints) {
            kvs.push(route_kv(&format!("s{route}"), route)?);
        }
    }
    for i in (0..ROUTES).filter(|i| explicit(*i)) {
        kvs.push(endpoints_kv(&bed.pods, i, None)?);
    }
    etcd_put_all(&bed.lab, kvs)?;
    let records = records.clone();
    with_store(&bed.lab, move |s| async move {
        for (k, v, lease) in records {
            s.put(&k, v, lease).await?;
        }
        Ok(())
    })
}

/// How the changes of one run went: each one's time to apply (etcd write; for nginx also the
/// config rewrite and `nginx -s reload`), and how many were done inside the load's window.
struct ChangeTimes {
    took_ms: Vec<f64>,
    in_window: usize,
    last_done: Duration,
}

impl ChangeTimes {
    fn describe(&self, secs: u32) -> String {
        let mut v = self.took_ms.clone();
        v.sort_by(f64::total_cmp);
        format!(
            "changes took p50 {:.0} ms, max {:.0} ms; {} of {} done within the {secs} s of load \
             (the last {:.1} s after it began)",
            percentile(&v, 50.0),
            percentile(&v, 100.0),
            self.in_window,
            v.len(),
            self.last_done.as_secs_f64()
        )
    }
}

/// One loaded run of `secs` on `kind` with the 100 changes applied meanwhile (`nginx` set:
/// also to its config, by reload); returns wrk's figures and the changes' times.
fn run_with_changes(
    bed: &Bed,
    kind: Kind,
    nginx: Option<&Nginx>,
    plan: &ChangePlan,
    secs: u32,
    load: Load,
) -> Result<(WrkRun, ChangeTimes)> {
    let began = Instant::now();
    let (load, changed) = std::thread::scope(|scope| -> Result<_> {
        let load = scope.spawn(move || load_run(bed, kind, Scheme::Http, secs, load));
        let changed = apply_changes(bed, nginx, plan, secs, began);
        let load = load
            .join()
            .map_err(|_| anyhow::anyhow!("the load thread panicked"))?;
        Ok((load, changed))
    })?;
    // Undo the changes also when the load failed, so the next run starts from setup's state.
    undo_changes(bed, &plan.records)?;
    if let Some(ngx) = nginx {
        ngx.reload(bed, &NginxModel::new(bed))?;
    }
    Ok((load?, changed?))
}

/// The 100 changes, one every `secs / 100` from `began` on.
fn apply_changes(
    bed: &Bed,
    nginx: Option<&Nginx>,
    plan: &ChangePlan,
    secs: u32,
    began: Instant,
) -> Result<ChangeTimes> {
    let every = Duration::from_secs_f64(f64::from(secs) / 100.0);
    let start = began + every / 2;
    let mut model = NginxModel::new(bed);
    let mut times = ChangeTimes {
        took_ms: Vec::new(),
        in_window: 0,
        last_done: Duration::ZERO,
    };
    for c in 0..100u32 {
        let at = start + every * c;
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        let t = Instant::now();
        let ch = change(c, plan.set);
        apply_to_etcd(bed, &ch, &plan.records)?;
        if let Some(ngx) = nginx {
            apply_to_model(&mut model, &ch);
            ngx.reload(bed, &model)?;
        }
        times.took_ms.push(t.elapsed().as_secs_f64() * 1e3);
        times.last_done = began.elapsed();
        if times.last_done.as_secs_f64() <= f64::from(secs) {
            times.in_window += 1;
        }
    }
    Ok(times)
}

/// The processes whose CPU time the `changes` section reports.
const CPU_NAMES: &[&str] = &["tartand", "tartan-ingress", "etcd", "nginx", "wrk"];

/// CPU seconds used so far by the live processes of each name in `CPU_NAMES`, with their
/// reaped children's (`/proc/PID/stat` utime + stime + cutime + cstime: tartand's `nft`
/// runs count as tartand's). Processes that exited since (old nginx workers after a reload)
/// are missing, so nginx's figure is a lower bound.
fn cpu_by_name() -> BTreeMap<&'static str, f64> {
    // USER_HZ is 100 on Linux for every architecture tartan builds for.
    const TICKS: f64 = 100.0;
    let mut out: BTreeMap<&'static str, f64> = CPU_NAMES.iter().map(|n| (*n, 0.0)).collect();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "PID (COMM) STATE ...": the name is inside the last parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let Some(name) = CPU_NAMES.iter().find(|n| comm == **n) else {
            continue;
        };
        // Fields after the name: state is field 3, utime..cstime are fields 14..17.
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks: u64 = (11..15)
            .filter_map(|i| fields.get(i).and_then(|v| v.parse::<u64>().ok()))
            .sum();
        *out.entry(name).or_default() += ticks as f64 / TICKS;
    }
    out
}

/// What each process of `CPU_NAMES` used between `before` and `after`.
fn cpu_used(before: &BTreeMap<&'static str, f64>, after: &BTreeMap<&'static str, f64>) -> String {
    after
        .iter()
        .map(|(n, a)| {
            format!(
                "{n} {:.1} s",
                (a - before.get(n).copied().unwrap_or(0.0)).max(0.0)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn changes(bed: &Bed, nginx: &Nginx, cfg: &Config, load: Load, set: ChangeSet) -> Result<()> {
    let mut records = Vec::new();
    for (_, ip) in &bed.pods {
        records.push(pod_record(&bed.lab, *ip)?);
    }
    let plan = ChangePlan { set, records };
    println!(
        "\nchanges: {} s of load (http; {}) while 100 changes are applied, one every {:.2} s: \
         50 route moves to another service, {}; nginx: the same etcd changes plus a config \
         rewrite and `nginx -s reload` each",
        cfg.change_secs,
        load.describe(),
        f64::from(cfg.change_secs) / 100.0,
        set.describe()
    );
    let mut rows = Vec::new();
    for (kind, ngx) in [(Kind::Tartan, None), (Kind::Nginx, Some(nginx))] {
        wait_quiet();
        let cpu0 = cpu_by_name();
        let steady = load_run(bed, kind, Scheme::Http, cfg.change_secs, load)?;
        let cpu1 = cpu_by_name();
        println!("  {:>6} steady:       {}", kind.name(), describe(&steady));
        println!("         CPU: {}", cpu_used(&cpu0, &cpu1));
        wait_quiet();
        let cpu0 = cpu_by_name();
        let (changed, times) = run_with_changes(bed, kind, ngx, &plan, cfg.change_secs, load)?;
        let cpu1 = cpu_by_name();
        println!(
            "  {:>6} with changes: {}\n         {}\n         CPU: {}",
            kind.name(),
            describe(&changed),
            times.describe(cfg.change_secs),
            cpu_used(&cpu0, &cpu1)
        );
        rows.push((kind, steady, changed));
    }
    println!(
        "\n| server | failed requests steady (non-2xx + socket errors) | failed with 100 changes | p99 ms steady | p99 ms with changes | req/s steady | req/s with changes |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (kind, s, c) in &rows {
        println!(
            "| {} | {} of {} | {} of {} ({} non-2xx, {} socket errors) | {:.2} | {:.2} ({:.2}×) | {:.0} | {:.0} |",
            kind.name(),
            s.failed(),
            s.requests,
            c.failed(),
            c.requests,
            c.non2xx,
            c.socket_errors,
            s.p99_us / 1e3,
            c.p99_us / 1e3,
            c.p99_us / s.p99_us,
            s.rps,
            c.rps
        );
    }
    Ok(())
}

/// The `memory` section: 9,000 more routes (`x<i>` → service `s<i mod 1000>`) in etcd and
/// in nginx's config; both servers' memory then.
fn memory(bed: &Bed, ing: &LabIngress, ngx: &Nginx) -> Result<()> {
    let mut kvs = Vec::new();
    let mut model = NginxModel::new(bed);
    for i in ROUTES..MANY_ROUTES {
        let name = format!("x{i}");
        kvs.push(route_kv(&name, i % ROUTES)?);
        model.routes.insert(name, i % ROUTES);
    }
    println!("\nmemory: {MANY_ROUTES} routes ({ROUTES} services)");
    let t = Instant::now();
    etcd_put_all(&bed.lab, kvs)?;
    wait_routes(ing, MANY_ROUTES)?;
    println!(
        "  tartan: {MANY_ROUTES} routes in its table {:.2} s after the etcd writes began",
        t.elapsed().as_secs_f64()
    );
    let last = host(&format!("x{}", MANY_ROUTES - 1));
    for kind in [Kind::Tartan, Kind::Nginx] {
        if kind == Kind::Nginx {
            let t = Instant::now();
            ngx.reload(bed, &model)?;
            let addr = bed.addr(Kind::Nginx, Scheme::Http);
            wait_for(
                "nginx to serve the 10,000 routes",
                Duration::from_secs(60),
                || matches!(get_from_infra(bed, addr, &last, "/small"), Ok((200, _))).then_some(()),
            )?;
            println!(
                "  nginx: serves {MANY_ROUTES} server blocks {:.2} s after the reload",
                t.elapsed().as_secs_f64()
            );
            // The old workers leave once their connections are done.
            let _ = wait_for(
                "nginx's old workers to exit",
                Duration::from_secs(30),
                || (ngx.workers().len() <= 2).then_some(()),
            );
        }
        let (code, body) = get_from_infra(bed, bed.addr(kind, Scheme::Http), &last, "/small")?;
        if code != 200 {
            bail!("{}: {last} answers {code} {body:?}", kind.name());
        }
    }
    println!(
        "  tartan-ingress with {MANY_ROUTES} routes: {}",
        tartan_memory(ing)
    );
    println!(
        "  nginx with {MANY_ROUTES} server blocks: {} (every server block that listens with ssl \
         gets an SSL context of its own, with the certificate and key loaded into it)",
        nginx_memory(ngx)
    );
    Ok(())
}

fn check_tools() -> Result<()> {
    for tool in ["nginx", "wrk", "openssl", "curl"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map_or(true, |s| !s.success())
        {
            bail!(
                "{tool} is missing: make deps installs it (Debian packages nginx-light, wrk, \
                 openssl, curl)"
            );
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    check_tools()?;
    let sections = Sections::from_args();
    let schemes: Vec<Scheme> = [Scheme::Http, Scheme::Https]
        .into_iter()
        .filter(|s| sections.want(&format!("saturation-{}", s.name())))
        .collect();
    let cfg = Config::from_env();
    let bed = setup()?;
    let tartan = start_tartan(&bed)?;
    println!(
        "tartan-ingress with {ROUTES} routes, before load: {}",
        tartan_memory(&tartan)
    );
    let nginx = Nginx::start(&bed, &NginxModel::new(&bed))?;
    check_answers(&bed, Kind::Tartan)?;
    check_answers(&bed, Kind::Nginx).with_context(|| nginx.error_log())?;
    println!(
        "nginx with {ROUTES} server blocks, before load: {}",
        nginx_memory(&nginx)
    );
    let kinds = [Kind::Tartan, Kind::Nginx];
    if !schemes.is_empty() {
        let results = saturation(&bed, &kinds, &schemes, &cfg)?;
        report(&results, &cfg);
        println!(
            "\nafter the runs: tartan-ingress {}; nginx {}",
            tartan_memory(&tartan),
            nginx_memory(&nginx)
        );
    }
    if sections.want("changes-wrk") {
        changes(&bed, &nginx, &cfg, Load::Wrk, ChangeSet::Endpoints)?;
    }
    if sections.want("changes-fixed-rate") {
        changes(
            &bed,
            &nginx,
            &cfg,
            Load::FixedRate(cfg.rate),
            ChangeSet::Endpoints,
        )?;
    }
    if sections.want("changes-pods-fixed-rate") {
        changes(
            &bed,
            &nginx,
            &cfg,
            Load::FixedRate(cfg.rate),
            ChangeSet::Pods,
        )?;
    }
    if sections.want("memory") {
        memory(&bed, &tartan, &nginx)?;
    }
    drop(nginx);
    drop(tartan);
    drop(bed);
    Ok(())
}
