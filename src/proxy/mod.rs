//! The service proxy: services and endpoints → rules (`rules`), the model and planner
//! (`state`), and the loop that keeps the nftables service table in sync (`run`).

pub mod rules;
pub mod run;
pub mod state;
