//! `netbench demo` (what `make demo` runs): a 3-node tartan cluster in network namespaces, pods
//! started through `tartan-cni`, a service with node ports, a short netbench over every path,
//! the report with its JSON and SVG, and a full cleanup.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::run::{Settings, build_cluster, measure};
use crate::lab::{cleanup_on_signal, require_root};

/// Runs the demo with the binaries in `bin_dir`, writing `netbench-demo.{json,svg}` to `out`.
pub fn run(bin_dir: &Path, out: &Path) -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    cleanup_on_signal(&format!("tt{}x", std::process::id()))?;
    let started = Instant::now();
    let mut s = Settings::quick(bin_dir.to_path_buf());
    s.nodes = 3;
    // The demo's story is IPv4; `netbench` alone measures the IPv6 paths too.
    s.ipv6 = false;
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
    user_checks(&topo)?;
    println!("\n$ tartanctl explain   (on node1)");
    print!(
        "{}",
        crate::lab::ns_run(
            &lab.nodes[0].ns,
            &lab.bins.tartanctl.to_string_lossy(),
            &["explain"],
        )?
    );
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
    let left = std::fs::read_dir(crate::lab::NETNS_DIR)
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

/// The checks a user makes by hand, printed as they would type them: a pod on node 1 pings a
/// pod on node 2 by its IP, then fetches a page from a service (`web`, port 80 → the pod's
/// 8080) by its cluster IP with busybox `wget`.
fn user_checks(topo: &super::topology::Topology) -> Result<()> {
    let (a, b) = (&topo.client_pod, &topo.server_pod);
    super::probe::tcp_server(&b.ns, WEB_PORT, "demo web page", |mut s| {
        use std::io::{Read, Write};
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut req = [0u8; 1024];
        let _ = s.read(&mut req);
        let body = "hello from pod-b on node2\n";
        let _ = write!(
            s,
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
    })?;
    let out = topo.lab.tartanctl(&[
        "service",
        "create",
        "web",
        "--selector",
        "app=bench",
        "--port",
        &format!("http=80:{WEB_PORT}/tcp"),
    ])?;
    println!("\n$ tartanctl service create web --selector app=bench --port http=80:{WEB_PORT}/tcp");
    print!("{out}");
    let web_ip = super::topology::created_cluster_ip(&out)?;
    println!(
        "\n# a pod on node1 ({}) reaches a pod on node2 by its IP",
        a.ip
    );
    let ping = ["ping", "-c", "3", "-W", "2", &b.ip.to_string()].map(str::to_string);
    show_in_pod(&a.ns, &ping, |o| o.contains(" 0% packet loss"))?;
    println!("\n# ... and the service by its cluster IP");
    let wget = ["wget", "-q", "-O", "-", &format!("http://{web_ip}/")].map(str::to_string);
    show_in_pod(&a.ns, &wget, |o| o.contains("hello from pod-b"))?;
    ingress_check(&topo.lab)
}

/// From outside the cluster, by subdomain: `tartan-ingress` on node 1, one wildcard route
/// (`*.apps.demo` → the service named by the first label), and curl from the underlay.
fn ingress_check(lab: &crate::lab::Lab) -> Result<()> {
    let ing = lab.start_ingress(0, &["--http-listen", "0.0.0.0:80", "--workers", "1"])?;
    let args = [
        "ingress",
        "create",
        "apps",
        "--host",
        "*.apps.demo",
        "--port",
        "http",
    ];
    println!("\n$ tartanctl {}", args.join(" "));
    print!("{}", lab.tartanctl(&args)?);
    println!(
        "\n# from outside the cluster (the underlay), through the ingress on node1 ({}), by subdomain",
        ing.node_ip
    );
    let resolve = format!("web.apps.demo:80:{}", ing.node_ip);
    println!("$ curl --resolve {resolve} http://web.apps.demo/");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = crate::lab::ns_command(&lab.infra, "curl")
            .args([
                "-s",
                "--max-time",
                "5",
                "--resolve",
                &resolve,
                "http://web.apps.demo/",
            ])
            .output()
            .context("running curl")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("hello from pod-b") {
            print!("{text}");
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "no answer through the ingress within 10 s: {text}\n{}",
                ing.log_tail(10)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The port of the demo's web page inside `pod-b`.
const WEB_PORT: u16 = 8080;

/// Runs busybox `cmd` inside pod namespace `ns` until its output satisfies `ok` (10 s
/// deadline, 5 s per try: the service may still be on its way into the table), then prints the command
/// the way a user types it and its output.
fn show_in_pod(ns: &str, cmd: &[String], ok: impl Fn(&str) -> bool) -> Result<()> {
    println!("$ ip netns exec {ns} {}", cmd.join(" "));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = std::process::Command::new("timeout")
            .args(["5", "ip", "netns", "exec", ns, "busybox"])
            .args(cmd)
            .output()
            .with_context(|| format!("running busybox {}", cmd[0]))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() && ok(&text) {
            print!("{text}");
            return Ok(());
        }
        if Instant::now() >= deadline {
            print!("{text}");
            anyhow::bail!("busybox {} in {ns} did not succeed within 10 s", cmd[0]);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
