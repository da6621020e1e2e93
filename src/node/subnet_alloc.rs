//! Pure subnet allocation: given the network config and the subnet keys present in etcd,
//! decide which subnet a node should hold. No I/O; the lease manager acts on the decision.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ipnetwork::{Ipv4Network, Ipv6Network};
use rand::RngExt;

use crate::model::netconf::{Ipv6Pool, NetworkConfig};
use crate::model::subnet_lease::{LeaseValue, SubnetKey};

/// One subnet key found in etcd.
#[derive(Debug, Clone)]
pub struct ExistingSubnet {
    /// The subnet named by the key.
    pub subnet: Ipv4Network,
    /// The key's IPv6 subnet (a dual-stack lease: `10.5.34.0-24&fc00:0:0:7::-64`).
    pub subnet6: Option<Ipv6Network>,
    /// The decoded value, or `None` when the value is garbage (the key still counts as taken).
    pub value: Option<LeaseValue>,
    /// The etcd lease the key is attached to; 0 means a reservation.
    pub etcd_lease: i64,
    /// The key's mod revision, for compare-and-swap updates.
    pub mod_revision: i64,
}

/// What the node should do to hold a subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A key owned by this node already exists: keep it.
    Reuse {
        /// The subnet.
        subnet: Ipv4Network,
        /// The existing etcd lease (0 for a reservation, which must stay lease-less).
        etcd_lease: i64,
        /// Revision for the compare-and-swap rewrite of the value.
        mod_revision: i64,
    },
    /// Create this subnet's key if it is still absent.
    Create {
        /// The subnet.
        subnet: Ipv4Network,
    },
    /// No subnet in SubnetMin..SubnetMax is free.
    Exhausted,
}

/// Leases node `name` holds besides `kept`, which it gives back once it holds `kept`: keys
/// attached to an etcd lease whose value names this node (`NodeName`) and that lie outside the
/// network or its SubnetLen (left by an earlier network config: a changed config used to leak
/// them for the lease's 24 h), or a second lease inside it, or the same IPv4 subnet under a
/// key naming another IPv6 subnet (or none: the key before the network became dual-stack). Reservations (lease-less keys)
/// are an operator's and never released, and a lease matched only by public IP (written by
/// flannel) is left alone.
pub fn stale_own<'a>(
    existing: &'a [ExistingSubnet],
    name: &str,
    kept: SubnetKey,
) -> Vec<&'a ExistingSubnet> {
    existing
        .iter()
        .filter(|e| {
            (e.subnet, e.subnet6) != (kept.v4, kept.v6)
                && e.etcd_lease != 0
                && e.value
                    .as_ref()
                    .is_some_and(|v| v.node_name.as_deref() == Some(name))
        })
        .collect()
}

/// Above this many subnets, candidates are probed at random instead of enumerated.
const ENUMERATE_LIMIT: u64 = 1 << 16;

/// Decides which subnet node `name` (underlay address `public_ip`) should hold.
///
/// Order: a key this node already owns (a reservation first, then `preferred`, then any),
/// then `preferred` when it is free and leasable, then a random free leasable subnet.
pub fn decide(
    cfg: &NetworkConfig,
    existing: &[ExistingSubnet],
    name: &str,
    public_ip: Ipv4Addr,
    preferred: Option<Ipv4Network>,
    rng: &mut impl rand::Rng,
) -> Decision {
    let mut owned: Vec<&ExistingSubnet> = existing
        .iter()
        .filter(|e| {
            cfg.network.contains(e.subnet.network())
                && e.subnet.prefix() == cfg.subnet_len
                && e.value
                    .as_ref()
                    .is_some_and(|v| v.belongs_to(name, public_ip))
        })
        .collect();
    owned.sort_by_key(|e| {
        (
            e.etcd_lease != 0,
            Some(e.subnet) != preferred,
            u32::from(e.subnet.network()),
        )
    });
    if let Some(e) = owned.first() {
        return Decision::Reuse {
            subnet: e.subnet,
            etcd_lease: e.etcd_lease,
            mod_revision: e.mod_revision,
        };
    }
    let taken: HashSet<u32> = existing
        .iter()
        .map(|e| u32::from(e.subnet.network()))
        .collect();
    if let Some(p) = preferred
        && cfg.is_leasable(p)
        && !taken.contains(&u32::from(p.network()))
    {
        return Decision::Create { subnet: p };
    }
    let is_free = |i: u64| -> Option<Ipv4Network> {
        cfg.nth_subnet(i)
            .filter(|s| !taken.contains(&u32::from(s.network())))
    };
    pick_free(cfg.subnet_count(), is_free, rng)
        .map_or(Decision::Exhausted, |subnet| Decision::Create { subnet })
}

/// A random free subnet of the `count` candidates, `free(i)` giving the `i`th when it is
/// free; `None` when none is. Enumerates small ranges, probes huge ones at random (then scans
/// from a random start, for a nearly full one).
fn pick_free<T>(
    count: u64,
    free: impl Fn(u64) -> Option<T>,
    rng: &mut impl rand::Rng,
) -> Option<T> {
    if count == 0 {
        return None;
    }
    if count <= ENUMERATE_LIMIT {
        let mut all: Vec<T> = (0..count).filter_map(&free).collect();
        if all.is_empty() {
            return None;
        }
        let i = rng.random_range(0..all.len());
        return Some(all.swap_remove(i));
    }
    for _ in 0..1000 {
        if let Some(s) = free(rng.random_range(0..count)) {
            return Some(s);
        }
    }
    let start = rng.random_range(0..count);
    (0..count).map(|k| (start + k) % count).find_map(free)
}

/// The IPv6 subnet a dual-stack node holds beside its IPv4 one (flannel's dual-stack leases
/// name both in one key): `own`, the one its own key already names, when `pool` can lease
/// it; else `preferred` (remembered across restarts) when leasable and no other key names
/// it; else `paired`, the IPv6 subnet of the same index as the node's IPv4 subnet, when free
/// (the key's create-if-absent makes the IPv4 subnet unique, so two nodes starting at once
/// get different IPv6 subnets too, where flannel's random pick can give both the same);
/// else a random free one. `None`: every IPv6 subnet of the pool is taken.
pub fn decide_v6(
    pool: &Ipv6Pool,
    existing: &[ExistingSubnet],
    own: Option<Ipv6Network>,
    preferred: Option<Ipv6Network>,
    paired: Option<Ipv6Network>,
    rng: &mut impl rand::Rng,
) -> Option<Ipv6Network> {
    if let Some(o) = own.filter(|o| pool.is_leasable(*o)) {
        return Some(o);
    }
    let taken: HashSet<u128> = existing
        .iter()
        .filter_map(|e| e.subnet6)
        .map(|s| u128::from(s.network()))
        .collect();
    if let Some(p) = preferred
        && pool.is_leasable(p)
        && !taken.contains(&u128::from(p.network()))
    {
        return Some(p);
    }
    if let Some(p) = paired
        && pool.is_leasable(p)
        && !taken.contains(&u128::from(p.network()))
    {
        return Some(p);
    }
    let is_free = |i: u64| -> Option<Ipv6Network> {
        pool.nth_subnet(i)
            .filter(|s| !taken.contains(&u128::from(s.network())))
    };
    pick_free(pool.subnet_count(), is_free, rng)
}

#[cfg(test)]
mod tests;
