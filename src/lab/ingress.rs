//! `tartan-ingress` in a lab node's namespace, for tests, benchmarks and the demo.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::lab::{Lab, in_netns, ns_command, wait_for};

/// The ingress's admin address inside its namespace.
pub const INGRESS_ADMIN: &str = "127.0.0.1:9403";

/// A running `tartan-ingress`; killed (and reaped) on drop.
pub struct LabIngress {
    child: Child,
    /// The node's underlay address (where clients connect).
    pub node_ip: Ipv4Addr,
    /// The node's namespace.
    pub ns: String,
    /// Its log file.
    pub log: PathBuf,
}

impl Drop for LabIngress {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LabIngress {
    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `GET path` on the admin address: status code and body.
    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        admin_get(&self.ns, path)
    }
}

/// `GET path` on the ingress admin address inside `ns`.
pub fn admin_get(ns: &str, path: &str) -> Result<(u16, String)> {
    let path = path.to_string();
    in_netns(ns, move || -> Result<(u16, String)> {
        let addr: SocketAddr = INGRESS_ADMIN.parse()?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no status line")?;
        let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
        Ok((code, body))
    })?
}

impl Lab {
    /// Starts `tartan-ingress` on node `i` (HTTP on port 80, HTTPS on 443 when `extra` gives
    /// `--https-listen`), and waits until it is ready (routes and records listed).
    pub fn start_ingress(&self, i: usize, extra: &[&str]) -> Result<LabIngress> {
        let n = &self.nodes[i];
        let log = n.dir.join("ingress.log");
        let file = std::fs::File::create(&log)?;
        let child = ns_command(&n.ns, &self.bins.tartan_ingress)
            .env(
                "RUST_LOG",
                std::env::var("TARTAN_LOG").unwrap_or_else(|_| "info".into()),
            )
            .args(["--etcd-endpoints", &self.etcd_endpoint()])
            .args(["--admin-addr", INGRESS_ADMIN])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("starting tartan-ingress")?;
        let ing = LabIngress {
            child,
            node_ip: n.ip,
            ns: n.ns.clone(),
            log,
        };
        let ns = n.ns.clone();
        wait_for(
            "tartan-ingress to be ready",
            Duration::from_secs(30),
            || matches!(admin_get(&ns, "/healthz"), Ok((200, _))).then_some(()),
        )
        .with_context(|| ing.log_tail(20))?;
        Ok(ing)
    }
}
