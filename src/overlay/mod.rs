//! The VXLAN overlay: peers from leases (`plan`), their kernel side (`kernel`, `events`),
//! masquerade rules and the reconciler loop.

pub mod events;
pub mod kernel;
pub mod masquerade;
pub mod plan;
pub mod reconciler;
