//! The cluster network configuration stored at `<prefix>/config`, in flannel's JSON format.
//!
//! Parsing applies flannel's defaults (SubnetLen, SubnetMin, SubnetMax, VXLAN VNI and port)
//! and validates every field, naming the field in the error.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
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
    /// Overlay backend settings.
    pub backend: BackendConfig,
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
        rename = "EnableIPv6",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    enable_ipv6: Option<bool>,
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
        if raw.enable_ipv6 == Some(true) {
            return Err(field_err("EnableIPv6", "IPv6 is not supported by tartan"));
        }
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
            enable_ipv6: None,
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
