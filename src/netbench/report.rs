//! The netbench report: per-path summaries, ratios to the underlay floor and to flannel,
//! the hop breakdown (which figures are measured and which derived), the service-scale
//! results, and their text and JSON forms. Building a report is pure.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::stats::{Summary, paired_ratio};

/// Everything measured on one path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathResult {
    /// Stable id.
    pub id: String,
    /// Description.
    pub label: String,
    /// `underlay`, `tartan` or `flannel`.
    pub dataplane: String,
    /// The flannel path this one is compared with.
    pub reference: Option<String>,
    /// An IPv6 path: its "underlay" ratio is to the IPv6 underlay, and its IPv4 twin is the
    /// path of the same id without `-ipv6`.
    #[serde(default)]
    pub ipv6: bool,
    /// TCP request/response on a kept connection.
    pub tcp_rr: Summary,
    /// Cumulative distribution of the TCP request/response latency: (fraction, µs).
    pub tcp_rr_cdf: Vec<(f64, f64)>,
    /// UDP request/response.
    pub udp_rr: Summary,
    /// Kernel receive timestamp → application, for the UDP replies (directly measured).
    pub udp_delivery: Option<Summary>,
    /// New TCP connection: connect until the first byte.
    pub new_conn: Summary,
    /// Single-flow TCP throughput, one value per throughput round (Gbit/s).
    pub throughput_gbps: Vec<f64>,
    /// Paired (per-round) ratios of this path's medians to the underlay's.
    pub ratio_to_underlay: Ratios,
    /// Paired ratios to the flannel reference path, when there is one.
    pub ratio_to_reference: Option<Ratios>,
}

/// Ratios of medians, taken round by round and then their median.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ratios {
    /// TCP request/response.
    pub tcp_rr: Option<f64>,
    /// UDP request/response.
    pub udp_rr: Option<f64>,
    /// New connections.
    pub new_conn: Option<f64>,
    /// Throughput (median over throughput rounds).
    pub throughput: Option<f64>,
}

/// One step of the hop waterfall.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hop {
    /// What the step is.
    pub hop: String,
    /// Added round-trip latency (µs, TCP request/response medians).
    pub added_us: f64,
    /// True when measured on its own path, false when derived as a difference of paths.
    pub measured: bool,
    /// How it was obtained.
    pub how: String,
}

/// New-connection latency through a cluster IP for one table size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScaleResult {
    /// `tartan` or `linear`.
    pub table: String,
    /// Number of services in the table.
    pub services: u32,
    /// Seconds to program the table.
    pub load_seconds: f64,
    /// New connections (connect → first byte).
    pub new_conn: Summary,
    /// Paired ratio of medians to the 1-service table of the same kind.
    pub ratio_to_one: Option<f64>,
}

/// Facts about the machine the run happened on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// `uname -r`.
    pub kernel: String,
    /// CPU model.
    pub cpu: String,
    /// CPUs online.
    pub cpus: usize,
    /// Host name.
    pub hostname: String,
}

impl Machine {
    /// Reads the current machine's facts.
    pub fn current() -> Machine {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        Machine {
            kernel,
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// tartan version.
    pub version: String,
    /// When the run started (RFC 3339, UTC).
    pub started: String,
    /// Seconds the run took.
    pub duration_s: f64,
    /// The machine.
    pub machine: Machine,
    /// The settings used.
    pub settings: serde_json::Value,
    /// Per path.
    pub paths: Vec<PathResult>,
    /// The hop waterfall of the pod → ClusterIP → remote pod path.
    pub hops: Vec<Hop>,
    /// Service-scale results.
    pub services: Vec<ScaleResult>,
    /// Median of the paths' noise (spread of per-round medians, %).
    pub noise_pct: Option<f64>,
}

fn find<'a>(paths: &'a [PathResult], id: &str) -> Option<&'a PathResult> {
    paths.iter().find(|p| p.id == id)
}

/// Fills in ratios to the underlay and to the reference paths (paired by round).
pub fn add_ratios(paths: &mut [PathResult]) {
    let snapshot = paths.to_vec();
    let ratios = |a: &PathResult, b: &PathResult| Ratios {
        tcp_rr: paired_ratio(&a.tcp_rr.round_medians_us, &b.tcp_rr.round_medians_us),
        udp_rr: paired_ratio(&a.udp_rr.round_medians_us, &b.udp_rr.round_medians_us),
        new_conn: paired_ratio(&a.new_conn.round_medians_us, &b.new_conn.round_medians_us),
        throughput: paired_ratio(&a.throughput_gbps, &b.throughput_gbps),
    };
    for p in paths.iter_mut() {
        let floor = if p.ipv6 { "underlay-ipv6" } else { "underlay" };
        if let Some(u) = find(&snapshot, floor) {
            p.ratio_to_underlay = ratios(p, u);
        }
        if let Some(r) = p
            .reference
            .clone()
            .and_then(|id| find(&snapshot, &id).cloned())
        {
            p.ratio_to_reference = Some(ratios(p, &r));
        }
    }
}

/// The hop waterfall of pod → ClusterIP → pod on another node, from TCP request/response
/// medians (paired per round). Each step adds to the previous ones; the steps sum to the
/// full path.
pub fn hop_breakdown(paths: &[PathResult]) -> Vec<Hop> {
    let med = |id: &str| find(paths, id).map(|p| p.tcp_rr.round_medians_us.clone());
    let diff = |a: &str, b: &str| -> Option<f64> {
        let (x, y) = (med(a)?, med(b)?);
        let mut d: Vec<f64> = x.iter().zip(&y).map(|(p, q)| p - q).collect();
        if d.is_empty() {
            return None;
        }
        d.sort_by(f64::total_cmp);
        Some(d[d.len() / 2])
    };
    let p50 = |id: &str| find(paths, id).map(|p| p.tcp_rr.p50_us);
    let mut hops = Vec::new();
    let (Some(floor), Some(attach), Some(underlay), Some(direct), Some(vxlan), Some(nat)) = (
        p50("loopback"),
        diff("pod-node", "loopback"),
        diff("underlay", "loopback"),
        diff("pod-cross-direct", "underlay"),
        diff("pod-cross-vxlan", "pod-cross-direct"),
        diff("pod-clusterip", "pod-cross-vxlan"),
    ) else {
        return hops;
    };
    hops.push(Hop {
        hop: "sockets and TCP stack (both ends, loopback)".into(),
        added_us: floor,
        measured: true,
        how: "loopback path".into(),
    });
    hops.push(Hop {
        hop: "underlay: node eth0 veth -> bridge -> veth, both ways".into(),
        added_us: underlay,
        measured: false,
        how: "underlay - loopback".into(),
    });
    // direct = (pod-cross-direct - underlay): two pod attachments plus two route lookups.
    let routing = direct - 2.0 * attach;
    hops.push(Hop {
        hop: "client pod veth + node bridge, both ways".into(),
        added_us: attach,
        measured: false,
        how: "pod->node - loopback".into(),
    });
    hops.push(Hop {
        hop: "route lookups on both nodes (L3 forwarding)".into(),
        added_us: routing,
        measured: false,
        how: "pod->pod DirectRouting - underlay - 2 x pod attachment".into(),
    });
    hops.push(Hop {
        hop: "server pod veth + node bridge, both ways".into(),
        added_us: attach,
        measured: false,
        how: "assumed equal to the client side".into(),
    });
    hops.push(Hop {
        hop: "VXLAN encapsulation + decapsulation".into(),
        added_us: vxlan,
        measured: false,
        how: "pod->pod VXLAN - pod->pod DirectRouting".into(),
    });
    hops.push(Hop {
        hop: "service NAT (conntrack, kept connection)".into(),
        added_us: nat,
        measured: false,
        how: "pod->ClusterIP->pod - pod->pod VXLAN".into(),
    });
    hops
}

/// Median of the paths' noise figures.
pub fn overall_noise(paths: &[PathResult]) -> Option<f64> {
    let mut v: Vec<f64> = paths.iter().filter_map(|p| p.tcp_rr.noise_pct).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |x| format!("{x:.2}x"))
}

/// The IPv6 paths against their IPv4 twins (the same id without `-ipv6`), paired per round.
fn ipv6_against_ipv4(o: &mut String, paths: &[PathResult]) {
    let pairs: Vec<(&PathResult, &PathResult)> = paths
        .iter()
        .filter(|p| p.ipv6)
        .filter_map(|p| Some((p, find(paths, p.id.strip_suffix("-ipv6")?)?)))
        .collect();
    if pairs.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "\nIPv6 against IPv4 on the same path (x IPv4, paired per round; throughput median):"
    );
    let _ = writeln!(
        o,
        "{:<44} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9}",
        "path", "TCP p50", "IPv4", "x IPv4", "new conn", "x IPv4", "Gbit x4"
    );
    for (six, four) in pairs {
        let r = |a: &Summary, b: &Summary| {
            ratio(paired_ratio(&a.round_medians_us, &b.round_medians_us))
        };
        let _ = writeln!(
            o,
            "{:<44} {:>8.1} {:>8.1} {:>8} {:>9.1} {:>9} {:>9}",
            six.label,
            six.tcp_rr.p50_us,
            four.tcp_rr.p50_us,
            r(&six.tcp_rr, &four.tcp_rr),
            six.new_conn.p50_us,
            r(&six.new_conn, &four.new_conn),
            ratio(paired_ratio(&six.throughput_gbps, &four.throughput_gbps)),
        );
    }
}

/// The report as text tables.
pub fn render_text(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "netbench {} on {} ({} CPUs, kernel {}), {:.0} s",
        r.version, r.machine.cpu, r.machine.cpus, r.machine.kernel, r.duration_s
    );
    let _ = writeln!(
        o,
        "\nRequest/response latency on a kept connection, 1 byte (µs; ratios are paired per round):"
    );
    let _ = writeln!(
        o,
        "{:<44} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8}",
        "path", "TCP p50", "p90", "p99", "p99.9", "UDP p50", "x underl", "x flannel", "noise"
    );
    for p in &r.paths {
        let _ = writeln!(
            o,
            "{:<44} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>9} {:>9} {:>7}",
            p.label,
            p.tcp_rr.p50_us,
            p.tcp_rr.p90_us,
            p.tcp_rr.p99_us,
            p.tcp_rr.p999_us,
            p.udp_rr.p50_us,
            ratio(p.ratio_to_underlay.tcp_rr),
            ratio(p.ratio_to_reference.as_ref().and_then(|x| x.tcp_rr)),
            p.tcp_rr
                .noise_pct
                .map_or_else(|| "-".into(), |n| format!("{n:.0}%"))
        );
    }
    let _ = writeln!(
        o,
        "\nNew connections (connect -> first byte, µs) and single-flow TCP throughput:"
    );
    let _ = writeln!(
        o,
        "{:<44} {:>8} {:>8} {:>8} {:>9} {:>9} {:>10} {:>9}",
        "path", "p50", "p90", "p99", "x underl", "x flannel", "Gbit/s", "x underl"
    );
    for p in &r.paths {
        let mut t = p.throughput_gbps.clone();
        t.sort_by(f64::total_cmp);
        let tp = t.get(t.len() / 2).copied();
        let _ = writeln!(
            o,
            "{:<44} {:>8.1} {:>8.1} {:>8.1} {:>9} {:>9} {:>10} {:>9}",
            p.label,
            p.new_conn.p50_us,
            p.new_conn.p90_us,
            p.new_conn.p99_us,
            ratio(p.ratio_to_underlay.new_conn),
            ratio(p.ratio_to_reference.as_ref().and_then(|x| x.new_conn)),
            tp.map_or_else(|| "-".into(), |x| format!("{x:.2}")),
            ratio(p.ratio_to_underlay.throughput)
        );
    }
    ipv6_against_ipv4(&mut o, &r.paths);
    if let Some(d) = r
        .paths
        .iter()
        .find(|p| p.id == "pod-cross-vxlan")
        .and_then(|p| p.udp_delivery.as_ref())
    {
        let _ = writeln!(
            o,
            "\nMeasured directly (SO_TIMESTAMPNS): a UDP reply spends p50 {:.1} µs between the kernel receiving it and the application reading it.",
            d.p50_us
        );
    }
    if !r.hops.is_empty() {
        let total: f64 = r.hops.iter().map(|h| h.added_us).sum();
        let _ = writeln!(
            o,
            "\nWhere the round trip of pod -> ClusterIP -> pod on another node goes (µs, TCP p50; * = measured, others derived):"
        );
        let mut acc = 0.0;
        for h in &r.hops {
            acc += h.added_us;
            let _ = writeln!(
                o,
                "  {:>7.1}  {:>7.1}  {}{}   [{}]",
                h.added_us,
                acc,
                if h.measured { "* " } else { "  " },
                h.hop,
                h.how
            );
        }
        let _ = writeln!(o, "  {total:>7.1}           total");
    }
    if !r.services.is_empty() {
        let _ = writeln!(
            o,
            "\nNew-connection latency through a ClusterIP as the number of services grows (µs):"
        );
        let _ = writeln!(
            o,
            "{:<10} {:>9} {:>9} {:>9} {:>9} {:>12} {:>9}",
            "table", "services", "p50", "p90", "p99", "x 1 service", "load s"
        );
        for s in &r.services {
            let _ = writeln!(
                o,
                "{:<10} {:>9} {:>9.1} {:>9.1} {:>9.1} {:>12} {:>9.2}",
                s.table,
                s.services,
                s.new_conn.p50_us,
                s.new_conn.p90_us,
                s.new_conn.p99_us,
                s.ratio_to_one
                    .map_or_else(|| "-".into(), |x| format!("{x:.3}")),
                s.load_seconds
            );
        }
    }
    if let Some(n) = r.noise_pct {
        let _ = writeln!(
            o,
            "\nNoise: per-round medians of a path spread by {n:.0}% (median over paths of (p90 - p10) / median); differences below that are not findings."
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netbench::stats::Samples;
    use std::time::Duration;

    fn summary(rounds: &[f64]) -> Summary {
        let mut s = Samples::new();
        for r in rounds {
            s.next_round();
            for _ in 0..10 {
                s.record(Duration::from_nanos((r * 1000.0) as u64));
            }
        }
        s.summary()
    }

    fn path(id: &str, rr: &[f64], reference: Option<&str>) -> PathResult {
        PathResult {
            id: id.into(),
            label: id.into(),
            dataplane: "tartan".into(),
            reference: reference.map(str::to_string),
            ipv6: id.ends_with("-ipv6"),
            tcp_rr: summary(rr),
            tcp_rr_cdf: vec![(0.5, rr[0])],
            udp_rr: summary(rr),
            udp_delivery: None,
            new_conn: summary(rr),
            throughput_gbps: vec![10.0, 10.0, 10.0],
            ratio_to_underlay: Ratios::default(),
            ratio_to_reference: None,
        }
    }

    fn paths() -> Vec<PathResult> {
        vec![
            path("loopback", &[10.0, 10.0, 10.0], None),
            path("underlay", &[20.0, 20.0, 20.0], None),
            path("pod-node", &[14.0, 14.0, 14.0], None),
            path("pod-cross-direct", &[32.0, 32.0, 32.0], None),
            path(
                "pod-cross-vxlan",
                &[40.0, 40.0, 40.0],
                Some("flannel-pod-cross"),
            ),
            path("pod-clusterip", &[41.0, 41.0, 41.0], None),
            path("flannel-pod-cross", &[44.0, 44.0, 44.0], None),
        ]
    }

    #[test]
    fn ratios_are_paired_and_referenced() {
        let mut p = paths();
        add_ratios(&mut p);
        let v = p.iter().find(|x| x.id == "pod-cross-vxlan").unwrap();
        assert_eq!(v.ratio_to_underlay.tcp_rr, Some(2.0));
        let r = v.ratio_to_reference.as_ref().unwrap().tcp_rr.unwrap();
        assert!((r - 40.0 / 44.0).abs() < 1e-6);
        assert_eq!(v.ratio_to_underlay.throughput, Some(1.0));
    }

    #[test]
    fn ipv6_paths_take_the_ipv6_floor_and_face_their_ipv4_twin() {
        let mut p = paths();
        p.push(path("underlay-ipv6", &[25.0, 25.0, 25.0], None));
        p.push(path("pod-cross-vxlan-ipv6", &[50.0, 50.0, 50.0], None));
        add_ratios(&mut p);
        let v = p.iter().find(|x| x.id == "pod-cross-vxlan-ipv6").unwrap();
        assert_eq!(v.ratio_to_underlay.tcp_rr, Some(2.0));
        let v4 = p.iter().find(|x| x.id == "pod-cross-vxlan").unwrap();
        assert_eq!(v4.ratio_to_underlay.tcp_rr, Some(2.0));
        let mut o = String::new();
        ipv6_against_ipv4(&mut o, &p);
        assert!(
            o.contains("pod-cross-vxlan-ipv6") && o.contains("1.25x"),
            "{o}"
        );
        let mut none = String::new();
        ipv6_against_ipv4(&mut none, &paths());
        assert!(none.is_empty());
    }

    #[test]
    fn waterfall_sums_to_the_full_path() {
        let hops = hop_breakdown(&paths());
        assert_eq!(hops.len(), 7);
        let total: f64 = hops.iter().map(|h| h.added_us).sum();
        assert!((total - 41.0).abs() < 0.5, "{total} {hops:?}");
        assert!(hops[0].measured);
        assert!(hops[1..].iter().all(|h| !h.measured));
        let vx = hops.iter().find(|h| h.hop.contains("VXLAN")).unwrap();
        assert!((vx.added_us - 8.0).abs() < 0.1);
    }

    #[test]
    fn missing_paths_give_no_waterfall() {
        assert!(hop_breakdown(&paths()[..3]).is_empty());
    }

    #[test]
    fn text_and_json() {
        let mut p = paths();
        add_ratios(&mut p);
        let r = Report {
            version: "x".into(),
            started: "now".into(),
            duration_s: 1.0,
            machine: Machine::current(),
            settings: serde_json::json!({"rounds": 3}),
            hops: hop_breakdown(&p),
            noise_pct: overall_noise(&p),
            paths: p,
            services: vec![ScaleResult {
                table: "tartan".into(),
                services: 1000,
                load_seconds: 0.1,
                new_conn: summary(&[50.0, 50.0, 50.0]),
                ratio_to_one: Some(1.01),
            }],
        };
        let t = render_text(&r);
        assert!(t.contains("pod-cross-vxlan"));
        assert!(t.contains("VXLAN encapsulation"));
        assert!(t.contains("1.010"));
        let j = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&j).unwrap();
        assert_eq!(back.paths.len(), 7);
    }
}
