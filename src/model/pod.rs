//! Pod records: what the CNI plugin knows about a pod, registered in etcd by the node's daemon
//! under `/tartan/pods/<node>/<container-id>/<ifname>`, attached to the node's liveness lease.
//! The service proxy selects endpoints from these records.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::model::DecodeError;

/// One pod interface with an address in a node's subnet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    /// The runtime's container ID (`CNI_CONTAINERID`).
    pub container_id: String,
    /// Interface name inside the pod (`CNI_IFNAME`).
    pub ifname: String,
    /// Node the pod runs on.
    pub node: String,
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// Pod namespace (`K8S_POD_NAMESPACE`, else "default").
    pub namespace: String,
    /// Pod name (`K8S_POD_NAME`, else the container ID).
    pub name: String,
    /// Labels (CNI `args.cni.labels` / `runtimeConfig`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The pod's IPv6 address, on dual-stack networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
}

impl PodRecord {
    /// Decodes a record; garbage yields an error for the caller to log and skip.
    pub fn parse(bytes: &[u8]) -> Result<PodRecord, DecodeError> {
        crate::util::json_decode::from_slice(bytes)
            .map_err(|e| DecodeError::json("pod record is not valid", e))
    }

    /// Encodes a record.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let r = PodRecord {
            ip6: None,
            container_id: "abc".into(),
            ifname: "eth0".into(),
            node: "n1".into(),
            ip: Ipv4Addr::new(10, 244, 1, 5),
            namespace: "default".into(),
            name: "web-1".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
        };
        assert_eq!(PodRecord::parse(&r.to_bytes()).unwrap(), r);
        assert!(
            String::from_utf8(r.to_bytes())
                .unwrap()
                .contains("\"containerId\":\"abc\"")
        );
        assert!(PodRecord::parse(b"{}").is_err());
        assert!(
            !String::from_utf8(r.to_bytes()).unwrap().contains("ip6"),
            "an IPv4-only record stays as it was"
        );
        let dual = PodRecord {
            ip6: Some("fd00:10:244:1::5".parse().unwrap()),
            ..r
        };
        assert_eq!(PodRecord::parse(&dual.to_bytes()).unwrap(), dual);
        let bad = String::from_utf8(dual.to_bytes())
            .unwrap()
            .replace("fd00:10:244:1::5", "10.244.1.5");
        assert!(
            PodRecord::parse(bad.as_bytes()).is_err(),
            "ip6 must be IPv6"
        );
    }
}

#[cfg(test)]
mod proptests;
