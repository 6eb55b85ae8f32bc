//! Parallelism applied from outside the model, one file per dimension.
pub mod data;

pub use data::DataParallelSink;
