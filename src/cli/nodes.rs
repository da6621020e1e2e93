//! `tartanctl nodes`: subnet leases with their node, address, VTEP MAC and expiry; for a
//! dual-stack network also each lease's IPv6 subnet, IPv6 address and IPv6 VTEP MAC.

use anyhow::Result;
use serde::Serialize;

use super::{OutputFormat, render_table};
use crate::model::netconf::NetworkConfig;
use crate::model::node_record::NodeRecord;
use crate::model::subnet_lease::{LeaseValue, SubnetKey};
use crate::overlay::plan::{PeerSet, peers_from_items};
use crate::store::etcd::{EtcdArgs, Store};

#[derive(Serialize)]
struct Row {
    node: Option<String>,
    subnet: String,
    public_ip: Option<String>,
    vtep_mac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subnet6: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    public_ipv6: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vtep_mac6: Option<String>,
    kind: &'static str,
    expires_in_secs: Option<i64>,
    alive: bool,
    problem: Option<String>,
}

/// Runs `nodes`.
pub async fn run(etcd: &EtcdArgs, output: OutputFormat) -> Result<()> {
    let store = Store::connect(etcd).await?;
    let (_, items) = store.list(&etcd.subnets_prefix()).await?;
    let (_, node_items) = store.list(&crate::store::keys::nodes_prefix(etcd)).await?;
    // What every peer leaves out of a lease (a VTEP MAC or public IP claimed twice, a bad
    // IPv6 half), with the reason.
    let problems = match store.get(&etcd.config_key()).await? {
        Some(kv) => match NetworkConfig::parse(&kv.value) {
            Ok(cfg) => {
                let live = crate::node::liveness::live_claims(&node_items);
                problems_by_key(peers_from_items(&items, &cfg, None, &live))
            }
            Err(_) => Default::default(),
        },
        None => Default::default(),
    };
    let alive: std::collections::HashSet<String> = node_items
        .iter()
        .filter_map(|i| serde_json::from_slice::<NodeRecord>(&i.value).ok())
        .map(|r| r.name)
        .collect();
    let mut rows = Vec::new();
    for it in items {
        let suffix = it.key.rsplit('/').next().unwrap_or_default().to_string();
        let (subnet, subnet6) = match SubnetKey::parse(&suffix) {
            Ok(k) => (k.v4.to_string(), k.v6.map(|s| s.to_string())),
            Err(_) => (suffix, None),
        };
        let expires = if it.lease != 0 {
            store.lease_ttl(it.lease).await.ok().flatten()
        } else {
            None
        };
        let (node, ip, mac, v6, problem) = match LeaseValue::parse(&it.value) {
            Ok(v) => {
                let mac = v.vxlan_data().ok().map(|d| d.vtep_mac.to_string());
                let mac6 = v
                    .vxlan_v6_data()
                    .ok()
                    .flatten()
                    .map(|(_, d)| d.vtep_mac.to_string());
                (
                    v.node_name.clone(),
                    Some(v.public_ip.to_string()),
                    mac,
                    (v.public_ipv6.map(|ip| ip.to_string()), mac6),
                    problems.get(&it.key).map(|p| p.join("; ")),
                )
            }
            Err(e) => (None, None, None, (None, None), Some(e.to_string())),
        };
        rows.push(Row {
            alive: node.as_ref().is_some_and(|n| alive.contains(n)),
            node,
            subnet,
            public_ip: ip,
            vtep_mac: mac,
            subnet6,
            public_ipv6: v6.0,
            vtep_mac6: v6.1,
            kind: if it.lease == 0 {
                "reservation"
            } else {
                "lease"
            },
            expires_in_secs: expires,
            problem,
        });
    }
    rows.sort_by(|a, b| (&a.node, &a.subnet).cmp(&(&b.node, &b.subnet)));
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        OutputFormat::Table => {
            // The IPv6 columns only when some lease is dual-stack.
            let dual = rows.iter().any(|r| r.subnet6.is_some());
            let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    let mut row = vec![
                        dash(&r.node),
                        r.subnet.clone(),
                        dash(&r.public_ip),
                        dash(&r.vtep_mac),
                    ];
                    if dual {
                        row.extend([dash(&r.subnet6), dash(&r.public_ipv6), dash(&r.vtep_mac6)]);
                    }
                    row.extend([
                        r.kind.to_string(),
                        match (r.kind, r.expires_in_secs) {
                            ("reservation", _) => "never".into(),
                            (_, Some(s)) => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
                            (_, None) => "expired".into(),
                        },
                        if r.alive { "yes".into() } else { "no".into() },
                        r.problem.clone().unwrap_or_default(),
                    ]);
                    row
                })
                .collect();
            let mut header = vec!["NODE", "SUBNET", "PUBLIC-IP", "VTEP-MAC"];
            if dual {
                header.extend(["SUBNET6", "PUBLIC-IPV6", "VTEP-MAC6"]);
            }
            header.extend(["KIND", "EXPIRES", "ALIVE", "PROBLEM"]);
            print!("{}", render_table(&header, &table));
        }
    }
    Ok(())
}

/// What every peer leaves out of each lease key, for people: lost conflicts of either half
/// and IPv6 halves that could not be read (the IPv4 half of such a lease is still a peer).
fn problems_by_key(set: PeerSet) -> std::collections::HashMap<String, Vec<String>> {
    let mut out: std::collections::HashMap<String, Vec<String>> = Default::default();
    for c in set.conflicts {
        out.entry(c.key)
            .or_default()
            .push(format!("left out by every peer: {}", c.reason));
    }
    for c in set.conflicts6 {
        out.entry(c.key)
            .or_default()
            .push(format!("IPv6 half left out by every peer: {}", c.reason));
    }
    for (key, why) in set.ipv6_ignored {
        out.entry(key)
            .or_default()
            .push(format!("IPv6 half ignored: {why}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::etcd::KvItem;

    #[test]
    fn both_halves_problems_are_said_on_their_lease() {
        let cfg = NetworkConfig::parse(
            br#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","IPv6SubnetLen":64}"#,
        )
        .unwrap();
        let lease = |key: &str, n: u8, mac6: &str| {
            KvItem {
            key: format!("/coreos.com/network/subnets/{key}"),
            value: format!(
                r#"{{"PublicIP":"192.168.1.{n}","PublicIPv6":"fd00:1::{n}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:00:00:00:00:0{n}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}"#
            )
            .into_bytes(),
            lease: i64::from(n),
            mod_revision: i64::from(n),
        }
        };
        let items = [
            lease("10.244.1.0-24&fd00:10:244:1::-64", 1, "02:00:00:00:06:01"),
            // Same IPv6 VTEP MAC as the older lease 1.
            lease("10.244.2.0-24&fd00:10:244:2::-64", 2, "02:00:00:00:06:01"),
            // IPv6 subnet outside the pool.
            lease("10.244.3.0-24&fd00:99:0:3::-64", 3, "02:00:00:00:06:03"),
        ];
        let p = problems_by_key(peers_from_items(&items, &cfg, None, &[]));
        let at = |k: &str| p.get(&format!("/coreos.com/network/subnets/{k}")).cloned();
        assert_eq!(at("10.244.1.0-24&fd00:10:244:1::-64"), None);
        let two = at("10.244.2.0-24&fd00:10:244:2::-64").unwrap();
        assert!(
            two[0].starts_with("IPv6 half left out by every peer: VTEP MAC 02:00:00:00:06:01"),
            "{two:?}"
        );
        let three = at("10.244.3.0-24&fd00:99:0:3::-64").unwrap();
        assert!(
            three[0].starts_with("IPv6 half ignored: subnet fd00:99:0:3::/64 is not a /64"),
            "{three:?}"
        );
    }
}
