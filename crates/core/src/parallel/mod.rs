//! Parallelism applied from outside the model, one file per dimension.
pub mod data;
pub mod zero;

pub use data::DataParallelSink;
pub use zero::{FlatLayout, ZeroGradSink, ZeroOptimizer};
