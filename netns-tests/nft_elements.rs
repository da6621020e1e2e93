//! The raw netlink element writer against the real kernel: what it writes must read back
//! through `nft` exactly as if `nft` had written it.

use anyhow::{Result, ensure};
use tartan::kernel::nft_elements::{ElemData, KeyBuilder, NFPROTO_IPV4, NftSocket, SetOp};
use tartan::lab::{ScratchNs, block_on_in_netns, in_netns, ns_run, require_root};

/// The key of slot `s` of 10.96.0.10:80/tcp in a backends map.
fn slot_key(s: u32) -> Vec<u8> {
    KeyBuilder::new()
        .ipv4(std::net::Ipv4Addr::new(10, 96, 0, 10))
        .proto(6)
        .port(80)
        .u32_host(s)
        .build()
}

/// `n` elements of the `be` map: 10.96.x.y:80/tcp slot 0 → 10.244.x.y:8080.
fn backend_elements(n: u32) -> Vec<(Vec<u8>, ElemData)> {
    (0..n)
        .map(|i| {
            (
                KeyBuilder::new()
                    .ipv4(std::net::Ipv4Addr::from(0x0a60_0000 + i))
                    .proto(6)
                    .port(80)
                    .u32_host(0)
                    .build(),
                ElemData::Value(
                    KeyBuilder::new()
                        .ipv4(std::net::Ipv4Addr::from(0x0af4_0000 + i))
                        .port(8080)
                        .build(),
                ),
            )
        })
        .collect()
}

const TABLE: &str = r#"table ip t {
  map vm { typeof ip daddr . meta l4proto . th dport : verdict; }
  map be { typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport; }
  set pairs { typeof ip saddr . ip daddr; }
  set np { typeof meta l4proto . th dport; }
  chain c1 {
    accept
  }
}
"#;

#[test]
fn elements_written_over_netlink_read_back_through_nft() -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    let ns = ScratchNs::new("nftel")?;
    ns.nft_load(TABLE)?;
    let vip: std::net::Ipv4Addr = "10.96.0.10".parse()?;
    let ops = vec![
        (
            "vm".to_string(),
            SetOp::Add(vec![(
                KeyBuilder::new().ipv4(vip).proto(6).port(80).build(),
                ElemData::Goto("c1".into()),
            )]),
        ),
        (
            "be".to_string(),
            SetOp::Add(
                (0..3u32)
                    .map(|s| {
                        (
                            KeyBuilder::new()
                                .ipv4(vip)
                                .proto(6)
                                .port(80)
                                .u32_host(s)
                                .build(),
                            ElemData::Value(
                                KeyBuilder::new()
                                    .ipv4(std::net::Ipv4Addr::new(10, 244, 1, 10 + s as u8))
                                    .port(8080)
                                    .build(),
                            ),
                        )
                    })
                    .collect(),
            ),
        ),
        (
            "pairs".to_string(),
            SetOp::Add(vec![(
                KeyBuilder::new()
                    .ipv4("10.244.1.10".parse()?)
                    .ipv4("10.244.1.10".parse()?)
                    .build(),
                ElemData::None,
            )]),
        ),
        (
            "np".to_string(),
            SetOp::Add(vec![(
                KeyBuilder::new().proto(17).port(30053).build(),
                ElemData::None,
            )]),
        ),
    ];
    let n = block_on_in_netns(ns.name(), move || async move {
        let mut s = NftSocket::open()?;
        s.apply(NFPROTO_IPV4, "t", &ops)
    })??;
    ensure!(n == 6);
    let listing = ns_run(ns.name(), "nft", &["list", "table", "ip", "t"])?;
    for want in [
        "10.96.0.10 . tcp . 80 : goto c1",
        "10.96.0.10 . tcp . 80 . 0 : 10.244.1.10 . 8080",
        "10.96.0.10 . tcp . 80 . 2 : 10.244.1.12 . 8080",
        "10.244.1.10 . 10.244.1.10",
        "udp . 30053",
    ] {
        ensure!(listing.contains(want), "{want:?} missing from:\n{listing}");
    }
    // A batch with one bad operation changes nothing.
    let bad = vec![
        (
            "np".to_string(),
            SetOp::Add(vec![(
                KeyBuilder::new().proto(6).port(1).build(),
                ElemData::None,
            )]),
        ),
        (
            "np".to_string(),
            SetOp::Delete(vec![KeyBuilder::new().proto(6).port(2).build()]),
        ),
    ];
    let r = block_on_in_netns(ns.name(), move || async move {
        let mut s = NftSocket::open()?;
        s.apply(NFPROTO_IPV4, "t", &bad)
    })?;
    ensure!(r.is_err(), "deleting a missing element must fail the batch");
    let listing = ns_run(ns.name(), "nft", &["list", "set", "ip", "t", "np"])?;
    ensure!(
        !listing.contains("tcp . 1"),
        "half-applied batch:\n{listing}"
    );
    // Flush and delete.
    let ops = vec![
        ("be".to_string(), SetOp::Flush),
        (
            "vm".to_string(),
            SetOp::Delete(vec![KeyBuilder::new().ipv4(vip).proto(6).port(80).build()]),
        ),
    ];
    block_on_in_netns(ns.name(), move || async move {
        let mut s = NftSocket::open()?;
        s.apply(NFPROTO_IPV4, "t", &ops)
    })??;
    let listing = ns_run(ns.name(), "nft", &["list", "table", "ip", "t"])?;
    ensure!(!listing.contains("10.96.0.10"), "{listing}");
    Ok(())
}

#[test]
fn large_batches_apply_atomically() -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    let ns = ScratchNs::new("nftbig")?;
    ns.nft_load(TABLE)?;
    let elems = backend_elements(100_000);
    let ops = vec![
        ("be".to_string(), SetOp::Flush),
        ("be".to_string(), SetOp::Add(elems)),
    ];
    let n = block_on_in_netns(ns.name(), move || async move {
        let mut s = NftSocket::open()?;
        s.apply(NFPROTO_IPV4, "t", &ops)
    })??;
    ensure!(n == 100_000);
    let listing = ns_run(ns.name(), "nft", &["list", "map", "ip", "t", "be"])?;
    let got = listing.matches(" . 8080").count();
    ensure!(got == 100_000, "element count mismatch: {got}");
    Ok(())
}

/// Kernel cost of slot tables (ignored; `-- --ignored --nocapture`): one port's 131,072 slots
/// added, 10 % of them rewritten (delete + add), then deleted, in one hooked table.
#[test]
#[ignore]
fn slot_table_kernel_cost_probe() -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    let ns = ScratchNs::new("nftslot")?;
    ns.nft_load(
        r#"table ip t {
  map be { typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport; counter; }
  map be2 { typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport; }
}
"#,
    )?;
    let key = slot_key;
    let val = |i: u32| {
        ElemData::Value(
            KeyBuilder::new()
                .ipv4(std::net::Ipv4Addr::from(0x0af4_0000 + i))
                .port(8080)
                .build(),
        )
    };
    for set in ["be", "be2"] {
        let m = 131_072u32;
        let add: Vec<_> = (0..m).map(|s| (key(s), val(s % 10_000))).collect();
        let redo_del: Vec<_> = (0..m).step_by(10).map(key).collect();
        let redo_add: Vec<_> = (0..m).step_by(10).map(|s| (key(s), val(s % 7))).collect();
        let dels: Vec<_> = (0..m).map(key).collect();
        let set = set.to_string();
        block_on_in_netns(ns.name(), move || async move {
            let mut s = NftSocket::open()?;
            let t = std::time::Instant::now();
            s.apply(NFPROTO_IPV4, "t", &[(set.clone(), SetOp::Add(add))])?;
            eprintln!("{set}: add {m}: {:?}", t.elapsed());
            let n = redo_add.len();
            let t = std::time::Instant::now();
            s.apply(
                NFPROTO_IPV4,
                "t",
                &[
                    (set.clone(), SetOp::Delete(redo_del)),
                    (set.clone(), SetOp::Add(redo_add)),
                ],
            )?;
            eprintln!("{set}: rewrite {n}: {:?}", t.elapsed());
            let t = std::time::Instant::now();
            s.apply(NFPROTO_IPV4, "t", &[(set.clone(), SetOp::Delete(dels))])?;
            eprintln!("{set}: delete {m}: {:?}", t.elapsed());
            anyhow::Ok(())
        })??;
    }
    Ok(())
}

/// The element dump (`NftSocket::dump_elements`) reads back keys, map data and per-element
/// counters as the kernel holds them, and a dump of a missing set fails with a clear error.
#[test]
fn elements_and_counters_dump_back_over_netlink() -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    let ns = ScratchNs::new("nftdump")?;
    ns.nft_load(
        r#"table ip t {
  map be { typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport; counter; }
  set refused { typeof ip daddr . meta l4proto . th dport; counter; }
}
"#,
    )?;
    let vip: std::net::Ipv4Addr = "10.96.0.10".parse()?;
    let key = slot_key;
    let data = |s: u32| {
        KeyBuilder::new()
            .ipv4(std::net::Ipv4Addr::from(0x0af4_0100 + s))
            .port(8080)
            .build()
    };
    let n: u32 = 300;
    let ops = vec![
        (
            "be".to_string(),
            SetOp::Add((0..n).map(|s| (key(s), ElemData::Value(data(s)))).collect()),
        ),
        (
            "refused".to_string(),
            SetOp::Add(vec![(
                KeyBuilder::new().ipv4(vip).proto(17).port(53).build(),
                ElemData::None,
            )]),
        ),
    ];
    let (be, refused, missing) = block_on_in_netns(ns.name(), move || async move {
        let mut s = NftSocket::open()?;
        s.apply(NFPROTO_IPV4, "t", &ops)?;
        let be = s.dump_elements(NFPROTO_IPV4, "t", "be")?;
        let refused = s.dump_elements(NFPROTO_IPV4, "t", "refused")?;
        let missing = s.dump_elements(NFPROTO_IPV4, "t", "nosuch");
        anyhow::Ok((be, refused, missing.map_err(|e| format!("{e:#}"))))
    })??;
    ensure!(
        be.len() == n as usize,
        "{} elements dumped, {n} written",
        be.len()
    );
    let mut seen: Vec<(Vec<u8>, Vec<u8>)> = be
        .iter()
        .map(|e| (e.key.clone(), e.data.clone().unwrap_or_default()))
        .collect();
    seen.sort();
    let mut want: Vec<(Vec<u8>, Vec<u8>)> = (0..n).map(|s| (key(s), data(s))).collect();
    want.sort();
    ensure!(seen == want, "keys or data differ from what was written");
    ensure!(
        be.iter().all(|e| e.counter == Some((0, 0))),
        "every element carries a zero counter: {:?}",
        be.first()
    );
    ensure!(
        refused.len() == 1 && refused[0].data.is_none() && refused[0].counter == Some((0, 0)),
        "{refused:?}"
    );
    let e = missing.err().unwrap_or_default();
    ensure!(e.contains("nosuch") && e.contains("ENOENT"), "{e}");
    Ok(())
}

/// The same element batches encoded with `netlink-packet-netfilter`'s typed messages, split
/// into messages exactly as `kernel::nft_elements` splits them: for the encoder comparison.
mod typed_encoder {
    use netlink_packet_core::{
        Emitable, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
        NetlinkPayload,
    };
    use netlink_packet_netfilter::nftables::{
        DataAttribute, ListAttribute, NfTablesMessage, SetElementAttribute, SetElementList,
        SetElementMessage, Verdict, VerdictAttribute,
    };
    use netlink_packet_netfilter::none::ControlMessage;
    use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
    use tartan::kernel::nft_elements::{ElemData, EncodedBatch};

    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const MAX_MSG: usize = 60 * 1024;

    fn push(buf: &mut Vec<u8>, flags: u16, seq: u32, msg: NetfilterMessage) {
        let mut h = NetlinkHeader::default();
        h.flags = flags;
        h.sequence_number = seq;
        let mut m = NetlinkMessage::new(h, NetlinkPayload::from(msg));
        m.finalize();
        let at = buf.len();
        buf.resize(at + m.buffer_len(), 0);
        m.serialize(&mut buf[at..]);
    }

    fn control(msg: ControlMessage) -> NetfilterMessage {
        NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
            msg,
        )
    }

    fn element(key: &[u8], data: &ElemData) -> Vec<SetElementAttribute> {
        let mut e = vec![SetElementAttribute::Key(DataAttribute::Value(key.to_vec()))];
        let verdict = |code, chain: &str| {
            DataAttribute::Verdict(vec![
                VerdictAttribute::Code(code),
                VerdictAttribute::Chain(chain.to_string()),
            ])
        };
        match data {
            ElemData::None => {}
            ElemData::Value(v) => {
                e.push(SetElementAttribute::Data(DataAttribute::Value(v.clone())))
            }
            ElemData::Goto(c) => e.push(SetElementAttribute::Data(verdict(Verdict::Goto, c))),
            ElemData::Jump(c) => e.push(SetElementAttribute::Data(verdict(Verdict::Jump, c))),
        }
        e
    }

    /// Adds `elems` to `table`/`set` (IPv4) as one batch whose begin message is `seq`.
    pub fn encode_add(
        table: &str,
        set: &str,
        elems: &[(Vec<u8>, ElemData)],
        seq: u32,
    ) -> EncodedBatch {
        let mut buf = Vec::with_capacity(64 * 1024);
        push(
            &mut buf,
            NLM_F_REQUEST,
            seq,
            control(ControlMessage::BatchBegin),
        );
        let head = [
            SetElementList::Table(table.to_string()),
            SetElementList::Set(set.to_string()),
        ];
        let head_len = head.as_slice().buffer_len();
        let mut next = seq + 1;
        let mut list: Vec<ListAttribute<SetElementAttribute>> = Vec::new();
        let mut body_len = head_len + 4;
        let mut flush = |buf: &mut Vec<u8>, list: Vec<_>| {
            let mut attributes = head.to_vec();
            attributes.push(SetElementList::Elements(list));
            push(
                buf,
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
                next,
                NetfilterMessage::new(
                    NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
                    NfTablesMessage::NewSetElement(SetElementMessage { attributes }),
                ),
            );
            next += 1;
        };
        for (k, d) in elems {
            let attrs = element(k, d);
            let len = attrs.as_slice().buffer_len();
            if !list.is_empty() && body_len + len + 8 > MAX_MSG {
                flush(&mut buf, std::mem::take(&mut list));
                body_len = head_len + 4;
            }
            body_len += 4 + len;
            list.push(ListAttribute::Element(attrs));
        }
        if !list.is_empty() {
            flush(&mut buf, list);
        }
        let messages = next - seq - 1;
        push(
            &mut buf,
            NLM_F_REQUEST,
            next,
            control(ControlMessage::BatchEnd),
        );
        EncodedBatch {
            buf,
            first_seq: seq + 1,
            messages,
            elements: elems.len(),
        }
    }
}

/// Encoder comparison (ignored; `-- --ignored --nocapture`): 10,000 `be` map elements added
/// as one batch, encoded by `kernel::nft_elements` and by `netlink-packet-netfilter`, each
/// batch applied to the kernel (the map flushed in between, untimed); rounds interleaved,
/// alternating which goes first; medians printed.
#[test]
#[ignore]
fn element_encoders_probe() -> Result<()> {
    use std::time::{Duration, Instant};
    use tartan::kernel::nft_elements::encode_batch;
    if !require_root()? {
        return Ok(());
    }
    let ns = ScratchNs::new("nftenc")?;
    ns.nft_load(TABLE)?;
    let n: u32 = std::env::var("PROBE_ELEMENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rounds = 9;
    let elems = backend_elements(n);
    let ops = vec![("be".to_string(), SetOp::Add(elems.clone()))];
    // Same bytes either way (same sequence numbers): the comparison is of the encoders alone.
    let ours = encode_batch(NFPROTO_IPV4, "t", &ops, 1000);
    let typed = typed_encoder::encode_add("t", "be", &elems, 1000);
    ensure!(
        ours.buf == typed.buf && ours.messages == typed.messages,
        "encodings differ: {} vs {} bytes, {} vs {} messages",
        ours.buf.len(),
        typed.buf.len(),
        ours.messages,
        typed.messages
    );
    let times = in_netns(ns.name(), move || -> Result<[Vec<Duration>; 4]> {
        let mut s = NftSocket::open()?;
        let mut t: [Vec<Duration>; 4] = Default::default();
        let flush = vec![("be".to_string(), SetOp::Flush)];
        for r in 0..rounds {
            for which in [r % 2, 1 - r % 2] {
                let seq = 10_000 + 10_000 * r as u32;
                let t0 = Instant::now();
                let batch = if which == 0 {
                    encode_batch(NFPROTO_IPV4, "t", &ops, seq)
                } else {
                    typed_encoder::encode_add("t", "be", &elems, seq)
                };
                let t1 = Instant::now();
                s.send_batch(&batch)?;
                let t2 = Instant::now();
                t[which].push(t1 - t0);
                t[2 + which].push(t2 - t1);
                s.apply(NFPROTO_IPV4, "t", &flush)?;
            }
        }
        Ok(t)
    })??;
    let median = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 2]
    };
    eprintln!(
        "{n} elements, {rounds} rounds, {} bytes in {} messages",
        ours.buf.len(),
        ours.messages
    );
    for (i, what) in [
        "encode, kernel::nft_elements",
        "encode, netlink-packet-netfilter",
        "apply,  kernel::nft_elements",
        "apply,  netlink-packet-netfilter",
    ]
    .iter()
    .enumerate()
    {
        eprintln!(
            "{what}: median {:?} (all: {:?})",
            median(&times[i]),
            times[i]
        );
    }
    Ok(())
}
