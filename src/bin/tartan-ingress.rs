//! `tartan-ingress`: the HTTP(S) entry point that routes requests by host and path to
//! services' pods (a process of its own, apart from the node daemon).

use clap::Parser;
use tartan::ingress::run::{IngressArgs, run};

fn main() -> std::process::ExitCode {
    let args = match IngressArgs::try_parse() {
        Ok(a) => a,
        Err(e) => match tartan::cli::clap_error_line(&e) {
            Some(line) => {
                eprintln!("tartan-ingress: {line}");
                return std::process::ExitCode::from(2);
            }
            None => e.exit(),
        },
    };
    tartan::util::logging::init("info");
    // The watches and the admin server; requests are served on worker threads of their own.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tartan-ingress: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tartan-ingress: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
