//! tartand's side of tartan-cni's socket: the `sync` nudge (DEL, GC) and the whole ADD, done
//! in an already running process so a pod's ADD costs one exec of the plugin plus the kernel
//! work, not a process start-up, a runtime and two netlink sockets.
//!
//! Threads, none of them tartand's main runtime (etcd, the overlay and the service proxy
//! never delay an ADD, and an ADD never blocks them):
//!
//! - `cni-server`: a current-thread runtime that accepts connections (at most
//!   [`MAX_CONNECTIONS`] at once, the rest get "busy"), checks the peer is root (or tartand's
//!   own user), reads each request line with `recvmsg` (so the namespace descriptor attached
//!   to an ADD arrives with it; [`REQUEST_TIMEOUT`] to send it), answers `sync` at once and
//!   queues ADDs ([`QUEUE`] deep) for the workers;
//! - `cni-add-N` ([`WORKERS`] of them): each with a runtime and a netlink socket of the node
//!   namespace, kept for its lifetime. A worker takes an ADD and does the plugin's old work:
//!   a netlink socket opened inside the passed namespace (the thread enters it only for the
//!   `socket()` call), the file-based IPAM (same files and `flock` as the plugin's DEL, CHECK
//!   and GC), the veth pair created in one request with the host end already on the bridge
//!   (the bridge's index is cached and re-verified in the same pipelined batch, see
//!   [`BridgeCache`]), hairpin, address, route and `lo` in the pod; then it writes the reply
//!   itself and nudges the registrar. A reply that cannot be delivered (the plugin was killed
//!   or timed out) undoes the ADD: the veth is deleted, a new allocation freed.
//!
//! A request never panics tartand: everything is validated again here, a worker that panics
//! anyway is replaced, and a worker whose thread could not return to the node namespace
//! retires (it is replaced by a thread started from `cni-server`, which never changes
//! namespace). Two ADDs of the same attachment at once: the second gets code 11.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{ErrorKind, IoSliceMut, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use netlink_packet_route::RouteNetlinkMessage;
use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::sync::{Notify, Semaphore, mpsc};
use tracing::{debug, error, info, warn};

use super::daemon_link::{
    AddRequest, AddedPod, MAX_REQUEST, OP_ADD, PROTOCOL_VERSION, Reply, SYNC_REPLY, SYNC_REQUEST,
};
use super::error::{CniError, code};
use super::ipam::{self, AllocationRequest, IpamStore};
use super::links::{self, Bridge, MAC_KIND_HOST, MAC_KIND_POD, VethSpec};
use super::nl_batch::{Answer, Request, SyncNetlink};
use super::spec::{validate_container_id, validate_ifname, validate_network_name};
use crate::netlink_ops::Netlink;

/// ADD workers (the kernel serializes most of their netlink work on the RTNL lock anyway).
pub const WORKERS: usize = 4;
/// ADDs waiting for a worker; further requests wait for room (bounded by
/// [`MAX_CONNECTIONS`] and the plugin's own timeout).
pub const QUEUE: usize = 64;
/// Connections served at once; more get "busy" (code 11) at once.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a client has to send a request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a queued ADD may wait for a worker before it is answered "busy".
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(10);
/// File descriptors one `recvmsg` can bring (the kernel's SCM_MAX_FD): room for all of them,
/// so the control data is never truncated and every received descriptor gets closed.
const MAX_FDS: usize = 253;
const EEXIST: i32 = 17;
/// Statfs magic of nsfs (namespace files).
const NSFS: nix::sys::statfs::FsType = nix::sys::statfs::NSFS_MAGIC;

/// Bridge indexes by name, shared by the workers. An entry is only a hint: every veth
/// creation that uses it is followed, in the same pipelined batch on the same netlink
/// socket, by a look-up of that index, so a bridge deleted, renamed or re-created behind
/// tartand's back is noticed before the ADD succeeds (the veth is then deleted and created
/// again on the bridge as it is now).
#[derive(Debug, Default)]
pub struct BridgeCache(Mutex<HashMap<String, Bridge>>);

impl BridgeCache {
    fn get(&self, name: &str) -> Option<Bridge> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }
    fn put(&self, name: &str, b: &Bridge) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), b.clone());
    }
    fn forget(&self, name: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }
}

/// What the server and its workers share.
struct Shared {
    /// Wakes the registrar (a rescan of the IPAM directory).
    notify: Arc<Notify>,
    bridges: BridgeCache,
    /// Attachments with an ADD in progress.
    inflight: Mutex<HashSet<String>>,
    /// Workers alive.
    live: AtomicUsize,
    euid: u32,
}

/// Marks an attachment busy while its ADD runs.
struct InflightGuard<'a> {
    shared: &'a Shared,
    key: String,
}

impl Shared {
    fn claim(&self, key: String) -> Option<InflightGuard<'_>> {
        let fresh = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone());
        // The lock is released before a guard exists (dropping a guard takes it).
        fresh.then(|| InflightGuard { shared: self, key })
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.shared
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// One queued ADD: the request, the namespace it came with, the connection to answer on.
struct Job {
    req: AddRequest,
    netns: File,
    stream: StdUnixStream,
    /// When the connection was accepted, and how long reading the request took.
    accepted: Instant,
    read: Duration,
}

/// Starts the `cni-server` thread on `listener` (bound by the caller); `notify` is the
/// registrar's rescan trigger.
pub fn spawn(
    listener: std::os::unix::net::UnixListener,
    notify: Arc<Notify>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let shared = Arc::new(Shared {
        notify,
        bridges: BridgeCache::default(),
        inflight: Mutex::new(HashSet::new()),
        live: AtomicUsize::new(0),
        euid: nix::unistd::geteuid().as_raw(),
    });
    std::thread::Builder::new()
        .name("cni-server".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    error!("CNI server: runtime: {e}");
                    return;
                }
            };
            rt.block_on(serve(listener, shared));
        })
        .map(|_| ())
}

/// The worker threads, kept at [`WORKERS`].
struct Pool {
    handles: Vec<JoinHandle<()>>,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    shared: Arc<Shared>,
    next: usize,
}

impl Pool {
    /// Replaces workers that ended (panicked or retired). Called from `cni-server`, whose
    /// thread never leaves the node namespace, so new workers start there.
    fn fill(&mut self) {
        self.handles.retain(|h| !h.is_finished());
        while self.handles.len() < WORKERS {
            let rx = self.rx.clone();
            let shared = self.shared.clone();
            self.next += 1;
            match std::thread::Builder::new()
                .name(format!("cni-add-{}", self.next))
                .spawn(move || worker(rx, shared))
            {
                Ok(h) => self.handles.push(h),
                Err(e) => {
                    error!("starting a CNI worker: {e}");
                    return;
                }
            }
        }
    }
}

async fn serve(listener: std::os::unix::net::UnixListener, shared: Arc<Shared>) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            error!("CNI socket: {e}");
            return;
        }
    };
    let (tx, rx) = mpsc::channel::<Job>(QUEUE);
    let mut pool = Pool {
        handles: Vec::new(),
        rx: Arc::new(Mutex::new(rx)),
        shared: shared.clone(),
        next: 0,
    };
    pool.fill();
    let conns = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("CNI socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        pool.fill();
        match conns.clone().try_acquire_owned() {
            Ok(permit) => {
                let tx = tx.clone();
                let shared = shared.clone();
                tokio::spawn(async move {
                    serve_conn(stream, tx, shared).await;
                    drop(permit);
                });
            }
            Err(_) => {
                tokio::spawn(async move {
                    let e = CniError::new(code::TRY_AGAIN_LATER, "tartand is busy")
                        .details(format!("{MAX_CONNECTIONS} CNI connections are open"));
                    reply_async(stream, &Err(e)).await;
                });
            }
        }
    }
}

async fn reply_async(mut stream: UnixStream, outcome: &Result<AddedPod, CniError>) {
    let line = Reply::from_outcome(outcome).to_line();
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(line.as_bytes())).await;
}

fn bad_request(msg: impl Into<String>) -> CniError {
    CniError::new(code::DECODE, msg)
}

async fn serve_conn(mut stream: UnixStream, tx: mpsc::Sender<Job>, shared: Arc<Shared>) {
    let accepted = Instant::now();
    match stream.peer_cred() {
        Ok(c) if c.uid() == 0 || c.uid() == shared.euid => {}
        Ok(c) => {
            warn!(
                uid = c.uid(),
                "CNI socket: refusing a client that is not root"
            );
            let e = CniError::new(code::INVALID_ENV, "only root may use tartand's CNI socket");
            return reply_async(stream, &Err(e)).await;
        }
        Err(e) => {
            warn!("CNI socket: peer credentials: {e}");
            return;
        }
    }
    let mut reader = LineReader::default();
    loop {
        let (line, fds) =
            match tokio::time::timeout(REQUEST_TIMEOUT, reader.next_line(&stream)).await {
                Ok(Ok(Some(x))) => x,
                Ok(Ok(None)) => return,
                Ok(Err(e)) => {
                    let e = bad_request(format!("unreadable request: {e}"));
                    return reply_async(stream, &Err(e)).await;
                }
                Err(_) => {
                    debug!("CNI socket: a client sent no complete request in {REQUEST_TIMEOUT:?}");
                    return;
                }
            };
        if line.trim() == SYNC_REQUEST {
            shared.notify.notify_one();
            if stream
                .write_all(format!("{SYNC_REPLY}\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
            continue;
        }
        let (req, netns) = match parse_add(&line, fds) {
            Ok(x) => x,
            Err(e) => {
                debug!("CNI socket: refused request: {e}");
                return reply_async(stream, &Err(e)).await;
            }
        };
        // Room in the queue first, so the connection stays async while it waits.
        let permit = match tokio::time::timeout(QUEUE_TIMEOUT, tx.reserve()).await {
            Ok(Ok(p)) => p,
            _ => {
                let e = CniError::new(code::TRY_AGAIN_LATER, "tartand is busy")
                    .details(format!("no ADD worker was free within {QUEUE_TIMEOUT:?}"));
                return reply_async(stream, &Err(e)).await;
            }
        };
        let std = match stream
            .into_std()
            .and_then(|s| s.set_nonblocking(false).map(|()| s))
        {
            Ok(s) => s,
            Err(e) => {
                warn!("CNI socket: {e}");
                return;
            }
        };
        permit.send(Job {
            req,
            netns,
            stream: std,
            accepted,
            read: accepted.elapsed(),
        });
        return;
    }
}

/// Decodes an ADD request line and checks what came with it: exactly one descriptor, of a
/// namespace (the worker checks it is a *network* namespace).
fn parse_add(line: &str, fds: Received) -> Result<(AddRequest, File), CniError> {
    #[derive(serde::Deserialize)]
    struct Head {
        version: u32,
        op: String,
    }
    if !line.trim_start().starts_with('{') {
        return Err(bad_request(format!(
            "unknown request {:?}",
            line.chars().take(64).collect::<String>()
        )));
    }
    let head: Head = serde_json::from_str(line).map_err(|e| {
        bad_request("the request is not a tartan-cni request").details(e.to_string())
    })?;
    if head.version != PROTOCOL_VERSION {
        return Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!(
                "request protocol version {} is not tartand's ({PROTOCOL_VERSION})",
                head.version
            ),
        )
        .details(
            "tartand and tartan-cni are of different versions; tartand installs its own tartan-cni",
        ));
    }
    if head.op != OP_ADD {
        return Err(bad_request(format!("unknown operation {:?}", head.op)));
    }
    let req: AddRequest = serde_json::from_str(line)
        .map_err(|e| CniError::config("invalid ADD request").details(e.to_string()))?;
    if fds.foreign > 0 {
        return Err(CniError::env(
            "the request carried a descriptor that is not a namespace (CNI_NETNS must be a network namespace)",
        ));
    }
    let mut files = fds.files;
    match (files.pop(), files.is_empty()) {
        (Some(f), true) => Ok((req, f)),
        (None, _) => Err(CniError::env(
            "the ADD request carried no network namespace descriptor",
        )),
        (Some(_), false) => Err(CniError::env(
            "the ADD request carried more than one descriptor",
        )),
    }
}

/// Descriptors received with a request line.
#[derive(Default)]
struct Received {
    /// Namespace files.
    files: Vec<File>,
    /// Descriptors that were not namespaces (closed at once).
    foreign: usize,
}

/// Reads request lines with `recvmsg`, collecting the descriptors that come with them.
#[derive(Default)]
struct LineReader {
    buf: Vec<u8>,
    fds: Received,
}

impl LineReader {
    /// The next line (without its newline) and the descriptors received since the previous
    /// one; `None` at end of stream. A line longer than [`MAX_REQUEST`] is an error.
    async fn next_line(&mut self, s: &UnixStream) -> std::io::Result<Option<(String, Received)>> {
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line[..end]).into_owned();
                return Ok(Some((text, std::mem::take(&mut self.fds))));
            }
            if self.buf.len() >= MAX_REQUEST {
                return Err(std::io::Error::new(
                    ErrorKind::InvalidData,
                    format!("request longer than {MAX_REQUEST} bytes"),
                ));
            }
            let (n, raw) = s
                .async_io(Interest::READABLE, || {
                    recv_with_fds(s.as_raw_fd(), &mut chunk)
                })
                .await?;
            for fd in raw {
                match adopt_namespace_fd(fd) {
                    Some(f) if self.fds.files.len() < 4 => self.fds.files.push(f),
                    Some(_) | None => self.fds.foreign += 1,
                }
            }
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// One `recvmsg`: bytes read and the descriptors that came with them (close-on-exec).
fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Vec<RawFd>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    match msg.cmsgs() {
        Ok(it) => {
            for c in it {
                if let ControlMessageOwned::ScmRights(v) = c {
                    fds.extend(v);
                }
            }
        }
        // Cannot happen with room for SCM_MAX_FD descriptors and no other control data
        // enabled on the socket.
        Err(e) => warn!("CNI socket: control data truncated: {e}"),
    }
    Ok((msg.bytes, fds))
}

/// Takes ownership of a received descriptor: a namespace file is reopened through
/// `/proc/self/fd` (a safe way to own it; nsfs files never block on open) and returned; the
/// raw descriptor is closed either way. Anything else (a FIFO, a socket, a regular file)
/// is never opened, only closed.
fn adopt_namespace_fd(fd: RawFd) -> Option<File> {
    let path = format!("/proc/self/fd/{fd}");
    let is_ns = nix::sys::statfs::statfs(path.as_str())
        .map(|s| s.filesystem_type() == NSFS)
        .unwrap_or(false);
    let file = if is_ns { File::open(&path).ok() } else { None };
    if let Err(e) = nix::unistd::close(fd) {
        warn!("closing a received descriptor: {e}");
    }
    file
}

/// Whether the client hung up (it was killed or gave up waiting): nothing to answer then.
/// A client that only shut its sending side down still gets its answer (POLLHUP means both
/// directions are closed, i.e. the peer's socket is gone).
fn peer_gone(s: &StdUnixStream) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        Err(_) => false,
    }
}

/// A worker: its runtime and netlink sockets of the node namespace, its namespace handle.
struct Worker {
    rt: tokio::runtime::Runtime,
    /// Async netlink (the slow paths: bridge creation, freeing taken names, undoing).
    nl: Netlink,
    /// Batched synchronous netlink (the fast path).
    hs: SyncNetlink,
    own_ns: File,
    shared: Arc<Shared>,
    /// Set when the thread could not return to the node namespace: it must stop.
    poisoned: bool,
}

fn worker(rx: Arc<Mutex<mpsc::Receiver<Job>>>, shared: Arc<Shared>) {
    let n = shared.live.fetch_add(1, Ordering::SeqCst) + 1;
    debug!(workers = n, "CNI worker started");
    if let Some(mut w) = Worker::new(shared.clone()) {
        loop {
            let job = {
                let mut rx = rx.lock().unwrap_or_else(|p| p.into_inner());
                rx.blocking_recv()
            };
            let Some(job) = job else { break };
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.handle(job)));
            if outcome.is_err() {
                error!(
                    "a CNI worker panicked on an ADD; replacing it (GC reclaims anything it left)"
                );
                break;
            }
            if w.poisoned {
                error!(
                    "a CNI worker could not return to the node's network namespace; retiring it"
                );
                break;
            }
        }
    }
    shared.live.fetch_sub(1, Ordering::SeqCst);
}

/// Phase timings of one ADD in tartand (logged at debug level).
struct Phases {
    start: Instant,
    marks: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn mark(&mut self, what: &'static str) {
        self.marks.push((what, self.start.elapsed()));
    }
    fn render(&self) -> String {
        self.marks
            .iter()
            .map(|(w, d)| format!("{w}@{}us", d.as_micros()))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What to take back when an ADD fails or its reply cannot be delivered.
#[derive(Default)]
struct Undo {
    /// The host end, once a veth pair may exist.
    host: Option<String>,
    /// The store to release the attachment from, when the allocation is new.
    release: Option<IpamStore>,
}

fn nl_err(what: impl std::fmt::Display, errno: i32) -> CniError {
    CniError::kernel(format!(
        "{what}: {}",
        std::io::Error::from_raw_os_error(errno)
    ))
}

fn io_kernel(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> CniError {
    move |e| CniError::kernel(format!("{what}: {e}"))
}

impl Worker {
    fn new(shared: Arc<Shared>) -> Option<Worker> {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                error!("CNI worker: runtime: {e}");
                return None;
            }
        };
        let nl = {
            let _g = rt.enter();
            match Netlink::connect() {
                Ok(nl) => nl,
                Err(e) => {
                    error!("CNI worker: {e:#}");
                    return None;
                }
            }
        };
        let hs = match SyncNetlink::open() {
            Ok(s) => s,
            Err(e) => {
                error!("CNI worker: netlink: {e}");
                return None;
            }
        };
        let own_ns = match File::open("/proc/thread-self/ns/net") {
            Ok(f) => f,
            Err(e) => {
                error!("CNI worker: opening its network namespace: {e}");
                return None;
            }
        };
        Some(Worker {
            rt,
            nl,
            hs,
            own_ns,
            shared,
            poisoned: false,
        })
    }

    fn handle(&mut self, job: Job) {
        let Job {
            req,
            netns,
            mut stream,
            accepted,
            read,
        } = job;
        let mut ph = Phases {
            start: accepted,
            marks: vec![("read", read)],
        };
        ph.mark("picked");
        if peer_gone(&stream) {
            info!(cid = %req.container_id, "ADD dropped: the plugin hung up while it was queued");
            return;
        }
        let key = format!(
            "{}\0{}\0{}\0{}",
            req.data_dir.display(),
            req.network,
            req.container_id,
            req.ifname
        );
        let shared = self.shared.clone();
        let Some(_guard) = shared.claim(key) else {
            let e = CniError::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "an ADD of {}/{} is already in progress",
                    req.container_id, req.ifname
                ),
            );
            let _ = write_reply(&mut stream, &Err(e));
            return;
        };
        let mut undo = Undo::default();
        let outcome = self.add(&req, &netns, &mut undo, &mut ph);
        drop(netns);
        if let Err(e) = &outcome {
            // Undone before the answer: a runtime retrying at once finds a clean slate (and
            // the attachment no longer marked busy).
            debug!(cid = %req.container_id, "ADD failed: {e}");
            self.undo(&req, undo);
            let _ = write_reply(&mut stream, &outcome);
            return;
        }
        let delivered = write_reply(&mut stream, &outcome);
        ph.mark("reply");
        match (&outcome, delivered) {
            (Ok(p), Ok(())) => {
                self.shared.notify.notify_one();
                debug!(cid = %req.container_id, ip = %p.ip, phases = %ph.render(), "ADD done");
            }
            (_, Err(e)) => {
                info!(cid = %req.container_id, "ADD undone: its result could not be delivered ({e}): the plugin was killed or gave up");
                self.undo(&req, undo);
            }
            (Err(_), Ok(())) => {}
        }
    }

    /// Takes back what a failed or undeliverable ADD made (errors are logged: DEL and GC
    /// reclaim anything left).
    fn undo(&self, req: &AddRequest, undo: Undo) {
        if let Some(host) = undo.host
            && let Err(e) = self.rt.block_on(links::delete_host_veth(&self.nl, &host))
        {
            warn!(cid = %req.container_id, "undoing an ADD: {e}");
        }
        if let Some(store) = undo.release
            && let Err(e) = store.release(&req.container_id, &req.ifname)
        {
            warn!(cid = %req.container_id, "undoing an ADD: {e}");
        }
    }

    /// A netlink socket inside `netns`: the thread enters it for the `socket()` call only
    /// (the socket stays bound to that namespace; closing it when the ADD ends lets the
    /// namespace go when the runtime deletes it). A descriptor of another namespace type
    /// is code 4.
    fn pod_socket(&mut self, netns: &File) -> Result<SyncNetlink, CniError> {
        setns(netns, CloneFlags::CLONE_NEWNET).map_err(|e| {
            CniError::env(format!(
                "CNI_NETNS is not a network namespace (entering it: {e})"
            ))
        })?;
        let sock = SyncNetlink::open();
        if let Err(e) = setns(&self.own_ns, CloneFlags::CLONE_NEWNET) {
            self.poisoned = true;
            return Err(CniError::kernel(format!(
                "returning to the node's network namespace: {e}"
            )));
        }
        sock.map_err(io_kernel("netlink in the container"))
    }

    fn add(
        &mut self,
        req: &AddRequest,
        netns: &File,
        undo: &mut Undo,
        ph: &mut Phases,
    ) -> Result<AddedPod, CniError> {
        validate(req)?;
        let mut ps = self.pod_socket(netns)?;
        ph.mark("netns");
        let store = IpamStore::open(&req.data_dir, &req.network)?;
        let (rec, fresh) = store.allocate_tracked(
            &AllocationRequest {
                container_id: req.container_id.clone(),
                ifname: req.ifname.clone(),
                namespace: req.pod_namespace.clone(),
                name: req.pod_name.clone(),
                labels: req.labels.clone(),
                netns: req.netns_path.clone(),
            },
            req.subnet,
        )?;
        if fresh {
            undo.release = Some(store);
        }
        ph.mark("ipam");
        let subnet = req.subnet;
        let gw = ipam::gateway(subnet);
        let gw_net = Ipv4Network::new(gw, subnet.prefix())
            .map_err(|e| CniError::kernel(format!("gateway of {subnet}: {e}")))?;
        let addr = Ipv4Network::new(rec.ip, subnet.prefix())
            .map_err(|e| CniError::kernel(format!("address {}: {e}", rec.ip)))?;
        let spec = VethSpec {
            host: links::host_veth_name(&req.container_id, &req.ifname),
            host_mac: links::mac_for(MAC_KIND_HOST, rec.ip),
            pod: req.ifname.clone(),
            pod_mac: links::mac_for(MAC_KIND_POD, rec.ip),
            mtu: req.mtu,
            bridge: 0,
        };
        undo.host = Some(spec.host.clone());
        let (bridge, pod_index) = match self.fast_host(req, &spec, netns, gw_net)? {
            Some(done) => done,
            None => {
                let nl = self.nl.clone();
                let shared = self.shared.clone();
                let br =
                    self.rt
                        .block_on(slow_host(&nl, &shared.bridges, req, &spec, netns, gw_net))?;
                (br, self.finish_host(req, &spec)?)
            }
        };
        ph.mark("veth");
        pod_side(&mut ps, pod_index, addr, gw)?;
        ph.mark("pod");
        Ok(AddedPod {
            ip: rec.ip,
            prefix: subnet.prefix(),
            gateway: gw,
            bridge: req.bridge.clone(),
            bridge_mac: bridge.mac,
            host_ifname: spec.host.clone(),
            host_mac: links::format_mac(&spec.host_mac),
            pod_mac: links::format_mac(&spec.pod_mac),
            mtu: req.mtu,
        })
    }

    /// The host side in one batch on the cached bridge: the veth pair (host end on the
    /// bridge, up), the gateway address (EEXIST: there already), a look-up of the bridge's
    /// index (is it still the bridge?), hairpin, and a look-up of the host end (its peer's
    /// index in the pod). Returns the bridge and that index, or `None` when the slow path
    /// must do the host side: nothing cached, the name taken, or the index no longer the
    /// bridge (a veth attached to it is deleted at once).
    fn fast_host(
        &mut self,
        req: &AddRequest,
        spec: &VethSpec,
        netns: &File,
        gw_net: Ipv4Network,
    ) -> Result<Option<(Bridge, u32)>, CniError> {
        let Some(br) = self.shared.bridges.get(&req.bridge) else {
            return Ok(None);
        };
        let mut spec = spec.clone();
        spec.bridge = br.index;
        let mut reqs = vec![
            Request::create(RouteNetlinkMessage::NewLink(links::veth_message(
                &spec, netns,
            ))),
            Request::create(RouteNetlinkMessage::NewAddress(links::address_message(
                br.index, gw_net,
            ))),
            Request::get_link_by_index(br.index),
        ];
        if req.hairpin {
            reqs.push(Request::change(RouteNetlinkMessage::NewLink(
                links::hairpin_message(&spec.host),
            )));
        }
        reqs.push(Request::get_link_by_name(&spec.host));
        let a = self
            .hs
            .batch(&reqs)
            .map_err(io_kernel(format!("creating veth {}", spec.host)))?;
        match a[0].errno() {
            None => {}
            // A name held by a detached pair or a stale end: the slow path frees it.
            Some(EEXIST) => return Ok(None),
            // Most likely the cached index is gone: the slow path looks the bridge up.
            Some(_) => {
                self.shared.bridges.forget(&req.bridge);
                return Ok(None);
            }
        }
        let Some(up) = a[2]
            .link()
            .and_then(|l| links::bridge_named(l, &req.bridge))
        else {
            // Attached to whatever holds the index now: take it back at once.
            info!(bridge = %req.bridge, "the bridge changed behind tartand's back; looking it up again");
            self.rt
                .block_on(links::delete_host_veth(&self.nl, &spec.host))?;
            self.shared.bridges.forget(&req.bridge);
            return Ok(None);
        };
        if !up {
            self.rt
                .block_on(links::set_up(&self.nl, br.index, &req.bridge))?;
        }
        if !a[1].ok_or(EEXIST) {
            return Err(nl_err(
                format!("adding gateway {gw_net}"),
                a[1].errno().unwrap_or(0),
            ));
        }
        if req.hairpin
            && let Some(e) = a[3].errno()
        {
            return Err(nl_err(format!("hairpin on {}", spec.host), e));
        }
        let host = a.last().and_then(Answer::link).ok_or_else(|| {
            CniError::kernel(format!("{} vanished after its creation", spec.host))
        })?;
        let idx = links::peer_index(host).ok_or_else(|| {
            CniError::kernel(format!("{} does not say where its peer is", spec.host))
        })?;
        Ok(Some((br, idx)))
    }

    /// After the slow path created the pair: hairpin and the peer's index, in one batch.
    fn finish_host(&mut self, req: &AddRequest, spec: &VethSpec) -> Result<u32, CniError> {
        let mut reqs = Vec::new();
        if req.hairpin {
            reqs.push(Request::change(RouteNetlinkMessage::NewLink(
                links::hairpin_message(&spec.host),
            )));
        }
        reqs.push(Request::get_link_by_name(&spec.host));
        let a = self
            .hs
            .batch(&reqs)
            .map_err(io_kernel(format!("configuring {}", spec.host)))?;
        if req.hairpin
            && let Some(e) = a[0].errno()
        {
            return Err(nl_err(format!("hairpin on {}", spec.host), e));
        }
        a.last()
            .and_then(Answer::link)
            .and_then(links::peer_index)
            .ok_or_else(|| CniError::kernel(format!("{} has no peer", spec.host)))
    }
}

/// The pod side in one batch: the container end up, its address, the default route via
/// the gateway, `lo` up.
fn pod_side(
    ps: &mut SyncNetlink,
    index: u32,
    addr: Ipv4Network,
    gateway: Ipv4Addr,
) -> Result<(), CniError> {
    let reqs = [
        Request::change(RouteNetlinkMessage::NewLink(links::up_message(index))),
        Request::create(RouteNetlinkMessage::NewAddress(links::address_message(
            index, addr,
        ))),
        Request::replace(RouteNetlinkMessage::NewRoute(links::default_route_message(
            index, gateway,
        ))),
        Request::change(RouteNetlinkMessage::NewLink(links::up_by_name_message(
            "lo",
        ))),
    ];
    let a = ps
        .batch(&reqs)
        .map_err(io_kernel("configuring the container interface"))?;
    if let Some(e) = a[0].errno() {
        return Err(nl_err("setting the container interface up", e));
    }
    if !a[1].ok_or(EEXIST) {
        return Err(nl_err(
            format!("adding {addr} in the container"),
            a[1].errno().unwrap_or(0),
        ));
    }
    if let Some(e) = a[2].errno() {
        return Err(nl_err(format!("default route via {gateway}"), e));
    }
    if let Some(e) = a[3].errno() {
        return Err(nl_err("setting lo up in the container", e));
    }
    Ok(())
}

/// Checks a request as the plugin did (a request is never trusted): the same codes.
fn validate(req: &AddRequest) -> Result<(), CniError> {
    validate_container_id(&req.container_id)?;
    validate_ifname(&req.ifname).map_err(|m| CniError::env(format!("CNI_IFNAME: {m}")))?;
    validate_network_name(&req.network)?;
    validate_ifname(&req.bridge).map_err(|m| CniError::config(format!("bridge: {m}")))?;
    if !req.data_dir.is_absolute() || req.data_dir.as_os_str().len() > 4000 {
        return Err(CniError::config(format!(
            "dataDir {} must be an absolute path",
            req.data_dir.display()
        )));
    }
    if !(68..=65535).contains(&req.mtu) {
        return Err(CniError::config(format!(
            "mtu {} is outside 68..65535",
            req.mtu
        )));
    }
    if req.subnet.ip() == Ipv4Addr::UNSPECIFIED && req.subnet.prefix() == 0 {
        return Err(CniError::config("the node subnet cannot be 0.0.0.0/0"));
    }
    Ok(())
}

/// The host side when the fast path cannot do it: the bridge looked up (or created) and
/// cached, the veth created with rtnetlink's full handling (a name held by a detached pair
/// or a stale end is freed, a name taken in the pod is code 104), pipelined with the
/// gateway check and a look-up of the bridge's index; if the index is not the bridge any
/// more (or the creation failed on a cached index), looked up and made again, once.
async fn slow_host(
    nl: &Netlink,
    cache: &BridgeCache,
    req: &AddRequest,
    spec: &VethSpec,
    netns: &File,
    gw_net: Ipv4Network,
) -> Result<Bridge, CniError> {
    let mut spec = spec.clone();
    let mut cached = cache.get(&req.bridge);
    let mut br = match &cached {
        Some(b) => b.clone(),
        None => resolve_bridge(nl, cache, req, gw_net).await?,
    };
    loop {
        spec.bridge = br.index;
        let (veth, gw, state) = futures::join!(
            links::add_veth(nl, &spec, netns),
            links::ensure_gateway(nl, &br, gw_net),
            links::bridge_state(nl, br.index, &req.bridge)
        );
        let state = state?;
        match (veth, state) {
            (Ok(()), Some(up)) => {
                gw?;
                if !up {
                    links::set_up(nl, br.index, &req.bridge).await?;
                }
                return Ok(br);
            }
            (Ok(()), None) => {
                // Attached to whatever holds the index now: take it back at once.
                links::delete_host_veth(nl, &spec.host).await?;
            }
            (Err(e), _) if e.code == code::INTERFACE_EXISTS => return Err(e),
            (Err(e), Some(_)) => return Err(e),
            (Err(e), None) if cached.is_none() => return Err(e),
            (Err(_), None) => {}
        }
        if cached.take().is_none() {
            return Err(CniError::kernel(format!(
                "bridge {} changed while a pod was being attached to it",
                req.bridge
            )));
        }
        info!(bridge = %req.bridge, "the bridge changed behind tartand's back; looking it up again");
        cache.forget(&req.bridge);
        br = resolve_bridge(nl, cache, req, gw_net).await?;
    }
}

async fn resolve_bridge(
    nl: &Netlink,
    cache: &BridgeCache,
    req: &AddRequest,
    gw_net: Ipv4Network,
) -> Result<Bridge, CniError> {
    let br = links::ensure_bridge(nl, &req.bridge, gw_net, req.mtu).await?;
    cache.put(&req.bridge, &br);
    Ok(br)
}

/// Writes the reply on the worker's blocking socket (a line of a few hundred bytes: it fits
/// the socket buffer, the timeout only guards against the impossible).
fn write_reply(
    stream: &mut StdUnixStream,
    outcome: &Result<AddedPod, CniError>,
) -> std::io::Result<()> {
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    let line = Reply::from_outcome(outcome).to_line();
    // MSG_NOSIGNAL: a plugin that is gone is an EPIPE, never a SIGPIPE.
    let mut sent = 0;
    while sent < line.len() {
        match nix::sys::socket::send(
            stream.as_raw_fd(),
            &line.as_bytes()[sent..],
            MsgFlags::MSG_NOSIGNAL,
        ) {
            Ok(0) => return Err(std::io::Error::from(ErrorKind::WriteZero)),
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> AddRequest {
        AddRequest {
            version: PROTOCOL_VERSION,
            op: OP_ADD.into(),
            container_id: "c1".into(),
            ifname: "eth0".into(),
            network: "tartan".into(),
            data_dir: "/var/lib/tartan/cni".into(),
            bridge: "tartan0".into(),
            subnet: "10.244.3.0/24".parse().unwrap(),
            mtu: 1450,
            hairpin: true,
            pod_namespace: "default".into(),
            pod_name: "p".into(),
            labels: Default::default(),
            netns_path: String::new(),
        }
    }

    fn ns_fd() -> Received {
        Received {
            files: vec![File::open("/proc/self/ns/net").unwrap()],
            foreign: 0,
        }
    }

    #[test]
    fn requests_are_validated_with_the_plugins_codes() {
        assert!(validate(&req()).is_ok());
        type Edit = fn(&mut AddRequest);
        let cases: Vec<(Edit, u32)> = vec![
            (|r| r.container_id = "../x".into(), code::INVALID_ENV),
            (|r| r.ifname = "a/b".into(), code::INVALID_ENV),
            (|r| r.ifname = "0123456789abcdef".into(), code::INVALID_ENV),
            (|r| r.network = "..".into(), code::INVALID_CONFIG),
            (
                |r| r.bridge = "way-too-long-bridge".into(),
                code::INVALID_CONFIG,
            ),
            (|r| r.data_dir = "relative".into(), code::INVALID_CONFIG),
            (|r| r.mtu = 10, code::INVALID_CONFIG),
            (
                |r| r.subnet = "0.0.0.0/0".parse().unwrap(),
                code::INVALID_CONFIG,
            ),
        ];
        for (edit, want) in cases {
            let mut r = req();
            edit(&mut r);
            assert_eq!(validate(&r).unwrap_err().code, want, "{r:?}");
        }
    }

    #[test]
    fn request_lines_are_checked_before_any_work() {
        let good = serde_json::to_string(&req()).unwrap();
        assert!(parse_add(&good, ns_fd()).is_ok());
        let code_of = |line: &str, fds: Received| parse_add(line, fds).unwrap_err().code;
        assert_eq!(code_of("hello", ns_fd()), code::DECODE);
        assert_eq!(code_of("{\"version\":1", ns_fd()), code::DECODE);
        assert_eq!(
            code_of("{\"version\":1,\"op\":\"del\"}", ns_fd()),
            code::DECODE
        );
        assert_eq!(
            code_of("{\"version\":7,\"op\":\"add\"}", ns_fd()),
            code::TRY_AGAIN_LATER
        );
        assert_eq!(
            code_of("{\"version\":1,\"op\":\"add\"}", ns_fd()),
            code::INVALID_CONFIG
        );
        assert_eq!(code_of(&good, Received::default()), code::INVALID_ENV);
        let two = Received {
            files: vec![
                File::open("/proc/self/ns/net").unwrap(),
                File::open("/proc/self/ns/net").unwrap(),
            ],
            foreign: 0,
        };
        assert_eq!(code_of(&good, two), code::INVALID_ENV);
        let foreign = Received {
            files: vec![File::open("/proc/self/ns/net").unwrap()],
            foreign: 1,
        };
        assert_eq!(code_of(&good, foreign), code::INVALID_ENV);
    }

    #[test]
    fn only_namespace_descriptors_are_adopted() {
        use std::os::fd::IntoRawFd;
        let ns = File::open("/proc/self/ns/net").unwrap().into_raw_fd();
        let f = adopt_namespace_fd(ns).expect("a namespace is adopted");
        let st = nix::sys::statfs::fstatfs(&f).unwrap();
        assert_eq!(st.filesystem_type(), NSFS);
        // The raw descriptor is closed (its number is free again or reused by someone else:
        // at least it no longer names the namespace through us).
        let plain = File::open("/proc/self/status").unwrap().into_raw_fd();
        assert!(adopt_namespace_fd(plain).is_none());
        let (r, w) = nix::unistd::pipe().unwrap();
        // A FIFO is never opened (opening it would block): only closed.
        assert!(adopt_namespace_fd(r.into_raw_fd()).is_none());
        drop(w);
    }

    #[test]
    fn inflight_attachments_are_exclusive() {
        let shared = Shared {
            notify: Arc::new(Notify::new()),
            bridges: BridgeCache::default(),
            inflight: Mutex::new(HashSet::new()),
            live: AtomicUsize::new(0),
            euid: 0,
        };
        let g = shared.claim("a".into()).unwrap();
        assert!(shared.claim("a".into()).is_none());
        assert!(shared.claim("b".into()).is_some());
        drop(g);
        assert!(shared.claim("a".into()).is_some());
    }
}
