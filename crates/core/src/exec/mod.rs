//! The spine: a model is a sequence of blocks, run forward and backward block by block.
mod blocks;
mod llama;

pub use blocks::{BlockModel, Executor, GradAccumulator, Hooks, StepOutput};
