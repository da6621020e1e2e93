//! Connection-tracking entries over ctnetlink (`NFNL_SUBSYS_CTNETLINK`), in the current
//! network namespace: list the entries of one family (IPv4 or IPv6) and delete the ones that
//! match filters of the kind `conntrack -D [-f ipv6] -p udp --orig-dst IP --orig-port-dst PORT
//! --reply-src IP` takes.
//!
//! The service proxy uses it to clear stale UDP flows (as kube-proxy does): flows to a
//! backend that left, and flows that were refused while a port had no endpoint. One dump of
//! the table answers every filter of a sync; each match is then deleted by its original
//! tuple and conntrack id (`IPCTNL_MSG_CT_DELETE`), so an entry that expired or was replaced
//! meanwhile is left alone: the kernel's "no such entry" (ENOENT) is not an error. The kernel
//! cannot filter a delete by tuple fields itself (a delete without a tuple is a flush), which
//! is why the `conntrack` tool works the same way.
//!
//! Messages are encoded and decoded with `netlink-packet-netfilter` (rust-netlink, MIT), on
//! the `netlink-packet-core` the rest of the kernel room uses.

use std::fmt;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, Nla,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
use nix::errno::Errno;
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;

/// `IPPROTO_UDP`.
pub const IPPROTO_UDP: u8 = 17;
/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u8 = 6;

/// `CTA_ID`: the entry's id, so a delete hits the entry that was listed and no other.
const CTA_ID: u16 = 12;
/// `CTA_ZONE`: the entry's zone, needed to find it when it is not zone 0.
const CTA_ZONE: u16 = 18;
/// How many deletes go out in one send before their acknowledgements are read.
const DELETES_PER_SEND: usize = 256;
/// How long one receive may wait for the kernel.
const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// One direction of a connection as conntrack records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CtTuple {
    /// Source address.
    pub src: IpAddr,
    /// Destination address (of the same family).
    pub dst: IpAddr,
    /// IP protocol number.
    pub protocol: u8,
    /// Source port (0 for protocols without ports).
    pub src_port: u16,
    /// Destination port (0 for protocols without ports).
    pub dst_port: u16,
}

impl fmt::Display for CtTuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "proto {} {}:{} -> {}:{}",
            self.protocol, self.src, self.src_port, self.dst, self.dst_port
        )
    }
}

/// One conntrack entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtEntry {
    /// The original direction (as the client sent it, before NAT).
    pub orig: CtTuple,
    /// The reply direction (after DNAT its source is the backend).
    pub reply: CtTuple,
    /// `CTA_ID` and `CTA_ZONE` as the kernel listed them, sent back with a delete.
    ident: Vec<DefaultNla>,
}

impl CtEntry {
    /// An entry known by its tuples only (no id: a delete hits whatever entry has this
    /// original tuple in zone 0).
    pub fn from_tuples(orig: CtTuple, reply: CtTuple) -> CtEntry {
        CtEntry {
            orig,
            reply,
            ident: Vec::new(),
        }
    }
}

/// Which entries a delete removes; every field that is set must match, like the options of
/// `conntrack -D`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CtFilter {
    /// Whether it names IPv6 entries (`-f ipv6`); else IPv4 ones.
    pub ipv6: bool,
    /// IP protocol number (`-p`).
    pub protocol: u8,
    /// Original destination address (`--orig-dst`).
    pub orig_dst: Option<IpAddr>,
    /// Original destination port (`--orig-port-dst`).
    pub orig_dst_port: Option<u16>,
    /// Reply source address (`--reply-src`): the backend a DNATed flow went to.
    pub reply_src: Option<IpAddr>,
}

impl CtFilter {
    /// Every IPv4 UDP entry; narrow it with the other methods.
    pub fn udp() -> CtFilter {
        CtFilter {
            ipv6: false,
            protocol: IPPROTO_UDP,
            orig_dst: None,
            orig_dst_port: None,
            reply_src: None,
        }
    }

    /// Every UDP entry of `ip`'s family.
    pub fn udp_of(ip: IpAddr) -> CtFilter {
        CtFilter {
            ipv6: ip.is_ipv6(),
            ..CtFilter::udp()
        }
    }

    /// Only entries whose original destination is `ip` (of the filter's family).
    pub fn orig_dst(mut self, ip: impl Into<IpAddr>) -> CtFilter {
        let ip = ip.into();
        self.ipv6 = ip.is_ipv6();
        self.orig_dst = Some(ip);
        self
    }

    /// Only entries whose original destination port is `port`.
    pub fn orig_dst_port(mut self, port: u16) -> CtFilter {
        self.orig_dst_port = Some(port);
        self
    }

    /// Only entries whose reply comes from `ip` (of the filter's family).
    pub fn reply_src(mut self, ip: impl Into<IpAddr>) -> CtFilter {
        let ip = ip.into();
        self.ipv6 = ip.is_ipv6();
        self.reply_src = Some(ip);
        self
    }

    /// Whether `e` is one of the entries this filter names.
    pub fn matches(&self, e: &CtEntry) -> bool {
        e.orig.dst.is_ipv6() == self.ipv6
            && e.orig.protocol == self.protocol
            && self.orig_dst.is_none_or(|ip| e.orig.dst == ip)
            && self.orig_dst_port.is_none_or(|p| e.orig.dst_port == p)
            && self.reply_src.is_none_or(|ip| e.reply.src == ip)
    }
}

impl fmt::Display for CtFilter {
    /// The filter as `conntrack` options.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ipv6 {
            write!(f, "-f ipv6 ")?;
        }
        match self.protocol {
            IPPROTO_UDP => write!(f, "-p udp")?,
            IPPROTO_TCP => write!(f, "-p tcp")?,
            p => write!(f, "-p {p}")?,
        }
        if let Some(ip) = self.orig_dst {
            write!(f, " --orig-dst {ip}")?;
        }
        if let Some(p) = self.orig_dst_port {
            write!(f, " --orig-port-dst {p}")?;
        }
        if let Some(ip) = self.reply_src {
            write!(f, " --reply-src {ip}")?;
        }
        Ok(())
    }
}

/// A ctnetlink socket in the current network namespace.
pub struct ConntrackSocket {
    sock: Socket,
    seq: u32,
}

fn header(flags: u16, seq: u32) -> NetlinkHeader {
    let mut h = NetlinkHeader::default();
    h.flags = flags;
    h.sequence_number = seq;
    h
}

fn family(ipv6: bool) -> NetfilterProtoFamily {
    if ipv6 {
        NetfilterProtoFamily::IPv6
    } else {
        NetfilterProtoFamily::IPv4
    }
}

fn serialize(msg: ConntrackMessage, ipv6: bool, flags: u16, seq: u32, out: &mut Vec<u8>) {
    let mut m = NetlinkMessage::new(
        header(flags, seq),
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(family(ipv6), 0, 0),
            msg,
        )),
    );
    m.finalize();
    let at = out.len();
    out.resize(at + m.buffer_len(), 0);
    m.serialize(&mut out[at..]);
}

fn tuple_attrs(t: &CtTuple) -> Vec<Tuple> {
    vec![
        Tuple::Ip(vec![
            IPTuple::SourceAddress(t.src),
            IPTuple::DestinationAddress(t.dst),
        ]),
        Tuple::Proto(vec![
            ProtoTuple::Protocol(t.protocol.into()),
            ProtoTuple::SourcePort(t.src_port),
            ProtoTuple::DestinationPort(t.dst_port),
        ]),
    ]
}

/// The tuple in `attrs`, `None` for an incomplete one or one of mixed families.
fn decode_tuple(attrs: &[Tuple]) -> Option<CtTuple> {
    let (mut src, mut dst, mut protocol) = (None, None, None);
    let (mut src_port, mut dst_port) = (0, 0);
    for a in attrs {
        match a {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::Protocol(n) => protocol = Some(u8::from(*n)),
                        ProtoTuple::SourcePort(n) => src_port = *n,
                        ProtoTuple::DestinationPort(n) => dst_port = *n,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let (src, dst) = (src?, dst?);
    if src.is_ipv6() != dst.is_ipv6() {
        return None;
    }
    Some(CtTuple {
        src,
        dst,
        protocol: protocol?,
        src_port,
        dst_port,
    })
}

/// The entry a dumped message describes (`None` for anything undecodable).
fn decode_entry(attrs: Vec<ConntrackAttribute>) -> Option<CtEntry> {
    let (mut orig, mut reply, mut ident) = (None, None, Vec::new());
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => orig = decode_tuple(&t),
            ConntrackAttribute::CtaTupleReply(t) => reply = decode_tuple(&t),
            ConntrackAttribute::Other(nla) if matches!(nla.kind(), CTA_ID | CTA_ZONE) => {
                ident.push(nla)
            }
            _ => {}
        }
    }
    Some(CtEntry {
        orig: orig?,
        reply: reply?,
        ident,
    })
}

/// The netlink messages in `buf`, each decoded on its own: one that does not decode is
/// skipped (`None`), the rest still count.
fn messages(buf: &[u8]) -> impl Iterator<Item = (u32, Option<NetlinkPayload<NetfilterMessage>>)> {
    let mut off = 0usize;
    std::iter::from_fn(move || {
        let head = buf.get(off..off + 16)?;
        let len = u32::from_ne_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let seq = u32::from_ne_bytes([head[8], head[9], head[10], head[11]]);
        let msg = buf.get(off..off + len).filter(|_| len >= 16)?;
        off += (len + 3) & !3;
        let payload = NetlinkMessage::<NetfilterMessage>::deserialize(msg)
            .ok()
            .map(|m| m.payload);
        Some((seq, payload))
    })
}

impl ConntrackSocket {
    /// Opens the socket.
    pub fn open() -> Result<ConntrackSocket> {
        let mut sock = Socket::new(NETLINK_NETFILTER)
            .context("opening a netfilter netlink socket for conntrack")?;
        sock.bind_auto()
            .context("binding the conntrack netlink socket")?;
        let _ = sock.set_cap_ack(true);
        setsockopt(
            &sock.as_fd(),
            sockopt::ReceiveTimeout,
            &TimeVal::new(RECV_TIMEOUT.as_secs() as i64, 0),
        )
        .context("setting a receive timeout on the conntrack socket")?;
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1);
        Ok(ConntrackSocket { sock, seq })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn recv(&mut self, buf: &mut [u8], what: &str) -> Result<usize> {
        let mut b = &mut buf[..];
        self.sock
            .recv(&mut b, 0)
            .with_context(|| format!("reading the kernel's answer to {what}"))
    }

    /// Every IPv4 entry of this namespace's table (one dump).
    pub fn list(&mut self) -> Result<Vec<CtEntry>> {
        self.list_family(false)
    }

    /// Every entry of one family (IPv6 with `ipv6`) of this namespace's table (one dump: the
    /// kernel filters by the request's family).
    pub fn list_family(&mut self, ipv6: bool) -> Result<Vec<CtEntry>> {
        let seq = self.next_seq();
        let mut req = Vec::with_capacity(64);
        serialize(
            ConntrackMessage::Get(vec![]),
            ipv6,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            &mut req,
        );
        self.sock
            .send(&req, 0)
            .context("asking the kernel for its conntrack entries")?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let len = self.recv(&mut buf, "a conntrack dump")?;
            for (mseq, payload) in messages(&buf[..len]) {
                if mseq != seq {
                    continue;
                }
                match payload {
                    Some(NetlinkPayload::Done(_)) => return Ok(out),
                    Some(NetlinkPayload::Error(e)) if e.code.is_some() => {
                        bail!(
                            "the kernel refused to list conntrack entries: {}",
                            Errno::from_raw(-e.raw_code())
                        )
                    }
                    Some(NetlinkPayload::InnerMessage(NetfilterMessage {
                        inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)),
                        ..
                    })) => out.extend(decode_entry(attrs)),
                    _ => {}
                }
            }
        }
    }

    /// Deletes `entries` (each by its original tuple, and its id and zone when it was
    /// listed); returns how many the kernel deleted. Entries already gone are skipped; the
    /// first other refusal fails the call after every delete was tried.
    pub fn delete(&mut self, entries: &[CtEntry]) -> Result<usize> {
        let mut deleted = 0;
        let mut failures: Vec<String> = Vec::new();
        for chunk in entries.chunks(DELETES_PER_SEND) {
            let first = self.seq.wrapping_add(1);
            let mut req = Vec::with_capacity(chunk.len() * 96);
            for e in chunk {
                let mut attrs = vec![ConntrackAttribute::CtaTupleOrig(tuple_attrs(&e.orig))];
                attrs.extend(e.ident.iter().cloned().map(ConntrackAttribute::Other));
                let seq = self.next_seq();
                serialize(
                    ConntrackMessage::Delete(attrs),
                    e.orig.dst.is_ipv6(),
                    NLM_F_REQUEST | NLM_F_ACK,
                    seq,
                    &mut req,
                );
            }
            self.sock
                .send(&req, 0)
                .with_context(|| format!("sending {} conntrack deletes", chunk.len()))?;
            let mut pending = chunk.len();
            let mut buf = vec![0u8; 1 << 16];
            while pending > 0 {
                let len = self.recv(&mut buf, "conntrack deletes")?;
                for (mseq, payload) in messages(&buf[..len]) {
                    let idx = mseq.wrapping_sub(first) as usize;
                    let Some(NetlinkPayload::Error(ack)) = payload else {
                        continue;
                    };
                    let Some(e) = chunk.get(idx) else {
                        continue;
                    };
                    pending -= 1;
                    match ack.code.map(|c| Errno::from_raw(-c.get())) {
                        None => deleted += 1,
                        Some(Errno::ENOENT) => {}
                        Some(errno) => failures.push(format!("{}: {errno}", e.orig)),
                    }
                }
            }
        }
        if let Some(first) = failures.first() {
            bail!(
                "the kernel refused {} of {} conntrack deletes, first {first}",
                failures.len(),
                entries.len()
            );
        }
        Ok(deleted)
    }

    /// Deletes every entry that matches any of `filters` (one dump per family the filters
    /// name, then the deletes); returns how many were deleted.
    pub fn delete_matching(&mut self, filters: &[CtFilter]) -> Result<usize> {
        if filters.is_empty() {
            return Ok(0);
        }
        let mut doomed: Vec<CtEntry> = Vec::new();
        for ipv6 in [false, true] {
            if !filters.iter().any(|f| f.ipv6 == ipv6) {
                continue;
            }
            doomed.extend(
                self.list_family(ipv6)?
                    .into_iter()
                    .filter(|e| filters.iter().any(|f| f.matches(e))),
            );
        }
        self.delete(&doomed).with_context(|| {
            let names: Vec<String> = filters.iter().map(ToString::to_string).collect();
            format!("deleting conntrack entries matching [{}]", names.join("; "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(src: &str, sport: u16, dst: &str, dport: u16) -> CtTuple {
        CtTuple {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: IPPROTO_UDP,
            src_port: sport,
            dst_port: dport,
        }
    }

    fn dnat(vip: &str, backend: &str) -> CtEntry {
        CtEntry::from_tuples(
            tuple("10.244.0.5", 40000, vip, 53),
            tuple(backend, 5353, "10.244.0.5", 40000),
        )
    }

    #[test]
    fn filters_match_like_conntrack_options() {
        let e = dnat("10.96.0.10", "10.244.1.10");
        let vip: IpAddr = "10.96.0.10".parse().unwrap();
        let be: IpAddr = "10.244.1.10".parse().unwrap();
        assert!(CtFilter::udp().matches(&e));
        assert!(
            CtFilter::udp()
                .orig_dst(vip)
                .orig_dst_port(53)
                .reply_src(be)
                .matches(&e)
        );
        assert!(CtFilter::udp().orig_dst_port(53).reply_src(be).matches(&e));
        assert!(!CtFilter::udp().orig_dst_port(54).matches(&e));
        assert!(
            !CtFilter::udp()
                .orig_dst("10.96.0.11".parse::<IpAddr>().unwrap())
                .matches(&e)
        );
        assert!(!CtFilter::udp().reply_src(vip).matches(&e));
        let tcp = CtFilter {
            protocol: IPPROTO_TCP,
            ..CtFilter::udp()
        };
        assert!(!tcp.matches(&e));
        assert_eq!(
            CtFilter::udp()
                .orig_dst(vip)
                .orig_dst_port(53)
                .reply_src(be)
                .to_string(),
            "-p udp --orig-dst 10.96.0.10 --orig-port-dst 53 --reply-src 10.244.1.10"
        );
    }

    #[test]
    fn a_delete_encodes_the_original_tuple_and_decodes_back() {
        let e = dnat("10.96.0.10", "10.244.1.10");
        let mut buf = Vec::new();
        serialize(
            ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(tuple_attrs(&e.orig))]),
            false,
            NLM_F_REQUEST | NLM_F_ACK,
            7,
            &mut buf,
        );
        // nlmsghdr: length, type = CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE.
        assert_eq!(
            u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize,
            buf.len()
        );
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), (1 << 8) | 2);
        let got: Vec<_> = messages(&buf).collect();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 7);
        let Some(NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::Conntrack(ConntrackMessage::Delete(attrs)),
            ..
        })) = got[0].1.clone()
        else {
            panic!("not a conntrack delete: {:?}", got[0].1)
        };
        let ConntrackAttribute::CtaTupleOrig(t) = &attrs[0] else {
            panic!("{attrs:?}")
        };
        assert_eq!(decode_tuple(t), Some(e.orig));
    }

    #[test]
    fn a_truncated_message_ends_the_walk_and_earlier_ones_count() {
        let mut buf = Vec::new();
        serialize(
            ConntrackMessage::Get(vec![]),
            false,
            NLM_F_REQUEST,
            1,
            &mut buf,
        );
        let one = buf.len();
        serialize(
            ConntrackMessage::Get(vec![]),
            false,
            NLM_F_REQUEST,
            2,
            &mut buf,
        );
        buf[one..one + 4].copy_from_slice(&1000u32.to_ne_bytes());
        let got: Vec<u32> = messages(&buf).map(|(seq, _)| seq).collect();
        assert_eq!(got, [1]);
    }

    #[test]
    fn dumped_entries_keep_id_and_zone_and_decode_either_family() {
        let e = dnat("10.96.0.10", "10.244.1.10");
        let id = DefaultNla::new(CTA_ID, 42u32.to_be_bytes().to_vec());
        let attrs = vec![
            ConntrackAttribute::CtaTupleOrig(tuple_attrs(&e.orig)),
            ConntrackAttribute::CtaTupleReply(tuple_attrs(&e.reply)),
            ConntrackAttribute::CtaTimeout(30),
            ConntrackAttribute::Other(id.clone()),
        ];
        let got = decode_entry(attrs).unwrap();
        assert_eq!((got.orig, got.reply), (e.orig, e.reply));
        assert_eq!(got.ident, [id]);
        // IPv6 entries decode and match IPv6 filters only.
        let e6 = CtEntry::from_tuples(
            tuple("fd00:10:244::5", 40000, "fd00:96::a", 53),
            tuple("fd00:10:244:1::a", 5353, "fd00:10:244::5", 40000),
        );
        let got6 = decode_entry(vec![
            ConntrackAttribute::CtaTupleOrig(tuple_attrs(&e6.orig)),
            ConntrackAttribute::CtaTupleReply(tuple_attrs(&e6.reply)),
        ])
        .unwrap();
        assert_eq!(got6.orig, e6.orig);
        let vip6: IpAddr = "fd00:96::a".parse().unwrap();
        assert!(
            CtFilter::udp()
                .orig_dst(vip6)
                .orig_dst_port(53)
                .matches(&got6)
        );
        assert!(CtFilter::udp_of(vip6).orig_dst_port(53).matches(&got6));
        assert!(
            !CtFilter::udp().orig_dst_port(53).matches(&got6),
            "an IPv4 filter"
        );
        assert!(!CtFilter::udp_of(vip6).matches(&e), "an IPv6 filter");
        assert_eq!(
            CtFilter::udp_of(vip6).orig_dst_port(30053).to_string(),
            "-f ipv6 -p udp --orig-port-dst 30053"
        );
        // Incomplete or of mixed families: skipped.
        let v6 = vec![Tuple::Ip(vec![
            IPTuple::SourceAddress("fd00::1".parse().unwrap()),
            IPTuple::DestinationAddress("fd00::2".parse().unwrap()),
        ])];
        assert_eq!(
            decode_entry(vec![
                ConntrackAttribute::CtaTupleOrig(v6.clone()),
                ConntrackAttribute::CtaTupleReply(v6),
            ]),
            None
        );
        let mixed = vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress("fd00::1".parse().unwrap()),
                IPTuple::DestinationAddress("10.0.0.1".parse().unwrap()),
            ]),
            Tuple::Proto(vec![ProtoTuple::Protocol(IPPROTO_UDP.into())]),
        ];
        assert_eq!(decode_tuple(&mixed), None);
    }
}
