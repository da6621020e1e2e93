//! What `/status` and `tartanctl dns lookup` learn from a node's cluster DNS: a handle on the
//! running server (zone, forwarder, counters), and one lookup that tells where its answer
//! came from.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, Record, RecordType};

use crate::api::status::{DnsLookupReport, DnsReport};
use crate::dns::answer::{Authority, Outcome, Transport, answer};
use crate::dns::forward::{Forwarder, tcp_exchange};
use crate::dns::zone::{Origin, Zone};
use crate::metrics::{DNS_RCODES, DNS_TYPES, DnsMetrics};

/// A running cluster DNS, as the daemon's status sees it.
#[derive(Clone)]
pub struct DnsHandle {
    /// The zone served.
    pub zone: Arc<Zone>,
    /// How it answers.
    pub auth: Authority,
    /// Its forwarder.
    pub forwarder: Forwarder,
    /// Where it listens.
    pub server: SocketAddr,
    /// Its counters.
    pub metrics: DnsMetrics,
}

fn origin_word(o: Origin) -> &'static str {
    match o {
        Origin::Service => "service",
        Origin::Endpoint => "endpoint",
        Origin::Pod => "pod",
        Origin::Server => "server",
    }
}

fn lines(rs: &[Record]) -> Vec<String> {
    rs.iter()
        .map(|r| format!("{} {} IN {} {}", r.name, r.ttl, r.record_type(), r.data))
        .collect()
}

impl DnsHandle {
    /// The `/status` part.
    pub fn report(&self) -> DnsReport {
        let mut requests = std::collections::BTreeMap::new();
        for (i, t) in DNS_TYPES.iter().enumerate() {
            let n: u64 = self.metrics.requests.iter().map(|p| p[i].get()).sum();
            if n > 0 {
                requests.insert((*t).to_string(), n);
            }
        }
        let mut responses = std::collections::BTreeMap::new();
        for (i, r) in DNS_RCODES.iter().enumerate() {
            let n = self.metrics.responses[i].get();
            if n > 0 {
                responses.insert((*r).to_string(), n);
            }
        }
        DnsReport {
            address: self.server.to_string(),
            domain: self.auth.domain.to_ascii(),
            ready: self.zone.is_ready(),
            names: self.zone.len(),
            upstreams: self
                .forwarder
                .upstreams()
                .iter()
                .map(ToString::to_string)
                .collect(),
            requests,
            responses,
            cache_hits: self.metrics.cache_hits.get(),
            cache_misses: self.metrics.cache_misses.get(),
            forward_failures: self.metrics.forward_failures.get(),
            overload: self.metrics.overload.get(),
        }
    }

    /// Looks `name` up: zone names from the zone itself (with their origin), others through
    /// the server's own socket (forwarded or cached).
    pub async fn lookup(
        &self,
        node: &str,
        name: &str,
        qtype: RecordType,
    ) -> Result<DnsLookupReport> {
        let qname = Name::from_ascii(if name.ends_with('.') {
            name.to_string()
        } else {
            format!("{name}.")
        })
        .with_context(|| format!("{name:?} is not a domain name"))?;
        let mut m = Message::query();
        m.metadata.id = rand::random();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(qname.clone(), qtype));
        let wire = m.to_vec().context("encoding the query")?;
        let mut report = DnsLookupReport {
            node: node.to_string(),
            server: self.server.to_string(),
            name: qname.to_ascii(),
            qtype: qtype.to_string(),
            ..Default::default()
        };
        let resp = match answer(&self.zone, &self.auth, &wire, Transport::Tcp) {
            Outcome::Reply(r) => {
                report.source = r.origins.iter().map(|o| origin_word(*o).into()).collect();
                Message::from_vec(&r.bytes).context("decoding our own answer")?
            }
            Outcome::Forward(_) => {
                let cached = self.forwarder.is_cached(&Query::query(qname, qtype));
                report.source = vec![if cached { "cached" } else { "forwarded" }.into()];
                ask_tcp(self.server, &wire).await?
            }
            Outcome::Drop => bail!("the query was dropped"),
        };
        report.rcode = crate::dns::answer::rcode_name(resp.metadata.response_code);
        report.truncated = resp.metadata.truncation;
        report.answers = lines(&resp.answers);
        report.authority = lines(&resp.authorities);
        report.additional = lines(&resp.additionals);
        Ok(report)
    }
}

/// One query over TCP to `server`.
async fn ask_tcp(server: SocketAddr, wire: &[u8]) -> Result<Message> {
    let buf = tokio::time::timeout(Duration::from_secs(6), tcp_exchange(server, wire))
        .await
        .with_context(|| format!("the cluster DNS at {server} did not answer within 6 s"))?
        .context("asking the cluster DNS")?;
    Message::from_vec(&buf).context("decoding the answer")
}
