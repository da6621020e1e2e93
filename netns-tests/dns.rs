//! Cluster DNS tests: tartand's DNS on the nodes of a lab, asked as pods and nodes ask it
//! (`dig` from pod and node namespaces, busybox `nslookup` and `wget` in podman containers),
//! with real etcd and a real upstream resolver (dnsmasq) in the lab.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::podman::{Podman, start_daemons_for_podman};
use common::*;
use tartan::lab::{INFRA_IP, Lab, ns_command, ns_run, wait_for};

const NET16: &[&str] = &["--network", "10.244.0.0/16"];
/// The cluster DNS address: the 10th address of the default service CIDR 10.96.0.0/12.
const DNS_IP: &str = "10.96.0.10";

/// One resource record as dig prints it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Rr {
    name: String,
    ttl: u32,
    rtype: String,
    data: String,
}

/// One response, read from dig's output.
#[derive(Debug, Default)]
struct Answer {
    status: String,
    flags: BTreeSet<String>,
    answer: Vec<Rr>,
    authority: Vec<Rr>,
    additional: Vec<Rr>,
    text: String,
}

impl Answer {
    /// Parses dig's default output (`+nocmd +nostats`); an error when no response came.
    fn parse(text: &str) -> Result<Answer> {
        let mut a = Answer {
            text: text.to_string(),
            ..Answer::default()
        };
        let mut section = "";
        for line in text.lines() {
            let line = line.trim();
            if let Some(h) = line.strip_prefix(";; ->>HEADER<<-") {
                a.status = h
                    .split(',')
                    .find_map(|p| p.trim().strip_prefix("status: "))
                    .unwrap_or_default()
                    .to_string();
            } else if let Some(f) = line.strip_prefix(";; flags:") {
                let f = f.split(';').next().unwrap_or_default();
                a.flags = f.split_whitespace().map(str::to_string).collect();
            } else if let Some(s) = line.strip_prefix(";; ") {
                if let Some(name) = s.strip_suffix(" SECTION:") {
                    section = match name {
                        "ANSWER" => "answer",
                        "AUTHORITY" => "authority",
                        "ADDITIONAL" => "additional",
                        _ => "",
                    };
                }
            } else if !line.is_empty() && !line.starts_with(';') && !section.is_empty() {
                let w: Vec<&str> = line.split_whitespace().collect();
                ensure!(w.len() >= 4, "unexpected dig line {line:?}");
                let rr = Rr {
                    name: w[0].to_string(),
                    ttl: w[1].parse().with_context(|| format!("ttl in {line:?}"))?,
                    rtype: w[3].to_string(),
                    data: w[4..].join(" "),
                };
                match section {
                    "answer" => a.answer.push(rr),
                    "authority" => a.authority.push(rr),
                    _ => a.additional.push(rr),
                }
            }
        }
        ensure!(!a.status.is_empty(), "no DNS response:\n{text}");
        Ok(a)
    }

    /// The data of the answer records of type `rtype`.
    fn data(&self, rtype: &str) -> BTreeSet<String> {
        self.answer
            .iter()
            .filter(|r| r.rtype == rtype)
            .map(|r| r.data.clone())
            .collect()
    }

    /// Whether the authority section holds the SOA of `apex` (a negative answer's).
    fn soa_of(&self, apex: &str) -> bool {
        self.authority
            .iter()
            .any(|r| r.rtype == "SOA" && r.name.eq_ignore_ascii_case(apex))
    }

    fn is(&self, status: &str) -> bool {
        self.status == status
    }
}

/// Asks the cluster DNS from namespace `ns` with dig (one try, 2 s, unless `args` say
/// otherwise: dig takes the last of repeated options).
fn dig(ns: &str, args: &[&str]) -> Result<Answer> {
    let out = ns_command(ns, "dig")
        .arg(format!("@{DNS_IP}"))
        .args(["+time=2", "+tries=1", "+nocmd", "+nostats"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running dig (install bind9-dnsutils: make deps)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Answer::parse(&text).with_context(|| {
        format!(
            "dig {args:?} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

/// Asks until `ok` holds for the response or `deadline` passes; returns the response and
/// how long it took.
fn wait_answer(
    ns: &str,
    args: &[&str],
    deadline: Duration,
    ok: impl Fn(&Answer) -> bool,
) -> Result<(Answer, Duration)> {
    let start = Instant::now();
    let mut last = String::new();
    wait_for(&format!("dig {args:?} in {ns}"), deadline, || {
        match dig(ns, args) {
            Ok(a) if ok(&a) => return Some(a),
            Ok(a) => last = a.text,
            Err(e) => last = format!("{e:#}"),
        }
        None
    })
    .map(|a| (a, start.elapsed()))
    .with_context(|| format!("last response:\n{last}"))
}

fn set(items: &[String]) -> BTreeSet<String> {
    items.iter().cloned().collect()
}

/// `tartanctl service create ARGS`; the cluster IP it printed (None for a headless one).
fn create(lab: &Lab, args: &[&str]) -> Result<Option<Ipv4Addr>> {
    create_service(lab, args).map(|(ip, _)| ip)
}

/// A lab of `n` nodes with tartand on each.
fn cluster(n: usize) -> Result<Option<Lab>> {
    let Some(mut lab) = lab(n, NET16)? else {
        return Ok(None);
    };
    start_nodes(&mut lab, |_| Vec::new())?;
    Ok(Some(lab))
}

/// Starts tartand on every node of `lab` (`extra(i)` flags for node `i`) and waits for
/// their subnets.
fn start_nodes(lab: &mut Lab, extra: impl Fn(usize) -> Vec<String>) -> Result<()> {
    for i in 0..lab.nodes.len() {
        let args = extra(i);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.start_daemon(i, &args)?;
    }
    for i in 0..lab.nodes.len() {
        lab.wait_subnet(i)?;
    }
    Ok(())
}

/// `10.244.1.5` → `10-244-1-5.default.pod.cluster.local.`
fn pod_name(ip: Ipv4Addr) -> String {
    format!(
        "{}.default.pod.cluster.local.",
        tartan::dns::catalog::dashed(ip)
    )
}

/// Waits until the node's zone is loaded (in-zone names answer, not SERVFAIL).
fn wait_zone(lab: &Lab, i: usize) -> Result<()> {
    wait_answer(
        &lab.nodes[i].ns,
        &["cluster.local", "SOA"],
        Duration::from_secs(30),
        |a| a.is("NOERROR"),
    )
    .with_context(|| lab.log_tail(i, 30))
    .map(|_| ())
}

#[test]
fn services_headless_services_and_pods_by_name_from_pods_and_nodes() -> Result<()> {
    let Some(mut lab) = cluster(2)? else {
        return Ok(());
    };
    let a = lab.add_cni_pod(0, "web-a", &[("app", "web")])?;
    let b = lab.add_cni_pod(1, "web-b", &[("app", "web")])?;
    let client = lab.add_cni_pod(0, "client", &[])?;
    let vip = create(
        &lab,
        &[
            "web",
            "--port",
            "http=80:8080/tcp",
            "--port",
            "dns=53:5353/udp",
            "--selector",
            "app=web",
        ],
    )?
    .context("web has a cluster IP")?;
    let api = create(&lab, &["shop/api", "--port", "80"])?.context("api has a cluster IP")?;
    let headless = create(
        &lab,
        &[
            "hl",
            "--cluster-ip",
            "none",
            "--port",
            "http=80:8080/tcp",
            "--selector",
            "app=web",
        ],
    )?;
    ensure!(headless.is_none(), "hl got a cluster IP: {headless:?}");
    // A headless service with explicit endpoints, too many for one UDP response.
    create(&lab, &["big", "--cluster-ip", "none", "--port", "80"])?;
    let big: Vec<String> = (1..=150)
        .map(|k| format!("10.1.{}.{}", k / 100, k % 100 + 1))
        .collect();
    let mut set_args = vec!["endpoints", "set", "big"];
    for ip in &big {
        set_args.extend(["--address", ip]);
    }
    lab.tartanctl(&set_args)?;
    wait_zone(&lab, 0)?;

    let web = "web.default.svc.cluster.local.";
    let hl = "hl.default.svc.cluster.local.";
    let pods = set(&[a.ip.to_string(), b.ip.to_string()]);
    let node1 = lab.nodes[0].ns.clone();
    // Everything is in etcd; wait until node 1's DNS has it all.
    wait_answer(&node1, &[hl], Duration::from_secs(20), |r| {
        r.data("A") == pods
    })?;
    wait_answer(
        &node1,
        &["+tcp", "big.default.svc.cluster.local"],
        Duration::from_secs(20),
        |r| r.data("A").len() == big.len(),
    )?;
    for ns in [&client.ns, &node1] {
        // A of a service: its cluster IP, with authority.
        let r = dig(ns, &[web])?;
        ensure!(r.is("NOERROR") && r.flags.contains("aa"), "{}", r.text);
        ensure!(r.data("A") == set(&[vip.to_string()]), "{}", r.text);
        ensure!(r.answer.iter().all(|rr| rr.ttl <= 5), "TTL: {}", r.text);
        // Case-insensitive, the question echoed as asked.
        let r = dig(ns, &["WEB.Default.SVC.cluster.LOCAL"])?;
        ensure!(r.data("A") == set(&[vip.to_string()]), "{}", r.text);
        ensure!(
            r.answer[0].name == "WEB.Default.SVC.cluster.LOCAL.",
            "owner not as asked: {}",
            r.text
        );
        // A headless service: its endpoints (pods on both nodes), and one name per pod.
        let r = dig(ns, &[hl])?;
        ensure!(r.data("A") == pods, "{}", r.text);
        let r = dig(ns, &["web-b.hl.default.svc.cluster.local"])?;
        ensure!(r.data("A") == set(&[b.ip.to_string()]), "{}", r.text);
        // SRV of the named port: the service port and name, the target's address added.
        let r = dig(ns, &["_http._tcp.web.default.svc.cluster.local", "SRV"])?;
        ensure!(
            r.data("SRV") == set(&[format!("0 100 80 {web}")]),
            "{}",
            r.text
        );
        ensure!(
            r.additional
                .iter()
                .any(|x| x.name == web && x.rtype == "A" && x.data == vip.to_string()),
            "no address of the SRV target: {}",
            r.text
        );
        let r = dig(ns, &["_dns._udp.web.default.svc.cluster.local", "SRV"])?;
        ensure!(
            r.data("SRV") == set(&[format!("0 100 53 {web}")]),
            "{}",
            r.text
        );
        // Another namespace: its own name only.
        let r = dig(ns, &["api.shop.svc.cluster.local"])?;
        ensure!(r.data("A") == set(&[api.to_string()]), "{}", r.text);
        let r = dig(ns, &["api.default.svc.cluster.local"])?;
        ensure!(r.is("NXDOMAIN"), "{}", r.text);
        // Headless SRV: one per endpoint, the target port and the pod's own name.
        let r = dig(ns, &["_http._tcp.hl.default.svc.cluster.local", "SRV"])?;
        let targets: BTreeSet<(String, String)> = r
            .data("SRV")
            .iter()
            .map(|d| {
                let w: Vec<&str> = d.split_whitespace().collect();
                (w[2].to_string(), w[3].to_string())
            })
            .collect();
        let want: BTreeSet<(String, String)> = ["web-a", "web-b"]
            .iter()
            .map(|p| ("8080".to_string(), format!("{p}.{hl}")))
            .collect();
        ensure!(targets == want, "{}", r.text);
        // A pod of node 2, and the PTR records of the cluster IP and of that pod.
        let r = dig(ns, &[&pod_name(b.ip)])?;
        ensure!(r.data("A") == set(&[b.ip.to_string()]), "{}", r.text);
        let r = dig(ns, &["-x", &vip.to_string()])?;
        ensure!(r.data("PTR") == set(&[web.to_string()]), "{}", r.text);
        let r = dig(ns, &["-x", &b.ip.to_string()])?;
        ensure!(r.data("PTR") == set(&[pod_name(b.ip)]), "{}", r.text);
        // A missing name: NXDOMAIN with the zone's SOA; an existing one without AAAA: NODATA.
        for missing in [
            "nosuch.default.svc.cluster.local",
            "x.web.default.svc.cluster.local",
        ] {
            let r = dig(ns, &[missing])?;
            ensure!(
                r.is("NXDOMAIN") && r.answer.is_empty() && r.soa_of("cluster.local."),
                "{}",
                r.text
            );
        }
        for name in [web, "svc.cluster.local", "shop.svc.cluster.local"] {
            let r = dig(ns, &[name, "AAAA"])?;
            ensure!(
                r.is("NOERROR") && r.answer.is_empty() && r.soa_of("cluster.local."),
                "NODATA expected for {name}: {}",
                r.text
            );
        }
        // A reverse name of the service range that names nothing.
        let r = dig(ns, &["-x", "10.96.255.254"])?;
        ensure!(r.is("NXDOMAIN"), "{}", r.text);
        // The apex: SOA, and NS with the server's address.
        let r = dig(ns, &["cluster.local", "NS"])?;
        ensure!(
            r.data("NS") == set(&["ns.dns.cluster.local.".to_string()])
                && r.additional.iter().any(|x| x.data == DNS_IP),
            "{}",
            r.text
        );
        // The same answers over TCP.
        for q in [
            vec![hl],
            vec!["_http._tcp.hl.default.svc.cluster.local", "SRV"],
        ] {
            let udp = dig(ns, &q)?;
            let mut tq = q.clone();
            tq.push("+tcp");
            let tcp = dig(ns, &tq)?;
            ensure!(
                set_of(&udp.answer) == set_of(&tcp.answer)
                    && set_of(&udp.additional) == set_of(&tcp.additional),
                "UDP and TCP differ:\n{}\n{}",
                udp.text,
                tcp.text
            );
        }
        // 150 addresses do not fit a UDP response: TC, and complete over TCP.
        let r = dig(ns, &["+ignore", "big.default.svc.cluster.local"])?;
        ensure!(
            r.flags.contains("tc") && r.answer.len() < big.len(),
            "{}",
            r.text
        );
        let r = dig(ns, &["+ignore", "+noedns", "big.default.svc.cluster.local"])?;
        ensure!(r.flags.contains("tc"), "{}", r.text);
        let r = dig(ns, &["+tcp", "big.default.svc.cluster.local"])?;
        ensure!(
            !r.flags.contains("tc") && r.data("A") == set(&big),
            "{}",
            r.text
        );
        // As a client does it: dig retries over TCP by itself.
        let r = dig(ns, &["big.default.svc.cluster.local"])?;
        ensure!(r.data("A") == set(&big), "{}", r.text);
        // ANY: the RFC 8482 answer over UDP, the records over TCP (dig's default for ANY).
        let r = dig(ns, &["+notcp", web, "ANY"])?;
        ensure!(
            r.data("HINFO") == set(&["\"RFC8482\" \"\"".to_string()]),
            "{}",
            r.text
        );
        let r = dig(ns, &[web, "ANY"])?;
        ensure!(r.data("A") == set(&[vip.to_string()]), "{}", r.text);
        // Outside the zone with no upstream (the lab gives its nodes none): REFUSED.
        let r = dig(ns, &["example.com"])?;
        ensure!(r.is("REFUSED"), "{}", r.text);
    }
    // tartanctl on node 1: the lookup names its source, explain the DNS and its counters.
    let node = lab.nodes[0].ns.clone();
    let ctl = lab.bins.tartanctl.to_string_lossy().into_owned();
    let out = tartan::lab::ns_run(&node, &ctl, &["dns", "lookup", "web", "--node", "node1"])?;
    ensure!(
        out.contains("NOERROR") && out.contains("from service") && out.contains(&vip.to_string()),
        "dns lookup web:\n{out}"
    );
    let out = tartan::lab::ns_run(&node, &ctl, &["dns", "lookup", "nope"])?;
    ensure!(
        out.contains("NXDOMAIN") && out.contains("authority:"),
        "dns lookup nope:\n{out}"
    );
    let out = tartan::lab::ns_run(&node, &ctl, &["dns", "lookup", &pod_name(b.ip)])?;
    ensure!(out.contains("from pod"), "dns lookup of a pod:\n{out}");
    let out = tartan::lab::ns_run(&node, &ctl, &["explain"])?;
    ensure!(
        out.contains("The cluster DNS answers at 10.96.0.10:53 for cluster.local.")
            && out.contains("NOERROR")
            && out.contains("NXDOMAIN"),
        "explain:\n{out}"
    );
    let out = lab.tartanctl(&["service", "list"])?;
    ensure!(
        out.contains("web.default.svc.cluster.local") && out.contains("None"),
        "service list:\n{out}"
    );
    Ok(())
}

fn set_of(rrs: &[Rr]) -> BTreeSet<Rr> {
    rrs.iter().cloned().collect()
}

#[test]
fn created_and_deleted_services_and_pods_are_answered_on_other_nodes() -> Result<()> {
    let Some(mut lab) = cluster(2)? else {
        return Ok(());
    };
    let deadline = Duration::from_secs(10);
    let node2 = lab.nodes[1].ns.clone();
    wait_zone(&lab, 1)?;
    let name = "live.default.svc.cluster.local";
    ensure!(dig(&node2, &[name])?.is("NXDOMAIN"));
    let vip = create(&lab, &["live", "--port", "80"])?.context("live has a cluster IP")?;
    let (_, took) = wait_answer(&node2, &[name], deadline, |r| {
        r.data("A") == set(&[vip.to_string()])
    })?;
    eprintln!("service answered on node2 {took:?} after create");
    lab.tartanctl(&["service", "delete", "live"])?;
    let (_, took) = wait_answer(&node2, &[name], deadline, |r| r.is("NXDOMAIN"))?;
    eprintln!("service NXDOMAIN on node2 {took:?} after delete");
    // A headless service gains and loses a pod of the other node; the pod's own name too.
    ensure!(
        create(
            &lab,
            &[
                "late",
                "--cluster-ip",
                "none",
                "--port",
                "80",
                "--selector",
                "app=late"
            ]
        )?
        .is_none()
    );
    let hl = "late.default.svc.cluster.local";
    let pod = lab.add_cni_pod(0, "late-a", &[("app", "late")])?;
    let ip = pod.ip.to_string();
    wait_answer(&node2, &[hl], deadline, |r| {
        r.data("A") == set(std::slice::from_ref(&ip))
    })?;
    wait_answer(&node2, &[&pod_name(pod.ip)], deadline, |r| {
        r.data("A") == set(std::slice::from_ref(&ip))
    })?;
    lab.del_cni_pod(0, "late-a", &pod)?;
    wait_answer(&node2, &[hl], deadline, |r| {
        r.data("A").is_empty() && (r.is("NXDOMAIN") || r.is("NOERROR"))
    })?;
    wait_answer(&node2, &[&pod_name(pod.ip)], deadline, |r| r.is("NXDOMAIN"))?;
    wait_answer(&node2, &["-x", &ip], deadline, |r| r.is("NXDOMAIN"))?;
    // A restarted daemon serves again on the address it left in place; `--leave` removes it.
    let vip = create(&lab, &["again", "--port", "80"])?.context("cluster IP")?;
    lab.stop_daemon(1)?;
    ensure!(dns_address_on(&lab, 1)?, "the address went with the daemon");
    lab.start_daemon(1, &[])?;
    wait_answer(
        &node2,
        &["again.default.svc.cluster.local"],
        Duration::from_secs(30),
        |r| r.data("A") == set(&[vip.to_string()]),
    )
    .with_context(|| lab.log_tail(1, 30))?;
    lab.stop_daemon(1)?;
    lab.leave(1)?;
    ensure!(
        !dns_address_on(&lab, 1)?,
        "the cluster DNS address outlived --leave"
    );
    Ok(())
}

/// Whether node `i` holds the cluster DNS address (tartand puts it on `lo`).
fn dns_address_on(lab: &Lab, i: usize) -> Result<bool> {
    let out = tartan::lab::ip(&["-n", &lab.nodes[i].ns, "-o", "-4", "addr", "show"])?;
    Ok(out.contains(&format!("inet {DNS_IP}/32")))
}

/// A process killed (and reaped) when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dnsmasq in the infra namespace on `INFRA_IP:port`, with `args` as its only source of
/// names (answers for them live 30 s); killed on drop; returns once it answers.
fn dnsmasq(lab: &Lab, port: u16, args: &[String]) -> Result<KillOnDrop> {
    let log = std::fs::File::create(lab.dir.join(format!("dnsmasq-{port}.log")))?;
    let child = ns_command(&lab.infra, "dnsmasq")
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--user=root",
            "--pid-file=",
            "--log-queries",
            "--log-facility=-",
            "--local-ttl=30",
        ])
        .arg(format!("--listen-address={INFRA_IP}"))
        .arg(format!("--port={port}"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting dnsmasq (install dnsmasq-base: make deps)")?;
    let guard = KillOnDrop(child);
    let infra = lab.infra.clone();
    let (server, port) = (format!("@{INFRA_IP}"), port.to_string());
    wait_for("dnsmasq to answer", Duration::from_secs(10), || {
        let out = ns_run(
            &infra,
            "dig",
            &[
                &server,
                "-p",
                &port,
                "+short",
                "+time=1",
                "+tries=1",
                "-c",
                "CH",
                "-t",
                "TXT",
                "version.bind",
            ],
        )
        .ok()?;
        out.contains("dnsmasq").then_some(())
    })?;
    Ok(guard)
}

/// Port on the infra address where every packet is dropped: an upstream that never answers.
const BLACK_HOLE: u16 = 5454;
/// Drops every packet to [`BLACK_HOLE`] on the infra address (an upstream that never answers).
fn black_hole(lab: &Lab) -> Result<()> {
    let script = format!(
        "table inet tartan_lab_black_hole {{ chain input {{ type filter hook input priority -10; \
         udp dport {BLACK_HOLE} drop; tcp dport {BLACK_HOLE} drop; }}; }}"
    );
    ns_run(&lab.infra, "nft", &[&script]).map(|_| ())
}

/// Port of the dnsmasq that forwards everything to the cluster DNS.
const LOOP_PORT: u16 = 5300;

#[test]
fn other_names_go_upstream_are_cached_and_a_silent_upstream_fails_fast() -> Result<()> {
    let Some(mut lab) = lab(3, NET16)? else {
        return Ok(());
    };
    // The upstreams: dnsmasq with example.test and 120 addresses for many.test (more than
    // one UDP response holds); a black hole; and a dnsmasq that sends everything back to the
    // cluster DNS of node 3 (a forwarding loop through another resolver).
    black_hole(&lab)?;
    let mut names = vec!["--address=/example.test/192.0.2.7".to_string()];
    let many: Vec<String> = (1..=120).map(|k| format!("192.0.2.{k}")).collect();
    names.extend(
        many.iter()
            .map(|ip| format!("--host-record=many.test,{ip}")),
    );
    let upstream = dnsmasq(&lab, 53, &names)?;
    let _looping = dnsmasq(&lab, LOOP_PORT, &[format!("--server={DNS_IP}")])?;
    let node3 = lab.nodes[2].ip.to_string();
    tartan::lab::ip(&["-n", &lab.infra, "route", "add", DNS_IP, "via", &node3])?;
    // Node 1 forwards to dnsmasq; node 2 to itself (refused at once) and to the black hole;
    // node 3 to the looping dnsmasq.
    start_nodes(&mut lab, |i| match i {
        0 => vec!["--dns-upstream".into(), INFRA_IP.to_string()],
        1 => vec![
            "--dns-upstream".into(),
            DNS_IP.into(),
            "--dns-upstream".into(),
            format!("{INFRA_IP}:{BLACK_HOLE}"),
        ],
        _ => vec!["--dns-upstream".into(), format!("{INFRA_IP}:{LOOP_PORT}")],
    })?;
    let vip = create(&lab, &["web", "--port", "80"])?.context("web has a cluster IP")?;
    let client = lab.add_cni_pod(0, "client", &[])?;
    let client2 = lab.add_cni_pod(1, "client2", &[])?;
    for i in 0..3 {
        wait_zone(&lab, i)?;
    }
    // Forwarded (not authoritative), over UDP and TCP, with the upstream's TTL.
    for extra in [None, Some("+tcp")] {
        let mut args = vec!["example.test"];
        args.extend(extra);
        let r = dig(&client.ns, &args)?;
        ensure!(
            r.is("NOERROR") && r.data("A") == set(&["192.0.2.7".to_string()]),
            "{}",
            r.text
        );
        ensure!(
            !r.flags.contains("aa") && r.flags.contains("ra"),
            "{}",
            r.text
        );
        ensure!(r.answer[0].ttl <= 30, "{}", r.text);
    }
    let r = dig(&lab.nodes[0].ns, &["www.example.test"])?;
    ensure!(r.data("A") == set(&["192.0.2.7".to_string()]), "{}", r.text);
    // An upstream answer too large for UDP: fetched over TCP, truncated to the client over
    // UDP, complete over TCP (and as dig asks by itself).
    let r = dig(&client.ns, &["+ignore", "many.test"])?;
    ensure!(r.flags.contains("tc"), "{}", r.text);
    for args in [vec!["+tcp", "many.test"], vec!["many.test"]] {
        let r = dig(&client.ns, &args)?;
        ensure!(r.data("A") == set(&many), "{}", r.text);
    }
    // What dnsmasq refuses comes back refused.
    let r = dig(&client.ns, &["example.org"])?;
    ensure!(r.is("REFUSED"), "{}", r.text);
    // The cache answers while the upstream is gone; a name not cached fails at once.
    drop(upstream);
    let r = dig(&client.ns, &["example.test"])?;
    ensure!(
        r.data("A") == set(&["192.0.2.7".to_string()]),
        "not cached: {}",
        r.text
    );
    let t = Instant::now();
    let r = dig(&client.ns, &["+time=5", "uncached.example.test"])?;
    ensure!(r.is("SERVFAIL"), "{}", r.text);
    ensure!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );

    // Node 2: its own address was not taken as an upstream; the black hole gives SERVFAIL
    // within the forward timeout (2 s), and in-zone names answer at once meanwhile.
    ensure!(
        lab.log_tail(1, 200).contains("forwarding loop"),
        "no word of the loop:\n{}",
        lab.log_tail(1, 40)
    );
    let mut pending = Vec::new();
    for k in 0..20 {
        let c = ns_command(&client2.ns, "dig")
            .args([
                &format!("@{DNS_IP}"),
                "+time=8",
                "+tries=1",
                "+nocmd",
                "+nostats",
                &format!("n{k}.nowhere.example"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        pending.push((Instant::now(), c));
    }
    for _ in 0..20 {
        let t = Instant::now();
        let r = dig(&client2.ns, &["web.default.svc.cluster.local"])?;
        ensure!(r.data("A") == set(&[vip.to_string()]), "{}", r.text);
        ensure!(
            t.elapsed() < Duration::from_secs(1),
            "in-zone answer took {:?} while upstream queries hang",
            t.elapsed()
        );
    }
    for (t0, c) in pending {
        let out = c.wait_with_output()?;
        let took = t0.elapsed();
        let r = Answer::parse(&String::from_utf8_lossy(&out.stdout))?;
        ensure!(r.is("SERVFAIL"), "{}", r.text);
        ensure!(took < Duration::from_secs(5), "SERVFAIL after {took:?}");
    }
    // Node 3: the loop is found at start and that upstream dropped; forwarded names are then
    // refused at once (no upstream left) and the zone answers.
    let logged = wait_for("node 3 to find the loop", Duration::from_secs(10), || {
        lab.log_tail(2, 200)
            .contains("sends cluster DNS queries back here")
            .then_some(())
    });
    logged.with_context(|| lab.log_tail(2, 40))?;
    let t = Instant::now();
    let r = dig(&lab.nodes[2].ns, &["example.test"])?;
    ensure!(
        r.is("REFUSED") && t.elapsed() < Duration::from_secs(1),
        "{:?}: {}",
        t.elapsed(),
        r.text
    );
    let r = dig(&lab.nodes[2].ns, &["web.default.svc.cluster.local"])?;
    ensure!(r.data("A") == set(&[vip.to_string()]), "{}", r.text);
    let t = Instant::now();
    let r = dig(&lab.nodes[1].ns, &["+time=8", "+tcp", "silent.example"])?;
    ensure!(r.is("SERVFAIL"), "{}", r.text);
    ensure!(
        (Duration::from_millis(1500)..Duration::from_secs(5)).contains(&t.elapsed()),
        "TCP SERVFAIL after {:?}",
        t.elapsed()
    );
    Ok(())
}

/// Runs `script` in new containers on `pm`'s node (one after another, each its own process
/// in its own rootfs `rootfs`, with `extra` flags) until the output has every one of `want`.
fn wait_script(
    pm: &Podman,
    lab: &Lab,
    rootfs: &str,
    extra: &[&str],
    script: &str,
    want: &[String],
) -> Result<String> {
    let mut last = String::new();
    let mut attempt = 0;
    wait_for(
        &format!("`{script}` in a container ({rootfs})"),
        Duration::from_secs(40),
        || {
            attempt += 1;
            let name = format!("{}-{rootfs}-{attempt}", lab.id);
            let text = pm.run_script(rootfs, &name, extra, script).ok()?;
            if want.iter().all(|w| text.contains(w.as_str())) {
                return Some(text);
            }
            last = text;
            None
        },
    )
    .with_context(|| format!("last output:\n{last}"))
}

/// The resolv.conf a pod of namespace `default` should have (what the CNI result's `dns` and
/// the kubelet say).
const CLUSTER_RESOLV_CONF: &str = "nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n";

#[test]
fn podman_containers_find_services_and_pods_by_name() -> Result<()> {
    let Some(mut lab) = lab(2, NET16)? else {
        return Ok(());
    };
    start_daemons_for_podman(&mut lab, 2, &[])?;
    let mut podmans = Vec::new();
    for i in 0..2 {
        podmans.push(Podman::new(&lab, i, &lab.nodes[i].cni_dir().join("bin"))?);
    }
    let (pm1, pm2) = (&podmans[0], &podmans[1]);
    // The server on node 2, behind the service `web`.
    let server = pm2.run_busybox(&format!("{}-srv", lab.id), "hello from node2\n", &[])?;
    let server_ip = pm2.container_ip(&server)?;
    let vip = create(&lab, &["web", "--port", "http=80:8080/tcp"])?.context("cluster IP")?;
    lab.tartanctl(&[
        "endpoints",
        "set",
        "web",
        "--address",
        &format!("{server_ip}@node2"),
    ])?;
    // Two clients on node 1: one with what podman makes of the CNI result's `dns` alone, one
    // given the settings as a bind-mounted /etc/resolv.conf (the way a runtime that writes
    // resolv.conf itself, the kubelet, hands them to a container).
    let resolv_path = lab.dir.join("cluster-resolv.conf");
    std::fs::write(&resolv_path, CLUSTER_RESOLV_CONF)?;
    let mount = format!("{}:/etc/resolv.conf:ro", resolv_path.display());
    let clients: [(&str, Vec<&str>); 2] = [("plain", vec![]), ("mounted", vec!["-v", &mount])];
    // What podman makes of the result's `dns` alone is podman's choice: podman 4.3 (CNI
    // backend) takes the nameservers and search list, adds the host's nameservers and drops
    // ndots:5. So the result's `dns` itself is checked in the plugin's unit tests, and the
    // plain client is used for lookups only when podman applied it.
    let mut use_clients = Vec::new();
    for (label, extra) in &clients {
        let resolv = pm1.run_script(
            label,
            &format!("{}-{label}-conf", lab.id),
            extra,
            "/bin/busybox cat /etc/resolv.conf",
        )?;
        eprintln!("/etc/resolv.conf in the {label} container:\n{resolv}");
        let lines: BTreeSet<&str> = resolv.lines().map(str::trim).collect();
        let applied = if *label == "mounted" {
            ensure!(
                lines == CLUSTER_RESOLV_CONF.lines().collect::<BTreeSet<_>>(),
                "the bind-mounted /etc/resolv.conf is not what the container sees:\n{resolv}"
            );
            true
        } else {
            resolv
                .lines()
                .find_map(|l| l.strip_prefix("nameserver "))
                .is_some_and(|n| n.trim() == DNS_IP)
                && lines
                    .contains("search default.svc.cluster.local svc.cluster.local cluster.local")
        };
        eprintln!(
            "{label}: podman {} the cluster DNS settings",
            if applied { "applied" } else { "did not apply" }
        );
        if applied {
            use_clients.push((*label, extra.clone()));
        }
    }
    let vip_s = vip.to_string();
    let pod2 = pod_name(server_ip);
    let pod2 = pod2.trim_end_matches('.');
    let web = "web.default.svc.cluster.local";
    for (label, extra) in &use_clients {
        // By the short name (search list), the full name, and a pod of node 2 by name; then
        // wget by name through the search list and the service's cluster IP. (Debian 12's
        // static busybox wget crashes when given -T, at start, whatever the URL: the time
        // limit comes from busybox timeout instead.)
        let mut script = String::new();
        for q in ["web", web, pod2] {
            script.push_str(&format!("/bin/busybox nslookup {q}; "));
        }
        for url in [
            "http://web/index.html",
            "http://web.default.svc.cluster.local/index.html",
        ] {
            script.push_str(&format!(
                "echo \"wget {url}: $(/bin/busybox timeout 5 /bin/busybox wget -q -O - {url})\"; "
            ));
        }
        let want = vec![
            format!("Name:\t{web}\nAddress: {vip_s}\n"),
            format!("Name:\t{pod2}\nAddress: {server_ip}\n"),
            "wget http://web/index.html: hello from node2".to_string(),
            "wget http://web.default.svc.cluster.local/index.html: hello from node2".to_string(),
        ];
        let out = wait_script(pm1, &lab, label, extra, &script, &want)?;
        eprintln!("the {label} container found web and the pod of node 2 by name:\n{out}");
    }
    // The container's own process sees its own root; check what `podman exec` sees here (on
    // a freshly debootstrapped root it was the chroot's files, not the container's).
    let exec_view = pm2
        .command(&["exec", &server, "/bin/busybox", "cat", "/www/index.html"])
        .output()?;
    eprintln!(
        "podman exec into the server container sees {}",
        if String::from_utf8_lossy(&exec_view.stdout).contains("hello from node2") {
            "the container's files"
        } else {
            "other files than the container's (its page is missing)"
        }
    );
    Ok(())
}

/// tartand's resident memory (KiB) and open file descriptors on node `i`.
fn daemon_footprint(lab: &mut Lab, i: usize) -> Result<(u64, usize)> {
    let pid = lab.nodes[i]
        .daemon
        .as_ref()
        .context("tartand is not running")?
        .id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((rss, fds))
}

/// `dnsperf` in `ns` against the cluster DNS in the background; its report on wait.
fn dnsperf_flood(ns: &str, file: &std::path::Path, args: &[&str]) -> Result<Child> {
    ns_command(ns, "dnsperf")
        .args(["-s", DNS_IP, "-d"])
        .arg(file)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting dnsperf (install dnsperf: make deps)")
}

/// "Queries completed: N" from a dnsperf report.
fn completed(report: &str) -> Option<u64> {
    report
        .lines()
        .find_map(|l| l.trim().strip_prefix("Queries completed:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

#[test]
fn a_query_flood_starves_neither_the_zone_nor_the_proxy_nor_the_overlay() -> Result<()> {
    let Some(mut lab) = lab(3, NET16)? else {
        return Ok(());
    };
    // Node 1 forwards to an upstream that never answers; nodes 1 and 2 run, node 3 joins
    // during the flood.
    black_hole(&lab)?;
    let silent = format!("{INFRA_IP}:{BLACK_HOLE}");
    for i in 0..2 {
        lab.start_daemon(i, &["--dns-upstream", &silent])?;
    }
    for i in 0..2 {
        lab.wait_subnet(i)?;
    }
    let vip = create(&lab, &["web", "--port", "80"])?.context("web has a cluster IP")?;
    let client = lab.add_cni_pod(0, "client", &[])?;
    wait_zone(&lab, 0)?;
    let (rss0, fds0) = daemon_footprint(&mut lab, 0)?;

    // Two floods from node 1's own namespace, 25 s each: 50,000 distinct names that go
    // upstream (far more than the 1,024 questions allowed in flight and the 4,096-query
    // queue), and the zone's names as fast as dnsperf sends them.
    let mut upstream_names = String::new();
    for k in 0..50_000 {
        upstream_names.push_str(&format!("f{k}.flood.example A\n"));
    }
    let upstream_file = lab.dir.join("flood-upstream");
    std::fs::write(&upstream_file, upstream_names)?;
    let zone_file = lab.dir.join("flood-zone");
    std::fs::write(
        &zone_file,
        "web.default.svc.cluster.local A\ncluster.local SOA\nnx.default.svc.cluster.local A\n",
    )?;
    let node1 = lab.nodes[0].ns.clone();
    let flood_up = dnsperf_flood(
        &node1,
        &upstream_file,
        &["-c", "4", "-q", "10000", "-t", "1", "-l", "25"],
    )?;
    let flood_zone = dnsperf_flood(&node1, &zone_file, &["-c", "2", "-q", "500", "-l", "25"])?;
    let flood_start = Instant::now();
    std::thread::sleep(Duration::from_secs(3)); // let the floods reach their peak

    // During the flood: zone answers keep coming (dig retries what the full socket drops).
    for _ in 0..5 {
        wait_answer(
            &client.ns,
            &["+time=1", "+tries=3", "web.default.svc.cluster.local"],
            Duration::from_secs(10),
            |a| a.data("A") == set(&[vip.to_string()]),
        )?;
    }
    // The proxy loop programs a new service with a backend on node 2, reached from node 1.
    let backend = lab.add_cni_pod(1, "late1", &[("app", "late")])?;
    echo_server(&backend.ns, 9000)?;
    let late = create(&lab, &["late", "--port", "9000", "--selector", "app=late"])?
        .context("late has a cluster IP")?;
    wait_tcp_echo(&client.ns, late, 9000, Duration::from_secs(30))?;
    // The catalog answers the new name.
    wait_answer(
        &client.ns,
        &["+time=1", "+tries=3", "late.default.svc.cluster.local"],
        Duration::from_secs(10),
        |a| a.data("A") == set(&[late.to_string()]),
    )?;
    // The overlay loop adds a node that joins now.
    lab.start_daemon(2, &["--dns-upstream", &silent])?;
    let subnet3 = lab.wait_subnet(2)?;
    let needle = format!("{subnet3} via");
    wait_for(
        "node 1 to route to node 3's subnet",
        Duration::from_secs(30),
        || {
            let r = tartan::lab::ip(&["-n", &node1, "route", "show", "proto", "157"]).ok()?;
            r.contains(&needle).then_some(())
        },
    )?;
    let during = flood_start.elapsed();
    // Under the flood: one socket per question in flight upstream, at most 1,024 of them.
    let (_, fds_flood) = daemon_footprint(&mut lab, 0)?;
    ensure!(
        fds_flood <= fds0 + 1024 + 64,
        "tartand holds {fds_flood} descriptors under the flood (from {fds0}): more than the in-flight limit"
    );

    let up = flood_up.wait_with_output()?;
    let zone = flood_zone.wait_with_output()?;
    let (up, zone) = (
        String::from_utf8_lossy(&up.stdout).into_owned(),
        String::from_utf8_lossy(&zone.stdout).into_owned(),
    );
    ensure!(
        during < Duration::from_secs(25),
        "the checks took {during:?}, longer than the flood; they did not run under it"
    );
    // The zone flood was answered (thousands per second), the upstream flood was refused
    // fast (SERVFAIL from the full queue) rather than piling up.
    let answered = completed(&zone).context("no dnsperf report for the zone flood")?;
    ensure!(
        answered > 25_000,
        "zone flood: only {answered} answered:\n{zone}"
    );
    ensure!(
        completed(&up).unwrap_or(0) > 0 && up.contains("SERVFAIL"),
        "upstream flood:\n{up}"
    );
    let overload = metric(&node1, "tartan_dns_overload_total").unwrap_or(0.0);
    ensure!(overload > 0.0, "the queue limits were never reached");
    // Bounded: memory and descriptors, and a log line per 10 s, not per query.
    let (rss, _) = daemon_footprint(&mut lab, 0)?;
    ensure!(
        rss < rss0 + 100 * 1024,
        "tartand grew from {rss0} KiB to {rss} KiB under the flood"
    );
    // The upstream sockets close when their questions time out (2 s each).
    let mut fds = 0;
    wait_for(
        "tartand's descriptors to go back down",
        Duration::from_secs(15),
        || {
            fds = daemon_footprint(&mut lab, 0).ok()?.1;
            (fds < fds0 + 32).then_some(())
        },
    )
    .with_context(|| format!("tartand went from {fds0} to {fds} open descriptors"))?;
    let log = lab.log_tail(0, 2000);
    let lines = log
        .lines()
        .filter(|l| l.contains("SERVFAIL") && l.contains("WARN"))
        .count();
    ensure!(
        (1..=12).contains(&lines),
        "{lines} overload warnings in the log (want a few, rate-limited):\n{}",
        lab.log_tail(0, 40)
    );
    // Afterwards everything answers at once again.
    let r = dig(&client.ns, &["web.default.svc.cluster.local"])?;
    ensure!(r.data("A") == set(&[vip.to_string()]), "{}", r.text);
    Ok(())
}

#[test]
fn dual_stack_pods_and_headless_services_answer_aaaa_and_ip6_arpa_on_every_node() -> Result<()> {
    let Some(mut lab) = lab(2, NET16)? else {
        return Ok(());
    };
    lab.make_dual_stack()?;
    start_nodes(&mut lab, |_| Vec::new())?;
    let a = lab.add_cni_pod(0, "db-a", &[("app", "db")])?;
    let b = lab.add_cni_pod(1, "db-b", &[("app", "db")])?;
    let (a6, b6) = (
        a.ip6.context("pod a has IPv6")?,
        b.ip6.context("pod b has IPv6")?,
    );
    create(
        &lab,
        &[
            "db",
            "--cluster-ip",
            "none",
            "--port",
            "pg=5432/tcp",
            "--selector",
            "app=db",
            "--ip-family-policy",
            "PreferDualStack",
        ],
    )?;
    let hl = "db.default.svc.cluster.local.";
    let want6 = set(&[a6.to_string(), b6.to_string()]);
    let want4 = set(&[a.ip.to_string(), b.ip.to_string()]);
    for i in 0..2 {
        wait_zone(&lab, i)?;
        wait_answer(
            &lab.nodes[i].ns,
            &[hl, "AAAA"],
            Duration::from_secs(20),
            |r| r.data("AAAA") == want6,
        )
        .with_context(|| lab.log_tail(i, 30))?;
    }
    // From a pod on each node: both families of the headless name, the per-pod name, the
    // pod's own IPv6 name and its ip6.arpa PTR.
    let b_name6 = format!(
        "{}.default.pod.cluster.local.",
        b6.to_string().replace(':', "-")
    );
    for ns in [&a.ns, &b.ns] {
        let r = dig(ns, &[hl, "A"])?;
        ensure!(r.data("A") == want4, "{}", r.text);
        let r = dig(ns, &[hl, "AAAA"])?;
        ensure!(r.is("NOERROR") && r.flags.contains("aa"), "{}", r.text);
        ensure!(r.data("AAAA") == want6, "{}", r.text);
        let r = dig(ns, &["db-b.db.default.svc.cluster.local", "AAAA"])?;
        ensure!(r.data("AAAA") == set(&[b6.to_string()]), "{}", r.text);
        let r = dig(ns, &[&b_name6, "AAAA"])?;
        ensure!(r.data("AAAA") == set(&[b6.to_string()]), "{}", r.text);
        let r = dig(ns, &["-x", &b6.to_string()])?;
        ensure!(
            r.data("PTR") == set(std::slice::from_ref(&b_name6)),
            "{}",
            r.text
        );
        // An unused address of the pod network: ours, so NXDOMAIN with our SOA.
        let r = dig(ns, &["-x", "fd00:10:244:ff::99"])?;
        ensure!(r.is("NXDOMAIN") && r.flags.contains("aa"), "{}", r.text);
        let r = dig(ns, &["_pg._tcp.db.default.svc.cluster.local", "SRV"])?;
        ensure!(
            r.additional
                .iter()
                .any(|x| x.rtype == "AAAA" && x.data == b6.to_string()),
            "no AAAA of the SRV targets: {}",
            r.text
        );
    }
    // A pod going away takes its names of both families with it, on both nodes.
    lab.del_cni_pod(1, "db-b", &b)?;
    for i in 0..2 {
        wait_answer(
            &lab.nodes[i].ns,
            &[hl, "AAAA"],
            Duration::from_secs(20),
            |r| r.data("AAAA") == set(&[a6.to_string()]),
        )?;
        let r = dig(&lab.nodes[i].ns, &["-x", &b6.to_string()])?;
        ensure!(r.is("NXDOMAIN"), "{}", r.text);
    }
    Ok(())
}
