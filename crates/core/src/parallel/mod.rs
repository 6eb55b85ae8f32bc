//! Parallelism applied from outside the model, one file per dimension.
pub mod data;
pub mod expert;
pub mod offload;
pub mod pipeline;
pub mod pipeline_run;
pub mod plan;
pub mod sequence;
pub mod state_ops;
pub mod tensor;
pub mod weight_grad;
pub mod zero;
pub mod zero3;

pub use data::DataParallelSink;
pub use offload::{Placement, StateBuf};
pub use state_ops::{adam_update, SqSum};
pub use zero::{FlatLayout, ZeroGradSink, ZeroOptimizer};
pub use zero3::{Zero3, Zero3GradSink, Zero3Source};
