//! `netbench demo` (what `make demo` runs): a 3-node tartan cluster in network namespaces, pods
//! started through `tartan-cni`, a service with node ports, a short netbench over every path,
//! the report with its JSON and SVG, and a full cleanup.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;

use super::run::{Settings, build_cluster, measure};
use crate::netns_lab::{cleanup_on_signal, require_root};

/// Runs the demo with the binaries in `bin_dir`, writing `netbench-demo.{json,svg}` to `out`.
pub fn run(bin_dir: &Path, out: &Path) -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    cleanup_on_signal(&format!("tt{}x", std::process::id()))?;
    let started = Instant::now();
    let mut s = Settings::quick(bin_dir.to_path_buf());
    s.nodes = 3;
    println!("== tartan demo: a 3-node cluster in network namespaces (removed at the end)");
    let pb = indicatif::ProgressBar::new_spinner();
    pb.enable_steady_tick(std::time::Duration::from_millis(150));
    let topo = build_cluster(&s, &pb)?;
    pb.finish_and_clear();
    let lab = &topo.lab;
    println!("\n$ tartanctl nodes");
    print!("{}", lab.tartanctl(&["nodes"])?);
    println!("\n$ tartanctl service list");
    print!("{}", lab.tartanctl(&["service", "list"])?);
    println!("\n$ tartanctl explain   (on node1)");
    let explain = crate::netns_lab::ns_run(
        &lab.nodes[0].ns,
        &lab.bins.tartanctl.to_string_lossy(),
        &["explain"],
    )?;
    // The service table part is what matters here; peers are listed above.
    for l in explain.lines().filter(|l| !l.starts_with("  10.24")) {
        println!("{l}");
    }
    println!("\n== netbench (short run; `netbench` alone runs the full one)");
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(
        indicatif::ProgressStyle::with_template("[{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let report = measure(&s, &topo, &pb, started);
    pb.finish_and_clear();
    drop(topo);
    let report = report?;
    print!("\n{}", super::report::render_text(&report));
    std::fs::create_dir_all(out)?;
    let json = out.join("netbench-demo.json");
    let svg = out.join("netbench-demo.svg");
    std::fs::write(&json, serde_json::to_vec_pretty(&report)?)?;
    super::charts::write_svg(&report, &svg)?;
    println!("\nJSON: {}\nSVG:  {}", json.display(), svg.display());
    let left = std::fs::read_dir(crate::netns_lab::NETNS_DIR)
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("tt{}x", std::process::id()))
                })
                .count()
        })
        .unwrap_or(0);
    println!(
        "cluster removed: {left} namespaces left behind, demo took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
