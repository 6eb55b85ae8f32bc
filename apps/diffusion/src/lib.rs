//! Stable Diffusion on the colossal-rs engine, in the diffusers folder layout.
//!
//! Built so far: the noise schedulers (`scheduler`, from a `scheduler_config.json`) and
//! CLIP's tokenizer and text encoder (`clip`, from `tokenizer/` and `text_encoder/`), the
//! conditional UNet (`unet`, from `unet/`) and the KL autoencoder (`vae`, from `vae/`).

pub mod clip;
pub mod config_keys;
pub mod conv_blocks;
pub mod data;
pub mod error;
pub mod lora;
pub mod nn;
pub mod pipeline;
pub mod scheduler;
pub mod space;
pub mod train;
pub mod unet;
pub mod vae;
pub mod weights;

pub use error::{Error, Result};
