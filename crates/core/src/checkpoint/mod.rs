//! Checkpoint formats: HF safetensors (single and sharded) and atomic file writes.
pub mod atomic;
pub mod distributed;
pub mod hf;
pub mod llama;
