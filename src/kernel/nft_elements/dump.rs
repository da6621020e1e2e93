//! Reading set elements back from the kernel: one `NFT_MSG_GETSETELEM` dump per set, decoded
//! into keys, data and per-element counters. Replaces listing with `nft` and parsing its text
//! or JSON: the bytes are the same register layout [`super::KeyBuilder`] writes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{
    NFNL_SUBSYS_NFTABLES, NFTA_DATA_VALUE, NFTA_DATA_VERDICT, NFTA_LIST_ELEM, NFTA_SET_ELEM_DATA,
    NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_LIST_ELEMENTS, NFTA_SET_ELEM_LIST_SET,
    NFTA_SET_ELEM_LIST_TABLE, NLM_F_REQUEST, NLMSG_ERROR, NftSocket, attr, cstr, message,
};

const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_DONE: u16 = 3;
const NFTA_SET_ELEM_EXPR: u16 = 7;
const NFTA_SET_ELEM_EXPRESSIONS: u16 = 11;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
/// Attribute type bits that are flags (nested, byte order), not the type.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// One element as the kernel holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DumpedElement {
    /// Key bytes (register layout).
    pub key: Vec<u8>,
    /// Data bytes of a map element (`None` for set elements and verdicts).
    pub data: Option<Vec<u8>>,
    /// The element's counter, when the set counts: (packets, bytes).
    pub counter: Option<(u64, u64)>,
}

/// Netlink attributes in `b`: (type without flag bits, payload). Stops at the first
/// malformed one (too short or running past the end), never reads out of bounds.
fn attrs(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0usize;
    std::iter::from_fn(move || {
        let head = b.get(off..off + 4)?;
        let len = u16::from_ne_bytes([head[0], head[1]]) as usize;
        let kind = u16::from_ne_bytes([head[2], head[3]]) & NLA_TYPE_MASK;
        if len < 4 {
            return None;
        }
        let payload = b.get(off + 4..off + len)?;
        off += (len + 3) & !3;
        Some((kind, payload))
    })
}

fn find(b: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(b).find(|(k, _)| *k == kind).map(|(_, p)| p)
}

fn be64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

/// The counter of one expression (`NFTA_EXPR_NAME` "counter"), if it is one.
fn counter_of(expr: &[u8]) -> Option<(u64, u64)> {
    let name = find(expr, NFTA_EXPR_NAME)?;
    if name.split(|c| *c == 0).next()? != b"counter" {
        return None;
    }
    let data = find(expr, NFTA_EXPR_DATA)?;
    Some((
        find(data, NFTA_COUNTER_PACKETS).and_then(be64)?,
        find(data, NFTA_COUNTER_BYTES).and_then(be64)?,
    ))
}

fn element(e: &[u8]) -> Option<DumpedElement> {
    let key = find(find(e, NFTA_SET_ELEM_KEY)?, NFTA_DATA_VALUE)?.to_vec();
    let data = find(e, NFTA_SET_ELEM_DATA).and_then(|d| {
        if find(d, NFTA_DATA_VERDICT).is_some() {
            None
        } else {
            find(d, NFTA_DATA_VALUE).map(<[u8]>::to_vec)
        }
    });
    let counter = find(e, NFTA_SET_ELEM_EXPR)
        .and_then(counter_of)
        .or_else(|| {
            attrs(find(e, NFTA_SET_ELEM_EXPRESSIONS)?)
                .filter(|(k, _)| *k == NFTA_LIST_ELEM)
                .find_map(|(_, x)| counter_of(x))
        });
    Some(DumpedElement { key, data, counter })
}

/// What one buffer of a dump said.
#[derive(Debug, PartialEq, Eq)]
pub enum DumpProgress {
    /// More messages follow.
    More,
    /// The dump is complete.
    Done,
}

/// Decodes the netlink messages in `buf` that answer dump `seq`, appending their elements to
/// `out`. Messages of other sequence numbers are skipped; undecodable elements are left out.
/// Fails on a netlink error answer (e.g. no such set).
pub fn parse_dump(buf: &[u8], seq: u32, out: &mut Vec<DumpedElement>) -> Result<DumpProgress> {
    let mut off = 0usize;
    while let Some(h) = buf.get(off..off + 16) {
        let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let kind = u16::from_ne_bytes([h[4], h[5]]);
        let mseq = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
        if len < 16 {
            bail!("malformed netlink message (length {len})");
        }
        let Some(msg) = buf.get(off..off + len) else {
            bail!(
                "truncated netlink message ({len} bytes, {} left)",
                buf.len() - off
            );
        };
        off += (len + 3) & !3;
        if mseq != seq {
            continue;
        }
        match kind {
            NLMSG_DONE => return Ok(DumpProgress::Done),
            NLMSG_ERROR => {
                let code = msg
                    .get(16..20)
                    .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                    .unwrap_or(0);
                if code != 0 {
                    bail!(
                        "the kernel refused the element dump: {}",
                        nix::errno::Errno::from_raw(-code)
                    );
                }
            }
            k if k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM => {
                // Header (16) + nfgenmsg (4), then the attributes.
                let body = msg.get(20..).unwrap_or_default();
                if let Some(list) = find(body, NFTA_SET_ELEM_LIST_ELEMENTS) {
                    out.extend(
                        attrs(list)
                            .filter(|(k, _)| *k == NFTA_LIST_ELEM)
                            .filter_map(|(_, e)| element(e)),
                    );
                }
            }
            _ => {}
        }
    }
    Ok(DumpProgress::More)
}

impl NftSocket {
    /// Every element of set or map `set` of `family`/`table`, with keys, data and counters.
    pub fn dump_elements(
        &mut self,
        family: u8,
        table: &str,
        set: &str,
    ) -> Result<Vec<DumpedElement>> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut body = Vec::new();
        attr(&mut body, NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
        attr(&mut body, NFTA_SET_ELEM_LIST_SET, &cstr(set));
        let mut req = Vec::new();
        message(
            &mut req,
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            family,
            0,
            &body,
        );
        self.sock
            .send(&req, 0)
            .with_context(|| format!("asking the kernel for the elements of {table} {set}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            if Instant::now() > deadline {
                bail!("dumping {table} {set}: no end of the dump from the kernel");
            }
            let mut b = &mut buf[..];
            let n = self
                .sock
                .recv(&mut b, 0)
                .with_context(|| format!("reading the elements of {table} {set}"))?;
            let got = buf.get(..n).unwrap_or_default();
            if parse_dump(got, seq, &mut out).with_context(|| format!("dumping {table} {set}"))?
                == DumpProgress::Done
            {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::nft_elements::{nest_end, nest_start};
    use proptest::prelude::*;

    fn header(buf: &mut Vec<u8>, kind: u16, seq: u32, body: &[u8]) {
        let len = 16 + body.len();
        buf.extend_from_slice(&(len as u32).to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&0u16.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(body);
        while !buf.len().is_multiple_of(4) {
            buf.push(0);
        }
    }

    /// One NEWSETELEM message with an element (key, data, counter) as the kernel sends it.
    fn elem_message(seq: u32, key: &[u8], data: &[u8], packets: u64, bytes: u64) -> Vec<u8> {
        let mut body = vec![2, 0, 0, 0]; // nfgenmsg
        attr(&mut body, NFTA_SET_ELEM_LIST_TABLE, &cstr("t"));
        attr(&mut body, NFTA_SET_ELEM_LIST_SET, &cstr("backends"));
        let l = nest_start(&mut body, NFTA_SET_ELEM_LIST_ELEMENTS);
        let e = nest_start(&mut body, NFTA_LIST_ELEM);
        let k = nest_start(&mut body, NFTA_SET_ELEM_KEY);
        attr(&mut body, NFTA_DATA_VALUE, key);
        nest_end(&mut body, k);
        let d = nest_start(&mut body, NFTA_SET_ELEM_DATA);
        attr(&mut body, NFTA_DATA_VALUE, data);
        nest_end(&mut body, d);
        let x = nest_start(&mut body, NFTA_SET_ELEM_EXPR);
        attr(&mut body, NFTA_EXPR_NAME, &cstr("counter"));
        let xd = nest_start(&mut body, NFTA_EXPR_DATA);
        attr(&mut body, NFTA_COUNTER_BYTES, &bytes.to_be_bytes());
        attr(&mut body, NFTA_COUNTER_PACKETS, &packets.to_be_bytes());
        nest_end(&mut body, xd);
        nest_end(&mut body, x);
        nest_end(&mut body, e);
        nest_end(&mut body, l);
        let mut buf = Vec::new();
        header(
            &mut buf,
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM,
            seq,
            &body,
        );
        buf
    }

    #[test]
    fn elements_with_counters_are_decoded_and_the_dump_ends_at_done() {
        let key = [10, 96, 0, 10, 6, 0, 0, 0, 0, 80, 0, 0, 3, 0, 0, 0];
        let data = [10, 244, 1, 2, 0x1f, 0x90, 0, 0];
        let mut buf = elem_message(7, &key, &data, 5, 300);
        // Another dump's message in between is ignored.
        buf.extend(elem_message(8, &key, &data, 1, 1));
        let mut out = Vec::new();
        assert_eq!(parse_dump(&buf, 7, &mut out).unwrap(), DumpProgress::More);
        header(&mut buf, NLMSG_DONE, 7, &[0, 0, 0, 0]);
        out.clear();
        assert_eq!(parse_dump(&buf, 7, &mut out).unwrap(), DumpProgress::Done);
        assert_eq!(
            out,
            [DumpedElement {
                key: key.to_vec(),
                data: Some(data.to_vec()),
                counter: Some((5, 300)),
            }]
        );
    }

    #[test]
    fn a_netlink_error_is_reported() {
        let mut buf = Vec::new();
        let mut body = (-2i32).to_ne_bytes().to_vec();
        body.extend([0u8; 16]);
        header(&mut buf, NLMSG_ERROR, 3, &body);
        let e = parse_dump(&buf, 3, &mut Vec::new()).unwrap_err();
        assert!(format!("{e:#}").contains("ENOENT"), "{e:#}");
    }

    proptest! {
        #![proptest_config(crate::util::proptest_support::config())]
        /// Arbitrary bytes, and valid dumps cut or corrupted anywhere: an error or elements,
        /// never a panic or an out-of-bounds read.
        #[test]
        fn the_decoder_never_panics(
            junk in proptest::collection::vec(any::<u8>(), 0..512),
            cut in 0usize..200,
            flip in 0usize..200,
            byte in any::<u8>(),
        ) {
            let _ = parse_dump(&junk, 0, &mut Vec::new());
            let mut m = elem_message(1, &[1, 2, 3, 4], &[5, 6, 7, 8], 1, 2);
            if flip < m.len() {
                m[flip] = byte;
            }
            m.truncate(cut.min(m.len()));
            let _ = parse_dump(&m, 1, &mut Vec::new());
        }
    }
}
