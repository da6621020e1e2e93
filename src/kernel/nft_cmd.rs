//! Runs the `nft` command: applies rulesets (one `nft -f -` invocation is one kernel
//! transaction) and lists tables, always in the current network namespace.

use std::process::Stdio;

use anyhow::{Context, Result, bail};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// Applies `script` with `nft -f -` as one atomic transaction.
pub async fn apply(script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (is the nftables package installed?)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .context("writing the ruleset to nft")?;
    }
    let out = child.wait_with_output().await.context("waiting for nft")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first: Vec<&str> = err.lines().take(6).collect();
        bail!("nft rejected the ruleset: {}", first.join(" | "));
    }
    Ok(())
}

/// Lists one table in nft's text form; `None` when it does not exist.
pub async fn list_table(family: &str, name: &str) -> Result<Option<String>> {
    run_list(&["list", "table", family, name]).await
}

async fn run_list(args: &[&str]) -> Result<Option<String>> {
    let out = Command::new("nft")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .context("running nft (is the nftables package installed?)")?;
    if out.status.success() {
        return Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()));
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("No such file or directory") {
        return Ok(None);
    }
    bail!("nft {}: {}", args.join(" "), err.trim())
}

/// Deletes a table if it exists.
pub async fn delete_table(family: &str, name: &str) -> Result<()> {
    apply(&format!(
        "table {family} {name}\ndelete table {family} {name}\n"
    ))
    .await
}

/// Names of the chains of `family`/`table` (fast: no set elements are read).
pub async fn list_chains(family: &str, table: &str) -> Result<Vec<String>> {
    let Some(json) = run_list(&["-j", "list", "chains", family]).await? else {
        return Ok(Vec::new());
    };
    let doc: nftables::schema::Nftables =
        serde_json::from_str(&json).context("decoding `nft -j list chains`")?;
    Ok(doc
        .objects
        .iter()
        .filter_map(|o| match o {
            nftables::schema::NfObject::ListObject(nftables::schema::NfListObject::Chain(c))
                if c.table == table =>
            {
                Some(c.name.to_string())
            }
            _ => None,
        })
        .collect())
}
