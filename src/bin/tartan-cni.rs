//! `tartan-cni`: the CNI plugin. Container runtimes run it once per call with the CNI
//! environment and the network config on stdin; see `tartan::cni`.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Instant;

use tartan::cni::bounded_read::{STDIN_LIMIT, read_to_limit};
use tartan::cni::error::{CniError, code};
use tartan::cni::plugin;
use tartan::cni::spec::{CniEnv, CniVersion, peek_version};

const ABOUT: &str = "tartan-cni: CNI plugin of the tartan overlay (veth on the node bridge, \
address from the node's leased subnet). Run by container runtimes with CNI_COMMAND and the \
network config on stdin; tartand installs its config.";

fn main() -> ExitCode {
    let start = Instant::now();
    if std::env::args()
        .skip(1)
        .any(|a| matches!(a.as_str(), "-h" | "--help" | "--version" | "-V"))
    {
        let _ = writeln!(
            std::io::stderr(),
            "{ABOUT}\nversion {}; CNI protocol versions supported: {}",
            env!("CARGO_PKG_VERSION"),
            CniVersion::ALL.map(CniVersion::as_str).join(", ")
        );
        return ExitCode::SUCCESS;
    }
    // Bounded: an endless stdin (`/dev/zero`) is refused after STDIN_LIMIT bytes.
    let read = if std::io::stdin().is_terminal() {
        Ok(Some(Vec::new()))
    } else {
        read_to_limit(std::io::stdin().lock(), STDIN_LIMIT)
    };
    let stdin = match &read {
        Ok(Some(b)) => b.as_slice(),
        _ => &[],
    };
    let version = peek_version(stdin)
        .filter(|v| CniVersion::parse(v).is_ok())
        .unwrap_or_else(|| CniVersion::LATEST.as_str().to_string());
    let outcome = match read {
        Err(e) => Err(CniError::new(
            code::IO_FAILURE,
            format!("reading stdin: {e}"),
        )),
        Ok(None) => Err(CniError::new(
            code::DECODE,
            format!(
                "the network config on stdin is larger than {} MiB",
                STDIN_LIMIT >> 20
            ),
        )),
        Ok(Some(_)) => {
            CniEnv::from_vars(|k| std::env::var(k).ok()).and_then(|env| plugin::run(&env, stdin))
        }
    };
    let cmd = std::env::var("CNI_COMMAND").unwrap_or_default();
    let cid = std::env::var("CNI_CONTAINERID").unwrap_or_default();
    match outcome {
        Ok(out) => {
            if let Some(out) = out {
                // A runtime that closed the pipe gets nothing; never a panic on EPIPE.
                let _ = writeln!(std::io::stdout(), "{out}");
            }
            plugin::log(&format!("{cmd} {cid} ok in {:?}", start.elapsed()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(std::io::stdout(), "{}", e.to_json(&version));
            let _ = writeln!(std::io::stderr(), "tartan-cni: {e}");
            plugin::log(&format!("{cmd} {cid} failed in {:?}: {e}", start.elapsed()));
            ExitCode::FAILURE
        }
    }
}

#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOC: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;
