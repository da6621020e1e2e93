//! The service proxy: services and endpoints → rules (`rules`), the model and planner
//! (`state`), and the loop that keeps the service table in sync (`run`), and the table
//! itself behind a seam (`table`).

pub mod rules;
pub mod run;
pub mod state;
pub mod table;
