//! Helpers shared by the netns test files.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};
use tartan::lab::{Binaries, Lab, in_netns};

pub mod podman;

/// The binaries cargo built for this test run.
pub fn bins() -> Binaries {
    tartan::built_binaries!()
}

/// A lab with etcd running and the network config written; `None` when opted out of root tests.
pub fn lab(nodes: usize, network_args: &[&str]) -> Result<Option<Lab>> {
    if !tartan::lab::require_root()? {
        return Ok(None);
    }
    let mut lab = Lab::new(nodes, bins())?;
    lab.start_etcd()?;
    lab.init_network(network_args)?;
    Ok(Some(lab))
}

/// Like [`lab`], with etcd run as `members` members.
#[allow(dead_code)]
pub fn lab_with_etcd_members(
    nodes: usize,
    members: usize,
    network_args: &[&str],
) -> Result<Option<Lab>> {
    if !tartan::lab::require_root()? {
        return Ok(None);
    }
    let mut lab = Lab::new(nodes, bins())?;
    lab.set_etcd_members(members);
    lab.start_etcd()?;
    lab.init_network(network_args)?;
    Ok(Some(lab))
}

/// `tartanctl service create ARGS`: the cluster IP it printed (None for a headless service)
/// and the node ports.
pub fn create_service(lab: &Lab, args: &[&str]) -> Result<(Option<Ipv4Addr>, Vec<u16>)> {
    let mut full = vec!["service", "create"];
    full.extend_from_slice(args);
    let out = lab.tartanctl(&full)?;
    let ip = out
        .split("cluster IP ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .with_context(|| format!("no cluster IP in {out:?}"))?
        .trim();
    let ip = match ip {
        "None" => None,
        ip => Some(ip.parse()?),
    };
    let nps = out
        .split("(node ")
        .skip(1)
        .filter_map(|r| r.split(')').next()?.parse().ok())
        .collect();
    Ok((ip, nps))
}

/// Starts a TCP echo server in `ns` on `port` that serves forever (until the namespace goes).
#[allow(unused_imports)]
pub use tartan::netbench::probe::tcp_echo_server as echo_server;

/// Connects from `ns` to `ip:port`, sends `payload` and checks it comes back unchanged.
pub fn tcp_echo(ns: &str, ip: impl Into<IpAddr>, port: u16, payload: &[u8]) -> Result<()> {
    let ip = ip.into();
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
pub fn wait_tcp_echo(ns: &str, ip: impl Into<IpAddr>, port: u16, deadline: Duration) -> Result<()> {
    let ip = ip.into();
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
    let out = tartan::lab::ns_run(ns, "nft", &["-j", "list", "table", "ip", table])?;
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
    let out = tartan::lab::ns_run(ns, "nft", &["-j", "list", "chains", "ip"]).ok()?;
    let doc: serde_json::Value = serde_json::from_str(&out).ok()?;
    doc["nftables"].as_array()?.iter().find_map(|o| {
        let c = o.get("chain")?;
        (c["name"] == "nat_prerouting" && json_atom(&c["table"]).starts_with("tartan_svc"))
            .then(|| json_atom(&c["table"]))
    })
}

/// The service-table elements each of `nodes` should hold: the daemon's own model fed with
/// what etcd holds now (services, pods, explicit endpoints), as `(set, key, data)` texts.
#[allow(dead_code)]
pub fn expected_elements(
    lab: &Lab,
    nodes: &[String],
) -> Result<Vec<std::collections::BTreeSet<(String, String, String)>>> {
    use tartan::model::pod::PodRecord;
    use tartan::model::service::{ExplicitEndpoints, Service};
    use tartan::proxy::state::{ModelChange, ServiceState};
    let endpoint = "http://127.0.0.1:2379".to_string();
    let nodes = nodes.to_vec();
    tartan::lab::block_on_in_netns(&lab.infra, move || async move {
        let args = tartan::store::etcd::EtcdArgs::for_endpoints(&[&endpoint]);
        let store = tartan::store::etcd::Store::connect(&args).await?;
        let (_, svcs) = store
            .list(&tartan::store::keys::services_prefix(&args))
            .await?;
        let (_, pods) = store.list(&tartan::store::keys::pods_prefix(&args)).await?;
        let (_, eps) = store
            .list(&tartan::store::keys::endpoints_prefix(&args))
            .await?;
        let mut out = Vec::new();
        for n in &nodes {
            let mut state = ServiceState::new(tartan::proxy::rules::NodeContext {
                node: n.clone(),
                family: tartan::proxy::rules::Family::V4,
                cluster_network: "10.244.0.0/16".parse()?,
                service_cidr: "10.96.0.0/12".parse()?,
                balancing: Default::default(),
            });
            for s in &svcs {
                state.change(ModelChange::PutService(
                    s.key.clone(),
                    Service::parse(&s.value).map_err(anyhow::Error::msg)?,
                ));
            }
            for p in &pods {
                state.change(ModelChange::PutPod(
                    p.key.clone(),
                    PodRecord::parse(&p.value).map_err(anyhow::Error::msg)?,
                ));
            }
            for e in &eps {
                let id = e.key.trim_start_matches("/tartan/endpoints/").to_string();
                state.change(ModelChange::PutEndpoints(
                    id,
                    ExplicitEndpoints::parse(&e.value).map_err(anyhow::Error::msg)?,
                ));
            }
            let plan = state.plan_full();
            let mut set = std::collections::BTreeSet::new();
            for (name, op) in &plan.ops {
                if let tartan::kernel::nft_elements::SetOp::Add(elems) = op {
                    let sn = tartan::proxy::rules::SetName::from_name(name).context("set")?;
                    for (k, d) in elems {
                        let (kt, dt) = tartan::proxy::rules::describe(sn, k, d);
                        set.insert((name.clone(), kt, dt));
                    }
                }
            }
            out.push(set);
        }
        anyhow::Ok(out)
    })?
}

/// Waits (30 s) until node `i`'s service table in force holds exactly `want`; the error names
/// what is missing and what is extra.
#[allow(dead_code)]
pub fn wait_table_matches(
    lab: &Lab,
    i: usize,
    want: &std::collections::BTreeSet<(String, String, String)>,
) -> Result<()> {
    let ns = lab.nodes[i].ns.clone();
    let mut last = None;
    let converged = tartan::lab::wait_for(
        "kernel table to match the model",
        Duration::from_secs(30),
        || {
            let t = active_service_table(&ns)?;
            let got = kernel_elements(&ns, &t).ok()?;
            if got == *want {
                Some(())
            } else {
                last = Some(got);
                None
            }
        },
    );
    if let Err(e) = converged {
        let got = last.unwrap_or_default();
        let missing: Vec<_> = want.difference(&got).take(10).collect();
        let extra: Vec<_> = got.difference(want).take(10).collect();
        anyhow::bail!(
            "{} differs from the model ({e}): {} elements expected, {} in the kernel\nmissing: {missing:#?}\nextra: {extra:#?}\n{}",
            lab.nodes[i].name,
            want.len(),
            got.len(),
            lab.log_tail(i, 20)
        );
    }
    Ok(())
}

/// One sample of `name` from tartand's `/metrics` in `ns` (its default loopback listener).
#[allow(dead_code)]
pub fn metric(ns: &str, name: &str) -> Option<f64> {
    let name = name.to_string();
    in_netns(ns, move || -> Option<f64> {
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], 9402)),
            Duration::from_secs(2),
        )
        .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET /metrics HTTP/1.0\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
    })
    .ok()
    .flatten()
}
