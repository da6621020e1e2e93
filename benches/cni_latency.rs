//! CNI latency: `tartan-cni` against Debian's reference `bridge` + `host-local` with the same
//! subnet, one process per call as runtimes run plugins (needs root; builds namespaces like
//! the netns tests).
//!
//! - tartan-cni runs in node 1 (tartand running there: the real socket nudge, the real
//!   registration load); the reference runs in node 2's namespace with node 1's subnet and a
//!   flannel-like config (isDefaultGateway, hairpinMode, MTU 1450).
//! - Sequential: rounds interleave ADD and DEL of both plugins (order alternating), so both
//!   see the same machine noise; p50/p90/p99 and ratios. Each ADD gets a pod namespace with
//!   no interface left in it (as runtimes give every sandbox a fresh one): namespaces rotate
//!   through a pool and are reused only once their previous pair is gone (checked untimed;
//!   tartan-cni's DEL leaves the kernel's veth deletion to tartand's batched reaper).
//! - Concurrent: 50 ADDs at once (then 50 DELs), per plugin, interleaved; each call's own
//!   latency, p50/p99.
//!
//! - After each sequential call, untimed, the bench waits until tartand and etcd have used no
//!   CPU for 3 ms (`--settle-ms`, 0 = no wait), so work a call leaves to the daemons
//!   (registration, reaping) is not charged to the next call, whichever plugin that is.
//!
//! Run: `make bench`, or `cargo bench --bench cni_latency [-- --rounds N --concurrent-rounds M]`
//! (`TARTAN_CNI_BIN` picks the tartan-cni binary; `make bench` points it at the statically
//! linked build `make release` makes, which is what tartand installs).
//! Results: docs/benchmarks.md.

mod common;

use common::*;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use tartan::lab::{Lab, NETNS_DIR, require_root, wait_for};

/// A plugin under test: binary and config.
#[derive(Clone)]
struct Plugin {
    name: &'static str,
    path: PathBuf,
    conf: Vec<u8>,
    /// `TARTAN_CNI_LOG` for diagnostic runs (`--log FILE`).
    log: Option<String>,
}

impl Plugin {
    fn command(&self, verb: &str, cid: &str, pod_ns: &str) -> Command {
        let mut c = Command::new(&self.path);
        c.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", cid)
            .env("CNI_NETNS", format!("{NETNS_DIR}/{pod_ns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(l) = &self.log {
            c.env("TARTAN_CNI_LOG", l);
        }
        c
    }
}

/// Between sequential calls, waiting at most this long for the daemons to be idle for
/// `--settle-ms` (3; 0 turns the wait off).
const SETTLE_LIMIT: Duration = Duration::from_millis(100);

type Job = Box<dyn FnOnce() + Send>;

/// A thread living inside a namespace, running jobs (so spawned plugins start there with no
/// nsenter in between and no thread start in the timed path).
struct NsRunner {
    tx: mpsc::Sender<Job>,
}

impl NsRunner {
    fn new(ns: &str) -> Result<NsRunner> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let path = format!("{NETNS_DIR}/{ns}");
        std::thread::spawn(move || {
            let entered = std::fs::File::open(&path)
                .map_err(|e| e.to_string())
                .and_then(|f| {
                    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| e.to_string())
                });
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered);
            if ok {
                for job in rx {
                    job();
                }
            }
        });
        ready_rx
            .recv()
            .context("runner thread")?
            .map_err(|e| anyhow::anyhow!("entering {ns}: {e}"))?;
        Ok(NsRunner { tx })
    }

    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| anyhow::anyhow!("runner gone"))?;
        rx.recv().context("runner gone")
    }
}

fn feed(child: &mut Child, stdin: &[u8]) {
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(stdin);
    }
}

/// One call: spawn, feed stdin, wait. Returns wall time and failure text.
fn timed_call(cmd: &mut Command, stdin: &[u8]) -> (Duration, Option<String>) {
    let t = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return (t.elapsed(), Some(e.to_string())),
    };
    feed(&mut child, stdin);
    match child.wait_with_output() {
        Ok(o) => {
            let d = t.elapsed();
            let err = (!o.status.success()).then(|| {
                format!(
                    "{}: {}",
                    String::from_utf8_lossy(&o.stdout).trim(),
                    String::from_utf8_lossy(&o.stderr).trim()
                )
            });
            (d, err)
        }
        Err(e) => (t.elapsed(), Some(e.to_string())),
    }
}

/// `n` calls at once; each call's own latency (spawn to exit, measured by a waiter thread).
fn concurrent_calls(cmds: Vec<Command>, stdin: Vec<u8>) -> Vec<(Duration, Option<String>)> {
    let mut waiters = Vec::new();
    for mut c in cmds {
        let t = Instant::now();
        match c.spawn() {
            Ok(mut child) => {
                feed(&mut child, &stdin);
                waiters.push(std::thread::spawn(move || match child.wait_with_output() {
                    Ok(o) => (
                        t.elapsed(),
                        (!o.status.success())
                            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string()),
                    ),
                    Err(e) => (t.elapsed(), Some(e.to_string())),
                }));
            }
            Err(e) => waiters.push(std::thread::spawn(move || {
                (t.elapsed(), Some(e.to_string()))
            })),
        }
    }
    waiters
        .into_iter()
        .map(|w| {
            w.join()
                .unwrap_or((Duration::ZERO, Some("waiter panicked".into())))
        })
        .collect()
}

/// Waits (untimed) until no `eth0` is left in any of `pods`.
fn wait_empty(pods: &[String]) -> Result<()> {
    for p in pods {
        wait_for(
            &format!("{p} to lose its interface"),
            Duration::from_secs(30),
            || {
                Command::new("ip")
                    .args(["-n", p, "link", "show", "eth0"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .ok()
                    .filter(|s| !s.success())
            },
        )?;
    }
    Ok(())
}

#[derive(Default)]
struct Series(Vec<f64>);

impl Series {
    fn push(&mut self, d: Duration) {
        self.0.push(d.as_secs_f64() * 1000.0);
    }
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }
    fn p(&self, q: f64) -> f64 {
        percentile(&self.sorted(), q)
    }
}

fn arg_str(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn arg_value(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A two-node lab with etcd and tartand on node 1, IPv4 or dual-stack; node 1's subnets.
fn start_lab(dual: bool) -> Result<(Lab, ipnetwork::Ipv4Network, Option<ipnetwork::Ipv6Network>)> {
    let mut lab = Lab::new(2, bins())?;
    tartan::lab::cleanup_on_signal(&lab.id)?;
    lab.start_etcd()?;
    lab.init_network(&["--network", "10.244.0.0/16"])?;
    if dual {
        lab.make_dual_stack()?;
    }
    lab.start_daemon(0, &[])?;
    let subnet = lab.wait_subnet(0)?;
    let subnet6 = if dual {
        let path = lab.nodes[0].subnet_file();
        Some(wait_for(
            "the IPv6 subnet in subnet.env",
            Duration::from_secs(30),
            || {
                let t = std::fs::read_to_string(&path).ok()?;
                tartan::model::subnet_env::SubnetEnv::parse(&t)
                    .ok()?
                    .ipv6
                    .map(|v| v.subnet)
            },
        )?)
    } else {
        None
    };
    Ok((lab, subnet, subnet6))
}

fn main() -> Result<()> {
    if !require_root()? {
        return Ok(());
    }
    for p in ["bridge", "host-local"] {
        ensure!(
            Path::new("/usr/lib/cni").join(p).exists(),
            "/usr/lib/cni/{p} is missing: install containernetworking-plugins (make deps)"
        );
    }
    let rounds = arg_value("--rounds", 200);
    let conc_rounds = arg_value("--concurrent-rounds", 5);
    let conc = 50;

    // `--dual-stack`: a dual-stack network (flannel's EnableIPv6), each pod given both
    // families by either plugin (the reference's host-local with a range per family).
    let dual = std::env::args().any(|a| a == "--dual-stack");
    let (mut lab, subnet, subnet6) = start_lab(dual)?;
    let conflist = lab.nodes[0].cni_conf_dir().join("10-tartan.conflist");
    let text = wait_for("conflist", Duration::from_secs(30), || {
        std::fs::read_to_string(&conflist).ok()
    })?;
    let list: Value = serde_json::from_str(&text)?;
    let mut tconf = list["plugins"][0].clone();
    tconf["cniVersion"] = list["cniVersion"].clone();
    tconf["name"] = list["name"].clone();
    let tartan = Plugin {
        name: "tartan-cni",
        path: std::env::var_os("TARTAN_CNI_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| lab.bins.tartan_cni.clone()),
        conf: tconf.to_string().into_bytes(),
        log: arg_str("--log"),
    };
    // The reference, as flannel delegates to it, in node 2 with node 1's subnet.
    let rconf = json!({
        "cniVersion": "1.0.0",
        "name": "refnet",
        "type": "bridge",
        "bridge": "cni0",
        "isDefaultGateway": true,
        "hairpinMode": true,
        "ipMasq": false,
        "mtu": 1450,
        "ipam": {
            "type": "host-local",
            "ranges": match subnet6 {
                Some(s6) => json!([[{"subnet": subnet.to_string()}], [{"subnet": s6.to_string()}]]),
                None => json!([[{"subnet": subnet.to_string()}]]),
            },
            "dataDir": lab.dir.join("host-local"),
        },
    });
    let reference = Plugin {
        name: "bridge+host-local",
        path: PathBuf::from("/usr/lib/cni/bridge"),
        conf: rconf.to_string().into_bytes(),
        log: None,
    };
    let node_t = lab.nodes[0].ns.clone();
    let node_r = lab.nodes[1].ns.clone();
    let run_t = NsRunner::new(&node_t)?;
    let run_r = NsRunner::new(&node_r)?;
    const POOL: usize = 16;
    let mut seq_pods_t = Vec::new();
    let mut seq_pods_r = Vec::new();
    for k in 0..POOL {
        seq_pods_t.push(lab.add_namespace(&format!("bt{k}"))?);
        seq_pods_r.push(lab.add_namespace(&format!("br{k}"))?);
    }
    eprintln!(
        "subnet {subnet}{}; {rounds} sequential rounds, {conc_rounds} rounds of {conc} concurrent calls; tartan-cni = {}",
        subnet6.map(|s| format!(" and {s}")).unwrap_or_default(),
        tartan.path.display()
    );

    // After each timed call (either plugin's), untimed: wait until tartand and etcd are idle,
    // so the registration a call triggered is not charged to whichever call runs next.
    let settle_quiet = Duration::from_millis(arg_value("--settle-ms", 3) as u64);
    let mut daemons: Vec<u32> = lab.etcd_pids();
    daemons.extend(lab.nodes[0].daemon.as_ref().map(|c| c.id()));
    let call =
        |runner: &NsRunner, p: &Plugin, verb: &str, cid: &str, pod: &str| -> Result<Duration> {
            let mut cmd = p.command(verb, cid, pod);
            let stdin = p.conf.clone();
            let (d, err) = runner.run(move || timed_call(&mut cmd, &stdin))?;
            if let Some(e) = err {
                bail!("{} {verb} {cid}: {e}", p.name);
            }
            if !settle_quiet.is_zero() {
                settle(&daemons, settle_quiet, SETTLE_LIMIT);
            }
            Ok(d)
        };

    // Warm-up: bridges created, page cache warm, not measured.
    for k in 0..5 {
        let cid = format!("warm{k}");
        let (pt, pr) = (&seq_pods_t[k], &seq_pods_r[k]);
        call(&run_t, &tartan, "ADD", &cid, pt)?;
        call(&run_t, &tartan, "DEL", &cid, pt)?;
        call(&run_r, &reference, "ADD", &cid, pr)?;
        call(&run_r, &reference, "DEL", &cid, pr)?;
    }

    // The process floor: VERSION does no work, so it is exec + startup + exit.
    let (mut t_floor, mut r_floor) = (Series::default(), Series::default());
    for k in 0..rounds.min(100) {
        let pt = &seq_pods_t[k % POOL];
        let pr = &seq_pods_r[k % POOL];
        t_floor.push(call(&run_t, &tartan, "VERSION", "v", pt)?);
        r_floor.push(call(&run_r, &reference, "VERSION", "v", pr)?);
    }

    let (mut t_add, mut t_del, mut r_add, mut r_del) = (
        Series::default(),
        Series::default(),
        Series::default(),
        Series::default(),
    );
    let daemon_pid = lab.nodes[0].daemon.as_ref().map(|c| c.id());
    let daemon_cpu0 = daemon_pid.and_then(cpu_ns);
    let seq_start = Instant::now();
    for round in 0..rounds {
        let cid = format!("seq{round:04}");
        let seq_pod_t = &seq_pods_t[round % POOL];
        let seq_pod_r = &seq_pods_r[round % POOL];
        wait_empty(std::slice::from_ref(seq_pod_t))?;
        wait_empty(std::slice::from_ref(seq_pod_r))?;
        if round % 2 == 0 {
            t_add.push(call(&run_t, &tartan, "ADD", &cid, seq_pod_t)?);
            r_add.push(call(&run_r, &reference, "ADD", &cid, seq_pod_r)?);
            t_del.push(call(&run_t, &tartan, "DEL", &cid, seq_pod_t)?);
            r_del.push(call(&run_r, &reference, "DEL", &cid, seq_pod_r)?);
        } else {
            r_add.push(call(&run_r, &reference, "ADD", &cid, seq_pod_r)?);
            t_add.push(call(&run_t, &tartan, "ADD", &cid, seq_pod_t)?);
            r_del.push(call(&run_r, &reference, "DEL", &cid, seq_pod_r)?);
            t_del.push(call(&run_t, &tartan, "DEL", &cid, seq_pod_t)?);
        }
    }

    let seq_wall = seq_start.elapsed();
    let daemon_cpu = match (daemon_pid.and_then(cpu_ns), daemon_cpu0) {
        (Some(b), Some(a)) => Some(Duration::from_nanos(b.saturating_sub(a))),
        _ => None,
    };

    // Concurrent: 50 pods per plugin.
    let mut pods_t = Vec::new();
    let mut pods_r = Vec::new();
    for k in 0..conc {
        pods_t.push(lab.add_namespace(&format!("ct{k}"))?);
        pods_r.push(lab.add_namespace(&format!("cr{k}"))?);
    }
    let (mut tc_add, mut tc_del, mut rc_add, mut rc_del) = (
        Series::default(),
        Series::default(),
        Series::default(),
        Series::default(),
    );
    let burst = |runner: &NsRunner,
                 p: &Plugin,
                 verb: &str,
                 round: usize,
                 pods: &[String],
                 into: &mut Series|
     -> Result<()> {
        let cmds: Vec<Command> = pods
            .iter()
            .enumerate()
            .map(|(k, pod)| p.command(verb, &format!("conc{round:02}x{k:02}"), pod))
            .collect();
        let stdin = p.conf.clone();
        let res = runner.run(move || concurrent_calls(cmds, stdin))?;
        for (d, err) in res {
            if let Some(e) = err {
                bail!("{} concurrent {verb}: {e}", p.name);
            }
            into.push(d);
        }
        Ok(())
    };
    for round in 0..conc_rounds {
        let order: [(&NsRunner, &Plugin, &[String], bool); 2] = [
            (&run_t, &tartan, &pods_t, true),
            (&run_r, &reference, &pods_r, false),
        ];
        let order: Vec<_> = if round % 2 == 0 {
            order.into_iter().collect()
        } else {
            order.into_iter().rev().collect()
        };
        for (runner, p, pods, is_t) in order {
            wait_empty(pods)?;
            let (add, del) = if is_t {
                (&mut tc_add, &mut tc_del)
            } else {
                (&mut rc_add, &mut rc_del)
            };
            burst(runner, p, "ADD", round, pods, add)?;
            burst(runner, p, "DEL", round, pods, del)?;
        }
    }

    let row = |what: &str, s: &Series| {
        println!(
            "| {what} | {} | {:.2} | {:.2} | {:.2} |",
            s.0.len(),
            s.p(50.0),
            s.p(90.0),
            s.p(99.0)
        );
    };
    println!("\nsequential, interleaved, one process per call (ms):\n");
    println!("| call | n | p50 | p90 | p99 |");
    println!("|---|---|---|---|---|");
    row("tartan-cni VERSION (process floor)", &t_floor);
    row("bridge VERSION (process floor)", &r_floor);
    row("tartan-cni ADD", &t_add);
    row("bridge+host-local ADD", &r_add);
    row("tartan-cni DEL", &t_del);
    row("bridge+host-local DEL", &r_del);
    println!(
        "\nADD p50: tartan-cni is {:.1}x faster ({:.2} vs {:.2} ms); DEL p50: {:.1}x faster ({:.2} vs {:.2} ms)",
        r_add.p(50.0) / t_add.p(50.0),
        t_add.p(50.0),
        r_add.p(50.0),
        r_del.p(50.0) / t_del.p(50.0),
        t_del.p(50.0),
        r_del.p(50.0)
    );
    if let Some(c) = daemon_cpu {
        println!(
            "\ntartand CPU during the sequential rounds: {:.0} ms in {:.1} s ({:.2} ms per tartan-cni ADD+DEL: registration, reaping, and overlay reconciles triggered by the pods' link events)",
            c.as_secs_f64() * 1000.0,
            seq_wall.as_secs_f64(),
            c.as_secs_f64() * 1000.0 / rounds.max(1) as f64
        );
    }
    println!("\n{conc} concurrent calls, {conc_rounds} rounds, each call's own latency (ms):\n");
    println!("| call | n | p50 | p90 | p99 |");
    println!("|---|---|---|---|---|");
    row("tartan-cni ADD x50", &tc_add);
    row("bridge+host-local ADD x50", &rc_add);
    row("tartan-cni DEL x50", &tc_del);
    row("bridge+host-local DEL x50", &rc_del);
    println!(
        "\nconcurrent ADD p99: tartan-cni {:.2} ms, reference {:.2} ms ({:.1}x)",
        tc_add.p(99.0),
        rc_add.p(99.0),
        rc_add.p(99.0) / tc_add.p(99.0)
    );
    Ok(())
}
