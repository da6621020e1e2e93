//! Services and explicit endpoints as stored in etcd (`/tartan/services/<ns>/<name>`,
//! `/tartan/endpoints/<ns>/<name>`), with validation, and the selection of backends from pod
//! records. Pure: no I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::pod_record::PodRecord;

/// Transport protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(format!("protocol {s:?} is not tcp or udp")),
        }
    }
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Optional port name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The port on the cluster IP.
    pub port: u16,
    /// The port on the endpoints.
    pub target_port: u16,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Node port, when the service is exposed on every node's addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
}

impl FromStr for ServicePort {
    type Err = String;
    /// Parses `[NAME=]PORT[:TARGET][/PROTO]`, e.g. `http=80:8080/tcp`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, rest) = match s.split_once('=') {
            Some((n, r)) => (Some(n.to_string()), r),
            None => (None, s),
        };
        let (ports, proto) = match rest.split_once('/') {
            Some((p, pr)) => (p, pr.parse()?),
            None => (rest, Protocol::Tcp),
        };
        let (port, target) = match ports.split_once(':') {
            Some((p, t)) => (p, Some(t)),
            None => (ports, None),
        };
        let parse_port = |v: &str| -> Result<u16, String> {
            match v.parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(format!("{v:?} in {s:?} is not a port 1-65535")),
            }
        };
        let port = parse_port(port)?;
        let target_port = match target {
            Some(t) => parse_port(t)?,
            None => port,
        };
        if let Some(n) = &name
            && !valid_name(n)
        {
            return Err(format!(
                "port name {n:?} must be lowercase letters, digits and '-'"
            ));
        }
        Ok(ServicePort {
            name,
            port,
            target_port,
            protocol: proto,
            node_port: None,
        })
    }
}

/// Which endpoints node-port traffic may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrafficPolicy {
    /// Every endpoint in the cluster; the client address is masqueraded.
    #[default]
    Cluster,
    /// Only endpoints on the receiving node; the client address is kept.
    Local,
}

/// Session affinity settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SessionAffinity {
    /// Every new connection is balanced independently.
    #[default]
    None,
    /// A client IP sticks to one endpoint.
    ClientIp,
}

/// Default client-IP affinity timeout (kube-proxy's: 3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

/// A service as stored in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The virtual IP.
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Ipv4Addr,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// Label selector over pods in the same namespace; `None` for explicit endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// Session affinity.
    #[serde(default)]
    pub session_affinity: SessionAffinity,
    /// Affinity timeout in seconds.
    #[serde(default = "default_timeout")]
    pub session_affinity_timeout: u32,
    /// Node-port traffic policy.
    #[serde(default)]
    pub external_traffic_policy: TrafficPolicy,
}

fn default_timeout() -> u32 {
    DEFAULT_AFFINITY_TIMEOUT
}

/// Whether `s` is a DNS-label-like name (lowercase alphanumerics and '-', 1..63).
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl Service {
    /// Decodes and validates a service record.
    pub fn parse(bytes: &[u8]) -> Result<Service, String> {
        let s: Service = crate::json_decode::from_slice(bytes)
            .map_err(|e| format!("service does not decode: {e}"))?;
        s.validate()?;
        Ok(s)
    }

    /// Checks the invariants a well-formed service holds.
    pub fn validate(&self) -> Result<(), String> {
        if !valid_name(&self.namespace) {
            return Err(format!(
                "namespace {:?} is not a valid name",
                self.namespace
            ));
        }
        if !valid_name(&self.name) {
            return Err(format!("name {:?} is not a valid name", self.name));
        }
        if self.ports.is_empty() {
            return Err("ports: a service needs at least one port".into());
        }
        let mut seen = std::collections::HashSet::new();
        for p in &self.ports {
            if p.port == 0 || p.target_port == 0 {
                return Err("ports: port and targetPort must be 1-65535".into());
            }
            if !seen.insert((p.port, p.protocol)) {
                return Err(format!(
                    "ports: port {}/{} is listed twice",
                    p.port, p.protocol
                ));
            }
            if let Some(np) = p.node_port
                && !(NODE_PORT_MIN..=NODE_PORT_MAX).contains(&np)
            {
                return Err(format!(
                    "ports: nodePort {np} is outside {NODE_PORT_MIN}-{NODE_PORT_MAX}"
                ));
            }
        }
        if let Some(sel) = &self.selector
            && sel.is_empty()
        {
            return Err(
                "selector: an empty selector would select every pod; omit it for explicit endpoints"
                    .into(),
            );
        }
        if self.session_affinity_timeout == 0 || self.session_affinity_timeout > 86400 {
            return Err("sessionAffinityTimeout must be 1-86400 seconds".into());
        }
        Ok(())
    }

    /// Encodes to JSON.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Whether the pod is selected by this service.
    pub fn selects(&self, pod: &PodRecord) -> bool {
        match &self.selector {
            None => false,
            Some(sel) => {
                pod.namespace == self.namespace
                    && sel.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
            }
        }
    }

    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Lowest node port.
pub const NODE_PORT_MIN: u16 = 30000;
/// Highest node port.
pub const NODE_PORT_MAX: u16 = 32767;

/// Explicit endpoints of a selector-less service.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExplicitEndpoints {
    /// The backend addresses.
    pub addresses: Vec<EndpointAddress>,
}

/// One explicit endpoint address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointAddress {
    /// Address.
    pub ip: Ipv4Addr,
    /// Node the address lives on, if known (for the `local` traffic policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl ExplicitEndpoints {
    /// Decodes an endpoints record.
    pub fn parse(bytes: &[u8]) -> Result<ExplicitEndpoints, String> {
        crate::json_decode::from_slice(bytes)
            .map_err(|e| format!("endpoints record is not valid: {e}"))
    }
}

/// One backend of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Address.
    pub ip: Ipv4Addr,
    /// Node, if known (shared: node names repeat across thousands of backends).
    pub node: Option<std::sync::Arc<str>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, labels: &[(&str, &str)]) -> PodRecord {
        PodRecord {
            container_id: "c".into(),
            ifname: "eth0".into(),
            node: "n1".into(),
            ip: Ipv4Addr::new(10, 244, 1, 2),
            namespace: ns.into(),
            name: "p".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn svc() -> Service {
        Service {
            namespace: "default".into(),
            name: "web".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            ports: vec!["http=80:8080/tcp".parse().unwrap()],
            selector: Some([("app".to_string(), "web".to_string())].into()),
            session_affinity: SessionAffinity::None,
            session_affinity_timeout: DEFAULT_AFFINITY_TIMEOUT,
            external_traffic_policy: TrafficPolicy::Cluster,
        }
    }

    #[test]
    fn port_syntax() {
        let p: ServicePort = "dns=53:5353/udp".parse().unwrap();
        assert_eq!(p.name.as_deref(), Some("dns"));
        assert_eq!(
            (p.port, p.target_port, p.protocol),
            (53, 5353, Protocol::Udp)
        );
        let p: ServicePort = "80".parse().unwrap();
        assert_eq!((p.port, p.target_port, p.protocol), (80, 80, Protocol::Tcp));
        for bad in ["0", "70000", "80:x", "80/sctp", "Bad=80", "", ":80"] {
            assert!(bad.parse::<ServicePort>().is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn selection_is_per_namespace_and_all_labels() {
        let s = svc();
        assert!(s.selects(&pod("default", &[("app", "web"), ("tier", "x")])));
        assert!(!s.selects(&pod("other", &[("app", "web")])));
        assert!(!s.selects(&pod("default", &[("app", "db")])));
        let mut explicit = svc();
        explicit.selector = None;
        assert!(!explicit.selects(&pod("default", &[("app", "web")])));
    }

    #[test]
    fn validation() {
        assert!(svc().validate().is_ok());
        let mut s = svc();
        s.ports.push(s.ports[0].clone());
        assert!(s.validate().is_err());
        let mut s = svc();
        s.ports[0].node_port = Some(80);
        assert!(s.validate().is_err());
        let mut s = svc();
        s.selector = Some(BTreeMap::new());
        assert!(s.validate().is_err());
        let mut s = svc();
        s.name = "Web".into();
        assert!(s.validate().is_err());
        assert!(Service::parse(b"{not json").is_err());
        assert!(Service::parse(br#"{"namespace":"a"}"#).is_err());
    }

    #[test]
    fn json_roundtrip() {
        let s = svc();
        let back = Service::parse(&s.to_bytes()).unwrap();
        assert_eq!(s, back);
        let text = String::from_utf8(s.to_bytes()).unwrap();
        assert!(text.contains("\"clusterIP\":\"10.96.0.10\""), "{text}");
        assert!(text.contains("\"targetPort\":8080"), "{text}");
    }
}

#[cfg(test)]
mod proptests;
