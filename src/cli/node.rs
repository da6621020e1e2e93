//! `tartanctl node leave NAME`: ask a node to release its subnet and remove its dataplane.

use anyhow::{Result, bail};

use crate::model::subnet_lease::LeaseValue;
use crate::store::etcd::{EtcdArgs, Store};
use crate::store::keys::node_key;

/// `tartanctl node ...`
#[derive(clap::Subcommand, Debug)]
pub enum NodeCmd {
    /// Release NAME's subnet; its running tartand removes the device and rules and exits.
    Leave {
        /// The node name.
        name: String,
    },
}

/// Runs `node ...`.
pub async fn run(etcd: &EtcdArgs, cmd: NodeCmd) -> Result<()> {
    let store = Store::connect(etcd).await?;
    match cmd {
        NodeCmd::Leave { name } => {
            let (_, items) = store.list(&etcd.subnets_prefix()).await?;
            let owned: Vec<_> = items
                .into_iter()
                .filter(|it| {
                    LeaseValue::parse(&it.value)
                        .ok()
                        .and_then(|v| v.node_name)
                        .as_deref()
                        == Some(name.as_str())
                })
                .collect();
            if owned.is_empty() {
                bail!("node {name:?} holds no subnet");
            }
            // The marker first, so the daemon sees it when its key disappears.
            store
                .put(&crate::store::keys::leave_key(etcd, &name), "leave", 0)
                .await?;
            for it in owned {
                if it.lease == 0 {
                    println!("{}: reservation kept", it.key);
                    continue;
                }
                store.delete(&it.key).await?;
                let _ = store.revoke(it.lease).await;
                println!("{}: released", it.key);
            }
            let _ = store.delete(&node_key(etcd, &name)).await;
            Ok(())
        }
    }
}
