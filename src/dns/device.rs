//! The cluster DNS address on the node: a dummy device `tartan-dns` holding the address as a
//! /32 (NodeLocal DNSCache's `nodelocaldns` counterpart), so a pod's query to it is routed
//! to its own node and delivered locally, without a service rule, a conntrack NAT entry or a
//! cross-node hop.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use ipnetwork::Ipv4Network;
use netlink_packet_route::link::{InfoKind, LinkFlags};
use rtnetlink::{LinkDummy, LinkUnspec};

use crate::kernel::netlink::{Netlink, link_kind};

/// The device's name.
pub const DNS_DEVICE: &str = "tartan-dns";

/// Makes sure `tartan-dns` exists, is up and holds `ip`/32 (and only that).
pub async fn ensure_dns_address(nl: &Netlink, ip: Ipv4Addr) -> Result<()> {
    let link = match nl.link_by_name(DNS_DEVICE).await? {
        Some(l) => l,
        None => {
            nl.handle()
                .link()
                .add(LinkDummy::new(DNS_DEVICE).up().build())
                .execute()
                .await
                .with_context(|| format!("creating the {DNS_DEVICE} device"))?;
            nl.link_by_name(DNS_DEVICE)
                .await?
                .with_context(|| format!("{DNS_DEVICE} vanished after creation"))?
        }
    };
    if link_kind(&link) != Some(InfoKind::Dummy) {
        anyhow::bail!(
            "{DNS_DEVICE} exists and is not a dummy device; remove it or pass --dns false"
        );
    }
    let index = link.header.index;
    if !link.header.flags.contains(LinkFlags::Up) {
        nl.handle()
            .link()
            .change(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .with_context(|| format!("setting {DNS_DEVICE} up"))?;
    }
    nl.ensure_only_addr(index, Ipv4Network::from(ip))
        .await
        .with_context(|| format!("putting {ip} on {DNS_DEVICE}"))?;
    Ok(())
}

/// Removes `tartan-dns` (on leave); true when it existed.
pub async fn remove_dns_device() -> Result<bool> {
    Netlink::connect()?.delete_link(DNS_DEVICE).await
}
