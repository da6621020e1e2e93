//! The cluster DNS: names for services and pods (CoreDNS kubernetes-plugin semantics) served
//! on every node at the cluster DNS address, for the node's own pods.
//!
//! Data flows one way: the record feeds (`store::records`, shared with the proxy) →
//! [`catalog`] (model objects → owner names and records) → [`zone`] (the concurrent name
//! map) → [`answer`] (one query → one response, pure) → [`server`] (UDP and TCP sockets on
//! threads of their own) and, for names outside the zone, [`forward`] (upstream resolvers
//! with a bounded cache).

pub mod answer;
pub mod answer_cache;
pub mod catalog;
pub mod device;
pub mod forward;
pub mod lookup;
pub mod run;
pub mod server;
pub mod zone;
