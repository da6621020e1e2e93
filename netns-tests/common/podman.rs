//! podman as a real container runtime on a lab node, with the CNI backend and tartand's
//! installed conflist (the CNI and DNS tests run containers with it).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tartan::cni::ipam::scan_all;
use tartan::lab::{Lab, NETNS_DIR, wait_for};

/// The Debian reference plugins (containernetworking-plugins).
pub const REF_PLUGINS: &str = "/usr/lib/cni";

fn netns_path(ns: &str) -> String {
    format!("{NETNS_DIR}/{ns}")
}

/// Starts tartand on each of the first `nodes` nodes of `lab` with the plugin installed in
/// the node's CNI directory (`--cni-bin-dir`) and `extra` flags, and waits until every node
/// has its subnet, its conflist and the installed plugin.
pub fn start_daemons_for_podman(lab: &mut Lab, nodes: usize, extra: &[&str]) -> Result<()> {
    ensure!(
        Command::new("podman").arg("--version").output().is_ok(),
        "podman is missing: install podman and runc (make deps)"
    );
    for i in 0..nodes {
        let bin = lab.nodes[i].cni_dir().join("bin");
        let bin_s = bin.to_string_lossy().into_owned();
        let mut args = vec!["--cni-bin-dir", bin_s.as_str()];
        args.extend_from_slice(extra);
        lab.start_daemon(i, &args)?;
    }
    for i in 0..nodes {
        lab.wait_subnet(i)?;
        let n = &lab.nodes[i];
        for f in [
            n.cni_conf_dir().join("10-tartan.conflist"),
            n.cni_dir().join("bin").join("tartan-cni"),
        ] {
            wait_for(
                &format!("{} installed", f.display()),
                Duration::from_secs(30),
                || f.exists().then_some(()),
            )?;
        }
    }
    Ok(())
}

/// podman with the CNI backend, isolated in the lab's directory; removes every container it
/// started (and any namespace they left) on drop, also when the test fails.
pub struct Podman {
    node_ns: String,
    /// Its state directory (root, run, tmp, and room for rootfs trees).
    pub dir: PathBuf,
    conf_file: PathBuf,
    conf_dir: PathBuf,
    data_dir: PathBuf,
}

impl Podman {
    /// podman for node `i`, with the plugins of `bin_dir` and the reference plugins.
    pub fn new(lab: &Lab, i: usize, bin_dir: &Path) -> Result<Podman> {
        let n = &lab.nodes[i];
        let dir = lab.dir.join(format!("podman{i}"));
        std::fs::create_dir_all(&dir)?;
        let conf_file = dir.join("containers.conf");
        std::fs::write(
            &conf_file,
            format!(
                "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"{REF_PLUGINS}\"]\nnetwork_config_dir = \"{}\"\n\n[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"none\"\nruntime = \"runc\"\n",
                bin_dir.display(),
                n.cni_conf_dir().display()
            ),
        )?;
        Ok(Podman {
            node_ns: n.ns.clone(),
            dir,
            conf_file,
            conf_dir: n.cni_conf_dir(),
            data_dir: n.cni_data_dir(),
        })
    }

    /// `podman ARGS` in the node's namespace, with this instance's state and config.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", netns_path(&self.node_ns)))
            .arg("--")
            .arg("podman")
            .env("CONTAINERS_CONF", &self.conf_file)
            .args(["--root", &self.dir.join("root").to_string_lossy()])
            .args(["--runroot", &self.dir.join("run").to_string_lossy()])
            .args(["--tmpdir", &self.dir.join("tmp").to_string_lossy()])
            .args(["--storage-driver", "vfs"])
            .args(["--network-backend", "cni"])
            .args(["--network-config-dir", &self.conf_dir.to_string_lossy()])
            .args(["--runtime", "runc"])
            .args(["--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "none"])
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// Runs `podman ARGS`; returns its trimmed stdout, failing with its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = self
            .command(args)
            .output()
            .with_context(|| format!("podman {args:?}"))?;
        if !out.status.success() {
            bail!(
                "podman {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `podman run` on the tartan network: `mode` (`-d` or `--rm`), named `name`, `extra`
    /// flags, in `rootfs`, running `command`.
    fn run_args<'a>(
        mode: &'a str,
        name: &'a str,
        extra: &[&'a str],
        rootfs: &'a str,
        command: &[&'a str],
    ) -> Vec<&'a str> {
        let mut args = vec![
            "run",
            mode,
            "--name",
            name,
            "--network",
            "tartan",
            // podman's default limits exceed what the lab may set.
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=1000:1000",
        ];
        args.extend_from_slice(extra);
        args.extend(["--rootfs", rootfs]);
        args.extend_from_slice(command);
        args
    }

    /// Starts a busybox httpd container (port 8080) named `name` on the tartan network, in a
    /// fresh rootfs whose page is `page`, with `extra` flags for `podman run`; its id.
    pub fn run_busybox(&self, name: &str, page: &str, extra: &[&str]) -> Result<String> {
        let rootfs = self.dir.join(format!("rootfs-{name}"));
        busybox_rootfs(&rootfs, page)?;
        let rootfs_s = rootfs.to_string_lossy().into_owned();
        let httpd = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"];
        self.run(&Self::run_args("-d", name, extra, &rootfs_s, &httpd))
    }

    /// Runs `sh -c script` as the main process of a new container on the tartan network
    /// (removed when it exits), in the rootfs `rootfs-{rootfs}` (made on first use), with
    /// `extra` flags for `podman run`; its output and error output together, whatever its
    /// exit status. The container's own process rather than `podman exec`, so the files it
    /// sees are the container's whatever `exec` does on this machine.
    pub fn run_script(
        &self,
        rootfs: &str,
        name: &str,
        extra: &[&str],
        script: &str,
    ) -> Result<String> {
        let dir = self.dir.join(format!("rootfs-{rootfs}"));
        if !dir.join("bin/busybox").exists() {
            busybox_rootfs(&dir, "")?;
        }
        let dir_s = dir.to_string_lossy().into_owned();
        let sh = ["/bin/busybox", "sh", "-c", script];
        let args = Self::run_args("--rm", name, extra, &dir_s, &sh);
        let out = self
            .command(&args)
            .output()
            .with_context(|| format!("podman {args:?}"))?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// The address tartan-cni gave the container (from the IPAM directory).
    pub fn container_ip(&self, id: &str) -> Result<Ipv4Addr> {
        scan_all(&self.data_dir)?
            .into_iter()
            .find(|r| r.container_id == id)
            .map(|r| r.ip)
            .with_context(|| format!("no allocation for container {id}"))
    }

    /// The IPv6 address tartan-cni gave the container (dual-stack networks).
    pub fn container_ip6(&self, id: &str) -> Result<std::net::Ipv6Addr> {
        scan_all(&self.data_dir)?
            .into_iter()
            .find(|r| r.container_id == id)
            .and_then(|r| r.ip6)
            .with_context(|| format!("no IPv6 allocation for container {id}"))
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if std::env::var("TARTAN_KEEP_LAB").as_deref() == Ok("1") {
            eprintln!("containers kept: podman state in {}", self.dir.display());
            return;
        }
        let netns: Vec<String> = scan_all(&self.data_dir)
            .map(|v| v.into_iter().map(|r| r.netns).collect())
            .unwrap_or_default();
        let _ = self
            .command(&["rm", "--all", "--force", "--time", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        for p in netns {
            if let Some(name) = p.strip_prefix(&format!("{NETNS_DIR}/"))
                && (name.starts_with("cni-") || name.starts_with("netns-"))
                && Path::new(&p).exists()
            {
                tartan::lab::delete_ns(name);
            }
        }
    }
}

/// A root filesystem of the static busybox, `/www/index.html` holding `page`.
pub fn busybox_rootfs(dir: &Path, page: &str) -> Result<()> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("busybox is missing: install busybox-static (make deps)")?;
    let file = Command::new("file").arg(busybox).output();
    if let Ok(f) = file
        && String::from_utf8_lossy(&f.stdout).contains("dynamically linked")
    {
        bail!("{busybox} is dynamically linked: install busybox-static (make deps)");
    }
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "www", "run"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy(busybox, dir.join("bin/busybox"))?;
    std::os::unix::fs::symlink("busybox", dir.join("bin/sh"))?;
    std::fs::write(dir.join("www/index.html"), page)?;
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
    std::fs::write(dir.join("etc/group"), "root:x:0:\n")?;
    Ok(())
}
