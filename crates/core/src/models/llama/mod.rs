//! LLaMA as in Hugging Face `modeling_llama.py`: embedding, N decoder layers
//! (RMSNorm → GQA attention with RoPE → residual, RMSNorm → SwiGLU MLP → residual),
//! final RMSNorm and LM head. Weights live in [`Params`](crate::params::Params) under HF names.

mod config;
mod family;
pub(crate) mod generate;
mod inputs;
mod model;
pub mod moe;
mod names;
mod plan;
pub mod regions;
mod rope;

pub use crate::models::family::ParamSink;
pub use config::LlamaConfig;
pub use generate::{generate, generate_stream, GenerateOptions, Sampling};
pub use inputs::{AttnInputs, KvCache};
pub use model::{init_each_param, init_params, Attend, Kernels, Llama};
pub use regions::{Local, Regions};
pub use rope::{Rope, RopeParameters, RopeType};
