//! `tartanctl service create|get|list|delete` and `tartanctl endpoints set|get`.

use crate::store::keys::pods_prefix;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::{Result, bail};
use ipnetwork::Ipv4Network;

use super::{OutputFormat, join_capped, render_table};
use crate::model::netconf::NetworkConfig;
use crate::model::pod::PodRecord;
use crate::model::service::{
    AddressGuard, DEFAULT_AFFINITY_TIMEOUT, ExplicitEndpoints, HEADLESS, IpFamilyPolicy,
    RangeContext, Service, ServiceCidrs, ServicePort, SessionAffinity, TrafficPolicy,
    check_service_cidr, check_service_cidr6,
};
use crate::store::etcd::{EtcdArgs, Store};
use crate::store::services::{NodePortRequest, ServiceStore, split_id};

/// Flags shared by service commands.
#[derive(clap::Args, Debug, Clone)]
pub struct ServiceRange {
    /// Ranges cluster IPs are allocated from: IPv4, and IPv6 for dual-stack services
    /// (`10.96.0.0/12,fd00:96::/108`).
    #[arg(
        long,
        env = "TARTAN_SERVICE_CIDR",
        default_value = "10.96.0.0/12",
        global = true
    )]
    pub service_cidr: ServiceCidrs,
    /// The cluster domain (for the DNS names `service list` shows).
    #[arg(
        long,
        env = "TARTAN_CLUSTER_DOMAIN",
        default_value = "cluster.local",
        global = true
    )]
    pub cluster_domain: String,
}

/// Public IPs of the nodes holding subnet leases (flannel's lease values).
pub async fn node_public_ips(store: &Store, etcd: &EtcdArgs) -> Result<Vec<Ipv4Addr>> {
    let (_, leases) = store.list(&etcd.subnets_prefix()).await?;
    let mut ips: Vec<Ipv4Addr> = leases
        .iter()
        .filter_map(|l| crate::model::subnet_lease::LeaseValue::parse(&l.value).ok())
        .map(|v| v.public_ip)
        .collect();
    ips.sort();
    ips.dedup();
    Ok(ips)
}

/// The cluster network of the stored config, if there is a valid one.
pub async fn cluster_network(store: &Store, etcd: &EtcdArgs) -> Result<Option<Ipv4Network>> {
    Ok(network_config(store, etcd).await?.map(|c| c.network))
}

/// The stored network config, if there is a valid one.
async fn network_config(store: &Store, etcd: &EtcdArgs) -> Result<Option<NetworkConfig>> {
    Ok(store
        .get(&etcd.config_key())
        .await?
        .and_then(|kv| NetworkConfig::parse(&kv.value).ok()))
}

impl ServiceRange {
    /// Checks `--service-cidr` against the cluster network, the nodes' addresses and the etcd
    /// endpoints, and returns the guard every address of a new service must pass.
    pub async fn checked_guard(&self, store: &Store, etcd: &EtcdArgs) -> Result<AddressGuard> {
        let node_ips = node_public_ips(store, etcd).await?;
        let cfg = network_config(store, etcd).await?;
        let net = cfg.as_ref().map(|c| c.network);
        let net6 = cfg
            .as_ref()
            .and_then(|c| c.ipv6.as_ref())
            .map(|p| p.network);
        let etcd_addrs = etcd.endpoint_addrs();
        let ctx = RangeContext {
            underlay: node_ips.iter().map(|ip| Ipv4Network::from(*ip)).collect(),
            etcd: etcd_addrs.iter().map(|a| *a.ip()).collect(),
        };
        check_service_cidr(self.service_cidr.v4, net, &ctx)
            .map_err(|e| anyhow::anyhow!("--service-cidr: {e}"))?;
        if let Some(c6) = self.service_cidr.v6 {
            let (_, leases) = store.list(&etcd.subnets_prefix()).await?;
            let nodes6: Vec<ipnetwork::Ipv6Network> = leases
                .iter()
                .filter_map(|l| crate::model::subnet_lease::LeaseValue::parse(&l.value).ok())
                .filter_map(|v| v.public_ipv6)
                .map(ipnetwork::Ipv6Network::from)
                .collect();
            check_service_cidr6(c6, net6, &nodes6)
                .map_err(|e| anyhow::anyhow!("--service-cidr: {e}"))?;
        }
        Ok(AddressGuard {
            service_cidr: self.service_cidr.v4,
            service_cidr6: self.service_cidr.v6,
            cluster_network: net,
            node_ips,
            etcd: etcd_addrs,
        })
    }
}

/// `tartanctl service ...`
#[derive(clap::Subcommand, Debug)]
pub enum ServiceCmd {
    /// Create a service with a cluster IP (and node ports).
    Create(CreateArgs),
    /// Show one service.
    Get {
        /// NAME or NAMESPACE/NAME.
        name: String,
        /// Namespace.
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// List services.
    List {
        /// Only this namespace.
        #[arg(short, long)]
        namespace: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Delete a service (and release its cluster IP and node ports).
    Delete {
        /// NAME or NAMESPACE/NAME.
        name: String,
        /// Namespace.
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
}

/// Session affinity as typed on the command line.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
pub enum AffinityArg {
    /// No affinity.
    #[default]
    None,
    /// Client-IP affinity.
    ClientIp,
}

/// Traffic policy as typed on the command line.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
pub enum PolicyArg {
    /// Any endpoint; client address masqueraded.
    #[default]
    Cluster,
    /// Local endpoints only; client address kept.
    Local,
}

/// `--cluster-ip`: an address, or `none` (any case) for a headless service.
fn parse_cluster_ip(s: &str) -> Result<Ipv4Addr, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(HEADLESS);
    }
    match s.parse::<Ipv4Addr>() {
        Ok(ip) if ip != HEADLESS => Ok(ip),
        _ => Err(format!(
            "{s:?} is neither an IPv4 address nor \"none\" (headless)"
        )),
    }
}

/// The cluster IPs as `service get/list` show them (`10.96.0.7,fd00:96::7`, `None`).
pub fn cluster_ip_text(s: &Service) -> String {
    if s.is_headless() {
        "None".into()
    } else {
        s.cluster_ips()
            .map(|ip| ip.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Flags of `service create`.
#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Service name (or NAMESPACE/NAME).
    pub name: String,
    /// Namespace.
    #[arg(short, long, default_value = "default")]
    pub namespace: String,
    /// `[NAME=]PORT[:TARGET][/tcp|udp]`, repeatable.
    #[arg(long = "port", required = true)]
    pub ports: Vec<ServicePort>,
    /// Label selector `k=v[,k=v]`; omit for explicit endpoints (`tartanctl endpoints set`).
    #[arg(long)]
    pub selector: Option<String>,
    /// A specific cluster IP instead of a random free one, or `none` for a headless service
    /// (no virtual IP; its DNS name resolves to its endpoints).
    #[arg(long, value_parser = parse_cluster_ip)]
    pub cluster_ip: Option<Ipv4Addr>,
    /// Node port for the i-th `--port` (30000-32767, or `auto`), repeatable.
    #[arg(long = "node-port")]
    pub node_ports: Vec<String>,
    /// Session affinity.
    #[arg(long, value_enum, default_value_t)]
    pub session_affinity: AffinityArg,
    /// Client-IP affinity timeout in seconds.
    #[arg(long, default_value_t = DEFAULT_AFFINITY_TIMEOUT)]
    pub affinity_timeout: u32,
    /// Which endpoints node-port traffic uses.
    #[arg(long, value_enum, default_value_t)]
    pub external_traffic_policy: PolicyArg,
    /// Kubernetes' `ipFamilyPolicy`: an IPv4 cluster IP only, or an IPv6 one beside it from
    /// the IPv6 `--service-cidr` (PreferDualStack: when there is one; RequireDualStack: or
    /// refuse). For a headless service: whether its name answers AAAA too.
    #[arg(long, value_enum, default_value_t)]
    pub ip_family_policy: IpFamilyPolicy,
}

/// Parses `k=v[,k=v]` in Kubernetes label syntax (see [`crate::model::service::parse_selector`]).
pub fn parse_selector(s: &str) -> Result<BTreeMap<String, String>> {
    crate::model::service::parse_selector(s).map_err(|e| anyhow::anyhow!("--selector: {e}"))
}

fn parse_node_port(s: &str) -> Result<NodePortRequest> {
    if s == "auto" {
        return Ok(NodePortRequest::Auto);
    }
    match s.parse::<u16>() {
        Ok(p) if (30000..=32767).contains(&p) => Ok(NodePortRequest::Port(p)),
        _ => bail!("--node-port {s:?}: use a port 30000-32767 or `auto`"),
    }
}

/// Ports shown per service in tables and messages; the rest are counted.
const MAX_PORTS_SHOWN: usize = 8;

fn ports_text(s: &Service) -> String {
    join_capped(
        s.ports.iter().map(|p| {
            let mut t = format!("{}:{}/{}", p.port, p.target_port, p.protocol);
            if let Some(np) = p.node_port {
                t.push_str(&format!(" (node {np})"));
            }
            t
        }),
        ", ",
        MAX_PORTS_SHOWN,
    )
}

fn selector_text(s: &Service) -> String {
    match &s.selector {
        None => "(explicit endpoints)".into(),
        Some(sel) => join_capped(sel.iter().map(|(k, v)| format!("{k}={v}")), ",", 8),
    }
}

async fn endpoint_count(store: &Store, etcd: &EtcdArgs, svcs: &[Service]) -> Result<Vec<usize>> {
    let (_, pods) = store.list(&pods_prefix(etcd)).await?;
    let pods: Vec<PodRecord> = pods
        .iter()
        .filter_map(|p| PodRecord::parse(&p.value).ok())
        .collect();
    let mut out = Vec::new();
    for s in svcs {
        if s.selector.is_some() {
            out.push(pods.iter().filter(|p| s.selects(p)).count());
        } else {
            let st = ServiceStore::new(store, etcd, "0.0.0.0/0".parse()?);
            out.push(
                st.get_endpoints(&s.namespace, &s.name)
                    .await
                    .ok()
                    .flatten()
                    .map_or(0, |e| e.addresses.len()),
            );
        }
    }
    Ok(out)
}

/// Runs `service ...`.
pub async fn run(etcd: &EtcdArgs, range: &ServiceRange, cmd: ServiceCmd) -> Result<()> {
    let store = Store::connect(etcd).await?;
    let st = ServiceStore::new(&store, etcd, range.service_cidr.v4);
    match cmd {
        ServiceCmd::Create(a) => {
            let (ns, name) = split_id(&a.name, &a.namespace)?;
            let selector = a.selector.as_deref().map(parse_selector).transpose()?;
            let node_ports = a
                .node_ports
                .iter()
                .map(|s| parse_node_port(s))
                .collect::<Result<Vec<_>>>()?;
            let st = st.with_guard(range.checked_guard(&store, etcd).await?);
            let svc = Service {
                namespace: ns,
                name,
                cluster_ip: Ipv4Addr::UNSPECIFIED,
                ports: a.ports,
                selector,
                session_affinity: match a.session_affinity {
                    AffinityArg::None => SessionAffinity::None,
                    AffinityArg::ClientIp => SessionAffinity::ClientIp,
                },
                session_affinity_timeout: a.affinity_timeout,
                external_traffic_policy: match a.external_traffic_policy {
                    PolicyArg::Cluster => TrafficPolicy::Cluster,
                    PolicyArg::Local => TrafficPolicy::Local,
                },
                cluster_ips: Vec::new(),
                ip_families: Vec::new(),
                ip_family_policy: a.ip_family_policy,
            };
            let created = st.create(svc, a.cluster_ip, &node_ports).await?;
            let v6 = created
                .cluster_ip6()
                .map(|ip| format!(", IPv6 cluster IP {ip}"))
                .unwrap_or_default();
            let v4 = if created.is_headless() {
                "None".to_string()
            } else {
                created.cluster_ip.to_string()
            };
            println!(
                "service {} created: cluster IP {v4}{v6}, ports {}",
                created.id(),
                ports_text(&created)
            );
            Ok(())
        }
        ServiceCmd::Get {
            name,
            namespace,
            output,
        } => {
            let (ns, name) = split_id(&name, &namespace)?;
            let Some((s, _)) = st.get(&ns, &name).await? else {
                bail!("service {ns}/{name} does not exist");
            };
            match output {
                // One object, as `kubectl get svc NAME -o json` prints it.
                OutputFormat::Json => {
                    println!("{}", serde_json::to_string_pretty(&s)?);
                    Ok(())
                }
                OutputFormat::Table => {
                    print_services(&store, etcd, &[s], output, &range.cluster_domain).await
                }
            }
        }
        ServiceCmd::List { namespace, output } => {
            let (svcs, bad) = st.list(namespace.as_deref()).await?;
            for b in bad {
                eprintln!("skipping malformed service record {b}");
            }
            print_services(&store, etcd, &svcs, output, &range.cluster_domain).await
        }
        ServiceCmd::Delete { name, namespace } => {
            let (ns, name) = split_id(&name, &namespace)?;
            st.delete(&ns, &name).await?;
            println!("service {ns}/{name} deleted");
            Ok(())
        }
    }
}

async fn print_services(
    store: &Store,
    etcd: &EtcdArgs,
    svcs: &[Service],
    output: OutputFormat,
    domain: &str,
) -> Result<()> {
    match output {
        // kubectl's List shape: `{"kind":"List","items":[...]}`.
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"kind": "List", "items": svcs}))?
        ),
        OutputFormat::Table => {
            let counts = endpoint_count(store, etcd, svcs).await?;
            let rows: Vec<Vec<String>> = svcs
                .iter()
                .zip(counts)
                .map(|(s, n)| {
                    vec![
                        s.namespace.clone(),
                        s.name.clone(),
                        format!(
                            "{}.{}.svc.{}",
                            s.name,
                            s.namespace,
                            domain.trim_end_matches('.')
                        ),
                        cluster_ip_text(s),
                        ports_text(s),
                        selector_text(s),
                        n.to_string(),
                        match s.session_affinity {
                            SessionAffinity::None => "-".into(),
                            SessionAffinity::ClientIp => {
                                format!("client-ip {}s", s.session_affinity_timeout)
                            }
                        },
                        match s.external_traffic_policy {
                            TrafficPolicy::Cluster => "cluster".into(),
                            TrafficPolicy::Local => "local".into(),
                        },
                    ]
                })
                .collect();
            print!(
                "{}",
                render_table(
                    &[
                        "NAMESPACE",
                        "NAME",
                        "DNS",
                        "CLUSTER-IP",
                        "PORTS",
                        "SELECTOR",
                        "ENDPOINTS",
                        "AFFINITY",
                        "POLICY"
                    ],
                    &rows
                )
            );
        }
    }
    Ok(())
}

/// `tartanctl endpoints ...`
#[derive(clap::Subcommand, Debug)]
pub enum EndpointsCmd {
    /// Set the endpoints of a selector-less service.
    Set {
        /// NAME or NAMESPACE/NAME.
        name: String,
        /// Namespace.
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// `IP` or `IP@NODE`, repeatable.
        #[arg(long = "address", required = true)]
        addresses: Vec<String>,
    },
    /// Show the endpoints of a selector-less service.
    Get {
        /// NAME or NAMESPACE/NAME.
        name: String,
        /// Namespace.
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
}

/// Runs `endpoints ...`.
pub async fn run_endpoints(etcd: &EtcdArgs, range: &ServiceRange, cmd: EndpointsCmd) -> Result<()> {
    let store = Store::connect(etcd).await?;
    let st = ServiceStore::new(&store, etcd, range.service_cidr.v4);
    match cmd {
        EndpointsCmd::Set {
            name,
            namespace,
            addresses,
        } => {
            let (ns, name) = split_id(&name, &namespace)?;
            let guard = range.checked_guard(&store, etcd).await?;
            let e = ExplicitEndpoints::from_args(&addresses, &guard).map_err(anyhow::Error::msg)?;
            st.set_endpoints(&ns, &name, &e).await?;
            println!("endpoints of {ns}/{name}: {}", addresses.join(", "));
            Ok(())
        }
        EndpointsCmd::Get { name, namespace } => {
            let (ns, name) = split_id(&name, &namespace)?;
            let Some((svc, _)) = st.get(&ns, &name).await? else {
                bail!("service {ns}/{name} does not exist");
            };
            if svc.selector.is_some() {
                bail!(
                    "service {ns}/{name} has a selector; its endpoints are its pods (see `tartanctl explain`)"
                );
            }
            match st.get_endpoints(&ns, &name).await? {
                None => println!("service {ns}/{name} has no explicit endpoints"),
                Some(e) => {
                    for a in e.addresses {
                        println!(
                            "{}{}",
                            a.ip,
                            a.node.map(|n| format!(" on {n}")).unwrap_or_default()
                        );
                    }
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_and_node_ports() {
        assert_eq!(parse_selector("app=web,tier=fe").unwrap().len(), 2);
        assert!(parse_selector("app").is_err());
        assert!(parse_selector("").is_err());
        assert!(parse_selector("app=web,,").is_err());
        assert_eq!(parse_node_port("auto").unwrap(), NodePortRequest::Auto);
        assert_eq!(
            parse_node_port("30080").unwrap(),
            NodePortRequest::Port(30080)
        );
        assert!(parse_node_port("80").is_err());
        assert!(parse_node_port("x").is_err());
    }
}
