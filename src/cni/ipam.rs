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
//! In a dual-stack network a record holds the pod's IPv6 address too: the node's IPv6
//! subnet with the IPv4 address's host part (`10.244.3.7` ↔ `fd00:10:244:3::7`), unique on
//! the node because the IPv4 address is, and readable at a glance.
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
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ipnetwork::{Ipv4Network, Ipv6Network};
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
    /// The pod's IPv6 address (dual-stack networks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    /// Prefix length of the node's IPv6 subnet the IPv6 address came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix6: Option<u8>,
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
            ip6: self.ip6,
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

/// The IPv6 address paired with `ip` of `subnet` in the IPv6 subnet `subnet6`: the same host
/// part. `None` when the IPv6 subnet has fewer host bits than the IPv4 one.
pub fn ipv6_for(ip: Ipv4Addr, subnet: Ipv4Network, subnet6: Ipv6Network) -> Option<Ipv6Addr> {
    let host = u32::from(ip).checked_sub(u32::from(subnet.network()))?;
    if 128 - u32::from(subnet6.prefix()) < 32 - u32::from(subnet.prefix()) {
        return None;
    }
    Some(Ipv6Addr::from(
        u128::from(subnet6.network()) | u128::from(host),
    ))
}

/// The gateway of a node's IPv6 subnet: its first address.
pub fn gateway6(subnet6: Ipv6Network) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(subnet6.network()).wrapping_add(1))
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
        self.allocate_dual(req, subnet, None)
    }

    /// [`IpamStore::allocate`] in a dual-stack network: with `subnet6`, the record holds the
    /// paired IPv6 address ([`ipv6_for`]) too; a record from before the node had an IPv6
    /// subnet gets it.
    pub fn allocate_dual(
        &self,
        req: &AllocationRequest,
        subnet: Ipv4Network,
        subnet6: Option<Ipv6Network>,
    ) -> Result<AllocationRecord, CniError> {
        if let Some(s6) = subnet6
            && 128 - u32::from(s6.prefix()) < 32 - u32::from(subnet.prefix())
        {
            return Err(CniError::new(
                code::ADDRESSES_EXHAUSTED,
                format!("the node's IPv6 subnet {s6} is smaller than its IPv4 subnet {subnet}"),
            ));
        }
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
            ip6: subnet6.and_then(|s6| ipv6_for(ip, subnet, s6)),
            prefix6: subnet6.map(|s6| s6.prefix()),
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
mod tests;
