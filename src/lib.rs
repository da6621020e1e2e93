//! tartan: a VXLAN overlay network and service-proxy dataplane for container clusters.
//!
//! One room per concept, dependencies pointing down this list (see `docs/architecture.md`):
//! `util` (no tartan dependencies) · `model` (records: parse and validate) · `store` (etcd,
//! reflector) · `kernel` (netlink, nftables) · `metrics` · `node` (this node's subnet and
//! liveness) · `overlay` (peers → VXLAN neighbours, FDB, routes) · `proxy` (services → the
//! nftables service table) · `ingress` (HTTP routes by host and path) · `cni` (the plugin) ·
//! `api` (what the daemon tells the CLI) · `daemon` (wiring) · `cli` (tartanctl) · `lab` and
//! `netbench` (network-namespace clusters for tests and benchmarks, behind the `lab` feature).
#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod cni;
pub mod daemon;
pub mod dns;
pub mod ingress;
pub mod kernel;
#[cfg(feature = "lab")]
pub mod lab;
pub mod metrics;
pub mod model;
#[cfg(feature = "lab")]
pub mod netbench;
pub mod node;
pub mod overlay;
pub mod proxy;
pub mod store;
pub mod util;
