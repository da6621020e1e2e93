//! The overlay reconcile loop: compares what etcd wants (peer leases) with what netlink shows
//! and repairs the difference. Runs on every lease change, on kernel notifications that
//! something was removed (debounced), and on a periodic tick. Never acts before the first
//! complete listing of the leases, so an unreachable etcd never removes anything.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::kernel::netlink::Netlink;
use crate::metrics::Metrics;
use crate::model::netconf::NetworkConfig;
use crate::model::subnet_lease::MacAddr;
use crate::node::liveness::live_claims;
use crate::node::subnet_keeper::OwnLease;
use crate::overlay::events::{KernelChange, NetlinkEvents, RTMGRP_OVERLAY};
use crate::overlay::kernel::{DeviceChange, VxlanSpec};
use crate::overlay::plan::{
    LeaseConflict, LocalNode, OverlayState, desired_state, diff, peers_from_items,
};
use crate::store::etcd::PrefixView;

/// VXLAN header overhead on an IPv4 underlay.
pub const VXLAN_OVERHEAD: u32 = 50;

/// The VXLAN device name for a VNI.
pub fn device_name(vni: u32) -> String {
    format!("tartan.{vni}")
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

struct Reconciler {
    nl: Netlink,
    s: OverlaySettings,
    metrics: Arc<Metrics>,
    masq_applied: Option<(String, String)>,
    desired_cache: Option<(DesiredKey, Arc<OverlayState>)>,
    /// Interfaces the overlay lives on (VXLAN device, underlay) as of the last pass; kernel
    /// notifications about other interfaces (pod veths, bridges) cannot need a repair.
    owned: Option<(u32, u32)>,
    /// Lease conflicts already logged (each is said once while it lasts).
    reported_conflicts: std::collections::BTreeSet<String>,
}

/// What the desired overlay state was computed from: the revisions of the subnet and node
/// views, the own subnet, the underlay networks.
type DesiredKey = (
    i64,
    i64,
    ipnetwork::Ipv4Network,
    Vec<ipnetwork::Ipv4Network>,
);

impl Reconciler {
    /// One pass; returns the number of kernel operations it issued.
    async fn reconcile(
        &mut self,
        own: &OwnLease,
        view: &PrefixView,
        nodes: &PrefixView,
    ) -> Result<usize> {
        let t0 = Instant::now();
        let iface = self.nl.iface(&self.s.iface).await?;
        let spec = VxlanSpec {
            name: device_name(self.s.cfg.backend.vni),
            vni: self.s.cfg.backend.vni,
            port: self.s.cfg.backend.port,
            local: self.s.public_ip,
            underlay_index: iface.index,
            mtu: overlay_mtu(iface.mtu)?,
            mac: self.s.vtep_mac,
        };
        let (vx, change) = self.nl.ensure_vxlan(&spec).await?;
        self.owned = Some((vx, iface.index));
        let mut ops = usize::from(change != DeviceChange::Unchanged);
        if change == DeviceChange::Created {
            info!(device = %spec.name, mtu = spec.mtu, "VXLAN device created");
        }
        let addr =
            ipnetwork::Ipv4Network::new(own.subnet.network(), 32).context("device address")?;
        if self.nl.ensure_only_addr(vx, addr).await? {
            ops += 1;
        }
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
        );
        let desired = match &self.desired_cache {
            Some((k, d)) if *k == cache_key => d.clone(),
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
                self.report_conflicts(&set.conflicts);
                let d = Arc::new(desired_state(&local, &set.peers));
                self.desired_cache = Some((cache_key, d.clone()));
                d
            }
        };
        let t1 = Instant::now();
        let actual = self.nl.read_overlay(vx, iface.index).await?;
        let t2 = Instant::now();
        let d = diff(&desired, &actual);
        if !d.is_empty() {
            debug!(
                put_routes = d.put_routes.len(),
                del_routes = d.del_routes.len(),
                put_neigh = d.put_neighbours.len(),
                del_neigh = d.del_neighbours.len(),
                put_fdb = d.put_fdb.len(),
                del_fdb = d.del_fdb.len(),
                "applying overlay changes"
            );
            ops += d.len();
            self.nl.apply_overlay(vx, iface.index, &d).await?;
        }
        self.metrics.peers.set(desired.routes.len() as i64);
        if self.s.ip_masq {
            ops += self.ensure_masq(own).await?;
        }
        ensure_ip_forward()?;
        debug!(
            prepare = ?(t1 - t0),
            read = ?(t2 - t1),
            rest = ?t2.elapsed(),
            "reconcile timing"
        );
        Ok(ops)
    }

    /// Logs each lease conflict once (while it lasts) and publishes how many there are.
    fn report_conflicts(&mut self, conflicts: &[LeaseConflict]) {
        let now: std::collections::BTreeSet<String> = conflicts
            .iter()
            .map(|c| format!("{}: {}", c.key, c.reason))
            .collect();
        for c in now.difference(&self.reported_conflicts) {
            warn!("subnet lease left out: {c}");
        }
        self.metrics.lease_conflicts.set(now.len() as i64);
        self.reported_conflicts = now;
    }

    /// Applies the masquerade table when it is missing or differs from what was applied.
    async fn ensure_masq(&mut self, own: &OwnLease) -> Result<usize> {
        let body = crate::overlay::masquerade::table_body(self.s.cfg.network, own.subnet);
        let current = crate::kernel::nft_cmd::list_table(
            crate::overlay::masquerade::FAMILY,
            crate::overlay::masquerade::TABLE,
        )
        .await?;
        if let (Some((b, listed)), Some(cur)) = (&self.masq_applied, &current)
            && *b == body
            && listed == cur
        {
            return Ok(0);
        }
        if current.is_some() && self.masq_applied.is_some() {
            warn!("masquerade table changed behind our back; restoring it");
        }
        crate::kernel::nft_cmd::apply(&crate::overlay::masquerade::script(
            self.s.cfg.network,
            own.subnet,
        ))
        .await?;
        let listed = crate::kernel::nft_cmd::list_table(
            crate::overlay::masquerade::FAMILY,
            crate::overlay::masquerade::TABLE,
        )
        .await?
        .unwrap_or_default();
        self.masq_applied = Some((body, listed));
        Ok(1)
    }
}

/// Enables IPv4 forwarding in this network namespace (pods are routed through the node).
pub fn ensure_ip_forward() -> Result<()> {
    let p = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(p)
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
    {
        return Ok(());
    }
    std::fs::write(p, b"1").with_context(|| format!("enabling {p}"))
}

/// Runs the reconcile loop forever. `ready_tx` gets the node's subnet once the overlay has
/// been programmed for it (the device, the peers known so far, masquerading).
pub async fn run(
    settings: OverlaySettings,
    metrics: Arc<Metrics>,
    mut own_rx: watch::Receiver<Option<OwnLease>>,
    mut subnets_rx: watch::Receiver<Arc<PrefixView>>,
    mut nodes_rx: watch::Receiver<Arc<PrefixView>>,
    ready_tx: watch::Sender<Option<ipnetwork::Ipv4Network>>,
) -> Result<()> {
    let nl = Netlink::connect()?;
    let mut events = NetlinkEvents::subscribe(RTMGRP_OVERLAY)?;
    let resync = settings.resync;
    let mut r = Reconciler {
        nl,
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
    let mut focused: Option<(u32, u32)> = None;
    loop {
        if r.owned != focused
            && let Some((vx, ul)) = r.owned
        {
            // Unfiltered events only cost wake-ups (the pod-veth check below still holds):
            // said once per change of interfaces, not retried.
            if let Err(e) = events.focus(&[vx, ul]) {
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
                        if r.owned.is_some_and(|(vx, ul)| i != vx && i != ul) =>
                    {
                        // A pod's veth, a bridge...: not the overlay's.
                        continue;
                    }
                    Some(KernelChange::Removal(_)) => {
                        // Debounce: let a burst of notifications settle, then repair once.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(1), events.next()).await {}
                    }
                    Some(KernelChange::Addition) => continue,
                    None => {
                        events = NetlinkEvents::subscribe(RTMGRP_OVERLAY)?;
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
                ready_tx.send_if_modified(|r| {
                    let first = *r != Some(own.subnet);
                    *r = Some(own.subnet);
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
                tick.reset_after(Duration::from_secs(1));
            }
        }
    }
}

/// Removes the overlay from this node: the VXLAN device (with its neighbours, FDB entries and
/// routes), tartan's direct routes on the underlay, and the masquerade table.
pub async fn teardown(iface: &str, vni: u32) -> Result<()> {
    let nl = Netlink::connect()?;
    let mut errors = crate::util::errors::ErrorList::new();
    if let Err(e) = nl.delete_link(&device_name(vni)).await {
        errors.push(format_args!("{e:#}"));
    }
    match nl.iface(iface).await {
        Ok(i) => {
            if let Err(e) = nl.delete_owned_routes(i.index).await {
                errors.push(format_args!("{e:#}"));
            }
        }
        Err(e) => errors.push(format_args!("{e:#}")),
    }
    if let Err(e) = crate::kernel::nft_cmd::delete_table(
        crate::overlay::masquerade::FAMILY,
        crate::overlay::masquerade::TABLE,
    )
    .await
    {
        errors.push(format_args!("{e:#}"));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("teardown incomplete: {errors}")
    }
}
