//! A throw-away cluster in network namespaces, shared by the netns tests, the benchmarks,
//! `netbench` and `make demo`.
//!
//! Layout: an `infra` namespace holds the underlay bridge (`br0`, 192.168.77.1/24), the etcd
//! server and the "outside" client; each node namespace has `eth0` on that bridge
//! (192.168.77.(10+i)/24, default route via the infra address). Pod namespaces hang off a node.
//! Everything is created under a unique name prefix and removed on drop, also when a test
//! panics; labs left behind by killed processes are swept when the next lab starts.
//! Nothing is ever added to the root namespace.

pub mod fixed_rate;
pub mod http_backend;
pub mod ingress;

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sched::{CloneFlags, setns};

/// Directory where `ip netns` keeps namespace handles.
pub const NETNS_DIR: &str = "/var/run/netns";
/// Underlay prefix of every lab (private to the lab's namespaces).
pub const UNDERLAY: [u8; 3] = [192, 168, 77];
/// The infra namespace's underlay address (etcd listens here).
pub const INFRA_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
/// The IPv6 underlay of [`Lab::add_ipv6_underlay`]: the infra's bridge is `fd00:77::1`, node
/// `i` (from 1) `fd00:77::<10 + i>`, in one /64.
pub const UNDERLAY6: [u16; 2] = [0xfd00, 0x77];

/// flannel's dual-stack network config: an IPv4 /16 beside an IPv6 /56, VXLAN.
pub const DUAL_CONFIG: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
/// The etcd client port.
pub const ETCD_PORT: u16 = 2379;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The [`Binaries`] cargo built, for tests and benchmarks: cargo sets `CARGO_BIN_EXE_<name>`
/// only when it compiles those, and `env!` reads it where the macro is used.
#[macro_export]
macro_rules! built_binaries {
    () => {
        $crate::lab::Binaries {
            tartand: env!("CARGO_BIN_EXE_tartand").into(),
            tartanctl: env!("CARGO_BIN_EXE_tartanctl").into(),
            tartan_cni: env!("CARGO_BIN_EXE_tartan-cni").into(),
            tartan_ingress: env!("CARGO_BIN_EXE_tartan-ingress").into(),
        }
    };
}

/// Paths of the tartan binaries a lab runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `tartand`.
    pub tartand: PathBuf,
    /// `tartanctl`.
    pub tartanctl: PathBuf,
    /// `tartan-cni` (may not exist for overlay-only labs).
    pub tartan_cni: PathBuf,
    /// `tartan-ingress`.
    pub tartan_ingress: PathBuf,
}

impl Binaries {
    /// Binaries next to the running executable (for `netbench`), or in `dir`.
    pub fn in_dir(dir: &Path) -> Binaries {
        Binaries {
            tartand: dir.join("tartand"),
            tartanctl: dir.join("tartanctl"),
            tartan_cni: dir.join("tartan-cni"),
            tartan_ingress: dir.join("tartan-ingress"),
        }
    }
}

/// Fails unless running as root, or returns `Ok(false)` when `TARTAN_SKIP_NETNS=1` opts out.
pub fn require_root() -> Result<bool> {
    if nix::unistd::geteuid().is_root() {
        return Ok(true);
    }
    if std::env::var("TARTAN_SKIP_NETNS").as_deref() == Ok("1") {
        eprintln!("TARTAN_SKIP_NETNS=1: skipping a test that needs root and network namespaces");
        return Ok(false);
    }
    bail!(
        "this test needs root (network namespaces, nftables); run it as root or set TARTAN_SKIP_NETNS=1 to skip it explicitly"
    )
}

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// `ip` with arguments, in the root namespace (use `-n NS` to target a lab namespace).
pub fn ip(args: &[&str]) -> Result<String> {
    let out = run(Command::new("ip").args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command that runs inside namespace `ns` (via `nsenter --net`).
pub fn ns_command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={NETNS_DIR}/{ns}"))
        .arg("--")
        .arg(program);
    c
}

/// Gives `dev` in namespace `ns` the address `cidr`, sets it up and sends everything else via
/// `gateway`: the last step of wiring a node, pod or client namespace.
pub fn address_up_default_route(ns: &str, dev: &str, cidr: &str, gateway: &str) -> Result<()> {
    ip(&["-n", ns, "addr", "add", cidr, "dev", dev])?;
    ip(&["-n", ns, "link", "set", dev, "up"])?;
    ip(&["-n", ns, "route", "add", "default", "via", gateway])?;
    Ok(())
}

/// Adds the IPv6 address `cidr` to the (up) `dev` in `ns` without duplicate address
/// detection, and the IPv6 default route via `gateway`.
pub fn address6_default_route(ns: &str, dev: &str, cidr: &str, gateway: &str) -> Result<()> {
    ip(&["-n", ns, "addr", "add", cidr, "dev", dev, "nodad"])?;
    ip(&["-n", ns, "-6", "route", "add", "default", "via", gateway])?;
    Ok(())
}

/// Runs `program args` inside `ns`; returns stdout, failing on a non-zero exit.
pub fn ns_run(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    let out = run(ns_command(ns, program).args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a fresh thread whose network namespace is `ns`; sockets it opens live there.
pub fn in_netns<T, F>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = format!("{NETNS_DIR}/{ns}");
    std::thread::spawn(move || -> Result<T> {
        let fd = File::open(&path).with_context(|| format!("opening {path}"))?;
        setns(&fd, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {path}"))?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow!("thread in {ns} panicked"))?
}

/// Runs the future made by `f` on a current-thread runtime inside `ns`.
pub fn block_on_in_netns<T, F, Fut>(ns: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    in_netns(ns, move || -> Result<T> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("runtime")?;
        Ok(rt.block_on(f()))
    })?
}

/// Starts `cmd` inside `ns`, forked from a thread that entered the namespace (no `nsenter`
/// process in between, so timings are the command's own).
pub fn spawn_in_netns(ns: &str, mut cmd: Command) -> Result<Child> {
    in_netns(ns, move || cmd.spawn())?.context("spawning a command in a namespace")
}

/// Polls `cond` until it returns `Some`, or fails after `deadline` with `what` in the error.
pub fn wait_for<T>(
    what: &str,
    deadline: Duration,
    mut cond: impl FnMut() -> Option<T>,
) -> Result<T> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = cond() {
            return Ok(v);
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn kill_ns_processes(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(p) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Deletes a namespace after killing whatever still runs in it; errors are ignored.
pub fn delete_ns(ns: &str) {
    kill_ns_processes(ns);
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
}

/// Removes namespaces of labs whose creating process is gone (`tt<pid>x<seq>-...`).
pub fn sweep_stale() {
    let Ok(rd) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("tt") else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('x') else {
            continue;
        };
        if let Ok(pid) = pid.parse::<u32>()
            && !pid_alive(pid)
        {
            delete_ns(&name);
        }
    }
}

/// One network namespace of its own for a test, named `tt<pid>x<n>s-<tag>` (so
/// [`sweep_stale`] removes it once the process is gone; the `s` keeps it apart from lab
/// names), with `lo` up; deleted on drop, also when the test fails.
#[derive(Debug)]
pub struct ScratchNs(String);

impl ScratchNs {
    /// Creates the namespace.
    pub fn new(tag: &str) -> Result<ScratchNs> {
        let name = format!(
            "tt{}x{}s-{tag}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = ScratchNs(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name (for `ip -n`, [`ns_run`], [`in_netns`]).
    pub fn name(&self) -> &str {
        &self.0
    }

    /// Loads `script` with `nft -f` inside the namespace.
    pub fn nft_load(&self, script: &str) -> Result<()> {
        let tf = std::env::temp_dir().join(format!("{}.nft", self.0));
        std::fs::write(&tf, script).with_context(|| format!("writing {}", tf.display()))?;
        let r = ns_run(&self.0, "nft", &["-f", &tf.to_string_lossy()]);
        let _ = std::fs::remove_file(&tf);
        r.map(|_| ())
    }
}

impl Drop for ScratchNs {
    fn drop(&mut self) {
        delete_ns(&self.0);
    }
}

/// A node of the lab.
#[derive(Debug)]
pub struct LabNode {
    /// Node name (as given to tartand).
    pub name: String,
    /// Network namespace.
    pub ns: String,
    /// Underlay address on `eth0`.
    pub ip: Ipv4Addr,
    /// IPv6 underlay address on `eth0`, once [`Lab::add_ipv6_underlay`] gave one.
    pub ip6: Option<std::net::Ipv6Addr>,
    /// Working directory (subnet.env, state, logs).
    pub dir: PathBuf,
    /// The running tartand, if any.
    pub daemon: Option<Child>,
}

impl LabNode {
    /// Path of this node's subnet.env.
    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }
    /// Path of this node's daemon log.
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("tartand.log")
    }
    /// This node's CNI directory (tartand's `--cni-conf-dir` is `net.d` under it,
    /// `--cni-data-dir` is `data`, `--cni-socket` is `tartand.sock`).
    pub fn cni_dir(&self) -> PathBuf {
        self.dir.join("cni")
    }
    /// Where tartand installs the CNI conflist.
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.cni_dir().join("net.d")
    }
    /// tartan-cni's IPAM directory.
    pub fn cni_data_dir(&self) -> PathBuf {
        self.cni_dir().join("data")
    }
    /// tartand's CNI socket.
    pub fn cni_socket(&self) -> PathBuf {
        self.cni_dir().join("tartand.sock")
    }
}

/// A pod namespace attached to a node by hand (a veth on the node's `tbr0` bridge).
#[derive(Debug, Clone)]
pub struct LabPod {
    /// Network namespace.
    pub ns: String,
    /// Address.
    pub ip: Ipv4Addr,
    /// IPv6 address (a dual-stack pod's, from its ADD result).
    pub ip6: Option<std::net::Ipv6Addr>,
}

/// A cluster in network namespaces; everything is removed on drop.
pub struct Lab {
    /// Unique prefix of every namespace of this lab.
    pub id: String,
    /// Working directory.
    pub dir: PathBuf,
    /// The infra namespace (underlay bridge, etcd, outside client).
    pub infra: String,
    /// The nodes.
    pub nodes: Vec<LabNode>,
    /// The binaries.
    pub bins: Binaries,
    etcd: Vec<Option<Child>>,
    etcd_members: usize,
    tls: Option<PathBuf>,
    extra_ns: Vec<String>,
    keep: bool,
}

impl Lab {
    /// Creates the infra namespace with the underlay bridge and `nodes` node namespaces.
    pub fn new(nodes: usize, bins: Binaries) -> Result<Lab> {
        sweep_stale();
        let id = format!(
            "tt{}x{}{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            rand::random::<u16>() % 100
        );
        let dir = std::env::temp_dir().join(format!("tartan-lab-{id}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let infra = format!("{id}-infra");
        let mut lab = Lab {
            id,
            dir,
            infra: infra.clone(),
            nodes: Vec::new(),
            bins,
            etcd: Vec::new(),
            etcd_members: 1,
            tls: None,
            extra_ns: Vec::new(),
            keep: std::env::var("TARTAN_KEEP_LAB").as_deref() == Ok("1"),
        };
        ip(&["netns", "add", &infra])?;
        ip(&["-n", &infra, "link", "set", "lo", "up"])?;
        ip(&["-n", &infra, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &infra,
            "addr",
            "add",
            &format!("{INFRA_IP}/24"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", &infra, "link", "set", "br0", "up"])?;
        for i in 1..=nodes {
            lab.add_node()
                .with_context(|| format!("creating node {i}"))?;
        }
        Ok(lab)
    }

    /// Adds one more node namespace on the underlay; returns its index.
    pub fn add_node(&mut self) -> Result<usize> {
        let i = self.nodes.len() + 1;
        if i > 200 {
            bail!("a lab holds at most 200 nodes");
        }
        let ns = format!("{}-n{i}", self.id);
        let node_ip = Ipv4Addr::new(UNDERLAY[0], UNDERLAY[1], UNDERLAY[2], 10 + i as u8);
        ip(&["netns", "add", &ns])?;
        self.extra_ns.push(ns.clone());
        let port = format!("u{i}");
        ip(&[
            "-n",
            &self.infra,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ])?;
        ip(&[
            "-n",
            &self.infra,
            "link",
            "set",
            &port,
            "master",
            "br0",
            "up",
        ])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        address_up_default_route(&ns, "eth0", &format!("{node_ip}/24"), &INFRA_IP.to_string())?;
        let dir = self.dir.join(format!("node{i}"));
        std::fs::create_dir_all(&dir)?;
        self.nodes.push(LabNode {
            name: format!("node{i}"),
            ns,
            ip: node_ip,
            ip6: None,
            dir,
            daemon: None,
        });
        Ok(i - 1)
    }

    /// Makes the lab dual-stack before its daemons start: an IPv6 underlay
    /// ([`Lab::add_ipv6_underlay`]) and flannel's dual-stack network config ([`DUAL_CONFIG`]).
    pub fn make_dual_stack(&mut self) -> Result<()> {
        self.add_ipv6_underlay()?;
        self.etcdctl(&["put", "/coreos.com/network/config", DUAL_CONFIG])?;
        Ok(())
    }

    /// Gives the underlay IPv6 too (see [`UNDERLAY6`]): every node's `eth0` and the infra's
    /// bridge get an address in one /64, without duplicate address detection (usable at
    /// once, as a dual-stack node's would be by the time its daemon starts).
    pub fn add_ipv6_underlay(&mut self) -> Result<()> {
        let [a, b] = UNDERLAY6;
        let addr = |host: u16| std::net::Ipv6Addr::new(a, b, 0, 0, 0, 0, 0, host);
        ip(&[
            "-n",
            &self.infra,
            "addr",
            "add",
            &format!("{}/64", addr(1)),
            "dev",
            "br0",
            "nodad",
        ])?;
        for (i, n) in self.nodes.iter_mut().enumerate() {
            let a6 = addr(11 + i as u16);
            ip(&[
                "-n",
                &n.ns,
                "addr",
                "add",
                &format!("{a6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            n.ip6 = Some(a6);
        }
        Ok(())
    }

    /// The etcd endpoints (every member) as seen from the nodes, comma separated.
    pub fn etcd_endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        (0..self.etcd_members.max(1))
            .map(|m| format!("{scheme}://{INFRA_IP}:{}", ETCD_PORT + 10000 * m as u16))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn local_endpoints(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        (0..self.etcd_members.max(1))
            .map(|m| format!("{scheme}://127.0.0.1:{}", ETCD_PORT + 10000 * m as u16))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Client TLS flags for etcdctl and tartan binaries, when TLS is on.
    fn tls_client_args(&self, tartan: bool) -> Vec<String> {
        let Some(t) = &self.tls else {
            return Vec::new();
        };
        let (ca, cert, key) = if tartan {
            ("--etcd-cacert", "--etcd-cert", "--etcd-key")
        } else {
            ("--cacert", "--cert", "--key")
        };
        vec![
            ca.into(),
            t.join("ca.pem").to_string_lossy().into_owned(),
            cert.into(),
            t.join("client.pem").to_string_lossy().into_owned(),
            key.into(),
            t.join("client-key.pem").to_string_lossy().into_owned(),
        ]
    }

    /// Runs etcd as `members` members (default 1); call before [`Lab::start_etcd`].
    pub fn set_etcd_members(&mut self, members: usize) {
        self.etcd_members = members.clamp(1, 5);
    }

    /// Serves etcd over TLS with client certificates (a throw-away CA made with openssl);
    /// call before [`Lab::start_etcd`]. Every lab helper then uses the certificates.
    pub fn enable_tls(&mut self) -> Result<()> {
        let d = self.dir.join("tls");
        std::fs::create_dir_all(&d)?;
        let p = |f: &str| d.join(f).to_string_lossy().into_owned();
        let ossl = |args: &[&str]| run(Command::new("openssl").args(args)).map(|_| ());
        ossl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=tartan-lab-ca",
            "-keyout",
            &p("ca-key.pem"),
            "-out",
            &p("ca.pem"),
        ])?;
        std::fs::write(
            d.join("server.ext"),
            format!("subjectAltName=IP:{INFRA_IP},IP:127.0.0.1\n"),
        )?;
        std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
        for (name, ext) in [("server", "server.ext"), ("client", "client.ext")] {
            ossl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN=tartan-{name}"),
                "-keyout",
                &p(&format!("{name}-key.pem")),
                "-out",
                &p(&format!("{name}.csr")),
            ])?;
            ossl(&[
                "x509",
                "-req",
                "-in",
                &p(&format!("{name}.csr")),
                "-CA",
                &p("ca.pem"),
                "-CAkey",
                &p("ca-key.pem"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &p(ext),
                "-out",
                &p(&format!("{name}.pem")),
            ])?;
        }
        self.tls = Some(d);
        Ok(())
    }

    /// Starts etcd (every member) in the infra namespace, data on tmpfs when available, and
    /// waits until it answers. Starting again after [`Lab::stop_etcd`] reuses the data.
    pub fn start_etcd(&mut self) -> Result<()> {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            self.dir.clone()
        };
        let members = self.etcd_members.max(1);
        let cluster: Vec<String> = (0..members)
            .map(|m| format!("m{m}=http://127.0.0.1:{}", ETCD_PORT + 1 + 10000 * m as u16))
            .collect();
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        for m in 0..members {
            if self.etcd.get(m).is_some_and(Option::is_some) {
                continue;
            }
            let port = ETCD_PORT + 10000 * m as u16;
            let data = base.join(format!("tartan-etcd-{}-m{m}", self.id));
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(format!("etcd-m{m}.log")))?;
            let mut cmd = ns_command(&self.infra, "etcd");
            cmd.args([
                "--name".to_string(),
                format!("m{m}"),
                "--data-dir".into(),
                data.to_string_lossy().into_owned(),
                "--listen-client-urls".into(),
                format!("{scheme}://{INFRA_IP}:{port},{scheme}://127.0.0.1:{port}"),
                "--advertise-client-urls".into(),
                format!("{scheme}://{INFRA_IP}:{port}"),
                "--listen-peer-urls".into(),
                format!("http://127.0.0.1:{}", port + 1),
                "--initial-advertise-peer-urls".into(),
                format!("http://127.0.0.1:{}", port + 1),
                "--initial-cluster".into(),
                cluster.join(","),
                "--log-level".into(),
                "warn".into(),
                "--logger".into(),
                "zap".into(),
            ]);
            if let Some(t) = &self.tls {
                let f = |n: &str| t.join(n).to_string_lossy().into_owned();
                cmd.args([
                    "--cert-file".to_string(),
                    f("server.pem"),
                    "--key-file".into(),
                    f("server-key.pem"),
                    "--trusted-ca-file".into(),
                    f("ca.pem"),
                    "--client-cert-auth".into(),
                ]);
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting etcd (is etcd-server installed?)")?;
            while self.etcd.len() <= m {
                self.etcd.push(None);
            }
            self.etcd[m] = Some(child);
        }
        let infra = self.infra.clone();
        let mut args = vec!["--endpoints".to_string(), self.local_endpoints()];
        args.extend(self.tls_client_args(false));
        args.extend(["endpoint".into(), "health".into()]);
        wait_for("etcd to answer", Duration::from_secs(30), || {
            ns_command(&infra, "etcdctl")
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .ok()
                .filter(|s| s.success())
        })?;
        Ok(())
    }

    /// Process IDs of the running etcd members.
    pub fn etcd_pids(&self) -> Vec<u32> {
        self.etcd.iter().flatten().map(Child::id).collect()
    }

    /// Stops every etcd member (SIGKILL, as a crash would), keeping the data.
    pub fn stop_etcd(&mut self) {
        for m in 0..self.etcd.len() {
            self.stop_etcd_member(m);
        }
    }

    /// Stops one etcd member (SIGKILL).
    pub fn stop_etcd_member(&mut self, m: usize) {
        if let Some(mut c) = self.etcd.get_mut(m).and_then(Option::take) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Makes member `m` silent to the nodes (`silent`) or reachable again: an nftables table
    /// in the infra namespace drops every packet between the nodes and its client port, while the
    /// process keeps running and its peers (on loopback) still see it, as a partitioned or
    /// hung-network member looks to clients.
    pub fn set_etcd_member_silent(&self, m: usize, silent: bool) -> Result<()> {
        let table = format!("tartan_lab_silent_m{m}");
        if !silent {
            return ns_run(&self.infra, "nft", &["delete", "table", "inet", &table]).map(|_| ());
        }
        let port = ETCD_PORT + 10000 * m as u16;
        let script = format!(
            "table inet {table} {{ \
             chain from_clients {{ type filter hook input priority -10; \
             iifname != \"lo\" tcp dport {port} drop; }}; \
             chain to_clients {{ type filter hook output priority -10; \
             oifname != \"lo\" tcp sport {port} drop; }}; }}"
        );
        ns_run(&self.infra, "nft", &[&script]).map(|_| ())
    }

    /// `etcdctl ARGS` in the infra namespace; returns stdout.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let mut c = ns_command(&self.infra, "etcdctl");
        c.args(["--endpoints", &self.local_endpoints()])
            .args(self.tls_client_args(false))
            .args(args);
        let out = run(&mut c)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `tartanctl ARGS` in the infra namespace; returns stdout.
    pub fn tartanctl(&self, args: &[&str]) -> Result<String> {
        let mut c = ns_command(&self.infra, &self.bins.tartanctl);
        c.env("TARTAN_ETCD_ENDPOINTS", self.local_endpoints())
            .args(self.tls_client_args(true))
            .args(args);
        let out = run(&mut c)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `tartanctl ARGS` in the infra namespace, whatever its exit status: whether it
    /// succeeded, stdout and stderr.
    pub fn tartanctl_status(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let mut c = ns_command(&self.infra, &self.bins.tartanctl);
        c.env("TARTAN_ETCD_ENDPOINTS", self.local_endpoints())
            .args(self.tls_client_args(true))
            .args(args)
            .stdin(Stdio::null());
        let out = c.output().with_context(|| format!("running {c:?}"))?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Writes the network config with `tartanctl network init`.
    pub fn init_network(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["network", "init"];
        full.extend_from_slice(args);
        self.tartanctl(&full).map(|_| ())
    }

    /// The flags that tell tartand which node of the lab it is: etcd (with TLS when on),
    /// node name, interface, subnet.env and state directory.
    fn node_args(&self, i: usize) -> Vec<String> {
        let n = &self.nodes[i];
        let mut args: Vec<String> = [
            "--etcd-endpoints",
            &self.etcd_endpoint(),
            "--node-name",
            &n.name,
            "--iface",
            "eth0",
            "--subnet-file",
            &n.subnet_file().to_string_lossy(),
            "--state-dir",
            &n.dir.join("state").to_string_lossy(),
        ]
        .map(String::from)
        .into();
        args.extend(self.tls_client_args(true));
        args
    }

    /// Starts tartand on node `i` with the lab defaults plus `extra` flags.
    pub fn start_daemon(&mut self, i: usize, extra: &[&str]) -> Result<()> {
        let node_args = self.node_args(i);
        let tartand = self.bins.tartand.clone();
        let n = &mut self.nodes[i];
        if n.daemon.is_some() {
            bail!("tartand already runs on {}", n.name);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.log_file())?;
        // The cluster DNS forwards to the host's resolvers unless told otherwise: in the lab
        // it gets none (names outside the zone are REFUSED), so no query leaves for an
        // address outside the lab; a test that wants an upstream passes its own flag.
        let mut dns = Vec::new();
        if !extra
            .iter()
            .any(|a| a.starts_with("--dns-upstream") || a.starts_with("--dns-resolv-conf"))
        {
            let resolv = n.dir.join("resolv.conf");
            std::fs::write(&resolv, "# the lab's nodes have no upstream resolver\n")?;
            dns.push("--dns-resolv-conf".to_string());
            dns.push(resolv.to_string_lossy().into_owned());
        }
        let child = ns_command(&n.ns, &tartand)
            .env(
                "RUST_LOG",
                std::env::var("TARTAN_LOG").unwrap_or_else(|_| "info".into()),
            )
            .args(&node_args)
            .args([
                "--resync-secs",
                "5",
                "--cni-conf-dir",
                &n.cni_conf_dir().to_string_lossy(),
                "--cni-data-dir",
                &n.cni_data_dir().to_string_lossy(),
                "--cni-socket",
                &n.cni_socket().to_string_lossy(),
            ])
            .args(&dns)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting tartand")?;
        n.daemon = Some(child);
        Ok(())
    }

    /// Stops tartand on node `i` with SIGTERM (dataplane stays) and waits for it to exit.
    pub fn stop_daemon(&mut self, i: usize) -> Result<()> {
        let n = &mut self.nodes[i];
        let Some(mut c) = n.daemon.take() else {
            return Ok(());
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let start = Instant::now();
        loop {
            if c.try_wait()?.is_some() {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = c.kill();
                let _ = c.wait();
                bail!("tartand on {} ignored SIGTERM for 10 s", n.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs `tartand --leave` on node `i` (its daemon stopped) with the lab's paths for it;
    /// fails with its stderr.
    pub fn leave(&self, i: usize) -> Result<()> {
        run(ns_command(&self.nodes[i].ns, &self.bins.tartand)
            .args(self.node_args(i))
            .arg("--leave"))
        .map(|_| ())
    }

    /// Kills tartand on node `i` with SIGKILL, as a crash or the OOM killer would, and reaps it.
    pub fn kill_daemon(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.nodes[i].daemon.take() {
            c.kill().context("killing tartand")?;
            c.wait().context("reaping tartand")?;
        }
        Ok(())
    }

    /// The index of the etcd member that leads the cluster now.
    pub fn etcd_leader(&self) -> Result<usize> {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("etcdctl endpoint status")?;
        for (m, st) in v.as_array().into_iter().flatten().enumerate() {
            let (id, leader) = (
                &st["Status"]["header"]["member_id"],
                &st["Status"]["leader"],
            );
            if !id.is_null() && id == leader {
                let port: u16 = st["Endpoint"]
                    .as_str()
                    .and_then(|e| e.rsplit(':').next())
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(ETCD_PORT + 10000 * m as u16);
                return Ok(usize::from((port - ETCD_PORT) / 10000));
            }
        }
        bail!("no etcd member is the leader: {out}")
    }

    /// Whether tartand on node `i` is still running (false after it exited or crashed).
    pub fn daemon_running(&mut self, i: usize) -> bool {
        match self.nodes[i].daemon.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits for node `i`'s subnet.env and returns the node subnet from it.
    pub fn wait_subnet(&self, i: usize) -> Result<ipnetwork::Ipv4Network> {
        let path = self.nodes[i].subnet_file();
        wait_for(
            &format!("{} to write subnet.env", self.nodes[i].name),
            Duration::from_secs(60),
            || {
                let t = std::fs::read_to_string(&path).ok()?;
                crate::model::subnet_env::SubnetEnv::parse(&t)
                    .ok()
                    .map(|e| e.subnet)
            },
        )
        .with_context(|| format!("its log ends:\n{}", self.log_tail(i, 40)))
    }

    /// The tail of node `i`'s daemon log (for failure messages).
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let t = std::fs::read_to_string(self.nodes[i].log_file()).unwrap_or_default();
        let v: Vec<&str> = t.lines().collect();
        v[v.len().saturating_sub(lines)..].join("\n")
    }

    /// Creates a pod namespace on node `i` by hand: bridge `tbr0` (first address of the node
    /// subnet) in the node, a veth into the pod with the `k`-th free address.
    pub fn add_manual_pod(&mut self, i: usize, k: u8) -> Result<LabPod> {
        let subnet = self.wait_subnet(i)?;
        let node_ns = self.nodes[i].ns.clone();
        let pod_ns = format!("{}-n{}-p{k}", self.id, i + 1);
        let gw = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        let pod_ip = Ipv4Addr::from(u32::from(subnet.network()) + 1 + u32::from(k));
        if ip(&["-n", &node_ns, "link", "show", "tbr0"]).is_err() {
            ip(&["-n", &node_ns, "link", "add", "tbr0", "type", "bridge"])?;
            ip(&[
                "-n",
                &node_ns,
                "addr",
                "add",
                &format!("{gw}/{}", subnet.prefix()),
                "dev",
                "tbr0",
            ])?;
            ip(&["-n", &node_ns, "link", "set", "tbr0", "up"])?;
        }
        ip(&["netns", "add", &pod_ns])?;
        self.extra_ns.push(pod_ns.clone());
        let mtu = std::fs::read_to_string(self.nodes[i].subnet_file())
            .ok()
            .and_then(|t| crate::model::subnet_env::SubnetEnv::parse(&t).ok())
            .map_or(1450, |e| e.mtu)
            .to_string();
        let host_if = format!("vp{k}");
        ip(&[
            "-n", &node_ns, "link", "add", &host_if, "mtu", &mtu, "type", "veth", "peer", "name",
            "eth0", "mtu", &mtu, "netns", &pod_ns,
        ])?;
        ip(&[
            "-n", &node_ns, "link", "set", &host_if, "master", "tbr0", "up",
        ])?;
        // Hairpin, as the CNI plugin sets it, so a pod can reach itself through a service.
        ip(&[
            "-n",
            &node_ns,
            "link",
            "set",
            &host_if,
            "type",
            "bridge_slave",
            "hairpin",
            "on",
        ])?;
        ip(&["-n", &pod_ns, "link", "set", "lo", "up"])?;
        address_up_default_route(
            &pod_ns,
            "eth0",
            &format!("{pod_ip}/{}", subnet.prefix()),
            &gw.to_string(),
        )?;
        Ok(LabPod {
            ns: pod_ns,
            ip: pod_ip,
            ip6: None,
        })
    }

    /// Runs tartan-cni (`CNI_COMMAND=command`) on node `i` for the pod namespace `pod_ns`, with
    /// the conflist tartand installed there, as a runtime would; returns stdout.
    pub fn cni_call(
        &self,
        i: usize,
        command: &str,
        pod_ns: &str,
        container_id: &str,
        k8s: (&str, &str),
        labels: &[(&str, &str)],
    ) -> Result<String> {
        let node = &self.nodes[i];
        let path = node.cni_conf_dir().join("10-tartan.conflist");
        let text = wait_for("tartand's CNI config", Duration::from_secs(30), || {
            std::fs::read_to_string(&path).ok()
        })?;
        let conflist: serde_json::Value =
            serde_json::from_str(&text).context("installed conflist")?;
        let mut conf = conflist["plugins"][0].clone();
        conf["cniVersion"] = conflist["cniVersion"].clone();
        conf["name"] = conflist["name"].clone();
        let labels: Vec<serde_json::Value> = labels
            .iter()
            .map(|(k, v)| serde_json::json!({"key": k, "value": v}))
            .collect();
        conf["args"] = serde_json::json!({"cni": {"labels": labels}});
        let plugin_dir = self
            .bins
            .tartan_cni
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut cmd = Command::new(&self.bins.tartan_cni);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_PATH", plugin_dir)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", format!("{NETNS_DIR}/{pod_ns}"))
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!("K8S_POD_NAMESPACE={};K8S_POD_NAME={}", k8s.0, k8s.1),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let stdin = conf.to_string();
        let out = in_netns(&node.ns, move || -> Result<Output> {
            use std::io::Write;
            let mut child = cmd.spawn().context("starting tartan-cni")?;
            if let Some(mut w) = child.stdin.take() {
                let _ = w.write_all(stdin.as_bytes());
            }
            child.wait_with_output().context("waiting for tartan-cni")
        })??;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!("tartan-cni {command} failed: {stdout}");
        }
        Ok(stdout)
    }

    /// Starts a pod on node `i` the way a runtime does: a fresh namespace, then tartan-cni ADD
    /// with Kubernetes-style arguments (namespace `default`, name `name`) and `labels`, which
    /// registers the pod in etcd through tartand.
    pub fn add_cni_pod(&mut self, i: usize, name: &str, labels: &[(&str, &str)]) -> Result<LabPod> {
        let ns = format!("{}-n{}-{name}", self.id, i + 1);
        ip(&["netns", "add", &ns])?;
        self.extra_ns.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        let out = self.cni_call(i, "ADD", &ns, name, ("default", name), labels)?;
        let v: serde_json::Value = serde_json::from_str(&out).context("ADD result")?;
        let ip_text = v["ips"][0]["address"]
            .as_str()
            .context("no address in the ADD result")?;
        let addr: Ipv4Addr = ip_text
            .split('/')
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("ADD result address {ip_text:?}"))?;
        // A dual-stack pod's IPv6 address is the result's other entry.
        let ip6 = v["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["address"].as_str()?.split('/').next()?.parse().ok())
            .next();
        Ok(LabPod { ns, ip: addr, ip6 })
    }

    /// Removes a pod started with [`Lab::add_cni_pod`] (tartan-cni DEL, then its namespace).
    pub fn del_cni_pod(&mut self, i: usize, name: &str, pod: &LabPod) -> Result<()> {
        self.cni_call(i, "DEL", &pod.ns, name, ("default", name), &[])?;
        delete_ns(&pod.ns);
        Ok(())
    }

    /// Creates an empty namespace owned by the lab (removed on drop).
    pub fn add_namespace(&mut self, suffix: &str) -> Result<String> {
        let ns = format!("{}-{suffix}", self.id);
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        self.extra_ns.push(ns.clone());
        Ok(ns)
    }

    /// Keeps the namespaces after drop (for `--keep` and debugging).
    pub fn keep(&mut self, keep: bool) {
        self.keep = keep;
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep {
            eprintln!(
                "lab {} kept (namespaces {}-*, dir {})",
                self.id,
                self.id,
                self.dir.display()
            );
            return;
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.daemon.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.stop_etcd();
        for ns in self.extra_ns.iter().rev() {
            delete_ns(ns);
        }
        delete_ns(&self.infra);
        for m in 0..self.etcd_members.max(1) {
            let _ = std::fs::remove_dir_all(
                Path::new("/dev/shm").join(format!("tartan-etcd-{}-m{m}", self.id)),
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes every namespace, etcd data directory and lab directory whose name starts with
/// `prefix` (e.g. `tt<pid>x`, everything this process created) when SIGINT or SIGTERM arrives,
/// then exits with status 130. The handlers are installed before this returns and run on a
/// thread of their own. No signal is blocked: processes the lab starts later (tartand, etcd,
/// probes) inherit the signal mask, and a blocked SIGTERM would make them deaf to it.
pub fn cleanup_on_signal(prefix: &str) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("starting the signal watcher's runtime")?;
    let (mut int, mut term) = rt
        .block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            ))
        })
        .context("installing SIGINT/SIGTERM handlers")?;
    let prefix = prefix.to_string();
    std::thread::Builder::new()
        .name("lab-cleanup".into())
        .spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            });
            eprintln!("\ninterrupted: removing everything this run created");
            if let Ok(rd) = std::fs::read_dir(NETNS_DIR) {
                let mut names: Vec<String> = rd
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&prefix))
                    .collect();
                names.sort_by_key(|n| std::cmp::Reverse(n.len()));
                for n in names {
                    delete_ns(&n);
                }
            }
            for (dir, p) in [
                (PathBuf::from("/dev/shm"), format!("tartan-etcd-{prefix}")),
                (std::env::temp_dir(), format!("tartan-lab-{prefix}")),
            ] {
                if let Ok(rd) = std::fs::read_dir(&dir) {
                    for e in rd.flatten() {
                        if e.file_name().to_string_lossy().starts_with(&p) {
                            let _ = std::fs::remove_dir_all(e.path());
                        }
                    }
                }
            }
            std::process::exit(130);
        })
        .context("starting the signal watcher")?;
    Ok(())
}
