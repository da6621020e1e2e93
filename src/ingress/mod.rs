//! The HTTP ingress: requests from outside the cluster, routed by host and path to services.
//! `routes` holds the route table (which route and backend a request goes to); `backends`
//! what each service's traffic goes to (its ports and ready endpoint addresses). The records
//! they are built from are `model::ingress`'s, stored by `store::ingress`, and the service,
//! pod and endpoints records decoded by `store::records`.

pub mod backends;
pub mod routes;
