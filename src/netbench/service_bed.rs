//! A bench for the service NAT alone: one "node" namespace per variant, each with a client pod
//! and a server pod, and either tartan's service table (programmed with the daemon's own code,
//! for N services) or an iptables-style linear NAT chain of N rules as the reference. New
//! connections from the client to the last service measure the first-packet cost. Every
//! variant's pods are dual-stack, so the same bed measures tartan's IPv6 table
//! ([`NatKind::Tartan6`]: dual-stack services, the IPv6 cluster IP measured).

use crate::store::keys::pod_key;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::kernel::nft_elements::NftSocket;
use crate::lab::{
    Lab, address_up_default_route, block_on_in_netns, delete_ns, in_netns, ip, ns_command, ns_run,
    sweep_stale,
};
use crate::model::pod::PodRecord;
use crate::model::service::{
    DEFAULT_AFFINITY_TIMEOUT, IpFamily, IpFamilyPolicy, Service, ServicePort, SessionAffinity,
    TrafficPolicy,
};
use crate::netbench::probe::{tcp_server, tcp_server_on};
use crate::proxy::rules::{Balancing, Family, NodeContext};
use crate::proxy::state::{ModelChange, ServiceState};
use crate::proxy::table::build_and_switch;
use crate::store::etcd::{EtcdArgs, Store};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The client pod's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
/// The server pod's first address (more follow when a service needs several endpoints).
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
/// The client pod's IPv6 address.
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 2);
/// The server pod's first IPv6 address.
pub const SERVER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 2, 0, 0, 0, 2);
/// The port the server listens on.
pub const SERVER_PORT: u16 = 8080;
/// The service port.
pub const SERVICE_PORT: u16 = 80;

/// What a variant's node namespace holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// tartan's service table with this many services (5 endpoints each; the measured one last).
    Tartan {
        /// Services in the table.
        services: u32,
        /// Endpoints of the measured service (addresses of the server pod).
        endpoints: u32,
        /// Balancing mode.
        balancing: Balancing,
    },
    /// An iptables-style chain: one `-d VIP -p tcp --dport 80 -j DNAT` rule per service, the
    /// measured service last.
    Linear {
        /// Rules in the chain.
        services: u32,
    },
    /// tartan's IPv6 table (`ip6 tartan_svc`) with this many dual-stack services (5 endpoints
    /// each); the last one's IPv6 cluster IP is measured, to its one endpoint.
    Tartan6 {
        /// Services in the table.
        services: u32,
    },
}

impl NatKind {
    /// A short label for reports.
    pub fn label(&self) -> String {
        match self {
            NatKind::Tartan { services, .. } => format!("tartan, {services} services"),
            NatKind::Linear { services } => format!("linear chain, {services} rules"),
            NatKind::Tartan6 { services } => format!("tartan IPv6, {services} services"),
        }
    }
}

/// The cluster IP of service number `i` (0-based) in a bench table: from 10.96.0.16 up,
/// past the address the guard reserves for the cluster DNS (10.96.0.10).
pub fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 16 + i)
}

/// The IPv6 cluster IP of service number `i` in a bench table (from fd00:96::10 up).
pub fn vip6(i: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0)) + 16 + u128::from(i))
}

/// One variant: namespaces and the measured service's address.
pub struct Variant {
    /// The NAT in its node.
    pub kind: NatKind,
    /// Node namespace.
    pub node: String,
    /// Client pod namespace.
    pub client: String,
    /// Server pod namespace.
    pub server: String,
    /// The measured service's cluster IP.
    pub target: IpAddr,
    /// Seconds it took to program the NAT.
    pub load_seconds: f64,
}

/// Every variant's namespaces; removed on drop.
pub struct ServiceBed {
    /// The variants.
    pub variants: Vec<Variant>,
    namespaces: Vec<String>,
}

impl ServiceBed {
    /// The order to measure the variants in during round `round`: alternating, so that no
    /// variant always runs first.
    pub fn round_order(&self, round: usize) -> Vec<usize> {
        let n = self.variants.len();
        if round.is_multiple_of(2) {
            (0..n).collect()
        } else {
            (0..n).rev().collect()
        }
    }
}

impl Drop for ServiceBed {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            delete_ns(ns);
        }
    }
}

fn service(i: u32) -> Service {
    Service {
        namespace: "bench".into(),
        name: format!("s{i}"),
        cluster_ip: vip(i),
        ports: vec![ServicePort {
            name: None,
            port: SERVICE_PORT,
            target_port: SERVER_PORT,
            protocol: crate::model::service::Protocol::Tcp,
            node_port: None,
        }],
        selector: Some([("app".to_string(), format!("a{i}"))].into()),
        session_affinity: SessionAffinity::None,
        session_affinity_timeout: DEFAULT_AFFINITY_TIMEOUT,
        external_traffic_policy: TrafficPolicy::Cluster,
        cluster_ips: Vec::new(),
        ip_families: Vec::new(),
        ip_family_policy: Default::default(),
    }
}

fn pod(i: u32, k: u32, ip: Ipv4Addr) -> (String, PodRecord) {
    (
        format!("/bench/{i}/{k}"),
        PodRecord {
            ip6: None,
            container_id: format!("c{i}-{k}"),
            ifname: "eth0".into(),
            node: "bench".into(),
            ip,
            namespace: "bench".into(),
            name: format!("p{i}-{k}"),
            labels: [("app".to_string(), format!("a{i}"))].into(),
        },
    )
}

/// A dual-stack [`service`]: its IPv6 cluster IP is [`vip6`]`(i)`.
fn service6(i: u32) -> Service {
    Service {
        cluster_ips: vec![vip(i).into(), vip6(i).into()],
        ip_families: vec![IpFamily::IPv4, IpFamily::IPv6],
        ip_family_policy: IpFamilyPolicy::RequireDualStack,
        ..service(i)
    }
}

/// Programs tartan's IPv6 table with `services` dual-stack services in the current namespace.
async fn program_tartan6(services: u32) -> Result<()> {
    let ctx = NodeContext {
        node: "bench".into(),
        family: Family::V6,
        cluster_network: "fd00:10::/32".parse()?,
        service_cidr: "fd00:96::/108".parse()?,
        balancing: Balancing::RoundRobin,
    };
    let mut st = ServiceState::new(ctx.clone());
    for i in 0..services {
        st.change(ModelChange::PutService(format!("/svc/{i}"), service6(i)));
        let last = i + 1 == services;
        let n = if last { 1 } else { 5 };
        for k in 0..n {
            let (key, mut rec) = pod(i, k, Ipv4Addr::from(0x0ac8_0000 + i * 8 + k));
            rec.ip6 = Some(if last {
                SERVER_IP6
            } else {
                Ipv6Addr::from(
                    u128::from(Ipv6Addr::new(0xfd00, 0x10, 0x200, 0, 0, 0, 0, 0))
                        + u128::from(i * 8 + k),
                )
            });
            st.change(ModelChange::PutPod(key, rec));
        }
    }
    let plan = st.plan_full();
    let mut nft = NftSocket::open()?;
    build_and_switch(&mut nft, &ctx, &plan, None).await?;
    Ok(())
}

/// Programs tartan's table for `kind` in the current namespace (call inside the node namespace).
async fn program_tartan(services: u32, endpoints: u32, balancing: Balancing) -> Result<()> {
    let ctx = NodeContext {
        node: "bench".into(),
        family: crate::proxy::rules::Family::V4,
        cluster_network: "10.244.0.0/16".parse()?,
        service_cidr: "10.96.0.0/12".parse()?,
        balancing,
    };
    let mut st = ServiceState::new(ctx.clone());
    for i in 0..services {
        st.change(ModelChange::PutService(format!("/svc/{i}"), service(i)));
        let last = i + 1 == services;
        let n = if last { endpoints } else { 5 };
        for k in 0..n {
            let ip = if last {
                Ipv4Addr::from(u32::from(SERVER_IP) + k)
            } else {
                // Addresses that exist nowhere: only the table size matters for them.
                Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + i * 8 + k)
            };
            let (key, rec) = pod(i, k, ip);
            st.change(ModelChange::PutPod(key, rec));
        }
    }
    let plan = st.plan_full();
    let mut nft = NftSocket::open()?;
    build_and_switch(&mut nft, &ctx, &plan, None).await?;
    Ok(())
}

/// Loads an iptables-style NAT chain with `services` rules into `ns`, the target last.
fn program_linear(ns: &str, services: u32) -> Result<()> {
    let mut s = String::with_capacity(services as usize * 96);
    s.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:BENCH-SERVICES - [0:0]\n");
    s.push_str("-A PREROUTING -j BENCH-SERVICES\n");
    for i in 0..services {
        let to = if i + 1 == services {
            SERVER_IP
        } else {
            Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + i * 8)
        };
        s.push_str(&format!(
            "-A BENCH-SERVICES -d {}/32 -p tcp -m tcp --dport {SERVICE_PORT} -j DNAT --to-destination {to}:{SERVER_PORT}\n",
            vip(i)
        ));
    }
    s.push_str("COMMIT\n");
    let mut child = ns_command(ns, "iptables-restore")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running iptables-restore")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(s.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "iptables-restore: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Starts a server in `ns` that answers every connection with one byte and the local address
/// it was reached at (so the endpoint is known), then closes.
fn server(ns: &str) -> Result<()> {
    let answer = |mut s: TcpStream| {
        let local = s
            .local_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let _ = s.write_all(format!("{local}\n").as_bytes());
    };
    tcp_server(ns, SERVER_PORT, "bench", answer)?;
    tcp_server_on(
        ns,
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, SERVER_PORT)),
        "bench6",
        answer,
    )
}

impl ServiceBed {
    /// Builds one variant per entry of `kinds`, programmed and checked to answer.
    pub fn new(kinds: &[NatKind]) -> Result<ServiceBed> {
        sweep_stale();
        let id = format!(
            "tt{}x{}s{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            rand::random::<u16>() % 1000
        );
        let mut bed = ServiceBed {
            variants: Vec::new(),
            namespaces: Vec::new(),
        };
        for (i, kind) in kinds.iter().enumerate() {
            let node = format!("{id}-v{i}");
            let client = format!("{node}c");
            let server_ns = format!("{node}s");
            for ns in [&node, &client, &server_ns] {
                ip(&["netns", "add", ns])?;
                bed.namespaces.push(ns.clone());
                ip(&["-n", ns, "link", "set", "lo", "up"])?;
            }
            ip(&[
                "-n", &node, "link", "add", "toc", "type", "veth", "peer", "name", "eth0", "netns",
                &client,
            ])?;
            ip(&[
                "-n", &node, "link", "add", "tos", "type", "veth", "peer", "name", "eth0", "netns",
                &server_ns,
            ])?;
            ip(&["-n", &node, "addr", "add", "10.244.1.1/24", "dev", "toc"])?;
            ip(&["-n", &node, "addr", "add", "10.244.2.1/24", "dev", "tos"])?;
            ip(&["-n", &node, "link", "set", "toc", "up"])?;
            ip(&["-n", &node, "link", "set", "tos", "up"])?;
            ns_run(&node, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
            ns_run(&node, "sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
            for (dev, a) in [
                ("toc", "fd00:10:244:1::1/64"),
                ("tos", "fd00:10:244:2::1/64"),
            ] {
                ip(&["-n", &node, "addr", "add", a, "dev", dev, "nodad"])?;
            }
            address_up_default_route(&client, "eth0", &format!("{CLIENT_IP}/24"), "10.244.1.1")?;
            crate::lab::address6_default_route(
                &client,
                "eth0",
                &format!("{CLIENT_IP6}/64"),
                "fd00:10:244:1::1",
            )?;
            let endpoints = match kind {
                NatKind::Tartan { endpoints, .. } => (*endpoints).max(1),
                NatKind::Linear { .. } | NatKind::Tartan6 { .. } => 1,
            };
            ip(&[
                "-n",
                &server_ns,
                "addr",
                "add",
                &format!("{SERVER_IP6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            for k in 0..endpoints {
                let a = Ipv4Addr::from(u32::from(SERVER_IP) + k);
                ip(&[
                    "-n",
                    &server_ns,
                    "addr",
                    "add",
                    &format!("{a}/24"),
                    "dev",
                    "eth0",
                ])?;
            }
            ip(&["-n", &server_ns, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                &server_ns,
                "route",
                "add",
                "default",
                "via",
                "10.244.2.1",
            ])?;
            ip(&[
                "-n",
                &server_ns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                "fd00:10:244:2::1",
            ])?;
            server(&server_ns)?;
            let t = Instant::now();
            let target = match *kind {
                NatKind::Tartan {
                    services,
                    endpoints,
                    balancing,
                } => {
                    if services == 0 {
                        bail!("a variant needs at least one service");
                    }
                    crate::lab::block_on_in_netns(&node, move || {
                        program_tartan(services, endpoints, balancing)
                    })??;
                    vip(services - 1).into()
                }
                NatKind::Tartan6 { services } => {
                    if services == 0 {
                        bail!("a variant needs at least one service");
                    }
                    crate::lab::block_on_in_netns(&node, move || program_tartan6(services))??;
                    vip6(services - 1).into()
                }
                NatKind::Linear { services } => {
                    if services == 0 {
                        bail!("a variant needs at least one service");
                    }
                    program_linear(&node, services)?;
                    vip(services - 1).into()
                }
            };
            let load_seconds = t.elapsed().as_secs_f64();
            let v = Variant {
                kind: *kind,
                node,
                client,
                server: server_ns,
                target,
                load_seconds,
            };
            // Make sure the path works before anyone measures it.
            let c = v.client.clone();
            crate::lab::wait_for(
                "the bench service to answer",
                Duration::from_secs(20),
                || first_connections(&c, target, 1).ok(),
            )?;
            bed.variants.push(v);
        }
        Ok(bed)
    }
}

/// One new TCP connection to `dst:80` and its first byte, from the calling thread's namespace:
/// the time from `connect` to the first byte, and the endpoint address the server reported.
pub fn first_connection(dst: IpAddr) -> Result<(Duration, String)> {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from((dst, SERVICE_PORT)),
        Duration::from_secs(3),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf)?;
    let d = t.elapsed();
    // Reset instead of TIME_WAIT, so thousands of connections do not exhaust ports.
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    let who = String::from_utf8_lossy(&buf[..n]).trim().to_string();
    Ok((d, who))
}

/// `count` new connections from namespace `ns` to `dst`.
pub fn first_connections(
    ns: &str,
    dst: impl Into<IpAddr>,
    count: usize,
) -> Result<Vec<(Duration, String)>> {
    let dst = dst.into();
    in_netns(ns, move || {
        (0..count).map(|_| first_connection(dst)).collect()
    })?
}

/// Service `bench/s<i>` at [`vip`]`(i)`, port 80 → 8080/tcp, selecting `app=a<i>` (the
/// services the scale benchmarks and the chaos tests load into etcd).
pub fn bulk_service(i: u32) -> Service {
    Service {
        namespace: "bench".into(),
        name: format!("s{i}"),
        cluster_ip: vip(i),
        ports: vec!["80:8080/tcp".parse().expect("static port")],
        selector: Some([("app".to_string(), format!("a{i}"))].into()),
        session_affinity: SessionAffinity::None,
        session_affinity_timeout: DEFAULT_AFFINITY_TIMEOUT,
        external_traffic_policy: TrafficPolicy::Cluster,
        cluster_ips: Vec::new(),
        ip_families: Vec::new(),
        ip_family_policy: Default::default(),
    }
}

/// Pod record `k` of [`bulk_service`]`(i)` on `node` (address 10.200.0.0 + 8i + k).
pub fn bulk_pod(i: u32, k: u32, node: &str) -> PodRecord {
    PodRecord {
        ip6: None,
        container_id: format!("c{i}x{k}"),
        ifname: "eth0".into(),
        node: node.into(),
        ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + i * 8 + k),
        namespace: "bench".into(),
        name: format!("p{i}x{k}"),
        labels: [("app".to_string(), format!("a{i}"))].into(),
    }
}

/// Writes `services` [`bulk_service`]s with 5 [`bulk_pod`]s each (on node `elsewhere`)
/// straight into the lab's etcd, as `tartanctl` would minus the per-service allocation
/// transactions, 100 keys per transaction.
pub fn load_bulk_services(lab: &Lab, services: u32) -> Result<()> {
    let t = Instant::now();
    block_on_in_netns(&lab.infra, move || async move {
        let args = EtcdArgs::for_endpoints(&["http://127.0.0.1:2379"]);
        let store = Store::connect(&args).await?;
        let mut kvs: Vec<(String, Vec<u8>)> = Vec::new();
        for i in 0..services {
            let s = bulk_service(i);
            kvs.push((
                crate::store::keys::service_key(&args, &s.namespace, &s.name),
                s.to_bytes(),
            ));
            for k in 0..5 {
                let p = bulk_pod(i, k, "elsewhere");
                kvs.push((pod_key(&args, &p), p.to_bytes()));
            }
        }
        let ops = kvs
            .into_iter()
            .map(|(k, v)| etcd_client::TxnOp::put(k, v, None))
            .collect();
        txn_batches(&store, ops).await?;
        anyhow::Ok(())
    })??;
    println!(
        "  loaded {services} services and {} pods into etcd in {:.1} s",
        services * 5,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Sends `ops` to etcd as transactions of 100 operations, 8 in flight (how the scale
/// benchmarks and chaos tests load tens of thousands of records quickly).
pub async fn txn_batches(store: &Store, ops: Vec<etcd_client::TxnOp>) -> Result<()> {
    use futures::StreamExt;
    let mut chunks = Vec::new();
    let mut ops = ops.into_iter().peekable();
    while ops.peek().is_some() {
        chunks.push(ops.by_ref().take(100).collect::<Vec<_>>());
    }
    let results: Vec<Result<bool>> = futures::stream::iter(chunks.into_iter().map(|c| {
        let store = store.clone();
        async move { store.txn(etcd_client::Txn::new().and_then(c)).await }
    }))
    .buffer_unordered(8)
    .collect()
    .await;
    results.into_iter().try_for_each(|r| r.map(|_| ()))
}
