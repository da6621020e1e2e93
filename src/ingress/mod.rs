//! The HTTP ingress (`tartan-ingress`): requests from outside the cluster, routed by host and
//! path to services' pods, with live route, certificate and endpoint changes.
//!
//! Data flows one way: etcd → `store::ingress` records and `store::records` feeds →
//! [`routes`] (the route table) and [`backends`] (each service's ports and ready endpoint
//! addresses) → [`proxy`] (per request: route, [`balance`], [`headers`], forward over [`upstream`]'s pools) over
//! [`tls`] (certificates by SNI); [`run`] wires it, [`metrics`] counts it.

pub mod backends;
pub mod balance;
pub mod headers;
pub mod metrics;
pub mod proxy;
pub mod routes;
pub mod run;
pub mod tls;
pub mod upstream;
