//! Overlay tests: real etcd, real namespaces, real netlink and nftables.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::*;
use tartan::lab::{Lab, in_netns, ip, ns_run, wait_for};

const NET16: &[&str] = &["--network", "10.244.0.0/16"];

fn subnet_key(s: ipnetwork::Ipv4Network) -> String {
    format!("/coreos.com/network/subnets/{}-{}", s.network(), s.prefix())
}

/// The overlay entries a node holds, as `ip` prints them.
fn overlay_text(lab: &Lab, i: usize) -> Result<(String, String, String)> {
    let ns = &lab.nodes[i].ns;
    let routes = ip(&["-n", ns, "route", "show", "proto", "157"])?;
    let neigh = ip(&["-n", ns, "neigh", "show", "dev", "tartan.1"]).unwrap_or_default();
    let fdb = ns_run(ns, "bridge", &["fdb", "show", "dev", "tartan.1"]).unwrap_or_default();
    Ok((routes, neigh, fdb))
}

fn vtep_mac(lab: &Lab, i: usize) -> Result<String> {
    let out = ip(&["-n", &lab.nodes[i].ns, "-o", "link", "show", "tartan.1"])?;
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_string)
        .context("no MAC on tartan.1")
}

fn ifindex(lab: &Lab, i: usize, dev: &str) -> Result<String> {
    let out = ip(&["-n", &lab.nodes[i].ns, "-o", "link", "show", dev])?;
    Ok(out.split(':').next().unwrap_or_default().to_string())
}

fn wait_route(lab: &Lab, i: usize, subnet: ipnetwork::Ipv4Network, present: bool) -> Result<()> {
    let ns = lab.nodes[i].ns.clone();
    let needle = format!("{} via", subnet);
    wait_for(
        &format!(
            "route {subnet} {} on {}",
            if present { "present" } else { "absent" },
            lab.nodes[i].name
        ),
        Duration::from_secs(20),
        || {
            let r = ip(&["-n", &ns, "route", "show", "proto", "157"]).ok()?;
            (r.contains(&needle) == present).then_some(())
        },
    )
}

/// Waits until node `i` has all of node `j`'s entries: route, neighbour and FDB entry (they
/// are programmed one after the other; a route alone does not mean the peer is complete).
fn wait_peer(lab: &Lab, i: usize, j: usize) -> Result<()> {
    let subnet = lab.wait_subnet(j)?;
    let mac = vtep_mac(lab, j)?;
    wait_entries(
        lab,
        i,
        subnet,
        &mac,
        lab.nodes[j].ip,
        &format!("node {j}'s"),
    )
}

/// Waits until node `i` holds a peer's route to `subnet`, its neighbour entry (`mac`) and its
/// FDB entry (`mac` → underlay `ip`); `whose` names the peer in the error.
fn wait_entries(
    lab: &Lab,
    i: usize,
    subnet: ipnetwork::Ipv4Network,
    mac: &str,
    ip: std::net::Ipv4Addr,
    whose: &str,
) -> Result<()> {
    let gw = subnet.network();
    wait_for(
        &format!("{whose} route, neighbour and FDB entry on node {i}"),
        Duration::from_secs(20),
        || {
            let (routes, neigh, fdb) = overlay_text(lab, i).ok()?;
            (routes.contains(&format!("{subnet} via {gw} dev tartan.1 onlink"))
                && neigh.contains(&format!("{gw} lladdr {mac} PERMANENT"))
                && fdb.contains(&format!("{mac} dst {ip} self permanent")))
            .then_some(())
        },
    )
}

/// Two nodes running tartand, node 1 holding all of node 2's overlay entries.
fn two_peered_nodes() -> Result<Option<Lab>> {
    let Some(mut lab) = lab(2, NET16)? else {
        return Ok(None);
    };
    lab.start_daemon(0, &[])?;
    lab.start_daemon(1, &[])?;
    wait_peer(&lab, 0, 1)?;
    Ok(Some(lab))
}

#[test]
fn three_nodes_distinct_subnets_and_cross_node_tcp() -> Result<()> {
    let Some(mut lab) = lab(3, NET16)? else {
        return Ok(());
    };
    for i in 0..3 {
        lab.start_daemon(i, &[])?;
    }
    let subnets: Vec<_> = (0..3).map(|i| lab.wait_subnet(i)).collect::<Result<_>>()?;
    ensure!(subnets[0] != subnets[1] && subnets[1] != subnets[2] && subnets[0] != subnets[2]);
    // Stored in flannel's layout and format.
    for (i, s) in subnets.iter().enumerate() {
        let v = lab.etcdctl(&["get", "--print-value-only", &subnet_key(*s)])?;
        let json: serde_json::Value =
            serde_json::from_str(v.trim()).with_context(|| format!("lease value {v:?}"))?;
        ensure!(json["PublicIP"] == lab.nodes[i].ip.to_string(), "{json}");
        ensure!(json["BackendType"] == "vxlan", "{json}");
        ensure!(json["BackendData"]["VNI"] == 1, "{json}");
        ensure!(
            json["BackendData"]["VtepMAC"] == vtep_mac(&lab, i)?,
            "{json}"
        );
    }
    // subnet.env in flannel's format.
    let env = std::fs::read_to_string(lab.nodes[0].subnet_file())?;
    ensure!(env.contains("FLANNEL_NETWORK=10.244.0.0/16\n"), "{env}");
    ensure!(
        env.contains(&format!(
            "FLANNEL_SUBNET={}/24\n",
            std::net::Ipv4Addr::from(u32::from(subnets[0].network()) + 1)
        )),
        "{env}"
    );
    ensure!(
        env.contains("FLANNEL_MTU=1450\n") && env.contains("FLANNEL_IPMASQ=true\n"),
        "{env}"
    );
    let p1 = lab.add_manual_pod(0, 1)?;
    let p3 = lab.add_manual_pod(2, 1)?;
    echo_server(&p3.ns, 7000)?;
    wait_tcp_echo(&p1.ns, p3.ip, 7000, Duration::from_secs(20))?;
    // Exactly flannel's entries on node 1 towards node 3.
    let (routes, neigh, fdb) = overlay_text(&lab, 0)?;
    let gw3 = subnets[2].network();
    ensure!(
        routes.contains(&format!("{} via {gw3} dev tartan.1 onlink", subnets[2])),
        "{routes}"
    );
    let mac3 = vtep_mac(&lab, 2)?;
    ensure!(
        neigh.contains(&format!("{gw3} lladdr {mac3} PERMANENT")),
        "{neigh}"
    );
    ensure!(
        fdb.contains(&format!("{mac3} dst {} self permanent", lab.nodes[2].ip)),
        "{fdb}"
    );
    // The device: learning off, VNI/port from config, address <subnet>.0/32.
    let dev = ip(&["-n", &lab.nodes[0].ns, "-d", "addr", "show", "tartan.1"])?;
    ensure!(
        dev.contains("vxlan id 1 ") && dev.contains("dstport 8472") && dev.contains("nolearning"),
        "{dev}"
    );
    ensure!(
        dev.contains(&format!("inet {}/32", subnets[0].network())),
        "{dev}"
    );
    // tartanctl nodes lists the three leases.
    let nodes = lab.tartanctl(&["nodes"])?;
    for n in ["node1", "node2", "node3"] {
        ensure!(nodes.contains(n), "{nodes}");
    }
    // Metrics are served on the node's loopback.
    let metrics = in_netns(&lab.nodes[0].ns.clone(), || {
        http_get("127.0.0.1:9402", "/metrics")
    })??;
    for m in [
        "tartan_overlay_peers 2",
        "tartan_overlay_reconcile_runs_total",
        "tartan_overlay_reconcile_errors_total",
        "tartan_lease_renewals_total",
        "tartan_overlay_peer_program_seconds_bucket",
    ] {
        ensure!(metrics.contains(m), "metric {m} missing in:\n{metrics}");
    }
    Ok(())
}

fn http_get(addr: &str, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn restart_keeps_subnet_mac_device_and_open_connection() -> Result<()> {
    let Some(mut lab) = lab(2, NET16)? else {
        return Ok(());
    };
    lab.start_daemon(0, &[])?;
    lab.start_daemon(1, &[])?;
    let s0 = lab.wait_subnet(0)?;
    let p1 = lab.add_manual_pod(0, 1)?;
    let p2 = lab.add_manual_pod(1, 1)?;
    echo_server(&p2.ns, 7001)?;
    wait_tcp_echo(&p1.ns, p2.ip, 7001, Duration::from_secs(20))?;
    let mac_before = vtep_mac(&lab, 0)?;
    let idx_before = ifindex(&lab, 0, "tartan.1")?;
    // A connection that stays open across both daemons' restarts.
    let target = SocketAddr::from((p2.ip, 7001));
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let client = std::thread::spawn({
        let ns = p1.ns.clone();
        move || -> Result<()> {
            in_netns(&ns, move || -> Result<()> {
                let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut buf = [0u8; 5];
                s.write_all(b"first")?;
                s.read_exact(&mut buf)?;
                ready_tx.send(()).ok();
                go_rx.recv().ok();
                s.write_all(b"again")?;
                s.read_exact(&mut buf)?;
                ensure!(&buf == b"again");
                Ok(())
            })?
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(10))?;
    lab.stop_daemon(0)?;
    lab.stop_daemon(1)?;
    // SIGTERM leaves the dataplane: traffic flows with no daemon at all.
    tcp_echo(&p1.ns, p2.ip, 7001, b"no daemons")?;
    lab.start_daemon(0, &[])?;
    lab.start_daemon(1, &[])?;
    // Wait until the restarted daemon has reconciled (its log says it holds the subnet).
    wait_for(
        "restarted daemon to hold its subnet",
        Duration::from_secs(20),
        || {
            let log = std::fs::read_to_string(lab.nodes[0].log_file()).ok()?;
            (log.matches("holding subnet").count() >= 2).then_some(())
        },
    )?;
    std::thread::sleep(Duration::from_millis(300));
    go_tx.send(())?;
    client
        .join()
        .map_err(|_| anyhow::anyhow!("client panicked"))??;
    ensure!(lab.wait_subnet(0)? == s0, "subnet changed across restart");
    ensure!(
        vtep_mac(&lab, 0)? == mac_before,
        "VTEP MAC changed across restart"
    );
    ensure!(
        ifindex(&lab, 0, "tartan.1")? == idx_before,
        "device was re-created"
    );
    let log = std::fs::read_to_string(lab.nodes[0].log_file())?;
    ensure!(
        log.contains("kept the subnet this node held before"),
        "{log}"
    );
    // Even with the state directory lost, the node name gives back the same MAC and subnet.
    lab.stop_daemon(0)?;
    std::fs::remove_dir_all(lab.nodes[0].dir.join("state"))?;
    lab.start_daemon(0, &[])?;
    wait_for("third start", Duration::from_secs(20), || {
        let log = std::fs::read_to_string(lab.nodes[0].log_file()).ok()?;
        (log.matches("holding subnet").count() >= 3).then_some(())
    })?;
    ensure!(lab.wait_subnet(0)? == s0);
    ensure!(vtep_mac(&lab, 0)? == mac_before);
    Ok(())
}

#[test]
fn deleted_lease_removes_peer_entries_everywhere() -> Result<()> {
    let Some(mut lab) = lab(3, NET16)? else {
        return Ok(());
    };
    for i in 0..3 {
        lab.start_daemon(i, &[])?;
    }
    let s3 = lab.wait_subnet(2)?;
    let mac3 = vtep_mac(&lab, 2)?;
    for i in 0..2 {
        wait_route(&lab, i, s3, true)?;
    }
    // A dead node (daemon stopped) whose lease is deleted disappears from every peer.
    lab.stop_daemon(2)?;
    lab.etcdctl(&["del", &subnet_key(s3)])?;
    for i in 0..2 {
        wait_route(&lab, i, s3, false)?;
        let (routes, neigh, fdb) = overlay_text(&lab, i)?;
        ensure!(!routes.contains(&s3.to_string()), "{routes}");
        ensure!(!neigh.contains(&s3.network().to_string()), "{neigh}");
        ensure!(!fdb.contains(&mac3), "{fdb}");
    }
    // A live node whose key is deleted by accident takes its subnet back.
    let s2 = lab.wait_subnet(1)?;
    lab.etcdctl(&["del", &subnet_key(s2)])?;
    wait_for(
        "node2 to re-create its key",
        Duration::from_secs(20),
        || {
            let v = lab
                .etcdctl(&["get", "--print-value-only", &subnet_key(s2)])
                .ok()?;
            (!v.trim().is_empty()).then_some(())
        },
    )?;
    wait_route(&lab, 0, s2, true)?;
    Ok(())
}

#[test]
fn twenty_daemons_at_once_on_a_slash19() -> Result<()> {
    let Some(mut lab) = lab(20, &["--network", "10.50.0.0/19", "--subnet-len", "24"])? else {
        return Ok(());
    };
    for i in 0..20 {
        lab.start_daemon(i, &[])?;
    }
    let mut subnets = Vec::new();
    for i in 0..20 {
        subnets.push(lab.wait_subnet(i)?);
    }
    let distinct: std::collections::HashSet<_> = subnets.iter().collect();
    ensure!(distinct.len() == 20, "duplicate subnets: {subnets:?}");
    for i in 0..20 {
        ensure!(
            lab.daemon_running(i),
            "daemon {i} died:\n{}",
            lab.log_tail(i, 20)
        );
    }
    let listing = lab.etcdctl(&[
        "get",
        "--prefix",
        "--keys-only",
        "/coreos.com/network/subnets/",
    ])?;
    ensure!(
        listing.lines().filter(|l| !l.trim().is_empty()).count() == 20,
        "{listing}"
    );
    // Every node sees the 19 others.
    for i in [0, 19] {
        let ns = lab.nodes[i].ns.clone();
        wait_for("19 peer routes", Duration::from_secs(30), || {
            let r = ip(&["-n", &ns, "route", "show", "proto", "157"]).ok()?;
            (r.lines().count() == 19).then_some(())
        })?;
    }
    Ok(())
}

#[test]
fn hand_deleted_entries_and_device_are_repaired() -> Result<()> {
    let Some(mut lab) = lab(2, NET16)? else {
        return Ok(());
    };
    lab.start_daemon(0, &["--resync-secs", "3600"])?;
    lab.start_daemon(1, &[])?;
    let s2 = lab.wait_subnet(1)?;
    wait_route(&lab, 0, s2, true)?;
    let ns = lab.nodes[0].ns.clone();
    let gw = s2.network().to_string();
    let mac2 = vtep_mac(&lab, 1)?;
    // The periodic resync is an hour away: repair must come from kernel notifications.
    let t = Instant::now();
    ip(&["-n", &ns, "route", "del", &s2.to_string()])?;
    wait_route(&lab, 0, s2, true)?;
    eprintln!("route repaired in {:?}", t.elapsed());
    let t = Instant::now();
    ip(&["-n", &ns, "neigh", "del", &gw, "dev", "tartan.1"])?;
    wait_for("neighbour back", Duration::from_secs(10), || {
        let n = ip(&["-n", &ns, "neigh", "show", "dev", "tartan.1"]).ok()?;
        n.contains(&gw).then_some(())
    })?;
    eprintln!("neighbour repaired in {:?}", t.elapsed());
    let t = Instant::now();
    ns_run(
        &ns,
        "bridge",
        &[
            "fdb",
            "del",
            &mac2,
            "dev",
            "tartan.1",
            "dst",
            &lab.nodes[1].ip.to_string(),
        ],
    )?;
    wait_for("fdb back", Duration::from_secs(10), || {
        let f = ns_run(&ns, "bridge", &["fdb", "show", "dev", "tartan.1"]).ok()?;
        f.contains(&mac2).then_some(())
    })?;
    eprintln!("fdb repaired in {:?}", t.elapsed());
    let t = Instant::now();
    ip(&["-n", &ns, "link", "del", "tartan.1"])?;
    wait_route(&lab, 0, s2, true)?;
    eprintln!("device and route repaired in {:?}", t.elapsed());
    let p1 = lab.add_manual_pod(0, 1)?;
    let p2 = lab.add_manual_pod(1, 1)?;
    echo_server(&p2.ns, 7002)?;
    wait_tcp_echo(&p1.ns, p2.ip, 7002, Duration::from_secs(20))?;
    // The masquerade table is restored too (on the next resync of node 2).
    let ns2 = lab.nodes[1].ns.clone();
    ns_run(&ns2, "nft", &["delete", "table", "ip", "tartan_masq"])?;
    wait_for("masquerade table restored", Duration::from_secs(20), || {
        ns_run(&ns2, "nft", &["list", "table", "ip", "tartan_masq"]).ok()
    })?;
    Ok(())
}

#[test]
fn garbage_in_etcd_is_skipped_without_crash_or_flush() -> Result<()> {
    let Some(mut lab) = two_peered_nodes()? else {
        return Ok(());
    };
    let before = overlay_text(&lab, 0)?;
    lab.etcdctl(&[
        "put",
        "/coreos.com/network/subnets/10.244.200.0-24",
        "{garbage",
    ])?;
    lab.etcdctl(&["put", "/coreos.com/network/subnets/not-a-key", "{}"])?;
    lab.etcdctl(&[
        "put",
        "/coreos.com/network/subnets/10.244.201.0-24",
        r#"{"PublicIP":"192.168.77.99","BackendType":"vxlan","BackendData":{"VtepMAC":"not-a-mac"}}"#,
    ])?;
    lab.etcdctl(&["put", "/coreos.com/network/config", "]]] not json"])?;
    // Give the daemons a resync period to misbehave.
    std::thread::sleep(Duration::from_secs(6));
    for i in 0..2 {
        ensure!(
            lab.daemon_running(i),
            "daemon {i} died:\n{}",
            lab.log_tail(i, 30)
        );
    }
    let after = overlay_text(&lab, 0)?;
    ensure!(
        after == before,
        "overlay changed after garbage:\nbefore {before:#?}\nafter {after:#?}"
    );
    let p1 = lab.add_manual_pod(0, 1)?;
    let p2 = lab.add_manual_pod(1, 1)?;
    echo_server(&p2.ns, 7003)?;
    wait_tcp_echo(&p1.ns, p2.ip, 7003, Duration::from_secs(20))?;
    // A daemon started on the garbage config waits and says why, without exiting.
    let idx = lab.add_node()?;
    lab.start_daemon(idx, &[])?;
    wait_for(
        "complaint about the config",
        Duration::from_secs(20),
        || {
            let log = std::fs::read_to_string(lab.nodes[idx].log_file()).ok()?;
            log.contains("invalid network config").then_some(())
        },
    )?;
    ensure!(lab.daemon_running(idx));
    // Fixing the config lets it join.
    lab.init_network(&["--network", "10.244.0.0/16", "--force"])?;
    let s3 = lab.wait_subnet(idx)?;
    wait_route(&lab, 0, s3, true)?;
    // The garbage subnet keys were never used and never overwritten.
    let g = lab.etcdctl(&[
        "get",
        "--print-value-only",
        "/coreos.com/network/subnets/10.244.200.0-24",
    ])?;
    ensure!(
        g.trim() == "{garbage",
        "the garbage key now holds {g:?}; node 3's log:\n{}",
        lab.log_tail(idx, 40)
    );
    Ok(())
}

#[test]
fn foreign_nftables_and_iptables_rules_are_untouched() -> Result<()> {
    let Some(mut lab) = lab(2, NET16)? else {
        return Ok(());
    };
    let ns = lab.nodes[0].ns.clone();
    ns_run(
        &ns,
        "nft",
        &[
            "add table inet foreign; add chain inet foreign input { type filter hook input priority 0; policy accept; }; add rule inet foreign input tcp dport 9999 counter accept",
        ],
    )?;
    ns_run(
        &ns,
        "iptables",
        &["-A", "FORWARD", "-s", "203.0.113.7", "-j", "ACCEPT"],
    )?;
    ns_run(
        &ns,
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-d",
            "203.0.113.8",
            "-j",
            "RETURN",
        ],
    )?;
    let snapshot = |ns: &str| -> Result<(String, String)> {
        let nft = ns_run(ns, "nft", &["list", "table", "inet", "foreign"])?;
        let ipt: String = ns_run(ns, "iptables-save", &[])?
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        Ok((nft, ipt))
    };
    let before = snapshot(&ns)?;
    lab.start_daemon(0, &[])?;
    lab.start_daemon(1, &[])?;
    let s2 = lab.wait_subnet(1)?;
    wait_route(&lab, 0, s2, true)?;
    ensure!(
        snapshot(&ns)? == before,
        "foreign rules changed while running"
    );
    lab.stop_daemon(0)?;
    ensure!(snapshot(&ns)? == before, "foreign rules changed after stop");
    lab.start_daemon(0, &[])?;
    wait_route(&lab, 0, s2, true)?;
    lab.tartanctl(&["node", "leave", "node1"])?;
    wait_for("node1 to leave", Duration::from_secs(20), || {
        (!lab.daemon_running(0)).then_some(())
    })?;
    ensure!(
        snapshot(&ns)? == before,
        "foreign rules changed after leave"
    );
    Ok(())
}

#[test]
fn node_leave_releases_subnet_and_removes_dataplane() -> Result<()> {
    let Some(mut lab) = lab(2, NET16)? else {
        return Ok(());
    };
    lab.start_daemon(0, &[])?;
    lab.start_daemon(1, &[])?;
    let s1 = lab.wait_subnet(0)?;
    wait_route(&lab, 1, s1, true)?;
    lab.tartanctl(&["node", "leave", "node1"])?;
    wait_for("node1 daemon to exit", Duration::from_secs(20), || {
        (!lab.daemon_running(0)).then_some(())
    })?;
    let ns = lab.nodes[0].ns.clone();
    ensure!(
        ip(&["-n", &ns, "link", "show", "tartan.1"]).is_err(),
        "device still there"
    );
    ensure!(
        ns_run(&ns, "nft", &["list", "table", "ip", "tartan_masq"]).is_err(),
        "masquerade table still there"
    );
    ensure!(
        !lab.nodes[0].subnet_file().exists(),
        "subnet.env still there"
    );
    let v = lab.etcdctl(&["get", "--print-value-only", &subnet_key(s1)])?;
    ensure!(v.trim().is_empty(), "subnet key still there: {v}");
    wait_route(&lab, 1, s1, false)?;
    // `tartand --leave` on a node whose daemon is stopped does the same locally.
    lab.stop_daemon(1)?;
    let s2 = lab.wait_subnet(1)?;
    lab.leave(1)?;
    let node = &lab.nodes[1];
    ensure!(ip(&["-n", &node.ns, "link", "show", "tartan.1"]).is_err());
    let v = lab.etcdctl(&["get", "--print-value-only", &subnet_key(s2)])?;
    ensure!(v.trim().is_empty(), "subnet key still there: {v}");
    Ok(())
}

#[test]
fn reservation_is_honoured_and_never_becomes_a_lease() -> Result<()> {
    let Some(mut lab) = lab(2, NET16)? else {
        return Ok(());
    };
    // An operator reserves 10.244.77.0/24 for node1's address.
    lab.etcdctl(&[
        "put",
        "/coreos.com/network/subnets/10.244.77.0-24",
        &format!(r#"{{"PublicIP":"{}"}}"#, lab.nodes[0].ip),
    ])?;
    lab.start_daemon(0, &[])?;
    lab.start_daemon(1, &[])?;
    ensure!(lab.wait_subnet(0)? == "10.244.77.0/24".parse()?);
    ensure!(lab.wait_subnet(1)? != "10.244.77.0/24".parse()?);
    let lease_of = |lab: &Lab| -> Result<i64> {
        let j = lab.etcdctl(&[
            "get",
            "-w",
            "json",
            "/coreos.com/network/subnets/10.244.77.0-24",
        ])?;
        let v: serde_json::Value = serde_json::from_str(&j)?;
        Ok(v["kvs"][0]["lease"].as_i64().unwrap_or(0))
    };
    ensure!(lease_of(&lab)? == 0, "reservation got a lease");
    lab.stop_daemon(0)?;
    lab.start_daemon(0, &[])?;
    wait_for("restart", Duration::from_secs(20), || {
        let log = std::fs::read_to_string(lab.nodes[0].log_file()).ok()?;
        (log.matches("using reserved subnet").count() >= 2).then_some(())
    })?;
    ensure!(
        lease_of(&lab)? == 0,
        "reservation became a lease after restart"
    );
    // Peers see the reserved node (the value now carries its VTEP MAC).
    wait_route(&lab, 1, "10.244.77.0/24".parse()?, true)?;
    // Leaving keeps the reservation.
    lab.tartanctl(&["node", "leave", "node1"])?;
    let v = lab.etcdctl(&[
        "get",
        "--print-value-only",
        "/coreos.com/network/subnets/10.244.77.0-24",
    ])?;
    ensure!(!v.trim().is_empty(), "reservation deleted by leave");
    Ok(())
}

#[test]
fn exhausted_network_is_reported_and_retried() -> Result<()> {
    // A /22 with /24 subnets has 3 leasable subnets.
    let Some(mut lab) = lab(4, &["--network", "10.9.0.0/22", "--subnet-len", "24"])? else {
        return Ok(());
    };
    for i in 0..3 {
        lab.start_daemon(i, &[])?;
        lab.wait_subnet(i)?;
    }
    lab.start_daemon(3, &[])?;
    wait_for("exhaustion error", Duration::from_secs(20), || {
        let log = std::fs::read_to_string(lab.nodes[3].log_file()).ok()?;
        log.contains("subnet space exhausted").then_some(())
    })?;
    let complaints = |lab: &Lab| {
        std::fs::read_to_string(lab.nodes[3].log_file())
            .unwrap_or_default()
            .matches("subnet space exhausted")
            .count()
    };
    let c0 = complaints(&lab);
    std::thread::sleep(Duration::from_secs(3));
    let c1 = complaints(&lab);
    ensure!(lab.daemon_running(3), "daemon exited on exhaustion");
    // The backoff draws each delay from [250 ms, current] (full jitter, 500 ms base), so at
    // most 12 retries fit in 3 s even when every draw is the shortest; a spinning loop would
    // log thousands. (A bound of 4 failed on a brand-new root: 5 short draws in a row.)
    ensure!(
        c1 - c0 <= 12,
        "retrying without backoff: {c0} -> {c1} in 3 s"
    );
    lab.tartanctl(&["node", "leave", "node2"])?;
    let s = lab.wait_subnet(3)?;
    ensure!(s.prefix() == 24);
    Ok(())
}

#[test]
fn direct_routing_uses_the_underlay_for_same_l2_peers() -> Result<()> {
    let Some(mut lab) = lab(2, &["--network", "10.244.0.0/16", "--direct-routing"])? else {
        return Ok(());
    };
    lab.start_daemon(0, &[])?;
    lab.start_daemon(1, &[])?;
    let s2 = lab.wait_subnet(1)?;
    let ns = lab.nodes[0].ns.clone();
    let want = format!("{s2} via {} dev eth0", lab.nodes[1].ip);
    wait_for("direct route", Duration::from_secs(20), || {
        let r = ip(&["-n", &ns, "route", "show", "proto", "157"]).ok()?;
        r.contains(&want).then_some(())
    })?;
    let p1 = lab.add_manual_pod(0, 1)?;
    let p2 = lab.add_manual_pod(1, 1)?;
    echo_server(&p2.ns, 7004)?;
    wait_tcp_echo(&p1.ns, p2.ip, 7004, Duration::from_secs(20))?;
    Ok(())
}

#[test]
fn compacted_watch_revision_triggers_a_relist() -> Result<()> {
    let Some(mut lab) = lab(2, NET16)? else {
        return Ok(());
    };
    lab.start_daemon(0, &[])?;
    lab.wait_subnet(0)?;
    wait_for("node1 to program", Duration::from_secs(20), || {
        ip(&["-n", &lab.nodes[0].ns, "link", "show", "tartan.1"]).ok()
    })?;
    // Freeze the daemon and restart etcd under it, so its watch stream is broken; then change
    // and compact history. On waking up it must resume from a compacted revision, and only a
    // relist can show it the new peer.
    let pid = lab.nodes[0]
        .daemon
        .as_ref()
        .map(|c| c.id())
        .context("no daemon")?;
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
    lab.stop_etcd();
    lab.start_etcd()?;
    let fake = r#"{"PublicIP":"192.168.77.250","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:aa:bb:cc:dd:ee"}}"#;
    lab.etcdctl(&["put", "/coreos.com/network/subnets/10.244.250.0-24", fake])?;
    for i in 0..5 {
        lab.etcdctl(&["put", "/unrelated/key", &i.to_string()])?;
    }
    let status = lab.etcdctl(&["endpoint", "status", "-w", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&status)?;
    let rev = v[0]["Status"]["header"]["revision"]
        .as_i64()
        .context("revision")?;
    lab.etcdctl(&["compact", &rev.to_string()])?;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT)?;
    wait_route(&lab, 0, "10.244.250.0/24".parse()?, true)?;
    let log = std::fs::read_to_string(lab.nodes[0].log_file())?;
    ensure!(log.contains("relisting"), "no relist logged:\n{log}");
    Ok(())
}

#[test]
fn etcd_outage_keeps_traffic_flowing_and_daemons_resync() -> Result<()> {
    let Some(mut lab) = lab(3, NET16)? else {
        return Ok(());
    };
    lab.start_daemon(0, &[])?;
    lab.start_daemon(1, &[])?;
    let s2 = lab.wait_subnet(1)?;
    wait_route(&lab, 0, s2, true)?;
    let p1 = lab.add_manual_pod(0, 1)?;
    let p2 = lab.add_manual_pod(1, 1)?;
    echo_server(&p2.ns, 7005)?;
    wait_tcp_echo(&p1.ns, p2.ip, 7005, Duration::from_secs(20))?;
    let before = overlay_text(&lab, 0)?;
    lab.stop_etcd();
    let start = Instant::now();
    let mut rounds = 0;
    while start.elapsed() < Duration::from_secs(30) {
        if let Err(e) = tcp_echo(&p1.ns, p2.ip, 7005, b"during the outage") {
            bail!(
                "traffic broke {:?} into the etcd outage: {e:#}",
                start.elapsed()
            );
        }
        rounds += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    ensure!(rounds > 20);
    for i in 0..2 {
        ensure!(
            lab.daemon_running(i),
            "daemon {i} died during the outage:\n{}",
            lab.log_tail(i, 30)
        );
    }
    ensure!(
        overlay_text(&lab, 0)? == before,
        "overlay changed during the outage"
    );
    lab.start_etcd()?;
    // After etcd returns, a new node appears on the old ones.
    lab.start_daemon(2, &[])?;
    let s3 = lab.wait_subnet(2)?;
    wait_route(&lab, 0, s3, true)?;
    let p3 = lab.add_manual_pod(2, 1)?;
    echo_server(&p3.ns, 7006)?;
    wait_tcp_echo(&p1.ns, p3.ip, 7006, Duration::from_secs(20))?;
    Ok(())
}

#[test]
fn etcd_over_tls_with_client_certificates() -> Result<()> {
    if !tartan::lab::require_root()? {
        return Ok(());
    }
    let mut lab = Lab::new(2, bins())?;
    lab.enable_tls()?;
    lab.start_etcd()?;
    lab.init_network(NET16)?;
    lab.start_daemon(0, &[])?;
    lab.start_daemon(1, &[])?;
    let s2 = lab.wait_subnet(1)?;
    wait_route(&lab, 0, s2, true)?;
    ensure!(lab.tartanctl(&["nodes"])?.contains("node2"));
    // Without a client certificate the server refuses, and the CLI says so in one line.
    let out = tartan::lab::ns_command(&lab.infra, &lab.bins.tartanctl)
        .args([
            "--etcd-endpoints",
            "https://127.0.0.1:2379",
            "--etcd-cacert",
            &lab.dir.join("tls/ca.pem").to_string_lossy(),
            "nodes",
        ])
        .output()?;
    ensure!(
        !out.status.success(),
        "tartanctl without a client certificate succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.starts_with("tartanctl: "), "{err}");
    Ok(())
}

#[test]
fn several_etcd_endpoints_survive_a_member_loss() -> Result<()> {
    let Some(mut lab) = lab_with_etcd_members(3, 3, NET16)? else {
        return Ok(());
    };
    ensure!(lab.etcd_endpoint().split(',').count() == 3);
    lab.start_daemon(0, &[])?;
    lab.start_daemon(1, &[])?;
    let s2 = lab.wait_subnet(1)?;
    wait_route(&lab, 0, s2, true)?;
    lab.stop_etcd_member(0);
    lab.start_daemon(2, &[])?;
    let s3 = lab.wait_subnet(2)?;
    wait_route(&lab, 0, s3, true)?;
    wait_route(&lab, 1, s3, true)?;
    Ok(())
}

#[test]
fn a_stray_lease_with_a_live_nodes_mac_never_displaces_it() -> Result<()> {
    // A lease-less key that sorts before node2's lease and carries node2's VTEP MAC (a copy
    // left by hand, a restored backup...) used to win on every peer: node2's FDB entry then
    // pointed at the stray's address and node2's pods were cut off.
    let Some(lab) = two_peered_nodes()? else {
        return Ok(());
    };
    let before = overlay_text(&lab, 0)?;
    let mac = vtep_mac(&lab, 1)?;
    let stray = "/coreos.com/network/subnets/10.244.0.0-24";
    lab.etcdctl(&[
        "put",
        stray,
        &format!(
            r#"{{"PublicIP":"192.168.77.98","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
        ),
    ])?;
    // A valid lease written after the stray: once node1 routes it, it has seen the stray.
    let marker: ipnetwork::Ipv4Network = "10.244.254.0/24".parse()?;
    lab.etcdctl(&[
        "put",
        &subnet_key(marker),
        r#"{"PublicIP":"192.168.77.97","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:97"}}"#,
    ])?;
    wait_route(&lab, 0, marker, true)?;
    let (routes, neigh, fdb) = overlay_text(&lab, 0)?;
    ensure!(
        !routes.contains("10.244.0.0/24") && !fdb.contains("192.168.77.98"),
        "the stray lease was programmed:\nroutes {routes}\nfdb {fdb}"
    );
    for line in before
        .0
        .lines()
        .chain(before.1.lines())
        .chain(before.2.lines())
    {
        ensure!(
            routes.contains(line) || neigh.contains(line) || fdb.contains(line),
            "node2's entry {line:?} is gone:\nroutes {routes}\nneigh {neigh}\nfdb {fdb}"
        );
    }
    let nodes = lab.tartanctl(&["nodes"])?;
    let stray_row = nodes
        .lines()
        .find(|l| l.contains("10.244.0.0/24"))
        .context("no row for the stray lease in tartanctl nodes")?;
    ensure!(
        stray_row.contains("left out") && stray_row.contains("node2"),
        "tartanctl nodes does not report the conflict:\n{nodes}"
    );
    let log = std::fs::read_to_string(lab.nodes[0].log_file())?;
    ensure!(
        log.matches("subnet lease left out").count() == 1,
        "the conflict must be logged once:\n{}",
        lab.log_tail(0, 30)
    );
    Ok(())
}

#[test]
fn a_changed_network_config_releases_the_old_lease_on_restart() -> Result<()> {
    // The old lease (outside the new network) used to stay for its 24 h TTL.
    let Some(mut lab) = lab(1, NET16)? else {
        return Ok(());
    };
    lab.start_daemon(0, &[])?;
    let old = lab.wait_subnet(0)?;
    lab.stop_daemon(0)?;
    std::fs::remove_file(lab.nodes[0].subnet_file())?;
    lab.init_network(&["--network", "10.245.0.0/16", "--force"])?;
    lab.start_daemon(0, &[])?;
    let new = lab.wait_subnet(0)?;
    ensure!(
        "10.245.0.0/16"
            .parse::<ipnetwork::Ipv4Network>()?
            .contains(new.network()),
        "the node kept {new} outside the new network"
    );
    let gone = wait_for(
        "the old lease to be released",
        Duration::from_secs(10),
        || {
            let v = lab
                .etcdctl(&["get", "--print-value-only", &subnet_key(old)])
                .ok()?;
            v.trim().is_empty().then_some(())
        },
    );
    ensure!(
        gone.is_ok(),
        "the lease {old} of the old network is still in etcd:\n{}",
        lab.log_tail(0, 20)
    );
    Ok(())
}

#[test]
fn a_config_written_after_the_daemon_started_is_taken_at_once() -> Result<()> {
    // A node started before `tartanctl network init` watches the config key; polling with a
    // growing backoff took up to 15 s (8.7 s seen) to notice the config.
    if !tartan::lab::require_root()? {
        return Ok(());
    }
    let mut lab = Lab::new(1, bins())?;
    lab.start_etcd()?;
    lab.start_daemon(0, &[])?;
    let log = lab.nodes[0].log_file();
    wait_for(
        "the daemon to wait for a config",
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(&log).ok()?;
            text.contains("no network config yet").then_some(())
        },
    )?;
    // Long enough for a polling backoff to have grown past the deadline below.
    std::thread::sleep(Duration::from_secs(5));
    let written = Instant::now();
    lab.init_network(NET16)?;
    let subnet_file = lab.nodes[0].subnet_file();
    wait_for(
        "the subnet after the config",
        Duration::from_secs(3),
        || subnet_file.exists().then_some(()),
    )?;
    eprintln!(
        "config -> subnet.env in {:.3} s",
        written.elapsed().as_secs_f64()
    );
    Ok(())
}

#[test]
fn a_silent_etcd_member_is_left_within_seconds() -> Result<()> {
    // A member that drops packets but whose process lives on breaks no connection by itself:
    // a node whose watch runs over it hears nothing until HTTP/2's keep-alive gives up (it was
    // ~14 s). Each member is silenced in turn, so whichever one the daemons' watches use is
    // hit; a lease written meanwhile must reach both nodes well within the deadline.
    let Some(mut lab) = lab_with_etcd_members(2, 3, NET16)? else {
        return Ok(());
    };
    lab.start_daemon(0, &[])?;
    lab.start_daemon(1, &[])?;
    wait_peer(&lab, 0, 1)?;
    wait_peer(&lab, 1, 0)?;
    for m in 0..3u8 {
        lab.set_etcd_member_silent(m.into(), true)?;
        let subnet: ipnetwork::Ipv4Network = format!("10.244.{}.0/24", 250 + m).parse()?;
        let value = format!(
            r#"{{"PublicIP":"192.168.77.{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:00:00:00:00:0{m}"}}}}"#,
            60 + m
        );
        let written = Instant::now();
        lab.etcdctl(&["put", &subnet_key(subnet), &value])?;
        for i in 0..2 {
            let ns = lab.nodes[i].ns.clone();
            let needle = format!("{subnet} via");
            wait_for(
                &format!(
                    "node{}'s route to {subnet} while member {m} is silent",
                    i + 1
                ),
                Duration::from_secs(10),
                || {
                    let r = ip(&["-n", &ns, "route", "show", "proto", "157"]).ok()?;
                    r.contains(&needle).then_some(())
                },
            )?;
        }
        eprintln!(
            "member {m} silent: lease on both nodes after {:.2} s",
            written.elapsed().as_secs_f64()
        );
        lab.set_etcd_member_silent(m.into(), false)?;
    }
    Ok(())
}

#[test]
fn sigterm_reaches_a_daemon_whose_parent_blocked_it() -> Result<()> {
    // Job control, harnesses and some container entrypoints hand SIGTERM down blocked; a
    // daemon that kept that mask would ignore its stop signal.
    std::thread::spawn(|| -> Result<()> {
        let mut set = nix::sys::signal::SigSet::empty();
        set.add(nix::sys::signal::Signal::SIGTERM);
        set.add(nix::sys::signal::Signal::SIGINT);
        set.thread_block()?;
        let Some(mut lab) = lab(1, NET16)? else {
            return Ok(());
        };
        lab.start_daemon(0, &[])?;
        lab.wait_subnet(0)?;
        let ns = lab.nodes[0].ns.clone();
        wait_for("the VXLAN device", Duration::from_secs(20), || {
            ip(&["-n", &ns, "link", "show", "tartan.1"]).ok()
        })?;
        // Fails when tartand ignores SIGTERM for 10 s.
        lab.stop_daemon(0)?;
        ensure!(
            ip(&["-n", &lab.nodes[0].ns, "link", "show", "tartan.1"]).is_ok(),
            "SIGTERM must leave the dataplane in place"
        );
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("test thread panicked"))?
}

/// Runs a second tartand in node `i`'s namespace with `paths` (the four per-node path flags,
/// in order --state-dir, --cni-data-dir, --cni-socket, --subnet-file) and waits (with a
/// deadline) for it to exit; returns its exit status and stderr.
fn second_daemon(lab: &Lab, i: usize, paths: [&std::path::Path; 4]) -> Result<(i32, String)> {
    let log = lab
        .dir
        .join(format!("second-{i}-{}.log", rand::random::<u32>()));
    let mut c = tartan::lab::ns_command(&lab.nodes[i].ns, &lab.bins.tartand);
    c.args(["--etcd-endpoints", &lab.etcd_endpoint()])
        .args(["--node-name", &format!("intruder{i}"), "--iface", "eth0"])
        .arg("--state-dir")
        .arg(paths[0])
        .arg("--cni-data-dir")
        .arg(paths[1])
        .arg("--cni-socket")
        .arg(paths[2])
        .arg("--subnet-file")
        .arg(paths[3])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?);
    let mut child = c.spawn().context("starting the second tartand")?;
    let status = wait_for(
        "the second tartand to exit",
        Duration::from_secs(10),
        || child.try_wait().ok().flatten(),
    );
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.context(format!(
                "it kept running; stderr: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )));
        }
    };
    Ok((
        status.code().unwrap_or(-1),
        std::fs::read_to_string(&log).unwrap_or_default(),
    ))
}

#[test]
fn a_second_daemon_on_the_same_paths_exits_at_once_naming_the_holder() -> Result<()> {
    let Some(mut lab) = lab(2, NET16)? else {
        return Ok(());
    };
    lab.start_daemon(0, &[])?;
    lab.wait_subnet(0)?;
    let holder = lab.nodes[0]
        .daemon
        .as_ref()
        .map(|c| c.id())
        .context("pid")?;
    let n = &lab.nodes[0];
    let (state, data, socket, env) = (
        n.dir.join("state"),
        n.cni_data_dir(),
        n.cni_socket(),
        n.subnet_file(),
    );
    let env_before = std::fs::read_to_string(&env)?;
    let other = lab.nodes[1].dir.clone();
    let (o_state, o_data, o_socket, o_env) = (
        other.join("state"),
        other.join("data"),
        other.join("tartand.sock"),
        other.join("subnet.env"),
    );
    let fix = "give each daemon on this host its own --state-dir, --cni-socket, --cni-data-dir and --subnet-file";
    // All four shared (default paths on one host), then each one alone.
    let cases: [([&std::path::Path; 4], &str, &std::path::Path); 5] = [
        ([&state, &data, &socket, &env], "--state-dir", &state),
        ([&state, &o_data, &o_socket, &o_env], "--state-dir", &state),
        (
            [&o_state, &data, &o_socket, &o_env],
            "--cni-data-dir",
            &data,
        ),
        (
            [&o_state, &o_data, &socket, &o_env],
            "--cni-socket",
            &socket,
        ),
        ([&o_state, &o_data, &o_socket, &env], "--subnet-file", &env),
    ];
    for (paths, flag, path) in cases {
        let (code, stderr) = second_daemon(&lab, 1, paths)?;
        ensure!(
            code != 0,
            "the second daemon ({flag} shared) exited 0: {stderr}"
        );
        let want = format!(
            "tartand: {} ({flag}) is in use by tartand (pid {holder}); {fix}",
            path.display()
        );
        ensure!(
            stderr.lines().any(|l| l == want),
            "({flag} shared) expected the line\n{want}\ngot:\n{stderr}"
        );
        ensure!(!stderr.contains("panicked"), "{stderr}");
    }
    // Refused before touching etcd or the kernel: no record, no device, nothing taken over.
    let keys = lab.etcdctl(&["get", "--prefix", "--keys-only", "/"])?;
    ensure!(
        !keys.contains("intruder"),
        "the intruder wrote to etcd: {keys}"
    );
    ensure!(
        ip(&["-n", &lab.nodes[1].ns, "link", "show", "tartan.1"]).is_err(),
        "the intruder created a device"
    );
    ensure!(
        lab.daemon_running(0),
        "the holder died: {}",
        lab.log_tail(0, 20)
    );
    ensure!(
        std::fs::read_to_string(&env)? == env_before,
        "subnet.env changed"
    );
    // (A unix socket path is a file: no need to enter the namespace.)
    std::os::unix::net::UnixStream::connect(&socket)
        .context("the holder's CNI socket no longer answers")?;

    // `tartand --leave` beside the running daemon is refused too (it would remove the
    // running daemon's state and dataplane).
    let out = tartan::lab::ns_command(&lab.nodes[0].ns, &lab.bins.tartand)
        .args(["--etcd-endpoints", &lab.etcd_endpoint()])
        .args(["--node-name", "node1", "--iface", "eth0", "--leave"])
        .arg("--state-dir")
        .arg(&state)
        .arg("--subnet-file")
        .arg(&env)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains(&format!("in use by tartand (pid {holder})")),
        "--leave beside the daemon: {:?} {stderr}",
        out.status
    );
    ensure!(
        lab.daemon_running(0),
        "the holder died: {}",
        lab.log_tail(0, 20)
    );
    ensure!(
        std::fs::read_to_string(&env)? == env_before,
        "subnet.env changed"
    );

    // The holder stops; its lock files (with its PID) stay and are simply taken over.
    lab.stop_daemon(0)?;
    let lock = state.join(tartan::node::lock::DIR_LOCK_NAME);
    ensure!(
        std::fs::read_to_string(&lock)?.trim() == holder.to_string(),
        "lock file content"
    );
    lab.start_daemon(0, &[])?;
    lab.wait_subnet(0)?;
    let new_pid = lab.nodes[0]
        .daemon
        .as_ref()
        .map(|c| c.id())
        .context("pid")?;
    wait_for(
        "the new holder's PID in the lock file",
        Duration::from_secs(10),
        || (std::fs::read_to_string(&lock).ok()?.trim() == new_pid.to_string()).then_some(()),
    )?;
    Ok(())
}

/// A key's value and etcd lease, as `etcdctl get -w json` reports them (lease 0: none).
fn key_value_and_lease(lab: &Lab, key: &str) -> Option<(serde_json::Value, i64)> {
    let out = lab.etcdctl(&["get", key, "-w", "json"]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let kv = v["kvs"].get(0)?;
    let value = kv["value"].as_str()?;
    let bytes = base64_decode(value)?;
    Some((
        serde_json::from_slice(&bytes).ok()?,
        kv["lease"].as_i64().unwrap_or(0),
    ))
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut buf, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        buf = (buf << 6) | T.iter().position(|t| *t == c)? as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    Some(out)
}

#[test]
fn an_overwritten_own_lease_is_restored_with_its_etcd_lease() -> Result<()> {
    let Some(mut lab) = lab(2, NET16)? else {
        return Ok(());
    };
    for i in 0..2 {
        lab.start_daemon(i, &[])?;
    }
    let s1 = lab.wait_subnet(0)?;
    wait_peer(&lab, 1, 0)?;
    let key = subnet_key(s1);
    let (good, lease) = key_value_and_lease(&lab, &key).context("node1's key")?;
    ensure!(lease != 0, "node1's key has no lease");
    let restored = |lab: &Lab| {
        wait_for(
            "node1 to restore its key and its etcd lease",
            Duration::from_secs(10),
            || {
                key_value_and_lease(lab, &key)
                    .filter(|(v, l)| *v == good && *l == lease)
                    .map(|_| ())
            },
        )
        .with_context(|| lab.log_tail(0, 20))
    };
    // A bogus address written by hand, without a lease: peers would tunnel to nowhere and
    // the key would never expire.
    let mut bogus = good.clone();
    bogus["PublicIP"] = serde_json::json!("192.168.77.99");
    lab.etcdctl(&["put", &key, &bogus.to_string()])?;
    restored(&lab)?;
    wait_peer(&lab, 1, 0)?;
    let (_, _, fdb) = overlay_text(&lab, 1)?;
    ensure!(
        !fdb.contains("192.168.77.99"),
        "node2 still tunnels to the bogus address: {fdb}"
    );
    ensure!(
        lab.tartanctl(&["nodes"])?.contains("node1"),
        "node1 missing from `tartanctl nodes`"
    );
    // The right value written back without the lease: only the lease is missing.
    lab.etcdctl(&["put", &key, &good.to_string()])?;
    restored(&lab)?;
    // Each restoration says why in the log.
    let log = std::fs::read_to_string(lab.nodes[0].log_file())?;
    ensure!(
        log.matches("changed by someone else").count() >= 2
            && log.contains("192.168.77.99")
            && log.contains("lost its etcd lease"),
        "the log does not say why: {}",
        lab.log_tail(0, 20)
    );
    Ok(())
}

#[test]
fn without_an_ipv6_underlay_flannels_dual_stack_leases_are_served_for_ipv4() -> Result<()> {
    let Some(mut lab) = lab(2, NET16)? else {
        return Ok(());
    };
    // The config flannel's dual-stack documentation shows, on nodes without an IPv6 underlay
    // address: tartand holds an IPv4 subnet and says why it holds no IPv6 one.
    lab.etcdctl(&[
        "put",
        "/coreos.com/network/config",
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#,
    ])?;
    lab.start_daemon(0, &[])?;
    lab.wait_subnet(0)?;
    wait_for("the dual-stack warning", Duration::from_secs(20), || {
        let log = std::fs::read_to_string(lab.nodes[0].log_file()).ok()?;
        log.contains("holds an IPv4 subnet only").then_some(())
    })?;
    // A lease as a dual-stack flannel node writes it (node 2's address as its underlay): the
    // IPv4 subnet is routed over the VXLAN device like any peer's.
    let key = "/coreos.com/network/subnets/10.244.77.0-24&fd00:10:244:77::-64";
    let peer_ip = lab.nodes[1].ip;
    lab.etcdctl(&[
        "put",
        key,
        &format!(
            r#"{{"PublicIP":"{peer_ip}","PublicIPv6":"fd00:77::2","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"aa:bb:cc:00:77:01"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"aa:bb:cc:00:77:06"}}}}"#
        ),
    ])?;
    let subnet: ipnetwork::Ipv4Network = "10.244.77.0/24".parse()?;
    wait_entries(
        &lab,
        0,
        subnet,
        "aa:bb:cc:00:77:01",
        peer_ip,
        "the flannel lease's",
    )?;
    // A lease whose IPv6 half is outside the network's IPv6 pool: its IPv4 half is a peer
    // all the same, and `tartanctl nodes` says what was ignored.
    let bad_key = "/coreos.com/network/subnets/10.244.78.0-24&fd00:99:0:78::-64";
    let [a, b, c, _] = peer_ip.octets();
    let bad_ip = std::net::Ipv4Addr::new(a, b, c, 250);
    lab.etcdctl(&[
        "put",
        bad_key,
        &format!(
            r#"{{"PublicIP":"{bad_ip}","PublicIPv6":"fd00:78::2","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"aa:bb:cc:00:78:01"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"aa:bb:cc:00:78:06"}}}}"#
        ),
    ])?;
    let bad_subnet: ipnetwork::Ipv4Network = "10.244.78.0/24".parse()?;
    wait_entries(
        &lab,
        0,
        bad_subnet,
        "aa:bb:cc:00:78:01",
        bad_ip,
        "the lease with a bad IPv6 half's",
    )?;
    // `tartanctl nodes` shows both families of each dual-stack lease.
    let nodes = lab.tartanctl(&["nodes"])?;
    let header = nodes.lines().next().unwrap_or_default();
    ensure!(
        header.contains("SUBNET6")
            && header.contains("PUBLIC-IPV6")
            && header.contains("VTEP-MAC6"),
        "no IPv6 columns in tartanctl nodes:\n{nodes}"
    );
    let row = |subnet: &str| {
        nodes
            .lines()
            .find(|l| l.contains(subnet))
            .map(str::to_string)
            .with_context(|| format!("no row for {subnet} in tartanctl nodes:\n{nodes}"))
    };
    let good = row("10.244.77.0/24")?;
    ensure!(
        good.contains("fd00:10:244:77::/64")
            && good.contains("fd00:77::2")
            && good.contains("aa:bb:cc:00:77:06"),
        "{good}"
    );
    let bad = row("10.244.78.0/24")?;
    ensure!(
        bad.contains(
            "IPv6 half ignored: subnet fd00:99:0:78::/64 is not a /64 inside fd00:10:244::/56"
        ),
        "{bad}"
    );
    let json: serde_json::Value = serde_json::from_str(&lab.tartanctl(&["nodes", "-o", "json"])?)?;
    ensure!(
        json.as_array()
            .is_some_and(|rows| rows
                .iter()
                .any(|r| r["subnet6"] == "fd00:10:244:77::/64"
                    && r["vtep_mac6"] == "aa:bb:cc:00:77:06")),
        "{json:#}"
    );
    lab.etcdctl(&["del", bad_key])?;
    wait_route(&lab, 0, bad_subnet, false)?;
    // Deleting it removes the entries; the node's own lease is untouched.
    lab.etcdctl(&["del", key])?;
    wait_route(&lab, 0, subnet, false)?;
    ensure!(lab.daemon_running(0), "{}", lab.log_tail(0, 30));
    Ok(())
}

/// The IPv6 half of the overlay's kernel side (flannel's `flannel-v6.<VNI>`): an IPv6 VXLAN
/// device over an IPv6 underlay takes a peer's route (onlink via the peer's subnet address),
/// permanent neighbour and FDB entry, a DirectRouting peer's route over the underlay, reads
/// them back as written (and none of it as IPv4), and loses them again.
#[test]
fn an_ipv6_vxlan_device_takes_and_loses_its_peers_entries() -> Result<()> {
    use tartan::kernel::netlink::Netlink;
    use tartan::overlay::kernel::{DeviceChange, VxlanSpec};
    use tartan::overlay::plan::{LocalNode, OverlayState, Peer, V6, desired_state, diff};
    if !tartan::lab::require_root()? {
        return Ok(());
    }
    let ns = tartan::lab::ScratchNs::new("vx6")?;
    let n = ns.name().to_string();
    // The underlay: one end of a veth pair (this kernel has no dummy devices).
    ns_run(
        &n,
        "ip",
        &[
            "link", "add", "ul", "type", "veth", "peer", "name", "ul-peer",
        ],
    )?;
    ns_run(&n, "ip", &["link", "set", "ul-peer", "up"])?;
    ns_run(&n, "ip", &["link", "set", "ul", "up"])?;
    // nodad: the VXLAN socket cannot bind a tentative address.
    ns_run(
        &n,
        "ip",
        &["-6", "addr", "add", "fd00:1::1/64", "dev", "ul", "nodad"],
    )?;
    let peers = vec![
        Peer::<V6> {
            subnet: "fd00:10:244:2::/64".parse()?,
            public_ip: "fd00:2::2".parse()?,
            vtep_mac: "02:00:00:00:06:02".parse()?,
        },
        Peer::<V6> {
            subnet: "fd00:10:244:3::/64".parse()?,
            public_ip: "fd00:1::3".parse()?,
            vtep_mac: "02:00:00:00:06:03".parse()?,
        },
    ];
    let local = LocalNode::<V6> {
        subnet: "fd00:10:244:1::/64".parse()?,
        underlay_networks: vec!["fd00:1::/64".parse()?],
        direct_routing: true,
    };
    let desired = desired_state(&local, &peers);
    let want = desired.clone();
    let (vx, ul) = tartan::lab::block_on_in_netns(&n, move || async move {
        let nl = Netlink::connect()?;
        let ul = nl.iface("ul").await?;
        let spec = VxlanSpec {
            name: "tartan-v6.1".into(),
            vni: 1,
            port: 8472,
            local: "fd00:1::1".parse()?,
            underlay_index: ul.index,
            mtu: 1430,
            mac: "02:00:00:00:06:01".parse()?,
        };
        let (vx, change) = nl.ensure_vxlan(&spec).await?;
        ensure!(change == DeviceChange::Created, "{change:?}");
        // The IPv6 local address compares as such: the same spec again changes nothing.
        let (_, again) = nl.ensure_vxlan(&spec).await?;
        ensure!(again == DeviceChange::Unchanged, "{again:?}");
        let before = nl.read_overlay_of::<V6>(vx, ul.index).await?;
        nl.apply_overlay_of(vx, ul.index, &diff(&want, &before))
            .await?;
        let after = nl.read_overlay_of::<V6>(vx, ul.index).await?;
        ensure!(after == want, "read back {after:#?}, wrote {want:#?}");
        let v4 = nl.read_overlay(vx, ul.index).await?;
        ensure!(v4 == OverlayState::default(), "IPv4 view: {v4:?}");
        Ok((vx, ul.index))
    })??;
    // What `ip` shows is flannel's layout.
    let routes = ns_run(&n, "ip", &["-6", "route", "show", "proto", "157"])?;
    ensure!(
        routes.contains("fd00:10:244:2::/64 via fd00:10:244:2:: dev tartan-v6.1")
            && routes.contains("onlink")
            && routes.contains("fd00:10:244:3::/64 via fd00:1::3 dev ul"),
        "{routes}"
    );
    let neigh = ns_run(&n, "ip", &["-6", "neigh", "show", "dev", "tartan-v6.1"])?;
    ensure!(
        neigh.contains("fd00:10:244:2:: lladdr 02:00:00:00:06:02 PERMANENT"),
        "{neigh}"
    );
    let fdb = ns_run(&n, "bridge", &["fdb", "show", "dev", "tartan-v6.1"])?;
    ensure!(fdb.contains("02:00:00:00:06:02 dst fd00:2::2"), "{fdb}");
    tartan::lab::block_on_in_netns(&n, move || async move {
        let nl = Netlink::connect()?;
        let empty = OverlayState::<V6>::default();
        nl.apply_overlay_of(vx, ul, &diff(&empty, &desired)).await?;
        let gone = nl.read_overlay_of::<V6>(vx, ul).await?;
        ensure!(gone == empty, "left after deleting: {gone:#?}");
        Ok(())
    })??;
    Ok(())
}

/// A node's dual-stack lease as etcd holds it.
#[derive(Debug, Clone, PartialEq)]
struct DualLease {
    key: String,
    subnet: ipnetwork::Ipv4Network,
    subnet6: ipnetwork::Ipv6Network,
    public_ipv6: String,
    vtep_mac6: String,
}

/// Node `i`'s dual-stack lease, once it wrote one (the key naming both subnets).
fn wait_dual_lease(lab: &Lab, i: usize) -> Result<DualLease> {
    let name = lab.nodes[i].name.clone();
    wait_for(
        &format!("{name}'s dual-stack lease"),
        Duration::from_secs(30),
        || {
            let out = lab
                .etcdctl(&["get", "--prefix", "/coreos.com/network/subnets/"])
                .ok()?;
            let lines: Vec<&str> = out.lines().collect();
            lines.chunks(2).find_map(|kv| {
                let [key, value] = kv else { return None };
                let v: serde_json::Value = serde_json::from_str(value).ok()?;
                if v["NodeName"] != name.as_str() {
                    return None;
                }
                let k =
                    tartan::model::subnet_lease::SubnetKey::parse(key.rsplit('/').next()?).ok()?;
                Some(DualLease {
                    key: key.to_string(),
                    subnet: k.v4,
                    subnet6: k.v6?,
                    public_ipv6: v["PublicIPv6"].as_str()?.to_string(),
                    vtep_mac6: v["BackendV6Data"]["VtepMAC"].as_str()?.to_string(),
                })
            })
        },
    )
}

/// A TCP echo server on `addr:port` in the namespace `ns` (for the rest of the test).
fn echo_server6(ns: &str, addr: std::net::Ipv6Addr, port: u16) -> Result<()> {
    let listener = in_netns(ns, move || std::net::TcpListener::bind((addr, port)))?
        .with_context(|| format!("listening on [{addr}]:{port} in {ns}"))?;
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

/// The IPv6 overlay entries a node holds, as `ip -6` and `bridge` print them.
fn overlay6_text(lab: &Lab, i: usize) -> Result<(String, String, String)> {
    let ns = &lab.nodes[i].ns;
    let routes = ip(&["-n", ns, "-6", "route", "show", "proto", "157"])?;
    let neigh = ip(&["-n", ns, "-6", "neigh", "show", "dev", "tartan6.1"]).unwrap_or_default();
    let fdb = ns_run(ns, "bridge", &["fdb", "show", "dev", "tartan6.1"]).unwrap_or_default();
    Ok((routes, neigh, fdb))
}

/// Three dual-stack nodes (IPv4 and IPv6 underlay): each holds a lease naming both subnets,
/// with its IPv6 VTEP, runs `tartan6.1` (MTU - 70) with flannel's entries for the two other
/// nodes' IPv6 subnets, carries TCP between nodes over IPv6, writes flannel's IPv6 keys in
/// subnet.env; pods get both addresses at once and talk across nodes per family; IPv6 is
/// masqueraded in its own ip6 table; a restart keeps both subnets, the MAC and the device; a deleted lease takes both
/// families' routes with it.
#[test]
fn a_dual_stack_cluster_carries_ipv6_between_three_nodes() -> Result<()> {
    let Some(mut lab) = lab(3, NET16)? else {
        return Ok(());
    };
    lab.make_dual_stack()?;
    for i in 0..3 {
        lab.start_daemon(i, &[])?;
    }
    let leases: Vec<DualLease> = (0..3)
        .map(|i| wait_dual_lease(&lab, i))
        .collect::<Result<_>>()?;
    for (i, l) in leases.iter().enumerate() {
        ensure!(
            Some(l.public_ipv6.as_str()) == lab.nodes[i].ip6.map(|a| a.to_string()).as_deref(),
            "{l:?}"
        );
        let link = ip(&[
            "-n",
            &lab.nodes[i].ns,
            "-o",
            "-d",
            "link",
            "show",
            "tartan6.1",
        ])?;
        ensure!(
            link.contains(&format!("link/ether {} ", l.vtep_mac6))
                && link.contains(" mtu 1430 ")
                && link.contains("vxlan id 1 ")
                && link.contains(&format!("local {}", l.public_ipv6)),
            "{link}"
        );
        ensure!(
            l.vtep_mac6 != vtep_mac(&lab, i)?,
            "the IPv6 VTEP has its own MAC"
        );
    }
    let s6: Vec<_> = leases.iter().map(|l| l.subnet6).collect();
    ensure!(s6[0] != s6[1] && s6[1] != s6[2] && s6[0] != s6[2], "{s6:?}");
    // Flannel's entries on every node for every other node's IPv6 subnet.
    for i in 0..3 {
        for (j, l) in leases.iter().enumerate().filter(|(j, _)| *j != i) {
            let gw = l.subnet6.network();
            wait_for(
                &format!("node {j}'s IPv6 entries on node {i}"),
                Duration::from_secs(20),
                || {
                    let (routes, neigh, fdb) = overlay6_text(&lab, i).ok()?;
                    (routes.contains(&format!("{} via {gw} dev tartan6.1", l.subnet6))
                        && neigh.contains(&format!("{gw} lladdr {} PERMANENT", l.vtep_mac6))
                        && fdb.contains(&format!(
                            "{} dst {} self permanent",
                            l.vtep_mac6, l.public_ipv6
                        )))
                    .then_some(())
                },
            )?;
        }
    }
    // TCP from node 1 to node 3's IPv6 device address, through both VXLAN devices.
    let gw3 = s6[2].network();
    echo_server6(&lab.nodes[2].ns, gw3, 7006)?;
    wait_tcp_echo(&lab.nodes[0].ns, gw3, 7006, Duration::from_secs(20))?;
    // subnet.env carries flannel's IPv6 keys, and one MTU both families fit in.
    let env = std::fs::read_to_string(lab.nodes[0].subnet_file())?;
    let first6 = std::net::Ipv6Addr::from(u128::from(s6[0].network()) + 1);
    ensure!(
        env.contains("FLANNEL_IPV6_NETWORK=fd00:10:244::/56\n")
            && env.contains(&format!("FLANNEL_IPV6_SUBNET={first6}/64\n"))
            && env.contains("FLANNEL_MTU=1430\n"),
        "{env}"
    );
    // Pods get an address of each family, usable at once (no duplicate address detection),
    // with a default route per family, and reach each other across nodes over IPv6.
    let p1 = lab.add_cni_pod(0, "dual-a", &[])?;
    let p3 = lab.add_cni_pod(2, "dual-b", &[])?;
    for (p, i) in [(&p1, 0), (&p3, 2)] {
        let ip6 = p.ip6.context("no IPv6 address in the ADD result")?;
        ensure!(s6[i].contains(ip6), "{ip6} outside {}", s6[i]);
        let host = u32::from(p.ip) - u32::from(leases[i].subnet.network());
        ensure!(
            u128::from(ip6) - u128::from(s6[i].network()) == u128::from(host),
            "{ip6} does not pair with {}",
            p.ip
        );
        let addrs = ip(&["-n", &p.ns, "-6", "addr", "show", "dev", "eth0"])?;
        ensure!(
            addrs.contains(&format!("inet6 {ip6}/64")) && !addrs.contains("tentative"),
            "{addrs}"
        );
        let routes = ip(&["-n", &p.ns, "-6", "route", "show", "default"])?;
        let gw = std::net::Ipv6Addr::from(u128::from(s6[i].network()) + 1);
        ensure!(
            routes.contains(&format!("default via {gw} dev eth0")),
            "{routes}"
        );
    }
    let (a6, b6) = (p1.ip6.context("pod a")?, p3.ip6.context("pod b")?);
    echo_server6(&p3.ns, b6, 7007)?;
    wait_tcp_echo(&p1.ns, b6, 7007, Duration::from_secs(20))?;
    // The other way, and IPv4 between the same pods.
    echo_server6(&p1.ns, a6, 7007)?;
    wait_tcp_echo(&p3.ns, a6, 7007, Duration::from_secs(20))?;
    echo_server(&p3.ns, 7008)?;
    wait_tcp_echo(&p1.ns, p3.ip, 7008, Duration::from_secs(20))?;
    // IPv6 pod traffic leaving the cluster network is masqueraded, in tartan's own table.
    let masq = ns_run(
        &lab.nodes[0].ns,
        "nft",
        &["list", "table", "ip6", "tartan_masq"],
    )?;
    ensure!(
        masq.contains(&format!(
            "ip6 saddr {} ip6 daddr fd00:10:244::/56 return",
            s6[0]
        )),
        "{masq}"
    );
    // A restart keeps both subnets, the IPv6 VTEP's MAC and the device itself.
    let before = ifindex(&lab, 0, "tartan6.1")?;
    lab.stop_daemon(0)?;
    lab.start_daemon(0, &[])?;
    wait_for(
        "node1 to hold its lease again after the restart",
        Duration::from_secs(30),
        || {
            let log = std::fs::read_to_string(lab.nodes[0].log_file()).ok()?;
            (log.matches("kept the subnet this node held before").count() >= 1).then_some(())
        },
    )?;
    ensure!(
        wait_dual_lease(&lab, 0)? == leases[0],
        "the same lease after the restart"
    );
    ensure!(
        ifindex(&lab, 0, "tartan6.1")? == before,
        "tartan6.1 was re-created"
    );
    wait_tcp_echo(&lab.nodes[0].ns, gw3, 7006, Duration::from_secs(20))?;
    // A dead node whose lease is deleted: both its routes go from every peer.
    lab.stop_daemon(2)?;
    lab.etcdctl(&["del", &leases[2].key])?;
    for i in 0..2 {
        wait_route(&lab, i, leases[2].subnet, false)?;
        wait_for(
            &format!("node 3's IPv6 route gone from node {i}"),
            Duration::from_secs(20),
            || {
                let (routes, neigh, fdb) = overlay6_text(&lab, i).ok()?;
                (!routes.contains(&s6[2].to_string())
                    && !neigh.contains(&leases[2].vtep_mac6)
                    && !fdb.contains(&leases[2].vtep_mac6))
                .then_some(())
            },
        )?;
    }
    ensure!(lab.daemon_running(0), "{}", lab.log_tail(0, 30));
    Ok(())
}
