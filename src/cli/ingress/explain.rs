//! `tartanctl ingress explain HOST[/PATH]`: where the ingress sends a request, and why. Reads
//! the routes, services, pods and endpoints from etcd once (no watch), builds the route table
//! and the backends the proxy would, and shows the host chosen, every candidate route with
//! its verdict, the backend, its target port (or why there is none) and its endpoints.

use std::net::Ipv4Addr;
use std::time::Instant;

use anyhow::{Result, bail};
use serde::Serialize;

use crate::cli::service::ServiceRange;
use crate::cli::{OutputFormat, cap_text, join_capped, render_table};
use crate::ingress::backends::{Backends, Targets};
use crate::ingress::routes::{
    Explanation, HostRank, NearMissReason, NoMatchReason, Outcome, RouteTable, Verdict,
};
use crate::model::ingress::PortRef;
use crate::store::etcd::{EtcdArgs, Store};
use crate::store::ingress::IngressStore;
use crate::store::records::{RecordKind, RecordSink, decode};

/// Endpoints shown in the text output; `-o json` lists them all.
const MAX_ENDPOINTS_SHOWN: usize = 16;

/// Splits `HOST[/PATH]` (or a URL, `http://HOST/PATH`) into the host and the request
/// target: `shop.example.com/api/x?y=1` → (`shop.example.com`, `/api/x?y=1`); no path → `/`.
pub fn parse_request(s: &str) -> Result<(String, String)> {
    let s = s.trim();
    let rest = ["http://", "https://"]
        .iter()
        .find_map(|scheme| {
            s.get(..scheme.len())
                .filter(|p| p.eq_ignore_ascii_case(scheme))
                .map(|_| &s[scheme.len()..])
        })
        .unwrap_or(s);
    if rest.contains("://") {
        bail!("{s:?}: only http:// and https:// URLs (or HOST[/PATH]) are understood");
    }
    let (authority, target) = match rest.find(['/', '?', '#']) {
        Some(at) if rest[at..].starts_with('/') => (&rest[..at], rest[at..].to_string()),
        Some(at) => (&rest[..at], format!("/{}", &rest[at..])),
        None => (rest, "/".to_string()),
    };
    // A URL's user information is not part of the host.
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.is_empty() {
        bail!("{s:?}: no host (give HOST[/PATH], e.g. shop.example.com/api)");
    }
    if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("{s:?}: the host holds a space or control character");
    }
    Ok((host.to_string(), target))
}

/// Where a request goes and why: the routing ([`Explanation`]) and what its backend resolves
/// to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestExplanation {
    /// How the route was chosen.
    #[serde(flatten)]
    pub routing: Explanation,
    /// The chosen route's backend, resolved; `None` when no route matched.
    pub backend: Option<BackendResolution>,
}

/// A route's backend, resolved against the services, pods and endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendResolution {
    /// The service's namespace.
    pub namespace: String,
    /// The service.
    pub service: String,
    /// The route's service port.
    pub port: PortRef,
    /// Whether the service exists.
    pub service_exists: bool,
    /// The endpoint port it resolves to.
    pub target_port: Option<u16>,
    /// Why it does not resolve (no such service, no such port).
    pub problem: Option<String>,
    /// The ready endpoints, `ip:port` (addresses only when the port does not resolve).
    pub endpoints: Vec<String>,
}

impl RequestExplanation {
    /// What the ingress answers instead of forwarding the request, and why; `None` when it
    /// forwards it (then the pod answers). The same statuses as `ingress::proxy`: 404
    /// without a route, 503 without the service, its port or a ready endpoint.
    pub fn refusal(&self) -> Option<(u16, String)> {
        let Some(b) = &self.backend else {
            return Some((404, "no route matches".into()));
        };
        if let Some(p) = &b.problem {
            return Some((503, p.clone()));
        }
        if b.endpoints.is_empty() {
            return Some((
                503,
                format!(
                    "service {}/{} has no ready endpoints",
                    b.namespace, b.service
                ),
            ));
        }
        None
    }
}

/// Resolves what `table` chooses for `host` and `path` against `targets`. Pure.
pub fn explain_request(
    table: &RouteTable,
    targets: &Targets,
    host: &str,
    path: &str,
) -> RequestExplanation {
    let routing = table.explain(host, path);
    let backend = match &routing.outcome {
        Outcome::Matched { backend, .. } => {
            let mut r = BackendResolution {
                namespace: backend.namespace.clone(),
                service: backend.service.clone(),
                port: backend.port.clone(),
                service_exists: false,
                target_port: None,
                problem: None,
                endpoints: Vec::new(),
            };
            match targets.get(&backend.namespace, &backend.service) {
                None => {
                    r.problem = Some(format!(
                        "service {}/{} does not exist",
                        backend.namespace, backend.service
                    ));
                }
                Some(t) => {
                    r.service_exists = true;
                    match t.target_port(&backend.port) {
                        Ok(port) => {
                            r.target_port = Some(port);
                            r.endpoints = t.addrs.iter().map(|ip| format!("{ip}:{port}")).collect();
                        }
                        Err(why) => {
                            r.problem = Some(why);
                            r.endpoints = t.addrs.iter().map(Ipv4Addr::to_string).collect();
                        }
                    }
                }
            }
            Some(r)
        }
        Outcome::NoMatch(_) => None,
    };
    RequestExplanation { routing, backend }
}

fn verdict_text(v: Verdict, chosen_host: Option<&str>) -> String {
    match v {
        Verdict::Chosen => "chosen".into(),
        Verdict::PathDoesNotMatch => "path does not match".into(),
        Verdict::HostNotChosen => format!(
            "host not chosen: {} has routes",
            chosen_host.unwrap_or("a more specific host")
        ),
        Verdict::DefaultNotNeeded => "default backend not needed".into(),
        Verdict::ShorterPath => "the winner's path is longer".into(),
        Verdict::SameHostAndPath => {
            "same host and path as the winner, whose name sorts first".into()
        }
    }
}

/// Renders an explanation for people.
pub fn render(e: &RequestExplanation) -> String {
    let r = &e.routing;
    let mut o = String::new();
    let host = match &r.host {
        Some(h) if *h != r.request_host => {
            format!("{h} (from {:?})", cap_text(&r.request_host, 80))
        }
        Some(h) => h.clone(),
        None => format!(
            "{} (not a DNS name: only `*` routes match it)",
            cap_text(&r.request_host, 80)
        ),
    };
    o.push_str(&format!("Host:    {host}\n"));
    o.push_str(&format!("Path:    {}\n", cap_text(&r.path, 200)));
    o.push_str(&format!(
        "Chosen host: {}\n",
        r.chosen_host
            .as_deref()
            .unwrap_or("none (no route names this host; only the default backend `*` is left)")
    ));
    if r.candidates.is_empty() {
        o.push_str("No route's host matches.\n");
    } else {
        let rows: Vec<Vec<String>> = r
            .candidates
            .iter()
            .map(|c| {
                vec![
                    c.route.clone(),
                    c.host.clone(),
                    c.path.clone(),
                    verdict_text(c.verdict, r.chosen_host.as_deref()),
                ]
            })
            .collect();
        o.push_str("Candidates:\n");
        for line in render_table(&["ROUTE", "HOST", "PATH", "VERDICT"], &rows).lines() {
            o.push_str(&format!("  {line}\n"));
        }
    }
    for m in &r.near_misses {
        let why = match m.why {
            NearMissReason::NoLabelInFront => {
                "the host is the suffix itself, with no label in front"
            }
            NearMissReason::MoreThanOneLabel => {
                "the host has more than one label in front (a wildcard matches exactly one)"
            }
        };
        o.push_str(&format!("Near miss: {} ({}): {why}\n", m.route, m.host));
    }
    match &r.outcome {
        Outcome::Matched { route, rank, .. } => {
            let how = match (rank, &r.chosen_host) {
                (HostRank::Default, Some(h)) => {
                    format!(" (default backend: no path of {h} matches)")
                }
                (HostRank::Default, None) => " (default backend)".to_string(),
                _ => String::new(),
            };
            o.push_str(&format!("Route:   {route}{how}\n"));
        }
        Outcome::NoMatch(why) => {
            let why = match why {
                NoMatchReason::NoRoutes => "there are no ingress routes".to_string(),
                NoMatchReason::HostNotAName => {
                    "the host is not a DNS name and there is no `*` route".to_string()
                }
                NoMatchReason::NoHostMatches => {
                    "no route's host matches and there is no `*` route".to_string()
                }
                NoMatchReason::NoPathMatches { host } if host == "*" => {
                    format!("no path of the default backend `*` matches {}", r.path)
                }
                NoMatchReason::NoPathMatches { host } => format!(
                    "no path of {host} matches {}, nor of the default backend `*`",
                    r.path
                ),
            };
            o.push_str(&format!("No route: {why} → 404\n"));
        }
    }
    if let Some(b) = &e.backend {
        o.push_str(&format!(
            "Backend: {}/{}:{}\n",
            b.namespace, b.service, b.port
        ));
        match (&b.problem, b.target_port) {
            (Some(p), _) => o.push_str(&format!("Target port: none: {p} → 503\n")),
            (None, Some(t)) => o.push_str(&format!("Target port: {t}\n")),
            (None, None) => {}
        }
        if b.service_exists {
            let listed = join_capped(b.endpoints.iter().cloned(), ", ", MAX_ENDPOINTS_SHOWN);
            match (b.endpoints.is_empty(), b.target_port) {
                (true, _) => o.push_str("Endpoints: no ready endpoints → 503\n"),
                (false, Some(_)) => o.push_str(&format!("Endpoints: {listed}\n")),
                (false, None) => o.push_str(&format!("Endpoints: {listed} (no port to send to)\n")),
            }
        }
    }
    o
}

/// The route table and backends as etcd holds them now, with a line per record skipped.
async fn load(
    etcd: &EtcdArgs,
    range: &ServiceRange,
) -> Result<(RouteTable, Backends, Vec<String>)> {
    let store = Store::connect(etcd).await?;
    let (routes, bad) = IngressStore::new(&store, etcd).list_routes().await?;
    let mut skipped: Vec<String> = bad
        .into_iter()
        .map(|b| format!("skipping malformed ingress route record {b}"))
        .collect();
    let mut table = RouteTable::new();
    for r in routes {
        let name = r.name.clone();
        if let Err(e) = table.upsert(r) {
            skipped.push(format!("skipping ingress route {name}: {e}"));
        }
    }
    // The explicit endpoints the ingress would refuse (every node's address, as the ingress may
    // run on any of them) are left out here too, by the guard the service commands use; the
    // log says which.
    let mut backends = Backends::with_guard(range.checked_guard(&store, etcd).await?);
    let t0 = Instant::now();
    for kind in [
        RecordKind::Services,
        RecordKind::Pods,
        RecordKind::Endpoints,
    ] {
        let (_, items) = store.list(&kind.prefix(etcd)).await?;
        for it in &items {
            match decode(kind, it, etcd) {
                Ok(c) => backends.change(c),
                Err(e) => skipped.push(format!("skipping malformed record {}: {e}", it.key)),
            }
        }
    }
    backends.settled(true, t0);
    Ok((table, backends, skipped))
}

/// Runs `ingress explain`.
pub async fn run(
    etcd: &EtcdArgs,
    request: &str,
    output: OutputFormat,
    range: &ServiceRange,
) -> Result<()> {
    let (host, path) = parse_request(request)?;
    let (table, backends, skipped) = load(etcd, range).await?;
    for s in &skipped {
        eprintln!("{}", cap_text(s, 300));
    }
    let e = explain_request(&table, &backends.targets(), &host, &path);
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&e)?),
        OutputFormat::Table => print!("{}", render(&e)),
    }
    // Like `curl -f`: a request the ingress would not forward is a failed command, so a
    // script can check a route with the exit status alone.
    if let Some((code, why)) = e.refusal() {
        anyhow::bail!("{request} would be answered {code}: {why}");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
