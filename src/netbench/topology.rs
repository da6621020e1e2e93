//! The bench cluster: tartan nodes (VXLAN), two more tartan nodes with DirectRouting, a
//! hand-built flannel-equivalent VXLAN pair as the reference, pods started through
//! `tartan-cni`, a service with node ports, an external client on the underlay — and the
//! list of paths measured across it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::probe::{bench_servers, bench_servers_on, ports};
use crate::lab::{DUAL_CONFIG, Lab, LabPod, address_up_default_route, ip, ns_run, wait_for};

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
    pub dst: IpAddr,
    /// Ports for (TCP echo, UDP echo, first byte, sink) at `dst`.
    pub ports: [u16; 4],
    /// An IPv6 path (its floor is the IPv6 underlay).
    pub ipv6: bool,
}

/// Everything a run needs; the lab (and so every namespace) goes when this is dropped.
pub struct Topology {
    /// The cluster.
    pub lab: Lab,
    /// The paths, in measuring order.
    pub paths: Vec<PathSpec>,
    /// The service's cluster IP.
    pub cluster_ip: Ipv4Addr,
    /// Its IPv6 cluster IP (a dual-stack bench).
    pub cluster_ip6: Option<Ipv6Addr>,
    /// `pod-a` on node 1 (the client of most paths).
    pub client_pod: LabPod,
    /// `pod-b` on node 2 (label `app=bench`, the service's endpoint).
    pub server_pod: LabPod,
}

const STD: [u16; 4] = [ports::TCP_RR, ports::UDP_RR, ports::FIRST_BYTE, ports::SINK];

/// The cluster IP in `tartanctl service create`'s answer ("service NS/NAME created: cluster IP
/// A.B.C.D, ports ...").
pub fn created_cluster_ip(out: &str) -> Result<Ipv4Addr> {
    created_address(out, "cluster IP ")
}

/// The IPv6 cluster IP in `tartanctl service create`'s answer ("…, IPv6 cluster IP X, …").
pub fn created_cluster_ip6(out: &str) -> Result<Ipv6Addr> {
    created_address(out, "IPv6 cluster IP ")
}

/// The address after the first `marker` in tartanctl's output, up to the next comma.
fn created_address<T: std::str::FromStr>(out: &str, marker: &str) -> Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let what = marker.trim();
    let ip = out
        .split(marker)
        .nth(1)
        .and_then(|r| r.split(',').next())
        .with_context(|| format!("no {what} in tartanctl's output {out:?}"))?;
    ip.trim()
        .parse()
        .with_context(|| format!("{what} {ip:?} in tartanctl's output"))
}

/// Builds the flannel-equivalent VXLAN node `ns` (index `k` of 2): device `flannel.1` (VNI 1,
/// port 8472, learning off, MTU underlay − 50), address `10.246.k.0/32`, bridge `cni0` with
/// `10.246.k.1/24`, flannel's masquerade rules; with `underlay6`, its IPv6 half too
/// ([`flannel_node6`]). Pods and bridge get `mtu` (a dual-stack node's is the smaller of the
/// two devices', as tartan's). Returns the node subnet.
fn flannel_node(
    ns: &str,
    k: u8,
    underlay_ip: Ipv4Addr,
    underlay6: Option<Ipv6Addr>,
    mtu: &str,
) -> Result<ipnetwork::Ipv4Network> {
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
    ip(&["-n", ns, "link", "set", "flannel.1", "mtu", "1450", "up"])?;
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
    if let Some(u6) = underlay6 {
        flannel_node6(ns, k, u6)?;
    }
    Ok(subnet)
}

/// The flannel reference's IPv6 subnet of node `k`: `fd00:246:0:k::/64`.
fn flannel_subnet6(k: u8) -> ipnetwork::Ipv6Network {
    ipnetwork::Ipv6Network::new(
        Ipv6Addr::new(0xfd00, 0x246, 0, u16::from(k), 0, 0, 0, 0),
        64,
    )
    .expect("a /64 is a valid prefix")
}

/// flannel's IPv6 half of node `ns` (flannel's `EnableIPv6`): device `flannel-v6.1` (VNI 1,
/// port 8472 over the IPv6 underlay address `underlay6`, learning off, MTU underlay − 70),
/// address `fd00:246:0:k::/128`, `cni0` with `fd00:246:0:k::1/64`, forwarding, and flannel's
/// IPv6 masquerade rules (ip6tables).
fn flannel_node6(ns: &str, k: u8, underlay6: Ipv6Addr) -> Result<()> {
    let subnet = flannel_subnet6(k);
    let gw = Ipv6Addr::from(u128::from(subnet.network()) + 1);
    ip(&[
        "-n",
        ns,
        "link",
        "add",
        "flannel-v6.1",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        &underlay6.to_string(),
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    ])?;
    ip(&["-n", ns, "link", "set", "flannel-v6.1", "mtu", "1430", "up"])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{}/128", subnet.network()),
        "dev",
        "flannel-v6.1",
        "nodad",
    ])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{gw}/64"),
        "dev",
        "cni0",
        "nodad",
    ])?;
    ns_run(ns, "sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
    let net = "fd00:246::/48";
    let rules = format!(
        "*nat\n:POSTROUTING ACCEPT [0:0]\n:FLANNEL-POSTRTG - [0:0]\n\
         -A POSTROUTING -j FLANNEL-POSTRTG\n\
         -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -j RETURN\n\
         -A FLANNEL-POSTRTG -s {subnet} -d {net} -j RETURN\n\
         -A FLANNEL-POSTRTG -s {net} -d {subnet} -j RETURN\n\
         -A FLANNEL-POSTRTG ! -s {net} -d {subnet} -j RETURN\n\
         -A FLANNEL-POSTRTG -s {net} ! -d ff00::/8 -j MASQUERADE --random-fully\n\
         -A FLANNEL-POSTRTG ! -s {net} -d {net} -j MASQUERADE --random-fully\n\
         COMMIT\n"
    );
    let path = std::env::temp_dir().join(format!("{ns}.ip6tables"));
    std::fs::write(&path, rules)?;
    let r = ns_run(ns, "ip6tables-restore", &[&path.to_string_lossy()]);
    let _ = std::fs::remove_file(&path);
    r.map(|_| ())
}

/// flannel's IPv6 per-peer entries on `ns` towards node `k` (VTEP `mac` on `flannel-v6.1`,
/// underlay `public`).
fn flannel_peer6(ns: &str, k: u8, mac: &str, public: Ipv6Addr) -> Result<()> {
    let subnet = flannel_subnet6(k);
    peer_entries(
        ns,
        "flannel-v6.1",
        &subnet.to_string(),
        &subnet.network().to_string(),
        mac,
        &public.to_string(),
    )
}

/// flannel's per-peer entries on `ns` towards the peer with `subnet`, VTEP `mac`, `public`.
fn flannel_peer(
    ns: &str,
    subnet: ipnetwork::Ipv4Network,
    mac: &str,
    public: Ipv4Addr,
) -> Result<()> {
    peer_entries(
        ns,
        "flannel.1",
        &subnet.to_string(),
        &subnet.network().to_string(),
        mac,
        &public.to_string(),
    )
}

/// flannel's three entries per peer on device `dev`: a permanent neighbour `gw` → `mac`, an
/// FDB entry `mac` → `public`, and the route to `subnet` via `gw` (on-link).
fn peer_entries(
    ns: &str,
    dev: &str,
    subnet: &str,
    gw: &str,
    mac: &str,
    public: &str,
) -> Result<()> {
    ip(&[
        "-n",
        ns,
        "neigh",
        "add",
        gw,
        "lladdr",
        mac,
        "dev",
        dev,
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
            dev,
            "dst",
            public,
            "self",
            "permanent",
        ],
    )?;
    ip(&[
        "-n", ns, "route", "add", subnet, "via", gw, "dev", dev, "onlink",
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

/// A pod on a flannel node: veth into `cni0` (MTU `mtu`), address `10.246.k.(1+n)`, and
/// with `ipv6` also `fd00:246:0:k::(1+n)` (no duplicate address detection, as flannel's
/// pods get from the runtime's sysctls) with its default route.
fn flannel_pod(
    lab: &mut Lab,
    node_ns: &str,
    k: u8,
    n: u8,
    mtu: &str,
    ipv6: bool,
) -> Result<LabPod> {
    let ns = lab.add_namespace(&format!("f{k}p{n}"))?;
    let pod_ip = Ipv4Addr::new(10, 246, k, 1 + n);
    let host = format!("fv{n}");
    ip(&[
        "-n", node_ns, "link", "add", &host, "mtu", mtu, "type", "veth", "peer", "name", "eth0",
        "mtu", mtu, "netns", &ns,
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
    let ip6 = if ipv6 {
        let subnet = flannel_subnet6(k);
        let a6 = Ipv6Addr::from(u128::from(subnet.network()) + 1 + u128::from(n));
        let gw = Ipv6Addr::from(u128::from(subnet.network()) + 1);
        crate::lab::address6_default_route(&ns, "eth0", &format!("{a6}/64"), &gw.to_string())?;
        Some(a6)
    } else {
        None
    };
    Ok(LabPod {
        ns,
        ip: pod_ip,
        ip6,
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

/// The service ranges of the dual-stack bench (tartand's and tartanctl's `--service-cidr`).
const SERVICE_CIDRS: &str = "10.96.0.0/12,fd00:96::/108";

/// Builds the bench cluster with `nodes` tartan VXLAN nodes (at least 2); with `ipv6`,
/// dual-stack (an IPv6 underlay, IPv6 pod subnets and cluster IP, flannel's IPv6 half) and
/// the IPv6 paths beside the IPv4 ones.
pub fn build(mut lab: Lab, nodes: usize, ipv6: bool, progress: &dyn Fn(&str)) -> Result<Topology> {
    if nodes < 2 {
        bail!("--nodes: at least 2");
    }
    start_cluster(&mut lab, nodes, ipv6, progress)?;
    progress("pods (tartan-cni)");
    let pods = tartan_pods(&mut lab, nodes)?;
    progress("flannel reference");
    let flannel = flannel_reference(&mut lab, nodes, ipv6)?;
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
    if ipv6 {
        for ns in [&pods.b.ns, &lab.nodes[1].ns, &flannel.fb.ns] {
            bench_servers_on(ns, Ipv6Addr::UNSPECIFIED.into())?;
        }
    }
    progress("service");
    let (cluster_ip, cluster_ip6, np) = create_service(&lab, ipv6)?;
    let gw1 = Ipv4Addr::from(u32::from(lab.wait_subnet(0)?.network()) + 1);
    let mut paths = floor_paths(&lab, &pods);
    paths.extend(pod_paths(&lab, &pods, gw1));
    paths.extend(service_paths(&lab, &pods, cluster_ip, np));
    paths.extend(flannel_paths(&flannel));
    if let Some(vip6) = cluster_ip6 {
        paths.extend(ipv6_paths(&lab, &pods, &flannel, vip6, np)?);
    }
    progress("checking every path");
    check_paths(&paths)?;
    Ok(Topology {
        lab,
        paths,
        cluster_ip,
        cluster_ip6,
        client_pod: pods.a,
        server_pod: pods.b,
    })
}

/// Namespaces, underlay and control plane: etcd with both networks (VXLAN, dual-stack with
/// `ipv6`, and DirectRouting), `nodes + 4` nodes (tartan VXLAN, then 2 DirectRouting, then 2
/// flannel), tartand on the tartan ones, and their subnets leased.
fn start_cluster(lab: &mut Lab, nodes: usize, ipv6: bool, progress: &dyn Fn(&str)) -> Result<()> {
    progress("etcd");
    lab.start_etcd()?;
    if ipv6 {
        lab.etcdctl(&["put", "/coreos.com/network/config", DUAL_CONFIG])?;
    } else {
        lab.init_network(&["--network", "10.244.0.0/16"])?;
    }
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
    if ipv6 {
        lab.add_ipv6_underlay()?;
    }
    progress("tartand");
    for i in 0..nodes {
        let args: &[&str] = if ipv6 {
            &["--service-cidr", SERVICE_CIDRS]
        } else {
            &[]
        };
        lab.start_daemon(i, args)?;
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
/// their pods; with `ipv6`, dual-stack (MTU 1430 on bridge and pods, as tartan's).
fn flannel_reference(lab: &mut Lab, nodes: usize, ipv6: bool) -> Result<FlannelPods> {
    let (n1, n2) = (&lab.nodes[nodes + 2], &lab.nodes[nodes + 3]);
    let (f1, f2) = (n1.ns.clone(), n2.ns.clone());
    let (f1ip, f2ip) = (n1.ip, n2.ip);
    let (f1ip6, f2ip6) = if ipv6 {
        let both = n1.ip6.zip(n2.ip6);
        let (a, b) = both.context("the flannel nodes have no IPv6 underlay address")?;
        (Some(a), Some(b))
    } else {
        (None, None)
    };
    let mtu = if ipv6 { "1430" } else { "1450" };
    let s1 = flannel_node(&f1, 1, f1ip, f1ip6, mtu)?;
    let s2 = flannel_node(&f2, 2, f2ip, f2ip6, mtu)?;
    flannel_peer(&f1, s2, &mac_of(&f2, "flannel.1")?, f2ip)?;
    flannel_peer(&f2, s1, &mac_of(&f1, "flannel.1")?, f1ip)?;
    if let (Some(a), Some(b)) = (f1ip6, f2ip6) {
        flannel_peer6(&f1, 2, &mac_of(&f2, "flannel-v6.1")?, b)?;
        flannel_peer6(&f2, 1, &mac_of(&f1, "flannel-v6.1")?, a)?;
    }
    let fa = flannel_pod(lab, &f1, 1, 1, mtu, ipv6)?;
    let fa2 = flannel_pod(lab, &f1, 1, 2, mtu, ipv6)?;
    let fb = flannel_pod(lab, &f2, 2, 1, mtu, ipv6)?;
    Ok(FlannelPods {
        node1: f1,
        fa,
        fa2,
        fb,
    })
}

/// Creates the `bench` service (selector `app=bench`, 4 ports, each with a node port;
/// RequireDualStack with `ipv6`): its cluster IP, IPv6 cluster IP and node ports.
fn create_service(lab: &Lab, ipv6: bool) -> Result<(Ipv4Addr, Option<Ipv6Addr>, [u16; 4])> {
    let mut args = vec![
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
    ];
    if ipv6 {
        args.extend([
            "--ip-family-policy",
            "RequireDualStack",
            "--service-cidr",
            SERVICE_CIDRS,
        ]);
    }
    let out = lab.tartanctl(&args)?;
    let cluster_ip = created_cluster_ip(&out)?;
    let cluster_ip6 = if ipv6 {
        Some(created_cluster_ip6(&out)?)
    } else {
        None
    };
    let nps: Vec<u16> = out
        .split("(node ")
        .skip(1)
        .filter_map(|r| r.split(')').next()?.parse().ok())
        .collect();
    let np: [u16; 4] = nps
        .try_into()
        .map_err(|v: Vec<u16>| anyhow::anyhow!("expected 4 node ports, got {v:?}"))?;
    Ok((cluster_ip, cluster_ip6, np))
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
            dst: Ipv4Addr::LOCALHOST.into(),
            ports: STD,
            ipv6: false,
        },
        PathSpec {
            id: "underlay",
            label: "host -> host (underlay)",
            dataplane: Dataplane::Underlay,
            reference: None,
            client: lab.nodes[0].ns.clone(),
            dst: lab.nodes[1].ip.into(),
            ports: STD,
            ipv6: false,
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
            dst: gw1.into(),
            ports: STD,
            ipv6: false,
        },
        PathSpec {
            id: "pod-same-node",
            label: "pod -> pod, same node",
            dataplane: Dataplane::Tartan,
            reference: Some("flannel-pod-same-node"),
            client: pods.a.ns.clone(),
            dst: pods.a2.ip.into(),
            ports: STD,
            ipv6: false,
        },
        PathSpec {
            id: "pod-cross-direct",
            label: "pod -> pod, other node, DirectRouting",
            dataplane: Dataplane::Tartan,
            reference: None,
            client: pods.c.ns.clone(),
            dst: pods.d.ip.into(),
            ports: STD,
            ipv6: false,
        },
        PathSpec {
            id: "pod-cross-vxlan",
            label: "pod -> pod, other node, VXLAN",
            dataplane: Dataplane::Tartan,
            reference: Some("flannel-pod-cross"),
            client: pods.a.ns.clone(),
            dst: pods.b.ip.into(),
            ports: STD,
            ipv6: false,
        },
        PathSpec {
            id: "host-remote-pod",
            label: "host -> pod on other node",
            dataplane: Dataplane::Tartan,
            reference: Some("flannel-host-remote-pod"),
            client: node1,
            dst: pods.b.ip.into(),
            ports: STD,
            ipv6: false,
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
            dst: cluster_ip.into(),
            ports: STD,
            ipv6: false,
        },
        PathSpec {
            id: "external-nodeport",
            label: "external client -> NodePort -> pod",
            dataplane: Dataplane::Tartan,
            reference: None,
            client: lab.infra.clone(),
            dst: lab.nodes[1].ip.into(),
            ports: np,
            ipv6: false,
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
            dst: flannel.fa2.ip.into(),
            ports: STD,
            ipv6: false,
        },
        PathSpec {
            id: "flannel-pod-cross",
            label: "flannel: pod -> pod, other node",
            dataplane: Dataplane::Flannel,
            reference: None,
            client: flannel.fa.ns.clone(),
            dst: flannel.fb.ip.into(),
            ports: STD,
            ipv6: false,
        },
        PathSpec {
            id: "flannel-host-remote-pod",
            label: "flannel: host -> pod on other node",
            dataplane: Dataplane::Flannel,
            reference: None,
            client: flannel.node1.clone(),
            dst: flannel.fb.ip.into(),
            ports: STD,
            ipv6: false,
        },
    ]
}

/// The IPv6 paths (dual-stack bench): the IPv6 underlay floor, pod → pod over the IPv6
/// VXLAN device, host → remote pod, pod → IPv6 cluster IP, the external client → node port
/// on node 2's IPv6 address, and flannel's IPv6 counterparts. Each is compared with the
/// IPv6 underlay and its flannel path.
fn ipv6_paths(
    lab: &Lab,
    pods: &TartanPods,
    flannel: &FlannelPods,
    vip6: Ipv6Addr,
    np: [u16; 4],
) -> Result<Vec<PathSpec>> {
    let six = |p: &LabPod| -> Result<IpAddr> {
        p.ip6
            .map(IpAddr::V6)
            .with_context(|| format!("pod {} has no IPv6 address", p.ns))
    };
    let node2 = lab.nodes[1]
        .ip6
        .map(IpAddr::V6)
        .context("node 2 has no IPv6 underlay address")?;
    let path = |id, label, dataplane, reference, client: &str, dst, ports| PathSpec {
        id,
        label,
        dataplane,
        reference,
        client: client.to_string(),
        dst,
        ports,
        ipv6: true,
    };
    let (t, f) = (Dataplane::Tartan, Dataplane::Flannel);
    let node1 = lab.nodes[0].ns.as_str();
    Ok(vec![
        path(
            "underlay-ipv6",
            "IPv6: host -> host (underlay)",
            Dataplane::Underlay,
            None,
            node1,
            node2,
            STD,
        ),
        path(
            "pod-cross-vxlan-ipv6",
            "IPv6: pod -> pod, other node, VXLAN",
            t,
            Some("flannel-pod-cross-ipv6"),
            &pods.a.ns,
            six(&pods.b)?,
            STD,
        ),
        path(
            "host-remote-pod-ipv6",
            "IPv6: host -> pod on other node",
            t,
            Some("flannel-host-remote-pod-ipv6"),
            node1,
            six(&pods.b)?,
            STD,
        ),
        path(
            "pod-clusterip-ipv6",
            "IPv6: pod -> ClusterIP -> pod, other node",
            t,
            None,
            &pods.a.ns,
            vip6.into(),
            STD,
        ),
        path(
            "external-nodeport-ipv6",
            "IPv6: external client -> NodePort -> pod",
            t,
            None,
            &lab.infra,
            node2,
            np,
        ),
        path(
            "flannel-pod-cross-ipv6",
            "IPv6 flannel: pod -> pod, other node",
            f,
            None,
            &flannel.fa.ns,
            six(&flannel.fb)?,
            STD,
        ),
        path(
            "flannel-host-remote-pod-ipv6",
            "IPv6 flannel: host -> pod on other node",
            f,
            None,
            &flannel.node1,
            six(&flannel.fb)?,
            STD,
        ),
    ])
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
