//! The plugin's side of tartand's unix socket. The protocol is a nudge: the plugin writes
//! `sync\n`, tartand queues a rescan of the IPAM directory and answers `ok\n`; registering the
//! pods in etcd happens in tartand, so the plugin never talks to etcd.

use std::io::{Read, Write};
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

    /// Asks tartand to rescan the IPAM directory and waits (at most `timeout`) for its answer.
    pub fn sync(mut self, timeout: Duration) -> std::io::Result<()> {
        self.stream.set_write_timeout(Some(timeout))?;
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream
            .write_all(format!("{SYNC_REQUEST}\n").as_bytes())?;
        let mut buf = [0u8; 64];
        let mut got = Vec::new();
        while !got.contains(&b'\n') {
            let n = self.stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.len() > 1024 {
                break;
            }
        }
        if String::from_utf8_lossy(&got).trim() == SYNC_REPLY {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "unexpected answer {:?}",
                String::from_utf8_lossy(&got)
            )))
        }
    }
}

/// Best-effort nudge (DEL, GC): connect and sync, reporting failures to the caller only.
pub fn nudge(path: &Path, timeout: Duration) -> std::io::Result<()> {
    UnixStream::connect(path).and_then(|stream| DaemonLink { stream }.sync(timeout))
}
