//! `netbench`: builds a cluster in network namespaces with tartan itself and measures what
//! each hop of the overlay and the service NAT costs.

pub mod demo;
pub mod probe;
pub mod service_bed;
