//! Training: the per-step update (`step`), the run loop (`run`), evaluation metrics, plots,
//! configuration and checkpoints.

pub mod checkpoint;
pub mod config;
pub mod metrics;
pub mod plot;
pub mod run;
pub mod step;
