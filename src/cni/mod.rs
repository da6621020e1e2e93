//! The CNI plugin `tartan-cni`: gives containers an address of the node's leased subnet on
//! the node bridge, and records them for tartand to register in etcd.
//!
//! - [`spec`]: the CNI protocol (environment, config, results, version conversion);
//! - [`error`]: CNI error codes and the error object;
//! - [`bounded_read`]: reads of stdin and of files that stop at a limit (regular files only);
//! - [`ipam`]: the allocation directory (the node's source of truth for its pods);
//! - [`links`]: bridge, veth pair, container address and route (netlink);
//! - [`daemon_link`]: the nudge to tartand over its unix socket;
//! - [`plugin`]: the verbs ADD, DEL, CHECK, VERSION, STATUS and GC.
//!
//! See `docs/architecture.md` ("CNI plugin") for the data flow.

pub mod bounded_read;
pub mod daemon_link;
pub mod error;
pub mod ipam;
pub mod links;
pub mod plugin;
pub mod spec;
