//! This node: its subnet (choice, lease keeping, state file), its liveness record and the
//! locks that keep one daemon per node.

pub mod liveness;
pub mod lock;
pub mod state_file;
pub mod subnet_alloc;
pub mod subnet_keeper;
