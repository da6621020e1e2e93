//! Chaos tests: an etcd leader killed under live traffic, a daemon killed with SIGKILL at
//! random points of a large sync. Real etcd (3 members where it matters), real namespaces,
//! real nftables; each test bounded in time.

mod common;

use std::net::{Ipv4Addr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::*;
use tartan::lab::{in_netns, wait_for};
use tartan::netbench::probe::{tcp_whoami, tcp_whoami_server, udp_whoami_server};

const NET16: &[&str] = &["--network", "10.244.0.0/16"];

/// Sends one datagram every 2 ms from `ns` to `dst:port` (a who-am-I server answers each)
/// until `stop`, waiting up to 1 s for each answer; returns (sent, unanswered).
fn udp_flow(ns: &str, dst: Ipv4Addr, port: u16, stop: Arc<AtomicBool>) -> Result<(u32, u32)> {
    in_netns(ns, move || -> Result<(u32, u32)> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.connect((dst, port))?;
        let (mut sent, mut lost) = (0u32, 0u32);
        let mut buf = [0u8; 256];
        while !stop.load(Ordering::Relaxed) {
            s.send(&sent.to_be_bytes())?;
            sent += 1;
            if s.recv(&mut buf).is_err() {
                lost += 1;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok((sent, lost))
    })?
}

#[test]
fn etcd_leader_sigkill_loses_no_packet_and_new_services_still_arrive() -> Result<()> {
    let Some(mut lab) = lab_with_etcd_members(2, 3, NET16)? else {
        return Ok(());
    };
    lab.start_daemon(0, &[])?;
    lab.start_daemon(1, &[])?;
    lab.wait_subnet(0)?;
    lab.wait_subnet(1)?;
    let client = lab.add_cni_pod(0, "client", &[("app", "client")])?;
    let server = lab.add_cni_pod(1, "server", &[("app", "web")])?;
    tcp_whoami_server(&server.ns, 8080, "server")?;
    udp_whoami_server(&server.ns, 5353, "server")?;
    wait_pod_path(&client.ns, server.ip)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flow = {
        let (ns, stop) = (client.ns.clone(), stop.clone());
        std::thread::spawn(move || udp_flow(&ns, server.ip, 5353, stop))
    };
    std::thread::sleep(Duration::from_millis(300));
    let leader = lab.etcd_leader()?;
    lab.stop_etcd_member(leader);
    let killed = Instant::now();
    // Written within a second of the leader's death: the write must wait for the new leader
    // (within its deadline) rather than fail.
    let out = lab.tartanctl(&[
        "service",
        "create",
        "web",
        "--port",
        "80:8080/tcp",
        "--selector",
        "app=web",
    ])?;
    let vip = tartan::netbench::topology::created_cluster_ip(&out)?;
    let ns = client.ns.clone();
    let seen = wait_for(
        "the new service to answer from node1's pod",
        Duration::from_secs(20),
        || tcp_whoami(&ns, vip, 80, Duration::from_secs(1)).ok(),
    )?;
    eprintln!(
        "leader m{leader} killed: service created and reachable after {:.2} s (answered by {})",
        killed.elapsed().as_secs_f64(),
        seen.name
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (sent, lost) = flow
        .join()
        .map_err(|_| anyhow::anyhow!("flow thread panicked"))??;
    eprintln!("pod flow during the leader change: {sent} datagrams, {lost} unanswered");
    ensure!(sent > 100, "the flow hardly ran ({sent} datagrams)");
    ensure!(
        lost == 0,
        "{lost} of {sent} datagrams of an established pod flow were lost while etcd changed leader"
    );
    Ok(())
}

/// Waits until `ns` gets an answer from the who-am-I server on `ip:8080` (the path is up).
fn wait_pod_path(ns: &str, ip: Ipv4Addr) -> Result<()> {
    let ns = ns.to_string();
    wait_for("the pod path", Duration::from_secs(20), || {
        tcp_whoami(&ns, ip, 8080, Duration::from_secs(1)).ok()
    })
    .map(|_| ())
}

#[test]
fn sigkill_at_random_points_of_a_large_sync_leaves_a_table_that_matches_etcd() -> Result<()> {
    use rand::RngExt;
    let Some(mut lab) = lab(1, NET16)? else {
        return Ok(());
    };
    tartan::netbench::service_bed::load_bulk_services(&lab, 3000)?;
    let log = lab.nodes[0].log_file();
    let synced = |log: &std::path::Path| {
        std::fs::read_to_string(log)
            .map(|t| t.matches("service table fully synced").count())
            .unwrap_or(0)
    };
    // How long one full sync takes here, so the kills land inside one.
    let t = Instant::now();
    lab.start_daemon(0, &[])?;
    wait_for("the first full sync", Duration::from_secs(60), || {
        (synced(&log) >= 1).then_some(())
    })?;
    let sync = t.elapsed();
    let mut rng = rand::rng();
    for round in 0..4 {
        lab.kill_daemon(0)?;
        let before = synced(&log);
        lab.start_daemon(0, &[])?;
        let at = Duration::from_millis(rng.random_range(0..=sync.as_millis().max(1) as u64));
        std::thread::sleep(at);
        lab.kill_daemon(0)?;
        eprintln!(
            "round {round}: SIGKILL {} ms into a ~{} ms sync (it had {}finished)",
            at.as_millis(),
            sync.as_millis(),
            if synced(&log) > before { "" } else { "not " }
        );
    }
    let before = synced(&log);
    let t = Instant::now();
    lab.start_daemon(0, &[])?;
    wait_for(
        "the full sync after the kills",
        Duration::from_secs(60),
        || (synced(&log) > before).then_some(()),
    )?;
    eprintln!(
        "restart after the kills -> table synced in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let node = lab.nodes[0].ns.clone();
    let tables = tartan::lab::ns_run(&node, "nft", &["list", "tables"])?;
    ensure!(
        tables.matches("tartan_svc").count() == 1,
        "a half-built table was left beside the one in force: {tables}"
    );
    let want = expected_elements(&lab, &[lab.nodes[0].name.clone()])?;
    let want = want.first().context("no expected table")?;
    ensure!(want.len() > 3000, "too little to compare: {}", want.len());
    wait_table_matches(&lab, 0, want)
}
