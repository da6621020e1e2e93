//! `tartand`: the tartan node daemon.

use clap::Parser;
use tartan::daemon::{DaemonArgs, run};

fn main() -> std::process::ExitCode {
    let args = DaemonArgs::parse();
    tartan::logging::init("info");
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tartand: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tartand: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
