//! The overlay's kernel side: the [`OverlayKernel`] seam the reconciler drives, and
//! [`HostKernel`], which implements it with the VXLAN device, routes, neighbours and FDB
//! entries tartan owns (read and changed over rtnetlink), the masquerade table (`nft -f`)
//! and IPv4 forwarding. Tests drive the reconciler through an in-memory fake instead
//! (`overlay::reconciler` tests).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, anyhow, bail};
use futures::{StreamExt, TryStreamExt};
use ipnetwork::{Ipv4Network, Ipv6Network};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::link::{InfoKind, InfoVxlan, LinkFlags};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{LinkUnspec, LinkVxlan, RouteMessageBuilder};

use crate::kernel::netlink::{
    Iface, Netlink, is_not_found, link_kind, link_mac, link_mtu, mac_of, vxlan_info,
};
use crate::kernel::nft_cmd;
use crate::model::subnet_lease::MacAddr;
use crate::overlay::masquerade;
use crate::overlay::plan::{Family, OverlayDiff, OverlayState, RouteVia, V4, V6};

/// Routing protocol number tartan stamps on the routes it owns (`ip route ... proto 157`).
pub const ROUTE_PROTO: u8 = 157;

/// What the overlay reconciler (and its teardown) asks of the kernel. Implemented by
/// [`HostKernel`] and, in tests, by an in-memory fake.
pub trait OverlayKernel: Send + Sync {
    /// Facts about the interface `name` (the underlay): index, MTU, IPv4 addresses.
    fn iface(&self, name: &str) -> impl Future<Output = Result<Iface>> + Send;
    /// Makes the VXLAN device match `spec` (see [`Netlink::ensure_vxlan`]); returns its
    /// index and what had to change.
    fn ensure_vxlan(
        &self,
        spec: &VxlanSpec,
    ) -> impl Future<Output = Result<(u32, DeviceChange)>> + Send;
    /// Makes `addr` the only IPv4 address of interface `index`; true when something changed.
    fn ensure_only_addr(
        &self,
        index: u32,
        addr: Ipv4Network,
    ) -> impl Future<Output = Result<bool>> + Send;
    /// The overlay state tartan owns (see [`Netlink::read_overlay`]).
    fn read_overlay(
        &self,
        vx_index: u32,
        underlay_index: u32,
    ) -> impl Future<Output = Result<OverlayState>> + Send;
    /// Applies an overlay diff, trying every operation before failing.
    fn apply_overlay(
        &self,
        vx_index: u32,
        underlay_index: u32,
        d: &OverlayDiff,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Makes `addr` the only global IPv6 address of interface `index` (added without
    /// duplicate address detection); true when something changed.
    fn ensure_only_addr6(
        &self,
        index: u32,
        addr: Ipv6Network,
    ) -> impl Future<Output = Result<bool>> + Send;
    /// The IPv6 overlay state tartan owns on the IPv6 VXLAN device `vx_index`.
    fn read_overlay6(
        &self,
        vx_index: u32,
        underlay_index: u32,
    ) -> impl Future<Output = Result<OverlayState<V6>>> + Send;
    /// Applies an IPv6 overlay diff, trying every operation before failing.
    fn apply_overlay6(
        &self,
        vx_index: u32,
        underlay_index: u32,
        d: &OverlayDiff<V6>,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Enables IPv6 forwarding (dual-stack pods are routed through the node).
    fn ensure_ip6_forward(&self) -> Result<()>;
    /// The masquerade tables as the kernel lists them (the `ip` one, then the `ip6` one when
    /// it exists); `None` when the `ip` one does not exist.
    fn masquerade_listing(&self) -> impl Future<Output = Result<Option<String>>> + Send;
    /// Applies a masquerade script ([`masquerade::script`]) atomically.
    fn apply_masquerade(&self, script: &str) -> impl Future<Output = Result<()>> + Send;
    /// Enables IPv4 forwarding (pods are routed through the node).
    fn ensure_ip_forward(&self) -> Result<()>;
    /// Deletes the link `name`; true when it existed.
    fn delete_link(&self, name: &str) -> impl Future<Output = Result<bool>> + Send;
    /// Deletes every route tartan owns through `underlay_index`.
    fn delete_owned_routes(&self, underlay_index: u32) -> impl Future<Output = Result<()>> + Send;
    /// Deletes the masquerade tables (absent is fine).
    fn delete_masquerade(&self) -> impl Future<Output = Result<()>> + Send;
}

/// The overlay's kernel side on this host: rtnetlink, `nft` and `/proc/sys`.
pub struct HostKernel {
    nl: Netlink,
}

impl HostKernel {
    /// Opens a routing netlink socket in the current network namespace.
    pub fn connect() -> Result<HostKernel> {
        Ok(HostKernel {
            nl: Netlink::connect()?,
        })
    }
}

impl OverlayKernel for HostKernel {
    async fn iface(&self, name: &str) -> Result<Iface> {
        self.nl.iface(name).await
    }

    async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<(u32, DeviceChange)> {
        self.nl.ensure_vxlan(spec).await
    }

    async fn ensure_only_addr(&self, index: u32, addr: Ipv4Network) -> Result<bool> {
        self.nl.ensure_only_addr(index, addr).await
    }

    async fn read_overlay(&self, vx_index: u32, underlay_index: u32) -> Result<OverlayState> {
        self.nl.read_overlay(vx_index, underlay_index).await
    }

    async fn apply_overlay(
        &self,
        vx_index: u32,
        underlay_index: u32,
        d: &OverlayDiff,
    ) -> Result<()> {
        self.nl.apply_overlay(vx_index, underlay_index, d).await
    }

    async fn ensure_only_addr6(&self, index: u32, addr: Ipv6Network) -> Result<bool> {
        self.nl.ensure_only_addr6(index, addr).await
    }

    async fn read_overlay6(&self, vx_index: u32, underlay_index: u32) -> Result<OverlayState<V6>> {
        self.nl
            .read_overlay_of::<V6>(vx_index, underlay_index)
            .await
    }

    async fn apply_overlay6(
        &self,
        vx_index: u32,
        underlay_index: u32,
        d: &OverlayDiff<V6>,
    ) -> Result<()> {
        self.nl
            .apply_overlay_of::<V6>(vx_index, underlay_index, d)
            .await
    }

    fn ensure_ip6_forward(&self) -> Result<()> {
        enable_sysctl("/proc/sys/net/ipv6/conf/all/forwarding")
    }

    async fn masquerade_listing(&self) -> Result<Option<String>> {
        let Some(mut v4) = nft_cmd::list_table(masquerade::FAMILY, masquerade::TABLE).await? else {
            return Ok(None);
        };
        if let Some(v6) = nft_cmd::list_table(masquerade::FAMILY6, masquerade::TABLE).await? {
            v4.push_str(&v6);
        }
        Ok(Some(v4))
    }

    async fn apply_masquerade(&self, script: &str) -> Result<()> {
        nft_cmd::apply(script).await
    }

    fn ensure_ip_forward(&self) -> Result<()> {
        enable_sysctl("/proc/sys/net/ipv4/ip_forward")
    }

    async fn delete_link(&self, name: &str) -> Result<bool> {
        self.nl.delete_link(name).await
    }

    async fn delete_owned_routes(&self, underlay_index: u32) -> Result<()> {
        self.nl.delete_owned_routes(underlay_index).await
    }

    async fn delete_masquerade(&self) -> Result<()> {
        let v4 = nft_cmd::delete_table(masquerade::FAMILY, masquerade::TABLE).await;
        nft_cmd::delete_table(masquerade::FAMILY6, masquerade::TABLE).await?;
        v4
    }
}

/// Sets the boolean sysctl file `p` to 1 unless it is already.
fn enable_sysctl(p: &str) -> Result<()> {
    if std::fs::read_to_string(p)
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
    {
        return Ok(());
    }
    std::fs::write(p, b"1").with_context(|| format!("enabling {p}"))
}

/// The VXLAN device the overlay wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    /// Device name, e.g. `tartan.1`.
    pub name: String,
    /// VXLAN network identifier.
    pub vni: u32,
    /// UDP destination port.
    pub port: u16,
    /// Local tunnel endpoint address (IPv6 for an IPv6 underlay, flannel's
    /// `flannel-v6.<VNI>`).
    pub local: IpAddr,
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

impl Netlink {
    /// Makes the VXLAN device match `spec`: recreated when VNI, port, local address or
    /// underlay differ (or it is not a VXLAN device), adjusted in place for MTU/MAC/up.
    /// Returns the device index and what changed.
    pub async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<(u32, DeviceChange)> {
        if let Some(link) = self.link_by_name(&spec.name).await? {
            let ok = link_kind(&link) == Some(InfoKind::Vxlan)
                && vxlan_info(&link).is_some_and(|info| {
                    let mut id = None;
                    let mut port = None;
                    let mut local: Option<IpAddr> = None;
                    let mut dev = None;
                    let mut learning = None;
                    for i in info {
                        match i {
                            InfoVxlan::Id(v) => id = Some(v),
                            InfoVxlan::Port(v) => port = Some(v),
                            InfoVxlan::Local(v) => local = Some(IpAddr::V4(v)),
                            InfoVxlan::Local6(v) => local = Some(IpAddr::V6(v)),
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
            .port(spec.port);
        let msg = match spec.local {
            IpAddr::V4(a) => msg.local(a),
            IpAddr::V6(a) => msg.local6(a),
        };
        let msg = msg
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

    /// Reads the IPv4 overlay state tartan owns (see [`Netlink::read_overlay_of`]).
    pub async fn read_overlay(&self, vx_index: u32, underlay_index: u32) -> Result<OverlayState> {
        self.read_overlay_of::<V4>(vx_index, underlay_index).await
    }

    /// Reads the overlay state of family `F` tartan owns: routes with [`ROUTE_PROTO`] in the
    /// main table through `vx_index` or `underlay_index`, permanent neighbours and FDB
    /// entries (with a tunnel destination of the family) on `vx_index`.
    pub async fn read_overlay_of<F: NetlinkFamily>(
        &self,
        vx_index: u32,
        underlay_index: u32,
    ) -> Result<OverlayState<F>> {
        let mut st = OverlayState::<F>::default();
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(F::route_dump())
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
                    RouteAttribute::Destination(a) => dst = F::of_route(a),
                    RouteAttribute::Gateway(a) => gw = F::of_route(a),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let (Some(dst), Some(gw), Some(oif)) = (dst, gw, oif) else {
                continue;
            };
            let Some(net) = F::subnet(dst, r.header.destination_prefix_length) else {
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
            .set_address_family(F::AF)
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
                    NeighbourAttribute::Destination(a) => ip = F::of_neighbour(a),
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
                    // AF_BRIDGE messages may carry the VXLAN destination as raw bytes.
                    NeighbourAttribute::Destination(a) => ip = F::of_neighbour(a),
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

    fn route_msg<F: NetlinkFamily>(
        &self,
        net: F::Net,
        via: RouteVia<F>,
        vx: u32,
        underlay: u32,
    ) -> RouteMessage {
        let (gw, oif) = match via {
            RouteVia::Vxlan(gw) => (gw, vx),
            RouteVia::Underlay(gw) => (gw, underlay),
        };
        let b = F::route_to(net, gw)
            .protocol(RouteProtocol::Other(ROUTE_PROTO))
            .scope(RouteScope::Universe)
            .kind(RouteType::Unicast)
            .table_id(u32::from(RouteHeader::RT_TABLE_MAIN))
            .output_interface(oif);
        match via {
            RouteVia::Vxlan(_) => b.onlink().build(),
            RouteVia::Underlay(_) => b.build(),
        }
    }

    /// Applies an IPv4 overlay diff (see [`Netlink::apply_overlay_of`]).
    pub async fn apply_overlay(&self, vx: u32, underlay: u32, d: &OverlayDiff) -> Result<()> {
        self.apply_overlay_of::<V4>(vx, underlay, d).await
    }

    /// Applies an overlay diff of family `F`. Adds go FDB → neighbour → route, deletes
    /// route → neighbour → FDB; requests within a stage run concurrently. Every failure is
    /// collected; the call fails only after trying everything.
    pub async fn apply_overlay_of<F: NetlinkFamily>(
        &self,
        vx: u32,
        underlay: u32,
        d: &OverlayDiff<F>,
    ) -> Result<()> {
        let mut errors = crate::util::errors::ErrorList::new();
        // Deletes first, so a route moving between devices never has two entries.
        run_stage(
            &mut errors,
            d.del_routes.iter().map(|(n, v)| {
                let req = self
                    .handle
                    .route()
                    .del(self.route_msg::<F>(*n, *v, vx, underlay));
                async move { gone_is_fine(req.execute().await, || format!("delete route {n}")) }
            }),
        )
        .await;
        run_stage(
            &mut errors,
            d.del_neighbours.iter().map(|(ip, _)| {
                let mut msg = NeighbourMessage::default();
                msg.header.family = F::AF;
                msg.header.ifindex = vx;
                msg.attributes
                    .push(NeighbourAttribute::Destination(F::neighbour(*ip)));
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
                    .push(NeighbourAttribute::Destination(F::neighbour(*ip)));
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
                    .destination(F::ip(*ip))
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
                    .add(vx, F::ip(*ip))
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
                    .add(self.route_msg::<F>(*n, *v, vx, underlay))
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
            bail!("{} overlay operations failed: {errors}", errors.len())
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
async fn run_stage<F>(
    errors: &mut crate::util::errors::ErrorList,
    requests: impl Iterator<Item = F>,
) where
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

/// How an address family's overlay entries are spelled in rtnetlink messages.
pub trait NetlinkFamily: Family {
    /// The family of its routes and neighbours.
    const AF: AddressFamily;
    /// A request that dumps the family's routes.
    fn route_dump() -> RouteMessage;
    /// A route to `net` via `gw` (protocol, table and device are added by the caller).
    fn route_to(net: Self::Net, gw: Self::Addr) -> RouteMessageBuilder<Self::Addr>;
    /// The address in a route attribute, when it is of this family.
    fn of_route(a: &RouteAddress) -> Option<Self::Addr>;
    /// The address in a neighbour or FDB attribute (AF_BRIDGE ones come as raw bytes), when
    /// it is of this family.
    fn of_neighbour(a: &NeighbourAddress) -> Option<Self::Addr>;
    /// The subnet `addr/prefix`, when the prefix is valid.
    fn subnet(addr: Self::Addr, prefix: u8) -> Option<Self::Net>;
    /// The address as an [`IpAddr`].
    fn ip(addr: Self::Addr) -> IpAddr;
    /// The address as a neighbour attribute.
    fn neighbour(addr: Self::Addr) -> NeighbourAddress;
}

impl NetlinkFamily for V4 {
    const AF: AddressFamily = AddressFamily::Inet;
    fn route_dump() -> RouteMessage {
        RouteMessageBuilder::<Ipv4Addr>::new().build()
    }
    fn route_to(net: Ipv4Network, gw: Ipv4Addr) -> RouteMessageBuilder<Ipv4Addr> {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net.network(), net.prefix())
            .gateway(gw)
    }
    fn of_route(a: &RouteAddress) -> Option<Ipv4Addr> {
        match a {
            RouteAddress::Inet(v) => Some(*v),
            _ => None,
        }
    }
    fn of_neighbour(a: &NeighbourAddress) -> Option<Ipv4Addr> {
        match a {
            NeighbourAddress::Inet(v) => Some(*v),
            NeighbourAddress::Other(b) => {
                <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
            }
            _ => None,
        }
    }
    fn subnet(addr: Ipv4Addr, prefix: u8) -> Option<Ipv4Network> {
        Ipv4Network::new(addr, prefix).ok()
    }
    fn ip(addr: Ipv4Addr) -> IpAddr {
        IpAddr::V4(addr)
    }
    fn neighbour(addr: Ipv4Addr) -> NeighbourAddress {
        NeighbourAddress::Inet(addr)
    }
}

impl NetlinkFamily for V6 {
    const AF: AddressFamily = AddressFamily::Inet6;
    fn route_dump() -> RouteMessage {
        RouteMessageBuilder::<Ipv6Addr>::new().build()
    }
    fn route_to(net: Ipv6Network, gw: Ipv6Addr) -> RouteMessageBuilder<Ipv6Addr> {
        RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(net.network(), net.prefix())
            .gateway(gw)
    }
    fn of_route(a: &RouteAddress) -> Option<Ipv6Addr> {
        match a {
            RouteAddress::Inet6(v) => Some(*v),
            _ => None,
        }
    }
    fn of_neighbour(a: &NeighbourAddress) -> Option<Ipv6Addr> {
        match a {
            NeighbourAddress::Inet6(v) => Some(*v),
            NeighbourAddress::Other(b) => {
                <[u8; 16]>::try_from(b.as_slice()).ok().map(Ipv6Addr::from)
            }
            _ => None,
        }
    }
    fn subnet(addr: Ipv6Addr, prefix: u8) -> Option<Ipv6Network> {
        Ipv6Network::new(addr, prefix).ok()
    }
    fn ip(addr: Ipv6Addr) -> IpAddr {
        IpAddr::V6(addr)
    }
    fn neighbour(addr: Ipv6Addr) -> NeighbourAddress {
        NeighbourAddress::Inet6(addr)
    }
}
