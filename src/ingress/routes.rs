//! The ingress route table: which route, and which backend, a request for a host and path
//! goes to. Kept up to date one route at a time ([`RouteTable::upsert`],
//! [`RouteTable::remove`]) and asked once per HTTP request ([`RouteTable::lookup`], which
//! does not allocate), or by a person ([`RouteTable::explain`]: what was considered and why
//! the winner won).
//!
//! The rules are `model::ingress`'s (see its module doc), host first, as nginx and
//! ingress-nginx match: the most specific host that has any route is chosen (an exact host,
//! else the wildcard, else none), then the longest matching path among that host's routes,
//! then the smaller name; when none of its paths matches, the request goes to the default
//! backend (the `*` routes, path-matched the same way) or matches nothing. The index follows
//! the rules: one bucket per exact host, one per wildcard suffix, one for `*`, each sorted by
//! path length (longest first) and name, so a lookup is at most two hash lookups and two
//! short scans: the bucket of the request host, else of the host without its first label (a
//! wildcard matches exactly one label); then, if no path in it matched, `*`'s. A bucket that
//! exists is never empty, so its existence is what "the host has a route" means.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::model::DecodeError;
use crate::model::ingress::{
    HostKind, HostPattern, IngressRoute, MAX_HOST_LEN, MAX_LABEL_LEN, PortRef,
    normalize_request_host, path_matches, request_path,
};

type Map<V> = HashMap<Box<str>, V, ahash::RandomState>;

/// How specific the host of a matching route is; earlier variants win.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum HostRank {
    /// The route names the request's host.
    Exact,
    /// The route's wildcard matches the request's host (one label in front of its suffix).
    Wildcard,
    /// The route's host is `*` (the default backend).
    Default,
}

/// The routes, indexed by host for [`RouteTable::lookup`].
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// Route name → its host pattern, which says which bucket holds it.
    by_name: Map<HostPattern>,
    /// Exact host → its routes.
    exact: Map<Vec<Arc<IngressRoute>>>,
    /// Wildcard suffix (without `*.`) → its routes.
    wildcard: Map<Vec<Arc<IngressRoute>>>,
    /// The routes of host `*`.
    any: Vec<Arc<IngressRoute>>,
}

/// The order within a bucket: longest path first, then by name.
/// The route itself, out of the table (a request may still hold it shared; then a copy).
fn unshare(r: Arc<IngressRoute>) -> IngressRoute {
    Arc::try_unwrap(r).unwrap_or_else(|shared| (*shared).clone())
}

fn bucket_key(r: &IngressRoute) -> (Reverse<usize>, &str) {
    (Reverse(r.path.len()), r.name.as_str())
}

/// The first route of a bucket whose path matches (the bucket's order makes it the best).
fn first_match<'a>(
    bucket: Option<&'a Vec<Arc<IngressRoute>>>,
    path: &str,
) -> Option<&'a Arc<IngressRoute>> {
    bucket?.iter().find(|r| path_matches(&r.path, path))
}

/// The part of a request host before its first dot.
fn first_label(host: &str) -> &str {
    host.split('.').next().unwrap_or(host)
}

impl RouteTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many routes the table holds.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether the table holds no route.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Every route, in no particular order.
    pub fn routes(&self) -> impl Iterator<Item = &IngressRoute> {
        self.exact
            .values()
            .chain(self.wildcard.values())
            .flatten()
            .chain(self.any.iter())
            .map(|r| &**r)
    }

    /// The route named `name`.
    pub fn get(&self, name: &str) -> Option<&IngressRoute> {
        let host = self.by_name.get(name)?;
        self.bucket(host)?
            .iter()
            .find(|r| r.name == name)
            .map(|r| &**r)
    }

    fn bucket(&self, host: &HostPattern) -> Option<&Vec<Arc<IngressRoute>>> {
        match host.kind() {
            HostKind::Exact(h) => self.exact.get(h),
            HostKind::Wildcard(s) => self.wildcard.get(s),
            HostKind::Any => Some(&self.any),
        }
    }

    fn bucket_mut(&mut self, host: &HostPattern) -> &mut Vec<Arc<IngressRoute>> {
        match host.kind() {
            HostKind::Exact(h) => self.exact.entry(h.into()).or_default(),
            HostKind::Wildcard(s) => self.wildcard.entry(s.into()).or_default(),
            HostKind::Any => &mut self.any,
        }
    }

    /// Adds `route`, or replaces the route of the same name (moving it when its host
    /// changed); returns the route it replaced. A route that does not validate is refused
    /// and the table left as it was. Costs one bucket's worth of work, never a rebuild.
    pub fn upsert(&mut self, route: IngressRoute) -> Result<Option<IngressRoute>, DecodeError> {
        route.validate()?;
        let old = self.remove(&route.name);
        self.by_name
            .insert(route.name.as_str().into(), route.host.clone());
        let bucket = self.bucket_mut(&route.host);
        let at = bucket
            .binary_search_by(|r| bucket_key(r).cmp(&bucket_key(&route)))
            .unwrap_or_else(|at| at);
        bucket.insert(at, Arc::new(route));
        Ok(old)
    }

    /// Removes the route named `name`; returns it.
    pub fn remove(&mut self, name: &str) -> Option<IngressRoute> {
        let host = self.by_name.remove(name)?;
        let (map, key) = match host.kind() {
            HostKind::Exact(h) => (&mut self.exact, h),
            HostKind::Wildcard(s) => (&mut self.wildcard, s),
            HostKind::Any => {
                let at = self.any.iter().position(|r| r.name == name)?;
                return Some(unshare(self.any.remove(at)));
            }
        };
        let bucket = map.get_mut(key)?;
        let at = bucket.iter().position(|r| r.name == name)?;
        let route = bucket.remove(at);
        if bucket.is_empty() {
            map.remove(key);
        }
        Some(unshare(route))
    }

    /// The bucket of the most specific host pattern with routes that matches a normalized
    /// request host: its exact host's, else its wildcard's; `None` when only `*` is left.
    fn host_bucket(&self, host: Option<&str>) -> Option<(&Vec<Arc<IngressRoute>>, HostRank)> {
        let h = host?;
        if let Some(b) = self.exact.get(h) {
            return Some((b, HostRank::Exact));
        }
        let (_, suffix) = h.split_once('.')?;
        self.wildcard.get(suffix).map(|b| (b, HostRank::Wildcard))
    }

    /// The route a request for `host` (its `Host` header or `:authority`, any case, with or
    /// without a port) and `path` (the request target; its query is ignored) goes to, and its
    /// backend: the longest matching path of the most specific host that has routes, else of
    /// the default backend (`*`). `None` when neither has a matching path (a 404).
    /// Allocates nothing.
    pub fn lookup(&self, host: &str, path: &str) -> Option<RouteMatch<'_>> {
        let mut buf = [0u8; MAX_HOST_LEN];
        let host = normalize_request_host(host, &mut buf);
        let path = request_path(path);
        let (route, rank) = self
            .host_bucket(host)
            .and_then(|(bucket, rank)| first_match(Some(bucket), path).map(|r| (r, rank)))
            .or_else(|| first_match(Some(&self.any), path).map(|r| (r, HostRank::Default)))?;
        let service = match (&route.service, host) {
            (Some(s), _) => ServiceName::Route(s),
            (None, Some(h)) => ServiceName::label(first_label(h)),
            // Only wildcard routes go without a service (upsert validates), and a wildcard
            // matched a valid host.
            (None, None) => ServiceName::Route(""),
        };
        Some(RouteMatch {
            route,
            rank,
            service,
        })
    }

    /// Why a request for `host` and `path` goes where [`RouteTable::lookup`] sends it: the
    /// host chosen, every route whose host matches (best first) with what became of it,
    /// wildcards that came close, and the outcome. For people (`tartanctl ingress explain`),
    /// not the hot path.
    pub fn explain(&self, host: &str, path: &str) -> Explanation {
        let mut buf = [0u8; MAX_HOST_LEN];
        let norm = normalize_request_host(host, &mut buf);
        let rpath = request_path(path);
        let mut considered: Vec<(HostRank, &IngressRoute)> = Vec::new();
        let mut near_misses = Vec::new();
        for r in self.routes() {
            match host_rank(&r.host, norm) {
                Some(rank) => considered.push((rank, r)),
                None => {
                    if let Some(why) = near_miss(&r.host, norm) {
                        near_misses.push(NearMiss {
                            route: r.name.clone(),
                            host: r.host.to_string(),
                            why,
                        });
                    }
                }
            }
        }
        considered.sort_by(|(ra, a), (rb, b)| (ra, bucket_key(a)).cmp(&(rb, bucket_key(b))));
        near_misses.sort_by(|a: &NearMiss, b| a.route.cmp(&b.route));
        let chosen = self
            .host_bucket(norm)
            .and_then(|(bucket, rank)| Some((bucket.first()?.host.to_string(), rank)));
        let chosen_rank = chosen.as_ref().map(|c| c.1);
        let found = self.lookup(host, path);
        let winner = found.as_ref().map(|m| (m.rank, m.route()));
        let candidates = considered
            .iter()
            .map(|&(rank, r)| Candidate {
                route: r.name.clone(),
                host: r.host.to_string(),
                path: r.path.clone(),
                rank,
                verdict: verdict(rank, r, rpath, chosen_rank, winner),
            })
            .collect();
        let outcome = match &found {
            Some(m) => Outcome::Matched {
                route: m.route.name.clone(),
                rank: m.rank,
                backend: BackendRef {
                    namespace: m.namespace().to_string(),
                    service: m.service().to_string(),
                    port: m.port().clone(),
                },
            },
            None if self.is_empty() => Outcome::NoMatch(NoMatchReason::NoRoutes),
            None if considered.is_empty() && norm.is_none() => {
                Outcome::NoMatch(NoMatchReason::HostNotAName)
            }
            None if considered.is_empty() => Outcome::NoMatch(NoMatchReason::NoHostMatches),
            None => Outcome::NoMatch(NoMatchReason::NoPathMatches {
                host: chosen
                    .as_ref()
                    .map_or_else(|| "*".to_string(), |c| c.0.clone()),
            }),
        };
        Explanation {
            request_host: host.to_string(),
            host: norm.map(str::to_string),
            path: rpath.to_string(),
            chosen_host: chosen.map(|c| c.0),
            candidates,
            near_misses,
            outcome,
        }
    }
}

/// How a route's host matches a normalized request host, if it does.
fn host_rank(pattern: &HostPattern, host: Option<&str>) -> Option<HostRank> {
    pattern.matches(host).then(|| match pattern.kind() {
        HostKind::Exact(_) => HostRank::Exact,
        HostKind::Wildcard(_) => HostRank::Wildcard,
        HostKind::Any => HostRank::Default,
    })
}

/// Why a wildcard that does not match the host came close, if it did.
fn near_miss(pattern: &HostPattern, host: Option<&str>) -> Option<NearMissReason> {
    let (HostKind::Wildcard(suffix), Some(host)) = (pattern.kind(), host) else {
        return None;
    };
    if host == suffix {
        return Some(NearMissReason::NoLabelInFront);
    }
    let front = host.strip_suffix(suffix)?.strip_suffix('.')?;
    front
        .contains('.')
        .then_some(NearMissReason::MoreThanOneLabel)
}

/// What became of a considered route of host kind `rank`, given the rank of the host chosen
/// (`None`: only `*` routes were in play) and the winner.
fn verdict(
    rank: HostRank,
    r: &IngressRoute,
    path: &str,
    chosen: Option<HostRank>,
    winner: Option<(HostRank, &IngressRoute)>,
) -> Verdict {
    if winner.is_some_and(|(_, w)| w.name == r.name) {
        return Verdict::Chosen;
    }
    if rank != HostRank::Default && chosen.is_some_and(|c| c < rank) {
        return Verdict::HostNotChosen;
    }
    if !path_matches(&r.path, path) {
        return Verdict::PathDoesNotMatch;
    }
    match winner {
        Some((wrank, _)) if wrank < rank => Verdict::DefaultNotNeeded,
        Some((_, w)) if w.path.len() > r.path.len() => Verdict::ShorterPath,
        Some(_) => Verdict::SameHostAndPath,
        // Unreachable: a candidate of the chosen host or `*` whose path matches makes lookup
        // find a winner.
        None => Verdict::PathDoesNotMatch,
    }
}

/// The service a match resolved to: the route's, or the request host's first label (copied,
/// so a lookup borrows nothing from the request and allocates nothing).
#[derive(Clone, Copy)]
enum ServiceName<'a> {
    Route(&'a str),
    Label { buf: [u8; MAX_LABEL_LEN], len: u8 },
}

impl ServiceName<'_> {
    fn label(l: &str) -> Self {
        let mut buf = [0u8; MAX_LABEL_LEN];
        let len = l.len().min(MAX_LABEL_LEN);
        buf[..len].copy_from_slice(&l.as_bytes()[..len]);
        ServiceName::Label {
            buf,
            len: len as u8,
        }
    }

    fn as_str(&self) -> &str {
        match self {
            ServiceName::Route(s) => s,
            // A label of a normalized host is ASCII.
            ServiceName::Label { buf, len } => {
                std::str::from_utf8(&buf[..usize::from(*len)]).unwrap_or_default()
            }
        }
    }
}

/// A [`RouteMatch`] that owns its route (shared with the table): what a request holds while
/// it is forwarded.
#[derive(Clone)]
pub struct RouteHit {
    route: Arc<IngressRoute>,
    /// The service name taken from the host (a wildcard route without a service).
    label: Option<([u8; MAX_LABEL_LEN], u8)>,
}

impl RouteHit {
    /// The route that won.
    pub fn route(&self) -> &IngressRoute {
        &self.route
    }

    /// The backend's namespace.
    pub fn namespace(&self) -> &str {
        &self.route.namespace
    }

    /// The backend service (as [`RouteMatch::service`]).
    pub fn service(&self) -> &str {
        match &self.label {
            // A label of a normalized host is ASCII.
            Some((buf, len)) => std::str::from_utf8(&buf[..usize::from(*len)]).unwrap_or_default(),
            None => self.route.service.as_deref().unwrap_or_default(),
        }
    }

    /// The backend's service port.
    pub fn port(&self) -> &PortRef {
        &self.route.port
    }
}

/// What [`RouteTable::lookup`] found: the route and the backend it resolved.
#[derive(Clone, Copy)]
pub struct RouteMatch<'a> {
    route: &'a Arc<IngressRoute>,
    rank: HostRank,
    service: ServiceName<'a>,
}

impl<'a> RouteMatch<'a> {
    /// The route that won.
    pub fn route(&self) -> &'a IngressRoute {
        self.route
    }

    /// The match, held past the table's lock without copying the route.
    pub fn hit(&self) -> RouteHit {
        RouteHit {
            route: Arc::clone(self.route),
            label: match self.service {
                ServiceName::Route(_) => None,
                ServiceName::Label { buf, len } => Some((buf, len)),
            },
        }
    }

    /// How its host matched.
    pub fn rank(&self) -> HostRank {
        self.rank
    }

    /// The backend's namespace.
    pub fn namespace(&self) -> &'a str {
        &self.route.namespace
    }

    /// The backend service: the route's, or for a wildcard route without one, the request
    /// host's first label (lowercased).
    pub fn service(&self) -> &str {
        self.service.as_str()
    }

    /// The backend's service port.
    pub fn port(&self) -> &'a PortRef {
        &self.route.port
    }

    /// The backend, borrowed.
    pub fn backend(&self) -> Backend<'_> {
        Backend {
            namespace: self.namespace(),
            service: self.service(),
            port: self.port(),
        }
    }
}

impl fmt::Debug for RouteMatch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteMatch")
            .field("route", &self.route.name)
            .field("rank", &self.rank)
            .field("backend", &self.backend())
            .finish()
    }
}

/// Where a request goes: `namespace/service:port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend<'a> {
    /// The service's namespace.
    pub namespace: &'a str,
    /// The service.
    pub service: &'a str,
    /// The service port.
    pub port: &'a PortRef,
}

impl fmt::Display for Backend<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.service, self.port)
    }
}

/// An owned [`Backend`], for [`Explanation`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendRef {
    /// The service's namespace.
    pub namespace: String,
    /// The service.
    pub service: String,
    /// The service port.
    pub port: PortRef,
}

/// Why a request goes where it goes ([`RouteTable::explain`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    /// The host as the request gave it.
    pub request_host: String,
    /// The host as matched (lowercase, no port, no trailing dot); `None` when it is not a
    /// valid name or is an IP literal, so that only `*` routes match it.
    pub host: Option<String>,
    /// The path as matched (query and fragment removed).
    pub path: String,
    /// The host pattern whose routes are matched by path (the exact host, else the wildcard
    /// that matches it); `None` when no route but `*` matches the host.
    pub chosen_host: Option<String>,
    /// Every route whose host matches, in the order they compete: exact, wildcard, `*`; then
    /// longest path; then name.
    pub candidates: Vec<Candidate>,
    /// Wildcard routes whose suffix the host ends in but which do not match it, by name.
    pub near_misses: Vec<NearMiss>,
    /// The route chosen, or why there is none.
    pub outcome: Outcome,
}

/// A route whose host matches the request's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    /// Route name.
    pub route: String,
    /// Its host pattern.
    pub host: String,
    /// Its path prefix.
    pub path: String,
    /// How its host matched.
    pub rank: HostRank,
    /// What became of it.
    pub verdict: Verdict,
}

/// What became of a [`Candidate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Verdict {
    /// It won.
    Chosen,
    /// Its host was in play (the chosen host, or `*`), but its path prefix does not match
    /// the request's path.
    PathDoesNotMatch,
    /// Its host matches, but a more specific one has routes and was chosen, so this host's
    /// routes are not looked at, whatever their paths (a wildcard's, under an exact host).
    HostNotChosen,
    /// A default-backend (`*`) route whose path matches, not needed: a route of the chosen
    /// host matched the path.
    DefaultNotNeeded,
    /// Its host is as specific as the winner's, but the winner's path is longer.
    ShorterPath,
    /// Same kind of host and path length as the winner, whose name sorts first.
    SameHostAndPath,
}

/// A wildcard route that does not match the request's host but came close.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NearMiss {
    /// Route name.
    pub route: String,
    /// Its host pattern.
    pub host: String,
    /// Why it does not match.
    pub why: NearMissReason,
}

/// Why a wildcard does not match a host that ends in its suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum NearMissReason {
    /// The host is the suffix itself (`*.apps.example.com` does not match
    /// `apps.example.com`).
    NoLabelInFront,
    /// The host has more than one label in front of the suffix (a wildcard matches exactly
    /// one, as in Kubernetes).
    MoreThanOneLabel,
}

/// The end of an [`Explanation`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// A route matched.
    Matched {
        /// The route.
        route: String,
        /// How its host matched (`default`: no path of the chosen host matched, or no host
        /// but `*` has routes, and the default backend took the request).
        rank: HostRank,
        /// Its backend for this request.
        backend: BackendRef,
    },
    /// No route matched.
    NoMatch(NoMatchReason),
}

/// Why no route matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum NoMatchReason {
    /// The table is empty.
    NoRoutes,
    /// The host is not a valid name (or is an IP literal), so only `*` routes could match,
    /// and there are none.
    HostNotAName,
    /// No route's host matches, and there is no `*` route.
    NoHostMatches,
    /// A host was chosen, but none of its routes' paths matches, nor any `*` route's.
    NoPathMatches {
        /// The host pattern chosen (`*` when only default-backend routes match the host).
        host: String,
    },
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
