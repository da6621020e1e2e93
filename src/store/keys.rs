//! Every etcd key and prefix tartan reads or writes, in one place. flannel's keys live under
//! `--etcd-prefix` (`/coreos.com/network`: `config`, `subnets/<a-b-c-d-len>`); tartan's own
//! under `--tartan-prefix` (`/tartan`: nodes, pods, services, endpoints, allocations, leave
//! requests, ingress routes and certificates).

use std::net::IpAddr;

use crate::model::pod::PodRecord;
use crate::model::service::Protocol;
use crate::model::subnet_lease::SubnetKey;
use crate::store::etcd::EtcdArgs;

impl EtcdArgs {
    /// The flannel config key.
    pub fn config_key(&self) -> String {
        format!("{}/config", self.etcd_prefix.trim_end_matches('/'))
    }

    /// The prefix under which subnet keys live, with a trailing slash.
    pub fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.etcd_prefix.trim_end_matches('/'))
    }

    /// A key under tartan's own prefix.
    pub fn tartan_key(&self, rest: &str) -> String {
        format!("{}/{}", self.tartan_prefix.trim_end_matches('/'), rest)
    }
}

/// The key of a lease naming `key`'s subnets (flannel's format: `10.244.3.0-24`, or
/// dual-stack `10.244.3.0-24&fd00:10:244:3::-64`).
pub fn subnet_key(keys: &EtcdArgs, key: SubnetKey) -> String {
    format!("{}{key}", keys.subnets_prefix())
}

/// The prefix of every node record.
pub fn nodes_prefix(keys: &EtcdArgs) -> String {
    keys.tartan_key("nodes/")
}

/// The key of a node record.
pub fn node_key(keys: &EtcdArgs, name: &str) -> String {
    keys.tartan_key(&format!("nodes/{name}"))
}

/// The key an operator writes to ask a node to leave.
pub fn leave_key(keys: &EtcdArgs, node: &str) -> String {
    keys.tartan_key(&format!("leave/{node}"))
}

/// The prefix under which all pod records live, with a trailing slash.
pub fn pods_prefix(keys: &EtcdArgs) -> String {
    keys.tartan_key("pods/")
}

/// The prefix of one node's pod records, with a trailing slash.
pub fn node_pods_prefix(keys: &EtcdArgs, node: &str) -> String {
    keys.tartan_key(&format!("pods/{node}/"))
}

/// The key of a pod record.
pub fn pod_key(keys: &EtcdArgs, rec: &PodRecord) -> String {
    keys.tartan_key(&format!(
        "pods/{}/{}/{}",
        rec.node, rec.container_id, rec.ifname
    ))
}

/// The etcd prefix of service objects.
pub fn services_prefix(keys: &EtcdArgs) -> String {
    keys.tartan_key("services/")
}

/// The key of a service.
pub fn service_key(keys: &EtcdArgs, namespace: &str, name: &str) -> String {
    format!("{}{namespace}/{name}", services_prefix(keys))
}

/// The etcd prefix of explicit endpoints.
pub fn endpoints_prefix(keys: &EtcdArgs) -> String {
    keys.tartan_key("endpoints/")
}

/// The key of explicit endpoints.
pub fn endpoints_key(keys: &EtcdArgs, namespace: &str, name: &str) -> String {
    format!("{}{namespace}/{name}", endpoints_prefix(keys))
}

/// The prefix of every allocation record (cluster IPs, node ports).
pub fn alloc_prefix(keys: &EtcdArgs) -> String {
    keys.tartan_key("alloc/")
}

/// The allocation record of a cluster IP.
pub fn cluster_ip_alloc_key(keys: &EtcdArgs, ip: impl Into<IpAddr>) -> String {
    let ip: IpAddr = ip.into();
    keys.tartan_key(&format!("alloc/clusterip/{ip}"))
}

/// The allocation record of a node port.
pub fn node_port_alloc_key(keys: &EtcdArgs, proto: Protocol, port: u16) -> String {
    keys.tartan_key(&format!("alloc/nodeport/{proto}/{port}"))
}

/// The etcd prefix of ingress routes.
pub fn ingress_routes_prefix(keys: &EtcdArgs) -> String {
    keys.tartan_key("ingress/routes/")
}

/// The key of an ingress route.
pub fn ingress_route_key(keys: &EtcdArgs, name: &str) -> String {
    format!("{}{name}", ingress_routes_prefix(keys))
}

/// The etcd prefix of ingress TLS certificates.
pub fn ingress_certs_prefix(keys: &EtcdArgs) -> String {
    keys.tartan_key("ingress/certs/")
}

/// The key of an ingress TLS certificate.
pub fn ingress_cert_key(keys: &EtcdArgs, name: &str) -> String {
    format!("{}{name}", ingress_certs_prefix(keys))
}
