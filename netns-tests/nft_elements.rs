//! The raw netlink element writer against the real kernel: what it writes must read back
//! through `nft` exactly as if `nft` had written it.

use anyhow::{Result, ensure};
use tartan::kernel::nft_elements::{ElemData, KeyBuilder, NFPROTO_IPV4, NftSocket, SetOp};
use tartan::lab::{block_on_in_netns, delete_ns, ip, ns_run, require_root};

struct Ns(String);
impl Drop for Ns {
    fn drop(&mut self) {
        delete_ns(&self.0);
    }
}

fn netns(tag: &str) -> Result<Ns> {
    let name = format!("tt{}x{}-{tag}", std::process::id(), rand::random::<u16>());
    ip(&["netns", "add", &name])?;
    Ok(Ns(name))
}

/// Loads `script` with `nft -f` in `ns`.
fn load(ns: &Ns, script: &str) -> Result<()> {
    let tf = std::env::temp_dir().join(format!("{}.nft", ns.0));
    std::fs::write(&tf, script)?;
    let r = ns_run(&ns.0, "nft", &["-f", &tf.to_string_lossy()]);
    let _ = std::fs::remove_file(&tf);
    r.map(|_| ())
}

/// The key of slot `s` of 10.96.0.10:80/tcp in a backends map.
fn slot_key(s: u32) -> Vec<u8> {
    KeyBuilder::new()
        .ipv4(std::net::Ipv4Addr::new(10, 96, 0, 10))
        .proto(6)
        .port(80)
        .u32_host(s)
        .build()
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
    let ns = netns("nftel")?;
    let tf = std::env::temp_dir().join(format!("{}.nft", ns.0));
    std::fs::write(&tf, TABLE)?;
    ns_run(&ns.0, "nft", &["-f", &tf.to_string_lossy()])?;
    let _ = std::fs::remove_file(&tf);
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
    let n = block_on_in_netns(&ns.0, move || async move {
        let mut s = NftSocket::open()?;
        s.apply(NFPROTO_IPV4, "t", &ops)
    })??;
    ensure!(n == 6);
    let listing = ns_run(&ns.0, "nft", &["list", "table", "ip", "t"])?;
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
    let r = block_on_in_netns(&ns.0, move || async move {
        let mut s = NftSocket::open()?;
        s.apply(NFPROTO_IPV4, "t", &bad)
    })?;
    ensure!(r.is_err(), "deleting a missing element must fail the batch");
    let listing = ns_run(&ns.0, "nft", &["list", "set", "ip", "t", "np"])?;
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
    block_on_in_netns(&ns.0, move || async move {
        let mut s = NftSocket::open()?;
        s.apply(NFPROTO_IPV4, "t", &ops)
    })??;
    let listing = ns_run(&ns.0, "nft", &["list", "table", "ip", "t"])?;
    ensure!(!listing.contains("10.96.0.10"), "{listing}");
    Ok(())
}

#[test]
fn large_batches_apply_atomically() -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    let ns = netns("nftbig")?;
    let tf = std::env::temp_dir().join(format!("{}.nft", ns.0));
    std::fs::write(&tf, TABLE)?;
    ns_run(&ns.0, "nft", &["-f", &tf.to_string_lossy()])?;
    let _ = std::fs::remove_file(&tf);
    let elems: Vec<_> = (0..100_000u32)
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
        .collect();
    let ops = vec![
        ("be".to_string(), SetOp::Flush),
        ("be".to_string(), SetOp::Add(elems)),
    ];
    let n = block_on_in_netns(&ns.0, move || async move {
        let mut s = NftSocket::open()?;
        s.apply(NFPROTO_IPV4, "t", &ops)
    })??;
    ensure!(n == 100_000);
    let listing = ns_run(&ns.0, "nft", &["list", "map", "ip", "t", "be"])?;
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
    let ns = netns("nftslot")?;
    load(
        &ns,
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
        block_on_in_netns(&ns.0, move || async move {
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
    let ns = netns("nftdump")?;
    load(
        &ns,
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
    let (be, refused, missing) = block_on_in_netns(&ns.0, move || async move {
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
