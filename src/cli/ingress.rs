//! `tartanctl ingress create|get|list|delete` (routes by host and path to services),
//! `tartanctl ingress explain` (where a request goes, and why: `explain`) and
//! `tartanctl ingress cert put|list|delete` (TLS certificates for the ingress).

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};

use super::{OutputFormat, join_capped, render_table};
use crate::cni::bounded_read::read_regular_file;
use crate::model::DecodeError;
use crate::model::ingress::{
    HostPattern, IngressCert, IngressRoute, MAX_PEM_BYTES, PortRef, normalize_path,
};
use crate::model::service::valid_name;
use crate::store::etcd::{EtcdArgs, Store};
use crate::store::ingress::IngressStore;

pub mod explain;

/// `tartanctl ingress ...`
#[derive(clap::Subcommand, Debug)]
pub enum IngressCmd {
    /// Create a route: requests for HOST whose path starts with PATH go to
    /// NAMESPACE/SERVICE:PORT.
    Create(CreateArgs),
    /// Show one route.
    Get {
        /// Route name.
        name: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// List routes.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Delete a route.
    Delete {
        /// Route name.
        name: String,
    },
    /// Where a request goes and why: the host chosen, each candidate route's verdict, the
    /// backend, its target port and endpoints (read from etcd once).
    Explain {
        /// `HOST[/PATH]` (`shop.example.com/api/x?y=1`), or a URL (`http://HOST/PATH`).
        request: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
        /// The service range (explicit endpoints the ingress would refuse are left out).
        #[command(flatten)]
        range: crate::cli::service::ServiceRange,
    },
    /// TLS certificates for the ingress.
    #[command(subcommand)]
    Cert(CertCmd),
}

/// Flags of `ingress create`.
#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Route name (lowercase letters, digits and '-').
    pub name: String,
    /// `shop.example.com`, `*.apps.example.com` (exactly one label in front), or `*` (the
    /// default backend: any host no other route matches).
    #[arg(long, value_parser = HostPattern::parse)]
    pub host: HostPattern,
    /// Path prefix, matched on '/' boundaries (`/api` matches `/api/x`, not `/apix`).
    #[arg(long, default_value = "/")]
    pub path: String,
    /// The service's namespace.
    #[arg(short, long, default_value = "default")]
    pub namespace: String,
    /// The service; may be left out for a wildcard host, whose request host's first label
    /// then names the service.
    #[arg(long)]
    pub service: Option<String>,
    /// The service port: a number or a port name.
    #[arg(long)]
    pub port: PortRef,
}

/// `tartanctl ingress cert ...`
#[derive(clap::Subcommand, Debug)]
pub enum CertCmd {
    /// Store a certificate and its key (replacing one of the same name).
    Put {
        /// Certificate name.
        name: String,
        /// A host it serves (exact or `*.wildcard`), repeatable.
        #[arg(long = "host", value_name = "HOST", required = true, value_parser = HostPattern::parse)]
        hosts: Vec<HostPattern>,
        /// The certificate chain, a PEM file.
        #[arg(long)]
        cert: PathBuf,
        /// The private key, a PEM file.
        #[arg(long)]
        key: PathBuf,
    },
    /// List certificates (names and hosts; never the keys).
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Delete a certificate.
    Delete {
        /// Certificate name.
        name: String,
    },
}

/// Refuses a route or certificate name that is not a DNS label.
fn check_name(what: &str, name: &str) -> Result<()> {
    if !valid_name(name) {
        bail!("{what} name {name:?}: use lowercase letters, digits and '-' (at most 63)");
    }
    Ok(())
}

/// The route `ingress create` asks for, validated; errors name the flag at fault.
pub fn route_from_args(a: CreateArgs) -> Result<IngressRoute> {
    check_name("ingress route", &a.name)?;
    if a.service.is_none() && !a.host.is_wildcard() {
        bail!(
            "--service is required for host {:?}; only a wildcard host (*.example.com) may \
             leave it out, taking the service from the request host's first label",
            a.host.as_str()
        );
    }
    let route = IngressRoute {
        name: a.name,
        host: a.host,
        path: normalize_path(&a.path).map_err(flag_error)?,
        namespace: a.namespace,
        service: a.service,
        port: a.port,
    };
    route.validate().map_err(flag_error)?;
    Ok(route)
}

/// A route validation error as a flag error: the fields are named like the flags.
fn flag_error(e: DecodeError) -> anyhow::Error {
    anyhow!("--{e}")
}

/// The rows of `ingress get` and `ingress list`.
fn route_rows(routes: &[IngressRoute]) -> Vec<Vec<String>> {
    routes
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.host.to_string(),
                r.path.clone(),
                r.backend_text(),
            ]
        })
        .collect()
}

fn print_routes(routes: &[IngressRoute], output: OutputFormat) -> Result<()> {
    match output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"kind": "List", "items": routes}))?
        ),
        OutputFormat::Table => print!(
            "{}",
            render_table(&["NAME", "HOST", "PATH", "BACKEND"], &route_rows(routes))
        ),
    }
    Ok(())
}

/// Hosts shown per certificate in the table; the rest are counted.
const MAX_HOSTS_SHOWN: usize = 8;

fn print_certs(certs: &[IngressCert], output: OutputFormat) -> Result<()> {
    match output {
        OutputFormat::Json => {
            let items: Vec<serde_json::Value> = certs
                .iter()
                .map(|c| serde_json::json!({"name": c.name, "hosts": c.hosts}))
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({"kind": "List", "items": items}))?
            );
        }
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = certs
                .iter()
                .map(|c| {
                    vec![
                        c.name.clone(),
                        join_capped(
                            c.hosts.iter().map(HostPattern::to_string),
                            ", ",
                            MAX_HOSTS_SHOWN,
                        ),
                    ]
                })
                .collect();
            print!("{}", render_table(&["NAME", "HOSTS"], &rows));
        }
    }
    Ok(())
}

/// Reads a PEM file named by `flag` (a regular file of at most [`MAX_PEM_BYTES`], UTF-8).
fn read_pem(flag: &str, path: &Path) -> Result<String> {
    let bytes = read_regular_file(path, MAX_PEM_BYTES)
        .map_err(|e| anyhow!("{flag} {}: {e}", path.display()))?;
    String::from_utf8(bytes).map_err(|_| {
        anyhow!(
            "{flag} {}: is not text (a PEM file was expected)",
            path.display()
        )
    })
}

/// The certificate `ingress cert put` asks for, validated; errors name the flag at fault.
fn cert_from_args(
    name: String,
    hosts: Vec<HostPattern>,
    cert: &Path,
    key: &Path,
) -> Result<IngressCert> {
    check_name("ingress certificate", &name)?;
    let c = IngressCert {
        name,
        hosts,
        cert_pem: read_pem("--cert", cert)?,
        key_pem: read_pem("--key", key)?,
    };
    c.validate().map_err(|e| {
        let flag = match e.field() {
            "certPem" => format!("--cert {}", cert.display()),
            "keyPem" => format!("--key {}", key.display()),
            _ => "--host".into(),
        };
        anyhow!("{}", e.to_string().replacen(e.field(), &flag, 1))
    })?;
    Ok(c)
}

/// Runs `ingress ...`. Flags are checked (and files read) before etcd is asked anything.
pub async fn run(etcd: &EtcdArgs, cmd: IngressCmd) -> Result<()> {
    match cmd {
        IngressCmd::Create(a) => {
            let route = route_from_args(a)?;
            let store = Store::connect(etcd).await?;
            let st = IngressStore::new(&store, etcd);
            let (existing, _) = st.list_routes().await?;
            if let Some(other) = existing
                .iter()
                .find(|o| o.name != route.name && o.host == route.host && o.path == route.path)
            {
                bail!(
                    "ingress route {} already serves host {} path {} (to {}); delete it first",
                    other.name,
                    other.host,
                    other.path,
                    other.backend_text()
                );
            }
            st.create_route(&route).await?;
            println!(
                "ingress route {} created: {} {} → {}",
                route.name,
                route.host,
                route.path,
                route.backend_text()
            );
        }
        IngressCmd::Get { name, output } => {
            check_name("ingress route", &name)?;
            let store = Store::connect(etcd).await?;
            let Some(r) = IngressStore::new(&store, etcd).get_route(&name).await? else {
                bail!("ingress route {name} does not exist");
            };
            match output {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&r)?),
                OutputFormat::Table => print_routes(&[r], output)?,
            }
        }
        IngressCmd::List { output } => {
            let store = Store::connect(etcd).await?;
            let (routes, bad) = IngressStore::new(&store, etcd).list_routes().await?;
            for b in bad {
                eprintln!("skipping malformed ingress route record {b}");
            }
            print_routes(&routes, output)?;
        }
        IngressCmd::Delete { name } => {
            check_name("ingress route", &name)?;
            let store = Store::connect(etcd).await?;
            IngressStore::new(&store, etcd).delete_route(&name).await?;
            println!("ingress route {name} deleted");
        }
        IngressCmd::Explain {
            request,
            output,
            range,
        } => explain::run(etcd, &request, output, &range).await?,
        IngressCmd::Cert(c) => run_cert(etcd, c).await?,
    }
    Ok(())
}

/// Runs `ingress cert ...`.
async fn run_cert(etcd: &EtcdArgs, cmd: CertCmd) -> Result<()> {
    match cmd {
        CertCmd::Put {
            name,
            hosts,
            cert,
            key,
        } => {
            let c = cert_from_args(name, hosts, &cert, &key)?;
            let store = Store::connect(etcd).await?;
            IngressStore::new(&store, etcd).put_cert(&c).await?;
            println!(
                "ingress certificate {} stored for {}",
                c.name,
                join_capped(
                    c.hosts.iter().map(HostPattern::to_string),
                    ", ",
                    MAX_HOSTS_SHOWN
                )
            );
        }
        CertCmd::List { output } => {
            let store = Store::connect(etcd).await?;
            let (certs, bad) = IngressStore::new(&store, etcd).list_certs().await?;
            for b in bad {
                eprintln!("skipping malformed ingress certificate record {b}");
            }
            print_certs(&certs, output)?;
        }
        CertCmd::Delete { name } => {
            check_name("ingress certificate", &name)?;
            let store = Store::connect(etcd).await?;
            IngressStore::new(&store, etcd).delete_cert(&name).await?;
            println!("ingress certificate {name} deleted");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
