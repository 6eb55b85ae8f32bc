//! colossal-core: the training spine of colossal-rs.
//!
//! Models are plain (`models`), the block-wise executor (`exec`) runs them block by block,
//! and everything else (optimizer, checkpoints, data, trainer) hooks in around it.

pub mod checkpoint;
pub mod config;
#[cfg(feature = "cuda")]
pub(crate) mod cuda_op;
pub mod data;
pub mod dist;
pub mod error;
pub mod exec;
pub mod infer;
pub mod lora;
pub mod models;
pub mod nn;
pub mod optim;
pub mod parallel;
pub mod params;
pub mod quant;
pub mod runtime;
pub mod train;

pub use error::{Error, Result};
