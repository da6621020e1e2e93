//! A small wrapper around rtnetlink: links, addresses, routes, neighbours and FDB entries in
//! the current network namespace. Everything kernel-facing for the overlay goes through here.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result, anyhow, bail};
use futures::{StreamExt, TryStreamExt};
use ipnetwork::Ipv4Network;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::AsyncSocket;
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};

use crate::overlay_plan::{OverlayDiff, OverlayState, RouteVia};
use crate::subnet_lease::MacAddr;

/// Routing protocol number tartan stamps on the routes it owns (`ip route ... proto 157`).
pub const ROUTE_PROTO: u8 = 157;

/// Multicast groups for link, neighbour, IPv4 address and IPv4 route notifications.
pub const RTMGRP_OVERLAY: u32 = 1 | 4 | 0x10 | 0x40;

/// A connection to the kernel's routing netlink in the current network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

/// Facts about a network interface.
#[derive(Debug, Clone)]
pub struct Iface {
    /// Interface index.
    pub index: u32,
    /// MTU.
    pub mtu: u32,
    /// Hardware address, when the link has one.
    pub mac: Option<MacAddr>,
    /// IPv4 addresses with prefix length.
    pub addrs: Vec<Ipv4Network>,
}

/// The VXLAN device as tartan wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    /// Device name, e.g. `tartan.1`.
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// UDP destination port.
    pub port: u16,
    /// Local tunnel endpoint address.
    pub local: Ipv4Addr,
    /// Index of the underlay interface.
    pub underlay_index: u32,
    /// Device MTU.
    pub mtu: u32,
    /// Device MAC (the VTEP MAC).
    pub mac: MacAddr,
}

/// What [`Netlink::ensure_vxlan`] had to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChange {
    /// The device was already right.
    Unchanged,
    /// MTU, MAC or state were corrected in place.
    Adjusted,
    /// The device was (re)created.
    Created,
}

fn is_not_found(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc_enodev() || m.raw_code() == -2 || m.raw_code() == -3)
}

const fn libc_enodev() -> i32 {
    19
}

fn mac_of(bytes: &[u8]) -> Option<MacAddr> {
    <[u8; 6]>::try_from(bytes).ok().map(MacAddr)
}

fn link_mtu(msg: &LinkMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(0)
}

fn link_mac(msg: &LinkMessage) -> Option<MacAddr> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) => mac_of(b),
        _ => None,
    })
}

fn vxlan_info(msg: &LinkMessage) -> Option<Vec<InfoVxlan>> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(v)) => Some(v.clone()),
            _ => None,
        }),
        _ => None,
    })
}

/// The kind of a link (`bridge`, `veth`, `vxlan`, ...) from its `IFLA_LINKINFO`.
pub fn link_kind(msg: &LinkMessage) -> Option<InfoKind> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k.clone()),
            _ => None,
        }),
        _ => None,
    })
}

impl Netlink {
    /// Opens a netlink connection in the current network namespace (needs a tokio runtime).
    pub fn connect() -> Result<Netlink> {
        let (conn, handle, _) =
            rtnetlink::new_connection().context("opening a routing netlink socket")?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// The raw rtnetlink handle.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Looks up a link by name.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match s.try_next().await {
            Ok(m) => Ok(m),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(anyhow!(e).context(format!("looking up link {name}"))),
        }
    }

    /// Looks up a link by index.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<LinkMessage>> {
        let mut s = self.handle.link().get().match_index(index).execute();
        match s.try_next().await {
            Ok(m) => Ok(m),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(anyhow!(e).context(format!("looking up link #{index}"))),
        }
    }

    /// IPv4 addresses on interface `index`.
    pub async fn ipv4_addrs(&self, index: u32) -> Result<Vec<Ipv4Network>> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .context("listing addresses")?;
        let mut out = Vec::new();
        for m in msgs {
            if m.header.index != index || m.header.family != AddressFamily::Inet {
                continue;
            }
            let addr = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(v)) => Some(*v),
                _ => None,
            });
            let addr = addr.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(IpAddr::V4(v)) => Some(*v),
                    _ => None,
                })
            });
            if let Some(a) = addr
                && let Ok(n) = Ipv4Network::new(a, m.header.prefix_len)
            {
                out.push(n);
            }
        }
        Ok(out)
    }

    /// Index, MTU, MAC and IPv4 addresses of the interface `name`.
    pub async fn iface(&self, name: &str) -> Result<Iface> {
        let link = self
            .link_by_name(name)
            .await?
            .ok_or_else(|| anyhow!("interface {name} does not exist"))?;
        let index = link.header.index;
        Ok(Iface {
            index,
            mtu: link_mtu(&link),
            mac: link_mac(&link),
            addrs: self.ipv4_addrs(index).await?,
        })
    }

    /// Deletes a link by name; succeeds when it is already gone.
    pub async fn delete_link(&self, name: &str) -> Result<bool> {
        match self.link_by_name(name).await? {
            None => Ok(false),
            Some(l) => match self.handle.link().del(l.header.index).execute().await {
                Ok(()) => Ok(true),
                Err(e) if is_not_found(&e) => Ok(false),
                Err(e) => Err(anyhow!(e).context(format!("deleting link {name}"))),
            },
        }
    }

    /// Makes the VXLAN device match `spec`: recreated when VNI, port, local address or
    /// underlay differ (or it is not a VXLAN device), adjusted in place for MTU/MAC/up.
    /// Returns the device index and what changed.
    pub async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<(u32, DeviceChange)> {
        if let Some(link) = self.link_by_name(&spec.name).await? {
            let ok = link_kind(&link) == Some(InfoKind::Vxlan)
                && vxlan_info(&link).is_some_and(|info| {
                    let mut id = None;
                    let mut port = None;
                    let mut local = None;
                    let mut dev = None;
                    let mut learning = None;
                    for i in info {
                        match i {
                            InfoVxlan::Id(v) => id = Some(v),
                            InfoVxlan::Port(v) => port = Some(v),
                            InfoVxlan::Local(v) => local = Some(v),
                            InfoVxlan::Link(v) => dev = Some(v),
                            InfoVxlan::Learning(v) => learning = Some(v),
                            _ => {}
                        }
                    }
                    id == Some(spec.vni)
                        && port == Some(spec.port)
                        && local == Some(spec.local)
                        && dev == Some(spec.underlay_index)
                        && learning == Some(false)
                });
            if ok {
                let index = link.header.index;
                let up = link.header.flags.contains(LinkFlags::Up);
                let mac_ok = link_mac(&link) == Some(spec.mac);
                let mtu_ok = link_mtu(&link) == spec.mtu;
                if up && mac_ok && mtu_ok {
                    return Ok((index, DeviceChange::Unchanged));
                }
                let mut b = LinkUnspec::new_with_index(index).up();
                if !mtu_ok {
                    b = b.mtu(spec.mtu);
                }
                if !mac_ok {
                    b = b.address(spec.mac.0.to_vec());
                }
                self.handle
                    .link()
                    .set(b.build())
                    .execute()
                    .await
                    .with_context(|| format!("adjusting {}", spec.name))?;
                return Ok((index, DeviceChange::Adjusted));
            }
            tracing::warn!(device = %spec.name, "device differs from the config, recreating it");
            self.handle
                .link()
                .del(link.header.index)
                .execute()
                .await
                .with_context(|| format!("deleting stale {}", spec.name))?;
        }
        let msg = LinkVxlan::new(&spec.name, spec.vni)
            .dev(spec.underlay_index)
            .port(spec.port)
            .local(spec.local)
            .learning(false)
            .mtu(spec.mtu)
            .address(spec.mac.0.to_vec())
            .up()
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .with_context(|| format!("creating VXLAN device {}", spec.name))?;
        let link = self
            .link_by_name(&spec.name)
            .await?
            .ok_or_else(|| anyhow!("{} vanished right after creation", spec.name))?;
        Ok((link.header.index, DeviceChange::Created))
    }

    /// Makes `addr` the only IPv4 address on interface `index`; returns whether it changed.
    pub async fn ensure_only_addr(&self, index: u32, addr: Ipv4Network) -> Result<bool> {
        let have = self.ipv4_addrs(index).await?;
        let mut changed = false;
        if !have.contains(&addr) {
            self.handle
                .address()
                .add(index, IpAddr::V4(addr.ip()), addr.prefix())
                .replace()
                .execute()
                .await
                .with_context(|| format!("adding address {addr}"))?;
            changed = true;
        }
        for other in have.into_iter().filter(|a| *a != addr) {
            let msgs: Vec<AddressMessage> = self
                .handle
                .address()
                .get()
                .set_link_index_filter(index)
                .set_address_filter(IpAddr::V4(other.ip()))
                .execute()
                .try_collect()
                .await
                .unwrap_or_default();
            for m in msgs {
                self.handle
                    .address()
                    .del(m)
                    .execute()
                    .await
                    .with_context(|| format!("removing stray address {other}"))?;
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Adds an address (replacing an identical one).
    pub async fn add_addr(&self, index: u32, addr: Ipv4Network) -> Result<()> {
        self.handle
            .address()
            .add(index, IpAddr::V4(addr.ip()), addr.prefix())
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding address {addr}"))
    }

    /// Reads the overlay state tartan owns: routes with [`ROUTE_PROTO`] in the main table
    /// through `vx_index` or `underlay_index`, permanent neighbours and FDB entries on `vx_index`.
    pub async fn read_overlay(&self, vx_index: u32, underlay_index: u32) -> Result<OverlayState> {
        let mut st = OverlayState::default();
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .context("listing routes")?;
        for r in routes {
            if r.header.table != RouteHeader::RT_TABLE_MAIN
                || r.header.protocol != RouteProtocol::Other(ROUTE_PROTO)
            {
                continue;
            }
            let mut dst = None;
            let mut gw = None;
            let mut oif = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(v)) => dst = Some(*v),
                    RouteAttribute::Gateway(RouteAddress::Inet(v)) => gw = Some(*v),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let (Some(dst), Some(gw), Some(oif)) = (dst, gw, oif) else {
                continue;
            };
            let Ok(net) = Ipv4Network::new(dst, r.header.destination_prefix_length) else {
                continue;
            };
            if oif == vx_index {
                st.routes.insert(net, RouteVia::Vxlan(gw));
            } else if oif == underlay_index {
                st.routes.insert(net, RouteVia::Underlay(gw));
            }
        }
        let neigh: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .context("listing neighbours")?;
        for n in neigh {
            if n.header.ifindex != vx_index || n.header.state != NeighbourState::Permanent {
                continue;
            }
            let mut ip = None;
            let mut mac = None;
            for a in &n.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => ip = Some(*v),
                    NeighbourAttribute::LinkLayerAddress(b) => mac = mac_of(b),
                    _ => {}
                }
            }
            if let (Some(ip), Some(mac)) = (ip, mac) {
                st.neighbours.insert(ip, mac);
            }
        }
        let fdb: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .context("listing FDB")?;
        for n in fdb {
            if n.header.ifindex != vx_index {
                continue;
            }
            let mut ip = None;
            let mut mac = None;
            for a in &n.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => ip = Some(*v),
                    // AF_BRIDGE messages carry the VXLAN destination as raw bytes.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                        ip = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
                    }
                    NeighbourAttribute::LinkLayerAddress(b) => mac = mac_of(b),
                    _ => {}
                }
            }
            if let (Some(ip), Some(mac)) = (ip, mac)
                && mac.0 != [0; 6]
            {
                st.fdb.insert(mac, ip);
            }
        }
        Ok(st)
    }

    fn route_msg(&self, net: Ipv4Network, via: RouteVia, vx: u32, underlay: u32) -> RouteMessage {
        let b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net.network(), net.prefix())
            .protocol(RouteProtocol::Other(ROUTE_PROTO))
            .scope(RouteScope::Universe)
            .kind(RouteType::Unicast)
            .table_id(u32::from(RouteHeader::RT_TABLE_MAIN));
        match via {
            RouteVia::Vxlan(gw) => b.gateway(gw).output_interface(vx).onlink().build(),
            RouteVia::Underlay(gw) => b.gateway(gw).output_interface(underlay).build(),
        }
    }

    /// Applies an overlay diff. Adds go FDB → neighbour → route, deletes route → neighbour →
    /// FDB; requests within a stage run concurrently. Every failure is collected; the call
    /// fails only after trying everything.
    pub async fn apply_overlay(&self, vx: u32, underlay: u32, d: &OverlayDiff) -> Result<()> {
        let mut errors: Vec<String> = Vec::new();
        // Deletes first, so a route moving between devices never has two entries.
        run_stage(
            &mut errors,
            d.del_routes.iter().map(|(n, v)| {
                let req = self
                    .handle
                    .route()
                    .del(self.route_msg(*n, *v, vx, underlay));
                async move { gone_is_fine(req.execute().await, || format!("delete route {n}")) }
            }),
        )
        .await;
        run_stage(
            &mut errors,
            d.del_neighbours.iter().map(|(ip, _)| {
                let mut msg = NeighbourMessage::default();
                msg.header.family = AddressFamily::Inet;
                msg.header.ifindex = vx;
                msg.attributes
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(*ip)));
                let req = self.handle.neighbours().del(msg);
                async move { gone_is_fine(req.execute().await, || format!("delete neighbour {ip}")) }
            }),
        )
        .await;
        run_stage(
            &mut errors,
            d.del_fdb.iter().map(|(mac, ip)| {
                let mut msg = NeighbourMessage::default();
                msg.header.family = AddressFamily::Bridge;
                msg.header.ifindex = vx;
                msg.header.flags = NeighbourFlags::Own;
                msg.attributes
                    .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
                msg.attributes
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(*ip)));
                let req = self.handle.neighbours().del(msg);
                async move { gone_is_fine(req.execute().await, || format!("delete fdb {mac}")) }
            }),
        )
        .await;

        run_stage(
            &mut errors,
            d.put_fdb.iter().map(|(mac, ip)| {
                let req = self
                    .handle
                    .neighbours()
                    .add_bridge(vx, &mac.0)
                    .destination(IpAddr::V4(*ip))
                    .flags(NeighbourFlags::Own)
                    .state(NeighbourState::Permanent)
                    .replace();
                async move {
                    req.execute()
                        .await
                        .map_err(|e| format!("add fdb {mac} -> {ip}: {e}"))
                }
            }),
        )
        .await;
        run_stage(
            &mut errors,
            d.put_neighbours.iter().map(|(ip, mac)| {
                let req = self
                    .handle
                    .neighbours()
                    .add(vx, IpAddr::V4(*ip))
                    .link_layer_address(&mac.0)
                    .state(NeighbourState::Permanent)
                    .replace();
                async move {
                    req.execute()
                        .await
                        .map_err(|e| format!("add neighbour {ip} -> {mac}: {e}"))
                }
            }),
        )
        .await;
        run_stage(
            &mut errors,
            d.put_routes.iter().map(|(n, v)| {
                let req = self
                    .handle
                    .route()
                    .add(self.route_msg(*n, *v, vx, underlay))
                    .replace();
                async move {
                    req.execute()
                        .await
                        .map_err(|e| format!("add route {n} {v:?}: {e}"))
                }
            }),
        )
        .await;
        if errors.is_empty() {
            Ok(())
        } else {
            let n = errors.len();
            errors.truncate(5);
            bail!("{n} overlay operations failed: {}", errors.join("; "))
        }
    }

    /// Deletes every route tartan owns (protocol [`ROUTE_PROTO`]) through `underlay_index`.
    pub async fn delete_owned_routes(&self, underlay_index: u32) -> Result<()> {
        let st = self.read_overlay(u32::MAX, underlay_index).await?;
        let d = OverlayDiff {
            del_routes: st.routes.into_iter().collect(),
            ..Default::default()
        };
        self.apply_overlay(u32::MAX, underlay_index, &d).await
    }
}

/// Runs one stage of netlink requests, at most 64 in flight, adding each failure to `errors`.
async fn run_stage<F>(errors: &mut Vec<String>, requests: impl Iterator<Item = F>)
where
    F: std::future::Future<Output = std::result::Result<(), String>>,
{
    const IN_FLIGHT: usize = 64;
    let results: Vec<_> = futures::stream::iter(requests.collect::<Vec<_>>())
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    errors.extend(results.into_iter().filter_map(|r| r.err()));
}

/// A delete's result where "already gone" counts as done.
fn gone_is_fine(
    r: std::result::Result<(), rtnetlink::Error>,
    what: impl FnOnce() -> String,
) -> std::result::Result<(), String> {
    match r {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(format!("{}: {e}", what())),
    }
}

/// A stream of multicast routing notifications (link, neighbour, address, route changes).
pub struct NetlinkEvents {
    rx: futures::channel::mpsc::UnboundedReceiver<(
        NetlinkMessage<RouteNetlinkMessage>,
        netlink_sys::SocketAddr,
    )>,
    /// The subscribed socket (a duplicate descriptor), for [`NetlinkEvents::focus`].
    sock: std::os::fd::OwnedFd,
}

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_DELADDR: u16 = 21;
const RTM_DELROUTE: u16 = 25;
const RTM_DELNEIGH: u16 = 29;
/// Offset of the interface index in a link, address or neighbour notification: the
/// netlink header (16 bytes), then `ifinfomsg`, `ifaddrmsg` and `ndmsg` all keep it at +4.
const IFINDEX_OFFSET: u32 = 20;

/// A classic BPF instruction: (code, jump if true, jump if false, constant).
pub type BpfInsn = (u16, u8, u8, u32);

/// The kernel-side filter of [`NetlinkEvents::focus`]: passes route removals, and link
/// changes and address or neighbour removals of the interfaces in `indexes`; drops the rest
/// (additions, which the reconciler ignores, and everything about other interfaces such as
/// pods' veths). Classic BPF loads are big-endian and netlink is host-endian, hence the
/// byte swaps. At most 200 interfaces (jump offsets are one byte).
pub fn event_filter(indexes: &[u32]) -> Vec<BpfInsn> {
    const LD_H_ABS: u16 = 0x28;
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let indexes = &indexes[..indexes.len().min(200)];
    let n = indexes.len() as u8;
    let ty = |t: u16| u32::from(t.to_be());
    // Layout: 0 load type; 1 route removal?; 2-5 per-interface types; 6 drop;
    // 7 load index; 8.. one test per interface; drop; accept.
    let accept_from = |at: u8| 8 + n - at;
    let mut p: Vec<BpfInsn> = vec![
        (LD_H_ABS, 0, 0, 4),
        (JEQ_K, accept_from(1), 0, ty(RTM_DELROUTE)),
    ];
    for (k, t) in [RTM_NEWLINK, RTM_DELLINK, RTM_DELADDR, RTM_DELNEIGH]
        .into_iter()
        .enumerate()
    {
        let at = 2 + k as u8;
        p.push((JEQ_K, 6 - at, 0, ty(t)));
    }
    p.push((RET_K, 0, 0, 0));
    p.push((LD_W_ABS, 0, 0, IFINDEX_OFFSET));
    for (k, i) in indexes.iter().enumerate() {
        let at = 8 + k as u8;
        p.push((JEQ_K, accept_from(at), 0, i.to_be()));
    }
    p.push((RET_K, 0, 0, 0));
    p.push((RET_K, 0, 0, u32::MAX));
    p
}

/// What kind of change a notification reports, reduced to what the reconciler needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelChange {
    /// Something was removed or a link changed: the overlay may need repair. Carries the
    /// interface it happened on, when the message names one.
    Removal(Option<u32>),
    /// Something was added: usually our own doing.
    Addition,
}

impl NetlinkEvents {
    /// Subscribes to `groups` (an RTMGRP_* mask) in the current network namespace.
    pub fn subscribe(groups: u32) -> Result<NetlinkEvents> {
        let (mut conn, _handle, rx) =
            rtnetlink::new_connection().context("opening a netlink event socket")?;
        let addr = netlink_sys::SocketAddr::new(0, groups);
        conn.socket_mut()
            .socket_mut()
            .bind(&addr)
            .context("binding the netlink event socket")?;
        let sock = std::os::fd::AsFd::as_fd(conn.socket_mut().socket_mut())
            .try_clone_to_owned()
            .context("duplicating the netlink event socket")?;
        tokio::spawn(conn);
        Ok(NetlinkEvents { rx, sock })
    }

    /// Lets the kernel drop, before they are queued, the notifications the reconciler would
    /// ignore (see [`event_filter`]): a node creating and deleting pods' veths otherwise wakes
    /// the daemon for dozens of messages per pod. Call again when the interfaces change.
    pub fn focus(&self, indexes: &[u32]) -> Result<()> {
        let prog: Vec<socket2::SockFilter> = event_filter(indexes)
            .into_iter()
            .map(|(c, jt, jf, k)| socket2::SockFilter::new(c, jt, jf, k))
            .collect();
        socket2::SockRef::from(&self.sock)
            .attach_filter(&prog)
            .context("attaching the notification filter")
    }

    /// Waits for the next notification.
    pub async fn next(&mut self) -> Option<KernelChange> {
        let (msg, _) = self.rx.next().await?;
        Some(match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRoute(r)) => {
                KernelChange::Removal(r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                }))
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(n)) => {
                KernelChange::Removal(Some(n.header.ifindex))
            }
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::DelLink(l) | RouteNetlinkMessage::NewLink(l),
            ) => KernelChange::Removal(Some(l.header.index)),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelAddress(a)) => {
                KernelChange::Removal(Some(a.header.index))
            }
            _ => KernelChange::Addition,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the subset of classic BPF that [`event_filter`] uses over `pkt`.
    fn run(prog: &[BpfInsn], pkt: &[u8]) -> u32 {
        let mut a = 0u32;
        let mut pc = 0usize;
        loop {
            let (code, jt, jf, k) = prog[pc];
            let k_us = k as usize;
            match code {
                0x28 => a = u32::from(u16::from_be_bytes([pkt[k_us], pkt[k_us + 1]])),
                0x20 => {
                    a = u32::from_be_bytes([pkt[k_us], pkt[k_us + 1], pkt[k_us + 2], pkt[k_us + 3]])
                }
                0x15 => {
                    pc += usize::from(if a == k { jt } else { jf });
                }
                0x06 => return k,
                other => panic!("unexpected instruction {other:#x}"),
            }
            pc += 1;
        }
    }

    /// A notification of `ty` about interface `index` (host-endian, as the kernel sends it).
    fn msg(ty: u16, index: u32) -> Vec<u8> {
        let mut m = vec![0u8; 32];
        m[0..4].copy_from_slice(&32u32.to_ne_bytes());
        m[4..6].copy_from_slice(&ty.to_ne_bytes());
        m[20..24].copy_from_slice(&index.to_ne_bytes());
        m
    }

    #[test]
    fn event_filter_passes_only_what_the_reconciler_acts_on() {
        let prog = event_filter(&[7, 2]);
        let pass = |ty, i| run(&prog, &msg(ty, i)) != 0;
        for ty in [RTM_NEWLINK, RTM_DELLINK, RTM_DELADDR, RTM_DELNEIGH] {
            assert!(pass(ty, 7), "type {ty} on the VXLAN device");
            assert!(pass(ty, 2), "type {ty} on the underlay");
            assert!(!pass(ty, 40), "type {ty} on a pod's veth");
        }
        assert!(
            pass(RTM_DELROUTE, 40),
            "route removals carry their device in attributes"
        );
        for added in [20u16, 24, 28] {
            assert!(
                !pass(added, 7),
                "additions ({added}) are ignored by the reconciler"
            );
        }
        // No interface known yet: only route removals pass.
        let none = event_filter(&[]);
        assert_ne!(run(&none, &msg(RTM_DELROUTE, 3)), 0);
        assert_eq!(run(&none, &msg(RTM_DELLINK, 3)), 0);
        // Long lists are cut where one-byte jumps still reach the end.
        let many: Vec<u32> = (1..=300).collect();
        let prog = event_filter(&many);
        assert_ne!(run(&prog, &msg(RTM_DELLINK, 200)), 0);
        assert_eq!(run(&prog, &msg(RTM_DELLINK, 201)), 0);
    }
}
