//! The kernel side of the plugin: the node bridge, the veth pair (host end on the bridge,
//! container end created directly in the pod namespace), the container's address and default
//! route, and the read-backs CHECK and GC need. Host-side work uses a netlink socket of the
//! node namespace, pod-side work one opened inside the pod namespace (see [`netlink_in`]);
//! both are driven by the caller's single-threaded runtime, no thread changes namespace
//! for longer than opening a socket.
//!
//! Deleting a veth costs the kernel ~15-20 ms (RCU barriers while unregistering), so DEL only
//! *detaches* the host end (down, into [`DETACHED_GROUP`]): the pod is cut off
//! at once, and the kernel objects are reaped in one batched request later, by tartand, GC
//! or the next ADD that needs the name (see [`reap_detached`]). When the runtime deletes the
//! pod namespace, the pair goes with it anyway.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use futures::{StreamExt, TryStreamExt};
use ipnetwork::{Ipv4Network, Ipv6Network};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_ECHO, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
};
use nix::errno::Errno;
use nix::sched::{CloneFlags, setns};
use rtnetlink::{LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::bounded_read::read_regular_file;
use super::error::{CniError, code};
use crate::kernel::netlink::{Netlink, errno_of, link_kind};

/// Link group of detached host veth ends waiting to be reaped ("ttdd").
pub const DETACHED_GROUP: u32 = 0x7474_6464;

fn is_exists(e: &rtnetlink::Error) -> bool {
    errno_of(e) == Some(Errno::EEXIST)
}

fn kernel(what: impl std::fmt::Display, e: impl std::fmt::Display) -> CniError {
    CniError::kernel(format!("{what}: {e}"))
}

/// FNV-1a, 64 bits: a stable hash for names derived from IDs.
fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Host end of an attachment's veth pair: `tt` and 11 hex digits of a hash of the container
/// ID and interface name, so DEL and GC find it without the pod namespace.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let h = fnv1a64(&[container_id.as_bytes(), ifname.as_bytes()]);
    format!("tt{:011x}", h >> 20)
}

/// Whether `name` has the shape of a host veth name made by [`host_veth_name`].
pub fn is_host_veth_name(name: &str) -> bool {
    name.len() == 13
        && name.starts_with("tt")
        && name[2..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// A locally administered unicast MAC `0a:<kind>:<ip>`: stable per address, so a reused
/// address keeps its MAC and neighbours' ARP entries stay right.
pub fn mac_for(kind: u8, ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0a, kind, o[0], o[1], o[2], o[3]]
}

/// MAC kind byte of container interfaces and of the bridge (the gateway's "container" MAC).
pub const MAC_KIND_POD: u8 = 0x58;
/// MAC kind byte of host veth ends.
pub const MAC_KIND_HOST: u8 = 0x59;

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn link_mac(msg: &LinkMessage) -> Option<Vec<u8>> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) => Some(b.clone()),
        _ => None,
    })
}

fn link_master(msg: &LinkMessage) -> Option<u32> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(i) => Some(*i),
        _ => None,
    })
}

fn link_name(msg: &LinkMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// The node bridge as found or created.
#[derive(Debug, Clone)]
pub struct Bridge {
    /// Interface index.
    pub index: u32,
    /// MAC address.
    pub mac: String,
}

/// Finds the bridge `name` or creates it (up, `mtu`, MAC derived from the gateway). Races
/// with concurrent ADDs creating the same bridge are harmless. See [`ensure_gateway`] for its
/// address.
pub async fn ensure_bridge(
    nl: &Netlink,
    name: &str,
    gateway: Ipv4Network,
    mtu: u32,
) -> Result<Bridge, CniError> {
    let link = match nl
        .link_by_name(name)
        .await
        .map_err(|e| kernel("bridge", e))?
    {
        Some(l) => l,
        None => {
            let msg = LinkBridge::new(name)
                .mtu(mtu)
                .address(mac_for(MAC_KIND_POD, gateway.ip()).to_vec())
                .build();
            match nl.handle().link().add(msg).execute().await {
                Ok(()) => {}
                Err(e) if is_exists(&e) => {}
                Err(e) => return Err(kernel(format!("creating bridge {name}"), e)),
            }
            nl.link_by_name(name)
                .await
                .map_err(|e| kernel("bridge", e))?
                .ok_or_else(|| CniError::kernel(format!("bridge {name} vanished after creation")))?
        }
    };
    if link_kind(&link) != Some(InfoKind::Bridge) {
        return Err(CniError::config(format!(
            "{name} exists and is not a bridge; set \"bridge\" in the config to another name"
        )));
    }
    let index = link.header.index;
    if !link.header.flags.contains(LinkFlags::Up) {
        set_up(nl, index, name).await?;
    }
    Ok(Bridge {
        index,
        mac: link_mac(&link).map(|m| format_mac(&m)).unwrap_or_default(),
    })
}

/// File in the IPAM directory remembering the bridge between plugin processes.
pub const BRIDGE_HINT_FILE: &str = "bridge";

/// The bridge `name` as the last plugin process found it (`<ipam dir>/bridge`: name, index,
/// MAC). Only a hint: an ADD using it checks the index in the same pipeline as the veth
/// creation (see [`bridge_at`]) and falls back to [`ensure_bridge`] when it is stale.
pub fn read_bridge_hint(ipam_dir: &Path, name: &str) -> Option<Bridge> {
    let bytes = read_regular_file(&ipam_dir.join(BRIDGE_HINT_FILE), 4096).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let mut w = text.split_whitespace();
    (w.next()? == name).then_some(())?;
    let index = w.next()?.parse().ok()?;
    let mac = w.next()?.to_string();
    Some(Bridge { index, mac })
}

/// Records the bridge for the next processes (temporary file and rename; failures only cost
/// the next ADD a look-up).
pub fn write_bridge_hint(ipam_dir: &Path, name: &str, b: &Bridge) {
    let tmp = ipam_dir.join(format!(".{BRIDGE_HINT_FILE}.{}", std::process::id()));
    if std::fs::write(&tmp, format!("{name} {} {}\n", b.index, b.mac)).is_ok()
        && std::fs::rename(&tmp, ipam_dir.join(BRIDGE_HINT_FILE)).is_err()
    {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Whether interface `index` is (still) the bridge `name`: the bridge and whether it is up.
pub async fn bridge_at(
    nl: &Netlink,
    index: u32,
    name: &str,
) -> Result<Option<(Bridge, bool)>, CniError> {
    let Some(link) = nl
        .link_by_index(index)
        .await
        .map_err(|e| kernel("bridge", e))?
    else {
        return Ok(None);
    };
    let named = link
        .attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::IfName(n) if n == name));
    if !named || link_kind(&link) != Some(InfoKind::Bridge) {
        return Ok(None);
    }
    let up = link.header.flags.contains(LinkFlags::Up);
    Ok(Some((
        Bridge {
            index,
            mac: link_mac(&link).map(|m| format_mac(&m)).unwrap_or_default(),
        },
        up,
    )))
}

/// Sets interface `index` (`name` in errors) up.
pub async fn set_up(nl: &Netlink, index: u32, name: &str) -> Result<(), CniError> {
    nl.handle()
        .link()
        .change(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| kernel(format!("setting {name} up"), e))
}

/// Makes sure the bridge holds `gateway` (the subnet's first address with the subnet prefix):
/// one exclusive add instead of a dump, EEXIST meaning it is there already.
pub async fn ensure_gateway(
    nl: &Netlink,
    bridge: &Bridge,
    gateway: Ipv4Network,
) -> Result<(), CniError> {
    match nl
        .handle()
        .address()
        .add(bridge.index, IpAddr::V4(gateway.ip()), gateway.prefix())
        .execute()
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if is_exists(&e) => Ok(()),
        Err(e) => Err(kernel(format!("adding gateway {gateway}"), e)),
    }
}

/// [`ensure_gateway`] for the IPv6 gateway of a dual-stack node, added without duplicate
/// address detection.
pub async fn ensure_gateway6(
    nl: &Netlink,
    bridge: &Bridge,
    gateway: Ipv6Network,
) -> Result<(), CniError> {
    match nl.add_addr6_nodad(bridge.index, gateway, false).await {
        Ok(()) => Ok(()),
        Err(e) if is_exists(&e) => Ok(()),
        Err(e) => Err(kernel(format!("adding gateway {gateway}"), e)),
    }
}

/// What the veth pair of one attachment looks like.
#[derive(Debug, Clone)]
pub struct VethSpec {
    /// Host end name.
    pub host: String,
    /// Host end MAC.
    pub host_mac: [u8; 6],
    /// Container end name (`CNI_IFNAME`).
    pub pod: String,
    /// Container end MAC.
    pub pod_mac: [u8; 6],
    /// MTU of both ends.
    pub mtu: u32,
    /// Bridge index (the host end's master).
    pub bridge: u32,
}

/// Sends the creation with `NLM_F_ECHO`: recent kernels (6.x; 6.18 here) answer with the host
/// end as created, whose `IFLA_LINK` is the container end's index; returned when present.
/// (Looking the new link up instead would make the kernel process its pending carrier event
/// inside the request: `rtnl_getlink` syncs link-watch state, an IPv6 FIB walk and an RCU
/// grace period on the runtime's clock. Left alone, the kernel does that in the background.)
async fn try_add_veth(
    nl: &Netlink,
    spec: &VethSpec,
    netns: &File,
) -> Result<Option<u32>, rtnetlink::Error> {
    let peer = rtnetlink::LinkMessageBuilder::<LinkUnspec>::new()
        .name(spec.pod.clone())
        .mtu(spec.mtu)
        .address(spec.pod_mac.to_vec())
        .setns_by_fd(netns.as_raw_fd())
        .append_extra_attribute(LinkAttribute::NumTxQueues(1))
        .append_extra_attribute(LinkAttribute::NumRxQueues(1))
        .build();
    // One queue per end from the start: veth otherwise allocates one per CPU and trims them
    // after registration, which waits for an RCU grace period per end (IPIs; slow in VMs).
    let mut msg = LinkVeth::new(&spec.host, &spec.pod)
        .mtu(spec.mtu)
        .address(spec.host_mac.to_vec())
        .controller(spec.bridge)
        .append_extra_attribute(LinkAttribute::NumTxQueues(1))
        .append_extra_attribute(LinkAttribute::NumRxQueues(1))
        .up()
        .build();
    for a in &mut msg.attributes {
        if let LinkAttribute::LinkInfo(infos) = a {
            for i in infos.iter_mut() {
                if let LinkInfo::Data(netlink_packet_route::link::InfoData::Veth(v)) = i {
                    *v = netlink_packet_route::link::InfoVeth::Peer(peer.clone());
                }
            }
        }
    }
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewLink(msg));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL | NLM_F_ECHO;
    let mut responses = nl.handle().clone().request(req)?;
    let mut peer_index = None;
    while let Some(m) = responses.next().await {
        match m.payload {
            NetlinkPayload::Error(e) if e.code.is_some() => {
                return Err(rtnetlink::Error::NetlinkError(e));
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l))
                if link_name(&l) == Some(spec.host.as_str()) =>
            {
                peer_index = l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Link(i) => Some(*i),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    Ok(peer_index)
}

/// Creates the veth pair in one request: the host end up on the bridge, the container end
/// named `spec.pod` directly inside `netns` (down: this kernel refuses to bring a peer up in
/// another namespace at creation, ENOTCONN), both with their MTU and MAC. A name already
/// taken by a detached pair waiting to be reaped, or by a stale host end of the same
/// attachment, is freed and the creation retried once. Returns the container end's index
/// when the kernel reported it (see [`try_add_veth`]).
pub async fn add_veth(
    nl: &Netlink,
    spec: &VethSpec,
    netns: &File,
) -> Result<Option<u32>, CniError> {
    let taken = || {
        CniError::new(
            code::INTERFACE_EXISTS,
            format!(
                "an interface named {} already exists in the container",
                spec.pod
            ),
        )
    };
    match try_add_veth(nl, spec, netns).await {
        Ok(index) => Ok(index),
        Err(e) if is_exists(&e) => {
            let reaped = reap_detached(nl).await?;
            let stale = nl
                .delete_link(&spec.host)
                .await
                .map_err(|e| kernel(format!("removing stale {}", spec.host), e))?;
            if !stale && reaped == 0 {
                return Err(taken());
            }
            try_add_veth(nl, spec, netns).await.map_err(|e| {
                if is_exists(&e) {
                    taken()
                } else {
                    kernel(format!("creating veth {}", spec.host), e)
                }
            })
        }
        Err(e) => Err(kernel(format!("creating veth {}", spec.host), e)),
    }
}

/// Turns hairpin mode on for a bridge port (a pod reaching itself through a service).
pub async fn set_hairpin(nl: &Netlink, port: &str) -> Result<(), CniError> {
    let mut msg = LinkBridgePort::new(0).hairpin(true).build();
    msg.attributes.push(LinkAttribute::IfName(port.to_string()));
    nl.handle()
        .link()
        .set_port(msg)
        .execute()
        .await
        .map_err(|e| kernel(format!("hairpin on {port}"), e))
}

/// Deletes a host veth end (and with it the container end) now; `false` when already gone.
/// Costs the kernel ~15-20 ms: prefer [`detach_host_veth`] on latency-sensitive paths.
pub async fn delete_host_veth(nl: &Netlink, name: &str) -> Result<bool, CniError> {
    nl.delete_link(name)
        .await
        .map_err(|e| kernel(format!("deleting {name}"), e))
}

/// Cuts a host veth end off (down: its bridge port stops forwarding, the container end loses
/// its carrier, and nothing in the pod can bring it back up) and marks it for reaping
/// ([`DETACHED_GROUP`]) in one cheap request; `false` when it does not exist. It stays
/// enslaved until reaped: leaving the bridge would cost another RCU grace period.
pub async fn detach_host_veth(nl: &Netlink, name: &str) -> Result<bool, CniError> {
    let msg = LinkUnspec::new_with_name(name)
        .down()
        .link_group(DETACHED_GROUP)
        .build();
    match nl.handle().link().change(msg).execute().await {
        Ok(()) => Ok(true),
        Err(e) if matches!(errno_of(&e), Some(Errno::ENODEV | Errno::ENOENT)) => Ok(false),
        Err(e) => Err(kernel(format!("detaching {name}"), e)),
    }
}

/// Deletes every detached host veth end (with its container end) in one request, so the
/// kernel's RCU waits are paid once per batch; returns 1 when something was deleted, 0 when
/// there was nothing to reap.
pub async fn reap_detached(nl: &Netlink) -> Result<usize, CniError> {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::Group(DETACHED_GROUP));
    match nl.handle().link().del_with_message(msg).execute().await {
        Ok(()) => Ok(1),
        Err(e) if matches!(errno_of(&e), Some(Errno::ENODEV | Errno::ENOENT)) => Ok(0),
        Err(e) => Err(kernel("reaping detached veths", e)),
    }
}

/// Names of the host veth ends attached to bridge `bridge`.
pub async fn bridge_ports(nl: &Netlink, bridge: &str) -> Result<Vec<String>, CniError> {
    let Some(br) = nl
        .link_by_name(bridge)
        .await
        .map_err(|e| kernel("bridge", e))?
    else {
        return Ok(Vec::new());
    };
    let links: Vec<LinkMessage> = nl
        .handle()
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| kernel("listing links", e))?;
    Ok(links
        .iter()
        .filter(|l| link_master(l) == Some(br.header.index))
        .filter_map(|l| link_name(l).map(str::to_string))
        .filter(|n| is_host_veth_name(n))
        .collect())
}

/// The bridge a host port is attached to: `None` when the port does not exist.
pub async fn port_master(nl: &Netlink, port: &str) -> Result<Option<Option<u32>>, CniError> {
    Ok(nl
        .link_by_name(port)
        .await
        .map_err(|e| kernel(format!("looking up {port}"), e))?
        .map(|l| link_master(&l)))
}

/// Gives the container interface its address and default route via the gateway
/// (in the pod namespace).
pub async fn configure_pod_iface(
    nl: &Netlink,
    ifname: &str,
    known_index: Option<u32>,
    addr: Ipv4Network,
    gateway: Ipv4Addr,
    v6: Option<(Ipv6Network, Ipv6Addr)>,
) -> Result<(), CniError> {
    // The index the host end reported for its peer saves a look-up; a new interface is down.
    let (index, is_up) = match known_index {
        Some(i) => (i, false),
        None => {
            let link = nl
                .link_by_name(ifname)
                .await
                .map_err(|e| kernel(format!("looking up {ifname} in the container"), e))?
                .ok_or_else(|| CniError::kernel(format!("{ifname} is missing in the container")))?;
            (link.header.index, link.header.flags.contains(LinkFlags::Up))
        }
    };
    // Up, address, route: queued back to back (the kernel handles each request completely,
    // in order, before the next), acknowledged together.
    let up = async {
        if is_up {
            return Ok(());
        }
        set_up(nl, index, ifname).await
    };
    let address = async {
        match nl
            .handle()
            .address()
            .add(index, IpAddr::V4(addr.ip()), addr.prefix())
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_exists(&e) => Ok(()),
            Err(e) => Err(kernel(format!("adding {addr} to {ifname}"), e)),
        }
    };
    let route = async {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .gateway(gateway)
            .output_interface(index)
            .protocol(RouteProtocol::Boot)
            .scope(RouteScope::Universe)
            .table_id(u32::from(RouteHeader::RT_TABLE_MAIN))
            .build();
        nl.handle()
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| kernel(format!("default route via {gateway}"), e))
    };
    let ipv6 = async {
        let Some((addr6, gw6)) = v6 else {
            return Ok(());
        };
        match nl.add_addr6_nodad(index, addr6, false).await {
            Ok(()) => {}
            Err(e) if is_exists(&e) => {}
            Err(e) => return Err(kernel(format!("adding {addr6} to {ifname}"), e)),
        }
        let msg = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .gateway(gw6)
            .output_interface(index)
            .protocol(RouteProtocol::Boot)
            .table_id(u32::from(RouteHeader::RT_TABLE_MAIN))
            .build();
        nl.handle()
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| kernel(format!("default route via {gw6}"), e))
    };
    let (u, a, r, six) = futures::join!(up, address, route, ipv6);
    u.and(a).and(r).and(six)
}

/// What CHECK reads back about the container interface.
#[derive(Debug, Clone, Default)]
pub struct PodIface {
    /// MAC address.
    pub mac: String,
    /// Whether it is up.
    pub up: bool,
    /// IPv4 addresses.
    pub addrs: Vec<Ipv4Network>,
    /// Global IPv6 addresses.
    pub addrs6: Vec<Ipv6Network>,
    /// IPv4 routes of the main table through it: destination and gateway.
    pub routes: Vec<(Ipv4Network, Option<Ipv4Addr>)>,
}

/// Reads the container interface `ifname` (in the pod namespace); `None` when missing.
pub async fn read_pod_iface(nl: &Netlink, ifname: &str) -> Result<Option<PodIface>, CniError> {
    let Some(link) = nl
        .link_by_name(ifname)
        .await
        .map_err(|e| kernel(format!("looking up {ifname}"), e))?
    else {
        return Ok(None);
    };
    let index = link.header.index;
    let addrs = nl
        .ipv4_addrs(index)
        .await
        .map_err(|e| kernel("reading addresses", e))?;
    let addrs6 = nl
        .ipv6_addrs(index)
        .await
        .map_err(|e| kernel("reading IPv6 addresses", e))?;
    let msgs: Vec<RouteMessage> = nl
        .handle()
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(|e| kernel("reading routes", e))?;
    let mut routes = Vec::new();
    for r in msgs {
        if r.header.table != RouteHeader::RT_TABLE_MAIN {
            continue;
        }
        let mut dst = Ipv4Addr::UNSPECIFIED;
        let mut gw = None;
        let mut oif = None;
        for a in &r.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(v)) => dst = *v,
                RouteAttribute::Gateway(RouteAddress::Inet(v)) => gw = Some(*v),
                RouteAttribute::Oif(i) => oif = Some(*i),
                _ => {}
            }
        }
        if oif == Some(index)
            && let Ok(n) = Ipv4Network::new(dst, r.header.destination_prefix_length)
        {
            routes.push((n, gw));
        }
    }
    Ok(Some(PodIface {
        mac: link_mac(&link).map(|m| format_mac(&m)).unwrap_or_default(),
        up: link.header.flags.contains(LinkFlags::Up),
        addrs,
        addrs6,
        routes,
    }))
}

/// Opens a network namespace handle, refusing anything that is not on nsfs and the node's
/// own namespace (error code 4; [`netlink_in`] refuses namespaces of another type).
pub fn open_netns(path: &std::path::Path) -> Result<File, CniError> {
    let f = File::open(path)
        .map_err(|e| CniError::env(format!("CNI_NETNS={}: {e}", path.display())))?;
    let fs = nix::sys::statfs::fstatfs(&f)
        .map_err(|e| CniError::env(format!("CNI_NETNS={}: {e}", path.display())))?;
    if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        return Err(CniError::env(format!(
            "CNI_NETNS={} is not a network namespace",
            path.display()
        )));
    }
    refuse_node_namespace(path, &f)?;
    Ok(f)
}

/// Namespaces that are never a pod's: the plugin's own (the node's: configuring it as a
/// pod would replace the node's default route) and, when it can be read, PID 1's (the
/// host's, when the plugin runs in a namespace of its own). Compared by namespace inode, so
/// every name of the same namespace (`/proc/self/ns/net`, a bind mount) is caught.
fn refuse_node_namespace(path: &Path, netns: &File) -> Result<(), CniError> {
    use std::os::unix::fs::MetadataExt;
    let id = |m: &std::fs::Metadata| (m.dev(), m.ino());
    let target = netns
        .metadata()
        .map_err(|e| CniError::env(format!("CNI_NETNS={}: {e}", path.display())))?;
    let own = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(|e| CniError::kernel(format!("reading the plugin's own namespace: {e}")))?;
    let host = std::fs::metadata("/proc/1/ns/net").ok();
    let whose = if id(&own) == id(&target) {
        "the plugin's own network namespace (the node's)"
    } else if host.is_some_and(|h| id(&h) == id(&target)) {
        "the host's network namespace (PID 1's)"
    } else {
        return Ok(());
    };
    Err(CniError::env(format!(
        "CNI_NETNS={} is {whose}, not a pod's",
        path.display()
    ))
    .details("tartan-cni sets the address and default route of the namespace it is given"))
}

/// Opens a netlink connection inside the namespace `netns` (needs a runtime context): the
/// calling thread enters the namespace, opens the socket (a socket stays in the namespace it
/// was created in) and returns to its own namespace at once. A handle that is not a network
/// namespace is error code 4.
///
/// With `no_dad`, interfaces created in the namespace from then on skip IPv6 duplicate
/// address detection (`net.ipv6.conf.default.accept_dad = 0` there), so a dual-stack pod's
/// addresses are usable at once.
pub fn netlink_in(netns: &File, no_dad: bool) -> Result<Netlink, CniError> {
    let own = File::open("/proc/thread-self/ns/net")
        .map_err(|e| CniError::kernel(format!("opening this thread's namespace: {e}")))?;
    setns(netns, CloneFlags::CLONE_NEWNET)
        .map_err(|e| CniError::env(format!("CNI_NETNS is not a network namespace: {e}")))?;
    let dad = if no_dad {
        // /proc/sys/net is the namespace of the thread that opens the file.
        std::fs::write("/proc/sys/net/ipv6/conf/default/accept_dad", b"0")
            .map_err(|e| CniError::kernel(format!("turning off IPv6 DAD in the container: {e}")))
    } else {
        Ok(())
    };
    let nl = Netlink::connect();
    setns(&own, CloneFlags::CLONE_NEWNET)
        .map_err(|e| CniError::kernel(format!("returning to the node's network namespace: {e}")))?;
    dad?;
    nl.map_err(|e| kernel("netlink in the container", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugins_own_namespace_is_never_a_pods() {
        // Read-only: opening a namespace handle changes nothing.
        for p in ["/proc/self/ns/net", "/proc/thread-self/ns/net"] {
            let e = open_netns(Path::new(p)).expect_err(p);
            assert_eq!(e.code, code::INVALID_ENV, "{p}: {e}");
            assert!(e.msg.contains("own network namespace"), "{p}: {e}");
            assert!(e.msg.contains(p), "{p}: {e}");
        }
    }

    #[test]
    fn host_veth_names_are_stable_short_and_distinct() {
        let a = host_veth_name("abc", "eth0");
        assert_eq!(a, host_veth_name("abc", "eth0"));
        assert_eq!(a.len(), 13);
        assert!(is_host_veth_name(&a), "{a}");
        assert_ne!(a, host_veth_name("abc", "eth1"));
        assert_ne!(a, host_veth_name("abce", "th0"));
        assert!(!is_host_veth_name("tt123"));
        assert!(!is_host_veth_name("eth0"));
        let many: std::collections::HashSet<String> = (0..10_000)
            .map(|i| host_veth_name(&format!("c{i}"), "eth0"))
            .collect();
        assert_eq!(many.len(), 10_000);
    }

    #[test]
    fn macs() {
        let m = mac_for(MAC_KIND_POD, Ipv4Addr::new(10, 244, 3, 5));
        assert_eq!(format_mac(&m), "0a:58:0a:f4:03:05");
        // Locally administered, unicast.
        assert_eq!(m[0] & 0b11, 0b10);
    }
}
