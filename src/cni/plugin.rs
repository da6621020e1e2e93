//! The verbs of `tartan-cni`. One process per call, as runtimes run plugins: each verb opens
//! only what it needs (a single-threaded runtime and a netlink socket for ADD, DEL, CHECK and
//! GC; nothing for VERSION and STATUS).

use std::collections::HashSet;
use std::fs::File;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::Duration;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde_json::{Map, Value};

use super::bounded_read::{self, FileReadError, SUBNET_ENV_LIMIT};
use super::daemon_link::{self, DaemonLink};
use super::error::{CniError, code};
use super::ipam::{self, AllocationRecord, AllocationRequest, IpamStore};
use super::links::{self, Bridge, MAC_KIND_HOST, MAC_KIND_POD, PodIface, VethSpec};
use super::spec::{
    CniEnv, CniResult, CniVersion, Command, Interface, IpConfig, NetConf, Route,
    find_container_interface, peek_version, version_info,
};
use crate::kernel::netlink::Netlink;
use crate::model::subnet_env::SubnetEnv;
use crate::util::errors::ErrorList;

/// Runs one CNI call; returns what to print on stdout (nothing for DEL, STATUS, GC).
pub fn run(env: &CniEnv, stdin: &[u8]) -> Result<Option<String>, CniError> {
    if env.command == Command::Version {
        let requested = peek_version(stdin).and_then(|v| CniVersion::parse(&v).ok());
        return Ok(Some(version_info(requested).to_string()));
    }
    let conf = NetConf::parse(stdin)?;
    match env.command {
        Command::Add => add(env, &conf).map(Some),
        Command::Del => del(env, &conf).map(|()| None),
        Command::Check => check(env, &conf).map(|()| None),
        Command::Status => status(&conf).map(|()| None),
        Command::Gc => gc(&conf).map(|()| None),
        Command::Version => Ok(None),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, CniError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| CniError::kernel(format!("runtime: {e}")))
}

fn host_netlink(rt: &tokio::runtime::Runtime) -> Result<Netlink, CniError> {
    let _g = rt.enter();
    Netlink::connect().map_err(|e| CniError::kernel(format!("netlink: {e:#}")))
}

/// Reads subnet.env: missing or unreadable means the node has no lease yet (code 11); a path
/// that is not a regular file, or a file too large to be one tartand wrote, is a wrong
/// `subnetFile` (code 7). The read is bounded and never blocks (see [`bounded_read`]).
fn read_subnet_env(path: &Path) -> Result<SubnetEnv, CniError> {
    let bytes = bounded_read::read_regular_file(path, SUBNET_ENV_LIMIT).map_err(|e| match e {
        FileReadError::Io(e) => {
            let why = if e.kind() == ErrorKind::NotFound {
                "the node has no subnet yet".to_string()
            } else {
                format!("cannot read it: {e}")
            };
            CniError::new(
                code::TRY_AGAIN_LATER,
                format!("{} is not there yet", path.display()),
            )
            .details(format!(
                "{why}; tartand writes it once the node's subnet is leased"
            ))
        }
        other => CniError::config(format!("subnetFile {} {other}", path.display()))
            .details("subnetFile must name tartand's subnet.env (--subnet-file)"),
    })?;
    let unusable = |why: String| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            format!("{} is not usable yet", path.display()),
        )
        .details(why)
    };
    let text = String::from_utf8(bytes).map_err(|_| unusable("it is not UTF-8 text".into()))?;
    SubnetEnv::parse(&text).map_err(|e| unusable(format!("{e:#}")))
}

fn attachment(env: &CniEnv) -> Result<(&str, &str), CniError> {
    match (env.container_id.as_deref(), env.ifname.as_deref()) {
        (Some(c), Some(i)) => Ok((c, i)),
        _ => Err(CniError::env("CNI_CONTAINERID and CNI_IFNAME are required")),
    }
}

/// What ADD works with once its checks have passed: the attachment, the pod's namespace, the
/// open link to tartand and what subnet.env and the config give (gateway, MTU, host end name).
struct AddPlan<'a> {
    cid: &'a str,
    ifname: &'a str,
    netns_path: &'a Path,
    netns: File,
    daemon: DaemonLink,
    subnet: Ipv4Network,
    gw: Ipv4Addr,
    gw_net: Ipv4Network,
    /// The IPv6 half of a dual-stack node (subnet.env's `FLANNEL_IPV6_SUBNET`).
    v6: Option<Plan6>,
    mtu: u32,
    host: String,
    /// The result's `dns` (the cluster DNS, with the pod namespace's search list).
    dns: Value,
}

/// The IPv6 half of an ADD: the node's IPv6 subnet and its gateway on the bridge.
#[derive(Clone, Copy)]
struct Plan6 {
    subnet: Ipv6Network,
    gw: Ipv6Addr,
    gw_net: Ipv6Network,
}

/// The kernel side of ADD: both netlink sockets and what the links are built from.
struct AddKernel<'a> {
    nl: &'a Netlink,
    pod_nl: &'a Netlink,
    conf: &'a NetConf,
    plan: &'a AddPlan<'a>,
    store: &'a IpamStore,
    addr: Ipv4Network,
    /// The pod's IPv6 address (dual-stack).
    addr6: Option<Ipv6Network>,
}

fn add(env: &CniEnv, conf: &NetConf) -> Result<String, CniError> {
    let mut tl = Timeline::new();
    let plan = add_checks(env, conf)?;
    tl.mark("checks");

    // Netlink in the node and in the pod (this also proves CNI_NETNS is a network namespace,
    // before anything is allocated).
    let rt = runtime()?;
    let (nl, pod_nl) = {
        let _g = rt.enter();
        let nl = Netlink::connect().map_err(|e| CniError::kernel(format!("netlink: {e:#}")))?;
        // Dual-stack: no duplicate address detection in the pod (its address is unique by
        // IPAM; detection would hold it back for a second, the known +1 s of dual-stack ADDs).
        (nl, links::netlink_in(&plan.netns, plan.v6.is_some())?)
    };
    tl.mark("netlink");

    let store = IpamStore::open(&conf.data_dir, &conf.name)?;
    let rec = add_allocate(env, conf, &plan, &store)?;
    tl.mark("ipam");
    let addr = Ipv4Network::new(rec.ip, plan.subnet.prefix())
        .map_err(|e| CniError::kernel(format!("address {}: {e}", rec.ip)))?;
    let addr6 = match (plan.v6, rec.ip6) {
        (Some(p6), Some(ip6)) => Some(
            Ipv6Network::new(ip6, p6.subnet.prefix())
                .map_err(|e| CniError::kernel(format!("address {ip6}: {e}")))?,
        ),
        _ => None,
    };
    let mut spec = VethSpec {
        host: plan.host.clone(),
        host_mac: links::mac_for(MAC_KIND_HOST, rec.ip),
        pod: plan.ifname.to_string(),
        pod_mac: links::mac_for(MAC_KIND_POD, rec.ip),
        mtu: plan.mtu,
        bridge: 0,
    };
    let hint = links::read_bridge_hint(store.dir(), &conf.bridge);
    let kernel = AddKernel {
        nl: &nl,
        pod_nl: &pod_nl,
        conf,
        plan: &plan,
        store: &store,
        addr,
        addr6,
    };
    let outcome = rt.block_on(add_links(&kernel, &mut spec, hint, &mut tl));
    tl.mark("kernel");
    let bridge = match outcome {
        Ok(br) => br,
        Err(e) => {
            rollback(&rt, &nl, &store, plan.cid, plan.ifname, &plan.host);
            return Err(e);
        }
    };

    let result = add_result(conf, &plan, &bridge, &spec, addr, addr6);
    if let Err(e) = plan.daemon.sync() {
        // The pod is set up; tartand's directory check registers it within a second.
        log(&format!("ADD {}: nudging tartand failed: {e}", plan.cid));
    }
    tl.mark("nudge");
    tl.log("ADD", plan.cid);
    Ok(result.render(conf.cni_version).to_string())
}

/// ADD's checks, before anything is touched: the attachment and CNI_NETNS are given,
/// subnet.env is readable, tartand answers and the namespace opens; derives the gateway, the
/// MTU and the host end's name.
fn add_checks<'a>(env: &'a CniEnv, conf: &NetConf) -> Result<AddPlan<'a>, CniError> {
    let (cid, ifname) = attachment(env)?;
    let netns_path = env
        .netns
        .as_deref()
        .ok_or_else(|| CniError::env("CNI_NETNS is not set"))?;
    let senv = read_subnet_env(&conf.subnet_file)?;
    let daemon = DaemonLink::connect(&conf.daemon_socket)?;
    let netns = links::open_netns(netns_path)?;
    let subnet = senv.subnet;
    let gw = ipam::gateway(subnet);
    let gw_net = Ipv4Network::new(gw, subnet.prefix())
        .map_err(|e| CniError::kernel(format!("gateway of {subnet}: {e}")))?;
    let v6 = match senv.ipv6 {
        Some(e6) => {
            let gw = ipam::gateway6(e6.subnet);
            Some(Plan6 {
                subnet: e6.subnet,
                gw,
                gw_net: Ipv6Network::new(gw, e6.subnet.prefix())
                    .map_err(|e| CniError::kernel(format!("gateway of {}: {e}", e6.subnet)))?,
            })
        }
        None => None,
    };
    let mtu = conf.mtu.unwrap_or(senv.mtu);
    let host = links::host_veth_name(cid, ifname);
    let dns = senv
        .cluster_dns
        .as_ref()
        .map_or(Value::Object(Map::new()), |d| {
            result_dns(d, &env.pod_namespace())
        });
    Ok(AddPlan {
        cid,
        ifname,
        netns_path,
        netns,
        daemon,
        subnet,
        gw,
        gw_net,
        v6,
        mtu,
        host,
        dns,
    })
}

/// The CNI result's `dns` for a pod of `namespace`: the cluster DNS as nameserver, search
/// `<ns>.svc.<zone> svc.<zone> <zone>` and `ndots:5`, as the kubelet writes resolv.conf.
fn result_dns(d: &crate::model::subnet_env::ClusterDns, namespace: &str) -> Value {
    let zone = &d.domain;
    serde_json::json!({
        "nameservers": [d.ip.to_string()],
        "search": [format!("{namespace}.svc.{zone}"), format!("svc.{zone}"), zone.clone()],
        "options": ["ndots:5"],
    })
}

/// Allocates the pod's address in the network's IPAM store.
fn add_allocate(
    env: &CniEnv,
    conf: &NetConf,
    plan: &AddPlan<'_>,
    store: &IpamStore,
) -> Result<AllocationRecord, CniError> {
    store.allocate_dual(
        &AllocationRequest {
            container_id: plan.cid.to_string(),
            ifname: plan.ifname.to_string(),
            namespace: env.pod_namespace(),
            name: env.pod_name(),
            labels: conf.labels.clone(),
            netns: plan.netns_path.to_string_lossy().into_owned(),
        },
        plan.subnet,
        plan.v6.map(|p| p.subnet),
    )
}

/// The kernel part of ADD: the bridge (remembered or found/created), the veth pair on it,
/// then hairpin mode and the pod end's address and routes. Returns the bridge.
async fn add_links(
    k: &AddKernel<'_>,
    spec: &mut VethSpec,
    hint: Option<Bridge>,
    tl: &mut Timeline,
) -> Result<Bridge, CniError> {
    let (found, mut pod_index) = veth_on_hinted_bridge(k, spec, hint.as_ref()).await?;
    tl.mark("bridge");
    let br = match found {
        Some(br) => {
            links::ensure_gateway(k.nl, &br, k.plan.gw_net).await?;
            br
        }
        None => {
            let (br, index) = veth_on_new_bridge(k, spec).await?;
            pod_index = index;
            br
        }
    };
    tl.mark("veth");
    if let Some(p6) = k.plan.v6 {
        links::ensure_gateway6(k.nl, &br, p6.gw_net).await?;
    }
    let hairpin = async {
        if k.conf.hairpin_mode {
            links::set_hairpin(k.nl, &k.plan.host).await
        } else {
            Ok(())
        }
    };
    let v6 = k.addr6.zip(k.plan.v6.map(|p| p.gw));
    let pod = links::configure_pod_iface(k.pod_nl, k.plan.ifname, pod_index, k.addr, k.plan.gw, v6);
    let (h, p) = futures::join!(hairpin, pod);
    h.and(p).map(|()| br)
}

/// With a remembered bridge, the veth is created on it in the same pipeline as the check that
/// the index is still that bridge (queued first, so the new port cannot disturb it); a stale
/// hint costs the veth (deleted at once) and the look-up the hint saves. The creation's echo
/// gives the pod end's index (no look-up in the pod). Returns the bridge (none without a hint
/// or with a stale one) and the pod end's index.
async fn veth_on_hinted_bridge(
    k: &AddKernel<'_>,
    spec: &mut VethSpec,
    hint: Option<&Bridge>,
) -> Result<(Option<Bridge>, Option<u32>), CniError> {
    let Some(h) = hint else {
        return Ok((None, None));
    };
    spec.bridge = h.index;
    let (at, v) = futures::join!(
        links::bridge_at(k.nl, h.index, &k.conf.bridge),
        links::add_veth(k.nl, spec, &k.plan.netns)
    );
    match at? {
        Some((br, up)) => {
            let pod_index = v?;
            if !up {
                links::set_up(k.nl, br.index, &k.conf.bridge).await?;
            }
            Ok((Some(br), pod_index))
        }
        None => {
            if v.is_ok() {
                links::delete_host_veth(k.nl, &k.plan.host).await?;
            }
            Ok((None, None))
        }
    }
}

/// Without a usable hint: finds or creates the bridge, remembers it, then gives it the
/// gateway and creates the veth on it together. Returns the bridge and the pod end's index.
async fn veth_on_new_bridge(
    k: &AddKernel<'_>,
    spec: &mut VethSpec,
) -> Result<(Bridge, Option<u32>), CniError> {
    let br = links::ensure_bridge(k.nl, &k.conf.bridge, k.plan.gw_net, k.plan.mtu).await?;
    links::write_bridge_hint(k.store.dir(), &k.conf.bridge, &br);
    spec.bridge = br.index;
    let (g, v) = futures::join!(
        links::ensure_gateway(k.nl, &br, k.plan.gw_net),
        links::add_veth(k.nl, spec, &k.plan.netns)
    );
    g?;
    Ok((br, v?))
}

/// The CNI result of ADD: the bridge, the host end and the pod end, the pod's address and its
/// default route, appended to prevResult when there is one.
fn add_result(
    conf: &NetConf,
    plan: &AddPlan<'_>,
    bridge: &Bridge,
    spec: &VethSpec,
    addr: Ipv4Network,
    addr6: Option<Ipv6Network>,
) -> CniResult {
    let gw = plan.gw;
    let mut ours = CniResult {
        interfaces: vec![
            Interface {
                name: conf.bridge.clone(),
                mac: Some(bridge.mac.clone()),
                mtu: None,
                sandbox: None,
                extra: Map::new(),
            },
            Interface {
                name: plan.host.clone(),
                mac: Some(links::format_mac(&spec.host_mac)),
                mtu: Some(plan.mtu),
                sandbox: None,
                extra: Map::new(),
            },
            Interface {
                name: plan.ifname.to_string(),
                mac: Some(links::format_mac(&spec.pod_mac)),
                mtu: Some(plan.mtu),
                sandbox: Some(plan.netns_path.to_string_lossy().into_owned()),
                extra: Map::new(),
            },
        ],
        ips: vec![IpConfig {
            address: IpNetwork::V4(addr),
            gateway: Some(IpAddr::V4(gw)),
            interface: Some(2),
            extra: Map::new(),
        }],
        routes: vec![Route {
            dst: IpNetwork::V4(Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).unwrap_or(addr)),
            gw: Some(IpAddr::V4(gw)),
            extra: Map::new(),
        }],
        dns: plan.dns.clone(),
    };
    if let (Some(a6), Some(p6)) = (addr6, plan.v6) {
        ours.ips.push(IpConfig {
            address: IpNetwork::V6(a6),
            gateway: Some(IpAddr::V6(p6.gw)),
            interface: Some(2),
            extra: Map::new(),
        });
        ours.routes.push(Route {
            dst: IpNetwork::V6(Ipv6Network::new(Ipv6Addr::UNSPECIFIED, 0).unwrap_or(a6)),
            gw: Some(IpAddr::V6(p6.gw)),
            extra: Map::new(),
        });
    }
    match conf.prev_result.clone() {
        Some(mut prev) => {
            prev.append(ours);
            prev
        }
        None => ours,
    }
}

/// Undoes a failed ADD: the veth pair and the allocation (errors are secondary to the
/// failure being reported, and DEL or GC reclaim anything left).
fn rollback(
    rt: &tokio::runtime::Runtime,
    nl: &Netlink,
    store: &IpamStore,
    cid: &str,
    ifname: &str,
    host: &str,
) {
    let _ = rt.block_on(links::delete_host_veth(nl, host));
    let _ = store.release(cid, ifname);
}

fn del(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let mut tl = Timeline::new();
    let (cid, ifname) = attachment(env)?;
    let host = links::host_veth_name(cid, ifname);
    let rt = runtime()?;
    let nl = host_netlink(&rt)?;
    tl.mark("runtime");
    // Cut the pod off now (the host end goes down, so its port forwards nothing, wherever the
    // container end is, whether the pod namespace still exists or not); the kernel objects
    // are reaped in batches by tartand (see links::detach_host_veth).
    let detached = rt.block_on(links::detach_host_veth(&nl, &host))?;
    tl.mark("detach");
    let store = IpamStore::open(&conf.data_dir, &conf.name)?;
    let freed = store.release(cid, ifname)?;
    tl.mark("ipam");
    if (detached || freed.is_some())
        && let Err(e) = daemon_link::nudge(&conf.daemon_socket)
    {
        // No tartand to reap and deregister: reap here (slow, but rare).
        log(&format!(
            "DEL {cid}: nudging tartand failed ({e}); reaping here"
        ));
        rt.block_on(links::reap_detached(&nl))?;
    }
    tl.mark("nudge");
    tl.log("DEL", cid);
    Ok(())
}

fn check_failed(msg: impl Into<String>) -> CniError {
    CniError::new(code::CHECK_FAILED, msg)
}

/// What CHECK expects of the pod end, from prevResult: its MAC, its address and the routes
/// through it.
struct CheckWants {
    mac: Option<String>,
    addr: Ipv4Network,
    routes: Vec<(Ipv4Network, Option<Ipv4Addr>)>,
}

fn check(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    if conf.cni_version < CniVersion::V0_4_0 {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CHECK needs cniVersion 0.4.0 or later, the config has {}",
                conf.cni_version.as_str()
            ),
        ));
    }
    let (cid, ifname) = attachment(env)?;
    let netns_path = env
        .netns
        .as_deref()
        .ok_or_else(|| CniError::env("CNI_NETNS is not set"))?;
    // First, like ADD: the node's own namespace is refused before anything is looked at.
    let netns = links::open_netns(netns_path)?;
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::config("CHECK needs prevResult"))?;
    let store = IpamStore::open(&conf.data_dir, &conf.name)?;
    let rec = store
        .get(cid, ifname)?
        .ok_or_else(|| check_failed(format!("no address is allocated to {cid}/{ifname}")))?;
    let wants = check_wants(prev, rec.ip, ifname, netns_path)?;

    let host = links::host_veth_name(cid, ifname);
    let rt = runtime()?;
    let nl = host_netlink(&rt)?;
    rt.block_on(check_host_end(&nl, conf, &host))?;
    let iface = {
        let pod_nl = {
            let _g = rt.enter();
            links::netlink_in(&netns, false)?
        };
        rt.block_on(links::read_pod_iface(&pod_nl, ifname))?
    };
    let Some(iface) = iface else {
        return Err(check_failed(format!(
            "{ifname} is missing in {}",
            netns_path.display()
        )));
    };
    check_pod_iface(&iface, ifname, &rec, wants)
}

/// Reads CHECK's expectations from prevResult: the interface `ifname` in `netns_path`, the
/// address `ip` given to it, and the routes that go through it (via our gateway or our
/// subnet).
fn check_wants(
    prev: &CniResult,
    ip: Ipv4Addr,
    ifname: &str,
    netns_path: &Path,
) -> Result<CheckWants, CniError> {
    let idx = find_container_interface(prev, ifname, netns_path).ok_or_else(|| {
        check_failed(format!(
            "prevResult has no interface {ifname} in {}",
            netns_path.display()
        ))
    })?;
    let want_mac = prev.interfaces.get(idx).and_then(|i| i.mac.clone());
    let ipc = prev
        .ips
        .iter()
        .find(|ip_c| ip_c.interface == Some(idx) && ip_c.address.ip() == IpAddr::V4(ip))
        .ok_or_else(|| check_failed(format!("prevResult does not give {ip} to {ifname}")))?;
    let IpNetwork::V4(addr) = ipc.address else {
        return Err(check_failed("prevResult address is not IPv4"));
    };
    // Routes of prevResult that go through our interface: via our gateway or our subnet.
    let our_net = Ipv4Network::new(addr.network(), addr.prefix()).unwrap_or(addr);
    let want_routes: Vec<(Ipv4Network, Option<Ipv4Addr>)> = prev
        .routes
        .iter()
        .filter_map(|r| {
            let IpNetwork::V4(dst) = r.dst else {
                return None;
            };
            let gw = match r.gw {
                Some(IpAddr::V4(g)) => Some(g),
                Some(IpAddr::V6(_)) => return None,
                None => match ipc.gateway {
                    Some(IpAddr::V4(g)) => Some(g),
                    _ => None,
                },
            };
            gw.is_none_or(|g| our_net.contains(g)).then_some((dst, gw))
        })
        .collect();
    Ok(CheckWants {
        mac: want_mac,
        addr,
        routes: want_routes,
    })
}

/// CHECK in the node: the bridge exists and the host end is one of its ports.
async fn check_host_end(nl: &Netlink, conf: &NetConf, host: &str) -> Result<(), CniError> {
    let br = nl
        .link_by_name(&conf.bridge)
        .await
        .map_err(|e| CniError::kernel(format!("{e:#}")))?
        .ok_or_else(|| check_failed(format!("bridge {} is missing", conf.bridge)))?;
    match links::port_master(nl, host).await? {
        None => Err(check_failed(format!("host interface {host} is missing"))),
        Some(m) if m != Some(br.header.index) => Err(check_failed(format!(
            "host interface {host} is not on bridge {}",
            conf.bridge
        ))),
        Some(_) => Ok(()),
    }
}

/// CHECK in the pod: the interface is up, has the expected MAC, holds the allocated address
/// and has every expected route.
fn check_pod_iface(
    iface: &PodIface,
    ifname: &str,
    rec: &AllocationRecord,
    wants: CheckWants,
) -> Result<(), CniError> {
    if !iface.up {
        return Err(check_failed(format!("{ifname} is down")));
    }
    if let Some(m) = wants.mac
        && !m.eq_ignore_ascii_case(&iface.mac)
    {
        return Err(check_failed(format!(
            "{ifname} has MAC {}, prevResult says {m}",
            iface.mac
        )));
    }
    let want_addr = Ipv4Network::new(rec.ip, rec.prefix).unwrap_or(wants.addr);
    if !iface.addrs.contains(&want_addr) {
        return Err(check_failed(format!(
            "{ifname} does not hold {want_addr} (has {:?})",
            iface.addrs
        )));
    }
    // Dual-stack: the IPv6 address the allocation names too.
    if let (Some(ip6), Some(p6)) = (rec.ip6, rec.prefix6)
        && let Ok(want6) = Ipv6Network::new(ip6, p6)
        && !iface.addrs6.contains(&want6)
    {
        return Err(check_failed(format!(
            "{ifname} does not hold {want6} (has {:?})",
            iface.addrs6
        )));
    }
    for (dst, gw) in wants.routes {
        let found = iface
            .routes
            .iter()
            .any(|(d, g)| *d == dst && (gw.is_none() || *g == gw));
        if !found {
            return Err(check_failed(format!(
                "route to {dst}{} is missing in the container",
                gw.map(|g| format!(" via {g}")).unwrap_or_default()
            )));
        }
    }
    Ok(())
}

fn need_1_1(conf: &NetConf, verb: &str) -> Result<(), CniError> {
    if conf.cni_version < CniVersion::V1_1_0 {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "{verb} needs cniVersion 1.1.0, the config has {}",
                conf.cni_version.as_str()
            ),
        ));
    }
    Ok(())
}

fn status(conf: &NetConf) -> Result<(), CniError> {
    need_1_1(conf, "STATUS")?;
    read_subnet_env(&conf.subnet_file).map_err(|e| {
        if e.code == code::INVALID_CONFIG {
            // A wrong subnetFile will not become ready by waiting.
            return e;
        }
        CniError::new(
            code::NOT_AVAILABLE,
            "the node has no subnet lease yet".to_string(),
        )
        .details(e.msg)
    })?;
    DaemonLink::connect(&conf.daemon_socket)
        .map_err(|e| CniError::new(code::NOT_AVAILABLE, e.msg).details(e.details))?;
    Ok(())
}

fn gc(conf: &NetConf) -> Result<(), CniError> {
    need_1_1(conf, "GC")?;
    let valid: HashSet<(String, String)> = conf
        .valid_attachments
        .as_ref()
        .ok_or_else(|| CniError::config("GC needs cni.dev/valid-attachments"))?
        .iter()
        .map(|a| (a.container_id.clone(), a.ifname.clone()))
        .collect();
    let store = IpamStore::open(&conf.data_dir, &conf.name)?;
    let freed: Vec<AllocationRecord> = store.gc(&valid)?;
    // Host ends to keep: valid attachments and every allocation of any network.
    let mut keep: HashSet<String> = valid
        .iter()
        .map(|(c, i)| links::host_veth_name(c, i))
        .collect();
    for r in ipam::scan_all(&conf.data_dir)
        .map_err(|e| CniError::store(format!("{}: {e}", conf.data_dir.display())))?
    {
        keep.insert(links::host_veth_name(&r.container_id, &r.ifname));
    }
    let rt = runtime()?;
    let nl = host_netlink(&rt)?;
    rt.block_on(async {
        let mut errors = ErrorList::new();
        let mut doomed: Vec<String> = freed
            .iter()
            .map(|r| links::host_veth_name(&r.container_id, &r.ifname))
            .collect();
        // Host ends on the bridge with no allocation behind them (leaks of killed ADDs).
        doomed.extend(
            links::bridge_ports(&nl, &conf.bridge)
                .await?
                .into_iter()
                .filter(|p| !keep.contains(p)),
        );
        doomed.sort();
        doomed.dedup();
        for name in doomed {
            if let Err(e) = links::detach_host_veth(&nl, &name).await {
                errors.push(e.msg);
            }
        }
        // One batch for everything detached (also by earlier DELs).
        if let Err(e) = links::reap_detached(&nl).await {
            errors.push(e.msg);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(
                CniError::kernel(format!("GC could not remove {} interfaces", errors.len()))
                    .details(errors.to_string()),
            )
        }
    })?;
    if !freed.is_empty()
        && let Err(e) = daemon_link::nudge(&conf.daemon_socket)
    {
        log(&format!("GC: nudging tartand failed: {e}"));
    }
    Ok(())
}

/// Phase timings of one call, logged when `TARTAN_CNI_LOG` is set (free otherwise).
struct Timeline {
    start: Option<std::time::Instant>,
    marks: Vec<(&'static str, Duration)>,
}

impl Timeline {
    fn new() -> Timeline {
        Timeline {
            start: std::env::var_os("TARTAN_CNI_LOG").map(|_| std::time::Instant::now()),
            marks: Vec::new(),
        }
    }
    fn mark(&mut self, what: &'static str) {
        if let Some(s) = self.start {
            self.marks.push((what, s.elapsed()));
        }
    }
    fn log(&self, verb: &str, cid: &str) {
        if self.start.is_some() {
            let phases: Vec<String> = self
                .marks
                .iter()
                .map(|(w, d)| format!("{w}@{}us", d.as_micros()))
                .collect();
            log(&format!("{verb} {cid} phases: {}", phases.join(" ")));
        }
    }
}

/// Appends a line to the file named by `TARTAN_CNI_LOG` (`stderr` for standard error);
/// nothing when the variable is unset (the default: runtimes rarely keep plugin output).
pub fn log(line: &str) {
    let Ok(target) = std::env::var("TARTAN_CNI_LOG") else {
        return;
    };
    let line = format!("tartan-cni[{}]: {line}\n", std::process::id());
    use std::io::Write;
    if target == "stderr" || target.is_empty() {
        let _ = std::io::stderr().write_all(line.as_bytes());
        return;
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&target)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_result_dns_names_the_cluster_dns_and_the_namespace_search_list() {
        let d = crate::model::subnet_env::ClusterDns {
            ip: Ipv4Addr::new(10, 96, 0, 10),
            domain: "cluster.local".into(),
        };
        let v = result_dns(&d, "shop");
        assert_eq!(v["nameservers"], serde_json::json!(["10.96.0.10"]));
        assert_eq!(
            v["search"],
            serde_json::json!([
                "shop.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ])
        );
        assert_eq!(v["options"], serde_json::json!(["ndots:5"]));
    }
}
