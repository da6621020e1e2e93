//! Services and explicit endpoints as stored in etcd (`/tartan/services/<ns>/<name>`,
//! `/tartan/endpoints/<ns>/<name>`), with validation, and the selection of backends from pod
//! records. Pure: no I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::str::FromStr;

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};

use crate::model::DecodeError;
use crate::model::pod::PodRecord;

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
    type Err = DecodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(DecodeError::value(
                "protocol",
                format!("{s:?}"),
                "is not tcp or udp",
            )),
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
    type Err = DecodeError;
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
        let parse_port = |field: &str, v: &str| -> Result<u16, DecodeError> {
            match v.parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(DecodeError::value(
                    field,
                    format!("{v:?} in {s:?}"),
                    "is not a port 1-65535",
                )),
            }
        };
        let port = parse_port("port", port)?;
        let target_port = match target {
            Some(t) => parse_port("target port", t)?,
            None => port,
        };
        if let Some(n) = &name
            && !valid_name(n)
        {
            return Err(DecodeError::value(
                "port name",
                format!("{n:?}"),
                "must be lowercase letters, digits and '-'",
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

/// An IP family, as Kubernetes names it in `ipFamilies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum IpFamily {
    /// IPv4.
    IPv4,
    /// IPv6.
    IPv6,
}

impl IpFamily {
    /// The family of `ip`.
    pub fn of(ip: IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::IPv4,
            IpAddr::V6(_) => IpFamily::IPv6,
        }
    }
}

/// Which families a service has cluster IPs of (Kubernetes' `ipFamilyPolicy`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, clap::ValueEnum,
)]
pub enum IpFamilyPolicy {
    /// One family: IPv4.
    #[default]
    #[value(name = "SingleStack", alias = "single-stack")]
    SingleStack,
    /// Both families when the cluster has an IPv6 service range, else IPv4 alone.
    #[value(name = "PreferDualStack", alias = "prefer-dual-stack")]
    PreferDualStack,
    /// Both families, or the service is refused.
    #[value(name = "RequireDualStack", alias = "require-dual-stack")]
    RequireDualStack,
}

impl IpFamilyPolicy {
    fn is_single_stack(&self) -> bool {
        *self == IpFamilyPolicy::SingleStack
    }
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
    /// The virtual IP; [`HEADLESS`] (stored as `"None"`, as Kubernetes does) for a headless
    /// service, which has no virtual IP and whose name resolves to its endpoints.
    #[serde(rename = "clusterIP", with = "cluster_ip_format")]
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
    /// Kubernetes' `clusterIPs`: empty (records from before dual-stack, headless services)
    /// or `clusterIP` first, then the IPv6 cluster IP of a dual-stack service.
    #[serde(rename = "clusterIPs", default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_ips: Vec<IpAddr>,
    /// Kubernetes' `ipFamilies`: the families of `clusterIPs` in order (empty: IPv4); for a
    /// headless service, the families its name answers with (empty: IPv4 alone, unless the
    /// policy is dual-stack).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_families: Vec<IpFamily>,
    /// Kubernetes' `ipFamilyPolicy`.
    #[serde(default, skip_serializing_if = "IpFamilyPolicy::is_single_stack")]
    pub ip_family_policy: IpFamilyPolicy,
}

/// The `cluster_ip` of a headless service (stored as `"None"`).
pub const HEADLESS: Ipv4Addr = Ipv4Addr::UNSPECIFIED;

/// `clusterIP` as Kubernetes writes it: an address, or `"None"` for a headless service.
mod cluster_ip_format {
    use std::net::Ipv4Addr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ip: &Ipv4Addr, s: S) -> Result<S::Ok, S::Error> {
        if *ip == super::HEADLESS {
            s.serialize_str("None")
        } else {
            s.collect_str(ip)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Ipv4Addr, D::Error> {
        let v = String::deserialize(d)?;
        if v == "None" {
            return Ok(super::HEADLESS);
        }
        match v.parse::<Ipv4Addr>() {
            Ok(ip) if ip != super::HEADLESS => Ok(ip),
            _ => Err(serde::de::Error::custom(format!(
                "{v:?} is neither an IPv4 address nor \"None\" (headless)"
            ))),
        }
    }
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
    pub fn parse(bytes: &[u8]) -> Result<Service, DecodeError> {
        let s: Service = crate::util::json_decode::from_slice(bytes)
            .map_err(|e| DecodeError::json("service does not decode", e))?;
        s.validate()?;
        Ok(s)
    }

    /// Checks the invariants a well-formed service holds.
    pub fn validate(&self) -> Result<(), DecodeError> {
        let not_a_name = |field: &str, v: &str| {
            DecodeError::value(field, format!("{v:?}"), "is not a valid name")
        };
        if !valid_name(&self.namespace) {
            return Err(not_a_name("namespace", &self.namespace));
        }
        if !valid_name(&self.name) {
            return Err(not_a_name("name", &self.name));
        }
        if self.ports.is_empty() {
            return Err(DecodeError::invalid(
                "ports",
                "a service needs at least one port",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            if self.is_headless() && p.node_port.is_some() {
                return Err(DecodeError::invalid(
                    format!("ports[{i}].nodePort"),
                    "a headless service has no node ports",
                ));
            }
            for (field, v) in [("port", p.port), ("targetPort", p.target_port)] {
                if v == 0 {
                    return Err(DecodeError::out_of_range(
                        format!("ports[{i}].{field}"),
                        0,
                        1,
                        65535,
                    ));
                }
            }
            if !seen.insert((p.port, p.protocol)) {
                return Err(DecodeError::invalid(
                    "ports",
                    format!("port {}/{} is listed twice", p.port, p.protocol),
                ));
            }
            if let Some(np) = p.node_port
                && !(NODE_PORT_MIN..=NODE_PORT_MAX).contains(&np)
            {
                return Err(DecodeError::out_of_range(
                    format!("ports[{i}].nodePort"),
                    np.into(),
                    NODE_PORT_MIN.into(),
                    NODE_PORT_MAX.into(),
                ));
            }
        }
        if let Some(sel) = &self.selector {
            if sel.is_empty() {
                return Err(DecodeError::invalid(
                    "selector",
                    "an empty selector would select every pod; omit it for explicit endpoints",
                ));
            }
            for (k, v) in sel {
                check_label_key(k).map_err(|e| DecodeError::invalid("selector", e))?;
                check_label_value(v).map_err(|e| DecodeError::invalid("selector", e))?;
            }
        }
        self.validate_families()?;
        let t = self.session_affinity_timeout;
        if t == 0 || t > 86400 {
            return Err(DecodeError::OutOfRange {
                field: "sessionAffinityTimeout".into(),
                value: t.into(),
                min: 1,
                max: 86400,
                unit: " seconds",
            });
        }
        Ok(())
    }

    /// `clusterIPs`, `ipFamilies` and `ipFamilyPolicy` agree with each other and with
    /// `clusterIP`, as Kubernetes requires; IPv6-primary services (IPv6 first) are refused,
    /// with the reason, since `clusterIP` is IPv4 here.
    fn validate_families(&self) -> Result<(), DecodeError> {
        let bad = |field: &str, why: String| Err(DecodeError::invalid(field, why));
        let fams = &self.ip_families;
        if fams.len() > 2 || (fams.len() == 2 && fams[0] == fams[1]) {
            return bad(
                "ipFamilies",
                format!("{fams:?} must name each family at most once"),
            );
        }
        if fams.first() == Some(&IpFamily::IPv6) {
            return bad(
                "ipFamilies",
                "IPv6-primary services are not supported: the first family is IPv4 (clusterIP)"
                    .into(),
            );
        }
        if self.is_headless() {
            if self.ip_family_policy == IpFamilyPolicy::SingleStack && fams.len() == 2 {
                return bad(
                    "ipFamilyPolicy",
                    "SingleStack with two ipFamilies (use PreferDualStack or RequireDualStack)"
                        .into(),
                );
            }
            if !self.cluster_ips.is_empty() {
                return bad("clusterIPs", "a headless service has no cluster IPs".into());
            }
            return Ok(());
        }
        let ips = &self.cluster_ips;
        if !ips.is_empty() {
            if ips[0] != IpAddr::V4(self.cluster_ip) {
                return bad(
                    "clusterIPs",
                    format!("the first must be clusterIP {}", self.cluster_ip),
                );
            }
            match ips.get(1) {
                Some(IpAddr::V4(a)) => {
                    return bad("clusterIPs", format!("{a}: the second must be IPv6"));
                }
                Some(IpAddr::V6(a))
                    if a.is_unspecified() || a.is_loopback() || a.is_multicast() =>
                {
                    return bad("clusterIPs", format!("{a} cannot be a cluster IP"));
                }
                _ => {}
            }
            if ips.len() > 2 {
                return bad("clusterIPs", "at most one address per family".into());
            }
        }
        let have: Vec<IpFamily> = self.cluster_ips().map(IpFamily::of).collect();
        if !fams.is_empty() && *fams != have {
            return bad(
                "ipFamilies",
                format!("{fams:?} do not match the families of clusterIPs {have:?}"),
            );
        }
        match (self.ip_family_policy, have.len()) {
            (IpFamilyPolicy::SingleStack, 2) => bad(
                "ipFamilyPolicy",
                "SingleStack with two cluster IPs (use PreferDualStack or RequireDualStack)".into(),
            ),
            (IpFamilyPolicy::RequireDualStack, 1) => bad(
                "ipFamilyPolicy",
                "RequireDualStack with only an IPv4 cluster IP".into(),
            ),
            _ => Ok(()),
        }
    }

    /// Every cluster IP, IPv4 first (none for a headless service).
    pub fn cluster_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let v4 = (!self.is_headless()).then_some(IpAddr::V4(self.cluster_ip));
        v4.into_iter().chain(self.cluster_ip6().map(IpAddr::V6))
    }

    /// The IPv6 cluster IP of a dual-stack service.
    pub fn cluster_ip6(&self) -> Option<Ipv6Addr> {
        self.cluster_ips.iter().find_map(|ip| match ip {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        })
    }

    /// The cluster IP of `family`, if the service has one.
    pub fn cluster_ip_of(&self, family: IpFamily) -> Option<IpAddr> {
        self.cluster_ips().find(|ip| IpFamily::of(*ip) == family)
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

    /// Whether the service is headless (no cluster IP; its name resolves to its endpoints).
    pub fn is_headless(&self) -> bool {
        self.cluster_ip == HEADLESS
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
    pub fn parse(bytes: &[u8]) -> Result<ExplicitEndpoints, DecodeError> {
        crate::util::json_decode::from_slice(bytes)
            .map_err(|e| DecodeError::json("endpoints record is not valid", e))
    }
}

fn label_name_problem(s: &str) -> Option<&'static str> {
    let b = s.as_bytes();
    if b.len() > 63 {
        return Some("is longer than 63 characters");
    }
    let inner_ok = b
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if !inner_ok {
        return Some("may hold only letters, digits, '-', '_' and '.'");
    }
    match (b.first(), b.last()) {
        (Some(f), Some(l)) if !f.is_ascii_alphanumeric() || !l.is_ascii_alphanumeric() => {
            Some("must begin and end with a letter or digit")
        }
        _ => None,
    }
}

/// Checks a label key as Kubernetes does: `[PREFIX/]NAME`, NAME 1-63 characters of letters,
/// digits, '-', '_', '.' (alphanumeric at both ends), PREFIX a DNS subdomain of at most 253.
pub fn check_label_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if name.is_empty() {
        return Err(format!("label key {k:?} has an empty name"));
    }
    if let Some(why) = label_name_problem(name) {
        return Err(format!("label key {k:?}: the name {why}"));
    }
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                valid_name(l) // lowercase alphanumerics and '-', alphanumeric at both ends
            });
        if !ok {
            return Err(format!(
                "label key {k:?}: the prefix must be a lowercase DNS subdomain of at most 253 characters"
            ));
        }
    }
    Ok(())
}

/// Checks a label value as Kubernetes does: empty, or 1-63 characters of letters, digits,
/// '-', '_', '.' with a letter or digit at both ends.
pub fn check_label_value(v: &str) -> Result<(), String> {
    match label_name_problem(v) {
        Some(why) if !v.is_empty() => Err(format!("label value {v:?} {why}")),
        _ => Ok(()),
    }
}

/// Parses a selector `key=value[,key=value]` in Kubernetes label syntax; the error names
/// the offending part (an empty term, a missing or second '=', a bad key or value, a key
/// given twice).
pub fn parse_selector(s: &str) -> Result<BTreeMap<String, String>, String> {
    if s.is_empty() {
        return Err("empty selector: give key=value (or omit it for explicit endpoints)".into());
    }
    let mut out = BTreeMap::new();
    for (i, part) in s.split(',').enumerate() {
        if part.is_empty() {
            return Err(format!("term {} of {s:?} is empty (stray ',')", i + 1));
        }
        let Some((k, v)) = part.split_once('=') else {
            return Err(format!("{part:?} is not key=value"));
        };
        if v.contains('=') {
            return Err(format!("{part:?} has more than one '='"));
        }
        check_label_key(k).map_err(|e| format!("{part:?}: {e}"))?;
        check_label_value(v).map_err(|e| format!("{part:?}: {e}"))?;
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("key {k:?} is given twice"));
        }
    }
    Ok(out)
}

/// What an address is when it may never be a service's address or endpoint: unspecified,
/// "this network" (0/8), loopback, multicast, reserved (240/4) or broadcast.
pub fn special_address(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_unspecified() {
        Some("the unspecified address")
    } else if o[0] == 0 {
        Some("in 0.0.0.0/8 (\"this network\")")
    } else if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip.is_broadcast() {
        Some("the broadcast address")
    } else if o[0] >= 240 {
        Some("a reserved address (240.0.0.0/4)")
    } else {
        None
    }
}

/// Ranges no service CIDR or cluster network may overlap, with their names.
const FORBIDDEN_RANGES: [(&str, [u8; 4], u8); 5] = [
    ("\"this network\" 0.0.0.0/8", [0, 0, 0, 0], 8),
    ("loopback 127.0.0.0/8", [127, 0, 0, 0], 8),
    ("link-local 169.254.0.0/16", [169, 254, 0, 0], 16),
    ("multicast 224.0.0.0/4", [224, 0, 0, 0], 4),
    ("reserved 240.0.0.0/4", [240, 0, 0, 0], 4),
];

fn forbidden_range_overlap(net: Ipv4Network) -> Option<String> {
    if net.prefix() == 0 {
        return Some(format!(
            "{net} covers every address (the underlay, loopback and etcd included)"
        ));
    }
    FORBIDDEN_RANGES.iter().find_map(|(name, ip, len)| {
        let r = Ipv4Network::new(Ipv4Addr::from(*ip), *len).ok()?;
        r.overlaps(net).then(|| format!("{net} overlaps {name}"))
    })
}

/// What a range that services or pods take over must leave alone: the underlay networks
/// (the node's interface networks, or node addresses as /32), the etcd endpoints, and the
/// other of the two ranges (service CIDR vs cluster network).
#[derive(Debug, Clone, Default)]
pub struct RangeContext {
    /// Underlay networks or node addresses.
    pub underlay: Vec<Ipv4Network>,
    /// etcd endpoint addresses.
    pub etcd: Vec<Ipv4Addr>,
}

impl RangeContext {
    fn conflicts(&self, net: Ipv4Network) -> Option<String> {
        if let Some(p) = forbidden_range_overlap(net) {
            return Some(p);
        }
        if let Some(u) = self.underlay.iter().find(|u| u.overlaps(net)) {
            return Some(if u.prefix() == 32 {
                format!("{net} contains the node address {}", u.ip())
            } else {
                format!("{net} overlaps the underlay network {u}")
            });
        }
        if let Some(e) = self.etcd.iter().find(|e| net.contains(**e)) {
            return Some(format!("{net} contains the etcd endpoint {e}"));
        }
        None
    }
}

/// Checks a service CIDR (tartand's and tartanctl's `--service-cidr`): it must not overlap
/// the cluster network, the underlay, loopback, link-local, multicast, or hold an etcd
/// endpoint, and must leave room for cluster IPs. The error names the overlap.
pub fn check_service_cidr(
    cidr: Ipv4Network,
    cluster_network: Option<Ipv4Network>,
    ctx: &RangeContext,
) -> Result<(), String> {
    let fail = |why: String| Err(format!("service CIDR {cidr}: {why}"));
    if let Some(p) = ctx.conflicts(cidr) {
        return fail(p);
    }
    if let Some(n) = cluster_network
        && n.overlaps(cidr)
    {
        return fail(format!("overlaps the cluster network {n}"));
    }
    if cidr.prefix() > 30 {
        return fail("is too small: cluster IPs need at least a /30".into());
    }
    Ok(())
}

/// `--service-cidr`: the IPv4 service range and, for dual-stack services, an IPv6 one, comma
/// separated in either order (Kubernetes' `--service-cluster-ip-range`,
/// `10.96.0.0/12,fd00:96::/108`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceCidrs {
    /// The IPv4 range (cluster IPs of every service).
    pub v4: Ipv4Network,
    /// The IPv6 range (the second cluster IP of dual-stack services), if any.
    pub v6: Option<Ipv6Network>,
}

impl FromStr for ServiceCidrs {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut v4 = None;
        let mut v6 = None;
        for part in s.split(',') {
            let net: ipnetwork::IpNetwork = part
                .trim()
                .parse()
                .map_err(|_| format!("{part:?} is not a CIDR (10.96.0.0/12, fd00:96::/108)"))?;
            let twice = match net {
                ipnetwork::IpNetwork::V4(n) => v4.replace(n).is_some(),
                ipnetwork::IpNetwork::V6(n) => v6.replace(n).is_some(),
            };
            if twice {
                return Err(format!(
                    "{s:?} gives two ranges of one family (one per family)"
                ));
            }
        }
        let v4 = v4.ok_or_else(|| {
            format!("{s:?} has no IPv4 range (IPv6-only services are not supported yet)")
        })?;
        Ok(ServiceCidrs { v4, v6 })
    }
}

impl fmt::Display for ServiceCidrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.v4)?;
        if let Some(v6) = self.v6 {
            write!(f, ",{v6}")?;
        }
        Ok(())
    }
}

/// Checks an IPv6 service range: not loopback, link-local, multicast, IPv4-mapped or
/// IPv4-compatible space, not overlapping the IPv6 pod network or the underlay (the node's
/// IPv6 networks, or node addresses as /128), between /64 and /120. The error names the
/// problem.
pub fn check_service_cidr6(
    cidr: Ipv6Network,
    cluster_network6: Option<Ipv6Network>,
    underlay6: &[Ipv6Network],
) -> Result<(), String> {
    let fail = |why: String| Err(format!("IPv6 service CIDR {cidr}: {why}"));
    if let Some(u) = underlay6.iter().find(|u| u.overlaps(cidr)) {
        return fail(if u.prefix() == 128 {
            format!("contains the node address {}", u.ip())
        } else {
            format!("overlaps the underlay network {u}")
        });
    }
    let forbidden: [(&str, Ipv6Network); 5] = [
        (
            "IPv4-mapped ::ffff:0:0/96",
            Ipv6Network::new(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96)
                .unwrap_or_else(|_| Ipv6Network::from(Ipv6Addr::LOCALHOST)),
        ),
        (
            "IPv4-compatible ::/96",
            Ipv6Network::new(Ipv6Addr::UNSPECIFIED, 96)
                .unwrap_or_else(|_| Ipv6Network::from(Ipv6Addr::LOCALHOST)),
        ),
        ("loopback ::1/128", Ipv6Network::from(Ipv6Addr::LOCALHOST)),
        (
            "link-local fe80::/10",
            Ipv6Network::new(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10)
                .unwrap_or_else(|_| Ipv6Network::from(Ipv6Addr::LOCALHOST)),
        ),
        (
            "multicast ff00::/8",
            Ipv6Network::new(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8)
                .unwrap_or_else(|_| Ipv6Network::from(Ipv6Addr::LOCALHOST)),
        ),
    ];
    if let Some((name, _)) = forbidden.iter().find(|(_, n)| n.overlaps(cidr)) {
        return fail(format!("overlaps {name}"));
    }
    if let Some(n) = cluster_network6
        && n.overlaps(cidr)
    {
        return fail(format!("overlaps the IPv6 cluster network {n}"));
    }
    if cidr.prefix() < 64 {
        return fail("is too large: at most a /64".into());
    }
    if cidr.prefix() > 120 {
        return fail("is too small: cluster IPs need at least a /120".into());
    }
    Ok(())
}

/// Checks a cluster (pod) network (`tartanctl network init --network`): it must not overlap
/// the service CIDR, loopback, link-local, multicast, the whole address space, or hold an
/// etcd endpoint or node address. The error names the overlap.
pub fn check_cluster_network(
    network: Ipv4Network,
    service_cidr: Option<Ipv4Network>,
    ctx: &RangeContext,
) -> Result<(), String> {
    let fail = |why: String| Err(format!("network {network}: {why}"));
    if let Some(p) = ctx.conflicts(network) {
        return fail(p);
    }
    if let Some(s) = service_cidr
        && s.overlaps(network)
    {
        return fail(format!("overlaps the service CIDR {s}"));
    }
    Ok(())
}

/// The cluster DNS address of a service CIDR: its 10th address (10.96.0.10 in 10.96.0.0/12),
/// as Kubernetes places kube-dns; never given to a service. None for ranges of fewer than 16.
pub fn cluster_dns_ip(service_cidr: Ipv4Network) -> Option<Ipv4Addr> {
    (service_cidr.prefix() <= 28).then(|| Ipv4Addr::from(u32::from(service_cidr.network()) + 10))
}

/// The one place that decides which addresses and ports a service may use, shared by
/// `tartanctl` (refuses them up front) and `tartand` (skips and reports them).
#[derive(Debug, Clone)]
pub struct AddressGuard {
    /// Range cluster IPs must come from.
    pub service_cidr: Ipv4Network,
    /// Range the IPv6 cluster IPs of dual-stack services must come from (none: no service
    /// may have one).
    pub service_cidr6: Option<Ipv6Network>,
    /// The pod network, when known.
    pub cluster_network: Option<Ipv4Network>,
    /// Node addresses (tartand: its own; tartanctl: every node's public IP).
    pub node_ips: Vec<Ipv4Addr>,
    /// etcd endpoints.
    pub etcd: Vec<SocketAddrV4>,
}

impl AddressGuard {
    /// A guard knowing only the service CIDR.
    pub fn new(service_cidr: Ipv4Network) -> Self {
        AddressGuard {
            service_cidr,
            service_cidr6: None,
            cluster_network: None,
            node_ips: Vec::new(),
            etcd: Vec::new(),
        }
    }

    fn common_problem(&self, ip: Ipv4Addr) -> Option<String> {
        if let Some(k) = special_address(ip) {
            return Some(format!("{ip} is {k}"));
        }
        if self.node_ips.contains(&ip) {
            return Some(format!("{ip} is a node's own address"));
        }
        if self.etcd.iter().any(|e| *e.ip() == ip) {
            return Some(format!("{ip} is an etcd endpoint"));
        }
        None
    }

    /// Why `ip` cannot be a cluster IP, if it cannot: outside the service CIDR, its network
    /// or broadcast address, or any address [`AddressGuard::endpoint`] refuses.
    pub fn cluster_ip(&self, ip: Ipv4Addr) -> Result<(), String> {
        if let Some(p) = self.common_problem(ip) {
            return Err(format!("cluster IP {p}"));
        }
        let c = self.service_cidr;
        if !c.contains(ip) {
            return Err(format!("cluster IP {ip} is outside the service CIDR {c}"));
        }
        if c.prefix() <= 30 && (ip == c.network() || ip == c.broadcast()) {
            return Err(format!(
                "cluster IP {ip} is the network or broadcast address of {c}"
            ));
        }
        if let Some(n) = self.cluster_network
            && n.contains(ip)
        {
            return Err(format!("cluster IP {ip} is in the cluster network {n}"));
        }
        if Some(ip) == cluster_dns_ip(c) {
            return Err(format!(
                "cluster IP {ip} is reserved for the cluster DNS (the 10th address of {c})"
            ));
        }
        Ok(())
    }

    /// Why `ip` cannot be an IPv6 cluster IP, if it cannot: no IPv6 service range, outside
    /// it, or its network address.
    pub fn cluster_ip6(&self, ip: Ipv6Addr) -> Result<(), String> {
        let Some(c) = self.service_cidr6 else {
            return Err(format!(
                "IPv6 cluster IP {ip}: there is no IPv6 service range (--service-cidr \
                 IPV4/LEN,IPV6/LEN)"
            ));
        };
        if !c.contains(ip) {
            return Err(format!(
                "IPv6 cluster IP {ip} is outside the service CIDR {c}"
            ));
        }
        if ip == c.network() {
            return Err(format!(
                "IPv6 cluster IP {ip} is the network address of {c}"
            ));
        }
        Ok(())
    }

    /// Why `ip` cannot be an explicit endpoint, if it cannot: unspecified, loopback,
    /// multicast, broadcast, reserved, a node's own address, an etcd endpoint, or a virtual
    /// address of the service CIDR. (Pod addresses in the cluster network are fine.)
    pub fn endpoint(&self, ip: Ipv4Addr) -> Result<(), String> {
        if let Some(p) = self.common_problem(ip) {
            return Err(format!("endpoint {p}"));
        }
        if self.service_cidr.contains(ip) {
            return Err(format!(
                "endpoint {ip} is in the service CIDR {} (a virtual address)",
                self.service_cidr
            ));
        }
        Ok(())
    }

    /// Why `port` cannot be a node port, if it cannot: outside
    /// [`NODE_PORT_MIN`]..=[`NODE_PORT_MAX`] or an etcd endpoint's port.
    pub fn node_port(&self, port: u16) -> Result<(), String> {
        if !(NODE_PORT_MIN..=NODE_PORT_MAX).contains(&port) {
            return Err(format!(
                "node port {port} is outside {NODE_PORT_MIN}-{NODE_PORT_MAX}"
            ));
        }
        if let Some(e) = self.etcd.iter().find(|e| e.port() == port) {
            return Err(format!(
                "node port {port} is the port of the etcd endpoint {e}"
            ));
        }
        Ok(())
    }
}

impl ExplicitEndpoints {
    /// Parses `IP` or `IP@NODE` arguments (`tartanctl endpoints set --address`), refusing
    /// what `guard` refuses and duplicates; the error names the offending argument.
    pub fn from_args(args: &[String], guard: &AddressGuard) -> Result<ExplicitEndpoints, String> {
        let mut e = ExplicitEndpoints::default();
        let mut seen = std::collections::HashSet::new();
        for a in args {
            let (ip, node) = match a.split_once('@') {
                Some((ip, n)) => (ip, Some(n)),
                None => (a.as_str(), None),
            };
            let ip: Ipv4Addr = ip
                .parse()
                .map_err(|_| format!("--address {a:?}: {ip:?} is not an IPv4 address"))?;
            guard
                .endpoint(ip)
                .map_err(|why| format!("--address {a:?}: {why}"))?;
            if let Some(n) = node
                && !valid_node_name(n)
            {
                return Err(format!(
                    "--address {a:?}: node {n:?} is not a node name (letters, digits, '-', '.', '_', at most 253)"
                ));
            }
            if !seen.insert(ip) {
                return Err(format!("--address {a:?}: {ip} is given twice"));
            }
            e.addresses.push(EndpointAddress {
                ip,
                node: node.map(str::to_string),
            });
        }
        Ok(e)
    }
}

/// Whether `s` is a node name as tartand accepts it (`--node-name`).
pub fn valid_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
}

/// One backend of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Address (of the family of the table it is programmed in).
    pub ip: IpAddr,
    /// Node, if known (shared: node names repeat across thousands of backends).
    pub node: Option<std::sync::Arc<str>>,
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
