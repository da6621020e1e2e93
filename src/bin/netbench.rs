//! `netbench`: per-hop latency of the tartan overlay and service NAT, measured in a cluster
//! that netbench builds in network namespaces and removes afterwards.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tartan::netbench::run::Settings;

#[derive(Parser, Debug)]
#[command(
    name = "netbench",
    version,
    about = "Measure what each hop of the tartan overlay and service NAT costs, against the underlay and a flannel-equivalent overlay"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The `make demo` story: a 3-node cluster, pods, a service, a short netbench, cleanup.
    Demo {
        /// Where to write netbench-demo.json and netbench-demo.svg.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
    /// Print the report of a saved `--json` file again (and redraw its charts).
    Report {
        /// A JSON file written by `netbench --json`.
        json: PathBuf,
        /// Draw the charts into this SVG file.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// One TCP request/response measurement from a namespace (for poking at a --keep cluster).
    Rr {
        /// Client network namespace.
        #[arg(long)]
        ns: String,
        /// Destination address, IPv4 or IPv6 (a bench server listens on 7001).
        #[arg(long)]
        dst: std::net::IpAddr,
        /// Round trips.
        #[arg(long, default_value_t = 2000)]
        count: usize,
        /// Start the bench servers in this namespace first (the servers of a finished run are
        /// gone with its process).
        #[arg(long)]
        server_ns: Option<String>,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// tartan VXLAN nodes (the bench also adds two DirectRouting and two flannel nodes).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(2..=16))]
    nodes: u32,
    /// Interleaved measuring rounds over all paths.
    #[arg(long, value_parser = clap::value_parser!(u32).range(3..=1000))]
    rounds: Option<u32>,
    /// Service-table sizes, comma separated (e.g. 1,1000,10000,30000); `none` to skip.
    #[arg(long)]
    services: Option<String>,
    /// Write every figure, the machine and the settings as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the charts (latency CDF, hop waterfall, latency vs services) as SVG.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// A short run (about 30 s).
    #[arg(long)]
    quick: bool,
    /// IPv4 only: no IPv6 underlay, pod subnets or cluster IP, and no IPv6 paths.
    #[arg(long)]
    no_ipv6: bool,
    /// Leave the cluster up afterwards (namespaces tt<pid>x*), for inspection.
    #[arg(long)]
    keep: bool,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

fn parse_sizes(s: &str) -> Result<Vec<u32>, String> {
    if s == "none" {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|p| match p.trim().parse::<u32>() {
            Ok(n) if (1..=100_000).contains(&n) => Ok(n),
            _ => Err(format!(
                "--services: {p:?} is not a number of services 1-100000"
            )),
        })
        .collect()
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tartan::util::logging::init("warn");
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|p| p.to_path_buf()))
        .unwrap_or_default();
    let r = match cli.cmd {
        Some(Cmd::Demo { out_dir }) => tartan::netbench::demo::run(&bin_dir, &out_dir),
        Some(Cmd::Report { json, svg }) => (|| {
            let text = std::fs::read_to_string(&json)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", json.display()))?;
            let r: tartan::netbench::report::Report = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{} is not a netbench report: {e}", json.display()))?;
            print!("{}", tartan::netbench::report::render_text(&r));
            if let Some(v) = svg {
                tartan::netbench::charts::write_svg(&r, &v)?;
                println!("SVG: {}", v.display());
            }
            Ok(())
        })(),
        Some(Cmd::Rr {
            ns,
            dst,
            count,
            server_ns,
        }) => (|| {
            if let Some(sn) = &server_ns {
                let any = match dst {
                    std::net::IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
                    std::net::IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
                };
                tartan::netbench::probe::bench_servers_on(sn, any)?;
            }
            let mut s = tartan::netbench::stats::Samples::new();
            for d in tartan::netbench::probe::tcp_rr(
                &ns,
                dst,
                tartan::netbench::probe::ports::TCP_RR,
                count,
            )? {
                s.record(d);
            }
            let m = s.summary();
            println!(
                "{count} round trips: p50 {:.1} us, p90 {:.1} us, p99 {:.1} us",
                m.p50_us, m.p90_us, m.p99_us
            );
            Ok(())
        })(),
        None => (|| {
            let a = cli.run;
            let mut s = if a.quick {
                Settings::quick(bin_dir.clone())
            } else {
                Settings::standard(bin_dir.clone())
            };
            s.nodes = a.nodes as usize;
            if let Some(r) = a.rounds {
                s.rounds = r as usize;
                s.scale_rounds = r as usize;
            }
            if let Some(sz) = &a.services {
                s.services = parse_sizes(sz).map_err(anyhow::Error::msg)?;
            }
            s.keep = a.keep;
            s.ipv6 = !a.no_ipv6;
            s.progress = !a.no_progress;
            if !tartan::lab::require_root()? {
                return Ok(());
            }
            let report = tartan::netbench::run::run(&s, a.json.as_deref(), a.svg.as_deref())?;
            print!("{}", tartan::netbench::report::render_text(&report));
            if let Some(j) = &a.json {
                println!("JSON: {}", j.display());
            }
            if let Some(v) = &a.svg {
                println!("SVG:  {}", v.display());
            }
            Ok(())
        })(),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netbench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
