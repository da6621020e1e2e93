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
    /// Whether the service table was synced.
    pub services_synced: bool,
    /// Last service sync error.
    pub service_error: Option<String>,
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
