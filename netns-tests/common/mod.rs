//! Helpers shared by the netns test files.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};
use tartan::netns_lab::{Binaries, Lab, in_netns};

/// The binaries cargo built for this test run.
pub fn bins() -> Binaries {
    Binaries {
        tartand: env!("CARGO_BIN_EXE_tartand").into(),
        tartanctl: env!("CARGO_BIN_EXE_tartanctl").into(),
        tartan_cni: env!("CARGO_BIN_EXE_tartan-cni").into(),
    }
}

/// A lab with etcd running and the network config written; `None` when opted out of root tests.
pub fn lab(nodes: usize, network_args: &[&str]) -> Result<Option<Lab>> {
    if !tartan::netns_lab::require_root()? {
        return Ok(None);
    }
    let mut lab = Lab::new(nodes, bins())?;
    lab.start_etcd()?;
    lab.init_network(network_args)?;
    Ok(Some(lab))
}

/// Starts a TCP echo server in `ns` on `port` that serves forever (until the namespace goes).
pub fn echo_server(ns: &str, port: u16) -> Result<()> {
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
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
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
        .map_err(|e| anyhow::anyhow!("echo server: {e}"))
}

/// Connects from `ns` to `ip:port`, sends `payload` and checks it comes back unchanged.
pub fn tcp_echo(ns: &str, ip: Ipv4Addr, port: u16, payload: &[u8]) -> Result<()> {
    let payload = payload.to_vec();
    in_netns(ns, move || -> Result<()> {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((ip, port)), Duration::from_secs(3))
                .with_context(|| format!("connecting to {ip}:{port}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(&payload)?;
        let mut back = vec![0u8; payload.len()];
        s.read_exact(&mut back).context("reading the echo")?;
        anyhow::ensure!(back == payload, "payload came back changed");
        Ok(())
    })?
}

/// Retries [`tcp_echo`] until it succeeds or `deadline` passes.
pub fn wait_tcp_echo(ns: &str, ip: Ipv4Addr, port: u16, deadline: Duration) -> Result<()> {
    let start = std::time::Instant::now();
    loop {
        match tcp_echo(ns, ip, port, b"tartan-payload-0123456789") {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() > deadline => {
                return Err(e.context(format!("no echo from {ip}:{port} within {deadline:?}")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
