//! `netbench`: per-hop latency of the tartan overlay and service NAT.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "netbench",
    version,
    about = "Measure what each hop of the overlay costs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build a 3-node cluster in namespaces, show cross-node pod traffic, clean up.
    Demo,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tartan::logging::init("warn");
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|p| p.to_path_buf()))
        .unwrap_or_default();
    let r = match cli.cmd {
        Cmd::Demo => tartan::netbench::demo::run(&bin_dir),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netbench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
