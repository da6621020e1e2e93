//! tartan: a VXLAN overlay network and service-proxy dataplane for container clusters.
//!
//! Data flows from etcd (flannel-compatible subnet leases, tartan's own records) through pure
//! planning modules (`subnet_alloc`, `overlay_plan`) to thin kernel layers (`netlink_ops`,
//! `nft_cmd`). See `docs/architecture.md`.

pub mod backoff;
pub mod cni;
pub mod commands;
pub mod daemon;
pub mod etcd_store;
pub mod json_decode;
pub mod logging;
pub mod masq_rules;
pub mod metrics;
pub mod netbench;
pub mod netconf;
pub mod netlink_ops;
pub mod netns_lab;
pub mod nft_cmd;
pub mod nft_netlink;
pub mod node_liveness;
pub mod node_lock;
pub mod node_state;
pub mod overlay_plan;
pub mod overlay_reconciler;
pub mod pod_record;
pub mod pod_registrar;
#[cfg(test)]
mod proptest_support;
pub mod service_model;
pub mod service_proxy;
pub mod service_rules;
pub mod service_state;
pub mod service_store;
pub mod shutdown;
pub mod status;
pub mod subnet_alloc;
pub mod subnet_env;
pub mod subnet_lease;
pub mod subnet_manager;
#[cfg(test)]
mod test_tmp;
