//! Subnet lease records in flannel's etcd layout: key `<prefix>/subnets/10.244.3.0-24`,
//! value `{"PublicIP":..,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":".."}}`.
//!
//! Dual-stack leases as flannel writes them are read too: the key gains the IPv6 subnet after
//! `&` (`10.244.3.0-24&fd00:10:244:3::-64`, flannel's `MakeSubnetKey`), the value
//! `PublicIPv6` (`null` when absent) and `BackendV6Data` (the VNI and the MAC of the node's
//! IPv6 VTEP).
//!
//! tartan adds one field flannel ignores, `NodeName`, so that a restarted node is matched by
//! identity rather than by address.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};

use crate::model::DecodeError;

/// A MAC address (used for VTEP MACs).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Text that is not a MAC address `xx:xx:xx:xx:xx:xx` (the text, as given).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address")]
pub struct MacParseError(pub String);

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || MacParseError(s.to_string());
        let mut out = [0u8; 6];
        let mut n = 0;
        for part in s.split(':') {
            if n == 6 || part.len() != 2 {
                return Err(bad());
            }
            out[n] = u8::from_str_radix(part, 16).map_err(|_| bad())?;
            n += 1;
        }
        if n != 6 {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl MacAddr {
    /// True for an individual (unicast) address that is not all zeros.
    pub fn is_valid_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Formats a subnet as flannel's key suffix: `10.244.3.0-24`.
pub fn subnet_to_key(subnet: Ipv4Network) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix())
}

/// Parses flannel's key suffix `10.244.3.0-24` (the last path component of a subnet key):
/// the IPv4 subnet. A dual-stack key's IPv6 part (`&fd00:10:244:3::-64`) is checked and
/// left out; [`SubnetKey::parse`] returns both.
pub fn subnet_from_key(key_suffix: &str) -> Result<Ipv4Network, DecodeError> {
    SubnetKey::parse(key_suffix).map(|k| k.v4)
}

/// The subnets a lease key names: flannel's `10.244.3.0-24` or, dual-stack,
/// `10.244.3.0-24&fd00:10:244:3::-64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetKey {
    /// The IPv4 subnet (always present in flannel's keys).
    pub v4: Ipv4Network,
    /// The IPv6 subnet of a dual-stack lease.
    pub v6: Option<Ipv6Network>,
}

impl fmt::Display for SubnetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", subnet_to_key(self.v4))?;
        if let Some(v6) = self.v6 {
            write!(f, "&{}-{}", v6.network(), v6.prefix())?;
        }
        Ok(())
    }
}

impl SubnetKey {
    /// Parses a key suffix; errors quote the suffix and say which part is wrong.
    pub fn parse(key_suffix: &str) -> Result<SubnetKey, DecodeError> {
        let (v4, v6) = match key_suffix.split_once('&') {
            Some((v4, v6)) => (v4, Some(v6)),
            None => (key_suffix, None),
        };
        Ok(SubnetKey {
            v4: subnet4_from_key(key_suffix, v4)?,
            v6: v6.map(|v6| subnet6_from_key(key_suffix, v6)).transpose()?,
        })
    }
}

/// The IPv6 part `fd00:10:244:3::-64` of the key `key_suffix`.
fn subnet6_from_key(key_suffix: &str, v6: &str) -> Result<Ipv6Network, DecodeError> {
    let part = |why: String| DecodeError::invalid(format!("subnet key {key_suffix:?}"), why);
    let (ip, len) = v6
        .rsplit_once('-')
        .ok_or_else(|| part(format!("{v6:?} after '&' is not of the form IPV6-NN")))?;
    let ip: Ipv6Addr = ip
        .parse()
        .map_err(|_| part(format!("{ip:?} is not an IPv6 address")))?;
    let len: u8 = len
        .parse()
        .map_err(|_| part(format!("{len:?} is not a prefix length")))?;
    let net =
        Ipv6Network::new(ip, len).map_err(|_| part(format!("/{len} is not a prefix length")))?;
    if net.network() != ip {
        return Err(part(format!(
            "the IPv6 subnet {ip}/{len} has host bits set"
        )));
    }
    Ok(net)
}

/// The IPv4 part `10.244.3.0-24` of the key `key_suffix`.
fn subnet4_from_key(key_suffix: &str, v4: &str) -> Result<Ipv4Network, DecodeError> {
    let quoted = || format!("{key_suffix:?}");
    let part = |why: String| DecodeError::invalid(format!("subnet key {key_suffix:?}"), why);
    let (ip, len) = v4.rsplit_once('-').ok_or_else(|| {
        DecodeError::value("subnet key", quoted(), "is not of the form a.b.c.d-NN")
    })?;
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| part(format!("{ip:?} is not an IPv4 address")))?;
    let len: u8 = len
        .parse()
        .map_err(|_| part(format!("{len:?} is not a prefix length")))?;
    let net =
        Ipv4Network::new(ip, len).map_err(|_| part(format!("/{len} is not a prefix length")))?;
    if net.network() != ip {
        return Err(DecodeError::value(
            "subnet key",
            quoted(),
            "has host bits set",
        ));
    }
    Ok(net)
}

/// Backend data of a VXLAN lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanBackendData {
    /// VXLAN network identifier.
    #[serde(rename = "VNI", default)]
    pub vni: u32,
    /// MAC address of the node's VTEP device.
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: MacAddr,
}

/// The JSON value of a subnet lease key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseValue {
    /// The node's underlay address (VXLAN tunnel endpoint).
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    /// Always "vxlan" for leases tartan writes.
    #[serde(rename = "BackendType", default)]
    pub backend_type: String,
    /// Backend-specific data; for vxlan, the VNI and VTEP MAC. Absent in reservations.
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_data: Option<serde_json::Value>,
    /// The node's IPv6 underlay address of a dual-stack lease (flannel writes `null` when
    /// there is none).
    #[serde(
        rename = "PublicIPv6",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub public_ipv6: Option<Ipv6Addr>,
    /// The IPv6 VTEP's data of a dual-stack vxlan lease (its VNI and MAC).
    #[serde(
        rename = "BackendV6Data",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_v6_data: Option<serde_json::Value>,
    /// tartan's node identity; flannel ignores this field.
    #[serde(rename = "NodeName", default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

impl LeaseValue {
    /// A VXLAN lease value for a node.
    pub fn vxlan(public_ip: Ipv4Addr, vni: u32, vtep_mac: MacAddr, node_name: &str) -> Self {
        LeaseValue {
            public_ip,
            backend_type: "vxlan".into(),
            backend_data: serde_json::to_value(VxlanBackendData { vni, vtep_mac }).ok(),
            public_ipv6: None,
            backend_v6_data: None,
            node_name: Some(node_name.to_string()),
        }
    }

    /// Parses a lease value, rejecting anything that is not a JSON object with a PublicIP.
    pub fn parse(bytes: &[u8]) -> Result<Self, DecodeError> {
        crate::util::json_decode::from_slice(bytes)
            .map_err(|e| DecodeError::json("lease value is not valid", e))
    }

    /// The VXLAN backend data, if present and well-formed.
    pub fn vxlan_data(&self) -> Result<VxlanBackendData, DecodeError> {
        self.vxlan_data_of("BackendData", self.backend_data.as_ref())
    }

    /// The IPv6 VTEP's data of a dual-stack lease: `None` when the lease has no IPv6 half
    /// (no `PublicIPv6` and no `BackendV6Data`), an error when only one is there or the data
    /// is malformed.
    pub fn vxlan_v6_data(&self) -> Result<Option<(Ipv6Addr, VxlanBackendData)>, DecodeError> {
        match (self.public_ipv6, &self.backend_v6_data) {
            (None, None) => Ok(None),
            (Some(ip), Some(data)) => {
                Ok(Some((ip, self.vxlan_data_of("BackendV6Data", Some(data))?)))
            }
            (None, Some(_)) => Err(DecodeError::missing("PublicIPv6")),
            (Some(_), None) => Err(DecodeError::missing("BackendV6Data")),
        }
    }

    fn vxlan_data_of(
        &self,
        field: &'static str,
        data: Option<&serde_json::Value>,
    ) -> Result<VxlanBackendData, DecodeError> {
        if self.backend_type != "vxlan" {
            return Err(DecodeError::value(
                "BackendType",
                format!("{:?}", self.backend_type),
                "is not vxlan",
            ));
        }
        let data = data.ok_or_else(|| DecodeError::missing(field))?;
        let context = if field == "BackendV6Data" {
            "BackendV6Data is not valid"
        } else {
            "BackendData is not valid"
        };
        let d: VxlanBackendData = crate::util::json_decode::from_value(data)
            .map_err(|e| DecodeError::json(context, e))?;
        if !d.vtep_mac.is_valid_unicast() {
            return Err(DecodeError::value(
                "VtepMAC",
                d.vtep_mac.to_string(),
                "is not a unicast MAC",
            ));
        }
        Ok(d)
    }

    /// Serializes to JSON bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Whether this lease belongs to the node `name` with address `ip`: matched by NodeName when
    /// the lease carries one, else by PublicIP (leases and reservations written by flannel).
    pub fn belongs_to(&self, name: &str, ip: Ipv4Addr) -> bool {
        match &self.node_name {
            Some(n) => n == name,
            None => self.public_ip == ip,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_roundtrip() {
        let n: Ipv4Network = "10.244.3.0/24".parse().unwrap();
        assert_eq!(subnet_to_key(n), "10.244.3.0-24");
        assert_eq!(subnet_from_key("10.244.3.0-24").unwrap(), n);
        assert_eq!(
            subnet_from_key("10.244.3.1-24").unwrap_err().to_string(),
            "subnet key \"10.244.3.1-24\" has host bits set"
        );
        assert!(subnet_from_key("10.244.3.0").is_err());
        assert!(subnet_from_key("x-24").is_err());
        assert!(subnet_from_key("10.244.3.0-33").is_err());
    }

    #[test]
    fn dual_stack_keys_as_flannel_writes_them() {
        let k = SubnetKey::parse("10.12.13.0-24&fd00:12:13::-56").unwrap();
        assert_eq!(k.v4, "10.12.13.0/24".parse::<Ipv4Network>().unwrap());
        assert_eq!(
            k.v6,
            Some("fd00:12:13::/56".parse::<Ipv6Network>().unwrap())
        );
        assert_eq!(k.to_string(), "10.12.13.0-24&fd00:12:13::-56");
        assert_eq!(
            subnet_from_key("10.5.34.0-24&fc00:0:0:7::-64").unwrap(),
            "10.5.34.0/24".parse::<Ipv4Network>().unwrap()
        );
        assert_eq!(
            SubnetKey::parse("10.5.34.0-24&fc00:0:0:7::-64")
                .unwrap()
                .to_string(),
            "10.5.34.0-24&fc00:0:0:7::-64"
        );
        let k = SubnetKey::parse("10.5.34.0-24").unwrap();
        assert_eq!((k.v6, k.to_string()), (None, "10.5.34.0-24".to_string()));
        for (bad, why) in [
            ("10.5.34.0-24&", "after '&'"),
            ("10.5.34.0-24&fc00::", "after '&'"),
            ("10.5.34.0-24&10.0.0.0-8", "is not an IPv6 address"),
            ("10.5.34.0-24&fc00::-129", "not a prefix length"),
            ("10.5.34.0-24&fc00::1-64", "host bits"),
            ("10.5.34.0-24&fc00::-x", "not a prefix length"),
            ("&fc00::-64", "subnet key"),
        ] {
            let e = SubnetKey::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn dual_stack_values_as_flannel_writes_them() {
        let v = LeaseValue::parse(
            br#"{"PublicIP":"192.0.2.10","PublicIPv6":"2001:db8::10","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:f0"},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:f6"}}"#,
        )
        .unwrap();
        let (ip6, d6) = v.vxlan_v6_data().unwrap().unwrap();
        assert_eq!(ip6, "2001:db8::10".parse::<Ipv6Addr>().unwrap());
        assert_eq!(d6.vtep_mac.to_string(), "aa:bb:cc:dd:ee:f6");
        assert_eq!(
            v.vxlan_data().unwrap().vtep_mac.to_string(),
            "aa:bb:cc:dd:ee:f0"
        );
        // Written back, the IPv6 half is kept.
        assert_eq!(LeaseValue::parse(&v.to_bytes()).unwrap(), v);
        // IPv4-only leases have none; halves without the other are errors naming the field.
        let v4 = LeaseValue::parse(br#"{"PublicIP":"1.2.3.4","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:f0"}}"#).unwrap();
        assert_eq!(v4.vxlan_v6_data().unwrap(), None);
        let no_ip = LeaseValue::parse(br#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:f6"}}"#).unwrap();
        assert!(
            no_ip
                .vxlan_v6_data()
                .unwrap_err()
                .to_string()
                .contains("PublicIPv6")
        );
        let no_data = LeaseValue::parse(
            br#"{"PublicIP":"1.2.3.4","PublicIPv6":"2001:db8::1","BackendType":"vxlan"}"#,
        )
        .unwrap();
        assert!(
            no_data
                .vxlan_v6_data()
                .unwrap_err()
                .to_string()
                .contains("BackendV6Data")
        );
        let bad = LeaseValue::parse(br#"{"PublicIP":"1.2.3.4","PublicIPv6":"2001:db8::1","BackendType":"vxlan","BackendV6Data":{"VtepMAC":"nope"}}"#).unwrap();
        let e = bad.vxlan_v6_data().unwrap_err().to_string();
        assert!(e.starts_with("BackendV6Data is not valid"), "{e}");
        assert!(LeaseValue::parse(br#"{"PublicIP":"1.2.3.4","PublicIPv6":"1.2.3.4"}"#).is_err());
    }

    #[test]
    fn mac_parse() {
        let m: MacAddr = "0a:1b:2c:3d:4e:5f".parse().unwrap();
        assert_eq!(m.to_string(), "0a:1b:2c:3d:4e:5f");
        assert!("0a:1b:2c:3d:4e".parse::<MacAddr>().is_err());
        assert!("0a:1b:2c:3d:4e:5f:00".parse::<MacAddr>().is_err());
        assert_eq!(
            "zz:1b:2c:3d:4e:5f"
                .parse::<MacAddr>()
                .unwrap_err()
                .to_string(),
            "\"zz:1b:2c:3d:4e:5f\" is not a MAC address"
        );
        assert!(
            !"01:00:00:00:00:00"
                .parse::<MacAddr>()
                .unwrap()
                .is_valid_unicast()
        );
    }

    #[test]
    fn flannel_value_parses() {
        let v = LeaseValue::parse(
            br#"{"PublicIP":"192.168.100.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:f0"}}"#,
        )
        .unwrap();
        assert_eq!(v.public_ip, Ipv4Addr::new(192, 168, 100, 3));
        let d = v.vxlan_data().unwrap();
        assert_eq!(d.vni, 1);
        assert_eq!(d.vtep_mac.to_string(), "aa:bb:cc:dd:ee:f0");
        assert!(v.belongs_to("whatever", Ipv4Addr::new(192, 168, 100, 3)));
    }

    #[test]
    fn tartan_value_roundtrip() {
        let v = LeaseValue::vxlan(
            Ipv4Addr::new(10, 0, 0, 1),
            1,
            "02:00:00:00:00:01".parse().unwrap(),
            "n1",
        );
        let back = LeaseValue::parse(&v.to_bytes()).unwrap();
        assert_eq!(v, back);
        assert!(back.belongs_to("n1", Ipv4Addr::new(1, 1, 1, 1)));
        assert!(!back.belongs_to("n2", Ipv4Addr::new(10, 0, 0, 1)));
    }

    #[test]
    fn garbage_rejected() {
        assert!(LeaseValue::parse(b"garbage").is_err());
        assert!(LeaseValue::parse(b"{}").is_err());
        let v = LeaseValue::parse(br#"{"PublicIP":"1.2.3.4","BackendType":"udp"}"#).unwrap();
        assert_eq!(
            v.vxlan_data().unwrap_err().to_string(),
            "BackendType \"udp\" is not vxlan"
        );
        let v = LeaseValue::parse(
            br#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VtepMAC":"nope"}}"#,
        )
        .unwrap();
        let e = v.vxlan_data().unwrap_err().to_string();
        assert!(e.starts_with("BackendData is not valid: VtepMAC: "), "{e}");
    }
}

#[cfg(test)]
mod proptests;
