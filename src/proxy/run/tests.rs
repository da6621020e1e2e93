//! The proxy loop driven through an in-memory [`ServiceTable`] and hand-fed record streams,
//! in paused tokio time (the 30 s verify ticks and backoffs pass instantly and exactly).

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use anyhow::anyhow;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio::time::Instant as TokioInstant;

use super::*;
use crate::kernel::nft_elements::SetOp;
use crate::model::pod::PodRecord;
use crate::model::service::{DEFAULT_AFFINITY_TIMEOUT, SessionAffinity, TrafficPolicy};
use crate::proxy::state::{RemovedBackend, RevivedPort, SyncPlan};
use crate::store::etcd::{Change, KvItem};
use crate::store::keys::pod_key;
use crate::store::keys::service_key;

/// What the loop asked of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Discover,
    /// A full plan: sets flushed, elements added.
    Full {
        flushes: usize,
        adds: usize,
    },
    /// An incremental plan: elements deleted and added.
    Incremental {
        dels: usize,
        adds: usize,
    },
    Verify,
    Cleanup,
}

/// Failures the fake table should produce next.
#[derive(Debug, Default)]
struct Script {
    fail_full: usize,
    fail_incremental: usize,
    needs_rebuild: usize,
    /// What `verify` answers.
    gone: bool,
}

type Log = Arc<Mutex<Vec<(Call, TokioInstant)>>>;

struct FakeTable {
    log: Log,
    script: Arc<Mutex<Script>>,
    table: Option<&'static str>,
}

impl FakeTable {
    fn record(&self, c: Call) {
        self.log.lock().unwrap().push((c, TokioInstant::now()));
    }
}

fn count(plan: &SyncPlan) -> (usize, usize, usize) {
    let (mut flushes, mut dels, mut adds) = (0, 0, 0);
    for (_, op) in &plan.ops {
        match op {
            SetOp::Flush => flushes += 1,
            SetOp::Delete(v) => dels += v.len(),
            SetOp::Add(v) => adds += v.len(),
        }
    }
    (flushes, dels, adds)
}

impl ServiceTable for FakeTable {
    async fn discover(&mut self) -> Result<()> {
        self.record(Call::Discover);
        Ok(())
    }

    async fn apply_full(&mut self, plan: &SyncPlan) -> Result<()> {
        {
            let mut s = self.script.lock().unwrap();
            if s.fail_full > 0 {
                s.fail_full -= 1;
                anyhow::bail!("the kernel refused the full batch");
            }
            s.gone = false;
        }
        let (flushes, _, adds) = count(plan);
        self.record(Call::Full { flushes, adds });
        self.table = Some("tartan_svc");
        Ok(())
    }

    async fn apply_incremental(&mut self, plan: &SyncPlan) -> Result<(), ApplyError> {
        {
            let mut s = self.script.lock().unwrap();
            if s.needs_rebuild > 0 {
                s.needs_rebuild -= 1;
                return Err(ApplyError::NeedsRebuild);
            }
            if s.fail_incremental > 0 {
                s.fail_incremental -= 1;
                return Err(anyhow!("the kernel refused the batch").into());
            }
        }
        let (_, dels, adds) = count(plan);
        self.record(Call::Incremental { dels, adds });
        Ok(())
    }

    async fn verify(&self) -> bool {
        self.record(Call::Verify);
        !self.script.lock().unwrap().gone
    }

    fn table(&self) -> Option<&'static str> {
        self.table
    }

    fn chain_count(&self) -> usize {
        0
    }

    fn cleanup(&self, _: Vec<RemovedBackend>, _: Vec<RevivedPort>) {
        self.record(Call::Cleanup);
    }
}

/// A running loop with its inputs and what it did.
struct Harness {
    services: UnboundedSender<ReflectorEvent>,
    pods: UnboundedSender<ReflectorEvent>,
    endpoints: UnboundedSender<ReflectorEvent>,
    status: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<ProxyStatus>>,
    log: Log,
    script: Arc<Mutex<Script>>,
    task: tokio::task::JoinHandle<Result<()>>,
    keys: EtcdArgs,
}

fn start() -> Harness {
    let (services, s_rx) = unbounded_channel();
    let (pods, p_rx) = unbounded_channel();
    let (endpoints, e_rx) = unbounded_channel();
    let (status, status_rx) = tokio::sync::mpsc::channel(4);
    let log: Log = Arc::default();
    let script: Arc<Mutex<Script>> = Arc::default();
    let table = FakeTable {
        log: log.clone(),
        script: script.clone(),
        table: None,
    };
    let keys = EtcdArgs::for_endpoints(&["http://127.0.0.1:2379"]);
    let ctx = NodeContext {
        node: "n1".into(),
        family: crate::proxy::rules::Family::V4,
        cluster_network: "10.244.0.0/16".parse().unwrap(),
        service_cidr: "10.96.0.0/12".parse().unwrap(),
        balancing: Default::default(),
    };
    let k = keys.clone();
    let task = tokio::spawn(async move {
        let feeds = Feeds {
            services: s_rx,
            pods: p_rx,
            endpoints: e_rx,
        };
        let metrics = Metrics::new();
        sync_loop(
            feeds,
            table,
            ServiceState::new(ctx),
            &k,
            &metrics,
            status_rx,
        )
        .await
    });
    Harness {
        services,
        pods,
        endpoints,
        status,
        log,
        script,
        task,
        keys,
    }
}

fn item(key: String, value: Vec<u8>) -> KvItem {
    KvItem {
        key,
        value,
        lease: 0,
        mod_revision: 1,
    }
}

fn web() -> Service {
    Service {
        namespace: "default".into(),
        name: "web".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 100),
        ports: vec!["80:8080/tcp".parse().unwrap()],
        selector: Some([("app".to_string(), "web".to_string())].into()),
        session_affinity: SessionAffinity::None,
        session_affinity_timeout: DEFAULT_AFFINITY_TIMEOUT,
        external_traffic_policy: TrafficPolicy::Cluster,
        cluster_ips: Vec::new(),
        ip_families: Vec::new(),
        ip_family_policy: Default::default(),
    }
}

fn web_pod(n: u8) -> PodRecord {
    PodRecord {
        ip6: None,
        container_id: format!("c{n}"),
        ifname: "eth0".into(),
        node: "n2".into(),
        ip: Ipv4Addr::new(10, 244, 2, n),
        namespace: "default".into(),
        name: format!("web{n}"),
        labels: [("app".to_string(), "web".to_string())].into(),
    }
}

impl Harness {
    fn list(&self, tx: &UnboundedSender<ReflectorEvent>, items: Vec<KvItem>) {
        tx.send(ReflectorEvent::Reset { revision: 1, items })
            .unwrap();
    }

    fn list_all(&self) {
        let s = web();
        self.list(
            &self.services,
            vec![item(
                service_key(&self.keys, &s.namespace, &s.name),
                s.to_bytes(),
            )],
        );
        let p = web_pod(2);
        self.list(
            &self.pods,
            vec![item(pod_key(&self.keys, &p), p.to_bytes())],
        );
        self.list(&self.endpoints, Vec::new());
    }

    fn put_pod(&self, p: &PodRecord) {
        self.pods
            .send(ReflectorEvent::Changes {
                revision: 2,
                changes: vec![Change::Put(item(pod_key(&self.keys, p), p.to_bytes()))],
            })
            .unwrap();
    }

    fn calls(&self) -> Vec<Call> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|(c, _)| c.clone())
            .collect()
    }

    fn applies(&self) -> Vec<(Call, TokioInstant)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(c, _)| matches!(c, Call::Full { .. } | Call::Incremental { .. }))
            .cloned()
            .collect()
    }

    /// Lets the loop run until it waits again (paused time: nothing else advances it).
    async fn settle(&self) {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    async fn status(&self) -> ProxyStatus {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.status.send(tx).await.unwrap();
        rx.await.unwrap()
    }
}

#[tokio::test(start_paused = true)]
async fn nothing_is_applied_before_every_feed_was_listed() {
    let h = start();
    let s = web();
    h.list(
        &h.services,
        vec![item(service_key(&h.keys, "default", "web"), s.to_bytes())],
    );
    h.list(&h.pods, Vec::new());
    h.settle().await;
    // Two of three listed, and a verify tick later: still nothing touched the table.
    tokio::time::sleep(VERIFY_EVERY * 2).await;
    h.settle().await;
    assert!(h.calls().is_empty(), "{:?}", h.calls());
    assert!(!h.status().await.synced);
    h.list(&h.endpoints, Vec::new());
    h.settle().await;
    assert_eq!(
        h.calls(),
        [
            Call::Discover,
            Call::Full {
                flushes: crate::proxy::rules::SetName::ALL.len(),
                adds: 1
            }
        ],
        "one full sync: the service's no-endpoints element"
    );
    assert!(h.status().await.synced);
}

#[tokio::test(start_paused = true)]
async fn silent_or_closed_feeds_never_remove_anything() {
    let h = start();
    h.list_all();
    h.settle().await;
    let before = h.calls();
    let acting: Vec<&Call> = before.iter().filter(|c| **c != Call::Verify).collect();
    assert!(
        matches!(acting.as_slice(), [Call::Discover, Call::Full { .. }]),
        "{before:?}"
    );
    // etcd unreachable: the reflectors send nothing for ten minutes. The loop only verifies.
    tokio::time::sleep(Duration::from_secs(600)).await;
    h.settle().await;
    let after = h.calls();
    assert!(
        after[before.len()..].iter().all(|c| *c == Call::Verify),
        "{after:?}"
    );
    assert!(
        after.len() >= before.len() + 19,
        "verified every 30 s: {after:?}"
    );
    // The feeds closing (the store gone) ends the loop without touching the table.
    drop(h.services);
    h.task.await.unwrap().unwrap();
    assert!(
        h.log.lock().unwrap()[before.len()..]
            .iter()
            .all(|(c, _)| *c == Call::Verify)
    );
}

#[tokio::test(start_paused = true)]
async fn a_table_gone_from_the_kernel_is_rebuilt_at_the_next_check() {
    let h = start();
    h.list_all();
    h.settle().await;
    assert_eq!(h.applies().len(), 1);
    h.script.lock().unwrap().gone = true;
    tokio::time::sleep(VERIFY_EVERY + Duration::from_secs(1)).await;
    h.settle().await;
    let a = h.applies();
    assert_eq!(a.len(), 2, "{:?}", h.calls());
    assert!(
        matches!(a[1].0, Call::Full { .. }),
        "a full sync, not a patch"
    );
    // And not again once it is back.
    tokio::time::sleep(VERIFY_EVERY * 3).await;
    h.settle().await;
    assert_eq!(h.applies().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_batch_is_retried_as_a_full_sync_after_the_backoff() {
    let h = start();
    h.list_all();
    h.settle().await;
    h.script.lock().unwrap().fail_incremental = 1;
    h.script.lock().unwrap().fail_full = 1;
    let t0 = TokioInstant::now();
    h.put_pod(&web_pod(3));
    h.settle().await;
    // The incremental batch failed; the first full retry fails too; the second lands.
    tokio::time::sleep(Duration::from_secs(5)).await;
    h.settle().await;
    let a = h.applies();
    assert_eq!(a.len(), 2, "{:?}", h.calls());
    let (call, at) = &a[1];
    assert!(
        matches!(call, Call::Full { adds: 3, .. }),
        "verdict and two slots: {call:?}"
    );
    // Two failures, two backoff waits of at least half the first step (100 ms) each.
    assert!(*at - t0 >= BACKOFF_MIN, "retried after {:?}", *at - t0);
    let st = h.status().await;
    assert!(st.synced && st.last_error.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_table_of_another_structure_is_rebuilt_at_once_without_backoff() {
    let h = start();
    h.list_all();
    h.settle().await;
    h.script.lock().unwrap().needs_rebuild = 1;
    let t0 = TokioInstant::now();
    h.put_pod(&web_pod(3));
    h.settle().await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    h.settle().await;
    let a = h.applies();
    assert_eq!(a.len(), 2, "{:?}", h.calls());
    assert!(matches!(a[1].0, Call::Full { .. }));
    assert!(a[1].1 - t0 < BACKOFF_MIN, "no backoff: {:?}", a[1].1 - t0);
    assert_eq!(h.status().await.last_error, None);
}

#[tokio::test(start_paused = true)]
async fn one_pod_change_is_one_small_batch_and_a_leaving_endpoint_is_cleaned_up() {
    let h = start();
    h.list_all();
    h.settle().await;
    h.put_pod(&web_pod(3));
    h.settle().await;
    let a = h.applies();
    assert_eq!(a.len(), 2);
    assert!(matches!(a[1].0, Call::Incremental { .. }), "{:?}", a[1].0);
    // web3 leaves: its slot goes, and conntrack/affinity cleanup is asked for.
    let p = web_pod(3);
    h.pods
        .send(ReflectorEvent::Changes {
            revision: 3,
            changes: vec![Change::Delete(pod_key(&h.keys, &p))],
        })
        .unwrap();
    h.settle().await;
    assert!(h.calls().contains(&Call::Cleanup), "{:?}", h.calls());
    assert_eq!(h.applies().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_small_service_changing_with_a_big_one_goes_first_and_the_big_one_follows_at_once() {
    let h = start();
    let mut big = web();
    big.name = "big".into();
    big.cluster_ip = Ipv4Addr::new(10, 96, 0, 20);
    big.selector = Some([("app".to_string(), "big".to_string())].into());
    let big_pod = |n: u32| PodRecord {
        ip6: None,
        container_id: format!("b{n}"),
        name: format!("big{n}"),
        ip: Ipv4Addr::from(0x0ac8_0000 + n),
        labels: [("app".to_string(), "big".to_string())].into(),
        ..web_pod(0)
    };
    let services = [web(), big]
        .iter()
        .map(|s| item(service_key(&h.keys, &s.namespace, &s.name), s.to_bytes()))
        .collect();
    h.list(&h.services, services);
    let pods = (0..600)
        .map(big_pod)
        .chain([web_pod(2)])
        .map(|p| item(pod_key(&h.keys, &p), p.to_bytes()))
        .collect();
    h.list(&h.pods, pods);
    h.list(&h.endpoints, Vec::new());
    h.settle().await;
    assert_eq!(h.applies().len(), 1, "{:?}", h.calls());
    // One event changes both: a big pod and the small service's second endpoint.
    let changes = [big_pod(600), web_pod(3)]
        .iter()
        .map(|p| Change::Put(item(pod_key(&h.keys, p), p.to_bytes())))
        .collect();
    h.pods
        .send(ReflectorEvent::Changes {
            revision: 2,
            changes,
        })
        .unwrap();
    h.settle().await;
    let a = h.applies();
    assert_eq!(a.len(), 3, "two batches for one event: {:?}", h.calls());
    let (Call::Incremental { adds: small, .. }, Call::Incremental { adds: large, .. }) =
        (&a[1].0, &a[2].0)
    else {
        panic!("{a:?}");
    };
    assert!(
        small < large,
        "the small service's batch first: {small} then {large}"
    );
    assert_eq!(a[1].1, a[2].1, "the big one follows without waiting");
}
