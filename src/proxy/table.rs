//! The kernel side of the service proxy: the [`ServiceTable`] seam the loop drives, and
//! [`NftTable`], which implements it with `nft -f` for the table's structure and one
//! nf_tables netlink batch per sync for its elements. Tests drive the loop through an
//! in-memory fake instead (`proxy::run` tests).

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Instant;

use anyhow::{Context, Result};
use tracing::{debug, info, warn};

use crate::kernel::conntrack::{ConntrackSocket, CtFilter};
use crate::kernel::nft_cmd;
use crate::kernel::nft_elements::{NftSocket, SetOp};
use crate::model::service::Protocol;
use crate::proxy::rules::{
    ACTIVE_MARKER_CHAIN, DynChain, Family, NodeContext, Structure, TABLES, activate_script,
    add_recorder_script, build_script, delete_chain_script, marker_chain, other_table,
};
use crate::proxy::state::{RemovedBackend, RevivedPort, SyncPlan};

/// Why a plan could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The table in force lacks a load-balancing chain the plan needs (it is of another
    /// structure): a full sync rebuilds it, at once and without backoff.
    #[error("the table lacks a load-balancing chain the plan needs")]
    NeedsRebuild,
    /// The kernel refused or failed: retried with a full sync after a backoff.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// What the service proxy loop asks of the service table. Implemented by [`NftTable`] and,
/// in tests, by an in-memory fake.
pub trait ServiceTable {
    /// Finds the table in force (ours, current structure, hooked) and removes any other
    /// table of ours.
    fn discover(&mut self) -> impl Future<Output = Result<()>> + Send;
    /// Applies a full plan (in place when a table of ours is in force, else by a rebuild).
    fn apply_full(&mut self, plan: &SyncPlan) -> impl Future<Output = Result<()>> + Send;
    /// Applies an incremental plan.
    fn apply_incremental(
        &mut self,
        plan: &SyncPlan,
    ) -> impl Future<Output = Result<(), ApplyError>> + Send;
    /// Whether the table in force is still in the kernel, of this structure and hooked
    /// (the periodic check); `true` when it cannot tell.
    fn verify(&self) -> impl Future<Output = bool> + Send;
    /// The table in force.
    fn table(&self) -> Option<&'static str>;
    /// Load-balancing and recorder chains of the table in force.
    fn chain_count(&self) -> usize;
    /// Clears conntrack and affinity state of backends that left (in the background).
    fn cleanup(&self, removed: Vec<RemovedBackend>, revived: Vec<RevivedPort>);
}

/// The service table in the kernel.
pub struct NftTable {
    nft: NftSocket,
    ctx: NodeContext,
    /// The table in force and its structure.
    active: Option<(&'static str, Structure)>,
}

impl NftTable {
    /// Opens the netlink socket for element batches; nothing is read or changed yet.
    pub fn open(ctx: NodeContext) -> Result<NftTable> {
        Ok(NftTable {
            nft: NftSocket::open()?,
            ctx,
            active: None,
        })
    }
}

impl ServiceTable for NftTable {
    async fn discover(&mut self) -> Result<()> {
        self.discover_tables().await
    }

    async fn apply_full(&mut self, plan: &SyncPlan) -> Result<()> {
        self.apply_full_plan(plan).await
    }

    async fn apply_incremental(&mut self, plan: &SyncPlan) -> Result<(), ApplyError> {
        self.apply_incremental_plan(plan).await
    }

    async fn verify(&self) -> bool {
        let Some(t) = self.table() else {
            return false;
        };
        match nft_cmd::list_chains(self.ctx.family.nft(), t).await {
            Ok(c) => {
                c.iter().any(|n| *n == marker_chain(&self.ctx))
                    && c.iter().any(|n| n == ACTIVE_MARKER_CHAIN)
            }
            Err(e) => {
                warn!("checking the service table: {e:#}");
                true
            }
        }
    }

    fn table(&self) -> Option<&'static str> {
        self.active.as_ref().map(|(t, _)| *t)
    }

    fn chain_count(&self) -> usize {
        self.active.as_ref().map_or(0, |(_, st)| st.chains().len())
    }

    fn cleanup(&self, removed: Vec<RemovedBackend>, revived: Vec<RevivedPort>) {
        if let Some(t) = self.table() {
            tokio::spawn(cleanup_removed(removed, revived, self.ctx.family, t));
        }
    }
}

impl NftTable {
    /// Finds the table in force (ours, current structure, hooked) and removes any other
    /// table of ours (left by an interrupted rebuild or an older structure).
    async fn discover_tables(&mut self) -> Result<()> {
        self.active = None;
        let marker = marker_chain(&self.ctx);
        let mut stale = Vec::new();
        for t in TABLES {
            let chains = nft_cmd::list_chains(self.ctx.family.nft(), t).await?;
            if chains.is_empty() {
                continue;
            }
            let ours = chains.contains(&marker) && chains.iter().any(|c| c == ACTIVE_MARKER_CHAIN);
            if ours && self.active.is_none() {
                let st = Structure::from_chain_names(chains.iter().map(String::as_str));
                self.active = Some((t, st));
            } else {
                stale.push(t);
            }
        }
        for t in stale {
            warn!(table = t, "removing a service table that is not in force");
            nft_cmd::delete_table(self.ctx.family.nft(), t).await?;
        }
        Ok(())
    }

    /// Builds a new table holding `plan` (a full plan) beside the one in force and switches
    /// over in one transaction (at start, or when the table in force is not ours any more).
    async fn rebuild(&mut self, plan: &SyncPlan) -> Result<()> {
        let current = self.table();
        let (new, st) = build_and_switch(&mut self.nft, &self.ctx, plan, current).await?;
        info!(
            table = new,
            recorders = st.timeouts.len(),
            "service table built and switched in"
        );
        self.active = Some((new, st));
        Ok(())
    }

    /// Adds the affinity recorders `needed` lacks to the table in force; fails with
    /// [`ApplyError::NeedsRebuild`] if a load-balancing chain is missing (the family is fixed,
    /// so only a table of another structure can lack one).
    async fn add_chains(
        &mut self,
        needed: &BTreeSet<DynChain>,
    ) -> Result<&'static str, ApplyError> {
        let Some((t, st)) = &mut self.active else {
            return Err(ApplyError::NeedsRebuild);
        };
        for c in st.missing(needed) {
            let DynChain::AffinityRecord { timeout } = c else {
                return Err(ApplyError::NeedsRebuild);
            };
            nft_cmd::apply(&add_recorder_script(t, &c, &self.ctx))
                .await
                .with_context(|| format!("adding chain {}", c.name()))?;
            st.timeouts.insert(timeout);
        }
        Ok(*t)
    }

    /// Removes the affinity recorders of `timeouts` from the table in force (no element
    /// references them any more); a failure only leaves an unused chain behind.
    async fn drop_recorders(&mut self, timeouts: impl IntoIterator<Item = u32>) {
        let Some((t, st)) = &mut self.active else {
            return;
        };
        for timeout in timeouts {
            let c = DynChain::AffinityRecord { timeout };
            match nft_cmd::apply(&delete_chain_script(self.ctx.family, t, &c)).await {
                Ok(()) => {
                    st.timeouts.remove(&timeout);
                }
                Err(e) => warn!(chain = %c.name(), "removing an unused chain: {e:#}"),
            }
        }
    }

    /// Applies a full plan: in place (flush + add, one transaction) when a table of ours is in
    /// force, else by a rebuild.
    async fn apply_full_plan(&mut self, plan: &SyncPlan) -> Result<()> {
        if self.active.is_none() {
            return self.rebuild(plan).await;
        }
        let t = match self.add_chains(&plan.add_chains).await {
            Ok(t) => t,
            Err(ApplyError::NeedsRebuild) => return self.rebuild(plan).await,
            Err(ApplyError::Failed(e)) => return Err(e),
        };
        self.nft
            .apply(self.ctx.family.nfproto(), t, &plan.ops)
            .context("applying service elements")?;
        let needed = Structure::for_chains(&plan.add_chains).timeouts;
        let unused: Vec<u32> = self
            .active
            .as_ref()
            .map(|(_, st)| st.timeouts.difference(&needed).copied().collect())
            .unwrap_or_default();
        self.drop_recorders(unused).await;
        Ok(())
    }

    /// Applies an incremental plan: new recorder chains, the element batch, then the removal
    /// of recorders nothing uses. Never rebuilds the table for an endpoint count.
    async fn apply_incremental_plan(&mut self, plan: &SyncPlan) -> Result<(), ApplyError> {
        let t = self.add_chains(&plan.add_chains).await?;
        if !plan.ops.is_empty() {
            self.nft
                .apply(self.ctx.family.nfproto(), t, &plan.ops)
                .context("applying service elements")?;
        }
        let unused = plan.drop_chains.iter().filter_map(|c| match *c {
            DynChain::AffinityRecord { timeout } => Some(timeout),
            _ => None,
        });
        self.drop_recorders(unused.collect::<Vec<_>>()).await;
        Ok(())
    }
}

/// Builds a service table holding the full plan `plan` beside the one in force (`current`),
/// loads its elements, then hooks it in and drops the old one in a single transaction. Returns
/// the new table and its structure.
pub async fn build_and_switch(
    nft: &mut NftSocket,
    ctx: &NodeContext,
    plan: &SyncPlan,
    current: Option<&'static str>,
) -> Result<(&'static str, Structure)> {
    let st = Structure::for_chains(&plan.add_chains);
    let old = current;
    let new = old.map_or(TABLES[0], other_table);
    let t0 = Instant::now();
    nft_cmd::apply(&build_script(new, ctx, &st)).await?;
    let t1 = Instant::now();
    let adds: Vec<(String, SetOp)> = plan
        .ops
        .iter()
        .filter(|(_, op)| !matches!(op, SetOp::Flush))
        .cloned()
        .collect();
    let family = ctx.family;
    if let Err(e) = nft.apply(family.nfproto(), new, &adds) {
        let _ = nft_cmd::delete_table(family.nft(), new).await;
        return Err(e.context("loading the new service table"));
    }
    let t2 = Instant::now();
    if let Err(e) = nft_cmd::apply(&activate_script(family, new, old)).await {
        let _ = nft_cmd::delete_table(family.nft(), new).await;
        return Err(e.context("switching to the new service table"));
    }
    debug!(
        structure_ms = (t1 - t0).as_millis() as u64,
        elements_ms = (t2 - t1).as_millis() as u64,
        switch_ms = t2.elapsed().as_millis() as u64,
        "service table built"
    );
    Ok((new, st))
}

/// The conntrack entries that would keep UDP clients on a dead path: flows refused while a
/// port had no endpoint (to the cluster IP and port, or to the node port) and flows DNATed to
/// a backend that left (the same, answered by that backend); each of the table's family.
fn stale_udp_flows(removed: &[RemovedBackend], revived: &[RevivedPort]) -> Vec<CtFilter> {
    let mut filters = Vec::new();
    for r in revived {
        filters.push(CtFilter::udp().orig_dst(r.cluster_ip).orig_dst_port(r.port));
        if let Some(np) = r.node_port {
            filters.push(CtFilter::udp_of(r.cluster_ip).orig_dst_port(np));
        }
    }
    for r in removed.iter().filter(|r| r.protocol == Protocol::Udp) {
        let to_backend = CtFilter::udp().reply_src(r.ip);
        filters.push(to_backend.orig_dst(r.cluster_ip).orig_dst_port(r.port));
        if let Some(np) = r.node_port {
            filters.push(to_backend.orig_dst_port(np));
        }
    }
    filters
}

/// Clears state that would keep sending clients to backends that left: UDP conntrack entries
/// (so UDP clients move to live endpoints) and client-IP affinity entries.
async fn cleanup_removed(
    removed: Vec<RemovedBackend>,
    revived: Vec<RevivedPort>,
    family: Family,
    table: &'static str,
) {
    let filters = stale_udp_flows(&removed, &revived);
    if !filters.is_empty() {
        let n = filters.len();
        let r =
            tokio::task::spawn_blocking(move || ConntrackSocket::open()?.delete_matching(&filters))
                .await
                .context("clearing stale UDP conntrack entries");
        match r.and_then(|r| r) {
            Ok(deleted) => debug!(filters = n, deleted, "stale UDP conntrack entries cleared"),
            Err(e) => warn!("clearing stale UDP conntrack entries: {e:#}"),
        }
    }
    let affinity_ips: BTreeSet<_> = removed
        .iter()
        .filter(|r| r.affinity)
        .map(|r| (r.ip, r.target_port))
        .collect();
    if !affinity_ips.is_empty()
        && let Err(e) = drop_affinity_entries(&affinity_ips, family, table).await
    {
        warn!("clearing affinity entries: {e:#}");
    }
}

/// Deletes client-IP affinity entries pointing at any of `targets` (read with one netlink
/// dump of the `affinity` map: key client . service address . proto . port, data endpoint
/// address . port).
async fn drop_affinity_entries(
    targets: &BTreeSet<(std::net::IpAddr, u16)>,
    family: Family,
    table: &'static str,
) -> Result<()> {
    let targets = targets.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let mut s = NftSocket::open()?;
        let entries = s
            .dump_elements(family.nfproto(), table, "affinity")
            .context("listing the affinity map")?;
        let alen = match family {
            Family::V4 => 4,
            Family::V6 => 16,
        };
        let endpoint = |d: &[u8]| -> Option<(std::net::IpAddr, u16)> {
            let ip = d.get(..alen)?;
            let port = d.get(alen..alen + 2)?;
            let ip = match family {
                Family::V4 => std::net::IpAddr::from(<[u8; 4]>::try_from(ip).ok()?),
                Family::V6 => std::net::IpAddr::from(<[u8; 16]>::try_from(ip).ok()?),
            };
            Some((ip, u16::from_be_bytes([port[0], port[1]])))
        };
        let keys: Vec<Vec<u8>> = entries
            .into_iter()
            .filter(|e| {
                e.data
                    .as_deref()
                    .and_then(endpoint)
                    .is_some_and(|t| targets.contains(&t))
            })
            .map(|e| e.key)
            .collect();
        let n = keys.len();
        // Entries may expire meanwhile; delete one by one so a vanished entry fails alone.
        let mut failed = 0;
        for k in keys {
            if s.apply(
                family.nfproto(),
                table,
                &[("affinity".to_string(), SetOp::Delete(vec![k]))],
            )
            .is_err()
            {
                failed += 1;
            }
        }
        debug!(n, failed, "affinity entries cleared");
        Ok(())
    })
    .await
    .context("clearing affinity entries")?
}

/// Removes the service tables of both families (node leave); the IPv6 ones only where the
/// kernel has `ip6` nftables (a failure there is logged, the IPv4 tables are gone either way).
pub async fn teardown() -> Result<()> {
    for t in TABLES {
        nft_cmd::delete_table(Family::V4.nft(), t).await?;
    }
    for t in TABLES {
        if let Err(e) = nft_cmd::delete_table(Family::V6.nft(), t).await {
            warn!(table = t, "removing the IPv6 service table: {e:#}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(protocol: Protocol, node_port: Option<u16>) -> RemovedBackend {
        RemovedBackend {
            cluster_ip: "10.96.0.10".parse().unwrap(),
            port: 53,
            node_port,
            protocol,
            ip: "10.244.1.7".parse().unwrap(),
            target_port: 5353,
            affinity: false,
        }
    }

    #[test]
    fn stale_udp_flows_are_the_conntrack_d_filters() {
        let revived = [RevivedPort {
            cluster_ip: "10.96.0.11".parse().unwrap(),
            port: 53,
            node_port: Some(30053),
        }];
        let removed = [
            backend(Protocol::Udp, Some(30054)),
            backend(Protocol::Tcp, Some(30055)),
        ];
        let got: Vec<String> = stale_udp_flows(&removed, &revived)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            got,
            [
                "-p udp --orig-dst 10.96.0.11 --orig-port-dst 53",
                "-p udp --orig-port-dst 30053",
                "-p udp --orig-dst 10.96.0.10 --orig-port-dst 53 --reply-src 10.244.1.7",
                "-p udp --orig-port-dst 30054 --reply-src 10.244.1.7",
            ]
        );
        assert!(stale_udp_flows(&[backend(Protocol::Tcp, None)], &[]).is_empty());
        // The IPv6 table's: IPv6 filters (the node port one of that family too).
        let revived6 = [RevivedPort {
            cluster_ip: "fd00:96::b".parse().unwrap(),
            port: 53,
            node_port: Some(30053),
        }];
        let removed6 = [RemovedBackend {
            cluster_ip: "fd00:96::a".parse().unwrap(),
            ip: "fd00:10:244:1::7".parse().unwrap(),
            ..backend(Protocol::Udp, None)
        }];
        let got: Vec<String> = stale_udp_flows(&removed6, &revived6)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            got,
            [
                "-f ipv6 -p udp --orig-dst fd00:96::b --orig-port-dst 53",
                "-f ipv6 -p udp --orig-port-dst 30053",
                "-f ipv6 -p udp --orig-dst fd00:96::a --orig-port-dst 53 --reply-src fd00:10:244:1::7",
            ]
        );
    }
}
