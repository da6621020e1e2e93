//! The service proxy task of `tartand`: mirrors services, pods and explicit endpoints from
//! etcd, keeps [`ServiceState`] up to date, and applies its plans to the kernel: structure with
//! `nft -f`, elements in one netlink transaction per sync. Never acts before every prefix was
//! listed, so an unreachable etcd leaves every rule in place.

use crate::store::keys::{endpoints_prefix, pods_prefix, service_key, services_prefix};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{debug, error, info, warn};

use crate::kernel::nft_elements::{KeyBuilder, NFPROTO_IPV4, NftSocket, SetOp};
use crate::metrics::Metrics;
use crate::model::pod::PodRecord;
use crate::model::service::{AddressGuard, ExplicitEndpoints, Protocol, Service};
use crate::proxy::rules::{
    ACTIVE_MARKER_CHAIN, DynChain, FAMILY, NodeContext, Structure, TABLES, activate_script,
    add_recorder_script, build_script, delete_chain_script, marker_chain, other_table,
};
use crate::proxy::state::{ModelChange, RemovedBackend, RevivedPort, ServiceState, SyncPlan};
use crate::store::etcd::{Change, EtcdArgs, KvItem, ReflectorEvent, Store};
use crate::util::backoff::Backoff;

/// What `tartanctl explain` can ask the daemon about services.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ProxyStatus {
    /// Whether the table was synced since start.
    pub synced: bool,
    /// Services and their backends as programmed.
    pub services: Vec<ServiceStatus>,
    /// Elements in the service table.
    pub elements: usize,
    /// Load-balancing chains in the service table.
    pub chains: usize,
    /// Last sync error, if the last sync failed.
    pub last_error: Option<String>,
    /// The service table in force.
    pub table: Option<String>,
    /// Records skipped because they are malformed (`key: reason`), at most
    /// [`MAX_REJECTED_SHOWN`]; `rejected_total` counts them all.
    pub rejected: Vec<String>,
    /// Number of malformed records skipped.
    pub rejected_total: usize,
}

/// Malformed records listed in the status (the rest are counted).
pub const MAX_REJECTED_SHOWN: usize = 50;

/// One service as programmed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServiceStatus {
    /// `namespace/name`.
    pub id: String,
    /// The service record.
    pub service: Service,
    /// Backend addresses with their node.
    pub backends: Vec<(std::net::Ipv4Addr, Option<String>)>,
    /// What of the service was not programmed, and why.
    pub problems: Vec<String>,
}

fn decode(prefix_kind: Kind, item: &KvItem, keys: &EtcdArgs) -> Result<ModelChange, String> {
    match prefix_kind {
        Kind::Services => {
            let s = Service::parse(&item.value)?;
            let want = service_key(keys, &s.namespace, &s.name);
            if want != item.key {
                return Err(format!("service {} is stored under the wrong key", s.id()));
            }
            Ok(ModelChange::PutService(item.key.clone(), s))
        }
        Kind::Pods => Ok(ModelChange::PutPod(
            item.key.clone(),
            PodRecord::parse(&item.value)?,
        )),
        Kind::Endpoints => {
            let id = item
                .key
                .strip_prefix(&endpoints_prefix(keys))
                .filter(|r| r.split('/').count() == 2)
                .ok_or_else(|| "endpoints key is not <namespace>/<name>".to_string())?
                .to_string();
            Ok(ModelChange::PutEndpoints(
                id,
                ExplicitEndpoints::parse(&item.value)?,
            ))
        }
    }
}

fn deletion(kind: Kind, key: &str, keys: &EtcdArgs) -> Option<ModelChange> {
    match kind {
        Kind::Services => Some(ModelChange::DeleteService(key.to_string())),
        Kind::Pods => Some(ModelChange::DeletePod(key.to_string())),
        Kind::Endpoints => key
            .strip_prefix(&endpoints_prefix(keys))
            .map(|id| ModelChange::DeleteEndpoints(id.to_string())),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Services,
    Pods,
    Endpoints,
}

struct Source {
    kind: Kind,
    rx: UnboundedReceiver<ReflectorEvent>,
    listed: bool,
}

/// Applies plans to the kernel.
struct Applier {
    nft: NftSocket,
    ctx: NodeContext,
    /// The table in force and its structure.
    active: Option<(&'static str, Structure)>,
}

/// Why an incremental sync could not be applied as such.
#[derive(Debug)]
struct NeedsRebuild;

impl std::fmt::Display for NeedsRebuild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the table lacks a load-balancing chain the plan needs")
    }
}

impl std::error::Error for NeedsRebuild {}

impl Applier {
    /// Finds the table in force (ours, current structure, hooked) and removes any other
    /// table of ours (left by an interrupted rebuild or an older structure).
    async fn discover(&mut self) -> Result<()> {
        self.active = None;
        let marker = marker_chain(&self.ctx);
        let mut stale = Vec::new();
        for t in TABLES {
            let chains = crate::kernel::nft_cmd::list_chains(FAMILY, t).await?;
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
            crate::kernel::nft_cmd::delete_table(FAMILY, t).await?;
        }
        Ok(())
    }

    /// The table in force.
    fn table(&self) -> Option<&'static str> {
        self.active.as_ref().map(|(t, _)| *t)
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
    /// [`NeedsRebuild`] if a load-balancing chain is missing (the family is fixed, so only a
    /// table of another structure can lack one).
    async fn add_chains(&mut self, needed: &BTreeSet<DynChain>) -> Result<&'static str> {
        let Some((t, st)) = &mut self.active else {
            return Err(NeedsRebuild.into());
        };
        for c in st.missing(needed) {
            let DynChain::AffinityRecord { timeout } = c else {
                return Err(NeedsRebuild.into());
            };
            crate::kernel::nft_cmd::apply(&add_recorder_script(t, &c, &self.ctx))
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
            match crate::kernel::nft_cmd::apply(&delete_chain_script(t, &c)).await {
                Ok(()) => {
                    st.timeouts.remove(&timeout);
                }
                Err(e) => warn!(chain = %c.name(), "removing an unused chain: {e:#}"),
            }
        }
    }

    /// Applies a full plan: in place (flush + add, one transaction) when a table of ours is in
    /// force, else by a rebuild.
    async fn apply_full(&mut self, plan: &SyncPlan) -> Result<()> {
        if self.active.is_none() {
            return self.rebuild(plan).await;
        }
        let t = match self.add_chains(&plan.add_chains).await {
            Ok(t) => t,
            Err(e) if e.is::<NeedsRebuild>() => return self.rebuild(plan).await,
            Err(e) => return Err(e),
        };
        self.nft
            .apply(NFPROTO_IPV4, t, &plan.ops)
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
    async fn apply_incremental(&mut self, plan: &SyncPlan) -> Result<()> {
        let t = self.add_chains(&plan.add_chains).await?;
        if !plan.ops.is_empty() {
            self.nft
                .apply(NFPROTO_IPV4, t, &plan.ops)
                .context("applying service elements")?;
        }
        let unused = plan.drop_chains.iter().filter_map(|c| match *c {
            DynChain::AffinityRecord { timeout } => Some(timeout),
            _ => None,
        });
        self.drop_recorders(unused.collect::<Vec<_>>()).await;
        Ok(())
    }

    fn chain_count(&self) -> usize {
        self.active.as_ref().map_or(0, |(_, st)| st.chains().len())
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
    crate::kernel::nft_cmd::apply(&build_script(new, ctx, &st)).await?;
    let t1 = Instant::now();
    let adds: Vec<(String, SetOp)> = plan
        .ops
        .iter()
        .filter(|(_, op)| !matches!(op, SetOp::Flush))
        .cloned()
        .collect();
    if let Err(e) = nft.apply(NFPROTO_IPV4, new, &adds) {
        let _ = crate::kernel::nft_cmd::delete_table(FAMILY, new).await;
        return Err(e.context("loading the new service table"));
    }
    let t2 = Instant::now();
    if let Err(e) = crate::kernel::nft_cmd::apply(&activate_script(new, old)).await {
        let _ = crate::kernel::nft_cmd::delete_table(FAMILY, new).await;
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

/// Clears state that would keep sending clients to backends that left: UDP conntrack entries
/// (so UDP clients move to live endpoints) and client-IP affinity entries.
async fn cleanup_removed(
    removed: Vec<RemovedBackend>,
    revived: Vec<RevivedPort>,
    table: &'static str,
) {
    for r in &revived {
        let mut ports = vec![(Some(r.cluster_ip), r.port)];
        if let Some(np) = r.node_port {
            ports.push((None, np));
        }
        for (ip, port) in ports {
            let mut args = vec!["-D".to_string(), "-p".into(), "udp".into()];
            if let Some(ip) = ip {
                args.extend(["--orig-dst".into(), ip.to_string()]);
            }
            args.extend(["--orig-port-dst".into(), port.to_string()]);
            run_conntrack(&args).await;
        }
    }
    let mut affinity_ips = BTreeSet::new();
    for r in &removed {
        if r.affinity {
            affinity_ips.insert((r.ip, r.target_port));
        }
        if r.protocol != Protocol::Udp {
            continue;
        }
        let mut cmds = vec![vec![
            "-D".to_string(),
            "-p".into(),
            "udp".into(),
            "--orig-dst".into(),
            r.cluster_ip.to_string(),
            "--orig-port-dst".into(),
            r.port.to_string(),
            "--reply-src".into(),
            r.ip.to_string(),
        ]];
        if let Some(np) = r.node_port {
            cmds.push(vec![
                "-D".into(),
                "-p".into(),
                "udp".into(),
                "--orig-port-dst".into(),
                np.to_string(),
                "--reply-src".into(),
                r.ip.to_string(),
            ]);
        }
        for args in cmds {
            run_conntrack(&args).await;
        }
    }
    if !affinity_ips.is_empty()
        && let Err(e) = drop_affinity_entries(&affinity_ips, table).await
    {
        warn!("clearing affinity entries: {e:#}");
    }
}

/// Runs `conntrack ARGS` (a delete finding nothing exits non-zero, which is fine).
async fn run_conntrack(args: &[String]) {
    if let Err(e) = tokio::process::Command::new("conntrack")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
    {
        warn!("running conntrack to clear UDP flows: {e}");
    }
}

/// Deletes client-IP affinity entries pointing at any of `targets`.
async fn drop_affinity_entries(
    targets: &BTreeSet<(std::net::Ipv4Addr, u16)>,
    table: &str,
) -> Result<()> {
    let out = tokio::process::Command::new("nft")
        .args(["-j", "list", "map", FAMILY, table, "affinity"])
        .output()
        .await
        .context("listing the affinity map")?;
    if !out.status.success() {
        bail!(
            "nft list map affinity: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut keys = Vec::new();
    for obj in v["nftables"].as_array().into_iter().flatten() {
        for e in obj["map"]["elem"].as_array().into_iter().flatten() {
            // Each element: [ {"elem": {"val": {"concat": [...]}, ...}} | {"concat": [...]}, {"concat": [ip, port]} ]
            let Some(pair) = e.as_array() else { continue };
            let (Some(k), Some(d)) = (pair.first(), pair.get(1)) else {
                continue;
            };
            let dconcat = d["concat"].as_array();
            let Some(dc) = dconcat else { continue };
            let ip = dc
                .first()
                .and_then(|x| x.as_str())
                .and_then(|s| s.parse().ok());
            let port = dc.get(1).and_then(|x| x.as_u64()).map(|p| p as u16);
            let (Some(ip), Some(port)) = (ip, port) else {
                continue;
            };
            if !targets.contains(&(ip, port)) {
                continue;
            }
            let kc = k["elem"]["val"]["concat"]
                .as_array()
                .or_else(|| k["concat"].as_array());
            let Some(kc) = kc else { continue };
            let parts: Vec<&serde_json::Value> = kc.iter().collect();
            if parts.len() != 4 {
                continue;
            }
            let saddr = parts[0].as_str().and_then(|s| s.parse().ok());
            let daddr = parts[1].as_str().and_then(|s| s.parse().ok());
            let proto = match parts[2].as_str() {
                Some("tcp") => Some(6),
                Some("udp") => Some(17),
                _ => None,
            };
            let dport = parts[3].as_u64().map(|p| p as u16);
            if let (Some(s), Some(d), Some(pr), Some(dp)) = (saddr, daddr, proto, dport) {
                keys.push(KeyBuilder::new().ipv4(s).ipv4(d).proto(pr).port(dp).build());
            }
        }
    }
    if keys.is_empty() {
        return Ok(());
    }
    let n = keys.len();
    let mut s = NftSocket::open()?;
    // Entries may expire meanwhile; delete one by one so a vanished entry fails alone.
    let mut failed = 0;
    for k in keys {
        if s.apply(
            NFPROTO_IPV4,
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
}

/// Runs the service proxy forever, programming only what `guard` admits.
pub async fn run(
    store: Store,
    keys: EtcdArgs,
    ctx: NodeContext,
    guard: AddressGuard,
    metrics: Arc<Metrics>,
    mut status_requests: tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<ProxyStatus>>,
) -> Result<()> {
    let mut sources = vec![
        Source {
            kind: Kind::Services,
            rx: store.reflect(&services_prefix(&keys)),
            listed: false,
        },
        Source {
            kind: Kind::Pods,
            rx: store.reflect(&pods_prefix(&keys)),
            listed: false,
        },
        Source {
            kind: Kind::Endpoints,
            rx: store.reflect(&endpoints_prefix(&keys)),
            listed: false,
        },
    ];
    // Hold the refusal port (bound, never listening) so no other process can take it: new
    // connections no service takes are redirected there and must find nothing.
    let _refuse_port = reserve_refuse_port();
    let mut state = ServiceState::with_guard(ctx.clone(), guard);
    let mut rejected = std::collections::BTreeMap::new();
    let mut applier = Applier {
        nft: NftSocket::open()?,
        ctx: ctx.clone(),
        active: None,
    };
    let mut need_full = true;
    // Set when a plan left big services for a second batch: the loop comes back at once.
    let mut deferred_since: Option<Instant> = None;
    let mut synced = false;
    let mut last_error: Option<String> = None;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut verify = tokio::time::interval(Duration::from_secs(30));
    verify.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Wait for something to do, unless big services were left for after the others.
        let first_event_at;
        let deferred = deferred_since.take();
        if let Some(since) = deferred {
            first_event_at = since;
        } else {
            tokio::select! {
                Some(reply) = status_requests.recv() => {
                    let _ = reply.send(build_status(&state, &applier, synced, last_error.clone(), &rejected));
                    continue;
                }
                got = next_event(&mut sources) => {
                    let Some((i, ev)) = got else { return Ok(()) };
                    first_event_at = Instant::now();
                    absorb(&mut sources[i], ev, &mut state, &keys, &metrics, &mut rejected);
                }
                _ = verify.tick() => {
                    first_event_at = Instant::now();
                    if sources.iter().all(|s| s.listed) && !need_full {
                        let ok = match applier.table() {
                            None => false,
                            Some(t) => match crate::kernel::nft_cmd::list_chains(FAMILY, t).await {
                                Ok(c) => c.iter().any(|n| *n == marker_chain(&ctx))
                                    && c.iter().any(|n| n == ACTIVE_MARKER_CHAIN),
                                Err(e) => {
                                    warn!("checking the service table: {e:#}");
                                    true
                                }
                            },
                        };
                        if !ok {
                            warn!("service table missing or changed; rebuilding it");
                            need_full = true;
                        }
                    }
                }
            }
        }
        // Coalesce whatever else is already queued.
        for src in sources.iter_mut() {
            while let Ok(ev) = src.rx.try_recv() {
                absorb(src, ev, &mut state, &keys, &metrics, &mut rejected);
            }
        }
        if !sources.iter().all(|s| s.listed) {
            continue;
        }
        let t0 = Instant::now();
        let result = if need_full {
            let plan = state.plan_full();
            debug!(
                plan_ms = t0.elapsed().as_millis() as u64,
                "full plan computed"
            );
            for w in &plan.warnings {
                warn!("{w}");
            }
            let r = async {
                applier.discover().await?;
                applier.apply_full(&plan).await
            }
            .await;
            if r.is_ok() {
                metrics
                    .service_sync_full
                    .observe(t0.elapsed().as_secs_f64());
                info!(
                    services = state.service_count(),
                    elements = state.element_count(),
                    elapsed_ms = t0.elapsed().as_millis() as u64,
                    "service table fully synced"
                );
            }
            r.map(|_| plan)
        } else {
            // Big services wait for at most one small batch (never starved by a stream of
            // small changes).
            let plan = if deferred.is_some() {
                state.plan()
            } else {
                state.plan_small_first()
            };
            let plan_us = t0.elapsed().as_micros() as u64;
            for w in &plan.warnings {
                warn!("{w}");
            }
            if plan.is_empty() {
                Ok(plan)
            } else {
                let r = applier.apply_incremental(&plan).await;
                if r.is_ok() {
                    metrics
                        .service_sync_partial
                        .observe(t0.elapsed().as_secs_f64());
                    debug!(
                        recomputed = plan.recomputed,
                        changes = plan.element_changes,
                        plan_us,
                        elapsed_us = t0.elapsed().as_micros() as u64,
                        "service table updated"
                    );
                }
                r.map(|_| plan)
            }
        };
        match result {
            Ok(plan) => {
                if !plan.is_empty() {
                    metrics
                        .service_programming_seconds
                        .observe(first_event_at.elapsed().as_secs_f64());
                }
                need_full = false;
                if state.has_dirty() {
                    deferred_since = Some(first_event_at);
                }
                backoff.reset();
                metrics.services.set(state.service_count() as i64);
                metrics.service_elements.set(state.element_count() as i64);
                metrics.service_chains.set(applier.chain_count() as i64);
                metrics.service_skipped.set(state.problem_count() as i64);
                metrics.service_records_rejected.set(rejected.len() as i64);
                if (!plan.removed.is_empty() || !plan.revived.is_empty())
                    && let Some(t) = applier.table()
                {
                    tokio::spawn(cleanup_removed(plan.removed, plan.revived, t));
                }
                synced = true;
                last_error = None;
            }
            Err(e) if e.is::<NeedsRebuild>() => {
                info!("{e}; rebuilding the service table");
                need_full = true;
                verify.reset_immediately();
            }
            Err(e) => {
                metrics.service_sync_failures.inc();
                error!("service sync failed, retrying with a full sync: {e:#}");
                last_error = Some(format!("{e:#}"));
                need_full = true;
                backoff.wait().await;
                // Make sure the loop comes back even when no event arrives.
                verify.reset_immediately();
            }
        }
    }
}

fn build_status(
    state: &ServiceState,
    applier: &Applier,
    synced: bool,
    last_error: Option<String>,
    rejected: &std::collections::BTreeMap<String, String>,
) -> ProxyStatus {
    ProxyStatus {
        synced,
        last_error,
        rejected: rejected
            .iter()
            .take(MAX_REJECTED_SHOWN)
            .map(|(k, why)| format!("{k}: {why}"))
            .collect(),
        rejected_total: rejected.len(),
        elements: state.element_count(),
        chains: applier.chain_count(),
        table: applier.table().map(str::to_string),
        services: state
            .services_with_backends()
            .into_iter()
            .map(|(svc, b)| ServiceStatus {
                id: svc.id(),
                service: svc.clone(),
                backends: b
                    .iter()
                    .map(|b| (b.ip, b.node.as_deref().map(str::to_string)))
                    .collect(),
                problems: state.problems(&svc.id()).to_vec(),
            })
            .collect(),
    }
}

async fn next_event(sources: &mut [Source]) -> Option<(usize, ReflectorEvent)> {
    let futs = sources
        .iter_mut()
        .enumerate()
        .map(|(i, s)| Box::pin(async move { s.rx.recv().await.map(|e| (i, e)) }));
    let (r, _, _) = futures::future::select_all(futs).await;
    r
}

fn absorb(
    src: &mut Source,
    ev: ReflectorEvent,
    state: &mut ServiceState,
    keys: &EtcdArgs,
    metrics: &Metrics,
    rejected: &mut std::collections::BTreeMap<String, String>,
) {
    match ev {
        ReflectorEvent::Reset { items, .. } => {
            let prefix = match src.kind {
                Kind::Services => services_prefix(keys),
                Kind::Pods => pods_prefix(keys),
                Kind::Endpoints => endpoints_prefix(keys),
            };
            rejected.retain(|k, _| !k.starts_with(&prefix));
            // A (re)listing replaces this kind of record: whatever the model holds that the
            // listing lacks was deleted meanwhile.
            let (services, pods, endpoints) = state.keys();
            let fresh: std::collections::HashSet<&str> =
                items.iter().map(|i| i.key.as_str()).collect();
            let gone: Vec<ModelChange> = match src.kind {
                Kind::Services => services
                    .into_iter()
                    .filter(|k| !fresh.contains(k.as_str()))
                    .map(ModelChange::DeleteService)
                    .collect(),
                Kind::Pods => pods
                    .into_iter()
                    .filter(|k| !fresh.contains(k.as_str()))
                    .map(ModelChange::DeletePod)
                    .collect(),
                Kind::Endpoints => {
                    let prefix = endpoints_prefix(keys);
                    endpoints
                        .into_iter()
                        .filter(|id| !fresh.contains(format!("{prefix}{id}").as_str()))
                        .map(ModelChange::DeleteEndpoints)
                        .collect()
                }
            };
            for c in gone {
                state.change(c);
            }
            for it in &items {
                put(src, it, state, keys, metrics, rejected);
            }
            src.listed = true;
        }
        ReflectorEvent::Changes { changes, .. } => {
            for c in changes {
                match c {
                    Change::Put(it) => put(src, &it, state, keys, metrics, rejected),
                    Change::Delete(k) => {
                        rejected.remove(&k);
                        if let Some(c) = deletion(src.kind, &k, keys) {
                            state.change(c);
                        }
                    }
                }
            }
        }
    }
}

fn put(
    src: &Source,
    it: &KvItem,
    state: &mut ServiceState,
    keys: &EtcdArgs,
    metrics: &Metrics,
    rejected: &mut std::collections::BTreeMap<String, String>,
) {
    match decode(src.kind, it, keys) {
        Ok(c) => {
            rejected.remove(&it.key);
            state.change(c)
        }
        Err(e) => {
            metrics.malformed_records.inc();
            warn!(key = %it.key, "skipping record: {e}");
            rejected.insert(it.key.clone(), e);
        }
    }
}

fn reserve_refuse_port() -> Option<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let addr: std::net::SocketAddr = ([0, 0, 0, 0], crate::proxy::rules::REFUSE_PORT).into();
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).ok()?;
    match s.bind(&addr.into()) {
        Ok(()) => Some(s),
        Err(e) => {
            warn!(
                port = crate::proxy::rules::REFUSE_PORT,
                "cannot reserve the refusal port ({e}); if something listens on it, it receives connections to services without endpoints"
            );
            None
        }
    }
}

/// Removes the service tables (node leave).
pub async fn teardown() -> Result<()> {
    for t in TABLES {
        crate::kernel::nft_cmd::delete_table(FAMILY, t).await?;
    }
    Ok(())
}
