//! Service proxy tests: a cluster in namespaces, real etcd, real nftables and conntrack.

mod common;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::*;
use tartan::lab::{INFRA_IP, Lab, LabPod, in_netns, ns_run, wait_for};
use tartan::model::pod::PodRecord;
use tartan::netbench::probe::{
    Whoami, tcp_whoami, tcp_whoami_many, tcp_whoami_server, udp_whoami_server,
};

const WEB: u16 = 8080;
const DNS: u16 = 5353;

/// A lab with `n` nodes running tartand.
fn cluster(n: usize) -> Result<Option<Lab>> {
    let Some(mut lab) = lab(n, &["--network", "10.244.0.0/16"])? else {
        return Ok(None);
    };
    for i in 0..n {
        lab.start_daemon(i, &[])?;
    }
    for i in 0..n {
        lab.wait_subnet(i)?;
    }
    Ok(Some(lab))
}

/// A pod on node `i` started through tartan-cni (so tartand registers it in etcd with
/// `labels`), running TCP and UDP who-am-I servers.
fn pod(lab: &mut Lab, i: usize, k: u8, labels: &[(&str, &str)]) -> Result<(LabPod, String)> {
    let name = format!("n{}p{k}", i + 1);
    let p = lab.add_cni_pod(i, &name, labels)?;
    tcp_whoami_server(&p.ns, WEB, &name)?;
    udp_whoami_server(&p.ns, DNS, &name)?;
    Ok((p, name))
}

/// `tartanctl service create ARGS`; returns the cluster IP and the node ports it printed.
fn create(lab: &Lab, args: &[&str]) -> Result<(Ipv4Addr, Vec<u16>)> {
    let (ip, nps) = create_service(lab, args)?;
    Ok((ip.context("the service is headless")?, nps))
}

/// Waits until `ns` reaches `ip:port` and gets an answer.
fn reach(ns: &str, ip: Ipv4Addr, port: u16) -> Result<Whoami> {
    let ns = ns.to_string();
    let start = Instant::now();
    loop {
        let last = match tcp_whoami(&ns, ip, port, Duration::from_secs(2)) {
            Ok(w) if !w.name.is_empty() => return Ok(w),
            Ok(_) => "empty answer".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if start.elapsed() > Duration::from_secs(20) {
            bail!("{ip}:{port} not reachable from {ns}: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tally(rs: &[Result<Whoami, String>]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in rs {
        let k = match r {
            Ok(w) => w.name.clone(),
            Err(e) => format!("error: {e}"),
        };
        *m.entry(k).or_default() += 1;
    }
    m
}

/// The address a node's VXLAN device carries (`<subnet>.0`).
fn vtep_addr(lab: &Lab, i: usize) -> Result<Ipv4Addr> {
    Ok(lab.wait_subnet(i)?.network())
}

#[test]
fn cluster_ip_from_pods_and_nodes_with_the_right_source_addresses() -> Result<()> {
    let Some(mut lab) = cluster(2)? else {
        return Ok(());
    };
    let (p1, _) = pod(&mut lab, 0, 1, &[("app", "web")])?;
    let (p2, n2) = pod(&mut lab, 1, 1, &[("app", "web")])?;
    let (client, _) = pod(&mut lab, 0, 2, &[("app", "client")])?;
    let (vip, _) = create(
        &lab,
        &["web", "--port", "80:8080/tcp", "--selector", "app=web"],
    )?;
    // From a pod on each node, and from each node itself.
    reach(&client.ns, vip, 80)?;
    reach(&p2.ns, vip, 80)?;
    reach(&lab.nodes[0].ns, vip, 80)?;
    reach(&lab.nodes[1].ns, vip, 80)?;
    // Pod to service: the backend sees the pod's own address (no masquerade), also across nodes.
    let answers = tcp_whoami_many(&client.ns, vip, 80, 40)?;
    let remote: Vec<&Whoami> = answers.iter().flatten().filter(|w| w.name == n2).collect();
    ensure!(
        !remote.is_empty(),
        "no connection reached the remote endpoint: {:?}",
        tally(&answers)
    );
    for w in answers.iter().flatten() {
        ensure!(
            w.peer == client.ip.to_string(),
            "pod source not preserved: {w:?}"
        );
    }
    // Node to service: masqueraded (the backend must be able to answer through the overlay).
    let answers = tcp_whoami_many(&lab.nodes[0].ns, vip, 80, 40)?;
    let v1 = vtep_addr(&lab, 0)?.to_string();
    let gw1 = Ipv4Addr::from(u32::from(lab.wait_subnet(0)?.network()) + 1).to_string();
    for w in answers.iter().flatten() {
        ensure!(
            w.peer == v1 || w.peer == gw1,
            "node traffic not masqueraded: {w:?}"
        );
    }
    ensure!(answers.iter().all(Result::is_ok), "{:?}", tally(&answers));
    let _ = p1;
    Ok(())
}

#[test]
fn no_endpoints_is_refused_at_once_and_unknown_ports_too() -> Result<()> {
    let Some(mut lab) = cluster(1)? else {
        return Ok(());
    };
    let (client, _) = pod(&mut lab, 0, 1, &[("app", "client")])?;
    let (vip, _) = create(
        &lab,
        &[
            "empty",
            "--port",
            "80:8080/tcp",
            "--selector",
            "app=nothing",
        ],
    )?;
    // Wait until the proxy has the service, then check the failure is a refusal, not a timeout.
    let ns = client.ns.clone();
    wait_for("refusal", Duration::from_secs(20), || {
        let t = Instant::now();
        let r = tcp_whoami(&ns, vip, 80, Duration::from_secs(3));
        match r {
            Err(e)
                if format!("{e:#}").contains("refused") && t.elapsed() < Duration::from_secs(1) =>
            {
                Some(())
            }
            _ => None,
        }
    })?;
    // A port the service does not have, and an address no service has: refused too.
    let e = tcp_whoami(&client.ns, vip, 81, Duration::from_secs(3)).unwrap_err();
    ensure!(format!("{e:#}").contains("refused"), "{e:#}");
    let e = tcp_whoami(
        &client.ns,
        "10.96.200.200".parse::<Ipv4Addr>()?,
        80,
        Duration::from_secs(3),
    )
    .unwrap_err();
    ensure!(format!("{e:#}").contains("refused"), "{e:#}");
    // From the node itself as well.
    let e = tcp_whoami(&lab.nodes[0].ns, vip, 80, Duration::from_secs(3)).unwrap_err();
    ensure!(format!("{e:#}").contains("refused"), "{e:#}");
    // Adding an endpoint makes it work.
    let (_, name) = pod(&mut lab, 0, 2, &[("app", "nothing")])?;
    ensure!(reach(&client.ns, vip, 80)?.name == name);
    // A node port without endpoints is refused from outside the cluster too.
    let (_, nps) = create(
        &lab,
        &[
            "nope",
            "--port",
            "80:8080/tcp",
            "--selector",
            "app=none",
            "--node-port",
            "auto",
        ],
    )?;
    let node_ip = lab.nodes[0].ip;
    let infra = lab.infra.clone();
    let np = nps[0];
    wait_for("node port refusal", Duration::from_secs(20), || {
        let e = tcp_whoami(&infra, node_ip, np, Duration::from_secs(2)).err()?;
        format!("{e:#}").contains("refused").then_some(())
    })?;
    // UDP: refused while there is no endpoint; the same flow (same 5-tuple, still in conntrack)
    // reaches the first endpoint once there is one.
    let (uvip, _) = create(
        &lab,
        &[
            "udpless",
            "--port",
            "53:5353/udp",
            "--selector",
            "app=udpless",
        ],
    )?;
    let cns = client.ns.clone();
    let ask = move || -> Result<std::result::Result<String, String>> {
        let cns = cns.clone();
        in_netns(
            &cns,
            move || -> Result<std::result::Result<String, String>> {
                let s = std::net::UdpSocket::bind(("0.0.0.0", 40500))?;
                s.connect((uvip, 53))?;
                s.set_read_timeout(Some(Duration::from_millis(500)))?;
                s.send(b"q")?;
                let mut buf = [0u8; 128];
                Ok(match s.recv(&mut buf) {
                    Ok(n) => Ok(String::from_utf8_lossy(&buf[..n]).to_string()),
                    Err(e) => Err(e.to_string()),
                })
            },
        )?
    };
    wait_for("UDP refusal", Duration::from_secs(20), || {
        ask()
            .ok()?
            .err()
            .filter(|e| e.contains("refused"))
            .map(|_| ())
    })?;
    pod(&mut lab, 0, 3, &[("app", "udpless")])?;
    wait_for(
        "the refused UDP flow to reach the new endpoint",
        Duration::from_secs(20),
        || ask().ok()?.ok().map(|_| ()),
    )?;
    Ok(())
}

#[test]
fn hairpin_pod_reaches_itself_through_its_service() -> Result<()> {
    let Some(mut lab) = cluster(1)? else {
        return Ok(());
    };
    let (p, name) = pod(&mut lab, 0, 1, &[("app", "solo")])?;
    let (vip, _) = create(
        &lab,
        &["solo", "--port", "80:8080/tcp", "--selector", "app=solo"],
    )?;
    let w = reach(&p.ns, vip, 80)?;
    ensure!(w.name == name);
    // Masqueraded to the bridge address so the reply comes back through the node.
    ensure!(
        w.peer != p.ip.to_string(),
        "hairpin traffic must be masqueraded: {w:?}"
    );
    Ok(())
}

#[test]
fn node_ports_from_outside_on_every_node_but_not_on_loopback() -> Result<()> {
    let Some(mut lab) = cluster(2)? else {
        return Ok(());
    };
    pod(&mut lab, 0, 1, &[("app", "np")])?;
    let (_, nps) = create(
        &lab,
        &[
            "np",
            "--port",
            "80:8080/tcp",
            "--selector",
            "app=np",
            "--node-port",
            "auto",
        ],
    )?;
    let np = *nps.first().context("no node port allocated")?;
    // The infra namespace is a client outside the cluster.
    for i in 0..2 {
        let w = reach(&lab.infra, lab.nodes[i].ip, np)?;
        // cluster policy: the client address is masqueraded.
        ensure!(
            w.peer != INFRA_IP.to_string(),
            "cluster policy must masquerade: {w:?}"
        );
    }
    // From a node to its own address works; to 127.0.0.1 it must not.
    reach(&lab.nodes[1].ns, lab.nodes[1].ip, np)?;
    let r = tcp_whoami(
        &lab.nodes[1].ns,
        Ipv4Addr::LOCALHOST,
        np,
        Duration::from_secs(2),
    );
    ensure!(r.is_err(), "node port answered on 127.0.0.1: {r:?}");
    Ok(())
}

#[test]
fn local_traffic_policy_keeps_client_address_and_uses_local_endpoints() -> Result<()> {
    let Some(mut lab) = cluster(2)? else {
        return Ok(());
    };
    let (_, local_name) = pod(&mut lab, 0, 1, &[("app", "loc")])?;
    pod(&mut lab, 1, 1, &[("app", "other")])?;
    let (_, nps) = create(
        &lab,
        &[
            "loc",
            "--port",
            "80:8080/tcp",
            "--selector",
            "app=loc",
            "--node-port",
            "auto",
            "--external-traffic-policy",
            "local",
        ],
    )?;
    let np = nps[0];
    let w = reach(&lab.infra, lab.nodes[0].ip, np)?;
    ensure!(w.name == local_name);
    ensure!(
        w.peer == INFRA_IP.to_string(),
        "local policy must keep the client address: {w:?}"
    );
    // Node 2 has no local endpoint: its node port answers nothing.
    let r = tcp_whoami(&lab.infra, lab.nodes[1].ip, np, Duration::from_secs(2));
    ensure!(r.is_err(), "node without local endpoints answered: {r:?}");
    Ok(())
}

#[test]
fn spread_and_client_ip_affinity() -> Result<()> {
    let Some(mut lab) = cluster(2)? else {
        return Ok(());
    };
    for k in 1..=2 {
        pod(&mut lab, 0, k, &[("app", "lb")])?;
        pod(&mut lab, 1, k, &[("app", "lb")])?;
    }
    let (c1, _) = pod(&mut lab, 0, 5, &[("app", "client")])?;
    let (c2, _) = pod(&mut lab, 1, 5, &[("app", "client")])?;
    let (vip, _) = create(
        &lab,
        &["lb", "--port", "80:8080/tcp", "--selector", "app=lb"],
    )?;
    let (avip, _) = create(
        &lab,
        &[
            "sticky",
            "--port",
            "80:8080/tcp",
            "--selector",
            "app=lb",
            "--session-affinity",
            "client-ip",
        ],
    )?;
    reach(&c1.ns, vip, 80)?;
    let t = tally(&tcp_whoami_many(&c1.ns, vip, 80, 400)?);
    ensure!(t.len() == 4, "expected 4 backends, got {t:?}");
    for (k, n) in &t {
        // Expected 100 each; a generous band keeps this a correctness test, not a statistics one.
        ensure!((50..=150).contains(n), "backend {k} got {n} of 400: {t:?}");
    }
    reach(&c1.ns, avip, 80)?;
    for c in [&c1, &c2] {
        let t = tally(&tcp_whoami_many(&c.ns, avip, 80, 50)?);
        ensure!(
            t.len() == 1,
            "client {} was spread despite affinity: {t:?}",
            c.ip
        );
    }
    Ok(())
}

#[test]
fn removed_udp_endpoint_moves_clients_to_live_ones() -> Result<()> {
    let Some(mut lab) = cluster(1)? else {
        return Ok(());
    };
    let (pod_a, a) = pod(&mut lab, 0, 1, &[("app", "dns")])?;
    let (client, _) = pod(&mut lab, 0, 3, &[("app", "client")])?;
    let (vip, _) = create(
        &lab,
        &["dns", "--port", "53:5353/udp", "--selector", "app=dns"],
    )?;
    // One UDP socket with a fixed source port: every datagram has the same 5-tuple, so
    // conntrack keeps sending it where the first one went.
    let ns = client.ns.clone();
    let ask = move |n: usize| -> Result<Vec<String>> {
        let ns = ns.clone();
        in_netns(&ns, move || -> Result<Vec<String>> {
            let s = std::net::UdpSocket::bind(("0.0.0.0", 40404))?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            let mut out = Vec::new();
            let mut buf = [0u8; 256];
            for _ in 0..n {
                s.send_to(b"q", (vip, 53))?;
                match s.recv_from(&mut buf) {
                    Ok((len, _)) => out.push(
                        String::from_utf8_lossy(&buf[..len])
                            .split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_string(),
                    ),
                    Err(_) => out.push("timeout".into()),
                }
            }
            Ok(out)
        })?
    };
    wait_for(
        "UDP answer from the first endpoint",
        Duration::from_secs(20),
        || ask(1).ok().filter(|v| v[0] == a).map(|_| ()),
    )?;
    let (_, b) = pod(&mut lab, 0, 2, &[("app", "dns")])?;
    // Same 5-tuple: still the first endpoint (conntrack).
    ensure!(ask(3)?.iter().all(|n| *n == a));
    lab.del_cni_pod(0, &a, &pod_a)?;
    wait_for(
        "UDP flow to move to the live endpoint",
        Duration::from_secs(20),
        || ask(1).ok().filter(|v| v[0] == b).map(|_| ()),
    )?;
    Ok(())
}

#[test]
fn dead_nodes_pods_leave_services_when_its_lease_expires() -> Result<()> {
    let Some(mut lab) = cluster(2)? else {
        return Ok(());
    };
    let (_, live) = pod(&mut lab, 0, 1, &[("app", "web")])?;
    let (_, doomed) = pod(&mut lab, 1, 1, &[("app", "web")])?;
    let (c, _) = pod(&mut lab, 0, 3, &[("app", "client")])?;
    let (vip, _) = create(
        &lab,
        &["web", "--port", "80:8080/tcp", "--selector", "app=web"],
    )?;
    reach(&c.ns, vip, 80)?;
    wait_for("both endpoints in use", Duration::from_secs(20), || {
        let t = tally(&tcp_whoami_many(&c.ns, vip, 80, 20).ok()?);
        (t.contains_key(&doomed) && t.contains_key(&live)).then_some(())
    })?;
    // Node 2 dies (no more lease renewals; its pod still answers, so only the lease can tell).
    let pid = lab.nodes[1]
        .daemon
        .as_ref()
        .map(|c| c.id())
        .context("daemon")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    wait_for(
        "the dead node's pod to leave the service",
        Duration::from_secs(40),
        || {
            let t = tally(&tcp_whoami_many(&c.ns, vip, 80, 20).ok()?);
            (t.len() == 1 && t.contains_key(&live)).then_some(())
        },
    )?;
    Ok(())
}

#[test]
fn explicit_endpoints_for_selectorless_services() -> Result<()> {
    let Some(mut lab) = cluster(1)? else {
        return Ok(());
    };
    let (p, name) = pod(&mut lab, 0, 1, &[])?;
    let (c, _) = pod(&mut lab, 0, 2, &[])?;
    let (vip, _) = create(&lab, &["ext", "--port", "80:8080/tcp"])?;
    lab.tartanctl(&["endpoints", "set", "ext", "--address", &p.ip.to_string()])?;
    ensure!(reach(&c.ns, vip, 80)?.name == name);
    // A service with a selector refuses explicit endpoints.
    create(&lab, &["sel", "--port", "80", "--selector", "a=b"])?;
    ensure!(
        lab.tartanctl(&["endpoints", "set", "sel", "--address", "10.1.1.1"])
            .is_err()
    );
    Ok(())
}

#[test]
fn allocation_is_unique_under_concurrency_and_taken_values_are_errors() -> Result<()> {
    let Some(lab) = cluster(1)? else {
        return Ok(());
    };
    let endpoint = "http://127.0.0.1:2379".to_string();
    let created = tartan::lab::block_on_in_netns(&lab.infra, move || async move {
        let args = tartan::store::etcd::EtcdArgs::for_endpoints(&[&endpoint]);
        let store = tartan::store::etcd::Store::connect(&args).await?;
        let mut tasks = Vec::new();
        for i in 0..100 {
            let store = store.clone();
            let args = args.clone();
            tasks.push(tokio::spawn(async move {
                let st = tartan::store::services::ServiceStore::new(
                    &store,
                    &args,
                    "10.96.0.0/24".parse()?,
                );
                let svc = tartan::model::service::Service {
                    namespace: "default".into(),
                    name: format!("s{i}"),
                    cluster_ip: Ipv4Addr::UNSPECIFIED,
                    ports: vec!["80/tcp".parse().map_err(anyhow::Error::msg)?],
                    selector: Some([("app".to_string(), format!("a{i}"))].into()),
                    session_affinity: Default::default(),
                    session_affinity_timeout: 10800,
                    external_traffic_policy: Default::default(),
                    cluster_ips: Vec::new(),
                    ip_families: Vec::new(),
                    ip_family_policy: Default::default(),
                };
                st.create(svc, None, &[tartan::store::services::NodePortRequest::Auto])
                    .await
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await??);
        }
        anyhow::Ok(out)
    })??;
    ensure!(created.len() == 100);
    let ips: std::collections::HashSet<_> = created.iter().map(|s| s.cluster_ip).collect();
    let nps: std::collections::HashSet<_> = created.iter().map(|s| s.ports[0].node_port).collect();
    ensure!(ips.len() == 100, "duplicate cluster IPs");
    ensure!(nps.len() == 100, "duplicate node ports");
    // An explicit IP or node port that is taken is a clear error.
    let taken_ip = created[0].cluster_ip.to_string();
    let err = lab
        .tartanctl(&[
            "service",
            "create",
            "x",
            "--port",
            "80",
            "--cluster-ip",
            &taken_ip,
            "--service-cidr",
            "10.96.0.0/24",
        ])
        .unwrap_err();
    ensure!(
        format!("{err:#}").contains("already taken by service default/s0"),
        "{err:#}"
    );
    let taken_np = created[0].ports[0].node_port.context("np")?.to_string();
    let err = lab
        .tartanctl(&[
            "service",
            "create",
            "y",
            "--port",
            "80",
            "--node-port",
            &taken_np,
        ])
        .unwrap_err();
    ensure!(format!("{err:#}").contains("already taken"), "{err:#}");
    ensure!(
        lab.tartanctl(&["service", "create", "s1", "--port", "80"])
            .is_err(),
        "duplicate name accepted"
    );
    Ok(())
}

#[test]
fn explain_describes_services_backends_and_counters() -> Result<()> {
    let Some(mut lab) = cluster(2)? else {
        return Ok(());
    };
    let (_, name) = pod(&mut lab, 1, 1, &[("app", "web")])?;
    let (c, _) = pod(&mut lab, 0, 2, &[("app", "client")])?;
    let (vip, _) = create(
        &lab,
        &["web", "--port", "http=80:8080/tcp", "--selector", "app=web"],
    )?;
    reach(&c.ns, vip, 80)?;
    tcp_whoami_many(&c.ns, vip, 80, 5)?;
    let node = lab.nodes[0].ns.clone();
    let out = ns_run(
        &node,
        &lab.bins.tartanctl.to_string_lossy(),
        &["explain", "--node", "node1"],
    )?;
    for want in [
        "Node node1 holds",
        "It routes to 1 peers over VXLAN",
        &format!("Service default/web at {vip} (http: 80/tcp -> 8080)"),
        "on node2",
        "connections",
    ] {
        ensure!(out.contains(want), "{want:?} missing from explain:\n{out}");
    }
    let _ = name;
    // The connection counter moved.
    ensure!(!out.contains("  0 new connections"), "{out}");
    let err = tartan::lab::run(
        tartan::lab::ns_command(&node, &lab.bins.tartanctl).args(["explain", "--node", "node2"]),
    )
    .unwrap_err();
    ensure!(format!("{err:#}").contains("not \"node2\""), "{err:#}");
    Ok(())
}

#[test]
fn restart_keeps_connections_and_leaves_no_duplicate_or_stale_rules() -> Result<()> {
    let Some(mut lab) = cluster(2)? else {
        return Ok(());
    };
    let (p, _) = pod(&mut lab, 1, 1, &[("app", "echo")])?;
    tartan::netbench::probe::tcp_echo_server(&p.ns, 9000)?;
    let (c, _) = pod(&mut lab, 0, 2, &[("app", "client")])?;
    create(
        &lab,
        &["web", "--port", "80:8080/tcp", "--selector", "app=echo"],
    )?;
    let (evip, _) = create(
        &lab,
        &["echo", "--port", "90:9000/tcp", "--selector", "app=echo"],
    )?;
    reach(&c.ns, evip, 90).ok();
    wait_for("echo through the service", Duration::from_secs(20), || {
        tartan::netbench::probe::tcp_rr(&c.ns, evip, 90, 1).ok()
    })?;
    let node = lab.nodes[0].ns.clone();
    let table = active_service_table(&node).context("no service table")?;
    let before = kernel_elements(&node, &table)?;
    // An open connection through the cluster IP, used before and after a restart.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let cns = c.ns.clone();
    let client = std::thread::spawn(move || -> Result<()> {
        in_netns(&cns, move || -> Result<()> {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect((evip, 90))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut b = [0u8; 4];
            s.write_all(b"ping")?;
            s.read_exact(&mut b)?;
            ready_tx.send(()).ok();
            go_rx.recv().ok();
            s.write_all(b"pong")?;
            s.read_exact(&mut b)?;
            ensure!(&b == b"pong");
            Ok(())
        })?
    });
    ready_rx.recv_timeout(Duration::from_secs(10))?;
    lab.stop_daemon(0)?;
    lab.start_daemon(0, &[])?;
    wait_for("restarted proxy to sync", Duration::from_secs(20), || {
        let log = std::fs::read_to_string(lab.nodes[0].log_file()).ok()?;
        (log.matches("service table fully synced").count() >= 2).then_some(())
    })?;
    go_tx.send(())?;
    client
        .join()
        .map_err(|_| anyhow::anyhow!("client panicked"))??;
    let after_table = active_service_table(&node).context("no service table after restart")?;
    ensure!(after_table == table, "a restart must not rebuild the table");
    ensure!(
        kernel_elements(&node, &after_table)? == before,
        "elements changed across the restart"
    );
    // Exactly one service table (no stale copy) and its rules exist once.
    let tables = ns_run(&node, "nft", &["list", "tables"])?;
    ensure!(tables.matches("tartan_svc").count() == 1, "{tables}");
    Ok(())
}

#[test]
fn etcd_outage_keeps_service_traffic_flowing() -> Result<()> {
    let Some(mut lab) = cluster(2)? else {
        return Ok(());
    };
    pod(&mut lab, 1, 1, &[("app", "web")])?;
    let (c, _) = pod(&mut lab, 0, 2, &[("app", "client")])?;
    let (vip, _) = create(
        &lab,
        &["web", "--port", "80:8080/tcp", "--selector", "app=web"],
    )?;
    reach(&c.ns, vip, 80)?;
    lab.stop_etcd();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        tcp_whoami(&c.ns, vip, 80, Duration::from_secs(3))
            .with_context(|| format!("service broke {:?} into the etcd outage", start.elapsed()))?;
        std::thread::sleep(Duration::from_millis(500));
    }
    lab.start_etcd()?;
    // After etcd returns, changes flow again.
    let (vip2, _) = create(
        &lab,
        &["web2", "--port", "80:8080/tcp", "--selector", "app=web"],
    )?;
    reach(&c.ns, vip2, 80)?;
    Ok(())
}

/// Writes pod records `ghost0..ghost{n}` selected by `app=big` for a node no daemon runs
/// on, 100 keys per etcd transaction (addresses 10.201.0.1 + k: distinct, never contacted).
fn register_many_elsewhere(lab: &Lab, n: u32) -> Result<()> {
    tartan::lab::block_on_in_netns(&lab.infra, move || async move {
        let args = tartan::store::etcd::EtcdArgs::for_endpoints(&["http://127.0.0.1:2379"]);
        let store = tartan::store::etcd::Store::connect(&args).await?;
        let mut ops = Vec::new();
        for k in 0..n {
            let rec = PodRecord {
                ip6: None,
                container_id: format!("c-ghost{k}"),
                ifname: "eth0".into(),
                node: "ghost-node".into(),
                ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 201, 0, 1)) + k),
                namespace: "default".into(),
                name: format!("ghost{k}"),
                labels: [("app".to_string(), "big".to_string())].into(),
            };
            ops.push(etcd_client::TxnOp::put(
                tartan::store::keys::pod_key(&args, &rec),
                rec.to_bytes(),
                None,
            ));
            if ops.len() == 100 || k + 1 == n {
                store
                    .txn(etcd_client::Txn::new().and_then(std::mem::take(&mut ops)))
                    .await?;
            }
        }
        anyhow::Ok(())
    })?
}

/// The number of chains in `table` and its `nft list table` text.
fn table_size(ns: &str, table: &str) -> Result<(usize, String)> {
    let text = ns_run(ns, "nft", &["list", "table", "ip", table])?;
    Ok((text.matches("\n\tchain ").count(), text))
}

#[test]
fn thousands_of_endpoints_need_no_rebuild_and_leave_no_trace() -> Result<()> {
    let Some(mut lab) = cluster(1)? else {
        return Ok(());
    };
    let (c, _) = pod(&mut lab, 0, 1, &[("app", "client")])?;
    let (_, real) = pod(&mut lab, 0, 2, &[("app", "big")])?;
    let (_, other_pod) = pod(&mut lab, 0, 3, &[("app", "other")])?;
    let node = lab.nodes[0].ns.clone();
    // Baseline: the three local pods' hairpin entries and nothing else.
    let t0 = wait_for(
        "service table with the pods",
        Duration::from_secs(20),
        || {
            let t = active_service_table(&node)?;
            let e = kernel_elements(&node, &t).ok()?;
            (e.iter().filter(|(s, _, _)| s == "hairpin").count() == 3).then_some(t)
        },
    )?;
    let (chains0, text0) = table_size(&node, &t0)?;
    let (vip, _) = create(
        &lab,
        &["big", "--port", "80:8080/tcp", "--selector", "app=big"],
    )?;
    reach(&c.ns, vip, 80)?;
    // 3,000 more endpoints: far beyond the 16 exact chains, and what used to force a rebuild
    // of the table with 3,000 chains per kind (7.7-16 s, every other change waiting).
    let endpoints = 3000u32;
    let writer = {
        let lab_ref = &lab;
        std::thread::scope(|sc| {
            let h = sc.spawn(move || register_many_elsewhere(lab_ref, endpoints));
            // Meanwhile another service is created and reachable.
            let other = create(
                lab_ref,
                &["other", "--port", "80:8080/tcp", "--selector", "app=other"],
            )
            .and_then(|(ip, _)| reach(&c.ns, ip, 80));
            let w = h
                .join()
                .map_err(|_| anyhow::anyhow!("writer thread panicked"));
            (other, w)
        })
    };
    let (other, w) = writer;
    ensure!(
        other?.name == other_pod,
        "other service answered by the wrong pod"
    );
    w??;
    let slots = tartan::proxy::rules::slot_count(endpoints as usize + 1);
    // Past 4,096 slots the table lives in the uncounted map.
    let map = tartan::proxy::rules::SetName::Backends
        .for_slots(slots)
        .as_str();
    let prefix = format!("{vip} . tcp . 80 . ");
    let elems = wait_for("every endpoint programmed", Duration::from_secs(30), || {
        let t = active_service_table(&node)?;
        let e = kernel_elements(&node, &t).ok()?;
        let ips: std::collections::HashSet<&str> = e
            .iter()
            .filter(|(s, k, _)| s == map && k.starts_with(&prefix))
            .map(|(_, _, d)| d.as_str())
            .collect();
        (ips.len() == endpoints as usize + 1).then_some(e)
    })?;
    let in_use = elems
        .iter()
        .filter(|(s, k, _)| s == map && k.starts_with(&prefix))
        .count();
    ensure!(
        in_use == slots as usize,
        "{in_use} slots in {map}, expected {slots}"
    );
    ensure!(
        elems
            .iter()
            .any(|(s, _, d)| s == "service_ips" && *d == format!("goto svc_{slots}")),
        "service not on the mod-{slots} chain"
    );
    let t1 = active_service_table(&node).context("no table")?;
    ensure!(
        t1 == t0,
        "the table was switched ({t0} -> {t1}): a rebuild happened"
    );
    let tables = ns_run(&node, "nft", &["list", "tables"])?;
    ensure!(
        tables.matches("tartan_svc").count() == 1,
        "a second table exists: {tables}"
    );
    let (chains1, _) = table_size(&node, &t1)?;
    ensure!(
        chains1 == chains0,
        "chains grew from {chains0} to {chains1}"
    );
    // Gone again: the table returns to its baseline, chains and text.
    lab.tartanctl(&["service", "delete", "big"])?;
    lab.tartanctl(&["service", "delete", "other"])?;
    let mut last = String::new();
    let back = wait_for("table back at baseline", Duration::from_secs(30), || {
        let (n, text) = table_size(&node, &t0).ok()?;
        let ok = n == chains0 && text.len() == text0.len();
        last = text;
        ok.then_some(())
    });
    if back.is_err() {
        bail!(
            "table not back at baseline ({} bytes, baseline {}):\n{}",
            last.len(),
            text0.len(),
            last.lines().take(60).collect::<Vec<_>>().join("\n")
        );
    }
    ensure!(active_service_table(&node).as_deref() == Some(t0.as_str()));
    let _ = real;
    Ok(())
}

#[test]
fn foreign_tables_are_untouched_by_the_proxy() -> Result<()> {
    let Some(mut lab) = lab(1, &["--network", "10.244.0.0/16"])? else {
        return Ok(());
    };
    let ns = lab.nodes[0].ns.clone();
    ns_run(
        &ns,
        "nft",
        &[
            "add table ip nat; add chain ip nat PREROUTING { type nat hook prerouting priority -100; }; add rule ip nat PREROUTING tcp dport 7777 dnat to 1.2.3.4",
        ],
    )?;
    ns_run(
        &ns,
        "nft",
        &["add table inet other; add set inet other s { type ipv4_addr; elements = { 1.1.1.1 } }"],
    )?;
    let snap = |ns: &str| -> Result<String> {
        Ok(ns_run(ns, "nft", &["list", "table", "ip", "nat"])?
            + &ns_run(ns, "nft", &["list", "table", "inet", "other"])?)
    };
    let before = snap(&ns)?;
    lab.start_daemon(0, &[])?;
    lab.wait_subnet(0)?;
    let (_, _) = pod(&mut lab, 0, 1, &[("app", "web")])?;
    let (vip, _) = create(
        &lab,
        &["web", "--port", "80:8080/tcp", "--selector", "app=web"],
    )?;
    reach(&lab.nodes[0].ns, vip, 80)?;
    ensure!(snap(&ns)? == before, "foreign tables changed");
    lab.tartanctl(&["node", "leave", "node1"])?;
    wait_for("leave", Duration::from_secs(20), || {
        (!lab.daemon_running(0)).then_some(())
    })?;
    ensure!(snap(&ns)? == before, "foreign tables changed by leave");
    let tables = ns_run(&ns, "nft", &["list", "tables"])?;
    ensure!(
        !tables.contains("tartan"),
        "tartan tables left after leave: {tables}"
    );
    Ok(())
}

/// Random services, pods and endpoints; afterwards every node's kernel table must equal what
/// the model computes from etcd.
#[test]
fn randomized_churn_converges_to_the_model() -> Result<()> {
    use rand::{RngExt, SeedableRng};
    use tartan::model::service::{
        EndpointAddress, ExplicitEndpoints, Service, SessionAffinity, TrafficPolicy,
    };
    use tartan::store::services::{NodePortRequest, ServiceStore};
    let Some(lab) = cluster(3)? else {
        return Ok(());
    };
    let seed: u64 = std::env::var("CHURN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("churn seed {seed} (set CHURN_SEED to replay)");
    let node_names: Vec<String> = lab.nodes.iter().map(|n| n.name.clone()).collect();
    let endpoint = "http://127.0.0.1:2379".to_string();
    let names = node_names.clone();
    tartan::lab::block_on_in_netns(&lab.infra, move || async move {
        let args = tartan::store::etcd::EtcdArgs::for_endpoints(&[&endpoint]);
        let store = tartan::store::etcd::Store::connect(&args).await?;
        let st = ServiceStore::new(&store, &args, "10.96.0.0/16".parse()?);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut live: HashMap<usize, Service> = HashMap::new();
        for _ in 0..1000 {
            match rng.random_range(0..10) {
                0..=2 => {
                    let slot = rng.random_range(0..30usize);
                    if let Some(s) = live.get(&slot).cloned() {
                        let mut s = s;
                        s.selector = Some(
                            [("app".to_string(), format!("a{}", rng.random_range(0..8)))].into(),
                        );
                        s.ports[0].target_port = rng.random_range(8000..8010);
                        s.session_affinity = if rng.random_bool(0.3) {
                            SessionAffinity::ClientIp
                        } else {
                            SessionAffinity::None
                        };
                        s.external_traffic_policy = if rng.random_bool(0.3) {
                            TrafficPolicy::Local
                        } else {
                            TrafficPolicy::Cluster
                        };
                        if st.update(&s).await.is_ok() {
                            live.insert(slot, s);
                        }
                    } else {
                        let selector = (!rng.random_bool(0.2)).then(|| {
                            [("app".to_string(), format!("a{}", rng.random_range(0..8)))].into()
                        });
                        let proto = if rng.random_bool(0.3) { "udp" } else { "tcp" };
                        let svc = Service {
                            namespace: "default".into(),
                            name: format!("svc{slot}"),
                            cluster_ip: Ipv4Addr::UNSPECIFIED,
                            ports: vec![
                                format!("{}:8080/{proto}", rng.random_range(1..100))
                                    .parse()
                                    .map_err(anyhow::Error::msg)?,
                            ],
                            selector,
                            session_affinity: SessionAffinity::None,
                            session_affinity_timeout: 10800,
                            external_traffic_policy: TrafficPolicy::Cluster,
                            cluster_ips: Vec::new(),
                            ip_families: Vec::new(),
                            ip_family_policy: Default::default(),
                        };
                        let np = if rng.random_bool(0.4) {
                            NodePortRequest::Auto
                        } else {
                            NodePortRequest::None
                        };
                        let s = st.create(svc, None, &[np]).await?;
                        live.insert(slot, s);
                    }
                }
                3 => {
                    let slot = rng.random_range(0..30usize);
                    if let Some(s) = live.remove(&slot) {
                        st.delete(&s.namespace, &s.name).await?;
                    }
                }
                4 => {
                    let slot = rng.random_range(0..30usize);
                    if let Some(s) = live.get(&slot)
                        && s.selector.is_none()
                    {
                        let n = rng.random_range(0..4u8);
                        let e = ExplicitEndpoints {
                            addresses: (0..n)
                                .map(|i| EndpointAddress {
                                    ip: Ipv4Addr::new(172, 16, slot as u8, i + 1),
                                    node: Some(names[rng.random_range(0..names.len())].clone()),
                                })
                                .collect(),
                        };
                        st.set_endpoints(&s.namespace, &s.name, &e).await?;
                    }
                }
                5..=8 => {
                    let p = rng.random_range(0..60u8);
                    // Pods on nodes no daemon owns: tartand keeps its own node's records in line with
                    // its IPAM directory and would remove hand-written ones.
                    let node = &format!("churn-node{}", p % 3);
                    let rec = PodRecord {
                        ip6: None,
                        container_id: format!("churn{p}"),
                        ifname: "eth0".into(),
                        node: node.clone(),
                        ip: Ipv4Addr::new(10, 244, 200 + p % 3, p + 2),
                        namespace: "default".into(),
                        name: format!("churn{p}"),
                        labels: [("app".to_string(), format!("a{}", rng.random_range(0..8)))]
                            .into(),
                    };
                    store
                        .put(
                            &tartan::store::keys::pod_key(&args, &rec),
                            rec.to_bytes(),
                            0,
                        )
                        .await?;
                }
                _ => {
                    let p = rng.random_range(0..60u8);
                    // Pods on nodes no daemon owns: tartand keeps its own node's records in line with
                    // its IPAM directory and would remove hand-written ones.
                    let node = &format!("churn-node{}", p % 3);
                    store
                        .delete(&args.tartan_key(&format!("pods/{node}/churn{p}/eth0")))
                        .await?;
                }
            }
        }
        anyhow::Ok(())
    })??;
    // Expected: the model fed with what etcd holds now, per node.
    let expected = expected_elements(&lab, &node_names)?;
    for (i, want) in expected.iter().enumerate() {
        wait_table_matches(&lab, i, want)?;
        ensure!(
            want.len() > 20,
            "the churn left too little to compare ({} elements)",
            want.len()
        );
    }
    Ok(())
}

/// Binds a unix socket at `path` that accepts connections and swallows what they send (a
/// process that took over tartand's socket path); returns the count of `sync` lines seen.
fn black_hole(path: &std::path::Path) -> Result<std::sync::Arc<std::sync::atomic::AtomicUsize>> {
    use std::io::BufRead;
    let l = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let counter = counter.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(s).lines().map_while(Result::ok) {
                    if line.trim() == "sync" {
                        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    Ok(seen)
}

/// Whether the service table in `ns` sends some service port to `ip` (a `backends` element).
fn is_endpoint(ns: &str, ip: Ipv4Addr) -> bool {
    let Some(table) = active_service_table(ns) else {
        return false;
    };
    let prefix = format!("{ip} . ");
    kernel_elements(ns, &table).is_ok_and(|els| {
        els.iter()
            .any(|(set, _, data)| set == "backends" && data.starts_with(&prefix))
    })
}

#[test]
fn a_lost_nudge_still_registers_the_pod_within_the_change_check_bound() -> Result<()> {
    // What docs/architecture.md promises: a missed nudge costs at most the change check
    // period plus one scan and one etcd write, under 2 s.
    const BOUND: Duration = Duration::from_secs(2);
    const MARGIN: Duration = Duration::from_millis(1500);
    assert!(tartan::daemon::pod_registrar::CHANGE_CHECK < BOUND);
    let Some(mut lab) = cluster(2)? else {
        return Ok(());
    };
    create(
        &lab,
        &["lost", "--port", "80:8080/tcp", "--selector", "app=lost"],
    )?;
    // tartand listens before it installs the conflist: once the conflist is there, move its
    // socket away and put a black hole at the path. Plugins still connect (ADD succeeds),
    // but no nudge reaches tartand.
    let conflist = lab.nodes[0].cni_conf_dir().join("10-tartan.conflist");
    wait_for("the conflist", Duration::from_secs(30), || {
        conflist.exists().then_some(())
    })?;
    let sock = lab.nodes[0].cni_socket();
    std::fs::rename(&sock, sock.with_extension("moved"))?;
    let nudges = black_hole(&sock)?;
    let record = |lab: &Lab, name: &str| {
        lab.etcdctl(&[
            "get",
            &format!("/tartan/pods/node1/{name}/eth0"),
            "--print-value-only",
        ])
        .ok()
        .filter(|v| !v.trim().is_empty())
    };
    // The first pod is registered by some rescan (the 10 s periodic one at worst); the second
    // ADD follows right after that rescan, so only a faster check can register it in time.
    lab.add_cni_pod(0, "lost1", &[("app", "lost")])?;
    wait_for("lost1's record", Duration::from_secs(15), || {
        record(&lab, "lost1")
    })?;
    let t0 = Instant::now();
    let p2 = lab.add_cni_pod(0, "lost2", &[("app", "lost")])?;
    let add_took = t0.elapsed();
    // The black hole counts a nudge when its reader thread gets to the line, which on a
    // loaded machine can be after ADD returned: wait for it (the bound below runs from t0).
    wait_for(
        "the nudges to reach the black hole",
        Duration::from_secs(5),
        || (nudges.load(std::sync::atomic::Ordering::Relaxed) >= 2).then_some(()),
    )
    .context("the nudges did not go to the black hole")?;
    wait_for(
        "lost2's record without a nudge",
        (BOUND + MARGIN).saturating_sub(t0.elapsed()),
        || record(&lab, "lost2"),
    )
    .with_context(|| format!("ADD took {add_took:?}"))?;
    let registered = t0.elapsed();
    for i in 0..2 {
        let ns = lab.nodes[i].ns.clone();
        wait_for(
            &format!("lost2 to be an endpoint on node{}", i + 1),
            (BOUND + MARGIN).saturating_sub(t0.elapsed()),
            || is_endpoint(&ns, p2.ip).then_some(()),
        )
        .with_context(|| format!("registered after {registered:?}"))?;
    }
    eprintln!(
        "ADD took {add_took:?}; registered {registered:?}, endpoint everywhere {:?} after ADD start",
        t0.elapsed()
    );
    Ok(())
}

#[test]
fn cluster_ips_on_etcd_or_outside_the_service_cidr_are_skipped_and_reported() -> Result<()> {
    let Some(mut lab) = cluster(1)? else {
        return Ok(());
    };
    let (p, name) = pod(&mut lab, 0, 1, &[("app", "guarded")])?;
    let (c, _) = pod(&mut lab, 0, 2, &[])?;
    let node = lab.nodes[0].ns.clone();
    let tartanctl = lab.bins.tartanctl.to_string_lossy().into_owned();
    // Written straight into etcd (tartanctl refuses them): the etcd member's own address and
    // port as a cluster IP, with an endpoint answering there; a cluster IP outside the
    // service CIDR; explicit endpoints on loopback and on etcd beside a real one.
    let put = |key: &str, v: serde_json::Value| lab.etcdctl(&["put", key, &v.to_string()]);
    put(
        "/tartan/services/default/etcd-hijack",
        serde_json::json!({"namespace": "default", "name": "etcd-hijack",
            "clusterIP": INFRA_IP.to_string(),
            "ports": [{"port": 2379, "targetPort": WEB, "protocol": "tcp"}]}),
    )?;
    put(
        "/tartan/endpoints/default/etcd-hijack",
        serde_json::json!({"addresses": [{"ip": p.ip.to_string()}]}),
    )?;
    put(
        "/tartan/services/default/outside",
        serde_json::json!({"namespace": "default", "name": "outside",
            "clusterIP": "10.200.0.7", "selector": {"app": "guarded"},
            "ports": [{"port": 80, "targetPort": WEB, "protocol": "tcp"}]}),
    )?;
    put(
        "/tartan/services/default/ext",
        serde_json::json!({"namespace": "default", "name": "ext",
            "clusterIP": "10.96.7.7",
            "ports": [{"port": 80, "targetPort": WEB, "protocol": "tcp"}]}),
    )?;
    put(
        "/tartan/endpoints/default/ext",
        serde_json::json!({"addresses": [{"ip": "127.0.0.1"}, {"ip": INFRA_IP.to_string()},
            {"ip": p.ip.to_string()}]}),
    )?;
    let explain = wait_for(
        "explain to list the three services",
        Duration::from_secs(30),
        || {
            let out = ns_run(&node, &tartanctl, &["explain"]).ok()?;
            ["default/etcd-hijack", "default/outside", "default/ext"]
                .iter()
                .all(|s| out.contains(&format!("Service {s} ")))
                .then_some(out)
        },
    )?;
    // A restarted daemon opens new connections to etcd: had the etcd address been
    // programmed as a cluster IP, they would go to the pod and the node would never list.
    lab.stop_daemon(0)?;
    lab.start_daemon(0, &[])?;
    let (vip, _) = create(
        &lab,
        &[
            "later",
            "--port",
            "80:8080/tcp",
            "--selector",
            "app=guarded",
        ],
    )?;
    ensure!(
        reach(&c.ns, vip, 80)?.name == name,
        "a later service must work"
    );
    ensure!(reach(&c.ns, "10.96.7.7".parse()?, 80)?.name == name);
    for want in [
        format!("not programmed: cluster IP {INFRA_IP} is an etcd endpoint"),
        "not programmed: cluster IP 10.200.0.7 is outside the service CIDR 10.96.0.0/12".into(),
        "skipped: endpoint 127.0.0.1 is a loopback address".into(),
        format!("skipped: endpoint {INFRA_IP} is an etcd endpoint"),
    ] {
        ensure!(
            explain.contains(&want),
            "{want:?} missing from explain:\n{explain}"
        );
    }
    let table = active_service_table(&node).context("no service table")?;
    let elems = kernel_elements(&node, &table)?;
    for bad in [
        INFRA_IP.to_string(),
        "10.200.0.7".into(),
        "127.0.0.1".into(),
    ] {
        ensure!(
            !elems
                .iter()
                .any(|(_, k, d)| k.contains(&bad) || d.contains(&bad)),
            "{bad} was programmed: {elems:?}"
        );
    }
    let skipped = wait_for("the skip metric", Duration::from_secs(20), || {
        metric(&node, "tartan_service_addresses_skipped").filter(|v| *v >= 4.0)
    })?;
    ensure!(skipped == 4.0, "skipped {skipped}");
    Ok(())
}

/// Waits until `ns` reaches `ip:port` (either family) and gets an answer.
fn reach_any(ns: &str, ip: std::net::IpAddr, port: u16) -> Result<Whoami> {
    let start = Instant::now();
    loop {
        let last = match tcp_whoami(ns, ip, port, Duration::from_secs(2)) {
            Ok(w) if !w.name.is_empty() => return Ok(w),
            Ok(_) => "empty answer".to_string(),
            Err(e) => format!("{e:#}"),
        };
        if start.elapsed() > Duration::from_secs(20) {
            bail!("[{ip}]:{port} not reachable from {ns}: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

const SERVICE_CIDRS: &str = "10.96.0.0/12,fd00:96::/108";

/// A RequireDualStack service `name` on port 80 → 8080 selecting `app=web`, with a node port
/// and `extra` flags: its IPv4 and IPv6 cluster IPs and its node port, as tartanctl printed.
fn create_dual(
    lab: &Lab,
    name: &str,
    extra: &[&str],
) -> Result<(Ipv4Addr, std::net::Ipv6Addr, u16)> {
    let mut args = vec![
        "service",
        "create",
        name,
        "--port",
        "80:8080/tcp",
        "--selector",
        "app=web",
        "--node-port",
        "auto",
        "--ip-family-policy",
        "RequireDualStack",
        "--service-cidr",
        SERVICE_CIDRS,
    ];
    args.extend_from_slice(extra);
    let out = lab.tartanctl(&args)?;
    let vip4 = tartan::netbench::topology::created_cluster_ip(&out)?;
    let vip6 = tartan::netbench::topology::created_cluster_ip6(&out)?;
    let np = out
        .split("(node ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .with_context(|| format!("no node port in {out:?}"))?
        .parse()?;
    Ok((vip4, vip6, np))
}

#[test]
fn dual_stack_services_answer_on_ipv6_cluster_ips_and_node_ports() -> Result<()> {
    let Some(mut lab) = lab(2, &["--network", "10.244.0.0/16"])? else {
        return Ok(());
    };
    lab.make_dual_stack()?;
    for i in 0..2 {
        lab.start_daemon(i, &["--service-cidr", SERVICE_CIDRS])?;
    }
    for i in 0..2 {
        lab.wait_subnet(i)?;
    }
    let mut webs = Vec::new();
    for i in 0..2 {
        let (p, name) = pod(&mut lab, i, 1, &[("app", "web")])?;
        let ip6 = p.ip6.context("a dual-stack pod has IPv6")?;
        tartan::netbench::probe::tcp_whoami_server_on(
            &p.ns,
            std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, WEB)),
            &name,
        )?;
        webs.push((p, name, ip6));
    }
    let (client, _) = pod(&mut lab, 1, 2, &[("app", "client")])?;
    let client6 = client.ip6.context("client IPv6")?;
    let (vip4, vip6, np) = create_dual(&lab, "web", &[])?;
    // The IPv6 cluster IP from a pod: both pods (one across the IPv6 overlay), the client's
    // own address kept (it is inside the cluster network).
    let first = reach_any(&client.ns, vip6.into(), 80)?;
    ensure!(first.peer == client6.to_string(), "{first:?}");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let w = tcp_whoami(&client.ns, vip6, 80, Duration::from_secs(3))?;
        seen.insert(w.name);
    }
    ensure!(
        seen == webs.iter().map(|w| w.1.clone()).collect(),
        "spread over {seen:?}"
    );
    // The IPv4 cluster IP of the same service still answers.
    reach(&client.ns, vip4, 80)?;
    // A node port on a node's IPv6 address from outside the cluster: masqueraded.
    let node6 = lab.nodes[0].ip6.context("node IPv6")?;
    let w = reach_any(&lab.infra, node6.into(), np)?;
    ensure!(
        !w.peer.starts_with("fd00:77::1") || w.peer.len() > "fd00:77::1".len(),
        "cluster policy must masquerade: {w:?}"
    );
    // Hairpin: a pod reaches itself through the IPv6 cluster IP.
    let (p0, name0, _) = &webs[0];
    let mut got_self = false;
    for _ in 0..20 {
        let w = tcp_whoami(&p0.ns, vip6, 80, Duration::from_secs(3))?;
        got_self |= w.name == *name0;
    }
    ensure!(got_self, "never balanced to itself over 20 connections");
    // Refused at once: another port of the IPv6 cluster IP, an unused address of the range.
    for (ip, port) in [(vip6, 81), ("fd00:96::fff0".parse()?, 80)] {
        let t = Instant::now();
        let e = tcp_whoami(&client.ns, ip, port, Duration::from_secs(3)).unwrap_err();
        ensure!(
            format!("{e:#}").contains("refused") && t.elapsed() < Duration::from_secs(1),
            "[{ip}]:{port}: {e:#} after {:?}",
            t.elapsed()
        );
    }
    // Both tables are there, each of its family.
    let v6 = ns_run(
        &lab.nodes[0].ns,
        "nft",
        &["list", "table", "ip6", "tartan_svc"],
    )?;
    ensure!(
        v6.contains(&vip6.to_string()) || v6.contains("service_ips"),
        "{v6}"
    );
    // The cluster DNS names both cluster IPs, and the IPv6 one's ip6.arpa name back.
    let dig = |args: &[&str]| -> Result<String> {
        let mut a = vec!["@10.96.0.10", "+short", "+time=2", "+tries=3"];
        a.extend_from_slice(args);
        ns_run(&client.ns, "dig", &a)
    };
    let mut last = String::new();
    wait_for("AAAA of the service", Duration::from_secs(20), || {
        last = dig(&["web.default.svc.cluster.local", "AAAA"]).unwrap_or_default();
        (last.trim() == vip6.to_string()).then_some(())
    })
    .with_context(|| format!("last answer {last:?}"))?;
    ensure!(dig(&["web.default.svc.cluster.local", "A"])?.trim() == vip4.to_string());
    ensure!(dig(&["-x", &vip6.to_string()])?.trim() == "web.default.svc.cluster.local.");
    // explain shows the IPv6 half: its cluster IP and the pods' IPv6 addresses, counted.
    let out = ns_run(
        &lab.nodes[1].ns,
        &lab.bins.tartanctl.to_string_lossy(),
        &["explain", "--node", "node2"],
    )?;
    ensure!(out.contains(&format!("over IPv6 at {vip6}:")), "{out}");
    for (_, _, ip6) in &webs {
        ensure!(
            out.contains(&format!("{ip6} on node")),
            "{ip6} missing:\n{out}"
        );
    }
    ensure!(
        !out.contains("  0 new connections so far, spread over 2 endpoints:\n    fd00"),
        "IPv6 connections not counted:\n{out}"
    );
    // The local traffic policy over IPv6: a node port on the node with an endpoint keeps the
    // outside client's IPv6 address. (Client-IP affinity is not applied to IPv6 cluster IPs:
    // the service says so.)
    let (_, sticky6, np2) = create_dual(
        &lab,
        "sticky",
        &[
            "--session-affinity",
            "client-ip",
            "--external-traffic-policy",
            "local",
        ],
    )?;
    reach_any(&client.ns, sticky6.into(), 80)?;
    let infra6 = {
        let [a, b] = tartan::lab::UNDERLAY6;
        std::net::Ipv6Addr::new(a, b, 0, 0, 0, 0, 0, 1)
    };
    let w = reach_any(&lab.infra, node6.into(), np2)?;
    ensure!(
        w.peer == infra6.to_string() && w.name == webs[0].1,
        "local policy: the node's own pod, the client's address kept: {w:?}"
    );
    let out = ns_run(
        &lab.nodes[0].ns,
        &lab.bins.tartanctl.to_string_lossy(),
        &["explain", "--node", "node1"],
    )?;
    ensure!(
        out.contains("client-IP affinity is not applied to the IPv6 cluster IP"),
        "{out}"
    );
    // Deleting the service takes its IPv6 rules away.
    lab.tartanctl(&["service", "delete", "web"])?;
    wait_for(
        "the IPv6 cluster IP refused",
        Duration::from_secs(20),
        || {
            tcp_whoami(&client.ns, vip6, 80, Duration::from_secs(2))
                .err()
                .filter(|e| format!("{e:#}").contains("refused"))
        },
    )?;
    Ok(())
}
