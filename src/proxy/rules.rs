//! The service table `ip tartan_svc` (and, for dual-stack services, its twin `ip6 tartan_svc`,
//! one table per family as kube-proxy keeps them), computed as data: a fixed structure (maps, sets, a few
//! chains; loaded with `nft -f`) plus elements per service port (written over netlink).
//!
//! One map lookup finds a service, whatever the number of services: first-packet cost does not
//! grow with the table. Load balancing uses one chain per *modulus* (`numgen inc|random mod M`
//! needs a constant M): M = N for up to 16 endpoints (exact), else a power-of-two slot table
//! whose slots are spread evenly and stably over the endpoints. The chain family is fixed when
//! the table is created, so no endpoint count ever needs a new chain or a rebuild; the element
//! count grows with services × slots. See `docs/ruleset.md`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

use crate::kernel::nft_elements::{ElemData, KeyBuilder, NFPROTO_IPV4, NFPROTO_IPV6};
use crate::model::service::{
    Backend, IpFamily, Service, ServicePort, SessionAffinity, TrafficPolicy,
};
use crate::overlay::masquerade::MASQ_MARK;

/// The address family of one service table: `ip` for IPv4, `ip6` for the IPv6 cluster IPs of
/// dual-stack services. Both tables have the same structure; only the address words and
/// widths differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum Family {
    /// IPv4 (`table ip`).
    #[default]
    V4,
    /// IPv6 (`table ip6`).
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The nftables family and address keyword (`ip`, `ip6`).
    pub fn nft(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    /// The netlink protocol family of the table.
    pub fn nfproto(self) -> u8 {
        match self {
            Family::V4 => NFPROTO_IPV4,
            Family::V6 => NFPROTO_IPV6,
        }
    }

    /// The service model's name of the family.
    pub fn ip_family(self) -> IpFamily {
        match self {
            Family::V4 => IpFamily::IPv4,
            Family::V6 => IpFamily::IPv6,
        }
    }

    /// The family of `ip`.
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The loopback range node-port lookups skip.
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1",
        }
    }

    /// Whether client-IP affinity is programmed in this family's table. Not in IPv6: the
    /// recorder's `update @affinity { ip6 saddr . ct original ip6 daddr . meta l4proto . ct
    /// original proto-dst : ip6 daddr . th dport }` (a 40-byte key with 20 bytes of data)
    /// makes nft 1.0.6 abort (`netlink_gen_expr: Assertion 'dreg < ctx->reg_low'`: it runs
    /// out of registers), and so would the whole table's build. The IPv6 cluster IP of such
    /// a service balances each connection instead, and says so in its problems.
    pub fn has_affinity(self) -> bool {
        self == Family::V4
    }

    /// The unspecified address of the family.
    pub fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }
}
/// Version of the structure; bumped when the base ruleset changes shape.
pub const STRUCTURE_VERSION: u32 = 7;

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
    /// [`SetName::Backends`] for slot tables above [`COUNTED_MAX_SLOTS`], without per-element
    /// counters (they would more than double the kernel's cost of writing the slots).
    BigBackends,
    /// [`SetName::NodePortBackends`] for slot tables above [`COUNTED_MAX_SLOTS`], uncounted.
    BigNodePortBackends,
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
    pub const ALL: [SetName; 11] = [
        SetName::ServiceIps,
        SetName::ServiceNodePorts,
        SetName::Backends,
        SetName::NodePortBackends,
        SetName::BigBackends,
        SetName::BigNodePortBackends,
        SetName::NoEndpoints,
        SetName::NoEndpointNodePorts,
        SetName::AffinityServices,
        SetName::AffinityNodePorts,
        SetName::Hairpin,
    ];

    /// The backend map of this map's kind (cluster IP or node port) for a slot table of
    /// `slots` slots: the counted one up to [`COUNTED_MAX_SLOTS`], the uncounted one above.
    pub fn for_slots(self, slots: u32) -> SetName {
        let cluster = matches!(self, SetName::Backends | SetName::BigBackends);
        match (cluster, counted_slots(slots)) {
            (true, true) => SetName::Backends,
            (true, false) => SetName::BigBackends,
            (false, true) => SetName::NodePortBackends,
            (false, false) => SetName::BigNodePortBackends,
        }
    }

    /// The nft name.
    pub fn as_str(self) -> &'static str {
        match self {
            SetName::ServiceIps => "service_ips",
            SetName::ServiceNodePorts => "service_nodeports",
            SetName::Backends => "backends",
            SetName::NodePortBackends => "nodeport_backends",
            SetName::BigBackends => "big_backends",
            SetName::BigNodePortBackends => "big_nodeport_backends",
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
        let ip = ctx.family.nft();
        let net = format!(
            "{}/{}",
            ctx.cluster_network.network(),
            ctx.cluster_network.prefix()
        );
        let mark = format!("meta mark set meta mark | {MASQ_MARK:#x}");
        let sticky =
            format!("dnat {ip} to {ip} saddr . {ip} daddr . meta l4proto . th dport map @affinity");
        match *self {
            DynChain::Cluster { n, affinity } => {
                let mut r = vec![format!("{ip} saddr != {net} {mark}")];
                if affinity {
                    r.push(sticky.clone());
                }
                r.push(format!(
                    "dnat {ip} to {ip} daddr . meta l4proto . th dport . numgen {} mod {n} map @{}",
                    ctx.balancing.numgen(),
                    SetName::Backends.for_slots(n).as_str()
                ));
                r
            }
            DynChain::NodePort { n, affinity, local } => {
                let mut r = Vec::new();
                if !local {
                    r.push(mark);
                }
                if affinity {
                    r.push(sticky.clone());
                }
                r.push(format!(
                    "dnat {ip} to meta l4proto . th dport . numgen {} mod {n} map @{}",
                    ctx.balancing.numgen(),
                    SetName::NodePortBackends.for_slots(n).as_str()
                ));
                r
            }
            DynChain::AffinityRecord { timeout } => vec![format!(
                "meta l4proto {{ tcp, udp }} update @affinity {{ {ip} saddr . ct original {ip} daddr . meta l4proto . ct original proto-dst timeout {timeout}s : {ip} daddr . th dport }}"
            )],
        }
    }
}

/// Node-specific inputs of one family's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeContext {
    /// This node's name (for the `local` traffic policy).
    pub node: String,
    /// The table's family; `cluster_network` and `service_cidr` are of it.
    pub family: Family,
    /// The whole pod network (traffic from outside it to a cluster IP is masqueraded).
    pub cluster_network: IpNetwork,
    /// The service IP range (new connections to an unknown service IP:port are refused).
    pub service_cidr: IpNetwork,
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

/// The longest key any set has: `ip6 saddr . ip6 daddr` (32 bytes), `ip6 daddr . proto . port
/// . slot` (28).
const KEY_MAX: usize = 32;

/// A set key: at most [`KEY_MAX`] bytes, stored inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    len: u8,
    bytes: [u8; KEY_MAX],
}

impl Key {
    /// From key bytes (truncated to [`KEY_MAX`] bytes, the longest key any set has).
    pub fn from_slice(b: &[u8]) -> Key {
        let mut bytes = [0u8; KEY_MAX];
        let len = b.len().min(KEY_MAX);
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
    /// An endpoint `ip . port` (8 register bytes for IPv4, 20 for IPv6).
    Endpoint(IpAddr, u16),
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
            Data::Endpoint(ip, port) => {
                let mut b = match ip {
                    IpAddr::V4(a) => a.octets().to_vec(),
                    IpAddr::V6(a) => a.octets().to_vec(),
                };
                b.extend_from_slice(&port.to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                ElemData::Value(b)
            }
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
    /// Elements (everything but the backend slots).
    pub elements: Vec<Element>,
    /// The backend slots, one block per backend map (cluster IP, node port).
    pub blocks: Vec<SlotBlock>,
    /// Chains its verdicts reference.
    pub chains: BTreeSet<DynChain>,
}

/// The backend slots of one service port in one backend map: slot `s` of `base` (the
/// port's key in the verdict map) sends to `endpoints[slots[s]]:target_port`. Kept as a compact
/// block rather than as elements so the planner can diff thousands of slots positionally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotBlock {
    /// [`SetName::Backends`] or [`SetName::NodePortBackends`] (their `Big` twins above
    /// [`COUNTED_MAX_SLOTS`] slots).
    pub set: SetName,
    /// The port's key (`ip . proto . port` or `proto . port`) without the slot.
    pub base: Key,
    /// The endpoints the slots point into (all of the table's family).
    pub endpoints: Vec<IpAddr>,
    /// The endpoint (index into `endpoints`) of each slot.
    pub slots: Vec<u32>,
    /// The endpoints' port.
    pub target_port: u16,
}

impl SlotBlock {
    /// The verdict map whose element for `base` owns this block.
    pub fn verdict_set(&self) -> SetName {
        match self.set {
            SetName::NodePortBackends | SetName::BigNodePortBackends => SetName::ServiceNodePorts,
            _ => SetName::ServiceIps,
        }
    }

    /// The number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the block has no slot.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The endpoint of slot `slot`.
    pub fn ip(&self, slot: usize) -> IpAddr {
        self.slots
            .get(slot)
            .and_then(|i| self.endpoints.get(*i as usize))
            .copied()
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    /// The key of slot `slot`.
    pub fn key(&self, slot: usize) -> Key {
        let base = self.base.as_slice();
        let mut b = [0u8; KEY_MAX];
        let n = base.len().min(KEY_MAX - 4);
        b[..n].copy_from_slice(&base[..n]);
        b[n..n + 4].copy_from_slice(&(slot as u32).to_ne_bytes());
        Key::from_slice(&b[..n + 4])
    }

    /// The data of slot `slot`.
    pub fn data(&self, slot: usize) -> Data {
        endpoint_value(self.ip(slot), self.target_port)
    }

    /// Every slot as an element.
    pub fn elements(&self) -> impl Iterator<Item = Element> + '_ {
        (0..self.len()).map(|s| Element {
            set: self.set,
            key: self.key(s),
            data: self.data(s),
        })
    }
}

fn endpoint_value(ip: IpAddr, port: u16) -> Data {
    Data::Endpoint(ip, port)
}

/// Largest endpoint count balanced exactly: `numgen … mod N` with one slot per endpoint.
pub const EXACT_MAX: u32 = 16;

/// Above [`EXACT_MAX`] endpoints a port gets M slots, M the smallest power of two with at least
/// this many slots per endpoint: each endpoint holds ⌊M/N⌋ or ⌈M/N⌉ slots, so its share of new
/// connections is within 1/8 (in practice ≤ 1/(M/N) ≤ 6.25 % on average) of 1/N.
pub const SLOTS_PER_ENDPOINT: u32 = 8;

/// Most slots a port gets (2^18): a fixed family of chains (see [`moduli`]) serves every
/// endpoint count; beyond 262,144 endpoints the surplus is left out (with a warning).
pub const MAX_SLOTS: u32 = 1 << 18;

/// Above this many slots a port gets [`LARGE_SLOTS_PER_ENDPOINT`] per endpoint instead of
/// [`SLOTS_PER_ENDPOINT`], and slot counts grow in quarter steps (40,960, 49,152, 57,344,
/// 65,536, 81,920, …) instead of doubling: the kernel's cost is the slots it writes when a
/// big service changes its slot count, and a doubling writes as many as the table holds
/// (1 → 10,000 endpoints: 422–554 ms with 8 per endpoint and doubling, 213–384 ms with 4;
/// `big_service` bench), while mid-sized services keep the finer spread.
pub const LARGE_SLOTS: u32 = 1 << 15;

/// Slots per endpoint once a port has more than [`LARGE_SLOTS`] (shares within 1/4 of 1/N;
/// 10,000 endpoints hold 40,960 slots, 4 or 5 each: −2.3 % / +22 %).
pub const LARGE_SLOTS_PER_ENDPOINT: u32 = 4;

/// Largest slot table kept in a map with per-element counters (the ones `tartanctl explain`
/// sums into per-endpoint connection counts): services up to 512 endpoints. Larger tables
/// live in the uncounted `big_` maps: writing 131,072 counted slots costs the kernel 0.54 s
/// against 0.20 s uncounted (`nft_elements` `slot_table` probe), `nft` takes seconds to list a
/// counted map that large, and a service moves there once, while it is still small.
pub const COUNTED_MAX_SLOTS: u32 = 1 << 12;

/// Whether a slot table of `slots` slots lives in a map with per-element counters
/// (up to [`COUNTED_MAX_SLOTS`]).
pub fn counted_slots(slots: u32) -> bool {
    slots <= COUNTED_MAX_SLOTS
}

/// The number of slots (the `numgen` modulus) for `n` endpoints: `n` itself up to
/// [`EXACT_MAX`], else the smallest modulus of [`moduli`] of at least [`SLOTS_PER_ENDPOINT`] ×
/// `n` while that is at most [`LARGE_SLOTS`], beyond it of at least
/// [`LARGE_SLOTS_PER_ENDPOINT`] × `n` (never fewer than [`LARGE_SLOTS`], so the count only
/// grows with `n`), at most [`MAX_SLOTS`].
pub fn slot_count(n: usize) -> u32 {
    if n <= EXACT_MAX as usize {
        return n as u32;
    }
    let mut want = (n as u64).saturating_mul(u64::from(SLOTS_PER_ENDPOINT));
    if want > u64::from(LARGE_SLOTS) {
        want = (n as u64)
            .saturating_mul(u64::from(LARGE_SLOTS_PER_ENDPOINT))
            .max(u64::from(LARGE_SLOTS));
    }
    moduli()
        .find(|&m| u64::from(m) >= want)
        .unwrap_or(MAX_SLOTS)
}

/// Every modulus a table has chains for, ascending: 1..=[`EXACT_MAX`], the powers of two up to
/// [`LARGE_SLOTS`] above it, then quarter steps up to [`MAX_SLOTS`] (2^k × 5/4, 6/4, 7/4, 2 for
/// k = 15, 16, 17). Fixed, whatever the services: no endpoint count needs a new chain.
pub fn moduli() -> impl Iterator<Item = u32> {
    let pow2 = (EXACT_MAX.trailing_zeros() + 1..=LARGE_SLOTS.trailing_zeros()).map(|k| 1 << k);
    let quarters = (LARGE_SLOTS.trailing_zeros()..MAX_SLOTS.trailing_zeros())
        .flat_map(|k| (5..=8).map(move |q| (1u32 << (k - 2)) * q));
    (1..=EXACT_MAX).chain(pow2).chain(quarters)
}

/// Assigns the slots of a port to `endpoints` (sorted): slot `s` → index into `endpoints`.
///
/// Up to [`EXACT_MAX`] endpoints, slot `i` is endpoint `i`. Above, there are
/// [`slot_count`] slots and every endpoint gets ⌊M/N⌋ or ⌈M/N⌉ of them; the assignment is
/// derived from the one applied before (`prev_endpoints[prev_slots[s]]` is slot `s`'s endpoint;
/// both empty if none) so that a slot keeps its endpoint whenever that endpoint is still there
/// and under its quota: adding or removing one endpoint moves only about M/N slots.
/// `prev_slots` of another length is read modulo its length (the slot count doubled or
/// halved). Deterministic for the same inputs; linear in the slots, one hash lookup per
/// endpoint.
pub fn assign_slots(
    endpoints: &[IpAddr],
    prev_endpoints: &[IpAddr],
    prev_slots: &[u32],
) -> Vec<u32> {
    let m = slot_count(endpoints.len()) as usize;
    if endpoints.len() <= EXACT_MAX as usize {
        return (0..m as u32).collect();
    }
    // More endpoints than slots only beyond MAX_SLOTS: the first M are used.
    let n = endpoints.len().min(m);
    let index: HashMap<IpAddr, u32, ahash::RandomState> = endpoints[..n]
        .iter()
        .enumerate()
        .map(|(i, ip)| (*ip, i as u32))
        .collect();
    // Old endpoint index → new endpoint index (u32::MAX: gone).
    let remap: Vec<u32> = prev_endpoints
        .iter()
        .map(|ip| index.get(ip).copied().unwrap_or(u32::MAX))
        .collect();
    let old = |s: usize| -> u32 {
        if prev_slots.is_empty() {
            return u32::MAX;
        }
        let i = prev_slots[s % prev_slots.len()] as usize;
        remap.get(i).copied().unwrap_or(u32::MAX)
    };
    let mut holding = vec![0u32; n];
    for s in 0..m {
        let e = old(s);
        if e != u32::MAX {
            holding[e as usize] += 1;
        }
    }
    // The endpoints holding most slots keep the ⌈M/N⌉ quotas, so fewest slots move.
    let (q, r) = ((m / n) as u32, m % n);
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.sort_by_key(|e| (std::cmp::Reverse(holding[*e as usize]), *e));
    let mut quota = vec![q; n];
    for e in &order[..r] {
        quota[*e as usize] = q + 1;
    }
    let mut out = vec![u32::MAX; m];
    let mut got = vec![0u32; n];
    for (s, slot) in out.iter_mut().enumerate() {
        let e = old(s);
        if e != u32::MAX && got[e as usize] < quota[e as usize] {
            *slot = e;
            got[e as usize] += 1;
        }
    }
    let mut e = 0usize;
    for slot in out.iter_mut().filter(|x| **x == u32::MAX) {
        while got[e] >= quota[e] {
            e += 1;
        }
        *slot = e as u32;
        got[e] += 1;
    }
    out
}

/// The slot block of `base` in `set` for `usable` endpoints, stable against `prev`.
fn slot_block(
    set: SetName,
    base: Key,
    usable: Vec<IpAddr>,
    target_port: u16,
    prev: Option<&PortRules>,
) -> SlotBlock {
    // The previous block of this port, in either map of its kind, keeps the assignment stable
    // when the table moves between the counted and the uncounted map.
    let kind = |s: SetName| s.for_slots(1);
    let old = prev.and_then(|r| {
        r.blocks
            .iter()
            .find(|b| kind(b.set) == kind(set) && b.base == base)
    });
    let slots = match old {
        Some(o) => assign_slots(&usable, &o.endpoints, &o.slots),
        None => assign_slots(&usable, &[], &[]),
    };
    SlotBlock {
        set: set.for_slots(slots.len() as u32),
        base,
        endpoints: usable,
        slots,
        target_port,
    }
}

/// The elements, slot blocks and chains for port `p` of `svc` with `backends` (all nodes,
/// sorted, of the table's family); `prev` is what was applied for this port, so large slot
/// tables stay stable. Nothing for a service without a cluster IP of the table's family.
pub fn port_rules(
    svc: &Service,
    p: &ServicePort,
    backends: &[Backend],
    ctx: &NodeContext,
    prev: Option<&PortRules>,
) -> PortRules {
    let mut out = PortRules::default();
    let Some(vip) = svc.cluster_ip_of(ctx.family.ip_family()) else {
        return out;
    };
    let proto = p.protocol.number();
    let key = KeyBuilder::new().ip(vip).proto(proto).port(p.port);
    let affinity = svc.session_affinity == SessionAffinity::ClientIp && ctx.family.has_affinity();
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
        let ips: Vec<IpAddr> = backends.iter().map(|b| b.ip).collect();
        let block = slot_block(
            SetName::Backends,
            key.clone().into(),
            ips,
            p.target_port,
            prev,
        );
        let chain = DynChain::Cluster {
            n: block.len() as u32,
            affinity,
        };
        out.elements.push(Element {
            set: SetName::ServiceIps,
            key: key.clone().into(),
            data: Data::Goto(Target::Dyn(chain)),
        });
        out.chains.insert(chain);
        out.blocks.push(block);
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
        let usable: Vec<IpAddr> = backends
            .iter()
            .filter(|b| !local || b.node.as_deref() == Some(ctx.node.as_str()))
            .map(|b| b.ip)
            .collect();
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
            let block = slot_block(
                SetName::NodePortBackends,
                nkey.clone().into(),
                usable,
                p.target_port,
                prev,
            );
            let chain = DynChain::NodePort {
                n: block.len() as u32,
                affinity,
                local,
            };
            out.elements.push(Element {
                set: SetName::ServiceNodePorts,
                key: nkey.clone().into(),
                data: Data::Goto(Target::Dyn(chain)),
            });
            out.chains.insert(chain);
            out.blocks.push(block);
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
pub fn hairpin_element(ip: IpAddr) -> Element {
    Element {
        set: SetName::Hairpin,
        key: KeyBuilder::new().ip(ip).ip(ip).into(),
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
        net.network().to_string().replace(['.', ':'], "_"),
        net.prefix(),
        svc.network().to_string().replace(['.', ':'], "_"),
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

/// The chains a table is built with: every load-balancing kind for every modulus of
/// [`moduli`] (fixed: 6 kinds × 30 moduli), plus one affinity recorder per timeout in use.
/// Load-balancing chains can only be created together with the maps they use (nft 1.0.6
/// rejects `add rule … numgen … map @backends` on an existing table with "conflicting
/// protocols specified: ip vs. th"), which is why their family is fixed and covers every
/// endpoint count; affinity recorders can be added to a live table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Structure {
    /// Affinity timeouts with recorder chains.
    pub timeouts: BTreeSet<u32>,
}

impl Structure {
    /// The structure holding the recorders `chains` need.
    pub fn for_chains(chains: &BTreeSet<DynChain>) -> Structure {
        Structure {
            timeouts: chains
                .iter()
                .filter_map(|c| match *c {
                    DynChain::AffinityRecord { timeout } => Some(timeout),
                    _ => None,
                })
                .collect(),
        }
    }

    /// Every dynamic chain of this structure.
    pub fn chains(&self) -> BTreeSet<DynChain> {
        let mut out = BTreeSet::new();
        for n in moduli() {
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

    /// The chains in `needed` that this structure lacks.
    pub fn missing(&self, needed: &BTreeSet<DynChain>) -> BTreeSet<DynChain> {
        needed
            .iter()
            .filter(|c| match **c {
                DynChain::Cluster { n, .. } | DynChain::NodePort { n, .. } => {
                    !moduli().any(|m| m == n)
                }
                DynChain::AffinityRecord { timeout } => !self.timeouts.contains(&timeout),
            })
            .copied()
            .collect()
    }

    /// Recovers the structure from the chain names of an existing table.
    pub fn from_chain_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Structure {
        let mut timeouts = BTreeSet::new();
        for n in names {
            if let Some(DynChain::AffinityRecord { timeout }) = parse_dyn_chain(n) {
                timeouts.insert(timeout);
            }
        }
        Structure { timeouts }
    }
}

/// A script adding the affinity recorder `c` to the live `table` (`nft -f`, one transaction).
pub fn add_recorder_script(table: &str, c: &DynChain, ctx: &NodeContext) -> String {
    let family = ctx.family.nft();
    let mut s = format!("add chain {family} {table} {}\n", c.name());
    for r in c.rules(ctx) {
        let _ = writeln!(s, "add rule {family} {table} {} {r}", c.name());
    }
    s
}

/// A script deleting the unused chain `c` from `table` of `family`.
pub fn delete_chain_script(family: Family, table: &str, c: &DynChain) -> String {
    format!("delete chain {} {table} {}\n", family.nft(), c.name())
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
    let (family, ip, lo) = (ctx.family.nft(), ctx.family.nft(), ctx.family.loopback());
    // The cluster DNS address is a local address of every node, answered by tartand, not
    // a service: never refused.
    let dns_exempt = match ctx.service_cidr {
        IpNetwork::V4(c) => crate::model::service::cluster_dns_ip(c)
            .map(|a| format!("\n\t\tip daddr {a} return"))
            .unwrap_or_default(),
        IpNetwork::V6(_) => String::new(),
    };
    let mut s = format!(
        r#"table {family} {table}
delete table {family} {table}
table {family} {table} {{
	comment "{tag}"
	map service_ips {{ typeof {ip} daddr . meta l4proto . th dport : verdict; }}
	map service_nodeports {{ typeof meta l4proto . th dport : verdict; }}
	map backends {{ typeof {ip} daddr . meta l4proto . th dport . numgen {numgen} mod 1 : {ip} daddr . th dport; counter; }}
	map nodeport_backends {{ typeof meta l4proto . th dport . numgen {numgen} mod 1 : {ip} daddr . th dport; counter; }}
	map big_backends {{ typeof {ip} daddr . meta l4proto . th dport . numgen {numgen} mod 1 : {ip} daddr . th dport; }}
	map big_nodeport_backends {{ typeof meta l4proto . th dport . numgen {numgen} mod 1 : {ip} daddr . th dport; }}
	set no_endpoints {{ typeof {ip} daddr . meta l4proto . th dport; counter; }}
	set no_endpoint_nodeports {{ typeof meta l4proto . th dport; counter; }}
	map affinity_services {{ typeof {ip} daddr . meta l4proto . th dport : verdict; }}
	map affinity_nodeports {{ typeof meta l4proto . th dport : verdict; }}
	map affinity {{ typeof {ip} saddr . {ip} daddr . meta l4proto . th dport : {ip} daddr . th dport; size 1048576; flags dynamic,timeout; timeout 3h; }}
	set hairpin {{ typeof {ip} saddr . {ip} daddr; }}
	chain {marker} {{
	}}
	chain services {{
		{ip} daddr . meta l4proto . th dport vmap @service_ips{dns_exempt}
		{ip} daddr {svc_cidr} goto cluster_ip_refused
		{ip} daddr != {lo} fib daddr type local meta l4proto . th dport vmap @service_nodeports
		{ip} daddr != {lo} fib daddr type local meta l4proto . th dport @no_endpoint_nodeports goto refuse
	}}
	chain cluster_ip_refused {{
		{ip} daddr . meta l4proto . th dport @no_endpoints goto refuse
		goto refuse
	}}
	chain refuse {{
		meta l4proto {{ tcp, udp }} redirect to :{REFUSE_PORT}
	}}
	chain affinity_record {{
		meta l4proto {{ tcp, udp }} ct original {ip} daddr . meta l4proto . ct original proto-dst vmap @affinity_services
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
pub fn activate_script(family: Family, table: &str, old: Option<&str>) -> String {
    let ip = family.nft();
    let family = family.nft();
    let mut s = format!(
        r#"add chain {family} {table} nat_prerouting {{ type nat hook prerouting priority -100; policy accept; }}
add rule {family} {table} nat_prerouting jump services
add chain {family} {table} nat_output {{ type nat hook output priority -100; policy accept; }}
add rule {family} {table} nat_output jump services
add chain {family} {table} nat_postrouting {{ type nat hook postrouting priority 100; policy accept; }}
add rule {family} {table} nat_postrouting ct status dnat jump affinity_record
add rule {family} {table} nat_postrouting meta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} masquerade fully-random
add rule {family} {table} nat_postrouting ct status dnat {ip} saddr . {ip} daddr @hairpin masquerade fully-random
"#
    );
    if let Some(o) = old {
        let _ = writeln!(s, "delete table {family} {o}");
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
            SetName::Backends | SetName::BigBackends => &[Ip, Proto, Port, Slot],
            SetName::NodePortBackends | SetName::BigNodePortBackends => &[Proto, Port, Slot],
            SetName::Hairpin => &[Ip, Ip],
        }
    }

    /// The set with this nft name.
    pub fn from_name(name: &str) -> Option<SetName> {
        SetName::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

fn render_fields(bytes: &[u8], fields: &[Field]) -> String {
    // Every field but an address takes one 4-byte register; the addresses share the rest
    // (4 bytes each in the `ip` table, 16 in `ip6`).
    let ips = fields.iter().filter(|f| **f == Field::Ip).count();
    let others = 4 * (fields.len() - ips);
    let ip_len = if ips > 0 && bytes.len() >= others + 16 * ips {
        16
    } else {
        4
    };
    let mut parts = Vec::new();
    let mut rest = bytes;
    for f in fields {
        let width = if *f == Field::Ip { ip_len } else { 4 };
        let (chunk, tail) = rest.split_at(width.min(rest.len()));
        rest = tail;
        let b = |i: usize| chunk.get(i).copied().unwrap_or(0);
        parts.push(match f {
            Field::Ip if ip_len == 16 => {
                let mut o = [0u8; 16];
                for (i, x) in o.iter_mut().enumerate() {
                    *x = b(i);
                }
                Ipv6Addr::from(o).to_string()
            }
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
            out.insert((svc.id(), i), port_rules(svc, p, backends, ctx, None));
        }
    }
    out
}

#[cfg(test)]
mod tests;
