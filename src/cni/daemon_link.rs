//! The plugin's side of tartand's unix socket. The protocol is a nudge: the plugin writes
//! `sync\n` and tartand queues a rescan of the IPAM directory (answering `ok\n`, which the
//! plugin does not wait for: the line is delivered even after the plugin exits, and a lost
//! nudge is covered by tartand's once-a-second check of the IPAM directory, see
//! `daemon::pod_registrar::CHANGE_CHECK`). Registering the pods in etcd happens in tartand, so the
//! plugin never talks to etcd.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::error::{CniError, code};

/// What the plugin writes.
pub const SYNC_REQUEST: &str = "sync";
/// What tartand answers once the rescan is queued.
pub const SYNC_REPLY: &str = "ok";

/// An open connection to tartand.
#[derive(Debug)]
pub struct DaemonLink {
    stream: UnixStream,
}

impl DaemonLink {
    /// Connects to tartand; an absent socket or a refused connection is code 11 (try again
    /// later: the daemon is starting or restarting).
    pub fn connect(path: &Path) -> Result<DaemonLink, CniError> {
        UnixStream::connect(path)
            .map(|stream| DaemonLink { stream })
            .map_err(|e| {
                CniError::new(
                    code::TRY_AGAIN_LATER,
                    format!("tartand is not reachable at {}", path.display()),
                )
                .details(format!("{e}; is tartand running with --cni-socket there?"))
            })
    }

    /// Asks tartand to rescan the IPAM directory (writes the request and closes).
    pub fn sync(mut self) -> std::io::Result<()> {
        self.stream
            .set_write_timeout(Some(Duration::from_millis(500)))?;
        self.stream
            .write_all(format!("{SYNC_REQUEST}\n").as_bytes())
    }
}

/// Connects and asks for a rescan (DEL, GC); failures go to the caller, which only logs
/// them or falls back to doing the work itself.
pub fn nudge(path: &Path) -> std::io::Result<()> {
    UnixStream::connect(path).and_then(|stream| DaemonLink { stream }.sync())
}
