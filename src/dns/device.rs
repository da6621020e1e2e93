//! The cluster DNS address on the node: a /32 on the loopback device (the node-local
//! address NodeLocal DNSCache puts on its `nodelocaldns` dummy; loopback needs no kernel
//! module and exists in every namespace), so a pod's query to it is routed to its own node
//! and delivered locally, without a service rule, a conntrack NAT entry or a cross-node hop.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result};
use futures::TryStreamExt;
use ipnetwork::Ipv4Network;

use crate::kernel::netlink::Netlink;

/// The device holding the address.
pub const DNS_DEVICE: &str = "lo";

/// Makes sure the loopback device holds `ip`/32.
pub async fn ensure_dns_address(nl: &Netlink, ip: Ipv4Addr) -> Result<()> {
    let lo = nl
        .link_by_name(DNS_DEVICE)
        .await?
        .with_context(|| format!("no {DNS_DEVICE} device"))?;
    let index = lo.header.index;
    let net = Ipv4Network::from(ip);
    if !nl.ipv4_addrs(index).await?.contains(&net) {
        nl.add_addr(index, net)
            .await
            .with_context(|| format!("putting the cluster DNS address {ip} on {DNS_DEVICE}"))?;
    }
    Ok(())
}

/// Removes `ip`/32 from the loopback device (on leave); true when it was there.
pub async fn remove_dns_address(ip: Ipv4Addr) -> Result<bool> {
    let nl = Netlink::connect()?;
    let Some(lo) = nl.link_by_name(DNS_DEVICE).await? else {
        return Ok(false);
    };
    let msgs: Vec<_> = nl
        .handle()
        .address()
        .get()
        .set_link_index_filter(lo.header.index)
        .set_address_filter(IpAddr::V4(ip))
        .execute()
        .try_collect()
        .await
        .unwrap_or_default();
    let mut removed = false;
    for m in msgs {
        if m.header.prefix_len == 32 {
            nl.handle()
                .address()
                .del(m)
                .execute()
                .await
                .with_context(|| format!("removing {ip} from {DNS_DEVICE}"))?;
            removed = true;
        }
    }
    Ok(removed)
}
