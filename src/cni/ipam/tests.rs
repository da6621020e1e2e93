//! Unit tests of `cni::ipam`.

use super::*;

use crate::util::test_tmp::TmpDir;

fn req(cid: &str) -> AllocationRequest {
    AllocationRequest {
        container_id: cid.into(),
        ifname: "eth0".into(),
        namespace: "default".into(),
        name: cid.into(),
        labels: BTreeMap::new(),
        netns: "/var/run/netns/x".into(),
    }
}

fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

#[test]
fn range_and_round_robin() {
    assert_eq!(
        usable_range(net("10.1.2.0/24")),
        Some((
            u32::from(Ipv4Addr::new(10, 1, 2, 2)),
            u32::from(Ipv4Addr::new(10, 1, 2, 254))
        ))
    );
    assert_eq!(
        usable_range(net("10.1.2.0/30")).map(|(a, b)| b - a),
        Some(0)
    );
    assert_eq!(usable_range(net("10.1.2.0/31")), None);
    assert_eq!(gateway(net("10.1.2.0/24")), Ipv4Addr::new(10, 1, 2, 1));
    assert_eq!(next_free(2, 5, None, |_| false), Some(2));
    assert_eq!(next_free(2, 5, Some(3), |_| false), Some(4));
    assert_eq!(next_free(2, 5, Some(5), |_| false), Some(2));
    assert_eq!(next_free(2, 5, Some(99), |_| false), Some(2));
    assert_eq!(next_free(2, 5, Some(3), |c| c == 4 || c == 5), Some(2));
    assert_eq!(next_free(2, 5, Some(3), |_| true), None);
}

#[test]
fn fifos_planted_in_the_store_never_block_and_gc_removes_them() {
    // Reads used to open whatever was there: a FIFO with no writer blocked forever.
    let t = TmpDir::new("ipam-fifo");
    let s = IpamStore::open(&t.0, "tartan").unwrap();
    let subnet = net("10.244.3.0/24");
    let a = s.allocate(&req("a"), subnet).unwrap();
    let fifo = |p: PathBuf| {
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap()
    };
    fifo(s.dir().join("ip/10.244.3.3"));
    fifo(s.dir().join("by-id/b:eth0"));
    assert_eq!(s.get("b", "eth0").unwrap(), None);
    assert_eq!(s.records().unwrap(), vec![a.clone()]);
    let c = s.allocate(&req("c"), subnet).unwrap();
    assert_eq!(
        c.ip,
        Ipv4Addr::new(10, 244, 3, 4),
        "the FIFO's address is taken"
    );
    let valid: HashSet<(String, String)> = [("a", "eth0"), ("c", "eth0")]
        .iter()
        .map(|(c, i)| (c.to_string(), i.to_string()))
        .collect();
    assert!(s.gc(&valid).unwrap().is_empty());
    assert!(!s.dir().join("ip/10.244.3.3").exists());
    assert!(!s.dir().join("by-id/b:eth0").exists());
    assert_eq!(s.records().unwrap(), vec![a, c]);
}

#[test]
fn dir_stamp_moves_with_every_allocation_and_release() {
    let t = TmpDir::new("ipam-stamp");
    let empty = dir_stamp(&t.0);
    assert_eq!(empty.0.len(), 1, "no network yet: {empty:?}");
    let s = IpamStore::open(&t.0, "tartan").unwrap();
    let subnet = net("10.244.3.0/24");
    s.allocate(&req("a"), subnet).unwrap();
    let one = dir_stamp(&t.0);
    assert_eq!(one.0[1].0, "tartan");
    assert!(one.0[1].1.is_some() && one != empty);
    // Timestamps are coarse: age the directory so the next change cannot share its time.
    let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    let age = || {
        File::open(s.dir().join(IP_DIR))
            .unwrap()
            .set_modified(old)
            .unwrap();
    };
    age();
    let aged = dir_stamp(&t.0);
    assert_eq!(
        aged.newest().map(|n| n > old),
        Some(true),
        "data_dir is newer"
    );
    assert_eq!(aged.0[1].1, Some(old));
    assert_eq!(dir_stamp(&t.0), aged, "no change, same stamp");
    s.allocate(&req("b"), subnet).unwrap();
    assert_ne!(dir_stamp(&t.0), aged, "an allocation moves it");
    age();
    // Changed labels of an existing attachment rewrite its record.
    let mut r = req("a");
    r.labels.insert("app".into(), "web".into());
    s.allocate(&r, subnet).unwrap();
    assert_ne!(dir_stamp(&t.0).0[1].1, Some(old), "a rewrite moves it");
    age();
    s.release("b", "eth0").unwrap();
    assert_ne!(dir_stamp(&t.0).0[1].1, Some(old), "a release moves it");
}

#[test]
fn allocate_reuse_release() {
    let t = TmpDir::new("ipam-basic");
    let s = IpamStore::open(&t.0, "tartan").unwrap();
    let subnet = net("10.244.3.0/24");
    let a = s.allocate(&req("a"), subnet).unwrap();
    let b = s.allocate(&req("b"), subnet).unwrap();
    assert_eq!(a.ip, Ipv4Addr::new(10, 244, 3, 2));
    assert_eq!(b.ip, Ipv4Addr::new(10, 244, 3, 3));
    assert_eq!(a.network, "tartan");
    // Same attachment again: same address, metadata refreshed.
    let mut r = req("a");
    r.labels.insert("app".into(), "web".into());
    let a2 = s.allocate(&r, subnet).unwrap();
    assert_eq!(a2.ip, a.ip);
    assert_eq!(s.get("a", "eth0").unwrap().unwrap().labels["app"], "web");
    // The index entry is the record itself (one inode per allocation), also once rewritten.
    use std::os::unix::fs::MetadataExt;
    let rec_meta = std::fs::metadata(s.dir().join("ip/10.244.3.2")).unwrap();
    let idx_meta = std::fs::symlink_metadata(s.dir().join("by-id/a:eth0")).unwrap();
    assert_eq!((idx_meta.ino(), idx_meta.nlink()), (rec_meta.ino(), 2));
    // Another interface of the same container is another attachment.
    let mut r2 = req("a");
    r2.ifname = "net1".into();
    assert_eq!(
        s.allocate(&r2, subnet).unwrap().ip,
        Ipv4Addr::new(10, 244, 3, 4)
    );
    // Release is idempotent and round-robin does not hand the address back at once.
    assert_eq!(s.release("a", "eth0").unwrap().map(|r| r.ip), Some(a.ip));
    assert_eq!(s.release("a", "eth0").unwrap(), None);
    assert_eq!(s.release("never", "eth0").unwrap(), None);
    assert_eq!(
        s.allocate(&req("c"), subnet).unwrap().ip,
        Ipv4Addr::new(10, 244, 3, 5)
    );
    assert_eq!(s.records().unwrap().len(), 3);
    let all = scan_all(&t.0).unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].to_pod_record("n1").node, "n1");
}

#[test]
fn exhaustion_is_a_clear_error() {
    let t = TmpDir::new("ipam-full");
    let s = IpamStore::open(&t.0, "n").unwrap();
    let subnet = net("10.0.0.0/29"); // .2 - .6
    for i in 0..5 {
        s.allocate(&req(&format!("c{i}")), subnet).unwrap();
    }
    let e = s.allocate(&req("c5"), subnet).unwrap_err();
    assert_eq!(e.code, code::ADDRESSES_EXHAUSTED);
    assert!(e.msg.contains("10.0.0.0/29"), "{e}");
    s.release("c2", "eth0").unwrap();
    assert_eq!(
        s.allocate(&req("c5"), subnet).unwrap().ip,
        Ipv4Addr::new(10, 0, 0, 4)
    );
}

#[test]
fn subnet_change_moves_the_allocation() {
    let t = TmpDir::new("ipam-move");
    let s = IpamStore::open(&t.0, "n").unwrap();
    let a = s.allocate(&req("a"), net("10.0.1.0/24")).unwrap();
    let b = s.allocate(&req("a"), net("10.0.2.0/24")).unwrap();
    assert_ne!(a.ip, b.ip);
    assert_eq!(s.records().unwrap(), vec![b]);
}

#[test]
fn concurrent_allocations_are_distinct() {
    let t = TmpDir::new("ipam-par");
    let subnet = net("10.9.0.0/24");
    let dir = t.0.clone();
    let handles: Vec<_> = (0..16)
        .map(|th| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let s = IpamStore::open(&dir, "n").unwrap();
                (0..10)
                    .map(|i| s.allocate(&req(&format!("t{th}-{i}")), subnet).unwrap().ip)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all = HashSet::new();
    for h in handles {
        for ip in h.join().unwrap() {
            assert!(all.insert(ip), "{ip} handed out twice");
        }
    }
    assert_eq!(all.len(), 160);
}

#[test]
fn first_allocations_on_a_fresh_node_race_safely() {
    // Many processes hitting an empty data directory at once must all find the
    // subdirectories in place once they hold the lock.
    for round in 0..60 {
        let t = TmpDir::new(&format!("fresh{round}"));
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(16));
        let handles: Vec<_> = (0..16)
            .map(|k| {
                let dir = t.0.clone();
                let b = barrier.clone();
                std::thread::spawn(move || {
                    let s = IpamStore::open(&dir, "n").unwrap();
                    b.wait();
                    s.allocate(&req(&format!("c{k}")), net("10.7.0.0/24"))
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
    }
}

#[test]
fn a_subdirectory_removed_by_hand_is_recreated() {
    let t = TmpDir::new("ipam-rmdir");
    let s = IpamStore::open(&t.0, "n").unwrap();
    s.allocate(&req("a"), net("10.0.0.0/24")).unwrap();
    std::fs::remove_dir_all(s.dir().join("by-id")).unwrap();
    s.allocate(&req("b"), net("10.0.0.0/24")).unwrap();
    std::fs::remove_dir_all(s.dir().join("ip")).unwrap();
    s.allocate(&req("c"), net("10.0.0.0/24")).unwrap();
    assert_eq!(
        s.get("c", "eth0").unwrap().map(|r| r.container_id),
        Some("c".into())
    );
}

#[test]
fn index_entries_of_older_directories_still_count() {
    let t = TmpDir::new("ipam-oldfmt");
    let s = IpamStore::open(&t.0, "n").unwrap();
    let subnet = net("10.0.0.0/24");
    let a = s.allocate(&req("a"), subnet).unwrap();
    // Directories written before kept a symlink to the address in the index.
    let idx = s.dir().join("by-id/a:eth0");
    std::fs::remove_file(&idx).unwrap();
    std::os::unix::fs::symlink(a.ip.to_string(), &idx).unwrap();
    assert_eq!(s.get("a", "eth0").unwrap().map(|r| r.ip), Some(a.ip));
    assert_eq!(s.allocate(&req("a"), subnet).unwrap().ip, a.ip);
    let mut r = req("a");
    r.labels.insert("k".into(), "v".into());
    assert_eq!(s.allocate(&r, subnet).unwrap().ip, a.ip);
    assert!(!std::fs::symlink_metadata(&idx).unwrap().is_symlink());
    assert_eq!(s.release("a", "eth0").unwrap().map(|r| r.ip), Some(a.ip));
    assert_eq!(std::fs::read_dir(s.dir().join("by-id")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(s.dir().join("ip")).unwrap().count(), 0);
}

#[test]
fn leftovers_of_killed_processes_are_reclaimed() {
    let t = TmpDir::new("ipam-crash");
    let s = IpamStore::open(&t.0, "n").unwrap();
    let subnet = net("10.0.0.0/24");
    let keep = s.allocate(&req("keep"), subnet).unwrap();
    let gone = s.allocate(&req("gone"), subnet).unwrap();
    // Killed between index and record: a dangling index entry (both formats).
    std::os::unix::fs::symlink("10.0.0.77", s.dir().join("by-id/dangling:eth0")).unwrap();
    std::fs::write(
        s.dir().join("by-id/half:eth0"),
        serde_json::to_vec(&AllocationRecord {
            container_id: "half".into(),
            ifname: "eth0".into(),
            ip: Ipv4Addr::new(10, 0, 0, 78),
            prefix: 24,
            namespace: String::new(),
            name: String::new(),
            labels: BTreeMap::new(),
            netns: String::new(),
            network: "n".into(),
            ip6: None,
            prefix6: None,
        })
        .unwrap(),
    )
    .unwrap();
    assert_eq!(s.get("half", "eth0").unwrap(), None);
    // Killed while writing a record: a temporary file.
    std::fs::write(s.dir().join("ip/.tmp-12345"), b"{\"partial").unwrap();
    // Garbage where a record should be.
    std::fs::write(s.dir().join("ip/10.0.0.99"), b"junk").unwrap();
    // The dangling entry does not block the address nor confuse a lookup.
    assert_eq!(s.get("dangling", "eth0").unwrap(), None);
    // An index entry pointing at someone else's record is not trusted by DEL.
    std::os::unix::fs::symlink(keep.ip.to_string(), s.dir().join("by-id/liar:eth0")).unwrap();
    assert_eq!(s.release("liar", "eth0").unwrap(), None);
    assert_eq!(s.get("keep", "eth0").unwrap().map(|r| r.ip), Some(keep.ip));

    let valid: HashSet<(String, String)> = [("keep".to_string(), "eth0".to_string())].into();
    let freed = s.gc(&valid).unwrap();
    assert_eq!(
        freed.iter().map(|r| r.ip).collect::<Vec<_>>(),
        vec![gone.ip]
    );
    let mut left: Vec<String> = std::fs::read_dir(s.dir().join("ip"))
        .unwrap()
        .chain(std::fs::read_dir(s.dir().join("by-id")).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, vec![keep.ip.to_string(), "keep:eth0".to_string()]);
}

#[test]
fn paths_never_leave_the_data_dir() {
    let t = TmpDir::new("ipam-esc");
    for bad in ["..", ".", "a/b", "", "../x"] {
        assert!(IpamStore::open(&t.0, bad).is_err(), "{bad:?}");
    }
    assert!(child(&t.0, "..").is_err());
    assert!(child(&t.0, "x/../../y").is_err());
    assert!(child(&t.0, "ok:eth0").is_ok());
}

#[test]
fn a_dual_stack_pod_gets_the_ipv6_address_with_its_ipv4_host_part() {
    let t = TmpDir::new("ipam-dual");
    let s = IpamStore::open(&t.0, "n").unwrap();
    let subnet = net("10.244.3.0/24");
    let s6: Ipv6Network = "fd00:10:244:3::/64".parse().unwrap();
    // A pod from before the node was dual-stack gets its IPv6 address on its next ADD.
    let old = s.allocate(&req("old"), subnet).unwrap();
    assert_eq!((old.ip6, old.prefix6), (None, None));
    let again = s.allocate_dual(&req("old"), subnet, Some(s6)).unwrap();
    assert_eq!(again.ip, old.ip);
    assert_eq!(again.ip6, Some("fd00:10:244:3::2".parse().unwrap()));
    assert_eq!(again.prefix6, Some(64));
    assert_eq!(s.get("old", "eth0").unwrap(), Some(again));
    let b = s.allocate_dual(&req("b"), subnet, Some(s6)).unwrap();
    assert_eq!(b.ip, Ipv4Addr::new(10, 244, 3, 3));
    assert_eq!(b.ip6, Some("fd00:10:244:3::3".parse().unwrap()));
    assert_eq!(
        gateway6(s6),
        "fd00:10:244:3::1".parse::<Ipv6Addr>().unwrap()
    );
    // An IPv6 subnet with fewer host bits than the IPv4 one cannot pair every address.
    let e = s
        .allocate_dual(&req("c"), subnet, Some("fd00::/124".parse().unwrap()))
        .unwrap_err();
    assert_eq!(e.code, code::ADDRESSES_EXHAUSTED, "{e}");
    assert!(e.msg.contains("smaller than its IPv4 subnet"), "{e}");
}
