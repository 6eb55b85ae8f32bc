//! Tensor, sequence and pipeline parallelism through the trainer, their hybrids, and
//! resharding checkpoints — one test binary (each links the whole trainer).

#[path = "../common/mod.rs"]
mod common;
mod compare;
mod expert_parallel;
mod pipeline_parallel;
mod reshard;
mod sequence_parallel;
mod tensor_parallel;
