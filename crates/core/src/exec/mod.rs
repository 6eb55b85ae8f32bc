//! The spine: a model is a sequence of blocks, run forward and backward block by block.
mod acts;
mod blocks;
mod llama;
pub use llama::{llama_inputs, H, IDS, LOGITS};

pub use acts::Acts;
pub use blocks::{
    grad_ready_block, on_output, BlockModel, ChunkState, Executor, FullParams, GradAccumulator,
    Hooks, LossFn, ParamSource, StepOutput,
};
