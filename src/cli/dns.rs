//! `tartanctl dns lookup NAME`: asks a node's cluster DNS (through its daemon's admin
//! endpoint) and prints the answer with where it came from.

use std::net::SocketAddr;

use anyhow::{Result, bail};

use crate::api::status::DnsLookupReport;
use crate::cli::explain::{check_node, get_json, print_report};

/// `tartanctl dns ...`.
#[derive(clap::Subcommand, Debug)]
pub enum DnsCmd {
    /// Look a name up on a node's cluster DNS and say where the answer came from (service,
    /// endpoint, pod, forwarded, cached).
    Lookup {
        /// The name (`web`, `web.shop.svc.cluster.local`, `example.com`).
        name: String,
        /// Record type.
        #[arg(short = 't', long = "type", default_value = "A")]
        qtype: String,
        /// Namespace for a short name (`web` → `web.<ns>.svc.<domain>`).
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// The cluster domain (for short names).
        #[arg(long, env = "TARTAN_CLUSTER_DOMAIN", default_value = "cluster.local")]
        cluster_domain: String,
        /// Check that the daemon answering is this node.
        #[arg(long)]
        node: Option<String>,
        /// tartand's metrics/status address on that node.
        #[arg(long, default_value = "127.0.0.1:9402")]
        status_addr: SocketAddr,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A short name (no dot) is a service in `namespace`, as a pod's search list makes it.
pub fn qualify(name: &str, namespace: &str, domain: &str) -> String {
    if name.contains('.') {
        name.to_string()
    } else {
        format!("{name}.{namespace}.svc.{}", domain.trim_end_matches('.'))
    }
}

/// Renders a lookup like dig's answer section, with its source.
pub fn render(r: &DnsLookupReport) -> String {
    let mut o = format!(
        "{} {} from node {} ({}): {}{}, from {}\n",
        r.name,
        r.qtype,
        r.node,
        r.server,
        r.rcode,
        if r.truncated { " (truncated)" } else { "" },
        if r.source.is_empty() {
            "the zone (no records)".to_string()
        } else {
            r.source.join(", ")
        }
    );
    for l in &r.answers {
        o.push_str(&format!("  {l}\n"));
    }
    if r.answers.is_empty() {
        for l in &r.authority {
            o.push_str(&format!("  authority: {l}\n"));
        }
    }
    for l in &r.additional {
        o.push_str(&format!("  additional: {l}\n"));
    }
    o
}

/// Runs `tartanctl dns`.
pub async fn run(cmd: DnsCmd) -> Result<()> {
    let DnsCmd::Lookup {
        name,
        qtype,
        namespace,
        cluster_domain,
        node,
        status_addr,
        json,
    } = cmd;
    let t: hickory_proto::rr::RecordType = match qtype.to_ascii_uppercase().parse() {
        Ok(t) => t,
        Err(_) => bail!("--type {qtype:?} is not a DNS record type"),
    };
    let full = qualify(&name, &namespace, &cluster_domain);
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("name", &full)
        .append_pair("type", &t.to_string())
        .finish();
    let path = format!("/dns?{query}");
    let r: DnsLookupReport = get_json(status_addr, &path).await?;
    check_node(node.as_deref(), &r.node, status_addr)?;
    print_report(&r, json, render)
}

/// Percent-encodes what a query string value cannot carry as is.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_services_of_the_namespace() {
        assert_eq!(
            qualify("web", "shop", "cluster.local."),
            "web.shop.svc.cluster.local"
        );
        assert_eq!(
            qualify("example.com", "shop", "cluster.local"),
            "example.com"
        );
    }
}
