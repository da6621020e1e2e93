//! The service table `ip tartan_svc`, computed as data: a fixed structure (maps, sets, a few
//! chains; loaded with `nft -f`) plus elements per service port (written over netlink).
//!
//! One map lookup finds a service, whatever the number of services: first-packet cost does not
//! grow with the table. Load balancing uses one chain per *endpoint count* (`numgen inc|random mod
//! N` needs a constant N), never one per service or per endpoint, so the number of chains stays
//! small while the element count grows with services × endpoints. See `docs/ruleset.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::masq_rules::MASQ_MARK;
use crate::nft_netlink::{ElemData, KeyBuilder};
use crate::service_model::{Backend, Service, ServicePort, SessionAffinity, TrafficPolicy};

/// nftables family of the service table.
pub const FAMILY: &str = "ip";
/// Version of the structure; bumped when the base ruleset changes shape.
pub const STRUCTURE_VERSION: u32 = 4;

/// The sets and maps of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SetName {
    /// `cluster IP . proto . port` → goto load-balancing chain.
    ServiceIps,
    /// `proto . node port` → goto node-port chain.
    ServiceNodePorts,
    /// `cluster IP . proto . port . slot` → endpoint `ip . port`.
    Backends,
    /// `proto . node port . slot` → endpoint `ip . port`.
    NodePortBackends,
    /// Cluster IP ports without endpoints (rejected).
    NoEndpoints,
    /// Node ports without endpoints (rejected).
    NoEndpointNodePorts,
    /// `cluster IP . proto . port` → jump to the affinity recorder for its timeout.
    AffinityServices,
    /// `proto . node port` → jump to the affinity recorder.
    AffinityNodePorts,
    /// `client . local endpoint` pairs where client == endpoint (hairpin masquerade).
    Hairpin,
}

impl SetName {
    /// Every set, in a fixed order.
    pub const ALL: [SetName; 9] = [
        SetName::ServiceIps,
        SetName::ServiceNodePorts,
        SetName::Backends,
        SetName::NodePortBackends,
        SetName::NoEndpoints,
        SetName::NoEndpointNodePorts,
        SetName::AffinityServices,
        SetName::AffinityNodePorts,
        SetName::Hairpin,
    ];

    /// The nft name.
    pub fn as_str(self) -> &'static str {
        match self {
            SetName::ServiceIps => "service_ips",
            SetName::ServiceNodePorts => "service_nodeports",
            SetName::Backends => "backends",
            SetName::NodePortBackends => "nodeport_backends",
            SetName::NoEndpoints => "no_endpoints",
            SetName::NoEndpointNodePorts => "no_endpoint_nodeports",
            SetName::AffinityServices => "affinity_services",
            SetName::AffinityNodePorts => "affinity_nodeports",
            SetName::Hairpin => "hairpin",
        }
    }
}

/// A chain created on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DynChain {
    /// Cluster-IP load balancing over `n` endpoints; `affinity` adds the sticky lookup.
    Cluster { n: u32, affinity: bool },
    /// Node-port load balancing over `n` endpoints; `local` keeps the client address.
    NodePort { n: u32, affinity: bool, local: bool },
    /// Records the chosen endpoint for client-IP affinity with this timeout (seconds).
    AffinityRecord { timeout: u32 },
}

impl DynChain {
    /// The chain's name.
    pub fn name(&self) -> String {
        match *self {
            DynChain::Cluster { n, affinity } => {
                format!("svc{}_{n}", if affinity { "_aff" } else { "" })
            }
            DynChain::NodePort { n, affinity, local } => format!(
                "np{}{}_{n}",
                if local { "_local" } else { "" },
                if affinity { "_aff" } else { "" }
            ),
            DynChain::AffinityRecord { timeout } => format!("aff_record_{timeout}"),
        }
    }

    /// The chain's rules (one per line).
    pub fn rules(&self, ctx: &NodeContext) -> Vec<String> {
        let net = format!(
            "{}/{}",
            ctx.cluster_network.network(),
            ctx.cluster_network.prefix()
        );
        let mark = format!("meta mark set meta mark | {MASQ_MARK:#x}");
        let sticky = "dnat ip to ip saddr . ip daddr . meta l4proto . th dport map @affinity";
        match *self {
            DynChain::Cluster { n, affinity } => {
                let mut r = vec![format!("ip saddr != {net} {mark}")];
                if affinity {
                    r.push(sticky.to_string());
                }
                r.push(format!(
                    "dnat ip to ip daddr . meta l4proto . th dport . numgen {} mod {n} map @backends",
                    ctx.balancing.numgen()
                ));
                r
            }
            DynChain::NodePort { n, affinity, local } => {
                let mut r = Vec::new();
                if !local {
                    r.push(mark);
                }
                if affinity {
                    r.push(sticky.to_string());
                }
                r.push(format!(
                    "dnat ip to meta l4proto . th dport . numgen {} mod {n} map @nodeport_backends",
                    ctx.balancing.numgen()
                ));
                r
            }
            DynChain::AffinityRecord { timeout } => vec![format!(
                "meta l4proto {{ tcp, udp }} update @affinity {{ ip saddr . ct original ip daddr . meta l4proto . ct original proto-dst timeout {timeout}s : ip daddr . th dport }}"
            )],
        }
    }
}

/// Node-specific inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeContext {
    /// This node's name (for the `local` traffic policy).
    pub node: String,
    /// The whole pod network (traffic from outside it to a cluster IP is masqueraded).
    pub cluster_network: Ipv4Network,
    /// The service IP range (new connections to an unknown service IP:port are refused).
    pub service_cidr: Ipv4Network,
    /// How a new connection picks its endpoint.
    pub balancing: Balancing,
}

/// How a new connection picks its endpoint among a service's N endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Balancing {
    /// `numgen inc mod N`: a counter per endpoint count, shared by the services with that many
    /// endpoints. Spreads evenly (every endpoint within a few connections of 1/N); a workload
    /// that strictly alternates between services with the same endpoint count can make them
    /// follow each other's rhythm.
    #[default]
    RoundRobin,
    /// `numgen random mod N`, as kube-proxy does: independent per connection, with the
    /// statistical spread of random choice (about ±1/sqrt(connections × N) relative).
    Random,
}

impl Balancing {
    /// The `numgen` mode.
    pub fn numgen(self) -> &'static str {
        match self {
            Balancing::RoundRobin => "inc",
            Balancing::Random => "random",
        }
    }
}

/// A set key: at most 16 bytes (`ip . proto . port . slot`), stored inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    len: u8,
    bytes: [u8; 16],
}

impl Key {
    /// From key bytes (truncated to 16 bytes, the longest key any set has).
    pub fn from_slice(b: &[u8]) -> Key {
        let mut bytes = [0u8; 16];
        let len = b.len().min(16);
        bytes[..len].copy_from_slice(&b[..len]);
        Key {
            len: len as u8,
            bytes,
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02x?}", self.as_slice())
    }
}

impl From<KeyBuilder> for Key {
    fn from(k: KeyBuilder) -> Key {
        Key::from_slice(&k.build())
    }
}

/// Where a verdict element sends packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// A load-balancing or affinity chain.
    Dyn(DynChain),
    /// The chain that drops node-port traffic without a local endpoint.
    NodePortDrop,
}

impl Target {
    /// The chain name.
    pub fn name(&self) -> String {
        match self {
            Target::Dyn(c) => c.name(),
            Target::NodePortDrop => NODEPORT_DROP.to_string(),
        }
    }
}

/// An element's data, stored inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Data {
    /// A plain set element.
    None,
    /// An endpoint `ip . port` (8 register bytes).
    Endpoint([u8; 8]),
    /// `goto` a chain.
    Goto(Target),
    /// `jump` to a chain.
    Jump(Target),
}

impl Data {
    /// The data as the netlink writer takes it.
    pub fn to_elem_data(&self) -> ElemData {
        match self {
            Data::None => ElemData::None,
            Data::Endpoint(b) => ElemData::Value(b.to_vec()),
            Data::Goto(t) => ElemData::Goto(t.name()),
            Data::Jump(t) => ElemData::Jump(t.name()),
        }
    }
}

/// One element of one set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Element {
    /// The set.
    pub set: SetName,
    /// Key.
    pub key: Key,
    /// Data.
    pub data: Data,
}

/// What one service port contributes to the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortRules {
    /// Elements.
    pub elements: Vec<Element>,
    /// Chains its verdicts reference.
    pub chains: BTreeSet<DynChain>,
}

fn endpoint_value(ip: Ipv4Addr, port: u16) -> Data {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&ip.octets());
    b[4..6].copy_from_slice(&port.to_be_bytes());
    Data::Endpoint(b)
}

/// The elements and chains for port `p` of `svc` with `backends` (all nodes, sorted).
pub fn port_rules(
    svc: &Service,
    p: &ServicePort,
    backends: &[Backend],
    ctx: &NodeContext,
) -> PortRules {
    let mut out = PortRules::default();
    let proto = p.protocol.number();
    let key = KeyBuilder::new()
        .ipv4(svc.cluster_ip)
        .proto(proto)
        .port(p.port);
    let affinity = svc.session_affinity == SessionAffinity::ClientIp;
    let record = DynChain::AffinityRecord {
        timeout: svc.session_affinity_timeout,
    };
    if backends.is_empty() {
        out.elements.push(Element {
            set: SetName::NoEndpoints,
            key: key.clone().into(),
            data: Data::None,
        });
    } else {
        let chain = DynChain::Cluster {
            n: backends.len() as u32,
            affinity,
        };
        out.elements.push(Element {
            set: SetName::ServiceIps,
            key: key.clone().into(),
            data: Data::Goto(Target::Dyn(chain)),
        });
        out.chains.insert(chain);
        for (slot, b) in backends.iter().enumerate() {
            out.elements.push(Element {
                set: SetName::Backends,
                key: key.clone().u32_host(slot as u32).into(),
                data: endpoint_value(b.ip, p.target_port),
            });
        }
        if affinity {
            out.elements.push(Element {
                set: SetName::AffinityServices,
                key: key.clone().into(),
                data: Data::Jump(Target::Dyn(record)),
            });
            out.chains.insert(record);
        }
    }
    if let Some(np) = p.node_port {
        let nkey = KeyBuilder::new().proto(proto).port(np);
        let local = svc.external_traffic_policy == TrafficPolicy::Local;
        let usable: Vec<&Backend> = if local {
            backends
                .iter()
                .filter(|b| b.node.as_deref() == Some(ctx.node.as_str()))
                .collect()
        } else {
            backends.iter().collect()
        };
        if backends.is_empty() {
            out.elements.push(Element {
                set: SetName::NoEndpointNodePorts,
                key: nkey.clone().into(),
                data: Data::None,
            });
        } else if usable.is_empty() {
            // `local` policy and no endpoint here: drop, as kube-proxy does.
            out.elements.push(Element {
                set: SetName::ServiceNodePorts,
                key: nkey.clone().into(),
                data: Data::Goto(Target::NodePortDrop),
            });
        } else {
            let chain = DynChain::NodePort {
                n: usable.len() as u32,
                affinity,
                local,
            };
            out.elements.push(Element {
                set: SetName::ServiceNodePorts,
                key: nkey.clone().into(),
                data: Data::Goto(Target::Dyn(chain)),
            });
            out.chains.insert(chain);
            for (slot, b) in usable.iter().enumerate() {
                out.elements.push(Element {
                    set: SetName::NodePortBackends,
                    key: nkey.clone().u32_host(slot as u32).into(),
                    data: endpoint_value(b.ip, p.target_port),
                });
            }
            if affinity {
                out.elements.push(Element {
                    set: SetName::AffinityNodePorts,
                    key: nkey.clone().into(),
                    data: Data::Jump(Target::Dyn(record)),
                });
                out.chains.insert(record);
            }
        }
    }
    out
}

/// The hairpin element for a local pod address.
pub fn hairpin_element(ip: Ipv4Addr) -> Element {
    Element {
        set: SetName::Hairpin,
        key: KeyBuilder::new().ipv4(ip).ipv4(ip).into(),
        data: Data::None,
    }
}

/// New connections that no service takes (a service port without endpoints, another port of the
/// service range, a node port without endpoints) are redirected to this local port, where
/// nothing listens (tartand holds it bound): the kernel answers with a TCP reset or an ICMP
/// port unreachable, so clients are refused at once. Doing this in the NAT chains, which only
/// see a connection's first packet, keeps the service table off the path of every other packet
/// (a filter-hook `reject` would cost every packet on the node a hook traversal).
pub const REFUSE_PORT: u16 = 1;

/// Chain that drops node-port traffic with no local endpoint (`local` policy).
pub const NODEPORT_DROP: &str = "nodeport_drop";

/// A fingerprint of the base structure for `ctx`, stored in the table comment.
pub fn structure_tag(ctx: &NodeContext) -> String {
    format!(
        "tartan services v{STRUCTURE_VERSION} net {}/{} services {}/{} balancing {}",
        ctx.cluster_network.network(),
        ctx.cluster_network.prefix(),
        ctx.service_cidr.network(),
        ctx.service_cidr.prefix(),
        ctx.balancing.numgen()
    )
}

/// The name of an empty chain that marks the structure version, cluster network and service
/// range (chain names, unlike table comments, can be listed cheaply).
pub fn marker_chain(ctx: &NodeContext) -> String {
    let (net, svc) = (ctx.cluster_network, ctx.service_cidr);
    format!(
        "tag_v{STRUCTURE_VERSION}_{}_{}_{}_{}_{}",
        net.network().to_string().replace('.', "_"),
        net.prefix(),
        svc.network().to_string().replace('.', "_"),
        svc.prefix(),
        ctx.balancing.numgen()
    )
}

/// The two names the service table alternates between: a rebuild fills the other one and then
/// switches over in one transaction, so the rules in force are never half-built.
pub const TABLES: [&str; 2] = ["tartan_svc", "tartan_svc2"];

/// The other table name.
pub fn other_table(t: &str) -> &'static str {
    if t == TABLES[0] { TABLES[1] } else { TABLES[0] }
}

/// The name of a base (hooked) chain; its presence marks the active table.
pub const ACTIVE_MARKER_CHAIN: &str = "nat_prerouting";

/// The load-balancing chains a table is built with: every kind for 1..=`capacity` endpoints,
/// plus one affinity recorder per timeout in use. Chains are only ever created together with
/// the maps they use (nft 1.0.6 cannot add a rule using a `typeof … th dport` map to an existing
/// table), so a service needing more endpoints than the capacity triggers a rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Structure {
    /// Largest endpoint count with chains.
    pub capacity: u32,
    /// Affinity timeouts with recorder chains.
    pub timeouts: BTreeSet<u32>,
}

/// Smallest capacity a table is built with.
pub const MIN_CAPACITY: u32 = 16;

impl Structure {
    /// The structure able to serve `chains`, at least as large as `at_least`.
    pub fn for_chains(chains: &BTreeSet<DynChain>, at_least: Option<&Structure>) -> Structure {
        let mut max_n = MIN_CAPACITY;
        let mut timeouts = at_least.map(|s| s.timeouts.clone()).unwrap_or_default();
        if let Some(s) = at_least {
            max_n = max_n.max(s.capacity);
        }
        for c in chains {
            match *c {
                DynChain::Cluster { n, .. } | DynChain::NodePort { n, .. } => max_n = max_n.max(n),
                DynChain::AffinityRecord { timeout } => {
                    timeouts.insert(timeout);
                }
            }
        }
        Structure {
            capacity: max_n.next_power_of_two(),
            timeouts,
        }
    }

    /// Every dynamic chain of this structure.
    pub fn chains(&self) -> BTreeSet<DynChain> {
        let mut out = BTreeSet::new();
        for n in 1..=self.capacity {
            for affinity in [false, true] {
                out.insert(DynChain::Cluster { n, affinity });
                for local in [false, true] {
                    out.insert(DynChain::NodePort { n, affinity, local });
                }
            }
        }
        for t in &self.timeouts {
            out.insert(DynChain::AffinityRecord { timeout: *t });
        }
        out
    }

    /// Whether every chain in `needed` exists in this structure.
    pub fn serves(&self, needed: &BTreeSet<DynChain>) -> bool {
        needed.iter().all(|c| match *c {
            DynChain::Cluster { n, .. } | DynChain::NodePort { n, .. } => {
                n >= 1 && n <= self.capacity
            }
            DynChain::AffinityRecord { timeout } => self.timeouts.contains(&timeout),
        })
    }

    /// Recovers the structure from the chain names of an existing table.
    pub fn from_chain_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Structure {
        let mut capacity = 0;
        let mut timeouts = BTreeSet::new();
        for n in names {
            match parse_dyn_chain(n) {
                Some(DynChain::Cluster { n, affinity: false }) => capacity = capacity.max(n),
                Some(DynChain::AffinityRecord { timeout }) => {
                    timeouts.insert(timeout);
                }
                _ => {}
            }
        }
        Structure { capacity, timeouts }
    }
}

/// Parses a dynamic chain name back (`svc_3`, `svc_aff_3`, `np_local_aff_2`, `aff_record_60`).
pub fn parse_dyn_chain(name: &str) -> Option<DynChain> {
    let (head, n) = name.rsplit_once('_')?;
    let n: u32 = n.parse().ok()?;
    let c = match head {
        "svc" => DynChain::Cluster { n, affinity: false },
        "svc_aff" => DynChain::Cluster { n, affinity: true },
        "np" => DynChain::NodePort {
            n,
            affinity: false,
            local: false,
        },
        "np_aff" => DynChain::NodePort {
            n,
            affinity: true,
            local: false,
        },
        "np_local" => DynChain::NodePort {
            n,
            affinity: false,
            local: true,
        },
        "np_local_aff" => DynChain::NodePort {
            n,
            affinity: true,
            local: true,
        },
        "aff_record" => DynChain::AffinityRecord { timeout: n },
        _ => return None,
    };
    (c.name() == name).then_some(c)
}

/// Step 1 of a (re)build: a fresh, inactive `table` with every map, set and regular chain of
/// `st`, but no hooked chain yet, so loading its elements changes nothing in force.
pub fn build_script(table: &str, ctx: &NodeContext, st: &Structure) -> String {
    let tag = structure_tag(ctx);
    let marker = marker_chain(ctx);
    let svc_cidr = format!(
        "{}/{}",
        ctx.service_cidr.network(),
        ctx.service_cidr.prefix()
    );
    let numgen = ctx.balancing.numgen();
    let mut s = format!(
        r#"table {FAMILY} {table}
delete table {FAMILY} {table}
table {FAMILY} {table} {{
	comment "{tag}"
	map service_ips {{ typeof ip daddr . meta l4proto . th dport : verdict; }}
	map service_nodeports {{ typeof meta l4proto . th dport : verdict; }}
	map backends {{ typeof ip daddr . meta l4proto . th dport . numgen {numgen} mod 1 : ip daddr . th dport; counter; }}
	map nodeport_backends {{ typeof meta l4proto . th dport . numgen {numgen} mod 1 : ip daddr . th dport; counter; }}
	set no_endpoints {{ typeof ip daddr . meta l4proto . th dport; counter; }}
	set no_endpoint_nodeports {{ typeof meta l4proto . th dport; counter; }}
	map affinity_services {{ typeof ip daddr . meta l4proto . th dport : verdict; }}
	map affinity_nodeports {{ typeof meta l4proto . th dport : verdict; }}
	map affinity {{ typeof ip saddr . ip daddr . meta l4proto . th dport : ip daddr . th dport; size 1048576; flags dynamic,timeout; timeout 3h; }}
	set hairpin {{ typeof ip saddr . ip daddr; }}
	chain {marker} {{
	}}
	chain services {{
		ip daddr . meta l4proto . th dport vmap @service_ips
		ip daddr {svc_cidr} goto cluster_ip_refused
		ip daddr != 127.0.0.0/8 fib daddr type local meta l4proto . th dport vmap @service_nodeports
		ip daddr != 127.0.0.0/8 fib daddr type local meta l4proto . th dport @no_endpoint_nodeports goto refuse
	}}
	chain cluster_ip_refused {{
		ip daddr . meta l4proto . th dport @no_endpoints goto refuse
		goto refuse
	}}
	chain refuse {{
		meta l4proto {{ tcp, udp }} redirect to :{REFUSE_PORT}
	}}
	chain affinity_record {{
		meta l4proto {{ tcp, udp }} ct original ip daddr . meta l4proto . ct original proto-dst vmap @affinity_services
		meta l4proto {{ tcp, udp }} meta l4proto . ct original proto-dst vmap @affinity_nodeports
	}}
	chain {NODEPORT_DROP} {{
		drop
	}}
"#
    );
    for c in st.chains() {
        let _ = writeln!(s, "	chain {} {{", c.name());
        for r in c.rules(ctx) {
            let _ = writeln!(s, "		{r}");
        }
        s.push_str(
            "	}
",
        );
    }
    s.push_str(
        "}
",
    );
    s
}

/// Step 3 of a (re)build: hooks `table` into the packet path and removes `old` (if any), in
/// one transaction, so there is no moment with both or neither in force.
pub fn activate_script(table: &str, old: Option<&str>) -> String {
    let mut s = format!(
        r#"add chain {FAMILY} {table} nat_prerouting {{ type nat hook prerouting priority -100; policy accept; }}
add rule {FAMILY} {table} nat_prerouting jump services
add chain {FAMILY} {table} nat_output {{ type nat hook output priority -100; policy accept; }}
add rule {FAMILY} {table} nat_output jump services
add chain {FAMILY} {table} nat_postrouting {{ type nat hook postrouting priority 100; policy accept; }}
add rule {FAMILY} {table} nat_postrouting ct status dnat jump affinity_record
add rule {FAMILY} {table} nat_postrouting meta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} masquerade fully-random
add rule {FAMILY} {table} nat_postrouting ct status dnat ip saddr . ip daddr @hairpin masquerade fully-random
"#
    );
    if let Some(o) = old {
        let _ = writeln!(s, "delete table {FAMILY} {o}");
    }
    s
}

/// The fields a set's keys are made of, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Ip,
    Proto,
    Port,
    Slot,
}

impl SetName {
    fn key_fields(self) -> &'static [Field] {
        use Field::*;
        match self {
            SetName::ServiceIps | SetName::NoEndpoints | SetName::AffinityServices => {
                &[Ip, Proto, Port]
            }
            SetName::ServiceNodePorts
            | SetName::NoEndpointNodePorts
            | SetName::AffinityNodePorts => &[Proto, Port],
            SetName::Backends => &[Ip, Proto, Port, Slot],
            SetName::NodePortBackends => &[Proto, Port, Slot],
            SetName::Hairpin => &[Ip, Ip],
        }
    }

    /// The set with this nft name.
    pub fn from_name(name: &str) -> Option<SetName> {
        SetName::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

fn render_fields(bytes: &[u8], fields: &[Field]) -> String {
    let mut parts = Vec::new();
    let mut rest = bytes;
    for f in fields {
        let (chunk, tail) = rest.split_at(4.min(rest.len()));
        rest = tail;
        let b = |i: usize| chunk.get(i).copied().unwrap_or(0);
        parts.push(match f {
            Field::Ip => Ipv4Addr::new(b(0), b(1), b(2), b(3)).to_string(),
            Field::Proto => match b(0) {
                6 => "tcp".to_string(),
                17 => "udp".to_string(),
                p => p.to_string(),
            },
            Field::Port => u16::from_be_bytes([b(0), b(1)]).to_string(),
            Field::Slot => u32::from_ne_bytes([b(0), b(1), b(2), b(3)]).to_string(),
        });
    }
    parts.join(" . ")
}

/// An element as text, the way `nft` prints it: (`key`, `data`), e.g.
/// (`10.96.0.10 . tcp . 80 . 0`, `10.244.1.2 . 8080`) or (`10.96.0.10 . tcp . 80`, `goto svc_2`).
pub fn describe(set: SetName, key: &[u8], data: &ElemData) -> (String, String) {
    let k = render_fields(key, set.key_fields());
    let d = match data {
        ElemData::None => String::new(),
        ElemData::Goto(c) => format!("goto {c}"),
        ElemData::Jump(c) => format!("jump {c}"),
        ElemData::Value(v) => render_fields(v, &[Field::Ip, Field::Port]),
    };
    (k, d)
}

/// Every element for a whole service model: `(service id, port index)` → rules.
pub fn all_rules<'a>(
    services: impl IntoIterator<Item = (&'a Service, &'a [Backend])>,
    ctx: &NodeContext,
) -> BTreeMap<(String, usize), PortRules> {
    let mut out = BTreeMap::new();
    for (svc, backends) in services {
        for (i, p) in svc.ports.iter().enumerate() {
            out.insert((svc.id(), i), port_rules(svc, p, backends, ctx));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service_model::{DEFAULT_AFFINITY_TIMEOUT, Protocol};

    fn ctx() -> NodeContext {
        NodeContext {
            node: "n1".into(),
            cluster_network: "10.244.0.0/16".parse().unwrap(),
            service_cidr: "10.96.0.0/12".parse().unwrap(),
            balancing: Balancing::RoundRobin,
        }
    }

    fn svc(node_port: Option<u16>, affinity: bool, local: bool) -> Service {
        let mut p: ServicePort = "80:8080/tcp".parse().unwrap();
        p.node_port = node_port;
        Service {
            namespace: "default".into(),
            name: "web".into(),
            cluster_ip: "10.96.0.10".parse().unwrap(),
            ports: vec![p],
            selector: Some([("app".to_string(), "web".to_string())].into()),
            session_affinity: if affinity {
                SessionAffinity::ClientIp
            } else {
                SessionAffinity::None
            },
            session_affinity_timeout: DEFAULT_AFFINITY_TIMEOUT,
            external_traffic_policy: if local {
                TrafficPolicy::Local
            } else {
                TrafficPolicy::Cluster
            },
        }
    }

    fn backends(n: u8) -> Vec<Backend> {
        (0..n)
            .map(|i| Backend {
                ip: Ipv4Addr::new(10, 244, i % 2 + 1, 10 + i),
                node: Some(format!("n{}", i % 2 + 1).into()),
            })
            .collect()
    }

    fn count(r: &PortRules, set: SetName) -> usize {
        r.elements.iter().filter(|e| e.set == set).count()
    }

    #[test]
    fn cluster_ip_with_endpoints() {
        let s = svc(None, false, false);
        let r = port_rules(&s, &s.ports[0], &backends(3), &ctx());
        assert_eq!(count(&r, SetName::ServiceIps), 1);
        assert_eq!(count(&r, SetName::Backends), 3);
        assert_eq!(count(&r, SetName::NoEndpoints), 0);
        assert_eq!(
            r.chains.iter().collect::<Vec<_>>(),
            vec![&DynChain::Cluster {
                n: 3,
                affinity: false
            }]
        );
        let verdict = &r
            .elements
            .iter()
            .find(|e| e.set == SetName::ServiceIps)
            .unwrap()
            .data;
        assert_eq!(verdict.to_elem_data(), ElemData::Goto("svc_3".into()));
        // Backend slots carry the target port.
        let b = r
            .elements
            .iter()
            .find(|e| e.set == SetName::Backends)
            .unwrap();
        assert_eq!(b.data, endpoint_value(Ipv4Addr::new(10, 244, 1, 10), 8080));
    }

    #[test]
    fn no_endpoints_rejects() {
        let s = svc(Some(30080), false, false);
        let r = port_rules(&s, &s.ports[0], &[], &ctx());
        assert_eq!(count(&r, SetName::NoEndpoints), 1);
        assert_eq!(count(&r, SetName::NoEndpointNodePorts), 1);
        assert_eq!(r.elements.len(), 2);
        assert!(r.chains.is_empty());
    }

    #[test]
    fn node_port_policies() {
        let s = svc(Some(30080), false, false);
        let r = port_rules(&s, &s.ports[0], &backends(4), &ctx());
        assert_eq!(count(&r, SetName::NodePortBackends), 4);
        assert!(r.chains.contains(&DynChain::NodePort {
            n: 4,
            affinity: false,
            local: false
        }));
        // Local: only n1's two endpoints.
        let s = svc(Some(30080), false, true);
        let r = port_rules(&s, &s.ports[0], &backends(4), &ctx());
        assert_eq!(count(&r, SetName::NodePortBackends), 2);
        assert_eq!(
            count(&r, SetName::Backends),
            4,
            "cluster IP still uses every endpoint"
        );
        assert!(r.chains.contains(&DynChain::NodePort {
            n: 2,
            affinity: false,
            local: true
        }));
        // Local with no endpoint on this node: drop.
        let other = NodeContext {
            node: "n9".into(),
            ..ctx()
        };
        let r = port_rules(&s, &s.ports[0], &backends(4), &other);
        let np = r
            .elements
            .iter()
            .find(|e| e.set == SetName::ServiceNodePorts)
            .unwrap();
        assert_eq!(np.data, Data::Goto(Target::NodePortDrop));
    }

    #[test]
    fn affinity_adds_sticky_chain_and_recorder() {
        let s = svc(Some(30080), true, false);
        let r = port_rules(&s, &s.ports[0], &backends(2), &ctx());
        assert_eq!(count(&r, SetName::AffinityServices), 1);
        assert_eq!(count(&r, SetName::AffinityNodePorts), 1);
        assert!(r.chains.contains(&DynChain::AffinityRecord {
            timeout: DEFAULT_AFFINITY_TIMEOUT
        }));
        let c = DynChain::Cluster {
            n: 2,
            affinity: true,
        };
        assert!(r.chains.contains(&c));
        assert!(c.rules(&ctx()).iter().any(|l| l.contains("map @affinity")));
    }

    #[test]
    fn masquerade_marking() {
        let c = DynChain::Cluster {
            n: 1,
            affinity: false,
        }
        .rules(&ctx());
        assert!(c[0].starts_with("ip saddr != 10.244.0.0/16 meta mark set"));
        let np = DynChain::NodePort {
            n: 1,
            affinity: false,
            local: false,
        }
        .rules(&ctx());
        assert!(np[0].starts_with("meta mark set"));
        let npl = DynChain::NodePort {
            n: 1,
            affinity: false,
            local: true,
        }
        .rules(&ctx());
        assert!(
            !npl.iter().any(|l| l.contains("mark")),
            "local policy keeps the client address"
        );
    }

    #[test]
    fn elements_render_like_nft() {
        let s = svc(None, false, false);
        let r = port_rules(&s, &s.ports[0], &backends(1), &ctx());
        let texts: Vec<(String, String)> = r
            .elements
            .iter()
            .map(|e| describe(e.set, e.key.as_slice(), &e.data.to_elem_data()))
            .collect();
        assert!(texts.contains(&("10.96.0.10 . tcp . 80".into(), "goto svc_1".into())));
        assert!(texts.contains(&(
            "10.96.0.10 . tcp . 80 . 0".into(),
            "10.244.1.10 . 8080".into()
        )));
        let h = hairpin_element(Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(
            describe(h.set, h.key.as_slice(), &h.data.to_elem_data()).0,
            "10.244.1.2 . 10.244.1.2"
        );
        assert_eq!(SetName::from_name("backends"), Some(SetName::Backends));
    }

    #[test]
    fn udp_keys_differ_from_tcp() {
        let mut s = svc(None, false, false);
        s.ports[0].protocol = Protocol::Udp;
        let r = port_rules(&s, &s.ports[0], &backends(1), &ctx());
        let k = r.elements[0].key;
        assert_eq!(k.as_slice()[4], 17);
    }

    #[test]
    fn build_and_activate_scripts() {
        let needed = [DynChain::Cluster {
            n: 2,
            affinity: false,
        }]
        .into();
        let st = Structure::for_chains(&needed, None);
        assert_eq!(st.capacity, MIN_CAPACITY);
        let s = build_script("tartan_svc2", &ctx(), &st);
        assert!(s.starts_with("table ip tartan_svc2\ndelete table ip tartan_svc2\n"));
        assert!(s.contains("\tchain svc_2 {"));
        assert!(s.contains("\tchain np_local_aff_16 {"));
        assert!(!s.contains("hook"), "the build step must not hook anything");
        assert!(s.contains(&structure_tag(&ctx())));
        let a = activate_script("tartan_svc2", Some("tartan_svc"));
        assert!(a.contains("add chain ip tartan_svc2 nat_prerouting { type nat hook prerouting"));
        assert!(a.trim_end().ends_with("delete table ip tartan_svc"));
    }

    #[test]
    fn structure_capacity_and_names() {
        let needed: BTreeSet<DynChain> = [
            DynChain::Cluster {
                n: 40,
                affinity: false,
            },
            DynChain::AffinityRecord { timeout: 60 },
        ]
        .into();
        let st = Structure::for_chains(&needed, None);
        assert_eq!(st.capacity, 64);
        assert!(st.serves(&needed));
        assert!(!st.serves(&[DynChain::AffinityRecord { timeout: 61 }].into()));
        assert!(
            !st.serves(
                &[DynChain::NodePort {
                    n: 65,
                    affinity: false,
                    local: true
                }]
                .into()
            )
        );
        let names: Vec<String> = st.chains().iter().map(DynChain::name).collect();
        let back = Structure::from_chain_names(names.iter().map(String::as_str));
        assert_eq!(back, st);
        for c in st.chains() {
            assert_eq!(parse_dyn_chain(&c.name()), Some(c));
        }
        assert_eq!(parse_dyn_chain("services"), None);
        assert_eq!(parse_dyn_chain("svc_x"), None);
        assert_eq!(other_table(TABLES[0]), TABLES[1]);
    }
}
