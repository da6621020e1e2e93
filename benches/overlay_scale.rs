//! Overlay benchmarks (need root; build namespaces like the netns tests):
//!
//! 1. programming 1,000 peers from scratch (leases already in etcd): wall time, daemon RSS;
//! 2. steady state with 1,000 peers and no changes: daemon CPU over 60 s;
//! 3. a new lease in etcd → route present on every node of a 10-node cluster: latency.
//!
//! Run: `cargo bench --bench overlay_scale` (or `make bench`). Results: docs/benchmarks.md.

mod common;

use common::*;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use tartan::lab::{Lab, block_on_in_netns, require_root, wait_for};
use tartan::model::subnet_lease::{LeaseValue, MacAddr};
use tartan::store::etcd::{EtcdArgs, Store};

/// The service CIDR beside the /8 cluster network these runs use.
const SVC_CIDR: &str = "172.30.0.0/16";

fn etcd_args(endpoint: &str) -> EtcdArgs {
    EtcdArgs::for_endpoints(&[endpoint])
}

fn fake_lease(i: u32) -> (String, Vec<u8>) {
    // Peers 10.(1 + i/256).(i%256).0/24, underlay 172.16.x.y, unique MACs.
    let subnet = format!("10.{}.{}.0-24", 1 + i / 256, i % 256);
    let mac = MacAddr([0x02, 0xbe, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
    let ip = Ipv4Addr::new(172, 16, (i >> 8) as u8, (i & 0xff) as u8 + 1);
    (
        format!("/coreos.com/network/subnets/{subnet}"),
        LeaseValue::vxlan(ip, 1, mac, &format!("fake{i}")).to_bytes(),
    )
}

fn put_fake_leases(lab: &Lab, range: std::ops::Range<u32>) -> Result<()> {
    let args = etcd_args("http://127.0.0.1:2379");
    block_on_in_netns(&lab.infra, move || async move {
        let store = Store::connect(&args).await?;
        let lease = store.grant(3600).await?;
        let futs = range.map(|i| {
            let s = store.clone();
            async move {
                let (k, v) = fake_lease(i);
                s.put(&k, v, lease).await
            }
        });
        let results: Vec<Result<()>> = futures::stream::iter(futs)
            .buffer_unordered(32)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>>>()?;
        anyhow::Ok(())
    })?
}

fn route_count(ns: &str) -> usize {
    tartan::lab::ip(&["-n", ns, "route", "show", "proto", "157"])
        .map(|r| r.lines().count())
        .unwrap_or(0)
}

fn proc_status(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn bench_1000_peers() -> Result<()> {
    let mut lab = Lab::new(1, bins())?;
    lab.start_etcd()?;
    // 10.0.0.0/8 holds the default service CIDR; services move aside.
    lab.init_network(&["--network", "10.0.0.0/8", "--service-cidr", SVC_CIDR])?;
    put_fake_leases(&lab, 0..1000)?;
    let mut walls = Vec::new();
    let mut rss = Vec::new();
    for round in 0..3 {
        // From scratch: no device, no routes.
        let _ = tartan::lab::ip(&["-n", &lab.nodes[0].ns, "link", "del", "tartan.1"]);
        let start = Instant::now();
        lab.start_daemon(0, &["--resync-secs", "30", "--service-cidr", SVC_CIDR])?; // the daemon default
        let ns = lab.nodes[0].ns.clone();
        wait_for("1000 routes", Duration::from_secs(60), || {
            (route_count(&ns) >= 1000).then_some(())
        })?;
        let wall = start.elapsed();
        let pid = lab.nodes[0]
            .daemon
            .as_ref()
            .map(|c| c.id())
            .context("daemon")?;
        let hwm = proc_status(pid, "VmHWM:").unwrap_or(0);
        println!(
            "round {round}: 1000 peers programmed in {wall:?} (daemon start to last route), VmHWM {hwm} kB"
        );
        walls.push(wall.as_secs_f64());
        rss.push(hwm);
        if round == 2 {
            // Steady state: no changes for 30 s.
            std::thread::sleep(Duration::from_secs(2));
            let t0 = cpu_ns(pid).context("schedstat")?;
            let w0 = Instant::now();
            std::thread::sleep(Duration::from_secs(60));
            let t1 = cpu_ns(pid).context("schedstat")?;
            let cpu = (t1 - t0) as f64 / 1e9 / w0.elapsed().as_secs_f64() * 100.0;
            let hwm = proc_status(pid, "VmHWM:").unwrap_or(0);
            println!(
                "steady state, 1000 peers, 60 s (two resyncs): CPU {cpu:.2}% of one core, VmHWM {hwm} kB"
            );
        }
        lab.stop_daemon(0)?;
    }
    walls.sort_by(f64::total_cmp);
    println!(
        "1000 peers from scratch: median {:.3} s (min {:.3}, max {:.3}); peak RSS max {} kB",
        percentile(&walls, 50.0),
        walls[0],
        walls[walls.len() - 1],
        rss.iter().max().unwrap_or(&0)
    );
    Ok(())
}

/// Watches route additions in `ns` and records when each destination first appeared.
fn route_monitor(ns: &str, seen: Arc<Mutex<HashMap<String, Instant>>>) {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let _ = block_on_in_netns(&ns, move || async move {
            use netlink_packet_core::NetlinkPayload;
            use netlink_packet_route::RouteNetlinkMessage;
            use netlink_packet_route::route::{RouteAddress, RouteAttribute};
            use netlink_sys::AsyncSocket;
            let Ok((mut conn, _h, mut rx)) = rtnetlink::new_connection() else {
                return;
            };
            if conn
                .socket_mut()
                .socket_mut()
                .bind(&netlink_sys::SocketAddr::new(0, 0x40))
                .is_err()
            {
                return;
            }
            tokio::spawn(conn);
            while let Some((msg, _)) = rx.next().await {
                if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) = msg.payload
                {
                    for a in &r.attributes {
                        if let RouteAttribute::Destination(RouteAddress::Inet(d)) = a {
                            let key = format!("{d}/{}", r.header.destination_prefix_length);
                            seen.lock()
                                .map(|mut m| {
                                    m.entry(key).or_insert_with(Instant::now);
                                })
                                .ok();
                        }
                    }
                }
            }
        });
    });
}

fn bench_lease_to_route_latency() -> Result<()> {
    let mut lab = Lab::new(10, bins())?;
    lab.start_etcd()?;
    // 10.0.0.0/8 holds the default service CIDR; services move aside.
    lab.init_network(&["--network", "10.0.0.0/8", "--service-cidr", SVC_CIDR])?;
    for i in 0..10 {
        lab.start_daemon(i, &["--service-cidr", SVC_CIDR])?;
    }
    for i in 0..10 {
        lab.wait_subnet(i)?;
    }
    let monitors: Vec<Arc<Mutex<HashMap<String, Instant>>>> = (0..10)
        .map(|_| Arc::new(Mutex::new(HashMap::new())))
        .collect();
    for (i, m) in monitors.iter().enumerate() {
        route_monitor(&lab.nodes[i].ns, m.clone());
    }
    std::thread::sleep(Duration::from_millis(500));
    let args = etcd_args("http://127.0.0.1:2379");
    let n = 200u32;
    let puts: Vec<(String, Instant)> = block_on_in_netns(&lab.infra, move || async move {
        let store = Store::connect(&args).await?;
        let lease = store.grant(3600).await?;
        let mut out = Vec::new();
        for i in 5000..5000 + n {
            let (k, v) = fake_lease(i);
            let t = Instant::now();
            store.put(&k, v, lease).await?;
            out.push((format!("10.{}.{}.0/24", 1 + i / 256, i % 256), t));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(out)
    })??;
    let ns0 = lab.nodes[0].ns.clone();
    wait_for("all routes", Duration::from_secs(30), || {
        (monitors
            .iter()
            .all(|m| m.lock().map(|m| m.len() >= n as usize).unwrap_or(false)))
        .then_some(())
    })
    .with_context(|| format!("routes on node1: {}", route_count(&ns0)))?;
    let mut lat = Vec::new();
    for (dst, t) in &puts {
        // Latency to "present on all peers": the slowest node for this lease.
        let worst = monitors
            .iter()
            .filter_map(|m| m.lock().ok().and_then(|m| m.get(dst).copied()))
            .map(|seen| seen.saturating_duration_since(*t).as_secs_f64() * 1000.0)
            .fold(0.0, f64::max);
        lat.push(worst);
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "lease in etcd -> route on all 10 nodes ({} leases): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        lat.len(),
        percentile(&lat, 50.0),
        percentile(&lat, 90.0),
        percentile(&lat, 99.0),
        lat[lat.len() - 1]
    );
    Ok(())
}

fn main() -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    let sections = Sections::from_args();
    let want = |name: &str| sections.want(name);
    if want("peers_1000") {
        bench_1000_peers()?;
    }
    if want("lease_to_route") {
        bench_lease_to_route_latency()?;
    }
    Ok(())
}
