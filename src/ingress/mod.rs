//! The HTTP ingress: requests from outside the cluster, routed by host and path to services.
//! `routes` holds the route table (which route and backend a request goes to); the records
//! it is built from are `model::ingress`'s, stored by `store::ingress`.

pub mod routes;
