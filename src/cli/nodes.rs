//! `tartanctl nodes`: subnet leases with their node, address, VTEP MAC and expiry.

use anyhow::Result;
use serde::Serialize;

use super::{OutputFormat, render_table};
use crate::model::netconf::NetworkConfig;
use crate::model::node_record::NodeRecord;
use crate::model::subnet_lease::{LeaseValue, subnet_from_key};
use crate::overlay::plan::peers_from_items;
use crate::store::etcd::{EtcdArgs, Store};

#[derive(Serialize)]
struct Row {
    node: Option<String>,
    subnet: String,
    public_ip: Option<String>,
    vtep_mac: Option<String>,
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
    // Leases every peer leaves out (a VTEP MAC or public IP claimed twice), with the reason.
    let conflicts: std::collections::HashMap<String, String> =
        match store.get(&etcd.config_key()).await? {
            Some(kv) => match NetworkConfig::parse(&kv.value) {
                Ok(cfg) => {
                    let live = crate::node::liveness::live_claims(&node_items);
                    peers_from_items(&items, &cfg, None, &live)
                        .conflicts
                        .into_iter()
                        .map(|c| (c.key, format!("left out by every peer: {}", c.reason)))
                        .collect()
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
        let subnet = subnet_from_key(&suffix)
            .map(|s| s.to_string())
            .unwrap_or(suffix);
        let expires = if it.lease != 0 {
            store.lease_ttl(it.lease).await.ok().flatten()
        } else {
            None
        };
        let (node, ip, mac, problem) = match LeaseValue::parse(&it.value) {
            Ok(v) => {
                let mac = v.vxlan_data().ok().map(|d| d.vtep_mac.to_string());
                (
                    v.node_name.clone(),
                    Some(v.public_ip.to_string()),
                    mac,
                    conflicts.get(&it.key).cloned(),
                )
            }
            Err(e) => (None, None, None, Some(e.to_string())),
        };
        rows.push(Row {
            alive: node.as_ref().is_some_and(|n| alive.contains(n)),
            node,
            subnet,
            public_ip: ip,
            vtep_mac: mac,
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
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.node.clone().unwrap_or_else(|| "-".into()),
                        r.subnet.clone(),
                        r.public_ip.clone().unwrap_or_else(|| "-".into()),
                        r.vtep_mac.clone().unwrap_or_else(|| "-".into()),
                        r.kind.to_string(),
                        match (r.kind, r.expires_in_secs) {
                            ("reservation", _) => "never".into(),
                            (_, Some(s)) => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
                            (_, None) => "expired".into(),
                        },
                        if r.alive { "yes".into() } else { "no".into() },
                        r.problem.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            print!(
                "{}",
                render_table(
                    &[
                        "NODE",
                        "SUBNET",
                        "PUBLIC-IP",
                        "VTEP-MAC",
                        "KIND",
                        "EXPIRES",
                        "ALIVE",
                        "PROBLEM"
                    ],
                    &table
                )
            );
        }
    }
    Ok(())
}
