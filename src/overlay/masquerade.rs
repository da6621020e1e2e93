//! Masquerade of pod traffic leaving the cluster network, with flannel's rules and semantics,
//! in tartan's own nftables table `ip tartan_masq`.

use ipnetwork::Ipv4Network;

/// nftables family of the masquerade table.
pub const FAMILY: &str = "ip";
/// Name of the masquerade table.
pub const TABLE: &str = "tartan_masq";
/// Packet mark the service proxy sets on traffic it masquerades itself (kube-proxy's bit).
pub const MASQ_MARK: u32 = 0x4000;

/// The masquerade table for a node holding `subnet` in `network`, as an atomic nft script
/// that replaces any previous version of the table and touches nothing else.
///
/// Rules, in flannel's order:
/// 1. traffic the service proxy marked is left to the service proxy;
/// 2. this node's pods to the cluster network: not masqueraded;
/// 3. cluster network to this node's pods: not masqueraded;
/// 4. outside to this node's pods: not masqueraded (keeps client addresses);
/// 5. cluster network to anywhere else except multicast: masqueraded;
/// 6. the host (outside the cluster network) to the cluster network: masqueraded.
pub fn script(network: Ipv4Network, subnet: Ipv4Network) -> String {
    format!(
        "table {FAMILY} {TABLE}\n\
         delete table {FAMILY} {TABLE}\n\
         {body}",
        body = table_body(network, subnet)
    )
}

/// The table definition alone (what `nft list table` should show, modulo formatting).
pub fn table_body(network: Ipv4Network, subnet: Ipv4Network) -> String {
    let net = format!("{}/{}", network.network(), network.prefix());
    let sub = format!("{}/{}", subnet.network(), subnet.prefix());
    format!(
        "table {FAMILY} {TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tmeta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} return\n\
         \t\tip saddr {sub} ip daddr {net} return\n\
         \t\tip saddr {net} ip daddr {sub} return\n\
         \t\tip saddr != {net} ip daddr {sub} return\n\
         \t\tip saddr {net} ip daddr != 224.0.0.0/4 masquerade fully-random\n\
         \t\tip saddr != {net} ip daddr {net} masquerade fully-random\n\
         \t}}\n\
         }}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_follow_flannel() {
        let s = script(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.3.0/24".parse().unwrap(),
        );
        assert!(s.starts_with("table ip tartan_masq\ndelete table ip tartan_masq\n"));
        let rules: Vec<&str> = s
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("meta") || l.starts_with("ip "))
            .collect();
        assert_eq!(
            rules,
            vec![
                "meta mark & 0x4000 == 0x4000 return",
                "ip saddr 10.244.3.0/24 ip daddr 10.244.0.0/16 return",
                "ip saddr 10.244.0.0/16 ip daddr 10.244.3.0/24 return",
                "ip saddr != 10.244.0.0/16 ip daddr 10.244.3.0/24 return",
                "ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
                "ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random",
            ]
        );
    }
}
