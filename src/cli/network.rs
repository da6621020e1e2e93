//! `tartanctl network init|show`: the flannel network config.

use anyhow::{Context, Result, bail};
use ipnetwork::Ipv4Network;

use crate::model::netconf::NetworkConfig;
use crate::model::service::{RangeContext, check_cluster_network};
use crate::store::etcd::{EtcdArgs, Store};

/// `tartanctl network ...`
#[derive(clap::Subcommand, Debug)]
pub enum NetworkCmd {
    /// Write the network config (flannel's JSON) to `<etcd-prefix>/config`.
    Init(InitArgs),
    /// Print the stored network config.
    Show,
}

/// Flags of `network init`.
#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// The cluster network, e.g. 10.244.0.0/16.
    #[arg(long)]
    pub network: Ipv4Network,
    /// Prefix length of each node's subnet (default as flannel: 24, or network+2 when small).
    #[arg(long)]
    pub subnet_len: Option<u8>,
    /// First leasable subnet.
    #[arg(long)]
    pub subnet_min: Option<std::net::Ipv4Addr>,
    /// Last leasable subnet.
    #[arg(long)]
    pub subnet_max: Option<std::net::Ipv4Addr>,
    /// VXLAN network identifier.
    #[arg(long, default_value_t = crate::model::netconf::DEFAULT_VNI)]
    pub vni: u32,
    /// VXLAN UDP port.
    #[arg(long, default_value_t = crate::model::netconf::DEFAULT_VXLAN_PORT)]
    pub port: u16,
    /// Route directly to peers on the same L2 segment.
    #[arg(long)]
    pub direct_routing: bool,
    /// Replace an existing config (nodes must be restarted to pick it up).
    #[arg(long)]
    pub force: bool,
    /// The service CIDR the nodes use (the network must not overlap it).
    #[arg(long, env = "TARTAN_SERVICE_CIDR", default_value = "10.96.0.0/12")]
    pub service_cidr: Ipv4Network,
}

/// Runs `network ...`.
pub async fn run(etcd: &EtcdArgs, cmd: NetworkCmd) -> Result<()> {
    let store = Store::connect(etcd).await?;
    match cmd {
        NetworkCmd::Show => {
            let kv = store
                .get(&etcd.config_key())
                .await?
                .with_context(|| format!("no network config at {}", etcd.config_key()))?;
            println!("{}", String::from_utf8_lossy(&kv.value));
            Ok(())
        }
        NetworkCmd::Init(a) => {
            let mut raw = serde_json::json!({
                "Network": a.network.to_string(),
                "Backend": {"Type": "vxlan", "VNI": a.vni, "Port": a.port, "DirectRouting": a.direct_routing},
            });
            if let Some(l) = a.subnet_len {
                raw["SubnetLen"] = l.into();
            }
            if let Some(m) = a.subnet_min {
                raw["SubnetMin"] = m.to_string().into();
            }
            if let Some(m) = a.subnet_max {
                raw["SubnetMax"] = m.to_string().into();
            }
            let json = raw.to_string();
            let cfg = NetworkConfig::parse(json.as_bytes())?;
            let node_ips = super::service::node_public_ips(&store, etcd).await?;
            let ctx = RangeContext {
                underlay: node_ips.into_iter().map(Ipv4Network::from).collect(),
                etcd: etcd.endpoint_addrs().iter().map(|a| *a.ip()).collect(),
            };
            check_cluster_network(cfg.network, Some(a.service_cidr), &ctx)
                .map_err(|e| anyhow::anyhow!("--network: {e}"))?;
            let key = etcd.config_key();
            if a.force {
                store.put(&key, json.clone(), 0).await?;
            } else if !store.create_if_absent(&key, json.clone(), 0).await? {
                let cur = store.get(&key).await?.map(|k| k.value).unwrap_or_default();
                if cur == json.as_bytes() {
                    println!("network config already set: {json}");
                    return Ok(());
                }
                bail!(
                    "a different network config exists at {key}: {} (use --force to replace it)",
                    String::from_utf8_lossy(&cur)
                );
            }
            println!(
                "network {} with /{} subnets ({} leasable, VNI {}, port {}{}) written to {key}",
                cfg.network,
                cfg.subnet_len,
                cfg.subnet_count(),
                cfg.backend.vni,
                cfg.backend.port,
                if cfg.backend.direct_routing {
                    ", direct routing"
                } else {
                    ""
                }
            );
            Ok(())
        }
    }
}
