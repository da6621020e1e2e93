//! Masquerade of pod traffic leaving the cluster network, with flannel's rules and semantics,
//! in tartan's own nftables tables `ip tartan_masq` and, for the IPv6 half of a dual-stack
//! network, `ip6 tartan_masq` (flannel's ip6tables counterpart).

use ipnetwork::{Ipv4Network, Ipv6Network};

/// nftables family of the masquerade table.
pub const FAMILY: &str = "ip";
/// nftables family of the IPv6 masquerade table.
pub const FAMILY6: &str = "ip6";
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
///
/// With `v6` (the IPv6 cluster network and this node's IPv6 subnet) the `ip6` table gets the
/// same rules (multicast being ff00::/8); without, an `ip6` table left from before is removed.
pub fn script(
    network: Ipv4Network,
    subnet: Ipv4Network,
    v6: Option<(Ipv6Network, Ipv6Network)>,
) -> String {
    format!(
        "table {FAMILY} {TABLE}\n\
         delete table {FAMILY} {TABLE}\n\
         table {FAMILY6} {TABLE}\n\
         delete table {FAMILY6} {TABLE}\n\
         {body}",
        body = table_body(network, subnet, v6)
    )
}

/// The tables' definitions alone (what `nft list table` should show, modulo formatting).
pub fn table_body(
    network: Ipv4Network,
    subnet: Ipv4Network,
    v6: Option<(Ipv6Network, Ipv6Network)>,
) -> String {
    let mut body = family_body(
        FAMILY,
        &format!("{}/{}", network.network(), network.prefix()),
        &format!("{}/{}", subnet.network(), subnet.prefix()),
        "224.0.0.0/4",
    );
    if let Some((network, subnet)) = v6 {
        body += &family_body(
            FAMILY6,
            &format!("{}/{}", network.network(), network.prefix()),
            &format!("{}/{}", subnet.network(), subnet.prefix()),
            "ff00::/8",
        );
    }
    body
}

/// One family's table: `ip` or `ip6` (also the keyword of its address matches).
fn family_body(family: &str, net: &str, sub: &str, multicast: &str) -> String {
    let ip = family;
    format!(
        "table {family} {TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tmeta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} return\n\
         \t\t{ip} saddr {sub} {ip} daddr {net} return\n\
         \t\t{ip} saddr {net} {ip} daddr {sub} return\n\
         \t\t{ip} saddr != {net} {ip} daddr {sub} return\n\
         \t\t{ip} saddr {net} {ip} daddr != {multicast} masquerade fully-random\n\
         \t\t{ip} saddr != {net} {ip} daddr {net} masquerade fully-random\n\
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
            None,
        );
        assert!(s.starts_with("table ip tartan_masq\ndelete table ip tartan_masq\n"));
        // An IPv6 table from a dual-stack past is removed, none is made.
        assert!(s.contains("delete table ip6 tartan_masq\n"));
        assert!(!s.contains("table ip6 tartan_masq {"));
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

    #[test]
    fn the_ipv6_half_gets_the_same_rules_in_its_own_table() {
        let s = script(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.3.0/24".parse().unwrap(),
            Some((
                "fd00:10:244::/56".parse().unwrap(),
                "fd00:10:244:3::/64".parse().unwrap(),
            )),
        );
        let v6 = &s[s.find("table ip6 tartan_masq {").expect("an ip6 table")..];
        let rules: Vec<&str> = v6
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("meta") || l.starts_with("ip6 "))
            .collect();
        assert_eq!(
            rules,
            vec![
                "meta mark & 0x4000 == 0x4000 return",
                "ip6 saddr fd00:10:244:3::/64 ip6 daddr fd00:10:244::/56 return",
                "ip6 saddr fd00:10:244::/56 ip6 daddr fd00:10:244:3::/64 return",
                "ip6 saddr != fd00:10:244::/56 ip6 daddr fd00:10:244:3::/64 return",
                "ip6 saddr fd00:10:244::/56 ip6 daddr != ff00::/8 masquerade fully-random",
                "ip6 saddr != fd00:10:244::/56 ip6 daddr fd00:10:244::/56 masquerade fully-random",
            ]
        );
    }
}
