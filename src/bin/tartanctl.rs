//! `tartanctl`: the operator CLI.

use clap::{Parser, Subcommand};
use tartan::cli::{self, OutputFormat};
use tartan::store::etcd::EtcdArgs;

#[derive(Parser, Debug)]
#[command(name = "tartanctl", version, about = "tartan operator CLI")]
struct Cli {
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The cluster network config.
    #[command(subcommand)]
    Network(cli::network::NetworkCmd),
    /// List subnet leases: node, subnet, public IP, VTEP MAC, expiry.
    Nodes {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Act on one node.
    #[command(subcommand)]
    Node(cli::node::NodeCmd),
    /// Services: a stable virtual IP (and node ports) in front of pods.
    Service {
        #[command(flatten)]
        range: cli::service::ServiceRange,
        #[command(subcommand)]
        cmd: cli::service::ServiceCmd,
    },
    /// Explicit endpoints of selector-less services.
    Endpoints {
        #[command(flatten)]
        range: cli::service::ServiceRange,
        #[command(subcommand)]
        cmd: cli::service::EndpointsCmd,
    },
    /// HTTP ingress: routes by host and path to services, and TLS certificates.
    #[command(subcommand)]
    Ingress(cli::ingress::IngressCmd),
    /// The cluster DNS of a node.
    #[command(subcommand)]
    Dns(cli::dns::DnsCmd),
    /// What a node programmed, in words: peers, routes, services, backends, counters.
    Explain {
        /// Check that the daemon answering is this node.
        #[arg(long)]
        node: Option<String>,
        /// tartand's metrics/status address on that node.
        #[arg(long, default_value = "127.0.0.1:9402")]
        status_addr: std::net::SocketAddr,
        /// Print the raw status document.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => match cli::clap_error_line(&e) {
            Some(line) => {
                eprintln!("tartanctl: {line}");
                return std::process::ExitCode::from(2);
            }
            None => e.exit(),
        },
    };
    tartan::util::logging::init("warn");
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tartanctl: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async {
        match cli.cmd {
            Cmd::Network(c) => cli::network::run(&cli.etcd, c).await,
            Cmd::Nodes { output } => cli::nodes::run(&cli.etcd, output).await,
            Cmd::Node(c) => cli::node::run(&cli.etcd, c).await,
            Cmd::Service { range, cmd } => cli::service::run(&cli.etcd, &range, cmd).await,
            Cmd::Endpoints { range, cmd } => {
                cli::service::run_endpoints(&cli.etcd, &range, cmd).await
            }
            Cmd::Ingress(c) => cli::ingress::run(&cli.etcd, c).await,
            Cmd::Dns(c) => cli::dns::run(c).await,
            Cmd::Explain {
                node,
                status_addr,
                json,
            } => cli::explain::run(node.as_deref(), status_addr, json).await,
        }
    });
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tartanctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
