//! HTTP ingress records as stored in etcd: routes (`/tartan/ingress/routes/<name>`) and TLS
//! certificates (`/tartan/ingress/certs/<name>`), with validation, and the pure pieces of
//! request matching both the route table (`ingress::routes`) and its brute-force twin in the
//! tests use: request host normalization, host patterns, path prefixes. No I/O.
//!
//! Matching, in one place (the route table implements it with indexes):
//!
//! - **Host.** A request's `Host` is lowercased, loses its `:port` and one trailing dot
//!   ([`normalize_request_host`]); a host that is then not a valid DNS name, or is an IP
//!   literal, matches only `*`. An exact pattern matches that name only; `*.apps.example.com`
//!   matches exactly one extra label (`x.apps.example.com`, neither `a.b.apps.example.com`
//!   nor `apps.example.com`), as Kubernetes does; `*` matches every host.
//! - **Path.** Kubernetes `Prefix` semantics on segment boundaries ([`path_matches`]): `/api`
//!   matches `/api`, `/api/` and `/api/x`, not `/apix`; `/` matches everything. The query
//!   string and fragment are ignored ([`request_path`]). Nothing is rewritten.
//! - **Precedence, host first** (as nginx and ingress-nginx do). The most specific host
//!   pattern that has any route and matches is chosen: the exact host, else the wildcard
//!   (since a wildcard matches exactly one label, at most one wildcard suffix can match a
//!   given host; a longer suffix is thus more specific by construction). Among that host's
//!   routes the longest matching path wins, and two routes with the same host and path are
//!   ordered by name. When none of its paths matches, the request does not fall through to a
//!   less specific host: it goes to the default backend (the `*` routes, path-matched the
//!   same way) or matches nothing (404). A host no other pattern matches goes to `*` too.
//! - **Backend.** The route's service, or, for a wildcard route without one, the first
//!   label of the request host; the route's namespace and port.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::DecodeError;
use crate::model::service::valid_name;

/// Longest host name (RFC 1035, without the trailing dot).
pub const MAX_HOST_LEN: usize = 253;
/// Longest label of a host name.
pub const MAX_LABEL_LEN: usize = 63;
/// Longest route path, in bytes.
pub const MAX_PATH_LEN: usize = 1024;
/// Largest route record accepted from etcd (a valid one is under 2 KiB; the rest is room for
/// fields a newer version may add).
pub const MAX_ROUTE_BYTES: usize = 16 << 10;
/// Largest PEM text of a certificate chain, and of a private key.
pub const MAX_PEM_BYTES: usize = 64 << 10;
/// Most host patterns one certificate may name.
pub const MAX_CERT_HOSTS: usize = 100;
/// Largest certificate record accepted from etcd: both PEM texts at their limit (JSON
/// escapes each newline, ~2 %), every host at its limit, and room to spare.
pub const MAX_CERT_BYTES: usize = 3 * MAX_PEM_BYTES + MAX_CERT_HOSTS * (MAX_HOST_LEN + 8);

/// What is wrong with one label of a host name (no allocation: the request path uses it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LabelProblem {
    Empty,
    TooLong,
    BadChar,
    EdgeHyphen,
}

impl fmt::Display for LabelProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LabelProblem::Empty => "empty label",
            LabelProblem::TooLong => "a label is longer than 63 characters",
            LabelProblem::BadChar => "a label may hold only letters, digits and '-'",
            LabelProblem::EdgeHyphen => "a label must not begin or end with '-'",
        })
    }
}

/// Checks one already lowercased label.
fn check_label(l: &[u8]) -> Result<(), LabelProblem> {
    match l {
        [] => Err(LabelProblem::Empty),
        _ if l.len() > MAX_LABEL_LEN => Err(LabelProblem::TooLong),
        _ if !l
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-') =>
        {
            Err(LabelProblem::BadChar)
        }
        [b'-', ..] | [.., b'-'] => Err(LabelProblem::EdgeHyphen),
        _ => Ok(()),
    }
}

/// Checks the labels of an already lowercased name without a trailing dot.
fn check_name(name: &str) -> Result<(), LabelProblem> {
    name.split('.').try_for_each(|l| check_label(l.as_bytes()))
}

/// A route's or certificate's host: an exact name (`shop.example.com`), a wildcard
/// (`*.apps.example.com`: exactly one label in front of at least two) or `*` (every host:
/// the default backend). Stored lowercase without a trailing dot; only [`HostPattern::parse`]
/// makes one, so every value is valid. Serialized as that text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostPattern(String);

/// What kind of host a [`HostPattern`] is, with the text the route table indexes it by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind<'a> {
    /// One name.
    Exact(&'a str),
    /// `*.<suffix>`: any one label in front of the suffix (given without `*.`).
    Wildcard(&'a str),
    /// `*`: every host.
    Any,
}

impl HostPattern {
    /// The pattern `*`.
    pub fn any() -> HostPattern {
        HostPattern("*".into())
    }

    /// Parses and normalizes a pattern: lowercased, one trailing dot removed; labels of 1-63
    /// letters, digits and '-' (not at either end), at most 253 characters, no port, no IP
    /// literal, `*` only as the whole first label before at least two more, or alone. The
    /// message quotes the input and says what is wrong (`"*.a..b": empty label`).
    pub fn parse(s: &str) -> Result<HostPattern, String> {
        let bad = |why: &dyn fmt::Display| Err(format!("{s:?}: {why}"));
        let lower = s.to_ascii_lowercase();
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        if name == "*" {
            return Ok(HostPattern::any());
        }
        if name.is_empty() {
            return bad(&"is empty");
        }
        if is_ip_literal(name) {
            return bad(&"is an IP address; ingress hosts are names (use \"*\" to match any host)");
        }
        if name.contains(':') {
            return bad(&"a host has no port");
        }
        if name.len() > MAX_HOST_LEN {
            return bad(&"is longer than 253 characters");
        }
        let rest = match name.strip_prefix("*.") {
            Some(rest) => {
                if rest.split('.').count() < 2 {
                    return bad(&"a wildcard needs at least two labels after \"*.\"");
                }
                rest
            }
            None => name,
        };
        if rest.contains('*') {
            return bad(
                &"'*' may only be the whole first label (\"*.example.com\") or the whole host",
            );
        }
        if let Err(p) = check_name(rest) {
            return bad(&p);
        }
        Ok(HostPattern(name.to_string()))
    }

    /// The normalized text (`*.apps.example.com`).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The kind, with the exact name or the wildcard's suffix.
    pub fn kind(&self) -> HostKind<'_> {
        if self.0 == "*" {
            HostKind::Any
        } else if let Some(suffix) = self.0.strip_prefix("*.") {
            HostKind::Wildcard(suffix)
        } else {
            HostKind::Exact(&self.0)
        }
    }

    /// Whether this is a wildcard (`*.suffix`, not `*`).
    pub fn is_wildcard(&self) -> bool {
        matches!(self.kind(), HostKind::Wildcard(_))
    }

    /// Whether this is `*`.
    pub fn is_any(&self) -> bool {
        self.0 == "*"
    }

    /// Whether the pattern matches a request host as [`normalize_request_host`] returned it
    /// (`None`: not a valid name, which only `*` matches).
    pub fn matches(&self, host: Option<&str>) -> bool {
        match (self.kind(), host) {
            (HostKind::Any, _) => true,
            (_, None) => false,
            (HostKind::Exact(name), Some(h)) => name == h,
            (HostKind::Wildcard(suffix), Some(h)) => {
                h.split_once('.').is_some_and(|(_, rest)| rest == suffix)
            }
        }
    }
}

impl FromStr for HostPattern {
    type Err = DecodeError;
    /// [`HostPattern::parse`], the error naming the field `host`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HostPattern::parse(s).map_err(|e| DecodeError::invalid("host", e))
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for HostPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HostPattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Whether `s` is an IPv4 or IPv6 address, bracketed or not.
fn is_ip_literal(s: &str) -> bool {
    let inner = s
        .strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .map_or(s, |(ip, _)| ip);
    inner.parse::<IpAddr>().is_ok()
}

/// Normalizes a request's `Host` (or `:authority`) for matching, without allocating: the
/// lowercased name is written to `buf`. Strips a `:port` and one trailing dot. `None` when
/// what is left is not a valid DNS name (bad labels, longer than 253, a bracketed or bare
/// IP literal): such a request matches only `*` routes.
pub fn normalize_request_host<'b>(raw: &str, buf: &'b mut [u8; MAX_HOST_LEN]) -> Option<&'b str> {
    if raw.starts_with('[') {
        return None;
    }
    let name = match raw.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        Some(_) => return None,
        None => raw,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > MAX_HOST_LEN {
        return None;
    }
    let out = &mut buf[..name.len()];
    out.copy_from_slice(name.as_bytes());
    out.make_ascii_lowercase();
    let host = std::str::from_utf8(out).ok()?;
    if check_name(host).is_err() || host.parse::<Ipv4Addr>().is_ok() {
        return None;
    }
    Some(host)
}

/// The part of a request target that paths are matched against: the query string and
/// fragment removed.
pub fn request_path(raw: &str) -> &str {
    raw.split(['?', '#']).next().unwrap_or(raw)
}

/// Whether the route path `prefix` (normalized: no trailing '/' unless it is `/`) matches
/// the request path (from [`request_path`]) on a segment boundary: `/api` matches `/api`,
/// `/api/`, `/api/x`, not `/apix`; `/` matches every path.
pub fn path_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Normalizes a route path: it must start with '/', hold only printable ASCII other than
/// '?' and '#' (percent-encode the rest), have no empty (`//`), `.` or `..` segment and be at
/// most 1024 bytes; a trailing '/' is removed (except from `/` itself). The error names the
/// field `path`.
pub fn normalize_path(p: &str) -> Result<String, DecodeError> {
    let bad = |why: &str| Err(DecodeError::invalid("path", format!("{p:?}: {why}")));
    if !p.starts_with('/') {
        return bad("must start with '/'");
    }
    if p.len() > MAX_PATH_LEN {
        return bad("is longer than 1024 bytes");
    }
    if let Some(c) = p.chars().find(|c| !c.is_ascii_graphic()) {
        return bad(&format!(
            "holds {c:?}; only printable ASCII without spaces (percent-encode the rest)"
        ));
    }
    if p.contains("//") {
        return bad("has an empty segment (\"//\")");
    }
    if p.contains(['?', '#']) {
        return bad("holds '?' or '#'; a route matches paths, not queries or fragments");
    }
    let trimmed = match p.strip_suffix('/') {
        Some(t) if !t.is_empty() => t,
        _ => p,
    };
    if trimmed == "/" {
        return Ok(trimmed.to_string());
    }
    if trimmed.split('/').any(|seg| seg == "." || seg == "..") {
        return bad("has a \".\" or \"..\" segment");
    }
    Ok(trimmed.to_string())
}

/// Whether `s` is a port name as IANA and Kubernetes allow it: 1-15 lowercase letters,
/// digits and '-', at least one letter, no '-' at either end or twice in a row.
pub fn valid_port_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// The service port a route sends to: a number, or the name of one of the service's ports.
/// Serialized as a JSON number or string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PortRef {
    /// A port number, 1-65535.
    Number(u16),
    /// A port name (see [`valid_port_name`]).
    Name(String),
}

impl PortRef {
    /// Why the port is not valid, if it is not (the message names the field `port`).
    pub fn validate(&self) -> Result<(), DecodeError> {
        match self {
            PortRef::Number(0) => Err(DecodeError::out_of_range("port", 0, 1, 65535)),
            PortRef::Number(_) => Ok(()),
            PortRef::Name(n) if valid_port_name(n) => Ok(()),
            PortRef::Name(n) => Err(DecodeError::invalid("port", port_name_problem(n))),
        }
    }
}

fn port_name_problem(n: &str) -> String {
    format!(
        "{n:?} is not a port number 1-65535 or a port name (1-15 lowercase letters, digits and \
         '-', at least one letter, no '-' at either end or twice in a row)"
    )
}

impl FromStr for PortRef {
    type Err = DecodeError;
    /// A number 1-65535, or a port name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let p = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            match s.parse::<u16>() {
                Ok(n) => PortRef::Number(n),
                Err(_) => {
                    return Err(DecodeError::invalid(
                        "port",
                        format!("{s:?} is not a port 1-65535"),
                    ));
                }
            }
        } else {
            PortRef::Name(s.to_string())
        };
        p.validate()?;
        Ok(p)
    }
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortRef::Number(n) => write!(f, "{n}"),
            PortRef::Name(n) => f.write_str(n),
        }
    }
}

impl Serialize for PortRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PortRef::Number(n) => s.serialize_u16(*n),
            PortRef::Name(n) => s.serialize_str(n),
        }
    }
}

impl<'de> Deserialize<'de> for PortRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PortRef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number 1-65535 or a port name")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortRef, E> {
                match u16::try_from(v) {
                    Ok(n) if n > 0 => Ok(PortRef::Number(n)),
                    _ => Err(E::custom(format!("{v} is outside 1-65535"))),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortRef, E> {
                match u64::try_from(v) {
                    Ok(u) => self.visit_u64(u),
                    Err(_) => Err(E::custom(format!("{v} is outside 1-65535"))),
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortRef, E> {
                if valid_port_name(v) {
                    Ok(PortRef::Name(v.to_string()))
                } else {
                    Err(E::custom(port_name_problem(v)))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Decodes a JSON record of at most `limit` bytes; `context` starts the error message.
fn decode_bounded<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    limit: usize,
    context: &'static str,
) -> Result<T, DecodeError> {
    if bytes.len() > limit {
        return Err(DecodeError::json(
            context,
            format!("the record is larger than {limit} bytes"),
        ));
    }
    crate::util::json_decode::from_slice(bytes).map_err(|e| DecodeError::json(context, e))
}

fn default_path() -> String {
    "/".into()
}

fn default_namespace() -> String {
    "default".into()
}

/// One ingress route as stored in etcd: requests for `host` whose path starts with `path`
/// (on a segment boundary) go to `namespace/service:port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressRoute {
    /// Route name (a DNS label), the etcd key's last part.
    pub name: String,
    /// The host pattern; `*` is the default backend.
    pub host: HostPattern,
    /// Path prefix, normalized (see [`normalize_path`]); `/` when absent.
    #[serde(default = "default_path")]
    pub path: String,
    /// The service's namespace; `default` when absent.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The service; `None` only for a wildcard host, whose request host's first label names
    /// the service (`shop.apps.example.com` → `shop`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The service port.
    pub port: PortRef,
}

impl IngressRoute {
    /// Decodes a route record (at most [`MAX_ROUTE_BYTES`]), normalizes its path and
    /// validates it.
    pub fn parse(bytes: &[u8]) -> Result<IngressRoute, DecodeError> {
        let mut r: IngressRoute =
            decode_bounded(bytes, MAX_ROUTE_BYTES, "ingress route does not decode")?;
        r.path = normalize_path(&r.path)?;
        r.validate()?;
        Ok(r)
    }

    /// Checks the invariants a well-formed route holds: names are DNS labels, the path is
    /// normalized, a service is given unless the host is a wildcard, the port is valid.
    pub fn validate(&self) -> Result<(), DecodeError> {
        let not_a_name = |field: &str, v: &str| {
            DecodeError::value(field, format!("{v:?}"), "is not a valid name")
        };
        if !valid_name(&self.name) {
            return Err(not_a_name("name", &self.name));
        }
        if normalize_path(&self.path)? != self.path {
            return Err(DecodeError::invalid(
                "path",
                format!("{:?} ends in '/' (write it without)", self.path),
            ));
        }
        if !valid_name(&self.namespace) {
            return Err(not_a_name("namespace", &self.namespace));
        }
        match &self.service {
            Some(s) if !valid_name(s) => return Err(not_a_name("service", s)),
            Some(_) => {}
            None if self.host.is_wildcard() => {}
            None => {
                return Err(DecodeError::invalid(
                    "service",
                    format!(
                        "is required for host {:?} (only a wildcard host takes the service from \
                         the request host's first label)",
                        self.host.as_str()
                    ),
                ));
            }
        }
        self.port.validate()
    }

    /// Encodes to JSON.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The backend as people read it: `default/shop:http`, or `default/<first label>:http`
    /// for a wildcard route without a service.
    pub fn backend_text(&self) -> String {
        let svc = self.service.as_deref().unwrap_or("<first label>");
        format!("{}/{svc}:{}", self.namespace, self.port)
    }
}

/// A TLS certificate for the ingress, as stored in etcd: the PEM texts are only checked for
/// their markers here (the proxy parses them). Debug output leaves the key out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IngressCert {
    /// Certificate name (a DNS label), the etcd key's last part.
    pub name: String,
    /// Hosts the certificate serves (exact or wildcard, never `*`).
    pub hosts: Vec<HostPattern>,
    /// The certificate chain in PEM.
    pub cert_pem: String,
    /// The private key in PEM.
    pub key_pem: String,
}

impl fmt::Debug for IngressCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IngressCert")
            .field("name", &self.name)
            .field("hosts", &self.hosts)
            .field("cert_pem", &format_args!("<{} bytes>", self.cert_pem.len()))
            .field("key_pem", &format_args!("<redacted>"))
            .finish()
    }
}

impl IngressCert {
    /// Decodes (at most [`MAX_CERT_BYTES`]) and validates a certificate record.
    pub fn parse(bytes: &[u8]) -> Result<IngressCert, DecodeError> {
        let c: IngressCert =
            decode_bounded(bytes, MAX_CERT_BYTES, "ingress certificate does not decode")?;
        c.validate()?;
        Ok(c)
    }

    /// Checks the invariants: the name is a DNS label; 1-100 hosts, none `*`, none twice;
    /// the certificate holds a `CERTIFICATE` PEM block and the key a `PRIVATE KEY` one, each
    /// at most [`MAX_PEM_BYTES`].
    pub fn validate(&self) -> Result<(), DecodeError> {
        if !valid_name(&self.name) {
            return Err(DecodeError::value(
                "name",
                format!("{:?}", self.name),
                "is not a valid name",
            ));
        }
        if self.hosts.is_empty() || self.hosts.len() > MAX_CERT_HOSTS {
            return Err(DecodeError::invalid(
                "hosts",
                format!(
                    "a certificate names 1-{MAX_CERT_HOSTS} hosts, not {}",
                    self.hosts.len()
                ),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, h) in self.hosts.iter().enumerate() {
            if h.is_any() {
                return Err(DecodeError::invalid(
                    format!("hosts[{i}]"),
                    "\"*\" is not a certificate host (name the hosts, or a wildcard)",
                ));
            }
            if !seen.insert(h) {
                return Err(DecodeError::invalid(
                    "hosts",
                    format!("{:?} is listed twice", h.as_str()),
                ));
            }
        }
        check_pem(
            "certPem",
            &self.cert_pem,
            &["-----BEGIN CERTIFICATE-----"],
            "a certificate",
        )?;
        check_pem(
            "keyPem",
            &self.key_pem,
            &["-----BEGIN", "PRIVATE KEY-----"],
            "a private key",
        )
    }

    /// Encodes to JSON.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Checks that a PEM text is within [`MAX_PEM_BYTES`] and holds every marker.
fn check_pem(field: &str, pem: &str, markers: &[&str], what: &str) -> Result<(), DecodeError> {
    if pem.len() > MAX_PEM_BYTES {
        return Err(DecodeError::invalid(
            field,
            format!("{} bytes, more than the {MAX_PEM_BYTES} allowed", pem.len()),
        ));
    }
    if !markers.iter().all(|m| pem.contains(m)) {
        return Err(DecodeError::invalid(
            field,
            format!("holds no PEM block of {what} ({})", markers.join(" … ")),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
