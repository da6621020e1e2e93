//! Cluster DNS beside NSD and dnsmasq (issue 13, "Figures"): the same records in all three
//! (10,000 services × 5 endpoint pods, a named port each so SRV exists, 50,000 pod records,
//! zone `cluster.local`), `dnsperf` as the client, interleaved rounds in rotating order.
//!
//! - tartan: `dns::server` in this process, its sockets bound inside the lab's infra
//!   namespace; the zone is filled through `dns::catalog` from the model objects, as tartand
//!   does from etcd;
//! - NSD: a zone file written from tartan's own zone (same names, same records, plus SOA and
//!   NS), `server-count` = tartan's UDP workers, `reuseport`, no rate limiting;
//! - dnsmasq: the A records as an `--addn-hosts` file (dnsmasq derives the PTRs from it), one
//!   `srv-host` line per SRV record, `--local=/cluster.local/` (unknown names are NXDOMAIN).
//!
//! Per server and query set: queries per second at saturation (`dnsperf -c 2 -q 200 -l S`)
//! and latency p50/p99 at a fixed rate (`-Q RATE -v`: the per-query latencies dnsperf prints).
//! Servers in the infra namespace (addresses on its bridge), dnsperf in a node namespace.
//! Also the bench process's extra resident memory for the loaded zone.
//!
//! Run: `cargo bench --bench dns [-- tartan|nsd|dnsmasq ...]`; environment:
//! `TARTAN_DNS_BENCH_ROUNDS` (5), `TARTAN_DNS_BENCH_SECS` (5), `TARTAN_DNS_BENCH_RATE` (20000).
//! Results: docs/benchmarks.md, "Cluster DNS: tartan vs NSD vs dnsmasq".

mod common;

use common::*;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{LowerName, Name, RData, RecordType};
use tartan::dns::catalog::{Catalog, dashed};
use tartan::dns::run::DnsSettings;
use tartan::dns::server::{DnsServer, UdpSockets};
use tartan::dns::zone::{Origin, Rdata, Zone};
use tartan::lab::{Lab, in_netns, ip, require_root, spawn_in_netns, wait_for};
use tartan::netbench::service_bed::{bulk_pod, bulk_service};
use tartan::store::records::ModelChange;

const SERVICES: u32 = 10_000;
const PODS_PER_SERVICE: u32 = 5;
const PORT_NAME: &str = "http";
/// Where each server answers, on the infra namespace's bridge.
const TARTAN_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 53);
const NSD_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 54);
const DNSMASQ_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 55);
const TARTAN_RP_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 56);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Tartan,
    /// tartan with one `SO_REUSEPORT` socket per worker (`UdpSockets::PerWorker`), beside the
    /// default shared socket.
    TartanReuseport,
    Nsd,
    Dnsmasq,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Tartan => "tartan",
            Kind::TartanReuseport => "tartan-reuseport",
            Kind::Nsd => "nsd",
            Kind::Dnsmasq => "dnsmasq",
        }
    }

    fn addr(self) -> Ipv4Addr {
        match self {
            Kind::Tartan => TARTAN_IP,
            Kind::TartanReuseport => TARTAN_RP_IP,
            Kind::Nsd => NSD_IP,
            Kind::Dnsmasq => DNSMASQ_IP,
        }
    }
}

struct Config {
    rounds: usize,
    secs: u32,
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
            rounds: var("TARTAN_DNS_BENCH_ROUNDS", 5) as usize,
            secs: var("TARTAN_DNS_BENCH_SECS", 5),
            rate: var("TARTAN_DNS_BENCH_RATE", 20_000),
        }
    }
}

/// A server process; killed on drop (the lab's namespace teardown would kill it too).
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn vm_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn settings() -> Result<DnsSettings> {
    Ok(DnsSettings {
        domain: Name::from_ascii("cluster.local.")?,
        dns_ip: TARTAN_IP,
        port: 53,
        upstreams: Vec::new(),
        ttl: 5,
        service_cidr: "10.96.0.0/12".parse()?,
        // bulk_pod's addresses start at 10.200.0.0 and go past a /16.
        cluster_network: "10.192.0.0/10".parse()?,
        cluster_network6: None,
        service_cidr6: None,
    })
}

/// The bench's services (a named port each) and pods, as the catalog takes them.
fn model() -> impl Iterator<Item = ModelChange> {
    (0..SERVICES).flat_map(|i| {
        let mut s = bulk_service(i);
        for p in &mut s.ports {
            p.name = Some(PORT_NAME.into());
        }
        let svc = ModelChange::PutService(format!("/bench/svc/{i}"), s);
        let pods = (0..PODS_PER_SERVICE).map(move |k| {
            ModelChange::PutPod(format!("/bench/pod/{i}/{k}"), bulk_pod(i, k, "bench"))
        });
        std::iter::once(svc).chain(pods)
    })
}

/// Fills a zone from [`model`]; prints its size and the resident memory it added.
fn load_zone(settings: &DnsSettings) -> (Arc<Zone>, Catalog) {
    let before = vm_rss_kb();
    let t = Instant::now();
    let zone = settings.new_zone();
    let mut catalog = Catalog::new(zone.clone(), settings.domain.clone(), settings.dns_ip);
    for c in model() {
        catalog.change(c);
    }
    zone.set_ready();
    let extra_mb = vm_rss_kb().saturating_sub(before) as f64 / 1024.0;
    let names = zone.len();
    println!(
        "memory: {names} names ({} records) loaded in {:.2} s; VmRSS +{extra_mb:.1} MiB \
         ({:.1} MiB per 100,000 names; target <= 100 MB extra for 100,000 names)",
        zone.records().len(),
        t.elapsed().as_secs_f64(),
        extra_mb * 100_000.0 / names as f64,
    );
    // The zone alone, without the catalog's copies of the model: a second zone made from the
    // first one's records.
    let records = zone.records();
    let before = vm_rss_kb();
    let copy = Zone::new(
        zone.apexes()
            .iter()
            .map(|a| Name::from(a.clone()))
            .collect(),
    );
    for (n, d) in records {
        copy.add(&n, d, Origin::Service);
    }
    let zone_mb = vm_rss_kb().saturating_sub(before) as f64 / 1024.0;
    println!(
        "memory: the zone alone (a copy made from its records) +{zone_mb:.1} MiB; the rest is \
         the catalog (model objects, each owner's contribution)"
    );
    drop(copy);
    (zone, catalog)
}

fn fqdn(n: &LowerName) -> String {
    Name::from(n.clone()).to_ascii()
}

/// The zone's records as master-file lines, by apex (the zones NSD loads).
fn zone_files(zone: &Zone, s: &DnsSettings) -> BTreeMap<String, String> {
    let mut apexes: Vec<String> = zone.apexes().iter().map(fqdn).collect();
    apexes.dedup();
    let ns = format!("ns.dns.{}", s.domain.to_ascii());
    let mut files: BTreeMap<String, String> = apexes
        .iter()
        .map(|a| {
            let head = format!(
                "$TTL {ttl}\n{a} IN SOA {ns} hostmaster.{d} 1 7200 1800 86400 {ttl}\n{a} IN NS {ns}\n",
                ttl = s.ttl,
                d = s.domain.to_ascii()
            );
            (a.clone(), head)
        })
        .collect();
    for (owner, data) in zone.records() {
        let Some(apex) = zone.apex_of(&owner).map(fqdn) else {
            continue;
        };
        let Some(f) = files.get_mut(&apex) else {
            continue;
        };
        let (t, rdata) = master_rdata(&data);
        let _ = writeln!(f, "{} IN {t} {rdata}", fqdn(&owner));
    }
    files
}

/// A record's type and data as a master file writes them.
fn master_rdata(d: &Rdata) -> (&'static str, String) {
    match d {
        Rdata::A(a) => ("A", a.to_string()),
        Rdata::Aaaa(a) => ("AAAA", a.to_string()),
        Rdata::Ptr(t) => ("PTR", t.to_ascii()),
        Rdata::Srv {
            priority,
            weight,
            port,
            target,
        } => (
            "SRV",
            format!("{priority} {weight} {port} {}", target.to_ascii()),
        ),
    }
}

fn start_nsd(lab: &Lab, zone: &Zone, s: &DnsSettings, workers: usize) -> Result<Daemon> {
    let dir = lab.dir.join("nsd");
    std::fs::create_dir_all(&dir)?;
    let d = dir.display();
    let mut conf = format!(
        "server:\n  ip-address: {NSD_IP}\n  port: 53\n  server-count: {workers}\n  reuseport: yes\n  \
         do-ip6: no\n  username: \"\"\n  chroot: \"\"\n  zonesdir: \"{d}\"\n  database: \"\"\n  \
         zonelistfile: \"{d}/zone.list\"\n  xfrdfile: \"{d}/xfrd.state\"\n  xfrdir: \"{d}\"\n  \
         pidfile: \"{d}/nsd.pid\"\n  logfile: \"{d}/nsd.log\"\n  verbosity: 0\n  hide-version: yes\n  \
         rrl-ratelimit: 0\n  rrl-whitelist-ratelimit: 0\nremote-control:\n  control-enable: no\n"
    );
    for (i, (apex, text)) in zone_files(zone, s).into_iter().enumerate() {
        let file = dir.join(format!("zone{i}"));
        std::fs::write(&file, text)?;
        let _ = write!(
            conf,
            "zone:\n  name: \"{apex}\"\n  zonefile: \"{}\"\n",
            file.display()
        );
    }
    let conf_path = dir.join("nsd.conf");
    std::fs::write(&conf_path, conf)?;
    let mut cmd = Command::new("nsd");
    cmd.arg("-d").arg("-c").arg(&conf_path);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Ok(Daemon(spawn_in_netns(&lab.infra, cmd)?))
}

fn start_dnsmasq(lab: &Lab, zone: &Zone) -> Result<Daemon> {
    let dir = lab.dir.join("dnsmasq");
    std::fs::create_dir_all(&dir)?;
    let mut hosts = String::new();
    let mut conf = String::new();
    for (owner, data) in zone.records() {
        let o = fqdn(&owner);
        let o = o.trim_end_matches('.');
        let _ = match (master_rdata(&data), &data) {
            ((_, a), Rdata::A(_)) => writeln!(hosts, "{a} {o}"),
            (("SRV", srv), _) => {
                // Master-file order is priority weight port target; dnsmasq wants
                // target,port,priority,weight.
                let f: Vec<&str> = srv.split(' ').collect();
                let target = f[3].trim_end_matches('.');
                writeln!(conf, "srv-host={o},{target},{},{},{}", f[2], f[0], f[1])
            }
            // PTRs: dnsmasq derives them from the hosts file.
            _ => Ok(()),
        };
    }
    let (hosts_path, conf_path) = (dir.join("hosts"), dir.join("dnsmasq.conf"));
    std::fs::write(&hosts_path, hosts)?;
    std::fs::write(&conf_path, conf)?;
    let mut cmd = Command::new("dnsmasq");
    cmd.args([
        "--no-daemon",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--user=root",
    ])
    .arg("--pid-file=")
    .arg(format!("--addn-hosts={}", hosts_path.display()))
    .arg(format!("--conf-file={}", conf_path.display()))
    .arg(format!("--listen-address={DNSMASQ_IP}"));
    for apex in zone.apexes() {
        let a = fqdn(apex);
        cmd.arg(format!("--local=/{}/", a.trim_end_matches('.')));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Ok(Daemon(spawn_in_netns(&lab.infra, cmd)?))
}

fn start_tartan(
    lab: &Lab,
    zone: &Arc<Zone>,
    s: &DnsSettings,
    kind: Kind,
) -> Result<(DnsServer, usize)> {
    let metrics = tartan::metrics::Metrics::new();
    let (zone, auth, mut cfg) = (zone.clone(), s.authority(), s.server_config());
    if kind == Kind::TartanReuseport {
        cfg.udp_sockets = UdpSockets::PerWorker;
        cfg.listen = vec![SocketAddr::from((TARTAN_RP_IP, s.port))];
    }
    let workers = cfg.udp_threads;
    // The sockets are made on a thread inside the namespace, so they belong to it.
    let server = in_netns(&lab.infra, move || {
        tartan::dns::server::start(zone, auth, cfg, metrics.dns.clone())
    })??;
    Ok((server, workers))
}

/// One UDP question from the calling thread's namespace: the rcode and the answer data.
fn ask(server: Ipv4Addr, name: &str, qtype: RecordType) -> Result<(ResponseCode, Vec<String>)> {
    let mut m = Message::query();
    m.metadata.id = rand::random();
    m.add_query(Query::query(Name::from_ascii(name)?, qtype));
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    sock.send_to(&m.to_vec()?, SocketAddr::from((server, 53)))?;
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf)?;
    let r = Message::from_vec(&buf[..n])?;
    let data = r
        .answers
        .iter()
        .map(|a| match &a.data {
            RData::A(x) => x.0.to_string(),
            RData::SRV(x) => format!("{} {}", x.port, x.target.to_ascii()),
            other => format!("{other:?}"),
        })
        .collect();
    Ok((r.metadata.response_code, data))
}

/// Waits until `kind` answers, then checks it gives the same answers as the model says.
fn check_answers(client: &str, kind: Kind) -> Result<()> {
    let addr = kind.addr();
    let svc0 = "s0.bench.svc.cluster.local.";
    let pod = bulk_pod(7, 3, "bench");
    let pod_name = format!("{}.bench.pod.cluster.local.", dashed(pod.ip));
    let probes: Vec<(String, RecordType, ResponseCode, Vec<String>)> = vec![
        (
            svc0.into(),
            RecordType::A,
            ResponseCode::NoError,
            vec![bulk_service(0).cluster_ip.to_string()],
        ),
        (
            format!("_{PORT_NAME}._tcp.s0.bench.svc.cluster.local."),
            RecordType::SRV,
            ResponseCode::NoError,
            vec![format!("80 {svc0}")],
        ),
        (
            pod_name,
            RecordType::A,
            ResponseCode::NoError,
            vec![pod.ip.to_string()],
        ),
        (
            "nx-s0.bench.svc.cluster.local.".into(),
            RecordType::A,
            ResponseCode::NXDomain,
            vec![],
        ),
    ];
    let first = probes[0].clone();
    wait_for(
        &format!("{} to answer", kind.name()),
        Duration::from_secs(60),
        || {
            let (n, t) = (first.0.clone(), first.1);
            in_netns(client, move || ask(addr, &n, t).ok())
                .ok()
                .flatten()
        },
    )?;
    for (name, t, rcode, want) in probes {
        let n = name.clone();
        let (got_rcode, got) = in_netns(client, move || ask(addr, &n, t))??;
        if got_rcode != rcode || got != want {
            bail!(
                "{} answers {name} {t}: {got_rcode} {got:?}, expected {rcode} {want:?}",
                kind.name()
            );
        }
    }
    Ok(())
}

/// The query files: in-zone A (services and pods alternating), SRV, and A with every fifth
/// name absent (20 % NXDOMAIN).
fn query_files(dir: &Path) -> Result<Vec<(&'static str, PathBuf)>> {
    let svc = |i: u32| format!("s{i}.bench.svc.cluster.local A\n");
    let pod = |i: u32| {
        let ip = bulk_pod(i, i % PODS_PER_SERVICE, "bench").ip;
        format!("{}.bench.pod.cluster.local A\n", dashed(ip))
    };
    let (mut a, mut srv, mut mix) = (String::new(), String::new(), String::new());
    for i in 0..SERVICES {
        a.push_str(&svc(i));
        a.push_str(&pod(i));
        let _ = writeln!(srv, "_{PORT_NAME}._tcp.s{i}.bench.svc.cluster.local SRV");
        // Blocks of five: two services, two pods, one name that does not exist.
        if i % 2 == 0 {
            mix.push_str(&svc(i));
            mix.push_str(&pod(i));
        } else {
            mix.push_str(&svc(i));
            mix.push_str(&pod(i));
            let _ = writeln!(mix, "nx-s{i}.bench.svc.cluster.local A");
        }
    }
    let mut out = Vec::new();
    for (label, text) in [("A", a), ("SRV", srv), ("mix 20% NX", mix)] {
        let p = dir.join(format!(
            "queries-{}",
            label.split_whitespace().next().unwrap_or("q")
        ));
        std::fs::write(&p, text)?;
        out.push((label, p));
    }
    Ok(out)
}

/// What one dnsperf run reported.
#[derive(Debug, Default, Clone)]
struct Run {
    qps: f64,
    lost_pct: f64,
    nxdomain_pct: f64,
    /// Per-query latencies in µs (verbose runs only), sorted.
    lat_us: Vec<f64>,
}

fn dnsperf_args(server: Ipv4Addr, file: &Path, secs: u32, rate: Option<u32>) -> Vec<String> {
    let mut a: Vec<String> = ["-s", &server.to_string(), "-d"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.push(file.display().to_string());
    for x in ["-c", "2", "-q", "200", "-l", &secs.to_string()] {
        a.push(x.to_string());
    }
    if let Some(r) = rate {
        a.extend(["-Q".to_string(), r.to_string(), "-v".to_string()]);
    }
    a
}

fn dnsperf(client: &str, args: &[String]) -> Result<Run> {
    let mut cmd = Command::new("dnsperf");
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = spawn_in_netns(client, cmd)?
        .wait_with_output()
        .context("waiting for dnsperf")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "dnsperf {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_dnsperf(&text)
        .with_context(|| format!("reading the output of dnsperf {}", args.join(" ")))
}

fn parse_dnsperf(text: &str) -> Result<Run> {
    let field = |key: &str| -> Option<&str> {
        text.lines()
            .find_map(|l| l.trim_start().strip_prefix(key))
            .map(str::trim)
    };
    let pct_in = |s: &str| -> f64 {
        s.split('(')
            .nth(1)
            .and_then(|r| r.split('%').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let qps: f64 = field("Queries per second:")
        .and_then(|v| v.parse().ok())
        .context("no 'Queries per second'")?;
    let lost_pct = field("Queries lost:").map_or(f64::NAN, pct_in);
    let nxdomain_pct = field("Response codes:")
        .and_then(|codes| codes.split(", ").find(|c| c.starts_with("NXDOMAIN")))
        .map_or(0.0, pct_in);
    let mut lat_us: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(|s| s * 1e6)
        .collect();
    lat_us.sort_by(f64::total_cmp);
    Ok(Run {
        qps,
        lost_pct,
        nxdomain_pct,
        lat_us,
    })
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 50.0)
}

#[derive(Default)]
struct Cell {
    qps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    /// Every fixed-rate latency of every round (µs): the tail over all of them.
    all_lat: Option<hdrhistogram::Histogram<u64>>,
    lost: Vec<f64>,
    nx: Vec<f64>,
}

fn report(results: &BTreeMap<(usize, Kind), Cell>, sets: &[(&str, PathBuf)], cfg: &Config) {
    println!(
        "\nmedians of {} rounds ({} s per run; latency at {} qps):",
        cfg.rounds, cfg.secs, cfg.rate
    );
    println!(
        "| queries | server | QPS at saturation (min–max) | p50 µs | p99 µs | p99 µs, all rounds | lost % (sat.) | NXDOMAIN % |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (si, (label, _)) in sets.iter().enumerate() {
        for ((i, kind), c) in results.iter().filter(|((i, _), _)| *i == si) {
            let _ = i;
            let (lo, hi) = c
                .qps
                .iter()
                .fold((f64::MAX, 0.0f64), |(lo, hi), q| (lo.min(*q), hi.max(*q)));
            println!(
                "| {label} | {} | {:.0} ({lo:.0}–{hi:.0}) | {:.0} | {:.0} | {:.0} | {:.2} | {:.1} |",
                kind.name(),
                median(&c.qps),
                median(&c.p50),
                median(&c.p99),
                pooled_p99(c),
                median(&c.lost),
                median(&c.nx),
            );
        }
    }
    for tartan in [Kind::Tartan, Kind::TartanReuseport] {
        println!(
            "\n{} / NSD (medians; p99 also over all rounds' latencies):",
            tartan.name()
        );
        for (si, (label, _)) in sets.iter().enumerate() {
            let (Some(t), Some(n)) = (results.get(&(si, tartan)), results.get(&(si, Kind::Nsd)))
            else {
                continue;
            };
            println!(
                "  {label}: QPS {:.2}x, p50 {:.2}x, p99 {:.2}x, p99 all rounds {:.2}x",
                median(&t.qps) / median(&n.qps),
                median(&t.p50) / median(&n.p50),
                median(&t.p99) / median(&n.p99),
                pooled_p99(t) / pooled_p99(n),
            );
        }
    }
}

/// The 99th percentile of every fixed-rate latency of every round together.
fn pooled_p99(c: &Cell) -> f64 {
    c.all_lat
        .as_ref()
        .map_or(f64::NAN, |h| h.value_at_quantile(0.99) as f64)
}

fn main() -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    for tool in ["nsd", "dnsmasq", "dnsperf"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map_or(true, |s| !s.success())
        {
            bail!(
                "{tool} is missing: `make deps` installs it (Debian packages nsd, dnsmasq-base, dnsperf)"
            );
        }
    }
    let sections = Sections::from_args();
    let kinds: Vec<Kind> = [
        Kind::Tartan,
        Kind::TartanReuseport,
        Kind::Nsd,
        Kind::Dnsmasq,
    ]
    .into_iter()
    .filter(|k| sections.want(k.name()))
    .collect();
    let cfg = Config::from_env();
    let s = settings()?;
    let (zone, _catalog) = load_zone(&s);

    let lab = Lab::new(1, bins())?;
    tartan::lab::cleanup_on_signal(&lab.id)?;
    for k in &kinds {
        ip(&[
            "-n",
            &lab.infra,
            "addr",
            "add",
            &format!("{}/24", k.addr()),
            "dev",
            "br0",
        ])?;
    }
    let client = lab.nodes[0].ns.clone();
    let mut _tartan = Vec::new();
    let mut daemons = Vec::new();
    for k in &kinds {
        match k {
            Kind::Tartan | Kind::TartanReuseport => {
                let (server, workers) = start_tartan(&lab, &zone, &s, *k)?;
                println!("{}: {workers} UDP workers", k.name());
                _tartan.push(server);
            }
            Kind::Nsd => {
                let workers = s.server_config().udp_threads;
                daemons.push(start_nsd(&lab, &zone, &s, workers)?);
            }
            Kind::Dnsmasq => daemons.push(start_dnsmasq(&lab, &zone)?),
        }
    }
    for k in &kinds {
        check_answers(&client, *k).with_context(|| {
            let log = lab.dir.join("nsd/nsd.log");
            format!(
                "checking {} (nsd log: {})",
                k.name(),
                std::fs::read_to_string(log).unwrap_or_default().trim()
            )
        })?;
        println!(
            "{}: answers A, SRV, pod A and NXDOMAIN as the model says",
            k.name()
        );
    }
    let sets = query_files(&lab.dir)?;
    let rss_started = vm_rss_kb();
    println!(
        "saturation: dnsperf {}",
        dnsperf_args(Ipv4Addr::UNSPECIFIED, Path::new("FILE"), cfg.secs, None).join(" ")
    );
    println!(
        "fixed rate: dnsperf {}",
        dnsperf_args(
            Ipv4Addr::UNSPECIFIED,
            Path::new("FILE"),
            cfg.secs,
            Some(cfg.rate)
        )
        .join(" ")
    );
    let mut results: BTreeMap<(usize, Kind), Cell> = BTreeMap::new();
    for round in 0..cfg.rounds {
        let mut order = kinds.clone();
        order.rotate_left(round % kinds.len().max(1));
        // Other work on the machine (builds) takes the cores the servers and dnsperf share.
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
        for (si, (label, file)) in sets.iter().enumerate() {
            for k in &order {
                let sat = dnsperf(&client, &dnsperf_args(k.addr(), file, cfg.secs, None))?;
                let fixed = dnsperf(
                    &client,
                    &dnsperf_args(k.addr(), file, cfg.secs, Some(cfg.rate)),
                )?;
                let c = results.entry((si, *k)).or_default();
                c.qps.push(sat.qps);
                c.lost.push(sat.lost_pct);
                c.nx.push(sat.nxdomain_pct);
                c.p50.push(percentile(&fixed.lat_us, 50.0));
                c.p99.push(percentile(&fixed.lat_us, 99.0));
                let all = c.all_lat.get_or_insert_with(|| {
                    hdrhistogram::Histogram::new(3).expect("3 significant figures are valid")
                });
                for l in &fixed.lat_us {
                    all.saturating_record(l.round().max(1.0) as u64);
                }
                println!(
                    "round {} {label:>10} {:>8}: {:>7.0} qps (lost {:.2} %, NXDOMAIN {:.1} %); at {} qps: p50 {:.0} µs, p99 {:.0} µs ({} answers, {:.2} % lost)",
                    round + 1,
                    k.name(),
                    sat.qps,
                    sat.lost_pct,
                    sat.nxdomain_pct,
                    cfg.rate,
                    percentile(&fixed.lat_us, 50.0),
                    percentile(&fixed.lat_us, 99.0),
                    fixed.lat_us.len(),
                    fixed.lost_pct,
                );
            }
        }
    }
    report(&results, &sets, &cfg);
    if !_tartan.is_empty() {
        println!(
            "memory: VmRSS +{:.1} MiB over the runs (tartan's UDP answer caches fill; bounded \
             at {} entries of at most 812 bytes)",
            vm_rss_kb().saturating_sub(rss_started) as f64 / 1024.0,
            s.server_config().answer_cache,
        );
    }
    drop(daemons);
    drop(_tartan);
    drop(lab);
    Ok(())
}
