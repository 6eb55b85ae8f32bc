//! Tensor, sequence and pipeline parallelism at the library level against one rank — one test
//! binary.

mod engine_family;
mod multi_stream;
mod pipeline_parallel;
mod sequence_parallel;
mod shared;
mod skipnet;
mod tensor_parallel;
mod zero_state;
