//! `tartand`: the per-node daemon. Wires the lease store, the subnet manager, the liveness
//! lease, the overlay reconciler, subnet.env and metrics together.

pub mod admin_http;
pub mod pod_registrar;
pub mod status;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::daemon::status::DaemonStatus;
use crate::kernel::netlink::Netlink;
use crate::metrics::Metrics;
use crate::model::netconf::NetworkConfig;
use crate::model::service::{
    AddressGuard, RangeContext, ServiceCidrs, check_service_cidr, check_service_cidr6,
};
use crate::model::subnet_env::{Ipv6Env, SubnetEnv};
use crate::model::subnet_lease::{MacAddr, SubnetKey};
use crate::node::lock::{OwnedPath, PathKind};
use crate::node::state_file::{NodeState, state_path, vtep_mac_for, vtep_mac6_for};
use crate::node::subnet_keeper::{KeepOutcome, NodeIdentity, OwnLease, Preferred, SubnetManager};
use crate::overlay::reconciler::{OverlaySettings, overlay_mtu};
use crate::proxy::rules::{Family, NodeContext};
use crate::store::etcd::{EtcdArgs, Store};
use crate::util::shutdown::shutdown_signal;

/// Command-line flags of `tartand`.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "tartand",
    version,
    args_override_self = true,
    about = "tartan node daemon: leases this node's pod subnet from etcd and programs the VXLAN overlay"
)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// This node's name (unique in the cluster).
    #[arg(long, env = "TARTAN_NODE_NAME")]
    pub node_name: Option<String>,
    /// Underlay interface carrying VXLAN traffic.
    #[arg(long, env = "TARTAN_IFACE")]
    pub iface: String,
    /// Underlay address to advertise (default: the first IPv4 address of --iface).
    #[arg(long)]
    pub public_ip: Option<Ipv4Addr>,
    /// IPv6 underlay address to advertise in a dual-stack network (default: the first global
    /// IPv6 address of --iface; without one the node holds no IPv6 subnet).
    #[arg(long)]
    pub public_ipv6: Option<std::net::Ipv6Addr>,
    /// Virtual IP ranges for services, IPv4 and optionally IPv6 (`10.96.0.0/12,fd00:96::/108`);
    /// new connections to unknown ports in them are refused.
    #[arg(long, default_value = "10.96.0.0/12")]
    pub service_cidr: ServiceCidrs,
    /// How services pick an endpoint for a new connection.
    #[arg(long, value_enum, default_value_t)]
    pub load_balancing: crate::proxy::rules::Balancing,
    /// Where to write subnet.env.
    #[arg(long, default_value = "/run/tartan/subnet.env")]
    pub subnet_file: PathBuf,
    /// Directory for the node state file (remembered subnet, VTEP MAC).
    #[arg(long, default_value = "/var/lib/tartan")]
    pub state_dir: PathBuf,
    /// Prometheus endpoint (never bind this beyond loopback unless you mean it).
    #[arg(long, default_value = "127.0.0.1:9402")]
    pub metrics_addr: SocketAddr,
    /// TTL in seconds of the subnet lease (ownership survives reboots within it).
    #[arg(long, default_value_t = 86400, value_parser = clap::value_parser!(i64).range(10..))]
    pub subnet_lease_ttl: i64,
    /// TTL in seconds of the node liveness lease (per-node records vanish this long after death).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i64).range(2..=3600))]
    pub liveness_ttl: i64,
    /// Masquerade pod traffic leaving the cluster network.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub ip_masq: bool,
    /// Full overlay resync period in seconds (drift is repaired at once from kernel
    /// notifications; the resync is the safety net).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub resync_secs: u64,
    /// Serve the cluster DNS on this node (for its pods and itself).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub dns: bool,
    /// The cluster DNS address, local on every node (default: the 10th address of the
    /// service CIDR, 10.96.0.10, as Kubernetes places kube-dns; or an address outside it).
    #[arg(long)]
    pub cluster_dns: Option<Ipv4Addr>,
    /// The cluster domain the DNS serves.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Upstream resolver for names outside the cluster (`IP` or `IP:PORT`, repeatable;
    /// default: the nameservers of --dns-resolv-conf).
    #[arg(long = "dns-upstream")]
    pub dns_upstreams: Vec<String>,
    /// Where the node's upstream resolvers are read from.
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub dns_resolv_conf: PathBuf,
    /// Release this node's subnet, remove its device and rules, and exit.
    #[arg(long)]
    pub leave: bool,
    #[command(flatten)]
    pub cni: crate::daemon::pod_registrar::CniArgs,
}

impl DaemonArgs {
    /// The host paths this daemon owns (each locked for it alone, see [`node::lock`]). With
    /// `--leave` only the two it removes files from, the state directory and subnet.env (a
    /// running daemon of the node holds those too, so a leave beside it is refused).
    pub fn owned_paths(&self) -> Vec<OwnedPath> {
        let p = |flag, path: &PathBuf, kind| OwnedPath {
            flag,
            path: path.clone(),
            kind,
        };
        let mut paths = vec![
            p("--state-dir", &self.state_dir, PathKind::Dir),
            p("--cni-data-dir", &self.cni.cni_data_dir, PathKind::Dir),
            p("--cni-socket", &self.cni.cni_socket, PathKind::File),
            p("--subnet-file", &self.subnet_file, PathKind::File),
        ];
        if self.leave {
            paths.retain(|p| matches!(p.flag, "--state-dir" | "--subnet-file"));
        }
        paths
    }
}

fn node_name(args: &DaemonArgs) -> Result<String> {
    let name = match &args.node_name {
        Some(n) => n.clone(),
        None => nix::unistd::gethostname()
            .context("reading the hostname for --node-name")?
            .to_string_lossy()
            .into_owned(),
    };
    if name.is_empty()
        || name.len() > 253
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
    {
        bail!("--node-name {name:?}: use letters, digits, '-', '.', '_' (at most 253)");
    }
    Ok(name)
}

/// Waits for a valid network config: lists the config key, then watches it, so a config
/// written after the daemon started is taken at once (a polling backoff made a node started
/// before `tartanctl network init` wait up to 15 s). etcd errors are retried by the reflector.
async fn wait_for_config(store: &Store, keys: &EtcdArgs) -> NetworkConfig {
    use crate::store::etcd::{Change, ReflectorEvent};
    let key = keys.config_key();
    // The reflector watches a prefix; only the exact key counts.
    let mut events = store.reflect(&key);
    let mut said_missing = false;
    while let Some(ev) = events.recv().await {
        let value = match ev {
            ReflectorEvent::Reset { items, .. } => items.into_iter().find(|i| i.key == key),
            ReflectorEvent::Changes { changes, .. } => {
                changes.into_iter().fold(None, |last, c| match c {
                    Change::Put(i) if i.key == key => Some(i),
                    Change::Delete(k) if k == key => None,
                    _ => last,
                })
            }
        };
        match value {
            Some(kv) => match NetworkConfig::parse(&kv.value) {
                Ok(c) => return c,
                Err(e) => error!(key, "invalid network config, waiting for a valid one: {e}"),
            },
            None if !said_missing => {
                said_missing = true;
                warn!(
                    key,
                    "no network config yet (run `tartanctl network init`), watching for it"
                );
            }
            None => {}
        }
    }
    // The reflector only stops when its receiver is gone; it is held here.
    std::future::pending().await
}

/// Runs the daemon until SIGTERM/SIGINT (dataplane left in place) or a leave.
/// Who this node is, from its flags, its underlay interface and its state file.
struct Identity {
    node: NodeIdentity,
    iface: crate::kernel::netlink::Iface,
    /// The VXLAN device's MTU.
    mtu: u32,
    /// The IPv6 VXLAN device's MTU (when the underlay is large enough for VXLAN over IPv6).
    mtu6: Option<u32>,
    state_file: PathBuf,
    /// The subnets the state file remembers.
    preferred: Preferred,
}

/// Runs the daemon until shutdown or a leave: [`identify`] the node, connect to etcd, wait for
/// the network config and a subnet, [`spawn_dataplane`], then [`supervise`].
pub async fn run(args: DaemonArgs) -> Result<()> {
    let name = node_name(&args)?;
    // First of all, before etcd or the kernel: one daemon per node. Held until exit (the
    // kernel releases it if the process dies).
    let _lock = crate::node::lock::lock_paths(&args.owned_paths())?;
    let id = identify(&args, &name).await?;
    let node = id.node.clone();
    info!(node = %name, public_ip = %node.public_ip, vtep_mac = %node.vtep_mac, iface = %args.iface, "starting");

    let store = Store::connect(&args.etcd).await?;
    let metrics = Metrics::new();
    let status = Arc::new(DaemonStatus::new(&name));
    admin_http::serve(args.metrics_addr, metrics.clone(), status.clone()).await?;

    if args.leave {
        return leave(&args, &store, &node).await;
    }
    let etcd_addrs = args.etcd.endpoint_addrs();
    let range_ctx = RangeContext {
        underlay: id.iface.addrs.clone(),
        etcd: etcd_addrs.iter().map(|a| *a.ip()).collect(),
    };
    check_service_cidr(args.service_cidr.v4, None, &range_ctx)
        .map_err(|e| anyhow!("--service-cidr: {e}"))?;

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);

    let cfg = tokio::select! {
        c = wait_for_config(&store, &args.etcd) => c,
        _ = &mut shutdown => return Ok(()),
    };
    info!(network = %cfg.network, subnet_len = cfg.subnet_len, vni = cfg.backend.vni, "network config");
    if let Some(p) = &cfg.ipv6 {
        match node.public_ipv6 {
            Some(ip6) => info!(
                ipv6_network = %p.network,
                ipv6_subnet_len = p.subnet_len,
                public_ipv6 = %ip6,
                vtep_mac6 = %node.vtep_mac6,
                "the network config is dual-stack"
            ),
            None => warn!(
                ipv6_network = %p.network,
                "the network config is dual-stack, but --iface {} has no global IPv6 address \
                 and no --public-ipv6 was given: this node holds an IPv4 subnet only",
                args.iface
            ),
        }
    }
    check_service_cidr(args.service_cidr.v4, Some(cfg.network), &range_ctx)
        .map_err(|e| anyhow!("--service-cidr: {e}"))?;
    if let Some(c6) = args.service_cidr.v6 {
        let mut underlay6 = id.iface.addrs6.clone();
        underlay6.extend(id.node.public_ipv6.map(ipnetwork::Ipv6Network::from));
        check_service_cidr6(c6, cfg.ipv6.as_ref().map(|p| p.network), &underlay6)
            .map_err(|e| anyhow!("--service-cidr: {e}"))?;
    }

    let subnets = store.mirror(&args.etcd.subnets_prefix());
    // Node records say which lease each live node holds (lease conflicts are resolved for it).
    let nodes = store.mirror(&crate::store::keys::nodes_prefix(&args.etcd));
    let manager = SubnetManager::new(
        store.clone(),
        args.etcd.clone(),
        node.clone(),
        cfg.clone(),
        args.subnet_lease_ttl,
        metrics.clone(),
    );
    let own = tokio::select! {
        o = manager.acquire(id.preferred) => o,
        _ = &mut shutdown => return Ok(()),
    };
    let Some(own) = own else {
        info!("a leave was requested before this node held a subnet; removing local state");
        teardown_local(&args, &cfg, &id.state_file).await;
        let _ = store
            .delete(&crate::store::keys::leave_key(&args.etcd, &name))
            .await;
        return Ok(());
    };
    info!(subnet = %own.subnet, subnet6 = ?own.subnet6, reservation = own.etcd_lease == 0, "holding subnet");
    let (own_tx, own_rx) = watch::channel(Some(own.clone()));
    let (peers_tx, peers_rx) = watch::channel(Arc::default());
    status.set_own(own_rx.clone(), peers_rx, cfg.clone());
    id.persist(&own);
    let dataplane = spawn_dataplane(
        &args,
        &store,
        &id,
        &cfg,
        Feeds {
            own: own_rx.clone(),
            subnets: subnets.clone(),
            nodes,
            peers_tx,
        },
        etcd_addrs,
        &metrics,
        &status,
    );
    let keep = async {
        manager
            .keep(own, &own_tx, subnets, renew_interval(args.subnet_lease_ttl))
            .await
    };
    supervise(&args, &store, &id, &cfg, own_rx, dataplane, keep, shutdown).await
}

impl Identity {
    /// Remembers `o` (and the VTEP MAC) in the state file, for the next start.
    fn persist(&self, o: &OwnLease) {
        let st = NodeState {
            node_name: self.node.name.clone(),
            subnet: Some(o.subnet),
            vtep_mac: self.node.vtep_mac,
            subnet6: o.subnet6,
            vtep_mac6: Some(self.node.vtep_mac6),
        };
        if let Err(e) = st.save(&self.state_file) {
            warn!("saving node state: {e:#}");
        }
    }
}

/// The node's identity: underlay interface and address, overlay MTU, VTEP MAC (remembered,
/// else derived from the name) and the subnet it held before.
async fn identify(args: &DaemonArgs, name: &str) -> Result<Identity> {
    let nl = Netlink::connect()?;
    let iface = nl
        .iface(&args.iface)
        .await
        .with_context(|| format!("--iface {}", args.iface))?;
    let public_ip = match args.public_ip {
        Some(ip) => ip,
        None => iface.addrs.first().map(|a| a.ip()).ok_or_else(|| {
            anyhow!(
                "--iface {} has no IPv4 address; give --public-ip",
                args.iface
            )
        })?,
    };
    let public_ipv6 = args
        .public_ipv6
        .or_else(|| iface.addrs6.first().map(|a| a.ip()));
    let mtu = overlay_mtu(iface.mtu)?;
    let mtu6 = crate::overlay::reconciler::overlay_mtu6(iface.mtu).ok();
    let state_file = state_path(&args.state_dir, name);
    let state = match NodeState::load(&state_file) {
        Ok(s) => s,
        Err(e) => {
            warn!("{e:#}; starting without remembered state");
            None
        }
    };
    let mine = state.as_ref().filter(|s| s.node_name == name);
    let vtep_mac = mine
        .map(|s| s.vtep_mac)
        .filter(MacAddr::is_valid_unicast)
        .unwrap_or_else(|| vtep_mac_for(name));
    let vtep_mac6 = mine
        .and_then(|s| s.vtep_mac6)
        .filter(MacAddr::is_valid_unicast)
        .unwrap_or_else(|| vtep_mac6_for(name));
    let preferred = Preferred {
        v4: state.as_ref().and_then(|s| s.subnet),
        v6: state.as_ref().and_then(|s| s.subnet6),
    };
    Ok(Identity {
        node: NodeIdentity {
            name: name.to_string(),
            public_ip,
            vtep_mac,
            public_ipv6,
            vtep_mac6,
        },
        iface,
        mtu,
        mtu6,
        state_file,
        preferred,
    })
}

/// The inputs the dataplane tasks share.
struct Feeds {
    own: watch::Receiver<Option<OwnLease>>,
    subnets: watch::Receiver<Arc<crate::store::etcd::PrefixView>>,
    nodes: watch::Receiver<Arc<crate::store::etcd::PrefixView>>,
    peers_tx: watch::Sender<Arc<crate::overlay::plan::PeerSet>>,
}

/// The running dataplane tasks.
struct Dataplane {
    overlay: tokio::task::JoinHandle<Result<()>>,
    proxy: tokio::task::JoinHandle<Result<()>>,
    /// The subnets the overlay is programmed for (subnet.env is written from them).
    ready: watch::Receiver<Option<SubnetKey>>,
}

/// Starts the liveness record, the pod registrar, the service proxy and the overlay
/// reconciler.
#[allow(clippy::too_many_arguments)]
fn spawn_dataplane(
    args: &DaemonArgs,
    store: &Store,
    id: &Identity,
    cfg: &NetworkConfig,
    feeds: Feeds,
    etcd_addrs: Vec<std::net::SocketAddrV4>,
    metrics: &Arc<Metrics>,
    status: &Arc<DaemonStatus>,
) -> Dataplane {
    let name = id.node.name.clone();
    let (public_ip, vtep_mac) = (id.node.public_ip, id.node.vtep_mac);
    let own_rx = feeds.own;
    let (ready_tx, ready_rx) = watch::channel(None);

    let (lease_tx, lease_rx) = watch::channel(None);
    tokio::spawn(crate::node::liveness::run(
        store.clone(),
        args.etcd.clone(),
        id.node.clone(),
        own_rx.clone(),
        args.liveness_ttl,
        lease_tx,
        metrics.clone(),
    ));

    tokio::spawn(crate::daemon::pod_registrar::run(
        store.clone(),
        args.etcd.clone(),
        name.clone(),
        args.cni.settings(&args.subnet_file),
        own_rx.clone(),
        lease_rx,
    ));

    let (status_tx, status_rx) = tokio::sync::mpsc::channel(4);
    let ctx = NodeContext {
        node: name.clone(),
        family: Family::V4,
        cluster_network: cfg.network.into(),
        service_cidr: args.service_cidr.v4.into(),
        balancing: args.load_balancing,
    };
    // The IPv6 table, for the IPv6 cluster IPs of dual-stack services: with an IPv6 service
    // range and a dual-stack network.
    let ctx6 = match (args.service_cidr.v6, &cfg.ipv6) {
        (Some(c6), Some(p)) => Some(NodeContext {
            family: Family::V6,
            cluster_network: p.network.into(),
            service_cidr: c6.into(),
            ..ctx.clone()
        }),
        (Some(c6), None) => {
            warn!(
                service_cidr6 = %c6,
                "--service-cidr has an IPv6 range but the network config is not dual-stack: \
                 IPv6 cluster IPs are not programmed"
            );
            None
        }
        (None, _) => None,
    };
    let mut node_ips: Vec<Ipv4Addr> = id.iface.addrs.iter().map(|a| a.ip()).collect();
    node_ips.push(public_ip);
    let guard = AddressGuard {
        service_cidr: args.service_cidr.v4,
        service_cidr6: args.service_cidr.v6,
        cluster_network: Some(cfg.network),
        node_ips,
        etcd: etcd_addrs,
    };
    let record_feeds = crate::store::records::Feeds::watch(store, &args.etcd);
    let proxy_feeds = match dns_settings(args, cfg) {
        Ok(Some(settings)) => {
            let (proxy_feeds, dns_feeds) = record_feeds.tee();
            tokio::spawn(run_dns(
                dns_feeds,
                args.etcd.clone(),
                settings,
                metrics.clone(),
                status.clone(),
            ));
            proxy_feeds
        }
        Ok(None) => record_feeds,
        Err(e) => {
            error!("cluster DNS not started: {e:#}");
            record_feeds
        }
    };
    let proxy = tokio::spawn(crate::proxy::run::run(
        proxy_feeds,
        args.etcd.clone(),
        ctx,
        ctx6,
        guard,
        metrics.clone(),
        status_rx,
    ));
    status.set_proxy(status_tx);

    let settings = OverlaySettings {
        iface: args.iface.clone(),
        public_ip,
        vtep_mac,
        public_ipv6: id.node.public_ipv6,
        vtep_mac6: id.node.vtep_mac6,
        cfg: cfg.clone(),
        ip_masq: args.ip_masq,
        resync: Duration::from_secs(args.resync_secs),
    };
    let overlay = tokio::spawn({
        let (metrics, own_rx, subnets, nodes, peers_tx) = (
            metrics.clone(),
            own_rx.clone(),
            feeds.subnets,
            feeds.nodes,
            feeds.peers_tx,
        );
        async move {
            let r = crate::overlay::reconciler::run(
                settings, metrics, own_rx, subnets, nodes, ready_tx, peers_tx,
            )
            .await;
            if let Err(e) = &r {
                error!("overlay reconciler stopped, the overlay is not maintained: {e:#}");
            }
            r
        }
    });
    Dataplane {
        overlay,
        proxy,
        ready: ready_rx,
    }
}

/// Waits for shutdown or a leave request while the subnet is kept: keeps the state file and
/// subnet.env current; on a leave, stops the dataplane and removes this node's traces. On
/// shutdown the dataplane stays in place.
#[allow(clippy::too_many_arguments)]
async fn supervise(
    args: &DaemonArgs,
    store: &Store,
    id: &Identity,
    cfg: &NetworkConfig,
    own_rx: watch::Receiver<Option<OwnLease>>,
    dataplane: Dataplane,
    keep: impl std::future::Future<Output = KeepOutcome>,
    mut shutdown: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Result<()> {
    let name = &id.node.name;
    let Dataplane {
        overlay,
        proxy,
        ready: mut ready_rx,
    } = dataplane;
    // subnet.env is the node's readiness for CNI (and flannel's contract): written once the
    // overlay is programmed for the subnet, as flannel writes it after its backend is up.
    let dns = dns_settings(args, cfg).ok().flatten();
    let write_env = |key: SubnetKey| {
        let ipv6 = cfg.ipv6.as_ref().zip(key.v6).map(|(pool, subnet)| Ipv6Env {
            network: pool.network,
            subnet,
        });
        let env = SubnetEnv {
            network: cfg.network,
            subnet: key.v4,
            // One MTU for both families of a pod: the smaller (the IPv6 device's, 20 bytes
            // less over an IPv6 underlay), so neither family's packets exceed their device.
            mtu: match (ipv6, id.mtu6) {
                (Some(_), Some(m6)) => id.mtu.min(m6),
                _ => id.mtu,
            },
            ipv6,
            ipmasq: args.ip_masq,
            cluster_dns: dns.as_ref().map(|d| crate::model::subnet_env::ClusterDns {
                ip: d.dns_ip,
                domain: d.domain.to_ascii().trim_end_matches('.').to_string(),
            }),
        };
        if let Err(e) = env.write_atomic(&args.subnet_file) {
            error!("writing {}: {e:#}", args.subnet_file.display());
        }
    };
    let mut overlay_running = true;
    let mut own_watch = own_rx.clone();
    tokio::pin!(keep);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                info!("shutting down; the dataplane stays in place");
                return Ok(());
            }
            outcome = &mut keep => {
                match outcome {
                    KeepOutcome::LeaveRequested => {
                        overlay.abort();
                        proxy.abort();
                        let cur = own_rx.borrow().clone();
                        teardown_local(args, cfg, &id.state_file).await;
                        let _ = store.delete(&crate::store::keys::leave_key(&args.etcd, name)).await;
                        let _ = store.delete(&crate::store::keys::node_key(&args.etcd, name)).await;
                        info!(subnet = ?cur.map(|c| c.subnet), "left the cluster");
                        return Ok(());
                    }
                }
            }
            c = own_watch.changed() => {
                if c.is_ok() && let Some(o) = own_watch.borrow_and_update().clone() {
                    id.persist(&o);
                }
            }
            r = ready_rx.changed(), if overlay_running => {
                match r {
                    Ok(()) => {
                        if let Some(key) = *ready_rx.borrow_and_update() {
                            write_env(key);
                        }
                    }
                    // The reconciler stopped (it logged why).
                    Err(_) => overlay_running = false,
                }
            }
        }
    }
}

/// How often to renew a subnet lease of `ttl` seconds: well before expiry, at most hourly.
pub fn renew_interval(ttl: i64) -> Duration {
    Duration::from_secs(((ttl / 4).clamp(2, 3600)) as u64)
}

async fn teardown_local(args: &DaemonArgs, cfg: &NetworkConfig, state_file: &std::path::Path) {
    if let Err(e) = crate::overlay::reconciler::teardown(&args.iface, cfg.backend.vni).await {
        error!("{e:#}");
    }
    if let Err(e) = crate::proxy::table::teardown().await {
        error!("removing the service table: {e:#}");
    }
    if let Ok(Some(d)) = dns_settings(args, cfg)
        && let Err(e) = crate::dns::device::remove_dns_address(d.dns_ip).await
    {
        error!("removing the cluster DNS address: {e:#}");
    }
    for p in [&args.subnet_file, &state_file.to_path_buf()] {
        if let Err(e) = std::fs::remove_file(p)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!("removing {}: {e}", p.display());
        }
    }
}

/// The cluster DNS settings from the flags (None with `--dns false`).
pub fn dns_settings(
    args: &DaemonArgs,
    cfg: &NetworkConfig,
) -> Result<Option<crate::dns::run::DnsSettings>> {
    if !args.dns {
        return Ok(None);
    }
    let reserved = crate::model::service::cluster_dns_ip(args.service_cidr.v4);
    let dns_ip = match (args.cluster_dns, reserved) {
        (Some(ip), r) if args.service_cidr.v4.contains(ip) && Some(ip) != r => bail!(
            "--cluster-dns {ip} is inside the service CIDR {} but is not its reserved 10th address {}: a service could be given it",
            args.service_cidr.v4,
            r.map_or("(none)".to_string(), |r| r.to_string())
        ),
        (Some(ip), _) => ip,
        (None, Some(r)) => r,
        (None, None) => bail!(
            "the service CIDR {} is too small for a cluster DNS address; pass --cluster-dns",
            args.service_cidr.v4
        ),
    };
    let domain = hickory_proto::rr::Name::from_ascii(format!(
        "{}.",
        args.cluster_domain.trim_end_matches('.')
    ))
    .ok()
    .filter(|n| n.num_labels() > 0)
    .with_context(|| {
        format!(
            "--cluster-domain {:?} is not a domain name",
            args.cluster_domain
        )
    })?
    .to_lowercase();
    let upstreams = if args.dns_upstreams.is_empty() {
        match std::fs::read_to_string(&args.dns_resolv_conf) {
            Ok(t) => crate::dns::forward::resolv_conf_upstreams(&t),
            Err(e) => {
                warn!(
                    "cannot read {}: {e}; names outside the cluster get REFUSED",
                    args.dns_resolv_conf.display()
                );
                Vec::new()
            }
        }
    } else {
        args.dns_upstreams
            .iter()
            .map(|u| {
                u.parse::<SocketAddr>()
                    .or_else(|_| {
                        u.parse::<std::net::IpAddr>()
                            .map(|ip| SocketAddr::new(ip, 53))
                    })
                    .map_err(|_| anyhow!("--dns-upstream {u:?} is not IP or IP:PORT"))
            })
            .collect::<Result<Vec<_>>>()?
    };
    Ok(Some(crate::dns::run::DnsSettings {
        domain,
        dns_ip,
        port: 53,
        upstreams,
        ttl: 5,
        service_cidr: args.service_cidr.v4,
        cluster_network: cfg.network,
        cluster_network6: cfg.ipv6.as_ref().map(|p| p.network),
        service_cidr6: args.service_cidr.v6,
    }))
}

/// Puts the cluster DNS address on the node and serves it; a failure is logged and leaves
/// the rest of the daemon running.
async fn run_dns(
    feeds: crate::store::records::Feeds,
    keys: EtcdArgs,
    settings: crate::dns::run::DnsSettings,
    metrics: Arc<Metrics>,
    status: Arc<DaemonStatus>,
) {
    let r = async {
        let nl = Netlink::connect()?;
        crate::dns::device::ensure_dns_address(&nl, settings.dns_ip).await?;
        let zone = settings.new_zone();
        crate::dns::run::run(feeds, keys, settings, zone, metrics, |h| status.set_dns(h)).await
    }
    .await;
    if let Err(e) = r {
        error!("cluster DNS stopped: {e:#}");
    }
}

/// `tartand --leave`: release the subnet in etcd (when reachable) and remove local state.
async fn leave(args: &DaemonArgs, store: &Store, node: &NodeIdentity) -> Result<()> {
    let cfg = match store.get(&args.etcd.config_key()).await {
        Ok(Some(kv)) => NetworkConfig::parse(&kv.value).ok(),
        _ => None,
    };
    let (_, items) = store
        .list(&args.etcd.subnets_prefix())
        .await
        .context("listing subnets to release ours")?;
    for it in items {
        let Ok(v) = crate::model::subnet_lease::LeaseValue::parse(&it.value) else {
            continue;
        };
        if !v.belongs_to(&node.name, node.public_ip) {
            continue;
        }
        if it.lease == 0 {
            info!(key = %it.key, "keeping the reservation");
            continue;
        }
        store.delete(&it.key).await?;
        let _ = store.revoke(it.lease).await;
        info!(key = %it.key, "released subnet");
    }
    let _ = store
        .delete(&crate::store::keys::node_key(&args.etcd, &node.name))
        .await;
    let _ = store
        .delete(&crate::store::keys::leave_key(&args.etcd, &node.name))
        .await;
    let vni = cfg
        .as_ref()
        .map_or(crate::model::netconf::DEFAULT_VNI, |c| c.backend.vni);
    if let Err(e) = crate::overlay::reconciler::teardown(&args.iface, vni).await {
        error!("{e:#}");
    }
    if let Err(e) = crate::proxy::table::teardown().await {
        error!("removing the service table: {e:#}");
    }
    let dns_ip = args
        .cluster_dns
        .or_else(|| crate::model::service::cluster_dns_ip(args.service_cidr.v4));
    if let Some(ip) = dns_ip
        && let Err(e) = crate::dns::device::remove_dns_address(ip).await
    {
        error!("removing the cluster DNS address: {e:#}");
    }
    let state_file = state_path(&args.state_dir, &node.name);
    for p in [&args.subnet_file, &state_file] {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn every_per_node_path_is_locked_and_leave_locks_what_it_removes() {
        let run = DaemonArgs::parse_from(["tartand", "--iface", "eth0"]);
        let got: Vec<(&str, String)> = run
            .owned_paths()
            .iter()
            .map(|p| (p.flag, p.path.display().to_string()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("--state-dir", "/var/lib/tartan".to_string()),
                ("--cni-data-dir", "/var/lib/tartan/cni".to_string()),
                ("--cni-socket", "/run/tartan/tartand.sock".to_string()),
                ("--subnet-file", "/run/tartan/subnet.env".to_string()),
            ]
        );
        let leave = DaemonArgs::parse_from(["tartand", "--iface", "eth0", "--leave"]);
        let flags: Vec<&str> = leave.owned_paths().iter().map(|p| p.flag).collect();
        assert_eq!(flags, vec!["--state-dir", "--subnet-file"]);
    }
}
