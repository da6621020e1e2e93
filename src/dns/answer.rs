//! One query in, one response out: the authoritative answers of the cluster zone, decided
//! from the [`Zone`] alone (no I/O), or the verdict that the query goes to the upstream
//! resolvers. Wire format by hickory-proto.
//!
//! Semantics: names are matched case-insensitively and the question is echoed as asked; an
//! existing name without records of the asked type is NODATA (NOERROR, SOA in authority),
//! a missing one NXDOMAIN (with the SOA, whose minimum is the negative-caching TTL); the
//! apex has SOA and NS (`ns.dns.<zone>`, with its address); SRV answers carry their
//! targets' addresses as additional records; there are no wildcard records (a `*` label is
//! an ordinary label and names nothing); `ANY` over UDP gets the RFC 8482 HINFO; EDNS0 is
//! answered with our payload size (1232) and a response larger than the client's limit is
//! truncated (TC) so the client asks again over TCP, where the full answer is given.

use std::net::{IpAddr, Ipv4Addr};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, HINFO, NS, PTR, SOA, SRV};
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use ipnetwork::IpNetwork;

use crate::dns::zone::{Origin, Rdata, Zone, reverse_ip6};

/// The EDNS payload size we announce and accept (the DNS flag day 2020 value).
pub const EDNS_PAYLOAD: u16 = 1232;
/// The largest UDP response without EDNS.
const PLAIN_UDP_MAX: usize = 512;

/// What the server is authoritative for, and how it answers.
#[derive(Debug, Clone)]
pub struct Authority {
    /// The cluster domain, e.g. `cluster.local.`.
    pub domain: Name,
    /// The cluster DNS address (the NS's A record).
    pub dns_ip: Ipv4Addr,
    /// TTL of every record (CoreDNS's default: 5 s); also the SOA minimum.
    pub ttl: u32,
    /// Ranges whose reverse names are ours (service CIDR, cluster network, its IPv6 half): a
    /// PTR query in them that names nothing is NXDOMAIN; other reverse names are forwarded.
    pub reverse: Vec<IpNetwork>,
    /// Made once, used by every answer.
    fixed: Fixed,
}

/// Names and records every answer would otherwise build again.
#[derive(Debug, Clone)]
struct Fixed {
    domain: LowerName,
    arpa: LowerName,
    arpa6: LowerName,
    ns_name: Name,
    soa: SOA,
}

impl Authority {
    /// How `domain` is answered, with `ttl` on every record and the SOA minimum.
    pub fn new(domain: Name, dns_ip: Ipv4Addr, ttl: u32, reverse: Vec<IpNetwork>) -> Self {
        let under = |label: &str| {
            Name::from_ascii(label)
                .and_then(|n| n.append_domain(&domain))
                .unwrap_or_else(|_| domain.clone())
        };
        let ns_name = under("ns.dns");
        // CoreDNS's values; the serial changes nothing for clients (no zone transfers).
        let soa = SOA::new(
            ns_name.clone(),
            under("hostmaster"),
            1,
            7200,
            1800,
            86400,
            ttl,
        );
        let fixed = Fixed {
            domain: LowerName::new(&domain),
            arpa: Name::from_ascii("in-addr.arpa.")
                .map(|n| LowerName::new(&n))
                .unwrap_or_else(|_| LowerName::new(&Name::root())),
            arpa6: Name::from_ascii("ip6.arpa.")
                .map(|n| LowerName::new(&n))
                .unwrap_or_else(|_| LowerName::new(&Name::root())),
            ns_name,
            soa,
        };
        Authority {
            domain,
            dns_ip,
            ttl,
            reverse,
            fixed,
        }
    }
}

/// How a query came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP: the response must fit the client's size or be truncated.
    Udp,
    /// TCP: no size limit but 65,535.
    Tcp,
}

/// What to do with a query.
#[derive(Debug)]
pub enum Outcome {
    /// Send this response.
    Reply(Reply),
    /// Not ours: forward the query (parsed) to the upstream resolvers.
    Forward(Box<Message>),
    /// Send nothing (not a query, or too short to answer).
    Drop,
}

/// A response with what it says, for metrics and `tartanctl dns lookup`.
#[derive(Debug)]
pub struct Reply {
    /// The encoded response.
    pub bytes: Vec<u8>,
    /// Its response code.
    pub rcode: ResponseCode,
    /// The asked type (None when the question could not be read).
    pub qtype: Option<RecordType>,
    /// Where the answer records came from (empty for negative answers).
    pub origins: Vec<Origin>,
    /// Whether it was truncated to fit UDP.
    pub truncated: bool,
}

/// Answers `query` from `zone`.
pub fn answer(zone: &Zone, auth: &Authority, query: &[u8], transport: Transport) -> Outcome {
    if query.len() < 12 {
        return Outcome::Drop;
    }
    let msg = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => {
            // A response bit set means a stray response (never answer those, no loops).
            if query[2] & 0x80 != 0 {
                return Outcome::Drop;
            }
            let id = u16::from_be_bytes([query[0], query[1]]);
            return Outcome::Reply(bare(id, ResponseCode::FormErr, None));
        }
    };
    if msg.metadata.message_type != MessageType::Query {
        return Outcome::Drop;
    }
    let id = msg.metadata.id;
    if msg.metadata.op_code != OpCode::Query {
        return Outcome::Reply(bare(id, ResponseCode::NotImp, None));
    }
    if msg.queries.len() != 1 {
        return Outcome::Reply(bare(id, ResponseCode::FormErr, None));
    }
    let q = msg.queries[0].clone();
    let qname = LowerName::new(q.name());
    let ours = auth.domain_lower().zone_of(&qname);
    if !ours && !reverse_is_ours(auth, &qname, zone) {
        return Outcome::Forward(Box::new(msg));
    }
    if let Some(e) = &msg.edns
        && e.version() > 0
    {
        // hickory splits the extended code into the header and the OPT record.
        let r = response(&msg, ResponseCode::BADVERS);
        return Outcome::Reply(encode(r, &msg, transport, Vec::new()));
    }
    if q.query_class() != DNSClass::IN {
        return Outcome::Reply(encode(
            response(&msg, ResponseCode::Refused),
            &msg,
            transport,
            Vec::new(),
        ));
    }
    if !zone.is_ready() {
        // Not every record was read yet: an answer now could deny a name that exists.
        return Outcome::Reply(encode(
            response(&msg, ResponseCode::ServFail),
            &msg,
            transport,
            Vec::new(),
        ));
    }
    let mut r = response(&msg, ResponseCode::NoError);
    r.metadata.authoritative = true;
    let origins = authoritative(zone, auth, &q, &qname, transport, &mut r);
    Outcome::Reply(encode(r, &msg, transport, origins))
}

impl Authority {
    fn domain_lower(&self) -> &LowerName {
        &self.fixed.domain
    }

    fn soa(&self, apex: &Name) -> Record {
        Record::from_rdata(apex.clone(), self.ttl, RData::SOA(self.fixed.soa.clone()))
    }
}

/// Whether `qname` is a reverse name of one of our ranges (or names a record we hold).
fn reverse_is_ours(auth: &Authority, qname: &LowerName, zone: &Zone) -> bool {
    let ip = if auth.fixed.arpa.zone_of(qname) {
        reverse_ip(qname).map(IpAddr::V4)
    } else if auth.fixed.arpa6.zone_of(qname) {
        reverse_ip6(&Name::from(qname.clone()).to_ascii()).map(IpAddr::V6)
    } else {
        return false;
    };
    match ip {
        Some(ip) => {
            auth.reverse.iter().any(|n| n.contains(ip)) || zone.with_entry(qname, |e| e.is_some())
        }
        None => false,
    }
}

/// The address of a full `d.c.b.a.in-addr.arpa.` name.
fn reverse_ip(qname: &LowerName) -> Option<Ipv4Addr> {
    let s = Name::from(qname.clone()).to_ascii();
    let rest = s.strip_suffix(".in-addr.arpa.")?;
    let parts: Vec<u8> = rest
        .split('.')
        .map(|p| p.parse::<u8>().ok())
        .collect::<Option<Vec<u8>>>()?;
    match parts[..] {
        [d, c, b, a] => Some(Ipv4Addr::new(a, b, c, d)),
        _ => None,
    }
}

/// Fills `r` with the authoritative answer; returns where the answers came from.
fn authoritative(
    zone: &Zone,
    auth: &Authority,
    q: &Query,
    qname: &LowerName,
    transport: Transport,
    r: &mut Message,
) -> Vec<Origin> {
    let qtype = q.query_type();
    let owner = q.name().clone();
    let apex_lower = zone.apex_of(qname).unwrap_or(&auth.fixed.domain);
    let at_apex = apex_lower == qname;
    let apex = || Name::from(apex_lower.clone());
    if at_apex {
        let ns_name = auth.fixed.ns_name.clone();
        let want_soa = matches!(qtype, RecordType::SOA | RecordType::ANY);
        let want_ns =
            matches!(qtype, RecordType::NS | RecordType::ANY) && *apex_lower == auth.fixed.domain;
        if want_soa {
            r.add_answer(auth.soa(&owner));
        }
        if want_ns {
            r.add_answer(Record::from_rdata(
                owner.clone(),
                auth.ttl,
                RData::NS(NS(ns_name.clone())),
            ));
            r.add_additional(Record::from_rdata(
                ns_name,
                auth.ttl,
                RData::A(A(auth.dns_ip)),
            ));
        }
        if want_soa || want_ns {
            return vec![Origin::Server];
        }
    }
    let mut origins = Vec::new();
    let mut targets = Vec::new();
    let any_udp = qtype == RecordType::ANY && transport == Transport::Udp;
    // The answer records are made under the shard's read lock (no copy of the entry); SRV
    // targets are looked up after it is released.
    let exists = zone.with_entry(qname, |e| {
        let e = e?;
        if any_udp && !e.records.is_empty() {
            // RFC 8482: a small answer instead of everything (no amplification over UDP).
            r.add_answer(Record::from_rdata(
                owner.clone(),
                auth.ttl,
                RData::HINFO(HINFO::new("RFC8482".into(), String::new())),
            ));
            origins.push(Origin::Server);
            return Some(());
        }
        for (data, origin) in &e.records {
            let rdata = match (data, qtype) {
                (Rdata::A(ip), RecordType::A | RecordType::ANY) => RData::A(A(*ip)),
                (Rdata::Aaaa(ip), RecordType::AAAA | RecordType::ANY) => RData::AAAA(AAAA(*ip)),
                (Rdata::Ptr(n), RecordType::PTR | RecordType::ANY) => RData::PTR(PTR(n.clone())),
                (
                    Rdata::Srv {
                        priority,
                        weight,
                        port,
                        target,
                    },
                    RecordType::SRV | RecordType::ANY,
                ) => {
                    targets.push(target.clone());
                    RData::SRV(SRV::new(*priority, *weight, *port, target.clone()))
                }
                _ => continue,
            };
            r.add_answer(Record::from_rdata(owner.clone(), auth.ttl, rdata));
            if !origins.contains(origin) {
                origins.push(*origin);
            }
        }
        Some(())
    });
    if exists.is_none() {
        if !at_apex {
            r.metadata.response_code = ResponseCode::NXDomain;
        }
        r.add_authority(auth.soa(&apex()));
        return Vec::new();
    }
    if origins.is_empty() {
        // The name exists (records of other types, or names below it): NODATA.
        r.add_authority(auth.soa(&apex()));
        return origins;
    }
    targets.sort();
    targets.dedup();
    for t in targets {
        let ips: Vec<RData> = zone.with_entry(&LowerName::new(&t), |e| {
            e.map(|e| {
                e.records
                    .iter()
                    .filter_map(|(d, _)| match d {
                        Rdata::A(ip) => Some(RData::A(A(*ip))),
                        Rdata::Aaaa(ip) => Some(RData::AAAA(AAAA(*ip))),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
        });
        for ip in ips {
            r.add_additional(Record::from_rdata(t.clone(), auth.ttl, ip));
        }
    }
    origins
}

/// A response to `msg` with its question, flags and EDNS.
fn response(msg: &Message, rcode: ResponseCode) -> Message {
    let mut r = Message::response(msg.metadata.id, msg.metadata.op_code);
    r.metadata.recursion_desired = msg.metadata.recursion_desired;
    r.metadata.checking_disabled = msg.metadata.checking_disabled;
    r.metadata.recursion_available = true;
    r.metadata.response_code = rcode;
    r.add_queries(msg.queries.iter().cloned());
    if msg.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(EDNS_PAYLOAD);
        r.set_edns(e);
    }
    r
}

/// The largest response `msg`'s sender takes over `transport`.
pub fn size_limit(msg: &Message, transport: Transport) -> usize {
    match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => match &msg.edns {
            Some(e) => usize::from(e.max_payload().clamp(512, EDNS_PAYLOAD)),
            None => PLAIN_UDP_MAX,
        },
    }
}

/// Encodes `r`, truncating it (TC, question and OPT only) when it exceeds the limit.
fn encode(r: Message, query: &Message, transport: Transport, origins: Vec<Origin>) -> Reply {
    let rcode = r.metadata.response_code;
    let qtype = query.queries.first().map(Query::query_type);
    let limit = size_limit(query, transport);
    match r.to_vec() {
        Ok(bytes) if bytes.len() <= limit => Reply {
            bytes,
            rcode,
            qtype,
            origins,
            truncated: false,
        },
        Ok(_) => {
            let t = r.truncate();
            let bytes = t.to_vec().unwrap_or_default();
            Reply {
                bytes,
                rcode,
                qtype,
                origins,
                truncated: true,
            }
        }
        Err(_) => bare(query.metadata.id, ResponseCode::ServFail, qtype),
    }
}

/// A response with only a header (for queries whose question cannot be read).
fn bare(id: u16, rcode: ResponseCode, qtype: Option<RecordType>) -> Reply {
    let mut m = Message::response(id, OpCode::Query);
    m.metadata.response_code = rcode;
    Reply {
        bytes: m.to_vec().unwrap_or_default(),
        rcode,
        qtype,
        origins: Vec::new(),
        truncated: false,
    }
}

/// The mnemonic of a response code (`NXDOMAIN`), as dig prints it.
pub fn rcode_name(r: ResponseCode) -> String {
    match u16::from(r) {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        16 => "BADVERS".into(),
        n => format!("RCODE{n}"),
    }
}

/// A SERVFAIL for `msg` (upstream failed or overloaded).
pub fn servfail(msg: &Message, transport: Transport) -> Reply {
    encode(
        response(msg, ResponseCode::ServFail),
        msg,
        transport,
        Vec::new(),
    )
}

#[cfg(test)]
mod tests;
