//! Helpers shared by the netns test files.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};
use tartan::netns_lab::{Binaries, Lab, in_netns};

/// The binaries cargo built for this test run.
pub fn bins() -> Binaries {
    tartan::built_binaries!()
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
#[allow(unused_imports)]
pub use tartan::netbench::probe::tcp_echo_server as echo_server;

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

fn json_atom(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        other => other.to_string(),
    }
}

fn json_key(v: &serde_json::Value) -> String {
    // {"elem": {"val": X, "counter": ...}} wraps keys that carry expressions.
    let v = if v.get("elem").is_some() {
        &v["elem"]["val"]
    } else {
        v
    };
    match v.get("concat").and_then(|c| c.as_array()) {
        Some(parts) => parts.iter().map(json_atom).collect::<Vec<_>>().join(" . "),
        None => json_atom(v),
    }
}

fn json_data(v: &serde_json::Value) -> String {
    if let Some(t) = v.get("goto").and_then(|g| g.get("target")) {
        return format!("goto {}", json_atom(t));
    }
    if let Some(t) = v.get("jump").and_then(|g| g.get("target")) {
        return format!("jump {}", json_atom(t));
    }
    json_key(v)
}

/// Every element of every set and map of `table` in `ns`, as (set, key, data) text, read back
/// from `nft -j list table` (the dynamic `affinity` map is skipped).
pub fn kernel_elements(
    ns: &str,
    table: &str,
) -> anyhow::Result<std::collections::BTreeSet<(String, String, String)>> {
    let out = tartan::netns_lab::ns_run(ns, "nft", &["-j", "list", "table", "ip", table])?;
    let doc: serde_json::Value = serde_json::from_str(&out)?;
    let mut set = std::collections::BTreeSet::new();
    for obj in doc["nftables"].as_array().into_iter().flatten() {
        let (body, is_map) = if obj.get("map").is_some() {
            (&obj["map"], true)
        } else if obj.get("set").is_some() {
            (&obj["set"], false)
        } else {
            continue;
        };
        let name = json_atom(&body["name"]);
        if name == "affinity" {
            continue;
        }
        for e in body["elem"].as_array().into_iter().flatten() {
            if is_map {
                let pair = e.as_array().cloned().unwrap_or_default();
                let (k, d) = (
                    pair.first().cloned().unwrap_or_default(),
                    pair.get(1).cloned().unwrap_or_default(),
                );
                set.insert((name.clone(), json_key(&k), json_data(&d)));
            } else {
                set.insert((name.clone(), json_key(e), String::new()));
            }
        }
    }
    Ok(set)
}

/// The service table in force in `ns` (the one with hooked chains).
pub fn active_service_table(ns: &str) -> Option<String> {
    let out = tartan::netns_lab::ns_run(ns, "nft", &["-j", "list", "chains", "ip"]).ok()?;
    let doc: serde_json::Value = serde_json::from_str(&out).ok()?;
    doc["nftables"].as_array()?.iter().find_map(|o| {
        let c = o.get("chain")?;
        (c["name"] == "nat_prerouting" && json_atom(&c["table"]).starts_with("tartan_svc"))
            .then(|| json_atom(&c["table"]))
    })
}
