//! `netbench`: builds a cluster in network namespaces with tartan itself and measures what
//! each hop of the overlay and the service NAT costs.

pub mod charts;
pub mod demo;
pub mod probe;
pub mod report;
pub mod run;
pub mod service_bed;
pub mod stats;
pub mod topology;
