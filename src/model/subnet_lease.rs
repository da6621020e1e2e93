//! Subnet lease records in flannel's etcd layout: key `<prefix>/subnets/10.244.3.0-24`,
//! value `{"PublicIP":..,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":".."}}`.
//!
//! tartan adds one field flannel ignores, `NodeName`, so that a restarted node is matched by
//! identity rather than by address.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnetwork::Ipv4Network;
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

/// Parses flannel's key suffix `10.244.3.0-24` (the last path component of a subnet key).
pub fn subnet_from_key(key_suffix: &str) -> Result<Ipv4Network, DecodeError> {
    let quoted = || format!("{key_suffix:?}");
    let part = |why: String| DecodeError::invalid(format!("subnet key {key_suffix:?}"), why);
    let (ip, len) = key_suffix.rsplit_once('-').ok_or_else(|| {
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
        if self.backend_type != "vxlan" {
            return Err(DecodeError::value(
                "BackendType",
                format!("{:?}", self.backend_type),
                "is not vxlan",
            ));
        }
        let data = self
            .backend_data
            .as_ref()
            .ok_or_else(|| DecodeError::missing("BackendData"))?;
        let d: VxlanBackendData = crate::util::json_decode::from_value(data)
            .map_err(|e| DecodeError::json("BackendData is not valid", e))?;
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
