//! Set and map elements of nf_tables, written straight to the kernel over netlink.
//!
//! The service table's structure (sets, maps, chains, rules) is small and loaded with `nft -f`;
//! its elements (tens of thousands) are what scale, and `nft` parses them slowly and with a lot
//! of memory (≈0.5 s and ≈140 MB for 60,000 elements on the reference machine). This module
//! encodes element additions, deletions and set flushes as one nfnetlink batch, which the
//! kernel applies as a single transaction: all or nothing.
//!
//! Keys and data are given as the raw register bytes the rules compare against: every
//! component of a concatenation occupies a multiple of 4 bytes (see [`KeyBuilder`]).

mod dump;

pub use dump::{DumpProgress, DumpedElement, parse_dump};

use std::os::fd::AsFd;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
use nix::sys::socket::{setsockopt, sockopt};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 0x2;
const NLA_F_NESTED: u16 = 0x8000;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

/// `NFT_JUMP` as the kernel encodes it.
const NFT_JUMP: i32 = -3;
/// `NFT_GOTO` as the kernel encodes it.
const NFT_GOTO: i32 = -4;

/// Address family of the table (`NFPROTO_IPV4`).
pub const NFPROTO_IPV4: u8 = 2;
/// Address family of an `ip6` table.
pub const NFPROTO_IPV6: u8 = 10;

/// Largest payload per NEWSETELEM/DELSETELEM message; a batch holds as many as needed.
const MAX_MSG: usize = 60 * 1024;

/// The data an element maps to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ElemData {
    /// A plain set element.
    None,
    /// Raw value bytes (e.g. `ip daddr . th dport` for a dnat map).
    Value(Vec<u8>),
    /// `goto CHAIN` in a verdict map.
    Goto(String),
    /// `jump CHAIN` in a verdict map.
    Jump(String),
}

/// One change to one set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetOp {
    /// Remove every element of the set.
    Flush,
    /// Add these elements (key, data).
    Add(Vec<(Vec<u8>, ElemData)>),
    /// Delete these keys.
    Delete(Vec<Vec<u8>>),
}

/// Builds concatenated keys in register layout: each part padded to 4 bytes.
#[derive(Debug, Default, Clone)]
pub struct KeyBuilder(Vec<u8>);

impl KeyBuilder {
    /// An empty key.
    pub fn new() -> Self {
        KeyBuilder(Vec::with_capacity(16))
    }
    fn pad(mut self) -> Self {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        self
    }
    /// An IPv4 address (network byte order, 4 bytes).
    pub fn ipv4(mut self, a: std::net::Ipv4Addr) -> Self {
        self.0.extend_from_slice(&a.octets());
        self
    }
    /// An address of either family (4 or 16 bytes, network byte order).
    pub fn ip(mut self, a: std::net::IpAddr) -> Self {
        match a {
            std::net::IpAddr::V4(v4) => self.0.extend_from_slice(&v4.octets()),
            std::net::IpAddr::V6(v6) => self.0.extend_from_slice(&v6.octets()),
        }
        self
    }
    /// A transport port (`th dport`, big endian, padded to 4).
    pub fn port(mut self, p: u16) -> Self {
        self.0.extend_from_slice(&p.to_be_bytes());
        self.pad()
    }
    /// An IP protocol number (`meta l4proto`, 1 byte, padded to 4).
    pub fn proto(mut self, p: u8) -> Self {
        self.0.push(p);
        self.pad()
    }
    /// A `numgen`/integer value in host byte order (4 bytes).
    pub fn u32_host(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    /// The bytes.
    pub fn build(self) -> Vec<u8> {
        self.0
    }
}

fn put_u16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_ne_bytes());
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_ne_bytes());
}

fn align4(b: &mut Vec<u8>) {
    while !b.len().is_multiple_of(4) {
        b.push(0);
    }
}

/// Appends an attribute with a payload.
fn attr(b: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    put_u16(b, (4 + payload.len()) as u16);
    put_u16(b, kind);
    b.extend_from_slice(payload);
    align4(b);
}

/// Starts a nested attribute; returns its offset for [`nest_end`].
fn nest_start(b: &mut Vec<u8>, kind: u16) -> usize {
    let at = b.len();
    put_u16(b, 0);
    put_u16(b, kind | NLA_F_NESTED);
    at
}

fn nest_end(b: &mut [u8], at: usize) {
    let len = (b.len() - at) as u16;
    b[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Appends one netlink message (header + nfgenmsg + attributes from `body`).
fn message(
    buf: &mut Vec<u8>,
    msg_type: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    body: &[u8],
) {
    let len = 16 + 4 + body.len();
    put_u32(buf, len as u32);
    put_u16(buf, msg_type);
    put_u16(buf, flags);
    put_u32(buf, seq);
    put_u32(buf, 0);
    buf.push(family);
    buf.push(0); // NFNETLINK_V0
    buf.extend_from_slice(&res_id.to_be_bytes());
    buf.extend_from_slice(body);
    align4(buf);
}

fn elem_bytes(key: &[u8], data: &ElemData) -> Vec<u8> {
    let mut e = Vec::with_capacity(key.len() + 32);
    let k = nest_start(&mut e, NFTA_SET_ELEM_KEY);
    attr(&mut e, NFTA_DATA_VALUE, key);
    nest_end(&mut e, k);
    match data {
        ElemData::None => {}
        ElemData::Value(v) => {
            let d = nest_start(&mut e, NFTA_SET_ELEM_DATA);
            attr(&mut e, NFTA_DATA_VALUE, v);
            nest_end(&mut e, d);
        }
        ElemData::Goto(chain) | ElemData::Jump(chain) => {
            let code = if matches!(data, ElemData::Goto(_)) {
                NFT_GOTO
            } else {
                NFT_JUMP
            };
            let d = nest_start(&mut e, NFTA_SET_ELEM_DATA);
            let v = nest_start(&mut e, NFTA_DATA_VERDICT);
            attr(&mut e, NFTA_VERDICT_CODE, &code.to_be_bytes());
            attr(&mut e, NFTA_VERDICT_CHAIN, &cstr(chain));
            nest_end(&mut e, v);
            nest_end(&mut e, d);
        }
    }
    e
}

/// One nfnetlink batch under construction.
struct Batch {
    buf: Vec<u8>,
    seq: u32,
    first_seq: u32,
    messages: u32,
    family: u8,
    table: String,
}

impl Batch {
    fn new(family: u8, table: &str, seq: u32) -> Batch {
        let mut buf = Vec::with_capacity(64 * 1024);
        message(
            &mut buf,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            seq,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        Batch {
            buf,
            seq: seq + 1,
            first_seq: seq + 1,
            messages: 0,
            family,
            table: table.to_string(),
        }
    }

    fn header_attrs(&self, set: &str) -> Vec<u8> {
        let mut b = Vec::with_capacity(MAX_MSG + 1024);
        attr(&mut b, NFTA_SET_ELEM_LIST_TABLE, &cstr(&self.table));
        attr(&mut b, NFTA_SET_ELEM_LIST_SET, &cstr(set));
        b
    }

    fn push(&mut self, msg_type: u16, flags: u16, body: &[u8]) {
        message(
            &mut self.buf,
            (NFNL_SUBSYS_NFTABLES << 8) | msg_type,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            self.seq,
            self.family,
            0,
            body,
        );
        self.seq += 1;
        self.messages += 1;
    }

    fn flush(&mut self, set: &str) {
        let body = self.header_attrs(set);
        self.push(NFT_MSG_DELSETELEM, 0, &body);
    }

    fn elements<'a>(
        &mut self,
        set: &str,
        msg_type: u16,
        flags: u16,
        elems: impl Iterator<Item = Vec<u8>> + 'a,
    ) {
        let mut body = self.header_attrs(set);
        let mut list = nest_start(&mut body, NFTA_SET_ELEM_LIST_ELEMENTS);
        let mut count = 0;
        for e in elems {
            if count > 0 && body.len() + e.len() + 8 > MAX_MSG {
                nest_end(&mut body, list);
                self.push(msg_type, flags, &body);
                body = self.header_attrs(set);
                list = nest_start(&mut body, NFTA_SET_ELEM_LIST_ELEMENTS);
                count = 0;
            }
            let item = nest_start(&mut body, NFTA_LIST_ELEM);
            body.extend_from_slice(&e);
            nest_end(&mut body, item);
            count += 1;
        }
        if count > 0 {
            nest_end(&mut body, list);
            self.push(msg_type, flags, &body);
        }
    }

    fn finish(mut self) -> (Vec<u8>, u32, u32) {
        let seq = self.seq;
        message(
            &mut self.buf,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            seq,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        (self.buf, self.first_seq, self.messages)
    }
}

/// One nfnetlink batch, encoded: begin, the element messages, end.
#[derive(Debug, Clone)]
pub struct EncodedBatch {
    /// The bytes, as one send.
    pub buf: Vec<u8>,
    /// Sequence number of the first element message (acknowledgements are matched by it).
    pub first_seq: u32,
    /// Element messages (between begin and end).
    pub messages: u32,
    /// Elements added plus deleted.
    pub elements: usize,
}

/// Encodes `ops` on `family`/`table` as one batch whose begin message has sequence number
/// `seq` (see [`NftSocket::apply`] for the order of operations).
pub fn encode_batch(family: u8, table: &str, ops: &[(String, SetOp)], seq: u32) -> EncodedBatch {
    let mut batch = Batch::new(family, table, seq);
    let mut elements = 0usize;
    for (set, op) in ops {
        match op {
            SetOp::Flush => batch.flush(set),
            SetOp::Delete(keys) => {
                elements += keys.len();
                batch.elements(
                    set,
                    NFT_MSG_DELSETELEM,
                    0,
                    keys.iter().map(|k| elem_bytes(k, &ElemData::None)),
                )
            }
            SetOp::Add(elems) => {
                elements += elems.len();
                batch.elements(
                    set,
                    NFT_MSG_NEWSETELEM,
                    NLM_F_CREATE,
                    elems.iter().map(|(k, d)| elem_bytes(k, d)),
                )
            }
        }
    }
    let (buf, first_seq, messages) = batch.finish();
    EncodedBatch {
        buf,
        first_seq,
        messages,
        elements,
    }
}

/// A netfilter netlink socket in the current network namespace.
pub struct NftSocket {
    sock: Socket,
    seq: u32,
}

impl NftSocket {
    /// Opens the socket with buffers large enough for big batches.
    pub fn open() -> Result<NftSocket> {
        let mut sock =
            Socket::new(NETLINK_NETFILTER).context("opening a netfilter netlink socket")?;
        sock.bind_auto()
            .context("binding the netfilter netlink socket")?;
        // Root may exceed the sysctl limits; fall back to the ordinary option otherwise.
        let big = 64 * 1024 * 1024;
        if setsockopt(&sock.as_fd(), sockopt::SndBufForce, &big).is_err() {
            let _ = setsockopt(&sock.as_fd(), sockopt::SndBuf, &big);
        }
        if setsockopt(&sock.as_fd(), sockopt::RcvBufForce, &(8 * 1024 * 1024)).is_err() {
            let _ = setsockopt(&sock.as_fd(), sockopt::RcvBuf, &(8 * 1024 * 1024));
        }
        let _ = sock.set_cap_ack(true);
        let _ = sock.set_ext_ack(true);
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1);
        Ok(NftSocket { sock, seq })
    }

    /// Applies every operation as one transaction on `family`/`table`. Per set, the operations
    /// run in order (flush, deletes, adds as given). Fails, changing nothing, when any of them
    /// is rejected (for instance deleting an element that is not there).
    pub fn apply(&mut self, family: u8, table: &str, ops: &[(String, SetOp)]) -> Result<usize> {
        let batch = encode_batch(family, table, ops, self.seq);
        if batch.messages == 0 {
            return Ok(0);
        }
        self.seq = batch.first_seq + batch.messages + 2;
        self.send_batch(&batch)?;
        Ok(batch.elements)
    }

    /// Sends an encoded batch and waits until the kernel acknowledged every message of it.
    pub fn send_batch(&mut self, batch: &EncodedBatch) -> Result<()> {
        self.sock
            .send(&batch.buf, 0)
            .with_context(|| format!("sending a {} byte nftables batch", batch.buf.len()))?;
        self.wait_acks(batch.first_seq, batch.messages)
    }

    /// Reads acknowledgements until every message of the batch is answered or one failed.
    fn wait_acks(&mut self, first: u32, n: u32) -> Result<()> {
        let mut pending = n;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut buf = vec![0u8; 1 << 16];
        while pending > 0 {
            if std::time::Instant::now() > deadline {
                bail!("nftables batch: no answer from the kernel");
            }
            let mut b = &mut buf[..];
            let len = self
                .sock
                .recv(&mut b, 0)
                .context("reading nftables acknowledgements")?;
            let mut off = 0;
            while off + 16 <= len {
                let mlen =
                    u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or([0; 4])) as usize;
                let mtype = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
                let seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap_or([0; 4]));
                if mlen < 16 || off + mlen > len {
                    break;
                }
                if mtype == NLMSG_ERROR && mlen >= 20 && seq >= first && seq < first + n {
                    let code =
                        i32::from_ne_bytes(buf[off + 16..off + 20].try_into().unwrap_or([0; 4]));
                    if code != 0 {
                        let idx = seq - first;
                        bail!(
                            "the kernel rejected nftables batch message {} of {n}: {}",
                            idx + 1,
                            nix::errno::Errno::from_raw(-code)
                        );
                    }
                    pending -= 1;
                }
                off += (mlen + 3) & !3;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_register_aligned() {
        let k = KeyBuilder::new()
            .ipv4("10.96.0.10".parse().unwrap())
            .proto(6)
            .port(80)
            .u32_host(3)
            .build();
        assert_eq!(k.len(), 16);
        assert_eq!(&k[0..4], &[10, 96, 0, 10]);
        assert_eq!(&k[4..8], &[6, 0, 0, 0]);
        assert_eq!(&k[8..12], &[0, 80, 0, 0]);
        assert_eq!(&k[12..16], &3u32.to_ne_bytes());
    }

    #[test]
    fn batch_framing() {
        let mut b = Batch::new(NFPROTO_IPV4, "t", 100);
        b.elements(
            "s",
            NFT_MSG_NEWSETELEM,
            NLM_F_CREATE,
            (0..10_000u32).map(|i| elem_bytes(&i.to_be_bytes(), &ElemData::Goto("c".into()))),
        );
        let (buf, first, n) = b.finish();
        assert_eq!(first, 101);
        assert!(n > 1, "large element lists are split over several messages");
        // Walk the messages: lengths chain exactly to the end.
        let mut off = 0;
        let mut count = 0;
        while off < buf.len() {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
            assert!(len >= 20);
            off += (len + 3) & !3;
            count += 1;
        }
        assert_eq!(off, buf.len());
        assert_eq!(count, n + 2);
    }
}
