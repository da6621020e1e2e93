//! The service proxy task of `tartand`: mirrors services, pods and explicit endpoints from
//! etcd, keeps [`ServiceState`] up to date, and applies its plans to the kernel: structure with
//! `nft -f`, elements in one netlink transaction per sync. Never acts before every prefix was
//! listed, so an unreachable etcd leaves every rule in place.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{debug, error, info, warn};

use crate::metrics::Metrics;
use crate::model::service::{AddressGuard, Service};
use crate::proxy::rules::NodeContext;
use crate::proxy::state::{ServiceState, SyncPlan};
use crate::proxy::table::{ApplyError, NftTable, ServiceTable};
use crate::store::etcd::{Change, EtcdArgs, KvItem, ReflectorEvent};
pub use crate::store::records::Feeds;
use crate::store::records::{RecordKind, decode, deletion, gone_after_listing};
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
    /// The IPv6 table's status (`ip6 tartan_svc`), on a node with an IPv6 service range.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Box<ProxyStatus>>,
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
    /// Its backends as programmed.
    pub backends: Vec<BackendStatus>,
    /// What of the service was not programmed, and why.
    pub problems: Vec<String>,
}

/// One backend as programmed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendStatus {
    /// The endpoint's address.
    pub ip: std::net::IpAddr,
    /// The node it runs on, when known.
    pub node: Option<String>,
}

struct Source {
    kind: RecordKind,
    rx: UnboundedReceiver<ReflectorEvent>,
    listed: bool,
}

/// Where status requests for the service proxy come from.
pub type StatusRequests = tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<ProxyStatus>>;

/// Runs the service proxy forever, programming only what `guard` admits: the `ip` table for
/// `ctx`, and with `ctx6` (a node with an IPv6 service range) the `ip6` table of the IPv6
/// cluster IPs beside it, each with its own loop over the same records. The metrics are the
/// IPv4 table's; the status holds both.
pub async fn run(
    feeds: Feeds,
    keys: EtcdArgs,
    ctx: NodeContext,
    ctx6: Option<NodeContext>,
    guard: AddressGuard,
    metrics: Arc<Metrics>,
    status_requests: StatusRequests,
) -> Result<()> {
    // Hold the refusal port (bound, never listening) so no other process can take it: new
    // connections no service takes are redirected there and must find nothing.
    let _refuse_port = reserve_refuse_port(false);
    let table = NftTable::open(ctx.clone())?;
    let state = ServiceState::with_guard(ctx, guard.clone());
    let Some(ctx6) = ctx6 else {
        return sync_loop(feeds, table, state, &keys, &metrics, status_requests).await;
    };
    let _refuse_port6 = reserve_refuse_port(true);
    let (feeds4, feeds6) = feeds.tee();
    let table6 = NftTable::open(ctx6.clone())?;
    let state6 = ServiceState::with_guard(ctx6, guard);
    let (tx4, rx4) = tokio::sync::mpsc::channel(4);
    let (tx6, rx6) = tokio::sync::mpsc::channel(4);
    // The IPv6 loop's counters are its own (not exported: the gauges are the IPv4 table's).
    let metrics6 = Metrics::new();
    let keys6 = keys.clone();
    let v6 =
        tokio::spawn(
            async move { sync_loop(feeds6, table6, state6, &keys6, &metrics6, rx6).await },
        );
    tokio::spawn(merge_status(status_requests, tx4, tx6));
    let r = sync_loop(feeds4, table, state, &keys, &metrics, rx4).await;
    v6.abort();
    r
}

/// Answers each status request with the IPv4 loop's status holding the IPv6 loop's.
async fn merge_status(
    mut requests: StatusRequests,
    v4: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<ProxyStatus>>,
    v6: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<ProxyStatus>>,
) {
    let ask = |tx: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<ProxyStatus>>| async move {
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send(reply).await.ok()?;
        answer.await.ok()
    };
    while let Some(reply) = requests.recv().await {
        let (a, b) = tokio::join!(ask(v4.clone()), ask(v6.clone()));
        let Some(mut st) = a else {
            return;
        };
        st.ipv6 = b.map(Box::new);
        let _ = reply.send(st);
    }
}

/// How long the loop waits between checks that the table is still there, and how it backs
/// off after a failed sync.
const VERIFY_EVERY: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The proxy loop: absorbs record changes into `state`, and once every feed was listed,
/// programs `table` (a full sync first and after any failure, incremental plans otherwise);
/// checks the table every [`VERIFY_EVERY`] and rebuilds it when it is gone or changed. Returns
/// when the feeds close; never removes rules because records stop coming.
pub async fn sync_loop<T: ServiceTable>(
    feeds: Feeds,
    mut applier: T,
    mut state: ServiceState,
    keys: &EtcdArgs,
    metrics: &Metrics,
    mut status_requests: StatusRequests,
) -> Result<()> {
    let mut sources = vec![
        Source {
            kind: RecordKind::Services,
            rx: feeds.services,
            listed: false,
        },
        Source {
            kind: RecordKind::Pods,
            rx: feeds.pods,
            listed: false,
        },
        Source {
            kind: RecordKind::Endpoints,
            rx: feeds.endpoints,
            listed: false,
        },
    ];
    let mut rejected = std::collections::BTreeMap::new();
    let mut need_full = true;
    // Set when a plan left big services for a second batch: the loop comes back at once.
    let mut deferred_since: Option<Instant> = None;
    let mut synced = false;
    let mut last_error: Option<String> = None;
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let mut verify = tokio::time::interval(VERIFY_EVERY);
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
                    absorb(&mut sources[i], ev, &mut state, keys, metrics, &mut rejected);
                }
                _ = verify.tick() => {
                    first_event_at = Instant::now();
                    if sources.iter().all(|s| s.listed) && !need_full && !applier.verify().await {
                        warn!("service table missing or changed; rebuilding it");
                        need_full = true;
                    }
                }
            }
        }
        // Coalesce whatever else is already queued.
        for src in sources.iter_mut() {
            while let Ok(ev) = src.rx.try_recv() {
                absorb(src, ev, &mut state, keys, metrics, &mut rejected);
            }
        }
        if !sources.iter().all(|s| s.listed) {
            continue;
        }
        let result = if need_full {
            sync_full(&mut applier, &mut state, metrics).await
        } else {
            sync_incremental(&mut applier, &mut state, metrics, deferred.is_none()).await
        };
        match result {
            Ok(plan) => {
                if !plan.is_empty() {
                    metrics
                        .service_programming_seconds
                        .observe(first_event_at.elapsed().as_secs_f64());
                }
                need_full = false;
                // Only a deferral brings the loop straight back (not services left dirty by
                // contention, which wait for the next event as before).
                if plan.deferred {
                    deferred_since = Some(first_event_at);
                }
                backoff.reset();
                metrics.services.set(state.service_count() as i64);
                metrics.service_elements.set(state.element_count() as i64);
                metrics.service_chains.set(applier.chain_count() as i64);
                metrics.service_skipped.set(state.problem_count() as i64);
                metrics.service_records_rejected.set(rejected.len() as i64);
                if !plan.removed.is_empty() || !plan.revived.is_empty() {
                    applier.cleanup(plan.removed, plan.revived);
                }
                synced = true;
                last_error = None;
            }
            Err(ApplyError::NeedsRebuild) => {
                info!("{}; rebuilding the service table", ApplyError::NeedsRebuild);
                need_full = true;
                verify.reset_immediately();
            }
            Err(ApplyError::Failed(e)) => {
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

/// A full sync: plans the whole table and applies it (in place or by a rebuild).
async fn sync_full<T: ServiceTable>(
    applier: &mut T,
    state: &mut ServiceState,
    metrics: &Metrics,
) -> Result<SyncPlan, ApplyError> {
    let t0 = Instant::now();
    let plan = state.plan_full();
    debug!(
        plan_ms = t0.elapsed().as_millis() as u64,
        "full plan computed"
    );
    for w in &plan.warnings {
        warn!("{w}");
    }
    let r: Result<(), ApplyError> = async {
        applier.discover().await?;
        applier.apply_full(&plan).await?;
        Ok(())
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
}

/// An incremental sync of what changed; with `small_first`, big services that changed with
/// others wait for the next call (big services wait for at most one small batch, so they are
/// never starved by a stream of small changes).
async fn sync_incremental<T: ServiceTable>(
    applier: &mut T,
    state: &mut ServiceState,
    metrics: &Metrics,
    small_first: bool,
) -> Result<SyncPlan, ApplyError> {
    let t0 = Instant::now();
    let plan = if small_first {
        state.plan_small_first()
    } else {
        state.plan()
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
}

fn build_status<T: ServiceTable>(
    state: &ServiceState,
    applier: &T,
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
        ipv6: None,
        services: state
            .services_with_backends()
            .into_iter()
            .map(|(svc, b)| ServiceStatus {
                id: svc.id(),
                service: svc.clone(),
                backends: b
                    .iter()
                    .map(|b| BackendStatus {
                        ip: b.ip,
                        node: b.node.as_deref().map(str::to_string),
                    })
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
            let prefix = src.kind.prefix(keys);
            rejected.retain(|k, _| !k.starts_with(&prefix));
            // A (re)listing replaces this kind of record: whatever the model holds that the
            // listing lacks was deleted meanwhile.
            let gone = gone_after_listing(src.kind, &items, state.keys(), keys);
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
            rejected.insert(it.key.clone(), e.to_string());
        }
    }
}

fn reserve_refuse_port(ipv6: bool) -> Option<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let port = crate::proxy::rules::REFUSE_PORT;
    let (addr, domain): (std::net::SocketAddr, Domain) = if ipv6 {
        ((std::net::Ipv6Addr::UNSPECIFIED, port).into(), Domain::IPV6)
    } else {
        (([0, 0, 0, 0], port).into(), Domain::IPV4)
    };
    let s = Socket::new(domain, Type::STREAM, None).ok()?;
    if ipv6 {
        s.set_only_v6(true).ok()?;
    }
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

#[cfg(test)]
mod tests;
