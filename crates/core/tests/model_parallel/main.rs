//! Tensor, sequence and pipeline parallelism at the library level against one rank — one test
//! binary.

mod multi_stream;
mod pipeline_parallel;
mod sequence_parallel;
mod shared;
mod tensor_parallel;
