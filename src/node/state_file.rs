//! A node's identity on disk: its VTEP MAC (derived from the node name, so it is the same after
//! a reboot even when the state directory is lost) and the subnet it last held.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ipnetwork::{Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};

use crate::model::subnet_env::write_file_atomic;
use crate::model::subnet_lease::MacAddr;

/// The VTEP MAC for a node name: a locally administered unicast address from a 64-bit FNV-1a
/// hash of the name
/// (with a finalizer). Stable across restarts, reboots and re-installs.
pub fn vtep_mac_for(node_name: &str) -> MacAddr {
    mac_from_hash(b"tartan-vtep:", node_name)
}

/// The IPv6 VTEP's MAC for a node name (a device of its own, flannel's `flannel-v6.<VNI>`
/// counterpart): the same derivation with another salt, so it differs from the IPv4 one.
pub fn vtep_mac6_for(node_name: &str) -> MacAddr {
    mac_from_hash(b"tartan-vtep6:", node_name)
}

fn mac_from_hash(salt: &[u8], node_name: &str) -> MacAddr {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in salt.iter().chain(node_name.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // murmur3's 64-bit finalizer: names differing in one character get unrelated MACs.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    let b = h.to_be_bytes();
    // 0x02: locally administered, unicast.
    MacAddr([(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]])
}

/// What a node remembers between runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// The node name the state belongs to.
    pub node_name: String,
    /// The subnet last held.
    pub subnet: Option<Ipv4Network>,
    /// The VTEP MAC in use.
    pub vtep_mac: MacAddr,
    /// The IPv6 subnet last held (dual-stack networks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet6: Option<Ipv6Network>,
    /// The IPv6 VTEP's MAC in use (dual-stack networks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_mac6: Option<MacAddr>,
}

/// The state file for `node_name` in `dir`.
pub fn state_path(dir: &Path, node_name: &str) -> PathBuf {
    dir.join(format!("node-{node_name}.json"))
}

impl NodeState {
    /// Loads the state file; a missing or unreadable file yields `None` (logged by the caller).
    pub fn load(path: &Path) -> Result<Option<NodeState>> {
        match std::fs::read(path) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
                format!("state file {} is corrupt", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Saves atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).context("encoding node state")?;
        write_file_atomic(path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_is_stable_unicast_and_local() {
        let a = vtep_mac_for("node-1");
        assert_eq!(a, vtep_mac_for("node-1"));
        assert_ne!(a, vtep_mac_for("node-2"));
        assert!(a.is_valid_unicast());
        assert_eq!(a.0[0] & 0x02, 0x02);
        let a6 = vtep_mac6_for("node-1");
        assert!(a6.is_valid_unicast());
        assert_ne!(a6, a, "the IPv6 VTEP has a MAC of its own");
        assert_eq!(a6, vtep_mac6_for("node-1"));
    }

    #[test]
    fn state_roundtrip() {
        let dir = std::env::temp_dir().join(format!("tartan-state-{}", std::process::id()));
        let p = state_path(&dir, "n1");
        assert_eq!(NodeState::load(&p).unwrap(), None);
        let s = NodeState {
            node_name: "n1".into(),
            subnet: Some("10.1.2.0/24".parse().unwrap()),
            vtep_mac: vtep_mac_for("n1"),
            subnet6: None,
            vtep_mac6: None,
        };
        s.save(&p).unwrap();
        assert_eq!(NodeState::load(&p).unwrap(), Some(s.clone()));
        // Dual-stack: both subnets and both MACs come back.
        let dual = NodeState {
            subnet6: Some("fd00:10:244:3::/64".parse().unwrap()),
            vtep_mac6: Some(vtep_mac6_for("n1")),
            ..s.clone()
        };
        dual.save(&p).unwrap();
        assert_eq!(NodeState::load(&p).unwrap(), Some(dual));
        // A file written before dual-stack still loads.
        std::fs::write(
            &p,
            format!(
                r#"{{"node_name":"n1","subnet":"10.1.2.0/24","vtep_mac":"{}"}}"#,
                vtep_mac_for("n1")
            ),
        )
        .unwrap();
        assert_eq!(NodeState::load(&p).unwrap(), Some(s));
        std::fs::write(&p, b"junk").unwrap();
        assert!(NodeState::load(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
