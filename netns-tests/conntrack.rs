//! Conntrack deletes over ctnetlink (`kernel::conntrack`) against the real kernel: UDP flows
//! DNATed inside a namespace of their own, some deleted by the filters the service proxy
//! uses, checked with the `conntrack` tool, which must still list the unrelated ones.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tartan::kernel::conntrack::{ConntrackSocket, CtEntry, CtFilter, IPPROTO_UDP};
use tartan::lab::{ScratchNs, in_netns, ip, ns_run, require_root};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const OTHER_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const OTHER_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);

/// Two "services" on port 53 DNATed to their backends on 5353, as the service table would.
const NAT: &str = r#"table ip t {
  chain out {
    type nat hook output priority -100;
    ip daddr 10.96.0.10 udp dport 53 dnat to 10.244.1.10:5353
    ip daddr 10.96.0.11 udp dport 53 dnat to 10.244.1.11:5353
  }
}
"#;

/// UDP echo servers on `servers`; one request from a fresh client socket to each of
/// `targets`, answered. Returns the clients' ports, in the order of `targets`.
fn udp_flows<A: Into<SocketAddr> + Copy + std::fmt::Display>(
    servers: &[A],
    targets: &[A],
) -> Result<Vec<u16>> {
    let listeners = servers
        .iter()
        .map(|a| {
            let s = UdpSocket::bind((*a).into()).with_context(|| format!("binding {a}"))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok(s)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut ports = Vec::new();
    for t in targets {
        let t: SocketAddr = (*t).into();
        let c = if t.is_ipv6() {
            UdpSocket::bind("[::]:0")?
        } else {
            UdpSocket::bind("0.0.0.0:0")?
        };
        c.set_read_timeout(Some(Duration::from_secs(2)))?;
        c.send_to(b"q", t)?;
        let mut buf = [0u8; 16];
        let mut served = false;
        for l in &listeners {
            l.set_nonblocking(true)?;
            if let Ok((_, from)) = l.recv_from(&mut buf) {
                l.send_to(b"a", from)?;
                served = true;
            }
            l.set_nonblocking(false)?;
        }
        ensure!(served, "no server got the request to {t}");
        c.recv_from(&mut buf)
            .with_context(|| format!("no answer through {t}"))?;
        ports.push(c.local_addr()?.port());
    }
    Ok(ports)
}

/// `conntrack -L -p udp` lines inside `ns` that go to `dst:dport` and come from `sport`.
fn listed(ns: &ScratchNs, dst: impl Into<IpAddr>, dport: u16, sport: u16) -> Result<usize> {
    let dst: IpAddr = dst.into();
    let family = if dst.is_ipv6() { "ipv6" } else { "ipv4" };
    let out = ns_run(ns.name(), "conntrack", &["-L", "-f", family, "-p", "udp"])?;
    let want_dst = format!("dst={dst} ");
    let want_ports = format!("sport={sport} dport={dport} ");
    Ok(out
        .lines()
        .filter(|l| {
            // The original direction comes first on each line.
            let orig = l.split("src=").take(2).collect::<Vec<_>>().join("src=");
            orig.contains(&want_dst) && orig.contains(&want_ports)
        })
        .count())
}

#[test]
fn udp_flows_to_a_backend_are_deleted_and_others_stay() -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    let ns = ScratchNs::new("ct")?;
    for a in [VIP, OTHER_VIP, BACKEND, OTHER_BACKEND] {
        ip(&[
            "-n",
            ns.name(),
            "addr",
            "add",
            &format!("{a}/32"),
            "dev",
            "lo",
        ])?;
    }
    ns.nft_load(NAT)?;
    let servers = [
        SocketAddrV4::new(BACKEND, 5353),
        SocketAddrV4::new(OTHER_BACKEND, 5353),
        SocketAddrV4::new(VIP, 54),
    ];
    let targets = [
        SocketAddrV4::new(VIP, 53),
        SocketAddrV4::new(VIP, 53),
        SocketAddrV4::new(OTHER_VIP, 53),
        SocketAddrV4::new(VIP, 54),
    ];
    let ports = in_netns(ns.name(), move || udp_flows(&servers, &targets))??;
    let (gone, other_service, other_port) = ([ports[0], ports[1]], ports[2], ports[3]);
    for p in gone {
        ensure!(
            listed(&ns, VIP, 53, p)? == 1,
            "flow from port {p} not in conntrack"
        );
    }
    ensure!(listed(&ns, OTHER_VIP, 53, other_service)? == 1);
    ensure!(listed(&ns, VIP, 54, other_port)? == 1);

    // The dump sees the DNATed flows with the backend as reply source.
    let entries: Vec<CtEntry> = in_netns(ns.name(), || ConntrackSocket::open()?.list())??;
    let to_backend: Vec<CtEntry> = entries
        .iter()
        .filter(|e| e.orig.protocol == IPPROTO_UDP && e.reply.src == BACKEND)
        .cloned()
        .collect();
    ensure!(
        to_backend.len() == 2 && to_backend.iter().all(|e| e.orig.dst == VIP),
        "dumped: {entries:?}"
    );

    // The backend leaves: its flows to the service go, the rest stays.
    let filter = CtFilter::udp()
        .orig_dst(VIP)
        .orig_dst_port(53)
        .reply_src(BACKEND);
    let n = in_netns(ns.name(), move || {
        ConntrackSocket::open()?.delete_matching(&[filter])
    })??;
    ensure!(n == 2, "{n} entries deleted, 2 expected");
    for p in gone {
        ensure!(listed(&ns, VIP, 53, p)? == 0, "flow from port {p} survived");
    }
    ensure!(
        listed(&ns, OTHER_VIP, 53, other_service)? == 1,
        "unrelated flow deleted"
    );
    ensure!(
        listed(&ns, VIP, 54, other_port)? == 1,
        "unrelated flow deleted"
    );

    // Entries already gone are no error.
    let again = in_netns(ns.name(), move || {
        ConntrackSocket::open()?.delete(&to_backend)
    })??;
    ensure!(again == 0, "{again} entries deleted twice");

    // A port that got its first endpoint: every flow to it goes (no reply source given).
    let n = in_netns(ns.name(), || {
        ConntrackSocket::open()?.delete_matching(&[CtFilter::udp().orig_dst(VIP).orig_dst_port(54)])
    })??;
    ensure!(n == 1, "{n} entries deleted, 1 expected");
    ensure!(listed(&ns, VIP, 54, other_port)? == 0);
    ensure!(
        listed(&ns, OTHER_VIP, 53, other_service)? == 1,
        "unrelated flow deleted"
    );
    Ok(())
}

/// The IPv6 twin of [`NAT`]: one service on port 53 DNATed to its backend on 5353.
const NAT6: &str = r#"table ip6 t {
  chain out {
    type nat hook output priority -100;
    ip6 daddr fd00:96::a udp dport 53 dnat to [fd00:10:244:1::a]:5353
  }
}
"#;

#[test]
fn ipv6_udp_flows_to_a_backend_are_deleted_and_ipv4_ones_stay() -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    let ns = ScratchNs::new("ct6")?;
    let vip6: Ipv6Addr = "fd00:96::a".parse()?;
    let backend6: Ipv6Addr = "fd00:10:244:1::a".parse()?;
    for a in [vip6, backend6] {
        ip(&[
            "-n",
            ns.name(),
            "addr",
            "add",
            &format!("{a}/128"),
            "dev",
            "lo",
            "nodad",
        ])?;
    }
    for a in [VIP, BACKEND] {
        ip(&[
            "-n",
            ns.name(),
            "addr",
            "add",
            &format!("{a}/32"),
            "dev",
            "lo",
        ])?;
    }
    ns.nft_load(NAT)?;
    ns.nft_load(NAT6)?;
    let v6 = [SocketAddr::from((backend6, 5353))];
    let v6_targets = [SocketAddr::from((vip6, 53)), SocketAddr::from((vip6, 53))];
    let ports6 = in_netns(ns.name(), move || udp_flows(&v6, &v6_targets))??;
    let v4 = [SocketAddrV4::new(BACKEND, 5353)];
    let v4_targets = [SocketAddrV4::new(VIP, 53)];
    let ports4 = in_netns(ns.name(), move || udp_flows(&v4, &v4_targets))??;
    for p in &ports6 {
        ensure!(
            listed(&ns, vip6, 53, *p)? == 1,
            "IPv6 flow from {p} not listed"
        );
    }
    ensure!(listed(&ns, VIP, 53, ports4[0])? == 1);
    // The dump of the IPv6 family has the DNATed flows, the backend as reply source.
    let entries: Vec<CtEntry> =
        in_netns(ns.name(), || ConntrackSocket::open()?.list_family(true))??;
    ensure!(
        entries
            .iter()
            .filter(|e| e.orig.dst == IpAddr::V6(vip6) && e.reply.src == IpAddr::V6(backend6))
            .count()
            == 2,
        "dumped: {entries:?}"
    );
    // The backend leaves: its IPv6 flows go; the IPv4 flow (same ports, other family) stays.
    let filter = CtFilter::udp()
        .orig_dst(vip6)
        .orig_dst_port(53)
        .reply_src(backend6);
    let n = in_netns(ns.name(), move || {
        ConntrackSocket::open()?.delete_matching(&[filter])
    })??;
    ensure!(n == 2, "{n} entries deleted, 2 expected");
    for p in &ports6 {
        ensure!(
            listed(&ns, vip6, 53, *p)? == 0,
            "IPv6 flow from {p} survived"
        );
    }
    ensure!(
        listed(&ns, VIP, 53, ports4[0])? == 1,
        "the IPv4 flow was deleted"
    );
    // A node-port filter of one family leaves the other's flows alone.
    let n = in_netns(ns.name(), move || {
        ConntrackSocket::open()?
            .delete_matching(&[CtFilter::udp_of(IpAddr::V6(vip6)).orig_dst_port(53)])
    })??;
    ensure!(
        n == 0,
        "{n} deleted by an IPv6 port filter with no IPv6 flow left"
    );
    ensure!(listed(&ns, VIP, 53, ports4[0])? == 1);
    Ok(())
}
