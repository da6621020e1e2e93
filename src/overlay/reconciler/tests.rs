//! The reconcile loop driven through an in-memory [`OverlayKernel`], hand-fed lease mirrors
//! and hand-made kernel notifications, in paused tokio time (the 30 s resyncs, the 1 s retry
//! and the 50 ms debounce pass instantly and exactly).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use anyhow::anyhow;
use ipnetwork::{Ipv4Network, Ipv6Network};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::time::Instant as TokioInstant;

use super::*;
use crate::kernel::netlink::Iface;
use crate::model::subnet_lease::LeaseValue;
use crate::overlay::plan::{OverlayDiff, OverlayState, RouteVia};
use crate::store::etcd::KvItem;

const RESYNC: Duration = Duration::from_secs(30);
const UNDERLAY: u32 = 2;
const VX: u32 = 7;
const VX6: u32 = 8;
/// A pod's veth: notifications about it never need a repair.
const POD_VETH: u32 = 40;

/// What the loop asked of the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Iface,
    EnsureVxlan(DeviceChange),
    EnsureAddr,
    Read,
    /// An apply attempt (also a failed one) with its diff.
    Apply(OverlayDiff),
    Read6,
    Apply6(OverlayDiff<V6>),
    Ip6Forward,
    MasqList,
    MasqApply,
    IpForward,
    /// Teardown only: the loop itself never deletes wholesale.
    DeleteLink(String),
    DeleteOwnedRoutes,
    DeleteMasq,
}

/// The fake kernel's state and what it was asked.
#[derive(Debug, Default)]
struct World {
    vxlan: Option<VxlanSpec>,
    vx_addrs: Vec<Ipv4Network>,
    overlay: OverlayState,
    vxlan6: Option<VxlanSpec>,
    vx6_addrs: Vec<Ipv6Network>,
    overlay6: OverlayState<V6>,
    masq: Option<String>,
    /// Apply attempts still to fail.
    fail_apply: usize,
    calls: Vec<(Call, TokioInstant)>,
    /// Interface lists the loop focused the notifications on.
    focused: Vec<Vec<u32>>,
}

type Shared = Arc<Mutex<World>>;

struct FakeKernel(Shared);

impl FakeKernel {
    fn record(&self, c: Call) {
        self.0.lock().unwrap().calls.push((c, TokioInstant::now()));
    }
}

impl OverlayKernel for FakeKernel {
    async fn iface(&self, name: &str) -> Result<Iface> {
        self.record(Call::Iface);
        if name != "eth0" {
            anyhow::bail!("interface {name} does not exist");
        }
        Ok(Iface {
            index: UNDERLAY,
            mtu: 1500,
            mac: None,
            addrs: vec!["192.168.1.1/24".parse().unwrap()],
            addrs6: vec![],
        })
    }

    async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<(u32, DeviceChange)> {
        let v6 = spec.name == device_name6(spec.vni);
        let change = {
            let mut w = self.0.lock().unwrap();
            let dev = if v6 { &mut w.vxlan6 } else { &mut w.vxlan };
            if dev.as_ref() == Some(spec) {
                DeviceChange::Unchanged
            } else {
                *dev = Some(spec.clone());
                DeviceChange::Created
            }
        };
        self.record(Call::EnsureVxlan(change));
        Ok((if v6 { VX6 } else { VX }, change))
    }

    async fn ensure_only_addr6(&self, index: u32, addr: Ipv6Network) -> Result<bool> {
        assert_eq!(index, VX6);
        let mut w = self.0.lock().unwrap();
        let changed = w.vx6_addrs != [addr];
        w.vx6_addrs = vec![addr];
        Ok(changed)
    }

    async fn read_overlay6(&self, vx_index: u32, underlay_index: u32) -> Result<OverlayState<V6>> {
        assert_eq!(underlay_index, UNDERLAY);
        self.record(Call::Read6);
        let w = self.0.lock().unwrap();
        let mut st = w.overlay6.clone();
        if vx_index != VX6 || w.vxlan6.is_none() {
            // Only the direct routes on the underlay are seen without the device.
            st.neighbours.clear();
            st.fdb.clear();
            st.routes.retain(|_, v| matches!(v, RouteVia::Underlay(_)));
        }
        Ok(st)
    }

    async fn apply_overlay6(
        &self,
        _vx_index: u32,
        underlay_index: u32,
        d: &OverlayDiff<V6>,
    ) -> Result<()> {
        assert_eq!(underlay_index, UNDERLAY);
        self.record(Call::Apply6(d.clone()));
        let mut w = self.0.lock().unwrap();
        apply_to(&mut w.overlay6, d);
        Ok(())
    }

    fn ensure_ip6_forward(&self) -> Result<()> {
        self.record(Call::Ip6Forward);
        Ok(())
    }

    async fn ensure_only_addr(&self, index: u32, addr: Ipv4Network) -> Result<bool> {
        assert_eq!(index, VX);
        self.record(Call::EnsureAddr);
        let mut w = self.0.lock().unwrap();
        let changed = w.vx_addrs != [addr];
        w.vx_addrs = vec![addr];
        Ok(changed)
    }

    async fn read_overlay(&self, vx_index: u32, underlay_index: u32) -> Result<OverlayState> {
        assert_eq!((vx_index, underlay_index), (VX, UNDERLAY));
        self.record(Call::Read);
        Ok(self.0.lock().unwrap().overlay.clone())
    }

    async fn apply_overlay(
        &self,
        vx_index: u32,
        underlay_index: u32,
        d: &OverlayDiff,
    ) -> Result<()> {
        assert_eq!((vx_index, underlay_index), (VX, UNDERLAY));
        self.record(Call::Apply(d.clone()));
        let mut w = self.0.lock().unwrap();
        if w.fail_apply > 0 {
            w.fail_apply -= 1;
            return Err(anyhow!(
                "1 overlay operations failed: add route: File exists"
            ));
        }
        apply_to(&mut w.overlay, d);
        Ok(())
    }

    async fn masquerade_listing(&self) -> Result<Option<String>> {
        self.record(Call::MasqList);
        Ok(self.0.lock().unwrap().masq.clone())
    }

    async fn apply_masquerade(&self, script: &str) -> Result<()> {
        self.record(Call::MasqApply);
        self.0.lock().unwrap().masq = Some(script.to_string());
        Ok(())
    }

    fn ensure_ip_forward(&self) -> Result<()> {
        self.record(Call::IpForward);
        Ok(())
    }

    async fn delete_link(&self, name: &str) -> Result<bool> {
        self.record(Call::DeleteLink(name.to_string()));
        let mut w = self.0.lock().unwrap();
        if w.vxlan6.as_ref().is_some_and(|d| d.name == name) {
            w.vxlan6 = None;
            w.vx6_addrs.clear();
            w.overlay6.neighbours.clear();
            w.overlay6.fdb.clear();
            w.overlay6
                .routes
                .retain(|_, v| matches!(v, RouteVia::Underlay(_)));
            return Ok(true);
        }
        if w.vxlan.as_ref().is_none_or(|d| d.name != name) {
            return Ok(false);
        }
        w.vxlan = None;
        w.overlay.neighbours.clear();
        w.overlay.fdb.clear();
        w.overlay
            .routes
            .retain(|_, v| matches!(v, RouteVia::Underlay(_)));
        Ok(true)
    }

    async fn delete_owned_routes(&self, underlay_index: u32) -> Result<()> {
        assert_eq!(underlay_index, UNDERLAY);
        self.record(Call::DeleteOwnedRoutes);
        let mut w = self.0.lock().unwrap();
        w.overlay.routes.clear();
        w.overlay6.routes.clear();
        Ok(())
    }

    async fn delete_masquerade(&self) -> Result<()> {
        self.record(Call::DeleteMasq);
        self.0.lock().unwrap().masq = None;
        Ok(())
    }
}

/// What the kernel does with a diff, for either family.
fn apply_to<F: crate::overlay::plan::Family>(o: &mut OverlayState<F>, d: &OverlayDiff<F>) {
    for (n, _) in &d.del_routes {
        o.routes.remove(n);
    }
    for (ip, _) in &d.del_neighbours {
        o.neighbours.remove(ip);
    }
    for (mac, _) in &d.del_fdb {
        o.fdb.remove(mac);
    }
    o.routes.extend(d.put_routes.iter().copied());
    o.neighbours.extend(d.put_neighbours.iter().copied());
    o.fdb.extend(d.put_fdb.iter().copied());
}

/// Notifications from the test; a closed channel is a quiet source, never an ended one.
struct FakeEvents {
    rx: UnboundedReceiver<KernelChange>,
    world: Shared,
}

impl KernelEvents for FakeEvents {
    async fn next(&mut self) -> Option<KernelChange> {
        match self.rx.recv().await {
            Some(c) => Some(c),
            None => std::future::pending().await,
        }
    }

    fn focus(&mut self, indexes: &[u32]) -> Result<()> {
        self.world.lock().unwrap().focused.push(indexes.to_vec());
        Ok(())
    }

    fn resubscribe(&mut self) -> Result<()> {
        unreachable!("the fake source never ends")
    }
}

fn own_subnet() -> Ipv4Network {
    "10.244.1.0/24".parse().unwrap()
}

fn cfg() -> NetworkConfig {
    NetworkConfig::parse(br#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap()
}

fn mac(n: u8) -> MacAddr {
    MacAddr([2, 0, 0, 0, 0, n])
}

fn own_subnet6() -> Ipv6Network {
    "fd00:10:244:1::/64".parse().unwrap()
}

fn cfg_dual() -> NetworkConfig {
    NetworkConfig::parse(
        br#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#,
    )
    .unwrap()
}

/// Node `n`'s IPv6 VTEP MAC.
fn mac6(n: u8) -> MacAddr {
    MacAddr([2, 0, 0, 0, 6, n])
}

/// Node `n`'s IPv6 underlay address.
fn underlay6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, u16::from(n))
}

/// Node `n`'s dual-stack lease: [`lease`] plus fd00:10:244:n::/64 over fd00:1::n.
fn lease_dual(n: u8) -> KvItem {
    let mut v = LeaseValue::vxlan(
        Ipv4Addr::new(192, 168, 1, n),
        1,
        mac(n),
        &format!("node{n}"),
    );
    v.public_ipv6 = Some(underlay6(n));
    v.backend_v6_data = Some(serde_json::json!({"VNI": 1, "VtepMAC": mac6(n).to_string()}));
    raw(
        &format!("{}&fd00:10:244:{n:x}::-64", subnet_key(n)),
        &v.to_bytes(),
    )
}

/// What the IPv6 device should hold for the dual-stack peers `ns`.
fn programmed6(ns: &[u8]) -> OverlayState<V6> {
    let mut st = OverlayState::<V6>::default();
    for &n in ns {
        let gw = Ipv6Addr::new(0xfd00, 0x10, 0x244, u16::from(n), 0, 0, 0, 0);
        st.routes.insert(
            format!("fd00:10:244:{n:x}::/64").parse().unwrap(),
            RouteVia::Vxlan(gw),
        );
        st.neighbours.insert(gw, mac6(n));
        st.fdb.insert(mac6(n), underlay6(n));
    }
    st
}

fn subnet_key(n: u8) -> String {
    format!("/coreos.com/network/subnets/10.244.{n}.0-24")
}

/// Node `n`'s lease: subnet 10.244.n.0/24, public IP 192.168.1.n, VTEP MAC 02:..:n.
fn lease(n: u8) -> KvItem {
    let v = LeaseValue::vxlan(
        Ipv4Addr::new(192, 168, 1, n),
        1,
        mac(n),
        &format!("node{n}"),
    );
    raw(&subnet_key(n), &v.to_bytes())
}

fn raw(key: &str, value: &[u8]) -> KvItem {
    KvItem {
        key: key.to_string(),
        value: value.to_vec(),
        lease: 1,
        mod_revision: 1,
    }
}

/// What the kernel should hold for peers `ns` (VXLAN routes, no direct routing).
fn programmed(ns: &[u8]) -> OverlayState {
    let mut st = OverlayState::default();
    for &n in ns {
        let gw = Ipv4Addr::new(10, 244, n, 0);
        st.routes.insert(
            format!("10.244.{n}.0/24").parse().unwrap(),
            RouteVia::Vxlan(gw),
        );
        st.neighbours.insert(gw, mac(n));
        st.fdb.insert(mac(n), Ipv4Addr::new(192, 168, 1, n));
    }
    st
}

fn view(listed: bool, revision: i64, items: Vec<KvItem>) -> Arc<PrefixView> {
    Arc::new(PrefixView {
        listed,
        items: items.into_iter().map(|i| (i.key.clone(), i)).collect(),
        revision,
        changed_at: Instant::now(),
    })
}

/// A running loop with its inputs and what it did.
struct Harness {
    own: watch::Sender<Option<OwnLease>>,
    subnets: watch::Sender<Arc<PrefixView>>,
    nodes: watch::Sender<Arc<PrefixView>>,
    events: UnboundedSender<KernelChange>,
    ready: watch::Receiver<Option<SubnetKey>>,
    peers: watch::Receiver<Arc<PeerSet>>,
    world: Shared,
    metrics: Arc<Metrics>,
    task: tokio::task::JoinHandle<Result<()>>,
    revision: i64,
    /// Whether this node's own lease (and [`Harness::list`]'s peers) are dual-stack.
    dual: bool,
}

fn start() -> Harness {
    start_with(false)
}

/// A loop for node 1; `dual`: in a dual-stack network, holding fd00:10:244:1::/64 too, over
/// the IPv6 underlay address fd00:1::1.
fn start_with(dual: bool) -> Harness {
    let own = OwnLease {
        subnet: own_subnet(),
        subnet6: dual.then(own_subnet6),
        etcd_lease: 1,
    };
    let (own_tx, own_rx) = watch::channel(Some(own));
    let (subnets, subnets_rx) = watch::channel(view(false, 0, Vec::new()));
    let (nodes, nodes_rx) = watch::channel(view(false, 0, Vec::new()));
    let (events, events_rx) = unbounded_channel();
    let (ready_tx, ready) = watch::channel(None);
    let (peers_tx, peers) = watch::channel(Arc::default());
    let world: Shared = Arc::default();
    let metrics = Metrics::new();
    let settings = OverlaySettings {
        iface: "eth0".into(),
        public_ip: Ipv4Addr::new(192, 168, 1, 1),
        vtep_mac: mac(1),
        public_ipv6: dual.then(|| underlay6(1)),
        vtep_mac6: mac6(1),
        cfg: if dual { cfg_dual() } else { cfg() },
        ip_masq: true,
        resync: RESYNC,
    };
    let task = tokio::spawn(reconcile_loop(
        settings,
        FakeKernel(world.clone()),
        FakeEvents {
            rx: events_rx,
            world: world.clone(),
        },
        OverlayInputs {
            own: own_rx,
            subnets: subnets_rx,
            nodes: nodes_rx,
        },
        metrics.clone(),
        OverlayOutputs {
            ready: ready_tx,
            peers: peers_tx,
        },
    ));
    Harness {
        own: own_tx,
        subnets,
        nodes,
        events,
        ready,
        peers,
        world,
        metrics,
        task,
        revision: 1,
        dual,
    }
}

impl Harness {
    /// Publishes a complete subnet view: this node's lease and `items`.
    fn subnets(&mut self, items: Vec<KvItem>) {
        self.revision += 1;
        let mut all = vec![if self.dual { lease_dual(1) } else { lease(1) }];
        all.extend(items);
        self.subnets.send_replace(view(true, self.revision, all));
    }

    /// Both mirrors listed, with this node and the peers `ns`.
    fn list(&mut self, ns: &[u8]) {
        let dual = self.dual;
        self.subnets(
            ns.iter()
                .map(|&n| if dual { lease_dual(n) } else { lease(n) })
                .collect(),
        );
        self.nodes.send_replace(view(true, 1, Vec::new()));
    }

    fn calls(&self) -> Vec<Call> {
        let w = self.world.lock().unwrap();
        w.calls.iter().map(|(c, _)| c.clone()).collect()
    }

    /// Apply attempts with their times.
    fn applies(&self) -> Vec<(OverlayDiff, TokioInstant)> {
        let w = self.world.lock().unwrap();
        w.calls
            .iter()
            .filter_map(|(c, at)| match c {
                Call::Apply(d) => Some((d.clone(), *at)),
                _ => None,
            })
            .collect()
    }

    fn reads(&self) -> usize {
        self.calls().iter().filter(|c| **c == Call::Read).count()
    }

    fn kernel(&self) -> OverlayState {
        self.world.lock().unwrap().overlay.clone()
    }

    /// Lets the loop run until it waits again (paused time: nothing else advances it).
    async fn settle(&self) {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn nothing_is_touched_before_both_mirrors_were_listed() {
    let mut h = start();
    h.settle().await;
    // Resyncs come and go, a kernel notification arrives: the mirrors were never listed.
    h.events.send(KernelChange::Removal(None)).unwrap();
    tokio::time::sleep(RESYNC * 3).await;
    h.settle().await;
    assert!(h.calls().is_empty(), "{:?}", h.calls());
    // The subnets alone are not enough (conflicts are resolved with the node records).
    h.subnets(vec![lease(2)]);
    tokio::time::sleep(RESYNC * 2).await;
    h.settle().await;
    assert!(h.calls().is_empty(), "{:?}", h.calls());
    assert_eq!(*h.ready.borrow(), None);
    h.nodes.send_replace(view(true, 1, Vec::new()));
    h.settle().await;
    let calls = h.calls();
    assert_eq!(calls[0], Call::Iface, "{calls:?}");
    assert_eq!(calls[1], Call::EnsureVxlan(DeviceChange::Created));
    assert_eq!(h.applies().len(), 1, "{calls:?}");
    assert_eq!(h.kernel(), programmed(&[2]));
    assert_eq!(h.ready.borrow().map(|k| k.v4), Some(own_subnet()));
    let spec = h.world.lock().unwrap().vxlan.clone().unwrap();
    assert_eq!(
        (spec.name.as_str(), spec.mtu, spec.vni),
        ("tartan.1", 1450, 1)
    );
    assert_eq!(
        h.world.lock().unwrap().vx_addrs,
        ["10.244.1.0/32".parse::<Ipv4Network>().unwrap()]
    );
    assert!(h.calls().contains(&Call::MasqApply));
}

#[tokio::test(start_paused = true)]
async fn quiet_feeds_for_minutes_remove_nothing() {
    let mut h = start();
    h.list(&[2, 3]);
    h.settle().await;
    assert_eq!(h.kernel(), programmed(&[2, 3]));
    let applied = h.applies().len();
    let reads = h.reads();
    let masq = h.world.lock().unwrap().masq.clone();
    // etcd unreachable: the mirrors say nothing for ten minutes. Only resyncs, which find
    // nothing to change.
    tokio::time::sleep(Duration::from_secs(600)).await;
    h.settle().await;
    assert_eq!(h.applies().len(), applied, "{:?}", h.applies());
    assert!(
        h.reads() >= reads + 19,
        "a resync every 30 s: {} reads",
        h.reads()
    );
    assert_eq!(h.kernel(), programmed(&[2, 3]));
    assert_eq!(h.world.lock().unwrap().masq, masq);
    assert!(
        !h.calls().iter().any(|c| matches!(
            c,
            Call::DeleteLink(_) | Call::DeleteOwnedRoutes | Call::DeleteMasq
        )),
        "{:?}",
        h.calls()
    );
    assert_eq!(
        h.calls()
            .iter()
            .filter(|c| matches!(
                c,
                Call::MasqApply | Call::EnsureVxlan(DeviceChange::Created)
            ))
            .count(),
        2,
        "device and masquerade table set up once"
    );
    // A mirror closing (the store gone) ends the loop without touching the kernel.
    let before = h.calls().len();
    drop(h.subnets);
    h.task.await.unwrap().unwrap();
    assert_eq!(h.world.lock().unwrap().calls.len(), before);
    assert_eq!(h.world.lock().unwrap().overlay, programmed(&[2, 3]));
}

#[tokio::test(start_paused = true)]
async fn a_deleted_peer_lease_removes_its_route_neighbour_and_fdb_entry() {
    let mut h = start();
    h.list(&[2, 3]);
    h.settle().await;
    assert_eq!(h.kernel(), programmed(&[2, 3]));
    h.subnets(vec![lease(2)]);
    h.settle().await;
    let a = h.applies();
    assert_eq!(a.len(), 2, "{a:?}");
    let gone = programmed(&[3]);
    assert_eq!(
        a[1].0,
        OverlayDiff {
            del_routes: gone.routes.into_iter().collect(),
            del_neighbours: gone.neighbours.into_iter().collect(),
            del_fdb: gone.fdb.into_iter().collect(),
            ..Default::default()
        }
    );
    assert_eq!(h.kernel(), programmed(&[2]));
}

#[tokio::test(start_paused = true)]
async fn a_route_deleted_behind_our_back_is_repaired_after_the_debounce() {
    let mut h = start();
    h.list(&[2, 3]);
    h.settle().await;
    assert_eq!(
        h.world.lock().unwrap().focused.last(),
        Some(&vec![VX, UNDERLAY]),
        "notifications focused on the device and the underlay"
    );
    let reads = h.reads();
    // Additions and a pod's veth going away need no repair: no pass at all.
    h.events.send(KernelChange::Addition).unwrap();
    h.events
        .send(KernelChange::Removal(Some(POD_VETH)))
        .unwrap();
    h.settle().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.settle().await;
    assert_eq!(h.reads(), reads, "{:?}", h.calls());
    // `ip route del 10.244.3.0/24`: the kernel says a route went (on the device).
    let net: Ipv4Network = "10.244.3.0/24".parse().unwrap();
    h.world.lock().unwrap().overlay.routes.remove(&net);
    let t0 = TokioInstant::now();
    h.events.send(KernelChange::Removal(Some(VX))).unwrap();
    h.events.send(KernelChange::Removal(Some(VX))).unwrap();
    h.settle().await;
    assert_eq!(h.applies().len(), 1, "not before the burst settled");
    tokio::time::sleep(DEBOUNCE * 2).await;
    h.settle().await;
    let a = h.applies();
    assert_eq!(a.len(), 2, "one repair for the burst: {a:?}");
    assert_eq!(
        a[1].0.put_routes,
        [(net, RouteVia::Vxlan(Ipv4Addr::new(10, 244, 3, 0)))]
    );
    assert!(a[1].0.len() == 1, "{:?}", a[1].0);
    let took = a[1].1 - t0;
    assert!(took >= DEBOUNCE && took < RESYNC, "repaired after {took:?}");
    assert_eq!(h.kernel(), programmed(&[2, 3]));
}

#[tokio::test(start_paused = true)]
async fn a_failed_apply_is_retried_every_second_until_it_lands() {
    let mut h = start();
    h.nodes.send_replace(view(true, 1, Vec::new()));
    h.settle().await;
    h.world.lock().unwrap().fail_apply = 2;
    let t0 = TokioInstant::now();
    h.subnets(vec![lease(2)]);
    h.settle().await;
    assert_eq!(h.applies().len(), 1);
    assert_eq!(
        *h.ready.borrow(),
        None,
        "not ready while the peers are not routed"
    );
    tokio::time::sleep(RETRY_AFTER * 3).await;
    h.settle().await;
    let a = h.applies();
    assert_eq!(a.len(), 3, "two failures, then success: {a:?}");
    assert!(
        a.iter().all(|(d, _)| *d == a[0].0),
        "the same diff each time"
    );
    assert_eq!(a[1].1 - t0, RETRY_AFTER);
    assert_eq!(a[2].1 - t0, RETRY_AFTER * 2);
    assert_eq!(h.kernel(), programmed(&[2]));
    assert_eq!(h.ready.borrow().map(|k| k.v4), Some(own_subnet()));
    assert_eq!(h.metrics.reconcile_errors.get(), 2);
    // Back to the resync period once it landed.
    tokio::time::sleep(RESYNC - RETRY_AFTER).await;
    h.settle().await;
    assert_eq!(h.applies().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn garbage_lease_values_are_skipped_without_removing_other_peers() {
    let mut h = start();
    h.subnets(vec![lease(2), lease(3), raw(&subnet_key(4), b"garbage{")]);
    h.nodes.send_replace(view(true, 1, Vec::new()));
    h.settle().await;
    assert_eq!(h.kernel(), programmed(&[2, 3]));
    assert_eq!(h.metrics.malformed_records.get(), 1);
    // More garbage arrives beside a new peer: the others stay, nothing is deleted.
    h.subnets(vec![
        lease(2),
        lease(3),
        raw(&subnet_key(4), b"garbage{"),
        raw(&subnet_key(5), br#"{"PublicIP":"192.168.1.5","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz"}}"#),
        raw("/coreos.com/network/subnets/not-a-subnet", b"{}"),
        lease(6),
    ]);
    h.settle().await;
    assert_eq!(h.kernel(), programmed(&[2, 3, 6]));
    for (d, _) in h.applies() {
        assert!(
            d.del_routes.is_empty() && d.del_neighbours.is_empty() && d.del_fdb.is_empty(),
            "{d:?}"
        );
    }
    assert_eq!(h.metrics.malformed_records.get(), 4);
    // The own lease keeps being left out of the peers.
    assert!(!h.kernel().routes.contains_key(&own_subnet()));
}

#[tokio::test(start_paused = true)]
async fn a_changed_own_subnet_reprograms_the_device_address() {
    let mut h = start();
    h.list(&[2, 3]);
    h.settle().await;
    let moved: Ipv4Network = "10.244.9.0/24".parse().unwrap();
    h.own.send_replace(Some(OwnLease {
        subnet: moved,
        subnet6: None,
        etcd_lease: 1,
    }));
    h.settle().await;
    assert_eq!(
        h.world.lock().unwrap().vx_addrs,
        ["10.244.9.0/32".parse::<Ipv4Network>().unwrap()]
    );
    assert_eq!(h.ready.borrow().map(|k| k.v4), Some(moved));
    let masq = h.world.lock().unwrap().masq.clone().unwrap();
    assert!(masq.contains("10.244.9.0/24"), "{masq}");
    assert!(
        h.kernel()
            .routes
            .contains_key(&"10.244.2.0/24".parse().unwrap())
    );
}

#[tokio::test(start_paused = true)]
async fn the_programmed_peer_set_is_published_with_its_conflicts() {
    let mut h = start();
    h.nodes.send_replace(view(true, 1, Vec::new()));
    h.settle().await;
    // A stray key claims peer 2's VTEP MAC and public IP; it is older, but lease-less.
    let mut stray = lease(2);
    stray.key = subnet_key(8);
    stray.lease = 0;
    stray.mod_revision = 0;
    h.world.lock().unwrap().fail_apply = 1;
    h.subnets(vec![lease(2), lease(3), stray]);
    h.settle().await;
    assert_eq!(h.applies().len(), 1);
    assert!(
        h.peers.borrow().peers.is_empty(),
        "a failed pass publishes nothing"
    );
    tokio::time::sleep(RETRY_AFTER).await;
    h.settle().await;
    assert_eq!(h.kernel(), programmed(&[2, 3]));
    {
        let set = h.peers.borrow();
        let subnets: Vec<String> = set.peers.iter().map(|p| p.subnet.to_string()).collect();
        assert_eq!(subnets, ["10.244.2.0/24", "10.244.3.0/24"]);
        assert_eq!(set.conflicts.len(), 1, "{:?}", set.conflicts);
        assert_eq!(set.conflicts[0].key, subnet_key(8));
    }
    assert_eq!(h.metrics.lease_conflicts.get(), 1);
    // Resyncs that change nothing publish nothing new.
    h.peers.mark_unchanged();
    tokio::time::sleep(RESYNC * 2).await;
    h.settle().await;
    assert!(!h.peers.has_changed().unwrap());
    // A peer leaving is published once programmed.
    h.subnets(vec![lease(2)]);
    h.settle().await;
    assert_eq!(h.peers.borrow().peers.len(), 1);
    assert!(h.peers.borrow().conflicts.is_empty());
}

#[tokio::test]
async fn teardown_removes_device_routes_and_masquerade_and_says_what_failed() {
    let world: Shared = Arc::default();
    {
        let mut w = world.lock().unwrap();
        w.vxlan = Some(VxlanSpec {
            name: device_name(1),
            vni: 1,
            port: 8472,
            local: Ipv4Addr::new(192, 168, 1, 1).into(),
            underlay_index: UNDERLAY,
            mtu: 1450,
            mac: mac(1),
        });
        w.overlay = programmed(&[2, 3]);
        w.overlay.routes.insert(
            "10.244.4.0/24".parse().unwrap(),
            RouteVia::Underlay(Ipv4Addr::new(192, 168, 1, 4)),
        );
        w.masq = Some("table ip tartan_masq".into());
    }
    let k = FakeKernel(world.clone());
    teardown_with(&k, "eth0", 1).await.unwrap();
    {
        let w = world.lock().unwrap();
        assert!(w.vxlan.is_none() && w.masq.is_none());
        assert_eq!(w.overlay, OverlayState::default(), "direct routes too");
        assert!(
            w.calls
                .iter()
                .any(|(c, _)| *c == Call::DeleteLink("tartan.1".into()))
        );
    }
    // A missing underlay stops nothing else, and the error names it.
    world.lock().unwrap().masq = Some("table ip tartan_masq".into());
    let e = teardown_with(&k, "eth9", 1).await.unwrap_err();
    assert!(format!("{e:#}").contains("eth9"), "{e:#}");
    assert!(world.lock().unwrap().masq.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_dual_stack_node_runs_an_ipv6_device_beside_the_ipv4_one() {
    let mut h = start_with(true);
    h.list(&[2, 3]);
    h.settle().await;
    assert_eq!(h.kernel(), programmed(&[2, 3]));
    {
        let w = h.world.lock().unwrap();
        let spec = w.vxlan6.clone().expect("an IPv6 VXLAN device");
        assert_eq!(
            (spec.name.as_str(), spec.mtu, spec.vni, spec.local, spec.mac),
            ("tartan6.1", 1430, 1, underlay6(1).into(), mac6(1)),
            "MTU - 70 over the IPv6 underlay, its own MAC"
        );
        assert_eq!(
            w.vx6_addrs,
            ["fd00:10:244:1::/128".parse::<Ipv6Network>().unwrap()]
        );
        assert_eq!(w.overlay6, programmed6(&[2, 3]));
        let masq = w.masq.clone().unwrap();
        assert!(
            masq.contains("table ip6 tartan_masq {")
                && masq.contains("ip6 saddr fd00:10:244:1::/64 ip6 daddr fd00:10:244::/56 return"),
            "{masq}"
        );
    }
    assert!(h.calls().contains(&Call::Ip6Forward));
    assert!(
        h.world
            .lock()
            .unwrap()
            .focused
            .last()
            .is_some_and(|f| f.contains(&VX6)),
        "notifications about the IPv6 device are followed"
    );

    // Peer 3's IPv6 half loses its BackendV6Data: its IPv6 entries go, its IPv4 ones stay.
    let mut bad = lease_dual(3);
    let mut v = LeaseValue::parse(&bad.value).unwrap();
    v.backend_v6_data = None;
    bad.value = v.to_bytes();
    h.subnets(vec![lease_dual(2), bad]);
    h.settle().await;
    assert_eq!(h.kernel(), programmed(&[2, 3]));
    assert_eq!(h.world.lock().unwrap().overlay6, programmed6(&[2]));
    assert_eq!(h.peers.borrow().ipv6_ignored.len(), 1);

    // Someone deletes an IPv6 route: the notification about the device brings it back.
    let n2 = "fd00:10:244:2::/64".parse().unwrap();
    h.world.lock().unwrap().overlay6.routes.remove(&n2);
    h.events.send(KernelChange::Removal(Some(VX6))).unwrap();
    tokio::time::sleep(DEBOUNCE * 2).await;
    h.settle().await;
    assert_eq!(h.world.lock().unwrap().overlay6, programmed6(&[2]));

    // The node's lease no longer names an IPv6 subnet: the IPv6 device and table go, the
    // IPv4 overlay stays as it was.
    h.own.send_replace(Some(OwnLease {
        subnet: own_subnet(),
        subnet6: None,
        etcd_lease: 1,
    }));
    h.settle().await;
    let w = h.world.lock().unwrap();
    assert!(w.vxlan6.is_none(), "{:?}", w.vxlan6);
    assert_eq!(w.overlay6, OverlayState::<V6>::default());
    assert!(!w.masq.clone().unwrap().contains("ip6 saddr"));
    assert_eq!(w.overlay, programmed(&[2, 3]));
}
