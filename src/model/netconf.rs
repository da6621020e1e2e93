//! The cluster network configuration stored at `<prefix>/config`, in flannel's JSON format.
//!
//! Parsing applies flannel's defaults (SubnetLen, SubnetMin, SubnetMax, VXLAN VNI and port)
//! and validates every field, naming the field in the error.
//!
//! Dual-stack configs (`EnableIPv6` with `IPv6Network`, `IPv6SubnetLen`, `IPv6SubnetMin`,
//! `IPv6SubnetMax`) are read and validated as flannel's `CheckNetworkConfig` does: the IPv6
//! subnet length defaults to 64 for networks of /62 or wider and to `prefix + 2` for smaller
//! ones (at most /124), is at most 126, and leaves room for four subnets; SubnetMin and
//! SubnetMax default to the second and the last subnet. The IPv6 fields are ignored when
//! `EnableIPv6` is not true, as flannel ignores them. IPv6-only configs (`EnableIPv4: false`)
//! are refused with a clear error: flannel's lease key always starts with an IPv4 subnet,
//! and tartan does not serve them yet.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};

/// Default etcd prefix for the flannel-compatible network data.
pub const DEFAULT_ETCD_PREFIX: &str = "/coreos.com/network";
/// Default VXLAN network identifier (flannel's default).
pub const DEFAULT_VNI: u32 = 1;
/// Default VXLAN UDP port (flannel's and the kernel's default on Linux).
pub const DEFAULT_VXLAN_PORT: u16 = 8472;

/// A validated network configuration with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The whole cluster network, e.g. 10.244.0.0/16.
    pub network: Ipv4Network,
    /// Prefix length of each node's subnet.
    pub subnet_len: u8,
    /// First subnet that may be leased (network address of that subnet).
    pub subnet_min: Ipv4Addr,
    /// Last subnet that may be leased (network address of that subnet).
    pub subnet_max: Ipv4Addr,
    /// The IPv6 half of a dual-stack network (`EnableIPv6`), if any.
    pub ipv6: Option<Ipv6Pool>,
    /// Overlay backend settings.
    pub backend: BackendConfig,
}

/// The IPv6 subnets of a dual-stack network: `IPv6Network` and the range nodes lease from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv6Pool {
    /// The whole IPv6 cluster network, e.g. fd00:10:244::/56.
    pub network: Ipv6Network,
    /// Prefix length of each node's IPv6 subnet (`IPv6SubnetLen`).
    pub subnet_len: u8,
    /// First IPv6 subnet that may be leased (`IPv6SubnetMin`, its network address).
    pub subnet_min: Ipv6Addr,
    /// Last IPv6 subnet that may be leased (`IPv6SubnetMax`, its network address).
    pub subnet_max: Ipv6Addr,
}

/// VXLAN backend settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// VXLAN network identifier.
    pub vni: u32,
    /// VXLAN UDP destination port.
    pub port: u16,
    /// Route directly (no encapsulation) to peers on the same L2 segment.
    pub direct_routing: bool,
}

/// Why a configuration was rejected; each variant names the offending field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The JSON could not be decoded (not JSON, or a field of the wrong type, named first).
    #[error("network config does not decode: {0}")]
    Json(String),
    /// A field is missing or has the wrong form.
    #[error("network config field {field}: {reason}")]
    Field {
        /// The JSON field name, as flannel spells it.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn field_err(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        reason: reason.into(),
    }
}

/// The JSON document as flannel writes it.
#[derive(Debug, Default, Deserialize, Serialize)]
struct RawConfig {
    #[serde(rename = "Network", default, skip_serializing_if = "Option::is_none")]
    network: Option<String>,
    #[serde(rename = "SubnetLen", default, skip_serializing_if = "Option::is_none")]
    subnet_len: Option<u32>,
    #[serde(rename = "SubnetMin", default, skip_serializing_if = "Option::is_none")]
    subnet_min: Option<String>,
    #[serde(rename = "SubnetMax", default, skip_serializing_if = "Option::is_none")]
    subnet_max: Option<String>,
    #[serde(
        rename = "EnableIPv4",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    enable_ipv4: Option<bool>,
    #[serde(
        rename = "EnableIPv6",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    enable_ipv6: Option<bool>,
    #[serde(
        rename = "IPv6Network",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    ipv6_network: Option<String>,
    #[serde(
        rename = "IPv6SubnetLen",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    ipv6_subnet_len: Option<u32>,
    #[serde(
        rename = "IPv6SubnetMin",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    ipv6_subnet_min: Option<String>,
    #[serde(
        rename = "IPv6SubnetMax",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    ipv6_subnet_max: Option<String>,
    #[serde(rename = "Backend", default, skip_serializing_if = "Option::is_none")]
    backend: Option<RawBackend>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
struct RawBackend {
    #[serde(rename = "Type", default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(rename = "VNI", default, skip_serializing_if = "Option::is_none")]
    vni: Option<u64>,
    #[serde(rename = "Port", default, skip_serializing_if = "Option::is_none")]
    port: Option<u64>,
    #[serde(
        rename = "DirectRouting",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    direct_routing: Option<bool>,
}

fn parse_v4(field: &'static str, s: &str) -> Result<Ipv4Addr, ConfigError> {
    s.parse::<Ipv4Addr>()
        .map_err(|_| field_err(field, format!("{s:?} is not an IPv4 address")))
}

fn subnet_size(len: u8) -> u32 {
    1u32 << (32 - u32::from(len))
}

/// `Network`: present, an IPv4 CIDR, no host bits.
fn parse_network(net_s: Option<&str>) -> Result<Ipv4Network, ConfigError> {
    let net_s = net_s.ok_or_else(|| field_err("Network", "missing"))?;
    let network: Ipv4Network = net_s
        .parse()
        .map_err(|_| field_err("Network", format!("{net_s:?} is not an IPv4 CIDR")))?;
    if network.ip() != network.network() {
        return Err(field_err(
            "Network",
            format!(
                "{net_s} has host bits set (did you mean {}/{}?)",
                network.network(),
                network.prefix()
            ),
        ));
    }
    Ok(network)
}

/// `SubnetLen` in a network of prefix `plen`: at most 30 and leaving room for four subnets;
/// unset (or 0), 24 for networks of /22 or wider and `plen + 2` for smaller ones (at most
/// /28).
fn parse_subnet_len(raw: Option<u32>, plen: u8) -> Result<u8, ConfigError> {
    match raw {
        Some(0) | None => {
            if plen > 28 {
                Err(field_err(
                    "Network",
                    format!("/{plen} is too small, the smallest useful network is /28"),
                ))
            } else if plen <= 22 {
                Ok(24)
            } else {
                Ok(plen + 2)
            }
        }
        Some(l) => {
            if l > 30 {
                return Err(field_err(
                    "SubnetLen",
                    format!("{l} is out of range: must be at most 30"),
                ));
            }
            let l = l as u8;
            if l < plen + 2 {
                return Err(field_err(
                    "SubnetLen",
                    format!(
                        "{l} is out of range: Network /{plen} must hold at least four subnets, so SubnetLen must be at least {}",
                        plen + 2
                    ),
                ));
            }
            Ok(l)
        }
    }
}

/// `SubnetMin` or `SubnetMax` (`field`): `default` when unset or empty, otherwise an address
/// inside `network` on a `/subnet_len` boundary.
fn parse_subnet_bound(
    field: &'static str,
    raw: Option<&str>,
    default: Ipv4Addr,
    network: Ipv4Network,
    subnet_len: u8,
) -> Result<Ipv4Addr, ConfigError> {
    let mask = u32::MAX << (32 - u32::from(subnet_len));
    match raw {
        None | Some("") => Ok(default),
        Some(s) => {
            let a = parse_v4(field, s)?;
            if !network.contains(a) {
                return Err(field_err(
                    field,
                    format!("{a} is outside the Network {network}"),
                ));
            }
            if u32::from(a) & mask != u32::from(a) {
                return Err(field_err(
                    field,
                    format!("{a} is not on a /{subnet_len} boundary"),
                ));
            }
            Ok(a)
        }
    }
}

/// `IPv6Network`: present, an IPv6 CIDR, no host bits.
fn parse_network6(net_s: Option<&str>) -> Result<Ipv6Network, ConfigError> {
    let net_s = net_s.ok_or_else(|| field_err("IPv6Network", "missing (EnableIPv6 is true)"))?;
    let network: Ipv6Network = net_s
        .parse()
        .map_err(|_| field_err("IPv6Network", format!("{net_s:?} is not an IPv6 CIDR")))?;
    if network.ip() != network.network() {
        return Err(field_err(
            "IPv6Network",
            format!(
                "{net_s} has host bits set (did you mean {}/{}?)",
                network.network(),
                network.prefix()
            ),
        ));
    }
    Ok(network)
}

/// `IPv6SubnetLen` in a network of prefix `plen`: at most 126 and leaving room for four
/// subnets; unset (or 0), 64 for networks of /62 or wider and `plen + 2` for smaller ones (at
/// most /124).
fn parse_subnet_len6(raw: Option<u32>, plen: u8) -> Result<u8, ConfigError> {
    match raw {
        Some(0) | None => {
            if plen > 124 {
                Err(field_err(
                    "IPv6Network",
                    format!("/{plen} is too small, the smallest useful IPv6 network is /124"),
                ))
            } else if plen <= 62 {
                Ok(64)
            } else {
                Ok(plen + 2)
            }
        }
        Some(l) => {
            if l > 126 {
                return Err(field_err(
                    "IPv6SubnetLen",
                    format!("{l} is out of range: must be at most 126"),
                ));
            }
            let l = l as u8;
            if u32::from(l) < u32::from(plen) + 2 {
                return Err(field_err(
                    "IPv6SubnetLen",
                    format!(
                        "{l} is out of range: IPv6Network /{plen} must hold at least four subnets, so IPv6SubnetLen must be at least {}",
                        plen + 2
                    ),
                ));
            }
            Ok(l)
        }
    }
}

fn subnet_size6(len: u8) -> u128 {
    1u128 << (128 - u32::from(len))
}

/// `IPv6SubnetMin` or `IPv6SubnetMax` (`field`): `default` when unset or empty, otherwise an
/// address inside `network` on a `/subnet_len` boundary.
fn parse_subnet_bound6(
    field: &'static str,
    raw: Option<&str>,
    default: Ipv6Addr,
    network: Ipv6Network,
    subnet_len: u8,
) -> Result<Ipv6Addr, ConfigError> {
    match raw {
        None | Some("") => Ok(default),
        Some(s) => {
            let a: Ipv6Addr = s
                .parse()
                .map_err(|_| field_err(field, format!("{s:?} is not an IPv6 address")))?;
            if !network.contains(a) {
                return Err(field_err(
                    field,
                    format!("{a} is outside the IPv6Network {network}"),
                ));
            }
            if u128::from(a) % subnet_size6(subnet_len) != 0 {
                return Err(field_err(
                    field,
                    format!("{a} is not on a /{subnet_len} boundary"),
                ));
            }
            Ok(a)
        }
    }
}

/// The IPv6 half of `raw` when `EnableIPv6` is true.
fn parse_ipv6(raw: &RawConfig) -> Result<Option<Ipv6Pool>, ConfigError> {
    if raw.enable_ipv6 != Some(true) {
        return Ok(None);
    }
    let network = parse_network6(raw.ipv6_network.as_deref())?;
    let subnet_len = parse_subnet_len6(raw.ipv6_subnet_len, network.prefix())?;
    let size = subnet_size6(subnet_len);
    let first = u128::from(network.network());
    // The network's last address, then the last subnet's first (no overflow: the subnet
    // length is at least the prefix + 2, so the network holds four subnets or more).
    let last = first | (u128::MAX >> u32::from(network.prefix()));
    let subnet_min = parse_subnet_bound6(
        "IPv6SubnetMin",
        raw.ipv6_subnet_min.as_deref(),
        Ipv6Addr::from(first + size),
        network,
        subnet_len,
    )?;
    let subnet_max = parse_subnet_bound6(
        "IPv6SubnetMax",
        raw.ipv6_subnet_max.as_deref(),
        Ipv6Addr::from(last - size + 1),
        network,
        subnet_len,
    )?;
    if u128::from(subnet_min) > u128::from(subnet_max) {
        return Err(field_err(
            "IPv6SubnetMin",
            format!("{subnet_min} is above IPv6SubnetMax {subnet_max}"),
        ));
    }
    Ok(Some(Ipv6Pool {
        network,
        subnet_len,
        subnet_min,
        subnet_max,
    }))
}

impl Ipv6Pool {
    /// Number of IPv6 subnets between SubnetMin and SubnetMax inclusive (saturating: a /48
    /// of /64s has 65,536, a /8 of /64s more than `u64` holds).
    pub fn subnet_count(&self) -> u64 {
        let n = (u128::from(self.subnet_max) - u128::from(self.subnet_min))
            / subnet_size6(self.subnet_len)
            + 1;
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    /// The `i`th leasable IPv6 subnet (0-based from SubnetMin), if within range.
    pub fn nth_subnet(&self, i: u64) -> Option<Ipv6Network> {
        if i >= self.subnet_count() {
            return None;
        }
        let base = u128::from(self.subnet_min) + u128::from(i) * subnet_size6(self.subnet_len);
        Ipv6Network::new(Ipv6Addr::from(base), self.subnet_len).ok()
    }

    /// Whether `subnet` is an IPv6 subnet this pool could lease (right length, aligned, in
    /// range).
    pub fn is_leasable(&self, subnet: Ipv6Network) -> bool {
        subnet.prefix() == self.subnet_len
            && subnet.ip() == subnet.network()
            && u128::from(subnet.ip()) >= u128::from(self.subnet_min)
            && u128::from(subnet.ip()) <= u128::from(self.subnet_max)
    }
}

/// `Backend`: type `vxlan` (or unset), the VNI (1..16777215, unset or 0 the default) and the
/// UDP port (unset or 0 the default), DirectRouting off unless set.
fn parse_backend(rb: RawBackend) -> Result<BackendConfig, ConfigError> {
    match rb.kind.as_deref() {
        None | Some("vxlan") => {}
        Some(other) => {
            return Err(field_err(
                "Backend.Type",
                format!("{other:?} is not supported: tartan implements \"vxlan\""),
            ));
        }
    }
    let vni = match rb.vni {
        None | Some(0) => DEFAULT_VNI,
        Some(v) if v < (1 << 24) => v as u32,
        Some(v) => {
            return Err(field_err(
                "Backend.VNI",
                format!("{v} is out of range 1..16777215"),
            ));
        }
    };
    let port = match rb.port {
        None | Some(0) => DEFAULT_VXLAN_PORT,
        Some(p) if p <= 65535 => p as u16,
        Some(p) => {
            return Err(field_err("Backend.Port", format!("{p} is not a UDP port")));
        }
    };
    Ok(BackendConfig {
        vni,
        port,
        direct_routing: rb.direct_routing.unwrap_or(false),
    })
}

impl NetworkConfig {
    /// Parses and validates a flannel network config JSON document.
    pub fn parse(json: &[u8]) -> Result<Self, ConfigError> {
        let raw: RawConfig =
            crate::util::json_decode::from_slice(json).map_err(ConfigError::Json)?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        match (raw.enable_ipv4, raw.enable_ipv6) {
            (Some(false), Some(true)) => {
                return Err(field_err(
                    "EnableIPv4",
                    "false (an IPv6-only network) is not supported: flannel's lease keys \
                     always name an IPv4 subnet; set EnableIPv4 to true for dual-stack",
                ));
            }
            (Some(false), _) => {
                return Err(field_err(
                    "EnableIPv4",
                    "false, and EnableIPv6 is not true: the network has no address family",
                ));
            }
            _ => {}
        }
        let ipv6 = parse_ipv6(&raw)?;
        let network = parse_network(raw.network.as_deref())?;
        let subnet_len = parse_subnet_len(raw.subnet_len, network.prefix())?;
        let size = subnet_size(subnet_len);
        let net_first = u32::from(network.network());
        let net_last = u32::from(network.broadcast());
        let subnet_min = parse_subnet_bound(
            "SubnetMin",
            raw.subnet_min.as_deref(),
            Ipv4Addr::from(net_first + size),
            network,
            subnet_len,
        )?;
        let subnet_max = parse_subnet_bound(
            "SubnetMax",
            raw.subnet_max.as_deref(),
            Ipv4Addr::from(net_last - size + 1),
            network,
            subnet_len,
        )?;
        if u32::from(subnet_min) > u32::from(subnet_max) {
            return Err(field_err(
                "SubnetMin",
                format!("{subnet_min} is above SubnetMax {subnet_max}"),
            ));
        }
        let backend = parse_backend(raw.backend.unwrap_or_default())?;
        Ok(NetworkConfig {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            ipv6,
            backend,
        })
    }

    /// Serializes to flannel's JSON, with every default written out explicitly.
    pub fn to_json(&self) -> String {
        let raw = RawConfig {
            network: Some(self.network.to_string()),
            subnet_len: Some(u32::from(self.subnet_len)),
            subnet_min: Some(self.subnet_min.to_string()),
            subnet_max: Some(self.subnet_max.to_string()),
            enable_ipv4: None,
            enable_ipv6: self.ipv6.as_ref().map(|_| true),
            ipv6_network: self.ipv6.as_ref().map(|p| p.network.to_string()),
            ipv6_subnet_len: self.ipv6.as_ref().map(|p| u32::from(p.subnet_len)),
            ipv6_subnet_min: self.ipv6.as_ref().map(|p| p.subnet_min.to_string()),
            ipv6_subnet_max: self.ipv6.as_ref().map(|p| p.subnet_max.to_string()),
            backend: Some(RawBackend {
                kind: Some("vxlan".into()),
                vni: Some(u64::from(self.backend.vni)),
                port: Some(u64::from(self.backend.port)),
                direct_routing: Some(self.backend.direct_routing),
            }),
        };
        serde_json::to_string(&raw).unwrap_or_default()
    }

    /// Number of subnets between SubnetMin and SubnetMax inclusive.
    pub fn subnet_count(&self) -> u64 {
        let size = u64::from(subnet_size(self.subnet_len));
        (u64::from(u32::from(self.subnet_max)) - u64::from(u32::from(self.subnet_min))) / size + 1
    }

    /// The `i`th leasable subnet (0-based from SubnetMin), if within range.
    pub fn nth_subnet(&self, i: u64) -> Option<Ipv4Network> {
        if i >= self.subnet_count() {
            return None;
        }
        let size = u64::from(subnet_size(self.subnet_len));
        let base = u64::from(u32::from(self.subnet_min)) + i * size;
        Ipv4Network::new(Ipv4Addr::from(base as u32), self.subnet_len).ok()
    }

    /// Whether `subnet` is a subnet this config could lease (right length, aligned, in range).
    pub fn is_leasable(&self, subnet: Ipv4Network) -> bool {
        subnet.prefix() == self.subnet_len
            && subnet.ip() == subnet.network()
            && u32::from(subnet.ip()) >= u32::from(self.subnet_min)
            && u32::from(subnet.ip()) <= u32::from(self.subnet_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetworkConfig, ConfigError> {
        NetworkConfig::parse(s.as_bytes())
    }

    fn field_of(r: Result<NetworkConfig, ConfigError>) -> &'static str {
        match r {
            Err(ConfigError::Field { field, .. }) => field,
            other => panic!("expected field error, got {other:?}"),
        }
    }

    #[test]
    fn flannel_defaults() {
        let c = parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 244, 255, 0));
        assert_eq!(c.backend.vni, 1);
        assert_eq!(c.backend.port, 8472);
        assert!(!c.backend.direct_routing);
        assert_eq!(c.subnet_count(), 255);
    }

    #[test]
    fn small_network_gets_quarter_subnets() {
        let c = parse(r#"{"Network":"10.0.0.0/26"}"#).unwrap();
        assert_eq!(c.subnet_len, 28);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 0, 0, 16));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 0, 0, 48));
        let c = parse(r#"{"Network":"10.0.0.0/22"}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
    }

    #[test]
    fn network_too_small() {
        assert_eq!(field_of(parse(r#"{"Network":"10.0.0.0/29"}"#)), "Network");
    }

    #[test]
    fn subnet_len_out_of_range() {
        assert_eq!(
            field_of(parse(r#"{"Network":"10.0.0.0/16","SubnetLen":31}"#)),
            "SubnetLen"
        );
        assert_eq!(
            field_of(parse(r#"{"Network":"10.0.0.0/16","SubnetLen":17}"#)),
            "SubnetLen"
        );
        assert!(parse(r#"{"Network":"10.0.0.0/16","SubnetLen":18}"#).is_ok());
    }

    #[test]
    fn min_max_checks() {
        assert_eq!(
            field_of(parse(r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.3.5"}"#)),
            "SubnetMin"
        );
        assert_eq!(
            field_of(parse(r#"{"Network":"10.0.0.0/16","SubnetMax":"10.1.0.0"}"#)),
            "SubnetMax"
        );
        assert_eq!(
            field_of(parse(
                r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.9.0","SubnetMax":"10.0.8.0"}"#
            )),
            "SubnetMin"
        );
        let c = parse(r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.8.0","SubnetMax":"10.0.9.0"}"#)
            .unwrap();
        assert_eq!(c.subnet_count(), 2);
        assert_eq!(
            c.nth_subnet(1).unwrap(),
            "10.0.9.0/24".parse::<Ipv4Network>().unwrap()
        );
        assert_eq!(c.nth_subnet(2), None);
    }

    #[test]
    fn malformed_inputs() {
        assert!(matches!(parse("not json"), Err(ConfigError::Json(_))));
        assert_eq!(field_of(parse("{}")), "Network");
        assert_eq!(field_of(parse(r#"{"Network":"bogus"}"#)), "Network");
        assert_eq!(field_of(parse(r#"{"Network":"10.0.0.1/16"}"#)), "Network");
        assert_eq!(
            field_of(parse(
                r#"{"Network":"10.0.0.0/16","Backend":{"Type":"udp"}}"#
            )),
            "Backend.Type"
        );
        assert_eq!(
            field_of(parse(
                r#"{"Network":"10.0.0.0/16","Backend":{"VNI":16777216}}"#
            )),
            "Backend.VNI"
        );
        assert_eq!(
            field_of(parse(
                r#"{"Network":"10.0.0.0/16","Backend":{"Port":70000}}"#
            )),
            "Backend.Port"
        );
        assert!(matches!(
            parse(r#"{"Network":"10.0.0.0/16","SubnetLen":"x"}"#),
            Err(ConfigError::Json(_))
        ));
    }

    #[test]
    fn roundtrip_json() {
        let c = parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":7,"Port":4789,"DirectRouting":true}}"#).unwrap();
        let again = NetworkConfig::parse(c.to_json().as_bytes()).unwrap();
        assert_eq!(c, again);
        assert!(c.to_json().contains("\"Backend\":{\"Type\":\"vxlan\""));
    }

    const DUAL: &str =
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#;

    #[test]
    fn dual_stack_flannel_defaults() {
        let c = parse(DUAL).unwrap();
        let p = c.ipv6.clone().unwrap();
        assert_eq!(
            p.network,
            "fd00:10:244::/56".parse::<Ipv6Network>().unwrap()
        );
        assert_eq!(p.subnet_len, 64);
        assert_eq!(p.subnet_min, "fd00:10:244:1::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            p.subnet_max,
            "fd00:10:244:ff::".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(p.subnet_count(), 255);
        assert_eq!(
            p.nth_subnet(1).unwrap(),
            "fd00:10:244:2::/64".parse::<Ipv6Network>().unwrap()
        );
        assert_eq!(p.nth_subnet(255), None);
        assert!(p.is_leasable("fd00:10:244:7::/64".parse().unwrap()));
        assert!(!p.is_leasable("fd00:10:244::/64".parse().unwrap()));
        assert!(!p.is_leasable("fd00:10:244:7::/65".parse().unwrap()));
        assert!(!p.is_leasable("fd00:10:245:7::/64".parse().unwrap()));
        // The IPv4 half is as before.
        assert_eq!(c.subnet_len, 24);
        // Small networks: prefix + 2; a /0 of /100s is more subnets than u64 counts.
        let c = parse(r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/120"}"#)
            .unwrap();
        assert_eq!(c.ipv6.unwrap().subnet_len, 122);
        let c = parse(r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"::/0","IPv6SubnetLen":100}"#)
            .unwrap();
        assert_eq!(c.ipv6.unwrap().subnet_count(), u64::MAX);
    }

    #[test]
    fn ipv6_fields_are_checked_and_named() {
        let with = |extra: &str| {
            parse(&format!(
                r#"{{"Network":"10.0.0.0/16","EnableIPv6":true{extra}}}"#
            ))
        };
        assert_eq!(field_of(with("")), "IPv6Network");
        assert_eq!(
            field_of(with(r#","IPv6Network":"10.1.0.0/16""#)),
            "IPv6Network"
        );
        assert_eq!(
            field_of(with(r#","IPv6Network":"fd00::1/64""#)),
            "IPv6Network"
        );
        assert_eq!(
            field_of(with(r#","IPv6Network":"fd00::/125""#)),
            "IPv6Network"
        );
        for len in ["127", "49"] {
            assert_eq!(
                field_of(with(&format!(
                    r#","IPv6Network":"fd00::/48","IPv6SubnetLen":{len}"#
                ))),
                "IPv6SubnetLen"
            );
        }
        assert!(with(r#","IPv6Network":"fd00::/48","IPv6SubnetLen":50"#).is_ok());
        let net = r#","IPv6Network":"fd00::/48""#;
        for (field, value) in [
            ("IPv6SubnetMin", "fd00:0:0:3::5"),
            ("IPv6SubnetMin", "fd01::"),
            ("IPv6SubnetMax", "10.0.0.0"),
            ("IPv6SubnetMax", "fd00:1::"),
        ] {
            assert_eq!(
                field_of(with(&format!(r#"{net},"{field}":"{value}""#))),
                field,
                "{field} {value}"
            );
        }
        assert_eq!(
            field_of(with(&format!(
                r#"{net},"IPv6SubnetMin":"fd00:0:0:9::","IPv6SubnetMax":"fd00:0:0:8::""#
            ))),
            "IPv6SubnetMin"
        );
        assert!(matches!(
            with(r#","IPv6Network":"fd00::/48","IPv6SubnetLen":"64""#),
            Err(ConfigError::Json(_))
        ));
    }

    #[test]
    fn ipv6_fields_without_enable_ipv6_are_ignored_as_flannel_does() {
        let c = parse(r#"{"Network":"10.0.0.0/16","IPv6Network":"bogus"}"#).unwrap();
        assert_eq!(c.ipv6, None);
        let c = parse(r#"{"Network":"10.0.0.0/16","EnableIPv6":false,"IPv6Network":"fd00::/48"}"#)
            .unwrap();
        assert_eq!(c.ipv6, None);
    }

    #[test]
    fn ipv6_only_and_no_family_are_refused_on_enable_ipv4() {
        assert_eq!(
            field_of(parse(
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/48"}"#
            )),
            "EnableIPv4"
        );
        assert_eq!(
            field_of(parse(r#"{"Network":"10.0.0.0/16","EnableIPv4":false}"#)),
            "EnableIPv4"
        );
        assert!(parse(r#"{"Network":"10.0.0.0/16","EnableIPv4":true}"#).is_ok());
    }

    #[test]
    fn dual_stack_roundtrip_json() {
        let c = parse(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","IPv6SubnetLen":60,"IPv6SubnetMin":"fd00:10:244:20::","IPv6SubnetMax":"fd00:10:244:f0::"}"#).unwrap();
        let again = NetworkConfig::parse(c.to_json().as_bytes()).unwrap();
        assert_eq!(c, again);
        assert!(c.to_json().contains(r#""EnableIPv6":true"#));
        assert_eq!(again.ipv6.unwrap().subnet_count(), 14);
    }

    #[test]
    fn leasable() {
        let c = parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        assert!(c.is_leasable("10.244.3.0/24".parse().unwrap()));
        assert!(!c.is_leasable("10.244.0.0/24".parse().unwrap()));
        assert!(!c.is_leasable("10.244.3.0/25".parse().unwrap()));
        assert!(!c.is_leasable("10.245.3.0/24".parse().unwrap()));
    }
}

#[cfg(test)]
mod proptests;
