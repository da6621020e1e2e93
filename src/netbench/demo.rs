//! `netbench demo` (what `make demo` runs): a 3-node tartan cluster in network namespaces,
//! pods on two nodes talking across the overlay, a short latency comparison, then cleanup.

use std::time::Duration;

use anyhow::{Context, Result};

use super::probe::{tcp_echo_server, tcp_rr};
use crate::netns_lab::{Binaries, Lab, cleanup_on_signal, require_root};

fn median_us(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v.get(v.len() / 2)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
}

/// Runs the demo with the tartan binaries found in `bin_dir`.
pub fn run(bin_dir: &std::path::Path) -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    println!("== building a 3-node cluster in network namespaces");
    let mut lab = Lab::new(3, Binaries::in_dir(bin_dir))?;
    cleanup_on_signal(&lab.id, &lab.dir)?;
    lab.start_etcd()?;
    lab.init_network(&["--network", "10.244.0.0/16"])?;
    for i in 0..3 {
        lab.start_daemon(i, &[])?;
    }
    for i in 0..3 {
        let s = lab.wait_subnet(i)?;
        println!("   {} ({}) leased {s}", lab.nodes[i].name, lab.nodes[i].ip);
    }
    print!("{}", lab.tartanctl(&["nodes"])?);
    let p1 = lab.add_manual_pod(0, 1)?;
    let p3 = lab.add_manual_pod(2, 1)?;
    println!(
        "== pod {} on node1 -> pod {} on node3 over VXLAN",
        p1.ip, p3.ip
    );
    tcp_echo_server(&p3.ns, 7000)?;
    tcp_echo_server(&lab.nodes[2].ns, 7001)?;
    crate::netns_lab::wait_for("cross-node pod traffic", Duration::from_secs(20), || {
        tcp_rr(&p1.ns, p3.ip, 7000, 1).ok()
    })?;
    // Interleave the two paths in rounds so machine drift cancels.
    let mut pod = Vec::new();
    let mut host = Vec::new();
    for _ in 0..10 {
        pod.extend(tcp_rr(&p1.ns, p3.ip, 7000, 200).context("pod to pod")?);
        host.extend(tcp_rr(&lab.nodes[0].ns, lab.nodes[2].ip, 7001, 200).context("host to host")?);
    }
    let (p, h) = (median_us(pod), median_us(host));
    println!("   TCP request/response, 2000 round trips each, interleaved:");
    println!("   host -> host (underlay)      p50 {h:7.1} us");
    println!(
        "   pod  -> pod  (VXLAN overlay) p50 {p:7.1} us   ({:.2}x the underlay)",
        p / h
    );
    println!("== removing the cluster");
    drop(lab);
    println!("done: every namespace, process and file of the demo is gone");
    Ok(())
}
