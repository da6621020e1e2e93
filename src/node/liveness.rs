//! The node's short liveness lease (seconds) and its node record `/tartan/nodes/<name>`.
//! Per-node records (pods, endpoints) are attached to this lease, so they vanish by themselves
//! when a node dies. The subnet lease is separate and long-lived.

use crate::store::keys::node_key;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::model::node_record::{LiveClaim, NodeRecord};
use crate::node::subnet_keeper::{NodeIdentity, OwnLease};
use crate::store::etcd::{EtcdArgs, Store};
use crate::util::backoff::Backoff;

/// What the live nodes say they hold, from their records (undecodable records and nodes
/// without a subnet yet claim nothing).
pub fn live_claims<'a>(
    items: impl IntoIterator<Item = &'a crate::store::etcd::KvItem>,
) -> Vec<LiveClaim> {
    items
        .into_iter()
        .filter_map(|i| serde_json::from_slice::<NodeRecord>(&i.value).ok())
        .filter_map(|r| {
            Some(LiveClaim {
                subnet: r.subnet.as_deref()?.parse().ok()?,
                node: r.name,
                vtep_mac: r.vtep_mac,
            })
        })
        .collect()
}

/// Keeps the liveness lease and node record alive forever; publishes the current lease id on
/// `lease_tx` (records attached to it must be re-written when it changes).
pub async fn run(
    store: Store,
    keys: EtcdArgs,
    node: NodeIdentity,
    mut own_rx: watch::Receiver<Option<OwnLease>>,
    ttl: i64,
    lease_tx: watch::Sender<Option<i64>>,
    metrics: Arc<Metrics>,
) {
    let every = Duration::from_millis((ttl.max(2) as u64 * 1000) / 3);
    let mut backoff = Backoff::new(Duration::from_millis(300), Duration::from_secs(5));
    let mut lease: Option<i64> = None;
    let mut record_dirty = true;
    loop {
        if lease.is_none() {
            match store.grant(ttl).await {
                Ok(id) => {
                    info!(lease = id, ttl, "liveness lease granted");
                    lease = Some(id);
                    record_dirty = true;
                    let _ = lease_tx.send(Some(id));
                }
                Err(e) => {
                    warn!("liveness lease: {e:#}");
                    backoff.wait().await;
                    continue;
                }
            }
        }
        let Some(id) = lease else { continue };
        if record_dirty {
            let rec = NodeRecord {
                name: node.name.clone(),
                subnet: own_rx.borrow().as_ref().map(|o| o.subnet.to_string()),
                public_ip: node.public_ip,
                vtep_mac: node.vtep_mac,
                version: env!("CARGO_PKG_VERSION").to_string(),
            };
            let bytes = serde_json::to_vec(&rec).unwrap_or_default();
            match store.put(&node_key(&keys, &node.name), bytes, id).await {
                Ok(()) => record_dirty = false,
                Err(e) => {
                    warn!("writing the node record: {e:#}");
                    backoff.wait().await;
                    continue;
                }
            }
        }
        let mut keeper = store.keeper(id);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                r = own_rx.changed() => {
                    if r.is_ok() {
                        record_dirty = true;
                        break;
                    }
                    tokio::time::sleep(every).await;
                }
            }
            match keeper.renew().await {
                Ok(Some(_)) => {
                    metrics.lease_renewals.inc();
                    backoff.reset();
                }
                Ok(None) => {
                    warn!(lease = id, "liveness lease expired; granting a new one");
                    metrics.lease_renewal_failures.inc();
                    lease = None;
                    break;
                }
                Err(e) => {
                    metrics.lease_renewal_failures.inc();
                    warn!("liveness lease renewal failed: {e:#}");
                    backoff.wait().await;
                }
            }
        }
    }
}
