//! Stable Diffusion on the colossal-rs engine, in the diffusers folder layout.
//!
//! Built so far: the noise schedulers (`scheduler`), read from a diffusers
//! `scheduler_config.json`.

pub mod error;
pub mod scheduler;

pub use error::{Error, Result};
