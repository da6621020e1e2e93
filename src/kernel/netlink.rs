//! A small wrapper around rtnetlink: links and addresses in the current network namespace,
//! shared by the overlay (`overlay::kernel`), the CNI plugin and the pod registrar.

use std::net::IpAddr;

use anyhow::{Context, Result, anyhow};
use futures::TryStreamExt;
use ipnetwork::{Ipv4Network, Ipv6Network};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage,
};
use nix::errno::Errno;
use rtnetlink::Handle;

use crate::model::subnet_lease::MacAddr;

/// A connection to the kernel's routing netlink in the current network namespace.
#[derive(Clone)]
pub struct Netlink {
    pub(crate) handle: Handle,
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
    /// Global IPv6 addresses with prefix length (no link-local ones, none still tentative
    /// or failed in duplicate address detection): the candidates for an IPv6 underlay.
    pub addrs6: Vec<Ipv6Network>,
}

/// The errno the kernel answered a netlink request with, if it answered with an error.
pub(crate) fn errno_of(e: &rtnetlink::Error) -> Option<Errno> {
    match e {
        rtnetlink::Error::NetlinkError(m) if m.code.is_some() => {
            Some(Errno::from_raw(-m.raw_code()))
        }
        _ => None,
    }
}

/// Whether a request failed because its object does not exist (ENODEV, ENOENT, ESRCH).
pub(crate) fn is_not_found(e: &rtnetlink::Error) -> bool {
    matches!(
        errno_of(e),
        Some(Errno::ENODEV | Errno::ENOENT | Errno::ESRCH)
    )
}

pub(crate) fn mac_of(bytes: &[u8]) -> Option<MacAddr> {
    <[u8; 6]>::try_from(bytes).ok().map(MacAddr)
}

pub(crate) fn link_mtu(msg: &LinkMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(0)
}

pub(crate) fn link_mac(msg: &LinkMessage) -> Option<MacAddr> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) => mac_of(b),
        _ => None,
    })
}

pub(crate) fn vxlan_info(msg: &LinkMessage) -> Option<Vec<InfoVxlan>> {
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

    /// Every address message of interface `index` (both families, one dump).
    async fn addr_msgs(&self, index: u32) -> Result<Vec<AddressMessage>> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .context("listing addresses")?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.index == index)
            .collect())
    }

    /// IPv4 addresses on interface `index`.
    pub async fn ipv4_addrs(&self, index: u32) -> Result<Vec<Ipv4Network>> {
        Ok(v4_addrs(&self.addr_msgs(index).await?))
    }

    /// Global IPv6 addresses on interface `index` (see [`Iface::addrs6`]).
    pub async fn ipv6_addrs(&self, index: u32) -> Result<Vec<Ipv6Network>> {
        Ok(v6_addrs(&self.addr_msgs(index).await?, true))
    }

    /// Index, MTU, MAC and IPv4 and global IPv6 addresses of the interface `name`.
    pub async fn iface(&self, name: &str) -> Result<Iface> {
        let link = self
            .link_by_name(name)
            .await?
            .ok_or_else(|| anyhow!("interface {name} does not exist"))?;
        let index = link.header.index;
        let msgs = self.addr_msgs(index).await?;
        Ok(Iface {
            index,
            mtu: link_mtu(&link),
            mac: link_mac(&link),
            addrs: v4_addrs(&msgs),
            addrs6: v6_addrs(&msgs, true),
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

    /// Makes `addr` the only IPv4 address on interface `index`; returns whether it changed.
    pub async fn ensure_only_addr(&self, index: u32, addr: Ipv4Network) -> Result<bool> {
        let have = self.ipv4_addrs(index).await?;
        let mut changed = false;
        if !have.contains(&addr) {
            self.add_addr(index, addr).await?;
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

    /// Makes `addr` the only global IPv6 address on interface `index` (the link-local one
    /// the kernel gives every device stays), added without duplicate address detection, so
    /// it is usable at once; returns whether something changed.
    pub async fn ensure_only_addr6(&self, index: u32, addr: Ipv6Network) -> Result<bool> {
        let have = v6_addrs(&self.addr_msgs(index).await?, false);
        let mut changed = false;
        if !have.contains(&addr) {
            self.add_addr6_nodad(index, addr, true)
                .await
                .with_context(|| format!("adding address {addr}"))?;
            changed = true;
        }
        for other in have.into_iter().filter(|a| *a != addr) {
            let mut m = AddressMessage::default();
            m.header.family = AddressFamily::Inet6;
            m.header.index = index;
            m.header.prefix_len = other.prefix();
            m.attributes
                .push(AddressAttribute::Address(IpAddr::V6(other.ip())));
            self.handle
                .address()
                .del(m)
                .execute()
                .await
                .with_context(|| format!("removing stray address {other}"))?;
            changed = true;
        }
        Ok(changed)
    }

    /// Adds an IPv6 address without duplicate address detection (usable at once: IPAM or the
    /// lease made it unique), replacing an identical one with `replace`; the kernel's answer
    /// is returned as is, so callers can take EEXIST as "there already".
    pub async fn add_addr6_nodad(
        &self,
        index: u32,
        addr: Ipv6Network,
        replace: bool,
    ) -> std::result::Result<(), rtnetlink::Error> {
        let mut req = self
            .handle
            .address()
            .add(index, IpAddr::V6(addr.ip()), addr.prefix());
        if replace {
            req = req.replace();
        }
        req.message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        req.execute().await
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
}

/// The IPv4 addresses among `msgs` (the local address, else the address).
fn v4_addrs(msgs: &[AddressMessage]) -> Vec<Ipv4Network> {
    msgs.iter()
        .filter(|m| m.header.family == AddressFamily::Inet)
        .filter_map(|m| {
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(v)) => Some(*v),
                _ => None,
            });
            let a = local.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(IpAddr::V4(v)) => Some(*v),
                    _ => None,
                })
            })?;
            Ipv4Network::new(a, m.header.prefix_len).ok()
        })
        .collect()
}

/// The global IPv6 addresses among `msgs`; with `usable_only`, not those still tentative
/// (IFA_F_TENTATIVE, 0x40) or failed in duplicate address detection (IFA_F_DADFAILED, 0x08).
fn v6_addrs(msgs: &[AddressMessage], usable_only: bool) -> Vec<Ipv6Network> {
    msgs.iter()
        .filter(|m| m.header.family == AddressFamily::Inet6)
        .filter(|m| {
            let flags = m
                .attributes
                .iter()
                .find_map(|a| match a {
                    AddressAttribute::Flags(f) => Some(f.bits()),
                    _ => None,
                })
                .unwrap_or(u32::from(m.header.flags.bits()));
            !usable_only || flags & (0x40 | 0x08) == 0
        })
        .filter_map(|m| {
            let a = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V6(v)) => Some(*v),
                _ => None,
            })?;
            is_global6(a)
                .then(|| Ipv6Network::new(a, m.header.prefix_len).ok())
                .flatten()
        })
        .collect()
}

/// Whether `a` can be an underlay address: not loopback, unspecified, multicast or
/// link-local (fe80::/10). Unique local addresses (fc00::/7) count, as in most clusters.
pub fn is_global6(a: std::net::Ipv6Addr) -> bool {
    !(a.is_loopback() || a.is_unspecified() || a.is_multicast() || a.is_unicast_link_local())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn underlay_ipv6_candidates() {
        for ok in ["2001:db8::1", "fd00:1::2"] {
            assert!(is_global6(ok.parse().unwrap()), "{ok}");
        }
        for not in ["::1", "::", "ff02::1", "fe80::1"] {
            assert!(!is_global6(not.parse().unwrap()), "{not}");
        }
    }

    fn nack(errno: Errno) -> rtnetlink::Error {
        let mut m = netlink_packet_core::ErrorMessage::default();
        m.code = std::num::NonZeroI32::new(-(errno as i32));
        rtnetlink::Error::NetlinkError(m)
    }

    #[test]
    fn errno_of_a_nack() {
        assert_eq!(errno_of(&nack(Errno::EEXIST)), Some(Errno::EEXIST));
        for gone in [Errno::ENODEV, Errno::ENOENT, Errno::ESRCH] {
            assert!(is_not_found(&nack(gone)), "{gone}");
        }
        assert!(!is_not_found(&nack(Errno::EPERM)));
        let ack = rtnetlink::Error::NetlinkError(netlink_packet_core::ErrorMessage::default());
        assert_eq!(errno_of(&ack), None);
        assert!(!is_not_found(&ack));
    }
}
