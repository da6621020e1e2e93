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
