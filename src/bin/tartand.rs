//! `tartand`: the tartan node daemon.

use clap::Parser;
use tartan::daemon::{DaemonArgs, run};

fn main() -> std::process::ExitCode {
    let args = match DaemonArgs::try_parse() {
        Ok(a) => a,
        Err(e) => match tartan::cli::clap_error_line(&e) {
            Some(line) => {
                eprintln!("tartand: {line}");
                return std::process::ExitCode::from(2);
            }
            None => e.exit(),
        },
    };
    tartan::util::logging::init("info");
    // A parent (a shell's job control, a test harness, some container entrypoints) may hand
    // SIGINT/SIGTERM down blocked; tartand's clean shutdown depends on receiving them.
    let mut handled = nix::sys::signal::SigSet::empty();
    handled.add(nix::sys::signal::Signal::SIGINT);
    handled.add(nix::sys::signal::Signal::SIGTERM);
    if let Err(e) = handled.thread_unblock() {
        eprintln!("tartand: cannot unblock SIGINT/SIGTERM: {e}");
    }
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
