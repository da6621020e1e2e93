//! Overlay tests: real etcd, real namespaces, real netlink and nftables.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use common::*;
use tartan::netns_lab::ip;

#[test]
fn three_nodes_distinct_subnets_and_cross_node_tcp() -> Result<()> {
    let Some(mut lab) = lab(3, &["--network", "10.244.0.0/16"])? else {
        return Ok(());
    };
    for i in 0..3 {
        lab.start_daemon(i, &[])?;
    }
    let subnets: Vec<_> = (0..3).map(|i| lab.wait_subnet(i)).collect::<Result<_>>()?;
    ensure!(subnets[0] != subnets[1] && subnets[1] != subnets[2] && subnets[0] != subnets[2]);
    let listing = lab.etcdctl(&["get", "--prefix", "/coreos.com/network/subnets/"])?;
    for s in &subnets {
        let key = format!("/coreos.com/network/subnets/{}-{}", s.network(), s.prefix());
        ensure!(listing.contains(&key), "{key} missing in etcd: {listing}");
    }
    ensure!(listing.contains("\"BackendType\":\"vxlan\""), "{listing}");
    let p1 = lab.add_manual_pod(0, 1)?;
    let p3 = lab.add_manual_pod(2, 1)?;
    echo_server(&p3.ns, 7000)?;
    wait_tcp_echo(&p1.ns, p3.ip, 7000, Duration::from_secs(20))?;
    let routes = ip(&["-n", &lab.nodes[0].ns, "route", "show", "proto", "157"])?;
    ensure!(routes.contains("onlink"), "{routes}");
    Ok(())
}
