//! A short netbench run through the real binary: every path produces samples, the JSON holds
//! every field, the SVG is written, and nothing is left behind. No assertion on absolute times
//! or on the order of paths (noise).

use std::process::Command;

use anyhow::{Context, Result, ensure};
use tartan::netbench::report::Report;

#[test]
fn short_netbench_run_measures_every_path_and_writes_json_and_svg() -> Result<()> {
    if !tartan::lab::require_root()? {
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("tartan-netbench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let json = dir.join("report.json");
    let svg = dir.join("report.svg");
    let child = Command::new(env!("CARGO_BIN_EXE_netbench"))
        .args([
            "--quick",
            "--rounds",
            "3",
            "--services",
            "1,200",
            "--no-progress",
            "--json",
        ])
        .arg(&json)
        .arg("--svg")
        .arg(&svg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running netbench")?;
    let pid = child.id();
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "netbench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Report = serde_json::from_str(&std::fs::read_to_string(&json)?)
        .context("the JSON report does not parse into a Report")?;
    // Every field present and every path measured.
    ensure!(!r.machine.kernel.is_empty() && r.machine.cpus > 0);
    ensure!(r.settings["rounds"] == 3, "{}", r.settings);
    let want = [
        "loopback",
        "underlay",
        "pod-node",
        "pod-same-node",
        "pod-cross-direct",
        "pod-cross-vxlan",
        "host-remote-pod",
        "pod-clusterip",
        "external-nodeport",
        "flannel-pod-same-node",
        "flannel-pod-cross",
        "flannel-host-remote-pod",
        "underlay-ipv6",
        "pod-cross-vxlan-ipv6",
        "host-remote-pod-ipv6",
        "pod-clusterip-ipv6",
        "external-nodeport-ipv6",
        "flannel-pod-cross-ipv6",
        "flannel-host-remote-pod-ipv6",
    ];
    for id in want {
        let p = r
            .paths
            .iter()
            .find(|p| p.id == id)
            .with_context(|| format!("path {id} missing"))?;
        ensure!(
            p.tcp_rr.count > 0 && p.udp_rr.count > 0 && p.new_conn.count > 0,
            "{id} has no samples"
        );
        ensure!(
            p.tcp_rr.round_medians_us.len() == 3,
            "{id}: one median per round"
        );
        ensure!(
            !p.throughput_gbps.is_empty() && p.throughput_gbps.iter().all(|g| *g > 0.0),
            "{id}: throughput"
        );
        ensure!(
            p.ratio_to_underlay.tcp_rr.is_some(),
            "{id}: ratio to the underlay"
        );
        ensure!(!p.tcp_rr_cdf.is_empty(), "{id}: CDF");
        if p.reference.is_some() {
            ensure!(p.ratio_to_reference.is_some(), "{id}: ratio to flannel");
        }
    }
    ensure!(r.hops.len() >= 6, "hop breakdown: {:?}", r.hops);
    ensure!(r.hops.iter().any(|h| h.measured) && r.hops.iter().any(|h| !h.measured));
    ensure!(
        r.services.len() == 4,
        "service scale: {:?}",
        r.services.len()
    );
    ensure!(r.services.iter().all(|s| s.new_conn.count > 0));
    ensure!(r.noise_pct.is_some());
    // The printed table and the chart.
    ensure!(
        stdout.contains("pod -> pod, other node, VXLAN")
            && stdout.contains("IPv6 against IPv4")
            && stdout.contains("Noise:"),
        "{stdout}"
    );
    let chart = std::fs::read_to_string(&svg)?;
    ensure!(
        chart.starts_with("<svg") && chart.contains("VXLAN"),
        "not an SVG with the charts"
    );
    // Its cluster is gone.
    let leftovers: Vec<String> = std::fs::read_dir(tartan::lab::NETNS_DIR)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mine = format!("tt{pid}x");
    ensure!(
        !leftovers.iter().any(|n| n.starts_with(&mine)),
        "namespaces left behind: {leftovers:?}"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
