//! Holds this node's subnet lease in etcd: acquires it (own key first, then the remembered
//! subnet, then a random free one; lost races retried), renews the long-lived etcd lease,
//! keeps reservations lease-less, re-creates the key if it vanishes, restores its value and
//! etcd lease if anything else rewrites it ([`own_key_drift`]), and notices a requested leave.
//! In a dual-stack network the key names both subnets (`10.244.3.0-24&fd00:10:244:3::-64`,
//! flannel's form) and the value carries the IPv6 VTEP (`PublicIPv6`, `BackendV6Data`).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use ipnetwork::{Ipv4Network, Ipv6Network};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::metrics::Metrics;
use crate::model::netconf::NetworkConfig;
use crate::model::subnet_lease::{LeaseValue, MacAddr, SubnetKey, VxlanBackendData};
use crate::node::subnet_alloc::{Decision, ExistingSubnet, decide, decide_v6, stale_own};
use crate::store::etcd::{EtcdArgs, KvItem, PrefixView, Store};
use crate::util::backoff::Backoff;

/// The subnet this node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnLease {
    /// The pod subnet.
    pub subnet: Ipv4Network,
    /// The IPv6 pod subnet of a dual-stack network (named in the same key).
    pub subnet6: Option<Ipv6Network>,
    /// The etcd lease the key is attached to; 0 for a reservation.
    pub etcd_lease: i64,
}

impl OwnLease {
    /// The subnets its key names.
    pub fn key(&self) -> SubnetKey {
        SubnetKey {
            v4: self.subnet,
            v6: self.subnet6,
        }
    }
}

/// The subnets a node would like to hold again (from its state file, or the lease it lost).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Preferred {
    /// The IPv4 subnet.
    pub v4: Option<Ipv4Network>,
    /// The IPv6 subnet.
    pub v6: Option<Ipv6Network>,
}

/// Everything the manager needs to know about this node.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// Node name.
    pub name: String,
    /// Underlay address.
    pub public_ip: Ipv4Addr,
    /// VTEP MAC.
    pub vtep_mac: MacAddr,
    /// IPv6 underlay address (the IPv6 VTEP's local address); `None` when the node has none,
    /// and then it holds no IPv6 subnet even in a dual-stack network.
    pub public_ipv6: Option<Ipv6Addr>,
    /// The IPv6 VTEP's MAC.
    pub vtep_mac6: MacAddr,
}

/// Acquires and keeps a subnet lease.
pub struct SubnetManager {
    store: Store,
    keys: EtcdArgs,
    node: NodeIdentity,
    cfg: NetworkConfig,
    ttl: i64,
    metrics: Arc<Metrics>,
}

/// The result of one allocation attempt.
enum Attempt {
    Got(OwnLease),
    /// Lost a race (or the state moved under us): try again at once.
    Retry,
    LeaveRequested,
}

/// Why [`SubnetManager::keep`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepOutcome {
    /// An operator asked this node to leave (`tartanctl node leave`).
    LeaveRequested,
}

/// What differs between this node's key as etcd holds it and what the node wrote (the value
/// `expected`, attached to etcd lease `lease`, 0 for a reservation), in words for the log;
/// `None` when nothing does. Values are compared decoded, so a different encoding of the same
/// lease is no difference.
pub fn own_key_drift(item: &KvItem, expected: &LeaseValue, lease: i64) -> Option<String> {
    let mut why = Vec::new();
    match LeaseValue::parse(&item.value) {
        Ok(v) if v == *expected => {}
        Ok(v) => why.push(format!(
            "its value was replaced (PublicIP {}, NodeName {})",
            v.public_ip,
            v.node_name.as_deref().unwrap_or("none")
        )),
        Err(e) => why.push(format!("its value was replaced by garbage ({e})")),
    }
    if item.lease != lease {
        why.push(match (item.lease, lease) {
            (0, _) => format!("it lost its etcd lease {lease:x} (it would never expire)"),
            (_, 0) => format!(
                "the reservation was attached to etcd lease {:x} (it would expire)",
                item.lease
            ),
            (other, _) => format!("it was moved from etcd lease {lease:x} to {other:x}"),
        });
    }
    (!why.is_empty()).then(|| why.join("; "))
}

impl SubnetManager {
    /// A manager for `node` with subnet leases of `ttl` seconds.
    pub fn new(
        store: Store,
        keys: EtcdArgs,
        node: NodeIdentity,
        cfg: NetworkConfig,
        ttl: i64,
        metrics: Arc<Metrics>,
    ) -> Self {
        SubnetManager {
            store,
            keys,
            node,
            cfg,
            ttl,
            metrics,
        }
    }

    fn key_for(&self, key: SubnetKey) -> String {
        crate::store::keys::subnet_key(&self.keys, key)
    }

    /// Whether this node takes an IPv6 subnet: the network is dual-stack and the node has an
    /// IPv6 underlay address.
    fn dual(&self) -> bool {
        self.cfg.ipv6.is_some() && self.node.public_ipv6.is_some()
    }

    fn value(&self) -> Vec<u8> {
        let mut v = LeaseValue::vxlan(
            self.node.public_ip,
            self.cfg.backend.vni,
            self.node.vtep_mac,
            &self.node.name,
        );
        if self.dual() {
            v.public_ipv6 = self.node.public_ipv6;
            v.backend_v6_data = serde_json::to_value(VxlanBackendData {
                vni: self.cfg.backend.vni,
                vtep_mac: self.node.vtep_mac6,
            })
            .ok();
        }
        v.to_bytes()
    }

    /// The IPv6 subnet to hold beside `v4`: the one the node's own key `current` names, else
    /// the preferred one, else a free one; `None` outside dual-stack and for a reservation
    /// that names none (an operator's key is never renamed).
    fn pick_v6(
        &self,
        v4: Ipv4Network,
        existing: &[ExistingSubnet],
        current: Option<&ExistingSubnet>,
        preferred: Option<Ipv6Network>,
    ) -> Result<Option<Ipv6Network>> {
        let Some(pool) = self.cfg.ipv6.as_ref().filter(|_| self.dual()) else {
            return Ok(None);
        };
        if let Some(c) = current
            && c.etcd_lease == 0
        {
            if c.subnet6.is_none() {
                warn!(subnet = %c.subnet, "this node's reservation names no IPv6 subnet: the node gets none until the reservation's key names one");
            }
            return Ok(c.subnet6.filter(|s| pool.is_leasable(*s)));
        }
        let own6 = current.and_then(|c| c.subnet6);
        // The IPv6 subnet of the IPv4 subnet's index in its pool.
        let size4 = 1u64 << (32 - u32::from(self.cfg.subnet_len.min(32)));
        let index = (u64::from(u32::from(v4.network())))
            .checked_sub(u64::from(u32::from(self.cfg.subnet_min)))
            .map(|d| d / size4);
        let paired = index.and_then(|i| pool.nth_subnet(i));
        let mut rng = rand::rng();
        match decide_v6(pool, existing, own6, preferred, paired, &mut rng) {
            Some(s) => Ok(Some(s)),
            None => bail!(
                "IPv6 subnet space exhausted: all {} subnets /{} between {} and {} are taken",
                pool.subnet_count(),
                pool.subnet_len,
                pool.subnet_min,
                pool.subnet_max
            ),
        }
    }

    /// One allocation attempt.
    async fn try_acquire(&self, preferred: Preferred) -> Result<Attempt> {
        if self
            .store
            .get(&crate::store::keys::leave_key(&self.keys, &self.node.name))
            .await?
            .is_some()
        {
            return Ok(Attempt::LeaveRequested);
        }
        let (_, items) = self.store.list(&self.keys.subnets_prefix()).await?;
        let mut existing = Vec::with_capacity(items.len());
        for it in &items {
            let suffix = it.key.rsplit('/').next().unwrap_or_default();
            let Ok(key) = SubnetKey::parse(suffix) else {
                warn!(key = %it.key, "ignoring a subnet key that is not a.b.c.d-NN");
                continue;
            };
            let value = LeaseValue::parse(&it.value).ok();
            existing.push(ExistingSubnet {
                subnet: key.v4,
                subnet6: key.v6,
                value,
                etcd_lease: it.lease,
                mod_revision: it.mod_revision,
            });
        }
        let decision = {
            let mut rng = rand::rng();
            decide(
                &self.cfg,
                &existing,
                &self.node.name,
                self.node.public_ip,
                preferred.v4,
                &mut rng,
            )
        };
        let got = match decision {
            Decision::Exhausted => bail!(
                "subnet space exhausted: all {} subnets /{} between {} and {} are taken",
                self.cfg.subnet_count(),
                self.cfg.subnet_len,
                self.cfg.subnet_min,
                self.cfg.subnet_max
            ),
            Decision::Reuse {
                subnet,
                etcd_lease,
                mod_revision,
            } => {
                let current = existing
                    .iter()
                    .find(|e| e.subnet == subnet && e.mod_revision == mod_revision);
                let old = SubnetKey {
                    v4: subnet,
                    v6: current.and_then(|c| c.subnet6),
                };
                let want = SubnetKey {
                    v4: subnet,
                    v6: self.pick_v6(subnet, &existing, current, preferred.v6)?,
                };
                let key = self.key_for(old);
                let value = self.value();
                let held = items.iter().find(|i| i.key == key);
                if etcd_lease == 0 {
                    // A reservation: keep it lease-less (and its key as the operator wrote
                    // it), only bring the value up to date.
                    if held.map(|c| c.value.as_slice()) != Some(value.as_slice())
                        && !self
                            .store
                            .replace_if_unchanged(&key, value, 0, mod_revision)
                            .await?
                    {
                        return Ok(Attempt::Retry);
                    }
                    info!(%subnet, subnet6 = ?old.v6, "using reserved subnet");
                    OwnLease {
                        subnet,
                        subnet6: old.v6,
                        etcd_lease: 0,
                    }
                } else {
                    // Our earlier lease: keep it alive and rewrite the value if it changed.
                    let mut keeper = self.store.keeper(etcd_lease);
                    if keeper.renew().await?.is_none() {
                        return Ok(Attempt::Retry);
                    }
                    if want != old {
                        // The network became dual-stack (or the IPv6 subnet left the pool):
                        // the key is renamed, under the same etcd lease; the old key goes
                        // with the node's other stale leases below.
                        if !self
                            .store
                            .create_if_absent(&self.key_for(want), value, etcd_lease)
                            .await?
                        {
                            return Ok(Attempt::Retry);
                        }
                        info!(%subnet, subnet6 = ?want.v6, old = %old, "kept the subnet this node held before, under a key naming its IPv6 subnet too");
                    } else if held.map(|c| c.value.as_slice()) != Some(value.as_slice())
                        && !self
                            .store
                            .replace_if_unchanged(&key, value, etcd_lease, mod_revision)
                            .await?
                    {
                        return Ok(Attempt::Retry);
                    } else {
                        info!(%subnet, subnet6 = ?want.v6, "kept the subnet this node held before");
                    }
                    OwnLease {
                        subnet,
                        subnet6: want.v6,
                        etcd_lease,
                    }
                }
            }
            Decision::Create { subnet } => {
                let want = SubnetKey {
                    v4: subnet,
                    v6: self.pick_v6(subnet, &existing, None, preferred.v6)?,
                };
                let lease = self.store.grant(self.ttl).await?;
                if self
                    .store
                    .create_if_absent(&self.key_for(want), self.value(), lease)
                    .await?
                {
                    info!(%subnet, subnet6 = ?want.v6, "leased subnet");
                    OwnLease {
                        subnet,
                        subnet6: want.v6,
                        etcd_lease: lease,
                    }
                } else {
                    info!(%subnet, "lost the race for a subnet, retrying");
                    let _ = self.store.revoke(lease).await;
                    return Ok(Attempt::Retry);
                }
            }
        };
        self.release_stale(&existing, &got).await;
        Ok(Attempt::Got(got))
    }

    /// Gives back this node's other leases (see [`stale_own`]), each only if unchanged since
    /// it was listed; failures are logged and left for the lease to expire.
    async fn release_stale(&self, existing: &[ExistingSubnet], kept: &OwnLease) {
        for e in stale_own(existing, &self.node.name, kept.key()) {
            let key = self.key_for(SubnetKey {
                v4: e.subnet,
                v6: e.subnet6,
            });
            match self.store.delete_if_unchanged(&key, e.mod_revision).await {
                Ok(true) => {
                    info!(subnet = %e.subnet, kept = %kept.subnet, "released a lease this node no longer uses (left by an earlier network config or state)");
                    if e.etcd_lease != kept.etcd_lease {
                        let _ = self.store.revoke(e.etcd_lease).await;
                    }
                }
                Ok(false) => {}
                Err(err) => {
                    warn!(subnet = %e.subnet, "releasing an old lease of this node: {err:#}")
                }
            }
        }
    }

    /// Acquires a subnet, retrying forever: lost races at once, etcd errors and exhaustion
    /// with jittered backoff (never spinning). `None` when an operator asked this node to leave.
    pub async fn acquire(&self, preferred: Preferred) -> Option<OwnLease> {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut races = 0u32;
        loop {
            match self.try_acquire(preferred).await {
                Ok(Attempt::Got(l)) => {
                    // `node leave` writes its marker, then lists the subnets to release: if
                    // that listing ran before this key existed, only a second look at the
                    // marker tells (a lookup error leaves it to the keep loop).
                    if let Ok(Some(_)) = self
                        .store
                        .get(&crate::store::keys::leave_key(&self.keys, &self.node.name))
                        .await
                    {
                        if l.etcd_lease != 0 {
                            let _ = self.store.delete(&self.key_for(l.key())).await;
                            let _ = self.store.revoke(l.etcd_lease).await;
                        }
                        return None;
                    }
                    return Some(l);
                }
                Ok(Attempt::LeaveRequested) => return None,
                Ok(Attempt::Retry) => {
                    races += 1;
                    // Contention: a short random pause spreads the contenders.
                    let ms = rand::random::<u64>() % (10 * u64::from(races.min(20)) + 1);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                Err(e) => {
                    error!("cannot acquire a subnet, will retry: {e:#}");
                    backoff.wait().await;
                }
            }
        }
    }

    /// Keeps `own` alive: renews the etcd lease every `renew_every`, re-creates the key when
    /// it disappears (unless a leave was requested), and publishes changes on `own_tx`.
    pub async fn keep(
        &self,
        mut own: OwnLease,
        own_tx: &watch::Sender<Option<OwnLease>>,
        mut subnets: watch::Receiver<Arc<PrefixView>>,
        renew_every: Duration,
    ) -> KeepOutcome {
        let mut keeper = (own.etcd_lease != 0).then(|| self.store.keeper(own.etcd_lease));
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut next_renew = tokio::time::Instant::now() + renew_every;
        // When to check (and restore) this node's key, after the view showed it changed.
        let mut restore_due: Option<tokio::time::Instant> = None;
        let mut restore_backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            let restore_at = restore_due
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = tokio::time::sleep_until(restore_at), if restore_due.is_some() => {
                    restore_due = match self.restore(&own).await {
                        Ok(()) => {
                            restore_backoff.reset();
                            None
                        }
                        Err(e) => {
                            let d = restore_backoff.next_delay();
                            warn!(subnet = %own.subnet, "cannot restore this node's subnet key, retrying in {d:?}: {e:#}");
                            Some(tokio::time::Instant::now() + d)
                        }
                    };
                }
                _ = tokio::time::sleep_until(next_renew) => {
                    let Some(k) = keeper.as_mut() else {
                        next_renew += renew_every;
                        continue;
                    };
                    match k.renew().await {
                        Ok(Some(_)) => {
                            self.metrics.lease_renewals.inc();
                            backoff.reset();
                            next_renew = tokio::time::Instant::now() + renew_every;
                        }
                        Ok(None) => {
                            warn!(subnet = %own.subnet, "subnet lease expired; re-acquiring the same subnet");
                            self.metrics.lease_renewal_failures.inc();
                            own = match self.reacquire(&own).await {
                                Some(o) => o,
                                None => return KeepOutcome::LeaveRequested,
                            };
                            keeper = (own.etcd_lease != 0).then(|| self.store.keeper(own.etcd_lease));
                            let _ = own_tx.send(Some(own.clone()));
                            next_renew = tokio::time::Instant::now() + renew_every;
                        }
                        Err(e) => {
                            self.metrics.lease_renewal_failures.inc();
                            let d = backoff.next_delay();
                            warn!("subnet lease renewal failed, retrying in {d:?}: {e:#}");
                            next_renew = tokio::time::Instant::now() + d;
                        }
                    }
                }
                changed = subnets.changed() => {
                    if changed.is_err() {
                        // The mirror ended (shutdown); keep renewing regardless.
                        subnets = watch::channel(Arc::new(PrefixView {
                            listed: false,
                            items: Default::default(),
                            revision: 0,
                            changed_at: std::time::Instant::now(),
                        })).1;
                        continue;
                    }
                    let view = subnets.borrow_and_update().clone();
                    let key = self.key_for(own.key());
                    if !view.listed {
                        continue;
                    }
                    if let Some(item) = view.items.get(&key) {
                        if self.drift(item, &own).is_some() {
                            restore_due = Some(tokio::time::Instant::now());
                        }
                        continue;
                    }
                    // The view may predate our own write; believe only etcd itself.
                    match self.store.get(&key).await {
                        Ok(Some(_)) => continue,
                        Ok(None) => {}
                        Err(e) => {
                            warn!("cannot confirm that this node's subnet key is gone: {e:#}");
                            continue;
                        }
                    }
                    match self.store.get(&crate::store::keys::leave_key(&self.keys, &self.node.name)).await {
                        Ok(Some(_)) => {
                            info!(subnet = %own.subnet, "subnet released by `node leave`");
                            return KeepOutcome::LeaveRequested;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            warn!("cannot check for a leave request: {e:#}");
                            continue;
                        }
                    }
                    warn!(subnet = %own.subnet, "this node's subnet key was deleted; re-creating it");
                    own = match self.reacquire(&own).await {
                        Some(o) => o,
                        None => return KeepOutcome::LeaveRequested,
                    };
                    keeper = (own.etcd_lease != 0).then(|| self.store.keeper(own.etcd_lease));
                    let _ = own_tx.send(Some(own.clone()));
                }
            }
        }
    }

    fn drift(&self, item: &KvItem, own: &OwnLease) -> Option<String> {
        let expected = LeaseValue::parse(&self.value()).ok()?;
        own_key_drift(item, &expected, own.etcd_lease)
    }

    /// Rewrites this node's key with its own value and etcd lease if etcd holds anything else
    /// (someone's `etcdctl put`): the view may lag this node's own writes, so etcd decides.
    /// A key gone meanwhile is left to the deletion path; one changed again meanwhile is an
    /// error (the caller retries).
    async fn restore(&self, own: &OwnLease) -> Result<()> {
        let key = self.key_for(own.key());
        let Some(cur) = self.store.get(&key).await? else {
            return Ok(());
        };
        let Some(why) = self.drift(&cur, own) else {
            return Ok(());
        };
        warn!(subnet = %own.subnet, %key, "this node's subnet key was changed by someone else: {why}; restoring it");
        if self
            .store
            .replace_if_unchanged(&key, self.value(), own.etcd_lease, cur.mod_revision)
            .await?
        {
            info!(subnet = %own.subnet, lease = own.etcd_lease, "restored this node's subnet key");
            Ok(())
        } else {
            bail!("it changed again while being restored")
        }
    }

    async fn reacquire(&self, old: &OwnLease) -> Option<OwnLease> {
        let new = self
            .acquire(Preferred {
                v4: Some(old.subnet),
                v6: old.subnet6,
            })
            .await?;
        if new.subnet != old.subnet || new.subnet6 != old.subnet6 {
            error!(
                old = %old.key(),
                new = %new.key(),
                "this node's subnet was taken by another node; pods keep their old addresses until restarted"
            );
        }
        Some(new)
    }

    /// Releases the subnet: deletes the key and revokes its lease (reservations are kept).
    pub async fn release(store: &Store, keys: &EtcdArgs, own: &OwnLease) -> Result<()> {
        if own.etcd_lease == 0 {
            info!(subnet = %own.subnet, "keeping the reservation");
            return Ok(());
        }
        let key = crate::store::keys::subnet_key(keys, own.key());
        store.delete(&key).await?;
        let _ = store.revoke(own.etcd_lease).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(value: &[u8], lease: i64) -> KvItem {
        KvItem {
            key: "/coreos.com/network/subnets/10.244.3.0-24".into(),
            value: value.to_vec(),
            lease,
            mod_revision: 7,
        }
    }

    #[test]
    fn any_change_of_value_or_lease_is_drift() {
        let mac = crate::node::state_file::vtep_mac_for("n1");
        let ours = LeaseValue::vxlan("192.168.1.1".parse().unwrap(), 1, mac, "n1");
        assert_eq!(own_key_drift(&item(&ours.to_bytes(), 5), &ours, 5), None);
        // Same lease, re-encoded with other whitespace and field order: no drift.
        let reencoded = serde_json::to_vec_pretty(&serde_json::json!({
            "NodeName": "n1",
            "BackendData": {"VtepMAC": mac.to_string(), "VNI": 1},
            "BackendType": "vxlan",
            "PublicIP": "192.168.1.1",
        }))
        .unwrap();
        assert_eq!(own_key_drift(&item(&reencoded, 5), &ours, 5), None);
        // `etcdctl put` of a bogus address: new value, and no lease any more.
        let mut bogus = ours.clone();
        bogus.public_ip = "192.168.1.99".parse().unwrap();
        let why = own_key_drift(&item(&bogus.to_bytes(), 0), &ours, 5).unwrap();
        assert!(
            why.contains("192.168.1.99") && why.contains("lost its etcd lease"),
            "{why}"
        );
        // The same value written back without the lease.
        let why = own_key_drift(&item(&ours.to_bytes(), 0), &ours, 5).unwrap();
        assert!(!why.contains("value"), "{why}");
        assert!(own_key_drift(&item(&ours.to_bytes(), 9), &ours, 5).is_some());
        // A reservation must stay lease-less.
        let why = own_key_drift(&item(&ours.to_bytes(), 9), &ours, 0).unwrap();
        assert!(why.contains("reservation"), "{why}");
        assert!(own_key_drift(&item(b"garbage", 5), &ours, 5).is_some());
    }
}
