//! Pure subnet allocation: given the network config and the subnet keys present in etcd,
//! decide which subnet a node should hold. No I/O; the lease manager acts on the decision.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use rand::RngExt;

use crate::model::netconf::NetworkConfig;
use crate::model::subnet_lease::LeaseValue;

/// One subnet key found in etcd.
#[derive(Debug, Clone)]
pub struct ExistingSubnet {
    /// The subnet named by the key.
    pub subnet: Ipv4Network,
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
/// them for the lease's 24 h), or a second lease inside it. Reservations (lease-less keys)
/// are an operator's and never released, and a lease matched only by public IP (written by
/// flannel) is left alone.
pub fn stale_own<'a>(
    existing: &'a [ExistingSubnet],
    name: &str,
    kept: Ipv4Network,
) -> Vec<&'a ExistingSubnet> {
    existing
        .iter()
        .filter(|e| {
            e.subnet != kept
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
    let count = cfg.subnet_count();
    let is_free = |i: u64| -> Option<Ipv4Network> {
        cfg.nth_subnet(i)
            .filter(|s| !taken.contains(&u32::from(s.network())))
    };
    if count <= ENUMERATE_LIMIT {
        let free: Vec<Ipv4Network> = (0..count).filter_map(is_free).collect();
        if free.is_empty() {
            return Decision::Exhausted;
        }
        let i = rng.random_range(0..free.len());
        return Decision::Create { subnet: free[i] };
    }
    for _ in 0..1000 {
        if let Some(s) = is_free(rng.random_range(0..count)) {
            return Decision::Create { subnet: s };
        }
    }
    // Nearly full huge network: scan from a random start.
    let start = rng.random_range(0..count);
    (0..count)
        .map(|k| (start + k) % count)
        .find_map(is_free)
        .map_or(Decision::Exhausted, |subnet| Decision::Create { subnet })
}

#[cfg(test)]
mod tests;
