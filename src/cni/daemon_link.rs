//! The plugin's side of tartand's unix socket, and the wire format both sides share.
//!
//! Two kinds of requests, one per line:
//!
//! - `sync\n` (DEL, GC): tartand queues a rescan of the IPAM directory and answers `ok\n`,
//!   which the plugin does not wait for (the line is delivered even after the plugin exits,
//!   and a lost nudge is covered by tartand's periodic rescan);
//! - an [`AddRequest`] (ADD): one line of JSON, sent in a single `sendmsg` that carries the
//!   pod's network namespace as an open file descriptor (`SCM_RIGHTS`). tartand does the
//!   whole ADD (IPAM, veth, pod addressing, registration) and answers one line of JSON, a
//!   [`Reply`]. tartand never sees or needs the namespace's path: the descriptor is valid
//!   whatever mount or pid namespace tartand runs in.
//!
//! The plugin keeps the connection open until the reply arrives (closing it, or dying, tells
//! tartand nobody will get the result: tartand then undoes the ADD). Registering pods in etcd
//! happens in tartand, so the plugin never talks to etcd.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use serde::{Deserialize, Serialize};

use super::error::{CniError, code};

/// What the plugin writes to ask for a rescan.
pub const SYNC_REQUEST: &str = "sync";
/// What tartand answers once the rescan is queued.
pub const SYNC_REPLY: &str = "ok";
/// Version of the JSON requests and replies; tartand refuses other versions.
pub const PROTOCOL_VERSION: u32 = 1;
/// The `op` of an ADD request.
pub const OP_ADD: &str = "add";
/// Longest request line tartand reads (bytes, newline included).
pub const MAX_REQUEST: usize = 64 * 1024;
/// Longest reply line the plugin reads.
pub const MAX_REPLY: usize = 64 * 1024;

/// An ADD as the plugin asks tartand to do it: the validated CNI environment and config,
/// plus what the plugin read from subnet.env. The pod's namespace travels beside it as a file
/// descriptor, never as a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddRequest {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// [`OP_ADD`].
    pub op: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// The network name (the IPAM subdirectory).
    pub network: String,
    /// The IPAM directory root (`dataDir`).
    pub data_dir: PathBuf,
    /// The node bridge (`bridge`).
    pub bridge: String,
    /// The node subnet (from subnet.env).
    pub subnet: Ipv4Network,
    /// MTU of the pod's interfaces (`mtu`, else subnet.env's).
    pub mtu: u32,
    /// Hairpin on the bridge port (`hairpinMode`).
    pub hairpin: bool,
    /// Pod namespace (`K8S_POD_NAMESPACE`).
    pub pod_namespace: String,
    /// Pod name (`K8S_POD_NAME`).
    pub pod_name: String,
    /// Pod labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `CNI_NETNS` as the runtime named it: stored in the allocation record for people to
    /// read, never opened by tartand.
    #[serde(default)]
    pub netns_path: String,
}

/// What tartand created for an ADD: everything the plugin needs to print the result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddedPod {
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// Prefix length of the node subnet.
    pub prefix: u8,
    /// The gateway (the bridge's address).
    pub gateway: Ipv4Addr,
    /// The bridge's name.
    pub bridge: String,
    /// The bridge's MAC.
    pub bridge_mac: String,
    /// Name of the host end of the veth pair.
    pub host_ifname: String,
    /// MAC of the host end.
    pub host_mac: String,
    /// MAC of the container end.
    pub pod_mac: String,
    /// MTU of both ends.
    pub mtu: u32,
}

/// A CNI error as it travels on the socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// CNI error code.
    pub code: u32,
    /// Message.
    pub msg: String,
    /// Details.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl From<&CniError> for WireError {
    fn from(e: &CniError) -> WireError {
        WireError {
            code: e.code,
            msg: e.msg.clone(),
            details: e.details.clone(),
        }
    }
}

impl From<WireError> for CniError {
    fn from(e: WireError) -> CniError {
        CniError::new(e.code, e.msg).details(e.details)
    }
}

/// tartand's answer to a JSON request: exactly one of `ok` and `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The pod, when the ADD succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<AddedPod>,
    /// The error, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
}

impl Reply {
    /// A reply for an outcome.
    pub fn from_outcome(outcome: &Result<AddedPod, CniError>) -> Reply {
        match outcome {
            Ok(p) => Reply {
                version: PROTOCOL_VERSION,
                ok: Some(p.clone()),
                error: None,
            },
            Err(e) => Reply {
                version: PROTOCOL_VERSION,
                ok: None,
                error: Some(e.into()),
            },
        }
    }

    /// The reply as one line (newline included).
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_else(|_| {
            // Serializing these plain types cannot fail; keep the wire well-formed anyway.
            format!(
                "{{\"version\":{PROTOCOL_VERSION},\"error\":{{\"code\":{},\"msg\":\"reply encoding failed\"}}}}",
                code::KERNEL
            )
        });
        s.push('\n');
        s
    }
}

fn unreachable_err(path: &Path, e: impl std::fmt::Display) -> CniError {
    CniError::new(
        code::TRY_AGAIN_LATER,
        format!("tartand is not reachable at {}", path.display()),
    )
    .details(format!("{e}; is tartand running with --cni-socket there?"))
}

fn gone(path: &Path, why: impl std::fmt::Display) -> CniError {
    CniError::new(
        code::TRY_AGAIN_LATER,
        format!("tartand at {} did not complete the ADD", path.display()),
    )
    .details(format!(
        "{why}; anything it had done is undone by tartand, DEL or GC"
    ))
}

/// Connects without ever blocking on a full backlog (a stopped tartand): absent socket,
/// refused connection or full backlog are code 11 (try again later).
fn connect(path: &Path) -> Result<UnixStream, CniError> {
    let addr = socket2::SockAddr::unix(path).map_err(|e| unreachable_err(path, e))?;
    let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
        .map_err(|e| CniError::new(code::IO_FAILURE, format!("unix socket: {e}")))?;
    sock.set_nonblocking(true)
        .and_then(|()| sock.connect(&addr))
        .and_then(|()| sock.set_nonblocking(false))
        .map_err(|e| unreachable_err(path, e))?;
    Ok(sock.into())
}

/// Asks tartand to do an ADD: sends `req` with `netns` attached, waits at most `timeout` for
/// the answer. tartand's errors come back with their own codes; tartand unreachable, busy,
/// gone before answering, or too slow is code 11.
pub fn add(
    path: &Path,
    req: &AddRequest,
    netns: &File,
    timeout: Duration,
) -> Result<AddedPod, CniError> {
    let deadline = Instant::now() + timeout;
    let mut line = serde_json::to_string(req)
        .map_err(|e| CniError::new(code::IO_FAILURE, format!("encoding the request: {e}")))?;
    line.push('\n');
    if line.len() > MAX_REQUEST {
        return Err(CniError::config(format!(
            "the ADD request is {} bytes, more than tartand reads ({MAX_REQUEST})",
            line.len()
        )));
    }
    let mut stream = connect(path)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| gone(path, e))?;
    let fds = [netns.as_raw_fd()];
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(line.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| gone(path, format!("sending the request: {e}")))?;
    if sent < line.len() {
        stream
            .write_all(&line.as_bytes()[sent..])
            .map_err(|e| gone(path, format!("sending the request: {e}")))?;
    }
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.iter().position(|b| *b == b'\n') {
            buf.truncate(end);
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(gone(path, format!("no answer within {timeout:?}")));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| gone(path, e))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Err(gone(path, "it closed the connection without an answer")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(gone(path, format!("no answer within {timeout:?}")));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(gone(path, format!("reading the answer: {e}"))),
        }
        if buf.len() > MAX_REPLY {
            return Err(gone(path, "its answer is too long"));
        }
    }
    parse_reply(&buf).map_err(|why| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            format!("tartand at {} gave an answer tartan-cni cannot read", path.display()),
        )
        .details(format!(
            "{why}; tartand and tartan-cni are probably of different versions (tartand installs its own tartan-cni)"
        ))
    })?
}

/// Decodes a reply line: `Err` when it is not a reply of this protocol version.
pub fn parse_reply(line: &[u8]) -> Result<Result<AddedPod, CniError>, String> {
    let text = String::from_utf8_lossy(line);
    let reply: Reply = serde_json::from_slice(line)
        .map_err(|e| format!("{e} in {:?}", text.chars().take(200).collect::<String>()))?;
    if reply.version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} (this plugin speaks {PROTOCOL_VERSION})",
            reply.version
        ));
    }
    match (reply.ok, reply.error) {
        (Some(p), None) => Ok(Ok(p)),
        (None, Some(e)) => Ok(Err(e.into())),
        _ => Err("a reply with neither or both of ok and error".into()),
    }
}

/// An open connection to tartand.
#[derive(Debug)]
pub struct DaemonLink {
    stream: UnixStream,
}

impl DaemonLink {
    /// Connects to tartand; an absent socket or a refused connection is code 11 (try again
    /// later: the daemon is starting or restarting).
    pub fn connect(path: &Path) -> Result<DaemonLink, CniError> {
        connect(path).map(|stream| DaemonLink { stream })
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
    DaemonLink::connect(path)
        .map_err(|e| std::io::Error::new(ErrorKind::NotConnected, format!("{e}")))?
        .sync()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> AddedPod {
        AddedPod {
            ip: Ipv4Addr::new(10, 244, 3, 5),
            prefix: 24,
            gateway: Ipv4Addr::new(10, 244, 3, 1),
            bridge: "tartan0".into(),
            bridge_mac: "0a:58:0a:f4:03:01".into(),
            host_ifname: "tt0123456789a".into(),
            host_mac: "0a:59:0a:f4:03:05".into(),
            pod_mac: "0a:58:0a:f4:03:05".into(),
            mtu: 1450,
        }
    }

    #[test]
    fn replies_round_trip() {
        let ok = Reply::from_outcome(&Ok(pod())).to_line();
        assert!(ok.ends_with('\n') && !ok[..ok.len() - 1].contains('\n'));
        assert_eq!(parse_reply(ok.trim_end().as_bytes()), Ok(Ok(pod())));
        let e = CniError::new(code::ADDRESSES_EXHAUSTED, "full").details("DEL frees");
        let line = Reply::from_outcome(&Err(e.clone())).to_line();
        assert_eq!(parse_reply(line.trim_end().as_bytes()), Ok(Err(e)));
    }

    #[test]
    fn foreign_replies_are_refused() {
        for bad in [
            &b"error unknown request"[..],
            b"ok",
            b"{}",
            b"{\"version\":2,\"error\":{\"code\":1,\"msg\":\"x\"}}",
            b"{\"version\":1}",
        ] {
            assert!(
                parse_reply(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn requests_are_json_lines() {
        let r = AddRequest {
            version: PROTOCOL_VERSION,
            op: OP_ADD.into(),
            container_id: "c1".into(),
            ifname: "eth0".into(),
            network: "tartan".into(),
            data_dir: "/var/lib/tartan/cni".into(),
            bridge: "tartan0".into(),
            subnet: "10.244.3.0/24".parse().unwrap(),
            mtu: 1450,
            hairpin: true,
            pod_namespace: "default".into(),
            pod_name: "web-0".into(),
            labels: [("app".to_string(), "web\nx".to_string())].into(),
            netns_path: "/var/run/netns/x".into(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(!s.contains('\n'), "{s}");
        let back: AddRequest = serde_json::from_str(&s).unwrap();
        assert_eq!(back, r);
        assert!(s.contains("\"containerId\":\"c1\""), "{s}");
    }
}
