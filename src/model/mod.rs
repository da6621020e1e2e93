//! Records as stored and exchanged, pure: parsing and validation of the network config,
//! subnet leases, `subnet.env`, services, pods, ingress routes and certificates. Nothing here
//! does I/O. Decoders return [`DecodeError`], which names the field at fault.

mod error;
pub mod ingress;
pub mod netconf;
pub mod node_record;
pub mod pod;
pub mod service;
pub mod subnet_env;
pub mod subnet_lease;

pub use error::DecodeError;
