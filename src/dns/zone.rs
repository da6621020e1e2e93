//! The names the cluster DNS answers with authority: a concurrent map from lowercased owner
//! name to its records. One writer (the catalog, `dns::catalog`) applies record additions and
//! removals as etcd changes; every server thread reads it without waiting for the writer
//! except on the one shard it touches.
//!
//! Empty non-terminals (`svc.cluster.local`, `shop.svc.cluster.local`,
//! `_tcp.web.shop.svc.cluster.local`) exist as entries with no records and a count of names
//! below them, so a query for them is NODATA, not NXDOMAIN (RFC 8020).

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dashmap::DashMap;
use hickory_proto::rr::{LowerName, Name};

/// The data of one record the zone holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Rdata {
    /// An IPv4 address.
    A(Ipv4Addr),
    /// An IPv6 address.
    Aaaa(Ipv6Addr),
    /// A service location (RFC 2782).
    Srv {
        /// Priority (lower first).
        priority: u16,
        /// Weight among equal priorities.
        weight: u16,
        /// Port.
        port: u16,
        /// Target host.
        target: Name,
    },
    /// A reverse pointer.
    Ptr(Name),
}

/// Which kind of record a name was made from (`tartanctl dns lookup` shows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// A service's cluster IP, port or name.
    Service,
    /// A ready endpoint of a headless service.
    Endpoint,
    /// A pod record.
    Pod,
    /// The DNS server itself (`ns.dns.<zone>`).
    Server,
}

/// The records of one owner name.
#[derive(Debug, Default, Clone)]
pub struct Entry {
    /// The records, with where each came from (a multiset: two sources may give the same);
    /// most names hold one record, kept inline (no allocation of its own).
    pub records: smallvec::SmallVec<[(Rdata, Origin); 1]>,
    /// Names directly below this one (one label longer).
    pub children: u32,
}

/// The authoritative names, shared by the catalog (writer) and the server threads (readers).
#[derive(Debug)]
pub struct Zone {
    /// Zones served with authority (the cluster domain and reverse zones), lowercased.
    apexes: Vec<LowerName>,
    names: DashMap<LowerName, Entry, ahash::RandomState>,
    /// Bumped on every change (answer caches key on it).
    generation: AtomicU64,
    /// Set once every record prefix was listed; before that, answers would be incomplete.
    ready: AtomicBool,
}

impl Zone {
    /// An empty zone with authority over `apexes`.
    pub fn new(apexes: Vec<Name>) -> Self {
        Zone {
            apexes: apexes.iter().map(LowerName::new).collect(),
            names: DashMap::with_hasher(ahash::RandomState::new()),
            generation: AtomicU64::new(0),
            ready: AtomicBool::new(false),
        }
    }

    /// The apex of the served zone that holds `name`, if any.
    pub fn apex_of(&self, name: &LowerName) -> Option<&LowerName> {
        self.apexes.iter().find(|a| a.zone_of(name))
    }

    /// Whether every record prefix was listed.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Marks the zone complete.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// A counter that changes whenever a record is added or removed.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Number of owner names (including empty non-terminals).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the zone holds no names.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Calls `f` with the entry of `name` (None when the name does not exist).
    pub fn with_entry<T>(&self, name: &LowerName, f: impl FnOnce(Option<&Entry>) -> T) -> T {
        match self.names.get(name) {
            Some(e) => f(Some(e.value())),
            None => f(None),
        }
    }

    /// The apexes served with authority.
    pub fn apexes(&self) -> &[LowerName] {
        &self.apexes
    }

    /// A copy of every record, by owner name (unordered; empty non-terminals are left out):
    /// what the DNS benchmark writes into the zone files of the servers it compares with.
    pub fn records(&self) -> Vec<(LowerName, Rdata)> {
        let mut out = Vec::with_capacity(self.names.len());
        for e in self.names.iter() {
            for (d, _) in &e.value().records {
                out.push((e.key().clone(), d.clone()));
            }
        }
        out
    }

    /// Adds one record. Names outside every apex are ignored (returns false).
    pub fn add(&self, name: &LowerName, data: Rdata, origin: Origin) -> bool {
        let Some(apex) = self.apex_of(name).cloned() else {
            return false;
        };
        let created = {
            let mut created = false;
            let mut e = self.names.entry(name.clone()).or_insert_with(|| {
                created = true;
                Entry::default()
            });
            e.records.push((data, origin));
            created
        };
        if created {
            self.adjust_ancestors(name, &apex, true);
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Removes one record equal to `data` from `origin` (a no-op when absent); a name left
    /// with no records and no children disappears, and so do ancestors it leaves empty.
    pub fn remove(&self, name: &LowerName, data: &Rdata, origin: Origin) {
        let Some(apex) = self.apex_of(name).cloned() else {
            return;
        };
        let gone = {
            let Some(mut e) = self.names.get_mut(name) else {
                return;
            };
            if let Some(i) = e
                .records
                .iter()
                .position(|(d, o)| d == data && *o == origin)
            {
                e.records.swap_remove(i);
            }
            e.records.is_empty() && e.children == 0
        };
        if gone {
            self.names
                .remove_if(name, |_, e| e.records.is_empty() && e.children == 0);
            self.adjust_ancestors(name, &apex, false);
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Keeps the direct-child counts: a created name counts in its parent, creating the
    /// parent (an empty non-terminal) when missing, and so on up to the apex; a removed name
    /// is uncounted, removing each ancestor it leaves with neither records nor children.
    fn adjust_ancestors(&self, name: &LowerName, apex: &LowerName, up: bool) {
        let mut cur = name.base_name();
        while cur.num_labels() > apex.num_labels() {
            if up {
                let mut existed = true;
                self.names
                    .entry(cur.clone())
                    .or_insert_with(|| {
                        existed = false;
                        Entry::default()
                    })
                    .children += 1;
                if existed {
                    return;
                }
            } else {
                let empty = match self.names.get_mut(&cur) {
                    Some(mut e) => {
                        e.children = e.children.saturating_sub(1);
                        e.records.is_empty() && e.children == 0
                    }
                    None => false,
                };
                if !empty {
                    return;
                }
                self.names
                    .remove_if(&cur, |_, e| e.records.is_empty() && e.children == 0);
            }
            cur = cur.base_name();
        }
    }
}

/// The reverse name (`d.c.b.a.in-addr.arpa.`) of an address.
pub fn reverse_name(ip: Ipv4Addr) -> Name {
    let o = ip.octets();
    // Four numeric labels under in-addr.arpa always make a valid name.
    Name::from_ascii(format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0]))
        .unwrap_or_else(|_| Name::root())
}

/// The reverse zone apex covering `net` at an octet boundary (10.96.0.0/12 →
/// `10.in-addr.arpa.`).
pub fn reverse_apex(net: ipnetwork::Ipv4Network) -> Name {
    let o = net.network().octets();
    let whole = usize::from(net.prefix() / 8);
    let labels: Vec<String> = o[..whole].iter().rev().map(u8::to_string).collect();
    let mut s = labels.join(".");
    if !s.is_empty() {
        s.push('.');
    }
    s.push_str("in-addr.arpa.");
    Name::from_ascii(s).unwrap_or_else(|_| Name::root())
}

/// The reverse name (32 nibbles under `ip6.arpa.`, RFC 3596) of an IPv6 address.
pub fn reverse_name6(ip: Ipv6Addr) -> Name {
    let mut s = String::with_capacity(73);
    for b in ip.octets().iter().rev() {
        // Low nibble first: the name reads the address backwards, one hex digit per label.
        let _ = write!(s, "{:x}.{:x}.", b & 0xf, b >> 4);
    }
    s.push_str("ip6.arpa.");
    Name::from_ascii(s).unwrap_or_else(|_| Name::root())
}

/// The reverse zone apex covering `net` at a nibble boundary (fd00:10:244::/56 →
/// `0.0.4.4.2.0.0.1.0.0.0.0.d.f.ip6.arpa.`).
pub fn reverse_apex6(net: ipnetwork::Ipv6Network) -> Name {
    let o = net.network().octets();
    let nibbles: Vec<u8> = o.iter().flat_map(|b| [b >> 4, b & 0xf]).collect();
    let whole = usize::from(net.prefix() / 4);
    let mut s = String::new();
    for n in nibbles[..whole].iter().rev() {
        let _ = write!(s, "{n:x}.");
    }
    s.push_str("ip6.arpa.");
    Name::from_ascii(s).unwrap_or_else(|_| Name::root())
}

/// The address of a full 32-nibble `ip6.arpa.` name.
pub fn reverse_ip6(name: &str) -> Option<Ipv6Addr> {
    let rest = name.strip_suffix(".ip6.arpa.")?;
    let nibbles: Vec<u8> = rest
        .split('.')
        .map(|p| match p.as_bytes() {
            [c] => char::from(*c).to_digit(16).map(|d| d as u8),
            _ => None,
        })
        .collect::<Option<Vec<u8>>>()?;
    if nibbles.len() != 32 {
        return None;
    }
    let mut o = [0u8; 16];
    for (i, pair) in nibbles.rchunks(2).enumerate() {
        // `rchunks` walks from the end: the address's first byte is the name's last two labels.
        if let [lo, hi] = pair {
            o[i] = (hi << 4) | lo;
        }
    }
    Some(Ipv6Addr::from(o))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> LowerName {
        LowerName::new(&Name::from_ascii(s).unwrap())
    }

    fn zone() -> Zone {
        Zone::new(vec![Name::from_ascii("cluster.local.").unwrap()])
    }

    #[test]
    fn empty_non_terminals_exist_while_a_name_below_them_does() {
        let z = zone();
        let name = n("_http._tcp.web.shop.svc.cluster.local.");
        let a = Rdata::A(Ipv4Addr::new(10, 96, 0, 5));
        assert!(z.add(&name, a.clone(), Origin::Service));
        for ent in [
            "_tcp.web.shop.svc.cluster.local.",
            "web.shop.svc.cluster.local.",
            "shop.svc.cluster.local.",
            "svc.cluster.local.",
        ] {
            z.with_entry(&n(ent), |e| {
                let e = e.unwrap_or_else(|| panic!("{ent} missing"));
                assert!(e.records.is_empty());
                assert_eq!(e.children, 1, "{ent}");
            });
        }
        assert_eq!(z.len(), 5);
        z.remove(&name, &a, Origin::Service);
        assert!(z.is_empty(), "every empty ancestor goes with the last name");
    }

    #[test]
    fn records_lists_every_record_but_no_empty_non_terminal() {
        let z = zone();
        let a = Rdata::A(Ipv4Addr::new(10, 96, 0, 5));
        z.add(
            &n("web.shop.svc.cluster.local."),
            a.clone(),
            Origin::Service,
        );
        z.add(
            &n("web.shop.svc.cluster.local."),
            a.clone(),
            Origin::Endpoint,
        );
        z.add(&n("outside.example."), a.clone(), Origin::Service);
        let got = z.records();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(
            got.iter()
                .all(|(name, d)| *name == n("web.shop.svc.cluster.local.") && *d == a)
        );
    }

    #[test]
    fn records_are_a_multiset_and_names_are_case_insensitive() {
        let z = zone();
        let a = Rdata::A(Ipv4Addr::new(10, 244, 1, 2));
        z.add(
            &n("web.default.svc.cluster.local."),
            a.clone(),
            Origin::Endpoint,
        );
        z.add(
            &n("WEB.default.svc.cluster.local."),
            a.clone(),
            Origin::Endpoint,
        );
        z.remove(&n("web.default.svc.cluster.local."), &a, Origin::Endpoint);
        z.with_entry(&n("Web.Default.Svc.Cluster.Local."), |e| {
            assert_eq!(e.map(|e| e.records.len()), Some(1));
        });
        assert!(!z.add(&n("web.example.com."), a, Origin::Pod));
    }

    #[test]
    fn reverse_names_and_apexes() {
        assert_eq!(
            reverse_name(Ipv4Addr::new(10, 96, 0, 10)).to_ascii(),
            "10.0.96.10.in-addr.arpa."
        );
        assert_eq!(
            reverse_apex("10.96.0.0/12".parse().unwrap()).to_ascii(),
            "10.in-addr.arpa."
        );
        assert_eq!(
            reverse_apex("10.244.0.0/16".parse().unwrap()).to_ascii(),
            "244.10.in-addr.arpa."
        );
        let ip: Ipv6Addr = "fd00:10:244:1::5".parse().unwrap();
        let r = reverse_name6(ip).to_ascii();
        assert_eq!(
            r,
            "5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.0.0.4.4.2.0.0.1.0.0.0.0.d.f.ip6.arpa."
        );
        assert_eq!(reverse_ip6(&r), Some(ip));
        assert_eq!(
            reverse_apex6("fd00:10:244::/56".parse().unwrap()).to_ascii(),
            "0.0.4.4.2.0.0.1.0.0.0.0.d.f.ip6.arpa."
        );
        // Not at a nibble boundary: the apex is the enclosing nibble.
        assert_eq!(
            reverse_apex6("fd00:10:244::/50".parse().unwrap()).to_ascii(),
            "4.4.2.0.0.1.0.0.0.0.d.f.ip6.arpa."
        );
        for bad in [
            "5.ip6.arpa.",
            "g.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.0.0.4.4.2.0.0.1.0.0.0.0.d.f.ip6.arpa.",
            "50.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.0.0.4.4.2.0.0.1.0.0.0.0.d.f.ip6.arpa.",
        ] {
            assert_eq!(reverse_ip6(bad), None, "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn ip6_reverse_names_round_trip_and_garbage_is_refused(
            o in proptest::prelude::any::<[u8; 16]>(),
            junk in "[0-9a-fA-F.]{0,80}(\\.ip6\\.arpa\\.)?",
        ) {
            let ip = Ipv6Addr::from(o);
            proptest::prop_assert_eq!(reverse_ip6(&reverse_name6(ip).to_ascii()), Some(ip));
            if let Some(a) = reverse_ip6(&junk) {
                proptest::prop_assert_eq!(reverse_name6(a).to_ascii().to_lowercase(), junk.to_lowercase());
            }
        }
    }
}
