//! The `/status` document `tartand` serves next to `/metrics` and `tartanctl explain` reads:
//! the node, its subnet, its peers, and every service with its backends and packet counters.

use serde::{Deserialize, Serialize};

/// The `/status` document.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// Node name.
    pub node: String,
    /// Cluster network.
    pub network: Option<String>,
    /// This node's subnet.
    pub subnet: Option<String>,
    /// Whether the subnet is a reservation.
    pub reservation: bool,
    /// Peers the overlay programs.
    pub peers: Vec<PeerStatus>,
    /// This node's IPv6 subnet (dual-stack networks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet6: Option<String>,
    /// IPv6 peers the IPv6 VXLAN device programs (dual-stack networks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers6: Vec<PeerStatus>,
    /// Whether the service table was synced.
    pub services_synced: bool,
    /// Last service sync error.
    pub service_error: Option<String>,
    /// Whether the IPv6 service table was synced (absent: the node has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services_synced6: Option<bool>,
    /// Last IPv6 service table sync error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_error6: Option<String>,
    /// Services with backends and counters.
    pub services: Vec<ServiceReport>,
    /// Elements in the service table.
    pub service_elements: usize,
    /// Load-balancing chains in the service table.
    pub service_chains: usize,
    /// Service, pod and endpoints records skipped as malformed (`key: reason`, capped).
    #[serde(default)]
    pub rejected_records: Vec<String>,
    /// How many records are skipped as malformed in all.
    #[serde(default)]
    pub rejected_total: usize,
    /// The node's cluster DNS (None when off or not started).
    #[serde(default)]
    pub dns: Option<DnsReport>,
}

/// One peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    /// Peer subnet.
    pub subnet: String,
    /// Peer underlay address.
    pub public_ip: String,
    /// Peer VTEP MAC.
    pub vtep_mac: String,
}

/// One service port as programmed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceReport {
    /// `namespace/name`.
    pub id: String,
    /// Cluster IP.
    pub cluster_ip: String,
    /// `port/proto -> targetPort` (and node port) descriptions.
    pub ports: Vec<String>,
    /// Session affinity, traffic policy.
    pub options: Vec<String>,
    /// Backends: address, node, connections sent there (per port, summed).
    pub backends: Vec<BackendReport>,
    /// New connections balanced through the cluster IP (all ports).
    pub connections: u64,
    /// New connections refused because there was no endpoint.
    pub refused: u64,
    /// What of the service was not programmed, and why (a refused cluster IP, node port or
    /// endpoint, an element held by another service).
    #[serde(default)]
    pub problems: Vec<String>,
    /// Whether the service is too big for per-endpoint counters (slot tables above
    /// `proxy::rules::COUNTED_MAX_SLOTS` live in uncounted maps): `connections` is then 0.
    #[serde(default)]
    pub uncounted: bool,
    /// The IPv6 half of a dual-stack service (its IPv6 cluster IP, the pods' IPv6 addresses
    /// and the `ip6` table's counters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Box<ServiceReport>>,
}

/// One backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendReport {
    /// Address.
    pub ip: String,
    /// Node.
    pub node: Option<String>,
    /// Connections sent to it.
    pub connections: u64,
}

/// The node's cluster DNS, in `/status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsReport {
    /// Where it answers (`10.96.0.10:53`).
    pub address: String,
    /// The cluster domain.
    pub domain: String,
    /// Whether every record was read (before that, zone answers are SERVFAIL).
    pub ready: bool,
    /// Owner names in the zone.
    pub names: usize,
    /// Upstream resolvers in use.
    pub upstreams: Vec<String>,
    /// Queries received, by type.
    pub requests: std::collections::BTreeMap<String, u64>,
    /// Responses sent, by rcode.
    pub responses: std::collections::BTreeMap<String, u64>,
    /// Forwarded names answered from the cache / not.
    pub cache_hits: u64,
    /// Forwarded names not in the cache.
    pub cache_misses: u64,
    /// Forwarded queries no upstream answered.
    pub forward_failures: u64,
    /// Queries refused because a limit was reached.
    pub overload: u64,
}

/// `/dns?name=..&type=..`: one name looked up on the node's cluster DNS.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsLookupReport {
    /// The node that answered.
    pub node: String,
    /// The server asked.
    pub server: String,
    /// The name as asked.
    pub name: String,
    /// The type asked.
    pub qtype: String,
    /// Response code.
    pub rcode: String,
    /// Answer records, one per line (`name ttl IN type data`).
    pub answers: Vec<String>,
    /// Authority records (the SOA of a negative answer).
    pub authority: Vec<String>,
    /// Additional records.
    pub additional: Vec<String>,
    /// Where the answer came from: `service`, `endpoint`, `pod`, `server` (zone records),
    /// `forwarded` or `cached` (names outside the zone).
    pub source: Vec<String>,
    /// Whether the UDP answer was truncated (the records then come from TCP).
    pub truncated: bool,
}
