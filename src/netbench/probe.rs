//! Socket-level probes run inside network namespaces: echo servers and request/response
//! round trips over a kept connection.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use crate::netns_lab::in_netns;

/// Starts a TCP echo server in `ns` on `port`, serving until the namespace goes away.
pub fn tcp_echo_server(ns: &str, port: u16) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let _ = in_netns(&ns, move || {
            let l = match TcpListener::bind(("0.0.0.0", port)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = tx.send(Ok(()));
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let _ = s.set_nodelay(true);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
    });
    rx.recv_timeout(Duration::from_secs(10))
        .context("echo server did not start")?
        .map_err(|e| anyhow!("echo server on port {port}: {e}"))
}

/// Round trips of a 1-byte request/response over one kept TCP connection from `ns`.
pub fn tcp_rr(ns: &str, dst: Ipv4Addr, port: u16, count: usize) -> Result<Vec<Duration>> {
    in_netns(ns, move || -> Result<Vec<Duration>> {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((dst, port)), Duration::from_secs(3))
                .with_context(|| format!("connecting to {dst}:{port}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut out = Vec::with_capacity(count);
        let mut b = [0u8; 1];
        for i in 0..count {
            let t = Instant::now();
            s.write_all(&[i as u8])?;
            s.read_exact(&mut b)?;
            out.push(t.elapsed());
        }
        Ok(out)
    })?
}

/// Starts a TCP "who am I" server in `ns`: every connection gets one line
/// `<name> <client address as seen>` and is closed.
pub fn tcp_whoami_server(ns: &str, port: u16, name: &str) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let ns = ns.to_string();
    let name = name.to_string();
    std::thread::spawn(move || {
        let _ = in_netns(&ns, move || {
            let l = match TcpListener::bind(("0.0.0.0", port)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = tx.send(Ok(()));
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let peer = s
                    .peer_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                let _ = s.write_all(format!("{name} {peer}\n").as_bytes());
            }
        });
    });
    rx.recv_timeout(Duration::from_secs(10))
        .context("whoami server did not start")?
        .map_err(|e| anyhow!("whoami server on port {port}: {e}"))
}

/// Starts a UDP "who am I" server in `ns`: every datagram is answered with
/// `<name> <client address as seen>`.
pub fn udp_whoami_server(ns: &str, port: u16, name: &str) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let ns = ns.to_string();
    let name = name.to_string();
    std::thread::spawn(move || {
        let _ = in_netns(&ns, move || {
            let s = match std::net::UdpSocket::bind(("0.0.0.0", port)) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = tx.send(Ok(()));
            let mut buf = [0u8; 2048];
            loop {
                let Ok((_, from)) = s.recv_from(&mut buf) else {
                    return;
                };
                let _ = s.send_to(format!("{name} {}", from.ip()).as_bytes(), from);
            }
        });
    });
    rx.recv_timeout(Duration::from_secs(10))
        .context("UDP whoami server did not start")?
        .map_err(|e| anyhow!("UDP whoami server on port {port}: {e}"))
}

/// What a who-am-I server said: its name and the client address it saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Whoami {
    /// The server's name.
    pub name: String,
    /// The client address as the server saw it.
    pub peer: String,
}

/// Connects from `ns` to a TCP who-am-I server (a fresh connection each call).
pub fn tcp_whoami(ns: &str, dst: Ipv4Addr, port: u16, timeout: Duration) -> Result<Whoami> {
    in_netns(ns, move || -> Result<Whoami> {
        whoami_here(dst, port, timeout)
    })?
}

/// [`tcp_whoami`] from the calling thread's namespace.
pub fn whoami_here(dst: Ipv4Addr, port: u16, timeout: Duration) -> Result<Whoami> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::from((dst, port)), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    s.read_to_string(&mut line)?;
    let mut it = line.split_whitespace();
    Ok(Whoami {
        name: it.next().unwrap_or_default().to_string(),
        peer: it.next().unwrap_or_default().to_string(),
    })
}

/// `count` fresh TCP connections from `ns`, one thread, returning each answer (or error text).
pub fn tcp_whoami_many(
    ns: &str,
    dst: Ipv4Addr,
    port: u16,
    count: usize,
) -> Result<Vec<Result<Whoami, String>>> {
    in_netns(ns, move || {
        (0..count)
            .map(|_| whoami_here(dst, port, Duration::from_secs(3)).map_err(|e| e.to_string()))
            .collect()
    })
}
