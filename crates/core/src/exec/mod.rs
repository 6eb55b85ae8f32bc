//! The spine: a model is a sequence of blocks, run forward and backward block by block.
mod blocks;
mod llama;

pub use blocks::{
    grad_ready_block, BlockModel, ChunkState, Executor, FullParams, GradAccumulator, Hooks, LossFn,
    ParamSource, StepOutput,
};
