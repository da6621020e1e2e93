//! tartand's side of the CNI plugin:
//!
//! - installs the CNI network config (`10-tartan.conflist`) once the node's subnet is leased,
//!   and the `tartan-cni` binary when asked;
//! - listens on a unix socket for the plugin's nudges (`sync\n` → `ok\n`);
//! - reaps the veth pairs tartan-cni's DEL detached (one batched kernel request on a thread
//!   of its own: deleting veths costs the kernel ~15-20 ms per batch);
//! - registers the pods it finds in the IPAM directory as [`PodRecord`]s in etcd, attached to
//!   the node's liveness lease: at start, on every nudge, whenever the directory's stamp
//!   ([`dir_stamp`], checked every [`CHANGE_CHECK`]) differs from the last scan's, every
//!   [`RESCAN`] and whenever the lease changes (then everything is written again). It diffs
//!   against what it registered, so a rescan with no change costs no etcd request.
//!
//! The nudge is the fast path (registration ≈ [`NUDGE_SETTLE`] after ADD); the stamp check
//! bounds what a lost nudge costs (tartand restarting, the socket replaced or busy): a pod is
//! registered at most [`CHANGE_CHECK`] plus one scan and one etcd write after its ADD, whether
//! or not the nudge arrived. Why a stamp and not inotify: the check costs one `readdir` of the
//! data directory and one `stat` per network once a second (tartand as a whole uses ≈ 1 ms
//! of CPU per second at rest with 200 pods, docs/benchmarks.md),
//! needs no watch bookkeeping for networks and `ip/` directories that come and go, and works
//! on any file system; inotify would save at most the one second a lost nudge costs.
//!
//! The IPAM directory is the source of truth: after a daemon restart (or a lost lease) the
//! records are rebuilt from it, and records etcd holds for pods that are gone are deleted.

use crate::store::keys::{node_pods_prefix, pod_key};
use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use ipnetwork::Ipv4Network;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, watch};
use tracing::{debug, error, info, warn};

use crate::cni::daemon_link::{SYNC_REPLY, SYNC_REQUEST};
use crate::cni::ipam::{AllocationRecord, DirStamp, dir_stamp, scan_all};
use crate::cni::spec::CniVersion;
use crate::store::etcd::{EtcdArgs, Store};
use crate::util::backoff::Backoff;

use crate::model::subnet_env::write_file_atomic;
use crate::node::subnet_keeper::OwnLease;

/// How often the IPAM directory's stamp is compared with the last scan's: the longest a pod
/// whose nudge was lost waits for its rescan.
pub const CHANGE_CHECK: Duration = Duration::from_secs(1);
/// A stamp whose newest time lies within this of when it was taken may hide a change made
/// right after with the same timestamp (file system timestamps are coarse: a jiffy on ext4
/// and tmpfs, up to 2 s on FAT): the next check rescans anyway ("racy" as git calls it).
pub const RACY_WINDOW: Duration = Duration::from_secs(2);
/// Unconditional rescan of the IPAM directory (the last safety net, for file systems whose
/// directory times do not move).
pub const RESCAN: Duration = Duration::from_secs(10);
/// How long a rescan waits after a plugin's nudge (the registration lags ADD by this much).
pub const NUDGE_SETTLE: Duration = Duration::from_millis(10);
/// How long the reaper lets detached veths accumulate before deleting them in one batch.
pub const REAP_BATCH_DELAY: Duration = Duration::from_millis(300);
/// File name of the installed network config.
pub const CONFLIST_NAME: &str = "10-tartan.conflist";
/// Network name in the installed config (also the IPAM subdirectory).
pub const NETWORK_NAME: &str = "tartan";
/// The plugin binary's name.
pub const PLUGIN_BINARY: &str = "tartan-cni";

/// tartand's CNI flags.
#[derive(clap::Args, Debug, Clone)]
pub struct CniArgs {
    /// Install the CNI network config (10-tartan.conflist) here once the subnet is leased.
    #[arg(long)]
    pub cni_conf_dir: Option<PathBuf>,
    /// Copy the tartan-cni binary (shipped next to tartand) into this directory.
    #[arg(long)]
    pub cni_bin_dir: Option<PathBuf>,
    /// IPAM directory of tartan-cni; tartand registers the pods it finds there.
    #[arg(long, default_value = crate::cni::spec::DEFAULT_DATA_DIR)]
    pub cni_data_dir: PathBuf,
    /// Unix socket tartan-cni nudges after ADD/DEL.
    #[arg(long, default_value = crate::cni::spec::DEFAULT_DAEMON_SOCKET)]
    pub cni_socket: PathBuf,
    /// cniVersion of the installed conflist. 1.0.0 by default: Debian 12's podman and
    /// reference plugins (portmap, chained after tartan-cni) do not know 1.1.0.
    #[arg(long, default_value = "1.0.0", value_parser = parse_cni_version)]
    pub cni_conf_version: CniVersion,
}

fn parse_cni_version(s: &str) -> Result<CniVersion, String> {
    CniVersion::parse(s).map_err(|e| format!("{} ({})", e.msg, e.details))
}

impl CniArgs {
    /// The settings, with tartand's subnet.env path.
    pub fn settings(&self, subnet_file: &Path) -> CniSettings {
        CniSettings {
            conf_dir: self.cni_conf_dir.clone(),
            bin_dir: self.cni_bin_dir.clone(),
            data_dir: self.cni_data_dir.clone(),
            socket: self.cni_socket.clone(),
            conf_version: self.cni_conf_version,
            subnet_file: subnet_file.to_path_buf(),
        }
    }
}

/// Where the CNI pieces live on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniSettings {
    /// Where to install the conflist (none: do not install).
    pub conf_dir: Option<PathBuf>,
    /// Where to install the plugin binary (none: do not install).
    pub bin_dir: Option<PathBuf>,
    /// The IPAM directory root.
    pub data_dir: PathBuf,
    /// The socket the plugin nudges.
    pub socket: PathBuf,
    /// cniVersion of the installed conflist.
    pub conf_version: CniVersion,
    /// subnet.env (the plugin reads it).
    pub subnet_file: PathBuf,
}

/// The conflist tartand installs: tartan-cni first, then `portmap` for `portMappings`.
pub fn conflist(s: &CniSettings) -> String {
    let v = serde_json::json!({
        "cniVersion": s.conf_version.as_str(),
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": PLUGIN_BINARY,
                "subnetFile": s.subnet_file,
                "dataDir": s.data_dir,
                "daemonSocket": s.socket,
            },
            {
                "type": "portmap",
                "capabilities": {"portMappings": true},
            },
        ],
    });
    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
}

/// Writes the conflist into `dir` atomically unless it is already there unchanged; returns
/// whether it wrote.
pub fn install_conflist(dir: &Path, s: &CniSettings) -> Result<bool> {
    let path = dir.join(CONFLIST_NAME);
    let text = conflist(s);
    if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
        return Ok(false);
    }
    write_file_atomic(&path, text.as_bytes())?;
    Ok(true)
}

/// Copies `tartan-cni` from next to the running tartand into `dir` (atomically, mode 0755)
/// unless an identical copy is there; returns whether it copied.
pub fn install_binary(dir: &Path) -> Result<bool> {
    let exe = std::env::current_exe().context("locating tartand's own binary")?;
    let src = exe
        .parent()
        .map(|p| p.join(PLUGIN_BINARY))
        .context("tartand's binary has no directory")?;
    let bytes = std::fs::read(&src)
        .with_context(|| format!("reading {} (it ships next to tartand)", src.display()))?;
    let dst = dir.join(PLUGIN_BINARY);
    if std::fs::read(&dst).ok().as_deref() == Some(bytes.as_slice()) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".{PLUGIN_BINARY}.tmp.{}", std::process::id()));
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", tmp.display()))?;
    std::fs::rename(&tmp, &dst).with_context(|| format!("installing {}", dst.display()))?;
    Ok(true)
}

/// The records this node should have in etcd: one per allocation inside the node's current
/// subnet (allocations from an older subnet are stale), keyed by their etcd key.
pub fn desired_records(
    allocs: &[AllocationRecord],
    keys: &EtcdArgs,
    node: &str,
    subnet: Option<Ipv4Network>,
) -> BTreeMap<String, Vec<u8>> {
    allocs
        .iter()
        .filter(|a| subnet.is_none_or(|s| s.contains(a.ip)))
        .map(|a| {
            let rec = a.to_pod_record(node);
            (pod_key(keys, &rec), rec.to_bytes())
        })
        .collect()
}

/// What to change in etcd to go from `registered` to `desired`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RegistrationPlan {
    /// Keys to write (new or changed).
    pub puts: Vec<(String, Vec<u8>)>,
    /// Keys to delete.
    pub deletes: Vec<String>,
}

/// The difference between what should be registered and what is.
pub fn plan(
    desired: &BTreeMap<String, Vec<u8>>,
    registered: &BTreeMap<String, Vec<u8>>,
) -> RegistrationPlan {
    RegistrationPlan {
        puts: desired
            .iter()
            .filter(|(k, v)| registered.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        deletes: registered
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect(),
    }
}

/// The IPAM directory's stamp when a scan started, and when it was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanStamp {
    /// The directories' times.
    pub dirs: DirStamp,
    /// When they were read (before the scan read the records).
    pub taken: std::time::SystemTime,
}

impl ScanStamp {
    /// The stamp of `data_dir` now.
    pub fn take(data_dir: &Path) -> ScanStamp {
        let taken = std::time::SystemTime::now();
        ScanStamp {
            dirs: dir_stamp(data_dir),
            taken,
        }
    }
}

/// Whether the IPAM directory, stamped `now`, may hold something the last scan (started at
/// `last`) did not see: never scanned, the stamp moved, or the last stamp was too fresh to
/// rule out a change within the same timestamp ([`RACY_WINDOW`]).
pub fn needs_rescan(last: Option<&ScanStamp>, now: &DirStamp) -> bool {
    let Some(last) = last else {
        return true;
    };
    last.dirs != *now
        || last
            .dirs
            .newest()
            .is_some_and(|t| t + RACY_WINDOW > last.taken)
}

fn bind_socket(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(l)
}

/// Starts the reaper thread; a message on the returned channel asks for a reap (requests
/// arriving while one is pending or running are merged).
fn spawn_reaper() -> std::sync::mpsc::SyncSender<()> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
    let spawned = std::thread::Builder::new()
        .name("cni-reaper".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    error!("CNI reaper: runtime: {e}");
                    return;
                }
            };
            let nl = {
                let _g = rt.enter();
                match crate::kernel::netlink::Netlink::connect() {
                    Ok(nl) => nl,
                    Err(e) => {
                        error!("CNI reaper: {e:#}");
                        return;
                    }
                }
            };
            while rx.recv().is_ok() {
                std::thread::sleep(REAP_BATCH_DELAY);
                while rx.try_recv().is_ok() {}
                match rt.block_on(crate::cni::links::reap_detached(&nl)) {
                    Ok(0) => {}
                    Ok(_) => debug!("reaped detached pod interfaces"),
                    Err(e) => warn!("reaping detached pod interfaces: {e}"),
                }
            }
        });
    if let Err(e) = spawned {
        error!("CNI reaper thread: {e}");
    }
    tx
}

async fn serve_conn(stream: UnixStream, notify: Arc<Notify>) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    // A plugin connects at the start of ADD and writes once its work is done (milliseconds).
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await
    {
        let reply = if line.trim() == SYNC_REQUEST {
            notify.notify_one();
            format!("{SYNC_REPLY}\n")
        } else {
            "error unknown request\n".to_string()
        };
        if w.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn serve(listener: UnixListener, notify: Arc<Notify>) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(serve_conn(s, notify.clone()));
            }
            Err(e) => {
                warn!("CNI socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Applies a plan; returns the keys that succeeded (puts, deletes) and the first error.
async fn apply(
    store: &Store,
    lease: i64,
    p: RegistrationPlan,
) -> (Vec<(String, Vec<u8>)>, Vec<String>, Option<anyhow::Error>) {
    let puts: Vec<_> = futures::stream::iter(p.puts.into_iter().map(|(k, v)| {
        let s = store.clone();
        async move {
            let r = s.put(&k, v.clone(), lease).await;
            (k, v, r)
        }
    }))
    .buffer_unordered(32)
    .collect()
    .await;
    let dels: Vec<_> = futures::stream::iter(p.deletes.into_iter().map(|k| {
        let s = store.clone();
        async move {
            let r = s.delete(&k).await;
            (k, r)
        }
    }))
    .buffer_unordered(32)
    .collect()
    .await;
    let mut err = None;
    let mut ok_puts = Vec::new();
    let mut ok_dels = Vec::new();
    for (k, v, r) in puts {
        match r {
            Ok(()) => ok_puts.push((k, v)),
            Err(e) => {
                err.get_or_insert(e);
            }
        }
    }
    for (k, r) in dels {
        match r {
            Ok(_) => ok_dels.push(k),
            Err(e) => {
                err.get_or_insert(e);
            }
        }
    }
    (ok_puts, ok_dels, err)
}

/// Runs forever: installs the CNI config and binary, serves the socket, keeps etcd's pod
/// records of this node equal to the IPAM directory.
pub async fn run(
    store: Store,
    keys: EtcdArgs,
    node: String,
    settings: CniSettings,
    own_rx: watch::Receiver<Option<OwnLease>>,
    mut lease_rx: watch::Receiver<Option<i64>>,
) {
    let notify = Arc::new(Notify::new());
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    // The socket first: once the conflist is installed, runtimes call the plugin at once.
    listen(&settings, &notify, &mut backoff).await;
    install(&settings);

    let reaper = spawn_reaper();
    backoff.reset();
    let mut tick = tokio::time::interval(RESCAN);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check = tokio::time::interval(CHANGE_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let prefix = node_pods_prefix(&keys, &node);
    let mut reg = Registrar {
        store,
        keys,
        node,
        settings,
        own_rx,
        prefix,
        backoff,
        registered: BTreeMap::new(),
        current: None,
        sweep: true,
        retry: false,
        last_scan: None,
    };
    loop {
        let Some(cause) = reg
            .next_cause(&notify, &mut tick, &mut check, &mut lease_rx)
            .await
        else {
            return;
        };
        let _ = reaper.try_send(());
        let Some(lease) = *lease_rx.borrow() else {
            continue;
        };
        reg.pass(lease, cause).await;
    }
}

/// Binds the CNI socket (retrying with `backoff` until it works) and serves it.
async fn listen(settings: &CniSettings, notify: &Arc<Notify>, backoff: &mut Backoff) {
    loop {
        match bind_socket(&settings.socket) {
            Ok(l) => {
                info!(socket = %settings.socket.display(), "CNI socket listening");
                tokio::spawn(serve(l, notify.clone()));
                break;
            }
            Err(e) => {
                error!("CNI socket: {e:#}; retrying");
                backoff.wait().await;
            }
        }
    }
}

/// Installs the plugin binary and the conflist where `settings` asks (errors are logged).
fn install(settings: &CniSettings) {
    if let Some(dir) = &settings.bin_dir {
        match install_binary(dir) {
            Ok(true) => info!(dir = %dir.display(), "installed {PLUGIN_BINARY}"),
            Ok(false) => {}
            Err(e) => error!("installing {PLUGIN_BINARY}: {e:#}"),
        }
        if !dir.join("portmap").exists() {
            warn!(dir = %dir.display(), "no portmap plugin there; the conflist chains it");
        }
    }
    if let Some(dir) = &settings.conf_dir {
        match install_conflist(dir, settings) {
            Ok(true) => info!(dir = %dir.display(), "installed {CONFLIST_NAME}"),
            Ok(false) => {}
            Err(e) => error!("installing {CONFLIST_NAME}: {e:#}"),
        }
    }
}

/// The registration loop: where the records go, and what it keeps between passes.
struct Registrar {
    store: Store,
    keys: EtcdArgs,
    node: String,
    settings: CniSettings,
    own_rx: watch::Receiver<Option<OwnLease>>,
    /// This node's pod records in etcd.
    prefix: String,
    backoff: Backoff,
    /// What this loop has written (or found to delete) under the current lease.
    registered: BTreeMap<String, Vec<u8>>,
    /// The lease `registered` belongs to.
    current: Option<i64>,
    /// Whether etcd is still to be listed for records no allocation backs.
    sweep: bool,
    /// Whether the last pass failed (then a retry comes after the backoff's delay).
    retry: bool,
    last_scan: Option<ScanStamp>,
}

impl Registrar {
    /// Waits for the next reason to scan: a nudge (after [`NUDGE_SETTLE`]), a changed
    /// directory stamp, the periodic rescan, a lease change or a retry. None when the lease
    /// channel is closed.
    async fn next_cause(
        &mut self,
        notify: &Notify,
        tick: &mut tokio::time::Interval,
        check: &mut tokio::time::Interval,
        lease_rx: &mut watch::Receiver<Option<i64>>,
    ) -> Option<&'static str> {
        loop {
            let retry_in = if self.retry {
                self.backoff.next_delay()
            } else {
                Duration::from_secs(3600)
            };
            let cause = tokio::select! {
                _ = notify.notified() => {
                    // Let the plugin that nudged finish first (and merge the nudges of pods
                    // started together): on a small node the rescan would otherwise compete
                    // with the runtime's call for a CPU.
                    tokio::time::sleep(NUDGE_SETTLE).await;
                    "nudge"
                }
                _ = check.tick() => {
                    // A readdir and a stat per network, no scan, unless something changed
                    // since the last scan (a lost nudge, or a change the nudged scan raced
                    // with).
                    if !needs_rescan(self.last_scan.as_ref(), &dir_stamp(&self.settings.data_dir)) {
                        continue;
                    }
                    "directory changed"
                }
                _ = tick.tick() => "periodic",
                r = lease_rx.changed() => {
                    if r.is_err() {
                        return None;
                    }
                    "lease"
                }
                _ = tokio::time::sleep(retry_in) => "retry",
            };
            return Some(cause);
        }
    }

    /// One pass under `lease`: scans the IPAM directory, sweeps etcd once per lease, then
    /// writes and deletes what differs from what is registered.
    async fn pass(&mut self, lease: i64, cause: &'static str) {
        if self.current != Some(lease) {
            self.registered.clear();
            self.current = Some(lease);
            self.sweep = true;
        }
        let subnet = self.own_rx.borrow().as_ref().map(|o| o.subnet);
        let Some(allocs) = self.scan().await else {
            return;
        };
        let desired = desired_records(&allocs, &self.keys, &self.node, subnet);
        if self.sweep && !self.sweep_stale(&desired).await {
            return;
        }
        let p = plan(&desired, &self.registered);
        if p.puts.is_empty() && p.deletes.is_empty() {
            self.retry = false;
            self.backoff.reset();
            return;
        }
        self.update(lease, p, cause).await;
    }

    /// Scans the IPAM directory on a blocking thread, remembering its stamp; None (and a
    /// retry) when it cannot be read.
    async fn scan(&mut self) -> Option<Vec<AllocationRecord>> {
        let dir = self.settings.data_dir.clone();
        let scanned = tokio::task::spawn_blocking(move || {
            let stamp = ScanStamp::take(&dir);
            scan_all(&dir).map(|a| (stamp, a))
        })
        .await;
        match scanned {
            Ok(Ok((stamp, a))) => {
                self.last_scan = Some(stamp);
                Some(a)
            }
            Ok(Err(e)) => {
                warn!("scanning {}: {e}", self.settings.data_dir.display());
                self.retry = true;
                None
            }
            Err(e) => {
                warn!("scanning the IPAM directory: {e}");
                self.retry = true;
                None
            }
        }
    }

    /// Counts the records a previous run left that no allocation backs any more as
    /// registered (so the plan deletes them). False (and a retry) when etcd cannot list them.
    async fn sweep_stale(&mut self, desired: &BTreeMap<String, Vec<u8>>) -> bool {
        match self.store.list(&self.prefix).await {
            Ok((_, items)) => {
                for it in items {
                    if !desired.contains_key(&it.key) {
                        self.registered.insert(it.key, it.value);
                    }
                }
                self.sweep = false;
                true
            }
            Err(e) => {
                warn!("listing pod records: {e:#}");
                self.retry = true;
                false
            }
        }
    }

    /// Applies plan `p` and records what succeeded; a failure asks for a retry.
    async fn update(&mut self, lease: i64, p: RegistrationPlan, cause: &'static str) {
        let (n_put, n_del) = (p.puts.len(), p.deletes.len());
        let (puts, dels, err) = apply(&self.store, lease, p).await;
        for (k, v) in puts {
            debug!(key = %k, "pod registered");
            self.registered.insert(k, v);
        }
        for k in dels {
            debug!(key = %k, "pod record removed");
            self.registered.remove(&k);
        }
        match err {
            None => {
                info!(
                    registered = n_put,
                    removed = n_del,
                    pods = self.registered.len(),
                    cause,
                    "pod records updated"
                );
                self.retry = false;
                self.backoff.reset();
            }
            Some(e) => {
                warn!("updating pod records: {e:#}; retrying");
                self.retry = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> EtcdArgs {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct A {
            #[command(flatten)]
            e: EtcdArgs,
        }
        A::parse_from(["x"]).e
    }

    fn alloc(cid: &str, ip: [u8; 4]) -> AllocationRecord {
        AllocationRecord {
            container_id: cid.into(),
            ifname: "eth0".into(),
            ip: ip.into(),
            prefix: 24,
            namespace: "default".into(),
            name: cid.into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            netns: String::new(),
            network: "tartan".into(),
            ip6: None,
            prefix6: None,
        }
    }

    #[test]
    fn desired_state_and_diff() {
        let k = keys();
        let allocs = vec![
            alloc("a", [10, 244, 3, 2]),
            alloc("b", [10, 244, 3, 3]),
            alloc("old", [10, 244, 9, 2]),
        ];
        let d = desired_records(&allocs, &k, "n1", Some("10.244.3.0/24".parse().unwrap()));
        assert_eq!(
            d.keys().cloned().collect::<Vec<_>>(),
            vec!["/tartan/pods/n1/a/eth0", "/tartan/pods/n1/b/eth0"]
        );
        let rec = crate::model::pod::PodRecord::parse(&d["/tartan/pods/n1/a/eth0"]).unwrap();
        assert_eq!(rec.labels["app"], "web");
        assert_eq!(rec.node, "n1");
        let mut registered = BTreeMap::new();
        let p = plan(&d, &registered);
        assert_eq!(p.puts.len(), 2);
        assert!(p.deletes.is_empty());
        registered.extend(p.puts);
        assert_eq!(plan(&d, &registered), RegistrationPlan::default());
        registered.insert("/tartan/pods/n1/gone/eth0".into(), b"{}".to_vec());
        registered.insert("/tartan/pods/n1/a/eth0".into(), b"stale".to_vec());
        let p = plan(&d, &registered);
        assert_eq!(p.deletes, vec!["/tartan/pods/n1/gone/eth0".to_string()]);
        assert_eq!(p.puts.len(), 1);
        assert_eq!(p.puts[0].0, "/tartan/pods/n1/a/eth0");
    }

    #[test]
    fn a_moved_or_fresh_stamp_means_rescan() {
        use std::time::{SystemTime, UNIX_EPOCH};
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let dirs = |t: u64| DirStamp(vec![(String::new(), Some(at(t))), ("tartan".into(), None)]);
        let scan = |t: u64, taken: u64| ScanStamp {
            dirs: dirs(t),
            taken: at(taken),
        };
        assert!(needs_rescan(None, &dirs(100)), "never scanned");
        assert!(
            !needs_rescan(Some(&scan(100, 200)), &dirs(100)),
            "nothing moved"
        );
        assert!(needs_rescan(Some(&scan(100, 200)), &dirs(201)), "moved");
        let mut net_appeared = dirs(100);
        net_appeared.0[1].1 = Some(at(150));
        assert!(needs_rescan(Some(&scan(100, 200)), &net_appeared));
        // Taken within the racy window of its newest time: a change right after may carry the
        // same time, so the next check scans again; once old enough it stops.
        assert!(needs_rescan(Some(&scan(100, 101)), &dirs(100)));
        assert!(!needs_rescan(Some(&scan(100, 102)), &dirs(100)));
        let now = SystemTime::now();
        let fresh = ScanStamp {
            dirs: DirStamp(vec![(String::new(), Some(now))]),
            taken: now,
        };
        assert!(needs_rescan(Some(&fresh), &fresh.dirs.clone()));
    }

    #[test]
    fn conflist_shape() {
        let s = CniSettings {
            conf_dir: None,
            bin_dir: None,
            data_dir: "/var/lib/tartan/cni".into(),
            socket: "/run/tartan/tartand.sock".into(),
            conf_version: CniVersion::V1_0_0,
            subnet_file: "/run/tartan/subnet.env".into(),
        };
        let v: serde_json::Value = serde_json::from_str(&conflist(&s)).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["name"], "tartan");
        assert_eq!(v["plugins"][0]["type"], "tartan-cni");
        assert_eq!(v["plugins"][0]["daemonSocket"], "/run/tartan/tartand.sock");
        assert_eq!(v["plugins"][1]["type"], "portmap");
        assert_eq!(v["plugins"][1]["capabilities"]["portMappings"], true);
        // The plugin accepts what tartand writes.
        let mut plugin = v["plugins"][0].clone();
        plugin["cniVersion"] = v["cniVersion"].clone();
        plugin["name"] = v["name"].clone();
        let c = crate::cni::spec::NetConf::parse(plugin.to_string().as_bytes()).unwrap();
        assert_eq!(c.daemon_socket, s.socket);
        assert_eq!(c.data_dir, s.data_dir);
    }
}
