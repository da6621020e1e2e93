//! `tartanctl` and `tartand` input validation and CLI conventions: bad input gets one line on
//! stderr and a non-zero exit, never a panic or a raw client dump; what etcd holds cannot
//! make the output panic.

mod common;

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use tartan::lab::{ETCD_PORT, INFRA_IP, Lab, ns_command, wait_for};

/// Outcome of one CLI run.
struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run_cmd(c: &mut Command) -> Result<Out> {
    let o = c
        .stdin(std::process::Stdio::null())
        .output()
        .context("running tartanctl")?;
    Ok(Out {
        ok: o.status.success(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    })
}

/// `tartanctl ARGS` in the lab's infra namespace (etcd on loopback there).
fn ctl(lab: &Lab, args: &[&str]) -> Result<Out> {
    let mut c = ns_command(&lab.infra, &lab.bins.tartanctl);
    c.env(
        "TARTAN_ETCD_ENDPOINTS",
        format!("http://127.0.0.1:{ETCD_PORT}"),
    )
    .args(args);
    run_cmd(&mut c)
}

/// Checks `o` failed with one line on stderr that contains `want`.
fn one_line_error(o: &Out, want: &str, what: &str) -> Result<()> {
    ensure!(!o.ok, "{what}: succeeded but should fail: {}", o.stdout);
    let lines: Vec<&str> = o.stderr.lines().collect();
    ensure!(
        lines.len() == 1,
        "{what}: stderr is not one line:\n{}",
        o.stderr
    );
    ensure!(
        lines[0].starts_with("tartanctl: ") && lines[0].contains(want),
        "{what}: {want:?} missing from {:?}",
        lines[0]
    );
    ensure!(
        !lines[0].contains("panicked") && !lines[0].contains("MetadataMap"),
        "{what}: {:?}",
        lines[0]
    );
    Ok(())
}

#[test]
fn etcd_down_is_one_line_and_a_failure() -> Result<()> {
    // A loopback port nothing listens on (bound, then closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    for args in [
        &["service", "list"][..],
        &["service", "create", "web", "--port", "80"],
        &["nodes"],
        &["network", "show"],
    ] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tartanctl"));
        c.args(["--etcd-endpoints", &endpoint]).args(args);
        let o = run_cmd(&mut c)?;
        one_line_error(&o, "cannot connect to etcd", &args.join(" "))?;
        ensure!(
            !o.stderr.contains("status:"),
            "raw gRPC status: {}",
            o.stderr
        );
    }
    Ok(())
}

#[test]
fn bad_flags_are_one_line_too() -> Result<()> {
    for args in [
        &[
            "service",
            "create",
            "web",
            "--port",
            "80",
            "--service-cidr",
            "bogus",
        ][..],
        &["service", "create", "web"],
        &["service", "create", "web", "--port", "http=0"],
        &["no-such-command"],
    ] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tartanctl"));
        c.args(args);
        one_line_error(&run_cmd(&mut c)?, "(see --help)", &args.join(" "))?;
    }
    let o = run_cmd(Command::new(env!("CARGO_BIN_EXE_tartand")).args(["--iface"]))?;
    ensure!(
        !o.ok && o.stderr.lines().count() == 1 && o.stderr.starts_with("tartand: "),
        "{}",
        o.stderr
    );
    Ok(())
}

/// A lab with etcd, the network config and one node's daemon (for a node lease).
fn cluster() -> Result<Option<Lab>> {
    let Some(mut lab) = lab(1, &["--network", "10.244.0.0/16"])? else {
        return Ok(None);
    };
    lab.start_daemon(0, &[])?;
    lab.wait_subnet(0)?;
    Ok(Some(lab))
}

#[test]
fn tartanctl_refuses_bad_addresses_ranges_and_selectors_in_one_line() -> Result<()> {
    let Some(lab) = cluster()? else {
        return Ok(());
    };
    let node_ip = lab.nodes[0].ip.to_string();
    let etcd_at_infra = format!("http://{INFRA_IP}:{ETCD_PORT}");
    let create = |extra: &[&str]| {
        let mut a = vec!["service", "create", "bad", "--port", "80"];
        a.extend_from_slice(extra);
        ctl(&lab, &a)
    };
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["--service-cidr", "0.0.0.0/0"],
            "covers every address".into(),
        ),
        (
            vec!["--service-cidr", "10.244.0.0/16"],
            "overlaps the cluster network 10.244.0.0/16".into(),
        ),
        (vec!["--service-cidr", "127.0.0.0/8"], "loopback".into()),
        (
            vec!["--service-cidr", "192.168.77.0/24"],
            format!("contains the node address {node_ip}"),
        ),
        (
            vec!["--cluster-ip", "10.200.0.1"],
            "outside the service CIDR".into(),
        ),
        (
            vec!["--cluster-ip", "10.96.0.0"],
            "network or broadcast".into(),
        ),
        (vec!["--selector", "app=web,,"], "empty".into()),
        (vec!["--selector", "a=b=c"], "more than one '='".into()),
        (vec!["--selector", "app=web;x=y"], "app=web;x=y".into()),
        (vec!["--selector", "app=a,app=b"], "given twice".into()),
        (vec!["--selector", "app=we b"], "we b".into()),
        (
            vec![
                "--port",
                "81",
                "--node-port",
                "30001",
                "--node-port",
                "30001",
            ],
            "--node-port 30001/tcp is given twice".into(),
        ),
    ];
    for (extra, want) in &cases {
        one_line_error(&create(extra)?, want, &extra.join(" "))?;
    }
    // etcd's own address as the service CIDR (tartanctl told where etcd is).
    let o = ctl(
        &lab,
        &[
            "--etcd-endpoints",
            &etcd_at_infra,
            "service",
            "create",
            "bad",
            "--port",
            "2379",
            "--service-cidr",
            &format!("{INFRA_IP}/32"),
        ],
    )?;
    one_line_error(
        &o,
        &format!("contains the etcd endpoint {INFRA_IP}"),
        "etcd /32",
    )?;
    let o = ctl(
        &lab,
        &[
            "--etcd-endpoints",
            &etcd_at_infra,
            "service",
            "create",
            "bad",
            "--port",
            "2379",
            "--service-cidr",
            "192.168.0.0/16",
            "--cluster-ip",
            &INFRA_IP.to_string(),
        ],
    )?;
    ensure!(!o.ok, "a service CIDR over the underlay was accepted");
    Ok(())
}

#[test]
fn endpoints_set_and_get_refuse_bad_addresses_and_missing_services() -> Result<()> {
    let Some(lab) = cluster()? else {
        return Ok(());
    };
    let node_ip = lab.nodes[0].ip.to_string();
    ensure!(ctl(&lab, &["service", "create", "db", "--port", "5432"])?.ok);
    for (addrs, want) in [
        (vec!["127.0.0.1"], "loopback".to_string()),
        (vec!["0.0.0.0"], "unspecified".into()),
        (vec!["255.255.255.255"], "broadcast".into()),
        (vec!["224.0.0.5"], "multicast".into()),
        (vec!["10.96.0.20"], "service CIDR".into()),
        (vec![node_ip.as_str()], "node's own address".into()),
        (vec!["10.1.1.1", "10.1.1.1"], "given twice".into()),
        (vec!["10.1.1.1@bad node"], "not a node name".into()),
    ] {
        let mut a = vec!["endpoints", "set", "db"];
        for x in &addrs {
            a.extend(["--address", x]);
        }
        one_line_error(&ctl(&lab, &a)?, &want, &addrs.join(","))?;
    }
    ensure!(ctl(&lab, &["endpoints", "set", "db", "--address", "10.1.1.1"])?.ok);
    one_line_error(
        &ctl(&lab, &["endpoints", "get", "nosuch"])?,
        "service default/nosuch does not exist",
        "endpoints get nosuch",
    )?;
    Ok(())
}

#[test]
fn network_init_refuses_overlaps() -> Result<()> {
    let Some(lab) = lab(1, &["--network", "10.244.0.0/16"])? else {
        return Ok(());
    };
    // network init refuses networks overlapping the service CIDR, loopback, everything.
    for (net, want) in [
        ("10.96.0.0/16", "overlaps the service CIDR 10.96.0.0/12"),
        ("0.0.0.0/0", "covers every address"),
        ("127.0.0.0/16", "loopback"),
    ] {
        one_line_error(
            &ctl(&lab, &["network", "init", "--network", net, "--force"])?,
            want,
            net,
        )?;
    }
    Ok(())
}

#[test]
fn get_prints_one_json_object_and_list_a_list() -> Result<()> {
    let Some(lab) = cluster()? else {
        return Ok(());
    };
    ensure!(
        ctl(
            &lab,
            &[
                "service",
                "create",
                "web",
                "--port",
                "80",
                "--selector",
                "app=web"
            ]
        )?
        .ok
    );
    // `get -o json` prints the object, `list -o json` a List.
    let o = ctl(&lab, &["service", "get", "web", "-o", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&o.stdout).context("get -o json")?;
    ensure!(v["name"] == "web" && v["clusterIP"].is_string(), "{v}");
    let o = ctl(&lab, &["service", "list", "-o", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&o.stdout).context("list -o json")?;
    ensure!(v["kind"] == "List" && v["items"][0]["name"] == "web", "{v}");
    Ok(())
}

#[test]
fn a_service_with_10000_ports_lists_cut_short_without_panic() -> Result<()> {
    let Some(lab) = cluster()? else {
        return Ok(());
    };

    // A service with 10,000 ports written by hand: list and get cut what they show.
    let ports: Vec<serde_json::Value> = (1..=10_000u32)
        .map(|p| serde_json::json!({"port": p, "targetPort": p, "protocol": "tcp"}))
        .collect();
    let rec = serde_json::json!({"namespace": "default", "name": "wide",
        "clusterIP": "10.96.5.5", "ports": ports, "selector": {"app": "wide"}});
    let endpoint = format!("http://127.0.0.1:{ETCD_PORT}");
    tartan::lab::block_on_in_netns(&lab.infra, move || async move {
        let args = tartan::store::etcd::EtcdArgs::for_endpoints(&[&endpoint]);
        let store = tartan::store::etcd::Store::connect(&args).await?;
        store
            .put("/tartan/services/default/wide", rec.to_string(), 0)
            .await
    })??;
    for args in [&["service", "list"][..], &["service", "get", "wide"]] {
        let o = ctl(&lab, args)?;
        ensure!(o.ok, "{args:?}: {}", o.stderr);
        ensure!(
            o.stdout.contains("more)"),
            "{args:?}: nothing says it was cut"
        );
        let widest = o
            .stdout
            .lines()
            .map(|l| l.chars().count())
            .max()
            .unwrap_or(0);
        ensure!(widest < 1200, "{args:?}: a line of {widest} characters");
    }

    Ok(())
}

#[test]
fn concurrent_deletes_of_one_service_say_it_does_not_exist() -> Result<()> {
    let Some(lab) = cluster()? else {
        return Ok(());
    };
    // 20 concurrent deletes of one service (tartanctl's code path, on one client so they
    // really race): one deletes it, the others say it does not exist.
    ensure!(ctl(&lab, &["service", "create", "gone", "--port", "80"])?.ok);
    let endpoint = format!("http://127.0.0.1:{ETCD_PORT}");
    let results = tartan::lab::block_on_in_netns(&lab.infra, move || async move {
        let args = tartan::store::etcd::EtcdArgs::for_endpoints(&[&endpoint]);
        let store = tartan::store::etcd::Store::connect(&args).await?;
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (store, args) = (store.clone(), args.clone());
                tokio::spawn(async move {
                    let st = tartan::store::services::ServiceStore::new(
                        &store,
                        &args,
                        "10.96.0.0/12".parse()?,
                    );
                    st.delete("default", "gone").await
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await?.map_err(|e| format!("{e:#}")));
        }
        anyhow::Ok(out)
    })??;
    let mut deleted = 0;
    for r in results {
        match r {
            Ok(()) => deleted += 1,
            Err(e) => ensure!(e == "service default/gone does not exist", "{e}"),
        }
    }
    ensure!(deleted == 1, "{deleted} deletes succeeded");
    Ok(())
}

#[test]
fn tartand_refuses_a_service_cidr_over_the_cluster_network_or_underlay() -> Result<()> {
    let Some(mut lab) = lab(1, &["--network", "10.244.0.0/16"])? else {
        return Ok(());
    };
    for (cidr, want) in [
        (
            "10.244.0.0/16",
            "overlaps the cluster network 10.244.0.0/16",
        ),
        (
            "192.168.77.0/25",
            "overlaps the underlay network 192.168.77.",
        ),
        ("0.0.0.0/0", "covers every address"),
    ] {
        lab.start_daemon(0, &["--service-cidr", cidr])?;
        let log = lab.nodes[0].log_file();
        let child = lab.nodes[0].daemon.as_mut().context("no daemon")?;
        let status = wait_for("tartand to refuse", Duration::from_secs(30), || {
            child.try_wait().ok().flatten()
        })?;
        lab.nodes[0].daemon = None;
        ensure!(!status.success(), "{cidr}: tartand exited 0");
        let text = std::fs::read_to_string(&log)?;
        ensure!(
            text.contains(&format!("--service-cidr: service CIDR {cidr}")) && text.contains(want),
            "{cidr}: {want:?} missing from the log:\n{text}"
        );
    }
    Ok(())
}

/// A lab with three etcd members whose leader was just killed; returns the lab and the
/// endpoints of all members (as seen in the infra namespace).
fn lab_without_its_etcd_leader() -> Result<Option<(Lab, String)>> {
    let Some(mut lab) = lab_with_etcd_members(1, 3, &["--network", "10.244.0.0/16"])? else {
        return Ok(None);
    };
    let leader = lab.etcd_leader()?;
    let all = (0..3u16)
        .map(|m| format!("http://127.0.0.1:{}", ETCD_PORT + 10000 * m))
        .collect::<Vec<_>>()
        .join(",");
    lab.stop_etcd_member(leader);
    Ok(Some((lab, all)))
}

#[test]
fn service_create_right_after_losing_the_etcd_leader_succeeds() -> Result<()> {
    let Some((lab, all)) = lab_without_its_etcd_leader()? else {
        return Ok(());
    };
    let start = std::time::Instant::now();
    let o = ctl(
        &lab,
        &[
            "--etcd-endpoints",
            &all,
            "service",
            "create",
            "soon",
            "--port",
            "80",
        ],
    )?;
    ensure!(
        o.ok,
        "create {:?} after losing the leader: {}",
        start.elapsed(),
        o.stderr
    );
    Ok(())
}

#[test]
fn the_create_transaction_right_after_losing_the_etcd_leader_is_sent_again() -> Result<()> {
    let Some((lab, all)) = lab_without_its_etcd_leader()? else {
        return Ok(());
    };
    // The transaction first, with no read before it to ride out the election.
    let created = tartan::lab::block_on_in_netns(&lab.infra, move || async move {
        let eps: Vec<&str> = all.split(',').collect();
        let args = tartan::store::etcd::EtcdArgs::for_endpoints(&eps);
        let store = tartan::store::etcd::Store::connect(&args).await?;
        let st = tartan::store::services::ServiceStore::new(&store, &args, "10.96.0.0/12".parse()?);
        let svc = tartan::model::service::Service {
            namespace: "default".into(),
            name: "first".into(),
            cluster_ip: std::net::Ipv4Addr::UNSPECIFIED,
            ports: vec!["80/tcp".parse().map_err(anyhow::Error::msg)?],
            selector: None,
            session_affinity: Default::default(),
            session_affinity_timeout: 10800,
            external_traffic_policy: Default::default(),
            cluster_ips: Vec::new(),
            ip_families: Vec::new(),
            ip_family_policy: Default::default(),
        };
        let start = std::time::Instant::now();
        st.create(svc, None, &[])
            .await
            .map_err(|e| anyhow::anyhow!("after {:?}: {e:#}", start.elapsed()))
    })??;
    ensure!(created.name == "first");
    Ok(())
}

/// The IPv6 cluster IP `service create` printed, if any.
fn created_ip6(out: &str) -> Option<std::net::Ipv6Addr> {
    out.split("IPv6 cluster IP ")
        .nth(1)?
        .split(',')
        .next()?
        .trim()
        .parse()
        .ok()
}

#[test]
fn dual_stack_services_get_an_ipv6_cluster_ip_by_policy_and_release_it() -> Result<()> {
    let Some(lab) = cluster()? else {
        return Ok(());
    };
    let both = "10.96.0.0/12,fd00:96::/108";
    let create = |name: &str, cidrs: &str, extra: &[&str]| {
        let mut a = vec![
            "service",
            "create",
            name,
            "--port",
            "80",
            "--service-cidr",
            cidrs,
        ];
        a.extend_from_slice(extra);
        ctl(&lab, &a)
    };
    let o = create("web", both, &["--ip-family-policy", "RequireDualStack"])?;
    ensure!(o.ok, "{}", o.stderr);
    let ip6 = created_ip6(&o.stdout).with_context(|| o.stdout.clone())?;
    ensure!(
        "fd00:96::/108"
            .parse::<ipnetwork::Ipv6Network>()?
            .contains(ip6),
        "{ip6} outside the range"
    );
    let alloc = lab.etcdctl(&[
        "get",
        "--print-value-only",
        &format!("/tartan/alloc/clusterip/{ip6}"),
    ])?;
    ensure!(
        alloc.trim() == "default/web",
        "allocation of {ip6}: {alloc:?}"
    );
    let rec = lab.etcdctl(&["get", "--print-value-only", "/tartan/services/default/web"])?;
    for want in [
        "\"clusterIPs\":[\"".to_string(),
        format!("\"{ip6}\"]"),
        "\"ipFamilies\":[\"IPv4\",\"IPv6\"]".to_string(),
        "\"ipFamilyPolicy\":\"RequireDualStack\"".to_string(),
    ] {
        ensure!(rec.contains(&want), "{want} missing from {rec}");
    }
    let list = ctl(&lab, &["service", "list"])?;
    ensure!(list.stdout.contains(&format!(",{ip6}")), "{}", list.stdout);
    // Kubernetes' kebab-less names and ours both parse; PreferDualStack without an IPv6 range
    // is IPv4 alone, RequireDualStack is refused with the reason.
    let o = create(
        "pref",
        "10.96.0.0/12",
        &["--ip-family-policy", "prefer-dual-stack"],
    )?;
    ensure!(
        o.ok && created_ip6(&o.stdout).is_none(),
        "{} {}",
        o.stdout,
        o.stderr
    );
    let o = create("pref2", both, &["--ip-family-policy", "PreferDualStack"])?;
    ensure!(
        o.ok && created_ip6(&o.stdout).is_some(),
        "{} {}",
        o.stdout,
        o.stderr
    );
    let o = create("single", both, &[])?;
    ensure!(
        o.ok && created_ip6(&o.stdout).is_none(),
        "{} {}",
        o.stdout,
        o.stderr
    );
    one_line_error(
        &create(
            "req",
            "10.96.0.0/12",
            &["--ip-family-policy", "RequireDualStack"],
        )?,
        "RequireDualStack: there is no IPv6 service range",
        "RequireDualStack without an IPv6 range",
    )?;
    for (cidrs, want) in [
        (
            "10.96.0.0/12,fd00::/108,fd01::/108",
            "two ranges of one family",
        ),
        ("fd00:96::/108", "has no IPv4 range"),
        ("10.96.0.0/12,fe80::/108", "overlaps link-local"),
    ] {
        one_line_error(&create("bad", cidrs, &[])?, want, cidrs)?;
    }
    // Deleting releases both addresses.
    let o = ctl(&lab, &["service", "delete", "web"])?;
    ensure!(o.ok, "{}", o.stderr);
    let left = lab.etcdctl(&[
        "get",
        "--keys-only",
        "--prefix",
        "/tartan/alloc/clusterip/fd00",
    ])?;
    let others: Vec<&str> = left.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(
        others.len() == 1 && !others[0].contains(&ip6.to_string()),
        "allocations left: {others:?}"
    );
    Ok(())
}
