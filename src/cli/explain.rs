//! `tartanctl explain`: what a node programmed, in words, from its daemon's `/status`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use super::{cap_text, join_capped};
use crate::api::status::{ServiceReport, StatusReport};

/// Largest `/status` document read (a node with 30,000 services answers with ≈ 20 MB).
const MAX_STATUS_BYTES: usize = 256 << 20;

/// Fetches `/status` from a tartand (usually on this node's loopback) over HTTP/1.1,
/// checking the status code.
pub async fn fetch(addr: SocketAddr) -> Result<StatusReport> {
    get_json(addr, "/status").await
}

/// GETs `path` from a tartand's admin endpoint and decodes its JSON, checking the status
/// code (an error status comes back as an error with the body's first line).
pub async fn get_json<T: serde::de::DeserializeOwned>(addr: SocketAddr, path: &str) -> Result<T> {
    let hint = "run this on the node, or give --status-addr";
    let stream = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| {
            anyhow::anyhow!("connecting to tartand's status endpoint {addr} timed out ({hint})")
        })?
        .with_context(|| format!("connecting to tartand's status endpoint {addr} ({hint})"))?;
    let what = path.split('?').next().unwrap_or(path).to_string();
    let exchange = async {
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake with tartand")?;
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, "tartand")
            .body(Empty::<Bytes>::new())
            .with_context(|| format!("building the {what} request"))?;
        let resp = tx
            .send_request(req)
            .await
            .with_context(|| format!("asking tartand for {what}"))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_STATUS_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading {what}: {e}"))?
            .to_bytes();
        if !status.is_success() {
            bail!(
                "tartand at {addr} answered {what} with {status}: {}",
                cap_text(String::from_utf8_lossy(&body).trim(), 200)
            );
        }
        serde_json::from_slice(&body).with_context(|| format!("decoding {what}"))
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| anyhow::anyhow!("tartand at {addr} did not answer {what} within 30 s"))?
}

/// The endpoints part of one service (or its IPv6 half), indented by `pad`.
fn render_backends(s: &ServiceReport, pad: &str, o: &mut String) {
    if s.backends.is_empty() {
        o.push_str(&format!(
            "{pad}  no endpoints: new connections are refused ({} refused so far)\n",
            s.refused
        ));
        return;
    }
    if s.uncounted {
        o.push_str(&format!(
            "{pad}  new connections spread over {} endpoints (not counted: services this big \
             keep their slots in uncounted maps, so the kernel writes them fast):\n",
            s.backends.len()
        ));
    } else {
        o.push_str(&format!(
            "{pad}  {} new connections so far, spread over {} endpoints:\n",
            s.connections,
            s.backends.len()
        ));
    }
    for b in s.backends.iter().take(MAX_LISTED) {
        let node = b.node.as_deref().unwrap_or("an unknown node");
        if s.uncounted {
            o.push_str(&format!("{pad}    {} on {node}\n", b.ip));
        } else {
            o.push_str(&format!(
                "{pad}    {} on {node}: {} connections\n",
                b.ip, b.connections
            ));
        }
    }
    if s.backends.len() > MAX_LISTED {
        o.push_str(&format!(
            "{pad}    … and {} more endpoints (--json lists them all)\n",
            s.backends.len() - MAX_LISTED
        ));
    }
}

/// Renders a report as sentences.
pub fn render(r: &StatusReport) -> String {
    let mut o = String::new();
    let subnet = r.subnet.as_deref().unwrap_or("no subnet yet");
    o.push_str(&format!(
        "Node {} holds {subnet}{} in network {}.\n",
        r.node,
        if r.reservation {
            " (a reservation)"
        } else {
            ""
        },
        r.network.as_deref().unwrap_or("?")
    ));
    if r.peers.is_empty() {
        o.push_str("It has no peers.\n");
    }
    for (peers, over) in [(&r.peers, "VXLAN"), (&r.peers6, "IPv6 VXLAN")] {
        if peers.is_empty() {
            continue;
        }
        o.push_str(&format!(
            "It routes to {} peers over {over}:\n",
            peers.len()
        ));
        for p in peers {
            o.push_str(&format!(
                "  {} via {} (VTEP {})\n",
                p.subnet, p.public_ip, p.vtep_mac
            ));
        }
    }
    if let Some(e) = &r.service_error6 {
        o.push_str(&format!("The last IPv6 service table sync failed: {e}\n"));
    } else if r.services_synced6 == Some(false) {
        o.push_str("The IPv6 service table is not synced yet.\n");
    }
    if let Some(e) = &r.service_error {
        o.push_str(&format!("The last service sync failed: {e}\n"));
    }
    o.push_str(&format!(
        "The service table holds {} services in {} elements and {} load-balancing chains{}.\n",
        r.services.len(),
        r.service_elements,
        r.service_chains,
        if r.services_synced {
            ""
        } else {
            " (not synced yet)"
        }
    ));
    for s in &r.services {
        o.push_str(&format!(
            "Service {} at {} ({}){}:\n",
            s.id,
            s.cluster_ip,
            join_capped(s.ports.iter().cloned(), "; ", 8),
            if s.options.is_empty() {
                String::new()
            } else {
                format!(", {}", s.options.join(", "))
            }
        ));
        for p in s.problems.iter().take(MAX_LISTED) {
            o.push_str(&format!("  {p}\n"));
        }
        if s.problems.len() > MAX_LISTED {
            o.push_str(&format!(
                "  … and {} more problems\n",
                s.problems.len() - MAX_LISTED
            ));
        }
        if s.problems.iter().any(|p| p.starts_with("not programmed:")) {
            continue;
        }
        render_backends(s, "", &mut o);
        if let Some(h) = &s.ipv6 {
            o.push_str(&format!("  over IPv6 at {}:\n", h.cluster_ip));
            for p in h.problems.iter().take(MAX_LISTED) {
                o.push_str(&format!("    {p}\n"));
            }
            if !h.problems.iter().any(|p| p.starts_with("not programmed:")) {
                render_backends(h, "  ", &mut o);
            }
        }
    }
    render_dns(r, &mut o);
    if r.rejected_total > 0 {
        o.push_str(&format!(
            "{} records are skipped as malformed:\n",
            r.rejected_total
        ));
        for x in r.rejected_records.iter().take(MAX_LISTED) {
            o.push_str(&format!("  {}\n", cap_text(x, 300)));
        }
        if r.rejected_total > MAX_LISTED.min(r.rejected_records.len()) {
            o.push_str(&format!(
                "  … and {} more\n",
                r.rejected_total - MAX_LISTED.min(r.rejected_records.len())
            ));
        }
    }
    o
}

/// The cluster DNS part of the report.
fn render_dns(r: &StatusReport, o: &mut String) {
    let Some(d) = &r.dns else {
        o.push_str("The cluster DNS is not running on this node.\n");
        return;
    };
    let counts = |m: &std::collections::BTreeMap<String, u64>| {
        if m.is_empty() {
            "none".to_string()
        } else {
            m.iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    o.push_str(&format!(
        "The cluster DNS answers at {} for {} ({} names{}); other names go to {}.\n",
        d.address,
        d.domain,
        d.names,
        if d.ready { "" } else { ", still loading" },
        if d.upstreams.is_empty() {
            "no upstream (REFUSED)".to_string()
        } else {
            d.upstreams.join(", ")
        }
    ));
    o.push_str(&format!(
        "  queries: {}; responses: {}; forward cache {} hits, {} misses; {} upstream failures; {} refused for overload\n",
        counts(&d.requests),
        counts(&d.responses),
        d.cache_hits,
        d.cache_misses,
        d.forward_failures,
        d.overload
    ));
}

/// Endpoints, problems and records listed per section; the rest are counted.
const MAX_LISTED: usize = 50;

/// Runs `explain`.
pub async fn run(node: Option<&str>, addr: SocketAddr, json: bool) -> Result<()> {
    let r = fetch(addr).await?;
    check_node(node, &r.node, addr)?;
    print_report(&r, json, render)
}

/// Fails when `--node` names another node than the daemon at `addr` is.
pub fn check_node(want: Option<&str>, is: &str, addr: SocketAddr) -> Result<()> {
    if let Some(n) = want
        && n != is
    {
        bail!(
            "the daemon at {addr} is node {is:?}, not {n:?}; run this on {n} or point --status-addr at it"
        );
    }
    Ok(())
}

/// Prints `r` as JSON or in words.
pub fn print_report<T: serde::Serialize>(r: &T, json: bool, words: fn(&T) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        print!("{}", words(r));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::status::{BackendReport, ServiceReport};

    fn service(id: &str, ports: usize, backends: usize, problems: &[&str]) -> ServiceReport {
        ServiceReport {
            id: id.into(),
            cluster_ip: "10.96.0.10".into(),
            ports: (0..ports).map(|p| format!("{p}/tcp -> {p}")).collect(),
            options: Vec::new(),
            backends: (0..backends)
                .map(|i| BackendReport {
                    ip: format!("10.244.{}.{}", i / 250, i % 250 + 1),
                    node: None,
                    connections: 0,
                })
                .collect(),
            connections: 0,
            refused: 0,
            problems: problems.iter().map(|p| p.to_string()).collect(),
            uncounted: backends > 512,
            ipv6: None,
        }
    }

    /// A one-shot HTTP server on loopback answering every request with `answer`.
    async fn answering(answer: String) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(answer.as_bytes()).await;
        });
        addr
    }

    #[tokio::test]
    async fn fetch_checks_the_status_code_and_decodes_the_body() {
        let bad = answering(
            "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 5\r\n\r\nboom!".into(),
        )
        .await;
        let e = format!("{:#}", fetch(bad).await.unwrap_err());
        assert!(e.contains("500") && e.contains("boom!"), "{e}");
        let body = serde_json::to_string(&StatusReport {
            node: "n1".into(),
            ..Default::default()
        })
        .unwrap();
        let ok = answering(format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ))
        .await;
        let r = fetch(ok).await.unwrap();
        assert_eq!(r.node, "n1");
        let garbage = answering("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n{{{".into()).await;
        let e = format!("{:#}", fetch(garbage).await.unwrap_err());
        assert!(e.contains("decoding /status"), "{e}");
    }

    #[test]
    fn skipped_services_say_why_and_big_ones_are_cut() {
        let r = StatusReport {
            node: "n1".into(),
            services: vec![
                service(
                    "default/etcd",
                    1,
                    0,
                    &["not programmed: cluster IP 192.168.77.1 is an etcd endpoint"],
                ),
                service(
                    "default/big",
                    10_000,
                    10_000,
                    &["skipped: endpoint 127.0.0.1 is a loopback address"],
                ),
            ],
            rejected_records: vec!["/tartan/services/default/x: bad".into()],
            rejected_total: 3,
            ..Default::default()
        };
        let out = render(&r);
        assert!(out.contains("  not programmed: cluster IP 192.168.77.1 is an etcd endpoint\n"));
        assert!(!out.contains("no endpoints"), "{out}");
        assert!(out.contains("  skipped: endpoint 127.0.0.1 is a loopback address\n"));
        assert!(out.contains("(+9992 more)"), "ports are cut");
        assert!(
            out.contains("… and 9950 more endpoints"),
            "endpoints are cut"
        );
        assert!(out.contains("3 records are skipped as malformed"));
        assert!(out.contains("… and 2 more"));
        assert!(out.lines().count() < 200);
    }
}
