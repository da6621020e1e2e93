//! Service proxy benchmarks (need root; everything in namespaces):
//!
//! - `full_sync`: 10,000 (and 30,000) services × 5 endpoints in etcd → kernel: wall time and
//!   peak memory of the daemon and the processes it starts;
//! - `endpoint_change`: one endpoint added or removed with 10,000 services present: etcd put →
//!   kernel element change (observed through nftables netlink notifications);
//! - `create_to_reachable`: `service create` → a pod on every node of a 5-node cluster connects;
//! - `first_packet`: new-connection latency through a cluster IP with 1, 10,000 and 30,000
//!   services, beside an iptables-style linear chain of the same size, interleaved;
//! - `spread`: 10,000 new connections over 2, 3, 10 and 100 endpoints;
//! - `pod_registration`: 200 labelled pods ADDed one by one through the real `tartan-cni` on
//!   one node of a 5-node cluster, a service selecting them: ADD start → the pod's address is
//!   in the service table of every node (seen in nftables notifications), every other pod
//!   with one core kept busy by a spinning thread (interleaved, so both halves see the same
//!   table sizes and rebuilds).
//! - `big_service`: one service growing 1 → 10,000 endpoints (etcd writes done → every slot in
//!   the kernel), another service's changes meanwhile, one endpoint change in the big service
//!   (p99 of 200), and the table's chains and `nft list table` size before, during and after.
//!
//! Run: `cargo bench --bench service_scale [-- NAME...]`. Results: docs/benchmarks.md.

mod common;

use common::*;
use tartan::store::keys::pod_key;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tartan::lab::{Lab, block_on_in_netns, in_netns, require_root, wait_for};
use tartan::model::pod::PodRecord;
use tartan::netbench::service_bed::{
    NatKind, ServiceBed, bulk_pod, bulk_service, first_connections, load_bulk_services, txn_batches,
};
use tartan::proxy::rules::Balancing;
use tartan::store::etcd::{EtcdArgs, Store};

fn etcd_args() -> EtcdArgs {
    EtcdArgs::for_endpoints(&["http://127.0.0.1:2379"])
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((p / 100.0) * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1)]
}

fn sorted_us(v: &[Duration]) -> Vec<f64> {
    let mut v: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    v.sort_by(f64::total_cmp);
    v
}

fn metric(ns: &str, name: &str) -> Option<f64> {
    let name = name.to_string();
    in_netns(ns, move || -> Option<f64> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9402").ok()?;
        write!(s, "GET /metrics HTTP/1.0\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.lines()
            .find(|l| l.starts_with(&format!("{name} ")))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    })
    .ok()
    .flatten()
}

/// Starts a daemon on a lab whose etcd already holds the services; returns the lab for more.
fn full_sync(services: u32) -> Result<Lab> {
    println!("full_sync: {services} services x 5 endpoints");
    let mut lab = Lab::new(1, bins())?;
    lab.start_etcd()?;
    lab.init_network(&["--network", "10.244.0.0/16"])?;
    load_bulk_services(&lab, services)?;
    wait_quiet();
    let t = Instant::now();
    lab.start_daemon(0, &[])?;
    let log = lab.nodes[0].log_file();
    let line = wait_for("full sync", Duration::from_secs(30), || {
        let l = std::fs::read_to_string(&log).ok()?;
        l.lines()
            .find(|x| x.contains("service table fully synced"))
            .map(str::to_string)
    })?;
    let wall = t.elapsed();
    let sync_ms: f64 = line
        .split("elapsed_ms=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    let ns = lab.nodes[0].ns.clone();
    let own = metric(&ns, "tartan_peak_rss_bytes").unwrap_or(f64::NAN) / 1e6;
    // The processes the daemon starts are `nft -f` with the table structure (elements go over
    // netlink). Replay that exact script under /usr/bin/time for its peak (fork-time rusage of
    // children would only report the daemon's own size again).
    let kids = nft_script_peak_mb(&ns)?;
    println!(
        "  daemon start -> table in force: {:.3} s wall (sync itself {:.0} ms after the etcd listing)",
        wall.as_secs_f64(),
        sync_ms
    );
    println!(
        "  peak memory: daemon {own:.1} MB + its nft process {kids:.1} MB = {:.1} MB",
        own + kids
    );
    Ok(lab)
}

fn nft_script_peak_mb(ns: &str) -> Result<f64> {
    let ctx = tartan::proxy::rules::NodeContext {
        node: "node1".into(),
        family: tartan::proxy::rules::Family::V4,
        cluster_network: "10.244.0.0/16".parse()?,
        service_cidr: "10.96.0.0/12".parse()?,
        balancing: Balancing::RoundRobin,
    };
    let st = tartan::proxy::rules::Structure::default();
    let path = std::env::temp_dir().join(format!("tartan-bench-{}.nft", std::process::id()));
    std::fs::write(
        &path,
        tartan::proxy::rules::build_script("tartan_bench_probe", &ctx, &st),
    )?;
    let out = tartan::lab::ns_command(ns, "/usr/bin/time")
        .args(["-f", "%M", "nft", "-f", &path.to_string_lossy()])
        .output()?;
    let _ = std::fs::remove_file(&path);
    let _ = tartan::lab::ns_run(ns, "nft", &["delete", "table", "ip", "tartan_bench_probe"]);
    let kb: f64 = String::from_utf8_lossy(&out.stderr)
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .context("reading /usr/bin/time output")?;
    Ok(kb / 1024.0)
}

/// Subscribes to nftables change notifications in `ns` and hands each message, with its
/// arrival time, to `on_message` (on the listener's thread); returns once subscribed. With
/// `stop`, the socket closes once it is set (a subscribed socket makes the kernel build a
/// notification per element change, which slows big batches down).
fn nft_notifications<F>(ns: &str, stop: Option<Arc<AtomicBool>>, mut on_message: F) -> Result<()>
where
    F: FnMut(&[u8], Instant) + Send + 'static,
{
    let ns = ns.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = in_netns(&ns, move || {
            let mut s = match netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            // NFNLGRP_NFTABLES = 7.
            if let Err(e) = s.bind(&netlink_sys::SocketAddr::new(0, 1 << 6)) {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
            let _ = s.set_rx_buf_sz(8 * 1024 * 1024);
            if stop.is_some()
                && let Err(e) = s.set_non_blocking(true)
            {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
            let _ = tx.send(Ok(()));
            let mut buf = vec![0u8; 1 << 17];
            while !stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
                let mut b = &mut buf[..];
                let Ok(n) = s.recv(&mut b, 0) else {
                    if stop.is_some() {
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    continue;
                };
                on_message(&buf[..n], Instant::now());
            }
        });
    });
    rx.recv_timeout(Duration::from_secs(5))?
        .map_err(anyhow::Error::msg)
}

/// Records the arrival time of each nftables change notification in `ns`.
fn nft_monitor(ns: &str, seen: Arc<Mutex<Vec<Instant>>>) -> Result<()> {
    nft_notifications(ns, None, move |_, at| {
        if let Ok(mut v) = seen.lock() {
            v.push(at);
        }
    })
}

/// The arrival time of the first notification `nft_monitor` recorded since `seen` was
/// cleared (5 s deadline).
async fn first_change(seen: &Mutex<Vec<Instant>>, round: u32) -> Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(t) = seen.lock().ok().and_then(|v| v.first().copied()) {
            return Ok(t);
        }
        if Instant::now() > deadline {
            bail!("no kernel change seen for round {round}");
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// 200 rounds of one endpoint change: round `r` puts `pod(r)` (even `r`) or deletes it (odd
/// `r`, so `pod` gives the same pod for `2k` and `2k + 1`), then waits for the first nftables
/// notification in `seen`. Per round: ms from the put sent, and from its acknowledgement.
fn pod_churn(
    lab: &Lab,
    seen: &Arc<Mutex<Vec<Instant>>>,
    pod: impl Fn(u32) -> PodRecord + Send + 'static,
) -> Result<Vec<(f64, f64)>> {
    let seen = seen.clone();
    block_on_in_netns(&lab.infra, move || async move {
        let args = etcd_args();
        let store = Store::connect(&args).await?;
        let mut out = Vec::new();
        for round in 0..200u32 {
            let p = pod(round);
            if let Ok(mut v) = seen.lock() {
                v.clear();
            }
            let t0 = Instant::now();
            if round % 2 == 0 {
                store.put(&pod_key(&args, &p), p.to_bytes(), 0).await?;
            } else {
                store.delete(&pod_key(&args, &p)).await?;
            }
            let acked = t0.elapsed();
            let t1 = first_change(&seen, round).await?;
            out.push((
                t1.duration_since(t0).as_secs_f64() * 1000.0,
                t1.saturating_duration_since(t0 + acked).as_secs_f64() * 1000.0,
            ));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(out)
    })?
}

fn endpoint_change(lab: &Lab) -> Result<()> {
    println!("endpoint_change: one endpoint added or removed, 10,000 services present");
    let ns = lab.nodes[0].ns.clone();
    let seen = Arc::new(Mutex::new(Vec::new()));
    nft_monitor(&ns, seen.clone())?;
    // Round 2k adds pod k (every 37th of the 10,000), round 2k + 1 removes it again.
    let lat = pod_churn(lab, &seen, |r| {
        bulk_pod((r - r % 2) * 37 % 10000, 7, "elsewhere")
    })?;
    let mut from_put: Vec<f64> = lat.iter().map(|l| l.0).collect();
    let mut from_ack: Vec<f64> = lat.iter().map(|l| l.1).collect();
    from_put.sort_by(f64::total_cmp);
    from_ack.sort_by(f64::total_cmp);
    println!(
        "  etcd put sent -> kernel: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} changes)",
        pct(&from_put, 50.0),
        pct(&from_put, 99.0),
        from_put.last().copied().unwrap_or(f64::NAN),
        from_put.len()
    );
    println!(
        "  etcd put acknowledged -> kernel: p50 {:.2} ms, p99 {:.2} ms",
        pct(&from_ack, 50.0),
        pct(&from_ack, 99.0)
    );
    Ok(())
}

fn create_to_reachable() -> Result<()> {
    println!("create_to_reachable: service create -> a pod on each of 5 nodes connects");
    let mut lab = Lab::new(5, bins())?;
    lab.start_etcd()?;
    lab.init_network(&["--network", "10.244.0.0/16"])?;
    for i in 0..5 {
        lab.start_daemon(i, &[])?;
    }
    let mut clients = Vec::new();
    for i in 0..5 {
        lab.wait_subnet(i)?;
        clients.push(lab.add_manual_pod(i, 1)?);
    }
    let backend = lab.add_manual_pod(2, 2)?;
    tartan::netbench::probe::tcp_whoami_server(&backend.ns, 8080, "b")?;
    let rec = PodRecord {
        ip6: None,
        container_id: "backend".into(),
        ifname: "eth0".into(),
        node: lab.nodes[2].name.clone(),
        ip: backend.ip,
        namespace: "default".into(),
        name: "backend".into(),
        labels: [("app".to_string(), "b".to_string())].into(),
    };
    lab.etcdctl(&[
        "put",
        "/tartan/pods/node3/backend/eth0",
        &String::from_utf8(rec.to_bytes())?,
    ])?;
    let mut worst = Vec::new();
    for round in 0..60 {
        let name = format!("r{round}");
        let t0 = Instant::now();
        let created = block_on_in_netns(&lab.infra, move || async move {
            let args = etcd_args();
            let store = Store::connect(&args).await?;
            let st =
                tartan::store::services::ServiceStore::new(&store, &args, "10.96.0.0/12".parse()?);
            let mut s = bulk_service(0);
            s.namespace = "default".into();
            s.name = name;
            s.selector = Some([("app".to_string(), "b".to_string())].into());
            st.create(s, None, &[]).await
        })??;
        let vip = created.cluster_ip;
        let handles: Vec<_> = clients
            .iter()
            .map(|c| {
                let ns = c.ns.clone();
                std::thread::spawn(move || -> Result<Duration> {
                    in_netns(&ns, move || -> Result<Duration> {
                        loop {
                            if let Ok(w) = tartan::netbench::probe::whoami_here(
                                vip,
                                80,
                                Duration::from_millis(500),
                            ) && w.name == "b"
                            {
                                return Ok(t0.elapsed());
                            }
                            if t0.elapsed() > Duration::from_secs(10) {
                                bail!("{vip} not reachable after 10 s");
                            }
                            std::thread::sleep(Duration::from_micros(500));
                        }
                    })?
                })
            })
            .collect();
        let mut w = Duration::ZERO;
        for h in handles {
            w = w.max(h.join().map_err(|_| anyhow::anyhow!("client panicked"))??);
        }
        worst.push(w.as_secs_f64() * 1000.0);
    }
    worst.sort_by(f64::total_cmp);
    println!(
        "  create -> reachable from all 5 nodes ({} services): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        worst.len(),
        pct(&worst, 50.0),
        pct(&worst, 90.0),
        pct(&worst, 99.0),
        worst.last().copied().unwrap_or(f64::NAN)
    );
    Ok(())
}

/// Polls node `ns`'s cluster DNS for `name` until `done` holds for its answer; the time
/// since `t0`.
fn dns_until(
    ns: &str,
    name: String,
    t0: Instant,
    done: fn(&tartan::netbench::probe::DnsAnswer, std::net::Ipv4Addr) -> bool,
    ip: std::net::Ipv4Addr,
) -> std::thread::JoinHandle<Result<Duration>> {
    let ns = ns.to_string();
    std::thread::spawn(move || -> Result<Duration> {
        let node = ns.clone();
        in_netns(&node, move || -> Result<Duration> {
            let server: std::net::SocketAddr = "10.96.0.10:53".parse()?;
            loop {
                if let Some(a) =
                    tartan::netbench::probe::dns_a_here(server, &name, Duration::from_millis(200))?
                    && done(&a, ip)
                {
                    return Ok(t0.elapsed());
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    bail!("{name}: no matching answer from the cluster DNS of {ns} after 10 s");
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        })?
    })
}

fn dns_change() -> Result<()> {
    println!(
        "dns_change: service/pod put or delete in etcd -> every one of 5 nodes' cluster DNS answers it"
    );
    let mut lab = Lab::new(5, bins())?;
    lab.start_etcd()?;
    lab.init_network(&["--network", "10.244.0.0/16"])?;
    for i in 0..5 {
        lab.start_daemon(i, &[])?;
    }
    for i in 0..5 {
        lab.wait_subnet(i)?;
    }
    let nodes: Vec<String> = lab.nodes.iter().map(|n| n.ns.clone()).collect();
    let has = |a: &tartan::netbench::probe::DnsAnswer, ip| a.addrs.contains(&ip);
    let gone = |a: &tartan::netbench::probe::DnsAnswer, _| a.rcode == "NXDOMAIN";
    // Warm-up: every node's DNS answers (zone loaded).
    let warm = "ns.dns.cluster.local.".to_string();
    for ns in &nodes {
        dns_until(ns, warm.clone(), Instant::now(), has, "10.96.0.10".parse()?)
            .join()
            .map_err(|_| anyhow::anyhow!("poller panicked"))??;
    }
    let (mut created, mut deleted, mut pods) = (Vec::new(), Vec::new(), Vec::new());
    let join_all =
        |hs: Vec<std::thread::JoinHandle<Result<Duration>>>, out: &mut Vec<f64>| -> Result<()> {
            for h in hs {
                let d = h.join().map_err(|_| anyhow::anyhow!("poller panicked"))??;
                out.push(d.as_secs_f64() * 1000.0);
            }
            Ok(())
        };
    for round in 0..60u32 {
        let name = format!("d{round}");
        let fqdn = format!("{name}.default.svc.cluster.local.");
        let st_name = name.clone();
        let t0 = Instant::now();
        let svc = block_on_in_netns(&lab.infra, move || async move {
            let args = etcd_args();
            let store = Store::connect(&args).await?;
            let st =
                tartan::store::services::ServiceStore::new(&store, &args, "10.96.0.0/12".parse()?);
            let mut s = bulk_service(0);
            s.namespace = "default".into();
            s.name = st_name;
            st.create(s, None, &[]).await
        })??;
        let hs = nodes
            .iter()
            .map(|ns| dns_until(ns, fqdn.clone(), t0, has, svc.cluster_ip))
            .collect();
        join_all(hs, &mut created)?;
        let t0 = Instant::now();
        lab.tartanctl(&["service", "delete", &name])?;
        let hs = nodes
            .iter()
            .map(|ns| dns_until(ns, fqdn.clone(), t0, gone, svc.cluster_ip))
            .collect();
        join_all(hs, &mut deleted)?;
        let ip = std::net::Ipv4Addr::new(10, 244, 200, (round % 250) as u8 + 1);
        let rec = PodRecord {
            ip6: None,
            container_id: format!("dnspod{round}"),
            ifname: "eth0".into(),
            node: lab.nodes[0].name.clone(),
            ip,
            namespace: "default".into(),
            name: format!("dnspod{round}"),
            labels: Default::default(),
        };
        let key = format!("/tartan/pods/{}/dnspod{round}/eth0", lab.nodes[0].name);
        let t0 = Instant::now();
        lab.etcdctl(&["put", &key, &String::from_utf8(rec.to_bytes())?])?;
        let o = ip.octets();
        let pod_name = format!(
            "{}-{}-{}-{}.default.pod.cluster.local.",
            o[0], o[1], o[2], o[3]
        );
        let hs = nodes
            .iter()
            .map(|ns| dns_until(ns, pod_name.clone(), t0, has, ip))
            .collect();
        join_all(hs, &mut pods)?;
        lab.etcdctl(&["del", &key])?;
    }
    for (what, v) in [
        ("service create -> answered", &mut created),
        ("service delete -> NXDOMAIN", &mut deleted),
        ("pod record put -> answered", &mut pods),
    ] {
        v.sort_by(f64::total_cmp);
        println!(
            "  {what} on each of 5 nodes ({} samples): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            v.len(),
            pct(v, 50.0),
            pct(v, 99.0),
            v.last().copied().unwrap_or(f64::NAN)
        );
    }
    Ok(())
}

fn first_packet() -> Result<()> {
    println!("first_packet: new-connection latency through a cluster IP (connect -> first byte)");
    let sizes = [1u32, 10_000, 30_000];
    let mut kinds = Vec::new();
    for s in sizes {
        kinds.push(NatKind::Tartan {
            services: s,
            endpoints: 1,
            balancing: Balancing::RoundRobin,
        });
    }
    for s in sizes {
        kinds.push(NatKind::Linear { services: s });
    }
    // The IPv6 table (dual-stack services, the IPv6 cluster IP measured).
    for s in sizes {
        kinds.push(NatKind::Tartan6 { services: s });
    }
    wait_quiet();
    let bed = ServiceBed::new(&kinds)?;
    for v in &bed.variants {
        println!(
            "  {:<28} programmed in {:.2} s",
            v.kind.label(),
            v.load_seconds
        );
    }
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); bed.variants.len()];
    // Per round, each variant's median; ratios are taken within a round (same machine state).
    let mut round_p50: Vec<Vec<f64>> = vec![Vec::new(); bed.variants.len()];
    let rounds = 60;
    for r in 0..rounds {
        for i in bed.round_order(r) {
            let v = &bed.variants[i];
            let res = first_connections(&v.client, v.target, 50)?;
            let d: Vec<Duration> = res.into_iter().map(|x| x.0).collect();
            round_p50[i].push(pct(&sorted_us(&d), 50.0));
            samples[i].extend(d);
        }
    }
    println!("  {rounds} interleaved rounds x 50 new connections per variant:");
    for (i, v) in bed.variants.iter().enumerate() {
        let s = sorted_us(&samples[i]);
        // Each kind's ratio is to its own 1-service variant.
        let base = i - i % sizes.len();
        let mut ratios: Vec<f64> = round_p50[i]
            .iter()
            .zip(&round_p50[base])
            .map(|(a, b)| a / b)
            .collect();
        ratios.sort_by(f64::total_cmp);
        println!(
            "  {:<28} p50 {:7.1} us  p90 {:7.1} us  p99 {:7.1} us   ratio to 1 service: median {:.3} (rounds p10 {:.3}, p90 {:.3})",
            v.kind.label(),
            pct(&s, 50.0),
            pct(&s, 90.0),
            pct(&s, 99.0),
            pct(&ratios, 50.0),
            pct(&ratios, 10.0),
            pct(&ratios, 90.0)
        );
    }
    Ok(())
}

fn spread() -> Result<()> {
    println!("spread: 10,000 new connections over N endpoints");
    for balancing in [Balancing::RoundRobin, Balancing::Random] {
        for n in [2u32, 3, 10, 100] {
            let bed = ServiceBed::new(&[NatKind::Tartan {
                services: 1,
                endpoints: n,
                balancing,
            }])?;
            let v = &bed.variants[0];
            let r = first_connections(&v.client, v.target, 10_000)?;
            let mut counts: HashMap<String, usize> = HashMap::new();
            for (_, who) in r {
                *counts.entry(who).or_default() += 1;
            }
            let expect = 10_000.0 / f64::from(n);
            let worst = counts
                .values()
                .map(|c| (*c as f64 - expect).abs() / expect * 100.0)
                .fold(0.0, f64::max);
            let (lo, hi) = (
                counts.values().min().copied().unwrap_or(0),
                counts.values().max().copied().unwrap_or(0),
            );
            println!(
                "  {:<11} N={n:<3}: {} endpoints used, counts {lo}..{hi} (ideal {expect:.0}), worst deviation {worst:.1} % {}",
                format!("{balancing:?}"),
                counts.len(),
                if worst <= 10.0 && counts.len() == n as usize {
                    "(within ±10 %)"
                } else {
                    "(OUTSIDE ±10 %)"
                }
            );
        }
    }
    Ok(())
}

/// Per node: the address to look for in nftables notifications and when it was first seen.
type Sighting = Arc<Mutex<(Option<[u8; 4]>, Option<Instant>)>>;

/// Watches nftables notifications in `ns`; the first message carrying the 4 bytes of the
/// address in `sighting` (the pod's address as element data of `backends`) records its time.
fn nft_sighting(ns: &str, sighting: Sighting) -> Result<()> {
    nft_notifications(ns, None, move |msg, at| {
        if let Ok(mut g) = sighting.lock()
            && let (Some(ip), None) = (g.0, g.1)
            && msg.windows(4).any(|w| w == ip)
        {
            g.1 = Some(at);
        }
    })
}

/// One pod's registration: ADD start -> endpoint everywhere, ADD return -> same (ms), and
/// whether it made the proxy rebuild its table.
struct RegSample {
    from_start: f64,
    from_return: f64,
    rebuilt: bool,
}

/// A thread that spins on one core while `on` is set (and at most until `deadline`).
fn spinner(on: Arc<std::sync::atomic::AtomicBool>, deadline: Instant) {
    std::thread::spawn(move || {
        while Instant::now() < deadline {
            if on.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    });
}

fn pod_registration() -> Result<()> {
    const PODS: usize = 200;
    const NODES: usize = 5;
    println!(
        "pod_registration: {PODS} labelled pods ADDed one by one on node1 of {NODES}, one service selecting them"
    );
    let mut lab = Lab::new(NODES, bins())?;
    lab.start_etcd()?;
    lab.init_network(&["--network", "10.244.0.0/16"])?;
    for i in 0..NODES {
        lab.start_daemon(i, &[])?;
    }
    for i in 0..NODES {
        lab.wait_subnet(i)?;
    }
    lab.tartanctl(&[
        "service",
        "create",
        "reg",
        "--port",
        "80:8080/tcp",
        "--selector",
        "app=reg",
    ])?;
    let sightings: Vec<Sighting> = (0..NODES)
        .map(|_| Arc::new(Mutex::new((None, None))))
        .collect();
    for (i, s) in sightings.iter().enumerate() {
        nft_sighting(&lab.nodes[i].ns, s.clone())?;
    }
    let daemons: Vec<u32> = lab
        .nodes
        .iter()
        .filter_map(|n| n.daemon.as_ref().map(|c| c.id()))
        .chain(lab.etcd_pids())
        .collect();
    let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    spinner(busy.clone(), Instant::now() + Duration::from_secs(180));
    let mut calm: Vec<RegSample> = Vec::new();
    let mut loaded: Vec<RegSample> = Vec::new();
    let active_table = |lab: &Lab| {
        tartan::lab::ns_run(&lab.nodes[0].ns, "nft", &["list", "tables"])
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("tartan_svc"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut table = active_table(&lab);
    let mut ips = Vec::new();
    for k in 0..PODS {
        let name = format!("reg{k}");
        let pod_ns = lab.add_namespace(&name)?;
        // One pod of each pair gets the busy core. Which one alternates with the pair index's
        // trailing zeros, so the table rebuilds (capacity growth at 17, 33, 65, 129 endpoints,
        // pods k = 16, 32, 64, 128) fall two in each half instead of all in one.
        let first_loaded = (k / 2).trailing_zeros() % 2 == 1;
        let with_load = (k % 2 == 0) == first_loaded;
        settle(
            &daemons,
            Duration::from_millis(3),
            Duration::from_millis(200),
        );
        for s in &sightings {
            if let Ok(mut g) = s.lock() {
                *g = (None, None);
            }
        }
        busy.store(with_load, std::sync::atomic::Ordering::Relaxed);
        // The watchers must know the address before ADD starts (the table may change before
        // ADD returns): IPAM hands addresses out in order here (round robin, nothing freed),
        // so it is the one after the previous pod's; checked against the result below.
        let expect = ips
            .last()
            .map(|ip: &Ipv4Addr| Ipv4Addr::from(u32::from(*ip) + 1))
            .unwrap_or_else(|| {
                let s = lab
                    .wait_subnet(0)
                    .map(|s| s.network())
                    .unwrap_or(Ipv4Addr::UNSPECIFIED);
                Ipv4Addr::from(u32::from(s) + 2)
            });
        for s in &sightings {
            if let Ok(mut g) = s.lock() {
                g.0 = Some(expect.octets());
            }
        }
        let t0 = Instant::now();
        let out = lab.cni_call(
            0,
            "ADD",
            &pod_ns,
            &name,
            ("default", &name),
            &[("app", "reg")],
        )?;
        let returned = t0.elapsed();
        let v: serde_json::Value = serde_json::from_str(&out).context("ADD result")?;
        let got: Ipv4Addr = v["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .context("no address in the ADD result")?;
        if got != expect {
            bail!(
                "pod {k} got {got}, expected {expect}: the sighting would watch the wrong address"
            );
        }
        ips.push(got);
        let everywhere = wait_for(
            &format!("{name} ({got}) in the service table of every node"),
            Duration::from_secs(10),
            || {
                let mut worst = Duration::ZERO;
                for s in &sightings {
                    let t = s.lock().ok()?.1?;
                    worst = worst.max(t.duration_since(t0));
                }
                Some(worst)
            },
        )?;
        busy.store(false, std::sync::atomic::Ordering::Relaxed);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        // Untimed: did this pod make the proxy rebuild its table (another table name)?
        let now_table = active_table(&lab);
        let rebuilt = now_table != table;
        table = now_table;
        let sample = RegSample {
            from_start: ms(everywhere),
            from_return: ms(everywhere.saturating_sub(returned)),
            rebuilt,
        };
        if with_load {
            loaded.push(sample);
        } else {
            calm.push(sample);
        }
    }
    // Untimed check of what the notifications stood for: every pod is an endpoint everywhere.
    for n in &lab.nodes {
        let table = tartan::lab::ns_run(
            &n.ns,
            "nft",
            &["list", "map", "ip", "tartan_svc", "backends"],
        )
        .or_else(|_| {
            tartan::lab::ns_run(
                &n.ns,
                "nft",
                &["list", "map", "ip", "tartan_svc2", "backends"],
            )
        })?;
        for ip in &ips {
            if !table.contains(&format!(": {ip} . 8080")) {
                bail!("{ip} is not an endpoint on {}", n.name);
            }
        }
    }
    // What the registrar's once-a-second directory check (and everything else tartand does
    // at rest) costs with 200 pods on the node: its CPU time over 10 idle seconds.
    if let Some(pid) = lab.nodes[0].daemon.as_ref().map(|c| c.id()) {
        std::thread::sleep(Duration::from_secs(2));
        let before = cpu_ns(pid);
        std::thread::sleep(Duration::from_secs(10));
        if let (Some(a), Some(b)) = (before, cpu_ns(pid)) {
            println!(
                "  node1's tartand at rest with {PODS} pods: {:.3} ms CPU per second",
                (b.saturating_sub(a)) as f64 / 1e6 / 10.0
            );
        }
    }
    for (label, v) in [("calm", &calm), ("one core busy", &loaded)] {
        let sorted = |f: &dyn Fn(&RegSample) -> Option<f64>| {
            let mut x: Vec<f64> = v.iter().filter_map(f).collect();
            x.sort_by(f64::total_cmp);
            x
        };
        let start = sorted(&|s| Some(s.from_start));
        let ret = sorted(&|s| Some(s.from_return));
        let steady = sorted(&|s| (!s.rebuilt).then_some(s.from_start));
        let rebuilds = sorted(&|s| s.rebuilt.then_some(s.from_start));
        println!(
            "  {label} ({} pods): ADD start -> endpoint on all {NODES} nodes p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; from ADD return p50 {:.1} ms, p99 {:.1} ms",
            start.len(),
            pct(&start, 50.0),
            pct(&start, 99.0),
            start.last().copied().unwrap_or(f64::NAN),
            pct(&ret, 50.0),
            pct(&ret, 99.0),
        );
        println!(
            "    without the {} table rebuilds: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; the rebuilds: {}",
            rebuilds.len(),
            pct(&steady, 50.0),
            pct(&steady, 99.0),
            steady.last().copied().unwrap_or(f64::NAN),
            rebuilds
                .iter()
                .map(|r| format!("{r:.0} ms"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// The service table in force in `ns` (`tartan_svc` or `tartan_svc2`).
fn service_table(ns: &str) -> Option<String> {
    let out = tartan::lab::ns_run(ns, "nft", &["list", "tables"]).ok()?;
    out.lines()
        .filter_map(|l| l.strip_prefix("table ip "))
        .find(|t| t.starts_with("tartan_svc"))
        .map(str::to_string)
}

/// Chains, bytes and listing time of `nft list table` for the service table in `ns`.
fn table_size(ns: &str) -> Result<(String, usize, usize, Duration)> {
    let t = service_table(ns).context("no service table")?;
    let t0 = Instant::now();
    let text = tartan::lab::ns_run(ns, "nft", &["list", "table", "ip", &t])?;
    let took = t0.elapsed();
    Ok((t, text.matches("\n\tchain ").count(), text.len(), took))
}

fn big_pod(k: u32, app: &str) -> PodRecord {
    PodRecord {
        ip6: None,
        container_id: format!("{app}{k}"),
        ifname: "eth0".into(),
        node: "elsewhere".into(),
        ip: std::net::Ipv4Addr::from(
            u32::from(std::net::Ipv4Addr::new(10, 202, 0, 1))
                + k
                + if app == "big" { 0 } else { 1 << 16 },
        ),
        namespace: "default".into(),
        name: format!("{app}{k}"),
        labels: [("app".to_string(), app.to_string())].into(),
    }
}

/// Puts (or deletes) pod records in the lab's etcd, 100 per transaction, 8 transactions in
/// flight.
fn write_pods(lab: &Lab, pods: Vec<PodRecord>, delete: bool) -> Result<()> {
    block_on_in_netns(&lab.infra, move || async move {
        let args = etcd_args();
        let store = Store::connect(&args).await?;
        let ops = pods
            .iter()
            .map(|p| {
                if delete {
                    etcd_client::TxnOp::delete(pod_key(&args, p), None)
                } else {
                    etcd_client::TxnOp::put(pod_key(&args, p), p.to_bytes(), None)
                }
            })
            .collect();
        txn_batches(&store, ops).await
    })?
}

/// Waits (60 s) until the daemon reports `want` elements; returns when it did.
fn wait_elements(ns: &str, want: f64) -> Result<Instant> {
    wait_for("service elements", Duration::from_secs(60), || {
        (metric(ns, "tartan_service_elements") == Some(want)).then(Instant::now)
    })
}

fn big_service() -> Result<()> {
    const N: u32 = 10_000;
    println!("big_service: one service growing 1 -> {N} endpoints beside a small one");
    let mut lab = Lab::new(1, bins())?;
    lab.start_etcd()?;
    lab.init_network(&["--network", "10.244.0.0/16"])?;
    lab.start_daemon(0, &[])?;
    lab.wait_subnet(0)?;
    let ns = lab.nodes[0].ns.clone();
    wait_for("service table", Duration::from_secs(20), || {
        service_table(&ns)
    })?;
    let (table0, chains0, bytes0, list0) = table_size(&ns)?;
    let vips = block_on_in_netns(&lab.infra, move || async move {
        let args = etcd_args();
        let store = Store::connect(&args).await?;
        let st = tartan::store::services::ServiceStore::new(&store, &args, "10.96.0.0/12".parse()?);
        let mut out = Vec::new();
        for app in ["big", "other"] {
            let mut s = bulk_service(0);
            s.namespace = "default".into();
            s.name = app.into();
            s.selector = Some([("app".to_string(), app.to_string())].into());
            out.push(st.create(s, None, &[]).await?.cluster_ip);
        }
        anyhow::Ok(out)
    })??;
    let other_vip = vips[1];
    let backend = lab.add_manual_pod(0, 1)?;
    tartan::netbench::probe::tcp_whoami_server(&backend.ns, 8080, "o")?;
    let mut other_rec = big_pod(0, "other");
    other_rec.ip = backend.ip;
    write_pods(&lab, vec![big_pod(0, "big")], false)?;
    // big: verdict + 1 slot; other: its no-endpoints element.
    wait_elements(&ns, 3.0)?;
    wait_quiet();
    // Grow to N while the other service's endpoint comes and goes.
    let rest: Vec<PodRecord> = (1..N).map(|k| big_pod(k, "big")).collect();
    let done = Arc::new(Mutex::new(None::<Instant>));
    let (lab_ref, done2) = (&lab, done.clone());
    let other_lat: Vec<f64> = std::thread::scope(|sc| -> Result<Vec<f64>> {
        let w = sc.spawn(move || -> Result<()> {
            write_pods(lab_ref, rest, false)?;
            if let Ok(mut d) = done2.lock() {
                *d = Some(Instant::now());
            }
            Ok(())
        });
        let mut lat = Vec::new();
        let mut present = false;
        while done.lock().map(|d| d.is_none()).unwrap_or(false) || lat.len() < 6 {
            let t0 = Instant::now();
            write_pods(lab_ref, vec![other_rec.clone()], present)?;
            present = !present;
            // Through the dataplane: the node connects to the other service's cluster IP; it
            // answers once the endpoint is in, and refuses once it is out.
            in_netns(&ns, move || {
                wait_for("other service change", Duration::from_secs(30), || {
                    let r = tartan::netbench::probe::whoami_here(
                        other_vip,
                        80,
                        Duration::from_millis(200),
                    );
                    (r.is_ok_and(|w| w.name == "o") == present).then_some(())
                })
            })??;
            lat.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        Ok(lat)
    })?;
    let t_done = done.lock().ok().and_then(|d| *d).context("writer time")?;
    // Leave the other service with one endpoint.
    let other_elems = if other_lat.len() % 2 == 1 { 2.0 } else { 1.0 };
    let slots = tartan::proxy::rules::slot_count(N as usize);
    let programmed = wait_elements(&ns, 1.0 + f64::from(slots) + other_elems)?;
    let grow = programmed.saturating_duration_since(t_done);
    let (table1, chains1, bytes1, list1) = table_size(&ns)?;
    let mut ol = other_lat.clone();
    ol.sort_by(f64::total_cmp);
    println!(
        "  1 -> {N} endpoints ({slots} slots): last etcd write acknowledged -> every slot in the kernel {:.0} ms",
        grow.as_secs_f64() * 1000.0
    );
    println!(
        "  other service's endpoint added/removed during the growth: {} changes, p50 {:.1} ms, max {:.1} ms (etcd put -> a connection to its cluster IP answers / is refused)",
        ol.len(),
        pct(&ol, 50.0),
        ol.last().copied().unwrap_or(f64::NAN)
    );
    let (q, r) = (slots / N, slots % N);
    println!(
        "  spread: {r} endpoints hold {} slots, {} hold {q}: shares {:+.1} % / {:+.1} % of 1/N",
        q + 1,
        N - r,
        (f64::from(q + 1) * f64::from(N) / f64::from(slots) - 1.0) * 100.0,
        (f64::from(q) * f64::from(N) / f64::from(slots) - 1.0) * 100.0
    );
    // One endpoint change in the big service.
    wait_quiet();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    nft_notifications(&ns, Some(stop.clone()), {
        let seen = seen.clone();
        move |_, at| {
            if let Ok(mut v) = seen.lock() {
                v.push(at);
            }
        }
    })?;
    let lat: Vec<f64> = pod_churn(&lab, &seen, |r| big_pod(N + r / 2, "big"))?
        .into_iter()
        .map(|l| l.0)
        .collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut lat = lat;
    lat.sort_by(f64::total_cmp);
    println!(
        "  one endpoint added or removed in it: etcd put sent -> kernel p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} changes)",
        pct(&lat, 50.0),
        pct(&lat, 99.0),
        lat.last().copied().unwrap_or(f64::NAN),
        lat.len()
    );
    // `BIG_LOG_COPY=FILE` (with `TARTAN_LOG=tartan=debug`) keeps the daemon's log of the
    // growth and the single changes: each plan's `plan_us` and `elapsed_us`.
    if let Ok(dst) = std::env::var("BIG_LOG_COPY") {
        let _ = std::fs::copy(lab.nodes[0].log_file(), dst);
    }
    // Gone again.
    wait_quiet();
    let t0 = Instant::now();
    block_on_in_netns(&lab.infra, move || async move {
        let args = etcd_args();
        let store = Store::connect(&args).await?;
        let st = tartan::store::services::ServiceStore::new(&store, &args, "10.96.0.0/12".parse()?);
        st.delete("default", "big").await?;
        st.delete("default", "other").await
    })??;
    let removed = wait_elements(&ns, 0.0)?;
    let (table2, chains2, bytes2, list2) = table_size(&ns)?;
    println!(
        "  both services deleted -> table empty: {:.0} ms",
        removed.duration_since(t0).as_secs_f64() * 1000.0
    );
    for (when, t, c, b, l) in [
        ("before", &table0, chains0, bytes0, list0),
        ("at 10,000 endpoints", &table1, chains1, bytes1, list1),
        ("after deletion", &table2, chains2, bytes2, list2),
    ] {
        println!(
            "  table {when}: {t}, {c} chains, `nft list table` {b} bytes in {:.0} ms",
            l.as_secs_f64() * 1000.0
        );
    }
    if table0 != table1 || table1 != table2 {
        bail!("the service table was switched: a rebuild happened");
    }
    Ok(())
}

fn main() -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    let sections = Sections::from_args();
    let want = |name: &str| sections.want(name);
    if want("full_sync") || want("endpoint_change") {
        let lab = full_sync(10_000).context("10,000 services")?;
        if want("endpoint_change") {
            endpoint_change(&lab)?;
        }
        drop(lab);
        if want("full_sync") {
            wait_quiet();
            drop(full_sync(30_000).context("30,000 services")?);
        }
    }
    if want("create_to_reachable") {
        wait_quiet();
        create_to_reachable()?;
    }
    if want("dns_change") {
        wait_quiet();
        dns_change()?;
    }
    if want("first_packet") {
        first_packet()?;
    }
    if want("spread") {
        spread()?;
    }
    if want("pod_registration") {
        pod_registration()?;
    }
    if want("big_service") {
        wait_quiet();
        big_service()?;
    }
    Ok(())
}
