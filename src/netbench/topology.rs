//! The bench cluster: tartan nodes (VXLAN), two more tartan nodes with DirectRouting, a
//! hand-built flannel-equivalent VXLAN pair as the reference, pods started through
//! `tartan-cni`, a service with node ports, an external client on the underlay — and the
//! list of paths measured across it.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::probe::{bench_servers, ports};
use crate::lab::{Lab, LabPod, address_up_default_route, ip, ns_run, wait_for};

/// Which dataplane a path crosses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dataplane {
    /// No overlay (the floor).
    Underlay,
    /// tartan.
    Tartan,
    /// The hand-built flannel-equivalent reference.
    Flannel,
}

/// One measured path.
#[derive(Debug, Clone)]
pub struct PathSpec {
    /// Stable identifier (JSON, hop formulas).
    pub id: &'static str,
    /// What it is, for people.
    pub label: &'static str,
    /// Dataplane crossed.
    pub dataplane: Dataplane,
    /// The flannel path it is compared with, if any.
    pub reference: Option<&'static str>,
    /// Client namespace.
    pub client: String,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Ports for (TCP echo, UDP echo, first byte, sink) at `dst`.
    pub ports: [u16; 4],
}

/// Everything a run needs; the lab (and so every namespace) goes when this is dropped.
pub struct Topology {
    /// The cluster.
    pub lab: Lab,
    /// The paths, in measuring order.
    pub paths: Vec<PathSpec>,
    /// The service's cluster IP.
    pub cluster_ip: Ipv4Addr,
    /// `pod-a` on node 1 (the client of most paths).
    pub client_pod: LabPod,
    /// `pod-b` on node 2 (label `app=bench`, the service's endpoint).
    pub server_pod: LabPod,
}

const STD: [u16; 4] = [ports::TCP_RR, ports::UDP_RR, ports::FIRST_BYTE, ports::SINK];

/// The cluster IP in `tartanctl service create`'s answer ("service NS/NAME created: cluster IP
/// A.B.C.D, ports ...").
pub fn created_cluster_ip(out: &str) -> Result<Ipv4Addr> {
    let ip = out
        .split("cluster IP ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .with_context(|| format!("no cluster IP in tartanctl's output {out:?}"))?;
    ip.trim()
        .parse()
        .with_context(|| format!("cluster IP {ip:?} in tartanctl's output"))
}

/// Builds the flannel-equivalent VXLAN node `ns` (index `k` of 2): device `flannel.1` (VNI 1,
/// port 8472, learning off, MTU underlay − 50), address `10.246.k.0/32`, bridge `cni0` with
/// `10.246.k.1/24`, flannel's masquerade rules. Returns the node subnet.
fn flannel_node(ns: &str, k: u8, underlay_ip: Ipv4Addr) -> Result<ipnetwork::Ipv4Network> {
    let subnet: ipnetwork::Ipv4Network = format!("10.246.{k}.0/24").parse()?;
    ip(&[
        "-n",
        ns,
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        &underlay_ip.to_string(),
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    ])?;
    let mtu = "1450";
    ip(&["-n", ns, "link", "set", "flannel.1", "mtu", mtu, "up"])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("10.246.{k}.0/32"),
        "dev",
        "flannel.1",
    ])?;
    ip(&[
        "-n", ns, "link", "add", "cni0", "mtu", mtu, "type", "bridge",
    ])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("10.246.{k}.1/24"),
        "dev",
        "cni0",
    ])?;
    ip(&["-n", ns, "link", "set", "cni0", "up"])?;
    ns_run(ns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    // flannel's POSTROUTING rules (iptables flavour, as flanneld writes them).
    let net = "10.246.0.0/16";
    let rules = format!(
        "*nat\n:POSTROUTING ACCEPT [0:0]\n:FLANNEL-POSTRTG - [0:0]\n\
         -A POSTROUTING -j FLANNEL-POSTRTG\n\
         -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -j RETURN\n\
         -A FLANNEL-POSTRTG -s {subnet} -d {net} -j RETURN\n\
         -A FLANNEL-POSTRTG -s {net} -d {subnet} -j RETURN\n\
         -A FLANNEL-POSTRTG ! -s {net} -d {subnet} -j RETURN\n\
         -A FLANNEL-POSTRTG -s {net} ! -d 224.0.0.0/4 -j MASQUERADE --random-fully\n\
         -A FLANNEL-POSTRTG ! -s {net} -d {net} -j MASQUERADE --random-fully\n\
         COMMIT\n"
    );
    let path = std::env::temp_dir().join(format!("{ns}.iptables"));
    std::fs::write(&path, rules)?;
    let r = ns_run(ns, "iptables-restore", &[&path.to_string_lossy()]);
    let _ = std::fs::remove_file(&path);
    r?;
    Ok(subnet)
}

/// flannel's per-peer entries on `ns` towards the peer with `subnet`, VTEP `mac`, `public`.
fn flannel_peer(
    ns: &str,
    subnet: ipnetwork::Ipv4Network,
    mac: &str,
    public: Ipv4Addr,
) -> Result<()> {
    let gw = subnet.network().to_string();
    ip(&[
        "-n",
        ns,
        "neigh",
        "add",
        &gw,
        "lladdr",
        mac,
        "dev",
        "flannel.1",
        "nud",
        "permanent",
    ])?;
    ns_run(
        ns,
        "bridge",
        &[
            "fdb",
            "append",
            mac,
            "dev",
            "flannel.1",
            "dst",
            &public.to_string(),
            "self",
            "permanent",
        ],
    )?;
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        &subnet.to_string(),
        "via",
        &gw,
        "dev",
        "flannel.1",
        "onlink",
    ])?;
    Ok(())
}

fn mac_of(ns: &str, dev: &str) -> Result<String> {
    let out = ip(&["-n", ns, "-o", "link", "show", dev])?;
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_string)
        .context("no MAC")
}

/// A pod on a flannel node: veth into `cni0`, address `10.246.k.(1+n)`.
fn flannel_pod(lab: &mut Lab, node_ns: &str, k: u8, n: u8) -> Result<LabPod> {
    let ns = lab.add_namespace(&format!("f{k}p{n}"))?;
    let pod_ip = Ipv4Addr::new(10, 246, k, 1 + n);
    let host = format!("fv{n}");
    ip(&[
        "-n", node_ns, "link", "add", &host, "mtu", "1450", "type", "veth", "peer", "name", "eth0",
        "mtu", "1450", "netns", &ns,
    ])?;
    ip(&["-n", node_ns, "link", "set", &host, "master", "cni0", "up"])?;
    ip(&[
        "-n",
        node_ns,
        "link",
        "set",
        &host,
        "type",
        "bridge_slave",
        "hairpin",
        "on",
    ])?;
    address_up_default_route(
        &ns,
        "eth0",
        &format!("{pod_ip}/24"),
        &format!("10.246.{k}.1"),
    )?;
    Ok(LabPod {
        ns,
        ip: pod_ip,
        ip6: None,
    })
}

/// The tartan pods the paths use: `pod-a` and `pod-a2` on node 1, `pod-b` on node 2, `pod-c`
/// and `pod-d` on the two DirectRouting nodes.
struct TartanPods {
    a: LabPod,
    a2: LabPod,
    b: LabPod,
    c: LabPod,
    d: LabPod,
}

/// The flannel reference: its first node's namespace and its pods (`fa`, `fa2` on the first
/// node, `fb` on the second).
struct FlannelPods {
    node1: String,
    fa: LabPod,
    fa2: LabPod,
    fb: LabPod,
}

/// Builds the bench cluster with `nodes` tartan VXLAN nodes (at least 2).
pub fn build(mut lab: Lab, nodes: usize, progress: &dyn Fn(&str)) -> Result<Topology> {
    if nodes < 2 {
        bail!("--nodes: at least 2");
    }
    start_cluster(&mut lab, nodes, progress)?;
    progress("pods (tartan-cni)");
    let pods = tartan_pods(&mut lab, nodes)?;
    progress("flannel reference");
    let flannel = flannel_reference(&mut lab, nodes)?;
    progress("servers");
    for ns in [
        &pods.a.ns,
        &pods.a2.ns,
        &pods.b.ns,
        &pods.d.ns,
        &lab.nodes[0].ns,
        &lab.nodes[1].ns,
        &flannel.fa2.ns,
        &flannel.fb.ns,
    ] {
        bench_servers(ns)?;
    }
    progress("service");
    let (cluster_ip, np) = create_service(&lab)?;
    let gw1 = Ipv4Addr::from(u32::from(lab.wait_subnet(0)?.network()) + 1);
    let mut paths = floor_paths(&lab, &pods);
    paths.extend(pod_paths(&lab, &pods, gw1));
    paths.extend(service_paths(&lab, &pods, cluster_ip, np));
    paths.extend(flannel_paths(&flannel));
    progress("checking every path");
    check_paths(&paths)?;
    Ok(Topology {
        lab,
        paths,
        cluster_ip,
        client_pod: pods.a,
        server_pod: pods.b,
    })
}

/// Namespaces, underlay and control plane: etcd with both networks (VXLAN and DirectRouting),
/// `nodes + 4` nodes (tartan VXLAN, then 2 DirectRouting, then 2 flannel), tartand on the
/// tartan ones, and their subnets leased.
fn start_cluster(lab: &mut Lab, nodes: usize, progress: &dyn Fn(&str)) -> Result<()> {
    progress("etcd");
    lab.start_etcd()?;
    lab.init_network(&["--network", "10.244.0.0/16"])?;
    lab.tartanctl(&[
        "--etcd-prefix",
        "/direct/network",
        "network",
        "init",
        "--network",
        "10.245.0.0/16",
        "--direct-routing",
    ])?;
    // Node layout: 0..nodes tartan VXLAN; then 2 DirectRouting nodes; then 2 flannel nodes.
    while lab.nodes.len() < nodes + 4 {
        lab.add_node()?;
    }
    progress("tartand");
    for i in 0..nodes {
        lab.start_daemon(i, &[])?;
    }
    for i in nodes..nodes + 2 {
        lab.start_daemon(
            i,
            &[
                "--etcd-prefix",
                "/direct/network",
                "--tartan-prefix",
                "/direct",
            ],
        )?;
    }
    for i in 0..nodes + 2 {
        lab.wait_subnet(i)?;
    }
    Ok(())
}

/// The tartan pods, started through `tartan-cni` (one `bench-extra` pod on each node past the
/// second).
fn tartan_pods(lab: &mut Lab, nodes: usize) -> Result<TartanPods> {
    let a = lab.add_cni_pod(0, "pod-a", &[("app", "client")])?;
    let a2 = lab.add_cni_pod(0, "pod-a2", &[("app", "peer")])?;
    let b = lab.add_cni_pod(1, "pod-b", &[("app", "bench")])?;
    for k in 2..nodes {
        lab.add_cni_pod(k, &format!("pod-n{}", k + 1), &[("app", "bench-extra")])?;
    }
    let c = lab.add_cni_pod(nodes, "pod-c", &[])?;
    let d = lab.add_cni_pod(nodes + 1, "pod-d", &[])?;
    Ok(TartanPods { a, a2, b, c, d })
}

/// The hand-built flannel pair on the last two nodes: both nodes, each the other's peer, and
/// their pods.
fn flannel_reference(lab: &mut Lab, nodes: usize) -> Result<FlannelPods> {
    let (f1, f2) = (
        lab.nodes[nodes + 2].ns.clone(),
        lab.nodes[nodes + 3].ns.clone(),
    );
    let (f1ip, f2ip) = (lab.nodes[nodes + 2].ip, lab.nodes[nodes + 3].ip);
    let s1 = flannel_node(&f1, 1, f1ip)?;
    let s2 = flannel_node(&f2, 2, f2ip)?;
    flannel_peer(&f1, s2, &mac_of(&f2, "flannel.1")?, f2ip)?;
    flannel_peer(&f2, s1, &mac_of(&f1, "flannel.1")?, f1ip)?;
    let fa = flannel_pod(lab, &f1, 1, 1)?;
    let fa2 = flannel_pod(lab, &f1, 1, 2)?;
    let fb = flannel_pod(lab, &f2, 2, 1)?;
    Ok(FlannelPods {
        node1: f1,
        fa,
        fa2,
        fb,
    })
}

/// Creates the `bench` service (selector `app=bench`, 4 ports, each with a node port): its
/// cluster IP and node ports.
fn create_service(lab: &Lab) -> Result<(Ipv4Addr, [u16; 4])> {
    let out = lab.tartanctl(&[
        "service",
        "create",
        "bench",
        "--selector",
        "app=bench",
        "--port",
        "rr=7001/tcp",
        "--port",
        "udp=7002/udp",
        "--port",
        "conn=7003/tcp",
        "--port",
        "sink=7004/tcp",
        "--node-port",
        "auto",
        "--node-port",
        "auto",
        "--node-port",
        "auto",
        "--node-port",
        "auto",
    ])?;
    let cluster_ip = created_cluster_ip(&out)?;
    let nps: Vec<u16> = out
        .split("(node ")
        .skip(1)
        .filter_map(|r| r.split(')').next()?.parse().ok())
        .collect();
    let np: [u16; 4] = nps
        .try_into()
        .map_err(|v: Vec<u16>| anyhow::anyhow!("expected 4 node ports, got {v:?}"))?;
    Ok((cluster_ip, np))
}

/// The floors: a pod to itself over loopback, and host to host over the underlay.
fn floor_paths(lab: &Lab, pods: &TartanPods) -> Vec<PathSpec> {
    vec![
        PathSpec {
            id: "loopback",
            label: "pod -> itself (loopback, the stack floor)",
            dataplane: Dataplane::Underlay,
            reference: None,
            client: pods.a.ns.clone(),
            dst: Ipv4Addr::LOCALHOST,
            ports: STD,
        },
        PathSpec {
            id: "underlay",
            label: "host -> host (underlay)",
            dataplane: Dataplane::Underlay,
            reference: None,
            client: lab.nodes[0].ns.clone(),
            dst: lab.nodes[1].ip,
            ports: STD,
        },
    ]
}

/// tartan's pod paths: to the node (via `gw1`, node 1's gateway), same node, other node with
/// DirectRouting and with VXLAN, and host to a remote pod.
fn pod_paths(lab: &Lab, pods: &TartanPods, gw1: Ipv4Addr) -> Vec<PathSpec> {
    let node1 = lab.nodes[0].ns.clone();
    vec![
        PathSpec {
            id: "pod-node",
            label: "pod -> its node (veth + bridge)",
            dataplane: Dataplane::Tartan,
            reference: None,
            client: pods.a.ns.clone(),
            dst: gw1,
            ports: STD,
        },
        PathSpec {
            id: "pod-same-node",
            label: "pod -> pod, same node",
            dataplane: Dataplane::Tartan,
            reference: Some("flannel-pod-same-node"),
            client: pods.a.ns.clone(),
            dst: pods.a2.ip,
            ports: STD,
        },
        PathSpec {
            id: "pod-cross-direct",
            label: "pod -> pod, other node, DirectRouting",
            dataplane: Dataplane::Tartan,
            reference: None,
            client: pods.c.ns.clone(),
            dst: pods.d.ip,
            ports: STD,
        },
        PathSpec {
            id: "pod-cross-vxlan",
            label: "pod -> pod, other node, VXLAN",
            dataplane: Dataplane::Tartan,
            reference: Some("flannel-pod-cross"),
            client: pods.a.ns.clone(),
            dst: pods.b.ip,
            ports: STD,
        },
        PathSpec {
            id: "host-remote-pod",
            label: "host -> pod on other node",
            dataplane: Dataplane::Tartan,
            reference: Some("flannel-host-remote-pod"),
            client: node1,
            dst: pods.b.ip,
            ports: STD,
        },
    ]
}

/// The service paths: a pod to the cluster IP, and the external client to a node port.
fn service_paths(
    lab: &Lab,
    pods: &TartanPods,
    cluster_ip: Ipv4Addr,
    np: [u16; 4],
) -> Vec<PathSpec> {
    vec![
        PathSpec {
            id: "pod-clusterip",
            label: "pod -> ClusterIP -> pod, other node",
            dataplane: Dataplane::Tartan,
            reference: None,
            client: pods.a.ns.clone(),
            dst: cluster_ip,
            ports: STD,
        },
        PathSpec {
            id: "external-nodeport",
            label: "external client -> NodePort -> pod",
            dataplane: Dataplane::Tartan,
            reference: None,
            client: lab.infra.clone(),
            dst: lab.nodes[1].ip,
            ports: np,
        },
    ]
}

/// The flannel references the tartan paths are compared with.
fn flannel_paths(flannel: &FlannelPods) -> Vec<PathSpec> {
    vec![
        PathSpec {
            id: "flannel-pod-same-node",
            label: "flannel: pod -> pod, same node",
            dataplane: Dataplane::Flannel,
            reference: None,
            client: flannel.fa.ns.clone(),
            dst: flannel.fa2.ip,
            ports: STD,
        },
        PathSpec {
            id: "flannel-pod-cross",
            label: "flannel: pod -> pod, other node",
            dataplane: Dataplane::Flannel,
            reference: None,
            client: flannel.fa.ns.clone(),
            dst: flannel.fb.ip,
            ports: STD,
        },
        PathSpec {
            id: "flannel-host-remote-pod",
            label: "flannel: host -> pod on other node",
            dataplane: Dataplane::Flannel,
            reference: None,
            client: flannel.node1.clone(),
            dst: flannel.fb.ip,
            ports: STD,
        },
    ]
}

/// Waits (up to 30 s each) for every path to answer one TCP round trip.
fn check_paths(paths: &[PathSpec]) -> Result<()> {
    for p in paths {
        let (c, d, port) = (p.client.clone(), p.dst, p.ports[0]);
        wait_for(
            &format!("path {} to answer", p.id),
            Duration::from_secs(30),
            || super::probe::tcp_rr(&c, d, port, 1).ok(),
        )
        .with_context(|| format!("path {} ({} -> {d})", p.id, p.client))?;
    }
    Ok(())
}
