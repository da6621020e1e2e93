//! CNI plugin tests: the real `tartan-cni` binary called as runtimes call it (one process per
//! call, environment + stdin), real tartand and etcd, real namespaces; chained Debian
//! reference plugins; podman as a real container runtime.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::podman::{Podman, start_daemons_for_podman};
use common::*;
use serde_json::{Value, json};
use tartan::cni::ipam::scan_all;
use tartan::lab::{Lab, NETNS_DIR, in_netns, ip, ns_run, wait_for};

const NET16: &[&str] = &["--network", "10.244.0.0/16"];
const REF_PLUGINS: &str = "/usr/lib/cni";

/// What one plugin call gave back.
#[derive(Debug)]
struct CniOut {
    status: Option<i32>,
    stdout: String,
    stderr: String,
}

impl CniOut {
    fn from_output(o: Output) -> CniOut {
        CniOut {
            status: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Succeeded: the result (or `Null` for verbs that print nothing).
    fn ok(&self) -> Result<Value> {
        ensure!(
            self.status == Some(0),
            "plugin failed ({:?}): stdout {} stderr {}",
            self.status,
            self.stdout,
            self.stderr
        );
        if self.stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&self.stdout).with_context(|| format!("result {:?}", self.stdout))
    }

    /// Failed with a spec error object: its code.
    fn error_code(&self) -> Result<u64> {
        ensure!(
            self.status.is_some_and(|s| s != 0),
            "expected a failure, got {:?}: {}",
            self.status,
            self.stdout
        );
        ensure!(
            !self.stderr.contains("panicked"),
            "the plugin panicked: {}",
            self.stderr
        );
        let v: Value = serde_json::from_str(self.stdout.trim())
            .with_context(|| format!("error object {:?}", self.stdout))?;
        ensure!(v["msg"].is_string(), "no msg in {v}");
        v["code"]
            .as_u64()
            .with_context(|| format!("no code in {v}"))
    }
}

/// One plugin invocation.
struct Call<'a> {
    plugin: &'a Path,
    command: &'a str,
    cid: &'a str,
    netns: Option<String>,
    ifname: &'a str,
    args: &'a str,
}

impl<'a> Call<'a> {
    fn new(plugin: &'a Path, command: &'a str, cid: &'a str) -> Call<'a> {
        Call {
            plugin,
            command,
            cid,
            netns: None,
            ifname: "eth0",
            args: "",
        }
    }
    fn netns(mut self, ns: &str) -> Self {
        self.netns = Some(netns_path(ns));
        self
    }
    fn netns_path(mut self, p: &str) -> Self {
        self.netns = Some(p.to_string());
        self
    }
    fn ifname(mut self, i: &'a str) -> Self {
        self.ifname = i;
        self
    }
    fn args(mut self, a: &'a str) -> Self {
        self.args = a;
        self
    }

    fn command(&self) -> Command {
        let mut c = Command::new(self.plugin);
        c.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_PATH", cni_path(self.plugin))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in [
            ("CNI_COMMAND", self.command),
            ("CNI_CONTAINERID", self.cid),
            ("CNI_IFNAME", self.ifname),
            ("CNI_ARGS", self.args),
        ] {
            if !v.is_empty() {
                c.env(k, v);
            }
        }
        if let Some(n) = &self.netns {
            c.env("CNI_NETNS", n);
        }
        c
    }

    /// Runs the plugin inside `ns` with `stdin`.
    fn run(&self, ns: &str, stdin: &Value) -> Result<CniOut> {
        let stdin = if stdin.is_null() {
            Vec::new()
        } else {
            stdin.to_string().into_bytes()
        };
        self.run_raw(ns, &stdin)
    }

    fn run_raw(&self, ns: &str, stdin: &[u8]) -> Result<CniOut> {
        let mut cmd = self.command();
        let stdin = stdin.to_vec();
        let out = in_netns(ns, move || -> Result<Output> {
            let child = cmd.spawn().context("starting the plugin")?;
            finish(child, &stdin)
        })??;
        Ok(CniOut::from_output(out))
    }
}

fn finish(mut child: Child, stdin: &[u8]) -> Result<Output> {
    if let Some(mut i) = child.stdin.take() {
        // A plugin that fails early may not read stdin: a broken pipe is fine.
        let _ = i.write_all(stdin);
    }
    child.wait_with_output().context("waiting for the plugin")
}

fn cni_path(plugin: &Path) -> String {
    let own = plugin
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{own}:{REF_PLUGINS}")
}

fn netns_path(ns: &str) -> String {
    format!("{NETNS_DIR}/{ns}")
}

/// Waits for tartand's conflist on node `i` and returns it.
fn installed_conflist(lab: &Lab, i: usize) -> Result<Value> {
    let path = lab.nodes[i].cni_conf_dir().join("10-tartan.conflist");
    let text = wait_for("the installed conflist", Duration::from_secs(30), || {
        std::fs::read_to_string(&path).ok()
    })?;
    serde_json::from_str(&text).context("conflist JSON")
}

/// The config a runtime hands the first plugin of the installed conflist.
fn plugin_conf(conflist: &Value, version: &str) -> Value {
    let mut c = conflist["plugins"][0].clone();
    c["cniVersion"] = json!(version);
    c["name"] = conflist["name"].clone();
    c
}

/// A lab of `nodes` nodes with tartand on each, every subnet leased.
fn cluster(nodes: usize) -> Result<Option<Lab>> {
    let Some(mut lab) = lab(nodes, NET16)? else {
        return Ok(None);
    };
    for i in 0..nodes {
        lab.start_daemon(i, &[])?;
    }
    for i in 0..nodes {
        lab.wait_subnet(i)?;
    }
    Ok(Some(lab))
}

/// One node with tartand running: the lab, the node's namespace, the installed config as a
/// runtime hands it to the first plugin (at `version`) and the plugin binary; `None` when
/// opted out of root tests.
fn one_node(version: &str) -> Result<Option<(Lab, String, Value, PathBuf)>> {
    let Some(lab) = cluster(1)? else {
        return Ok(None);
    };
    let node = lab.nodes[0].ns.clone();
    let conf = plugin_conf(&installed_conflist(&lab, 0)?, version);
    let plugin = lab.bins.tartan_cni.clone();
    Ok(Some((lab, node, conf, plugin)))
}

fn pod_key(node: &str, cid: &str, ifname: &str) -> String {
    format!("/tartan/pods/{node}/{cid}/{ifname}")
}

/// The pod record of an attachment and its etcd lease, once present.
fn pod_record(lab: &Lab, key: &str) -> Option<(Value, i64)> {
    let out = lab.etcdctl(&["get", key, "-w", "json"]).ok()?;
    let v: Value = serde_json::from_str(&out).ok()?;
    let kv = v["kvs"].get(0)?;
    let value = kv["value"].as_str()?;
    let bytes = base64_decode(value)?;
    Some((serde_json::from_slice(&bytes).ok()?, kv["lease"].as_i64()?))
}

fn wait_pod_record(lab: &Lab, key: &str) -> Result<(Value, i64)> {
    wait_for(
        &format!("pod record {key}"),
        Duration::from_secs(15),
        || pod_record(lab, key),
    )
}

fn wait_pod_record_gone(lab: &Lab, key: &str, deadline: Duration) -> Result<()> {
    wait_for(&format!("pod record {key} to go"), deadline, || {
        pod_record(lab, key).is_none().then_some(())
    })
}

fn count_pod_records(lab: &Lab, node: &str) -> usize {
    lab.etcdctl(&[
        "get",
        "--prefix",
        "--keys-only",
        &format!("/tartan/pods/{node}/"),
    ])
    .map(|o| o.lines().filter(|l| !l.trim().is_empty()).count())
    .unwrap_or(usize::MAX)
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = T.iter().position(|t| *t == c)? as u32;
        buf = (buf << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    Some(out)
}

fn result_ip(result: &Value) -> Result<Ipv4Addr> {
    let a = result["ips"][0]["address"]
        .as_str()
        .with_context(|| format!("no address in {result}"))?;
    let ip = a.split('/').next().unwrap_or_default();
    ip.parse().with_context(|| format!("address {a}"))
}

fn host_veth(result: &Value) -> Result<String> {
    result["interfaces"][1]["name"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no host interface in {result}"))
}

fn link_exists(ns: &str, dev: &str) -> bool {
    ip(&["-n", ns, "link", "show", dev]).is_ok()
}

/// After DEL: the host end is cut off at once (down) or already gone, and
/// tartand's reaper deletes the pair shortly after.
fn assert_detached_then_reaped(node: &str, host: &str, pod: Option<&str>) -> Result<()> {
    if let Ok(l) = ip(&["-n", node, "-d", "link", "show", host]) {
        ensure!(
            !l.contains(",UP") && l.contains("state DOWN"),
            "DEL left {host} up: {l}"
        );
    }
    wait_for(
        &format!("{host} to be reaped"),
        Duration::from_secs(10),
        || (!link_exists(node, host)).then_some(()),
    )?;
    if let Some(p) = pod {
        ensure!(!link_exists(p, "eth0"), "pod eth0 left in {p}");
    }
    Ok(())
}

/// Addresses allocated in network `tartan` (the installed conflist's) on node `i`.
fn ipam_ips(lab: &Lab, i: usize) -> Result<BTreeSet<Ipv4Addr>> {
    Ok(scan_all(&lab.nodes[i].cni_data_dir())?
        .into_iter()
        .filter(|r| r.network == "tartan")
        .map(|r| r.ip)
        .collect())
}

#[test]
fn add_check_del_round_trip_registers_the_pod() -> Result<()> {
    let Some(mut lab) = cluster(1)? else {
        return Ok(());
    };
    let node = lab.nodes[0].ns.clone();
    let subnet = lab.wait_subnet(0)?;
    let list = installed_conflist(&lab, 0)?;
    ensure!(list["cniVersion"] == "1.0.0", "{list}");
    ensure!(list["plugins"][0]["type"] == "tartan-cni", "{list}");
    ensure!(list["plugins"][1]["type"] == "portmap", "{list}");
    let mut conf = plugin_conf(&list, "1.0.0");
    conf["args"] = json!({"cni": {"labels": [{"key": "app", "value": "web"}]}});
    let pod = lab.add_namespace("p1")?;
    let plugin = lab.bins.tartan_cni.clone();
    let cid = "c0ffee01";
    let add = Call::new(&plugin, "ADD", cid)
        .netns(&pod)
        .args("IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web-0");
    let result = add.run(&node, &conf)?.ok()?;

    // The result, per spec 1.0.0.
    ensure!(result["cniVersion"] == "1.0.0", "{result}");
    let pod_ip = result_ip(&result)?;
    ensure!(subnet.contains(pod_ip), "{pod_ip} not in {subnet}");
    let gw = Ipv4Addr::from(u32::from(subnet.network()) + 1);
    ensure!(result["ips"][0]["gateway"] == gw.to_string(), "{result}");
    ensure!(result["ips"][0]["interface"] == 2, "{result}");
    ensure!(result["ips"][0].get("version").is_none(), "{result}");
    ensure!(result["interfaces"][0]["name"] == "tartan0", "{result}");
    ensure!(result["interfaces"][2]["name"] == "eth0", "{result}");
    ensure!(
        result["interfaces"][2]["sandbox"] == netns_path(&pod),
        "{result}"
    );
    ensure!(result["routes"][0]["dst"] == "0.0.0.0/0", "{result}");
    let host = host_veth(&result)?;

    // The kernel: bridge with the gateway, hairpin port, pod address, route and MTU.
    let br = ip(&["-n", &node, "-d", "addr", "show", "tartan0"])?;
    ensure!(br.contains(&format!("inet {gw}/24")), "{br}");
    let port = ip(&["-n", &node, "-d", "link", "show", &host])?;
    ensure!(
        port.contains("master tartan0") && port.contains("hairpin on"),
        "{port}"
    );
    ensure!(port.contains("mtu 1450"), "{port}");
    let eth0 = ip(&["-n", &pod, "addr", "show", "eth0"])?;
    ensure!(eth0.contains(&format!("inet {pod_ip}/24")), "{eth0}");
    ensure!(eth0.contains("mtu 1450") && eth0.contains(",UP"), "{eth0}");
    let routes = ip(&["-n", &pod, "route"])?;
    ensure!(
        routes.contains(&format!("default via {gw} dev eth0")),
        "{routes}"
    );
    echo_server(&pod, 7100)?;
    wait_tcp_echo(&node, pod_ip, 7100, Duration::from_secs(10))?;

    // Registered in etcd under the node's liveness lease.
    let key = pod_key("node1", cid, "eth0");
    let (rec, lease) = wait_pod_record(&lab, &key)?;
    ensure!(rec["ip"] == pod_ip.to_string(), "{rec}");
    ensure!(
        rec["namespace"] == "prod" && rec["name"] == "web-0",
        "{rec}"
    );
    ensure!(rec["labels"]["app"] == "web", "{rec}");
    ensure!(rec["node"] == "node1", "{rec}");
    ensure!(lease != 0, "pod record without a lease");

    // The same attachment asking again gets the same address.
    let again = add.run(&node, &conf)?.ok()?;
    ensure!(result_ip(&again)? == pod_ip, "{again}");

    // CHECK against the result passes; against a broken container it fails.
    let mut check_conf = conf.clone();
    check_conf["prevResult"] = again.clone();
    Call::new(&plugin, "CHECK", cid)
        .netns(&pod)
        .run(&node, &check_conf)?
        .ok()?;
    ip(&["-n", &pod, "route", "del", "default"])?;
    let code = Call::new(&plugin, "CHECK", cid)
        .netns(&pod)
        .run(&node, &check_conf)?
        .error_code()?;
    ensure!(code == 103, "CHECK with a missing route: code {code}");
    let mut no_prev = conf.clone();
    no_prev["cniVersion"] = json!("0.4.0");
    let code = Call::new(&plugin, "CHECK", cid)
        .netns(&pod)
        .run(&node, &no_prev)?
        .error_code()?;
    ensure!(code == 7, "CHECK without prevResult: code {code}");

    // DEL, twice.
    for round in 0..2 {
        Call::new(&plugin, "DEL", cid)
            .netns(&pod)
            .run(&node, &check_conf)?
            .ok()
            .with_context(|| format!("DEL #{}", round + 1))?;
    }
    ensure!(ipam_ips(&lab, 0)?.is_empty(), "allocation left");
    assert_detached_then_reaped(&node, &host, Some(&pod))?;
    // The nudge removes the record at once (the periodic rescan is 10 s away).
    wait_pod_record_gone(&lab, &key, Duration::from_secs(3))?;

    // Older spec versions get results in their own format.
    for v in ["0.3.0", "0.3.1", "0.4.0", "1.1.0"] {
        let c = plugin_conf(&list, v);
        let r = Call::new(&plugin, "ADD", cid)
            .netns(&pod)
            .run(&node, &c)?
            .ok()?;
        ensure!(r["cniVersion"] == v, "{r}");
        if v.starts_with("0.") {
            ensure!(r["ips"][0]["version"] == "4", "{v}: {r}");
        } else {
            ensure!(r["ips"][0].get("version").is_none(), "{v}: {r}");
            ensure!(r["interfaces"][2]["mtu"] == 1450, "{v}: {r}");
        }
        if v == "0.3.0" || v == "0.3.1" {
            let mut cc = c.clone();
            cc["prevResult"] = r.clone();
            let code = Call::new(&plugin, "CHECK", cid)
                .netns(&pod)
                .run(&node, &cc)?
                .error_code()?;
            ensure!(code == 1, "CHECK at {v}: code {code}");
        } else {
            let mut cc = c.clone();
            cc["prevResult"] = r.clone();
            Call::new(&plugin, "CHECK", cid)
                .netns(&pod)
                .run(&node, &cc)?
                .ok()
                .with_context(|| format!("CHECK at {v}"))?;
        }
        Call::new(&plugin, "DEL", cid)
            .netns(&pod)
            .run(&node, &c)?
            .ok()?;
    }
    ensure!(ipam_ips(&lab, 0)?.is_empty(), "allocation left");

    // Another container into the same namespace right after a DEL, before tartand reaped
    // the detached pair (its eth0 still sits in the namespace): ADD frees the name itself.
    Call::new(&plugin, "ADD", "first")
        .netns(&pod)
        .run(&node, &conf)?
        .ok()?;
    Call::new(&plugin, "DEL", "first")
        .netns(&pod)
        .run(&node, &conf)?
        .ok()?;
    let r = Call::new(&plugin, "ADD", "second")
        .netns(&pod)
        .run(&node, &conf)?
        .ok()
        .context("ADD into a namespace with a detached pair")?;
    let eth0 = ip(&["-n", &pod, "addr", "show", "eth0"])?;
    ensure!(eth0.contains(&result_ip(&r)?.to_string()), "{eth0}");
    Ok(())
}

#[test]
fn del_succeeds_when_the_netns_is_already_gone() -> Result<()> {
    let Some((mut lab, node, conf, plugin)) = one_node("1.0.0")? else {
        return Ok(());
    };
    let pod = lab.add_namespace("gone")?;
    let r = Call::new(&plugin, "ADD", "gone1")
        .netns(&pod)
        .run(&node, &conf)?
        .ok()?;
    let host = host_veth(&r)?;
    wait_pod_record(&lab, &pod_key("node1", "gone1", "eth0"))?;
    // The runtime tears the namespace down before DEL (it happens: crashes, reboots).
    ip(&["netns", "del", &pod])?;
    wait_for(
        "veth to go with its namespace",
        Duration::from_secs(10),
        || (!link_exists(&node, &host)).then_some(()),
    )?;
    for _ in 0..2 {
        Call::new(&plugin, "DEL", "gone1")
            .netns(&pod)
            .run(&node, &conf)?
            .ok()?;
    }
    ensure!(ipam_ips(&lab, 0)?.is_empty(), "allocation left");
    wait_pod_record_gone(
        &lab,
        &pod_key("node1", "gone1", "eth0"),
        Duration::from_secs(3),
    )?;
    // Without any netns at all, and for an attachment that never existed.
    Call::new(&plugin, "DEL", "never-added")
        .run(&node, &conf)?
        .ok()?;
    // A namespace whose host veth was deleted by hand.
    let pod2 = lab.add_namespace("gone2")?;
    let r = Call::new(&plugin, "ADD", "gone2")
        .netns(&pod2)
        .run(&node, &conf)?
        .ok()?;
    ip(&["-n", &node, "link", "del", &host_veth(&r)?])?;
    Call::new(&plugin, "DEL", "gone2")
        .netns(&pod2)
        .run(&node, &conf)?
        .ok()?;
    ensure!(ipam_ips(&lab, 0)?.is_empty(), "allocation left");
    Ok(())
}

/// Runs `calls` at once in `ns` (one process each, as runtimes do), returns their outputs.
fn run_parallel(ns: &str, calls: Vec<(Command, Vec<u8>)>) -> Result<Vec<CniOut>> {
    let outs = in_netns(ns, move || -> Result<Vec<Output>> {
        let mut children = Vec::new();
        for (mut c, stdin) in calls {
            let mut child = c.spawn().context("spawning")?;
            if let Some(mut i) = child.stdin.take() {
                let _ = i.write_all(&stdin);
            }
            children.push(child);
        }
        children
            .into_iter()
            .map(|c| c.wait_with_output().context("waiting"))
            .collect()
    })??;
    Ok(outs.into_iter().map(CniOut::from_output).collect())
}

fn ifindex_of(ns: &str, dev: &str) -> Result<u32> {
    let out = ip(&["-n", ns, "-o", "link", "show", dev])?;
    out.split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .with_context(|| format!("no index for {dev}: {out}"))
}

#[test]
fn a_stale_bridge_hint_never_leaves_a_pod_on_the_wrong_bridge() -> Result<()> {
    let Some((mut lab, node, conf, plugin)) = one_node("1.0.0")? else {
        return Ok(());
    };
    let hint = lab.nodes[0].cni_data_dir().join("tartan").join("bridge");
    let mut n = 0;
    let mut add_and_check = |lab: &mut Lab, what: &str| -> Result<()> {
        n += 1;
        let pod = lab.add_namespace(&format!("h{n}"))?;
        let result = Call::new(&plugin, "ADD", &format!("hint{n}"))
            .netns(&pod)
            .run(&node, &conf)?
            .ok()
            .with_context(|| format!("ADD {what}"))?;
        let host = host_veth(&result)?;
        let port = ip(&["-n", &node, "-d", "link", "show", &host])?;
        ensure!(port.contains("master tartan0"), "{what}: {port}");
        let br = ifindex_of(&node, "tartan0")?;
        let text = std::fs::read_to_string(&hint)?;
        ensure!(
            text.starts_with(&format!("tartan0 {br} ")),
            "{what}: hint {text:?}, bridge index {br}"
        );
        let gw = ip(&["-n", &node, "addr", "show", "tartan0"])?;
        ensure!(
            gw.contains("inet "),
            "{what}: no gateway on the bridge: {gw}"
        );
        Ok(())
    };
    add_and_check(&mut lab, "first ADD")?;
    // The hint names another bridge's index: the pod's veth must not stay there.
    ip(&["-n", &node, "link", "add", "decoy0", "type", "bridge"])?;
    let decoy = ifindex_of(&node, "decoy0")?;
    std::fs::write(&hint, format!("tartan0 {decoy} 02:00:00:00:00:01\n"))?;
    add_and_check(&mut lab, "hint on another bridge")?;
    let ports = ip(&["-n", &node, "-o", "link", "show", "master", "decoy0"])?;
    ensure!(ports.trim().is_empty(), "left on the decoy: {ports}");
    // The hint names an interface that is no bridge.
    let eth0 = ifindex_of(&node, "eth0")?;
    std::fs::write(&hint, format!("tartan0 {eth0} 02:00:00:00:00:01\n"))?;
    add_and_check(&mut lab, "hint on the underlay")?;
    // The bridge deleted by hand: re-created, with its gateway.
    ip(&["-n", &node, "link", "del", "tartan0"])?;
    add_and_check(&mut lab, "bridge deleted")?;
    // Garbage in the hint file.
    std::fs::write(&hint, "\u{0}not a hint")?;
    add_and_check(&mut lab, "garbage hint")?;
    Ok(())
}

#[test]
fn fifty_parallel_adds_then_gc_frees_exactly_the_invalid_half() -> Result<()> {
    let Some((mut lab, node, conf, plugin)) = one_node("1.0.0")? else {
        return Ok(());
    };
    let mut pods = Vec::new();
    for k in 0..50 {
        pods.push(lab.add_namespace(&format!("q{k}"))?);
    }
    let cids: Vec<String> = (0..50).map(|k| format!("par{k:02}")).collect();
    let calls = pods
        .iter()
        .zip(&cids)
        .map(|(p, cid)| {
            (
                Call::new(&plugin, "ADD", cid).netns(p).command(),
                conf.to_string().into_bytes(),
            )
        })
        .collect();
    let t = Instant::now();
    let outs = run_parallel(&node, calls)?;
    eprintln!("50 parallel ADDs took {:?}", t.elapsed());
    let mut ips = HashSet::new();
    for (o, cid) in outs.iter().zip(&cids) {
        let r = o.ok().with_context(|| format!("ADD {cid}"))?;
        ensure!(ips.insert(result_ip(&r)?), "address handed out twice: {r}");
    }
    ensure!(ips.len() == 50);
    ensure!(ipam_ips(&lab, 0)?.len() == 50);
    for p in &pods {
        ensure!(link_exists(p, "eth0"), "no eth0 in {p}");
    }
    wait_for("50 pod records", Duration::from_secs(15), || {
        (count_pod_records(&lab, "node1") == 50).then_some(())
    })?;

    // GC with the even half valid: exactly the odd half goes.
    let mut gc_conf = conf.clone();
    gc_conf["cniVersion"] = json!("1.1.0");
    let valid: Vec<Value> = cids
        .iter()
        .step_by(2)
        .map(|c| json!({"containerID": c, "ifname": "eth0"}))
        .collect();
    gc_conf["cni.dev/valid-attachments"] = Value::Array(valid);
    Call::new(&plugin, "GC", "")
        .run(&node, &gc_conf)?
        .ok()
        .context("GC")?;
    let left: BTreeSet<String> = scan_all(&lab.nodes[0].cni_data_dir())?
        .into_iter()
        .map(|r| r.container_id)
        .collect();
    let want: BTreeSet<String> = cids.iter().step_by(2).cloned().collect();
    ensure!(left == want, "after GC: {left:?}");
    for (k, p) in pods.iter().enumerate() {
        ensure!(
            link_exists(p, "eth0") == (k % 2 == 0),
            "pod {k}: eth0 present = {}",
            link_exists(p, "eth0")
        );
    }
    wait_for("25 pod records", Duration::from_secs(5), || {
        (count_pod_records(&lab, "node1") == 25).then_some(())
    })?;
    // GC needs 1.1.0.
    let mut old = gc_conf.clone();
    old["cniVersion"] = json!("1.0.0");
    let code = Call::new(&plugin, "GC", "")
        .run(&node, &old)?
        .error_code()?;
    ensure!(code == 1, "GC at 1.0.0: code {code}");
    Ok(())
}

#[test]
fn killed_adds_leak_nothing_gc_cannot_reclaim() -> Result<()> {
    let Some((mut lab, node, conf, plugin)) = one_node("1.1.0")? else {
        return Ok(());
    };
    let mut pods = Vec::new();
    for k in 0..30 {
        pods.push(lab.add_namespace(&format!("k{k}"))?);
    }
    // Kill ADDs at every stage: before they start, in IPAM, in netlink, after.
    let mut completed = 0;
    for (k, p) in pods.iter().enumerate() {
        let mut cmd = Call::new(&plugin, "ADD", &format!("kill{k:02}"))
            .netns(p)
            .command();
        let stdin = conf.to_string().into_bytes();
        let delay = Duration::from_micros(300 * k as u64);
        let status = in_netns(&node, move || -> Result<Option<i32>> {
            let mut child = cmd.spawn()?;
            if let Some(mut i) = child.stdin.take() {
                let _ = i.write_all(&stdin);
            }
            std::thread::sleep(delay);
            let _ = child.kill();
            Ok(child.wait()?.code())
        })??;
        if status == Some(0) {
            completed += 1;
        }
    }
    eprintln!("{completed} of 30 ADDs completed before their SIGKILL");
    ensure!(
        completed < 30,
        "no ADD was interrupted; the test proves nothing"
    );
    // Nothing is valid: GC must take the node back to empty.
    let mut gc_conf = conf.clone();
    gc_conf["cni.dev/valid-attachments"] = json!([]);
    Call::new(&plugin, "GC", "")
        .run(&node, &gc_conf)?
        .ok()
        .context("GC")?;
    let dir = lab.nodes[0].cni_data_dir().join("tartan");
    for sub in ["ip", "by-id"] {
        let left: Vec<String> = std::fs::read_dir(dir.join(sub))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()?;
        ensure!(left.is_empty(), "{sub} after GC: {left:?}");
    }
    let ports = ip(&["-n", &node, "-o", "link", "show", "master", "tartan0"])?;
    ensure!(ports.trim().is_empty(), "ports left on the bridge: {ports}");
    for p in &pods {
        ensure!(!link_exists(p, "eth0"), "eth0 left in {p}");
    }
    wait_for("no pod records", Duration::from_secs(15), || {
        (count_pod_records(&lab, "node1") == 0).then_some(())
    })?;
    // And the node still works.
    Call::new(&plugin, "ADD", "after")
        .netns(&pods[0])
        .run(&node, &conf)?
        .ok()?;
    Ok(())
}

/// A tiny conflist executor, as runtimes do it: ADD through the plugins in order, each
/// getting the previous result; DEL in reverse, each getting the final result.
struct Chain<'a> {
    list: &'a Value,
    own: &'a Path,
    runtime_config: Value,
}

impl Chain<'_> {
    fn plugin_path(&self, ty: &str) -> PathBuf {
        if ty == "tartan-cni" {
            self.own.to_path_buf()
        } else {
            Path::new(REF_PLUGINS).join(ty)
        }
    }

    fn conf(&self, p: &Value, prev: Option<&Value>) -> Value {
        let mut c = p.clone();
        c["cniVersion"] = self.list["cniVersion"].clone();
        c["name"] = self.list["name"].clone();
        if let Some(caps) = p["capabilities"].as_object() {
            let mut rc = serde_json::Map::new();
            for (k, on) in caps {
                if on == true
                    && let Some(v) = self.runtime_config.get(k)
                {
                    rc.insert(k.clone(), v.clone());
                }
            }
            c["runtimeConfig"] = Value::Object(rc);
        }
        if let Some(pr) = prev {
            c["prevResult"] = pr.clone();
        }
        c
    }

    fn add(&self, node: &str, cid: &str, pod: &str) -> Result<Value> {
        let mut prev: Option<Value> = None;
        for p in self.list["plugins"].as_array().context("plugins")? {
            let ty = p["type"].as_str().context("type")?;
            let path = self.plugin_path(ty);
            let out = Call::new(&path, "ADD", cid)
                .netns(pod)
                .run(node, &self.conf(p, prev.as_ref()))?;
            prev = Some(out.ok().with_context(|| format!("ADD through {ty}"))?);
        }
        prev.context("empty conflist")
    }

    fn del(&self, node: &str, cid: &str, pod: &str, result: &Value) -> Result<()> {
        for p in self.list["plugins"]
            .as_array()
            .context("plugins")?
            .iter()
            .rev()
        {
            let ty = p["type"].as_str().context("type")?;
            let path = self.plugin_path(ty);
            Call::new(&path, "DEL", cid)
                .netns(pod)
                .run(node, &self.conf(p, Some(result)))?
                .ok()
                .with_context(|| format!("DEL through {ty}"))?;
        }
        Ok(())
    }
}

#[test]
fn chained_portmap_and_bandwidth_see_our_prev_result() -> Result<()> {
    let Some(mut lab) = cluster(1)? else {
        return Ok(());
    };
    for p in ["portmap", "bandwidth"] {
        ensure!(
            Path::new(REF_PLUGINS).join(p).exists(),
            "{REF_PLUGINS}/{p} is missing: install containernetworking-plugins (make deps)"
        );
    }
    let node = lab.nodes[0].ns.clone();
    let infra = lab.infra.clone();
    let installed = installed_conflist(&lab, 0)?;
    let list = json!({
        "cniVersion": "1.0.0",
        "name": "tartan",
        "plugins": [
            installed["plugins"][0].clone(),
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "bandwidth", "capabilities": {"bandwidth": true}},
        ]
    });
    let own = lab.bins.tartan_cni.clone();
    let chain = Chain {
        list: &list,
        own: &own,
        runtime_config: json!({
            "portMappings": [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}],
            "bandwidth": {"ingressRate": 100_000_000, "ingressBurst": 1_000_000,
                          "egressRate": 100_000_000, "egressBurst": 1_000_000},
        }),
    };
    let pod = lab.add_namespace("chain")?;
    let cid = "chained01";
    let result = chain.add(&node, cid, &pod)?;
    // Our interfaces and address came through both plugins.
    let pod_ip = result_ip(&result)?;
    let host = host_veth(&result)?;
    ensure!(result["interfaces"][2]["name"] == "eth0", "{result}");
    // bandwidth found our host veth through prevResult and shaped it.
    let qdisc = ns_run(&node, "tc", &["qdisc", "show", "dev", &host])?;
    ensure!(qdisc.contains("tbf"), "no tbf on {host}: {qdisc}");
    // portmap DNATs the node's port 18080 to the pod: reach it from outside the node.
    echo_server(&pod, 8080)?;
    wait_tcp_echo(&infra, lab.nodes[0].ip, 18080, Duration::from_secs(10))?;
    let nat = ns_run(&node, "iptables-save", &["-t", "nat"])?;
    ensure!(nat.contains(&pod_ip.to_string()), "{nat}");
    // CHECK of our plugin against the final result of the chain.
    let mut check = chain.conf(&list["plugins"][0], Some(&result));
    check["cniVersion"] = json!("1.0.0");
    Call::new(&lab.bins.tartan_cni, "CHECK", cid)
        .netns(&pod)
        .run(&node, &check)?
        .ok()
        .context("CHECK after the chain")?;
    chain.del(&node, cid, &pod, &result)?;
    let nat = ns_run(&node, "iptables-save", &["-t", "nat"])?;
    ensure!(!nat.contains(&pod_ip.to_string()), "DNAT left: {nat}");
    assert_detached_then_reaped(&node, &host, Some(&pod))?;
    ensure!(ipam_ips(&lab, 0)?.is_empty(), "allocation left");
    // A second DEL of the whole chain is fine too.
    chain.del(&node, cid, &pod, &result)?;
    Ok(())
}

#[test]
fn bad_configs_and_environments_get_the_right_codes() -> Result<()> {
    let Some((mut lab, node, conf, plugin)) = one_node("1.0.0")? else {
        return Ok(());
    };
    let pod = lab.add_namespace("bad")?;
    let add = || Call::new(&plugin, "ADD", "bad01").netns(&pod);

    // Environment: code 4.
    let env_cases: Vec<(&str, Call)> = vec![
        ("no CNI_COMMAND", add().ifname("eth0")),
        ("no container id", Call::new(&plugin, "ADD", "").netns(&pod)),
        (
            "container id with a path",
            Call::new(&plugin, "ADD", "../../etc").netns(&pod),
        ),
        (
            "container id with a slash",
            Call::new(&plugin, "ADD", "a/b").netns(&pod),
        ),
        ("ifname too long", add().ifname("abcdefghijklmnop")),
        ("ifname with a slash", add().ifname("eth/0")),
        ("ifname ..", add().ifname("..")),
        ("no netns", Call::new(&plugin, "ADD", "bad01")),
        ("netns not a namespace", add().netns_path("/etc/hostname")),
        (
            "netns missing",
            add().netns_path("/var/run/netns/does-not-exist"),
        ),
        (
            "netns of another kind",
            add().netns_path("/proc/self/ns/uts"),
        ),
        ("netns relative", add().netns_path("netns/x")),
        ("CNI_ARGS malformed", add().args("K8S_POD_NAME")),
        (
            "unknown command",
            Call::new(&plugin, "ATTACH", "bad01").netns(&pod),
        ),
    ];
    for (what, call) in env_cases {
        let mut c = call;
        if what == "no CNI_COMMAND" {
            c.command = "";
        }
        let code = c.run(&node, &conf)?.error_code().context(what)?;
        ensure!(code == 4, "{what}: code {code}");
    }

    // Config: 6 undecodable, 1 version, 7 invalid.
    let raw_cases: &[(&str, &[u8], u64)] = &[
        ("empty stdin", b"", 6),
        ("not JSON", b"{\"cniVersion\":", 6),
        ("an array", b"[]", 6),
    ];
    for (what, stdin, want) in raw_cases {
        let code = add().run_raw(&node, stdin)?.error_code().context(*what)?;
        ensure!(code == *want, "{what}: code {code}");
    }
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut c = conf.clone();
        f(&mut c);
        c
    };
    let conf_cases: Vec<(&str, Value, u64)> = vec![
        (
            "version 0.2.0",
            edit(&|c| c["cniVersion"] = json!("0.2.0")),
            1,
        ),
        (
            "version 2.0.0",
            edit(&|c| c["cniVersion"] = json!("2.0.0")),
            1,
        ),
        (
            "no version",
            edit(&|c| {
                c.as_object_mut().map(|m| m.remove("cniVersion"));
            }),
            7,
        ),
        (
            "no name",
            edit(&|c| {
                c.as_object_mut().map(|m| m.remove("name"));
            }),
            7,
        ),
        (
            "name escaping dataDir",
            edit(&|c| c["name"] = json!("..")),
            7,
        ),
        (
            "name with a slash",
            edit(&|c| c["name"] = json!("a/../../b")),
            7,
        ),
        ("mtu out of range", edit(&|c| c["mtu"] = json!(10)), 7),
        ("mtu not a number", edit(&|c| c["mtu"] = json!("big")), 7),
        (
            "relative dataDir",
            edit(&|c| c["dataDir"] = json!("data")),
            7,
        ),
        (
            "bridge name too long",
            edit(&|c| c["bridge"] = json!("a-very-long-bridge")),
            7,
        ),
        (
            "labels malformed",
            edit(&|c| c["args"] = json!({"cni": {"labels": "app=web"}})),
            7,
        ),
        (
            "prevResult malformed",
            edit(&|c| c["prevResult"] = json!({"ips": [{"address": 5}]})),
            7,
        ),
    ];
    for (what, c, want) in conf_cases {
        let code = add().run(&node, &c)?.error_code().context(what)?;
        ensure!(code == want, "{what}: code {code}");
    }

    // Not ready: 11 (ADD), 50 (STATUS).
    let no_env = edit(&|c| c["subnetFile"] = json!("/nonexistent/subnet.env"));
    let code = add().run(&node, &no_env)?.error_code()?;
    ensure!(code == 11, "ADD without subnet.env: code {code}");
    let no_daemon = edit(&|c| c["daemonSocket"] = json!("/nonexistent/tartand.sock"));
    let code = add().run(&node, &no_daemon)?.error_code()?;
    ensure!(code == 11, "ADD without tartand: code {code}");
    let mut status = no_env.clone();
    status["cniVersion"] = json!("1.1.0");
    let code = Call::new(&plugin, "STATUS", "")
        .run(&node, &status)?
        .error_code()?;
    ensure!(code == 50, "STATUS without subnet.env: code {code}");
    let mut status = no_daemon.clone();
    status["cniVersion"] = json!("1.1.0");
    let code = Call::new(&plugin, "STATUS", "")
        .run(&node, &status)?
        .error_code()?;
    ensure!(code == 50, "STATUS without tartand: code {code}");
    let code = Call::new(&plugin, "STATUS", "")
        .run(&node, &conf)?
        .error_code()?;
    ensure!(code == 1, "STATUS at 1.0.0: code {code}");
    Call::new(&plugin, "STATUS", "")
        .run(&node, &{
            let mut c = conf.clone();
            c["cniVersion"] = json!("1.1.0");
            c
        })?
        .ok()
        .context("STATUS of a ready node")?;

    // Exhaustion: a /29 of its own (5 addresses for containers), then a clear error.
    let tiny_dir = lab.dir.join("tiny");
    std::fs::create_dir_all(&tiny_dir)?;
    std::fs::write(
        tiny_dir.join("subnet.env"),
        "FLANNEL_NETWORK=10.99.0.0/16\nFLANNEL_SUBNET=10.99.0.1/29\nFLANNEL_MTU=1400\nFLANNEL_IPMASQ=false\n",
    )?;
    let tiny = edit(&|c| {
        c["name"] = json!("tiny");
        c["bridge"] = json!("tiny0");
        c["subnetFile"] = json!(tiny_dir.join("subnet.env"));
    });
    let mut tiny_pods = Vec::new();
    for k in 0..6 {
        tiny_pods.push(lab.add_namespace(&format!("t{k}"))?);
    }
    for (k, p) in tiny_pods.iter().enumerate().take(5) {
        Call::new(&plugin, "ADD", &format!("tiny{k}"))
            .netns(p)
            .run(&node, &tiny)?
            .ok()?;
    }
    let out = Call::new(&plugin, "ADD", "tiny5")
        .netns(&tiny_pods[5])
        .run(&node, &tiny)?;
    let code = out.error_code()?;
    ensure!(code == 101, "exhaustion: code {code}: {}", out.stdout);
    ensure!(out.stdout.contains("10.99.0.0/29"), "{}", out.stdout);
    ensure!(!link_exists(&tiny_pods[5], "eth0"), "failed ADD left eth0");

    // An interface name already taken in the pod: a plugin code, and nothing leaks.
    ip(&[
        "-n", &pod, "link", "add", "eth0", "type", "veth", "peer", "name", "x0",
    ])?;
    let code = add().run(&node, &conf)?.error_code()?;
    ensure!(code == 104, "ifname taken: code {code}");
    ensure!(ipam_ips(&lab, 0)?.is_empty(), "failed ADD kept its address");

    // VERSION answers whatever the environment holds.
    let v = Call::new(&plugin, "VERSION", "")
        .run(&node, &json!({"cniVersion": "0.4.0"}))?
        .ok()?;
    ensure!(v["cniVersion"] == "0.4.0", "{v}");
    ensure!(
        v["supportedVersions"] == json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]),
        "{v}"
    );
    Ok(())
}

/// The default route of `ns` and every route that names `dev`.
fn default_route_and_routes_via(ns: &str, dev: &str) -> Result<(String, Vec<String>)> {
    let default = ip(&["-n", ns, "route", "show", "default"])?;
    let via_dev = ip(&["-n", ns, "route", "show", "table", "all"])?
        .lines()
        .filter(|l| l.contains(&format!("dev {dev} ")) || l.ends_with(&format!("dev {dev}")))
        .map(str::to_string)
        .collect();
    Ok((default, via_dev))
}

#[test]
fn add_into_the_nodes_own_namespace_is_refused_and_its_routes_stay() -> Result<()> {
    let Some((lab, node, conf, plugin)) = one_node("1.0.0")? else {
        return Ok(());
    };
    let (default_before, _) = default_route_and_routes_via(&node, "pod9")?;
    ensure!(
        default_before.contains("default via"),
        "the node has no default route to compare: {default_before:?}"
    );
    // The plugin runs inside the node namespace: its own namespace, named two ways.
    for (k, path) in ["/proc/self/ns/net".to_string(), netns_path(&node)]
        .iter()
        .enumerate()
    {
        let cid = format!("ownns{k}");
        for verb in ["ADD", "CHECK"] {
            let mut c = conf.clone();
            if verb == "CHECK" {
                c["prevResult"] = json!({"cniVersion": "1.0.0"});
            }
            let out = Call::new(&plugin, verb, &cid)
                .netns_path(path)
                .ifname("pod9")
                .run(&node, &c)?;
            let code = out
                .error_code()
                .with_context(|| format!("{verb} into the node's namespace via {path}"))?;
            ensure!(code == 4, "{verb} via {path}: code {code}: {}", out.stdout);
            ensure!(
                out.stdout.contains("own network namespace") && out.stdout.contains(path),
                "{verb} via {path}: unclear message {}",
                out.stdout
            );
        }
        let (default_after, via_pod9) = default_route_and_routes_via(&node, "pod9")?;
        ensure!(
            default_after == default_before,
            "ADD via {path} changed the node's default route: {default_before:?} -> {default_after:?}"
        );
        ensure!(via_pod9.is_empty(), "routes via pod9: {via_pod9:?}");
        ensure!(!link_exists(&node, "pod9"), "ADD via {path} left pod9");
        let host = tartan::cni::links::host_veth_name(&cid, "pod9");
        ensure!(!link_exists(&node, &host), "ADD via {path} left {host}");
        ensure!(
            ipam_ips(&lab, 0)?.is_empty(),
            "ADD via {path} kept an address"
        );
    }
    Ok(())
}

/// Runs the plugin in `ns` with `stdin` as its standard input (plus `feed` written into it
/// when it is a pipe); a plugin still running after `deadline` is killed: a hang fails.
fn run_with_deadline(
    call: &Call,
    ns: &str,
    stdin: Stdio,
    feed: Option<Vec<u8>>,
    deadline: Duration,
) -> Result<CniOut> {
    let mut cmd = call.command();
    cmd.stdin(stdin);
    let mut child = in_netns(ns, move || cmd.spawn())?.context("starting the plugin")?;
    let writer = match (feed, child.stdin.take()) {
        (Some(bytes), Some(mut pipe)) => Some(std::thread::spawn(move || {
            // The plugin stops reading at its bound: a broken pipe is expected.
            let _ = pipe.write_all(&bytes);
        })),
        _ => None,
    };
    let start = Instant::now();
    let waited = wait_for("the plugin to exit", deadline, || {
        child.try_wait().ok().flatten()
    });
    if waited.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        bail!("the plugin was still running after {deadline:?}: it hangs");
    }
    if let Some(w) = writer {
        let _ = w.join();
    }
    let out = child
        .wait_with_output()
        .context("collecting the plugin's output")?;
    eprintln!("plugin exited after {:?}", start.elapsed());
    Ok(CniOut::from_output(out))
}

#[test]
fn oversized_stdin_and_subnet_files_that_are_not_files_fail_fast() -> Result<()> {
    if !tartan::lab::require_root()? {
        return Ok(());
    }
    // No etcd and no tartand: every case fails before the plugin needs either.
    let mut lab = Lab::new(1, bins())?;
    let node = lab.nodes[0].ns.clone();
    let pod = lab.add_namespace("bounds")?;
    let plugin = lab.bins.tartan_cni.clone();
    let dir = lab.dir.join("bounds");
    std::fs::create_dir_all(&dir)?;
    let fifo = dir.join("subnet.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    let big = dir.join("big.env");
    std::fs::write(&big, vec![b'#'; 1 << 20])?;
    let conf = |subnet_file: &Path| {
        json!({
            "cniVersion": "1.0.0",
            "name": "bounds",
            "type": "tartan-cni",
            "subnetFile": subnet_file,
            "dataDir": dir.join("data"),
            "daemonSocket": dir.join("no-tartand.sock"),
        })
    };
    let add = Call::new(&plugin, "ADD", "bounds01").netns(&pod);
    let deadline = Duration::from_secs(20);
    let expect = |what: &str, out: &CniOut, codes: &[u64], words: &str| -> Result<()> {
        let code = out.error_code().context(what.to_string())?;
        ensure!(codes.contains(&code), "{what}: code {code}: {}", out.stdout);
        ensure!(
            out.stdout.contains(words),
            "{what}: the error does not say {words:?}: {}",
            out.stdout
        );
        Ok(())
    };

    // A valid config behind more whitespace than the bound (old plugins read all of it).
    let mut padded = vec![b' '; 17 << 20];
    padded.extend_from_slice(
        conf(Path::new("/nonexistent/subnet.env"))
            .to_string()
            .as_bytes(),
    );
    let out = run_with_deadline(&add, &node, Stdio::piped(), Some(padded), deadline)?;
    expect("stdin over the bound", &out, &[6, 7], "larger than")?;
    // subnetFile that is not a regular file, or too large for one.
    for (what, path) in [
        ("a directory", dir.clone()),
        ("a FIFO", fifo.clone()),
        ("a character device", PathBuf::from("/dev/zero")),
    ] {
        for verb in ["ADD", "STATUS"] {
            let mut c = conf(&path);
            if verb == "STATUS" {
                c["cniVersion"] = json!("1.1.0");
            }
            let call = Call::new(&plugin, verb, "bounds01").netns(&pod);
            let stdin = c.to_string().into_bytes();
            let out = run_with_deadline(&call, &node, Stdio::piped(), Some(stdin), deadline)?;
            expect(
                &format!("{verb} with subnetFile {what}"),
                &out,
                &[7],
                "not a regular file",
            )?;
            ensure!(out.stdout.contains(what), "{verb}: {}", out.stdout);
        }
    }
    let out = add.run(&node, &conf(&big))?;
    expect("a 1 MiB subnetFile", &out, &[7], "larger than")?;
    // Endless stdin.
    let zero = std::fs::File::open("/dev/zero")?;
    let out = run_with_deadline(&add, &node, Stdio::from(zero), None, deadline)?;
    expect("stdin from /dev/zero", &out, &[6, 7], "larger than")?;
    ensure!(
        !dir.join("data").exists(),
        "a refused call touched the IPAM directory"
    );
    Ok(())
}

#[test]
fn try_again_later_until_the_node_is_ready_and_records_survive_restarts() -> Result<()> {
    let Some(mut lab) = lab(1, NET16)? else {
        return Ok(());
    };
    let n = &lab.nodes[0];
    let node = n.ns.clone();
    let conf = json!({
        "cniVersion": "1.1.0",
        "name": "tartan",
        "type": "tartan-cni",
        "subnetFile": n.subnet_file(),
        "dataDir": n.cni_data_dir(),
        "daemonSocket": n.cni_socket(),
    });
    let plugin = lab.bins.tartan_cni.clone();
    let pod = lab.add_namespace("early")?;
    // No daemon yet: no subnet.env, no socket.
    let code = Call::new(&plugin, "ADD", "early1")
        .netns(&pod)
        .run(&node, &conf)?
        .error_code()?;
    ensure!(code == 11, "ADD before the lease: code {code}");
    let code = Call::new(&plugin, "STATUS", "")
        .run(&node, &conf)?
        .error_code()?;
    ensure!(code == 50, "STATUS before the lease: code {code}");

    lab.start_daemon(0, &[])?;
    lab.wait_subnet(0)?;
    installed_conflist(&lab, 0)?;
    Call::new(&plugin, "STATUS", "")
        .run(&node, &conf)?
        .ok()
        .context("STATUS once leased")?;
    let r = Call::new(&plugin, "ADD", "early1")
        .netns(&pod)
        .args("K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=early")
        .run(&node, &conf)?
        .ok()?;
    let key = pod_key("node1", "early1", "eth0");
    let (_, lease1) = wait_pod_record(&lab, &key)?;

    let pod3 = lab.add_namespace("early3")?;
    let r3 = Call::new(&plugin, "ADD", "early3")
        .netns(&pod3)
        .run(&node, &conf)?
        .ok()?;

    // Daemon down: ADD says try again later; the pod keeps working.
    lab.stop_daemon(0)?;
    // DEL still works, and with no tartand to reap it deletes the pair itself.
    Call::new(&plugin, "DEL", "early3")
        .netns(&pod3)
        .run(&node, &conf)?
        .ok()?;
    ensure!(
        !link_exists(&node, &host_veth(&r3)?),
        "DEL without tartand left the veth"
    );
    ensure!(!link_exists(&pod3, "eth0"), "DEL without tartand left eth0");
    let pod2 = lab.add_namespace("early2")?;
    let code = Call::new(&plugin, "ADD", "early2")
        .netns(&pod2)
        .run(&node, &conf)?
        .error_code()?;
    ensure!(code == 11, "ADD without tartand: code {code}");
    let code = Call::new(&plugin, "STATUS", "")
        .run(&node, &conf)?
        .error_code()?;
    ensure!(code == 50, "STATUS without tartand: code {code}");

    // Restarted, tartand registers the pod again from the IPAM directory, under its new lease.
    lab.start_daemon(0, &[])?;
    let (rec, lease2) = wait_for(
        "the pod record under the new lease",
        Duration::from_secs(20),
        || pod_record(&lab, &key).filter(|(_, l)| *l != lease1),
    )?;
    ensure!(rec["ip"] == result_ip(&r)?.to_string(), "{rec}");
    ensure!(rec["name"] == "early", "{rec}");
    ensure!(lease2 != 0);
    // A record nobody backs (left by a crashed daemon, say) is removed by the next rescan.
    lab.etcdctl(&["put", &pod_key("node1", "ghost", "eth0"), "{}"])?;
    Call::new(&plugin, "DEL", "early1")
        .netns(&pod)
        .run(&node, &conf)?
        .ok()?;
    wait_pod_record_gone(&lab, &key, Duration::from_secs(3))?;
    lab.stop_daemon(0)?;
    lab.start_daemon(0, &[])?;
    wait_pod_record_gone(
        &lab,
        &pod_key("node1", "ghost", "eth0"),
        Duration::from_secs(20),
    )?;
    Ok(())
}

/// Waits until container `id` fetches `/index.html` from port 8080 at `ip` (busybox nc: Debian
/// 12's static busybox wget crashes at start when given -T, see the DNS tests) and finds
/// `want` in it.
fn wait_page(pm: &Podman, id: &str, ip: &str, want: &str) -> Result<()> {
    let script =
        format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | /bin/busybox nc -w 2 {ip} 8080");
    let mut last = String::new();
    wait_for(
        &format!("container {id} to reach {ip}"),
        Duration::from_secs(20),
        || {
            let args = ["exec", id, "/bin/busybox", "sh", "-c", &script];
            match pm.run(&args) {
                Ok(page) if page.contains(want) => return Some(()),
                Ok(page) => last = page,
                Err(e) => last = format!("{e:#}"),
            }
            None
        },
    )
    .with_context(|| format!("last attempt: {last}"))
}

#[test]
fn podman_containers_on_two_nodes_reach_each_other() -> Result<()> {
    let Some(mut lab) = lab(2, NET16)? else {
        return Ok(());
    };
    start_daemons_for_podman(&mut lab, 2, &[])?;
    let mut podmans = Vec::new();
    let mut ids = Vec::new();
    for i in 0..2 {
        let pm = Podman::new(&lab, i, &lab.nodes[i].cni_dir().join("bin"))?;
        let name = format!("{}-c{}", lab.id, i + 1);
        let id = pm.run_busybox(&name, &format!("hello from node{}\n", i + 1), &[]);
        // Keep the guard even when `run` failed half-way, so it cleans up.
        podmans.push(pm);
        let id = id?;
        ids.push(id);
    }
    let ips: Vec<Ipv4Addr> = (0..2)
        .map(|i| podmans[i].container_ip(&ids[i]))
        .collect::<Result<_>>()?;
    for i in 0..2 {
        let subnet = lab.wait_subnet(i)?;
        ensure!(subnet.contains(ips[i]), "{} not in {subnet}", ips[i]);
        wait_pod_record(&lab, &pod_key(&format!("node{}", i + 1), &ids[i], "eth0"))?;
    }
    // Each container fetches the other's page across the overlay, by IP (with busybox nc:
    // Debian 12's static busybox wget crashes at start when given -T, see the DNS tests).
    for (from, to) in [(0usize, 1usize), (1, 0)] {
        let want = format!("hello from node{}", to + 1);
        wait_page(&podmans[from], &ids[from], &ips[to].to_string(), &want)?;
    }
    // Removing a container frees its address and its record.
    podmans[0].run(&["rm", "--force", "--time", "0", &ids[0]])?;
    ensure!(
        podmans[0].container_ip(&ids[0]).is_err(),
        "address of a removed container still allocated"
    );
    ensure!(ipam_ips(&lab, 0)?.is_empty(), "allocation left on node1");
    wait_pod_record_gone(
        &lab,
        &pod_key("node1", &ids[0], "eth0"),
        Duration::from_secs(5),
    )?;
    // The host end goes with the pod namespace (the kernel tears namespaces down in the
    // background) or with tartand's batched reap of detached ports, whichever comes first.
    let node_ns = lab.nodes[0].ns.clone();
    let bridge_ports = || ip(&["-n", &node_ns, "-o", "link", "show", "master", "tartan0"]);
    wait_for(
        "node1's bridge to have no port",
        Duration::from_secs(5),
        || bridge_ports().ok().filter(|p| p.trim().is_empty()),
    )
    .with_context(|| format!("ports left: {}", bridge_ports().unwrap_or_default()))?;
    Ok(())
}

#[test]
fn podman_containers_on_a_dual_stack_network_get_both_families_and_talk_over_ipv6() -> Result<()> {
    let Some(mut lab) = lab(2, NET16)? else {
        return Ok(());
    };
    lab.make_dual_stack()?;
    start_daemons_for_podman(&mut lab, 2, &[])?;
    let mut podmans = Vec::new();
    let mut ids = Vec::new();
    for i in 0..2 {
        let pm = Podman::new(&lab, i, &lab.nodes[i].cni_dir().join("bin"))?;
        let name = format!("{}-d{}", lab.id, i + 1);
        let id = pm.run_busybox(&name, &format!("hello over v6 from node{}\n", i + 1), &[]);
        podmans.push(pm);
        ids.push(id?);
    }
    let mut ip6s = Vec::new();
    for i in 0..2 {
        let ip4 = podmans[i].container_ip(&ids[i])?;
        let ip6 = podmans[i].container_ip6(&ids[i])?;
        // podman read both addresses from the plugin's result.
        let seen = podmans[i].run(&[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{.GlobalIPv6Address}}{{end}}",
            &ids[i],
        ])?;
        ensure!(
            seen.split_whitespace().collect::<Vec<_>>() == [ip4.to_string(), ip6.to_string()],
            "podman inspect: {seen:?}, IPAM: {ip4} {ip6}"
        );
        // Inside: the IPv6 address is usable at once (no DAD) and has a default route.
        let inside = podmans[i].run(&["exec", &ids[i], "/bin/busybox", "ip", "-6", "addr"])?;
        ensure!(
            inside.contains(&ip6.to_string()) && !inside.contains("tentative"),
            "{inside}"
        );
        let routes = podmans[i].run(&["exec", &ids[i], "/bin/busybox", "ip", "-6", "route"])?;
        ensure!(routes.contains("default via"), "{routes}");
        ip6s.push(ip6);
    }
    for (from, to) in [(0usize, 1usize), (1, 0)] {
        let want = format!("hello over v6 from node{}", to + 1);
        wait_page(&podmans[from], &ids[from], &ip6s[to].to_string(), &want).with_context(|| {
            // What the container and its node had at that moment, for the failure report.
            let sh = |id: &str, cmd: &str| {
                podmans[from]
                    .run(&["exec", id, "/bin/busybox", "sh", "-c", cmd])
                    .unwrap_or_else(|e| format!("{e:#}"))
            };
            let node = &lab.nodes[from].ns;
            format!(
                "container: {}\n{}\n{}\nnode {node}: {}\n{}",
                sh(&ids[from], "ip -6 addr; ip -6 route"),
                sh(&ids[from], "cat /proc/sys/net/ipv6/conf/all/disable_ipv6 /proc/sys/net/ipv6/conf/eth0/disable_ipv6"),
                sh(&ids[from], "ip -6 neigh"),
                ip(&["-n", node, "-6", "addr"]).unwrap_or_default(),
                ip(&["-n", node, "-6", "route"]).unwrap_or_default(),
            )
        })?;
    }
    Ok(())
}
