//! The etcd lease store: connection (several endpoints, TLS client certificates), key/value
//! operations with timeouts, create-if-absent and compare-and-swap transactions, etcd leases,
//! and a reflector that mirrors a key prefix (list, then watch from the next revision; resume
//! after disconnects; relist when the revision was compacted).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::util::backoff::Backoff;

/// Keys per page when listing a prefix.
pub const LIST_PAGE: i64 = 5000;

/// The end of the key range holding every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff (or the prefix is empty): the range extends to the end of keyspace.
    vec![0]
}

/// How long a single unary etcd request may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Command-line flags shared by every binary that talks to etcd.
#[derive(clap::Args, Debug, Clone)]
pub struct EtcdArgs {
    /// etcd endpoints, comma separated (https:// when TLS flags are given).
    #[arg(
        long,
        env = "TARTAN_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    pub etcd_endpoints: Vec<String>,
    /// Prefix of the flannel-compatible network data (config, subnets).
    #[arg(long, env = "TARTAN_ETCD_PREFIX", default_value = crate::model::netconf::DEFAULT_ETCD_PREFIX)]
    pub etcd_prefix: String,
    /// Prefix of tartan's own records (nodes, pods, services).
    #[arg(long, env = "TARTAN_PREFIX", default_value = "/tartan")]
    pub tartan_prefix: String,
    /// CA certificate (PEM) to verify the etcd servers.
    #[arg(long, env = "TARTAN_ETCD_CACERT")]
    pub etcd_cacert: Option<PathBuf>,
    /// Client certificate (PEM) for etcd.
    #[arg(long, env = "TARTAN_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// Client private key (PEM) for etcd.
    #[arg(long, env = "TARTAN_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdArgs {
    /// Arguments for `endpoints` with every other flag at its default (no TLS).
    pub fn for_endpoints(endpoints: &[&str]) -> EtcdArgs {
        EtcdArgs {
            etcd_endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            etcd_prefix: crate::model::netconf::DEFAULT_ETCD_PREFIX.to_string(),
            tartan_prefix: "/tartan".to_string(),
            etcd_cacert: None,
            etcd_cert: None,
            etcd_key: None,
        }
    }

    /// The IPv4 addresses and ports of the etcd endpoints (host names resolved; those that do
    /// not resolve are left out), for keeping services off them.
    pub fn endpoint_addrs(&self) -> Vec<std::net::SocketAddrV4> {
        use std::net::ToSocketAddrs;
        let mut out = Vec::new();
        for e in &self.etcd_endpoints {
            let rest = e.split_once("://").map_or(e.as_str(), |(_, r)| r);
            let hostport = rest.split('/').next().unwrap_or_default();
            let (host, port) = match hostport.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().unwrap_or(2379)),
                None => (hostport, 2379),
            };
            if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
                out.push(std::net::SocketAddrV4::new(ip, port));
                continue;
            }
            if let Ok(addrs) = (host, port).to_socket_addrs() {
                out.extend(addrs.filter_map(|a| match a {
                    std::net::SocketAddr::V4(v) => Some(v),
                    std::net::SocketAddr::V6(_) => None,
                }));
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

/// One key and its value as read from etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvItem {
    /// The full key.
    pub key: String,
    /// The raw value.
    pub value: Vec<u8>,
    /// Attached etcd lease, 0 for none.
    pub lease: i64,
    /// Revision of the last modification.
    pub mod_revision: i64,
}

impl KvItem {
    fn from_kv(kv: &etcd_client::KeyValue) -> Self {
        KvItem {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            lease: kv.lease(),
            mod_revision: kv.mod_revision(),
        }
    }
}

/// A handle on the etcd cluster; cheap to clone.
#[derive(Clone)]
pub struct Store {
    client: Client,
}

/// How many more times a request is sent when an attempt reached no member at all.
const UNREACHED_RETRIES: usize = 4;

/// An attempt that failed before reaching any member (the channel could not connect to the
/// endpoint it picked, e.g. a stopped member of several): safe to send again, also for writes,
/// and the client's balancer picks an endpoint again.
fn reached_no_member(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => s.message() == "tcp connect error",
        _ => false,
    }
}

// gRPC status codes (tonic's `Code` as numbers; tonic is not a direct dependency).
const GRPC_DEADLINE_EXCEEDED: i32 = 4;
const GRPC_PERMISSION_DENIED: i32 = 7;
const GRPC_UNAVAILABLE: i32 = 14;
const GRPC_UNAUTHENTICATED: i32 = 16;

/// A member answered that it has no leader (requests carry etcd's "require leader" flag, so
/// a leaderless member refuses them at once instead of holding them): nothing was applied,
/// so writes are safe to send again, as etcdctl's client does, once a leader is elected.
fn no_leader(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if i32::from(s.code()) == GRPC_UNAVAILABLE
            && (s.message().contains("no leader") || s.message().contains("leader changed")))
}

/// One line a person can act on for an etcd client error (tonic's own `Display` of a status
/// dumps metadata and details across lines).
pub fn describe_etcd_error(e: &etcd_client::Error) -> String {
    let one_line = |t: &str| t.split_whitespace().collect::<Vec<_>>().join(" ");
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            let msg = one_line(s.message());
            let msg = msg.strip_prefix("etcdserver: ").unwrap_or(&msg).to_string();
            match i32::from(s.code()) {
                GRPC_UNAVAILABLE if msg == "tcp connect error" => {
                    "cannot connect to etcd (is it running, and are --etcd-endpoints right?)"
                        .to_string()
                }
                GRPC_UNAVAILABLE => format!("etcd is unavailable: {msg}"),
                GRPC_UNAUTHENTICATED | GRPC_PERMISSION_DENIED => {
                    format!("etcd refused the credentials: {msg}")
                }
                GRPC_DEADLINE_EXCEEDED => format!("etcd timed out: {msg}"),
                _ => msg,
            }
        }
        etcd_client::Error::TransportError(t) => {
            let mut text = t.to_string();
            let mut src = std::error::Error::source(t);
            while let Some(s) = src {
                text = format!("{text}: {s}");
                src = s.source();
            }
            format!("cannot reach etcd: {}", one_line(&text))
        }
        other => one_line(&other.to_string()),
    }
}

/// Runs a request (`attempt` makes one try) within [`REQUEST_TIMEOUT`], sending it again at
/// once while tries reach no member, and after a short pause while the members have no
/// leader (an election takes about a second).
async fn timed<T, F, Fut>(what: &str, attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
{
    timed_attempts(what, REQUEST_TIMEOUT, attempt).await
}

/// How long one attempt of a resendable request may go unanswered before it is sent again
/// ([`Store::txn_resendable`]): a follower that forwarded a proposal to a leader that just
/// died never answers it, while a member that knows it has no leader, or any member after
/// the election (about a second), does.
const RESEND_AFTER: Duration = Duration::from_millis(1500);

/// [`timed`] with attempts that each get at most `per_attempt` (sent again while the
/// request's deadline allows).
async fn timed_attempts<T, F, Fut>(what: &str, per_attempt: Duration, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    let mut retries = 0;
    let mut last_no_leader = None;
    loop {
        let until = deadline.min(tokio::time::Instant::now() + per_attempt);
        match tokio::time::timeout_at(until, attempt()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if retries < UNREACHED_RETRIES && reached_no_member(&e) => retries += 1,
            Ok(Err(e)) if no_leader(&e) => {
                let pause = Duration::from_millis(100);
                if tokio::time::Instant::now() + pause >= deadline {
                    bail!("etcd {what}: {}", describe_etcd_error(&e));
                }
                last_no_leader = Some(e);
                tokio::time::sleep(pause).await;
            }
            Ok(Err(e)) => bail!("etcd {what}: {}", describe_etcd_error(&e)),
            Err(_) if until < deadline => {}
            Err(_) => match last_no_leader {
                Some(e) => bail!(
                    "etcd {what}: {} for {REQUEST_TIMEOUT:?}",
                    describe_etcd_error(&e)
                ),
                None => bail!("etcd {what}: no answer within {REQUEST_TIMEOUT:?}"),
            },
        }
    }
}

impl Store {
    /// Connects lazily: this fails only on bad arguments (unreadable certificates, bad URLs),
    /// never because etcd is down; requests retry the endpoints as they come back.
    pub async fn connect(args: &EtcdArgs) -> Result<Store> {
        if args.etcd_endpoints.is_empty() {
            bail!("--etcd-endpoints: at least one endpoint is needed");
        }
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            // A member that stops answering (packets dropped, process alive) holds every watch
            // and lease stream on its connection until this ping times out: 10 s + 5 s left a
            // node deaf for ~14 s. One ping a second per member, 1 s to answer, costs nothing
            // and leaves a silent member in ~2 s (netns test
            // `a_silent_etcd_member_is_left_within_seconds`: 0.1-2.3 s).
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1))
            .with_keep_alive_while_idle(true)
            // A member without a leader refuses at once ("no leader") instead of holding the
            // request until it times out; `timed` sends it again.
            .with_require_leader(true);
        let tls_wanted =
            args.etcd_cacert.is_some() || args.etcd_cert.is_some() || args.etcd_key.is_some();
        if tls_wanted {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &args.etcd_cacert {
                let pem = std::fs::read(ca)
                    .with_context(|| format!("--etcd-cacert: cannot read {}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            match (&args.etcd_cert, &args.etcd_key) {
                (Some(c), Some(k)) => {
                    let cert = std::fs::read(c)
                        .with_context(|| format!("--etcd-cert: cannot read {}", c.display()))?;
                    let key = std::fs::read(k)
                        .with_context(|| format!("--etcd-key: cannot read {}", k.display()))?;
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                (None, None) => {}
                _ => bail!("--etcd-cert and --etcd-key must be given together"),
            }
            opts = opts.with_tls(tls);
        }
        for e in &args.etcd_endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                bail!("--etcd-endpoints: {e:?} must start with http:// or https://");
            }
            if tls_wanted && e.starts_with("http://") {
                bail!("--etcd-endpoints: {e:?} uses http:// but TLS flags were given");
            }
        }
        let client = Client::connect(&args.etcd_endpoints, Some(opts))
            .await
            .context("etcd connect")?;
        Ok(Store { client })
    }

    /// Reads one key.
    pub async fn get(&self, key: &str) -> Result<Option<KvItem>> {
        let r = timed("get", || {
            let mut c = self.client.clone();
            async move { c.get(key, None).await }
        })
        .await?;
        Ok(r.kvs().first().map(KvItem::from_kv))
    }

    /// Lists every key under `prefix`; returns the store revision of the read. Large prefixes
    /// are read in pages of [`LIST_PAGE`] keys, all at the revision of the first page, so the
    /// result is one consistent snapshot and no response exceeds the gRPC message limit.
    pub async fn list(&self, prefix: &str) -> Result<(i64, Vec<KvItem>)> {
        let end = prefix_end(prefix.as_bytes());
        let mut out = Vec::new();
        let mut start = prefix.as_bytes().to_vec();
        let mut rev = 0;
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if rev != 0 {
                opts = opts.with_revision(rev);
            }
            let r = timed("list", || {
                let (mut c, start, opts) = (self.client.clone(), start.clone(), opts.clone());
                async move { c.get(start, Some(opts)).await }
            })
            .await?;
            if rev == 0 {
                rev = r.header().map(|h| h.revision()).unwrap_or(0);
            }
            out.extend(r.kvs().iter().map(KvItem::from_kv));
            match (r.more(), r.kvs().last()) {
                (true, Some(last)) => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => break,
            }
        }
        Ok((rev, out))
    }

    /// Writes a key, attached to `lease` when non-zero.
    pub async fn put(&self, key: &str, value: impl Into<Vec<u8>>, lease: i64) -> Result<()> {
        let value: Vec<u8> = value.into();
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        timed("put", || {
            let (mut c, value, opts) = (self.client.clone(), value.clone(), opts.clone());
            async move { c.put(key, value, opts).await }
        })
        .await?;
        Ok(())
    }

    /// Creates the key only if it does not exist; returns whether it was created.
    pub async fn create_if_absent(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
        lease: i64,
    ) -> Result<bool> {
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value.into(), opts)]);
        self.txn_as("create", txn).await
    }

    /// Rewrites the key only if it was not modified since `mod_revision`; returns success.
    pub async fn replace_if_unchanged(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
        lease: i64,
        mod_revision: i64,
    ) -> Result<bool> {
        let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::put(key, value.into(), opts)]);
        self.txn_as("compare-and-swap", txn).await
    }

    /// Runs a prepared transaction; returns whether its comparisons held.
    pub async fn txn(&self, txn: Txn) -> Result<bool> {
        self.txn_as("txn", txn).await
    }

    /// Like [`Store::txn`], but an attempt left unanswered for [`RESEND_AFTER`] is sent again
    /// (a leader that just died never answers what a follower forwarded to it). An earlier
    /// attempt may then have been applied: the caller must resolve a failed comparison by
    /// reading back whether its own write is there.
    pub async fn txn_resendable(&self, txn: Txn) -> Result<bool> {
        let r = timed_attempts("txn", RESEND_AFTER, || {
            let (mut c, txn) = (self.client.clone(), txn.clone());
            async move { c.txn(txn).await }
        })
        .await?;
        Ok(r.succeeded())
    }

    async fn txn_as(&self, what: &str, txn: Txn) -> Result<bool> {
        let r = timed(what, || {
            let (mut c, txn) = (self.client.clone(), txn.clone());
            async move { c.txn(txn).await }
        })
        .await?;
        Ok(r.succeeded())
    }

    /// Deletes a key; returns whether it existed.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        let r = timed("delete", || {
            let mut c = self.client.clone();
            async move { c.delete(key, None).await }
        })
        .await?;
        Ok(r.deleted() > 0)
    }

    /// Deletes a key only if its mod revision is still `mod_revision`.
    pub async fn delete_if_unchanged(&self, key: &str, mod_revision: i64) -> Result<bool> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::delete(key, None)]);
        self.txn(txn).await
    }

    /// Grants an etcd lease of `ttl` seconds.
    pub async fn grant(&self, ttl: i64) -> Result<i64> {
        let r = timed("lease grant", || {
            let mut c = self.client.clone();
            async move { c.lease_grant(ttl, None).await }
        })
        .await?;
        Ok(r.id())
    }

    /// Revokes an etcd lease (deleting every key attached to it).
    pub async fn revoke(&self, lease: i64) -> Result<()> {
        timed("lease revoke", || {
            let mut c = self.client.clone();
            async move { c.lease_revoke(lease).await }
        })
        .await?;
        Ok(())
    }

    /// Remaining TTL of a lease in seconds, or `None` when it no longer exists.
    pub async fn lease_ttl(&self, lease: i64) -> Result<Option<i64>> {
        let r = timed("lease ttl", || {
            let mut c = self.client.clone();
            async move { c.lease_time_to_live(lease, None).await }
        })
        .await?;
        Ok((r.ttl() > 0).then_some(r.ttl()))
    }

    /// A keeper that renews `lease` on demand over one long-lived stream.
    pub fn keeper(&self, lease: i64) -> LeaseRenewer {
        LeaseRenewer {
            client: self.client.clone(),
            lease,
            stream: None,
        }
    }

    /// The underlying client, for callers needing an operation not wrapped here.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Starts a reflector task mirroring `prefix`; see [`ReflectorEvent`].
    pub fn reflect(&self, prefix: &str) -> mpsc::UnboundedReceiver<ReflectorEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let store = self.clone();
        let prefix = prefix.to_string();
        tokio::spawn(async move { run_reflector(store, prefix, tx).await });
        rx
    }
}

/// Renews one etcd lease, reopening its keep-alive stream after errors.
pub struct LeaseRenewer {
    client: Client,
    lease: i64,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl LeaseRenewer {
    /// The lease being renewed.
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// Renews once. `Ok(Some(ttl))` on success, `Ok(None)` when the lease no longer exists
    /// (expired or revoked), `Err` when etcd could not be reached.
    pub async fn renew(&mut self) -> Result<Option<i64>> {
        let r = tokio::time::timeout(REQUEST_TIMEOUT, self.renew_inner()).await;
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.stream = None;
                Err(e)
            }
            Err(_) => {
                self.stream = None;
                bail!("etcd lease keep-alive: no answer within {REQUEST_TIMEOUT:?}")
            }
        }
    }

    async fn renew_inner(&mut self) -> Result<Option<i64>> {
        if self.stream.is_none() {
            let mut c = self.client.clone();
            let s = c
                .lease_keep_alive(self.lease)
                .await
                .context("etcd lease keep-alive")?;
            self.stream = Some(s);
        }
        let (keeper, stream) = self
            .stream
            .as_mut()
            .ok_or_else(|| anyhow!("keep-alive stream missing"))?;
        keeper
            .keep_alive()
            .await
            .context("etcd lease keep-alive send")?;
        match stream.message().await.context("etcd lease keep-alive")? {
            Some(r) if r.ttl() > 0 => Ok(Some(r.ttl())),
            Some(_) => Ok(None),
            None => {
                self.stream = None;
                bail!("etcd lease keep-alive stream closed")
            }
        }
    }
}

/// One change seen by a reflector.
#[derive(Debug, Clone)]
pub enum Change {
    /// The key was created or updated.
    Put(KvItem),
    /// The key was deleted (or its lease expired).
    Delete(String),
}

/// What a reflector reports.
#[derive(Debug, Clone)]
pub enum ReflectorEvent {
    /// A complete listing of the prefix (at start and after a compaction); replaces all state.
    Reset {
        /// Store revision of the listing.
        revision: i64,
        /// Every key under the prefix.
        items: Vec<KvItem>,
    },
    /// Incremental changes, in order.
    Changes {
        /// Store revision after these changes.
        revision: i64,
        /// The changes.
        changes: Vec<Change>,
    },
}

async fn run_reflector(store: Store, prefix: String, tx: mpsc::UnboundedSender<ReflectorEvent>) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut revision: Option<i64> = None;
    loop {
        if tx.is_closed() {
            return;
        }
        let rev = match revision {
            Some(r) => r,
            None => match store.list(&prefix).await {
                Ok((rev, items)) => {
                    debug!(prefix, rev, n = items.len(), "listed");
                    if tx
                        .send(ReflectorEvent::Reset {
                            revision: rev,
                            items,
                        })
                        .is_err()
                    {
                        return;
                    }
                    revision = Some(rev);
                    rev
                }
                Err(e) => {
                    warn!(prefix, "etcd list failed, retrying: {e:#}");
                    backoff.wait().await;
                    continue;
                }
            },
        };
        let mut client = store.client();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(rev + 1)
            .with_progress_notify();
        let watch =
            tokio::time::timeout(REQUEST_TIMEOUT, client.watch(prefix.as_str(), Some(opts))).await;
        let mut stream = match watch {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                warn!(prefix, "etcd watch failed, retrying: {e}");
                backoff.wait().await;
                continue;
            }
            Err(_) => {
                warn!(prefix, "etcd watch: no answer, retrying");
                backoff.wait().await;
                continue;
            }
        };
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                // Nobody listens any more (e.g. the config wait got its config): stop watching.
                () = tx.closed() => return,
            };
            match message {
                Ok(Some(resp)) => {
                    backoff.reset();
                    if resp.compact_revision() > 0 {
                        info!(
                            prefix,
                            compacted = resp.compact_revision(),
                            "watch revision compacted, relisting"
                        );
                        revision = None;
                        break;
                    }
                    if resp.canceled() {
                        warn!(
                            prefix,
                            reason = resp.cancel_reason(),
                            "watch canceled, rewatching"
                        );
                        break;
                    }
                    let mut changes = Vec::with_capacity(resp.events().len());
                    let mut max_rev = revision.unwrap_or(0);
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        max_rev = max_rev.max(kv.mod_revision());
                        match ev.event_type() {
                            EventType::Put => changes.push(Change::Put(KvItem::from_kv(kv))),
                            EventType::Delete => changes.push(Change::Delete(
                                String::from_utf8_lossy(kv.key()).into_owned(),
                            )),
                        }
                    }
                    if changes.is_empty() {
                        // Progress notification: everything up to the header revision is seen.
                        if let Some(h) = resp.header() {
                            max_rev = max_rev.max(h.revision());
                        }
                        revision = Some(max_rev);
                        continue;
                    }
                    revision = Some(max_rev);
                    if tx
                        .send(ReflectorEvent::Changes {
                            revision: max_rev,
                            changes,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(None) => {
                    warn!(prefix, "etcd watch stream ended, resuming");
                    backoff.wait().await;
                    break;
                }
                Err(e) => {
                    warn!(prefix, "etcd watch broken, resuming: {e}");
                    backoff.wait().await;
                    break;
                }
            }
        }
    }
}

/// A complete, shareable view of a small prefix (e.g. subnet leases), kept by [`Store::mirror`].
#[derive(Debug, Clone)]
pub struct PrefixView {
    /// False until the first successful listing; consumers must not act on an unlisted view.
    pub listed: bool,
    /// Every key under the prefix.
    pub items: std::collections::BTreeMap<String, KvItem>,
    /// Store revision the view reflects.
    pub revision: i64,
    /// When the view last changed (for programming-latency metrics).
    pub changed_at: std::time::Instant,
}

impl Store {
    /// Mirrors `prefix` into a watch channel holding the whole current view. Suited to prefixes
    /// of up to a few thousand keys (the view is cloned on each change batch).
    pub fn mirror(&self, prefix: &str) -> tokio::sync::watch::Receiver<std::sync::Arc<PrefixView>> {
        let (tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(PrefixView {
            listed: false,
            items: Default::default(),
            revision: 0,
            changed_at: std::time::Instant::now(),
        }));
        let mut events = self.reflect(prefix);
        tokio::spawn(async move {
            let mut items = std::collections::BTreeMap::new();
            while let Some(ev) = events.recv().await {
                let mut batch = vec![ev];
                while let Ok(more) = events.try_recv() {
                    batch.push(more);
                }
                let mut revision = 0;
                for ev in batch {
                    match ev {
                        ReflectorEvent::Reset {
                            revision: r,
                            items: all,
                        } => {
                            items = all.into_iter().map(|i| (i.key.clone(), i)).collect();
                            revision = r;
                        }
                        ReflectorEvent::Changes {
                            revision: r,
                            changes,
                        } => {
                            for c in changes {
                                match c {
                                    Change::Put(i) => {
                                        items.insert(i.key.clone(), i);
                                    }
                                    Change::Delete(k) => {
                                        items.remove(&k);
                                    }
                                }
                            }
                            revision = r;
                        }
                    }
                }
                let view = PrefixView {
                    listed: true,
                    items: items.clone(),
                    revision,
                    changed_at: std::time::Instant::now(),
                };
                if tx.send(std::sync::Arc::new(view)).is_err() {
                    return;
                }
            }
        });
        rx
    }
}
