//! What the ingress changes in the headers of a request it forwards and of the response it
//! returns: hop-by-hop headers removed (RFC 9110 §7.6.1, plus every header the `Connection`
//! header names), `X-Forwarded-For/-Proto/-Host` and `Forwarded` (RFC 7239) set, taking the
//! incoming ones only from trusted proxies. `Host` is left as the client sent it. Pure.

use std::net::IpAddr;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnetwork::IpNetwork;

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1 and the
/// non-standard ones proxies are known to receive).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// `X-Forwarded-For`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `Forwarded`.
pub const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// The upgrade a request asks for (`Connection: upgrade` with an `Upgrade` header), e.g.
/// `websocket`.
pub fn requested_upgrade(h: &HeaderMap) -> Option<HeaderValue> {
    connection_names(h)
        .iter()
        .any(|n| n.eq_ignore_ascii_case("upgrade"))
        .then(|| h.get(header::UPGRADE).cloned())
        .flatten()
}

/// The tokens of every `Connection` header, lowercased.
fn connection_names(h: &HeaderMap) -> Vec<String> {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Removes the hop-by-hop headers and those `Connection` names. With `upgrade` (a request
/// or a 101 response being passed through), `Connection: upgrade` and `Upgrade` are put
/// back, as the next hop needs them to switch protocols.
pub fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: Option<&HeaderValue>) {
    for name in connection_names(h) {
        // Never let `Connection` remove what the ingress sets or must keep.
        if matches!(name.as_str(), "host" | "content-length") {
            continue;
        }
        if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
            h.remove(n);
        }
    }
    for n in HOP_BY_HOP {
        // `TE: trailers` is the one TE value allowed end to end (gRPC needs it).
        if n == "te" {
            let trailers = h
                .get(header::TE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("trailers"));
            if trailers {
                continue;
            }
        }
        h.remove(n);
    }
    if let Some(u) = upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, u.clone());
    }
}

/// Who sent a request and how, for the forwarding headers.
#[derive(Debug, Clone, Copy)]
pub struct Hop<'a> {
    /// The peer's address.
    pub peer: IpAddr,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The host the client asked for (as sent).
    pub host: Option<&'a str>,
    /// Whether the peer is a trusted proxy (its forwarding headers are kept and extended).
    pub trusted: bool,
}

/// Whether `peer` is in one of `trusted`.
pub fn is_trusted(peer: IpAddr, trusted: &[IpNetwork]) -> bool {
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
        v4 => v4,
    };
    trusted.iter().any(|n| n.contains(peer))
}

/// Sets `X-Forwarded-For/-Proto/-Host` and `Forwarded`: from an untrusted peer whatever
/// it sent is replaced; from a trusted one the peer is appended to the chain and the proto
/// and host it reported are kept.
pub fn set_forwarded(h: &mut HeaderMap, hop: Hop<'_>) {
    let chain = |h: &HeaderMap, name: &HeaderName| -> Option<String> {
        let parts: Vec<&str> = h
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    };
    let peer = hop.peer;
    let xff = match hop.trusted.then(|| chain(h, &X_FORWARDED_FOR)).flatten() {
        Some(prev) => value(format_args!("{prev}, {peer}")),
        None => value(format_args!("{peer}")),
    };
    let keep = |h: &HeaderMap, name: &HeaderName| {
        hop.trusted
            .then(|| h.get(name).cloned())
            .flatten()
            .filter(|v| !v.is_empty())
    };
    let proto = keep(h, &X_FORWARDED_PROTO).unwrap_or(HeaderValue::from_static(hop.proto));
    // The client's own `Host` value when that is the host (shared, not copied).
    let fwd_host = keep(h, &X_FORWARDED_HOST).or_else(|| {
        let host = hop.host?;
        match h.get(header::HOST) {
            Some(v) if v.as_bytes() == host.as_bytes() => Some(v.clone()),
            _ => HeaderValue::from_str(host).ok(),
        }
    });
    // RFC 7239: IPv6 addresses and anything but a token are quoted.
    let node = NodeName(peer);
    let host = hop.host.filter(|h| h.bytes().all(is_token_or_host_byte));
    let forwarded = match (hop.trusted.then(|| chain(h, &FORWARDED)).flatten(), host) {
        (Some(prev), Some(host)) => value(format_args!(
            "{prev}, for={node};proto={};host=\"{host}\"",
            hop.proto
        )),
        (Some(prev), None) => value(format_args!("{prev}, for={node};proto={}", hop.proto)),
        (None, Some(host)) => value(format_args!(
            "for={node};proto={};host=\"{host}\"",
            hop.proto
        )),
        (None, None) => value(format_args!("for={node};proto={}", hop.proto)),
    };
    for (name, value) in [(X_FORWARDED_FOR, xff), (FORWARDED, forwarded)] {
        if let Some(v) = value {
            h.insert(name, v);
        }
    }
    h.insert(X_FORWARDED_PROTO, proto);
    match fwd_host {
        Some(v) => {
            h.insert(X_FORWARDED_HOST, v);
        }
        None => {
            h.remove(X_FORWARDED_HOST);
        }
    }
}

/// A peer as a `Forwarded` node: an IPv4 address as it is, an IPv6 one quoted in brackets.
struct NodeName(IpAddr);

impl std::fmt::Display for NodeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "\"[{v6}]\""),
        }
    }
}

/// A header value formatted on the stack (one copy into the value; a longer one through a
/// `String`); `None` when it is not a valid value.
fn value(args: std::fmt::Arguments<'_>) -> Option<HeaderValue> {
    struct Buf {
        bytes: [u8; 512],
        len: usize,
    }
    impl std::fmt::Write for Buf {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let end = self.len + s.len();
            let dst = self.bytes.get_mut(self.len..end).ok_or(std::fmt::Error)?;
            dst.copy_from_slice(s.as_bytes());
            self.len = end;
            Ok(())
        }
    }
    let mut buf = Buf {
        bytes: [0; 512],
        len: 0,
    };
    if std::fmt::Write::write_fmt(&mut buf, args).is_ok() {
        return HeaderValue::from_bytes(&buf.bytes[..buf.len]).ok();
    }
    HeaderValue::from_str(&args.to_string()).ok()
}

/// Bytes a `host` value may hold inside a quoted `Forwarded` parameter without escaping.
fn is_token_or_host_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_')
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn arb_headers() -> impl Strategy<Value = HeaderMap> {
        let name = prop_oneof![
            proptest::sample::select(vec![
                "connection",
                "keep-alive",
                "te",
                "upgrade",
                "x-forwarded-for",
                "forwarded",
                "x-forwarded-proto",
                "x-forwarded-host",
                "host",
                "transfer-encoding",
                "x-a",
            ])
            .prop_map(str::to_string),
            "[a-z-]{1,12}",
        ];
        let value = prop_oneof![
            "[ -~]{0,40}",
            proptest::sample::select(vec!["upgrade", "close, x-a", "trailers", "websocket"])
                .prop_map(str::to_string),
        ];
        proptest::collection::vec((name, value), 0..12).prop_map(|pairs| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                if let (Ok(k), Ok(v)) = (
                    HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_str(&v),
                ) {
                    h.append(k, v);
                }
            }
            h
        })
    }

    proptest! {
        #![proptest_config(crate::util::proptest_support::config())]

        /// Whatever a client sends: no panic, no hop-by-hop header left (unless passing an
        /// upgrade on), the forwarding headers always set, the peer last in the chain.
        #[test]
        fn any_headers_come_out_clean(mut h in arb_headers(), trusted in any::<bool>(), up in any::<bool>()) {
            let upgrade = up.then(|| requested_upgrade(&h)).flatten();
            strip_hop_by_hop(&mut h, upgrade.as_ref());
            for n in HOP_BY_HOP {
                let allowed = (upgrade.is_some() && (n == "connection" || n == "upgrade"))
                    || (n == "te" && h.get("te").is_some_and(|v| v == "trailers"));
                prop_assert!(allowed || !h.contains_key(n), "{n} left in {h:?}");
            }
            set_forwarded(&mut h, Hop {
                peer: "192.0.2.1".parse().unwrap(),
                proto: "http",
                host: Some("a.test"),
                trusted,
            });
            let xff = h.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()).unwrap_or("");
            prop_assert!(xff.ends_with("192.0.2.1"), "{xff}");
            prop_assert!(trusted || xff == "192.0.2.1");
            prop_assert!(h.contains_key(FORWARDED) && h.contains_key(X_FORWARDED_PROTO));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("host", "shop.example.com"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut h, None);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["host", "accept"]);
    }

    #[test]
    fn te_trailers_and_upgrades_pass() {
        let mut h = map(&[
            ("te", "trailers"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
        ]);
        let up = requested_upgrade(&h);
        assert_eq!(up.as_ref().and_then(|v| v.to_str().ok()), Some("websocket"));
        strip_hop_by_hop(&mut h, up.as_ref());
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        // An Upgrade header without Connection: upgrade is no upgrade.
        assert!(requested_upgrade(&map(&[("upgrade", "h2c")])).is_none());
    }

    #[test]
    fn connection_cannot_remove_host() {
        let mut h = map(&[("connection", "host, content-length"), ("host", "a")]);
        strip_hop_by_hop(&mut h, None);
        assert_eq!(h.get("host").unwrap(), "a");
    }

    #[test]
    fn an_untrusted_peer_gets_its_headers_replaced() {
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil"),
            ("forwarded", "for=6.6.6.6"),
        ]);
        set_forwarded(
            &mut h,
            Hop {
                peer: "192.0.2.9".parse().unwrap(),
                proto: "http",
                host: Some("shop.example.com"),
                trusted: false,
            },
        );
        assert_eq!(h.get("x-forwarded-for").unwrap(), "192.0.2.9");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "shop.example.com");
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=192.0.2.9;proto=http;host=\"shop.example.com\""
        );
    }

    #[test]
    fn a_trusted_peer_extends_the_chain() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.1"),
            ("x-forwarded-for", "203.0.113.2"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=203.0.113.1;proto=https"),
        ]);
        let trusted: Vec<IpNetwork> = vec!["10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert!(is_trusted(peer, &trusted));
        assert!(!is_trusted("11.0.0.1".parse().unwrap(), &trusted));
        set_forwarded(
            &mut h,
            Hop {
                peer: "10.1.2.3".parse().unwrap(),
                proto: "http",
                host: Some("a.apps.test"),
                trusted: true,
            },
        );
        assert_eq!(
            h.get("x-forwarded-for").unwrap(),
            "203.0.113.1, 203.0.113.2, 10.1.2.3"
        );
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=203.0.113.1;proto=https, for=10.1.2.3;proto=http;host=\"a.apps.test\""
        );
    }

    #[test]
    fn ipv6_peers_are_quoted_and_odd_hosts_left_out_of_forwarded() {
        let mut h = HeaderMap::new();
        set_forwarded(
            &mut h,
            Hop {
                peer: "2001:db8::1".parse().unwrap(),
                proto: "https",
                host: Some("we\"ird"),
                trusted: false,
            },
        );
        assert_eq!(
            h.get("forwarded").unwrap(),
            "for=\"[2001:db8::1]\";proto=https"
        );
    }
}
