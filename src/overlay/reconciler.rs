//! The overlay reconcile loop: compares what etcd wants (peer leases) with what netlink shows
//! and repairs the difference. Runs on every lease change, on kernel notifications that
//! something was removed (debounced), and on a periodic tick. Never acts before the first
//! complete listing of the leases, so an unreachable etcd never removes anything.
//!
//! In a dual-stack network, when this node holds an IPv6 subnet, a second VXLAN device
//! ([`device_name6`], flannel's `flannel-v6.<VNI>`) over the IPv6 underlay carries the IPv6
//! peers, with the same plan, diff and repair as the IPv4 one.
//!
//! The loop ([`reconcile_loop`]) takes its inputs (own lease, subnet and node mirrors,
//! kernel notifications) and the kernel ([`OverlayKernel`]) as arguments; [`run`] wires the
//! real ones.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::metrics::Metrics;
use crate::model::netconf::NetworkConfig;
use crate::model::subnet_lease::{MacAddr, SubnetKey};
use crate::node::liveness::live_claims;
use crate::node::subnet_keeper::OwnLease;
use crate::overlay::events::{KernelChange, KernelEvents, NetlinkEvents, RTMGRP_OVERLAY};
use crate::overlay::kernel::{DeviceChange, HostKernel, OverlayKernel, VxlanSpec};
use crate::overlay::plan::{
    LocalNode, OverlayState, PeerSet, V6, desired_state, diff, peers_from_items,
};
use crate::store::etcd::PrefixView;

/// VXLAN header overhead on an IPv4 underlay.
pub const VXLAN_OVERHEAD: u32 = 50;
/// VXLAN header overhead on an IPv6 underlay (the IPv6 header is 20 bytes longer).
pub const VXLAN_OVERHEAD6: u32 = 70;

/// The VXLAN device name for a VNI.
pub fn device_name(vni: u32) -> String {
    format!("tartan.{vni}")
}

/// The IPv6 VXLAN device's name for a VNI: `tartan6.<VNI>`, or `tartan6x<VNI in hex>` for
/// VNIs of eight digits (an interface name has at most 15 characters).
pub fn device_name6(vni: u32) -> String {
    let name = format!("tartan6.{vni}");
    if name.len() <= 15 {
        name
    } else {
        format!("tartan6x{vni:x}")
    }
}

/// Fixed inputs of the reconciler.
#[derive(Clone)]
pub struct OverlaySettings {
    /// Underlay interface name.
    pub iface: String,
    /// This node's underlay address (VXLAN local address).
    pub public_ip: std::net::Ipv4Addr,
    /// VTEP MAC.
    pub vtep_mac: MacAddr,
    /// This node's IPv6 underlay address (the IPv6 VXLAN device's local address), if any.
    pub public_ipv6: Option<std::net::Ipv6Addr>,
    /// The IPv6 VTEP's MAC.
    pub vtep_mac6: MacAddr,
    /// Network config.
    pub cfg: NetworkConfig,
    /// Whether to install the masquerade table.
    pub ip_masq: bool,
    /// Full resync period.
    pub resync: Duration,
}

/// The MTU for pods and the VXLAN device, from the underlay MTU (computed from the underlay
/// every time, so re-creating the device never subtracts the overhead twice).
pub fn overlay_mtu(underlay_mtu: u32) -> Result<u32> {
    if underlay_mtu < 576 + VXLAN_OVERHEAD {
        bail!("underlay MTU {underlay_mtu} is too small for VXLAN");
    }
    Ok(underlay_mtu - VXLAN_OVERHEAD)
}

/// The IPv6 VXLAN device's MTU over an IPv6 underlay (IPv6 needs at least 1280).
pub fn overlay_mtu6(underlay_mtu: u32) -> Result<u32> {
    if underlay_mtu < 1280 + VXLAN_OVERHEAD6 {
        bail!("underlay MTU {underlay_mtu} is too small for VXLAN over IPv6 (IPv6 needs 1280)");
    }
    Ok(underlay_mtu - VXLAN_OVERHEAD6)
}

/// The interfaces the overlay lives on, as of the last pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Owned {
    vx: u32,
    underlay: u32,
    vx6: Option<u32>,
}

impl Owned {
    fn indices(&self) -> Vec<u32> {
        [Some(self.vx), Some(self.underlay), self.vx6]
            .into_iter()
            .flatten()
            .collect()
    }
}

struct Reconciler<K> {
    kernel: K,
    s: OverlaySettings,
    metrics: Arc<Metrics>,
    masq_applied: Option<(String, String)>,
    /// The desired state and the peer set it was computed from, with their inputs.
    desired_cache: Option<(DesiredKey, Desired, Arc<PeerSet>)>,
    /// Interfaces the overlay lives on (VXLAN devices, underlay) as of the last pass; kernel
    /// notifications about other interfaces (pod veths, bridges) cannot need a repair.
    owned: Option<Owned>,
    /// Lease conflicts already logged (each is said once while it lasts).
    reported_conflicts: std::collections::BTreeSet<String>,
}

/// What the desired overlay state was computed from: the revisions of the subnet and node
/// views, the own subnets, the underlay networks.
type DesiredKey = (
    i64,
    i64,
    ipnetwork::Ipv4Network,
    Vec<ipnetwork::Ipv4Network>,
    Option<(ipnetwork::Ipv6Network, Vec<ipnetwork::Ipv6Network>)>,
);

/// The desired state of each family (IPv6 only while the node holds an IPv6 subnet).
#[derive(Clone)]
struct Desired {
    v4: Arc<OverlayState>,
    v6: Option<Arc<OverlayState<V6>>>,
}

impl<K: OverlayKernel> Reconciler<K> {
    /// One pass; returns the number of kernel operations it issued.
    async fn reconcile(
        &mut self,
        own: &OwnLease,
        view: &PrefixView,
        nodes: &PrefixView,
    ) -> Result<usize> {
        let t0 = Instant::now();
        let iface = self.kernel.iface(&self.s.iface).await?;
        let spec = VxlanSpec {
            name: device_name(self.s.cfg.backend.vni),
            vni: self.s.cfg.backend.vni,
            port: self.s.cfg.backend.port,
            local: self.s.public_ip.into(),
            underlay_index: iface.index,
            mtu: overlay_mtu(iface.mtu)?,
            mac: self.s.vtep_mac,
        };
        let (vx, change) = self.kernel.ensure_vxlan(&spec).await?;
        let mut ops = usize::from(change != DeviceChange::Unchanged);
        if change == DeviceChange::Created {
            info!(device = %spec.name, mtu = spec.mtu, "VXLAN device created");
        }
        let addr =
            ipnetwork::Ipv4Network::new(own.subnet.network(), 32).context("device address")?;
        if self.kernel.ensure_only_addr(vx, addr).await? {
            ops += 1;
        }
        // The IPv6 half: the node's IPv6 subnet, over its IPv6 underlay address.
        let local6 = match (own.subnet6, self.s.public_ipv6, &self.s.cfg.ipv6) {
            (Some(subnet), Some(_), Some(_)) => Some(LocalNode::<V6> {
                subnet,
                underlay_networks: iface
                    .addrs6
                    .iter()
                    .map(|a| ipnetwork::Ipv6Network::new(a.network(), a.prefix()).unwrap_or(*a))
                    .collect(),
                direct_routing: self.s.cfg.backend.direct_routing,
            }),
            _ => None,
        };
        let vx6 = match (&local6, self.s.public_ipv6) {
            (Some(l6), Some(ip6)) => {
                let spec6 = VxlanSpec {
                    name: device_name6(self.s.cfg.backend.vni),
                    local: ip6.into(),
                    mtu: overlay_mtu6(iface.mtu)?,
                    mac: self.s.vtep_mac6,
                    ..spec.clone()
                };
                let (vx6, change) = self.kernel.ensure_vxlan(&spec6).await?;
                ops += usize::from(change != DeviceChange::Unchanged);
                if change == DeviceChange::Created {
                    info!(device = %spec6.name, mtu = spec6.mtu, "IPv6 VXLAN device created");
                }
                let addr6 = ipnetwork::Ipv6Network::new(l6.subnet.network(), 128)
                    .context("IPv6 device address")?;
                if self.kernel.ensure_only_addr6(vx6, addr6).await? {
                    ops += 1;
                }
                Some(vx6)
            }
            _ if self.s.cfg.ipv6.is_some() => {
                // A dual-stack network, but no IPv6 subnet (any more; or no IPv6 underlay
                // address): no IPv6 device either.
                if self
                    .kernel
                    .delete_link(&device_name6(self.s.cfg.backend.vni))
                    .await?
                {
                    info!("IPv6 VXLAN device removed: this node holds no IPv6 subnet");
                    ops += 1;
                }
                None
            }
            // An IPv4 network: nothing IPv6 is touched.
            _ => None,
        };
        self.owned = Some(Owned {
            vx,
            underlay: iface.index,
            vx6,
        });
        let local = LocalNode {
            subnet: own.subnet,
            underlay_networks: iface
                .addrs
                .iter()
                .map(|a| ipnetwork::Ipv4Network::new(a.network(), a.prefix()).unwrap_or(*a))
                .collect(),
            direct_routing: self.s.cfg.backend.direct_routing,
        };
        // Decoding every lease is the costly part of a pass; redo it only when etcd changed.
        let cache_key = (
            view.revision,
            nodes.revision,
            own.subnet,
            local.underlay_networks.clone(),
            local6
                .as_ref()
                .map(|l| (l.subnet, l.underlay_networks.clone())),
        );
        let desired = match &self.desired_cache {
            Some((k, d, _)) if *k == cache_key => d.clone(),
            _ => {
                let live = live_claims(nodes.items.values());
                let set =
                    peers_from_items(view.items.values(), &self.s.cfg, Some(own.subnet), &live);
                if !set.skipped.is_empty() {
                    self.metrics
                        .malformed_records
                        .inc_by(set.skipped.len() as u64);
                    for s in &set.skipped {
                        warn!("skipping subnet record: {s}");
                    }
                }
                if !set.ipv6_ignored.is_empty() {
                    self.metrics
                        .malformed_records
                        .inc_by(set.ipv6_ignored.len() as u64);
                    for (key, why) in &set.ipv6_ignored {
                        warn!("ignoring the IPv6 half of subnet record {key}: {why}");
                    }
                }
                self.report_conflicts(&set);
                let d = Desired {
                    v4: Arc::new(desired_state(&local, &set.peers)),
                    v6: local6
                        .as_ref()
                        .map(|l| Arc::new(desired_state(l, &set.peers6))),
                };
                self.desired_cache = Some((cache_key, d.clone(), Arc::new(set)));
                d
            }
        };
        let t1 = Instant::now();
        let actual = self.kernel.read_overlay(vx, iface.index).await?;
        let t2 = Instant::now();
        let d = diff(&desired.v4, &actual);
        if !d.is_empty() {
            log_diff("IPv4", &d);
            ops += d.len();
            self.kernel.apply_overlay(vx, iface.index, &d).await?;
        }
        self.metrics.peers.set(desired.v4.routes.len() as i64);
        // In a dual-stack network the IPv6 routes tartan owns are read also without an IPv6
        // device (index 0 matches no device): direct routes on the underlay left from a
        // time this node held an IPv6 subnet are removed.
        let d6 = if self.s.cfg.ipv6.is_some() {
            let actual6 = self
                .kernel
                .read_overlay6(vx6.unwrap_or(0), iface.index)
                .await?;
            let empty6 = OverlayState::<V6>::default();
            diff(desired.v6.as_deref().unwrap_or(&empty6), &actual6)
        } else {
            Default::default()
        };
        if !d6.is_empty() {
            log_diff("IPv6", &d6);
            ops += d6.len();
            self.kernel
                .apply_overlay6(vx6.unwrap_or(0), iface.index, &d6)
                .await?;
        }
        if self.s.ip_masq {
            ops += self
                .ensure_masq(own, local6.as_ref().map(|l| l.subnet))
                .await?;
        }
        self.kernel.ensure_ip_forward()?;
        if vx6.is_some() {
            self.kernel.ensure_ip6_forward()?;
        }
        debug!(
            prepare = ?(t1 - t0),
            read = ?(t2 - t1),
            rest = ?t2.elapsed(),
            "reconcile timing"
        );
        Ok(ops)
    }

    /// Logs each lease conflict (of either family) once while it lasts and publishes how
    /// many there are.
    fn report_conflicts(&mut self, set: &PeerSet) {
        let v4 = set.conflicts.iter().map(|c| (&c.key, &c.reason));
        let v6 = set.conflicts6.iter().map(|c| (&c.key, &c.reason));
        let now: std::collections::BTreeSet<String> = v4
            .chain(v6)
            .map(|(key, reason)| format!("{key}: {reason}"))
            .collect();
        for c in now.difference(&self.reported_conflicts) {
            warn!("subnet lease left out: {c}");
        }
        self.metrics.lease_conflicts.set(now.len() as i64);
        self.reported_conflicts = now;
    }

    /// Applies the masquerade table when it is missing or differs from what was applied.
    async fn ensure_masq(
        &mut self,
        own: &OwnLease,
        subnet6: Option<ipnetwork::Ipv6Network>,
    ) -> Result<usize> {
        let v6 = self
            .s
            .cfg
            .ipv6
            .as_ref()
            .zip(subnet6)
            .map(|(pool, s)| (pool.network, s));
        let body = crate::overlay::masquerade::table_body(self.s.cfg.network, own.subnet, v6);
        let current = self.kernel.masquerade_listing().await?;
        if let (Some((b, listed)), Some(cur)) = (&self.masq_applied, &current)
            && *b == body
            && listed == cur
        {
            return Ok(0);
        }
        if current.is_some() && self.masq_applied.is_some() {
            warn!("masquerade table changed behind our back; restoring it");
        }
        self.kernel
            .apply_masquerade(&crate::overlay::masquerade::script(
                self.s.cfg.network,
                own.subnet,
                v6,
            ))
            .await?;
        let listed = self.kernel.masquerade_listing().await?.unwrap_or_default();
        self.masq_applied = Some((body, listed));
        Ok(1)
    }
}

/// Says at debug level what a pass changes in one family's overlay.
fn log_diff<F: crate::overlay::plan::Family>(
    family: &str,
    d: &crate::overlay::plan::OverlayDiff<F>,
) {
    debug!(
        family,
        put_routes = d.put_routes.len(),
        del_routes = d.del_routes.len(),
        put_neigh = d.put_neighbours.len(),
        del_neigh = d.del_neighbours.len(),
        put_fdb = d.put_fdb.len(),
        del_fdb = d.del_fdb.len(),
        "applying overlay changes"
    );
}

/// Runs the reconcile loop forever on this host's kernel. `ready_tx` gets the node's subnet
/// once the overlay has been programmed for it (the device, the peers known so far,
/// masquerading); `peers_tx` the peer set each successful pass programmed.
pub async fn run(
    settings: OverlaySettings,
    metrics: Arc<Metrics>,
    own_rx: watch::Receiver<Option<OwnLease>>,
    subnets_rx: watch::Receiver<Arc<PrefixView>>,
    nodes_rx: watch::Receiver<Arc<PrefixView>>,
    ready_tx: watch::Sender<Option<SubnetKey>>,
    peers_tx: watch::Sender<Arc<PeerSet>>,
) -> Result<()> {
    let kernel = HostKernel::connect()?;
    let events = NetlinkEvents::subscribe(RTMGRP_OVERLAY)?;
    let inputs = OverlayInputs {
        own: own_rx,
        subnets: subnets_rx,
        nodes: nodes_rx,
    };
    let outputs = OverlayOutputs {
        ready: ready_tx,
        peers: peers_tx,
    };
    reconcile_loop(settings, kernel, events, inputs, metrics, outputs).await
}

/// What the reconcile loop follows: this node's lease and the two etcd mirrors.
pub struct OverlayInputs {
    /// This node's subnet lease (`None` until it holds one).
    pub own: watch::Receiver<Option<OwnLease>>,
    /// The subnet leases (`<prefix>/subnets/`).
    pub subnets: watch::Receiver<Arc<PrefixView>>,
    /// The node records (`/tartan/nodes/`), for resolving lease conflicts.
    pub nodes: watch::Receiver<Arc<PrefixView>>,
}

/// What the reconcile loop tells the rest of the daemon.
pub struct OverlayOutputs {
    /// The node's subnets, once the overlay has been programmed for them (the devices, the
    /// peers known so far, masquerading): subnet.env may be written.
    pub ready: watch::Sender<Option<SubnetKey>>,
    /// The peer set the last successful pass programmed (peers, skipped records, lease
    /// conflicts), for `/status`; empty until then, unchanged by failed passes.
    pub peers: watch::Sender<Arc<PeerSet>>,
}

/// How long after a failed pass the next one runs (unless an input change comes first).
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long kernel removal notifications are let settle before one repair pass.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// The reconcile loop: a pass on every input change, on kernel removal notifications about
/// the overlay's interfaces (debounced by [`DEBOUNCE`]), every `settings.resync`, and
/// [`RETRY_AFTER`] a failed pass. Nothing is read from or done to the kernel before the
/// node holds a subnet and both mirrors were listed. Returns when an input closes, or with
/// an error when the notifications cannot be resubscribed.
pub async fn reconcile_loop<K: OverlayKernel, E: KernelEvents>(
    settings: OverlaySettings,
    kernel: K,
    mut events: E,
    inputs: OverlayInputs,
    metrics: Arc<Metrics>,
    outputs: OverlayOutputs,
) -> Result<()> {
    let OverlayOutputs {
        ready: ready_tx,
        peers: peers_tx,
    } = outputs;
    let OverlayInputs {
        own: mut own_rx,
        subnets: mut subnets_rx,
        nodes: mut nodes_rx,
    } = inputs;
    let resync = settings.resync;
    let mut r = Reconciler {
        kernel,
        s: settings,
        metrics: metrics.clone(),
        masq_applied: None,
        desired_cache: None,
        owned: None,
        reported_conflicts: Default::default(),
    };
    let mut tick = tokio::time::interval(resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending_since: Option<Instant> = None;
    let mut failing = false;
    // The interfaces the kernel-side event filter currently lets through.
    let mut focused: Option<Owned> = None;
    loop {
        if r.owned != focused
            && let Some(owned) = r.owned
        {
            // Unfiltered events only cost wake-ups (the pod-veth check below still holds):
            // said once per change of interfaces, not retried.
            if let Err(e) = events.focus(&owned.indices()) {
                warn!("netlink notifications stay unfiltered: {e:#}");
            }
            focused = r.owned;
        }
        tokio::select! {
            _ = tick.tick() => {}
            c = own_rx.changed() => { if c.is_err() { return Ok(()); } }
            c = subnets_rx.changed() => {
                if c.is_err() { return Ok(()); }
                let at = subnets_rx.borrow().changed_at;
                pending_since = Some(pending_since.map_or(at, |p| p.min(at)));
            }
            c = nodes_rx.changed() => { if c.is_err() { return Ok(()); } }
            ev = events.next() => {
                match ev {
                    Some(KernelChange::Removal(Some(i)))
                        if r.owned.is_some_and(|o| !o.indices().contains(&i)) =>
                    {
                        // A pod's veth, a bridge...: not the overlay's.
                        continue;
                    }
                    Some(KernelChange::Removal(_)) => {
                        // Debounce: let a burst of notifications settle, then repair once.
                        tokio::time::sleep(DEBOUNCE).await;
                        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(1), events.next()).await {}
                    }
                    Some(KernelChange::Addition) => continue,
                    None => {
                        events.resubscribe()?;
                        focused = None;
                        continue;
                    }
                }
            }
        }
        let own = own_rx.borrow().clone();
        let view = subnets_rx.borrow().clone();
        let nodes = nodes_rx.borrow().clone();
        let Some(own) = own else { continue };
        // Conflicts are resolved with the node records, so both views must be complete.
        if !view.listed || !nodes.listed {
            continue;
        }
        metrics.reconcile_runs.inc();
        match r.reconcile(&own, &view, &nodes).await {
            Ok(ops) => {
                metrics.reconcile_operations.inc_by(ops as u64);
                if let Some((_, _, set)) = &r.desired_cache {
                    peers_tx.send_if_modified(|p| {
                        let new = !Arc::ptr_eq(p, set);
                        if new {
                            *p = set.clone();
                        }
                        new
                    });
                }
                ready_tx.send_if_modified(|r| {
                    let first = *r != Some(own.key());
                    *r = Some(own.key());
                    first
                });
                if failing {
                    info!("overlay reconcile recovered");
                    failing = false;
                }
                if let Some(since) = pending_since.take()
                    && ops > 0
                {
                    metrics
                        .peer_program_seconds
                        .observe(since.elapsed().as_secs_f64());
                }
                if ops > 0 {
                    debug!(ops, "overlay reconciled");
                }
            }
            Err(e) => {
                metrics.reconcile_errors.inc();
                failing = true;
                error!("overlay reconcile failed (will retry): {e:#}");
                // Retry soon rather than waiting for the next tick.
                tick.reset_after(RETRY_AFTER);
            }
        }
    }
}

/// Removes the overlay from this node: the VXLAN device (with its neighbours, FDB entries and
/// routes), tartan's direct routes on the underlay, and the masquerade table.
pub async fn teardown(iface: &str, vni: u32) -> Result<()> {
    teardown_with(&HostKernel::connect()?, iface, vni).await
}

/// [`teardown`] on the given kernel: every step is tried; the error lists those that failed.
pub async fn teardown_with<K: OverlayKernel>(kernel: &K, iface: &str, vni: u32) -> Result<()> {
    let mut errors = crate::util::errors::ErrorList::new();
    for dev in [device_name(vni), device_name6(vni)] {
        if let Err(e) = kernel.delete_link(&dev).await {
            errors.push(format_args!("{e:#}"));
        }
    }
    match kernel.iface(iface).await {
        Ok(i) => {
            if let Err(e) = kernel.delete_owned_routes(i.index).await {
                errors.push(format_args!("{e:#}"));
            }
        }
        Err(e) => errors.push(format_args!("{e:#}")),
    }
    if let Err(e) = kernel.delete_masquerade().await {
        errors.push(format_args!("{e:#}"));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("teardown incomplete: {errors}")
    }
}

#[cfg(test)]
mod tests;
