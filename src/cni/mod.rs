//! The CNI plugin `tartan-cni`: gives containers an address of the node's leased subnet on
//! the node bridge, and records them for tartand to register in etcd.
//!
//! - [`spec`]: the CNI protocol (environment, config, results, version conversion);
//! - [`error`]: CNI error codes and the error object;
//! - [`ipam`]: the allocation directory (the node's source of truth for its pods);
//! - [`links`]: bridge, veth pair, container address and route (netlink);
//! - [`nl_batch`]: batched synchronous rtnetlink requests (tartand's ADD fast path);
//! - [`daemon_link`]: the plugin's side of tartand's unix socket (the `sync` nudge, the ADD
//!   request with the pod namespace as a descriptor) and the wire format;
//! - [`add_server`]: tartand's side of that socket: the ADD done in the daemon;
//! - [`plugin`]: the verbs ADD, DEL, CHECK, VERSION, STATUS and GC.
//!
//! See `docs/architecture.md` ("CNI plugin") for the data flow.

pub mod add_server;
pub mod daemon_link;
pub mod error;
pub mod ipam;
pub mod links;
pub mod nl_batch;
pub mod plugin;
pub mod spec;
