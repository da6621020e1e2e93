//! A netbench run: build the cluster, measure every path in interleaved rounds, measure the
//! service table at several sizes, and assemble the report.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::probe::{new_conns, tcp_rr, throughput, udp_rr};
use super::report::{
    PathResult, Ratios, Report, ScaleResult, add_ratios, hop_breakdown, overall_noise,
};
use super::service_bed::{NatKind, ServiceBed, first_connections};
use super::stats::{Samples, paired_ratio};
use super::topology::{self, Topology};
use crate::lab::{Binaries, Lab, cleanup_on_signal};
use crate::proxy::rules::Balancing;

/// What to run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Settings {
    /// tartan VXLAN nodes (at least 2).
    pub nodes: usize,
    /// Interleaved rounds over all paths.
    pub rounds: usize,
    /// Request/response exchanges per path per round (TCP and UDP each).
    pub rr_per_round: usize,
    /// New connections per path per round.
    pub conns_per_round: usize,
    /// Throughput rounds (each path once per round).
    pub throughput_rounds: usize,
    /// Seconds per throughput measurement.
    pub throughput_secs: f64,
    /// Service-table sizes to measure (empty: skip).
    pub services: Vec<u32>,
    /// Interleaved rounds for the service-table sizes.
    pub scale_rounds: usize,
    /// New connections per table per scale round.
    pub scale_conns: usize,
    /// A dual-stack cluster with the IPv6 paths beside the IPv4 ones (skipped, with a note,
    /// on a kernel without IPv6).
    pub ipv6: bool,
    /// Leave the cluster up afterwards.
    pub keep: bool,
    /// Where the binaries are.
    #[serde(skip)]
    pub bin_dir: PathBuf,
    /// Show a progress bar.
    #[serde(skip)]
    pub progress: bool,
}

impl Settings {
    /// The default run (well under 90 s on 2 cores).
    pub fn standard(bin_dir: PathBuf) -> Settings {
        Settings {
            nodes: 2,
            rounds: 25,
            rr_per_round: 300,
            conns_per_round: 40,
            throughput_rounds: 3,
            throughput_secs: 0.5,
            services: vec![1, 1000, 10_000, 30_000],
            scale_rounds: 20,
            scale_conns: 40,
            ipv6: true,
            keep: false,
            bin_dir,
            progress: true,
        }
    }

    /// A short run (demo, tests).
    pub fn quick(bin_dir: PathBuf) -> Settings {
        Settings {
            rounds: 5,
            rr_per_round: 100,
            conns_per_round: 20,
            throughput_rounds: 1,
            throughput_secs: 0.3,
            services: vec![1, 1000],
            scale_rounds: 5,
            scale_conns: 20,
            ..Settings::standard(bin_dir)
        }
    }
}

/// UTC time as RFC 3339, without a date library.
fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

struct PathSamples {
    tcp: Samples,
    udp: Samples,
    delivery: Samples,
    conn: Samples,
    tput: Vec<f64>,
}

fn bar(total: u64, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(total);
    b.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b.enable_steady_tick(Duration::from_millis(200));
    b
}

/// Builds the cluster (returned so callers can show it), without measuring.
pub fn build_cluster(s: &Settings, pb: &ProgressBar) -> Result<Topology> {
    let lab = Lab::new(s.nodes, Binaries::in_dir(&s.bin_dir))?;
    let msg = |m: &str| pb.set_message(format!("setting up: {m}"));
    let ipv6 = s.ipv6 && kernel_has_ipv6();
    if s.ipv6 && !ipv6 {
        pb.println("netbench: this kernel has no IPv6; measuring the IPv4 paths only");
    }
    topology::build(lab, s.nodes, ipv6, &msg)
}

/// Whether the kernel has IPv6 (`/proc/net/if_inet6` exists).
fn kernel_has_ipv6() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

/// Measures `topo` and the service table; returns the report.
pub fn measure(
    s: &Settings,
    topo: &Topology,
    pb: &ProgressBar,
    started: Instant,
) -> Result<Report> {
    let started_at = rfc3339_now();
    let paths = &topo.paths;
    let mut samples: Vec<PathSamples> = paths
        .iter()
        .map(|_| PathSamples {
            tcp: Samples::new(),
            udp: Samples::new(),
            delivery: Samples::new(),
            conn: Samples::new(),
            tput: Vec::new(),
        })
        .collect();
    pb.set_length(
        (s.rounds + s.throughput_rounds) as u64 * paths.len() as u64
            + 2 * s.services.len() as u64
            + s.scale_rounds as u64,
    );
    for r in 0..s.rounds {
        let order: Vec<usize> = if r % 2 == 0 {
            (0..paths.len()).collect()
        } else {
            (0..paths.len()).rev().collect()
        };
        for i in order {
            let p = &paths[i];
            pb.set_message(format!("round {}/{}: {}", r + 1, s.rounds, p.id));
            let ps = &mut samples[i];
            ps.tcp.next_round();
            ps.udp.next_round();
            ps.delivery.next_round();
            ps.conn.next_round();
            for d in tcp_rr(&p.client, p.dst, p.ports[0], s.rr_per_round)
                .with_context(|| format!("TCP request/response on {}", p.id))?
            {
                ps.tcp.record(d);
            }
            for u in udp_rr(&p.client, p.dst, p.ports[1], s.rr_per_round)
                .with_context(|| format!("UDP request/response on {}", p.id))?
            {
                ps.udp.record(u.total);
                if let Some(d) = u.delivery {
                    ps.delivery.record(d);
                }
            }
            for d in new_conns(&p.client, p.dst, p.ports[2], s.conns_per_round)
                .with_context(|| format!("new connections on {}", p.id))?
            {
                ps.conn.record(d);
            }
            pb.inc(1);
        }
    }
    for r in 0..s.throughput_rounds {
        for (i, p) in paths.iter().enumerate() {
            pb.set_message(format!(
                "throughput {}/{}: {}",
                r + 1,
                s.throughput_rounds,
                p.id
            ));
            let g = throughput(&p.client, p.dst, p.ports[3], s.throughput_secs)
                .with_context(|| format!("throughput on {}", p.id))?;
            samples[i].tput.push(g);
            pb.inc(1);
        }
    }
    let services = if s.services.is_empty() {
        Vec::new()
    } else {
        scale(s, pb)?
    };
    let mut results: Vec<PathResult> = paths
        .iter()
        .zip(&samples)
        .map(|(p, ps)| PathResult {
            id: p.id.to_string(),
            label: p.label.to_string(),
            dataplane: serde_json::to_value(p.dataplane)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            reference: p.reference.map(str::to_string),
            ipv6: p.ipv6,
            tcp_rr: ps.tcp.summary(),
            tcp_rr_cdf: ps.tcp.cdf_us(),
            udp_rr: ps.udp.summary(),
            udp_delivery: (!ps.delivery.is_empty()).then(|| ps.delivery.summary()),
            new_conn: ps.conn.summary(),
            throughput_gbps: ps.tput.clone(),
            ratio_to_underlay: Ratios::default(),
            ratio_to_reference: None,
        })
        .collect();
    add_ratios(&mut results);
    Ok(Report {
        version: env!("CARGO_PKG_VERSION").to_string(),
        started: started_at,
        duration_s: started.elapsed().as_secs_f64(),
        machine: super::report::Machine::current(),
        settings: serde_json::to_value(s).unwrap_or_default(),
        hops: hop_breakdown(&results),
        noise_pct: overall_noise(&results),
        paths: results,
        services,
    })
}

/// New-connection latency through tartan's table and a linear chain at each size, interleaved.
fn scale(s: &Settings, pb: &ProgressBar) -> Result<Vec<ScaleResult>> {
    let mut kinds = Vec::new();
    for &n in &s.services {
        kinds.push(NatKind::Tartan {
            services: n.max(1),
            endpoints: 1,
            balancing: Balancing::RoundRobin,
        });
    }
    for &n in &s.services {
        kinds.push(NatKind::Linear { services: n.max(1) });
    }
    pb.set_message("service tables: programming");
    let bed = ServiceBed::new(&kinds)?;
    pb.inc(2 * s.services.len() as u64);
    let mut samples: Vec<Samples> = bed.variants.iter().map(|_| Samples::new()).collect();
    for r in 0..s.scale_rounds {
        pb.set_message(format!(
            "service tables: round {}/{}",
            r + 1,
            s.scale_rounds
        ));
        for i in bed.round_order(r) {
            let v = &bed.variants[i];
            samples[i].next_round();
            for (d, _) in first_connections(&v.client, v.target, s.scale_conns)? {
                samples[i].record(d);
            }
        }
        pb.inc(1);
    }
    let n = s.services.len();
    Ok(bed
        .variants
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let base = if i < n { 0 } else { n };
            let (table, services) = match v.kind {
                NatKind::Tartan { services, .. } => ("tartan", services),
                NatKind::Linear { services } => ("linear", services),
                NatKind::Tartan6 { services } => ("tartan-ipv6", services),
            };
            let sm = samples[i].summary();
            let bm = samples[base].summary();
            ScaleResult {
                table: table.into(),
                services,
                load_seconds: v.load_seconds,
                ratio_to_one: paired_ratio(&sm.round_medians_us, &bm.round_medians_us),
                new_conn: sm,
            }
        })
        .collect())
}

/// A whole run: build, measure, write the JSON/SVG files, tear down (unless `keep`).
pub fn run(
    s: &Settings,
    json: Option<&std::path::Path>,
    svg: Option<&std::path::Path>,
) -> Result<Report> {
    let started = Instant::now();
    // Before any thread exists (the progress bar's ticker is one): Ctrl-C must find them all
    // blocking the signal so the cleanup thread gets it.
    cleanup_on_signal(&format!("tt{}x", std::process::id()))?;
    let pb = bar(0, s.progress);
    let mut topo = build_cluster(s, &pb)?;
    let report = measure(s, &topo, &pb, started);
    pb.finish_and_clear();
    if s.keep {
        topo.lab.keep(true);
    }
    drop(topo);
    let report = report?;
    if let Some(p) = json {
        std::fs::write(p, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = svg {
        super::charts::write_svg(&report, p)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_shape() {
        let t = super::rfc3339_now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T');
        assert!(t.starts_with("20"));
    }
}
