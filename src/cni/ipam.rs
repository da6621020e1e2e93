//! Local IPAM: addresses of the node subnet handed to containers, kept in a directory that is
//! the node's source of truth for its pods (tartand registers pods from it).
//!
//! Layout under `<dataDir>/<network>/`:
//!
//! | path | content |
//! |---|---|
//! | `lock` | `flock`ed exclusively by every change; holds the last address handed out (the round-robin start, like host-local's `last_reserved`) |
//! | `ip/<address>` | the [`AllocationRecord`] (JSON) of an allocated address |
//! | `by-id/<container-id>:<ifname>` | a hard link to the record (the fast lookup: its address); a symlink to the address in directories written before |
//!
//! Crash safety: a record is written to a temporary file, linked into the index, then renamed
//! into place (one inode per allocation: creating inodes is the dearest part of IPAM on a
//! busy ext4); the index entry exists before the record and is removed after it, so every
//! record has an index entry and a process killed at any point leaves at worst a dangling
//! index entry or a temporary file, both harmless (an index entry is trusted only when the
//! record it names agrees) and removed by GC. Allocation takes the lock, so concurrent ADDs
//! never share an address.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;
use nix::fcntl::{Flock, FlockArg, OFlag};
use serde::{Deserialize, Serialize};

use super::bounded_read::{FileReadError, STDIN_LIMIT, read_opened_file, read_regular_file};
use super::error::{CniError, code};
use super::spec::validate_network_name;
use crate::model::pod::PodRecord;

const LOCK_FILE: &str = "lock";
/// Width of the last-reserved address in the lock file (rewritten in place, never truncated).
const LAST_WIDTH: usize = 16;
const IP_DIR: &str = "ip";
const INDEX_DIR: &str = "by-id";
const TMP_PREFIX: &str = ".tmp-";

/// Everything known about one allocated address: enough to register the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationRecord {
    /// The runtime's container ID.
    pub container_id: String,
    /// Interface name inside the container.
    pub ifname: String,
    /// The allocated address.
    pub ip: Ipv4Addr,
    /// Prefix length of the node subnet the address came from.
    pub prefix: u8,
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The container's network namespace path at ADD time (informational).
    #[serde(default)]
    pub netns: String,
    /// The CNI network name (the IPAM subdirectory).
    #[serde(default)]
    pub network: String,
}

impl AllocationRecord {
    /// The pod record tartand registers for this allocation on `node`.
    pub fn to_pod_record(&self, node: &str) -> PodRecord {
        PodRecord {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
            node: node.to_string(),
            ip: self.ip,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            labels: self.labels.clone(),
        }
    }

    fn same_attachment(&self, container_id: &str, ifname: &str) -> bool {
        self.container_id == container_id && self.ifname == ifname
    }
}

/// What an ADD asks of IPAM (the address is what IPAM decides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationRequest {
    /// Container ID.
    pub container_id: String,
    /// Interface name.
    pub ifname: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// Network namespace path.
    pub netns: String,
}

/// The addresses of `subnet` containers may get: all but the network address, the gateway
/// (first address) and the broadcast address. `None` for subnets smaller than /30.
pub fn usable_range(subnet: Ipv4Network) -> Option<(u32, u32)> {
    if subnet.prefix() > 30 {
        return None;
    }
    let net = u32::from(subnet.network());
    let bcast = u32::from(subnet.broadcast());
    Some((net + 2, bcast - 1))
}

/// The gateway of a node subnet: its first address.
pub fn gateway(subnet: Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()).wrapping_add(1))
}

/// Round-robin choice: the first address after `last` (wrapping) in `lo..=hi` that is not
/// `taken`.
pub fn next_free(lo: u32, hi: u32, last: Option<u32>, taken: impl Fn(u32) -> bool) -> Option<u32> {
    if hi < lo {
        return None;
    }
    let n = u64::from(hi - lo) + 1;
    let start = match last {
        Some(l) if l >= lo && l < hi => u64::from(l - lo) + 1,
        _ => 0,
    };
    (0..n)
        .map(|k| lo + ((start + k) % n) as u32)
        .find(|c| !taken(*c))
}

/// The key of an attachment in the index directory.
fn index_name(container_id: &str, ifname: &str) -> String {
    // Neither a container ID nor an interface name may contain ':'.
    format!("{container_id}:{ifname}")
}

/// `dir/name`, refusing any name that could leave `dir`.
fn child(dir: &Path, name: &str) -> Result<PathBuf, CniError> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0')
        || name.len() > 255
    {
        return Err(CniError::store(format!(
            "refusing the path component {name:?} under {}",
            dir.display()
        )));
    }
    let p = dir.join(name);
    if p.parent() != Some(dir) {
        return Err(CniError::store(format!(
            "{name:?} would leave {}",
            dir.display()
        )));
    }
    Ok(p)
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> CniError {
    CniError::store(format!("{what} {}: {e}", path.display()))
}

/// Largest record read back: a record carries little more than the config it came from
/// (its labels), so twice the stdin bound holds every record a plugin wrote.
const RECORD_LIMIT: usize = 2 * STDIN_LIMIT;

/// Reads a record file: regular files only, bounded, never blocking (a FIFO or device
/// planted in the directory reads as garbage, which lookups ignore and GC removes).
/// `Ok(None)` when it is absent.
fn read_record_file(path: &Path) -> Result<Option<Vec<u8>>, CniError> {
    match read_regular_file(path, RECORD_LIMIT) {
        Ok(b) => Ok(Some(b)),
        Err(FileReadError::Io(e)) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(FileReadError::Io(e)) => Err(io_err("reading", path, e)),
        Err(_) => Ok(Some(Vec::new())),
    }
}

fn decode_record(bytes: &[u8]) -> Option<AllocationRecord> {
    serde_json::from_slice(bytes).ok()
}

/// One network's allocation directory.
#[derive(Debug, Clone)]
pub struct IpamStore {
    dir: PathBuf,
}

impl IpamStore {
    /// The store of `network` under `data_dir` (directories are created by the first change).
    pub fn open(data_dir: &Path, network: &str) -> Result<IpamStore, CniError> {
        validate_network_name(network)?;
        Ok(IpamStore {
            dir: child(data_dir, network)?,
        })
    }

    fn create_dirs(&self) -> Result<(), CniError> {
        let mut b = std::fs::DirBuilder::new();
        b.recursive(true).mode(0o755);
        for sub in [IP_DIR, INDEX_DIR] {
            let p = self.dir.join(sub);
            b.create(&p).map_err(|e| io_err("creating", &p, e))?;
        }
        Ok(())
    }

    /// The network's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the store's lock. The lock file is created only after both subdirectories
    /// exist, so whoever opens an existing lock file can rely on them (concurrent first ADDs
    /// on a fresh node would otherwise race the directory creation).
    fn lock(&self) -> Result<Flock<File>, CniError> {
        let p = self.dir.join(LOCK_FILE);
        let open = |create: bool| {
            std::fs::OpenOptions::new()
                .create(create)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&p)
        };
        let f = match open(false) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.create_dirs()?;
                open(true).map_err(|e| io_err("opening", &p, e))?
            }
            Err(e) => return Err(io_err("opening", &p, e)),
        };
        Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| CniError::store(format!("locking {}: {e}", p.display())))
    }

    /// Runs a write, recreating the subdirectories once if one vanished (removed by hand).
    fn with_dirs<T>(&self, f: impl Fn() -> std::io::Result<T>) -> std::io::Result<T> {
        match f() {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.create_dirs()
                    .map_err(|e| std::io::Error::other(e.msg))?;
                f()
            }
            r => r,
        }
    }

    fn last_reserved(lock: &File) -> Option<u32> {
        let mut buf = [0u8; LAST_WIDTH];
        let n = lock.read_at(&mut buf, 0).ok()?;
        std::str::from_utf8(&buf[..n])
            .ok()?
            .trim()
            .parse::<Ipv4Addr>()
            .ok()
            .map(u32::from)
    }

    fn set_last_reserved(&self, lock: &File, ip: Ipv4Addr) -> Result<(), CniError> {
        let text = format!("{:<width$}\n", ip.to_string(), width = LAST_WIDTH - 1);
        lock.write_all_at(text.as_bytes(), 0)
            .map_err(|e| io_err("writing", &self.dir.join(LOCK_FILE), e))
    }

    fn record_path(&self, ip: Ipv4Addr) -> Result<PathBuf, CniError> {
        child(&self.dir.join(IP_DIR), &ip.to_string())
    }

    fn index_path(&self, container_id: &str, ifname: &str) -> Result<PathBuf, CniError> {
        child(&self.dir.join(INDEX_DIR), &index_name(container_id, ifname))
    }

    /// The address an index entry names: the record it links to, or (older directories) the
    /// target of a symlink. Absent, unreadable as either, or garbage: `None` (GC removes it).
    fn read_index(&self, path: &Path) -> Result<Option<Ipv4Addr>, CniError> {
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits())
            .open(path);
        match opened {
            Ok(f) => match read_opened_file(f, RECORD_LIMIT) {
                Ok(b) => Ok(decode_record(&b).map(|r| r.ip)),
                Err(FileReadError::Io(e)) => Err(io_err("reading", path, e)),
                // Not a regular file, or too large: garbage.
                Err(_) => Ok(None),
            },
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            // ELOOP: a symlink, the older index format.
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) => {
                match std::fs::read_link(path) {
                    Ok(t) => Ok(t.to_str().and_then(|s| s.parse().ok())),
                    Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(io_err("reading", path, e)),
                }
            }
            Err(e) => Err(io_err("reading", path, e)),
        }
    }

    fn read_record(&self, ip: Ipv4Addr) -> Result<Option<AllocationRecord>, CniError> {
        let p = self.record_path(ip)?;
        Ok(read_record_file(&p)?.and_then(|b| decode_record(&b)))
    }

    /// Writes `rec` (temporary file, then rename) and makes the index entry `index` a link to
    /// it before the record appears.
    fn write_record(&self, rec: &AllocationRecord, index: &Path) -> Result<(), CniError> {
        let p = self.record_path(rec.ip)?;
        let tmp_name = format!("{TMP_PREFIX}{}", std::process::id());
        let tmp = self.dir.join(IP_DIR).join(&tmp_name);
        let bytes = serde_json::to_vec(rec)
            .map_err(|e| CniError::store(format!("encoding the record: {e}")))?;
        self.with_dirs(|| std::fs::write(&tmp, &bytes))
            .map_err(|e| io_err("writing", &tmp, e))?;
        let linked = match self.with_dirs(|| std::fs::hard_link(&tmp, index)) {
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                // A stale entry (its record did not agree): replace it atomically.
                let tmp_index = self.dir.join(INDEX_DIR).join(&tmp_name);
                let _ = std::fs::remove_file(&tmp_index);
                std::fs::hard_link(&tmp, &tmp_index)
                    .and_then(|()| std::fs::rename(&tmp_index, index))
            }
            r => r,
        };
        if let Err(e) = linked {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err("linking the index entry", index, e));
        }
        std::fs::rename(&tmp, &p).map_err(|e| io_err("renaming to", &p, e))
    }

    fn remove(path: &Path) -> Result<(), CniError> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", path, e)),
        }
    }

    /// The allocation of an attachment, if any (no lock: files are replaced atomically).
    pub fn get(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<AllocationRecord>, CniError> {
        let idx = self.index_path(container_id, ifname)?;
        let Some(ip) = self.read_index(&idx)? else {
            return Ok(None);
        };
        Ok(self
            .read_record(ip)?
            .filter(|r| r.same_attachment(container_id, ifname)))
    }

    /// Allocates an address of `subnet` for the attachment, or returns the one it already
    /// holds (with the pod metadata refreshed). Exhaustion is error code 101.
    pub fn allocate(
        &self,
        req: &AllocationRequest,
        subnet: Ipv4Network,
    ) -> Result<AllocationRecord, CniError> {
        let network = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some((lo, hi)) = usable_range(subnet) else {
            return Err(CniError::new(
                code::ADDRESSES_EXHAUSTED,
                format!("the node subnet {subnet} is too small for containers"),
            ));
        };
        let lock = self.lock()?;
        let idx = self.index_path(&req.container_id, &req.ifname)?;
        let make = |ip: Ipv4Addr| AllocationRecord {
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
            ip,
            prefix: subnet.prefix(),
            namespace: req.namespace.clone(),
            name: req.name.clone(),
            labels: req.labels.clone(),
            netns: req.netns.clone(),
            network: network.clone(),
        };
        if let Some(ip) = self.read_index(&idx)?
            && let Some(old) = self.read_record(ip)?
            && old.same_attachment(&req.container_id, &req.ifname)
        {
            let n = u32::from(ip);
            if subnet.contains(ip) && (lo..=hi).contains(&n) {
                let rec = make(ip);
                if rec != old {
                    self.write_record(&rec, &idx)?;
                }
                return Ok(rec);
            }
            // From an older subnet of this node: give it up.
            Self::remove(&self.record_path(ip)?)?;
        }
        let ip_dir = self.dir.join(IP_DIR);
        let last = Self::last_reserved(&lock);
        let taken =
            |c: u32| std::fs::symlink_metadata(ip_dir.join(Ipv4Addr::from(c).to_string())).is_ok();
        let Some(n) = next_free(lo, hi, last, taken) else {
            return Err(CniError::new(
                code::ADDRESSES_EXHAUSTED,
                format!("no free address left in {subnet}"),
            )
            .details(format!(
                "{} addresses are allocated; DEL or GC frees them",
                hi - lo + 1
            )));
        };
        let rec = make(Ipv4Addr::from(n));
        // Index first, record second: every record always has its index entry.
        self.write_record(&rec, &idx)?;
        self.set_last_reserved(&lock, rec.ip)?;
        Ok(rec)
    }

    /// Frees the attachment's address; `Ok(None)` when it held none (DEL is idempotent).
    pub fn release(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<AllocationRecord>, CniError> {
        let _lock = self.lock()?;
        let idx = self.index_path(container_id, ifname)?;
        let Some(ip) = self.read_index(&idx)? else {
            // Garbage left in the index slot (by hand, or a killed process): remove it too.
            Self::remove(&idx)?;
            return Ok(None);
        };
        let rec = self
            .read_record(ip)?
            .filter(|r| r.same_attachment(container_id, ifname));
        if rec.is_some() {
            Self::remove(&self.record_path(ip)?)?;
        }
        Self::remove(&idx)?;
        Ok(rec)
    }

    /// Every allocation of this network (records that do not decode are skipped).
    pub fn records(&self) -> Result<Vec<AllocationRecord>, CniError> {
        let ip_dir = self.dir.join(IP_DIR);
        let rd = match std::fs::read_dir(&ip_dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("listing", &ip_dir, e)),
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(ip) = name.to_str().and_then(|s| s.parse::<Ipv4Addr>().ok()) else {
                continue;
            };
            if let Ok(Some(b)) = read_record_file(&e.path())
                && let Some(r) = decode_record(&b)
                && r.ip == ip
            {
                out.push(r);
            }
        }
        out.sort_by_key(|r| r.ip);
        Ok(out)
    }

    /// Frees every allocation whose attachment is not in `valid`, plus leftovers of killed
    /// processes (temporary files, records that do not decode, dangling index entries).
    /// Returns the freed allocations.
    pub fn gc(&self, valid: &HashSet<(String, String)>) -> Result<Vec<AllocationRecord>, CniError> {
        let _lock = self.lock()?;
        let ip_dir = self.dir.join(IP_DIR);
        let idx_dir = self.dir.join(INDEX_DIR);
        let mut freed = Vec::new();
        let mut kept: HashSet<(String, String, Ipv4Addr)> = HashSet::new();
        let rd = std::fs::read_dir(&ip_dir).map_err(|e| io_err("listing", &ip_dir, e))?;
        for e in rd.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let parsed = name.parse::<Ipv4Addr>().ok().and_then(|ip| {
                read_record_file(&path)
                    .ok()
                    .flatten()
                    .and_then(|b| decode_record(&b))
                    .filter(|r| r.ip == ip)
            });
            match parsed {
                Some(r) if valid.contains(&(r.container_id.clone(), r.ifname.clone())) => {
                    kept.insert((r.container_id, r.ifname, r.ip));
                }
                Some(r) => {
                    Self::remove(&path)?;
                    freed.push(r);
                }
                // Temporary files and garbage: only we write here, under the lock.
                None => Self::remove(&path)?,
            }
        }
        let rd = std::fs::read_dir(&idx_dir).map_err(|e| io_err("listing", &idx_dir, e))?;
        for e in rd.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let keep = name.split_once(':').is_some_and(|(cid, ifname)| {
                self.read_index(&path)
                    .ok()
                    .flatten()
                    .is_some_and(|ip| kept.contains(&(cid.to_string(), ifname.to_string(), ip)))
            });
            if !keep {
                Self::remove(&path)?;
            }
        }
        freed.sort_by_key(|r| r.ip);
        Ok(freed)
    }
}

/// Modification times of the directories whose entries change with every allocation and
/// release: `data_dir` itself (networks appear there) and each network's `ip/` (records are
/// renamed into it and removed from it), `None` where absent. Comparing two stamps tells
/// whether a scan can find anything new: one `readdir` of `data_dir` and one `stat` per
/// network, whatever the number of pods.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirStamp(pub Vec<(String, Option<std::time::SystemTime>)>);

impl DirStamp {
    /// The newest time in the stamp.
    pub fn newest(&self) -> Option<std::time::SystemTime> {
        self.0.iter().filter_map(|(_, t)| *t).max()
    }
}

/// The [`DirStamp`] of `data_dir` now.
pub fn dir_stamp(data_dir: &Path) -> DirStamp {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut out = vec![(String::new(), mtime(data_dir))];
    if let Ok(rd) = std::fs::read_dir(data_dir) {
        let mut nets: Vec<(String, Option<std::time::SystemTime>)> = rd
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| validate_network_name(n).is_ok())
            .map(|n| {
                let t = mtime(&data_dir.join(&n).join(IP_DIR));
                (n, t)
            })
            .collect();
        nets.sort();
        out.extend(nets);
    }
    DirStamp(out)
}

/// Every allocation of every network under `data_dir` (what tartand registers).
pub fn scan_all(data_dir: &Path) -> std::io::Result<Vec<AllocationRecord>> {
    let rd = match std::fs::read_dir(data_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !e.file_type().is_ok_and(|t| t.is_dir()) || validate_network_name(&name).is_err() {
            continue;
        }
        let store = IpamStore {
            dir: data_dir.join(&name),
        };
        if let Ok(mut recs) = store.records() {
            for r in &mut recs {
                r.network = name.clone();
            }
            out.extend(recs);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
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
}
