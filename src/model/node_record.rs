//! The node record `/tartan/nodes/<name>` (it exists only while the node's liveness lease
//! does) and the claim on a subnet that a live node's record makes.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use crate::model::subnet_lease::MacAddr;

/// The value of `/tartan/nodes/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node name.
    pub name: String,
    /// Pod subnet, once leased.
    pub subnet: Option<String>,
    /// Underlay address.
    pub public_ip: Ipv4Addr,
    /// VTEP MAC.
    pub vtep_mac: MacAddr,
    /// tartan version.
    pub version: String,
}

/// A live node's claim on its subnet, from its node record (`/tartan/nodes/<name>`, which
/// exists only while the node's liveness lease does): the lease it really holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveClaim {
    /// The node's name.
    pub node: String,
    /// The subnet the node says it holds.
    pub subnet: Ipv4Network,
    /// The node's VTEP MAC.
    pub vtep_mac: MacAddr,
}
