//! Chaos tests: an etcd leader killed under live traffic, a daemon killed with SIGKILL at
//! random points of a large sync. Real etcd (3 members where it matters), real namespaces,
//! real nftables; each test bounded in time.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::*;
use tartan::netns_lab::wait_for;

const NET16: &[&str] = &["--network", "10.244.0.0/16"];

#[test]
fn sigkill_at_random_points_of_a_large_sync_leaves_a_table_that_matches_etcd() -> Result<()> {
    use rand::RngExt;
    let Some(mut lab) = lab(1, NET16)? else {
        return Ok(());
    };
    tartan::netbench::service_bed::load_bulk_services(&lab, 3000)?;
    let log = lab.nodes[0].log_file();
    let synced = |log: &std::path::Path| {
        std::fs::read_to_string(log)
            .map(|t| t.matches("service table fully synced").count())
            .unwrap_or(0)
    };
    // How long one full sync takes here, so the kills land inside one.
    let t = Instant::now();
    lab.start_daemon(0, &[])?;
    wait_for("the first full sync", Duration::from_secs(60), || {
        (synced(&log) >= 1).then_some(())
    })?;
    let sync = t.elapsed();
    let mut rng = rand::rng();
    for round in 0..4 {
        lab.kill_daemon(0)?;
        let before = synced(&log);
        lab.start_daemon(0, &[])?;
        let at = Duration::from_millis(rng.random_range(0..=sync.as_millis().max(1) as u64));
        std::thread::sleep(at);
        lab.kill_daemon(0)?;
        eprintln!(
            "round {round}: SIGKILL {} ms into a ~{} ms sync (it had {}finished)",
            at.as_millis(),
            sync.as_millis(),
            if synced(&log) > before { "" } else { "not " }
        );
    }
    let before = synced(&log);
    let t = Instant::now();
    lab.start_daemon(0, &[])?;
    wait_for(
        "the full sync after the kills",
        Duration::from_secs(60),
        || (synced(&log) > before).then_some(()),
    )?;
    eprintln!(
        "restart after the kills -> table synced in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let node = lab.nodes[0].ns.clone();
    let tables = tartan::netns_lab::ns_run(&node, "nft", &["list", "tables"])?;
    ensure!(
        tables.matches("tartan_svc").count() == 1,
        "a half-built table was left beside the one in force: {tables}"
    );
    let want = expected_elements(&lab, &[lab.nodes[0].name.clone()])?;
    let want = want.first().context("no expected table")?;
    ensure!(want.len() > 3000, "too little to compare: {}", want.len());
    wait_table_matches(&lab, 0, want)
}
