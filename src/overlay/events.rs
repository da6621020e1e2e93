//! Routing notifications the overlay reconciler listens to (link, neighbour, address and
//! route changes), filtered in the kernel to what it acts on, behind the [`KernelEvents`]
//! seam (tests feed the reconciler hand-made changes instead).

use std::future::Future;

use anyhow::{Context, Result};
use futures::StreamExt;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::route::RouteAttribute;
use netlink_sys::AsyncSocket;

/// Multicast groups for link, neighbour, IPv4 address and IPv4 route notifications.
pub const RTMGRP_OVERLAY: u32 = 1 | 4 | 0x10 | 0x40;

/// A stream of multicast routing notifications (link, neighbour, address, route changes).
pub struct NetlinkEvents {
    rx: futures::channel::mpsc::UnboundedReceiver<(
        NetlinkMessage<RouteNetlinkMessage>,
        netlink_sys::SocketAddr,
    )>,
    /// The subscribed socket (a duplicate descriptor), for [`NetlinkEvents::focus`].
    sock: std::os::fd::OwnedFd,
    /// The groups subscribed to (for [`KernelEvents::resubscribe`]).
    groups: u32,
}

/// Where the overlay reconciler hears of kernel changes. Implemented by [`NetlinkEvents`]
/// and, in tests, by a channel of hand-made changes.
pub trait KernelEvents: Send {
    /// Waits for the next change; `None` when the source has ended (then
    /// [`KernelEvents::resubscribe`]). Cancel-safe: nothing is lost when the wait is dropped.
    fn next(&mut self) -> impl Future<Output = Option<KernelChange>> + Send;
    /// Lets the source drop changes about interfaces other than `indexes` (and additions)
    /// before they are delivered; a hint, the reconciler still checks each change.
    fn focus(&mut self, indexes: &[u32]) -> Result<()>;
    /// Starts over after the source ended (unfiltered again).
    fn resubscribe(&mut self) -> Result<()>;
}

impl KernelEvents for NetlinkEvents {
    async fn next(&mut self) -> Option<KernelChange> {
        NetlinkEvents::next(self).await
    }

    fn focus(&mut self, indexes: &[u32]) -> Result<()> {
        NetlinkEvents::focus(self, indexes)
    }

    fn resubscribe(&mut self) -> Result<()> {
        *self = NetlinkEvents::subscribe(self.groups)?;
        Ok(())
    }
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
        Ok(NetlinkEvents { rx, sock, groups })
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
