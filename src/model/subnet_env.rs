//! `subnet.env` in flannel's format, written atomically (temp file, fsync, rename), and read
//! back by the CNI plugin.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use ipnetwork::{Ipv4Network, Ipv6Network};

use crate::model::DecodeError;

/// The facts `subnet.env` carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK`: the whole cluster network.
    pub network: Ipv4Network,
    /// `FLANNEL_SUBNET`: the node subnet, written as its first address with the prefix
    /// (flannel's form, e.g. `10.244.3.1/24`).
    pub subnet: Ipv4Network,
    /// `FLANNEL_MTU`.
    pub mtu: u32,
    /// `FLANNEL_IPMASQ`.
    pub ipmasq: bool,
    /// `TARTAN_CLUSTER_DNS` and `TARTAN_CLUSTER_DOMAIN`: the cluster DNS the CNI result
    /// hands to pods (tartan's own keys; flannel's readers ignore them).
    pub cluster_dns: Option<ClusterDns>,
    /// `FLANNEL_IPV6_NETWORK` and `FLANNEL_IPV6_SUBNET`: the IPv6 half of a dual-stack node.
    pub ipv6: Option<Ipv6Env>,
}

/// The IPv6 half of `subnet.env` (flannel's dual-stack keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Env {
    /// `FLANNEL_IPV6_NETWORK`: the whole IPv6 cluster network.
    pub network: Ipv6Network,
    /// `FLANNEL_IPV6_SUBNET`: the node's IPv6 subnet, written as its first address with the
    /// prefix (`fd00:10:244:3::1/64`).
    pub subnet: Ipv6Network,
}

/// The cluster DNS pods are told about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterDns {
    /// The nameserver address.
    pub ip: std::net::Ipv4Addr,
    /// The cluster domain, without the trailing dot (`cluster.local`).
    pub domain: String,
}

impl SubnetEnv {
    /// The file contents. A /32 subnet has no "first address" past its own: it is written
    /// as itself (found by the round-trip property: `network + 1` named another /32, and
    /// overflowed for 255.255.255.255/32).
    pub fn render(&self) -> String {
        let net = u32::from(self.subnet.network());
        let first = if self.subnet.prefix() < 32 {
            net + 1
        } else {
            net
        };
        let mut s = format!(
            "FLANNEL_NETWORK={}/{}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network.network(),
            self.network.prefix(),
            std::net::Ipv4Addr::from(first),
            self.subnet.prefix(),
            self.mtu,
            self.ipmasq
        );
        if let Some(v6) = &self.ipv6 {
            let net = u128::from(v6.subnet.network());
            let first = if v6.subnet.prefix() < 128 {
                net + 1
            } else {
                net
            };
            s.push_str(&format!(
                "FLANNEL_IPV6_NETWORK={}/{}\nFLANNEL_IPV6_SUBNET={}/{}\n",
                v6.network.network(),
                v6.network.prefix(),
                std::net::Ipv6Addr::from(first),
                v6.subnet.prefix()
            ));
        }
        if let Some(d) = &self.cluster_dns {
            s.push_str(&format!(
                "TARTAN_CLUSTER_DNS={}\nTARTAN_CLUSTER_DOMAIN={}\n",
                d.ip, d.domain
            ));
        }
        s
    }

    /// Parses the file contents; unknown keys are ignored.
    pub fn parse(text: &str) -> Result<SubnetEnv, DecodeError> {
        let bad = |key: &str, v: &str, why: &str| DecodeError::invalid(key, format!("{v:?} {why}"));
        let mut network = None;
        let mut subnet = None;
        let mut mtu = None;
        let mut ipmasq = false;
        let (mut dns_ip, mut domain) = (None, None);
        let (mut network6, mut subnet6) = (None, None);
        for line in text.lines() {
            let Some((k, v)) = line.trim().split_once('=') else {
                continue;
            };
            match k.trim() {
                "FLANNEL_NETWORK" => {
                    network = Some(
                        v.trim()
                            .parse::<Ipv4Network>()
                            .map_err(|_| bad("FLANNEL_NETWORK", v, "is not an IPv4 CIDR"))?,
                    )
                }
                "FLANNEL_SUBNET" => {
                    let n: Ipv4Network = v
                        .trim()
                        .parse()
                        .map_err(|_| bad("FLANNEL_SUBNET", v, "is not an IPv4 CIDR"))?;
                    subnet = Some(
                        Ipv4Network::new(n.network(), n.prefix())
                            .map_err(|_| bad("FLANNEL_SUBNET", v, "is invalid"))?,
                    );
                }
                "FLANNEL_MTU" => {
                    mtu = Some(
                        v.trim()
                            .parse::<u32>()
                            .map_err(|_| bad("FLANNEL_MTU", v, "is not a number"))?,
                    )
                }
                "FLANNEL_IPMASQ" => ipmasq = v.trim() == "true",
                "FLANNEL_IPV6_NETWORK" => {
                    network6 = Some(
                        v.trim()
                            .parse::<Ipv6Network>()
                            .map_err(|_| bad("FLANNEL_IPV6_NETWORK", v, "is not an IPv6 CIDR"))?,
                    )
                }
                "FLANNEL_IPV6_SUBNET" => {
                    let n: Ipv6Network = v
                        .trim()
                        .parse()
                        .map_err(|_| bad("FLANNEL_IPV6_SUBNET", v, "is not an IPv6 CIDR"))?;
                    subnet6 = Some(
                        Ipv6Network::new(n.network(), n.prefix())
                            .map_err(|_| bad("FLANNEL_IPV6_SUBNET", v, "is invalid"))?,
                    );
                }
                "TARTAN_CLUSTER_DNS" => {
                    dns_ip = Some(
                        v.trim()
                            .parse::<std::net::Ipv4Addr>()
                            .map_err(|_| bad("TARTAN_CLUSTER_DNS", v, "is not an IPv4 address"))?,
                    )
                }
                "TARTAN_CLUSTER_DOMAIN" => {
                    let d = v.trim().trim_end_matches('.');
                    let ok = !d.is_empty()
                        && d.len() <= 253
                        && d.split('.').all(|l| {
                            !l.is_empty()
                                && l.len() <= 63
                                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                        });
                    if !ok {
                        return Err(bad("TARTAN_CLUSTER_DOMAIN", v, "is not a domain name"));
                    }
                    domain = Some(d.to_ascii_lowercase());
                }
                _ => {}
            }
        }
        Ok(SubnetEnv {
            network: network.ok_or_else(|| DecodeError::missing("FLANNEL_NETWORK"))?,
            subnet: subnet.ok_or_else(|| DecodeError::missing("FLANNEL_SUBNET"))?,
            mtu: mtu.ok_or_else(|| DecodeError::missing("FLANNEL_MTU"))?,
            ipmasq,
            cluster_dns: dns_ip.map(|ip| ClusterDns {
                ip,
                domain: domain.unwrap_or_else(|| "cluster.local".into()),
            }),
            ipv6: match (network6, subnet6) {
                (None, None) => None,
                (Some(network), Some(subnet)) => Some(Ipv6Env { network, subnet }),
                (Some(_), None) => return Err(DecodeError::missing("FLANNEL_IPV6_SUBNET")),
                (None, Some(_)) => return Err(DecodeError::missing("FLANNEL_IPV6_NETWORK")),
            },
        })
    }

    /// Writes the file atomically at `path`; unchanged content is not rewritten.
    pub fn write_atomic(&self, path: &Path) -> Result<()> {
        let text = self.render();
        if std::fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        write_file_atomic(path, text.as_bytes())
    }
}

/// Writes `bytes` to `path` via a temporary file in the same directory, fsync and rename.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_dns_keys_round_trip_and_are_checked() {
        let e = SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.3.0/24".parse().unwrap(),
            mtu: 1450,
            ipmasq: true,
            cluster_dns: Some(ClusterDns {
                ip: "10.96.0.10".parse().unwrap(),
                domain: "cluster.local".into(),
            }),
            ipv6: None,
        };
        assert_eq!(SubnetEnv::parse(&e.render()).unwrap(), e);
        let bad = e.render().replace("cluster.local", "bad..domain");
        let err = SubnetEnv::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("TARTAN_CLUSTER_DOMAIN"), "{err}");
    }

    #[test]
    fn flannel_format_roundtrip() {
        let e = SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.3.0/24".parse().unwrap(),
            mtu: 1450,
            ipmasq: true,
            cluster_dns: None,
            ipv6: None,
        };
        let t = e.render();
        assert_eq!(
            t,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        assert_eq!(SubnetEnv::parse(&t).unwrap(), e);
        assert!(SubnetEnv::parse("FLANNEL_NETWORK=x").is_err());
        assert!(SubnetEnv::parse("").is_err());
    }

    #[test]
    fn the_dual_stack_keys_are_flannels_and_come_in_pairs() {
        let e = SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.3.0/24".parse().unwrap(),
            mtu: 1430,
            ipmasq: true,
            cluster_dns: None,
            ipv6: Some(Ipv6Env {
                network: "fd00:10:244::/56".parse().unwrap(),
                subnet: "fd00:10:244:3::/64".parse().unwrap(),
            }),
        };
        let t = e.render();
        assert!(
            t.ends_with(
                "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:3::1/64\n"
            ),
            "{t}"
        );
        assert_eq!(SubnetEnv::parse(&t).unwrap(), e);
        let half = t.replace("FLANNEL_IPV6_SUBNET=fd00:10:244:3::1/64\n", "");
        let err = SubnetEnv::parse(&half).unwrap_err().to_string();
        assert!(err.contains("FLANNEL_IPV6_SUBNET"), "{err}");
        let bad = t.replace("fd00:10:244:3::1/64", "10.0.0.1/24");
        let err = SubnetEnv::parse(&bad).unwrap_err().to_string();
        assert!(
            err.contains("FLANNEL_IPV6_SUBNET") && err.contains("IPv6"),
            "{err}"
        );
    }

    #[test]
    fn a_slash_32_subnet_round_trips() {
        // Kept from the round-trip property (0.0.0.0/32 came back as 0.0.0.1/32; the last
        // address overflowed).
        for s in ["0.0.0.0/32", "255.255.255.255/32", "255.255.255.254/31"] {
            let e = SubnetEnv {
                network: "0.0.0.0/0".parse().unwrap(),
                subnet: s.parse().unwrap(),
                mtu: 0,
                ipmasq: false,
                cluster_dns: None,
                ipv6: None,
            };
            assert_eq!(SubnetEnv::parse(&e.render()).unwrap(), e, "{s}");
        }
    }

    #[test]
    fn atomic_write() {
        let dir = std::env::temp_dir().join(format!("tartan-env-{}", std::process::id()));
        let p = dir.join("subnet.env");
        let e = SubnetEnv {
            network: "10.0.0.0/8".parse().unwrap(),
            subnet: "10.1.0.0/24".parse().unwrap(),
            mtu: 1400,
            ipmasq: false,
            cluster_dns: None,
            ipv6: None,
        };
        e.write_atomic(&p).unwrap();
        assert_eq!(
            SubnetEnv::parse(&std::fs::read_to_string(&p).unwrap()).unwrap(),
            e
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod proptests;
